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
        if l1.shape() != l2.shape() {
            candle_core::bail!(
                "gelu-erf: gradient {:?} is not the shape of the input {:?}",
                l2.shape(),
                l1.shape()
            );
        }
        let (x, g) = (contiguous(s1, l1)?, contiguous(s2, l2)?);
        let d = math::map2(x, g, |v, g| {
            let cdf = 0.5 * (1.0 + math::erf(v * FRAC_1_SQRT_2));
            let pdf = INV_SQRT_2PI * math::exp(-0.5 * v * v);
            g * (cdf + v * pdf)
        })?;
        Ok((CpuStorage::F32(d), l1.shape().clone()))
    }
}

/// GELU (erf form) of a contiguous `f32` tensor on the CPU.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Gelu)
}

#[cfg(test)]
mod tests {
    use super::super::testing::{assert_close, randn, rng};
    use super::*;
    use candle_core::Var;

    #[test]
    fn matches_candle_forward_and_backward() -> Result<()> {
        let mut r = rng(1);
        let x = Var::from_tensor(&randn(&mut r, 0.0, 2.0, (37, 101)))?;
        let w = randn(&mut r, 0.0, 1.0, (37, 101));
        let ours = gelu_erf(x.as_tensor())?;
        let theirs = x.as_tensor().gelu_erf()?;
        // Each side's 1 + erf(x/√2) is within about 2.5e-7 of the true one (the polynomial
        // or candle's erf, then rounding near ±1), so GELU within 0.5·|x|·2.5e-7 + rounding:
        // 2e-6 absolute covers |x| up to 8 (4σ, where the value itself is about 0), 1e-5 of
        // the value the rounding of both.
        assert_close(&ours, &theirs, 1e-5, 2e-6, "forward")?;
        let g1 = ours.mul(&w)?.sum_all()?.backward()?;
        let g2 = theirs.mul(&w)?.sum_all()?.backward()?;
        // The gradient is w·GELU'(x) with |GELU'| ≤ 1.13 and |w| up to 4: its error scales
        // with |w|, hence a floor four times the forward one.
        assert_close(
            g1.get(&x).unwrap(),
            g2.get(&x).unwrap(),
            1e-5,
            4e-6,
            "gradient",
        )?;
        Ok(())
    }

    #[test]
    fn a_gradient_of_another_shape_is_an_error() -> Result<()> {
        let mut r = rng(2);
        let (x, g) = (
            randn(&mut r, 0.0, 1.0, (3, 4)),
            randn(&mut r, 0.0, 1.0, (4, 3)),
        );
        let e = x.apply_op2_no_bwd(&g, &GeluGrad).unwrap_err().to_string();
        assert!(
            e.contains("gradient [4, 3] is not the shape of the input [3, 4]"),
            "{e}"
        );
        Ok(())
    }
}
