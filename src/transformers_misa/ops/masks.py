"""Masks and query chunks of the reference indexers: what each query may see, read from transformers' mask once per
forward, and how the queries are cut into chunks whose scratch memory stays under a budget. Layouts as in
`ops.blocks`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from torch.utils.weak import WeakIdKeyDictionary

# Score of a key a query may not see. Finite scores always rank above it.
MASKED = float("-inf")

# Extra memory one query chunk may take by default (the [B, c, H, T] fp32 head scores dominate).
DEFAULT_CHUNK_BYTES = 256 * 2**20


def _whole_multiples(size: int, multiple: int) -> int:
    """`size` rounded down to a multiple of `multiple`, unless that leaves nothing."""
    return size if size < multiple else size // multiple * multiple


def query_chunks(num_queries: int, bytes_per_query: int, chunk_size: int | None,
                 budget: int = DEFAULT_CHUNK_BYTES, multiple: int = 1) -> Iterator[slice]:
    """Yields slices over the queries so that each chunk's scratch memory stays under `budget` bytes; sized by the
    budget (no `chunk_size`), chunks hold whole `multiple`s of queries where they can."""
    if chunk_size is None:
        chunk_size = _whole_multiples(max(1, budget // max(1, bytes_per_query)), multiple)
    for start in range(0, num_queries, chunk_size):
        yield slice(start, min(start + chunk_size, num_queries))


def causal_query_chunks(num_queries: int, num_keys: int, bytes_per_query: Callable[[int], int], budget: int,
                        min_width: int = 0, block_size: int = 1, multiple: int = 1,
                        remainder_first: bool = False) -> Iterator[slice]:
    """`query_chunks` for a causal prefill whose chunks score only the keys up to their last query (queries at the
    last positions): chunk [a, b) sees max(T - S + b, min_width) keys (whole blocks) and needs (b - a) ·
    bytes_per_query(that width) of scratch, so the early, narrow chunks take more queries. Fewer chunks spend less
    host time, and early chunks no longer leave the GPU waiting for the next launch. Every chunk but the last holds
    whole `multiple`s of queries where the budget allows (a kernel's query blocks: no chunk needs padding).

    `remainder_first`: the queries past whole `multiple`s (S mod multiple) go to the first chunk instead of the last,
    every other chunk holding whole multiples: where a multiple is a wave of CTAs, the partly filled wave is then made
    of the prefill's shortest rows instead of its longest."""
    offset = num_keys - num_queries
    remainder = num_queries % multiple if remainder_first and num_queries > multiple else 0

    def width(stop: int) -> int:
        return min(num_keys, math.ceil(max(offset + stop, min_width) / block_size) * block_size)

    start = 0
    while start < num_queries:
        low, high = 1, num_queries - start  # the largest size that fits (at least one query), by bisection
        while low < high:
            size = (low + high + 1) // 2
            if size * bytes_per_query(width(start + size)) <= budget:
                low = size
            else:
                high = size - 1
        if start + low < num_queries:
            if start == 0 and remainder:  # the remainder plus the whole multiples that fit beside it
                low = remainder + _whole_multiples(low - remainder, multiple) if low > remainder else low
            else:
                low = _whole_multiples(low, multiple)
        yield slice(start, start + low)
        start += low


def mask_bias(mask: torch.Tensor | None, rows: slice, batch: int, num_queries: int, num_keys: int,
              device: torch.device, width: int | None = None) -> torch.Tensor:
    """The additive fp32 bias [B, c, width] of one query chunk over keys [0, width) (all T by default).

    A bool mask becomes 0 / -inf, exactly as transformers' `masked_fill(~mask, -inf)`; an additive mask is added
    as is, exactly as transformers' `scores + mask`. `None` means causal with the queries at the last positions.
    """
    width = num_keys if width is None else width
    if mask is None:
        query_pos = torch.arange(rows.start, rows.stop, device=device) + (num_keys - num_queries)
        visible = torch.arange(width, device=device)[None, :] <= query_pos[:, None]
        bias = torch.zeros(visible.shape, dtype=torch.float32, device=device).masked_fill_(~visible, MASKED)
        return bias.unsqueeze(0).expand(batch, -1, -1)
    chunk = mask[:, rows, :width].expand(batch, -1, -1)
    if chunk.dtype == torch.bool:
        return torch.zeros(chunk.shape, dtype=torch.float32, device=device).masked_fill_(~chunk, MASKED)
    return chunk.float()


class ChunkMask:
    """The mask of one query chunk, with each view (bias, visibility, key ranges) built only when asked for.

    `mask` is the whole [B, S, T] mask (bool: True = visible; additive float: 0 = visible) or None for causal with
    the queries at the last S positions. The kernels only need each query's visible key range [ks, ke) and never
    materialise the fp32 bias; the reference uses the bias, exactly as transformers applies the mask.

    `sync_free`: never read the GPU back (decode steps; CUDA-graph capture of a static cache's): a mask's contiguity is
    then left unknown (None), so consumers apply it exactly, and `visible_end` is the full width.
    """

    def __init__(self, mask: torch.Tensor | None, rows: slice, batch: int, num_queries: int, num_keys: int,
                 device: torch.device, width: int | None = None, sync_free: bool = False) -> None:
        self.mask, self.rows, self.batch = mask, rows, batch
        self.num_queries, self.num_keys, self.device = num_queries, num_keys, device
        self.width = num_keys if width is None else width  # keys [0, width) are scored; the rest is unseen
        self.sync_free = sync_free
        self._cache: dict[str, object] = {}

    def narrowed(self, width: int) -> ChunkMask:
        """The same chunk seeing only keys [0, width); valid when no query sees a key past `width`."""
        narrow = ChunkMask(self.mask, self.rows, self.batch, self.num_queries, self.num_keys, self.device, width,
                           self.sync_free)
        if "key_range" in self._cache:
            narrow._cache["key_range"] = self._cache["key_range"]
        if "visible" in self._cache:
            narrow._cache["visible"] = self._cache["visible"][..., :width]
        return narrow

    def _fact(self, name: str) -> tuple:
        """The name under which `remembered` keeps a fact about this chunk of the mask (not its width: a narrowed
        chunk sees the same key ranges)."""
        return name, self.rows.start, self.rows.stop, self.batch, self.num_queries, self.num_keys

    def _memo(self, name: str, build):
        if name not in self._cache:
            self._cache[name] = build()
        return self._cache[name]

    def _query_positions(self) -> torch.Tensor:
        return torch.arange(self.rows.start, self.rows.stop, device=self.device) + (self.num_keys - self.num_queries)

    @property
    def bias(self) -> torch.Tensor:
        """Additive fp32 bias [B, c, T]: 0 / -inf for bool masks (as `masked_fill(~mask, -inf)`), additive as is."""
        return self._memo("bias", lambda: mask_bias(self.mask, self.rows, self.batch, self.num_queries,
                                                    self.num_keys, self.device, self.width))

    @property
    def visible(self) -> torch.Tensor:
        """[B, c, T] bool: keys each query may see."""
        def build() -> torch.Tensor:
            if self.mask is None:
                keys = torch.arange(self.width, device=self.device)
                return (keys[None, :] <= self._query_positions()[:, None]).unsqueeze(0).expand(self.batch, -1, -1)
            chunk = self.mask[:, self.rows, : self.width].expand(self.batch, -1, -1)
            if chunk.dtype == torch.bool:
                return chunk
            return chunk > torch.finfo(chunk.dtype).min / 2
        return self._memo("visible", build)

    def visible_end(self) -> int:
        """One past the last key any query of the chunk sees. Without a mask it is known on the host (no GPU sync:
        decode steps stay free of host round trips); with one it is read back from the key ranges (sync-free: the
        full width)."""
        if self.mask is None:
            return self.rows.stop + self.num_keys - self.num_queries
        if self.sync_free:
            return self.width
        return remembered(self.mask, self._fact("visible_end"), lambda: int(self.key_range[1].max()))

    def first_query_end(self) -> int:
        """Without a mask: one past the last key the chunk's first query sees (the queries sit at the last positions,
        each seeing one key more than the one before)."""
        return self.rows.start + self.num_keys - self.num_queries + 1

    def tail_key_window(self, block_size: int) -> tuple[int, int | None]:
        """Keys [low, high) holding every query's tail block (see `TailBlock`): known on the host without a mask
        (the queries' ends are consecutive), else the whole cache (0, None)."""
        if self.mask is not None:
            return 0, None
        return self.first_query_end() // block_size * block_size, self.visible_end()

    @property
    def key_range(self) -> tuple[torch.Tensor, torch.Tensor, bool | None]:
        """(ks, ke, contiguous): int32 [B, c] bounds of each query's visible keys, and whether they are exactly
        [ks, ke) for every query (true for causal and left/right padding masks; None: not checked, sync-free)."""
        def build():
            if self.mask is None:
                ke = (self._query_positions() + 1).to(torch.int32).unsqueeze(0).expand(self.batch, -1)
                return torch.zeros_like(ke), ke.contiguous(), True
            visible = self.visible
            any_visible = visible.any(-1)
            as_bytes = visible.view(torch.uint8)  # argmax takes no bool; a byte view instead of a 4x wider copy
            ks = as_bytes.argmax(-1)
            ke = visible.shape[-1] - as_bytes.flip(-1).argmax(-1)
            ks, ke = torch.where(any_visible, ks, 0), torch.where(any_visible, ke, 0)
            contiguous = None if self.sync_free else bool(torch.equal(visible.sum(-1), ke - ks))
            return ks.to(torch.int32), ke.to(torch.int32), contiguous
        if self.mask is None or self.sync_free:  # sync-free steps may be captured: each must compute its own
            return self._memo("key_range", build)
        # The same chunk of the same mask in every layer: read from the mask once (the consumers never write ks / ke).
        return self._memo("key_range", lambda: remembered(self.mask, self._fact("key_range"), build))

    def bias_at(self, positions: torch.Tensor) -> torch.Tensor:
        """The bias at per-query key positions [B, c, C], without building the whole [B, c, T] bias."""
        if self.mask is None:
            visible = positions <= self._query_positions()[None, :, None]
            return torch.zeros(positions.shape, dtype=torch.float32, device=self.device).masked_fill_(~visible, MASKED)
        picked = self.mask[:, self.rows].expand(self.batch, -1, -1).gather(-1, positions)
        if picked.dtype == torch.bool:
            return torch.zeros(picked.shape, dtype=torch.float32, device=self.device).masked_fill_(~picked, MASKED)
        return picked.float()

    def block_visible(self, block_size: int) -> torch.Tensor:
        """[B, c, M] bool: blocks of `block_size` keys holding at least one key the query may see."""
        def build() -> torch.Tensor:
            ks, ke, contiguous = self.key_range
            if not contiguous:
                return block_visibility(self.visible, block_size)
            # From the ranges: O(c·M), never a [c, T] tensor for causal masks.
            starts = torch.arange(0, self.width, block_size, device=self.device)
            ends = (starts + block_size).clamp_max(self.width)
            return (starts < ke.unsqueeze(-1)) & (ends > ks.unsqueeze(-1)) & (ke > ks).unsqueeze(-1)
        return self._memo(f"blocks{block_size}", build)


# What was read from a mask, kept across calls. A model hands each layer's indexer a new view of one mask (e.g.
# `attention_mask[:, 0]`): each fact (whether it is plain causal, a query chunk's key ranges) is kept under the tensor
# the view comes from, while its version counter (shared with its views, bumped by every in-place write) and the
# view's geometry are unchanged, so a forward reads them from the mask in its first layer only. Inference-mode tensors
# keep no version counter: their facts are read every time.
_MASK_FACTS = WeakIdKeyDictionary()


def remembered(mask: torch.Tensor, fact: tuple, read: Callable[[], object]) -> object:
    """`read()` (a fact about `mask`, named by `fact`), or its value from an earlier call on the same, unchanged mask.
    Never while a CUDA graph is captured: a graph replays only what it captured, so it must read the mask itself."""
    if mask.is_inference() or (mask.is_cuda and torch.cuda.is_current_stream_capturing()):
        return read()
    base = mask if mask._base is None else mask._base
    entry = _MASK_FACTS.get(base)
    if entry is None or entry[0] != mask._version:  # new, or written since: nothing known holds
        entry = _MASK_FACTS[base] = (mask._version, {})
    view = (tuple(mask.shape), mask.stride(), mask.storage_offset(), mask.dtype)
    facts = entry[1].setdefault(view, {})
    if fact not in facts:
        facts[fact] = read()
    return facts[fact]


def causal_prefix(mask: torch.Tensor, batch: int, num_queries: int, num_keys: int, budget: int) -> int | None:
    """The number of keys L over which `mask` is plain causal (each query sees exactly the keys up to its own
    position, the queries at positions L - S .. L - 1) while no key from L on is visible; None for any other mask.
    L = num_keys: what `mask=None` means (what transformers passes for a prefill without padding); L < num_keys: a
    static cache's prompt or step, whose unwritten slots past the written keys the mask hides. One read of the mask,
    in query chunks of at most `budget` bytes of comparison, and two read-backs to the host (L, told by the last
    query's row, which sees every written key; then the comparison). Read once per mask (see `remembered`)."""
    return remembered(mask, ("causal_prefix", batch, num_queries, num_keys),
                      lambda: _causal_prefix_length(mask, batch, num_queries, num_keys, budget))


def _causal_prefix_length(mask: torch.Tensor, batch: int, num_queries: int, num_keys: int, budget: int) -> int | None:
    if num_queries == 0:
        return None
    valid = key_validity(mask, batch, num_keys, mask.device)
    length = int(valid[0].sum())
    if length < num_queries:
        return None
    # Every row, the last one (`valid`) among them, is compared with causal over [0, L) and must hide [L, T).
    differs = torch.zeros((), dtype=torch.bool, device=mask.device)
    rows_per_chunk = max(1, budget // max(1, 3 * batch * num_keys))  # the given, causal and differing bools
    for start in range(0, num_queries, rows_per_chunk):
        rows = slice(start, min(num_queries, start + rows_per_chunk))
        given = ChunkMask(mask, rows, batch, num_queries, num_keys, mask.device).visible
        causal = ChunkMask(None, rows, 1, num_queries, length, mask.device).visible
        differs |= (given[..., :length] != causal).any() | given[..., length:].any()
    return None if bool(differs) else length


def key_validity(mask: torch.Tensor | None, batch: int, num_keys: int, device: torch.device) -> torch.Tensor:
    """[B, T] bool: keys that hold a real token (not padding, not an unfilled static-cache slot).

    The last query of the call sees every real key written so far, so its mask row is the answer.
    """
    if mask is None:
        return torch.ones(batch, num_keys, dtype=torch.bool, device=device)
    last_row = mask[:, -1].expand(batch, -1)
    if last_row.dtype == torch.bool:
        return last_row
    return last_row > torch.finfo(last_row.dtype).min / 2


def block_visibility(visible: torch.Tensor, block_size: int) -> torch.Tensor:
    """[B, c, T] key visibility -> [B, c, M] block visibility (a block is visible if any of its keys is)."""
    num_keys = visible.shape[-1]
    num_blocks = math.ceil(num_keys / block_size)
    padded = torch.nn.functional.pad(visible, (0, num_blocks * block_size - num_keys), value=False)
    return padded.view(*visible.shape[:-1], num_blocks, block_size).any(-1)
