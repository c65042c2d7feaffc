//! The teacher families against PyTorch: the tiny seeded checkpoints of
//! `tests/families/make_families.py` (RoBERTa, XLM-R, DistilBERT, DeBERTa-v3 and a
//! DeBERTa-v2 with separate position projections) tokenize the reference batch to the same
//! ids and give the same last hidden states, logits and input-embedding gradients on it,
//! through both attention code paths; then `augment`, `verify` and `train-student` run on
//! each of them end to end.

mod common;

use augpro::model::{Checkpoint, Ctx, Family, SeqClassifier};
use augpro::shards::Row;
use augpro::tokenize::TextTokenizer;
use augpro::train::Batch;
use candle_core::{Device, Tensor, Var};
use common::{fail, ok, read_rows};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const FAMILIES: [(&str, Family); 5] = [
    ("roberta", Family::Roberta),
    ("xlm-roberta", Family::XlmRoberta),
    ("distilbert", Family::DistilBert),
    ("deberta-v3", Family::DebertaV2),
    ("deberta-v2", Family::DebertaV2),
];
const TOLERANCE: f32 = 2e-4;

fn dir(name: &str) -> PathBuf {
    common::root().join("tests/families").join(name)
}

fn reference(name: &str) -> serde_json::Value {
    let p = dir(name).join("reference.json");
    serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap()
}

fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn ints<T: TryFrom<u64>>(v: &serde_json::Value) -> Vec<T> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| T::try_from(x.as_u64().unwrap()).ok().unwrap())
        .collect()
}

/// Asserts `got` and `want` agree within [`TOLERANCE`] element-wise.
fn assert_close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    let worst = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst <= TOLERANCE, "{what}: differs by {worst}");
}

#[test]
fn config_model_type_picks_the_family() {
    for (name, family) in FAMILIES {
        let ck = Checkpoint::open(&dir(name)).unwrap();
        assert_eq!(ck.config.family, family, "{name}");
        assert_eq!(ck.config.num_hidden_layers, 2, "{name}: layers read");
        assert_eq!(ck.config.hidden_size, 32, "{name}: hidden size read");
    }
}

#[test]
fn an_unsupported_model_type_is_one_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(dir("roberta").join(f), tmp.path().join(f)).unwrap();
    }
    let p = tmp.path().join("config.json");
    let text = std::fs::read_to_string(&p).unwrap();
    std::fs::write(&p, text.replace("\"roberta\"", "\"gpt2\"")).unwrap();
    let e = format!("{:#}", Checkpoint::open(tmp.path()).unwrap_err());
    let cli = fail(&[
        "teacher",
        "eval",
        "--teacher",
        tmp.path().to_str().unwrap(),
        "--task",
        "sst2",
    ]);
    for e in [e, cli] {
        assert!(e.contains("config.json") && e.contains("`gpt2`"), "{e}");
        assert!(
            e.contains("bert, roberta, xlm-roberta, distilbert, deberta-v2"),
            "{e}"
        );
    }
}

/// Each family's tokenizer gives the reference ids; the second text of a pair is segment 1
/// from its first token on (even where the tokenizer has one token type, as RoBERTa's),
/// so decoding splits a pair back into its two texts.
#[test]
fn tokenizers_give_the_reference_ids_and_both_segments() {
    for (name, _) in FAMILIES {
        let tok = TextTokenizer::load(&dir(name), 512).unwrap();
        for row in reference(name)["rows"].as_array().unwrap() {
            let pair = row["text_pair"].as_str();
            let ex = augpro::data::Example {
                idx: 0,
                text_a: row["text"].as_str().unwrap().into(),
                text_b: pair.map(String::from),
                label: None,
            };
            let enc = tok.encode(&[ex]).unwrap().remove(0);
            assert_eq!(enc.ids, ints::<u32>(&row["input_ids"]), "{name}");
            let first_b = enc.type_ids.iter().position(|&t| t == 1);
            let (a, b) = tok.decode_segments(&enc.ids, &enc.type_ids).unwrap();
            let Some(pair) = pair else {
                assert_eq!(first_b, None, "{name}: one segment");
                continue;
            };
            let first_b = first_b.expect("a second segment");
            assert!(enc.type_ids[first_b..].iter().all(|&t| t == 1), "{name}");
            // The word only the second text has comes back in the second segment alone.
            let text_a = row["text"].as_str().unwrap();
            let word = pair.split(' ').find(|w| !text_a.contains(w)).unwrap();
            let word = word.to_lowercase();
            let b = b.unwrap().to_lowercase();
            assert!(
                b.contains(&word) && !a.to_lowercase().contains(&word),
                "{name}: {a} | {b}"
            );
        }
    }
}

/// Special tokens are exactly those `tokenizer.json` flags `special` (no BERT-style
/// reserved names in these vocabularies), and embedding rows past the vocabulary (DeBERTa-v3
/// has spare ones) count as special too, so no projection can pick them.
#[test]
fn special_tokens_are_the_tokenizers_flagged_ones() {
    for (name, _) in FAMILIES {
        let tok = TextTokenizer::load(&dir(name), 512).unwrap();
        let file: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir(name).join("tokenizer.json")).unwrap())
                .unwrap();
        let flagged: Vec<u32> = file["added_tokens"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|t| t["special"] == true)
            .map(|t| t["id"].as_u64().unwrap() as u32)
            .collect();
        assert!(flagged.len() >= 4, "{name}: {flagged:?}");
        let special: Vec<u32> = (0..tok.vocab_size() as u32)
            .filter(|&i| tok.is_special(i))
            .collect();
        assert_eq!(special, flagged, "{name}");
        assert_eq!(tok.special_tokens().len(), flagged.len(), "{name}");
        let rows = Checkpoint::open(&dir(name)).unwrap().config.vocab_size;
        assert!(rows >= tok.vocab_size(), "{name}");
        assert!(
            (tok.vocab_size()..rows + 3).all(|i| tok.is_special(i as u32)),
            "{name}"
        );
    }
}

/// The reference rows as a right-padded batch.
fn batch(r: &serde_json::Value, pad: u32) -> Batch {
    let rows = r["rows"].as_array().unwrap();
    let ids: Vec<Vec<u32>> = rows.iter().map(|x| ints(&x["input_ids"])).collect();
    let types: Vec<Vec<u8>> = rows.iter().map(|x| ints(&x["token_type_ids"])).collect();
    let pairs: Vec<(&[u32], &[u8])> = ids
        .iter()
        .zip(&types)
        .map(|(a, b)| (a.as_slice(), b.as_slice()))
        .collect();
    let b = Batch::new(&pairs, pad, &Device::Cpu).unwrap();
    assert_eq!(
        b.seq_len,
        r["batch_padded_length"].as_u64().unwrap() as usize
    );
    b
}

/// What the model gives on the reference batch: hidden states `[b][s][h]`, logits and the
/// gradient of the reference loss (real hidden states' first 4 values + logits · weights)
/// with respect to the input word embeddings, after checking the loss itself.
type Outputs = (Vec<Vec<Vec<f32>>>, Vec<Vec<f32>>, Vec<Vec<Vec<f32>>>);

fn run_reference_loss(
    model: &SeqClassifier,
    b: &Batch,
    r: &serde_json::Value,
    what: &str,
) -> Outputs {
    let emb = model
        .bert
        .embed_ids(&b.ids, &mut Ctx::eval())
        .unwrap()
        .detach();
    let var = Var::from_tensor(&emb).unwrap();
    let out = model
        .forward_embeds(var.as_tensor(), &b.types, &b.mask, &mut Ctx::eval_grad())
        .unwrap();
    let mask = b.mask.unsqueeze(2).unwrap();
    let weights = Tensor::new(floats(&r["logit_weights"]).as_slice(), &Device::Cpu).unwrap();
    let hidden_part = out.hidden.narrow(2, 0, 4).unwrap();
    let hidden_part = hidden_part.broadcast_mul(&mask).unwrap().sum_all().unwrap();
    let logit_part = out
        .logits
        .broadcast_mul(&weights)
        .unwrap()
        .sum_all()
        .unwrap();
    let loss = (hidden_part + logit_part).unwrap();
    let got = loss.to_scalar::<f32>().unwrap() as f64;
    let want = r["loss_value"].as_f64().unwrap();
    assert!(
        (got - want).abs() < 1e-3 * want.abs().max(1.0),
        "{what}: loss {got} vs {want}"
    );
    let grads = loss.backward().unwrap();
    (
        out.hidden.to_vec3().unwrap(),
        out.logits.to_vec2().unwrap(),
        grads.get(var.as_tensor()).unwrap().to_vec3().unwrap(),
    )
}

/// Hidden states, logits and input-embedding gradients against the reference, on the real
/// positions of every row; then the hidden states from ids in inference mode (fused kernels).
fn check_family(name: &str, trainable: bool) {
    let path = if trainable {
        "separate q/k/v"
    } else {
        "stacked qkv"
    };
    let what = |s: String| format!("{name} ({path}): {s}");
    let r = reference(name);
    let ck = Checkpoint::open(&dir(name)).unwrap();
    let tok = TextTokenizer::load(&dir(name), 512).unwrap();
    let (model, _params) = ck
        .load_classifier(&Device::Cpu, trainable, 2, None, 0)
        .unwrap();
    let b = batch(&r, tok.pad_id);
    let (hidden, logits, grad) = run_reference_loss(&model, &b, &r, &what(String::new()));
    let from_ids: Vec<Vec<Vec<f32>>> = model
        .bert
        .forward_ids(&b.ids, &b.types, &b.mask, &mut Ctx::eval())
        .unwrap()
        .to_vec3()
        .unwrap();
    for (i, row) in r["rows"].as_array().unwrap().iter().enumerate() {
        assert_close(
            &logits[i],
            &floats(&row["logits"]),
            &what(format!("row {i} logits")),
        );
        let want_h = row["last_hidden_state"].as_array().unwrap();
        let want_g = row["embedding_grad"].as_array().unwrap();
        for pos in 0..want_h.len() {
            let at = |s: &str| what(format!("row {i} position {pos} {s}"));
            assert_close(&hidden[i][pos], &floats(&want_h[pos]), &at("hidden"));
            assert_close(&grad[i][pos], &floats(&want_g[pos]), &at("gradient"));
            assert_close(
                &from_ids[i][pos],
                &floats(&want_h[pos]),
                &at("hidden from ids"),
            );
        }
    }
}

#[test]
fn roberta_matches_pytorch() {
    check_family("roberta", false);
    check_family("roberta", true);
}

#[test]
fn xlm_roberta_matches_pytorch() {
    check_family("xlm-roberta", false);
    check_family("xlm-roberta", true);
}

#[test]
fn distilbert_matches_pytorch() {
    check_family("distilbert", false);
    check_family("distilbert", true);
}

#[test]
fn deberta_v3_matches_pytorch() {
    check_family("deberta-v3", false);
    check_family("deberta-v3", true);
}

#[test]
fn deberta_v2_with_separate_position_projections_matches_pytorch() {
    check_family("deberta-v2", false);
    check_family("deberta-v2", true);
}

/// Runs the smoke pipeline with the teacher fine-tuned from a family's tiny checkpoint
/// into `root`; returns the shard directory after `verify` passed on it.
fn augment_with(name: &str, root: &Path) -> PathBuf {
    augment_task_with(name, "sst2", root)
}

fn augment_task_with(name: &str, task: &str, root: &Path) -> PathBuf {
    let task_key = format!("task={task}");
    let model = format!("teacher.model={}", dir(name).display());
    let cache = format!("teacher.cache_dir={}", root.join("teachers").display());
    let text = ok(&[
        "augment",
        "pipelines/smoke.toml",
        "--out",
        root.to_str().unwrap(),
        "--set",
        &model,
        "--set",
        &cache,
        "--set",
        &task_key,
        "--set",
        "max_examples=32",
        "--set",
        "teacher.train.max_train_examples=64",
    ]);
    assert!(text.contains("shards:"), "{name}: {text}");
    let shards = root.join(task).join("smoke");
    assert!(ok(&["verify", shards.to_str().unwrap()]).contains("ok"));
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(shards.join("manifest.json")).unwrap()).unwrap();
    let excluded = manifest["projection"]["excluded"].as_str().unwrap();
    let tok = TextTokenizer::load(&dir(name), 512).unwrap();
    for t in tok.special_tokens() {
        assert!(excluded.contains(&t), "{name}: `{t}` not in {excluded}");
    }
    shards
}

/// Every token row keeps its source's length, and a special token only where the source
/// has that very token: a projection or replacement never yields one.
fn check_no_special_token_made(name: &str, rows: &[Row]) {
    let tok = TextTokenizer::load(&dir(name), 512).unwrap();
    let originals: HashMap<i64, &Row> = rows
        .iter()
        .filter(|r| r.method == "original")
        .map(|r| (r.idx, r))
        .collect();
    assert_eq!(originals.len(), 32, "{name}");
    let mut changed = 0;
    for r in rows.iter().filter(|r| r.method != "original") {
        let src = originals[&r.idx];
        assert_eq!(
            r.input_ids.len(),
            src.input_ids.len(),
            "{name} {}",
            r.method
        );
        for (t, s) in r.input_ids.iter().zip(&src.input_ids) {
            assert!(
                !tok.is_special(*t) || t == s,
                "{name} {} row of idx {}: special token {t} made where the source has {s}",
                r.method,
                r.idx
            );
            changed += (t != s) as usize;
        }
    }
    assert!(changed > 100, "{name}: only {changed} tokens changed");
}

/// A student cut from the same family's checkpoint (its first layer) trains on the shards
/// and is saved as that family's classifier, which loads back.
fn check_student(name: &str, family: Family, shards: &Path, root: &Path) {
    let out = root.join("student");
    let text = ok(&[
        "train-student",
        "--shards",
        shards.to_str().unwrap(),
        "--task",
        "sst2",
        "--out",
        out.to_str().unwrap(),
        "--model",
        dir(name).to_str().unwrap(),
        "--layers",
        "1",
        "--max-steps",
        "3",
        "--methods",
        "original,augpro_mix,augpro_fgsm,mixup,fgsm",
    ]);
    assert!(text.contains("accuracy"), "{name}: {text}");
    let ck = Checkpoint::open(&out).unwrap();
    assert_eq!(ck.config.family, family, "{name}");
    assert_eq!(ck.config.num_hidden_layers, 1, "{name}");
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["architectures"][0], family.architecture(), "{name}");
    let weights =
        candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
    let word = format!(
        "{}embeddings.word_embeddings.weight",
        family.weight_prefix()
    );
    assert!(weights.contains_key(&word), "{name}: no {word}");
    let head = family.head_names();
    for w in [head.dense, head.out] {
        assert!(
            weights.contains_key(&format!("{w}.weight"))
                || weights.contains_key(&format!("{}{w}.weight", family.weight_prefix())),
            "{name}: no {w}"
        );
    }
    ck.load_classifier(&Device::Cpu, false, 2, None, 0).unwrap();
}

#[test]
fn augment_verify_and_a_student_on_every_family() {
    for (name, family) in FAMILIES {
        let tmp = tempfile::tempdir().unwrap();
        let shards = augment_with(name, tmp.path());
        check_no_special_token_made(name, &read_rows(&shards));
        check_student(name, family, &shards, tmp.path());
    }
}

/// `train-student` refuses a student whose tokenizer is not the teacher's, across families
/// (here two SentencePiece vocabularies of the same size) and from the BERT base.
#[test]
fn a_student_with_another_tokenizer_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = augment_with("xlm-roberta", tmp.path());
    for (student, says) in [
        (dir("deberta-v2"), "tokenizer"),
        (common::model_dir(), "vocabulary"),
    ] {
        let e = fail(&[
            "train-student",
            "--shards",
            shards.to_str().unwrap(),
            "--task",
            "sst2",
            "--out",
            tmp.path().join("student").to_str().unwrap(),
            "--model",
            student.to_str().unwrap(),
            "--layers",
            "1",
        ]);
        assert!(e.contains(says), "{}: {e}", student.display());
    }
    assert!(!tmp.path().join("student").exists(), "no partial student");
}

/// On a sentence-pair task, a teacher with one token type (RoBERTa) still gets rows whose
/// second segment is marked and decodes to the second text column.
#[test]
fn pair_rows_keep_both_texts_with_one_token_type() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = augment_task_with("roberta", "mrpc", tmp.path());
    let rows = read_rows(&shards);
    assert!(!rows.is_empty());
    for r in rows
        .iter()
        .filter(|r| r.method != "mixup" && r.method != "fgsm")
    {
        assert!(
            r.token_type_ids.contains(&1),
            "{}: no second segment",
            r.method
        );
        assert_eq!(r.texts.len(), 2, "{}", r.method);
        assert!(!r.texts[1].trim().is_empty(), "{}: {:?}", r.method, r.texts);
    }
}
