//! Segment-aligned interpolation of word embeddings (AugPro-Mix and the MixUp baseline).

use rand::Rng;
use rand_distr::{Beta, Distribution};

/// For each primary position, the partner position it is mixed with, or `None` where the
/// primary's token stays (special tokens, padding, or where the partner's segment is shorter).
/// Positions are paired in order within each segment (A with A', B with B').
pub fn align(
    primary_ids: &[u32],
    primary_types: &[u8],
    partner_ids: &[u32],
    partner_types: &[u8],
    is_special: &dyn Fn(u32) -> bool,
) -> Vec<Option<usize>> {
    let positions = |ids: &[u32], types: &[u8], seg: u8| -> Vec<usize> {
        (0..ids.len())
            .filter(|&i| types[i] == seg && !is_special(ids[i]))
            .collect()
    };
    let mut out = vec![None; primary_ids.len()];
    for seg in 0..=1u8 {
        let p = positions(primary_ids, primary_types, seg);
        let q = positions(partner_ids, partner_types, seg);
        for (a, b) in p.iter().zip(q.iter()) {
            out[*a] = Some(*b);
        }
    }
    out
}

/// Draws λ = `lambda_min + (1 - lambda_min)·B` with B ~ Beta(α, α), so λ ∈ [lambda_min, 1]
/// and the primary example keeps at least that weight.
pub fn draw_lambda(rng: &mut impl Rng, alpha: f64, lambda_min: f64) -> f32 {
    let b = Beta::new(alpha, alpha)
        .map(|b| b.sample(rng))
        .unwrap_or(0.5);
    (lambda_min + (1.0 - lambda_min) * b) as f32
}

/// Mixes embeddings position by position: `λ·E(primary) + (1-λ)·E(partner)` where aligned,
/// the primary's embedding elsewhere. `lambdas` holds one λ per primary position.
pub fn mix(
    table: &[f32],
    dim: usize,
    primary_ids: &[u32],
    partner_ids: &[u32],
    alignment: &[Option<usize>],
    lambdas: &[f32],
) -> Vec<f32> {
    let mut out = Vec::with_capacity(primary_ids.len() * dim);
    for (i, &t) in primary_ids.iter().enumerate() {
        let e = &table[t as usize * dim..(t as usize + 1) * dim];
        match alignment[i] {
            Some(j) => {
                let l = lambdas[i];
                let f = &table[partner_ids[j] as usize * dim..(partner_ids[j] as usize + 1) * dim];
                out.extend(e.iter().zip(f).map(|(a, b)| l * a + (1.0 - l) * b));
            }
            None => out.extend_from_slice(e),
        }
    }
    out
}

/// What both mixing methods make of a batch: each example's partner, its λ (sequence mode;
/// `None` per position), its mixed embeddings and which positions were mixed.
pub(in crate::augment) struct Mixed {
    pub partners: Vec<usize>,
    pub lambdas: Vec<Option<f32>>,
    pub per_position: Vec<Vec<f32>>,
    pub embeds: Vec<Vec<f32>>,
    pub masks: Vec<Vec<bool>>,
}

/// Mixes every example of the batch with a partner drawn at random among the others, in
/// the teacher's embedding space; `None` for a batch of one (no partner but itself).
pub(in crate::augment) fn mix_batch(
    space: &crate::augment::Space,
    src: &crate::augment::Sources,
    c: &crate::config::MixConfig,
    rng: &mut rand_chacha::ChaCha8Rng,
) -> Option<Mixed> {
    use crate::config::LambdaMode;
    let encs = src.encs;
    let n = encs.len();
    if n < 2 {
        return None;
    }
    let partners: Vec<usize> = (0..n)
        .map(|i| {
            let j = rng.gen_range(0..n - 1);
            if j >= i {
                j + 1
            } else {
                j
            }
        })
        .collect();
    let mut m = Mixed {
        partners,
        lambdas: Vec::with_capacity(n),
        per_position: Vec::with_capacity(n),
        embeds: Vec::with_capacity(n),
        masks: Vec::with_capacity(n),
    };
    for (i, e) in encs.iter().enumerate() {
        let p = &encs[m.partners[i]];
        let al = align(&e.ids, &e.type_ids, &p.ids, &p.type_ids, &|t| {
            space.is_special(t)
        });
        let (lam, per_pos): (Option<f32>, Vec<f32>) = match c.lambda_mode {
            LambdaMode::Sequence => {
                let l = draw_lambda(&mut *rng, c.alpha, c.lambda_min);
                (Some(l), vec![l; e.ids.len()])
            }
            LambdaMode::Position => (
                None,
                (0..e.ids.len())
                    .map(|_| draw_lambda(&mut *rng, c.alpha, c.lambda_min))
                    .collect(),
            ),
        };
        m.embeds
            .push(mix(&space.table, space.dim, &e.ids, &p.ids, &al, &per_pos));
        m.masks.push(al.iter().map(|a| a.is_some()).collect());
        m.lambdas.push(lam);
        m.per_position.push(per_pos);
    }
    Some(m)
}
