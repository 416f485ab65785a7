"""The indexer's KL training for examples/train_small_dsa.py, as DeepSeek trained its indexer: the patched indexers
hand their projections (from detached inputs) to an attention function that runs SDPA over the causal keys (dense
warm-up) or the causal keys the indexer selected (sparse phase) and adds the KL divergence between the indexer's score
distribution and the main attention's (summed over heads, L1-normalised) for a few query rows per step."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from transformers_misa import patch_model, unpatch_model

ATTN_IMPLEMENTATION = "misa_kl_training"


class KLState:
    """What the training indexers hand to the attention function within one forward."""

    def __init__(self) -> None:
        self.sparse = False
        self.rows: torch.Tensor | None = None  # query positions whose KL is taken this step
        self.stash: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]] = {}
        # The last indexer's stash: a GLM-5 "shared" layer (no indexer) attends over that indexer's top-k, so its
        # attention is a second KL target of the same indexer (without it, copying broke in the sparse phase).
        self.last: tuple[torch.Tensor, torch.Tensor, torch.Tensor, float] | None = None
        # --shared-kl-grad: the shared layer's KL term reaches the main model too (see training_indexer_forward)
        self.shared_grad = False
        self.last_with_grad: tuple[torch.Tensor, torch.Tensor, torch.Tensor, float] | None = None
        self.losses: list[torch.Tensor] = []


STATE = KLState()


def _index_logits(q: torch.Tensor, keys: torch.Tensor, weights: torch.Tensor, scale: float) -> torch.Tensor:
    """Σ_j w[t, j]·ReLU(q[t, j]·k[s])·scale for a few query rows: [B, Q, T] fp32 (recomputed in backward)."""
    scores = F.relu(torch.einsum("bqhd,btd->bqht", q.bfloat16(), keys.bfloat16())) * scale
    return torch.einsum("bqh,bqht->bqt", weights.bfloat16(), scores).float()


def training_indexer_forward(self, hidden_states, q_resid, position_embeddings, attention_mask, position_ids=None,
                             past_key_values=None, cache=None):
    """Replaces a patched indexer's forward while training: the projections get gradients (from detached inputs,
    so the KL loss trains only the indexer), the top-k is taken without them."""
    q, keys, weights = self.project(hidden_states.detach(), q_resid.detach(), position_embeddings)
    STATE.stash[self.layer_idx] = (q, keys, weights, self.softmax_scale)
    if STATE.shared_grad and getattr(self, "feeds_shared_layer", False):
        # The shared layer attends over this indexer's top-k but sees hidden states one layer further on; with the
        # inputs detached this indexer cannot learn what it lacks, so that term's gradient also reaches the layers
        # below. (2026-11-28, layer 2 shared: the term fell from 3.4-4.8 to ~0.3 nats, but copying never formed;
        # sharing layer 3 instead, without this, gave the GLM model that retrieves.)
        STATE.last_with_grad = (*self.project(hidden_states, q_resid, position_embeddings), self.softmax_scale)
    if not STATE.sparse:  # dense warm-up: the attention ignores the indices
        return torch.zeros(q.shape[0], q.shape[1], 1, dtype=torch.int32, device=q.device)
    with torch.no_grad():  # bf16 scores in query chunks: training needs no bit-exact DSA, just speed
        out = torch.empty(q.shape[0], q.shape[1], min(self.index_topk, keys.shape[1]), dtype=torch.int32,
                          device=q.device)
        for start in range(0, q.shape[1], 512):
            rows = slice(start, start + 512)
            logits = _index_logits(q[:, rows], keys, weights[:, rows], self.softmax_scale)
            logits.masked_fill_(~attention_mask[:, rows], -math.inf)
            out[:, rows] = logits.topk(out.shape[-1], dim=-1).indices.to(torch.int32)
        return out


def kl_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, indices=None, **kwargs):
    """SDPA over the causal (dense phase) or causal ∩ top-k (sparse phase) keys, plus the indexer's KL loss."""
    mask = attention_mask
    if STATE.sparse and indices is not None:
        selected = torch.zeros(mask.shape[0], mask.shape[2], mask.shape[3], dtype=torch.bool, device=mask.device)
        mask = mask & selected.scatter_(-1, indices.long(), True).unsqueeze(1)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
    stash = STATE.stash.pop(module.layer_idx, None)
    if stash is not None:
        STATE.last = stash
    elif getattr(module, "skip_topk", False):
        stash = STATE.last_with_grad if STATE.shared_grad else STATE.last
    if stash is not None:
        q, keys, weights, index_scale = stash
        rows = STATE.rows
        visible = mask[:, 0, rows]  # [B, Q, T]
        with torch.no_grad():  # target: main attention summed over heads, L1-normalised
            logits = (query[:, :, rows].float() @ key.float().transpose(-1, -2)) * scaling
            target = logits.masked_fill(~visible.unsqueeze(1), -math.inf).softmax(-1).sum(1)
            target = target / target.sum(-1, keepdim=True)
        index = checkpoint(_index_logits, q[:, rows], keys, weights[:, rows], index_scale, use_reentrant=False)
        log_q = index.masked_fill(~visible, -math.inf).log_softmax(-1)
        kl = torch.where(target > 0, target * (target.clamp_min(1e-30).log() - log_q), 0.0).sum(-1)
        STATE.losses.append(kl.mean())
    return out.transpose(1, 2).contiguous(), None


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, kl_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


def begin_kl_forward(sparse: bool, rows: torch.Tensor) -> None:
    """Readies the KL state for one forward: the phase (dense warm-up or sparse), the query rows of the KL terms, and
    no losses or stashed indexer inputs left from the previous forward."""
    STATE.sparse, STATE.rows = sparse, rows
    STATE.losses.clear()
    STATE.last = STATE.last_with_grad = None


def kl_query_chunk_size(device: torch.device) -> int | None:
    """Query chunk of the training's indexers: big chunks on a GPU for the sparse phase's top-k, the reference's
    scratch-budget default elsewhere."""
    return 512 if device.type == "cuda" else None


def training_indexers(model) -> list:
    """The patched indexers of `model`."""
    return [m for m in model.modules() if hasattr(m, "project") and hasattr(m, "select")]


def patch_for_kl_training(model, query_chunk_size: int | None = None) -> list:
    """Patches `model` with reference DSA indexers (no TileLang needed) whose forward is `training_indexer_forward`,
    and attention that adds the indexer KL loss (`kl_attention`); returns the indexers."""
    _register_attention()
    patch_model(model, mode="dsa", backend="reference", query_chunk_size=query_chunk_size)
    indexers = training_indexers(model)
    for indexer in indexers:
        indexer.forward = training_indexer_forward.__get__(indexer)
    last_indexer = None
    for layer in model.model.layers:  # GLM-5: the indexer whose top-k a "shared" layer reuses
        if getattr(layer.self_attn, "skip_topk", False) and last_indexer is not None:
            last_indexer.feeds_shared_layer = True
        elif getattr(layer.self_attn, "indexer", None) is not None:
            last_indexer = layer.self_attn.indexer
    model.config._attn_implementation = ATTN_IMPLEMENTATION
    return indexers


def unpatch_kl_training(model) -> None:
    """The model's own indexers and SDPA attention back, the KL state emptied."""
    STATE.stash.clear()
    STATE.last = STATE.last_with_grad = None
    unpatch_model(model)
    model.config._attn_implementation = "sdpa"
