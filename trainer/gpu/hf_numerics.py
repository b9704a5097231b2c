"""The transformers side of `rlt-trainer gpu-check`'s numerics (embedded in the binary).

  hf_numerics.py SPEC.json OUT.json

SPEC: {"model": DIR, "device": "cuda"|"cpu", "dtype": "bf16"|"f32", "prompts": [[ids]],
       "pad_id": int, "max_new_tokens": int}
OUT:  {"logits": [[[...]]] (left-padded batch, float32), "generated": [[ids]] (greedy),
       "torch": version, "transformers": version}
"""
import json
import sys

import torch
import transformers
from transformers import Qwen2ForCausalLM


def main(spec_path, out_path):
    spec = json.load(open(spec_path))
    dtype = {"bf16": torch.bfloat16, "f32": torch.float32}[spec["dtype"]]
    device = torch.device(spec["device"])
    model = Qwen2ForCausalLM.from_pretrained(spec["model"], dtype=dtype, local_files_only=True,
                                             attn_implementation="sdpa").to(device).eval()
    rows, pad = spec["prompts"], spec["pad_id"]
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    # Positions from the mask, as generate() computes them for left padding.
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float()
        gen = model.generate(input_ids=ids, attention_mask=mask,
                             max_new_tokens=spec["max_new_tokens"], do_sample=False,
                             pad_token_id=pad, eos_token_id=None)
    json.dump({
        "logits": logits.cpu().tolist(),
        "generated": gen[:, width:].cpu().tolist(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }, open(out_path, "w"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
