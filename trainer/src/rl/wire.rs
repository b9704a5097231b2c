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

/// HTTP/2 flow control for bulk transfers, on both ends: hyper's defaults (a 64 KiB stream
/// window with 16 KiB frames) stop the sender every 64 KiB to wait for the receiver's window
/// update, which on loopback caps one stream well below 1 GB/s. A window of several chunks
/// keeps the pipe full; 1 MiB frames cut the per-frame work.
pub const STREAM_WINDOW: u32 = 16 << 20;
pub const CONNECTION_WINDOW: u32 = 64 << 20;
pub const MAX_FRAME: u32 = 1 << 20;

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
/// whole tensor when its kind differs, then slices of that one buffer: no per-element work,
/// no copy per chunk). The chunks never see later in-place updates of `t`.
pub fn tensor_chunks(name: &str, t: &Tensor, kind: u32, dtype: u32) -> Vec<pb::TensorChunk> {
    let flat = flat_on_cpu(t, dtype);
    // The chunks must not see later in-place updates of `t`: copy when nothing else did.
    let flat = if flat.data_ptr() == t.data_ptr() {
        flat.copy()
    } else {
        flat
    };
    chunks_of(name, t.size(), flat, kind, dtype)
}

/// [`tensor_chunks`] of a tensor nobody writes any more (a learner's gradient copy): its own
/// memory becomes the chunks' when it is already in the wire format.
pub fn owned_tensor_chunks(name: &str, t: Tensor, kind: u32, dtype: u32) -> Vec<pb::TensorChunk> {
    let flat = flat_on_cpu(&t, dtype);
    chunks_of(name, t.size(), flat, kind, dtype)
}

/// `t` flattened, contiguous, on the CPU in the wire `dtype` (itself when it already is).
fn flat_on_cpu(t: &Tensor, dtype: u32) -> Tensor {
    t.detach()
        .to_device(tch::Device::Cpu)
        .to_kind(dtype_kind(dtype).unwrap_or(Kind::Float))
        .contiguous()
        .view([-1])
}

fn chunks_of(
    name: &str,
    shape: Vec<i64>,
    flat: Tensor,
    kind: u32,
    dtype: u32,
) -> Vec<pb::TensorChunk> {
    let elt = flat.kind().elt_size_in_bytes();
    let bytes = prost::bytes::Bytes::from_owner(CpuMemory(flat));
    let step = CHUNK_BYTES - CHUNK_BYTES % elt;
    let mut out = Vec::with_capacity(bytes.len().div_ceil(step).max(1));
    let mut offset = 0;
    loop {
        let end = (offset + step).min(bytes.len());
        out.push(pb::TensorChunk {
            name: name.to_string(),
            shape: shape.clone(),
            offset: (offset / elt) as u64,
            data: bytes.slice(offset..end),
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

/// The memory of a contiguous CPU tensor that nothing else writes, as bytes.
struct CpuMemory(Tensor);

impl AsRef<[u8]> for CpuMemory {
    fn as_ref(&self) -> &[u8] {
        let len = self.0.numel() * self.0.kind().elt_size_in_bytes();
        if len == 0 {
            return &[];
        }
        // SAFETY: the tensor is contiguous and on the CPU (made so by `tensor_chunks`), so its
        // `len` bytes start at `data_ptr`; it is owned here and no one writes it while shared.
        unsafe { std::slice::from_raw_parts(self.0.data_ptr() as *const u8, len) }
    }
}

/// A tensor being assembled: its memory (in the wire dtype) and the bytes received so far.
struct Partial {
    tensor: Tensor,
    filled: usize,
}

impl Partial {
    fn bytes_mut(&mut self) -> &mut [u8] {
        let len = self.tensor.numel() * self.tensor.kind().elt_size_in_bytes();
        if len == 0 {
            return &mut [];
        }
        // SAFETY: a contiguous CPU tensor created by `Assembler::add` and owned by this
        // `Partial`: `len` bytes from `data_ptr`, borrowed mutably through `&mut self` only.
        unsafe { std::slice::from_raw_parts_mut(self.tensor.data_ptr().cast::<u8>(), len) }
    }
}

/// Collects chunks into whole tensors, checking each arrives complete and consistent. A chunk
/// is copied once, straight into the memory of the tensor it belongs to.
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
        let entry = self
            .partial
            .entry((c.kind, c.name.clone()))
            .or_insert_with(|| Partial {
                tensor: Tensor::empty(c.shape.as_slice(), (kind, tch::Device::Cpu)),
                filled: 0,
            });
        if entry.tensor.size() != c.shape || entry.tensor.kind() != kind {
            bail!(
                "chunks of {:?} disagree on its shape or dtype: {:?} ({}) vs {:?} ({})",
                c.name,
                entry.tensor.size(),
                wire_dtype(entry.tensor.kind()),
                c.shape,
                c.dtype
            );
        }
        let start = c.offset as usize * size;
        let memory = entry.bytes_mut();
        if start + c.data.len() > memory.len() {
            bail!(
                "chunk of {:?} at offset {} with {} values overruns its {} elements",
                c.name,
                c.offset,
                c.data.len() / size,
                memory.len() / size
            );
        }
        memory[start..start + c.data.len()].copy_from_slice(&c.data);
        entry.filled += c.data.len();
        Ok(())
    }

    /// The assembled tensors in their wire dtype (a bf16 pull stays bf16 for a learner that
    /// computes in it), by (kind, name); fails if any tensor is incomplete.
    pub fn finish(self) -> Result<BTreeMap<(u32, String), Tensor>> {
        let mut out = BTreeMap::new();
        for ((kind, name), p) in self.partial {
            let (size, numel) = (p.tensor.kind().elt_size_in_bytes(), p.tensor.numel());
            if p.filled != numel * size {
                bail!(
                    "tensor {name:?} arrived incomplete: {} of {numel} values",
                    p.filled / size
                );
            }
            out.insert((kind, name), p.tensor);
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
        let halves = &out[&(KIND_POLICY, "small".to_string())];
        assert_eq!(halves.kind(), Kind::BFloat16);
        assert!(halves.to_kind(Kind::Float).equal(&small));
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
