//! Crash safety of the smoke pipeline: SIGKILL at each stage then resume, SIGINT and
//! SIGTERM, and a disk that fills up. Every interrupted run must end byte-identical to an uninterrupted
//! one and leave no temporary file behind.

mod common;

use common::{files, ok};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

const SMOKE: &str = "sst2/smoke";

fn augment_cmd(out_root: &Path, extra: &[&str]) -> Command {
    common::augpro_cmd(&common::augment_args(out_root, extra))
}

/// Asserts no temporary (`*.tmp-PID`) is left in `dir` or its `data/`.
fn no_temporaries(dir: &Path) {
    if dir.join("data").is_dir() {
        no_temporaries(&dir.join("data"));
    }
    if dir.is_dir() {
        let names = files(dir);
        assert!(
            !names.iter().any(|n| n.contains(".tmp-")),
            "temporary left in {}: {names:?}",
            dir.display()
        );
    }
}

/// Asserts that every content file of `a` (shards, summaries, manifest, card) is
/// byte-identical in `b`; timings are wall-clock and excluded.
fn same_outputs(a: &Path, b: &Path) {
    let content = |d: &Path| {
        let data = files(&d.join("data"))
            .into_iter()
            .map(|n| format!("data/{n}"));
        files(d)
            .into_iter()
            .filter(|n| !n.contains("timing") && n != "data")
            .chain(data)
            .collect::<Vec<_>>()
    };
    assert_eq!(content(a), content(b), "file sets differ");
    for f in content(a) {
        assert!(
            std::fs::read(a.join(&f)).unwrap() == std::fs::read(b.join(&f)).unwrap(),
            "{f} differs from the uninterrupted run"
        );
    }
}

/// The `augpro` binary has no fault-injection points: only `augpro-faulty` reads
/// `AUGPRO_FAILPOINT`.
#[test]
fn the_augpro_binary_honours_no_failpoint() {
    let bin = std::fs::read(env!("CARGO_BIN_EXE_augpro")).unwrap();
    let name = b"AUGPRO_FAILPOINT";
    assert!(!bin.windows(name.len()).any(|w| w == name));
}

/// The SIGKILL points are fault-injection points of `augpro-faulty` (the `failpoints`
/// feature).
#[cfg(feature = "failpoints")]
#[test]
fn sigkill_at_every_stage_then_resume_is_byte_identical() {
    use std::os::unix::process::ExitStatusExt;

    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("teachers");
    let set = format!("teacher.cache_dir={}", cache.display());
    let reference = tmp.path().join("ref");
    let o = augment_cmd(&reference, &["--set", &set]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // The interrupted chain must train its own teacher again, so move this one away.
    std::fs::rename(&cache, tmp.path().join("teachers-ref")).unwrap();

    let root = tmp.path().join("killed");
    let out = root.join(SMOKE);
    let kill_at = |point: &str| {
        let o = common::augpro_faulty_cmd(&common::augment_args(&root, &["--set", &set]))
            .env("AUGPRO_FAILPOINT", point)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert_eq!(
            o.status.signal(),
            Some(libc::SIGKILL),
            "{point}: expected SIGKILL, got {:?}\n{err}",
            o.status
        );
        assert!(err.contains(&format!("failpoint {point}")), "{err}");
    };
    // During teacher training: no teacher is in place, only its temporary.
    kill_at("teacher-step");
    let teachers = if cache.is_dir() {
        files(&cache)
    } else {
        Vec::new()
    };
    assert!(teachers.iter().all(|n| n.contains(".tmp-")), "{teachers:?}");
    // During the first shard: its files exist only under temporary names.
    kill_at("shard-batch");
    assert!(
        files(&out.join("data"))
            .iter()
            .any(|n| n.starts_with(".train-00000-of-00002.parquet.tmp-")),
        "{:?}",
        files(&out.join("data"))
    );
    assert!(!out.join("data/train-00000-of-00002.parquet").exists());
    // Between shards: shard 0 complete, shard 1 not started.
    kill_at("shard-done");
    assert!(
        out.join(".train-00000-of-00002.done.json").is_file()
            && !out.join("data/train-00001-of-00002.parquet").exists()
    );
    // While the manifest is written.
    kill_at("manifest-write");
    assert!(
        !out.join("manifest.json").exists()
            && files(&out)
                .iter()
                .any(|n| n.starts_with(".manifest.json.tmp-"))
    );

    let text = ok(&[
        "augment",
        "pipelines/smoke.toml",
        "--out",
        root.to_str().unwrap(),
        "--set",
        &set,
    ]);
    assert!(text.contains("already complete, skipped"), "{text}");
    same_outputs(&reference.join(SMOKE), &out);
    no_temporaries(&out);
    no_temporaries(&cache);
    assert!(ok(&["verify", out.to_str().unwrap()]).contains("ok"));
}

#[test]
fn sigint_stops_cleanly_and_the_rerun_completes() {
    signal_stops_cleanly_and_the_rerun_completes(libc::SIGINT);
}

/// Slurm's `scancel` sends SIGTERM.
#[test]
fn sigterm_stops_cleanly_and_the_rerun_completes() {
    signal_stops_cleanly_and_the_rerun_completes(libc::SIGTERM);
}

/// Sends `signal` once augmentation has started; the process must remove its temporaries
/// and exit 130, and the rerun must complete.
fn signal_stops_cleanly_and_the_rerun_completes(signal: i32) {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("int");
    let out = root.join(SMOKE);
    let mut child = augment_cmd(&root, &[])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    let mut line = String::new();
    while err.read_line(&mut line).unwrap() > 0 {
        seen.push_str(&line);
        if line.contains("augmenting source examples") {
            // SAFETY: signalling our own child process.
            unsafe { libc::kill(child.id() as i32, signal) };
            break;
        }
        line.clear();
    }
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut err, &mut rest).unwrap();
    let status = child.wait().unwrap();
    seen.push_str(&rest);
    assert_eq!(status.code(), Some(130), "{seen}");
    assert!(
        seen.contains("interrupted") && seen.contains("rerun the same command to resume"),
        "{seen}"
    );
    no_temporaries(&out);
    ok(&[
        "augment",
        "pipelines/smoke.toml",
        "--out",
        root.to_str().unwrap(),
    ]);
    assert!(ok(&["verify", out.to_str().unwrap()]).contains("ok"));
}

/// Unmounts the small filesystem however the test ends.
struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Needs root (it mounts a small tmpfs): ignored in a plain `cargo test`; `make test` runs
/// it when it runs as root, and `make test-root` runs it alone.
#[test]
#[ignore = "needs root to mount a tmpfs: `make test-root`"]
fn a_full_disk_keeps_completed_shards_and_resumes() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "mounting a small tmpfs needs root"
    );
    let tmp = tempfile::tempdir().unwrap();
    let reference = tmp.path().join("ref");
    ok(&[
        "augment",
        "pipelines/smoke.toml",
        "--out",
        reference.to_str().unwrap(),
    ]);
    let size = |f: &str| {
        std::fs::metadata(reference.join(SMOKE).join(f))
            .unwrap()
            .len()
    };
    let shard0 =
        size("data/train-00000-of-00002.parquet") + size("data/virtual-00000-of-00002.parquet");
    // Room for shard 0 and its small files, not for shard 1.
    let size_k = shard0.div_ceil(4096) * 4 + 20;
    let small = tmp.path().join("small");
    std::fs::create_dir_all(&small).unwrap();
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size_k}k"), "tmpfs"])
        .arg(&small)
        .status()
        .unwrap();
    assert!(st.success(), "mount tmpfs");
    let _guard = Mount(small.clone());
    let out = small.join(SMOKE);

    let o = augment_cmd(&small, &[]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!o.status.success(), "a full disk must fail the run");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].contains("-00001-of-00002.parquet")
            && lines[0].contains("No space left on device"),
        "{}",
        lines[0]
    );
    // Shard 0 is intact and matches its summary; nothing of shard 1 is left.
    let names = files(&out.join("data"));
    assert!(
        names.contains(&"train-00000-of-00002.parquet".to_string())
            && !names.iter().any(|n| n.contains("00001")),
        "{names:?}"
    );
    for f in [
        "data/train-00000-of-00002.parquet",
        "data/virtual-00000-of-00002.parquet",
    ] {
        assert!(
            std::fs::read(out.join(f)).unwrap()
                == std::fs::read(reference.join(SMOKE).join(f)).unwrap()
        );
    }
    no_temporaries(&out);

    // Free space and rerun: shard 0 is skipped and the result equals the reference.
    let st = Command::new("mount")
        .args(["-o", "remount,size=4m"])
        .arg(&small)
        .status()
        .unwrap();
    assert!(st.success(), "remount");
    let text = ok(&[
        "augment",
        "pipelines/smoke.toml",
        "--out",
        small.to_str().unwrap(),
    ]);
    assert!(
        text.contains("shard 0/2: already complete, skipped"),
        "{text}"
    );
    same_outputs(&reference.join(SMOKE), &out);
    no_temporaries(&out);
}
