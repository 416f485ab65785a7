"""The logits program (`kernels/scoring.py`) and its driver (`kernels/scorer.py`): it compiles for sm_90a everywhere
(CI) with the layouts and schedules intended, and on a Hopper GPU (marked gpu) it matches the reference and its own
other schedules. Its launch choices are tested on the host in test_logits_shapes.py."""

from __future__ import annotations

import pytest
import torch

from kernel_helpers import (_assert_logits_match, _assert_same_selection, _changed_lines, _inputs, _padded_causal_mask,
                            _ptxas_report, _tilelang_or_skip, gpu)
from transformers_misa.ops import reference
from transformers_misa.ops.masks import ChunkMask


@pytest.mark.parametrize("heads", [64, 32, 8])
def test_logits_kernel_compiles_for_sm90a(heads):
    _tilelang_or_skip()
    from transformers_misa.kernels.scoring import build_weighted_relu_logits

    kernel = build_weighted_relu_logits(heads, 128, arch="sm_90a")()
    source = kernel.get_kernel_source()
    assert "wgmma" in source, "the logits kernel must use Hopper's wgmma tensor-core path"
    assert "tma_load" in source, "key tiles should stream through TMA"


@pytest.mark.parametrize("heads", [64, 8])
def test_overlapped_logits_keep_the_next_wgmma_in_flight_during_an_epilogue(heads, tmp_path):
    """The overlapped driver's point is tile t's epilogue running while tile t+1's wgmma is in flight. Where ptxas
    cannot tell that an accumulator read is safe it injects a full wgmma wait (C7517: it did before every other
    epilogue), which quietly serialises the two; the program states the wait it needs (one group in flight) and
    fences only the thread's own accumulator registers (64, not the fragment's 16384 elements)."""
    _tilelang_or_skip()
    from transformers_misa.kernels.logits_shapes import logits_options
    from transformers_misa.kernels.scoring import build_weighted_relu_logits

    options = logits_options(heads, 1, 65536, 65536, 132, False, interleaved=True, wide_few_heads=True)
    assert options["overlapped"] and options["rows_per_cta"] == 256
    source = build_weighted_relu_logits(heads, 128, arch="sm_90a", **options)().get_kernel_source()
    assert "wait_wgmma<1>" in source and ", 16384)" not in source
    report = _ptxas_report(source, tmp_path)
    assert "C7517" not in report, report


def test_two_store_buffers_alternate_and_wait_for_one_store():
    """`store_buffers=2`: the staged logits alternate between two shared-memory buffers; an epilogue waits only for
    the store issued two tiles before (one may still read the other buffer), and the CTA for all before it exits."""
    _tilelang_or_skip()
    from transformers_misa.kernels.logits_shapes import logits_options
    from transformers_misa.kernels.scoring import build_weighted_relu_logits

    options = logits_options(8, 1, 65536, 65536, 132, False, interleaved=True, wide_few_heads=True)
    source = build_weighted_relu_logits(8, 128, arch="sm_90a", store_buffers=2, **options)().get_kernel_source()
    assert "tma_store_wait<1, true>" in source and "tma_store_wait<0, true>" in source
    assert source.count("tma_store_wait<0, true>") == 1, "one wait for every store, at the end only"
    with pytest.raises(ValueError, match="store_buffers"):
        build_weighted_relu_logits(8, 128, store_buffers=2)  # the pipelined driver keeps one buffer


@pytest.mark.parametrize("heads,rows", [(8, 8), (8, 32), (64, 64)])
def test_decode_logits_kernel_compiles_for_sm90a(heads, rows):
    """Decode steps take a narrower CTA (`decode_rows_per_cta`): still one wgmma of N = rows, no empty rows."""
    _tilelang_or_skip()
    from transformers_misa.kernels.scoring import build_weighted_relu_logits

    source = build_weighted_relu_logits(heads, 128, key_splits=8, staged_stores=False, rows_per_cta=rows,
                                        arch="sm_90a")().get_kernel_source()
    assert f"kFloat32, 64, {rows // 2 if rows > 8 else rows}, 16" in source, "one wgmma per key half, N = the rows"


def test_wide_prefill_logits_kernel_compiles_for_sm90a():
    """The 64- and 32-head prefill shape: 256 query rows (4 resp. 8 queries) per CTA over 64-key tiles."""
    _tilelang_or_skip()
    from transformers_misa.kernels.logits_shapes import prefill_shape
    from transformers_misa.kernels.scoring import build_weighted_relu_logits

    wide = dict(rows_per_cta=256, block_n=64)
    assert prefill_shape(64) == prefill_shape(32) == wide
    assert prefill_shape(8) == prefill_shape(16) == prefill_shape(64, fp8=True) == dict(rows_per_cta=128, block_n=128)
    # wide_few_heads: 4-16 heads in the wide CTAs too (2 heads and FP8 keep the square ones)
    assert prefill_shape(8, wide_few_heads=True) == prefill_shape(4, wide_few_heads=True) == wide
    assert prefill_shape(2, wide_few_heads=True) == prefill_shape(8, fp8=True, wide_few_heads=True) != wide
    for heads in (64, 32):
        source = build_weighted_relu_logits(heads, 128, fill_future=False, arch="sm_90a", **prefill_shape(heads))()
        assert "wgmma" in source.get_kernel_source() and "tma_load" in source.get_kernel_source()
    # 8 interleaved heads in a wide CTA: each consumer warpgroup multiplies 64 keys by 128 query rows (N = 128)
    source = build_weighted_relu_logits(8, 128, fill_future=False, staged_stores=True, interleaved=True,
                                        overlapped=True, num_stages=4, arch="sm_90a", **wide)().get_kernel_source()
    assert "kFloat32, 64, 128, 16" in source and "shfl" not in source


def test_longest_first_logits_take_the_query_blocks_last_to_first():
    """`longest_first` changes only where a CTA's query block lies (every changed line indexes by the block), for the
    scorer's few- and many-heads prefill programs."""
    _tilelang_or_skip()
    from transformers_misa.kernels.scoring import build_weighted_relu_logits

    wide = dict(rows_per_cta=256, block_n=64, fill_future=False, overlapped=True, num_stages=4, arch="sm_90a")
    for heads, options in ((8, dict(wide, staged_stores=True, interleaved=True)), (64, wide)):
        forward = build_weighted_relu_logits(heads, 128, **options)().get_kernel_source()
        longest_first = build_weighted_relu_logits(heads, 128, longest_first=True, **options)().get_kernel_source()
        changed = _changed_lines(forward, longest_first)
        assert changed and all("blockIdx.x" in line for line in changed)
        assert any("num_queries + " in line for line in changed if line.startswith("+"))


@pytest.mark.parametrize("heads,staged", [(64, False), (8, True)])
def test_fp8_logits_kernel_compiles_for_sm90a(heads, staged):
    _tilelang_or_skip()
    from transformers_misa.kernels.scoring import build_weighted_relu_logits

    source = build_weighted_relu_logits(heads, 128, fill_future=False, staged_stores=staged, fp8=True,
                                        arch="sm_90a")().get_kernel_source()
    assert "kFloat8_e4m3" in source, "qk_format='fp8_e4m3' must run on the FP8 tensor cores"
    if staged:
        _assert_quad_stores_fenced(source)


def _assert_quad_stores_fenced(source: str) -> None:
    """The FP8 few-head program sums a query's heads across a lane quad, so one lane of four writes each logit to
    shared memory (`threadIdx.x % 4 == 0`), and TileLang 0.1.15 warns that it hoists a sync out of that branch and
    "the race remains". The generated code is race-free, and this pins why: a barrier right before the quad's writes
    (the elected thread waited for the previous tile's bulk store before reaching it) and one right after them,
    before the elected thread's bulk store and its wait."""
    guard = source.index("if ((((int)threadIdx.x) % 4) == 0) {")
    barrier = "tl::__sync_thread_partial(3, 256);"
    before = source.rindex(barrier, 0, guard)
    assert source[before + len(barrier):guard].strip() == "", "a barrier must come right before the quad's writes"
    after = source.index(barrier, guard)
    store, wait = source.index("tl::tma_store(", after), source.index("tl::tma_store_wait<0, true>();", after)
    assert "logits_shared" not in source[after:store], "no write to the staged tile between the barrier and its store"
    assert after < store < wait, "the bulk store must follow the barrier after the writes and be waited for"


@pytest.mark.parametrize("heads,rows_per_cta", [(2, 128), (4, 128), (8, 128), (16, 128), (4, 256), (8, 256),
                                                 (16, 256), (32, 256)])
def test_interleaved_layout_puts_whole_queries_in_one_thread(heads, rows_per_cta):
    """The row permutation behind `interleaved=True`: a bijection onto (query, head) pairs of the block, and the G / 4
    accumulator columns a thread holds (warpgroup g of G = rows_per_cta / 2 rows, lane quad m: Gg + 8j + 2m + e) are
    whole queries."""
    _tilelang_or_skip()
    from transformers_misa.kernels.logits_shapes import interleave_query_rows
    from transformers_misa.kernels.scoring import interleaved_query_head

    group = rows_per_cta // 2
    query, head = interleaved_query_head(torch.arange(rows_per_cta), heads, rows_per_cta)
    assert sorted(zip(query.tolist(), head.tolist())) == [(i, h) for i in range(rows_per_cta // heads)
                                                          for h in range(heads)]
    plain = torch.arange(3 * rows_per_cta * 2).reshape(1, 3 * rows_per_cta, 2)  # three CTA blocks; row p: 2p, 2p + 1
    order = torch.cat([block * rows_per_cta + query * heads + head for block in range(3)])
    assert torch.equal(interleave_query_rows(plain, heads, rows_per_cta), plain[:, order])
    # bf16 rows of 128 move as 8-byte words: the same order, values and dtype
    rows = torch.randn(2, 3 * rows_per_cta, 128).to(torch.bfloat16)
    assert torch.equal(interleave_query_rows(rows, heads, rows_per_cta), rows[:, order])
    assert torch.equal(interleave_query_rows(rows[:, :, 1:-1], heads, rows_per_cta), rows[:, order, 1:-1])  # misaligned
    for g in range(2):
        for m in range(4):
            held: dict[int, set[int]] = {}
            for column in (group * g + 8 * j + 2 * m + e for j in range(group // 8) for e in range(2)):
                held.setdefault(int(query[column]), set()).add(int(head[column]))
            assert len(held) == group // 4 // heads and all(heads_ == set(range(heads)) for heads_ in held.values())


@pytest.mark.parametrize("heads", [4, 8, 16])
def test_interleaved_logits_kernel_sums_heads_in_registers(heads):
    _tilelang_or_skip()
    from transformers_misa.kernels.scoring import build_weighted_relu_logits

    def source(**variant):
        return build_weighted_relu_logits(heads, 128, fill_future=False, arch="sm_90a", **variant)().get_kernel_source()

    interleaved = source(interleaved=True)
    assert "wgmma" in interleaved and "AllReduce" not in interleaved and "shfl" not in interleaved
    assert "AllReduce" in source(), "the plain layout sums a query's heads across lanes"


@pytest.mark.parametrize("heads", [8, 16])
def test_overlapped_logits_kernel_compiles_for_sm90a(heads):
    """The overlapped driver: a producer warpgroup and two accumulators, tile t+1's wgmma in flight during tile t's
    epilogue."""
    _tilelang_or_skip()
    from transformers_misa.kernels.scoring import build_weighted_relu_logits

    source = build_weighted_relu_logits(heads, 128, fill_future=False, staged_stores=True, interleaved=True,
                                        overlapped=True, num_stages=4, arch="sm_90a")().get_kernel_source()
    assert "__launch_bounds__(384" in source and "wait_wgmma<0>" in source and "tma_store" in source
    assert source.count("wgmma_ss<") >= 2  # one issue per accumulator
    # Each staged store site has a consumer barrier before its shared-memory writes (the previous tile's bulk store
    # may still read them) and one before the store: without the first, 4-head logits came out wrong on an H200.
    assert source.count("__sync_thread_partial(") == 2 * source.count("tma_store_arrive()")
    with pytest.raises(ValueError, match="overlapped driver is for the bf16 dense programs"):
        build_weighted_relu_logits(heads, 128, overlapped=True, fp8=True, arch="sm_90a")


def test_interleaved_layout_refuses_what_it_cannot_hold():
    _tilelang_or_skip()
    from transformers_misa.kernels.scoring import build_weighted_relu_logits

    for variant in (dict(heads=64), dict(heads=64, rows_per_cta=256), dict(heads=32), dict(heads=8, fp8=True),
                    dict(heads=8, capacity=1024)):
        heads = variant.pop("heads")
        with pytest.raises(ValueError, match="interleaved layout"):
            build_weighted_relu_logits(heads, 128, interleaved=True, arch="sm_90a", **variant)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("batch,num_queries,num_keys,heads,pads", [
    (1, 1, 1, 64, [0]),
    (1, 37, 37, 64, [0]),
    (2, 129, 300, 64, [0, 17]),
    (1, 4, 4099, 32, [0]),  # decode-like, T not a multiple of the tile, GLM-5's 32 heads
    (3, 257, 257, 8, [0, 5, 100]),  # routed-head width, scattered stores (257 keys: no 16-byte TMA row stride)
    (2, 100, 1024, 8, [0, 30]),  # routed-head width, staged (TMA) stores, a partial last query block
    (2, 3, 5000, 8, [0, 11]),  # decode, 3 of a 32-row CTA's 4 queries, key tiles split over CTAs
    (3, 1, 3000, 64, [0, 0, 100]),  # decode, one query: a 64-row CTA
    (2, 2, 4099, 16, [0, 5]),  # decode, 2 x 16 heads: a 32-row CTA
])
def test_logits_kernel_matches_reference(batch, num_queries, num_keys, heads, pads):
    from transformers_misa.kernels.scorer import tilelang_token_logits

    q, keys, weights = _inputs(batch, num_queries, num_keys, heads)
    for mask in (None, _padded_causal_mask(batch, num_queries, num_keys, pads)):
        chunk = ChunkMask(mask, slice(0, num_queries), batch, num_queries, num_keys, q.device)
        ours = tilelang_token_logits(q, weights, keys, chunk, 128**-0.5, interleaved=False)  # the plain layout
        ref = reference.reference_token_logits(q, weights, keys, chunk, 128**-0.5)
        _assert_logits_match(ours, ref, tolerance=2e-2)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("batch,num_queries,num_keys,heads,pads", [
    (2, 96, 1024, 8, [0, 30]),  # whole query blocks: interleaved, staged stores
    (1, 64, 1001, 8, [0]),  # interleaved, scattered stores (1001 keys: no 16-byte TMA row stride)
    (1, 160, 4100, 4, [0]),  # 4 heads: 32 queries per block
    (2, 64, 700, 16, [0, 9]),  # 16 heads
    (2, 100, 1024, 8, [0, 30]),  # a partial last block: padded with queries that see nothing
    (1, 12, 512, 8, [0]),  # fewer queries than a block (decode): the plain layout runs instead
    (1, 20, 600, 8, [0]),  # one square block but not a wide one: the square CTAs, padded to two blocks
])
@pytest.mark.parametrize("wide_few_heads", [False, True])
def test_interleaved_logits_match_reference(batch, num_queries, num_keys, heads, pads, wide_few_heads):
    """The interleaved layout in the square CTAs, and (wide_few_heads) in the wide ones over 128 rows per
    warpgroup where a whole wide block fits (8 heads: 32 queries), against the reference."""
    _assert_layout_matches_reference(batch, num_queries, num_keys, heads, pads, wide_few_heads=wide_few_heads)


def _assert_layout_matches_reference(batch, num_queries, num_keys, heads, pads, **layout):
    """The logits and the fused select under the scorer's layout options `layout` (interleaved where it applies)
    against the reference, with and without a padded causal mask."""
    from transformers_misa.kernels.scorer import tilelang_select_tokens, tilelang_token_logits

    q, keys, weights = _inputs(batch, num_queries, num_keys, heads)
    for mask in (None, _padded_causal_mask(batch, num_queries, num_keys, pads)):
        chunk = ChunkMask(mask, slice(0, num_queries), batch, num_queries, num_keys, q.device)
        ours = tilelang_token_logits(q, weights, keys, chunk, 128**-0.5, **layout)
        ref = reference.reference_token_logits(q, weights, keys, chunk, 128**-0.5)
        _assert_logits_match(ours, ref, tolerance=2e-2)
        k = min(256, num_keys)
        picked = tilelang_select_tokens(q, weights, keys, chunk, 128**-0.5, k, **layout)
        _assert_same_selection(picked, reference.top_indices(ref, k), ref, tolerance=5e-2)


OVERLAP_CASES = {  # name -> (heads, program options): the shapes the scorer runs, and the driver's other paths
    "few_heads": (8, dict(fill_future=False, staged_stores=True, interleaved=True)),
    "few_heads_wide": (8, dict(fill_future=False, staged_stores=True, interleaved=True, rows_per_cta=256, block_n=64)),
    "four_heads": (4, dict(fill_future=False, staged_stores=True, interleaved=True)),
    "sixteen_heads": (16, dict(fill_future=False, staged_stores=True, interleaved=True)),
    "dsa64_wide": (64, dict(fill_future=False, rows_per_cta=256, block_n=64)),
    "future_written_split_keys": (32, dict(fill_future=True, key_splits=3)),
}


def _causal_program_operands(batch, num_queries, num_keys, first_key, heads, options, seed, padded_row=False):
    """The logits program's operands for queries at positions first_key.. of the cache (query i sees keys up to
    first_key + i), rows in the interleaved order where `options` take it (whole blocks: pad queries see nothing),
    and the visible positions to compare; `padded_row`: the last sequence left-padded by 7 keys."""
    from transformers_misa.kernels.logits_shapes import interleave_query_rows

    q, keys, weights = _inputs(batch, num_queries, num_keys, heads, seed=seed)
    ke = (torch.arange(num_queries, device="cuda", dtype=torch.int32) + first_key + 1).clamp_max(num_keys)
    ke = ke.expand(batch, -1).contiguous()
    ks = torch.zeros_like(ke)
    if padded_row:
        ks[-1] = 7
    q_rows = q.reshape(batch, num_queries * heads, 128)
    if options.get("interleaved"):
        rows = options.get("rows_per_cta", 128)
        pad = -num_queries % (rows // heads)
        q_rows = interleave_query_rows(torch.nn.functional.pad(q, (0, 0, 0, 0, 0, pad)).reshape(batch, -1, 128), heads,
                                       rows)
        weights, ks, ke = (torch.nn.functional.pad(x, (0, 0) * (x.dim() - 2) + (0, pad)) for x in (weights, ks, ke))
    args = (q_rows.contiguous(), keys, weights.contiguous(), ks.contiguous(), ke.contiguous())
    visible = torch.arange(num_keys, device="cuda") < ke.unsqueeze(-1)
    if options["fill_future"]:
        visible = torch.ones_like(visible)
    return args, visible


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("driver", [{}, {"store_buffers": 2}, {"explicit_wgmma_wait": False}],
                         ids=["default", "two-store-buffers", "ptxas-wait"])
@pytest.mark.parametrize("stages", [2, 4])
@pytest.mark.parametrize("case", sorted(OVERLAP_CASES))
@pytest.mark.parametrize("batch,num_queries,num_keys,first_key", [
    (1, 256, 1280, 1024),  # causal queries at the end of the cache: 9 or 10 key tiles (odd and even pairs)
    (2, 100, 700, 600),  # a partial query block, keys not a multiple of the tile
    (2, 64, 900, 0),  # early queries see a single tile
])
def test_overlapped_logits_match_the_pipelined_program(driver, stages, case, batch, num_queries, num_keys, first_key):
    """Same matmul, same epilogue, another schedule: the same -inf positions and the same logits (up to nvcc's
    contraction of multiply-adds, which may differ between the two programs). `driver`: the overlapped program's own
    options (two shared-memory buffers for the staged stores; the wgmma wait left to ptxas, the program before)."""
    from transformers_misa.kernels.scoring import build_weighted_relu_logits

    heads, options = OVERLAP_CASES[case]
    if "store_buffers" in driver and not options.get("staged_stores"):
        pytest.skip("two store buffers are for the staged stores")
    args, visible = _causal_program_operands(batch, num_queries, num_keys, first_key, heads, options, seed=3,
                                             padded_row=True)
    pipelined = build_weighted_relu_logits(heads, 128, **options)()(*args)
    overlapped = build_weighted_relu_logits(heads, 128, num_stages=stages, overlapped=True, **options,
                                            **driver)()(*args)
    assert torch.equal(torch.isinf(overlapped[visible]), torch.isinf(pipelined[visible]))
    finite = visible & torch.isfinite(pipelined)
    torch.testing.assert_close(overlapped[finite], pipelined[finite], rtol=1e-5, atol=1e-4)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("case", ["few_heads_wide", "dsa64_wide", "future_written_split_keys"])
@pytest.mark.parametrize("batch,num_queries,num_keys,first_key", [(1, 300, 1280, 980), (2, 100, 700, 600)])
def test_longest_first_logits_match_the_forward_order(case, batch, num_queries, num_keys, first_key):
    """The query blocks taken last to first (`longest_first`) write the same logits, for the overlapped driver
    (the scorer's prefill shapes) and TileLang's pipeline with keys split over CTAs."""
    from transformers_misa.kernels.scoring import build_weighted_relu_logits

    heads, options = OVERLAP_CASES[case]
    options = dict(options, overlapped=options.get("key_splits", 1) == 1)
    args, visible = _causal_program_operands(batch, num_queries, num_keys, first_key, heads, options, seed=4)
    forward = build_weighted_relu_logits(heads, 128, **options)()(*args)
    longest_first = build_weighted_relu_logits(heads, 128, longest_first=True, **options)()(*args)
    assert torch.equal(longest_first[visible], forward[visible])


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("batch,num_queries,num_keys,pads", [
    (2, 96, 1024, [0, 30]),  # whole wide blocks (8 queries of 32 heads)
    (1, 100, 1500, [0]),  # a partial last block: padded with queries that see nothing
    (2, 5, 4100, [0, 7]),  # too few queries for a wide block: the plain layout
    (1, 40, 70000, [0]),  # few CTAs: keys split over 128-row CTAs, where 32 heads keep the plain layout
])
@pytest.mark.parametrize("interleaved_many_heads", [True, False])
def test_many_heads_layouts_match_reference(batch, num_queries, num_keys, pads, interleaved_many_heads):
    """GLM-5's 32 heads interleaved in the wide CTAs (interleaved_many_heads, the default) and in their plain layout
    (the kept variant) against the reference."""
    _assert_layout_matches_reference(batch, num_queries, num_keys, 32, pads,
                                     interleaved_many_heads=interleaved_many_heads)


@gpu
@pytest.mark.gpu
def test_logits_split_for_the_tma_limit_match(monkeypatch):
    """Calls past the TMA descriptor's element limit are split over the queries; the logits do not change."""
    from transformers_misa.kernels import scorer

    q, keys, weights = _inputs(2, 300, 5000, 8, seed=9)
    chunk = ChunkMask(None, slice(0, 300), 2, 300, 5000, q.device)
    whole = scorer.tilelang_token_logits(q, weights, keys, chunk, 128**-0.5)
    monkeypatch.setattr(scorer, "MAX_TMA_ELEMENTS", 5000 * 70)
    split = scorer.tilelang_token_logits(q, weights, keys, chunk, 128**-0.5)
    torch.testing.assert_close(split, whole)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("batch,num_queries,num_keys,heads,pads", [
    (2, 129, 300, 64, [0, 17]),
    (1, 4, 4099, 32, [0]),
    (2, 100, 1024, 8, [0, 30]),  # staged stores
])
def test_fp8_logits_kernel_matches_reference_on_fp8_inputs(batch, num_queries, num_keys, heads, pads):
    """Inputs rounded to FP8 (as the indexer hands them over): the FP8 kernel's products are exact and it matches the
    fp32 reference up to the FP8 tensor cores' accumulation, which keeps fewer bits than fp32 (on the H100: max abs
    error 0.0046 at mean |logit| 4.4, where the bf16 kernel on the same inputs is off by 6e-6)."""
    from transformers_misa.kernels.scorer import tilelang_token_logits
    from transformers_misa.ops.blocks import fp8_e4m3_roundtrip

    q, keys, weights = _inputs(batch, num_queries, num_keys, heads, seed=3)
    q, keys = fp8_e4m3_roundtrip(q), fp8_e4m3_roundtrip(keys)
    for mask in (None, _padded_causal_mask(batch, num_queries, num_keys, pads)):
        chunk = ChunkMask(mask, slice(0, num_queries), batch, num_queries, num_keys, q.device)
        ours = tilelang_token_logits(q, weights, keys, chunk, 128**-0.5, fp8=True)
        ref = reference.reference_token_logits(q, weights, keys, chunk, 128**-0.5)
        _assert_logits_match(ours, ref, tolerance=1e-2)
