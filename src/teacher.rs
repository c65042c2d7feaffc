//! The teacher stage: fine-tune a classifier (of any supported family) on a GLUE task,
//! evaluate it, and serve the inference API the augmentation stage uses (logits, pooled
//! embeddings, word embeddings, and gradients of a loss with respect to the input
//! embeddings).

use crate::config::{DevConfig, TeacherTrainConfig};
use crate::data::{label_names_from_metadata, split_files, Example, Part, SplitReader};
use crate::metrics;
use crate::model::checkpoint::save_classifier;
use crate::model::{Checkpoint, Ctx, SeqClassifier};
use crate::task::TaskSpec;
use crate::tokenize::{Encoded, TextTokenizer};
use crate::train::{bucketed_batches, predict, supervised_loss, Batch, Optim};
use crate::util::{atomic_write, derive_seed};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var, D};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Validation metrics plus training figures, written to `metrics.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TeacherMetrics {
    /// Task name.
    pub task: String,
    /// Validation split name to metric values.
    pub validation: BTreeMap<String, BTreeMap<String, f64>>,
    /// Metrics on the dev split carved from train (empty without one): the score to tune
    /// a teacher's recipe on.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub dev: BTreeMap<String, f64>,
    /// Training examples used.
    pub train_examples: usize,
    /// Optimisation steps taken.
    pub steps: usize,
    /// Training wall time in seconds.
    pub train_seconds: f64,
    /// Training throughput.
    pub train_examples_per_second: f64,
    /// Truncation length of the validation inputs.
    #[serde(default = "eval_max_seq_len")]
    pub eval_max_seq_len: usize,
}

/// [`EVAL_MAX_SEQ_LEN`], for metrics written before the length was recorded.
pub fn eval_max_seq_len() -> usize {
    EVAL_MAX_SEQ_LEN
}

/// Reads a split and tokenizes it; unlabelled rows are dropped when `labelled_only`.
pub fn load_encoded(
    glue_dir: &Path,
    task: &'static TaskSpec,
    split: &str,
    tok: &TextTokenizer,
    labelled_only: bool,
) -> Result<(Vec<Example>, Vec<Encoded>)> {
    let mut ex = SplitReader::open(glue_dir, task, split)?.read_all(None)?;
    if labelled_only {
        ex.retain(|e| e.label.is_some());
    }
    let enc = tok.encode(&ex)?;
    Ok((ex, enc))
}

/// Class names for a task: a GLUE config's from the train file's metadata when it has
/// them; a described dataset's as resolved.
pub fn label_names(glue_dir: &Path, task: &TaskSpec) -> Vec<String> {
    if !task.is_glue() {
        return task.label_names.clone();
    }
    split_files(glue_dir, task, &task.train_split)
        .ok()
        .and_then(|f| {
            f.first()
                .and_then(|p| label_names_from_metadata(p).ok().flatten())
        })
        .unwrap_or_else(|| task.label_names.clone())
}

/// Truncation length of every evaluation (teacher and student alike), recorded in their
/// `metrics.json`.
pub const EVAL_MAX_SEQ_LEN: usize = 128;

/// Version of what teacher fine-tuning computes, part of a cached teacher's key. Bump it
/// when a change of the training code or its kernels changes the weights, so that no
/// teacher trained by earlier code is reused.
pub const TRAINING_CODE_VERSION: u32 = 2;

/// Scores a classifier on every validation split of the task, truncating to
/// [`EVAL_MAX_SEQ_LEN`] whatever `tok`'s own length.
pub fn evaluate(
    model: &SeqClassifier,
    tok: &TextTokenizer,
    task: &'static TaskSpec,
    glue_dir: &Path,
    device: &Device,
) -> Result<BTreeMap<String, BTreeMap<String, f64>>> {
    let tok = &tok.with_max_seq_len(EVAL_MAX_SEQ_LEN)?;
    let mut out = BTreeMap::new();
    for split in &task.validation_splits {
        let (ex, enc) = load_encoded(glue_dir, task, split, tok, true)?;
        let logits = predict(model, &enc, tok.pad_id, 64, device)?;
        let gold: Vec<f32> = ex.iter().map(|e| e.label.expect("labelled")).collect();
        out.insert(split.to_string(), metrics::score(task, &logits, &gold));
    }
    Ok(out)
}

/// Scores a classifier on the dev split carved from the train split ([`DevConfig`]),
/// truncating to [`EVAL_MAX_SEQ_LEN`]. The dev examples are read and tokenized once; each
/// call of the returned scorer costs only the forward passes.
pub fn dev_scorer(
    tok: &TextTokenizer,
    task: &'static TaskSpec,
    glue_dir: &Path,
    dev: &DevConfig,
) -> Result<impl Fn(&SeqClassifier, &Device) -> Result<BTreeMap<String, f64>>> {
    let tok = tok.with_max_seq_len(EVAL_MAX_SEQ_LEN)?;
    let mut ex = SplitReader::open_part(glue_dir, task, &task.train_split, dev, Part::Dev)?
        .read_all(None)?;
    ex.retain(|e| e.label.is_some());
    if ex.is_empty() {
        bail!(
            "`{}`: the dev split is empty (dev.fraction = {})",
            task.name,
            dev.fraction
        );
    }
    let enc = tok.encode(&ex)?;
    let gold: Vec<f32> = ex.iter().map(|e| e.label.expect("labelled")).collect();
    let pad = tok.pad_id;
    Ok(move |model: &SeqClassifier, device: &Device| {
        let logits = predict(model, &enc, pad, 64, device)?;
        Ok(metrics::score(task, &logits, &gold))
    })
}

/// Checks that the tokenizer's vocabulary fits the model's embedding table (which may have
/// spare rows past it, as DeBERTa-v3's does; no tokenizer produces them, so a projection
/// leaves them out like special tokens).
pub fn check_vocab(tok: &TextTokenizer, ck: &Checkpoint) -> Result<()> {
    if tok.vocab_size() > ck.config.vocab_size {
        bail!(
            "{}: tokenizer vocabulary has {} tokens but the model's embedding table has only {} rows (tokenizer and model do not match)",
            ck.dir.display(),
            tok.vocab_size(),
            ck.config.vocab_size
        );
    }
    Ok(())
}

/// Fine-tunes `base` on `task` and writes an HF checkpoint plus `metrics.json` to `out`.
pub fn train(
    base: &Path,
    task: &'static TaskSpec,
    glue_dir: &Path,
    out: &Path,
    cfg: &TeacherTrainConfig,
    dev: &DevConfig,
    device: &Device,
) -> Result<TeacherMetrics> {
    let ck = Checkpoint::open(base)?;
    let tok = TextTokenizer::load(base, cfg.max_seq_len)?;
    check_vocab(&tok, &ck)?;
    let ex = training_examples(task, glue_dir, dev, cfg)?;
    let set = TrainingSet {
        enc: tok.encode(&ex)?,
        labels: ex.iter().map(|e| e.label.expect("labelled")).collect(),
        pad_id: tok.pad_id,
        regression: task.is_regression(),
    };
    let per_epoch = ex.len().div_ceil(cfg.optim.batch_size);
    let total = (per_epoch * cfg.epochs.max(1)).min(cfg.max_steps.unwrap_or(usize::MAX));
    let (model, params) = ck.load_classifier(
        device,
        true,
        task.num_labels,
        None,
        derive_seed(cfg.seed, &["teacher-head"]),
    )?;
    let opt = Optim::new(&params, &cfg.optim, total)?;
    let start = Instant::now();
    let (steps, seen) = fine_tune(&model, opt, &set, cfg, total, device)?;
    let secs = start.elapsed().as_secs_f64();
    let validation = evaluate(&model, &tok, task, glue_dir, device)?;
    let dev_metrics = if dev.fraction > 0.0 {
        dev_scorer(&tok, task, glue_dir, dev)?(&model, device)?
    } else {
        BTreeMap::new()
    };
    let names = label_names(glue_dir, task);
    save_classifier(
        out,
        &params,
        &model.bert.config,
        task.num_labels,
        task,
        &names,
        base,
    )?;
    let m = TeacherMetrics {
        task: task.name.clone(),
        validation,
        dev: dev_metrics,
        train_examples: ex.len(),
        steps,
        train_seconds: secs,
        train_examples_per_second: seen as f64 / secs,
        eval_max_seq_len: EVAL_MAX_SEQ_LEN,
    };
    atomic_write(
        &out.join("metrics.json"),
        serde_json::to_string_pretty(&m)?.as_bytes(),
    )?;
    Ok(m)
}

/// The labelled examples of the train part (dev held out), shuffled by the seed and cut to
/// `max_train_examples`; none is an error.
fn training_examples(
    task: &'static TaskSpec,
    glue_dir: &Path,
    dev: &DevConfig,
    cfg: &TeacherTrainConfig,
) -> Result<Vec<Example>> {
    let mut ex = SplitReader::open_part(glue_dir, task, &task.train_split, dev, Part::Train)?
        .read_all(None)?;
    ex.retain(|e| e.label.is_some());
    let mut rng = ChaCha8Rng::seed_from_u64(derive_seed(cfg.seed, &["teacher-subset"]));
    ex.shuffle(&mut rng);
    if let Some(n) = cfg.max_train_examples {
        ex.truncate(n);
    }
    if ex.is_empty() {
        bail!("no labelled training examples for `{}`", task.name);
    }
    Ok(ex)
}

/// The teacher's training rows: tokens, gold labels, the padding id and the loss kind.
struct TrainingSet {
    enc: Vec<Encoded>,
    labels: Vec<f32>,
    pad_id: u32,
    regression: bool,
}

/// `total` optimiser steps over length-bucketed batches, epoch by epoch; returns the steps
/// taken and the examples seen.
fn fine_tune(
    model: &SeqClassifier,
    mut opt: Optim,
    set: &TrainingSet,
    cfg: &TeacherTrainConfig,
    total: usize,
    device: &Device,
) -> Result<(usize, usize)> {
    let lens: Vec<usize> = set.enc.iter().map(|e| e.ids.len()).collect();
    let pb = crate::util::progress(total as u64, "teacher");
    let start = Instant::now();
    let (mut step, mut seen) = (0usize, 0usize);
    let mut ctx = Ctx::train(derive_seed(cfg.seed, &["teacher-dropout"])).with_table_rows();
    'outer: for epoch in 0..cfg.epochs.max(1) {
        let seed = derive_seed(cfg.seed, &["teacher-epoch", &epoch.to_string()]);
        for b in bucketed_batches(&lens, cfg.optim.batch_size, seed) {
            if step >= total {
                break 'outer;
            }
            let rows: Vec<&Encoded> = b.iter().map(|&i| &set.enc[i]).collect();
            let batch = Batch::from_encoded(&rows, set.pad_id, device)?;
            let y: Vec<f32> = b.iter().map(|&i| set.labels[i]).collect();
            let out = model.forward_ids(&batch.ids, &batch.types, &batch.mask, &mut ctx)?;
            let loss = supervised_loss(&out.logits, &y, set.regression)?;
            opt.backward_step(&loss, &mut ctx)?;
            step += 1;
            crate::util::failpoint("teacher-step");
            seen += b.len();
            if step % 10 == 0 || step == total {
                let l = loss.to_scalar::<f32>()?;
                let rate = seen as f64 / start.elapsed().as_secs_f64();
                pb.set_prefix(format!("loss {l:.4} {rate:.1} ex/s"));
                tracing::debug!(step, loss = l, "teacher step");
            }
            pb.inc(1);
        }
    }
    pb.finish_and_clear();
    Ok((step, seen))
}

/// What the gradient of [`Teacher::embedding_grad`] is taken of.
pub enum GradLoss<'a> {
    /// Cross-entropy to gold classes (MSE to scores for regression).
    Labels(&'a [f32]),
    /// KL(target ‖ softmax(logits)) to a given distribution `[b, num_labels]`.
    Distribution(&'a Tensor),
}

/// A fine-tuned classifier used for inference by the augmentation stage.
pub struct Teacher {
    /// The model.
    pub model: SeqClassifier,
    /// Its tokenizer.
    pub tokenizer: TextTokenizer,
    /// The task it was trained for.
    pub task: &'static TaskSpec,
    /// Device it runs on.
    pub device: Device,
    /// Its `--dtype`: f32; bf16 or f16 on CUDA (weights and activations); bf16 on the CPU
    /// (the dense layers' products).
    pub dtype: DType,
    /// Checkpoint directory.
    pub dir: PathBuf,
}

impl Teacher {
    /// Loads a fine-tuned checkpoint for `task` in f32.
    pub fn load(
        dir: &Path,
        task: &'static TaskSpec,
        device: &Device,
        max_seq_len: usize,
    ) -> Result<Self> {
        Self::load_as(dir, task, device, DType::F32, max_seq_len)
    }

    /// Loads a fine-tuned checkpoint for `task` with weights and activations in `dtype`
    /// (see [`crate::precision::resolve`]); logits and gradients come back in f32.
    pub fn load_as(
        dir: &Path,
        task: &'static TaskSpec,
        device: &Device,
        dtype: DType,
        max_seq_len: usize,
    ) -> Result<Self> {
        let ck = Checkpoint::open(dir)?;
        let tokenizer = TextTokenizer::load(dir, max_seq_len)?;
        check_vocab(&tokenizer, &ck)?;
        if ck.num_labels() != Some(task.num_labels) {
            bail!(
                "{}: teacher checkpoint has num_labels {:?}, task `{}` needs {}",
                dir.display(),
                ck.num_labels(),
                task.name,
                task.num_labels
            );
        }
        let model = ck
            .params(device, false, 0)
            .and_then(|p| SeqClassifier::load(&p.with_dtype(dtype), &ck.config, task.num_labels))
            .with_context(|| format!("{}: cannot load teacher", dir.display()))?;
        Ok(Self {
            model,
            tokenizer,
            task,
            device: device.clone(),
            dtype,
            dir: dir.to_path_buf(),
        })
    }

    /// Pads encoded rows into a batch on the teacher's device.
    pub fn batch(&self, rows: &[(&[u32], &[u8])]) -> Result<Batch> {
        Batch::new(rows, self.tokenizer.pad_id, &self.device)
    }

    /// Logits `[b, num_labels]` for token ids.
    pub fn logits(&self, b: &Batch) -> Result<Tensor> {
        Ok(self
            .model
            .forward_ids(&b.ids, &b.types, &b.mask, &mut Ctx::eval())?
            .logits)
    }

    /// Logits for input word embeddings `[b, s, hidden]` (virtual inputs).
    pub fn logits_from_embeds(&self, embeds: &Tensor, b: &Batch) -> Result<Tensor> {
        // The encoder's own dtype (on the CPU f32 even under bf16, whose products alone
        // are in bf16).
        let embeds = embeds.to_dtype(self.model.bert.word_embeddings().dtype())?;
        Ok(self
            .model
            .forward_embeds(&embeds, &b.types, &b.mask, &mut Ctx::eval())?
            .logits)
    }

    /// Pooled `[CLS]` embeddings `[b, hidden]`.
    pub fn pooled(&self, b: &Batch) -> Result<Tensor> {
        Ok(self
            .model
            .forward_ids(&b.ids, &b.types, &b.mask, &mut Ctx::eval())?
            .pooled)
    }

    /// Word embeddings of the batch's tokens `[b, s, hidden]`.
    pub fn word_embeds(&self, b: &Batch) -> Result<Tensor> {
        self.model.bert.embed_ids(&b.ids, &mut Ctx::eval())
    }

    /// The word-embedding table `[vocab, hidden]`.
    pub fn embedding_table(&self) -> &Tensor {
        self.model.bert.word_embeddings()
    }

    /// Gradient of `loss` with respect to the input word embeddings (eval mode);
    /// returns `(embeddings, gradient, logits)`.
    pub fn embedding_grad(&self, b: &Batch, loss: GradLoss) -> Result<(Tensor, Tensor, Tensor)> {
        embedding_grad(&self.model, b, loss, self.task.is_regression())
    }
}

/// Gradient of `loss` with respect to a classifier's input word embeddings, in eval mode
/// (no dropout); returns `(embeddings, gradient, logits)`.
pub fn embedding_grad(
    model: &SeqClassifier,
    b: &Batch,
    loss: GradLoss,
    regression: bool,
) -> Result<(Tensor, Tensor, Tensor)> {
    let emb = model.bert.embed_ids(&b.ids, &mut Ctx::eval())?.detach();
    let var = Var::from_tensor(&emb)?;
    let out = model.forward_embeds(var.as_tensor(), &b.types, &b.mask, &mut Ctx::eval_grad())?;
    // The loss is taken in f32 whatever the model's dtype (a no-op for an f32 model).
    let logits = out.logits.to_dtype(DType::F32)?;
    let l = match loss {
        GradLoss::Labels(y) => supervised_loss(&logits, y, regression)?,
        GradLoss::Distribution(p) => {
            let p = &p.to_dtype(DType::F32)?;
            let ls = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
            (p * (p.clamp(1e-12, 1.0)?.log()? - ls)?)?
                .sum(D::Minus1)?
                .mean_all()?
        }
    };
    let grads = l.backward()?;
    let g = grads
        .get(var.as_tensor())
        .context("no gradient reached the input embeddings")?
        .clone();
    Ok((emb, g, logits.detach()))
}
