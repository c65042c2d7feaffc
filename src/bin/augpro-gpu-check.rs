//! The measurements of `make gpu-check` (scripts/gpu-check.sh) on a CUDA device: teacher
//! forward and forward+backward in tokens/s at batch 32 and 256 in each dtype, and exact
//! projection in queries/s (matmul + argmin on the device, against FAISS `Flat` on the host).
//! Writes one JSON object. `--probe` only checks that a GPU is there.

use anyhow::{bail, Context, Result};
use augpro::augment::project::{Metric, Projector};
use augpro::augment::project_device::DeviceProjector;
use augpro::data::{resolve_glue_dir, SplitReader};
use augpro::model::{Checkpoint, Ctx, SeqClassifier};
use augpro::task;
use augpro::teacher::{embedding_grad, GradLoss};
use augpro::tokenize::TextTokenizer;
use augpro::train::{sorted_batches, Batch};
use candle_core::{DType, Device, Tensor};
use clap::Parser;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Parser, Debug)]
#[command(about = "augpro GPU measurements (used by make gpu-check)")]
struct Args {
    /// Only check that a CUDA device can be opened.
    #[arg(long)]
    probe: bool,
    /// cuda or cuda:N (cpu works too, for trying the program out).
    #[arg(long, default_value = "cuda")]
    device: String,
    /// Teacher dtypes to measure.
    #[arg(long, value_delimiter = ',', default_value = "f32,bf16")]
    dtypes: Vec<String>,
    /// Base model.
    #[arg(long, default_value = "data/models/minilm-l6")]
    model: PathBuf,
    /// GLUE directory.
    #[arg(long)]
    glue_dir: Option<PathBuf>,
    /// SST-2 training examples the teacher figures run over.
    #[arg(long, default_value_t = 4096)]
    examples: usize,
    /// Projection queries on the device.
    #[arg(long, default_value_t = 65536)]
    queries: usize,
    /// Seconds each figure runs for at least (passes repeat over the examples).
    #[arg(long, default_value_t = 2.0)]
    min_seconds: f64,
    /// Output JSON file.
    #[arg(long, default_value = "bench/tmp/gpu-measure.json")]
    out: PathBuf,
}

fn open_device(name: &str) -> Result<Device> {
    if name == "cpu" {
        return Ok(Device::Cpu);
    }
    let ord = match name.strip_prefix("cuda") {
        Some("") => 0,
        Some(n) => n
            .strip_prefix(':')
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("--device {name}: expected cuda or cuda:N"))?,
        None => bail!("--device {name}: expected cuda, cuda:N or cpu"),
    };
    if !candle_core::utils::cuda_is_available() {
        bail!("this binary was built without `--features cuda`");
    }
    Device::new_cuda(ord).map_err(|e| anyhow::anyhow!("no GPU found (CUDA: {e})"))
}

/// Runs `pass` (one pass over the data) until `min_s` seconds are spent; one untimed warm-up
/// pass first. Returns passes per second.
fn rate(min_s: f64, mut pass: impl FnMut() -> Result<()>) -> Result<f64> {
    pass()?;
    let t = Instant::now();
    let mut n = 0usize;
    while n == 0 || t.elapsed().as_secs_f64() < min_s {
        pass()?;
        n += 1;
    }
    Ok(n as f64 / t.elapsed().as_secs_f64())
}

fn teacher(a: &Args, device: &Device, glue_dir: &Path) -> Result<Value> {
    let task = task::glue("sst2")?;
    let ck = Checkpoint::open(&a.model)?;
    let tok = TextTokenizer::load(&a.model, 128)?;
    let ex = SplitReader::open(glue_dir, task, "train")?.read_all(Some(a.examples))?;
    let enc = tok.encode(&ex)?;
    let lens: Vec<usize> = enc.iter().map(|e| e.ids.len()).collect();
    let tokens: usize = lens.iter().sum();
    let mut rows = Vec::new();
    for name in &a.dtypes {
        let dtype = augpro::precision::parse(name)?;
        let p = ck.params(device, false, 0)?.with_dtype(dtype);
        let m = SeqClassifier::load(&p, &ck.config, 2)?;
        for bs in [32usize, 256] {
            let batches: Vec<Batch> = sorted_batches(&lens, bs)
                .iter()
                .map(|b| {
                    let r: Vec<_> = b.iter().map(|&i| &enc[i]).collect();
                    Batch::from_encoded(&r, tok.pad_id, device)
                })
                .collect::<Result<_>>()?;
            let fwd = rate(a.min_seconds, || {
                for b in &batches {
                    m.forward_ids(&b.ids, &b.types, &b.mask, &mut Ctx::eval())?
                        .logits
                        .to_dtype(DType::F32)?
                        .to_vec2::<f32>()?;
                }
                Ok(())
            })?;
            let y: Vec<Vec<f32>> = sorted_batches(&lens, bs)
                .iter()
                .map(|b| b.iter().map(|&i| ex[i].label.unwrap_or(0.0)).collect())
                .collect();
            let bwd = rate(a.min_seconds, || {
                for (b, y) in batches.iter().zip(&y) {
                    embedding_grad(&m, b, GradLoss::Labels(y), false)?
                        .1
                        .to_dtype(DType::F32)?
                        .sum_all()?
                        .to_scalar::<f32>()?;
                }
                Ok(())
            })?;
            eprintln!(
                "teacher {name} batch {bs}: forward {:.0} tokens/s, forward+backward {:.0} tokens/s",
                fwd * tokens as f64,
                bwd * tokens as f64
            );
            rows.push(json!({
                "dtype": name, "batch": bs,
                "forward_tokens_per_s": fwd * tokens as f64,
                "forward_examples_per_s": fwd * ex.len() as f64,
                "forward_backward_tokens_per_s": bwd * tokens as f64,
                "forward_backward_examples_per_s": bwd * ex.len() as f64,
            }));
        }
    }
    Ok(json!({ "examples": ex.len(), "real_tokens": tokens, "rows": rows }))
}

fn projection(a: &Args, device: &Device) -> Result<Value> {
    let ck = Checkpoint::open(&a.model)?;
    let p = ck.params(&Device::Cpu, false, 0)?;
    let bert = augpro::model::Bert::load(&p, &ck.config)?;
    let table: Vec<f32> = bert.word_embeddings().flatten_all()?.to_vec1()?;
    let d = ck.config.hidden_size;
    let tok = TextTokenizer::load(&a.model, 128)?;
    let keep = |t: u32| !tok.is_special(t);
    let vocab = table.len() / d;
    let mut r = ChaCha8Rng::seed_from_u64(3);
    let mut q = Vec::with_capacity(a.queries * d);
    for _ in 0..a.queries {
        let (i, j) = (r.gen_range(0..vocab), r.gen_range(0..vocab));
        let lam: f32 = r.gen_range(0.0..1.0);
        q.extend((0..d).map(|k| lam * table[i * d + k] + (1.0 - lam) * table[j * d + k]));
    }
    let t = Instant::now();
    let dp = DeviceProjector::build(&table, d, keep, device)?;
    let build_s = t.elapsed().as_secs_f64();
    let qt = Tensor::from_slice(&q, (a.queries, d), device)?;
    let mut ids = Vec::new();
    let per_s = rate(a.min_seconds, || {
        ids = dp.nearest_tensor(&qt)?.to_vec1::<u32>()?;
        Ok(())
    })? * a.queries as f64;
    let check = 4096.min(a.queries);
    let mut faiss = Projector::build(&table, d, keep, "Flat", Metric::L2)?;
    let t = Instant::now();
    let want = faiss.nearest(&q[..check * d])?;
    let faiss_per_s = check as f64 / t.elapsed().as_secs_f64();
    let agree = want.iter().zip(&ids).filter(|(a, b)| a == b).count();
    eprintln!(
        "projection: {per_s:.0} queries/s on the device, FAISS Flat {faiss_per_s:.0} queries/s on the host, {agree}/{check} ids equal"
    );
    Ok(json!({
        "table": format!("MiniLM-L6 word embeddings ({vocab}×{d})"),
        "indexed_tokens": dp.len(),
        "queries": a.queries,
        "device_build_s": build_s,
        "device_queries_per_s": per_s,
        "faiss_flat_host_queries_per_s": faiss_per_s,
        "ids_equal_to_faiss": format!("{agree}/{check}"),
    }))
}

fn main() -> Result<()> {
    let a = Args::parse();
    let device = open_device(&a.device)?;
    if a.probe {
        println!("{device:?}");
        return Ok(());
    }
    let glue_dir = resolve_glue_dir(a.glue_dir.as_deref());
    let v = json!({
        "device": format!("{device:?}"),
        "compute_capability": augpro::precision::compute_capability(&device),
        "teacher": teacher(&a, &device, &glue_dir)?,
        "projection": projection(&a, &device)?,
    });
    if let Some(dir) = a.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&a.out, serde_json::to_string_pretty(&v)?)?;
    Ok(())
}
