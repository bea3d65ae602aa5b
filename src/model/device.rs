//! Device and precision selection.
//!
//! The binary links libtorch's CPU library only; the linker drops `libtorch_cuda` as unneeded.
//! When CUDA is asked for, `libtorch_cuda.so` is loaded at run time from the same folder, which
//! registers libtorch's CUDA backend. So one binary runs on CPU-only installs (where that
//! library or its CUDA dependencies are absent) and on GPU hosts.

use std::sync::OnceLock;

use tch::{Device, Kind};

use super::layers::Compute;

use super::ModelError;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// CUDA when a GPU and a CUDA libtorch are present, else CPU.
    Auto,
    Cpu,
    Cuda,
}

super::named::named!(DeviceChoice { Auto => "auto", Cpu => "cpu", Cuda => "cuda" });

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Precision {
    /// torchvision's f32 arithmetic, op for op: the same results, bit for bit on this libtorch.
    Fp32,
    /// f32 with channels-last activations and norms folded into the convolutions: oneDNN's
    /// faster kernels, within ~1e-2 px of torchvision rather than bitwise.
    Fp32Fast,
    /// bfloat16 convolutions and linears, channels-last, norms folded (for AMX CPUs).
    Bf16,
    /// float16 likewise; for GPUs.
    Fp16,
    /// The server measures the candidates at warm-up and keeps the fastest that agrees with
    /// fp32 (`autotune`); elsewhere a guess: fp16 on CUDA, bf16 with AMX-BF16, else fp32-fast.
    Auto,
}

super::named::named!(Precision {
    Fp32 => "fp32",
    Fp32Fast => "fp32-fast",
    Bf16 => "bf16",
    Fp16 => "fp16",
    Auto => "auto",
});

/// Whether the CPU's flags (from /proc/cpuinfo) include any of `wanted`.
fn cpu_has_flag(wanted: &[&str]) -> bool {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    info.lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| wanted.contains(&f)))
}

/// The CPU has AMX-BF16 tiles. AVX512-BF16 alone does not count: measured on such a CPU,
/// oneDNN's bf16 convolutions ran slower than its f32 ones.
fn cpu_has_amx_bf16() -> bool {
    cpu_has_flag(&["amx_bf16"])
}

/// The CPU has bf16 dot-product instructions (AVX512-BF16 or AMX-BF16). Without them oneDNN
/// emulates bf16 through f32: measured on an AMD EPYC Zen 3 (no AVX-512), bf16 took 8-9
/// times fp32's time, so `auto` does not spend its trial on it there.
pub fn cpu_has_bf16_instructions() -> bool {
    cpu_has_flag(&["avx512_bf16", "amx_bf16"])
}

/// The precision `auto` stands for on `device`, and how the model then computes. Box
/// decoding, softmax, NMS, RoIAlign's sampling and the resize stay f32 in every setting.
pub fn resolve_precision(p: Precision, device: Device) -> (Precision, Compute) {
    let p = match p {
        Precision::Auto if device.is_cuda() => Precision::Fp16,
        Precision::Auto if cpu_has_amx_bf16() => Precision::Bf16,
        Precision::Auto => Precision::Fp32Fast,
        other => other,
    };
    let fast = |kind| Compute {
        kind,
        channels_last: true,
        fold_norms: true,
    };
    let compute = match p {
        Precision::Fp32Fast => fast(Kind::Float),
        Precision::Bf16 => fast(Kind::BFloat16),
        Precision::Fp16 => fast(Kind::Half),
        _ => Compute::EXACT,
    };
    (p, compute)
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

fn nvidia_driver_present() -> bool {
    std::path::Path::new("/proc/driver/nvidia/version").exists()
        || std::path::Path::new("/dev/nvidia0").exists()
}

pub fn resolve(choice: DeviceChoice) -> Result<Device, ModelError> {
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        // Loading the CUDA libraries costs ~250 MB and a moment; without an NVIDIA driver
        // there is nothing for them to find.
        DeviceChoice::Auto if !nvidia_driver_present() => Ok(Device::Cpu),
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
