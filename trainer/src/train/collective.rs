//! The data-parallel ranks of a fine-tune as one group: libtorch's c10d process group
//! ([`crate::train::c10d`]) when there are several, nothing at all when there is one, behind the few
//! operations the ranks need. A collective that fails after the ranks met means a peer went
//! away (exited, its pod lost, or hung past the timeout): the error says so and carries the
//! peer-lost exit code, so the operator blames the lost pod and not this one.
use crate::train::c10d::{Backend, ProcessGroup, Rendezvous};
use anyhow::{Context, Result};
use std::time::Duration;
use tch::{Device, Kind, Tensor};

/// How long a collective waits for its peers: a step of a large model between two collectives
/// (or rank 0 writing a checkpoint) takes a while; a peer that exited is noticed at once.
pub const COLLECTIVE_TIMEOUT: Duration = Duration::from_secs(1800);

/// This rank's handle on its group. With one rank every operation is the identity.
pub struct Group {
    pub rank: usize,
    pub world: usize,
    pg: Option<ProcessGroup>,
}

impl Group {
    /// A group of one: training as a single process.
    pub fn single() -> Group {
        Group {
            rank: 0,
            world: 1,
            pg: None,
        }
    }

    /// Joins the ranks of `rdzv` on `backend` (see [`ProcessGroup::join`]); `tag` (the stage
    /// attempt) keeps a straggler of another attempt out.
    pub fn join(
        rdzv: &Rendezvous,
        backend: Backend,
        tag: &str,
        bind: Option<&str>,
        timeout: Duration,
    ) -> Result<Group> {
        if rdzv.world == 1 {
            return Ok(Group::single());
        }
        let pg = ProcessGroup::join(rdzv, backend, tag, bind, timeout, COLLECTIVE_TIMEOUT)?;
        Ok(Group {
            rank: rdzv.rank,
            world: rdzv.world,
            pg: Some(pg),
        })
    }

    /// Where this group's collectives take their tensors from: the model's device for NCCL,
    /// host memory for Gloo (and for a group of one, which moves nothing).
    pub fn wire_device(&self, model: Device) -> Device {
        match &self.pg {
            Some(pg) if pg.backend == Backend::Nccl => model,
            _ => Device::Cpu,
        }
    }

    fn lost(&self, what: &str) -> impl FnOnce(anyhow::Error) -> anyhow::Error {
        let rank = self.rank;
        let what = what.to_string();
        move |e| {
            crate::exit::peer_lost(e.context(format!(
                "rank {rank}: {what} with the other ranks failed (did one exit?)"
            )))
        }
    }

    /// `out` gets this rank's shard of the sum over the ranks of `input` (`world` shards of
    /// `out`'s size, back to back; left as scratch).
    pub fn reduce_scatter_sum(&mut self, out: &mut Tensor, input: &mut Tensor) -> Result<()> {
        let lost = self.lost("reduce-scatter");
        let (rank, n) = (self.rank as i64, out.numel() as i64);
        match &mut self.pg {
            None => {
                tch::no_grad(|| out.copy_(input));
                Ok(())
            }
            // Gloo's ring all-reduce moves a buffer about twice as fast as its reduce-scatter
            // (`rlt-trainer bench-collectives`): sum it all, keep this rank's shard.
            Some(pg) if pg.backend == Backend::Gloo => {
                pg.all_reduce_sum(input).map_err(lost)?;
                tch::no_grad(|| out.copy_(&input.narrow(0, rank * n, n)));
                Ok(())
            }
            Some(pg) => pg.reduce_scatter_sum(out, input).map_err(lost),
        }
    }

    /// `out` gets every rank's `input`, back to back in rank order.
    pub fn all_gather(&mut self, out: &mut Tensor, input: &Tensor) -> Result<()> {
        let lost = self.lost("all-gather");
        let (rank, n) = (self.rank as i64, input.numel() as i64);
        match &mut self.pg {
            None => {
                tch::no_grad(|| out.copy_(input));
                Ok(())
            }
            // As above: on Gloo a sum in which each rank gives its own part and zeros elsewhere
            // (exact: x + 0 = x) beats its all-gather.
            Some(pg) if pg.backend == Backend::Gloo => {
                tch::no_grad(|| {
                    let _ = out.zero_();
                    out.narrow(0, rank * n, n).copy_(input);
                });
                pg.all_reduce_sum(out).map_err(lost)
            }
            Some(pg) => pg.all_gather(out, input).map_err(lost),
        }
    }

    /// Every rank's `values`, summed element-wise in f64: every rank gets the same bits, so
    /// decisions taken on them (stop on a non-finite loss, clip) agree.
    pub fn sum(&mut self, values: &[f64]) -> Result<Vec<f64>> {
        let lost = self.lost("summing figures");
        let Some(pg) = &mut self.pg else {
            return Ok(values.to_vec());
        };
        let mut t = Tensor::from_slice(values);
        pg.all_reduce_sum(&mut t).map_err(lost)?;
        Vec::<f64>::try_from(&t.to_kind(Kind::Double)).context("reading the sums")
    }

    /// Waits until every rank got here.
    pub fn barrier(&mut self) -> Result<()> {
        let lost = self.lost("a barrier");
        match &mut self.pg {
            None => Ok(()),
            Some(pg) => pg.barrier(None).map_err(lost),
        }
    }

    /// [`Group::barrier`] for ranks that wait while one of them does something long alone
    /// (rank 0 collecting a student's explanations): a week instead of the collective timeout.
    pub fn barrier_unbounded(&mut self) -> Result<()> {
        let lost = self.lost("a barrier");
        match &mut self.pg {
            None => Ok(()),
            Some(pg) => pg
                .barrier(Some(Duration::from_secs(7 * 24 * 3600)))
                .map_err(lost),
        }
    }
}
