//! `y = x·Wᵀ + b` whose backward computes only the gradients that are tracked: for frozen
//! weights (the teacher under FGSM) that is one GEMM instead of two.

use super::{contiguous, parallelism};
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

struct Linear;

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "linear"
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
        let (n, k) = lx.shape().dims2()?;
        let (m, k2) = lw.shape().dims2()?;
        if k != k2 || b.len() != m {
            candle_core::bail!(
                "linear: x {:?}, w {:?}, b {}",
                lx.shape(),
                lw.shape(),
                b.len()
            );
        }
        let mut y = vec![0f32; n * m];
        y.par_chunks_mut(m.max(1))
            .for_each(|row| row.copy_from_slice(b));
        if n > 0 && m > 0 {
            // SAFETY: the strides describe `y` as [n, m], `x` as [n, k] and `w`ᵀ as [k, m],
            // all within their buffers.
            unsafe {
                gemm::gemm(
                    n,
                    m,
                    k,
                    y.as_mut_ptr(),
                    1,
                    m as isize,
                    true,
                    x.as_ptr(),
                    1,
                    k as isize,
                    w.as_ptr(),
                    k as isize,
                    1,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    parallelism(),
                );
            }
        }
        Ok((CpuStorage::F32(y), Shape::from((n, m))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let gx = x.track_op().then(|| g.matmul(w)).transpose()?;
        let gw = w.track_op().then(|| g.t()?.matmul(x)).transpose()?;
        let gb = b.track_op().then(|| g.sum(0)).transpose()?;
        Ok((gx, gw, gb))
    }
}

/// `x·Wᵀ + b` for `x` of shape `[n, in]`, `W` `[out, in]`, `b` `[out]` (CPU, `f32`).
pub fn linear(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    x.contiguous()?
        .apply_op3(&w.contiguous()?, &b.contiguous()?, Linear)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.max_all()?.to_scalar::<f32>()
    }

    #[test]
    fn matches_candle_forward_and_backward() -> Result<()> {
        let d = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (50, 48), &d)?)?;
        let w = Var::from_tensor(&Tensor::randn(0f32, 0.2, (70, 48), &d)?)?;
        let b = Var::from_tensor(&Tensor::randn(0f32, 0.2, 70, &d)?)?;
        let r = Tensor::randn(0f32, 1.0, (50, 70), &d)?;
        let ours = linear(x.as_tensor(), w.as_tensor(), b.as_tensor())?;
        let theirs = x
            .as_tensor()
            .matmul(&w.as_tensor().t()?)?
            .broadcast_add(b.as_tensor())?;
        assert!(max_diff(&ours, &theirs)? < 1e-5);
        let g1 = ours.mul(&r)?.sum_all()?.backward()?;
        let g2 = theirs.mul(&r)?.sum_all()?.backward()?;
        for v in [&x, &w, &b] {
            let diff = max_diff(g1.get(v).unwrap(), g2.get(v).unwrap())?;
            assert!(diff < 1e-4, "gradient differs by {diff}");
        }
        Ok(())
    }

    #[test]
    fn frozen_weights_get_no_gradient() -> Result<()> {
        let d = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (5, 8), &d)?)?;
        let w = Tensor::randn(0f32, 0.2, (3, 8), &d)?;
        let b = Tensor::zeros(3, candle_core::DType::F32, &d)?;
        let grads = linear(x.as_tensor(), &w, &b)?.sum_all()?.backward()?;
        assert!(grads.get(&w).is_none() && grads.get(&b).is_none());
        let want = w.sum(0)?.unsqueeze(0)?.broadcast_as((5, 8))?;
        assert!(max_diff(grads.get(&x).unwrap(), &want)? < 1e-6);
        Ok(())
    }
}
