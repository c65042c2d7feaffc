//! Pipeline files (`pipelines/*.toml`): parsed into typed, validated configuration.
//! Unknown keys, wrong types and out-of-range values are errors that name the key.
//! The plain configuration types of every stage live here, so that `config` depends on no
//! stage. The dataset description (`[data]`) and the dev split (`[dev]`) are recorded in
//! every manifest, so they are the shard format's types, re-exported from `augpro-shards`.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// A whole pipeline: task, teacher, projection, methods, output.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// Run name; output goes to `<output>/<task>/<name>/`.
    pub name: String,
    /// Task name: a GLUE config, or the name of the dataset `data` describes.
    pub task: String,
    /// The dataset, when it is not the GLUE config `task` names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<DataConfig>,
    /// Split to augment.
    #[serde(default = "default_split")]
    pub split: String,
    /// Augment at most this many source examples (the first ones of the split).
    #[serde(default)]
    pub max_examples: Option<usize>,
    /// Truncation length of source examples.
    #[serde(default = "default_max_seq_len")]
    pub max_seq_len: usize,
    /// Base seed; every random choice derives from it.
    #[serde(default)]
    pub seed: u64,
    /// Number of output shards.
    #[serde(default = "one")]
    pub shards: usize,
    /// Source examples per teacher batch.
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// Output root.
    #[serde(default = "default_output")]
    pub output: PathBuf,
    /// The teacher.
    pub teacher: TeacherConfig,
    /// Nearest-neighbour projection.
    #[serde(default)]
    pub projection: ProjectionConfig,
    /// Augmentation methods; a method is enabled by its table.
    #[serde(default)]
    pub methods: MethodsConfig,
    /// The dev split carved from the train split: never augmented nor trained on.
    #[serde(default)]
    pub dev: DevConfig,
}

pub use augpro_shards::task::{DataConfig, DevConfig, TaskKind, GLUE_SOURCE};

fn default_split() -> String {
    "train".into()
}
fn default_max_seq_len() -> usize {
    128
}
fn one() -> usize {
    1
}
fn default_batch() -> usize {
    32
}
fn default_output() -> PathBuf {
    PathBuf::from("out")
}

/// Where the teacher comes from.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeacherConfig {
    /// Base model directory (HF layout) to fine-tune.
    #[serde(default = "default_model")]
    pub model: PathBuf,
    /// A ready fine-tuned checkpoint; when set, no training happens.
    #[serde(default)]
    pub checkpoint: Option<PathBuf>,
    /// Cache root for trained teachers (keyed by their configuration).
    #[serde(default = "default_teacher_dir")]
    pub cache_dir: PathBuf,
    /// How to fine-tune when no checkpoint is given.
    #[serde(default)]
    pub train: TeacherTrainConfig,
}

fn default_model() -> PathBuf {
    PathBuf::from("data/models/minilm-l6")
}
fn default_teacher_dir() -> PathBuf {
    PathBuf::from("runs/teachers")
}

/// The FAISS index used for projection.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectionConfig {
    /// FAISS index-factory string (`Flat` exact; `HNSW32`, `IVF256,Flat` approximate).
    #[serde(default = "default_index")]
    pub index: String,
    /// Distance.
    #[serde(default = "default_metric")]
    pub metric: Metric,
    /// FAISS search parameters for approximate indexes (`nprobe=16`, `efSearch=128`).
    #[serde(default)]
    pub params: Option<String>,
}

fn default_index() -> String {
    "Flat".into()
}
fn default_metric() -> Metric {
    Metric::L2
}

impl Default for ProjectionConfig {
    fn default() -> Self {
        Self {
            index: default_index(),
            metric: default_metric(),
            params: None,
        }
    }
}

/// The methods and their parameters; `None` means disabled. Original rows are always written.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MethodsConfig {
    /// AugPro-Mix: mix with a partner, then project.
    pub augpro_mix: Option<MixConfig>,
    /// AugPro-FGSM: perturb along the gradient sign, then project.
    pub augpro_fgsm: Option<FgsmConfig>,
    /// Token replacement by nearest neighbours.
    pub token_replace: Option<ReplaceConfig>,
    /// MixUp of embeddings without projection.
    pub mixup: Option<MixConfig>,
    /// FGSM on embeddings without projection.
    pub fgsm: Option<FgsmConfig>,
}

impl MethodsConfig {
    /// Disables every method not named in `keep`.
    pub fn retain(&mut self, keep: &[String]) {
        let kept = |name: &str| keep.iter().any(|k| k == name);
        if !kept("augpro_mix") {
            self.augpro_mix = None;
        }
        if !kept("augpro_fgsm") {
            self.augpro_fgsm = None;
        }
        if !kept("token_replace") {
            self.token_replace = None;
        }
        if !kept("mixup") {
            self.mixup = None;
        }
        if !kept("fgsm") {
            self.fgsm = None;
        }
    }
}

/// Parameters of the mixing methods.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MixConfig {
    /// Augmented rows per source example.
    #[serde(default = "one")]
    pub copies: usize,
    /// Beta(α, α) parameter of λ.
    pub alpha: f64,
    /// One λ per sequence or per position.
    #[serde(default = "default_lambda_mode")]
    pub lambda_mode: LambdaMode,
    /// Lower bound of λ: λ = lambda_min + (1 - lambda_min)·Beta(α, α).
    #[serde(default)]
    pub lambda_min: f64,
    /// Drop projected rows identical to their source.
    #[serde(default)]
    pub drop_unchanged: bool,
}

fn default_lambda_mode() -> LambdaMode {
    LambdaMode::Sequence
}

/// Parameters of the gradient-sign methods.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FgsmConfig {
    /// Absolute step ε per embedding coordinate.
    #[serde(default)]
    pub epsilon: Option<f64>,
    /// The step's L2 length ε·√hidden as a multiple of the table's median
    /// nearest-neighbour distance d: ε = epsilon_nn·d/√hidden. The same value means the
    /// same step, relative to the spacing of the vocabulary, for any hidden size.
    #[serde(default)]
    pub epsilon_nn: Option<f64>,
    /// Replaced by `epsilon_nn` (it was per coordinate, so its step grew with √hidden);
    /// kept only to say so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epsilon_rel: Option<f64>,
    /// A student checkpoint: the gradient is that of KL(teacher ‖ student), taken and
    /// projected in the student's embedding space (AugPro-FGSM only).
    #[serde(default)]
    pub student: Option<PathBuf>,
    /// Drop projected rows identical to their source.
    #[serde(default)]
    pub drop_unchanged: bool,
}

/// Parameters of token replacement.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplaceConfig {
    /// Augmented rows per source example.
    #[serde(default = "one")]
    pub copies: usize,
    /// Probability of replacing each token.
    pub p: f64,
    /// Choose among this many nearest neighbours.
    #[serde(default = "default_k")]
    pub k: usize,
    /// Drop rows identical to their source.
    #[serde(default)]
    pub drop_unchanged: bool,
}

fn default_k() -> usize {
    8
}

impl PipelineConfig {
    /// Reads and validates a pipeline file.
    pub fn load(path: &Path) -> Result<Self> {
        Self::load_with(path, &[])
    }

    /// Reads a pipeline file, applies `dotted.key=value` overrides (values in TOML syntax,
    /// bare words taken as strings), then validates.
    pub fn load_with(path: &Path, overrides: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read pipeline file", path.display()))?;
        let flat = |e: &dyn std::fmt::Display| e.to_string().replace('\n', " ").trim().to_string();
        let mut doc: toml::Table = toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{}: {}", path.display(), flat(&e)))?;
        for o in overrides {
            apply_override(&mut doc, o)?;
        }
        let cfg: Self = toml::Value::Table(doc)
            .try_into()
            .map_err(|e| anyhow::anyhow!("{}: {}", path.display(), flat(&e)))?;
        cfg.validate()
            .with_context(|| format!("{}", path.display()))?;
        Ok(cfg)
    }

    /// Checks ranges and consistency.
    pub fn validate(&self) -> Result<()> {
        self.check_name()?;
        self.check_sizes()?;
        self.methods.validate()?;
        self.check_training()
    }

    /// The run's name, which is one directory of the output (`<output>/<task>/<name>`).
    fn check_name(&self) -> Result<()> {
        let one_directory = !self.name.starts_with('.')
            && !self.name.is_empty()
            && !self.name.contains(['/', '\\'])
            && !self.name.contains(char::is_control);
        if !one_directory {
            bail!("`name` = {:?}: a run's name is one directory: no '/' or '\\', not empty and not starting with '.'", self.name);
        }
        Ok(())
    }

    /// Shards, batch, lengths, example count and the split augmented.
    fn check_sizes(&self) -> Result<()> {
        let (train, validation) = self.split_names()?;
        if self.shards == 0 {
            bail!("`shards` must be at least 1, got 0");
        }
        if self.batch_size == 0 {
            bail!("`batch_size` must be at least 1, got 0");
        }
        if self.max_seq_len < 4 || self.max_seq_len > 512 {
            bail!("`max_seq_len` must be in 4..=512, got {}", self.max_seq_len);
        }
        if self.max_examples == Some(0) {
            bail!("`max_examples` must be at least 1, got 0");
        }
        if self.split != train && !validation.contains(&self.split) {
            bail!(
                "`split` = `{}` is not a labelled split of `{}`",
                self.split,
                self.task
            );
        }
        Ok(())
    }

    /// The dev split's share and the teacher's training recipe.
    fn check_training(&self) -> Result<()> {
        if !(0.0..=0.5).contains(&self.dev.fraction) {
            bail!(
                "`dev.fraction` must be in [0, 0.5], got {}",
                self.dev.fraction
            );
        }
        let t = &self.teacher.train;
        if t.optim.batch_size == 0 || t.optim.lr.is_nan() || t.optim.lr <= 0.0 || t.epochs == 0 {
            bail!("`teacher.train`: epochs, optim.batch_size and optim.lr must be positive");
        }
        if !(0.0..1.0).contains(&t.optim.warmup_ratio) {
            bail!(
                "`teacher.train.optim.warmup_ratio` must be in [0, 1), got {}",
                t.optim.warmup_ratio
            );
        }
        Ok(())
    }
}

impl MethodsConfig {
    /// Checks every enabled method's parameters.
    fn validate(&self) -> Result<()> {
        for (name, c) in [("augpro_mix", &self.augpro_mix), ("mixup", &self.mixup)] {
            if let Some(c) = c {
                c.validate(name)?;
            }
        }
        for (name, c) in [("augpro_fgsm", &self.augpro_fgsm), ("fgsm", &self.fgsm)] {
            if let Some(c) = c {
                c.validate(name)?;
            }
        }
        if self.fgsm.as_ref().is_some_and(|c| c.student.is_some()) {
            bail!("`methods.fgsm.student` is not supported: the unprojected baseline perturbs the teacher's embeddings");
        }
        if let Some(c) = &self.token_replace {
            if c.copies == 0 {
                bail!("`methods.token_replace.copies` must be at least 1, got 0");
            }
            if !(0.0..=1.0).contains(&c.p) {
                bail!("`methods.token_replace.p` must be in [0, 1], got {}", c.p);
            }
            if c.k == 0 {
                bail!("`methods.token_replace.k` must be at least 1, got 0");
            }
        }
        Ok(())
    }
}

impl MixConfig {
    /// Copies, α and λ's lower bound of the mixing method `name`.
    fn validate(&self, name: &str) -> Result<()> {
        if self.copies == 0 {
            bail!("`methods.{name}.copies` must be at least 1, got 0");
        }
        if !self.alpha.is_finite() || self.alpha <= 0.0 {
            bail!("`methods.{name}.alpha` must be > 0, got {}", self.alpha);
        }
        if !(0.0..1.0).contains(&self.lambda_min) {
            bail!(
                "`methods.{name}.lambda_min` must be in [0, 1), got {}",
                self.lambda_min
            );
        }
        Ok(())
    }
}

impl FgsmConfig {
    /// The step size of the gradient-sign method `name`: `epsilon` or `epsilon_nn`, once.
    fn validate(&self, name: &str) -> Result<()> {
        if let Some(r) = self.epsilon_rel {
            bail!(
                "`methods.{name}.epsilon_rel` is replaced by `epsilon_nn`, the step's L2 length in \
                 nearest-neighbour distances: use epsilon_nn = epsilon_rel·√hidden \
                 ({:.2} for {r} at hidden size 384)",
                r * 384f64.sqrt()
            );
        }
        match (self.epsilon, self.epsilon_nn) {
            (Some(_), Some(_)) => {
                bail!("`methods.{name}`: give `epsilon` or `epsilon_nn`, not both")
            }
            (None, None) => bail!("`methods.{name}`: `epsilon` or `epsilon_nn` is required"),
            (Some(e), None) | (None, Some(e)) if !e.is_finite() || e < 0.0 => {
                bail!("`methods.{name}`: ε must be >= 0, got {e}")
            }
            _ => Ok(()),
        }
    }
}

impl PipelineConfig {
    /// Checks the task's name and description; returns its train and validation splits.
    fn split_names(&self) -> Result<(String, Vec<String>)> {
        let Some(data) = &self.data else {
            let t = crate::task::glue(&self.task)?;
            return Ok((t.train_split.clone(), t.validation_splits.clone()));
        };
        let name_ok = !self.task.is_empty()
            && !self.task.starts_with('.')
            && self
                .task
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if !name_ok {
            bail!("`task` = {:?}: a described dataset's name must be letters, digits, '-', '_' or '.'", self.task);
        }
        data.validate()?;
        if let Some(c) = data.glue_config() {
            let t = crate::task::glue(c)?;
            return Ok((t.train_split.clone(), t.validation_splits.clone()));
        }
        let validation = data
            .splits
            .keys()
            .filter(|k| *k != "train")
            .cloned()
            .collect();
        Ok(("train".into(), validation))
    }
}

/// Sets `a.b.c=value` in a TOML document, creating tables on the way.
fn apply_override(doc: &mut toml::Table, spec: &str) -> Result<()> {
    let (key, raw) = spec.split_once('=').ok_or_else(|| {
        anyhow::anyhow!(
            "--set {spec}: expected key=value (e.g. methods.augpro_mix.lambda_min=0.25)"
        )
    })?;
    let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let parts: Vec<&str> = key.trim().split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        anyhow::bail!("--set {spec}: empty key segment");
    }
    let mut table = doc;
    for p in &parts[..parts.len() - 1] {
        let entry = table
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(Default::default()));
        table = entry
            .as_table_mut()
            .ok_or_else(|| anyhow::anyhow!("--set {spec}: `{p}` is not a table"))?;
    }
    table.insert(parts[parts.len() - 1].to_string(), value);
    Ok(())
}

/// How to fine-tune a teacher.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TeacherTrainConfig {
    /// Passes over the (possibly capped) training set.
    pub epochs: usize,
    /// Use at most this many shuffled training examples.
    pub max_train_examples: Option<usize>,
    /// Stop after this many optimisation steps.
    pub max_steps: Option<usize>,
    /// Truncation length for training.
    pub max_seq_len: usize,
    /// Seed for shuffling, dropout and head initialisation.
    pub seed: u64,
    /// Optimiser settings.
    pub optim: OptimConfig,
}

impl Default for TeacherTrainConfig {
    fn default() -> Self {
        Self {
            epochs: 1,
            max_train_examples: None,
            max_steps: None,
            max_seq_len: 66,
            seed: 0,
            optim: OptimConfig::default(),
        }
    }
}

/// Optimisation settings shared by teacher and student.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimConfig {
    /// Peak learning rate.
    pub lr: f64,
    /// AdamW weight decay (not applied to biases and LayerNorm weights).
    pub weight_decay: f64,
    /// Fraction of steps of linear warm-up.
    pub warmup_ratio: f64,
    /// Examples per batch.
    pub batch_size: usize,
    /// Global gradient-norm clip (0 disables).
    pub max_grad_norm: f64,
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self {
            lr: 5e-5,
            weight_decay: 0.01,
            warmup_ratio: 0.06,
            batch_size: 32,
            max_grad_norm: 1.0,
        }
    }
}

/// Whether one λ is drawn per sequence or one per position.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LambdaMode {
    /// One λ for the whole sequence.
    Sequence,
    /// An independent λ for every position.
    Position,
}

/// Distance used for nearest-neighbour search.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Euclidean distance.
    L2,
    /// Largest inner product.
    InnerProduct,
}
