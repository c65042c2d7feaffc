//! `y = x·Wᵀ + b` whose backward computes only the gradients that are tracked: for frozen
//! weights (the teacher under FGSM) that is one GEMM instead of two.

use super::bf16::{self, PackedWeight};
use super::portable_gemm::PackedB;
use super::{contiguous, parallelism};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::{Arc, OnceLock};

/// The op: f32 (with a frozen weight's portable packing, when it has one), or with the
/// weight's bf16 packing (forward in bf16, backward in f32).
enum Linear {
    F32(Option<Arc<PortablePack>>),
    Bf16(Arc<PackedWeight>),
}

/// A frozen weight's packing for the portable product ([`super::with_portable_products`],
/// `--portable`), made on its first portable use and reused by every later forward pass
/// (packing is about a tenth of a product of the encoder's sizes). Only for a weight that
/// never changes: a trained one is packed afresh at each product.
#[derive(Default)]
pub struct PortablePack(OnceLock<PackedB>);

/// `(n, in, out)` for `x` `[n, in]`, `w` `[out, in]` and `b` `[out]`; an error for other shapes.
fn dims(x: &Shape, w: &Shape, b: &Shape) -> Result<(usize, usize, usize)> {
    match (x.dims(), w.dims(), b.dims()) {
        (&[n, k], &[m, k2], &[m2]) if k == k2 && m == m2 => Ok((n, k, m)),
        _ => candle_core::bail!(
            "linear: x {x:?}, w {w:?} and b {b:?} are not [n, in], [out, in] and [out]"
        ),
    }
}

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, k, m) = dims(lx.shape(), lw.shape(), lb.shape())?;
        let (x, w, b) = (
            contiguous(sx, lx)?,
            contiguous(sw, lw)?,
            contiguous(sb, lb)?,
        );
        let frozen = match self {
            Linear::F32(frozen) => frozen,
            Linear::Bf16(packed) => {
                if packed.dims() != (m, k) {
                    candle_core::bail!("linear: packed weight {:?}, not [{m}, {k}]", packed.dims());
                }
                let y = bf16::linear(x, packed, b);
                return Ok((CpuStorage::F32(y), Shape::from((n, m))));
            }
        };
        let mut y = Vec::with_capacity(n * m);
        for _ in 0..n {
            y.extend_from_slice(b);
        }
        if n > 0 && m > 0 && super::portable() {
            use super::portable_gemm::{matmul, matmul_packed, Strided};
            let (sx, sw) = (Strided::row_major(x, n, k), Strided::row_major(w, m, k).t());
            let parallel = rayon::current_num_threads() > 1;
            match frozen {
                Some(pack) => {
                    let packed = pack.0.get_or_init(|| PackedB::new(sw, parallel));
                    matmul_packed(sx, (sw, packed), &mut y, m, true, parallel)
                }
                None => matmul(sx, sw, &mut y, m, true, parallel),
            }
        } else if n > 0 && m > 0 {
            dense_product(&mut y, x, w, (n, k, m));
        }
        Ok((CpuStorage::F32(y), Shape::from((n, m))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let gx = x.track_op().then(|| product(g, w, false)).transpose()?;
        let gw = w.track_op().then(|| product(g, x, true)).transpose()?;
        let gb = b
            .track_op()
            .then(|| g.contiguous()?.apply_op1_no_bwd(&ColumnSums))
            .transpose()?;
        Ok((gx, gw, gb))
    }
}

/// `y += x·Wᵀ` by the `gemm` crate for `x` `[n, k]`, `W` `[m, k]` and `y` `[n, m]`, all
/// row-major. Where [`transposed_weight`] says so, `W` goes in as `Wᵀ` `[k, m]` (transposed
/// in parallel): `gemm` then packs it in its worker threads instead of on the calling
/// thread, which otherwise leaves the other threads idle; the products are the same, and
/// so are the bits.
fn dense_product(y: &mut [f32], x: &[f32], w: &[f32], (n, k, m): (usize, usize, usize)) {
    if transposed_weight(n, k, m) {
        gemm_into(y, x, (&transpose(w, m, k), 1, m as isize), (n, k, m));
    } else {
        gemm_into(y, x, (w, k as isize, 1), (n, k, m));
    }
}

/// `y += x·B` by the `gemm` crate for `x` `[n, k]` and `y` `[n, m]` row-major, and `B`
/// `[k, m]` as a buffer of `m·k` values with its column and row strides: `(1, m)` (row-major,
/// `Wᵀ`) or `(k, 1)` (`W` `[m, k]` read transposed).
fn gemm_into(
    y: &mut [f32],
    x: &[f32],
    (b, b_cs, b_rs): (&[f32], isize, isize),
    (n, k, m): (usize, usize, usize),
) {
    let layouts = [(1, m as isize), (k as isize, 1)];
    assert!(
        y.len() == n * m && x.len() == n * k && b.len() == m * k && layouts.contains(&(b_cs, b_rs)),
        "gemm_into: buffers do not hold [{n}, {m}], [{n}, {k}] and [{k}, {m}] with strides ({b_cs}, {b_rs})"
    );
    // SAFETY: asserted above: `y` holds [n, m], `x` [n, k] and `b` [k, m] (element (i, j) at
    // i·b_rs + j·b_cs < m·k in either layout), so the strides stay within each buffer; `y`
    // is borrowed mutably, so unshared.
    unsafe {
        gemm::gemm(
            n,
            m,
            k,
            y.as_mut_ptr(),
            1,
            m as isize,
            true,
            x.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            b_cs,
            b_rs,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism(),
        );
    }
}

/// Whether [`dense_product`] gives `gemm` the weight transposed: where `gemm` would pack it
/// on the calling thread (at most 512 outputs), and only where both layouts take `gemm`'s
/// blocked path, whose arithmetic does not depend on the layout (its small-product, gemv
/// and gevv paths, for at most 256 outputs in all, one row or column, or `k` ≤ 2, would
/// differ).
fn transposed_weight(n: usize, k: usize, m: usize) -> bool {
    n >= 2 && m >= 2 && k > 2 && n * m > 256 && m <= 512
}

/// `W` `[m, k]` as `Wᵀ` `[k, m]`, blocks of rows of `Wᵀ` in parallel.
fn transpose(w: &[f32], m: usize, k: usize) -> Vec<f32> {
    const ROWS: usize = 16;
    let mut wt = vec![0f32; k * m];
    wt.par_chunks_mut(ROWS * m)
        .enumerate()
        .for_each(|(block, dst)| {
            let first = block * ROWS;
            let rows = dst.len() / m;
            for (j, row) in w.chunks_exact(k).enumerate() {
                for (r, &v) in row[first..first + rows].iter().enumerate() {
                    dst[r * m + j] = v;
                }
            }
        });
    wt
}

/// `a·b` (`aᵀ·b` when `transpose_a`) of two matrices: candle's product, or the portable
/// one inside [`super::with_portable_products`].
fn product(a: &Tensor, b: &Tensor, transpose_a: bool) -> Result<Tensor> {
    if super::portable() {
        return a
            .contiguous()?
            .apply_op2_no_bwd(&b.contiguous()?, &PortableProduct { transpose_a });
    }
    match transpose_a {
        true => a.t()?.matmul(b),
        false => a.matmul(b),
    }
}

/// The product of two contiguous matrices by [`super::portable_gemm`].
struct PortableProduct {
    transpose_a: bool,
}

impl CustomOp2 for PortableProduct {
    fn name(&self) -> &'static str {
        "portable-product"
    }

    fn cpu_fwd(
        &self,
        sa: &CpuStorage,
        la: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        use super::portable_gemm::{matmul, Strided};
        let ((ra, ca), (rb, cb)) = (la.shape().dims2()?, lb.shape().dims2()?);
        let a = Strided::row_major(contiguous(sa, la)?, ra, ca);
        let a = if self.transpose_a { a.t() } else { a };
        if a.cols != rb {
            candle_core::bail!("product: [{}, {}] by [{rb}, {cb}]", a.rows, a.cols);
        }
        let b = Strided::row_major(contiguous(sb, lb)?, rb, cb);
        let mut c = vec![0f32; a.rows * cb];
        matmul(a, b, &mut c, cb, false, rayon::current_num_threads() > 1);
        Ok((CpuStorage::F32(c), Shape::from((a.rows, cb))))
    }
}

/// Column sums of a `[n, m]` matrix (the bias gradient): each column adds its rows in order
/// from zero, as candle's `sum(0)` does, so the bits are the same; column blocks in parallel.
struct ColumnSums;

/// Columns per parallel task of [`ColumnSums`].
const SUM_COLUMNS: usize = 64;

impl CustomOp1 for ColumnSums {
    fn name(&self) -> &'static str {
        "column-sums"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, m) = l.shape().dims2()?;
        let g = contiguous(s, l)?;
        let mut sums = vec![0f32; m];
        sums.par_chunks_mut(SUM_COLUMNS)
            .enumerate()
            .for_each(|(block, dst)| {
                let columns = block * SUM_COLUMNS..block * SUM_COLUMNS + dst.len();
                for row in g.chunks_exact(m) {
                    for (d, v) in dst.iter_mut().zip(&row[columns.clone()]) {
                        *d += v;
                    }
                }
            });
        Ok((CpuStorage::F32(sums), Shape::from(m)))
    }
}

/// `x·Wᵀ + b` for `x` of shape `[n, in]`, `W` `[out, in]`, `b` `[out]` (CPU, `f32`); an
/// error for other shapes. `frozen`: where a weight that never changes keeps its portable
/// packing.
pub fn linear(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    frozen: Option<&Arc<PortablePack>>,
) -> Result<Tensor> {
    dims(x.shape(), w.shape(), b.shape())?;
    let op = Linear::F32(frozen.cloned());
    x.contiguous()?
        .apply_op3(&w.contiguous()?, &b.contiguous()?, op)
}

/// [`linear`] with the forward product in bf16 (f32 accumulation) from `packed`, `W`
/// rounded and packed once ([`PackedWeight::new`]); the backward pass uses `W` in f32.
pub fn linear_bf16(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    packed: &Arc<PackedWeight>,
) -> Result<Tensor> {
    dims(x.shape(), w.shape(), b.shape())?;
    x.contiguous()?.apply_op3(
        &w.contiguous()?,
        &b.contiguous()?,
        Linear::Bf16(packed.clone()),
    )
}

/// `W` `[out, in]` (CPU, f32) rounded to bf16 and packed for [`linear_bf16`].
pub fn pack_bf16(w: &Tensor) -> Result<Arc<PackedWeight>> {
    let (out, inputs) = w.dims2()?;
    let v: Vec<f32> = w.flatten_all()?.to_vec1()?;
    Ok(Arc::new(PackedWeight::new(&v, out, inputs)))
}

#[cfg(test)]
mod tests {
    use super::super::testing::{assert_close, randn, rng};
    use super::*;
    use candle_core::{DType, Device, Var};

    #[test]
    fn matches_candle_forward_and_backward() -> Result<()> {
        let mut r = rng(3);
        let x = Var::from_tensor(&randn(&mut r, 0.0, 1.0, (50, 48)))?;
        let w = Var::from_tensor(&randn(&mut r, 0.0, 0.2, (70, 48)))?;
        let b = Var::from_tensor(&randn(&mut r, 0.0, 0.2, 70))?;
        let g = randn(&mut r, 0.0, 1.0, (50, 70));
        let ours = linear(x.as_tensor(), w.as_tensor(), b.as_tensor(), None)?;
        let theirs = x
            .as_tensor()
            .matmul(&w.as_tensor().t()?)?
            .broadcast_add(b.as_tensor())?;
        // Both sum 48 products of typical size |x·w| ≈ 0.2 in another order: rounding of
        // about 48·6e-8 of Σ|x·w| ≈ 8, so 1e-5 absolute (and 1e-5 of the value) is ample.
        assert_close(&ours, &theirs, 1e-5, 1e-5, "forward")?;
        let g1 = ours.mul(&g)?.sum_all()?.backward()?;
        let g2 = theirs.mul(&g)?.sum_all()?.backward()?;
        // The gradients sum 50 or 70 products of size up to ~1: a floor ten times higher.
        for (v, what) in [(&x, "x"), (&w, "w"), (&b, "b")] {
            let (a, b) = (g1.get(v).unwrap(), g2.get(v).unwrap());
            assert_close(a, b, 1e-5, 1e-4, &format!("gradient of {what}"))?;
        }
        Ok(())
    }

    /// The weight given to `gemm` transposed gives the bits of the plain layout, at the
    /// encoder's shapes and around the bounds of [`transposed_weight`].
    #[test]
    fn a_transposed_weight_gives_the_same_bits() -> Result<()> {
        let mut r = rng(12);
        let shapes = [
            (384, 1152),
            (384, 384),
            (384, 1536),
            (1536, 384),
            (384, 2),
            (96, 16),
            (3, 130),
        ];
        for (k, m) in shapes {
            for n in [1, 2, 7, 16, 17, 33, 421, 1687] {
                let x: Vec<f32> = randn(&mut r, 0.0, 1.0, (n, k)).flatten_all()?.to_vec1()?;
                let w: Vec<f32> = randn(&mut r, 0.0, 0.05, (m, k)).flatten_all()?.to_vec1()?;
                let start: Vec<f32> = randn(&mut r, 0.0, 0.05, (n, m)).flatten_all()?.to_vec1()?;
                let mut got = start.clone();
                dense_product(&mut got, &x, &w, (n, k, m));
                let mut want = start;
                gemm_into(&mut want, &x, (&w, k as isize, 1), (n, k, m));
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert!(bits(&got) == bits(&want), "n {n}, k {k}, m {m}");
            }
        }
        assert!(transposed_weight(421, 384, 384) && !transposed_weight(421, 384, 1152));
        Ok(())
    }

    #[test]
    fn column_sums_have_the_bits_of_candles_sum() -> Result<()> {
        let mut r = rng(6);
        for (n, m) in [(1664, 384), (37, 1536), (5, 70), (1, 3)] {
            let g = randn(&mut r, 0.0, 1.0, (n, m));
            let want: Vec<f32> = g.sum(0)?.to_vec1()?;
            let got: Vec<f32> = g.apply_op1_no_bwd(&ColumnSums)?.to_vec1()?;
            assert_eq!(got, want, "[{n}, {m}]");
        }
        let strided = randn(&mut r, 0.0, 1.0, (70, 50)).t()?;
        let want: Vec<f32> = strided.sum(0)?.to_vec1()?;
        let got: Vec<f32> = strided
            .contiguous()?
            .apply_op1_no_bwd(&ColumnSums)?
            .to_vec1()?;
        assert_eq!(got, want, "a transposed input");
        Ok(())
    }

    #[test]
    fn frozen_weights_get_no_gradient() -> Result<()> {
        let mut r = rng(4);
        let x = Var::from_tensor(&randn(&mut r, 0.0, 1.0, (5, 8)))?;
        let w = randn(&mut r, 0.0, 0.2, (3, 8));
        let b = Tensor::zeros(3, DType::F32, &Device::Cpu)?;
        let grads = linear(x.as_tensor(), &w, &b, None)?.sum_all()?.backward()?;
        assert!(grads.get(&w).is_none() && grads.get(&b).is_none());
        let want = w.sum(0)?.unsqueeze(0)?.broadcast_as((5, 8))?;
        assert_close(grads.get(&x).unwrap(), &want, 1e-6, 1e-6, "gradient of x")
    }

    #[test]
    fn mismatched_shapes_are_an_error() -> Result<()> {
        let mut r = rng(5);
        let x = randn(&mut r, 0.0, 1.0, (5, 8));
        let (w, b) = (randn(&mut r, 0.0, 1.0, (3, 8)), randn(&mut r, 0.0, 1.0, 3));
        let cases = [
            (x.t()?, w.clone(), b.clone()),
            (x.clone(), w.t()?, b.clone()),
            (x.clone(), w.clone(), randn(&mut r, 0.0, 1.0, 4)),
            (x.clone(), w.clone(), randn(&mut r, 0.0, 1.0, (1, 3))),
            (x.flatten_all()?, w.clone(), b.clone()),
        ];
        for (x, w, b) in cases {
            let e = linear(&x, &w, &b, None).unwrap_err().to_string();
            assert!(e.contains("are not [n, in], [out, in] and [out]"), "{e}");
        }
        Ok(())
    }

    /// A frozen weight's portable packing, made once and reused, gives the bits of the
    /// portable product packed afresh, on every instruction set (one packed for another
    /// is packed again), and is not made outside the portable products.
    #[test]
    fn a_kept_portable_packing_gives_the_same_bits() -> Result<()> {
        use super::super::portable_gemm::{with_isa, Isa};
        use super::super::with_portable_products;
        let mut r = rng(11);
        let x = randn(&mut r, 0.0, 1.0, (37, 96));
        let (w, b) = (
            randn(&mut r, 0.0, 0.2, (70, 96)),
            randn(&mut r, 0.0, 0.2, 70),
        );
        let bits = |t: Tensor| -> Result<Vec<u32>> {
            Ok(t.flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .map(|v| v.to_bits())
                .collect())
        };
        let pack = Arc::new(PortablePack::default());
        linear(&x, &w, &b, Some(&pack))?;
        assert!(
            pack.0.get().is_none(),
            "packed outside the portable products"
        );
        let fresh = with_portable_products(|| linear(&x, &w, &b, None)).map(bits)??;
        for isa in Isa::available().into_iter().chain(Isa::available()) {
            let kept = with_isa(isa, || {
                with_portable_products(|| linear(&x, &w, &b, Some(&pack)))
            });
            assert!(bits(kept?)? == fresh, "{isa:?}");
            assert!(pack.0.get().is_some());
        }
        Ok(())
    }

    #[test]
    fn empty_inner_dimension_gives_the_bias() -> Result<()> {
        let d = Device::Cpu;
        let (x, w) = (
            Tensor::zeros((4, 0), DType::F32, &d)?,
            Tensor::zeros((3, 0), DType::F32, &d)?,
        );
        let b = Tensor::new(&[1f32, -2.0, 3.0], &d)?;
        let y = linear(&x, &w, &b, None)?;
        assert_eq!(y.to_vec2::<f32>()?, vec![vec![1.0, -2.0, 3.0]; 4]);
        Ok(())
    }
}
