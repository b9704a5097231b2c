//! `manifests/gpu-7b-teacher.yaml` works as written, as far as the trainer's own preflights
//! can tell without a cluster: the run validates, and every stage fits the resources and the
//! workspace it names, on the 80 GB H100s its node selector asks for (the same arithmetic
//! each stage runs before loading a weight).
use rlt_api::contract;
use rlt_api::quantity::Quantity;
use rlt_api::spec::RltRun;
use rlt_trainer::train::memory::{self, LearnerPlan, Shape, Stage, GIB, H100_80GB};
use rlt_trainer::train::sft::SftConfig;

fn example() -> RltRun {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../manifests/gpu-7b-teacher.yaml"
    );
    let run = rlt_api::parse_yaml(&std::fs::read_to_string(path).unwrap())
        .unwrap_or_else(|e| panic!("{}", rlt_api::validate::render(&e)));
    rlt_api::validate(&run).unwrap();
    run
}

fn seven_b() -> Shape {
    Shape::of(&rlt_trainer::model::config::qwen2_shape("7B").unwrap())
}

fn bytes(q: &str) -> f64 {
    Quantity::parse(q).unwrap().as_f64()
}

/// The memory limit of a role's resources.
macro_rules! memory_limit {
    ($r:expr) => {
        bytes(&$r.as_ref().unwrap().limits.as_ref().unwrap()["memory"].0)
    };
}

/// A fine-tune fits when the preflight finds micro-batches for a rank's share of the batch
/// (what `check_stage` does before a stage loads anything).
fn fits(s: &Shape, stage: &Stage) {
    let g = memory::micro_batches(s, stage, 1, H100_80GB)
        .unwrap_or_else(|| panic!("{}: not even one sequence at a time fits", stage.what));
    let micro_batch = stage.rows_per_rank.div_ceil(g);
    let plan = memory::Plan {
        micro_batch,
        ..stage.plan
    };
    assert!(
        memory::estimate(s, &plan).total() <= H100_80GB,
        "{}",
        stage.what
    );
}

#[test]
fn the_7b_example_fits_its_gpus_hosts_and_workspace() {
    let run = example();
    let spec = &run.spec;
    let s = seven_b();
    let bf16 = 2;
    assert!(contract::computes_in_bf16(
        spec,
        spec.warmup.resources.as_ref()
    ));

    // Warm-up and each student's fine-tune: data-parallel ranks, one per GPU.
    let w = &spec.warmup;
    let gpus = contract::gpus(w.resources.as_ref());
    let ranks = (w.replicas * gpus) as usize;
    let stage = Stage::sft(
        "warm-up".into(),
        "warmup",
        &SftConfig::warmup(w),
        tch::Kind::BFloat16,
        ranks,
        gpus as usize,
    );
    fits(&s, &stage);
    let d = &spec.distillation;
    for student in &d.students {
        let gpus = contract::gpus(student.resources.as_ref());
        let stage = Stage::sft(
            student.name.clone(),
            "distillation",
            &SftConfig::distillation(d),
            tch::Kind::BFloat16,
            (d.replicas * gpus) as usize,
            gpus as usize,
        );
        fits(&s, &stage);
        // Collection: the teacher writes explanations in passes that fit one GPU.
        let rows = memory::collection_rows(
            &s,
            bf16,
            d.batch_size,
            memory::README_RL_PROMPT,
            d.trace_splitting.max_tokens_per_trace,
            H100_80GB,
        );
        assert!(rows.is_some_and(|r| r >= 1), "collection does not fit");
    }

    // RL: learners spread their models over the GPUs they ask for; servers on the host.
    let rl = &spec.rl;
    let plan = LearnerPlan {
        dtype_bytes: bf16,
        group_size: rl.group_size,
        prompt: memory::README_RL_PROMPT,
        max_new_tokens: rl.max_new_tokens,
        micro_batch: 0,
        generation_batch: 0,
        checkpointing: rl.activation_checkpointing == Some(true),
        devices: contract::gpus(rl.learner_resources.as_ref()).min(2),
    };
    let p = memory::learner_preflight(&s, &s, &plan, H100_80GB).unwrap();
    assert!(p.micro_batch >= 1 && p.generation_batch >= 1, "{p:?}");
    memory::replay_preflight(
        &s,
        rl.checkpoint_interval,
        memory_limit!(rl.learner_resources),
    )
    .unwrap();
    let server = memory::server_bytes(&s, rl.param_servers, rl.learners, bf16);
    assert!(
        server + 2.5 * GIB <= memory_limit!(rl.param_server_resources),
        "a parameter server needs {:.1} GiB",
        server / GIB
    );

    // The workspace holds each stage's peak beside the finals of the stages before it.
    let size = bytes(spec.workspace.size.as_deref().unwrap());
    let keep = 2;
    let model = f64::from(bf16) * s.params;
    let peaks = [
        memory::sft_disk_bytes(&s, bf16, keep),
        memory::rl_disk_bytes(&s, bf16) + model,
        memory::sft_disk_bytes(&s, bf16, keep) + 2.0 * model,
    ];
    for (stage, need) in ["warm-up", "RL", "distillation"].iter().zip(peaks) {
        assert!(
            need <= size,
            "{stage} needs {:.0} GiB of a {:.0} GiB workspace",
            need / GIB,
            size / GIB
        );
    }
    assert_eq!(spec.workspace.keep_checkpoints, 0);
}
