//! Small-sample statistics for the comparison: mean, sample standard deviation, Student-t
//! 95% confidence intervals, the paired t-test and Holm–Bonferroni adjusted p-values.

/// Reads back the `null` that JSON writes for a NaN score as NaN.
pub mod nan_as_null {
    use serde::{Deserialize, Deserializer};

    /// A score, `null` read as NaN.
    pub fn score<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
    }

    /// A dev curve of `(step, score)` points, `null` scores read as NaN.
    pub fn curve<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<(usize, f64)>, D::Error> {
        let points = Vec::<(usize, Option<f64>)>::deserialize(d)?;
        Ok(points
            .into_iter()
            .map(|(step, v)| (step, v.unwrap_or(f64::NAN)))
            .collect())
    }

    /// Values, `null` read as NaN.
    pub fn scores<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f64>, D::Error> {
        let values = Vec::<Option<f64>>::deserialize(d)?;
        Ok(values.into_iter().map(|v| v.unwrap_or(f64::NAN)).collect())
    }
}

/// Mean, sample standard deviation and the 95% confidence interval of the mean.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Summary {
    /// Values.
    pub n: usize,
    /// Mean.
    #[serde(deserialize_with = "nan_as_null::score")]
    pub mean: f64,
    /// Sample standard deviation (0 for one value).
    #[serde(deserialize_with = "nan_as_null::score")]
    pub std: f64,
    /// Half-width of the 95% confidence interval of the mean (NaN for one value).
    #[serde(deserialize_with = "nan_as_null::score")]
    pub ci95: f64,
}

/// Summarises values in the order given (so the same values give the same bits).
pub fn summary(xs: &[f64]) -> Summary {
    let n = xs.len();
    if n == 0 {
        return Summary {
            n,
            mean: f64::NAN,
            std: f64::NAN,
            ci95: f64::NAN,
        };
    }
    let mean = xs.iter().sum::<f64>() / n as f64;
    if n == 1 {
        return Summary {
            n,
            mean,
            std: 0.0,
            ci95: f64::NAN,
        };
    }
    let std = (xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt();
    Summary {
        n,
        mean,
        std,
        ci95: t_quantile(0.975, (n - 1) as f64) * std / (n as f64).sqrt(),
    }
}

/// A paired comparison: the mean difference `a - b` over pairs, its 95% confidence
/// interval and the two-sided p-value of the paired t-test.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Paired {
    /// Pairs.
    pub n: usize,
    /// Mean of `a - b`.
    #[serde(deserialize_with = "nan_as_null::score")]
    pub mean: f64,
    /// Half-width of its 95% confidence interval.
    #[serde(deserialize_with = "nan_as_null::score")]
    pub ci95: f64,
    /// Two-sided p-value of the paired t-test (NaN below two pairs; 1 when every
    /// difference is 0). When every difference is the same non-zero value the t statistic
    /// is undefined, and p is the exact sign-flip test's, `2 / 2ⁿ`: the observed mean is
    /// the most extreme of the `2ⁿ` equally likely sign patterns, with its mirror image.
    #[serde(deserialize_with = "nan_as_null::score")]
    pub p: f64,
}

/// Paired t-test of `a` against `b` (the same index is the same seed).
pub fn paired(a: &[f64], b: &[f64]) -> Paired {
    let d: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
    let s = summary(&d);
    let p = if s.n < 2 {
        f64::NAN
    } else if s.std == 0.0 {
        if s.mean == 0.0 {
            1.0
        } else {
            (2.0 / 2f64.powi(s.n as i32)).min(1.0)
        }
    } else {
        let t = s.mean / (s.std / (s.n as f64).sqrt());
        two_sided_p(t, (s.n - 1) as f64)
    };
    Paired {
        n: s.n,
        mean: s.mean,
        ci95: s.ci95,
        p,
    }
}

/// Holm–Bonferroni adjusted p-values of a family of tests, in the order given. With the m
/// finite p-values sorted ascending, the i-th (from 0) is multiplied by m − i, capped at 1,
/// and raised to the largest adjusted value before it, so the adjusted values keep the
/// order of the raw ones (equal raw p-values get equal adjusted ones). A NaN p-value (too
/// few pairs) is no test: it stays NaN and does not count in m.
pub fn holm(p: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..p.len()).filter(|&i| p[i].is_finite()).collect();
    order.sort_by(|&a, &b| p[a].total_cmp(&p[b]));
    let m = order.len();
    let mut out = vec![f64::NAN; p.len()];
    let mut running = 0f64;
    for (rank, &i) in order.iter().enumerate() {
        running = running.max(((m - rank) as f64 * p[i]).min(1.0));
        out[i] = running;
    }
    out
}

/// Two-sided p-value of Student's t statistic `t` with `df` degrees of freedom:
/// `I_{df/(df+t²)}(df/2, 1/2)` directly, so a very small p keeps its digits instead of
/// cancelling in `1 − CDF`.
fn two_sided_p(t: f64, df: f64) -> f64 {
    inc_beta(df / 2.0, 0.5, df / (df + t * t))
}

/// CDF of Student's t with `df` degrees of freedom.
pub fn t_cdf(t: f64, df: f64) -> f64 {
    let x = df / (df + t * t);
    let tail = 0.5 * inc_beta(df / 2.0, 0.5, x);
    if t >= 0.0 {
        1.0 - tail
    } else {
        tail
    }
}

/// Quantile of Student's t (bisection on [`t_cdf`]).
pub fn t_quantile(p: f64, df: f64) -> f64 {
    let (mut lo, mut hi) = (-1e3, 1e3);
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if t_cdf(mid, df) < p {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

/// Regularised incomplete beta function I_x(a, b) (continued fraction, Lentz's method).
fn inc_beta(a: f64, b: f64, x: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let ln_front = ln_gamma(a + b) - ln_gamma(a) - ln_gamma(b) + a * x.ln() + b * (1.0 - x).ln();
    if x < (a + 1.0) / (a + b + 2.0) {
        ln_front.exp() * beta_cf(a, b, x) / a
    } else {
        1.0 - ln_front.exp() * beta_cf(b, a, 1.0 - x) / b
    }
}

fn beta_cf(a: f64, b: f64, x: f64) -> f64 {
    let tiny = 1e-300;
    let (qab, qap, qam) = (a + b, a + 1.0, a - 1.0);
    let mut c = 1.0;
    let mut d = 1.0 - qab * x / qap;
    if d.abs() < tiny {
        d = tiny;
    }
    d = 1.0 / d;
    let mut h = d;
    for m in 1..300 {
        let m = m as f64;
        let m2 = 2.0 * m;
        let aa = m * (b - m) * x / ((qam + m2) * (a + m2));
        d = 1.0 + aa * d;
        d = if d.abs() < tiny { tiny } else { d };
        c = 1.0 + aa / c;
        c = if c.abs() < tiny { tiny } else { c };
        d = 1.0 / d;
        h *= d * c;
        let aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2));
        d = 1.0 + aa * d;
        d = if d.abs() < tiny { tiny } else { d };
        c = 1.0 + aa / c;
        c = if c.abs() < tiny { tiny } else { c };
        d = 1.0 / d;
        let del = d * c;
        h *= del;
        if (del - 1.0).abs() < 1e-15 {
            break;
        }
    }
    h
}

/// ln Γ(x) for x > 0 (Lanczos, g = 7).
fn ln_gamma(x: f64) -> f64 {
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        return (std::f64::consts::PI / (std::f64::consts::PI * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut a = C[0];
    let t = x + 7.5;
    for (i, c) in C.iter().enumerate().skip(1) {
        a += c / (x + i as f64);
    }
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + a.ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn t_distribution_matches_tables() {
        // Two-sided 95% critical values of Student's t (standard tables).
        for (df, want) in [(1.0, 12.7062), (2.0, 4.3027), (4.0, 2.7764), (9.0, 2.2622)] {
            let q = t_quantile(0.975, df);
            assert!((q - want).abs() < 1e-3, "df {df}: {q} vs {want}");
        }
        assert!((t_cdf(0.0, 5.0) - 0.5).abs() < 1e-12);
        // scipy.stats.t.cdf(1.5, 4) = 0.8960000...
        assert!(
            (t_cdf(1.5, 4.0) - 0.896_000).abs() < 1e-4,
            "{}",
            t_cdf(1.5, 4.0)
        );
    }

    #[test]
    fn paired_test_and_intervals() {
        let s = summary(&[1.0, 2.0, 3.0]);
        assert_eq!((s.n, s.mean, s.std), (3, 2.0, 1.0));
        assert!((s.ci95 - 4.3027 / 3f64.sqrt()).abs() < 1e-3);
        // Differences 1, 2, 3: t = 2 / (1/√3) = 3.464, df 2 → p = 0.0742 (scipy ttest_rel).
        let p = paired(&[2.0, 4.0, 6.0], &[1.0, 2.0, 3.0]);
        assert_eq!(p.mean, 2.0);
        assert!((p.p - 0.0742).abs() < 1e-3, "{}", p.p);
        assert_eq!(paired(&[1.0, 2.0], &[1.0, 2.0]).p, 1.0);
        assert!(paired(&[1.0], &[0.0]).p.is_nan());
    }

    #[test]
    fn identical_non_zero_differences_get_the_sign_flip_p() {
        // Three seeds each 3/872 better: the spread is exactly 0, so no t statistic; of the
        // 2³ sign patterns only these and their mirror are as extreme: p = 2/8.
        let base = [0.80, 0.81, 0.79];
        let better: Vec<f64> = base.iter().map(|v| v + 3.0 / 872.0).collect();
        let d: Vec<f64> = better.iter().zip(&base).map(|(a, b)| a - b).collect();
        assert_eq!(summary(&d).std, 0.0);
        assert_eq!(paired(&better, &base).p, 0.25);
        assert_eq!(paired(&[1.0, 1.0], &[0.0, 0.0]).p, 0.5);
        assert_eq!(paired(&[1.0; 10], &[0.0; 10]).p, 2.0 / 1024.0);
        assert_eq!(paired(&[-1.0; 4], &[0.0; 4]).p, 0.125);
    }

    #[test]
    fn two_sided_p_agrees_with_the_cdf_and_keeps_tiny_values() {
        for (t, df) in [(0.0, 3.0), (1.5, 4.0), (-2.3, 9.0), (3.464, 2.0)] {
            let via_cdf = 2.0 * (1.0 - t_cdf(f64::abs(t), df));
            assert!(
                (two_sided_p(t, df) - via_cdf).abs() < 1e-12,
                "t {t} df {df}"
            );
        }
        // t = 100 with 9 degrees of freedom: p = 5.0731e-15 (the beta density integrated
        // numerically), where 1 − CDF keeps one digit.
        let p = two_sided_p(100.0, 9.0);
        assert!((p / 5.073_089_766e-15 - 1.0).abs() < 1e-6, "{p}");
    }

    #[test]
    fn holm_by_hand() {
        let close = |got: Vec<f64>, want: &[f64]| {
            assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(want) {
                assert!(
                    (g - w).abs() < 1e-12 || (g.is_nan() && w.is_nan()),
                    "{got:?} vs {want:?}"
                );
            }
        };
        // Sorted 0.005, 0.01, 0.03, 0.04 → ×4, ×3, ×2, ×1 = 0.02, 0.03, 0.06, 0.04; the last
        // is raised to 0.06 (monotonicity).
        close(holm(&[0.01, 0.04, 0.03, 0.005]), &[0.03, 0.06, 0.06, 0.02]);
        // Ties: 0.02 × 3 = 0.06, 0.02 × 2 = 0.04 → 0.06; 0.5 × 1.
        close(holm(&[0.02, 0.5, 0.02]), &[0.06, 0.5, 0.06]);
        // Capped at 1; a NaN is left out of the family (m = 2).
        close(holm(&[0.6, f64::NAN, 0.7]), &[1.0, f64::NAN, 1.0]);
        close(holm(&[0.02, f64::NAN, 0.04]), &[0.04, f64::NAN, 0.04]);
        close(holm(&[0.03]), &[0.03]);
        assert!(holm(&[]).is_empty());
    }
}
