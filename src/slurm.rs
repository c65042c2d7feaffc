//! `augpro slurm submit`: spreads a pipeline over a Slurm cluster as a chain of batch jobs
//! — the teacher (only when its checkpoint is missing) → an array with one task per
//! unfinished shard → finalize and verify — each waiting on the previous with `afterok`.
//! Resubmitting after failures submits only what is still missing.

use crate::config::PipelineConfig;
use crate::data::resolve_glue_dir;
use crate::pipeline;
use crate::shards::manifest::{JOBS_DIR, MANIFEST};
use crate::storage::Location;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// What to submit and how to ask the scheduler for resources.
#[derive(Debug, Clone, Default)]
pub struct SubmitOptions {
    /// Pipeline file.
    pub pipeline: PathBuf,
    /// `key=value` overrides applied to the pipeline.
    pub overrides: Vec<String>,
    /// Number of shards (one array task each).
    pub shards: usize,
    /// Output root override.
    pub out: Option<PathBuf>,
    /// GLUE directory override.
    pub glue_dir: Option<PathBuf>,
    /// `cpu`, `cuda` or `cuda:N`, passed to every job.
    pub device: String,
    /// `--portable`, passed to every job.
    pub portable: bool,
    /// `--partition`.
    pub partition: Option<String>,
    /// `--account`.
    pub account: Option<String>,
    /// `--time` limit per job.
    pub time: Option<String>,
    /// `--cpus-per-task` (also the job's `--threads`).
    pub cpus_per_task: Option<u32>,
    /// `--gpus-per-task`.
    pub gpus_per_task: Option<u32>,
    /// `--mem` per job.
    pub mem: Option<String>,
    /// Print the scripts and commands; write and submit nothing.
    pub dry_run: bool,
}

/// One stage of the chain: its name, script text and extra `sbatch` flags.
#[derive(Debug, Clone)]
pub struct Stage {
    /// `teacher`, `shards` or `finalize`.
    pub name: &'static str,
    /// The batch script.
    pub script: String,
    /// Flags given to `sbatch` on the command line (the array range).
    pub flags: Vec<String>,
}

/// The stages still needed for a pipeline's output, in submission order.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Output directory of the pipeline.
    pub out: PathBuf,
    /// Where scripts and job logs go (`<out>/slurm`).
    pub script_dir: PathBuf,
    /// Shards not yet complete.
    pub missing: Vec<usize>,
    /// Stages to submit (empty when the output is complete).
    pub stages: Vec<Stage>,
    /// Prefix of the chain's job names.
    pub job: String,
}

/// Quotes a word for a POSIX shell.
fn sh(word: &str) -> String {
    if !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-=:,+@%".contains(c))
    {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

fn absolute(p: &Path) -> Result<PathBuf> {
    Ok(if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()?.join(p)
    })
}

/// Compresses sorted indices into Slurm's array syntax (`0-3,5,7-8`).
pub fn array_spec(idx: &[usize]) -> String {
    let mut parts = Vec::new();
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && idx[j + 1] == idx[j] + 1 {
            j += 1;
        }
        parts.push(if i == j {
            idx[i].to_string()
        } else {
            format!("{}-{}", idx[i], idx[j])
        });
        i = j + 1;
    }
    parts.join(",")
}

/// Works out which stages are still needed and writes their scripts' text.
pub fn plan(o: &SubmitOptions) -> Result<Plan> {
    let (cfg, out_root, loc) = prepare_output(o)?;
    let mut missing = Vec::new();
    for i in 0..o.shards {
        if !pipeline::shard_complete(&loc, i, o.shards)? {
            missing.push(i);
        }
    }
    let finalized = missing.is_empty() && loc.join(MANIFEST).exists()?;
    let exe = std::env::current_exe().context("cannot locate the augpro binary")?;
    let workdir = std::env::current_dir()?;
    // Scripts and job logs go next to the shards, or for a bucket to ./slurm/<task>/<name>.
    let (out, script_dir) = match loc.as_local() {
        Some(p) => (p.to_path_buf(), p.join(JOBS_DIR)),
        None => (
            PathBuf::from(loc.to_string()),
            workdir.join("slurm").join(&cfg.task).join(&cfg.name),
        ),
    };
    let glue = absolute(&resolve_glue_dir(o.glue_dir.as_deref()))?;
    let pipeline_file = absolute(&o.pipeline)?;
    let mut common = vec![
        "augment".to_string(),
        pipeline_file.display().to_string(),
        "--num-shards".into(),
        o.shards.to_string(),
        "--out".into(),
        out_root.display().to_string(),
        "--glue-dir".into(),
        glue.display().to_string(),
        "--device".into(),
        o.device.clone(),
    ];
    if o.portable {
        common.push("--portable".into());
    }
    for s in &o.overrides {
        common.push("--set".into());
        common.push(s.clone());
    }
    // The job name carries a short hash of the output directory, so a resubmission can see
    // whether jobs for the same output are still queued.
    let job = job_prefix(&cfg.task, &cfg.name, &out);
    let scripts = Scripts {
        o,
        exe,
        common,
        job,
        workdir,
        script_dir,
    };
    let stages = scripts.stages(&cfg, &missing, finalized, &out)?;
    Ok(Plan {
        out,
        script_dir: scripts.script_dir,
        missing,
        stages,
        job: scripts.job,
    })
}

/// Loads and validates the pipeline for `o.shards` shards and finds its output directory;
/// when that exists, refuses it as a local run would. Returns the configuration, the output
/// root and the output directory.
fn prepare_output(o: &SubmitOptions) -> Result<(PipelineConfig, PathBuf, Location)> {
    if o.shards == 0 {
        bail!("--shards must be at least 1, got 0");
    }
    let mut cfg = PipelineConfig::load_with(&o.pipeline, &o.overrides)?;
    cfg.shards = o.shards;
    cfg.validate()
        .with_context(|| o.pipeline.display().to_string())?;
    let root = o.out.as_deref().unwrap_or(&cfg.output);
    let out_root = if Location::from_arg(root)?.is_remote() {
        root.to_path_buf()
    } else {
        absolute(root)?
    };
    let loc = pipeline::output_dir(&cfg, Some(&out_root))?;
    let exists = match loc.as_local() {
        Some(d) => d.is_dir(),
        None => true,
    };
    if exists {
        // The same refusals as a local run: never mix configurations in one directory.
        pipeline::prepare_out_dir(&loc, &pipeline::config_sha256(&cfg)?, false)?;
    }
    Ok((cfg, out_root, loc))
}

/// What every stage's script is made from: the scheduler options, the binary and its
/// `augment` arguments, the job-name prefix and the directories.
struct Scripts<'a> {
    o: &'a SubmitOptions,
    exe: PathBuf,
    common: Vec<String>,
    job: String,
    workdir: PathBuf,
    script_dir: PathBuf,
}

impl Scripts<'_> {
    /// The `augpro augment` command line with the common arguments and `extra`.
    fn augpro(&self, extra: &[&str]) -> String {
        let mut words = vec![
            sh(&self.exe.display().to_string()),
            "--threads".into(),
            "\"${SLURM_CPUS_PER_TASK:-1}\"".into(),
        ];
        words.extend(self.common.iter().map(|w| sh(w)));
        words.extend(extra.iter().map(|w| w.to_string()));
        words.join(" ")
    }

    /// The `#SBATCH` header of a stage's script, logging to `log` in the script directory.
    fn header(&self, stage: &str, log: &str) -> String {
        let o = self.o;
        let mut h = format!(
            "#!/bin/bash\n#SBATCH --job-name={}\n#SBATCH --chdir={}\n#SBATCH --output={}\n",
            sh(&format!("{}-{stage}", self.job)),
            sh(&self.workdir.display().to_string()),
            sh(&self.script_dir.join(log).display().to_string())
        );
        let mut opt = |k: &str, v: Option<String>| {
            if let Some(v) = v {
                h.push_str(&format!("#SBATCH --{k}={}\n", sh(&v)));
            }
        };
        opt("partition", o.partition.clone());
        opt("account", o.account.clone());
        opt("time", o.time.clone());
        opt("cpus-per-task", o.cpus_per_task.map(|c| c.to_string()));
        opt(
            "gpus-per-task",
            o.gpus_per_task.filter(|&g| g > 0).map(|g| g.to_string()),
        );
        opt("mem", o.mem.clone());
        h.push_str("set -euo pipefail\n");
        h
    }

    /// The stages still needed: the teacher (unless ready) and the shards while some are
    /// missing, and the finalizer until the output is finalized.
    fn stages(
        &self,
        cfg: &PipelineConfig,
        missing: &[usize],
        finalized: bool,
        out: &Path,
    ) -> Result<Vec<Stage>> {
        let mut stages = Vec::new();
        if !missing.is_empty() && !pipeline::teacher_ready(cfg)? {
            stages.push(Stage {
                name: "teacher",
                script: format!(
                    "{}{}\n",
                    self.header("teacher", "teacher-%j.out"),
                    self.augpro(&["--teacher-only"])
                ),
                flags: vec![],
            });
        }
        if !missing.is_empty() {
            stages.push(Stage {
                name: "shards",
                script: format!(
                    "{}{}\n",
                    self.header("shards", "shard-%a-%A.out"),
                    self.augpro(&["--shard-index", "\"$SLURM_ARRAY_TASK_ID\""])
                ),
                flags: vec![format!("--array={}", array_spec(missing))],
            });
        }
        if !finalized {
            let verify = format!(
                "{} verify {}",
                sh(&self.exe.display().to_string()),
                sh(&out.display().to_string())
            );
            stages.push(Stage {
                name: "finalize",
                script: format!(
                    "{}{}\n{verify}\n",
                    self.header("finalize", "finalize-%j.out"),
                    self.augpro(&["--finalize"])
                ),
                flags: vec![],
            });
        }
        Ok(stages)
    }
}

/// `augpro-<task>-<name>-<hash of the output directory>`, the prefix of every job name.
fn job_prefix(task: &str, name: &str, out: &Path) -> String {
    format!(
        "augpro-{task}-{name}-{}",
        &crate::util::sha256_bytes(out.display().to_string().as_bytes())[..6]
    )
}

/// Ids of queued or running jobs whose name starts with `prefix`.
fn queued_jobs(prefix: &str) -> Result<Vec<String>> {
    let o = Command::new("squeue")
        .args(["-h", "-o", "%i %j"])
        .output()
        .context("squeue: cannot run (is Slurm installed and on PATH?)")?;
    if !o.status.success() {
        bail!(
            "squeue: {}",
            String::from_utf8_lossy(&o.stderr).trim().replace('\n', " ")
        );
    }
    Ok(String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| l.split_once(' '))
        .filter(|(_, n)| n.starts_with(prefix))
        .map(|(i, _)| i.to_string())
        .collect())
}

/// Writes the scripts and submits the chain (or prints it with `dry_run`); returns the
/// submitted job ids in stage order.
pub fn submit(o: &SubmitOptions) -> Result<Vec<(String, String)>> {
    let p = plan(o)?;
    if p.stages.is_empty() {
        println!(
            "nothing to submit: {} is complete ({} shards and a manifest)",
            p.out.display(),
            o.shards
        );
        return Ok(Vec::new());
    }
    if !p.missing.is_empty() && p.missing.len() < o.shards {
        println!(
            "{} of {} shards already complete; submitting shards {}",
            o.shards - p.missing.len(),
            o.shards,
            array_spec(&p.missing)
        );
    }
    if o.dry_run {
        print_dry_run(&p);
        return Ok(Vec::new());
    }
    let queued = queued_jobs(&p.job)?;
    if !queued.is_empty() {
        bail!("{}: jobs {} of an earlier submission are still queued or running (squeue -j {}); wait for them or scancel them, then submit again", p.out.display(), queued.join(","), queued.join(","));
    }
    std::fs::create_dir_all(&p.script_dir)
        .with_context(|| format!("{}: cannot create script directory", p.script_dir.display()))?;
    let mut ids: Vec<(String, String)> = Vec::new();
    for s in &p.stages {
        let id = sbatch(&p, s, ids.last().map(|(_, id)| id.as_str()))?;
        ids.push((s.name.to_string(), id));
    }
    print_submitted(&p, &ids);
    Ok(ids)
}

/// `sbatch` arguments for a stage, depending on the job `prev` when given.
fn sbatch_args(p: &Plan, s: &Stage, prev: Option<&str>) -> Vec<String> {
    let mut a = vec!["--parsable".to_string()];
    a.extend(s.flags.iter().cloned());
    if let Some(prev) = prev {
        a.push(format!("--dependency=afterok:{prev}"));
        a.push("--kill-on-invalid-dep=yes".into());
    }
    a.push(
        p.script_dir
            .join(format!("{}.sbatch", s.name))
            .display()
            .to_string(),
    );
    a
}

/// Prints each stage's `sbatch` command and script, writing and submitting nothing.
fn print_dry_run(p: &Plan) {
    let mut prev: Option<String> = None;
    for s in &p.stages {
        println!(
            "# {}: sbatch {}\n{}",
            s.name,
            sbatch_args(p, s, prev.as_deref()).join(" "),
            s.script
        );
        prev = Some(format!("<{} job id>", s.name));
    }
    println!(
        "(dry run: nothing written or submitted; scripts would go to {})",
        p.script_dir.display()
    );
}

/// Writes a stage's script and submits it after the job `prev`; returns its job id.
fn sbatch(p: &Plan, s: &Stage, prev: Option<&str>) -> Result<String> {
    let path = p.script_dir.join(format!("{}.sbatch", s.name));
    crate::util::atomic_write(&path, s.script.as_bytes())?;
    let outp = Command::new("sbatch")
        .args(sbatch_args(p, s, prev))
        .output()
        .with_context(|| "sbatch: cannot run (is Slurm installed and on PATH?)".to_string())?;
    if !outp.status.success() {
        bail!(
            "sbatch {}: {}",
            path.display(),
            String::from_utf8_lossy(&outp.stderr)
                .trim()
                .replace('\n', " ")
        );
    }
    let id = String::from_utf8_lossy(&outp.stdout)
        .trim()
        .split(';')
        .next()
        .unwrap_or_default()
        .to_string();
    if id.is_empty() || !id.chars().all(|c| c.is_ascii_digit()) {
        bail!(
            "sbatch {}: unexpected job id {:?}",
            path.display(),
            String::from_utf8_lossy(&outp.stdout)
        );
    }
    Ok(id)
}

/// Prints the submitted job ids and how to watch them.
fn print_submitted(p: &Plan, ids: &[(String, String)]) {
    let list: Vec<&str> = ids.iter().map(|(_, id)| id.as_str()).collect();
    println!(
        "submitted: {}",
        ids.iter()
            .map(|(n, id)| format!("{n} {id}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("watch:     squeue -j {}", list.join(","));
    println!(
        "history:   sacct -j {} --format=JobID,JobName%30,State,Elapsed,ExitCode",
        list.join(",")
    );
    println!("logs:      {}", p.script_dir.display());
    println!("output:    {}", p.out.display());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn array_ranges_and_quoting() {
        assert_eq!(array_spec(&[0, 1, 2, 3]), "0-3");
        assert_eq!(array_spec(&[1, 3, 4, 7]), "1,3-4,7");
        assert_eq!(sh("a b'c"), r"'a b'\''c'");
        assert_eq!(sh("/x/y.toml"), "/x/y.toml");
    }
}
