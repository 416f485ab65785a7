"""Scorer variants kept beside `scorer.TILELANG_SCORER` so that the benchmark (`benchmarks/bench_indexer.py`) times
them side by side with the default: most are a former default (each comment names what replaced it), the others
opt-in paths measured against it. Nothing in the package's own dispatch uses them.
"""

from __future__ import annotations

import dataclasses
import functools

from .routing import WIDE_ROUTER, tilelang_head_importance, tilelang_route
from .scorer import TILELANG_SCORER, logits_variant, tilelang_select_tokens

# The plain row order (query · heads + head) for every head count: the layout before the interleaved one, kept so
# that the benchmark times both side by side.
TILELANG_PLAIN_LAYOUT_SCORER = logits_variant("tilelang-plain-layout", interleaved=False)

# Prefill logits by TileLang's pipeline (each tile's epilogue after its wgmma, the driver before the overlapped
# one), kept so that the benchmark times both side by side.
TILELANG_PIPELINED_SCORER = logits_variant("tilelang-pipelined", overlapped=False)

# Wide prefill top-k through the sampled threshold (`ops.threshold`): exact, opt-in; the benchmark times it beside
# the dense path.
TILELANG_THRESHOLD_SCORER = dataclasses.replace(
    TILELANG_SCORER, name="tilelang-threshold", fused_select=functools.partial(tilelang_select_tokens, threshold=True))

# The wide prefill router shape as it was before it summed each tile at once (reduce_per_tile), for the variants of
# earlier routing programs below.
_RUNNING_SUM = dict(WIDE_ROUTER, reduce_per_tile=False)

# MISA's routing in separate launches (router program, tail block, head top-k and gathers in PyTorch): the path before
# the fused routing program, kept so that the benchmark times both side by side.
TILELANG_STEPWISE_ROUTING_SCORER = dataclasses.replace(TILELANG_SCORER, name="tilelang-stepwise-routing", route=None)

# The routing program as it was before a prefill's tails came in as mean keys (tails read by the program), and before
# whole tiles skipped the visibility test as well, kept so that the benchmark times them side by side.
TILELANG_TAIL_KEYS_SCORER = dataclasses.replace(TILELANG_SCORER, name="tilelang-tail-keys",
                                                route=functools.partial(tilelang_route, tail_means=False,
                                                                        rows_as_m=False, wide_router=_RUNNING_SUM))
TILELANG_EVERY_TILE_TESTED_SCORER = dataclasses.replace(
    TILELANG_SCORER, name="tilelang-every-tile-tested",
    route=functools.partial(tilelang_route, tail_means=False, split_tiles=False, rows_as_m=False,
                            wide_router=_RUNNING_SUM))

# The router programs multiplying with the pooled blocks as M (before the query rows were, `router.py`'s rows_as_m),
# kept so that the benchmark times both side by side.
TILELANG_BLOCKS_AS_M_ROUTER_SCORER = dataclasses.replace(
    TILELANG_SCORER, name="tilelang-blocks-as-m-router",
    route=functools.partial(tilelang_route, rows_as_m=False, wide_router=_RUNNING_SUM),
    head_importance=functools.partial(tilelang_head_importance, rows_as_m=False, wide_router=_RUNNING_SUM))

# 4-16 routed heads in the 128-row CTAs over 128-key tiles (the shape before WIDE_FEW_HEADS), kept so that the
# benchmark times both side by side.
TILELANG_SQUARE_FEW_HEADS_SCORER = logits_variant("tilelang-square-few-heads", waves=True, wide_few_heads=False)

# 32 heads in the plain layout of the wide CTAs (before INTERLEAVED_MANY_HEADS), kept so that the benchmark times both
# side by side.
TILELANG_PLAIN_MANY_HEADS_SCORER = logits_variant("tilelang-plain-many-heads", interleaved_many_heads=False)

# The prefill top-k without `compact_second_pass` and `bins_in_registers` (before topk.MANY_ROWS_VECTOR_SHAPE took
# them, and its sampled bound), kept so that the benchmark times both side by side.
TILELANG_PLAIN_TOPK_SCORER = dataclasses.replace(
    TILELANG_SCORER, name="tilelang-plain-topk",
    fused_select=functools.partial(tilelang_select_tokens, topk_options=dict(
        compact_second_pass=False, bins_in_registers=False, sample_every=0)))

# A prefill's routing program keeping a running [rows, block_m] sum reduced once at the end (before WIDE_ROUTER took
# reduce_per_tile), kept so that the benchmark times both side by side.
TILELANG_RUNNING_SUM_ROUTER_SCORER = dataclasses.replace(
    TILELANG_SCORER, name="tilelang-running-sum-router",
    route=functools.partial(tilelang_route, wide_router=_RUNNING_SUM))

# A causal prefill chunk's tail means summed by one thread per dimension over each whole block (one run, the default
# before `routing.TAIL_MEAN_SEGMENTS`), timed beside the default by the benchmark.
TILELANG_SINGLE_RUN_TAIL_MEANS_SCORER = dataclasses.replace(
    TILELANG_SCORER, name="tilelang-single-run-tail-means",
    route=functools.partial(tilelang_route, tail_mean_segments=1))

# The prefill top-k reading every row twice (before topk.MANY_ROWS_VECTOR_SHAPE took `sample_every`, its bound from
# a sample of the row), kept so that the benchmark times both side by side.
TILELANG_UNSAMPLED_TOPK_SCORER = dataclasses.replace(
    TILELANG_SCORER, name="tilelang-unsampled-topk",
    fused_select=functools.partial(tilelang_select_tokens, topk_options=dict(sample_every=0)))

# The prefill top-k's bound from a denser sample (one 32-byte sector of every 16, before topk.MANY_ROWS_VECTOR_SHAPE
# took 1/32), kept so that the benchmark times both side by side.
TILELANG_SAMPLED16_TOPK_SCORER = dataclasses.replace(
    TILELANG_SCORER, name="tilelang-sampled16-topk",
    fused_select=functools.partial(tilelang_select_tokens, topk_options=dict(sample_every=16)))

# A prefill's query chunks taking two CUDA streams in turn (`Scorer.chunk_streams`), so that one chunk's top-k can
# run beside the next chunk's routing and logits; twice the chunks' scratch alive. Opt-in: on an H200 with the
# step-by-step routing's chunks (bench_indexer-20261204-200012.json, host hidden, medians of 3 rounds) MISA-8 4.11 /
# 14.42 / 52.60 ms against 4.22 / 14.72 / 54.18 on one stream, DSA-64 within 1%, at 32K / 64K / 128K; less than the
# larger chunks gained, which are now the default.
TILELANG_TWO_STREAMS_SCORER = dataclasses.replace(TILELANG_SCORER, name="tilelang-two-streams", chunk_streams=2)

# MISA's prefill chunks sized as for the step-by-step routing (its [S, H, M] block scores and tail block), before
# `routing.route_scratch_bytes` sized them by what the fused routing program writes; kept so that the benchmark times
# both side by side.
TILELANG_STEPWISE_ROUTE_CHUNKS_SCORER = dataclasses.replace(TILELANG_SCORER, name="tilelang-stepwise-route-chunks",
                                                            route_scratch_bytes=None)

# Both methods' chunks sized by their logits alone (4 bytes per key and query, not the 3x kept from when the top-k
# was torch.topk): 1 / 2 / 6 chunks for both at 32K / 64K / 128K on 132 SMs, each up to the whole 8 GiB budget of
# logits. Opt-in for the maskless prefills it was sized for (a mask's bias doubles a chunk's logits). H200 (host
# hidden, medians of 3 rounds, bench_indexer-20261204-200012.json): MISA-8 4.08 / 13.85 / 50.41 ms against 4.11 /
# 14.14 / 52.34 with the default's chunks, DSA-64 17.98 / 73.31 / 281.75 against 17.80 / 71.98 / 280.55, at a peak
# extra memory of 4.4 / 8.0 / 9.0 GiB (the default's: 2.5 / 3.1 / 3.5 MISA-8, 2.9 / 3.2 / 3.6 DSA-64).
TILELANG_LEAN_SCRATCH_SCORER = dataclasses.replace(TILELANG_SCORER, name="tilelang-lean-scratch",
                                                   scratch_bytes=lambda heads, keys: 4 * keys)

# Query chunks sized by the memory budget alone, before they held whole waves of logits CTAs (`logits_wave_queries`),
# kept so that the benchmark times both side by side.
TILELANG_BUDGET_CHUNKS_SCORER = dataclasses.replace(TILELANG_SCORER, name="tilelang-budget-chunks", wave_queries=None)

# A prefill's logits query blocks and top-k rows last to first for every head count (the default takes it for the few
# routed heads only, `logits_shapes.longest_first_for`): opt-in, timed beside the default by the benchmark.
TILELANG_LONGEST_FIRST_SCORER = logits_variant("tilelang-longest-first", longest_first=True)

# A causal prefill's queries past whole waves of logits CTAs in its last query chunk (before `Scorer.remainder_first`
# put them in its first), kept so that the benchmark times both side by side.
TILELANG_LAST_REMAINDER_SCORER = dataclasses.replace(TILELANG_SCORER, name="tilelang-last-remainder",
                                                     remainder_first=False)

# Every head count's prefill in launch order with its remainder last: the schedule before
# `logits_shapes.longest_first_for` and `Scorer.remainder_first`, kept so that the benchmark times both side by side.
TILELANG_FORWARD_ORDER_SCORER = dataclasses.replace(logits_variant("tilelang-forward-order", longest_first=False),
                                                    remainder_first=False)
