"""How the logits program (`scoring.build_weighted_relu_logits`) is launched for one call: its CTA shape, key
splits, query layout, driver and query-block order, chosen from the head count, the number of queries and keys and
the GPU's SM count. Host-side policy only (no program is built here), so that CPU tests check every choice; the
figures behind each choice are beside its constant.
"""

from __future__ import annotations

import math

import torch

from .common import ROWS_PER_CTA, _sm_count, queries_per_cta
from .scoring import can_interleave, stages_stores

# Decode steps bring too few queries to fill the GPU: their key tiles are split over CTAs (a power of two, so that
# few program variants get compiled), aiming at two CTAs per SM and at least MIN_TILES_PER_SPLIT tiles each.
MAX_KEY_SPLITS = 64
MIN_TILES_PER_SPLIT = 4
KEY_TILE = 128  # block_n of the logits program
# Many heads (the DSA baselines: 64 heads, GLM-5's 32) take 256-row CTAs over 64-key tiles in prefill: `python
# benchmarks/sweep_logits.py --heads 64 --context 65536` on an H200, 508 against 490 TFLOP/s for 128 rows x 128 keys.
# 32 heads: 36.95 against 40.40 ms, both overlapped (sweep_logits-20261202-192711.json, 64K).
WIDE_CTA = dict(rows_per_cta=256, block_n=64)
WIDE_CTA_MIN_HEADS = 32
# `wide_few_heads` (the default): 4-16 heads (MISA's routed rows) in the same CTAs, interleaved over 128 query rows
# per consumer warpgroup: wgmma N = 128 instead of 64 (an N = 64 wgmma with both operands in shared memory needs all
# of the SM's 128 B/clock of it) and each key tile read for 32 queries instead of 16. H200, overlapped, 32K causal
# logits (sweep_logits-20261204-021632.json): 8 heads 2.07 against 2.16 ms, 4 heads 1.37 / 1.45, 16 heads 3.70 /
# 3.91; the whole MISA-8 indexer host hidden (bench_indexer-20261204-022103.json, TILELANG_SQUARE_FEW_HEADS_SCORER
# beside it): 5.03 / 5.01 ms at 32K, 16.45 / 16.48 at 64K, 59.72 / 61.77 at 128K. (With TileLang's pipeline, before
# the overlapped driver, it was not kept: 54513c8.) Two heads stay out: their 128-query block would not divide the
# scorers' query_multiple.
WIDE_FEW_HEADS = True
WIDE_FEW_HEADS_MIN = 4
# `interleaved_many_heads` (the default): 32 heads (GLM-5's DSA baseline) interleaved in the wide CTAs too. H200:
# 32K causal logits 8.03 against 9.09 ms (sweep_logits-20261204-021632.json); GLM-5's DSA-32 indexer host hidden
# 10.89 / 39.71 ms at 32K / 64K against 11.69 / 43.63 (bench_indexer-20261204-044100.json, the plain layout as
# TILELANG_PLAIN_MANY_HEADS_SCORER beside it), though the queries' permutation costs 0.4 / 0.8 ms of elementwise
# kernels. 64 heads do not fit it (the plain wide CTAs).
INTERLEAVED_MANY_HEADS = True
# `longest_first`: a prefill's logits CTAs and its top-k's rows taken last to first, the longest (most visible keys)
# first, so that the shortest fill each launch's last wave; by head count (None: `longest_first_for`), for the few
# routed heads only. H200, causal logits at 46K in one launch (sweep_logits-20261204-132617 / -133936.json): 4 / 8 /
# 16 heads 2.16 / 3.71 / 7.13 ms against 2.52 / 3.99 / 7.32 forward. In the indexer, host hidden, medians of 3 rounds:
# MISA-8 4.27 / 15.00 / 58.52 ms at 32K / 64K / 128K with remainder_first against 4.60 / 15.44 / 59.05 for the former
# schedule (bench_indexer-20261204-133942.json); DSA-64 74.58 against 69.45 ms at 64K and GLM-5's DSA-32 9.33 / 36.68
# against 9.34 / 37.09 at 32K / 64K (bench_indexer-20261204-135048.json): many heads keep the launch order.
LONGEST_FIRST: bool | None = None
LONGEST_FIRST_MAX_HEADS = 16
OVERLAPPED_STAGES = 4  # key tiles in flight in the overlapped driver


def longest_first_for(heads: int, num_queries: int, longest_first: bool | None = LONGEST_FIRST) -> bool:
    """Whether a call of `num_queries` queries with `heads` heads each takes its logits' query blocks and its top-k's
    rows last to first: only a prefill's (at least one query block; a decode step's blocks are one), then
    `longest_first` where given, else for at most LONGEST_FIRST_MAX_HEADS heads (see LONGEST_FIRST)."""
    if num_queries < queries_per_cta(heads):
        return False
    return heads <= LONGEST_FIRST_MAX_HEADS if longest_first is None else longest_first


def key_splits_for(device: torch.device, ctas: int, num_keys: int) -> int:
    """How many CTAs share one query block's key tiles: 1 for prefill, more for small decode batches."""
    return key_splits(_sm_count(device), ctas, num_keys)


def key_splits(sm_count: int, ctas: int, num_keys: int) -> int:
    """`key_splits_for` on a GPU of `sm_count` SMs."""
    wanted = 2 * sm_count
    most = min(MAX_KEY_SPLITS, max(1, num_keys // (KEY_TILE * MIN_TILES_PER_SPLIT)))
    splits = 1
    while ctas * splits < wanted and splits * 2 <= most:
        splits *= 2
    return splits


def interleave_query_rows(rows: torch.Tensor, heads: int, rows_per_cta: int = ROWS_PER_CTA) -> torch.Tensor:
    """Plain query rows [B, n · rows_per_cta, D] (query · heads + head within each CTA's block) -> the interleaved
    layout's order (`scoring.interleaved_query_head`), as one strided copy instead of a gather (an index kernel).

    A plain row's bits are (warpgroup, query group, lane quad m, head // 2, head % 2), an interleaved row's
    (warpgroup, query group, head // 2, m, head % 2): the layout swaps two bit fields."""
    batch, count, dim = rows.shape
    rows = rows.contiguous()
    # The copy moves 8-byte words where a row allows it (fewer, wider elements for PyTorch's strided copy kernel,
    # which moves one element per thread step).
    itemsize = rows.element_size()
    as_words = itemsize < 8 and dim * itemsize % 8 == 0 and rows.storage_offset() * itemsize % 8 == 0
    words = rows.view(torch.int64) if as_words else rows
    fields = words.reshape(batch, count // rows_per_cta, 2, rows_per_cta // 8 // heads, 4, heads // 2, 2, -1)
    moved = fields.transpose(4, 5).reshape(batch, count, -1)
    return moved.view(rows.dtype) if as_words else moved


def decode_rows_per_cta(heads: int, num_queries: int) -> int:
    """Query rows per CTA for a step with fewer queries than a prefill block (decode, 1-4 per sequence): the smallest
    power of two holding all of them, at least 8 (the tensor cores' narrowest N). A 128-row block would leave most
    rows empty (8 routed heads x 1 query: 120 of 128), and their matmul and head sums cost as much as real ones.
    Head counts that are not powers of two keep the prefill block (rows must stay a multiple of the heads)."""
    if heads & (heads - 1):
        return ROWS_PER_CTA
    rows = max(8, heads * num_queries)
    return min(ROWS_PER_CTA, 1 << (rows - 1).bit_length())


def overlaps(heads: int, fp8: bool = False) -> bool:
    """Whether a prefill's logits for `heads` query rows per token take the overlapped driver (each tile's epilogue
    during the next tile's wgmma, see `scoring.build_weighted_relu_logits`): the bf16 programs."""
    return not fp8


def prefill_shape(heads: int, fp8: bool = False, wide_few_heads: bool = False) -> dict:
    """The logits program's CTA shape (rows_per_cta, block_n) for a prefill of `heads` query rows per token: WIDE_CTA
    for many heads in bf16 (and for 4-16 interleaved heads with `wide_few_heads`, see `wide_few_heads_fit`), 128 rows
    x 128 keys otherwise."""
    wide = heads >= WIDE_CTA_MIN_HEADS or (wide_few_heads and wide_few_heads_fit(heads))
    if wide and not fp8 and WIDE_CTA["rows_per_cta"] % heads == 0:
        return dict(WIDE_CTA)
    return dict(rows_per_cta=ROWS_PER_CTA, block_n=KEY_TILE)


def wide_few_heads_fit(heads: int) -> bool:
    """Whether `wide_few_heads` applies to `heads` heads: the interleaved layout in 128- and 256-row CTAs alike."""
    return heads >= WIDE_FEW_HEADS_MIN and can_interleave(heads) and can_interleave(heads, WIDE_CTA["rows_per_cta"])


def logits_wave_queries(heads: int, batch: int, device: torch.device, fp8: bool = False,
                        wide_few_heads: bool = WIDE_FEW_HEADS) -> int:
    """Queries (per sequence of `batch`) whose prefill logits CTAs number one per SM of `device`: query chunks of whole
    such waves end no launch in a partly filled wave (`wide_few_heads`: 4-16 heads in 256-row CTAs, see `_logits`).
    At 128K a prefill's late query chunks were 2-5 waves of MISA-8's (then) 16-query CTAs; H200,
    `bench_indexer-20261203-192012.json` against TILELANG_BUDGET_CHUNKS_SCORER: MISA-8's logits stage 39.1 -> 35.5
    ms, the whole indexer (host hidden) 66.0 -> 62.0 ms; DSA-64 297 -> 293 ms; 32K and 64K within noise. (Eagerly
    the gain did not show, 66.2 / 66.9 ms: the gaps the host left grew from 0.2 to 4.9 ms, with 16 chunks instead
    of 14; why, not established.)"""
    sm_count = _sm_count(device)
    per_cta = queries_per_cta(heads, prefill_shape(heads, fp8, wide_few_heads)["rows_per_cta"])
    return per_cta * sm_count // math.gcd(batch, sm_count)


def logits_options(heads: int, batch: int, num_queries: int, num_keys: int, sm_count: int, fill_future: bool,
                   fp8: bool = False, interleaved: bool = False, overlapped: bool = True,
                   wide_few_heads: bool = False, longest_first: bool | None = LONGEST_FIRST) -> dict:
    """Build options of the logits program for one call (`interleaved` and `wide_few_heads` as `_logits` settled
    them): the CTA shape (prefill, decode, or 128-row CTAs where keys are split over CTAs), key splits, staged stores,
    overlapped driver, the interleaved layout where it fits that shape (32 heads lose it in 128-row CTAs), and the
    query blocks last to first (`longest_first`) for a prefill (a decode step's blocks are one)."""
    block = queries_per_cta(heads)

    def ctas(rows_per_cta: int) -> int:
        return -(-num_queries // queries_per_cta(heads, rows_per_cta)) * batch

    shape = prefill_shape(heads, fp8, wide_few_heads)
    if num_queries < block:  # decode
        shape = dict(rows_per_cta=decode_rows_per_cta(heads, num_queries), block_n=KEY_TILE)
    elif key_splits(sm_count, ctas(shape["rows_per_cta"]), num_keys) > 1:
        shape = dict(rows_per_cta=ROWS_PER_CTA, block_n=KEY_TILE)  # too few queries to fill the GPU with wide CTAs
    splits = key_splits(sm_count, ctas(shape["rows_per_cta"]), num_keys)
    # Staged (TMA) stores for few heads and at least one full query block (prefill), where the stores set the pace;
    # a TMA row stride must be a multiple of 16 B. Decode steps (fewer queries than a block) never stage, so a cache
    # length's divisibility by 4 does not switch programs (and trigger a compile) in the middle of a generation.
    staged = stages_stores(heads) and num_queries >= block and num_keys % 4 == 0
    overlapped = overlapped and overlaps(heads, fp8) and splits == 1 and num_queries >= block
    if overlapped:
        shape["num_stages"] = OVERLAPPED_STAGES
    return dict(shape, key_splits=splits, fill_future=fill_future, staged_stores=staged, fp8=fp8,
                interleaved=interleaved and can_interleave(heads, shape["rows_per_cta"]), overlapped=overlapped,
                longest_first=longest_first_for(heads, num_queries, longest_first))


def query_layout(heads: int, num_queries: int, fp8: bool, interleaved: bool, wide_few_heads: bool,
                 interleaved_many_heads: bool) -> tuple[bool, bool, int]:
    """(interleaved, wide_few_heads, query block) as `_logits` settles them for one call: the interleaved layout for
    2-16 heads with a whole square block (and `wide_few_heads` with a whole wide one), or with
    `interleaved_many_heads` for heads that fit it only in the wide CTAs (32) with a whole wide block; the block is
    what the queries are padded to."""
    square_block = queries_per_cta(heads)
    wide_block = queries_per_cta(heads, WIDE_CTA["rows_per_cta"])
    many = (interleaved_many_heads and heads >= WIDE_CTA_MIN_HEADS and num_queries >= wide_block
            and can_interleave(heads, WIDE_CTA["rows_per_cta"]))
    few = can_interleave(heads) and num_queries >= square_block
    interleaved = interleaved and not fp8 and (few or many)
    wide_few_heads = wide_few_heads and interleaved and few and wide_few_heads_fit(heads) and num_queries >= wide_block
    return interleaved, wide_few_heads, wide_block if wide_few_heads or (interleaved and many) else square_block
