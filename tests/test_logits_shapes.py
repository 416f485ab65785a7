"""The logits program's launch choices (`kernels/logits_shapes.py`), settled per call on the host: which driver and CTA
shape a call builds, how many queries a wave holds, the query layout, decode rows per CTA, and the fused select's
top-k rows in the logits' order. CPU only: nothing is compiled or run."""

from __future__ import annotations

import pytest
import torch

from transformers_misa.ops.masks import ChunkMask


def test_logits_options_overlap_prefill_only():
    """Which program a call builds (H100/H200: 132 SMs): the overlapped driver for bf16 prefill chunks that fill the
    GPU without splitting keys, TileLang's pipeline for decode steps, key-split calls and FP8."""
    pytest.importorskip("tilelang", reason="TileLang is not installed")
    from transformers_misa.kernels.logits_shapes import OVERLAPPED_STAGES, logits_options

    def options(heads, batch, num_queries, num_keys, **flags):
        return logits_options(heads, batch, num_queries, num_keys, 132, fill_future=False, **flags)

    misa_prefill = options(8, 1, 8192, 65536, interleaved=True)
    assert misa_prefill == dict(rows_per_cta=128, block_n=128, num_stages=OVERLAPPED_STAGES, key_splits=1,
                                fill_future=False, staged_stores=True, fp8=False, interleaved=True, overlapped=True,
                                longest_first=True)  # few heads: the longest blocks first (longest_first_for)
    dsa_prefill = options(64, 1, 8192, 65536)
    assert dsa_prefill["overlapped"] and (dsa_prefill["rows_per_cta"], dsa_prefill["block_n"]) == (256, 64)
    assert not dsa_prefill["longest_first"] and options(64, 1, 8192, 65536, longest_first=True)["longest_first"]
    assert not options(8, 1, 8192, 65536, longest_first=False)["longest_first"]
    assert not dsa_prefill["staged_stores"]
    decode = options(8, 32, 4, 131072)
    assert not decode["overlapped"] and decode["rows_per_cta"] == 32 and decode["key_splits"] > 1
    assert options(8, 1, 8192, 65536, longest_first=True)["longest_first"]  # a prefill's blocks last to first
    assert not options(8, 32, 4, 131072, longest_first=True)["longest_first"]  # a decode step has one block
    assert not options(8, 32, 4, 131072)["longest_first"]
    small_prefill = options(8, 1, 300, 5000, interleaved=True)  # 19 CTAs: keys split over CTAs, no overlap
    assert small_prefill["key_splits"] > 1 and not small_prefill["overlapped"]
    # 32 heads keep the interleaved layout in the wide CTAs, not in the 128-row ones of a key-split call
    assert options(32, 1, 8192, 65536, interleaved=True)["interleaved"]
    split_many = options(32, 1, 40, 70000, interleaved=True)
    assert split_many["key_splits"] > 1 and split_many["rows_per_cta"] == 128 and not split_many["interleaved"]
    assert not options(64, 1, 8192, 65536, fp8=True)["overlapped"]
    assert not options(8, 1, 8192, 65536, overlapped=False)["overlapped"]
    assert not options(8, 1, 8192, 65534)["staged_stores"]  # a TMA row stride must be a multiple of 16 bytes


@pytest.mark.parametrize("heads,num_queries,longest_first,expected", [
    (8, 4096, None, True),  # the few routed heads of a prefill: longest first by default
    (64, 4096, None, False),  # many heads keep the launch order
    (64, 4096, True, True), (8, 4096, False, False),  # a scorer variant's choice wins
    (8, 4, None, False),  # a decode step (fewer queries than a block) has one order
])
def test_fused_select_orders_the_top_k_rows_as_the_logits(monkeypatch, heads, num_queries, longest_first, expected):
    """The fused select hands the top-k the logits' order (`longest_first_for`): the rows last to first exactly where
    the logits program took its query blocks last to first (on the CPU: both programs replaced by recorders)."""
    pytest.importorskip("tilelang", reason="TileLang is not installed")
    from transformers_misa.kernels import logits_shapes, scorer

    calls = {}
    monkeypatch.setattr(scorer, "_sm_count", lambda device: 132)

    def fake_logits(q, weights, keys, ks, ke, softmax_scale, fill_future, **flags):
        options = logits_shapes.logits_options(q.shape[2], q.shape[0], q.shape[1], keys.shape[1], 132, fill_future,
                                               longest_first=flags["longest_first"])
        calls["logits"] = options["longest_first"]
        return torch.zeros(q.shape[0], q.shape[1], keys.shape[1])

    monkeypatch.setattr(scorer, "_logits", fake_logits)
    monkeypatch.setattr(scorer, "radix_topk", lambda logits, k, ends=None, out=None, options=None: calls.setdefault(
        "topk", dict(options or {})))
    num_keys = 8192
    q = torch.zeros(1, num_queries, heads, 128)
    chunk = ChunkMask(None, slice(0, num_queries), 1, num_queries, num_keys, q.device)
    scorer.tilelang_select_tokens(q, torch.zeros(1, num_queries, heads), torch.zeros(1, num_keys, 128), chunk,
                                  128**-0.5, 2048, longest_first=longest_first)
    assert calls["logits"] is expected
    assert calls["topk"].get("longest_first", False) is expected


def test_logits_waves_hold_one_cta_per_sm(monkeypatch):
    """Queries per wave of prefill logits CTAs (132 SMs): MISA-8's wide 32-query CTAs (16 in the square ones, as FP8
    and the square-CTA scorer take them), DSA-64's wide 4-query ones (FP8: 2), and per sequence of a batch whose CTAs
    share the wave."""
    pytest.importorskip("tilelang", reason="TileLang is not installed")
    from transformers_misa.kernels import logits_shapes, scorer, variants

    monkeypatch.setattr(logits_shapes, "_sm_count", lambda device: 132)
    cpu = torch.device("cpu")
    waves = logits_shapes.logits_wave_queries
    assert waves(8, 1, cpu) == 32 * 132
    square = waves(8, 1, cpu, wide_few_heads=False)
    assert waves(8, 1, cpu, fp8=True) == square
    assert waves(8, 1, cpu, wide_few_heads=False) == 16 * 132
    assert waves(64, 1, cpu) == 4 * 132
    assert waves(64, 1, cpu, fp8=True) == 2 * 132
    assert waves(8, 2, cpu) == 32 * 66 and waves(8, 5, cpu) == 32 * 132
    assert scorer.TILELANG_SCORER.wave_queries is logits_shapes.logits_wave_queries
    assert variants.TILELANG_BUDGET_CHUNKS_SCORER.wave_queries is None


def test_query_layout_settles_interleaving_per_call():
    """`_logits`' layout choice: interleaved 2-16 heads with a whole square block, wide for 4-16 heads with a whole
    wide block; 32 heads interleaved with a whole wide block (interleaved_many_heads, the default; the kept plain
    variant turns it off); never FP8 or 64 heads."""
    pytest.importorskip("tilelang", reason="TileLang is not installed")
    from transformers_misa.kernels import logits_shapes, variants
    from transformers_misa.kernels.logits_shapes import query_layout

    def layout(heads, queries, fp8=False, wide=True, many=False):
        return query_layout(heads, queries, fp8, True, wide, many)

    assert layout(8, 100) == (True, True, 32) and layout(8, 20) == (True, False, 16) and layout(8, 12)[0] is False
    assert layout(8, 100, wide=False) == (True, False, 16) and layout(2, 500) == (True, False, 64)
    assert layout(8, 100, fp8=True)[0] is False
    assert layout(32, 100) == (False, False, 4) and layout(32, 100, many=True) == (True, False, 8)
    assert layout(32, 5, many=True)[0] is False and layout(64, 100, many=True)[0] is False
    assert layout(32, 100, fp8=True, many=True)[0] is False
    plain = variants.TILELANG_PLAIN_MANY_HEADS_SCORER
    assert logits_shapes.INTERLEAVED_MANY_HEADS and not plain.token_logits.keywords["interleaved_many_heads"]
    assert not plain.fused_select.keywords["interleaved_many_heads"]


def test_decode_rows_per_cta_fits_the_step_queries():
    pytest.importorskip("tilelang", reason="TileLang is not installed")
    from transformers_misa.kernels.logits_shapes import decode_rows_per_cta

    assert [decode_rows_per_cta(8, q) for q in (1, 2, 3, 4, 16)] == [8, 16, 32, 32, 128]
    assert [decode_rows_per_cta(64, q) for q in (1, 2)] == [64, 128]
    assert decode_rows_per_cta(4, 1) == 8  # the tensor cores' narrowest N
    assert decode_rows_per_cta(6, 1) == 128  # not a power of two: the prefill block
