//! Branch-free `exp` and `erf` in `f32` that the compiler vectorises, and parallel
//! element-wise maps that run them with AVX2 where the CPU has it. No fused multiply-add
//! is used, so both code paths give the same bits.

use rayon::prelude::*;

/// Elements per parallel task.
const CHUNK: usize = 16 * 1024;

/// `e^x` (Cephes polynomial after range reduction), relative error about 2e-7; 0 below -87.3.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    // Adding and subtracting 1.5·2²³ rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(-87.3, 88.3);
    let n = (xc * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = xc - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let p = ((((1.987_569_2e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 0.166_666_65)
        * r
        + 0.5;
    let y = p * (r * r) + r + 1.0;
    let scaled = y * f32::from_bits(((n as i32 + 127) as u32) << 23);
    if x < -87.3 {
        0.0
    } else {
        scaled
    }
}

/// `erf(x)` as a rational function on [-4, 4] (±1 outside), absolute error about 1e-7.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = x2 * -2.726_142_3e-10 + 2.770_681_4e-8;
    p = x2 * p + -2.101_024e-6;
    p = x2 * p + -5.692_506_4e-5;
    p = x2 * p + -7.349_906_3e-4;
    p = x2 * p + -2.954_6e-3;
    p = x2 * p + -1.609_603_3e-2;
    let mut q = x2 * -1.456_607_2e-5 + -2.133_740_6e-4;
    q = x2 * q + -1.682_827e-3;
    q = x2 * q + -7.373_329_3e-3;
    q = x2 * q + -1.426_474e-2;
    x * p / q
}

#[inline(always)]
fn map_body<F: Fn(f32) -> f32>(src: &[f32], dst: &mut [f32], f: &F) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = f(s);
    }
}

#[inline(always)]
fn map2_body<F: Fn(f32, f32) -> f32>(a: &[f32], b: &[f32], dst: &mut [f32], f: &F) {
    for ((d, &x), &y) in dst.iter_mut().zip(a).zip(b) {
        *d = f(x, y);
    }
}

/// [`map_body`] compiled for AVX2.
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn map_avx2<F: Fn(f32) -> f32>(src: &[f32], dst: &mut [f32], f: &F) {
    map_body(src, dst, f)
}

/// [`map2_body`] compiled for AVX2.
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn map2_avx2<F: Fn(f32, f32) -> f32>(a: &[f32], b: &[f32], dst: &mut [f32], f: &F) {
    map2_body(a, b, dst, f)
}

fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `f` of each element, in parallel chunks.
pub fn map<F: Fn(f32) -> f32 + Sync>(src: &[f32], f: F) -> Vec<f32> {
    let mut dst = vec![0f32; src.len()];
    let avx2 = has_avx2();
    dst.par_chunks_mut(CHUNK)
        .zip(src.par_chunks(CHUNK))
        .for_each(|(d, s)| {
            #[cfg(target_arch = "x86_64")]
            if avx2 {
                // SAFETY: `map_avx2` only needs AVX2, which `has_avx2` detected at run time
                // just above; the slices are ordinary safe references.
                return unsafe { map_avx2(s, d, &f) };
            }
            let _ = avx2;
            map_body(s, d, &f)
        });
    dst
}

/// `f` of each pair of elements, in parallel chunks; an error when `a` and `b` differ in
/// length.
pub fn map2<F: Fn(f32, f32) -> f32 + Sync>(
    a: &[f32],
    b: &[f32],
    f: F,
) -> candle_core::Result<Vec<f32>> {
    if a.len() != b.len() {
        candle_core::bail!("map2: inputs of {} and {} elements", a.len(), b.len());
    }
    let mut dst = vec![0f32; a.len()];
    let avx2 = has_avx2();
    dst.par_chunks_mut(CHUNK)
        .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
        .for_each(|(d, (x, y))| {
            #[cfg(target_arch = "x86_64")]
            if avx2 {
                // SAFETY: `map2_avx2` only needs AVX2, which `has_avx2` detected at run time
                // just above; the slices are ordinary safe references.
                return unsafe { map2_avx2(x, y, d, &f) };
            }
            let _ = avx2;
            map2_body(x, y, d, &f)
        });
    Ok(dst)
}

/// In-place softmax of one row.
#[inline(always)]
pub fn softmax_row(row: &mut [f32]) {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let mut sum = 0f32;
    for v in row.iter_mut() {
        *v = exp(*v - max);
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in row.iter_mut() {
        *v *= inv;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_and_erf_match_libm() {
        let (mut e_exp, mut e_erf) = (0f64, 0f64);
        for i in -197_000..=197_000 {
            let x = i as f32 * 4.4e-4;
            let want = (x as f64).exp();
            e_exp = e_exp.max(((exp(x) as f64 - want) / want).abs());
            let x = i as f32 * 3.05e-5;
            e_erf = e_erf.max((erf(x) as f64 - libm_erf(x as f64)).abs());
        }
        assert!(e_exp < 4e-7, "exp relative error {e_exp}");
        assert!(e_erf < 1e-6, "erf absolute error {e_erf}");
        assert_eq!(exp(-1e9), 0.0);
        assert!((erf(10.0) - 1.0).abs() < 1e-6 && (erf(-10.0) + 1.0).abs() < 1e-6);
    }

    #[test]
    fn map2_of_different_lengths_is_an_error() {
        let e = map2(&[1.0, 2.0], &[1.0], |a, b| a + b).unwrap_err();
        assert!(e.to_string().contains("inputs of 2 and 1 elements"), "{e}");
        assert_eq!(
            map2(&[1.0, 2.0], &[3.0, 4.0], |a, b| a * b).unwrap(),
            [3.0, 8.0]
        );
    }

    /// erf by its Taylor series (|x| < 3) and continued fraction (beyond), in f64.
    fn libm_erf(x: f64) -> f64 {
        if x.abs() < 3.0 {
            let (mut term, mut sum, mut n) = (x, x, 0f64);
            while term.abs() > 1e-17 {
                n += 1.0;
                term *= -x * x / n;
                sum += term / (2.0 * n + 1.0);
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        } else {
            let z = x.abs();
            let mut f = 0f64;
            for k in (1..60).rev() {
                f = (k as f64 / 2.0) / (z + f);
            }
            let erfc = (-z * z).exp() / std::f64::consts::PI.sqrt() / (z + f);
            x.signum() * (1.0 - erfc)
        }
    }
}
