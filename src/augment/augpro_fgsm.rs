//! AugPro-FGSM: each example's embeddings moved by ε along the sign of the loss gradient,
//! then projected back to the vocabulary. The gradient is the teacher's on the gold label,
//! or, with a student checkpoint, that of KL(teacher ‖ student) in the student's space.

use super::arith::fgsm;
use super::{absolute_epsilon, project_rows, rows_of, token_variants};
use super::{Method, Recipe, Sources, Space, Variant};
use crate::config::FgsmConfig;
use crate::teacher::GradLoss;
use anyhow::Result;
use candle_core::Tensor;
use rand_chacha::ChaCha8Rng;

/// AugPro-FGSM with its configuration.
pub struct AugproFgsm(pub FgsmConfig);

impl Method for AugproFgsm {
    fn name(&self) -> &'static str {
        "augpro_fgsm"
    }

    fn drop_unchanged(&self) -> bool {
        self.0.drop_unchanged
    }

    fn variants(
        &self,
        space: &mut Space,
        src: &mut Sources,
        _rng: &mut ChaCha8Rng,
    ) -> Result<Vec<Variant>> {
        let ids = src.ids();
        let masks = space.masks(src.encs);
        let (projected, eps) = match space.student.take() {
            Some(mut st) => {
                let res = student_step(space, &mut st, src, &self.0, &ids, &masks);
                space.student = Some(st);
                res?
            }
            None => {
                let eps = space.epsilon(&self.0);
                let signs = src.teacher_signs(space)?;
                let embeds: Vec<Vec<f32>> = src
                    .encs
                    .iter()
                    .zip(signs.iter())
                    .map(|(e, s)| fgsm::apply(&space.embeds_of(&e.ids), s, eps))
                    .collect();
                (space.project(&ids, &embeds, &masks)?, eps)
            }
        };
        Ok(token_variants(src, projected, |_| Recipe::Step {
            epsilon: eps,
            signs: None,
        }))
    }
}

/// The step in the student's space: the gradient of KL(teacher ‖ student) (MSE to the
/// teacher for regression), projected with the student's index; returns the ids and ε.
fn student_step(
    space: &Space,
    st: &mut super::StudentSpace,
    src: &Sources,
    c: &FgsmConfig,
    ids: &[Vec<u32>],
    masks: &[Vec<bool>],
) -> Result<(Vec<Vec<u32>>, f32)> {
    let eps = absolute_epsilon(c, st.nn_scale, st.dim);
    let task = space.teacher.task;
    let signs = if task.is_regression() {
        let target: Vec<f32> = src.logits.iter().map(|l| l[0]).collect();
        space.gradient_signs(&st.model, src.encs, GradLoss::Labels(&target))?
    } else {
        let flat: Vec<f32> = src.logits.iter().flatten().copied().collect();
        let lt = Tensor::from_vec(
            flat,
            (src.logits.len(), task.num_labels),
            &space.teacher.device,
        )?;
        let p = candle_nn::ops::softmax_last_dim(&lt)?;
        space.gradient_signs(&st.model, src.encs, GradLoss::Distribution(&p))?
    };
    let embeds: Vec<Vec<f32>> = src
        .encs
        .iter()
        .zip(&signs)
        .map(|(e, s)| fgsm::apply(&rows_of(&st.table, st.dim, &e.ids), s, eps))
        .collect();
    Ok((
        project_rows(
            |q, h| st.projector.nearest_with_hints(q, h),
            st.dim,
            ids,
            &embeds,
            masks,
        )?,
        eps,
    ))
}
