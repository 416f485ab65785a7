"""Shared building blocks of the reference indexers: head scores, block pooling, key gathers, FP8 rounding, the tail
block (masks and query chunks: `ops.masks`).

Every tensor here follows one layout:
  q        [B, S, H, D]  indexer queries (RoPE applied), model dtype
  keys     [B, T, D]     indexer key cache, model dtype
  weights  [B, S, H]     fp32 head weights, already scaled by H^-0.5 as transformers does
  mask     [B, S, T]     bool (True = visible) or additive float (0 = visible), or None for plain causal
"""

from __future__ import annotations

import math

import torch

from .masks import ChunkMask


def head_scores(q: torch.Tensor, keys: torch.Tensor, softmax_scale: float) -> torch.Tensor:
    """ReLU(q·k)·scale per head, fp32: q [B, c, h, D] with keys [B, 1 or c, T, D] -> [B, c, h, T].

    Same op order as transformers' indexer (fp32 matmul, scale, ReLU), so the dense path is bit-identical.
    """
    scores = torch.matmul(q.float(), keys.float().transpose(-1, -2))
    return scores.mul_(softmax_scale).relu_()


def weighted_head_sum(weights: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Σ_j w[t, j]·scores[t, j, s]: weights [B, c, h], scores [B, c, h, T] -> [B, c, T]."""
    return torch.matmul(weights.unsqueeze(-2), scores).squeeze(-2)


def pool_blocks(keys: torch.Tensor, valid: torch.Tensor, block_size: int,
                first_block: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block key sums and counts over the real keys, from block `first_block` on.

    Returns (sums [B, M', D] fp32, counts [B, M'] fp32) with M' = ceil(T / block_size) - first_block.
    """
    batch, num_keys, dim = keys.shape
    start = first_block * block_size
    num_blocks = math.ceil(num_keys / block_size) - first_block
    pad = start + num_blocks * block_size - num_keys
    tail_valid = torch.nn.functional.pad(valid[:, start:].bool(), (0, pad), value=False)
    # Zeroing is exact in the keys' own dtype, and the sum accumulates in fp32 as it reads them: no fp32 copy of the
    # keys and no multiply by a float mask (two full passes over [B, T, D] fp32 on a long prefill).
    tail_keys = torch.nn.functional.pad(keys[:, start:], (0, 0, 0, pad)).masked_fill(~tail_valid.unsqueeze(-1), 0)
    sums = tail_keys.view(batch, num_blocks, block_size, dim).sum(2, dtype=torch.float32)
    counts = tail_valid.view(batch, num_blocks, block_size).sum(2, dtype=torch.float32)
    return sums, counts


def mean_pool(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Block means from sums and counts; an empty block pools to zero (it is never visible anyway)."""
    return sums / counts.clamp(min=1.0).unsqueeze(-1)


def gather_keys(keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """keys [B, T, D] at per-query positions [B, c, C] -> [B, c, C, D]."""
    batch, num_keys, dim = keys.shape
    flat = positions.reshape(batch, -1, 1).expand(-1, -1, dim)
    return keys.gather(1, flat).view(*positions.shape, dim)


def top_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores along the last axis."""
    return scores.topk(k, dim=-1).indices


FP8_E4M3_MAX = 448.0


def fp8_e4m3_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x as FP8 e4m3 values [..., D] and one fp32 power-of-two scale per row of the last axis [...].

    scale = 2^ceil(log2(max|row| / 448)), as DeepSeek's act_quant with power-of-two (ue8m0) scales. Dividing by a
    power of two is exact in x's own dtype, so no fp32 copy of x is made (same bits as quantizing from fp32).
    """
    amax = x.detach().abs().amax(-1, keepdim=True).float().clamp_min(1e-30)
    scale = torch.exp2(torch.ceil(torch.log2(amax / FP8_E4M3_MAX)))
    return (x / scale.to(x.dtype)).to(torch.float8_e4m3fn), scale.squeeze(-1)


def fp8_e4m3_roundtrip(x: torch.Tensor) -> torch.Tensor:
    """x rounded to FP8 e4m3 (see `fp8_e4m3_quantize`), returned in x's dtype.

    Every value of the result is an e4m3 value times a power of two, so it is exact in bf16 and fp32, and q·k over
    such values is what an FP8 tensor-core kernel accumulates (in fp32); quantizing it again gives it back exactly.
    """
    values, scale = fp8_e4m3_quantize(x)
    return values.to(x.dtype) * scale.unsqueeze(-1).to(x.dtype)  # exact: an e4m3 value times a power of two


class TailBlock:
    """Each query's last, partly visible key block, pooled over the keys the query may see.

    A block pooled over all its keys would let a prefill query's router see the keys after it in its own block
    (future tokens), which a decode step never sees: the router must pool that block over [block start, ke) only.
    Attributes: means [B, c, D] fp32 (zero where absent), start [B, c] int32 (the block's first key index; the
    routers sum the full blocks before it), present [B, c] bool (False when ke sits on a block boundary).
    """

    def __init__(self, keys: torch.Tensor, chunk: ChunkMask, block_size: int) -> None:
        ks, ke, contiguous = chunk.key_range
        ks, ke = ks.long(), ke.long()
        start = ke // block_size * block_size
        self.present = (ke > start) & (ke > ks)
        self.start = start.to(torch.int32)
        if self.uses_prefix_sums(chunk, keys.shape[1], block_size):
            # Many queries (prefill): sums from block-local prefix sums of the keys, read once, instead of a
            # [B, c, block, D] gather (2 GiB for 32K queries); without a mask only the keys the chunk's tails span.
            window = chunk.tail_key_window(block_size)
            self.means = self._means_from_prefix_sums(keys, ks, ke, start, block_size, *window)
            return
        positions = start.unsqueeze(-1) + torch.arange(block_size, device=keys.device)  # [B, c, block]
        inside = (positions >= ks.unsqueeze(-1)) & (positions < ke.unsqueeze(-1))
        positions = positions.clamp_max(keys.shape[1] - 1)
        if contiguous is False:  # masks with holes: only the visible keys of the block
            inside &= chunk.visible.gather(-1, positions)
        block = gather_keys(keys, positions).float() * inside.unsqueeze(-1)  # [B, c, block, D]
        self.means = block.sum(-2) / inside.sum(-1, keepdim=True).clamp_min(1)

    @staticmethod
    def uses_prefix_sums(chunk: ChunkMask, num_keys: int, block_size: int) -> bool:
        """Whether the means come from prefix sums over the keys (many queries, contiguous ranges): then the keys are
        read once for the chunk, not once per query."""
        return chunk.key_range[2] is True and (chunk.rows.stop - chunk.rows.start) * block_size > num_keys

    def _means_from_prefix_sums(self, keys: torch.Tensor, ks: torch.Tensor, ke: torch.Tensor, start: torch.Tensor,
                                block_size: int, low: int = 0, high: int | None = None) -> torch.Tensor:
        """Means over [max(ks, start), ke) for keys visible exactly on [ks, ke): prefix sums restart at every block,
        so no sum spans more than one block (no cancellation between large partial sums). Only keys [low, high)
        are summed (`low` a block start at or before every tail, `high` at or after every ke): the same sums."""
        keys = keys[:, low:high]
        batch, num_keys, dim = keys.shape
        if num_keys == 0:  # no query sees a key
            return torch.zeros(*ke.shape, dim, dtype=torch.float32, device=keys.device)
        padded = -(-num_keys // block_size) * block_size
        local = torch.nn.functional.pad(keys.float(), (0, 0, 0, padded - num_keys))
        prefix = local.view(batch, -1, block_size, dim).cumsum(2).view(batch, padded, dim)
        first = torch.maximum(ks, start)

        def at(position: torch.Tensor) -> torch.Tensor:  # prefix sum through a key, [B, c, D]
            return gather_keys(prefix, (position - low).clamp(0, padded - 1).unsqueeze(-1)).squeeze(-2)

        through_last = at(ke - 1)
        before_first = at(first - 1)
        sums = through_last - before_first * (first > start).unsqueeze(-1)
        counts = (ke - first).clamp_min(1).unsqueeze(-1)
        return sums / counts * self.present.unsqueeze(-1)

    def scores(self, q: torch.Tensor, scores_fn, softmax_scale: float) -> torch.Tensor:
        """ReLU(q·tail mean)·scale per head [B, c, H], zero where there is no tail (scores_fn as `head_scores`)."""
        return scores_fn(q, self.means.unsqueeze(-2), softmax_scale).squeeze(-1) * self.present.unsqueeze(-1)

    def full_block_ends(self, ke: torch.Tensor) -> torch.Tensor:
        """ke cut back to the tail block's start where there is a tail: the range of the full blocks."""
        return torch.where(self.present, self.start, ke.to(torch.int32))

    @staticmethod
    def scratch_bytes(block_size: int, dim: int) -> int:
        """Scratch memory per query (the gathered block in fp32)."""
        return 2 * block_size * dim * 4
