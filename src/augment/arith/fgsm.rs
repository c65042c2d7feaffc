//! Fast-gradient-sign perturbation of word embeddings (AugPro-FGSM and the FGSM baseline).

/// Sign of each gradient component as `-1`, `0` or `1`, zero at positions not perturbed.
pub fn signs(grad: &[f32], dim: usize, perturb: &[bool]) -> Vec<i8> {
    grad.chunks_exact(dim)
        .zip(perturb)
        .flat_map(|(g, &on)| {
            g.iter().map(move |&x| {
                if !on || x == 0.0 {
                    0
                } else if x > 0.0 {
                    1
                } else {
                    -1
                }
            })
        })
        .collect()
}

/// `e + ε·sign`, the perturbed embeddings.
pub fn apply(emb: &[f32], signs: &[i8], epsilon: f32) -> Vec<f32> {
    emb.iter()
        .zip(signs)
        .map(|(&e, &s)| e + epsilon * s as f32)
        .collect()
}
