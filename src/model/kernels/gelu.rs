//! The exact (erf) GELU with an analytic backward.

use super::{contiguous, math};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1/√(2π).
const INV_SQRT_2PI: f32 = 0.398_942_3;

struct Gelu;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "gelu-erf"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous(s, l)?;
        let y = math::map(x, |v| 0.5 * v * (1.0 + math::erf(v * FRAC_1_SQRT_2)));
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&g.contiguous()?, &GeluGrad)?))
    }
}

/// `g · GELU'(x)` with GELU'(x) = Φ(x) + x·φ(x).
struct GeluGrad;

impl CustomOp2 for GeluGrad {
    fn name(&self) -> &'static str {
        "gelu-erf-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, g) = (contiguous(s1, l1)?, contiguous(s2, l2)?);
        let d = math::map2(x, g, |v, g| {
            let cdf = 0.5 * (1.0 + math::erf(v * FRAC_1_SQRT_2));
            let pdf = INV_SQRT_2PI * math::exp(-0.5 * v * v);
            g * (cdf + v * pdf)
        });
        Ok((CpuStorage::F32(d), l1.shape().clone()))
    }
}

/// GELU (erf form) of a contiguous `f32` tensor on the CPU.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Gelu)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn matches_candle_forward_and_backward() -> Result<()> {
        let x = Var::from_tensor(&(Tensor::randn(0f32, 2.0, (37, 101), &Device::Cpu)?))?;
        let w = Tensor::randn(0f32, 1.0, (37, 101), &Device::Cpu)?;
        let ours = gelu_erf(x.as_tensor())?;
        let theirs = x.as_tensor().gelu_erf()?;
        let diff = (&ours - &theirs)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-6, "forward differs by {diff}");
        let g1 = ours.mul(&w)?.sum_all()?.backward()?;
        let g2 = theirs.mul(&w)?.sum_all()?.backward()?;
        let (a, b) = (g1.get(&x).unwrap(), g2.get(&x).unwrap());
        let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "gradient differs by {diff}");
        Ok(())
    }
}
