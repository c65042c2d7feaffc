//! Fast CPU kernels for the encoder, as candle custom ops with their own backward passes:
//! a dense layer whose backward computes only the gradients that are needed (none for
//! frozen weights), attention split over (batch × head) across threads, a vectorised erf
//! GELU and a fused LayerNorm. Each has a test against candle's plain ops. Other devices
//! use candle's standard ops (the model chooses once, from the device).

mod adamw;
mod attention;
mod gelu;
mod linear;
mod math;
mod norm;

pub use adamw::AdamW;
pub use attention::{attention, Seqs};
pub use gelu::gelu_erf;
pub use linear::linear;
pub use norm::layer_norm;

use candle_core::{CpuStorage, DType, Device, Layout};
use std::sync::atomic::{AtomicBool, Ordering};

static ENABLED: AtomicBool = AtomicBool::new(true);

/// Whether models loaded from now on use these kernels on the CPU (they do unless turned
/// off, which `make bench` does to measure candle's plain ops side by side).
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::SeqCst);
}

/// Whether a model loaded now on `device` in `dtype` uses the kernels (CPU, `f32`).
pub fn used_on(device: &Device, dtype: DType) -> bool {
    device.is_cpu() && dtype == DType::F32 && ENABLED.load(Ordering::SeqCst)
}

/// The contiguous `f32` data of a kernel input.
fn contiguous<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("kernel input must be contiguous"),
    }
}

/// A raw pointer that tasks writing disjoint parts of one buffer may share.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
unsafe impl Send for SharedMut {}
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
