//! `augpro report`: one augmentation run, then students trained per method with the same
//! step budget over several seeds; the runs are aggregated in a fixed order, plotters
//! draws, and the results go to `reports/<task>/results.{json,md}` plus PNG plots.

use crate::config::PipelineConfig;
use crate::data::resolve_glue_dir;
use crate::glue;
use crate::pipeline::{self, RunOptions};
use crate::shards::manifest::read_manifest;
use crate::student::{self, StudentConfig, StudentMetrics};
use crate::util::atomic_write;
use anyhow::{bail, Context, Result};
use candle_core::Device;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// Methods compared, each trained as `original` + itself (plain KD is `original` alone).
pub const COMPARED: &[&str] = &[
    "original",
    "token_replace",
    "mixup",
    "fgsm",
    "augpro_mix",
    "augpro_fgsm",
];

/// What to compare and how big.
#[derive(Debug, Clone)]
pub struct ReportOptions {
    /// GLUE task.
    pub task: String,
    /// `smoke`, `low` or `paper`.
    pub preset: String,
    /// Source examples to augment (overrides the preset).
    pub train_examples: Option<usize>,
    /// Seeds per method.
    pub seeds: Option<usize>,
    /// Student steps per run.
    pub steps: Option<usize>,
    /// Base pipeline (defaults to `pipelines/smoke.toml` for smoke, else `pipelines/<task>.toml`).
    pub pipeline: Option<PathBuf>,
    /// Report root.
    pub out: PathBuf,
    /// GLUE directory.
    pub glue_dir: Option<PathBuf>,
    /// Methods to compare (all of [`COMPARED`] when `None`; list `original` to get the Δ column).
    pub methods: Option<Vec<String>>,
    /// `key=value` overrides applied to the base pipeline.
    pub overrides: Vec<String>,
    /// Variant name appended to the shard and report directory names.
    pub tag: Option<String>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
struct Run {
    method: String,
    seed: u64,
    value: f64,
    rows: usize,
    steps: usize,
    train_seconds: f64,
    curve: Vec<(usize, f64)>,
}

/// Runs the comparison; returns the report directory.
pub fn run(o: &ReportOptions, device: &Device) -> Result<PathBuf> {
    let task = glue::task(&o.task)?;
    let (examples, seeds, steps) = match o.preset.as_str() {
        "smoke" => (96, 2, 12),
        "low" => (2000, 3, 400),
        "paper" => (usize::MAX, 3, 0),
        p => bail!("--preset {p}: expected smoke, low or paper"),
    };
    let examples = o.train_examples.unwrap_or(examples);
    let seeds = o.seeds.unwrap_or(seeds);
    let pipe_path = o.pipeline.clone().unwrap_or_else(|| {
        if o.preset == "smoke" {
            PathBuf::from("pipelines/smoke.toml")
        } else {
            PathBuf::from(format!("pipelines/{}.toml", task.name))
        }
    });
    let mut cfg = PipelineConfig::load_with(&pipe_path, &o.overrides)?;
    if cfg.task != task.name {
        bail!(
            "{}: pipeline is for task `{}`, not `{}`",
            pipe_path.display(),
            cfg.task,
            task.name
        );
    }
    if let Some(t) = &o.tag {
        if t.is_empty()
            || !t
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        {
            bail!("--tag {t:?}: expected letters, digits, '-', '_' or '.'");
        }
    }
    if let Some(ms) = &o.methods {
        if let Some(m) = ms.iter().find(|m| !COMPARED.contains(&m.as_str())) {
            bail!(
                "--methods: unknown method `{m}` (expected some of {})",
                COMPARED.join(", ")
            );
        }
        cfg.methods.retain(ms);
    }
    // Shards of a different configuration need their own directory.
    let suffix = match (&o.tag, &o.methods) {
        (Some(t), _) => format!("-{t}"),
        (None, Some(ms)) => format!("-{}", ms.join("+")),
        (None, None) => String::new(),
    };
    cfg.name = format!(
        "report-{}-{}{suffix}",
        o.preset,
        if examples == usize::MAX {
            "all".into()
        } else {
            examples.to_string()
        }
    );
    cfg.max_examples = (examples != usize::MAX).then_some(examples);
    cfg.validate()?;
    let glue_dir = resolve_glue_dir(o.glue_dir.as_deref());
    let shards = pipeline::run(
        &cfg,
        &RunOptions {
            glue_dir: Some(glue_dir.clone()),
            ..Default::default()
        },
        device,
    )?;
    let manifest = read_manifest(&shards)?;
    let timings: serde_json::Value = shards
        .join("timings.json")
        .read_opt()?
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let primary = task.primary_metric();
    let teacher_score = manifest
        .teacher
        .get("metrics")
        .and_then(|m| m.as_object())
        .and_then(|m| m.values().next())
        .and_then(|v| v.get(primary))
        .and_then(|v| v.as_f64())
        .unwrap_or(f64::NAN);
    let orig_rows = manifest.method_rows.get("original").copied().unwrap_or(0) as usize;
    let steps = o.steps.unwrap_or(if steps == 0 {
        3 * (2 * orig_rows).div_ceil(32)
    } else {
        steps
    });
    let dir = o.out.join(format!("{}{suffix}", task.name));
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("{}: cannot create report directory", dir.display()))?;
    let mut runs = Vec::new();
    let wanted = |m: &str| {
        o.methods
            .as_ref()
            .is_none_or(|ms| ms.iter().any(|x| x == m))
    };
    for method in COMPARED.iter().filter(|m| wanted(m)) {
        if !manifest.method_rows.contains_key(*method) {
            tracing::warn!("method {method} not in the shards; skipped");
            continue;
        }
        let methods: Vec<String> = if *method == "original" {
            vec!["original".into()]
        } else {
            vec!["original".into(), method.to_string()]
        };
        for seed in 0..seeds as u64 {
            let out = dir.join("students").join(format!("{method}-seed{seed}"));
            // A finished run on the same shards with the same budget is reused, so an
            // interrupted report resumes and `--seeds` can be raised later.
            let key = serde_json::json!({ "shards_config_sha256": manifest.config_sha256, "steps": steps, "seed": seed, "methods": methods });
            let done = out.join("report-run.json");
            if let Some(run) = std::fs::read(&done)
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .filter(|v| v["key"] == key)
                .and_then(|v| serde_json::from_value::<Run>(v["run"].clone()).ok())
            {
                eprintln!("student: {method} seed {seed}: reusing {}", out.display());
                runs.push(run);
                continue;
            }
            let scfg = StudentConfig {
                max_steps: Some(steps),
                seed,
                methods: methods.clone(),
                ..Default::default()
            };
            eprintln!("student: {method} seed {seed} ({steps} steps)");
            let m: StudentMetrics = student::train(&shards, task, &glue_dir, &out, &scfg, device)?;
            let run = Run {
                method: method.to_string(),
                seed,
                value: student::first_value(&m.validation, primary),
                rows: m.rows_available,
                steps: m.steps,
                train_seconds: m.train_seconds,
                curve: m.curve.iter().map(|c| (c.step, c.value)).collect(),
            };
            atomic_write(
                &done,
                serde_json::to_string_pretty(&serde_json::json!({ "key": key, "run": run }))?
                    .as_bytes(),
            )?;
            runs.push(run);
        }
    }
    let table = aggregate(&runs);
    let base = table
        .iter()
        .find(|r| r.method == "original")
        .map(|r| r.mean)
        .unwrap_or(f64::NAN);
    let aug_secs = |m: &str| -> f64 {
        timings
            .as_object()
            .map(|o| {
                o.values()
                    .filter_map(|v| {
                        v.get("method_seconds")
                            .and_then(|s| s.get(m))
                            .and_then(|x| x.as_f64())
                    })
                    .sum()
            })
            .unwrap_or(0.0)
    };
    let mut md = format!(
        "# {} — student comparison ({} preset)\n\nTeacher ({}) validation {primary}: {:.4}. Student: first 3 layers of the base encoder, {steps} steps of batch 32 per run, {seeds} seed(s); augmented source examples: {}.\n\n| method | {primary} mean ± std | Δ vs plain KD | rows used | augmentation s | student s (mean) |\n|---|---:|---:|---:|---:|---:|\n",
        task.name, o.preset, manifest.teacher.get("path").and_then(|v| v.as_str()).unwrap_or("?"), teacher_score, manifest.source_examples
    );
    for r in &table {
        let delta = if base.is_nan() {
            "–".to_string()
        } else {
            format!("{:+.4}", r.mean - base)
        };
        md.push_str(&format!(
            "| {} | {:.4} ± {:.4} | {delta} | {} | {:.1} | {:.1} |\n",
            r.method,
            r.mean,
            r.std,
            r.rows,
            aug_secs(&r.method),
            r.train_seconds
        ));
    }
    md.push_str(&format!(
        "\nShards: `{}`. Validation inputs truncated to {} tokens. Plots: `bars.png`, `curves.png`.\n",
        shards,
        crate::teacher::EVAL_MAX_SEQ_LEN
    ));
    let json = serde_json::json!({
        "task": task.name, "preset": o.preset, "metric": primary, "teacher_score": teacher_score,
        "steps": steps, "seeds": seeds, "source_examples": manifest.source_examples, "shards": shards.to_string(),
        "eval_max_seq_len": crate::teacher::EVAL_MAX_SEQ_LEN,
        "methods": table, "runs": runs,
    });
    atomic_write(
        &dir.join("results.json"),
        serde_json::to_string_pretty(&json)?.as_bytes(),
    )?;
    atomic_write(&dir.join("results.md"), md.as_bytes())?;
    if let Err(e) = plots(&dir, &table, &runs, primary) {
        tracing::warn!("plots not written: {e:#}");
    }
    print!("{md}");
    Ok(dir)
}

/// Mean and standard deviation per method.
#[derive(Debug, Clone, Serialize)]
pub struct MethodSummary {
    /// Method.
    pub method: String,
    /// Mean of the metric over seeds.
    pub mean: f64,
    /// Sample standard deviation over seeds (0 for one seed).
    pub std: f64,
    /// Rows used.
    pub rows: usize,
    /// Mean student training seconds.
    pub train_seconds: f64,
    /// Seeds.
    pub n: usize,
}

/// Mean and sample standard deviation per method, methods in the order they first appear.
/// Each method's runs are summed in seed order, so the figures are the same to the last bit
/// however the runs were gathered.
fn aggregate(runs: &[Run]) -> Vec<MethodSummary> {
    let mut methods: Vec<&str> = Vec::new();
    for r in runs {
        if !methods.contains(&r.method.as_str()) {
            methods.push(&r.method);
        }
    }
    methods
        .into_iter()
        .map(|m| {
            let mut rs: Vec<&Run> = runs.iter().filter(|r| r.method == m).collect();
            rs.sort_by_key(|r| r.seed);
            let n = rs.len();
            let mean = |f: fn(&Run) -> f64| rs.iter().map(|r| f(r)).sum::<f64>() / n as f64;
            let mu = mean(|r| r.value);
            let std = if n > 1 {
                (rs.iter().map(|r| (r.value - mu).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
            } else {
                0.0
            };
            MethodSummary {
                method: m.to_string(),
                mean: mu,
                std,
                rows: rs[0].rows,
                train_seconds: mean(|r| r.train_seconds),
                n,
            }
        })
        .collect()
}

fn register_font() -> Result<()> {
    use std::sync::OnceLock;
    static DONE: OnceLock<bool> = OnceLock::new();
    let ok = *DONE.get_or_init(|| {
        for p in [
            "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
            "/usr/share/fonts/TTF/DejaVuSans.ttf",
        ] {
            if let Ok(b) = std::fs::read(p) {
                let b: &'static [u8] = Box::leak(b.into_boxed_slice());
                return plotters::style::register_font(
                    "sans-serif",
                    plotters::style::FontStyle::Normal,
                    b,
                )
                .is_ok();
            }
        }
        false
    });
    if !ok {
        bail!("no TrueType font found (install fonts-dejavu-core)");
    }
    Ok(())
}

fn plots(dir: &Path, table: &[MethodSummary], runs: &[Run], metric: &str) -> Result<()> {
    use plotters::prelude::*;
    register_font()?;
    let e = |e: Box<dyn std::error::Error>| anyhow::anyhow!("{e}");
    {
        let path = dir.join("bars.png");
        let root = BitMapBackend::new(&path, (900, 500)).into_drawing_area();
        root.fill(&WHITE).map_err(|x| e(Box::new(x)))?;
        let lo = table
            .iter()
            .map(|r| r.mean - r.std)
            .fold(f64::INFINITY, f64::min);
        let hi = table
            .iter()
            .map(|r| r.mean + r.std)
            .fold(f64::NEG_INFINITY, f64::max);
        let pad = ((hi - lo) * 0.2).max(0.01);
        let n = table.len();
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!("student {metric} by method (mean ± std)"),
                ("sans-serif", 22),
            )
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), (lo - pad)..(hi + pad))
            .map_err(|x| e(Box::new(x)))?;
        let names: Vec<String> = table.iter().map(|r| r.method.clone()).collect();
        chart
            .configure_mesh()
            .x_labels(n)
            .x_label_formatter(&|x| names.get(x.round() as usize).cloned().unwrap_or_default())
            .y_desc(metric)
            .draw()
            .map_err(|x| e(Box::new(x)))?;
        chart
            .draw_series(table.iter().enumerate().map(|(i, r)| {
                let color = if r.method.starts_with("augpro") {
                    RED.mix(0.7)
                } else {
                    BLUE.mix(0.5)
                };
                Rectangle::new(
                    [(i as f64 - 0.35, lo - pad), (i as f64 + 0.35, r.mean)],
                    color.filled(),
                )
            }))
            .map_err(|x| e(Box::new(x)))?;
        chart
            .draw_series(table.iter().enumerate().map(|(i, r)| {
                ErrorBar::new_vertical(
                    i as f64,
                    r.mean - r.std,
                    r.mean,
                    r.mean + r.std,
                    BLACK.filled(),
                    10,
                )
            }))
            .map_err(|x| e(Box::new(x)))?;
        root.present().map_err(|x| e(Box::new(x)))?;
    }
    {
        let path = dir.join("curves.png");
        let root = BitMapBackend::new(&path, (900, 500)).into_drawing_area();
        root.fill(&WHITE).map_err(|x| e(Box::new(x)))?;
        let pts: Vec<(usize, f64)> = runs.iter().flat_map(|r| r.curve.iter().copied()).collect();
        let xmax = pts.iter().map(|p| p.0).max().unwrap_or(1).max(1) as f64;
        let lo = pts.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
        let hi = pts.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
        let pad = ((hi - lo) * 0.1).max(0.01);
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!("validation {metric} during student training (seed 0)"),
                ("sans-serif", 22),
            )
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..xmax, (lo - pad)..(hi + pad))
            .map_err(|x| e(Box::new(x)))?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc(metric)
            .draw()
            .map_err(|x| e(Box::new(x)))?;
        for (i, r) in runs.iter().filter(|r| r.seed == 0).enumerate() {
            let c = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(
                    r.curve.iter().map(|&(s, v)| (s as f64, v)),
                    c.stroke_width(2),
                ))
                .map_err(|x| e(Box::new(x)))?
                .label(r.method.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|x| e(Box::new(x)))?;
        root.present().map_err(|x| e(Box::new(x)))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{aggregate, Run};

    fn run(method: &str, seed: u64, value: f64, secs: f64) -> Run {
        Run {
            method: method.into(),
            seed,
            value,
            rows: 10,
            steps: 4,
            train_seconds: secs,
            curve: Vec::new(),
        }
    }

    #[test]
    fn aggregation_is_exact_and_independent_of_run_order() {
        let runs = vec![
            run("original", 0, 0.1, 11.1),
            run("original", 1, 0.2, 11.2),
            run("original", 2, 0.3, 11.3),
            run("mixup", 0, 0.5, 1.0),
        ];
        let a = aggregate(&runs);
        assert_eq!(a.len(), 2);
        assert_eq!((a[0].method.as_str(), a[0].n), ("original", 3));
        // Summed in seed order: (0.1 + 0.2) + 0.3, divided by 3.
        assert_eq!(a[0].mean, (0.1 + 0.2 + 0.3) / 3.0);
        assert!((a[0].std - 0.1).abs() < 1e-12, "{}", a[0].std);
        assert_eq!(a[0].train_seconds, (11.1 + 11.2 + 11.3) / 3.0);
        assert_eq!((a[1].mean, a[1].std, a[1].n), (0.5, 0.0, 1));
        // The same runs gathered in another order give the same bits.
        let mut reversed = runs.clone();
        reversed.reverse();
        let b = aggregate(&reversed);
        let key = |v: &[super::MethodSummary]| {
            let mut k: Vec<(String, u64, u64, u64)> = v
                .iter()
                .map(|s| {
                    (
                        s.method.clone(),
                        s.mean.to_bits(),
                        s.std.to_bits(),
                        s.train_seconds.to_bits(),
                    )
                })
                .collect();
            k.sort();
            k
        };
        assert_eq!(key(&a), key(&b));
    }
}
