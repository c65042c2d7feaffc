//! Streaming reader for a task's splits: GLUE in the Hugging Face `nyu-mll/glue` Parquet
//! layout (`<glue_dir>/<config>/<split>-NNNNN-of-NNNNN.parquet`), or a described dataset's
//! Parquet, CSV or JSONL files. Every batch is validated: columns present and typed as the
//! task expects, no null or empty text, labels among the task's. Errors name the file, the
//! column and the row.

mod describe;
mod formats;
pub mod mirror;

pub use describe::{describe, manifest_task, task_of};

use crate::config::DevConfig;
use crate::task::{Format, Source, TaskSpec};
use crate::util::sha256_file;
use anyhow::{bail, Context, Result};
use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{DataType, Float32Type, Float64Type, Int32Type, Int64Type};
use formats::Batches;
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

/// The directory a task's split files are found in (GLUE: `<glue_dir>/<config>`).
pub fn split_dir(glue_dir: &Path, task: &TaskSpec) -> PathBuf {
    match &task.source {
        Source::Glue(config) => glue_dir.join(config),
        Source::Files { dir, .. } => dir.clone(),
    }
}

/// The format of a task's files.
pub fn format(task: &TaskSpec) -> Format {
    match &task.source {
        Source::Glue(_) => Format::Parquet,
        Source::Files { format, .. } => *format,
    }
}

/// Lists the files of one split, in shard order.
pub fn split_files(glue_dir: &Path, task: &TaskSpec, split: &str) -> Result<Vec<PathBuf>> {
    match &task.source {
        Source::Glue(config) => glue_split_files(&glue_dir.join(config), config, split),
        Source::Files {
            dir,
            origin,
            splits,
            ..
        } => {
            let pattern = splits.get(split).with_context(|| {
                format!(
                    "split `{split}` is not one of `data.splits` ({})",
                    splits.keys().cloned().collect::<Vec<_>>().join(", ")
                )
            })?;
            if let Some(url) = origin {
                mirror::sync(url, dir, split, pattern)?;
            }
            matching_files(dir, split, pattern)
        }
    }
}

/// A GLUE split's files: `<split>-NNNNN-of-NNNNN.parquet` in the config's directory.
fn glue_split_files(dir: &Path, config: &str, split: &str) -> Result<Vec<PathBuf>> {
    let rd = std::fs::read_dir(dir).with_context(|| {
        format!(
            "{}: GLUE config directory not found (expected <glue_dir>/{config}/{split}-00000-of-00001.parquet; fetch it with `augpro data fetch --config {config}` or set --glue-dir / AUGPRO_GLUE_DIR)",
            dir.display(),
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
            "{}: no file `{split}-NNNNN-of-NNNNN.parquet` for split `{split}` of `{config}`",
            dir.display(),
        );
    }
    Ok(files)
}

/// The files under `dir` whose path matches `pattern` (`*` and `?` within a file name; a
/// pattern with `/` names a subdirectory; see [`split_file_matches`]), sorted; none is an
/// error.
fn matching_files(dir: &Path, split: &str, pattern: &str) -> Result<Vec<PathBuf>> {
    let (sub, name) = pattern.rsplit_once('/').unwrap_or(("", pattern));
    let folder = dir.join(sub);
    let rd = std::fs::read_dir(&folder).with_context(|| {
        format!(
            "{}: directory not found (`data.splits.{split}` = {pattern:?}, relative to `data.source`)",
            folder.display()
        )
    })?;
    let mut files: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| split_file_matches(name, &n.to_string_lossy()))
        })
        .collect();
    files.sort();
    if files.is_empty() {
        bail!(
            "{}: no file matches `data.splits.{split}` = {pattern:?}",
            folder.display()
        );
    }
    Ok(files)
}

/// Whether `name` matches `pattern`, where `*` is any run of bytes and `?` any one byte.
/// Iterative, backtracking only to the last `*`: time linear in the product of the lengths
/// whatever the pattern (a pattern from another team's manifest included).
fn wildcard_match(pattern: &[u8], name: &[u8]) -> bool {
    let (mut p, mut n) = (0, 0);
    // The last `*` seen and the name position it is now taken to end at.
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, n));
                p += 1;
            }
            Some(&c) if c == b'?' || c == name[n] => {
                p += 1;
                n += 1;
            }
            _ => match star {
                Some((sp, sn)) => {
                    star = Some((sp, sn + 1));
                    p = sp + 1;
                    n = sn + 1;
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// The source split's files (paths relative to the split directory) and their sha256s.
pub fn source_files(
    glue_dir: &Path,
    task: &TaskSpec,
    split: &str,
) -> Result<BTreeMap<String, String>> {
    let dir = split_dir(glue_dir, task);
    split_files(glue_dir, task, split)?
        .iter()
        .map(|f| {
            let name = f
                .strip_prefix(&dir)
                .unwrap_or(f)
                .to_string_lossy()
                .to_string();
            Ok((name, sha256_file(f)?))
        })
        .collect()
}

/// Class names of `column` from a Parquet file's `huggingface` schema metadata, if it
/// carries a ClassLabel.
pub fn class_label_names(path: &Path, column: &str) -> Result<Option<Vec<String>>> {
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
        .get("info")
        .and_then(|i| i.get("features"))
        .and_then(|f| f.get(column))
        .and_then(|c| c.get("names"))
        .and_then(|n| n.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect::<Vec<_>>()
        });
    Ok(names)
}

/// Class names from the file's `huggingface` schema metadata of its `label` column.
pub fn label_names_from_metadata(path: &Path) -> Result<Option<Vec<String>>> {
    class_label_names(path, "label")
}

/// A streaming reader over one split: yields validated batches of examples.
pub struct SplitReader {
    task: &'static TaskSpec,
    files: Vec<PathBuf>,
    next_file: usize,
    current: Option<(PathBuf, Batches)>,
    row_in_file: usize,
    row_in_split: usize,
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

/// Number of rows in a split: from Parquet metadata (no data read), else by streaming the
/// files' record batches through.
pub fn split_rows(glue_dir: &Path, task: &TaskSpec, split: &str) -> Result<usize> {
    let mut n = 0;
    for f in split_files(glue_dir, task, split)? {
        n += formats::count_rows(&f, format(task))?;
    }
    Ok(n)
}

/// Number of examples in one part of a split ([`SplitReader::open_part`]): from the row
/// count when nothing is held out, else by reading the split through.
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

/// Opens every train file and reads every validation split through, so that a described
/// dataset's missing column, unknown label or empty split stops a run before anything is
/// trained or written.
pub fn check_splits(glue_dir: &Path, task: &'static TaskSpec) -> Result<()> {
    for f in split_files(glue_dir, task, &task.train_split)? {
        drop(formats::open_batches(&f, format(task), task)?);
    }
    for split in &task.validation_splits {
        let mut r = SplitReader::open(glue_dir, task, split)?;
        while r.next_batch()?.is_some() {}
    }
    Ok(())
}

impl SplitReader {
    /// Opens a split for streaming; fails early when no file exists.
    pub fn open(glue_dir: &Path, task: &'static TaskSpec, split: &str) -> Result<Self> {
        let files = split_files(glue_dir, task, split)?;
        Ok(Self::from_files(task, files))
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
            row_in_split: 0,
            keep: None,
        }
    }

    fn open_next(&mut self) -> Result<bool> {
        if self.next_file >= self.files.len() {
            return Ok(false);
        }
        let path = self.files[self.next_file].clone();
        self.next_file += 1;
        let batches = formats::open_batches(&path, format(self.task), self.task)?;
        self.current = Some((path, batches));
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
                if self.row_in_split == 0 {
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
            let Some(batch) = reader.next() else {
                self.current = None;
                continue;
            };
            let path = path.clone();
            let batch = batch.with_context(|| format!("{}: unreadable data", path.display()))?;
            let rows = Rows {
                path: &path,
                task: self.task,
                row0: self.row_in_file,
                split_row0: self.row_in_split,
            };
            let mut examples = rows.convert(&batch)?;
            self.row_in_file += batch.num_rows();
            self.row_in_split += batch.num_rows();
            if let Some((dev, n, part)) = &self.keep {
                examples.retain(|e| dev.contains(e.idx, *n) == (*part == Part::Dev));
            }
            if !examples.is_empty() {
                return Ok(Some(examples));
            }
        }
    }
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

/// A number from an integer or float column.
fn number_at(col: &dyn Array, i: usize) -> f64 {
    match col.data_type() {
        DataType::Int64 => col.as_primitive::<Int64Type>().value(i) as f64,
        DataType::Int32 => col.as_primitive::<Int32Type>().value(i) as f64,
        DataType::Float32 => col.as_primitive::<Float32Type>().value(i) as f64,
        DataType::Float64 => col.as_primitive::<Float64Type>().value(i),
        _ => unreachable!("schema checked"),
    }
}

/// One record batch being turned into examples: its file, its task and where it starts.
struct Rows<'a> {
    path: &'a Path,
    task: &'a TaskSpec,
    /// Row of the batch's first row within its file (for errors).
    row0: usize,
    /// Row of the batch's first row within its split (the id of tasks without an id column).
    split_row0: usize,
}

impl Rows<'_> {
    /// The batch's examples, every value checked.
    fn convert(&self, batch: &RecordBatch) -> Result<Vec<Example>> {
        let task = self.task;
        let col = |name: &str| batch.column_by_name(name).expect("schema checked").clone();
        let texts: Vec<_> = task.text_columns.iter().map(|c| col(c)).collect();
        let label = col(&task.label_column);
        let idx = task.idx_column.as_deref().map(col);
        let mut out = Vec::with_capacity(batch.num_rows());
        for i in 0..batch.num_rows() {
            let mut t = Vec::with_capacity(2);
            for (c, name) in texts.iter().zip(&task.text_columns) {
                t.push(self.text(c.as_ref(), name, i)?);
            }
            let id = match &idx {
                Some(c) if !c.is_null(i) => number_at(c.as_ref(), i) as i64,
                _ if task.idx_column.is_some() => (self.row0 + i) as i64,
                _ => (self.split_row0 + i) as i64,
            };
            let mut it = t.into_iter();
            out.push(Example {
                idx: id,
                text_a: it.next().expect("one text"),
                text_b: it.next(),
                label: self.label(label.as_ref(), i)?,
            });
        }
        Ok(out)
    }

    /// The non-empty text of column `name` at row `i`.
    fn text(&self, col: &dyn Array, name: &str, i: usize) -> Result<String> {
        let (path, row) = (self.path.display(), self.row0 + i);
        match text_at(col, i) {
            Some(s) if !s.trim().is_empty() => Ok(s),
            Some(_) => bail!("{path}: row {row}: column `{name}` is empty, expected text"),
            None => bail!("{path}: row {row}: column `{name}` is null, expected text"),
        }
    }

    /// The gold label at row `i`: a class index or a score; `None` when the row is
    /// unlabelled (null, or GLUE's `-1`).
    fn label(&self, col: &dyn Array, i: usize) -> Result<Option<f32>> {
        let (task, path, row) = (self.task, self.path.display(), self.row0 + i);
        let name = &task.label_column;
        if col.is_null(i) {
            return Ok(None);
        }
        if let Some(s) = text_at(col, i) {
            return match task.label_names.iter().position(|n| *n == s) {
                Some(c) => Ok(Some(c as f32)),
                None => bail!(
                    "{path}: row {row}: column `{name}` is {s:?}, not one of the labels of `{}`'s train split ({})",
                    task.name,
                    task.label_names.join(", ")
                ),
            };
        }
        let v = number_at(col, i);
        if task.is_regression() {
            if !v.is_finite() {
                bail!("{path}: row {row}: column `{name}` is {v}, expected a finite score");
            }
            return Ok(Some(v as f32));
        }
        if v == -1.0 {
            return Ok(None);
        }
        if v < 0.0 || v >= task.num_labels as f64 || v.fract() != 0.0 {
            bail!(
                "{path}: row {row}: column `{name}` is {v}, expected a class in 0..{} for `{}`",
                task.num_labels,
                task.name
            );
        }
        Ok(Some(v as f32))
    }
}

/// Whether the file `name` belongs to a split whose file-name pattern is `pattern`: `*` and
/// `?` as a shell reads them, so a hidden name matches only a pattern that starts with `.`,
/// and never one of augpro's temporaries (a copy under way, or one a killed process left).
pub(crate) fn split_file_matches(pattern: &str, name: &str) -> bool {
    (pattern.starts_with('.') || !name.starts_with('.'))
        && crate::util::temporary_target(name).is_none()
        && wildcard_match(pattern.as_bytes(), name.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::{split_file_matches, wildcard_match};

    #[test]
    fn split_files_skip_hidden_names_and_temporaries() {
        let tmp = crate::util::temporary_name("train.csv");
        assert!(split_file_matches("*.csv", "train.csv"));
        assert!(!split_file_matches("*.csv", ".old.csv"));
        assert!(!split_file_matches("train*", &tmp));
        assert!(split_file_matches(".old.csv", ".old.csv"));
        assert!(!split_file_matches(".*", &tmp));
    }

    #[test]
    fn split_patterns_match_file_names() {
        let m = |p: &str, n: &str| wildcard_match(p.as_bytes(), n.as_bytes());
        assert!(m("train-*.csv", "train-00000-of-00002.csv"));
        assert!(m("train*.csv", "train.csv"));
        assert!(m("part-?.jsonl", "part-1.jsonl"));
        assert!(!m("part-?.jsonl", "part-12.jsonl"));
        assert!(!m("train-*.csv", "validation-0.csv"));
        assert!(!m("train.csv", "train.csv.bak"));
        assert!(m("*", "anything"));
        assert!(m("*", ""));
        assert!(m("a*b*c", "aXbYbZc"));
        assert!(m("*.csv", "x.csv.csv"));
        assert!(!m("a*b", "aXbY"));
        assert!(!m("?", ""));
        assert!(m("**?", "x"));
    }

    /// A pattern that makes a backtracking matcher take exponential time answers at once.
    #[test]
    fn many_stars_do_not_explode() {
        let pattern = "*a".repeat(30) + "b";
        let name = "a".repeat(250);
        assert!(!wildcard_match(pattern.as_bytes(), name.as_bytes()));
        let stars = "*".repeat(1_000_000);
        assert!(wildcard_match(stars.as_bytes(), name.as_bytes()));
    }
}
