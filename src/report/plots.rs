//! The report's figures: a forest plot of each method's paired difference to plain KD with
//! its 95% confidence interval, and the dev curves of seed 0.

use anyhow::{bail, Result};
use std::path::Path;

/// One row of the forest plot: a method's paired difference to plain KD and the
/// half-width of its 95% confidence interval.
pub struct Interval {
    /// Row label.
    pub label: String,
    /// Mean paired difference.
    pub mean: f64,
    /// Half-width of the 95% interval (NaN with one seed: the point alone is drawn).
    pub ci95: f64,
    /// Holm-adjusted p below 0.05 (drawn filled).
    pub marked: bool,
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

fn err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("{e}")
}

/// The x range of a forest plot in points (×100): every interval, and 0.
fn forest_range(rows: &[Interval]) -> Option<(f64, f64)> {
    if rows.iter().all(|r| !r.mean.is_finite()) {
        return None;
    }
    let half = |r: &Interval| if r.ci95.is_finite() { r.ci95 } else { 0.0 };
    let pts = rows
        .iter()
        .filter(|r| r.mean.is_finite())
        .flat_map(|r| [r.mean - half(r), r.mean + half(r)]);
    let (lo, hi) = pts.fold((0f64, 0f64), |(lo, hi), x| (lo.min(x), hi.max(x)));
    let pad = ((hi - lo) * 0.1).max(0.002);
    Some((100.0 * (lo - pad), 100.0 * (hi + pad)))
}

/// Forest plot: one row per method (top to bottom in the given order), its paired
/// difference to plain KD with the 95% interval as a horizontal error bar, and a vertical
/// line at 0 (no difference). Differences whose Holm-adjusted p is below 0.05 are filled.
pub fn forest(path: &Path, title: &str, x_desc: &str, rows: &[Interval]) -> Result<()> {
    use plotters::prelude::*;
    register_font()?;
    let Some((lo, hi)) = forest_range(rows) else {
        bail!("nothing to plot");
    };
    let n = rows.len();
    let root = BitMapBackend::new(path, (1000, 120 + 60 * n as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    // Row i sits at y = n - 1 - i, so the first row is on top.
    let y = |i: usize| (n - 1 - i) as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(200)
        .build_cartesian_2d(lo..hi, -0.5f64..(n as f64 - 0.5))
        .map_err(err)?;
    let names: Vec<String> = rows.iter().map(|r| r.label.clone()).collect();
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(n)
        .y_label_formatter(&|v| {
            let i = n as f64 - 1.0 - v.round();
            if (v - v.round()).abs() > 0.01 || i < 0.0 {
                return String::new();
            }
            names.get(i as usize).cloned().unwrap_or_default()
        })
        .x_desc(x_desc)
        .draw()
        .map_err(err)?;
    chart
        .draw_series(LineSeries::new(
            [(0.0, -0.5), (0.0, n as f64 - 0.5)],
            BLACK.stroke_width(1),
        ))
        .map_err(err)?;
    let color = |r: &Interval| {
        if r.label.starts_with("augpro") {
            RED
        } else {
            BLUE
        }
    };
    let finite = || rows.iter().enumerate().filter(|(_, r)| r.mean.is_finite());
    chart
        .draw_series(finite().filter(|(_, r)| r.ci95.is_finite()).map(|(i, r)| {
            let (m, h) = (100.0 * r.mean, 100.0 * r.ci95);
            ErrorBar::new_horizontal(y(i), m - h, m, m + h, color(r).stroke_width(2), 12)
        }))
        .map_err(err)?;
    chart
        .draw_series(finite().map(|(i, r)| {
            let style = if r.marked {
                color(r).filled()
            } else {
                color(r).stroke_width(2)
            };
            Circle::new((100.0 * r.mean, y(i)), 6, style)
        }))
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

/// Dev metric against student step, one line per method.
pub fn curves(
    path: &Path,
    title: &str,
    metric: &str,
    lines: &[(String, Vec<(usize, f64)>)],
) -> Result<()> {
    use plotters::prelude::*;
    register_font()?;
    let root = BitMapBackend::new(path, (1000, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let pts: Vec<(usize, f64)> = lines.iter().flat_map(|l| l.1.iter().copied()).collect();
    let xmax = pts.iter().map(|p| p.0).max().unwrap_or(1).max(1) as f64;
    let lo = pts.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let hi = pts.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
    if !lo.is_finite() || !hi.is_finite() {
        bail!("nothing to plot");
    }
    let pad = ((hi - lo) * 0.1).max(0.01);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..xmax, (lo - pad)..(hi + pad))
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc(metric)
        .draw()
        .map_err(err)?;
    for (i, (name, line)) in lines.iter().enumerate() {
        let c = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(
                line.iter().map(|&(s, v)| (s as f64, v)),
                c.stroke_width(2),
            ))
            .map_err(err)?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

/// The x range (examples) and y range (scores with their 95% intervals) of the scaling
/// plot; `None` when nothing finite is there.
fn scaling_ranges(
    lines: &[(String, Vec<(f64, super::stats::Summary)>)],
) -> Option<((f64, f64), (f64, f64))> {
    let pts = || lines.iter().flat_map(|l| l.1.iter());
    let half = |s: &super::stats::Summary| if s.ci95.is_finite() { s.ci95 } else { 0.0 };
    let lo = pts()
        .map(|p| p.1.mean - half(&p.1))
        .fold(f64::INFINITY, f64::min);
    let hi = pts()
        .map(|p| p.1.mean + half(&p.1))
        .fold(f64::NEG_INFINITY, f64::max);
    let xmin = pts().map(|p| p.0).fold(f64::INFINITY, f64::min);
    let xmax = pts().map(|p| p.0).fold(f64::NEG_INFINITY, f64::max);
    let finite = [lo, hi, xmin, xmax].iter().all(|v| v.is_finite());
    (finite && xmin > 0.0).then_some(((xmin, xmax), (lo, hi)))
}

/// Validation score against source examples (log scale), one line per method, each point
/// with its 95% interval as a vertical error bar (scores ×100).
pub fn scaling(
    path: &Path,
    title: &str,
    metric: &str,
    lines: &[(String, Vec<(f64, super::stats::Summary)>)],
) -> Result<()> {
    use plotters::prelude::*;
    register_font()?;
    let Some(((xmin, xmax), (lo, hi))) = scaling_ranges(lines) else {
        bail!("nothing to plot");
    };
    let pad = ((hi - lo) * 0.1).max(0.002);
    let root = BitMapBackend::new(path, (1000, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(
            (xmin / 1.3..xmax * 1.3).log_scale(),
            100.0 * (lo - pad)..100.0 * (hi + pad),
        )
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("source examples (log scale)")
        .y_desc(format!("validation {metric} (×100)"))
        .draw()
        .map_err(err)?;
    for (i, (name, line)) in lines.iter().enumerate() {
        let c = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(
                line.iter().map(|(n, s)| (*n, 100.0 * s.mean)),
                c.stroke_width(2),
            ))
            .map_err(err)?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        chart
            .draw_series(
                line.iter()
                    .filter(|(_, s)| s.ci95.is_finite())
                    .map(|(n, s)| {
                        let (m, h) = (100.0 * s.mean, 100.0 * s.ci95);
                        ErrorBar::new_vertical(*n, m - h, m, m + h, c.stroke_width(2), 10)
                    }),
            )
            .map_err(err)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(mean: f64, ci95: f64) -> Interval {
        Interval {
            label: "m".into(),
            mean,
            ci95,
            marked: false,
        }
    }

    #[test]
    fn forest_range_holds_every_interval_and_zero() {
        let (lo, hi) = forest_range(&[row(0.02, 0.01), row(0.03, f64::NAN)]).unwrap();
        assert!(lo < 0.0 && hi > 3.0, "{lo} {hi}");
        let (lo, hi) = forest_range(&[row(-0.05, 0.02)]).unwrap();
        assert!(lo < -7.0 && hi > 0.0, "{lo} {hi}");
        assert!(forest_range(&[row(f64::NAN, f64::NAN)]).is_none());
        assert!(forest_range(&[]).is_none());
    }

    #[test]
    fn scaling_ranges_hold_every_interval() {
        use crate::report::stats::summary;
        let line = |xs: &[(f64, &[f64])]| -> Vec<(f64, crate::report::stats::Summary)> {
            xs.iter().map(|(n, v)| (*n, summary(v))).collect()
        };
        let lines = vec![
            (
                "kd".to_string(),
                line(&[(250.0, &[0.7, 0.8]), (1000.0, &[0.85])]),
            ),
            ("augpro".to_string(), line(&[(4000.0, &[0.9, 0.92])])),
        ];
        let ((x0, x1), (lo, hi)) = scaling_ranges(&lines).unwrap();
        assert_eq!((x0, x1), (250.0, 4000.0));
        // The two-seed interval at 250 reaches far below its mean of 0.75.
        assert!(lo < 0.7 && hi > 0.92, "{lo} {hi}");
        assert!(scaling_ranges(&[]).is_none());
        let empty = vec![("kd".to_string(), line(&[(0.0, &[0.5])]))];
        assert!(scaling_ranges(&empty).is_none(), "no log axis through 0");
    }
}
