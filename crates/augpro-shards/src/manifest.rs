//! Shard summaries (completion markers written after each shard), the manifest written
//! by finalize, and verification of a shard directory against its manifest.

use crate::hash::sha256_bytes;
use crate::reader::ShardReader;
use crate::schema::{is_virtual, ShardSchema, METHODS};
use crate::storage::Location;
use crate::task::{DataConfig, DevConfig, TaskSpec};
use crate::MethodStats;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Version of the shard layout and manifest format.
pub const FORMAT_VERSION: u32 = 2;

/// File name of the manifest, written last: a dataset is complete when it exists.
pub const MANIFEST: &str = "manifest.json";

/// File name of the dataset card, written by finalize after the manifest.
pub const CARD: &str = "README.md";

/// File name of the shards' timings, written by finalize after the manifest.
pub const TIMINGS: &str = "timings.json";

/// Folder of the Parquet files, as on the Hugging Face Hub.
pub const DATA_DIR: &str = "data";

/// Folder of a local dataset that holds the scripts and job logs of the Slurm jobs that
/// made it (`augpro slurm submit`); no reader reads it.
pub const JOBS_DIR: &str = "slurm";

/// Path (relative to the dataset root) of shard `i` of `n`'s real token rows (the
/// `default` config).
pub fn shard_name(i: usize, n: usize) -> String {
    format!("{DATA_DIR}/train-{i:05}-of-{n:05}.parquet")
}

/// Path of shard `i` of `n`'s virtual rows (MixUp, FGSM: the `virtual` config).
pub fn virtual_shard_name(i: usize, n: usize) -> String {
    format!("{DATA_DIR}/virtual-{i:05}-of-{n:05}.parquet")
}

/// Every file of shard `i` of `n`, in the order the manifest lists them.
pub fn shard_files(i: usize, n: usize) -> [String; 2] {
    [shard_name(i, n), virtual_shard_name(i, n)]
}

/// File name of the completion summary of shard `i` of `n` (in the dataset root, hidden).
pub fn summary_name(i: usize, n: usize) -> String {
    format!(".train-{i:05}-of-{n:05}.done.json")
}

/// One Parquet file of a shard.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ShardFile {
    /// Path relative to the dataset root (`data/…`).
    pub file: String,
    /// Rows in the file.
    pub rows: u64,
    /// sha256 of the file.
    pub sha256: String,
    /// Size of the file in bytes: readers read no more (absent in manifests written before
    /// it was recorded, whose files are read at their own size).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
}

impl ShardSummary {
    /// Checks that this summary is shard `i` of `n` and names exactly the files the writer
    /// gives that shard (`data/train-…` and `data/virtual-…`): a name read from a dataset
    /// made elsewhere is never joined onto the dataset directory unchecked.
    pub fn check_layout(&self, i: usize, n: usize) -> Result<()> {
        if self.index != i {
            bail!("shard {i} of {n} records index {}", self.index);
        }
        let want = shard_files(i, n);
        let got: Vec<&str> = self.files.iter().map(|f| f.file.as_str()).collect();
        if got != want {
            bail!(
                "shard {i} names files {got:?}; expected exactly {want:?} (relative names under `{DATA_DIR}/`)"
            );
        }
        Ok(())
    }
}

/// What one finished shard records (its completion marker).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ShardSummary {
    /// Shard index.
    pub index: usize,
    /// The shard's files: real token rows, then virtual rows.
    pub files: Vec<ShardFile>,
    /// Source examples handled.
    pub source_examples: usize,
    /// Source examples cut to `max_seq_len`.
    pub truncated_examples: usize,
    /// Rows written (all files).
    pub rows: u64,
    /// sha256 of each file of the source split (by file name).
    pub source_sha256: BTreeMap<String, String>,
    /// sha256 of the pipeline configuration that produced it.
    pub config_sha256: String,
    /// sha256 of the teacher weights that produced it.
    pub teacher_sha256: String,
    /// Counters per method.
    pub methods: BTreeMap<String, MethodStats>,
    /// Median nearest-neighbour distance of the indexed table (scale of relative ε).
    pub median_nn_distance: f32,
    /// Device the teacher ran on (`cpu` or `cuda`).
    #[serde(default = "default_device")]
    pub device: String,
    /// Teacher dtype (`f32`, `bf16` or `f16`).
    #[serde(default = "default_dtype")]
    pub dtype: String,
}

fn default_device() -> String {
    "cpu".into()
}

fn default_dtype() -> String {
    "f32".into()
}

/// What `verify` adds about reproducing a directory: logits depend on the device and dtype.
pub fn reproducibility_note(m: &Manifest) -> String {
    format!(
        "teacher ran on {}; shards made on another device, with other CPU kernels or in another dtype hold slightly different teacher logits (and can project to other tokens), so they are not byte-identical to these",
        m.teacher_ran_on()
    )
}

/// Diagnostics of one method over the whole output.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MethodDiagnostics {
    /// Raw counters.
    #[serde(flatten)]
    pub counts: MethodStats,
    /// Fraction of non-special positions whose token changed.
    pub changed_position_rate: f64,
    /// Fraction of emitted-or-dropped rows identical to their source.
    pub unchanged_row_rate: f64,
    /// Fraction of rows where the teacher predicts the source's gold label.
    pub teacher_agreement: f64,
}

impl MethodDiagnostics {
    /// One human-readable line: rows, changed positions (or "virtual input"), unchanged
    /// rows and teacher agreement (classification tasks only).
    pub fn summary(&self, method: &str, regression: bool) -> String {
        let changed = if matches!(method, "mixup" | "fgsm") {
            "virtual input (no tokens change)".to_string()
        } else if method == "original" {
            "source rows".to_string()
        } else {
            format!(
                "changed {:>5.1}% of positions, {:>5.1}% rows unchanged",
                100.0 * self.changed_position_rate,
                100.0 * self.unchanged_row_rate
            )
        };
        let agree = if regression {
            String::new()
        } else {
            format!(
                "; teacher agrees with source label {:>5.1}%",
                100.0 * self.teacher_agreement
            )
        };
        format!(
            "{method:<14} {:>7} rows  {changed}{agree}",
            self.counts.rows
        )
    }

    /// Derives rates from counters.
    pub fn from_counts(c: &MethodStats) -> Self {
        let div = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        Self {
            changed_position_rate: div(c.changed_positions, c.positions),
            unchanged_row_rate: div(c.unchanged_rows, c.rows + c.dropped_rows),
            teacher_agreement: div(c.teacher_agrees, c.rows),
            counts: c.clone(),
        }
    }
}

/// The manifest of a shard directory (`manifest.json`). Holds no timings or host names,
/// so equal inputs give byte-identical manifests.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    /// Format version.
    pub format_version: u32,
    /// augpro version that wrote it.
    pub augpro_version: String,
    /// GLUE task.
    pub task: String,
    /// Source split.
    pub split: String,
    /// Where the rows come from: the dataset on the Hub, its config and split, and the sha256
    /// of each source file.
    pub source: serde_json::Value,
    /// Base seed.
    pub seed: u64,
    /// Full pipeline configuration.
    pub config: serde_json::Value,
    /// sha256 of the configuration.
    pub config_sha256: String,
    /// Teacher checkpoint facts.
    pub teacher: serde_json::Value,
    /// sha256 of the tokenizer file.
    pub tokenizer_sha256: String,
    /// Projection facts (index, metric, indexed tokens, ε scale).
    pub projection: serde_json::Value,
    /// Width of `teacher_logits`.
    pub num_labels: usize,
    /// Class names in class order, for a dataset described in the pipeline file (GLUE's
    /// are built in).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label_names: Option<Vec<String>>,
    /// Source examples in all shards.
    pub source_examples: usize,
    /// Source examples truncated to `max_seq_len`.
    pub truncated_examples: usize,
    /// Total rows.
    pub rows: u64,
    /// Rows per method.
    pub method_rows: BTreeMap<String, u64>,
    /// Diagnostics per method.
    pub diagnostics: BTreeMap<String, MethodDiagnostics>,
    /// Every shard.
    pub shards: Vec<ShardSummary>,
}

impl Manifest {
    /// Where and in which dtype the teacher ran, as `cpu (AVX-512) in f32` (`cpu in f32`
    /// when the manifest records neither).
    pub fn teacher_ran_on(&self) -> String {
        let get = |k: &str, d: &str| {
            self.teacher
                .get(k)
                .and_then(|v| v.as_str())
                .unwrap_or(d)
                .to_string()
        };
        format!("{} in {}", get("device", "cpu"), get("dtype", "f32"))
    }

    /// The dev split its configuration held out ([`DevConfig::NONE`] when it records none);
    /// a `dev` entry that does not parse is an error, not "no dev split".
    pub fn dev(&self) -> Result<DevConfig> {
        match self.config.get("dev") {
            None | Some(serde_json::Value::Null) => Ok(DevConfig::NONE),
            Some(v) => serde_json::from_value(v.clone()).with_context(|| {
                format!("{MANIFEST}: field `config.dev` is not a dev split description ({v})")
            }),
        }
    }

    /// The task the dataset was made for: the GLUE config it names, or the dataset its
    /// configuration describes, with the class names it records. A described dataset's
    /// files are named by its `data.source` as recorded (see [`Manifest::task_placed`]).
    pub fn task(&self) -> Result<&'static TaskSpec> {
        self.task_placed(|source| Ok((PathBuf::from(source), None)))
    }

    /// [`Manifest::task`], with `place` turning a described dataset's `data.source` into
    /// the directory its files are read from and the object-store URL they are mirrored from.
    pub fn task_placed(
        &self,
        place: impl FnOnce(&str) -> Result<(PathBuf, Option<String>)>,
    ) -> Result<&'static TaskSpec> {
        match self.data_config()? {
            None => crate::task::glue(&self.task),
            Some(d) => {
                d.describe(&self.task, place, |_| {
                    self.label_names.clone().with_context(|| {
                        format!("{MANIFEST}: field `label_names`: a classification dataset records its class names")
                    })
                })
            }
        }
    }

    /// Where a described (non-GLUE) dataset's configuration says its source data was
    /// (`config.data.source`); `None` for GLUE. A reader should not read it: the location
    /// is on the writer's side.
    pub fn described_source(&self) -> Result<Option<String>> {
        Ok(self
            .data_config()?
            .filter(|d| d.glue_config().is_none())
            .map(|d| d.source))
    }

    /// The dataset description of `config.data`; `None` for GLUE shards.
    fn data_config(&self) -> Result<Option<DataConfig>> {
        match self.config.get("data") {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(v) => serde_json::from_value(v.clone())
                .map(Some)
                .with_context(|| {
                    format!("{MANIFEST}: field `config.data` is not a dataset description ({v})")
                }),
        }
    }

    /// Checks the shard list: shards `0..n` in order, each naming exactly its writer's files.
    pub fn check_layout(&self) -> Result<()> {
        let n = self.shards.len();
        for (i, s) in self.shards.iter().enumerate() {
            s.check_layout(i, n)
                .with_context(|| format!("{MANIFEST}: field `shards[{i}]`"))?;
        }
        Ok(())
    }

    /// The source split's files and their sha256s, as recorded under `source.files_sha256`.
    pub fn source_files(&self) -> Result<BTreeMap<String, String>> {
        let v = self.source.get("files_sha256").cloned().unwrap_or_default();
        serde_json::from_value(v).with_context(|| {
            format!("{MANIFEST}: field `source.files_sha256` is not a map of file names to sha256s")
        })
    }
}

/// Reads `manifest.json` from a dataset (a directory or an object-store prefix), checking
/// its format version first.
pub fn read_manifest(dir: &Location) -> Result<Manifest> {
    let p = inside_dataset(dir, dir.join(MANIFEST))?;
    let t = p
        .read_bounded(None)?
        .with_context(|| format!("{p}: missing manifest (was the run finalized?)"))?;
    parse_manifest(&String::from_utf8_lossy(&t)).with_context(|| format!("{p}"))
}

/// Parses a manifest, refusing other format versions with a clear message.
pub fn parse_manifest(text: &str) -> Result<Manifest> {
    let v: serde_json::Value =
        serde_json::from_str(text).context("not a valid augpro manifest (not JSON)")?;
    match v.get("format_version").and_then(|v| v.as_u64()) {
        Some(n) if n > FORMAT_VERSION as u64 => bail!(
            "manifest format {n} is newer than this augpro reads (format {FORMAT_VERSION}); \
             upgrade augpro to read this dataset"
        ),
        Some(n) if n < FORMAT_VERSION as u64 => bail!(
            "manifest format {n} is older than this augpro reads (format {FORMAT_VERSION}); \
             rerun `augpro augment` with --force to rewrite the dataset"
        ),
        Some(_) => {}
        None => bail!("not a valid augpro manifest (no format_version)"),
    }
    let m: Manifest = serde_json::from_value(v).context("not a valid augpro manifest")?;
    m.check_layout()?;
    Ok(m)
}

/// Shard files of a finished dataset, from its manifest, in order; each is checked to be a
/// regular file of the size the manifest records before anything reads it.
pub fn shard_paths(dir: &Location) -> Result<(Manifest, Vec<Location>)> {
    let m = read_manifest(dir)?;
    let mut paths = Vec::new();
    for f in m.shards.iter().flat_map(|s| &s.files) {
        let loc = dataset_file(dir, f)?;
        loc.check_size(f.bytes)?;
        paths.push(loc);
    }
    Ok((m, paths))
}

/// Refuses the dataset file `loc` when `sha256`, the hash of its bytes as they were read, is
/// not the one `f` records for it.
pub fn check_file_sha256(loc: &Location, sha256: &str, f: &ShardFile) -> Result<()> {
    if sha256 != f.sha256 {
        bail!(
            "{loc}: sha256 {sha256} is not the {} recorded for it",
            f.sha256
        );
    }
    Ok(())
}

/// Where a file the manifest names is. Its name was checked to be the writer's; locally,
/// the file (its symbolic links resolved) must also lie inside the dataset directory.
fn dataset_file(dir: &Location, f: &ShardFile) -> Result<Location> {
    inside_dataset(dir, dir.join(&f.file))
}

/// `loc`, a file of the dataset `dir`; locally, refused when it (its symbolic links
/// resolved) lies outside the dataset directory. A missing file passes (its reader says so).
fn inside_dataset(dir: &Location, loc: Location) -> Result<Location> {
    let (Some(root), Some(path)) = (dir.as_local(), loc.as_local()) else {
        return Ok(loc);
    };
    let real = match path.canonicalize() {
        Ok(p) => p,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(loc),
        Err(e) => return Err(e).with_context(|| format!("{loc}: cannot read")),
    };
    let root = root
        .canonicalize()
        .with_context(|| format!("{dir}: cannot read"))?;
    if !real.starts_with(&root) {
        bail!(
            "{loc}: links to {}, outside the dataset {dir}",
            real.display()
        );
    }
    Ok(loc)
}

/// Checks every shard against the manifest; returns one line per problem (empty = valid).
pub fn verify(dir: &Location) -> Result<Vec<String>> {
    let m = read_manifest(dir)?;
    let schema = ShardSchema::new(m.task()?);
    let vocab = m
        .teacher
        .get("vocab_size")
        .and_then(|v| v.as_u64())
        .unwrap_or(u64::MAX);
    let mut problems = Vec::new();
    for s in &m.shards {
        let mut per: BTreeMap<String, u64> = BTreeMap::new();
        for f in &s.files {
            let file = verify_file(dir, f, &schema, m.num_labels, vocab);
            for (k, n) in file.per_method {
                *per.entry(k).or_default() += n;
            }
            problems.extend(file.problems);
        }
        problems.extend(shard_count_problems(dir, s, &per));
    }
    for k in m.method_rows.keys() {
        if !METHODS.contains(&k.as_str()) {
            problems.push(format!(
                "{}: manifest names unknown method `{k}`",
                dir.join(MANIFEST)
            ));
        }
    }
    problems.extend(unlisted_entries(dir, &m)?.into_iter().map(|n| {
        let what = if n.ends_with('/') {
            "directory"
        } else {
            "file"
        };
        format!(
            "{}: unknown {what} not listed in the manifest",
            dir.join(n.trim_end_matches('/'))
        )
    }));
    Ok(problems)
}

/// A shard's row counts against its summary: its files' total and each method's rows
/// (`per`, as read).
fn shard_count_problems(
    dir: &Location,
    s: &ShardSummary,
    per: &BTreeMap<String, u64>,
) -> Vec<String> {
    let mut problems = Vec::new();
    let listed: u64 = s.files.iter().map(|f| f.rows).sum();
    if listed != s.rows {
        problems.push(format!(
            "{}: shard {} lists {listed} rows in its files, manifest says {}",
            dir.join(MANIFEST),
            s.index,
            s.rows
        ));
    }
    for (meth, st) in &s.methods {
        let got = per.get(meth).copied().unwrap_or(0);
        if got != st.rows {
            problems.push(format!(
                "{dir}: shard {}: method `{meth}` has {got} rows, manifest says {}",
                s.index, st.rows
            ));
        }
    }
    problems
}

/// Entries in the dataset directory and its `data/` that the manifest does not name (hidden
/// ones and the Slurm jobs' folder aside), sorted: files, links and subdirectories (named
/// with a trailing `/`), since readers that glob or recurse `data/` would read them all.
fn unlisted_entries(dir: &Location, m: &Manifest) -> Result<Vec<String>> {
    let mut known: Vec<String> = m
        .shards
        .iter()
        .flat_map(|s| &s.files)
        .map(|f| f.file.clone())
        .collect();
    known.extend([MANIFEST, CARD, TIMINGS].map(String::from));
    // `data` itself, as a directory or a link to one (whose shards readers check lie
    // inside the dataset once links are resolved).
    known.extend([
        format!("{DATA_DIR}/"),
        DATA_DIR.to_string(),
        format!("{JOBS_DIR}/"),
    ]);
    let top = dir.list_entries()?;
    let data = dir.join(DATA_DIR).list_entries()?;
    let mut extra: Vec<String> = top
        .into_iter()
        .chain(data.into_iter().map(|n| format!("{DATA_DIR}/{n}")))
        .filter(|rel| {
            !rel.trim_end_matches('/')
                .rsplit('/')
                .next()
                .unwrap_or("")
                .starts_with('.')
        })
        .filter(|rel| !known.contains(rel))
        .collect();
    extra.sort();
    Ok(extra)
}

/// What reading one shard file found: rows per method and the problems.
#[derive(Default)]
struct FileCheck {
    per_method: BTreeMap<String, u64>,
    rows: u64,
    bad_ids: u64,
    misplaced: u64,
    problems: Vec<String>,
}

/// Checks one shard file: present, its sha256 and row count, its rows (method, token ids,
/// logits width).
fn verify_file(
    dir: &Location,
    f: &ShardFile,
    schema: &ShardSchema,
    num_labels: usize,
    vocab: u64,
) -> FileCheck {
    let mut out = FileCheck::default();
    match dataset_file(dir, f).and_then(|p| Ok((p.read_bounded(f.bytes)?, p))) {
        Err(e) => out.problems.push(format!("{e:#}")),
        Ok((None, p)) => out.problems.push(format!("{p}: missing shard")),
        Ok((Some(bytes), p)) => out.check_bytes(bytes, &p, f, schema, num_labels, vocab),
    }
    out
}

impl FileCheck {
    /// The file's sha256, then its rows.
    fn check_bytes(
        &mut self,
        bytes: bytes::Bytes,
        p: &Location,
        f: &ShardFile,
        schema: &ShardSchema,
        num_labels: usize,
        vocab: u64,
    ) {
        if let Err(e) = check_file_sha256(p, &sha256_bytes(&bytes), f) {
            self.problems.push(e.to_string());
        }
        let virtual_file = f.file.starts_with(&format!("{DATA_DIR}/virtual-"));
        match self.count_rows(bytes, p, schema, num_labels, vocab, virtual_file) {
            Ok(()) => self.row_problems(p, f, vocab, virtual_file),
            Err(e) => self.problems.push(format!("{p}: {e:#}")),
        }
    }

    /// Reads every row, counting rows per method, out-of-vocabulary ids and rows in the
    /// wrong config; a row whose logits are not `num_labels` wide stops the read.
    fn count_rows(
        &mut self,
        bytes: bytes::Bytes,
        p: &Location,
        schema: &ShardSchema,
        num_labels: usize,
        vocab: u64,
        virtual_file: bool,
    ) -> Result<()> {
        let mut r = ShardReader::from_bytes(bytes, &p.to_string(), schema)?;
        while let Some(batch) = r.next_rows(schema)? {
            for row in batch {
                self.rows += 1;
                *self.per_method.entry(row.method.to_string()).or_default() += 1;
                self.bad_ids += row.input_ids.iter().any(|&t| t as u64 >= vocab) as u64;
                self.misplaced += (is_virtual(row.method) != virtual_file) as u64;
                anyhow::ensure!(
                    row.teacher_logits.len() == num_labels,
                    "teacher_logits has width {}, manifest says {num_labels}",
                    row.teacher_logits.len(),
                );
            }
        }
        Ok(())
    }

    /// The file's row count against the manifest, out-of-vocabulary ids, misplaced rows.
    fn row_problems(&mut self, p: &Location, f: &ShardFile, vocab: u64, virtual_file: bool) {
        if self.rows != f.rows {
            self.problems.push(format!(
                "{p}: has {} rows, manifest says {}",
                self.rows, f.rows
            ));
        }
        if self.bad_ids > 0 {
            self.problems.push(format!(
                "{p}: {} rows have token ids outside the vocabulary of {vocab}",
                self.bad_ids
            ));
        }
        if self.misplaced > 0 {
            let want = if virtual_file {
                "virtual"
            } else {
                "real token"
            };
            self.problems
                .push(format!("{p}: {} rows are not {want} rows", self.misplaced));
        }
    }
}
