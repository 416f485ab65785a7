"""Which implementation runs: the TileLang kernels on Hopper GPUs, the PyTorch reference everywhere else.

The choice is made per device, logged once with its reason, and a kernel that fails to compile or launch
falls back to the reference with one warning: it never breaks `generate`.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings

import torch

from .ops.blocks import top_indices
from .ops.reference import (
    REFERENCE,
    Scorer,
    reference_candidate_logits,
    reference_head_importance,
    reference_token_logits,
)

logger = logging.getLogger("transformers_misa")

MIN_CAPABILITY = (9, 0)

_announced: set[tuple[str, str]] = set()
_broken_kernels: set[str] = set()


def _announce(device: torch.device, message: str, level: int = logging.INFO) -> None:
    key = (str(device), message)
    if key not in _announced:
        _announced.add(key)
        logger.log(level, "transformers_misa: %s", message)


def kernel_unavailable_reason(device: torch.device) -> str | None:
    """Why the TileLang kernels cannot run on `device`, or None if they can."""
    if device.type != "cuda":
        return f"tensors are on {device.type}, the kernels need a CUDA GPU"
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        return f"GPU compute capability {capability[0]}.{capability[1]} < 9.0 (the kernels need Hopper: H100/H200)"
    try:
        import tilelang  # noqa: F401
    except ImportError as error:
        return f"TileLang is not importable ({error}); pip install tilelang==0.1.15"
    return None


def _fall_back_on_failure(name: str, kernel_fn, reference_fn):
    """`kernel_fn`, or `reference_fn` from the first failure on (announced by one warning)."""

    def run(*args, **kwargs):
        if name not in _broken_kernels:
            try:
                return kernel_fn(*args, **kwargs)
            except Exception as error:  # compile or launch failure: degrade, never crash generate
                _broken_kernels.add(name)
                warnings.warn(f"transformers_misa: the {name} kernel failed ({type(error).__name__}: {error}); "
                              "using the PyTorch reference from now on", RuntimeWarning, stacklevel=3)
        return reference_fn(*args, **kwargs)

    return run


def _guarded(scorer: Scorer) -> Scorer:
    """The kernel scorer, each kernel falling back to the reference (with one warning) if it fails to build or run."""
    return dataclasses.replace(
        scorer,
        token_logits=_fall_back_on_failure(scorer.name, scorer.token_logits, reference_token_logits),
        topk=_fall_back_on_failure(f"{scorer.name} top-k", scorer.topk, top_indices),
        head_importance=_fall_back_on_failure(f"{scorer.name} router", scorer.head_importance,
                                              reference_head_importance),
        candidate_logits=_fall_back_on_failure(f"{scorer.name} re-rank", scorer.candidate_logits,
                                               reference_candidate_logits),
        route=None if scorer.route is None else _fall_back_on_failure(
            f"{scorer.name} routing", scorer.route, lambda *args, **kwargs: None),  # None: the stepwise routing
        fused_select=None if scorer.fused_select is None else _fall_back_on_failure(
            f"{scorer.name} token select", scorer.fused_select, REFERENCE.select_tokens),
    )


def select_scorer(device: torch.device, backend: str = "auto", qk_format: str = "bf16") -> Scorer:
    """The `Scorer` for tensors on `device` under the `backend` setting ("auto", "reference" or "tilelang");
    qk_format="fp8_e4m3" picks the kernels' FP8 token logits (the reference computes FP8's numerics in fp32).

    Raises:
        RuntimeError: if "tilelang" is forced where the kernels cannot run (the message says why).
    """
    if backend == "reference":
        _announce(device, f"reference (PyTorch) indexer on {device}: backend='reference' was requested")
        return REFERENCE
    reason = kernel_unavailable_reason(device)
    if reason is not None:
        if backend == "tilelang":
            raise RuntimeError(f"backend='tilelang' cannot run here: {reason}; use backend='auto' to fall back")
        # On a GPU the user likely expected the kernels: say so louder than on a CPU.
        _announce(device, f"reference (PyTorch) indexer on {device}: {reason}",
                  logging.WARNING if device.type == "cuda" else logging.INFO)
        return REFERENCE
    from transformers_misa.kernels.scorer import TILELANG_FP8_SCORER, TILELANG_SCORER

    _announce(device, f"TileLang indexer kernels on {device} ({torch.cuda.get_device_name(device)})")
    return _guarded(TILELANG_FP8_SCORER if qk_format == "fp8_e4m3" else TILELANG_SCORER)
