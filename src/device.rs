//! Compute devices by name: parsed from `--device`, named in the manifest.

use anyhow::{bail, Result};
use candle_core::Device;

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

/// The name of a device as the manifest records it (`cpu` or `cuda`; the ordinal does not
/// change results).
pub fn device_name(device: &Device) -> &'static str {
    if device.is_cuda() {
        "cuda"
    } else if device.is_metal() {
        "metal"
    } else {
        "cpu"
    }
}
