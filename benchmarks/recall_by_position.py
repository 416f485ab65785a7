"""Recall of DSA's top-k by how many keys a query sees: does MISA's shortfall grow with the context?

    python benchmarks/recall_by_position.py --family deepseek_v32 --haystack ../shared/data/haystack/... \
        [--model DIR] [--length 8192] [--mode misa --active-heads 8 --block-size 64] [--out DIR]

CPU is enough (8K tokens of the built-in DeepSeek-shaped model: ~1.5 min on 2 cores). One window of the model's
held-out essays from their start, DSA driving the model (as in `transformers_misa.recall`); each layer's queries are
binned by the keys they see, in powers of two from 2 x top-k (a query seeing at most top-k keys keeps all of them and
is left out). Prints one line per layer; with --out, writes recall_by_position-DATE.json there.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import torch

from transformers_misa import patch_model
from transformers_misa.evaluation.suite import heldout_texts
from transformers_misa.ops.masks import query_chunks
from transformers_misa.recall import probe_selections, query_recall
from transformers_misa.trained import TRAINED_FAMILIES, load_trained, trained_model_dir


def visible_key_bins(topk: int, length: int) -> list[tuple[int, int]]:
    """(fewest, most) keys seen per bin: (k, 2k], (2k, 4k], ... up to `length`."""
    bins, low = [], topk
    while low < length:
        bins.append((low, min(2 * low, length)))
        low *= 2
    return bins


@torch.no_grad()
def recall_by_visible_keys(model: torch.nn.Module, input_ids: torch.Tensor) -> dict[int, list[dict[str, float]]]:
    """Per layer, per bin of visible keys: mean recall of DSA's top-k and the number of queries, for one unpadded
    sequence [1, T] through a patched model (one forward, DSA driving)."""
    report = {}

    def bin_queries(layer: int, dsa: torch.Tensor, ours: torch.Tensor, mask: torch.Tensor | None,
                    num_keys: int) -> None:
        per_chunk = [query_recall(dsa, ours, mask, num_keys, rows) for rows in query_chunks(dsa.shape[1], 0, 256)]
        hits, seen = (torch.cat(parts, dim=1)[0] for parts in zip(*per_chunk))  # [T] each
        rows = []
        for low, high in visible_key_bins(dsa.shape[-1], num_keys):
            in_bin = (seen > low) & (seen <= high)
            rows.append(dict(keys_from=low + 1, keys_to=high, queries=int(in_bin.sum()),
                             recall=float(hits[in_bin].mean())))
        report[layer] = rows

    probe_selections(model, [(input_ids, None)], bin_queries, "recall_by_visible_keys")
    return report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", choices=TRAINED_FAMILIES, default="deepseek_v32")
    parser.add_argument("--haystack", required=True, help="folder of the essays the model was trained on")
    parser.add_argument("--model", default=None, help="model folder (default: the shipped one of --family)")
    parser.add_argument("--length", type=int, default=8192, help="tokens in the window (bos included)")
    parser.add_argument("--mode", default="misa", choices=["misa", "misa_hierarchical", "hisa"])
    parser.add_argument("--active-heads", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--out", default=None, help="folder for the JSON (none: print only)")
    args = parser.parse_args(argv)
    model, tokenizer = load_trained(args.family, model_dir=args.model)
    text = "\n\n".join(heldout_texts(args.haystack, args.model or trained_model_dir(args.family)))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][: args.length - 1]
    if len(ids) < args.length - 1:
        raise ValueError(f"the held-out essays have {len(ids)} tokens, fewer than --length {args.length}")
    options = dict(block_size=args.block_size) | ({} if args.mode == "hisa" else dict(active_heads=args.active_heads))
    patch_model(model, mode=args.mode, **options)
    report = recall_by_visible_keys(model, torch.tensor([[tokenizer.bos_token_id] + ids]))
    for layer, rows in sorted(report.items()):
        print(f"{args.family} L{layer}: " + " | ".join(
            f"{row['keys_from']}-{row['keys_to']} keys {row['recall']:.3f}" for row in rows), flush=True)
    result = dict(family=args.family, model=args.model or "shipped", length=args.length, mode=args.mode,
                  options=options, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  torch=torch.__version__, per_layer=report)
    if args.out:
        path = Path(args.out) / f"recall_by_position-{datetime.datetime.now():%Y%m%d-%H%M%S}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
        print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
