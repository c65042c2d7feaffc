//! Model families: what `model_type` in `config.json` selects. Every supported family is a
//! post-LayerNorm transformer encoder; they differ in weight names, how positions enter
//! (absolute, offset past the padding index, or relative in attention), token types and the
//! classification head. This file holds those differences as data.

use anyhow::{bail, Result};
use serde_json::{Map, Value};

/// A supported encoder family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Family {
    /// BERT (and MiniLM and other BERT-shaped checkpoints).
    #[default]
    Bert,
    /// RoBERTa: positions offset past the padding index, one token type.
    Roberta,
    /// XLM-RoBERTa: RoBERTa's architecture with a SentencePiece vocabulary.
    XlmRoberta,
    /// DistilBERT: no token types, its own weight names, a ReLU pre-classifier head.
    DistilBert,
    /// DeBERTa-v2 and -v3: disentangled relative-position attention.
    DebertaV2,
}

/// The `model_type` values augpro loads.
pub const SUPPORTED: &[&str] = &["bert", "roberta", "xlm-roberta", "distilbert", "deberta-v2"];

/// Names of one encoder layer's weights, relative to `<layers>.<i>.`.
pub struct LayerNames {
    /// Prefix of the layer list (`encoder.layer`).
    pub layers: &'static str,
    /// Query, key and value projections.
    pub qkv: [&'static str; 3],
    /// Attention output projection and its LayerNorm.
    pub attn_out: &'static str,
    /// LayerNorm after the attention block.
    pub attn_norm: &'static str,
    /// Feed-forward input projection.
    pub inter: &'static str,
    /// Feed-forward output projection.
    pub out: &'static str,
    /// LayerNorm after the feed-forward block.
    pub out_norm: &'static str,
}

const BERT_LAYER: LayerNames = LayerNames {
    layers: "encoder.layer",
    qkv: [
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
    ],
    attn_out: "attention.output.dense",
    attn_norm: "attention.output.LayerNorm",
    inter: "intermediate.dense",
    out: "output.dense",
    out_norm: "output.LayerNorm",
};

const DISTILBERT_LAYER: LayerNames = LayerNames {
    layers: "transformer.layer",
    qkv: ["attention.q_lin", "attention.k_lin", "attention.v_lin"],
    attn_out: "attention.out_lin",
    attn_norm: "sa_layer_norm",
    inter: "ffn.lin1",
    out: "ffn.lin2",
    out_norm: "output_layer_norm",
};

const DEBERTA_LAYER: LayerNames = LayerNames {
    qkv: [
        "attention.self.query_proj",
        "attention.self.key_proj",
        "attention.self.value_proj",
    ],
    ..BERT_LAYER
};

/// The classification head on the first token: `out(dropout(act(dense(h[:, 0]))))`.
pub struct HeadNames {
    /// The dense layer on the first token's hidden state.
    pub dense: &'static str,
    /// The output layer.
    pub out: &'static str,
    /// Name prefixes of the head's weights that sit outside the encoder in a checkpoint.
    pub top_level: &'static [&'static str],
}

/// DistilBERT's `config.json` keys and the BERT names augpro uses for them.
const DISTILBERT_KEYS: &[(&str, &str)] = &[
    ("dim", "hidden_size"),
    ("n_layers", "num_hidden_layers"),
    ("n_heads", "num_attention_heads"),
    ("hidden_dim", "intermediate_size"),
    ("activation", "hidden_act"),
    ("dropout", "hidden_dropout_prob"),
    ("attention_dropout", "attention_probs_dropout_prob"),
];

impl Family {
    /// The family `model_type` names (BERT when the key is absent, as in older checkpoints);
    /// an unsupported value is an error naming it and the supported ones.
    pub fn from_model_type(model_type: Option<&str>) -> Result<Self> {
        Ok(match model_type {
            None | Some("bert") => Self::Bert,
            Some("roberta") => Self::Roberta,
            Some("xlm-roberta") => Self::XlmRoberta,
            Some("distilbert") => Self::DistilBert,
            Some("deberta-v2") => Self::DebertaV2,
            Some(other) => bail!(
                "model_type `{other}` is not supported (supported: {})",
                SUPPORTED.join(", ")
            ),
        })
    }

    /// The `model_type` written to a saved `config.json`.
    pub fn model_type(self) -> &'static str {
        match self {
            Self::Bert => "bert",
            Self::Roberta => "roberta",
            Self::XlmRoberta => "xlm-roberta",
            Self::DistilBert => "distilbert",
            Self::DebertaV2 => "deberta-v2",
        }
    }

    /// The prefix of the encoder's weights inside a `*ForSequenceClassification` checkpoint.
    pub fn weight_prefix(self) -> &'static str {
        match self {
            Self::Bert => "bert.",
            Self::Roberta | Self::XlmRoberta => "roberta.",
            Self::DistilBert => "distilbert.",
            Self::DebertaV2 => "deberta.",
        }
    }

    /// The transformers class a saved classifier loads as.
    pub fn architecture(self) -> &'static str {
        match self {
            Self::Bert => "BertForSequenceClassification",
            Self::Roberta => "RobertaForSequenceClassification",
            Self::XlmRoberta => "XLMRobertaForSequenceClassification",
            Self::DistilBert => "DistilBertForSequenceClassification",
            Self::DebertaV2 => "DebertaV2ForSequenceClassification",
        }
    }

    /// The names of the encoder layers' weights.
    pub fn layer_names(self) -> &'static LayerNames {
        match self {
            Self::DistilBert => &DISTILBERT_LAYER,
            Self::DebertaV2 => &DEBERTA_LAYER,
            _ => &BERT_LAYER,
        }
    }

    /// The classification head's weight names.
    pub fn head_names(self) -> HeadNames {
        match self {
            Self::Bert => HeadNames {
                dense: "pooler.dense",
                out: "classifier",
                top_level: &["classifier."],
            },
            Self::Roberta | Self::XlmRoberta => HeadNames {
                dense: "classifier.dense",
                out: "classifier.out_proj",
                top_level: &["classifier."],
            },
            Self::DistilBert => HeadNames {
                dense: "pre_classifier",
                out: "classifier",
                top_level: &["pre_classifier.", "classifier."],
            },
            Self::DebertaV2 => HeadNames {
                dense: "pooler.dense",
                out: "classifier",
                top_level: &["pooler.", "classifier."],
            },
        }
    }

    /// True when positions count from the padding index + 1 over real tokens (RoBERTa).
    pub fn offsets_positions(self) -> bool {
        matches!(self, Self::Roberta | Self::XlmRoberta)
    }

    /// True when the family's `config.json` names its keys its own way (DistilBERT).
    pub fn has_own_config_keys(self) -> bool {
        self == Self::DistilBert
    }

    /// A `config.json` object in BERT's key names (DistilBERT's are renamed).
    pub fn to_bert_keys(self, mut map: Map<String, Value>) -> Map<String, Value> {
        if self.has_own_config_keys() {
            rename(&mut map, DISTILBERT_KEYS.iter().map(|&(d, b)| (d, b)));
            map.entry("type_vocab_size").or_insert(0.into());
        }
        map
    }

    /// The inverse of [`Family::to_bert_keys`]: the family's own key names, as saved.
    pub fn from_bert_keys(self, mut map: Map<String, Value>) -> Map<String, Value> {
        if self.has_own_config_keys() {
            rename(&mut map, DISTILBERT_KEYS.iter().map(|&(d, b)| (b, d)));
            map.remove("type_vocab_size");
        }
        map
    }
}

fn rename<'a>(map: &mut Map<String, Value>, pairs: impl Iterator<Item = (&'a str, &'a str)>) {
    for (from, to) in pairs {
        if let Some(v) = map.remove(from) {
            map.insert(to.to_string(), v);
        }
    }
}

/// Maps a checkpoint weight name to its canonical form: the encoder's without the family
/// prefix (`bert.`, `roberta.`, `distilbert.`, `deberta.`), TF-style `gamma`/`beta` renamed.
pub fn canonical_name(name: &str) -> String {
    let n = ["bert.", "roberta.", "distilbert.", "deberta."]
        .iter()
        .find_map(|p| name.strip_prefix(p))
        .unwrap_or(name);
    n.replace("LayerNorm.gamma", "LayerNorm.weight")
        .replace("LayerNorm.beta", "LayerNorm.bias")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unsupported_model_type_names_itself_and_the_supported_ones() {
        let e = Family::from_model_type(Some("gpt2"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`gpt2`"), "{e}");
        for s in SUPPORTED {
            assert!(e.contains(s), "{e} lacks {s}");
            assert_eq!(Family::from_model_type(Some(s)).unwrap().model_type(), *s);
        }
        assert_eq!(Family::from_model_type(None).unwrap(), Family::Bert);
    }

    #[test]
    fn distilbert_keys_round_trip() {
        let m: Map<String, Value> = serde_json::from_str(
            r#"{"dim": 32, "n_layers": 2, "n_heads": 4, "hidden_dim": 37, "activation": "gelu", "vocab_size": 9}"#,
        )
        .unwrap();
        let b = Family::DistilBert.to_bert_keys(m.clone());
        assert_eq!(b["hidden_size"], 32);
        assert_eq!(b["num_hidden_layers"], 2);
        assert_eq!(b["type_vocab_size"], 0);
        assert!(!b.contains_key("dim"));
        assert_eq!(Family::DistilBert.from_bert_keys(b), m);
    }

    #[test]
    fn canonical_names_drop_every_family_prefix() {
        for p in ["bert.", "roberta.", "distilbert.", "deberta.", ""] {
            assert_eq!(
                canonical_name(&format!("{p}embeddings.LayerNorm.gamma")),
                "embeddings.LayerNorm.weight"
            );
        }
    }
}
