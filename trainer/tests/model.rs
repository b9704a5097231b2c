//! Model, checkpoint and sampler behaviour on tiny random models (CPU, f32).
use rlt_trainer::engine::logprobs::sequence_logprobs;
use rlt_trainer::engine::sampling::{generate, generate_in_batches, left_pad, SamplingConfig};
use rlt_trainer::model::checkpoint::{load_checkpoint, save_checkpoint, CausalLm};
use rlt_trainer::model::config::{Qwen2Config, TinySpec};
use rlt_trainer::model::qwen2::KvCache;
use rlt_trainer::model::tokenizer::Tokenizer;
use std::path::PathBuf;
use tch::{Device, Kind, Tensor};

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("rlt-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn tiny() -> (CausalLm, Tokenizer) {
    // One intra-op thread: tiny models, and nextest runs test processes side by side.
    tch::set_num_threads(1);
    let tok = Tokenizer::tiny();
    let spec = TinySpec {
        hidden_size: 32,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        intermediate_size: 64,
        seed: 7,
    };
    (
        CausalLm::tiny(&spec, &tok, Device::Cpu, Kind::Float).unwrap(),
        tok,
    )
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn same_seed_same_weights_and_save_load_round_trip() {
    let (lm, tok) = tiny();
    let (lm2, _) = tiny();
    let ids = Tensor::from_slice(&tok.encode("Hello, world! 12+34=46").unwrap()).unsqueeze(0);
    let a = lm.model.forward(&ids, None, None);
    assert_eq!(max_abs_diff(&a, &lm2.model.forward(&ids, None, None)), 0.0);

    let dir = tmpdir("roundtrip");
    save_checkpoint(&dir, &lm, &tok).unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "COMPLETE",
    ] {
        assert!(dir.join(f).exists(), "{f} missing");
    }
    let (back, tok2) = load_checkpoint(&dir, Device::Cpu, Kind::Float).unwrap();
    assert!(tok2.same_vocab(&tok));
    let mut cfg = back.config.clone();
    assert_eq!(cfg.extra.remove("torch_dtype"), Some("float32".into()));
    cfg.extra.remove("dtype");
    assert_eq!(cfg, lm.config);
    assert_eq!(max_abs_diff(&a, &back.model.forward(&ids, None, None)), 0.0);

    // Sharded save (tiny shard limit) loads to the same logits.
    let sharded = tmpdir("sharded");
    lm.save_sharded(&sharded, 20_000).unwrap();
    assert!(sharded.join("model.safetensors.index.json").exists());
    assert!(sharded.join("model-00002-of-").parent().is_some());
    let back = CausalLm::load(&sharded, Device::Cpu, Kind::Float).unwrap();
    assert_eq!(max_abs_diff(&a, &back.model.forward(&ids, None, None)), 0.0);

    // bf16 load stays close.
    let bf = CausalLm::load(&dir, Device::Cpu, Kind::BFloat16).unwrap();
    let d = max_abs_diff(&a, &bf.model.forward(&ids, None, None).to_kind(Kind::Float));
    assert!(d < 0.05, "bf16 logits differ by {d}");
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_dir_all(&sharded).unwrap();
}

#[test]
fn wrong_shape_checkpoint_is_rejected_by_name() {
    let (lm, tok) = tiny();
    let dir = tmpdir("wrongshape");
    save_checkpoint(&dir, &lm, &tok).unwrap();
    // Claim a bigger intermediate size than the weights have.
    let mut cfg: Qwen2Config = Qwen2Config::from_file(&dir.join("config.json")).unwrap();
    cfg.intermediate_size = 128;
    cfg.to_file(&dir.join("config.json")).unwrap();
    let err = format!(
        "{:#}",
        CausalLm::load(&dir, Device::Cpu, Kind::Float).unwrap_err()
    );
    assert!(err.contains("mlp") && err.contains("shape"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn cache_and_left_padding_match_full_forward() {
    let (lm, tok) = tiny();
    let ids = tok.encode("The quick brown fox jumps").unwrap();
    let n = ids.len() as i64;
    let full = lm
        .model
        .forward(&Tensor::from_slice(&ids).unsqueeze(0), None, None);
    // Incremental: prefix of 10, then one token at a time; the cache's capacity after each step.
    let incremental = |cache: &mut KvCache| {
        let mut parts = vec![lm.model.forward(
            &Tensor::from_slice(&ids[..10]).unsqueeze(0),
            None,
            Some(&mut *cache),
        )];
        let mut capacities = vec![];
        for &t in &ids[10..] {
            parts.push(lm.model.forward(
                &Tensor::from_slice(&[t]).unsqueeze(0),
                None,
                Some(&mut *cache),
            ));
            capacities.push(cache.capacity());
        }
        (Tensor::cat(&parts, 1), capacities)
    };
    let mut cache = lm.model.new_cache();
    let (inc, _) = incremental(&mut cache);
    assert!(
        max_abs_diff(&full, &inc) < 1e-4,
        "cache vs full: {}",
        max_abs_diff(&full, &inc)
    );
    // Without a reservation the buffers grew (doubling) to hold what was decoded.
    assert_eq!(cache.seq_len(), n);
    assert!(cache.capacity() >= n && cache.capacity() < 2 * n);
    // Reserved for the whole sequence: written in place, never reallocated, same logits.
    let mut cache = lm.model.new_cache_for(n + 5);
    let (inc, capacities) = incremental(&mut cache);
    assert!(capacities.iter().all(|&c| c == n + 5), "{capacities:?}");
    assert_eq!(cache.seq_len(), n);
    assert!(max_abs_diff(&full, &inc) < 1e-4);
    // Left-padded in a batch with a longer row: the real positions give the same logits.
    let other = tok
        .encode("A much longer sentence that forces padding of the first")
        .unwrap();
    let (batch, mask) = left_pad(&[ids.clone(), other], tok.pad_id(), Device::Cpu);
    let padded = lm.model.forward(&batch, Some(&mask), None);
    let pad = batch.size()[1] - n;
    let row = padded.get(0).narrow(0, pad, n).unsqueeze(0);
    assert!(
        max_abs_diff(&full, &row) < 1e-4,
        "padded vs unpadded: {}",
        max_abs_diff(&full, &row)
    );
}

#[test]
fn sampled_logprobs_match_a_full_forward_without_cache() {
    let (lm, tok) = tiny();
    let prompts: Vec<Vec<i64>> = ["1+1=", "What is 7*6? Answer:", "x"]
        .iter()
        .map(|p| tok.encode(p).unwrap())
        .collect();
    let cfg = SamplingConfig {
        max_new_tokens: 12,
        temperature: 0.7,
        top_p: 0.9,
        stop_tokens: vec![],
        seed: 3,
    };
    let g = generate(&lm.model, &prompts, tok.pad_id(), &cfg).unwrap();
    let (ids, mask) = g.full_sequences();
    let lp = tch::no_grad(|| sequence_logprobs(&lm.model, &ids, Some(&mask), cfg.temperature));
    let p = g.prompt_ids.size()[1];
    let recomputed = lp.narrow(1, p - 1, g.tokens.size()[1]) * g.mask.to_kind(Kind::Float);
    let d = max_abs_diff(&recomputed, &g.logprobs);
    assert!(d < 1e-4, "sampling log-probs differ from recomputed by {d}");
    assert!(g.logprobs.lt(0.0).any().int64_value(&[]) == 1);

    // Same seed, same output; another seed, another output.
    let g2 = generate(&lm.model, &prompts, tok.pad_id(), &cfg).unwrap();
    assert_eq!(g.token_lists(), g2.token_lists());
    let g3 = generate(
        &lm.model,
        &prompts,
        tok.pad_id(),
        &SamplingConfig {
            seed: 4,
            ..cfg.clone()
        },
    )
    .unwrap();
    assert_ne!(g.token_lists(), g3.token_lists());
}

#[test]
fn greedy_stops_on_stop_tokens_and_masks_after() {
    let (lm, tok) = tiny();
    let prompts = vec![
        tok.encode("abc").unwrap(),
        tok.encode("hello there").unwrap(),
    ];
    let greedy = SamplingConfig {
        max_new_tokens: 8,
        temperature: 0.0,
        ..Default::default()
    };
    let g = generate(&lm.model, &prompts, tok.pad_id(), &greedy).unwrap();
    let lists = g.token_lists();
    assert_eq!(lists[0].len(), 8);
    // Greedy continuation of row 0 equals argmax of a full forward, step by step.
    let mut seq = prompts[0].clone();
    for &t in &lists[0] {
        let logits = lm
            .model
            .forward(&Tensor::from_slice(&seq).unsqueeze(0), None, None);
        assert_eq!(
            logits
                .get(0)
                .get(seq.len() as i64 - 1)
                .argmax(-1, false)
                .int64_value(&[]),
            t
        );
        seq.push(t);
    }
    // Make row 0's third greedy token a stop token: it ends there, the rest is masked.
    let stop = lists[0][2];
    let g = generate(
        &lm.model,
        &prompts,
        tok.pad_id(),
        &SamplingConfig {
            stop_tokens: vec![stop],
            ..greedy
        },
    )
    .unwrap();
    let lists2 = g.token_lists();
    let first = lists2[0].iter().position(|&t| t == stop).unwrap();
    assert_eq!(lists2[0].len(), first + 1);
    assert!(g.stopped[0]);
    let m = Vec::<i64>::try_from(g.mask.get(0)).unwrap();
    assert!(m[first + 1..].iter().all(|&x| x == 0));
    assert_eq!(
        g.logprobs
            .get(0)
            .narrow(0, first as i64 + 1, m.len() as i64 - first as i64 - 1)
            .abs()
            .sum(Kind::Float)
            .double_value(&[]),
        0.0
    );
}

#[test]
fn finished_rows_leave_the_batch_without_changing_the_others() {
    let (lm, tok) = tiny();
    let prompts: Vec<Vec<i64>> = ["1+1=", "What is 7*6? Answer:", "x", "The fox"]
        .iter()
        .map(|p| tok.encode(p).unwrap())
        .collect();
    let cfg = SamplingConfig {
        max_new_tokens: 16,
        temperature: 0.8,
        top_p: 0.95,
        stop_tokens: vec![],
        seed: 5,
    };
    let free = generate(&lm.model, &prompts, tok.pad_id(), &cfg)
        .unwrap()
        .token_lists();
    // Row 1 stops at its third token and leaves the batch; every row is its free-running
    // self cut after its first stop token.
    let stop = free[1][2];
    let cfg = SamplingConfig {
        stop_tokens: vec![stop],
        ..cfg
    };
    let g = generate(&lm.model, &prompts, tok.pad_id(), &cfg).unwrap();
    let lists = g.token_lists();
    for (r, (cut, whole)) in lists.iter().zip(&free).enumerate() {
        let end = whole
            .iter()
            .position(|&t| t == stop)
            .map_or(whole.len(), |i| i + 1);
        assert_eq!(cut, &whole[..end], "row {r}");
        assert_eq!(g.stopped[r], whole.contains(&stop), "row {r}");
    }
    assert!(lists[1].len() <= 3 && g.stopped[1]);
    // The log-probs reported after rows left still match a full forward of each row.
    let (ids, mask) = g.full_sequences();
    let lp = tch::no_grad(|| sequence_logprobs(&lm.model, &ids, Some(&mask), cfg.temperature));
    let p = g.prompt_ids.size()[1];
    let recomputed = lp.narrow(1, p - 1, g.tokens.size()[1]) * g.mask.to_kind(Kind::Float);
    let d = max_abs_diff(&recomputed, &g.logprobs);
    assert!(d < 1e-4, "log-probs after compaction differ by {d}");
}

#[test]
fn generating_in_batches_samples_what_one_batch_samples() {
    let (lm, tok) = tiny();
    let prompts: Vec<Vec<i64>> = ["1+1=", "What is 7*6? Answer:", "x", "The fox", "2*3=", "ab"]
        .iter()
        .map(|p| tok.encode(p).unwrap())
        .collect();
    let cfg = SamplingConfig {
        max_new_tokens: 12,
        temperature: 0.9,
        top_p: 0.95,
        stop_tokens: vec![tok.encode("=").unwrap()[0]],
        seed: 11,
    };
    let whole = generate(&lm.model, &prompts, tok.pad_id(), &cfg).unwrap();
    for rows in [1, 2, 4] {
        let parts = generate_in_batches(&lm.model, &prompts, tok.pad_id(), &cfg, rows).unwrap();
        assert_eq!(
            parts.token_lists(),
            whole.token_lists(),
            "{rows} rows per pass"
        );
        assert_eq!(parts.stopped, whole.stopped, "{rows} rows per pass");
        // Same layout: the full sequences line up with the one-batch generation's.
        let (a, am) = parts.full_sequences();
        let (b, bm) = whole.full_sequences();
        assert_eq!(a.size(), b.size(), "{rows} rows per pass");
        assert!(a.equal(&b) && am.equal(&bm), "{rows} rows per pass");
        let d = max_abs_diff(&parts.logprobs, &whole.logprobs);
        assert!(d < 1e-4, "{rows} rows per pass: log-probs differ by {d}");
    }
}

#[test]
fn a_group_of_one_prompt_samples_what_the_same_rows_sample_in_a_padded_batch() {
    // A group (every row the same prompt) prefills once and decodes without a mask; beside a
    // prompt of another length, the same rows are left-padded, prefilled each and masked.
    let (lm, tok) = tiny();
    let q = tok.encode("What is 7*6? Answer:").unwrap();
    let other = tok.encode("x").unwrap();
    let group = vec![q.clone(); 5];
    let mut mixed = group.clone();
    mixed.push(other);
    let cfg = SamplingConfig {
        max_new_tokens: 24,
        temperature: 0.9,
        top_p: 0.95,
        stop_tokens: vec![],
        seed: 3,
    };
    // The stop token: one row 1 samples, which as few other rows as possible do.
    let free = generate(&lm.model, &group, tok.pad_id(), &cfg)
        .unwrap()
        .token_lists();
    let rows_with = |t: &i64| free.iter().filter(|r| r.contains(t)).count();
    let stop = *free[1].iter().min_by_key(|t| rows_with(t)).unwrap();
    let cfg = SamplingConfig {
        stop_tokens: vec![stop],
        ..cfg
    };
    let alone = generate(&lm.model, &group, tok.pad_id(), &cfg).unwrap();
    let beside = generate(&lm.model, &mixed, tok.pad_id(), &cfg).unwrap();
    let (a, b) = (alone.token_lists(), beside.token_lists());
    assert_eq!(a[..], b[..5]);
    assert_eq!(alone.stopped[..], beside.stopped[..5]);
    // Rows differ from each other (their own streams), and some stop before the budget: the
    // stop tokens were seen on the device and those rows left the batch.
    assert!(a.iter().any(|r| r != &a[0]), "{a:?}");
    assert!(
        alone.stopped.iter().any(|&s| s) && alone.stopped.iter().any(|&s| !s),
        "{:?}",
        alone.stopped
    );
    let width = alone.tokens.size()[1] as usize;
    assert_eq!(
        width,
        a.iter().map(Vec::len).max().unwrap(),
        "no all-padding columns"
    );
    let d = max_abs_diff(
        &alone.logprobs,
        &beside.logprobs.narrow(0, 0, 5).narrow(1, 0, width as i64),
    );
    assert!(d < 1e-4, "log-probs differ by {d}");
}

/// This process's current and peak resident memory in bytes, after resetting the peak.
fn rss() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let field = |name: &str| -> f64 {
        let kb: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap()
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .unwrap();
        kb * 1024.0
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// A bf16 model is created in bf16, not in f32 and then converted: at 7B the f32 copy is a
/// 30 GB transient on the device. Measured on the CPU as the peak resident memory of the load
/// (this test is its own process under nextest).
#[test]
fn a_bf16_checkpoint_loads_without_an_f32_copy_of_the_model() {
    tch::set_num_threads(1);
    let dir = tmpdir("bf16-load");
    // ~67M parameters: 134 MB in bf16, 268 MB in f32; 4 MiB shards, as large checkpoints are.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_rlt-trainer"))
        .args([
            "init-tiny",
            "--out",
            dir.to_str().unwrap(),
            "--dtype",
            "bf16",
        ])
        .args([
            "--hidden-size",
            "512",
            "--layers",
            "16",
            "--intermediate-size",
            "2048",
        ])
        .args(["--heads", "8", "--kv-heads", "2", "--max-shard-mib", "4"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
    let (before, _) = rss();
    let (lm, _) = load_checkpoint(&dir, Device::Cpu, Kind::BFloat16).unwrap();
    let (_, peak) = rss();
    let bf16 = lm.num_parameters() as f64 * 2.0;
    assert!(bf16 > 100e6, "{bf16}");
    let grew = peak - before;
    // Measured: 1.6x with the weights created in bf16 (the allocator keeps the random
    // initialisation's temporaries), 2.9x when they were created in f32 and converted.
    assert!(
        grew < 2.0 * bf16,
        "loading {:.0} MB of bf16 weights grew the peak by {:.0} MB",
        bf16 / 1e6,
        grew / 1e6
    );
}
