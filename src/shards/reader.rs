//! Reads shards back into [`Row`]s, streaming record batches, checking the schema.

use super::schema::{Row, ShardSchema, METHODS};
use crate::storage::Location;
use anyhow::{bail, Context, Result};
use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{Float32Type, Int32Type, Int64Type, Int8Type};
use bytes::Bytes;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use parquet::file::reader::ChunkReader;
use std::fs::File;

/// Streams the rows of one shard file.
pub struct ShardReader {
    reader: ParquetRecordBatchReader,
    path: String,
}

impl ShardReader {
    /// Opens a shard (a local file, read as it streams, or an object fetched whole) and
    /// checks its schema against the task's.
    pub fn open(loc: &Location, expected: &ShardSchema) -> Result<Self> {
        match loc.as_local() {
            Some(p) => {
                let f = File::open(p).with_context(|| format!("{loc}: cannot open shard"))?;
                Self::build(f, &loc.to_string(), expected)
            }
            None => Self::from_bytes(loc.read()?, &loc.to_string(), expected),
        }
    }

    /// Reads a shard held in memory; `name` is for messages.
    pub fn from_bytes(bytes: Bytes, name: &str, expected: &ShardSchema) -> Result<Self> {
        Self::build(bytes, name, expected)
    }

    fn build<T: ChunkReader + 'static>(
        input: T,
        path: &str,
        expected: &ShardSchema,
    ) -> Result<Self> {
        let b = ParquetRecordBatchReaderBuilder::try_new(input)
            .with_context(|| format!("{path}: not a readable Parquet file"))?;
        let got = b.schema();
        for field in expected.schema.fields() {
            match got.field_with_name(field.name()) {
                Ok(g) if g.data_type() == field.data_type() => {}
                Ok(g) => bail!(
                    "{path}: column `{}` has type {}, expected {}",
                    field.name(),
                    g.data_type(),
                    field.data_type()
                ),
                Err(_) => bail!("{path}: missing column `{}`", field.name()),
            }
        }
        let reader = b.with_batch_size(1024).build()?;
        Ok(Self {
            reader,
            path: path.to_string(),
        })
    }

    /// Next batch of rows, or `None` at the end.
    pub fn next_rows(&mut self, schema: &ShardSchema) -> Result<Option<Vec<Row>>> {
        match self.reader.next() {
            None => Ok(None),
            Some(b) => {
                let b = b.with_context(|| format!("{}: corrupt shard data", self.path))?;
                Ok(Some(
                    rows_from_batch(&b, schema).with_context(|| self.path.clone())?,
                ))
            }
        }
    }
}

fn list_u32(a: &dyn Array, i: usize) -> Option<Vec<u32>> {
    let l = a.as_list::<i32>();
    (!l.is_null(i)).then(|| {
        l.value(i)
            .as_primitive::<Int32Type>()
            .values()
            .iter()
            .map(|&x| x as u32)
            .collect()
    })
}

fn list_i8(a: &dyn Array, i: usize) -> Option<Vec<i8>> {
    let l = a.as_list::<i32>();
    (!l.is_null(i)).then(|| l.value(i).as_primitive::<Int8Type>().values().to_vec())
}

fn opt_f32(a: &dyn Array, i: usize) -> Option<f32> {
    (!a.is_null(i)).then(|| a.as_primitive::<Float32Type>().value(i))
}

fn opt_i32(a: &dyn Array, i: usize) -> Option<i32> {
    (!a.is_null(i)).then(|| a.as_primitive::<Int32Type>().value(i))
}

/// Converts a record batch of the shard schema back to rows.
pub fn rows_from_batch(b: &RecordBatch, schema: &ShardSchema) -> Result<Vec<Row>> {
    let col = |n: &str| {
        b.column_by_name(n)
            .map(|c| c.clone())
            .ok_or_else(|| anyhow::anyhow!("missing column `{n}`"))
    };
    let texts: Vec<_> = schema
        .text_columns
        .iter()
        .map(|c| col(c))
        .collect::<Result<_>>()?;
    let (label, idx, method, copy, partner, lambda, eps) = (
        col("label")?,
        col("idx")?,
        col("method")?,
        col("copy")?,
        col("partner_idx")?,
        col("lambda")?,
        col("epsilon")?,
    );
    let (ids, types, changed, logits, pids, ptypes, pert) = (
        col("input_ids")?,
        col("token_type_ids")?,
        col("changed_tokens")?,
        col("teacher_logits")?,
        col("partner_input_ids")?,
        col("partner_token_type_ids")?,
        col("perturbation")?,
    );
    let logits = logits.as_fixed_size_list();
    let mut out = Vec::with_capacity(b.num_rows());
    for i in 0..b.num_rows() {
        let m = method.as_string::<i32>().value(i);
        let Some(&m) = METHODS.iter().find(|&&k| k == m) else {
            bail!("row {i}: unknown method `{m}`")
        };
        let lab = if label.is_null(i) {
            None
        } else if schema.regression {
            Some(label.as_primitive::<Float32Type>().value(i))
        } else {
            Some(label.as_primitive::<Int64Type>().value(i) as f32)
        };
        out.push(Row {
            texts: texts
                .iter()
                .map(|t| t.as_string::<i32>().value(i).to_string())
                .collect(),
            label: lab,
            idx: idx.as_primitive::<Int32Type>().value(i) as i64,
            method: m,
            copy: copy.as_primitive::<Int32Type>().value(i) as u32,
            partner_idx: opt_i32(partner.as_ref(), i).map(|x| x as i64),
            lambda: opt_f32(lambda.as_ref(), i),
            epsilon: opt_f32(eps.as_ref(), i),
            input_ids: list_u32(ids.as_ref(), i).unwrap_or_default(),
            token_type_ids: list_i8(types.as_ref(), i)
                .unwrap_or_default()
                .into_iter()
                .map(|x| x as u8)
                .collect(),
            changed_tokens: opt_i32(changed.as_ref(), i).map(|x| x as u32),
            teacher_logits: logits
                .value(i)
                .as_primitive::<Float32Type>()
                .values()
                .to_vec(),
            partner_input_ids: list_u32(pids.as_ref(), i),
            partner_token_type_ids: list_i8(ptypes.as_ref(), i)
                .map(|v| v.into_iter().map(|x| x as u8).collect()),
            perturbation: list_i8(pert.as_ref(), i),
        });
        let r = out.last().expect("pushed");
        if r.input_ids.is_empty() || r.token_type_ids.len() != r.input_ids.len() {
            bail!(
                "row {i}: `token_type_ids` has {} values for {} `input_ids`",
                r.token_type_ids.len(),
                r.input_ids.len()
            );
        }
        if r.partner_input_ids.as_ref().map(|v| v.len())
            != r.partner_token_type_ids.as_ref().map(|v| v.len())
        {
            bail!("row {i}: `partner_input_ids` and `partner_token_type_ids` differ in length");
        }
        if r.perturbation
            .as_ref()
            .is_some_and(|p| p.len() % r.input_ids.len() != 0)
        {
            bail!("row {i}: `perturbation` length is not a multiple of the row length");
        }
    }
    Ok(out)
}
