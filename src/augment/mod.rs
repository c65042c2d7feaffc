//! The augmentation stage: AugPro-Mix, AugPro-FGSM and the baselines (token replacement,
//! MixUp, FGSM), all working in the teacher's word-embedding space and sharing one
//! FAISS projection back to the vocabulary. Every emitted row carries the teacher's
//! logits on exactly its input.

pub mod fgsm;
pub mod mix;
pub mod project;
pub mod project_device;
pub mod replace;

use crate::config::{FgsmConfig, MethodsConfig, PipelineConfig};
use crate::data::Example;
use crate::metrics::argmax;
use crate::model::{Checkpoint, SeqClassifier};
use crate::shards::Row;
use crate::teacher::{embedding_grad, GradLoss, Teacher};
use crate::tokenize::Encoded;
use crate::util::derive_seed;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use mix::LambdaMode;
use project::{median_nn_distance, Projector};
use project_device::DeviceProjector;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Instant;

/// Per-method counters, summed over batches and shards.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct MethodStats {
    /// Rows written.
    pub rows: u64,
    /// Non-special positions in the written rows.
    pub positions: u64,
    /// Positions whose token differs from the source (projected methods).
    pub changed_positions: u64,
    /// Rows identical to their source (written or dropped).
    pub unchanged_rows: u64,
    /// Rows dropped by `drop_unchanged`.
    pub dropped_rows: u64,
    /// Rows whose teacher prediction equals the source's gold label (classification).
    pub teacher_agrees: u64,
}

impl MethodStats {
    /// Adds another counter set.
    pub fn add(&mut self, o: &MethodStats) {
        self.rows += o.rows;
        self.positions += o.positions;
        self.changed_positions += o.changed_positions;
        self.unchanged_rows += o.unchanged_rows;
        self.dropped_rows += o.dropped_rows;
        self.teacher_agrees += o.teacher_agrees;
    }
}

/// Counters plus time per method for one run.
#[derive(Debug, Clone, Default)]
pub struct BatchReport {
    /// Counters per method.
    pub stats: BTreeMap<String, MethodStats>,
    /// Seconds per method (teacher time included).
    pub seconds: BTreeMap<String, f64>,
}

/// Makes augmented rows for batches of source examples.
pub struct Engine<'a> {
    teacher: &'a Teacher,
    table: Vec<f32>,
    dim: usize,
    projector: Projector,
    /// Exact L2 projection on the teacher's GPU (CUDA with a `Flat` L2 index); FAISS otherwise.
    device_projector: Option<DeviceProjector>,
    methods: MethodsConfig,
    /// Median nearest-neighbour distance of the indexed table (the scale of `epsilon_rel`).
    pub nn_scale: f32,
    special: Vec<bool>,
    pad_id: u32,
    stages: std::cell::RefCell<BTreeMap<String, f64>>,
    student: Option<StudentSpace>,
}

/// A student's embedding space for AugPro-FGSM with KL(teacher ‖ student).
struct StudentSpace {
    model: SeqClassifier,
    table: Vec<f32>,
    dim: usize,
    projector: Projector,
    nn_scale: f32,
}

struct Variant {
    ids: Vec<u32>,
    partner: Option<usize>,
    lambda: Option<f32>,
    epsilon: Option<f32>,
    changed: Option<u32>,
    embeds: Option<Vec<f32>>,
    partner_ids: Option<(Vec<u32>, Vec<u8>)>,
    perturbation: Option<Vec<i8>>,
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
            && cfg.projection.metric == project::Metric::L2
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
            Some(dir) => {
                let ck = Checkpoint::open(dir)?;
                if ck.config.vocab_size != table.len() / dim {
                    bail!("{}: student vocabulary has {} tokens, the teacher's has {}; they must share the vocabulary", dir.display(), ck.config.vocab_size, table.len() / dim);
                }
                let (model, _) =
                    ck.load_classifier(&teacher.device, false, teacher.task.num_labels, None, 0)?;
                let st = model
                    .bert
                    .word_embeddings()
                    .to_device(&candle_core::Device::Cpu)?
                    .to_dtype(DType::F32)?;
                let sdim = st.dim(1)?;
                let stable: Vec<f32> = st.flatten_all()?.to_vec1()?;
                let (projector, nn_scale) = index_table(&stable, sdim, keep, &cfg.projection)?;
                Some(StudentSpace {
                    model,
                    table: stable,
                    dim: sdim,
                    projector,
                    nn_scale,
                })
            }
            None => None,
        };
        Ok(Self {
            teacher,
            table,
            dim,
            projector,
            device_projector,
            methods: cfg.methods.clone(),
            nn_scale,
            special,
            pad_id: tok.pad_id,
            stages: Default::default(),
            student,
        })
    }

    /// Adds `secs` to the time of a pipeline stage (`teacher`, `projection`, `decode`, ...).
    pub fn add_stage(&self, stage: &str, secs: f64) {
        *self
            .stages
            .borrow_mut()
            .entry(stage.to_string())
            .or_default() += secs;
    }

    /// Seconds spent per stage since the last call (drains the counters).
    pub fn take_stage_seconds(&self) -> BTreeMap<String, f64> {
        std::mem::take(&mut *self.stages.borrow_mut())
    }

    /// The device the teacher runs on.
    pub fn device(&self) -> &candle_core::Device {
        &self.teacher.device
    }

    /// The teacher's dtype.
    pub fn dtype(&self) -> DType {
        self.teacher.dtype
    }

    /// The teacher's tokenizer.
    pub fn tokenizer(&self) -> &'a crate::tokenize::TextTokenizer {
        &self.teacher.tokenizer
    }

    /// The projector (for inspection and benchmarks).
    pub fn projector(&mut self) -> &mut Projector {
        &mut self.projector
    }

    fn is_special(&self, id: u32) -> bool {
        self.special.get(id as usize).copied().unwrap_or(true)
    }

    /// Absolute ε of a gradient method in the teacher's embedding space.
    pub fn epsilon(&self, c: &FgsmConfig) -> f32 {
        absolute_epsilon(c, self.nn_scale)
    }

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
        let t = Instant::now();
        let out = match &self.device_projector {
            Some(dp) => project_rows(|q| dp.nearest(q), self.dim, ids, embeds, masks),
            None => project_rows(|q| self.projector.nearest(q), self.dim, ids, embeds, masks),
        };
        self.add_stage("projection", t.elapsed().as_secs_f64());
        out
    }

    /// Signs of the gradient of `loss` w.r.t. `model`'s input embeddings, per example
    /// (`[len × hidden]`, zero at special positions).
    fn gradient_signs(
        &self,
        model: &SeqClassifier,
        encs: &[Encoded],
        loss: GradLoss,
    ) -> Result<Vec<Vec<i8>>> {
        let t = Instant::now();
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
        self.add_stage("teacher", t.elapsed().as_secs_f64());
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

    fn logits_ids(&self, rows: &[(Vec<u32>, &[u8])]) -> Result<Vec<Vec<f32>>> {
        let r: Vec<(&[u32], &[u8])> = rows.iter().map(|(a, b)| (a.as_slice(), *b)).collect();
        let t = Instant::now();
        let b = self.teacher.batch(&r)?;
        let out = self.teacher.logits(&b)?.to_dtype(DType::F32)?.to_vec2()?;
        self.add_stage("teacher", t.elapsed().as_secs_f64());
        Ok(out)
    }

    fn logits_embeds(&self, encs: &[&Encoded], embeds: &[Vec<f32>]) -> Result<Vec<Vec<f32>>> {
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
        let t0 = Instant::now();
        let t = Tensor::from_vec(
            flat,
            (encs.len(), b.seq_len, self.dim),
            &self.teacher.device,
        )?;
        let out = self
            .teacher
            .logits_from_embeds(&t, &b)?
            .to_dtype(DType::F32)?
            .to_vec2()?;
        self.add_stage("teacher", t0.elapsed().as_secs_f64());
        Ok(out)
    }

    fn partners(&self, n: usize, rng: &mut ChaCha8Rng) -> Vec<usize> {
        (0..n)
            .map(|i| {
                let j = rng.gen_range(0..n - 1);
                if j >= i {
                    j + 1
                } else {
                    j
                }
            })
            .collect()
    }

    fn mix_variants(
        &mut self,
        encs: &[&Encoded],
        c: &crate::config::MixConfig,
        project: bool,
        rng: &mut ChaCha8Rng,
    ) -> Result<Vec<Variant>> {
        if encs.len() < 2 {
            // No partner other than the example itself: no mixed row.
            return Ok(Vec::new());
        }
        let partners = self.partners(encs.len(), rng);
        let mut ids = Vec::new();
        let mut embeds = Vec::new();
        let mut masks = Vec::new();
        let mut lambdas = Vec::new();
        for (i, e) in encs.iter().enumerate() {
            let p = encs[partners[i]];
            let al = mix::align(&e.ids, &e.type_ids, &p.ids, &p.type_ids, &|t| {
                self.is_special(t)
            });
            let (lam, per_pos): (Option<f32>, Vec<f32>) = match c.lambda_mode {
                LambdaMode::Sequence => {
                    let l = mix::draw_lambda(rng, c.alpha, c.lambda_min);
                    (Some(l), vec![l; e.ids.len()])
                }
                LambdaMode::Position => (
                    None,
                    (0..e.ids.len())
                        .map(|_| mix::draw_lambda(rng, c.alpha, c.lambda_min))
                        .collect(),
                ),
            };
            embeds.push(mix::mix(
                &self.table,
                self.dim,
                &e.ids,
                &p.ids,
                &al,
                &per_pos,
            ));
            masks.push(al.iter().map(|a| a.is_some()).collect::<Vec<bool>>());
            ids.push(e.ids.clone());
            lambdas.push(lam);
        }
        let projected = if project {
            Some(self.project(&ids, &embeds, &masks)?)
        } else {
            None
        };
        Ok((0..encs.len())
            .map(|i| {
                let p = encs[partners[i]];
                match &projected {
                    Some(pr) => Variant {
                        changed: Some(changed(&encs[i].ids, &pr[i])),
                        ids: pr[i].clone(),
                        partner: Some(partners[i]),
                        lambda: lambdas[i],
                        epsilon: None,
                        embeds: None,
                        partner_ids: None,
                        perturbation: None,
                    },
                    None => Variant {
                        ids: encs[i].ids.clone(),
                        partner: Some(partners[i]),
                        lambda: lambdas[i],
                        epsilon: None,
                        changed: None,
                        embeds: Some(std::mem::take(&mut embeds[i])),
                        partner_ids: Some((p.ids.clone(), p.type_ids.clone())),
                        perturbation: None,
                    },
                }
            })
            .collect())
    }

    /// Augments one batch of source examples. Rows come out grouped by source example:
    /// the original first, then each enabled method in a fixed order, copy by copy.
    pub fn augment_batch(
        &mut self,
        examples: &[Example],
        encs: &[Encoded],
        seed: u64,
        report: &mut BatchReport,
    ) -> Result<Vec<Row>> {
        let n = examples.len();
        let refs: Vec<&Encoded> = encs.iter().collect();
        let mut out: Vec<Vec<Row>> = vec![Vec::new(); n];
        let t0 = Instant::now();
        let src: Vec<(Vec<u32>, &[u8])> = encs
            .iter()
            .map(|e| (e.ids.clone(), e.type_ids.as_slice()))
            .collect();
        let orig_logits = self.logits_ids(&src)?;
        let mut results: Vec<(&'static str, u32, Vec<Variant>, bool)> = Vec::new();
        self.account(report, "original", t0);
        let methods = self.methods.clone();

        if let Some(c) = &methods.augpro_mix {
            for copy in 0..c.copies {
                let t = Instant::now();
                let mut rng = ChaCha8Rng::seed_from_u64(derive_seed(
                    seed,
                    &["augpro_mix", &copy.to_string()],
                ));
                let v = self.mix_variants(&refs, c, true, &mut rng)?;
                results.push(("augpro_mix", copy as u32, v, c.drop_unchanged));
                self.account(report, "augpro_mix", t);
            }
        }
        let gold: Vec<f32> = examples
            .iter()
            .zip(&orig_logits)
            .map(|(e, l)| {
                e.label.unwrap_or(if self.teacher.task.is_regression() {
                    l[0]
                } else {
                    argmax(l) as f32
                })
            })
            .collect();
        let student_fgsm = methods
            .augpro_fgsm
            .as_ref()
            .is_some_and(|c| c.student.is_some());
        let teacher_signs =
            if methods.fgsm.is_some() || (methods.augpro_fgsm.is_some() && !student_fgsm) {
                let t = Instant::now();
                let s = self.gradient_signs(&self.teacher.model, encs, GradLoss::Labels(&gold))?;
                Some((s, t.elapsed().as_secs_f64()))
            } else {
                None
            };
        if let Some(c) = &methods.augpro_fgsm {
            let t = Instant::now();
            let eps = match &self.student {
                Some(st) => absolute_epsilon(c, st.nn_scale),
                None => self.epsilon(c),
            };
            let ids: Vec<Vec<u32>> = encs.iter().map(|e| e.ids.clone()).collect();
            let masks: Vec<Vec<bool>> = encs
                .iter()
                .map(|e| e.ids.iter().map(|&t| !self.is_special(t)).collect())
                .collect();
            let projected = match self.student.take() {
                // KL(teacher ‖ student), gradient and projection in the student's embedding space.
                Some(mut st) => {
                    let res = (|| -> Result<Vec<Vec<u32>>> {
                        let signs = if self.teacher.task.is_regression() {
                            let target: Vec<f32> = orig_logits.iter().map(|l| l[0]).collect();
                            self.gradient_signs(&st.model, encs, GradLoss::Labels(&target))?
                        } else {
                            let flat: Vec<f32> = orig_logits.iter().flatten().copied().collect();
                            let lt = Tensor::from_vec(
                                flat,
                                (n, self.teacher.task.num_labels),
                                &self.teacher.device,
                            )?;
                            let p = candle_nn::ops::softmax_last_dim(&lt)?;
                            self.gradient_signs(&st.model, encs, GradLoss::Distribution(&p))?
                        };
                        let embeds: Vec<Vec<f32>> = encs
                            .iter()
                            .zip(&signs)
                            .map(|(e, s)| fgsm::apply(&rows_of(&st.table, st.dim, &e.ids), s, eps))
                            .collect();
                        let tp = Instant::now();
                        let out = project_rows(
                            |q| st.projector.nearest(q),
                            st.dim,
                            &ids,
                            &embeds,
                            &masks,
                        );
                        self.add_stage("projection", tp.elapsed().as_secs_f64());
                        out
                    })();
                    self.student = Some(st);
                    res?
                }
                None => {
                    let (signs, gs) = teacher_signs.as_ref().expect("teacher gradient computed");
                    *report.seconds.entry("augpro_fgsm".to_string()).or_default() +=
                        if methods.fgsm.is_some() {
                            gs / 2.0
                        } else {
                            *gs
                        };
                    let embeds: Vec<Vec<f32>> = encs
                        .iter()
                        .zip(signs)
                        .map(|(e, s)| fgsm::apply(&self.embeds_of(&e.ids), s, eps))
                        .collect();
                    self.project(&ids, &embeds, &masks)?
                }
            };
            let v = projected
                .into_iter()
                .zip(encs)
                .map(|(p, e)| Variant {
                    changed: Some(changed(&e.ids, &p)),
                    ids: p,
                    partner: None,
                    lambda: None,
                    epsilon: Some(eps),
                    embeds: None,
                    partner_ids: None,
                    perturbation: None,
                })
                .collect();
            results.push(("augpro_fgsm", 0, v, c.drop_unchanged));
            self.account(report, "augpro_fgsm", t);
        }
        if let Some(c) = &methods.fgsm {
            let t = Instant::now();
            let eps = self.epsilon(c);
            let (signs, gs) = teacher_signs.as_ref().expect("teacher gradient computed");
            *report.seconds.entry("fgsm".to_string()).or_default() +=
                if methods.augpro_fgsm.is_some() && !student_fgsm {
                    gs / 2.0
                } else {
                    *gs
                };
            let v = encs
                .iter()
                .zip(signs)
                .map(|(e, s)| Variant {
                    ids: e.ids.clone(),
                    partner: None,
                    lambda: None,
                    epsilon: Some(eps),
                    changed: None,
                    embeds: Some(fgsm::apply(&self.embeds_of(&e.ids), s, eps)),
                    partner_ids: None,
                    perturbation: Some(s.clone()),
                })
                .collect();
            results.push(("fgsm", 0, v, false));
            self.account(report, "fgsm", t);
        }
        if let Some(c) = &methods.token_replace {
            let t = Instant::now();
            let k = c.k;
            let mut q = Vec::new();
            for e in encs {
                q.extend(self.embeds_of(&e.ids));
            }
            let ts = Instant::now();
            let (nb, _) = self.projector.search(&q, k + 1)?;
            self.add_stage("projection", ts.elapsed().as_secs_f64());
            let mut off = 0;
            let per_row: Vec<&[u32]> = encs
                .iter()
                .map(|e| {
                    let s = &nb[off..off + e.ids.len() * (k + 1)];
                    off += e.ids.len() * (k + 1);
                    s
                })
                .collect();
            self.account(report, "token_replace", t);
            for copy in 0..c.copies {
                let t = Instant::now();
                let mut rng = ChaCha8Rng::seed_from_u64(derive_seed(
                    seed,
                    &["token_replace", &copy.to_string()],
                ));
                let v = encs
                    .iter()
                    .zip(&per_row)
                    .map(|(e, nbs)| {
                        let ids = replace::replace(
                            &e.ids,
                            &|t| self.is_special(t),
                            c.p,
                            k,
                            nbs,
                            &mut rng,
                        );
                        Variant {
                            changed: Some(changed(&e.ids, &ids)),
                            ids,
                            partner: None,
                            lambda: None,
                            epsilon: None,
                            embeds: None,
                            partner_ids: None,
                            perturbation: None,
                        }
                    })
                    .collect();
                results.push(("token_replace", copy as u32, v, c.drop_unchanged));
                self.account(report, "token_replace", t);
            }
        }
        if let Some(c) = &methods.mixup {
            for copy in 0..c.copies {
                let t = Instant::now();
                let mut rng =
                    ChaCha8Rng::seed_from_u64(derive_seed(seed, &["mixup", &copy.to_string()]));
                let v = self.mix_variants(&refs, c, false, &mut rng)?;
                results.push(("mixup", copy as u32, v, false));
                self.account(report, "mixup", t);
            }
        }

        // Original rows.
        for i in 0..n {
            let st = report.stats.entry("original".into()).or_default();
            self.push_stats(
                st,
                &encs[i].ids,
                Some(0),
                examples[i].label,
                &orig_logits[i],
                false,
            );
            out[i].push(self.row(
                &examples[i],
                &encs[i],
                "original",
                0,
                examples[i].label,
                &orig_logits[i],
                None,
                None,
                None,
                None,
                None,
                None,
                None,
                None,
            ));
        }
        // Teacher logits for every variant, then rows.
        for (name, copy, variants, drop_unchanged) in results {
            if variants.is_empty() {
                continue;
            }
            let t = Instant::now();
            let logits = if variants.iter().any(|v| v.embeds.is_some()) {
                let em: Vec<Vec<f32>> = variants
                    .iter()
                    .map(|v| v.embeds.clone().expect("virtual"))
                    .collect();
                self.logits_embeds(&refs, &em)?
            } else {
                let rows: Vec<(Vec<u32>, &[u8])> = variants
                    .iter()
                    .zip(encs)
                    .map(|(v, e)| (v.ids.clone(), e.type_ids.as_slice()))
                    .collect();
                self.logits_ids(&rows)?
            };
            for (i, (v, l)) in variants.into_iter().zip(logits).enumerate() {
                let st = report.stats.entry(name.into()).or_default();
                let unchanged = v.changed == Some(0);
                if unchanged && drop_unchanged {
                    st.unchanged_rows += 1;
                    st.dropped_rows += 1;
                    continue;
                }
                self.push_stats(st, &v.ids, v.changed, examples[i].label, &l, unchanged);
                let partner_idx = v.partner.map(|p| examples[p].idx);
                let (pids, ptypes) = match v.partner_ids {
                    Some((a, b)) => (Some(a), Some(b)),
                    None => (None, None),
                };
                out[i].push(self.row(
                    &examples[i],
                    &encs[i],
                    name,
                    copy,
                    None,
                    &l,
                    Some(v.ids),
                    partner_idx,
                    v.lambda,
                    v.epsilon,
                    v.changed,
                    pids,
                    ptypes,
                    v.perturbation,
                ));
            }
            self.account(report, name, t);
        }
        Ok(out.into_iter().flatten().collect())
    }

    fn account(&self, report: &mut BatchReport, name: &str, t: Instant) {
        *report.seconds.entry(name.to_string()).or_default() += t.elapsed().as_secs_f64();
    }

    fn push_stats(
        &self,
        st: &mut MethodStats,
        ids: &[u32],
        changed: Option<u32>,
        label: Option<f32>,
        logits: &[f32],
        unchanged: bool,
    ) {
        st.rows += 1;
        st.positions += ids.iter().filter(|&&t| !self.is_special(t)).count() as u64;
        st.changed_positions += changed.unwrap_or(0) as u64;
        if unchanged {
            st.unchanged_rows += 1;
        }
        if let Some(l) = label {
            if !self.teacher.task.is_regression() && argmax(logits) == l as usize {
                st.teacher_agrees += 1;
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn row(
        &self,
        ex: &Example,
        enc: &Encoded,
        method: &'static str,
        copy: u32,
        label: Option<f32>,
        logits: &[f32],
        ids: Option<Vec<u32>>,
        partner_idx: Option<i64>,
        lambda: Option<f32>,
        epsilon: Option<f32>,
        changed: Option<u32>,
        partner_input_ids: Option<Vec<u32>>,
        partner_token_type_ids: Option<Vec<u8>>,
        perturbation: Option<Vec<i8>>,
    ) -> Row {
        let ids = ids.unwrap_or_else(|| enc.ids.clone());
        let t = Instant::now();
        let (a, b) = self
            .teacher
            .tokenizer
            .decode_segments(&ids, &enc.type_ids)
            .unwrap_or_default();
        self.add_stage("decode", t.elapsed().as_secs_f64());
        let mut texts = vec![a];
        if self.teacher.task.is_pair() {
            texts.push(b.unwrap_or_default());
        }
        Row {
            texts,
            label,
            idx: ex.idx,
            method,
            copy,
            partner_idx,
            lambda,
            epsilon,
            input_ids: ids,
            token_type_ids: enc.type_ids.clone(),
            changed_tokens: changed,
            teacher_logits: logits.to_vec(),
            partner_input_ids,
            partner_token_type_ids,
            perturbation,
        }
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
    let mut exact = Projector::build(table, dim, keep, "Flat", project::Metric::L2)?;
    let scale = median_nn_distance(table, dim, &mut exact, 2000)?;
    if cfg.index == "Flat" && cfg.metric == project::Metric::L2 {
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

/// ε of a gradient method: `epsilon`, or `epsilon_rel` × the table's median
/// nearest-neighbour distance `scale`.
fn absolute_epsilon(c: &FgsmConfig, scale: f32) -> f32 {
    match (c.epsilon, c.epsilon_rel) {
        (Some(e), _) => e as f32,
        (None, Some(r)) => r as f32 * scale,
        _ => 0.0,
    }
}

/// Rows of `table` (`dim` wide) for the given ids, concatenated.
fn rows_of(table: &[f32], dim: usize, ids: &[u32]) -> Vec<f32> {
    ids.iter()
        .flat_map(|&t| {
            table[t as usize * dim..(t as usize + 1) * dim]
                .iter()
                .copied()
        })
        .collect()
}

/// Projects the positions of `embeds` where `masks` is set, in one batched search; other
/// positions keep their ids.
fn project_rows(
    mut nearest: impl FnMut(&[f32]) -> Result<Vec<u32>>,
    d: usize,
    ids: &[Vec<u32>],
    embeds: &[Vec<f32>],
    masks: &[Vec<bool>],
) -> Result<Vec<Vec<u32>>> {
    let mut q = Vec::new();
    for (e, m) in embeds.iter().zip(masks) {
        for (p, &on) in m.iter().enumerate() {
            if on {
                q.extend_from_slice(&e[p * d..(p + 1) * d]);
            }
        }
    }
    let found = nearest(&q)?;
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

/// Number of positions where two equal-length sequences differ.
pub fn changed(a: &[u32], b: &[u32]) -> u32 {
    a.iter().zip(b).filter(|(x, y)| x != y).count() as u32
}
