//! Task descriptions: a dataset's text columns, labels, splits, metric and where its files
//! are. The nine GLUE configs are the built-in descriptions; a pipeline's `[data]` section
//! ([`DataConfig`]) describes any other dataset ([`register`] gives it the same standing).
//! Both are recorded in every manifest, with the dev split held out of train
//! ([`DevConfig`]), so that a reader knows what the rows hold without the pipeline.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
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
pub fn glue(name: &str) -> Result<&'static TaskSpec> {
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

/// A dev split carved deterministically from the task's train split: an example belongs to
/// it when a hash of its `idx` (and `seed`) falls below a threshold, so membership does not
/// depend on file order or sharding. Dev examples are left out of teacher fine-tuning,
/// augmentation and student training; students choose their checkpoint on them, and sweeps
/// tune on them. The validation split is only scored.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DevConfig {
    /// Share of the train split held out (0 disables the dev split).
    pub fraction: f64,
    /// At most about this many examples: the share is lowered on large train splits.
    pub max_examples: usize,
    /// Seed of the membership hash.
    pub seed: u64,
}

impl Default for DevConfig {
    fn default() -> Self {
        Self {
            fraction: 0.1,
            max_examples: 2000,
            seed: 0,
        }
    }
}

impl DevConfig {
    /// No dev split.
    pub const NONE: DevConfig = DevConfig {
        fraction: 0.0,
        max_examples: 0,
        seed: 0,
    };

    /// The share held out of a train split of `rows` examples.
    pub fn share(&self, rows: usize) -> f64 {
        if rows == 0 {
            return 0.0;
        }
        self.fraction.min(self.max_examples as f64 / rows as f64)
    }

    /// Whether the example with this `idx` is in the dev split of a train split of `rows`.
    pub fn contains(&self, idx: i64, rows: usize) -> bool {
        let share = self.share(rows);
        if share <= 0.0 {
            return false;
        }
        let h = crate::hash::derive_seed(self.seed, &["dev", &idx.to_string()]);
        ((h >> 11) as f64 / (1u64 << 53) as f64) < share
    }
}

/// A dataset described by the pipeline file (`[data]`) instead of named by a GLUE config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// A directory the split patterns are relative to, or `glue:<config>`.
    pub source: String,
    /// File format; inferred from the train pattern's extension when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<Format>,
    /// File-name pattern (`*`, `?`) of each split: `train` and at least one validation split.
    #[serde(default)]
    pub splits: BTreeMap<String, String>,
    /// One or two text columns, in the order they are fed to the encoder.
    #[serde(default)]
    pub text: Vec<String>,
    /// The gold label's column: class ids, class names or scores.
    #[serde(default = "default_label")]
    pub label: String,
    /// `classification` or `regression`.
    #[serde(default)]
    pub kind: TaskKind,
    /// Primary metric; `accuracy` (classification) or `pearson` (regression) when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric: Option<String>,
    /// Class names in class order, when neither the files' metadata nor string labels give
    /// them (or to fix their order).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<Vec<String>>,
}

/// Whether a split pattern stays inside the source: relative, with plain names only (no
/// `..`, `.` or empty parts).
fn relative_pattern(p: &str) -> bool {
    !p.is_empty() && p.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
}

/// Whether a described dataset's label is a class or a score.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskKind {
    /// A class: an id, or a name.
    #[default]
    Classification,
    /// A real-valued score.
    Regression,
}

fn default_label() -> String {
    "label".into()
}

/// Prefix of a `data.source` that names a GLUE config.
pub const GLUE_SOURCE: &str = "glue:";

impl DataConfig {
    /// The GLUE config a `glue:<config>` source names.
    pub fn glue_config(&self) -> Option<&str> {
        self.source.strip_prefix(GLUE_SOURCE)
    }

    /// The primary metric: the one given, else the kind's default.
    pub fn metric_name(&self) -> &str {
        match (&self.metric, self.kind) {
            (Some(m), _) => m,
            (None, TaskKind::Classification) => "accuracy",
            (None, TaskKind::Regression) => "pearson",
        }
    }

    /// The format given, else the one the train pattern's extension says.
    pub fn format(&self) -> Result<Format> {
        if let Some(f) = self.format {
            return Ok(f);
        }
        let train = self.splits.get("train").map(String::as_str).unwrap_or("");
        Format::from_name(train).ok_or_else(|| {
            anyhow::anyhow!(
                "`data.format`: cannot tell it from `data.splits.train` = {train:?}; set parquet, csv or jsonl"
            )
        })
    }

    /// Checks the description's shape (the files are checked when read).
    pub fn validate(&self) -> Result<()> {
        if let Some(c) = self.glue_config() {
            glue(c)?;
            if !self.splits.is_empty() || !self.text.is_empty() || self.labels.is_some() {
                bail!("`data`: a `{GLUE_SOURCE}` source takes no splits, text or labels (the GLUE config has them)");
            }
            return Ok(());
        }
        crate::storage::Location::parse(&self.source)
            .with_context(|| format!("`data.source` = {:?}", self.source))?;
        if let Some((split, p)) = self.splits.iter().find(|(_, p)| !relative_pattern(p)) {
            bail!("`data.splits.{split}` = {p:?}: expected a file-name pattern relative to `data.source`, without `..`");
        }
        if !self.splits.contains_key("train") || self.splits.len() < 2 {
            bail!(
                "`data.splits` must name `train` and at least one validation split, got {:?}",
                self.splits.keys().collect::<Vec<_>>()
            );
        }
        if self.text.is_empty() || self.text.len() > 2 {
            bail!(
                "`data.text` must name one or two text columns, got {}",
                self.text.len()
            );
        }
        self.check_metric()?;
        self.check_labels()?;
        self.format()?;
        Ok(())
    }

    /// Checks that the metric is known and scores the task's kind.
    fn check_metric(&self) -> Result<()> {
        let metric = self.metric_name();
        let family = METRICS.iter().find(|(n, _)| *n == metric).map(|(_, k)| *k);
        let regression = self.kind == TaskKind::Regression;
        match family {
            None => bail!(
                "`data.metric` = `{metric}`: expected one of {}",
                METRICS
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Some(k) if (k == MetricKind::PearsonSpearman) != regression => {
                bail!(
                    "`data.metric` = `{metric}` does not score a {} task",
                    if regression {
                        "regression"
                    } else {
                        "classification"
                    }
                )
            }
            _ => {}
        }
        Ok(())
    }

    /// Checks explicit class names: at least two, distinct, and only for classification.
    fn check_labels(&self) -> Result<()> {
        let regression = self.kind == TaskKind::Regression;
        if regression && self.labels.is_some() {
            bail!("`data.labels`: a regression task has no class names");
        }
        if let Some(l) = &self.labels {
            let distinct: std::collections::BTreeSet<&String> = l.iter().collect();
            if l.len() < 2 || distinct.len() != l.len() {
                bail!("`data.labels` must list at least two distinct class names, got {l:?}");
            }
        }
        Ok(())
    }
}

impl DataConfig {
    /// The task this description gives under the name `name`. `place` turns `data.source`
    /// into the directory the split patterns are read under and the object-store URL it is
    /// mirrored from; `class_names` gives a classification task's class names (given the
    /// description without them).
    pub fn describe(
        &self,
        name: &str,
        place: impl FnOnce(&str) -> Result<(PathBuf, Option<String>)>,
        class_names: impl FnOnce(&TaskSpec) -> Result<Vec<String>>,
    ) -> Result<&'static TaskSpec> {
        self.validate()?;
        if let Some(config) = self.glue_config() {
            let mut t = glue(config)?.clone();
            t.name = name.into();
            return Ok(register(t));
        }
        let (dir, origin) = place(&self.source)?;
        let mut spec = self.unlabelled(name, dir, origin)?;
        if self.kind == TaskKind::Classification {
            spec.label_names = class_names(&spec)?;
            spec.num_labels = spec.label_names.len();
        }
        Ok(register(spec))
    }

    /// The description with no class names yet (regression tasks are complete).
    fn unlabelled(&self, name: &str, dir: PathBuf, origin: Option<String>) -> Result<TaskSpec> {
        let metric = self.metric_name();
        let (primary, family) = *METRICS
            .iter()
            .find(|(n, _)| *n == metric)
            .context("metric checked")?;
        Ok(TaskSpec {
            name: name.into(),
            text_columns: self.text.clone(),
            label_column: self.label.clone(),
            idx_column: None,
            num_labels: if self.kind == TaskKind::Regression {
                1
            } else {
                0
            },
            label_names: Vec::new(),
            metric: family,
            primary,
            train_split: "train".into(),
            validation_splits: self
                .splits
                .keys()
                .filter(|k| *k != "train")
                .cloned()
                .collect(),
            source: Source::Files {
                dir,
                origin,
                format: self.format()?,
                splits: self.splits.clone(),
            },
        })
    }
}
