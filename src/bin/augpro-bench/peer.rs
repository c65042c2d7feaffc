//! The peer job: `augment` and the Python pipeline `bench/peer.py` on the same examples,
//! methods, projection and teacher.

use crate::augment_runs::{identical_rows, run_augment_as, seeded_teacher, shard_timings};
use crate::{num, python_has, Bench};
use anyhow::Result;
use augpro::model::Checkpoint;
use augpro::task;
use serde_json::{json, Value};
use std::fmt::Write as _;
use std::path::Path;
use std::time::Instant;

/// The `peer` job: `augment` and `bench/peer.py` (transformers + faiss-cpu + pyarrow) on the
/// same 1,000 SST-2 training examples, original + AugPro-Mix + AugPro-FGSM, exact L2
/// projection, one shard, the same teacher (the base encoder with a seeded head). With
/// AVX-512 BF16, `augment --dtype bf16` too, and the share of its rows equal to f32's.
pub(crate) fn measure(b: &Bench) -> Result<Value> {
    let (n, dir) = (if b.quick { 256 } else { 1000 }, &b.tmp);
    let teacher = seeded_teacher(&b.model, task::glue("sst2")?, &dir.join("peer-teacher"))?;
    let job = Job {
        n,
        b,
        toml: pipeline(&b.model, &teacher, dir, n)?,
    };
    let bf16 = (b.device.is_cpu() && augpro::precision::cpu_has_bf16())
        .then(|| job.augment("bf16"))
        .transpose()?;
    let (work, f32_row) = job.augment("f32")?;
    let mut out = json!({ "examples": n, "augpro": f32_row });
    if let Some((_, row)) = &bf16 {
        out["augpro_bf16"] = row.clone();
        out["bf16_identical_rows"] =
            identical_rows(&dir.join("out/sst2/peer"), &dir.join("out/sst2/peer-bf16"))?;
    }
    if !python_has("torch, transformers, faiss, pyarrow") {
        eprintln!(
            "peer: torch, transformers or faiss-cpu missing (`make peer-deps`); augpro side only"
        );
        return Ok(out);
    }
    let (py_work, py_row) = job.python(&teacher)?;
    out["python"] = py_row;
    out["speedup_work"] = json!(py_work / work);
    if let Some((w, _)) = bf16 {
        out["speedup_work_bf16"] = json!(py_work / w);
    }
    Ok(out)
}

/// The peer job's pipeline file (named `peer`), for `n` examples and `teacher`.
fn pipeline(model: &Path, teacher: &Path, dir: &Path, n: usize) -> Result<String> {
    let hidden = Checkpoint::open(model)?.config.hidden_size;
    Ok(format!(
        "name = \"peer\"\ntask = \"sst2\"\nsplit = \"train\"\nmax_examples = {n}\nmax_seq_len = 66\nseed = 0\nshards = 1\nbatch_size = 32\noutput = \"{}\"\n\n[teacher]\nmodel = \"{}\"\ncheckpoint = \"{}\"\n\n[projection]\nindex = \"Flat\"\nmetric = \"l2\"\n\n[methods.augpro_mix]\nalpha = 1.0\nlambda_mode = \"position\"\nlambda_min = 0.35\n\n[methods.augpro_fgsm]\nepsilon_nn = {eps_nn}\n\n[dev]\nfraction = 0.0\n",
        dir.join("out").display(),
        model.display(),
        teacher.display(),
        // The Python peer's per-coordinate ε = 0.2 × median nearest-neighbour distance.
        eps_nn = 0.2 * (hidden as f64).sqrt()
    ))
}

/// The job's examples, the bench it runs in, and its pipeline file.
struct Job<'a> {
    n: usize,
    b: &'a Bench,
    toml: String,
}

impl Job<'_> {
    /// `augment` with the teacher in `dtype`, into its own dataset (`peer`, `peer-bf16`, to
    /// compare their rows): its work seconds and row.
    fn augment(&self, dtype: &str) -> Result<(f64, Value)> {
        let name = if dtype == "f32" {
            "peer".to_string()
        } else {
            format!("peer-{dtype}")
        };
        let p = self.b.tmp.join(format!("{name}.toml"));
        let toml = self
            .toml
            .replacen("name = \"peer\"", &format!("name = \"{name}\""), 1);
        std::fs::write(&p, toml)?;
        let (wall, rss) = run_augment_as(&p, self.b, dtype)?;
        let shard = shard_timings(&self.b.tmp.join(format!("out/sst2/{name}/timings.json")))?;
        let work = shard["seconds"].as_f64().unwrap_or(f64::NAN);
        let stages = shard["stage_seconds"].clone();
        Ok((
            work,
            json!({ "work_seconds": work, "process_seconds": wall,
            "examples_per_s": self.n as f64 / work, "peak_rss_mib": rss, "stage_seconds": stages }),
        ))
    }

    /// `bench/peer.py` on the same job: its work seconds and row.
    fn python(&self, teacher: &Path) -> Result<(f64, Value)> {
        let data = self.b.glue_dir.join("sst2/train-00000-of-00001.parquet");
        let t = Instant::now();
        let o = std::process::Command::new("python3")
            .arg("bench/peer.py")
            .args([teacher, &data, &self.b.tmp.join("peer.parquet")])
            .args([
                self.n.to_string(),
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
        let work = py["work_seconds"].as_f64().unwrap_or(f64::NAN);
        Ok((
            work,
            json!({ "work_seconds": work, "process_seconds": wall,
                "examples_per_s": self.n as f64 / work }),
        ))
    }
}

/// The section's tables: both pipelines, the speed-up, bf16's identical rows, and
/// `augment`'s time by stage.
pub(crate) fn markdown(s: &mut String, r: &Value) {
    let Some(p) = r.get("peer").filter(|t| !t.is_null()) else {
        return;
    };
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
                num(&v["work_seconds"]),
                num(&v["process_seconds"]),
                num(&v["examples_per_s"])
            );
        }
    }
    if let Some(x) = p.get("speedup_work") {
        let _ = writeln!(
            s,
            "\naugment is **{}×** the Python pipeline on the work.",
            num(x)
        );
    }
    if let Some(x) = p.get("speedup_work_bf16") {
        let _ = writeln!(
            s,
            "With `--dtype bf16` (the dense layers in bf16 on AVX-512 BF16), **{}×**.",
            num(x)
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
        let _ = writeln!(s, "| {k} | {} | {:.1}% |", num(v), 100.0 * x / total);
    }
    s.push('\n');
}
