//! The learner <-> parameter-server wire format: the generated gRPC code, the protocol
//! version, and tensors cut into chunks and put back together.
use std::collections::BTreeMap;

use anyhow::{bail, Result};
use tch::{Kind, Tensor};

#[allow(clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("rlt.ps.v1");
}

/// Version of the wire format, sent in every request. Bump on any incompatible change.
pub const PROTOCOL_VERSION: u32 = 2;

/// Elements per chunk: 2 MiB of f32, well under gRPC's default 4 MiB message limit.
pub const CHUNK_ELEMS: usize = 512 * 1024;

/// `kind` of a chunk: the policy weights (or gradients) ...
pub const KIND_POLICY: u32 = 0;
/// ... or the GRPO reference weights.
pub const KIND_REFERENCE: u32 = 1;

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

/// Cuts one tensor into little-endian f32 chunks.
pub fn tensor_chunks(name: &str, t: &Tensor, kind: u32) -> Vec<pb::TensorChunk> {
    let flat = t.to_kind(Kind::Float).contiguous().view([-1]);
    let numel = flat.size()[0] as usize;
    let mut values = vec![0f32; numel];
    flat.to_device(tch::Device::Cpu)
        .copy_data(&mut values, numel);
    let shape = t.size();
    let mut out = Vec::with_capacity(numel.div_ceil(CHUNK_ELEMS).max(1));
    let mut offset = 0;
    loop {
        let end = (offset + CHUNK_ELEMS).min(numel);
        let mut data = Vec::with_capacity((end - offset) * 4);
        for v in &values[offset..end] {
            data.extend_from_slice(&v.to_le_bytes());
        }
        out.push(pb::TensorChunk {
            name: name.to_string(),
            shape: shape.clone(),
            offset: offset as u64,
            data,
            kind,
        });
        offset = end;
        if offset >= numel {
            break;
        }
    }
    out
}

/// Collects chunks into whole tensors, checking each arrives complete and consistent.
/// A tensor being assembled: (shape, values, values received so far).
type Partial = (Vec<i64>, Vec<f32>, usize);

#[derive(Default)]
pub struct Assembler {
    partial: BTreeMap<(u32, String), Partial>,
    pub bytes: u64,
}

impl Assembler {
    pub fn add(&mut self, c: pb::TensorChunk) -> Result<()> {
        if !c.data.len().is_multiple_of(4) {
            bail!(
                "chunk of {:?} has {} bytes, not a whole number of f32",
                c.name,
                c.data.len()
            );
        }
        self.bytes += c.data.len() as u64;
        let numel: i64 = c.shape.iter().product();
        if c.shape.iter().any(|&d| d < 0) {
            bail!(
                "chunk of {:?} has a negative dimension in shape {:?}",
                c.name,
                c.shape
            );
        }
        let entry = self
            .partial
            .entry((c.kind, c.name.clone()))
            .or_insert_with(|| (c.shape.clone(), vec![0f32; numel as usize], 0));
        if entry.0 != c.shape {
            bail!(
                "chunks of {:?} disagree on its shape: {:?} vs {:?}",
                c.name,
                entry.0,
                c.shape
            );
        }
        let n = c.data.len() / 4;
        let start = c.offset as usize;
        if start + n > entry.1.len() {
            bail!(
                "chunk of {:?} at offset {start} with {n} values overruns its {} elements",
                c.name,
                entry.1.len()
            );
        }
        for (dst, src) in entry.1[start..start + n]
            .iter_mut()
            .zip(c.data.chunks_exact(4))
        {
            *dst = f32::from_le_bytes([src[0], src[1], src[2], src[3]]);
        }
        entry.2 += n;
        Ok(())
    }

    /// The assembled tensors of one kind, by name; fails if any tensor is incomplete.
    pub fn finish(self) -> Result<BTreeMap<(u32, String), Tensor>> {
        let mut out = BTreeMap::new();
        for ((kind, name), (shape, values, filled)) in self.partial {
            if filled != values.len() {
                bail!(
                    "tensor {name:?} arrived incomplete: {filled} of {} values",
                    values.len()
                );
            }
            out.insert(
                (kind, name),
                Tensor::from_slice(&values).view(shape.as_slice()),
            );
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
        let big = Tensor::arange(CHUNK_ELEMS as i64 * 2 + 17, (Kind::Float, tch::Device::Cpu))
            .view([-1, 1]);
        let empty = Tensor::zeros([0, 3], (Kind::Float, tch::Device::Cpu));
        let mut a = Assembler::default();
        let chunks = tensor_chunks("big", &big, KIND_POLICY);
        assert_eq!(chunks.len(), 3);
        for c in chunks
            .into_iter()
            .chain(tensor_chunks("e", &empty, KIND_REFERENCE))
        {
            a.add(c).unwrap();
        }
        let out = a.finish().unwrap();
        assert!(out[&(KIND_POLICY, "big".to_string())].equal(&big));
        assert_eq!(out[&(KIND_REFERENCE, "e".to_string())].size(), vec![0, 3]);
    }

    #[test]
    fn incomplete_or_inconsistent_chunks_are_rejected() {
        let t = Tensor::arange(CHUNK_ELEMS as i64 + 5, (Kind::Float, tch::Device::Cpu));
        let mut chunks = tensor_chunks("w", &t, KIND_POLICY);
        chunks.pop();
        let mut a = Assembler::default();
        for c in chunks {
            a.add(c).unwrap();
        }
        assert!(a.finish().err().unwrap().to_string().contains("incomplete"));
        let mut bad = tensor_chunks("w", &Tensor::from_slice(&[1.0f32]), KIND_POLICY).remove(0);
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
