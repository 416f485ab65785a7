"""The radix-select top-k program (kernels/topk.py): compiled on the CPU for sm_90a, and on a Hopper GPU against
torch.topk over parametrised rows (ragged ends, ties, garbage past the ends, every build variant)."""

from __future__ import annotations

import re

import pytest
import torch

from conftest import exact_fraction
from kernel_helpers import _assert_same_visible_columns, _changed_lines, _tilelang_or_skip, gpu  # this folder's helpers


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
    pass, counts in registers and the sampled bound, a decode step's without; the kept plain-top-k scorer turns all
    three off, the unsampled one the bound, the 1/16 one samples twice as densely."""
    _tilelang_or_skip()
    from transformers_misa.kernels import variants
    from transformers_misa.kernels.scorer import radix_shape

    prefill, decode = radix_shape(20000, 132, True), radix_shape(32, 132, True)
    assert prefill["compact_second_pass"] and prefill["bins_in_registers"] and prefill["vector"] == 4
    assert prefill["sample_every"] == 32 and not decode.get("sample_every")
    assert not decode.get("compact_second_pass") and not decode.get("bins_in_registers")
    assert not radix_shape(20000, 132, False).get("compact_second_pass")  # the scalar shape was not measured with it
    plain = {**prefill, **variants.TILELANG_PLAIN_TOPK_SCORER.fused_select.keywords["topk_options"]}
    assert plain["compact_second_pass"] is False and plain["bins_in_registers"] is False and plain["sample_every"] == 0
    unsampled = {**prefill, **variants.TILELANG_UNSAMPLED_TOPK_SCORER.fused_select.keywords["topk_options"]}
    assert unsampled == dict(prefill, sample_every=0)
    denser = {**prefill, **variants.TILELANG_SAMPLED16_TOPK_SCORER.fused_select.keywords["topk_options"]}
    assert denser == dict(prefill, sample_every=16)


@pytest.mark.parametrize("options,sampled", [(None, True), (dict(value_filter=False), False),
                                             (dict(phase_clock=True), False), (dict(sample_every=0), False)])
def test_radix_topk_drops_the_sampled_bound_where_the_options_rule_it_out(monkeypatch, options, sampled):
    """A prefill's rows take the sampled bound by default; `radix_topk` leaves it out where the caller's options ask
    for a program it does not build with (no value filter, the phase probe), rather than raising inside `generate`."""
    _tilelang_or_skip()
    from transformers_misa.kernels import scorer

    built = []
    monkeypatch.setattr(scorer, "_sm_count", lambda device: 132)
    monkeypatch.setattr(scorer, "build_radix_topk", lambda k, **shape: built.append(shape) or (
        lambda: lambda rows, ends, *rest: torch.zeros(rows.shape[0], k, dtype=torch.int32)))
    scorer.radix_topk(torch.zeros(400, 9000), 2048, ends=torch.full((400,), 9000), options=options)
    (shape,) = built
    assert bool(shape.get("sample_every")) == sampled


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
    _assert_same_visible_columns(got, expected, ends, 2048)


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
    _assert_same_visible_columns(got, expected, ends, 2048)


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
