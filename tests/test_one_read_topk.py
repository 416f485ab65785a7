"""The one-read top-k: bounds that let the radix top-k read a row once (`topk.build_radix_topk` with `bounded` or
`sample_every`, the latter the prefill default), their PyTorch models (`topk_bounds`) and the fused select with the
sampled bound in every program shape. Each selects exactly the plain two-pass program's keys."""

from __future__ import annotations

import pytest
import torch

from kernel_helpers import (_assert_same_visible_columns, _inputs, _padded_causal_mask,  # this folder's kernel test
                            _tilelang_or_skip, gpu)  # helpers
from transformers_misa.ops.masks import ChunkMask


def test_radix_topk_bounded_compiles_and_takes_the_bounds():
    """`bounded=True` (opt-in): the vector programs of both scorer shapes take Bounds and compile; other programs
    refuse it with a message naming what it needs."""
    _tilelang_or_skip()
    from transformers_misa.kernels.topk import FEW_ROWS_VECTOR_SHAPE, MANY_ROWS_VECTOR_SHAPE, build_radix_topk

    for shape in (MANY_ROWS_VECTOR_SHAPE, FEW_ROWS_VECTOR_SHAPE):
        program = build_radix_topk(2048, arch="sm_90a", bounded=True, **dict(shape, sample_every=0))()
        source = program.get_kernel_source()
        assert "const float* __restrict__ Bounds" in source and "reads_again" in source
    for options in (dict(), dict(vector=4, phase_clock=True), dict(vector=4, value_filter=False)):
        with pytest.raises(ValueError, match="bounded is for the vector program"):
            build_radix_topk(2048, bounded=True, **options)


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
    spread[0, ::4] = torch.arange(1000).float()  # one large value per group of 4
    assert group_maxima_bounds(spread, torch.tensor([4000]), 1000, 4)[0] == 0.0  # the k-th value itself


def test_group_maxima_are_the_maxima_of_consecutive_columns_before_each_end():
    """`group_maxima`: each group of G consecutive columns' maximum, the last group short; columns at or past a row's
    end count as -inf."""
    pytest.importorskip("tilelang", reason="TileLang is not installed")
    from transformers_misa.kernels.topk_bounds import group_maxima

    row = torch.arange(40, dtype=torch.float32).flip(0).reshape(1, 40)  # 39 .. 0
    assert group_maxima(row, torch.tensor([40]), 16).tolist() == [[39, 23, 7]]
    assert group_maxima(row, torch.tensor([20]), 8).tolist() == [[39, 31, 23, float("-inf"), float("-inf")]]
    assert group_maxima(row, torch.tensor([0]), 40).tolist() == [[float("-inf")]]
    with pytest.raises(ValueError, match="at least 1"):
        group_maxima(row, torch.tensor([40]), 0)


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
    """`sample_every` needs no input beyond the plain vector program's (Scores, Ends); refused where the loads do not
    tile a 32-byte sector or there are no vector loads."""
    _tilelang_or_skip()
    from transformers_misa.kernels.topk import FEW_ROWS_VECTOR_SHAPE, MANY_ROWS_VECTOR_SHAPE, build_radix_topk

    for shape, sample_every in ((MANY_ROWS_VECTOR_SHAPE, 16), (FEW_ROWS_VECTOR_SHAPE, 16),
                                (MANY_ROWS_VECTOR_SHAPE, 32)):
        program = build_radix_topk(2048, arch="sm_90a", **dict(shape, sample_every=sample_every))()
        source = program.get_kernel_source()
        assert "Bounds" not in source and "(8192 <= end)" in source
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
    value (the buffer overflows), one above the k-th value (dropped), -inf; heavy ties; rows shorter than k."""
    from transformers_misa.kernels.topk import FEW_ROWS_VECTOR_SHAPE, MANY_ROWS_VECTOR_SHAPE, build_radix_topk
    from transformers_misa.kernels.topk_bounds import group_maxima_bounds

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
    _assert_same_visible_columns(got, expected, ends, k)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("shape", ["many", "few"])
@pytest.mark.parametrize("sample_every", [16, 32])
def test_radix_topk_sampled_bound_selects_the_same_set(shape, sample_every):
    """`sample_every` (the bound from a sample of the row itself) selects exactly the plain program's set: rows read
    once, rows whose sample holds their largest values (the bound too high: the first pass again, unbounded), rows
    whose values crowd one first-level bin (more reach the bound than the buffer holds: read again), heavy ties,
    rows too short to sample, ends inside a sampled sector."""
    from transformers_misa.kernels.topk import FEW_ROWS_VECTOR_SHAPE, MANY_ROWS_VECTOR_SHAPE, build_radix_topk
    from transformers_misa.kernels.topk_bounds import sampled_bounds

    options = dict(MANY_ROWS_VECTOR_SHAPE if shape == "many" else FEW_ROWS_VECTOR_SHAPE, sample_every=sample_every)
    width, k = 70000, 2048
    generator = torch.Generator(device="cuda").manual_seed(3 + len(shape))
    scores = torch.randn(10, width, device="cuda", generator=generator)
    columns = torch.arange(width, device="cuda")
    sampled = columns % (8 * sample_every) < 8  # the sampled sectors (8 floats each)
    scores[1] = torch.where(sampled, scores[1] + 10, scores[1])  # the sample holds the row's largest values
    scores[2] = -1 - torch.rand(width, device="cuda", generator=generator)  # one first-level bin holds 1/8 of them
    scores[3] = (scores[3] * 4).round()  # heavy ties at the k-th value
    ends = torch.tensor([width, 65536, 48000, 60000, 8191, 8192, 2047, 40004, 33000, 70000], device="cuda",
                        dtype=torch.int32)
    garbage = columns >= ends.unsqueeze(-1)
    scores = scores.masked_fill(garbage, 1e30)  # never read
    truth = scores.masked_fill(garbage, float("-inf"))
    bounds = sampled_bounds(truth, ends, k, sample_every)
    kept = (truth >= bounds.unsqueeze(-1)).sum(-1)
    assert kept[1] < k and kept[2] > 4096 and k <= kept[0] <= 4096  # the cases above do arise
    assert bounds[4] == float("-inf") and bounds[6] == float("-inf") and bounds[5] > float("-inf")
    expected = build_radix_topk(k)()(scores, ends)
    got = build_radix_topk(k, **options)()(scores.view(10, -1, options["vector"]), ends)
    _assert_same_visible_columns(got, expected, ends, k)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("batch,num_queries,num_keys,heads,pads", [
    (1, 8448, 20000, 8, [0]),  # MISA-8's prefill programs (interleaved, 256-row CTAs, overlapped, staged stores)
    (1, 1100, 30000, 64, [0]),  # DSA-64's (256-row CTAs, overlapped)
    (1, 1200, 40000, 8, [0]),  # too few queries to fill the GPU: key tiles split over CTAs
    (2, 700, 30000, 64, [0, 500]),  # the same with 64 heads, left padding
    (1, 2100, 20000, 32, [0]),  # GLM-5's 32 heads; rows of 2K-20K keys, some too short to sample
    (8, 4, 30000, 8, [0] * 8),  # a decode step (4 speculative queries): the decode programs, wide top-k CTAs
])
@pytest.mark.parametrize("sample_every", [0, 16, 32])
def test_fused_select_with_a_one_read_bound_selects_the_same(batch, num_queries, num_keys, heads, pads, sample_every):
    """The default fused select (the sampled bound for a prefill's rows, none for a decode step's) selects exactly the
    keys of the same select with the bound forced off (0) or on (1/16, 1/32 of each row; the decode programs' few-row
    shape included), every row seeing at least k keys (no fill-up columns, whose choice is the atomics')."""
    from transformers_misa.kernels.scorer import tilelang_select_tokens

    q, keys, weights = _inputs(batch, num_queries, num_keys, heads, seed=11)
    mask = _padded_causal_mask(batch, num_queries, num_keys, pads)
    chunk = ChunkMask(mask, slice(0, num_queries), batch, num_queries, num_keys, q.device)
    ours = tilelang_select_tokens(q, weights, keys, chunk, 128**-0.5, 2048)
    once = tilelang_select_tokens(q, weights, keys, chunk, 128**-0.5, 2048,
                                  topk_options=dict(sample_every=sample_every))
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
