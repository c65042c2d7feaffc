//! Shared training machinery for the teacher and the student: padded batches, length
//! bucketing, AdamW with warm-up and linear decay, gradient clipping, losses, prediction.

use crate::config::OptimConfig;
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

/// AdamW over two parameter groups (with and without weight decay) plus the schedule.
pub struct Optim {
    decay: AdamW,
    no_decay: AdamW,
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
        Ok(Self {
            decay: AdamW::new(d, p(cfg.weight_decay))?,
            no_decay: AdamW::new(nd, p(0.0))?,
            vars,
            cfg: cfg.clone(),
            total_steps: total_steps.max(1),
            step: 0,
        })
    }

    /// Learning rate at the current step (linear warm-up, then linear decay to 0).
    pub fn lr(&self) -> f64 {
        let warm = (self.cfg.warmup_ratio * self.total_steps as f64).round() as usize;
        let s = self.step as f64;
        if self.step < warm {
            self.cfg.lr * (s + 1.0) / warm as f64
        } else {
            self.cfg.lr
                * ((self.total_steps as f64 - s) / (self.total_steps - warm).max(1) as f64).max(0.0)
        }
    }

    /// Back-propagates `loss`, clips, and applies one update.
    pub fn backward_step(&mut self, loss: &Tensor) -> Result<()> {
        let mut grads = loss.backward()?;
        if self.cfg.max_grad_norm > 0.0 {
            clip(&mut grads, &self.vars, self.cfg.max_grad_norm)?;
        }
        let lr = self.lr();
        self.decay.set_learning_rate(lr);
        self.no_decay.set_learning_rate(lr);
        self.decay.step(&grads)?;
        self.no_decay.step(&grads)?;
        self.step += 1;
        Ok(())
    }
}

fn clip(grads: &mut GradStore, vars: &[Var], max_norm: f64) -> Result<()> {
    let mut sq = Vec::new();
    for v in vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            sq.push(g.sqr()?.sum_all()?);
        }
    }
    if sq.is_empty() {
        return Ok(());
    }
    let total = Tensor::stack(&sq, 0)?.sum_all()?.to_scalar::<f32>()?.sqrt() as f64;
    if total > max_norm {
        let scale = max_norm / (total + 1e-6);
        for v in vars {
            if let Some(g) = grads.get(v.as_tensor()) {
                let g = (g * scale)?;
                grads.insert(v.as_tensor(), g);
            }
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
