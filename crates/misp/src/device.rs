//! Where the models run: `--device cpu|cuda|cuda:N` (or `MISP_DEVICE`) on every command that
//! runs a model, resolved here into a candle [`Device`] once, at the command's start.
//!
//! The CPU is the default and always there. A CUDA device needs a binary built with
//! `--features cuda` (README, "GPUs, devices and memory"); without it, or without a GPU, the request is one error
//! that says which, before anything is read or written.

use candle_core::Device;

/// The environment variable read when no `--device` is given.
pub const ENV: &str = "MISP_DEVICE";

/// Why a device cannot be had.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("device {spec:?}: expected cpu, cuda or cuda:N")]
    Spec { spec: String },
    #[error("device {spec:?}: this misp was built without CUDA; build it with `cargo build --release -p misp-cli --features cuda` (README, \"GPUs, devices and memory\")")]
    NotBuilt { spec: String },
    #[error("device {spec:?}: no usable CUDA device: {message}")]
    Unavailable { spec: String, message: String },
}

/// The device named by `spec`: `cpu`, `cuda` (device 0) or `cuda:N`.
pub fn parse(spec: &str) -> Result<Device, DeviceError> {
    let s = spec.trim().to_ascii_lowercase();
    let ordinal = match s.as_str() {
        "cpu" => return Ok(Device::Cpu),
        "cuda" | "gpu" => 0,
        _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => n,
            _ => {
                return Err(DeviceError::Spec {
                    spec: spec.to_string(),
                })
            }
        },
    };
    if !cfg!(feature = "cuda") {
        return Err(DeviceError::NotBuilt {
            spec: spec.to_string(),
        });
    }
    Device::new_cuda(ordinal).map_err(|e| DeviceError::Unavailable {
        spec: spec.to_string(),
        message: e.to_string(),
    })
}

/// `--device` if given, else `MISP_DEVICE` if set, else the CPU.
pub fn resolve(flag: Option<&str>) -> Result<Device, DeviceError> {
    match flag {
        Some(spec) => parse(spec),
        None => match std::env::var(ENV) {
            Ok(spec) if !spec.trim().is_empty() => parse(&spec),
            _ => Ok(Device::Cpu),
        },
    }
}

/// How a device is written in configs and reports: `cpu`, `cuda:N`.
pub fn name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_or_say_why_not() {
        assert!(parse("cpu").unwrap().is_cpu());
        assert!(parse(" CPU ").unwrap().is_cpu());
        let e = parse("tpu").unwrap_err().to_string();
        assert!(e.contains("expected cpu, cuda or cuda:N"), "{e}");
        assert!(matches!(parse("cuda:x"), Err(DeviceError::Spec { .. })));
        if !cfg!(feature = "cuda") {
            for spec in ["cuda", "cuda:1"] {
                let e = parse(spec).unwrap_err().to_string();
                assert!(e.contains("--features cuda"), "{e}");
            }
        }
        assert_eq!(name(&Device::Cpu), "cpu");
    }
}
