//! `augpro inspect`: per-method diagnostics computed with polars over the shards, and a
//! few decoded augmented rows side by side with their sources.

use crate::shards::manifest::shard_paths;
use crate::shards::reader::ShardReader;
use crate::shards::{Row, ShardSchema};
use crate::storage::Location;
use anyhow::Result;
use polars::prelude::*;
use std::collections::HashMap;

/// Per-method row counts and changed-token statistics over every shard of `dir`.
pub fn method_table(dir: &Location) -> Result<DataFrame> {
    let (_, paths) = shard_paths(dir)?;
    let frames = paths
        .iter()
        .map(|loc| -> Result<LazyFrame> {
            Ok(match loc.as_local() {
                Some(p) => LazyFrame::scan_parquet(
                    PlRefPath::new(p.to_string_lossy().to_string()),
                    ScanArgsParquet::default(),
                )?,
                // polars is built without its cloud readers: fetch the object, read it here.
                None => ParquetReader::new(std::io::Cursor::new(loc.read()?))
                    .finish()?
                    .lazy(),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let lf = concat(frames, UnionArgs::default())?;
    let df = lf
        .group_by([col("method")])
        .agg([
            len().alias("rows"),
            col("changed_tokens")
                .cast(DataType::Float64)
                .mean()
                .alias("mean_changed_tokens"),
            col("changed_tokens")
                .eq(lit(0))
                .sum()
                .alias("unchanged_rows"),
            col("input_ids")
                .list()
                .len()
                .cast(DataType::Float64)
                .mean()
                .alias("mean_len"),
        ])
        .sort(["method"], SortMultipleOptions::default())
        .collect()
        .map_err(|e| anyhow::anyhow!("{dir}: polars query failed: {e}"))?;
    Ok(df)
}

/// Prints the diagnostics table and `n` example rows per method with their sources.
pub fn print(dir: &Location, n: usize) -> Result<()> {
    let (m, paths) = shard_paths(dir)?;
    println!(
        "{dir} — task {}, {} rows in {} shard(s), teacher {}",
        m.task,
        m.rows,
        m.shards.len(),
        m.teacher
            .get("path")
            .and_then(|v| v.as_str())
            .unwrap_or("?")
    );
    println!("{}", method_table(dir)?);
    println!("diagnostics (manifest):");
    for (k, d) in &m.diagnostics {
        println!("  {}", d.summary(k, m.num_labels == 1));
    }
    if let Some(t) = dir.join("timings.json").read_opt()? {
        let t: serde_json::Value = serde_json::from_slice(&t)?;
        let mut per: std::collections::BTreeMap<String, (f64, f64)> = Default::default();
        for shard in t.as_object().into_iter().flat_map(|o| o.values()) {
            let ex = shard["examples"].as_f64().unwrap_or(0.0);
            for (k, v) in shard["method_seconds"].as_object().into_iter().flatten() {
                let e = per.entry(k.clone()).or_default();
                e.0 += ex;
                e.1 += v.as_f64().unwrap_or(0.0);
            }
        }
        let rates: Vec<String> = per
            .iter()
            .map(|(k, (ex, s))| format!("{k} {:.0}", ex / s.max(1e-9)))
            .collect();
        println!(
            "source examples/s per method (teacher time included): {}",
            rates.join(", ")
        );
    }
    let task = crate::glue::task(&m.task)?;
    let schema = ShardSchema::new(task);
    // Example rows come from the first shard's files (real and virtual rows).
    let first = m.shards.first().map(|s| s.files.len()).unwrap_or(0);
    let mut rows: Vec<Row> = Vec::new();
    for p in paths.iter().take(first) {
        let mut r = ShardReader::open(p, &schema)?;
        let mut got = 0;
        while got < 8192 {
            match r.next_rows(&schema)? {
                Some(b) => {
                    got += b.len();
                    rows.extend(b)
                }
                None => break,
            }
        }
    }
    let originals: HashMap<i64, &Row> = rows
        .iter()
        .filter(|r| r.method == "original")
        .map(|r| (r.idx, r))
        .collect();
    for method in crate::shards::schema::METHODS.iter().skip(1) {
        // Prefer sentences of some length: rows are processed shortest first.
        let mut picks: Vec<&Row> = rows
            .iter()
            .filter(|r| r.method == *method && r.input_ids.len() >= 12)
            .take(n)
            .collect();
        if picks.is_empty() {
            picks = rows
                .iter()
                .filter(|r| r.method == *method)
                .take(n)
                .collect();
        }
        if picks.is_empty() {
            continue;
        }
        println!("\n== {method}");
        for p in picks {
            let src = originals
                .get(&p.idx)
                .map(|o| o.texts.join(" || "))
                .unwrap_or_default();
            let extra = match (p.lambda, p.epsilon, p.changed_tokens) {
                (Some(l), _, c) => format!(
                    "λ={l:.2} changed={}",
                    c.map(|c| c.to_string()).unwrap_or("-".into())
                ),
                (_, Some(e), c) => format!(
                    "ε={e:.3} changed={}",
                    c.map(|c| c.to_string()).unwrap_or("-".into())
                ),
                (_, _, c) => format!("changed={}", c.map(|c| c.to_string()).unwrap_or("-".into())),
            };
            println!(
                "  source : {src}\n  {method:<7}: {}   [{extra}; teacher {:?}]",
                p.texts.join(" || "),
                p.teacher_logits
            );
        }
    }
    Ok(())
}
