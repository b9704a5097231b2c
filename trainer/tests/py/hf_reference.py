"""The Hugging Face transformers side of the reference test (called from tests/hf_reference.rs).

  hf_reference.py create DIR SEED      save a tiny random Qwen2 (untied head, sharded) with transformers
  hf_reference.py run DIR IN.json OUT.json
      load DIR with transformers (local files only) and write, for the batch in IN.json:
      logits of the left-padded batch, greedy generations, and AutoTokenizer ids of IN["text"].
"""
import json
import sys

import torch
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM


def create(out_dir, seed):
    torch.manual_seed(int(seed))
    cfg = Qwen2Config(
        vocab_size=272, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=512,
        rope_theta=50000.0, tie_word_embeddings=False, rms_norm_eps=1e-5,
        initializer_range=0.1,
    )
    model = Qwen2ForCausalLM(cfg).float().eval()
    # transformers zero-initialises biases and unit-initialises norms; randomise them so the
    # comparison checks their names and use.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out_dir, max_shard_size="100KB")


def run(model_dir, in_path, out_path):
    spec = json.load(open(in_path))
    model = Qwen2ForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True,
                                             attn_implementation="sdpa").eval()
    rows = spec["prompts"]
    pad = spec["pad_id"]
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    # Positions from the mask, as generate() computes them for left padding.
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=spec["max_new_tokens"],
                             do_sample=False, pad_token_id=pad, eos_token_id=None)
    out = {
        "logits": logits.tolist(),
        "generated": gen[:, width:].tolist(),
        "num_parameters": sum(p.numel() for p in model.parameters()),
    }
    if spec.get("text") is not None:
        tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        out["text_ids"] = tok(spec["text"], add_special_tokens=False)["input_ids"]
        out["decoded"] = tok.decode(out["text_ids"])
    json.dump(out, open(out_path, "w"))


if __name__ == "__main__":
    torch.set_num_threads(1)  # tiny models; the Rust tests run side by side
    if sys.argv[1] == "create":
        create(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "run":
        run(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        sys.exit(f"unknown command {sys.argv[1]}")
