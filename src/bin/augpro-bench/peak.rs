//! The limit: the machine's f32 matmul peak, the best GEMM measured here.

use crate::{num, secs};
use anyhow::Result;
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};
use std::fmt::Write as _;
use std::time::Instant;

/// The machine's f32 matmul peak: the best of candle's matmul (as the engine's plain ops
/// use it) at 1024³, and the `gemm` crate and OpenBLAS on every thread at 1024³ and 2048³
/// (the CPU; candle alone elsewhere). Each figure is the best of `reps` products.
pub(crate) fn matmul_peak(device: &Device, quick: bool) -> Result<Value> {
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

/// The limit's line of the results: every GEMM tried, the best, and the sections that keep
/// an earlier run's limit.
pub(crate) fn markdown(s: &mut String, r: &Value) {
    let Some(p) = r["matmul_peak"]["gflops"].as_f64() else {
        return;
    };
    let tried: Vec<String> = r["matmul_peak"]["rows"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| {
            format!(
                "{} {}³ {}",
                m["gemm"].as_str().unwrap_or(""),
                m["size"],
                num(&m["gflops"])
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
