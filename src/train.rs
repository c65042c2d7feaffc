//! Shared training machinery for the teacher and the student: padded batches, length
//! bucketing, AdamW with warm-up and linear decay, gradient clipping, losses, prediction.

use crate::config::OptimConfig;
use crate::model::kernels::RowGrad;
use crate::model::{Ctx, Params, SeqClassifier};
use crate::tokenize::Encoded;
use anyhow::Result;
use candle_core::{backprop::GradStore, DType, Device, Tensor, Var, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// A padded batch on a device.
pub struct Batch {
    /// Token ids `[b, s]` (u32).
    pub ids: Tensor,
    /// Token types `[b, s]` (u32).
    pub types: Tensor,
    /// Attention mask `[b, s]` (f32, 1 for real tokens).
    pub mask: Tensor,
    /// Padded length.
    pub seq_len: usize,
    /// Real (unpadded) tokens in the batch.
    pub real_tokens: usize,
}

impl Batch {
    /// Pads the sequences to the longest one (dynamic padding).
    pub fn new(rows: &[(&[u32], &[u8])], pad_id: u32, device: &Device) -> Result<Self> {
        let s = rows.iter().map(|r| r.0.len()).max().unwrap_or(1).max(1);
        let b = rows.len();
        let mut ids = vec![pad_id; b * s];
        let mut types = vec![0u32; b * s];
        let mut mask = vec![0f32; b * s];
        let mut real = 0;
        for (i, (id, ty)) in rows.iter().enumerate() {
            for j in 0..id.len() {
                ids[i * s + j] = id[j];
                types[i * s + j] = ty[j] as u32;
                mask[i * s + j] = 1.0;
            }
            real += id.len();
        }
        Ok(Self {
            ids: Tensor::from_vec(ids, (b, s), device)?,
            types: Tensor::from_vec(types, (b, s), device)?,
            mask: Tensor::from_vec(mask, (b, s), device)?,
            seq_len: s,
            real_tokens: real,
        })
    }

    /// Batch from encoded examples.
    pub fn from_encoded(encs: &[&Encoded], pad_id: u32, device: &Device) -> Result<Self> {
        let rows: Vec<(&[u32], &[u8])> = encs
            .iter()
            .map(|e| (e.ids.as_slice(), e.type_ids.as_slice()))
            .collect();
        Self::new(&rows, pad_id, device)
    }
}

/// Splits `0..lens.len()` into batches of similar length: shuffled (seeded), then sorted
/// by length inside windows of 50 batches, then the batch order shuffled.
pub fn bucketed_batches(lens: &[usize], batch_size: usize, seed: u64) -> Vec<Vec<usize>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut idx: Vec<usize> = (0..lens.len()).collect();
    idx.shuffle(&mut rng);
    let window = batch_size * 50;
    let mut batches = Vec::new();
    for chunk in idx.chunks_mut(window) {
        chunk.sort_by_key(|&i| lens[i]);
        batches.extend(chunk.chunks(batch_size).map(|c| c.to_vec()));
    }
    batches.shuffle(&mut rng);
    batches
}

/// Batches for inference: sorted by length, so padding is minimal; order is restored by index.
pub fn sorted_batches(lens: &[usize], batch_size: usize) -> Vec<Vec<usize>> {
    let mut idx: Vec<usize> = (0..lens.len()).collect();
    idx.sort_by_key(|&i| (lens[i], i));
    idx.chunks(batch_size).map(|c| c.to_vec()).collect()
}

/// The AdamW implementation, chosen once from the device.
enum Update {
    /// The CPU kernel: one parallel pass per parameter.
    Fused(crate::model::kernels::AdamW),
    /// candle's AdamW, one instance per weight-decay group.
    Candle { decay: AdamW, no_decay: AdamW },
}

/// AdamW over two parameter groups (with and without weight decay) plus the schedule.
pub struct Optim {
    update: Update,
    vars: Vec<Var>,
    cfg: OptimConfig,
    total_steps: usize,
    step: usize,
}

impl Optim {
    /// Builds the optimiser over every trainable parameter in `params`.
    pub fn new(params: &Params, cfg: &OptimConfig, total_steps: usize) -> Result<Self> {
        let (mut d, mut nd) = (Vec::new(), Vec::new());
        for (name, _, var) in params.used() {
            if let Some(v) = var {
                if name.ends_with(".bias") || name.contains("LayerNorm") {
                    nd.push(v);
                } else {
                    d.push(v);
                }
            }
        }
        let vars: Vec<Var> = d.iter().chain(nd.iter()).cloned().collect();
        let p = |wd: f64| ParamsAdamW {
            lr: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: wd,
        };
        let update = if crate::model::kernels::used_on(params.device(), params.dtype()) {
            let groups = d.iter().map(|v| (v.clone(), cfg.weight_decay));
            let groups = groups.chain(nd.iter().map(|v| (v.clone(), 0.0))).collect();
            Update::Fused(crate::model::kernels::AdamW::new(groups, 0.9, 0.999, 1e-8)?)
        } else {
            Update::Candle {
                decay: AdamW::new(d, p(cfg.weight_decay))?,
                no_decay: AdamW::new(nd, p(0.0))?,
            }
        };
        Ok(Self {
            update,
            vars,
            cfg: cfg.clone(),
            total_steps: total_steps.max(1),
            step: 0,
        })
    }

    /// Learning rate at the current step (linear warm-up, then linear decay to 0).
    pub fn lr(&self) -> f64 {
        schedule(&self.cfg, self.total_steps, self.step)
    }

    /// Back-propagates `loss`, clips, and applies one update. The word-embedding lookups
    /// recorded in `ctx` give the table its gradient as rows.
    pub fn backward_step(&mut self, loss: &Tensor, ctx: &mut Ctx) -> Result<()> {
        let mut grads = loss.backward()?;
        let mut rows = ctx.take_lookups().row_grads(loss, &mut grads)?;
        if let Update::Candle { .. } = self.update {
            for r in rows.drain(..) {
                grads.insert(r.table(), r.to_dense()?);
            }
        }
        let scale = if self.cfg.max_grad_norm > 0.0 {
            clip_scale(&grads, &rows, &self.vars, self.cfg.max_grad_norm)?
        } else {
            None
        };
        let lr = self.lr();
        match &mut self.update {
            // The kernel scales each gradient as it reads it.
            Update::Fused(a) => a.step_scaled(&grads, &rows, lr, scale.map(|s| s as f32))?,
            Update::Candle { decay, no_decay } => {
                if let Some(s) = scale {
                    scale_grads(&mut grads, &self.vars, s)?;
                }
                decay.set_learning_rate(lr);
                no_decay.set_learning_rate(lr);
                decay.step(&grads)?;
                no_decay.step(&grads)?;
            }
        }
        self.step += 1;
        Ok(())
    }
}

/// Learning rate at `step` of `total_steps`: linear warm-up over the first `warmup_ratio` of
/// the steps, then linear decay to 0.
fn schedule(cfg: &OptimConfig, total_steps: usize, step: usize) -> f64 {
    let warm = (cfg.warmup_ratio * total_steps as f64).round() as usize;
    let s = step as f64;
    if step < warm {
        cfg.lr * (s + 1.0) / warm as f64
    } else {
        cfg.lr * ((total_steps as f64 - s) / (total_steps - warm).max(1) as f64).max(0.0)
    }
}

/// The factor that brings the global L2 norm of the gradients of `vars` down to
/// `max_norm`; `None` when it is within it. A variable with a gradient in `rows` takes it
/// from there.
fn clip_scale(
    grads: &GradStore,
    rows: &[RowGrad],
    vars: &[Var],
    max_norm: f64,
) -> Result<Option<f64>> {
    let mut sq = Vec::new();
    for v in vars {
        if let Some(r) = rows.iter().find(|r| r.is_for(v)) {
            sq.push(r.sum_of_squares()?);
        } else if let Some(g) = grads.get(v.as_tensor()) {
            sq.push(g.sqr()?.sum_all()?);
        }
    }
    if sq.is_empty() {
        return Ok(None);
    }
    let total = Tensor::stack(&sq, 0)?.sum_all()?.to_scalar::<f32>()?.sqrt() as f64;
    Ok((total > max_norm).then(|| max_norm / (total + 1e-6)))
}

/// Multiplies the gradients of `vars` by `scale`.
fn scale_grads(grads: &mut GradStore, vars: &[Var], scale: f64) -> Result<()> {
    for v in vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            let g = (g * scale)?;
            grads.insert(v.as_tensor(), g);
        }
    }
    Ok(())
}

/// Cross-entropy for classification (labels as class indices) or MSE for regression.
pub fn supervised_loss(logits: &Tensor, labels: &[f32], regression: bool) -> Result<Tensor> {
    let dev = logits.device();
    if regression {
        let y = Tensor::from_vec(labels.to_vec(), labels.len(), dev)?;
        let p = logits.squeeze(1)?;
        return Ok((p - y)?.sqr()?.mean_all()?);
    }
    let y = Tensor::from_vec(
        labels.iter().map(|&l| l as u32).collect::<Vec<_>>(),
        labels.len(),
        dev,
    )?;
    Ok(candle_nn::loss::cross_entropy(logits, &y)?)
}

/// `T²·KL(softmax(teacher/T) ‖ softmax(student/T))`, averaged over the batch.
pub fn kd_loss(student: &Tensor, teacher: &Tensor, temperature: f64) -> Result<Tensor> {
    let t = temperature;
    let pt_log = candle_nn::ops::log_softmax(&(teacher / t)?, D::Minus1)?;
    let ps_log = candle_nn::ops::log_softmax(&(student / t)?, D::Minus1)?;
    let kl = (pt_log.exp()? * (pt_log - ps_log)?)?
        .sum(D::Minus1)?
        .mean_all()?;
    Ok((kl * (t * t))?)
}

/// Logits of a classifier for encoded examples, in input order, batched by length.
pub fn predict(
    model: &SeqClassifier,
    encs: &[Encoded],
    pad_id: u32,
    batch_size: usize,
    device: &Device,
) -> Result<Vec<Vec<f32>>> {
    let lens: Vec<usize> = encs.iter().map(|e| e.ids.len()).collect();
    let mut out = vec![Vec::new(); encs.len()];
    for b in sorted_batches(&lens, batch_size) {
        let rows: Vec<&Encoded> = b.iter().map(|&i| &encs[i]).collect();
        let batch = Batch::from_encoded(&rows, pad_id, device)?;
        let logits = model
            .forward_ids(&batch.ids, &batch.types, &batch.mask, &mut Ctx::eval())?
            .logits;
        let v = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        for (i, row) in b.into_iter().zip(v) {
            out[i] = row;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::{clip_scale, kd_loss, scale_grads, schedule};
    use crate::config::OptimConfig;
    use candle_core::{Device, Tensor, Var};

    /// `T²·KL(softmax(t/T) ‖ softmax(s/T))` of one row, in f64.
    fn kl_by_hand(s: &[f64], t: &[f64], temp: f64) -> f64 {
        let soft = |x: &[f64]| {
            let z: f64 = x.iter().map(|v| (v / temp).exp()).sum();
            x.iter().map(|v| (v / temp).exp() / z).collect::<Vec<_>>()
        };
        let (ps, pt) = (soft(s), soft(t));
        temp * temp
            * pt.iter()
                .zip(&ps)
                .map(|(a, b)| a * (a / b).ln())
                .sum::<f64>()
    }

    #[test]
    fn kd_loss_matches_the_formula() {
        let dev = Device::Cpu;
        let s = [[0.0f32, 0.0], [1.0, -2.0]];
        let t = [[3f32.ln(), 0.0], [1.0, -2.0]];
        for temp in [1.0, 2.0] {
            let got = kd_loss(
                &Tensor::new(&s, &dev).unwrap(),
                &Tensor::new(&t, &dev).unwrap(),
                temp,
            )
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
            // The second row agrees with its teacher: the mean is half the first row's KL.
            let want = kl_by_hand(&[0.0, 0.0], &[3f64.ln(), 0.0], temp) / 2.0;
            assert!((got - want).abs() < 1e-6, "T={temp}: {got} vs {want}");
        }
        // By hand at T = 1: 0.75·ln(1.5) + 0.25·ln(0.5), halved.
        assert!((kl_by_hand(&[0.0, 0.0], &[3f64.ln(), 0.0], 1.0) - 0.130812).abs() < 1e-6);
    }

    #[test]
    fn schedule_warms_up_then_decays_linearly() {
        let cfg = OptimConfig {
            lr: 1e-3,
            warmup_ratio: 0.1,
            ..OptimConfig::default()
        };
        let lr = |step| schedule(&cfg, 100, step);
        // 10 warm-up steps: 1/10, 2/10, ... of the peak.
        assert!((lr(0) - 1e-4).abs() < 1e-12);
        assert!((lr(4) - 5e-4).abs() < 1e-12);
        assert!((lr(9) - 1e-3).abs() < 1e-12);
        // Then (100 - step) / 90 of the peak, down to 0.
        assert!((lr(10) - 1e-3).abs() < 1e-12);
        assert!((lr(55) - 5e-4).abs() < 1e-12);
        assert_eq!(lr(100), 0.0);
        assert_eq!(lr(150), 0.0);
        let flat = OptimConfig {
            warmup_ratio: 0.0,
            ..cfg.clone()
        };
        assert!((schedule(&flat, 4, 0) - 1e-3).abs() < 1e-12);
        assert!((schedule(&flat, 4, 3) - 2.5e-4).abs() < 1e-12);
    }

    #[test]
    fn clipping_scales_to_the_global_norm() {
        let clip = |g: &mut candle_core::backprop::GradStore, vars: &[Var], max: f64| {
            if let Some(s) = clip_scale(g, &[], vars, max)? {
                scale_grads(g, vars, s)?;
            }
            anyhow::Ok(())
        };
        let dev = Device::Cpu;
        let a = Var::new(&[1f32, 1.0], &dev).unwrap();
        let b = Var::new(&[1f32], &dev).unwrap();
        // d/da = (3, 0), d/db = (4): global norm 5.
        let loss = |a: &Var, b: &Var| {
            let wa = Tensor::new(&[3f32, 0.0], &dev).unwrap();
            let wb = Tensor::new(&[4f32], &dev).unwrap();
            ((a.as_tensor() * &wa).unwrap().sum_all().unwrap()
                + (b.as_tensor() * &wb).unwrap().sum_all().unwrap())
            .unwrap()
        };
        let vars = [a.clone(), b.clone()];
        let grad = |g: &candle_core::backprop::GradStore, v: &Var| -> Vec<f32> {
            g.get(v.as_tensor()).unwrap().to_vec1().unwrap()
        };
        let mut g = loss(&a, &b).backward().unwrap();
        clip(&mut g, &vars, 10.0).unwrap();
        assert_eq!((grad(&g, &a), grad(&g, &b)), (vec![3.0, 0.0], vec![4.0]));
        let mut g = loss(&a, &b).backward().unwrap();
        clip(&mut g, &vars, 1.0).unwrap();
        let (ga, gb) = (grad(&g, &a), grad(&g, &b));
        assert!((ga[0] - 0.6).abs() < 1e-5 && ga[1] == 0.0 && (gb[0] - 0.8).abs() < 1e-5);
    }
}
