//! Compute devices by name: parsed from `--device`, named in the manifest.

use anyhow::{bail, Result};
use candle_core::Device;
use std::sync::atomic::{AtomicBool, Ordering};

/// Parses a device name: `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        n if n == "cuda" || n.starts_with("cuda:") => {
            let ord: usize = n
                .strip_prefix("cuda:")
                .map(|s| s.parse())
                .transpose()
                .map_err(|_| anyhow::anyhow!("--device {n}: expected cuda:N"))?
                .unwrap_or(0);
            if !candle_core::utils::cuda_is_available() {
                bail!(
                    "--device {n}: this build has no CUDA support (rebuild with `--features cuda`)"
                );
            }
            Ok(Device::new_cuda(ord)?)
        }
        other => bail!("--device {other}: expected cpu, cuda or cuda:N"),
    }
}

/// Whether every f32 product of the encoder on the CPU comes from the portable product
/// (`--portable`, [`open_device`]).
static PORTABLE: AtomicBool = AtomicBool::new(false);

/// Opens the device of `--device`; with `--portable` (the CPU only) every f32 product of
/// the encoder on the CPU, from then on, comes from the portable product
/// (`model::kernels::portable_gemm`), whose bits do not depend on the instruction set.
pub fn open_device(name: &str, portable: bool) -> Result<Device> {
    if portable && name != "cpu" {
        bail!("--portable: portable products are for the CPU, not --device {name}");
    }
    let device = parse_device(name)?;
    if portable {
        PORTABLE.store(true, Ordering::SeqCst);
    }
    Ok(device)
}

/// Whether this process runs under `--portable`.
pub fn portable_products() -> bool {
    PORTABLE.load(Ordering::SeqCst)
}

/// The name of a device as the manifest records it: `cuda` (the ordinal does not change
/// results), `metal`, or `cpu` with the vector instructions of its matmul kernels,
/// `cpu (AVX-512)`, `cpu (AVX2)` or `cpu (scalar)` on x86-64: those kernels sum in
/// different orders, so their f32 results, and the shards made from them, differ in the
/// last bits. Under `--portable` the CPU is `cpu (portable)`: the same bits on each.
pub fn device_name(device: &Device) -> &'static str {
    if device.is_cuda() {
        "cuda"
    } else if device.is_metal() {
        "metal"
    } else if portable_products() {
        "cpu (portable)"
    } else {
        cpu_name()
    }
}

/// `cpu`, with the kernels the `gemm` crate chooses on this CPU (it takes AVX-512 where the
/// CPU has AVX-512F, else AVX2 with FMA where it has FMA, else its scalar code).
fn cpu_name() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            "cpu (AVX-512)"
        } else if std::arch::is_x86_feature_detected!("fma") {
            "cpu (AVX2)"
        } else {
            "cpu (scalar)"
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        "cpu"
    }
}
