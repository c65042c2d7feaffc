//! End to end: `augment` on SST-2 training examples with every method, its time per method
//! and per stage.

use crate::augment_runs::{bench_pipeline, run_augment, shard_timings};
use crate::{num, Bench};
use anyhow::Result;
use serde_json::{json, Map, Value};
use std::fmt::Write as _;

/// Every method, at the settings the bench has always used.
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

/// The section: one `augment` of 1,024 examples (256 when `quick`) with every method.
pub(crate) fn measure(b: &Bench) -> Result<Value> {
    let n = if b.quick { 256 } else { 1024 };
    eprintln!("end to end: augment {n} SST-2 examples with every method…");
    let p = bench_pipeline(&b.tmp, "e2e", n, ALL_METHODS)?;
    let (wall, rss) = run_augment(&p, b)?;
    let shard = shard_timings(&b.tmp.join("out/sst2/e2e/timings.json"))?;
    let total = shard["seconds"].as_f64().unwrap_or(f64::NAN);
    let methods = seconds_map(
        &shard["method_seconds"],
        |s| json!({ "seconds": s, "examples_per_s": n as f64 / s }),
    );
    let stages = seconds_map(
        &shard["stage_seconds"],
        |s| json!({ "seconds": s, "share": s / total }),
    );
    let accounted: f64 = stages
        .values()
        .map(|v| v["seconds"].as_f64().unwrap_or(0.0))
        .sum();
    Ok(
        json!({ "examples": n, "augment_seconds": total, "wall_seconds_with_startup": wall, "examples_per_s": n as f64 / total, "peak_rss_mib": rss, "methods": methods, "stages": stages, "other_share": 1.0 - accounted / total }),
    )
}

/// A `{name: seconds}` object of the timings, each entry turned into `row(seconds)`.
fn seconds_map(seconds: &Value, row: impl Fn(f64) -> Value) -> Map<String, Value> {
    seconds
        .as_object()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, row(v.as_f64().unwrap_or(f64::NAN))))
        .collect()
}

/// The section's tables: per method, and per stage with its share.
pub(crate) fn markdown(s: &mut String, r: &Value) {
    let Some(e) = r.get("end_to_end").filter(|t| !t.is_null()) else {
        return;
    };
    let _ = writeln!(s, "## End to end: `augment` on {} SST-2 examples, all methods\n\n{} examples/s overall ({} s), peak RSS {} MiB.\n\n| method | seconds | examples/s |\n|---|---:|---:|", e["examples"], num(&e["examples_per_s"]), num(&e["augment_seconds"]), num(&e["peak_rss_mib"]));
    for (k, v) in e["methods"].as_object().into_iter().flatten() {
        let _ = writeln!(
            s,
            "| {k} | {} | {} |",
            num(&v["seconds"]),
            num(&v["examples_per_s"])
        );
    }
    let _ = writeln!(s, "\n| stage | seconds | share |\n|---|---:|---:|");
    for (k, v) in e["stages"].as_object().into_iter().flatten() {
        let _ = writeln!(
            s,
            "| {k} | {} | {:.1}% |",
            num(&v["seconds"]),
            100.0 * v["share"].as_f64().unwrap_or(0.0)
        );
    }
    let _ = writeln!(
        s,
        "| other (glue code, row assembly) | | {:.1}% |\n",
        100.0 * e["other_share"].as_f64().unwrap_or(0.0)
    );
}
