//! `make bench`: measures every stage against its limit and its alternative, on the real
//! default model and SST-2 data, and writes `bench/results.json` and `bench/results.md`.
//!
//! Sections: matmul peak (the limit: the best GEMM here); projection (exact Flat, FAISS Flat /
//! HNSW / IVF, a candle matmul + argmin) on the MiniLM table and synthetic tables; teacher
//! forward and forward+backward throughput, beside PyTorch and ONNX Runtime (fp32, int8);
//! a student run by stage; end-to-end `augment` per method with the share of time per
//! stage; and peak memory of `augment` as the input grows.

use anyhow::{Context, Result};
use augpro::augment::project::{Metric, Projector};
use augpro::config::PipelineConfig;
use augpro::data::{resolve_glue_dir, SplitReader};
use augpro::model::{Checkpoint, Ctx};
use augpro::task;
use augpro::teacher::{embedding_grad, GradLoss};
use augpro::tokenize::TextTokenizer;
use augpro::train::{sorted_batches, Batch};
use candle_core::{DType, Device, Tensor, D};
use clap::Parser;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Parser, Debug)]
#[command(about = "augpro benchmarks")]
struct Args {
    /// Smaller sizes (a couple of minutes).
    #[arg(long)]
    quick: bool,
    /// Also the 250,000 × 768 synthetic table.
    #[arg(long)]
    large: bool,
    /// Output directory.
    #[arg(long, default_value = "bench")]
    out: PathBuf,
    /// Base model.
    #[arg(long, default_value = "data/models/minilm-l6")]
    model: PathBuf,
    /// cpu or cuda[:N].
    #[arg(long, default_value = "cpu")]
    device: String,
    /// GLUE directory.
    #[arg(long)]
    glue_dir: Option<PathBuf>,
    /// Sections to run (matmul, projection, teacher, student, e2e, peer, memory); all when empty. A partial
    /// run replaces those sections in an existing `results.json` and keeps the others; `render`
    /// alone measures nothing and rewrites `results.md` from `results.json`.
    #[arg(long, value_delimiter = ',', value_parser = ["matmul", "projection", "teacher", "student", "e2e", "peer", "memory", "render"])]
    only: Vec<String>,
}

fn secs<T>(f: impl FnOnce() -> Result<T>) -> Result<(T, f64)> {
    let t = Instant::now();
    let v = f()?;
    Ok((v, t.elapsed().as_secs_f64()))
}

/// The machine's f32 matmul peak: the best of candle's matmul (as the engine's plain ops
/// use it) at 1024³, and the `gemm` crate and OpenBLAS on every thread at 1024³ and 2048³
/// (the CPU; candle alone elsewhere). Each figure is the best of `reps` products.
fn matmul_peak(device: &Device, quick: bool) -> Result<Value> {
    let reps = if quick { 3 } else { 10 };
    let mut rows = vec![json!({ "gemm": "candle matmul", "size": 1024,
        "gflops": candle_gflops(device, 1024, reps)? })];
    if device.is_cpu() {
        let threads = rayon::current_num_threads();
        for n in [1024, 2048] {
            rows.push(
                json!({ "gemm": format!("gemm crate, {threads} threads"), "size": n,
                "gflops": gemm_gflops(n, threads, reps) }),
            );
            rows.push(
                json!({ "gemm": format!("OpenBLAS sgemm, {threads} threads"), "size": n,
                "gflops": openblas_gflops(n, reps) }),
            );
        }
    }
    let best = rows
        .iter()
        .max_by(|a, b| {
            a["gflops"]
                .as_f64()
                .unwrap_or(0.0)
                .total_cmp(&b["gflops"].as_f64().unwrap_or(0.0))
        })
        .cloned()
        .unwrap_or_default();
    Ok(
        json!({ "gflops": best["gflops"], "best": format!("{}, {}³", best["gemm"].as_str().unwrap_or(""), best["size"]), "rows": rows }),
    )
}

/// GFLOP/s of candle's `n³` matmul, the best of `reps`.
fn candle_gflops(device: &Device, n: usize, reps: usize) -> Result<f64> {
    let a = Tensor::randn(0f32, 1.0, (n, n), device)?;
    let b = Tensor::randn(0f32, 1.0, (n, n), device)?;
    let _ = a.matmul(&b)?.sum_all()?.to_scalar::<f32>()?;
    let mut best = f64::INFINITY;
    for _ in 0..reps {
        let (_, t) = secs(|| Ok(a.matmul(&b)?.sum_all()?.to_scalar::<f32>()?))?;
        best = best.min(t);
    }
    Ok(2.0 * (n as f64).powi(3) / best / 1e9)
}

extern "C" {
    /// OpenBLAS's CBLAS sgemm (the library FAISS links).
    fn cblas_sgemm(
        layout: i32,
        trans_a: i32,
        trans_b: i32,
        m: i32,
        n: i32,
        k: i32,
        alpha: f32,
        a: *const f32,
        lda: i32,
        b: *const f32,
        ldb: i32,
        beta: f32,
        c: *mut f32,
        ldc: i32,
    );
}

/// GFLOP/s of OpenBLAS's `n³` sgemm on its threads (as many as rayon's, set at start-up),
/// the best of `reps`.
fn openblas_gflops(n: usize, reps: usize) -> f64 {
    let (a, b) = random_square(n);
    let mut c = vec![0f32; n * n];
    let ni = n as i32;
    let mut best = f64::INFINITY;
    for _ in 0..reps + 1 {
        let t = Instant::now();
        // SAFETY: `a`, `b` and `c` are n × n row-major buffers (CblasRowMajor = 101,
        // CblasNoTrans = 111) of their full size.
        unsafe {
            cblas_sgemm(
                101,
                111,
                111,
                ni,
                ni,
                ni,
                1.0,
                a.as_ptr(),
                ni,
                b.as_ptr(),
                ni,
                0.0,
                c.as_mut_ptr(),
                ni,
            );
        }
        best = best.min(t.elapsed().as_secs_f64());
    }
    std::hint::black_box(&c);
    2.0 * (n as f64).powi(3) / best / 1e9
}

/// Two seeded `n × n` matrices.
fn random_square(n: usize) -> (Vec<f32>, Vec<f32>) {
    let mut r = ChaCha8Rng::seed_from_u64(3);
    let a: Vec<f32> = (0..n * n).map(|_| r.gen_range(-1.0f32..1.0)).collect();
    let b: Vec<f32> = (0..n * n).map(|_| r.gen_range(-1.0f32..1.0)).collect();
    (a, b)
}

/// GFLOP/s of the `gemm` crate's `n³` f32 product on `threads` rayon threads, the best of
/// `reps`.
fn gemm_gflops(n: usize, threads: usize, reps: usize) -> f64 {
    let (a, b) = random_square(n);
    let mut c = vec![0f32; n * n];
    let mut best = f64::INFINITY;
    for _ in 0..reps + 1 {
        let t = Instant::now();
        // SAFETY: `a`, `b` and `c` are n × n row-major buffers of their full size.
        unsafe {
            gemm::gemm(
                n,
                n,
                n,
                c.as_mut_ptr(),
                1,
                n as isize,
                false,
                a.as_ptr(),
                1,
                n as isize,
                b.as_ptr(),
                1,
                n as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::Rayon(threads),
            );
        }
        best = best.min(t.elapsed().as_secs_f64());
    }
    std::hint::black_box(&c);
    2.0 * (n as f64).powi(3) / best / 1e9
}

fn projection_case(
    name: &str,
    table: &[f32],
    dim: usize,
    nq: usize,
    device: &Device,
) -> Result<Value> {
    let n = table.len() / dim;
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let mut q = Vec::with_capacity(nq * dim);
    for _ in 0..nq {
        let r = rng.gen_range(0..n);
        q.extend(
            table[r * dim..(r + 1) * dim]
                .iter()
                .map(|&x| x + rng.gen_range(-0.05f32..0.05)),
        );
    }
    let keep = |_: u32| true;
    let flops = 2.0 * n as f64 * dim as f64 * nq as f64;
    let (mut flat, build_flat) = secs(|| Projector::build(table, dim, keep, "Flat", Metric::L2))?;
    // `Flat` L2 search is augpro's blocked GEMM + exact re-rank; FAISS's IndexFlatL2 is the
    // same index searched through FAISS.
    let (exact, t_flat) = secs(|| flat.nearest(&q))?;
    let (faiss_flat, t_faiss) = secs(|| Ok(flat.search(&q, 1)?.0))?;
    let faiss_agree = faiss_flat
        .iter()
        .zip(&exact)
        .filter(|(a, b)| a == b)
        .count() as f64
        / nq as f64;
    let mut rows = vec![
        json!({ "index": "Flat (exact: GEMM + re-rank)", "build_s": build_flat, "qps": nq as f64 / t_flat, "gflops": flops / t_flat / 1e9, "recall_at_1": 1.0 }),
        json!({ "index": "FAISS IndexFlatL2", "build_s": build_flat, "qps": nq as f64 / t_faiss, "gflops": flops / t_faiss / 1e9, "recall_at_1": faiss_agree }),
    ];
    let ivf = ivf_factory(n);
    let mut approx = vec![("HNSW32", "efSearch=64"), (ivf.as_str(), "nprobe=16")];
    if n > 100_000 {
        // HNSW is built on one thread (deterministic); at this size that takes over half an hour.
        approx.remove(0);
    }
    for (factory, params) in approx {
        let (mut p, build) =
            secs(|| Projector::build_with(table, dim, keep, factory, Metric::L2, Some(params)))?;
        let (got, t) = secs(|| p.nearest(&q))?;
        let recall = got.iter().zip(&exact).filter(|(a, b)| a == b).count() as f64 / nq as f64;
        rows.push(json!({ "index": format!("{factory} ({params})"), "build_s": build, "qps": nq as f64 / t, "recall_at_1": recall }));
    }
    // Brute force with candle: argmin over ||t||² - 2·q·t.
    let tt = Tensor::from_slice(table, (n, dim), device)?;
    let norms = tt.sqr()?.sum(D::Minus1)?;
    let qt = Tensor::from_slice(&q, (nq, dim), device)?;
    let (ids, t_mm) = secs(|| {
        let mut all = Vec::with_capacity(nq);
        for chunk in 0..nq.div_ceil(512) {
            let qc = qt.narrow(0, chunk * 512, 512.min(nq - chunk * 512))?;
            let d = norms
                .unsqueeze(0)?
                .broadcast_sub(&(qc.matmul(&tt.t()?)? * 2.0)?)?;
            all.extend(
                d.argmin(D::Minus1)?
                    .to_dtype(DType::U32)?
                    .to_vec1::<u32>()?,
            );
        }
        Ok(all)
    })?;
    let agree = ids.iter().zip(&exact).filter(|(a, b)| a == b).count() as f64 / nq as f64;
    rows.push(json!({ "index": "candle matmul + argmin", "build_s": 0.0, "qps": nq as f64 / t_mm, "gflops": flops / t_mm / 1e9, "recall_at_1": agree }));
    Ok(json!({ "table": name, "rows": n, "dim": dim, "queries": nq, "results": rows }))
}

fn ivf_factory(n: usize) -> String {
    let nlist = ((n as f64).sqrt() * 4.0).round() as usize;
    format!("IVF{},Flat", nlist.next_power_of_two().min(4096))
}

/// Forward FLOPs per real token of an encoder: two per weight of the layers' matmuls.
fn flops_per_token(c: &augpro::model::BertConfig) -> f64 {
    let (h, i) = (c.hidden_size as f64, c.intermediate_size as f64);
    2.0 * c.num_hidden_layers as f64 * (4.0 * h * h + 2.0 * h * i)
}

/// Teacher forward, forward + backward to the embeddings, and fine-tuning throughput, for
/// the engine with the CPU kernels and for candle's plain ops, passes interleaved so that
/// both see the same machine; each figure is the best of 3 passes.
fn teacher_speed(
    model: &Path,
    glue_dir: &Path,
    device: &Device,
    quick: bool,
    peak_gflops: f64,
    tmp: &Path,
) -> Result<Value> {
    let task = task::glue("sst2")?;
    let ck = Checkpoint::open(model)?;
    let tok = TextTokenizer::load(model, 128)?;
    let mut ex = SplitReader::open(glue_dir, task, "validation")?.read_all(None)?;
    if quick {
        ex.truncate(256);
    }
    let enc = tok.encode(&ex)?;
    let lens: Vec<usize> = enc.iter().map(|e| e.ids.len()).collect();
    let real: usize = lens.iter().sum();
    let labels: Vec<f32> = ex.iter().map(|e| e.label.unwrap_or(0.0)).collect();
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
    let batch_of = |b: &[usize]| -> Result<Batch> {
        let rows: Vec<_> = b.iter().map(|&i| &enc[i]).collect();
        Batch::from_encoded(&rows, tok.pad_id, device)
    };
    let forward = |m: &augpro::model::SeqClassifier, bs: usize| -> Result<()> {
        for b in sorted_batches(&lens, bs) {
            let batch = batch_of(&b)?;
            m.forward_ids(&batch.ids, &batch.types, &batch.mask, &mut Ctx::eval())?
                .logits
                .to_vec2::<f32>()?;
        }
        Ok(())
    };
    let backward = |m: &augpro::model::SeqClassifier, bs: usize| -> Result<()> {
        for b in sorted_batches(&lens, bs) {
            let batch = batch_of(&b)?;
            let y: Vec<f32> = b.iter().map(|&i| labels[i]).collect();
            embedding_grad(m, &batch, GradLoss::Labels(&y), false)?
                .1
                .sum_all()?
                .to_scalar::<f32>()?;
        }
        Ok(())
    };
    // Fine-tuning: a fresh trainable model per pass, 4 steps of batch 32 from the same
    // length-bucketed order as the teacher's own training.
    let train_steps = 4;
    let train_batches: Vec<Vec<usize>> = augpro::train::bucketed_batches(&lens, 32, 0)
        .into_iter()
        .filter(|b| b.len() == 32)
        .take(train_steps)
        .collect();
    let train_examples = train_batches.len() * 32;
    let train_tokens: usize = train_batches.iter().flatten().map(|&i| lens[i]).sum();
    let fine_tune = |on: bool| -> Result<()> {
        augpro::model::kernels::set_enabled(on);
        let (m, params) = ck.load_classifier(device, true, 2, None, 0)?;
        augpro::model::kernels::set_enabled(true);
        let cfg = augpro::config::OptimConfig::default();
        let mut opt = augpro::train::Optim::new(&params, &cfg, train_steps)?;
        let mut ctx = Ctx::train(0);
        for b in &train_batches {
            let batch = batch_of(b)?;
            let y: Vec<f32> = b.iter().map(|&i| labels[i]).collect();
            let out = m.forward_ids(&batch.ids, &batch.types, &batch.mask, &mut ctx)?;
            opt.backward_step(&augpro::train::supervised_loss(&out.logits, &y, false)?)?;
        }
        Ok(())
    };
    let fwd_flops = flops_per_token(&ck.config);
    let limit_fwd = peak_gflops * 1e9 / fwd_flops;
    // (pass, batch, work units, real tokens, limit in tokens/s)
    let cases: Vec<(&str, usize, usize, usize, f64)> = vec![
        ("forward", 8, ex.len(), real, limit_fwd),
        ("forward", 32, ex.len(), real, limit_fwd),
        ("forward", 128, ex.len(), real, limit_fwd),
        (
            "forward + backward to embeddings",
            32,
            ex.len(),
            real,
            limit_fwd / 2.0,
        ),
        (
            "fine-tuning step",
            32,
            train_examples,
            train_tokens,
            limit_fwd / 3.0,
        ),
    ];
    let mut best = vec![vec![f64::INFINITY; engines.len()]; cases.len()];
    for _ in 0..3 {
        for (ci, &(pass, bs, ..)) in cases.iter().enumerate() {
            for (ei, &(_, on)) in engines.iter().enumerate() {
                let m = &models[ei];
                let (_, t) = secs(|| match pass {
                    "forward" => forward(m, bs),
                    "fine-tuning step" => fine_tune(on),
                    _ => backward(m, bs),
                })?;
                best[ci][ei] = best[ci][ei].min(t);
            }
        }
    }
    let mut rows = Vec::new();
    for (ci, &(pass, bs, units, tokens, limit)) in cases.iter().enumerate() {
        for (ei, &(engine, _)) in engines.iter().enumerate() {
            let t = best[ci][ei];
            let tps = tokens as f64 / t;
            rows.push(json!({ "pass": pass, "batch": bs, "engine": engine,
                "examples_per_s": units as f64 / t, "real_tokens_per_s": tps,
                "limit_tokens_per_s": limit, "share_of_limit": tps / limit }));
        }
    }
    let batches: Vec<Value> = sorted_batches(&lens, 32)
        .iter()
        .map(|b| {
            json!({ "ids": b.iter().map(|&i| &enc[i].ids).collect::<Vec<_>>(),
                "types": b.iter().map(|&i| &enc[i].type_ids).collect::<Vec<_>>(),
                "labels": b.iter().map(|&i| labels[i] as i64).collect::<Vec<_>>() })
        })
        .collect();
    let runtimes = other_runtimes(model, &json!({ "batches": batches }), tmp, limit_fwd)?;
    let bf16 = if device.is_cpu() && augpro::precision::cpu_has_bf16() {
        let f32_secs = best[1][0];
        let logits = |m: &augpro::model::SeqClassifier| -> Result<Vec<Vec<f32>>> {
            let mut out = vec![Vec::new(); ex.len()];
            for b in sorted_batches(&lens, 32) {
                let batch = batch_of(&b)?;
                let l = m.forward_ids(&batch.ids, &batch.types, &batch.mask, &mut Ctx::eval())?;
                for (i, row) in b.iter().zip(l.logits.to_vec2::<f32>()?) {
                    out[*i] = row;
                }
            }
            Ok(out)
        };
        let p = ck
            .params(device, false, 0)?
            .with_dtype(candle_core::DType::BF16);
        let m16 = augpro::model::SeqClassifier::load(&p, &ck.config, 2)?;
        Some(bf16_rows(
            &logits(&models[0])?,
            &logits(&m16)?,
            real,
            f32_secs,
            || forward(&m16, 32),
        )?)
    } else {
        None
    };
    Ok(
        json!({ "examples": ex.len(), "real_tokens": real, "flops_per_token": fwd_flops,
        "matmul_peak_gflops": peak_gflops, "rows": rows, "runtimes": runtimes, "bf16": bf16 }),
    )
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
    let has = std::process::Command::new("python3")
        .args(["-c", "import torch, transformers, onnx, onnxruntime"])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !has {
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

fn bench_pipeline(dir: &Path, name: &str, examples: usize, methods: &str) -> Result<PathBuf> {
    let smoke = std::fs::read_to_string("pipelines/smoke.toml").context("pipelines/smoke.toml")?;
    let head: String = smoke
        .lines()
        .take_while(|l| !l.starts_with("[methods"))
        .collect::<Vec<_>>()
        .join("\n");
    let text = head
        .replace("name = \"smoke\"", &format!("name = \"{name}\""))
        .replace("max_examples = 64", &format!("max_examples = {examples}"))
        .replace("shards = 2", "shards = 1")
        .replace("batch_size = 16", "batch_size = 32")
        .replace(
            "output = \"out\"",
            &format!("output = \"{}\"", dir.join("out").display()),
        );
    let p = dir.join(format!("{name}.toml"));
    std::fs::create_dir_all(dir)?;
    std::fs::write(&p, format!("{text}\n{methods}"))?;
    PipelineConfig::load(&p)?;
    Ok(p)
}

/// A pipeline on a described CSV (`id,review,sentiment`, string labels) whose train file
/// has `rows` rows (SST-2's train sentences over and over) and 16 source examples to
/// augment: the class-name scan, the dev split and the source hash stream every row.
fn described_csv_pipeline(tmp: &Path, glue_dir: &Path, rows: usize) -> Result<PathBuf> {
    use std::io::Write;
    let dir = tmp.join(format!("csv{rows}"));
    std::fs::create_dir_all(&dir)?;
    let task = task::glue("sst2")?;
    for (split, n) in [("train", rows), ("validation", 200)] {
        let ex = SplitReader::open(glue_dir, task, split)?.read_all(None)?;
        let mut w =
            std::io::BufWriter::new(std::fs::File::create(dir.join(format!("{split}.csv")))?);
        writeln!(w, "id,review,sentiment")?;
        for (i, e) in ex.iter().cycle().take(n).enumerate() {
            let word = ["negative", "positive"][e.label.unwrap_or(0.0) as usize];
            writeln!(w, "{i},\"{}\",{word}", e.text_a.replace('"', "\"\""))?;
        }
        w.flush()?;
    }
    let p = bench_pipeline(&dir, "described", 16, "")?;
    let text = std::fs::read_to_string(&p)?.replace("task = \"sst2\"", "task = \"reviews\"")
        + &format!(
            "\n[data]\nsource = {:?}\nsplits = {{ train = \"train.csv\", validation = \"validation.csv\" }}\n\
             text = [\"review\"]\nlabel = \"sentiment\"\n",
            dir.display().to_string()
        );
    std::fs::write(&p, text)?;
    PipelineConfig::load(&p)?;
    Ok(p)
}

/// Runs `augpro augment` as a child; returns (wall seconds, peak RSS in MiB).
fn run_augment(pipeline: &Path, glue_dir: &Path, device: &str) -> Result<(f64, f64)> {
    run_augment_as(pipeline, glue_dir, device, "f32")
}

/// Token ids of every row of a dataset, by (method, source idx, copy).
fn token_rows(dir: &Path) -> Result<std::collections::HashMap<(String, i64, u32), Vec<u32>>> {
    use augpro::shards::{manifest::read_manifest, reader::ShardReader, ShardSchema};
    let loc: augpro::storage::Location = dir.into();
    let m = read_manifest(&loc)?;
    let schema = ShardSchema::new(augpro::data::manifest_task(&m)?);
    let mut out = std::collections::HashMap::new();
    for f in m.shards.iter().flat_map(|s| &s.files) {
        let mut r = ShardReader::open(&loc.join(&f.file), &schema)?;
        while let Some(rows) = r.next_rows(&schema)? {
            for row in rows {
                out.insert((row.method.to_string(), row.idx, row.copy), row.input_ids);
            }
        }
    }
    Ok(out)
}

/// Per augmented method, the share of `b`'s rows whose tokens equal `a`'s row of the same
/// method, source and copy (a row only one side kept counts as different).
fn identical_rows(a: &Path, b: &Path) -> Result<Value> {
    let (a, b) = (token_rows(a)?, token_rows(b)?);
    let mut per: std::collections::BTreeMap<String, (usize, usize)> = Default::default();
    for (k, ids) in &b {
        if k.0 == "original" {
            continue;
        }
        let e = per.entry(k.0.clone()).or_default();
        e.1 += 1;
        e.0 += usize::from(a.get(k) == Some(ids));
    }
    Ok(json!(per
        .into_iter()
        .map(|(m, (same, all))| (m, json!(same as f64 / all.max(1) as f64)))
        .collect::<serde_json::Map<_, _>>()))
}

/// The first shard's entry of an `augment` run's `timings.json` (the bench runs one shard).
fn shard_timings(path: &Path) -> Result<Value> {
    let timings: Value = serde_json::from_slice(&std::fs::read(path)?)?;
    Ok(timings
        .as_object()
        .and_then(|o| o.values().next())
        .cloned()
        .unwrap_or_default())
}

/// [`run_augment`] with the teacher in `dtype`.
fn run_augment_as(
    pipeline: &Path,
    glue_dir: &Path,
    device: &str,
    dtype: &str,
) -> Result<(f64, f64)> {
    let exe = std::env::current_exe()?.with_file_name("augpro");
    let t = Instant::now();
    let mut child = std::process::Command::new(&exe)
        .args([
            "-q",
            "augment",
            pipeline.to_str().unwrap(),
            "--force",
            "--device",
            device,
            "--dtype",
            dtype,
        ])
        .env("AUGPRO_GLUE_DIR", glue_dir)
        .stdout(std::process::Stdio::null())
        .spawn()
        .with_context(|| {
            format!(
                "{}: cannot start (build it with `cargo build --release`)",
                exe.display()
            )
        })?;
    // Peak RSS is the child's own VmHWM, polled until it exits. (`wait4`'s ru_maxrss would
    // also count this process's RSS at fork time, which Linux carries across exec.)
    let status_file = format!("/proc/{}/status", child.id());
    let mut hwm_kib = 0u64;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if let Some(v) = std::fs::read_to_string(&status_file).ok().and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        }) {
            hwm_kib = hwm_kib.max(v);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    anyhow::ensure!(
        status.success(),
        "augment failed for {}",
        pipeline.display()
    );
    Ok((t.elapsed().as_secs_f64(), hwm_kib as f64 / 1024.0))
}

/// The `peer` job: `augment` and `bench/peer.py` (transformers + faiss-cpu + pyarrow) on the
/// same 1,000 SST-2 training examples, original + AugPro-Mix + AugPro-FGSM, exact L2
/// projection, one shard, the same teacher. The teacher is the base encoder with a seeded
/// classification head: throughput does not depend on its weights.
fn peer(model: &Path, glue_dir: &Path, dir: &Path, device: &str, quick: bool) -> Result<Value> {
    let n = if quick { 256 } else { 1000 };
    let task = task::glue("sst2")?;
    let teacher = dir.join("peer-teacher");
    let ck = Checkpoint::open(model)?;
    let (_, params) = ck.load_classifier(&Device::Cpu, true, 2, None, 0)?;
    let names: Vec<String> = task.label_names.iter().map(|s| s.to_string()).collect();
    augpro::model::checkpoint::save_classifier(
        &teacher, &params, &ck.config, 2, task, &names, model,
    )?;
    let toml = format!(
        "name = \"peer\"\ntask = \"sst2\"\nsplit = \"train\"\nmax_examples = {n}\nmax_seq_len = 66\nseed = 0\nshards = 1\nbatch_size = 32\noutput = \"{}\"\n\n[teacher]\nmodel = \"{}\"\ncheckpoint = \"{}\"\n\n[projection]\nindex = \"Flat\"\nmetric = \"l2\"\n\n[methods.augpro_mix]\nalpha = 1.0\nlambda_mode = \"position\"\nlambda_min = 0.35\n\n[methods.augpro_fgsm]\nepsilon_nn = {eps_nn}\n\n[dev]\nfraction = 0.0\n",
        dir.join("out").display(),
        model.display(),
        teacher.display(),
        // The Python peer's per-coordinate ε = 0.2 × median nearest-neighbour distance.
        eps_nn = 0.2 * (ck.config.hidden_size as f64).sqrt()
    );
    // Each dtype writes its own dataset (`peer`, `peer-bf16`), to compare their rows.
    let run = |dtype: &str| -> Result<(f64, Value)> {
        let name = if dtype == "f32" {
            "peer".to_string()
        } else {
            format!("peer-{dtype}")
        };
        let p = dir.join(format!("{name}.toml"));
        std::fs::write(
            &p,
            toml.replacen("name = \"peer\"", &format!("name = \"{name}\""), 1),
        )?;
        let (wall, rss) = run_augment_as(&p, glue_dir, device, dtype)?;
        let shard = shard_timings(&dir.join(format!("out/sst2/{name}/timings.json")))?;
        let work = shard["seconds"].as_f64().unwrap_or(f64::NAN);
        let stages = shard["stage_seconds"].clone();
        Ok((
            work,
            json!({ "work_seconds": work, "process_seconds": wall,
            "examples_per_s": n as f64 / work, "peak_rss_mib": rss, "stage_seconds": stages }),
        ))
    };
    let bf16 = (device == "cpu" && augpro::precision::cpu_has_bf16())
        .then(|| run("bf16"))
        .transpose()?;
    let (work, f32_row) = run("f32")?;
    let mut out = json!({ "examples": n, "augpro": f32_row });
    if let Some((_, row)) = &bf16 {
        out["augpro_bf16"] = row.clone();
        out["bf16_identical_rows"] =
            identical_rows(&dir.join("out/sst2/peer"), &dir.join("out/sst2/peer-bf16"))?;
    }
    let has_peer = std::process::Command::new("python3")
        .args(["-c", "import torch, transformers, faiss, pyarrow"])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !has_peer {
        eprintln!(
            "peer: torch, transformers or faiss-cpu missing (`make peer-deps`); augpro side only"
        );
        return Ok(out);
    }
    let data = glue_dir.join("sst2/train-00000-of-00001.parquet");
    let t = Instant::now();
    let o = std::process::Command::new("python3")
        .arg("bench/peer.py")
        .args([&teacher, &data, &dir.join("peer.parquet")])
        .args([
            n.to_string(),
            rayon::current_num_threads().to_string(),
            "0.2".into(),
            "0.35".into(),
        ])
        .output()?;
    anyhow::ensure!(
        o.status.success(),
        "bench/peer.py failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let wall = t.elapsed().as_secs_f64();
    let py: Value = serde_json::from_slice(o.stdout.trim_ascii())?;
    let py_work = py["work_seconds"].as_f64().unwrap_or(f64::NAN);
    out["python"] = json!({ "work_seconds": py_work, "process_seconds": wall,
        "examples_per_s": n as f64 / py_work });
    out["speedup_work"] = json!(py_work / work);
    if let Some((w, _)) = bf16 {
        out["speedup_work_bf16"] = json!(py_work / w);
    }
    Ok(out)
}

/// The `student` section: one `train-student` run of the low preset on SST-2 and on MRPC,
/// its time split by the trainer's stage spans (setup, data, step, dev, validation,
/// checkpoint), with the training step's and the evaluations' share of the limit.
fn student_speed(
    model: &Path,
    glue_dir: &Path,
    tmp: &Path,
    device: &str,
    quick: bool,
    peak_gflops: f64,
) -> Result<Value> {
    let mut runs = Vec::new();
    for name in ["sst2", "mrpc"] {
        eprintln!("student: {name}…");
        runs.push(student_run(
            model,
            glue_dir,
            tmp,
            device,
            quick,
            peak_gflops,
            name,
        )?);
    }
    Ok(json!({ "matmul_peak_gflops": peak_gflops, "runs": runs }))
}

/// Shards for a student run of `task`: `n` training examples, original + AugPro-Mix, the
/// shipped pipeline's sequence length and dev split, the base encoder with a seeded head as
/// teacher (throughput does not depend on its weights). Returns the shards' directory.
fn student_shards(
    model: &Path,
    glue_dir: &Path,
    tmp: &Path,
    device: &str,
    task: &'static task::TaskSpec,
    n: usize,
) -> Result<PathBuf> {
    let shipped = PipelineConfig::load(Path::new(&format!("pipelines/{}.toml", task.name)))?;
    let dir = tmp.join(format!("student-{}", task.name));
    let teacher = dir.join("teacher");
    let ck = Checkpoint::open(model)?;
    let (_, params) = ck.load_classifier(&Device::Cpu, true, task.num_labels, None, 0)?;
    let names: Vec<String> = task.label_names.iter().map(|s| s.to_string()).collect();
    augpro::model::checkpoint::save_classifier(
        &teacher,
        &params,
        &ck.config,
        task.num_labels,
        task,
        &names,
        model,
    )?;
    let d = &shipped.dev;
    let toml = format!(
        "name = \"student\"\ntask = \"{}\"\nsplit = \"{}\"\nmax_examples = {n}\nmax_seq_len = {}\nseed = 0\nshards = 1\nbatch_size = 32\noutput = \"{}\"\n\n[dev]\nfraction = {}\nmax_examples = {}\nseed = {}\n\n[teacher]\nmodel = \"{}\"\ncheckpoint = \"{}\"\n\n[methods.augpro_mix]\nalpha = 1.0\nlambda_mode = \"position\"\nlambda_min = 0.35\n",
        task.name, task.train_split, shipped.max_seq_len, dir.join("out").display(), d.fraction, d.max_examples, d.seed, model.display(), teacher.display()
    );
    let p = dir.join("pipeline.toml");
    std::fs::write(&p, toml)?;
    run_augment(&p, glue_dir, device)?;
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
fn student_run(
    model: &Path,
    glue_dir: &Path,
    tmp: &Path,
    device: &str,
    quick: bool,
    peak_gflops: f64,
    task_name: &str,
) -> Result<Value> {
    use tracing_subscriber::prelude::*;
    let task = task::glue(task_name)?;
    let low = augpro::report::low_student(task_name).context("no low-preset student")?;
    let (lr, layers) = (low.lr, low.layers);
    let steps = if quick { low.steps / 10 } else { low.steps };
    let shards = student_shards(
        model,
        glue_dir,
        tmp,
        device,
        task,
        if quick { 200 } else { low.examples },
    )?;
    let base = augpro::student::StudentConfig::default();
    let cfg = augpro::student::StudentConfig {
        model: model.to_path_buf(),
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
        let dev_device = augpro::model::bert::parse_device(device)?;
        let r = secs(|| {
            augpro::student::train(&loc, task, glue_dir, &shards.join("run"), &cfg, &dev_device)
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
        peak_gflops,
        dev_tokens * m.curve.len() + val_tokens,
    );
    v["task"] = json!(task_name);
    v["layers"] = json!(layers);
    Ok(v)
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

const ALL_METHODS: &str = r#"
[methods.augpro_mix]
alpha = 1.0
lambda_mode = "position"
lambda_min = 0.35
[methods.augpro_fgsm]
epsilon_nn = 3.92
[methods.token_replace]
p = 0.15
[methods.mixup]
alpha = 0.4
[methods.fgsm]
epsilon_nn = 3.92
"#;

fn main() -> Result<()> {
    augpro::util::tune_allocator();
    let a = Args::parse();
    augpro::util::init_threads(None);
    let device = augpro::model::bert::parse_device(&a.device)?;
    let glue_dir = resolve_glue_dir(a.glue_dir.as_deref())
        .canonicalize()
        .context("GLUE directory")?;
    let want = |s: &str| a.only.is_empty() || a.only.iter().any(|x| x == s);
    let mut res = serde_json::Map::new();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    res.insert("machine".into(), json!({ "cpu": cpu, "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1), "device": a.device }));
    if want("matmul") || want("projection") || want("teacher") || want("student") {
        eprintln!("matmul peak…");
        res.insert("matmul_peak".into(), matmul_peak(&device, a.quick)?);
    }
    // The teacher runs before FAISS and the large tables have run in this process.
    if want("teacher") {
        eprintln!("teacher throughput…");
        let peak = res["matmul_peak"]["gflops"].as_f64().unwrap_or(f64::NAN);
        res.insert(
            "teacher".into(),
            teacher_speed(
                &a.model,
                &glue_dir,
                &device,
                a.quick,
                peak,
                &a.out.join("tmp"),
            )?,
        );
    }
    if want("projection") {
        let ck = Checkpoint::open(&a.model)?;
        let p = ck.params(&Device::Cpu, false, 0)?;
        let bert = augpro::model::Bert::load(&p, &ck.config)?;
        let table: Vec<f32> = bert.word_embeddings().flatten_all()?.to_vec1()?;
        let nq = if a.quick { 512 } else { 4096 };
        let mut cases = vec![];
        eprintln!("projection: MiniLM table…");
        cases.push(projection_case(
            "MiniLM-L6 word embeddings",
            &table,
            ck.config.hidden_size,
            nq,
            &device,
        )?);
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let mut sizes = vec![(30522usize, 768usize)];
        if a.large {
            sizes.push((250_000, 768));
        }
        for (n, d) in sizes {
            eprintln!("projection: synthetic {n} × {d}…");
            let t: Vec<f32> = (0..n * d).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
            cases.push(projection_case(
                &format!("synthetic {n} × {d}"),
                &t,
                d,
                nq,
                &device,
            )?);
        }
        // Each section keeps the limit of its own run, so a partial run that measures the
        // peak again does not restate older sections against it.
        let peak = res["matmul_peak"]["gflops"].clone();
        for c in &mut cases {
            c["matmul_peak_gflops"] = peak.clone();
        }
        res.insert("projection".into(), json!(cases));
    }
    let tmp = a.out.join("tmp");
    if want("e2e") {
        let n = if a.quick { 256 } else { 1024 };
        eprintln!("end to end: augment {n} SST-2 examples with every method…");
        let p = bench_pipeline(&tmp, "e2e", n, ALL_METHODS)?;
        let (wall, rss) = run_augment(&p, &glue_dir, &a.device)?;
        let shard = shard_timings(&tmp.join("out/sst2/e2e/timings.json"))?;
        let total = shard["seconds"].as_f64().unwrap_or(f64::NAN);
        let methods: serde_json::Map<String, Value> = shard["method_seconds"]
            .as_object()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| {
                let s = v.as_f64().unwrap_or(f64::NAN);
                (k, json!({ "seconds": s, "examples_per_s": n as f64 / s }))
            })
            .collect();
        let stages: serde_json::Map<String, Value> = shard["stage_seconds"]
            .as_object()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| {
                let s = v.as_f64().unwrap_or(f64::NAN);
                (k, json!({ "seconds": s, "share": s / total }))
            })
            .collect();
        let accounted: f64 = stages
            .values()
            .map(|v| v["seconds"].as_f64().unwrap_or(0.0))
            .sum();
        res.insert("end_to_end".into(), json!({ "examples": n, "augment_seconds": total, "wall_seconds_with_startup": wall, "examples_per_s": n as f64 / total, "peak_rss_mib": rss, "methods": methods, "stages": stages, "other_share": 1.0 - accounted / total }));
    }
    if want("student") {
        let peak = res["matmul_peak"]["gflops"].as_f64().unwrap_or(f64::NAN);
        res.insert(
            "student".into(),
            student_speed(&a.model, &glue_dir, &tmp, &a.device, a.quick, peak)?,
        );
    }
    if want("peer") {
        eprintln!("peer: augment vs the Python pipeline…");
        res.insert(
            "peer".into(),
            peer(&a.model, &glue_dir, &tmp, &a.device, a.quick)?,
        );
    }
    if want("memory") {
        let sizes: &[usize] = if a.quick {
            &[250, 500, 1000]
        } else {
            &[1000, 4000, 16000]
        };
        let mut rows = vec![];
        for &n in sizes {
            eprintln!("memory: augment {n} examples (original + augpro_mix)…");
            let p = bench_pipeline(&tmp, &format!("mem{n}"), n, "[methods.augpro_mix]\nalpha = 1.0\nlambda_mode = \"position\"\nlambda_min = 0.35\n")?;
            let (wall, rss) = run_augment(&p, &glue_dir, &a.device)?;
            rows.push(json!({ "examples": n, "peak_rss_mib": rss, "wall_seconds": wall }));
        }
        res.insert("memory".into(), json!(rows));
        let sizes: &[usize] = if a.quick {
            &[10_000, 100_000]
        } else {
            &[100_000, 1_000_000]
        };
        let mut rows = vec![];
        for &n in sizes {
            eprintln!("memory: augment a described CSV of {n} train rows…");
            let p = described_csv_pipeline(&tmp, &glue_dir, n)?;
            let (wall, rss) = run_augment(&p, &glue_dir, &a.device)?;
            rows.push(json!({ "csv_rows": n, "peak_rss_mib": rss, "wall_seconds": wall }));
        }
        res.insert("memory_csv".into(), json!(rows));
    }
    let _ = std::fs::remove_dir_all(&tmp);
    if !a.only.is_empty() {
        // A partial run updates its sections of the previous results and keeps the rest.
        if let Some(Value::Object(prev)) = std::fs::read(a.out.join("results.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
        {
            for (k, v) in prev {
                res.entry(k).or_insert(v);
            }
        }
    }
    let res = Value::Object(res);
    std::fs::create_dir_all(&a.out)?;
    augpro::util::atomic_write(
        &a.out.join("results.json"),
        serde_json::to_string_pretty(&res)?.as_bytes(),
    )?;
    let md = markdown(&res);
    augpro::util::atomic_write(&a.out.join("results.md"), md.as_bytes())?;
    print!("{md}");
    Ok(())
}

fn f(v: &Value) -> String {
    v.as_f64()
        .map(|x| {
            if x >= 100.0 {
                format!("{x:.0}")
            } else if x >= 1.0 {
                format!("{x:.2}")
            } else {
                format!("{x:.3}")
            }
        })
        .unwrap_or("–".into())
}

/// One table row per memory measurement: its size (`size_key`), peak RSS and wall time.
fn memory_rows(s: &mut String, rows: &[Value], size_key: &str) {
    for row in rows {
        let _ = writeln!(
            s,
            "| {} | {} | {} |",
            row[size_key],
            f(&row["peak_rss_mib"]),
            f(&row["wall_seconds"])
        );
    }
}

/// A note naming the sections measured against another run's limit than `peak` (a partial
/// run keeps the sections it did not run, each with the limit of the run that measured it).
fn older_limits(r: &Value, peak: f64) -> String {
    let mut older: Vec<String> = vec![];
    let mut note = |name: &str, limit: Option<f64>| {
        if let Some(l) = limit.filter(|l| (l - peak).abs() > 0.05) {
            older.push(format!("{name} {l:.1}"));
        }
    };
    let projection = r["projection"].as_array().and_then(|c| c.first());
    note(
        "projection",
        projection.and_then(|c| c["matmul_peak_gflops"].as_f64()),
    );
    note("teacher", r["teacher"]["matmul_peak_gflops"].as_f64());
    note("student", r["student"]["matmul_peak_gflops"].as_f64());
    if older.is_empty() {
        return String::new();
    }
    format!(
        " Sections from an earlier run state their shares against that run's limit (GFLOP/s): {}.",
        older.join(", ")
    )
}

fn markdown(r: &Value) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# augpro benchmarks\n\nMachine: {} ({} threads), device {}.\n",
        r["machine"]["cpu"].as_str().unwrap_or("?"),
        r["machine"]["threads"],
        r["machine"]["device"].as_str().unwrap_or("cpu")
    );
    let peak = r["matmul_peak"]["gflops"].as_f64();
    if let Some(p) = peak {
        let tried: Vec<String> = r["matmul_peak"]["rows"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|m| {
                format!(
                    "{} {}³ {}",
                    m["gemm"].as_str().unwrap_or(""),
                    m["size"],
                    f(&m["gflops"])
                )
            })
            .collect();
        let _ = writeln!(
            s,
            "Limit: the machine's f32 matmul peak, the best GEMM measured here ({}): **{p:.1} GFLOP/s** ({}).{}\n",
            tried.join("; "),
            r["matmul_peak"]["best"].as_str().unwrap_or(""),
            older_limits(r, p)
        );
    }
    if let Some(cases) = r["projection"].as_array() {
        let _ = writeln!(s, "## Projection (nearest token, k = 1)\n\n| table | index | build s | queries/s | GFLOP/s | % of peak | recall@1 vs exact |\n|---|---|---:|---:|---:|---:|---:|");
        for c in cases {
            for row in c["results"].as_array().into_iter().flatten() {
                let pct = match (row["gflops"].as_f64(), c["matmul_peak_gflops"].as_f64()) {
                    (Some(g), Some(p)) => format!("{:.0}%", 100.0 * g / p),
                    _ => "–".into(),
                };
                let _ = writeln!(
                    s,
                    "| {} ({}×{}) | {} | {} | {} | {} | {} | {} |",
                    c["table"].as_str().unwrap_or(""),
                    c["rows"],
                    c["dim"],
                    row["index"].as_str().unwrap_or(""),
                    f(&row["build_s"]),
                    f(&row["qps"]),
                    f(&row["gflops"]),
                    pct,
                    f(&row["recall_at_1"])
                );
            }
        }
        s.push('\n');
    }
    if let Some(t) = r.get("teacher").filter(|t| !t.is_null()) {
        let _ = writeln!(s, "## Teacher (MiniLM-L6, SST-2 validation, {} examples, {} real tokens)\n\nLimit: the measured matmul peak over the matmul FLOPs per real token ({} MFLOP forward; forward + backward to the embeddings 2×, a fine-tuning step 3×). `kernels` is the engine as shipped on the CPU; `candle ops` is the same model on candle's plain ops, measured in the same run, passes interleaved.\n\n| pass | batch | engine | examples/s | real tokens/s | % of limit |\n|---|---:|---|---:|---:|---:|", t["examples"], t["real_tokens"], f(&json!(t["flops_per_token"].as_f64().unwrap_or(f64::NAN) / 1e6)));
        for row in t["rows"].as_array().into_iter().flatten() {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {:.0}% |",
                row["pass"].as_str().unwrap_or(""),
                row["batch"],
                row["engine"].as_str().unwrap_or(""),
                f(&row["examples_per_s"]),
                f(&row["real_tokens_per_s"]),
                100.0 * row["share_of_limit"].as_f64().unwrap_or(f64::NAN)
            );
        }
        s.push('\n');
        runtimes_markdown(&mut s, t);
        bf16_markdown(&mut s, t);
    }
    student_markdown(&mut s, r);
    if let Some(p) = r.get("peer").filter(|t| !t.is_null()) {
        let _ = writeln!(s, "## Peer: `augment` vs a Python pipeline on the same job\n\n{} SST-2 training examples, original + AugPro-Mix + AugPro-FGSM, exact L2 projection, one shard, the same teacher and thread count. The Python side is `bench/peer.py` (transformers + faiss-cpu + pyarrow).\n\n| pipeline | work s | whole process s | source examples/s (work) |\n|---|---:|---:|---:|", p["examples"]);
        for (name, k) in [
            ("augpro `augment`", "augpro"),
            ("augpro `augment --dtype bf16`", "augpro_bf16"),
            ("Python (`bench/peer.py`)", "python"),
        ] {
            if let Some(v) = p.get(k) {
                let _ = writeln!(
                    s,
                    "| {name} | {} | {} | {} |",
                    f(&v["work_seconds"]),
                    f(&v["process_seconds"]),
                    f(&v["examples_per_s"])
                );
            }
        }
        if let Some(x) = p.get("speedup_work") {
            let _ = writeln!(
                s,
                "\naugment is **{}×** the Python pipeline on the work.",
                f(x)
            );
        }
        if let Some(x) = p.get("speedup_work_bf16") {
            let _ = writeln!(
                s,
                "With `--dtype bf16` (the dense layers in bf16 on AVX-512 BF16), **{}×**.",
                f(x)
            );
        }
        if let Some(o) = p.get("bf16_identical_rows").and_then(|v| v.as_object()) {
            let shares: Vec<String> = o
                .iter()
                .map(|(m, v)| format!("{m} {:.1}%", 100.0 * v.as_f64().unwrap_or(f64::NAN)))
                .collect();
            let _ = writeln!(
                s,
                "Augmented rows whose projected tokens equal the f32 run's: {}.",
                shares.join(", ")
            );
        }
        let total = p["augpro"]["work_seconds"].as_f64().unwrap_or(f64::NAN);
        let _ = writeln!(s, "\n| augment stage | seconds | share |\n|---|---:|---:|");
        for (k, v) in p["augpro"]["stage_seconds"]
            .as_object()
            .into_iter()
            .flatten()
        {
            let x = v.as_f64().unwrap_or(f64::NAN);
            let _ = writeln!(s, "| {k} | {} | {:.1}% |", f(v), 100.0 * x / total);
        }
        s.push('\n');
    }
    if let Some(e) = r.get("end_to_end").filter(|t| !t.is_null()) {
        let _ = writeln!(s, "## End to end: `augment` on {} SST-2 examples, all methods\n\n{} examples/s overall ({} s), peak RSS {} MiB.\n\n| method | seconds | examples/s |\n|---|---:|---:|", e["examples"], f(&e["examples_per_s"]), f(&e["augment_seconds"]), f(&e["peak_rss_mib"]));
        for (k, v) in e["methods"].as_object().into_iter().flatten() {
            let _ = writeln!(
                s,
                "| {k} | {} | {} |",
                f(&v["seconds"]),
                f(&v["examples_per_s"])
            );
        }
        let _ = writeln!(s, "\n| stage | seconds | share |\n|---|---:|---:|");
        for (k, v) in e["stages"].as_object().into_iter().flatten() {
            let _ = writeln!(
                s,
                "| {k} | {} | {:.1}% |",
                f(&v["seconds"]),
                100.0 * v["share"].as_f64().unwrap_or(0.0)
            );
        }
        let _ = writeln!(
            s,
            "| other (glue code, row assembly) | | {:.1}% |\n",
            100.0 * e["other_share"].as_f64().unwrap_or(0.0)
        );
    }
    if let Some(m) = r["memory_csv"].as_array() {
        let _ = writeln!(s, "## Peak memory of `augment` on a described CSV\n\n16 source examples augmented, after a small teacher fine-tune (320 examples, which sets the peak); the class-name scan of the string labels, the dev split and the source hash stream every train row.\n\n| train rows | peak RSS MiB | wall s |\n|---:|---:|---:|");
        memory_rows(&mut s, m, "csv_rows");
        let rss = |i: usize| m.get(i).and_then(|r| r["peak_rss_mib"].as_f64());
        if let (Some(a), Some(b)) = (rss(0), rss(m.len().saturating_sub(1))) {
            let _ = writeln!(
                s,
                "\nPeak RSS at the largest size is {:.2}× that at the smallest.\n",
                b / a
            );
        }
    }
    if let Some(m) = r["memory"].as_array() {
        let _ = writeln!(s, "## Peak memory of `augment` (original + augpro_mix)\n\n| examples | peak RSS MiB | wall s |\n|---:|---:|---:|");
        memory_rows(&mut s, m, "examples");
    }
    s
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
            f(&row["real_tokens_per_s"]),
            100.0 * row["share_of_limit"].as_f64().unwrap_or(f64::NAN)
        );
    }
    s.push('\n');
}

/// The `student` section: per run, the time by stage and the step's and evaluations' speed.
fn student_markdown(s: &mut String, r: &Value) {
    let Some(st) = r.get("student").filter(|v| !v.is_null()) else {
        return;
    };
    let _ = writeln!(s, "## Student: one `train-student` run of the low preset\n\nOriginal + AugPro-Mix rows of 1,000 training examples (the base encoder with a seeded head as teacher), the low preset's steps, learning rate and layers, 6 dev evaluations and one validation. Time by the trainer's stage spans; the step's limit is the matmul peak over 3× the forward FLOPs of its real tokens, the evaluations' the peak over 1× (validation includes reading and tokenizing its split).\n\n| task | layers | steps | seconds | step | data | dev | validation | checkpoint | setup | other | step examples/s | step % of limit | eval real tokens/s | eval % of limit |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for run in st["runs"].as_array().into_iter().flatten() {
        let share = |k: &str| {
            format!(
                "{:.1}%",
                100.0 * run["stages"][k]["share"].as_f64().unwrap_or(0.0)
            )
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.1}% | {} | {:.0}% | {} | {:.0}% |",
            run["task"].as_str().unwrap_or(""),
            run["layers"],
            run["steps"],
            f(&run["seconds"]),
            share("step"),
            share("data"),
            share("dev"),
            share("validation"),
            share("checkpoint"),
            share("setup"),
            100.0 * run["other_share"].as_f64().unwrap_or(f64::NAN),
            f(&run["step_examples_per_s"]),
            100.0 * run["step_share_of_limit"].as_f64().unwrap_or(f64::NAN),
            f(&run["eval_real_tokens_per_s"]),
            100.0 * run["eval_share_of_limit"].as_f64().unwrap_or(f64::NAN)
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
