"""The TileLang `Scorer`: plugs the GPU programs into the reference algorithms of `transformers_misa.ops`.

Every mode keeps its algorithm from `ops.reference` (routing, candidate re-rank, block filter); the heavy
token-level stage runs in `scoring.build_weighted_relu_logits` (launched as `logits_shapes` decides per call), the
top-k in `topk.build_radix_topk`, MISA's routing through `routing` (the host side of `router.py`). Imported only
when tensors sit on a CUDA device of compute capability >= 9.0, so a CPU-only machine never touches TileLang.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from transformers_misa.ops.blocks import fp8_e4m3_quantize, top_indices
from transformers_misa.ops.masks import ChunkMask
from transformers_misa.ops.reference import Scorer
from transformers_misa.ops.threshold import (
    CAPACITY_FACTOR,
    ThresholdOps,
    reference_topk_of_candidates,
    threshold_select,
)

from .common import _sm_count, queries_per_cta
from .gathered import build_gathered_logits
from .logits_shapes import (
    INTERLEAVED_MANY_HEADS,
    KEY_TILE,
    LONGEST_FIRST,
    WIDE_FEW_HEADS,
    interleave_query_rows,
    logits_options,
    logits_wave_queries,
    longest_first_for,
    query_layout,
)
from .routing import bf16_head_scores, route_scratch_bytes, tilelang_head_importance, tilelang_route
from .scoring import build_weighted_relu_logits
from . import topk as topk_program
from .topk import build_radix_topk

# Below this row width torch.topk is as fast and the radix program is not worth a compile.
RADIX_MIN_WIDTH = 4096
MAX_TMA_ELEMENTS = 2**31  # one logits call writes fewer elements than this (its TMA descriptor's index range)


def _logits(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, ks: torch.Tensor, ke: torch.Tensor,
            softmax_scale: float, fill_future: bool, fp8: bool = False, interleaved: bool = True,
            overlapped: bool = True, wide_few_heads: bool = WIDE_FEW_HEADS,
            interleaved_many_heads: bool = INTERLEAVED_MANY_HEADS,
            longest_first: bool | None = LONGEST_FIRST) -> torch.Tensor:
    """Logits [B, S, T] fp32 by the TileLang program; `interleaved`: the head sum in registers wherever that layout
    applies (bf16, 2-16 heads, at least one whole query block), the plain layout elsewhere; `overlapped`: each
    tile's epilogue runs beside the next tile's matmul where `logits_options` takes it; `wide_few_heads`: 4-16
    interleaved heads in 256-row CTAs (see WIDE_FEW_HEADS_MIN) where a prefill has a whole such block;
    `interleaved_many_heads`: 32 heads interleaved in the wide CTAs too (a call whose keys are split over 128-row
    CTAs keeps the plain layout). See `query_layout`. `longest_first`: see `logits_options`."""
    batch, num_queries, heads, dim = q.shape
    interleaved, wide_few_heads, block = query_layout(heads, num_queries, fp8, interleaved, wide_few_heads,
                                                      interleaved_many_heads)
    # The TMA store's descriptor cannot span more elements than this: split the queries, in whole query blocks.
    per_call = max(block, (MAX_TMA_ELEMENTS - 1) // max(1, keys.shape[1]) // block * block)
    again = functools.partial(_logits, softmax_scale=softmax_scale, fill_future=fill_future, fp8=fp8,
                              interleaved=interleaved, overlapped=overlapped, wide_few_heads=wide_few_heads,
                              interleaved_many_heads=interleaved_many_heads, longest_first=longest_first)
    if num_queries > per_call:
        return torch.cat([again(q[:, i : i + per_call], weights[:, i : i + per_call], keys, ks[:, i : i + per_call],
                                ke[:, i : i + per_call]) for i in range(0, num_queries, per_call)], dim=1)
    if interleaved and num_queries % block:  # the layout takes whole query blocks: pad with queries that see nothing
        pad = block - num_queries % block
        q, weights, ks, ke = (torch.nn.functional.pad(x, (0, 0) * (x.dim() - 2) + (0, pad))
                              for x in (q, weights, ks, ke))
        return again(q, weights, keys, ks, ke)[:, :num_queries]
    options = logits_options(heads, batch, num_queries, keys.shape[1], _sm_count(q.device), fill_future, fp8,
                             interleaved, overlapped, wide_few_heads, longest_first)
    interleaved = options["interleaved"]
    kernel = build_weighted_relu_logits(heads, dim, **options)()
    # ReLU(s·x) = s·ReLU(x) for s > 0: the softmax scale (and FP8's per-query-head scales) fold into the weights.
    weights = weights.float() * softmax_scale
    if fp8:
        q8, q_scale = fp8_e4m3_quantize(q)
        keys8, key_scale = fp8_e4m3_quantize(keys)
        return kernel(q8.reshape(batch, num_queries * heads, dim).contiguous(), keys8.contiguous(),
                      key_scale.contiguous(), (weights * q_scale).contiguous(), ks.contiguous(), ke.contiguous())
    q_rows = q.reshape(batch, num_queries * heads, dim).to(torch.bfloat16)
    if interleaved:
        q_rows = interleave_query_rows(q_rows, heads, options["rows_per_cta"])
    return kernel(q_rows.contiguous(), keys.to(torch.bfloat16).contiguous(), weights.contiguous(), ks.contiguous(),
                  ke.contiguous())


def _candidates(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, ks: torch.Tensor, ke: torch.Tensor,
                theta: torch.Tensor, capacity: int, softmax_scale: float):
    """The candidate variant of the logits program: (values, key indices, count), see `ThresholdOps`."""
    batch, num_queries, heads, dim = q.shape
    kernel = build_weighted_relu_logits(heads, dim, block_n=KEY_TILE, fill_future=False, staged_stores=False,
                                        capacity=capacity)()
    values = torch.full((batch, num_queries, capacity), float("-inf"), device=q.device)
    key_index, per_segment = kernel(
        q.reshape(batch, num_queries * heads, dim).to(torch.bfloat16).contiguous(),
        keys.to(torch.bfloat16).contiguous(), (weights.float() * softmax_scale).contiguous(), ks.contiguous(),
        ke.contiguous(), theta.float().contiguous(), values)
    count = per_segment.sum(-1, dtype=torch.int32)
    overflowed = per_segment.amax(-1) > capacity // per_segment.shape[-1]
    return values, key_index, torch.where(overflowed, capacity + 1, count)


def radix_topk_of_candidates(values: torch.Tensor, key_index: torch.Tensor, k: int) -> torch.Tensor:
    """`ThresholdOps.topk_of_candidates` by the radix program's key-carrying variant (ties to the lowest key)."""
    width = values.shape[-1]
    if width < RADIX_MIN_WIDTH or k > width:
        return reference_topk_of_candidates(values, key_index, k).to(torch.int32)
    rows = values.reshape(-1, width).contiguous()
    ends = torch.full((rows.shape[0],), width, dtype=torch.int32, device=values.device)
    kernel = build_radix_topk(k, with_keys=True)()
    return kernel(rows, key_index.reshape(-1, width).contiguous(), ends).view(*values.shape[:-1], k)


def threshold_ops(softmax_scale: float) -> ThresholdOps:
    """`ThresholdOps` on the TileLang programs."""
    def logits(q, weights, keys, ks, ke):  # the candidate program's head-sum order: the same bits for the same key
        return _logits(q, weights, keys, ks, ke, softmax_scale, fill_future=False, interleaved=False)

    def candidates(q, weights, keys, ks, ke, theta, capacity):
        return _candidates(q, weights, keys, ks, ke, theta, capacity, softmax_scale)

    return ThresholdOps(logits, lambda scores, k, ends: radix_topk(scores, k, ends=ends), candidates,
                        radix_topk_of_candidates)


# The threshold filter pays where rows are much wider than its candidate lists and the query blocks fill the GPU (a
# wave at least) without splitting keys over CTAs (its counters live in one CTA): prefill, not decode.
FILTER_MIN_WIDTH_FACTOR = 3  # rows of at least 3 x capacity keys


def candidate_capacity(k: int) -> int:
    """Slots per query for the candidate lists: CAPACITY_FACTOR · k in whole key tiles (even segments)."""
    return -(-CAPACITY_FACTOR * k // KEY_TILE) * KEY_TILE


def uses_threshold_filter(q: torch.Tensor, keys: torch.Tensor, k: int) -> bool:
    """Whether `tilelang_select_tokens` takes the sampled-threshold path (`ops.threshold`) for this call."""
    batch, num_queries, heads = q.shape[:3]
    ctas = batch * -(-num_queries // queries_per_cta(heads))
    return (keys.shape[1] >= FILTER_MIN_WIDTH_FACTOR * candidate_capacity(k) and k >= KEY_TILE
            and ctas >= _sm_count(q.device))


def tilelang_token_logits(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, chunk: ChunkMask,
                          softmax_scale: float, fp8: bool = False, interleaved: bool = True,
                          overlapped: bool = True, wide_few_heads: bool = WIDE_FEW_HEADS,
                          interleaved_many_heads: bool = INTERLEAVED_MANY_HEADS,
                          longest_first: bool | None = LONGEST_FIRST) -> torch.Tensor:
    """Same contract as `ops.reference.reference_token_logits`, on the tensor cores (bf16 in, fp32 out; fp8: q and
    keys quantized to e4m3 with power-of-two row scales first, exact for inputs already rounded to FP8;
    interleaved: the head sum in registers where it applies, see `scoring.interleaved_query_head`; overlapped: the
    logits program's overlapped driver where it applies, see `overlaps`; wide_few_heads, interleaved_many_heads:
    see `_logits`; longest_first: see `logits_options`)."""
    ks, ke, contiguous = chunk.key_range
    logits = _logits(q, weights, keys, ks, ke, softmax_scale, fill_future=True, fp8=fp8, interleaved=interleaved,
                     overlapped=overlapped, wide_few_heads=wide_few_heads,
                     interleaved_many_heads=interleaved_many_heads, longest_first=longest_first)
    if not contiguous:  # holes inside [ks, ke) (or unknown: sync-free): apply the mask exactly as the reference
        logits = logits + chunk.bias
    return logits


def tilelang_select_tokens(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, chunk: ChunkMask,
                           softmax_scale: float, k: int, fp8: bool = False, threshold: bool = False,
                           interleaved: bool = True, overlapped: bool = True,
                           out: torch.Tensor | None = None, topk_options: dict | None = None,
                           wide_few_heads: bool = WIDE_FEW_HEADS,
                           interleaved_many_heads: bool = INTERLEAVED_MANY_HEADS,
                           longest_first: bool | None = LONGEST_FIRST) -> torch.Tensor:
    """Top-k keys by the weighted-ReLU score: the logits program leaves each query's future unwritten and the
    radix select reads each row only up to that query's last visible key (half the traffic of a causal prefill).

    `threshold=True` (`variants.TILELANG_THRESHOLD_SCORER`) sends wide prefill rows (`uses_threshold_filter`) through
    the sampled threshold instead, which writes only a few thousand candidates per query (`ops.threshold`; the same
    selection). Off by default: on an H100 it measured slower than the dense path for MISA-8 (see the README).
    `out`: where the radix select may write the indices; `topk_options`: its build options beyond the shape
    (see `radix_topk`); `wide_few_heads`, `interleaved_many_heads`: the logits' CTA shape and layout (see
    `_logits`); `longest_first`: the logits' query blocks and the top-k's rows last to first (see `logits_options`).
    """
    ks, ke, contiguous = chunk.key_range
    width = keys.shape[1]
    if not contiguous or width < RADIX_MIN_WIDTH or k > width:
        logits = tilelang_token_logits(q, weights, keys, chunk, softmax_scale, fp8, interleaved, overlapped,
                                       wide_few_heads, interleaved_many_heads, longest_first)
        return radix_topk(logits, k, out=out, options=topk_options)
    if threshold and not fp8 and uses_threshold_filter(q, keys, k):
        return threshold_select(q, weights, keys, ks, ke, k, threshold_ops(softmax_scale), candidate_capacity(k))
    logits = _logits(q, weights, keys, ks, ke, softmax_scale, fill_future=False, fp8=fp8, interleaved=interleaved,
                     overlapped=overlapped, wide_few_heads=wide_few_heads,
                     interleaved_many_heads=interleaved_many_heads, longest_first=longest_first)
    topk_options = dict(topk_options or {})
    if longest_first_for(q.shape[2], q.shape[1], longest_first):  # the rows in the order the logits were written
        topk_options.setdefault("longest_first", True)
    return radix_topk(logits, k, ends=ke, out=out, options=topk_options)


def radix_topk(scores: torch.Tensor, k: int, ends: torch.Tensor | None = None,
               out: torch.Tensor | None = None, options: dict | None = None) -> torch.Tensor:
    """Indices [..., k] of the k largest of each row (unordered), by the radix-select kernel on wide rows.

    ends [...]: each row's columns from `ends` on count as -inf and are never read (None: every column is read).
    out [..., k]: written in place and returned where the kernel runs and `out` is a contiguous int32 tensor (a
    query chunk's slice of the whole output: no copy afterwards); otherwise a new tensor comes back.
    options: build options of the program beyond the shape `radix_shape` picks (e.g. value_filter=False; the
    shape's `sample_every` is left out where the program has no vector loads, no value filter or the phase probe).
    """
    width = scores.shape[-1]
    if width < RADIX_MIN_WIDTH or k > width:
        if ends is not None:
            columns = torch.arange(width, device=scores.device)
            scores = scores.masked_fill(columns >= ends.unsqueeze(-1), float("-inf"))
        return top_indices(scores, k)
    rows = scores.reshape(-1, width).float().contiguous()
    shape = radix_shape(rows.shape[0], _sm_count(rows.device), width % 4 == 0 and rows.data_ptr() % 16 == 0)
    shape.update(options or {})
    if shape.get("vector", 1) == 1 or not shape.get("value_filter", True) or shape.get("phase_clock"):
        shape.pop("sample_every", None)  # a bound from a sample of the row is for the vector programs with the filter
    if shape.get("vector", 1) > 1:
        rows = rows.view(rows.shape[0], -1, shape["vector"])
    if ends is None:
        row_ends = torch.full((rows.shape[0],), width, dtype=torch.int32, device=rows.device)
    else:
        row_ends = ends.to(torch.int32).reshape(-1).contiguous()
    if out is not None and out.dtype == torch.int32 and out.is_contiguous() and out.shape == (*scores.shape[:-1], k):
        build_radix_topk(k, caller_allocates_out=True, **shape)()(rows, row_ends, out.view(-1, k))
        return out
    return build_radix_topk(k, **shape)()(rows, row_ends).view(*scores.shape[:-1], k)


def radix_shape(num_rows: int, sm_count: int, vector_loads_fit: bool) -> dict:
    """The radix program's build options for `num_rows` rows: a decode step's few rows (one wave) take wide CTAs, a
    prefill's many rows four CTAs per SM; each with 16-byte loads where `vector_loads_fit` (rows 16-byte aligned, width
    a multiple of 4) and that shape has a vector variant (`topk.*_VECTOR_SHAPE`)."""
    few = num_rows <= 2 * sm_count
    vector = topk_program.FEW_ROWS_VECTOR_SHAPE if few else topk_program.MANY_ROWS_VECTOR_SHAPE
    if vector_loads_fit and vector is not None:
        return dict(vector)
    return dict(topk_program.FEW_ROWS_SHAPE if few else topk_program.MANY_ROWS_SHAPE)


def tilelang_candidate_logits(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor,
                              softmax_scale: float) -> torch.Tensor:
    """Full-head scores of each query's candidate keys [B, c, C], gathered on chip (see `gathered.py`)."""
    batch, num_queries, heads, dim = q.shape
    rows = torch.arange(batch, device=q.device, dtype=torch.int32).repeat_interleave(num_queries)
    logits = build_gathered_logits(heads, dim)()(
        q.reshape(batch * num_queries, heads, dim).to(torch.bfloat16).contiguous(),
        keys.to(torch.bfloat16).contiguous(),
        (weights.float() * softmax_scale).reshape(batch * num_queries, heads).contiguous(),
        positions.reshape(batch * num_queries, -1).to(torch.int32).contiguous(),
        rows,
    )
    return logits.view(batch, num_queries, -1)


TILELANG_SCORER = Scorer("tilelang", tilelang_token_logits, radix_topk, lambda heads, keys: 3 * keys * 4,
                         chunk_budget=8 * 2**30, head_scores=bf16_head_scores,
                         head_importance=tilelang_head_importance, candidate_logits=tilelang_candidate_logits,
                         route=tilelang_route,
                         # MISA's chunks sized by what the fused routing program writes, not the step-by-step
                         # routing's block scores it keeps on chip: 2 / 5 / 19 chunks instead of 3 / 8 / 24 at 32K /
                         # 64K / 128K on 132 SMs; H200, MISA-8 host hidden 4.22 -> 4.11 / 14.72 -> 14.14 / 54.18 ->
                         # 52.34 ms, peak extra 1.6 -> 2.5 / 2.1 -> 3.1 / 2.9 -> 3.5 GiB
                         # (bench_indexer-20261204-200012.json, medians of 3 rounds; 5 rounds in -201903.json: 4.20
                         # -> 4.09 / 13.95 -> 13.70 / 52.82 -> 50.66 ms)
                         route_scratch_bytes=route_scratch_bytes,
                         narrow_keys=True, fused_select=tilelang_select_tokens,
                         # the re-rank gathers keys on chip: per candidate only its score, bias and position
                         candidate_scratch_bytes=lambda heads, dim, candidates: 4 * candidates * 4,
                         # whole query blocks of every interleaved head count (2 heads: the largest block), so that
                         # `_logits` pads only the last chunk (padding costs each chunk 8 launches before its logits)
                         query_multiple=queries_per_cta(2), wave_queries=logits_wave_queries,
                         # the partly filled wave of a causal prefill's logits CTAs holds its shortest rows: H200,
                         # DSA-64 host hidden 17.94 -> 17.73 / 72.17 -> 70.13 / 282.12 -> 280.09 ms at 32K / 64K / 128K
                         # (bench_indexer-20261204-132142.json, medians of 3 rounds); MISA-8 (longest first) 4.45 ->
                         # 4.27 / 15.06 -> 15.00 / 58.65 -> 58.52 (bench_indexer-20261204-133942.json)
                         remainder_first=True)


def logits_variant(name: str, waves: bool = False, **options) -> Scorer:
    """TILELANG_SCORER with `options` for the token logits and the fused select alike (and, with `waves`, for the waves
    of logits CTAs that size its query chunks), so that the paths of one variant never disagree."""
    wave_queries = {"wave_queries": functools.partial(logits_wave_queries, **options)} if waves else {}
    return dataclasses.replace(TILELANG_SCORER, name=name,
                               token_logits=functools.partial(tilelang_token_logits, **options),
                               fused_select=functools.partial(tilelang_select_tokens, **options), **wave_queries)


# qk_format="fp8_e4m3": the token logits on the FP8 tensor cores. The indexer hands over q and keys already rounded
# to FP8 (the reference's numerics), so quantizing them here is exact; the router and the re-rank keep bf16 inputs.
TILELANG_FP8_SCORER = logits_variant("tilelang-fp8", waves=True, fp8=True)
