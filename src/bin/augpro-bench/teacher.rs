//! The teacher: forward, forward + backward to the embeddings, and fine-tuning throughput
//! on SST-2 validation, for the engine's CPU kernels and for candle's plain ops (passes
//! interleaved), beside PyTorch and ONNX Runtime on the same batches, and the CPU's bf16
//! forward beside f32.

use crate::{num, python_has, secs, Bench};
use anyhow::Result;
use augpro::data::SplitReader;
use augpro::model::{Checkpoint, Ctx, SeqClassifier};
use augpro::task;
use augpro::teacher::{embedding_grad, GradLoss};
use augpro::tokenize::{Encoded, TextTokenizer};
use augpro::train::{sorted_batches, Batch};
use candle_core::Device;
use serde_json::{json, Value};
use std::fmt::Write as _;
use std::path::Path;

/// SST-2 validation, tokenized, with the passes the section times over it.
struct Inputs<'a> {
    enc: Vec<Encoded>,
    lens: Vec<usize>,
    labels: Vec<f32>,
    pad_id: u32,
    device: &'a Device,
}

impl<'a> Inputs<'a> {
    /// The validation split (its first 256 examples when `quick`).
    fn load(model: &Path, glue_dir: &Path, quick: bool, device: &'a Device) -> Result<Self> {
        let task = task::glue("sst2")?;
        let tok = TextTokenizer::load(model, 128)?;
        let mut ex = SplitReader::open(glue_dir, task, "validation")?.read_all(None)?;
        if quick {
            ex.truncate(256);
        }
        let enc = tok.encode(&ex)?;
        Ok(Self {
            lens: enc.iter().map(|e| e.ids.len()).collect(),
            labels: ex.iter().map(|e| e.label.unwrap_or(0.0)).collect(),
            enc,
            pad_id: tok.pad_id,
            device,
        })
    }

    fn examples(&self) -> usize {
        self.enc.len()
    }

    fn real_tokens(&self) -> usize {
        self.lens.iter().sum()
    }

    fn batch(&self, b: &[usize]) -> Result<Batch> {
        let rows: Vec<_> = b.iter().map(|&i| &self.enc[i]).collect();
        Batch::from_encoded(&rows, self.pad_id, self.device)
    }

    fn labels_of(&self, b: &[usize]) -> Vec<f32> {
        b.iter().map(|&i| self.labels[i]).collect()
    }

    /// Every example's logits, in batches of `bs` sorted by length.
    fn logits(&self, m: &SeqClassifier, bs: usize) -> Result<Vec<Vec<f32>>> {
        let mut out = vec![Vec::new(); self.examples()];
        for b in sorted_batches(&self.lens, bs) {
            let batch = self.batch(&b)?;
            let l = m.forward_ids(&batch.ids, &batch.types, &batch.mask, &mut Ctx::eval())?;
            for (i, row) in b.iter().zip(l.logits.to_vec2::<f32>()?) {
                out[*i] = row;
            }
        }
        Ok(out)
    }

    /// The forward pass over every example.
    fn forward(&self, m: &SeqClassifier, bs: usize) -> Result<()> {
        self.logits(m, bs).map(drop)
    }

    /// Forward and backward to the embeddings over every example.
    fn backward(&self, m: &SeqClassifier, bs: usize) -> Result<()> {
        for b in sorted_batches(&self.lens, bs) {
            let batch = self.batch(&b)?;
            let y = self.labels_of(&b);
            embedding_grad(m, &batch, GradLoss::Labels(&y), false)?
                .1
                .sum_all()?
                .to_scalar::<f32>()?;
        }
        Ok(())
    }

    /// Fine-tuning steps of a fresh trainable model on `batches`, with the CPU kernels `on`
    /// or off.
    fn fine_tune(&self, ck: &Checkpoint, on: bool, batches: &[Vec<usize>]) -> Result<()> {
        augpro::model::kernels::set_enabled(on);
        let loaded = ck.load_classifier(self.device, true, 2, None, 0);
        augpro::model::kernels::set_enabled(true);
        let (m, params) = loaded?;
        let cfg = augpro::config::OptimConfig::default();
        let mut opt = augpro::train::Optim::new(&params, &cfg, batches.len())?;
        let mut ctx = Ctx::train(0).with_table_rows();
        for b in batches {
            let batch = self.batch(b)?;
            let out = m.forward_ids(&batch.ids, &batch.types, &batch.mask, &mut ctx)?;
            let loss = augpro::train::supervised_loss(&out.logits, &self.labels_of(b), false)?;
            opt.backward_step(&loss, &mut ctx)?;
        }
        Ok(())
    }

    /// The batch-32 length-sorted batches, as `bench/runtimes.py` reads them.
    fn runtime_batches(&self) -> Value {
        let batches: Vec<Value> = sorted_batches(&self.lens, 32)
            .iter()
            .map(|b| {
                json!({ "ids": b.iter().map(|&i| &self.enc[i].ids).collect::<Vec<_>>(),
                    "types": b.iter().map(|&i| &self.enc[i].type_ids).collect::<Vec<_>>(),
                    "labels": b.iter().map(|&i| self.labels[i] as i64).collect::<Vec<_>>() })
            })
            .collect();
        json!({ "batches": batches })
    }
}

/// A timed case: the pass, its batch size, its work units (examples), its real tokens and
/// its limit in real tokens/s.
struct Case {
    pass: &'static str,
    batch: usize,
    units: usize,
    tokens: usize,
    limit: f64,
}

/// Teacher forward, forward + backward to the embeddings, and fine-tuning throughput, for
/// the engine with the CPU kernels and for candle's plain ops, passes interleaved so that
/// both see the same machine; each figure is the best of 3 passes.
pub(crate) fn measure(b: &Bench) -> Result<Value> {
    let (model, device, peak_gflops) = (&b.model, &b.device, b.peak_gflops());
    let ck = Checkpoint::open(model)?;
    let inputs = Inputs::load(model, &b.glue_dir, b.quick, device)?;
    let engines: &[(&str, bool)] = if device.is_cpu() {
        &[("kernels", true), ("candle ops", false)]
    } else {
        &[("candle ops", true)]
    };
    let mut models = Vec::new();
    for &(_, on) in engines {
        augpro::model::kernels::set_enabled(on);
        models.push(ck.load_classifier(device, false, 2, None, 0)?.0);
    }
    augpro::model::kernels::set_enabled(true);
    // Fine-tuning: 4 steps of batch 32 from the same length-bucketed order as the teacher's
    // own training.
    let train_batches: Vec<Vec<usize>> = augpro::train::bucketed_batches(&inputs.lens, 32, 0)
        .into_iter()
        .filter(|b| b.len() == 32)
        .take(4)
        .collect();
    let fwd_flops = flops_per_token(&ck.config);
    let limit_fwd = peak_gflops * 1e9 / fwd_flops;
    let cases = cases(&inputs, &train_batches, limit_fwd);
    let mut best = vec![vec![f64::INFINITY; engines.len()]; cases.len()];
    for _ in 0..3 {
        for (ci, case) in cases.iter().enumerate() {
            for (ei, &(_, on)) in engines.iter().enumerate() {
                let m = &models[ei];
                let (_, t) = secs(|| match case.pass {
                    "forward" => inputs.forward(m, case.batch),
                    "fine-tuning step" => inputs.fine_tune(&ck, on, &train_batches),
                    _ => inputs.backward(m, case.batch),
                })?;
                best[ci][ei] = best[ci][ei].min(t);
            }
        }
    }
    let mut rows = Vec::new();
    for (ci, c) in cases.iter().enumerate() {
        for (ei, &(engine, _)) in engines.iter().enumerate() {
            let t = best[ci][ei];
            let tps = c.tokens as f64 / t;
            rows.push(json!({ "pass": c.pass, "batch": c.batch, "engine": engine,
                "examples_per_s": c.units as f64 / t, "real_tokens_per_s": tps,
                "limit_tokens_per_s": c.limit, "share_of_limit": tps / c.limit }));
        }
    }
    let runtimes = other_runtimes(model, &inputs.runtime_batches(), &b.tmp, limit_fwd)?;
    let bf16 = if device.is_cpu() && augpro::precision::cpu_has_bf16() {
        Some(bf16_section(&ck, &inputs, &models[0], best[1][0])?)
    } else {
        None
    };
    let portable = if device.is_cpu() {
        let step = &cases[4];
        debug_assert_eq!(step.pass, "fine-tuning step");
        let gemm = GemmBest {
            forward_secs: best[1][0],
            step_secs: best[4][0],
            step_tokens: step.tokens,
        };
        Some(portable_section(
            &inputs,
            &ck,
            &models[0],
            &train_batches,
            gemm,
        )?)
    } else {
        None
    };
    Ok(
        json!({ "examples": inputs.examples(), "real_tokens": inputs.real_tokens(), "flops_per_token": fwd_flops,
        "matmul_peak_gflops": peak_gflops, "rows": rows, "runtimes": runtimes, "bf16": bf16, "portable": portable }),
    )
}

/// The kernels' own best passes of the same run, for [`portable_section`].
struct GemmBest {
    forward_secs: f64,
    step_secs: f64,
    step_tokens: usize,
}

/// The f32 forward (batch 32) and fine-tuning step with portable products (the same bits
/// on every CPU) beside the kernels' own (`gemm`, the best passes of the same run): speed,
/// best of 3, and how far the forward's logits are.
fn portable_section(
    inputs: &Inputs,
    ck: &Checkpoint,
    m: &SeqClassifier,
    train_batches: &[Vec<usize>],
    gemm: GemmBest,
) -> Result<Value> {
    use augpro::model::kernels::with_portable_products;
    let logits = with_portable_products(|| inputs.logits(m, 32))?;
    let best = |f: &dyn Fn() -> Result<()>| -> Result<f64> {
        let mut t = f64::INFINITY;
        for _ in 0..3 {
            t = t.min(with_portable_products(|| secs(f))?.1);
        }
        Ok(t)
    };
    let forward = best(&|| inputs.forward(m, 32))?;
    let step = best(&|| inputs.fine_tune(ck, true, train_batches))?;
    let max_diff = inputs
        .logits(m, 32)?
        .iter()
        .flatten()
        .zip(logits.iter().flatten())
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    let (tokens, step_tokens) = (inputs.real_tokens() as f64, gemm.step_tokens as f64);
    Ok(
        json!({ "batch": 32, "gemm_tokens_per_s": tokens / gemm.forward_secs,
        "portable_tokens_per_s": tokens / forward, "ratio": gemm.forward_secs / forward,
        "step_gemm_tokens_per_s": step_tokens / gemm.step_secs,
        "step_portable_tokens_per_s": step_tokens / step, "step_ratio": gemm.step_secs / step,
        "max_abs_logit_diff": max_diff }),
    )
}

/// The timed cases: forward at batch 8, 32 and 128, forward + backward at 32, and the
/// fine-tuning steps of `train_batches`.
fn cases(inputs: &Inputs, train_batches: &[Vec<usize>], limit_fwd: f64) -> Vec<Case> {
    let (n, real) = (inputs.examples(), inputs.real_tokens());
    let case = |pass, batch, units, tokens, limit| Case {
        pass,
        batch,
        units,
        tokens,
        limit,
    };
    vec![
        case("forward", 8, n, real, limit_fwd),
        case("forward", 32, n, real, limit_fwd),
        case("forward", 128, n, real, limit_fwd),
        case(
            "forward + backward to embeddings",
            32,
            n,
            real,
            limit_fwd / 2.0,
        ),
        case(
            "fine-tuning step",
            32,
            train_batches.len() * 32,
            train_batches
                .iter()
                .flatten()
                .map(|&i| inputs.lens[i])
                .sum(),
            limit_fwd / 3.0,
        ),
    ]
}

/// The bf16 forward (the checkpoint's parameters in bf16) beside the f32 kernels' model
/// `f32_model`, whose batch-32 forward took `f32_secs`.
fn bf16_section(
    ck: &Checkpoint,
    inputs: &Inputs,
    f32_model: &SeqClassifier,
    f32_secs: f64,
) -> Result<Value> {
    let p = ck
        .params(inputs.device, false, 0)?
        .with_dtype(candle_core::DType::BF16);
    let m16 = SeqClassifier::load(&p, &ck.config, 2)?;
    bf16_rows(
        &inputs.logits(f32_model, 32)?,
        &inputs.logits(&m16, 32)?,
        inputs.real_tokens(),
        f32_secs,
        || inputs.forward(&m16, 32),
    )
}

/// Forward FLOPs per real token of an encoder: two per weight of the layers' matmuls.
pub(crate) fn flops_per_token(c: &augpro::model::BertConfig) -> f64 {
    let (h, i) = (c.hidden_size as f64, c.intermediate_size as f64);
    2.0 * c.num_hidden_layers as f64 * (4.0 * h * h + 2.0 * h * i)
}

/// The CPU's bf16 forward (batch 32) beside the f32 one: speed (best of 3) and how far its
/// logits are from f32's on the same examples.
fn bf16_rows(
    f32_logits: &[Vec<f32>],
    bf16_logits: &[Vec<f32>],
    real_tokens: usize,
    f32_secs: f64,
    forward: impl Fn() -> Result<()>,
) -> Result<Value> {
    let mut t = f64::INFINITY;
    for _ in 0..3 {
        t = t.min(secs(&forward)?.1);
    }
    let argmax = |v: &[f32]| {
        v.iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i)
    };
    let same = f32_logits
        .iter()
        .zip(bf16_logits)
        .filter(|(a, b)| argmax(a) == argmax(b))
        .count();
    let max_diff = f32_logits
        .iter()
        .flatten()
        .zip(bf16_logits.iter().flatten())
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    Ok(
        json!({ "batch": 32, "f32_tokens_per_s": real_tokens as f64 / f32_secs,
        "bf16_tokens_per_s": real_tokens as f64 / t, "speedup": f32_secs / t,
        "examples": f32_logits.len(), "argmax_agreement": same as f64 / f32_logits.len() as f64,
        "max_abs_logit_diff": max_diff }),
    )
}

/// The same forward (and PyTorch's forward + backward) on PyTorch eager and ONNX Runtime
/// (fp32 and dynamic int8) through `bench/runtimes.py`, on the engine's own batch-32
/// length-sorted batches; `null` when the Python packages are missing.
fn other_runtimes(model: &Path, batches: &Value, tmp: &Path, limit_fwd: f64) -> Result<Value> {
    if !python_has("torch, transformers, onnx, onnxruntime") {
        eprintln!("teacher: torch, transformers, onnx or onnxruntime missing (`make peer-deps`); augpro only");
        return Ok(Value::Null);
    }
    std::fs::create_dir_all(tmp)?;
    let file = tmp.join("teacher-batches.json");
    std::fs::write(&file, serde_json::to_vec(batches)?)?;
    let o = std::process::Command::new("python3")
        .arg("bench/runtimes.py")
        .args([model, &file, tmp])
        .args([rayon::current_num_threads().to_string(), "3".into()])
        .output()?;
    anyhow::ensure!(
        o.status.success(),
        "bench/runtimes.py failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let mut v: Value = serde_json::from_slice(o.stdout.trim_ascii())?;
    for row in v["rows"].as_array_mut().into_iter().flatten() {
        let limit = if row["pass"] == "forward" {
            limit_fwd
        } else {
            limit_fwd / 2.0
        };
        row["share_of_limit"] =
            json!(row["real_tokens_per_s"].as_f64().unwrap_or(f64::NAN) / limit);
    }
    Ok(v)
}

/// The section's tables: the engines' rows, the other runtimes and bf16.
pub(crate) fn markdown(s: &mut String, r: &Value) {
    let Some(t) = r.get("teacher").filter(|t| !t.is_null()) else {
        return;
    };
    let _ = writeln!(s, "## Teacher (MiniLM-L6, SST-2 validation, {} examples, {} real tokens)\n\nLimit: the measured matmul peak over the matmul FLOPs per real token ({} MFLOP forward; forward + backward to the embeddings 2×, a fine-tuning step 3×). `kernels` is the engine as shipped on the CPU; `candle ops` is the same model on candle's plain ops, measured in the same run, passes interleaved.\n\n| pass | batch | engine | examples/s | real tokens/s | % of limit |\n|---|---:|---|---:|---:|---:|", t["examples"], t["real_tokens"], num(&json!(t["flops_per_token"].as_f64().unwrap_or(f64::NAN) / 1e6)));
    for row in t["rows"].as_array().into_iter().flatten() {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {:.0}% |",
            row["pass"].as_str().unwrap_or(""),
            row["batch"],
            row["engine"].as_str().unwrap_or(""),
            num(&row["examples_per_s"]),
            num(&row["real_tokens_per_s"]),
            100.0 * row["share_of_limit"].as_f64().unwrap_or(f64::NAN)
        );
    }
    s.push('\n');
    runtimes_markdown(s, t);
    bf16_markdown(s, t);
    portable_markdown(s, t);
}

/// The forward with portable products beside the kernels' own, when measured.
fn portable_markdown(s: &mut String, t: &Value) {
    let Some(p) = t.get("portable").filter(|p| !p.is_null()) else {
        return;
    };
    let f = |k: &str| p[k].as_f64().unwrap_or(f64::NAN);
    let _ = writeln!(
        s,
        "### Portable products\n\nThe dense layers' and attention's products, forward and backward, from `portable_gemm.rs` (the same bits on CPUs with and without AVX-512) instead of the `gemm` crate, batch {}, in the same run (best of 3).\n\n| | gemm crate | portable |\n|---|---:|---:|\n| forward, real tokens/s | {:.0} | {:.0} ({:.2}×) |\n| fine-tuning step, real tokens/s | {:.0} | {:.0} ({:.2}×) |\n| max abs logit difference (forward) | | {:.2e} |\n",
        p["batch"],
        f("gemm_tokens_per_s"),
        f("portable_tokens_per_s"),
        f("ratio"),
        f("step_gemm_tokens_per_s"),
        f("step_portable_tokens_per_s"),
        f("step_ratio"),
        f("max_abs_logit_diff"),
    );
}

/// The teacher's other runtimes beside the engine's batch-32 rows of the same pass.
fn runtimes_markdown(s: &mut String, t: &Value) {
    let Some(rt) = t.get("runtimes").filter(|v| !v.is_null()) else {
        return;
    };
    let ours = |pass: &str| {
        t["rows"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|r| r["pass"] == pass && r["batch"] == 32 && r["engine"] == "kernels")
    };
    let _ = writeln!(s, "Other runtimes on the same batch-32 length-sorted batches, in the same run (`bench/runtimes.py`: torch {}, onnxruntime {}; ONNX Runtime with all graph optimisations):\n\n| engine | pass | real tokens/s | % of limit | augpro engine ÷ this |\n|---|---|---:|---:|---:|", rt["versions"]["torch"].as_str().unwrap_or("?"), rt["versions"]["onnxruntime"].as_str().unwrap_or("?"));
    for row in rt["rows"].as_array().into_iter().flatten() {
        let pass = row["pass"].as_str().unwrap_or("");
        let tps = row["real_tokens_per_s"].as_f64().unwrap_or(f64::NAN);
        let ratio = ours(pass)
            .and_then(|o| o["real_tokens_per_s"].as_f64())
            .map_or("–".into(), |o| format!("{:.2}×", o / tps));
        let _ = writeln!(
            s,
            "| {} | {pass} | {} | {:.0}% | {ratio} |",
            row["engine"].as_str().unwrap_or(""),
            num(&row["real_tokens_per_s"]),
            100.0 * row["share_of_limit"].as_f64().unwrap_or(f64::NAN)
        );
    }
    s.push('\n');
}

/// The teacher's bf16 rows (CPU, `--dtype bf16`), when the CPU has AVX-512 BF16.
fn bf16_markdown(s: &mut String, t: &Value) {
    let Some(b) = t.get("bf16").filter(|b| !b.is_null()) else {
        return;
    };
    let f = |k: &str| b[k].as_f64().unwrap_or(f64::NAN);
    let _ = writeln!(
        s,
        "### bf16 on the CPU (`--dtype bf16`)\n\nThe dense layers multiply in bf16 with f32 accumulation (AVX-512 BF16); the rest stays f32. Forward, batch {}, length-sorted, on the {} SST-2 validation examples, against the f32 kernels in the same run.\n\n| | f32 | bf16 |\n|---|---:|---:|\n| forward, real tokens/s | {:.0} | {:.0} ({:.2}×) |\n| argmax equal to f32 | | {:.2}% |\n| max abs logit difference | | {:.2e} |\n",
        b["batch"],
        b["examples"],
        f("f32_tokens_per_s"),
        f("bf16_tokens_per_s"),
        f("speedup"),
        100.0 * f("argmax_agreement"),
        f("max_abs_logit_diff"),
    );
}
