"""patch_model / unpatch_model end to end: same generations in exact settings, state untouched, summary."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import DynamicCache, StaticCache

from conftest import FAMILIES, exact_mode_options, indexers_of, left_padded_batch, module_snapshot
from transformers_misa import MisaConfig, MisaIndexer, is_patched, misa_summary, patch_model, unpatch_model

PROMPT, NEW_TOKENS, TOPK, BLOCK = 70, 5, 16, 16


def _patched_indexers(model) -> list[MisaIndexer]:
    return [m for m in model.modules() if isinstance(m, MisaIndexer)]


def _count_patched_calls(model) -> list[int]:
    """A one-element counter increased on every MisaIndexer forward."""
    counter = [0]

    def hook(*_):
        counter[0] += 1

    for module in _patched_indexers(model):
        module.register_forward_hook(hook)
    return counter


def _generate(model, ids, attn, cache):
    return model.generate(ids, attention_mask=attn, max_new_tokens=NEW_TOKENS, do_sample=False,
                          cache_implementation=cache, return_dict_in_generate=True, output_logits=True)


@pytest.mark.parametrize("cache,impl", [(None, "sdpa"), ("static", "sdpa"), (None, "eager")])
@pytest.mark.parametrize("family", FAMILIES)
def test_exact_settings_generate_like_unpatched(make_model, family, cache, impl):
    model = make_model(family, index_topk=TOPK, attn_implementation=impl)
    ids, attn = left_padded_batch(2, PROMPT, [0, 13])
    reference = _generate(model, ids, attn, cache)
    num_heads = model.config.index_n_heads
    modes = exact_mode_options(num_heads, TOPK, PROMPT + NEW_TOKENS, block_size=BLOCK)
    if impl == "eager":  # additive float masks: the two bit-identical settings are enough
        modes = modes[:2]
    for mode, options in modes:
        patch_model(model, mode=mode, **options)
        calls = _count_patched_calls(model)
        out = _generate(model, ids, attn, cache)
        assert calls[0] == len(_patched_indexers(model)) * NEW_TOKENS, mode
        assert torch.equal(out.sequences, reference.sequences), mode
        if mode in ("dsa", "misa"):  # bit-identical selections: bit-identical logits
            for got, expected in zip(out.logits, reference.logits):
                assert torch.equal(got, expected), mode
        unpatch_model(model)


@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_and_multi_token_decode_logits(make_model, family, cache_kind):
    """Prefill then 1-token and 3-token steps with a stock cache: dsa logits equal the unpatched model's."""
    model = make_model(family, index_topk=TOPK)
    ids, attn = left_padded_batch(2, 41, [0, 7])
    steps = [ids] + [torch.randint(2, 512, (2, n), generator=torch.Generator().manual_seed(n)) for n in (1, 3, 1, 1)]

    def run():
        cache = DynamicCache(config=model.config) if cache_kind == "dynamic" else StaticCache(
            config=model.config, max_cache_len=64)
        logits, mask = [], attn
        with torch.no_grad():
            for i, step in enumerate(steps):
                if i:
                    mask = torch.cat([mask, torch.ones_like(step)], 1)
                logits.append(model(input_ids=step, attention_mask=mask, past_key_values=cache).logits)
        return logits

    expected = run()
    patch_model(model, mode="dsa")
    for got, want in zip(run(), expected):
        assert torch.equal(got, want)
    unpatch_model(model)
    patch_model(model, mode="misa", active_heads=2, block_size=BLOCK)
    approx = run()
    assert [t.shape for t in approx] == [t.shape for t in expected]
    assert any(not torch.equal(a, e) for a, e in zip(approx, expected))  # really a different selection


APPROX = [
    ("misa", dict(active_heads=8, block_size=BLOCK)),
    ("misa_hierarchical", dict(active_heads=8, block_size=BLOCK)),
    ("hisa", dict(block_size=BLOCK)),
    ("hisa", dict(block_size=32, keep_blocks=2)),
]


@pytest.mark.parametrize("cache", [None, "static"])
@pytest.mark.parametrize("family", FAMILIES)
def test_approximate_modes_generate(make_model, family, cache):
    model = make_model(family, index_topk=TOPK)
    ids, attn = left_padded_batch(2, PROMPT, [0, 13])
    for mode, options in APPROX if cache is None else APPROX[::3]:
        patch_model(model, mode=mode, **options)
        calls = _count_patched_calls(model)
        out = _generate(model, ids, attn, cache)
        assert out.sequences.shape == (2, PROMPT + NEW_TOKENS)
        assert torch.equal(out.sequences[:, :PROMPT], ids)
        assert 0 <= int(out.sequences.min()) and int(out.sequences.max()) < model.config.vocab_size
        assert all(torch.isfinite(step).all() for step in out.logits)
        assert calls[0] == len(_patched_indexers(model)) * NEW_TOKENS
        unpatch_model(model)


# ---------------------------------------------------------------------------------- what patching changes


@pytest.mark.parametrize("family", FAMILIES)
def test_unpatch_restores_modules_and_outputs(make_model, family):
    model = make_model(family, index_topk=TOPK)
    ids, attn = left_padded_batch(2, 40, [0, 5])
    originals = indexers_of(model)
    snapshot = module_snapshot(model)
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=attn).logits

    assert not is_patched(model)
    assert patch_model(model, mode="misa", active_heads=2, block_size=BLOCK) is model
    assert is_patched(model)
    patched = _patched_indexers(model)
    assert len(patched) == len(originals) == (2 if family == "deepseek_v32" else 2)
    assert indexers_of(model) == []
    for new, old in zip(patched, originals):
        assert new.original_indexer is old
        assert new.layer_idx == old.layer_idx
        for name in ("wq_b", "wk", "k_norm", "weights_proj"):
            assert getattr(new, name) is getattr(old, name)
    with torch.no_grad():
        during = model(input_ids=ids, attention_mask=attn).logits
    assert not torch.equal(during, before)

    assert unpatch_model(model) is model
    assert module_snapshot(model) == snapshot
    assert all(a is b for a, b in zip(indexers_of(model), originals))
    assert not is_patched(model) and not hasattr(model, "misa_config")
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=attn).logits, before)
    patch_model(model, mode="dsa")  # can be patched again
    assert model.misa_config.mode == "dsa"


@pytest.mark.parametrize("family", FAMILIES)
def test_state_dict_unchanged_and_shared(make_model, family):
    model = make_model(family)
    before = model.state_dict()
    params_before = dict(model.named_parameters())
    patch_model(model, mode="hisa", block_size=BLOCK)
    after = model.state_dict()
    assert list(after) == list(before)
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name
        assert after[name].data_ptr() == tensor.data_ptr(), name
    params_after = dict(model.named_parameters())
    assert params_after.keys() == params_before.keys()
    assert all(params_after[n] is params_before[n] for n in params_before)
    assert any(".indexer.wq_b." in name for name in after)


def test_bf16_model(make_model):
    model = make_model("glm_moe_dsa", index_topk=TOPK, dtype=torch.bfloat16)
    ids, attn = left_padded_batch(2, 50, [0, 6])
    reference = model.generate(ids, attention_mask=attn, max_new_tokens=4, do_sample=False)
    patch_model(model, mode="dsa")
    for module in _patched_indexers(model):
        params = list(module.parameters())
        assert params and all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in params)
    assert torch.equal(model.generate(ids, attention_mask=attn, max_new_tokens=4, do_sample=False), reference)
    unpatch_model(model)
    patch_model(model, mode="misa", active_heads=4, block_size=BLOCK)
    out = model.generate(ids, attention_mask=attn, max_new_tokens=4, do_sample=False)
    assert out.shape == (2, 54)


def test_summary_lists_shared_glm_layer(make_model):
    model = patch_model(make_model("glm_moe_dsa", index_topk=TOPK), mode="misa", active_heads=4)
    rows = misa_summary(model)
    assert [(r.layer_idx, r.status) for r in rows] == [(0, "patched"), (1, "shared"), (2, "patched")]
    shared = rows[1]
    assert shared.name == "model.layers.1.self_attn" and shared.n_heads is None and shared.topk is None
    for row in (rows[0], rows[2]):
        assert row.family == "glm_moe_dsa" and row.n_heads == 32 and row.topk == TOPK
        assert isinstance(model.get_submodule(row.name), MisaIndexer)


def test_summary_deepseek(make_model):
    model = patch_model(make_model("deepseek_v32"), mode="dsa")
    rows = misa_summary(model)
    assert [(r.name, r.status, r.family, r.n_heads, r.topk) for r in rows] == [
        (f"model.layers.{i}.self_attn.indexer", "patched", "deepseek_v32", 64, 64) for i in range(2)]


@pytest.mark.parametrize("mode,options,expected", [
    ("misa", {}, dict(active_heads=8, block_size=128, candidate_factor=None, keep_blocks=None, router="sum")),
    ("misa", dict(router="max"), dict(active_heads=8, router="max")),
    ("misa_hierarchical", dict(router="max"), dict(candidate_factor=4, router="max")),
    ("misa", dict(active_heads=3, block_size=32, query_chunk_size=5),
     dict(active_heads=3, block_size=32, query_chunk_size=5)),
    ("misa_hierarchical", {}, dict(active_heads=8, block_size=128, candidate_factor=4, keep_blocks=None)),
    ("hisa", {}, dict(active_heads=None, block_size=128, keep_blocks=2, router=None)),  # max(2, ceil(4·64/128))
    ("hisa", dict(block_size=16), dict(block_size=16, keep_blocks=16)),  # ceil(4·64/16)
    ("dsa", {}, dict(active_heads=None, block_size=None, candidate_factor=None, keep_blocks=None,
                     query_chunk_size=None)),
])
def test_misa_config_values(make_model, mode, options, expected):
    model = patch_model(make_model("deepseek_v32"), mode=mode, **options)
    config = model.misa_config
    assert isinstance(config, MisaConfig) and config.mode == mode
    for name, value in expected.items():
        assert getattr(config, name) == value, name
    assert all(m.misa_config == config for m in _patched_indexers(model))
    assert MisaConfig.from_dict(config.to_dict()) == config
    if mode == "hisa":
        assert config.keep_blocks * config.block_size >= model.config.index_topk
        assert config.keep_blocks == max(2, math.ceil(4 * model.config.index_topk / config.block_size))
