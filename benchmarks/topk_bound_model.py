"""How far a lower bound on each row's k-th value cuts the top-k's second read (CPU model, random inputs).

The two-pass top-k reads each row twice (a histogram pass, then a pass keeping the values at or above the k-th
value's bin); it is the same program for DSA-64 and MISA-8 and the largest part of MISA-8's time that is not its
logits. A one-read top-k (a prefill's default since c81196d, with the `--sample` bound below) needs, before its
pass, a bound L <= the row's k-th value, so that it can keep every value >= L in shared memory as it reads and resolve
the k-th value from them. The logits program could give one: the maximum of each group of `group` consecutive keys
of a query, written beside the logits (1/group of their bytes, `topk_bounds.group_maxima`; tried in fc6a672 - 18553dc
and removed: it cost the logits program about what it saved the top-k). The k-th largest of a row's group maxima is
such a bound (k groups have a value at or above it), once the row has at least k groups.

This model builds causal-prefill-like rows (the weighted-ReLU score of random bf16 queries and keys, H heads, signed
weights, as `bench_indexer.py`'s inputs) and reports per row length: the values at or above the bound (what the
one-read pass would keep; the prefill top-k has a 4096-key buffer), and, per causal context, the share of the top-k's
bytes in rows whose bound keeps at most `buffer` values (rows the second read could be skipped for). It cannot see
trained models' distributions.

`--sample S` models the bound the top-k can find from the row itself instead (`build_radix_topk(sample_every=S)`,
`topk_bounds.sampled_bounds`: a histogram of one 32-byte sector of every S, nothing asked of the logits program).

    python benchmarks/topk_bound_model.py                  # 8 and 64 heads, rows of 8K-128K keys
    python benchmarks/topk_bound_model.py --sample 16      # the bound from a 1/16 sample of each row
"""

from __future__ import annotations

import argparse
import json

import torch

from topk_conflicts import FIRST_DIGIT  # this folder's model of the first pass
from transformers_misa.kernels.topk_bounds import (group_maxima_bounds, lowest_values_with_keys, order_keys,
                                                   sampled_bounds)

TOPK = 2048


def row_scores(heads: int, num_keys: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """One query's weighted-ReLU scores over `num_keys` random keys."""
    q = torch.randn(heads, dim, generator=generator).bfloat16().float()
    keys = torch.randn(num_keys, dim, generator=generator).bfloat16().float()
    weights = torch.randn(heads, generator=generator)
    return (torch.relu(q @ keys.T) * weights[:, None]).sum(0)


def first_level_floor(value: float) -> float:
    """The lowest float of `value`'s first-level bin in the radix top-k (the top 12 bits of its order key): a bound a
    top-k can find with one histogram of the group maxima, without selecting their exact k-th value."""
    low = order_keys(torch.tensor([value])) >> FIRST_DIGIT << FIRST_DIGIT  # the bin's lowest key
    return lowest_values_with_keys(low).item()


def kept_by_bound(row: torch.Tensor, group: int, k: int, bin_floor: bool = False, sample: int = 0) -> int | None:
    """Values >= the k-th largest maximum of the row's groups of `group` keys (`bin_floor`: >= the lowest float of
    its first-level bin); None where the row has < k groups. `sample` S > 0: >= the bound the top-k finds from a
    sample of the row itself instead (`topk_bounds.sampled_bounds`; None where the row is too short to sample)."""
    if sample:
        bound = float(sampled_bounds(row.view(1, -1), torch.tensor([row.numel()]), k, sample)[0])
        return None if bound == float("-inf") else int((row >= bound).sum())
    if row.numel() // group < k:  # fewer than k whole groups
        return None
    bound = float(group_maxima_bounds(row.view(1, -1), torch.tensor([row.numel()]), k, group)[0])
    return int((row >= (first_level_floor(bound) if bin_floor else bound)).sum())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", default="8,64")
    parser.add_argument("--lengths", default="8192,16384,20480,24576,32768,40960,49152,65536,98304,131072")
    parser.add_argument("--contexts", default="65536,131072")
    parser.add_argument("--group", type=int, default=16)
    parser.add_argument("--buffer", type=int, default=4096)
    parser.add_argument("--bin-floor", action="store_true",
                        help="the bound lowered to the first-level bin floor of the k-th group maximum")
    parser.add_argument("--sample", type=int, default=0,
                        help="S > 0: the bound from a sample of 1/S of the row (`build_radix_topk(sample_every=S)`)")
    parser.add_argument("--rows", type=int, default=3, help="random rows per length (the median is reported)")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",")]
    results = {"group": args.group, "buffer": args.buffer, "bin_floor": args.bin_floor, "sample": args.sample,
               "topk": TOPK, "heads": {}}
    for heads in (int(h) for h in args.heads.split(",")):
        generator = torch.Generator().manual_seed(heads)
        kept = {}
        for length in lengths:
            counts = [kept_by_bound(row_scores(heads, length, args.dim, generator), args.group, TOPK, args.bin_floor,
                                    args.sample) for _ in range(args.rows)]
            kept[length] = None if counts[0] is None else sorted(counts)[len(counts) // 2]
            print(f"H={heads:>2} row of {length:>6} keys: {kept[length]} values at or above the bound", flush=True)
        # a causal prefill's rows: row t reads t values; a row shorter than the lengths measured counts as unbounded
        shares = {}
        for context in (int(c) for c in args.contexts.split(",")):
            usable = [n for n in lengths if n <= context and kept[n] is not None and kept[n] <= args.buffer]
            start = min(usable) if usable else context + 1  # rows from here on (between measured lengths: assumed)
            bytes_all = context * (context + 1) / 2
            bytes_bounded = sum(range(start, context + 1)) if start <= context else 0
            shares[context] = round(bytes_bounded / bytes_all, 3)
            print(f"H={heads:>2} causal {context:>6}: rows from {start} keys on ({shares[context]:.0%} of the top-k's "
                  f"bytes) keep at most {args.buffer} values", flush=True)
        results["heads"][heads] = {"kept": kept, "bytes_share_bounded": shares}
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=1)
    return results


if __name__ == "__main__":
    main()
