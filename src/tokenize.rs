//! Tokenization: the model's `tokenizer.json` (or a WordPiece tokenizer built from
//! `vocab.txt`), longest-first truncation to `max_seq_len`, no fixed padding.

use crate::data::Example;
use anyhow::{anyhow, bail, Context, Result};
use std::path::Path;
use tokenizers::decoders::wordpiece::WordPiece as WordPieceDecoder;
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::processors::bert::BertProcessing;
use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

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

/// A BERT tokenizer configured for this pipeline.
pub struct TextTokenizer {
    inner: Tokenizer,
    max_seq_len: usize,
    special: Vec<bool>,
    /// Id of `[CLS]`.
    pub cls_id: u32,
    /// Id of `[SEP]`.
    pub sep_id: u32,
    /// Id of `[PAD]`.
    pub pad_id: u32,
}

impl TextTokenizer {
    /// Loads `tokenizer.json` from `model_dir`, or builds a WordPiece tokenizer from `vocab.txt`.
    pub fn load(model_dir: &Path, max_seq_len: usize) -> Result<Self> {
        if max_seq_len < 4 {
            bail!("max_seq_len must be at least 4, got {max_seq_len}");
        }
        let tj = model_dir.join("tokenizer.json");
        let vt = model_dir.join("vocab.txt");
        let mut inner = if tj.exists() {
            Tokenizer::from_file(&tj)
                .map_err(|e| anyhow!("{}: cannot load tokenizer: {e}", tj.display()))?
        } else if vt.exists() {
            from_vocab(&vt)?
        } else {
            bail!(
                "{}: neither tokenizer.json nor vocab.txt found",
                model_dir.display()
            );
        };
        inner.with_padding(None);
        inner
            .with_truncation(Some(TruncationParams {
                direction: TruncationDirection::Right,
                max_length: max_seq_len,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }))
            .map_err(|e| anyhow!("cannot set truncation: {e}"))?;
        let id = |t: &str| {
            inner
                .token_to_id(t)
                .ok_or_else(|| anyhow!("{}: tokenizer has no `{t}` token", model_dir.display()))
        };
        let (cls_id, sep_id, pad_id) = (id("[CLS]")?, id("[SEP]")?, id("[PAD]")?);
        let n = inner.get_vocab_size(true);
        let mut special = vec![false; n];
        for (tok, i) in inner.get_vocab(true) {
            if (i as usize) < n && tok.starts_with('[') && tok.ends_with(']') && tok.len() > 2 {
                special[i as usize] = true;
            }
        }
        Ok(Self {
            inner,
            max_seq_len,
            special,
            cls_id,
            sep_id,
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

    /// True for special and reserved tokens (`[PAD]`, `[CLS]`, `[unused7]`, ...), which a
    /// projection must never produce.
    pub fn is_special(&self, id: u32) -> bool {
        self.special.get(id as usize).copied().unwrap_or(true)
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
                type_ids: e.get_type_ids().iter().map(|&t| t as u8).collect(),
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

fn from_vocab(path: &Path) -> Result<Tokenizer> {
    let p = path.to_str().context("vocab path is not UTF-8")?;
    let wp = WordPiece::from_file(p)
        .unk_token("[UNK]".into())
        .build()
        .map_err(|e| anyhow!("{}: cannot build WordPiece: {e}", path.display()))?;
    let cls = wp_id(&wp, "[CLS]", path)?;
    let sep = wp_id(&wp, "[SEP]", path)?;
    let mut tk = Tokenizer::new(wp);
    let _ = tk.with_normalizer(Some(BertNormalizer::new(true, true, None, true)));
    tk.with_pre_tokenizer(Some(BertPreTokenizer));
    tk.with_post_processor(Some(BertProcessing::new(
        ("[SEP]".into(), sep),
        ("[CLS]".into(), cls),
    )));
    tk.with_decoder(Some(WordPieceDecoder::default()));
    Ok(tk)
}

fn wp_id(wp: &WordPiece, tok: &str, path: &Path) -> Result<u32> {
    use tokenizers::Model;
    wp.token_to_id(tok)
        .ok_or_else(|| anyhow!("{}: vocabulary has no `{tok}`", path.display()))
}
