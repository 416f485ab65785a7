"""Recall of DSA's top-k: measure_recall on patched models and recall_counts on hand-made selections."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import FAMILIES, exact_mode_options, left_padded_batch
from transformers_misa import MisaIndexer, RecallReport, measure_recall, patch_model, unpatch_model
from transformers_misa.ops.reference import dsa_topk, hisa_topk
from transformers_misa.recall import recall_counts

TOPK, SEQ, PADS = 16, 60, [0, 9]
# Queries that see more than TOPK keys: row b has SEQ - PADS[b] real tokens, its i-th one sees i + 1 keys.
SPARSE_QUERIES = sum(max(0, SEQ - pad - TOPK) for pad in PADS)


@pytest.mark.parametrize("family", FAMILIES)
def test_exact_modes_have_recall_one(make_model, family):
    model = make_model(family, index_topk=TOPK)
    ids, attn = left_padded_batch(2, SEQ, PADS)
    layers = [0, 1] if family == "deepseek_v32" else [0, 2]
    for mode, options in exact_mode_options(model.config.index_n_heads, TOPK, SEQ, block_size=16):
        patch_model(model, mode=mode, **options)
        report = measure_recall(model, ids, attn)
        assert isinstance(report, RecallReport) and report.mode == mode
        assert sorted(report.per_layer) == layers
        assert report.sparse_queries == {layer: SPARSE_QUERIES for layer in layers}
        assert report.per_layer == {layer: 1.0 for layer in layers}, mode
        assert report.mean == 1.0 and report.worst == 1.0
        assert all(m.recall_probe is None for m in model.modules() if isinstance(m, MisaIndexer))
        unpatch_model(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_one_active_head_loses_recall(make_model, family):
    model = make_model(family, index_topk=TOPK)
    ids, attn = left_padded_batch(2, SEQ, PADS)
    with torch.no_grad():
        expected_logits = model(input_ids=ids, attention_mask=attn).logits
    patch_model(model, mode="misa", active_heads=1, block_size=16)
    report = measure_recall(model, ids, attn)
    layers = [0, 1] if family == "deepseek_v32" else [0, 2]
    assert sorted(report.per_layer) == layers
    for value in report.per_layer.values():
        assert 0.0 < value < 1.0
    assert report.worst == min(report.per_layer.values())
    assert report.mean == pytest.approx(sum(report.per_layer.values()) / len(layers))
    table = report.table()
    assert "mode=misa" in table
    rows = table.splitlines()
    for layer in layers:
        row = next(r for r in rows if r.split()[0] == str(layer))
        assert row.split()[1:] == [str(SPARSE_QUERIES), f"{report.per_layer[layer]:.4f}"]
    assert [r.split()[0] for r in rows[2:-2]] == [str(layer) for layer in layers]  # GLM: no shared layer 1
    assert rows[-2].split() == ["mean", f"{report.mean:.4f}"] and rows[-1].split() == ["worst", f"{report.worst:.4f}"]
    assert report.to_dict()["per_layer"] == report.per_layer
    # DSA drove the model while measuring, and the probes are gone afterwards.
    assert all(m.recall_probe is None for m in model.modules() if isinstance(m, MisaIndexer))
    unpatch_model(model)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=attn).logits, expected_logits)


def test_recall_counts_by_hand_causal():
    # 1 batch, 3 queries at positions 2, 3, 4 of 5 keys, k = 2: they see 3, 4, 5 keys, all sparse.
    dsa = torch.tensor([[[0, 1], [2, 3], [4, 0]]], dtype=torch.int32)
    ours = torch.tensor([[[1, 2], [3, 2], [1, 2]]], dtype=torch.int32)
    total, count = recall_counts(dsa, ours, None, 5)
    assert count == 3
    assert total == pytest.approx(0.5 + 1.0 + 0.0)


@pytest.mark.parametrize("additive", [False, True])
def test_recall_counts_by_hand_masked(additive):
    # 2 rows, 4 queries over 4 keys, k = 2; row 1 has one padding key.
    visible = torch.tril(torch.ones(4, 4, dtype=torch.bool)).expand(2, 4, 4).clone()
    visible[1, :, 0] = False
    mask = visible if not additive else torch.zeros(visible.shape).masked_fill(~visible, torch.finfo(torch.float32).min)
    dsa = torch.tensor([[[0, 1], [0, 1], [2, 0], [3, 1]],
                        [[1, 2], [1, 2], [2, 1], [3, 2]]], dtype=torch.int32)
    ours = torch.tensor([[[0, 1], [0, 1], [0, 1], [3, 2]],
                         [[1, 2], [1, 2], [1, 2], [1, 0]]], dtype=torch.int32)
    total, count = recall_counts(dsa, ours, mask, 4, chunk_size=3)
    # Sparse: row 0 queries 2, 3 (3 and 4 keys); row 1 query 3 (3 keys). Recall 1/2, 1/2, 0/2.
    assert count == 3
    assert total == pytest.approx(0.5 + 0.5 + 0.0)


def test_recall_report_nan_layers():
    report = RecallReport("misa", {0: 0.5, 1: float("nan"), 2: 0.75}, {0: 3, 1: 0, 2: 3})
    assert report.mean == pytest.approx(0.625) and report.worst == 0.5
    assert math.isnan(RecallReport("misa", {0: float("nan")}, {0: 0}).mean)
    assert "nan" in report.table()


def test_recall_counts_duplicate_indices_count_once():
    dsa = torch.tensor([[[0, 1, 2]]], dtype=torch.int32)
    ours = torch.tensor([[[2, 2, 2]]], dtype=torch.int32)
    total, count = recall_counts(dsa, ours, None, 5)
    assert count == 1 and total == pytest.approx(1 / 3)



def test_hisa_recall_not_overestimated():
    """T=70, block 32, keep 2 blocks: recall counts distinct overlap only, whatever HISA returns."""
    gen = torch.Generator().manual_seed(0)
    q, keys, w = torch.randn(1, 70, 4, 8, generator=gen), torch.randn(1, 70, 8, generator=gen), torch.randn(1, 70, 4)
    ours = hisa_topk(q, keys, w, 64, softmax_scale=8**-0.5, block_size=32, keep_blocks=2)
    dsa = dsa_topk(q, keys, w, 64, softmax_scale=8**-0.5)
    total, count = recall_counts(dsa, ours, None, 70)
    true = sum(len(set(ours[0, s].tolist()) & set(dsa[0, s].tolist())) / 64 for s in range(64, 70))
    assert count == 6
    assert total == pytest.approx(true)
