//! A BERT encoder in candle that runs from token ids or from input word embeddings, with a
//! LayerNorm and softmax that keep gradients flowing to the embeddings.
//!
//! Weight names follow Hugging Face (`embeddings.word_embeddings.weight`,
//! `encoder.layer.N.attention.self.query.weight`, ...), so loading is a walk over names.

use super::kernels;
use super::params::{Init, Params};
use anyhow::{bail, Result};
use candle_core::{DType, Tensor, D};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Hugging Face `config.json` of a BERT model; unknown keys are kept for round-tripping.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BertConfig {
    /// Vocabulary size (rows of the word-embedding table).
    pub vocab_size: usize,
    /// Hidden size.
    pub hidden_size: usize,
    /// Number of transformer layers.
    pub num_hidden_layers: usize,
    /// Number of attention heads.
    pub num_attention_heads: usize,
    /// Feed-forward inner size.
    pub intermediate_size: usize,
    /// Activation (`gelu` is the exact erf GELU).
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Dropout on hidden states.
    #[serde(default = "default_dropout")]
    pub hidden_dropout_prob: f32,
    /// Dropout on attention probabilities.
    #[serde(default = "default_dropout")]
    pub attention_probs_dropout_prob: f32,
    /// Number of position embeddings.
    pub max_position_embeddings: usize,
    /// Number of token types.
    #[serde(default = "default_types")]
    pub type_vocab_size: usize,
    /// LayerNorm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// Every other key of the file, preserved on save.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

fn default_act() -> String {
    "gelu".into()
}
fn default_dropout() -> f32 {
    0.1
}
fn default_types() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}

impl BertConfig {
    /// Checks the fields this implementation depends on.
    pub fn validate(&self) -> Result<()> {
        if self.hidden_size == 0
            || self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            bail!(
                "config.json: hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size,
                self.num_attention_heads
            );
        }
        if !matches!(
            self.hidden_act.as_str(),
            "gelu" | "gelu_new" | "relu" | "gelu_pytorch_tanh"
        ) {
            bail!(
                "config.json: hidden_act `{}` is not supported (expected gelu, gelu_new or relu)",
                self.hidden_act
            );
        }
        Ok(())
    }
}

/// Per-call state of a forward pass: training (dropout on) and whether gradients are
/// needed (then composite ops with a backward pass are used instead of fused kernels).
pub struct Ctx {
    /// Dropout active.
    pub train: bool,
    /// Use differentiable ops throughout.
    pub grad: bool,
    rng: ChaCha8Rng,
}

impl Ctx {
    /// Inference: no dropout, fused kernels.
    pub fn eval() -> Self {
        Self {
            train: false,
            grad: false,
            rng: ChaCha8Rng::seed_from_u64(0),
        }
    }
    /// Evaluation mode with gradients (for FGSM).
    pub fn eval_grad() -> Self {
        Self {
            train: false,
            grad: true,
            rng: ChaCha8Rng::seed_from_u64(0),
        }
    }
    /// Training: seeded dropout and gradients.
    pub fn train(seed: u64) -> Self {
        Self {
            train: true,
            grad: true,
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    /// A seed for a kernel's own dropout masks, from the context's seeded generator.
    pub fn seed(&mut self) -> u64 {
        self.rng.gen()
    }

    /// Inverted dropout with a mask from the context's seeded generator.
    pub fn dropout(&mut self, x: &Tensor, p: f32) -> Result<Tensor> {
        if !self.train || p <= 0.0 {
            return Ok(x.clone());
        }
        let n = x.elem_count();
        let scale = 1.0 / (1.0 - p);
        let mask: Vec<f32> = (0..n)
            .map(|_| {
                if self.rng.gen::<f32>() >= p {
                    scale
                } else {
                    0.0
                }
            })
            .collect();
        let m = Tensor::from_vec(mask, x.shape(), x.device())?;
        Ok(x.mul(&m)?)
    }
}

/// A dense layer with HF weight layout `[out, in]`.
pub struct Linear {
    w: Tensor,
    b: Tensor,
    /// Use the CPU kernel (chosen once, from the device).
    cpu: bool,
}

impl Linear {
    /// Loads `<prefix>.weight` and `<prefix>.bias`.
    pub fn load(
        p: &Params,
        prefix: &str,
        in_dim: usize,
        out_dim: usize,
        init: Init,
    ) -> Result<Self> {
        let bias_init = match init {
            Init::Required => Init::Required,
            _ => Init::Zeros,
        };
        Ok(Self {
            w: p.get(&format!("{prefix}.weight"), &[out_dim, in_dim], init)?,
            b: p.get(&format!("{prefix}.bias"), &[out_dim], bias_init)?,
            cpu: kernels::used_on(p.device(), p.dtype()),
        })
    }

    /// Applies the layer to the last dimension of `x`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let in_dim = *dims.last().expect("rank >= 1");
        let rows = x.elem_count() / in_dim;
        let x = x.reshape((rows, in_dim))?;
        let y = if self.cpu {
            kernels::linear(&x, &self.w, &self.b)?
        } else {
            x.matmul(&self.w.t()?)?.broadcast_add(&self.b)?
        };
        let mut out = dims;
        *out.last_mut().expect("rank >= 1") = self.w.dim(0)?;
        Ok(y.reshape(out)?)
    }

    /// One layer computing several layers' outputs side by side (their rows stacked), for
    /// frozen weights: one larger matmul instead of several small ones.
    pub fn stacked(parts: &[&Linear]) -> Result<Self> {
        let w = Tensor::cat(&parts.iter().map(|l| &l.w).collect::<Vec<_>>(), 0)?;
        let b = Tensor::cat(&parts.iter().map(|l| &l.b).collect::<Vec<_>>(), 0)?;
        Ok(Self {
            w,
            b,
            cpu: parts.iter().all(|l| l.cpu),
        })
    }
}

/// LayerNorm with a backward pass when the context needs gradients.
pub struct LayerNorm {
    w: Tensor,
    b: Tensor,
    eps: f64,
    /// Use the CPU kernel (chosen once, from the device).
    cpu: bool,
}

impl LayerNorm {
    /// Loads `<prefix>.weight` and `<prefix>.bias`.
    pub fn load(p: &Params, prefix: &str, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            w: p.get(&format!("{prefix}.weight"), &[dim], Init::Required)?,
            b: p.get(&format!("{prefix}.bias"), &[dim], Init::Required)?,
            eps,
            cpu: kernels::used_on(p.device(), p.dtype()),
        })
    }

    /// Normalises the last dimension.
    pub fn forward(&self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        if self.cpu {
            return Ok(kernels::layer_norm(x, &self.w, &self.b, self.eps)?);
        }
        if !ctx.grad && x.is_contiguous() {
            return Ok(candle_nn::ops::layer_norm(
                x,
                &self.w,
                &self.b,
                self.eps as f32,
            )?);
        }
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let xn = xc.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        Ok(xn.broadcast_mul(&self.w)?.broadcast_add(&self.b)?)
    }
}

fn softmax_last(x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
    if !ctx.grad {
        return Ok(candle_nn::ops::softmax_last_dim(&x.contiguous()?)?);
    }
    // Shift-invariant, so the detached max does not change the gradient.
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    Ok(e.broadcast_div(&s)?)
}

/// Word, position and token-type embeddings followed by LayerNorm and dropout.
pub struct Embeddings {
    word: Tensor,
    position: Tensor,
    token_type: Tensor,
    norm: LayerNorm,
    dropout: f32,
}

impl Embeddings {
    fn load(p: &Params, c: &BertConfig) -> Result<Self> {
        Ok(Self {
            word: p.get(
                "embeddings.word_embeddings.weight",
                &[c.vocab_size, c.hidden_size],
                Init::Required,
            )?,
            position: p.get(
                "embeddings.position_embeddings.weight",
                &[c.max_position_embeddings, c.hidden_size],
                Init::Required,
            )?,
            token_type: p.get(
                "embeddings.token_type_embeddings.weight",
                &[c.type_vocab_size, c.hidden_size],
                Init::Required,
            )?,
            norm: LayerNorm::load(p, "embeddings.LayerNorm", c.hidden_size, c.layer_norm_eps)?,
            dropout: c.hidden_dropout_prob,
        })
    }

    fn check_len(&self, s: usize) -> Result<()> {
        if s > self.position.dim(0)? {
            bail!(
                "sequence length {s} exceeds max_position_embeddings {}",
                self.position.dim(0)?
            );
        }
        Ok(())
    }

    /// Padded: word embeddings `[b, s, h]` and type ids `[b, s]`.
    fn forward(&self, word_embeds: &Tensor, type_ids: &Tensor, ctx: &mut Ctx) -> Result<Tensor> {
        let (b, s, h) = word_embeds.dims3()?;
        self.check_len(s)?;
        let pos = self.position.narrow(0, 0, s)?.unsqueeze(0)?;
        let tt = self
            .token_type
            .index_select(&type_ids.flatten_all()?, 0)?
            .reshape((b, s, h))?;
        self.finish(&word_embeds.broadcast_add(&pos)?.add(&tt)?, ctx)
    }

    /// Packed: word embeddings `[T, h]`, with type ids and positions `[T]`.
    fn forward_packed(
        &self,
        word_embeds: &Tensor,
        type_ids: &Tensor,
        positions: &Tensor,
        ctx: &mut Ctx,
    ) -> Result<Tensor> {
        let pos = self.position.index_select(positions, 0)?;
        let tt = self.token_type.index_select(type_ids, 0)?;
        self.finish(&word_embeds.add(&pos)?.add(&tt)?, ctx)
    }

    fn finish(&self, x: &Tensor, ctx: &mut Ctx) -> Result<Tensor> {
        let x = self.norm.forward(x, ctx)?;
        ctx.dropout(&x, self.dropout)
    }
}

struct Layer {
    q: Linear,
    k: Linear,
    v: Linear,
    /// Query, key and value stacked, when the weights are frozen (inference).
    qkv: Option<Linear>,
    attn_out: Linear,
    attn_norm: LayerNorm,
    inter: Linear,
    out: Linear,
    out_norm: LayerNorm,
    heads: usize,
    act: String,
    hidden_p: f32,
    attn_p: f32,
    /// Use the CPU kernels (chosen once, from the device).
    cpu: bool,
}

/// How a batch's tokens are laid out through the layers.
enum Tokens {
    /// `[b, s, h]`, with the additive attention mask `[b, 1, 1, s]` (candle's plain ops).
    Padded(Tensor),
    /// `[T, h]`, real tokens only, sequence after sequence (the CPU kernels).
    Packed(kernels::Seqs),
}

impl Layer {
    fn load(p: &Params, c: &BertConfig, i: usize) -> Result<Self> {
        let pre = format!("encoder.layer.{i}");
        let h = c.hidden_size;
        let r = Init::Required;
        let q = Linear::load(p, &format!("{pre}.attention.self.query"), h, h, r)?;
        let k = Linear::load(p, &format!("{pre}.attention.self.key"), h, h, r)?;
        let v = Linear::load(p, &format!("{pre}.attention.self.value"), h, h, r)?;
        let qkv = if p.is_trainable() {
            None
        } else {
            Some(Linear::stacked(&[&q, &k, &v])?)
        };
        Ok(Self {
            q,
            k,
            v,
            qkv,
            attn_out: Linear::load(p, &format!("{pre}.attention.output.dense"), h, h, r)?,
            attn_norm: LayerNorm::load(
                p,
                &format!("{pre}.attention.output.LayerNorm"),
                h,
                c.layer_norm_eps,
            )?,
            inter: Linear::load(
                p,
                &format!("{pre}.intermediate.dense"),
                h,
                c.intermediate_size,
                r,
            )?,
            out: Linear::load(p, &format!("{pre}.output.dense"), c.intermediate_size, h, r)?,
            out_norm: LayerNorm::load(p, &format!("{pre}.output.LayerNorm"), h, c.layer_norm_eps)?,
            heads: c.num_attention_heads,
            act: c.hidden_act.clone(),
            hidden_p: c.hidden_dropout_prob,
            attn_p: c.attention_probs_dropout_prob,
            cpu: kernels::used_on(p.device(), p.dtype()),
        })
    }

    /// Query, key and value side by side, `[.., 3h]`, from one stacked layer.
    fn qkv(&self, x: &Tensor) -> Result<Tensor> {
        match &self.qkv {
            Some(qkv) => qkv.forward(x),
            None => Linear::stacked(&[&self.q, &self.k, &self.v])?.forward(x),
        }
    }

    /// Self-attention before the output projection.
    fn attention(&self, x: &Tensor, tokens: &Tokens, ctx: &mut Ctx) -> Result<Tensor> {
        let mask = match tokens {
            Tokens::Packed(seqs) => {
                let dropout = (ctx.train && self.attn_p > 0.0).then(|| (self.attn_p, ctx.seed()));
                return Ok(kernels::attention(
                    &self.qkv(x)?,
                    seqs,
                    self.heads,
                    dropout,
                )?);
            }
            Tokens::Padded(mask) => mask,
        };
        let (b, s, h) = x.dims3()?;
        let d = h / self.heads;
        let split = |t: Tensor| -> Result<Tensor> {
            Ok(t.reshape((b, s, self.heads, d))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let (q, k, v) = match &self.qkv {
            Some(qkv) => {
                let all = qkv.forward(x)?;
                (
                    all.narrow(2, 0, h)?,
                    all.narrow(2, h, h)?,
                    all.narrow(2, 2 * h, h)?,
                )
            }
            None => (self.q.forward(x)?, self.k.forward(x)?, self.v.forward(x)?),
        };
        let (q, k, v) = (split(q)?, split(k)?, split(v)?);
        let scores = (q.matmul(&k.t()?)? * (1.0 / (d as f64).sqrt()))?.broadcast_add(mask)?;
        let probs = softmax_last(&scores, ctx)?;
        let probs = ctx.dropout(&probs, self.attn_p)?;
        Ok(probs
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, s, h))?)
    }

    fn forward(&self, x: &Tensor, tokens: &Tokens, ctx: &mut Ctx) -> Result<Tensor> {
        let ctxv = self.attention(x, tokens, ctx)?;
        let a = ctx.dropout(&self.attn_out.forward(&ctxv)?, self.hidden_p)?;
        let x = self.attn_norm.forward(&(a + x)?, ctx)?;
        let i = self.inter.forward(&x)?;
        let i = match self.act.as_str() {
            "gelu" if self.cpu => kernels::gelu_erf(&i)?,
            "relu" => i.relu()?,
            "gelu_new" | "gelu_pytorch_tanh" => i.gelu()?,
            _ => i.gelu_erf()?,
        };
        let o = ctx.dropout(&self.out.forward(&i)?, self.hidden_p)?;
        self.out_norm.forward(&(o + x)?, ctx)
    }
}

/// The BERT encoder.
pub struct Bert {
    embeddings: Embeddings,
    layers: Vec<Layer>,
    /// The configuration it was built from.
    pub config: BertConfig,
}

impl Bert {
    /// Builds the encoder from named parameters.
    pub fn load(p: &Params, c: &BertConfig) -> Result<Self> {
        c.validate()?;
        let embeddings = Embeddings::load(p, c)?;
        let layers = (0..c.num_hidden_layers)
            .map(|i| Layer::load(p, c, i))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            embeddings,
            layers,
            config: c.clone(),
        })
    }

    /// The word-embedding table `[vocab, hidden]`.
    pub fn word_embeddings(&self) -> &Tensor {
        &self.embeddings.word
    }

    /// Looks up word embeddings `[b, s, hidden]` for ids `[b, s]`.
    pub fn embed_ids(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, s) = ids.dims2()?;
        Ok(self
            .embeddings
            .word
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, s, self.config.hidden_size))?)
    }

    /// Runs the encoder from token ids; returns the last hidden state `[b, s, hidden]`.
    pub fn forward_ids(
        &self,
        ids: &Tensor,
        type_ids: &Tensor,
        mask: &Tensor,
        ctx: &mut Ctx,
    ) -> Result<Tensor> {
        self.forward_embeds(&self.embed_ids(ids)?, type_ids, mask, ctx)
    }

    /// Runs the encoder from input word embeddings `[b, s, hidden]` (positions and token
    /// types are still added inside); `mask` is `[b, s]` with 1 for real tokens.
    pub fn forward_embeds(
        &self,
        word_embeds: &Tensor,
        type_ids: &Tensor,
        mask: &Tensor,
        ctx: &mut Ctx,
    ) -> Result<Tensor> {
        if self.layers.first().is_some_and(|l| l.cpu) {
            return self.forward_packed(word_embeds, type_ids, mask, ctx);
        }
        let (b, s, _) = word_embeds.dims3()?;
        let add = ((mask.to_dtype(DType::F32)? - 1.0)? * 1e9)?
            .to_dtype(word_embeds.dtype())?
            .reshape((b, 1, 1, s))?;
        let tokens = Tokens::Padded(add);
        let mut x = self.embeddings.forward(word_embeds, type_ids, ctx)?;
        for l in &self.layers {
            x = l.forward(&x, &tokens, ctx)?;
        }
        Ok(x)
    }

    /// [`Bert::forward_embeds`] on the real tokens only: they are gathered into `[T, h]`,
    /// run through the layers, and scattered back (zeros at padded positions).
    fn forward_packed(
        &self,
        word_embeds: &Tensor,
        type_ids: &Tensor,
        mask: &Tensor,
        ctx: &mut Ctx,
    ) -> Result<Tensor> {
        let (b, s, h) = word_embeds.dims3()?;
        self.embeddings.check_len(s)?;
        let dev = word_embeds.device();
        let real: Vec<f32> = mask.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let (mut rows, mut positions, mut seqs) = (Vec::new(), Vec::new(), Vec::new());
        let mut unpack = vec![u32::MAX; b * s];
        for i in 0..b {
            let start = rows.len();
            for j in 0..s {
                if real[i * s + j] > 0.5 {
                    unpack[i * s + j] = rows.len() as u32;
                    rows.push((i * s + j) as u32);
                    positions.push(j as u32);
                }
            }
            seqs.push((start, rows.len() - start));
        }
        let t = rows.len() as u32;
        unpack
            .iter_mut()
            .filter(|u| **u == u32::MAX)
            .for_each(|u| *u = t);
        let rows = Tensor::new(rows, dev)?;
        let mut x = self.embeddings.forward_packed(
            &word_embeds.reshape((b * s, h))?.index_select(&rows, 0)?,
            &type_ids.flatten_all()?.index_select(&rows, 0)?,
            &Tensor::new(positions, dev)?,
            ctx,
        )?;
        let tokens = Tokens::Packed(std::sync::Arc::new(seqs));
        for l in &self.layers {
            x = l.forward(&x, &tokens, ctx)?;
        }
        let x = Tensor::cat(&[&x, &Tensor::zeros((1, h), x.dtype(), dev)?], 0)?;
        Ok(x.index_select(&Tensor::new(unpack, dev)?, 0)?
            .reshape((b, s, h))?)
    }
}

/// Mean of the hidden states over real tokens (`mask` = 1).
pub fn mean_pool(hidden: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let m = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
    let s = hidden.broadcast_mul(&m)?.sum(1)?;
    let n = m.sum(1)?;
    Ok(s.broadcast_div(&n)?)
}

/// Re-exported for the benchmarks; the function lives in [`crate::device`].
pub use crate::device::parse_device;
