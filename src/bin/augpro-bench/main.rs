//! `make bench`: measures every stage against its limit and its alternative, on the real
//! default model and SST-2 data, and writes `bench/results.json` and `bench/results.md`.
//!
//! One module per section, each with its measurement and its table: the matmul peak (the
//! limit: the best GEMM here), projection, the teacher beside PyTorch and ONNX Runtime, a
//! student run by stage, `augment` beside a Python pipeline, `augment` end to end per method
//! and stage, and its peak memory as the input grows.

mod augment_runs;
mod end_to_end;
mod memory;
mod peak;
mod peer;
mod projection;
mod student;
mod teacher;

use anyhow::{Context, Result};
use augpro::data::resolve_glue_dir;
use candle_core::Device;
use clap::Parser;
use serde_json::{json, Map, Value};
use std::fmt::Write as _;
use std::path::PathBuf;
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

impl Args {
    /// Whether the run measures `section`.
    fn wants(&self, section: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|x| x == section)
    }
}

fn main() -> Result<()> {
    augpro::util::tune_allocator();
    let a = Args::parse();
    augpro::util::init_threads(None);
    let mut res = if a.only == ["render"] {
        Map::new()
    } else {
        measure(&a)?
    };
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

/// What every section measures with.
pub(crate) struct Bench {
    /// The base model's directory.
    model: PathBuf,
    /// The GLUE directory.
    glue_dir: PathBuf,
    /// Scratch space for pipelines, shards and checkpoints, removed at the end.
    tmp: PathBuf,
    /// The device as `augment --device` takes it, and as candle's.
    device_name: String,
    device: Device,
    /// Smaller sizes.
    quick: bool,
    /// Also the 250,000 × 768 synthetic table.
    large: bool,
    /// The limit: the matmul peak in GFLOP/s measured by this run (`null` when it did not).
    peak: Value,
}

impl Bench {
    /// The limit in GFLOP/s (NaN when this run did not measure it).
    fn peak_gflops(&self) -> f64 {
        self.peak.as_f64().unwrap_or(f64::NAN)
    }
}

/// Runs the sections `a` asks for, in an order that keeps each away from the others'
/// leftovers (the teacher before FAISS and the large tables have run in this process).
fn measure(a: &Args) -> Result<Map<String, Value>> {
    let device = augpro::model::bert::parse_device(&a.device)?;
    let mut res = Map::new();
    res.insert("machine".into(), machine(&a.device));
    if ["matmul", "projection", "teacher", "student"]
        .iter()
        .any(|s| a.wants(s))
    {
        eprintln!("matmul peak…");
        res.insert("matmul_peak".into(), peak::matmul_peak(&device, a.quick)?);
    }
    let b = Bench {
        model: a.model.clone(),
        glue_dir: resolve_glue_dir(a.glue_dir.as_deref())
            .canonicalize()
            .context("GLUE directory")?,
        tmp: a.out.join("tmp"),
        device_name: a.device.clone(),
        device,
        quick: a.quick,
        large: a.large,
        peak: res
            .get("matmul_peak")
            .map_or(Value::Null, |p| p["gflops"].clone()),
    };
    if a.wants("teacher") {
        eprintln!("teacher throughput…");
        res.insert("teacher".into(), teacher::measure(&b)?);
    }
    if a.wants("projection") {
        res.insert("projection".into(), projection::measure(&b)?);
    }
    if a.wants("e2e") {
        res.insert("end_to_end".into(), end_to_end::measure(&b)?);
    }
    if a.wants("student") {
        res.insert("student".into(), student::measure(&b)?);
    }
    if a.wants("peer") {
        eprintln!("peer: augment vs the Python pipeline…");
        res.insert("peer".into(), peer::measure(&b)?);
    }
    if a.wants("memory") {
        let (memory, csv) = memory::measure(&b)?;
        res.insert("memory".into(), memory);
        res.insert("memory_csv".into(), csv);
    }
    let _ = std::fs::remove_dir_all(&b.tmp);
    Ok(res)
}

/// The CPU's model name, the thread count and the device.
fn machine(device: &str) -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    json!({ "cpu": cpu, "threads": threads, "device": device })
}

/// `results.md`: the machine, the limit, then each section's tables.
fn markdown(r: &Value) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# augpro benchmarks\n\nMachine: {} ({} threads), device {}.\n",
        r["machine"]["cpu"].as_str().unwrap_or("?"),
        r["machine"]["threads"],
        r["machine"]["device"].as_str().unwrap_or("cpu")
    );
    peak::markdown(&mut s, r);
    projection::markdown(&mut s, r);
    teacher::markdown(&mut s, r);
    student::markdown(&mut s, r);
    peer::markdown(&mut s, r);
    end_to_end::markdown(&mut s, r);
    memory::markdown(&mut s, r);
    s
}

/// Whether `python3` imports every module of `modules` (comma-separated).
pub(crate) fn python_has(modules: &str) -> bool {
    std::process::Command::new("python3")
        .args(["-c", &format!("import {modules}")])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The result of `f` and the seconds it took.
pub(crate) fn secs<T>(f: impl FnOnce() -> Result<T>) -> Result<(T, f64)> {
    let t = Instant::now();
    let v = f()?;
    Ok((v, t.elapsed().as_secs_f64()))
}

/// A figure as the tables print it: no decimals from 100, two from 1, three below.
pub(crate) fn num(v: &Value) -> String {
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
