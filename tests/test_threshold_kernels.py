"""The sampled-threshold path on the TileLang programs (`kernels.scorer.threshold_ops`): the candidate variant of
the logits program and the key-carrying radix top-k compile for sm_90a everywhere (CI) and, on a Hopper GPU
(marked gpu), select exactly what the dense kernel path selects."""

from __future__ import annotations

import pytest
import torch

from transformers_misa.ops import reference
from transformers_misa.ops.threshold import reference_topk_of_candidates, threshold_select

from kernel_helpers import _inputs, _tilelang_or_skip, gpu

SCALE = 128**-0.5


@pytest.mark.parametrize("heads", [64, 8])
def test_candidate_logits_kernel_compiles_for_sm90a(heads):
    _tilelang_or_skip()
    from transformers_misa.kernels.scoring import build_weighted_relu_logits

    source = build_weighted_relu_logits(heads, 128, fill_future=False, staged_stores=False, capacity=6144,
                                        arch="sm_90a")().get_kernel_source()
    assert "wgmma" in source and "CandVal[" in source
    assert "Logits" not in source and "Atomic" not in source, "no dense logits, no atomics: per-thread segments"


def test_key_carrying_radix_topk_compiles_for_sm90a():
    _tilelang_or_skip()
    from transformers_misa.kernels.topk import build_radix_topk

    source = build_radix_topk(2048, with_keys=True, arch="sm_90a")().get_kernel_source()
    assert "Keys[" in source


def test_candidate_variant_refuses_fp8_and_split_keys():
    _tilelang_or_skip()
    from transformers_misa.kernels.scoring import build_weighted_relu_logits

    with pytest.raises(ValueError, match="key_splits=1"):
        build_weighted_relu_logits(8, 128, capacity=4096, key_splits=2, arch="sm_90a")
    with pytest.raises(ValueError, match="multiple of block_n"):
        build_weighted_relu_logits(8, 128, capacity=4000, arch="sm_90a")


# ----------------------------------------------------------------------------------------------- GPU


def _ranges(batch, num_queries, num_keys, pads=()):
    ke = (torch.arange(num_queries, device="cuda") + num_keys - num_queries + 1).int().expand(batch, -1).clone()
    ks = torch.zeros_like(ke)
    for row, pad in enumerate(pads):
        ks[row] = pad
    return ks, ke


def _dense_select(q, weights, keys, ks, ke, k):
    from transformers_misa.kernels.scorer import _logits, radix_topk

    return radix_topk(_logits(q, weights, keys, ks, ke, SCALE, fill_future=False), k, ends=ke)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("batch,num_queries,num_keys,heads,pads", [
    (1, 37, 5001, 64, ()),  # T not a multiple of the tile
    (2, 100, 3000, 8, (0, 700)),  # a partial last query block, left padding
    (1, 64, 9000, 32, ()),  # GLM-5's 32 heads
])
def test_candidate_kernel_keeps_exactly_the_keys_at_or_above_the_threshold(batch, num_queries, num_keys, heads,
                                                                           pads):
    from transformers_misa.kernels.scorer import _candidates, _logits

    q, keys, weights = _inputs(batch, num_queries, num_keys, heads)
    ks, ke = _ranges(batch, num_queries, num_keys, pads)
    dense = _logits(q, weights, keys, ks, ke, SCALE, fill_future=True, interleaved=False)  # its head-sum order
    theta = dense.float().nan_to_num(neginf=float("nan")).nanquantile(0.97, dim=-1)
    theta[0, 0] = float("-inf")  # a row keeping every visible key
    capacity = 1024  # 8 slots per key residue
    values, key_index, count = _candidates(q, weights, keys, ks, ke, theta, capacity, SCALE)
    visible = torch.isfinite(dense)
    want = visible & (dense >= theta.unsqueeze(-1))
    kept = values > float("-inf")
    fits = count <= capacity
    assert torch.equal(count[fits], want.sum(-1).int()[fits]), "count: every visible key at or above θ"
    assert not fits[0, 0] and fits.float().mean() > 0.9, "θ = -inf over 5000+ keys overflows; the others fit"
    for b in range(batch):
        for t in range(num_queries):
            got = key_index[b, t][kept[b, t]].long()
            if fits[b, t]:
                assert torch.equal(got.sort().values, want[b, t].nonzero().flatten())
            assert torch.equal(values[b, t][kept[b, t]], dense[b, t, got]), "the dense kernel's very logits"


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("rows,width,k", [(7, 4096, 2048), (300, 8192, 2048), (5, 16384, 8192)])
def test_key_carrying_topk_matches_reference_with_ties(rows, width, k):
    from transformers_misa.kernels.scorer import radix_topk_of_candidates

    generator = torch.Generator(device="cuda").manual_seed(1)
    values = torch.randint(0, 50, (1, rows, width), device="cuda", generator=generator).float()  # heavy ties
    key_index = torch.stack([torch.randperm(10 * width, device="cuda", generator=generator)[:width]
                             for _ in range(rows)]).int().unsqueeze(0)
    empty = torch.rand(values.shape, device="cuda", generator=generator) < 0.3  # slots no key filled
    values = values.masked_fill(empty, float("-inf"))
    got = radix_topk_of_candidates(values, key_index, k)
    want = reference_topk_of_candidates(values, key_index, k)
    assert torch.equal(got.sort(-1).values, want.sort(-1).values.int())


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("batch,num_queries,num_keys,heads,pads,oversample", [
    (1, 4500, 20000, 8, (), 1.5),  # MISA-8's width: 282 query blocks
    (1, 600, 20000, 64, (), 1.5),  # the DSA-64 baseline
    (2, 600, 20000, 32, (0, 3000), 1.5),  # GLM-5, left padding
    (1, 4500, 20000, 8, (), 0.3),  # θ too high for most rows: they go through the dense path
])
def test_threshold_select_equals_the_dense_kernel_path(batch, num_queries, num_keys, heads, pads, oversample):
    from transformers_misa.kernels.scorer import candidate_capacity, threshold_ops, uses_threshold_filter

    q, keys, weights = _inputs(batch, num_queries, num_keys, heads)
    ks, ke = _ranges(batch, num_queries, num_keys, pads)
    assert uses_threshold_filter(q, keys, 2048)
    got = threshold_select(q, weights, keys, ks, ke, 2048, threshold_ops(SCALE), candidate_capacity(2048),
                           oversample=oversample)
    want = _dense_select(q, weights, keys, ks, ke, 2048)
    assert torch.equal(got.sort(-1).values, want.sort(-1).values)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["dsa", "misa"])
def test_indexers_select_the_same_with_and_without_the_threshold(mode):
    from transformers_misa.kernels.scorer import TILELANG_SCORER
    from transformers_misa.kernels.variants import TILELANG_THRESHOLD_SCORER

    q, keys, weights = _inputs(1, 6000, 20000, 64)

    def run(scorer):
        if mode == "dsa":
            return reference.dsa_topk(q, keys, weights, 2048, softmax_scale=SCALE, scorer=scorer)
        return reference.misa_topk(q, keys, weights, 2048, active_heads=8, block_size=64, softmax_scale=SCALE,
                                   scorer=scorer)

    assert torch.equal(run(TILELANG_THRESHOLD_SCORER).sort(-1).values, run(TILELANG_SCORER).sort(-1).values)
