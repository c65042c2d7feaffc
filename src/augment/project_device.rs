//! Exact nearest-token projection on the teacher's device, with the same answer as the CPU's
//! exact search ([`FlatL2`]): the smallest L2 distance accumulated in `f64`, the lowest token
//! on ties, and [`MISSING`] for a query that is not finite.
//!
//! Per chunk of queries, one matmul gives the `f32` distances `‖e‖² − 2·q·e` to every indexed
//! row, and a reduction each query's best one. Where no other row lies within the rounding
//! [`Band`] of the best, that row is the exact nearest, decided on the device; the rest (near
//! ties, queries that are not finite or so large that the distances could overflow) go to
//! [`FlatL2`] on the host, which re-ranks the rows within the band in `f64`. On CUDA that is
//! one small read-back per chunk when the band decides every query.

use super::exact_search::{kept_rows, Band, FlatL2, NONE};
use super::project::MISSING;
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, D};

/// Queries per distance block: a `chunk × tokens` f32 matrix (125 MB for 1024 × 30522).
pub const DEFAULT_CHUNK: usize = 1024;

/// A query whose ‖q‖² plus the largest ‖e‖² reaches this could overflow a distance in `f32`;
/// the host's search decides it.
const OVERFLOW_GUARD: f32 = 1e38;

/// Row index marking a query that the band leaves to the host's search.
const UNDECIDED: u32 = u32::MAX;

/// The indexed embedding rows on a device, and on the host for the undecided queries.
pub struct DeviceProjector {
    /// `[tokens, dim]` f32.
    table: Tensor,
    /// `[1, tokens]` squared norms of the rows (the host index's).
    norms: Tensor,
    /// `[tokens + 1]` token id of each row, then [`MISSING`] (the answer for no nearest row).
    ids: Tensor,
    /// The same rows on the host.
    exact: FlatL2,
    band: Band,
    /// The largest ‖e‖².
    max_norm2: f32,
    tokens: usize,
    dim: usize,
    /// Queries per distance block.
    pub chunk: usize,
}

impl DeviceProjector {
    /// Puts the rows of `table` (`vocab × dim`, row-major) whose token id passes `keep` on
    /// `device`.
    pub fn build(
        table: &[f32],
        dim: usize,
        keep: impl Fn(u32) -> bool,
        device: &Device,
    ) -> Result<Self> {
        let (mut ids, rows) = kept_rows(table, dim, keep)?;
        let tokens = ids.len();
        let table = Tensor::from_slice(&rows, (tokens, dim), device)?;
        let exact = FlatL2::new(rows, dim);
        let norms = Tensor::from_slice(exact.norms(), (1, tokens), device)?;
        let max_norm2 = exact.norms().iter().fold(0f32, |m, &v| m.max(v));
        ids.push(MISSING);
        Ok(Self {
            table,
            norms,
            ids: Tensor::from_vec(ids, tokens + 1, device)?,
            band: exact.band(),
            exact,
            max_norm2,
            tokens,
            dim,
            chunk: DEFAULT_CHUNK,
        })
    }

    /// Number of indexed tokens.
    pub fn len(&self) -> usize {
        self.tokens
    }

    /// True when nothing is indexed (never, after a successful build).
    pub fn is_empty(&self) -> bool {
        self.tokens == 0
    }

    /// The device the table lives on.
    pub fn device(&self) -> &Device {
        self.table.device()
    }

    /// Nearest token id of each query row of `queries` (`[n, dim]`, any float dtype, on the
    /// projector's device); returns `[n]` u32 on the same device.
    pub fn nearest_tensor(&self, queries: &Tensor) -> Result<Tensor> {
        let (n, d) = queries.dims2()?;
        if d != self.dim {
            bail!("queries have dimension {d}, the table {}", self.dim);
        }
        if !full_precision_f32(self.device()) {
            bail!(
                "exact projection needs full-precision f32 matrix products on the device; \
                 reduced-precision (TF32) GEMMs are enabled"
            );
        }
        let q = queries.to_dtype(DType::F32)?;
        let mut out = Vec::with_capacity(n.div_ceil(self.chunk.max(1)));
        let mut start = 0;
        while start < n {
            let m = self.chunk.max(1).min(n - start);
            out.push(self.nearest_block(&q.narrow(0, start, m)?)?);
            start += m;
        }
        if out.is_empty() {
            return Ok(Tensor::zeros(0, DType::U32, self.device())?);
        }
        Ok(Tensor::cat(&out, 0)?)
    }

    /// Nearest token id of each query (row-major `n × dim` on the host).
    pub fn nearest(&self, queries: &[f32]) -> Result<Vec<u32>> {
        if queries.is_empty() {
            return Ok(Vec::new());
        }
        if !queries.len().is_multiple_of(self.dim) {
            bail!(
                "query buffer of {} values is not a multiple of dimension {}",
                queries.len(),
                self.dim
            );
        }
        let n = queries.len() / self.dim;
        let q = Tensor::from_slice(queries, (n, self.dim), self.device())?;
        Ok(self.nearest_tensor(&q)?.to_vec1()?)
    }

    /// Token ids of the queries `q` (`[m, dim]` f32): the band's decision where it makes one,
    /// the host's exact search for the rest.
    fn nearest_block(&self, q: &Tensor) -> Result<Tensor> {
        let rows = self.decided_rows(q)?;
        let undecided = rows
            .eq(UNDECIDED)?
            .to_dtype(DType::U32)?
            .sum_all()?
            .to_scalar::<u32>()?;
        let rows = if undecided == 0 {
            rows
        } else {
            self.decide_on_host(q, rows.to_vec1()?)?
        };
        Ok(self.ids.index_select(&rows, 0)?)
    }

    /// `rows` with each [`UNDECIDED`] one replaced by the host's exact search for that query
    /// of `q`, or by the slot past the last row (so [`MISSING`]) where it finds none.
    fn decide_on_host(&self, q: &Tensor, mut rows: Vec<u32>) -> Result<Tensor> {
        let open: Vec<u32> = (0..rows.len() as u32)
            .filter(|&i| rows[i as usize] == UNDECIDED)
            .collect();
        let picked = Tensor::from_slice(&open, open.len(), q.device())?;
        let queries: Vec<f32> = q.index_select(&picked, 0)?.flatten_all()?.to_vec1()?;
        for (&i, r) in open.iter().zip(self.exact.nearest(&queries)) {
            rows[i as usize] = if r == NONE { self.tokens as u32 } else { r };
        }
        let n = rows.len();
        Ok(Tensor::from_vec(rows, n, q.device())?)
    }

    /// `[m]` u32: for each query of `q` (`[m, dim]` f32), the row with the best GEMM distance
    /// where it is the only row within the [`Band`] of it (so the exact nearest), else
    /// [`UNDECIDED`]: near ties, and queries whose ‖q‖² is not finite or could overflow a
    /// distance (which also leaves NaN distances to the host).
    fn decided_rows(&self, q: &Tensor) -> Result<Tensor> {
        let qn = q.sqr()?.sum_keepdim(1)?;
        let dist = q
            .matmul(&self.table.t()?)?
            .affine(-2.0, 0.0)?
            .broadcast_add(&self.norms)?;
        let best = dist.min_keepdim(D::Minus1)?;
        let band = qn
            .sqrt()?
            .affine(self.band.scale, self.band.offset)?
            .sqr()?;
        let within = dist
            .broadcast_le(&(best + band)?)?
            .to_dtype(DType::U32)?
            .sum_keepdim(D::Minus1)?;
        let safe = (qn + self.max_norm2 as f64)?.lt(OVERFLOW_GUARD)?;
        let decided = (within.eq(1u32)? * safe)?;
        let undecided = Tensor::full(UNDECIDED, (q.dim(0)?, 1), q.device())?;
        let rows = decided.where_cond(&dist.argmin_keepdim(D::Minus1)?, &undecided)?;
        Ok(rows.squeeze(1)?)
    }
}

/// Whether `f32` matrix products on `device` round as IEEE `f32` (no TF32 accumulation), as
/// the [`Band`] assumes.
fn full_precision_f32(device: &Device) -> bool {
    #[cfg(feature = "cuda")]
    if device.is_cuda() {
        return !candle_core::cuda_backend::gemm_reduced_precision_f32();
    }
    let _ = device;
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::augment::exact_search::brute_force_nearest;
    use crate::config::Metric;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// Queries near the midpoints of pairs of rows (equal distances to both up to rounding),
    /// nudged towards one of them by a few units in the last place or not at all.
    fn near_ties(
        table: &[f32],
        d: usize,
        pairs: &[(usize, usize)],
        r: &mut ChaCha8Rng,
    ) -> Vec<f32> {
        let mut q = Vec::new();
        for &(a, b) in pairs {
            let nudge = [0.0, 1e-7, -1e-7, 3e-7][r.gen_range(0..4)];
            for k in 0..d {
                let (x, y) = (table[a * d + k], table[b * d + k]);
                q.push(0.5 * (x + y) + nudge * (y - x));
            }
        }
        q
    }

    #[test]
    fn near_ties_and_non_finite_queries_match_the_exact_search() -> Result<()> {
        let (vocab, d) = (700, 16);
        let mut r = ChaCha8Rng::seed_from_u64(21);
        let mut table: Vec<f32> = (0..vocab * d).map(|_| r.gen_range(-1.0..1.0)).collect();
        let dup = table[9 * d..10 * d].to_vec();
        table[400 * d..401 * d].copy_from_slice(&dup);
        let keep = |t: u32| t % 7 != 3;
        let dp = DeviceProjector::build(&table, d, keep, &Device::Cpu)?;
        let pairs: Vec<(usize, usize)> = (0..60)
            .map(|_| (r.gen_range(0..vocab), r.gen_range(0..vocab)))
            .filter(|&(a, b)| keep(a as u32) && keep(b as u32) && a != b)
            .collect();
        let mut q: Vec<f32> = (0..200 * d).map(|_| r.gen_range(-1.2..1.2)).collect();
        q.extend(near_ties(&table, d, &pairs, &mut r));
        q.extend_from_slice(&dup);
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 3e19, -1e30] {
            let mut row = table[20 * d..21 * d].to_vec();
            row[5] = bad;
            q.extend(row);
        }
        let got = dp.nearest(&q)?;
        let flat = crate::augment::project::Projector::build(&table, d, keep, "Flat", Metric::L2)?
            .nearest(&q)?;
        assert_eq!(got, flat, "the device path gives the CPU's exact answers");
        let n = q.len() / d;
        for (i, qq) in q.chunks_exact(d).enumerate().take(n - 5) {
            let want = brute_force_nearest(&table, d, keep, qq, Metric::L2);
            assert_eq!(got[i], want, "query {i}");
        }
        assert_eq!(got[n - 6], 9, "a duplicate row ties to the lowest id");
        assert_eq!(
            &got[n - 5..n - 2],
            [MISSING; 3],
            "NaN and ±inf have no nearest token"
        );
        Ok(())
    }

    #[test]
    fn the_band_decides_plain_queries_and_leaves_ties_and_overflow_to_the_host() -> Result<()> {
        let table = [0.0f32, 0.0, 1.0, 0.0, 0.0, 1.0, 3.0, 3.0];
        let dp = DeviceProjector::build(&table, 2, |_| true, &Device::Cpu)?;
        let q = [0.9f32, 0.1, 0.5, 0.5, 1e20, 0.0, f32::NAN, 1.0, 2.9, 3.2];
        let rows: Vec<u32> = dp
            .decided_rows(&Tensor::from_slice(&q, (5, 2), &Device::Cpu)?)?
            .to_vec1()?;
        assert_eq!(rows, [1, UNDECIDED, UNDECIDED, UNDECIDED, 3]);
        let want: Vec<u32> = q
            .chunks_exact(2)
            .map(|x| match x[0].is_nan() {
                true => MISSING,
                false => brute_force_nearest(&table, 2, |_| true, x, Metric::L2),
            })
            .collect();
        // An exact three-way tie at (0.5, 0.5) goes to the lowest row.
        assert_eq!(want[1], 0);
        assert_eq!(dp.nearest(&q)?, want);
        Ok(())
    }
}
