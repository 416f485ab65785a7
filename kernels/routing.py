"""The host side of MISA's routing programs (`router.py`): when they apply, their operands and CTA shape, a causal
prefill chunk's tail means, and the router score / routing step as `Scorer` entries (`scorer.TILELANG_SCORER`)."""

from __future__ import annotations

import torch

from transformers_misa.ops.blocks import TailBlock
from transformers_misa.ops.masks import ChunkMask
from transformers_misa.ops.reference import reference_head_importance

from .common import _sm_count, queries_per_cta
from .router import build_head_importance
from .tail_means import build_causal_tail_means

# Router CTAs of 256 query rows (4 queries of 64 heads) over tiles of 32 pooled blocks where they still give every SM
# two: half the CTAs, each with the same fixed costs (loading its queries, its tail block, the head pick).
# `python benchmarks/sweep_router.py` on an H200 (64K prefill, sweep_router-20261128-122927.json): 1.83 ms against
# 3.54 for 128 rows x 64 blocks; decode steps keep the default (0.037 ms against 0.050, batch 32 x 4 queries, 128K).
# Registers capped for two CTAs per SM (80, a few spills; the compiler alone takes 146, one CTA per SM), so that one
# CTA's query load, tail block and head pick overlap the other's matmuls: sweep_router-20261203-103049.json, 64K / 32K
# prefill 1.774 / 0.691 ms against 1.814 / 0.739, the same heads picked. Both shapes multiply with the query rows as M
# (`build_head_importance`'s rows_as_m): sweep_router-20261203-221219.json, this shape with tail means 1.08 against
# 1.51 ms at 64K, 3.34 against 4.88 at 128K. Each tile summed per row at once (reduce_per_tile, no spills left):
# sweep_router-20261204-093250.json, 1.022 against 1.148 ms at 64K, 3.120 against 3.402 at 128K.
WIDE_ROUTER = dict(rows_per_cta=256, threads=256, block_m=32, min_ctas_per_sm=2, reduce_per_tile=True)
# A causal prefill chunk's tail means summed in runs of keys per block, one thread per (run, dimension): H200,
# bench_indexer-20261204-121957.json (beside the single run, one thread per dimension): the means' program 0.037
# against 0.083 ms at 64K, 0.12 against 0.28 at 128K. At most 1024 threads per CTA: fewer runs for wider keys.
TAIL_MEAN_SEGMENTS = 8
MAX_THREADS_PER_CTA = 1024


def tail_mean_segments(dim: int, block_size: int, wanted: int = TAIL_MEAN_SEGMENTS) -> int:
    """The most runs per block, up to `wanted`, that divide `block_size` and fit dim x runs threads in one CTA."""
    fitting = [runs for runs in range(2, wanted + 1) if block_size % runs == 0 and dim * runs <= MAX_THREADS_PER_CTA]
    return max(fitting, default=1)


def bf16_head_scores(q: torch.Tensor, keys: torch.Tensor, softmax_scale: float) -> torch.Tensor:
    """Per-head ReLU scores for the small steps (router, re-rank, block filter) on the tensor cores in bf16."""
    scores = torch.matmul(q.to(torch.bfloat16), keys.to(torch.bfloat16).transpose(-1, -2))
    return scores.float().mul_(softmax_scale).relu_()


def _router_program_applies(contiguous: bool | None, router: str) -> bool:
    """Whether the router programs take a chunk: they sum block scores over each query's range [ks, ke), which is
    exact unless the mask has known holes (those take the reference's block visibility); unknown contiguity
    (sync-free decode) routes over [ks, ke), as the dynamic path does for every causal / padding mask."""
    return contiguous is not False and router == "sum"


def _router_operands(q: torch.Tensor, pooled: torch.Tensor,
                     weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Q [B, c·H, D] bf16, Pooled bf16, W fp32), contiguous, as both router programs take them."""
    batch, num_queries, heads, dim = q.shape
    return (q.reshape(batch, num_queries * heads, dim).to(torch.bfloat16).contiguous(),
            pooled.to(torch.bfloat16).contiguous(), weights.float().contiguous())


def router_shape(heads: int, batch: int, num_queries: int, device: torch.device,
                 wide: dict | None = None) -> dict:
    """Build options of the router programs for a call: `wide` (default WIDE_ROUTER) when its CTAs fill the GPU
    twice over, else the default shape."""
    wide = WIDE_ROUTER if wide is None else wide
    wide_ctas = batch * -(-num_queries // queries_per_cta(heads, wide["rows_per_cta"]))
    fits = heads <= wide["rows_per_cta"]
    return wide if fits and wide_ctas >= 2 * _sm_count(device) else {}


def tilelang_head_importance(q: torch.Tensor, weights: torch.Tensor, pooled: torch.Tensor, chunk: ChunkMask,
                             block_size: int, softmax_scale: float, router: str = "sum",
                             tail: TailBlock | None = None, rows_as_m: bool = True,
                             wide_router: dict | None = None) -> torch.Tensor:
    """MISA's router score [B, c, H], fused in one kernel (see `router.py`); masks with holes use the reference.

    The fused program sums; router="max" runs the reference's steps on the tensor cores (bf16 matmul, then the max)
    until a max variant of the program has been checked on a GPU. With a `tail`, the program sums the full blocks
    only (each query's range ends at its tail block's start) and the tail block's own score is added here.
    `rows_as_m`: as in the program (False: the pooled blocks as the matmuls' M, the program before). `wide_router`:
    the build options where a call fills the GPU (default WIDE_ROUTER).
    """
    ks, ke, contiguous = chunk.key_range
    if not _router_program_applies(contiguous, router):
        return reference_head_importance(q, weights, pooled, chunk, block_size, softmax_scale, router,
                                         scores_fn=bf16_head_scores, tail=tail)
    heads, dim = q.shape[2:]
    q_rows, pooled_bf16, weights_fp32 = _router_operands(q, pooled, weights)
    full_block_ends = ke if tail is None else tail.full_block_ends(ke)
    shape = router_shape(heads, q.shape[0], q.shape[1], q.device, wide_router)
    importance = build_head_importance(heads, dim, block_size, rows_as_m=rows_as_m, **shape)()(
        q_rows, pooled_bf16, weights_fp32, ks.contiguous(), full_block_ends.contiguous())
    if tail is not None:
        importance = importance + tail.scores(q, bf16_head_scores, 1.0) * weights.abs()
    return importance * softmax_scale  # ReLU(s·x) = s·ReLU(x): the scale is applied once at the end


def causal_tail_means(keys: torch.Tensor, chunk: ChunkMask, block_size: int,
                      segments: int = TAIL_MEAN_SEGMENTS) -> torch.Tensor | None:
    """Each query's mean tail key [B, c, D] bf16 (`TailBlock.means`) for a causal prefill chunk without a mask, by one
    launch (`tail_means.build_causal_tail_means`); None elsewhere (decode steps, masks): the routing program then reads
    the tails from the key cache itself, which costs little for a few queries and launches nothing more. `segments`:
    runs of keys per block summed by threads of their own (`tail_means.build_causal_tail_means`), at most as many as
    fit the key width and divide the block (`tail_mean_segments`)."""
    if chunk.mask is not None or chunk.sync_free or not TailBlock.uses_prefix_sums(chunk, keys.shape[1], block_size):
        return None
    batch, _, dim = keys.shape
    means = torch.empty(batch, chunk.rows.stop - chunk.rows.start, dim, dtype=torch.bfloat16, device=keys.device)
    build_causal_tail_means(dim, block_size, tail_mean_segments(dim, block_size, segments))()(
        keys, chunk.first_query_end(), means)
    return means


def route_scratch_bytes(heads: int, active_heads: int, dim: int) -> int:
    """Per query, what `tilelang_route` writes for a chunk (the [S, H, M] block scores and the tail block's keys stay
    on chip): its mean tail key and routed query rows (bf16), routed weights and heads, and every head's importance."""
    return 2 * dim + 2 * active_heads * dim + 8 * active_heads + 4 * heads


def tilelang_route(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, pooled: torch.Tensor, chunk: ChunkMask,
                   block_size: int, active_heads: int, softmax_scale: float, head_scale: torch.Tensor | None = None,
                   router: str = "sum", tail_means: bool = True, split_tiles: bool = True,
                   rows_as_m: bool = True, wide_router: dict | None = None,
                   tail_mean_segments: int = TAIL_MEAN_SEGMENTS) -> tuple[torch.Tensor, torch.Tensor] | None:
    """MISA's whole routing step in one program (`router.build_head_importance` with `active_heads`): router
    score with the tail block, head pick and gathers. (q_routed [B, c, A, D] bf16, w_routed [B, c, A] fp32), or None
    where it does not apply (masks with holes, router="max"): then `route_queries` takes its steps one by one.
    The softmax scale multiplies every importance alike, so the pick runs without it. `tail_means`: a causal prefill
    chunk's tails come in as mean keys (`causal_tail_means`; False: read by the program, the path before);
    `split_tiles`, `rows_as_m`: as in the program (False: every tile tested; the pooled blocks as the matmuls' M; the
    programs before). `wide_router`: the build options where a call fills the GPU (default WIDE_ROUTER).
    `tail_mean_segments`: as `causal_tail_means`'s segments."""
    ks, ke, contiguous = chunk.key_range
    if not _router_program_applies(contiguous, router):
        return None
    batch, num_queries, heads, dim = q.shape
    # Made per call on the current stream: a tensor cached across calls could be read by a chunk on another stream
    # (`ops.chunk_streams`) before the stream that made it had filled it.
    scale = torch.ones(heads, device=q.device) if head_scale is None else head_scale.to(q.device, torch.float32)
    q_rows, pooled_bf16, weights_fp32 = _router_operands(q, pooled, weights)
    shape = router_shape(heads, batch, num_queries, q.device, wide_router)
    keys_bf16 = keys.to(torch.bfloat16).contiguous()
    means = causal_tail_means(keys_bf16, chunk, block_size, tail_mean_segments) if tail_means else None
    program = build_head_importance(heads, dim, block_size, active_heads=active_heads, tail_means=means is not None,
                                    split_tiles=split_tiles, rows_as_m=rows_as_m, **shape)
    q_routed, w_routed, _, _ = program()(q_rows, pooled_bf16, keys_bf16 if means is None else means, weights_fp32,
                                         scale.contiguous(), ks.contiguous(), ke.contiguous())
    return q_routed.view(batch, num_queries, active_heads, dim), w_routed
