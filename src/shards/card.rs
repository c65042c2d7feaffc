//! The dataset card (`README.md`) written next to the shards.

use super::manifest::Manifest;
use super::schema::ShardSchema;
use std::fmt::Write;

/// Renders the dataset card from the manifest and the schema.
pub fn render(m: &Manifest, schema: &ShardSchema) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "---\nlicense: other\ntask_categories:\n- text-classification\ntags:\n- knowledge-distillation\n- data-augmentation\n- augpro\n---\n");
    let _ = writeln!(
        s,
        "# AugPro distillation data: GLUE `{}` ({} split)\n",
        m.task, m.split
    );
    let _ = writeln!(
        s,
        "Augmented copies of GLUE `{task}` examples for knowledge distillation, each row carrying the \
         teacher's logits on exactly its tokens. Made by augpro {ver} with *Augmentation with Projection* \
         (AugPro, Wang et al., ICLR 2023): interpolations (AugPro-Mix) and gradient-sign perturbations \
         (AugPro-FGSM) of word embeddings are projected back to each position's nearest vocabulary token, \
         so every augmented row is a real token sequence. Baselines are included for comparison: token \
         replacement, and MixUp / FGSM without projection (virtual inputs, see below).\n",
        task = m.task,
        ver = m.augpro_version
    );
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
    let _ = writeln!(s, "## Schema\n\n| column | type | meaning |\n|---|---|---|");
    for f in schema.schema.fields() {
        let meaning = match f.name().as_str() {
            "label" => "gold label of `original` rows; null for augmented rows (use `teacher_logits`)",
            "idx" => "`idx` of the source example in the GLUE split",
            "method" => "original, augpro_mix, augpro_fgsm, token_replace, mixup or fgsm",
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
            _ => "text decoded from `input_ids` (special tokens dropped)",
        };
        let _ = writeln!(s, "| `{}` | {} | {} |", f.name(), f.data_type(), meaning);
    }
    let _ = writeln!(
        s,
        "\n`mixup` and `fgsm` rows are virtual inputs that no tokenizer produces: their `input_ids` are the \
         source's, and the student rebuilds the input in its own embedding space from `partner_input_ids` \
         and `lambda`, or from `perturbation` and `epsilon`. The teacher's logits were computed at that point \
         in the teacher's embedding space.\n"
    );
    let first = m.shards.first().map(|x| x.file.clone()).unwrap_or_default();
    let _ = writeln!(
        s,
        "## Loading\n\n```python\nimport pyarrow.parquet as pq\ntable = pq.read_table(\"{first}\")\n\nimport pandas as pd\ndf = pd.read_parquet(\".\")  # every shard\n\nimport polars as pl\ndf = pl.read_parquet(\"train-*.parquet\")\n\nfrom datasets import load_dataset\nds = load_dataset(\"parquet\", data_files={{\"train\": \"train-*.parquet\"}})\n```\n\nCheck integrity with `augpro verify <this directory>`; `manifest.json` has the full configuration, \
         the teacher checkpoint's sha256 and metrics, and every shard's sha256."
    );
    s
}
