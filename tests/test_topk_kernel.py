"""The radix-select top-k program (kernels/topk.py): compiled on the CPU for sm_90a, and on a Hopper GPU against
torch.topk over parametrised rows (ragged ends, ties, garbage past the ends, every build variant)."""

from __future__ import annotations

import re

import pytest
import torch

from conftest import exact_fraction
from kernel_helpers import _changed_lines, _tilelang_or_skip, gpu  # this folder's kernel test helpers


@pytest.mark.parametrize("k,unroll", [(2048, 4), (8192, 4), (2048, 8)])
def test_radix_topk_compiles_for_sm90a(k, unroll):
    _tilelang_or_skip()
    from transformers_misa.kernels.topk import build_radix_topk

    source = build_radix_topk(k, unroll=unroll, arch="sm_90a")().get_kernel_source()
    assert "AtomicAdd" in source and "__syncthreads" in source
    loads = rf"for \(int (j\w*) = 0; \1 < {unroll}; \+\+\1\) {{\s*values\[\1\] = Scores"
    assert re.search(loads, source), "each thread's row loads come in groups of `unroll`"


def test_radix_topk_vector_loads_compile_to_16_byte_loads():
    _tilelang_or_skip()
    from transformers_misa.kernels.topk import build_radix_topk

    source = build_radix_topk(2048, vector=4, unroll=2, min_ctas_per_sm=4, arch="sm_90a")().get_kernel_source()
    assert re.search(r"\*\(float4\*\)\(values \+ .*\) = \*\(float4\*\)\(Scores", source), "no 16-byte row loads"
    with pytest.raises(ValueError, match="with_keys"):
        build_radix_topk(2048, vector=4, with_keys=True)


def test_radix_topk_compact_second_pass_and_bins_in_registers():
    """compact_second_pass: a step's passing values as a bit mask, visited lowest bit first; bins_in_registers: the
    bin search reads a thread's counts from shared memory once per level. Both off by default."""
    _tilelang_or_skip()
    from transformers_misa.kernels.topk import build_radix_topk

    default = build_radix_topk(2048, vector=4, unroll=1, arch="sm_90a")().get_kernel_source()
    compact = build_radix_topk(2048, vector=4, unroll=1, compact_second_pass=True, bins_in_registers=True,
                               arch="sm_90a")().get_kernel_source()
    assert "__ffs" in compact and "__ffs" not in default
    assert "thread_bins" in compact and "thread_bins" not in default
    with pytest.raises(ValueError, match="compact_second_pass"):
        build_radix_topk(2048, with_keys=True, compact_second_pass=True)


def test_radix_topk_longest_first_takes_the_rows_last_to_first():
    """`longest_first` changes only which row a CTA takes (every changed line indexes by the block)."""
    _tilelang_or_skip()
    from transformers_misa.kernels.topk import MANY_ROWS_VECTOR_SHAPE, build_radix_topk

    forward = build_radix_topk(2048, arch="sm_90a", **MANY_ROWS_VECTOR_SHAPE)().get_kernel_source()
    longest_first = build_radix_topk(2048, arch="sm_90a", longest_first=True,
                                     **MANY_ROWS_VECTOR_SHAPE)().get_kernel_source()
    changed = _changed_lines(forward, longest_first)
    assert changed and all("blockIdx.x" in line for line in changed)
    assert all("(int64_t)rows)" in line for line in changed if line.startswith("+"))


def test_radix_topk_phase_clock_marks_each_phase():
    """phase_clock (the probe): one SM-clock read per phase mark, behind a barrier; only for the vector program."""
    _tilelang_or_skip()
    from transformers_misa.kernels.topk import PHASE_MARKS, build_radix_topk

    source = build_radix_topk(2048, vector=4, unroll=1, phase_clock=True, arch="sm_90a")().get_kernel_source()
    assert source.count("clock64()") == len(PHASE_MARKS)
    assert "clock64" not in build_radix_topk(2048, vector=4, unroll=1, arch="sm_90a")().get_kernel_source()
    with pytest.raises(ValueError, match="phase_clock"):
        build_radix_topk(2048, phase_clock=True)
    # the probe's second pass without its claims and writes: it reads, compares and counts
    counted = build_radix_topk(2048, vector=4, unroll=1, phase_clock=True, second_pass_writes=False,
                               arch="sm_90a")().get_kernel_source()
    assert "passing[0] = (passing[0] + " in counted and counted.count("clock64()") == len(PHASE_MARKS)
    with pytest.raises(ValueError, match="phase probe"):
        build_radix_topk(2048, vector=4, unroll=1, second_pass_writes=False)


def test_radix_shape_takes_vector_loads_only_where_rows_allow(monkeypatch):
    _tilelang_or_skip()
    from transformers_misa.kernels import topk
    from transformers_misa.kernels.scorer import radix_shape

    monkeypatch.setattr(topk, "MANY_ROWS_VECTOR_SHAPE", None)
    monkeypatch.setattr(topk, "FEW_ROWS_VECTOR_SHAPE", dict(threads=1024, unroll=2, vector=4))
    assert radix_shape(32, 132, True) == dict(threads=1024, unroll=2, vector=4)  # a decode step's rows
    assert radix_shape(32, 132, False) == topk.FEW_ROWS_SHAPE  # misaligned rows or a width not a multiple of 4
    assert radix_shape(20000, 132, True) == topk.MANY_ROWS_SHAPE  # no vector variant for this shape


def test_prefill_rows_take_the_compact_second_pass_and_decode_rows_do_not():
    """The default shapes as measured (topk.MANY_ROWS_VECTOR_SHAPE's comment): a prefill's rows with the compact second
    pass and counts in registers, a decode step's without; the kept plain-top-k scorer turns both off."""
    _tilelang_or_skip()
    from transformers_misa.kernels import variants
    from transformers_misa.kernels.scorer import radix_shape

    prefill, decode = radix_shape(20000, 132, True), radix_shape(32, 132, True)
    assert prefill["compact_second_pass"] and prefill["bins_in_registers"] and prefill["vector"] == 4
    assert not decode.get("compact_second_pass") and not decode.get("bins_in_registers")
    assert not radix_shape(20000, 132, False).get("compact_second_pass")  # the scalar shape was not measured with it
    plain = variants.TILELANG_PLAIN_TOPK_SCORER.fused_select.keywords["topk_options"]
    assert {**prefill, **plain}["compact_second_pass"] is False and {**prefill, **plain}["bins_in_registers"] is False


def test_radix_topk_bounded_compiles_and_takes_the_bounds():
    """`bounded=True` (opt-in): the vector programs of both scorer shapes take Bounds and compile; other programs
    refuse it with a message naming what it needs."""
    _tilelang_or_skip()
    from transformers_misa.kernels.topk import FEW_ROWS_VECTOR_SHAPE, MANY_ROWS_VECTOR_SHAPE, build_radix_topk

    for shape in (MANY_ROWS_VECTOR_SHAPE, FEW_ROWS_VECTOR_SHAPE):
        source = build_radix_topk(2048, arch="sm_90a", bounded=True, **shape)().get_kernel_source()
        assert "const float* __restrict__ Bounds" in source and "reads_again" in source
    for options in (dict(), dict(vector=4, phase_clock=True), dict(vector=4, value_filter=False)):
        with pytest.raises(ValueError, match="bounded is for the vector program"):
            build_radix_topk(2048, bounded=True, **options)
    source = build_radix_topk(2048, arch="sm_90a", maxima_group=8, **MANY_ROWS_VECTOR_SHAPE)().get_kernel_source()
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


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("shape", ["many", "few"])
def test_radix_topk_bounded_selects_the_same_set_with_any_bound(shape):
    """`bounded=True` selects exactly the plain program's set whatever the bound: the group-maxima bound (rows read
    once, or read again where more values reach it than the buffer holds), the k-th value itself, a bound below every
    value (the buffer overflows), one above the k-th value (dropped), -inf; heavy ties; rows shorter than k. So does
    `maxima_group`, which finds its bound from the rows' group maxima."""
    from transformers_misa.kernels.topk import (FEW_ROWS_VECTOR_SHAPE, MANY_ROWS_VECTOR_SHAPE, build_radix_topk,
                                                group_maxima, group_maxima_bounds)

    options = MANY_ROWS_VECTOR_SHAPE if shape == "many" else FEW_ROWS_VECTOR_SHAPE
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
    from transformers_misa.kernels.topk import (FEW_ROWS_VECTOR_SHAPE, MANY_ROWS_VECTOR_SHAPE, build_radix_topk,
                                                sampled_bounds)

    options = MANY_ROWS_VECTOR_SHAPE if shape == "many" else FEW_ROWS_VECTOR_SHAPE
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
    got = build_radix_topk(k, sample_every=16, **options)()(scores.view(10, -1, options["vector"]), ends)
    for row, end in enumerate(ends.tolist()):
        assert {c for c in got[row].tolist() if c < end} == {c for c in expected[row].tolist() if c < end}, row
        assert len(set(got[row].tolist())) == k, f"row {row}: repeated index"


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("options", [dict(vector=4, unroll=1, min_ctas_per_sm=4), dict(vector=4, unroll=2),
                                     dict(vector=4, unroll=4, threads=1024), dict(vector=2, unroll=2),
                                     dict(vector=4, unroll=1, min_ctas_per_sm=4, buffer=16),
                                     dict(vector=4, unroll=1, threads=1024, min_ctas_per_sm=2),
                                     dict(vector=4, unroll=1, min_ctas_per_sm=4, compact_second_pass=True),
                                     dict(vector=4, unroll=1, min_ctas_per_sm=4, bins_in_registers=True),
                                     dict(vector=4, unroll=4, threads=1024, compact_second_pass=True,
                                          bins_in_registers=True)])
@pytest.mark.parametrize("width", [70000, 4100])
def test_radix_topk_vector_loads_select_the_same_set(options, width):
    """Rows read in groups of `vector` floats select exactly the scalar program's set: ends inside a group, shorter
    than one step, past the last full step; garbage past the ends."""
    from transformers_misa.kernels.topk import build_radix_topk

    generator = torch.Generator(device="cuda").manual_seed(width)
    scores = (torch.randn(9, width, device="cuda", generator=generator) * 8).round()
    ends = torch.tensor([width, width - 1, width - 3, 65537, 33001, 9002, 4097, 2049, 2047], device="cuda",
                        dtype=torch.int32).clamp_max(width)
    scores = scores.masked_fill(torch.arange(width, device="cuda") >= ends.unsqueeze(-1), 1e30)
    expected = build_radix_topk(2048)()(scores, ends)
    got = build_radix_topk(2048, **options)()(scores.view(9, -1, options["vector"]), ends)
    for row, end in enumerate(ends.tolist()):
        assert {c for c in got[row].tolist() if c < end} == {c for c in expected[row].tolist() if c < end}, row
        assert len(set(got[row].tolist())) == 2048, f"row {row}: repeated index"


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("rows,width,k", [(3, 4096, 2048), (17, 70001, 2048), (5, 33000, 8192), (2, 9000, 64)])
def test_radix_topk_selects_exactly_the_top_k(rows, width, k):
    from transformers_misa.kernels.scorer import radix_topk

    generator = torch.Generator(device="cuda").manual_seed(width)
    scores = torch.randn(rows, width, device="cuda", generator=generator)
    scores[0] = scores[0].round()  # heavy ties
    scores[-1, width // 3 :] = float("-inf")  # a causal row: the tail is masked
    scores[1 % rows, : width // 2] = 0.0  # a run of equal values straddling the k-th
    if rows > 2:
        scores[2] = -scores[2].abs()  # the k-th key negative: its bin's lowest value filters the second pass
    got = radix_topk(scores, k)
    assert got.shape == (rows, k) and got.dtype == torch.int32
    into = torch.full((rows + 1, k), -1, dtype=torch.int32, device="cuda")[1:]  # a caller's slice, at an offset
    assert radix_topk(scores, k, out=into) is into
    # the same visible keys (which of the -inf tail fills a row short of k finite values is the atomics' choice)
    assert exact_fraction(into, got, scores) == 1.0, "the in-place write selected another set"
    assert all(len(set(row.tolist())) == k for row in got), "repeated index"
    kth = scores.topk(k, dim=-1).values[:, -1:]
    picked = scores.gather(-1, got.long())
    assert bool((picked >= kth).all()), "picked a key below the k-th largest"
    above = (scores > kth).sum(-1)
    assert bool(((picked > kth).sum(-1) == above).all()), "missed a key above the k-th largest"
    _assert_lowest_columns_win_ties(got, scores)


def _assert_lowest_columns_win_ties(got: torch.Tensor, scores: torch.Tensor) -> None:
    """The selected set is the first k of a stable descending sort: ties go to the lowest columns (masked -inf
    fill-ups excepted), so every run selects the same keys."""
    k = got.shape[-1]
    expected = scores.sort(dim=-1, descending=True, stable=True).indices[:, :k]
    for row in range(scores.shape[0]):
        finite = torch.isfinite(scores[row, expected[row]])
        want = set(expected[row][finite].tolist())
        have = {c for c in got[row].tolist() if torch.isfinite(scores[row, c])}
        assert have == want, f"row {row}: ties not resolved to the lowest columns"


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("buffer", [16, 4096])
def test_radix_topk_breaks_ties_by_lowest_column_on_both_paths(buffer):
    """Many keys equal to the k-th (scores rounded, a run of zeros): both the buffered and the re-reading path take
    the lowest tied columns, every call alike."""
    from transformers_misa.kernels.topk import build_radix_topk

    generator = torch.Generator(device="cuda").manual_seed(12)
    scores = (torch.randn(6, 30000, device="cuda", generator=generator) * 4).round()
    scores[1, :20000] = 0.0
    scores[2] = torch.relu(scores[2])  # most of the row at exactly zero, as with ReLU scores of few heads
    ends = torch.full((6,), 30000, device="cuda", dtype=torch.int32)
    kernel = build_radix_topk(2048, buffer=buffer)()
    first = kernel(scores, ends)
    _assert_lowest_columns_win_ties(first, scores)
    for _ in range(3):
        assert torch.equal(kernel(scores, ends).sort(-1).values, first.sort(-1).values)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("buffer", [16, 4096])
def test_radix_topk_buffered_and_rereading_paths_agree(buffer):
    """A k-th key's bin that overflows the shared buffer re-reads the row: both paths select the same set."""
    from transformers_misa.kernels.topk import build_radix_topk

    generator = torch.Generator(device="cuda").manual_seed(11)
    scores = torch.randn(8, 50000, device="cuda", generator=generator)
    ends = torch.tensor([50000, 40000, 30000, 20000, 10000, 5000, 2100, 1000], device="cuda", dtype=torch.int32)
    got = build_radix_topk(2048, buffer=buffer)()(scores, ends)
    truth = scores.masked_fill(torch.arange(50000, device="cuda") >= ends.unsqueeze(-1), float("-inf"))
    expected = truth.topk(2048, dim=-1).indices
    for row in range(8):
        visible = min(int(ends[row]), 2048)
        picked = set(got[row].tolist())
        assert len(picked) == 2048
        assert set(expected[row, :visible].tolist()) <= picked  # random floats: no ties among visible keys


@gpu
@pytest.mark.gpu
def test_radix_topk_phase_clock_selects_the_same_set_and_marks_in_order():
    from transformers_misa.kernels.topk import PHASE_MARKS, build_radix_topk

    generator = torch.Generator(device="cuda").manual_seed(5)
    scores = torch.randn(600, 70000, device="cuda", generator=generator)
    ends = torch.randint(2049, 70001, (600,), device="cuda", generator=generator, dtype=torch.int32)
    options = dict(vector=4, unroll=1, min_ctas_per_sm=4)
    expected = build_radix_topk(2048, **options)()(scores.view(600, -1, 4), ends)
    clock = torch.zeros(600, len(PHASE_MARKS), dtype=torch.int64, device="cuda")
    got = build_radix_topk(2048, phase_clock=True, **options)()(scores.view(600, -1, 4), ends, clock)
    assert torch.equal(got.sort(-1).values, expected.sort(-1).values)
    assert bool((clock.diff(dim=-1) > 0).all()), "every row of random scores takes the usual path, marks in order"


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("options", [dict(unroll=4), dict(unroll=8), dict(unroll=32), dict(threads=1024, unroll=16),
                                     dict(threads=256, unroll=16), dict(unroll=16, buffer=16),
                                     dict(min_ctas_per_sm=3), dict(min_ctas_per_sm=4),
                                     dict(min_ctas_per_sm=4, buffer=2048), dict(min_ctas_per_sm=4, value_filter=False),
                                     dict(threads=1024, unroll=8, value_filter=False),
                                     dict(min_ctas_per_sm=4, compact_second_pass=True, bins_in_registers=True),
                                     dict(unroll=16, buffer=16, compact_second_pass=True, bins_in_registers=True),
                                     dict(value_filter=False, compact_second_pass=True),
                                     dict(min_ctas_per_sm=4, compact_second_pass=True, bins_in_registers=True,
                                          longest_first=True)])
def test_radix_topk_variants_select_the_same_set(options):
    """Every load depth and CTA width (`sweep_topk.py` times them) selects exactly the default's set: ragged ends
    (shorter than one loop step, not a multiple of it), ties, garbage past the ends."""
    from transformers_misa.kernels.topk import build_radix_topk

    generator = torch.Generator(device="cuda").manual_seed(21)
    scores = (torch.randn(12, 70001, device="cuda", generator=generator) * 8).round()
    ends = torch.tensor([70001, 70000, 65537, 33000, 16385, 9000, 8191, 5000, 4097, 2048, 2047, 100],
                        device="cuda", dtype=torch.int32)
    scores = scores.masked_fill(torch.arange(70001, device="cuda") >= ends.unsqueeze(-1), 1e30)
    expected = build_radix_topk(2048)()(scores, ends)
    got = build_radix_topk(2048, **options)()(scores, ends)
    for row, end in enumerate(ends.tolist()):  # rows seeing fewer than k keys fill up with any unread columns
        assert {c for c in got[row].tolist() if c < end} == {c for c in expected[row].tolist() if c < end}, row
        assert len(set(got[row].tolist())) == 2048, f"row {row}: repeated index"


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("rows,width,k", [(6, 4096, 2048), (9, 70001, 2048), (4, 33000, 8192)])
def test_radix_topk_reads_each_row_only_up_to_its_end(rows, width, k):
    """Columns past a row's end count as -inf unread (garbage there must not matter); rows with fewer than k
    columns before their end still get k distinct indices."""
    from transformers_misa.kernels.scorer import radix_topk

    generator = torch.Generator(device="cuda").manual_seed(k + rows)
    scores = torch.randn(rows, width, device="cuda", generator=generator)
    ends = torch.randint(1, width + 1, (rows,), device="cuda", generator=generator, dtype=torch.int32)
    ends[0], ends[1], ends[2] = width, k // 3, k  # full row, fewer than k, exactly k
    scores[3, : int(ends[3])] = scores[3, : int(ends[3])].round()  # ties
    columns = torch.arange(width, device="cuda")
    beyond = columns >= ends.unsqueeze(-1)
    truth = scores.masked_fill(beyond, float("-inf"))
    got = radix_topk(scores.masked_fill(beyond, 1e30), k, ends=ends)  # garbage past the end
    assert got.shape == (rows, k) and got.dtype == torch.int32
    assert all(len(set(row.tolist())) == k for row in got), "repeated index"
    kth = truth.topk(k, dim=-1).values[:, -1:]
    picked = truth.gather(-1, got.long())
    assert bool((picked >= kth).all()), "picked a key below the k-th largest"
    assert bool(((picked > kth).sum(-1) == (truth > kth).sum(-1)).all()), "missed a key above the k-th largest"


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
        source = build_radix_topk(2048, arch="sm_90a", sample_every=16, **shape)().get_kernel_source()
        assert "Bounds" not in source and "GroupMax" not in source and "(8192 <= end)" in source
    with pytest.raises(ValueError, match="two sources of the bound"):
        build_radix_topk(2048, sample_every=16, maxima_group=8, **MANY_ROWS_VECTOR_SHAPE)
    with pytest.raises(ValueError, match="32-byte sectors"):
        build_radix_topk(2048, sample_every=16, **dict(MANY_ROWS_VECTOR_SHAPE, vector=16))
    with pytest.raises(ValueError, match="vector program"):
        build_radix_topk(2048, sample_every=16)  # no vector loads
