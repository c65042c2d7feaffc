//! Hugging Face checkpoint directories: `config.json` + `model.safetensors` + tokenizer.
//! Loads a family's plain encoder or `*ForSequenceClassification` weights (with or without
//! the family prefix, `bert.`, `roberta.`, ...) and saves classifiers that transformers loads
//! as that family's `*ForSequenceClassification`.

use super::bert::BertConfig;
use super::family::Family;
use super::head::SeqClassifier;
use super::params::Params;
use crate::task::TaskSpec;
use crate::util::{atomic_write, sha256_file};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// An opened checkpoint directory.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// The directory.
    pub dir: PathBuf,
    /// Its parsed `config.json`.
    pub config: BertConfig,
}

impl Checkpoint {
    /// Opens a directory, checking that the files a BERT checkpoint needs are there.
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            bail!("{}: model directory not found (run `make setup` for the default model, or pass --model DIR)", dir.display());
        }
        let cfg_path = dir.join("config.json");
        let text = std::fs::read_to_string(&cfg_path).with_context(|| {
            format!(
                "{}: missing or unreadable (expected a Hugging Face config.json)",
                cfg_path.display()
            )
        })?;
        let config = BertConfig::parse(&text)
            .with_context(|| format!("{}: not a supported encoder config", cfg_path.display()))?;
        let st = dir.join("model.safetensors");
        if !st.is_file() {
            bail!(
                "{}: missing (expected model.safetensors weights)",
                st.display()
            );
        }
        if !dir.join("tokenizer.json").is_file() && !dir.join("vocab.txt").is_file() {
            bail!(
                "{}: neither tokenizer.json nor vocab.txt found",
                dir.display()
            );
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
        })
    }

    /// A fingerprint of the word-embedding table: the first 8 coordinates of 64 rows spread
    /// over the vocabulary. A model and its fine-tuned copies share one coordinate system
    /// and give close sketches ([`sketch_difference`]); unrelated tables do not.
    pub fn embedding_sketch(&self) -> Result<Vec<f32>> {
        let path = self.weights_path();
        let tensors = candle_core::safetensors::load(&path, &Device::Cpu)
            .with_context(|| format!("{}: cannot read safetensors", path.display()))?;
        let table = tensors
            .iter()
            .find(|(k, _)| super::params::canonical_name(k) == "embeddings.word_embeddings.weight")
            .map(|(_, t)| t)
            .with_context(|| format!("{}: no word-embedding table", path.display()))?;
        let table = table.to_dtype(candle_core::DType::F32)?;
        let (vocab, hidden) = table.dims2()?;
        let mut out = Vec::with_capacity(64 * 8);
        for i in 0..64 {
            let row = (vocab / 32 + i * (vocab - vocab / 32) / 64).min(vocab - 1);
            let v: Vec<f32> = table.get(row)?.to_vec1()?;
            out.extend_from_slice(&v[..hidden.min(8)]);
        }
        Ok(out)
    }

    /// Path of the weights file.
    pub fn weights_path(&self) -> PathBuf {
        self.dir.join("model.safetensors")
    }

    /// `num_labels` recorded in the config (a saved classifier), if any.
    pub fn num_labels(&self) -> Option<usize> {
        if let Some(n) = self.config.extra.get("num_labels").and_then(|v| v.as_u64()) {
            return Some(n as usize);
        }
        self.config
            .extra
            .get("id2label")
            .and_then(|v| v.as_object())
            .map(|m| m.len())
    }

    /// Loads the weights as named parameters (trainable variables when `trainable`).
    pub fn params(&self, device: &Device, trainable: bool, seed: u64) -> Result<Params> {
        let path = self.weights_path();
        let tensors = candle_core::safetensors::load(&path, &Device::Cpu)
            .with_context(|| format!("{}: cannot read safetensors", path.display()))?;
        Ok(Params::new(
            tensors,
            device,
            trainable,
            seed,
            &path.display().to_string(),
        ))
    }

    /// Loads a sequence classifier with `num_labels` outputs, optionally keeping only the
    /// first `layers` encoder layers (a truncated student).
    pub fn load_classifier(
        &self,
        device: &Device,
        trainable: bool,
        num_labels: usize,
        layers: Option<usize>,
        seed: u64,
    ) -> Result<(SeqClassifier, Params)> {
        let mut cfg = self.config.clone();
        if let Some(k) = layers {
            if k == 0 || k > cfg.num_hidden_layers {
                bail!(
                    "student layers must be in 1..={}, got {k}",
                    cfg.num_hidden_layers
                );
            }
            cfg.num_hidden_layers = k;
        }
        let p = self.params(device, trainable, seed)?;
        if let Some(n) = self.num_labels() {
            if p.contains("classifier.weight") && n != num_labels {
                bail!(
                    "{}: checkpoint has {n} labels, the task needs {num_labels}",
                    self.dir.display()
                );
            }
        }
        let model = SeqClassifier::load(&p, &cfg, num_labels)?;
        Ok((model, p))
    }

    /// sha256 of the weights file.
    pub fn weights_sha256(&self) -> Result<String> {
        sha256_file(&self.weights_path())
    }
}

/// Saves a classifier as a Hugging Face `*ForSequenceClassification` directory of its family:
/// config.json (with `num_labels`, `id2label`, `problem_type`), model.safetensors, and
/// the tokenizer files copied from `tokenizer_src`.
pub fn save_classifier(
    out: &Path,
    params: &Params,
    config: &BertConfig,
    num_labels: usize,
    task: &TaskSpec,
    label_names: &[String],
    tokenizer_src: &Path,
) -> Result<()> {
    std::fs::create_dir_all(out)
        .with_context(|| format!("{}: cannot create directory", out.display()))?;
    let cfg = classifier_config(config, num_labels, task, label_names);
    let tensors = hf_tensors(params, config.family)?;
    // candle writes by path: it rewrites the temporary's file, which commit then fsyncs and renames.
    let weights = crate::util::AtomicFile::create(&out.join("model.safetensors"))?;
    candle_core::safetensors::save(&tensors, weights.temp_path())
        .with_context(|| format!("{}: cannot write weights", weights.temp_path().display()))?;
    weights.commit()?;
    atomic_write(&out.join("config.json"), cfg.to_json()?.as_bytes())?;
    for f in [
        "tokenizer.json",
        "vocab.txt",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        let src = tokenizer_src.join(f);
        if src.is_file() && src.canonicalize().ok() != out.join(f).canonicalize().ok() {
            atomic_write(&out.join(f), &std::fs::read(&src)?)?;
        }
    }
    Ok(())
}

/// The config of a saved classifier: the base's, with its architecture, labels, problem
/// type and task.
fn classifier_config(
    config: &BertConfig,
    num_labels: usize,
    task: &TaskSpec,
    label_names: &[String],
) -> BertConfig {
    let mut cfg = config.clone();
    let names: Vec<String> = if task.is_regression() {
        vec!["LABEL_0".into()]
    } else if label_names.len() == num_labels {
        label_names.to_vec()
    } else {
        (0..num_labels).map(|i| format!("LABEL_{i}")).collect()
    };
    let id2label: serde_json::Map<_, _> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (i.to_string(), serde_json::Value::from(n.clone())))
        .collect();
    let label2id: serde_json::Map<_, _> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.clone(), serde_json::Value::from(i)))
        .collect();
    let family = config.family;
    cfg.extra.insert(
        "architectures".into(),
        serde_json::json!([family.architecture()]),
    );
    cfg.extra.insert("num_labels".into(), num_labels.into());
    cfg.extra.insert("id2label".into(), id2label.into());
    cfg.extra.insert("label2id".into(), label2id.into());
    cfg.extra.insert(
        "problem_type".into(),
        (if task.is_regression() {
            "regression"
        } else {
            "single_label_classification"
        })
        .into(),
    );
    cfg.extra
        .insert("finetuning_task".into(), task.name.clone().into());
    cfg
}

/// The parameters in use, on the CPU, under their Hugging Face names.
fn hf_tensors(params: &Params, family: Family) -> Result<HashMap<String, Tensor>> {
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let top_level = family.head_names().top_level;
    for (name, t, var) in params.used() {
        let t = match var {
            Some(v) => v.as_tensor().detach(),
            None => t,
        };
        let key = if top_level.iter().any(|p| name.starts_with(p)) {
            name
        } else {
            format!("{}{name}", family.weight_prefix())
        };
        tensors.insert(key, t.to_device(&Device::Cpu)?.contiguous()?);
    }
    Ok(tensors)
}

/// Relative L2 difference of two embedding sketches (`f64::INFINITY` when their sizes
/// differ).
pub fn sketch_difference(a: &[f32], b: &[f32]) -> f64 {
    if a.len() != b.len() || a.is_empty() {
        return f64::INFINITY;
    }
    let d: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let n: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum();
    (d / n.max(1e-30)).sqrt()
}
