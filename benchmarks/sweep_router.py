"""Variant sweep of MISA's fused routing program (`kernels.router` with active_heads): CTA shape and pipeline depth.

The workloads the indexer gives it: a causal prefill of a 32K, 64K and 128K context (B = 1, every query) and a
decode step (batch 32 x 4 new queries, 128K cache), 64 heads of dim 128, blocks of 128 keys, 8 active heads. Each
variant is checked against the program's defaults (heads picked, importance) and timed; compiles run in parallel
processes first.

    python benchmarks/sweep_router.py --out benchmarks/results
"""

from __future__ import annotations

import json

import torch

from bench_indexer import BLOCK, DIM, inputs  # this folder's indexer benchmark
from gpu_timing import cuda_time_ms, environment
from sweeps import chosen, compile_variants, sweep_parser, write_results
from transformers_misa.kernels.router import build_head_importance
from transformers_misa.kernels.routing import WIDE_ROUTER
from transformers_misa.ops.blocks import TailBlock
from transformers_misa.ops.masks import ChunkMask

HEADS, ACTIVE = 64, 8
BLOCKS_AS_M = dict(rows_as_m=False)  # the programs before the query rows became the matmuls' M (rows_as_m)
WIDE = dict(WIDE_ROUTER, reduce_per_tile=False)  # the prefill shape before it summed each tile at once
VARIANTS = {  # name -> build options; the reference of the check is the program's defaults
    "default": dict(BLOCKS_AS_M),
    "rows256_threads512": dict(BLOCKS_AS_M, rows_per_cta=256, threads=512),
    "rows256_threads256": dict(BLOCKS_AS_M, rows_per_cta=256, threads=256),
    "stages3": dict(BLOCKS_AS_M, num_stages=3),
    "rows256_threads512_stages3": dict(BLOCKS_AS_M, rows_per_cta=256, threads=512, num_stages=3),
    "block_m32": dict(BLOCKS_AS_M, block_m=32),
    "rows256_threads512_block_m32": dict(BLOCKS_AS_M, rows_per_cta=256, threads=512, block_m=32),
    "rows256_threads256_block_m32": dict(BLOCKS_AS_M, rows_per_cta=256, threads=256, block_m=32),
    # The same with registers capped for two CTAs per SM (the compiler's choice, 146 registers, leaves room for one:
    # the queries' loads, tail blocks and head picks then never overlap another CTA's matmuls), and smaller CTAs.
    "rows256_threads256_block_m32_2ctas": dict(BLOCKS_AS_M, rows_per_cta=256, threads=256, block_m=32,
                                               min_ctas_per_sm=2),
    "rows128_threads128_block_m32_3ctas": dict(BLOCKS_AS_M, rows_per_cta=128, threads=128, block_m=32,
                                               min_ctas_per_sm=3),
    "rows128_threads128_block_m64_2ctas": dict(BLOCKS_AS_M, rows_per_cta=128, threads=128, block_m=64,
                                               min_ctas_per_sm=2),
    # The prefill shape (routing.WIDE_ROUTER) with its tails as mean keys computed beforehand (as a causal prefill
    # chunk gets them; here from TailBlock, outside the timing), and with every tile's scores tested against each
    # row's visible blocks (the program before whole tiles skipped that test).
    "wide_tail_means": dict(WIDE, **BLOCKS_AS_M, tail_means=True),
    "wide_every_tile_tested": dict(WIDE, **BLOCKS_AS_M, split_tiles=False),
    "wide_every_tile_tested_tail_means": dict(WIDE, **BLOCKS_AS_M, split_tiles=False, tail_means=True),
    "tail_means": dict(BLOCKS_AS_M, tail_means=True),
    "every_tile_tested": dict(BLOCKS_AS_M, split_tiles=False),
    # The query rows as the matmuls' M (the programs' default since 2026-12-03; wgmma in every shape, where the blocks
    # as M take mma.sync below 64 blocks per tile).
    "rows_as_m": dict(rows_as_m=True),  # the default shape, as decode steps take it
    "wide_tail_means_rows_as_m": dict(WIDE, tail_means=True, rows_as_m=True),
    "wide_tail_means_rows_as_m_1cta": dict(WIDE, tail_means=True, rows_as_m=True, min_ctas_per_sm=0),
    "wide_tail_means_rows_as_m_block_m64": dict(WIDE, tail_means=True, rows_as_m=True, block_m=64,
                                                min_ctas_per_sm=0),
    "wide_tail_means_rows_as_m_block_m64_stages3": dict(WIDE, tail_means=True, rows_as_m=True, block_m=64,
                                                        min_ctas_per_sm=0, num_stages=3),
    "wide_tail_means_rows_as_m_threads512_block_m64": dict(WIDE, tail_means=True, rows_as_m=True, block_m=64,
                                                           threads=512, min_ctas_per_sm=0),
    "wide_tail_means_rows_as_m_threads128": dict(WIDE, tail_means=True, rows_as_m=True, threads=128,
                                                 min_ctas_per_sm=0),
    "tail_means_rows_as_m_block_m64_2ctas": dict(tail_means=True, rows_as_m=True, block_m=64, min_ctas_per_sm=2),
    # Each tile's scores summed per row at once (reduce_per_tile; no running [rows, block_m] sum), the wide shape's
    # default since sweep_router-20261204-093250.json, and in 128-row CTAs. The query rows copied into registers once
    # (wgmma reading A from registers) were tried in that sweep and dropped: slower where right, wrong in the wide CTAs.
    "wide_reduce_per_tile": dict(WIDE, tail_means=True, reduce_per_tile=True),
    "rows128_reduce_3ctas": dict(tail_means=True, rows_per_cta=128, threads=128, block_m=32, min_ctas_per_sm=3,
                                 reduce_per_tile=True),
    "rows128_reduce_4ctas": dict(tail_means=True, rows_per_cta=128, threads=128, block_m=32, min_ctas_per_sm=4,
                                 reduce_per_tile=True),
}


def routing_operands(batch: int, queries: int, num_keys: int) -> tuple:
    """The routing program's operands for `queries` new queries per sequence at the end of `num_keys` keys."""
    q, keys, weights = inputs(batch, queries, num_keys, HEADS)
    full = num_keys // BLOCK * BLOCK
    pooled = keys[:, :full].float().view(batch, -1, BLOCK, DIM).mean(2).to(torch.bfloat16).contiguous()
    ke = torch.arange(num_keys - queries + 1, num_keys + 1, dtype=torch.int32, device="cuda").expand(batch, -1)
    ks = torch.zeros_like(ke)
    return (q.reshape(batch, queries * HEADS, DIM).contiguous(), pooled, keys, weights.contiguous(),
            torch.ones(HEADS, device="cuda"), ks.contiguous(), ke.contiguous())


def with_tail_means(operands: tuple) -> tuple:
    """The same operands with each query's mean tail key in the place of the key cache (`tail_means` programs)."""
    q_rows, pooled, keys, weights, scale, ks, ke = operands
    batch, queries = weights.shape[:2]
    chunk = ChunkMask(None, slice(0, queries), batch, queries, keys.shape[1], keys.device)
    means = TailBlock(keys, chunk, BLOCK).means.to(torch.bfloat16).contiguous()
    return q_rows, pooled, means, weights, scale, ks, ke


def main(argv: list[str] | None = None) -> None:
    parser = sweep_parser(__doc__, reps=10, workers=6)
    args = parser.parse_args(argv)
    builder = "transformers_misa.kernels.router:build_head_importance"
    variants = {name: VARIANTS[name] for name in chosen(VARIANTS, args.variants)}
    errors = compile_variants({name: (builder, (HEADS, DIM, BLOCK), dict(options, active_heads=ACTIVE))
                               for name, options in variants.items()}, args.workers)
    workloads = {"prefill_64K": (1, 65536, 65536), "prefill_32K": (1, 32768, 32768),
                 "prefill_128K": (1, 131072, 131072), "decode_128K_b32_q4": (32, 4, 131072)}
    rows = []
    for workload, shape in workloads.items():
        operands = routing_operands(*shape)
        means_operands = with_tail_means(operands)
        _, _, heads_ref, importance_ref = build_head_importance(HEADS, DIM, BLOCK, active_heads=ACTIVE)()(*operands)
        for name, options in variants.items():
            row = {"workload": workload, "variant": name, **options}
            if errors[name]:
                row["error"] = errors[name]
            else:
                kernel = build_head_importance(HEADS, DIM, BLOCK, active_heads=ACTIVE, **options)()
                inputs_of_variant = means_operands if options.get("tail_means") else operands
                _, _, picked, importance = kernel(*inputs_of_variant)
                row["same_heads"] = float((picked == heads_ref).float().mean())
                row["importance_max_rel_diff"] = float(
                    ((importance - importance_ref).abs() / importance_ref.abs().clamp_min(1e-6)).max())
                row["ms"] = cuda_time_ms(lambda: kernel(*inputs_of_variant), args.reps)
            rows.append(row)
            print(json.dumps(row), flush=True)
        del operands, means_operands
        torch.cuda.empty_cache()
    write_results(args.out, "sweep_router", {"environment": environment(), "results": rows})


if __name__ == "__main__":
    main()
