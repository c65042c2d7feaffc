//! The gradient of a trainable embedding table as the rows one training step looked up.
//!
//! candle's backward of `index_select` gives the table a dense `[vocab, hidden]` gradient:
//! every step allocates, zeroes and copies the whole table (30522 × 384 floats for MiniLM),
//! and the gradient norm then squares and sums all of it, on one thread, for the few hundred
//! rows a batch uses. Here a lookup is recorded as a leaf variable instead; after the backward
//! pass its gradient is summed into the rows it used, in the order candle's `index_add`
//! would have used, so the row values, the gradient norm and the AdamW update have the same
//! bits as on the dense gradient.

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, TensorId, Var};

/// Lanes of candle's vectorised sum (`vec_reduce_sum`, 32 on x86-64, 16 on Arm): a table
/// whose rows are a multiple of this wide gives each lane the same elements, in the same
/// order, whether its zero rows are summed or skipped.
const SUM_LANES: usize = 32;

/// One recorded lookup: `table[ids]`, as the leaf variable `rows`.
struct Lookup {
    table: Tensor,
    ids: Vec<u32>,
    rows: Var,
}

/// The embedding lookups of one training step whose gradients are kept as rows.
#[derive(Default)]
pub struct Lookups(Vec<Lookup>);

impl Lookups {
    /// Whether the gradient of `table` can be gathered as rows with the bits of the dense
    /// path: a trainable CPU `f32` table whose rows are whole lanes of candle's sum.
    pub fn applies_to(table: &Tensor) -> bool {
        table.is_variable()
            && table.device().is_cpu()
            && table.dtype() == candle_core::DType::F32
            && table.dims().len() == 2
            && table.dims()[1].is_multiple_of(SUM_LANES)
    }

    /// How many lookups are recorded.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether no lookup is recorded.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `table[ids]` (ids `[n]`), recorded so that [`Lookups::row_grads`] gives the table its
    /// gradient; `table` must satisfy [`Lookups::applies_to`].
    pub fn select(&mut self, table: &Tensor, ids: &Tensor) -> Result<Tensor> {
        let selected = table.detach().index_select(ids, 0)?;
        let rows = Var::from_tensor(&selected)?;
        let out = rows.as_tensor().clone();
        self.0.push(Lookup {
            table: table.clone(),
            ids: ids.to_vec1()?,
            rows,
        });
        Ok(out)
    }

    /// The tables' gradients from the backward pass of `loss`, one [`RowGrad`] per table, the
    /// lookups' own gradients taken out of `grads`. Lookups are summed in the order in which
    /// candle's backward pass would have reached their `index_select`s.
    pub fn row_grads(self, loss: &Tensor, grads: &mut GradStore) -> Result<Vec<RowGrad>> {
        if self.0.is_empty() {
            return Ok(Vec::new());
        }
        let order: Vec<TensorId> = loss.sorted_nodes().iter().map(|t| t.id()).collect();
        let mut used: Vec<(usize, Lookup, Tensor)> = Vec::new();
        for l in self.0 {
            let at = order.iter().position(|&id| id == l.rows.as_tensor().id());
            if let (Some(at), Some(g)) = (at, grads.remove(l.rows.as_tensor())) {
                used.push((at, l, g));
            }
        }
        used.sort_by_key(|(at, _, _)| *at);
        let mut tables: Vec<&Tensor> = Vec::new();
        for (_, l, _) in &used {
            if tables.iter().all(|t| t.id() != l.table.id()) {
                tables.push(&l.table);
            }
        }
        let row_grad = |table: &Tensor| -> Result<RowGrad> {
            let parts: Vec<(&[u32], Vec<f32>)> = used
                .iter()
                .filter(|(_, l, _)| l.table.id() == table.id())
                .map(|(_, l, g)| Ok((l.ids.as_slice(), g.flatten_all()?.to_vec1()?)))
                .collect::<Result<_>>()?;
            RowGrad::sum(table, &parts)
        };
        tables.into_iter().map(row_grad).collect()
    }
}

/// The gradient of an embedding table: `values` holds the rows in `rows` (ascending), every
/// other row is zero.
pub struct RowGrad {
    table: Tensor,
    rows: Vec<u32>,
    /// Where each table row's values start in `values`, `None` for a zero row.
    slot: Vec<Option<u32>>,
    values: Vec<f32>,
    width: usize,
}

impl RowGrad {
    /// Sums the gradients of lookups `(ids, gradient [ids.len() × width])` of `table` into
    /// rows, one lookup after another and position by position, from zero: the additions of
    /// candle's `index_add` into a zero gradient.
    fn sum(table: &Tensor, parts: &[(&[u32], Vec<f32>)]) -> Result<Self> {
        let (vocab, width) = table.dims2()?;
        let mut rows: Vec<u32> = parts
            .iter()
            .flat_map(|(ids, _)| ids.iter().copied())
            .collect();
        rows.sort_unstable();
        rows.dedup();
        if let Some(&bad) = rows.iter().find(|&&r| r as usize >= vocab) {
            candle_core::bail!("embedding lookup of row {bad} in a table of {vocab} rows");
        }
        let mut slot = vec![None; vocab];
        for (i, &r) in rows.iter().enumerate() {
            slot[r as usize] = Some(i as u32);
        }
        let mut values = vec![0f32; rows.len() * width];
        for (ids, g) in parts {
            for (p, &id) in ids.iter().enumerate() {
                let at = slot[id as usize].expect("every looked-up row has a slot") as usize;
                let dst = &mut values[at * width..(at + 1) * width];
                for (d, &s) in dst.iter_mut().zip(&g[p * width..(p + 1) * width]) {
                    *d += s;
                }
            }
        }
        Ok(Self {
            table: table.clone(),
            rows,
            slot,
            values,
            width,
        })
    }

    /// Whether this is the gradient of `var`.
    pub fn is_for(&self, var: &Var) -> bool {
        self.table.id() == var.as_tensor().id()
    }

    /// The gradient of table row `r`, `None` where it is zero.
    pub fn row(&self, r: usize) -> Option<&[f32]> {
        let at = self.slot[r]? as usize;
        Some(&self.values[at * self.width..(at + 1) * self.width])
    }

    /// Row width (the table's second dimension).
    pub fn width(&self) -> usize {
        self.width
    }

    /// The squared L2 norm as a scalar tensor, with the bits of `dense.sqr()?.sum_all()?`:
    /// candle sums the rows' lanes in row order, and zero rows add nothing.
    pub fn sum_of_squares(&self) -> Result<Tensor> {
        let used = Tensor::from_slice(&self.values, (self.rows.len(), self.width), &self.dev())?;
        used.sqr()?.sum_all()
    }

    /// The dense gradient `[vocab, width]`, for an optimiser that needs one.
    pub fn to_dense(&self) -> Result<Tensor> {
        let mut dense = vec![0f32; self.slot.len() * self.width];
        for (i, &r) in self.rows.iter().enumerate() {
            let r = r as usize;
            dense[r * self.width..(r + 1) * self.width]
                .copy_from_slice(&self.values[i * self.width..(i + 1) * self.width]);
        }
        Tensor::from_vec(dense, (self.slot.len(), self.width), &self.dev())
    }

    /// The table this is the gradient of.
    pub fn table(&self) -> &Tensor {
        &self.table
    }

    fn dev(&self) -> candle_core::Device {
        self.table.device().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{randn, rng};
    use super::super::AdamW;
    use super::*;

    /// Ids with many repeats, so that the order of the additions shows in the bits.
    fn ids(seed: u32, n: usize, vocab: u32) -> Tensor {
        let v: Vec<u32> = (0..n as u32).map(|i| (i * 7 + seed) % vocab / 3).collect();
        Tensor::new(v, &candle_core::Device::Cpu).expect("ids")
    }

    /// A MixUp-shaped loss over two lookups of one table: `f(λ·a + (1−λ)·b)`.
    fn loss(a: &Tensor, b: &Tensor, w: &Tensor) -> Result<Tensor> {
        let mixed = ((a * 0.7)? + (b * 0.3)?)?;
        mixed.tanh()?.broadcast_mul(w)?.sqr()?.sum_all()
    }

    #[test]
    fn row_gradients_have_the_bits_of_the_dense_gradient_norm_and_update() -> Result<()> {
        let mut r = rng(21);
        let init = randn(&mut r, 0.0, 1.0, (97, 64));
        let w = randn(&mut r, 0.0, 1.0, (1, 64));
        let (ia, ib) = (ids(0, 300, 97), ids(5, 300, 97));

        let dense_var = Var::from_tensor(&init)?;
        let t = dense_var.as_tensor();
        let l = loss(&t.index_select(&ia, 0)?, &t.index_select(&ib, 0)?, &w)?;
        let dense_grads = l.backward()?;
        let dense = dense_grads.get(t).expect("a dense gradient");

        let rows_var = Var::from_tensor(&init.copy()?)?;
        let t = rows_var.as_tensor();
        assert!(Lookups::applies_to(t));
        let mut lookups = Lookups::default();
        let (a, b) = (lookups.select(t, &ia)?, lookups.select(t, &ib)?);
        let l = loss(&a, &b, &w)?;
        let mut grads = l.backward()?;
        let rows = lookups.row_grads(&l, &mut grads)?;
        assert_eq!(rows.len(), 1);
        assert!(rows[0].is_for(&rows_var) && grads.get(t).is_none());

        same_bits(&rows[0].to_dense()?, dense, "row values")?;
        let norm = rows[0].sum_of_squares()?;
        same_bits(&norm, &dense.sqr()?.sum_all()?, "squared norm")?;
        assert!(
            (0..97).any(|r| rows[0].row(r).is_none()),
            "some rows unused"
        );

        let mut on_dense = AdamW::new(vec![(dense_var.clone(), 0.01)], 0.9, 0.999, 1e-8)?;
        let mut on_rows = AdamW::new(vec![(rows_var.clone(), 0.01)], 0.9, 0.999, 1e-8)?;
        for _ in 0..2 {
            on_dense.step_scaled(&dense_grads, &[], 1e-2, Some(0.3))?;
            on_rows.step_scaled(&grads, &rows, 1e-2, Some(0.3))?;
        }
        same_bits(rows_var.as_tensor(), dense_var.as_tensor(), "update")
    }

    /// Asserts that `a` and `b` hold the same bits, naming the first element that differs.
    fn same_bits(a: &Tensor, b: &Tensor, what: &str) -> Result<()> {
        let (a, b): (Vec<f32>, Vec<f32>) =
            (a.flatten_all()?.to_vec1()?, b.flatten_all()?.to_vec1()?);
        assert_eq!(a.len(), b.len(), "{what}: sizes differ");
        if let Some(i) = (0..a.len()).find(|&i| a[i].to_bits() != b[i].to_bits()) {
            panic!(
                "{what}: element {i} is {} here and {} on the dense path",
                a[i], b[i]
            );
        }
        Ok(())
    }

    #[test]
    fn tables_of_other_widths_or_frozen_are_not_gathered_as_rows() -> Result<()> {
        let t = randn(&mut rng(22), 0.0, 1.0, (10, 48));
        assert!(!Lookups::applies_to(
            &Var::from_tensor(&t)?.as_tensor().clone()
        ));
        let t = randn(&mut rng(22), 0.0, 1.0, (10, 64));
        assert!(!Lookups::applies_to(&t), "a frozen table");
        Ok(())
    }
}
