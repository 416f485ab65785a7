"""Block-pooled keys kept incrementally beside the indexer key cache, so decode never re-pools the whole cache."""

from __future__ import annotations

import torch

from .blocks import mean_pool, pool_blocks


class IncrementalBlockPool:
    """Running per-block key sums of one layer's indexer key cache.

    Blocks that were complete before the previous call are final and reused; each call re-pools only the
    blocks its new keys touch, O((new tokens + block_size)·D). The last key of every final block is kept as a
    fingerprint: if the cache was cropped, reordered (beam search) or reset, a fingerprint no longer matches
    and everything is re-pooled from scratch, so the pool can never silently go stale.
    """

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.sums: torch.Tensor | None = None  # [B, M, D] fp32
        self.counts: torch.Tensor | None = None  # [B, M] fp32
        self.final_blocks = 0  # blocks complete as of the previous call
        self.fingerprints: torch.Tensor | None = None  # [B, final_blocks, D]

    def _still_valid(self, keys: torch.Tensor, filled: int) -> bool:
        if self.sums is None or self.sums.shape[0] != keys.shape[0] or self.sums.shape[-1] != keys.shape[-1]:
            return False
        if filled < self.final_blocks * self.block_size:
            return False
        block_ends = keys[:, self.block_size - 1 : self.final_blocks * self.block_size : self.block_size]
        return torch.equal(block_ends, self.fingerprints)

    def update(self, keys: torch.Tensor, valid: torch.Tensor, filled: int) -> torch.Tensor:
        """Mean-pooled keys [B, ceil(T / block_size), D] for the cache `keys` [B, T, D].

        `valid` [B, T] marks real keys (padding and unfilled static slots excluded); `filled` is how many
        cache positions hold written keys (T for a dynamic cache, the write offset for a static one).
        """
        first_dirty = self.final_blocks if self._still_valid(keys, filled) else 0
        # Only written positions are pooled; blocks past them (static-cache slack) stay empty.
        sums, counts = pool_blocks(keys[:, :filled], valid[:, :filled], self.block_size, first_block=first_dirty)
        sums = torch.cat([self.sums[:, :first_dirty], sums], dim=1) if first_dirty else sums
        counts = torch.cat([self.counts[:, :first_dirty], counts], dim=1) if first_dirty else counts
        num_blocks = -(-keys.shape[1] // self.block_size)
        sums = torch.nn.functional.pad(sums, (0, 0, 0, num_blocks - sums.shape[1]))
        counts = torch.nn.functional.pad(counts, (0, num_blocks - counts.shape[1]))
        self.sums, self.counts = sums, counts
        self.final_blocks = filled // self.block_size
        self.fingerprints = keys[:, self.block_size - 1 : self.final_blocks * self.block_size : self.block_size].clone()
        return mean_pool(sums, counts)
