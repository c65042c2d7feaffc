//! A pipeline's task: the GLUE config it names, or the dataset its `[data]` section
//! describes, with class names taken from the files: the explicit `labels`, else the
//! Parquet files' Hugging Face ClassLabel, else the sorted distinct string labels of train.

use super::formats::open_batches;
use super::{split_files, text_at};
use crate::config::{DataConfig, PipelineConfig};
use crate::shards::manifest::Manifest;
use crate::task::{self, TaskSpec};
use anyhow::{bail, Context, Result};
use arrow::array::Array;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Descriptions already resolved in this process, by task name and description: the
/// label scan runs once.
type Resolved = Vec<(String, DataConfig, &'static TaskSpec)>;
static RESOLVED: Mutex<Resolved> = Mutex::new(Vec::new());

/// The task a pipeline runs on.
pub fn task_of(cfg: &PipelineConfig) -> Result<&'static TaskSpec> {
    match &cfg.data {
        None => task::glue(&cfg.task),
        Some(d) => describe(&cfg.task, d, None),
    }
}

/// The task `data` describes under the name `name`. Class names `recorded` (in a manifest)
/// are taken as they are; otherwise they come from the files.
pub fn describe(
    name: &str,
    data: &DataConfig,
    recorded: Option<&[String]>,
) -> Result<&'static TaskSpec> {
    data.describe(name, super::mirror::place, |spec| match recorded {
        Some(names) => Ok(names.to_vec()),
        None => cached_names(name, data, spec),
    })
}

/// The task a dataset was made for: the GLUE config its manifest names, or the dataset its
/// configuration describes (with the class names it records), its files where this
/// process reads them.
pub fn manifest_task(m: &Manifest) -> Result<&'static TaskSpec> {
    m.task_placed(super::mirror::place)
}

/// Class names resolved before for this description, else from the files.
fn cached_names(name: &str, data: &DataConfig, spec: &TaskSpec) -> Result<Vec<String>> {
    let hit = |r: &Resolved| {
        r.iter()
            .find(|(n, d, _)| n == name && d == data)
            .map(|(_, _, t)| t.label_names.clone())
    };
    if let Some(names) = hit(&RESOLVED.lock().unwrap_or_else(|e| e.into_inner())) {
        return Ok(names);
    }
    let names = class_names(data, spec)?;
    let mut done = spec.clone();
    done.num_labels = names.len();
    done.label_names = names.clone();
    let t = task::register(done);
    RESOLVED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((name.into(), data.clone(), t));
    Ok(names)
}

/// Class names of a classification task, in class order.
fn class_names(data: &DataConfig, spec: &TaskSpec) -> Result<Vec<String>> {
    if let Some(names) = &data.labels {
        return Ok(names.clone());
    }
    let files = split_files(Path::new(""), spec, &spec.train_split)?;
    if data.format()? == task::Format::Parquet {
        if let Some(names) = super::class_label_names(&files[0], &spec.label_column)? {
            return Ok(names);
        }
    }
    let Some(names) = string_labels(spec, &files)? else {
        bail!(
            "{}: column `{}` holds class ids and no ClassLabel metadata names them; list the class names in `data.labels = [...]`",
            files[0].display(),
            spec.label_column
        );
    };
    if names.len() < 2 {
        bail!(
            "{}: column `{}` has {} distinct label(s) in the train split, a classification task needs at least two",
            files[0].display(),
            spec.label_column,
            names.len()
        );
    }
    Ok(names.into_iter().collect())
}

/// The distinct string labels of the train files, sorted; `None` when the labels are not
/// strings. Streams the files; an empty split is an error.
fn string_labels(spec: &TaskSpec, files: &[PathBuf]) -> Result<Option<BTreeSet<String>>> {
    let mut names = BTreeSet::new();
    let mut rows = 0;
    for f in files {
        for batch in open_batches(f, super::format(spec), spec)? {
            let batch = batch.with_context(|| format!("{}: unreadable data", f.display()))?;
            let col = batch
                .column_by_name(&spec.label_column)
                .context("schema checked")?;
            rows += batch.num_rows();
            for i in 0..batch.num_rows() {
                if col.is_null(i) {
                    continue;
                }
                match text_at(col.as_ref(), i) {
                    Some(s) => names.insert(s),
                    None => return Ok(None),
                };
            }
        }
    }
    if rows == 0 {
        bail!("{}: split is empty (no rows)", files[0].display());
    }
    Ok(Some(names))
}
