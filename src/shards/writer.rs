//! Streaming shard writer: rows arrive in batches and become zstd-compressed Parquet row
//! groups, written under a temporary name and renamed when complete.

use super::schema::{Row, ShardSchema};
use crate::util::AtomicFile;
use anyhow::{Context, Result};
use arrow::array::{
    ArrayRef, FixedSizeListBuilder, Float32Builder, Int32Builder, Int64Builder, Int8Builder,
    ListBuilder, RecordBatch, StringBuilder,
};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Writes one shard file.
pub struct ShardWriter {
    writer: ArrowWriter<AtomicFile>,
    schema: ShardSchema,
    path: PathBuf,
    rows: usize,
}

impl ShardWriter {
    /// Starts a shard at `path` (visible under that name only after [`finish`](Self::finish)).
    pub fn create(path: &Path, schema: &ShardSchema) -> Result<Self> {
        let file = AtomicFile::create(path)?;
        let props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::try_new(3)?))
            .set_created_by(format!("augpro {}", env!("CARGO_PKG_VERSION")))
            .set_max_row_group_row_count(Some(4096))
            .build();
        let writer = ArrowWriter::try_new(file, schema.schema.clone(), Some(props))
            .with_context(|| format!("{}: cannot start Parquet writer", path.display()))?;
        Ok(Self {
            writer,
            schema: schema.clone(),
            path: path.to_path_buf(),
            rows: 0,
        })
    }

    /// Appends rows as one record batch.
    pub fn write(&mut self, rows: &[Row]) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let batch = to_batch(&self.schema, rows)?;
        self.writer
            .write(&batch)
            .with_context(|| format!("{}: write failed", self.path.display()))?;
        self.rows += rows.len();
        Ok(())
    }

    /// Closes the Parquet footer, fsyncs and renames; returns the row count.
    pub fn finish(self) -> Result<usize> {
        let file = self
            .writer
            .into_inner()
            .with_context(|| format!("{}: cannot finish Parquet file", self.path.display()))?;
        file.commit()?;
        Ok(self.rows)
    }
}

/// Converts rows to a record batch of the shard schema.
pub fn to_batch(schema: &ShardSchema, rows: &[Row]) -> Result<RecordBatch> {
    let n = rows.len();
    let mut cols: Vec<ArrayRef> = Vec::new();
    for (c, _) in schema.text_columns.iter().enumerate() {
        let mut b = StringBuilder::new();
        for r in rows {
            b.append_value(r.texts.get(c).map(String::as_str).unwrap_or(""));
        }
        cols.push(Arc::new(b.finish()));
    }
    if schema.regression {
        let mut b = Float32Builder::with_capacity(n);
        rows.iter().for_each(|r| b.append_option(r.label));
        cols.push(Arc::new(b.finish()));
    } else {
        let mut b = Int64Builder::with_capacity(n);
        rows.iter()
            .for_each(|r| b.append_option(r.label.map(|l| l as i64)));
        cols.push(Arc::new(b.finish()));
    }
    let mut idx = Int32Builder::with_capacity(n);
    let mut method = StringBuilder::new();
    let mut copy = Int32Builder::with_capacity(n);
    let mut partner = Int32Builder::with_capacity(n);
    let mut lambda = Float32Builder::with_capacity(n);
    let mut eps = Float32Builder::with_capacity(n);
    let mut ids = ListBuilder::new(Int32Builder::new());
    let mut types = ListBuilder::new(Int8Builder::new());
    let mut changed = Int32Builder::with_capacity(n);
    let mut logits = FixedSizeListBuilder::new(Float32Builder::new(), schema.num_labels as i32);
    let mut pids = ListBuilder::new(Int32Builder::new());
    let mut ptypes = ListBuilder::new(Int8Builder::new());
    let mut pert = ListBuilder::new(Int8Builder::new());
    let int32 = |v: i64| {
        i32::try_from(v)
            .with_context(|| format!("source idx {v} does not fit the int32 `idx` column"))
    };
    for r in rows {
        idx.append_value(int32(r.idx)?);
        method.append_value(r.method);
        copy.append_value(r.copy as i32);
        partner.append_option(r.partner_idx.map(int32).transpose()?);
        lambda.append_option(r.lambda);
        eps.append_option(r.epsilon);
        ids.append_value(r.input_ids.iter().map(|&x| Some(x as i32)));
        types.append_value(r.token_type_ids.iter().map(|&x| Some(x as i8)));
        changed.append_option(r.changed_tokens.map(|c| c as i32));
        anyhow::ensure!(
            r.teacher_logits.len() == schema.num_labels,
            "row has {} logits, schema expects {}",
            r.teacher_logits.len(),
            schema.num_labels
        );
        logits.values().append_slice(&r.teacher_logits);
        logits.append(true);
        pids.append_option(
            r.partner_input_ids
                .as_ref()
                .map(|v| v.iter().map(|&x| Some(x as i32)).collect::<Vec<_>>()),
        );
        ptypes.append_option(
            r.partner_token_type_ids
                .as_ref()
                .map(|v| v.iter().map(|&x| Some(x as i8)).collect::<Vec<_>>()),
        );
        pert.append_option(
            r.perturbation
                .as_ref()
                .map(|v| v.iter().map(|&x| Some(x)).collect::<Vec<_>>()),
        );
    }
    cols.push(Arc::new(idx.finish()));
    cols.push(Arc::new(method.finish()));
    cols.push(Arc::new(copy.finish()));
    cols.push(Arc::new(partner.finish()));
    cols.push(Arc::new(lambda.finish()));
    cols.push(Arc::new(eps.finish()));
    cols.push(Arc::new(ids.finish()));
    cols.push(Arc::new(types.finish()));
    cols.push(Arc::new(changed.finish()));
    cols.push(Arc::new(logits.finish()));
    cols.push(Arc::new(pids.finish()));
    cols.push(Arc::new(ptypes.finish()));
    cols.push(Arc::new(pert.finish()));
    // The builders produce nullable child fields named "item", as the schema declares.
    Ok(RecordBatch::try_new(schema.schema.clone(), cols)?)
}
