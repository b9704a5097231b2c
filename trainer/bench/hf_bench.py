"""transformers side of `rlt-trainer bench`: the same workloads on the same checkpoint and
batch, with the same torch (libtorch) build, printed as JSON on stdout.

  hf_bench.py SPEC.json   (written by `rlt-trainer bench`; see trainer/src/bench.rs)

SFT step: forward on the right-padded batch, completion-only cross-entropy, backward,
global-norm clip 1.0, AdamW (torch.optim.AdamW, betas 0.9/0.95, wd 1e-4) step.
Sampling: model.generate on the left-padded prompts, greedy or sampled, fixed new tokens.
"""
import json
import sys
import time

import torch
from transformers import Qwen2ForCausalLM


def main(spec_path):
    spec = json.load(open(spec_path))
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[spec["dtype"]]
    model = Qwen2ForCausalLM.from_pretrained(spec["model"], dtype=dtype, local_files_only=True,
                                             attn_implementation="sdpa").to(device)
    out = {}

    # --- SFT step ---
    rows, starts, pad = spec["train_rows"], spec["completion_starts"], spec["pad_id"]
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
    loss_mask = torch.tensor([[1.0 if s <= i < len(r) else 0.0 for i in range(width)] for r, s in zip(rows, starts)],
                             device=device)
    n_tokens = sum(len(r) for r in rows)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=1e-4, eps=1e-8,
                            foreach=True)

    def step():
        logits = model(input_ids=ids).logits[:, :-1].float()
        lp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        m = loss_mask[:, 1:]
        loss = -(lp * m).sum() / m.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    for _ in range(spec["warmup_iters"]):
        step()
    sync(device)
    t = time.perf_counter()
    for _ in range(spec["iters"]):
        loss = step()
    sync(device)
    dt = (time.perf_counter() - t) / spec["iters"]
    out["sft"] = {"seconds_per_step": dt, "tokens_per_second": n_tokens / dt, "last_loss": loss}

    # --- sampling ---
    model.eval()
    prompts = spec["prompts"]
    pw = max(len(p) for p in prompts)
    pids = torch.tensor([[pad] * (pw - len(p)) + p for p in prompts], device=device)
    pmask = torch.tensor([[0] * (pw - len(p)) + [1] * len(p) for p in prompts], device=device)
    new = spec["max_new_tokens"]
    kwargs = dict(max_new_tokens=new, min_new_tokens=new, pad_token_id=pad, eos_token_id=None)
    if spec["temperature"] > 0:
        kwargs.update(do_sample=True, temperature=spec["temperature"], top_p=spec["top_p"], top_k=0)
    else:
        kwargs.update(do_sample=False)
    with torch.no_grad():
        for _ in range(spec["warmup_iters"]):
            model.generate(input_ids=pids, attention_mask=pmask, **kwargs)
        sync(device)
        t = time.perf_counter()
        for _ in range(spec["iters"]):
            g = model.generate(input_ids=pids, attention_mask=pmask, **kwargs)
        sync(device)
    dt = (time.perf_counter() - t) / spec["iters"]
    generated = (g.shape[1] - pw) * g.shape[0]
    out["sampling"] = {"seconds_per_batch": dt, "tokens_per_second": generated / dt, "generated_tokens": generated}
    print(json.dumps(out))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


if __name__ == "__main__":
    main(sys.argv[1])
