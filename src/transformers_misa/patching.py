"""The glue: find every DSA indexer of a loaded model and swap it for a `MisaIndexer` (and back)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from typing import Any

from torch import nn

from .config import MisaConfig, resolve_config
from .indexer import MisaIndexer
from .registry import family_of, supported_model_types

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PatchedLayer:
    """One row of `misa_summary`: an attention layer and what its indexer does now."""

    name: str  # module path of the indexer, or of the attention layer for shared layers
    layer_idx: int | None
    family: str
    status: str  # "patched" or "shared" (GLM-5 layer reusing the previous layer's top-k: nothing to patch)
    n_heads: int | None
    topk: int | None


def _parent_and_attr(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def _find_indexers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, module) for name, module in model.named_modules()
            if not isinstance(module, MisaIndexer) and family_of(module) is not None]


def is_patched(model: nn.Module) -> bool:
    """Whether `patch_model` has been applied to `model` (and not undone)."""
    return getattr(model, "misa_config", None) is not None or any(
        isinstance(module, MisaIndexer) for module in model.modules())


def patch_model(model: nn.Module, mode: str = "misa", active_heads: int | None = None,
                calibration: Any = "auto", **options: Any) -> nn.Module:
    """Replaces every DSA indexer of `model` with a `MisaIndexer` running `mode`, in place.

    Args:
        model: a loaded DeepSeek-V3.2 (`deepseek_v32`) or GLM-5 (`glm_moe_dsa`) model, any head.
        mode: "misa" (routed heads), "misa_hierarchical" (routed candidates, full-head re-rank), "hisa"
            (block filter, then the full indexer on kept blocks) or "dsa" (the original method, re-implemented
            in bounded memory).
        active_heads: heads each query is routed to (misa modes; default 8, at most `index_n_heads`).
        **options: `block_size` (default 128), `candidate_factor` (misa_hierarchical, default 4), `router`
            (misa modes: "sum", default, or "max" pooling of each head's block scores), `keep_blocks` (hisa,
            default 4·topk/block_size), `query_chunk_size` (default: from a 256 MiB budget), `backend`,
            `qk_format`.
        calibration: router calibration of the misa modes (`transformers_misa.calibrate`): a path to its
            safetensors file (or the folder holding misa_calibration.safetensors), a `RouterCalibration`, None or
            False (route uncalibrated) or "auto" (default: misa_calibration.safetensors in the model's local checkpoint
            folder, if there is one fitted with the same block size and router).

    Returns:
        The same model, with `model.misa_config` set to the settings in force.

    Raises:
        ValueError: the model has no DSA indexer, is already patched, or a mode/option is bad. The model is then
            left exactly as it was: every replacement is built and checked before the first one is swapped in.
    """
    if is_patched(model):
        raise ValueError("model is already patched by transformers_misa; call unpatch_model(model) first")
    found = _find_indexers(model)
    if not found:
        raise ValueError(
            f"no DSA indexer found in {type(model).__name__}; transformers_misa patches the model types "
            f"{supported_model_types()} (an indexer module of DeepseekV32Indexer / GlmMoeDsaIndexer)"
        )
    options = {"active_heads": active_heads, **options}
    replacements: list[tuple[str, MisaIndexer]] = []
    config: MisaConfig | None = None
    for name, original in found:
        layer_config = resolve_config(mode, original.n_heads, original.index_topk, options)
        if config is not None and layer_config != config:
            raise ValueError(f"indexers of {type(model).__name__} differ in shape; cannot apply one setting to all")
        config = layer_config
        replacements.append((name, MisaIndexer(original, family_of(original), config)))
    from .calibration import resolve_calibration

    # config.router is None only for modes without a router, which resolve_calibration refuses or skips first.
    router_calibration = resolve_calibration(model, calibration, config.mode, config.block_size, config.router)
    for _, replacement in replacements:
        if router_calibration is not None:
            replacement.head_scale = router_calibration.scale_for(replacement.layer_idx)

    for name, replacement in replacements:
        parent, attr = _parent_and_attr(model, name)
        original = getattr(parent, attr)
        hook = getattr(original, "_hf_hook", None)
        if hook is not None:  # accelerate: the replacement must move inputs to its layer's device too
            from accelerate.hooks import add_hook_to_module

            add_hook_to_module(replacement, hook)
        setattr(parent, attr, replacement)
    model.misa_config = config
    model.misa_calibration = router_calibration
    logger.info("transformers_misa: patched %d indexers with %s%s", len(replacements), config,
                ", calibrated router" if router_calibration is not None else "")
    return model


def unpatch_model(model: nn.Module) -> nn.Module:
    """Puts the original indexers back (the very same module objects) and removes `model.misa_config`."""
    patched = [(name, module) for name, module in model.named_modules() if isinstance(module, MisaIndexer)]
    if not patched:
        raise ValueError("model is not patched by transformers_misa; nothing to unpatch")
    for name, module in patched:
        parent, attr = _parent_and_attr(model, name)
        setattr(parent, attr, module.original_indexer)
    for attr in ("misa_config", "misa_calibration"):
        if hasattr(model, attr):
            delattr(model, attr)
    return model


@contextlib.contextmanager
def temporarily_unpatched(model: nn.Module) -> Iterator[nn.Module]:
    """The model with its original indexers inside the block; a patched model is patched again afterwards with
    the same settings and calibration (an unpatched one is left as is)."""
    config = getattr(model, "misa_config", None)
    calibration = getattr(model, "misa_calibration", None)
    if is_patched(model):
        unpatch_model(model)
    try:
        yield model
    finally:
        if config is not None:
            if is_patched(model):
                unpatch_model(model)
            options = {k: v for k, v in config.to_dict().items() if k != "mode"}
            patch_model(model, config.mode, calibration=calibration, **options)


@contextlib.contextmanager
def temporarily_patched(model: nn.Module, mode: str = "misa", active_heads: int | None = None,
                        **options: Any) -> Iterator[nn.Module]:
    """`patch_model` for the duration of a `with` block; the original indexers are back afterwards, even on error."""
    patch_model(model, mode, active_heads, **options)
    try:
        yield model
    finally:
        if is_patched(model):  # the block may have unpatched it itself
            unpatch_model(model)


def misa_summary(model: nn.Module) -> list[PatchedLayer]:
    """What was patched, layer by layer, including GLM-5's shared layers (indexer None, nothing to patch)."""
    rows = []
    for name, module in model.named_modules():
        if isinstance(module, MisaIndexer):
            rows.append(PatchedLayer(name, module.layer_idx, module.family.model_type, "patched",
                                     module.n_heads, module.index_topk))
        elif hasattr(module, "indexer") and getattr(module, "indexer") is None and hasattr(module, "skip_topk"):
            rows.append(PatchedLayer(name, getattr(module, "layer_idx", None), model.config.model_type, "shared",
                                     None, None))
    return sorted(rows, key=lambda row: (row.layer_idx is None, row.layer_idx))
