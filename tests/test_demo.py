"""The main job: `python -m transformers_misa demo` runs every mode and reports sensible numbers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from transformers_misa.cli import main
from transformers_misa.demo import run_demo


def test_quick_demo_on_random_models_reports_every_mode(tmp_path):
    printed: list[str] = []
    results = run_demo(context=160, new_tokens=2, topk=32, block_size=32, families=("glm_moe_dsa",),
                       random_weights=True, progress=False, json_path=tmp_path / "demo.json",
                       print_fn=printed.append)
    rows = {row["label"]: row for row in results["families"]["glm_moe_dsa"]["rows"]}
    assert {"stock", "dsa", "misa h=8", "misa_hierarchical", "hisa"} <= set(rows)
    assert rows["dsa"]["recall_mean"] == 1.0 and rows["dsa"]["same_as_stock"]
    for label in ("misa h=8", "misa_hierarchical", "hisa"):
        assert 0.0 < rows[label]["recall_mean"] <= 1.0
        assert rows[label]["generate_s"] > 0 and rows[label]["peak_extra_mib"] >= 0
    assert sorted(rows["dsa"]["recall_per_layer"]) == [0, 2]  # GLM-5 layer 1 is shared: no indexer
    assert json.loads((tmp_path / "demo.json").read_text())["families"]["glm_moe_dsa"]["rows"]
    assert any("recall" in line for line in printed)


def test_quick_demo_on_the_trained_model(tmp_path):
    results = run_demo(quick=True, new_tokens=2, families=("deepseek_v32",), progress=False, print_fn=None)
    rows = {row["label"]: row for row in results["families"]["deepseek_v32"]["rows"]}
    assert results["families"]["deepseek_v32"]["model"]["topk"] == 256 and results["settings"]["weights"] == "trained"
    assert rows["dsa"]["recall_mean"] == 1.0 and rows["dsa"]["same_as_stock"]
    assert "cal." in rows["misa h=8"]["settings"]  # the shipped router calibration is picked up
    # Measured on this prompt (384 tokens of standard-library source): trained routing is far from random.
    assert rows["misa h=8"]["recall_mean"] > 0.8 and rows["misa_hierarchical"]["recall_mean"] > 0.95


@pytest.mark.parametrize("argv, fragment", [
    (["--random", "--context", "32", "--topk", "64"], "must exceed topk"),
    (["--context", "200"], "must exceed the model's top-k 256"),
    (["--topk", "64"], "topk applies to the random models"),
])
def test_cli_rejects_bad_demo_settings(capsys, argv, fragment):
    with pytest.raises(SystemExit) as error:
        main(["demo", *argv, "--no-progress", "--family", "glm_moe_dsa"])
    assert error.value.code == 2
    assert fragment in capsys.readouterr().err


def test_module_entry_point_runs():
    done = subprocess.run([sys.executable, "-m", "transformers_misa", "demo", "--quick", "--no-progress", "--random",
                           "--family", "deepseek_v32", "--context", "96", "--topk", "32", "--new-tokens", "1"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "DeepSeek-V3.2" in done.stdout and "misa_hierarchical" in done.stdout
