//! An f32 matrix product whose bits do not depend on the CPU: every element of `A·B` is
//! accumulated from zero by fused multiply-adds in increasing `k`, in one chain, whatever
//! the vector width (AVX-512, AVX2 or none). The `gemm` crate picks its kernel, and with it
//! the order of its sums, by instruction set (and may block `k` by the caches it detects),
//! so its products, and the shards and students built on them, differ between a CPU with
//! AVX-512 and one without; this product gives the same bits on both (on AVX-512 in tiles
//! of [`Isa::Avx512`]'s size, on AVX2 of [`Isa::Avx2`]'s, else one element at a time with
//! [`f32::mul_add`]). `make bench` measures it beside the `gemm` crate.
//!
//! `B` is packed once per call in panels of `NR` columns, `k`-major; `A` is read in place,
//! one element of each of a tile's `MR` rows per step.

use super::SharedMut;
use rayon::prelude::*;
use std::arch::x86_64::*;
use std::ops::Range;

/// At most this many steps of `k` per pass over the tiles (a panel's steps of one pass
/// stay in L1 on AVX2); `k` is cut into equal passes.
const KC: usize = 448;

/// A strided f32 matrix: element `(i, j)` at `data[i * rs + j * cs]`.
#[derive(Clone, Copy, Debug)]
pub struct Strided<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    /// Row stride.
    pub rs: usize,
    /// Column stride.
    pub cs: usize,
}

impl<'a> Strided<'a> {
    /// A row-major `[rows, cols]` matrix.
    pub fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    /// The transpose (no copy).
    pub fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }

    /// Whether every element lies within `data`.
    fn in_bounds(&self) -> bool {
        if self.rows == 0 || self.cols == 0 {
            return true;
        }
        let last = (self.rows - 1)
            .checked_mul(self.rs)
            .zip((self.cols - 1).checked_mul(self.cs))
            .and_then(|(a, b)| a.checked_add(b));
        last.is_some_and(|l| l < self.data.len())
    }

    fn at(&self, i: usize, j: usize) -> f32 {
        self.data[i * self.rs + j * self.cs]
    }
}

/// The instruction set a product runs on: the tile shape changes, the bits do not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// 8 rows × 48 columns in 24 zmm accumulators.
    Avx512,
    /// 6 rows × 16 columns in 12 ymm accumulators.
    Avx2,
    /// One element at a time, with [`f32::mul_add`].
    Scalar,
}

impl Isa {
    /// The widest this CPU has.
    pub fn detect() -> Self {
        if is_x86_feature_detected!("avx512f") {
            Isa::Avx512
        } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            Isa::Avx2
        } else {
            Isa::Scalar
        }
    }

    /// Every instruction set this CPU can run, widest first.
    pub fn available() -> Vec<Self> {
        let widest = Self::detect();
        [Isa::Avx512, Isa::Avx2, Isa::Scalar]
            .into_iter()
            .skip_while(|&i| i != widest)
            .collect()
    }

    /// The name `--portable-isa` takes.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512 => "avx512",
            Isa::Avx2 => "avx2",
            Isa::Scalar => "scalar",
        }
    }

    /// The instruction set of a [`Isa::name`].
    pub fn parse(name: &str) -> anyhow::Result<Self> {
        [Isa::Avx512, Isa::Avx2, Isa::Scalar]
            .into_iter()
            .find(|i| i.name() == name)
            .ok_or_else(|| {
                anyhow::anyhow!("--portable-isa {name}: expected avx512, avx2 or scalar")
            })
    }

    /// `(MR, NR)`: rows and columns of one tile.
    fn tile(self) -> (usize, usize) {
        match self {
            Isa::Avx512 => (8, 48),
            Isa::Avx2 => (6, 16),
            Isa::Scalar => (4, 8),
        }
    }
}

thread_local! {
    /// The instruction set this thread's products run on, when one is chosen.
    static CHOSEN: std::cell::Cell<Option<Isa>> = const { std::cell::Cell::new(None) };
}

/// The instruction set every thread's products run on, when one is chosen for the process
/// ([`limit_isa`]).
static LIMIT: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();

/// Runs every thread's products on `isa` for the rest of the process (a thread's own
/// [`with_isa`] still comes first); an error when this CPU lacks it or another was chosen.
pub fn limit_isa(isa: Isa) -> anyhow::Result<()> {
    if !Isa::available().contains(&isa) {
        anyhow::bail!(
            "--portable-isa {}: this CPU lacks it (it has {})",
            isa.name(),
            Isa::available()
                .iter()
                .map(|i| i.name())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    match *LIMIT.get_or_init(|| isa) {
        chosen if chosen == isa => Ok(()),
        chosen => anyhow::bail!(
            "--portable-isa {}: {} was chosen already",
            isa.name(),
            chosen.name()
        ),
    }
}

/// Runs `f` with this thread's portable products on `isa` (to compare instruction sets);
/// a product panics there when this CPU lacks it.
pub fn with_isa<R>(isa: Isa, f: impl FnOnce() -> R) -> R {
    super::with_thread_local(&CHOSEN, Some(isa), f)
}

/// `B` packed for one instruction set's tiles, for products that reuse it (a frozen
/// weight): packing is about a tenth of a product of the encoder's sizes.
pub struct PackedB {
    isa: Isa,
    k: usize,
    n: usize,
    data: Vec<f32>,
}

impl PackedB {
    /// `b` packed for the instruction set [`matmul`] would run on here.
    pub fn new(b: Strided, parallel: bool) -> Self {
        let isa = chosen();
        Self {
            isa,
            k: b.rows,
            n: b.cols,
            data: pack(b.t(), isa.tile().1, parallel),
        }
    }
}

/// The instruction set this thread's products run on: its own choice ([`with_isa`]), the
/// process's ([`limit_isa`]), or the widest here.
fn chosen() -> Isa {
    CHOSEN
        .with(|c| c.get())
        .or_else(|| LIMIT.get().copied())
        .unwrap_or_else(Isa::detect)
}

/// [`matmul`] with `B` packed before. Packed for another instruction set than the one this
/// thread's products run on now, `B` is packed again from `b` (the bits are the same).
pub fn matmul_packed(
    a: Strided,
    (b, packed): (Strided, &PackedB),
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
    parallel: bool,
) {
    let isa = chosen();
    if packed.isa != isa || (packed.k, packed.n) != (b.rows, b.cols) {
        matmul_on(isa, a, b, c, ldc, accumulate, parallel)
    } else if checked(isa, a, b, c.len(), ldc) {
        product(isa, a, b, &packed.data, (c, ldc), accumulate, parallel)
    }
}

/// `C = A·B` (or `C += A·B` when `accumulate`) for `A` `[m, k]`, `B` `[k, n]` and `C`
/// row-major `[m, n]` with row stride `ldc`, on the widest instruction set here (or the one
/// [`with_isa`] chose), over
/// rayon's threads when `parallel`. Each element is `c + s` (or `s`), where `s` is the
/// fused multiply-add chain `s ← a[i][p]·b[p][j] + s` from `s = 0` over `p = 0, 1, …`:
/// the same bits on every CPU. Panics when the shapes disagree or an operand's strides
/// reach past its data.
pub fn matmul(a: Strided, b: Strided, c: &mut [f32], ldc: usize, accumulate: bool, parallel: bool) {
    matmul_on(chosen(), a, b, c, ldc, accumulate, parallel)
}

/// [`matmul`] on a given instruction set; panics when this CPU lacks it.
pub fn matmul_on(
    isa: Isa,
    a: Strided,
    b: Strided,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
    parallel: bool,
) {
    if checked(isa, a, b, c.len(), ldc) {
        let bp = pack(b.t(), isa.tile().1, parallel);
        product(isa, a, b, &bp, (c, ldc), accumulate, parallel)
    }
}

/// Panics when `isa` is not available here, the shapes disagree, an operand's strides reach
/// past its data or `C` (`c_len` elements, row stride `ldc`) is too small; whether the
/// product has any element.
fn checked(isa: Isa, a: Strided, b: Strided, c_len: usize, ldc: usize) -> bool {
    assert!(Isa::available().contains(&isa), "{isa:?} is not available");
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(b.rows, k, "A is [{m}, {k}] but B has {} rows", b.rows);
    assert!(
        a.in_bounds() && b.in_bounds(),
        "an operand reaches past its data"
    );
    assert!(
        m == 0 || n == 0 || (ldc >= n && (m - 1) * ldc + n <= c_len),
        "C of [{m}, {n}] with row stride {ldc} does not fit in {c_len} elements"
    );
    m > 0 && n > 0
}

/// [`matmul_on`] with `B` packed in `bp`, once the operands are checked.
fn product(
    isa: Isa,
    a: Strided,
    b: Strided,
    bp: &[f32],
    (c, ldc): (&mut [f32], usize),
    accumulate: bool,
    parallel: bool,
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let (mr, nr) = isa.tile();
    let (blocks, panels) = (m.div_ceil(mr), n.div_ceil(nr));
    // Steps in blocks of KC, so that a panel's block stays in L1; between blocks each
    // tile's running sums wait in `partial` (exactly: an f32 stored is the f32 reloaded),
    // so every element is still one chain.
    let chunks = k.div_ceil(KC).max(1);
    let per_chunk = k.div_ceil(chunks);
    let mut partial = if chunks > 1 {
        vec![0f32; blocks * panels * mr * nr]
    } else {
        vec![]
    };
    let (cp, pp) = (SharedMut(c.as_mut_ptr()), SharedMut(partial.as_mut_ptr()));
    for chunk in 0..chunks {
        let steps = chunk * per_chunk..k.min((chunk + 1) * per_chunk);
        // Tiles of one panel are neighbours, so a thread's run of tiles reuses its panel.
        let one = |t: usize| {
            let (pn, rb) = (t / blocks, t % blocks);
            let tile = Tile {
                a: &a.data[rb * mr * a.rs..],
                a_rs: a.rs,
                a_cs: a.cs,
                b: &bp[pn * k * nr..][..k * nr],
                steps: steps.clone(),
                rows: mr.min(m - rb * mr),
                cols: nr.min(n - pn * nr),
                resume: chunk > 0,
                finish: chunk + 1 == chunks,
                ldc,
                accumulate,
            };
            // SAFETY: tile (rb, pn) writes only rows rb·MR.. × columns pn·NR.. of `c` and
            // its own MR × NR sums in `partial` (sized for every tile when there is more
            // than one chunk), which no other task writes; the bounds were checked above
            // and `isa` is available.
            unsafe {
                let sums = pp.ptr().wrapping_add(t * mr * nr);
                tile.run(isa, cp.ptr().add(rb * mr * ldc + pn * nr), sums)
            }
        };
        if parallel {
            (0..blocks * panels).into_par_iter().for_each(one);
        } else {
            (0..blocks * panels).for_each(one);
        }
    }
}

/// `x` `[rows, k]` in blocks of `w` rows, `k`-major: block `q` holds `x[q·w + r][p]` at
/// `q·k·w + p·w + r`, with zero rows past the end.
fn pack(x: Strided, w: usize, parallel: bool) -> Vec<f32> {
    let k = x.cols;
    let mut out = vec![0f32; x.rows.div_ceil(w) * w * k];
    // Read along the smaller stride: a block's rows for each step, or each row's steps.
    let block = |(q, dst): (usize, &mut [f32])| {
        let rows = w.min(x.rows - q * w);
        if x.rs < x.cs {
            for p in 0..k {
                for r in 0..rows {
                    dst[p * w + r] = x.at(q * w + r, p);
                }
            }
        } else {
            for r in 0..rows {
                for p in 0..k {
                    dst[p * w + r] = x.at(q * w + r, p);
                }
            }
        }
    };
    if k == 0 {
        return out;
    }
    if parallel {
        out.par_chunks_mut(w * k).enumerate().for_each(block);
    } else {
        out.chunks_mut(w * k).enumerate().for_each(block);
    }
    out
}

/// One tile of the product: `rows` × `cols` elements of `C` from `rows` rows of `A` (in
/// place, with their strides) and a packed panel of `B`, over some of the steps.
struct Tile<'a> {
    /// From the tile's first row of `A` to the end of its data.
    a: &'a [f32],
    a_rs: usize,
    a_cs: usize,
    /// The panel, all `k` steps.
    b: &'a [f32],
    /// The steps of this pass.
    steps: Range<usize>,
    rows: usize,
    cols: usize,
    /// The sums start from the tile's partial sums (else from zero).
    resume: bool,
    /// The sums go to `C` (else to the partial sums).
    finish: bool,
    ldc: usize,
    accumulate: bool,
}

impl Tile<'_> {
    /// Runs the tile's steps from zero or from `sums`, and leaves the sums in `c` (its first
    /// element) or in `sums`.
    ///
    /// # Safety
    /// `isa` is available; `c` points to `rows` rows of stride `ldc` with `cols` writable
    /// elements each, and `sums` (unless neither `resume` nor `!finish`) to `MR × NR`
    /// elements, none of which another thread accesses.
    unsafe fn run(&self, isa: Isa, c: *mut f32, sums: *mut f32) {
        // SAFETY: as the caller guarantees.
        unsafe {
            match isa {
                Isa::Avx512 => self.avx512(c, sums),
                Isa::Avx2 => self.avx2(c, sums),
                Isa::Scalar => self.scalar(c, sums),
            }
        }
    }

    /// Ends the tile: its `MR × NR` sums, row-major in `acc`, go to the partial sums, or
    /// row by row to `C`.
    ///
    /// # Safety
    /// As for [`Tile::run`].
    unsafe fn end(&self, acc: &[f32], nr: usize, c: *mut f32, sums: *mut f32) {
        // SAFETY: as the caller guarantees; rows < MR and cols ≤ NR.
        unsafe {
            if !self.finish {
                std::ptr::copy_nonoverlapping(acc.as_ptr(), sums, acc.len());
                return;
            }
            for r in 0..self.rows {
                self.store(c.add(r * self.ldc), &acc[r * nr..][..nr]);
            }
        }
    }

    /// The tile's sums at the start of its steps: zero or its partial sums.
    ///
    /// # Safety
    /// As for [`Tile::run`].
    unsafe fn start<const N: usize>(&self, sums: *const f32) -> [f32; N] {
        let mut acc = [0f32; N];
        if self.resume {
            // SAFETY: `sums` holds MR × NR = N values.
            unsafe { std::ptr::copy_nonoverlapping(sums, acc.as_mut_ptr(), N) };
        }
        acc
    }

    /// Pointers to the tile's `MR` rows of `A`; padding rows repeat the last row (their
    /// sums are never stored).
    fn rows_of_a<const MR: usize>(&self) -> [*const f32; MR] {
        std::array::from_fn(|r| self.a[r.min(self.rows - 1) * self.a_rs..].as_ptr())
    }

    /// Writes one row of sums: `c[j] = c[j] + s[j]` (or `s[j]`) for the tile's columns.
    ///
    /// # Safety
    /// `c` points to `cols` writable elements.
    unsafe fn store(&self, c: *mut f32, sums: &[f32]) {
        for (j, &s) in sums.iter().enumerate().take(self.cols) {
            // SAFETY: j < cols.
            unsafe { *c.add(j) = if self.accumulate { *c.add(j) + s } else { s } }
        }
    }

    /// # Safety
    /// As for [`Tile::run`].
    unsafe fn scalar(&self, c: *mut f32, sums: *mut f32) {
        const MR: usize = 4;
        const NR: usize = 8;
        // SAFETY: as the caller guarantees.
        let mut acc: [f32; MR * NR] = unsafe { self.start(sums) };
        for r in 0..self.rows {
            for j in 0..NR {
                let s = &mut acc[r * NR + j];
                for p in self.steps.clone() {
                    let x = self.a[r * self.a_rs + p * self.a_cs];
                    *s = x.mul_add(self.b[p * NR + j], *s);
                }
            }
        }
        // SAFETY: as the caller guarantees.
        unsafe { self.end(&acc, NR, c, sums) }
    }

    /// # Safety
    /// As for [`Tile::run`], on a CPU with AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    // The row loop runs over the constant MR (not `rows`): it unrolls and the accumulators
    // stay in registers. Padding rows are zero and never stored.
    #[allow(clippy::needless_range_loop)]
    unsafe fn avx2(&self, c: *mut f32, sums: *mut f32) {
        const MR: usize = 6;
        const NR: usize = 16;
        let (a, b) = (self.rows_of_a::<MR>(), self.b.as_ptr());
        // SAFETY: as the caller guarantees.
        let start: [f32; MR * NR] = unsafe { self.start(sums) };
        let mut acc = [[_mm256_setzero_ps(); 2]; MR];
        for (r, acc) in acc.iter_mut().enumerate() {
            for (v, acc) in acc.iter_mut().enumerate() {
                // SAFETY: 8 of the MR × NR values.
                *acc = unsafe { _mm256_loadu_ps(start.as_ptr().add(r * NR + 8 * v)) };
            }
        }
        for p in self.steps.clone() {
            let off = p * self.a_cs;
            // SAFETY: the panel holds k·NR values, and each row of `A` k at stride a_cs.
            unsafe {
                let b0 = _mm256_loadu_ps(b.add(p * NR));
                let b1 = _mm256_loadu_ps(b.add(p * NR + 8));
                for r in 0..MR {
                    let x = _mm256_broadcast_ss(&*a[r].add(off));
                    acc[r][0] = _mm256_fmadd_ps(x, b0, acc[r][0]);
                    acc[r][1] = _mm256_fmadd_ps(x, b1, acc[r][1]);
                }
            }
        }
        let mut out = [0f32; MR * NR];
        for (r, acc) in acc.iter().enumerate() {
            for (v, acc) in acc.iter().enumerate() {
                // SAFETY: 8 of the MR × NR values.
                unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(r * NR + 8 * v), *acc) };
            }
        }
        // SAFETY: as the caller guarantees.
        unsafe { self.end(&out, NR, c, sums) }
    }

    /// # Safety
    /// As for [`Tile::run`], on a CPU with AVX-512 F.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::needless_range_loop)] // as in `avx2`
    unsafe fn avx512(&self, c: *mut f32, sums: *mut f32) {
        const MR: usize = 8;
        const NR: usize = 48;
        let (a, b) = (self.rows_of_a::<MR>(), self.b.as_ptr());
        // SAFETY: as the caller guarantees.
        let start: [f32; MR * NR] = unsafe { self.start(sums) };
        let mut acc = [[_mm512_setzero_ps(); 3]; MR];
        for (r, acc) in acc.iter_mut().enumerate() {
            for (v, acc) in acc.iter_mut().enumerate() {
                // SAFETY: 16 of the MR × NR values.
                *acc = unsafe { _mm512_loadu_ps(start.as_ptr().add(r * NR + 16 * v)) };
            }
        }
        for p in self.steps.clone() {
            let off = p * self.a_cs;
            // SAFETY: the panel holds k·NR values, and each row of `A` k at stride a_cs.
            unsafe {
                let b0 = _mm512_loadu_ps(b.add(p * NR));
                let b1 = _mm512_loadu_ps(b.add(p * NR + 16));
                let b2 = _mm512_loadu_ps(b.add(p * NR + 32));
                for r in 0..MR {
                    let x = _mm512_set1_ps(*a[r].add(off));
                    acc[r][0] = _mm512_fmadd_ps(x, b0, acc[r][0]);
                    acc[r][1] = _mm512_fmadd_ps(x, b1, acc[r][1]);
                    acc[r][2] = _mm512_fmadd_ps(x, b2, acc[r][2]);
                }
            }
        }
        let mut out = [0f32; MR * NR];
        for (r, acc) in acc.iter().enumerate() {
            for (v, acc) in acc.iter().enumerate() {
                // SAFETY: 16 of the MR × NR values.
                unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(r * NR + 16 * v), *acc) };
            }
        }
        // SAFETY: as the caller guarantees.
        unsafe { self.end(&out, NR, c, sums) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Seeded values in [-1, 1) with a spread of magnitudes, so that sums round.
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|i| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let u = ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0;
                u * [1.0, 1e-3, 37.0][i % 3]
            })
            .collect()
    }

    /// The definition, one element at a time.
    fn reference(a: Strided, b: Strided, c: &mut [f32], ldc: usize, accumulate: bool) {
        for i in 0..a.rows {
            for j in 0..b.cols {
                let mut s = 0f32;
                for p in 0..a.cols {
                    s = a.at(i, p).mul_add(b.at(p, j), s);
                }
                let e = &mut c[i * ldc + j];
                *e = if accumulate { *e + s } else { s };
            }
        }
    }

    /// Every instruction set here gives the reference's bits, threaded or not, on shapes
    /// with partial tiles and panels, more steps than one pass takes, transposed and
    /// strided operands, into a C wider than the product, accumulating or not.
    #[test]
    fn every_instruction_set_gives_the_definitions_bits() {
        for (m, k, n) in [
            (29, 47, 70),
            (14, 384, 32),
            (1, 3, 1),
            (6, 0, 5),
            (33, 100, 17),
            (9, 600, 50),
        ] {
            let ad = values((m + 3) * (k + 1), 1);
            let bd = values(k * n * 2, 2);
            let cases = [
                (Strided::row_major(&ad, m, k), Strided::row_major(&bd, k, n)),
                // A transposed with a padded row stride; B given as Bᵀ (as a weight).
                (
                    Strided {
                        data: &ad,
                        rows: m,
                        cols: k,
                        rs: 1,
                        cs: m + 3,
                    },
                    Strided::row_major(&bd, n, k).t(),
                ),
            ];
            for (a, b) in cases {
                for accumulate in [false, true] {
                    let ldc = n + 2;
                    let init = values(m * ldc, 3);
                    let mut want = init.clone();
                    reference(a, b, &mut want, ldc, accumulate);
                    for isa in Isa::available() {
                        for parallel in [false, true] {
                            let mut got = init.clone();
                            matmul_on(isa, a, b, &mut got, ldc, accumulate, parallel);
                            let bits =
                                |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                            assert_eq!(
                                bits(&got),
                                bits(&want),
                                "{isa:?} ({m}, {k}, {n}) accumulate {accumulate} parallel {parallel}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// The product itself, against f64 sums: within f32 accumulation error.
    #[test]
    fn is_the_product() {
        let (m, k, n) = (20, 300, 40);
        let (ad, bd) = (values(m * k, 4), values(k * n, 5));
        let mut c = vec![0f32; m * n];
        let (a, b) = (Strided::row_major(&ad, m, k), Strided::row_major(&bd, k, n));
        matmul(a, b, &mut c, n, false, true);
        for i in 0..m {
            for j in 0..n {
                let exact: f64 = (0..k).map(|p| a.at(i, p) as f64 * b.at(p, j) as f64).sum();
                let bound: f64 = (0..k)
                    .map(|p| (a.at(i, p) as f64 * b.at(p, j) as f64).abs())
                    .sum();
                let err = (c[i * n + j] as f64 - exact).abs();
                assert!(
                    err <= bound * k as f64 * 6e-8,
                    "[{i}, {j}]: {} vs {exact}",
                    c[i * n + j]
                );
            }
        }
    }

    /// The chosen instruction set is put back after the call, nested or panicking.
    #[test]
    fn the_choice_is_put_back_after_the_call() {
        let chosen = || CHOSEN.with(|c| c.get());
        with_isa(Isa::Scalar, || {
            let _ = std::panic::catch_unwind(|| with_isa(Isa::Avx2, || panic!("inside")));
            assert_eq!(chosen(), Some(Isa::Scalar));
        });
        assert_eq!(chosen(), None);
    }

    /// Shapes that disagree and strides that reach past the data are refused.
    #[test]
    fn refuses_bad_operands() {
        let d = vec![0f32; 12];
        let mut c = vec![0f32; 16];
        let run = |a: Strided, b: Strided, c: &mut [f32], ldc| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                matmul(a, b, c, ldc, false, false)
            }))
            .is_err()
        };
        let (a, b) = (Strided::row_major(&d, 3, 4), Strided::row_major(&d, 4, 3));
        assert!(!run(a, b, &mut c, 3));
        assert!(
            run(a, Strided::row_major(&d, 3, 4), &mut c, 4),
            "k disagrees"
        );
        assert!(run(Strided { rs: 5, ..a }, b, &mut c, 3), "A past its data");
        assert!(run(a, b, &mut c[..8], 3), "C too small");
        assert!(run(a, b, &mut c, 2), "ldc below n");
    }
}
