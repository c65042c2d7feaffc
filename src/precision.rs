//! The teacher's floating-point type (`--dtype`): bf16, f16 or f32. On CUDA half precision
//! holds the weights and activations. On the CPU, bf16 (where the CPU has AVX-512 BF16)
//! multiplies the dense layers in bf16 with f32 accumulation and keeps everything else in
//! f32; f16 is for CUDA. Shards made with another dtype or on another device hold slightly
//! different logits and are not byte-identical.

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

/// The teacher dtype for `--dtype` (or its default) on `device`: f32 by default on the CPU;
/// on CUDA bf16 where the GPU has bf16 arithmetic (compute capability 8.0 and up), else f32.
/// bf16 on a CPU without AVX-512 BF16, and f16 on the CPU, are errors.
pub fn resolve(requested: Option<&str>, device: &Device) -> Result<DType> {
    let dtype = match requested {
        Some(n) => parse(n)?,
        None if device.is_cuda() && cuda_has_bf16(device) => DType::BF16,
        None => DType::F32,
    };
    match dtype {
        DType::F16 if !device.is_cuda() => {
            bail!("--dtype f16: f16 is for `--device cuda`; the CPU teacher runs in f32 or bf16")
        }
        DType::BF16 if !device.is_cuda() && !cpu_has_bf16() => bail!(
            "--dtype bf16: this CPU lacks AVX-512 BF16, which the CPU's bf16 products need; use f32"
        ),
        _ => Ok(dtype),
    }
}

/// True when the CPU has the AVX-512 BF16 dot products that `--dtype bf16` uses there.
pub fn cpu_has_bf16() -> bool {
    is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16")
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
    fn cpu_defaults_to_f32_refuses_f16_and_takes_bf16_where_it_can() {
        assert_eq!(resolve(None, &Device::Cpu).unwrap(), DType::F32);
        assert_eq!(resolve(Some("f32"), &Device::Cpu).unwrap(), DType::F32);
        let e = resolve(Some("f16"), &Device::Cpu).unwrap_err().to_string();
        assert!(e.contains("--device cuda"), "{e}");
        match resolve(Some("bf16"), &Device::Cpu) {
            Ok(d) => {
                assert!(cpu_has_bf16());
                assert_eq!(d, DType::BF16);
            }
            Err(e) => {
                assert!(!cpu_has_bf16());
                assert!(e.to_string().contains("AVX-512 BF16"), "{e}");
            }
        }
        assert!(parse("fp8").is_err());
        assert_eq!(name(parse("bf16").unwrap()), "bf16");
    }
}
