//! Fast CPU kernels for the encoder, as candle custom ops with their own backward passes:
//! a dense layer whose backward computes only the gradients that are needed (none for
//! frozen weights), attention split over (batch × head) across threads, a vectorised erf
//! GELU and a fused LayerNorm. Each has a test against candle's plain ops. Other devices
//! use candle's standard ops (the model chooses once, from the device). [`portable_gemm`]
//! is an f32 product with the same bits on every x86-64 CPU, measured in `make bench`
//! beside the `gemm` crate. [`Lookups`] keeps a trained embedding table's gradient as the
//! rows a step used.

mod adamw;
mod attention;
pub mod bf16;
mod gelu;
mod linear;
mod math;
mod norm;
pub mod portable_gemm;
mod sparse_embedding;

pub use adamw::AdamW;
pub use attention::{attention, Seqs};
pub use gelu::gelu_erf;
pub use linear::{linear, linear_bf16, pack_bf16, PortablePack};
pub use norm::layer_norm;
pub use sparse_embedding::{Lookups, RowGrad};

use candle_core::{CpuStorage, DType, Device, Layout};
use std::sync::atomic::{AtomicBool, Ordering};

static ENABLED: AtomicBool = AtomicBool::new(true);

thread_local! {
    /// Whether kernels called from this thread take their f32 products from
    /// [`portable_gemm`] (see [`with_portable_products`]).
    static PORTABLE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with the f32 products of the dense layers and attention, forward and backward,
/// from [`portable_gemm`], whose bits do not depend on the CPU's instruction set, for
/// kernels called from this thread. `make bench` measures the forward and a fine-tuning
/// step both ways.
pub fn with_portable_products<R>(f: impl FnOnce() -> R) -> R {
    with_thread_local(&PORTABLE, true, f)
}

/// Runs `f` with this thread's `key` set to `value`, and puts the value before back after
/// it, also when `f` panics.
fn with_thread_local<T: Copy + 'static, R>(
    key: &'static std::thread::LocalKey<std::cell::Cell<T>>,
    value: T,
    f: impl FnOnce() -> R,
) -> R {
    struct Restore<T: Copy + 'static>(&'static std::thread::LocalKey<std::cell::Cell<T>>, T);
    impl<T: Copy + 'static> Drop for Restore<T> {
        fn drop(&mut self) {
            self.0.with(|c| c.set(self.1));
        }
    }
    let _restore = Restore(key, key.with(|c| c.replace(value)));
    f()
}

/// Whether this thread's kernels use [`portable_gemm`] (inside [`with_portable_products`]
/// or in a process under `--portable`, [`crate::device::portable_products`]).
fn portable() -> bool {
    crate::device::portable_products() || PORTABLE.with(|p| p.get())
}

/// Whether models loaded from now on use these kernels on the CPU (they do unless turned
/// off, which `make bench` does to measure candle's plain ops side by side).
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::SeqCst);
}

/// Whether a model loaded now on `device` in `dtype` uses the kernels (CPU, `f32`).
pub fn used_on(device: &Device, dtype: DType) -> bool {
    device.is_cpu() && dtype == DType::F32 && ENABLED.load(Ordering::SeqCst)
}

/// The contiguous `f32` data of a kernel input: exactly the layout's elements, in order.
fn contiguous<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets().and_then(|(a, b)| data.get(a..b)) {
        Some(d) if d.len() == l.shape().elem_count() => Ok(d),
        _ => candle_core::bail!("kernel input {:?} is not contiguous f32 data", l.shape()),
    }
}

/// A raw pointer that tasks writing disjoint parts of one buffer may share.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
// SAFETY: the wrapper only carries the address; every dereference is in an `unsafe` block of
// a kernel whose tasks write disjoint elements of a buffer that outlives them (see there).
unsafe impl Send for SharedMut {}
// SAFETY: as for `Send`: shared use only ever writes disjoint elements.
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// The pointer (a method, so that closures capture the whole `Send` wrapper).
    fn ptr(self) -> *mut f32 {
        self.0
    }
}

/// `gemm`'s thread setting for a large product: every rayon thread.
fn parallelism() -> gemm::Parallelism {
    match rayon::current_num_threads() {
        1 => gemm::Parallelism::None,
        n => gemm::Parallelism::Rayon(n),
    }
}

/// Seeded random inputs and value-scaled comparisons for the kernel tests.
#[cfg(test)]
mod testing {
    use candle_core::{Device, Result, Shape, Tensor};
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;
    use rand_distr::{Distribution, Normal};

    /// A generator with a fixed seed, so that every run draws the same inputs.
    pub fn rng(seed: u64) -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(seed)
    }

    /// A CPU tensor of normal draws `N(mean, std²)` from `rng`.
    pub fn randn<S: Into<Shape>>(rng: &mut ChaCha8Rng, mean: f32, std: f32, shape: S) -> Tensor {
        let shape = shape.into();
        let normal = Normal::new(mean, std).expect("a valid normal distribution");
        let v: Vec<f32> = (0..shape.elem_count())
            .map(|_| normal.sample(rng))
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).expect("a tensor of the drawn values")
    }

    /// Asserts `|a − b| ≤ abs + rel·max(|a|, |b|)` element-wise, naming the worst element.
    pub fn assert_close(a: &Tensor, b: &Tensor, rel: f32, abs: f32, what: &str) -> Result<()> {
        let a: Vec<f32> = a.flatten_all()?.to_vec1()?;
        let b: Vec<f32> = b.flatten_all()?.to_vec1()?;
        assert_eq!(a.len(), b.len(), "{what}: sizes differ");
        let (mut worst, mut at) = (0f32, 0);
        for (i, (&x, &y)) in a.iter().zip(&b).enumerate() {
            let excess = (x - y).abs() / (abs + rel * x.abs().max(y.abs()));
            if excess.is_nan() || excess > worst {
                (worst, at) = (excess, i);
                if excess.is_nan() {
                    break;
                }
            }
        }
        assert!(
            worst <= 1.0,
            "{what} differs at element {at}: {} vs {} (|diff| {} > {abs} + {rel}·|value|)",
            a[at],
            b[at],
            (a[at] - b[at]).abs()
        );
        Ok(())
    }
}
