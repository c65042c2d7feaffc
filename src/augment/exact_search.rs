//! Exact L2 nearest-neighbour search over an embedding table, for the `Flat` L2 projection.
//!
//! Distances come from one GEMM per (query chunk × block of table rows), `‖e‖² − 2·q·e`,
//! spread over rayon tasks, then an argmin. A GEMM distance carries rounding error, so every
//! row whose GEMM distance lies within a proven bound of the best one is re-ranked with
//! [`l2`], the distance accumulated in `f64` (exact to far below any `f32` difference): the
//! answer is the truly nearest row, the lowest one on ties, as
//! [`brute_force_nearest`] (the reference the tests compare every index against) finds it, whatever the GEMM's summation order.
//! The k nearest rows ([`FlatL2::nearest_k`], token replacement's neighbours) come the same
//! way, every row within the band of the k-th smallest GEMM distance re-ranked.
//! The device projection ([`super::project_device`]) uses the same [`Band`] on its own GEMM
//! distances, and this search for the queries the band leaves undecided.

use crate::config::Metric;
use anyhow::{bail, Result};
use rayon::prelude::*;

/// Table rows per GEMM block.
const BLOCK: usize = 512;
/// Queries per GEMM chunk.
const CHUNK: usize = 128;
/// Row index meaning "none".
pub const NONE: u32 = u32::MAX;

/// Squared L2 distance, accumulated in `f64` in index order.
pub fn l2(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| {
            let t = x as f64 - y as f64;
            t * t
        })
        .sum()
}

/// Rows of `table` (`dim` wide) for the given ids, concatenated.
pub fn rows_of(table: &[f32], dim: usize, ids: &[u32]) -> Vec<f32> {
    let mut rows = Vec::with_capacity(ids.len() * dim);
    for &t in ids {
        rows.extend_from_slice(&table[t as usize * dim..(t as usize + 1) * dim]);
    }
    rows
}

/// The token ids of `table` (`vocab × dim`, row-major) that pass `keep`, and their rows: what
/// a projection indexes. An error for a table that is not whole rows or keeps no token.
pub fn kept_rows(
    table: &[f32],
    dim: usize,
    keep: impl Fn(u32) -> bool,
) -> Result<(Vec<u32>, Vec<f32>)> {
    if dim == 0 || !table.len().is_multiple_of(dim) {
        bail!(
            "embedding table of {} values is not a multiple of dimension {dim}",
            table.len()
        );
    }
    let ids: Vec<u32> = (0..(table.len() / dim) as u32)
        .filter(|&i| keep(i))
        .collect();
    if ids.is_empty() {
        bail!("no token left to index after excluding special tokens");
    }
    let rows = rows_of(table, dim, &ids);
    Ok((ids, rows))
}

/// How far above a query's best GEMM distance the truly nearest row's may lie: the band
/// `(scale·‖q‖ + offset)²`, for GEMM distances `‖e‖² − 2·q·e` computed in IEEE `f32` (any
/// summation order, no reduced-precision accumulation such as TF32).
///
/// Such a distance is within (d + 2)·u·(‖q‖ + ‖e‖)² of the exact one (a sum of `d` products,
/// then two additions; `u` the unit roundoff); the truly nearest row is within twice that of
/// the best GEMM distance. The band is four times that, to spare, with ‖q‖ and the largest
/// ‖e‖ taken 0.1% larger to cover their own rounding.
#[derive(Clone, Copy, Debug)]
pub struct Band {
    /// `1.001·√c` with `c = 8·(d + 2)·u`.
    pub scale: f64,
    /// `1.001·√c·max‖e‖`.
    pub offset: f64,
}

impl Band {
    /// The band for rows `dim` wide whose largest norm is `max_norm`.
    pub fn new(dim: usize, max_norm: f32) -> Self {
        let u = f32::EPSILON as f64 / 2.0;
        let root_c = (8.0 * (dim as f64 + 2.0) * u).sqrt();
        Self {
            scale: 1.001 * root_c,
            offset: 1.001 * root_c * max_norm as f64,
        }
    }

    /// The band of a query of norm `qnorm`.
    pub fn of(&self, qnorm: f64) -> f32 {
        let s = self.scale * qnorm + self.offset;
        (s * s) as f32
    }
}

/// An exact L2 index over the rows of a table (`n × dim`, row-major).
pub struct FlatL2 {
    rows: Vec<f32>,
    /// ‖e‖² of each row.
    norms: Vec<f32>,
    /// The largest ‖e‖.
    max_norm: f32,
    dim: usize,
}

/// A row within rounding reach of a query's best GEMM distance.
struct Candidate {
    query: u32,
    row: u32,
    approx: f32,
}

impl FlatL2 {
    /// Indexes `rows` (`n × dim`, row-major).
    pub fn new(rows: Vec<f32>, dim: usize) -> Self {
        assert!(dim > 0 && rows.len().is_multiple_of(dim));
        let norms: Vec<f32> = rows
            .chunks_exact(dim)
            .map(|r| r.iter().map(|v| v * v).sum())
            .collect();
        let max_norm = norms.iter().fold(0f32, |m, &v| m.max(v)).sqrt();
        Self {
            rows,
            norms,
            max_norm,
            dim,
        }
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.norms.len()
    }

    /// True when there is no row.
    pub fn is_empty(&self) -> bool {
        self.norms.is_empty()
    }

    /// Row `i`.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.rows[i * self.dim..(i + 1) * self.dim]
    }

    /// ‖e‖² of each row, as the search computes it.
    pub fn norms(&self) -> &[f32] {
        &self.norms
    }

    /// The rounding band of this table's GEMM distances.
    pub fn band(&self) -> Band {
        Band::new(self.dim, self.max_norm)
    }

    /// The nearest row of each query (`m × dim`): the smallest [`l2`], the lowest row on
    /// ties; [`NONE`] for a query whose distances are not finite.
    pub fn nearest(&self, queries: &[f32]) -> Vec<u32> {
        self.search(queries, None, false)
            .into_iter()
            .map(|(r, _)| r)
            .collect()
    }

    /// For each given row, the [`l2`] distance to its nearest other row (0 where it has a
    /// duplicate; infinite for a table of one row).
    pub fn nn_distance2(&self, rows: &[u32]) -> Vec<f64> {
        let q: Vec<f32> = rows
            .iter()
            .flat_map(|&r| self.row(r as usize).iter().copied())
            .collect();
        self.search(&q, Some(rows), true)
            .into_iter()
            .map(|(_, v)| v)
            .collect()
    }

    /// Nearest row (and, with `want_dist`, its [`l2`]) of each query, skipping
    /// `exclude[i]` for query `i`.
    fn search(&self, queries: &[f32], exclude: Option<&[u32]>, want_dist: bool) -> Vec<(u32, f64)> {
        let d = self.dim;
        assert!(queries.len().is_multiple_of(d));
        let m = queries.len() / d;
        let n = self.len();
        if m == 0 {
            return Vec::new();
        }
        if n == 0 {
            return vec![(NONE, f64::INFINITY); m];
        }
        let (band, parts) = self.candidates(queries, 1, exclude);
        let blocks = n.div_ceil(BLOCK);
        let mut best = vec![f32::INFINITY; m];
        for (w, (mins, _)) in parts.iter().enumerate() {
            let q0 = (w / blocks) * CHUNK;
            for (i, &v) in mins.iter().enumerate() {
                if v < best[q0 + i] {
                    best[q0 + i] = v;
                }
            }
        }
        // Candidates of each query, in row order (blocks are visited in order).
        let mut cands: Vec<Vec<u32>> = vec![Vec::new(); m];
        for (_, list) in &parts {
            for c in list {
                let q = c.query as usize;
                if c.approx <= best[q] + band[q] {
                    cands[q].push(c.row);
                }
            }
        }
        cands
            .par_iter()
            .enumerate()
            .map(|(i, rows)| {
                let q = &queries[i * d..(i + 1) * d];
                if !best[i].is_finite() {
                    return (NONE, f64::INFINITY);
                }
                match rows.as_slice() {
                    [] => (NONE, f64::INFINITY),
                    [r] if !want_dist => (*r, f64::NAN),
                    _ => {
                        let mut out = (NONE, f64::INFINITY);
                        for &r in rows {
                            let v = l2(self.row(r as usize), q);
                            if v < out.1 {
                                out = (r, v);
                            }
                        }
                        out
                    }
                }
            })
            .collect()
    }

    /// The `k` nearest rows of each query (`m × dim`), `k` per query, nearest first: the
    /// smallest [`l2`], the lower row on ties, as a brute-force sort by (distance, row) gives
    /// them; [`NONE`] fills the places of a query with fewer than `k` finite distances.
    pub fn nearest_k(&self, queries: &[f32], k: usize) -> Vec<u32> {
        let d = self.dim;
        assert!(queries.len().is_multiple_of(d));
        let m = queries.len() / d;
        if m == 0 || k == 0 {
            return Vec::new();
        }
        if self.is_empty() {
            return vec![NONE; m * k];
        }
        let (band, parts) = self.candidates(queries, k, None);
        let mut cands: Vec<Vec<(u32, f32)>> = vec![Vec::new(); m];
        for (_, list) in &parts {
            for c in list {
                cands[c.query as usize].push((c.row, c.approx));
            }
        }
        cands
            .par_iter()
            .enumerate()
            .flat_map_iter(|(i, rows)| {
                self.rerank_k(&queries[i * d..(i + 1) * d], rows, band[i], k)
            })
            .collect()
    }

    /// The `k` nearest of a query's candidates (row, GEMM distance), padded with [`NONE`].
    /// Each GEMM distance is within an eighth of the band of its exact value, so the `k`-th
    /// smallest exact distance is within an eighth of the `k`-th smallest GEMM distance, and
    /// every truly `k`-nearest row within a quarter: re-ranking the rows within the band in
    /// `f64` gives the exact `k` nearest, ties included.
    fn rerank_k(&self, q: &[f32], rows: &[(u32, f32)], band: f32, k: usize) -> Vec<u32> {
        let kth = kth_smallest(rows.iter().map(|&(_, v)| v), k);
        let mut exact: Vec<(f64, u32)> = rows
            .iter()
            .filter(|&&(_, v)| v <= kth + band)
            .map(|&(r, _)| (l2(self.row(r as usize), q), r))
            .filter(|&(v, _)| v.is_finite())
            .collect();
        exact.sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        let mut out: Vec<u32> = exact.iter().take(k).map(|&(_, r)| r).collect();
        out.resize(k, NONE);
        out
    }

    /// The GEMM pass of a search: each query's band, and per (query chunk, table block) the
    /// block's `k`-th smallest GEMM distance of each query and the rows within the band of
    /// it (a block holds every row within the band of the `k`-th smallest over the table,
    /// which is no larger than any block's). `exclude[i]` is skipped for query `i`.
    #[allow(clippy::type_complexity)]
    fn candidates(
        &self,
        queries: &[f32],
        k: usize,
        exclude: Option<&[u32]>,
    ) -> (Vec<f32>, Vec<(Vec<f32>, Vec<Candidate>)>) {
        let d = self.dim;
        let (m, n) = (queries.len() / d, self.len());
        let b = self.band();
        let band: Vec<f32> = queries
            .chunks_exact(d)
            .map(|q| {
                b.of(q
                    .iter()
                    .map(|&v| (v as f64) * (v as f64))
                    .sum::<f64>()
                    .sqrt())
            })
            .collect();
        let blocks = n.div_ceil(BLOCK);
        let parts = (0..m.div_ceil(CHUNK) * blocks)
            .into_par_iter()
            .map_init(Vec::new, |buf: &mut Vec<f32>, w| {
                let (ci, bi) = (w / blocks, w % blocks);
                let (q0, q1) = (ci * CHUNK, ((ci + 1) * CHUNK).min(m));
                let (r0, r1) = (bi * BLOCK, ((bi + 1) * BLOCK).min(n));
                self.block(
                    &queries[q0 * d..q1 * d],
                    q0,
                    r0..r1,
                    (&band[q0..q1], k),
                    exclude.map(|e| &e[q0..q1]),
                    buf,
                )
            })
            .collect();
        (band, parts)
    }

    /// One GEMM of queries `q` (the first being query `q0`) against `rows`: per query the
    /// `k`-th smallest distance and the rows within `band` of it.
    fn block(
        &self,
        q: &[f32],
        q0: usize,
        rows: std::ops::Range<usize>,
        (band, k): (&[f32], usize),
        exclude: Option<&[u32]>,
        buf: &mut Vec<f32>,
    ) -> (Vec<f32>, Vec<Candidate>) {
        let d = self.dim;
        let (mq, nb) = (q.len() / d, rows.len());
        buf.resize(mq * nb, 0.0);
        let t = &self.rows[rows.start * d..rows.end * d];
        // SAFETY: `buf` is [mq, nb] row-major, `q` is [mq, d] row-major and `t`ᵀ is
        // [d, nb] (row j of `t` is column j), all within their buffers.
        unsafe {
            gemm::gemm(
                mq,
                nb,
                d,
                buf.as_mut_ptr(),
                1,
                nb as isize,
                false,
                q.as_ptr(),
                1,
                d as isize,
                t.as_ptr(),
                d as isize,
                1,
                0.0,
                -2.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
        let norms = &self.norms[rows.clone()];
        let mut mins = Vec::with_capacity(mq);
        let mut cands = Vec::new();
        for (i, dist) in buf.chunks_exact_mut(nb).enumerate() {
            for (v, &e) in dist.iter_mut().zip(norms) {
                *v += e;
            }
            if let Some(x) = exclude.map(|e| e[i] as usize) {
                if rows.contains(&x) {
                    dist[x - rows.start] = f32::INFINITY;
                }
            }
            let min = if k == 1 {
                min_of(dist)
            } else {
                kth_smallest(dist.iter().copied(), k)
            };
            mins.push(min);
            let lim = min + band[i];
            for (j, &v) in dist.iter().enumerate() {
                if v <= lim {
                    cands.push(Candidate {
                        query: (q0 + i) as u32,
                        row: (rows.start + j) as u32,
                        approx: v,
                    });
                }
            }
        }
        (mins, cands)
    }
}

/// The `k`-th smallest value (`k` ≥ 1; infinite for fewer than `k`; NaN values are skipped).
fn kth_smallest(v: impl Iterator<Item = f32>, k: usize) -> f32 {
    let mut vals: Vec<f32> = v.filter(|x| !x.is_nan()).collect();
    if vals.len() < k {
        return f32::INFINITY;
    }
    *vals.select_nth_unstable_by(k - 1, f32::total_cmp).1
}

/// The smallest value (infinite for none; NaN values are skipped).
fn min_of(v: &[f32]) -> f32 {
    let mut lanes = [f32::INFINITY; 16];
    let mut it = v.chunks_exact(16);
    for c in &mut it {
        for (l, &x) in lanes.iter_mut().zip(c) {
            *l = if x < *l { x } else { *l };
        }
    }
    let mut m = it
        .remainder()
        .iter()
        .fold(f32::INFINITY, |m, &x| if x < m { x } else { m });
    for l in lanes {
        if l < m {
            m = l;
        }
    }
    m
}

/// Exact nearest neighbour by brute force (the reference the tests compare the indexes
/// against): the smallest distance accumulated in `f64`, the lowest id on ties.
pub fn brute_force_nearest(
    table: &[f32],
    dim: usize,
    keep: impl Fn(u32) -> bool,
    query: &[f32],
    metric: Metric,
) -> u32 {
    let mut best = (u32::MAX, f64::INFINITY);
    for (t, row) in table.chunks_exact(dim).enumerate() {
        if !keep(t as u32) {
            continue;
        }
        let score = match metric {
            Metric::L2 => l2(row, query),
            Metric::InnerProduct => -row
                .iter()
                .zip(query)
                .map(|(&a, &b)| a as f64 * b as f64)
                .sum::<f64>(),
        };
        if score < best.1 {
            best = (t as u32, score);
        }
    }
    best.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn brute(rows: &[f32], d: usize, q: &[f32], skip: Option<usize>) -> (u32, f64) {
        let mut best = (NONE, f64::INFINITY);
        for (j, r) in rows.chunks_exact(d).enumerate() {
            if Some(j) == skip {
                continue;
            }
            let v = l2(r, q);
            if v < best.1 {
                best = (j as u32, v);
            }
        }
        best
    }

    #[test]
    fn equals_brute_force_with_ties_and_duplicates() {
        let (n, d) = (1500, 24);
        let mut r = ChaCha8Rng::seed_from_u64(3);
        // Coarse values make exact ties common; rows 7 and 1100 are duplicates.
        let mut rows: Vec<f32> = (0..n * d)
            .map(|_| r.gen_range(-4i32..4) as f32 * 0.25)
            .collect();
        let dup = rows[7 * d..8 * d].to_vec();
        rows[1100 * d..1101 * d].copy_from_slice(&dup);
        let f = FlatL2::new(rows.clone(), d);
        let mut q: Vec<f32> = (0..300 * d)
            .map(|_| r.gen_range(-4i32..4) as f32 * 0.25)
            .collect();
        q.extend_from_slice(&dup);
        q.extend(rows[20 * d..21 * d].iter().map(|v| v + 1e-3));
        let got = f.nearest(&q);
        for (i, qq) in q.chunks_exact(d).enumerate() {
            assert_eq!(got[i], brute(&rows, d, qq, None).0, "query {i}");
        }
        assert_eq!(got[300], 7, "ties go to the lowest row");
        let picks = [0u32, 7, 20, 1100, 1499];
        let nn = f.nn_distance2(&picks);
        for (k, &p) in picks.iter().enumerate() {
            let want = brute(&rows, d, f.row(p as usize), Some(p as usize)).1;
            assert_eq!(nn[k], want, "row {p}");
        }
        assert_eq!(nn[1], 0.0);
        let bad = vec![f32::NAN; d];
        assert_eq!(f.nearest(&bad), vec![NONE]);
    }

    /// The `k` nearest rows by brute force: sorted by (`l2`, row), padded with `NONE`.
    fn brute_k(rows: &[f32], d: usize, q: &[f32], k: usize) -> Vec<u32> {
        let mut all: Vec<(f64, u32)> = rows
            .chunks_exact(d)
            .enumerate()
            .map(|(j, r)| (l2(r, q), j as u32))
            .filter(|(v, _)| v.is_finite())
            .collect();
        all.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        let mut out: Vec<u32> = all.iter().take(k).map(|&(_, j)| j).collect();
        out.resize(k, NONE);
        out
    }

    #[test]
    fn k_nearest_equals_brute_force_top_k_with_ties() {
        let (n, d) = (1300, 16);
        let mut r = ChaCha8Rng::seed_from_u64(11);
        // Coarse values: many rows at equal distances, so the k-th place is often a tie
        // spanning several rows and blocks. Rows 5, 600 and 1299 are duplicates.
        let mut rows: Vec<f32> = (0..n * d)
            .map(|_| r.gen_range(-2i32..2) as f32 * 0.5)
            .collect();
        let dup = rows[5 * d..6 * d].to_vec();
        for j in [600, 1299] {
            rows[j * d..(j + 1) * d].copy_from_slice(&dup);
        }
        let f = FlatL2::new(rows.clone(), d);
        let mut q: Vec<f32> = (0..200 * d)
            .map(|_| r.gen_range(-2i32..2) as f32 * 0.5)
            .collect();
        q.extend_from_slice(&dup);
        q.extend(rows[40 * d..41 * d].iter().map(|v| v + 1e-4));
        for k in [1, 2, 9, 40] {
            let got = f.nearest_k(&q, k);
            assert_eq!(got.len(), q.len() / d * k);
            for (i, qq) in q.chunks_exact(d).enumerate() {
                assert_eq!(
                    got[i * k..(i + 1) * k],
                    brute_k(&rows, d, qq, k),
                    "k {k} query {i}"
                );
            }
        }
        let three = f.nearest_k(&dup, 3);
        assert_eq!(three, vec![5, 600, 1299], "tied duplicates in row order");
        assert_eq!(
            f.nearest_k(&dup, 1),
            f.nearest(&dup),
            "k = 1 is the 1-NN search"
        );
    }

    #[test]
    fn k_nearest_pads_short_tables_and_non_finite_queries() {
        let d = 4;
        let rows: Vec<f32> = (0..3 * d).map(|i| i as f32).collect();
        let f = FlatL2::new(rows.clone(), d);
        let q = vec![1.0f32; d];
        assert_eq!(f.nearest_k(&q, 5), brute_k(&rows, d, &q, 5));
        assert_eq!(f.nearest_k(&q, 5)[3..], [NONE, NONE]);
        assert_eq!(f.nearest_k(&[f32::NAN; 4], 2), vec![NONE, NONE]);
        // An infinite coordinate puts every row at an infinite distance, as for the 1-NN.
        for inf in [f32::INFINITY, f32::NEG_INFINITY] {
            let q = [inf, 0.0, 0.0, 0.0];
            assert_eq!(f.nearest_k(&q, 2), vec![NONE, NONE], "{inf}");
            assert_eq!(f.nearest_k(&q, 2), brute_k(&rows, d, &q, 2), "{inf}");
            assert_eq!(f.nearest(&q), vec![NONE], "{inf}");
        }
    }

    #[test]
    fn k_nearest_is_deterministic_across_thread_counts() {
        let (n, d) = (2100, 32);
        let mut r = ChaCha8Rng::seed_from_u64(5);
        let rows: Vec<f32> = (0..n * d).map(|_| r.gen_range(-1.0f32..1.0)).collect();
        let f = FlatL2::new(rows, d);
        let q: Vec<f32> = (0..300 * d).map(|_| r.gen_range(-1.0f32..1.0)).collect();
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let four = rayon::ThreadPoolBuilder::new()
            .num_threads(4)
            .build()
            .unwrap();
        let a = one.install(|| f.nearest_k(&q, 8));
        let b = four.install(|| f.nearest_k(&q, 8));
        assert_eq!(a, b);
    }
}
