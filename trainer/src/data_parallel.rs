//! One optimizer update shared by the data-parallel ranks of a fine-tune (ZeRO stage 2 in
//! DeepSpeed's terms, over [`crate::collective`]):
//!
//! - every rank holds the whole model in the training dtype and runs forward and backward on
//!   its share of the global batch;
//! - after each micro-batch the gradients are reduce-scattered in f32 (through host memory):
//!   rank `r` adds the summed gradients of the parameters it owns (whole tensors, balanced by
//!   size: [`crate::rl::shard::assign_shards`], the same split the RL parameter servers use)
//!   into its f32 accumulator, so bf16 gradients are accumulated in f32 and the accumulator
//!   is a 1/W share of the model;
//! - the global gradient norm is the sum of the ranks' parts, so clipping is the same on every
//!   rank; each rank's [`AdamW`] covers only its own parameters, so the f32 master weights and
//!   both moments are a 1/W share of the model per rank;
//! - the owners' updated weights are all-gathered as raw bytes in the training dtype.
//!
//! With one rank it is the same arithmetic without the ring: one code path, whose result
//! does not depend on the number of ranks beyond float summation order.
use crate::collective::Group;
use crate::optim::{clip_coefficient, AdamW, AdamWConfig};
use crate::rl::shard::assign_shards;
use anyhow::{anyhow, bail, Context, Result};
use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// A model variable and where it lives in the flat layout.
struct Var {
    name: String,
    tensor: Tensor,
    owner: usize,
    /// Element range in the flat gradient buffer.
    elems: Range<usize>,
    /// Byte range in the flat weight buffer (training dtype).
    bytes: Range<usize>,
}

pub struct Update {
    rank: usize,
    world: usize,
    /// Ordered by (owner, name): each rank's part of a flat buffer is contiguous.
    vars: Vec<Var>,
    elem_bounds: Vec<Range<usize>>,
    byte_bounds: Vec<Range<usize>>,
    /// The summed gradients since the last update of the parameters this rank owns (all of
    /// them with one rank), f32, flat.
    acc: Tensor,
    /// AdamW over the parameters this rank owns.
    pub optimizer: AdamW,
}

/// What the ranks' gradients of one update add up to.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reduced {
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Sums over the ranks of the values passed to [`Update::reduce`].
    pub sums: [f64; 2],
}

impl Update {
    pub fn new(vars: BTreeMap<String, Tensor>, group: &Group, config: AdamWConfig) -> Update {
        let sizes: Vec<(String, i64)> = vars
            .iter()
            .map(|(n, t)| (n.clone(), t.numel() as i64))
            .collect();
        let owners = assign_shards(&sizes, group.world);
        let mut order: Vec<(usize, String, Tensor)> =
            vars.into_iter().map(|(n, t)| (owners[&n], n, t)).collect();
        order.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        let (mut elem, mut byte) = (0, 0);
        let mut elem_bounds = vec![0..0; group.world];
        let mut byte_bounds = vec![0..0; group.world];
        let mut out = Vec::with_capacity(order.len());
        for (owner, name, tensor) in order {
            let n = tensor.numel();
            let b = n * tensor.kind().elt_size_in_bytes();
            if elem_bounds[owner].is_empty() {
                elem_bounds[owner] = elem..elem;
                byte_bounds[owner] = byte..byte;
            }
            out.push(Var {
                name,
                tensor,
                owner,
                elems: elem..elem + n,
                bytes: byte..byte + b,
            });
            elem += n;
            byte += b;
            elem_bounds[owner].end = elem;
            byte_bounds[owner].end = byte;
        }
        // A rank that owns nothing (more ranks than tensors) has an empty part where it is.
        for r in 1..group.world {
            if elem_bounds[r].is_empty() {
                elem_bounds[r] = elem_bounds[r - 1].end..elem_bounds[r - 1].end;
                byte_bounds[r] = byte_bounds[r - 1].end..byte_bounds[r - 1].end;
            }
        }
        let device = out.first().map_or(Device::Cpu, |v| v.tensor.device());
        let owned = out
            .iter()
            .filter(|v| v.owner == group.rank)
            .map(|v| (v.name.clone(), v.tensor.shallow_clone()));
        Update {
            rank: group.rank,
            world: group.world,
            acc: Tensor::zeros(
                [elem_bounds[group.rank].len() as i64],
                (Kind::Float, device),
            ),
            optimizer: AdamW::new(owned, config),
            vars: out,
            elem_bounds,
            byte_bounds,
        }
    }

    /// After each micro-batch's backward pass: sums the variables' gradients over the ranks
    /// (reduce-scatter, in f32) and adds this rank's part into its f32 accumulator, then
    /// clears them. Reducing per micro-batch keeps the f32 accumulator a 1/W share.
    pub fn accumulate(&mut self, group: &mut Group) -> Result<()> {
        if self.world == 1 {
            tch::no_grad(|| {
                for v in &self.vars {
                    let mut g = v.tensor.grad();
                    if g.defined() {
                        let _ = self
                            .acc
                            .narrow(0, v.elems.start as i64, v.elems.len() as i64)
                            .g_add_(&g.view(-1));
                        let _ = g.zero_();
                    }
                }
            });
            return Ok(());
        }
        // Host staging in f32, one tensor at a time (no device-side copy of the whole model).
        let mut host = vec![0f32; self.elem_bounds.last().map_or(0, |b| b.end)];
        tch::no_grad(|| {
            for v in &self.vars {
                let mut g = v.tensor.grad();
                if g.defined() {
                    g.to_kind(Kind::Float)
                        .to_device(Device::Cpu)
                        .contiguous()
                        .copy_data(&mut host[v.elems.clone()], v.elems.len());
                    let _ = g.zero_();
                }
            }
        });
        group.reduce_scatter(&mut host, &self.elem_bounds)?;
        let mine = Tensor::from_slice(&host[self.elem_bounds[self.rank].clone()]);
        tch::no_grad(|| {
            let _ = self.acc.g_add_(&mine.to_device(self.acc.device()));
        });
        Ok(())
    }

    /// First half of an update: the global gradient norm (the ranks' parts of the sum of
    /// squares, added) and `sums` (e.g. this rank's loss and token count) summed over the
    /// ranks. The caller looks at them (a non-finite loss stops every rank alike, before any
    /// weight changes), then calls [`Update::step`].
    pub fn reduce(&mut self, group: &mut Group, sums: [f64; 2]) -> Result<Reduced> {
        let squared = tch::no_grad(|| self.acc.square().sum(Kind::Double).double_value(&[]));
        let totals = group.sum(&[squared, sums[0], sums[1]])?;
        Ok(Reduced {
            grad_norm: totals[0].sqrt(),
            sums: [totals[1], totals[2]],
        })
    }

    /// Second half: clips by the global norm (`max_norm`, 0 = no clipping), steps this
    /// rank's AdamW with `lr` and shares the new weights.
    pub fn step(&mut self, group: &mut Group, lr: f64, max_norm: f64, r: &Reduced) -> Result<()> {
        let grads = &self.acc;
        let start = self.elem_bounds[self.rank].start;
        let owned: Vec<Tensor> = self
            .vars
            .iter()
            .filter(|v| v.owner == self.rank)
            .map(|v| {
                grads
                    .narrow(0, (v.elems.start - start) as i64, v.elems.len() as i64)
                    .view(v.tensor.size().as_slice())
            })
            .collect();
        self.optimizer
            .step_with(lr, &owned, clip_coefficient(r.grad_norm, max_norm));
        let _ = self.acc.zero_();
        self.share_weights(group)
    }

    /// All-gathers the owners' weights in the training dtype, as bytes.
    fn share_weights(&self, group: &mut Group) -> Result<()> {
        if self.world == 1 {
            return Ok(());
        }
        let mut buf = vec![0u8; self.byte_bounds.last().map_or(0, |b| b.end)];
        for v in self.vars.iter().filter(|v| v.owner == self.rank) {
            let t = v.tensor.detach().to_device(Device::Cpu).contiguous();
            t.copy_data_u8(&mut buf[v.bytes.clone()], v.elems.len());
        }
        group.all_gather(&mut buf, &self.byte_bounds)?;
        tch::no_grad(|| {
            for v in self.vars.iter().filter(|v| v.owner != self.rank) {
                let t = Tensor::from_data_size(
                    &buf[v.bytes.clone()],
                    &v.tensor.size(),
                    v.tensor.kind(),
                );
                let mut dst = v.tensor.shallow_clone();
                dst.copy_(&t);
            }
        });
        Ok(())
    }

    /// This rank's optimizer file in a checkpoint: the whole state with one rank (the file a
    /// single-process fine-tune always wrote), this rank's share otherwise.
    pub fn optimizer_file(&self) -> String {
        if self.world == 1 {
            OPTIMIZER_FILE.to_string()
        } else {
            format!("optimizer.rank-{}-of-{}.safetensors", self.rank, self.world)
        }
    }

    /// Loads this rank's share of the optimizer state from a checkpoint written by any number
    /// of ranks (the state is keyed by parameter name, whichever rank wrote it).
    pub fn load(&mut self, dir: &Path) -> Result<()> {
        let files = optimizer_files(dir)?;
        if files.is_empty() {
            bail!(
                "{}: no optimizer state ({OPTIMIZER_FILE} or optimizer.rank-*.safetensors)",
                dir.display()
            );
        }
        let mut state = BTreeMap::new();
        for f in files {
            state.extend(
                crate::checkpoint::read_safetensors(&f)
                    .with_context(|| format!("reading {}", f.display()))?,
            );
        }
        self.optimizer
            .load_state(&state)
            .map_err(|e| anyhow!("{}: {e}", dir.display()))
    }
}

pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";

fn optimizer_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("optimizer") && n.ends_with(".safetensors"))
        })
        .collect();
    out.sort();
    Ok(out)
}

/// The rows of a global batch rank `rank` of `world` trains on: every `world`-th, so that
/// long and short examples spread alike.
pub fn local_rows<T>(batch: &[T], rank: usize, world: usize) -> Vec<&T> {
    batch.iter().skip(rank).step_by(world.max(1)).collect()
}
