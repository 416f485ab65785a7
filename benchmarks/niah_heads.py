"""NIAH on a built-in trained model for MISA with several active-head counts, block sizes and routers, beside DSA.

    python benchmarks/niah_heads.py --family glm_moe_dsa --haystack ../shared/data/haystack/paul_graham_essays

Answers the question the eval table leaves open: how many routed heads does the model need to find the needle?
Prints one line per mode and writes the scores and answers as JSON (CPU or GPU; reference indexers).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import torch
import transformers

from transformers_misa.evaluation.niah import load_haystack, run_niah
from transformers_misa.trained import TRAINED_FAMILIES, load_trained


def modes(heads: list[int], blocks: list[int], routers: list[str],
          hierarchical_factors: list[int]) -> list[tuple[str, dict]]:
    """DSA, then MISA for every (heads, block, router) and MISA hierarchical for every (heads, block, router,
    candidate factor), uncalibrated (a calibration is fitted for one block size)."""
    table = [("dsa", {})]
    for active in heads:
        for block in blocks:
            for router in routers:
                common = dict(active_heads=active, block_size=block, router=router, calibration=None)
                table.append((f"misa{active}_b{block}_{router}", dict(mode="misa", **common)))
                table += [(f"misa{active}_hier{factor}_b{block}_{router}",
                           dict(mode="misa_hierarchical", candidate_factor=factor, **common))
                          for factor in hierarchical_factors]
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", choices=TRAINED_FAMILIES, default="glm_moe_dsa")
    parser.add_argument("--haystack", required=True, help="folder of the essays (.txt)")
    parser.add_argument("--heads", default="8,12,16,24", help="active heads, comma-separated")
    parser.add_argument("--blocks", default="64", help="router block sizes, comma-separated")
    parser.add_argument("--routers", default="sum", help="router poolings (sum, max), comma-separated")
    parser.add_argument("--hierarchical-factors", default="",
                        help="candidate factors of misa_hierarchical to add, comma-separated (default none)")
    parser.add_argument("--lengths", default="1024,2048")
    parser.add_argument("--depths", default="0,0.5,1")
    parser.add_argument("--new-tokens", type=int, default=40)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    ints = lambda text: [int(x) for x in text.split(",")]  # noqa: E731
    model, tokenizer = load_trained(args.family)
    start = time.perf_counter()
    results = run_niah(model, tokenizer, load_haystack(args.haystack), lengths=ints(args.lengths),
                       depths=[float(x) for x in args.depths.split(",")], max_new_tokens=args.new_tokens,
                       modes=modes(ints(args.heads), ints(args.blocks), args.routers.split(","),
                                   ints(args.hierarchical_factors) if args.hierarchical_factors else []),
                       progress=False)
    for name, grid in results["modes"].items():
        print(f"{name:>22}: " + "  ".join(f"{n}: {row}" for n, row in zip(grid["lengths"], grid["scores"])))
    stamp = datetime.datetime.now(datetime.timezone.utc)
    out = Path(args.out) / f"niah_heads-{args.family}-{stamp:%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(
        args=vars(args), wall_s=round(time.perf_counter() - start, 1), results=results,
        environment=dict(device="cuda" if torch.cuda.is_available() else "cpu", torch=torch.__version__,
                         transformers=transformers.__version__, python=platform.python_version(),
                         date=stamp.isoformat())), indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
