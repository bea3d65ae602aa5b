//! Device and precision selection.
//!
//! The binary links libtorch's CPU library only; the linker drops `libtorch_cuda` as unneeded.
//! When CUDA is asked for, `libtorch_cuda.so` is loaded at run time from the same folder, which
//! registers libtorch's CUDA backend. So one binary runs on CPU-only installs (where that
//! library or its CUDA dependencies are absent) and on GPU hosts.

use std::sync::OnceLock;

use tch::Device;

use super::ModelError;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// CUDA when a GPU and a CUDA libtorch are present, else CPU.
    Auto,
    Cpu,
    Cuda,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    Fp32,
}

/// Loads libtorch's CUDA backend once; the outcome is remembered.
fn load_cuda_backend() -> Result<(), String> {
    static LOADED: OnceLock<Result<(), String>> = OnceLock::new();
    LOADED
        .get_or_init(|| {
            // SAFETY: libtorch_cuda's initializers only register the CUDA backend with
            // libtorch; the handle is leaked so the library stays loaded for the process.
            let lib = unsafe { libloading::Library::new("libtorch_cuda.so") };
            lib.map(std::mem::forget).map_err(|e| e.to_string())
        })
        .clone()
}

pub fn resolve(choice: DeviceChoice) -> Result<Device, ModelError> {
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Auto => Ok(match load_cuda_backend() {
            Ok(()) if tch::Cuda::is_available() => Device::Cuda(0),
            _ => Device::Cpu,
        }),
        DeviceChoice::Cuda => {
            load_cuda_backend()
                .map_err(|e| ModelError::Device(format!("cannot load libtorch_cuda.so: {e}")))?;
            if tch::Cuda::is_available() {
                Ok(Device::Cuda(0))
            } else {
                Err(ModelError::Device(
                    "--device cuda: libtorch's CUDA backend sees no GPU".into(),
                ))
            }
        }
    }
}
