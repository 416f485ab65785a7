"""Router calibration: fit, save / load, pick-up by patch_model and by saved custom code, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from transformers_misa import CALIBRATION_FILE, RouterCalibration, calibrate, is_patched, patch_model, \
    save_patched, unpatch_model
from transformers_misa.indexer import MisaIndexer
from transformers_misa.ops import reference
from transformers_misa.tiny import tiny_model

BLOCK = 16


def _texts(count: int = 2, length: int = 160, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 512, (length,), generator=gen) for _ in range(count)]


@pytest.fixture(scope="module")
def fitted() -> RouterCalibration:
    model = tiny_model("deepseek_v32", index_topk=16)
    return calibrate(model, _texts(), block_size=BLOCK, active_heads=(4, 8), progress=False)


def test_calibrate_fits_one_factor_per_layer_and_head(fitted):
    assert fitted.head_scale.shape == (len(fitted.layer_ids), 64)
    assert fitted.layer_ids == [0, 1] and fitted.block_size == BLOCK and fitted.model_type == "deepseek_v32"
    assert torch.isfinite(fitted.head_scale).all() and (fitted.head_scale > 0).all()
    kept_rows = [fitted.layer_ids.index(layer) for layer in fitted.info["layers_kept"]]
    for row in range(len(fitted.layer_ids)):
        is_identity = torch.equal(fitted.head_scale[row], torch.ones(64))
        assert is_identity != (row in kept_rows)  # a kept layer has its fitted factors, a dropped one ones
    # The guard: a kept layer's recall on the calibration text is not lower at any active-heads setting.
    for heads, pair in fitted.info["recall_on_calibration_text"].items():
        for layer in fitted.info["layers_kept"]:
            assert pair["calibrated"][layer] >= pair["uncalibrated"][layer]
    assert fitted.info["texts"] == 2 and fitted.info["tokens"] == 320


def test_calibrate_restores_a_patched_model():
    model = patch_model(tiny_model("deepseek_v32", index_topk=16), mode="hisa", block_size=BLOCK)
    config = model.misa_config
    calibrate(model, _texts(1), block_size=BLOCK, active_heads=(8,), progress=False)
    assert is_patched(model) and model.misa_config == config


def test_save_load_round_trip(fitted, tmp_path):
    path = fitted.save(tmp_path / "cal.safetensors")
    loaded = RouterCalibration.load(path)
    assert torch.equal(loaded.head_scale, fitted.head_scale) and loaded.layer_ids == fitted.layer_ids
    assert (loaded.block_size, loaded.model_type, loaded.index_n_heads) == (BLOCK, "deepseek_v32", 64)
    assert loaded.info["layers_kept"] == fitted.info["layers_kept"]


def test_router_uses_the_factors():
    torch.manual_seed(0)
    q, keys = torch.rand(1, 40, 8, 32), torch.rand(1, 40, 32)  # positive: no ReLU-zero ties
    weights = torch.rand(1, 40, 8)
    common = dict(softmax_scale=0.2, active_heads=2, block_size=8)
    plain = reference.misa_topk(q, keys, weights, 8, **common)
    assert torch.equal(plain, reference.misa_topk(q, keys, weights, 8, head_scale=torch.ones(8), **common))
    # Favour heads 6 and 7 overwhelmingly: routing to them equals DSA over those two heads.
    scale = torch.tensor([1e-6] * 6 + [1e6, 1e6])
    routed = reference.misa_topk(q, keys, weights, 8, head_scale=scale, **common)
    only_two = reference.dsa_topk(q[:, :, 6:], keys, weights[:, :, 6:], 8, softmax_scale=0.2)
    rows = slice(8, None)  # queries that see more than k keys (earlier rows pad with arbitrary masked indices)
    assert torch.equal(routed[:, rows].sort(-1).values, only_two[:, rows].sort(-1).values)


def test_patch_model_picks_it_up(fitted, tmp_path):
    model = tiny_model("deepseek_v32", index_topk=16)
    path = fitted.save(tmp_path / "x.safetensors")
    patch_model(model, mode="misa", block_size=BLOCK, calibration=path)
    assert model.misa_calibration is not None
    indexer = next(m for m in model.modules() if isinstance(m, MisaIndexer) and m.layer_idx == 1)
    assert torch.equal(indexer.head_scale, fitted.scale_for(1))
    unpatch_model(model)
    assert not hasattr(model, "misa_calibration")


def test_auto_pickup_beside_the_checkpoint(fitted, tmp_path):
    tiny_model("deepseek_v32", index_topk=16).save_pretrained(tmp_path)
    fitted.save(tmp_path / CALIBRATION_FILE)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert patch_model(model, mode="misa", block_size=BLOCK).misa_calibration is not None
    unpatch_model(model)
    assert patch_model(model, mode="misa", block_size=BLOCK, calibration=None).misa_calibration is None
    unpatch_model(model)
    assert patch_model(model, mode="misa", block_size=BLOCK, calibration=False).misa_calibration is None
    unpatch_model(model)
    with pytest.raises(TypeError, match="a path or a RouterCalibration"):
        patch_model(model, mode="misa", block_size=BLOCK, calibration=3)
    assert not hasattr(model, "misa_config")  # a failed patch leaves the model untouched
    # Another block size or a mode without a router: the file is not used.
    assert patch_model(model, mode="misa", block_size=2 * BLOCK).misa_calibration is None
    unpatch_model(model)
    assert patch_model(model, mode="hisa", block_size=BLOCK).misa_calibration is None


@pytest.mark.usefixtures("offline_modules_cache")
def test_saved_custom_code_loads_the_calibration(fitted, tmp_path):
    model = patch_model(tiny_model("deepseek_v32", index_topk=16), mode="misa_hierarchical", block_size=BLOCK,
                        calibration=fitted)
    out = save_patched(model, tmp_path / "saved")
    assert json.loads((out / "config.json").read_text())["misa"]["calibration"] == CALIBRATION_FILE
    assert (out / CALIBRATION_FILE).is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert torch.equal(reloaded.misa_calibration.head_scale, fitted.head_scale)
    prompt = torch.randint(2, 512, (1, 70), generator=torch.Generator().manual_seed(5))
    assert torch.equal(reloaded.generate(prompt, max_new_tokens=3, do_sample=False),
                       model.generate(prompt, max_new_tokens=3, do_sample=False))


@pytest.mark.usefixtures("offline_modules_cache")
def test_saved_folder_with_a_calibration_for_another_model(fitted, tmp_path):
    model = patch_model(tiny_model("deepseek_v32", index_topk=16), mode="misa", block_size=BLOCK, calibration=fitted)
    out = save_patched(model, tmp_path / "saved_other")
    glm = tiny_model("glm_moe_dsa", index_topk=16)
    calibrate(glm, _texts(1), block_size=BLOCK, active_heads=(8,), progress=False).save(out / CALIBRATION_FILE)
    with pytest.raises(ValueError, match="fitted on another model") as error:
        AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert "index_n_heads: calibration 32, model 64" in str(error.value)


def test_model_card_names_the_calibration_and_shows_eval_results(fitted):
    from pathlib import Path

    from transformers_misa.hub import model_card

    model = patch_model(tiny_model("deepseek_v32", index_topk=16), mode="misa", block_size=BLOCK, calibration=fitted)
    assert f"router calibration `{CALIBRATION_FILE}`" in str(model_card(model))
    results = Path(__file__).resolve().parents[1] / "benchmarks/results/eval_trained-20261123/deepseek_v32/results.json"
    card = str(model_card(model, results_json=results))
    assert "Evaluation (recall of DSA's top-k" in card and "| mode | perplexity | ppl_change |" in card
    assert "| misa8_hier+cal | 122.5 |" in card


# --------------------------------------------------------------------------------------------- bad input


def test_texts_shorter_than_one_block():
    model = tiny_model("deepseek_v32", index_topk=16)
    with pytest.raises(ValueError, match=r"text 1 has 10 tokens, fewer than one block \(block_size=16\)"):
        calibrate(model, [torch.arange(3, 100), torch.arange(3, 13)], block_size=BLOCK, progress=False)
    with pytest.raises(ValueError, match="pass the model's tokenizer"):
        calibrate(model, ["some text"], block_size=BLOCK, progress=False)
    with pytest.raises(ValueError, match="non-empty list"):
        calibrate(model, [], block_size=BLOCK, progress=False)


@pytest.mark.parametrize("other, fragment", [
    (dict(family="glm_moe_dsa"), "model_type: calibration deepseek_v32, model glm_moe_dsa"),
    (dict(family="deepseek_v32", index_n_heads=32), "index_n_heads: calibration 64, model 32"),
    (dict(family="deepseek_v32", num_hidden_layers=3), "num_hidden_layers: calibration 2, model 3"),
])
def test_calibration_for_another_model(fitted, tmp_path, other, fragment):
    model = tiny_model(other.pop("family"), index_topk=16, **other)
    path = fitted.save(tmp_path / "c.safetensors")
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(ValueError, match="fitted on another model") as error:
        patch_model(model, mode="misa", block_size=BLOCK, calibration=path)
    assert fragment in str(error.value) and "calibrate" in str(error.value)
    assert not is_patched(model) and all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_calibration_with_another_block_size_or_mode(fitted):
    model = tiny_model("deepseek_v32", index_topk=16)
    with pytest.raises(ValueError, match="fitted with block_size=16, the patch uses block_size=32"):
        patch_model(model, mode="misa", block_size=32, calibration=fitted)
    with pytest.raises(ValueError, match="applies to modes 'misa' and 'misa_hierarchical', not 'hisa'"):
        patch_model(model, mode="hisa", block_size=BLOCK, calibration=fitted)
    assert not is_patched(model)


def test_calibration_records_its_router(tmp_path):
    model = tiny_model("deepseek_v32", index_topk=16)
    by_max = calibrate(model, _texts(), block_size=BLOCK, router="max", active_heads=(4,), progress=False)
    assert by_max.router == "max"
    assert RouterCalibration.load(by_max.save(tmp_path / "max.safetensors")).router == "max"
    with pytest.raises(ValueError, match="fitted for router='max', the patch uses router='sum'.*recalibrate"):
        patch_model(model, mode="misa", block_size=BLOCK, calibration=by_max)
    assert not is_patched(model)
    patch_model(model, mode="misa", block_size=BLOCK, router="max", calibration=by_max)
    assert model.misa_config.router == "max"
    unpatch_model(model)
    with pytest.raises(ValueError, match="unknown router 'mean'"):
        calibrate(model, _texts(), block_size=BLOCK, router="mean", progress=False)


def test_calibration_files_without_a_router_read_as_sum(fitted, tmp_path):
    """Files written before the router option (the shipped ones among them) were fitted for the sum."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = fitted.save(tmp_path / "cal.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    meta = json.loads(metadata["misa"])
    del meta["router"]
    save_file(tensors, str(path), metadata={**metadata, "misa": json.dumps(meta)})
    assert RouterCalibration.load(path).router == "sum"


def test_not_a_calibration_file(tmp_path):
    from safetensors.torch import save_file

    save_file({"weight": torch.ones(2)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(ValueError, match="not a transformers_misa router calibration"):
        RouterCalibration.load(tmp_path / "w.safetensors")
    model = tiny_model("deepseek_v32", index_topk=16)
    with pytest.raises(FileNotFoundError, match="not found"):
        patch_model(model, mode="misa", calibration=tmp_path / "missing.safetensors")
