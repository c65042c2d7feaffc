//! `augpro inspect`: per-method diagnostics computed with polars over the shards, and a
//! few decoded augmented rows side by side with their sources.

use crate::shards::manifest::shard_paths;
use crate::shards::reader::ShardReader;
use crate::shards::{Row, ShardSchema};
use anyhow::Result;
use polars::prelude::*;
use std::collections::HashMap;
use std::path::Path;

/// Per-method row counts and changed-token statistics over every shard of `dir`.
pub fn method_table(dir: &Path) -> Result<DataFrame> {
    let (_, paths) = shard_paths(dir)?;
    let frames = paths
        .iter()
        .map(|p| LazyFrame::scan_parquet(PlRefPath::new(p.to_string_lossy().to_string()), ScanArgsParquet::default()))
        .collect::<PolarsResult<Vec<_>>>()?;
    let lf = concat(frames, UnionArgs::default())?;
    let df = lf
        .group_by([col("method")])
        .agg([
            len().alias("rows"),
            col("changed_tokens").cast(DataType::Float64).mean().alias("mean_changed_tokens"),
            col("changed_tokens").eq(lit(0)).sum().alias("unchanged_rows"),
            col("input_ids").list().len().cast(DataType::Float64).mean().alias("mean_len"),
        ])
        .sort(["method"], SortMultipleOptions::default())
        .collect()
        .map_err(|e| anyhow::anyhow!("{}: polars query failed: {e}", dir.display()))?;
    Ok(df)
}

/// Prints the diagnostics table and `n` example rows per method with their sources.
pub fn print(dir: &Path, n: usize) -> Result<()> {
    let (m, paths) = shard_paths(dir)?;
    println!("{} — task {}, {} rows in {} shard(s), teacher {}", dir.display(), m.task, m.rows, m.shards.len(), m.teacher.get("path").and_then(|v| v.as_str()).unwrap_or("?"));
    println!("{}", method_table(dir)?);
    println!("diagnostics (manifest):");
    for (k, d) in &m.diagnostics {
        println!("  {k:<14} changed {:>5.1}% of positions, {:>5.1}% rows unchanged, teacher agrees with source label {:>5.1}%", 100.0 * d.changed_position_rate, 100.0 * d.unchanged_row_rate, 100.0 * d.teacher_agreement);
    }
    let task = crate::glue::task(&m.task)?;
    let schema = ShardSchema::new(task);
    let Some(first) = paths.first() else { return Ok(()) };
    let mut r = ShardReader::open(first, &schema)?;
    let rows: Vec<Row> = r.next_rows(&schema)?.unwrap_or_default();
    let originals: HashMap<i64, &Row> = rows.iter().filter(|r| r.method == "original").map(|r| (r.idx, r)).collect();
    for method in crate::shards::schema::METHODS.iter().skip(1) {
        let picks: Vec<&Row> = rows.iter().filter(|r| r.method == *method).take(n).collect();
        if picks.is_empty() {
            continue;
        }
        println!("\n== {method}");
        for p in picks {
            let src = originals.get(&p.idx).map(|o| o.texts.join(" || ")).unwrap_or_default();
            let extra = match (p.lambda, p.epsilon, p.changed_tokens) {
                (Some(l), _, c) => format!("λ={l:.2} changed={}", c.map(|c| c.to_string()).unwrap_or("-".into())),
                (_, Some(e), c) => format!("ε={e:.3} changed={}", c.map(|c| c.to_string()).unwrap_or("-".into())),
                (_, _, c) => format!("changed={}", c.map(|c| c.to_string()).unwrap_or("-".into())),
            };
            println!("  source : {src}\n  {method:<7}: {}   [{extra}; teacher {:?}]", p.texts.join(" || "), p.teacher_logits);
        }
    }
    Ok(())
}
