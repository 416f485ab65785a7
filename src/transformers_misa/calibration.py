"""Router calibration: how MISA's block-pooled router score maps to each head's true importance, fitted on real text.

    calibration = calibrate(model, texts, tokenizer, block_size=64)   # runs the text through the model
    calibration.save("ckpt/misa_calibration.safetensors")            # beside the model: patch_model finds it
    patch_model(model, mode="misa", active_heads=8, block_size=64)    # or calibration=path / the object

What is fitted. MISA routes query t to the heads with the largest router score
    r[t, j] = |w[t, j]| · Σ_m ReLU(q[t, j]·k̄_m)·scale          (k̄_m: mean key of visible block m)
while what matters for DSA's top-k is how well head j separates the keys DSA selects from the others,
    a[t, j] = |w[t, j]| · |mean_{s in top-k} ReLU(q[t, j]·k_s) - mean_{s visible, not in top-k} ReLU(q[t, j]·k_s)|·scale
(a head that scores every key alike changes no ranking, however large its scores). Pooling maps the two
differently per head: ReLU of a block mean understates the mean of ReLU (Jensen) by a head-dependent gap, and a
large block sum may come from a flat head. The calibration fits one factor per layer and head,
c[l, j] = exp(mean_t log(a[t, j] / r[t, j])) over the calibration queries that see more than top-k keys, and
routes with c[l, j]·r[t, j]. A layer keeps its factors only where they do not lower the recall of DSA's top-k on
the calibration text at any of the active-heads settings checked; otherwise its factors are 1 (uncalibrated).
(Measured on the trained DeepSeek-shaped model, this separation target beat a sum-over-top-k target, which
lowered recall in most layers.) With router="max" the router score uses the largest block score instead of the
sum, and the factors are fitted for that score; a calibration records its router and is used only with it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import DEFAULT_BLOCK_SIZE, DEFAULT_ROUTER, ROUTERS
from .indexer import MisaIndexer
from .ops import reference
from .ops.blocks import TailBlock, gather_keys, head_scores
from .ops.masks import ChunkMask, query_chunks

CALIBRATION_FILE = "misa_calibration.safetensors"
_FORMAT = "transformers_misa.router_calibration.v1"


@dataclasses.dataclass
class RouterCalibration:
    """Per-layer, per-head factors on MISA's router score, and the model shape they were fitted for.

    Attributes:
        head_scale: [layers, heads] fp32; row i belongs to indexer layer `layer_ids[i]`.
        layer_ids: layer indices of the model's indexers (GLM-5's shared layers have none).
        block_size: key block size the router pooled over while fitting (patch with the same).
        model_type, num_hidden_layers, index_n_heads, index_topk: the model it was fitted on.
        router: the router pooling it was fitted for ("sum" or "max"; files written before the option read "sum").
        info: JSON-safe facts about the fit (texts, tokens, per-layer recall before / after).
    """

    head_scale: torch.Tensor
    layer_ids: list[int]
    block_size: int
    model_type: str
    num_hidden_layers: int
    index_n_heads: int
    index_topk: int
    router: str = DEFAULT_ROUTER
    info: dict[str, Any] = dataclasses.field(default_factory=dict)

    def scale_for(self, layer_idx: int) -> torch.Tensor:
        """The [heads] factors of one layer."""
        return self.head_scale[self.layer_ids.index(layer_idx)]

    def check_model(self, model: nn.Module, block_size: int | None = None, router: str | None = None) -> None:
        """Raises ValueError (saying what differs and what to do) if this calibration is not for `model`."""
        config = model.config
        indexer_layers = sorted(_indexer_layer_ids(model))
        expected = dict(model_type=config.model_type, num_hidden_layers=config.num_hidden_layers,
                        index_n_heads=config.index_n_heads, layer_ids=indexer_layers)
        found = dict(model_type=self.model_type, num_hidden_layers=self.num_hidden_layers,
                     index_n_heads=self.index_n_heads, layer_ids=self.layer_ids)
        differs = {name: (found[name], expected[name]) for name in expected
                   if str(found[name]).removesuffix("_misa") != str(expected[name]).removesuffix("_misa")}
        if differs:
            detail = ", ".join(f"{name}: calibration {a}, model {b}" for name, (a, b) in differs.items())
            raise ValueError(f"this router calibration was fitted on another model ({detail}); run "
                             f"transformers_misa.calibrate on this model, or patch without it (calibration=None)")
        if block_size is not None and block_size != self.block_size:
            raise ValueError(f"the router calibration was fitted with block_size={self.block_size}, the patch uses "
                             f"block_size={block_size}; patch with block_size={self.block_size} or recalibrate")
        if router is not None and router != self.router:
            raise ValueError(f"the router calibration was fitted for router={self.router!r}, the patch uses "
                             f"router={router!r}; patch with router={self.router!r} or recalibrate with "
                             f"router={router!r}")

    def save(self, path: str | os.PathLike) -> Path:
        """Writes a safetensors file: tensors head_scale and layer_ids, the rest as metadata."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = dict(format=_FORMAT, block_size=self.block_size, model_type=self.model_type,
                    num_hidden_layers=self.num_hidden_layers, index_n_heads=self.index_n_heads,
                    index_topk=self.index_topk, router=self.router)
        save_file({"head_scale": self.head_scale.float().contiguous().cpu(),
                   "layer_ids": torch.tensor(self.layer_ids, dtype=torch.int64)}, str(path),
                  metadata={"misa": json.dumps(meta), "info": json.dumps(self.info)})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> RouterCalibration:
        """Reads a file written by `save`. Raises ValueError for a file that is not a router calibration."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if "misa" not in metadata or set(handle.keys()) != {"head_scale", "layer_ids"}:
                raise ValueError(f"{path} is not a transformers_misa router calibration (write one with calibrate)")
            head_scale, layer_ids = handle.get_tensor("head_scale"), handle.get_tensor("layer_ids")
        meta = json.loads(metadata["misa"])
        if meta.pop("format", None) != _FORMAT:
            raise ValueError(f"{path}: unknown calibration format; re-run calibrate with this transformers_misa")
        if head_scale.dim() != 2 or head_scale.shape[0] != len(layer_ids):
            raise ValueError(f"{path}: head_scale has shape {tuple(head_scale.shape)} for {len(layer_ids)} layers")
        return cls(head_scale=head_scale, layer_ids=layer_ids.tolist(), info=json.loads(metadata.get("info", "{}")),
                   **meta)


def _indexer_layer_ids(model: nn.Module) -> list[int]:
    from .registry import family_of

    return [m.layer_idx for m in model.modules() if isinstance(m, MisaIndexer) or family_of(m) is not None]


def _token_ids(texts: Sequence[Any], tokenizer: Any, max_tokens: int, block_size: int) -> list[torch.Tensor]:
    if isinstance(texts, (str, torch.Tensor)) or not len(texts):
        raise ValueError("texts must be a non-empty list of strings (with a tokenizer) or of token-id tensors")
    sequences = []
    for number, text in enumerate(texts):
        if isinstance(text, str):
            if tokenizer is None:
                raise ValueError("texts are strings: pass the model's tokenizer (calibrate(model, texts, tokenizer))")
            ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
        else:
            ids = torch.as_tensor(text, dtype=torch.long).flatten()
        ids = ids[:max_tokens]
        if ids.numel() < block_size:
            raise ValueError(f"calibration text {number} has {ids.numel()} tokens, fewer than one block "
                             f"(block_size={block_size}); give texts of at least {block_size} tokens")
        sequences.append(ids)
    return sequences


class _LogRatioStats:
    """Running sums of log(a / r) per layer and head (see the module docstring)."""

    def __init__(self, block_size: int, router: str = DEFAULT_ROUTER, chunk_size: int = 256) -> None:
        self.block_size, self.router, self.chunk_size = block_size, router, chunk_size
        self.sums: dict[int, torch.Tensor] = {}
        self.counts: dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, indexer: MisaIndexer, q: torch.Tensor, keys: torch.Tensor, weights: torch.Tensor,
                 mask: torch.Tensor | None, selected: torch.Tensor) -> None:
        """Called by a "dsa"-mode indexer with its inputs and the DSA top-k it selected."""
        batch, num_queries, num_heads, _ = q.shape
        num_keys, scale = keys.shape[1], indexer.softmax_scale
        k = selected.shape[-1]
        pooled = reference.pooled_keys(keys, mask, self.block_size)
        ones = torch.ones(batch, num_queries, num_heads, device=q.device)
        total = torch.zeros(num_heads, dtype=torch.float64, device=q.device)
        count = torch.zeros(num_heads, dtype=torch.float64, device=q.device)
        for rows in query_chunks(num_queries, 0, self.chunk_size):
            chunk = ChunkMask(mask, rows, batch, num_queries, num_keys, q.device)
            sparse = chunk.visible.sum(-1) > k  # [B, c]: queries whose top-k is a real choice
            router = reference.reference_head_importance(q[:, rows], ones[:, rows], pooled, chunk, self.block_size,
                                                         scale, self.router,
                                                         tail=TailBlock(keys, chunk, self.block_size))
            visible = chunk.visible.unsqueeze(2)  # [B, c, 1, T]
            all_keys = head_scores(q[:, rows], keys.unsqueeze(1), scale).masked_fill_(~visible, 0.0).sum(-1)
            top = head_scores(q[:, rows], gather_keys(keys, selected[:, rows].long()), scale).sum(-1)
            others = (visible.sum(-1) - k).clamp_min(1)
            true = (top / k - (all_keys - top) / others).abs()  # [B, c, H]: separation (|w| cancels in the ratio)
            usable = sparse.unsqueeze(-1) & (router > 0) & (true > 0)
            ratio = torch.where(usable, true.clamp_min(1e-30).log() - router.clamp_min(1e-30).log(), 0.0)
            total += ratio.double().sum((0, 1))
            count += usable.double().sum((0, 1))
        layer = indexer.layer_idx
        self.sums[layer] = self.sums.get(layer, 0) + total.cpu()
        self.counts[layer] = self.counts.get(layer, 0) + count.cpu()

    def factors(self, layer_ids: list[int], num_heads: int) -> torch.Tensor:
        rows = []
        for layer in layer_ids:
            counts = self.counts.get(layer, torch.zeros(num_heads, dtype=torch.float64))
            mean = self.sums.get(layer, torch.zeros(num_heads, dtype=torch.float64)) / counts.clamp_min(1)
            rows.append(torch.where(counts > 0, mean.exp(), 1.0))
        factors = torch.stack(rows).float()
        return factors / factors.mean(-1, keepdim=True)  # only ratios between heads matter for routing


@torch.no_grad()
def calibrate(model: nn.Module, texts: Sequence[Any], tokenizer: Any = None, *, block_size: int | None = None,
              router: str | None = None, active_heads: Sequence[int] = (4, 8, 16), max_tokens: int = 8192,
              progress: bool = True, save_to: str | os.PathLike | None = None) -> RouterCalibration:
    """Fits MISA's router calibration on real text (see the module docstring for what is fitted).

    Args:
        model: a DeepSeek-V3.2 / GLM-5 model, patched or not (a patched model is restored afterwards).
        texts: strings (with `tokenizer`) or token-id tensors; each at least one block long, cut to `max_tokens`.
        block_size: the key block size the router will use (default: the patched model's, else 128).
        router: the router pooling it will be used with, "sum" or "max" (default: the patched model's, else "sum").
        active_heads: settings at which a layer's factors must not lower recall on `texts` (others above the
            model's head count are skipped).
        save_to: also write the result there (a folder gets CALIBRATION_FILE).

    Raises:
        ValueError: no DSA indexer, empty texts, strings without a tokenizer, or a text shorter than one block.
    """
    from tqdm.auto import tqdm

    from .patching import patch_model, temporarily_unpatched, unpatch_model
    from .recall import recall_by_layer

    previous = getattr(model, "misa_config", None)
    block_size = block_size or (previous.block_size if previous is not None and previous.block_size else
                                DEFAULT_BLOCK_SIZE)
    router = router or (previous.router if previous is not None and previous.router else DEFAULT_ROUTER)
    if router not in ROUTERS:
        raise ValueError(f"unknown router {router!r}; choose one of {list(ROUTERS)}")
    sequences = _token_ids(texts, tokenizer, max_tokens, block_size)
    device = next(model.parameters()).device
    with temporarily_unpatched(model):
        layer_ids = sorted(_indexer_layer_ids(model))
        if not layer_ids:
            raise ValueError(f"{type(model).__name__} has no DSA indexer to calibrate")
        config = model.config
        stats = _LogRatioStats(block_size, router)
        num_heads = config.index_n_heads
        settings = [h for h in dict.fromkeys(active_heads) if h < num_heads]
        bar = tqdm(total=len(sequences) * (1 + 2 * len(settings)), desc="calibrate", unit="pass",
                   disable=not progress, leave=False)
        patch_model(model, mode="dsa", calibration=None)
        try:
            indexers = [m for m in model.modules() if isinstance(m, MisaIndexer)]
            for module in indexers:
                module.observer = stats
            for ids in sequences:
                model(input_ids=ids[None].to(device), use_cache=False)
                bar.update()
        finally:
            for module in model.modules():
                if isinstance(module, MisaIndexer):
                    module.observer = None
            unpatch_model(model)
        fitted = RouterCalibration(stats.factors(layer_ids, num_heads), layer_ids, block_size, config.model_type,
                                   config.num_hidden_layers, num_heads, config.index_topk, router)
        ones = dataclasses.replace(fitted, head_scale=torch.ones_like(fitted.head_scale))
        recall: dict[str, dict[str, dict[int, float]]] = {}
        for heads in settings:
            recall[str(heads)] = {}
            for name, calibration in (("uncalibrated", ones), ("calibrated", fitted)):
                patch_model(model, mode="misa", active_heads=heads, block_size=block_size, router=router,
                            calibration=calibration)
                try:
                    recall[str(heads)][name] = recall_by_layer(model, sequences)
                finally:
                    unpatch_model(model)
                bar.update(len(sequences))
        bar.close()
    kept = [all(recall[str(h)]["calibrated"][layer] >= recall[str(h)]["uncalibrated"][layer] for h in settings)
            for layer in layer_ids]
    head_scale = torch.where(torch.tensor(kept)[:, None], fitted.head_scale, 1.0)
    from . import __version__

    info = dict(version=__version__, texts=len(sequences), tokens=int(sum(s.numel() for s in sequences)),
                active_heads_checked=settings, layers_kept=[l for l, k in zip(layer_ids, kept) if k],
                recall_on_calibration_text=recall)
    result = dataclasses.replace(fitted, head_scale=head_scale, info=info)
    if save_to is not None:
        target = Path(save_to)
        result.save(target / CALIBRATION_FILE if target.is_dir() or not target.suffix else target)
    return result


def resolve_calibration(model: nn.Module, calibration: Any, mode: str, block_size: int | None,
                        router: str = DEFAULT_ROUTER) -> RouterCalibration | None:
    """What `patch_model`'s `calibration` argument means for this model and mode.

    "auto": CALIBRATION_FILE in the model's local checkpoint folder (`config._name_or_path`), used for misa modes
    when its block size and router match the patch's, else nothing. None or False: none. A path or a
    RouterCalibration: that one, checked against the model (ValueError if it does not match, or if the mode has no
    router; TypeError for anything else).
    """
    if calibration is None or calibration is False:
        return None
    routed = mode in ("misa", "misa_hierarchical")
    if isinstance(calibration, str) and calibration == "auto":
        folder = getattr(model.config, "_name_or_path", None) or getattr(model.config, "name_or_path", None)
        path = Path(folder) / CALIBRATION_FILE if folder else None
        if not routed or path is None or not path.is_file():
            return None
        found = RouterCalibration.load(path)
        if found.block_size != block_size or found.router != router:
            import logging

            logging.getLogger(__name__).warning(
                "transformers_misa: %s was fitted with block_size=%d and router=%r, not %s and %r; routing "
                "uncalibrated", path, found.block_size, found.router, block_size, router)
            return None
        found.check_model(model)
        return found
    if not routed:
        raise ValueError(f"a router calibration applies to modes 'misa' and 'misa_hierarchical', not {mode!r}; "
                         "drop calibration=...")
    if not isinstance(calibration, (RouterCalibration, str, os.PathLike)):
        raise TypeError(f"calibration must be 'auto', None / False, a path or a RouterCalibration, not "
                        f"{type(calibration).__name__}")
    if not isinstance(calibration, RouterCalibration):
        path = Path(calibration)
        if path.is_dir():
            path = path / CALIBRATION_FILE
        if not path.is_file():
            raise FileNotFoundError(f"router calibration {str(path)!r} not found (write one with calibrate(...))")
        calibration = RouterCalibration.load(path)
    calibration.check_model(model, block_size, router)
    return calibration
