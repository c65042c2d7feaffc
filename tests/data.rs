//! GLUE ingestion and tokenization: real files, pairs, and every kind of bad input.

mod common;

use arrow::array::{ArrayRef, Float32Array, Int32Array, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use augpro::data::SplitReader;
use augpro::task;
use augpro::tokenize::TextTokenizer;
use parquet::arrow::ArrowWriter;
use std::path::Path;
use std::sync::Arc;

#[test]
fn reads_real_glue_splits() {
    let g = common::glue_dir();
    let sst2 = SplitReader::open(&g, task::glue("sst2").unwrap(), "validation")
        .unwrap()
        .read_all(None)
        .unwrap();
    assert_eq!(sst2.len(), 872);
    assert_eq!(
        sst2[0].text_a,
        "it 's a charming and often affecting journey . "
    );
    assert_eq!(sst2[0].label, Some(1.0));
    let mrpc = SplitReader::open(&g, task::glue("mrpc").unwrap(), "validation")
        .unwrap()
        .read_all(None)
        .unwrap();
    assert_eq!(mrpc.len(), 408);
    assert!(mrpc[0]
        .text_b
        .as_deref()
        .unwrap()
        .contains("foodservice pie"));
    let stsb = SplitReader::open(&g, task::glue("stsb").unwrap(), "validation")
        .unwrap()
        .read_all(Some(2))
        .unwrap();
    assert_eq!(stsb[1].label, Some(4.75));
    let cola = SplitReader::open(&g, task::glue("cola").unwrap(), "train").unwrap();
    let mut n = 0;
    let mut r = cola;
    while let Some(b) = r.next_batch().unwrap() {
        assert!(b.len() <= 1024, "reading streams in batches");
        n += b.len();
    }
    assert_eq!(n, 8551);
    let names =
        augpro::data::label_names_from_metadata(&g.join("sst2/validation-00000-of-00001.parquet"))
            .unwrap();
    assert_eq!(
        names,
        Some(vec!["negative".to_string(), "positive".to_string()])
    );
}

#[test]
fn dev_split_is_carved_from_train_deterministically() {
    use augpro::config::DevConfig;
    use augpro::data::Part;
    let g = common::glue_dir();
    let cola = task::glue("cola").unwrap();
    let dev = DevConfig::default();
    let read = |part| {
        SplitReader::open_part(&g, cola, "train", &dev, part)
            .unwrap()
            .read_all(None)
            .unwrap()
            .into_iter()
            .map(|e| e.idx)
            .collect::<Vec<i64>>()
    };
    let (all, train, held) = (read(Part::All), read(Part::Train), read(Part::Dev));
    assert_eq!(all.len(), 8551);
    assert_eq!(train.len() + held.len(), all.len());
    assert!(held.iter().all(|i| !train.contains(i)), "disjoint");
    // 10% of CoLA's 8,551, within sampling noise; the same examples on every read.
    assert!((700..1000).contains(&held.len()), "{}", held.len());
    assert_eq!(read(Part::Dev), held);
    // Membership depends on `idx` and the seed only, not on file order.
    assert!(held.iter().all(|&i| dev.contains(i, 8551)));
    let other = DevConfig { seed: 1, ..dev };
    assert_ne!(
        held.iter().filter(|&&i| other.contains(i, 8551)).count(),
        held.len()
    );
    // Large train splits hold out at most about `max_examples`.
    assert!((dev.share(67_349) - 2000.0 / 67_349.0).abs() < 1e-12);
    // Other splits are read whole; a zero fraction holds nothing out.
    let val = SplitReader::open_part(&g, cola, "validation", &dev, Part::Train)
        .unwrap()
        .read_all(None)
        .unwrap()
        .len();
    assert_eq!(val, 1043);
    let none = SplitReader::open_part(&g, cola, "train", &DevConfig::NONE, Part::Train)
        .unwrap()
        .read_all(None)
        .unwrap()
        .len();
    assert_eq!(none, 8551);
    // Counting a part agrees with reading it.
    let rows =
        |split, dev: &DevConfig, part| augpro::data::part_rows(&g, cola, split, dev, part).unwrap();
    assert_eq!(rows("train", &dev, Part::Dev), held.len());
    assert_eq!(rows("train", &dev, Part::Train), train.len());
    assert_eq!(rows("train", &DevConfig::NONE, Part::Train), 8551);
    assert_eq!(rows("validation", &dev, Part::Train), 1043);
}

#[test]
fn task_registry_covers_glue() {
    for t in [
        "cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli",
    ] {
        task::glue(t).unwrap();
    }
    assert_eq!(
        task::glue("mnli").unwrap().validation_splits,
        &["validation_matched", "validation_mismatched"]
    );
    assert!(task::glue("stsb").unwrap().is_regression());
    assert!(format!("{:#}", task::glue("imdb").err().unwrap()).contains("unknown GLUE task"));
}

fn write(path: &Path, cols: Vec<(&str, ArrayRef)>) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let schema = Arc::new(Schema::new(
        cols.iter()
            .map(|(n, a)| Field::new(*n, a.data_type().clone(), true))
            .collect::<Vec<_>>(),
    ));
    let batch =
        RecordBatch::try_new(schema.clone(), cols.into_iter().map(|(_, a)| a).collect()).unwrap();
    let mut w = ArrowWriter::try_new(std::fs::File::create(path).unwrap(), schema, None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}

fn sst2_err(cols: Vec<(&str, ArrayRef)>) -> String {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("sst2/train-00000-of-00001.parquet");
    write(&p, cols);
    let e = SplitReader::open(d.path(), task::glue("sst2").unwrap(), "train")
        .and_then(|r| r.read_all(None))
        .expect_err("must fail");
    let msg = format!("{e:#}");
    assert!(
        msg.contains("train-00000-of-00001.parquet"),
        "error names the file: {msg}"
    );
    msg
}

fn s(v: &[Option<&str>]) -> ArrayRef {
    Arc::new(StringArray::from(v.to_vec()))
}
fn i64a(v: &[i64]) -> ArrayRef {
    Arc::new(Int64Array::from(v.to_vec()))
}
fn idx(n: i32) -> ArrayRef {
    Arc::new(Int32Array::from((0..n).collect::<Vec<_>>()))
}

#[test]
fn bad_inputs_name_file_and_field() {
    let m = sst2_err(vec![
        ("text", s(&[Some("a")])),
        ("label", i64a(&[0])),
        ("idx", idx(1)),
    ]);
    assert!(m.contains("missing column `sentence`"), "{m}");
    let m = sst2_err(vec![
        ("sentence", s(&[Some("a")])),
        ("label", s(&[Some("pos")])),
        ("idx", idx(1)),
    ]);
    assert!(
        m.contains("column `label` has type Utf8, expected int64"),
        "{m}"
    );
    let m = sst2_err(vec![
        ("sentence", s(&[Some("a"), Some("b")])),
        ("label", i64a(&[0, 5])),
        ("idx", idx(2)),
    ]);
    assert!(
        m.contains("row 1") && m.contains("expected a class in 0..2"),
        "{m}"
    );
    let m = sst2_err(vec![
        ("sentence", s(&[Some("a"), None])),
        ("label", i64a(&[0, 1])),
        ("idx", idx(2)),
    ]);
    assert!(
        m.contains("row 1") && m.contains("`sentence` is null"),
        "{m}"
    );
    let m = sst2_err(vec![
        ("sentence", s(&[Some("  ")])),
        ("label", i64a(&[0])),
        ("idx", idx(1)),
    ]);
    assert!(m.contains("`sentence` is empty"), "{m}");
    let m = sst2_err(vec![
        ("sentence", s(&[])),
        ("label", i64a(&[])),
        ("idx", idx(0)),
    ]);
    assert!(m.contains("split is empty"), "{m}");

    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("stsb/train-00000-of-00001.parquet");
    write(
        &p,
        vec![
            ("sentence1", s(&[Some("a")])),
            ("sentence2", s(&[Some("b")])),
            (
                "label",
                Arc::new(Float32Array::from(vec![f32::NAN])) as ArrayRef,
            ),
            ("idx", idx(1)),
        ],
    );
    let m = format!(
        "{:#}",
        SplitReader::open(d.path(), task::glue("stsb").unwrap(), "train")
            .unwrap()
            .read_all(None)
            .err()
            .unwrap()
    );
    assert!(m.contains("expected a finite score"), "{m}");

    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(d.path().join("sst2")).unwrap();
    std::fs::write(
        d.path().join("sst2/train-00000-of-00001.parquet"),
        b"not parquet at all",
    )
    .unwrap();
    let m = format!(
        "{:#}",
        SplitReader::open(d.path(), task::glue("sst2").unwrap(), "train")
            .unwrap()
            .read_all(None)
            .err()
            .unwrap()
    );
    assert!(m.contains("not a readable Parquet file"), "{m}");

    let m = format!(
        "{:#}",
        SplitReader::open(d.path(), task::glue("cola").unwrap(), "train")
            .err()
            .unwrap()
    );
    assert!(m.contains("GLUE config directory not found"), "{m}");
    let m = format!(
        "{:#}",
        SplitReader::open(d.path(), task::glue("sst2").unwrap(), "validation")
            .err()
            .unwrap()
    );
    assert!(
        m.contains("no file `validation-NNNNN-of-NNNNN.parquet`"),
        "{m}"
    );
    let _ = DataType::Utf8;
}

#[test]
fn tokenizer_matches_reference_ids_and_truncates_longest_first() {
    let tok = TextTokenizer::load(&common::model_dir(), 128).unwrap();
    let r = common::reference();
    for case in r["cases"].as_array().unwrap() {
        let ex = augpro::data::Example {
            idx: 0,
            text_a: case["text"].as_str().unwrap().into(),
            text_b: case
                .get("text_pair")
                .and_then(|v| v.as_str())
                .map(String::from),
            label: None,
        };
        let e = &tok.encode(&[ex]).unwrap()[0];
        let ids: Vec<u32> = case["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        let types: Vec<u8> = case["token_type_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u8)
            .collect();
        assert_eq!(e.ids, ids);
        assert_eq!(e.type_ids, types);
        assert!(!e.truncated);
    }
    // No fixed padding: a short input stays short.
    let short = tok
        .encode(&[augpro::data::Example {
            idx: 0,
            text_a: "fine".into(),
            text_b: None,
            label: None,
        }])
        .unwrap();
    assert_eq!(short[0].ids.len(), 3);
    // Longest-first truncation of a pair to 12 tokens.
    let t12 = TextTokenizer::load(&common::model_dir(), 12).unwrap();
    let long = "one two three four five six seven eight nine ten".to_string();
    let e = &t12
        .encode(&[augpro::data::Example {
            idx: 0,
            text_a: long,
            text_b: Some("a b".into()),
            label: None,
        }])
        .unwrap()[0];
    assert_eq!(e.ids.len(), 12);
    assert!(e.truncated);
    assert_eq!(
        e.type_ids.iter().filter(|&&t| t == 1).count(),
        3,
        "the short second segment keeps its tokens"
    );
    // vocab.txt fallback gives the same ids.
    let d = tempfile::tempdir().unwrap();
    std::fs::copy(
        common::model_dir().join("vocab.txt"),
        d.path().join("vocab.txt"),
    )
    .unwrap();
    let v = TextTokenizer::load(d.path(), 128).unwrap();
    let ex = augpro::data::Example {
        idx: 0,
        text_a: "A plane is taking off.".into(),
        text_b: Some("An air plane is taking off.".into()),
        label: None,
    };
    assert_eq!(
        v.encode(std::slice::from_ref(&ex)).unwrap(),
        tok.encode(&[ex]).unwrap()
    );
    assert!(tok.is_special(0) && tok.is_special(101) && tok.is_special(1) && !tok.is_special(1996));
}
