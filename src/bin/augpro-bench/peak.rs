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
    let portable = if device.is_cpu() {
        portable_vs_gemm(reps)
    } else {
        vec![]
    };
    Ok(
        json!({ "gflops": best["gflops"], "best": format!("{}, {}³", best["gemm"].as_str().unwrap_or(""), best["size"]), "rows": rows, "portable": portable }),
    )
}

/// The encoder's products at 800 tokens (MiniLM-L6 sizes) in the layouts the dense layer
/// uses: `x·Wᵀ` for the attention projections and the feed-forward up and down layers
/// (`x` `[tokens, in]`, `W` `[out, in]`), and a weight gradient `dYᵀ·x`, each by the `gemm`
/// crate and by the portable product (the same bits on every CPU), on every thread, best
/// of `reps`.
fn portable_vs_gemm(reps: usize) -> Vec<Value> {
    use augpro::model::kernels::portable_gemm::{matmul, Strided};
    let t = 800;
    // (product, A's rows × inner, B's inner × columns, A transposed, B transposed)
    let shapes = [
        ("x·Wᵀ, 384 → 384", t, 384, 384, false, true),
        ("x·Wᵀ, 384 → 1536", t, 384, 1536, false, true),
        ("x·Wᵀ, 1536 → 384", t, 1536, 384, false, true),
        (
            "dYᵀ·x (weight gradient), 384 × 384",
            384,
            t,
            384,
            true,
            false,
        ),
    ];
    let threads = rayon::current_num_threads();
    shapes
        .iter()
        .map(|&(what, m, k, n, at, bt)| {
            let (a, b) = random_square(m.max(k).max(n));
            let (a, b) = (&a[..m * k], &b[..k * n]);
            // Stored as given (a transposed operand is its transpose, row-major).
            let sa = if at {
                Strided::row_major(a, k, m).t()
            } else {
                Strided::row_major(a, m, k)
            };
            let sb = if bt {
                Strided::row_major(b, n, k).t()
            } else {
                Strided::row_major(b, k, n)
            };
            let flops = 2.0 * (m * k * n) as f64;
            let (mut c1, mut c2) = (vec![0f32; m * n], vec![0f32; m * n]);
            let (gemm_s, portable_s) = best_of_interleaved(
                reps,
                || gemm_product(sa, sb, &mut c1, threads),
                || matmul(sa, sb, &mut c2, n, false, threads > 1),
            );
            json!({ "product": what, "m": m, "k": k, "n": n,
                "gemm_gflops": flops / gemm_s / 1e9, "portable_gflops": flops / portable_s / 1e9 })
        })
        .collect()
}

/// The shortest of `reps` timed calls of `f` and of `g`, taken in turn (so that a drift in
/// the machine's speed reaches both), after one untimed call of each.
fn best_of_interleaved(reps: usize, mut f: impl FnMut(), mut g: impl FnMut()) -> (f64, f64) {
    let time = |h: &mut dyn FnMut()| {
        let t = Instant::now();
        h();
        t.elapsed().as_secs_f64()
    };
    f();
    g();
    (0..reps).fold((f64::INFINITY, f64::INFINITY), |(bf, bg), _| {
        (bf.min(time(&mut f)), bg.min(time(&mut g)))
    })
}

/// `c = a·b` by the `gemm` crate, `c` row-major `[a.rows, b.cols]`.
fn gemm_product(
    a: augpro::model::kernels::portable_gemm::Strided,
    b: augpro::model::kernels::portable_gemm::Strided,
    c: &mut [f32],
    threads: usize,
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let last = |x: &augpro::model::kernels::portable_gemm::Strided| {
        (x.rows - 1) * x.rs + (x.cols - 1) * x.cs
    };
    assert!(b.rows == k && last(&a) < a.data.len() && last(&b) < b.data.len() && c.len() >= m * n);
    let par = match threads {
        1 => gemm::Parallelism::None,
        t => gemm::Parallelism::Rayon(t),
    };
    // SAFETY: the strided operands lie within their buffers and `c` holds [m, n] (asserted
    // above).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
    std::hint::black_box(c);
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
    portable_markdown(s, r, p);
}

/// The table of the encoder's products, the `gemm` crate beside the portable product.
fn portable_markdown(s: &mut String, r: &Value, limit: f64) {
    let Some(rows) = r["matmul_peak"]["portable"]
        .as_array()
        .filter(|v| !v.is_empty())
    else {
        return;
    };
    let _ = writeln!(
        s,
        "The encoder's products at 800 tokens, by the `gemm` crate (whose sums depend on the CPU's instruction set and caches) and by the portable product (`src/model/kernels/portable_gemm.rs`: one fused multiply-add chain per element, the same bits on every CPU), on every thread:\n\n| product | m × k × n | gemm crate GFLOP/s | % of limit | portable GFLOP/s | % of limit | portable ÷ gemm |\n|---|---|---:|---:|---:|---:|---:|"
    );
    for x in rows {
        let (g, p) = (
            x["gemm_gflops"].as_f64().unwrap_or(f64::NAN),
            x["portable_gflops"].as_f64().unwrap_or(f64::NAN),
        );
        let _ = writeln!(
            s,
            "| {} | {} × {} × {} | {g:.0} | {:.0}% | {p:.0} | {:.0}% | {:.2} |",
            x["product"].as_str().unwrap_or(""),
            x["m"],
            x["k"],
            x["n"],
            100.0 * g / limit,
            100.0 * p / limit,
            p / g
        );
    }
    s.push('\n');
}
