//! The smoke pipeline end to end through the binary: teacher, augmentation, shards,
//! determinism across threads and shard splitting, resume, verify, interoperability
//! (pyarrow, polars), inspect, the student trainer, and configuration errors.

mod common;

use augpro::shards::reader::ShardReader;
use augpro::shards::{Row, ShardSchema};
use common::{augpro, fail, files, ok, read_rows};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The central contract: a token row's `teacher_logits` are the teacher's on exactly that
/// row's tokens. Reloads the teacher and recomputes them, one row at a time (no padding),
/// for a sample of the rows of every token method.
fn logits_contract(rows: &[Row], manifest: &serde_json::Value) {
    let teacher_dir = common::root().join(manifest["teacher"]["path"].as_str().unwrap());
    let task = augpro::task::glue("sst2").unwrap();
    let dev = candle_core::Device::Cpu;
    let teacher = augpro::teacher::Teacher::load(&teacher_dir, task, &dev, 64).unwrap();
    for method in ["original", "augpro_mix", "augpro_fgsm", "token_replace"] {
        let sample: Vec<&Row> = rows
            .iter()
            .filter(|r| r.method == method)
            .step_by(5)
            .collect();
        assert!(
            sample.len() >= 10,
            "{method}: {} rows sampled",
            sample.len()
        );
        for r in sample {
            let b = teacher
                .batch(&[(r.input_ids.as_slice(), r.token_type_ids.as_slice())])
                .unwrap();
            let got: Vec<Vec<f32>> = teacher.logits(&b).unwrap().to_vec2().unwrap();
            for (x, y) in got[0].iter().zip(&r.teacher_logits) {
                assert!(
                    (x - y).abs() <= 1e-5,
                    "{method} row of idx {}: teacher gives {:?}, the shard has {:?}",
                    r.idx,
                    got[0],
                    r.teacher_logits
                );
            }
        }
    }
}

fn out_dir(root: &Path) -> PathBuf {
    root.join("sst2/smoke")
}

#[test]
fn smoke_pipeline_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let a_root = tmp.path().join("a");
    let a = out_dir(&a_root);
    let text = ok(&[
        "augment",
        "pipelines/smoke.toml",
        "--out",
        a_root.to_str().unwrap(),
    ]);
    layout_is_complete(&a, &text);
    rows_keep_the_contract(&a);
    sharded_run_is_byte_identical(&a, tmp.path());
    rerun_skips_and_other_configs_are_refused(&a_root, tmp.path());
    other_readers_load_the_shards(&a);
    student_trains_on_the_shards(&a, tmp.path());
    fgsm_rows_need_the_teachers_embedding_table(&a, tmp.path());
    verify_detects_damage(&a, tmp.path());
}

/// The output directory holds the manifest, its README, the timings and the shards, and
/// nothing else; `verify` passes.
fn layout_is_complete(a: &Path, augment_output: &str) {
    assert!(augment_output.contains("shards:"), "{augment_output}");
    let names = files(a);
    for f in ["manifest.json", "README.md", "timings.json"]
        .into_iter()
        .chain(SHARD_FILES)
    {
        assert!(a.join(f).is_file(), "{f} missing in {names:?}");
    }
    let data = files(&a.join("data"));
    assert_eq!(
        data,
        SHARD_FILES.map(|f| f[5..].to_string()),
        "data/ holds the shards only"
    );
    assert!(
        !names.iter().any(|n| n.contains(".tmp-")),
        "no temporary file left: {names:?}"
    );
    assert!(ok(&["verify", a.to_str().unwrap()]).contains("ok"));
}

/// Every row: teacher logits of the task's width; augmented rows keep the source's
/// length, segments and special positions; projected rows contain no special token
/// elsewhere; virtual rows carry what the student needs to rebuild them.
fn rows_keep_the_contract(a: &Path) {
    let rows = read_rows(a);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(a.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["source_examples"], 64);
    let src = common::glue_dir().join("sst2/train-00000-of-00001.parquet");
    assert_eq!(
        manifest["source"]["files_sha256"]["train-00000-of-00001.parquet"],
        augpro::util::sha256_file(&src).unwrap().as_str(),
        "{}",
        manifest["source"]
    );
    assert_eq!(rows.len() as u64, manifest["rows"].as_u64().unwrap());
    let tok = augpro::tokenize::TextTokenizer::load(&common::model_dir(), 128).unwrap();
    let originals: HashMap<i64, &Row> = rows
        .iter()
        .filter(|r| r.method == "original")
        .map(|r| (r.idx, r))
        .collect();
    assert_eq!(originals.len(), 64);
    // No row comes from the dev split, which the manifest records.
    let dev: augpro::config::DevConfig =
        serde_json::from_value(manifest["config"]["dev"].clone()).unwrap();
    assert_eq!((dev.fraction, dev.max_examples), (0.1, 200));
    let train_rows = augpro::data::split_rows(
        &common::glue_dir(),
        augpro::task::glue("sst2").unwrap(),
        "train",
    )
    .unwrap();
    assert!(rows.iter().all(|r| !dev.contains(r.idx, train_rows)));
    let mut per: HashMap<&str, usize> = HashMap::new();
    for r in &rows {
        *per.entry(r.method).or_default() += 1;
        assert_eq!(r.teacher_logits.len(), 2);
        assert!(r.teacher_logits.iter().all(|x| x.is_finite()));
        let src = originals[&r.idx];
        assert_eq!(
            r.input_ids.len(),
            src.input_ids.len(),
            "{} keeps the length",
            r.method
        );
        assert_eq!(
            r.token_type_ids, src.token_type_ids,
            "{} keeps the segments",
            r.method
        );
        for (i, (&x, &y)) in r.input_ids.iter().zip(&src.input_ids).enumerate() {
            if tok.is_special(y) {
                assert_eq!(x, y, "{}: special position {i} kept", r.method);
            } else {
                assert!(
                    !tok.is_special(x),
                    "{}: projection produced a special token",
                    r.method
                );
            }
        }
        match r.method {
            "original" => assert!(r.label.is_some()),
            "mixup" => {
                // Per-position λ (the smoke pipeline's mode): one per token, no sequence λ.
                assert!(r.partner_input_ids.is_some() && r.partner_idx.is_some());
                assert!(r.lambda.is_none());
                let ls = r.lambdas.as_ref().unwrap();
                assert_eq!(ls.len(), r.input_ids.len());
                assert!(ls.iter().all(|l| (0.0..=1.0).contains(l)));
            }
            "fgsm" => assert_eq!(
                r.perturbation.as_ref().unwrap().len(),
                r.input_ids.len() * 384
            ),
            "augpro_mix" | "augpro_fgsm" | "token_replace" => {
                assert_eq!(
                    r.changed_tokens.unwrap() as usize,
                    r.input_ids
                        .iter()
                        .zip(&src.input_ids)
                        .filter(|(x, y)| x != y)
                        .count()
                );
                assert!(r.label.is_none());
            }
            m => panic!("unknown method {m}"),
        }
    }
    for m in [
        "original",
        "augpro_mix",
        "augpro_fgsm",
        "token_replace",
        "mixup",
        "fgsm",
    ] {
        assert_eq!(per.get(m).copied().unwrap_or(0), 64, "{m} rows");
    }
    logits_contract(&rows, &manifest);
    let d = &manifest["diagnostics"];
    assert!(d["augpro_mix"]["changed_position_rate"].as_f64().unwrap() > 0.0);
    assert!(d["augpro_fgsm"]["changed_position_rate"].as_f64().unwrap() > 0.0);
}

/// The same config, one thread, one process per shard, then finalize: byte-identical to
/// the run in `a`.
fn sharded_run_is_byte_identical(a: &Path, tmp: &Path) {
    let b_root = tmp.join("b");
    let b = out_dir(&b_root);
    for i in ["0", "1"] {
        ok(&[
            "--threads",
            "1",
            "augment",
            "pipelines/smoke.toml",
            "--out",
            b_root.to_str().unwrap(),
            "--num-shards",
            "2",
            "--shard-index",
            i,
        ]);
    }
    assert!(
        !b.join("manifest.json").exists(),
        "a single shard does not finalize"
    );
    ok(&[
        "augment",
        "pipelines/smoke.toml",
        "--out",
        b_root.to_str().unwrap(),
        "--finalize",
    ]);
    for f in ["manifest.json", "README.md"]
        .into_iter()
        .chain(SHARD_FILES)
    {
        let (x, y) = (
            std::fs::read(a.join(f)).unwrap(),
            std::fs::read(b.join(f)).unwrap(),
        );
        assert!(x == y, "{f} differs between runs");
    }
}

/// A rerun skips complete shards and changes nothing; a different configuration, or a
/// completion summary this version cannot read, is refused without `--force`.
fn rerun_skips_and_other_configs_are_refused(a_root: &Path, tmp: &Path) {
    let a = out_dir(a_root);
    let before = std::fs::read(a.join(SHARD_FILES[0])).unwrap();
    let text = ok(&[
        "augment",
        "pipelines/smoke.toml",
        "--out",
        a_root.to_str().unwrap(),
    ]);
    assert!(text.contains("already complete, skipped"), "{text}");
    assert!(
        before == std::fs::read(a.join(SHARD_FILES[0])).unwrap(),
        "a skipped shard is untouched"
    );

    // A different configuration in the same directory is refused without --force.
    let cfg2 = tmp.join("smoke2.toml");
    std::fs::write(
        &cfg2,
        std::fs::read_to_string(common::root().join("pipelines/smoke.toml"))
            .unwrap()
            .replace("seed = 7", "seed = 8"),
    )
    .unwrap();
    let e = fail(&[
        "augment",
        cfg2.to_str().unwrap(),
        "--out",
        a_root.to_str().unwrap(),
    ]);
    assert!(
        e.contains("different pipeline configuration") && e.contains("--force"),
        "{e}"
    );
    // A completion summary this version cannot read is refused the same way.
    let odd_root = tmp.join("odd");
    std::fs::create_dir_all(out_dir(&odd_root)).unwrap();
    std::fs::write(
        out_dir(&odd_root).join(".train-00000-of-00002.done.json"),
        b"{\"file\": 1}",
    )
    .unwrap();
    let e = fail(&[
        "augment",
        "pipelines/smoke.toml",
        "--out",
        odd_root.to_str().unwrap(),
    ]);
    assert!(
        e.contains("unreadable shard summary") && e.contains("--force"),
        "{e}"
    );
}

/// Interoperability: pyarrow and polars read the shards, which have the Hugging Face
/// layout, and `inspect` summarises them.
fn other_readers_load_the_shards(a: &Path) {
    let py = format!(
        r#"
import pyarrow as pa, pyarrow.parquet as pq, polars as pl, json, glob
d = "{dir}"
m = json.load(open(d + "/manifest.json"))
t = pq.read_table(glob.glob(d + "/data/train-00000-*.parquet")[0])
assert t.schema.field("input_ids").type == pa.list_(pa.int32()), t.schema
assert t.schema.field("token_type_ids").type == pa.list_(pa.int8()), t.schema
assert t.schema.field("teacher_logits").type == pa.list_(pa.float32(), 2), t.schema
assert t.schema.field("label").type == pa.int64() and t.schema.field("idx").type == pa.int32(), t.schema
assert t.num_rows == m["shards"][0]["files"][0]["rows"]
df = pl.read_parquet(d + "/data/*.parquet")
assert df.height == m["rows"], (df.height, m["rows"])
assert set(df["method"].unique()) == {{"original","augpro_mix","augpro_fgsm","token_replace","mixup","fgsm"}}
assert df.schema["label"] == pl.Int64 and df.schema["idx"] == pl.Int32
print("interop ok", df.height)
"#,
        dir = a.display()
    );
    python(&py, a);
    hugging_face_layout(a);

    let text = ok(&["inspect", a.to_str().unwrap()]);
    assert!(
        text.contains("augpro_mix") && text.contains("source :"),
        "{text}"
    );
}

/// The student trainer reads the shards and reports the metric; an unknown method is
/// refused.
fn student_trains_on_the_shards(a: &Path, tmp: &Path) {
    let s = tmp.join("student");
    let text = ok(&[
        "train-student",
        "--shards",
        a.to_str().unwrap(),
        "--task",
        "sst2",
        "--out",
        s.to_str().unwrap(),
        "--max-steps",
        "6",
        "--methods",
        "original,augpro_mix,mixup,fgsm",
    ]);
    assert!(text.contains("accuracy"), "{text}");
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(s.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(m["steps"], 6);
    assert_eq!(m["eval_max_seq_len"], 128);
    let acc = m["validation"]["validation"]["accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&acc));
    assert_eq!(m["rows_available"], 256);
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(s.join(f).is_file(), "{f}");
    }
    let e = fail(&[
        "train-student",
        "--shards",
        a.to_str().unwrap(),
        "--task",
        "sst2",
        "--out",
        s.to_str().unwrap(),
        "--methods",
        "nope",
    ]);
    assert!(e.contains("unknown method `nope`"), "{e}");
}

/// `fgsm` rows hold gradient signs in the teacher's embedding coordinates: a student with
/// another table of the same width is refused, with one error line, unless it leaves those
/// rows out.
fn fgsm_rows_need_the_teachers_embedding_table(shards: &Path, tmp: &Path) {
    let model = tmp.join("other-table");
    std::fs::create_dir_all(&model).unwrap();
    for f in ["config.json", "tokenizer.json", "vocab.txt"] {
        std::fs::copy(common::model_dir().join(f), model.join(f)).unwrap();
    }
    let mut w = candle_core::safetensors::load(
        common::model_dir().join("model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let key = w
        .keys()
        .find(|k| k.ends_with("word_embeddings.weight"))
        .unwrap()
        .clone();
    // The same rows in another order: same width and scale, other coordinates per token.
    let t = &w[&key];
    let n = t.dim(0).unwrap() as u32;
    let perm: Vec<u32> = (0..n).map(|i| (i * 7919 + 13) % n).collect();
    let shuffled = t
        .index_select(
            &candle_core::Tensor::new(perm, &candle_core::Device::Cpu).unwrap(),
            0,
        )
        .unwrap();
    w.insert(key, shuffled);
    candle_core::safetensors::save(&w, model.join("model.safetensors")).unwrap();
    let run = |methods: &str, out: &str| {
        vec![
            "train-student".to_string(),
            "--shards".into(),
            shards.display().to_string(),
            "--task".into(),
            "sst2".into(),
            "--model".into(),
            model.display().to_string(),
            "--out".into(),
            tmp.join(out).display().to_string(),
            "--max-steps".into(),
            "2".into(),
            "--methods".into(),
            methods.into(),
        ]
    };
    let args = run("original,fgsm", "s-fgsm");
    let e = fail(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(e.contains("is not the teacher's"), "{e}");
    assert!(!tmp.join("s-fgsm").join("model.safetensors").exists());
    let args = run("original,mixup", "s-mixup");
    ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
}

/// The shard files of the smoke pipeline (2 shards), relative to its directory.
const SHARD_FILES: [&str; 4] = [
    "data/train-00000-of-00002.parquet",
    "data/train-00001-of-00002.parquet",
    "data/virtual-00000-of-00002.parquet",
    "data/virtual-00001-of-00002.parquet",
];

/// Runs a Python program in `cwd`; fails the test with its output when it fails.
fn python(code: &str, cwd: &Path) -> String {
    let o = Command::new("python3")
        .arg("-c")
        .arg(code)
        .current_dir(cwd)
        .env("HF_DATASETS_CACHE", cwd.join("../.hf-cache"))
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .expect("python3");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "python failed:\n{code}\n{text}");
    text
}

/// The output loads as a Hugging Face dataset as it is: both configs, `label` a ClassLabel
/// with the task's names (from the card, and from each shard's own metadata), every
/// loading snippet of the card runs, and pandas / polars read `data/`.
fn hugging_face_layout(dir: &Path) {
    let card = std::fs::read_to_string(dir.join("README.md")).unwrap();
    let snippets: Vec<&str> = card
        .split("```python\n")
        .skip(1)
        .map(|b| b.split("```").next().unwrap())
        .collect();
    assert!(!snippets.is_empty(), "the card has loading snippets");
    for code in &snippets {
        python(code, dir);
    }
    let py = r#"
import json, os, datasets, pandas as pd, polars as pl, pyarrow.parquet as pq
from datasets import load_dataset, ClassLabel
m = json.load(open("manifest.json"))
rows = m["method_rows"]
here = os.path.abspath(".")
real = load_dataset(here, split="train")
virt = load_dataset(here, "virtual", split="train")
assert set(datasets.get_dataset_config_names(here)) == {"default", "virtual"}
for d in (real, virt):
    assert isinstance(d.features["label"], ClassLabel), d.features
    assert d.features["label"].names == ["negative", "positive"], d.features["label"]
    assert d.features["teacher_logits"].length == 2, d.features["teacher_logits"]
assert sorted(set(real["method"])) == ["augpro_fgsm", "augpro_mix", "original", "token_replace"]
assert sorted(set(virt["method"])) == ["fgsm", "mixup"]
assert len(real) == sum(v for k, v in rows.items() if k not in ("mixup", "fgsm"))
assert len(virt) == rows["mixup"] + rows["fgsm"]
assert not any(real["virtual"]) and all(virt["virtual"])
labelled = [x for x in real if x["method"] == "original"]
assert all(x["label"] in (0, 1) for x in labelled)
# Read straight from a file, with no card, `label` stays a ClassLabel.
f = load_dataset("parquet", data_files="data/train-00000-of-00002.parquet", split="train")
assert f.features["label"].names == ["negative", "positive"], f.features
meta = json.loads(pq.read_schema("data/virtual-00001-of-00002.parquet").metadata[b"huggingface"])
assert meta["info"]["features"]["label"]["names"] == ["negative", "positive"]
df = pd.read_parquet("data")
assert len(df) == m["rows"] and df["virtual"].sum() == len(virt)
lf = pl.scan_parquet("data/*.parquet")
assert lf.select(pl.len()).collect().item() == m["rows"]
print("hugging face ok")
"#;
    python(py, dir);
}

/// Provenance that travels: the configuration hash ignores where things are written and
/// what the model directories are called; the manifest records the source files' sha256;
/// a manifest of a newer format is refused clearly.
#[test]
fn provenance_does_not_depend_on_local_paths() {
    let tmp = tempfile::tempdir().unwrap();
    let base = augpro::config::PipelineConfig::load_with(
        &common::root().join("pipelines/smoke.toml"),
        &[],
    )
    .unwrap();
    let model_copy = tmp.path().join("elsewhere/minilm");
    copy_dir(&common::model_dir(), &model_copy);
    let mut moved = base.clone();
    moved.output = tmp.path().join("other-out");
    moved.name = "renamed".into();
    moved.teacher.cache_dir = tmp.path().join("other-cache");
    moved.teacher.model = model_copy;
    let hash = augpro::pipeline::config_sha256;
    assert_eq!(hash(&base).unwrap(), hash(&moved).unwrap());
    let mut reseeded = base.clone();
    reseeded.seed += 1;
    assert_ne!(hash(&base).unwrap(), hash(&reseeded).unwrap());

    let e = augpro::shards::manifest::parse_manifest(r#"{"format_version": 99}"#).unwrap_err();
    assert!(
        format!("{e:#}").contains("newer than this augpro reads"),
        "{e:#}"
    );
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dst.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
        }
    }
}

fn verify_detects_damage(good: &Path, tmp: &Path) {
    let shard = SHARD_FILES[1];
    let case = |name: &str, damage: &dyn Fn(&Path), expect: &str| {
        let d = tmp.join(format!("damaged-{name}"));
        copy_dir(good, &d);
        damage(&d);
        let o = augpro(&["verify", d.to_str().unwrap()]);
        let out = String::from_utf8_lossy(&o.stdout).to_string();
        assert!(!o.status.success(), "{name}: verify should fail");
        assert!(
            out.contains(expect),
            "{name}: expected `{expect}` in:\n{out}"
        );
    };
    // The folder where `slurm submit` keeps a local dataset's job scripts and logs is
    // augpro's own, not an unlisted directory.
    let d = tmp.join("with-jobs");
    copy_dir(good, &d);
    std::fs::create_dir(d.join("slurm")).unwrap();
    std::fs::write(d.join("slurm/shard-0-2.out"), "shard 0/4: 96 rows").unwrap();
    let o = augpro(&["verify", d.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    case(
        "truncated",
        &|d| {
            let p = d.join(shard);
            let b = std::fs::read(&p).unwrap();
            std::fs::write(&p, &b[..b.len() / 2]).unwrap();
        },
        "recorded for it",
    );
    case(
        "flipped",
        &|d| {
            let p = d.join(shard);
            let mut b = std::fs::read(&p).unwrap();
            let i = b.len() / 3;
            b[i] ^= 0x40;
            std::fs::write(&p, &b).unwrap();
        },
        "is not the",
    );
    case(
        "missing",
        &|d| std::fs::remove_file(d.join(shard)).unwrap(),
        "missing shard",
    );
    case(
        "extra",
        &|d| std::fs::write(d.join("stray.bin"), b"x").unwrap(),
        "unknown file",
    );
    case(
        "nested",
        &|d| {
            std::fs::create_dir(d.join("data/more")).unwrap();
            std::fs::copy(d.join(shard), d.join("data/more/extra.parquet")).unwrap();
        },
        "data/more: unknown directory not listed in the manifest",
    );
    case(
        "linked",
        &|d| std::os::unix::fs::symlink("/etc/hostname", d.join("data/linked.parquet")).unwrap(),
        "data/linked.parquet: unknown file not listed in the manifest",
    );
    case(
        "lying-manifest",
        &|d| {
            let p = d.join("manifest.json");
            let mut m: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
            let f = &mut m["shards"][1]["files"][0]["rows"];
            *f = (f.as_u64().unwrap() + 5).into();
            std::fs::write(&p, serde_json::to_string_pretty(&m).unwrap()).unwrap();
        },
        "manifest says",
    );
}

#[test]
fn bad_pipeline_files_are_refused_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let base = std::fs::read_to_string(common::root().join("pipelines/smoke.toml")).unwrap();
    let cases: &[(&str, &str, &str)] = &[
        ("unknown-key", "seed = 7", "seed = 7\ncolour = \"red\""),
        ("wrong-type", "seed = 7", "seed = \"seven\""),
        (
            "alpha",
            "alpha = 1.0\nlambda_mode",
            "alpha = 0.0\nlambda_mode",
        ),
        (
            "epsilon",
            "[methods.augpro_fgsm]\nepsilon_nn = 3.92",
            "[methods.augpro_fgsm]\nepsilon_nn = -0.1",
        ),
        (
            "epsilon-rel",
            "[methods.augpro_fgsm]\nepsilon_nn = 3.92",
            "[methods.augpro_fgsm]\nepsilon_rel = 0.2",
        ),
        ("dev", "fraction = 0.1", "fraction = 0.9"),
        ("p", "p = 0.15", "p = 1.5"),
        ("copies", "copies = 1\np", "copies = 0\np"),
        ("shards", "shards = 2", "shards = 0"),
        ("task", "task = \"sst2\"", "task = \"imdb\""),
        ("name", "name = \"smoke\"", "name = \"smoke/tuned\""),
    ];
    let expect = [
        "colour",
        "seed",
        "alpha",
        "ε must be >= 0",
        "use epsilon_nn = epsilon_rel·√hidden (3.92 for 0.2 at hidden size 384)",
        "`dev.fraction` must be in [0, 0.5], got 0.9",
        "`methods.token_replace.p`",
        "copies",
        "`shards`",
        "unknown GLUE task",
        "`name` = \"smoke/tuned\": a run's name is one directory",
    ];
    for ((name, from, to), want) in cases.iter().zip(expect) {
        assert!(base.contains(from), "{name}: fixture text not found");
        let p = tmp.path().join(format!("{name}.toml"));
        std::fs::write(&p, base.replacen(from, to, 1)).unwrap();
        let out = tmp.path().join(format!("out-{name}"));
        let e = fail(&[
            "augment",
            p.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(
            e.contains(want) && e.contains(&format!("{name}.toml")),
            "{name}: {e}"
        );
        assert!(!out.exists(), "{name}: no output written");
    }
    let e = fail(&[
        "augment",
        "pipelines/smoke.toml",
        "--out",
        tmp.path().join("o").to_str().unwrap(),
        "--num-shards",
        "2",
        "--shard-index",
        "2",
    ]);
    assert!(e.contains("--shard-index 2 is out of range"), "{e}");
    let e = fail(&["augment", tmp.path().join("nope.toml").to_str().unwrap()]);
    assert!(e.contains("nope.toml: cannot read pipeline file"), "{e}");
}

#[test]
fn shipped_pipelines_are_valid() {
    for p in ["sst2", "cola", "mrpc", "stsb", "smoke"] {
        let cfg = augpro::config::PipelineConfig::load(
            &common::root().join(format!("pipelines/{p}.toml")),
        )
        .unwrap();
        assert!(
            cfg.methods.augpro_mix.is_some() && cfg.methods.augpro_fgsm.is_some(),
            "{p} enables AugPro"
        );
    }
}

#[test]
fn report_smoke_preset_writes_every_method() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = format!("output={}", tmp.path().join("shards").display());
    let args = [
        "report",
        "--task",
        "sst2",
        "--preset",
        "smoke",
        "--out",
        tmp.path().to_str().unwrap(),
        "--set",
        &shards,
    ];
    let text = ok(&args);
    assert!(text.contains("| augpro_fgsm |"), "{text}");
    let dir = tmp.path().join("sst2");
    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("results.json")).unwrap()).unwrap();
    let rows = r["result"]["rows"].as_array().unwrap();
    let labels: Vec<&str> = rows.iter().map(|m| m["label"].as_str().unwrap()).collect();
    assert_eq!(
        labels,
        [
            "original (plain KD)",
            "token_replace",
            "mixup",
            "fgsm",
            "augpro_mix",
            "augpro_fgsm"
        ]
    );
    for m in rows {
        for split in ["validation", "dev"] {
            let v = m[split]["mean"].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&v), "{m}");
            assert_eq!(m[split]["n"], 2);
        }
        // Every method is paired with plain KD over the same seeds.
        assert_eq!(m["vs_kd"].is_null(), m["method"] == "original", "{m}");
    }
    assert_eq!(
        r["result"]["grid"].as_array().unwrap().len(),
        0,
        "not tuned"
    );
    for f in ["results.md", "forest.png", "curves.png"] {
        let meta = std::fs::metadata(dir.join(f)).unwrap();
        assert!(meta.len() > 200, "{f} is written");
    }
    assert!(!dir.join("bars.png").exists());
    // Each student kept its best dev checkpoint and scored validation once.
    let kd_seed0 = rows[0]["runs"][0].as_str().unwrap();
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join(kd_seed0).join("metrics.json")).unwrap())
            .unwrap();
    let best = m["curve"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["value"].as_f64().unwrap())
        .fold(f64::NEG_INFINITY, f64::max);
    assert_eq!(m["dev"]["accuracy"].as_f64().unwrap(), best, "{m}");
    // A rerun reuses the finished students and gives the same table.
    let again = ok(&args);
    assert_eq!(
        again
            .lines()
            .filter(|l| l.starts_with("student:") && l.contains("reusing"))
            .count(),
        12,
        "{again}"
    );
    let r2: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("results.json")).unwrap()).unwrap();
    assert_eq!(r["result"], r2["result"]);
    // Trained again two side by side (a fresh report directory, the same shards), the
    // students score exactly the same.
    let side = tmp.path().join("side-by-side");
    let mut jobs = args.to_vec();
    jobs[6] = side.to_str().unwrap();
    jobs.extend(["--jobs", "2"]);
    let text = ok(&jobs);
    assert_eq!(
        text.lines()
            .filter(|l| l.starts_with("student:") && l.contains("reusing"))
            .count(),
        0,
        "{text}"
    );
    let r3: serde_json::Value =
        serde_json::from_slice(&std::fs::read(side.join("sst2/results.json")).unwrap()).unwrap();
    let scores = |r: &serde_json::Value| -> Vec<serde_json::Value> {
        let rows = r["result"]["rows"].as_array().unwrap();
        rows.iter()
            .map(|m| serde_json::json!([m["runs"], m["validation"], m["dev"], m["vs_kd"]]))
            .collect()
    };
    assert_eq!(scores(&r), scores(&r3));
    // On another clone: only the runs' records travel (no weights, shards or teacher). The
    // teacher and shards are remade, every run whose key matches is read back, and plain
    // KD's first run, whose weights AugPro-FGSM would read, is trained again to the same
    // scores.
    let clone = tmp.path().join("clone");
    let copied = copy_run_records(&dir.join("students"), &clone.join("sst2/students"));
    assert_eq!(copied, 12);
    let mut elsewhere = args.to_vec();
    elsewhere[6] = clone.to_str().unwrap();
    let shards2 = format!("output={}", tmp.path().join("shards2").display());
    let teachers2 = format!(
        "teacher.cache_dir={}",
        tmp.path().join("teachers2").display()
    );
    elsewhere[8] = &shards2;
    elsewhere.extend(["--set", &teachers2]);
    let text = ok(&elsewhere);
    assert!(text.contains("training teacher"), "{text}");
    let reused = text
        .lines()
        .filter(|l| l.starts_with("student:") && l.contains("reusing"))
        .count();
    assert_eq!(reused, 11, "{text}");
    let r4: serde_json::Value =
        serde_json::from_slice(&std::fs::read(clone.join("sst2/results.json")).unwrap()).unwrap();
    assert_eq!(scores(&r), scores(&r4));
}

/// Copies every `report-run.json` under `from` to the same place under `to`; how many.
fn copy_run_records(from: &Path, to: &Path) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let (src, dst) = (e.path(), to.join(e.file_name()));
        if e.file_type().unwrap().is_dir() {
            n += copy_run_records(&src, &dst);
        } else if e.file_name() == "report-run.json" {
            std::fs::create_dir_all(to).unwrap();
            std::fs::copy(&src, &dst).unwrap();
            n += 1;
        }
    }
    n
}

#[test]
fn report_tunes_on_dev_and_writes_a_glue_table() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = format!("output={}", tmp.path().join("shards").display());
    let text = ok(&[
        "report",
        "--tasks",
        "sst2,mrpc",
        "--preset",
        "smoke",
        "--tune",
        "--methods",
        "token_replace",
        "--seeds",
        "2",
        "--layers",
        "mrpc=2",
        "--out",
        tmp.path().to_str().unwrap(),
        "--set",
        &shards,
    ]);
    assert!(text.contains("# GLUE student comparison"), "{text}");
    assert!(text.contains("mrpc: teacher acc_and_f1"), "{text}");
    let glue = std::fs::read_to_string(tmp.path().join("glue-token_replace/results.md")).unwrap();
    assert!(
        glue.contains("| sst2 (accuracy) | mrpc (acc_and_f1) | Avg |"),
        "{glue}"
    );
    assert!(glue.contains("| token_replace |"), "{glue}");
    for task in ["sst2", "mrpc"] {
        let r: serde_json::Value = serde_json::from_slice(
            &std::fs::read(
                tmp.path()
                    .join(format!("{task}-token_replace/results.json")),
            )
            .unwrap(),
        )
        .unwrap();
        // The declared grid was run, and the point chosen is the best on dev.
        let grid = r["result"]["grid"].as_array().unwrap();
        assert_eq!(grid.len(), 3, "{task}");
        let best = grid
            .iter()
            .map(|g| g["dev"].as_f64().unwrap())
            .fold(f64::NEG_INFINITY, f64::max);
        let chosen: Vec<&serde_json::Value> = grid.iter().filter(|g| g["chosen"] == true).collect();
        assert_eq!(chosen.len(), 1, "{task}");
        assert_eq!(chosen[0]["dev"].as_f64().unwrap(), best, "{task}");
        let row = &r["result"]["rows"][1];
        assert_eq!(row["setting"], chosen[0]["setting"], "{task}");
        assert_eq!(row["validation"]["n"], 2);
        assert!(r["result"]["dev_examples"].as_u64().unwrap() > 0);
        // The per-task student depth reaches every student of that task.
        let layers = if task == "mrpc" { 2 } else { 3 };
        assert_eq!(r["result"]["layers"], layers, "{task}");
        let dir = tmp.path().join(format!("{task}-token_replace"));
        let kd_seed1 = r["result"]["rows"][0]["runs"][1].as_str().unwrap();
        let cfg: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join(kd_seed1).join("config.json")).unwrap())
                .unwrap();
        assert_eq!(cfg["num_hidden_layers"], layers, "{task}");
        final_runs_are_trained_for_the_final_rows(&dir, &r);
        let md = std::fs::read_to_string(dir.join("results.md")).unwrap();
        assert!(md.contains("| p | p (Holm) |"), "{md}");
        assert!(std::fs::metadata(dir.join("forest.png")).unwrap().len() > 200);
    }
    collecting_the_tasks_gives_the_same_table(tmp.path(), &shards);
}

/// `--collect` rebuilds the GLUE table of the tuned sst2 and mrpc reports under `out` from
/// their `results.json`, training nothing: the same columns and the same figures, with
/// each task's command. A task without results, or results of another preset, stop it
/// with one line naming the file, and the table is left as it was.
fn collecting_the_tasks_gives_the_same_table(out: &Path, shards: &str) {
    let glue = out.join("glue-token_replace");
    let read = |f: &str| std::fs::read_to_string(glue.join(f)).unwrap();
    let (trained_md, trained_json) = (read("results.md"), read("results.json"));
    let (o, preset) = (out.to_str().unwrap(), "smoke");
    let args = |tasks: &'static str, preset: &'static str| {
        let mut a = vec!["report", "--tasks", tasks, "--preset", preset, "--tune"];
        a.extend(["--methods", "token_replace", "--out", o, "--set", shards]);
        a.push("--collect");
        a
    };
    let line = fail(&args("sst2,stsb", preset));
    assert!(
        line.contains("stsb-token_replace/results.json: cannot read"),
        "{line}"
    );
    let line = fail(&args("sst2,mrpc", "low"));
    assert!(
        line.contains("sst2-token_replace/results.json: preset `smoke`, expected `low`"),
        "{line}"
    );
    assert_eq!(
        read("results.md"),
        trained_md,
        "a failed collection writes nothing"
    );
    let text = ok(&args("sst2,mrpc", preset));
    assert!(!text.contains("student:"), "nothing is trained:\n{text}");
    let collected_md = read("results.md");
    assert!(collected_md.contains("--collect`"), "{collected_md}");
    let made_by = "- sst2: `augpro report --tasks sst2,mrpc --preset smoke --tune --seeds 2";
    assert!(collected_md.contains(made_by), "{collected_md}");
    let table = |md: &str| md[md.find("| method |").unwrap()..].to_string();
    assert_eq!(table(&collected_md), table(&trained_md));
    let tasks =
        |json: &str| serde_json::from_str::<serde_json::Value>(json).unwrap()["tasks"].clone();
    assert_eq!(tasks(&read("results.json")), tasks(&trained_json));
}

/// The seed a finished student run recorded.
fn run_seed(task_dir: &Path, run: &str) -> u64 {
    let done: serde_json::Value =
        serde_json::from_slice(&std::fs::read(task_dir.join(run).join("report-run.json")).unwrap())
            .unwrap();
    done["run"]["seed"].as_u64().unwrap()
}

/// No final value comes from a tuning run: every final row's runs are final runs (their own
/// directories, seeds 0..seeds) trained by this command, and the tuning runs have seeds
/// from 1000 in other directories.
fn final_runs_are_trained_for_the_final_rows(task_dir: &Path, r: &serde_json::Value) {
    let seeds = r["result"]["seeds"].as_u64().unwrap();
    let tune_seeds = r["result"]["tune_seeds"].as_u64().unwrap();
    let log = r["runs"].as_array().unwrap();
    let mut tuning = Vec::new();
    for g in r["result"]["grid"].as_array().unwrap() {
        let runs = g["runs"].as_array().unwrap();
        assert_eq!(runs.len() as u64, tune_seeds, "{g}");
        for run in runs.iter().map(|x| x.as_str().unwrap()) {
            assert!(run.starts_with("students/tune/"), "{run}");
            assert!(
                (1000..1000 + tune_seeds).contains(&run_seed(task_dir, run)),
                "{run}"
            );
            tuning.push(run.to_string());
        }
    }
    assert!(!tuning.is_empty());
    for row in r["result"]["rows"].as_array().unwrap() {
        let runs: Vec<&str> = row["runs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_str().unwrap())
            .collect();
        assert_eq!(runs.len() as u64, seeds, "{row}");
        for (i, run) in runs.iter().enumerate() {
            assert!(run.starts_with("students/final/"), "{run}");
            assert!(!tuning.iter().any(|t| t == run), "{run} is a tuning run");
            assert_eq!(run_seed(task_dir, run), i as u64, "{run}");
            let entry = log
                .iter()
                .find(|e| e["dir"] == *run)
                .unwrap_or_else(|| panic!("{run} not in the run log"));
            assert_eq!(entry["role"], "final", "{entry}");
            assert_eq!(entry["status"], "trained", "{entry}");
        }
    }
    // Scored students keep their metrics, not their weights: only plain KD's first final
    // run (AugPro-FGSM's first-round student) keeps them.
    for e in log {
        let first_round = e["role"] == "final" && e["method"] == "original" && e["seed"] == 0;
        let weights = task_dir
            .join(e["dir"].as_str().unwrap())
            .join("model.safetensors");
        assert_eq!(weights.is_file(), first_round, "{e}");
    }
    for e in log {
        let tune = e["role"] == "tune";
        assert_eq!(tune, e["seed"].as_u64().unwrap() >= 1000, "{e}");
        assert_eq!(
            tune,
            e["dir"].as_str().unwrap().starts_with("students/tune/"),
            "{e}"
        );
    }
}

#[test]
fn report_refuses_a_task_the_low_preset_has_not_sized() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().to_str().unwrap();
    let line = fail(&["report", "--tasks", "sst2,rte", "--tune", "--out", out]);
    for want in [
        "rte",
        "--layers rte=",
        "--steps rte=",
        "--lr rte=",
        "scripts/size-student.sh",
    ] {
        assert!(line.contains(want), "{line}");
    }
    // Stopped before any run: nothing was written.
    assert!(std::fs::read_dir(tmp.path()).unwrap().next().is_none());
}

#[test]
fn report_scaling_sizes_the_student_on_dev_at_every_size() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().to_str().unwrap();
    // Without tuning there is no chosen setting to scale: one line, nothing written.
    let line = fail(&["report", "--scaling", "48,96", "--out", out]);
    assert!(line.contains("--tune"), "{line}");
    assert!(std::fs::read_dir(tmp.path()).unwrap().next().is_none());
    let shards = format!("output={}", tmp.path().join("shards").display());
    let text = ok(&[
        "report",
        "--tasks",
        "sst2",
        "--preset",
        "smoke",
        "--tune",
        "--methods",
        "token_replace,augpro_mix",
        "--seeds",
        "2",
        "--scaling",
        "48,96",
        "--out",
        out,
        "--set",
        &shards,
    ]);
    assert!(text.contains("# How much data AugPro saves"), "{text}");
    let dir = tmp.path().join("scaling-token_replace+augpro_mix");
    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("results.json")).unwrap()).unwrap();
    assert!(
        r["command"].as_str().unwrap().contains("--scaling 48,96"),
        "{r}"
    );
    let task = &r["tasks"][0];
    let task_dir = tmp.path().join("sst2-token_replace+augpro_mix");
    let points = task["points"].as_array().unwrap();
    assert_eq!(points.len(), 2);
    for (p, n) in points.iter().zip([48, 96]) {
        assert_eq!(p["source_examples"], n, "{p}");
        // The step count is plain KD's dev-best among the ones tried (tuning runs): the
        // grid's three, and a doubling of the longest when it won by at least a point.
        let sizing = p["sizing"].as_array().unwrap();
        let steps: Vec<u64> = sizing
            .iter()
            .map(|s| s["steps"].as_u64().unwrap())
            .collect();
        let dev = |i: usize| sizing[i]["dev"].as_f64().unwrap();
        assert!(steps.len() == 3 || steps.len() == 4, "{p}");
        assert!(steps.windows(2).all(|w| w[0] < w[1]), "{p}");
        if steps.len() == 4 {
            assert_eq!(steps[3], 2 * steps[2], "{p}");
            assert!(dev(2) > dev(0) && dev(2) - dev(1) >= 0.01, "{p}");
        }
        let best = sizing
            .iter()
            .map(|s| s["dev"].as_f64().unwrap())
            .fold(f64::NEG_INFINITY, f64::max);
        let chosen: Vec<&serde_json::Value> =
            sizing.iter().filter(|s| s["chosen"] == true).collect();
        assert_eq!(chosen.len(), 1, "{p}");
        assert_eq!(chosen[0]["dev"].as_f64().unwrap(), best, "{p}");
        assert_eq!(chosen[0]["steps"], p["steps"], "{p}");
        for run in sizing.iter().flat_map(|s| s["runs"].as_array().unwrap()) {
            let run = run.as_str().unwrap();
            assert!(run.starts_with("students/tune/"), "{run}");
            assert!(run_seed(&task_dir, run) >= 1000, "{run}");
        }
        let rows = p["rows"].as_array().unwrap();
        let labels: Vec<&str> = rows.iter().map(|m| m["label"].as_str().unwrap()).collect();
        assert_eq!(
            labels,
            ["original (plain KD)", "token_replace", "augpro_mix"]
        );
        // Every method trains at the sized step count over the final seeds.
        for row in rows {
            let runs = row["runs"].as_array().unwrap();
            assert_eq!(runs.len(), 2, "{row}");
            for (i, run) in runs.iter().enumerate() {
                let run = run.as_str().unwrap();
                assert!(run.starts_with("students/final/"), "{run}");
                assert_eq!(run_seed(&task_dir, run), i as u64, "{run}");
                let done: serde_json::Value = serde_json::from_slice(
                    &std::fs::read(task_dir.join(run).join("report-run.json")).unwrap(),
                )
                .unwrap();
                assert_eq!(done["key"]["student"]["max_steps"], p["steps"], "{done}");
            }
            assert_eq!(row["vs_kd"].is_null(), row["method"] == "original", "{row}");
        }
    }
    assert_eq!(task["worth"].as_array().unwrap().len(), 4, "{task}");
    assert!(std::fs::metadata(dir.join("sst2.png")).unwrap().len() > 200);
}

#[test]
fn augpro_fgsm_with_a_student_checkpoint() {
    // The gradient of KL(teacher ‖ student) is taken in the student's embedding space and
    // projected there; the base encoder (fresh head) stands in for a student.
    let tmp = tempfile::tempdir().unwrap();
    let base = std::fs::read_to_string(common::root().join("pipelines/smoke.toml")).unwrap();
    let methods_at = base.find("[methods.augpro_mix]").unwrap();
    let text = base[..methods_at]
        .replace("max_examples = 64", "max_examples = 16")
        .replace("shards = 2", "shards = 1")
        + "[methods.augpro_fgsm]\nepsilon_nn = 5.9\nstudent = \"data/models/minilm-l6\"\n";
    let p = tmp.path().join("student-fgsm.toml");
    std::fs::write(&p, text).unwrap();
    let out = tmp.path().join("o");
    ok(&[
        "augment",
        p.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    let rows = read_rows(&out.join("sst2/smoke"));
    let fg: Vec<&Row> = rows.iter().filter(|r| r.method == "augpro_fgsm").collect();
    assert_eq!(fg.len(), 16);
    assert!(
        fg.iter().map(|r| r.changed_tokens.unwrap()).sum::<u32>() > 0,
        "the student-space perturbation changes tokens"
    );

    let bad = tmp.path().join("bad-student.toml");
    std::fs::write(
        &bad,
        std::fs::read_to_string(&p)
            .unwrap()
            .replace("data/models/minilm-l6\"\n", "/nonexistent/student\"\n"),
    )
    .unwrap();
    let e = fail(&[
        "augment",
        bad.to_str().unwrap(),
        "--out",
        tmp.path().join("o2").to_str().unwrap(),
    ]);
    assert!(e.contains("/nonexistent/student"), "{e}");
}

#[test]
fn unusable_outputs_and_models_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    // Output below a regular file cannot be created.
    let file = tmp.path().join("plain-file");
    std::fs::write(&file, b"x").unwrap();
    let e = fail(&[
        "augment",
        "pipelines/smoke.toml",
        "--out",
        file.join("sub").to_str().unwrap(),
    ]);
    assert!(e.contains("cannot create output directory"), "{e}");
    // A student whose vocabulary differs from the teacher's.
    let student = tmp.path().join("student");
    std::fs::create_dir_all(&student).unwrap();
    for f in ["model.safetensors", "tokenizer.json"] {
        std::fs::copy(common::model_dir().join(f), student.join(f)).unwrap();
    }
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(common::model_dir().join("config.json")).unwrap())
            .unwrap();
    cfg["vocab_size"] = 30000.into();
    std::fs::write(student.join("config.json"), cfg.to_string()).unwrap();
    let out = tmp.path().join("shards");
    ok(&[
        "augment",
        "pipelines/smoke.toml",
        "--out",
        out.to_str().unwrap(),
    ]);
    let train_with = |model: &Path| {
        fail(&[
            "train-student",
            "--shards",
            out.join("sst2/smoke").to_str().unwrap(),
            "--task",
            "sst2",
            "--out",
            tmp.path().join("s").to_str().unwrap(),
            "--model",
            model.to_str().unwrap(),
        ])
    };
    let e = train_with(&student);
    assert!(e.contains("must share the teacher's vocabulary"), "{e}");
    // Same vocabulary size, another tokenizer (cased): refused by the manifest's sha256.
    let cased = tmp.path().join("cased");
    copy_dir(&common::model_dir(), &cased);
    let mut tj: serde_json::Value =
        serde_json::from_slice(&std::fs::read(cased.join("tokenizer.json")).unwrap()).unwrap();
    tj["normalizer"]["lowercase"] = false.into();
    std::fs::write(cased.join("tokenizer.json"), tj.to_string()).unwrap();
    let e = train_with(&cased);
    assert!(
        e.contains("not the tokenizer the shards were made with"),
        "{e}"
    );
    // A tokenizer that does not fit the model's embedding table.
    let e = fail(&[
        "teacher",
        "train",
        "--task",
        "sst2",
        "--model",
        student.to_str().unwrap(),
        "--out",
        tmp.path().join("t").to_str().unwrap(),
        "--max-steps",
        "1",
    ]);
    assert!(e.contains("tokenizer and model do not match"), "{e}");
}

#[test]
fn pair_and_regression_tasks_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let base = std::fs::read_to_string(common::root().join("pipelines/smoke.toml")).unwrap();
    for (task, metric) in [("mrpc", "f1"), ("stsb", "pearson")] {
        let text = base
            .replace("task = \"sst2\"", &format!("task = \"{task}\""))
            .replace("max_examples = 64", "max_examples = 24")
            .replace("max_train_examples = 320", "max_train_examples = 64")
            .replace("max_seq_len = 64", "max_seq_len = 128");
        let p = tmp.path().join(format!("{task}.toml"));
        std::fs::write(&p, text).unwrap();
        let root = tmp.path().join("out");
        let cache = tmp.path().join(format!("teachers-{task}"));
        ok(&[
            "augment",
            p.to_str().unwrap(),
            "--out",
            root.to_str().unwrap(),
            "--set",
            &format!("teacher.cache_dir={}", cache.display()),
        ]);
        // The teacher's metrics score the dev split it was not trained on, beside validation.
        let tdir = std::fs::read_dir(&cache)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.join("metrics.json").is_file())
            .unwrap();
        let tm: serde_json::Value =
            serde_json::from_slice(&std::fs::read(tdir.join("metrics.json")).unwrap()).unwrap();
        assert!(tm["dev"][metric].as_f64().unwrap().is_finite(), "{tm}");
        assert!(tm["validation"]["validation"][metric].is_number(), "{tm}");
        let dir = root.join(task).join("smoke");
        ok(&["verify", dir.to_str().unwrap()]);
        let schema = ShardSchema::new(augpro::task::glue(task).unwrap());
        let (_, paths) = augpro::shards::manifest::shard_paths(&dir.as_path().into()).unwrap();
        let mut r = ShardReader::open(&paths[0], &schema).unwrap();
        let rows = r.next_rows(&schema).unwrap().unwrap();
        for row in &rows {
            assert_eq!(row.texts.len(), 2, "{task}: both sentences written");
            assert!(
                row.token_type_ids.contains(&1),
                "{task}: second segment kept"
            );
            assert_eq!(row.teacher_logits.len(), if task == "stsb" { 1 } else { 2 });
        }
        let s = tmp.path().join(format!("student-{task}"));
        let text = ok(&[
            "train-student",
            "--shards",
            dir.to_str().unwrap(),
            "--task",
            task,
            "--out",
            s.to_str().unwrap(),
            "--max-steps",
            "2",
        ]);
        assert!(text.contains(metric), "{text}");
    }
}

#[test]
fn slurm_dry_run_and_pipeline_overrides() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("o");
    let cache = format!("teacher.cache_dir={}", tmp.path().join("t").display());
    let dry_run = |extra: &[&str]| {
        let mut args = vec!["slurm", "submit", "pipelines/smoke.toml", "--shards", "3"];
        args.extend([
            "--out",
            root.to_str().unwrap(),
            "--set",
            &cache,
            "--dry-run",
        ]);
        args.extend(extra);
        ok(&args)
    };
    let text = dry_run(&["--partition", "gpu", "--cpus-per-task", "4"]);
    // No teacher yet in the fresh cache: three stages, chained with afterok.
    assert!(
        text.contains("# teacher: sbatch --parsable") && text.contains("--teacher-only"),
        "{text}"
    );
    assert!(
        text.contains(
            "--array=0-2 --dependency=afterok:<teacher job id> --kill-on-invalid-dep=yes"
        ),
        "{text}"
    );
    assert!(
        text.contains("--shard-index \"$SLURM_ARRAY_TASK_ID\"") && text.contains("--num-shards 3"),
        "{text}"
    );
    assert!(
        text.contains("#SBATCH --partition=gpu") && text.contains("#SBATCH --cpus-per-task=4"),
        "{text}"
    );
    assert!(
        text.contains("--finalize") && text.contains(" verify "),
        "{text}"
    );
    assert!(!root.exists(), "a dry run writes nothing");
    assert!(!text.contains("--portable"), "{text}");
    // `--portable` reaches the teacher, every shard and finalize.
    let portable = dry_run(&["--portable"]);
    assert_eq!(
        portable.matches("--device cpu --portable ").count(),
        3,
        "{portable}"
    );

    // A Kubernetes Indexed Job gives the shard in JOB_COMPLETION_INDEX.
    let k8s = tmp.path().join("k8s");
    let o = common::augpro_cmd(&[
        "augment",
        "pipelines/smoke.toml",
        "--num-shards",
        "2",
        "--out",
        k8s.to_str().unwrap(),
    ])
    .env("JOB_COMPLETION_INDEX", "1")
    .output()
    .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let names = files(&k8s.join("sst2/smoke/data"));
    assert!(
        names
            == [
                "train-00001-of-00002.parquet",
                "virtual-00001-of-00002.parquet"
            ]
            && !k8s.join("sst2/smoke/manifest.json").exists(),
        "{names:?}"
    );

    let e = fail(&[
        "slurm",
        "submit",
        "pipelines/smoke.toml",
        "--shards",
        "0",
        "--dry-run",
    ]);
    assert!(e.contains("--shards must be at least 1"), "{e}");
    let e = fail(&[
        "augment",
        "pipelines/smoke.toml",
        "--set",
        "methods.augpro_mix.alpha=-1",
    ]);
    assert!(e.contains("alpha"), "{e}");
    let e = fail(&["augment", "pipelines/smoke.toml", "--set", "nonsense=1"]);
    assert!(e.contains("nonsense"), "{e}");
    let e = fail(&["augment", "pipelines/smoke.toml", "--set", "novalue"]);
    assert!(e.contains("expected key=value"), "{e}");

    // Texts longer than max_seq_len are truncated, not refused, and counted.
    let out = tmp.path().join("short");
    let text = ok(&[
        "augment",
        "pipelines/smoke.toml",
        "--out",
        out.to_str().unwrap(),
        "--set",
        "max_seq_len=8",
        "--set",
        "max_examples=8",
        "--set",
        "shards=1",
        "--set",
        "methods={}",
    ]);
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("sst2/smoke/manifest.json")).unwrap())
            .unwrap();
    let n = m["truncated_examples"].as_u64().unwrap();
    assert!(
        n > 0
            && text.contains(&format!(
                "{n} of 8 source examples were longer than max_seq_len = 8 tokens and truncated"
            )),
        "{text}"
    );
    assert!(read_rows(&out.join("sst2/smoke"))
        .iter()
        .all(|r| r.input_ids.len() <= 8));
}
