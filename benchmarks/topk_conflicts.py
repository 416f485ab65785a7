"""How often a warp's first-level histogram atomics hit one address in the top-k's first pass (CPU model).

The radix top-k (`kernels/topk.py`) counts each value into one of 4096 first-level bins (the order key's top 12 bits:
sign, exponent, three mantissa bits) with a shared-memory atomic; a warp's 32 lanes load adjacent 16-byte groups and
count one of the 4 values of each group per atomic instruction. Lanes hitting one address replay. This model builds
causal-prefill-like rows (the weighted-ReLU score of random bf16 queries and keys, H heads) and reports the distinct
bins of a row and the mean of each warp instruction's busiest-address count (the replay factor). A warp-aggregated
first pass that removes it (`__match_any_sync`) was 2.5-3x slower on an H200 (README, sweep_topk-20261204-145025): the
replays cost less than the match. It cannot see trained models' distributions.

    python benchmarks/topk_conflicts.py                   # 8 and 64 heads, 32K keys
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from transformers_misa.kernels.topk import LEVELS
from transformers_misa.kernels.topk_bounds import order_keys

(FIRST_BITS, FIRST_SHIFT), *_ = LEVELS
FIRST_DIGIT = FIRST_SHIFT - FIRST_BITS  # the first level's bin is the order key above this bit (the top 12 bits)
LANES, VECTOR = 32, 4  # a warp's lanes, floats per lane and load


def busiest_address_counts(row: np.ndarray) -> np.ndarray:
    """Per warp atomic instruction: how many of its lanes count into its busiest bin."""
    bins = order_keys(torch.from_numpy(row)).numpy() >> FIRST_DIGIT
    usable = len(bins) // (LANES * VECTOR) * LANES * VECTOR
    per_instruction = bins[:usable].reshape(-1, LANES, VECTOR).transpose(0, 2, 1).reshape(-1, LANES)
    return np.array([np.bincount(lanes - lanes.min()).max() for lanes in per_instruction])


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", default="8,64")
    parser.add_argument("--keys", type=int, default=32768)
    parser.add_argument("--dim", type=int, default=128)
    args = parser.parse_args(argv)
    rows = []
    for heads in (int(h) for h in args.heads.split(",")):
        generator = torch.Generator().manual_seed(heads)
        q = torch.randn(heads, args.dim, generator=generator).bfloat16().float()
        keys = torch.randn(args.keys, args.dim, generator=generator).bfloat16().float()
        weights = torch.randn(heads, generator=generator).abs()
        row = ((torch.relu(q @ keys.T) * weights[:, None]).sum(0) * args.dim**-0.5).numpy()
        counts = busiest_address_counts(row)
        distinct = int(len(np.unique(order_keys(torch.from_numpy(row)).numpy() >> FIRST_DIGIT)))
        result = {"heads": heads, "keys": args.keys, "distinct_bins": distinct,
                  "mean_busiest_address_count": round(float(counts.mean()), 2)}
        print(result)
        rows.append(result)
    return rows


if __name__ == "__main__":
    main()
