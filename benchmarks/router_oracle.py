"""How far can 8 routed heads go on a model? Recall of DSA's top-k per layer for the MISA router and for per-head
oracles that use the exact token scores, plus the best 8-head set found greedily per query (128 queries).

    python benchmarks/router_oracle.py deepseek_v32 [MODEL_DIR]     # CPU; the shipped model by default

One held-out 2048-token window (the model's held-out essays, read from .data/haystack), queries 1024..2047,
top-256, block 64, 8 heads. Prints one line per layer.
"""
import sys, torch, math
from pathlib import Path
from transformers_misa import patch_model
from transformers_misa.trained import load_trained, training_info, trained_model_dir
from transformers_misa.ops import reference
from transformers_misa.ops.blocks import ChunkMask, TailBlock, head_scores
torch.manual_seed(0)
family = sys.argv[1]; model_dir = sys.argv[2] if len(sys.argv) > 2 else None
model, tok = load_trained(family, model_dir=model_dir)
folder = Path(model_dir) if model_dir else trained_model_dir(family)
info = training_info(folder)
hay = Path(__file__).resolve().parents[1] / ".data" / "haystack"
text = "\n".join((hay / n).read_text() for n in info["data"]["heldout_essays"])
ids = torch.tensor([[tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"][:2047]])
captured = {}
def obs(ix, q, keys, w, mask, sel):
    captured[ix.layer_idx] = (q.float(), keys.float(), w.float(), sel.long(), ix.softmax_scale)
patch_model(model, mode="dsa", calibration=False)
for m in model.modules():
    if hasattr(m, "observer"): m.observer = obs
with torch.no_grad(): model(ids)
K, B, A = 256, 64, 8
for layer, (q, keys, w, sel, scale) in sorted(captured.items()):
    T = keys.shape[1]; rows = torch.arange(1024, T)  # queries with a real choice
    qr, wr = q[0, rows], w[0, rows]                      # [c,H,D], [c,H]
    s = torch.relu(torch.einsum("chd,td->cht", qr, keys[0])) * scale  # [c,H,T]
    causal = torch.arange(T)[None, :] <= rows[:, None]   # [c,T]
    s = s * causal[:, None]
    full = (wr[..., None] * s).sum(1).masked_fill(~causal, -1e30)
    dsa = full.topk(K, -1).indices
    def recall(imp):
        heads = imp.topk(A, -1).indices
        sub = (wr.gather(1, heads)[..., None] * s.gather(1, heads[..., None].expand(-1, -1, T))).sum(1)
        got = sub.masked_fill(~causal, -1e30).topk(K, -1).indices
        hit = torch.zeros_like(full, dtype=torch.bool).scatter_(1, dsa, True).gather(1, got).float().mean()
        return float(hit)
    chunk = ChunkMask(None, slice(1024, T), 1, T, T, keys.device)
    pooled = reference.pooled_keys(keys, None, B)
    tail = TailBlock(keys, chunk, B)
    router = reference.reference_head_importance(q[:, rows], w[:, rows], pooled, chunk, B, scale, "sum", tail=tail)[0]
    insel = torch.zeros_like(full, dtype=torch.bool).scatter_(1, dsa, True)
    contrib = (wr.abs()[..., None] * s)  # [c,H,T]
    mass_sel = (contrib * insel[:, None]).sum(-1)
    mass_all = contrib.sum(-1)
    nvis = causal.sum(-1, keepdim=True).float()
    sep = (mass_sel / K - (mass_all - mass_sel) / (nvis - K)).abs()
    signed_sep = wr.sign() * ((s * insel[:, None]).sum(-1) / K - ((s * (causal & ~insel)[:, None]).sum(-1)) / (nvis - K)) * wr.abs()
    sd = (contrib * causal[:, None]).std(-1)
    print(f"{family} L{layer}: router {recall(router):.3f} | oracle mass-in-topk {recall(mass_sel):.3f} "
          f"all-mass {recall(mass_all):.3f} separation {recall(sep):.3f} signed-sep {recall(signed_sep):.3f} "
          f"std {recall(sd):.3f} |w| {recall(wr.abs()):.3f} w {recall(wr):.3f}", flush=True)
    # greedy best set of A heads per query (upper bound for any router keeping DSA's weights), 128 queries
    pick = torch.arange(0, len(rows), max(1, len(rows) // 128))
    c = s[pick] * wr[pick][..., None]; truth = insel[pick]; cz = causal[pick]
    chosen = torch.zeros(len(pick), q.shape[2], dtype=torch.bool); acc = torch.zeros(len(pick), T)
    for _ in range(A):
        cand = (acc[:, None] + c).masked_fill(~cz[:, None], -1e30)  # [p,H,T]
        top = cand.topk(K, -1).indices
        gain = truth[:, None].expand(-1, c.shape[1], -1).gather(2, top).float().mean(-1).masked_fill(chosen, -1)
        best = gain.argmax(-1)
        chosen[torch.arange(len(pick)), best] = True
        acc = acc + c[torch.arange(len(pick)), best]
    final = acc.masked_fill(~cz, -1e30).topk(K, -1).indices
    print(f"   greedy best-{A} set: {float(truth.gather(1, final).float().mean()):.3f}", flush=True)
