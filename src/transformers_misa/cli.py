"""Command line: `transformers-misa demo` / `push` / `eval` / `calibrate` (also `python -m transformers_misa ...`)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _number_list(text: str, parse, valid, what: str) -> list:
    """Comma-separated numbers, each parsed by `parse` and accepted by `valid`; `what` names them in the error."""
    try:
        values = [parse(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or not all(valid(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}")
    return values


def _int_list(text: str) -> list[int]:
    return _number_list(text, int, lambda v: v > 0, "positive integers")


def _depth_list(text: str) -> list[float]:
    return _number_list(text, float, lambda v: 0.0 <= v <= 1.0, "depths in [0, 1]")


def build_parser() -> argparse.ArgumentParser:
    from .config import DEFAULT_ROUTER, ROUTERS
    from .evaluation.suite import EVAL_FAMILIES
    from .demo import DEFAULT_BLOCK_SIZE, DEFAULT_CONTEXT, DEFAULT_NEW_TOKENS, QUICK_CONTEXT, QUICK_NEW_TOKENS, \
        RANDOM_TOPK

    parser = argparse.ArgumentParser(prog="transformers-misa",
                                     description="MISA / HISA indexers for DSA models in HuggingFace Transformers.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = commands.add_parser(
        "demo", help="run every mode on the built-in trained DeepSeek-V3.2 / GLM-5 shaped models (CPU), print a table",
        description="Loads the package's small trained DeepSeek-V3.2 and GLM-5 shaped models, patches each with "
                    "every mode, generates greedily from a prompt of Python standard-library source and prints "
                    "recall vs DSA, speed, peak memory and token agreement. --random uses seeded random-weight "
                    "models instead.")
    demo.add_argument("--quick", action="store_true",
                      help=f"short run for tests ({QUICK_CONTEXT} prompt tokens, {QUICK_NEW_TOKENS} new tokens)")
    demo.add_argument("--context", type=_positive, default=None,
                      help=f"prompt tokens (default {DEFAULT_CONTEXT}, or {QUICK_CONTEXT} with --quick)")
    demo.add_argument("--new-tokens", type=_positive, default=None,
                      help=f"new tokens per generate (default {DEFAULT_NEW_TOKENS}, or {QUICK_NEW_TOKENS} with --quick)")
    demo.add_argument("--random", action="store_true", help="seeded random-weight models instead of the trained ones")
    demo.add_argument("--topk", type=_positive, default=None,
                      help=f"index_topk of the --random models (default {RANDOM_TOPK}; the trained ones use 256)")
    demo.add_argument("--block-size", type=_positive, default=DEFAULT_BLOCK_SIZE,
                      help=f"key block size of misa / hisa (default {DEFAULT_BLOCK_SIZE})")
    demo.add_argument("--family", dest="families", action="append", choices=list(EVAL_FAMILIES),
                      help="run only this family (repeatable; default both)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the --random models and prompt (default 0)")
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
        "eval", help="recall, perplexity and Needle-in-a-Haystack per mode on a trained DSA model",
        description="Runs, for dsa, misa with 4/8/16 active heads, misa_hierarchical (8 heads) and hisa: per-layer "
                    "recall of DSA's top-k and perplexity on held-out essays, and a Needle-in-a-Haystack grid "
                    "(context length x depth, the essays as haystack). The model is the built-in trained model of "
                    "--family unless --model is given; when the model folder holds a router calibration, the misa "
                    "modes run with and without it. Writes results.json, table.md, niah.png and niah.json.")
    evaluate.add_argument("--haystack", required=True, metavar="DIR",
                          help="folder of .txt files (e.g. ../shared/data/haystack/paul_graham_essays)")
    evaluate.add_argument("--model", default=None, metavar="DIR",
                          help="a trained checkpoint folder with its tokenizer (default: the built-in one)")
    evaluate.add_argument("--family", choices=list(EVAL_FAMILIES), default="deepseek_v32",
                          help="built-in trained model to evaluate when --model is not given (default deepseek_v32)")
    evaluate.add_argument("--lengths", type=_int_list, default=[512, 1024], metavar="N,N",
                          help="NIAH prompt lengths in tokens (default 512,1024)")
    evaluate.add_argument("--depths", type=_depth_list, default=[0.0, 0.5, 1.0], metavar="D,D",
                          help="needle depths, fractions 0..1 (default 0,0.5,1)")
    evaluate.add_argument("--block-size", type=_positive, default=64, help="key block size of misa / hisa (64)")
    evaluate.add_argument("--window", type=_positive, default=2048,
                          help="tokens per held-out window for recall and perplexity (default 2048)")
    evaluate.add_argument("--windows", type=_positive, default=2, help="held-out windows (default 2)")
    evaluate.add_argument("--new-tokens", type=_positive, default=40,
                          help="greedy new tokens per NIAH answer (default 40)")
    evaluate.add_argument("--router", choices=list(ROUTERS), default=DEFAULT_ROUTER,
                          help=f"router pooling of the misa modes (default {DEFAULT_ROUTER})")
    evaluate.add_argument("--no-calibration", action="store_true",
                          help="ignore a router calibration in the model folder")
    evaluate.add_argument("--out", default="eval_out", metavar="DIR", help="output folder (default eval_out)")
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bars")
    evaluate.set_defaults(subparser=evaluate)

    calibrate = commands.add_parser(
        "calibrate", help="fit MISA's router calibration on real text and save it beside the model",
        description="Runs text through the model and fits, per layer and head, the factor that maps MISA's "
                    "block-pooled router score to the head's importance for DSA's top-k (see "
                    "transformers_misa.calibration). Texts: the .txt files of --texts-dir, minus the held-out "
                    "essays named in the model's training.json. Writes misa_calibration.safetensors.")
    calibrate.add_argument("--texts-dir", required=True, metavar="DIR", help="folder of .txt calibration texts")
    calibrate.add_argument("--model", default=None, metavar="DIR",
                           help="checkpoint folder with its tokenizer (default: the built-in trained model)")
    calibrate.add_argument("--family", choices=list(EVAL_FAMILIES), default="deepseek_v32",
                           help="built-in trained model when --model is not given (default deepseek_v32)")
    calibrate.add_argument("--block-size", type=_positive, default=64, help="router key block size (default 64)")
    calibrate.add_argument("--router", choices=list(ROUTERS), default=DEFAULT_ROUTER,
                           help=f"router pooling the calibration is for (default {DEFAULT_ROUTER})")
    calibrate.add_argument("--max-texts", type=_positive, default=8, help="texts used at most (default 8)")
    calibrate.add_argument("--max-tokens", type=_positive, default=4096, help="tokens per text at most (4096)")
    calibrate.add_argument("--out", default=None, metavar="PATH",
                           help="output file (default: misa_calibration.safetensors in the model folder)")
    calibrate.add_argument("--no-progress", action="store_true", help="no progress bar")
    calibrate.set_defaults(subparser=calibrate)
    return parser


def run_calibrate(args: argparse.Namespace) -> None:
    """`transformers-misa calibrate`: fit on the texts, save beside the model (or --out), print the recall check."""
    from pathlib import Path

    import torch

    from .calibration import CALIBRATION_FILE, calibrate
    from .evaluation.niah import load_haystack
    from .trained import load_trained, training_info

    load_haystack(args.texts_dir)  # the folder checks: exists, has .txt files
    model, tokenizer = load_trained(args.family, model_dir=args.model,
                                    device="cuda" if torch.cuda.is_available() else None)
    folder = Path(model.config._name_or_path)
    heldout = set(training_info(folder).get("data", {}).get("heldout_essays", []))
    files = [p for p in sorted(Path(args.texts_dir).glob("*.txt")) if p.name not in heldout][: args.max_texts]
    if not files:
        raise ValueError(f"{args.texts_dir} has no .txt file outside the model's held-out essays")
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in files]
    result = calibrate(model, texts, tokenizer, block_size=args.block_size, router=args.router,
                       max_tokens=args.max_tokens, progress=not args.no_progress)
    path = result.save(args.out or folder / CALIBRATION_FILE)
    print(f"calibrated {len(result.layer_ids)} layers on {result.info['tokens']} tokens of {len(files)} texts; "
          f"layers kept: {result.info['layers_kept']}; wrote {path}")
    for heads, pair in result.info["recall_on_calibration_text"].items():
        before = sum(pair["uncalibrated"].values()) / len(pair["uncalibrated"])
        after = sum(pair["calibrated"].values()) / len(pair["calibrated"])
        print(f"  misa {heads} heads, recall on the calibration text: {before:.4f} -> {after:.4f}")


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
                     random_weights=args.random,
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

            run_eval(args.haystack, args.lengths, args.depths, args.out, family=args.family, model_dir=args.model,
                     block_size=args.block_size, new_tokens=args.new_tokens, window=args.window,
                     windows=args.windows, calibration=None if args.no_calibration else "auto",
                     router=args.router, progress=not args.no_progress)
        except (ValueError, OSError) as error:
            args.subparser.error(str(error))
    if args.command == "calibrate":
        try:
            run_calibrate(args)
        except (ValueError, OSError) as error:
            args.subparser.error(str(error))
    return 0
