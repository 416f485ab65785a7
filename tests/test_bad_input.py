"""Bad input: a clear ValueError, and the model left exactly as it was."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import assert_untouched, left_padded_batch, module_snapshot
from transformers_misa import MisaConfig, measure_recall, patch_model, unpatch_model
from transformers_misa.tiny import tiny_model


@pytest.fixture(scope="module")
def llama():
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(config).eval()


def test_non_dsa_model_is_rejected(llama):
    snapshot = module_snapshot(llama)
    with pytest.raises(ValueError, match=r"no DSA indexer found in LlamaForCausalLM.*deepseek_v32.*glm_moe_dsa"):
        patch_model(llama, mode="misa")
    assert_untouched(llama, snapshot)
    with pytest.raises(ValueError, match="not patched"):
        unpatch_model(llama)
    with pytest.raises(ValueError, match="needs a patched model"):
        measure_recall(llama, torch.randint(0, 128, (1, 8)))


# (options, message regex) for a deepseek_v32 tiny model: 64 indexer heads, index_topk 64.
BAD = [
    (dict(mode="misa", active_heads=0), r"active_heads must be a positive int, got 0"),
    (dict(mode="misa", active_heads=-1), r"active_heads must be a positive int, got -1"),
    (dict(mode="misa", active_heads=65), r"active_heads=65 exceeds the model's index_n_heads=64; use 1\.\.64"),
    (dict(mode="misa_hierarchical", active_heads=100), r"active_heads=100 exceeds .*index_n_heads=64"),
    (dict(mode="misa", active_heads=True), r"active_heads must be a positive int, got True"),
    (dict(mode="misa", active_heads=2.5), r"active_heads must be a positive int, got 2\.5"),
    (dict(mode="misa", active_heads="8"), r"active_heads must be a positive int, got '8'"),
    (dict(mode="sparse"), r"unknown mode 'sparse'; choose one of \['dsa', 'misa', 'misa_hierarchical', 'hisa'\]"),
    (dict(mode="MISA"), r"unknown mode 'MISA'"),
    (dict(mode="misa", top_k=8), r"unknown option\(s\) \['top_k'\]; known options: \[.*'active_heads'"),
    (dict(mode="misa", keep_blocks=4), r"option\(s\) \['keep_blocks'\] have no effect in mode 'misa'"),
    (dict(mode="misa", candidate_factor=2), r"\['candidate_factor'\] have no effect in mode 'misa'"),
    (dict(mode="hisa", active_heads=8), r"option\(s\) \['active_heads'\] have no effect in mode 'hisa'"),
    (dict(mode="dsa", block_size=64), r"\['block_size'\] have no effect in mode 'dsa'"),
    (dict(mode="dsa", active_heads=4), r"\['active_heads'\] have no effect in mode 'dsa'"),
    (dict(mode="misa", block_size=0), r"block_size must be a positive int, got 0"),
    (dict(mode="hisa", block_size=-16), r"block_size must be a positive int, got -16"),
    (dict(mode="misa_hierarchical", candidate_factor=0), r"candidate_factor must be a positive int, got 0"),
    (dict(mode="misa", query_chunk_size=0), r"query_chunk_size must be a positive int, got 0"),
    (dict(mode="hisa", keep_blocks=0), r"keep_blocks must be a positive int, got 0"),
    (dict(mode="hisa", keep_blocks=1, block_size=128), r"keep_blocks=1 .*use keep_blocks >= 2"),
    (dict(mode="misa", qk_format="fp8"), r"unknown qk_format 'fp8'; choose one of \['bf16', 'fp8_e4m3'\]"),
    (dict(mode="misa", router="mean"), r"unknown router 'mean'; choose one of \['sum', 'max'\]"),
    (dict(mode="hisa", router="max"), r"option\(s\) \['router'\] have no effect in mode 'hisa'"),
    (dict(mode="dsa", router="sum"), r"\['router'\] have no effect in mode 'dsa'"),
    (dict(mode="hisa", keep_blocks=3, block_size=16),
     r"keep_blocks=3 with block_size=16 keeps 48 tokens, fewer than index_topk=64.*use keep_blocks >= 4"),
]


@pytest.mark.parametrize("kwargs,message", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_options_rejected_untouched(kwargs, message):
    model = tiny_model("deepseek_v32")
    snapshot = module_snapshot(model)
    with pytest.raises(ValueError, match=message):
        patch_model(model, **kwargs)
    assert_untouched(model, snapshot)


def test_smallest_valid_keep_blocks_is_accepted():
    model = patch_model(tiny_model("deepseek_v32"), mode="hisa", keep_blocks=4, block_size=16)
    assert model.misa_config.keep_blocks == 4


def test_patching_twice_is_rejected():
    model = patch_model(tiny_model("glm_moe_dsa"), mode="misa", active_heads=4)
    snapshot = module_snapshot(model)
    config = model.misa_config
    with pytest.raises(ValueError, match=r"already patched.*unpatch_model\(model\) first"):
        patch_model(model, mode="dsa")
    assert module_snapshot(model) == snapshot
    assert model.misa_config is config


def test_layers_that_disagree_are_rejected_untouched():
    """Defaults that depend on the layer (HISA's keep_blocks from index_topk) must agree across layers."""
    model = tiny_model("deepseek_v32")
    model.model.layers[1].self_attn.indexer.index_topk = 32
    snapshot = module_snapshot(model)
    with pytest.raises(ValueError, match="differ in shape"):
        patch_model(model, mode="hisa", block_size=16)
    assert_untouched(model, snapshot)


def test_bad_option_in_last_layer_leaves_first_layers_unpatched():
    """Validation happens for every layer before the first swap."""
    model = tiny_model("glm_moe_dsa")
    model.model.layers[2].self_attn.indexer.n_heads = 4  # only the last indexer is too small for 8 heads
    snapshot = module_snapshot(model)
    with pytest.raises(ValueError, match=r"active_heads=8 exceeds the model's index_n_heads=4"):
        patch_model(model, mode="misa")
    assert_untouched(model, snapshot)


def test_unpatch_twice_and_recall_after_unpatch():
    model = patch_model(tiny_model("deepseek_v32"), mode="dsa")
    unpatch_model(model)
    snapshot = module_snapshot(model)
    with pytest.raises(ValueError, match="model is not patched by transformers_misa; nothing to unpatch"):
        unpatch_model(model)
    ids, attn = left_padded_batch(1, 8)
    with pytest.raises(ValueError, match=r"measure_recall needs a patched model: call patch_model"):
        measure_recall(model, ids, attn)
    assert_untouched(model, snapshot)


def test_config_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match=r"unknown MISA settings \['topk'\]"):
        MisaConfig.from_dict({"mode": "misa", "topk": 3})


def test_tiny_model_unknown_family():
    with pytest.raises(ValueError, match="unknown family 'llama'"):
        tiny_model("llama")
