//! Projection: the nearest token by exact Flat search (augpro's GEMM + re-rank), FAISS's
//! Flat, HNSW and IVF indexes, and a candle matmul + argmin, on the MiniLM table and
//! synthetic tables.

use crate::{num, secs, Bench};
use anyhow::Result;
use augpro::augment::project::{Metric, Projector};
use augpro::model::Checkpoint;
use candle_core::{DType, Device, Tensor, D};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};
use std::fmt::Write as _;

/// The section: every index on the model's word-embedding table and on a synthetic
/// 30,522 × 768 table (and 250,000 × 768 with `large`), each case carrying `peak`, the
/// limit of this run.
pub(crate) fn measure(b: &Bench) -> Result<Value> {
    let (device, quick, large) = (&b.device, b.quick, b.large);
    let ck = Checkpoint::open(&b.model)?;
    let p = ck.params(&Device::Cpu, false, 0)?;
    let bert = augpro::model::Bert::load(&p, &ck.config)?;
    let table: Vec<f32> = bert.word_embeddings().flatten_all()?.to_vec1()?;
    let nq = if quick { 512 } else { 4096 };
    let mut cases = vec![];
    eprintln!("projection: MiniLM table…");
    cases.push(projection_case(
        "MiniLM-L6 word embeddings",
        &table,
        ck.config.hidden_size,
        nq,
        device,
    )?);
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut sizes = vec![(30522usize, 768usize)];
    if large {
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
            device,
        )?);
    }
    // Each section keeps the limit of its own run, so a partial run that measures the
    // peak again does not restate older sections against it.
    for c in &mut cases {
        c["matmul_peak_gflops"] = b.peak.clone();
    }
    Ok(json!(cases))
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

/// The section's table: one row per table and index.
pub(crate) fn markdown(s: &mut String, r: &Value) {
    let Some(cases) = r["projection"].as_array() else {
        return;
    };
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
                num(&row["build_s"]),
                num(&row["qps"]),
                num(&row["gflops"]),
                pct,
                num(&row["recall_at_1"])
            );
        }
    }
    s.push('\n');
}
