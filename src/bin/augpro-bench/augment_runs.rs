//! `augment` as the sections run it: bench pipelines written from `pipelines/smoke.toml`, the
//! child process with its peak memory, and what its output records.

use crate::Bench;
use anyhow::{Context, Result};
use augpro::config::PipelineConfig;
use augpro::data::SplitReader;
use augpro::model::Checkpoint;
use augpro::task;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// A pipeline `name` on `examples` SST-2 training examples, one shard, batch 32, with the
/// `[methods.*]` tables `methods`, written into `dir`; returns its path.
pub(crate) fn bench_pipeline(
    dir: &Path,
    name: &str,
    examples: usize,
    methods: &str,
) -> Result<PathBuf> {
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
pub(crate) fn described_csv_pipeline(tmp: &Path, glue_dir: &Path, rows: usize) -> Result<PathBuf> {
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
pub(crate) fn run_augment(pipeline: &Path, b: &Bench) -> Result<(f64, f64)> {
    run_augment_as(pipeline, b, "f32")
}

/// [`run_augment`] with the teacher in `dtype`.
pub(crate) fn run_augment_as(pipeline: &Path, b: &Bench, dtype: &str) -> Result<(f64, f64)> {
    let exe = std::env::current_exe()?.with_file_name("augpro");
    let t = Instant::now();
    let mut child = std::process::Command::new(&exe)
        .args([
            "-q",
            "augment",
            pipeline.to_str().unwrap(),
            "--force",
            "--device",
            &b.device_name,
            "--dtype",
            dtype,
        ])
        .env("AUGPRO_GLUE_DIR", &b.glue_dir)
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

/// The first shard's entry of an `augment` run's `timings.json` (the bench runs one shard).
pub(crate) fn shard_timings(path: &Path) -> Result<Value> {
    let timings: Value = serde_json::from_slice(&std::fs::read(path)?)?;
    Ok(timings
        .as_object()
        .and_then(|o| o.values().next())
        .cloned()
        .unwrap_or_default())
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
pub(crate) fn identical_rows(a: &Path, b: &Path) -> Result<Value> {
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

/// The base encoder with a seeded classification head for `task`, saved as a teacher
/// checkpoint in `dir` (throughput does not depend on the head's weights); returns `dir`.
pub(crate) fn seeded_teacher(
    model: &Path,
    task: &'static task::TaskSpec,
    dir: &Path,
) -> Result<PathBuf> {
    let ck = Checkpoint::open(model)?;
    let (_, params) =
        ck.load_classifier(&candle_core::Device::Cpu, true, task.num_labels, None, 0)?;
    let names: Vec<String> = task.label_names.iter().map(|s| s.to_string()).collect();
    augpro::model::checkpoint::save_classifier(
        dir,
        &params,
        &ck.config,
        task.num_labels,
        task,
        &names,
        model,
    )?;
    Ok(dir.to_path_buf())
}
