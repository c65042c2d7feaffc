//! FGSM baseline: each example's embeddings moved by ε along the sign of the teacher's loss
//! gradient, not projected (a virtual input the student rebuilds from the stored signs).

use super::arith::fgsm;
use super::{Method, Recipe, Sources, Space, Variant};
use crate::config::FgsmConfig;
use anyhow::Result;
use rand_chacha::ChaCha8Rng;

/// FGSM with its configuration.
pub struct Fgsm(pub FgsmConfig);

impl Method for Fgsm {
    fn name(&self) -> &'static str {
        "fgsm"
    }

    fn variants(
        &self,
        space: &mut Space,
        src: &mut Sources,
        _rng: &mut ChaCha8Rng,
    ) -> Result<Vec<Variant>> {
        let eps = space.epsilon(&self.0);
        let signs = src.teacher_signs(space)?;
        Ok(src
            .encs
            .iter()
            .zip(signs.iter())
            .map(|(e, s)| Variant::Virtual {
                embeds: fgsm::apply(&space.embeds_of(&e.ids), s, eps),
                recipe: Recipe::Step {
                    epsilon: eps,
                    signs: Some(s.clone()),
                },
            })
            .collect())
    }
}
