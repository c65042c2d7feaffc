//! Runs the stages in order for a pipeline file: teacher (trained once and cached by its
//! configuration), then augmentation shard by shard with completion markers, then finalize
//! (manifest, dataset card, timings). Reruns skip finished shards.

use crate::augment::Engine;
use crate::config::PipelineConfig;
use crate::data::{resolve_glue_dir, source_files, Part, SplitReader};
use crate::model::Checkpoint;
use crate::shards::card;
use crate::shards::manifest::{
    check_file_sha256, read_manifest, shard_files, shard_name, summary_name, Manifest,
    MethodDiagnostics, ShardSummary, CARD, DATA_DIR, FORMAT_VERSION, MANIFEST, TIMINGS,
};
use crate::shards::writer::ShardWriter;
use crate::shards::{MethodStats, ShardSchema};
use crate::storage::Location;
use crate::task::TaskSpec;
use crate::teacher::{self, Teacher};
use crate::util::{atomic_write, derive_seed, sha256_bytes, sha256_file};
use anyhow::{bail, Context, Result};
use candle_core::Device;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Options from the command line that are not part of the pipeline file.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// GLUE directory override.
    pub glue_dir: Option<PathBuf>,
    /// Output root override.
    pub output: Option<PathBuf>,
    /// Run only this shard (no finalize).
    pub shard_index: Option<usize>,
    /// Shard count override (must be the same for every worker).
    pub num_shards: Option<usize>,
    /// Only write the manifest from finished shards.
    pub finalize_only: bool,
    /// Allow replacing outputs of a different configuration.
    pub force: bool,
    /// Only make sure the teacher checkpoint exists (train and cache it if needed).
    pub teacher_only: bool,
    /// Teacher dtype (`bf16`, `f16`, `f32`); `None` is the device's default.
    pub dtype: Option<String>,
}

/// The location a pipeline writes: `<output root>/<task>/<name>`, where the root is a path
/// or an object-store URL.
pub fn output_dir(cfg: &PipelineConfig, output_override: Option<&Path>) -> Result<Location> {
    Ok(Location::from_arg(output_override.unwrap_or(&cfg.output))?
        .join(&cfg.task)
        .join(&cfg.name))
}

/// True when shard `i` of `n` is complete in `out` (its summary and its files exist).
pub fn shard_complete(out: &Location, i: usize, n: usize) -> Result<bool> {
    if !out.join(&summary_name(i, n)).exists()? {
        return Ok(false);
    }
    for f in shard_files(i, n) {
        if !out.join(&f).exists()? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// True when the pipeline's teacher checkpoint exists (given, or trained and cached).
pub fn teacher_ready(cfg: &PipelineConfig) -> Result<bool> {
    Ok(
        cfg.teacher.checkpoint.is_some()
            || teacher_cache_dir(cfg)?.0.join("metrics.json").is_file(),
    )
}

/// sha256 of what the configuration means, not where it runs: canonical JSON (sorted keys)
/// without the output's place and name (`output`, `name`, `teacher.cache_dir`), with every
/// model path replaced by the sha256 of its weights. Two teams with the same inputs get the
/// same hash wherever their files are.
pub fn config_sha256(cfg: &PipelineConfig) -> Result<String> {
    let weights = |p: &Path| -> Result<serde_json::Value> {
        Ok(serde_json::json!({ "weights_sha256": Checkpoint::open(p)?.weights_sha256()? }))
    };
    let mut v = serde_json::to_value(cfg)?;
    let o = v
        .as_object_mut()
        .context("configuration is not an object")?;
    o.remove("name");
    o.remove("output");
    // A described dataset's directory is a place too: its files' sha256s are recorded.
    if let Some(d) = o.get_mut("data").and_then(|d| d.as_object_mut()) {
        if !d["source"]
            .as_str()
            .is_some_and(|s| s.starts_with(crate::config::GLUE_SOURCE))
        {
            d.remove("source");
        }
    }
    let t = &mut o["teacher"];
    if let Some(t) = t.as_object_mut() {
        t.remove("cache_dir");
    }
    match &cfg.teacher.checkpoint {
        Some(c) => {
            t["checkpoint"] = weights(c)?;
            t["model"] = serde_json::Value::Null;
        }
        None => t["model"] = weights(&cfg.teacher.model)?,
    }
    for (name, m) in [
        ("augpro_fgsm", &cfg.methods.augpro_fgsm),
        ("fgsm", &cfg.methods.fgsm),
    ] {
        if let Some(p) = m.as_ref().and_then(|m| m.student.as_ref()) {
            o["methods"][name]["student"] = weights(p)?;
        }
    }
    Ok(sha256_bytes(v.to_string().as_bytes()))
}

/// Returns the teacher checkpoint directory, training (and caching) one if needed.
pub fn ensure_teacher(cfg: &PipelineConfig, glue_dir: &Path, device: &Device) -> Result<PathBuf> {
    let task = crate::data::task_of(cfg)?;
    if let Some(c) = &cfg.teacher.checkpoint {
        Checkpoint::open(c)?;
        return Ok(c.clone());
    }
    let (dir, key_src) = teacher_cache_dir(cfg)?;
    if dir.join("metrics.json").is_file() {
        tracing::info!("reusing teacher {}", dir.display());
        return Ok(dir);
    }
    let tmp = crate::util::temporary_for(&dir)?;
    let _ = std::fs::remove_dir_all(&tmp);
    crate::util::register_temporary(&tmp);
    eprintln!(
        "training teacher for `{}` ({} examples max, {} epoch(s)) into {}",
        task.name,
        cfg.teacher
            .train
            .max_train_examples
            .map(|n| n.to_string())
            .unwrap_or("all".into()),
        cfg.teacher.train.epochs,
        dir.display()
    );
    sweep_dead_temporaries(&cfg.teacher.cache_dir);
    let m = teacher::train(
        &cfg.teacher.model,
        task,
        glue_dir,
        &tmp,
        &cfg.teacher.train,
        &cfg.dev,
        device,
    )?;
    atomic_write(
        &tmp.join("teacher_key.json"),
        serde_json::to_string_pretty(&key_src)?.as_bytes(),
    )?;
    let kept = publish_teacher(&tmp, &dir)?;
    crate::util::forget_temporary(&tmp);
    if !kept {
        eprintln!(
            "teacher: another worker finished first; using its teacher {}",
            dir.display()
        );
        return Ok(dir);
    }
    eprintln!(
        "teacher: {} = {:?} in {:.0}s ({:.1} ex/s)",
        task.primary_metric(),
        m.validation,
        m.train_seconds,
        m.train_examples_per_second
    );
    Ok(dir)
}

/// Moves a freshly trained teacher from `tmp` to `dir` unless a teacher is already there.
/// The move cannot replace an existing directory, so the first worker to finish is kept and
/// readers of its teacher are never disturbed. Returns false, with `tmp` removed, when
/// another worker's teacher was in place first.
fn publish_teacher(tmp: &Path, dir: &Path) -> Result<bool> {
    match crate::util::rename_noreplace(tmp, dir) {
        Ok(()) => Ok(true),
        Err(_) if dir.join("metrics.json").is_file() => {
            let _ = std::fs::remove_dir_all(tmp);
            Ok(false)
        }
        Err(e) => Err(e).with_context(|| {
            format!(
                "{}: cannot move teacher into place (a directory without a finished teacher \
                 is in the way: remove it)",
                dir.display()
            )
        }),
    }
}

/// Source-example range `[start, end)` of shard `i` of `n` over `total` examples.
pub fn shard_range(total: usize, i: usize, n: usize) -> (usize, usize) {
    (total * i / n, total * (i + 1) / n)
}

/// Runs a pipeline: teacher, shards, finalize. Returns the output location (the teacher
/// checkpoint directory with `teacher_only`).
pub fn run(cfg_in: &PipelineConfig, opts: &RunOptions, device: &Device) -> Result<Location> {
    let cfg = with_shard_options(cfg_in, opts)?;
    let task = crate::data::task_of(&cfg)?;
    let dtype = crate::precision::resolve(opts.dtype.as_deref(), device)?;
    let glue_dir = resolve_glue_dir(opts.glue_dir.as_deref());
    if !task.is_glue() {
        crate::data::check_splits(&glue_dir, task)?;
    }
    if crate::device::portable_products() {
        let teacher = cfg
            .teacher
            .checkpoint
            .as_ref()
            .unwrap_or(&cfg.teacher.model);
        Checkpoint::open(teacher)?.config.check_portable()?;
    }
    // The output location is not part of the configuration: moving a run elsewhere
    // changes nothing inside it.
    if opts.teacher_only {
        let dir = ensure_teacher(&cfg, &glue_dir, device)?;
        return Ok(Location::Local(dir));
    }
    let out = output_dir(&cfg, opts.output.as_deref())?;
    let cfg_hash = config_sha256(&cfg)?;
    prepare_out_dir(&out, &cfg_hash, opts.force)?;
    if opts.finalize_only {
        finalize(&cfg, &out)?;
        return Ok(out);
    }
    // Before the teacher, which may take long to train: shards of another device, CPU
    // kernels or dtype are refused first.
    let (dev_name, dtype_name) = (
        crate::device::device_name(device),
        crate::precision::name(dtype),
    );
    check_summaries(
        &out,
        opts.force,
        "another device, CPU kernels or dtype",
        |s| s.device != dev_name || s.dtype != dtype_name,
    )?;
    let teacher_dir = ensure_teacher(&cfg, &glue_dir, device)?;
    let teacher_sha = Checkpoint::open(&teacher_dir)?.weights_sha256()?;
    check_same_teacher(&out, &teacher_sha, opts.force)?;
    let pending = pending_shards(&cfg, &out, opts.shard_index)?;
    // The teacher, its index and the source count are only needed for shards left to run.
    if !pending.is_empty() {
        let teacher = Teacher::load_as(&teacher_dir, task, device, dtype, cfg.max_seq_len)?;
        let shared = ShardInputs {
            cfg: &cfg,
            cfg_hash: &cfg_hash,
            teacher_sha: &teacher_sha,
            glue_dir: &glue_dir,
            out: &out,
        };
        augment_shards(&shared, &teacher, &pending)?;
    }
    if opts.shard_index.is_none() {
        if out.join(MANIFEST).exists()? {
            complete_finalized(&cfg, &out)?;
            eprintln!("{out}: already finalized");
        } else {
            finalize(&cfg, &out)?;
        }
    }
    Ok(out)
}

/// The pipeline with `--num-shards` applied, after checking it and `--shard-index`.
fn with_shard_options(cfg_in: &PipelineConfig, opts: &RunOptions) -> Result<PipelineConfig> {
    let mut cfg = cfg_in.clone();
    if let Some(n) = opts.num_shards {
        if n == 0 {
            bail!("--num-shards must be at least 1, got 0");
        }
        cfg.shards = n;
    }
    if let Some(i) = opts.shard_index.filter(|&i| i >= cfg.shards) {
        bail!(
            "--shard-index {i} is out of range for {} shards",
            cfg.shards
        );
    }
    Ok(cfg)
}

/// The shards this run makes (one with `--shard-index`, else all) that are not complete.
fn pending_shards(
    cfg: &PipelineConfig,
    out: &Location,
    index: Option<usize>,
) -> Result<Vec<usize>> {
    let shards: Vec<usize> = match index {
        Some(i) => vec![i],
        None => (0..cfg.shards).collect(),
    };
    let mut pending = Vec::new();
    for i in shards {
        if shard_complete(out, i, cfg.shards)? {
            eprintln!("shard {i}/{}: already complete, skipped", cfg.shards);
        } else {
            pending.push(i);
        }
    }
    Ok(pending)
}

/// What every shard of one run shares.
struct ShardInputs<'a> {
    cfg: &'a PipelineConfig,
    cfg_hash: &'a str,
    teacher_sha: &'a str,
    glue_dir: &'a Path,
    out: &'a Location,
}

/// Augments the `pending` shards with one engine over the teacher.
fn augment_shards(s: &ShardInputs, teacher: &Teacher, pending: &[usize]) -> Result<()> {
    let cfg = s.cfg;
    let mut engine = Engine::new(teacher, cfg)?;
    let task = teacher.task;
    let total = crate::data::part_rows(s.glue_dir, task, &cfg.split, &cfg.dev, Part::Train)?
        .min(cfg.max_examples.unwrap_or(usize::MAX));
    if total == 0 {
        bail!("split `{}` of `{}` is empty", cfg.split, task.name);
    }
    for &i in pending {
        run_shard(s, &mut engine, total, i)?;
    }
    Ok(())
}

/// Removes temporaries (files or directories) left in `dir` by interrupted runs on this
/// host; a live worker's temporaries, and other hosts', are kept.
fn sweep_dead_temporaries(dir: &Path) {
    sweep_temporaries(dir, crate::util::is_dead_temporary);
}

/// Removes the temporaries in `dir` whose names `doomed` accepts.
fn sweep_temporaries(dir: &Path, doomed: impl Fn(&str) -> bool) {
    for e in std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
    {
        if doomed(&e.file_name().to_string_lossy()) {
            let p = e.path();
            let _ = if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
        }
    }
}

/// Checks the shard summaries already in `out` with `differs`; on the first mismatch it
/// fails with `what` in the message, or with `force` clears the directory.
fn check_summaries(
    out: &Location,
    force: bool,
    what: &str,
    differs: impl Fn(&ShardSummary) -> bool,
) -> Result<()> {
    for name in out.list()? {
        if !name.ends_with(".done.json") || name.contains(".tmp-") {
            continue;
        }
        let loc = out.join(&name);
        let parsed: Result<ShardSummary, _> = serde_json::from_slice(&loc.read()?);
        let mismatch = match &parsed {
            Ok(s) => differs(s),
            Err(_) => true,
        };
        if mismatch {
            if !force {
                if let Err(err) = parsed {
                    bail!("{loc}: unreadable shard summary ({err}; written by another augpro version?); use --force to replace the directory's shards");
                }
                bail!("{out}: holds shards of {what} (use --force to replace them, or another `name`)");
            }
            return clear(out);
        }
    }
    Ok(())
}

/// Removes everything in a dataset's directory: its shards, summaries, manifest and card,
/// and whatever else lies there at any depth (readers that recurse would take it for data).
/// The manifest goes first and the shard summaries last, so a clear cut short leaves a
/// directory that reads as unfinished and still holds what the next run finds different.
fn clear(out: &Location) -> Result<()> {
    for n in clearing_order(out.list_entries()?) {
        out.remove_entry(&n)?;
    }
    Ok(())
}

/// A dataset directory's entries in the order [`clear`] removes them: the manifest, then
/// everything else, then the shard summaries.
fn clearing_order(mut names: Vec<String>) -> Vec<String> {
    names.sort_by_key(|n| (n != MANIFEST, n.ends_with(".done.json")));
    names
}

/// Refuses to add shards made with different teacher weights (a checkpoint retrained in
/// place) to a directory, unless `force`.
fn check_same_teacher(out: &Location, teacher_sha: &str, force: bool) -> Result<()> {
    check_summaries(out, force, "different teacher weights", |s| {
        s.teacher_sha256 != teacher_sha
    })
}

/// Creates the output directory (a local one: checks it is writable and removes dead
/// temporaries), and refuses outputs of a different configuration unless `force`.
pub fn prepare_out_dir(out: &Location, cfg_hash: &str, force: bool) -> Result<()> {
    for dir in [out.clone(), out.join(DATA_DIR)] {
        dir.abort_uploads(crate::util::is_dead_temporary)?;
    }
    if let Some(dir) = out.as_local() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("{}: cannot create output directory", dir.display()))?;
        sweep_dead_temporaries(dir);
        sweep_dead_temporaries(&dir.join(DATA_DIR));
        let probe = dir.join(format!(".write-test-{}", std::process::id()));
        std::fs::write(&probe, b"")
            .with_context(|| format!("{}: output directory is not writable", dir.display()))?;
        let _ = std::fs::remove_file(&probe);
    }
    check_summaries(out, force, "a different pipeline configuration", |s| {
        s.config_sha256 != cfg_hash
    })
}

/// Augments shard `i` (its share of the `total` source examples) and writes its files and
/// summary.
fn run_shard(s: &ShardInputs, engine: &mut Engine, total: usize, i: usize) -> Result<()> {
    let (cfg, glue_dir, out) = (s.cfg, s.glue_dir, s.out);
    let task = crate::data::task_of(cfg)?;
    let (start, end) = shard_range(total, i, cfg.shards);
    let schema = ShardSchema::new(task);
    let writer = ShardWriter::create(out, i, cfg.shards, &schema)?;
    tracing::info!(
        "shard {i}/{}: augmenting source examples {start}..{end}",
        cfg.shards
    );
    let mut reader = SplitReader::open_part(glue_dir, task, &cfg.split, &cfg.dev, Part::Train)?;
    crate::timing::take();
    let pb = crate::util::progress((end - start) as u64, &format!("shard {i}"));
    let t0 = Instant::now();
    let mut flush = ShardFlush {
        cfg,
        shard: i,
        writer,
        stats: BTreeMap::new(),
        truncated: 0,
        batch_no: 0,
        pb,
    };
    let handled = augment_range(&mut reader, start, end, engine, &mut flush)?;
    let ShardFlush {
        writer,
        stats,
        truncated,
        pb,
        ..
    } = flush;
    pb.finish_and_clear();
    let files = {
        let _t = crate::timing::stage("write");
        writer.finish()?
    };
    let rows: u64 = files.iter().map(|f| f.rows).sum();
    let summary = ShardSummary {
        index: i,
        files,
        source_sha256: source_files(glue_dir, task, &cfg.split)?,
        source_examples: handled,
        truncated_examples: truncated,
        rows,
        config_sha256: s.cfg_hash.to_string(),
        teacher_sha256: s.teacher_sha.to_string(),
        methods: stats,
        median_nn_distance: engine.nn_scale(),
        device: crate::device::device_name(engine.device()).to_string(),
        dtype: crate::precision::name(engine.dtype()).to_string(),
    };
    write_shard_records(out, i, cfg.shards, t0, handled, &summary)?;
    eprintln!(
        "shard {i}/{}: {rows} rows from {handled} examples in {:.1}s",
        cfg.shards,
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Reads the source examples `start..end` of the training part and hands them to `flush` in
/// windows of 16 batches; returns how many examples were read.
fn augment_range(
    reader: &mut SplitReader,
    start: usize,
    end: usize,
    engine: &mut Engine,
    flush: &mut ShardFlush,
) -> Result<usize> {
    // Examples are read in windows of 16 batches, tokenized, sorted by length (stable) and
    // processed batch by batch, so padding stays small and mixing partners have similar
    // lengths. The order is a pure function of the input, so output stays deterministic.
    let window = flush.cfg.batch_size * 16;
    let (mut pos, mut handled) = (0usize, 0usize);
    let mut pending = Vec::new();
    'read: while let Some(batch) = reader.next_batch()? {
        for ex in batch {
            if pos >= end {
                break 'read;
            }
            if pos >= start {
                pending.push(ex);
                handled += 1;
                if pending.len() == window {
                    flush.flush(engine, &mut pending)?;
                }
            }
            pos += 1;
        }
    }
    flush.flush(engine, &mut pending)?;
    Ok(handled)
}

/// One shard's writer and running counts: each flush tokenizes a window of examples, sorts
/// it by length and augments and writes it batch by batch.
struct ShardFlush<'c> {
    cfg: &'c PipelineConfig,
    shard: usize,
    writer: ShardWriter,
    stats: BTreeMap<String, MethodStats>,
    truncated: usize,
    batch_no: usize,
    pb: indicatif::ProgressBar,
}

impl ShardFlush<'_> {
    /// Augments and writes the pending examples, then empties `pending`.
    fn flush(
        &mut self,
        engine: &mut Engine,
        pending: &mut Vec<crate::data::Example>,
    ) -> Result<()> {
        if pending.is_empty() {
            return Ok(());
        }
        let encs = {
            let _t = crate::timing::stage("tokenize");
            engine.tokenizer().encode(pending)?
        };
        self.truncated += encs.iter().filter(|e| e.truncated).count();
        let batch_size = self.cfg.batch_size;
        let mut order: Vec<usize> = (0..pending.len()).collect();
        order.sort_by_key(|&k| encs[k].ids.len());
        let mut chunks: Vec<&[usize]> = order.chunks(batch_size).collect();
        if chunks.len() > 1 && chunks[chunks.len() - 1].len() == 1 {
            // A batch of one has no mixing partner: fold it into the previous batch.
            let k = chunks.len() - 2;
            chunks[k] = &order[k * batch_size..];
            chunks.pop();
        }
        for chunk in chunks {
            let ex: Vec<crate::data::Example> = chunk.iter().map(|&k| pending[k].clone()).collect();
            let en: Vec<crate::tokenize::Encoded> =
                chunk.iter().map(|&k| encs[k].clone()).collect();
            let seed = derive_seed(
                self.cfg.seed,
                &[
                    "augment",
                    &self.shard.to_string(),
                    &self.batch_no.to_string(),
                ],
            );
            let rows = engine.augment_batch(&ex, &en, seed, &mut self.stats)?;
            {
                let _t = crate::timing::stage("write");
                self.writer.write(&rows)?;
            }
            crate::util::failpoint("shard-batch");
            self.pb.inc(ex.len() as u64);
            self.batch_no += 1;
        }
        pending.clear();
        Ok(())
    }
}

/// Writes the shard's timing record, then its summary (whose existence marks the shard done).
fn write_shard_records(
    out: &Location,
    i: usize,
    shards: usize,
    t0: Instant,
    handled: usize,
    summary: &ShardSummary,
) -> Result<()> {
    let times = crate::timing::take();
    let timing = serde_json::json!({ "seconds": t0.elapsed().as_secs_f64(), "examples": handled, "method_seconds": times.methods, "stage_seconds": times.stages });
    out.join(&format!(".timing-{i:05}.json"))
        .put(timing.to_string().into())?;
    out.join(&summary_name(i, shards))
        .put(serde_json::to_string_pretty(summary)?.into())?;
    crate::util::failpoint("shard-done");
    Ok(())
}

/// Writes `manifest.json` from the finished shards, only if it does not exist yet, then the
/// dataset card and `timings.json`. A dataset is complete exactly when its manifest exists;
/// a second finalizer writes nothing and is refused.
pub fn finalize(cfg: &PipelineConfig, out: &Location) -> Result<Manifest> {
    let task = crate::data::task_of(cfg)?;
    let cfg_hash = config_sha256(cfg)?;
    if out.join(MANIFEST).exists()? {
        return Err(already_finalized(out));
    }
    let shards = finished_shards(cfg, out, &cfg_hash)?;
    // The summaries agree before any shard file is read and hashed.
    check_same_inputs(out, &shards)?;
    for s in &shards {
        check_shard_data(out, s).with_context(|| {
            format!(
                "{}: shard {} no longer matches its summary (rerun it with --force)",
                out.join(&summary_name(s.index, cfg.shards)),
                s.index
            )
        })?;
    }
    sweep_worker_temporaries(out)?;
    let manifest = build_manifest(cfg, task, cfg_hash, shards)?;
    let created = out
        .join(MANIFEST)
        .put_new(serde_json::to_string_pretty(&manifest)?.into(), || {
            crate::util::failpoint("manifest-write")
        })?;
    if !created {
        return Err(already_finalized(out));
    }
    let _ = read_manifest(out)?;
    write_card_and_timings(cfg, out, &manifest)?;
    Ok(manifest)
}

fn already_finalized(out: &Location) -> anyhow::Error {
    anyhow::anyhow!("{out}: already finalized (manifest.json exists); nothing was written")
}

/// The summaries of every shard, each of the layout the writer gives it and of this
/// configuration; an error naming the shards that have none.
fn finished_shards(
    cfg: &PipelineConfig,
    out: &Location,
    cfg_hash: &str,
) -> Result<Vec<ShardSummary>> {
    let mut shards = Vec::new();
    let mut missing = Vec::new();
    for i in 0..cfg.shards {
        let p = out.join(&summary_name(i, cfg.shards));
        let Some(b) = p.read_bounded(None)? else {
            missing.push(i);
            continue;
        };
        let s: ShardSummary =
            serde_json::from_slice(&b).with_context(|| format!("{p}: unreadable shard summary"))?;
        s.check_layout(i, cfg.shards)
            .with_context(|| format!("{p}"))?;
        if s.config_sha256 != cfg_hash {
            bail!("{p}: shard was made by a different configuration");
        }
        shards.push(s);
    }
    if !missing.is_empty() {
        bail!(
            "{out}: shards {missing:?} of {} are not complete; run them before finalize",
            cfg.shards
        );
    }
    Ok(shards)
}

/// Checks each file of a shard against its summary: present, of its size, of its sha256
/// (objects in a store are fetched and hashed again, so an object replaced after its
/// summary is refused).
fn check_shard_data(out: &Location, s: &ShardSummary) -> Result<()> {
    for f in &s.files {
        let loc = out.join(&f.file);
        // The size first, so a file of another size is refused unread; a local file is
        // then hashed as it streams.
        loc.check_size(f.bytes)?;
        check_file_sha256(&loc, &loc.sha256()?, f)?;
    }
    Ok(())
}

/// Refuses shards made from different source files, teacher weights, devices or dtypes,
/// or with different ε scales (a shard made by an augpro that measured it otherwise).
fn check_same_inputs(out: &Location, shards: &[ShardSummary]) -> Result<()> {
    type Same = fn(&ShardSummary, &ShardSummary) -> bool;
    let checks: [(&str, Same); 4] = [
        ("from different source files", |a, b| {
            a.source_sha256 == b.source_sha256
        }),
        ("with different teacher weights", |a, b| {
            a.teacher_sha256 == b.teacher_sha256
        }),
        ("on different devices, CPU kernels or dtypes", |a, b| {
            (&a.device, &a.dtype) == (&b.device, &b.dtype)
        }),
        ("with different ε scales (median_nn_distance)", |a, b| {
            a.median_nn_distance.to_bits() == b.median_nn_distance.to_bits()
        }),
    ];
    for (what, same) in checks {
        if shards.windows(2).any(|w| !same(&w[0], &w[1])) {
            bail!("{out}: shards were made {what}; rerun them with --force");
        }
    }
    Ok(())
}

/// Every shard is complete, so no worker writes here any more: temporaries (and, in an
/// object store, records of unfinished multipart uploads) that interrupted workers left on
/// any host go. Those of finalize's own outputs stay unless their process on
/// this host is gone, since another finalizer may be writing them right now.
fn sweep_worker_temporaries(out: &Location) -> Result<()> {
    let finalizer_output = |n: &str| {
        [MANIFEST, CARD, TIMINGS]
            .iter()
            .any(|f| n.starts_with(&format!(".{f}.tmp-")))
    };
    let doomed = |n: &str| {
        n.contains(".tmp-")
            && !crate::util::is_own_temporary(n)
            && (!finalizer_output(n) || crate::util::is_dead_temporary(n))
    };
    for dir in [out.clone(), out.join(DATA_DIR)] {
        match dir.as_local() {
            Some(d) => sweep_temporaries(d, doomed),
            None => {
                dir.abort_uploads(doomed)?;
            }
        }
    }
    Ok(())
}

/// What the projection index leaves out, in the manifest's words: BERT's special and
/// reserved tokens, or the tokens another family's tokenizer flags special.
fn excluded_tokens(ck: &Checkpoint, teacher_dir: &Path) -> Result<String> {
    if ck.config.family == crate::model::Family::Bert {
        return Ok(
            "special and reserved tokens ([PAD], [UNK], [CLS], [SEP], [MASK], [unusedN])".into(),
        );
    }
    let tok = crate::tokenize::TextTokenizer::load(teacher_dir, 512)?;
    Ok(format!(
        "tokens the tokenizer flags special ({}) and embedding rows past its vocabulary",
        tok.special_tokens().join(", ")
    ))
}

/// The manifest of the finished `shards`.
fn build_manifest(
    cfg: &PipelineConfig,
    task: &TaskSpec,
    cfg_hash: String,
    shards: Vec<ShardSummary>,
) -> Result<Manifest> {
    let teacher_dir = existing_teacher_dir(cfg)?;
    let ck = Checkpoint::open(&teacher_dir)?;
    let tmetrics: serde_json::Value = std::fs::read(teacher_dir.join("metrics.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(serde_json::Value::Null);
    let tok_file = crate::tokenize::tokenizer_file(&teacher_dir);
    let mut totals: BTreeMap<String, MethodStats> = BTreeMap::new();
    for s in &shards {
        for (k, v) in &s.methods {
            totals.entry(k.clone()).or_default().add(v);
        }
    }
    let nn_scale = shards.first().map(|s| s.median_nn_distance).unwrap_or(0.0);
    Ok(Manifest {
        format_version: FORMAT_VERSION,
        augpro_version: env!("CARGO_PKG_VERSION").into(),
        task: task.name.clone(),
        split: cfg.split.clone(),
        source: source_json(cfg, task, &shards[0]),
        seed: cfg.seed,
        config: serde_json::to_value(cfg)?,
        config_sha256: cfg_hash,
        teacher: serde_json::json!({
            "path": teacher_dir.display().to_string(),
            "weights_sha256": shards[0].teacher_sha256,
            "vocab_size": ck.config.vocab_size,
            "hidden_size": ck.config.hidden_size,
            "embedding_sketch": ck.embedding_sketch()?,
            "metrics": tmetrics.get("validation").cloned().unwrap_or(serde_json::Value::Null),
            "device": shards[0].device,
            "dtype": shards[0].dtype,
        }),
        tokenizer_sha256: sha256_file(&tok_file)?,
        projection: serde_json::json!({
            "index": cfg.projection.index,
            "metric": cfg.projection.metric,
            "excluded": excluded_tokens(&ck, &teacher_dir)?,
            "median_nn_distance": nn_scale,
        }),
        num_labels: task.num_labels,
        label_names: (!task.is_glue() && !task.is_regression()).then(|| task.label_names.clone()),
        source_examples: shards.iter().map(|s| s.source_examples).sum(),
        truncated_examples: shards.iter().map(|s| s.truncated_examples).sum(),
        rows: shards.iter().map(|s| s.rows).sum(),
        method_rows: totals.iter().map(|(k, v)| (k.clone(), v.rows)).collect(),
        diagnostics: totals
            .iter()
            .map(|(k, v)| (k.clone(), MethodDiagnostics::from_counts(v)))
            .collect(),
        shards,
    })
}

/// The manifest's `source`: the dataset (GLUE's on the Hub, or a described dataset's
/// directory and format), its config and split, and the sha256 of each source file.
fn source_json(cfg: &PipelineConfig, task: &TaskSpec, shard: &ShardSummary) -> serde_json::Value {
    let mut v = serde_json::json!({
        "dataset": crate::shards::card::SOURCE_DATASET,
        "config": task.name,
        "split": cfg.split,
        "files_sha256": shard.source_sha256,
    });
    if let crate::task::Source::Files {
        dir,
        origin,
        format,
        ..
    } = &task.source
    {
        v["dataset"] = origin
            .clone()
            .unwrap_or_else(|| dir.display().to_string())
            .into();
        v["config"] = serde_json::Value::Null;
        v["format"] = serde_json::to_value(format).unwrap_or_default();
    }
    v
}

/// Writes the dataset card and `timings.json` (the shards' timings) of a finalized dataset;
/// only the finalizer that created the manifest does, or a rerun that finds them missing.
fn write_card_and_timings(cfg: &PipelineConfig, out: &Location, manifest: &Manifest) -> Result<()> {
    let schema = ShardSchema::new(crate::data::manifest_task(manifest)?);
    out.join(CARD).put(card::render(manifest, &schema).into())?;
    let mut timings = serde_json::Map::new();
    for i in 0..cfg.shards {
        if let Some(b) = out.join(&format!(".timing-{i:05}.json")).read_opt()? {
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&b) {
                timings.insert(shard_name(i, cfg.shards), v);
            }
        }
    }
    out.join(TIMINGS)
        .put(serde_json::to_string_pretty(&timings)?.into())
}

/// For a dataset found finalized by a rerun of `augment`: writes the card and timings if
/// the finalizer was stopped between the manifest and them (the same bytes it would have
/// written).
fn complete_finalized(cfg: &PipelineConfig, out: &Location) -> Result<()> {
    if out.join(CARD).exists()? && out.join(TIMINGS).exists()? {
        return Ok(());
    }
    let manifest = read_manifest(out)?;
    write_card_and_timings(cfg, out, &manifest)
}

/// The cache directory of the teacher a pipeline trains, keyed by task, base weights,
/// training configuration and (under `--portable`) the portable products; also returns the
/// key's source.
pub fn teacher_cache_dir(cfg: &PipelineConfig) -> Result<(PathBuf, serde_json::Value)> {
    let base = Checkpoint::open(&cfg.teacher.model)?;
    let mut key_src = serde_json::json!({
        "task": cfg.task,
        "code": teacher::TRAINING_CODE_VERSION,
        "base_weights_sha256": base.weights_sha256()?,
        "train": cfg.teacher.train,
        "dev": cfg.dev,
    });
    if let Some(data) = &cfg.data {
        key_src["data"] = serde_json::to_value(data)?;
    }
    // A teacher trained with portable products is another checkpoint (the same on every
    // CPU); the keys of the others stay as they were.
    if crate::device::portable_products() {
        key_src["products"] = "portable".into();
    }
    let key = &sha256_bytes(key_src.to_string().as_bytes())[..12];
    Ok((
        cfg.teacher.cache_dir.join(format!("{}-{key}", cfg.task)),
        key_src,
    ))
}

/// The teacher a finished run used; never trains.
fn existing_teacher_dir(cfg: &PipelineConfig) -> Result<PathBuf> {
    if let Some(c) = &cfg.teacher.checkpoint {
        return Ok(c.clone());
    }
    let (dir, _) = teacher_cache_dir(cfg)?;
    if !dir.join("metrics.json").is_file() {
        bail!(
            "{}: teacher checkpoint missing; run the shards first",
            dir.display()
        );
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::{check_same_inputs, clearing_order, publish_teacher};
    use augpro_shards::manifest::ShardSummary;
    use std::path::Path;

    /// A clear cut short must never leave the old manifest beside removed shards (a rerun
    /// would take the directory for finished), nor lose the summaries that tell the rerun
    /// the directory holds another configuration's shards before the rest is gone.
    #[test]
    fn clearing_removes_the_manifest_first_and_the_summaries_last() {
        let names = [
            ".train-00000-of-00002.done.json",
            "README.md",
            "data/",
            "manifest.json",
            ".train-00001-of-00002.done.json",
            "timings.json",
        ];
        let order = clearing_order(names.iter().map(|n| n.to_string()).collect());
        assert_eq!(order[0], "manifest.json");
        assert!(order[..4].iter().all(|n| !n.ends_with(".done.json")));
        assert!(order[4..].iter().all(|n| n.ends_with(".done.json")));
        assert_eq!(order.len(), names.len());
    }

    #[test]
    fn shards_with_different_epsilon_scales_are_refused() {
        let shard = |i: usize, scale: f32| ShardSummary {
            index: i,
            files: Vec::new(),
            source_examples: 0,
            truncated_examples: 0,
            rows: 0,
            source_sha256: Default::default(),
            config_sha256: "c".into(),
            teacher_sha256: "t".into(),
            methods: Default::default(),
            median_nn_distance: scale,
            device: "cpu".into(),
            dtype: "f32".into(),
        };
        let out = crate::storage::Location::parse("/tmp/dataset").unwrap();
        assert!(check_same_inputs(&out, &[shard(0, 0.9947), shard(1, 0.9947)]).is_ok());
        let e = check_same_inputs(&out, &[shard(0, 0.9947), shard(1, 0.994_700_1)]).unwrap_err();
        assert!(e.to_string().contains("different ε scales"), "{e}");
        // Shards of one array job that ran on CPUs with different matmul kernels.
        let mut avx2 = shard(1, 0.9947);
        avx2.device = "cpu (AVX2)".into();
        let mut avx512 = shard(0, 0.9947);
        avx512.device = "cpu (AVX-512)".into();
        let e = check_same_inputs(&out, &[avx512, avx2]).unwrap_err();
        assert!(e.to_string().contains("CPU kernels"), "{e}");
    }

    /// A worker's finished teacher in its temporary directory, marked with `who`.
    fn trained(root: &Path, who: &str) -> std::path::PathBuf {
        let tmp = root.join(format!(".teacher.tmp-{who}"));
        std::fs::create_dir_all(&tmp).unwrap();
        std::fs::write(tmp.join("metrics.json"), "{}").unwrap();
        std::fs::write(tmp.join("worker"), who).unwrap();
        tmp
    }

    #[test]
    fn the_first_teacher_to_finish_is_kept() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("teacher");
        // Both workers found no teacher and trained one. A's teacher lands after B last
        // looked for one, so B's publish step must still not replace it.
        let (a, b) = (trained(root.path(), "a"), trained(root.path(), "b"));
        assert!(publish_teacher(&a, &dir).unwrap());
        assert!(!publish_teacher(&b, &dir).unwrap());
        assert_eq!(std::fs::read_to_string(dir.join("worker")).unwrap(), "a");
        assert!(!a.exists() && !b.exists());
    }

    #[test]
    fn concurrent_workers_publish_exactly_one_teacher() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("teacher");
        let workers = 8;
        let barrier = std::sync::Barrier::new(workers);
        let won: Vec<(String, bool)> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..workers)
                .map(|w| {
                    let (root, dir, barrier) = (root.path(), &dir, &barrier);
                    s.spawn(move || {
                        let who = w.to_string();
                        let tmp = trained(root, &who);
                        barrier.wait();
                        let kept = publish_teacher(&tmp, dir).unwrap();
                        // Whoever won, the teacher in place stays the same from now on.
                        let seen = std::fs::read_to_string(dir.join("worker")).unwrap();
                        (if kept { who } else { seen }, kept)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let winners: Vec<&String> = won.iter().filter(|(_, k)| *k).map(|(w, _)| w).collect();
        assert_eq!(winners.len(), 1, "{won:?}");
        let kept = std::fs::read_to_string(dir.join("worker")).unwrap();
        assert_eq!(&kept, winners[0]);
        assert!(won.iter().all(|(w, _)| *w == kept), "{won:?}");
        let left: Vec<_> = std::fs::read_dir(root.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "temporaries left behind");
    }
}
