//! The data-parallel ranks' collective: a ring of TCP connections, each rank connected to the
//! next, over which gradients are reduce-scattered (in f32) and updated weights all-gathered
//! (as raw bytes, in the training dtype). Both move every byte once per rank around the ring
//! ((W-1)/W of the buffer per rank and direction), the bandwidth-optimal schedule NCCL's ring
//! also uses, without anything but the standard library: the ranks of warm-up and distillation
//! need no parameter servers, and the same code runs on CPU and, through host buffers, CUDA.
//!
//! Tensors cross as their memory, with no per-element conversion; the ranks run one image on
//! one architecture, so byte order is the machine's.
use anyhow::{anyhow, bail, Context, Result};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::ops::Range;
use std::time::{Duration, Instant};

/// First bytes of a connection: "RLTR", then the sender's rank, the world size and the stage
/// attempt, so a rank of another group or attempt is refused instead of corrupting a sum.
const MAGIC: &[u8; 4] = b"RLTR";

/// Where rank `rank` of `world` meets the others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    pub rank: usize,
    pub world: usize,
    /// `host:port` of every rank, in rank order.
    pub addresses: Vec<String>,
}

impl Topology {
    /// The ranks of a data-parallel stage from the stage contract: `peers` lists each pod's
    /// `host:port` (`RLT_PEERS`), a pod runs `ranks_per_pod` ranks on consecutive ports, and
    /// rank `pod * ranks_per_pod + local` is this process.
    pub fn from_pods(
        peers: &str,
        ranks_per_pod: usize,
        pod: usize,
        local: usize,
    ) -> Result<Topology> {
        let ranks_per_pod = ranks_per_pod.max(1);
        let mut addresses = Vec::new();
        for peer in peers.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (host, port) = peer
                .rsplit_once(':')
                .ok_or_else(|| anyhow!("peer {peer:?} is not host:port"))?;
            let port: u16 = port
                .parse()
                .map_err(|_| anyhow!("peer {peer:?}: port {port:?} is not a number"))?;
            for l in 0..ranks_per_pod {
                let p = port.checked_add(l as u16).ok_or_else(|| {
                    anyhow!("peer {peer:?}: port {port} + local rank {l} overflows")
                })?;
                addresses.push(format!("{host}:{p}"));
            }
        }
        if addresses.is_empty() {
            bail!("no peers given (expected host:port, comma-separated)");
        }
        let rank = pod * ranks_per_pod + local;
        if local >= ranks_per_pod || rank >= addresses.len() {
            bail!(
                "rank {rank} (pod {pod}, local rank {local} of {ranks_per_pod}) is not among the \
                 {} ranks the peers list",
                addresses.len()
            );
        }
        Ok(Topology {
            rank,
            world: addresses.len(),
            addresses,
        })
    }

    /// The port this rank listens on.
    pub fn port(&self) -> Result<u16> {
        let a = &self.addresses[self.rank];
        a.rsplit_once(':')
            .and_then(|(_, p)| p.parse().ok())
            .ok_or_else(|| anyhow!("address {a:?} has no port"))
    }
}

/// The element ranges of a buffer of `len` elements cut into `world` nearly equal parts (the
/// first `len % world` one longer).
pub fn even_bounds(len: usize, world: usize) -> Vec<Range<usize>> {
    let (base, extra) = (len / world, len % world);
    let mut start = 0;
    (0..world)
        .map(|i| {
            let n = base + usize::from(i < extra);
            let r = start..start + n;
            start += n;
            r
        })
        .collect()
}

/// This rank's end of the ring. With one rank there is no ring and every operation is the
/// identity.
pub struct Group {
    pub rank: usize,
    pub world: usize,
    ring: Option<Ring>,
    /// Bytes this rank sent, for throughput figures.
    pub bytes_sent: u64,
}

struct Ring {
    next: TcpStream,
    prev: TcpStream,
}

impl Group {
    /// A group of one: training as a single process.
    pub fn single() -> Group {
        Group {
            rank: 0,
            world: 1,
            ring: None,
            bytes_sent: 0,
        }
    }

    /// Joins the ring: listens on `bind`:(this rank's port), dials the next rank until it
    /// answers (pods start at different times) and accepts the previous one, both within
    /// `timeout`. `tag` (the stage attempt) must match on both ends of every connection.
    pub fn connect(topo: &Topology, bind: &str, tag: u32, timeout: Duration) -> Result<Group> {
        if topo.world == 1 {
            return Ok(Group::single());
        }
        let port = topo.port()?;
        let listener = TcpListener::bind((bind, port))
            .with_context(|| format!("rank {}: listening on {bind}:{port}", topo.rank))?;
        let deadline = Instant::now() + timeout;
        let prev_rank = (topo.rank + topo.world - 1) % topo.world;
        let next_rank = (topo.rank + 1) % topo.world;
        let (world, rank) = (topo.world, topo.rank);
        let next_addr = topo.addresses[next_rank].clone();
        let (prev, next) = std::thread::scope(|s| {
            let accepting = s.spawn(|| accept(&listener, prev_rank, world, tag, deadline));
            let next = dial(&next_addr, rank, world, tag, deadline).with_context(|| {
                format!("rank {rank}: connecting to rank {next_rank} at {next_addr}")
            });
            let prev = accepting
                .join()
                .map_err(|_| anyhow!("accepting thread panicked"))?
                .with_context(|| {
                    format!("rank {rank}: waiting for rank {prev_rank} on port {port}")
                });
            Ok::<_, anyhow::Error>((prev?, next?))
        })?;
        for s in [&prev, &next] {
            s.set_nodelay(true)?;
            // A peer that died closes its sockets (an error at once); one that hangs is caught
            // here. Generous: a step of a large model between two collectives takes a while.
            s.set_read_timeout(Some(Duration::from_secs(1800)))?;
        }
        Ok(Group {
            rank,
            world,
            ring: Some(Ring { next, prev }),
            bytes_sent: 0,
        })
    }

    /// Sums `buf` over the ranks, leaving each rank the sum of its own part:
    /// `buf[bounds[rank]]` is complete on rank `rank`, the rest of `buf` is scratch.
    pub fn reduce_scatter(&mut self, buf: &mut [f32], bounds: &[Range<usize>]) -> Result<()> {
        let Some(ring) = &mut self.ring else {
            return Ok(());
        };
        let (w, r) = (self.world, self.rank);
        check_bounds(bounds, w, buf.len())?;
        let mut scratch = vec![0f32; bounds.iter().map(|b| b.len()).max().unwrap_or(0)];
        // Step s: pass on the partial sum of part r-s-1, receive part r-s-2 and add ours to
        // it; after w-1 steps the part received last, r, holds every rank's contribution.
        for s in 0..w - 1 {
            let send = bounds[(r + 2 * w - s - 1) % w].clone();
            let recv = bounds[(r + 2 * w - s - 2) % w].clone();
            let incoming = &mut scratch[..recv.len()];
            exchange(ring, as_bytes(&buf[send.clone()]), as_bytes_mut(incoming))
                .with_context(|| format!("rank {r}: reduce-scatter step {s}"))?;
            self.bytes_sent += (send.len() * 4) as u64;
            for (d, x) in buf[recv].iter_mut().zip(incoming.iter()) {
                *d += *x;
            }
        }
        Ok(())
    }

    /// Gives every rank every part: on entry rank `rank` holds `buf[bounds[rank]]` (bytes),
    /// on return all of `buf` is the same on every rank.
    pub fn all_gather(&mut self, buf: &mut [u8], bounds: &[Range<usize>]) -> Result<()> {
        let Some(ring) = &mut self.ring else {
            return Ok(());
        };
        let (w, r) = (self.world, self.rank);
        check_bounds(bounds, w, buf.len())?;
        // Step s: pass on part r-s (our own first), receive part r-s-1 in place.
        for s in 0..w - 1 {
            let send = bounds[(r + w - s) % w].clone();
            let recv = bounds[(r + 2 * w - s - 1) % w].clone();
            let (out, incoming) = disjoint(buf, send.clone(), recv);
            exchange(ring, out, incoming)
                .with_context(|| format!("rank {r}: all-gather step {s}"))?;
            self.bytes_sent += send.len() as u64;
        }
        Ok(())
    }

    /// Every rank's `values`, summed element-wise in rank order (the same f64 bits on every
    /// rank, so decisions taken on them agree).
    pub fn sum(&mut self, values: &[f64]) -> Result<Vec<f64>> {
        if self.ring.is_none() {
            return Ok(values.to_vec());
        }
        let n = values.len();
        let mut all = vec![0f64; n * self.world];
        all[self.rank * n..(self.rank + 1) * n].copy_from_slice(values);
        let bounds: Vec<Range<usize>> = (0..self.world)
            .map(|i| i * n * 8..(i + 1) * n * 8)
            .collect();
        // SAFETY: f64 has no invalid bit patterns; the view covers exactly `all`.
        let bytes =
            unsafe { std::slice::from_raw_parts_mut(all.as_mut_ptr().cast::<u8>(), all.len() * 8) };
        self.all_gather(bytes, &bounds)?;
        Ok((0..n)
            .map(|i| (0..self.world).map(|k| all[k * n + i]).sum())
            .collect())
    }

    /// Waits until every rank got here.
    pub fn barrier(&mut self) -> Result<()> {
        self.sum(&[0.0]).map(|_| ())
    }

    /// [`Group::barrier`] without the read timeout: for ranks that wait while one of them does
    /// something long alone (rank 0 collecting a student's explanations).
    pub fn barrier_unbounded(&mut self) -> Result<()> {
        let Some(ring) = &self.ring else {
            return Ok(());
        };
        let timeout = ring.prev.read_timeout()?;
        ring.prev.set_read_timeout(None)?;
        let r = self.barrier();
        if let Some(ring) = &self.ring {
            ring.prev.set_read_timeout(timeout)?;
        }
        r
    }
}

fn check_bounds(bounds: &[Range<usize>], world: usize, len: usize) -> Result<()> {
    if bounds.len() != world || bounds.iter().any(|b| b.end > len || b.start > b.end) {
        bail!(
            "{} parts for {world} ranks over a buffer of {len}",
            bounds.len()
        );
    }
    Ok(())
}

/// A shared and a mutable view of two non-overlapping ranges of `buf`.
fn disjoint(buf: &mut [u8], a: Range<usize>, b: Range<usize>) -> (&[u8], &mut [u8]) {
    if a.end <= b.start {
        let (lo, hi) = buf.split_at_mut(b.start);
        (&lo[a], &mut hi[..b.len()])
    } else {
        assert!(b.end <= a.start, "overlapping parts {a:?} and {b:?}");
        let (lo, hi) = buf.split_at_mut(a.start);
        (&hi[..a.len()], &mut lo[b])
    }
}

fn as_bytes(v: &[f32]) -> &[u8] {
    // SAFETY: the view covers exactly the slice; u8 has no alignment requirement.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

fn as_bytes_mut(v: &mut [f32]) -> &mut [u8] {
    // SAFETY: as above, and every bit pattern is a valid f32.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

/// Sends `out` to the next rank while receiving `incoming` from the previous one (both at
/// once: with every rank sending first, large parts would fill the socket buffers and stall).
fn exchange(ring: &mut Ring, out: &[u8], incoming: &mut [u8]) -> Result<()> {
    let Ring { next, prev } = ring;
    std::thread::scope(|s| {
        let sending = s.spawn(move || next.write_all(out));
        let received = prev.read_exact(incoming);
        let sent = sending
            .join()
            .map_err(|_| anyhow!("sending thread panicked"))?;
        // A rank that went away mid-exchange: the failure is that peer's (exit code).
        sent.context("sending to the next rank (did it exit?)")
            .map_err(crate::exit::peer_lost)?;
        received
            .context("receiving from the previous rank (did it exit?)")
            .map_err(crate::exit::peer_lost)?;
        Ok(())
    })
}

fn hello(rank: usize, world: usize, tag: u32) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(MAGIC);
    h[4..8].copy_from_slice(&(rank as u32).to_le_bytes());
    h[8..12].copy_from_slice(&(world as u32).to_le_bytes());
    h[12..].copy_from_slice(&tag.to_le_bytes());
    h
}

fn dial(addr: &str, rank: usize, world: usize, tag: u32, deadline: Instant) -> Result<TcpStream> {
    let mut wait = Duration::from_millis(50);
    loop {
        let attempt = || -> Result<TcpStream> {
            let target: SocketAddr = addr
                .to_socket_addrs()?
                .next()
                .ok_or_else(|| anyhow!("{addr} resolves to nothing"))?;
            let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(5))?;
            s.write_all(&hello(rank, world, tag))?;
            Ok(s)
        };
        match attempt() {
            Ok(s) => return Ok(s),
            // Not up yet (or its DNS name not yet published): try again until the deadline.
            Err(e) if Instant::now() + wait < deadline => {
                tracing::debug!(addr, "peer not reachable yet: {e:#}");
                std::thread::sleep(wait);
                wait = (wait * 2).min(Duration::from_secs(2));
            }
            Err(e) => return Err(e.context("the peer did not answer before the deadline")),
        }
    }
}

fn accept(
    listener: &TcpListener,
    expect: usize,
    world: usize,
    tag: u32,
    deadline: Instant,
) -> Result<TcpStream> {
    listener.set_nonblocking(true)?;
    loop {
        match listener.accept() {
            Ok((mut s, from)) => {
                s.set_nonblocking(false)?;
                s.set_read_timeout(Some(Duration::from_secs(10)))?;
                let mut h = [0u8; 16];
                s.read_exact(&mut h)
                    .with_context(|| format!("reading the hello of {from}"))?;
                let want = hello(expect, world, tag);
                if h != want {
                    let field = |r: Range<usize>| u32::from_le_bytes(h[r].try_into().unwrap());
                    bail!(
                        "{from} is not rank {expect} of {world} in attempt {tag}: it says rank {} \
                         of {} in attempt {}{}",
                        field(4..8),
                        field(8..12),
                        field(12..16),
                        if &h[..4] == MAGIC {
                            ""
                        } else {
                            " (not an rlt-trainer rank)"
                        }
                    );
                }
                return Ok(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    bail!("no connection before the deadline");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free_ports(n: usize) -> Vec<String> {
        // Bind all first so the ports are distinct, then release them for the ranks.
        let ls: Vec<TcpListener> = (0..n)
            .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        ls.iter()
            .map(|l| format!("127.0.0.1:{}", l.local_addr().unwrap().port()))
            .collect()
    }

    /// Runs `f` on `world` ranks in threads, each with its joined group.
    fn on_ranks<T: Send>(world: usize, f: impl Fn(&mut Group) -> T + Sync) -> Vec<T> {
        let addresses = free_ports(world);
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..world)
                .map(|rank| {
                    let topo = Topology {
                        rank,
                        world,
                        addresses: addresses.clone(),
                    };
                    let f = &f;
                    s.spawn(move || {
                        let mut g =
                            Group::connect(&topo, "127.0.0.1", 7, Duration::from_secs(20)).unwrap();
                        f(&mut g)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn reduce_scatter_then_all_gather_is_an_all_reduce_for_any_world_and_uneven_parts() {
        for world in [1, 2, 3, 4] {
            let len = 1001;
            let results = on_ranks(world, |g| {
                let mut buf: Vec<f32> = (0..len).map(|i| (i * (g.rank + 1)) as f32).collect();
                let bounds = even_bounds(len, g.world);
                g.reduce_scatter(&mut buf, &bounds).unwrap();
                let mine = bounds[g.rank].clone();
                let mut bytes = vec![0u8; len * 4];
                bytes[mine.start * 4..mine.end * 4].copy_from_slice(as_bytes(&buf[mine]));
                let byte_bounds: Vec<_> = bounds.iter().map(|b| b.start * 4..b.end * 4).collect();
                g.all_gather(&mut bytes, &byte_bounds).unwrap();
                let sums = g.sum(&[g.rank as f64, 0.5]).unwrap();
                (bytes, sums)
            });
            let factor: usize = (1..=world).sum();
            let want: Vec<f32> = (0..len).map(|i| (i * factor) as f32).collect();
            for (bytes, sums) in results {
                assert_eq!(bytes, as_bytes(&want), "world {world}");
                assert_eq!(
                    sums,
                    vec![(0..world).sum::<usize>() as f64, 0.5 * world as f64]
                );
            }
        }
    }

    #[test]
    fn peers_of_pods_become_one_address_per_rank() {
        let t = Topology::from_pods("a:29500,b:29500", 2, 1, 1).unwrap();
        assert_eq!(t.rank, 3);
        assert_eq!(t.world, 4);
        assert_eq!(t.addresses, ["a:29500", "a:29501", "b:29500", "b:29501"]);
        assert_eq!(t.port().unwrap(), 29501);
        let err = Topology::from_pods("a:29500", 2, 1, 0).unwrap_err();
        assert!(err.to_string().contains("not among the 2 ranks"), "{err}");
        assert!(Topology::from_pods("a", 1, 0, 0).is_err());
        assert_eq!(even_bounds(10, 3), vec![0..4, 4..7, 7..10]);
    }

    #[test]
    fn a_rank_of_another_attempt_is_refused_and_a_dead_peer_is_an_error() {
        let addresses = free_ports(2);
        let topo = |rank| Topology {
            rank,
            world: 2,
            addresses: addresses.clone(),
        };
        let (a, b) = std::thread::scope(|s| {
            let a = s.spawn(|| Group::connect(&topo(0), "127.0.0.1", 1, Duration::from_secs(3)));
            let b = s.spawn(|| Group::connect(&topo(1), "127.0.0.1", 2, Duration::from_secs(3)));
            (a.join().unwrap(), b.join().unwrap())
        });
        let err = format!("{:#}", a.err().unwrap());
        assert!(err.contains("attempt"), "{err}");
        assert!(b.is_err());

        let addresses = free_ports(2);
        let topo = |rank| Topology {
            rank,
            world: 2,
            addresses: addresses.clone(),
        };
        let err = std::thread::scope(|s| {
            let dying = s.spawn(|| {
                drop(Group::connect(
                    &topo(1),
                    "127.0.0.1",
                    0,
                    Duration::from_secs(10),
                ))
            });
            let mut g = Group::connect(&topo(0), "127.0.0.1", 0, Duration::from_secs(10)).unwrap();
            dying.join().unwrap();
            g.barrier().unwrap_err()
        });
        assert!(format!("{err:#}").contains("did it exit?"), "{err:#}");
    }
}
