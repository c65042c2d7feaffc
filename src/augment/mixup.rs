//! MixUp baseline: each example's embeddings mixed with a random partner's, not projected
//! (a virtual input the student rebuilds from the partner's tokens and λ).

use super::arith::mix;
use super::{Method, Recipe, Sources, Space, Variant};
use crate::config::MixConfig;
use anyhow::Result;
use rand_chacha::ChaCha8Rng;

/// MixUp with its configuration.
pub struct Mixup(pub MixConfig);

impl Method for Mixup {
    fn name(&self) -> &'static str {
        "mixup"
    }

    fn copies(&self) -> usize {
        self.0.copies
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
        let mut per_position = m.per_position.into_iter();
        Ok(m.embeds
            .into_iter()
            .enumerate()
            .map(|(i, embeds)| {
                let lambdas = per_position.next().expect("one per example");
                Variant::Virtual {
                    embeds,
                    recipe: Recipe::Mix {
                        partner: m.partners[i],
                        lambda: m.lambdas[i],
                        lambdas: m.lambdas[i].is_none().then_some(lambdas),
                    },
                }
            })
            .collect())
    }
}
