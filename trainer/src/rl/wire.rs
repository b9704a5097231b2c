//! The learner <-> parameter-server wire format: the generated gRPC code, the protocol
//! version, and tensors cut into chunks of their raw memory (f32, or bf16 where the sender
//! holds bf16 or the receiver computes in it) and put back together.
use std::collections::BTreeMap;

use anyhow::{bail, Result};
use tch::{Kind, Tensor};

#[allow(clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("rlt.ps.v1");
}

/// Version of the wire format, sent in every request. Bump on any incompatible change.
pub const PROTOCOL_VERSION: u32 = 3;

/// Bytes per chunk: 2 MiB, well under gRPC's default 4 MiB message limit.
pub const CHUNK_BYTES: usize = 2 << 20;

/// `kind` of a chunk: the policy weights (or gradients) ...
pub const KIND_POLICY: u32 = 0;
/// ... or the GRPO reference weights.
pub const KIND_REFERENCE: u32 = 1;

/// `dtype` of a chunk's bytes.
pub const DTYPE_F32: u32 = 0;
pub const DTYPE_BF16: u32 = 1;

/// The wire dtype of a tensor kind: bf16 stays bf16 (half the bytes, nothing lost: it is
/// what the sender holds or what the receiver computes in), anything else travels as f32.
pub fn wire_dtype(kind: Kind) -> u32 {
    if kind == Kind::BFloat16 {
        DTYPE_BF16
    } else {
        DTYPE_F32
    }
}

fn dtype_kind(dtype: u32) -> Option<Kind> {
    match dtype {
        DTYPE_F32 => Some(Kind::Float),
        DTYPE_BF16 => Some(Kind::BFloat16),
        _ => None,
    }
}

/// Rejects a request made with another wire-format version, naming both.
#[allow(clippy::result_large_err)]
pub fn check_protocol(got: u32) -> Result<(), tonic::Status> {
    if got != PROTOCOL_VERSION {
        return Err(tonic::Status::failed_precondition(format!(
            "wire protocol version mismatch: request has version {got}, this parameter server speaks \
             version {PROTOCOL_VERSION}; run learners and parameter servers from the same trainer image"
        )));
    }
    Ok(())
}

/// Cuts one tensor into chunks of its memory in the wire `dtype` (one conversion of the
/// whole tensor when its kind differs, then plain byte copies: no per-element work).
pub fn tensor_chunks(name: &str, t: &Tensor, kind: u32, dtype: u32) -> Vec<pb::TensorChunk> {
    let as_kind = dtype_kind(dtype).unwrap_or(Kind::Float);
    let flat = t
        .detach()
        .to_device(tch::Device::Cpu)
        .to_kind(as_kind)
        .contiguous()
        .view([-1]);
    let numel = flat.size()[0] as usize;
    let mut bytes = vec![0u8; numel * as_kind.elt_size_in_bytes()];
    flat.copy_data_u8(&mut bytes, numel);
    let shape = t.size();
    let step = CHUNK_BYTES - CHUNK_BYTES % as_kind.elt_size_in_bytes();
    let mut out = Vec::with_capacity(bytes.len().div_ceil(step).max(1));
    let mut offset = 0;
    loop {
        let end = (offset + step).min(bytes.len());
        out.push(pb::TensorChunk {
            name: name.to_string(),
            shape: shape.clone(),
            offset: (offset / as_kind.elt_size_in_bytes()) as u64,
            data: bytes[offset..end].to_vec(),
            kind,
            dtype,
        });
        offset = end;
        if offset >= bytes.len() {
            break;
        }
    }
    out
}

/// A tensor being assembled: shape, dtype, its bytes, bytes received so far.
struct Partial {
    shape: Vec<i64>,
    dtype: u32,
    bytes: Vec<u8>,
    filled: usize,
}

/// Collects chunks into whole tensors, checking each arrives complete and consistent.
#[derive(Default)]
pub struct Assembler {
    partial: BTreeMap<(u32, String), Partial>,
    pub bytes: u64,
}

impl Assembler {
    pub fn add(&mut self, c: pb::TensorChunk) -> Result<()> {
        let Some(kind) = dtype_kind(c.dtype) else {
            bail!("chunk of {:?} has unknown dtype {}", c.name, c.dtype);
        };
        let size = kind.elt_size_in_bytes();
        if !c.data.len().is_multiple_of(size) {
            bail!(
                "chunk of {:?} has {} bytes, not a whole number of {size}-byte values",
                c.name,
                c.data.len()
            );
        }
        if c.shape.iter().any(|&d| d < 0) {
            bail!(
                "chunk of {:?} has a negative dimension in shape {:?}",
                c.name,
                c.shape
            );
        }
        self.bytes += c.data.len() as u64;
        let numel: i64 = c.shape.iter().product();
        let entry = self
            .partial
            .entry((c.kind, c.name.clone()))
            .or_insert_with(|| Partial {
                shape: c.shape.clone(),
                dtype: c.dtype,
                bytes: vec![0u8; numel as usize * size],
                filled: 0,
            });
        if entry.shape != c.shape || entry.dtype != c.dtype {
            bail!(
                "chunks of {:?} disagree on its shape or dtype: {:?} ({}) vs {:?} ({})",
                c.name,
                entry.shape,
                entry.dtype,
                c.shape,
                c.dtype
            );
        }
        let start = c.offset as usize * size;
        if start + c.data.len() > entry.bytes.len() {
            bail!(
                "chunk of {:?} at offset {} with {} values overruns its {} elements",
                c.name,
                c.offset,
                c.data.len() / size,
                entry.bytes.len() / size
            );
        }
        entry.bytes[start..start + c.data.len()].copy_from_slice(&c.data);
        entry.filled += c.data.len();
        Ok(())
    }

    /// The assembled tensors (f32, whatever their wire dtype), by (kind, name); fails if any
    /// tensor is incomplete.
    pub fn finish(self) -> Result<BTreeMap<(u32, String), Tensor>> {
        let mut out = BTreeMap::new();
        for ((kind, name), p) in self.partial {
            if p.filled != p.bytes.len() {
                let size = dtype_kind(p.dtype).map_or(4, |k| k.elt_size_in_bytes());
                bail!(
                    "tensor {name:?} arrived incomplete: {} of {} values",
                    p.filled / size,
                    p.bytes.len() / size
                );
            }
            let wire = dtype_kind(p.dtype).unwrap_or(Kind::Float);
            let t = Tensor::from_data_size(&p.bytes, &p.shape, wire).to_kind(Kind::Float);
            out.insert((kind, name), t);
        }
        Ok(out)
    }
}

/// Splits assembled tensors by kind.
pub fn of_kind(map: &BTreeMap<(u32, String), Tensor>, kind: u32) -> BTreeMap<String, Tensor> {
    map.iter()
        .filter(|((k, _), _)| *k == kind)
        .map(|((_, n), t)| (n.clone(), t.shallow_clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_round_trip_large_and_empty_tensors() {
        let big = Tensor::arange(
            (CHUNK_BYTES / 4) as i64 * 2 + 17,
            (Kind::Float, tch::Device::Cpu),
        )
        .view([-1, 1]);
        let empty = Tensor::zeros([0, 3], (Kind::Float, tch::Device::Cpu));
        let mut a = Assembler::default();
        let chunks = tensor_chunks("big", &big, KIND_POLICY, DTYPE_F32);
        assert_eq!(chunks.len(), 3);
        // Whole numbers up to 256 are exact in bf16: half the bytes, the same values.
        let small = Tensor::arange(256, (Kind::Float, tch::Device::Cpu)).view([16, 16]);
        let halves = tensor_chunks("small", &small, KIND_POLICY, DTYPE_BF16);
        assert_eq!(halves.iter().map(|c| c.data.len()).sum::<usize>(), 512);
        for c in chunks.into_iter().chain(halves).chain(tensor_chunks(
            "e",
            &empty,
            KIND_REFERENCE,
            DTYPE_F32,
        )) {
            a.add(c).unwrap();
        }
        let out = a.finish().unwrap();
        assert!(out[&(KIND_POLICY, "big".to_string())].equal(&big));
        assert!(out[&(KIND_POLICY, "small".to_string())].equal(&small));
        assert_eq!(out[&(KIND_REFERENCE, "e".to_string())].size(), vec![0, 3]);
    }

    #[test]
    fn incomplete_or_inconsistent_chunks_are_rejected() {
        let t = Tensor::arange(
            (CHUNK_BYTES / 4) as i64 + 5,
            (Kind::Float, tch::Device::Cpu),
        );
        let mut chunks = tensor_chunks("w", &t, KIND_POLICY, DTYPE_F32);
        chunks.pop();
        let mut a = Assembler::default();
        for c in chunks {
            a.add(c).unwrap();
        }
        assert!(a.finish().err().unwrap().to_string().contains("incomplete"));
        let mut bad =
            tensor_chunks("w", &Tensor::from_slice(&[1.0f32]), KIND_POLICY, DTYPE_F32).remove(0);
        bad.offset = 3;
        assert!(Assembler::default()
            .add(bad)
            .err()
            .unwrap()
            .to_string()
            .contains("overruns"));
        assert!(check_protocol(PROTOCOL_VERSION).is_ok());
        let err = check_protocol(PROTOCOL_VERSION + 1).err().unwrap();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
        assert!(err.message().contains("version mismatch"));
    }
}
