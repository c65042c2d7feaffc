//! Projection against brute force, identity cases (λ = 1, ε = 0), and the mixing rules.

mod common;

use augpro::augment::arith::mix::{align, mix};
use augpro::augment::arith::{fgsm, replace};
use augpro::augment::exact_search::brute_force_nearest;
use augpro::augment::project::Projector;
use augpro::config::Metric;
use augpro::model::Checkpoint;
use augpro::tokenize::TextTokenizer;
use candle_core::Device;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn random_table(n: usize, d: usize, seed: u64) -> Vec<f32> {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    (0..n * d).map(|_| r.gen_range(-1.0f32..1.0)).collect()
}

#[test]
fn flat_projection_equals_brute_force() {
    let (n, d) = (3000, 48);
    let table = random_table(n, d, 1);
    let keep = |t: u32| !t.is_multiple_of(7);
    let mut r = ChaCha8Rng::seed_from_u64(2);
    let queries: Vec<f32> = (0..200 * d).map(|_| r.gen_range(-1.0f32..1.0)).collect();
    for metric in [Metric::L2, Metric::InnerProduct] {
        let mut p = Projector::build(&table, d, keep, "Flat", metric).unwrap();
        assert_eq!(p.len(), (0..n as u32).filter(|&t| keep(t)).count());
        let got = p.nearest(&queries).unwrap();
        for (i, q) in queries.chunks(d).enumerate() {
            let want = brute_force_nearest(&table, d, keep, q, metric);
            assert_eq!(got[i], want, "{metric:?} query {i}");
            assert!(keep(got[i]), "excluded ids never come back");
        }
    }
    // An approximate index is selectable by factory string and mostly agrees.
    let mut h = Projector::build(&table, d, keep, "HNSW32", Metric::L2).unwrap();
    let approx = h.nearest(&queries).unwrap();
    let exact = Projector::build(&table, d, keep, "Flat", Metric::L2)
        .unwrap()
        .nearest(&queries)
        .unwrap();
    let recall =
        approx.iter().zip(&exact).filter(|(a, b)| a == b).count() as f64 / exact.len() as f64;
    assert!(recall > 0.8, "HNSW recall@1 {recall}");
}

fn real_table() -> (Vec<f32>, usize, TextTokenizer) {
    let ck = Checkpoint::open(&common::model_dir()).unwrap();
    let p = ck.params(&Device::Cpu, false, 0).unwrap();
    let bert = augpro::model::Bert::load(&p, &ck.config).unwrap();
    let t: Vec<f32> = bert
        .word_embeddings()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    (
        t,
        ck.config.hidden_size,
        TextTokenizer::load(&common::model_dir(), 128).unwrap(),
    )
}

#[test]
fn identity_settings_reproduce_the_source_and_specials_survive() {
    let (table, d, tok) = real_table();
    let special = |t: u32| tok.is_special(t);
    let mut p = Projector::build(&table, d, |t| !tok.is_special(t), "Flat", Metric::L2).unwrap();
    let ex = |a: &str, b: Option<&str>| augpro::data::Example {
        idx: 0,
        text_a: a.into(),
        text_b: b.map(String::from),
        label: None,
    };
    let e = tok
        .encode(&[ex(
            "the movie was a charming and often affecting journey .",
            Some("a dull , lifeless film"),
        )])
        .unwrap()
        .remove(0);
    let q = tok
        .encode(&[ex("an utterly brilliant piece", Some("bad"))])
        .unwrap()
        .remove(0);
    let al = align(&e.ids, &e.type_ids, &q.ids, &q.type_ids, &special);
    // Segment-wise alignment: A with A', B with B'; specials and the longer tail are kept.
    assert_eq!(al[0], None, "[CLS] never mixed");
    assert_eq!(al[1], Some(1));
    let first_b = e.type_ids.iter().position(|&t| t == 1).unwrap();
    let partner_b = q.type_ids.iter().position(|&t| t == 1).unwrap();
    assert_eq!(al[first_b], Some(partner_b));
    assert_eq!(al[first_b + 1], None, "partner's segment B is shorter");
    // λ = 1 projects back to the source exactly.
    let mixed = mix(&table, d, &e.ids, &q.ids, &al, &vec![1.0; e.ids.len()]);
    let non_special: Vec<usize> = (0..e.ids.len()).filter(|&i| !special(e.ids[i])).collect();
    let queries: Vec<f32> = non_special
        .iter()
        .flat_map(|&i| mixed[i * d..(i + 1) * d].to_vec())
        .collect();
    let got = p.nearest(&queries).unwrap();
    assert_eq!(
        got,
        non_special.iter().map(|&i| e.ids[i]).collect::<Vec<_>>()
    );
    // λ = 0 at aligned positions gives the partner's tokens there.
    let mixed0 = mix(&table, d, &e.ids, &q.ids, &al, &vec![0.0; e.ids.len()]);
    let aligned: Vec<usize> = (0..e.ids.len()).filter(|&i| al[i].is_some()).collect();
    let q0: Vec<f32> = aligned
        .iter()
        .flat_map(|&i| mixed0[i * d..(i + 1) * d].to_vec())
        .collect();
    assert_eq!(
        p.nearest(&q0).unwrap(),
        aligned
            .iter()
            .map(|&i| q.ids[al[i].unwrap()])
            .collect::<Vec<_>>()
    );
    // ε = 0 reproduces the source; a perturbation never touches special positions.
    let emb: Vec<f32> = e
        .ids
        .iter()
        .flat_map(|&t| table[t as usize * d..(t as usize + 1) * d].to_vec())
        .collect();
    let mut r = ChaCha8Rng::seed_from_u64(5);
    let grad: Vec<f32> = (0..emb.len()).map(|_| r.gen_range(-1.0f32..1.0)).collect();
    let on: Vec<bool> = e.ids.iter().map(|&t| !special(t)).collect();
    let s = fgsm::signs(&grad, d, &on);
    assert!(
        s[..d].iter().all(|&x| x == 0),
        "[CLS] row has no perturbation"
    );
    assert_eq!(fgsm::apply(&emb, &s, 0.0), emb);
    // Replacement with p = 0 keeps everything; with p = 1 changes every non-special token.
    let (nb, _) = p.search(&emb, 9).unwrap();
    assert_eq!(
        replace::replace(&e.ids, &special, 0.0, 8, &nb, &mut r),
        e.ids
    );
    let all = replace::replace(&e.ids, &special, 1.0, 8, &nb, &mut r);
    for (i, (&a, &b)) in e.ids.iter().zip(&all).enumerate() {
        if special(a) {
            assert_eq!(a, b, "special position {i} kept");
        } else {
            assert_ne!(a, b, "position {i} replaced");
            assert!(!special(b));
        }
    }
}

/// Skipping the search where the source token is provably nearest gives exactly the answer
/// of exact search, on MiniLM's real table, for interpolated and sign-perturbed points.
#[test]
fn hinted_projection_equals_exact_search() {
    let ck = Checkpoint::open(&common::model_dir()).unwrap();
    let p = ck.params(&Device::Cpu, false, 0).unwrap();
    let bert = augpro::model::Bert::load(&p, &ck.config).unwrap();
    let table: Vec<f32> = bert
        .word_embeddings()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let d = ck.config.hidden_size;
    let vocab = table.len() / d;
    let keep = |t: u32| t >= 999;
    let mut proj = Projector::build(&table, d, keep, "Flat", Metric::L2).unwrap();
    let mut r = ChaCha8Rng::seed_from_u64(5);
    let (mut q, mut hints) = (Vec::new(), Vec::new());
    for i in 0..6000 {
        let s = r.gen_range(999..vocab);
        let e = &table[s * d..(s + 1) * d];
        if i % 3 == 0 {
            // ε·sign(noise), from tiny to large steps.
            let eps = 10f32.powf(r.gen_range(-4.0..-1.0));
            q.extend(
                e.iter()
                    .map(|&v| v + if r.gen::<bool>() { eps } else { -eps }),
            );
        } else {
            let j = r.gen_range(0..vocab);
            let lam: f32 = r.gen_range(0.35..1.0);
            let f = &table[j * d..(j + 1) * d];
            q.extend(e.iter().zip(f).map(|(a, b)| lam * a + (1.0 - lam) * b));
        }
        // Some hints are excluded tokens, which never shortcut.
        hints.push(if i % 50 == 0 {
            r.gen_range(0..999) as u32
        } else {
            s as u32
        });
    }
    let exact = proj.nearest(&q).unwrap();
    let hinted = proj.nearest_with_hints(&q, &hints).unwrap();
    assert_eq!(hinted, exact);
    let kept = exact.iter().zip(&hints).filter(|(a, b)| a == b).count();
    assert!(
        kept > 1000,
        "the test points should often project back to their source ({kept})"
    );
}

/// Exact L2 search (blocked GEMM, then an exact re-rank near the best) gives brute force's
/// answer on MiniLM's real table: interpolated points, sign steps, points halfway between
/// two tokens (near-ties), and the table's own rows.
#[test]
fn exact_projection_equals_brute_force_on_the_real_table() {
    let (table, d, tok) = real_table();
    let vocab = table.len() / d;
    let keep = |t: u32| !tok.is_special(t);
    let mut proj = Projector::build(&table, d, keep, "Flat", Metric::L2).unwrap();
    let row = |t: usize| &table[t * d..(t + 1) * d];
    let mut r = ChaCha8Rng::seed_from_u64(11);
    let mut q = Vec::new();
    for i in 0..400 {
        let s = r.gen_range(999..vocab);
        let j = r.gen_range(999..vocab);
        match i % 4 {
            0 => {
                let lam: f32 = r.gen_range(0.35..1.0);
                q.extend(
                    row(s)
                        .iter()
                        .zip(row(j))
                        .map(|(a, b)| lam * a + (1.0 - lam) * b),
                );
            }
            1 => {
                let eps = 10f32.powf(r.gen_range(-3.0..-1.0));
                q.extend(
                    row(s)
                        .iter()
                        .map(|&v| v + if r.gen::<bool>() { eps } else { -eps }),
                );
            }
            2 => q.extend(row(s).iter().zip(row(j)).map(|(a, b)| 0.5 * a + 0.5 * b)),
            _ => q.extend_from_slice(row(s)),
        }
    }
    let got = proj.nearest(&q).unwrap();
    for (i, qq) in q.chunks_exact(d).enumerate() {
        assert_eq!(
            got[i],
            brute_force_nearest(&table, d, keep, qq, Metric::L2),
            "query {i}"
        );
    }
    // The hinted search agrees too, whatever the hints.
    let hints: Vec<u32> = got
        .iter()
        .enumerate()
        .map(|(i, &g)| if i % 2 == 0 { g } else { 1000 + i as u32 })
        .collect();
    assert_eq!(proj.nearest_with_hints(&q, &hints).unwrap(), got);
}

/// Token replacement's k nearest neighbours on MiniLM's real table equal a brute-force
/// top-k (distances in `f64`, sorted by distance, then id), for the table's own rows (what
/// token replacement asks) and points between two tokens; FAISS's `IndexFlatL2` is
/// compared as well: it agrees on the own rows, and may differ on the near-ties.
#[test]
fn k_nearest_equals_brute_force_top_k_on_the_real_table() {
    let (table, d, tok) = real_table();
    let vocab = table.len() / d;
    let keep = |t: u32| !tok.is_special(t);
    let mut proj = Projector::build(&table, d, keep, "Flat", Metric::L2).unwrap();
    let row = |t: usize| &table[t * d..(t + 1) * d];
    let mut r = ChaCha8Rng::seed_from_u64(12);
    let mut q = Vec::new();
    for i in 0..120 {
        let (s, j) = (r.gen_range(999..vocab), r.gen_range(999..vocab));
        if i % 3 == 0 {
            q.extend(row(s).iter().zip(row(j)).map(|(a, b)| 0.5 * a + 0.5 * b));
        } else {
            q.extend_from_slice(row(s));
        }
    }
    let k = 9;
    let got = proj.nearest_k(&q, k).unwrap();
    for (i, qq) in q.chunks_exact(d).enumerate() {
        let mut all: Vec<(f64, u32)> = (0..vocab as u32)
            .filter(|&t| keep(t))
            .map(|t| (augpro::augment::exact_search::l2(row(t as usize), qq), t))
            .collect();
        all.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        let want: Vec<u32> = all[..k].iter().map(|&(_, t)| t).collect();
        assert_eq!(got[i * k..(i + 1) * k], want, "query {i}");
    }
    let faiss = proj.search(&q, k).unwrap().0;
    // Lists that differ, for the table's own rows and for the midpoints (every third query).
    let (mut rows, mut mids) = (0, 0);
    for (i, (a, b)) in faiss.chunks_exact(k).zip(got.chunks_exact(k)).enumerate() {
        if a != b {
            *(if i % 3 == 0 { &mut mids } else { &mut rows }) += 1;
        }
    }
    eprintln!(
        "FAISS IndexFlatL2 differs in {rows} of 80 own-row and {mids} of 40 midpoint top-{k} lists"
    );
    // Token replacement asks for the neighbours of the table's own rows: there FAISS's
    // answer is the exact one (so shards made through FAISS are unchanged); midpoints are
    // near-ties that its f32 distances order either way.
    assert_eq!(rows, 0, "own-row lists where FAISS differs");
}
