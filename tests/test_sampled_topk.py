"""The radix top-k's sampled path (`kernels.topk`, `sample` > 0): wide rows find two bounds from a sample of their
columns and skip the full histogram pass. It compiles for sm_90a everywhere (CI); on a Hopper GPU (marked gpu) it
selects exactly what the full path selects, also on rows built to defeat the sample (the bounds miss, the band
overflows: the row falls back), ties and masked keys included."""

from __future__ import annotations

import pytest
import torch

from test_kernels import _assert_lowest_columns_win_ties, _tilelang_or_skip, gpu

K = 2048


def test_sampled_topk_compiles_for_sm90a_and_keeps_the_full_path():
    _tilelang_or_skip()
    from transformers_misa.kernels.topk import SAMPLE, SAMPLE_MIN_WIDTH_FACTOR, build_radix_topk

    sampled = build_radix_topk(K, arch="sm_90a")().get_kernel_source()
    plain = build_radix_topk(K, sample=0, arch="sm_90a")().get_kernel_source()
    assert f"{SAMPLE_MIN_WIDTH_FACTOR * SAMPLE} <= end" in sampled, "wide rows take the sampled path"
    assert "sqrtf" in sampled and "sqrtf" not in plain
    assert sampled.count("AtomicAdd((&(((int*)hist)") > plain.count("AtomicAdd((&(((int*)hist)")


def test_sampled_topk_is_off_where_it_cannot_apply():
    _tilelang_or_skip()
    from transformers_misa.kernels.topk import build_radix_topk

    for options in (dict(buffer=16), dict(with_keys=True)):  # the sample does not fit / narrow candidate lists
        assert "sqrtf" not in build_radix_topk(K, arch="sm_90a", **options)().get_kernel_source(), options


@pytest.mark.parametrize("sample", [-512, 1000, 4100])
def test_sampled_topk_refuses_a_sample_it_cannot_spread(sample):
    pytest.importorskip("tilelang", reason="TileLang is not installed")
    from transformers_misa.kernels.topk import build_radix_topk

    with pytest.raises(ValueError, match="sample must be a multiple of threads"):
        build_radix_topk(K, sample=sample)


def _adversarial_rows(width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows for which the sample is right, wrong or useless, with their ends."""
    generator = torch.Generator(device="cuda").manual_seed(width)
    rows = torch.randn(12, width, device="cuda", generator=generator)
    columns = torch.arange(width, device="cuda", dtype=torch.float32)
    rows[1] = columns  # a trend: the top keys are the last ones
    rows[2] = -columns  # the top keys are the first ones
    rows[3] = torch.randn(width, device="cuda", generator=generator) - 10.0
    stride = width // 512  # the sample's segment starts (SEGMENT = 8 columns each); hide K high keys between them
    hidden = (torch.arange(width, device="cuda") % stride) >= 8
    rows[3, hidden.nonzero().squeeze(-1)[: 3 * K // 2]] += 20.0
    rows[4] = rows[4].round()  # heavy ties
    rows[5] = 0.0  # every key ties
    rows[6, : width // 2] = float("-inf")  # keys before the query's window are masked
    rows[7] = torch.relu(rows[7] - 2.5)  # most keys exactly zero (ReLU scores of few heads), the k-th among them
    rows[8] = torch.where(torch.rand(width, device="cuda", generator=generator) < 0.5, -0.0, 0.0)  # both zeros tie
    rows[9, ::2] = 1e3  # half the keys far above the rest
    ends = torch.full((12,), width, dtype=torch.int32, device="cuda")
    ends[10], ends[11] = 8192, 8191  # at and just below the sampled path's smallest width
    return rows, ends


def _visible(picked: torch.Tensor, ends: torch.Tensor) -> list[set[int]]:
    """Each row's picked columns before its end (a row seeing fewer than k keys fills up with any unread columns)."""
    return [{c for c in row.tolist() if c < end} for row, end in zip(picked, ends.tolist())]


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("width,k,options", [
    (70001, K, {}), (33000, 8192, {}), (131072, K, dict(threads=1024, unroll=8)), (20000, K, dict(threads=256, unroll=16)),
    (70001, K, dict(aggregate=True)), (70001, K, dict(sample=0, aggregate=True)),
])
def test_sampled_path_selects_what_the_full_path_selects(width, k, options):
    from transformers_misa.kernels.topk import build_radix_topk

    scores, ends = _adversarial_rows(width)
    visible = torch.arange(width, device="cuda") < ends.unsqueeze(-1)
    garbage = scores.masked_fill(~visible, 1e30)  # past a row's end nothing may be read
    got = build_radix_topk(k, **options)()(garbage, ends)
    shape = {name: value for name, value in options.items() if name in ("threads", "unroll")}
    full = build_radix_topk(k, sample=0, **shape)()(garbage, ends)
    assert all(len(set(row.tolist())) == k for row in got), "repeated index"
    for row, (mine, theirs) in enumerate(zip(_visible(got, ends), _visible(full, ends))):
        assert mine == theirs, f"row {row}: differs from the full path"
    _assert_lowest_columns_win_ties(got, scores.masked_fill(~visible, float("-inf")))


@gpu
@pytest.mark.gpu
def test_sampled_path_on_causal_prefill_rows():
    """Many causal rows of indexer-like scores (every 64th query of 64K): the prefill shape the sampled path is for;
    repeated calls select the same keys."""
    from transformers_misa.kernels.topk import build_radix_topk

    generator = torch.Generator(device="cuda").manual_seed(3)
    width = 65536
    ends = torch.arange(64, width + 1, 64, dtype=torch.int32, device="cuda")
    keys = torch.randn(width, 16, device="cuda", generator=generator)
    queries = torch.randn(ends.numel(), 16, device="cuda", generator=generator)
    scores = torch.relu(queries @ keys.T)  # correlated along the keys, many exact zeros
    scores = scores.masked_fill(torch.arange(width, device="cuda") >= ends.unsqueeze(-1), 1e30)
    sampled = build_radix_topk(K)()
    first = sampled(scores, ends)
    full = build_radix_topk(K, sample=0)()(scores, ends)
    assert _visible(first, ends) == _visible(full, ends)
    assert _visible(sampled(scores, ends), ends) == _visible(first, ends)
