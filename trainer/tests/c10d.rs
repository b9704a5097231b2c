//! libtorch's c10d through `rlt_trainer::train::c10d`, across real processes (this test binary run
//! again as each rank), on Gloo over loopback: what the ranks get equals what one process
//! computes from every rank's input.
use rlt_trainer::train::c10d::{Backend, ProcessGroup, Rendezvous};
use std::process::{Command, Stdio};
use std::time::Duration;
use tch::{Device, Kind, Tensor};

const RANK_VAR: &str = "RLT_C10D_TEST_RANK";

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Runs `test` as `world` rank processes of this binary (`ranks` of them started); each
/// rank's assertions are its exit status, and it says [`DONE`] once they all held.
fn on_ranks(test: &str, world: usize, ranks: usize) {
    let port = free_port().to_string();
    let children: Vec<_> = (0..ranks)
        .map(|rank| {
            Command::new(std::env::current_exe().unwrap())
                .args(["--exact", test, "--nocapture"])
                .env(RANK_VAR, rank.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("RANK", rank.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", &port)
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for (rank, child) in children.into_iter().enumerate() {
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "rank {rank} of {test}: {}",
            out.status
        );
        assert!(
            stdout.contains(DONE),
            "rank {rank} never ran {test}: {stdout}"
        );
    }
}

const DONE: &str = "rank checks held";

fn join(timeout: Duration) -> anyhow::Result<ProcessGroup> {
    let rdzv = Rendezvous::from_env()?.expect("torchrun's variables are set");
    ProcessGroup::join(
        &rdzv,
        Backend::Gloo,
        "test",
        Some("127.0.0.1"),
        timeout,
        timeout,
    )
}

/// Rank `r`'s input: what every rank can also compute for the others.
fn input(rank: usize, n: i64, kind: Kind) -> Tensor {
    tch::manual_seed(rank as i64);
    Tensor::randn([n], (Kind::Float, Device::Cpu)).to_kind(kind)
}

fn close(a: &Tensor, b: &Tensor, tol: f64) -> bool {
    let diff = (a.to_kind(Kind::Float) - b.to_kind(Kind::Float))
        .abs()
        .max();
    diff.double_value(&[]) <= tol
}

#[test]
fn gloo_collectives_across_processes_give_the_single_process_result() {
    let Ok(rank) = std::env::var(RANK_VAR) else {
        let test = "gloo_collectives_across_processes_give_the_single_process_result";
        return on_ranks(test, 3, 3);
    };
    let rank: usize = rank.parse().unwrap();
    let mut pg = join(Duration::from_secs(60)).unwrap();
    let world = pg.world;
    let n = 3 * 100_003; // a multiple of the world size, not of anything rounder
    let sum = (0..world)
        .map(|r| input(r, n, Kind::Float))
        .fold(Tensor::zeros([n], (Kind::Float, Device::Cpu)), |s, t| s + t);

    let mut t = input(rank, n, Kind::Float);
    pg.all_reduce_sum(&mut t).unwrap();
    assert!(close(&t, &sum, 1e-5), "all-reduce");

    let shard = n / world as i64;
    let mut out = Tensor::zeros([shard], (Kind::Float, Device::Cpu));
    pg.reduce_scatter_sum(&mut out, &input(rank, n, Kind::Float))
        .unwrap();
    assert!(
        close(&out, &sum.narrow(0, rank as i64 * shard, shard), 1e-5),
        "reduce-scatter"
    );

    let mine = input(rank, shard, Kind::BFloat16);
    let mut all = Tensor::zeros([n], (Kind::BFloat16, Device::Cpu));
    pg.all_gather(&mut all, &mine).unwrap();
    let expected = Tensor::cat(
        &(0..world)
            .map(|r| input(r, shard, Kind::BFloat16))
            .collect::<Vec<_>>(),
        0,
    );
    assert!(
        close(&all, &expected, 0.0),
        "all-gather moves bf16 bits unchanged"
    );

    // bf16 on the wire: the sum of bf16 inputs, within bf16's precision.
    let mut b = input(rank, n, Kind::BFloat16);
    pg.all_reduce_sum(&mut b).unwrap();
    let bsum = (0..world)
        .map(|r| input(r, n, Kind::BFloat16).to_kind(Kind::Float))
        .fold(Tensor::zeros([n], (Kind::Float, Device::Cpu)), |s, t| s + t);
    assert!(close(&b, &bsum, 0.1), "bf16 all-reduce");

    let mut from_last = input(rank, 17, Kind::Float);
    pg.broadcast(&mut from_last, world - 1).unwrap();
    assert!(
        close(&from_last, &input(world - 1, 17, Kind::Float), 0.0),
        "broadcast"
    );

    let mut wrong = Tensor::zeros([shard + 1], (Kind::Float, Device::Cpu));
    let err = pg
        .reduce_scatter_sum(&mut wrong, &t)
        .unwrap_err()
        .to_string();
    assert!(err.contains("pad to a multiple of the world size"), "{err}");
    pg.barrier(None).unwrap();
    println!("{DONE}");
}

#[test]
fn a_rank_that_never_comes_is_an_error_naming_the_rendezvous_not_a_hang() {
    if std::env::var(RANK_VAR).is_err() {
        // Only rank 0 of two is started.
        let test = "a_rank_that_never_comes_is_an_error_naming_the_rendezvous_not_a_hang";
        return on_ranks(test, 2, 1);
    }
    let started = std::time::Instant::now();
    let err = match join(Duration::from_secs(3)) {
        Ok(_) => panic!("joined a group of two alone"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        err.contains("rank 0 of 2: joining the Gloo group at 127.0.0.1:"),
        "{err}"
    );
    println!("{err}\n{DONE}");
}
