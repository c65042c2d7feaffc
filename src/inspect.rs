//! `augpro inspect`: per-method diagnostics computed with polars over the shards, and a
//! few decoded augmented rows side by side with their sources.

use crate::shards::manifest::{shard_paths, TIMINGS};
use crate::shards::reader::ShardReader;
use crate::shards::{Row, ShardSchema};
use crate::storage::Location;
use anyhow::{Context, Result};
use polars::prelude::*;
use std::collections::HashMap;

/// Per-method row counts and changed-token statistics over every shard of `dir`.
pub fn method_table(dir: &Location) -> Result<DataFrame> {
    let (_, paths) = shard_paths(dir)?;
    // Only the columns the table needs, from files opened here (the manifest's, checked by
    // `shard_paths`): polars globbing or partition discovery never sees a path. polars is
    // built without its cloud readers, so an object is fetched and read here.
    let columns = Some(
        ["method", "changed_tokens", "input_ids"]
            .map(String::from)
            .to_vec(),
    );
    let frames = paths
        .iter()
        .map(|loc| -> Result<LazyFrame> {
            let df = match loc.as_local() {
                Some(p) => {
                    let f = std::fs::File::open(p)
                        .map_err(|e| anyhow::anyhow!("{loc}: cannot read: {e}"))?;
                    ParquetReader::new(f).with_columns(columns.clone()).finish()
                }
                None => ParquetReader::new(std::io::Cursor::new(loc.read()?))
                    .with_columns(columns.clone())
                    .finish(),
            };
            let df = df.map_err(|e| anyhow::anyhow!("{loc}: unreadable shard: {e}"))?;
            Ok(df.lazy())
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
    let timings = dir.join(TIMINGS);
    if let Some(t) = timings.read_bounded(None)? {
        let t = serde_json::from_slice(&t).with_context(|| format!("{timings}: not JSON"))?;
        println!(
            "source examples/s per method (teacher time included): {}",
            method_rates(&t).join(", ")
        );
    }
    let task = crate::data::manifest_task(&m)?;
    let schema = ShardSchema::new(task);
    // Example rows come from the first shard's files (real and virtual rows).
    let first = m.shards.first().map(|s| s.files.len()).unwrap_or(0);
    let mut rows: Vec<Row> = Vec::new();
    for p in paths.iter().take(first) {
        rows.extend(first_rows(&schema, p, 8192)?);
    }
    print_examples(&rows, n);
    Ok(())
}

/// `method examples/s` over all shards, from `timings.json`.
fn method_rates(t: &serde_json::Value) -> Vec<String> {
    let mut per: std::collections::BTreeMap<String, (f64, f64)> = Default::default();
    for shard in t.as_object().into_iter().flat_map(|o| o.values()) {
        let ex = shard["examples"].as_f64().unwrap_or(0.0);
        for (k, v) in shard["method_seconds"].as_object().into_iter().flatten() {
            let e = per.entry(k.clone()).or_default();
            e.0 += ex;
            e.1 += v.as_f64().unwrap_or(0.0);
        }
    }
    per.iter()
        .map(|(k, (ex, s))| format!("{k} {:.0}", ex / s.max(1e-9)))
        .collect()
}

/// The first `limit` rows of a shard file (whole record batches, so a few more).
fn first_rows(schema: &ShardSchema, p: &Location, limit: usize) -> Result<Vec<Row>> {
    let mut r = ShardReader::open(p, schema)?;
    let mut rows = Vec::new();
    while rows.len() < limit {
        match r.next_rows(schema)? {
            Some(b) => rows.extend(b),
            None => break,
        }
    }
    Ok(rows)
}

/// Up to `n` rows of each augmentation method, each beside its source.
fn print_examples(rows: &[Row], n: usize) {
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
            println!(
                "  source : {src}\n  {method:<7}: {}   [{}; teacher {:?}]",
                p.texts.join(" || "),
                row_setting(p),
                p.teacher_logits
            );
        }
    }
}

/// λ or ε of an augmented row, and how many of its tokens changed.
fn row_setting(p: &Row) -> String {
    let changed = p
        .changed_tokens
        .map(|c| c.to_string())
        .unwrap_or("-".into());
    match (p.lambda, p.epsilon) {
        (Some(l), _) => format!("λ={l:.2} changed={changed}"),
        (_, Some(e)) => format!("ε={e:.3} changed={changed}"),
        _ => format!("changed={changed}"),
    }
}
