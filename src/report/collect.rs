//! `augpro report --collect`: one GLUE table from each task's own `results.json`, training
//! nothing. Tasks compared by separate commands (on other days, or on CPUs whose kernels
//! give other bits, so that no one command could reuse every task's runs) still make one
//! table; each task keeps the command that made it.

use super::{suffix, write_glue, ReportOptions, TaskResult};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Where one column of a collected table comes from.
#[derive(Debug, Clone, Serialize)]
pub struct Source {
    /// Task.
    pub task: String,
    /// The task's `results.json`.
    pub file: String,
    /// The command that made it.
    pub command: String,
}

/// The part of a task's `results.json` the table needs.
#[derive(Deserialize)]
struct TaskFile {
    command: String,
    preset: String,
    tuned: bool,
    result: TaskResult,
}

/// Reads every task's results and writes `<out>/glue[-<tag>]/results.{json,md}`; returns
/// that directory.
pub fn run(o: &ReportOptions) -> Result<PathBuf> {
    let mut results = Vec::new();
    let mut sources = Vec::new();
    for task in &o.tasks {
        let (r, source) = read_task(o, task)?;
        results.push(r);
        sources.push(source);
    }
    write_glue(o, &results, &sources)
}

/// One task's results, checked against the options: the same preset, tuned or not, and
/// the task it names.
fn read_task(o: &ReportOptions, task: &str) -> Result<(TaskResult, Source)> {
    let path = o
        .out
        .join(format!("{task}{}", suffix(o)))
        .join("results.json");
    let file = path.display().to_string();
    let bytes = std::fs::read(&path).with_context(|| {
        format!("{file}: cannot read the task's results (run its comparison first, with the same --out and --tag)")
    })?;
    let f: TaskFile = serde_json::from_slice(&bytes)
        .with_context(|| format!("{file}: not the results.json of a task's comparison"))?;
    if f.preset != o.preset {
        bail!(
            "{file}: preset `{}`, expected `{}` (--preset)",
            f.preset,
            o.preset
        );
    }
    if f.tuned != o.tune {
        let want = if o.tune {
            "tuned (--tune)"
        } else {
            "untuned (no --tune)"
        };
        bail!("{file}: tuned is {}, expected {want}", f.tuned);
    }
    if f.result.task != task {
        bail!("{file}: result.task `{}`, expected `{task}`", f.result.task);
    }
    let source = Source {
        task: task.to_string(),
        file,
        command: f.command,
    };
    Ok((f.result, source))
}
