"""`transformers-misa eval`: recall, perplexity and Needle-in-a-Haystack per mode on a trained DSA model.

By default the model is the package's built-in trained model of `--family` (`transformers_misa.trained`); any
DeepSeek-V3.2 / GLM-5 checkpoint folder with its tokenizer serves (`--model`). Text is split as the training
script split it: recall and perplexity are measured on the held-out essays that training.json names (else the last
five .txt files of the haystack folder), so neither the model nor the router calibration has seen them.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..config import DEFAULT_ROUTER
from ..recall import recall_by_layer
from ..trained import TRAINED_FAMILIES, load_trained, training_info
from .niah import patched, run_niah, save_niah_heatmap
from .perplexity import perplexity

EVAL_FAMILIES = TRAINED_FAMILIES
EVAL_BLOCK_SIZE = 64  # key block size of the misa / hisa modes on the trained models (top-k 256)
GREEN = 0.75  # a NIAH cell is green when at least 3 of the needle's 4 key words come back
HELDOUT_FALLBACK = 5
# NIAH (one generate per cell and mode) runs these modes and their calibrated variants; recall and perplexity
# run every mode of `eval_modes`.
NIAH_MODES = ("dsa", "misa8", "misa8_hier", "hisa")


def eval_modes(num_heads: int, block_size: int = EVAL_BLOCK_SIZE, calibration: Any = None,
               router: str = DEFAULT_ROUTER) -> list[tuple[str, dict[str, Any]]]:
    """(name, patch kwargs) of the modes `eval` compares; calibrated misa variants when a calibration is given;
    `router` is the misa modes' router pooling."""
    modes: list[tuple[str, dict[str, Any]]] = [("dsa", {"mode": "dsa"})]
    variants = [("", None)] + ([("+cal", calibration)] if calibration is not None else [])
    for suffix, cal in variants:
        for heads in (4, 8, 16):
            if heads < num_heads:
                modes.append((f"misa{heads}{suffix}", {"mode": "misa", "active_heads": heads, "block_size": block_size,
                                                       "router": router, "calibration": cal}))
        modes.append((f"misa8_hier{suffix}", {"mode": "misa_hierarchical", "active_heads": min(8, num_heads),
                                              "block_size": block_size, "router": router, "calibration": cal}))
    modes.append(("hisa", {"mode": "hisa", "block_size": block_size}))
    return modes


def heldout_texts(haystack_dir: str | os.PathLike, model_dir: str | os.PathLike) -> list[str]:
    """The held-out essays of a trained model (training.json), else the last few .txt files of the folder."""
    folder = Path(haystack_dir)
    names = training_info(model_dir).get("data", {}).get("heldout_essays")
    if names is None:
        names = sorted(p.name for p in folder.glob("*.txt"))[-HELDOUT_FALLBACK:]
    missing = [name for name in names if not (folder / name).is_file()]
    if missing or not names:
        raise ValueError(f"haystack folder {str(folder)!r} lacks the held-out essays {missing or names}; pass the "
                         "folder the model was trained with")
    return [(folder / name).read_text(encoding="utf-8", errors="replace") for name in names]


def token_windows(tokenizer: Any, texts: Sequence[str], length: int, count: int) -> list[torch.Tensor]:
    """Up to `count` consecutive windows of `length` tokens (bos first) from the texts joined."""
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    step = length - len(bos)
    windows = [torch.tensor(bos + ids[i: i + step]) for i in range(0, len(ids) - step + 1, step)][:count]
    if not windows:
        raise ValueError(f"the held-out text has {len(ids)} tokens, fewer than one window of {length}")
    return windows


def _green(scores: list[list[float]]) -> list[list[bool]]:
    return [[s >= GREEN for s in row] for row in scores]


def summarize(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per mode: recall mean / worst, perplexity and its change vs DSA, NIAH mean and green check."""
    dsa_ppl = results["perplexity"]["dsa"]
    dsa_green = _green(results["niah"]["modes"]["dsa"]["scores"])
    rows = []
    for name in results["modes"]:
        recall = results["recall"].get(name)
        niah = results["niah"]["modes"].get(name)
        scores = niah["scores"] if niah is not None else None
        cells = [s for row in scores for s in row] if scores is not None else []
        rows.append(dict(
            mode=name, recall_mean=None if recall is None else recall["mean"],
            recall_worst=None if recall is None else recall["worst"], perplexity=results["perplexity"][name],
            ppl_change=results["perplexity"][name] / dsa_ppl - 1.0,
            niah_mean=sum(cells) / len(cells) if cells else None,
            green_where_dsa_green=None if scores is None else all(
                g or not d for grow, drow in zip(_green(scores), dsa_green) for g, d in zip(grow, drow))))
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """The summary as a markdown table."""
    lines = ["| mode | recall mean | recall worst | perplexity | vs DSA | NIAH mean | green where DSA green |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        recall = "- | -" if r["recall_mean"] is None else f"{r['recall_mean']:.3f} | {r['recall_worst']:.3f}"
        niah = "- | -" if r["niah_mean"] is None else (
            f"{r['niah_mean']:.2f} | {'yes' if r['green_where_dsa_green'] else 'NO'}")
        lines.append(f"| {r['mode']} | {recall} | {r['perplexity']:.3f} | {100 * r['ppl_change']:+.2f}% | {niah} |")
    return "\n".join(lines)


@torch.no_grad()
def run_eval(haystack_dir: str | os.PathLike, lengths: Sequence[int] = (512, 1024), depths: Sequence[float] = (
             0.0, 0.5, 1.0), out_dir: str | os.PathLike = "eval_out", *, family: str = "deepseek_v32",
             model_dir: str | os.PathLike | None = None, block_size: int = EVAL_BLOCK_SIZE, new_tokens: int = 40,
             window: int = 2048, windows: int = 2, calibration: Any = "auto", router: str = DEFAULT_ROUTER,
             progress: bool = True, print_fn=print) -> dict[str, Any]:
    """What `transformers-misa eval` does; writes results.json, niah.png / niah.json and table.md into `out_dir`.

    Args:
        model_dir: a trained checkpoint folder (default: the built-in trained model of `family`).
        window, windows: held-out text windows (tokens, count) for recall and perplexity.
        calibration: "auto" (misa_calibration.safetensors in the model folder, if fitted for `router`), a path,
            or None; when one is found the misa modes are run both without and with it ("+cal").
        router: the misa modes' router pooling, "sum" or "max".
    """
    from ..calibration import CALIBRATION_FILE, RouterCalibration

    from .niah import load_haystack

    start = time.perf_counter()
    haystack = load_haystack(haystack_dir)  # the folder's checks first, before the model loads
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_trained(family, model_dir=model_dir, device=device)
    folder = Path(model_dir) if model_dir is not None else Path(model.config._name_or_path)
    automatic = isinstance(calibration, str) and calibration == "auto"
    if automatic:
        calibration = folder / CALIBRATION_FILE if (folder / CALIBRATION_FILE).is_file() else None
    if calibration is not None and not isinstance(calibration, RouterCalibration):
        calibration = RouterCalibration.load(calibration)
    if calibration is not None and not automatic:
        calibration.check_model(model, block_size, router)  # a calibration given explicitly must fit the eval
    if calibration is not None and calibration.router != router:
        print_fn(f"the model's router calibration was fitted for router={calibration.router!r}, not {router!r}: "
                 "the misa modes run uncalibrated")
        calibration = None
    modes = eval_modes(model.config.index_n_heads, block_size, calibration, router)
    texts = heldout_texts(haystack_dir, folder)
    sequences = token_windows(tokenizer, texts, window, windows)
    recall: dict[str, Any] = {}
    ppl: dict[str, float] = {}
    bar = tqdm(modes, desc="recall + perplexity", unit="mode", disable=not progress, leave=False)
    for name, kwargs in bar:
        bar.set_description(f"recall + perplexity: {name}")
        with patched(model, name, {"calibration": None, **kwargs}):
            if name != "dsa":
                per_layer = recall_by_layer(model, sequences)
                values = [v for v in per_layer.values() if not math.isnan(v)]
                recall[name] = dict(per_layer=per_layer, mean=sum(values) / len(values), worst=min(values))
            ppl[name] = perplexity(model, torch.stack(sequences))
    bar.close()
    niah_modes = [(n, {"calibration": None, **k}) for n, k in modes if n.split("+")[0] in NIAH_MODES]
    niah = run_niah(model, tokenizer, haystack, lengths=lengths, depths=depths, max_new_tokens=new_tokens,
                    modes=niah_modes, progress=progress)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_niah_heatmap(niah, out / "niah.png")
    config = model.config
    serializable = {name: {k: (CALIBRATION_FILE if k == "calibration" and v is not None else v)
                           for k, v in kwargs.items()} for name, kwargs in modes}
    results = {
        "model": str(folder), "family": config.model_type, "training": training_info(folder).get("wall_s"),
        "settings": dict(haystack=str(haystack_dir), lengths=[int(n) for n in lengths], depths=list(depths),
                         new_tokens=new_tokens, block_size=block_size, topk=config.index_topk,
                         index_n_heads=config.index_n_heads, window=window, windows=len(sequences), device=device,
                         green_threshold=GREEN),
        "modes": serializable, "recall": recall, "perplexity": ppl, "niah": niah,
    }
    results["summary"] = summarize(results)
    results["wall_s"] = time.perf_counter() - start
    (out / "results.json").write_text(json.dumps(results, indent=2))
    table = format_table(results["summary"])
    (out / "table.md").write_text(table + "\n")
    if print_fn is not None:
        print_fn(table)
        print_fn(f"wrote {out / 'results.json'}, {out / 'table.md'} and {out / 'niah.png'} in "
                 f"{results['wall_s']:.1f} s")
    return results
