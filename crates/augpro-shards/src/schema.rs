//! The shard schema, defined once: the source config's own columns (text, `label`, `idx`)
//! plus the augmentation columns, with the Hugging Face `datasets` features of every column
//! (written into each shard's `huggingface` schema metadata and into the dataset card).

use crate::task::TaskSpec;
use arrow::datatypes::{DataType, Field, Schema};
use std::collections::HashMap;
use std::sync::Arc;

/// Names of the augmentation methods as written in the `method` column.
pub const METHODS: &[&str] = &[
    "original",
    "augpro_mix",
    "augpro_fgsm",
    "token_replace",
    "mixup",
    "fgsm",
];

/// True for methods whose rows are virtual inputs (MixUp, FGSM without projection): their
/// `input_ids` are the source's, and their `teacher_logits` belong to a point in embedding
/// space that no token sequence produces. They go to the `virtual` files and config.
pub fn is_virtual(method: &str) -> bool {
    matches!(method, "mixup" | "fgsm")
}

/// One output row, before it becomes Arrow columns.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// Decoded text(s) of the row's tokens.
    pub texts: Vec<String>,
    /// Gold label (original rows only).
    pub label: Option<f32>,
    /// Source example's `idx`.
    pub idx: i64,
    /// Method name (one of [`METHODS`]).
    pub method: &'static str,
    /// Copy number among the method's rows for this source.
    pub copy: u32,
    /// Partner example's `idx` (mixing methods).
    pub partner_idx: Option<i64>,
    /// λ (mixing methods, sequence mode).
    pub lambda: Option<f32>,
    /// ε (gradient methods).
    pub epsilon: Option<f32>,
    /// Token ids.
    pub input_ids: Vec<u32>,
    /// Segment ids.
    pub token_type_ids: Vec<u8>,
    /// Positions whose token differs from the source (projected methods).
    pub changed_tokens: Option<u32>,
    /// Teacher logits on exactly this row's input.
    pub teacher_logits: Vec<f32>,
    /// Partner token ids (MixUp rows, so the student can rebuild the mix).
    pub partner_input_ids: Option<Vec<u32>>,
    /// Partner token types (MixUp rows).
    pub partner_token_type_ids: Option<Vec<u8>>,
    /// Gradient signs `[len × hidden]` (FGSM rows, so the student can rebuild the point).
    pub perturbation: Option<Vec<i8>>,
    /// One λ per position (MixUp rows in per-position mode; `lambda` is then null).
    pub lambdas: Option<Vec<f32>>,
}

/// The Arrow schema of a task's shards.
#[derive(Debug, Clone)]
pub struct ShardSchema {
    /// Arrow schema.
    pub schema: Arc<Schema>,
    /// Text column names.
    pub text_columns: Vec<String>,
    /// Regression task (float label).
    pub regression: bool,
    /// Width of `teacher_logits`.
    pub num_labels: usize,
    /// Class names of `label` (empty for regression).
    pub label_names: Vec<String>,
    /// `datasets` features of every column, in column order (JSON of `Features.to_dict()`).
    pub features: Vec<(String, serde_json::Value)>,
}

impl ShardSchema {
    /// Builds the schema for `task`.
    pub fn new(task: &TaskSpec) -> Self {
        let list = |t: DataType| DataType::List(Arc::new(Field::new("item", t, true)));
        let mut fields: Vec<Field> = task
            .text_columns
            .iter()
            .map(|c| Field::new(c.as_str(), DataType::Utf8, false))
            .collect();
        fields.push(Field::new(
            "label",
            if task.is_regression() {
                DataType::Float32
            } else {
                DataType::Int64
            },
            true,
        ));
        fields.extend([
            Field::new("idx", DataType::Int32, false),
            Field::new("method", DataType::Utf8, false),
            Field::new("virtual", DataType::Boolean, false),
            Field::new("copy", DataType::Int32, false),
            Field::new("partner_idx", DataType::Int32, true),
            Field::new("lambda", DataType::Float32, true),
            Field::new("epsilon", DataType::Float32, true),
            Field::new("input_ids", list(DataType::Int32), false),
            Field::new("token_type_ids", list(DataType::Int8), false),
            Field::new("changed_tokens", DataType::Int32, true),
            Field::new(
                "teacher_logits",
                DataType::FixedSizeList(
                    Arc::new(Field::new("item", DataType::Float32, true)),
                    task.num_labels as i32,
                ),
                false,
            ),
            Field::new("partner_input_ids", list(DataType::Int32), true),
            Field::new("partner_token_type_ids", list(DataType::Int8), true),
            Field::new("perturbation", list(DataType::Int8), true),
            Field::new("lambdas", list(DataType::Float32), true),
        ]);
        let features: Vec<(String, serde_json::Value)> = fields
            .iter()
            .map(|f| (f.name().clone(), feature(task, f.name(), f.data_type())))
            .collect();
        let metadata = HashMap::from([(
            "huggingface".to_string(),
            format!(r#"{{"info":{{"features":{}}}}}"#, features_json(&features)),
        )]);
        Self {
            schema: Arc::new(Schema::new_with_metadata(fields, metadata)),
            text_columns: task.text_columns.clone(),
            regression: task.is_regression(),
            num_labels: task.num_labels,
            label_names: task.label_names.clone(),
            features,
        }
    }
}

/// The `datasets` feature of one column: the gold label is a `ClassLabel` with the task's
/// names (a float `Value` for regression), lists are `Sequence`s (fixed length for
/// `teacher_logits`), everything else a `Value` of the column's type.
fn feature(task: &TaskSpec, name: &str, t: &DataType) -> serde_json::Value {
    use serde_json::json;
    let dtype = |t: &DataType| match t {
        DataType::Utf8 => "string",
        DataType::Boolean => "bool",
        DataType::Int8 => "int8",
        DataType::Int32 => "int32",
        DataType::Int64 => "int64",
        _ => "float32",
    };
    match t {
        _ if name == "label" && !task.is_regression() => {
            json!({"names": task.label_names, "_type": "ClassLabel"})
        }
        DataType::List(item) => {
            json!({"feature": {"dtype": dtype(item.data_type()), "_type": "Value"}, "_type": "Sequence"})
        }
        DataType::FixedSizeList(item, n) => json!({
            "feature": {"dtype": dtype(item.data_type()), "_type": "Value"},
            "length": n,
            "_type": "Sequence"
        }),
        t => json!({"dtype": dtype(t), "_type": "Value"}),
    }
}

/// Features as a JSON object that keeps column order (`serde_json` maps sort their keys).
pub fn features_json(features: &[(String, serde_json::Value)]) -> String {
    let items: Vec<String> = features
        .iter()
        .map(|(k, v)| format!("{}:{v}", serde_json::Value::from(k.as_str())))
        .collect();
    format!("{{{}}}", items.join(","))
}
