"""Block-pooled keys kept incrementally beside the indexer key cache, so decode never re-pools the whole cache."""

from __future__ import annotations

import torch

from .blocks import mean_pool, pool_blocks


class IncrementalBlockPool:
    """Running per-block key sums of one layer's indexer key cache.

    Blocks that were complete before the previous call are final and reused; each call re-pools only the
    blocks its new keys touch, O((new tokens + block_size)·D). Cache edits reach the pool through `attach`:
    a beam reorder / batch selection reorders the pooled rows (O(M·D)), anything else (crop, reset, repeat)
    drops them for one full re-pool. As a second guard `update` (longer calls) keeps the last key of every final
    block as a fingerprint, so an edit made behind the cache's back is caught too; `update_in_place` (decode steps,
    no read-back) checks only what the host knows: a dynamic cache's length.
    """

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.sums: torch.Tensor | None = None  # [B, M, D] fp32
        self.counts: torch.Tensor | None = None  # [B, M] fp32
        self.final_blocks = 0  # blocks complete as of the previous call
        self.fingerprints: torch.Tensor | None = None  # [B, final_blocks, D]
        self.pooled_keys: int | None = None  # how many cache positions the sums cover (host-known caches)

    # Cache-layer methods that change which keys sit where; their effect on the pool (see `attach`).
    _ROW_SELECTING = ("reorder_cache", "batch_select_indices")
    _INVALIDATING = ("crop", "reset", "batch_repeat_interleave")

    def attach(self, layer: object) -> None:
        """Hooks this pool to a transformers cache layer, so that edits of the layer's keys reach it."""
        for name in self._ROW_SELECTING + self._INVALIDATING:
            method = getattr(layer, name, None)
            if method is None:
                continue

            def hooked(*args, _method=method, _name=name, **kwargs):
                result = _method(*args, **kwargs)
                if _name in self._ROW_SELECTING and self.sums is not None:
                    self.select_rows(args[0] if args else next(iter(kwargs.values())))
                elif _name in self._INVALIDATING:
                    self.invalidate()
                return result

            setattr(layer, name, hooked)

    def invalidate(self) -> None:
        """Forgets every pooled block: the next update re-pools the whole cache."""
        self.sums = self.counts = self.fingerprints = self.pooled_keys = None
        self.final_blocks = 0

    def select_rows(self, rows: torch.Tensor) -> None:
        """Follows a beam reorder / batch selection of the cache rows."""
        rows = rows.to(self.sums.device)
        self.sums, self.counts = self.sums[rows], self.counts[rows]
        if self.fingerprints is not None:  # none after an in-place (decode) update
            self.fingerprints = self.fingerprints[rows]

    def _still_valid(self, keys: torch.Tensor, filled: int) -> bool:
        if self.sums is None or self.fingerprints is None:
            return False
        if self.sums.shape[0] != keys.shape[0] or self.sums.shape[-1] != keys.shape[-1]:
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
        self.pooled_keys = filled
        self.final_blocks = filled // self.block_size
        self.fingerprints = keys[:, self.block_size - 1 : self.final_blocks * self.block_size : self.block_size].clone()
        return mean_pool(sums, counts)

    def update_in_place(self, keys: torch.Tensor, valid: torch.Tensor, written: torch.Tensor | int,
                        num_new: int) -> torch.Tensor:
        """`update` for a decode step, without reading the GPU back (a static cache's step: CUDA-graph safe).

        `written` is the cache's write offset after this step's `num_new` keys: a 0-d GPU tensor for a static cache,
        the number of keys for a dynamic one. Only the blocks those keys can touch are re-pooled, from a fixed-size
        window, and written into the running sums in place (fixed addresses, so a captured graph replays them); a
        dynamic cache that grew into new blocks gets them as empty sums first; with no sums yet, every block is
        pooled. No fingerprint check (a host read): cache edits reach the pool through `attach` only.
        """
        num_keys = keys.shape[1]
        num_blocks = -(-num_keys // self.block_size)
        if isinstance(written, int):  # a dynamic cache
            if (self.sums is not None and self.pooled_keys == written - num_new and
                    self.sums.shape[0] == keys.shape[0] and self.sums.shape[1] <= num_blocks):
                grow = num_blocks - self.sums.shape[1]  # new blocks start empty; the window below fills them
                self.sums = torch.nn.functional.pad(self.sums, (0, 0, 0, grow))
                self.counts = torch.nn.functional.pad(self.counts, (0, grow))
            else:  # the pool did not see the keys before this step's (known on the host): pool every block
                self.sums = None
            self.pooled_keys = written
        if self.sums is None or self.sums.shape[:2] != (keys.shape[0], num_blocks):
            real = valid & (torch.arange(num_keys, device=keys.device) < written)  # slots past it hold no key yet
            self.sums, self.counts = pool_blocks(keys, real, self.block_size)
            self.fingerprints, self.final_blocks = None, 0  # the fingerprint check needs a host read: off
            return mean_pool(self.sums, self.counts)
        last_block = self.sums.shape[1] - 1
        window = -(-num_new // self.block_size) + 1  # blocks the new keys can touch
        blocks = (written - num_new) // self.block_size + torch.arange(window, device=keys.device)
        blocks = blocks.clamp_max(last_block)
        slots = (blocks.unsqueeze(-1) * self.block_size + torch.arange(self.block_size, device=keys.device)).flatten()
        # Only the window's slots are tested (not the whole cache): real keys lie below the write offset, which also
        # drops a partial last block's slots past the buffer (written <= num_keys).
        in_buffer = slots.clamp_max(num_keys - 1)
        weight = (valid[:, in_buffer] & (slots < written)).float()
        sums = (keys[:, in_buffer].float() * weight.unsqueeze(-1)).view(keys.shape[0], window, self.block_size, -1)
        sums = sums.sum(2)
        # A clamped repeat of the last block writes the same values twice: harmless.
        self.sums.index_copy_(1, blocks, sums)
        self.counts.index_copy_(1, blocks, weight.view(keys.shape[0], window, self.block_size).sum(2))
        self.fingerprints, self.final_blocks = None, 0
        return mean_pool(self.sums, self.counts)

