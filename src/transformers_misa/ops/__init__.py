"""The math: pure-PyTorch reference indexers and their shared building blocks."""

from .reference import dsa_topk, hisa_topk, misa_hierarchical_topk, misa_topk, pooled_keys, route_heads

__all__ = ["dsa_topk", "misa_topk", "misa_hierarchical_topk", "hisa_topk", "pooled_keys", "route_heads"]
