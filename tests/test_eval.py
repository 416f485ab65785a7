"""transformers_misa.evaluation: haystack loading, NIAH prompts and runs, perplexity, the `eval` command."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from transformers_misa import is_patched
from transformers_misa.cli import main
from transformers_misa.evaluation.niah import NEEDLE, QUESTION, build_niah_prompt, keyword_score, load_haystack, \
    run_niah, save_niah_heatmap, train_bpe_tokenizer
from transformers_misa.evaluation.perplexity import perplexity, perplexity_by_mode
from transformers_misa.tiny import tiny_model
from transformers_misa.trained import trained_model_dir

SHARED_HAYSTACK = Path(__file__).resolve().parents[2] / "shared" / "data" / "haystack"

# Our own background text (not the essays): varied sentences, enough for a few hundred tokens.
PARAGRAPHS = [
    "The river ran north past the old mill. Nobody remembered who had built it. Children fished from the bridge "
    "in summer, and in winter the ice groaned under the weight of skaters. The miller's house had a green door.",
    "A good map leaves things out. It shows the roads you need and hides the ones you do not. Drawing one is an "
    "exercise in deciding what matters! Cartographers argue about this for years. Which details help a walker?",
    "Bread needs time more than skill. Flour, water, salt and yeast sit overnight in a cool room. In the morning "
    "the dough is folded, shaped and baked until the crust sings as it cools. Patience is the secret ingredient.",
    "The observatory on the hill opened its dome at dusk. Students took turns at the eyepiece, counting the moons "
    "of a distant planet. One of them wrote every number in a small red notebook. The night was clear and cold.",
]


def _write_haystack(folder: Path, paragraphs=PARAGRAPHS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(paragraphs):
        (folder / f"{i:02d}_part.txt").write_text(text + "\n")
    return folder


@pytest.fixture(scope="module")
def haystack_text(tmp_path_factory) -> str:
    return load_haystack(_write_haystack(tmp_path_factory.mktemp("hay")))


@pytest.fixture(scope="module")
def tokenizer(haystack_text):
    return train_bpe_tokenizer(haystack_text * 3 + " " + NEEDLE + " " + QUESTION, vocab_size=400)


# ------------------------------------------------------------------------------------------- haystack


def test_load_haystack_joins_txt_files_in_name_order(tmp_path):
    (tmp_path / "b.txt").write_text("Second file.")
    (tmp_path / "a.txt").write_text("First file.")
    (tmp_path / "c.md").write_text("Not a text file.")
    text = load_haystack(tmp_path)
    assert text.index("First file.") < text.index("Second file.")
    assert "Not a text file" not in text


def test_load_haystack_errors(tmp_path):
    (tmp_path / "notes.md").write_text("no txt here")
    with pytest.raises(ValueError, match="no .txt files") as error:
        load_haystack(tmp_path)
    assert str(tmp_path) in str(error.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_haystack(tmp_path / "missing")


def test_train_bpe_tokenizer_fits_the_tiny_model(haystack_text):
    tok = train_bpe_tokenizer(haystack_text, vocab_size=512)
    assert len(tok) <= 512
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id) == (0, 1, 2)
    ids = tok("Dolores Park, naïve café", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == "Dolores Park, naïve café"  # byte-level: anything round-trips


# ------------------------------------------------------------------------------------------- prompt


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_needle_is_placed_at_the_requested_depth(tokenizer, haystack_text, depth):
    ids, info = build_niah_prompt(tokenizer, haystack_text, context_tokens=300, depth=depth, return_info=True)
    assert ids.shape == (1, 300)
    needle = tokenizer(" " + NEEDLE, add_special_tokens=False)["input_ids"]
    row = ids[0].tolist()
    starts = [i for i in range(len(row) - len(needle) + 1) if row[i: i + len(needle)] == needle]
    assert starts == [info["needle_start"]]
    fraction = (starts[0] - 1) / info["haystack_tokens"]  # minus the bos token
    assert abs(fraction - depth) < 0.12, (fraction, depth)
    question = tokenizer("\n\nQuestion: " + QUESTION + "\nAnswer:", add_special_tokens=False)["input_ids"]
    if depth == 1.0:  # right after the background text, before the question (as the reference test does)
        assert info["needle_end"] == len(row) - len(question)
    else:  # at a sentence boundary: the text before the needle ends a sentence (or is the start)
        before = tokenizer.decode(row[1: starts[0]]).rstrip(" ")
        assert before == "" or before.endswith((".", "!", "?", "\n"))
    assert tokenizer.decode(row).rstrip().endswith("Question: " + QUESTION + "\nAnswer:")
    assert row[0] == tokenizer.bos_token_id


def test_prompt_too_short_or_bad_depth(tokenizer, haystack_text):
    with pytest.raises(ValueError, match="cannot hold the needle"):
        build_niah_prompt(tokenizer, haystack_text, context_tokens=20, depth=0.5)
    with pytest.raises(ValueError, match="depth"):
        build_niah_prompt(tokenizer, haystack_text, context_tokens=300, depth=1.5)


def test_short_haystack_is_repeated(tokenizer):
    ids = build_niah_prompt(tokenizer, "One short sentence.", context_tokens=200, depth=0.5)
    assert ids.shape == (1, 200)


# ------------------------------------------------------------------------------------------- NIAH


def test_keyword_score():
    assert keyword_score("Eat a sandwich in Dolores Park on a SUNNY day") == 1.0
    assert keyword_score("a sandwich") == 0.25
    assert keyword_score("no idea") == 0.0


def _fake_generate(model, tokenizer, answer: str):
    answer_ids = tokenizer(" " + answer, add_special_tokens=False)["input_ids"]

    def generate(input_ids, **kwargs):
        return torch.cat([input_ids, torch.tensor([answer_ids] * input_ids.shape[0])], dim=1)

    return generate


def test_run_niah_scores_an_answer_that_retrieves_the_needle(monkeypatch, tokenizer, haystack_text):
    model = tiny_model("deepseek_v32", index_topk=32)
    monkeypatch.setattr(model, "generate", _fake_generate(model, tokenizer, NEEDLE))
    modes = [("dsa", {}), ("hisa", {"block_size": 16})]
    results = run_niah(model, tokenizer, haystack_text, lengths=[128, 192], depths=[0, 0.5, 1], modes=modes,
                       progress=False)
    assert set(results["modes"]) == {"dsa", "hisa"}
    for grid in results["modes"].values():
        assert grid["scores"] == [[1.0] * 3] * 2
    assert not is_patched(model)


def test_run_niah_scores_only_the_generated_tokens(monkeypatch, tokenizer, haystack_text):
    # The prompt itself holds the needle: a wrong slice of the output would score 1 here.
    model = tiny_model("deepseek_v32", index_topk=32)
    monkeypatch.setattr(model, "generate", _fake_generate(model, tokenizer, "I do not know."))
    results = run_niah(model, tokenizer, haystack_text, lengths=[128], depths=[0.5, 1.0], progress=False)
    assert results["modes"]["model"]["scores"] == [[0.0, 0.0]]
    assert results["modes"]["model"]["answers"][0][0].strip() == "I do not know."


def test_run_niah_real_tiny_model_grid_and_heatmap(tokenizer, haystack_text, tmp_path):
    model = tiny_model("glm_moe_dsa", index_topk=32)
    calls = []
    results = run_niah(model, tokenizer, haystack_text, lengths=[96, 128, 160], depths=[0.0, 1.0],
                       max_new_tokens=3, modes=[("dsa", {}), ("misa4", {"mode": "misa", "active_heads": 4,
                                                                        "block_size": 16})],
                       scorer=lambda answer, needle: calls.append(answer) or 0.5, progress=False)
    assert len(calls) == 2 * 3 * 2
    for name in ("dsa", "misa4"):
        grid = results["modes"][name]
        assert grid["lengths"] == [96, 128, 160] and grid["depths"] == [0.0, 1.0]
        assert len(grid["scores"]) == 3 and all(row == [0.5, 0.5] for row in grid["scores"])
    assert results["modes"]["misa4"]["patch"]["mode"] == "misa"
    assert not is_patched(model)
    json_path = save_niah_heatmap(results, tmp_path / "niah.png")
    assert (tmp_path / "niah.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(json_path.read_text())["modes"]["dsa"]["scores"] == results["modes"]["dsa"]["scores"]


def test_run_niah_warns_when_answers_cannot_hold_the_needle(monkeypatch, tokenizer, haystack_text):
    model = tiny_model("deepseek_v32", index_topk=32)
    monkeypatch.setattr(model, "generate", _fake_generate(model, tokenizer, NEEDLE))
    with pytest.warns(UserWarning, match="shorter than the needle"):
        run_niah(model, tokenizer, haystack_text, lengths=[128], depths=[0.5], max_new_tokens=2, progress=False)


def test_run_niah_unpatches_after_an_error(tokenizer, haystack_text):
    model = tiny_model("deepseek_v32", index_topk=32)

    def broken(answer, needle):
        raise RuntimeError("scorer failed")

    with pytest.raises(RuntimeError, match="scorer failed"):
        run_niah(model, tokenizer, haystack_text, lengths=[96], depths=[0.5], max_new_tokens=1,
                 modes=[("dsa", {})], scorer=broken, progress=False)
    assert not is_patched(model)


# ------------------------------------------------------------------------------------------- perplexity


def test_perplexity_is_exp_of_the_mean_next_token_nll():
    model = tiny_model("deepseek_v32", index_topk=32)
    ids = torch.randint(2, 512, (2, 80), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits.float()
    by_hand = math.exp(float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))))
    assert perplexity(model, ids) == pytest.approx(by_hand, rel=1e-5)
    assert perplexity(model, ids[0]) == pytest.approx(perplexity(model, ids[:1]), rel=1e-6)
    # Windows of 40 tokens: each window predicted on its own, token-weighted.
    nll = []
    for w in (ids[:, :40], ids[:, 40:]):
        with torch.no_grad():
            lw = model(input_ids=w, use_cache=False).logits.float()
        nll.append(F.cross_entropy(lw[:, :-1].reshape(-1, lw.shape[-1]), w[:, 1:].reshape(-1), reduction="sum"))
    assert perplexity(model, ids, stride=40) == pytest.approx(math.exp(float(sum(nll)) / (2 * 2 * 39)), rel=1e-5)


def test_perplexity_by_mode_dsa_equals_the_unpatched_model():
    model = tiny_model("glm_moe_dsa", index_topk=32)
    ids = torch.randint(2, 512, (1, 96), generator=torch.Generator().manual_seed(4))
    stock = perplexity(model, ids)
    values = perplexity_by_mode(model, ids, [("dsa", {}), ("misa2", {"mode": "misa", "active_heads": 2,
                                                                      "block_size": 16})])
    assert set(values) == {"dsa", "misa2"}
    assert values["dsa"] == stock
    assert math.isfinite(values["misa2"]) and values["misa2"] > 1.0
    assert not is_patched(model)
    assert perplexity(model, ids) == stock


# ------------------------------------------------------------------------------------------- CLI


def _essays() -> Path:
    essays = SHARED_HAYSTACK / "paul_graham_essays"
    if not essays.is_dir():
        pytest.skip(f"shared NIAH haystack not found at {essays} (it lives outside the repository, in "
                    f"../shared/data/haystack; CI has it)")
    return essays


def test_cli_eval_end_to_end_on_the_trained_model(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["eval", "--haystack", str(_essays()), "--family", "glm_moe_dsa", "--lengths", "512",
                 "--depths", "0,1", "--window", "1024", "--windows", "1", "--new-tokens", "8", "--out", str(out),
                 "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    modes = list(results["modes"])
    layer_types = json.loads((trained_model_dir("glm_moe_dsa") / "config.json").read_text())["indexer_types"]
    indexed = {str(i) for i, kind in enumerate(layer_types) if kind == "full"}
    assert len(indexed) < len(layer_types)
    assert modes[:5] == ["dsa", "misa4", "misa8", "misa16", "misa8_hier"] and modes[-1] == "hisa"
    assert list(results["perplexity"]) == modes and list(results["recall"]) == modes[1:]
    for name in modes[1:]:
        recall = results["recall"][name]
        assert 0.0 < recall["worst"] <= recall["mean"] <= 1.0
        assert set(recall["per_layer"]) == indexed  # no entry for GLM's shared layer (it has no indexer)
    assert results["recall"]["misa4"]["mean"] <= results["recall"]["misa16"]["mean"]
    assert 1.0 < results["perplexity"]["dsa"] < 4096 / 4  # well below uniform over the 4096-token vocabulary
    niah = results["niah"]["modes"]
    assert {"dsa", "misa8", "misa8_hier", "hisa"} <= set(niah)
    assert all(answer.startswith(" The best thing to do in") for answer in niah["dsa"]["answers"][0])
    assert [row["mode"] for row in results["summary"]] == modes
    assert (out / "niah.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "table.md").read_text().startswith("| mode | recall mean")
    assert "misa8_hier" in capsys.readouterr().out


def test_cli_eval_with_the_max_router_skips_a_calibration_fitted_for_the_sum(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["eval", "--haystack", str(_essays()), "--family", "glm_moe_dsa", "--lengths", "512", "--depths", "0",
                 "--window", "512", "--windows", "1", "--new-tokens", "4", "--router", "max", "--out", str(out),
                 "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert not any(name.endswith("+cal") for name in results["modes"])
    assert {settings.get("router") for name, settings in results["modes"].items() if name.startswith("misa")} == {"max"}
    assert "router='sum', not 'max': the misa modes run uncalibrated" in capsys.readouterr().out


def test_cli_eval_rejects_bad_input(tmp_path, capsys):
    with pytest.raises(SystemExit) as error:
        main(["eval", "--haystack", str(tmp_path / "missing"), "--no-progress"])
    assert error.value.code == 2 and "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "--haystack", str(tmp_path), "--depths", "0,2"])
    assert "depths" in capsys.readouterr().err


def test_cli_eval_help_names_the_built_in_trained_model(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert "built-in trained model" in capsys.readouterr().out.replace("\n", " ")


# ------------------------------------------------------------------------------------------- real essays


def test_paul_graham_haystack_prompt():
    text = load_haystack(_essays())
    assert len(text) > 500_000  # 49 essays, about 640 KB
    tok = train_bpe_tokenizer(text[:200_000], vocab_size=512)
    ids, info = build_niah_prompt(tok, text, context_tokens=2048, depth=0.5, return_info=True)
    assert ids.shape == (1, 2048)
    assert abs(info["depth_actual"] - 0.5) < 0.05
    assert "Dolores Park" in tok.decode(ids[0, info["needle_start"]: info["needle_end"]].tolist())
