"""Recall of bf16 DSA's top-k when the indexer's q and k are rounded to FP8 e4m3 (`qk_format="fp8_e4m3"`).

    python benchmarks/fp8_recall.py --haystack ../shared/data/haystack/paul_graham_essays

On the built-in trained models in bf16, held-out essays (the same windows `transformers-misa eval` uses): per mode, the
per-layer recall of bf16 DSA's top-k and the perplexity, with bf16 and with FP8 q / k. Prints a table and writes
JSON under benchmarks/results/ (device, versions, date). Numerics only: on any device the FP8 values are
emulated exactly (see `fp8_e4m3_roundtrip`); no FP8 kernel speed is measured here.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
from pathlib import Path

import torch

import transformers
from transformers_misa import patch_model, unpatch_model
from transformers_misa.evaluation.perplexity import perplexity
from transformers_misa.evaluation.suite import heldout_texts, token_windows
from transformers_misa.recall import recall_by_layer
from transformers_misa.trained import TRAINED_FAMILIES, load_trained, trained_model_dir

MODES = [("dsa", dict(mode="dsa")), ("misa8", dict(mode="misa", active_heads=8, block_size=64)),
         ("misa8_hier", dict(mode="misa_hierarchical", active_heads=8, block_size=64)),
         ("hisa", dict(mode="hisa", block_size=64))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--haystack", required=True, help="the essays folder the models were trained with")
    parser.add_argument("--window", type=int, default=2048)
    parser.add_argument("--windows", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for family in TRAINED_FAMILIES:
        model, tokenizer = load_trained(family, device=device, dtype=torch.bfloat16)  # bf16, as the models ship
        texts = heldout_texts(args.haystack, trained_model_dir(family))
        sequences = token_windows(tokenizer, texts, args.window, args.windows)
        for name, kwargs in MODES:
            for qk_format in ("bf16", "fp8_e4m3"):
                patch_model(model, calibration=None, qk_format=qk_format, **kwargs)
                try:
                    per_layer = recall_by_layer(model, sequences)
                    ppl = perplexity(model, torch.stack(sequences))
                finally:
                    unpatch_model(model)
                values = [v for v in per_layer.values() if not math.isnan(v)]
                row = dict(family=family, mode=name, qk_format=qk_format, recall_mean=sum(values) / len(values),
                           recall_worst=min(values), perplexity=ppl, per_layer=per_layer)
                rows.append(row)
                print(f"{family:<13} {name:<11} {qk_format:<9} recall {row['recall_mean']:.4f} "
                      f"(worst {row['recall_worst']:.4f})  ppl {ppl:.3f}", flush=True)
    stamp = datetime.datetime.now(datetime.timezone.utc)
    environment = dict(device=torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
                       torch=torch.__version__, transformers=transformers.__version__,
                       python=platform.python_version(), date=stamp.isoformat())
    out = Path(args.out) / f"fp8_recall-{stamp:%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(environment=environment, settings=vars(args), results=rows), indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
