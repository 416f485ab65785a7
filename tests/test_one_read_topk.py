"""The one-read top-k: bounds that let the radix top-k read a row once (`topk.build_radix_topk` with `bounded`,
`maxima_group` or `sample_every`), the logits program's group maxima (`group_max`), their PyTorch models
(`topk_bounds`) and the fused select with each source of the bound. All opt-in paths; each selects exactly the
default's keys."""

from __future__ import annotations

import pytest
import torch

from kernel_helpers import _inputs, _padded_causal_mask, _tilelang_or_skip, gpu  # this folder's kernel test helpers
from transformers_misa.ops.blocks import ChunkMask


@pytest.mark.parametrize("heads,wide", [(8, True), (64, False)])
def test_group_maxima_compile_beside_the_logits(heads, wide):
    """`group_max` (opt-in): the MISA-8 and DSA-64 prefill programs also write each query's group maxima (a max over
    the lanes holding a group's keys: two shuffle levels for groups of 8, not three); MISA-8's staged tile goes out
    in one bulk store beside the logits'. Refused for FP8, the candidate variant, two store buffers, other groups."""
    _tilelang_or_skip()
    from transformers_misa.kernels.scorer import logits_options
    from transformers_misa.kernels.scoring import build_weighted_relu_logits

    options = logits_options(heads, 1, 65536, 65536, 132, False, interleaved=True, wide_few_heads=wide)
    source = build_weighted_relu_logits(heads, 128, arch="sm_90a", group_max=8, **options)().get_kernel_source()
    assert "AllReduce<tl::MaxOp, 16, 4," in source and "AllReduce<tl::MaxOp, 32," not in source
    if wide:  # MISA-8: staged; overlapped: both bulk stores in flight before one wait
        assert "tma_store(GroupMax_desc" in source and "GroupMax[" not in source
        logits_store = source.index("tma_store(Logits_desc")
        assert "tma_store_wait" not in source[logits_store : source.index("tma_store(GroupMax_desc", logits_store)]
    else:
        assert "float* __restrict__ GroupMax" in source
    for bad in (dict(fp8=True), dict(capacity=1024, fill_future=False, staged_stores=False), dict(group_max=12),
                dict(overlapped=True, store_buffers=2)):
        with pytest.raises(ValueError, match="group_max"):
            build_weighted_relu_logits(heads, 128, **{"group_max": 8, **bad})


@pytest.mark.parametrize("heads,num_queries,num_keys", [
    (8, 1200, 40000),  # MISA-8, too few queries to fill the GPU: 128-row CTAs, keys split, pipelined driver
    (64, 300, 9000),  # DSA-64's the same
    (8, 4, 30000),  # a decode step: 32-row CTAs
    (32, 2100, 20000),  # GLM-5's 32 heads: 128-row CTAs, overlapped, plain layout
])
def test_group_maxima_compile_for_the_other_program_shapes(heads, num_queries, num_keys):
    """`group_max` in every other program shape the one-read select reaches (each lays the logits out its own way;
    TileLang's layout inference refused a first form of the group reduction in all of these)."""
    _tilelang_or_skip()
    from transformers_misa.kernels.scorer import logits_options
    from transformers_misa.kernels.scoring import build_weighted_relu_logits

    options = logits_options(heads, 1, num_queries, num_keys, 132, False, interleaved=True, wide_few_heads=True)
    source = build_weighted_relu_logits(heads, 128, arch="sm_90a", group_max=8, **options)().get_kernel_source()
    assert "GroupMax" in source and "AllReduce<tl::MaxOp" in source


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("heads,num_queries,num_keys,pads", [(8, 1200, 40000, [0]), (64, 300, 9000, [0, 700])])
@pytest.mark.parametrize("group", [8, 16])
def test_group_maxima_are_the_largest_visible_logit_of_each_group(heads, num_queries, num_keys, pads, group):
    """The logits program's group maxima equal the maxima of its own logits over each group of `group` keys a query
    can see (-inf for groups with none; groups as `topk_bounds.group_maxima` takes them), for every group before the
    query's end."""
    from transformers_misa.kernels.scorer import _logits
    from transformers_misa.kernels.topk_bounds import group_maxima

    batch = len(pads)
    q, keys, weights = _inputs(batch, num_queries, num_keys, heads, seed=5)
    mask = _padded_causal_mask(batch, num_queries, num_keys, pads)
    ks, ke, _ = ChunkMask(mask, slice(0, num_queries), batch, num_queries, num_keys, q.device).key_range
    logits, maxima = _logits(q, weights, keys, ks, ke, 128**-0.5, fill_future=False, group_max=group)
    columns = torch.arange(num_keys, device="cuda")
    visible = (columns >= ks.unsqueeze(-1)) & (columns < ke.unsqueeze(-1))
    expected = group_maxima(logits.masked_fill(~visible, float("-inf")).view(-1, num_keys), ke.view(-1),
                            group).view(batch, num_queries, -1)
    assert maxima.shape[-1] % 4 == 0 and maxima.shape[-1] >= expected.shape[-1]  # padded for a bulk store's stride
    maxima = maxima[..., : expected.shape[-1]]
    written = torch.arange(expected.shape[-1], device="cuda") < (ke.unsqueeze(-1) + group - 1) // group
    assert torch.equal(maxima[written], expected[written])


def test_radix_topk_bounded_compiles_and_takes_the_bounds():
    """`bounded=True` (opt-in): the vector programs of both scorer shapes take Bounds and compile; other programs
    refuse it with a message naming what it needs."""
    _tilelang_or_skip()
    from transformers_misa.kernels.topk import FEW_ROWS_VECTOR_SHAPE, MANY_ROWS_VECTOR_SHAPE, build_radix_topk

    for shape in (MANY_ROWS_VECTOR_SHAPE, FEW_ROWS_VECTOR_SHAPE):
        source = build_radix_topk(2048, arch="sm_90a", bounded=True, **dict(shape, sample_every=0))().get_kernel_source()
        assert "const float* __restrict__ Bounds" in source and "reads_again" in source
    for options in (dict(), dict(vector=4, phase_clock=True), dict(vector=4, value_filter=False)):
        with pytest.raises(ValueError, match="bounded is for the vector program"):
            build_radix_topk(2048, bounded=True, **options)
    source = build_radix_topk(2048, arch="sm_90a", **dict(MANY_ROWS_VECTOR_SHAPE, sample_every=0, maxima_group=8)
                              )().get_kernel_source()
    assert "const float* __restrict__ GroupMax" in source and "Bounds" not in source  # the bound found in the program


def test_group_maxima_bounds_stay_at_or_below_the_kth_value():
    """The bound is the k-th largest of the groups' maxima before each row's end: at most the row's k-th value, at
    least k values reach it, -inf for rows of fewer than k groups; exact on a row whose k largest lie one per group."""
    pytest.importorskip("tilelang", reason="TileLang is not installed")
    from transformers_misa.kernels.topk_bounds import group_maxima_bounds

    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(4, 5000, generator=generator)
    ends = torch.tensor([5000, 4099, 2000, 4001])
    bounds = group_maxima_bounds(scores, ends, 1000, 4)
    for row, end in enumerate(ends.tolist()):
        visible = scores[row, :end]
        if -(-end // 4) < 1000:
            assert bounds[row] == float("-inf")
            continue
        assert bounds[row] <= visible.topk(1000).values[-1] and int((visible >= bounds[row]).sum()) >= 1000
    spread = torch.full((1, 4000), -1.0)
    group = torch.arange(1000)  # group 4s + j of 4 starts at column 16s + 2j (`group_maxima`)
    spread[0, group // 4 * 16 + group % 4 * 2] = group.float()  # one large value per group of 4
    assert group_maxima_bounds(spread, torch.tensor([4000]), 1000, 4)[0] == 0.0  # the k-th value itself


def test_group_maxima_take_half_of_each_group_from_each_half_slab():
    """`group_maxima`'s groups are the logits program's: group (16 / G)s + j holds columns 16s + 8h + (G / 2)j + r
    (h < 2, r < G / 2); 16 is plain consecutive columns; columns at or past a row's end count as -inf."""
    pytest.importorskip("tilelang", reason="TileLang is not installed")
    from transformers_misa.kernels.topk_bounds import group_maxima

    row = torch.arange(40, dtype=torch.float32).reshape(1, 40)
    assert group_maxima(row, torch.tensor([40]), 8).tolist() == [[11, 15, 27, 31, 35]]
    assert group_maxima(row, torch.tensor([6]), 8).tolist() == [[3, 5] + [float("-inf")] * 3]
    assert group_maxima(row, torch.tensor([40]), 16).tolist() == [[15, 31, 39]]
    assert group_maxima(row, torch.tensor([40]), 2)[0, :8].tolist() == [8, 9, 10, 11, 12, 13, 14, 15]
    with pytest.raises(ValueError, match="2, 4, 8 or 16"):
        group_maxima(row, torch.tensor([40]), 32)


def test_sampled_bounds_keep_about_the_margin_times_k():
    """`sampled_bounds` (the program's `sample_every` bound, in PyTorch) samples one 32-byte sector of every S, takes
    the first-level bin floor of the ceil(SAMPLE_MARGIN·k/S)-th largest sample: on random rows it keeps between k and
    the 4096-value buffer; -inf for rows shorter than SAMPLE_MIN_KEYS_PER_K·k; a sample holding the row's largest
    values gives a bound above the k-th value (the program then reads the row unbounded)."""
    pytest.importorskip("tilelang", reason="TileLang is not installed")
    from transformers_misa.kernels.topk import SAMPLE_MIN_KEYS_PER_K
    from transformers_misa.kernels.topk_bounds import sampled_bounds

    generator = torch.Generator().manual_seed(1)
    scores = torch.randn(5, 65536, generator=generator)
    ends = torch.tensor([65536, 40000, 20000, SAMPLE_MIN_KEYS_PER_K * 2048, SAMPLE_MIN_KEYS_PER_K * 2048 - 1])
    bounds = sampled_bounds(scores, ends, 2048, 16)
    visible = torch.arange(65536) < ends.unsqueeze(-1)
    kept = ((scores >= bounds.unsqueeze(-1)) & visible).sum(-1)
    assert bool(((kept[:4] >= 2048) & (kept[:4] <= 4096)).all()) and bounds[4] == float("-inf"), kept
    lifted = torch.where(torch.arange(65536) % 128 < 8, scores[0] + 10, scores[0]).unsqueeze(0)
    assert sampled_bounds(lifted, ends[:1], 2048, 16)[0] > lifted[0].topk(2048).values[-1]


def test_sampled_bound_program_compiles_with_the_plain_signature():
    """`sample_every` needs no input beyond the plain vector program's (Scores, Ends); it is one source of the bound
    (not with `maxima_group`)."""
    _tilelang_or_skip()
    from transformers_misa.kernels.topk import FEW_ROWS_VECTOR_SHAPE, MANY_ROWS_VECTOR_SHAPE, build_radix_topk

    for shape in (MANY_ROWS_VECTOR_SHAPE, FEW_ROWS_VECTOR_SHAPE):
        source = build_radix_topk(2048, arch="sm_90a", **dict(shape, sample_every=16))().get_kernel_source()
        assert "Bounds" not in source and "GroupMax" not in source and "(8192 <= end)" in source
    with pytest.raises(ValueError, match="two sources of the bound"):
        build_radix_topk(2048, **dict(MANY_ROWS_VECTOR_SHAPE, sample_every=16, maxima_group=8))
    with pytest.raises(ValueError, match="32-byte sectors"):
        build_radix_topk(2048, **dict(MANY_ROWS_VECTOR_SHAPE, sample_every=16, vector=16))
    with pytest.raises(ValueError, match="vector program"):
        build_radix_topk(2048, sample_every=16)  # no vector loads


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("shape", ["many", "few"])
def test_radix_topk_bounded_selects_the_same_set_with_any_bound(shape):
    """`bounded=True` selects exactly the plain program's set whatever the bound: the group-maxima bound (rows read
    once, or read again where more values reach it than the buffer holds), the k-th value itself, a bound below every
    value (the buffer overflows), one above the k-th value (dropped), -inf; heavy ties; rows shorter than k. So does
    `maxima_group`, which finds its bound from the rows' group maxima."""
    from transformers_misa.kernels.topk import FEW_ROWS_VECTOR_SHAPE, MANY_ROWS_VECTOR_SHAPE, build_radix_topk
    from transformers_misa.kernels.topk_bounds import group_maxima, group_maxima_bounds

    options = dict(MANY_ROWS_VECTOR_SHAPE if shape == "many" else FEW_ROWS_VECTOR_SHAPE, sample_every=0)
    width, k = 70000, 2048
    generator = torch.Generator(device="cuda").manual_seed(len(shape))
    scores = torch.randn(12, width, device="cuda", generator=generator)
    scores[3] = (scores[3] * 4).round()  # heavy ties at the k-th value
    ends = torch.tensor([width, 65536, 48000, 60000, 40000, 33000, 70000, 70000, 70000, 70000, 2047, 9000],
                        device="cuda", dtype=torch.int32)
    garbage = torch.arange(width, device="cuda") >= ends.unsqueeze(-1)
    scores = scores.masked_fill(garbage, 1e30)  # never read
    bounds = group_maxima_bounds(scores.masked_fill(garbage, float("-inf")), ends, k, 16)
    truth = scores.masked_fill(garbage, float("-inf"))
    bounds[6] = truth[6].topk(k).values[-1]  # exactly the k-th value
    bounds[7] = -1e9  # below every value: everything kept, the buffer overflows
    bounds[8] = truth[8].topk(k).values[-1] + 0.01  # above the k-th value: fewer than k reach it, dropped
    bounds[9] = float("-inf")
    expected = build_radix_topk(k)()(scores, ends)
    got = build_radix_topk(k, bounded=True, **options)()(scores.view(12, -1, options["vector"]), ends,
                                                         bounds.contiguous())
    # the bound found by the program from the rows' group maxima (`maxima_group`), as the logits program writes them
    maxima = group_maxima(truth, ends, 8)
    from_maxima = build_radix_topk(k, maxima_group=8, **options)()(scores.view(12, -1, options["vector"]), ends,
                                                                    maxima)
    for row, end in enumerate(ends.tolist()):
        for picked in (got, from_maxima):
            assert {c for c in picked[row].tolist() if c < end} == {c for c in expected[row].tolist() if c < end}, row
            assert len(set(picked[row].tolist())) == k, f"row {row}: repeated index"


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("shape", ["many", "few"])
def test_radix_topk_sampled_bound_selects_the_same_set(shape):
    """`sample_every` (the bound from a sample of the row itself) selects exactly the plain program's set: rows read
    once, rows whose sample holds their largest values (the bound too high: the first pass again, unbounded), rows
    whose values crowd one first-level bin (more reach the bound than the buffer holds: read again), heavy ties,
    rows too short to sample, ends inside a sampled sector."""
    from transformers_misa.kernels.topk import FEW_ROWS_VECTOR_SHAPE, MANY_ROWS_VECTOR_SHAPE, build_radix_topk
    from transformers_misa.kernels.topk_bounds import sampled_bounds

    options = dict(MANY_ROWS_VECTOR_SHAPE if shape == "many" else FEW_ROWS_VECTOR_SHAPE, sample_every=16)
    width, k = 70000, 2048
    generator = torch.Generator(device="cuda").manual_seed(3 + len(shape))
    scores = torch.randn(10, width, device="cuda", generator=generator)
    columns = torch.arange(width, device="cuda")
    sampled = columns % (8 * 16) < 8
    scores[1] = torch.where(sampled, scores[1] + 10, scores[1])  # the sample holds the row's largest values
    scores[2] = -1 - torch.rand(width, device="cuda", generator=generator)  # one first-level bin holds 1/8 of them
    scores[3] = (scores[3] * 4).round()  # heavy ties at the k-th value
    ends = torch.tensor([width, 65536, 48000, 60000, 8191, 8192, 2047, 40004, 33000, 70000], device="cuda",
                        dtype=torch.int32)
    garbage = columns >= ends.unsqueeze(-1)
    scores = scores.masked_fill(garbage, 1e30)  # never read
    truth = scores.masked_fill(garbage, float("-inf"))
    bounds = sampled_bounds(truth, ends, k, 16)
    kept = (truth >= bounds.unsqueeze(-1)).sum(-1)
    assert kept[1] < k and kept[2] > 4096 and k <= kept[0] <= 4096  # the cases above do arise
    assert bounds[4] == float("-inf") and bounds[6] == float("-inf") and bounds[5] > float("-inf")
    expected = build_radix_topk(k)()(scores, ends)
    got = build_radix_topk(k, **options)()(scores.view(10, -1, options["vector"]), ends)
    for row, end in enumerate(ends.tolist()):
        assert {c for c in got[row].tolist() if c < end} == {c for c in expected[row].tolist() if c < end}, row
        assert len(set(got[row].tolist())) == k, f"row {row}: repeated index"


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("batch,num_queries,num_keys,heads,pads", [
    (1, 8448, 20000, 8, [0]),  # MISA-8's prefill programs (interleaved, 256-row CTAs, overlapped, staged stores)
    (1, 1100, 30000, 64, [0]),  # DSA-64's (256-row CTAs, overlapped)
    (1, 1200, 40000, 8, [0]),  # too few queries to fill the GPU: key tiles split over CTAs
    (2, 700, 30000, 64, [0, 500]),  # the same with 64 heads, left padding (groups before it hold -inf)
    (1, 2100, 20000, 32, [0]),  # GLM-5's 32 heads; rows of ~18K-20K keys: about as many groups as k
    (8, 4, 30000, 8, [0] * 8),  # a decode step (4 speculative queries): the decode programs, wide top-k CTAs
])
@pytest.mark.parametrize("bound", [dict(maxima_group=8), dict(maxima_group=16),
                                   dict(topk_options=dict(sample_every=16))], ids=["maxima8", "maxima16", "sampled16"])
def test_fused_select_with_a_one_read_bound_selects_the_same(batch, num_queries, num_keys, heads, pads, bound):
    """The one-read top-k's bounds (`maxima_group`: the logits program's group maxima; `sample_every`: a sample of
    each row, the decode programs' few-row shape included): exactly the default fused select's keys (every row sees
    at least k keys: no fill-up columns, whose choice is the atomics')."""
    from transformers_misa.kernels.scorer import tilelang_select_tokens

    q, keys, weights = _inputs(batch, num_queries, num_keys, heads, seed=11)
    mask = _padded_causal_mask(batch, num_queries, num_keys, pads)
    chunk = ChunkMask(mask, slice(0, num_queries), batch, num_queries, num_keys, q.device)
    ours = tilelang_select_tokens(q, weights, keys, chunk, 128**-0.5, 2048)
    once = tilelang_select_tokens(q, weights, keys, chunk, 128**-0.5, 2048, **bound)
    assert torch.equal(once.sort(-1).values, ours.sort(-1).values)


def test_order_keys_and_lowest_values_invert_each_other():
    """`topk_bounds.order_keys` orders as the floats do (-inf lowest, -0.0 and +0.0 one key) and
    `lowest_values_with_keys` maps each key back to its float (key 0: -inf), as the program's pair does."""
    pytest.importorskip("tilelang", reason="TileLang is not installed")
    from transformers_misa.kernels.topk_bounds import lowest_values_with_keys, order_keys

    values = torch.tensor([float("-inf"), -3.5, -1e-30, -0.0, 0.0, 1e-30, 2.25, float("inf")])
    keys = order_keys(values)
    assert bool((keys[1:] >= keys[:-1]).all()) and keys[3] == keys[4] == 2**31
    assert torch.equal(lowest_values_with_keys(keys), values.masked_fill(values == 0, 0.0))
    assert lowest_values_with_keys(torch.tensor([0])).item() == float("-inf")
