//! The candle BERT against the PyTorch reference, and its input-embedding gradients
//! against finite differences.

mod common;

use augpro::model::bert::{mean_pool, Bert, BertConfig, Ctx, Linear};
use augpro::model::params::{Init, Params};
use augpro::model::{Checkpoint, SeqClassifier};
use augpro::teacher::{embedding_grad, GradLoss};
use augpro::train::Batch;
use candle_core::{Device, Tensor, D};
use std::collections::HashMap;

fn first8(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn encoder_matches_pytorch_reference() {
    let dev = Device::Cpu;
    let ck = Checkpoint::open(&common::model_dir()).unwrap();
    let p = ck.params(&dev, false, 0).unwrap();
    let bert = Bert::load(&p, &ck.config).unwrap();
    let pooler = Linear::load(&p, "pooler.dense", 384, 384, Init::Required).unwrap();
    let r = common::reference();
    let cases = r["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 3);
    for case in cases {
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
        let b = Batch::new(&[(&ids, &types)], 0, &dev).unwrap();
        for ctx in [Ctx::eval(), Ctx::eval_grad()] {
            let mut ctx = ctx;
            let h = bert
                .forward_ids(&b.ids, &b.types, &b.mask, &mut ctx)
                .unwrap();
            let hv: Vec<Vec<Vec<f32>>> = h.to_vec3().unwrap();
            let want = case["last_hidden_state_first8"].as_array().unwrap();
            assert_eq!(want.len(), ids.len());
            for (pos, w) in want.iter().enumerate() {
                let d = max_abs_diff(&hv[0][pos][..8], &first8(w));
                assert!(d < 2e-4, "{}: position {pos} differs by {d}", case["text"]);
            }
            let mean: Vec<Vec<f32>> = mean_pool(&h, &b.mask).unwrap().to_vec2().unwrap();
            let d = max_abs_diff(&mean[0][..8], &first8(&case["mean_pooled_first8"]));
            assert!(d < 2e-4, "mean pooling differs by {d}");
            let cls = h.narrow(1, 0, 1).unwrap().squeeze(1).unwrap();
            let pooled: Vec<Vec<f32>> = pooler
                .forward(&cls)
                .unwrap()
                .tanh()
                .unwrap()
                .to_vec2()
                .unwrap();
            let d = max_abs_diff(&pooled[0][..8], &first8(&case["pooler_output_first8"]));
            assert!(d < 2e-4, "pooler output differs by {d}");
        }
        let we: Vec<Vec<Vec<f32>>> = bert
            .embed_ids(&b.ids, &mut Ctx::eval())
            .unwrap()
            .to_vec3()
            .unwrap();
        let d = max_abs_diff(
            &we[0][1][..8],
            &first8(&case["word_embedding_first_token_first8"]),
        );
        assert!(
            d < 1e-5,
            "word embedding of the first real token differs by {d}"
        );
    }
}

/// The one-row batch of a case of the PyTorch reference.
fn reference_batch(case: &serde_json::Value, dev: &Device) -> Batch {
    let field = |k: &str| -> Vec<u32> {
        let v = case[k].as_array().unwrap();
        v.iter().map(|x| x.as_u64().unwrap() as u32).collect()
    };
    let ids = field("input_ids");
    let types: Vec<u8> = field("token_type_ids").iter().map(|&t| t as u8).collect();
    Batch::new(&[(&ids, &types)], 0, dev).unwrap()
}

/// With portable products the encoder's forward pass has the same bits on every
/// instruction set this CPU has (scalar, AVX2, AVX-512), and still matches PyTorch.
#[test]
fn portable_forward_has_the_same_bits_on_every_instruction_set() {
    use augpro::model::kernels::portable_gemm::{with_isa, Isa};
    use augpro::model::kernels::with_portable_products;
    let dev = Device::Cpu;
    let ck = Checkpoint::open(&common::model_dir()).unwrap();
    let bert = Bert::load(&ck.params(&dev, false, 0).unwrap(), &ck.config).unwrap();
    let r = common::reference();
    let case = &r["cases"][0];
    let b = reference_batch(case, &dev);
    let forward = |isa: Isa| -> Vec<Vec<f32>> {
        with_isa(isa, || {
            with_portable_products(|| {
                let h = bert.forward_ids(&b.ids, &b.types, &b.mask, &mut Ctx::eval());
                h.unwrap().squeeze(0).unwrap().to_vec2().unwrap()
            })
        })
    };
    let bits = |h: &[Vec<f32>]| -> Vec<u32> { h.iter().flatten().map(|v| v.to_bits()).collect() };
    let scalar = forward(Isa::Scalar);
    let h = bert.forward_ids(&b.ids, &b.types, &b.mask, &mut Ctx::eval());
    let gemm: Vec<Vec<f32>> = h.unwrap().squeeze(0).unwrap().to_vec2().unwrap();
    assert_ne!(
        bits(&gemm),
        bits(&scalar),
        "the portable products were not used"
    );
    for isa in Isa::available() {
        assert_eq!(bits(&forward(isa)), bits(&scalar), "{isa:?} against scalar");
    }
    let want = case["last_hidden_state_first8"].as_array().unwrap();
    for (pos, w) in want.iter().enumerate() {
        let d = max_abs_diff(&scalar[pos][..8], &first8(w));
        assert!(d < 2e-4, "position {pos} differs from PyTorch by {d}");
    }
}

/// With portable products the gradients of a fine-tuning step (dropout on) have the same
/// bits on every instruction set this CPU has, and differ from the `gemm` crate's.
#[test]
fn portable_gradients_have_the_same_bits_on_every_instruction_set() {
    use augpro::model::kernels::portable_gemm::{with_isa, Isa};
    use augpro::model::kernels::with_portable_products;
    let dev = Device::Cpu;
    let ck = Checkpoint::open(&common::model_dir()).unwrap();
    let (m, params) = ck.load_classifier(&dev, true, 2, Some(2), 7).unwrap();
    let b = reference_batch(&common::reference()["cases"][1], &dev);
    let gradients = || -> Vec<u32> {
        let out = m.forward_ids(&b.ids, &b.types, &b.mask, &mut Ctx::train(3));
        let loss = augpro::train::supervised_loss(&out.unwrap().logits, &[1.0], false);
        let grads = loss.unwrap().backward().unwrap();
        let used = params.used();
        let vars = used.iter().filter_map(|(_, _, v)| v.as_ref());
        let all: Vec<f32> = vars
            .flat_map(|v| {
                grads
                    .get(v.as_tensor())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            })
            .collect();
        assert!(all.iter().any(|g| *g != 0.0), "no gradient");
        all.iter().map(|g| g.to_bits()).collect()
    };
    let scalar = with_isa(Isa::Scalar, || with_portable_products(gradients));
    assert!(gradients() != scalar, "the portable products were not used");
    for isa in Isa::available() {
        let got = with_isa(isa, || with_portable_products(gradients));
        assert!(got == scalar, "{isa:?}: gradients differ from scalar");
    }
}

/// Fine-tuning steps that gather the word table's gradient as rows leave every parameter
/// with the bits of steps on candle's dense table gradient (MiniLM, dropout on, clipping).
#[test]
fn table_rows_gradient_steps_give_the_dense_gradient_steps_bits() {
    let dev = Device::Cpu;
    let ck = Checkpoint::open(&common::model_dir()).unwrap();
    let cases = common::reference();
    let batches: Vec<_> = (0..2)
        .map(|i| reference_batch(&cases["cases"][i], &dev))
        .collect();
    let train = |ctx: Ctx, lookups: usize| -> Vec<Vec<u32>> {
        let (m, params) = ck.load_classifier(&dev, true, 2, Some(2), 7).unwrap();
        let cfg = augpro::config::OptimConfig::default();
        let mut opt = augpro::train::Optim::new(&params, &cfg, 4).unwrap();
        let mut ctx = ctx;
        for b in batches.iter().chain(&batches) {
            let out = m.forward_ids(&b.ids, &b.types, &b.mask, &mut ctx).unwrap();
            let loss = augpro::train::supervised_loss(&out.logits, &[1.0], false).unwrap();
            assert_eq!(ctx.recorded_lookups(), lookups);
            opt.backward_step(&loss, &mut ctx).unwrap();
            assert_eq!(ctx.recorded_lookups(), 0, "the step took the lookups");
        }
        let used = params.used();
        let vars = used.iter().filter_map(|(_, _, v)| v.as_ref());
        vars.map(|v| {
            let x: Vec<f32> = v.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            x.iter().map(|x| x.to_bits()).collect()
        })
        .collect()
    };
    let dense = train(Ctx::train(3), 0);
    let rows = train(Ctx::train(3).with_table_rows(), 1);
    let before = ck.load_classifier(&dev, true, 2, Some(2), 7).unwrap().1;
    assert_eq!(before.used()[0].0, "embeddings.word_embeddings.weight");
    let table: Vec<f32> = before.used()[0].1.flatten_all().unwrap().to_vec1().unwrap();
    assert!(
        rows[0].iter().zip(&table).any(|(a, b)| *a != b.to_bits()),
        "the table moved"
    );
    for (i, (a, b)) in rows.iter().zip(&dense).enumerate() {
        assert!(
            a == b,
            "parameter {i} differs from the dense-gradient steps"
        );
    }
}

/// The padded batch of `minilm_l6_batch.json` (5 rows of mixed lengths, one of them a
/// sentence pair, right-padded to 59 with an attention mask) through both attention code
/// paths: query, key and value stacked (frozen weights) and separate (trainable weights).
/// Hidden states, pooler output and the input-embedding gradient must match PyTorch.
#[test]
fn padded_batch_matches_pytorch_reference_on_both_attention_paths() {
    let dev = Device::Cpu;
    let path = common::root().join("tests/fixtures/minilm_l6_batch.json");
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let rows = r["rows"].as_array().unwrap();
    let ints = |v: &serde_json::Value| -> Vec<u64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect()
    };
    let ids: Vec<Vec<u32>> = rows
        .iter()
        .map(|x| {
            ints(&x["input_ids"])
                .into_iter()
                .map(|i| i as u32)
                .collect()
        })
        .collect();
    let types: Vec<Vec<u8>> = rows
        .iter()
        .map(|x| {
            ints(&x["token_type_ids"])
                .into_iter()
                .map(|i| i as u8)
                .collect()
        })
        .collect();
    let pairs: Vec<(&[u32], &[u8])> = ids
        .iter()
        .zip(&types)
        .map(|(a, b)| (a.as_slice(), b.as_slice()))
        .collect();
    let b = Batch::new(&pairs, 0, &dev).unwrap();
    assert_eq!(
        b.seq_len,
        r["batch_padded_length"].as_u64().unwrap() as usize
    );
    assert!(
        ids.iter().any(|i| i.len() < b.seq_len),
        "the batch is padded"
    );
    let ck = Checkpoint::open(&common::model_dir()).unwrap();
    for trainable in [false, true] {
        let p = ck.params(&dev, trainable, 0).unwrap();
        let bert = Bert::load(&p, &ck.config).unwrap();
        let pooler = Linear::load(&p, "pooler.dense", 384, 384, Init::Required).unwrap();
        let path = if trainable {
            "separate q/k/v"
        } else {
            "stacked qkv"
        };
        for mut ctx in [Ctx::eval(), Ctx::eval_grad()] {
            let h = bert
                .forward_ids(&b.ids, &b.types, &b.mask, &mut ctx)
                .unwrap();
            let hv: Vec<Vec<Vec<f32>>> = h.to_vec3().unwrap();
            for (i, row) in rows.iter().enumerate() {
                for (pos, w) in row["last_hidden_state_first8"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .enumerate()
                {
                    let d = max_abs_diff(&hv[i][pos][..8], &first8(w));
                    assert!(d < 2e-4, "{path}: row {i} position {pos} differs by {d}");
                }
            }
        }
        // Gradient of sum(real last_hidden_state[..., :4]) + sum(pooler_output) with respect
        // to the input word embeddings.
        let emb = bert.embed_ids(&b.ids, &mut Ctx::eval()).unwrap().detach();
        let var = candle_core::Var::from_tensor(&emb).unwrap();
        let h = bert
            .forward_embeds(var.as_tensor(), &b.types, &b.mask, &mut Ctx::eval_grad())
            .unwrap();
        let mask = b.mask.unsqueeze(2).unwrap();
        let hidden = h
            .narrow(2, 0, 4)
            .unwrap()
            .broadcast_mul(&mask)
            .unwrap()
            .sum_all()
            .unwrap();
        let cls = h.narrow(1, 0, 1).unwrap().squeeze(1).unwrap();
        let pooled = pooler.forward(&cls).unwrap().tanh().unwrap();
        let loss = (hidden + pooled.sum_all().unwrap()).unwrap();
        let want_loss = r["loss_value"].as_f64().unwrap();
        let got_loss = loss.to_scalar::<f32>().unwrap() as f64;
        assert!(
            (got_loss - want_loss).abs() < 1e-3,
            "{path}: loss {got_loss} vs {want_loss}"
        );
        let pv: Vec<Vec<f32>> = pooled.to_vec2().unwrap();
        let grads = loss.backward().unwrap();
        let g: Vec<Vec<Vec<f32>>> = grads.get(var.as_tensor()).unwrap().to_vec3().unwrap();
        for (i, row) in rows.iter().enumerate() {
            let d = max_abs_diff(&pv[i][..8], &first8(&row["pooler_output_first8"]));
            assert!(d < 2e-4, "{path}: row {i} pooler output differs by {d}");
            for (pos, w) in row["embedding_grad_first8"]
                .as_array()
                .unwrap()
                .iter()
                .enumerate()
            {
                let d = max_abs_diff(&g[i][pos][..8], &first8(w));
                assert!(
                    d < 1e-3,
                    "{path}: row {i} position {pos}: embedding gradient differs by {d}"
                );
            }
        }
    }
}

fn tiny_config() -> BertConfig {
    serde_json::from_value(serde_json::json!({
        "vocab_size": 40, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 32, "max_position_embeddings": 32, "type_vocab_size": 2,
        "hidden_act": "gelu", "layer_norm_eps": 1e-12
    }))
    .unwrap()
}

/// Weights drawn on the host from a seeded generator (candle's own CPU generator cannot be
/// seeded), so every run checks the same model.
fn random_params(c: &BertConfig, seed: u64) -> Params {
    use rand::{Rng, SeedableRng};
    let dev = Device::Cpu;
    let mut m: HashMap<String, Tensor> = HashMap::new();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut rnd = |shape: &[usize], scale: f64, offset: f64| {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| {
                let x: f32 = rng.sample(rand_distr::StandardNormal);
                (x as f64 * scale + offset) as f32
            })
            .collect();
        // The scale keeps activations moderate.
        Tensor::from_vec(v, shape, &dev).unwrap()
    };
    let h = c.hidden_size;
    m.insert(
        "embeddings.word_embeddings.weight".into(),
        rnd(&[c.vocab_size, h], 0.5, 0.0),
    );
    m.insert(
        "embeddings.position_embeddings.weight".into(),
        rnd(&[c.max_position_embeddings, h], 0.1, 0.0),
    );
    m.insert(
        "embeddings.token_type_embeddings.weight".into(),
        rnd(&[2, h], 0.1, 0.0),
    );
    let ln = |m: &mut HashMap<String, Tensor>,
              name: &str,
              r: &mut dyn FnMut(&[usize], f64, f64) -> Tensor| {
        m.insert(format!("{name}.weight"), r(&[h], 0.1, 1.0));
        m.insert(format!("{name}.bias"), r(&[h], 0.1, 0.0));
    };
    ln(&mut m, "embeddings.LayerNorm", &mut rnd);
    for l in 0..c.num_hidden_layers {
        let pre = format!("encoder.layer.{l}");
        for (name, i, o) in [
            ("attention.self.query", h, h),
            ("attention.self.key", h, h),
            ("attention.self.value", h, h),
            ("attention.output.dense", h, h),
            ("intermediate.dense", h, c.intermediate_size),
            ("output.dense", c.intermediate_size, h),
        ] {
            m.insert(format!("{pre}.{name}.weight"), rnd(&[o, i], 0.3, 0.0));
            m.insert(format!("{pre}.{name}.bias"), rnd(&[o], 0.1, 0.0));
        }
        ln(
            &mut m,
            &format!("{pre}.attention.output.LayerNorm"),
            &mut rnd,
        );
        ln(&mut m, &format!("{pre}.output.LayerNorm"), &mut rnd);
    }
    Params::new(m, &dev, false, seed, "random")
}

#[test]
fn embedding_gradient_matches_finite_differences() {
    let dev = Device::Cpu;
    let c = tiny_config();
    let p = random_params(&c, 3);
    let model = SeqClassifier::load(&p, &c, 3).unwrap();
    let ids: Vec<Vec<u32>> = vec![vec![1, 5, 9, 13, 2], vec![1, 7, 2, 30, 31, 2]];
    let types: Vec<Vec<u8>> = vec![vec![0; 5], vec![0, 0, 0, 1, 1, 1]];
    let rows: Vec<(&[u32], &[u8])> = ids
        .iter()
        .zip(&types)
        .map(|(a, b)| (a.as_slice(), b.as_slice()))
        .collect();
    let b = Batch::new(&rows, 0, &dev).unwrap();
    let labels = [2f32, 0.0];
    let (emb, grad, _) = embedding_grad(&model, &b, GradLoss::Labels(&labels), false).unwrap();
    let loss_at = |e: &Tensor| -> f64 {
        let out = model
            .forward_embeds(e, &b.types, &b.mask, &mut Ctx::eval_grad())
            .unwrap();
        augpro::train::supervised_loss(&out.logits, &labels, false)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64
    };
    // Directional derivatives (central differences) along the gradient itself and along
    // seeded random directions, masked to real tokens. Float32 losses put a noise floor of
    // about 1e-4 under a finite difference with h = 1e-2 along a random direction; along the
    // unit gradient direction a step of 5e-2 keeps the floor near 1e-5, and it is held to 2%.
    let mask = b.mask.unsqueeze(2).unwrap();
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let gnorm = grad
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        .sqrt();
    let mut dirs = vec![(&grad / gnorm as f64).unwrap()];
    for _ in 0..4 {
        let v: Vec<f32> = (0..emb.elem_count())
            .map(|_| rng.sample::<f32, _>(rand_distr::StandardNormal))
            .collect();
        dirs.push(
            Tensor::from_vec(v, emb.shape(), &dev)
                .unwrap()
                .broadcast_mul(&mask)
                .unwrap(),
        );
    }
    for (k, d) in dirs.iter().enumerate() {
        let h = if k == 0 { 5e-2 } else { 1e-2 };
        let plus = loss_at(&(&emb + (d * h).unwrap()).unwrap());
        let minus = loss_at(&(&emb - (d * h).unwrap()).unwrap());
        let fd = (plus - minus) / (2.0 * h);
        let an = (&grad * d)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        if k == 0 {
            assert!(an > 1e-3, "gradient norm {an} too small to test");
        }
        let tol = 2e-2 * an.abs() + if k == 0 { 0.0 } else { 1e-4 };
        assert!(
            (fd - an).abs() <= tol,
            "direction {k}: finite difference {fd} vs gradient {an} (tolerance {tol})"
        );
    }
    // The KL loss to a distribution has a gradient too.
    let target = candle_nn::ops::softmax(
        &Tensor::new(&[[0.2f32, 0.3, 0.5], [0.9, 0.05, 0.05]], &dev).unwrap(),
        D::Minus1,
    )
    .unwrap();
    let (_, g2, _) = embedding_grad(&model, &b, GradLoss::Distribution(&target), false).unwrap();
    let norm = g2
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(norm > 0.0 && norm.is_finite());
}

#[test]
fn checkpoint_mismatch_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    for f in ["model.safetensors", "tokenizer.json", "vocab.txt"] {
        std::fs::copy(common::model_dir().join(f), dir.path().join(f)).unwrap();
    }
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(common::model_dir().join("config.json")).unwrap())
            .unwrap();
    cfg["hidden_size"] = 768.into();
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    let ck = Checkpoint::open(dir.path()).unwrap();
    let err = ck
        .load_classifier(&Device::Cpu, false, 2, None, 0)
        .err()
        .expect("mismatch must fail");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("embeddings.word_embeddings.weight") && msg.contains("do not match"),
        "{msg}"
    );
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let msg = format!("{:#}", Checkpoint::open(dir.path()).err().unwrap());
    assert!(msg.contains("model.safetensors"), "{msg}");
}
