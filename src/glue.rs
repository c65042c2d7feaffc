//! Task descriptions: a dataset's text columns, labels, splits, metric and where its files
//! are. The nine GLUE configs are the built-in descriptions; a pipeline's `[data]` section
//! describes any other dataset ([`register`] gives it the same standing).

use anyhow::{bail, Result};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{LazyLock, Mutex};

/// The GLUE metric family a task is scored with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MetricKind {
    /// Accuracy.
    Accuracy,
    /// F1 of the positive class, plus accuracy (MRPC, QQP).
    F1Accuracy,
    /// Matthews correlation (CoLA).
    Matthews,
    /// Pearson and Spearman correlation (STS-B).
    PearsonSpearman,
}

/// MRPC's and QQP's GLUE score: the mean of accuracy and F1. Unlike F1 alone, a constant
/// "positive" predictor cannot top it.
pub const ACC_AND_F1: &str = "acc_and_f1";

/// The metric names a description may choose, with their family: the name is the primary
/// metric (checkpoints are chosen and reports ranked by it).
pub const METRICS: &[(&str, MetricKind)] = &[
    ("accuracy", MetricKind::Accuracy),
    ("f1", MetricKind::F1Accuracy),
    (ACC_AND_F1, MetricKind::F1Accuracy),
    ("matthews", MetricKind::Matthews),
    ("pearson", MetricKind::PearsonSpearman),
    ("spearman", MetricKind::PearsonSpearman),
];

/// File format of a dataset's split files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// Apache Parquet.
    Parquet,
    /// Comma-separated values with a header row.
    Csv,
    /// One JSON object per line.
    Jsonl,
}

impl Format {
    /// The format a file name's extension says (`.parquet`, `.csv`, `.jsonl` / `.json`).
    pub fn from_name(name: &str) -> Option<Format> {
        let ext = name.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase())?;
        match ext.as_str() {
            "parquet" => Some(Format::Parquet),
            "csv" => Some(Format::Csv),
            "jsonl" | "json" => Some(Format::Jsonl),
            _ => None,
        }
    }
}

/// Where a task's files are.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    /// A GLUE config in the hub's layout under the GLUE directory
    /// (`<glue_dir>/<config>/<split>-NNNNN-of-NNNNN.parquet`).
    Glue(&'static str),
    /// Files of one format under a directory, each split a file-name pattern (`*` and `?`).
    Files {
        /// The directory the patterns are relative to (for an object-store source, its
        /// local mirror).
        dir: PathBuf,
        /// The object-store URL the files are mirrored from (`None`: a local directory).
        origin: Option<String>,
        /// Format of every file.
        format: Format,
        /// Pattern of each split's files.
        splits: BTreeMap<String, String>,
    },
}

/// Everything the pipeline needs to know about one task.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskSpec {
    /// Task name (the GLUE config name, or the pipeline's `task`).
    pub name: String,
    /// One or two text columns, in the order they are fed to the encoder.
    pub text_columns: Vec<String>,
    /// The gold label's column.
    pub label_column: String,
    /// The column of example ids; `None` numbers the rows of each split from 0.
    pub idx_column: Option<String>,
    /// Number of classes; 1 means regression.
    pub num_labels: usize,
    /// Class names (for GLUE the defaults: the file's `huggingface` metadata wins when
    /// present); a string label is the class of its position here.
    pub label_names: Vec<String>,
    /// Metric family used for validation.
    pub metric: MetricKind,
    /// Name of the primary metric.
    pub primary: &'static str,
    /// Name of the training split.
    pub train_split: String,
    /// Validation splits (MNLI has two).
    pub validation_splits: Vec<String>,
    /// Where the files are.
    pub source: Source,
}

impl TaskSpec {
    /// True for regression tasks (STS-B).
    pub fn is_regression(&self) -> bool {
        self.num_labels == 1
    }
    /// True when the task reads sentence pairs.
    pub fn is_pair(&self) -> bool {
        self.text_columns.len() == 2
    }
    /// Name of the primary metric: the one checkpoints are chosen and reports ranked by.
    pub fn primary_metric(&self) -> &'static str {
        self.primary
    }
    /// True for the built-in GLUE descriptions.
    pub fn is_glue(&self) -> bool {
        matches!(self.source, Source::Glue(_))
    }
    /// Every split published for this task (GLUE's test splits included).
    pub fn all_splits(&self) -> Vec<String> {
        let mut v = vec![self.train_split.clone()];
        v.extend(self.validation_splits.iter().cloned());
        match &self.source {
            Source::Glue("mnli") => v.extend(["test_matched", "test_mismatched"].map(String::from)),
            Source::Glue("ax") | Source::Files { .. } => {}
            Source::Glue(_) => v.push("test".into()),
        }
        v
    }
}

/// One GLUE config: the facts that differ between configs.
struct Glue {
    name: &'static str,
    text_columns: &'static [&'static str],
    label_names: &'static [&'static str],
    metric: &'static str,
    validation_splits: &'static [&'static str],
}

impl Glue {
    /// The config as a task description.
    fn spec(&self) -> TaskSpec {
        let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let (primary, metric) = *METRICS
            .iter()
            .find(|(n, _)| *n == self.metric)
            .expect("a known metric");
        TaskSpec {
            name: self.name.into(),
            text_columns: strings(self.text_columns),
            label_column: "label".into(),
            idx_column: Some("idx".into()),
            num_labels: self.label_names.len().max(1),
            label_names: strings(self.label_names),
            metric,
            primary,
            train_split: "train".into(),
            validation_splits: strings(self.validation_splits),
            source: Source::Glue(self.name),
        }
    }
}

const VAL: &[&str] = &["validation"];

/// All GLUE configs this project knows.
const GLUE: &[Glue] = &[
    Glue {
        name: "cola",
        text_columns: &["sentence"],
        label_names: &["unacceptable", "acceptable"],
        metric: "matthews",
        validation_splits: VAL,
    },
    Glue {
        name: "sst2",
        text_columns: &["sentence"],
        label_names: &["negative", "positive"],
        metric: "accuracy",
        validation_splits: VAL,
    },
    Glue {
        name: "mrpc",
        text_columns: &["sentence1", "sentence2"],
        label_names: &["not_equivalent", "equivalent"],
        metric: ACC_AND_F1,
        validation_splits: VAL,
    },
    Glue {
        name: "qqp",
        text_columns: &["question1", "question2"],
        label_names: &["not_duplicate", "duplicate"],
        metric: ACC_AND_F1,
        validation_splits: VAL,
    },
    Glue {
        name: "stsb",
        text_columns: &["sentence1", "sentence2"],
        label_names: &[],
        metric: "pearson",
        validation_splits: VAL,
    },
    Glue {
        name: "mnli",
        text_columns: &["premise", "hypothesis"],
        label_names: &["entailment", "neutral", "contradiction"],
        metric: "accuracy",
        validation_splits: &["validation_matched", "validation_mismatched"],
    },
    Glue {
        name: "qnli",
        text_columns: &["question", "sentence"],
        label_names: &["entailment", "not_entailment"],
        metric: "accuracy",
        validation_splits: VAL,
    },
    Glue {
        name: "rte",
        text_columns: &["sentence1", "sentence2"],
        label_names: &["entailment", "not_entailment"],
        metric: "accuracy",
        validation_splits: VAL,
    },
    Glue {
        name: "wnli",
        text_columns: &["sentence1", "sentence2"],
        label_names: &["not_entailment", "entailment"],
        metric: "accuracy",
        validation_splits: VAL,
    },
];

/// The GLUE descriptions, built once.
static TASKS: LazyLock<Vec<TaskSpec>> = LazyLock::new(|| GLUE.iter().map(Glue::spec).collect());

/// Described tasks given a `'static` life by [`register`].
static DESCRIBED: Mutex<Vec<&'static TaskSpec>> = Mutex::new(Vec::new());

/// Names of the GLUE configs.
pub fn glue_names() -> Vec<&'static str> {
    GLUE.iter().map(|g| g.name).collect()
}

/// Looks a GLUE config up by name, with a clear error listing the known ones.
pub fn task(name: &str) -> Result<&'static TaskSpec> {
    match TASKS.iter().find(|t| t.name == name) {
        Some(t) => Ok(t),
        None => bail!(
            "unknown GLUE task `{name}`: expected one of {} (or describe the dataset in a `[data]` section)",
            glue_names().join(", ")
        ),
    }
}

/// Gives a described task the standing of a built-in one: a `'static` description that
/// lives for the process. Registering an equal description again returns the first.
pub fn register(spec: TaskSpec) -> &'static TaskSpec {
    let mut known = DESCRIBED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(t) = known.iter().find(|t| ***t == spec) {
        return t;
    }
    let t: &'static TaskSpec = Box::leak(Box::new(spec));
    known.push(t);
    t
}
