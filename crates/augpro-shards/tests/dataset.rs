//! A whole dataset made and read with this crate alone: shards written, a manifest
//! recorded, then verified, read back, damaged and refused.

use augpro_shards::manifest::{
    parse_manifest, read_manifest, verify, Manifest, ShardSummary, FORMAT_VERSION, MANIFEST,
};
use augpro_shards::reader::ShardReader;
use augpro_shards::storage::Location;
use augpro_shards::writer::ShardWriter;
use augpro_shards::{MethodStats, Row, ShardSchema};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::Path;

fn row(idx: i64, method: &'static str) -> Row {
    Row {
        texts: vec![format!("a film {idx}")],
        label: (method == "original").then_some((idx % 2) as f32),
        idx,
        method,
        copy: 0,
        partner_idx: None,
        lambda: None,
        epsilon: None,
        input_ids: vec![101, 1037, 2143 + idx as u32, 102],
        token_type_ids: vec![0; 4],
        changed_tokens: None,
        teacher_logits: vec![0.5, -0.5 * idx as f32],
        partner_input_ids: None,
        partner_token_type_ids: None,
        perturbation: None,
        lambdas: None,
    }
}

fn rows() -> Vec<Row> {
    let mut rows: Vec<Row> = (0..6).map(|i| row(i, "original")).collect();
    for i in 0..6 {
        let mut r = row(i, "augpro_mix");
        r.partner_idx = Some((i + 1) % 6);
        r.lambda = Some(0.75);
        r.changed_tokens = Some(1);
        rows.push(r);
    }
    let mut mixup = row(0, "mixup");
    mixup.partner_idx = Some(1);
    mixup.lambda = Some(0.6);
    mixup.partner_input_ids = Some(vec![101, 2204, 102]);
    mixup.partner_token_type_ids = Some(vec![0; 3]);
    rows.push(mixup);
    rows
}

/// Writes `rows` as a one-shard SST-2 dataset under `dir`, with its manifest.
fn write_dataset(dir: &Path, rows: &[Row]) -> Manifest {
    let loc = Location::from_arg(dir).unwrap();
    let schema = ShardSchema::new(augpro_shards::task::glue("sst2").unwrap());
    let mut w = ShardWriter::create(&loc, 0, 1, &schema).unwrap();
    let (real, virt): (Vec<Row>, Vec<Row>) = rows
        .iter()
        .cloned()
        .partition(|r| !augpro_shards::schema::is_virtual(r.method));
    w.write(&real).unwrap();
    w.write(&virt).unwrap();
    let files = w.finish().unwrap();
    let mut methods: BTreeMap<String, MethodStats> = BTreeMap::new();
    for r in rows {
        methods.entry(r.method.to_string()).or_default().rows += 1;
    }
    let method_rows: BTreeMap<String, u64> =
        methods.iter().map(|(k, v)| (k.clone(), v.rows)).collect();
    let shard = ShardSummary {
        index: 0,
        files,
        source_examples: 6,
        truncated_examples: 0,
        rows: rows.len() as u64,
        source_sha256: BTreeMap::new(),
        config_sha256: "c".repeat(64),
        teacher_sha256: "t".repeat(64),
        methods,
        median_nn_distance: 1.0,
        device: "cpu".into(),
        dtype: "f32".into(),
    };
    let m: Manifest = serde_json::from_value(json!({
        "format_version": FORMAT_VERSION,
        "augpro_version": "test",
        "task": "sst2",
        "split": "train",
        "source": {},
        "seed": 0,
        "config": {},
        "config_sha256": "c".repeat(64),
        "teacher": {"vocab_size": 30522},
        "tokenizer_sha256": "k".repeat(64),
        "projection": {},
        "num_labels": 2,
        "source_examples": 6,
        "truncated_examples": 0,
        "rows": rows.len(),
        "method_rows": method_rows,
        "diagnostics": {},
        "shards": [shard],
    }))
    .unwrap();
    std::fs::write(
        dir.join(MANIFEST),
        serde_json::to_string_pretty(&m).unwrap(),
    )
    .unwrap();
    m
}

/// Every row of the dataset, file by file.
fn read_all(loc: &Location) -> Vec<Row> {
    let m = read_manifest(loc).unwrap();
    let schema = ShardSchema::new(m.task().unwrap());
    let mut out = Vec::new();
    for f in m.shards.iter().flat_map(|s| &s.files) {
        let mut r = ShardReader::open(&loc.join(&f.file), &schema).unwrap();
        while let Some(b) = r.next_rows(&schema).unwrap() {
            out.extend(b);
        }
    }
    out
}

#[test]
fn a_written_dataset_verifies_and_reads_back_row_for_row() {
    let dir = tempfile::tempdir().unwrap();
    let rows = rows();
    write_dataset(dir.path(), &rows);
    let loc = Location::from_arg(dir.path()).unwrap();
    assert_eq!(verify(&loc).unwrap(), Vec::<String>::new());
    let mut want = rows.clone();
    let mut got = read_all(&loc);
    let key = |r: &Row| (r.method, r.idx);
    want.sort_by_key(key);
    got.sort_by_key(key);
    assert_eq!(got, want);
}

#[test]
fn verify_names_a_damaged_shard_and_an_unlisted_file() {
    let dir = tempfile::tempdir().unwrap();
    let m = write_dataset(dir.path(), &rows());
    let shard = dir.path().join(&m.shards[0].files[0].file);
    let mut bytes = std::fs::read(&shard).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&shard, bytes).unwrap();
    std::fs::write(dir.path().join("data/extra.parquet"), b"x").unwrap();
    let loc = Location::from_arg(dir.path()).unwrap();
    let problems = verify(&loc).unwrap();
    let name = m.shards[0].files[0].file.clone();
    assert!(problems.iter().any(|p| p.contains(&name)), "{problems:?}");
    assert!(
        problems
            .iter()
            .any(|p| p.contains("data/extra.parquet") && p.contains("not listed")),
        "{problems:?}"
    );
}

#[test]
fn a_manifest_of_another_format_version_is_refused_by_number() {
    let e = parse_manifest(r#"{"format_version": 99}"#).unwrap_err();
    let msg = format!("{e:#}");
    assert!(
        msg.contains("99") && msg.contains(&FORMAT_VERSION.to_string()),
        "{msg}"
    );
}

#[test]
fn a_described_dataset_takes_its_columns_from_the_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = write_dataset(dir.path(), &rows());
    m.task = "reviews".into();
    m.config = json!({"data": {
        "source": "/data/reviews",
        "splits": {"train": "train.csv", "test": "test.csv"},
        "text": ["review"],
    }});
    m.label_names = Some(vec!["bad".into(), "good".into()]);
    let t = m.task().unwrap();
    assert_eq!(t.text_columns, ["review"]);
    assert_eq!(t.label_names, ["bad", "good"]);
    assert_eq!(t.validation_splits, ["test"]);

    // Class names are the manifest's: one that lacks them is refused, naming the field.
    m.label_names = None;
    let e = format!("{:#}", m.task().unwrap_err());
    assert!(e.contains("label_names"), "{e}");

    // A split pattern that leaves the source is refused before anything is read.
    m.config["data"]["splits"]["train"] = json!("../../etc/passwd");
    let e = format!("{:#}", m.task().unwrap_err());
    assert!(e.contains("data.splits.train") && e.contains(".."), "{e}");
}
