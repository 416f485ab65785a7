"""Publish a MISA variant on the Hugging Face Hub. A dry run by default: prints the files and card it would upload.

    python examples/push_variant.py                                    # tiny DeepSeek-V3.2, dry run, offline
    python examples/push_variant.py --family glm_moe_dsa --results-json recall.json
    python examples/push_variant.py --model PATH --repo-id me/DeepSeek-V3.2-MISA --no-dry-run   # needs HF_TOKEN
"""

import argparse
import tempfile
from collections.abc import Sequence
from pathlib import Path

from transformers_misa import patch_model, push_to_hub
from transformers_misa.hub import prepare_upload
from transformers_misa.tiny import tiny_model


def main(argv: Sequence[str] | None = None) -> list[str] | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint path or Hub id; default: a tiny random model of --family")
    parser.add_argument("--family", default="deepseek_v32", choices=["deepseek_v32", "glm_moe_dsa"])
    parser.add_argument("--mode", default="misa", choices=["dsa", "misa", "misa_hierarchical", "hisa"])
    parser.add_argument("--active-heads", type=int, default=8)
    parser.add_argument("--repo-id", default="your-name/DeepSeek-V3.2-MISA")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--results-json", help="a measure_recall(...).to_dict() or benchmark JSON for the card")
    parser.add_argument("--dry-run", action=argparse.BooleanOptionalAction, default=True,
                        help="only print what would be uploaded (default); --no-dry-run uploads")
    args = parser.parse_args(argv)

    if args.model:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype="auto", device_map="auto")
    else:
        model = tiny_model(args.family, index_topk=16)
    patch_model(model, mode=args.mode, **({"active_heads": args.active_heads} if args.mode.startswith("misa") else {}))

    if not args.dry_run:
        print(push_to_hub(model, args.repo_id, private=args.private, results_json=args.results_json))
        return None
    with tempfile.TemporaryDirectory() as tmp:
        files = prepare_upload(model, Path(tmp) / "upload", results_json=args.results_json, repo_id=args.repo_id)
        print(f"dry run: would upload to {args.repo_id} (private={args.private}):")
        for name in files:
            print("  " + name)
        print("--- README.md ---")
        print((Path(tmp) / "upload" / "README.md").read_text(encoding="utf-8"))
    return files


if __name__ == "__main__":
    main()
