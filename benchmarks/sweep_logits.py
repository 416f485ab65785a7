"""Tile-shape sweep of the logits program (the heavy stage of DSA and MISA) at one causal prefill, side by side.

Each variant is checked against the default program on a small problem first (same logits), then timed at the
given context for 64 heads (the DSA-64 baseline) and 8 routed heads (MISA-8), as the fused select runs it
(fill_future=False; staged stores where the default stages). Compiles run in parallel processes first.

    python benchmarks/sweep_logits.py --context 32768 --out benchmarks/results

A single call writes at most 2^31 logits (one TMA descriptor; the scorer splits bigger calls, this sweep does not),
so 8-head variants need context <= 46340.
"""

from __future__ import annotations

import datetime
import json
import math

import torch

from bench_indexer import DIM, inputs  # this folder's indexer benchmark: same inputs and timing
from gpu_timing import cuda_time_ms
from sweeps import chosen, compile_variants, sweep_parser, write_results
from transformers_misa.kernels.common import ROWS_PER_CTA
from transformers_misa.kernels.logits_shapes import interleave_query_rows
from transformers_misa.kernels.scorer import MAX_TMA_ELEMENTS
from transformers_misa.kernels.scoring import build_weighted_relu_logits, can_interleave, stages_stores
from transformers_misa.ops.masks import ChunkMask

VARIANTS = {  # name -> build options on top of the defaults
    "default": {},
    "stages3": dict(num_stages=3),
    "rows256": dict(rows_per_cta=256),
    "rows256_stages3": dict(rows_per_cta=256, num_stages=3),
    "block_n64": dict(block_n=64),
    "block_n64_rows256": dict(block_n=64, rows_per_cta=256),
    # each tile's epilogue beside the next tile's wgmma (scoring.py's overlapped driver), 2 to 4 key stages
    "overlapped": dict(overlapped=True, num_stages=4),
    "overlapped_stages2": dict(overlapped=True, num_stages=2),
    "overlapped_stages3": dict(overlapped=True, num_stages=3),
    "block_n64_rows256_overlapped": dict(block_n=64, rows_per_cta=256, overlapped=True, num_stages=4),
    "block_n64_rows256_overlapped_stages6": dict(block_n=64, rows_per_cta=256, overlapped=True, num_stages=6),
    # the scorer's prefill shapes: 128 rows x 128 keys for few heads, the wide CTAs (`wide_few_heads` for 4-16 heads,
    # interleaved over 128 rows per warpgroup)
    "square_overlapped": dict(rows_per_cta=128, block_n=128, overlapped=True, num_stages=4),
    "wide_overlapped": dict(rows_per_cta=256, block_n=64, overlapped=True, num_stages=4),
    "wide_overlapped_stages6": dict(rows_per_cta=256, block_n=64, overlapped=True, num_stages=6),
    "wide_overlapped_plain": dict(rows_per_cta=256, block_n=64, overlapped=True, num_stages=4, interleaved=False),
    # the wide overlapped programs before 3d9922f (ptxas injecting a full wgmma wait before every other epilogue),
    # and with two shared-memory buffers for the staged stores (few heads)
    "wide_overlapped_ptxas_wait": dict(rows_per_cta=256, block_n=64, overlapped=True, num_stages=4,
                                       explicit_wgmma_wait=False),
    "wide_overlapped_store_buffers2": dict(rows_per_cta=256, block_n=64, overlapped=True, num_stages=4,
                                           store_buffers=2),
    # the query blocks last to first (the scorer's `longest_first`, its default for at most 16 heads), here over one
    # launch of the whole context
    "wide_overlapped_longest_first": dict(rows_per_cta=256, block_n=64, overlapped=True, num_stages=4,
                                          longest_first=True),
}


def options(heads: int, variant: dict) -> dict:
    """The variant as the fused select builds it: future unwritten, staged stores and the interleaved layout where
    the scorer takes them."""
    interleaved = can_interleave(heads, variant.get("rows_per_cta", ROWS_PER_CTA), variant.get("threads", 256))
    return dict(variant, fill_future=False, staged_stores=stages_stores(heads),
                interleaved=variant.get("interleaved", interleaved))


def run(heads: int, name: str, context: int, reps: int) -> dict:
    variant = options(heads, VARIANTS[name])

    def call(build_options: dict, num_queries: int, num_keys: int):
        kernel = build_weighted_relu_logits(heads, DIM, **build_options)()
        q, keys, weights = inputs(1, num_queries, num_keys, heads)
        ks, ke, _ = ChunkMask(None, slice(0, num_queries), 1, num_queries, num_keys, q.device).key_range
        flat_q = q.reshape(1, num_queries * heads, DIM)
        if build_options["interleaved"]:  # the rows in the order that variant's layout reads them, as the scorer does
            flat_q = interleave_query_rows(flat_q, heads, build_options.get("rows_per_cta", ROWS_PER_CTA)).contiguous()
        return lambda: kernel(flat_q, keys, weights, ks, ke), float(ke.sum() - ks.sum())

    small = 1024  # whole query blocks of every shape
    got, want = call(variant, small, small)[0](), call(options(heads, {}), small, small)[0]()
    visible = torch.arange(small, device="cuda")[None, :] <= torch.arange(small, device="cuda")[:, None]
    same = torch.allclose(got[0][visible], want[0][visible], rtol=1e-4, atol=1e-4)
    # The interleaved layout reads whole CTAs of query rows (the scorer splits off the rest and runs it apart).
    whole_ctas = variant.get("rows_per_cta", ROWS_PER_CTA) // heads if variant["interleaved"] else 1
    fn, pairs = call(variant, context - context % whole_ctas, context)
    ms = cuda_time_ms(fn, reps)
    return {"heads": heads, "variant": name, "rows_per_cta": variant.get("rows_per_cta", 128),
            "interleaved": variant["interleaved"], "matches_default": bool(same), "ms": ms,
            "tflops": 2.0 * heads * DIM * pairs / ms / 1e9}


def main(argv: list[str] | None = None) -> None:
    parser = sweep_parser(__doc__, reps=5, workers=8)
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--heads", default="64,8")
    args = parser.parse_args(argv)
    heads_list = [int(h) for h in args.heads.split(",")]
    jobs = [(h, name) for h in heads_list for name in chosen(VARIANTS, args.variants)]
    staged = sorted({h for h, name in jobs if options(h, VARIANTS[name])["staged_stores"]})
    if staged and args.context**2 >= MAX_TMA_ELEMENTS:
        parser.error(f"--context {args.context}: {staged} heads store through one TMA descriptor of fewer than 2^31 "
                     f"logits; use --context {math.isqrt(MAX_TMA_ELEMENTS - 1)} or less for them")
    builder = "transformers_misa.kernels.scoring:build_weighted_relu_logits"
    errors = compile_variants({(h, name): (builder, (h, DIM), options(h, VARIANTS[name])) for h, name in jobs},
                              args.workers)
    rows = []
    for heads, name in jobs:
        if errors[(heads, name)]:
            row = {"heads": heads, "variant": name, "error": errors[(heads, name)]}
        else:
            try:
                row = run(heads, name, args.context, args.reps)
            except Exception as error:
                row = {"heads": heads, "variant": name, "error": f"{type(error).__name__}: {str(error)[:200]}"}
        rows.append(row)
        print(json.dumps(row), flush=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    write_results(args.out, "sweep_logits", {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                                             "context": args.context, "date": stamp, "results": rows})


if __name__ == "__main__":
    main()
