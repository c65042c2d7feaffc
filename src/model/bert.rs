//! The encoder in candle, for every supported family (BERT, RoBERTa, XLM-R, DistilBERT,
//! DeBERTa-v2/v3: see [`super::family`]), run from token ids or from input word
//! embeddings, with a LayerNorm and softmax that keep gradients flowing to the embeddings.
//!
//! Weight names follow Hugging Face (`embeddings.word_embeddings.weight`,
//! `encoder.layer.N.attention.self.query.weight`, ...), so loading is a walk over names.

use super::deberta::{self, PosProjections, RelEmbeddings, RelState, Relative};
use super::family::Family;
use super::kernels;
use super::kernels::bf16::PackedWeight;
use super::params::{Init, Params};
use anyhow::{bail, Result};
use candle_core::{DType, Tensor, D};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::sync::{Arc, OnceLock};

/// Hugging Face `config.json` of an encoder, in BERT's key names (DistilBERT's are
/// renamed on reading and back on saving); unknown keys are kept for round-tripping.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BertConfig {
    /// The family `model_type` selects (set by [`BertConfig::parse`]; BERT otherwise).
    #[serde(skip)]
    pub family: Family,
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
    /// Reads a `config.json` text: `model_type` picks the family, whose key names are
    /// mapped to BERT's; the result is validated.
    pub fn parse(text: &str) -> Result<Self> {
        let map: serde_json::Map<String, serde_json::Value> = serde_json::from_str(text)?;
        let model_type = map.get("model_type").and_then(|v| v.as_str());
        let family = Family::from_model_type(model_type)?;
        let mut config: Self =
            serde_json::from_value(serde_json::Value::Object(family.to_bert_keys(map)))?;
        config.family = family;
        config.validate()?;
        Ok(config)
    }

    /// The `config.json` text to save: `model_type` set, in the family's own key names.
    pub fn to_json(&self) -> Result<String> {
        let mut cfg = self.clone();
        cfg.extra
            .insert("model_type".into(), self.family.model_type().into());
        if !self.family.has_own_config_keys() {
            return Ok(serde_json::to_string_pretty(&cfg)?);
        }
        // Through text, so that f32 values keep their short form.
        let map = serde_json::from_str(&serde_json::to_string(&cfg)?)?;
        Ok(serde_json::to_string_pretty(
            &self.family.from_bert_keys(map),
        )?)
    }

    /// The relative-attention settings (DeBERTa with `relative_attention`), else `None`.
    pub fn relative(&self) -> Result<Option<Relative>> {
        match self.family {
            Family::DebertaV2 => Relative::from_config(self),
            _ => Ok(None),
        }
    }

    /// The padding token id (`pad_token_id`; RoBERTa's default 1 when absent).
    pub fn pad_token_id(&self) -> usize {
        let default = if self.family.offsets_positions() {
            1
        } else {
            0
        };
        self.extra
            .get("pad_token_id")
            .and_then(|v| v.as_u64())
            .map_or(default, |v| v as usize)
    }

    /// Under `--portable`, an error for relative attention (DeBERTa), which multiplies with
    /// candle's products, not the portable ones.
    pub fn check_portable(&self) -> Result<()> {
        if crate::device::portable_products() && self.relative()?.is_some() {
            bail!(
                "--portable: DeBERTa's relative attention multiplies with candle's products, \
                 whose bits depend on the CPU; run it without --portable"
            );
        }
        Ok(())
    }

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
        self.relative()?;
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
    /// Word-embedding lookups since the last [`Ctx::take_lookups`], whose gradients reach
    /// the table as rows; `None` unless asked for with [`Ctx::with_table_rows`].
    lookups: Option<kernels::Lookups>,
}

impl Ctx {
    /// Inference: no dropout, fused kernels.
    pub fn eval() -> Self {
        Self {
            train: false,
            grad: false,
            rng: ChaCha8Rng::seed_from_u64(0),
            lookups: None,
        }
    }
    /// Evaluation mode with gradients (for FGSM).
    pub fn eval_grad() -> Self {
        Self {
            train: false,
            grad: true,
            rng: ChaCha8Rng::seed_from_u64(0),
            lookups: None,
        }
    }
    /// Training: seeded dropout and gradients.
    pub fn train(seed: u64) -> Self {
        Self {
            train: true,
            grad: true,
            rng: ChaCha8Rng::seed_from_u64(seed),
            lookups: None,
        }
    }

    /// Records word-embedding lookups (on the CPU kernels) so that the table's gradient is
    /// gathered as rows ([`kernels::Lookups`]) rather than by candle's backward pass: the
    /// optimiser (`train::Optim::backward_step`) takes them from the context.
    pub fn with_table_rows(mut self) -> Self {
        self.lookups = Some(kernels::Lookups::default());
        self
    }

    /// How many word-embedding lookups are recorded (see [`Ctx::with_table_rows`]).
    pub fn recorded_lookups(&self) -> usize {
        self.lookups.as_ref().map_or(0, |l| l.len())
    }

    /// The word-embedding lookups recorded since the last call (none unless
    /// [`Ctx::with_table_rows`]).
    pub fn take_lookups(&mut self) -> kernels::Lookups {
        self.lookups
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
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
        let mask = dropout_mask(&mut self.rng, x.elem_count(), p);
        let m = Tensor::from_vec(mask, x.shape(), x.device())?;
        Ok(x.mul(&m)?)
    }
}

/// `n` inverted-dropout factors (`1/(1-p)` kept, `0` dropped): element `i` is kept when the
/// generator's `i`-th uniform draw (`rng.gen::<f32>()`, 24 bits) is at least `p`. The words
/// are drawn in one block and converted in parallel, with the same bits as drawing one by one.
fn dropout_mask(rng: &mut ChaCha8Rng, n: usize, p: f32) -> Vec<f32> {
    let scale = 1.0 / (1.0 - p);
    let mut words = vec![0u32; n];
    rng.fill(&mut words[..]);
    words
        .par_iter()
        .map(|&w| {
            let uniform = (w >> 8) as f32 * (1.0 / (1u32 << 24) as f32);
            if uniform >= p {
                scale
            } else {
                0.0
            }
        })
        .collect()
}

/// A dense layer with HF weight layout `[out, in]`.
pub struct Linear {
    w: Tensor,
    b: Tensor,
    /// Use the CPU kernel (chosen once, from the device).
    cpu: bool,
    /// Multiply in bf16 (CPU inference under `--dtype bf16`): the weight packed for the
    /// bf16 kernel on first use, so a layer only ever used stacked is never packed.
    bf16: Option<OnceLock<Arc<PackedWeight>>>,
    /// A frozen weight's packing for the portable product (CPU kernels, weights that are
    /// not trained).
    frozen: Option<Arc<kernels::PortablePack>>,
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
        let cpu = kernels::used_on(p.device(), p.dtype());
        let bf16 = (cpu && p.bf16_matmuls()).then(OnceLock::new);
        if bf16.is_some() && !kernels::bf16::available() {
            bail!("{prefix}: bf16 on the CPU needs AVX-512 BF16, which this CPU lacks; load the model in f32");
        }
        let w = p.get(&format!("{prefix}.weight"), &[out_dim, in_dim], init)?;
        Ok(Self {
            frozen: Self::frozen_pack(cpu, &w),
            w,
            b: p.get(&format!("{prefix}.bias"), &[out_dim], bias_init)?,
            cpu,
            bf16,
        })
    }

    /// Where the CPU kernel keeps `w`'s portable packing: only for a weight that is never
    /// trained (not a variable).
    fn frozen_pack(cpu: bool, w: &Tensor) -> Option<Arc<kernels::PortablePack>> {
        (cpu && !w.is_variable()).then(Default::default)
    }

    /// Applies the layer to the last dimension of `x`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let in_dim = *dims.last().expect("rank >= 1");
        let rows = x.elem_count() / in_dim;
        let x = x.reshape((rows, in_dim))?;
        let y = if let Some(packed) = &self.bf16 {
            let packed = match packed.get() {
                Some(p) => p,
                None => {
                    let p = kernels::pack_bf16(&self.w)?;
                    packed.get_or_init(|| p)
                }
            };
            kernels::linear_bf16(&x, &self.w, &self.b, packed)?
        } else if self.cpu {
            kernels::linear(&x, &self.w, &self.b, self.frozen.as_ref())?
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
        let bf16 = parts.iter().all(|l| l.bf16.is_some()).then(OnceLock::new);
        let cpu = parts.iter().all(|l| l.cpu);
        Ok(Self {
            frozen: Self::frozen_pack(cpu, &w),
            w,
            b,
            cpu,
            bf16,
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

/// Word, position and token-type embeddings followed by LayerNorm and dropout. A family
/// without absolute positions (DeBERTa-v3) or token types (DistilBERT, DeBERTa-v3) has no
/// table for them; with one token type (RoBERTa) every token gets it.
pub struct Embeddings {
    word: Tensor,
    /// Gradients of `word` are gathered as rows (CPU kernels, a trainable table).
    word_rows_grad: bool,
    position: Option<Tensor>,
    token_type: Option<Tensor>,
    /// Where the first real token's position counts from: 0, or the padding index + 1
    /// with positions counted over real tokens only (RoBERTa).
    position_offset: Option<usize>,
    norm: LayerNorm,
    dropout: f32,
}

impl Embeddings {
    fn load(p: &Params, c: &BertConfig) -> Result<Self> {
        let h = c.hidden_size;
        let word = p.get(
            "embeddings.word_embeddings.weight",
            &[c.vocab_size, h],
            Init::Required,
        )?;
        let biased = c
            .extra
            .get("position_biased_input")
            .and_then(|v| v.as_bool())
            .unwrap_or(true);
        let position = (c.family != Family::DebertaV2 || biased)
            .then(|| {
                p.get(
                    "embeddings.position_embeddings.weight",
                    &[c.max_position_embeddings, h],
                    Init::Required,
                )
            })
            .transpose()?;
        let token_type = (c.type_vocab_size > 0)
            .then(|| {
                p.get(
                    "embeddings.token_type_embeddings.weight",
                    &[c.type_vocab_size, h],
                    Init::Required,
                )
            })
            .transpose()?;
        Ok(Self {
            word_rows_grad: kernels::used_on(p.device(), p.dtype())
                && kernels::Lookups::applies_to(&word),
            word,
            position,
            token_type,
            position_offset: c.family.offsets_positions().then(|| c.pad_token_id() + 1),
            norm: LayerNorm::load(p, "embeddings.LayerNorm", h, c.layer_norm_eps)?,
            dropout: c.hidden_dropout_prob,
        })
    }

    /// Position ids of a `[b, s]` batch given which tokens are real: the column, or for
    /// RoBERTa the padding index + 1 + the count of real tokens before (the padding index
    /// at padded positions). Fails when one lies past the position table.
    fn position_ids(&self, real: &[bool], s: usize) -> Result<Vec<u32>> {
        let mut out = Vec::with_capacity(real.len());
        for row in real.chunks(s.max(1)) {
            let mut rank = 0;
            for (j, &r) in row.iter().enumerate() {
                out.push(match self.position_offset {
                    None => j,
                    Some(first) if r => {
                        rank += 1;
                        first - 1 + rank
                    }
                    Some(first) => first - 1,
                } as u32);
            }
        }
        if let Some(table) = &self.position {
            let rows = table.dim(0)?;
            if let Some(&p) = out.iter().find(|&&p| p as usize >= rows) {
                bail!(
                    "sequence length {s} needs position {p}, past max_position_embeddings {rows}"
                );
            }
        }
        Ok(out)
    }

    /// Word embeddings `[N, h]` of any `N` tokens, with their type ids and positions `[N]`.
    fn forward(
        &self,
        word_embeds: &Tensor,
        type_ids: &Tensor,
        positions: &[u32],
        ctx: &mut Ctx,
    ) -> Result<Tensor> {
        let mut x = word_embeds.clone();
        if let Some(table) = &self.position {
            let ids = Tensor::new(positions, word_embeds.device())?;
            x = x.add(&table.index_select(&ids, 0)?)?;
        }
        if let Some(table) = &self.token_type {
            let ids = if table.dim(0)? == 1 {
                type_ids.zeros_like()?
            } else {
                type_ids.clone()
            };
            x = x.add(&table.index_select(&ids, 0)?)?;
        }
        let x = self.norm.forward(&x, ctx)?;
        ctx.dropout(&x, self.dropout)
    }
}

struct Layer {
    q: Linear,
    k: Linear,
    v: Linear,
    /// Query, key and value stacked, when the weights are frozen (inference).
    qkv: Option<Linear>,
    /// DeBERTa's position projections, when attention is relative.
    pos: Option<PosProjections>,
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
    /// `[b, s, h]`, with the additive attention mask `[b, 1, 1, s]` (candle's plain ops)
    /// and, for relative attention, its per-forward state.
    Padded(Tensor, Option<(RelState, Relative)>),
    /// `[T, h]`, real tokens only, sequence after sequence (the CPU kernels).
    Packed(kernels::Seqs),
}

impl Layer {
    fn load(p: &Params, c: &BertConfig, i: usize, rel: Option<&Relative>) -> Result<Self> {
        let n = c.family.layer_names();
        let name = |part: &str| format!("{}.{i}.{part}", n.layers);
        let (h, eps) = (c.hidden_size, c.layer_norm_eps);
        let r = Init::Required;
        let [q, k, v] = n.qkv.map(|part| Linear::load(p, &name(part), h, h, r));
        let (q, k, v) = (q?, k?, v?);
        let qkv = if p.is_trainable() {
            None
        } else {
            Some(Linear::stacked(&[&q, &k, &v])?)
        };
        let pos = rel
            .map(|rel| PosProjections::load(p, &name("attention.self"), h, rel))
            .transpose()?;
        Ok(Self {
            q,
            k,
            v,
            qkv,
            pos,
            attn_out: Linear::load(p, &name(n.attn_out), h, h, r)?,
            attn_norm: LayerNorm::load(p, &name(n.attn_norm), h, eps)?,
            inter: Linear::load(p, &name(n.inter), h, c.intermediate_size, r)?,
            out: Linear::load(p, &name(n.out), c.intermediate_size, h, r)?,
            out_norm: LayerNorm::load(p, &name(n.out_norm), h, eps)?,
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
        let (mask, rel) = match tokens {
            Tokens::Packed(seqs) => {
                let dropout = (ctx.train && self.attn_p > 0.0).then(|| (self.attn_p, ctx.seed()));
                return Ok(kernels::attention(
                    &self.qkv(x)?,
                    seqs,
                    self.heads,
                    dropout,
                )?);
            }
            Tokens::Padded(mask, rel) => (mask, rel),
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
        let factor = rel.as_ref().map_or(1, |(_, r)| r.scale_factor());
        let mut scores = (q.matmul(&k.t()?)? * (1.0 / ((d * factor) as f64).sqrt()))?;
        if let (Some((st, r)), Some(own)) = (rel, &self.pos) {
            scores = (scores + deberta::scores(&q, &k, (&self.q, &self.k), own, st, r)?)?;
        }
        let scores = scores.broadcast_add(mask)?;
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

/// The encoder (any supported family).
pub struct Bert {
    embeddings: Embeddings,
    layers: Vec<Layer>,
    /// DeBERTa's relative-position embeddings, when attention is relative.
    relative: Option<RelEmbeddings>,
    /// The configuration it was built from.
    pub config: BertConfig,
}

impl Bert {
    /// Builds the encoder from named parameters.
    pub fn load(p: &Params, c: &BertConfig) -> Result<Self> {
        c.validate()?;
        let embeddings = Embeddings::load(p, c)?;
        c.check_portable()?;
        let rel = c.relative()?;
        let layers = (0..c.num_hidden_layers)
            .map(|i| Layer::load(p, c, i, rel.as_ref()))
            .collect::<Result<Vec<_>>>()?;
        let relative = rel.map(|r| RelEmbeddings::load(p, c, r)).transpose()?;
        Ok(Self {
            embeddings,
            layers,
            relative,
            config: c.clone(),
        })
    }

    /// The word-embedding table `[vocab, hidden]`.
    pub fn word_embeddings(&self) -> &Tensor {
        &self.embeddings.word
    }

    /// Looks up word embeddings `[b, s, hidden]` for ids `[b, s]`, recorded in `ctx` when it
    /// gathers the table's gradient as rows ([`Ctx::with_table_rows`]).
    pub fn embed_ids(&self, ids: &Tensor, ctx: &mut Ctx) -> Result<Tensor> {
        let (b, s) = ids.dims2()?;
        let (table, ids) = (&self.embeddings.word, &ids.flatten_all()?);
        let rows = match &mut ctx.lookups {
            Some(lookups) if ctx.grad && self.embeddings.word_rows_grad => {
                lookups.select(table, ids)?
            }
            _ => table.index_select(ids, 0)?,
        };
        Ok(rows.reshape((b, s, self.config.hidden_size))?)
    }

    /// Runs the encoder from token ids; returns the last hidden state `[b, s, hidden]`.
    pub fn forward_ids(
        &self,
        ids: &Tensor,
        type_ids: &Tensor,
        mask: &Tensor,
        ctx: &mut Ctx,
    ) -> Result<Tensor> {
        self.forward_embeds(&self.embed_ids(ids, ctx)?, type_ids, mask, ctx)
    }

    /// Runs the encoder from input word embeddings `[b, s, hidden]` (positions and token
    /// types are still added inside); `mask` is `[b, s]` with 1 for real tokens. On the
    /// CPU kernels only real tokens are computed (zeros come back at padded positions),
    /// except under relative attention, which runs padded.
    pub fn forward_embeds(
        &self,
        word_embeds: &Tensor,
        type_ids: &Tensor,
        mask: &Tensor,
        ctx: &mut Ctx,
    ) -> Result<Tensor> {
        let (b, s, h) = word_embeds.dims3()?;
        let real: Vec<bool> = mask
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?
            .into_iter()
            .map(|m| m > 0.5)
            .collect();
        let positions = self.embeddings.position_ids(&real, s)?;
        if self.relative.is_none() && self.layers.first().is_some_and(|l| l.cpu) {
            return self.forward_packed(word_embeds, type_ids, &real, &positions, ctx);
        }
        let add = ((mask.to_dtype(DType::F32)? - 1.0)? * 1e9)?
            .to_dtype(word_embeds.dtype())?
            .reshape((b, 1, 1, s))?;
        let rel = match &self.relative {
            Some(r) => Some((r.state(s, ctx)?, r.settings.clone())),
            None => None,
        };
        let tokens = Tokens::Padded(add, rel);
        let x = self.embeddings.forward(
            &word_embeds.reshape((b * s, h))?,
            &type_ids.flatten_all()?,
            &positions,
            ctx,
        )?;
        let mut x = x.reshape((b, s, h))?;
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
        real: &[bool],
        positions: &[u32],
        ctx: &mut Ctx,
    ) -> Result<Tensor> {
        let (b, s, h) = word_embeds.dims3()?;
        let dev = word_embeds.device();
        let (mut rows, mut packed_positions, mut seqs) = (Vec::new(), Vec::new(), Vec::new());
        let mut unpack = vec![u32::MAX; b * s];
        for i in 0..b {
            let start = rows.len();
            for j in (i * s..(i + 1) * s).filter(|&j| real[j]) {
                unpack[j] = rows.len() as u32;
                rows.push(j as u32);
                packed_positions.push(positions[j]);
            }
            seqs.push((start, rows.len() - start));
        }
        let t = rows.len() as u32;
        unpack
            .iter_mut()
            .filter(|u| **u == u32::MAX)
            .for_each(|u| *u = t);
        let rows = Tensor::new(rows, dev)?;
        let mut x = self.embeddings.forward(
            &word_embeds.reshape((b * s, h))?.index_select(&rows, 0)?,
            &type_ids.flatten_all()?.index_select(&rows, 0)?,
            &packed_positions,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropout_mask_draws_what_one_draw_per_element_gives() {
        for (seed, n, p) in [(0, 1000, 0.1f32), (7, 333, 0.5), (9, 65, 0.3)] {
            let mut one_by_one = ChaCha8Rng::seed_from_u64(seed);
            let scale = 1.0 / (1.0 - p);
            let want: Vec<f32> = (0..n)
                .map(|_| {
                    if one_by_one.gen::<f32>() >= p {
                        scale
                    } else {
                        0.0
                    }
                })
                .collect();
            let mut block = ChaCha8Rng::seed_from_u64(seed);
            assert_eq!(dropout_mask(&mut block, n, p), want, "seed {seed}, n {n}");
            assert_eq!(
                block.gen::<u64>(),
                one_by_one.gen::<u64>(),
                "the stream goes on alike"
            );
            assert!(
                want.contains(&0.0) && want.contains(&scale),
                "seed {seed}: {want:?}"
            );
        }
    }
}
