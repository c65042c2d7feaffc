//! The `*ForSequenceClassification` head on the first token, in each family's form:
//! `out(dropout(act(dense(h[:, 0]))))`, with BERT's pooler + tanh, RoBERTa's
//! `classifier.dense` + tanh, DistilBERT's `pre_classifier` + ReLU and DeBERTa's context
//! pooler + `pooler_hidden_act`. `num_labels = 1` means regression.

use super::bert::{Bert, BertConfig, Ctx, Linear};
use super::family::Family;
use super::params::{Init, Params};
use anyhow::{bail, Result};
use candle_core::Tensor;

/// An encoder with a sequence-classification head.
pub struct SeqClassifier {
    /// The encoder.
    pub bert: Bert,
    dense: Linear,
    act: String,
    classifier: Linear,
    /// Output width (1 for regression).
    pub num_labels: usize,
    dropout: f32,
}

/// What one forward pass returns.
pub struct Output {
    /// Logits `[b, num_labels]`.
    pub logits: Tensor,
    /// Pooled first-token embedding `[b, hidden]` (after the head's dense layer).
    pub pooled: Tensor,
    /// The encoder's last hidden state `[b, s, hidden]`.
    pub hidden: Tensor,
}

/// The activation after the head's dense layer.
fn head_activation(c: &BertConfig) -> Result<String> {
    let act = match c.family {
        Family::Bert | Family::Roberta | Family::XlmRoberta => "tanh".to_string(),
        Family::DistilBert => "relu".to_string(),
        Family::DebertaV2 => c
            .extra
            .get("pooler_hidden_act")
            .and_then(|v| v.as_str())
            .unwrap_or("gelu")
            .to_string(),
    };
    if !matches!(act.as_str(), "tanh" | "relu" | "gelu") {
        bail!(
            "config.json: pooler_hidden_act `{act}` is not supported (expected gelu, relu or tanh)"
        );
    }
    Ok(act)
}

impl SeqClassifier {
    /// Builds the model; a missing head is freshly initialised.
    pub fn load(p: &Params, c: &BertConfig, num_labels: usize) -> Result<Self> {
        let bert = Bert::load(p, c)?;
        let h = c.hidden_size;
        let std = c
            .extra
            .get("initializer_range")
            .and_then(|v| v.as_f64())
            .unwrap_or(0.02) as f32;
        let names = c.family.head_names();
        Ok(Self {
            bert,
            dense: Linear::load(p, names.dense, h, h, Init::Normal(std))?,
            act: head_activation(c)?,
            classifier: Linear::load(p, names.out, h, num_labels, Init::Normal(std))?,
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
        let embeds = self.bert.embed_ids(ids, ctx)?;
        self.forward_embeds(&embeds, type_ids, mask, ctx)
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
        let first = hidden.narrow(1, 0, 1)?.squeeze(1)?;
        let dense = self.dense.forward(&first)?;
        let pooled = match self.act.as_str() {
            "tanh" => dense.tanh()?,
            "relu" => dense.relu()?,
            _ => dense.gelu_erf()?,
        };
        let x = ctx.dropout(&pooled, self.dropout)?;
        let logits = self.classifier.forward(&x)?;
        Ok(Output {
            logits,
            pooled,
            hidden,
        })
    }
}
