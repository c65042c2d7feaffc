//! The report's Markdown: one task's table (with its grid) and the GLUE-style table.

use super::collect::Source;
use super::stats::{Paired, Summary};
use super::{command, ReportOptions, TaskResult, Test, FIRST_ROUND};
use crate::task;
use std::cmp::Ordering;

/// Adjusted p below which a paired difference is marked †.
pub const ALPHA: f64 = 0.05;

/// `x` ×100 to two decimals, or `–` when unknown.
fn pct(x: f64) -> String {
    finite_or_dash(x, |x| format!("{:.2}", 100.0 * x))
}

/// A difference ×100 with its sign, or `–` when unknown.
fn pm(x: f64) -> String {
    finite_or_dash(x, |x| format!("{:+.2}", 100.0 * x))
}

fn finite_or_dash(x: f64, f: impl Fn(f64) -> String) -> String {
    if x.is_finite() {
        f(x)
    } else {
        "–".into()
    }
}

/// `±` and the half-width ×100, or `–` when unknown (one seed).
fn half(ci95: f64) -> String {
    finite_or_dash(ci95, |x| format!("±{:.2}", 100.0 * x))
}

fn p_value(p: f64) -> String {
    finite_or_dash(p, |p| format!("{p:.3}"))
}

/// Which side of 0 a paired difference's 95% interval lies on: `Some(Greater)` above,
/// `Some(Less)` below, `None` when it contains 0 or is unknown (one pair).
pub fn interval_side(p: &Paired) -> Option<Ordering> {
    if !p.ci95.is_finite() {
        None
    } else if p.mean - p.ci95 > 0.0 {
        Some(Ordering::Greater)
    } else if p.mean + p.ci95 < 0.0 {
        Some(Ordering::Less)
    } else {
        None
    }
}

/// Whether a test's Holm–Bonferroni adjusted p is below [`ALPHA`] (the † mark).
pub fn significant(t: &Test) -> bool {
    t.p_holm < ALPHA
}

fn dagger(t: &Test) -> &'static str {
    if significant(t) {
        "†"
    } else {
        ""
    }
}

/// How to read a paired difference: its unadjusted 95% interval, and whether the
/// difference survives Holm's adjustment.
pub fn verdict(t: &Test) -> String {
    let word = match interval_side(&t.paired) {
        _ if t.paired.n < 2 => return "too few seeds".into(),
        _ if !t.paired.ci95.is_finite() => return "not a number".into(),
        Some(Ordering::Greater) => "better",
        Some(_) => "worse",
        None => return "within noise".into(),
    };
    if significant(t) {
        word.into()
    } else {
        format!("{word} (not after Holm)")
    }
}

/// One task's `results.md`.
pub fn task(o: &ReportOptions, r: &TaskResult, kd_shards: &str) -> String {
    let mut s = protocol(o, r);
    s.push_str(&task_table(r));
    s.push_str(&notes(r));
    s.push_str(&grid_table(r));
    s.push_str(&format!(
        "\nPlain KD's shards: `{kd_shards}`. Inputs truncated to {} tokens for evaluation. Plots: \
         [`forest.png`](forest.png) (Δ vs plain KD with 95% intervals; filled: adjusted p below {ALPHA}), [`curves.png`](curves.png) \
         (dev, seed 0). `results.json` lists every student run, which were trained by this \
         command and which reused.\n",
        crate::teacher::EVAL_MAX_SEQ_LEN
    ));
    s
}

fn protocol(o: &ReportOptions, r: &TaskResult) -> String {
    let m = &r.metric;
    format!(
        "# {} — student comparison ({} preset{})\n\nRegenerate: `{}`\n\n\
         Protocol: teacher {m} on validation {} (teacher and students on {}). {} source examples of the train split are augmented; \
         the dev split ({} examples carved from train, never augmented nor trained on) chooses each \
         student's checkpoint{}. The student is {} layers cut from the base encoder (its weights, not the teacher's), {} steps of batch 32 at peak \
         learning rate {} (6% warm-up, linear decay), trained on `original` + the method's rows. Final runs use seeds 0..{}; \
         validation is scored once per final run and chooses nothing. Scores are ×100. Δ is the paired difference to plain KD over the same seeds (same \
         seed for the initialisation and the shuffling), with its 95% confidence interval and the paired t-test's p; p (Holm) is \
         Holm–Bonferroni adjusted over this task's paired tests (the rows below and projection alone), \
         and † marks an adjusted p below {ALPHA}. The reading is the unadjusted interval's.\n\n",
        r.task,
        o.preset,
        if o.tune { ", tuned on dev" } else { "" },
        command(o),
        pct(r.teacher_validation),
        r.teacher_ran_on,
        r.source_examples,
        r.dev_examples,
        if o.tune {
            format!(
                " and, with {} seed(s) per grid point, each method's setting (tuning runs have \
                 their own seeds, from {}, and are never reused as final runs)",
                r.tune_seeds,
                super::runs::TUNE_SEED_BASE
            )
        } else {
            String::new()
        },
        r.layers,
        r.steps,
        r.lr,
        r.seeds,
    )
}

/// The sample standard deviation ×100, or "–" for fewer than two values (no spread to show).
fn spread(v: &Summary) -> String {
    if v.n < 2 {
        "–".into()
    } else {
        format!("{:.2}", 100.0 * v.std)
    }
}

fn task_table(r: &TaskResult) -> String {
    let m = &r.metric;
    let mut s = format!(
        "| method | setting | dev {m} | validation {m} mean ± std | 95% CI | Δ vs plain KD | Δ 95% CI | p | p (Holm) | reading | seeds | rows |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|\n"
    );
    for row in &r.rows {
        let v = &row.validation;
        let (d, dci, p, ph, read) = match &row.vs_kd {
            Some(t) => (
                pm(t.paired.mean),
                half(t.paired.ci95),
                p_value(t.paired.p),
                format!("{}{}", p_value(t.p_holm), dagger(t)),
                verdict(t),
            ),
            None => (
                "–".into(),
                "–".into(),
                "–".into(),
                "–".into(),
                "reference".into(),
            ),
        };
        s.push_str(&format!(
            "| {} | {} | {} | {} ± {} | {} | {d} | {dci} | {p} | {ph} | {read} | {} | {} |\n",
            row.label,
            row.setting.label,
            pct(row.dev.mean),
            pct(v.mean),
            spread(v),
            half(v.ci95),
            v.n,
            row.rows
        ));
    }
    s
}

/// Projection alone, as one sentence.
fn projection(t: &Test) -> String {
    format!(
        "{} points (95% CI {}, p {}, Holm {}{}): {}",
        pm(t.paired.mean),
        half(t.paired.ci95),
        p_value(t.paired.p),
        p_value(t.p_holm),
        dagger(t),
        verdict(t)
    )
}

fn notes(r: &TaskResult) -> String {
    let mut s = String::new();
    if let Some(t) = &r.projection_effect {
        s.push_str(&format!(
            "\nProjection alone: AugPro-Mix minus MixUp at the same setting, paired over {} seeds: {}.\n",
            t.paired.n,
            projection(t)
        ));
    }
    if let Some(kd) = r.rows.first().filter(|kd| kd.validation.n >= 2) {
        s.push_str(&format!(
            "\nPlain KD's seed spread: std {} points over {} seeds{}.\n",
            spread(&kd.validation),
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
        if task::glue(&r.task).is_ok_and(|t| t.is_regression()) {
            s.push_str(
                "For this regression task, the cross-entropy is the squared error to the gold score \
                 and the KL is the squared error between the two models' scores.\n",
            );
        }
    }
    s
}

fn grid_table(r: &TaskResult) -> String {
    if r.grid.is_empty() {
        return String::new();
    }
    let mut s = format!(
        "\n## Tuning on dev ({} seed(s) per point; the chosen point is in bold)\n\n| method | setting | dev {} | method rows |\n|---|---|---:|---:|\n",
        r.tune_seeds, r.metric
    );
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
    s
}

/// The GLUE-style table over several tasks.
pub fn glue_table(o: &ReportOptions, rs: &[TaskResult], sources: &[Source]) -> String {
    let mut s = format!(
        "# GLUE student comparison ({} preset{})\n\nRegenerate: `{}`\n\n{}\
         Validation scores ×100, mean ± 95% CI over seeds ({}), each method at {} \
         (see each task's `results.md` for the settings, the dev scores and the paired tests). \
         Avg is the mean over the tasks of the means. † marks a paired difference to plain KD whose \
         Holm–Bonferroni adjusted p (over that task's paired tests) is below {ALPHA}; the others are \
         not established.\n\n| method |",
        o.preset,
        if o.tune { ", tuned on dev" } else { "" },
        command(o),
        collected_from(sources),
        rs.iter()
            .map(|r| format!("{} {}", r.task, r.seeds))
            .collect::<Vec<_>>()
            .join(", "),
        if o.tune {
            "its own dev-best setting"
        } else {
            "the pipeline's own setting"
        }
    );
    for r in rs {
        s.push_str(&format!(" {} ({}) |", r.task, r.metric));
    }
    s.push_str(" Avg |\n|---|");
    s.push_str(&"---:|".repeat(rs.len() + 1));
    s.push('\n');
    s.push_str(&glue_rows(rs));
    s.push_str(&glue_notes(rs, o.tune));
    s
}

/// ` (on cpu (AVX2) in f32)`, or nothing where results did not record it.
fn ran_on(device: &str) -> String {
    match device {
        "" => String::new(),
        d => format!(" (on {d})"),
    }
}

/// For a collected table, the command that made each task's column.
fn collected_from(sources: &[Source]) -> String {
    if sources.is_empty() {
        return String::new();
    }
    let mut s = "Collected from each task's own comparison, training nothing; each made by:\n\n"
        .to_string();
    for src in sources {
        s.push_str(&format!("- {}: `{}`\n", src.task, src.command));
    }
    s.push('\n');
    s
}

fn glue_rows(rs: &[TaskResult]) -> String {
    let mut labels: Vec<&str> = Vec::new();
    for row in rs.iter().flat_map(|r| &r.rows) {
        if !labels.contains(&row.label.as_str()) {
            labels.push(&row.label);
        }
    }
    let mut s = String::new();
    for l in labels {
        s.push_str(&format!("| {l} |"));
        let mut means = Vec::new();
        for r in rs {
            match r.rows.iter().find(|x| x.label == l) {
                Some(row) => {
                    let v = &row.validation;
                    let mark = row.vs_kd.as_ref().map_or("", dagger);
                    let ci = half(v.ci95);
                    s.push_str(&format!(
                        " {} ± {}{mark} |",
                        pct(v.mean),
                        ci.trim_start_matches('±')
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
    s
}

/// The notes under the GLUE table: projection alone, each method's setting (chosen on dev
/// when `tuned`) and each task's teacher and student budget.
fn glue_notes(rs: &[TaskResult], tuned: bool) -> String {
    let mut s = String::new();
    for r in rs {
        if let Some(t) = &r.projection_effect {
            s.push_str(&format!(
                "\n{}: projection alone (AugPro-Mix − MixUp at the same setting, paired) {}.",
                r.task,
                projection(t)
            ));
        }
    }
    s.push_str(if tuned {
        "\n\nSettings chosen on dev:\n\n"
    } else {
        "\n\nSettings (each the pipeline's own):\n\n"
    });
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
            "- {}: teacher {} {}{}; {} source examples, dev {}; student {} layers, {} steps at lr {}\n",
            r.task,
            r.metric,
            pct(r.teacher_validation),
            ran_on(&r.teacher_ran_on),
            r.source_examples,
            r.dev_examples,
            r.layers,
            r.steps,
            r.lr
        ));
    }
    s
}

/// The scaling report (`--scaling`): per task, every method at every size, then what each
/// method's score is worth in plain-KD source examples.
pub fn scaling(command: &str, rs: &[super::scaling::TaskScaling]) -> String {
    let mut s = format!(
        "# How much data AugPro saves\n\nRegenerate: `{command}`\n\n\
         Protocol: each method keeps the setting its dev tuning chose at the table's budget. \
         At each number of source examples the student's step count is sized on dev for plain \
         KD (tuning runs with their own seeds, at the table's steps scaled to the size, half and \
         twice that, then doubling while the longest count is dev-best and gained at least one \
         point over the one before, up to four times the scaled count), and every method trains \
         at that count over the final seeds 0..n; \
         validation is scored once per final run and chooses nothing. Scores ×100 with 95% \
         intervals; Δ is paired with plain KD over the same seeds; p (Holm) is adjusted over \
         every paired test of the task's table, † below {ALPHA}. \"Plain-KD examples\" places a \
         method's mean on plain KD's curve (linear in log examples between sizes).\n"
    );
    for r in rs {
        s.push_str(&scaling_task(r));
    }
    s
}

fn scaling_task(r: &super::scaling::TaskScaling) -> String {
    let m = &r.metric;
    let mut s = format!(
        "\n## {} ({m})\n\nSettings: {}. Plot: [`{}.png`]({}.png).\n\n\
         | source examples | steps | method | validation {m} | Δ vs plain KD | p | p (Holm) | reading |\n\
         |---:|---:|---|---:|---:|---:|---:|---|\n",
        r.task,
        r.settings
            .iter()
            .map(|(k, v)| format!("{k} [{}]", v.label))
            .collect::<Vec<_>>()
            .join(", "),
        r.task,
        r.task,
    );
    for p in &r.points {
        for row in &p.rows {
            let v = &row.validation;
            let (d, pv, ph, reading) = match &row.vs_kd {
                Some(t) => (
                    format!("{} {}{}", pm(t.paired.mean), half(t.paired.ci95), dagger(t)),
                    p_value(t.paired.p),
                    p_value(t.p_holm),
                    verdict(t),
                ),
                None => ("".into(), "".into(), "".into(), "".into()),
            };
            s.push_str(&format!(
                "| {} | {} | {} | {} {} | {d} | {pv} | {ph} | {reading} |\n",
                p.source_examples,
                p.steps,
                row.label,
                pct(v.mean),
                half(v.ci95),
            ));
        }
    }
    s.push_str(&format!(
        "\nStep counts tried on dev for plain KD (dev {m}, chosen in bold):\n\n"
    ));
    for p in &r.points {
        s.push_str(&format!(
            "- {} source examples: {}\n",
            p.source_examples,
            sizing_line(&p.sizing)
        ));
    }
    s.push_str(&format!(
        "\n| method | source examples | validation {m} | plain-KD examples | × |\n|---|---:|---:|---:|---:|\n"
    ));
    for w in &r.worth {
        use super::scaling::Equivalent;
        let (kd, ratio) = match w.kd_examples {
            Equivalent::Examples(n) => (format!("{n:.0}"), format!("{:.2}", n / w.examples as f64)),
            Equivalent::BelowSmallest => ("below the smallest size".into(), "–".into()),
            Equivalent::AboveLargest => ("above the largest size".into(), "–".into()),
            Equivalent::Unknown => ("not a number".into(), "–".into()),
        };
        let note = if w.significant {
            ""
        } else {
            " (Δ within noise after Holm)"
        };
        s.push_str(&format!(
            "| {} | {} | {} | {kd}{note} | {ratio} |\n",
            w.method,
            w.examples,
            pct(w.score)
        ));
    }
    s
}

/// The step counts tried at one size with their dev scores; the chosen one in bold, and a
/// note when it is the longest tried (plain KD may have gained from more steps).
fn sizing_line(sizing: &[super::scaling::StepsPoint]) -> String {
    let tried: Vec<String> = sizing
        .iter()
        .map(|p| {
            let t = format!("{} steps {}", p.steps, pct(p.dev));
            if p.chosen {
                format!("**{t}**")
            } else {
                t
            }
        })
        .collect();
    let longest_chosen = sizing.last().is_some_and(|p| p.chosen) && sizing.len() > 1;
    format!(
        "{}{}",
        tried.join(", "),
        if longest_chosen {
            " (the longest tried)"
        } else {
            ""
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(mean: f64, ci95: f64, p: f64, p_holm: f64) -> Test {
        Test {
            paired: Paired {
                n: 3,
                mean,
                ci95,
                p,
            },
            p_holm,
        }
    }

    #[test]
    fn one_seed_shows_no_spread() {
        use super::super::stats::summary;
        assert_eq!(spread(&summary(&[0.5])), "–");
        assert_eq!(spread(&summary(&[0.5, 0.52])), "1.41");
    }

    #[test]
    fn readings_and_marks() {
        assert_eq!(
            interval_side(&t(0.02, 0.01, 0.01, 0.03).paired),
            Some(Ordering::Greater)
        );
        assert_eq!(
            interval_side(&t(-0.02, 0.01, 0.01, 0.03).paired),
            Some(Ordering::Less)
        );
        assert_eq!(interval_side(&t(0.02, 0.03, 0.2, 0.4).paired), None);
        assert_eq!(
            interval_side(&t(0.02, f64::NAN, f64::NAN, f64::NAN).paired),
            None
        );
        assert_eq!(verdict(&t(0.02, 0.01, 0.01, 0.03)), "better");
        assert_eq!(
            verdict(&t(0.02, 0.01, 0.01, 0.07)),
            "better (not after Holm)"
        );
        assert_eq!(verdict(&t(-0.02, 0.01, 0.01, 0.03)), "worse");
        assert_eq!(verdict(&t(0.02, 0.03, 0.2, 0.4)), "within noise");
        assert_eq!(
            verdict(&t(0.02, f64::NAN, f64::NAN, f64::NAN)),
            "not a number"
        );
        let one_pair = Test {
            paired: Paired {
                n: 1,
                mean: 0.02,
                ci95: f64::NAN,
                p: f64::NAN,
            },
            p_holm: f64::NAN,
        };
        assert_eq!(verdict(&one_pair), "too few seeds");
        assert!(significant(&t(0.02, 0.01, 0.01, 0.049)));
        assert!(!significant(&t(0.02, 0.01, 0.01, 0.05)));
        assert!(!significant(&t(0.02, 0.01, 0.01, f64::NAN)));
    }
}
