//! `augpro report`: the method comparison. For each GLUE task, every method is tuned on
//! the dev split carved from train (the same kind of small declared grid for each), then
//! trained at its own dev-best setting over several seeds; the validation split is scored
//! once per final run and never used to choose anything. Results go to
//! `<out>/<task>/results.{json,md}` with plots, and, for several tasks, a GLUE-style table
//! to `<out>/glue/results.{json,md}`. Finished augmentations and student runs are reused,
//! so a long comparison can be built up over several sittings.

mod plots;
pub mod stats;

use crate::config::PipelineConfig;
use crate::data::resolve_glue_dir;
use crate::glue::{self, TaskSpec};
use crate::pipeline::{self, RunOptions};
use crate::shards::manifest::{read_manifest, Manifest};
use crate::storage::Location;
use crate::student::{self, StudentConfig, StudentMetrics};
use crate::util::{atomic_write, sha256_bytes};
use anyhow::{bail, Context, Result};
use candle_core::Device;
use serde::{Deserialize, Serialize};
use stats::{Paired, Summary};
use std::collections::BTreeMap;
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

/// The students' peak learning rate (with the default 6% warm-up and linear decay).
pub const STUDENT_LR: f64 = 3e-4;

/// Stands for the first-round student's checkpoint in a grid setting (AugPro-FGSM with the
/// gradient of KL(teacher ‖ student) taken in the student's space).
const FIRST_ROUND: &str = "@first-round-student";

/// What to compare and how big.
#[derive(Debug, Clone)]
pub struct ReportOptions {
    /// GLUE tasks (one table column each).
    pub tasks: Vec<String>,
    /// `smoke`, `low` or `paper`.
    pub preset: String,
    /// Source examples to augment per task (overrides the preset).
    pub train_examples: Option<usize>,
    /// Seeds per method in the final comparison (overrides the preset).
    pub seeds: Option<usize>,
    /// Tune every method on the dev split over its grid ([`grid`]) first.
    pub tune: bool,
    /// Seeds per grid point when tuning (overrides the preset).
    pub tune_seeds: Option<usize>,
    /// Student steps per run (overrides the preset), for every task or per task.
    pub steps: PerTask<usize>,
    /// Students' peak learning rate (overrides the preset), for every task or per task.
    pub lr: PerTask<f64>,
    /// Encoder layers the student keeps (overrides the preset), for every task or per task.
    pub layers: PerTask<usize>,
    /// Base pipeline (one task only; defaults to `pipelines/smoke.toml` for smoke, else
    /// `pipelines/<task>.toml`).
    pub pipeline: Option<PathBuf>,
    /// Report root.
    pub out: PathBuf,
    /// GLUE directory.
    pub glue_dir: Option<PathBuf>,
    /// Methods to compare besides plain KD (all of [`COMPARED`] when `None`).
    pub methods: Option<Vec<String>>,
    /// `key=value` overrides applied to the base pipeline.
    pub overrides: Vec<String>,
    /// Variant name appended to the shard and report directory names.
    pub tag: Option<String>,
}

/// A value for every task, or per task: `150`, or `sst2=150,cola=600` (from a
/// comma-separated flag).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PerTask<T> {
    all: Option<T>,
    by_task: BTreeMap<String, T>,
}

impl<T: std::str::FromStr + Copy + std::fmt::Display> PerTask<T> {
    /// Parses the items of `--flag`: one bare value, or `task=value` items.
    pub fn parse(flag: &str, items: &[String]) -> Result<Self> {
        let mut out = Self {
            all: None,
            by_task: BTreeMap::new(),
        };
        for it in items {
            let bad = || anyhow::anyhow!("--{flag} {it}: expected a value or task=value");
            match it.split_once('=') {
                Some((t, v)) => {
                    glue::task(t.trim())?;
                    out.by_task
                        .insert(t.trim().to_string(), v.trim().parse().map_err(|_| bad())?);
                }
                None if out.all.is_none() => out.all = Some(it.trim().parse().map_err(|_| bad())?),
                None => bail!("--{flag}: give one bare value at most"),
            }
        }
        Ok(out)
    }

    /// The value for `task`.
    pub fn get(&self, task: &str) -> Option<T> {
        self.by_task.get(task).copied().or(self.all)
    }

    /// Back to the flag's value (`None` when unset).
    fn arg(&self) -> Option<String> {
        let mut v: Vec<String> = self.all.iter().map(|x| x.to_string()).collect();
        v.extend(self.by_task.iter().map(|(t, x)| format!("{t}={x}")));
        (!v.is_empty()).then(|| v.join(","))
    }
}

/// One point of a method's grid: a label and the pipeline overrides that make it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Setting {
    /// Human-readable label.
    pub label: String,
    /// `key=value` pipeline overrides.
    pub set: Vec<String>,
}

impl Setting {
    fn new(label: &str, set: &[&str]) -> Self {
        Self {
            label: label.into(),
            set: set.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// The pipeline's own parameters.
    fn pipeline() -> Self {
        Self::new("pipeline's own", &[])
    }

    /// Short stable id (directory names).
    fn id(&self) -> String {
        if self.set.is_empty() {
            return "pipeline".into();
        }
        sha256_bytes(self.set.join("\n").as_bytes())[..10].to_string()
    }
}

/// The declared tuning grid of a method. The two mixing methods share one grid, so that
/// MixUp at AugPro-Mix's setting differs from it only by the projection; the two
/// gradient-sign methods share the ε values, and AugPro-FGSM also chooses where its
/// gradient comes from.
pub fn grid(method: &str) -> Vec<Setting> {
    let mix = |m: &str| -> Vec<Setting> {
        let mut out = Vec::new();
        for mode in ["sequence", "position"] {
            for (dist, a, lmin) in [("Beta(0.4,0.4)", "0.4", "0"), ("U[0.35,1]", "1.0", "0.35")] {
                out.push(Setting {
                    label: format!("λ {mode}, {dist}"),
                    set: vec![
                        format!("methods.{m}.lambda_mode={mode}"),
                        format!("methods.{m}.alpha={a}"),
                        format!("methods.{m}.lambda_min={lmin}"),
                    ],
                });
            }
        }
        out
    };
    let eps = [2.0, 4.0, 8.0];
    match method {
        "token_replace" => [0.1, 0.2, 0.3]
            .iter()
            .map(|p| Setting {
                label: format!("p {p}"),
                set: vec![format!("methods.token_replace.p={p}")],
            })
            .collect(),
        "mixup" | "augpro_mix" => mix(method),
        "fgsm" => eps
            .iter()
            .map(|e| Setting {
                label: format!("ε_nn {e}"),
                set: vec![format!("methods.fgsm.epsilon_nn={e}")],
            })
            .collect(),
        "augpro_fgsm" => {
            let mut out = Vec::new();
            for e in eps {
                out.push(Setting {
                    label: format!("ε_nn {e}, ∇ teacher CE(gold)"),
                    set: vec![format!("methods.augpro_fgsm.epsilon_nn={e}")],
                });
                out.push(Setting {
                    label: format!("ε_nn {e}, ∇ KL(teacher ‖ 1st-round student)"),
                    set: vec![
                        format!("methods.augpro_fgsm.epsilon_nn={e}"),
                        format!("methods.augpro_fgsm.student={FIRST_ROUND}"),
                    ],
                });
            }
            out
        }
        _ => vec![Setting::pipeline()],
    }
}

/// One finished student run.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Run {
    method: String,
    setting: String,
    seed: u64,
    dev: f64,
    validation: f64,
    rows: usize,
    steps: usize,
    best_step: usize,
    train_seconds: f64,
    curve: Vec<(usize, f64)>,
}

/// A method's line in the final comparison.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Row label (a method, or `mixup @ augpro_mix setting`).
    pub label: String,
    /// Method trained with `original`.
    pub method: String,
    /// The setting (dev-best when tuned).
    pub setting: Setting,
    /// Dev metric over seeds.
    pub dev: Summary,
    /// Validation metric over seeds.
    pub validation: Summary,
    /// Paired validation difference to plain KD (same seeds).
    pub vs_kd: Option<Paired>,
    /// Per-seed validation values.
    pub values: Vec<f64>,
    /// Rows the student had (original + the method's).
    pub rows: usize,
    /// Mean student training seconds.
    pub train_seconds: f64,
}

/// A grid point's tuning result.
#[derive(Debug, Clone, Serialize)]
pub struct GridPoint {
    /// Method.
    pub method: String,
    /// Setting.
    pub setting: Setting,
    /// Mean dev metric over the tuning seeds.
    pub dev: f64,
    /// Rows of the method (augmented rows kept).
    pub method_rows: u64,
    /// Chosen.
    pub chosen: bool,
}

/// One task's results.
#[derive(Debug, Clone, Serialize)]
pub struct TaskResult {
    /// Task.
    pub task: String,
    /// Primary metric.
    pub metric: String,
    /// Teacher's validation metric.
    pub teacher_validation: f64,
    /// Source examples augmented.
    pub source_examples: usize,
    /// Dev examples.
    pub dev_examples: usize,
    /// Student steps per run.
    pub steps: usize,
    /// Students' peak learning rate.
    pub lr: f64,
    /// Encoder layers the student keeps.
    pub layers: usize,
    /// Seeds per final row.
    pub seeds: usize,
    /// Seeds per grid point (0 when not tuned).
    pub tune_seeds: usize,
    /// Final rows, plain KD first.
    pub rows: Vec<Row>,
    /// Tuning results.
    pub grid: Vec<GridPoint>,
    /// AugPro-Mix minus MixUp at the same setting, paired over seeds: what projection alone
    /// does (when both rows exist).
    pub projection_effect: Option<Paired>,
}

struct Budget {
    examples: usize,
    seeds: usize,
    tune_seeds: usize,
    steps: Option<usize>,
    lr: f64,
    layers: usize,
}

fn budget(o: &ReportOptions, task: &TaskSpec) -> Result<Budget> {
    // (source examples, seeds, steps, lr, layers)
    let (examples, seeds, steps, lr, layers) = match o.preset.as_str() {
        "smoke" => (96, 2, Some(12), STUDENT_LR, 3),
        // Each task's student sized on its own dev split with plain KD
        // (`scripts/size-student.sh`, tables in reports/sizing/).
        "low" => {
            let seeds = if task.name == "sst2" { 5 } else { 3 };
            match task.name {
                "stsb" => (1000, seeds, Some(300), 1e-4, 6),
                "mrpc" => (1000, seeds, Some(150), 1e-4, 6),
                "cola" => (1000, seeds, Some(600), 1e-4, 3),
                _ => (1000, seeds, Some(150), STUDENT_LR, 3),
            }
        }
        "paper" => (usize::MAX, 3, None, STUDENT_LR, 3),
        p => bail!("--preset {p}: expected smoke, low or paper"),
    };
    Ok(Budget {
        examples: o.train_examples.unwrap_or(examples),
        seeds: o.seeds.unwrap_or(seeds),
        tune_seeds: if o.tune { o.tune_seeds.unwrap_or(1) } else { 0 },
        steps: o.steps.get(task.name).or(steps),
        lr: o.lr.get(task.name).unwrap_or(lr),
        layers: o.layers.get(task.name).unwrap_or(layers),
    })
}

/// Runs the comparison on every task; returns the directory of the main results file.
pub fn run(o: &ReportOptions, device: &Device) -> Result<PathBuf> {
    if o.tasks.is_empty() {
        bail!("--tasks: expected at least one GLUE task");
    }
    if o.tasks.len() > 1 && o.pipeline.is_some() {
        bail!("--pipeline applies to one task; with several tasks each uses pipelines/<task>.toml");
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
    }
    if o.tune_seeds == Some(0) || o.seeds == Some(0) {
        bail!("--seeds and --tune-seeds must be at least 1");
    }
    let tasks: Vec<&'static TaskSpec> = o
        .tasks
        .iter()
        .map(|t| glue::task(t))
        .collect::<Result<_>>()?;
    let mut results = Vec::new();
    let mut last = PathBuf::new();
    for task in tasks {
        let (r, dir) = run_task(o, task, device)?;
        results.push(r);
        last = dir;
    }
    if results.len() == 1 {
        return Ok(last);
    }
    let dir = o.out.join(format!("glue{}", suffix(o)));
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("{}: cannot create report directory", dir.display()))?;
    let md = glue_table(o, &results);
    atomic_write(
        &dir.join("results.json"),
        serde_json::to_string_pretty(&serde_json::json!({
            "command": command(o), "preset": o.preset, "tuned": o.tune, "tasks": results,
        }))?
        .as_bytes(),
    )?;
    atomic_write(&dir.join("results.md"), md.as_bytes())?;
    print!("{md}");
    Ok(dir)
}

fn suffix(o: &ReportOptions) -> String {
    match (&o.tag, &o.methods) {
        (Some(t), _) => format!("-{t}"),
        (None, Some(ms)) => format!("-{}", ms.join("+")),
        (None, None) => String::new(),
    }
}

/// The command line that regenerates this report.
fn command(o: &ReportOptions) -> String {
    let mut c = format!(
        "augpro report --tasks {} --preset {}",
        o.tasks.join(","),
        o.preset
    );
    if o.tune {
        c.push_str(" --tune");
    }
    if let Some(n) = o.train_examples {
        c.push_str(&format!(" --train-examples {n}"));
    }
    if let Some(n) = o.seeds {
        c.push_str(&format!(" --seeds {n}"));
    }
    if let Some(n) = o.tune_seeds {
        c.push_str(&format!(" --tune-seeds {n}"));
    }
    if let Some(n) = o.steps.arg() {
        c.push_str(&format!(" --steps {n}"));
    }
    if let Some(n) = o.lr.arg() {
        c.push_str(&format!(" --lr {n}"));
    }
    if let Some(n) = o.layers.arg() {
        c.push_str(&format!(" --layers {n}"));
    }
    if let Some(p) = &o.pipeline {
        c.push_str(&format!(" --pipeline {}", p.display()));
    }
    if let Some(ms) = &o.methods {
        c.push_str(&format!(" --methods {}", ms.join(",")));
    }
    for s in &o.overrides {
        c.push_str(&format!(" --set {s}"));
    }
    if let Some(t) = &o.tag {
        c.push_str(&format!(" --tag {t}"));
    }
    c
}

/// Everything one task's runs share.
struct TaskCtx<'a> {
    o: &'a ReportOptions,
    task: &'static TaskSpec,
    base_set: Vec<String>,
    pipe_path: PathBuf,
    glue_dir: PathBuf,
    dir: PathBuf,
    budget: Budget,
    steps: usize,
    device: &'a Device,
    first_round: Option<PathBuf>,
}

impl TaskCtx<'_> {
    /// The shards of one method at one setting (plain KD: `original` alone).
    fn shards(&self, method: &str, setting: &Setting) -> Result<(Location, Manifest)> {
        let mut set = self.base_set.clone();
        set.push(format!(
            "max_examples={}",
            if self.budget.examples == usize::MAX {
                i64::MAX as usize
            } else {
                self.budget.examples
            }
        ));
        for s in &setting.set {
            match s.strip_suffix(FIRST_ROUND) {
                Some(key) => {
                    let p = self
                        .first_round
                        .as_ref()
                        .context("the first-round student is trained before AugPro-FGSM")?;
                    set.push(format!(
                        "{key}{}",
                        toml::Value::String(p.display().to_string())
                    ));
                }
                None => set.push(s.clone()),
            }
        }
        let mut cfg = PipelineConfig::load_with(&self.pipe_path, &set)?;
        if cfg.task != self.task.name {
            bail!(
                "{}: pipeline is for task `{}`, not `{}`",
                self.pipe_path.display(),
                cfg.task,
                self.task.name
            );
        }
        if cfg.dev.fraction <= 0.0 {
            bail!(
                "{}: the report tunes and chooses checkpoints on a dev split: set `dev.fraction` > 0",
                self.pipe_path.display()
            );
        }
        if self.budget.examples == usize::MAX {
            cfg.max_examples = None;
        }
        let keep: Vec<String> = if method == "original" {
            Vec::new()
        } else {
            vec![method.to_string()]
        };
        cfg.methods.retain(&keep);
        cfg.name = format!(
            "report-{}-{}{}-{method}-{}",
            self.o.preset,
            if self.budget.examples == usize::MAX {
                "all".into()
            } else {
                self.budget.examples.to_string()
            },
            suffix(self.o),
            setting.id()
        );
        cfg.validate()?;
        let shards = pipeline::run(
            &cfg,
            &RunOptions {
                glue_dir: Some(self.glue_dir.clone()),
                ..Default::default()
            },
            self.device,
        )?;
        let m = read_manifest(&shards)?;
        Ok((shards, m))
    }

    /// One student run (reused when a finished run of the same configuration exists).
    fn student(
        &self,
        method: &str,
        setting: &Setting,
        shards: &(Location, Manifest),
        seed: u64,
    ) -> Result<Run> {
        let methods: Vec<String> = if method == "original" {
            vec!["original".into()]
        } else {
            vec!["original".into(), method.to_string()]
        };
        let base = StudentConfig::default();
        let scfg = StudentConfig {
            max_steps: Some(self.steps),
            layers: Some(self.budget.layers),
            seed,
            methods: methods.clone(),
            optim: crate::config::OptimConfig {
                lr: self.budget.lr,
                ..base.optim.clone()
            },
            ..base
        };
        let out = self
            .dir
            .join("students")
            .join(format!("{method}-{}-seed{seed}", setting.id()));
        let key = serde_json::json!({
            "shards_config_sha256": shards.1.config_sha256,
            "student": scfg,
        });
        let done = out.join("report-run.json");
        if let Some(run) = std::fs::read(&done)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .filter(|v| v["key"] == key)
            .and_then(|v| serde_json::from_value::<Run>(v["run"].clone()).ok())
        {
            eprintln!(
                "student: {} {method} [{}] seed {seed}: reusing",
                self.task.name, setting.label
            );
            return Ok(run);
        }
        eprintln!(
            "student: {} {method} [{}] seed {seed} ({} steps)",
            self.task.name, setting.label, self.steps
        );
        let m: StudentMetrics = student::train(
            &shards.0,
            self.task,
            &self.glue_dir,
            &out,
            &scfg,
            self.device,
        )?;
        let run = Run {
            method: method.to_string(),
            setting: setting.id(),
            seed,
            dev: crate::metrics::primary(self.task, &m.dev),
            validation: student::first_value(self.task, &m.validation),
            rows: m.rows_available,
            steps: m.steps,
            best_step: m.best_step,
            train_seconds: m.train_seconds,
            curve: m.curve.iter().map(|c| (c.step, c.value)).collect(),
        };
        atomic_write(
            &done,
            serde_json::to_string_pretty(&serde_json::json!({ "key": key, "run": run }))?
                .as_bytes(),
        )?;
        Ok(run)
    }

    fn seeds(&self, method: &str, setting: &Setting, n: usize) -> Result<Vec<Run>> {
        let shards = self.shards(method, setting)?;
        (0..n as u64)
            .map(|s| self.student(method, setting, &shards, s))
            .collect()
    }
}

fn run_task(
    o: &ReportOptions,
    task: &'static TaskSpec,
    device: &Device,
) -> Result<(TaskResult, PathBuf)> {
    let budget = budget(o, task)?;
    let pipe_path = o.pipeline.clone().unwrap_or_else(|| {
        if o.preset == "smoke" && task.name == "sst2" {
            PathBuf::from("pipelines/smoke.toml")
        } else {
            PathBuf::from(format!("pipelines/{}.toml", task.name))
        }
    });
    // The smoke preset shrinks the other tasks' teachers and dev splits to CI size.
    let base_set: Vec<String> =
        if o.preset == "smoke" && pipe_path != Path::new("pipelines/smoke.toml") {
            [
                "teacher.train.max_train_examples=320",
                "teacher.train.epochs=1",
                "dev.max_examples=200",
            ]
            .iter()
            .map(|s| s.to_string())
            .chain(o.overrides.iter().cloned())
            .collect()
        } else {
            o.overrides.clone()
        };
    let glue_dir = resolve_glue_dir(o.glue_dir.as_deref());
    let dir = o.out.join(format!("{}{}", task.name, suffix(o)));
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("{}: cannot create report directory", dir.display()))?;
    let mut cx = TaskCtx {
        o,
        task,
        base_set,
        pipe_path,
        glue_dir,
        dir: dir.clone(),
        steps: 0,
        budget,
        device,
        first_round: None,
    };
    let primary = task.primary_metric();
    // Plain KD first: the reference of every paired difference, and the first-round
    // student of AugPro-FGSM's student-space gradient.
    let kd_setting = Setting::pipeline();
    let kd_shards = cx.shards("original", &kd_setting)?;
    let orig_rows = kd_shards
        .1
        .method_rows
        .get("original")
        .copied()
        .unwrap_or(0) as usize;
    cx.steps = cx
        .budget
        .steps
        .unwrap_or_else(|| 3 * (2 * orig_rows).div_ceil(32))
        .max(1);
    let n_final = cx.budget.seeds;
    let n_kd = n_final.max(cx.budget.tune_seeds);
    let kd: Vec<Run> = (0..n_kd as u64)
        .map(|s| cx.student("original", &kd_setting, &kd_shards, s))
        .collect::<Result<_>>()?;
    cx.first_round = Some(
        cx.dir
            .join("students")
            .join(format!("original-{}-seed0", kd_setting.id())),
    );
    let wanted: Vec<&str> = COMPARED
        .iter()
        .copied()
        .filter(|m| *m != "original")
        .filter(|m| {
            o.methods
                .as_ref()
                .is_none_or(|ms| ms.iter().any(|x| x == m))
        })
        .collect();
    let mut grid_points = Vec::new();
    let mut chosen: BTreeMap<&str, Setting> = BTreeMap::new();
    for m in &wanted {
        let best = if o.tune {
            let mut scored = Vec::new();
            for s in grid(m) {
                let shards = cx.shards(m, &s)?;
                let runs: Vec<Run> = (0..cx.budget.tune_seeds as u64)
                    .map(|seed| cx.student(m, &s, &shards, seed))
                    .collect::<Result<_>>()?;
                let dev = stats::summary(&runs.iter().map(|r| r.dev).collect::<Vec<_>>()).mean;
                scored.push((s, dev, shards.1.method_rows.get(*m).copied().unwrap_or(0)));
            }
            // Ties (and NaN) keep the earlier grid point.
            let bi =
                (0..scored.len()).fold(0, |b, i| if scored[i].1 > scored[b].1 { i } else { b });
            for (i, (s, dev, rows)) in scored.iter().enumerate() {
                grid_points.push(GridPoint {
                    method: m.to_string(),
                    setting: s.clone(),
                    dev: *dev,
                    method_rows: *rows,
                    chosen: i == bi,
                });
            }
            scored[bi].0.clone()
        } else {
            Setting::pipeline()
        };
        chosen.insert(m, best);
    }
    let kd_vals: Vec<f64> = kd[..n_final].iter().map(|r| r.validation).collect();
    let row = |label: String, method: &str, setting: &Setting, runs: &[Run], kd: bool| -> Row {
        let values: Vec<f64> = runs.iter().map(|r| r.validation).collect();
        Row {
            label,
            method: method.into(),
            setting: setting.clone(),
            dev: stats::summary(&runs.iter().map(|r| r.dev).collect::<Vec<_>>()),
            validation: stats::summary(&values),
            vs_kd: (!kd).then(|| stats::paired(&values, &kd_vals)),
            values,
            rows: runs.first().map(|r| r.rows).unwrap_or(0),
            train_seconds: stats::summary(
                &runs.iter().map(|r| r.train_seconds).collect::<Vec<_>>(),
            )
            .mean,
        }
    };
    let mut rows = vec![row(
        "original (plain KD)".into(),
        "original",
        &kd_setting,
        &kd[..n_final],
        true,
    )];
    let mut curves = vec![("original".to_string(), kd[0].curve.clone())];
    for m in &wanted {
        let s = &chosen[m];
        let runs = cx.seeds(m, s, n_final)?;
        curves.push((m.to_string(), runs[0].curve.clone()));
        rows.push(row(m.to_string(), m, s, &runs, false));
    }
    // MixUp at AugPro-Mix's setting: the pair of rows that differ only by the projection.
    if o.tune {
        if let (Some(am), Some(mx)) = (chosen.get("augpro_mix"), chosen.get("mixup")) {
            if am.label != mx.label {
                let s = grid("mixup")
                    .into_iter()
                    .find(|g| g.label == am.label)
                    .context("the mixing grids are the same")?;
                let runs = cx.seeds("mixup", &s, n_final)?;
                rows.push(row(
                    "mixup @ augpro_mix setting".into(),
                    "mixup",
                    &s,
                    &runs,
                    false,
                ));
            }
        }
    }
    let teacher_validation = kd_shards
        .1
        .teacher
        .get("metrics")
        .and_then(|m| serde_json::from_value(m.clone()).ok())
        .map_or(f64::NAN, |m| student::first_value(task, &m));
    let dev_cfg = kd_shards.1.dev()?;
    let dev_examples = crate::data::part_rows(
        &cx.glue_dir,
        task,
        task.train_split,
        &dev_cfg,
        crate::data::Part::Dev,
    )?;
    // Grid labels name the same parameters for both mixing methods; untuned, the two
    // pipeline tables may differ.
    let projection_effect = rows
        .iter()
        .filter(|_| o.tune)
        .find(|r| r.method == "augpro_mix")
        .and_then(|am| {
            rows.iter()
                .find(|r| r.method == "mixup" && r.setting.label == am.setting.label)
                .map(|mx| stats::paired(&am.values, &mx.values))
        });
    let result = TaskResult {
        task: task.name.into(),
        metric: primary.into(),
        teacher_validation,
        source_examples: kd_shards.1.source_examples,
        dev_examples,
        steps: cx.steps,
        lr: cx.budget.lr,
        layers: cx.budget.layers,
        seeds: n_final,
        tune_seeds: cx.budget.tune_seeds,
        rows,
        grid: grid_points,
        projection_effect,
    };
    let md = task_markdown(o, &result, &kd_shards.0);
    atomic_write(
        &dir.join("results.json"),
        serde_json::to_string_pretty(&serde_json::json!({
            "command": command(o), "preset": o.preset, "tuned": o.tune,
            "eval_max_seq_len": crate::teacher::EVAL_MAX_SEQ_LEN, "result": result,
        }))?
        .as_bytes(),
    )?;
    atomic_write(&dir.join("results.md"), md.as_bytes())?;
    let bars: Vec<plots::Bar> = result
        .rows
        .iter()
        .map(|r| plots::Bar {
            label: r
                .label
                .replace(" (plain KD)", "")
                .replace(" @ augpro_mix setting", "@am"),
            mean: r.validation.mean,
            ci95: r.validation.ci95,
        })
        .collect();
    let drawn = plots::bars(
        &dir.join("bars.png"),
        &format!(
            "{}: student validation {primary} (mean, 95% CI over seeds)",
            task.name
        ),
        primary,
        &bars,
    )
    .and_then(|_| {
        plots::curves(
            &dir.join("curves.png"),
            &format!(
                "{}: dev {primary} during student training (seed 0)",
                task.name
            ),
            primary,
            &curves,
        )
    });
    if let Err(e) = drawn {
        tracing::warn!("plots not written: {e:#}");
    }
    print!("{md}");
    Ok((result, dir))
}

fn pct(x: f64) -> String {
    if x.is_finite() {
        format!("{:.2}", 100.0 * x)
    } else {
        "–".into()
    }
}

fn pm(x: f64) -> String {
    if x.is_finite() {
        format!("{:+.2}", 100.0 * x)
    } else {
        "–".into()
    }
}

/// Whether a paired difference is within noise (its 95% interval contains 0).
fn verdict(p: &Paired) -> &'static str {
    if !p.ci95.is_finite() {
        "too few seeds"
    } else if (p.mean - p.ci95) > 0.0 {
        "better"
    } else if (p.mean + p.ci95) < 0.0 {
        "worse"
    } else {
        "within noise"
    }
}

fn task_markdown(o: &ReportOptions, r: &TaskResult, kd_shards: &Location) -> String {
    let m = &r.metric;
    let mut s = format!(
        "# {} — student comparison ({} preset{})\n\nRegenerate: `{}`\n\n\
         Protocol: teacher {m} on validation {}. {} source examples of the train split are augmented; \
         the dev split ({} examples carved from train, never augmented nor trained on) chooses each \
         student's checkpoint{}. The student is {} layers cut from the base encoder (its weights, not the teacher's), {} steps of batch 32 at peak \
         learning rate {} (6% warm-up, linear decay), trained on `original` + the method's rows. Validation is scored once per final run and chooses \
         nothing. Scores are ×100. Δ is the paired difference to plain KD over the same seeds (same \
         initialisation and data order), with its 95% confidence interval and the paired t-test's p.\n\n",
        r.task,
        o.preset,
        if o.tune { ", tuned on dev" } else { "" },
        command(o),
        pct(r.teacher_validation),
        r.source_examples,
        r.dev_examples,
        if o.tune {
            format!(" and, with {} seed(s) per grid point, each method's setting", r.tune_seeds)
        } else {
            String::new()
        },
        r.layers,
        r.steps,
        r.lr,
    );
    s.push_str(&format!(
        "| method | setting | dev {m} | validation {m} mean ± std | 95% CI | Δ vs plain KD | Δ 95% CI | p | reading | seeds | rows |\n|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|\n"
    ));
    for row in &r.rows {
        let v = &row.validation;
        let (d, dci, p, read) = match &row.vs_kd {
            Some(p) => (
                pm(p.mean),
                if p.ci95.is_finite() {
                    format!("±{:.2}", 100.0 * p.ci95)
                } else {
                    "–".into()
                },
                if p.p.is_finite() {
                    format!("{:.3}", p.p)
                } else {
                    "–".into()
                },
                verdict(p),
            ),
            None => ("–".into(), "–".into(), "–".into(), "reference"),
        };
        s.push_str(&format!(
            "| {} | {} | {} | {} ± {:.2} | ±{} | {d} | {dci} | {p} | {read} | {} | {} |\n",
            row.label,
            row.setting.label,
            pct(row.dev.mean),
            pct(v.mean),
            100.0 * v.std,
            if v.ci95.is_finite() {
                format!("{:.2}", 100.0 * v.ci95)
            } else {
                "–".into()
            },
            v.n,
            row.rows
        ));
    }
    if let Some(p) = &r.projection_effect {
        s.push_str(&format!(
            "\nProjection alone: AugPro-Mix minus MixUp at the same setting, paired over {} seeds: {} points (95% CI ±{:.2}, p {:.3}): {}.\n",
            p.n,
            pm(p.mean),
            100.0 * p.ci95,
            p.p,
            verdict(p)
        ));
    }
    if let Some(kd) = r.rows.first() {
        s.push_str(&format!(
            "\nPlain KD's seed spread: std {:.2} points over {} seeds{}.\n",
            100.0 * kd.validation.std,
            kd.validation.n,
            if 100.0 * kd.validation.std <= 1.5 {
                ""
            } else {
                " (above 1.5: read small differences with care)"
            }
        ));
    }
    if r.grid
        .iter()
        .any(|g| g.setting.set.iter().any(|x| x.ends_with(FIRST_ROUND)))
    {
        s.push_str(
            "\n\"∇ KL(teacher ‖ 1st-round student)\": AugPro-FGSM takes the gradient of KL(teacher ‖ student) \
             in the embedding space of plain KD's seed-0 student, trained first in the same command, and \
             projects with that student's table (a two-round pipeline); the other points take the gradient \
             of the teacher's cross-entropy against the gold label.\n",
        );
        if glue::task(&r.task).is_ok_and(|t| t.is_regression()) {
            s.push_str(
                "For this regression task, the cross-entropy is the squared error to the gold score \
                 and the KL is the squared error between the two models' scores.\n",
            );
        }
    }
    if !r.grid.is_empty() {
        s.push_str(&format!(
            "\n## Tuning on dev ({} seed(s) per point; the chosen point is in bold)\n\n| method | setting | dev {m} | method rows |\n|---|---|---:|---:|\n",
            r.tune_seeds
        ));
        for g in &r.grid {
            let b = if g.chosen { "**" } else { "" };
            s.push_str(&format!(
                "| {} | {b}{}{b} | {b}{}{b} | {} |\n",
                g.method,
                g.setting.label,
                pct(g.dev),
                g.method_rows
            ));
        }
    }
    s.push_str(&format!(
        "\nPlain KD's shards: `{kd_shards}`. Inputs truncated to {} tokens for evaluation. Plots: `bars.png` (95% CI), `curves.png` (dev, seed 0).\n",
        crate::teacher::EVAL_MAX_SEQ_LEN
    ));
    s
}

fn glue_table(o: &ReportOptions, rs: &[TaskResult]) -> String {
    let mut labels: Vec<String> = Vec::new();
    for r in rs {
        for row in &r.rows {
            if !labels.contains(&row.label) {
                labels.push(row.label.clone());
            }
        }
    }
    let mut s = format!(
        "# GLUE student comparison ({} preset{})\n\nRegenerate: `{}`\n\n\
         Validation scores ×100, mean ± 95% CI over seeds ({}), each method at its own dev-best setting \
         (see each task's `results.md` for the grids, the dev scores and the paired tests). \
         Avg is the mean over the tasks of the means. † marks a paired difference to plain KD whose 95% \
         interval excludes 0; the others are within noise.\n\n| method |",
        o.preset,
        if o.tune { ", tuned on dev" } else { "" },
        command(o),
        rs.iter().map(|r| format!("{} {}", r.task, r.seeds)).collect::<Vec<_>>().join(", ")
    );
    for r in rs {
        s.push_str(&format!(" {} ({}) |", r.task, r.metric));
    }
    s.push_str(" Avg |\n|---|");
    for _ in rs {
        s.push_str("---:|");
    }
    s.push_str("---:|\n");
    for l in &labels {
        s.push_str(&format!("| {l} |"));
        let mut means = Vec::new();
        for r in rs {
            match r.rows.iter().find(|x| &x.label == l) {
                Some(row) => {
                    let v = &row.validation;
                    let mark = row
                        .vs_kd
                        .as_ref()
                        .filter(|p| {
                            p.ci95.is_finite() && (p.mean - p.ci95 > 0.0 || p.mean + p.ci95 < 0.0)
                        })
                        .map(|_| "†")
                        .unwrap_or("");
                    s.push_str(&format!(
                        " {} ± {}{mark} |",
                        pct(v.mean),
                        if v.ci95.is_finite() {
                            format!("{:.2}", 100.0 * v.ci95)
                        } else {
                            "–".into()
                        }
                    ));
                    means.push(v.mean);
                }
                None => s.push_str(" – |"),
            }
        }
        let avg = if means.len() == rs.len() {
            pct(means.iter().sum::<f64>() / means.len() as f64)
        } else {
            "–".into()
        };
        s.push_str(&format!(" {avg} |\n"));
    }
    for r in rs {
        if let Some(p) = &r.projection_effect {
            s.push_str(&format!(
                "\n{}: projection alone (AugPro-Mix − MixUp at the same setting, paired) {} ± {:.2} points, p {:.3}: {}.",
                r.task,
                pm(p.mean),
                100.0 * p.ci95,
                p.p,
                verdict(p)
            ));
        }
    }
    s.push_str("\n\nSettings chosen on dev:\n\n");
    for r in rs {
        let picks: Vec<String> = r
            .rows
            .iter()
            .skip(1)
            .map(|x| format!("{}: {}", x.label, x.setting.label))
            .collect();
        s.push_str(&format!("- {}: {}\n", r.task, picks.join("; ")));
    }
    s.push_str("\nTeacher and student budget per task (each sized on the task's dev split):\n\n");
    for r in rs {
        s.push_str(&format!(
            "- {}: teacher {} {}; {} source examples, dev {}; student {} layers, {} steps at lr {}\n",
            r.task,
            r.metric,
            pct(r.teacher_validation),
            r.source_examples,
            r.dev_examples,
            r.layers,
            r.steps,
            r.lr
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::PerTask;

    #[test]
    fn reused_runs_read_back_exactly() {
        // Finished runs are read back from JSON; a rerun's table must equal the first one
        // to the last bit, which needs exact float parsing.
        for x in [3.1521651874999996f64, 0.1 + 0.2, 1e-4, 0.7720588235294118] {
            let back: f64 = serde_json::from_str(&serde_json::to_string(&x).unwrap()).unwrap();
            assert_eq!(back.to_bits(), x.to_bits(), "{x}");
        }
    }

    #[test]
    fn per_task_values() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let p = PerTask::<usize>::parse("steps", &s(&["150", "cola=600"])).unwrap();
        assert_eq!((p.get("sst2"), p.get("cola")), (Some(150), Some(600)));
        assert_eq!(p.arg().as_deref(), Some("150,cola=600"));
        let q = PerTask::<f64>::parse("lr", &s(&["cola=1e-4"])).unwrap();
        assert_eq!((q.get("sst2"), q.get("cola")), (None, Some(1e-4)));
        assert!(PerTask::<usize>::parse("steps", &s(&["imdb=3"])).is_err());
        assert!(PerTask::<usize>::parse("steps", &s(&["x"])).is_err());
        assert!(PerTask::<usize>::parse("steps", &s(&["1", "2"])).is_err());
        assert_eq!(PerTask::<usize>::parse("steps", &[]).unwrap().arg(), None);
    }
}
