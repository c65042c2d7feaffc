//! Datasets described by the pipeline file instead of named by a GLUE config, made here from
//! the GLUE files: a CSV export with renamed columns and string labels (from SST-2) and a
//! JSON-lines regression set (from STS-B). Each runs augment, verify, inspect,
//! train-student (and the CSV a smoke report) with the base encoder at small sizes; bad
//! descriptions stop with one clear line and write nothing.

mod common;

use augpro::data::SplitReader;
use common::{fail, glue_examples, ok, shard_rows, write_reviews};
use std::path::{Path, PathBuf};

/// STS-B as JSON lines: `{"first", "second", "score"}`.
fn write_similarity(path: &Path, split: &str, n: usize) {
    let text: String = glue_examples("stsb", split, n)
        .iter()
        .map(|e| {
            let v = serde_json::json!({"first": e.text_a, "second": e.text_b, "score": e.label});
            format!("{v}\n")
        })
        .collect();
    std::fs::write(path, text).unwrap();
}

/// The smoke pipeline at a smaller size for task `task`, writing under `tmp`, with the
/// `[data]` section `data`.
fn pipeline(tmp: &Path, task: &str, data: &str) -> PathBuf {
    let base = std::fs::read_to_string(common::root().join("pipelines/smoke.toml")).unwrap();
    let text = base
        .replace("task = \"sst2\"", &format!("task = \"{task}\""))
        .replace("max_examples = 64", "max_examples = 24")
        .replace("max_train_examples = 320", "max_train_examples = 96")
        .replace(
            "output = \"out\"",
            &format!("output = {:?}", tmp.join("out").display().to_string()),
        )
        .replace(
            "cache_dir = \"runs/teachers\"",
            &format!(
                "cache_dir = {:?}",
                tmp.join("teachers").display().to_string()
            ),
        );
    let p = tmp.join(format!("{task}.toml"));
    std::fs::write(&p, format!("{text}\n[data]\n{data}")).unwrap();
    p
}

fn manifest(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap()
}

#[test]
fn csv_with_string_labels_runs_every_stage() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("reviews");
    std::fs::create_dir_all(&data).unwrap();
    let train = write_reviews(&data.join("train.csv"), "train", 300);
    write_reviews(&data.join("validation.csv"), "validation", 100);
    let p = pipeline(
        tmp.path(),
        "reviews",
        &format!(
            "source = {:?}\nsplits = {{ train = \"train*.csv\", validation = \"validation*.csv\" }}\n\
             text = [\"review\"]\nlabel = \"sentiment\"\n",
            data.display().to_string()
        ),
    );
    let p = p.to_str().unwrap();
    ok(&["augment", p]);
    let dir = tmp.path().join("out/reviews/smoke");
    let d = dir.to_str().unwrap();
    assert!(ok(&["verify", d]).contains(": ok"));
    let m = manifest(&dir);
    assert_eq!(m["task"], "reviews");
    assert_eq!(
        m["label_names"],
        serde_json::json!(["negative", "positive"])
    );
    assert_eq!(m["source"]["format"], "csv");
    assert_eq!(m["num_labels"], 2);

    // The shards keep the dataset's own column and class names; an original row's label
    // is the class of its source row's word (rows are numbered from 0).
    let (schema, rows) = shard_rows(&dir);
    assert_eq!(schema.text_columns, ["review"]);
    assert_eq!(schema.label_names, ["negative", "positive"]);
    let originals: Vec<_> = rows.iter().filter(|r| r.method == "original").collect();
    assert_eq!(originals.len(), 24, "max_examples source rows");
    for r in originals {
        let src = &train[r.idx as usize];
        assert_eq!(r.label, src.label, "row {}", r.idx);
        // The text column holds the display decode of the row's tokens (lower-cased,
        // accents stripped, spaced anew): compare its first word.
        let first = |t: &str| t.split_whitespace().next().unwrap_or("").to_lowercase();
        assert_eq!(first(&r.texts[0]), first(&src.text_a), "row {}", r.idx);
    }
    let card = std::fs::read_to_string(dir.join("README.md")).unwrap();
    assert!(card.contains("negative, positive"), "{card}");
    assert!(ok(&["inspect", d]).contains("reviews"));

    let student = tmp.path().join("student");
    let s = student.to_str().unwrap();
    let args = [
        "train-student",
        "--shards",
        d,
        "--task",
        "reviews",
        "--out",
        s,
    ];
    // The reader names its own copy of the data; the location in the manifest is the
    // writer's and is never read.
    let line = fail(&args);
    assert!(
        line.contains("give --data-source") && line.contains("config.data.source"),
        "{line}"
    );
    let copy = tmp.path().join("reviews-copy");
    std::fs::create_dir_all(&copy).unwrap();
    for f in ["train.csv", "validation.csv"] {
        std::fs::copy(data.join(f), copy.join(f)).unwrap();
    }
    let from_copy = ["--data-source", copy.to_str().unwrap()];
    let text = ok(&[
        &args[..],
        &from_copy,
        &["--max-steps", "2", "--layers", "2"],
    ]
    .concat());
    assert!(text.contains("accuracy"), "{text}");
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(student.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["id2label"]["1"], "positive", "{cfg}");
    let line = fail(&["train-student", "--shards", d, "--task", "sst2", "--out", s]);
    assert!(line.contains("shards are for task `reviews`"), "{line}");
    // A copy whose train file differs from the one the shards were made from.
    std::fs::copy(data.join("validation.csv"), copy.join("train.csv")).unwrap();
    let line = fail(&[&args[..], &from_copy].concat());
    assert!(
        line.contains("train.csv") && line.contains("sha256"),
        "{line}"
    );

    let report = tmp.path().join("report");
    let text = ok(&[
        "report",
        "--tasks",
        "reviews",
        "--preset",
        "smoke",
        "--pipeline",
        p,
        "--methods",
        "augpro_mix",
        "--seeds",
        "1",
        "--steps",
        "3",
        "--out",
        report.to_str().unwrap(),
    ]);
    assert!(text.contains("| augpro_mix |"), "{text}");
    assert!(report.join("reviews-augpro_mix/results.md").is_file());
}

#[test]
fn jsonl_regression_set_runs_every_stage() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("similarity");
    std::fs::create_dir_all(data.join("splits")).unwrap();
    write_similarity(&data.join("splits/train.jsonl"), "train", 300);
    write_similarity(&data.join("splits/dev.jsonl"), "validation", 100);
    let p = pipeline(
        tmp.path(),
        "similarity",
        &format!(
            "source = {:?}\nsplits = {{ train = \"splits/train.jsonl\", dev = \"splits/dev.jsonl\" }}\n\
             text = [\"first\", \"second\"]\nlabel = \"score\"\nkind = \"regression\"\nmetric = \"spearman\"\n",
            data.display().to_string()
        ),
    );
    ok(&["augment", p.to_str().unwrap()]);
    let dir = tmp.path().join("out/similarity/smoke");
    let d = dir.to_str().unwrap();
    ok(&["verify", d]);
    let m = manifest(&dir);
    assert_eq!(m["num_labels"], 1);
    assert!(m.get("label_names").is_none(), "{m}");
    assert_eq!(m["source"]["format"], "jsonl");
    let (schema, rows) = shard_rows(&dir);
    assert_eq!(schema.text_columns, ["first", "second"]);
    assert!(rows
        .iter()
        .all(|r| r.texts.len() == 2 && r.teacher_logits.len() == 1));
    ok(&["inspect", d]);
    let s = tmp.path().join("student");
    let text = ok(&[
        "train-student",
        "--shards",
        d,
        "--task",
        "similarity",
        "--data-source",
        data.to_str().unwrap(),
        "--out",
        s.to_str().unwrap(),
        "--max-steps",
        "2",
        "--layers",
        "2",
    ]);
    assert!(text.contains("spearman"), "{text}");
}

/// A CSV dataset under `tmp` with these train and validation files, and its pipeline.
fn csv_case(tmp: &Path, train: &str, validation: &str, data: &str) -> PathBuf {
    let dir = tmp.join("case");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("train.csv"), train).unwrap();
    std::fs::write(dir.join("validation.csv"), validation).unwrap();
    let source = format!("source = {:?}\n", dir.display().to_string());
    pipeline(tmp, "case", &format!("{source}{data}"))
}

/// Runs `augment` on a bad description: one error line, and no output or teacher written.
fn refused(p: &Path) -> String {
    let line = fail(&["augment", p.to_str().unwrap()]);
    let root = p.parent().unwrap();
    assert!(!root.join("out").exists() && !root.join("teachers").exists());
    line
}

#[test]
fn data_and_teacher_commands_take_a_described_dataset() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("reviews");
    std::fs::create_dir_all(&data).unwrap();
    write_reviews(&data.join("train.csv"), "train", 120);
    let val = write_reviews(&data.join("validation.csv"), "validation", 40);
    let p = pipeline(
        tmp.path(),
        "reviews",
        &format!(
            "source = {:?}\nsplits = {{ train = \"train.csv\", validation = \"validation.csv\" }}\n\
             text = [\"review\"]\nlabel = \"sentiment\"\n",
            data.display().to_string()
        ),
    );
    let p = p.to_str().unwrap();
    let shown = ok(&["data", "show", "--pipeline", p, "-n", "2"]);
    assert!(shown.contains("reviews / validation: 40 rows"), "{shown}");
    assert!(shown.contains(&val[0].text_a), "{shown}");
    let teacher = tmp.path().join("teacher");
    let t = teacher.to_str().unwrap();
    let trained = ok(&[
        "teacher",
        "train",
        "--pipeline",
        p,
        "--out",
        t,
        "--max-steps",
        "2",
        "--max-train-examples",
        "64",
    ]);
    assert!(trained.contains("accuracy"), "{trained}");
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(teacher.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["id2label"]["0"], "negative", "{cfg}");
    let eval = ok(&["teacher", "eval", "--pipeline", p, "--teacher", t]);
    assert!(eval.contains("accuracy"), "{eval}");
    // A GLUE name that is not the pipeline's task, or neither flag: one line.
    let line = fail(&["data", "show", "--task", "sst2", "--pipeline", p]);
    assert!(line.contains("a pipeline for task `reviews`"), "{line}");
    let line = fail(&["data", "show"]);
    assert!(
        line.contains("--task") && line.contains("--pipeline"),
        "{line}"
    );
}

#[test]
fn bad_descriptions_are_refused_with_one_line() {
    let good = "text,label\na fine film,pos\na dull film,neg\n";
    let splits = "splits = { train = \"train.csv\", validation = \"validation.csv\" }\n";
    let with = |tmp: &Path, train: &str, val: &str, extra: &str| {
        csv_case(tmp, train, val, &format!("{splits}{extra}"))
    };
    let cases: Vec<(&str, &str, &str, &str)> = vec![
        // A text column the files lack.
        (
            good,
            good,
            "text = [\"review\"]\n",
            "missing column `review`",
        ),
        // A validation label train does not have.
        (
            good,
            "text,label\nso-so,neutral\n",
            "text = [\"text\"]\n",
            "\"neutral\", not one of the labels of `case`'s train split (neg, pos)",
        ),
        // An empty split.
        (
            good,
            "text,label\n",
            "text = [\"text\"]\n",
            "split is empty",
        ),
        // Class ids and no names for them.
        (
            "text,label\na,0\nb,1\n",
            "text,label\nc,1\n",
            "text = [\"text\"]\n",
            "list the class names in `data.labels",
        ),
        // A metric that does not score the kind of task.
        (
            good,
            good,
            "text = [\"text\"]\nmetric = \"pearson\"\n",
            "does not score a classification task",
        ),
    ];
    for (train, val, extra, want) in cases {
        let tmp = tempfile::tempdir().unwrap();
        let line = refused(&with(tmp.path(), train, val, extra));
        assert!(line.contains(want), "{want}: {line}");
    }
    // A text column that is not text (JSON numbers).
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("case");
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["train.jsonl", "validation.jsonl"] {
        std::fs::write(dir.join(f), "{\"text\": 12, \"label\": \"a\"}\n").unwrap();
    }
    let p = pipeline(
        tmp.path(),
        "case",
        &format!(
            "source = {:?}\nsplits = {{ train = \"train.jsonl\", validation = \"validation.jsonl\" }}\ntext = [\"text\"]\n",
            dir.display().to_string()
        ),
    );
    let line = refused(&p);
    assert!(
        line.contains("train.jsonl: column `text` has type Int64, expected string"),
        "{line}"
    );
}

/// The pipeline file under README's "## Your own data" is a valid pipeline.
#[test]
fn readme_pipeline_file_is_valid() {
    let readme = std::fs::read_to_string(common::root().join("README.md")).unwrap();
    let section = readme
        .split("\n## Your own data\n")
        .nth(1)
        .expect("README.md: no \"## Your own data\" section");
    let toml = section
        .split("```toml\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("README.md: no ```toml block under \"## Your own data\"");
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("reviews.toml");
    std::fs::write(&p, toml).unwrap();
    let cfg = augpro::config::PipelineConfig::load(&p).unwrap();
    let data = cfg.data.expect("a [data] section");
    assert_eq!(data.format().unwrap(), augpro::task::Format::Csv);
    assert_eq!(data.text, ["review"]);
}

/// A description of `dir` with `train` and `validation` patterns and extra keys.
fn description(
    dir: &Path,
    train: &str,
    validation: &str,
    extra: &str,
) -> augpro::config::DataConfig {
    let text = format!(
        "source = {:?}\nsplits = {{ train = {train:?}, validation = {validation:?} }}\n{extra}",
        dir.display().to_string()
    );
    toml::from_str(&text).unwrap()
}

/// Class names come from the Parquet files' ClassLabel metadata when the labels are ids,
/// and explicit `labels` fix the classes' order of string labels.
#[test]
fn class_names_come_from_metadata_or_the_description() {
    let tmp = tempfile::tempdir().unwrap();
    let glue = common::glue_dir().join("sst2");
    std::fs::copy(
        glue.join("train-00000-of-00001.parquet"),
        tmp.path().join("all-train.parquet"),
    )
    .unwrap();
    std::fs::copy(
        glue.join("validation-00000-of-00001.parquet"),
        tmp.path().join("dev.parquet"),
    )
    .unwrap();
    let d = description(
        tmp.path(),
        "*train.parquet",
        "dev.parquet",
        "text = [\"sentence\"]\n",
    );
    let task = augpro::data::describe("films", &d, None).unwrap();
    assert_eq!(task.label_names, ["negative", "positive"]);
    let ex = SplitReader::open(Path::new(""), task, "validation")
        .unwrap()
        .read_all(None)
        .unwrap();
    let gold = glue_examples("sst2", "validation", usize::MAX);
    assert_eq!(ex.len(), gold.len());
    assert!(ex
        .iter()
        .zip(&gold)
        .all(|(a, b)| a.label == b.label && a.text_a == b.text_a));
    // Rows are numbered within the split: the ids are row positions, not the file's `idx`.
    assert!(ex.iter().enumerate().all(|(i, e)| e.idx == i as i64));

    let csv = tmp.path().join("csv");
    std::fs::create_dir_all(&csv).unwrap();
    write_reviews(&csv.join("train.csv"), "train", 50);
    let val = write_reviews(&csv.join("validation.csv"), "validation", 20);
    let extra =
        "text = [\"review\"]\nlabel = \"sentiment\"\nlabels = [\"positive\", \"negative\"]\n";
    let d = description(&csv, "train.csv", "validation.csv", extra);
    let task = augpro::data::describe("flipped", &d, None).unwrap();
    let ex = SplitReader::open(Path::new(""), task, "validation")
        .unwrap()
        .read_all(None)
        .unwrap();
    for (e, src) in ex.iter().zip(&val) {
        assert_eq!(
            e.label,
            src.label.map(|l| 1.0 - l),
            "positive is class 0 here"
        );
    }
}
