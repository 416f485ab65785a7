"""How far can 8 routed heads go on a model? Recall of DSA's top-k per layer for the MISA router and for per-head
oracles that use the exact token scores, plus the best 8-head set found greedily per query (128 queries), 8 heads
picked at random per query, one set of 8 for every query (the router's best on average), the router's 8 heads
re-weighted per query by least squares against DSA's score (an oracle bound on any re-weighting), and how
concentrated the heads' part in DSA's top-k is (the share of the 8 largest, the effective number of heads).

    python benchmarks/router_oracle.py --family deepseek_v32 --haystack ../shared/data/haystack/... [--model DIR]

CPU is enough. One held-out 2048-token window (the model's held-out essays), queries 1024..2047, top-256,
block 64, 8 heads, uncalibrated router. Prints one line per layer.
"""

from __future__ import annotations

import argparse

import torch

from transformers_misa import patch_model
from transformers_misa.evaluation.suite import heldout_texts
from transformers_misa.ops import reference
from transformers_misa.ops.blocks import TailBlock, head_scores
from transformers_misa.ops.masks import ChunkMask
from transformers_misa.trained import (
    TRAINED_FAMILIES,
    load_trained,
    trained_model_dir,
)

TOPK, BLOCK_SIZE, ACTIVE_HEADS, WINDOW, FIRST_QUERY, GREEDY_QUERIES = 256, 64, 8, 2048, 1024, 128


def capture_indexer_inputs(model, ids: torch.Tensor) -> dict[int, tuple]:
    """(q, keys, weights, softmax_scale) of every indexer layer for one DSA forward (the calibration observer)."""
    captured = {}

    def observe(indexer, q, keys, weights, mask, selected):
        captured[indexer.layer_idx] = (q.float(), keys.float(), weights.float(), indexer.softmax_scale)

    patch_model(model, mode="dsa", calibration=False)
    for module in model.modules():
        if hasattr(module, "observer"):
            module.observer = observe
    with torch.no_grad():
        model(ids)
    return captured


def layer_report(q, keys, weights, scale) -> str:
    num_keys = keys.shape[1]
    rows = torch.arange(FIRST_QUERY, num_keys)  # queries with a real choice
    qr, wr = q[0, rows], weights[0, rows]  # [c, H, D], [c, H]
    causal = torch.arange(num_keys)[None, :] <= rows[:, None]  # [c, T]
    scores = head_scores(qr.unsqueeze(0), keys.unsqueeze(1), scale)[0] * causal[:, None]  # [c, H, T]
    full = (wr[..., None] * scores).sum(1).masked_fill(~causal, -1e30)
    in_topk = torch.zeros_like(full, dtype=torch.bool).scatter_(1, full.topk(TOPK, -1).indices, True)

    def recall_of(routed: torch.Tensor) -> float:
        return float(in_topk.gather(1, routed.masked_fill(~causal, -1e30).topk(TOPK, -1).indices).float().mean())

    def routed_scores(importance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        heads = importance.topk(ACTIVE_HEADS, -1).indices
        return wr.gather(1, heads), scores.gather(1, heads[..., None].expand(-1, -1, num_keys))  # [c, 8], [c, 8, T]

    def recall(importance: torch.Tensor) -> float:
        head_weights, head_scores_ = routed_scores(importance)
        return recall_of((head_weights[..., None] * head_scores_).sum(1))

    chunk = ChunkMask(None, slice(FIRST_QUERY, num_keys), 1, num_keys, num_keys, keys.device)
    router = reference.reference_head_importance(
        q[:, rows], weights[:, rows], reference.pooled_keys(keys, None, BLOCK_SIZE), chunk, BLOCK_SIZE, scale, "sum",
        tail=TailBlock(keys, chunk, BLOCK_SIZE))[0]
    contribution = wr.abs()[..., None] * scores  # [c, H, T]
    mass_topk = (contribution * in_topk[:, None]).sum(-1)
    mass_all = contribution.sum(-1)
    others = causal.sum(-1, keepdim=True).float() - TOPK
    separation = (mass_topk / TOPK - (mass_all - mass_topk) / others).abs()
    signed = wr * ((scores * in_topk[:, None]).sum(-1) / TOPK - (scores * (causal & ~in_topk)[:, None]).sum(-1) / others)
    spread = (contribution * causal[:, None]).std(-1)
    line = (f"router {recall(router):.3f} | oracle mass-in-topk {recall(mass_topk):.3f} all-mass "
            f"{recall(mass_all):.3f} separation {recall(separation):.3f} signed-sep {recall(signed):.3f} "
            f"std {recall(spread):.3f} |w| {recall(wr.abs()):.3f} w {recall(wr):.3f}")
    share, effective = concentration(signed)
    chance = recall(torch.rand(wr.shape, generator=torch.Generator().manual_seed(0)))  # heads picked at random
    fixed = recall(router.mean(0).expand_as(router))  # one set for every query: the router's on average
    _, router_head_scores = routed_scores(router)
    refit = recall_of(refit_scores(router_head_scores, full, causal))
    return (line + f"\n   greedy best-{ACTIVE_HEADS} set: {greedy_best_set(scores, wr, in_topk, causal):.3f} | "
            f"random {ACTIVE_HEADS} heads {chance:.3f} | the same {ACTIVE_HEADS} for every query {fixed:.3f} | "
            f"router's heads re-weighted (least squares per query) {refit:.3f} | "
            f"top-{ACTIVE_HEADS} heads' share of the separation {share:.3f}, effective heads {effective:.1f}")


def refit_scores(head_scores_: torch.Tensor, full: torch.Tensor, causal: torch.Tensor) -> torch.Tensor:
    """The routed heads' scores [c, h, T] re-weighted per query (weights and an offset by least squares against DSA's
    full score over the visible keys, an oracle): how much any re-weighting of the same heads could recover."""
    basis = torch.cat([head_scores_, torch.ones_like(head_scores_[:, :1])], 1) * causal[:, None]  # [c, h + 1, T]
    gram = basis @ basis.transpose(1, 2) + 1e-6 * torch.eye(basis.shape[1])
    fit = torch.linalg.solve(gram, basis @ (full.masked_fill(~causal, 0.0))[..., None])  # [c, h + 1, 1]
    return (fit * basis).sum(1)


def concentration(signed: torch.Tensor) -> tuple[float, float]:
    """How few heads make DSA's top-k: per query, the share of the positive signed separations [c, H] (a head's
    weighted mean score over the top-k minus over the other visible keys) held by its ACTIVE_HEADS largest, and the
    effective number of heads (exp of their entropy); means over the queries. A share well below 1 leaves any
    ACTIVE_HEADS-head routing short of DSA's top-k, whatever picks the heads."""
    positive = signed.clamp_min(0)
    share = positive.topk(ACTIVE_HEADS, -1).values.sum(-1) / positive.sum(-1).clamp_min(1e-30)
    p = positive / positive.sum(-1, keepdim=True).clamp_min(1e-30)
    effective = torch.exp(-(p * p.clamp_min(1e-30).log()).sum(-1))
    return float(share.mean()), float(effective.mean())


def greedy_best_set(scores, wr, in_topk, causal) -> float:
    """Recall of the best set of ACTIVE_HEADS heads found greedily per query (an upper bound, near enough, for any
    router that keeps DSA's weights), on GREEDY_QUERIES evenly spaced queries."""
    pick = torch.arange(0, len(wr), max(1, len(wr) // GREEDY_QUERIES))
    weighted, truth, visible = scores[pick] * wr[pick][..., None], in_topk[pick], causal[pick]
    every = torch.arange(len(pick))
    chosen = torch.zeros(len(pick), wr.shape[1], dtype=torch.bool)
    total = torch.zeros(len(pick), scores.shape[-1])
    for _ in range(ACTIVE_HEADS):
        top = (total[:, None] + weighted).masked_fill(~visible[:, None], -1e30).topk(TOPK, -1).indices  # [p, H, k]
        gain = truth[:, None].expand(-1, wr.shape[1], -1).gather(2, top).float().mean(-1).masked_fill(chosen, -1)
        best = gain.argmax(-1)
        chosen[every, best] = True
        total = total + weighted[every, best]
    return float(truth.gather(1, total.masked_fill(~visible, -1e30).topk(TOPK, -1).indices).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", choices=TRAINED_FAMILIES, default="deepseek_v32")
    parser.add_argument("--haystack", required=True, help="folder of the essays the model was trained on")
    parser.add_argument("--model", default=None, help="model folder (default: the shipped one of --family)")
    args = parser.parse_args()
    model, tokenizer = load_trained(args.family, model_dir=args.model)
    # the eval's own reader: a folder without the model's held-out essays gets its error, which says what to pass
    text = "\n".join(heldout_texts(args.haystack, args.model or trained_model_dir(args.family)))
    ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"][:WINDOW - 1]])
    for layer, inputs in sorted(capture_indexer_inputs(model, ids).items()):
        print(f"{args.family} L{layer}: {layer_report(*inputs)}", flush=True)


if __name__ == "__main__":
    main()
