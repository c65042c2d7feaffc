//! The augmentation stage: AugPro-Mix, AugPro-FGSM and the baselines (token replacement,
//! MixUp, FGSM), all working in the teacher's word-embedding space and sharing one
//! FAISS projection back to the vocabulary. Every emitted row carries the teacher's
//! logits on exactly its input.
//!
//! Each method lives in its own file behind [`Method`]: it turns a batch of [`Sources`] into
//! one [`Variant`] per source example, a real token sequence or a virtual input. The
//! [`Engine`] scores the variants with the teacher and turns them into rows.

pub mod arith;
pub mod augpro_fgsm;
pub mod augpro_mix;
pub mod exact_search;
pub mod fgsm_baseline;
pub mod mixup;
pub mod project;
pub mod project_device;
pub mod token_replace;

use crate::config::{FgsmConfig, MethodsConfig, Metric, PipelineConfig};
use crate::data::Example;
use crate::metrics::argmax;
use crate::model::{Checkpoint, SeqClassifier};
use crate::shards::{MethodStats, Row};
use crate::teacher::{embedding_grad, GradLoss, Teacher};
use crate::timing;
use crate::tokenize::Encoded;
use crate::util::derive_seed;
use anyhow::{bail, Context, Result};
use arith::fgsm;
use candle_core::{DType, Tensor};
use exact_search::rows_of;
use project::{median_nn_distance, Projector};
use project_device::DeviceProjector;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::rc::Rc;

/// One augmentation method.
pub trait Method {
    /// Name written in the `method` column.
    fn name(&self) -> &'static str;

    /// Rows per source example.
    fn copies(&self) -> usize {
        1
    }

    /// Drop token rows identical to their source.
    fn drop_unchanged(&self) -> bool {
        false
    }

    /// One variant per source example of the batch, or none at all; `rng` is seeded by the
    /// batch, the method and the copy.
    fn variants(
        &self,
        space: &mut Space,
        src: &mut Sources,
        rng: &mut ChaCha8Rng,
    ) -> Result<Vec<Variant>>;
}

/// An augmented row before the teacher scores it.
pub enum Variant {
    /// A real token sequence (projected or replaced), scored on its own tokens.
    Tokens {
        /// Token ids.
        ids: Vec<u32>,
        /// Positions that differ from the source.
        changed: u32,
        /// How it was made.
        recipe: Recipe,
    },
    /// A virtual input: the source's tokens, scored at these embeddings
    /// (`[len × hidden]`); the row records what the student needs to rebuild it.
    Virtual {
        /// Input word embeddings.
        embeds: Vec<f32>,
        /// How it was made.
        recipe: Recipe,
    },
}

/// How a variant was made: what its row records besides its tokens.
pub enum Recipe {
    /// Mixed with the batch's example `partner`, with one λ for the sequence or one per
    /// position (`None`).
    Mix {
        /// Index of the partner in the batch.
        partner: usize,
        /// Sequence-level λ.
        lambda: Option<f32>,
        /// Per-position λ of a virtual row (the student needs them to rebuild it).
        lambdas: Option<Vec<f32>>,
    },
    /// A gradient-sign step of `epsilon`; a virtual row keeps the signs.
    Step {
        /// The step.
        epsilon: f32,
        /// Gradient signs `[len × hidden]` (virtual rows).
        signs: Option<Vec<i8>>,
    },
    /// Nearest-neighbour token replacement.
    Replace,
}

/// A batch of source examples and what methods share about it.
pub struct Sources<'b> {
    /// The examples.
    pub examples: &'b [Example],
    /// Their tokens.
    pub encs: &'b [Encoded],
    /// The teacher's logits on each source.
    pub logits: Vec<Vec<f32>>,
    teacher_signs: Option<Rc<Vec<Vec<i8>>>>,
    neighbours: Option<(usize, Rc<Vec<u32>>)>,
}

impl Sources<'_> {
    /// The examples' token ids.
    pub fn ids(&self) -> Vec<Vec<u32>> {
        self.encs.iter().map(|e| e.ids.clone()).collect()
    }

    /// Gold labels, else the teacher's prediction (unlabelled splits).
    fn gold(&self, regression: bool) -> Vec<f32> {
        self.examples
            .iter()
            .zip(&self.logits)
            .map(|(e, l)| {
                e.label
                    .unwrap_or(if regression { l[0] } else { argmax(l) as f32 })
            })
            .collect()
    }

    /// Signs of the gradient of the teacher's loss on the gold labels, per example
    /// (computed once per batch, shared by both FGSM methods).
    pub fn teacher_signs(&mut self, space: &Space) -> Result<Rc<Vec<Vec<i8>>>> {
        if let Some(s) = &self.teacher_signs {
            return Ok(s.clone());
        }
        let gold = self.gold(space.teacher.task.is_regression());
        let s = Rc::new(space.gradient_signs(
            &space.teacher.model,
            self.encs,
            GradLoss::Labels(&gold),
        )?);
        self.teacher_signs = Some(s.clone());
        Ok(s)
    }

    /// The `k + 1` nearest tokens of every position of every example, concatenated
    /// (computed once per batch).
    pub fn neighbours(&mut self, space: &mut Space, k: usize) -> Result<Rc<Vec<u32>>> {
        if let Some((kk, n)) = &self.neighbours {
            if *kk == k {
                return Ok(n.clone());
            }
        }
        let ids: Vec<u32> = self
            .encs
            .iter()
            .flat_map(|e| e.ids.iter().copied())
            .collect();
        let nb = Rc::new(space.neighbours_of(&ids, k + 1)?);
        self.neighbours = Some((k, nb.clone()));
        Ok(nb)
    }
}

/// The teacher's embedding space (and a student's, for AugPro-FGSM with a student): the
/// table, its FAISS index, and the teacher to score and differentiate with.
pub struct Space<'a> {
    teacher: &'a Teacher,
    table: Vec<f32>,
    dim: usize,
    projector: Projector,
    /// Exact L2 projection on the teacher's GPU (CUDA with a `Flat` L2 index); FAISS otherwise.
    device_projector: Option<DeviceProjector>,
    /// Median nearest-neighbour distance of the indexed table (the scale of `epsilon_nn`).
    pub nn_scale: f32,
    special: Vec<bool>,
    pad_id: u32,
    student: Option<StudentSpace>,
    /// The `k` nearest tokens of each token searched so far, and that `k`.
    known_neighbours: (usize, HashMap<u32, Vec<u32>>),
}

/// A student's embedding space for AugPro-FGSM with KL(teacher ‖ student).
pub struct StudentSpace {
    model: SeqClassifier,
    table: Vec<f32>,
    dim: usize,
    projector: Projector,
    nn_scale: f32,
}

impl StudentSpace {
    /// The student checkpoint in `dir` and its embedding table indexed for projection (as
    /// configured, without the rows `keep` leaves out); its vocabulary must be the
    /// teacher's (`vocab` tokens).
    fn load(
        dir: &Path,
        teacher: &Teacher,
        vocab: usize,
        keep: impl Fn(u32) -> bool + Copy,
        cfg: &PipelineConfig,
    ) -> Result<Self> {
        let ck = Checkpoint::open(dir)?;
        if ck.config.vocab_size != vocab {
            bail!(
                "{}: student vocabulary has {} tokens, the teacher's has {vocab}; they must \
                 share the vocabulary",
                dir.display(),
                ck.config.vocab_size,
            );
        }
        let (model, _) =
            ck.load_classifier(&teacher.device, false, teacher.task.num_labels, None, 0)?;
        let st = model
            .bert
            .word_embeddings()
            .to_device(&candle_core::Device::Cpu)?
            .to_dtype(DType::F32)?;
        let dim = st.dim(1)?;
        let table: Vec<f32> = st.flatten_all()?.to_vec1()?;
        let (projector, nn_scale) = index_table(&table, dim, keep, &cfg.projection)?;
        Ok(Self {
            model,
            table,
            dim,
            projector,
            nn_scale,
        })
    }
}

/// Makes augmented rows for batches of source examples.
pub struct Engine<'a> {
    space: Space<'a>,
    methods: Vec<Box<dyn Method>>,
}

/// The enabled methods, in the order their rows follow each original.
fn enabled(m: &MethodsConfig) -> Vec<Box<dyn Method>> {
    let mut out: Vec<Box<dyn Method>> = Vec::new();
    if let Some(c) = &m.augpro_mix {
        out.push(Box::new(augpro_mix::AugproMix(c.clone())));
    }
    if let Some(c) = &m.augpro_fgsm {
        out.push(Box::new(augpro_fgsm::AugproFgsm(c.clone())));
    }
    if let Some(c) = &m.fgsm {
        out.push(Box::new(fgsm_baseline::Fgsm(c.clone())));
    }
    if let Some(c) = &m.token_replace {
        out.push(Box::new(token_replace::TokenReplace(c.clone())));
    }
    if let Some(c) = &m.mixup {
        out.push(Box::new(mixup::Mixup(c.clone())));
    }
    out
}

impl<'a> Engine<'a> {
    /// Builds the FAISS index over the teacher's embedding table.
    pub fn new(teacher: &'a Teacher, cfg: &PipelineConfig) -> Result<Self> {
        let t = teacher
            .embedding_table()
            .to_device(&candle_core::Device::Cpu)?
            .to_dtype(DType::F32)?;
        let (_, dim) = t.dims2()?;
        let table: Vec<f32> = t.flatten_all()?.to_vec1()?;
        let tok = &teacher.tokenizer;
        let special: Vec<bool> = (0..table.len() / dim)
            .map(|i| tok.is_special(i as u32))
            .collect();
        let keep = |i: u32| !special[i as usize];
        let (projector, nn_scale) = index_table(&table, dim, keep, &cfg.projection)?;
        let device_projector = if teacher.device.is_cuda()
            && cfg.projection.index == "Flat"
            && cfg.projection.metric == Metric::L2
        {
            Some(DeviceProjector::build(&table, dim, keep, &teacher.device)?)
        } else {
            None
        };
        let student = match cfg
            .methods
            .augpro_fgsm
            .as_ref()
            .and_then(|c| c.student.as_ref())
        {
            Some(dir) => Some(StudentSpace::load(
                dir,
                teacher,
                table.len() / dim,
                keep,
                cfg,
            )?),
            None => None,
        };
        Ok(Self {
            space: Space {
                teacher,
                table,
                dim,
                projector,
                device_projector,
                nn_scale,
                special,
                pad_id: tok.pad_id,
                student,
                known_neighbours: (0, HashMap::new()),
            },
            methods: enabled(&cfg.methods),
        })
    }

    /// Median nearest-neighbour distance of the indexed table (the scale of `epsilon_nn`).
    pub fn nn_scale(&self) -> f32 {
        self.space.nn_scale
    }

    /// The device the teacher runs on.
    pub fn device(&self) -> &candle_core::Device {
        &self.space.teacher.device
    }

    /// The teacher's dtype.
    pub fn dtype(&self) -> DType {
        self.space.teacher.dtype
    }

    /// The teacher's tokenizer.
    pub fn tokenizer(&self) -> &'a crate::tokenize::TextTokenizer {
        &self.space.teacher.tokenizer
    }

    /// Augments one batch of source examples and adds to `stats`. Rows come out grouped by
    /// source example: the original first, then each enabled method in a fixed order, copy
    /// by copy.
    pub fn augment_batch(
        &mut self,
        examples: &[Example],
        encs: &[Encoded],
        seed: u64,
        stats: &mut BTreeMap<String, MethodStats>,
    ) -> Result<Vec<Row>> {
        let space = &mut self.space;
        let logits = {
            let _t = timing::method("original");
            let src: Vec<(&[u32], &[u8])> = encs
                .iter()
                .map(|e| (e.ids.as_slice(), e.type_ids.as_slice()))
                .collect();
            space.logits_ids(&src)?
        };
        let mut src = Sources {
            examples,
            encs,
            logits,
            teacher_signs: None,
            neighbours: None,
        };
        let mut out: Vec<Vec<Row>> = Vec::with_capacity(examples.len());
        {
            let _t = timing::method("original");
            let st = stats.entry("original".into()).or_default();
            for (i, ex) in examples.iter().enumerate() {
                let l = &src.logits[i];
                space.count(st, &encs[i].ids, 0, ex.label, l, false);
                out.push(vec![space.row(&src, i, "original", 0, l, None)?]);
            }
        }
        for m in &self.methods {
            let name = m.name();
            for copy in 0..m.copies() {
                let _t = timing::method(name);
                let mut rng =
                    ChaCha8Rng::seed_from_u64(derive_seed(seed, &[name, &copy.to_string()]));
                let variants = m.variants(space, &mut src, &mut rng)?;
                if variants.is_empty() {
                    continue;
                }
                let logits = space.score(&src, &variants)?;
                let st = stats.entry(name.into()).or_default();
                for (i, (v, l)) in variants.into_iter().zip(logits).enumerate() {
                    let (ids, changed) = match &v {
                        Variant::Tokens { ids, changed, .. } => (ids, *changed),
                        Variant::Virtual { .. } => (&encs[i].ids, 0),
                    };
                    let unchanged = matches!(v, Variant::Tokens { changed: 0, .. });
                    if unchanged && m.drop_unchanged() {
                        st.unchanged_rows += 1;
                        st.dropped_rows += 1;
                        continue;
                    }
                    space.count(st, ids, changed, examples[i].label, &l, unchanged);
                    out[i].push(space.row(&src, i, name, copy as u32, &l, Some(v))?);
                }
            }
        }
        Ok(out.into_iter().flatten().collect())
    }
}

impl Space<'_> {
    fn is_special(&self, id: u32) -> bool {
        self.special.get(id as usize).copied().unwrap_or(true)
    }

    /// Non-special positions of each example (the ones a method may change).
    fn masks(&self, encs: &[Encoded]) -> Vec<Vec<bool>> {
        encs.iter()
            .map(|e| e.ids.iter().map(|&t| !self.is_special(t)).collect())
            .collect()
    }

    /// Absolute ε of a gradient method in the teacher's embedding space.
    pub fn epsilon(&self, c: &FgsmConfig) -> f32 {
        absolute_epsilon(c, self.nn_scale, self.dim)
    }

    /// The `k` nearest tokens of each token of `ids` (`k` per token, concatenated): a
    /// token's neighbours depend on it alone, so each distinct token is searched once per
    /// run.
    fn neighbours_of(&mut self, ids: &[u32], k: usize) -> Result<Vec<u32>> {
        if self.known_neighbours.0 != k {
            self.known_neighbours = (k, HashMap::new());
        }
        let known = &mut self.known_neighbours.1;
        let mut todo: Vec<u32> = ids
            .iter()
            .copied()
            .filter(|t| !known.contains_key(t))
            .collect();
        todo.sort_unstable();
        todo.dedup();
        if !todo.is_empty() {
            let q = rows_of(&self.table, self.dim, &todo);
            let found = {
                let _t = timing::stage("projection");
                self.projector.nearest_k(&q, k)?
            };
            for (t, nb) in todo.iter().zip(found.chunks_exact(k)) {
                known.insert(*t, nb.to_vec());
            }
        }
        Ok(ids.iter().flat_map(|t| known[t].iter().copied()).collect())
    }

    /// Rows of the embedding table for `ids`.
    fn embeds_of(&self, ids: &[u32]) -> Vec<f32> {
        rows_of(&self.table, self.dim, ids)
    }

    /// Projects the rows of `embeds` at positions where `mask` is set; other positions keep `ids`.
    fn project(
        &mut self,
        ids: &[Vec<u32>],
        embeds: &[Vec<f32>],
        masks: &[Vec<bool>],
    ) -> Result<Vec<Vec<u32>>> {
        match &self.device_projector {
            Some(dp) => project_rows(|q, _| dp.nearest(q), self.dim, ids, embeds, masks),
            None => {
                let p = &mut self.projector;
                project_rows(
                    |q, h| p.nearest_with_hints(q, h),
                    self.dim,
                    ids,
                    embeds,
                    masks,
                )
            }
        }
    }

    /// Signs of the gradient of `loss` w.r.t. `model`'s input embeddings, per example
    /// (`[len × hidden]`, zero at special positions).
    fn gradient_signs(
        &self,
        model: &SeqClassifier,
        encs: &[Encoded],
        loss: GradLoss,
    ) -> Result<Vec<Vec<i8>>> {
        let (g, dim) = {
            let _t = timing::stage("teacher");
            let r: Vec<(&[u32], &[u8])> = encs
                .iter()
                .map(|e| (e.ids.as_slice(), e.type_ids.as_slice()))
                .collect();
            let b = self.teacher.batch(&r)?;
            let (_, grad, _) = embedding_grad(model, &b, loss, self.teacher.task.is_regression())?;
            let dim = grad.dim(2)?;
            let g: Vec<Vec<Vec<f32>>> = grad
                .to_dtype(DType::F32)?
                .to_device(&candle_core::Device::Cpu)?
                .to_vec3()?;
            (g, dim)
        };
        Ok(encs
            .iter()
            .zip(&g)
            .map(|(e, gi)| {
                let flat: Vec<f32> = gi[..e.ids.len()].iter().flatten().copied().collect();
                let on: Vec<bool> = e.ids.iter().map(|&t| !self.is_special(t)).collect();
                fgsm::signs(&flat, dim, &on)
            })
            .collect())
    }

    fn logits_ids(&self, rows: &[(&[u32], &[u8])]) -> Result<Vec<Vec<f32>>> {
        let _t = timing::stage("teacher");
        let b = self.teacher.batch(rows)?;
        Ok(self.teacher.logits(&b)?.to_dtype(DType::F32)?.to_vec2()?)
    }

    fn logits_embeds(&self, encs: &[Encoded], embeds: &[&[f32]]) -> Result<Vec<Vec<f32>>> {
        let r: Vec<(&[u32], &[u8])> = encs
            .iter()
            .map(|e| (e.ids.as_slice(), e.type_ids.as_slice()))
            .collect();
        let b = self.teacher.batch(&r)?;
        let pad = self.embeds_of(&[self.pad_id]);
        let mut flat = Vec::with_capacity(encs.len() * b.seq_len * self.dim);
        for e in embeds {
            flat.extend_from_slice(e);
            for _ in e.len() / self.dim..b.seq_len {
                flat.extend_from_slice(&pad);
            }
        }
        let _t = timing::stage("teacher");
        let t = Tensor::from_vec(
            flat,
            (encs.len(), b.seq_len, self.dim),
            &self.teacher.device,
        )?;
        Ok(self
            .teacher
            .logits_from_embeds(&t, &b)?
            .to_dtype(DType::F32)?
            .to_vec2()?)
    }

    /// The teacher's logits for a method's variants: on the tokens of token rows, at the
    /// embeddings of virtual rows. A token row identical to its source already has the
    /// source's logits; only the others go through the teacher.
    fn score(&self, src: &Sources, variants: &[Variant]) -> Result<Vec<Vec<f32>>> {
        let mut tokens = Vec::new();
        let mut virtual_points = Vec::new();
        for (v, e) in variants.iter().zip(src.encs) {
            match v {
                Variant::Tokens { changed: 0, .. } => {}
                Variant::Tokens { ids, .. } => tokens.push((ids.as_slice(), e.type_ids.as_slice())),
                Variant::Virtual { embeds, .. } => virtual_points.push(embeds.as_slice()),
            }
        }
        if !virtual_points.is_empty() {
            if virtual_points.len() != variants.len() {
                bail!("a method made both token and virtual rows in one batch");
            }
            return self.logits_embeds(src.encs, &virtual_points);
        }
        let mut scored = match tokens.is_empty() {
            true => Vec::new(),
            false => self.logits_ids(&tokens)?,
        }
        .into_iter();
        Ok(variants
            .iter()
            .zip(&src.logits)
            .map(|(v, own)| match v {
                Variant::Tokens { changed: 0, .. } => own.clone(),
                _ => scored.next().expect("one score per changed row"),
            })
            .collect())
    }

    /// Adds one row to a method's counters.
    fn count(
        &self,
        st: &mut MethodStats,
        ids: &[u32],
        changed: u32,
        label: Option<f32>,
        logits: &[f32],
        unchanged: bool,
    ) {
        st.rows += 1;
        st.positions += ids.iter().filter(|&&t| !self.is_special(t)).count() as u64;
        st.changed_positions += changed as u64;
        if unchanged {
            st.unchanged_rows += 1;
        }
        if let Some(l) = label {
            if !self.teacher.task.is_regression() && argmax(logits) == l as usize {
                st.teacher_agrees += 1;
            }
        }
    }

    /// The row of source `i` for `variant` (the original row for `None`), with its text
    /// decoded from its tokens.
    fn row(
        &self,
        src: &Sources,
        i: usize,
        method: &'static str,
        copy: u32,
        logits: &[f32],
        variant: Option<Variant>,
    ) -> Result<Row> {
        let ex = &src.examples[i];
        let mut row = source_row(ex.idx, method, copy, &src.encs[i], logits);
        match variant {
            None => row.label = ex.label,
            Some(Variant::Tokens {
                ids,
                changed,
                recipe,
            }) => {
                row.input_ids = ids;
                row.changed_tokens = Some(changed);
                record_recipe(&mut row, recipe, false, src);
            }
            Some(Variant::Virtual { recipe, .. }) => record_recipe(&mut row, recipe, true, src),
        }
        self.decode_texts(&mut row)?;
        Ok(row)
    }

    /// Fills `row.texts` from its tokens: one text, or two for a sentence-pair task.
    fn decode_texts(&self, row: &mut Row) -> Result<()> {
        let (a, b) = {
            let _t = timing::stage("decode");
            self.teacher
                .tokenizer
                .decode_segments(&row.input_ids, &row.token_type_ids)
                .with_context(|| format!("source idx {}: {} row", row.idx, row.method))?
        };
        row.texts.push(a);
        if self.teacher.task.is_pair() {
            row.texts.push(b.unwrap_or_default());
        }
        Ok(())
    }
}

/// A row of source example `idx` as it stands before augmentation: its tokens and the
/// teacher's logits, no label, text or recipe yet.
fn source_row(idx: i64, method: &'static str, copy: u32, enc: &Encoded, logits: &[f32]) -> Row {
    Row {
        texts: Vec::new(),
        label: None,
        idx,
        method,
        copy,
        partner_idx: None,
        lambda: None,
        epsilon: None,
        input_ids: enc.ids.clone(),
        token_type_ids: enc.type_ids.clone(),
        changed_tokens: None,
        teacher_logits: logits.to_vec(),
        partner_input_ids: None,
        partner_token_type_ids: None,
        perturbation: None,
        lambdas: None,
    }
}

/// Records how a variant was made: the partner and λ of a mix (and, for a virtual row, the
/// partner's tokens and per-position λ), or the ε and signs of a gradient step.
fn record_recipe(row: &mut Row, recipe: Recipe, is_virtual: bool, src: &Sources) {
    match recipe {
        Recipe::Mix {
            partner,
            lambda,
            lambdas,
        } => {
            row.partner_idx = Some(src.examples[partner].idx);
            row.lambda = lambda;
            if is_virtual {
                row.lambdas = lambdas;
                row.partner_input_ids = Some(src.encs[partner].ids.clone());
                row.partner_token_type_ids = Some(src.encs[partner].type_ids.clone());
            }
        }
        Recipe::Step { epsilon, signs } => {
            row.epsilon = Some(epsilon);
            row.perturbation = signs;
        }
        Recipe::Replace => {}
    }
}

/// Indexes a table for projection as configured, and measures its median
/// nearest-neighbour distance (the scale of relative ε) with an exact L2 index.
fn index_table(
    table: &[f32],
    dim: usize,
    keep: impl Fn(u32) -> bool + Copy,
    cfg: &crate::config::ProjectionConfig,
) -> Result<(Projector, f32)> {
    let exact = Projector::build(table, dim, keep, "Flat", Metric::L2)?;
    let scale = median_nn_distance(&exact, 2000)?;
    if cfg.index == "Flat" && cfg.metric == Metric::L2 {
        return Ok((exact, scale));
    }
    Ok((
        Projector::build_with(
            table,
            dim,
            keep,
            &cfg.index,
            cfg.metric,
            cfg.params.as_deref(),
        )?,
        scale,
    ))
}

/// Per-coordinate ε of a gradient method: `epsilon`, or `epsilon_nn` × the table's median
/// nearest-neighbour distance `scale` / √`dim` (a step of L2 length `epsilon_nn`·`scale`).
fn absolute_epsilon(c: &FgsmConfig, scale: f32, dim: usize) -> f32 {
    match (c.epsilon, c.epsilon_nn) {
        (Some(e), _) => e as f32,
        (None, Some(r)) => (r * scale as f64 / (dim as f64).sqrt()) as f32,
        _ => 0.0,
    }
}

/// Projects the positions of `embeds` where `masks` is set, in one batched search
/// (`nearest(queries, source ids)`); other positions keep their ids.
fn project_rows(
    mut nearest: impl FnMut(&[f32], &[u32]) -> Result<Vec<u32>>,
    d: usize,
    ids: &[Vec<u32>],
    embeds: &[Vec<f32>],
    masks: &[Vec<bool>],
) -> Result<Vec<Vec<u32>>> {
    let _t = timing::stage("projection");
    let (mut q, mut hints) = (Vec::new(), Vec::new());
    for ((e, m), row) in embeds.iter().zip(masks).zip(ids) {
        for (p, &on) in m.iter().enumerate() {
            if on {
                q.extend_from_slice(&e[p * d..(p + 1) * d]);
                hints.push(row[p]);
            }
        }
    }
    // The source token is the answer wherever the point stayed close to it.
    let found = nearest(&q, &hints)?;
    let mut it = found.into_iter();
    Ok(ids
        .iter()
        .zip(masks)
        .map(|(row, m)| {
            row.iter()
                .zip(m)
                .map(
                    |(&t, &on)| match on.then(|| it.next().expect("one result per query")) {
                        Some(found) if found != project::MISSING => found,
                        _ => t,
                    },
                )
                .collect()
        })
        .collect())
}

/// Token variants of projected rows: each with its count of changed positions.
fn token_variants(
    src: &Sources,
    projected: Vec<Vec<u32>>,
    recipe: impl Fn(usize) -> Recipe,
) -> Vec<Variant> {
    projected
        .into_iter()
        .zip(src.encs)
        .enumerate()
        .map(|(i, (ids, e))| Variant::Tokens {
            changed: changed(&e.ids, &ids),
            ids,
            recipe: recipe(i),
        })
        .collect()
}

/// Number of positions where two equal-length sequences differ.
pub fn changed(a: &[u32], b: &[u32]) -> u32 {
    a.iter().zip(b).filter(|(x, y)| x != y).count() as u32
}

#[cfg(test)]
mod tests {
    use super::absolute_epsilon;
    use crate::config::FgsmConfig;

    #[test]
    fn epsilon_nn_is_an_l2_step_in_nearest_neighbour_distances() {
        let c = |e: Option<f64>, nn: Option<f64>| FgsmConfig {
            epsilon: e,
            epsilon_nn: nn,
            epsilon_rel: None,
            student: None,
            drop_unchanged: false,
        };
        // ε·sign(g) has L2 length ε·√dim: epsilon_nn = 1 steps one median distance.
        for dim in [384usize, 768] {
            let eps = absolute_epsilon(&c(None, Some(1.0)), 2.0, dim);
            assert!(
                (eps as f64 * (dim as f64).sqrt() - 2.0).abs() < 1e-5,
                "{dim}"
            );
        }
        assert_eq!(absolute_epsilon(&c(Some(0.3), None), 2.0, 384), 0.3);
    }
}
