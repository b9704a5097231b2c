"""transformers side of `rlt-trainer bench-generation`: a group of G samples of one prompt by
`model.generate`, on the same checkpoint and torch build, ending at the same stop tokens;
prints the best tokens/s (of the tokens up to each row's stop) as JSON.

  hf_generate.py SPEC.json   (written by `rlt-trainer bench-generation`)
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
                                             attn_implementation="sdpa").to(device).eval()
    ids = torch.tensor([spec["prompt"]] * spec["group"], device=device)
    new = spec["max_new_tokens"]
    stops = spec["stops"]
    kwargs = dict(max_new_tokens=new, pad_token_id=spec["pad_id"], attention_mask=torch.ones_like(ids))
    if stops:
        kwargs.update(eos_token_id=stops)
    else:
        kwargs.update(min_new_tokens=new, eos_token_id=None)
    if spec["temperature"] > 0:
        kwargs.update(do_sample=True, temperature=spec["temperature"], top_p=spec["top_p"], top_k=0)
    else:
        kwargs.update(do_sample=False)
    best = 0.0
    with torch.no_grad():
        for i in range(spec["iters"] + 1):
            sync(device)
            t = time.perf_counter()
            g = model.generate(input_ids=ids, **kwargs)
            sync(device)
            dt = time.perf_counter() - t
            if i > 0:
                best = max(best, generated(g[:, ids.shape[1]:], stops) / dt)
    print(json.dumps({"tokens_per_second": best}))


def generated(new, stops):
    """Tokens up to and including each row's first stop token (generate pads after it)."""
    if not stops:
        return new.numel()
    hit = torch.isin(new, torch.tensor(stops, device=new.device))
    first = torch.where(hit.any(1), hit.int().argmax(1) + 1, torch.full_like(hit[:, 0], new.shape[1], dtype=torch.long))
    return int(first.sum())


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


if __name__ == "__main__":
    main(sys.argv[1])
