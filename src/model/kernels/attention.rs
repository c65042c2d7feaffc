//! Multi-head self-attention `softmax(QKᵀ/√d)·V` over packed sequences (real tokens only,
//! no padding) as one op: the (sequence × head) pairs are split across threads, each with
//! single-threaded small GEMMs. Attention-probability dropout is drawn from a seeded
//! generator per pair, so the backward, which recomputes the probabilities instead of
//! storing them, sees the same mask.

use super::{math, SharedMut};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use std::sync::Arc;

/// Where the packed sequences lie: `(first row, length)` each.
pub type Seqs = Arc<Vec<(usize, usize)>>;

/// The per-call constants of the op.
#[derive(Clone)]
struct Attention {
    heads: usize,
    seqs: Seqs,
    /// Dropout probability on the attention weights and the seed of its masks.
    dropout: Option<(f32, u64)>,
}

/// `dst[m×n] = beta·a[m×k]·b[k×n]`, with explicit `(row, column)` strides for each matrix.
#[allow(clippy::too_many_arguments)] // a strided GEMM: three operands with two strides each
unsafe fn small_gemm(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    (drs, dcs): (usize, usize),
    a: *const f32,
    (ars, acs): (usize, usize),
    b: *const f32,
    (brs, bcs): (usize, usize),
    beta: f32,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        dcs as isize,
        drs as isize,
        false,
        a,
        acs as isize,
        ars as isize,
        b,
        bcs as isize,
        brs as isize,
        0.0,
        beta,
        false,
        false,
        false,
        gemm::Parallelism::None,
    )
}

impl Attention {
    /// Hidden size and head size for a packed `[T, 3h]` input.
    fn dims(&self, l: &Layout) -> Result<(usize, usize)> {
        let (t, h3) = l.shape().dims2()?;
        let h = h3 / 3;
        let rows = self.seqs.last().map_or(0, |&(a, n)| a + n);
        if h3 % 3 != 0 || h % self.heads != 0 || rows > t {
            candle_core::bail!(
                "attention: input {:?} does not fit the sequences",
                l.shape()
            );
        }
        Ok((h, h / self.heads))
    }

    /// The dropout mask (already scaled by 1/(1-p)) of one (sequence, head) pair.
    fn dropout_mask(&self, pair: usize, n: usize) -> Option<Vec<f32>> {
        let (p, seed) = self.dropout?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ (pair as u64).wrapping_mul(0x9E37_79B9));
        let keep = 1.0 / (1.0 - p);
        Some(
            (0..n * n)
                .map(|_| if rng.gen::<f32>() >= p { keep } else { 0.0 })
                .collect(),
        )
    }

    /// Softmax probabilities `[n, n]` of one pair; `q` and `k` point at its first row.
    unsafe fn probs(
        &self,
        q: *const f32,
        k: *const f32,
        stride: usize,
        n: usize,
        d: usize,
    ) -> Vec<f32> {
        let mut p = vec![0f32; n * n];
        let scale = 1.0 / (d as f32).sqrt();
        small_gemm(
            (n, n, d),
            p.as_mut_ptr(),
            (n, 1),
            q,
            (stride, 1),
            k,
            (1, stride),
            scale,
        );
        for row in p.chunks_exact_mut(n) {
            math::softmax_row(row);
        }
        p
    }

    /// Runs `f(pair index, first row, length, column)` for every (sequence, head) pair.
    fn pairs(&self, d: usize, f: impl Fn(usize, usize, usize, usize) + Sync) {
        (0..self.seqs.len() * self.heads)
            .into_par_iter()
            .for_each(|pair| {
                let (start, n) = self.seqs[pair / self.heads];
                if n > 0 {
                    f(pair, start, n, (pair % self.heads) * d);
                }
            });
    }
}

impl CustomOp1 for Attention {
    fn name(&self) -> &'static str {
        "attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (h, d) = self.dims(l)?;
        let qkv = super::contiguous(s, l)?;
        let t = qkv.len() / (3 * h);
        let mut out = vec![0f32; t * h];
        let dst = SharedMut(out.as_mut_ptr());
        self.pairs(d, |pair, start, n, col| {
            // SAFETY: each pair writes only columns `col..col + d` of its own rows; reads
            // stay within `qkv`.
            unsafe {
                let q = qkv.as_ptr().add(start * 3 * h + col);
                let mut p = self.probs(q, q.add(h), 3 * h, n, d);
                if let Some(m) = self.dropout_mask(pair, n) {
                    p.iter_mut().zip(&m).for_each(|(x, m)| *x *= m);
                }
                let (o, v) = (dst.ptr().add(start * h + col), q.add(2 * h));
                small_gemm((n, d, n), o, (h, 1), p.as_ptr(), (n, 1), v, (3 * h, 1), 1.0);
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((t, h))))
    }

    fn bwd(&self, qkv: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(qkv.apply_op2_no_bwd(
            &g.contiguous()?,
            &AttentionGrad(self.clone()),
        )?))
    }
}

/// The gradient `[T, 3h]` of the packed query, key and value for an output gradient.
struct AttentionGrad(Attention);

impl CustomOp2 for AttentionGrad {
    fn name(&self) -> &'static str {
        "attention-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let a = &self.0;
        let (h, d) = a.dims(l1)?;
        let (qkv, go) = (super::contiguous(s1, l1)?, super::contiguous(s2, l2)?);
        let mut out = vec![0f32; qkv.len()];
        let dst = SharedMut(out.as_mut_ptr());
        let scale = 1.0 / (d as f32).sqrt();
        a.pairs(d, |pair, start, n, col| {
            // SAFETY: each pair writes only its own rows' columns `col..col + d` of the
            // query, key and value thirds; reads stay within the inputs.
            unsafe {
                let q = qkv.as_ptr().add(start * 3 * h + col);
                let (k, v) = (q.add(h), q.add(2 * h));
                let go = go.as_ptr().add(start * h + col);
                let dq = dst.ptr().add(start * 3 * h + col);
                let (dk, dv) = (dq.add(h), dq.add(2 * h));
                let p = a.probs(q, k, 3 * h, n, d);
                let mask = a.dropout_mask(pair, n);
                let dropped: Vec<f32> = match &mask {
                    Some(m) => p.iter().zip(m).map(|(x, m)| x * m).collect(),
                    None => p.clone(),
                };
                // dV = P'ᵀ·dO
                small_gemm(
                    (n, d, n),
                    dv,
                    (3 * h, 1),
                    dropped.as_ptr(),
                    (1, n),
                    go,
                    (h, 1),
                    1.0,
                );
                // dP = (dO·Vᵀ) ⊙ mask, then dS = P ⊙ (dP − rowsum(P ⊙ dP))
                let mut ds = vec![0f32; n * n];
                small_gemm(
                    (n, n, d),
                    ds.as_mut_ptr(),
                    (n, 1),
                    go,
                    (h, 1),
                    v,
                    (1, 3 * h),
                    1.0,
                );
                if let Some(m) = &mask {
                    ds.iter_mut().zip(m).for_each(|(x, m)| *x *= m);
                }
                for (dsr, pr) in ds.chunks_exact_mut(n).zip(p.chunks_exact(n)) {
                    let dot: f32 = dsr.iter().zip(pr).map(|(x, y)| x * y).sum();
                    for (x, y) in dsr.iter_mut().zip(pr) {
                        *x = y * (*x - dot);
                    }
                }
                // dQ = scale·dS·K, dK = scale·dSᵀ·Q
                small_gemm(
                    (n, d, n),
                    dq,
                    (3 * h, 1),
                    ds.as_ptr(),
                    (n, 1),
                    k,
                    (3 * h, 1),
                    scale,
                );
                small_gemm(
                    (n, d, n),
                    dk,
                    (3 * h, 1),
                    ds.as_ptr(),
                    (1, n),
                    q,
                    (3 * h, 1),
                    scale,
                );
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Self-attention over packed sequences: `qkv` is `[T, 3·hidden]` (query, key, value side
/// by side, heads side by side in each), `seqs` the rows of each sequence; returns
/// `[T, hidden]`. With `dropout = Some((p, seed))` the attention weights are dropped.
pub fn attention(
    qkv: &Tensor,
    seqs: &Seqs,
    heads: usize,
    dropout: Option<(f32, u64)>,
) -> Result<Tensor> {
    let op = Attention {
        heads,
        seqs: seqs.clone(),
        dropout: dropout.filter(|&(p, _)| p > 0.0),
    };
    qkv.contiguous()?.apply_op1(op)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    /// The padded computation with an additive mask, as the model's plain-ops path does it.
    fn reference(qkv: &Tensor, lens: &[usize], s: usize, heads: usize) -> Result<Tensor> {
        let dev = qkv.device();
        let h = qkv.dim(1)? / 3;
        let (b, d) = (lens.len(), h / heads);
        let mut rows = Vec::new();
        let mut start = 0u32;
        for &n in lens {
            rows.extend((0..s as u32).map(|j| if (j as usize) < n { start + j } else { 0 }));
            start += n as u32;
        }
        let padded = qkv
            .index_select(&Tensor::new(rows, dev)?, 0)?
            .reshape((b, s, 3 * h))?;
        let mask: Vec<f32> = lens
            .iter()
            .flat_map(|&n| (0..s).map(move |j| if j < n { 0.0 } else { -1e9 }))
            .collect();
        let mask = Tensor::from_vec(mask, (b, 1, 1, s), dev)?;
        let split = |i: usize| -> Result<Tensor> {
            padded
                .narrow(2, i * h, h)?
                .reshape((b, s, heads, d))?
                .transpose(1, 2)?
                .contiguous()
        };
        let (q, k, v) = (split(0)?, split(1)?, split(2)?);
        let scores = (q.matmul(&k.t()?)? * (1.0 / (d as f64).sqrt()))?.broadcast_add(&mask)?;
        let max = scores.max_keepdim(D::Minus1)?.detach();
        let e = scores.broadcast_sub(&max)?.exp()?;
        let p = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
        let out = p
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b * s, h))?;
        let keep: Vec<u32> = lens
            .iter()
            .enumerate()
            .flat_map(|(i, &n)| (0..n).map(move |j| (i * s + j) as u32))
            .collect();
        out.index_select(&Tensor::new(keep, dev)?, 0)
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.max_all()?.to_scalar::<f32>()
    }

    #[test]
    fn matches_padded_attention_forward_and_backward() -> Result<()> {
        let dev = Device::Cpu;
        let (lens, s, h, heads) = ([9usize, 4, 6], 9, 24, 4);
        let t: usize = lens.iter().sum();
        let seqs: Seqs = Arc::new(vec![(0, 9), (9, 4), (13, 6)]);
        let qkv = Var::from_tensor(&Tensor::randn(0f32, 1.0, (t, 3 * h), &dev)?)?;
        let ours = attention(qkv.as_tensor(), &seqs, heads, None)?;
        let theirs = reference(qkv.as_tensor(), &lens, s, heads)?;
        assert!(max_diff(&ours, &theirs)? < 1e-5);
        let r = Tensor::randn(0f32, 1.0, (t, h), &dev)?;
        let g1 = ours.mul(&r)?.sum_all()?.backward()?;
        let g2 = theirs.mul(&r)?.sum_all()?.backward()?;
        assert!(max_diff(g1.get(&qkv).unwrap(), g2.get(&qkv).unwrap())? < 1e-4);
        Ok(())
    }

    #[test]
    fn dropout_gradient_matches_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        let seqs: Seqs = Arc::new(vec![(0, 5), (5, 3)]);
        let x: Vec<f64> = (0..8 * 12)
            .map(|i| ((i * 37 % 23) as f64 - 11.0) / 9.0)
            .collect();
        let f = |x: &[f64]| -> Result<f64> {
            let t = Tensor::from_vec(
                x.iter().map(|&v| v as f32).collect::<Vec<_>>(),
                (8, 12),
                &dev,
            )?;
            let y = attention(&t, &seqs, 2, Some((0.3, 7)))?;
            let w = Tensor::arange(0f32, 32.0, &dev)?.reshape((8, 4))?.sin()?;
            Ok(y.mul(&w)?.sum_all()?.to_scalar::<f32>()? as f64)
        };
        let v = Var::from_tensor(&Tensor::from_vec(
            x.iter().map(|&v| v as f32).collect::<Vec<_>>(),
            (8, 12),
            &dev,
        )?)?;
        let y = attention(v.as_tensor(), &seqs, 2, Some((0.3, 7)))?;
        let w = Tensor::arange(0f32, 32.0, &dev)?.reshape((8, 4))?.sin()?;
        let g: Vec<f32> = y
            .mul(&w)?
            .sum_all()?
            .backward()?
            .get(&v)
            .unwrap()
            .flatten_all()?
            .to_vec1()?;
        for i in [0, 7, 13, 30, 50, 77, 95] {
            let (mut a, mut b) = (x.clone(), x.clone());
            a[i] += 1e-2;
            b[i] -= 1e-2;
            let fd = (f(&a)? - f(&b)?) / 2e-2;
            assert!(
                (fd - g[i] as f64).abs() < 2e-2 * (1.0 + fd.abs()),
                "{i}: fd {fd} vs {}",
                g[i]
            );
        }
        Ok(())
    }
}
