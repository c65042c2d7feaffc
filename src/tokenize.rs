//! Tokenization: the model's `tokenizer.json` (or a WordPiece tokenizer built from
//! `vocab.txt` and `tokenizer_config.json`), longest-first truncation to `max_seq_len`, no
//! fixed padding.

use crate::data::Example;
use anyhow::{anyhow, bail, Context, Result};
use std::path::Path;
use tokenizers::decoders::wordpiece::WordPiece as WordPieceDecoder;
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::processors::bert::BertProcessing;
use tokenizers::{
    AddedToken, Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy,
};

/// The padding tokens of the supported vocabularies, looked up in this order.
const PAD_TOKENS: [&str; 2] = ["[PAD]", "<pad>"];

/// One tokenized example: ids, token types, and whether it was cut to fit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    /// Token ids including `[CLS]`/`[SEP]`.
    pub ids: Vec<u32>,
    /// Segment ids (0 for the first text, 1 for the second).
    pub type_ids: Vec<u8>,
    /// True when longest-first truncation removed tokens.
    pub truncated: bool,
}

/// A model's tokenizer (WordPiece, byte-level BPE or SentencePiece Unigram, as its
/// `tokenizer.json` says) configured for this pipeline.
pub struct TextTokenizer {
    inner: Tokenizer,
    max_seq_len: usize,
    special: Vec<bool>,
    /// Id of the padding token (`[PAD]`, or `<pad>` in BPE and SentencePiece vocabularies).
    pub pad_id: u32,
}

impl TextTokenizer {
    /// Loads `tokenizer.json` from `model_dir`, or builds a WordPiece tokenizer from
    /// `vocab.txt` (lowercasing as `tokenizer_config.json`'s `do_lower_case` says, default
    /// true).
    pub fn load(model_dir: &Path, max_seq_len: usize) -> Result<Self> {
        let file = tokenizer_file(model_dir);
        let mut inner = if file.ends_with("tokenizer.json") {
            Tokenizer::from_file(&file)
                .map_err(|e| anyhow!("{}: cannot load tokenizer: {e}", file.display()))?
        } else if file.is_file() {
            from_vocab(&file, lowercase(model_dir)?)?
        } else {
            bail!(
                "{}: neither tokenizer.json nor vocab.txt found",
                model_dir.display()
            );
        };
        inner.with_padding(None);
        truncate_to(&mut inner, max_seq_len)?;
        let pad_id = PAD_TOKENS
            .iter()
            .find_map(|t| inner.token_to_id(t))
            .ok_or_else(|| {
                anyhow!(
                    "{}: tokenizer has no padding token (expected one of {})",
                    file.display(),
                    PAD_TOKENS.join(", ")
                )
            })?;
        // Special tokens are those the tokenizer flags as special, plus BERT's reserved
        // `[unusedN]` placeholders, which no text produces.
        let n = inner.get_vocab_size(true);
        let mut special = vec![false; n];
        for (i, t) in inner.get_added_tokens_decoder() {
            if t.special && (i as usize) < n {
                special[i as usize] = true;
            }
        }
        for (tok, i) in inner.get_vocab(true) {
            if (i as usize) < n && is_reserved(&tok) {
                special[i as usize] = true;
            }
        }
        Ok(Self {
            inner,
            max_seq_len,
            special,
            pad_id,
        })
    }

    /// Size of the vocabulary (added tokens included).
    pub fn vocab_size(&self) -> usize {
        self.special.len()
    }

    /// The truncation length.
    pub fn max_seq_len(&self) -> usize {
        self.max_seq_len
    }

    /// The same tokenizer, truncating to `max_seq_len` instead.
    pub fn with_max_seq_len(&self, max_seq_len: usize) -> Result<Self> {
        let mut inner = self.inner.clone();
        truncate_to(&mut inner, max_seq_len)?;
        Ok(Self {
            inner,
            max_seq_len,
            special: self.special.clone(),
            pad_id: self.pad_id,
        })
    }

    /// True for the tokenizer's special tokens (`[PAD]`, `[CLS]`, `<s>`, ...) and reserved
    /// placeholders (`[unused7]`), which a projection must never produce.
    pub fn is_special(&self, id: u32) -> bool {
        self.special.get(id as usize).copied().unwrap_or(true)
    }

    /// The tokens [`TextTokenizer::is_special`] holds, in id order.
    pub fn special_tokens(&self) -> Vec<String> {
        (0..self.special.len() as u32)
            .filter(|&i| self.special[i as usize])
            .map(|i| self.token(i))
            .collect()
    }

    /// Encodes examples in parallel (one or two texts each).
    pub fn encode(&self, examples: &[Example]) -> Result<Vec<Encoded>> {
        let encs = if examples.iter().all(|e| e.text_b.is_none()) {
            let inputs: Vec<String> = examples.iter().map(|e| e.text_a.clone()).collect();
            self.inner.encode_batch(inputs, true)
        } else {
            let inputs: Vec<(String, String)> = examples
                .iter()
                .map(|e| (e.text_a.clone(), e.text_b.clone().unwrap_or_default()))
                .collect();
            self.inner.encode_batch(inputs, true)
        }
        .map_err(|e| anyhow!("tokenization failed: {e}"))?;
        Ok(encs
            .into_iter()
            .map(|e| Encoded {
                ids: e.get_ids().to_vec(),
                type_ids: segment_ids(&e),
                truncated: !e.get_overflowing().is_empty(),
            })
            .collect())
    }

    /// Decodes ids to text, dropping special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| anyhow!("decode failed: {e}"))
    }

    /// Decodes a row back into its one or two texts, split on segment ids.
    pub fn decode_segments(
        &self,
        ids: &[u32],
        type_ids: &[u8],
    ) -> Result<(String, Option<String>)> {
        let a: Vec<u32> = ids
            .iter()
            .zip(type_ids)
            .filter(|(_, &t)| t == 0)
            .map(|(&i, _)| i)
            .collect();
        let b: Vec<u32> = ids
            .iter()
            .zip(type_ids)
            .filter(|(_, &t)| t == 1)
            .map(|(&i, _)| i)
            .collect();
        let ta = self.decode(&a)?;
        let tb = if b.is_empty() {
            None
        } else {
            Some(self.decode(&b)?)
        };
        Ok((ta, tb))
    }

    /// The token string of an id.
    pub fn token(&self, id: u32) -> String {
        self.inner
            .id_to_token(id)
            .unwrap_or_else(|| format!("<{id}>"))
    }
}

/// Segment ids of an encoding: its token types, with every token from the second text's
/// first token on in segment 1 even where the tokenizer gives one token type throughout
/// (RoBERTa's and XLM-R's `<s> A </s></s> B </s>`), so that methods and decoding see both
/// texts; a model with one token type reads them all as its only type.
fn segment_ids(e: &tokenizers::Encoding) -> Vec<u8> {
    let mut second = false;
    e.get_type_ids()
        .iter()
        .zip(e.get_sequence_ids())
        .map(|(&t, seq)| {
            second |= seq == Some(1);
            (t as u8).max(second as u8)
        })
        .collect()
}

/// Longest-first truncation to `max_seq_len` tokens, special tokens included.
fn truncate_to(tk: &mut Tokenizer, max_seq_len: usize) -> Result<()> {
    if max_seq_len < 4 {
        bail!("max_seq_len must be at least 4, got {max_seq_len}");
    }
    tk.with_truncation(Some(TruncationParams {
        direction: TruncationDirection::Right,
        max_length: max_seq_len,
        strategy: TruncationStrategy::LongestFirst,
        stride: 0,
    }))
    .map_err(|e| anyhow!("cannot set truncation: {e}"))?;
    Ok(())
}

/// The file that defines a model directory's tokenizer: `tokenizer.json`, else `vocab.txt`
/// (its sha256 identifies the tokenizer in the manifest).
pub fn tokenizer_file(model_dir: &Path) -> std::path::PathBuf {
    let tj = model_dir.join("tokenizer.json");
    if tj.is_file() {
        tj
    } else {
        model_dir.join("vocab.txt")
    }
}

/// BERT's reserved vocabulary slots: `[unused0]`, `[unused1]`, ...
fn is_reserved(tok: &str) -> bool {
    tok.strip_prefix("[unused")
        .and_then(|r| r.strip_suffix(']'))
        .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
}

/// `do_lower_case` from `tokenizer_config.json` in `model_dir` (true when absent, as for
/// uncased BERT checkpoints).
fn lowercase(model_dir: &Path) -> Result<bool> {
    let p = model_dir.join("tokenizer_config.json");
    if !p.exists() {
        return Ok(true);
    }
    let v: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&p).with_context(|| format!("{}: cannot read", p.display()))?,
    )
    .with_context(|| format!("{}: not valid JSON", p.display()))?;
    match v.get("do_lower_case") {
        None => Ok(true),
        Some(b) => b
            .as_bool()
            .with_context(|| format!("{}: `do_lower_case` is not a boolean", p.display())),
    }
}

fn from_vocab(path: &Path, lowercase: bool) -> Result<Tokenizer> {
    let p = path.to_str().context("vocab path is not UTF-8")?;
    let wp = WordPiece::from_file(p)
        .unk_token("[UNK]".into())
        .build()
        .map_err(|e| anyhow!("{}: cannot build WordPiece: {e}", path.display()))?;
    let cls = wp_id(&wp, "[CLS]", path)?;
    let sep = wp_id(&wp, "[SEP]", path)?;
    let mut tk = Tokenizer::new(wp);
    let _ = tk.with_normalizer(Some(BertNormalizer::new(true, true, None, lowercase)));
    tk.with_pre_tokenizer(Some(BertPreTokenizer));
    tk.with_post_processor(Some(BertProcessing::new(
        ("[SEP]".into(), sep),
        ("[CLS]".into(), cls),
    )));
    tk.with_decoder(Some(WordPieceDecoder::default()));
    // Registered as special, so they are known as such and dropped when decoding.
    let specials: Vec<AddedToken> = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        .into_iter()
        .filter(|t| tk.token_to_id(t).is_some())
        .map(|t| AddedToken::from(t, true))
        .collect();
    tk.add_special_tokens(specials)
        .map_err(|e| anyhow!("{}: cannot register special tokens: {e}", path.display()))?;
    Ok(tk)
}

fn wp_id(wp: &WordPiece, tok: &str, path: &Path) -> Result<u32> {
    use tokenizers::Model;
    wp.token_to_id(tok)
        .ok_or_else(|| anyhow!("{}: vocabulary has no `{tok}`", path.display()))
}

#[cfg(test)]
mod tests {
    use super::TextTokenizer;
    use crate::data::Example;
    use std::path::{Path, PathBuf};

    fn model_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("data/models/minilm-l6")
    }

    fn ids(tok: &TextTokenizer, text: &str) -> Vec<u32> {
        let ex = Example {
            idx: 0,
            text_a: text.into(),
            text_b: None,
            label: None,
        };
        tok.encode(&[ex]).unwrap().remove(0).ids
    }

    #[test]
    fn special_tokens_come_from_the_tokenizer_flags() {
        let mut tj: serde_json::Value =
            serde_json::from_slice(&std::fs::read(model_dir().join("tokenizer.json")).unwrap())
                .unwrap();
        let added = tj["added_tokens"].as_array_mut().unwrap();
        // `[MASK]` no longer flagged special; a new `<s>` that is.
        for t in added.iter_mut() {
            if t["content"] == "[MASK]" {
                t["special"] = false.into();
            }
        }
        let mut s = added[0].clone();
        s["id"] = 30522.into();
        s["content"] = "<s>".into();
        added.push(s);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tokenizer.json"), tj.to_string()).unwrap();
        let tok = TextTokenizer::load(dir.path(), 16).unwrap();
        assert!(tok.is_special(30522), "`<s>` is flagged special");
        assert!(!tok.is_special(103), "`[MASK]` is not flagged special");
        assert!(tok.is_special(101) && tok.is_special(0) && tok.is_special(1));
        assert!(!tok.is_special(1037));
    }

    #[test]
    fn vocab_fallback_honours_the_lowercasing_config() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(model_dir().join("vocab.txt"), dir.path().join("vocab.txt")).unwrap();
        let uncased = TextTokenizer::load(dir.path(), 16).unwrap();
        let json = TextTokenizer::load(&model_dir(), 16).unwrap();
        assert_eq!(ids(&uncased, "Hello World"), ids(&json, "Hello World"));
        assert!(uncased.is_special(101) && uncased.is_special(1) && !uncased.is_special(1037));
        assert_eq!(uncased.decode(&ids(&uncased, "Hello")).unwrap(), "hello");
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{"do_lower_case": false}"#,
        )
        .unwrap();
        let cased = TextTokenizer::load(dir.path(), 16).unwrap();
        assert_ne!(ids(&cased, "Hello World"), ids(&uncased, "Hello World"));
        assert_eq!(ids(&cased, "hello world"), ids(&uncased, "hello world"));
    }
}
