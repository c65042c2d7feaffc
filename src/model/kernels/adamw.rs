//! AdamW as one parallel pass per parameter, in place in the parameter's storage: the same
//! update as `candle_nn::AdamW`, without a dozen single-threaded tensor ops (and their
//! allocations) per parameter per step, and without copying parameters or gradients.

use super::sparse_embedding::RowGrad;
use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, InplaceOp1, InplaceOp2, Layout, Result, Var};
use rayon::prelude::*;
use std::cell::RefCell;

/// Elements per parallel task.
const CHUNK: usize = 32 * 1024;

/// AdamW over CPU parameters, each with its own weight decay.
pub struct AdamW {
    params: Vec<(Var, f32)>,
    moments: Vec<(Vec<f32>, Vec<f32>)>,
    step: i32,
    beta1: f64,
    beta2: f64,
    eps: f64,
}

impl AdamW {
    /// `params` with their weight decay; moments start at zero. An error unless both betas
    /// are in `[0, 1)`, `eps` is positive and every weight decay is finite.
    pub fn new(params: Vec<(Var, f64)>, beta1: f64, beta2: f64, eps: f64) -> Result<Self> {
        let betas_ok = (0.0..1.0).contains(&beta1) && (0.0..1.0).contains(&beta2);
        if !(betas_ok && eps.is_finite() && eps > 0.0) {
            candle_core::bail!(
                "AdamW: betas ({beta1}, {beta2}) must be in [0, 1) and eps {eps} positive"
            );
        }
        if let Some((_, wd)) = params.iter().find(|(_, wd)| !wd.is_finite()) {
            candle_core::bail!("AdamW: weight decay {wd} is not finite");
        }
        let moments = params
            .iter()
            .map(|(v, _)| (vec![0f32; v.elem_count()], vec![0f32; v.elem_count()]))
            .collect();
        Ok(Self {
            params: params.into_iter().map(|(v, wd)| (v, wd as f32)).collect(),
            moments,
            step: 0,
            beta1,
            beta2,
            eps,
        })
    }

    /// One update with learning rate `lr`; parameters without a gradient are left alone. An
    /// error, before any parameter changes, for a learning rate that is not finite or a
    /// gradient whose shape is not its parameter's.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.step_scaled(grads, &[], lr, None)
    }

    /// [`AdamW::step`] on the gradients times `grad_scale` (as `g * scale + 0`, the bits of
    /// candle's `g * scale`), without writing the scaled gradients out. A parameter with a
    /// gradient in `rows` takes it from there (zero outside its rows) instead of `grads`.
    pub fn step_scaled(
        &mut self,
        grads: &GradStore,
        rows: &[RowGrad],
        lr: f64,
        grad_scale: Option<f32>,
    ) -> Result<()> {
        if !lr.is_finite() {
            candle_core::bail!("AdamW: learning rate {lr} is not finite");
        }
        for (var, _) in &self.params {
            if let Some(r) = rows.iter().find(|r| r.is_for(var)) {
                if var.dims().len() != 2 || var.dims()[1] != r.width() {
                    candle_core::bail!(
                        "AdamW: row gradient of width {} for a parameter {:?}",
                        r.width(),
                        var.shape()
                    );
                }
                continue;
            }
            match grads.get(var.as_tensor()) {
                Some(g) if g.shape() != var.shape() => candle_core::bail!(
                    "AdamW: gradient {:?} is not the shape of its parameter {:?}",
                    g.shape(),
                    var.shape()
                ),
                _ => {}
            }
        }
        self.step += 1;
        let (b1, b2) = (self.beta1 as f32, self.beta2 as f32);
        // 1 − β in f64: in f32, 1 − 0.999 comes out 5e-5 off.
        let (c1, c2) = ((1.0 - self.beta1) as f32, (1.0 - self.beta2) as f32);
        let scale_m = (1.0 / (1.0 - self.beta1.powi(self.step))) as f32;
        let scale_v = (1.0 / (1.0 - self.beta2.powi(self.step))) as f32;
        let (lr, eps) = (lr as f32, self.eps as f32);
        for ((var, wd), (m, v)) in self.params.iter().zip(&mut self.moments) {
            let k = Coeffs {
                b1,
                b2,
                c1,
                c2,
                scale_m,
                scale_v,
                lr,
                eps,
                decay: 1.0 - lr * wd,
                grad_scale,
            };
            let moments = RefCell::new((m, v));
            if let Some(r) = rows.iter().find(|r| r.is_for(var)) {
                let op = RowsInPlace {
                    k,
                    moments,
                    rows: r,
                };
                var.as_tensor().inplace_op1(&op)?;
            } else if let Some(g) = grads.get(var.as_tensor()) {
                var.as_tensor().inplace_op2(g, &InPlace { k, moments })?;
            }
        }
        Ok(())
    }
}

/// The scalars of one update.
#[derive(Clone, Copy)]
struct Coeffs {
    b1: f32,
    b2: f32,
    c1: f32,
    c2: f32,
    scale_m: f32,
    scale_v: f32,
    lr: f32,
    eps: f32,
    decay: f32,
    grad_scale: Option<f32>,
}

impl Coeffs {
    /// Updates parameters `t` and moments `m`, `v` from gradients `g`, element by element.
    fn apply(&self, t: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32]) {
        match self.grad_scale {
            Some(s) => {
                for i in 0..t.len() {
                    self.one(&mut t[i], &mut m[i], &mut v[i], g[i] * s + 0.0);
                }
            }
            None => {
                for i in 0..t.len() {
                    self.one(&mut t[i], &mut m[i], &mut v[i], g[i]);
                }
            }
        }
    }

    /// The update of one element.
    #[inline(always)]
    fn one(&self, t: &mut f32, m: &mut f32, v: &mut f32, g: f32) {
        *m = *m * self.b1 + g * self.c1;
        *v = *v * self.b2 + g * g * self.c2;
        let step = (*m * self.scale_m) / ((*v * self.scale_v).sqrt() + self.eps);
        *t = *t * self.decay - step * self.lr;
    }
}

/// One parameter's update, applied in place in its storage (read from its gradient's):
/// no copy of either.
struct InPlace<'a> {
    k: Coeffs,
    moments: RefCell<(&'a mut Vec<f32>, &'a mut Vec<f32>)>,
}

impl InplaceOp2 for InPlace<'_> {
    fn name(&self) -> &'static str {
        "adamw"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let (CpuStorage::F32(theta), CpuStorage::F32(g)) = (s1, s2) else {
            candle_core::bail!("AdamW: parameters and gradients must be f32");
        };
        let (Some((t0, t1)), Some((g0, g1))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("AdamW: parameters and gradients must be contiguous");
        };
        let (theta, g) = (&mut theta[t0..t1], &g[g0..g1]);
        let k = self.k;
        let mut moments = self.moments.borrow_mut();
        let (m, v) = &mut *moments;
        theta
            .par_chunks_mut(CHUNK)
            .zip(m.par_chunks_mut(CHUNK))
            .zip(v.par_chunks_mut(CHUNK).zip(g.par_chunks(CHUNK)))
            .for_each(|((t, m), (v, g))| k.apply(t, m, v, g));
        Ok(())
    }
}

/// One table's update from a gradient given as rows, applied in place: every row is
/// updated, a row without gradient as with a zero one (its moments decay, as on the dense
/// gradient).
struct RowsInPlace<'a> {
    k: Coeffs,
    moments: RefCell<(&'a mut Vec<f32>, &'a mut Vec<f32>)>,
    rows: &'a RowGrad,
}

impl InplaceOp1 for RowsInPlace<'_> {
    fn name(&self) -> &'static str {
        "adamw-rows"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> Result<()> {
        let CpuStorage::F32(theta) = s else {
            candle_core::bail!("AdamW: parameters must be f32");
        };
        let Some((t0, t1)) = l.contiguous_offsets() else {
            candle_core::bail!("AdamW: parameters must be contiguous");
        };
        let (theta, k, w) = (&mut theta[t0..t1], self.k, self.rows.width());
        let zero = vec![0f32; w];
        let chunk = (CHUNK / w).max(1) * w;
        let mut moments = self.moments.borrow_mut();
        let (m, v) = &mut *moments;
        theta
            .par_chunks_mut(chunk)
            .zip(m.par_chunks_mut(chunk))
            .zip(v.par_chunks_mut(chunk))
            .enumerate()
            .for_each(|(c, ((t, m), v))| {
                let first = c * chunk / w;
                for (i, ((t, m), v)) in t
                    .chunks_mut(w)
                    .zip(m.chunks_mut(w))
                    .zip(v.chunks_mut(w))
                    .enumerate()
                {
                    k.apply(t, m, v, self.rows.row(first + i).unwrap_or(&zero));
                }
            });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{assert_close, randn, rng};
    use super::*;
    use candle_nn::{Optimizer, ParamsAdamW};

    #[test]
    fn matches_candle_adamw() -> Result<()> {
        let mut r = rng(9);
        let init = randn(&mut r, 0.0, 1.0, (33, 7));
        let (a, b) = (Var::from_tensor(&init)?, Var::from_tensor(&init.copy()?)?);
        let mut ours = AdamW::new(vec![(a.clone(), 0.01)], 0.9, 0.999, 1e-8)?;
        let p = ParamsAdamW {
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        };
        let mut theirs = candle_nn::AdamW::new(vec![b.clone()], p)?;
        // The gradient of Σ θ·G is exactly G: both optimisers see the same gradients, drawn
        // afresh each step, so their rounding differences do not feed back into them.
        for _ in 0..5 {
            let g = randn(&mut r, 0.0, 1.0, (33, 7));
            let ga = a.as_tensor().mul(&g)?.sum_all()?.backward()?;
            let gb = b.as_tensor().mul(&g)?.sum_all()?.backward()?;
            ours.step(&ga, 1e-2)?;
            theirs.step(&gb)?;
        }
        // Each step rounds θ·decay (half an ulp of θ) and a step of at most about lr = 1e-2
        // (to a few ulps of it) differently: after 5 steps, within 1e-6 of |θ| plus 1e-7.
        assert_close(a.as_tensor(), b.as_tensor(), 1e-6, 1e-7, "parameters")
    }

    #[test]
    fn bad_hyperparameters_are_errors() -> Result<()> {
        let v = || Var::from_tensor(&randn(&mut rng(10), 0.0, 1.0, 4));
        for (b1, b2, eps, wd) in [
            (1.0, 0.999, 1e-8, 0.0),
            (0.9, -0.1, 1e-8, 0.0),
            (0.9, 0.999, 0.0, 0.0),
            (f64::NAN, 0.999, 1e-8, 0.0),
            (0.9, 0.999, 1e-8, f64::INFINITY),
        ] {
            let e = AdamW::new(vec![(v()?, wd)], b1, b2, eps).err().unwrap();
            let e = e.to_string();
            assert!(
                e.contains("must be in [0, 1)") || e.contains("is not finite"),
                "{e}"
            );
        }
        Ok(())
    }

    #[test]
    fn a_misshapen_gradient_or_bad_rate_is_an_error_and_changes_nothing() -> Result<()> {
        let mut r = rng(11);
        let (p, q) = (
            randn(&mut r, 0.0, 1.0, (2, 3)),
            randn(&mut r, 0.0, 1.0, (3, 2)),
        );
        let (vp, vq) = (Var::from_tensor(&p)?, Var::from_tensor(&q)?);
        let mut opt = AdamW::new(vec![(vp.clone(), 0.0), (vq.clone(), 0.0)], 0.9, 0.999, 1e-8)?;
        let mut grads = vp.as_tensor().sum_all()?.backward()?;
        let e = opt.step(&grads, f64::NAN).unwrap_err().to_string();
        assert!(e.contains("learning rate NaN is not finite"), "{e}");
        grads.insert(vq.as_tensor(), p.clone());
        let e = opt.step(&grads, 1e-2).unwrap_err().to_string();
        assert!(
            e.contains("gradient [2, 3] is not the shape of its parameter [3, 2]"),
            "{e}"
        );
        assert_eq!(vp.as_tensor().to_vec2::<f32>()?, p.to_vec2::<f32>()?);
        assert_eq!(opt.step, 0);
        Ok(())
    }

    /// The update written out on copies of the buffers, the arithmetic in the same order:
    /// the in-place update gives exactly these bits.
    #[test]
    fn in_place_update_equals_the_update_on_copies() -> Result<()> {
        let mut r = rng(4);
        let init = randn(&mut r, 0.0, 1.0, (70_001,));
        let var = Var::from_tensor(&init)?;
        let mut ours = AdamW::new(vec![(var.clone(), 0.01)], 0.9, 0.999, 1e-8)?;
        let mut theta: Vec<f32> = init.to_vec1()?;
        let (mut m, mut v) = (vec![0f32; theta.len()], vec![0f32; theta.len()]);
        for step in 1..=3 {
            let g = randn(&mut r, 0.0, 1.0, (70_001,));
            let lr = 1e-3 * step as f64;
            ours.step(&var.as_tensor().mul(&g)?.sum_all()?.backward()?, lr)?;
            let gv: Vec<f32> = g.to_vec1()?;
            let (b1, b2) = (0.9f32, 0.999f32);
            let (c1, c2) = ((1.0 - 0.9f64) as f32, (1.0 - 0.999f64) as f32);
            let scale_m = (1.0 / (1.0 - 0.9f64.powi(step))) as f32;
            let scale_v = (1.0 / (1.0 - 0.999f64.powi(step))) as f32;
            let (lr, decay) = (lr as f32, 1.0 - lr as f32 * 0.01f32);
            for i in 0..theta.len() {
                m[i] = m[i] * b1 + gv[i] * c1;
                v[i] = v[i] * b2 + gv[i] * gv[i] * c2;
                let s = (m[i] * scale_m) / ((v[i] * scale_v).sqrt() + 1e-8f32);
                theta[i] = theta[i] * decay - s * lr;
            }
            let got: Vec<f32> = var.as_tensor().to_vec1()?;
            assert!(
                got.iter()
                    .zip(&theta)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "step {step}"
            );
        }
        Ok(())
    }

    /// Scaling the gradients as they are read gives the bits of scaling them first with
    /// candle (`g * scale`, as gradient clipping did) and stepping on the result.
    #[test]
    fn scaled_step_equals_stepping_on_scaled_gradients() -> Result<()> {
        let mut r = rng(6);
        let init = randn(&mut r, 0.0, 1.0, (4099,));
        let (a, b) = (Var::from_tensor(&init)?, Var::from_tensor(&init.copy()?)?);
        let mut fused = AdamW::new(vec![(a.clone(), 0.01)], 0.9, 0.999, 1e-8)?;
        let mut first = AdamW::new(vec![(b.clone(), 0.01)], 0.9, 0.999, 1e-8)?;
        for step in 0..3 {
            let g = randn(&mut r, 0.0, 3.0, (4099,));
            let scale = 0.37 + 0.1 * step as f64;
            let ga = a.as_tensor().mul(&g)?.sum_all()?.backward()?;
            fused.step_scaled(&ga, &[], 1e-2, Some(scale as f32))?;
            let mut gb = b.as_tensor().mul(&g)?.sum_all()?.backward()?;
            let scaled = (gb.get(b.as_tensor()).expect("gradient") * scale)?;
            gb.insert(b.as_tensor(), scaled);
            first.step(&gb, 1e-2)?;
        }
        let (x, y): (Vec<f32>, Vec<f32>) = (a.as_tensor().to_vec1()?, b.as_tensor().to_vec1()?);
        assert!(x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()));
        Ok(())
    }
}
