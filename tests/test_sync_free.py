"""Decode steps never read a tensor back to the host: a static cache's can be captured in a CUDA graph (the capture
itself runs on the GPU: tests/test_kernels_in_models.py), and an eager step never waits for the GPU. On the CPU every
such read is trapped inside the indexers."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from transformers import DynamicCache, StaticCache

from transformers_misa import MisaIndexer, patch_model
from transformers_misa.indexer import GRAPH_SAFE_MAX_QUERIES

from conftest import left_padded_batch

_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")


@contextmanager
def trap_host_reads(monkeypatch, model):
    """Raises on any tensor-to-host conversion (and torch.equal) while a patched indexer runs a decode-size call;
    yields the list of trapped calls made."""
    active, trapped = [False], []

    def guard(name, original):
        def call(*args, **kwargs):
            if active[0]:
                raise AssertionError(f"host read-back inside a decode step: {name}")
            return original(*args, **kwargs)
        return call

    for name in _READS:
        monkeypatch.setattr(torch.Tensor, name, guard(f"Tensor.{name}", getattr(torch.Tensor, name)))
    monkeypatch.setattr(torch, "equal", guard("torch.equal", torch.equal))

    def enter(module, args):
        if args[0].shape[1] <= GRAPH_SAFE_MAX_QUERIES:
            active[0] = True
            trapped.append(module.layer_idx)

    def leave(module, args, output):
        active[0] = False

    hooks = [h for m in model.modules() if isinstance(m, MisaIndexer)
             for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    try:
        yield trapped
    finally:
        for hook in hooks:
            hook.remove()


@pytest.mark.parametrize("mode,options", [("dsa", {}), ("misa", dict(active_heads=4, block_size=16)),
                                          ("misa_hierarchical", dict(active_heads=4, block_size=16)),
                                          ("hisa", dict(block_size=16, keep_blocks=2))])
@pytest.mark.parametrize("prompt_len", [45, 12])  # 12: the prompt itself is a sync-free call (no pool yet)
@pytest.mark.parametrize("cache_kind", ["static", "dynamic"])
def test_decode_never_reads_back(make_model, monkeypatch, family, mode, options, prompt_len, cache_kind):
    """Static caches (CUDA graphs) and dynamic ones (eager `generate`: a read-back stalls the host until the GPU
    catches up) alike; the static cache generates the dynamic cache's tokens."""
    model = patch_model(make_model(family, index_topk=16), mode=mode, **options)
    ids, attn = left_padded_batch(2, prompt_len, [0, 9])
    expected = model.generate(ids, attention_mask=attn, max_new_tokens=6, do_sample=False)  # dynamic cache
    cache = (StaticCache(config=model.config, max_cache_len=96) if cache_kind == "static"
             else DynamicCache(config=model.config))
    with trap_host_reads(monkeypatch, model) as trapped:
        got = model.generate(ids, attention_mask=attn, max_new_tokens=6, do_sample=False, past_key_values=cache)
    calls = 5 + (prompt_len <= GRAPH_SAFE_MAX_QUERIES)  # every decode step, and a short prompt
    assert len(trapped) == calls * sum(isinstance(m, MisaIndexer) for m in model.modules())
    assert torch.equal(got, expected)


def test_static_cache_decode_step_compiles_to_one_graph(make_model):
    """torch.compile(fullgraph=True) traces a patched model's static-cache decode step (the reference path) without
    a graph break: no host reads, no data-dependent Python, as transformers' auto-compiled static-cache generation
    needs; the compiled step gives the eager step's logits."""
    torch._dynamo.reset()
    model = patch_model(make_model("deepseek_v32", index_topk=16, num_hidden_layers=1), mode="misa", active_heads=4,
                        block_size=16)
    ids, cache_len = torch.randint(2, 512, (1, 40), generator=torch.Generator().manual_seed(0)), 64
    key_pos = torch.arange(cache_len)

    def step_inputs(tokens: torch.Tensor, start: int, cache: StaticCache) -> dict:
        query_pos = start + torch.arange(tokens.shape[1])
        visible = (key_pos <= query_pos[:, None])[None, None]
        return dict(input_ids=tokens, position_ids=query_pos[None], past_key_values=cache,
                    attention_mask={"indexed_attention": visible})  # prepared 4D mask, as a compiled loop keeps

    logits = []
    for compiled in (False, True):
        cache = StaticCache(config=model.config, max_cache_len=cache_len)
        forward = torch.compile(model.forward, fullgraph=True) if compiled else model.forward
        with torch.no_grad():
            model(**step_inputs(ids, 0, cache))  # prefill, eager
            logits.append(forward(**step_inputs(torch.tensor([[7]]), 40, cache)).logits)
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-4)
