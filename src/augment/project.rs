//! Projection back to the vocabulary: a FAISS index over the word-embedding table with
//! special and reserved tokens left out, searched in batches. Exact L2 (`Flat`) nearest and
//! k-nearest search runs on [`FlatL2`], which gives brute force's answer exactly.

use super::exact_search::{kept_rows, l2, FlatL2, NONE};
use anyhow::{bail, Context, Result};
use faiss::{index_factory, Index, MetricType};

/// The distance type, a configuration type (re-exported here for the benchmarks).
pub use crate::config::Metric;

/// Id returned where an approximate index finds fewer than `k` neighbours.
pub const MISSING: u32 = u32::MAX;

/// A nearest-token index over a word-embedding table.
pub struct Projector {
    index: faiss::index::IndexImpl,
    token_ids: Vec<u32>,
    dim: usize,
    /// FAISS factory string the index was built with.
    pub factory: String,
    /// The metric.
    pub metric: Metric,
    /// The exact index over the indexed rows (exact L2 `Flat` only): nearest search and
    /// [`Projector::nearest_with_hints`].
    exact: Option<FlatL2>,
    /// Position in the index of each token id (`MISSING` when not indexed).
    slot: Vec<u32>,
    /// Distance from each indexed row to its nearest other row (NaN until needed).
    nn: Vec<f32>,
    /// An upper bound on `nn`: the distance to the nearest of a few other rows (NaN until
    /// needed). A query at least 0.45 of it away from a row needs no `nn` for that row.
    nn_upper: Vec<f32>,
}

impl Projector {
    /// Indexes the rows of `table` (`vocab × dim`, row-major) whose token id passes `keep`.
    /// `factory` is a FAISS index-factory string (`Flat`, `HNSW32`, `IVF1024,Flat`, ...).
    pub fn build(
        table: &[f32],
        dim: usize,
        keep: impl Fn(u32) -> bool,
        factory: &str,
        metric: Metric,
    ) -> Result<Self> {
        Self::build_with(table, dim, keep, factory, metric, None)
    }

    /// Like [`build`](Self::build), then applies FAISS search parameters such as
    /// `nprobe=16` or `efSearch=128` (comma-separated, as FAISS's ParameterSpace reads them).
    pub fn build_with(
        table: &[f32],
        dim: usize,
        keep: impl Fn(u32) -> bool,
        factory: &str,
        metric: Metric,
        params: Option<&str>,
    ) -> Result<Self> {
        let (token_ids, data) = kept_rows(table, dim, keep)?;
        let vocab = table.len() / dim;
        let mt = match metric {
            Metric::L2 => MetricType::L2,
            Metric::InnerProduct => MetricType::InnerProduct,
        };
        let mut index = index_factory(dim as u32, factory, mt)
            .with_context(|| format!("FAISS index factory `{factory}` failed"))?;
        if !index.is_trained() {
            index
                .train(&data)
                .with_context(|| format!("training FAISS index `{factory}` failed"))?;
        }
        if factory == "Flat" {
            index
                .add(&data)
                .context("adding vectors to the FAISS index failed")?;
        } else {
            // Graph and cluster construction is threaded and order-dependent in FAISS;
            // one thread keeps the index, and so the shards, identical from run to run.
            crate::util::with_one_native_thread(|| index.add(&data))
                .context("adding vectors to the FAISS index failed")?;
        }
        if let Some(p) = params.filter(|p| !p.is_empty()) {
            set_parameters(&mut index, p).with_context(|| {
                format!("FAISS parameters `{p}` do not apply to index `{factory}`")
            })?;
        }
        let mut slot = vec![MISSING; vocab];
        for (i, &t) in token_ids.iter().enumerate() {
            slot[t as usize] = i as u32;
        }
        let exact = factory == "Flat" && metric == Metric::L2;
        Ok(Self {
            nn: vec![f32::NAN; token_ids.len()],
            nn_upper: vec![f32::NAN; token_ids.len()],
            index,
            token_ids,
            dim,
            factory: factory.to_string(),
            metric,
            exact: exact.then(|| FlatL2::new(data, dim)),
            slot,
        })
    }

    /// Number of indexed tokens.
    pub fn len(&self) -> usize {
        self.token_ids.len()
    }

    /// True when nothing is indexed.
    pub fn is_empty(&self) -> bool {
        self.token_ids.is_empty()
    }

    /// The `k` nearest token ids of each query (row-major `n × dim`), best first, with
    /// their distances (squared L2, or inner product); [`MISSING`] where an approximate
    /// index found fewer than `k`.
    pub fn search(&mut self, queries: &[f32], k: usize) -> Result<(Vec<u32>, Vec<f32>)> {
        if queries.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        self.check_dim(queries)?;
        let res = self
            .index
            .search(queries, k)
            .context("FAISS search failed")?;
        let ids = res
            .labels
            .iter()
            .map(|l| {
                l.get()
                    .map(|i| self.token_ids[i as usize])
                    .unwrap_or(MISSING)
            })
            .collect();
        Ok((ids, res.distances))
    }

    /// The `k` nearest token ids of each query, best first, `k` per query. Exact L2 `Flat`
    /// gives brute force's answer: sorted by distance (accumulated in `f64`), the lower id
    /// on ties; other indexes give FAISS's. [`MISSING`] where fewer than `k` are found.
    pub fn nearest_k(&mut self, queries: &[f32], k: usize) -> Result<Vec<u32>> {
        let Some(exact) = &self.exact else {
            return Ok(self.search(queries, k)?.0);
        };
        self.check_dim(queries)?;
        Ok(exact
            .nearest_k(queries, k)
            .into_iter()
            .map(|s| self.token_id(s))
            .collect())
    }

    /// The token id of index row `s` ([`MISSING`] for [`NONE`]).
    fn token_id(&self, s: u32) -> u32 {
        match s {
            NONE => MISSING,
            s => self.token_ids[s as usize],
        }
    }

    /// An error for a query buffer that is not whole rows.
    fn check_dim(&self, queries: &[f32]) -> Result<()> {
        if !queries.len().is_multiple_of(self.dim) {
            bail!(
                "query buffer of {} values is not a multiple of dimension {}",
                queries.len(),
                self.dim
            );
        }
        Ok(())
    }

    /// The nearest token id of each query. Exact L2 `Flat` gives brute force's answer: the
    /// smallest distance (accumulated in `f64`), the lowest id on ties.
    pub fn nearest(&mut self, queries: &[f32]) -> Result<Vec<u32>> {
        let Some(exact) = &self.exact else {
            return Ok(self.search(queries, 1)?.0);
        };
        self.check_dim(queries)?;
        Ok(exact
            .nearest(queries)
            .into_iter()
            .map(|s| self.token_id(s))
            .collect())
    }
}

impl Projector {
    /// The nearest token of each query, given a likely answer per query (`hints`, e.g. the
    /// source token of an interpolated position; [`MISSING`] for none). By the triangle
    /// inequality, a query closer to a token's embedding than half that token's
    /// nearest-neighbour distance has that token as its nearest; with the bound at 0.45, the
    /// margin (a tenth of the squared nearest-neighbour distance) is far above rounding, so
    /// the answer is the one exact search gives. Only the other queries are searched.
    /// Indexes other than exact L2 `Flat` search every query.
    pub fn nearest_with_hints(&mut self, queries: &[f32], hints: &[u32]) -> Result<Vec<u32>> {
        let d = self.dim;
        if self.exact.is_none() || hints.len() * d != queries.len() {
            return self.nearest(queries);
        }
        let slots: Vec<u32> = hints
            .iter()
            .map(|&h| self.slot.get(h as usize).copied().unwrap_or(MISSING))
            .collect();
        // Squared distance of each hinted query to its hint's row, and whether the row's
        // nearest-neighbour distance can decide anything (it cannot where the query lies
        // 0.45 of an upper bound of it away).
        let dist2: Vec<f32> = {
            let exact = self.exact.as_ref().expect("exact index");
            slots
                .iter()
                .zip(queries.chunks_exact(d))
                .map(|(&s, q)| match s {
                    MISSING => f32::INFINITY,
                    s => q
                        .iter()
                        .zip(exact.row(s as usize))
                        .map(|(a, b)| (a - b) * (a - b))
                        .sum(),
                })
                .collect()
        };
        let near: Vec<u32> = slots
            .iter()
            .zip(&dist2)
            .filter(|&(&s, &d2)| {
                s != MISSING && {
                    let u = self.upper_nn(s);
                    d2 < 0.45 * 0.45 * u * u
                }
            })
            .map(|(&s, _)| s)
            .collect();
        self.learn_nn(&near);
        let exact = self.exact.as_ref().expect("exact index");
        let known: Vec<Option<u32>> = slots
            .iter()
            .zip(queries.chunks_exact(d))
            .zip(&dist2)
            .map(|((&s, q), &dist2)| {
                if s == MISSING || self.nn[s as usize].is_nan() {
                    return None;
                }
                let e = exact.row(s as usize);
                let nn = self.nn[s as usize];
                let norms: f32 = q.iter().chain(e).map(|v| v * v).sum();
                let inside = dist2 < 0.45 * 0.45 * nn * nn && 0.1 * nn * nn > 1e-4 * norms;
                inside.then(|| self.token_ids[s as usize])
            })
            .collect();
        let mut rest = Vec::new();
        for (k, q) in known.iter().zip(queries.chunks_exact(d)) {
            if k.is_none() {
                rest.extend_from_slice(q);
            }
        }
        let mut found = self.nearest(&rest)?.into_iter();
        Ok(known
            .into_iter()
            .map(|k| k.unwrap_or_else(|| found.next().expect("one result per query")))
            .collect())
    }

    /// An upper bound on the nearest-neighbour distance of row `s`: its distance to the
    /// nearest of 16 other rows spread over the index (cached).
    fn upper_nn(&mut self, s: u32) -> f32 {
        let s = s as usize;
        if self.nn_upper[s].is_nan() {
            let exact = self.exact.as_ref().expect("exact index");
            let n = exact.len();
            let step = (n / 16).max(1);
            let best = (0..16)
                .map(|k| (s + 1 + k * step) % n)
                .filter(|&j| j != s)
                .map(|j| l2(exact.row(s), exact.row(j)))
                .fold(f64::INFINITY, f64::min);
            self.nn_upper[s] = best.sqrt() as f32;
        }
        self.nn_upper[s]
    }

    /// Computes the nearest-neighbour distance of the indexed rows in `slots` not yet known
    /// (0 for a row with a duplicate: no shortcut for it).
    fn learn_nn(&mut self, slots: &[u32]) {
        let mut todo: Vec<u32> = slots
            .iter()
            .copied()
            .filter(|&s| s != MISSING && self.nn[s as usize].is_nan())
            .collect();
        todo.sort_unstable();
        todo.dedup();
        if todo.is_empty() {
            return;
        }
        let exact = self.exact.as_ref().expect("exact index");
        for (&s, d2) in todo.iter().zip(exact.nn_distance2(&todo)) {
            self.nn[s as usize] = d2.max(0.0).sqrt() as f32;
        }
    }
}

fn set_parameters(index: &mut faiss::index::IndexImpl, params: &str) -> Result<()> {
    let c = std::ffi::CString::new(params)?;
    // SAFETY: the parameter space is created, used on a live index and freed here.
    unsafe {
        let mut space = std::ptr::null_mut();
        if faiss_sys::faiss_ParameterSpace_new(&mut space) != 0 {
            bail!("cannot create a FAISS parameter space");
        }
        let rc = faiss_sys::faiss_ParameterSpace_set_index_parameters(
            space,
            index.inner_ptr(),
            c.as_ptr(),
        );
        faiss_sys::faiss_ParameterSpace_free(space);
        if rc != 0 {
            bail!("FAISS rejected the parameters");
        }
    }
    Ok(())
}

/// Median distance from an indexed token to its nearest other token, over every
/// ⌊n / `sample`⌋-th of the `n` indexed tokens (so `sample` to `2·sample` of them, or all
/// when fewer; L2 only; the scale for relative ε). It
/// comes from the exact search, its distances summed in `f64` in index order, so the scale
/// and every ε drawn from it are the same on every CPU (a BLAS distance is not: its
/// kernels differ between CPUs in the last bits).
pub fn median_nn_distance(p: &Projector, sample: usize) -> Result<f32> {
    let exact = p
        .exact
        .as_ref()
        .context("the median nearest-neighbour distance needs the exact L2 index")?;
    let n = exact.len();
    let step = (n / sample.max(1)).max(1);
    let picks: Vec<u32> = (0..n as u32).step_by(step).collect();
    let mut dists = exact.nn_distance2(&picks);
    dists.sort_by(f64::total_cmp);
    let median = dists.get(dists.len() / 2).context("no token is indexed")?;
    anyhow::ensure!(
        median.is_finite(),
        "{n} indexed token(s): no nearest-neighbour distance to scale relative ε by"
    );
    Ok(median.max(0.0).sqrt() as f32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// The scale of relative ε is brute force's, bit for bit: nearest other row by `f64`
    /// distances in index order, never a BLAS distance (whose bits depend on the CPU).
    #[test]
    fn median_nn_distance_is_brute_forces_bit_for_bit() {
        let (n, d) = (1500usize, 24usize);
        let mut r = ChaCha8Rng::seed_from_u64(11);
        let table: Vec<f32> = (0..n * d).map(|_| r.gen_range(-1.0f32..1.0)).collect();
        let p = Projector::build(&table, d, |t| t % 7 != 3, "Flat", Metric::L2).unwrap();
        let got = median_nn_distance(&p, 100).unwrap();
        let kept: Vec<usize> = (0..n).filter(|t| t % 7 != 3).collect();
        let step = kept.len() / 100;
        let row = |t: usize| &table[t * d..(t + 1) * d];
        let mut want: Vec<f64> = (0..kept.len())
            .step_by(step)
            .map(|i| {
                kept.iter()
                    .filter(|&&j| j != kept[i])
                    .map(|&j| l2(row(kept[i]), row(j)))
                    .fold(f64::INFINITY, f64::min)
            })
            .collect();
        want.sort_by(f64::total_cmp);
        assert_eq!(got, want[want.len() / 2].sqrt() as f32);
    }
}
