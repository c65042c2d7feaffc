//! The report's figures: the primary metric per method with 95% confidence intervals, and
//! the dev curves of seed 0.

use anyhow::{bail, Result};
use std::path::Path;

/// One bar: a method's mean and the half-width of its 95% confidence interval.
pub struct Bar {
    /// Row label.
    pub label: String,
    /// Mean over seeds.
    pub mean: f64,
    /// Half-width of the 95% interval (NaN with one seed: no bar drawn).
    pub ci95: f64,
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

/// Bars of the validation metric per method with 95% confidence intervals.
pub fn bars(path: &Path, title: &str, metric: &str, bars: &[Bar]) -> Result<()> {
    use plotters::prelude::*;
    register_font()?;
    let root = BitMapBackend::new(path, (1000, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let half = |b: &Bar| if b.ci95.is_finite() { b.ci95 } else { 0.0 };
    let lo = bars
        .iter()
        .map(|b| b.mean - half(b))
        .fold(f64::INFINITY, f64::min);
    let hi = bars
        .iter()
        .map(|b| b.mean + half(b))
        .fold(f64::NEG_INFINITY, f64::max);
    if !lo.is_finite() || !hi.is_finite() {
        bail!("nothing to plot");
    }
    let pad = ((hi - lo) * 0.2).max(0.01);
    let n = bars.len();
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), (lo - pad)..(hi + pad))
        .map_err(err)?;
    let names: Vec<String> = bars.iter().map(|b| b.label.clone()).collect();
    chart
        .configure_mesh()
        .x_labels(n)
        .x_label_formatter(&|x| names.get(x.round() as usize).cloned().unwrap_or_default())
        .y_desc(metric)
        .draw()
        .map_err(err)?;
    chart
        .draw_series(bars.iter().enumerate().map(|(i, b)| {
            let color = if b.label.starts_with("augpro") {
                RED.mix(0.7)
            } else {
                BLUE.mix(0.5)
            };
            Rectangle::new(
                [(i as f64 - 0.35, lo - pad), (i as f64 + 0.35, b.mean)],
                color.filled(),
            )
        }))
        .map_err(err)?;
    chart
        .draw_series(
            bars.iter()
                .enumerate()
                .filter(|(_, b)| b.ci95.is_finite())
                .map(|(i, b)| {
                    ErrorBar::new_vertical(
                        i as f64,
                        b.mean - b.ci95,
                        b.mean,
                        b.mean + b.ci95,
                        BLACK.filled(),
                        10,
                    )
                }),
        )
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
