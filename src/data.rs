//! Streaming reader for GLUE splits in the Hugging Face `nyu-mll/glue` Parquet layout.
//!
//! Files live at `<glue_dir>/<config>/<split>-NNNNN-of-NNNNN.parquet`. Every batch is
//! validated: columns present and typed as the task expects, no null or empty text,
//! labels inside the task's range. Errors name the file, the column and the row.

use crate::config::DevConfig;
use crate::glue::TaskSpec;
use crate::util::sha256_file;
use anyhow::{bail, Context, Result};
use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{DataType, Float32Type, Float64Type, Int32Type, Int64Type};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

/// One GLUE example.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// The `idx` column.
    pub idx: i64,
    /// First (or only) text.
    pub text_a: String,
    /// Second text for sentence-pair tasks.
    pub text_b: Option<String>,
    /// Gold label: class index for classification, score for regression; `None` when
    /// the split is unlabelled (`-1` on the hub's test splits).
    pub label: Option<f32>,
}

/// Resolves the GLUE directory: the flag, else `AUGPRO_GLUE_DIR`, else `data/glue`.
pub fn resolve_glue_dir(flag: Option<&Path>) -> PathBuf {
    if let Some(p) = flag {
        return p.to_path_buf();
    }
    match std::env::var_os("AUGPRO_GLUE_DIR") {
        Some(v) if !v.is_empty() => PathBuf::from(v),
        _ => PathBuf::from("data/glue"),
    }
}

/// Lists the Parquet files of one split, in shard order.
pub fn split_files(glue_dir: &Path, task: &TaskSpec, split: &str) -> Result<Vec<PathBuf>> {
    let dir = glue_dir.join(task.name);
    let rd = std::fs::read_dir(&dir).with_context(|| {
        format!(
            "{}: GLUE config directory not found (expected <glue_dir>/{}/{split}-00000-of-00001.parquet; fetch it with `augpro data fetch --config {}` or set --glue-dir / AUGPRO_GLUE_DIR)",
            dir.display(),
            task.name,
            task.name
        )
    })?;
    let prefix = format!("{split}-");
    let mut files: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let n = p
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default();
            n.starts_with(&prefix) && n.ends_with(".parquet") && n[prefix.len()..].contains("-of-")
        })
        .collect();
    files.sort();
    if files.is_empty() {
        bail!(
            "{}: no file `{split}-NNNNN-of-NNNNN.parquet` for split `{split}` of `{}`",
            dir.display(),
            task.name
        );
    }
    Ok(files)
}

/// The source split's files (names within the task folder) and their sha256s.
pub fn source_files(
    glue_dir: &Path,
    task: &TaskSpec,
    split: &str,
) -> Result<BTreeMap<String, String>> {
    split_files(glue_dir, task, split)?
        .iter()
        .map(|f| {
            let name = f
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .to_string();
            Ok((name, sha256_file(f)?))
        })
        .collect()
}

/// Class names from the file's `huggingface` schema metadata, if it carries a ClassLabel.
pub fn label_names_from_metadata(path: &Path) -> Result<Option<Vec<String>>> {
    let file = File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)
        .with_context(|| format!("{}: not a readable Parquet file", path.display()))?;
    let Some(meta) = builder.schema().metadata().get("huggingface") else {
        return Ok(None);
    };
    let v: serde_json::Value = match serde_json::from_str(meta) {
        Ok(v) => v,
        Err(_) => return Ok(None),
    };
    let names = v
        .pointer("/info/features/label/names")
        .and_then(|n| n.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect::<Vec<_>>()
        });
    Ok(names)
}

/// A streaming reader over one split: yields validated batches of examples.
pub struct SplitReader {
    task: &'static TaskSpec,
    files: Vec<PathBuf>,
    next_file: usize,
    current: Option<(
        PathBuf,
        parquet::arrow::arrow_reader::ParquetRecordBatchReader,
    )>,
    row_in_file: usize,
    yielded: usize,
    keep: Option<(DevConfig, usize, Part)>,
}

/// Which examples of a train split a reader yields, relative to the dev split
/// ([`DevConfig`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// Every example.
    All,
    /// The examples outside the dev split (what is trained on and augmented).
    Train,
    /// The dev split only.
    Dev,
}

/// Number of rows in a split, from Parquet metadata (no data read).
pub fn split_rows(glue_dir: &Path, task: &TaskSpec, split: &str) -> Result<usize> {
    let mut n = 0;
    for f in split_files(glue_dir, task, split)? {
        let file = File::open(&f).with_context(|| format!("{}: cannot open", f.display()))?;
        let r = parquet::file::reader::SerializedFileReader::new(file)
            .with_context(|| format!("{}: not a readable Parquet file", f.display()))?;
        use parquet::file::reader::FileReader;
        n += r.metadata().file_metadata().num_rows() as usize;
    }
    Ok(n)
}

/// Number of examples in one part of a split ([`SplitReader::open_part`]): from Parquet
/// metadata when nothing is held out, else by reading the split through.
pub fn part_rows(
    glue_dir: &Path,
    task: &'static TaskSpec,
    split: &str,
    dev: &DevConfig,
    part: Part,
) -> Result<usize> {
    let mut r = SplitReader::open_part(glue_dir, task, split, dev, part)?;
    if r.keep.is_none() {
        return split_rows(glue_dir, task, split);
    }
    let mut n = 0;
    while let Some(b) = r.next_batch()? {
        n += b.len();
    }
    Ok(n)
}

impl SplitReader {
    /// Opens a split for streaming; fails early when no file exists.
    pub fn open(glue_dir: &Path, task: &'static TaskSpec, split: &str) -> Result<Self> {
        let files = split_files(glue_dir, task, split)?;
        Ok(Self {
            task,
            files,
            next_file: 0,
            current: None,
            row_in_file: 0,
            yielded: 0,
            keep: None,
        })
    }

    /// Opens one part of a split: on the task's train split, the examples outside the dev
    /// split or inside it; other splits are read whole.
    pub fn open_part(
        glue_dir: &Path,
        task: &'static TaskSpec,
        split: &str,
        dev: &DevConfig,
        part: Part,
    ) -> Result<Self> {
        let mut r = Self::open(glue_dir, task, split)?;
        if split == task.train_split && part != Part::All && dev.fraction > 0.0 {
            r.keep = Some((*dev, split_rows(glue_dir, task, split)?, part));
        }
        Ok(r)
    }

    /// Opens explicit files (used by tests and by callers that already resolved paths).
    pub fn from_files(task: &'static TaskSpec, files: Vec<PathBuf>) -> Self {
        Self {
            task,
            files,
            next_file: 0,
            current: None,
            row_in_file: 0,
            yielded: 0,
            keep: None,
        }
    }

    fn open_next(&mut self) -> Result<bool> {
        if self.next_file >= self.files.len() {
            return Ok(false);
        }
        let path = self.files[self.next_file].clone();
        self.next_file += 1;
        let file = File::open(&path).with_context(|| format!("{}: cannot open", path.display()))?;
        let builder = ParquetRecordBatchReaderBuilder::try_new(file)
            .with_context(|| format!("{}: not a readable Parquet file", path.display()))?;
        check_schema(&path, self.task, builder.schema())?;
        let reader = builder
            .with_batch_size(1024)
            .build()
            .with_context(|| format!("{}: cannot read", path.display()))?;
        self.current = Some((path, reader));
        self.row_in_file = 0;
        Ok(true)
    }

    /// Reads every remaining example (up to `limit`), failing on an empty split.
    pub fn read_all(mut self, limit: Option<usize>) -> Result<Vec<Example>> {
        let mut out = Vec::new();
        while let Some(batch) = self.next_batch()? {
            out.extend(batch);
            if let Some(l) = limit {
                if out.len() >= l {
                    out.truncate(l);
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Returns the next validated batch, or `None` at the end of the split.
    pub fn next_batch(&mut self) -> Result<Option<Vec<Example>>> {
        loop {
            if self.current.is_none() && !self.open_next()? {
                if self.yielded == 0 {
                    bail!(
                        "{}: split is empty (no rows)",
                        self.files
                            .first()
                            .map(|p| p.display().to_string())
                            .unwrap_or_default()
                    );
                }
                return Ok(None);
            }
            let (path, reader) = self.current.as_mut().expect("opened");
            match reader.next() {
                Some(batch) => {
                    let path = path.clone();
                    let batch = batch
                        .with_context(|| format!("{}: corrupt Parquet data", path.display()))?;
                    let mut rows = convert_batch(&path, self.task, &batch, self.row_in_file)?;
                    self.row_in_file += batch.num_rows();
                    self.yielded += rows.len();
                    if let Some((dev, n, part)) = &self.keep {
                        rows.retain(|e| dev.contains(e.idx, *n) == (*part == Part::Dev));
                    }
                    if rows.is_empty() {
                        continue;
                    }
                    return Ok(Some(rows));
                }
                None => self.current = None,
            }
        }
    }
}

fn is_text(dt: &DataType) -> bool {
    matches!(
        dt,
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
    )
}

fn check_schema(path: &Path, task: &TaskSpec, schema: &arrow::datatypes::Schema) -> Result<()> {
    for col in task.text_columns {
        match schema.field_with_name(col) {
            Ok(f) if is_text(f.data_type()) => {}
            Ok(f) => bail!("{}: column `{col}` has type {}, expected string (is this the `{}` config?)", path.display(), f.data_type(), task.name),
            Err(_) => bail!(
                "{}: missing column `{col}` (the `{}` config has columns {} , label, idx; found {})",
                path.display(),
                task.name,
                task.text_columns.join(", "),
                schema.fields().iter().map(|f| f.name().as_str()).collect::<Vec<_>>().join(", ")
            ),
        }
    }
    let label = schema
        .field_with_name("label")
        .map_err(|_| anyhow::anyhow!("{}: missing column `label`", path.display()))?;
    let ok = if task.is_regression() {
        matches!(label.data_type(), DataType::Float32 | DataType::Float64)
    } else {
        matches!(label.data_type(), DataType::Int64 | DataType::Int32)
    };
    if !ok {
        bail!(
            "{}: column `label` has type {}, expected {}",
            path.display(),
            label.data_type(),
            if task.is_regression() {
                "float32 score"
            } else {
                "int64 ClassLabel"
            }
        );
    }
    let idx = schema
        .field_with_name("idx")
        .map_err(|_| anyhow::anyhow!("{}: missing column `idx`", path.display()))?;
    if !matches!(idx.data_type(), DataType::Int32 | DataType::Int64) {
        bail!(
            "{}: column `idx` has type {}, expected int32",
            path.display(),
            idx.data_type()
        );
    }
    Ok(())
}

fn text_at(col: &dyn Array, i: usize) -> Option<String> {
    if col.is_null(i) {
        return None;
    }
    Some(match col.data_type() {
        DataType::Utf8 => col.as_string::<i32>().value(i).to_string(),
        DataType::LargeUtf8 => col.as_string::<i64>().value(i).to_string(),
        DataType::Utf8View => col.as_string_view().value(i).to_string(),
        _ => return None,
    })
}

fn convert_batch(
    path: &Path,
    task: &TaskSpec,
    batch: &RecordBatch,
    row0: usize,
) -> Result<Vec<Example>> {
    let col = |name: &str| batch.column_by_name(name).expect("schema checked").clone();
    let texts: Vec<_> = task.text_columns.iter().map(|c| col(c)).collect();
    let label = col("label");
    let idx = col("idx");
    let mut out = Vec::with_capacity(batch.num_rows());
    for i in 0..batch.num_rows() {
        let row = row0 + i;
        let mut t = Vec::with_capacity(2);
        for (c, name) in texts.iter().zip(task.text_columns) {
            match text_at(c.as_ref(), i) {
                Some(s) if !s.trim().is_empty() => t.push(s),
                Some(_) => bail!(
                    "{}: row {row}: column `{name}` is empty, expected text",
                    path.display()
                ),
                None => bail!(
                    "{}: row {row}: column `{name}` is null, expected text",
                    path.display()
                ),
            }
        }
        let lab = if label.is_null(i) {
            None
        } else {
            let v = match label.data_type() {
                DataType::Int64 => label.as_primitive::<Int64Type>().value(i) as f64,
                DataType::Int32 => label.as_primitive::<Int32Type>().value(i) as f64,
                DataType::Float32 => label.as_primitive::<Float32Type>().value(i) as f64,
                DataType::Float64 => label.as_primitive::<Float64Type>().value(i),
                _ => unreachable!("schema checked"),
            };
            if task.is_regression() {
                if !v.is_finite() {
                    bail!(
                        "{}: row {row}: column `label` is {v}, expected a finite score",
                        path.display()
                    );
                }
                Some(v as f32)
            } else if v == -1.0 {
                None
            } else if v < 0.0 || v >= task.num_labels as f64 {
                bail!(
                    "{}: row {row}: column `label` is {v}, expected a class in 0..{} for `{}`",
                    path.display(),
                    task.num_labels,
                    task.name
                );
            } else {
                Some(v as f32)
            }
        };
        let id = if idx.is_null(i) {
            row as i64
        } else {
            match idx.data_type() {
                DataType::Int32 => idx.as_primitive::<Int32Type>().value(i) as i64,
                _ => idx.as_primitive::<Int64Type>().value(i),
            }
        };
        let mut it = t.into_iter();
        out.push(Example {
            idx: id,
            text_a: it.next().expect("one text"),
            text_b: it.next(),
            label: lab,
        });
    }
    Ok(out)
}
