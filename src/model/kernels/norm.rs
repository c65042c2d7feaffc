//! LayerNorm over the last dimension, fused, with an analytic backward.

use super::contiguous;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Rows per parallel task; fixed, so that reductions over rows are deterministic.
const ROWS: usize = 32;

struct LayerNorm {
    eps: f32,
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
        let (x, w, b) = (
            contiguous(sx, lx)?,
            contiguous(sw, lw)?,
            contiguous(sb, lb)?,
        );
        let h = w.len();
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
        let (x, w, g) = (
            contiguous(sx, lx)?,
            contiguous(sw, lw)?,
            contiguous(sg, lg)?,
        );
        let h = w.len();
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

/// LayerNorm of the last dimension of a contiguous `f32` tensor on the CPU.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?
        .apply_op3(w, b, LayerNorm { eps: eps as f32 })
}

#[cfg(test)]
mod tests {
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
        let d = Device::Cpu;
        let x = Var::from_tensor(&(Tensor::randn(0.5f32, 2.0, (3, 45, 24), &d)?))?;
        let w = Var::from_tensor(&Tensor::randn(1f32, 0.3, 24, &d)?)?;
        let b = Var::from_tensor(&Tensor::randn(0f32, 0.3, 24, &d)?)?;
        let r = Tensor::randn(0f32, 1.0, (3, 45, 24), &d)?;
        let ours = layer_norm(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-12)?;
        let theirs = reference(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-12)?;
        let diff = (&ours - &theirs)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "forward differs by {diff}");
        let g1 = ours.mul(&r)?.sum_all()?.backward()?;
        let g2 = theirs.mul(&r)?.sum_all()?.backward()?;
        for v in [&x, &w, &b] {
            let (a, b) = (g1.get(v).unwrap(), g2.get(v).unwrap());
            let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-4, "gradient differs by {diff}");
        }
        Ok(())
    }
}
