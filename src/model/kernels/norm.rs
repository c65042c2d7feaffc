//! LayerNorm over the last dimension, fused, with an analytic backward.

use super::contiguous;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Rows per parallel task; fixed, so that reductions over rows are deterministic.
const ROWS: usize = 32;

struct LayerNorm {
    eps: f32,
}

/// The width `h` of the normalised rows, after checking that `w` and `b` are `[h]` with
/// `h > 0` and that `x` ends in a dimension of `h`.
fn row_width(x: &Shape, w: &Shape, b: &Shape) -> Result<usize> {
    match (x.dims().last(), w.dims(), b.dims()) {
        (Some(&hx), &[hw], &[hb]) if hx > 0 && hx == hw && hw == hb => Ok(hw),
        _ => candle_core::bail!(
            "layer-norm: input {x:?} must end in the size of the weight {w:?} and bias {b:?}, \
             both one non-empty dimension"
        ),
    }
}

/// Mean and 1/σ of one row.
#[inline]
fn stats(x: &[f32], eps: f32) -> (f32, f32) {
    let h = x.len() as f32;
    let mean = x.iter().sum::<f32>() / h;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / h;
    (mean, 1.0 / (var + eps).sqrt())
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "layer-norm"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let h = row_width(lx.shape(), lw.shape(), lb.shape())?;
        let (x, w, b) = (
            contiguous(sx, lx)?,
            contiguous(sw, lw)?,
            contiguous(sb, lb)?,
        );
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(h * ROWS)
            .zip(x.par_chunks(h * ROWS))
            .for_each(|(ys, xs)| {
                for (y, x) in ys.chunks_exact_mut(h).zip(xs.chunks_exact(h)) {
                    let (mean, rstd) = stats(x, self.eps);
                    for i in 0..h {
                        y[i] = (x[i] - mean) * rstd * w[i] + b[i];
                    }
                }
            });
        Ok((CpuStorage::F32(y), lx.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let all = x.apply_op3_no_bwd(w, &g.contiguous()?, &LayerNormGrad { eps: self.eps })?;
        let h = w.dim(0)?;
        let n = x.elem_count() / h;
        let gx = x
            .track_op()
            .then(|| all.narrow(0, 0, n)?.reshape(x.shape()))
            .transpose()?;
        let gw = w.track_op().then(|| all.get(n)).transpose()?;
        let gb = b.track_op().then(|| all.get(n + 1)).transpose()?;
        Ok((gx, gw, gb))
    }
}

/// `[n + 2, h]`: the input gradient, then the weight and bias gradients.
struct LayerNormGrad {
    eps: f32,
}

impl CustomOp3 for LayerNormGrad {
    fn name(&self) -> &'static str {
        "layer-norm-grad"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
        sg: &CpuStorage,
        lg: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let h = row_width(lx.shape(), lw.shape(), lw.shape())?;
        if lg.shape() != lx.shape() {
            candle_core::bail!(
                "layer-norm: gradient {:?} is not the shape of the input {:?}",
                lg.shape(),
                lx.shape()
            );
        }
        let (x, w, g) = (
            contiguous(sx, lx)?,
            contiguous(sw, lw)?,
            contiguous(sg, lg)?,
        );
        let n = x.len() / h;
        let mut out = vec![0f32; (n + 2) * h];
        let (dx, dwb) = out.split_at_mut(n * h);
        let partial: Vec<Vec<f32>> = dx
            .par_chunks_mut(h * ROWS)
            .zip(x.par_chunks(h * ROWS).zip(g.par_chunks(h * ROWS)))
            .map(|(dxs, (xs, gs))| {
                let mut acc = vec![0f32; 2 * h];
                let mut xhat = vec![0f32; h];
                for ((dx, x), g) in dxs
                    .chunks_exact_mut(h)
                    .zip(xs.chunks_exact(h))
                    .zip(gs.chunks_exact(h))
                {
                    let (mean, rstd) = stats(x, self.eps);
                    let (mut s1, mut s2) = (0f32, 0f32);
                    for i in 0..h {
                        xhat[i] = (x[i] - mean) * rstd;
                        let gw = g[i] * w[i];
                        s1 += gw;
                        s2 += gw * xhat[i];
                        acc[i] += g[i] * xhat[i];
                        acc[h + i] += g[i];
                    }
                    let (m1, m2) = (s1 / h as f32, s2 / h as f32);
                    for i in 0..h {
                        dx[i] = rstd * (g[i] * w[i] - m1 - xhat[i] * m2);
                    }
                }
                acc
            })
            .collect();
        for p in partial {
            for (d, v) in dwb.iter_mut().zip(p) {
                *d += v;
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((n + 2, h))))
    }
}

/// LayerNorm of the last dimension of a contiguous `f32` tensor on the CPU. `w` and `b`
/// are `[h]`, `x` ends in a dimension of `h` and `eps` is finite and not negative; otherwise an
/// error.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    row_width(x.shape(), w.shape(), b.shape())?;
    if !(eps.is_finite() && eps >= 0.0) {
        candle_core::bail!("layer-norm: eps {eps} is not finite and non-negative");
    }
    x.contiguous()?
        .apply_op3(w, b, LayerNorm { eps: eps as f32 })
}

#[cfg(test)]
mod tests {
    use super::super::testing::{assert_close, randn, rng};
    use super::*;
    use candle_core::{Device, Var, D};

    fn reference(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let xn = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
        xn.broadcast_mul(w)?.broadcast_add(b)
    }

    #[test]
    fn matches_composite_ops_forward_and_backward() -> Result<()> {
        let mut r = rng(6);
        let x = Var::from_tensor(&randn(&mut r, 0.5, 2.0, (3, 45, 24)))?;
        let w = Var::from_tensor(&randn(&mut r, 1.0, 0.3, 24))?;
        let b = Var::from_tensor(&randn(&mut r, 0.0, 0.3, 24))?;
        let g = randn(&mut r, 0.0, 1.0, (3, 45, 24));
        let ours = layer_norm(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-12)?;
        let theirs = reference(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-12)?;
        // Outputs are normalised values (|y| up to ~4·w + b): a few ulps of 4 apart.
        assert_close(&ours, &theirs, 1e-5, 1e-5, "forward")?;
        let g1 = ours.mul(&g)?.sum_all()?.backward()?;
        let g2 = theirs.mul(&g)?.sum_all()?.backward()?;
        // The weight and bias gradients sum 135 rows of size ~1, the input gradient
        // differences of size ~1/σ: a floor of 1e-4 for both orders of summation.
        for (v, what) in [(&x, "x"), (&w, "w"), (&b, "b")] {
            let (a, b) = (g1.get(v).unwrap(), g2.get(v).unwrap());
            assert_close(a, b, 1e-4, 1e-4, &format!("gradient of {what}"))?;
        }
        Ok(())
    }

    #[test]
    fn mismatched_shapes_and_bad_eps_are_errors() -> Result<()> {
        let mut r = rng(7);
        let x = randn(&mut r, 0.0, 1.0, (5, 8));
        let (w, b) = (randn(&mut r, 1.0, 0.1, 8), randn(&mut r, 0.0, 0.1, 8));
        let short = randn(&mut r, 0.0, 0.1, 7);
        let empty = Tensor::zeros((5, 0), candle_core::DType::F32, &Device::Cpu)?;
        let none = Tensor::zeros(0, candle_core::DType::F32, &Device::Cpu)?;
        let cases = [
            (&x, &short, &b),
            (&x, &w, &short),
            (&x.t()?, &w, &b),
            (&x, &x, &b),
            (&empty, &none, &none),
        ];
        for (x, w, b) in cases {
            let e = layer_norm(x, w, b, 1e-12).unwrap_err().to_string();
            assert!(e.contains("must end in the size of the weight"), "{e}");
        }
        for eps in [-1.0, f64::NAN, f64::INFINITY] {
            let e = layer_norm(&x, &w, &b, eps).unwrap_err().to_string();
            assert!(e.contains("is not finite and non-negative"), "{e}");
        }
        Ok(())
    }

    #[test]
    fn a_gradient_of_another_shape_is_an_error() -> Result<()> {
        let mut r = rng(8);
        let x = randn(&mut r, 0.0, 1.0, (5, 8));
        let w = randn(&mut r, 1.0, 0.1, 8);
        let g = randn(&mut r, 0.0, 1.0, (4, 8));
        let op = LayerNormGrad { eps: 1e-12 };
        let e = x.apply_op3_no_bwd(&w, &g, &op).unwrap_err().to_string();
        assert!(
            e.contains("gradient [4, 8] is not the shape of the input [5, 8]"),
            "{e}"
        );
        Ok(())
    }
}
