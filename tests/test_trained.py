"""The built-in trained models (shipped in the package) and the script that trained them."""

from __future__ import annotations

import json
import os
import sys

import pytest
import safetensors.torch
import torch

from script_helpers import ROOT, load_script
from transformers_misa import CALIBRATION_FILE, patch_model, unpatch_model
from transformers_misa.evaluation.niah import load_haystack, run_niah
from transformers_misa.recall import recall_by_layer
from transformers_misa.trained import TRAINED_FAMILIES, load_trained, trained_model_dir, training_info

ESSAYS = ROOT.parent / "shared" / "data" / "haystack" / "paul_graham_essays"
HEADS = {"deepseek_v32": 64, "glm_moe_dsa": 32}


@pytest.fixture(scope="module", params=TRAINED_FAMILIES)
def trained(request):
    model, tokenizer = load_trained(request.param)
    return request.param, model, tokenizer


def _prompt(tokenizer, tokens: int) -> torch.Tensor:
    """Standard-library source (always on the machine) as [1, tokens] ids."""
    import argparse
    import inspect

    ids = [tokenizer.bos_token_id] + tokenizer(inspect.getsource(argparse), add_special_tokens=False)["input_ids"]
    return torch.tensor([ids[:tokens]])


def test_shipped_models_are_small_and_real_shaped(trained):
    family, model, tokenizer = trained
    folder = trained_model_dir(family)
    assert sum(p.stat().st_size for p in folder.iterdir()) <= 25 * 2**20
    config = model.config
    assert (config.model_type, config.index_n_heads, config.index_head_dim) == (family, HEADS[family], 128)
    assert config.index_topk == 256 and len(tokenizer) == config.vocab_size == 4096
    assert (tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    info = training_info(folder)
    assert info["family"] == family and info["steps_done"] == info["args"]["steps"]
    assert info["wall_s"] <= 15 * 60 and any(gpu in info["machine"]["gpu"] for gpu in ("H100", "H200"))
    assert (folder / CALIBRATION_FILE).is_file()


def test_dsa_mode_reproduces_the_trained_model(trained):
    family, model, tokenizer = trained
    prompt = _prompt(tokenizer, 300)
    expected = model.generate(prompt, max_new_tokens=6, do_sample=False)
    patch_model(model, mode="dsa")
    try:
        assert torch.equal(model.generate(prompt, max_new_tokens=6, do_sample=False), expected)
    finally:
        unpatch_model(model)


def test_recall_of_the_trained_indexers(trained):
    """Real routing on a trained indexer, on CPU: 1024 tokens of source the recall code runs over for real.
    Thresholds sit below the values measured when the models were shipped (misa-8 0.80-0.97 per layer)."""
    family, model, tokenizer = trained
    prompt = _prompt(tokenizer, 1024)[0]
    recall = {}
    for name, kwargs in [("misa4", dict(mode="misa", active_heads=4)), ("misa8", dict(mode="misa", active_heads=8)),
                         ("hier", dict(mode="misa_hierarchical", active_heads=8))]:
        patch_model(model, block_size=64, calibration=None, **kwargs)
        try:
            recall[name] = recall_by_layer(model, [prompt])
        finally:
            unpatch_model(model)
    mean = {name: sum(v.values()) / len(v) for name, v in recall.items()}
    assert mean["misa4"] <= mean["misa8"] <= mean["hier"]
    assert mean["misa8"] > 0.75 and min(recall["hier"].values()) > 0.95


def test_niah_runs_on_the_trained_model(trained):
    """The NIAH harness on the trained model, short context: the model answers in the trained format."""
    if not ESSAYS.is_dir():
        pytest.skip(f"shared NIAH haystack not found at {ESSAYS} (outside the repository; CI has it)")
    family, model, tokenizer = trained
    results = run_niah(model, tokenizer, load_haystack(ESSAYS), lengths=[512], depths=[0.0, 1.0], max_new_tokens=8,
                       modes=[("dsa", {}), ("misa8", {"mode": "misa", "active_heads": 8, "block_size": 64})],
                       progress=False)
    for name in ("dsa", "misa8"):
        grid = results["modes"][name]
        assert all(0.0 <= s <= 1.0 for row in grid["scores"] for s in row)
        assert all(answer.startswith(" The ") for answer in grid["answers"][0])
    assert all(a.startswith(" The best thing to do in") for a in results["modes"]["dsa"]["answers"][0])


def test_load_trained_rejects_an_unknown_family():
    with pytest.raises(ValueError, match="no built-in trained model for 'llama'"):
        trained_model_dir("llama")


def test_training_script_smoke(tmp_path):
    """examples/train_small_dsa.py end to end on the CPU with a much smaller main model: it trains, saves a model
    that loads with from_pretrained and patches, and (--checkpoint-steps) the model after step 2 beside it, training
    on after it with the KL terms still taken."""
    haystack = tmp_path / "hay"
    haystack.mkdir()
    source = (ESSAYS if ESSAYS.is_dir() else None)
    texts = ([p.read_text() for p in sorted(source.glob("*.txt"))[:4]] if source else
             [("The quick brown fox jumps over the lazy dog near the River Thames. " * 300) for _ in range(4)])
    for i, text in enumerate(texts):
        (haystack / f"{i}.txt").write_text(text)
    script = _training_script()
    out = tmp_path / "model"
    args = script.parse_args(["--family", "glm_moe_dsa", "--haystack", str(haystack), "--out", str(out),
                              "--steps", "3", "--context", "256", "--tokens-per-step", "512", "--topk", "32",
                              "--kl-queries", "32", "--code-bytes", "100000", "--vocab-size", "400",
                              "--heldout-essays", "1", "--small", "--log-every", "1", "--shared-kl-grad",
                              "--repeat-fraction", "0.5", "--repeat-tokens", "mixed", "--checkpoint-steps", "2",
                              "--stdlib", os.path.dirname(json.__file__)])
    info = script.train(args)
    assert info["steps_done"] == 3 and len(info["history"]) == 3
    assert info["history"][-1]["sparse"] and all(row["kl"] >= 0 for row in info["history"])
    assert all(len(row["kl_terms"]) == 2 for row in info["history"])  # layer 0's indexer, the shared layer 1
    assert json.loads((out / "training.json").read_text())["data"]["heldout_essays"] == ["3.txt"]
    snapshot = json.loads((out / "step-2" / "training.json").read_text())
    assert snapshot["steps_done"] == 2 and len(snapshot["history"]) == 2
    saved = {name: safetensors.torch.load_file(folder / "model.safetensors") for name, folder in
             (("final", out), ("step 2", out / "step-2"))}
    assert all(tensor.dtype == torch.bfloat16 for weights in saved.values() for tensor in weights.values())
    assert not all(torch.equal(saved["final"][name], saved["step 2"][name]) for name in saved["final"])
    assert load_trained(model_dir=out / "step-2")[0].config.index_n_heads == 32
    model, tokenizer = load_trained(model_dir=out)
    assert model.config.index_n_heads == 32 and len(tokenizer) <= 400
    patch_model(model, mode="misa", active_heads=4, block_size=16)
    ids = tokenizer("def f(x):\n    return x", return_tensors="pt")["input_ids"]
    assert model.generate(ids, max_new_tokens=2, do_sample=False).shape[1] == ids.shape[1] + 2


def test_training_script_sets_the_indexers_decay_the_attention_heads_and_the_query_rank(tmp_path):
    """--indexer-weight-decay gives the indexers' projections an AdamW group of their own (default: --weight-decay,
    as the built-in models were trained); --attention-heads sets the main attention's heads, --q-lora-rank the query
    latent (over --small's own)."""
    script = _training_script()
    args = script.parse_args(["--family", "deepseek_v32", "--haystack", str(tmp_path), "--out", str(tmp_path / "m"),
                              "--small", "--attention-heads", "2", "--indexer-weight-decay", "0",
                              "--q-lora-rank", "48"])
    model = script.build_training_model(args, vocab_size=300, device=torch.device("cpu"))
    assert model.config.num_attention_heads == 2 and model.config.num_key_value_heads == 2
    assert model.config.q_lora_rank == 48 and model.model.layers[0].self_attn.indexer.wq_b.in_features == 48
    rest, indexer = script.parameter_groups(model, args.weight_decay, args.indexer_weight_decay)
    assert (rest["weight_decay"], indexer["weight_decay"]) == (0.1, 0.0)
    names = {id(p): name for name, p in model.named_parameters()}
    assert indexer["params"] and all(".indexer." in names[id(p)] for p in indexer["params"])
    assert not any(".indexer." in names[id(p)] for p in rest["params"])
    assert len(rest["params"]) + len(indexer["params"]) == len(list(model.parameters()))
    assert script.parameter_groups(model, 0.1, None)[1]["weight_decay"] == 0.1


def _training_script():
    """examples/train_small_dsa.py as a module (it imports its data and KL modules by name, from its folder)."""
    return load_script("examples", "train_small_dsa")


def test_random_needles_and_repeats_cannot_be_memorised():
    """--needle-words random / --repeat-tokens random: needle places are made up (not in the essays) and repeated
    spans are random tokens, recurring verbatim; the defaults draw from the essays as the shipped models were."""
    from transformers_misa.evaluation.niah import train_bpe_tokenizer

    script = _training_script()
    essays = ["Startups grow fast when founders talk to users in Boston and Paris every week. " * 40]
    text = {"code": ["def f(x):\n    return x + 1\n" * 200], "essays": essays}
    tokenizer = train_bpe_tokenizer(essays[0] + text["code"][0], vocab_size=300)
    made_up = script.Batches(tokenizer, text, 0, 1.0, needle_words="random")
    for _ in range(20):
        needle, question, answer = made_up._needle()
        if needle.startswith("The pass key"):
            continue
        place = question.split(" in " if " in " in question else " of " if " of " in question else " about ")[-1]
        assert answer == needle and place.rstrip("?") in needle
        assert not any(word in essays[0] for word in place.rstrip("?").split()), place
    default = script.Batches(tokenizer, text, 0, 1.0)
    assert any(place in essays[0] for place in default.places)
    repeats = script.Batches(tokenizer, text, 0, 0.0, repeat_fraction=1.0, repeat_tokens="random")
    ids, weights = repeats.sequence(256)
    copied = [i for i, w in enumerate(weights) if w == 2.0]
    assert copied, "some positions are marked as copies"
    assert len(ids) == 256 and max(ids) < len(tokenizer)
    assert len(copied) >= 256 // 4, "random copies cover about a third of the sequence"
    runs = [list(group) for group in _consecutive_runs(copied)]
    for run in runs:  # each marked run is the tail of a span that occurs verbatim earlier (spans never overlap)
        target, span = run[0] - 1, len(run) + 1
        piece = ids[target: target + span]
        assert any(ids[i: i + span] == piece for i in range(target)), "the repeated span occurs earlier"
    few = script.Batches(tokenizer, text, 0, 0.0, repeat_fraction=1.0, repeat_tokens="random", repeat_alphabet=8)
    sizes = set()
    for _ in range(8):  # half the sequences draw every span from 8 tokens, the others from the whole vocabulary
        ids, weights = few.sequence(256)
        sizes.add(len({ids[i] for i, w in enumerate(weights) if w == 2.0}) <= 8)
    assert sizes == {True, False}


def _consecutive_runs(positions):
    run = []
    for position in positions:
        if run and position != run[-1] + 1:
            yield run
            run = []
        run.append(position)
    if run:
        yield run


@pytest.mark.parametrize("shared_kl_grad", [False, True])
def test_shared_layer_kl_reaches_the_layers_below_only_when_asked(shared_kl_grad):
    """GLM-5's shared layer reuses the previous indexer's top-k: its KL term trains that indexer, and with
    --shared-kl-grad also the layers below it (the other terms never reach the main model: detached inputs)."""
    script = _training_script()
    args = script.parse_args(["--family", "glm_moe_dsa", "--haystack", "unused", "--out", "unused", "--small",
                              "--topk", "8"] + (["--shared-kl-grad"] if shared_kl_grad else []))
    model = script.build_training_model(args, vocab_size=300, device=torch.device("cpu"))
    shared = [layer.self_attn for layer in model.model.layers if layer.self_attn.skip_topk]
    assert len(shared) == 1 and model.model.layers[0].self_attn.indexer.feeds_shared_layer
    state = sys.modules["small_dsa_kl"].STATE  # the script's indexer-KL module, imported by it
    state.sparse, state.rows = False, torch.arange(8, 32)
    state.losses.clear()
    state.last = state.last_with_grad = None
    model(input_ids=torch.randint(3, 300, (1, 32), generator=torch.Generator().manual_seed(0)), use_cache=False)
    assert len(state.losses) == 2  # layer 0's own term, then the shared layer's
    model.zero_grad(set_to_none=True)
    state.losses[0].backward(retain_graph=True)
    assert model.model.embed_tokens.weight.grad is None  # the indexer's own term: indexer only
    state.losses[1].backward()
    grad = model.model.embed_tokens.weight.grad
    assert (grad is not None and grad.abs().sum() > 0) == shared_kl_grad
    assert model.model.layers[0].self_attn.indexer.wk.weight.grad.abs().sum() > 0


def test_the_trained_glm_model_finds_the_needle():
    """The built-in GLM-5 shaped model retrieves (DSA green at 1024 tokens on the GPU eval): NIAH on the CPU finds
    the needle's key words at both ends of a 1024-token haystack, so the harness's scoring runs on a real success."""
    if not ESSAYS.is_dir():
        pytest.skip(f"shared NIAH haystack not found at {ESSAYS} (outside the repository; CI has it)")
    model, tokenizer = load_trained("glm_moe_dsa")
    results = run_niah(model, tokenizer, load_haystack(ESSAYS), lengths=[1024], depths=[0.0, 1.0],
                       max_new_tokens=40, modes=[("dsa", {})], progress=False)
    assert all(score >= 0.75 for score in results["modes"]["dsa"]["scores"][0]), results["modes"]["dsa"]["answers"]
