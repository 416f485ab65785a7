"""The math: pure-PyTorch reference indexers, one function per mode.

Each takes the indexer's projected tensors (see `blocks` for the layout) and returns the int32 top-k key
indices [B, S, min(topk, T)], the contract of transformers' `DeepseekV32Indexer` / `GlmMoeDsaIndexer`.
All of them walk the queries in chunks, so the extra memory is O(chunk·H·T + S·topk): never [B, S, H, T].

Scores of keys a query may not see are -inf; where a query sees fewer than `topk` keys, the indices past
its visible ones point at masked keys (as transformers' own `topk` over -inf does) and carry no meaning.
`sync_free=True` (decode steps) never reads the GPU back, so a static cache's call can be captured in a CUDA graph:
the mask is then applied without checking its shape first, and no keys are cut off.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import torch

from .blocks import TailBlock, gather_keys, head_scores, mean_pool, pool_blocks, top_indices, weighted_head_sum
from .masks import (
    DEFAULT_CHUNK_BYTES,
    MASKED,
    ChunkMask,
    causal_prefix,
    causal_query_chunks,
    key_validity,
    query_chunks,
)
from .chunk_streams import ChunkStreams

_FP32 = 4


def reference_token_logits(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, chunk: ChunkMask,
                           softmax_scale: float) -> torch.Tensor:
    """Σ_j w[t, j]·ReLU(q[t, j]·k[s])·scale over every key, plus the mask bias: [B, c, T] fp32.

    q [B, c, h, D] holds any h heads per query (all of them for DSA, the routed ones for MISA).
    """
    return weighted_head_sum(weights, head_scores(q, keys.unsqueeze(1), softmax_scale)) + chunk.bias


def reference_head_importance(q: torch.Tensor, weights: torch.Tensor, pooled: torch.Tensor, chunk: ChunkMask,
                              block_size: int, softmax_scale: float, router: str = "sum",
                              scores_fn=head_scores, tail: TailBlock | None = None) -> torch.Tensor:
    """MISA's router score of every head: [B, c, H] fp32.

    importance[t, j] = |w[t, j]| · Σ_{visible blocks m} ReLU(q[t, j]·k̄_m)·scale, k̄_m the mean key of block m
    (router="sum"), or the largest of those block scores instead of their sum (router="max").
    `tail` (see `TailBlock`): each query's partly visible last block is pooled over its visible keys only, so the
    router never sees a key after the query; None takes `pooled` as it is for every visible block.
    """
    visible = chunk.block_visible(block_size)
    if tail is not None:  # the tail block's own score replaces its full-block one
        tail_block = torch.nn.functional.one_hot((tail.start.long() // block_size).clamp_max(visible.shape[-1] - 1),
                                                 visible.shape[-1]).bool()
        visible = visible & ~(tail_block & tail.present.unsqueeze(-1))
    per_block = scores_fn(q, pooled.unsqueeze(1), softmax_scale)  # [B, c, H, M]
    per_block.masked_fill_(~visible.unsqueeze(2), 0.0)  # ReLU >= 0: 0 is neutral for max
    pooled_score = per_block.amax(-1) if router == "max" else per_block.sum(-1)
    if tail is not None:
        tail_score = tail.scores(q, scores_fn, softmax_scale)
        pooled_score = torch.maximum(pooled_score, tail_score) if router == "max" else pooled_score + tail_score
    return pooled_score * weights.abs()


def route_heads(importance: torch.Tensor, active_heads: int) -> torch.Tensor:
    """The `active_heads` most important heads of each query, ascending (so that routing to all heads reproduces
    DSA's summation order exactly): [B, c, active_heads]."""
    return importance.topk(active_heads, dim=-1).indices.sort(dim=-1).values


def reference_candidate_scratch_bytes(heads: int, dim: int, candidates: int) -> int:
    """Scratch memory per query of `reference_candidate_logits`: the gathered keys and their head scores, fp32."""
    return 2 * candidates * (dim + heads) * _FP32


def reference_candidate_logits(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor,
                               softmax_scale: float, scores_fn=head_scores) -> torch.Tensor:
    """Full-head DSA scores of per-query candidate keys: positions [B, c, C] -> [B, c, C] fp32 (no mask).

    Runs over slices of the queries within the default chunk budget, so that it also fits as the fallback of a
    kernel scorer whose query chunks were sized for on-chip gathering."""
    batch, num_queries, num_candidates = positions.shape
    per_query = batch * reference_candidate_scratch_bytes(q.shape[2], keys.shape[-1], num_candidates)
    step = max(1, DEFAULT_CHUNK_BYTES // per_query)
    slices = [weighted_head_sum(weights[:, i : i + step], scores_fn(
        q[:, i : i + step], gather_keys(keys, positions[:, i : i + step]), softmax_scale))
        for i in range(0, max(num_queries, 1), step)]  # one (empty) slice for no queries
    return slices[0] if len(slices) == 1 else torch.cat(slices, dim=1)


@dataclasses.dataclass(frozen=True)
class Scorer:
    """The heavy stages of every mode, swappable so that GPU kernels plug into the same algorithms.

    token_logits(q [B, c, h, D], weights [B, c, h], keys [B, T, D], chunk mask, softmax_scale) -> [B, c, T] fp32,
        -inf (or the additive mask) where a query may not see a key.
    topk(scores [B, c, N], k) -> indices [B, c, k] of the k largest.
    head_scores(q [B, c, h, D], keys [B, 1 or c, N, D], scale) -> ReLU(q·k)·scale [B, c, h, N] fp32, for the small
        scoring steps (router over pooled keys, candidate re-rank, HISA's block filter).
    head_importance(q, weights, pooled, chunk mask, block_size, scale, router) -> [B, c, H]: MISA's router score.
    candidate_logits(q, weights, keys, positions [B, c, C], scale) -> [B, c, C]: full-head scores of candidates.
    scratch_bytes(heads, num_keys) -> the token stage's scratch memory per query, to size the query chunks.
    candidate_scratch_bytes(heads, dim, candidates) -> the same for scoring `candidates` gathered keys per query.
    route: optional MISA routing in one step, (q, weights, keys, pooled, chunk mask, block_size, active_heads, scale,
        head_scale, router) -> (q_routed, w_routed) as `route_queries`, or None where it does not apply.
    chunk_budget: scratch memory one query chunk may use.
    query_multiple: query chunks (all but the last) hold a multiple of this many queries where the budget allows, so
        that a kernel working in blocks of queries pads no chunk but the last.
    wave_queries: optional (heads, batch, device) -> how many queries' token logits, at `heads` heads per query,
        occupy every SM of `device` once; chunks then hold whole such waves where the budget allows (with
        `query_multiple`), so that no chunk's launch ends in a partly filled wave (a 128K prefill's late chunks are a
        few waves each).
    remainder_first: a causal prefill's queries past whole waves (or multiples) go to its first chunk instead of its
        last (`causal_query_chunks`), so that the partly filled wave holds the shortest rows.
    narrow_keys: skip the keys past a chunk's last visible key (causal future, static-cache slack). The reference
        keeps every key, so that its matmuls have transformers' exact shapes and DSA stays bit-identical.
    fused_select: optional token_logits + topk in one step (same arguments plus k, and `out`, a [B, c, k] int32
        tensor it may write the indices into and return), free to skip what a top-k never needs (the kernels leave
        each causal query's future unwritten); None: the two steps in turn.
    route_scratch_bytes: optional (heads, active_heads, dim) -> per-query scratch of `route` where it runs for every
        chunk (no mask, router "sum"), to size MISA's chunks; None: that of the step-by-step routing (every head's
        block scores and the tail block), always.
    chunk_streams: CUDA streams the query chunks take in turn (`ChunkStreams`: one chunk's top-k beside the next
        one's routing and logits; up to this many chunks' scratch alive at once); 1: every chunk on the caller's.
    """

    name: str
    token_logits: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, ChunkMask, float], torch.Tensor]
    topk: Callable[[torch.Tensor, int], torch.Tensor]
    scratch_bytes: Callable[[int, int], int]
    chunk_budget: int = DEFAULT_CHUNK_BYTES
    head_scores: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor] = head_scores
    head_importance: Callable[..., torch.Tensor] = None  # the router; None: `reference_head_importance`
    candidate_logits: Callable[..., torch.Tensor] = None  # None: `reference_candidate_logits`
    narrow_keys: bool = False
    fused_select: Callable[..., torch.Tensor] | None = None
    candidate_scratch_bytes: Callable[[int, int, int], int] = reference_candidate_scratch_bytes
    route: Callable[..., tuple[torch.Tensor, torch.Tensor] | None] | None = None
    query_multiple: int = 1
    wave_queries: Callable[[int, int, torch.device], int] | None = None
    remainder_first: bool = False
    chunk_streams: int = 1
    route_scratch_bytes: Callable[[int, int, int], int] | None = None

    def __post_init__(self) -> None:
        for name, default in (("head_importance", reference_head_importance),
                              ("candidate_logits", reference_candidate_logits)):
            if getattr(self, name) is None:
                object.__setattr__(self, name, functools.partial(default, scores_fn=self.head_scores))

    def select_tokens(self, q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, chunk: ChunkMask,
                      softmax_scale: float, k: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Indices [B, c, k] of the k best keys by Σ_j w[t, j]·ReLU(q[t, j]·k[s])·scale (h heads per query).

        out: a [B, c, k] int32 tensor the fused select may write the indices into (then it is what comes back)."""
        if self.fused_select is not None:
            return self.fused_select(q, weights, keys, chunk, softmax_scale, k, out=out)
        return self.topk(self.token_logits(q, weights, keys, chunk, softmax_scale), k)


# The reference holds fp32 [c, h, T] head scores (plus their product) per chunk.
REFERENCE = Scorer("reference", reference_token_logits, top_indices, lambda heads, keys: 2 * heads * keys * _FP32)

# (query chunk, its weights, the live keys, their pooled blocks or None, chunk mask, k, the chunk's slice of the
# output, which it may fill and return) -> indices [B, c, k]
ChunkSelector = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None", ChunkMask, int,
                          torch.Tensor], torch.Tensor]


def _select_in_chunks(q: torch.Tensor, keys: torch.Tensor, weights: torch.Tensor, topk: int,
                      mask: torch.Tensor | None, chunk_size: int | None,
                      bytes_per_query: Callable[[int, bool], int],
                      select: ChunkSelector, scorer: Scorer, pooled: torch.Tensor | None = None,
                      block_size: int = 1, min_width: int = 0, sync_free: bool = False,
                      scored_heads: int | None = None) -> torch.Tensor:
    """Runs `select` over query chunks. With `scorer.narrow_keys`, keys past a chunk's last visible key (the causal
    future) are cut off before scoring, keeping at least `min_width` (and k) so every top-k has enough entries.
    scored_heads: heads per query of the chunk's token logits, for `scorer.wave_queries` (None: not used).

    bytes_per_query(width, maskless): one query's scratch when its chunk scores `width` keys (`maskless`: the chunks
    have no mask, so every chunk's visible keys are one range and the fused routing program runs). Chunks hold at most
    `scorer.chunk_budget` of it: sized at the full width, or, for a causal prefill without a mask whose keys are cut
    off, at each chunk's own width (`causal_query_chunks`)."""
    batch, num_queries = q.shape[:2]
    num_keys = keys.shape[1]
    k = min(topk, num_keys)
    out = torch.empty(batch, num_queries, k, dtype=torch.int32, device=q.device)
    causal_chunks = scorer.narrow_keys and chunk_size is None  # where a maskless prefill sizes chunks by width
    if causal_chunks and mask is not None and not sync_free:
        written = causal_prefix(mask, batch, num_queries, num_keys, scorer.chunk_budget)
        if written is not None and written >= k:
            # The model's causal mask over the keys written so far is what no mask means over those keys: take the
            # maskless path (chunks sized by their own width, key ranges known on the host) instead of reading every
            # chunk's mask for its key ranges, with read-backs. A static cache's unwritten slots past them (hidden by
            # the mask) are cut off, so that its prompt is scored and routed as a dynamic cache's is. (Fewer written
            # keys than k keep the mask: the output keeps k columns, the unwritten slots filling up.)
            mask = None
            keys, num_keys = keys[:, :written], written
            pooled = None if pooled is None else pooled[:, : math.ceil(written / block_size)]
    multiple = scorer.query_multiple
    # Waves matter only where a chunk could hold more than `query_multiple` queries: not asked for in decode steps.
    if scorer.wave_queries is not None and scored_heads is not None and num_queries > multiple:
        multiple = math.lcm(multiple, scorer.wave_queries(scored_heads, batch, q.device))
    if causal_chunks and mask is None:
        chunks = causal_query_chunks(num_queries, num_keys, lambda width: batch * bytes_per_query(width, True),
                                     scorer.chunk_budget, max(k, min_width), block_size, multiple,
                                     scorer.remainder_first)
    else:
        chunks = query_chunks(num_queries, batch * bytes_per_query(num_keys, mask is None), chunk_size,
                              scorer.chunk_budget, multiple)
    with ChunkStreams(scorer.chunk_streams, q.device) as streams:
        for index, rows in enumerate(chunks):
            with streams.turn(index):
                chunk = ChunkMask(mask, rows, batch, num_queries, num_keys, q.device, sync_free=sync_free)
                width = num_keys if not scorer.narrow_keys else max(chunk.visible_end(), k, min_width)
                width = min(num_keys, math.ceil(width / block_size) * block_size)  # whole pooled blocks
                live_keys, live_pooled = keys, pooled
                if width < num_keys:
                    chunk = chunk.narrowed(width)
                    live_keys = keys[:, :width]
                    live_pooled = None if pooled is None else pooled[:, : math.ceil(width / block_size)]
                target = out[:, rows]
                picked = select(q[:, rows], weights[:, rows], live_keys, live_pooled, chunk, k, target)
                if picked is not target:  # not written in place (a kernel that can writes its slice, returns it)
                    target.copy_(picked)
    return out


def pooled_keys(keys: torch.Tensor, mask: torch.Tensor | None, block_size: int) -> torch.Tensor:
    """Mean of the real keys of each block of `block_size` positions: [B, ceil(T / block_size), D] fp32."""
    valid = key_validity(mask, keys.shape[0], keys.shape[1], keys.device)
    return mean_pool(*pool_blocks(keys, valid, block_size))


def route_queries(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, chunk: ChunkMask,
                  pooled: torch.Tensor, block_size: int, active_heads: int, softmax_scale: float,
                  scorer: Scorer = REFERENCE, head_scale: torch.Tensor | None = None,
                  router: str = "sum") -> tuple[torch.Tensor, torch.Tensor]:
    """Each query's routed heads: (q [B, c, active_heads, D], w [B, c, active_heads]) for token scoring.

    `keys` (the chunk's live keys) pool each query's partly visible last block over its visible keys (`TailBlock`):
    the router of a prefill query sees exactly what a decode step at its position sees.

    The selected heads keep their DSA weights w[t, j] unchanged and the others contribute nothing; no
    renormalisation, since a positive per-query factor would not change any top-k. `head_scale` [H] (a router
    calibration) multiplies each head's router score before the heads are picked; `router` pools the block scores
    ("sum" or "max").
    """
    if scorer.route is not None:
        routed = scorer.route(q, weights, keys, pooled, chunk, block_size, active_heads, softmax_scale, head_scale,
                              router)
        if routed is not None:
            return routed
    importance = scorer.head_importance(q, weights, pooled, chunk, block_size, softmax_scale, router,
                                        tail=TailBlock(keys, chunk, block_size))
    if head_scale is not None:
        importance = importance * head_scale.to(importance.device, importance.dtype)
    heads = route_heads(importance, active_heads)
    q_routed = q.gather(2, heads.unsqueeze(-1).expand(-1, -1, -1, q.shape[-1]))
    return q_routed, weights.gather(2, heads)


def rerank(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, chunk: ChunkMask,
           positions: torch.Tensor, k: int, softmax_scale: float, in_range: torch.Tensor | None = None,
           scorer: Scorer = REFERENCE) -> torch.Tensor:
    """Full-head DSA scores over per-query candidate key positions [B, c, C]; returns the top-k positions."""
    scores = scorer.candidate_logits(q, weights, keys, positions, softmax_scale) + chunk.bias_at(positions)
    if in_range is not None:
        # Slots past the cache end rank below every real position, masked ones included (finite minimum vs
        # -inf), so they are never picked while enough real positions exist: no repeated indices.
        lowest = torch.finfo(scores.dtype).min
        scores = torch.where(in_range, scores.clamp_min(lowest), MASKED)
    return positions.gather(-1, scorer.topk(scores, k))


def _router_scratch_bytes(heads: int, width: int, block_size: int) -> int:
    """Per query: the fp32 scores of every head against every pooled block of `width` keys (and one temporary)."""
    return 2 * heads * math.ceil(width / block_size) * _FP32


def _routed_scratch_bytes(scorer: Scorer, active_heads: int, heads: int, dim: int, width: int,
                          block_size: int, maskless: bool, router: str) -> int:
    """Per query, MISA's routed pass over `width` keys: the routing (the router's block scores and its tail block, or
    the scorer's `route_scratch_bytes` where it has one and its routing program runs: maskless chunks, router
    "sum"), then the routed logits."""
    if maskless and router == "sum" and scorer.route_scratch_bytes is not None:
        routing = scorer.route_scratch_bytes(heads, active_heads, dim)
    else:
        routing = _router_scratch_bytes(heads, width, block_size) + TailBlock.scratch_bytes(block_size, dim)
    return scorer.scratch_bytes(active_heads, width) + routing


def _pooled_or_compute(pooled: torch.Tensor | None, keys: torch.Tensor, mask: torch.Tensor | None,
                       block_size: int) -> torch.Tensor:
    expected_blocks = math.ceil(keys.shape[1] / block_size)
    if pooled is None:
        return pooled_keys(keys, mask, block_size)
    if pooled.shape[1] != expected_blocks:
        raise ValueError(f"pooled keys have {pooled.shape[1]} blocks, the key cache needs {expected_blocks}")
    return pooled


def dsa_topk(q: torch.Tensor, keys: torch.Tensor, weights: torch.Tensor, topk: int, *, softmax_scale: float,
             mask: torch.Tensor | None = None, chunk_size: int | None = None,
             scorer: Scorer = REFERENCE, sync_free: bool = False) -> torch.Tensor:
    """The original lightning indexer: top-k of Σ_j w[t, j]·ReLU(q[t, j]·k[s])·scale over every key."""
    num_heads = q.shape[2]

    def select(q_c, w_c, keys_c, _, chunk, k, out):
        return scorer.select_tokens(q_c, w_c, keys_c, chunk, softmax_scale, k, out)

    return _select_in_chunks(q, keys, weights, topk, mask, chunk_size,
                             lambda width, _maskless: scorer.scratch_bytes(num_heads, width), select, scorer,
                             sync_free=sync_free, scored_heads=num_heads)


def misa_topk(q: torch.Tensor, keys: torch.Tensor, weights: torch.Tensor, topk: int, *, softmax_scale: float,
              active_heads: int, block_size: int, mask: torch.Tensor | None = None,
              pooled: torch.Tensor | None = None, chunk_size: int | None = None,
              scorer: Scorer = REFERENCE, head_scale: torch.Tensor | None = None,
              router: str = "sum", sync_free: bool = False) -> torch.Tensor:
    """MISA: route each query to its `active_heads` heads over block-pooled keys, score tokens with those only.

    head_scale: optional [H] router calibration (see `transformers_misa.calibration`); router: "sum" or "max"
    pooling of each head's block scores."""
    pooled = _pooled_or_compute(pooled, keys, mask, block_size)

    def per_query(width: int, maskless: bool) -> int:
        return _routed_scratch_bytes(scorer, active_heads, q.shape[2], q.shape[3], width, block_size, maskless,
                                     router)

    def select(q_c, w_c, keys_c, pooled_c, chunk, k, out):
        q_routed, w_routed = route_queries(q_c, w_c, keys_c, chunk, pooled_c, block_size, active_heads, softmax_scale,
                                           scorer, head_scale, router)
        return scorer.select_tokens(q_routed, w_routed, keys_c, chunk, softmax_scale, k, out)

    return _select_in_chunks(q, keys, weights, topk, mask, chunk_size, per_query, select, scorer,
                             pooled, block_size, sync_free=sync_free, scored_heads=active_heads)


def misa_hierarchical_topk(q: torch.Tensor, keys: torch.Tensor, weights: torch.Tensor, topk: int, *,
                           softmax_scale: float, active_heads: int, block_size: int, candidate_factor: int,
                           mask: torch.Tensor | None = None, pooled: torch.Tensor | None = None,
                           chunk_size: int | None = None, scorer: Scorer = REFERENCE,
                           head_scale: torch.Tensor | None = None, router: str = "sum",
                           sync_free: bool = False) -> torch.Tensor:
    """MISA†: the routed pass keeps `candidate_factor`·topk candidates, re-ranked by the full DSA score."""
    pooled = _pooled_or_compute(pooled, keys, mask, block_size)
    num_candidates = min(candidate_factor * topk, keys.shape[1])
    num_heads, dim = q.shape[2], q.shape[3]

    def per_query(width: int, maskless: bool) -> int:  # the routed pass, then the re-rank of its candidates
        return (_routed_scratch_bytes(scorer, active_heads, num_heads, dim, width, block_size, maskless, router)
                + scorer.candidate_scratch_bytes(num_heads, dim, num_candidates))

    def select(q_c, w_c, keys_c, pooled_c, chunk, k, _out):
        q_routed, w_routed = route_queries(q_c, w_c, keys_c, chunk, pooled_c, block_size, active_heads, softmax_scale,
                                           scorer, head_scale, router)
        candidates = scorer.select_tokens(q_routed, w_routed, keys_c, chunk, softmax_scale, num_candidates)
        return rerank(q_c, w_c, keys_c, chunk, candidates, k, softmax_scale, scorer=scorer)

    return _select_in_chunks(q, keys, weights, topk, mask, chunk_size, per_query, select, scorer,
                             pooled, block_size, min_width=num_candidates, sync_free=sync_free,
                             scored_heads=active_heads)


def hisa_topk(q: torch.Tensor, keys: torch.Tensor, weights: torch.Tensor, topk: int, *, softmax_scale: float,
              block_size: int, keep_blocks: int, mask: torch.Tensor | None = None,
              pooled: torch.Tensor | None = None, chunk_size: int | None = None,
              scorer: Scorer = REFERENCE, sync_free: bool = False) -> torch.Tensor:
    """HISA: keep the `keep_blocks` best blocks by the DSA score of their pooled key, then DSA on their tokens.

    The first and the last visible block of each query (attention sink and local window) are always kept, the local
    one (often partial) on top of the `keep_blocks`: keep_blocks + 1 blocks hold at least keep_blocks·block_size >=
    topk real positions even when the cache ends in a partial block, so the k indices returned are distinct, and
    the count does not depend on the cache's layout (a static cache's slack, a dynamic cache's length).
    """
    pooled = _pooled_or_compute(pooled, keys, mask, block_size)
    num_heads, dim = q.shape[2], q.shape[3]

    def per_query(width: int, _maskless: bool) -> int:  # block scores, then the kept blocks' tokens
        return (_router_scratch_bytes(num_heads, width, block_size)
                + scorer.candidate_scratch_bytes(num_heads, dim, (keep_blocks + 1) * block_size))
    offsets = torch.arange(block_size, device=q.device)

    def select(q_c, w_c, keys_c, pooled_c, chunk, k, _out):
        num_keys, num_blocks = keys_c.shape[1], pooled_c.shape[1]
        kept = min(keep_blocks + 1, num_blocks)
        block_visible = chunk.block_visible(block_size)
        block_scores = weighted_head_sum(w_c, scorer.head_scores(q_c, pooled_c.unsqueeze(1), softmax_scale))
        block_scores.masked_fill_(~block_visible, MASKED)
        # Force the sink (first visible) and local (last visible) blocks in; rows with none stay -inf.
        force = torch.where(block_visible.any(-1, keepdim=True), float("inf"), MASKED)
        first = block_visible.int().argmax(-1, keepdim=True)
        last = num_blocks - 1 - block_visible.flip(-1).int().argmax(-1, keepdim=True)
        block_scores.scatter_(-1, first, force).scatter_(-1, last, force)
        blocks = scorer.topk(block_scores, kept)  # [B, c, kept]
        positions = (blocks.unsqueeze(-1) * block_size + offsets).flatten(-2)
        in_range = positions < num_keys  # the partial last block's slots past the cache end
        return rerank(q_c, w_c, keys_c, chunk, positions.clamp_max(num_keys - 1), k, softmax_scale, in_range, scorer)

    return _select_in_chunks(q, keys, weights, topk, mask, chunk_size, per_query, select, scorer,
                             pooled, block_size, sync_free=sync_free)
