"""A model of how a causal prefill's logits launches fill the GPU (CPU only): the tail each launch leaves.

The indexer scores a prefill in query chunks, one logits launch each (`ops.reference._select_in_chunks`, chunks of
whole waves of CTAs where the memory budget allows). In a launch each CTA takes a block of queries, and a causal
query block sees as many keys as its last query: the CTAs grow longer through the launch. The model hands the CTAs to
the SMs greedily in launch order (one CTA per SM at a time, as the prefill logits programs run), each as long as its
visible keys plus a fixed cost, and reports the summed launch times over an even spread of the same work. It compares
the launch order (forward), the query blocks taken last to first (`longest_first`) and the queries past whole waves in
the first chunk instead of the last (`remainder_first`).

    python benchmarks/launch_model.py                     # DSA-64 and MISA-8 at 32K, 64K, 128K on 132 SMs

It cannot see what the GPU adds (L2 reuse between CTAs, clocks): on an H200 longest first measured slower for DSA-64
(bench_indexer-20261204-123755-longest-first-not-kept.json) where this model says 2% faster. It says where the tail
can matter, not what a change gains. The indexer now takes longest first for at most 16 heads and the remainder
first for every prefill (`logits_shapes.longest_first_for`, `Scorer.remainder_first`), as measured.
"""

from __future__ import annotations

import argparse
import heapq
import math

from transformers_misa.kernels.common import queries_per_cta
from transformers_misa.kernels.logits_shapes import WIDE_CTA
from transformers_misa.kernels.scorer import TILELANG_SCORER
from transformers_misa.ops.masks import causal_query_chunks

CTA_FIXED_KEYS = 256  # a CTA's fixed cost (queries, weights, its first tiles), in keys' worth of time


def launch_time(blocks: list[int], sms: int) -> float:
    """The time until the last of these CTA lengths ends, handed greedily in order to `sms` SMs."""
    free_at = [0.0] * sms
    for length in blocks:
        heapq.heappush(free_at, heapq.heappop(free_at) + length)
    return max(free_at)


def excess(context: int, heads: int, sms: int, order: str) -> float:
    """Summed launch times over an even spread of the same CTA work, minus one (0.1: 10% longer)."""
    per_cta = queries_per_cta(heads, WIDE_CTA["rows_per_cta"])  # the prefill CTAs of 64 and of 4-16 routed heads
    wave = per_cta * sms
    # the scorer's chunks: its memory budget, whole waves and whole query multiples
    chunks = causal_query_chunks(context, context, lambda width: TILELANG_SCORER.scratch_bytes(heads, width),
                                 TILELANG_SCORER.chunk_budget,
                                 multiple=math.lcm(wave, TILELANG_SCORER.query_multiple),
                                 remainder_first=order == "remainder_first")

    def cta_lengths(queries: range) -> list[int]:  # each CTA's visible keys (its last query's) plus its fixed cost
        return [min(start + per_cta, context) + CTA_FIXED_KEYS for start in queries[::per_cta]]

    total = 0.0
    for chunk in chunks:
        blocks = cta_lengths(range(chunk.start, chunk.stop))
        total += launch_time(blocks[::-1] if order == "longest_first" else blocks, sms)
    return total / (sum(cta_lengths(range(context))) / sms) - 1


ORDERS = ("forward", "longest_first", "remainder_first")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", default="32768,65536,131072")
    parser.add_argument("--heads", default="64,8", help="query rows per token in the logits (DSA-64, MISA-8)")
    parser.add_argument("--sms", type=int, default=132)
    args = parser.parse_args(argv)
    rows = []
    print(f"{'heads':>5} {'context':>7} " + " ".join(f"{order:>16}" for order in ORDERS))
    for heads in (int(h) for h in args.heads.split(",")):
        for context in (int(c) for c in args.contexts.split(",")):
            row = {"heads": heads, "context": context, **{o: excess(context, heads, args.sms, o) for o in ORDERS}}
            rows.append(row)
            print(f"{heads:>5} {context:>7} " + " ".join(f"{row[o]:>15.1%} " for o in ORDERS))
    return rows


if __name__ == "__main__":
    main()
