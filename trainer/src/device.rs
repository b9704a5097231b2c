//! `--device` and `--dtype` values.
use anyhow::{bail, Result};
use std::path::Path;
use tch::{Device, Kind};

/// `cpu`, `cuda` (GPU 0), `cuda:N`, or `auto` (CUDA when available). A CUDA device this
/// process cannot use is a bad configuration (exit 2, not retried): the pod would fail the
/// same way on every attempt.
pub fn parse_device(s: &str) -> Result<Device> {
    let device = match s {
        "cpu" => Device::Cpu,
        "cuda" => Device::Cuda(0),
        "auto" => Device::cuda_if_available(),
        s => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(i)) => Device::Cuda(i),
            _ => bail!("unknown device {s:?}: expected cpu, cuda, cuda:N or auto"),
        },
    };
    if let Device::Cuda(i) = device {
        let seen = tch::Cuda::device_count().max(0) as usize;
        if i >= seen {
            return Err(crate::exit::bad_config(anyhow::anyhow!(
                "spec.device asks for CUDA (device {s:?}), but {}; set spec.device: cpu, or run \
                 the CUDA trainer image on a node with a GPU and request nvidia.com/gpu",
                cuda_absence(i, seen)
            )));
        }
    }
    Ok(device)
}

/// Why CUDA device `index` is not there, as far as this process can tell.
fn cuda_absence(index: usize, seen: usize) -> String {
    let loaded = std::fs::read_to_string("/proc/self/maps")
        .map(|m| m.contains("libtorch_cuda.so"))
        .unwrap_or(false);
    if !loaded {
        return "this libtorch has no CUDA backend loaded (libtorch_cuda.so: a CPU-only image, \
                or a binary linked without it)"
            .into();
    }
    if seen > 0 {
        return format!("only {seen} CUDA device(s) are visible (CUDA_VISIBLE_DEVICES={:?}), not device {index}",
            std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_default());
    }
    if !Path::new("/dev/nvidiactl").exists() {
        return "no NVIDIA device is visible to this container (/dev/nvidiactl is missing: no GPU \
                was allocated to the pod, or the node has no NVIDIA container runtime)"
            .into();
    }
    "the CUDA driver reports no usable device (driver older than the image's CUDA 13 needs, \
     or CUDA_VISIBLE_DEVICES hides them)"
        .into()
}

/// `f32`/`float32` or `bf16`/`bfloat16`.
pub fn parse_kind(s: &str) -> Result<Kind> {
    Ok(match s {
        "f32" | "float32" | "fp32" => Kind::Float,
        "bf16" | "bfloat16" => Kind::BFloat16,
        s => bail!("unknown dtype {s:?}: expected f32 or bf16"),
    })
}

/// One `nvidia-smi --query-gpu` field of GPU `index` (e.g. `name`, `memory.total`), where
/// `nvidia-smi` is installed and answers.
pub fn nvidia_smi(index: usize, field: &str) -> Option<String> {
    let out = std::process::Command::new("nvidia-smi")
        .arg(format!("--query-gpu={field}"))
        .args(["--format=csv,noheader,nounits", &format!("--id={index}")])
        .output()
        .ok()?;
    let v = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && !v.is_empty()).then_some(v)
}

/// The name of GPU `index` ("NVIDIA H100 80GB HBM3"): from `nvidia-smi`, else from the
/// driver's `/proc/driver/nvidia/gpus/*/information` (present in containers without the tool).
pub fn gpu_name(index: usize) -> Option<String> {
    nvidia_smi(index, "name").or_else(|| {
        let mut dirs: Vec<_> = std::fs::read_dir("/proc/driver/nvidia/gpus")
            .ok()?
            .flatten()
            .map(|e| e.path())
            .collect();
        dirs.sort();
        let info = std::fs::read_to_string(dirs.get(index)?.join("information")).ok()?;
        info.lines()
            .find_map(|l| l.strip_prefix("Model:"))
            .map(|m| m.trim().to_string())
    })
}

#[cfg(rlt_cuda_stats)]
extern "C" {
    fn rlt_cuda_peak_allocated(device: i32) -> i64;
    fn rlt_cuda_reset_peak(device: i32);
}

/// Whether this build reads the CUDA caching allocator's statistics.
pub const CUDA_STATS: bool = cfg!(rlt_cuda_stats);

/// The CUDA caching allocator's peak of allocated bytes on GPU `index` since the last
/// [`cuda_reset_peak`] (`torch.cuda.max_memory_allocated`); `None` in a build without it or
/// when libtorch refuses (no such device).
pub fn cuda_peak_allocated(index: usize) -> Option<i64> {
    #[cfg(rlt_cuda_stats)]
    {
        // SAFETY: a plain call into libtorch's allocator statistics; the shim catches its
        // exceptions.
        Some(unsafe { rlt_cuda_peak_allocated(index as i32) }).filter(|&b| b >= 0)
    }
    #[cfg(not(rlt_cuda_stats))]
    {
        let _ = index;
        None
    }
}

/// Resets [`cuda_peak_allocated`] of GPU `index` (`torch.cuda.reset_peak_memory_stats`).
pub fn cuda_reset_peak(index: usize) {
    #[cfg(rlt_cuda_stats)]
    // SAFETY: as above.
    unsafe {
        rlt_cuda_reset_peak(index as i32)
    }
    #[cfg(not(rlt_cuda_stats))]
    let _ = index;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_devices_and_dtypes() {
        assert_eq!(parse_device("cpu").unwrap(), Device::Cpu);
        assert!(parse_device("tpu").unwrap_err().to_string().contains("tpu"));
        // No GPU here: asking for one is a bad configuration naming the field.
        if tch::Cuda::device_count() == 0 {
            let e = parse_device("cuda:1").unwrap_err();
            assert_eq!(crate::exit::code(&e), crate::exit::BAD_CONFIG);
            assert!(e.to_string().contains("spec.device"), "{e}");
        }
        assert_eq!(parse_kind("bf16").unwrap(), Kind::BFloat16);
        assert!(parse_kind("int8").is_err());
    }
}
