"""Patch a DSA model, save it with save_patched, load it back (offline, trust_remote_code) and compare.

    python examples/save_and_reload.py                          # a small seeded DeepSeek-V3.2 built from config
    python examples/save_and_reload.py --family glm_moe_dsa --mode hisa
    python examples/save_and_reload.py --model PATH --out DIR   # a real checkpoint (DeepSeek-V3.2, GLM-5, ...)
"""

import argparse
import os
import tempfile
from collections.abc import Sequence

import torch

from transformers_misa import patch_model, save_patched
from transformers_misa.tiny import tiny_model


def main(argv: Sequence[str] | None = None) -> bool:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint path or Hub id; default: a tiny random model of --family")
    parser.add_argument("--family", default="deepseek_v32", choices=["deepseek_v32", "glm_moe_dsa"])
    parser.add_argument("--mode", default="misa", choices=["dsa", "misa", "misa_hierarchical", "hisa"])
    parser.add_argument("--active-heads", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--out", help="where to save (default: a temporary folder, removed at the end)")
    parser.add_argument("--prompt-tokens", type=int, default=96)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # loading the saved folder needs no network
    from transformers import AutoModelForCausalLM

    if args.model:
        model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype="auto", device_map="auto")
    else:
        model = tiny_model(args.family, index_topk=16)
    options = {"active_heads": args.active_heads} if args.mode.startswith("misa") else {}
    if args.mode != "dsa":
        options["block_size"] = args.block_size
    patch_model(model, mode=args.mode, **options)
    prompt = torch.randint(2, model.config.vocab_size, (1, args.prompt_tokens), device=model.device)
    expected = model.generate(prompt, max_new_tokens=8, do_sample=False)

    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or os.path.join(tmp, "patched")
        save_patched(model, out)
        print("saved:", sorted(os.listdir(out)))
        reloaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, torch_dtype="auto")
        got = reloaded.to(model.device).generate(prompt, max_new_tokens=8, do_sample=False)
    same = reloaded.misa_config == model.misa_config and torch.equal(got, expected)
    print("reloaded:", type(reloaded).__name__, reloaded.misa_config)
    print("same settings and greedy tokens:", same)
    return same


if __name__ == "__main__":
    raise SystemExit(0 if main() else 1)
