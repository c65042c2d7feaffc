//! Token replacement (TinyBERT/EDA-style baseline): each non-special token is replaced with
//! probability p by one of its k nearest neighbours in the embedding table.

use rand::Rng;

/// Picks replacements. `neighbours` holds, per position, `k + 1` nearest token ids best
/// first (the token itself usually first, and skipped). Returns the new ids.
pub fn replace(
    ids: &[u32],
    is_special: &dyn Fn(u32) -> bool,
    p: f64,
    k: usize,
    neighbours: &[u32],
    rng: &mut impl Rng,
) -> Vec<u32> {
    ids.iter()
        .enumerate()
        .map(|(i, &t)| {
            if is_special(t) || !rng.gen_bool(p) {
                return t;
            }
            let cands: Vec<u32> = neighbours[i * (k + 1)..(i + 1) * (k + 1)]
                .iter()
                .copied()
                .filter(|&c| c != t && c != crate::augment::project::MISSING)
                .take(k)
                .collect();
            if cands.is_empty() {
                t
            } else {
                cands[rng.gen_range(0..cands.len())]
            }
        })
        .collect()
}
