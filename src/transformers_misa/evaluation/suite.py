"""`transformers-misa eval`: recall, perplexity and Needle-in-a-Haystack per mode on the built-in tiny model."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..recall import measure_recall
from ..tiny import tiny_model
from .niah import _haystack_ids, build_niah_prompt, load_haystack, patched, run_niah, save_niah_heatmap, \
    train_bpe_tokenizer
from .perplexity import perplexity

EVAL_FAMILIES = ("deepseek_v32", "glm_moe_dsa")
EVAL_BLOCK_SIZE = 32  # key block size of misa / misa_hierarchical / hisa on the tiny model (top-k 64)


def eval_modes(block_size: int = EVAL_BLOCK_SIZE) -> list[tuple[str, dict[str, Any]]]:
    """(name, patch kwargs) of the modes `eval` compares."""
    return [("dsa", {"mode": "dsa"}),
            ("misa", {"mode": "misa", "active_heads": 8, "block_size": block_size}),
            ("misa_hierarchical", {"mode": "misa_hierarchical", "active_heads": 8, "block_size": block_size}),
            ("hisa", {"mode": "hisa", "block_size": block_size})]


def run_eval(haystack_dir: str | os.PathLike, lengths: Sequence[int] = (256, 512),
             depths: Sequence[float] = (0.0, 0.5, 1.0), out_dir: str | os.PathLike = "eval_out",
             family: str = "deepseek_v32", new_tokens: int = 16, seed: int = 0, progress: bool = True,
             print_fn=print) -> dict[str, Any]:
    """What `transformers-misa eval` does: recall, perplexity and NIAH per mode on the built-in tiny model.

    The tokenizer is a byte-level BPE trained on the haystack text (vocab <= the model's 512). The model's
    weights are random (seeded), so the numbers check the pipeline, not retrieval quality. Writes
    results.json, niah.png and niah.json into `out_dir`; returns the results dict.
    """
    start = time.perf_counter()
    haystack = load_haystack(haystack_dir)
    lengths, depths = [int(n) for n in lengths], [float(d) for d in depths]
    overrides: dict[str, Any] = {}
    if max(lengths) + new_tokens > 8192:
        overrides["max_position_embeddings"] = max(lengths) + new_tokens
    model = tiny_model(family, seed=seed, **overrides)
    tokenizer = train_bpe_tokenizer(haystack, vocab_size=min(512, model.config.vocab_size))
    modes = eval_modes()
    longest = max(lengths)
    recall_ids = build_niah_prompt(tokenizer, haystack, context_tokens=longest, depth=0.5)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ppl_ids = torch.tensor([(bos + _haystack_ids(tokenizer, haystack, longest))[:longest]])

    recall: dict[str, Any] = {}
    ppl: dict[str, float] = {}
    bar = tqdm(modes, desc="recall + perplexity", unit="mode", disable=not progress, leave=False)
    for name, kwargs in bar:
        bar.set_description(f"recall + perplexity: {name}")
        with patched(model, name, kwargs):
            recall[name] = measure_recall(model, recall_ids).to_dict()
            ppl[name] = perplexity(model, ppl_ids)
    bar.close()
    niah = run_niah(model, tokenizer, haystack, lengths=lengths, depths=depths, max_new_tokens=new_tokens,
                    modes=modes, progress=progress)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_niah_heatmap(niah, out / "niah.png")
    config = model.config
    results = {
        "note": "built-in tiny model with RANDOM (seeded) weights and a tokenizer trained on the haystack: the "
                "numbers check the pipeline, not retrieval quality (a trained shipped model comes later)",
        "settings": dict(haystack=str(haystack_dir), lengths=lengths, depths=depths, family=family,
                         new_tokens=new_tokens, seed=seed, block_size=EVAL_BLOCK_SIZE, topk=config.index_topk,
                         index_n_heads=config.index_n_heads, tokenizer_vocab=len(tokenizer)),
        "modes": {name: kwargs for name, kwargs in modes},
        "recall": recall,
        "perplexity": ppl,
        "perplexity_tokens": int(ppl_ids.shape[1]),
        "niah": niah,
    }
    results["wall_s"] = time.perf_counter() - start
    (out / "results.json").write_text(json.dumps(results, indent=2))
    if print_fn is not None:
        print_fn(f"{'mode':<18} {'recall':>7} {'ppl':>9} {'niah':>6}")
        for name, _ in modes:
            scores = [s for row in niah["modes"][name]["scores"] for s in row]
            print_fn(f"{name:<18} {recall[name]['mean']:>7.3f} {ppl[name]:>9.2f} {sum(scores) / len(scores):>6.2f}")
        print_fn(f"wrote {out / 'results.json'} and {out / 'niah.png'} in {results['wall_s']:.1f} s")
    return results
