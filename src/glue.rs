//! The GLUE task registry: text columns, labels, splits and metric of every config.

use anyhow::{bail, Result};

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

/// Everything the pipeline needs to know about one GLUE config.
#[derive(Debug, Clone)]
pub struct TaskSpec {
    /// Config name on the hub (`sst2`, `mnli`, ...).
    pub name: &'static str,
    /// One or two text columns, in the order they are fed to the encoder.
    pub text_columns: &'static [&'static str],
    /// Number of classes; 1 means regression.
    pub num_labels: usize,
    /// Default class names (the file's `huggingface` metadata wins when present).
    pub label_names: &'static [&'static str],
    /// Metric used for validation.
    pub metric: MetricKind,
    /// Name of the training split.
    pub train_split: &'static str,
    /// Validation splits (MNLI has two).
    pub validation_splits: &'static [&'static str],
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
        match self.metric {
            MetricKind::Accuracy => "accuracy",
            MetricKind::F1Accuracy => ACC_AND_F1,
            MetricKind::Matthews => "matthews",
            MetricKind::PearsonSpearman => "pearson",
        }
    }
    /// Every split published for this config (test splits included).
    pub fn all_splits(&self) -> Vec<&'static str> {
        let mut v = vec![self.train_split];
        v.extend(self.validation_splits.iter().copied());
        match self.name {
            "mnli" => v.extend(["test_matched", "test_mismatched"]),
            "ax" => {}
            _ => v.push("test"),
        }
        v
    }
}

const VAL: &[&str] = &["validation"];

/// All GLUE configs this project knows.
pub const TASKS: &[TaskSpec] = &[
    TaskSpec {
        name: "cola",
        text_columns: &["sentence"],
        num_labels: 2,
        label_names: &["unacceptable", "acceptable"],
        metric: MetricKind::Matthews,
        train_split: "train",
        validation_splits: VAL,
    },
    TaskSpec {
        name: "sst2",
        text_columns: &["sentence"],
        num_labels: 2,
        label_names: &["negative", "positive"],
        metric: MetricKind::Accuracy,
        train_split: "train",
        validation_splits: VAL,
    },
    TaskSpec {
        name: "mrpc",
        text_columns: &["sentence1", "sentence2"],
        num_labels: 2,
        label_names: &["not_equivalent", "equivalent"],
        metric: MetricKind::F1Accuracy,
        train_split: "train",
        validation_splits: VAL,
    },
    TaskSpec {
        name: "qqp",
        text_columns: &["question1", "question2"],
        num_labels: 2,
        label_names: &["not_duplicate", "duplicate"],
        metric: MetricKind::F1Accuracy,
        train_split: "train",
        validation_splits: VAL,
    },
    TaskSpec {
        name: "stsb",
        text_columns: &["sentence1", "sentence2"],
        num_labels: 1,
        label_names: &[],
        metric: MetricKind::PearsonSpearman,
        train_split: "train",
        validation_splits: VAL,
    },
    TaskSpec {
        name: "mnli",
        text_columns: &["premise", "hypothesis"],
        num_labels: 3,
        label_names: &["entailment", "neutral", "contradiction"],
        metric: MetricKind::Accuracy,
        train_split: "train",
        validation_splits: &["validation_matched", "validation_mismatched"],
    },
    TaskSpec {
        name: "qnli",
        text_columns: &["question", "sentence"],
        num_labels: 2,
        label_names: &["entailment", "not_entailment"],
        metric: MetricKind::Accuracy,
        train_split: "train",
        validation_splits: VAL,
    },
    TaskSpec {
        name: "rte",
        text_columns: &["sentence1", "sentence2"],
        num_labels: 2,
        label_names: &["entailment", "not_entailment"],
        metric: MetricKind::Accuracy,
        train_split: "train",
        validation_splits: VAL,
    },
    TaskSpec {
        name: "wnli",
        text_columns: &["sentence1", "sentence2"],
        num_labels: 2,
        label_names: &["not_entailment", "entailment"],
        metric: MetricKind::Accuracy,
        train_split: "train",
        validation_splits: VAL,
    },
];

/// Looks a config up by name, with a clear error listing the known ones.
pub fn task(name: &str) -> Result<&'static TaskSpec> {
    match TASKS.iter().find(|t| t.name == name) {
        Some(t) => Ok(t),
        None => bail!(
            "unknown GLUE task `{name}`: expected one of {}",
            TASKS.iter().map(|t| t.name).collect::<Vec<_>>().join(", ")
        ),
    }
}
