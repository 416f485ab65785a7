"""The sampled-threshold top-k's stages timed one by one against the dense logits (one H100/H200).

One call over the whole causal prefill (no query chunks), random bf16 inputs as bench_indexer uses:
dense logits (the default path's logits program), the threshold sample, the candidate program with the real
thresholds and with thresholds no key reaches (its cost without any candidate store), the candidates' top-k, and
how many candidates the rows got. Prints one line per shape and writes JSON under benchmarks/results/.

    python benchmarks/threshold_stages.py
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
SCALE = 128**-0.5
TOPK = 2048


def measure(context: int, heads: int, reps: int) -> dict:
    from bench_indexer import inputs
    from gpu_timing import cuda_time_ms

    from transformers_misa.kernels import scorer as kernels
    from transformers_misa.ops.threshold import sampled_thresholds

    q, keys, weights = inputs(1, context, context, heads)
    ke = (torch.arange(context, device="cuda") + 1).int()[None]
    ks = torch.zeros_like(ke)
    capacity = kernels.candidate_capacity(TOPK)
    ops = kernels.threshold_ops(SCALE)
    theta = sampled_thresholds(q, weights, keys, ks, ke, TOPK, ops, capacity)
    unreachable = torch.full_like(theta, float("inf"))
    row = {"context": context, "heads": heads, "ms": {
        "dense_logits": cuda_time_ms(lambda: kernels._logits(q, weights, keys, ks, ke, SCALE, fill_future=False), reps),
        "sample": cuda_time_ms(lambda: sampled_thresholds(q, weights, keys, ks, ke, TOPK, ops, capacity), reps),
        "candidates": cuda_time_ms(lambda: kernels._candidates(q, weights, keys, ks, ke, theta, capacity, SCALE),
                                   reps),
        "candidates_none_pass": cuda_time_ms(
            lambda: kernels._candidates(q, weights, keys, ks, ke, unreachable, capacity, SCALE), reps),
    }}
    values, key_index, count = kernels._candidates(q, weights, keys, ks, ke, theta, capacity, SCALE)
    row["ms"]["candidate_topk"] = cuda_time_ms(lambda: kernels.radix_topk_of_candidates(values, key_index, TOPK), reps)
    wide = count[0, 4 * TOPK:].float()  # rows past the short ones, which keep every key
    row["redone_rows"] = int(((count < TOPK) | (count > capacity)).sum())
    row["candidates_per_row"] = {"mean": wide.mean().item(), "min": wide.min().item(), "max": wide.max().item()}
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="32768x8,65536x8,65536x64", help="context x heads, comma separated")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("threshold_stages needs a CUDA GPU (H100/H200)")
    rows = []
    for shape in args.shapes.split(","):
        context, heads = (int(x) for x in shape.split("x"))
        rows.append(measure(context, heads, args.reps))
        print(json.dumps(rows[-1]), flush=True)
        torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    path = args.out / f"threshold_stages-{stamp}.json"
    path.write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "date": stamp,
                                "topk": TOPK, "rows": rows}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
