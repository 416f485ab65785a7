"""Command line: `transformers-misa demo` / `push` / `eval` (also `python -m transformers_misa ...`)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def _depth_list(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers in [0, 1], got {text!r}") from None
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"depths must be comma-separated numbers in [0, 1], got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    from .evaluation.suite import EVAL_FAMILIES
    from .demo import DEFAULT_BLOCK_SIZE, DEFAULT_CONTEXT, DEFAULT_NEW_TOKENS, DEFAULT_TOPK, QUICK_CONTEXT, \
        QUICK_NEW_TOKENS

    parser = argparse.ArgumentParser(prog="transformers-misa",
                                     description="MISA / HISA indexers for DSA models in HuggingFace Transformers.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = commands.add_parser(
        "demo", help="run every mode on small random DeepSeek-V3.2 / GLM-5 models (CPU) and print a table",
        description="Builds small seeded DeepSeek-V3.2 and GLM-5 models, patches each with every mode, generates "
                    "greedily and prints recall vs DSA, speed, peak memory and token agreement. Weights are random: "
                    "recall is not a quality claim.")
    demo.add_argument("--quick", action="store_true",
                      help=f"short run for tests ({QUICK_CONTEXT} prompt tokens, {QUICK_NEW_TOKENS} new tokens)")
    demo.add_argument("--context", type=_positive, default=None,
                      help=f"prompt tokens (default {DEFAULT_CONTEXT}, or {QUICK_CONTEXT} with --quick)")
    demo.add_argument("--new-tokens", type=_positive, default=None,
                      help=f"new tokens per generate (default {DEFAULT_NEW_TOKENS}, or {QUICK_NEW_TOKENS} with --quick)")
    demo.add_argument("--topk", type=_positive, default=DEFAULT_TOPK, help=f"index_topk (default {DEFAULT_TOPK})")
    demo.add_argument("--block-size", type=_positive, default=DEFAULT_BLOCK_SIZE,
                      help=f"key block size of misa / hisa (default {DEFAULT_BLOCK_SIZE})")
    demo.add_argument("--family", dest="families", action="append", choices=list(EVAL_FAMILIES),
                      help="run only this family (repeatable; default both)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the weights and the prompt (default 0)")
    demo.add_argument("--json", metavar="PATH", default=None, help="also write the results as JSON to PATH")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.set_defaults(subparser=demo)

    push = commands.add_parser(
        "push", help="upload a save_patched folder (weights, custom code, model card) to the Hugging Face Hub",
        description="Loads a folder written by transformers_misa.save_patched (offline, with its custom code), "
                    "writes a model card and uploads it with huggingface_hub. Needs a token: HF_TOKEN or "
                    "`hf auth login`.")
    push.add_argument("--model-dir", required=True, metavar="DIR", help="a folder written by save_patched")
    push.add_argument("--repo-id", required=True, metavar="ID", help="target repository, e.g. me/DeepSeek-V3.2-MISA")
    push.add_argument("--private", action="store_true", help="create the repository as private")
    push.add_argument("--revision", default=None, metavar="R", help="branch to push to (created if missing)")
    push.add_argument("--message", default=None, metavar="M", help="commit message")
    push.add_argument("--results-json", default=None, metavar="PATH",
                      help="a measure_recall(...).to_dict() or benchmark JSON whose numbers go into the card")
    push.set_defaults(subparser=push)

    evaluate = commands.add_parser(
        "eval", help="recall, perplexity and Needle-in-a-Haystack per mode on the built-in tiny model",
        description="Runs recall of DSA's top-k, perplexity and Needle-in-a-Haystack for the modes dsa, misa "
                    "(8 heads), misa_hierarchical and hisa (block size 32) on the built-in tiny model, with a "
                    "byte-level BPE tokenizer trained on the fly on the haystack text, and writes results.json "
                    "and niah.png into --out. The tiny model's weights are RANDOM, so the NIAH scores are expected "
                    "to be 0: this checks the pipeline. A trained shipped model will come later.")
    evaluate.add_argument("--haystack", required=True, metavar="DIR",
                          help="folder of .txt files (e.g. ../shared/data/haystack/paul_graham_essays)")
    evaluate.add_argument("--lengths", type=_int_list, default=[256, 512], metavar="N,N",
                          help="prompt lengths in tokens (default 256,512)")
    evaluate.add_argument("--depths", type=_depth_list, default=[0.0, 0.5, 1.0], metavar="D,D",
                          help="needle depths, fractions 0..1 (default 0,0.5,1)")
    evaluate.add_argument("--out", default="eval_out", metavar="DIR", help="output folder (default eval_out)")
    evaluate.add_argument("--family", choices=list(EVAL_FAMILIES), default="deepseek_v32",
                          help="tiny model family (default deepseek_v32)")
    evaluate.add_argument("--new-tokens", type=_positive, default=16,
                          help="greedy new tokens per NIAH answer (default 16)")
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the tiny model's weights (default 0)")
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bars")
    evaluate.set_defaults(subparser=evaluate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "demo":
        from .demo import run_demo

        try:
            run_demo(args.context, args.new_tokens, quick=args.quick, topk=args.topk, block_size=args.block_size,
                     seed=args.seed, families=tuple(args.families or ("deepseek_v32", "glm_moe_dsa")),
                     progress=not args.no_progress, json_path=args.json)
        except ValueError as error:
            args.subparser.error(str(error))
    if args.command == "push":
        from .hub import push_from_dir

        try:
            push_from_dir(args.model_dir, args.repo_id, private=args.private, revision=args.revision,
                          commit_message=args.message, results_json=args.results_json)
        except (ValueError, OSError) as error:
            args.subparser.error(str(error))
        print(f"pushed {args.model_dir} to {args.repo_id}")
    if args.command == "eval":
        try:
            from .evaluation.suite import run_eval

            run_eval(args.haystack, args.lengths, args.depths, args.out, family=args.family,
                     new_tokens=args.new_tokens, seed=args.seed, progress=not args.no_progress)
        except (ValueError, OSError) as error:
            args.subparser.error(str(error))
    return 0
