//! Peak memory of `augment` as its input grows: SST-2 examples with AugPro-Mix, and a
//! described CSV whose train file grows while the examples augmented stay 16.

use crate::augment_runs::{bench_pipeline, described_csv_pipeline, run_augment};
use crate::{num, Bench};
use anyhow::Result;
use serde_json::{json, Value};
use std::fmt::Write as _;

/// The section: `(memory, memory_csv)`, one row per size.
pub(crate) fn measure(b: &Bench) -> Result<(Value, Value)> {
    let sizes: &[usize] = if b.quick {
        &[250, 500, 1000]
    } else {
        &[1000, 4000, 16000]
    };
    let mut rows = vec![];
    for &n in sizes {
        eprintln!("memory: augment {n} examples (original + augpro_mix)…");
        let p = bench_pipeline(
            &b.tmp,
            &format!("mem{n}"),
            n,
            "[methods.augpro_mix]\nalpha = 1.0\nlambda_mode = \"position\"\nlambda_min = 0.35\n",
        )?;
        let (wall, rss) = run_augment(&p, b)?;
        rows.push(json!({ "examples": n, "peak_rss_mib": rss, "wall_seconds": wall }));
    }
    let sizes: &[usize] = if b.quick {
        &[10_000, 100_000]
    } else {
        &[100_000, 1_000_000]
    };
    let mut csv_rows = vec![];
    for &n in sizes {
        eprintln!("memory: augment a described CSV of {n} train rows…");
        let p = described_csv_pipeline(&b.tmp, &b.glue_dir, n)?;
        let (wall, rss) = run_augment(&p, b)?;
        csv_rows.push(json!({ "csv_rows": n, "peak_rss_mib": rss, "wall_seconds": wall }));
    }
    Ok((json!(rows), json!(csv_rows)))
}

/// The section's tables: the described CSV, then the SST-2 examples.
pub(crate) fn markdown(s: &mut String, r: &Value) {
    if let Some(m) = r["memory_csv"].as_array() {
        let _ = writeln!(s, "## Peak memory of `augment` on a described CSV\n\n16 source examples augmented, after a small teacher fine-tune (320 examples, which sets the peak); the class-name scan of the string labels, the dev split and the source hash stream every train row.\n\n| train rows | peak RSS MiB | wall s |\n|---:|---:|---:|");
        rows(s, m, "csv_rows");
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
        rows(s, m, "examples");
    }
}

/// One table row per measurement: its size (`size_key`), peak RSS and wall time.
fn rows(s: &mut String, rows: &[Value], size_key: &str) {
    for row in rows {
        let _ = writeln!(
            s,
            "| {} | {} | {} |",
            row[size_key],
            num(&row["peak_rss_mib"]),
            num(&row["wall_seconds"])
        );
    }
}
