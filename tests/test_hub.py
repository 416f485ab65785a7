"""save_patched / loading with trust_remote_code / push_to_hub / model cards / CLI push / examples (all offline)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch
import transformers.dynamic_module_utils as dynamic_module_utils
from transformers import AutoConfig, AutoModelForCausalLM

import transformers_misa
from conftest import FAMILIES
from transformers_misa import MisaConfig, MisaIndexer, misa_summary, patch_model
from transformers_misa.cli import main as cli_main
from transformers_misa.hub import check_misa_settings, model_card, push_to_hub, save_patched
from transformers_misa.tiny import tiny_model

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"misa": dict(mode="misa", active_heads=8, block_size=32), "hisa": dict(mode="hisa", block_size=32)}
EXPECTED_FILES = ["config.json", "configuration_misa.py", "generation_config.json", "model.safetensors",
                  "modeling_misa.py"]


@pytest.fixture(scope="module", autouse=True)
def _offline_hub(offline_modules_cache):
    yield


@pytest.fixture
def hub_calls(monkeypatch):
    """Records every HfApi call that could touch the Hub (none goes out); upload_folder records the files."""
    calls: list[tuple[str, dict]] = []

    def recorder(name):
        def record(self, *args, **kwargs):
            if name == "upload_folder":
                folder = Path(kwargs["folder_path"])
                kwargs["files"] = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
                kwargs["card"] = (folder / "README.md").read_text(encoding="utf-8")
                kwargs["config"] = json.loads((folder / "config.json").read_text(encoding="utf-8"))
            calls.append((name, {"args": args, **kwargs}))
            return f"recorded {name}"
        return record

    for name in ("create_repo", "create_branch", "upload_folder", "upload_file", "create_commit"):
        monkeypatch.setattr(huggingface_hub.HfApi, name, recorder(name))
    return calls


@pytest.fixture
def no_token(monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)


def _patched(family: str, setting: str = "misa"):
    model = tiny_model(family, index_topk=16)
    return patch_model(model, **SETTINGS[setting])


def _indexer_layout(model) -> list[tuple[str, int, int]]:
    return [(name, m.layer_idx, m.n_heads) for name, m in model.named_modules() if isinstance(m, MisaIndexer)]


# --------------------------------------------------------------------------------------------- save + load


@pytest.mark.parametrize("setting", sorted(SETTINGS))
@pytest.mark.parametrize("family", FAMILIES)
def test_save_patched_reloads_the_patched_model(tmp_path, family, setting):
    model = _patched(family, setting)
    out = save_patched(model, tmp_path / "saved")
    assert sorted(p.name for p in out.iterdir()) == EXPECTED_FILES
    assert not [p for p in tmp_path.iterdir() if p.name != "saved"]  # the temp folder is gone

    config = json.loads((out / "config.json").read_text())
    assert config["misa"] == {**model.misa_config.to_dict(), "version": transformers_misa.__version__,
                              "calibration": None}
    base_config, base_model = type(model.config).__name__, type(model).__name__
    assert config["auto_map"] == {"AutoConfig": f"configuration_misa.Misa{base_config}",
                                  "AutoModelForCausalLM": f"modeling_misa.Misa{base_model}"}
    assert config["model_type"] == f"{family}_misa"
    modeling = (out / "modeling_misa.py").read_text()
    assert "\nimport transformers_misa\n" in modeling and f"class Misa{base_model}({base_model}):" in modeling
    assert f"class Misa{base_config}({base_config}):" in (out / "configuration_misa.py").read_text()

    reloaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert type(reloaded).__name__ == f"Misa{base_model}" and isinstance(reloaded, type(model))
    assert reloaded.misa_config == model.misa_config
    assert _indexer_layout(reloaded) == _indexer_layout(model)
    assert [row.status for row in misa_summary(reloaded)] == [row.status for row in misa_summary(model)]
    expected_state, state = model.state_dict(), reloaded.state_dict()
    assert sorted(state) == sorted(expected_state)
    assert all(torch.equal(state[name], expected_state[name]) for name in state)

    prompt = torch.randint(2, 512, (1, 80), generator=torch.Generator().manual_seed(3))
    expected = model.generate(prompt, max_new_tokens=4, do_sample=False)
    assert torch.equal(reloaded.generate(prompt, max_new_tokens=4, do_sample=False), expected)

    again = save_patched(reloaded, tmp_path / "again")  # a reloaded model saves the same way
    assert json.loads((again / "config.json").read_text())["auto_map"] == config["auto_map"]
    assert (again / "modeling_misa.py").read_text() == modeling


def test_save_into_existing_folder_replaces_files(tmp_path):
    model = _patched("deepseek_v32")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "config.json").write_text("{}")
    (tmp_path / "out" / "notes.txt").write_text("kept")
    save_patched(model, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["misa"]["mode"] == "misa"
    assert (tmp_path / "out" / "notes.txt").read_text() == "kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_remote_code_names_the_missing_package(tmp_path, monkeypatch):
    """Without transformers_misa installed, transformers' own check names it (and says what to pip install)."""
    out = save_patched(_patched("glm_moe_dsa"), tmp_path / "saved")

    class Blocker:
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name == "transformers_misa":
                raise ModuleNotFoundError("No module named 'transformers_misa'")
            return None

    monkeypatch.delitem(sys.modules, "transformers_misa")
    monkeypatch.setattr(sys, "meta_path", [Blocker, *sys.meta_path])
    for name in ("modeling_misa.py", "configuration_misa.py"):
        with pytest.raises(ImportError, match="requires the following packages that were not found in your "
                                              "environment: transformers_misa"):
            dynamic_module_utils.check_imports(out / name)


# --------------------------------------------------------------------------------------------- bad input


def test_save_patched_rejects_an_unpatched_model(tmp_path):
    model = tiny_model("deepseek_v32", index_topk=16)
    with pytest.raises(ValueError, match="not patched .*call patch_model first"):
        save_patched(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    model = _patched("deepseek_v32")

    def broken_save(self, folder, **kwargs):
        (Path(folder) / "model.safetensors").write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(type(model), "save_pretrained", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_patched(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("edit,fragment", [
    ({"mode": "misa_v2"}, "MISA settings in config.json: unknown mode 'misa_v2'"),
    ({"router_temperature": 0.5}, r"MISA settings in config.json: unknown option\(s\) \['router_temperature'\]"),
    ({"candidate_factor": 4}, r"MISA settings in config.json: option\(s\) \['candidate_factor'\] have no effect in "
                              r"mode 'misa'"),
])
def test_loading_a_config_this_version_does_not_know(tmp_path, edit, fragment):
    out = save_patched(_patched("deepseek_v32"), tmp_path / "saved")
    config = json.loads((out / "config.json").read_text())
    config["misa"].update({**edit, "version": "9.9.9"})
    (out / "config.json").write_text(json.dumps(config))
    this = transformers_misa.__version__.replace(".", r"\.")
    with pytest.raises(ValueError, match=fragment + rf".*saved with transformers_misa 9\.9\.9; this is {this}"):
        AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    with pytest.raises(ValueError, match=fragment):
        AutoConfig.from_pretrained(out, trust_remote_code=True)


def test_check_misa_settings():
    good = {**MisaConfig(mode="dsa").to_dict(), "version": "0.0.1", "calibration": None}
    assert check_misa_settings(good) == good
    assert check_misa_settings(None) is None
    with pytest.raises(ValueError, match="must be a dict"):
        check_misa_settings(["misa"])


def test_loading_without_trust_remote_code_is_refused(tmp_path):
    out = save_patched(_patched("glm_moe_dsa", "hisa"), tmp_path / "saved")
    with pytest.raises(ValueError, match="contains custom code which must be executed"):
        AutoModelForCausalLM.from_pretrained(out, trust_remote_code=False)


# --------------------------------------------------------------------------------------------- push + cards


def test_push_to_hub_uploads_the_saved_folder_and_card(hub_calls, no_token, tmp_path):
    model = _patched("glm_moe_dsa")
    report = {"mode": "misa", "per_layer": {"0": 0.75, "2": 0.5}, "sparse_queries": {"0": 64, "2": 64},
              "mean": 0.625, "worst": 0.5}
    (tmp_path / "recall.json").write_text(json.dumps(report))
    result = push_to_hub(model, "me/GLM-5-MISA", token="hf_test", private=True, revision="v1",
                         commit_message="first", card_data={"tags": ["extra-tag"]},
                         results_json=tmp_path / "recall.json")
    assert result == "recorded upload_folder"
    assert [name for name, _ in hub_calls] == ["create_repo", "create_branch", "upload_folder"]
    create, branch, upload = (kwargs for _, kwargs in hub_calls)
    assert create["args"] == ("me/GLM-5-MISA",) and create["private"] is True and create["exist_ok"] is True
    assert branch["branch"] == "v1"
    assert upload["repo_id"] == "me/GLM-5-MISA" and upload["revision"] == "v1"
    assert upload["commit_message"] == "first"
    assert upload["files"] == sorted(["README.md", *EXPECTED_FILES])
    assert upload["config"]["misa"]["mode"] == "misa"
    card = upload["card"]
    assert card.startswith("---\nbase_model: zai-org/GLM-5\nlibrary_name: transformers\nlicense: mit\n"
                           "pipeline_tag: text-generation\ntags:\n- misa\n- dsa\n- sparse-attention\n")
    assert "- extra-tag\n" in card
    assert "# GLM-5-MISA" in card and "mode **`misa`**" in card
    assert "`active_heads=8`, `block_size=32`, `backend=auto`" in card
    assert f"transformers_misa {transformers_misa.__version__}" in card
    assert 'from_pretrained("me/GLM-5-MISA", trust_remote_code=True' in card
    assert "mean **0.6250**, worst layer **0.5000**" in card and "| 2 | 64 | 0.5000 |" in card
    assert "{{" not in card


def test_push_without_token_uploads_nothing(hub_calls, no_token):
    with pytest.raises(ValueError, match="no Hugging Face token"):
        push_to_hub(_patched("deepseek_v32"), "me/x")
    assert hub_calls == []


def test_push_token_from_environment(hub_calls, no_token, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_env")
    tokens = []
    original = huggingface_hub.HfApi.__init__
    monkeypatch.setattr(huggingface_hub.HfApi, "__init__",
                        lambda self, *a, **kw: (tokens.append(kw.get("token")), original(self, *a, **kw))[1])
    push_to_hub(_patched("deepseek_v32", "hisa"), "me/x")
    assert tokens == ["hf_env"]
    assert [name for name, _ in hub_calls] == ["create_repo", "upload_folder"]  # no revision: no branch
    assert hub_calls[0][1]["private"] is False and hub_calls[1][1]["revision"] is None


def test_model_card_with_benchmark_json():
    model = _patched("deepseek_v32")
    path = ROOT / "benchmarks" / "results" / "bench_indexer-20261123-142345.json"
    content = model_card(model, results_json=path).content
    assert "base_model: deepseek-ai/DeepSeek-V3.2" in content and "# DeepSeek-V3.2-MISA" in content
    assert "Benchmark `bench_indexer-20261123-142345.json` (gpu NVIDIA H100 80GB HBM3, torch 2.11.0+cu130" in content
    assert "| prefill | 64 | 1 | 4096 | 15.54 |" in content  # numbers from the JSON's first row


def test_cli_push(hub_calls, no_token, tmp_path, monkeypatch, capsys):
    out = save_patched(_patched("deepseek_v32"), tmp_path / "saved")
    with pytest.raises(SystemExit) as exit_info:  # no token: argparse error, nothing uploaded
        cli_main(["push", "--model-dir", str(out), "--repo-id", "me/x"])
    assert exit_info.value.code == 2 and hub_calls == []
    assert "no Hugging Face token" in capsys.readouterr().err

    monkeypatch.setenv("HF_TOKEN", "hf_env")
    assert cli_main(["push", "--model-dir", str(out), "--repo-id", "me/x", "--private", "--revision", "r1",
                     "--message", "msg"]) == 0
    assert [name for name, _ in hub_calls] == ["create_repo", "create_branch", "upload_folder"]
    upload = hub_calls[-1][1]
    assert hub_calls[0][1]["private"] is True and upload["revision"] == "r1" and upload["commit_message"] == "msg"
    assert upload["files"] == sorted(["README.md", *EXPECTED_FILES])
    assert upload["config"]["misa"] == json.loads((out / "config.json").read_text())["misa"]


def test_cli_push_rejects_an_unpatched_folder(hub_calls, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_env")
    tiny_model("deepseek_v32", index_topk=16).save_pretrained(tmp_path / "plain")
    with pytest.raises(SystemExit):
        cli_main(["push", "--model-dir", str(tmp_path / "plain"), "--repo-id", "me/x"])
    assert hub_calls == []


# --------------------------------------------------------------------------------------------- examples


def _example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_save_and_reload(capsys):
    assert _example("save_and_reload").main(["--family", "glm_moe_dsa", "--mode", "hisa"]) is True
    assert "same settings and greedy tokens: True" in capsys.readouterr().out


def test_example_push_variant_dry_run(hub_calls, no_token, capsys):
    files = _example("push_variant").main([])
    assert files == sorted(["README.md", *EXPECTED_FILES]) and hub_calls == []
    out = capsys.readouterr().out
    assert "dry run: would upload to your-name/DeepSeek-V3.2-MISA" in out and "# DeepSeek-V3.2-MISA" in out
