"""Shared fixtures and helpers of the transformers_misa test suite (CPU only, small seeded models)."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch
from transformers import dynamic_module_utils
from torch import nn

from transformers_misa import MisaIndexer
from transformers_misa.config import resolve_config
from transformers_misa.registry import family_of
from transformers_misa.tiny import tiny_model

torch.set_num_threads(2)

FAMILIES = ("deepseek_v32", "glm_moe_dsa")

# Every mode with the kernel-sized settings of the GPU model tests (block 64, 8 routed heads).
KERNEL_MODES = [("dsa", {}), ("misa", dict(active_heads=8, block_size=64)),
                ("misa_hierarchical", dict(active_heads=8, block_size=64)), ("hisa", dict(block_size=64))]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(1234)


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def offline_modules_cache(tmp_path_factory):
    """Offline Hub, and transformers' remote-code copies in a temp folder (its module-level HF_MODULES_CACHE is read
    at import time, so the attribute is patched, not only the environment)."""
    cache = str(tmp_path_factory.mktemp("hf_modules"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_HOME", str(tmp_path_factory.mktemp("hf_home")))
        mp.setenv("HF_MODULES_CACHE", cache)
        mp.setattr(dynamic_module_utils, "HF_MODULES_CACHE", cache)
        mp.setattr(sys, "path", list(sys.path))
        yield cache
    for name in [name for name in sys.modules if name.split(".")[0] == "transformers_modules"]:
        del sys.modules[name]


# --------------------------------------------------------------------------------------------- inputs


def left_padded_batch(batch: int, seq_len: int, pads: list[int] | None = None, seed: int = 0,
                      vocab: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids [B, T] and a 0/1 attention mask with `pads[b]` left-padding positions in row b."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (batch, seq_len), generator=gen)
    mask = torch.ones_like(ids)
    pads = pads if pads is not None else [0] + [7 * b + 3 for b in range(1, batch)]
    for row, pad in enumerate(pads):
        mask[row, :pad] = 0
        ids[row, :pad] = 1  # pad_token_id
    return ids, mask


def indexers_of(model: nn.Module) -> list[nn.Module]:
    """The stock indexers of a model, in layer order."""
    return [m for m in model.modules() if family_of(m) is not None and not isinstance(m, MisaIndexer)]


@contextmanager
def capture_calls(module: nn.Module) -> Iterator[list[tuple[tuple, dict]]]:
    """Records the (args, kwargs) of every forward call of `module` while the block runs."""
    calls: list[tuple[tuple, dict]] = []
    handle = module.register_forward_pre_hook(
        lambda mod, args, kwargs: calls.append((args, dict(kwargs))), with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


class _Captured(Exception):
    pass


def indexer_inputs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   layer: int = 0) -> tuple:
    """(hidden_states, q_resid, position_embeddings, mask) the stock indexer `layer` gets in a no-cache forward.

    The forward stops right there (the rest of the model is not needed).
    """
    indexer = indexers_of(model)[layer]
    captured = []

    def hook(module, args, kwargs):
        captured.append(args)
        raise _Captured

    handle = indexer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad(), pytest.raises(_Captured):
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        handle.remove()
    hidden, q_resid, pos_emb, mask = captured[0][:4]
    return hidden, q_resid, pos_emb, mask


def make_patched_indexer(original: nn.Module, mode: str, **options) -> MisaIndexer:
    config = resolve_config(mode, original.n_heads, original.index_topk, options)
    return MisaIndexer(original, family_of(original), config)


def exact_mode_options(num_heads: int, topk: int, num_keys: int, block_size: int = 16) -> list[tuple[str, dict]]:
    """Settings under which every mode must select exactly DSA's top-k (up to ties)."""
    keep = max(math.ceil(num_keys / block_size), math.ceil(topk / block_size), 2)
    return [
        ("dsa", {}),
        ("misa", dict(active_heads=num_heads, block_size=block_size)),
        ("misa_hierarchical", dict(active_heads=1, block_size=block_size,
                                   candidate_factor=max(1, math.ceil(num_keys / topk)))),
        ("hisa", dict(block_size=block_size, keep_blocks=keep)),
    ]


# --------------------------------------------------------------------------------------------- scores


def visible_keys(mask: torch.Tensor | None, batch: int, num_queries: int, num_keys: int) -> torch.Tensor:
    """[B, S, T] bool visibility of a bool / additive mask (None: causal, queries at the last positions)."""
    if mask is None:
        pos = torch.arange(num_queries) + (num_keys - num_queries)
        vis = torch.arange(num_keys)[None, :] <= pos[:, None]
        return vis.expand(batch, -1, -1)
    if mask.dtype == torch.bool:
        return mask.expand(batch, -1, -1)
    return (mask > torch.finfo(mask.dtype).min / 2).expand(batch, -1, -1)


def dense_scores(q: torch.Tensor, keys: torch.Tensor, weights: torch.Tensor, softmax_scale: float,
                 mask: torch.Tensor | None) -> torch.Tensor:
    """DSA's full index score [B, S, T] (fp32, like transformers), -inf at keys the query may not see."""
    scores = torch.relu(torch.matmul(q.float(), keys.float().transpose(-1, -2).unsqueeze(1)) * softmax_scale)
    index = torch.matmul(weights.float().unsqueeze(-2), scores).squeeze(-2)
    visible = visible_keys(mask, q.shape[0], q.shape[1], keys.shape[1])
    return index.masked_fill(~visible, float("-inf"))


def assert_valid_topk(idx: torch.Tensor, scores: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """`idx` [B, S, k] is a top-k of `scores` [B, S, T] (-inf = masked) up to ties.

    Per query: its visible picks are distinct, there are min(k, #visible) of them, and their sorted scores
    equal the k best visible scores. Picks of masked keys (queries seeing fewer than k keys) are ignored.
    """
    assert idx.dtype == torch.int32, idx.dtype
    k = idx.shape[-1]
    assert k == min(scores.shape[-1], k)
    assert int(idx.min()) >= 0 and int(idx.max()) < scores.shape[-1]
    picked = scores.gather(-1, idx.long())
    finite = torch.isfinite(picked)
    num_visible = torch.isfinite(scores).sum(-1)
    expected = num_visible.clamp(max=k)
    # Visible picks are distinct.
    hits = torch.zeros_like(scores).scatter_add_(-1, idx.long(), finite.float())
    assert float(hits.max()) <= 1.0, "a visible key was picked twice"
    bad = (finite.sum(-1) != expected).nonzero()
    assert bad.numel() == 0, f"wrong number of visible picks at (b, s) = {bad[:5].tolist()}"
    got = picked.masked_fill(~finite, float("-inf")).sort(-1, descending=True).values
    best = scores.topk(k, dim=-1).values
    torch.testing.assert_close(got, best, rtol=rtol, atol=atol)


def assert_same_topk(idx_a: torch.Tensor, idx_b: torch.Tensor, scores: torch.Tensor,
                     min_exact: float = 0.9) -> float:
    """Both selections are top-k's of `scores` (so equal up to ties and masked picks); returns and checks the
    fraction of queries whose visible selections are exactly the same set (at least `min_exact`)."""
    assert idx_a.shape == idx_b.shape, (idx_a.shape, idx_b.shape)
    assert_valid_topk(idx_a, scores)
    assert_valid_topk(idx_b, scores)
    fraction = exact_fraction(idx_a, idx_b, scores)
    assert fraction >= min_exact, f"only {fraction:.3f} of the queries select exactly the same keys"
    return fraction


def assert_equal_visible_picks(idx_a: torch.Tensor, idx_b: torch.Tensor, scores: torch.Tensor) -> None:
    """Bit-identical selections: the same visible keys in the same (descending score) order.

    Picks of masked keys (a query seeing fewer than k keys) carry no meaning and may differ.
    """
    assert idx_a.shape == idx_b.shape, (idx_a.shape, idx_b.shape)
    finite_a = torch.isfinite(scores.gather(-1, idx_a.long()))
    finite_b = torch.isfinite(scores.gather(-1, idx_b.long()))
    assert torch.equal(finite_a, finite_b)
    assert torch.equal(idx_a[finite_a], idx_b[finite_b])


def exact_fraction(idx_a: torch.Tensor, idx_b: torch.Tensor, scores: torch.Tensor) -> float:
    """Fraction of queries whose picks of visible keys are the same set."""

    def picked_set(idx: torch.Tensor) -> torch.Tensor:
        finite = torch.isfinite(scores.gather(-1, idx.long()))
        return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device).scatter_(-1, idx.long(), finite)

    return float((picked_set(idx_a) == picked_set(idx_b)).all(-1).float().mean())


def indexer_dense_scores(indexer: MisaIndexer, hidden: torch.Tensor, q_resid: torch.Tensor, pos_emb,
                         mask: torch.Tensor | None, keys: torch.Tensor | None = None) -> torch.Tensor:
    """The full DSA score of an indexer call, recomputed densely (keys: the whole cache, default: this call's)."""
    q, new_keys, weights = indexer.project(hidden, q_resid, pos_emb)
    return dense_scores(q, new_keys if keys is None else keys, weights, indexer.softmax_scale, mask)


# --------------------------------------------------------------------------------------------- models


@pytest.fixture
def make_model() -> Callable[..., nn.Module]:
    """tiny_model factory: family, then overrides (index_topk, index_n_heads, attn_implementation, dtype, ...)."""

    def build(family: str, **overrides) -> nn.Module:
        return tiny_model(family, **overrides)

    return build


def module_snapshot(model: nn.Module) -> dict[str, int]:
    """id() of every submodule by name: equal snapshots mean the very same module objects in the same places."""
    return {name: id(module) for name, module in model.named_modules()}


def assert_untouched(model: nn.Module, snapshot: dict[str, int]) -> None:
    assert module_snapshot(model) == snapshot
    assert not hasattr(model, "misa_config")
    assert not any(isinstance(m, MisaIndexer) for m in model.modules())
