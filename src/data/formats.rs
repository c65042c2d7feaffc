//! Record batches from one file of a split, whatever its format (Parquet, CSV with a
//! header row, JSON lines), read in batches so memory stays flat in the number of rows;
//! the columns a task reads are checked before any row is.

use crate::task::{Format, Source, TaskSpec};
use anyhow::{bail, Context, Result};
use arrow::array::RecordBatch;
use arrow::datatypes::{DataType, Field, Schema};
use arrow::error::ArrowError;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use std::fs::File;
use std::io::BufReader;
use std::path::Path;
use std::sync::Arc;

/// A file's record batches.
pub type Batches = Box<dyn Iterator<Item = Result<RecordBatch, ArrowError>> + Send>;

/// Rows per record batch.
const BATCH_ROWS: usize = 1024;

/// Rows of a CSV or JSON-lines file read to infer its column types.
const INFER_ROWS: usize = 10_000;

fn open(path: &Path) -> Result<File> {
    File::open(path).with_context(|| format!("{}: cannot open", path.display()))
}

/// Opens `path` as `format` and checks the columns `task` reads.
pub fn open_batches(path: &Path, format: Format, task: &TaskSpec) -> Result<Batches> {
    let (schema, batches) = match format {
        Format::Parquet => parquet_batches(path)?,
        Format::Csv => csv_batches(path, &task.label_column)?,
        Format::Jsonl => json_batches(path)?,
    };
    check_schema(path, task, &schema)?;
    Ok(batches)
}

/// Rows in a file: from Parquet metadata, else by reading its batches through.
pub fn count_rows(path: &Path, format: Format) -> Result<usize> {
    if format == Format::Parquet {
        use parquet::file::reader::FileReader;
        let r = parquet::file::reader::SerializedFileReader::new(open(path)?)
            .with_context(|| format!("{}: not a readable Parquet file", path.display()))?;
        return Ok(r.metadata().file_metadata().num_rows() as usize);
    }
    let (_, batches) = match format {
        Format::Csv => csv_batches(path, "")?,
        _ => json_batches(path)?,
    };
    let mut n = 0;
    for b in batches {
        n += b
            .with_context(|| format!("{}: unreadable data", path.display()))?
            .num_rows();
    }
    Ok(n)
}

fn parquet_batches(path: &Path) -> Result<(Arc<Schema>, Batches)> {
    let builder = ParquetRecordBatchReaderBuilder::try_new(open(path)?)
        .with_context(|| format!("{}: not a readable Parquet file", path.display()))?;
    let schema = builder.schema().clone();
    let reader = builder
        .with_batch_size(BATCH_ROWS)
        .build()
        .with_context(|| format!("{}: cannot read", path.display()))?;
    Ok((schema, Box::new(reader)))
}

/// A CSV file with a header row: every column is text but `label_column`, whose type
/// (integer, float or text) is inferred from the first rows.
fn csv_batches(path: &Path, label_column: &str) -> Result<(Arc<Schema>, Batches)> {
    let format = arrow::csv::reader::Format::default().with_header(true);
    let (inferred, _) = format
        .infer_schema(open(path)?, Some(INFER_ROWS))
        .with_context(|| {
            format!(
                "{}: not a readable CSV file with a header row",
                path.display()
            )
        })?;
    let fields: Vec<Field> = inferred
        .fields()
        .iter()
        .map(|f| {
            let keep = f.name() == label_column
                && matches!(f.data_type(), DataType::Int64 | DataType::Float64);
            let t = if keep {
                f.data_type().clone()
            } else {
                DataType::Utf8
            };
            Field::new(f.name(), t, true)
        })
        .collect();
    let schema = Arc::new(Schema::new(fields));
    let reader = arrow::csv::ReaderBuilder::new(schema.clone())
        .with_header(true)
        .with_batch_size(BATCH_ROWS)
        .build(open(path)?)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    Ok((schema, Box::new(reader)))
}

/// A file of one JSON object per line, its column types inferred from the first rows.
fn json_batches(path: &Path) -> Result<(Arc<Schema>, Batches)> {
    let (schema, _) = arrow::json::reader::infer_json_schema_from_seekable(
        BufReader::new(open(path)?),
        Some(INFER_ROWS),
    )
    .with_context(|| format!("{}: not a readable JSON-lines file", path.display()))?;
    let schema = Arc::new(schema);
    let reader = arrow::json::ReaderBuilder::new(schema.clone())
        .with_batch_size(BATCH_ROWS)
        .build(BufReader::new(open(path)?))
        .with_context(|| format!("{}: cannot read", path.display()))?;
    // arrow's decoding errors name no line: find it (the file is read again only then).
    let (file, types) = (path.to_path_buf(), schema.clone());
    let batches = reader.map(move |b| {
        b.map_err(|e| match first_bad_line(&file, &types) {
            Some(n) => ArrowError::JsonError(format!("line {n}: {e}")),
            None => e,
        })
    });
    Ok((schema, Box::new(batches)))
}

/// The first line (counted from 1) of a JSON-lines file that does not decode as `schema`.
fn first_bad_line(path: &Path, schema: &Arc<Schema>) -> Option<usize> {
    use std::io::BufRead;
    for (i, line) in BufReader::new(File::open(path).ok()?).lines().enumerate() {
        let line = line.ok()?;
        let mut d = arrow::json::ReaderBuilder::new(schema.clone())
            .build_decoder()
            .ok()?;
        if d.decode(line.as_bytes()).is_err() || d.flush().is_err() {
            return Some(i + 1);
        }
    }
    None
}

fn is_text(dt: &DataType) -> bool {
    matches!(
        dt,
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
    )
}

/// What a task's columns are called in its configuration (for errors).
fn described_by(task: &TaskSpec, what: &str) -> String {
    match &task.source {
        Source::Glue(config) => format!("is this the `{config}` config?"),
        Source::Files { .. } => format!("`data.{what}` names it"),
    }
}

/// Checks that the text columns are strings and the label column is typed for the task.
fn check_schema(path: &Path, task: &TaskSpec, schema: &Schema) -> Result<()> {
    let found = || {
        let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        names.join(", ")
    };
    let field = |col: &str, what: &str| {
        schema.field_with_name(col).map_err(|_| {
            anyhow::anyhow!(
                "{}: missing column `{col}` ({}; found {})",
                path.display(),
                described_by(task, what),
                found()
            )
        })
    };
    for col in &task.text_columns {
        let f = field(col, "text")?;
        if !is_text(f.data_type()) {
            bail!(
                "{}: column `{col}` has type {}, expected string ({})",
                path.display(),
                f.data_type(),
                described_by(task, "text")
            );
        }
    }
    check_label(path, task, field(&task.label_column, "label")?.data_type())?;
    if let Some(col) = &task.idx_column {
        let t = field(col, "idx")?.data_type();
        if !matches!(t, DataType::Int32 | DataType::Int64) {
            bail!(
                "{}: column `{col}` has type {t}, expected int32",
                path.display()
            );
        }
    }
    Ok(())
}

/// Checks the label column's type: a float or integer score for regression; a class id,
/// or (for a described dataset) a class name, for classification.
fn check_label(path: &Path, task: &TaskSpec, t: &DataType) -> Result<()> {
    let ints = matches!(t, DataType::Int64 | DataType::Int32);
    let ok = if task.is_regression() {
        ints || matches!(t, DataType::Float32 | DataType::Float64)
    } else {
        ints || (!task.is_glue() && is_text(t))
    };
    if ok {
        return Ok(());
    }
    let want = match (task.is_regression(), task.is_glue()) {
        (true, _) => "float32 score",
        (false, true) => "int64 ClassLabel",
        (false, false) => "int64 class id or string class name",
    };
    bail!(
        "{}: column `{}` has type {t}, expected {want}",
        path.display(),
        task.label_column
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A value of another type after the rows the types are inferred from: the error names
    /// its line.
    #[test]
    fn a_json_lines_type_error_names_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("train.jsonl");
        let mut text = String::new();
        for i in 0..INFER_ROWS + 5 {
            text.push_str(&format!(
                "{{\"text\": \"row {i}\", \"label\": {}}}\n",
                i % 2
            ));
        }
        text.push_str("{\"text\": \"bad\", \"label\": \"two\"}\n");
        std::fs::write(&path, text).unwrap();
        let (_, batches) = json_batches(&path).unwrap();
        let err = batches
            .filter_map(|b| b.err())
            .next()
            .expect("the last row does not decode");
        let want = format!("line {}:", INFER_ROWS + 6);
        assert!(err.to_string().contains(&want), "{err}");
    }
}
