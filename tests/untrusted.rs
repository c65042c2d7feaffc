//! A dataset from another team is untrusted input. `verify`, `inspect` and `train-student`
//! get manifests, shard summaries and Parquet files mutated by hand and by a seeded
//! generator (names that leave the dataset, truncation, bit flips, another schema, huge
//! declared sizes): each either reads a valid dataset or fails with one `error:` line,
//! never panics, and (traced with strace) opens no file outside the dataset. A decoy shard
//! outside the dataset has the very bytes and sha256 of a real one, so only the name check
//! can keep it out.

mod common;

use common::{augpro_cmd, ok};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Output;

const SHARD0: &str = "data/train-00000-of-00002.parquet";

/// A finished smoke dataset, a decoy outside it, and a scratch area for mutated copies.
struct Fixture {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    good: PathBuf,
}

impl Fixture {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().canonicalize().unwrap();
        let made = root.join("made");
        ok(&[
            "augment",
            "pipelines/smoke.toml",
            "--out",
            made.to_str().unwrap(),
        ]);
        let good = made.join("sst2/smoke");
        let decoy = root.join("outside/data");
        std::fs::create_dir_all(&decoy).unwrap();
        std::fs::copy(good.join(SHARD0), root.join("outside").join(SHARD0)).unwrap();
        std::fs::copy(good.join(SHARD0), decoy.join("decoy.parquet")).unwrap();
        Fixture {
            _tmp: tmp,
            root,
            good,
        }
    }

    /// A fresh copy of the good dataset at `root/cases/<name>`.
    fn copy(&self, name: &str) -> PathBuf {
        let dst = self.root.join("cases").join(name);
        copy_dir(&self.good, &dst);
        dst
    }

    /// A copy whose manifest `edit` changes.
    fn with_manifest(&self, name: &str, edit: impl FnOnce(&mut Value)) -> PathBuf {
        let dir = self.copy(name);
        let mut m: Value =
            serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
        edit(&mut m);
        std::fs::write(
            dir.join("manifest.json"),
            serde_json::to_vec_pretty(&m).unwrap(),
        )
        .unwrap();
        dir
    }

    /// A copy whose shard 0 is `bytes`, with the manifest's size and sha256 updated to
    /// match, so the readers parse the bytes themselves.
    fn with_shard0(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let dir = self.copy(name);
        std::fs::write(dir.join(SHARD0), bytes).unwrap();
        let sha = hex(&Sha256::digest(bytes));
        let mut m: Value =
            serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
        m["shards"][0]["files"][0]["sha256"] = json!(sha);
        m["shards"][0]["files"][0]["bytes"] = json!(bytes.len());
        std::fs::write(
            dir.join("manifest.json"),
            serde_json::to_vec_pretty(&m).unwrap(),
        )
        .unwrap();
        dir
    }

    /// Runs augpro under strace; asserts no panic, no signal, at most one `error:` line
    /// (exactly one on failure), and no file opened outside `dataset` (and the student's
    /// output) within the fixture or at `/dev/zero`. Returns the output.
    fn run(&self, case: &str, dataset: &Path, args: &[&str]) -> Output {
        let trace = self.root.join(format!("trace-{case}.txt"));
        let c = augpro_cmd(args);
        let bin = c.get_program().to_owned();
        let mut traced = std::process::Command::new("strace");
        traced
            .args(["-f", "-qq", "-e", "trace=open,openat,openat2", "-o"])
            .arg(&trace)
            .arg(bin)
            .args(c.get_args())
            .current_dir(common::root())
            .envs(c.get_envs().filter_map(|(k, v)| v.map(|v| (k, v))));
        let o = traced.output().expect("strace (installed by `make setup`)");
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        let what = format!("{case}: augpro {args:?}");
        assert!(
            !err.contains("panicked") && o.status.code().is_some_and(|c| c <= 1),
            "{what} crashed ({:?}):\n{err}",
            o.status
        );
        let errors = err.lines().filter(|l| l.starts_with("error:")).count();
        let want = usize::from(!o.status.success());
        assert_eq!(errors, want, "{what}: one error line expected:\n{err}");
        // The student's output directory, and beside it its staging directory and the
        // directory they are published in (opened to sync the rename).
        let student = self.root.join("student-out");
        for path in opened(&trace) {
            let inside = path.starts_with(dataset) || path.starts_with(&student);
            assert!(
                path != Path::new("/dev/zero") && (!path.starts_with(&self.root) || inside),
                "{what} opened {} outside the dataset:\n{err}",
                path.display()
            );
        }
        o
    }

    /// Runs `verify`, `inspect` and `train-student` on `dataset`; returns their error lines
    /// (empty for a command that succeeded).
    fn all_readers(&self, case: &str, dataset: &Path) -> Vec<String> {
        let d = dataset.to_str().unwrap();
        let student = self.root.join("student-out/student");
        let _ = std::fs::remove_dir_all(&student);
        let runs: [Vec<&str>; 3] = [
            vec!["verify", d],
            vec!["inspect", d, "-n", "1"],
            vec![
                "train-student",
                "--shards",
                d,
                "--task",
                "sst2",
                "--out",
                student.to_str().unwrap(),
                "--max-steps",
                "1",
            ],
        ];
        runs.iter()
            .map(|args| {
                let o = self.run(case, dataset, args);
                error_line(&o)
            })
            .collect()
    }

    /// Asserts that every reader refuses `dataset` with an error line containing `want`.
    fn refused(&self, case: &str, dataset: &Path, want: &str) {
        for (k, e) in self.all_readers(case, dataset).into_iter().enumerate() {
            assert!(
                e.contains(want),
                "{case}: reader {k} should fail naming `{want}`, got: {e:?}"
            );
        }
    }
}

/// The `error:` line (empty on success), after what the command printed on stdout
/// (`verify` lists its problems there).
fn error_line(o: &Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr);
    match err.lines().find(|l| l.starts_with("error:")) {
        Some(e) => format!("{}{e}", String::from_utf8_lossy(&o.stdout)),
        None => String::new(),
    }
}

/// Absolute paths the traced process opened (relative ones resolved against the
/// repository root, where augpro runs).
fn opened(trace: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string(trace).unwrap();
    text.lines()
        .filter_map(|l| l.split_once("open").map(|(_, rest)| rest))
        .filter_map(|rest| rest.split('"').nth(1))
        .map(|p| {
            let p = Path::new(p);
            let p = if p.is_absolute() {
                p.to_path_buf()
            } else {
                common::root().join(p)
            };
            // Resolve `..` and links the way the kernel did; a missing path stays as is.
            p.canonicalize().unwrap_or(p)
        })
        .collect()
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), &to).unwrap();
        }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn manifests_naming_files_outside_the_dataset_are_refused() {
    let fx = Fixture::new();
    let decoy = fx.root.join("outside").join(SHARD0);
    for (case, name) in [
        ("absolute", decoy.to_str().unwrap().to_string()),
        ("dev-zero", "/dev/zero".to_string()),
        ("parent", format!("../../../outside/{SHARD0}")),
        (
            "data-parent",
            "data/../../../../outside/data/decoy.parquet".into(),
        ),
        ("other-dir", "outside/data/decoy.parquet".into()),
        ("other-shard", "data/train-00001-of-00002.parquet".into()),
        ("empty", String::new()),
    ] {
        let dir = fx.with_manifest(case, |m| {
            m["shards"][0]["files"][0]["file"] = json!(name);
        });
        fx.refused(case, &dir, "shards[0]");
    }
    // A shard replaced by a link to the decoy: the same bytes, but outside the dataset.
    let dir = fx.copy("symlink");
    std::fs::remove_file(dir.join(SHARD0)).unwrap();
    std::os::unix::fs::symlink(&decoy, dir.join(SHARD0)).unwrap();
    fx.refused("symlink", &dir, "outside the dataset");
    // The manifest itself a link to a manifest outside: not followed out of the dataset.
    let dir = fx.copy("manifest-symlink");
    let elsewhere = fx.root.join("outside/manifest.json");
    std::fs::rename(dir.join("manifest.json"), &elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, dir.join("manifest.json")).unwrap();
    fx.refused("manifest-symlink", &dir, "outside the dataset");
    // A described dataset whose source is the reader's directory holding the decoy: the
    // student reads none of it (traced) and asks for the reader's own copy instead.
    let outside = fx.root.join("outside");
    let dir = fx.with_manifest("data-source", |m| {
        m["config"]["data"] = json!({
            "source": outside,
            "splits": { "train": "data/*", "validation": "data/*" },
            "text": ["sentence"],
            "label": "label",
            "format": "parquet",
        });
        m["label_names"] = json!(["negative", "positive"]);
    });
    let e = fx.all_readers("data-source", &dir).pop().unwrap();
    assert!(
        e.contains("give --data-source") && e.contains("outside"),
        "{e}"
    );
}

#[test]
fn manifests_with_wrong_fields_get_one_clear_error() {
    let fx = Fixture::new();
    type Edit = Box<dyn Fn(&mut Value)>;
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "huge-size",
            Box::new(|m| m["shards"][0]["files"][0]["bytes"] = json!(u64::MAX)),
            "not the 18446744073709551615 recorded for it",
        ),
        (
            "index",
            Box::new(|m| m["shards"][1]["index"] = json!(0)),
            "shards[1]",
        ),
        (
            "no-format",
            Box::new(|m| {
                m.as_object_mut().unwrap().remove("format_version");
            }),
            "no format_version",
        ),
        (
            "newer",
            Box::new(|m| m["format_version"] = json!(99)),
            "newer than this augpro reads",
        ),
        (
            "shards-type",
            Box::new(|m| m["shards"] = json!(5)),
            "not a valid augpro manifest",
        ),
    ];
    for (case, edit, want) in cases {
        let dir = fx.with_manifest(case, edit);
        fx.refused(case, &dir, want);
    }
    // Fields only a student reads: its dev split and the source files' sha256s.
    let dir = fx.with_manifest("dev", |m| m["config"]["dev"] = json!("tenth"));
    let e = fx.all_readers("dev", &dir).pop().unwrap();
    assert!(e.contains("config.dev"), "{e}");
    let dir = fx.with_manifest("source", |m| {
        m["source"]["files_sha256"]["train-00000-of-00001.parquet"] = json!("0".repeat(64));
    });
    let e = fx.all_readers("source", &dir).pop().unwrap();
    assert!(
        e.contains("train-00000-of-00001.parquet") && e.contains(&"0".repeat(64)),
        "{e}"
    );
}

/// A row whose token id is beyond the teacher's vocabulary: the student names its file and
/// row instead of failing inside the embedding lookup.
#[test]
fn a_token_id_beyond_the_vocabulary_is_named() {
    use augpro::shards::{reader::ShardReader, writer::ShardWriter, ShardSchema};
    let fx = Fixture::new();
    let schema = ShardSchema::new(augpro::shards::task::glue("sst2").unwrap());
    let mut r = ShardReader::open(&fx.good.join(SHARD0).as_path().into(), &schema).unwrap();
    let mut rows = Vec::new();
    while let Some(b) = r.next_rows(&schema).unwrap() {
        rows.extend(b);
    }
    rows[0].input_ids[1] = 999_999;
    let scratch = fx.root.join("scratch");
    let mut w = ShardWriter::create(&scratch.as_path().into(), 0, 2, &schema).unwrap();
    w.write(&rows).unwrap();
    w.finish().unwrap();
    let bytes = std::fs::read(scratch.join(SHARD0)).unwrap();
    let dir = fx.with_shard0("big-id", &bytes);
    let e = fx.all_readers("big-id", &dir).pop().unwrap();
    assert!(
        e.contains(SHARD0) && e.contains("token id 999999") && e.contains("vocabulary size"),
        "{e}"
    );
}

/// A dataset whose directory name holds glob characters is read as named, and only its
/// manifest's files are read (traced).
#[test]
fn glob_characters_in_the_dataset_path_are_plain_characters() {
    let fx = Fixture::new();
    let dir = fx.copy("glob[12]*");
    let o = fx.run("glob", &dir, &["inspect", dir.to_str().unwrap(), "-n", "1"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success() && out.contains("augpro_mix"), "{out}");
}

/// A named pipe where a file should be is refused without waiting on it; a manifest
/// larger than anything a writer makes is refused unread.
#[test]
fn pipes_and_huge_files_are_refused_unread() {
    let fx = Fixture::new();
    let mkfifo = |p: &Path| {
        std::fs::remove_file(p).unwrap();
        let o = std::process::Command::new("mkfifo")
            .arg(p)
            .output()
            .unwrap();
        assert!(o.status.success(), "mkfifo {}", p.display());
    };
    let dir = fx.copy("fifo-manifest");
    mkfifo(&dir.join("manifest.json"));
    fx.refused("fifo-manifest", &dir, "not a regular file");
    let dir = fx.copy("fifo-shard");
    mkfifo(&dir.join(SHARD0));
    fx.refused("fifo-shard", &dir, "not a regular file");
    // A sparse 2 GiB manifest: refused from its size, before any allocation.
    let dir = fx.copy("huge-manifest");
    let f = std::fs::File::create(dir.join("manifest.json")).unwrap();
    f.set_len(2 << 30).unwrap();
    fx.refused("huge-manifest", &dir, "more than the 1073741824 read");
}

#[test]
fn mutated_manifests_and_shards_never_panic_or_read_outside() {
    let fx = Fixture::new();
    let mut rng = ChaCha8Rng::seed_from_u64(24);
    let manifest = std::fs::read(fx.good.join("manifest.json")).unwrap();
    let shard = std::fs::read(fx.good.join(SHARD0)).unwrap();
    // The dataset untouched: every reader succeeds, under the same watch.
    let ok = fx.all_readers("good", &fx.copy("good-copy"));
    assert!(ok.iter().all(String::is_empty), "{ok:?}");
    for k in 0..4 {
        let mut m = manifest.clone();
        m.truncate(rng.gen_range(0..m.len()));
        let dir = fx.copy(&format!("manifest-cut-{k}"));
        std::fs::write(dir.join("manifest.json"), &m).unwrap();
        fx.refused(&format!("manifest-cut-{k}"), &dir, "manifest.json");

        let mut m = manifest.clone();
        for _ in 0..4 {
            let i = rng.gen_range(0..m.len());
            m[i] ^= 1 << rng.gen_range(0..8);
        }
        let dir = fx.copy(&format!("manifest-flip-{k}"));
        std::fs::write(dir.join("manifest.json"), &m).unwrap();
        fx.all_readers(&format!("manifest-flip-{k}"), &dir);
    }
    let mut cases: Vec<(String, Vec<u8>)> = vec![
        ("empty".into(), Vec::new()),
        (
            "glue-file".into(),
            std::fs::read(common::glue_dir().join("sst2/validation-00000-of-00001.parquet"))
                .unwrap(),
        ),
    ];
    let mut footer = shard.clone();
    let n = footer.len();
    footer[n - 8..n - 4].copy_from_slice(&0x7fff_fff0u32.to_le_bytes());
    cases.push(("huge-footer".into(), footer));
    for k in 0..4 {
        cases.push((
            format!("cut-{k}"),
            shard[..rng.gen_range(0..shard.len())].to_vec(),
        ));
        let mut s = shard.clone();
        for _ in 0..8 {
            let i = rng.gen_range(0..s.len());
            s[i] ^= 1 << rng.gen_range(0..8);
        }
        cases.push((format!("flip-{k}"), s));
    }
    for (case, bytes) in cases {
        let dir = fx.with_shard0(&format!("shard-{case}"), &bytes);
        fx.all_readers(&format!("shard-{case}"), &dir);
    }
    // The shards untouched and the manifest not updated: the size check refuses unread.
    let dir = fx.copy("stale-size");
    std::fs::write(dir.join(SHARD0), &shard[..shard.len() / 2]).unwrap();
    fx.refused("stale-size", &dir, "recorded for it");
    // Of the size recorded but other bytes (say, a shard replaced after the manifest was
    // written): `verify` and `train-student` refuse it by its sha256 before reading a row.
    let dir = fx.copy("same-size");
    let mut other = shard.clone();
    let middle = other.len() / 2;
    other[middle] ^= 1;
    std::fs::write(dir.join(SHARD0), &other).unwrap();
    let errs = fx.all_readers("same-size", &dir);
    for k in [0, 2] {
        assert!(
            errs[k].contains("sha256") && errs[k].contains("recorded for it"),
            "reader {k}: {errs:?}"
        );
    }
}

#[test]
fn finalize_refuses_shard_summaries_naming_other_files() {
    let fx = Fixture::new();
    let out = fx.root.join("finalize");
    let dir = out.join("sst2/smoke");
    copy_dir(&fx.good, &dir);
    std::fs::remove_file(dir.join("manifest.json")).unwrap();
    let marker = dir.join(".train-00000-of-00002.done.json");
    let mut s: Value = serde_json::from_slice(&std::fs::read(&marker).unwrap()).unwrap();
    s["files"][0]["file"] = json!("../../../outside/data/decoy.parquet");
    std::fs::write(&marker, serde_json::to_vec(&s).unwrap()).unwrap();
    let o = fx.run(
        "summary",
        &dir,
        &[
            "augment",
            "pipelines/smoke.toml",
            "--out",
            out.to_str().unwrap(),
            "--finalize",
        ],
    );
    let e = error_line(&o);
    assert!(
        e.contains(".train-00000-of-00002.done.json") && e.contains("expected exactly"),
        "{e}"
    );
    assert!(!dir.join("manifest.json").exists());
}
