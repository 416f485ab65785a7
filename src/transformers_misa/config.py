"""Patch settings: the modes, their options, defaults and validation (all checked before a model is touched)."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from collections.abc import Iterable
from typing import Any

MODES: tuple[str, ...] = ("dsa", "misa", "misa_hierarchical", "hisa")

# Which options each mode reads. Passing an option a mode ignores is an error, not a silent no-op.
_COMMON_OPTIONS = frozenset({"query_chunk_size", "backend", "qk_format"})
MODE_OPTIONS: dict[str, frozenset[str]] = {
    "dsa": _COMMON_OPTIONS,
    "misa": _COMMON_OPTIONS | {"active_heads", "block_size", "router"},
    "misa_hierarchical": _COMMON_OPTIONS | {"active_heads", "block_size", "candidate_factor", "router"},
    "hisa": _COMMON_OPTIONS | {"block_size", "keep_blocks"},
}
BACKENDS: tuple[str, ...] = ("auto", "reference", "tilelang")
# Numerics of the indexer's q and k when scoring tokens: as computed (bf16 models: bf16), or FP8 e4m3 with one
# power-of-two scale per token (and per head for q), as DeepSeek's reference indexer quantises them.
QK_FORMATS: tuple[str, ...] = ("bf16", "fp8_e4m3")
# How MISA's router pools a head's scores over the visible key blocks: the sum (the paper's block-importance
# estimate) or the largest block score (a head that singles out one block ranks high even if it ignores the rest).
ROUTERS: tuple[str, ...] = ("sum", "max")
DEFAULT_ROUTER = "sum"

DEFAULT_ACTIVE_HEADS = 8
DEFAULT_BLOCK_SIZE = 128
DEFAULT_CANDIDATE_FACTOR = 4
# HISA keeps this many top-k's worth of tokens by default (64 blocks of 128 for topk 2048, as in the paper).
DEFAULT_HISA_TOKEN_FACTOR = 4


@dataclasses.dataclass(frozen=True)
class MisaConfig:
    """What `patch_model` did to a model: the mode and every option in force (defaults filled in).

    Attributes:
        mode: "dsa" (reference re-implementation of the stock indexer), "misa", "misa_hierarchical" or "hisa".
        active_heads: heads each query is routed to (misa modes); None otherwise.
        block_size: tokens per pooled key block (router and HISA's coarse filter); None for "dsa".
        candidate_factor: misa_hierarchical keeps candidate_factor·topk candidates for the full re-rank.
        keep_blocks: blocks HISA keeps per query (the sink among them), plus the local block on top.
        query_chunk_size: queries scored at once; None picks it from a 256 MiB scratch budget.
        backend: "auto" (TileLang kernels on Hopper GPUs, else the PyTorch reference), "reference" or "tilelang".
        qk_format: "bf16" (q and k as the model computes them) or "fp8_e4m3" (rounded to FP8 e4m3 with a
            power-of-two scale per token, as DeepSeek's reference indexer; the reference then sums those FP8 values
            exactly in fp32, and on Hopper the token scores run on the FP8 tensor cores, whose accumulation keeps
            fewer bits, so near-ties may swap).
        router: misa modes: how a head's block scores are pooled into its router score, "sum" (default) or "max";
            None otherwise.
    """

    mode: str = "misa"
    active_heads: int | None = None
    block_size: int | None = None
    candidate_factor: int | None = None
    keep_blocks: int | None = None
    query_chunk_size: int | None = None
    backend: str = "auto"
    qk_format: str = "bf16"
    router: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The settings as a plain dict (JSON-safe)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> MisaConfig:
        """Inverse of `to_dict`; unknown keys are rejected by name."""
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown MISA settings {unknown}; known: {[f.name for f in dataclasses.fields(cls)]}")
        return cls(**values)


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def mode_option_problem(mode: str, option_names: Iterable[str]) -> str | None:
    """What is wrong with a mode and the names of the options given with it, or None if nothing is."""
    if mode not in MODES:
        return f"unknown mode {mode!r}; choose one of {list(MODES)}"
    names = set(option_names)
    known = set().union(*MODE_OPTIONS.values())
    unknown = sorted(names - known)
    if unknown:
        return f"unknown option(s) {unknown}; known options: {sorted(known)}"
    inapplicable = sorted(names - MODE_OPTIONS[mode])
    if inapplicable:
        return f"option(s) {inapplicable} have no effect in mode {mode!r}; it takes {sorted(MODE_OPTIONS[mode])}"
    return None


def resolve_config(mode: str, num_heads: int, topk: int, options: dict[str, Any]) -> MisaConfig:
    """Checks a mode and its options against one indexer shape and fills in the defaults.

    Args:
        mode: one of `MODES`.
        num_heads: the model's `index_n_heads`.
        topk: the model's `index_topk`.
        options: what the user passed (`active_heads` included); None values count as not given.

    Raises:
        ValueError: with what to pass instead, for an unknown mode, an unknown or inapplicable option, or a bad value.
    """
    given = {name: value for name, value in options.items() if value is not None}
    problem = mode_option_problem(mode, given)
    if problem:
        raise ValueError(problem)
    backend = given.pop("backend", "auto")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {list(BACKENDS)}")
    qk_format = given.pop("qk_format", "bf16")
    if qk_format not in QK_FORMATS:
        raise ValueError(f"unknown qk_format {qk_format!r}; choose one of {list(QK_FORMATS)}")
    router = given.pop("router", DEFAULT_ROUTER)
    if router not in ROUTERS:
        raise ValueError(f"unknown router {router!r}; choose one of {list(ROUTERS)}")
    if backend == "tilelang" and importlib.util.find_spec("tilelang") is None:
        raise ValueError("backend='tilelang' needs TileLang: pip install tilelang==0.1.15 (or use backend='auto')")
    for name, value in given.items():
        _positive_int(name, value)

    settings: dict[str, Any] = {"mode": mode, "query_chunk_size": given.get("query_chunk_size"), "backend": backend,
                                "qk_format": qk_format}
    if mode in ("misa", "misa_hierarchical"):
        active = given.get("active_heads", DEFAULT_ACTIVE_HEADS)
        if active > num_heads:
            raise ValueError(f"active_heads={active} exceeds the model's index_n_heads={num_heads}; use 1..{num_heads}")
        settings["active_heads"] = active
        settings["router"] = router
    if mode != "dsa":
        settings["block_size"] = given.get("block_size", DEFAULT_BLOCK_SIZE)
    if mode == "misa_hierarchical":
        settings["candidate_factor"] = given.get("candidate_factor", DEFAULT_CANDIDATE_FACTOR)
    if mode == "hisa":
        block_size = settings["block_size"]
        keep = given.get("keep_blocks", max(2, math.ceil(DEFAULT_HISA_TOKEN_FACTOR * topk / block_size)))
        if keep < 2 or keep * block_size < topk:
            raise ValueError(
                f"keep_blocks={keep} with block_size={block_size} keeps {keep * block_size} tokens, fewer than "
                f"index_topk={topk} (or fewer than 2: the sink and one scored block; the local block comes on top); "
                f"use keep_blocks >= "
                f"{max(2, math.ceil(topk / block_size))}"
            )
        settings["keep_blocks"] = keep
    return MisaConfig(**settings)
