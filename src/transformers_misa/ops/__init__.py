"""The math: pure-PyTorch reference indexers and their shared building blocks."""

from .reference import (
    REFERENCE,
    Scorer,
    dsa_topk,
    hisa_topk,
    misa_hierarchical_topk,
    misa_topk,
    pooled_keys,
    reference_head_importance,
    route_heads,
)

__all__ = [
    "REFERENCE", "Scorer", "dsa_topk", "misa_topk", "misa_hierarchical_topk", "hisa_topk", "pooled_keys",
    "reference_head_importance", "route_heads",
]
