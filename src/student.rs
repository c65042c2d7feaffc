//! The bundled student trainer: knowledge distillation from shards.
//!
//! Loss per batch: `α·CE(gold)` on rows that have a gold label plus
//! `(1-α)·T²·KL(softmax(teacher/T) ‖ softmax(student/T))` on every row (MSE to the
//! teacher's score for regression). Rows stream from the shards through a seeded shuffle
//! buffer and are batched by length. MixUp and FGSM rows are rebuilt in the student's own
//! embedding space from `partner_input_ids`/`lambda` and `perturbation`/`epsilon`.

use crate::augment::arith::mix;
use crate::config::OptimConfig;
use crate::model::checkpoint::{save_classifier, sketch_difference};
use crate::model::{Checkpoint, Ctx, Params, SeqClassifier};
use crate::shards::manifest::{check_file_sha256, shard_paths, Manifest};
use crate::shards::reader::ShardReader;
use crate::shards::{Row, ShardSchema};
use crate::storage::Location;
use crate::task::TaskSpec;
use crate::teacher::{dev_scorer, evaluate, label_names};
use crate::timing;
use crate::tokenize::TextTokenizer;
use crate::train::{kd_loss, supervised_loss, Batch, Optim};
use crate::util::{atomic_write, derive_seed, sha256_file, StagedDir};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// How to train a student.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StudentConfig {
    /// Base checkpoint the student starts from.
    pub model: PathBuf,
    /// Keep the first k encoder layers (`None` keeps all).
    pub layers: Option<usize>,
    /// Weight of the gold-label loss.
    pub alpha: f64,
    /// Distillation temperature.
    pub temperature: f64,
    /// Passes over the rows (ignored when `max_steps` is reached first).
    pub epochs: usize,
    /// Exact optimisation-step budget (cycles over the rows as needed).
    pub max_steps: Option<usize>,
    /// Seed for initialisation, shuffling and dropout.
    pub seed: u64,
    /// Methods whose rows are used (empty = all).
    pub methods: Vec<String>,
    /// Rows in the shuffle buffer.
    pub shuffle_buffer: usize,
    /// Dev evaluations spread evenly over the run (the last at its end); the checkpoint
    /// with the best dev score is kept. Without a dev split, the last checkpoint is kept.
    pub evals: usize,
    /// Optimiser settings.
    pub optim: OptimConfig,
}

impl Default for StudentConfig {
    fn default() -> Self {
        Self {
            model: PathBuf::from("data/models/minilm-l6"),
            layers: Some(3),
            alpha: 0.5,
            temperature: 1.0,
            epochs: 3,
            max_steps: None,
            seed: 0,
            methods: Vec::new(),
            shuffle_buffer: 4096,
            evals: 6,
            optim: OptimConfig {
                lr: 1e-4,
                ..OptimConfig::default()
            },
        }
    }
}

/// Metrics of a student run, written to `metrics.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StudentMetrics {
    /// Task.
    pub task: String,
    /// Methods trained on.
    pub methods: Vec<String>,
    /// Validation metrics per split of the kept checkpoint (scored once, chosen by nothing).
    pub validation: BTreeMap<String, BTreeMap<String, f64>>,
    /// Dev metrics of the kept checkpoint (empty without a dev split).
    #[serde(default)]
    pub dev: BTreeMap<String, f64>,
    /// Step of the kept checkpoint.
    #[serde(default)]
    pub best_step: usize,
    /// Primary dev metric at each dev evaluation.
    pub curve: Vec<CurvePoint>,
    /// Optimisation steps.
    pub steps: usize,
    /// Rows seen (with repeats).
    pub rows_seen: usize,
    /// Real (unpadded) tokens of the rows seen.
    #[serde(default)]
    pub tokens_seen: usize,
    /// Distinct rows available after the method filter.
    pub rows_available: usize,
    /// Training seconds.
    pub train_seconds: f64,
    /// Truncation length of the validation inputs.
    #[serde(default = "crate::teacher::eval_max_seq_len")]
    pub eval_max_seq_len: usize,
}

/// One point of the validation curve.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CurvePoint {
    /// Step at which it was measured.
    pub step: usize,
    /// Primary metric value.
    pub value: f64,
}

/// Streams rows of the selected methods from shards, through a seeded shuffle buffer.
struct RowStream {
    paths: Vec<Location>,
    next: usize,
    reader: Option<ShardReader>,
    pending: Vec<Row>,
    buffer: Vec<Row>,
    cap: usize,
    rng: ChaCha8Rng,
    schema: ShardSchema,
    methods: Vec<String>,
    /// Token ids must be below it (the student's and teacher's vocabulary size).
    vocab: u32,
}

impl RowStream {
    fn new(
        paths: Vec<Location>,
        schema: ShardSchema,
        methods: Vec<String>,
        (cap, vocab): (usize, u32),
        seed: u64,
    ) -> Self {
        Self {
            vocab,
            paths,
            next: 0,
            reader: None,
            pending: Vec::new(),
            buffer: Vec::new(),
            cap: cap.max(1),
            rng: ChaCha8Rng::seed_from_u64(seed),
            schema,
            methods,
        }
    }

    fn pull(&mut self) -> Result<Option<Row>> {
        loop {
            if let Some(r) = self.pending.pop() {
                return Ok(Some(r));
            }
            if self.reader.is_none() {
                if self.next >= self.paths.len() {
                    return Ok(None);
                }
                self.reader = Some(ShardReader::open(&self.paths[self.next], &self.schema)?);
                self.next += 1;
            }
            match self
                .reader
                .as_mut()
                .expect("open")
                .next_rows(&self.schema)?
            {
                Some(mut rows) => {
                    self.check_ids(&rows)?;
                    rows.retain(|r| {
                        self.methods.is_empty() || self.methods.iter().any(|m| m == r.method)
                    });
                    rows.reverse();
                    self.pending = rows;
                }
                None => self.reader = None,
            }
        }
    }

    /// Refuses a row with a token id outside the vocabulary, naming its file and row.
    fn check_ids(&self, rows: &[Row]) -> Result<()> {
        for r in rows {
            let ids = r
                .input_ids
                .iter()
                .chain(r.partner_input_ids.iter().flatten());
            if let Some(id) = ids.copied().find(|&t| t >= self.vocab) {
                bail!(
                    "{}: the {} row of example {} (copy {}) has token id {id}, expected ids below the vocabulary size {}",
                    self.paths[self.next - 1],
                    r.method,
                    r.idx,
                    r.copy,
                    self.vocab
                );
            }
        }
        Ok(())
    }

    fn next_row(&mut self) -> Result<Option<Row>> {
        while self.buffer.len() < self.cap {
            match self.pull()? {
                Some(r) => self.buffer.push(r),
                None => break,
            }
        }
        if self.buffer.is_empty() {
            return Ok(None);
        }
        let i = self.rng.gen_range(0..self.buffer.len());
        Ok(Some(self.buffer.swap_remove(i)))
    }

    /// Next group of batches (50 batches sorted by length, in shuffled order).
    fn next_batches(&mut self, batch_size: usize) -> Result<Vec<Vec<Row>>> {
        let mut rows = Vec::new();
        while rows.len() < batch_size * 50 {
            match self.next_row()? {
                Some(r) => rows.push(r),
                None => break,
            }
        }
        rows.sort_by_key(|r| r.input_ids.len());
        let mut batches: Vec<Vec<Row>> = Vec::new();
        let mut it = rows.into_iter().peekable();
        while it.peek().is_some() {
            batches.push(it.by_ref().take(batch_size).collect());
        }
        batches.shuffle(&mut self.rng);
        Ok(batches)
    }
}

/// Word embeddings for a batch, rebuilding MixUp and FGSM rows in the student's space.
fn student_embeds(
    model: &SeqClassifier,
    rows: &[Row],
    batch: &Batch,
    tok: &TextTokenizer,
    ctx: &mut Ctx,
) -> Result<Tensor> {
    let base = model.bert.embed_ids(&batch.ids, ctx)?;
    if rows
        .iter()
        .all(|r| r.partner_input_ids.is_none() && r.perturbation.is_none())
    {
        return Ok(base);
    }
    let (b, s, h) = base.dims3()?;
    let mut lam = vec![1f32; b * s];
    let mut pid = vec![tok.pad_id; b * s];
    let mut pert = vec![0f32; b * s * h];
    for (i, r) in rows.iter().enumerate() {
        for (j, &t) in r.input_ids.iter().enumerate() {
            pid[i * s + j] = t;
        }
        if let (Some(p), Some(pt)) = (&r.partner_input_ids, &r.partner_token_type_ids) {
            // The shard reader has checked that MixUp rows carry λ and FGSM rows ε.
            let at = |j: usize| -> Result<f32> {
                match (&r.lambdas, r.lambda) {
                    (Some(ls), _) => Ok(ls[j]),
                    (None, Some(l)) => Ok(l),
                    (None, None) => bail!("mixup row without `lambda`"),
                }
            };
            let al = mix::align(&r.input_ids, &r.token_type_ids, p, pt, &|t| {
                tok.is_special(t)
            });
            for (j, a) in al.iter().enumerate() {
                if let Some(k) = a {
                    lam[i * s + j] = at(j)?;
                    pid[i * s + j] = p[*k];
                }
            }
        }
        if let Some(sg) = &r.perturbation {
            if sg.len() != r.input_ids.len() * h {
                bail!("row idx {}: perturbation has {} values, expected {} (the student's hidden size must equal the teacher's for FGSM rows)", r.idx, sg.len(), r.input_ids.len() * h);
            }
            let e = r.epsilon.context("fgsm row without `epsilon`")?;
            for (j, &x) in sg.iter().enumerate() {
                pert[i * s * h + j] = e * x as f32;
            }
        }
    }
    let dev = base.device();
    let lam = Tensor::from_vec(lam, (b, s, 1), dev)?;
    let pids = Tensor::from_vec(pid, (b, s), dev)?;
    let partner = model.bert.embed_ids(&pids, ctx)?;
    let pert = Tensor::from_vec(pert, (b, s, h), dev)?;
    let one_minus = (1.0 - &lam)?;
    Ok(((base.broadcast_mul(&lam)? + partner.broadcast_mul(&one_minus)?)? + pert)?)
}

fn batch_loss(
    task: &TaskSpec,
    model: &SeqClassifier,
    rows: &[Row],
    tok: &TextTokenizer,
    cfg: &StudentConfig,
    device: &Device,
    ctx: &mut Ctx,
) -> Result<Tensor> {
    let pairs: Vec<(&[u32], &[u8])> = rows
        .iter()
        .map(|r| (r.input_ids.as_slice(), r.token_type_ids.as_slice()))
        .collect();
    let batch = Batch::new(&pairs, tok.pad_id, device)?;
    let emb = student_embeds(model, rows, &batch, tok, ctx)?;
    let logits = model
        .forward_embeds(&emb, &batch.types, &batch.mask, ctx)?
        .logits;
    let nl = task.num_labels;
    let t: Vec<f32> = rows
        .iter()
        .flat_map(|r| r.teacher_logits.iter().copied())
        .collect();
    let teacher = Tensor::from_vec(t, (rows.len(), nl), device)?;
    let soft = if task.is_regression() {
        (logits.clone() - &teacher)?.sqr()?.mean_all()?
    } else {
        kd_loss(&logits, &teacher, cfg.temperature)?
    };
    let labelled: Vec<usize> = rows
        .iter()
        .enumerate()
        .filter(|(_, r)| r.label.is_some())
        .map(|(i, _)| i)
        .collect();
    if cfg.alpha <= 0.0 || labelled.is_empty() {
        return Ok(soft);
    }
    let idx = Tensor::from_vec(
        labelled.iter().map(|&i| i as u32).collect::<Vec<_>>(),
        labelled.len(),
        device,
    )?;
    let gold: Vec<f32> = labelled
        .iter()
        .map(|&i| rows[i].label.expect("labelled"))
        .collect();
    let hard = supervised_loss(&logits.index_select(&idx, 0)?, &gold, task.is_regression())?;
    let frac = labelled.len() as f64 / rows.len() as f64;
    Ok(((hard * (cfg.alpha * frac))? + (soft * (1.0 - cfg.alpha))?)?)
}

/// The best checkpoint on dev so far.
struct Kept {
    score: f64,
    step: usize,
    metrics: BTreeMap<String, f64>,
    weights: Vec<Tensor>,
}

/// `fgsm` rows carry gradient signs in the teacher's embedding coordinates, so they are
/// refused unless the student's table is the teacher's (the same model, or the base it was
/// fine-tuned from: their sketches differ by under 10%).
fn check_fgsm_table(
    manifest: &crate::shards::manifest::Manifest,
    ck: &Checkpoint,
    cfg: &StudentConfig,
) -> Result<()> {
    let uses_fgsm = manifest.method_rows.get("fgsm").is_some_and(|&n| n > 0)
        && (cfg.methods.is_empty() || cfg.methods.iter().any(|m| m == "fgsm"));
    if !uses_fgsm {
        return Ok(());
    }
    let Some(sketch) = manifest.teacher.get("embedding_sketch").and_then(|v| {
        v.as_array().map(|a| {
            a.iter()
                .filter_map(|x| x.as_f64())
                .map(|x| x as f32)
                .collect::<Vec<_>>()
        })
    }) else {
        tracing::warn!("the manifest has no teacher embedding sketch: cannot check that the student shares the teacher's embedding table for `fgsm` rows");
        return Ok(());
    };
    let d = sketch_difference(&sketch, &ck.embedding_sketch()?);
    if d > 0.1 {
        bail!(
            "{}: the student's word-embedding table is not the teacher's (sketches differ by {:.0}%), \
             but `fgsm` rows hold gradient signs in the teacher's embedding coordinates; train \
             without them (--methods without fgsm) or start the student from the teacher's base model",
            cfg.model.display(),
            d * 100.0
        );
    }
    Ok(())
}

/// The dataset's shard files as training reads them, each checked against the manifest's
/// sha256 first: local files in place; a bucket's copied once (in ranges, each read on
/// condition that the object is unchanged, hashed as they stream) into a directory beside
/// `out` that is never published and is removed when training ends, or by the next run if
/// this one is killed. So every epoch reads verified bytes, downloaded once per run.
fn verified_shards(
    m: &Manifest,
    paths: Vec<Location>,
    shards_dir: &Location,
    out: &Path,
) -> Result<(Option<StagedDir>, Vec<Location>)> {
    let files = m.shards.iter().flat_map(|s| &s.files);
    if !shards_dir.is_remote() {
        for (loc, f) in paths.iter().zip(files) {
            check_file_sha256(loc, &loc.sha256()?, f)?;
        }
        return Ok((None, paths));
    }
    let mut name = out
        .file_name()
        .with_context(|| format!("{}: not a directory name", out.display()))?
        .to_owned();
    name.push(".shard-copies");
    let dir = StagedDir::create(&out.with_file_name(name))?;
    let copies = paths
        .into_iter()
        .zip(files)
        .map(|(loc, f)| {
            let (size, tag) = loc.meta()?;
            let copy = dir.path().join(&f.file);
            check_file_sha256(&loc, &loc.download(&copy, size, tag.as_deref())?, f)?;
            Ok(Location::Local(copy))
        })
        .collect::<Result<_>>()?;
    Ok((Some(dir), copies))
}

/// Refuses local source files other than those the shards were made from: the dev split is
/// carved from the source split by row count, so another copy of the data would move it,
/// possibly onto examples the shards augmented.
fn check_source_files(
    manifest: &Manifest,
    shards_dir: &Location,
    task: &TaskSpec,
    glue_dir: &Path,
) -> Result<()> {
    let recorded = manifest
        .source_files()
        .with_context(|| format!("{shards_dir}"))?;
    let local = crate::data::source_files(glue_dir, task, &manifest.split)?;
    let names: std::collections::BTreeSet<&String> = recorded.keys().chain(local.keys()).collect();
    for name in names {
        let (here, there) = (local.get(name), recorded.get(name));
        if here != there {
            let show =
                |h: Option<&String>| h.map_or("absent".to_string(), |h| format!("sha256 {h}"));
            bail!(
                "{}: {} here, but {} in {shards_dir}/manifest.json (source.files_sha256); train on the source data the shards were made from",
                crate::data::split_dir(glue_dir, task).join(name).display(),
                show(here),
                show(there)
            );
        }
    }
    Ok(())
}

/// The task of the shards in `shards_dir`, which must be `task`: GLUE, or the dataset their
/// configuration describes with its files read from `data_source`, the reader's copy. The
/// location the manifest names is the writer's and is never read.
pub fn shards_task(
    shards_dir: &Location,
    task: &str,
    data_source: Option<&str>,
) -> Result<&'static TaskSpec> {
    let m = crate::shards::manifest::read_manifest(shards_dir)?;
    if m.task != task {
        bail!(
            "{shards_dir}: shards are for task `{}`, not `{task}`",
            m.task
        );
    }
    match (m.described_source()?, data_source) {
        (None, None) => crate::data::manifest_task(&m),
        (None, Some(_)) => bail!(
            "--data-source: the shards in {shards_dir} are of GLUE `{task}`, read from the GLUE directory; drop --data-source"
        ),
        (Some(theirs), None) => bail!(
            "{shards_dir}/manifest.json: the shards were made from a dataset at {theirs:?} (config.data.source); give --data-source with your copy of it (train-student reads no location a manifest names)"
        ),
        (Some(_), Some(ours)) => m.task_placed(|_| crate::data::mirror::place(ours)),
    }
}

/// Trains a student from the shards in `shards_dir` and writes a checkpoint and
/// `metrics.json` to `out`.
pub fn train(
    shards_dir: &Location,
    task: &'static TaskSpec,
    glue_dir: &Path,
    out: &Path,
    cfg: &StudentConfig,
    device: &Device,
) -> Result<StudentMetrics> {
    let setup = timing::stage("setup");
    let (manifest, paths) = shard_paths(shards_dir)?;
    let ck = check_student(&manifest, shards_dir, task, glue_dir, cfg)?;
    let tok = TextTokenizer::load(&cfg.model, 512)?;
    let schema = ShardSchema::new(task);
    let rows_available = rows_available(&manifest, shards_dir, cfg)?;
    let (_copies, paths) = verified_shards(&manifest, paths, shards_dir, out)?;
    let per_epoch = rows_available.div_ceil(cfg.optim.batch_size);
    let total = cfg.max_steps.unwrap_or(per_epoch * cfg.epochs.max(1));
    let (model, params) = ck.load_classifier(
        device,
        true,
        task.num_labels,
        cfg.layers,
        derive_seed(cfg.seed, &["student-init"]),
    )?;
    let mut opt = Optim::new(&params, &cfg.optim, total)?;
    let mut ctx = Ctx::train(derive_seed(cfg.seed, &["student-dropout"])).with_table_rows();
    let pb = crate::util::progress(total as u64, "student");
    let start = Instant::now();
    drop(setup);
    let mut keeper = DevKeeper {
        score: shards_dev_scorer(&manifest, shards_dir, task, &tok, glue_dir)?,
        task,
        device,
        params: &params,
        curve: Vec::new(),
        best: None,
    };
    let plan = StepPlan {
        task,
        model: &model,
        tok: &tok,
        cfg,
        device,
        paths: &paths,
        schema: &schema,
        vocab: u32::try_from(ck.config.vocab_size).unwrap_or(u32::MAX),
        total,
        eval_every: total.div_ceil(cfg.evals.max(1)).max(1),
    };
    let (step, seen, tokens_seen) = plan.run(&mut opt, &mut ctx, &pb, &mut keeper)?;
    pb.finish_and_clear();
    let secs = start.elapsed().as_secs_f64();
    let (kept, curve) = {
        let _t = timing::stage("checkpoint");
        keeper.restore_best(step)?
    };
    let m = StudentMetrics {
        task: task.name.clone(),
        methods: trained_methods(&manifest, cfg),
        validation: BTreeMap::new(),
        dev: BTreeMap::new(),
        best_step: step,
        curve,
        steps: step,
        rows_seen: seen,
        tokens_seen,
        rows_available,
        train_seconds: secs,
        eval_max_seq_len: crate::teacher::EVAL_MAX_SEQ_LEN,
    };
    plan.publish(&params, m, kept, glue_dir, out)
}

/// A student whose every dev checkpoint scored NaN: it diverged. Its metrics have no dev or
/// validation scores; nothing is written to its directory.
#[derive(Debug)]
pub struct Diverged {
    /// The run's directory.
    pub out: PathBuf,
    /// The dev metric that scored NaN.
    pub metric: &'static str,
    /// What the run did (steps, rows, curve, time).
    pub metrics: StudentMetrics,
}

impl std::fmt::Display for Diverged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: every dev checkpoint scored NaN ({}): the student diverged; lower its learning rate",
            self.out.display(),
            self.metric
        )
    }
}

impl std::error::Error for Diverged {}

/// Metric name to score.
type Scores = BTreeMap<String, f64>;

/// The kept checkpoint's dev scores and step.
type KeptScores = (Scores, usize);

/// Scores a student on the dev split the shards' source held out; `None` when the shards
/// are not of the train split or held out nothing.
fn shards_dev_scorer(
    manifest: &Manifest,
    shards_dir: &Location,
    task: &'static TaskSpec,
    tok: &TextTokenizer,
    glue_dir: &Path,
) -> Result<Option<impl Fn(&SeqClassifier, &Device) -> Result<Scores>>> {
    let dev = manifest.dev().with_context(|| format!("{shards_dir}"))?;
    if dev.fraction <= 0.0 || manifest.split != task.train_split {
        return Ok(None);
    }
    let _t = timing::stage("data");
    Ok(Some(dev_scorer(tok, task, glue_dir, &dev)?))
}

/// The methods whose rows a student trains on: the chosen ones, else every method of the
/// shards.
fn trained_methods(manifest: &Manifest, cfg: &StudentConfig) -> Vec<String> {
    if cfg.methods.is_empty() {
        manifest.method_rows.keys().cloned().collect()
    } else {
        cfg.methods.clone()
    }
}

/// Checks that the shards are for `task` and the student fits them: known methods, the
/// teacher's vocabulary and tokenizer, a usable `fgsm` table and the same source files.
/// Returns the student's base checkpoint.
fn check_student(
    manifest: &Manifest,
    shards_dir: &Location,
    task: &TaskSpec,
    glue_dir: &Path,
    cfg: &StudentConfig,
) -> Result<Checkpoint> {
    if manifest.task != task.name {
        bail!(
            "{}: shards are for task `{}`, not `{}`",
            shards_dir,
            manifest.task,
            task.name
        );
    }
    for m in &cfg.methods {
        if !crate::shards::schema::METHODS.contains(&m.as_str()) {
            bail!(
                "--methods: unknown method `{m}` (expected one of {})",
                crate::shards::schema::METHODS.join(", ")
            );
        }
    }
    let ck = Checkpoint::open(&cfg.model)?;
    let teacher_vocab = manifest
        .teacher
        .get("vocab_size")
        .and_then(|v| v.as_u64())
        .unwrap_or(0) as usize;
    if ck.config.vocab_size != teacher_vocab {
        bail!("{}: student vocabulary has {} tokens, the teacher's has {teacher_vocab}; the student must share the teacher's vocabulary", cfg.model.display(), ck.config.vocab_size);
    }
    let tok_file = crate::tokenize::tokenizer_file(&cfg.model);
    if !tok_file.is_file() || sha256_file(&tok_file)? != manifest.tokenizer_sha256 {
        bail!(
            "{}: not the tokenizer the shards were made with (the manifest's tokenizer_sha256 \
             is {}); the student must use the teacher's tokenizer",
            tok_file.display(),
            manifest.tokenizer_sha256
        );
    }
    check_fgsm_table(manifest, &ck, cfg)?;
    check_source_files(manifest, shards_dir, task, glue_dir)?;
    Ok(ck)
}

/// Rows of the selected methods (all methods when none are selected) in the shards; refuses
/// none.
fn rows_available(
    manifest: &Manifest,
    shards_dir: &Location,
    cfg: &StudentConfig,
) -> Result<usize> {
    let rows_available: usize = manifest
        .shards
        .iter()
        .map(|s| {
            s.methods
                .iter()
                .filter(|(k, _)| cfg.methods.is_empty() || cfg.methods.contains(k))
                .map(|(_, v)| v.rows as usize)
                .sum::<usize>()
        })
        .sum();
    if rows_available == 0 {
        bail!("{}: no rows for methods {:?}", shards_dir, cfg.methods);
    }
    Ok(rows_available)
}

/// Scores the student on dev at each check, records the curve and keeps the best weights.
struct DevKeeper<'a, S> {
    /// Scores a model on dev; `None` when there is no dev split to score on.
    score: Option<S>,
    task: &'static TaskSpec,
    device: &'a Device,
    params: &'a Params,
    curve: Vec<CurvePoint>,
    best: Option<Kept>,
}

impl<S> DevKeeper<'_, S>
where
    S: Fn(&SeqClassifier, &Device) -> Result<BTreeMap<String, f64>>,
{
    /// Scores `model` at `step` and keeps its weights if it beats the best so far.
    fn check(&mut self, model: &SeqClassifier, step: usize) -> Result<()> {
        let Some(score) = &self.score else {
            return Ok(());
        };
        let m = {
            let _t = timing::stage("dev");
            score(model, self.device)?
        };
        let v = crate::metrics::primary(self.task, &m);
        self.curve.push(CurvePoint { step, value: v });
        // Ties keep the earlier checkpoint; a NaN score never wins.
        if crate::metrics::improves(v, self.best.as_ref().map(|b| b.score)) {
            let _t = timing::stage("checkpoint");
            self.best = Some(Kept {
                score: v,
                step,
                metrics: m,
                weights: self.params.snapshot()?,
            });
        }
        Ok(())
    }

    /// Restores the best weights kept; returns their dev metrics and step (none and the
    /// last step without dev checks; `None` when every check scored NaN) and the curve.
    fn restore_best(self, step: usize) -> Result<(Option<KeptScores>, Vec<CurvePoint>)> {
        let kept = match self.best {
            Some(k) => {
                self.params.restore(&k.weights)?;
                Some((k.metrics, k.step))
            }
            None if !self.curve.is_empty() => None,
            None => Some((BTreeMap::new(), step)),
        };
        Ok((kept, self.curve))
    }
}

/// What the training loop steps through: the model, the shards and how often to check dev.
struct StepPlan<'a> {
    task: &'static TaskSpec,
    model: &'a SeqClassifier,
    tok: &'a TextTokenizer,
    cfg: &'a StudentConfig,
    device: &'a Device,
    paths: &'a [Location],
    schema: &'a ShardSchema,
    /// The vocabulary size every token id must be below.
    vocab: u32,
    total: usize,
    eval_every: usize,
}

impl StepPlan<'_> {
    /// Takes `total` optimizer steps over epochs of shuffled rows, checking dev every
    /// `eval_every` steps and at the last; returns the steps taken, rows seen and their real
    /// tokens.
    fn run<S>(
        &self,
        opt: &mut Optim,
        ctx: &mut Ctx,
        pb: &indicatif::ProgressBar,
        keeper: &mut DevKeeper<'_, S>,
    ) -> Result<(usize, usize, usize)>
    where
        S: Fn(&SeqClassifier, &Device) -> Result<BTreeMap<String, f64>>,
    {
        let (total, cfg) = (self.total, self.cfg);
        let (mut step, mut seen, mut tokens, mut epoch) = (0usize, 0usize, 0usize, 0usize);
        while step < total {
            let mut stream = RowStream::new(
                self.paths.to_vec(),
                self.schema.clone(),
                cfg.methods.clone(),
                (cfg.shuffle_buffer, self.vocab),
                derive_seed(cfg.seed, &["student-epoch", &epoch.to_string()]),
            );
            loop {
                let batches = {
                    let _t = timing::stage("data");
                    stream.next_batches(cfg.optim.batch_size)?
                };
                if batches.is_empty() {
                    break;
                }
                for rows in batches {
                    if step >= total {
                        break;
                    }
                    let loss = {
                        let _t = timing::stage("step");
                        let loss = batch_loss(
                            self.task,
                            self.model,
                            &rows,
                            self.tok,
                            cfg,
                            self.device,
                            ctx,
                        )?;
                        opt.backward_step(&loss, ctx)?;
                        loss
                    };
                    step += 1;
                    seen += rows.len();
                    tokens += rows.iter().map(|r| r.input_ids.len()).sum::<usize>();
                    if step % self.eval_every == 0 || step == total {
                        keeper.check(self.model, step)?;
                    }
                    if step % 10 == 0 {
                        pb.set_prefix(format!("loss {:.4}", loss.to_scalar::<f32>()?));
                    }
                    pb.inc(1);
                }
                if step >= total {
                    break;
                }
            }
            epoch += 1;
        }
        Ok((step, seen, tokens))
    }
}

impl StepPlan<'_> {
    /// Publishes the kept (dev-best) student in `out`: its checkpoint, validation scores and
    /// `metrics.json`, staged so that they appear together or not at all; a [`Diverged`]
    /// error, writing nothing, when no checkpoint was kept.
    fn publish(
        &self,
        params: &Params,
        mut m: StudentMetrics,
        kept: Option<KeptScores>,
        glue_dir: &Path,
        out: &Path,
    ) -> Result<StudentMetrics> {
        let Some((dev, best_step)) = kept else {
            let (out, metric) = (out.to_path_buf(), self.task.primary_metric());
            return Err(Diverged {
                out,
                metric,
                metrics: m,
            }
            .into());
        };
        (m.dev, m.best_step) = (dev, best_step);
        // The checkpoint and its metrics move in together, metrics.json last.
        let staged = StagedDir::create(out)?;
        m.validation = self.evaluate_and_save(params, glue_dir, staged.path())?;
        atomic_write(
            &staged.path().join("metrics.json"),
            serde_json::to_string_pretty(&m)?.as_bytes(),
        )?;
        staged.publish("metrics.json")?;
        Ok(m)
    }

    /// Evaluates the student on the validation splits, then saves it as a checkpoint in
    /// `out`; returns the validation metrics.
    fn evaluate_and_save(
        &self,
        params: &Params,
        glue_dir: &Path,
        out: &Path,
    ) -> Result<BTreeMap<String, BTreeMap<String, f64>>> {
        let (model, task) = (self.model, self.task);
        let validation = {
            let _t = timing::stage("validation");
            evaluate(model, self.tok, task, glue_dir, self.device)?
        };
        let _t = timing::stage("checkpoint");
        let names = label_names(glue_dir, task);
        save_classifier(
            out,
            params,
            &model.bert.config,
            task.num_labels,
            task,
            &names,
            &self.cfg.model,
        )?;
        Ok(validation)
    }
}

/// The task's primary metric on the first validation split.
pub fn first_value(task: &TaskSpec, v: &BTreeMap<String, BTreeMap<String, f64>>) -> f64 {
    v.values()
        .next()
        .map_or(f64::NAN, |m| crate::metrics::primary(task, m))
}
