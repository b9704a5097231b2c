//! libtorch's c10d collectives for the data-parallel ranks: a process group (Gloo; NCCL once it
//! has a library of its own, see `build.rs`) whose ranks meet through c10d's TCPStore as
//! torchrun's do (`MASTER_ADDR`, `MASTER_PORT`, `WORLD_SIZE`, `RANK`). The group itself is
//! libtorch's (`csrc/c10d.cpp` is only its C face); tensors cross as tch's handles, without a
//! copy.
use anyhow::{anyhow, bail, Context, Result};
use std::ffi::{c_char, CStr, CString};
use std::ptr::NonNull;
use std::time::Duration;
use tch::{Device, Tensor};
use torch_sys::C_tensor;

#[repr(C)]
struct RawGroup {
    _opaque: [u8; 0],
}

extern "C" {
    #[allow(clippy::too_many_arguments)]
    fn rlt_c10d_new(
        master: *const c_char,
        port: u16,
        rank: i32,
        world: i32,
        timeout_ms: i64,
        op_timeout_ms: i64,
        nccl: i32,
        prefix: *const c_char,
        device_host: *const c_char,
        err: *mut *mut c_char,
    ) -> *mut RawGroup;
    fn rlt_c10d_free(pg: *mut RawGroup);
    fn rlt_c10d_free_error(err: *mut c_char);
    fn rlt_c10d_has_nccl() -> i32;
    fn rlt_c10d_all_reduce(pg: *mut RawGroup, t: *mut C_tensor, err: *mut *mut c_char) -> i32;
    fn rlt_c10d_reduce_scatter(
        pg: *mut RawGroup,
        out: *mut C_tensor,
        input: *mut C_tensor,
        err: *mut *mut c_char,
    ) -> i32;
    fn rlt_c10d_all_gather(
        pg: *mut RawGroup,
        out: *mut C_tensor,
        input: *mut C_tensor,
        err: *mut *mut c_char,
    ) -> i32;
    fn rlt_c10d_broadcast(
        pg: *mut RawGroup,
        t: *mut C_tensor,
        root: i32,
        err: *mut *mut c_char,
    ) -> i32;
    fn rlt_c10d_barrier(pg: *mut RawGroup, timeout_ms: i64, err: *mut *mut c_char) -> i32;
}

/// The c10d backend of a group: NCCL moves CUDA tensors GPU to GPU (NVLink, InfiniBand),
/// Gloo moves CPU tensors over TCP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Gloo,
    Nccl,
}

impl Backend {
    /// The backend for tensors on `device`.
    pub fn for_device(device: Device) -> Backend {
        match device {
            Device::Cuda(_) => Backend::Nccl,
            _ => Backend::Gloo,
        }
    }

    /// Whether this build of the trainer can run it (Gloo only, for now).
    pub fn available(self) -> bool {
        self == Backend::Gloo || unsafe { rlt_c10d_has_nccl() } == 1
    }
}

/// Where a rank meets the others: torchrun's names, as the operator sets them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendezvous {
    /// Host of rank 0, which serves the TCPStore.
    pub master_addr: String,
    pub master_port: u16,
    pub rank: usize,
    pub world: usize,
    /// This process's rank among those of its pod, which picks its device.
    pub local_rank: usize,
    pub local_world: usize,
}

impl Rendezvous {
    /// From torchrun's variables; `None` when `WORLD_SIZE` is unset (a single process).
    pub fn from_env() -> Result<Option<Rendezvous>> {
        Rendezvous::from_vars(|k| std::env::var(k).ok())
    }

    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<Rendezvous>> {
        let Some(world) = var("WORLD_SIZE") else {
            return Ok(None);
        };
        let number = |k: &str, v: &str| -> Result<usize> {
            v.trim()
                .parse()
                .map_err(|_| anyhow!("{k}={v:?} is not a non-negative integer"))
        };
        let required = |k: &str| -> Result<String> {
            var(k).ok_or_else(|| anyhow!("WORLD_SIZE is set but {k} is not"))
        };
        let world = number("WORLD_SIZE", &world)?;
        let rank = number("RANK", &required("RANK")?)?;
        let port = required("MASTER_PORT")?;
        let master_port = port
            .trim()
            .parse()
            .map_err(|_| anyhow!("MASTER_PORT={port:?} is not a port"))?;
        let local_rank = var("LOCAL_RANK").map_or(Ok(0), |v| number("LOCAL_RANK", &v))?;
        let local_world =
            var("LOCAL_WORLD_SIZE").map_or(Ok(1), |v| number("LOCAL_WORLD_SIZE", &v))?;
        if world == 0 || rank >= world {
            bail!("RANK {rank} is not below WORLD_SIZE {world}");
        }
        if local_rank >= local_world.max(1) {
            bail!("LOCAL_RANK {local_rank} is not below LOCAL_WORLD_SIZE {local_world}");
        }
        Ok(Some(Rendezvous {
            master_addr: required("MASTER_ADDR")?,
            master_port,
            rank,
            world,
            local_rank,
            local_world,
        }))
    }
}

/// This rank's handle on a c10d process group. Every collective blocks until it is done on
/// this rank (its error, a peer lost or the timeout, is returned).
pub struct ProcessGroup {
    raw: NonNull<RawGroup>,
    pub rank: usize,
    pub world: usize,
    pub backend: Backend,
}

// libtorch's process groups are used from any thread (one at a time here: `&mut self`).
unsafe impl Send for ProcessGroup {}

/// Runs one C call with an error slot; its message becomes the error.
fn call(what: &str, f: impl FnOnce(*mut *mut c_char) -> i32) -> Result<()> {
    let mut err: *mut c_char = std::ptr::null_mut();
    if f(&mut err) == 0 {
        return Ok(());
    }
    Err(anyhow!("{what}: {}", take_error(err)))
}

fn take_error(err: *mut c_char) -> String {
    if err.is_null() {
        return "failed without a message".into();
    }
    let message = unsafe { CStr::from_ptr(err) }
        .to_string_lossy()
        .into_owned();
    unsafe { rlt_c10d_free_error(err) };
    message
}

impl ProcessGroup {
    /// Joins the group: rank 0 serves the TCPStore at `MASTER_ADDR:MASTER_PORT`, every rank
    /// waits there for all `world` ranks within `timeout` (pods start at different times);
    /// a collective then fails when a peer is not there within `op_timeout`.
    /// `tag` names the group in the store (the stage attempt: a straggler of another attempt
    /// never meets this one). Gloo binds to `bind` (this pod's address), else to what this
    /// machine's hostname resolves to, as torchrun does.
    pub fn join(
        rdzv: &Rendezvous,
        backend: Backend,
        tag: &str,
        bind: Option<&str>,
        timeout: Duration,
        op_timeout: Duration,
    ) -> Result<ProcessGroup> {
        if !backend.available() {
            bail!("c10d backend {backend:?} is not in this build of rlt-trainer");
        }
        let master = CString::new(rdzv.master_addr.as_str()).context("MASTER_ADDR")?;
        let prefix = CString::new(tag).context("group tag")?;
        let bind = bind.map(CString::new).transpose().context("bind address")?;
        let mut err: *mut c_char = std::ptr::null_mut();
        let raw = unsafe {
            rlt_c10d_new(
                master.as_ptr(),
                rdzv.master_port,
                rdzv.rank as i32,
                rdzv.world as i32,
                millis(timeout),
                millis(op_timeout),
                i32::from(backend == Backend::Nccl),
                prefix.as_ptr(),
                bind.as_ref().map_or(std::ptr::null(), |b| b.as_ptr()),
                &mut err,
            )
        };
        let raw = NonNull::new(raw).ok_or_else(|| {
            anyhow!(
                "rank {} of {}: joining the {backend:?} group at {}:{} ({tag}): {}",
                rdzv.rank,
                rdzv.world,
                rdzv.master_addr,
                rdzv.master_port,
                take_error(err)
            )
        })?;
        Ok(ProcessGroup {
            raw,
            rank: rdzv.rank,
            world: rdzv.world,
            backend,
        })
    }

    /// Sums `t` over the ranks, in place.
    pub fn all_reduce_sum(&mut self, t: &mut Tensor) -> Result<()> {
        let pg = self.raw.as_ptr();
        call("all-reduce", |e| unsafe {
            rlt_c10d_all_reduce(pg, t.as_mut_ptr(), e)
        })
    }

    /// `out` gets this rank's shard of the sum of every rank's `input`: `input` holds
    /// `world` shards of `out`'s size, back to back.
    pub fn reduce_scatter_sum(&mut self, out: &mut Tensor, input: &Tensor) -> Result<()> {
        self.check_sizes("reduce-scatter", out, input)?;
        let pg = self.raw.as_ptr();
        call("reduce-scatter", |e| unsafe {
            rlt_c10d_reduce_scatter(pg, out.as_mut_ptr(), input.as_ptr() as *mut C_tensor, e)
        })
    }

    /// `out` gets every rank's `input`, back to back in rank order.
    pub fn all_gather(&mut self, out: &mut Tensor, input: &Tensor) -> Result<()> {
        self.check_sizes("all-gather", input, out)?;
        let pg = self.raw.as_ptr();
        call("all-gather", |e| unsafe {
            rlt_c10d_all_gather(pg, out.as_mut_ptr(), input.as_ptr() as *mut C_tensor, e)
        })
    }

    /// Every rank's `t` becomes rank `root`'s.
    pub fn broadcast(&mut self, t: &mut Tensor, root: usize) -> Result<()> {
        let pg = self.raw.as_ptr();
        call("broadcast", |e| unsafe {
            rlt_c10d_broadcast(pg, t.as_mut_ptr(), root as i32, e)
        })
    }

    /// Waits for every rank, up to `timeout` (`None`: the group's collective timeout).
    pub fn barrier(&mut self, timeout: Option<Duration>) -> Result<()> {
        let pg = self.raw.as_ptr();
        let ms = timeout.map_or(0, millis);
        call("barrier", |e| unsafe { rlt_c10d_barrier(pg, ms, e) })
    }

    /// c10d's single-tensor collectives take one shard and `world` of them: said here with
    /// the sizes, rather than as libtorch's assertion.
    fn check_sizes(&self, what: &str, shard: &Tensor, whole: &Tensor) -> Result<()> {
        let (s, w) = (shard.numel(), whole.numel());
        if s * self.world != w {
            bail!(
                "{what}: {w} elements are not {} shards of {s} (pad to a multiple of the world size)",
                self.world
            );
        }
        Ok(())
    }
}

fn millis(d: Duration) -> i64 {
    d.as_millis().min(i64::MAX as u128) as i64
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        unsafe { rlt_c10d_free(self.raw.as_ptr()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Result<Option<Rendezvous>> {
        Rendezvous::from_vars(|k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        })
    }

    fn error(pairs: &[(&str, &str)]) -> String {
        vars(pairs).unwrap_err().to_string()
    }

    #[test]
    fn torchruns_variables_make_the_rendezvous_and_bad_ones_are_named() {
        assert_eq!(vars(&[]).unwrap(), None);
        let r = vars(&[
            ("WORLD_SIZE", "4"),
            ("RANK", "3"),
            ("MASTER_ADDR", "run-warmup-0-0.run-ranks"),
            ("MASTER_PORT", "29500"),
            ("LOCAL_RANK", "1"),
            ("LOCAL_WORLD_SIZE", "2"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            (r.rank, r.world, r.local_rank, r.master_port),
            (3, 4, 1, 29500)
        );
        assert!(error(&[("WORLD_SIZE", "2")]).contains("RANK is not"));
        let far = [("WORLD_SIZE", "2"), ("RANK", "2"), ("MASTER_PORT", "1")];
        assert!(error(&far).contains("RANK 2 is not below WORLD_SIZE 2"));
        let port = [("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_PORT", "x")];
        assert!(error(&port).contains("MASTER_PORT=\"x\""));
    }
}
