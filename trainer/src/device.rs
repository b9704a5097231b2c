//! `--device` and `--dtype` values.
use anyhow::{bail, Result};
use tch::{Device, Kind};

/// `cpu`, `cuda` (GPU 0), `cuda:N`, or `auto` (CUDA when available).
pub fn parse_device(s: &str) -> Result<Device> {
    Ok(match s {
        "cpu" => Device::Cpu,
        "cuda" => Device::Cuda(0),
        "auto" => Device::cuda_if_available(),
        s => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(i)) => Device::Cuda(i),
            _ => bail!("unknown device {s:?}: expected cpu, cuda, cuda:N or auto"),
        },
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_devices_and_dtypes() {
        assert_eq!(parse_device("cpu").unwrap(), Device::Cpu);
        assert_eq!(parse_device("cuda:1").unwrap(), Device::Cuda(1));
        assert!(parse_device("tpu").unwrap_err().to_string().contains("tpu"));
        assert_eq!(parse_kind("bf16").unwrap(), Kind::BFloat16);
        assert!(parse_kind("int8").is_err());
    }
}
