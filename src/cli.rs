//! The command tree. Each command parses its flags and calls one library entry point.

use crate::config::PipelineConfig;
use crate::data::resolve_glue_dir;
use crate::pipeline::{self, RunOptions};
use crate::storage::Location;
use crate::{fetch, inspect, report, shards, student, task, teacher};
use anyhow::{bail, Result};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

/// augpro: distillation data by Augmentation with Projection.
#[derive(Parser, Debug)]
#[command(
    name = "augpro",
    version,
    about = "Augmentation with Projection: make knowledge-distillation data for BERT-family students"
)]
pub struct Cli {
    /// More log output (-v, -vv).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Only errors.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// Threads for rayon, FAISS and OpenBLAS (default: all cores).
    #[arg(long, global = true)]
    pub threads: Option<usize>,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Fetch and look at GLUE data.
    #[command(subcommand)]
    Data(DataCmd),
    /// Fine-tune or evaluate a teacher.
    #[command(subcommand)]
    Teacher(TeacherCmd),
    /// Run a pipeline: teacher, augmentation, enriched shards.
    Augment(AugmentArgs),
    /// Run a pipeline on a Slurm cluster as a chain of batch jobs.
    #[command(subcommand)]
    Slurm(SlurmCmd),
    /// Train a student by distillation from shards.
    TrainStudent(StudentArgs),
    /// Compare methods: train students per method over seeds and write a report.
    Report(ReportArgs),
    /// Print diagnostics and example rows of a shard directory.
    Inspect(InspectArgs),
    /// Check a shard directory against its manifest.
    Verify(VerifyArgs),
}

/// `data` subcommands.
#[derive(Subcommand, Debug)]
pub enum DataCmd {
    /// Download a GLUE config's Parquet files from the hub layout.
    Fetch(DataFetchArgs),
    /// Print the first rows of a split and its row count.
    Show(DataShowArgs),
}

/// `data fetch` flags.
#[derive(Args, Debug)]
pub struct DataFetchArgs {
    /// GLUE config name; with `--repo`, the repository folder to fetch (all when absent).
    #[arg(long, required_unless_present = "repo")]
    pub config: Option<String>,
    /// A Hub dataset repository (`owner/name`): fetch its Parquet files to
    /// `<glue dir>/<owner>/<name>/`.
    #[arg(long)]
    pub repo: Option<String>,
    /// Address of the Hub (with `--repo`).
    #[arg(long, default_value = fetch::DEFAULT_HUB_URL)]
    pub hub_url: String,
    /// Only these splits (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub splits: Option<Vec<String>>,
    /// Where to put the files.
    #[arg(long)]
    pub glue_dir: Option<PathBuf>,
    /// Base URL of the dataset's files.
    #[arg(long, default_value = fetch::DEFAULT_BASE_URL)]
    pub base_url: String,
}

/// `data show` flags.
#[derive(Args, Debug)]
pub struct DataShowArgs {
    #[command(flatten)]
    pub data: TaskArgs,
    /// Split name.
    #[arg(long, default_value = "validation")]
    pub split: String,
    /// Rows to print.
    #[arg(short, default_value_t = 5)]
    pub n: usize,
    /// GLUE directory.
    #[arg(long)]
    pub glue_dir: Option<PathBuf>,
}

/// The dataset a command works on: a GLUE config, or the one a pipeline file describes.
#[derive(Args, Debug, Clone)]
pub struct TaskArgs {
    /// GLUE config name (with `--pipeline`: must be the pipeline's `task`).
    #[arg(long)]
    pub task: Option<String>,
    /// Pipeline file whose `[data]` section describes the dataset.
    #[arg(long)]
    pub pipeline: Option<PathBuf>,
}

impl TaskArgs {
    /// The task named or described.
    fn resolve(&self) -> Result<&'static task::TaskSpec> {
        match (&self.task, &self.pipeline) {
            (task, Some(p)) => {
                let cfg = PipelineConfig::load(p)?;
                if let Some(t) = task.as_ref().filter(|t| **t != cfg.task) {
                    bail!(
                        "--task {t}: {} is a pipeline for task `{}`",
                        p.display(),
                        cfg.task
                    );
                }
                crate::data::task_of(&cfg)
            }
            (Some(t), None) => task::glue(t),
            (None, None) => bail!(
                "give --task (a GLUE config) or --pipeline (a pipeline file describing the dataset)"
            ),
        }
    }
}

/// Flags shared by commands that run a model.
#[derive(Args, Debug, Clone)]
pub struct DeviceArgs {
    /// cpu, cuda or cuda:N (cuda needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// GLUE directory (else AUGPRO_GLUE_DIR, else data/glue).
    #[arg(long)]
    pub glue_dir: Option<PathBuf>,
    /// CPU only: f32 products with one fixed summation order, so that teachers, shards and
    /// students have the same bits on every x86-64 CPU (AVX-512, AVX2 or neither), at some
    /// cost in speed (`make bench` measures it). The manifest names the device
    /// `cpu (portable)`.
    #[arg(long)]
    pub portable: bool,
    /// With --portable: run the products on this instruction set (avx512, avx2 or scalar)
    /// instead of the widest here, to check that each gives the same bits.
    #[arg(long, hide = true)]
    pub portable_isa: Option<String>,
}

impl DeviceArgs {
    /// The device, with the CPU's products made portable under `--portable`.
    fn open(&self) -> Result<candle_core::Device> {
        use crate::model::kernels::portable_gemm::{limit_isa, Isa};
        let device = crate::device::open_device(&self.device, self.portable)?;
        match &self.portable_isa {
            Some(_) if !self.portable => bail!("--portable-isa: only with --portable"),
            Some(name) => limit_isa(Isa::parse(name)?)?,
            None => {}
        }
        Ok(device)
    }
}

/// `teacher` subcommands.
#[derive(Subcommand, Debug)]
pub enum TeacherCmd {
    /// Fine-tune a base model on a task.
    Train(TeacherTrainArgs),
    /// Evaluate a fine-tuned checkpoint on the validation split(s).
    Eval(TeacherEvalArgs),
}

/// `teacher train` flags.
#[derive(Args, Debug)]
pub struct TeacherTrainArgs {
    #[command(flatten)]
    pub data: TaskArgs,
    /// Base model directory (HF layout).
    #[arg(long, default_value = "data/models/minilm-l6")]
    pub model: PathBuf,
    /// Output checkpoint directory.
    #[arg(long)]
    pub out: PathBuf,
    /// Epochs.
    #[arg(long, default_value_t = 1)]
    pub epochs: usize,
    /// Use at most this many shuffled training examples.
    #[arg(long)]
    pub max_train_examples: Option<usize>,
    /// Stop after this many steps.
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Peak learning rate.
    #[arg(long, default_value_t = 5e-5)]
    pub lr: f64,
    /// Batch size.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Truncation length.
    #[arg(long, default_value_t = 66)]
    pub max_seq_len: usize,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Share of the train split held out as the dev split (as a pipeline's `dev.fraction`;
    /// 0 trains on all of it).
    #[arg(long, default_value_t = 0.1)]
    pub dev_fraction: f64,
    #[command(flatten)]
    pub dev: DeviceArgs,
}

/// `teacher eval` flags.
#[derive(Args, Debug)]
pub struct TeacherEvalArgs {
    /// Checkpoint directory.
    #[arg(long)]
    pub teacher: PathBuf,
    #[command(flatten)]
    pub data: TaskArgs,
    #[command(flatten)]
    pub dev: DeviceArgs,
}

/// `augment` flags.
#[derive(Args, Debug)]
pub struct AugmentArgs {
    /// Pipeline file.
    #[arg(default_value = "pipelines/sst2.toml")]
    pub pipeline: PathBuf,
    /// Shard count (must match across workers).
    #[arg(long)]
    pub num_shards: Option<usize>,
    /// Run only this shard; also read from JOB_COMPLETION_INDEX or SLURM_ARRAY_TASK_ID.
    #[arg(long)]
    pub shard_index: Option<usize>,
    /// Only write the manifest from finished shards.
    #[arg(long)]
    pub finalize: bool,
    /// Only make sure the teacher checkpoint exists (the first job of a cluster chain).
    #[arg(long, conflicts_with_all = ["finalize", "shard_index"])]
    pub teacher_only: bool,
    /// Teacher dtype: bf16, f16 or f32 (default bf16 on GPUs with bf16, else f32). f16 needs
    /// `--device cuda`; bf16 on the CPU needs AVX-512 BF16 and multiplies the dense layers in
    /// bf16. Shards made in another dtype are not byte-identical.
    #[arg(long, value_parser = ["bf16", "f16", "f32"])]
    pub dtype: Option<String>,
    /// Replace outputs of a different configuration.
    #[arg(long)]
    pub force: bool,
    /// Output root, a path or an s3://, gs://, az:// or file:// URL (overrides the
    /// pipeline's `output`).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Override a pipeline key, e.g. `--set methods.augpro_fgsm.epsilon_nn=4.9` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    #[command(flatten)]
    pub dev: DeviceArgs,
}

/// `train-student` flags.
#[derive(Args, Debug)]
pub struct StudentArgs {
    /// Shard directory (with manifest.json): a path or an s3://, gs://, az:// or file:// URL.
    #[arg(long)]
    pub shards: PathBuf,
    /// Task the shards were made for: a GLUE task, or the `task` of a described dataset.
    #[arg(long)]
    pub task: String,
    /// For shards of a described (non-GLUE) dataset: your copy of its source data, a
    /// directory or an s3://, gs://, az:// URL (the split patterns and file sha256s come from
    /// the manifest; the location it names is never read).
    #[arg(long)]
    pub data_source: Option<String>,
    /// Output checkpoint directory.
    #[arg(long)]
    pub out: PathBuf,
    /// Use only rows of these methods (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub methods: Option<Vec<String>>,
    /// Student base checkpoint.
    #[arg(long, default_value = "data/models/minilm-l6")]
    pub model: PathBuf,
    /// Keep the first k layers.
    #[arg(long, default_value_t = 3)]
    pub layers: usize,
    /// Weight of the gold-label loss.
    #[arg(long, default_value_t = 0.5)]
    pub alpha: f64,
    /// Distillation temperature.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    /// Learning rate.
    #[arg(long, default_value_t = 1e-4)]
    pub lr: f64,
    /// Batch size.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Epochs.
    #[arg(long, default_value_t = 3)]
    pub epochs: usize,
    /// Exact step budget.
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub dev: DeviceArgs,
}

/// `slurm` subcommands.
#[derive(Subcommand, Debug)]
pub enum SlurmCmd {
    /// Write sbatch scripts and submit teacher → shard array → finalize (only what is missing).
    Submit(SlurmSubmitArgs),
}

/// `slurm submit` flags.
#[derive(Args, Debug)]
pub struct SlurmSubmitArgs {
    /// Pipeline file.
    #[arg(default_value = "pipelines/sst2.toml")]
    pub pipeline: PathBuf,
    /// Number of shards, one array task each.
    #[arg(long)]
    pub shards: usize,
    /// Slurm partition.
    #[arg(long)]
    pub partition: Option<String>,
    /// Slurm account.
    #[arg(long)]
    pub account: Option<String>,
    /// Time limit per job (Slurm syntax, e.g. 2:00:00).
    #[arg(long)]
    pub time: Option<String>,
    /// CPUs per task; also the threads each job uses.
    #[arg(long)]
    pub cpus_per_task: Option<u32>,
    /// GPUs per task (use with `--device cuda`).
    #[arg(long)]
    pub gpus_per_task: Option<u32>,
    /// Memory per job (Slurm syntax, e.g. 8G).
    #[arg(long)]
    pub mem: Option<String>,
    /// Print the scripts without writing or submitting anything.
    #[arg(long)]
    pub dry_run: bool,
    /// Output root (overrides the pipeline's `output`).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Override a pipeline key (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    #[command(flatten)]
    pub dev: DeviceArgs,
}

/// `report` flags.
#[derive(Args, Debug)]
pub struct ReportArgs {
    /// GLUE tasks, comma-separated (several give one GLUE-style table).
    #[arg(long, alias = "task", value_delimiter = ',', default_value = "sst2")]
    pub tasks: Vec<String>,
    /// smoke (CI-sized), low (low-resource) or paper (full data).
    #[arg(long, default_value = "low")]
    pub preset: String,
    /// Source examples to augment (overrides the preset).
    #[arg(long)]
    pub train_examples: Option<usize>,
    /// Seeds per method in the final comparison (low preset: 5 on sst2, 3 elsewhere).
    #[arg(long)]
    pub seeds: Option<usize>,
    /// Tune every method on the dev split over its declared grid, then compare each at its
    /// dev-best setting.
    #[arg(long)]
    pub tune: bool,
    /// Seeds per grid point when tuning.
    #[arg(long)]
    pub tune_seeds: Option<usize>,
    /// Student steps per run, the same for every method: `150`, or per task
    /// `sst2=150,cola=600`.
    #[arg(long, value_delimiter = ',')]
    pub steps: Vec<String>,
    /// Students' peak learning rate (default: the preset's, per task): a value, or per task `cola=1e-4`.
    #[arg(long, value_delimiter = ',')]
    pub lr: Vec<String>,
    /// Encoder layers the student keeps (default: the preset's, per task): a value, or per task `stsb=6`.
    #[arg(long, value_delimiter = ',')]
    pub layers: Vec<String>,
    /// Base pipeline file whose teacher and method parameters are used (one task only).
    #[arg(long)]
    pub pipeline: Option<PathBuf>,
    /// Report directory root.
    #[arg(long, default_value = "reports")]
    pub out: PathBuf,
    /// Compare only these methods with plain KD (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub methods: Option<Vec<String>>,
    /// Override a pipeline key, e.g. `--set methods.augpro_mix.lambda_min=0.25` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Name of this variant: shards and report go to `<task>-<tag>` instead of `<task>`.
    #[arg(long)]
    pub tag: Option<String>,
    /// How much data AugPro saves: source-example counts, ascending (e.g.
    /// `250,1000,4000`); with `--tune`, plain KD, the best baseline and both AugPro
    /// methods at each count, written to `<out>/scaling[-<tag>]/`.
    #[arg(long, value_delimiter = ',')]
    pub scaling: Option<Vec<usize>>,
    /// The GLUE table of `--tasks` from each task's own `results.json` (under
    /// `<out>/<task>[-<tag>]/`, made by separate commands, on other days or CPUs), training
    /// nothing; written to `<out>/glue[-<tag>]/`.
    #[arg(long, conflicts_with_all = ["scaling", "pipeline"])]
    pub collect: bool,
    /// Student runs trained side by side, the threads shared among them; the results are
    /// the same, the wall time shorter (small students use many threads poorly)
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    pub jobs: u16,
    #[command(flatten)]
    pub dev: DeviceArgs,
}

/// `inspect` flags.
#[derive(Args, Debug)]
pub struct InspectArgs {
    /// Shard directory: a path or an object-store URL.
    pub dir: PathBuf,
    /// Example rows to print per method.
    #[arg(short, default_value_t = 2)]
    pub n: usize,
}

/// `verify` flags.
#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// Shard directory: a path or an object-store URL.
    pub dir: PathBuf,
}

fn shard_index_from_env() -> Option<usize> {
    ["JOB_COMPLETION_INDEX", "SLURM_ARRAY_TASK_ID"]
        .iter()
        .find_map(|k| std::env::var(k).ok().and_then(|v| v.parse().ok()))
}

/// Runs a parsed command.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Data(DataCmd::Fetch(a)) => data_fetch(a),
        Command::Data(DataCmd::Show(a)) => data_show(a),
        Command::Teacher(TeacherCmd::Train(a)) => teacher_train(a),
        Command::Teacher(TeacherCmd::Eval(a)) => teacher_eval(a),
        Command::Augment(a) => augment(a),
        Command::Slurm(SlurmCmd::Submit(a)) => slurm_submit(a),
        Command::TrainStudent(a) => train_student(a),
        Command::Report(a) => run_report(a),
        Command::Inspect(a) => inspect::print(&Location::from_arg(&a.dir)?, a.n),
        Command::Verify(a) => verify(a),
    }
}

/// `data fetch`: downloads the files and prints their paths.
fn data_fetch(a: DataFetchArgs) -> Result<()> {
    let dir = resolve_glue_dir(a.glue_dir.as_deref());
    let files = match (&a.repo, &a.config) {
        (Some(repo), config) => fetch::fetch_repo(repo, config.as_deref(), &dir, &a.hub_url)?,
        (None, Some(config)) => {
            fetch::fetch_config(task::glue(config)?, &dir, &a.base_url, a.splits.as_deref())?
        }
        (None, None) => bail!("--config or --repo is required"),
    };
    for f in files {
        println!("{}", f.display());
    }
    Ok(())
}

/// `data show`: the split's row count and its first rows.
fn data_show(a: DataShowArgs) -> Result<()> {
    let task = a.data.resolve()?;
    let split = a.split;
    let dir = resolve_glue_dir(a.glue_dir.as_deref());
    let rows = crate::data::split_rows(&dir, task, &split)?;
    let ex = crate::data::SplitReader::open(&dir, task, &split)?.read_all(Some(a.n))?;
    println!("{} / {split}: {rows} rows", task.name);
    for e in ex {
        println!(
            "{}\t{:?}\t{}\t{}",
            e.idx,
            e.label,
            e.text_a,
            e.text_b.unwrap_or_default()
        );
    }
    Ok(())
}

/// `teacher train`: fine-tunes and prints the validation metrics.
fn teacher_train(a: TeacherTrainArgs) -> Result<()> {
    let task = a.data.resolve()?;
    let dev_fraction = a.dev_fraction;
    if !(0.0..=0.5).contains(&dev_fraction) {
        bail!("--dev-fraction must be in [0, 0.5], got {dev_fraction}");
    }
    let held_out = crate::config::DevConfig {
        fraction: dev_fraction,
        ..Default::default()
    };
    let device = a.dev.open()?;
    let cfg = crate::config::TeacherTrainConfig {
        epochs: a.epochs,
        max_train_examples: a.max_train_examples,
        max_steps: a.max_steps,
        max_seq_len: a.max_seq_len,
        seed: a.seed,
        optim: crate::config::OptimConfig {
            lr: a.lr,
            batch_size: a.batch_size,
            ..Default::default()
        },
    };
    let m = teacher::train(
        &a.model,
        task,
        &resolve_glue_dir(a.dev.glue_dir.as_deref()),
        &a.out,
        &cfg,
        &held_out,
        &device,
    )?;
    println!("{}", serde_json::to_string_pretty(&m)?);
    Ok(())
}

/// `teacher eval`: evaluates a checkpoint, writes `eval.json` beside it and prints it.
fn teacher_eval(a: TeacherEvalArgs) -> Result<()> {
    let dir = a.teacher;
    let task = a.data.resolve()?;
    let device = a.dev.open()?;
    let t = teacher::Teacher::load(&dir, task, &device, teacher::EVAL_MAX_SEQ_LEN)?;
    let v = teacher::evaluate(
        &t.model,
        &t.tokenizer,
        task,
        &resolve_glue_dir(a.dev.glue_dir.as_deref()),
        &device,
    )?;
    let text = serde_json::to_string_pretty(&v)?;
    crate::util::atomic_write(&dir.join("eval.json"), text.as_bytes())?;
    println!("{text}");
    Ok(())
}

/// `augment`: runs the pipeline (or one shard, the teacher or the finalizer of it).
fn augment(a: AugmentArgs) -> Result<()> {
    let cfg = PipelineConfig::load_with(&a.pipeline, &a.set)?;
    let device = a.dev.open()?;
    let shard_index = a.shard_index.or_else(|| {
        if a.finalize || a.teacher_only {
            None
        } else {
            shard_index_from_env()
        }
    });
    let opts = RunOptions {
        glue_dir: a.dev.glue_dir.clone(),
        output: a.out.clone(),
        shard_index,
        num_shards: a.num_shards,
        finalize_only: a.finalize,
        force: a.force,
        teacher_only: a.teacher_only,
        dtype: a.dtype.clone(),
    };
    let out = pipeline::run(&cfg, &opts, &device)?;
    if a.teacher_only {
        println!("teacher: {out}");
    } else if shard_index.is_none() {
        print_shards_summary(&out, cfg.max_seq_len)?;
    }
    Ok(())
}

/// The finished shard directory's rows, truncation count and per-method diagnostics.
fn print_shards_summary(out: &Location, max_seq_len: usize) -> Result<()> {
    let m = shards::manifest::read_manifest(out)?;
    println!(
        "shards: {out} ({} rows, {} shard(s))",
        m.rows,
        m.shards.len()
    );
    if m.truncated_examples > 0 {
        println!(
            "  {} of {} source examples were longer than max_seq_len = {} tokens and truncated",
            m.truncated_examples, m.source_examples, max_seq_len
        );
    }
    for (k, d) in &m.diagnostics {
        println!("  {}", d.summary(k, m.num_labels == 1));
    }
    Ok(())
}

/// `slurm submit`: writes and submits the batch-job chain.
fn slurm_submit(a: SlurmSubmitArgs) -> Result<()> {
    a.dev.open()?;
    let o = crate::slurm::SubmitOptions {
        pipeline: a.pipeline,
        overrides: a.set,
        shards: a.shards,
        out: a.out,
        glue_dir: a.dev.glue_dir,
        device: a.dev.device,
        portable: a.dev.portable,
        partition: a.partition,
        account: a.account,
        time: a.time,
        cpus_per_task: a.cpus_per_task,
        gpus_per_task: a.gpus_per_task,
        mem: a.mem,
        dry_run: a.dry_run,
    };
    crate::slurm::submit(&o)?;
    Ok(())
}

/// `train-student`: distils a student from shards and prints its primary metric.
fn train_student(a: StudentArgs) -> Result<()> {
    let shards = Location::from_arg(&a.shards)?;
    let task = student::shards_task(&shards, &a.task, a.data_source.as_deref())?;
    let device = a.dev.open()?;
    let cfg = student::StudentConfig {
        model: a.model,
        layers: Some(a.layers),
        alpha: a.alpha,
        temperature: a.temperature,
        epochs: a.epochs,
        max_steps: a.max_steps,
        seed: a.seed,
        methods: a.methods.unwrap_or_default(),
        optim: crate::config::OptimConfig {
            lr: a.lr,
            batch_size: a.batch_size,
            ..Default::default()
        },
        ..Default::default()
    };
    let m = student::train(
        &shards,
        task,
        &resolve_glue_dir(a.dev.glue_dir.as_deref()),
        &a.out,
        &cfg,
        &device,
    )?;
    println!(
        "{}: {} = {:.4}",
        a.out.display(),
        task.primary_metric(),
        student::first_value(task, &m.validation)
    );
    Ok(())
}

/// `report`: the method comparison; prints where `results.md` went.
fn run_report(a: ReportArgs) -> Result<()> {
    let device = a.dev.open()?;
    let opts = report::ReportOptions {
        tasks: a.tasks,
        preset: a.preset,
        train_examples: a.train_examples,
        seeds: a.seeds,
        tune: a.tune,
        tune_seeds: a.tune_seeds,
        steps: report::PerTask::parse("steps", &a.steps)?,
        lr: report::PerTask::parse("lr", &a.lr)?,
        layers: report::PerTask::parse("layers", &a.layers)?,
        pipeline: a.pipeline,
        out: a.out,
        glue_dir: a.dev.glue_dir,
        methods: a.methods,
        overrides: a.set,
        tag: a.tag,
        scaling: a.scaling,
        collect: a.collect,
        jobs: a.jobs.into(),
    };
    let dir = report::run(&opts, &device)?;
    println!("report: {}", dir.join("results.md").display());
    Ok(())
}

/// `verify`: checks a shard directory against its manifest; fails listing the problems.
fn verify(a: VerifyArgs) -> Result<()> {
    let dir = Location::from_arg(&a.dir)?;
    let problems = shards::manifest::verify(&dir)?;
    if problems.is_empty() {
        println!("{}: ok", a.dir.display());
        let m = shards::manifest::read_manifest(&dir)?;
        println!("  {}", shards::manifest::reproducibility_note(&m));
        return Ok(());
    }
    for p in &problems {
        println!("{p}");
    }
    bail!("{}: {} problem(s) found", a.dir.display(), problems.len())
}

/// The binary's entry: parses flags, sets up logging, threads and the interrupt handler,
/// runs, and exits 1 with one `error:` line on failure.
pub fn main() {
    crate::util::tune_allocator();
    let cli = Cli::parse();
    init_logging(&cli);
    crate::util::init_threads(cli.threads);
    if let Err(e) = ctrlc::set_handler(|| {
        // Whatever an abort meets, the process still exits.
        let _ = std::panic::catch_unwind(crate::storage::abort_uploads_in_flight);
        crate::util::remove_temporaries();
        eprintln!("augpro: interrupted (SIGINT/SIGTERM); finished shards are kept, rerun the same command to resume");
        std::process::exit(130);
    }) {
        tracing::debug!("no signal handler: {e}");
    }
    if let Err(e) = run(cli) {
        eprintln!("error: {}", one_line(&format!("{e:#}")));
        std::process::exit(1);
    }
}

/// Log lines to stderr as filtered by `RUST_LOG` or the verbosity flags, in colour only
/// when stderr is a terminal and `NO_COLOR` is unset; the stage and method spans always
/// reach the timing layer.
fn init_logging(cli: &Cli) {
    use std::io::IsTerminal;
    use tracing_subscriber::prelude::*;
    let level = if cli.quiet {
        "error"
    } else {
        ["warn,augpro=info", "debug", "trace"][cli.verbose.min(2) as usize]
    };
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| level.into());
    let colour = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(colour)
                .with_filter(filter),
        )
        .with(crate::timing::SpanTimes)
        .init();
}

/// An error message as one printable line: a line break becomes a space, and any other
/// control character (from a file name or a value in someone else's data) its escape, so
/// nothing in it can move the cursor or rewrite the terminal.
fn one_line(msg: &str) -> String {
    msg.chars()
        .map(|c| match c {
            '\n' => " ".to_string(),
            c if c.is_control() => c.escape_default().to_string(),
            c => c.to_string(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::one_line;

    #[test]
    fn an_error_is_one_printable_line() {
        assert_eq!(one_line("a\nb"), "a b");
        assert_eq!(one_line("x\r\u{1b}[2Jy"), "x\\r\\u{1b}[2Jy");
        assert_eq!(one_line("naïve — ok"), "naïve — ok");
    }
}
