//! `augpro report`: the method comparison. For each GLUE task, every method is tuned on
//! the dev split carved from train (the same kind of small declared grid for each), then
//! trained at its own dev-best setting over several seeds; the validation split is scored
//! once per final run and never used to choose anything. Results go to
//! `<out>/<task>/results.{json,md}` with plots, and, for several tasks, a GLUE-style table
//! to `<out>/glue/results.{json,md}`. Finished augmentations and student runs are reused
//! (a run only for the same role, seed and key, see [`runs`]), so a long comparison can be
//! built up over several sittings.

mod collect;
mod markdown;
mod plots;
mod runs;
mod scaling;
pub mod stats;

use crate::shards::manifest::Manifest;
use crate::storage::Location;
use crate::student;
use crate::task::{self, TaskSpec};
use crate::util::{atomic_write, sha256_bytes};
use anyhow::{bail, Context, Result};
use candle_core::Device;
use runs::{FileHashes, Role, Run, TaskCtx};
use serde::{Deserialize, Serialize};
use stats::{Paired, Summary};
use std::collections::BTreeMap;
use std::path::PathBuf;

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
    /// Source-example counts of the scaling comparison (`--scaling`, ascending).
    pub scaling: Option<Vec<usize>>,
    /// Build the GLUE table from each task's own `results.json`, training nothing.
    pub collect: bool,
    /// Student runs trained side by side, each with its share of the threads (the results
    /// do not change).
    pub jobs: usize,
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
                    task::glue(t.trim())?;
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

/// A paired test with its Holm–Bonferroni adjusted p over the task's paired tests.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Test {
    /// The paired t-test (raw p).
    #[serde(flatten)]
    pub paired: Paired,
    /// p adjusted by Holm–Bonferroni over every paired test of the task's report.
    #[serde(deserialize_with = "stats::nan_as_null::score")]
    pub p_holm: f64,
}

/// A method's line in the final comparison.
#[derive(Debug, Clone, Serialize, Deserialize)]
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
    pub vs_kd: Option<Test>,
    /// Per-seed validation values.
    #[serde(deserialize_with = "stats::nan_as_null::scores")]
    pub values: Vec<f64>,
    /// Rows the student had (original + the method's).
    pub rows: usize,
    /// Mean student training seconds.
    #[serde(deserialize_with = "stats::nan_as_null::score")]
    pub train_seconds: f64,
    /// The final runs' directories (relative to the task's report directory), by seed.
    pub runs: Vec<String>,
}

/// A grid point's tuning result.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GridPoint {
    /// Method.
    pub method: String,
    /// Setting.
    pub setting: Setting,
    /// Mean dev metric over the tuning seeds.
    #[serde(deserialize_with = "stats::nan_as_null::score")]
    pub dev: f64,
    /// Rows of the method (augmented rows kept).
    pub method_rows: u64,
    /// Chosen.
    pub chosen: bool,
    /// The tuning runs' directories (relative to the task's report directory).
    pub runs: Vec<String>,
}

/// One task's results.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskResult {
    /// Task.
    pub task: String,
    /// Primary metric.
    pub metric: String,
    /// Teacher's validation metric.
    #[serde(deserialize_with = "stats::nan_as_null::score")]
    pub teacher_validation: f64,
    /// Where and in which dtype the teacher ran (`cpu (AVX-512) in f32`): results made
    /// with other kernels differ in their bits. Empty in results written before it was
    /// recorded.
    #[serde(default)]
    pub teacher_ran_on: String,
    /// Source examples augmented.
    pub source_examples: usize,
    /// Dev examples.
    pub dev_examples: usize,
    /// Student steps per run.
    pub steps: usize,
    /// Students' peak learning rate.
    #[serde(deserialize_with = "stats::nan_as_null::score")]
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
    pub projection_effect: Option<Test>,
}

/// One task's student budget.
#[derive(Clone)]
struct Budget {
    examples: usize,
    seeds: usize,
    tune_seeds: usize,
    steps: Option<usize>,
    lr: f64,
    layers: usize,
}

/// A student budget of the `low` preset.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LowStudent {
    /// Source examples augmented and trained on.
    pub examples: usize,
    /// Training steps.
    pub steps: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Encoder layers kept from the base model.
    pub layers: usize,
}

/// The `low` preset's student per task: each sized on the task's own dev split with plain
/// KD (`scripts/size-student.sh`, tables in reports/sizing/). CoLA's 3-layer students stay
/// near MCC 10 at 1,000 and 4,000 examples, so it keeps all 6 layers and 4,000 examples.
pub fn low_student(task: &str) -> Option<LowStudent> {
    let (examples, steps, lr, layers) = match task {
        "sst2" => (1000, 150, STUDENT_LR, 3),
        "stsb" => (1000, 300, 1e-4, 6),
        "mrpc" => (1000, 150, 1e-4, 6),
        "cola" => (4000, 1200, 1e-4, 6),
        _ => return None,
    };
    Some(LowStudent {
        examples,
        steps,
        lr,
        layers,
    })
}

/// The student of a task the `low` preset has not sized: all three flags, or an error
/// naming them.
fn unsized_student(o: &ReportOptions, task: &str) -> Result<LowStudent> {
    match (o.steps.get(task), o.lr.get(task), o.layers.get(task)) {
        (Some(steps), Some(lr), Some(layers)) => Ok(LowStudent {
            examples: 1000,
            steps,
            lr,
            layers,
        }),
        _ => bail!(
            "--preset low has no student budget for {task}: size one on its dev split \
             (scripts/size-student.sh {task} \"LAYERS LR STEPS SEED\" ...) and give all three of \
             --layers {task}=N --steps {task}=N --lr {task}=X"
        ),
    }
}

fn budget(o: &ReportOptions, task: &TaskSpec) -> Result<Budget> {
    // (source examples, seeds, steps, lr, layers)
    let (examples, seeds, steps, lr, layers) = match o.preset.as_str() {
        "smoke" => (96, 2, Some(12), STUDENT_LR, 3),
        "low" => {
            let seeds = if task.name == "sst2" { 5 } else { 3 };
            let s = match low_student(&task.name) {
                Some(s) => s,
                None => unsized_student(o, &task.name)?,
            };
            (s.examples, seeds, Some(s.steps), s.lr, s.layers)
        }
        "paper" => (usize::MAX, 3, None, STUDENT_LR, 3),
        p => bail!("--preset {p}: expected smoke, low or paper"),
    };
    Ok(Budget {
        examples: o.train_examples.unwrap_or(examples),
        seeds: o.seeds.unwrap_or(seeds),
        tune_seeds: if o.tune { o.tune_seeds.unwrap_or(1) } else { 0 },
        steps: o.steps.get(&task.name).or(steps),
        lr: o.lr.get(&task.name).unwrap_or(lr),
        layers: o.layers.get(&task.name).unwrap_or(layers),
    })
}

/// Checks the flags that do not depend on a task.
fn check_options(o: &ReportOptions) -> Result<()> {
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
    if o.seeds.is_some_and(|n| n as u64 > runs::TUNE_SEED_BASE) {
        bail!(
            "--seeds: at most {} (tuning seeds start there)",
            runs::TUNE_SEED_BASE
        );
    }
    scaling::check(o)
}

/// The task `name`: the one `--pipeline` runs on (a GLUE config or a described dataset),
/// which must be called `name`, else the GLUE config.
fn report_task(o: &ReportOptions, name: &str) -> Result<&'static TaskSpec> {
    let Some(p) = &o.pipeline else {
        return task::glue(name);
    };
    let cfg = crate::config::PipelineConfig::load_with(p, &o.overrides)?;
    if cfg.task != name {
        bail!(
            "{}: the pipeline's task is `{}`, not `{name}` (--tasks)",
            p.display(),
            cfg.task
        );
    }
    crate::data::task_of(&cfg)
}

/// Runs the comparison on every task; returns the directory of the main results file.
pub fn run(o: &ReportOptions, device: &Device) -> Result<PathBuf> {
    check_options(o)?;
    let tasks: Vec<&'static TaskSpec> = o
        .tasks
        .iter()
        .map(|t| report_task(o, t))
        .collect::<Result<_>>()?;
    if o.collect {
        return collect::run(o);
    }
    // Every task's budget before any run: a task without one stops the command at once.
    let budgets: Vec<Budget> = tasks.iter().map(|t| budget(o, t)).collect::<Result<_>>()?;
    let hashes = FileHashes::default();
    if o.scaling.is_some() {
        return scaling::run(o, tasks.into_iter().zip(budgets).collect(), &hashes, device);
    }
    let mut results = Vec::new();
    let mut last = PathBuf::new();
    for (task, b) in tasks.into_iter().zip(budgets) {
        let (r, dir) = run_task(o, task, b, &hashes, device)?;
        results.push(r);
        last = dir;
    }
    if results.len() == 1 {
        return Ok(last);
    }
    write_glue(o, &results, &[])
}

/// The GLUE table over `results` in `<out>/glue[-<tag>]/results.{json,md}`, naming the
/// `sources` it was collected from (none when this command made every column); returns
/// that directory.
fn write_glue(
    o: &ReportOptions,
    results: &[TaskResult],
    sources: &[collect::Source],
) -> Result<PathBuf> {
    let dir = o.out.join(format!("glue{}", suffix(o)));
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("{}: cannot create report directory", dir.display()))?;
    let md = markdown::glue_table(o, results, sources);
    let mut json = serde_json::json!({
        "command": command(o), "preset": o.preset, "tuned": o.tune, "tasks": results,
    });
    if !sources.is_empty() {
        json["collected_from"] = serde_json::json!(sources);
    }
    write_results(&dir, &json, &md)?;
    Ok(dir)
}

/// `results.json` and `results.md` in `dir`; the Markdown is also printed.
fn write_results(dir: &std::path::Path, json: &serde_json::Value, md: &str) -> Result<()> {
    atomic_write(
        &dir.join("results.json"),
        serde_json::to_string_pretty(json)?.as_bytes(),
    )?;
    atomic_write(&dir.join("results.md"), md.as_bytes())?;
    print!("{md}");
    Ok(())
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
    if let Some(sizes) = &o.scaling {
        let v: Vec<String> = sizes.iter().map(|n| n.to_string()).collect();
        c.push_str(&format!(" --scaling {}", v.join(",")));
    }
    if o.collect {
        c.push_str(" --collect");
    }
    if crate::device::portable_products() {
        c.push_str(" --portable");
    }
    c
}

/// One task, stage by stage: plain KD, tuning, final rows, outputs.
fn run_task(
    o: &ReportOptions,
    task: &'static TaskSpec,
    budget: Budget,
    hashes: &FileHashes,
    device: &Device,
) -> Result<(TaskResult, PathBuf)> {
    let mut cx = TaskCtx::new(o, task, budget, hashes, device)?;
    let kd = plain_kd(&mut cx)?;
    let wanted = wanted_methods(o);
    let (grid, chosen) = tune(&cx, &wanted)?;
    let (rows, curves) = final_rows(&cx, &kd.runs, &wanted, &chosen)?;
    let result = task_result(&cx, &kd.shards.1, rows, grid)?;
    write_task(&cx, &result, &kd.shards.0, &curves)?;
    Ok((result, cx.dir))
}

/// Plain KD's shards and final runs.
struct PlainKd {
    shards: (Location, Manifest),
    runs: Vec<Run>,
}

/// Plain KD first: the reference of every paired difference, and the first-round student of
/// AugPro-FGSM's student-space gradient. Its shards also fix the step budget when the
/// preset derives it from the rows.
fn plain_kd(cx: &mut TaskCtx) -> Result<PlainKd> {
    let shards = cx.shards("original", &Setting::pipeline())?;
    plain_kd_on(cx, shards)
}

/// [`plain_kd`] on plain KD's shards, already made.
fn plain_kd_on(cx: &mut TaskCtx, shards: (Location, Manifest)) -> Result<PlainKd> {
    let setting = Setting::pipeline();
    let orig_rows = shards.1.method_rows.get("original").copied().unwrap_or(0) as usize;
    cx.steps = cx
        .budget
        .steps
        .unwrap_or_else(|| 3 * (2 * orig_rows).div_ceil(32))
        .max(1);
    let runs = cx.runs_on(Role::Final, "original", &setting, &shards, cx.budget.seeds)?;
    cx.first_round = Some(cx.dir.join(cx.first_round_dir()));
    Ok(PlainKd { shards, runs })
}

/// The methods compared with plain KD, in [`COMPARED`]'s order.
fn wanted_methods(o: &ReportOptions) -> Vec<&'static str> {
    COMPARED
        .iter()
        .copied()
        .filter(|m| *m != "original")
        .filter(|m| {
            o.methods
                .as_ref()
                .is_none_or(|ms| ms.iter().any(|x| x == m))
        })
        .collect()
}

type Chosen = BTreeMap<&'static str, Setting>;

/// Each method's setting: its dev-best grid point when tuning, else the pipeline's own.
fn tune(cx: &TaskCtx, wanted: &[&'static str]) -> Result<(Vec<GridPoint>, Chosen)> {
    let mut points = Vec::new();
    let mut chosen = BTreeMap::new();
    for &m in wanted {
        if !cx.o.tune {
            chosen.insert(m, Setting::pipeline());
            continue;
        }
        let mut pts = tune_method(cx, m)?;
        if let Some(best) = pts.iter().find(|p| p.chosen) {
            chosen.insert(m, best.setting.clone());
        }
        points.append(&mut pts);
    }
    Ok((points, chosen))
}

/// Every grid point of a method, scored on dev by the tuning runs (their own seeds); the
/// dev-best one (never a NaN score; the earlier of equal scores) is marked chosen.
fn tune_method(cx: &TaskCtx, m: &str) -> Result<Vec<GridPoint>> {
    let mut points = Vec::new();
    for s in grid(m) {
        let shards = cx.shards(m, &s)?;
        let runs = cx.runs_on(Role::Tune, m, &s, &shards, cx.budget.tune_seeds)?;
        points.push(GridPoint {
            method: m.to_string(),
            dev: stats::summary(&runs.iter().map(|r| r.dev).collect::<Vec<_>>()).mean,
            method_rows: shards.1.method_rows.get(m).copied().unwrap_or(0),
            chosen: false,
            runs: runs.into_iter().map(|r| r.dir).collect(),
            setting: s,
        });
    }
    let devs: Vec<f64> = points.iter().map(|p| p.dev).collect();
    let best = crate::metrics::best_index(&devs).with_context(|| {
        format!(
            "{}: every grid point of {m} scored NaN on dev ({}): its tuning runs diverged",
            cx.task.name,
            cx.task.primary_metric()
        )
    })?;
    points[best].chosen = true;
    Ok(points)
}

type Curves = Vec<(String, Vec<(usize, f64)>)>;

/// A row of the final table from its final runs (`kd`: plain KD's values by seed, to pair
/// with; `None` for plain KD itself).
fn row(label: &str, method: &str, setting: &Setting, runs: &[Run], kd: Option<&[f64]>) -> Row {
    let values: Vec<f64> = runs.iter().map(|r| r.validation).collect();
    let devs: Vec<f64> = runs.iter().map(|r| r.dev).collect();
    let secs: Vec<f64> = runs.iter().map(|r| r.train_seconds).collect();
    Row {
        label: label.into(),
        method: method.into(),
        setting: setting.clone(),
        dev: stats::summary(&devs),
        validation: stats::summary(&values),
        vs_kd: kd.map(|k| Test {
            paired: stats::paired(&values, k),
            p_holm: f64::NAN,
        }),
        rows: runs.first().map_or(0, |r| r.rows),
        train_seconds: stats::summary(&secs).mean,
        runs: runs.iter().map(|r| r.dir.clone()).collect(),
        values,
    }
}

/// The final rows (plain KD first), every one from final runs, and the seed-0 dev curves.
fn final_rows(
    cx: &TaskCtx,
    kd: &[Run],
    wanted: &[&'static str],
    chosen: &Chosen,
) -> Result<(Vec<Row>, Curves)> {
    let n = cx.budget.seeds;
    let kd_vals: Vec<f64> = kd.iter().map(|r| r.validation).collect();
    let mut rows = vec![row(
        "original (plain KD)",
        "original",
        &Setting::pipeline(),
        kd,
        None,
    )];
    let mut curves = vec![("original".to_string(), kd[0].curve.clone())];
    for &m in wanted {
        let s = &chosen[m];
        let runs = cx.seeds(Role::Final, m, s, n)?;
        curves.push((m.to_string(), runs[0].curve.clone()));
        rows.push(row(m, m, s, &runs, Some(kd_vals.as_slice())));
    }
    // MixUp at AugPro-Mix's setting: the pair of rows that differ only by the projection.
    if let (Some(am), Some(mx)) = (chosen.get("augpro_mix"), chosen.get("mixup")) {
        if cx.o.tune && am.label != mx.label {
            let s = grid("mixup")
                .into_iter()
                .find(|g| g.label == am.label)
                .context("the mixing grids are the same")?;
            let runs = cx.seeds(Role::Final, "mixup", &s, n)?;
            let label = "mixup @ augpro_mix setting";
            rows.push(row(label, "mixup", &s, &runs, Some(kd_vals.as_slice())));
        }
    }
    Ok((rows, curves))
}

/// AugPro-Mix minus MixUp at the same setting, paired over seeds. Grid labels name the same
/// parameters for both mixing methods; untuned, the two pipeline tables may differ.
fn projection_effect(o: &ReportOptions, rows: &[Row]) -> Option<Test> {
    let am = rows.iter().find(|r| o.tune && r.method == "augpro_mix")?;
    let mx = rows
        .iter()
        .find(|r| r.method == "mixup" && r.setting.label == am.setting.label)?;
    Some(Test {
        paired: stats::paired(&am.values, &mx.values),
        p_holm: f64::NAN,
    })
}

/// Fills in each paired test's Holm–Bonferroni adjusted p, the family being every paired
/// test of the task (each row against plain KD, and projection alone).
fn adjust(r: &mut TaskResult) {
    let mut tests: Vec<&mut Test> = r
        .rows
        .iter_mut()
        .filter_map(|x| x.vs_kd.as_mut())
        .chain(r.projection_effect.as_mut())
        .collect();
    let raw: Vec<f64> = tests.iter().map(|t| t.paired.p).collect();
    for (t, p) in tests.iter_mut().zip(stats::holm(&raw)) {
        t.p_holm = p;
    }
}

fn task_result(
    cx: &TaskCtx,
    kd: &Manifest,
    rows: Vec<Row>,
    grid: Vec<GridPoint>,
) -> Result<TaskResult> {
    let task = cx.task;
    let teacher_validation = kd
        .teacher
        .get("metrics")
        .and_then(|m| serde_json::from_value(m.clone()).ok())
        .map_or(f64::NAN, |m| student::first_value(task, &m));
    let dev_examples = crate::data::part_rows(
        &cx.glue_dir,
        task,
        &task.train_split,
        &kd.dev()?,
        crate::data::Part::Dev,
    )?;
    let mut r = TaskResult {
        task: task.name.clone(),
        metric: task.primary_metric().into(),
        teacher_validation,
        teacher_ran_on: kd.teacher_ran_on(),
        source_examples: kd.source_examples,
        dev_examples,
        steps: cx.steps,
        lr: cx.budget.lr,
        layers: cx.budget.layers,
        seeds: cx.budget.seeds,
        tune_seeds: cx.budget.tune_seeds,
        projection_effect: projection_effect(cx.o, &rows),
        rows,
        grid,
    };
    adjust(&mut r);
    Ok(r)
}

/// `results.{json,md}` (the JSON with the run log), the forest plot and the dev curves.
fn write_task(cx: &TaskCtx, r: &TaskResult, kd_shards: &Location, curves: &Curves) -> Result<()> {
    let o = cx.o;
    let md = markdown::task(o, r, &kd_shards.to_string());
    let log = cx.log.lock().expect("run log");
    atomic_write(
        &cx.dir.join("results.json"),
        serde_json::to_string_pretty(&serde_json::json!({
            "command": command(o), "preset": o.preset, "tuned": o.tune,
            "eval_max_seq_len": crate::teacher::EVAL_MAX_SEQ_LEN, "result": r,
            "runs": &*log,
        }))?
        .as_bytes(),
    )?;
    atomic_write(&cx.dir.join("results.md"), md.as_bytes())?;
    let intervals: Vec<plots::Interval> = r
        .rows
        .iter()
        .filter_map(|row| {
            let t = row.vs_kd.as_ref()?;
            Some(plots::Interval {
                label: row.label.replace(" @ augpro_mix setting", " @ augpro_mix"),
                mean: t.paired.mean,
                ci95: t.paired.ci95,
                marked: markdown::significant(t),
            })
        })
        .collect();
    let metric = &r.metric;
    let drawn = plots::forest(
        &cx.dir.join("forest.png"),
        &format!(
            "{}: validation {metric}, Δ vs plain KD (paired, 95% CI)",
            r.task
        ),
        &format!("Δ {metric} (points)"),
        &intervals,
    )
    .and_then(|_| {
        plots::curves(
            &cx.dir.join("curves.png"),
            &format!("{}: dev {metric} during student training (seed 0)", r.task),
            metric,
            curves,
        )
    });
    if let Err(e) = drawn {
        tracing::warn!("plots not written: {e:#}");
    }
    print!("{md}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(tasks: &[&str], preset: &str) -> ReportOptions {
        ReportOptions {
            tasks: tasks.iter().map(|t| t.to_string()).collect(),
            preset: preset.into(),
            train_examples: None,
            seeds: None,
            tune: true,
            tune_seeds: None,
            steps: PerTask::default(),
            lr: PerTask::default(),
            layers: PerTask::default(),
            pipeline: None,
            out: PathBuf::from("reports"),
            glue_dir: None,
            methods: None,
            overrides: Vec::new(),
            tag: None,
            scaling: None,
            collect: false,
            jobs: 1,
        }
    }

    fn items(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn a_task_the_low_preset_has_not_sized_needs_its_own_budget() {
        let rte = task::glue("rte").unwrap();
        let mut o = options(&["rte"], "low");
        let e = budget(&o, rte)
            .err()
            .expect("no silent SST-2 budget")
            .to_string();
        for flag in [
            "--layers rte=",
            "--steps rte=",
            "--lr rte=",
            "scripts/size-student.sh",
        ] {
            assert!(e.contains(flag), "{e}");
        }
        assert!(!e.contains('\n'), "one line: {e}");
        // Two of three flags are not enough.
        o.steps = PerTask::parse("steps", &items(&["rte=200"])).unwrap();
        o.layers = PerTask::parse("layers", &items(&["rte=4"])).unwrap();
        assert!(budget(&o, rte).is_err());
        o.lr = PerTask::parse("lr", &items(&["rte=5e-5"])).unwrap();
        let b = budget(&o, rte).unwrap();
        assert_eq!((b.steps, b.lr, b.layers), (Some(200), 5e-5, 4));
        // Sized tasks keep the preset's budget; smoke sizes every task alike.
        let b = budget(&options(&["stsb"], "low"), task::glue("stsb").unwrap()).unwrap();
        assert_eq!((b.steps, b.lr, b.layers), (Some(300), 1e-4, 6));
        assert!(budget(&options(&["rte"], "smoke"), rte).is_ok());
    }

    fn test_row(p: f64) -> Row {
        let mut r = row("m", "mixup", &Setting::pipeline(), &[], None);
        r.vs_kd = Some(Test {
            paired: Paired {
                n: 3,
                mean: 0.01,
                ci95: 0.01,
                p,
            },
            p_holm: f64::NAN,
        });
        r
    }

    #[test]
    fn holm_runs_over_the_rows_and_projection_alone() {
        let mut r = TaskResult {
            task: "sst2".into(),
            metric: "accuracy".into(),
            teacher_validation: 0.9,
            teacher_ran_on: "cpu (AVX-512) in f32".into(),
            source_examples: 10,
            dev_examples: 10,
            steps: 1,
            lr: 1e-4,
            layers: 3,
            seeds: 3,
            tune_seeds: 1,
            rows: vec![
                row(
                    "original (plain KD)",
                    "original",
                    &Setting::pipeline(),
                    &[],
                    None,
                ),
                test_row(0.01),
                test_row(0.04),
            ],
            grid: Vec::new(),
            projection_effect: test_row(0.03).vs_kd,
        };
        adjust(&mut r);
        let adj: Vec<f64> = r.rows[1..]
            .iter()
            .map(|x| x.vs_kd.unwrap().p_holm)
            .collect();
        // 0.01 × 3, 0.03 × 2, 0.04 × 1 → 0.03, 0.06, 0.06.
        assert!(
            (adj[0] - 0.03).abs() < 1e-12 && (adj[1] - 0.06).abs() < 1e-12,
            "{adj:?}"
        );
        assert!((r.projection_effect.unwrap().p_holm - 0.06).abs() < 1e-12);
        assert!(r.rows[0].vs_kd.is_none());
        let md = markdown::task(&options(&["sst2"], "smoke"), &r, "shards");
        assert!(md.contains("| 0.010 | 0.030† |"), "{md}");
        assert!(md.contains("| 0.040 | 0.060 |"), "{md}");
    }

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
