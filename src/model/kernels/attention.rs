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
///
/// # Safety
/// Every element the strides address (`dst` `m×n`, `a` `m×k`, `b` `k×n`) must lie within a
/// live allocation, and no other thread may access the elements of `dst` during the call.
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
    if super::portable() && dcs == 1 && m > 0 && n > 0 && k > 0 {
        use super::portable_gemm::{matmul, Strided};
        // The extent of a strided matrix: one past its last element.
        let end =
            |rows: usize, cols: usize, rs: usize, cs: usize| (rows - 1) * rs + (cols - 1) * cs + 1;
        // SAFETY: the caller guarantees the strided matrices are in bounds and `dst`
        // unshared, so each extent is one allocation's, and `dst`'s is written by nobody else.
        let (a, b, c) = unsafe {
            (
                std::slice::from_raw_parts(a, end(m, k, ars, acs)),
                std::slice::from_raw_parts(b, end(k, n, brs, bcs)),
                std::slice::from_raw_parts_mut(dst, end(m, n, drs, 1)),
            )
        };
        let a = Strided {
            data: a,
            rows: m,
            cols: k,
            rs: ars,
            cs: acs,
        };
        let b = Strided {
            data: b,
            rows: k,
            cols: n,
            rs: brs,
            cs: bcs,
        };
        matmul(a, b, c, drs, false, false);
        if beta != 1.0 {
            for row in c.chunks_mut(drs) {
                row.iter_mut().take(n).for_each(|v| *v *= beta);
            }
        }
        return;
    }
    // SAFETY: the caller guarantees the strided matrices are in bounds and `dst` unshared.
    unsafe {
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
}

/// Checks that the sequences `(first row, length)` are in order, do not overlap and lie
/// within `rows` rows.
fn check_seqs(seqs: &[(usize, usize)], rows: usize) -> Result<()> {
    let mut end = 0;
    for (i, &(start, n)) in seqs.iter().enumerate() {
        match start.checked_add(n) {
            Some(e) if start >= end && e <= rows => end = e,
            _ => candle_core::bail!(
                "attention: sequence {i} (rows {start}..{start}+{n}) is out of order, overlaps \
                 the one before or lies past the {rows} rows of the input"
            ),
        }
    }
    Ok(())
}

/// Checks that a dropout probability is in `[0, 1)`.
fn check_dropout(dropout: Option<(f32, u64)>) -> Result<()> {
    match dropout {
        Some((p, _)) if !(0.0..1.0).contains(&p) => {
            candle_core::bail!("attention: dropout probability {p} is not in [0, 1)")
        }
        _ => Ok(()),
    }
}

impl Attention {
    /// Token count, hidden size and head size of a packed `[T, 3h]` input, after checking
    /// that the heads divide the hidden size and that the sequences are ordered, disjoint
    /// and within the `T` rows: the invariants every raw-pointer access below relies on.
    fn dims(&self, l: &Layout) -> Result<(usize, usize, usize)> {
        let (t, h3) = l.shape().dims2()?;
        let h = h3 / 3;
        if self.heads == 0 || h == 0 || h3 % 3 != 0 || h % self.heads != 0 {
            candle_core::bail!(
                "attention: input {:?} is not [tokens, 3·hidden] with {} heads dividing hidden",
                l.shape(),
                self.heads
            );
        }
        check_seqs(&self.seqs, t)?;
        Ok((t, h, h / self.heads))
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
    ///
    /// # Safety
    /// `q` and `k` must each address `n` rows of `d` values, `stride` apart, within the input.
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
        // SAFETY: `p` is a local `n×n` buffer; the caller guarantees that `q` and `k` address
        // `n` rows of `d` values within the input.
        unsafe {
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
        }
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
        let (t, h, d) = self.dims(l)?;
        let qkv = super::contiguous(s, l)?;
        let mut out = vec![0f32; t * h];
        let dst = SharedMut(out.as_mut_ptr());
        self.pairs(d, |pair, start, n, col| {
            // SAFETY: `dims` checked that the sequences are disjoint and within the `t` rows
            // of `qkv` ([t, 3h]) and `out` ([t, h]), and that `heads·d = h`, so `col + d ≤ h`.
            // Each pair reads rows `start..start + n` of `qkv` and writes only columns
            // `col..col + d` of the same rows of `out`, which no other pair writes.
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
        let (t, h, d) = a.dims(l1)?;
        if l2.shape().dims() != [t, h] {
            candle_core::bail!(
                "attention: output gradient {:?} is not [{t}, {h}]",
                l2.shape()
            );
        }
        let (qkv, go) = (super::contiguous(s1, l1)?, super::contiguous(s2, l2)?);
        let mut out = vec![0f32; qkv.len()];
        let dst = SharedMut(out.as_mut_ptr());
        a.pairs(d, |pair, start, n, col| {
            // SAFETY: `dims` checked that the sequences are disjoint and within the `t` rows
            // of `qkv` and `out` ([t, 3h]), and that `heads·d = h`; the output gradient was
            // checked to be [t, h]. Each pair reads its own rows of the inputs and writes only
            // columns `col..col + d` of the query, key and value thirds of its own rows of
            // `out`, which no other pair writes.
            unsafe {
                let q = qkv.as_ptr().add(start * 3 * h + col);
                let go = go.as_ptr().add(start * h + col);
                let dq = dst.ptr().add(start * 3 * h + col);
                pair_grad(a, pair, (n, d, h), q, go, dq);
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// One sequence and head's gradient: dV = P'ᵀ·dO, dP = (dO·Vᵀ) ⊙ mask,
/// dS = P ⊙ (dP − rowsum(P ⊙ dP)), dQ = scale·dS·K and dK = scale·dSᵀ·Q, for the `n` rows
/// and `d` columns at `q` (key and value `h` and `2h` further on, rows `3h` apart), `go`
/// (rows `h` apart) and `dq` (laid out as `q`).
///
/// # Safety
/// Those rows and columns are within their buffers, and no other thread reads or writes
/// the ones of `dq`, `dq + h` and `dq + 2h` while this runs.
unsafe fn pair_grad(
    a: &Attention,
    pair: usize,
    (n, d, h): (usize, usize, usize),
    q: *const f32,
    go: *const f32,
    dq: *mut f32,
) {
    let (k, v) = (q.add(h), q.add(2 * h));
    let (dk, dv) = (dq.add(h), dq.add(2 * h));
    let scale = 1.0 / (d as f32).sqrt();
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

/// Self-attention over packed sequences: `qkv` is `[T, 3·hidden]` (query, key, value side
/// by side, heads side by side in each), `seqs` the rows of each sequence; returns
/// `[T, hidden]`. With `dropout = Some((p, seed))` the attention weights are dropped.
pub fn attention(
    qkv: &Tensor,
    seqs: &Seqs,
    heads: usize,
    dropout: Option<(f32, u64)>,
) -> Result<Tensor> {
    check_dropout(dropout)?;
    let op = Attention {
        heads,
        seqs: seqs.clone(),
        dropout: dropout.filter(|&(p, _)| p > 0.0),
    };
    qkv.contiguous()?.apply_op1(op)
}

#[cfg(test)]
mod tests {
    use super::super::testing::{assert_close, randn, rng};
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

    #[test]
    fn matches_padded_attention_forward_and_backward() -> Result<()> {
        let (lens, s, h, heads) = ([9usize, 4, 6], 9, 24, 4);
        let t: usize = lens.iter().sum();
        let seqs: Seqs = Arc::new(vec![(0, 9), (9, 4), (13, 6)]);
        let mut r = rng(12);
        let qkv = Var::from_tensor(&randn(&mut r, 0.0, 1.0, (t, 3 * h)))?;
        let ours = attention(qkv.as_tensor(), &seqs, heads, None)?;
        let theirs = reference(qkv.as_tensor(), &lens, s, heads)?;
        // Outputs are weighted means of values of size ~1 (the exponential is within 2e-7
        // of the true one): 1e-5 absolute and of the value.
        assert_close(&ours, &theirs, 1e-5, 1e-5, "forward")?;
        let g = randn(&mut r, 0.0, 1.0, (t, h));
        let g1 = ours.mul(&g)?.sum_all()?.backward()?;
        let g2 = theirs.mul(&g)?.sum_all()?.backward()?;
        // The gradients sum up to 9 products of size ~1 through the softmax: ten times more.
        let (a, b) = (g1.get(&qkv).unwrap(), g2.get(&qkv).unwrap());
        assert_close(a, b, 1e-4, 1e-4, "gradient")
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

    /// The error of attention over a `[rows, 12]` input with 2 heads and `seqs`.
    fn seq_error(rows: usize, seqs: Vec<(usize, usize)>) -> String {
        let x = randn(&mut rng(13), 0.0, 1.0, (rows, 12));
        attention(&x, &Arc::new(seqs), 2, None)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn sequences_out_of_order_overlapping_or_out_of_bounds_are_errors() {
        let bad = [
            vec![(0, 5), (3, 4)],
            vec![(5, 3), (0, 5)],
            vec![(0, 100), (5, 3)],
            vec![(0, 3), (6, 3)],
            vec![(usize::MAX, 2)],
            vec![(2, usize::MAX)],
        ];
        for seqs in bad {
            let e = seq_error(8, seqs.clone());
            assert!(e.contains("is out of order, overlaps"), "{seqs:?}: {e}");
        }
    }

    #[test]
    fn gaps_and_empty_sequences_are_allowed() -> Result<()> {
        let x = randn(&mut rng(14), 0.0, 1.0, (8, 12));
        let seqs: Seqs = Arc::new(vec![(0, 3), (3, 0), (5, 3)]);
        let y = attention(&x, &seqs, 2, None)?;
        let apart = attention(&x.narrow(0, 5, 3)?, &Arc::new(vec![(0, 3)]), 2, None)?;
        assert_close(
            &y.narrow(0, 5, 3)?,
            &apart,
            1e-6,
            1e-7,
            "a sequence after a gap",
        )?;
        let gap: Vec<Vec<f32>> = y.narrow(0, 3, 2)?.to_vec2()?;
        assert!(
            gap.iter().flatten().all(|&v| v == 0.0),
            "rows in no sequence stay 0"
        );
        Ok(())
    }

    #[test]
    fn shapes_that_do_not_split_into_heads_are_errors() {
        let mut r = rng(15);
        let seqs: Seqs = Arc::new(vec![(0, 4)]);
        for (shape, heads) in [((4, 12), 0), ((4, 12), 3), ((4, 13), 2), ((4, 0), 1)] {
            let x = randn(&mut r, 0.0, 1.0, shape);
            let e = attention(&x, &seqs, heads, None).unwrap_err().to_string();
            assert!(
                e.contains("is not [tokens, 3·hidden]"),
                "{shape:?}/{heads}: {e}"
            );
        }
        let x = randn(&mut r, 0.0, 1.0, (4, 3, 4));
        assert!(attention(&x, &seqs, 1, None).is_err(), "a 3-d input");
    }

    #[test]
    fn dropout_outside_zero_to_one_is_an_error() {
        let x = randn(&mut rng(16), 0.0, 1.0, (4, 12));
        let seqs: Seqs = Arc::new(vec![(0, 4)]);
        for p in [1.0, 1.5, -0.1, f32::NAN] {
            let e = attention(&x, &seqs, 2, Some((p, 1)))
                .unwrap_err()
                .to_string();
            assert!(e.contains("is not in [0, 1)"), "{p}: {e}");
        }
    }

    #[test]
    fn a_gradient_of_another_shape_is_an_error() {
        let mut r = rng(17);
        let (x, g) = (
            randn(&mut r, 0.0, 1.0, (4, 12)),
            randn(&mut r, 0.0, 1.0, (3, 4)),
        );
        let op = AttentionGrad(Attention {
            heads: 2,
            seqs: Arc::new(vec![(0, 4)]),
            dropout: None,
        });
        let e = x.apply_op2_no_bwd(&g, &op).unwrap_err().to_string();
        assert!(e.contains("output gradient [3, 4] is not [4, 4]"), "{e}");
    }
}
