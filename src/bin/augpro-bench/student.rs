//! The student: one `train-student` run of the low preset on SST-2 and on MRPC, its time
//! split by the trainer's stage spans, with the training step's and the evaluations' share
//! of the limit.

use crate::augment_runs::{run_augment, seeded_teacher};
use crate::teacher::flops_per_token;
use crate::{num, secs, Bench};
use anyhow::{Context, Result};
use augpro::config::PipelineConfig;
use augpro::data::SplitReader;
use augpro::model::Checkpoint;
use augpro::task;
use augpro::tokenize::TextTokenizer;
use serde_json::{json, Value};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// The `student` section: one `train-student` run of the low preset on SST-2 and on MRPC,
/// its time split by the trainer's stage spans (setup, data, step, dev, validation,
/// checkpoint), with the training step's and the evaluations' share of the limit.
pub(crate) fn measure(b: &Bench) -> Result<Value> {
    let mut runs = Vec::new();
    for name in ["sst2", "mrpc"] {
        eprintln!("student: {name}…");
        runs.push(student_run(b, name)?);
    }
    Ok(json!({ "matmul_peak_gflops": b.peak_gflops(), "runs": runs }))
}

/// Shards for a student run of `task`: `n` training examples, original + AugPro-Mix, the
/// shipped pipeline's sequence length and dev split, the base encoder with a seeded head as
/// teacher (throughput does not depend on its weights). Returns the shards' directory.
fn student_shards(b: &Bench, task: &'static task::TaskSpec, n: usize) -> Result<PathBuf> {
    let model = &b.model;
    let shipped = PipelineConfig::load(Path::new(&format!("pipelines/{}.toml", task.name)))?;
    let dir = b.tmp.join(format!("student-{}", task.name));
    let teacher = seeded_teacher(model, task, &dir.join("teacher"))?;
    let d = &shipped.dev;
    let toml = format!(
        "name = \"student\"\ntask = \"{}\"\nsplit = \"{}\"\nmax_examples = {n}\nmax_seq_len = {}\nseed = 0\nshards = 1\nbatch_size = 32\noutput = \"{}\"\n\n[dev]\nfraction = {}\nmax_examples = {}\nseed = {}\n\n[teacher]\nmodel = \"{}\"\ncheckpoint = \"{}\"\n\n[methods.augpro_mix]\nalpha = 1.0\nlambda_mode = \"position\"\nlambda_min = 0.35\n",
        task.name, task.train_split, shipped.max_seq_len, dir.join("out").display(), d.fraction, d.max_examples, d.seed, model.display(), teacher.display()
    );
    let p = dir.join("pipeline.toml");
    std::fs::write(&p, toml)?;
    run_augment(&p, b)?;
    Ok(dir.join(format!("out/{}/student", task.name)))
}

/// Real tokens of the dev split (as the trainer scores it) and of the validation splits.
fn eval_tokens(
    glue_dir: &Path,
    task: &'static task::TaskSpec,
    model: &Path,
    dev: &augpro::config::DevConfig,
) -> Result<(usize, usize)> {
    let tok = TextTokenizer::load(model, augpro::teacher::EVAL_MAX_SEQ_LEN)?;
    let count = |ex: Vec<augpro::data::Example>| -> Result<usize> {
        let ex: Vec<_> = ex.into_iter().filter(|e| e.label.is_some()).collect();
        Ok(tok.encode(&ex)?.iter().map(|e| e.ids.len()).sum())
    };
    let dev_ex = SplitReader::open_part(
        glue_dir,
        task,
        &task.train_split,
        dev,
        augpro::data::Part::Dev,
    )?
    .read_all(None)?;
    let mut val = 0;
    for split in &task.validation_splits {
        val += count(SplitReader::open(glue_dir, task, split)?.read_all(None)?)?;
    }
    Ok((count(dev_ex)?, val))
}

/// One low-preset student run of `task_name`, timed by stage.
fn student_run(b: &Bench, task_name: &str) -> Result<Value> {
    use tracing_subscriber::prelude::*;
    let (model, glue_dir, quick) = (&b.model, &b.glue_dir, b.quick);
    let task = task::glue(task_name)?;
    let low = augpro::report::low_student(task_name).context("no low-preset student")?;
    let (lr, layers) = (low.lr, low.layers);
    let steps = if quick { low.steps / 10 } else { low.steps };
    let shards = student_shards(b, task, if quick { 200 } else { low.examples })?;
    let base = augpro::student::StudentConfig::default();
    let cfg = augpro::student::StudentConfig {
        model: model.clone(),
        max_steps: Some(steps),
        layers: Some(layers),
        methods: vec!["original".into(), "augpro_mix".into()],
        optim: augpro::config::OptimConfig {
            lr,
            ..base.optim.clone()
        },
        ..base
    };
    let loc: augpro::storage::Location = shards.as_path().into();
    let dev = augpro::shards::manifest::shard_paths(&loc)?.0.dev()?;
    let sub = tracing_subscriber::registry().with(augpro::timing::SpanTimes);
    let ((m, wall), stages) = tracing::subscriber::with_default(sub, || -> Result<_> {
        augpro::timing::take();
        let r = secs(|| {
            augpro::student::train(&loc, task, glue_dir, &shards.join("run"), &cfg, &b.device)
        })?;
        Ok((r, augpro::timing::take().stages))
    })?;
    let mut student_cfg = Checkpoint::open(model)?.config;
    student_cfg.num_hidden_layers = layers;
    let (dev_tokens, val_tokens) = eval_tokens(glue_dir, task, model, &dev)?;
    let mut v = student_figures(
        &m,
        &stages,
        wall,
        flops_per_token(&student_cfg),
        b.peak_gflops(),
        dev_tokens * m.curve.len() + val_tokens,
    );
    v["task"] = json!(task_name);
    v["layers"] = json!(layers);
    let per_step = m.tokens_seen / m.steps.max(1);
    let gemm = step_gemm_gflops(&student_cfg, per_step, &b.device)?;
    v["step_gemm_tokens"] = json!(per_step);
    v["step_gemm_gflops"] = json!(gemm);
    v["step_gemm_share_of_limit"] = json!(gemm / b.peak_gflops());
    Ok(v)
}

/// The speed of the step's dense-layer GEMMs alone, at its mean batch of `tokens` real
/// tokens: each of a layer's four dense layers forward (the engine's `linear`) and its two
/// backward products (the input's and the weight's gradient, as the layer's backward computes
/// them), on seeded inputs, best of 5; the ceiling for a step that did nothing but its GEMMs.
fn step_gemm_gflops(
    c: &augpro::model::BertConfig,
    tokens: usize,
    device: &candle_core::Device,
) -> Result<f64> {
    use candle_core::{DType, Tensor};
    let (h, i) = (c.hidden_size, c.intermediate_size);
    let shapes = [(h, 3 * h), (h, h), (h, i), (i, h)];
    let mut flops = 0.0;
    let mut layers = Vec::new();
    for (n_in, n_out) in shapes {
        let x = Tensor::randn(0f32, 1.0, (tokens, n_in), device)?;
        let w = Tensor::randn(0f32, 0.05, (n_out, n_in), device)?;
        let bias = Tensor::zeros(n_out, DType::F32, device)?;
        let g = Tensor::randn(0f32, 1.0, (tokens, n_out), device)?;
        flops += 3.0 * 2.0 * (tokens * n_in * n_out) as f64;
        layers.push((x, w, bias, g));
    }
    let pass = || -> Result<()> {
        for (x, w, bias, g) in &layers {
            augpro::model::kernels::linear(x, w, bias, None)?;
            g.matmul(w)?;
            g.t()?.matmul(x)?;
        }
        Ok(())
    };
    pass()?;
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        best = best.min(secs(pass)?.1);
    }
    Ok(flops / best / 1e9)
}

/// A student run's figures: time by stage with shares, the step's and the evaluations'
/// speed against the limit (`fwd` matmul FLOPs per real token; `eval_tokens` real tokens
/// scored by the dev evaluations and validation together).
fn student_figures(
    m: &augpro::student::StudentMetrics,
    stages: &std::collections::BTreeMap<String, f64>,
    wall: f64,
    fwd: f64,
    peak_gflops: f64,
    eval_tokens: usize,
) -> Value {
    let stage = |k: &str| stages.get(k).copied().unwrap_or(0.0);
    let step_gflops = 3.0 * fwd * m.tokens_seen as f64 / stage("step") / 1e9;
    let eval_tps = eval_tokens as f64 / (stage("dev") + stage("validation"));
    let shares: serde_json::Map<String, Value> = stages
        .iter()
        .map(|(k, v)| (k.clone(), json!({ "seconds": v, "share": v / wall })))
        .collect();
    let accounted: f64 = stages.values().sum();
    json!({ "steps": m.steps, "rows_seen": m.rows_seen,
        "tokens_seen": m.tokens_seen, "dev_evaluations": m.curve.len(), "seconds": wall,
        "stages": shares, "other_share": 1.0 - accounted / wall,
        "step_examples_per_s": m.rows_seen as f64 / stage("step"),
        "step_gflops": step_gflops, "step_share_of_limit": step_gflops / peak_gflops,
        "eval_real_tokens": eval_tokens, "eval_real_tokens_per_s": eval_tps,
        "eval_share_of_limit": eval_tps * fwd / (peak_gflops * 1e9) })
}

/// The section's table: per run, the time by stage and the step's and evaluations' speed.
pub(crate) fn markdown(s: &mut String, r: &Value) {
    let Some(st) = r.get("student").filter(|v| !v.is_null()) else {
        return;
    };
    let _ = writeln!(s, "## Student: one `train-student` run of the low preset\n\nOriginal + AugPro-Mix rows of 1,000 training examples (the base encoder with a seeded head as teacher), the low preset's steps, learning rate and layers, 6 dev evaluations and one validation. Time by the trainer's stage spans; the step's limit is the matmul peak over 3× the forward FLOPs of its real tokens, the evaluations' the peak over 1× (validation includes reading and tokenizing its split). `step's GEMMs alone` times only the step's dense-layer products (a layer's four dense layers forward and their two backward products each) at the run's mean batch of real tokens: the ceiling of a step that did nothing else.\n\n| task | layers | steps | seconds | step | data | dev | validation | checkpoint | setup | other | step examples/s | step % of limit | step's GEMMs alone, % of limit | eval real tokens/s | eval % of limit |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for run in st["runs"].as_array().into_iter().flatten() {
        let share = |k: &str| {
            format!(
                "{:.1}%",
                100.0 * run["stages"][k]["share"].as_f64().unwrap_or(0.0)
            )
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.1}% | {} | {:.0}% | {} | {} | {:.0}% |",
            run["task"].as_str().unwrap_or(""),
            run["layers"],
            run["steps"],
            num(&run["seconds"]),
            share("step"),
            share("data"),
            share("dev"),
            share("validation"),
            share("checkpoint"),
            share("setup"),
            100.0 * run["other_share"].as_f64().unwrap_or(f64::NAN),
            num(&run["step_examples_per_s"]),
            100.0 * run["step_share_of_limit"].as_f64().unwrap_or(f64::NAN),
            run["step_gemm_share_of_limit"]
                .as_f64()
                .map_or("–".to_string(), |v| format!("{:.0}%", 100.0 * v)),
            num(&run["eval_real_tokens_per_s"]),
            100.0 * run["eval_share_of_limit"].as_f64().unwrap_or(f64::NAN)
        );
    }
    s.push('\n');
}
