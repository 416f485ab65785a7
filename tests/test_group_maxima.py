"""The top-k's group path: the logits program writes the maximum of every 8 adjacent logits, and the radix top-k bounds
each wide row's k-th key with them (kernels/topk.py `group`, kernels/scoring.py `group_max`). Compiled on the CPU for
sm_90a; on a Hopper GPU the maxima are checked against torch's and every selection against the full path's."""

from __future__ import annotations

import re

import pytest
import torch

from conftest import exact_fraction
from test_kernels import _inputs, _padded_causal_mask, _tilelang_or_skip, gpu
from transformers_misa.ops.blocks import ChunkMask

K = 2048


def test_grouped_radix_topk_compiles_for_sm90a():
    _tilelang_or_skip()
    from transformers_misa.kernels.topk import GROUP, build_radix_topk

    source = build_radix_topk(K, vector=4, unroll=1, min_ctas_per_sm=4, group=GROUP, arch="sm_90a")()
    source = source.get_kernel_source()
    assert "GroupMax[" in source, "the group maxima are never read"
    assert re.search(r"\*\(float4\*\)\(group_values \+ .*\) = \*\(float4\*\)\(Scores", source), "no 16-byte loads"
    # the group path is taken from 1.25 k groups on: columns before the end >= 8 * (1.25 k - 1) + 1
    assert f"({8 * (5 * K // 4 - 1) + 1} <= end)" in source
    with pytest.raises(ValueError, match="vector loads"):
        build_radix_topk(K, group=GROUP)


@pytest.mark.parametrize("heads,options", [
    (8, dict(staged_stores=True, interleaved=True, overlapped=True, num_stages=4)),  # MISA-8's prefill program
    (64, dict(rows_per_cta=256, block_n=64, staged_stores=False, overlapped=True, num_stages=4)),  # DSA-64's
])
def test_logits_kernel_with_group_maxima_compiles_for_sm90a(heads, options):
    _tilelang_or_skip()
    from transformers_misa.kernels.scoring import build_weighted_relu_logits

    source = build_weighted_relu_logits(heads, 128, fill_future=False, group_max=8, arch="sm_90a", **options)()
    source = source.get_kernel_source()
    assert "GroupMax[" in source and "float* __restrict__ GroupMax" in source
    # the maxima are read from the staged tile after a barrier of the consumer warpgroups only
    assert "tl::__sync_thread_partial(3, 256);" in source
    with pytest.raises(ValueError, match="group maxima"):
        build_weighted_relu_logits(heads, 128, fp8=True, group_max=8)
    with pytest.raises(ValueError, match="group maxima"):
        build_weighted_relu_logits(heads, 128, key_splits=2, group_max=8)


def test_group_maxima_only_where_the_top_k_path_reads_them():
    pytest.importorskip("tilelang", reason="TileLang is not installed")
    from transformers_misa.kernels.scorer import logits_options, takes_group_maxima

    def takes(heads, num_queries, num_keys, **flags):
        options = logits_options(heads, 1, num_queries, num_keys, 132, fill_future=False, **flags)
        return takes_group_maxima(options, num_keys)

    assert takes(8, 65536, 65536) and takes(64, 65536, 65536)  # prefill, MISA-8 and DSA-64
    assert not takes(8, 65536, 65532)  # rows not a whole number of groups wide
    assert not takes(8, 65536, 65536, fp8=True)  # the FP8 programs keep the full path
    assert not takes(8, 4, 131072)  # decode: keys split over CTAs
    assert not takes(8, 65536, 65536, overlapped=False)  # TileLang's pipeline driver (benchmark-only) keeps it too


# ----------------------------------------------------------------------------------------------- GPU


def _full_and_grouped(scores: torch.Tensor, ends: torch.Tensor, maxima: torch.Tensor, **options):
    from transformers_misa.kernels.topk import GROUP, build_radix_topk

    full = build_radix_topk(K)()(scores, ends)
    shape = dict(vector=4, unroll=1, min_ctas_per_sm=4, **options)
    grouped = build_radix_topk(K, group=GROUP, **shape)()(scores.view(scores.shape[0], -1, 4), maxima, ends)
    return full, grouped


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("buffer", [4096, 1024])
def test_grouped_radix_topk_selects_the_full_paths_set(buffer):
    """Every kind of row: wide random rows (the group path), rows below 1.25 k groups (full path), heavy ties that
    overflow the buffer (full path after the attempt), an -inf bound (most of the row masked), a run of equal values
    at the k-th key (ties to the lowest columns), negative scores; ends inside a group and garbage past them. A
    small buffer sends more rows back to the full path."""
    width = 40000
    generator = torch.Generator(device="cuda").manual_seed(3)
    scores = torch.randn(10, width, device="cuda", generator=generator)
    scores[1] = scores[1].round()  # heavy ties: the buffer overflows
    scores[2, : width - 3000] = float("-inf")  # 375 finite groups: the k-th group maximum is -inf
    scores[3, 1000:30000] = 0.5  # a run equal to the k-th key
    scores[4] = -scores[4].abs()  # negative keys
    scores[5] = scores[5] * torch.linspace(0, 4, width, device="cuda")  # a trend: the tail holds the top k
    ends = torch.tensor([width, width, width, width, width, 33333, 20473, 20472, 17001, 39999], device="cuda",
                        dtype=torch.int32)
    maxima = scores.masked_fill(torch.arange(width, device="cuda") >= ends.unsqueeze(-1), float("-inf"))
    maxima = maxima.view(10, -1, 8).amax(-1)
    scores = scores.masked_fill(torch.arange(width, device="cuda") >= ends.unsqueeze(-1), 1e30)  # never read
    full, grouped = _full_and_grouped(scores, ends, maxima, buffer=buffer)
    visible = scores.masked_fill(torch.arange(width, device="cuda") >= ends.unsqueeze(-1), float("-inf"))
    assert exact_fraction(grouped, full, visible) == 1.0
    assert all(len(set(row.tolist())) == K for row in grouped), "repeated index"


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("heads,num_queries,num_keys,pads", [
    (8, 4608, 24576, [0]),  # MISA-8: interleaved, staged stores; rows from below to above the group path's width
    (64, 1100, 24576, [0, 3000]),  # DSA-64: 256-row CTAs, direct stores, a left-padded sequence
    (64, 600, 30000, [0]),  # too few queries for 256-row CTAs: 128-row CTAs (two queries each)
])
def test_logits_group_maxima_and_grouped_select(heads, num_queries, num_keys, pads):
    """The program's maxima equal torch's over the logits as written, and the fused select with them picks exactly
    the set it picks over whole rows."""
    from transformers_misa.kernels import scorer

    batch = len(pads)
    q, keys, weights = _inputs(batch, num_queries, num_keys, heads, seed=11)
    chunk = ChunkMask(_padded_causal_mask(batch, num_queries, num_keys, pads), slice(0, num_queries), batch,
                      num_queries, num_keys, q.device)
    ks, ke, _ = chunk.key_range
    logits, maxima = scorer._logits_and_maxima(q, weights, keys, ks, ke, 128**-0.5, fill_future=True,
                                               group_maxima=True)
    assert maxima is not None, "this call should write group maxima"
    written = torch.arange(maxima.shape[-1], device="cuda") < (ke.unsqueeze(-1) + 7) // 8  # groups before the end
    expected = logits.view(batch, num_queries, -1, 8).amax(-1)
    torch.testing.assert_close(maxima[written], expected[written], rtol=0, atol=0)
    grouped = scorer.tilelang_select_tokens(q, weights, keys, chunk, 128**-0.5, K)
    whole = scorer.tilelang_select_tokens(q, weights, keys, chunk, 128**-0.5, K, grouped=False)
    assert exact_fraction(grouped, whole, logits) == 1.0
