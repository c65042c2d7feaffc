//! The device paths: exact projection as tensor ops against the exact CPU search, and the teacher in
//! each dtype against the PyTorch reference. They run on the CPU here; `make gpu-check` runs
//! them on CUDA with `AUGPRO_TEST_DEVICE=cuda`.

mod common;

use augpro::augment::project::{Metric, Projector};
use augpro::augment::project_device::DeviceProjector;
use augpro::model::bert::{Bert, Ctx};
use augpro::model::Checkpoint;
use augpro::tokenize::TextTokenizer;
use augpro::train::Batch;
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// `AUGPRO_TEST_DEVICE` (`cpu` when unset).
fn test_device() -> Device {
    match std::env::var("AUGPRO_TEST_DEVICE").as_deref() {
        Err(_) | Ok("cpu") => Device::Cpu,
        Ok("cuda") => Device::new_cuda(0).expect("AUGPRO_TEST_DEVICE=cuda needs a GPU"),
        Ok(other) => panic!("AUGPRO_TEST_DEVICE={other}: expected cpu or cuda"),
    }
}

fn minilm_table() -> (Vec<f32>, usize, Vec<bool>) {
    let ck = Checkpoint::open(&common::model_dir()).unwrap();
    let p = ck.params(&Device::Cpu, false, 0).unwrap();
    let bert = Bert::load(&p, &ck.config).unwrap();
    let t: Vec<f32> = bert
        .word_embeddings()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let tok = TextTokenizer::load(&common::model_dir(), 128).unwrap();
    let d = ck.config.hidden_size;
    let special = (0..t.len() / d).map(|i| tok.is_special(i as u32)).collect();
    (t, d, special)
}

/// Points between two random kept tokens (λ uniform), half of them pushed off the segment by
/// sign noise of a tenth of the table's spread, plus a few exact table rows.
fn mixed_points(table: &[f32], d: usize, special: &[bool], n: usize, seed: u64) -> Vec<f32> {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    let vocab = table.len() / d;
    let pick = |r: &mut ChaCha8Rng| loop {
        let t = r.gen_range(0..vocab);
        if !special[t] {
            return t;
        }
    };
    let mut q = Vec::with_capacity(n * d);
    for i in 0..n {
        let (a, b) = (pick(&mut r), pick(&mut r));
        let lam: f32 = if i % 50 == 0 {
            1.0
        } else {
            r.gen_range(0.0..1.0)
        };
        let noisy = i % 2 == 1;
        for k in 0..d {
            let mut x = lam * table[a * d + k] + (1.0 - lam) * table[b * d + k];
            if noisy {
                x += if r.gen::<bool>() { 0.01 } else { -0.01 };
            }
            q.push(x);
        }
    }
    q
}

#[test]
fn device_projection_gives_the_exact_search_ids_on_minilm() {
    let dev = test_device();
    let (table, d, special) = minilm_table();
    let keep = |t: u32| !special[t as usize];
    let n = 3000;
    let q = mixed_points(&table, d, &special, n, 11);
    let want = Projector::build(&table, d, keep, "Flat", Metric::L2)
        .unwrap()
        .nearest(&q)
        .unwrap();
    let mut dp = DeviceProjector::build(&table, d, keep, &dev).unwrap();
    assert_eq!(dp.len(), special.iter().filter(|s| !**s).count());
    // Uneven chunks: block boundaries do not change the answer.
    dp.chunk = 700;
    let got = dp.nearest(&q).unwrap();
    assert_eq!(got.len(), n);
    let differ: Vec<usize> = (0..n).filter(|&i| got[i] != want[i]).collect();
    assert!(
        differ.is_empty(),
        "{} of {n} queries project differently, first at {:?}",
        differ.len(),
        &differ[..differ.len().min(5)]
    );
    assert!(got.iter().all(|&t| keep(t)), "excluded ids never come back");
    // The tensor entry point keeps the ids on the device.
    let qt = Tensor::from_slice(&q[..64 * d], (64, d), &dev).unwrap();
    let ids = dp.nearest_tensor(&qt).unwrap();
    assert!(ids.device().same_device(&dev));
    assert_eq!(ids.to_vec1::<u32>().unwrap(), want[..64].to_vec());
}

#[test]
fn device_projection_breaks_ties_to_the_lowest_index_and_maps_nan_to_missing() {
    let dev = test_device();
    // Rows 1 and 3 are equal; row 0 is excluded.
    let table = vec![0.0f32, 0.0, 1.0, 1.0, 5.0, 5.0, 1.0, 1.0, -2.0, 0.5];
    let keep = |t: u32| t != 0;
    let dp = DeviceProjector::build(&table, 2, keep, &dev).unwrap();
    let got = dp
        .nearest(&[1.0, 1.0, 0.9, 1.1, 0.1, 0.0, -2.0, 0.5, f32::NAN, 0.0])
        .unwrap();
    assert_eq!(
        got,
        vec![1, 1, 1, 4, augpro::augment::project::MISSING],
        "ties go to the lowest token id, never to an excluded one"
    );
}

/// Midpoints of `pairs` of rows (as far from one as from the other, up to rounding), each
/// nudged towards one row by a few parts in 10⁷ of their difference, or not at all.
fn midpoints(table: &[f32], d: usize, pairs: &[(usize, usize)], r: &mut ChaCha8Rng) -> Vec<f32> {
    let mut q = Vec::with_capacity(pairs.len() * d);
    for &(a, b) in pairs {
        let nudge = [0.0f32, 1e-7, -1e-7, 4e-7, -4e-7][r.gen_range(0..5)];
        for k in 0..d {
            let (x, y) = (table[a * d + k], table[b * d + k]);
            q.push(0.5 * (x + y) + nudge * (y - x));
        }
    }
    q
}

#[test]
fn device_projection_equals_the_exact_search_at_near_ties_and_non_finite_queries() {
    let dev = test_device();
    let (table, d, special) = minilm_table();
    let keep = |t: u32| !special[t as usize];
    let mut cpu = Projector::build(&table, d, keep, "Flat", Metric::L2).unwrap();
    let mut r = ChaCha8Rng::seed_from_u64(23);
    let vocab = table.len() / d;
    // Each picked token with its nearest other token: the closest races in the table.
    let picks: Vec<u32> = (0..150)
        .map(|_| r.gen_range(0..vocab as u32))
        .filter(|&t| keep(t))
        .collect();
    let rows: Vec<f32> = picks
        .iter()
        .flat_map(|&t| table[t as usize * d..(t as usize + 1) * d].to_vec())
        .collect();
    let (nb, _) = cpu.search(&rows, 2).unwrap();
    let pairs: Vec<(usize, usize)> = picks
        .iter()
        .zip(nb.chunks_exact(2))
        .map(|(&t, n)| (t as usize, if n[0] == t { n[1] } else { n[0] } as usize))
        .collect();
    let mut q = midpoints(&table, d, &pairs, &mut r);
    let ties = q.len() / d;
    q.extend_from_slice(&rows[..d]);
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut row = rows[d..2 * d].to_vec();
        row[r.gen_range(0..d)] = bad;
        q.extend(row);
    }
    let mut dp = DeviceProjector::build(&table, d, keep, &dev).unwrap();
    dp.chunk = 64;
    let got = dp.nearest(&q).unwrap();
    let want = cpu.nearest(&q).unwrap();
    assert_eq!(got, want, "the device path gives the CPU's exact answers");
    // The near ties, then a table row.
    for (i, x) in q.chunks_exact(d).take(ties + 1).enumerate() {
        let brute =
            augpro::augment::exact_search::brute_force_nearest(&table, d, keep, x, Metric::L2);
        assert_eq!(got[i], brute, "query {i}");
    }
    let missing = augpro::augment::project::MISSING;
    assert_eq!(
        &got[ties + 1..],
        [missing; 3],
        "NaN and ±inf have no nearest token"
    );
}

/// A reference case: token ids, token types, and the first 8 hidden values per position.
type Case = (Vec<u32>, Vec<u8>, Vec<Vec<f32>>);

fn reference_cases() -> Vec<Case> {
    let r = common::reference();
    r["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let nums = |k: &str| -> Vec<u64> {
                c[k].as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap())
                    .collect()
            };
            let hidden = c["last_hidden_state_first8"]
                .as_array()
                .unwrap()
                .iter()
                .map(|row| {
                    row.as_array()
                        .unwrap()
                        .iter()
                        .map(|x| x.as_f64().unwrap() as f32)
                        .collect()
                })
                .collect();
            (
                nums("input_ids").into_iter().map(|x| x as u32).collect(),
                nums("token_type_ids")
                    .into_iter()
                    .map(|x| x as u8)
                    .collect(),
                hidden,
            )
        })
        .collect()
}

/// Largest difference to the PyTorch reference over the first 8 hidden values of every
/// position of every case, with the encoder in `dtype` on `dev`.
fn reference_error(dev: &Device, dtype: DType) -> f32 {
    let ck = Checkpoint::open(&common::model_dir()).unwrap();
    let p = ck.params(dev, false, 0).unwrap().with_dtype(dtype);
    let bert = Bert::load(&p, &ck.config).unwrap();
    let mut worst = 0f32;
    for (ids, types, want) in reference_cases() {
        let b = Batch::new(&[(&ids, &types)], 0, dev).unwrap();
        for mut ctx in [Ctx::eval(), Ctx::eval_grad()] {
            let h: Vec<Vec<Vec<f32>>> = bert
                .forward_ids(&b.ids, &b.types, &b.mask, &mut ctx)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .to_vec3()
                .unwrap();
            for (pos, w) in want.iter().enumerate() {
                for (a, b) in h[0][pos][..8].iter().zip(w) {
                    worst = worst.max((a - b).abs());
                }
            }
        }
    }
    worst
}

/// bf16 keeps 8 bits of mantissa, and the rounding adds up over 6 layers: measured 0.075 on the
/// CPU (candle's bf16 kernels); twice that allows for cuBLAS's different accumulation order.
const BF16_TOLERANCE: f32 = 0.15;

#[test]
fn encoder_matches_the_reference_in_each_dtype() {
    let dev = test_device();
    let f32_err = reference_error(&dev, DType::F32);
    eprintln!("max |hidden - reference| on {dev:?}: f32 {f32_err:.2e}");
    assert!(f32_err <= 2e-4, "f32 differs by {f32_err}");
    if dev.is_cpu() && !augpro::precision::cpu_has_bf16() {
        // bf16 cannot run on this CPU: loading the encoder in bf16 is one clear error.
        let ck = Checkpoint::open(&common::model_dir()).unwrap();
        let p = ck.params(&dev, false, 0).unwrap().with_dtype(DType::BF16);
        let e = Bert::load(&p, &ck.config).err().expect("bf16 refused");
        assert!(e.to_string().contains("needs AVX-512 BF16"), "{e}");
        eprintln!("bf16 not compared: this CPU lacks AVX-512 BF16 ({e})");
        return;
    }
    let bf16_err = reference_error(&dev, DType::BF16);
    eprintln!("max |hidden - reference| on {dev:?}: bf16 {bf16_err:.2e}");
    assert!(
        bf16_err <= BF16_TOLERANCE,
        "bf16 differs by {bf16_err} (tolerance {BF16_TOLERANCE})"
    );
    let logit_diff = bf16_logit_difference(&dev);
    eprintln!("max |logits bf16 - logits f32| on {dev:?}: {logit_diff:.2e}");
    assert!(logit_diff <= 0.1, "bf16 logits differ by {logit_diff}");
    if let Some(p) = std::env::var_os("AUGPRO_PARITY_OUT") {
        let v = serde_json::json!({
            "device": format!("{dev:?}"),
            "f32_max_abs_diff": f32_err,
            "bf16_max_abs_diff": bf16_err,
            "bf16_vs_f32_max_logit_diff": logit_diff,
            "f32_tolerance": 2e-4,
            "bf16_tolerance": BF16_TOLERANCE,
        });
        std::fs::write(p, serde_json::to_string_pretty(&v).unwrap()).unwrap();
    }
}

/// Largest logit difference between bf16 and f32 for a 2-label classifier (MiniLM with a
/// seeded head) over the reference sentences.
fn bf16_logit_difference(dev: &Device) -> f32 {
    let ck = Checkpoint::open(&common::model_dir()).unwrap();
    let logits = |dtype: DType| -> Vec<Vec<f32>> {
        let p = ck.params(dev, false, 5).unwrap().with_dtype(dtype);
        let m = augpro::model::SeqClassifier::load(&p, &ck.config, 2).unwrap();
        reference_cases()
            .iter()
            .flat_map(|(ids, types, _)| {
                let b = Batch::new(&[(ids, types)], 0, dev).unwrap();
                m.forward_ids(&b.ids, &b.types, &b.mask, &mut Ctx::eval())
                    .unwrap()
                    .logits
                    .to_dtype(DType::F32)
                    .unwrap()
                    .to_vec2::<f32>()
                    .unwrap()
            })
            .collect()
    };
    let (a, b) = (logits(DType::F32), logits(DType::BF16));
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn f16_on_the_cpu_is_a_clear_error() {
    let e = common::fail(&[
        "augment",
        "pipelines/smoke.toml",
        "--device",
        "cpu",
        "--dtype",
        "f16",
    ]);
    assert!(e.contains("f16 is for `--device cuda`"), "{e}");
}

/// `--dtype bf16` on the CPU: where the CPU has AVX-512 BF16, shards that verify, record
/// bf16 and keep the f32 run's rows (logits within 0.1, most token rows identical);
/// elsewhere one error line naming the instructions.
#[test]
fn bf16_on_the_cpu_keeps_the_f32_rows_or_names_what_is_missing() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |dtype: &str| {
        let root = tmp.path().join(dtype);
        let out = root.to_str().unwrap().to_string();
        let args = [
            "augment",
            "pipelines/smoke.toml",
            "--out",
            &out,
            "--device",
            "cpu",
            "--dtype",
            dtype,
        ]
        .map(String::from);
        (root, args)
    };
    let (bf16_root, args) = run("bf16");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    if !augpro::precision::cpu_has_bf16() {
        let e = common::fail(&args);
        assert!(e.contains("lacks AVX-512 BF16"), "{e}");
        return;
    }
    common::ok(&args);
    let (f32_root, f32_args) = run("f32");
    common::ok(&f32_args.iter().map(String::as_str).collect::<Vec<_>>());
    let dir = |root: &std::path::Path| root.join("sst2/smoke");
    assert!(common::ok(&["verify", dir(&bf16_root).to_str().unwrap()]).contains("ok"));
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir(&bf16_root).join("manifest.json")).unwrap())
            .unwrap();
    assert_eq!(m["shards"][0]["dtype"], "bf16");
    let (a, b) = (
        common::read_rows(&dir(&f32_root)),
        common::read_rows(&dir(&bf16_root)),
    );
    let key = |r: &augpro::shards::Row| (r.method, r.idx, r.copy);
    let b: std::collections::HashMap<_, _> = b.iter().map(|r| (key(r), r)).collect();
    let (mut same, mut both, mut worst) = (0, 0, 0f32);
    for r in &a {
        let Some(o) = b.get(&key(r)) else { continue };
        both += 1;
        same += usize::from(r.input_ids == o.input_ids);
        if r.method == "original" {
            for (x, y) in r.teacher_logits.iter().zip(&o.teacher_logits) {
                worst = worst.max((x - y).abs());
            }
        }
    }
    eprintln!("bf16 vs f32: {same} of {both} rows identical, max logit diff {worst:.3}");
    assert!(
        both * 10 >= a.len() * 9,
        "{both} of {} rows in both",
        a.len()
    );
    assert!(same * 10 >= both * 9, "{same} of {both} rows identical");
    assert!(worst <= 0.1, "original rows' logits differ by {worst}");
}

/// `--portable`: the shards of a run on the widest instruction set and of one on the next
/// (AVX2 after AVX-512, else scalar) are the same bytes, named `cpu (portable)`; both use
/// the teacher the first run trained with portable products.
#[test]
fn portable_products_give_the_same_shards_on_every_instruction_set() {
    use augpro::model::kernels::portable_gemm::Isa;
    let isas = Isa::available();
    let Some(other) = isas.get(1) else {
        panic!("this CPU runs only {isas:?}: nothing to compare");
    };
    let tmp = tempfile::tempdir().unwrap();
    let teachers = format!(
        "teacher.cache_dir={}",
        tmp.path().join("teachers").display()
    );
    // 8 smoke examples, with the teachers cached in the test's own directory.
    let small = ["--set", "max_examples=8", "--set", &teachers];
    let (widest_root, next_root) = (tmp.path().join("widest"), tmp.path().join("next"));
    let run = |root: &std::path::Path, isa: &[&str]| {
        let extra = [&["--portable"], &small[..], isa].concat();
        common::ok(&common::augment_args(root, &extra));
        root.join("sst2/smoke")
    };
    let widest = run(&widest_root, &[]);
    let next = run(&next_root, &["--portable-isa", other.name()]);
    assert!(common::ok(&["verify", widest.to_str().unwrap()]).contains("ok"));
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(widest.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m["shards"][0]["device"], "cpu (portable)");
    let shards = common::files(&widest.join("data"));
    assert_eq!(shards.len(), 4, "{shards:?}");
    for f in shards
        .iter()
        .map(|f| format!("data/{f}"))
        .chain(["manifest.json".into()])
    {
        let (a, b) = (widest.join(&f), next.join(&f));
        assert!(
            std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap(),
            "{f} differs between {:?} and {other:?}",
            isas[0]
        );
    }
    // Without `--portable` the directory is refused before a teacher is trained for it.
    let e = common::fail(&common::augment_args(&widest_root, &small));
    assert!(e.contains("another device, CPU kernels or dtype"), "{e}");
    let cached = common::files(&tmp.path().join("teachers"));
    assert_eq!(cached.len(), 1, "teachers: {cached:?}");
}

/// `--portable` where it cannot hold: another device, an instruction set this CPU lacks or
/// no such name, `--portable-isa` alone, and a DeBERTa teacher; each one error line, and no
/// output directory.
#[test]
fn portable_products_are_refused_where_they_cannot_hold() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let refused = |extra: &[&str], expected: &str| {
        let e = common::fail(&common::augment_args(&out, extra));
        assert!(e.contains(expected), "{extra:?}: {e}");
        assert!(!out.exists(), "{extra:?} left {}", out.display());
    };
    refused(
        &["--portable", "--device", "cuda"],
        "portable products are for the CPU",
    );
    refused(
        &["--portable", "--portable-isa", "sse9"],
        "expected avx512, avx2 or scalar",
    );
    refused(&["--portable-isa", "scalar"], "only with --portable");
    if !std::arch::is_x86_feature_detected!("avx512f") {
        refused(
            &["--portable", "--portable-isa", "avx512"],
            "this CPU lacks it",
        );
    }
    let deberta = common::root().join("tests/families/deberta-v3");
    let model = format!("teacher.model={}", deberta.display());
    refused(
        &["--portable", "--set", &model],
        "DeBERTa's relative attention",
    );
}
