//! The dataset card (`README.md`) written next to the shards.

use crate::manifest::Manifest;
use crate::schema::{is_virtual, ShardSchema};
use std::fmt::Write;

/// Renders the dataset card from the manifest and the schema: YAML front matter for the
/// Hugging Face Hub (`configs`, `dataset_info.features`, license, sources, citation), then
/// contents, schema and loading snippets.
pub fn render(m: &Manifest, schema: &ShardSchema) -> String {
    let mut s = String::new();
    let _ = write!(s, "{}", front_matter(m, schema));
    intro(&mut s, m);
    contents(&mut s, m);
    let _ = writeln!(s, "## Protocol\n\n{}\n", protocol(m));
    schema_table(&mut s, schema);
    configs(&mut s, m);
    loading_and_license(&mut s, m);
    s
}

/// The title and what the rows are.
fn intro(s: &mut String, m: &Manifest) {
    let _ = writeln!(
        s,
        "# AugPro distillation data: {} ({} split)\n",
        source_name(m),
        m.split
    );
    let _ = writeln!(
        s,
        "Augmented copies of {task} examples for knowledge distillation, each token row carrying the \
         teacher's logits on exactly its tokens. Made by augpro {ver} with *Augmentation with Projection* \
         (AugPro, Wang et al., ICLR 2023): interpolations (AugPro-Mix) and gradient-sign perturbations \
         (AugPro-FGSM) of word embeddings are projected back to each position's nearest vocabulary token, \
         so every augmented row is a real token sequence. Baselines are included for comparison: token \
         replacement, and MixUp / FGSM without projection (virtual inputs, see below).\n",
        task = source_name(m),
        ver = m.augpro_version
    );
}

/// Per-method diagnostics, row counts, teacher and projection.
fn contents(s: &mut String, m: &Manifest) {
    let _ = writeln!(s, "## Contents\n\n```");
    for (k, d) in &m.diagnostics {
        let _ = writeln!(s, "{}", d.summary(k, m.num_labels == 1));
    }
    let _ = writeln!(s, "```");
    let _ = writeln!(s, "\n{} rows from {} source examples in {} shard(s); {} source examples were truncated to max_seq_len. Seed {}.\n", m.rows, m.source_examples, m.shards.len(), m.truncated_examples, m.seed);
    let _ = writeln!(
        s,
        "Teacher: `{}`.\n",
        m.teacher
            .get("path")
            .and_then(|v| v.as_str())
            .unwrap_or("?")
    );
    let _ = writeln!(s, "Projection: {}.\n", m.projection);
}

/// What a column of the shard schema holds.
fn column_meaning(name: &str) -> &'static str {
    match name {
        "label" => "gold label of `original` rows; null for augmented rows (use `teacher_logits`)",
        "idx" => "`idx` of the source example in the GLUE split",
        "method" => "original, augpro_mix, augpro_fgsm, token_replace, mixup or fgsm",
        "virtual" => "true for `mixup` and `fgsm` rows (the `virtual` config): their `teacher_logits` belong to a point in embedding space, not to `input_ids`",
        "copy" => "copy number of this method's row for the source",
        "partner_idx" => "`idx` of the mixing partner (augpro_mix, mixup)",
        "lambda" => "mixing weight of the source (sequence-level λ)",
        "epsilon" => "FGSM step size",
        "input_ids" => "token ids (with [CLS]/[SEP]) of the row",
        "token_type_ids" => "segment ids",
        "changed_tokens" => "positions whose token differs from the source (projected methods)",
        "teacher_logits" => "teacher logits on exactly this row's input",
        "partner_input_ids" => "partner tokens, to rebuild a MixUp point: λ·E(input_ids) + (1-λ)·E(partner) position by position within segments",
        "partner_token_type_ids" => "partner segment ids (mixup)",
        "perturbation" => "FGSM gradient signs, row-major [len × hidden]: the virtual input is E(input_ids) + ε·perturbation",
        "lambdas" => "per-position mixing weights of the source (mixup with `lambda_mode = position`; `lambda` is then null)",
        _ => "display decode of `input_ids` (special tokens dropped, word pieces joined); lossy: `input_ids` is the truth",
    }
}

/// The schema table and how virtual rows are rebuilt.
fn schema_table(s: &mut String, schema: &ShardSchema) {
    let _ = writeln!(s, "## Schema\n\n| column | type | meaning |\n|---|---|---|");
    for f in schema.schema.fields() {
        let ty = if f.name() == "label" && !schema.regression {
            format!("ClassLabel ({})", schema.label_names.join(", "))
        } else {
            f.data_type().to_string()
        };
        let _ = writeln!(
            s,
            "| `{}` | {ty} | {} |",
            f.name(),
            column_meaning(f.name())
        );
    }
    let _ = writeln!(
        s,
        "\n`mixup` and `fgsm` rows are virtual inputs that no tokenizer produces: their `input_ids` are the \
         source's, and the student rebuilds the input in its own embedding space from `partner_input_ids` \
         and `lambda` (or `lambdas`), or from `perturbation` and `epsilon`. The teacher's logits were computed at that point \
         in the teacher's embedding space.\n"
    );
}

/// The two configs (real token rows, virtual rows) and the methods in each.
fn configs(s: &mut String, m: &Manifest) {
    let listed = |virt: bool| -> Vec<String> {
        m.method_rows
            .keys()
            .filter(|k| is_virtual(k) == virt)
            .map(|k| format!("`{k}`"))
            .collect()
    };
    let virt = listed(true);
    let _ = writeln!(
        s,
        "## Configs\n\n- `default` (`data/train-*.parquet`): real token rows ({}). Text or `input_ids` with \
         `teacher_logits` train a student directly.\n- `virtual` (`data/virtual-*.parquet`): {} rows, with \
         `virtual` = true. Their text and `input_ids` are the source's; train on them only by rebuilding the \
         virtual input as described above.\n",
        listed(false).join(", "),
        if virt.is_empty() {
            "no".to_string()
        } else {
            virt.join(", ")
        }
    );
}

/// Loading snippets, the integrity check, the license and the citations.
fn loading_and_license(s: &mut String, m: &Manifest) {
    let _ = writeln!(s, "## Loading\n\nFrom this directory (or a local copy of the repository):\n\n```python\n{}```\n", LOADING);
    let _ = writeln!(
        s,
        "Check integrity with `augpro verify <this directory>`; `manifest.json` has the full configuration, \
         the source files' and the teacher checkpoint's sha256, the teacher's metrics, and every shard file's sha256.\n"
    );
    if is_described(m) {
        let _ = writeln!(
            s,
            "## License and citation\n\nThe rows derive from the dataset `{}`; its terms apply. Cite it and AugPro:\n\n```bibtex\n{}```",
            m.task,
            AUGPRO_CITATION
        );
        return;
    }
    let _ = writeln!(
        s,
        "## License and citation\n\nThe rows derive from GLUE `{}` (`{SOURCE_DATASET}` on the Hub); the terms of \
         that task's original corpus apply, as listed by the GLUE benchmark. Cite GLUE, the task's corpus and AugPro:\n\n```bibtex\n{GLUE_CITATION}{AUGPRO_CITATION}```",
        m.task
    );
}

/// True when the rows come from a dataset the pipeline file describes, not from GLUE.
fn is_described(m: &Manifest) -> bool {
    m.source.get("format").is_some()
}

/// The rows' source in prose: GLUE `sst2`, or the described dataset's name.
fn source_name(m: &Manifest) -> String {
    if is_described(m) {
        format!("`{}`", m.task)
    } else {
        format!("GLUE `{}`", m.task)
    }
}

/// The dataset on the Hub the rows derive from.
pub const SOURCE_DATASET: &str = "nyu-mll/glue";

/// GLUE's citation.
pub const GLUE_CITATION: &str = r#"@inproceedings{wang2019glue,
  title = {{GLUE}: A Multi-Task Benchmark and Analysis Platform for Natural Language Understanding},
  author = {Wang, Alex and Singh, Amanpreet and Michael, Julian and Hill, Felix and Levy, Omer and Bowman, Samuel R.},
  booktitle = {International Conference on Learning Representations},
  year = {2019}
}
"#;

/// AugPro's citation.
pub const AUGPRO_CITATION: &str = r#"@inproceedings{wang2023augpro,
  title = {Augmentation with Projection: Towards an Effective and Efficient Data Augmentation Paradigm for Distillation},
  author = {Wang, Ziqi and Wu, Yuexin and Liu, Frederick and Liu, Daogao and Hou, Le and Yu, Hongkun and Li, Jing and Ji, Heng},
  booktitle = {International Conference on Learning Representations},
  year = {2023}
}
"#;

/// The card's loading lines, run from the dataset directory (a test executes them).
pub const LOADING: &str = r#"import os
from datasets import load_dataset
here = os.path.abspath(".")                          # this directory, or the Hub repo id
real = load_dataset(here, split="train")             # config `default`
virt = load_dataset(here, "virtual", split="train")  # config `virtual`
print(real.features["label"])

import pandas as pd
df = pd.read_parquet("data")                         # every row; `virtual` tells them apart

import polars as pl
lf = pl.scan_parquet("data/train-*.parquet")
print(lf.group_by("method").len().collect())

import pyarrow.parquet as pq
table = pq.read_table("data", filters=[("virtual", "=", False)])

import duckdb
print(duckdb.sql("SELECT method, count(*) FROM 'data/*.parquet' GROUP BY method ORDER BY method"))
"#;

/// YAML front matter: metadata, both configs and their `datasets` features.
fn front_matter(m: &Manifest, schema: &ShardSchema) -> String {
    let mut s = String::from("---\nlicense: other\nlanguage:\n- en\n");
    let _ =
        writeln!(
        s,
        "pretty_name: AugPro distillation data for {}\ntask_categories:\n- text-classification\n\
         source_datasets:\n- {}\nsize_categories:\n- {}\ntags:\n- knowledge-distillation\n\
         - data-augmentation\n- augpro\nconfigs:",
        source_name(m).replace('`', ""),
        if is_described(m) { "original" } else { SOURCE_DATASET },
        size_category(m.rows)
    );
    for (name, glob, default) in [
        ("default", "data/train-*", true),
        ("virtual", "data/virtual-*", false),
    ] {
        let _ = writeln!(
            s,
            "- config_name: {name}\n  data_files:\n  - split: train\n    path: {glob}{}",
            if default { "\n  default: true" } else { "" }
        );
    }
    let _ = writeln!(s, "dataset_info:");
    for name in ["default", "virtual"] {
        let _ = writeln!(s, "- config_name: {name}\n  features:");
        for (col, f) in &schema.features {
            let _ = writeln!(s, "  - name: {col}");
            match f["_type"].as_str() {
                Some("ClassLabel") => {
                    let _ = writeln!(s, "    dtype:\n      class_label:\n        names:");
                    for (i, n) in f["names"].as_array().into_iter().flatten().enumerate() {
                        let _ = writeln!(s, "          '{i}': {n}");
                    }
                }
                Some("Sequence") => {
                    let _ = writeln!(
                        s,
                        "    sequence: {}",
                        f["feature"]["dtype"].as_str().unwrap_or("?")
                    );
                    if let Some(n) = f.get("length") {
                        let _ = writeln!(s, "    length: {n}");
                    }
                }
                _ => {
                    let _ = writeln!(s, "    dtype: {}", f["dtype"].as_str().unwrap_or("?"));
                }
            }
        }
    }
    s.push_str("---\n\n");
    s
}

/// The Hub's size bucket for `n` rows.
fn size_category(n: u64) -> &'static str {
    match n {
        0..1_000 => "n<1K",
        1_000..10_000 => "1K<n<10K",
        10_000..100_000 => "10K<n<100K",
        100_000..1_000_000 => "100K<n<1M",
        1_000_000..10_000_000 => "1M<n<10M",
        _ => "10M<n<100M",
    }
}

/// What a reader of the rows needs to know about how they were made: the dev split held
/// out, offline augmentation, and where AugPro-FGSM's gradient came from.
fn protocol(m: &Manifest) -> String {
    let cfg = &m.config;
    let dev = &cfg["dev"];
    let frac = dev["fraction"].as_f64().unwrap_or(0.0);
    let mut s = if frac > 0.0 {
        format!(
            "- Dev split: the train examples whose `idx` hashes (seed {}) below min({frac}, {} / train rows) \
             are held out: none of them is in these rows or was used to fine-tune the teacher. Tune \
             students on them (`augpro train-student` keeps the best dev checkpoint); score the \
             validation split once.\n",
            dev["seed"].as_u64().unwrap_or(0),
            dev["max_examples"].as_u64().unwrap_or(0),
        )
    } else {
        "- Dev split: none held out (`dev.fraction` = 0).\n".to_string()
    };
    s.push_str(
        "- Offline augmentation: every row was made once, against the teacher, before distillation; \
         it is not regenerated against the current student during training.\n",
    );
    if let Some(f) = cfg["methods"]["augpro_fgsm"].as_object() {
        let step = match (f.get("epsilon").and_then(|v| v.as_f64()), f.get("epsilon_nn").and_then(|v| v.as_f64())) {
            (Some(e), _) => format!("ε = {e} per coordinate"),
            (None, Some(r)) => format!(
                "a step of L2 length {r} × the table's median nearest-neighbour distance (ε = {r}·d/√hidden per coordinate)"
            ),
            _ => "ε as configured".into(),
        };
        let grad = if f.get("student").is_some_and(|v| !v.is_null()) {
            "the gradient of KL(teacher ‖ student) in a first-round student's embedding space, projected with \
             that student's table (the teacher then labels the projected tokens)"
        } else {
            "the gradient of the teacher's cross-entropy against the gold label, in the teacher's embedding space"
        };
        s.push_str(&format!("- AugPro-FGSM: {step}; sign of {grad}.\n"));
    }
    if cfg["methods"]["fgsm"].is_object() {
        s.push_str(
            "- `fgsm` rows hold gradient signs in the teacher's embedding coordinates: a student can rebuild \
             them only with the teacher's own table (the same base model); `augpro train-student` refuses \
             other tables.\n",
        );
    }
    s.trim_end().to_string()
}
