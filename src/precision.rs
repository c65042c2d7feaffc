//! The teacher's floating-point type (`--dtype`): bf16, f16 or f32. Half precision is for
//! CUDA; the CPU teacher runs in f32. Shards made with another dtype or on another device
//! hold slightly different logits and are not byte-identical.

use anyhow::{bail, Result};
use candle_core::{DType, Device};

/// The names `--dtype` accepts.
pub const NAMES: &[&str] = &["bf16", "f16", "f32"];

/// Parses a dtype name.
pub fn parse(name: &str) -> Result<DType> {
    match name {
        "bf16" => Ok(DType::BF16),
        "f16" => Ok(DType::F16),
        "f32" => Ok(DType::F32),
        other => bail!("--dtype {other}: expected one of {}", NAMES.join(", ")),
    }
}

/// The name of a teacher dtype as the manifest records it.
pub fn name(dtype: DType) -> &'static str {
    match dtype {
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        _ => "f32",
    }
}

/// The teacher dtype for `--dtype` (or its default) on `device`: f32 on the CPU; on CUDA bf16
/// where the GPU has bf16 arithmetic (compute capability 8.0 and up), else f32. Half precision
/// asked for on the CPU is an error.
pub fn resolve(requested: Option<&str>, device: &Device) -> Result<DType> {
    let dtype = match requested {
        Some(n) => parse(n)?,
        None if device.is_cuda() && cuda_has_bf16(device) => DType::BF16,
        None => DType::F32,
    };
    if dtype != DType::F32 && !device.is_cuda() {
        bail!(
            "--dtype {}: half precision is for `--device cuda`; the CPU teacher runs in f32",
            name(dtype)
        );
    }
    Ok(dtype)
}

/// True when the CUDA device computes in bf16 natively (Ampere, compute capability 8.0, and
/// newer).
pub fn cuda_has_bf16(device: &Device) -> bool {
    compute_capability(device).is_some_and(|(major, _)| major >= 8)
}

/// Compute capability `(major, minor)` of a CUDA device; `None` elsewhere.
#[cfg(feature = "cuda")]
pub fn compute_capability(device: &Device) -> Option<(i32, i32)> {
    let dev = device.as_cuda_device().ok()?;
    dev.cuda_stream().context().compute_capability().ok()
}

/// Compute capability `(major, minor)` of a CUDA device; `None` elsewhere.
#[cfg(not(feature = "cuda"))]
pub fn compute_capability(_device: &Device) -> Option<(i32, i32)> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_defaults_to_f32_and_refuses_half() {
        assert_eq!(resolve(None, &Device::Cpu).unwrap(), DType::F32);
        assert_eq!(resolve(Some("f32"), &Device::Cpu).unwrap(), DType::F32);
        for n in ["bf16", "f16"] {
            let e = resolve(Some(n), &Device::Cpu).unwrap_err().to_string();
            assert!(e.contains("--device cuda"), "{e}");
        }
        assert!(parse("fp8").is_err());
        assert_eq!(name(parse("bf16").unwrap()), "bf16");
    }
}
