"""The sampled-threshold top-k (`ops.threshold`) on the reference stages: it must equal the dense top-k exactly,
whatever the sample does, because rows it cannot vouch for are selected again densely."""

from __future__ import annotations

import pytest
import torch

from transformers_misa.ops import threshold
from transformers_misa.ops.threshold import (
    reference_candidates,
    reference_range_logits,
    reference_range_topk,
    reference_threshold_ops,
    reference_topk_of_candidates,
    threshold_select,
)

SCALE = 128**-0.5


def _inputs(batch, queries, keys, heads, seed=0, integer=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, queries, heads, 16, generator=g)
    k = torch.randn(batch, keys, 16, generator=g)
    w = torch.randn(batch, queries, heads, generator=g)
    if integer:  # coarse values: many exact ties among the logits
        q, k, w = q.round(), k.round(), w.round()
    return q, k, w


def _causal_ranges(batch, queries, keys, pad=()):
    """Each query sees [pad, its position]: padding on the left of some sequences, queries at the last positions."""
    ke = (torch.arange(queries) + keys - queries + 1).expand(batch, -1).to(torch.int32).clone()
    ks = torch.zeros(batch, queries, dtype=torch.int32)
    for b, p in enumerate(pad):
        ks[b] = p
    return ks, ke


def _dense(q, w, k, ks, ke, topk):
    return reference_range_topk(reference_range_logits(q, w, k, ks, ke, SCALE), topk, ke)


@pytest.mark.parametrize("integer", [False, True], ids=["random", "ties"])
@pytest.mark.parametrize("batch,queries,keys,heads,topk,pad", [
    (1, 300, 300, 8, 32, ()),  # causal prefill: the first 32 rows see fewer than k keys
    (2, 200, 700, 4, 48, (0, 250)),  # a cached prefix, left padding in one sequence
    (1, 3, 900, 6, 40, ()),  # a decode step of three queries
])
def test_threshold_select_equals_the_dense_top_k(batch, queries, keys, heads, topk, pad, integer):
    q, k, w = _inputs(batch, queries, keys, heads, integer=integer)
    ks, ke = _causal_ranges(batch, queries, keys, pad)
    ops, counts = reference_threshold_ops(SCALE), []
    recording = threshold.ThresholdOps(ops.logits, ops.topk, lambda *a: counts.append(ops.candidates(*a)) or counts[-1],
                                       ops.topk_of_candidates)
    got = threshold_select(q, w, k, ks, ke, topk, recording, stride=4)
    if not integer:  # the lists do the work: most rows seeing more than the capacity get a usable list
        count, wide = counts[0][2], (ke - ks) > 2 * topk
        assert ((count[wide] >= topk) & (count[wide] <= 3 * topk)).float().mean() > 0.8
    want = _dense(q, w, k, ks, ke, topk)
    visible = (ke - ks).unsqueeze(-1) >= topk  # rows with fewer visible keys than k: the dense path's own fill
    assert torch.equal(got.sort(-1).values.long() * visible, want.sort(-1).values * visible)
    assert torch.equal(got[~visible.squeeze(-1)].long(), want[~visible.squeeze(-1)])


def _counting(ops, calls):
    """ops whose dense logits calls record their key count."""
    def logits(*args):
        calls.append(args[2].shape[1])
        return ops.logits(*args)
    return threshold.ThresholdOps(logits, ops.topk, ops.candidates, ops.topk_of_candidates)


def test_rows_whose_threshold_is_too_high_are_selected_densely():
    q, k, w = _inputs(1, 120, 600, 4, seed=3)
    ks, ke = _causal_ranges(1, 120, 600)
    calls = []
    # oversample 0.25: ~k/4 keys reach θ, fewer than k
    got = threshold_select(q, w, k, ks, ke, 32, _counting(reference_threshold_ops(SCALE), calls), capacity=64,
                           stride=4, oversample=0.25)
    assert calls == [150, 600], "one sample pass, then the misjudged rows densely (one call per sequence)"
    assert torch.equal(got.sort(-1).values.long(), _dense(q, w, k, ks, ke, 32).sort(-1).values)


def test_overflowing_lists_are_selected_densely():
    q, k, w = _inputs(2, 50, 800, 4, seed=5)
    ks, ke = _causal_ranges(2, 50, 800, (0, 100))
    ops = reference_threshold_ops(SCALE)
    low = threshold.ThresholdOps(ops.logits, ops.topk,
                                 lambda *a: ops.candidates(*a[:5], a[5] - 1e9, a[6]),  # θ far too low: overflow
                                 ops.topk_of_candidates)
    calls = []
    got = threshold_select(q, w, k, ks, ke, 32, _counting(low, calls), capacity=128, stride=4)
    assert calls == [200, 800, 800]
    assert torch.equal(got.sort(-1).values.long(), _dense(q, w, k, ks, ke, 32).sort(-1).values)


def test_candidates_hold_every_key_at_or_above_the_threshold():
    q, k, w = _inputs(2, 10, 300, 4, seed=1)
    ks, ke = _causal_ranges(2, 10, 300, (0, 40))
    logits = reference_range_logits(q, w, k, ks, ke, SCALE)
    theta = logits.quantile(0.9, dim=-1)
    values, key_index, count = reference_candidates(q, w, k, ks, ke, theta, 300, SCALE)
    assert torch.equal(count, (logits >= theta.unsqueeze(-1)).sum(-1).to(torch.int32))
    for b in range(2):
        for t in range(10):
            n = int(count[b, t])
            assert set(key_index[b, t, :n].tolist()) == set((logits[b, t] >= theta[b, t]).nonzero().flatten().tolist())
            assert torch.equal(values[b, t, :n], logits[b, t, key_index[b, t, :n].long()])


def test_ties_among_candidates_go_to_the_lowest_key():
    values = torch.tensor([[[1.0, 2.0, 2.0, 2.0, 0.5]]])
    key_index = torch.tensor([[[7, 9, 3, 5, 1]]], dtype=torch.int32)
    got = reference_topk_of_candidates(values, key_index, 2)
    assert sorted(got.flatten().tolist()) == [3, 5]


def test_oversample_beyond_the_capacity_is_refused():
    q, k, w = _inputs(1, 4, 64, 2)
    ks, ke = _causal_ranges(1, 4, 64)
    with pytest.raises(ValueError, match="does not fit a capacity"):
        threshold_select(q, w, k, ks, ke, 8, reference_threshold_ops(SCALE), capacity=16, stride=4, oversample=3)
    with pytest.raises(ValueError, match="below k"):
        threshold_select(q, w, k, ks, ke, 8, reference_threshold_ops(SCALE), capacity=4)
