"""Exact top-k through a sampled threshold: score every key, but keep only the few thousand that can matter.

A causal prefill's top-k reads a [S, T/2] fp32 logits matrix (8 GiB at 64K) that the scoring stage first had to
write; with few heads (MISA) writing and re-reading it costs as much as the scoring. Instead:

1. Threshold: each query scores every `stride`-th key, and the `rank`-th best of those (rank = oversample · k /
   stride) becomes its threshold θ, which about oversample · k of its keys reach.
2. Candidates: the scoring pass keeps only the keys with logit >= θ in the query's list of `capacity` slots (the
   others stay -inf) and counts them (`count`; above `capacity` when they did not all fit).
3. The top-k of each list, ties to the lowest key index, as the full row's top-k breaks them.

Exact wherever k <= count <= capacity: then at least k keys reach θ, so the k-th best logit is >= θ and every
top-k key is in the list. The other rows (θ too high or too low, or fewer than k visible keys) are selected again
by the dense path, so the result never depends on the sample. That check reads the GPU back once per call.

Rows that see at most `capacity` keys keep all of them (θ = -inf) and need no sample.
The stages come in as `ThresholdOps` so that the same algorithm runs on the reference ops below (CPU tests) and on
the TileLang programs (`kernels.scorer`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch

from .blocks import head_scores, weighted_head_sum
from .masks import MASKED

# Defaults: the sample keeps every 16th key; θ is its (1.5·k/16)-th best, so ~1.5·k keys pass (a sample of 192 at
# k = 2048: count is within ~±25% of that at 3 standard deviations); the list holds 3·k (the kernel splits it into
# segments that must not overflow either).
SAMPLE_STRIDE = 16
OVERSAMPLE = 1.5
CAPACITY_FACTOR = 3


@dataclasses.dataclass(frozen=True)
class ThresholdOps:
    """The stages of `threshold_select` (ks / ke [B, c] int32: each query's visible key range [ks, ke)).

    logits(q, weights, keys, ks, ke) -> [B, c, N] fp32: scaled weighted-ReLU logits, -inf before ks; columns from
        ke on may hold anything (the kernels leave them unwritten).
    topk(scores [B, c, N], k, ends [B, c]) -> [B, c, k] column indices of the k largest before `ends`.
    candidates(q, weights, keys, ks, ke, theta [B, c], capacity) -> (values [B, c, capacity] fp32, key indices
        [B, c, capacity] int32, count [B, c] int32): the visible keys with logit >= theta, in any slots, -inf in
        the others (which hold any key); count > capacity when not all of them were kept.
    topk_of_candidates(values, key indices, k) -> [B, c, k] key indices of the k best slots, ties to the lowest
        key index.
    """

    logits: Callable[..., torch.Tensor]
    topk: Callable[[torch.Tensor, int, torch.Tensor], torch.Tensor]
    candidates: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    topk_of_candidates: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


def sampled_thresholds(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, ks: torch.Tensor,
                       ke: torch.Tensor, k: int, ops: ThresholdOps, capacity: int, stride: int = SAMPLE_STRIDE,
                       oversample: float = OVERSAMPLE) -> torch.Tensor:
    """θ [B, c]: the rank-th best logit over every `stride`-th visible key, -inf for rows seeing <= capacity keys."""
    rank = math.ceil(oversample * k / stride)
    if rank * stride > capacity:
        raise ValueError(f"oversample {oversample} x k {k} does not fit a capacity of {capacity}")
    sample = keys[:, ::stride].contiguous()  # key j·stride is visible iff ceil(ks/stride) <= j < ceil(ke/stride)
    sample_ks, sample_ke = (ks + stride - 1) // stride, (ke + stride - 1) // stride
    if sample.shape[1] < rank:  # no row sees more than capacity keys
        return torch.full(ks.shape, MASKED, dtype=torch.float32, device=q.device)
    scores = ops.logits(q, weights, sample, sample_ks, sample_ke)
    theta = scores.gather(-1, ops.topk(scores, rank, sample_ke).long()).amin(-1)
    # A row seeing more than capacity keys has more than capacity / stride >= rank samples.
    return torch.where(ke - ks > capacity, theta, MASKED)


def threshold_select(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, ks: torch.Tensor,
                     ke: torch.Tensor, k: int, ops: ThresholdOps, capacity: int | None = None,
                     stride: int = SAMPLE_STRIDE, oversample: float = OVERSAMPLE) -> torch.Tensor:
    """Indices [B, c, k] of each query's k best keys in [ks, ke), equal to the dense top-k (see the module doc).

    q [B, c, h, D], weights [B, c, h], keys [B, T, D]; rows seeing fewer than k keys come back as the dense path
    returns them.
    """
    capacity = CAPACITY_FACTOR * k if capacity is None else capacity
    if capacity < k:
        raise ValueError(f"capacity {capacity} is below k {k}")
    theta = sampled_thresholds(q, weights, keys, ks, ke, k, ops, capacity, stride, oversample)
    values, key_index, count = ops.candidates(q, weights, keys, ks, ke, theta, capacity)
    picked = ops.topk_of_candidates(values, key_index, k)
    redo = ((count < k) | (count > capacity)).nonzero()  # the one read-back
    if redo.numel():
        redo = redo.tolist()
        for b in sorted({row[0] for row in redo}):
            rows = torch.tensor([t for bb, t in redo if bb == b], device=q.device)
            dense = ops.logits(q[b : b + 1, rows], weights[b : b + 1, rows], keys[b : b + 1], ks[b : b + 1, rows],
                               ke[b : b + 1, rows])
            picked[b, rows] = ops.topk(dense, k, ke[b : b + 1, rows])[0].to(picked.dtype)
    return picked


# --- the reference stages (pure PyTorch), for the CPU tests and as the kernels' contract ---------------------------

def reference_range_logits(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, ks: torch.Tensor,
                           ke: torch.Tensor, softmax_scale: float) -> torch.Tensor:
    """Σ_j w·ReLU(q·k)·scale over every key, -inf outside [ks, ke): [B, c, N] fp32."""
    logits = weighted_head_sum(weights, head_scores(q, keys.unsqueeze(1), softmax_scale))
    columns = torch.arange(keys.shape[1], device=q.device)
    outside = (columns < ks.unsqueeze(-1)) | (columns >= ke.unsqueeze(-1))
    return logits.masked_fill(outside, MASKED)


def reference_range_topk(scores: torch.Tensor, k: int, ends: torch.Tensor) -> torch.Tensor:
    """Top-k columns of each row before `ends`, ties to the lowest column (a stable descending sort)."""
    columns = torch.arange(scores.shape[-1], device=scores.device)
    scores = scores.masked_fill(columns >= ends.unsqueeze(-1), MASKED)
    return scores.sort(dim=-1, descending=True, stable=True).indices[..., :k]


def reference_candidates(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, ks: torch.Tensor,
                         ke: torch.Tensor, theta: torch.Tensor, capacity: int, softmax_scale: float
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The candidate lists of `ThresholdOps.candidates`: the passing keys first, in reversed key order (the kernels'
    order is arbitrary), the first `capacity` of them kept."""
    logits = reference_range_logits(q, weights, keys, ks, ke, softmax_scale)
    passed = (logits >= theta.unsqueeze(-1)) & (logits > MASKED)
    count = passed.sum(-1).to(torch.int32)
    # Passing keys first, the highest key index first: a tie-break that relied on list order would show up.
    order = (passed * keys.shape[1] + torch.arange(keys.shape[1], device=q.device)).argsort(-1, descending=True)
    width = min(capacity, keys.shape[1])
    key_index = torch.zeros(*count.shape, capacity, dtype=torch.int32, device=q.device)
    values = torch.full((*count.shape, capacity), MASKED, device=q.device)
    key_index[..., :width] = order[..., :width].to(torch.int32)
    kept = torch.arange(width, device=q.device) < count.unsqueeze(-1)
    values[..., :width] = logits.gather(-1, order[..., :width]).masked_fill(~kept, MASKED)
    return values, key_index, count


def reference_topk_of_candidates(values: torch.Tensor, key_index: torch.Tensor, k: int) -> torch.Tensor:
    """The k best of each candidate list by (value desc, key index asc)."""
    by_key = key_index.long().argsort(dim=-1, stable=True)  # then a stable sort by value keeps key order in ties
    order = by_key.gather(-1, values.gather(-1, by_key).sort(dim=-1, descending=True, stable=True).indices)
    return key_index.gather(-1, order[..., :k])


def reference_threshold_ops(softmax_scale: float) -> ThresholdOps:
    """`ThresholdOps` from the reference stages above."""
    def logits(q, weights, keys, ks, ke):
        return reference_range_logits(q, weights, keys, ks, ke, softmax_scale)

    def candidates(q, weights, keys, ks, ke, theta, capacity):
        return reference_candidates(q, weights, keys, ks, ke, theta, capacity, softmax_scale)

    return ThresholdOps(logits, reference_range_topk, candidates, reference_topk_of_candidates)
