//! AugPro-Mix: each example's embeddings mixed with a random partner's, then projected back
//! to the vocabulary.

use super::arith::mix;
use super::{token_variants, Method, Recipe, Sources, Space, Variant};
use crate::config::MixConfig;
use anyhow::Result;
use rand_chacha::ChaCha8Rng;

/// AugPro-Mix with its configuration.
pub struct AugproMix(pub MixConfig);

impl Method for AugproMix {
    fn name(&self) -> &'static str {
        "augpro_mix"
    }

    fn copies(&self) -> usize {
        self.0.copies
    }

    fn drop_unchanged(&self) -> bool {
        self.0.drop_unchanged
    }

    fn variants(
        &self,
        space: &mut Space,
        src: &mut Sources,
        rng: &mut ChaCha8Rng,
    ) -> Result<Vec<Variant>> {
        let Some(m) = mix::mix_batch(space, src, &self.0, rng) else {
            return Ok(Vec::new());
        };
        let projected = space.project(&src.ids(), &m.embeds, &m.masks)?;
        Ok(token_variants(src, projected, |i| Recipe::Mix {
            partner: m.partners[i],
            lambda: m.lambdas[i],
            lambdas: None,
        }))
    }
}
