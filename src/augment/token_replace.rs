//! Token replacement baseline: each non-special token replaced with probability p by one of
//! its k nearest neighbours in the teacher's embedding table.

use super::arith::replace;
use super::{changed, Method, Recipe, Sources, Space, Variant};
use crate::config::ReplaceConfig;
use anyhow::Result;
use rand_chacha::ChaCha8Rng;

/// Token replacement with its configuration.
pub struct TokenReplace(pub ReplaceConfig);

impl Method for TokenReplace {
    fn name(&self) -> &'static str {
        "token_replace"
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
        let k = self.0.k;
        let nb = src.neighbours(space, k)?;
        let mut off = 0;
        Ok(src
            .encs
            .iter()
            .map(|e| {
                let per_row = &nb[off..off + e.ids.len() * (k + 1)];
                off += e.ids.len() * (k + 1);
                let ids = replace::replace(
                    &e.ids,
                    &|t| space.is_special(t),
                    self.0.p,
                    k,
                    per_row,
                    &mut *rng,
                );
                Variant::Tokens {
                    changed: changed(&e.ids, &ids),
                    ids,
                    recipe: Recipe::Replace,
                }
            })
            .collect())
    }
}
