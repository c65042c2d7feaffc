//! `y = x·Wᵀ + b` with bf16 inputs and f32 accumulation, on AVX-512 BF16 dot products
//! (`vdpbf16ps`): the CPU teacher's matrix products under `--dtype bf16`. `W` is rounded
//! to bf16 and packed once per layer, in panels of [`NR`] output features holding pairs of
//! consecutive inputs; `x` is rounded and paired per call. Each task computes one tile of
//! [`MR`] rows × [`NR`] features in 28 zmm accumulators.

use rayon::prelude::*;
use std::arch::x86_64::*;

/// Output features per panel (two zmm registers of f32).
const NR: usize = 32;
/// Rows per tile.
const MR: usize = 14;

/// Whether this CPU has the instructions (AVX-512 F and BF16).
pub fn available() -> bool {
    crate::precision::cpu_has_bf16()
}

/// `x` rounded to the nearest bf16 (ties to even), as its 16 bits, as `vcvtne2ps2bf16`
/// gives it: NaN stays a quiet NaN and subnormals become zero of their sign.
fn bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) as u16) | 0x0040;
    }
    if x.is_subnormal() {
        return ((b >> 16) & 0x8000) as u16;
    }
    ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) as u16
}

/// Two values as one bf16 pair: `lo` in the low half.
fn pair(lo: f32, hi: f32) -> u32 {
    bf16(lo) as u32 | ((bf16(hi) as u32) << 16)
}

/// A weight `[out, in]` rounded to bf16 and packed for [`linear`].
#[derive(Debug)]
pub struct PackedWeight {
    /// Panels of `NR` features: `panel[p][j]` holds inputs `2p` and `2p + 1` of feature j.
    panels: Vec<u32>,
    /// Output features.
    out: usize,
    /// Input features.
    inputs: usize,
}

impl PackedWeight {
    /// Packs `w`, `[out, in]` row-major.
    pub fn new(w: &[f32], out: usize, inputs: usize) -> Self {
        assert_eq!(w.len(), out * inputs, "weight of [{out}, {inputs}]");
        let kp = inputs.div_ceil(2);
        let mut panels = vec![0u32; out.div_ceil(NR) * kp * NR];
        panels
            .par_chunks_mut(kp * NR)
            .enumerate()
            .for_each(|(pn, panel)| {
                for p in 0..kp {
                    for j in 0..NR.min(out - pn * NR) {
                        let row = &w[(pn * NR + j) * inputs..][..inputs];
                        let hi = row.get(2 * p + 1).copied().unwrap_or(0.0);
                        panel[p * NR + j] = pair(row[2 * p], hi);
                    }
                }
            });
        Self {
            panels,
            out,
            inputs,
        }
    }

    /// `(out, in)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.out, self.inputs)
    }
}

/// Rows of `x` `[n, in]` as bf16 pairs, `[n, ⌈in/2⌉]`.
fn pack_rows(x: &[f32], inputs: usize) -> Vec<u32> {
    let kp = inputs.div_ceil(2);
    let mut out = vec![0u32; (x.len() / inputs) * kp];
    out.par_chunks_mut(kp)
        .zip(x.par_chunks(inputs))
        // SAFETY: the caller checked `available`; `dst` holds ⌈row.len()/2⌉ pairs.
        .for_each(|(dst, row)| unsafe { pack_row(row, dst) });
    out
}

/// One row as bf16 pairs: 32 values per `vcvtne2ps2bf16` (nearest, ties to even, as
/// [`bf16`]), the tail one pair at a time.
///
/// # Safety
/// The CPU has AVX-512 F and BF16, and `dst` holds `⌈row.len() / 2⌉` pairs.
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn pack_row(row: &[f32], dst: &mut [u32]) {
    let full = row.len() / 32;
    for c in 0..full {
        let lo = _mm512_loadu_ps(row.as_ptr().add(32 * c));
        let hi = _mm512_loadu_ps(row.as_ptr().add(32 * c + 16));
        let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
        _mm512_storeu_si512(dst.as_mut_ptr().add(16 * c).cast(), v);
    }
    for (p, d) in dst.iter_mut().enumerate().skip(16 * full) {
        *d = pair(row[2 * p], row.get(2 * p + 1).copied().unwrap_or(0.0));
    }
}

/// One tile: `y[r][j] += Σ_p x[r][p] · w[p][j]` for `rows` rows and `cols` features.
///
/// # Safety
/// The CPU has AVX-512 F and BF16; `xp` holds `rows` rows of `kp` pairs, `wp` one panel
/// of `kp × NR` pairs, and `y` `rows` rows of stride `ldy` with `cols` writable features.
#[target_feature(enable = "avx512f,avx512bf16")]
// The row loop runs over the constant MR (not `rows`) so that it unrolls and the 28
// accumulators stay in registers.
#[allow(clippy::needless_range_loop)]
unsafe fn tile(
    xp: *const u32,
    kp: usize,
    rows: usize,
    wp: *const u32,
    y: *mut f32,
    ldy: usize,
    cols: usize,
) {
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    for p in 0..kp {
        let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(wp.add(p * NR).cast()));
        let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(wp.add(p * NR + 16).cast()));
        for r in 0..MR {
            if r < rows {
                let a: __m512bh =
                    std::mem::transmute(_mm512_set1_epi32(*xp.add(r * kp + p) as i32));
                acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, b0);
                acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, b1);
            }
        }
    }
    for (r, acc) in acc.iter().enumerate().take(rows) {
        let mut buf = [0f32; NR];
        _mm512_storeu_ps(buf.as_mut_ptr(), acc[0]);
        _mm512_storeu_ps(buf.as_mut_ptr().add(16), acc[1]);
        let row = y.add(r * ldy);
        for (j, v) in buf.iter().enumerate().take(cols) {
            *row.add(j) += v;
        }
    }
}

/// `y = x·Wᵀ + b` for `x` `[n, in]`, `w` packed from `[out, in]` and `b` `[out]`; `y` is
/// `[n, out]`. Panics when [`available`] is false or the sizes disagree.
pub fn linear(x: &[f32], w: &PackedWeight, b: &[f32]) -> Vec<f32> {
    assert!(available(), "bf16 linear without AVX-512 BF16");
    let (m, k) = (w.out, w.inputs);
    assert!(
        k > 0 && x.len().is_multiple_of(k) && b.len() == m,
        "linear: sizes disagree"
    );
    let n = x.len() / k;
    let mut y = vec![0f32; n * m];
    y.par_chunks_mut(m.max(1))
        .for_each(|row| row.copy_from_slice(b));
    let xp = pack_rows(x, k);
    let kp = k.div_ceil(2);
    let panels = m.div_ceil(NR);
    let yp = super::SharedMut(y.as_mut_ptr());
    (0..n.div_ceil(MR) * panels).into_par_iter().for_each(|t| {
        let (rb, pn) = (t / panels, t % panels);
        let rows = MR.min(n - rb * MR);
        let cols = NR.min(m - pn * NR);
        // SAFETY: `available` was checked; tile (rb, pn) reads rows rb·MR.. of `xp` and
        // panel pn of `w`, and writes rows rb·MR.. × features pn·NR.. of `y`, which no
        // other task writes; all lie within the buffers sized above.
        unsafe {
            tile(
                xp.as_ptr().add(rb * MR * kp),
                kp,
                rows,
                w.panels.as_ptr().add(pn * kp * NR),
                yp.ptr().add(rb * MR * m + pn * NR),
                m,
                cols,
            );
        }
    });
    y
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The scalar rounding of the row tails gives the instruction's bits: on ties, both
    /// signs, subnormals, infinities and NaN.
    #[test]
    fn scalar_rounding_matches_the_instruction() {
        let mut v: Vec<f32> = vec![
            1.0,
            -1.0,
            f32::from_bits(0x3F80_8000), // a tie, rounds to even (down)
            f32::from_bits(0x3F81_8000), // a tie, rounds to even (up)
            f32::from_bits(0x0000_0001),
            -f32::from_bits(0x0040_0000),
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::MAX,
            0.0,
            -0.0,
        ];
        let mut seed = 3u32;
        while v.len() < 64 {
            seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
            v.push(f32::from_bits(seed));
        }
        // The rounding itself: ties to even, subnormals to signed zero, NaN kept.
        assert_eq!(bf16(v[2]), 0x3F80);
        assert_eq!(bf16(v[3]), 0x3F82);
        assert_eq!((bf16(v[4]), bf16(v[5])), (0x0000, 0x8000));
        assert!(f32::from_bits((bf16(f32::NAN) as u32) << 16).is_nan());
        if !available() {
            return;
        }
        let mut dst = vec![0u32; 32];
        // SAFETY: `available` is true and `dst` holds 32 pairs for 64 values.
        unsafe { pack_row(&v, &mut dst) };
        for (p, d) in dst.iter().enumerate() {
            assert_eq!(
                *d,
                pair(v[2 * p], v[2 * p + 1]),
                "values {} and {}",
                v[2 * p],
                v[2 * p + 1]
            );
        }
    }

    /// Against the f32 product of the bf16-rounded inputs, summed in f64: the kernel's only
    /// error is then its f32 accumulation, far below bf16 rounding.
    #[test]
    fn matches_the_product_of_rounded_inputs() {
        if !available() {
            // Without the instructions the kernel refuses to run.
            let w = PackedWeight::new(&[1.0; 4], 2, 2);
            assert!(std::panic::catch_unwind(|| linear(&[1.0; 2], &w, &[0.0; 2])).is_err());
            return;
        }
        let round = |v: f32| f32::from_bits((bf16(v) as u32) << 16);
        let mut seed = 7u64;
        let mut rnd = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        };
        // Odd sizes: a partial tile, a partial panel and an odd input count.
        for (n, k, m) in [(29, 47, 70), (12, 32, 32), (1, 3, 1)] {
            let x: Vec<f32> = (0..n * k).map(|_| rnd()).collect();
            let w: Vec<f32> = (0..m * k).map(|_| rnd()).collect();
            let b: Vec<f32> = (0..m).map(|_| rnd()).collect();
            let y = linear(&x, &PackedWeight::new(&w, m, k), &b);
            for i in 0..n {
                for j in 0..m {
                    let want: f64 = b[j] as f64
                        + (0..k)
                            .map(|t| round(x[i * k + t]) as f64 * round(w[j * k + t]) as f64)
                            .sum::<f64>();
                    let got = y[i * m + j] as f64;
                    assert!(
                        (got - want).abs() < 1e-5,
                        "({n},{k},{m}) [{i},{j}]: {got} vs {want}"
                    );
                }
            }
        }
    }
}
