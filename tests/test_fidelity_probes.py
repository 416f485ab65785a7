"""The fidelity probes of the trained models (`benchmarks/router_oracle.py`, `benchmarks/indexer_warmup_probe.py`):
what each measures or trains, on hand-made inputs and a small model (their figures come from runs on the GPU or the
built-in models)."""

import pytest
import torch

from script_helpers import load_script


def _load(name: str):
    return load_script("benchmarks", name)


def test_router_oracle_measures_how_few_heads_make_the_topk():
    """The heads' concentration: the share of the positive separation in the 8 largest, and the effective number of
    heads; heads that separate the top-k negatively take no share."""
    oracle = _load("router_oracle")
    one_head = torch.zeros(3, 64)
    one_head[:, 5] = 2.0
    assert oracle.concentration(one_head) == pytest.approx((1.0, 1.0))
    sixteen_equal = torch.cat([torch.ones(3, 16), -torch.ones(3, 48)], dim=1)
    assert oracle.concentration(sixteen_equal) == pytest.approx((0.5, 16.0))


def test_router_oracle_refit_recovers_a_mix_of_the_routed_heads():
    """The re-weighting oracle: a full score that is a mix of the routed heads plus an offset is recovered on the
    visible keys."""
    oracle = _load("router_oracle")
    head_scores = torch.rand(3, 8, 50, generator=torch.Generator().manual_seed(0))
    causal = torch.arange(50)[None, :] <= torch.tensor([20, 35, 49])[:, None]
    full = (torch.linspace(-1, 2, 8)[None, :, None] * head_scores).sum(1) + 0.5
    refit = oracle.refit_scores(head_scores, full.masked_fill(~causal, -1e30), causal)
    torch.testing.assert_close(refit[causal], full[causal], atol=1e-3, rtol=1e-3)


def test_warmup_probe_reinit_draws_fresh_indexer_weights():
    """`--reinit`: every projection redrawn at the model's init scale, the key norm back to identity."""
    probe = _load("indexer_warmup_probe")
    indexer = torch.nn.ModuleDict(dict(wq_b=torch.nn.Linear(96, 512, bias=False), k_norm=torch.nn.LayerNorm(128)))
    with torch.no_grad():
        indexer.wq_b.weight.fill_(1.0)
        indexer.k_norm.weight.fill_(3.0)
        indexer.k_norm.bias.fill_(2.0)
    torch.manual_seed(0)
    probe.reinitialize(indexer, 0.02)
    assert indexer.wq_b.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert indexer.wq_b.weight.mean().abs().item() < 0.002
    assert torch.equal(indexer.k_norm.weight, torch.ones(128)) and torch.equal(indexer.k_norm.bias, torch.zeros(128))


@pytest.mark.parametrize("sparse", [False, True])
def test_warmup_probe_steps_train_what_their_phase_trains(tmp_path, sparse):
    """The probe's optimizer and the training's step: in the dense phase the indexers alone move (the rest frozen);
    with `--sparse` the main model moves too. A small DeepSeek-shaped model from the training script, one step each."""
    probe = _load("indexer_warmup_probe")
    args = probe.training.parse_args(["--family", "deepseek_v32", "--haystack", str(tmp_path), "--out",
                                      str(tmp_path / "m"), "--small"])
    torch.manual_seed(0)
    model = probe.training.build_training_model(args, vocab_size=300, device=torch.device("cpu"))
    indexers = probe.training.training_indexers(model)
    indexer_ids = {id(p) for indexer in indexers for p in indexer.parameters()}
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = probe.make_optimizer(model, indexers, 1e-2, 0.0, sparse)
    ids = torch.randint(0, 300, (2, 64))
    lm, kl_terms, _ = probe.training.training_step(model, optimizer, ids, torch.ones(2, 64), sparse,
                                                   torch.arange(32, 64), torch.device("cpu"))
    assert bool(torch.isfinite(lm)) and kl_terms.shape == (2,) and bool(torch.isfinite(kl_terms).all())
    moved = {id(p) for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert moved & indexer_ids, "the indexers learn in both phases"
    assert bool(moved - indexer_ids) == sparse, "the main model learns in the sparse phase only"
    probe.unpatch_kl_training(model)


def test_recall_by_position_bins_the_queries_by_the_keys_they_see():
    """Bins of (k, 2k], (2k, 4k], ... visible keys; all 64 heads routed give DSA's own top-k (recall 1 in every bin);
    with 8 heads the bins' query-weighted mean is the package's recall of the same sequence."""
    from transformers_misa import patch_model, unpatch_model
    from transformers_misa.recall import recall_by_layer
    from transformers_misa.trained import load_trained

    probe = _load("recall_by_position")
    assert probe.visible_key_bins(256, 1000) == [(256, 512), (512, 1000)]
    model, _ = load_trained("deepseek_v32")
    ids = torch.randint(3, 4096, (1, 700), generator=torch.Generator().manual_seed(0))
    patch_model(model, mode="misa", active_heads=64, block_size=64)
    for rows in probe.recall_by_visible_keys(model, ids).values():
        assert [(r["keys_from"], r["keys_to"], r["queries"], r["recall"]) for r in rows] == [
            (257, 512, 256, 1.0), (513, 700, 188, 1.0)]
    unpatch_model(model)
    patch_model(model, mode="misa", active_heads=8, block_size=64)
    binned = probe.recall_by_visible_keys(model, ids)
    overall = recall_by_layer(model, [ids[0]])
    for layer, rows in binned.items():
        weighted = sum(r["recall"] * r["queries"] for r in rows) / sum(r["queries"] for r in rows)
        assert weighted == pytest.approx(overall[layer], abs=1e-6) and weighted < 1.0
