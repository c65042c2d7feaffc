//! Paths and command helpers shared by the integration tests.
// Each test binary includes this module and uses only some of its helpers.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// GLUE data: AUGPRO_GLUE_DIR, else a local mirror at ../shared/data/glue, else
/// data/glue (which `make test` fetches when no copy is configured).
pub fn glue_dir() -> PathBuf {
    match std::env::var_os("AUGPRO_GLUE_DIR") {
        Some(v) if !v.is_empty() => PathBuf::from(v),
        _ if root().join("../shared/data/glue/sst2").is_dir() => root().join("../shared/data/glue"),
        _ => root().join("data/glue"),
    }
}

/// The default base encoder (installed by `make setup`).
pub fn model_dir() -> PathBuf {
    root().join("data/models/minilm-l6")
}

/// The PyTorch reference outputs of the base encoder (`tests/fixtures/make_reference.py`).
pub fn reference() -> serde_json::Value {
    let p = root().join("tests/fixtures/minilm_l6_base.json");
    serde_json::from_slice(&std::fs::read(&p).expect("reference file")).expect("reference json")
}

/// The Python block under "## Share with another team" in `docs/sharing.md`: the lines another
/// team loads a dataset from a bucket with, which `tests/share.rs` runs against S3 and
/// `tests/docs.rs` checks are there.
pub fn sharing_loading_lines() -> String {
    let path = root().join("docs/sharing.md");
    let doc = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let section = doc
        .split("\n## Share with another team\n")
        .nth(1)
        .expect("docs/sharing.md: no \"## Share with another team\" section");
    // The section ends at the next heading of its level.
    let section = section.split("\n## ").next().unwrap();
    section
        .split("```python\n")
        .nth(1)
        .expect("docs/sharing.md: no ```python block under \"## Share with another team\"")
        .split("```")
        .next()
        .unwrap()
        .to_string()
}

/// The `augpro` binary with `args`, in the repository root, with the test GLUE directory.
pub fn augpro_cmd(args: &[&str]) -> Command {
    command(env!("CARGO_BIN_EXE_augpro"), args)
}

/// The `augpro-faulty` binary (the same command with fault-injection points, see
/// `AUGPRO_FAILPOINT`) with `args`, like [`augpro_cmd`].
#[cfg(feature = "failpoints")]
pub fn augpro_faulty_cmd(args: &[&str]) -> Command {
    command(env!("CARGO_BIN_EXE_augpro-faulty"), args)
}

fn command(bin: &str, args: &[&str]) -> Command {
    let mut c = Command::new(bin);
    c.args(args)
        .current_dir(root())
        .env("AUGPRO_GLUE_DIR", glue_dir());
    c
}

/// Runs the `augpro` binary in the repository root with the test GLUE directory.
pub fn augpro(args: &[&str]) -> Output {
    augpro_cmd(args).output().expect("run augpro")
}

/// Runs `augpro`, asserts success and returns stdout + stderr.
pub fn ok(args: &[&str]) -> String {
    let o = augpro(args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "augpro {args:?} failed:\n{text}");
    text
}

/// Runs `augpro`, asserts failure with exactly one `error:` line, and returns that line.
pub fn fail(args: &[&str]) -> String {
    let o = augpro(args);
    assert!(!o.status.success(), "augpro {args:?} should fail");
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "one error line expected, got:\n{err}");
    lines[0].to_string()
}

/// `augment pipelines/smoke.toml --out <out_root>` followed by `extra`.
pub fn augment_args<'a>(out_root: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "augment",
        "pipelines/smoke.toml",
        "--out",
        out_root.to_str().unwrap(),
    ];
    args.extend(extra);
    args
}

/// Sorted file names in a directory.
pub fn files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    v.sort();
    v
}

/// The first `n` examples of a GLUE split.
pub fn glue_examples(config: &str, split: &str, n: usize) -> Vec<augpro::data::Example> {
    let task = augpro::task::glue(config).unwrap();
    augpro::data::SplitReader::open(&glue_dir(), task, split)
        .unwrap()
        .read_all(Some(n))
        .unwrap()
}

fn csv_field(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// SST-2 as a review export: `id,review,sentiment`, the sentiment a word.
pub fn write_reviews(path: &Path, split: &str, n: usize) -> Vec<augpro::data::Example> {
    let ex = glue_examples("sst2", split, n);
    let mut text = String::from("id,review,sentiment\n");
    for e in &ex {
        let word = ["negative", "positive"][e.label.unwrap() as usize];
        text.push_str(&format!("{},{},{word}\n", e.idx, csv_field(&e.text_a)));
    }
    std::fs::write(path, text).unwrap();
    ex
}

/// The schema and rows of a shard directory, read with the schema of the task its
/// manifest names or describes.
pub fn shard_rows(dir: &Path) -> (augpro::shards::ShardSchema, Vec<augpro::shards::Row>) {
    use augpro::shards::{manifest, reader::ShardReader, ShardSchema};
    let (m, paths) = manifest::shard_paths(&dir.into()).unwrap();
    let schema = ShardSchema::new(augpro::data::manifest_task(&m).unwrap());
    let mut rows = Vec::new();
    for p in paths {
        let mut r = ShardReader::open(&p, &schema).unwrap();
        while let Some(b) = r.next_rows(&schema).unwrap() {
            rows.extend(b);
        }
    }
    (schema, rows)
}

/// The rows of a shard directory.
pub fn read_rows(dir: &Path) -> Vec<augpro::shards::Row> {
    shard_rows(dir).1
}
