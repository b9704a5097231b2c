//! One optimizer update shared by the data-parallel ranks of a fine-tune (ZeRO stage 2 in
//! DeepSpeed's terms, over the c10d group of [`crate::train::collective`]):
//!
//! - every rank holds the whole model in the training dtype and runs forward and backward on
//!   its share of the global batch;
//! - each rank owns whole parameters (balanced by size: [`crate::train::optim::assign_shards`],
//!   the split the RL parameter servers use), laid out flat by owner, each owner's part padded
//!   to the largest so that c10d's equal-shard collectives cut the buffer at the owners;
//! - the gradients are summed over the ranks by reduce-scatter, in buckets of a bounded size,
//!   in the training dtype on the wire (bf16 halves the bytes), into the owner's f32 share.
//!   Where the memory preflight finds room ([`crate::train::sft::SftConfig::local_sums`]), the
//!   micro-batches of an update are first summed locally in f32 and reduced once per update;
//!   otherwise each micro-batch is reduced as it ends, keeping the f32 sums a 1/W share;
//! - the global gradient norm is the sum of the ranks' parts, so clipping is the same on every
//!   rank; each rank's [`AdamW`] covers only its own parameters, so the f32 master weights and
//!   both moments are a 1/W share of the model per rank;
//! - the owners' updated weights are all-gathered, in buckets, in the training dtype.
//!
//! With one rank it is the same arithmetic without collectives: one code path, whose result
//! does not depend on the number of ranks beyond float summation order.
use crate::train::collective::Group;
use crate::train::optim::{assign_shards, clip_coefficient, AdamW, AdamWConfig};
use anyhow::{anyhow, bail, Context, Result};
use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// Elements of each rank's part per collective call: bounds the staging buffers (W times this
/// in the wire dtype) whatever the model's size.
const BUCKET: usize = 1 << 24;

/// A model variable and where it lives in the flat layout.
struct Var {
    name: String,
    tensor: Tensor,
    owner: usize,
    /// Element range within its owner's part.
    elems: Range<usize>,
}

impl Var {
    /// The part of this variable inside `bucket` (a range of its owner's part), as (offset in
    /// the variable, offset in the bucket, length).
    fn overlap(&self, bucket: &Range<usize>) -> Option<(i64, i64, i64)> {
        let (lo, hi) = (
            self.elems.start.max(bucket.start),
            self.elems.end.min(bucket.end),
        );
        (lo < hi).then(|| {
            (
                (lo - self.elems.start) as i64,
                (lo - bucket.start) as i64,
                (hi - lo) as i64,
            )
        })
    }
}

pub struct Update {
    rank: usize,
    world: usize,
    /// Ordered by (owner, name): each owner's variables are contiguous in its part.
    vars: Vec<Var>,
    /// Elements of every rank's part (the largest owner's, the others padded).
    part: usize,
    /// The collectives' dtype (the training dtype) and device (the group's).
    wire: (Kind, Device),
    /// The summed gradients since the last update of the parameters this rank owns, f32, flat.
    acc: Tensor,
    /// With local sums and several ranks: this rank's f32 sums of the whole model's gradients
    /// over the update's micro-batches, `world` parts back to back.
    local: Option<Tensor>,
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
    /// `local_sums`: sum the micro-batches locally and reduce once per update (see the module).
    pub fn new(
        vars: BTreeMap<String, Tensor>,
        group: &Group,
        config: AdamWConfig,
        local_sums: bool,
    ) -> Update {
        let sizes: Vec<(String, i64)> = vars
            .iter()
            .map(|(n, t)| (n.clone(), t.numel() as i64))
            .collect();
        let owners = assign_shards(&sizes, group.world);
        let mut order: Vec<(usize, String, Tensor)> =
            vars.into_iter().map(|(n, t)| (owners[&n], n, t)).collect();
        order.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        let mut filled = vec![0; group.world];
        let mut out = Vec::with_capacity(order.len());
        for (owner, name, tensor) in order {
            let start = filled[owner];
            filled[owner] += tensor.numel();
            out.push(Var {
                name,
                owner,
                elems: start..filled[owner],
                tensor,
            });
        }
        let part = filled.iter().copied().max().unwrap_or(0);
        let (kind, device) = out.first().map_or((Kind::Float, Device::Cpu), |v| {
            (v.tensor.kind(), v.tensor.device())
        });
        let owned = out
            .iter()
            .filter(|v| v.owner == group.rank)
            .map(|v| (v.name.clone(), v.tensor.shallow_clone()));
        let f32_on = |n: usize| Tensor::zeros([n as i64], (Kind::Float, device));
        Update {
            rank: group.rank,
            world: group.world,
            acc: f32_on(part),
            local: (local_sums && group.world > 1).then(|| f32_on(part * group.world)),
            optimizer: AdamW::new(owned, config),
            wire: (kind, group.wire_device(device)),
            vars: out,
            part,
        }
    }

    /// After each micro-batch's backward pass: adds the variables' gradients to the f32 sums
    /// (this rank's share, reduced over the ranks now, or the local sums, reduced by
    /// [`Update::reduce`]) and clears them.
    pub fn accumulate(&mut self, group: &mut Group) -> Result<()> {
        if self.world > 1 && self.local.is_none() {
            return self.reduce_scatter(group, None);
        }
        let sums = self.local.as_ref().unwrap_or(&self.acc);
        tch::no_grad(|| {
            for v in &self.vars {
                let mut g = v.tensor.grad();
                if g.defined() {
                    let at = v.owner * self.part + v.elems.start;
                    let _ = sums
                        .narrow(0, at as i64, v.elems.len() as i64)
                        .g_add_(&g.view(-1));
                    let _ = g.zero_();
                }
            }
        });
        Ok(())
    }

    /// Sums over the ranks, bucket by bucket, the gradients (`local`: the local sums) into the
    /// owners' f32 shares, then clears what was summed.
    fn reduce_scatter(&mut self, group: &mut Group, local: Option<&Tensor>) -> Result<()> {
        let (kind, device) = self.wire;
        let (w, part) = (self.world as i64, self.part);
        for start in (0..part).step_by(BUCKET) {
            let bucket = start..(start + BUCKET).min(part);
            let n = bucket.len() as i64;
            let input = match local {
                Some(sums) => sums
                    .view([w, part as i64])
                    .narrow(1, start as i64, n)
                    .to_device(device)
                    .to_kind(kind)
                    .contiguous(),
                None => {
                    // Padding stays zero: it adds nothing to anyone's share.
                    let input = Tensor::zeros([w, n], (kind, device));
                    tch::no_grad(|| {
                        for v in &self.vars {
                            let g = v.tensor.grad();
                            if let (true, Some((from, to, len))) = (g.defined(), v.overlap(&bucket))
                            {
                                input
                                    .get(v.owner as i64)
                                    .narrow(0, to, len)
                                    .copy_(&g.view(-1).narrow(0, from, len));
                            }
                        }
                    });
                    input
                }
            };
            let mut out = Tensor::empty([n], (kind, device));
            group.reduce_scatter_sum(&mut out, &mut input.view(-1))?;
            tch::no_grad(|| {
                let _ = self
                    .acc
                    .narrow(0, start as i64, n)
                    .g_add_(&out.to_device(self.acc.device()).to_kind(Kind::Float));
            });
        }
        tch::no_grad(|| match local {
            Some(sums) => {
                let _ = sums.shallow_clone().zero_();
            }
            None => {
                for v in &self.vars {
                    let mut g = v.tensor.grad();
                    if g.defined() {
                        let _ = g.zero_();
                    }
                }
            }
        });
        Ok(())
    }

    /// First half of an update: reduces the local sums (if kept), then the global gradient
    /// norm (the ranks' parts of the sum of squares, added) and `sums` (e.g. this rank's loss
    /// and token count) summed over the ranks. The caller looks at them (a non-finite loss
    /// stops every rank alike, before any weight changes), then calls [`Update::step`].
    pub fn reduce(&mut self, group: &mut Group, sums: [f64; 2]) -> Result<Reduced> {
        if let Some(local) = self.local.take() {
            let r = self.reduce_scatter(group, Some(&local));
            self.local = Some(local);
            r?;
        }
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
        let owned: Vec<Tensor> = self
            .vars
            .iter()
            .filter(|v| v.owner == self.rank)
            .map(|v| {
                self.acc
                    .narrow(0, v.elems.start as i64, v.elems.len() as i64)
                    .view(v.tensor.size().as_slice())
            })
            .collect();
        self.optimizer
            .step_with(lr, &owned, clip_coefficient(r.grad_norm, max_norm));
        let _ = self.acc.zero_();
        self.share_weights(group)
    }

    /// All-gathers the owners' weights in the training dtype, bucket by bucket.
    fn share_weights(&self, group: &mut Group) -> Result<()> {
        if self.world == 1 {
            return Ok(());
        }
        let (kind, device) = self.wire;
        for start in (0..self.part).step_by(BUCKET) {
            let bucket = start..(start + BUCKET).min(self.part);
            let n = bucket.len() as i64;
            let mine = Tensor::zeros([n], (kind, device));
            let mut all = Tensor::empty([self.world as i64 * n], (kind, device));
            tch::no_grad(|| {
                for v in self.vars.iter().filter(|v| v.owner == self.rank) {
                    if let Some((from, to, len)) = v.overlap(&bucket) {
                        mine.narrow(0, to, len)
                            .copy_(&v.tensor.detach().view(-1).narrow(0, from, len));
                    }
                }
            });
            group.all_gather(&mut all, &mine)?;
            tch::no_grad(|| {
                for v in self.vars.iter().filter(|v| v.owner != self.rank) {
                    if let Some((from, to, len)) = v.overlap(&bucket) {
                        v.tensor.view(-1).narrow(0, from, len).copy_(&all.narrow(
                            0,
                            v.owner as i64 * n + to,
                            len,
                        ));
                    }
                }
            });
        }
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
                crate::model::checkpoint::read_safetensors(&f)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::c10d::{Backend, Rendezvous};
    use std::time::Duration;

    /// Values that depend only on `seed` (the ranks run as threads: libtorch's global random
    /// generator would be shared between them).
    fn values(n: i64, seed: usize) -> Tensor {
        (Tensor::arange(n, (Kind::Float, Device::Cpu)) * (0.37 + seed as f64)).sin()
    }

    /// Three variables of uneven sizes (the owners' parts differ: padding is exercised).
    fn model() -> BTreeMap<String, Tensor> {
        [("a", 5), ("b", 300), ("c", 7)]
            .into_iter()
            .map(|(n, k)| (n.to_string(), values(k, k as usize).set_requires_grad(true)))
            .collect()
    }

    /// The gradient of micro-batch `m` of rank `r`: d/dw of sum(w^2 * x) for a fixed x.
    fn backward(vars: &BTreeMap<String, Tensor>, r: usize, m: usize, step: usize) {
        for (i, t) in vars.values().enumerate() {
            let x = values(t.numel() as i64, step * 100 + r * 10 + m * 3 + i);
            (t * t * x).sum(Kind::Float).backward();
        }
    }

    /// Two updates of two micro-batches per rank; with one rank, that rank does every rank's
    /// micro-batches of `world`. Returns the weights.
    fn train(group: &mut Group, world: usize, local_sums: bool) -> Vec<Tensor> {
        let vars = model();
        let config = AdamWConfig::default();
        let shared = vars.iter().map(|(n, t)| (n.clone(), t.shallow_clone()));
        let mut u = Update::new(shared.collect(), group, config, local_sums);
        let ranks: Vec<usize> = if group.world == 1 {
            (0..world).collect()
        } else {
            vec![group.rank]
        };
        for step in 0..2 {
            for &r in &ranks {
                for m in 0..2 {
                    backward(&vars, r, m, step);
                    u.accumulate(group).unwrap();
                }
            }
            let reduced = u.reduce(group, [0.0, 0.0]).unwrap();
            u.step(group, 1e-2, 1.0, &reduced).unwrap();
        }
        vars.values().map(|t| t.detach().copy()).collect()
    }

    #[test]
    fn two_ranks_on_gloo_reach_one_ranks_weights_with_and_without_local_sums() {
        let one = train(&mut Group::single(), 2, false);
        for local_sums in [false, true] {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let weights: Vec<Vec<Tensor>> = std::thread::scope(|s| {
                let ranks: Vec<_> = (0..2)
                    .map(|rank| {
                        s.spawn(move || {
                            let rdzv = Rendezvous {
                                master_addr: "127.0.0.1".into(),
                                master_port: port,
                                rank,
                                world: 2,
                                local_rank: rank,
                                local_world: 2,
                            };
                            let timeout = Duration::from_secs(60);
                            let bind = Some("127.0.0.1");
                            let mut g =
                                Group::join(&rdzv, Backend::Gloo, "t", bind, timeout).unwrap();
                            train(&mut g, 2, local_sums)
                        })
                    })
                    .collect();
                ranks.into_iter().map(|h| h.join().unwrap()).collect()
            });
            for w in &weights {
                for (a, b) in one.iter().zip(w) {
                    let d = (a - b).abs().max().double_value(&[]);
                    assert!(d < 1e-5, "local_sums {local_sums}: differs by {d}");
                }
            }
            // Every rank holds the same model after the all-gather.
            assert!(weights[0].iter().zip(&weights[1]).all(|(a, b)| a.equal(b)));
        }
    }
}
