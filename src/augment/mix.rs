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
