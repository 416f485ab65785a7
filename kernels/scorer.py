"""The TileLang `Scorer`: plugs the GPU programs into the reference algorithms of `transformers_misa.ops`.

Every mode keeps its algorithm from `ops.reference` (routing, candidate re-rank, block filter); the heavy
token-level stage runs in `scoring.build_weighted_relu_logits`. Imported only when tensors sit on a CUDA
device of compute capability >= 9.0, so a CPU-only machine never touches TileLang.
"""

from __future__ import annotations

import torch

from transformers_misa.ops.blocks import ChunkMask, top_indices
from transformers_misa.ops.reference import Scorer, reference_head_importance

from .gathered import build_gathered_logits
from .router import build_head_importance
from .scoring import build_weighted_relu_logits
from .topk import build_radix_topk

# Below this row width torch.topk is as fast and the radix program is not worth a compile.
RADIX_MIN_WIDTH = 4096


def tilelang_token_logits(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, chunk: ChunkMask,
                          softmax_scale: float) -> torch.Tensor:
    """Same contract as `ops.reference.reference_token_logits`, on the tensor cores (bf16 in, fp32 out)."""
    batch, num_queries, heads, dim = q.shape
    kernel = build_weighted_relu_logits(heads, dim)()
    ks, ke, contiguous = chunk.key_range
    # ReLU(s·x) = s·ReLU(x) for s > 0: the softmax scale folds into the head weights.
    logits = kernel(
        q.reshape(batch, num_queries * heads, dim).to(torch.bfloat16).contiguous(),
        keys.to(torch.bfloat16).contiguous(),
        (weights.float() * softmax_scale).contiguous(),
        ks.contiguous(),
        ke.contiguous(),
    )
    if not contiguous:  # a mask with holes inside [ks, ke): apply it exactly as the reference does
        logits = logits + chunk.bias
    return logits


# The kernel writes one fp32 logit per (query, key) whatever the head count; top-k then needs about as much.
# Large chunks keep every SM busy (a CTA takes 128 / heads queries).
def radix_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [..., k] of the k largest of each row (unordered), by the radix-select kernel on wide rows."""
    width = scores.shape[-1]
    if width < RADIX_MIN_WIDTH or k > width:
        return top_indices(scores, k)
    rows = scores.reshape(-1, width).float().contiguous()
    return build_radix_topk(k)()(rows).view(*scores.shape[:-1], k)


def tilelang_head_importance(q: torch.Tensor, weights: torch.Tensor, pooled: torch.Tensor, chunk: ChunkMask,
                             block_size: int, softmax_scale: float) -> torch.Tensor:
    """MISA's router score [B, c, H], fused in one kernel (see `router.py`); masks with holes use the reference."""
    ks, ke, contiguous = chunk.key_range
    if not contiguous:
        return reference_head_importance(q, weights, pooled, chunk, block_size, softmax_scale, bf16_head_scores)
    batch, num_queries, heads, dim = q.shape
    kernel = build_head_importance(heads, dim, block_size)()
    importance = kernel(
        q.reshape(batch, num_queries * heads, dim).to(torch.bfloat16).contiguous(),
        pooled.to(torch.bfloat16).contiguous(),
        weights.float().contiguous(),
        ks.contiguous(),
        ke.contiguous(),
    )
    return importance * softmax_scale  # ReLU(s·x) = s·ReLU(x): the scale is applied once at the end


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


def bf16_head_scores(q: torch.Tensor, keys: torch.Tensor, softmax_scale: float) -> torch.Tensor:
    """Per-head ReLU scores for the small steps (router, re-rank, block filter) on the tensor cores in bf16."""
    scores = torch.matmul(q.to(torch.bfloat16), keys.to(torch.bfloat16).transpose(-1, -2))
    return scores.float().mul_(softmax_scale).relu_()


TILELANG_SCORER = Scorer("tilelang", tilelang_token_logits, radix_topk, lambda heads, keys: 3 * keys * 4,
                         chunk_budget=8 * 2**30, head_scores=bf16_head_scores,
                         head_importance=tilelang_head_importance, candidate_logits=tilelang_candidate_logits,
                         narrow_keys=True)
