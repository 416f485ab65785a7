"""Patch a DSA model with MISA and generate.

    python examples/patch_and_generate.py                        # a small seeded DeepSeek-V3.2 built from config
    python examples/patch_and_generate.py --model PATH_OR_REPO   # a real checkpoint (DeepSeek-V3.2, GLM-5, ...)
"""

import argparse

import torch
from transformers import AutoModelForCausalLM

from transformers_misa import measure_recall, misa_summary, patch_model
from transformers_misa.tiny import tiny_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint path or Hub id; default: a tiny random deepseek_v32 model")
    parser.add_argument("--mode", default="misa", choices=["dsa", "misa", "misa_hierarchical", "hisa"])
    parser.add_argument("--active-heads", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    args = parser.parse_args()

    if args.model:
        model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype="auto", device_map="auto")
    else:
        model = tiny_model("deepseek_v32")
    options = {"active_heads": args.active_heads} if args.mode.startswith("misa") else {}
    patch_model(model, mode=args.mode, **options)
    for row in misa_summary(model):
        print(row)

    prompt = torch.randint(2, model.config.vocab_size, (1, args.prompt_tokens), device=model.device)
    output = model.generate(prompt, max_new_tokens=16, do_sample=False)
    print("generated:", output[0, -16:].tolist())
    print(measure_recall(model, prompt).table())


if __name__ == "__main__":
    main()
