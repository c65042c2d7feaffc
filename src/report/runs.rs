//! The report's student runs: where each lives, the key that decides whether a finished run
//! can be reused, and the shards each trains on.
//!
//! Tuning runs and final runs never share anything: tuning seeds start at
//! [`TUNE_SEED_BASE`] (final seeds at 0), the two live in separate directories
//! (`students/tune/…`, `students/final/…`), and the role is part of the reuse key, so a
//! run that won a dev argmax cannot come back as a final value.

use super::{suffix, Budget, ReportOptions, Setting, FIRST_ROUND};
use crate::config::PipelineConfig;
use crate::pipeline::{self, RunOptions};
use crate::shards::manifest::{read_manifest, Manifest};
use crate::storage::Location;
use crate::student::{self, StudentConfig, StudentMetrics};
use crate::task::TaskSpec;
use crate::util::{atomic_write, sha256_bytes, sha256_file};
use anyhow::{bail, Context, Result};
use candle_core::Device;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Version of what a student run computes. Bump it when a change of the training or
/// evaluation code changes a run's result, so that no earlier run is reused.
pub const RUN_FORMAT_VERSION: u32 = 3;

/// First seed of the tuning runs; final runs use seeds `0..seeds`, so the two ranges never
/// meet (at most this many final seeds).
pub const TUNE_SEED_BASE: u64 = 1000;

/// What a run is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Scored on dev to choose a method's grid point.
    Tune,
    /// A value of a final row (validation).
    Final,
}

impl Role {
    /// The seed of the `i`-th run of this role.
    pub fn seed(self, i: usize) -> u64 {
        match self {
            Role::Tune => TUNE_SEED_BASE + i as u64,
            Role::Final => i as u64,
        }
    }

    /// The directory (under `students/`) of this role's runs.
    pub fn dir(self) -> &'static str {
        match self {
            Role::Tune => "tune",
            Role::Final => "final",
        }
    }
}

/// sha256 of files, each computed once per report run (model weights and source splits are
/// large, and every run's key needs them).
#[derive(Default)]
pub struct FileHashes(Mutex<BTreeMap<PathBuf, String>>);

impl FileHashes {
    /// sha256 of `path`'s bytes.
    pub fn get(&self, path: &Path) -> Result<String> {
        // Held while hashing, so runs side by side never read the same file twice.
        let mut cache = self.0.lock().expect("hash cache");
        if let Some(h) = cache.get(path) {
            return Ok(h.clone());
        }
        let h = sha256_file(path)?;
        cache.insert(path.to_path_buf(), h.clone());
        Ok(h)
    }
}

/// Everything that changes a student run's result. A finished run is reused only when its
/// recorded key equals this one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunKey {
    /// [`RUN_FORMAT_VERSION`].
    pub run_format_version: u32,
    /// Tuning or final.
    pub role: Role,
    /// GLUE task.
    pub task: String,
    /// Dev metric that chooses the checkpoint.
    pub checkpoint_metric: String,
    /// sha256 of the student's base weights file.
    pub base_weights_sha256: String,
    /// sha256 of each source data file the run reads (train for dev, validation).
    pub source_sha256: BTreeMap<String, String>,
    /// sha256 of the shards' pipeline configuration.
    pub shards_config_sha256: String,
    /// sha256 over the shards' teacher weights and every shard file's sha256.
    pub shards_data_sha256: String,
    /// The student configuration: seed, steps, learning rate, layers, methods, ….
    pub student: serde_json::Value,
    /// Where the student trains, with the CPU's kernels ([`crate::device::device_name`]):
    /// AVX-512, AVX2 and CUDA sum in different orders, so their f32 results differ.
    #[serde(default = "recorded_before_devices")]
    pub students_ran_on: String,
}

/// The device of a record written before keys named one: every such committed record was
/// made on CPUs with AVX-512 (docs/comparison.md).
fn recorded_before_devices() -> String {
    "cpu (AVX-512)".into()
}

impl RunKey {
    fn new(cx: &TaskCtx, role: Role, m: &Manifest, scfg: &StudentConfig) -> Result<Self> {
        let weights = scfg.model.join("model.safetensors");
        let mut data = vec![format!("teacher {}", teacher_sha(m))];
        for s in &m.shards {
            data.extend(s.files.iter().map(|f| format!("{} {}", f.file, f.sha256)));
        }
        Ok(Self {
            run_format_version: RUN_FORMAT_VERSION,
            role,
            task: cx.task.name.clone(),
            checkpoint_metric: cx.task.primary_metric().into(),
            base_weights_sha256: cx.hashes.get(&weights)?,
            source_sha256: cx.source_sha256()?,
            shards_config_sha256: m.config_sha256.clone(),
            shards_data_sha256: sha256_bytes(data.join("\n").as_bytes()),
            student: serde_json::to_value(scfg)?,
            students_ran_on: crate::device::device_name(cx.device).into(),
        })
    }
}

fn teacher_sha(m: &Manifest) -> &str {
    m.shards.first().map_or("", |s| s.teacher_sha256.as_str())
}

/// One finished student run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Run {
    pub method: String,
    pub setting: String,
    pub seed: u64,
    /// NaN (JSON `null`) for a diverged tuning run.
    #[serde(deserialize_with = "super::stats::nan_as_null::score")]
    pub dev: f64,
    #[serde(deserialize_with = "super::stats::nan_as_null::score")]
    pub validation: f64,
    pub rows: usize,
    pub steps: usize,
    pub best_step: usize,
    pub train_seconds: f64,
    #[serde(deserialize_with = "super::stats::nan_as_null::curve")]
    pub curve: Vec<(usize, f64)>,
    /// Directory, relative to the task's report directory.
    #[serde(default)]
    pub dir: String,
}

/// One line of the run log: which run was trained in this command and which reused.
#[derive(Debug, Clone, Serialize)]
pub struct LogEntry {
    pub role: Role,
    pub method: String,
    pub setting: String,
    pub seed: u64,
    pub dir: String,
    /// `trained` or `reused`.
    pub status: &'static str,
}

/// Everything one task's runs share.
pub struct TaskCtx<'a> {
    pub o: &'a ReportOptions,
    pub task: &'static TaskSpec,
    pub base_set: Vec<String>,
    pub pipe_path: PathBuf,
    pub glue_dir: PathBuf,
    pub dir: PathBuf,
    pub budget: Budget,
    /// Student steps per run (known once plain KD's shards are made).
    pub steps: usize,
    pub device: &'a Device,
    pub hashes: &'a FileHashes,
    pub first_round: Option<PathBuf>,
    pub log: Mutex<Vec<LogEntry>>,
}

impl<'a> TaskCtx<'a> {
    pub fn new(
        o: &'a ReportOptions,
        task: &'static TaskSpec,
        budget: Budget,
        hashes: &'a FileHashes,
        device: &'a Device,
    ) -> Result<Self> {
        let pipe_path = o.pipeline.clone().unwrap_or_else(|| {
            if o.preset == "smoke" && task.name == "sst2" {
                PathBuf::from("pipelines/smoke.toml")
            } else {
                PathBuf::from(format!("pipelines/{}.toml", task.name))
            }
        });
        // The smoke preset shrinks the other tasks' teachers and dev splits to CI size.
        let mut base_set: Vec<String> = Vec::new();
        if o.preset == "smoke" && pipe_path != Path::new("pipelines/smoke.toml") {
            base_set.extend(
                [
                    "teacher.train.max_train_examples=320",
                    "teacher.train.epochs=1",
                    "dev.max_examples=200",
                ]
                .map(String::from),
            );
        }
        base_set.extend(o.overrides.iter().cloned());
        let dir = o.out.join(format!("{}{}", task.name, suffix(o)));
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("{}: cannot create report directory", dir.display()))?;
        Ok(Self {
            o,
            task,
            base_set,
            pipe_path,
            glue_dir: crate::data::resolve_glue_dir(o.glue_dir.as_deref()),
            dir,
            budget,
            steps: 0,
            device,
            hashes,
            first_round: None,
            log: Mutex::new(Vec::new()),
        })
    }

    /// Short id of the student budget (source examples, steps, learning rate, layers): part
    /// of every student directory's name, so that two budgets never share one.
    pub fn budget_id(&self) -> String {
        let b = serde_json::json!({
            "examples": self.budget.examples,
            "steps": self.steps,
            "lr": self.budget.lr,
            "layers": self.budget.layers,
        });
        sha256_bytes(b.to_string().as_bytes())[..8].to_string()
    }

    /// Directory of a student run, relative to the task's report directory.
    pub fn run_dir(&self, role: Role, method: &str, setting: &Setting, seed: u64) -> String {
        format!(
            "students/{}/{method}-{}-b{}-seed{seed}",
            role.dir(),
            setting.id(),
            self.budget_id()
        )
    }

    /// Directory of plain KD's first final run: AugPro-FGSM's first-round student, the one
    /// run whose weights are read again.
    pub fn first_round_dir(&self) -> String {
        self.run_dir(
            Role::Final,
            "original",
            &Setting::pipeline(),
            Role::Final.seed(0),
        )
    }

    /// sha256 of every file of the task's train split (the dev split is carved from it) and
    /// validation split(s), by `split/file`.
    fn source_sha256(&self) -> Result<BTreeMap<String, String>> {
        let mut out = BTreeMap::new();
        let splits = std::iter::once(&self.task.train_split).chain(&self.task.validation_splits);
        for split in splits {
            for f in crate::data::split_files(&self.glue_dir, self.task, split)? {
                let name = f.file_name().map(|n| n.to_string_lossy().to_string());
                out.insert(
                    format!("{split}/{}", name.unwrap_or_default()),
                    self.hashes.get(&f)?,
                );
            }
        }
        Ok(out)
    }

    /// The pipeline overrides of one method's shards at one setting.
    fn shard_overrides(&self, setting: &Setting) -> Result<Vec<String>> {
        let mut set = self.base_set.clone();
        set.push(format!(
            "max_examples={}",
            self.budget.examples.min(i64::MAX as usize)
        ));
        for s in &setting.set {
            match s.strip_suffix(FIRST_ROUND) {
                Some(key) => {
                    let p = self
                        .first_round
                        .as_ref()
                        .context("the first-round student is trained before AugPro-FGSM")?;
                    set.push(format!(
                        "{key}{}",
                        toml::Value::String(p.display().to_string())
                    ));
                }
                None => set.push(s.clone()),
            }
        }
        Ok(set)
    }

    /// The shards of one method at one setting (plain KD: `original` alone).
    pub fn shards(&self, method: &str, setting: &Setting) -> Result<(Location, Manifest)> {
        let mut cfg = PipelineConfig::load_with(&self.pipe_path, &self.shard_overrides(setting)?)?;
        if cfg.task != self.task.name {
            bail!(
                "{}: pipeline is for task `{}`, not `{}`",
                self.pipe_path.display(),
                cfg.task,
                self.task.name
            );
        }
        if cfg.dev.fraction <= 0.0 {
            bail!(
                "{}: the report tunes and chooses checkpoints on a dev split: set `dev.fraction` > 0",
                self.pipe_path.display()
            );
        }
        if self.budget.examples == usize::MAX {
            cfg.max_examples = None;
        }
        let keep: Vec<String> = if method == "original" {
            Vec::new()
        } else {
            vec![method.to_string()]
        };
        cfg.methods.retain(&keep);
        // Shards made with the first-round student depend on the student budget too.
        let id = if setting.set.iter().any(|s| s.ends_with(FIRST_ROUND)) {
            format!("{}-b{}", setting.id(), self.budget_id())
        } else {
            setting.id()
        };
        cfg.name = format!(
            "report-{}-{}{}-{method}-{id}",
            self.o.preset,
            if self.budget.examples == usize::MAX {
                "all".into()
            } else {
                self.budget.examples.to_string()
            },
            suffix(self.o),
        );
        cfg.validate()?;
        let shards = pipeline::run(
            &cfg,
            &RunOptions {
                glue_dir: Some(self.glue_dir.clone()),
                ..Default::default()
            },
            self.device,
        )?;
        let m = read_manifest(&shards)?;
        Ok((shards, m))
    }

    /// The student configuration of one run.
    fn student_config(&self, method: &str, seed: u64) -> StudentConfig {
        let mut methods = vec!["original".to_string()];
        if method != "original" {
            methods.push(method.to_string());
        }
        let base = StudentConfig::default();
        StudentConfig {
            max_steps: Some(self.steps),
            layers: Some(self.budget.layers),
            seed,
            methods,
            optim: crate::config::OptimConfig {
                lr: self.budget.lr,
                ..base.optim.clone()
            },
            ..base
        }
    }

    /// One student run (reused when a finished run with the same key exists), with its
    /// line of the run log.
    fn student(
        &self,
        role: Role,
        method: &str,
        setting: &Setting,
        shards: &(Location, Manifest),
        seed: u64,
    ) -> Result<(Run, LogEntry)> {
        let scfg = self.student_config(method, seed);
        let key = RunKey::new(self, role, &shards.1, &scfg)?;
        let rel = self.run_dir(role, method, setting, seed);
        let out = self.dir.join(&rel);
        let done = out.join("report-run.json");
        let what = format!(
            "student: {} {} {method} [{}] seed {seed}",
            self.task.name,
            role.dir(),
            setting.label
        );
        let keeps_weights = rel == self.first_round_dir();
        let reused = reusable(&done, &key)
            .filter(|_| !keeps_weights || out.join("model.safetensors").is_file());
        let status = if reused.is_some() {
            eprintln!("{what}: reusing");
            "reused"
        } else {
            eprintln!("{what} ({} steps)", self.steps);
            "trained"
        };
        let run = match reused {
            Some(run) => run,
            None => {
                let m = self.train_student(role, &what, &shards.0, &out, &scfg)?;
                let run = self.finished(method, setting, seed, &rel, &m);
                let record = serde_json::json!({ "key": key, "run": run });
                atomic_write(&done, serde_json::to_string_pretty(&record)?.as_bytes())?;
                if !keeps_weights {
                    drop_weights(&out)?;
                }
                run
            }
        };
        let entry = LogEntry {
            role,
            method: method.into(),
            setting: setting.id(),
            seed,
            dir: rel,
            status,
        };
        Ok((run, entry))
    }

    /// Trains one student into `out`. A diverged tuning run scores NaN on dev, which no
    /// choice picks; a diverged final run stops the report.
    fn train_student(
        &self,
        role: Role,
        what: &str,
        shards: &Location,
        out: &Path,
        scfg: &StudentConfig,
    ) -> Result<StudentMetrics> {
        let trained = student::train(shards, self.task, &self.glue_dir, out, scfg, self.device);
        match trained {
            Err(e) if role == Role::Tune => {
                let d = e.downcast::<student::Diverged>()?;
                eprintln!("{what}: {d}; recorded with a NaN dev score");
                Ok(d.metrics)
            }
            other => other,
        }
    }

    fn finished(
        &self,
        method: &str,
        setting: &Setting,
        seed: u64,
        rel: &str,
        m: &StudentMetrics,
    ) -> Run {
        Run {
            method: method.to_string(),
            setting: setting.id(),
            seed,
            dev: crate::metrics::primary(self.task, &m.dev),
            validation: student::first_value(self.task, &m.validation),
            rows: m.rows_available,
            steps: m.steps,
            best_step: m.best_step,
            train_seconds: m.train_seconds,
            curve: m.curve.iter().map(|c| (c.step, c.value)).collect(),
            dir: rel.to_string(),
        }
    }

    /// `n` runs of one role of a method at a setting (seeds from [`Role::seed`]).
    pub fn seeds(&self, role: Role, method: &str, setting: &Setting, n: usize) -> Result<Vec<Run>> {
        let shards = self.shards(method, setting)?;
        self.runs_on(role, method, setting, &shards, n)
    }

    /// `n` runs of one role on the given shards.
    pub fn runs_on(
        &self,
        role: Role,
        method: &str,
        setting: &Setting,
        shards: &(Location, Manifest),
        n: usize,
    ) -> Result<Vec<Run>> {
        let one = |i: usize| self.student(role, method, setting, shards, role.seed(i));
        let (runs, entries): (Vec<Run>, Vec<LogEntry>) =
            side_by_side(self.o.jobs, n, one)?.into_iter().unzip();
        self.log.lock().expect("run log").extend(entries);
        Ok(runs)
    }
}

/// Removes a scored student's weights: only its metrics are read again. A report makes
/// hundreds of runs, and only plain KD's first final run (AugPro-FGSM's first-round
/// student) is loaded later.
fn drop_weights(out: &Path) -> Result<()> {
    let weights = out.join("model.safetensors");
    match std::fs::remove_file(&weights) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("{}: cannot remove", weights.display()))
        }
        _ => Ok(()),
    }
}

/// The finished run recorded in `done`, when its key is `key`.
fn reusable(done: &Path, key: &RunKey) -> Option<Run> {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(done).ok()?).ok()?;
    let recorded: RunKey = serde_json::from_value(v["key"].clone()).ok()?;
    (&recorded == key)
        .then(|| serde_json::from_value::<Run>(v["run"].clone()).ok())
        .flatten()
}

/// `f(0..n)` on `jobs` workers side by side (one when `jobs` ≤ 1), each with its share of
/// the current thread pool's threads, results in index order. A run's result does not
/// depend on its thread count, so the jobs change only the wall time.
fn side_by_side<T: Send>(
    jobs: usize,
    n: usize,
    f: impl Fn(usize) -> Result<T> + Sync,
) -> Result<Vec<T>> {
    let jobs = jobs.clamp(1, n.max(1));
    if jobs == 1 {
        return (0..n).map(f).collect();
    }
    let threads = (rayon::current_num_threads() / jobs).max(1);
    let pools = (0..jobs)
        .map(|_| rayon::ThreadPoolBuilder::new().num_threads(threads).build())
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let f = &f;
    let mut done: Vec<(usize, T)> = std::thread::scope(|scope| {
        let workers: Vec<_> = pools
            .iter()
            .enumerate()
            .map(|(j, pool)| {
                scope.spawn(move || {
                    pool.install(|| {
                        (j..n)
                            .step_by(jobs)
                            .map(|i| Ok((i, f(i)?)))
                            .collect::<Result<Vec<_>>>()
                    })
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("a run's worker panicked"))
            .collect::<Result<Vec<_>>>()
    })?
    .into_iter()
    .flatten()
    .collect();
    done.sort_by_key(|(i, _)| *i);
    Ok(done.into_iter().map(|(_, t)| t).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(scfg: &StudentConfig) -> RunKey {
        RunKey {
            run_format_version: RUN_FORMAT_VERSION,
            role: Role::Final,
            task: "stsb".into(),
            checkpoint_metric: "pearson".into(),
            base_weights_sha256: "aa".into(),
            source_sha256: [("train/t.parquet".to_string(), "bb".to_string())].into(),
            shards_config_sha256: "cc".into(),
            shards_data_sha256: "dd".into(),
            student: serde_json::to_value(scfg).unwrap(),
            students_ran_on: "cpu (AVX-512)".into(),
        }
    }

    #[test]
    fn a_diverged_runs_nan_scores_read_back_as_nan() {
        let run = Run {
            method: "original".into(),
            setting: "pipeline".into(),
            seed: 1000,
            dev: f64::NAN,
            validation: f64::NAN,
            rows: 10,
            steps: 4,
            best_step: 4,
            train_seconds: 1.0,
            curve: vec![(2, f64::NAN), (4, 0.5)],
            dir: "tune/x".into(),
        };
        let json = serde_json::to_string(&run).unwrap();
        assert!(json.contains(r#""dev":null"#), "{json}");
        let back: Run = serde_json::from_str(&json).unwrap();
        assert!(back.dev.is_nan() && back.validation.is_nan());
        assert!(back.curve[0].1.is_nan());
        assert_eq!(back.curve[1], (4, 0.5));
    }

    #[test]
    fn every_input_changes_the_key() {
        let scfg = StudentConfig {
            max_steps: Some(150),
            ..StudentConfig::default()
        };
        let base = key(&scfg);
        let student = |f: &dyn Fn(&mut StudentConfig)| {
            let mut s = scfg.clone();
            f(&mut s);
            key(&s)
        };
        let mut changed: Vec<(&str, RunKey)> = vec![
            ("steps", student(&|s| s.max_steps = Some(300))),
            ("lr", student(&|s| s.optim.lr *= 2.0)),
            ("layers", student(&|s| s.layers = Some(6))),
            ("seed", student(&|s| s.seed = TUNE_SEED_BASE)),
            ("methods", student(&|s| s.methods = vec!["original".into()])),
            ("model path", student(&|s| s.model = "other".into())),
        ];
        let one = |name, f: &dyn Fn(&mut RunKey)| {
            let mut k = base.clone();
            f(&mut k);
            (name, k)
        };
        changed.extend([
            one("version", &|k| k.run_format_version += 1),
            one("role", &|k| k.role = Role::Tune),
            one("task", &|k| k.task = "sst2".into()),
            one("metric", &|k| k.checkpoint_metric = "spearman".into()),
            one("weights", &|k| k.base_weights_sha256 = "ab".into()),
            one("source", &|k| {
                k.source_sha256
                    .insert("train/t.parquet".into(), "bc".into());
            }),
            one("validation file", &|k| {
                k.source_sha256
                    .insert("validation/v.parquet".into(), "bb".into());
            }),
            one("shards config", &|k| k.shards_config_sha256 = "cd".into()),
            one("shards data", &|k| k.shards_data_sha256 = "de".into()),
            one("students' device", &|k| {
                k.students_ran_on = "cpu (AVX2)".into()
            }),
        ]);
        for (name, k) in &changed {
            assert_ne!(k, &base, "{name}");
            // Compared as stored: through JSON.
            let back: RunKey = serde_json::from_str(&serde_json::to_string(k).unwrap()).unwrap();
            assert_ne!(back, base, "{name}");
            assert_eq!(&back, k, "{name} reads back");
        }
    }

    /// Report options over the GLUE copy in `glue`, writing under `out`.
    fn options_over(glue: &Path, out: &Path) -> ReportOptions {
        ReportOptions {
            tasks: vec!["sst2".into()],
            preset: "low".into(),
            train_examples: None,
            seeds: None,
            tune: true,
            tune_seeds: None,
            steps: Default::default(),
            lr: Default::default(),
            layers: Default::default(),
            pipeline: None,
            out: out.into(),
            glue_dir: Some(glue.into()),
            methods: None,
            overrides: Vec::new(),
            tag: None,
            scaling: None,
            collect: false,
            jobs: 1,
        }
    }

    /// A manifest of one shard with the given config, shard file and teacher hashes.
    fn manifest(config: &str, file: &str, teacher: &str) -> Manifest {
        let shard = serde_json::json!({
            "index": 0, "source_examples": 4, "truncated_examples": 0, "rows": 4,
            "files": [{ "file": "data/train-00000-of-00001.parquet", "rows": 4, "sha256": file }],
            "source_sha256": {}, "config_sha256": config, "teacher_sha256": teacher,
            "methods": {}, "median_nn_distance": 1.0, "device": "cpu", "dtype": "f32"
        });
        serde_json::from_value(serde_json::json!({
            "format_version": 2, "augpro_version": "0", "task": "sst2", "split": "train",
            "source": {}, "seed": 0, "config": {}, "config_sha256": config, "teacher": {},
            "tokenizer_sha256": "t", "projection": {}, "num_labels": 2, "source_examples": 4,
            "truncated_examples": 0, "rows": 4, "method_rows": {}, "diagnostics": {},
            "shards": [shard]
        }))
        .unwrap()
    }

    /// Writes a GLUE copy of SST-2 whose validation file holds `validation`, and a model
    /// whose weights file holds `weights`, under `dir`; returns (GLUE dir, model dir).
    fn inputs(dir: &Path, validation: &str, weights: &str) -> (PathBuf, PathBuf) {
        let (glue, model) = (dir.join("glue"), dir.join("model"));
        std::fs::create_dir_all(glue.join("sst2")).unwrap();
        std::fs::create_dir_all(&model).unwrap();
        let file = |split: &str| glue.join(format!("sst2/{split}-00000-of-00001.parquet"));
        std::fs::write(file("train"), "train rows").unwrap();
        std::fs::write(file("validation"), validation).unwrap();
        std::fs::write(model.join("model.safetensors"), weights).unwrap();
        (glue, model)
    }

    /// The key `RunKey::new` gives over the inputs in `dir`, for `m` and `scfg` (with the
    /// model of `dir`).
    fn key_over(dir: &Path, role: Role, m: &Manifest, scfg: &StudentConfig) -> RunKey {
        let (glue, model) = (dir.join("glue"), dir.join("model"));
        let o = options_over(&glue, &dir.join("reports"));
        let budget = Budget {
            examples: 1000,
            seeds: 1,
            tune_seeds: 1,
            steps: Some(150),
            lr: 1e-4,
            layers: 3,
        };
        let (hashes, device) = (FileHashes::default(), Device::Cpu);
        let task = crate::task::glue("sst2").unwrap();
        let cx = TaskCtx::new(&o, task, budget, &hashes, &device).unwrap();
        let scfg = StudentConfig {
            model,
            ..scfg.clone()
        };
        RunKey::new(&cx, role, m, &scfg).unwrap()
    }

    #[test]
    fn the_key_run_key_new_builds_changes_with_every_input_it_reads() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        inputs(dir, "validation rows", "weights");
        let m = manifest("c", "f", "t");
        let scfg = StudentConfig::default();
        let key = |role, m: &Manifest, s: &StudentConfig| key_over(dir, role, m, s);
        let base = key(Role::Final, &m, &scfg);
        assert_eq!(base, key(Role::Final, &m, &scfg), "deterministic");
        assert_eq!(
            base.students_ran_on,
            crate::device::device_name(&Device::Cpu)
        );
        assert_eq!(base.source_sha256.len(), 2, "{:?}", base.source_sha256);
        let student = |f: &dyn Fn(&mut StudentConfig)| {
            let mut s = scfg.clone();
            f(&mut s);
            key(Role::Final, &m, &s)
        };
        let mut changed = vec![
            ("role", key(Role::Tune, &m, &scfg)),
            (
                "shards config",
                key(Role::Final, &manifest("d", "f", "t"), &scfg),
            ),
            (
                "shard file",
                key(Role::Final, &manifest("c", "g", "t"), &scfg),
            ),
            ("teacher", key(Role::Final, &manifest("c", "f", "u"), &scfg)),
            ("seed", student(&|s| s.seed = 7)),
            ("steps", student(&|s| s.max_steps = Some(77))),
            ("lr", student(&|s| s.optim.lr *= 2.0)),
            ("layers", student(&|s| s.layers = Some(5))),
            ("methods", student(&|s| s.methods = vec!["mixup".into()])),
        ];
        // The same paths with other bytes: only the files' hashes can tell them apart.
        inputs(dir, "other validation rows", "weights");
        changed.push(("validation file", key(Role::Final, &m, &scfg)));
        inputs(dir, "validation rows", "other weights");
        changed.push(("base weights", key(Role::Final, &m, &scfg)));
        for (name, k) in &changed {
            assert_ne!(k, &base, "{name}");
        }
        inputs(dir, "validation rows", "weights");
        assert_eq!(key(Role::Final, &m, &scfg), base, "the inputs restored");
    }

    #[test]
    fn a_key_recorded_before_devices_reads_as_avx512_only() {
        let scfg = StudentConfig::default();
        let mut stored = serde_json::to_value(key(&scfg)).unwrap();
        stored.as_object_mut().unwrap().remove("students_ran_on");
        let back: RunKey = serde_json::from_value(stored).unwrap();
        assert_eq!(back, key(&scfg));
        let avx2 = RunKey {
            students_ran_on: "cpu (AVX2)".into(),
            ..key(&scfg)
        };
        assert_ne!(back, avx2);
    }

    #[test]
    fn tuning_and_final_seeds_never_meet() {
        let tune: Vec<u64> = (0..5).map(|i| Role::Tune.seed(i)).collect();
        let fin: Vec<u64> = (0..5).map(|i| Role::Final.seed(i)).collect();
        assert_eq!(fin, [0, 1, 2, 3, 4]);
        assert!(tune
            .iter()
            .all(|s| *s >= TUNE_SEED_BASE && !fin.contains(s)));
        assert_ne!(Role::Tune.dir(), Role::Final.dir());
    }

    #[test]
    fn side_by_side_keeps_the_order_and_the_first_error() {
        for jobs in [1, 2, 3, 8] {
            let got = side_by_side(jobs, 7, |i| Ok(i * 10)).unwrap();
            assert_eq!(got, [0, 10, 20, 30, 40, 50, 60], "{jobs} jobs");
            let threads = side_by_side(jobs, 2, |_| Ok(rayon::current_num_threads())).unwrap();
            let want = (rayon::current_num_threads() / jobs.min(2)).max(1);
            assert_eq!(threads, [want, want], "{jobs} jobs");
            let e = side_by_side(jobs, 5, |i| {
                if i == 3 {
                    anyhow::bail!("run {i} failed")
                }
                Ok(i)
            });
            assert_eq!(e.unwrap_err().to_string(), "run 3 failed");
        }
        assert!(side_by_side(2, 0, Ok).unwrap().is_empty());
    }
}
