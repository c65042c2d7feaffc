//! Reads shards back into [`Row`]s, streaming record batches, checking the schema.

use crate::schema::{Row, ShardSchema, METHODS};
use crate::storage::Location;
use anyhow::{bail, ensure, Context, Result};
use arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use arrow::datatypes::{Float32Type, Int32Type, Int64Type, Int8Type};
use bytes::Bytes;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use parquet::file::reader::ChunkReader;
use std::fs::File;

/// Streams the rows of one shard file.
pub struct ShardReader {
    reader: ParquetRecordBatchReader,
    path: String,
    /// Rows returned so far (the file row number of the next one).
    rows_read: usize,
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
            rows_read: 0,
        })
    }

    /// Next batch of rows, or `None` at the end. A malformed row is an error naming the
    /// file and the row's number in it.
    pub fn next_rows(&mut self, schema: &ShardSchema) -> Result<Option<Vec<Row>>> {
        match self.reader.next() {
            None => Ok(None),
            Some(b) => {
                let b = b.with_context(|| format!("{}: corrupt shard data", self.path))?;
                let rows = rows_from_batch(&b, schema, self.rows_read)
                    .with_context(|| self.path.clone())?;
                self.rows_read += rows.len();
                Ok(Some(rows))
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

fn list_f32(a: &dyn Array, i: usize) -> Option<Vec<f32>> {
    let l = a.as_list::<i32>();
    (!l.is_null(i)).then(|| l.value(i).as_primitive::<Float32Type>().values().to_vec())
}

fn opt_f32(a: &dyn Array, i: usize) -> Option<f32> {
    (!a.is_null(i)).then(|| a.as_primitive::<Float32Type>().value(i))
}

fn opt_i32(a: &dyn Array, i: usize) -> Option<i32> {
    (!a.is_null(i)).then(|| a.as_primitive::<Int32Type>().value(i))
}

/// Converts a record batch of the shard schema back to rows; `first_row` is the file row
/// number of its first row (for error messages).
pub fn rows_from_batch(
    b: &RecordBatch,
    schema: &ShardSchema,
    first_row: usize,
) -> Result<Vec<Row>> {
    let cols = Columns::of(b, schema)?;
    (0..b.num_rows())
        .map(|i| {
            let n = first_row + i;
            let row = cols.row(i).with_context(|| format!("row {n}"))?;
            check_row(&row, schema).with_context(|| format!("row {n}"))?;
            Ok(row)
        })
        .collect()
}

/// The columns of one record batch, by role (their types were checked when the file was
/// opened).
struct Columns {
    regression: bool,
    texts: Vec<ArrayRef>,
    label: ArrayRef,
    idx: ArrayRef,
    method: ArrayRef,
    copy: ArrayRef,
    partner: ArrayRef,
    lambda: ArrayRef,
    epsilon: ArrayRef,
    ids: ArrayRef,
    types: ArrayRef,
    changed: ArrayRef,
    logits: ArrayRef,
    partner_ids: ArrayRef,
    partner_types: ArrayRef,
    perturbation: ArrayRef,
    lambdas: ArrayRef,
}

impl Columns {
    fn of(b: &RecordBatch, schema: &ShardSchema) -> Result<Self> {
        let col = |n: &str| {
            b.column_by_name(n)
                .cloned()
                .ok_or_else(|| anyhow::anyhow!("missing column `{n}`"))
        };
        Ok(Self {
            regression: schema.regression,
            texts: schema
                .text_columns
                .iter()
                .map(|c| col(c))
                .collect::<Result<_>>()?,
            label: col("label")?,
            idx: col("idx")?,
            method: col("method")?,
            copy: col("copy")?,
            partner: col("partner_idx")?,
            lambda: col("lambda")?,
            epsilon: col("epsilon")?,
            ids: col("input_ids")?,
            types: col("token_type_ids")?,
            changed: col("changed_tokens")?,
            logits: col("teacher_logits")?,
            partner_ids: col("partner_input_ids")?,
            partner_types: col("partner_token_type_ids")?,
            perturbation: col("perturbation")?,
            lambdas: col("lambdas")?,
        })
    }

    /// The gold label of row `i` (float for regression, else the class as a float).
    fn label(&self, i: usize) -> Option<f32> {
        let l = &self.label;
        match () {
            _ if l.is_null(i) => None,
            _ if self.regression => Some(l.as_primitive::<Float32Type>().value(i)),
            _ => Some(l.as_primitive::<Int64Type>().value(i) as f32),
        }
    }

    /// Row `i`; an unknown method is an error.
    fn row(&self, i: usize) -> Result<Row> {
        let m = self.method.as_string::<i32>().value(i);
        let Some(&method) = METHODS.iter().find(|&&k| k == m) else {
            bail!("unknown method `{m}`")
        };
        let to_u8 = |v: Vec<i8>| v.into_iter().map(|x| x as u8).collect::<Vec<u8>>();
        Ok(Row {
            texts: self
                .texts
                .iter()
                .map(|t| t.as_string::<i32>().value(i).to_string())
                .collect(),
            label: self.label(i),
            idx: self.idx.as_primitive::<Int32Type>().value(i) as i64,
            method,
            copy: self.copy.as_primitive::<Int32Type>().value(i) as u32,
            partner_idx: opt_i32(self.partner.as_ref(), i).map(|x| x as i64),
            lambda: opt_f32(self.lambda.as_ref(), i),
            epsilon: opt_f32(self.epsilon.as_ref(), i),
            input_ids: list_u32(self.ids.as_ref(), i).unwrap_or_default(),
            token_type_ids: to_u8(list_i8(self.types.as_ref(), i).unwrap_or_default()),
            changed_tokens: opt_i32(self.changed.as_ref(), i).map(|x| x as u32),
            teacher_logits: self
                .logits
                .as_fixed_size_list()
                .value(i)
                .as_primitive::<Float32Type>()
                .values()
                .to_vec(),
            partner_input_ids: list_u32(self.partner_ids.as_ref(), i),
            partner_token_type_ids: list_i8(self.partner_types.as_ref(), i).map(to_u8),
            perturbation: list_i8(self.perturbation.as_ref(), i),
            lambdas: list_f32(self.lambdas.as_ref(), i),
        })
    }
}

/// Checks what readers of a row rely on: values in range (token ids that were not negative,
/// a label that is one of the task's classes or a finite score, finite teacher logits,
/// perturbation signs), consistent lengths; MixUp rows carry their partner and λ, FGSM
/// rows their perturbation and ε, and no other row carries either.
fn check_row(r: &Row, schema: &ShardSchema) -> Result<()> {
    check_values(r, schema)?;
    ensure!(
        !r.input_ids.is_empty() && r.token_type_ids.len() == r.input_ids.len(),
        "`token_type_ids` has {} values for {} `input_ids`",
        r.token_type_ids.len(),
        r.input_ids.len()
    );
    ensure!(
        r.partner_input_ids.as_ref().map(|v| v.len())
            == r.partner_token_type_ids.as_ref().map(|v| v.len()),
        "`partner_input_ids` and `partner_token_type_ids` differ in length"
    );
    ensure!(
        r.perturbation
            .as_ref()
            .is_none_or(|p| p.len() % r.input_ids.len() == 0),
        "`perturbation` length is not a multiple of the row length"
    );
    let m = r.method;
    match m {
        "mixup" => {
            ensure!(
                r.partner_input_ids.is_some(),
                "mixup row without `partner_input_ids`"
            );
            match (r.lambda, &r.lambdas) {
                (Some(l), None) if (0.0..=1.0).contains(&l) => {}
                (Some(l), None) => bail!("mixup row with `lambda` = {l}, outside [0, 1]"),
                (None, Some(ls)) => {
                    ensure!(
                        ls.len() == r.input_ids.len(),
                        "mixup row with {} `lambdas` for {} `input_ids`",
                        ls.len(),
                        r.input_ids.len()
                    );
                    if let Some(l) = ls.iter().find(|l| !(0.0..=1.0).contains(*l)) {
                        bail!("mixup row with a `lambdas` value {l}, outside [0, 1]");
                    }
                }
                (Some(_), Some(_)) => bail!("mixup row with both `lambda` and `lambdas`"),
                (None, None) => bail!("mixup row without `lambda`"),
            }
        }
        "fgsm" => {
            ensure!(r.perturbation.is_some(), "fgsm row without `perturbation`");
            match r.epsilon {
                Some(e) if e.is_finite() && e >= 0.0 => {}
                Some(e) => bail!("fgsm row with `epsilon` = {e}, expected a finite value >= 0"),
                None => bail!("fgsm row without `epsilon`"),
            }
        }
        _ => ensure!(
            r.partner_input_ids.is_none() && r.perturbation.is_none() && r.lambdas.is_none(),
            "{m} row with `partner_input_ids` or `perturbation` (only mixup and fgsm rows have them)"
        ),
    }
    Ok(())
}

/// The range checks of [`check_row`].
fn check_values(r: &Row, schema: &ShardSchema) -> Result<()> {
    // Ids are stored as int32: a negative one reads back at or above 2^31.
    let negative = |ids: &[u32]| ids.iter().any(|&t| t > i32::MAX as u32);
    ensure!(
        !negative(&r.input_ids) && !r.partner_input_ids.as_deref().is_some_and(negative),
        "a negative token id in `input_ids` or `partner_input_ids`"
    );
    match r.label {
        Some(l) if schema.regression => {
            ensure!(l.is_finite(), "`label` = {l}, expected a finite score")
        }
        Some(l) => ensure!(
            l >= 0.0 && l < schema.num_labels as f32,
            "`label` = {l}, expected a class in 0..{}",
            schema.num_labels
        ),
        None => {}
    }
    if let Some(x) = r.teacher_logits.iter().find(|x| !x.is_finite()) {
        bail!("`teacher_logits` holds {x}, expected finite values");
    }
    if let Some(v) = r
        .perturbation
        .iter()
        .flatten()
        .find(|v| !(-1..=1).contains(*v))
    {
        bail!("`perturbation` holds {v}, expected signs -1, 0 or 1");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::ShardReader;
    use crate::writer::ShardWriter;
    use crate::{Row, ShardSchema};

    fn row(method: &'static str) -> Row {
        Row {
            texts: vec!["a film".into()],
            label: None,
            idx: 7,
            method,
            copy: 0,
            partner_idx: None,
            lambda: None,
            epsilon: None,
            input_ids: vec![101, 1037, 2143, 102],
            token_type_ids: vec![0; 4],
            changed_tokens: None,
            teacher_logits: vec![0.5, -0.5],
            partner_input_ids: None,
            partner_token_type_ids: None,
            perturbation: None,
            lambdas: None,
        }
    }

    /// Writes `rows` (all real or all virtual) to a shard and reads back their file.
    fn read_back(rows: &[Row]) -> (String, anyhow::Result<Vec<Row>>) {
        let schema = ShardSchema::new(crate::task::glue("sst2").unwrap());
        let dir = tempfile::tempdir().unwrap();
        let out = crate::storage::Location::from_arg(dir.path()).unwrap();
        let mut w = ShardWriter::create(&out, 0, 1, &schema).unwrap();
        w.write(rows).unwrap();
        w.finish().unwrap();
        let virt = rows.iter().any(|r| crate::schema::is_virtual(r.method));
        let path = out.join(&match virt {
            true => crate::manifest::virtual_shard_name(0, 1),
            false => crate::manifest::shard_name(0, 1),
        });
        let mut r = ShardReader::open(&path, &schema).unwrap();
        let mut out = Vec::new();
        let res = loop {
            match r.next_rows(&schema) {
                Ok(Some(b)) => out.extend(b),
                Ok(None) => break Ok(out),
                Err(e) => break Err(e),
            }
        };
        (path.to_string(), res)
    }

    fn mixup() -> Row {
        let mut r = row("mixup");
        r.partner_idx = Some(3);
        r.lambda = Some(0.7);
        r.partner_input_ids = Some(vec![101, 2204, 102]);
        r.partner_token_type_ids = Some(vec![0; 3]);
        r
    }

    fn fgsm() -> Row {
        let mut r = row("fgsm");
        r.epsilon = Some(0.2);
        r.perturbation = Some(vec![1, -1, 0, 1]);
        r
    }

    #[test]
    fn well_formed_virtual_rows_read_back() {
        let real = vec![row("original"), row("augpro_mix")];
        assert_eq!(read_back(&real).1.unwrap(), real);
        let virt = vec![mixup(), fgsm()];
        assert_eq!(read_back(&virt).1.unwrap(), virt);
    }

    #[test]
    fn malformed_virtual_rows_name_the_shard_and_row() {
        let mut no_lambda = mixup();
        no_lambda.lambda = None;
        let mut no_partner = mixup();
        no_partner.partner_input_ids = None;
        no_partner.partner_token_type_ids = None;
        let mut no_eps = fgsm();
        no_eps.epsilon = None;
        let mut no_signs = fgsm();
        no_signs.perturbation = None;
        let mut stray = row("augpro_mix");
        stray.perturbation = Some(vec![1; 4]);
        let mut class_5 = row("original");
        class_5.label = Some(5.0);
        let mut class_minus_1 = row("original");
        class_minus_1.label = Some(-1.0);
        let mut nan_logit = row("original");
        nan_logit.teacher_logits[1] = f32::NAN;
        let mut sign_2 = fgsm();
        sign_2.perturbation = Some(vec![1, 2, 0, 1]);
        let mut negative_id = row("original");
        negative_id.input_ids[1] = u32::MAX;
        let mut negative_partner = mixup();
        negative_partner.partner_input_ids = Some(vec![101, u32::MAX, 102]);
        for (good, bad, what) in [
            (
                row("original"),
                class_5,
                "`label` = 5, expected a class in 0..2",
            ),
            (row("original"), class_minus_1, "`label` = -1"),
            (row("original"), nan_logit, "`teacher_logits` holds NaN"),
            (fgsm(), sign_2, "`perturbation` holds 2"),
            (row("original"), negative_id, "a negative token id"),
            (mixup(), negative_partner, "a negative token id"),
            (mixup(), no_lambda, "without `lambda`"),
            (mixup(), no_partner, "without `partner_input_ids`"),
            (fgsm(), no_eps, "without `epsilon`"),
            (fgsm(), no_signs, "without `perturbation`"),
            (row("original"), stray, "only mixup and fgsm rows"),
        ] {
            let (path, res) = read_back(&[good, bad]);
            let err = format!("{:#}", res.unwrap_err());
            assert!(
                err.starts_with(&format!("{path}: row 1: ")) && err.contains(what),
                "{err}"
            );
        }
    }
}
