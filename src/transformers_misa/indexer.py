"""The patched indexer module: the stock indexer's weights and projections, with a selectable top-k method."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .backend import select_scorer
from .config import DEFAULT_ROUTER, MisaConfig
from .ops import reference
from .ops.blocks import fp8_e4m3_roundtrip
from .ops.masks import key_validity
from .ops.pooling import IncrementalBlockPool
from .registry import ModelFamily

# Attribute under which each cache layer carries its pooled keys (dies with the cache, like the keys do).
_POOL_ATTR = "_misa_block_pool"

# Calls of at most this many new tokens (decode, speculative / multi-token steps) never read the GPU back: a static
# cache's step can then be captured in a CUDA graph, and an eager step (a dynamic cache's too) never waits for the
# GPU before launching its next kernels. Longer calls (prefill) may, to narrow the keys they score.
GRAPH_SAFE_MAX_QUERIES = 16


class MisaIndexer(nn.Module):
    """Drop-in replacement for a DSA indexer (`DeepseekV32Indexer`, `GlmMoeDsaIndexer`).

    It holds the very same `wq_b`, `wk`, `k_norm` and `weights_proj` modules as the indexer it replaces
    (shared, not copied: same parameters, device, dtype and state-dict names), computes the indexer queries,
    keys and head weights exactly as the stock forward does, caches keys through
    `past_key_values.update_indexer`, and returns the same int32 [B, S, min(topk, T)] indices, chosen by
    `config.mode`.
    """

    def __init__(self, original: nn.Module, family: ModelFamily, config: MisaConfig) -> None:
        super().__init__()
        self.family = family
        self.misa_config = config
        self.layer_idx: int = original.layer_idx
        self.n_heads: int = original.n_heads
        self.head_dim: int = original.head_dim
        self.qk_rope_head_dim: int = original.qk_rope_head_dim
        self.index_topk: int = original.index_topk
        self.softmax_scale: float = original.softmax_scale
        self.wq_b = original.wq_b
        self.wk = original.wk
        self.k_norm = original.k_norm
        self.weights_proj = original.weights_proj
        # Kept outside the module tree (no duplicate parameters in state_dict) so unpatch can put it back.
        object.__setattr__(self, "original_indexer", original)
        # Set by `measure_recall` while it runs: a list collecting
        # (DSA indices, own indices, mask, number of keys) per call.
        self.recall_probe: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]] | None = None
        # [H] router calibration factors of this layer (misa modes), or None; set by patch_model.
        self.head_scale: torch.Tensor | None = None
        # Set by `calibrate` while it runs: called as observer(self, q, keys, weights, mask, indices) on every
        # forward, with the indices this module returns.
        self.observer: Any = None

    def extra_repr(self) -> str:
        options = ", ".join(f"{k}={v}" for k, v in self.misa_config.to_dict().items() if v is not None)
        return f"layer_idx={self.layer_idx}, n_heads={self.n_heads}, topk={self.index_topk}, {options}"

    def project(self, hidden_states: torch.Tensor, q_resid: torch.Tensor,
                position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Indexer queries [B, S, H, D], new keys [B, S, D] and fp32 head weights [B, S, H], as the stock forward."""
        batch, seq_len, _ = hidden_states.shape
        cos, sin = position_embeddings
        split = [self.qk_rope_head_dim, self.head_dim - self.qk_rope_head_dim]
        q = self.wq_b(q_resid).view(batch, seq_len, self.n_heads, self.head_dim)
        q_rot, q_pass = torch.split(q, split, dim=-1)
        k = self.k_norm(self.wk(hidden_states)).unsqueeze(2)
        k_rot, k_pass = torch.split(k, split, dim=-1)
        q_rot, k_rot = self.family.apply_rope(q_rot, k_rot, cos, sin)
        if q_rot.dtype == q.dtype and k_rot.dtype == k.dtype:
            # The rotated parts back into q and k, which the projections just made: the same values as the stock
            # forward's concatenation without copying the pass-through parts (q at 32K: 512 MiB read and written).
            q[..., : self.qk_rope_head_dim] = q_rot
            k[..., : self.qk_rope_head_dim] = k_rot
            k = k.squeeze(2)
        else:  # a RoPE that promotes (e.g. fp32 cos / sin): concatenated, as the stock forward does
            q = torch.cat([q_rot, q_pass], dim=-1)
            k = torch.cat([k_rot, k_pass], dim=-1).squeeze(2)
        weights = self.weights_proj(hidden_states.to(self.weights_proj.weight.dtype)).float() * (self.n_heads**-0.5)
        return q, k, weights

    def _pooled(self, keys: torch.Tensor, mask: torch.Tensor | None, past_key_values: Any,
                num_new: int, sync_free: bool) -> torch.Tensor | None:
        block_size = self.misa_config.block_size
        if block_size is None:
            return None
        if past_key_values is None:
            return reference.pooled_keys(keys, mask, block_size)
        layer = past_key_values.layers[self.layer_idx]
        pool = getattr(layer, _POOL_ATTR, None)
        if pool is None or pool.block_size != block_size:
            pool = IncrementalBlockPool(block_size)
            pool.attach(layer)
            setattr(layer, _POOL_ATTR, pool)
        valid = key_validity(mask, keys.shape[0], keys.shape[1], keys.device)
        # A static cache's write offset (a GPU tensor); a dynamic cache holds exactly its written keys.
        written = getattr(layer, "indexer_cumulative_length", keys.shape[1])
        if sync_free:
            return pool.update_in_place(keys, valid, written, num_new)
        return pool.update(keys, valid, int(written))

    def select(self, q: torch.Tensor, keys: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor | None,
               pooled: torch.Tensor | None, config: MisaConfig | None = None, sync_free: bool = False) -> torch.Tensor:
        """Top-k indices with the method of `config` (this module's own by default); `sync_free`: never read the GPU
        back (see `ops.reference`)."""
        config = config or self.misa_config
        if config.qk_format == "fp8_e4m3":  # FP8 numerics for the token scores; the router's pooled keys stay as is
            q, keys = fp8_e4m3_roundtrip(q), fp8_e4m3_roundtrip(keys)
        common = dict(softmax_scale=self.softmax_scale, mask=mask, chunk_size=config.query_chunk_size,
                      scorer=select_scorer(q.device, config.backend, config.qk_format), sync_free=sync_free)
        if config.mode == "dsa":
            return reference.dsa_topk(q, keys, weights, self.index_topk, **common)
        if config.mode == "misa":
            return reference.misa_topk(q, keys, weights, self.index_topk, active_heads=config.active_heads,
                                       block_size=config.block_size, pooled=pooled, head_scale=self.head_scale,
                                       router=config.router or DEFAULT_ROUTER, **common)
        if config.mode == "misa_hierarchical":
            return reference.misa_hierarchical_topk(
                q, keys, weights, self.index_topk, active_heads=config.active_heads, block_size=config.block_size,
                candidate_factor=config.candidate_factor, pooled=pooled, head_scale=self.head_scale,
                router=config.router or DEFAULT_ROUTER, **common)
        return reference.hisa_topk(q, keys, weights, self.index_topk, block_size=config.block_size,
                                   keep_blocks=config.keep_blocks, pooled=pooled, **common)

    @torch.no_grad()
    def forward(self, hidden_states: torch.Tensor, q_resid: torch.Tensor,
                position_embeddings: tuple[torch.Tensor, torch.Tensor], attention_mask: torch.Tensor | None,
                position_ids: torch.Tensor | None = None, past_key_values: Any = None,
                cache: Any = None) -> torch.Tensor:
        """Same signature and contract as the stock indexer's forward: int32 top-k indices [B, S, k].

        The cache comes as `past_key_values` (transformers 5.23) or `cache` (its name from 5.24 on)."""
        past_key_values = cache if cache is not None else past_key_values
        q, keys, weights = self.project(hidden_states, q_resid, position_embeddings)
        num_new = keys.shape[1]
        if past_key_values is not None:
            keys = past_key_values.update_indexer(keys, self.layer_idx)
        # Decode steps of any cache read nothing back: eager MISA-8 decode at 32K (H200, bench_e2e at 2bb1dfa) ran
        # 37.2 tok/s with a dynamic cache, which read back then, and 44.2 with a static one, which did not.
        sync_free = past_key_values is not None and num_new <= GRAPH_SAFE_MAX_QUERIES
        pooled = self._pooled(keys, attention_mask, past_key_values, num_new, sync_free)
        indices = self.select(q, keys, weights, attention_mask, pooled, sync_free=sync_free)
        if self.observer is not None:
            self.observer(self, q, keys, weights, attention_mask, indices)
        if self.recall_probe is None:
            return indices
        # Recall measurement: DSA's selection drives the model, ours is recorded beside it.
        dsa = self.select(q, keys, weights, attention_mask, None,
                          MisaConfig(mode="dsa", backend=self.misa_config.backend), sync_free)
        self.recall_probe.append((dsa, indices, attention_mask, keys.shape[1]))
        return dsa
