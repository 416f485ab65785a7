"""Perplexity of a causal LM on given token ids, for the model as given or under each patch mode.

    perplexity(model, input_ids)                                   # exp(mean next-token NLL)
    perplexity_by_mode(model, input_ids, [("dsa", {}), ("misa8", {"mode": "misa", "active_heads": 8})])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .niah import patched


@torch.no_grad()
def perplexity(model: nn.Module, input_ids: torch.Tensor, *, stride: int | None = None) -> float:
    """exp of the mean next-token negative log-likelihood of `input_ids` ([T] or [B, T], no padding).

    stride None: one forward over the whole sequence with `labels=input_ids`, `use_cache=False` (every token
    but the first of each row is predicted from all the tokens before it). stride N: consecutive independent
    windows of N tokens (each window's first token is not predicted), token-weighted mean over windows; for
    sequences too long for one forward.
    """
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must be [T] or [B, T] with T >= 2, got shape {tuple(input_ids.shape)}")
    if stride is not None and stride < 2:
        raise ValueError(f"stride must be >= 2 tokens (or None), got {stride}")
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    window = input_ids.shape[1] if stride is None else stride
    total_nll, total_tokens = 0.0, 0
    for start in range(0, input_ids.shape[1], window):
        chunk = input_ids[:, start: start + window]
        if chunk.shape[1] < 2:
            break  # a single trailing token has nothing to condition on inside its window
        out = model(input_ids=chunk, labels=chunk, use_cache=False)
        tokens = chunk.shape[0] * (chunk.shape[1] - 1)
        total_nll += float(out.loss) * tokens
        total_tokens += tokens
    return math.exp(total_nll / total_tokens)


def perplexity_by_mode(model: nn.Module, input_ids: torch.Tensor,
                       modes: Sequence[tuple[str, dict[str, Any] | None]], *, stride: int | None = None
                       ) -> dict[str, float]:
    """{name: perplexity} with each mode patched in (`patch_model(model, **kwargs)`, kwargs' `mode` defaulting
    to the name; kwargs None: the model as given) and unpatched afterwards."""
    results: dict[str, float] = {}
    for name, kwargs in modes:
        if name in results:
            raise ValueError(f"mode names must be distinct, {name!r} appears twice")
        with patched(model, name, kwargs):
            results[name] = perplexity(model, input_ids, stride=stride)
    return results
