"""Recall of DSA's top-k: how many of the keys the original indexer picks the patched one picks too."""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Callable

import torch
from torch import nn

from .indexer import MisaIndexer
from .ops.masks import ChunkMask, query_chunks


@dataclasses.dataclass
class RecallReport:
    """Per-layer recall of DSA's top-k (the MISA paper's metric).

    recall[layer] = mean over queries of |ours ∩ DSA| / k, counted over the queries that see more than k
    keys (where the selection is really sparse; a query seeing ≤ k keys trivially keeps all of them).
    A layer with no such query has recall NaN.
    """

    mode: str
    per_layer: dict[int, float]
    sparse_queries: dict[int, int]

    @property
    def mean(self) -> float:
        """Mean recall over the layers that have sparse queries."""
        values = [v for v in self.per_layer.values() if not math.isnan(v)]
        return sum(values) / len(values) if values else float("nan")

    @property
    def worst(self) -> float:
        """Lowest per-layer recall."""
        values = [v for v in self.per_layer.values() if not math.isnan(v)]
        return min(values) if values else float("nan")

    def to_dict(self) -> dict:
        """JSON-ready dict: mode, per-layer recall and query counts, mean and worst."""
        return {"mode": self.mode, "per_layer": self.per_layer, "sparse_queries": self.sparse_queries,
                "mean": self.mean, "worst": self.worst}

    def table(self) -> str:
        """A plain-text table, one row per layer, then the mean and worst."""
        lines = [f"recall of DSA top-k, mode={self.mode}", f"{'layer':>5} {'queries':>8} {'recall':>8}"]
        for layer, value in sorted(self.per_layer.items()):
            lines.append(f"{layer:>5} {self.sparse_queries[layer]:>8} {value:>8.4f}")
        lines.append(f"{'mean':>5} {'':>8} {self.mean:>8.4f}")
        lines.append(f"{'worst':>5} {'':>8} {self.worst:>8.4f}")
        return "\n".join(lines)


def query_recall(dsa: torch.Tensor, ours: torch.Tensor, mask: torch.Tensor | None, num_keys: int,
                 rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
    """For the queries `rows` of indices [B, S, k] over `num_keys` keys: each query's recall |ours ∩ DSA| / k (a
    repeated index counts once) and the number of keys it sees, both [B, c]."""
    batch, num_queries, k = dsa.shape
    visible = ChunkMask(mask, rows, batch, num_queries, num_keys, dsa.device).visible
    picked = torch.zeros(visible.shape, dtype=torch.bool, device=dsa.device)
    picked.scatter_(-1, dsa[:, rows].long(), True)
    ours_picked = torch.zeros_like(picked).scatter_(-1, ours[:, rows].long(), True)
    return (picked & ours_picked).sum(-1).float() / k, visible.sum(-1)


def recall_counts(dsa: torch.Tensor, ours: torch.Tensor, mask: torch.Tensor | None, num_keys: int,
                  chunk_size: int = 256) -> tuple[float, int]:
    """Sum of per-query recall and the number of sparse queries, for indices [B, S, k] over `num_keys` keys."""
    total, count = 0.0, 0
    for rows in query_chunks(dsa.shape[1], 0, chunk_size):
        hits, seen = query_recall(dsa, ours, mask, num_keys, rows)
        sparse = seen > dsa.shape[-1]  # [B, c]
        total += float(hits[sparse].sum())
        count += int(sparse.sum())
    return total, count


SelectionConsumer = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor | None, int], None]


def probe_selections(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor | None]],
                     consume: SelectionConsumer, caller: str) -> list[int]:
    """Runs each (input_ids, attention_mask) through a patched model with DSA's selection driving it, and after each
    forward hands every indexer's selections to `consume(layer_idx, dsa, ours, mask, num_keys)` (indices [B, S, k]).
    Returns the patched layers' indices.

    Raises:
        ValueError: the model is not patched (`caller` names the function that needs it).
    """
    indexers = [m for m in model.modules() if isinstance(m, MisaIndexer)]
    if not indexers:
        raise ValueError(f"{caller} needs a patched model: call patch_model(model, mode=...) first")
    device = next(model.parameters()).device
    for module in indexers:
        module.recall_probe = []
    try:
        for input_ids, attention_mask in batches:
            model(input_ids=input_ids.to(device), use_cache=False,
                  attention_mask=None if attention_mask is None else attention_mask.to(device))
            for module in indexers:
                for dsa, ours, mask, num_keys in module.recall_probe:
                    consume(module.layer_idx, dsa, ours, mask, num_keys)
                module.recall_probe.clear()
    finally:
        for module in indexers:
            module.recall_probe = None
    return [module.layer_idx for module in indexers]


def _probe_recall(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor | None]], caller: str
                  ) -> tuple[dict[int, float], dict[int, int]]:
    """Per-layer recall and sparse-query counts over forwards of (input_ids, attention_mask), DSA driving."""
    totals: defaultdict[int, list] = defaultdict(lambda: [0.0, 0])  # layer -> [sum of recall, sparse queries]

    def add(layer: int, dsa: torch.Tensor, ours: torch.Tensor, mask: torch.Tensor | None, num_keys: int) -> None:
        total, count = recall_counts(dsa, ours, mask, num_keys)
        totals[layer][0] += total
        totals[layer][1] += count

    layers = probe_selections(model, batches, add, caller)
    per_layer = {layer: totals[layer][0] / totals[layer][1] if totals[layer][1] else math.nan for layer in layers}
    return per_layer, {layer: totals[layer][1] for layer in layers}


@torch.no_grad()
def measure_recall(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> RecallReport:
    """Runs `input_ids` once through a patched model and measures each layer's recall of DSA's top-k.

    In every layer the original DSA selection and the patched one are computed on the same inputs; the DSA
    selection drives the model, so every layer sees the hidden states of the unpatched model.

    Raises:
        ValueError: if the model is not patched (call `patch_model` first).
    """
    per_layer, sparse_queries = _probe_recall(model, [(input_ids, attention_mask)], "measure_recall")
    return RecallReport(model.misa_config.mode, per_layer, sparse_queries)


@torch.no_grad()
def recall_by_layer(model: nn.Module, sequences: list[torch.Tensor]) -> dict[int, float]:
    """Per-layer recall of DSA's top-k over several unpadded token-id sequences ([T] each) of a patched model,
    weighted by each sequence's number of sparse queries (one forward per sequence, DSA driving the model)."""
    batches = [(torch.as_tensor(ids).reshape(1, -1), None) for ids in sequences]
    return _probe_recall(model, batches, "recall_by_layer")[0]
