//! `augpro report --tune --scaling 250,1000,4000`: how much data AugPro saves.
//!
//! On each task every compared method keeps the setting its dev tuning chose at the
//! table's budget. Then, at each number of source examples, the student's step count is
//! sized on dev for plain KD (tuning runs, their own seeds), and plain KD, the best
//! baseline (by its tuned dev score) and both AugPro methods are trained over the final
//! seeds at that step count and scored once on validation. Nothing is chosen on
//! validation. The paired differences to plain KD are Holm-adjusted over the task's whole
//! scaling table. Written to `<out>/scaling<suffix>/results.{json,md}`, with one
//! `<task>.png` per task (validation score against source examples, 95% intervals).

use super::runs::{FileHashes, Role, TaskCtx};
use super::stats::{self, Summary};
use super::{
    command, plain_kd, plain_kd_on, plots, row, suffix, tune, wanted_methods, Budget, GridPoint,
    ReportOptions, Row, Setting,
};
use crate::shards::manifest::Manifest;
use crate::storage::Location;
use crate::task::TaskSpec;
use anyhow::{bail, Context, Result};
use candle_core::Device;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// The baselines, the best of which (by its tuned dev score) joins the scaling table.
const BASELINES: &[&str] = &["token_replace", "mixup", "fgsm"];

/// The AugPro methods, both in the scaling table (when compared).
const AUGPRO: &[&str] = &["augpro_mix", "augpro_fgsm"];

/// What a doubling of plain KD's step count must gain on dev (in the metric's units, so
/// one point ×100) over the count before it for sizing to try the next doubling.
const MIN_DOUBLING_GAIN: f64 = 0.01;

/// The longest step count sizing tries, as a multiple of the table's count scaled to the
/// size.
const MAX_STRETCH: usize = 4;

/// One step count tried for plain KD at one size.
#[derive(Debug, Clone, Serialize)]
pub struct StepsPoint {
    /// Student steps.
    pub steps: usize,
    /// Mean dev score of plain KD's tuning runs.
    pub dev: f64,
    /// The dev-best step count (used by every method at this size).
    pub chosen: bool,
    /// The tuning runs' directories.
    pub runs: Vec<String>,
}

/// Every method at one number of source examples.
#[derive(Debug, Clone, Serialize)]
pub struct SizePoint {
    /// Source examples asked for.
    pub examples: usize,
    /// Source examples the shards hold (fewer when the train split is smaller).
    pub source_examples: usize,
    /// Student steps, sized on dev for plain KD.
    pub steps: usize,
    /// The step counts tried.
    pub sizing: Vec<StepsPoint>,
    /// Plain KD first, then the compared methods.
    pub rows: Vec<Row>,
}

/// What a method's score at one size is worth in plain-KD source examples.
#[derive(Debug, Clone, Serialize)]
pub struct Worth {
    /// Method.
    pub method: String,
    /// Source examples the method had.
    pub examples: usize,
    /// Its mean validation score.
    pub score: f64,
    /// Plain-KD examples that score the same on the interpolated plain-KD curve.
    pub kd_examples: Equivalent,
    /// Whether its paired difference to plain KD at this size survives Holm's adjustment.
    pub significant: bool,
}

/// Where a score falls on plain KD's curve (linear in log examples between sizes).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Equivalent {
    /// Below plain KD's score at the smallest size.
    BelowSmallest,
    /// Plain KD reaches it at about this many examples.
    Examples(f64),
    /// Above plain KD's score at the largest size.
    AboveLargest,
    /// The score or plain KD's curve is not a number.
    Unknown,
}

/// One task's scaling table.
#[derive(Debug, Clone, Serialize)]
pub struct TaskScaling {
    /// Task.
    pub task: String,
    /// Primary metric.
    pub metric: String,
    /// The methods besides plain KD, with the settings their dev tuning chose.
    pub settings: BTreeMap<String, Setting>,
    /// One point per size, ascending.
    pub points: Vec<SizePoint>,
    /// Each compared method's score at each size in plain-KD examples.
    pub worth: Vec<Worth>,
}

/// Checks `--scaling`'s sizes and the flags it needs.
pub fn check(o: &ReportOptions) -> Result<()> {
    let Some(sizes) = &o.scaling else {
        return Ok(());
    };
    if !o.tune {
        bail!("--scaling compares each method at the setting its dev tuning chose: add --tune");
    }
    if sizes.len() < 2 || sizes.contains(&0) {
        bail!("--scaling: expected at least two sizes above 0, e.g. 250,1000,4000");
    }
    if sizes.windows(2).any(|w| w[0] >= w[1]) {
        bail!("--scaling: expected sizes in ascending order, each once");
    }
    Ok(())
}

/// Runs the scaling comparison on every task; returns its directory.
pub fn run(
    o: &ReportOptions,
    tasks: Vec<(&'static TaskSpec, Budget)>,
    hashes: &FileHashes,
    device: &Device,
) -> Result<PathBuf> {
    let sizes = o.scaling.clone().context("--scaling sizes")?;
    let mut results = Vec::new();
    for (task, budget) in tasks {
        results.push(task_scaling(o, task, budget, &sizes, hashes, device)?);
    }
    let dir = o.out.join(format!("scaling{}", suffix(o)));
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("{}: cannot create report directory", dir.display()))?;
    for r in &results {
        draw(&dir, r);
    }
    let md = markdown(o, &results);
    let json = serde_json::json!({ "command": command(o), "preset": o.preset, "tasks": results });
    super::write_results(&dir, &json, &md)?;
    Ok(dir)
}

/// One task: tuning at the table's budget, then every size.
fn task_scaling(
    o: &ReportOptions,
    task: &'static TaskSpec,
    budget: Budget,
    sizes: &[usize],
    hashes: &FileHashes,
    device: &Device,
) -> Result<TaskScaling> {
    let mut cx = TaskCtx::new(o, task, budget.clone(), hashes, device)?;
    let kd = plain_kd(&mut cx)?;
    let (grid, chosen) = tune(&cx, &wanted_methods(o))?;
    let methods = scaled_methods(&grid);
    let table = (kd.shards.1.source_examples.max(1), cx.steps);
    let settings: BTreeMap<String, Setting> = methods
        .iter()
        .map(|m| (m.to_string(), chosen[m].clone()))
        .collect();
    let mut points = Vec::new();
    for &n in sizes {
        let b = Budget {
            examples: n,
            steps: None,
            ..budget.clone()
        };
        let mut cx = TaskCtx::new(o, task, b, hashes, device)?;
        points.push(size_point(&mut cx, &step_grid(table, n), &settings)?);
    }
    adjust(&mut points);
    Ok(TaskScaling {
        task: task.name.to_string(),
        metric: task.primary_metric().into(),
        worth: worth(&points),
        settings,
        points,
    })
}

/// The methods of the scaling table besides plain KD: the baseline with the best tuned dev
/// score (never NaN), then the AugPro methods, among those compared.
fn scaled_methods(grid: &[GridPoint]) -> Vec<&'static str> {
    let chosen: Vec<&GridPoint> = grid.iter().filter(|p| p.chosen).collect();
    let baselines: Vec<&GridPoint> = chosen
        .iter()
        .copied()
        .filter(|p| BASELINES.contains(&p.method.as_str()))
        .collect();
    let devs: Vec<f64> = baselines.iter().map(|p| p.dev).collect();
    let best = crate::metrics::best_index(&devs).map(|i| baselines[i].method.as_str());
    BASELINES
        .iter()
        .chain(AUGPRO)
        .copied()
        .filter(|m| {
            Some(*m) == best || (AUGPRO.contains(m) && chosen.iter().any(|p| p.method == *m))
        })
        .collect()
}

/// The step counts sizing starts from at `n` source examples, and the longest it may try.
#[derive(Debug, PartialEq)]
struct StepGrid {
    /// The table's step count scaled to `n` (the same passes over the data), half and
    /// twice that, ascending.
    start: Vec<usize>,
    /// [`MAX_STRETCH`] times the scaled count.
    longest: usize,
}

fn step_grid((examples, steps): (usize, usize), n: usize) -> StepGrid {
    let centre = ((steps as f64 * n as f64 / examples as f64).round() as usize).max(1);
    let mut start = vec![(centre / 2).max(1), centre, 2 * centre];
    start.dedup();
    StepGrid {
        start,
        longest: MAX_STRETCH * centre,
    }
}

/// The next step count to try after `points` (ascending): twice the longest tried, while
/// that one is the dev-best, gained at least [`MIN_DOUBLING_GAIN`] over the count before
/// it, and the doubling stays within `longest`.
fn next_longer(points: &[StepsPoint], longest: usize) -> Option<usize> {
    let [.., before, last] = points else {
        return None;
    };
    let devs: Vec<f64> = points.iter().map(|p| p.dev).collect();
    let last_is_best = crate::metrics::best_index(&devs) == Some(points.len() - 1);
    let next = 2 * last.steps;
    (last_is_best && last.dev - before.dev >= MIN_DOUBLING_GAIN && next <= longest).then_some(next)
}

/// Sizes plain KD's step count on dev at this size, then trains every method there.
fn size_point(
    cx: &mut TaskCtx,
    grid: &StepGrid,
    settings: &BTreeMap<String, Setting>,
) -> Result<SizePoint> {
    let shards = cx.shards("original", &Setting::pipeline())?;
    let sizing = size_steps(cx, &shards, grid)?;
    let steps = sizing
        .iter()
        .find(|p| p.chosen)
        .map(|p| p.steps)
        .context("a step count is chosen")?;
    cx.budget.steps = Some(steps);
    let kd = plain_kd_on(cx, shards)?;
    let kd_vals: Vec<f64> = kd.runs.iter().map(|r| r.validation).collect();
    let mut rows = vec![row(
        "original (plain KD)",
        "original",
        &Setting::pipeline(),
        &kd.runs,
        None,
    )];
    for (m, s) in ordered(settings) {
        let runs = cx.seeds(Role::Final, m, s, cx.budget.seeds)?;
        rows.push(row(m, m, s, &runs, Some(kd_vals.as_slice())));
    }
    Ok(SizePoint {
        examples: cx.budget.examples,
        source_examples: kd.shards.1.source_examples,
        steps,
        sizing,
        rows,
    })
}

/// The settings in the table's method order (baselines, then AugPro).
fn ordered(settings: &BTreeMap<String, Setting>) -> Vec<(&'static str, &Setting)> {
    BASELINES
        .iter()
        .chain(AUGPRO)
        .filter_map(|m| settings.get(*m).map(|s| (*m, s)))
        .collect()
}

/// Plain KD's tuning runs at the grid's step counts, then at doublings while
/// [`next_longer`] asks for one; the dev-best count is chosen.
fn size_steps(
    cx: &mut TaskCtx,
    shards: &(Location, Manifest),
    grid: &StepGrid,
) -> Result<Vec<StepsPoint>> {
    let mut points = Vec::new();
    for &steps in &grid.start {
        points.push(sizing_point(cx, shards, steps)?);
    }
    while let Some(steps) = next_longer(&points, grid.longest) {
        points.push(sizing_point(cx, shards, steps)?);
    }
    let devs: Vec<f64> = points.iter().map(|p| p.dev).collect();
    let best = crate::metrics::best_index(&devs).with_context(|| {
        format!(
            "{}: plain KD scored NaN on dev at every step count at {} source examples",
            cx.task.name, cx.budget.examples
        )
    })?;
    points[best].chosen = true;
    Ok(points)
}

/// Plain KD's tuning runs at one step count, with their mean dev score.
fn sizing_point(
    cx: &mut TaskCtx,
    shards: &(Location, Manifest),
    steps: usize,
) -> Result<StepsPoint> {
    cx.steps = steps;
    let runs = cx.runs_on(
        Role::Tune,
        "original",
        &Setting::pipeline(),
        shards,
        cx.budget.tune_seeds,
    )?;
    Ok(StepsPoint {
        steps,
        dev: stats::summary(&runs.iter().map(|r| r.dev).collect::<Vec<_>>()).mean,
        chosen: false,
        runs: runs.into_iter().map(|r| r.dir).collect(),
    })
}

/// Holm-adjusts every paired test of the task's scaling table (all sizes, all methods).
fn adjust(points: &mut [SizePoint]) {
    let mut tests: Vec<&mut super::Test> = points
        .iter_mut()
        .flat_map(|p| p.rows.iter_mut())
        .filter_map(|r| r.vs_kd.as_mut())
        .collect();
    let raw: Vec<f64> = tests.iter().map(|t| t.paired.p).collect();
    for (t, p) in tests.iter_mut().zip(stats::holm(&raw)) {
        t.p_holm = p;
    }
}

/// Each compared method's mean at each size, placed on plain KD's curve.
fn worth(points: &[SizePoint]) -> Vec<Worth> {
    let kd: Vec<(f64, f64)> = points
        .iter()
        .map(|p| (p.source_examples as f64, p.rows[0].validation.mean))
        .collect();
    let mut out = Vec::new();
    for p in points {
        for r in &p.rows[1..] {
            out.push(Worth {
                method: r.method.clone(),
                examples: p.source_examples,
                score: r.validation.mean,
                kd_examples: kd_equivalent(&kd, r.validation.mean),
                significant: r.vs_kd.as_ref().is_some_and(super::markdown::significant),
            });
        }
    }
    out
}

/// The plain-KD examples at which the curve through `kd` (examples ascending, linear in
/// log examples between points) first reaches `score`.
pub fn kd_equivalent(kd: &[(f64, f64)], score: f64) -> Equivalent {
    if !score.is_finite() || kd.iter().any(|(_, s)| !s.is_finite()) {
        return Equivalent::Unknown;
    }
    let Some(&(n0, s0)) = kd.first() else {
        return Equivalent::AboveLargest;
    };
    if score < s0 {
        return Equivalent::BelowSmallest;
    }
    if score == s0 {
        return Equivalent::Examples(n0);
    }
    for w in kd.windows(2) {
        let ((na, sa), (nb, sb)) = (w[0], w[1]);
        if sa < score && score <= sb {
            let t = (score - sa) / (sb - sa);
            return Equivalent::Examples((na.ln() + t * (nb.ln() - na.ln())).exp());
        }
    }
    Equivalent::AboveLargest
}

/// The plot of one task (a failure to draw is a warning, as for the other plots).
fn draw(dir: &std::path::Path, r: &TaskScaling) {
    let mut lines: Vec<(String, Vec<(f64, Summary)>)> = Vec::new();
    for (i, row) in r.points[0].rows.iter().enumerate() {
        let pts = r
            .points
            .iter()
            .map(|p| (p.source_examples as f64, p.rows[i].validation))
            .collect();
        lines.push((row.label.clone(), pts));
    }
    let title = format!(
        "{}: validation {} against source examples (95% CI)",
        r.task, r.metric
    );
    let path = dir.join(format!("{}.png", r.task));
    if let Err(e) = plots::scaling(&path, &title, &r.metric, &lines) {
        tracing::warn!("{}: plot not written: {e:#}", path.display());
    }
}

/// The scaling report's Markdown.
fn markdown(o: &ReportOptions, rs: &[TaskScaling]) -> String {
    super::markdown::scaling(&command(o), rs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_score_is_placed_on_the_plain_kd_curve_in_log_examples() {
        let kd = [(250.0, 0.80), (1000.0, 0.84), (4000.0, 0.86)];
        assert_eq!(kd_equivalent(&kd, 0.79), Equivalent::BelowSmallest);
        assert_eq!(kd_equivalent(&kd, 0.80), Equivalent::Examples(250.0));
        let Equivalent::Examples(n) = kd_equivalent(&kd, 0.82) else {
            panic!("inside the curve");
        };
        // Halfway between 0.80 and 0.84 is halfway between 250 and 1000 in log examples.
        assert!((n - 500.0).abs() < 1e-9, "{n}");
        let Equivalent::Examples(n) = kd_equivalent(&kd, 0.86) else {
            panic!("at the largest point");
        };
        assert!((n - 4000.0).abs() < 1e-6, "{n}");
        assert_eq!(kd_equivalent(&kd, 0.861), Equivalent::AboveLargest);
    }

    #[test]
    fn a_score_reached_twice_takes_the_first_crossing() {
        let kd = [(100.0, 0.5), (200.0, 0.7), (400.0, 0.6), (800.0, 0.8)];
        let Equivalent::Examples(n) = kd_equivalent(&kd, 0.65) else {
            panic!("inside the curve");
        };
        assert!(n < 200.0, "{n}");
    }

    #[test]
    fn a_nan_score_or_curve_has_no_place_on_it() {
        let kd = [(250.0, 0.80), (1000.0, 0.84)];
        assert_eq!(kd_equivalent(&kd, f64::NAN), Equivalent::Unknown);
        assert_eq!(
            kd_equivalent(&[(250.0, f64::NAN), (1000.0, 0.84)], 0.82),
            Equivalent::Unknown
        );
    }

    #[test]
    fn the_step_grid_keeps_the_passes_over_the_data() {
        let g = |t, n| step_grid(t, n).start;
        assert_eq!(g((1000, 150), 1000), [75, 150, 300]);
        assert_eq!(g((1000, 150), 4000), [300, 600, 1200]);
        assert_eq!(g((1000, 150), 250), [19, 38, 76]);
        assert_eq!(g((1000, 1), 10), [1, 2]);
        assert_eq!(step_grid((1000, 150), 250).longest, 152);
    }

    fn tried(points: &[(usize, f64)]) -> Vec<StepsPoint> {
        points
            .iter()
            .map(|&(steps, dev)| StepsPoint {
                steps,
                dev,
                chosen: false,
                runs: Vec::new(),
            })
            .collect()
    }

    #[test]
    fn sizing_doubles_while_the_longest_count_wins_by_a_point() {
        // Still rising by more than a point at the longest count: try twice that.
        let rising = tried(&[(19, 0.54), (38, 0.63), (76, 0.73)]);
        assert_eq!(next_longer(&rising, 152), Some(152));
        // ... but never past the longest allowed.
        assert_eq!(next_longer(&rising, 151), None);
        // The longest count wins by less than a point: enough.
        assert_eq!(
            next_longer(&tried(&[(75, 0.79), (150, 0.8129), (300, 0.8135)]), 1200),
            None
        );
        // A shorter count is dev-best (ties keep the shorter one): enough.
        assert_eq!(
            next_longer(&tried(&[(300, 0.84), (600, 0.86), (1200, 0.85)]), 4800),
            None
        );
        assert_eq!(next_longer(&tried(&[(75, 0.7), (150, 0.7)]), 600), None);
        // A NaN at the longest count never asks for more.
        assert_eq!(
            next_longer(&tried(&[(75, 0.5), (150, f64::NAN)]), 600),
            None
        );
        assert_eq!(next_longer(&tried(&[(75, 0.5)]), 600), None);
    }
}
