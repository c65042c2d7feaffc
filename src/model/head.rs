//! The `BertForSequenceClassification` head: pooler (`pooler.dense` + tanh on `[CLS]`),
//! dropout and `classifier`. `num_labels = 1` means regression.

use super::bert::{Bert, BertConfig, Ctx, Linear};
use super::params::{Init, Params};
use anyhow::Result;
use candle_core::Tensor;

/// A BERT encoder with a sequence-classification head.
pub struct SeqClassifier {
    /// The encoder.
    pub bert: Bert,
    pooler: Linear,
    classifier: Linear,
    /// Output width (1 for regression).
    pub num_labels: usize,
    dropout: f32,
}

/// What one forward pass returns.
pub struct Output {
    /// Logits `[b, num_labels]`.
    pub logits: Tensor,
    /// Pooled `[CLS]` embedding `[b, hidden]`.
    pub pooled: Tensor,
}

impl SeqClassifier {
    /// Builds the model; a missing pooler or classifier is freshly initialised.
    pub fn load(p: &Params, c: &BertConfig, num_labels: usize) -> Result<Self> {
        let bert = Bert::load(p, c)?;
        let h = c.hidden_size;
        let std = c
            .extra
            .get("initializer_range")
            .and_then(|v| v.as_f64())
            .unwrap_or(0.02) as f32;
        let pooler = Linear::load(p, "pooler.dense", h, h, Init::Normal(std))?;
        let classifier = Linear::load(p, "classifier", h, num_labels, Init::Normal(std))?;
        Ok(Self {
            bert,
            pooler,
            classifier,
            num_labels,
            dropout: c.hidden_dropout_prob,
        })
    }

    /// Forward from token ids.
    pub fn forward_ids(
        &self,
        ids: &Tensor,
        type_ids: &Tensor,
        mask: &Tensor,
        ctx: &mut Ctx,
    ) -> Result<Output> {
        self.forward_embeds(&self.bert.embed_ids(ids)?, type_ids, mask, ctx)
    }

    /// Forward from input word embeddings `[b, s, hidden]`.
    pub fn forward_embeds(
        &self,
        embeds: &Tensor,
        type_ids: &Tensor,
        mask: &Tensor,
        ctx: &mut Ctx,
    ) -> Result<Output> {
        let hidden = self.bert.forward_embeds(embeds, type_ids, mask, ctx)?;
        let cls = hidden.narrow(1, 0, 1)?.squeeze(1)?;
        let pooled = self.pooler.forward(&cls)?.tanh()?;
        let x = ctx.dropout(&pooled, self.dropout)?;
        let logits = self.classifier.forward(&x)?;
        Ok(Output { logits, pooled })
    }
}
