"""transformers side of `rlt-trainer bench-generation`: a group of G samples of one prompt by
`model.generate`, on the same checkpoint and torch build; prints the best tokens/s as JSON.

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
    kwargs = dict(max_new_tokens=new, min_new_tokens=new, pad_token_id=spec["pad_id"], eos_token_id=None,
                  attention_mask=torch.ones_like(ids))
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
            if i > 0:
                best = max(best, (g.shape[1] - ids.shape[1]) * g.shape[0] / (time.perf_counter() - t))
    print(json.dumps({"tokens_per_second": best}))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


if __name__ == "__main__":
    main(sys.argv[1])
