"""The model's masks as the reference indexers read them (`ops.masks`): a plain causal mask (bool or additive, a
static cache's prompt) is recognised exactly and takes the maskless path; a padded mask's key ranges are read once
per mask, not once per layer."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from test_reference_ops import _random_problem  # this folder's brute-force problems
from transformers_misa.ops import masks, reference
from transformers_misa.ops.reference import dsa_topk, hisa_topk, misa_hierarchical_topk, misa_topk


def _causal(batch, num_queries, num_keys):
    return masks.ChunkMask(None, slice(0, num_queries), batch, num_queries, num_keys, torch.device("cpu")).visible


@pytest.mark.parametrize("budget", [2**30, 3 * 2 * 50 * 3])  # one comparison chunk, or chunks of 3 queries
def test_plain_causal_masks_are_recognised_exactly(budget):
    """A model's causal mask (bool, or additive in its dtype, per sequence or broadcast) is what no mask means; any
    other mask (left padding, static-cache slots past the written keys, one key more or less) is not."""
    def check(mask, batch=2, num_queries=20, num_keys=50):
        return masks.causal_prefix(mask, batch, num_queries, num_keys, budget) == num_keys

    causal = _causal(2, 20, 50).clone()
    assert check(causal)
    assert check(causal[:1])  # [1, S, T], broadcast over the batch
    additive = torch.zeros(causal.shape, dtype=torch.bfloat16).masked_fill(~causal, torch.finfo(torch.bfloat16).min)
    assert check(additive)
    padded = causal.clone()
    padded[1, :, :3] = False  # left padding
    assert not check(padded)
    slack = _causal(2, 20, 60)[..., :50].clone()  # queries not at the last positions (unwritten cache slots)
    assert not check(slack)
    for row, col, value in ((19, 3, False), (0, 31, True), (12, 49, True)):  # a hole, a future key, in a late chunk
        changed = causal.clone()
        changed[0, row, col] = value
        assert not check(changed), (row, col)
    moved = causal.clone()  # as many keys as causal, one of them moved into the future
    moved[1, 15, 7], moved[1, 15, 40] = False, True
    assert not check(moved)


def _static(batch, num_queries, written, slots):
    """A static cache's mask: queries at the last of the `written` positions, unwritten slots up to `slots` hidden."""
    return torch.nn.functional.pad(_causal(batch, num_queries, written), (0, slots - written), value=False)


def test_causal_prefix_finds_a_static_caches_written_keys():
    """A static cache's prompt (or a later chunk of it) is causal over the written keys with the unwritten slots
    hidden: the prefix length is found; a visible slot past it, a hole, or rows that disagree give None."""
    def prefix(mask, batch=2, num_queries=20, num_keys=50):
        return masks.causal_prefix(mask, batch, num_queries, num_keys, 3 * 2 * 50 * 3)  # chunks of 3 queries

    assert prefix(_causal(2, 20, 50).clone()) == 50
    assert prefix(_static(2, 20, 20, 50)) == 20  # the prompt of a 50-slot static cache
    assert prefix(_static(1, 20, 33, 50)) == 33  # a second chunk of the prompt, queries at positions 13..32
    additive = torch.zeros(2, 20, 50).masked_fill(~_static(2, 20, 33, 50), torch.finfo(torch.float32).min)
    assert prefix(additive) == 33
    for row, col, value in ((5, 40, True), (19, 40, True), (19, 3, False), (0, 20, True)):  # a slot, a hole, a future key
        changed = _static(2, 20, 33, 50).clone()
        changed[1, row, col] = value
        assert prefix(changed) is None, (row, col, value)
    assert prefix(torch.cat([_static(1, 20, 33, 50), _static(1, 20, 34, 50)])) is None  # rows disagree
    assert prefix(_static(2, 20, 20, 50)[:, :, :19], num_keys=19) is None  # fewer keys than queries


@pytest.mark.parametrize("mode", ["dsa", "misa", "misa_hierarchical"])
def test_a_static_cache_prompt_is_selected_as_a_dynamic_caches(mode, monkeypatch):
    """With the kernels' narrowing, a static cache's prompt (garbage in the unwritten slots, hidden by its mask) takes
    the maskless path over its written keys: the same top-k as the dynamic cache's call, and no chunk reads a mask.
    Fewer written keys than k keep the mask (the output keeps k columns)."""
    narrowing = dataclasses.replace(reference.REFERENCE, narrow_keys=True)
    generator = torch.Generator().manual_seed(3)
    q = torch.randn(1, 40, 4, 16, generator=generator)
    weights = torch.randn(1, 40, 4, generator=generator)
    written = torch.randn(1, 40, 16, generator=generator)
    slots = torch.cat([written, 1e3 * torch.randn(1, 24, 16, generator=generator)], dim=1)  # garbage past the prompt
    options = dict(softmax_scale=0.25, scorer=narrowing)
    if mode != "dsa":
        options.update(active_heads=2, block_size=8)
    if mode == "misa_hierarchical":
        options.update(candidate_factor=2)
    run = getattr(reference, f"{mode}_topk")
    chunk_masks = []
    real_chunk_mask = reference.ChunkMask
    monkeypatch.setattr(reference, "ChunkMask",
                        lambda mask, *a, **kw: chunk_masks.append(mask) or real_chunk_mask(mask, *a, **kw))
    dynamic = run(q, written, weights, 8, mask=_causal(1, 40, 40), **options)
    static = run(q, slots, weights, 8, mask=_static(1, 40, 40, 64), **options)
    assert torch.equal(static, dynamic)
    assert chunk_masks and all(mask is None for mask in chunk_masks)
    short = run(q[:, :4], slots[:, :6], weights[:, :4], 8, mask=_static(1, 4, 4, 6)[:, :, :6], **options)
    assert short.shape == (1, 4, 6) and any(mask is not None for mask in chunk_masks)


def test_plain_causal_answers_are_kept_per_mask_until_it_changes(monkeypatch):
    """A model gives each layer a new view of one mask: the check runs once for all of them, again after an in-place
    write to the mask (its version counter), and every time for inference-mode tensors (no version counter)."""
    checks = []
    real_compare = masks._causal_prefix_length
    monkeypatch.setattr(masks, "_causal_prefix_length", lambda *a: checks.append(1) or real_compare(*a))
    model_mask = _causal(2, 20, 50).clone().unsqueeze(1)  # [B, 1, S, T], as the attention gets it

    def layer_check():
        return masks.causal_prefix(model_mask[:, 0], 2, 20, 50, 2**30) == 50

    assert layer_check() and layer_check() and layer_check()
    assert len(checks) == 1
    assert masks.causal_prefix(model_mask[:1, 0], 2, 20, 50, 2**30) == 50 and len(checks) == 2  # another view
    model_mask[1, 0, 4, 40] = True  # a future key (query 4 is at position 34), written in place
    assert not layer_check() and not layer_check()
    assert len(checks) == 3
    with torch.inference_mode():
        inference_mask = _causal(2, 20, 50).clone()
        assert masks.causal_prefix(inference_mask, 2, 20, 50, 2**30) == 50
        inference_mask[0, 3, 40] = True
        assert masks.causal_prefix(inference_mask, 2, 20, 50, 2**30) != 50
    assert len(checks) == 5


@pytest.mark.parametrize("mode", ["dsa", "misa"])
def test_a_padded_mask_is_read_in_the_first_layer_only(mode, monkeypatch):
    """Each layer gets a new view of the model's padded mask: the query chunks' key ranges are read from it in the
    first layer, the later layers reuse them and select the same; an in-place write to the mask reads them again."""
    q, keys, weights, padded, scale = _random_problem(batch=2, num_queries=96, num_keys=96, pads=(0, 7), shift=1.0)
    model_mask = padded.unsqueeze(1)  # [B, 1, S, T], as the attention gets it
    narrowing = dataclasses.replace(reference.REFERENCE, narrow_keys=True, chunk_budget=100_000)
    select = {
        "dsa": lambda mask: dsa_topk(q, keys, weights, 8, softmax_scale=scale, scorer=narrowing, mask=mask),
        "misa": lambda mask: misa_topk(q, keys, weights, 8, softmax_scale=scale, active_heads=2, block_size=8,
                                       scorer=narrowing, mask=mask),
    }[mode]
    reads = []
    real_remembered = masks.remembered
    monkeypatch.setattr(masks, "remembered",
                        lambda mask, fact, read: real_remembered(mask, fact, lambda: reads.append(fact[0]) or read()))
    first = select(model_mask[:, 0])
    assert reads.count("key_range") > 1 and "causal_prefix" in reads  # several chunks; not plain causal
    reads.clear()
    assert torch.equal(select(model_mask[:, 0]), first)
    assert reads == []
    model_mask[0, 0, 50, 3] = False  # a hole, written in place
    select(model_mask[:, 0])
    assert "key_range" in reads
    reads.clear()  # sync-free chunks (decode steps a CUDA graph may capture) compute their own ranges every time
    masks.ChunkMask(model_mask[:, 0], slice(0, 10), 2, 96, 96, torch.device("cpu"), sync_free=True).key_range
    assert reads == []


@pytest.mark.parametrize("mode", ["dsa", "misa", "misa_hierarchical", "hisa"])
def test_a_plain_causal_mask_takes_the_maskless_path(mode, monkeypatch):
    """With a scorer that narrows keys (the kernels), a model's causal mask is dropped after one check: the chunks
    are the causal ones and the selection is the maskless one; a padded mask keeps the masked path."""
    q, keys, weights, _, scale = _random_problem(batch=2, num_queries=96, num_keys=96, pads=(0, 0), shift=1.0)
    narrowing = dataclasses.replace(reference.REFERENCE, narrow_keys=True, chunk_budget=100_000)
    run = {
        "dsa": lambda **kw: dsa_topk(q, keys, weights, 8, softmax_scale=scale, scorer=narrowing, **kw),
        "misa": lambda **kw: misa_topk(q, keys, weights, 8, softmax_scale=scale, active_heads=2, block_size=8,
                                       scorer=narrowing, **kw),
        "misa_hierarchical": lambda **kw: misa_hierarchical_topk(q, keys, weights, 8, softmax_scale=scale,
                                                                 active_heads=2, block_size=8, candidate_factor=2,
                                                                 scorer=narrowing, **kw),
        "hisa": lambda **kw: hisa_topk(q, keys, weights, 8, softmax_scale=scale, block_size=8, keep_blocks=2,
                                       scorer=narrowing, **kw),
    }[mode]
    paths = []
    real_causal, real_plain = reference.causal_query_chunks, reference.query_chunks
    monkeypatch.setattr(reference, "causal_query_chunks", lambda *a: paths.append("causal") or real_causal(*a))
    monkeypatch.setattr(reference, "query_chunks", lambda *a: paths.append("masked") or real_plain(*a))
    maskless = run()
    causal = _causal(2, 96, 96)
    additive = torch.zeros(causal.shape).masked_fill(~causal, torch.finfo(torch.float32).min)
    assert torch.equal(run(mask=additive), maskless)
    assert set(paths) == {"causal"}, paths
    paths.clear()
    padded = causal.clone()
    padded[1, :, :5] = False
    run(mask=padded)
    assert "masked" in paths and "causal" not in paths, paths
