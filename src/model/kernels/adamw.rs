//! AdamW as one parallel pass per parameter over host buffers: the same update as
//! `candle_nn::AdamW`, without a dozen single-threaded tensor ops (and their allocations)
//! per parameter per step.

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};
use rayon::prelude::*;

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
    /// `params` with their weight decay; moments start at zero.
    pub fn new(params: Vec<(Var, f64)>, beta1: f64, beta2: f64, eps: f64) -> Self {
        let moments = params
            .iter()
            .map(|(v, _)| (vec![0f32; v.elem_count()], vec![0f32; v.elem_count()]))
            .collect();
        Self {
            params: params.into_iter().map(|(v, wd)| (v, wd as f32)).collect(),
            moments,
            step: 0,
            beta1,
            beta2,
            eps,
        }
    }

    /// One update with learning rate `lr`; parameters without a gradient are left alone.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.step += 1;
        let (b1, b2) = (self.beta1 as f32, self.beta2 as f32);
        // 1 − β in f64: in f32, 1 − 0.999 comes out 5e-5 off.
        let (c1, c2) = ((1.0 - self.beta1) as f32, (1.0 - self.beta2) as f32);
        let scale_m = (1.0 / (1.0 - self.beta1.powi(self.step))) as f32;
        let scale_v = (1.0 / (1.0 - self.beta2.powi(self.step))) as f32;
        let (lr, eps) = (lr as f32, self.eps as f32);
        for ((var, wd), (m, v)) in self.params.iter().zip(&mut self.moments) {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let g: Vec<f32> = g.flatten_all()?.to_vec1()?;
            let mut theta: Vec<f32> = var.as_tensor().flatten_all()?.to_vec1()?;
            let decay = 1.0 - lr * wd;
            theta
                .par_chunks_mut(CHUNK)
                .zip(m.par_chunks_mut(CHUNK))
                .zip(v.par_chunks_mut(CHUNK).zip(g.par_chunks(CHUNK)))
                .for_each(|((t, m), (v, g))| {
                    for i in 0..t.len() {
                        m[i] = m[i] * b1 + g[i] * c1;
                        v[i] = v[i] * b2 + g[i] * g[i] * c2;
                        let step = (m[i] * scale_m) / ((v[i] * scale_v).sqrt() + eps);
                        t[i] = t[i] * decay - step * lr;
                    }
                });
            var.set(&Tensor::from_vec(theta, var.shape(), var.device())?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_nn::{Optimizer, ParamsAdamW};

    #[test]
    fn matches_candle_adamw() -> Result<()> {
        let d = Device::Cpu;
        let init = Tensor::randn(0f32, 1.0, (33, 7), &d)?;
        let (a, b) = (Var::from_tensor(&init)?, Var::from_tensor(&init.copy()?)?);
        let mut ours = AdamW::new(vec![(a.clone(), 0.01)], 0.9, 0.999, 1e-8);
        let p = ParamsAdamW {
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        };
        let mut theirs = candle_nn::AdamW::new(vec![b.clone()], p)?;
        let target = Tensor::randn(0f32, 1.0, (33, 7), &d)?;
        for _ in 0..5 {
            let ga = (a.as_tensor() - &target)?.sqr()?.sum_all()?.backward()?;
            let gb = (b.as_tensor() - &target)?.sqr()?.sum_all()?.backward()?;
            ours.step(&ga, 1e-2)?;
            theirs.step(&gb)?;
        }
        let diff = (a.as_tensor() - b.as_tensor())?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(diff < 1e-6, "parameters differ by {diff}");
        Ok(())
    }
}
