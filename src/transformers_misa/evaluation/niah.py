"""Needle-in-a-Haystack (NIAH): hide a sentence in long background text and ask the model to retrieve it.

    haystack = load_haystack("../shared/data/haystack/paul_graham_essays")
    results = run_niah(model, tokenizer, haystack, lengths=[1024, 4096], depths=[0, 0.5, 1],
                       modes=[("dsa", {}), ("misa8", {"mode": "misa", "active_heads": 8})])
    save_niah_heatmap(results, "niah.png")   # also writes niah.json beside it

The haystack is any folder of .txt files (the usual one: the Paul Graham essays of the public NIAH pressure
test, gkamradt/LLMTest_NeedleInAHaystack). Each prompt is `context_tokens` tokens long: background text (repeated
if the folder is shorter), the needle inserted at a sentence boundary near the requested depth, then the question.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..patching import temporarily_patched

NEEDLE = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
QUESTION = "What is the best thing to do in San Francisco?"
NEEDLE_KEYWORDS = ("sandwich", "dolores", "park", "sunny")
QUESTION_TEMPLATE = "\n\nQuestion: {question}\nAnswer:"
_SENTENCE_END = (".", "!", "?", "\n")

Mode = tuple[str, dict[str, Any] | None]


# ------------------------------------------------------------------------------------------------ haystack


def load_haystack(folder: str | os.PathLike) -> str:
    """All `*.txt` files directly in `folder`, in file-name order, joined by blank lines.

    Raises:
        FileNotFoundError: `folder` does not exist (or is not a folder).
        ValueError: `folder` holds no .txt file.
    """
    path = Path(folder)
    if not path.is_dir():
        raise FileNotFoundError(f"haystack folder {str(path)!r} does not exist or is not a folder")
    files = sorted(p for p in path.iterdir() if p.suffix == ".txt" and p.is_file())
    if not files:
        raise ValueError(f"haystack folder {str(path)!r} has no .txt files (the haystack is every *.txt file "
                         f"directly in the folder, in name order)")
    return "\n\n".join(p.read_text(encoding="utf-8", errors="replace").strip() for p in files)


def train_bpe_tokenizer(text: str, vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on `text` (for the small built-in models), as PreTrainedTokenizerFast.

    Special tokens come first and match the tiny models' ids: `<s>` = 0 (bos), `<pad>` = 1, `</s>` = 2 (eos).
    Byte-level, so any text can be encoded. `vocab_size` must be at least 259 (256 bytes + 3 specials).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "<pad>", "</s>"]
    if vocab_size < 256 + len(specials):
        raise ValueError(f"vocab_size must be >= {256 + len(specials)} for a byte-level BPE, got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([text], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", pad_token="<pad>", eos_token="</s>")


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _haystack_ids(tokenizer: Any, haystack: str, needed: int) -> list[int]:
    """At least `needed` token ids of `haystack` (the text repeated if it is too short); tokenizes only a prefix."""
    if not haystack.strip():
        raise ValueError("the haystack text is empty")
    chars = max(1024, 8 * needed)
    while True:
        if chars >= len(haystack):
            ids = _encode(tokenizer, haystack)
            if not ids:
                raise ValueError("the haystack text tokenizes to no tokens")
            if len(ids) > needed:
                return ids
            separator = _encode(tokenizer, "\n\n")
            repeated = list(ids)
            while len(repeated) <= needed:
                repeated += separator + ids
            return repeated
        ids = _encode(tokenizer, haystack[:chars])
        if len(ids) > needed + 1:  # the last token may be cut mid-word: never use it
            return ids[: needed + 1]
        chars *= 2


def _sentence_boundaries(tokenizer: Any, ids: Sequence[int]) -> list[int]:
    """Token positions i (0..len) where a new sentence may start: 0, len, and after each sentence-ending token."""
    ends: dict[int, bool] = {}
    for token in set(ids):
        ends[token] = tokenizer.decode([token]).rstrip(" ").endswith(_SENTENCE_END)
    return [0] + [i + 1 for i, token in enumerate(ids) if ends[token] and i + 1 < len(ids)] + [len(ids)]


def build_niah_prompt(tokenizer: Any, haystack: str, needle: str = NEEDLE, question: str = QUESTION,
                      context_tokens: int = 1024, depth: float = 0.5, *, return_info: bool = False):
    """Token ids [1, context_tokens] of one NIAH prompt.

    Layout: [bos] haystack[:p] needle haystack[p:] question, with exactly `context_tokens` tokens in all. The
    haystack fills what the needle, the question (`QUESTION_TEMPLATE`) and the bos token (if the tokenizer has
    one) leave; `p` is the sentence boundary of the haystack part nearest to `depth`·(haystack tokens) (its start
    and end count as boundaries), so depth 0 puts the needle first and depth 1 right after the background text,
    before the question, as the reference pressure test does.

    Args:
        return_info: also return a dict with needle_start / needle_end (token positions in the prompt),
            haystack_tokens and depth_actual (needle start as a fraction of the haystack part).

    Raises:
        ValueError: depth outside [0, 1], or `context_tokens` too small to hold the needle and the question.
    """
    if not 0.0 <= float(depth) <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    needle_ids = _encode(tokenizer, " " + needle.strip())
    question_ids = _encode(tokenizer, QUESTION_TEMPLATE.format(question=question.strip()))
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "bos_token_id", None) is not None else []
    budget = context_tokens - len(bos) - len(needle_ids) - len(question_ids)
    if budget < 1:
        raise ValueError(f"context_tokens={context_tokens} cannot hold the needle ({len(needle_ids)} tokens) and "
                         f"the question ({len(question_ids)} tokens); use at least "
                         f"{context_tokens - budget + 1}")
    hay = _haystack_ids(tokenizer, haystack, budget)[:budget]
    boundaries = _sentence_boundaries(tokenizer, hay)
    target = float(depth) * len(hay)
    at = bisect.bisect_left(boundaries, target)
    candidates = boundaries[max(0, at - 1): at + 1]
    position = min(candidates, key=lambda b: (abs(b - target), b))
    ids = bos + hay[:position] + needle_ids + hay[position:] + question_ids
    assert len(ids) == context_tokens
    input_ids = torch.tensor([ids], dtype=torch.long)
    if not return_info:
        return input_ids
    start = len(bos) + position
    return input_ids, dict(needle_start=start, needle_end=start + len(needle_ids), haystack_tokens=len(hay),
                           depth_actual=position / len(hay))


# ------------------------------------------------------------------------------------------------ scoring


def keyword_score(answer: str, needle: str = NEEDLE, keywords: Iterable[str] = NEEDLE_KEYWORDS) -> float:
    """Fraction of the needle's key words present in the lowercased answer (0..1)."""
    keywords = [k.lower() for k in keywords]
    text = answer.lower()
    return sum(k in text for k in keywords) / len(keywords)


def _patch_kwargs(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """patch_model keyword arguments of a mode entry: `mode` defaults to the entry's name ("dsa", "hisa", ...)."""
    return {"mode": name, **kwargs}


def _json_safe(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Patch kwargs for results JSON: objects (a RouterCalibration, a path) by their type name or str."""
    plain = (str, int, float, bool, type(None))
    return {k: v if isinstance(v, plain) else str(v) if isinstance(v, os.PathLike) else type(v).__name__
            for k, v in kwargs.items()}


def patched(model: nn.Module, name: str, kwargs: dict[str, Any] | None):
    """Context manager for a mode entry: the model patched with `kwargs` (`mode` defaulting to `name`) inside the
    block and unpatched after it; kwargs None: the model as given."""
    if kwargs is None:
        return contextlib.nullcontext(model)
    return temporarily_patched(model, **_patch_kwargs(name, kwargs))


# ------------------------------------------------------------------------------------------------ run


@torch.no_grad()
def run_niah(model: nn.Module, tokenizer: Any, haystack: str, *, lengths: Sequence[int], depths: Sequence[float],
             max_new_tokens: int = 32, modes: Sequence[Mode] | None = None,
             scorer: Callable[[str, str], float] | None = None, progress: bool = True,
             needle: str = NEEDLE, question: str = QUESTION) -> dict[str, Any]:
    """Greedy NIAH over a (length x depth) grid, for the model as given or for each patch mode.

    Args:
        lengths: prompt lengths in tokens.
        depths: needle depths, fractions 0..1 of the background text.
        modes: None: the model as given (one entry, "model"). Else (name, patch kwargs) pairs, each applied with
            `patch_model(model, **kwargs)` (kwargs' `mode` defaults to the name) and undone with `unpatch_model`
            afterwards; kwargs None runs the model as given under that name.
        scorer: `scorer(answer, needle) -> float`; default `keyword_score` (fraction of "sandwich", "dolores",
            "park", "sunny" in the lowercased answer).
        progress: a tqdm bar over all cells.

    Returns:
        {"needle", "question", "max_new_tokens", "modes": {name: {"lengths": [...], "depths": [...],
        "scores": [[score per depth] per length], "answers": [[...]], "patch": kwargs}}}.
    """
    from tqdm.auto import tqdm

    if scorer is None:
        needle_tokens = len(_encode(tokenizer, " " + needle.strip()))
        if max_new_tokens < needle_tokens:  # e.g. the GPU eval of 2026-11-28: 32 of 39, "sunny" never came back
            warnings.warn(f"max_new_tokens={max_new_tokens} is shorter than the needle ({needle_tokens} tokens with "
                          f"this tokenizer): an answer that repeats it is cut before its end, so its last key words "
                          f"cannot score; use at least {needle_tokens}", stacklevel=2)
    scorer = scorer or (lambda answer, needle_text: keyword_score(answer, needle_text))
    modes = [("model", None)] if modes is None else list(modes)
    names = [name for name, _ in modes]
    if len(set(names)) != len(names):
        raise ValueError(f"mode names must be distinct, got {names}")
    lengths, depths = [int(n) for n in lengths], [float(d) for d in depths]
    prompts = {(n, d): build_niah_prompt(tokenizer, haystack, needle, question, n, d)
               for n in lengths for d in depths}
    eos = getattr(tokenizer, "eos_token_id", None)
    pad = getattr(tokenizer, "pad_token_id", None)
    device = next(model.parameters()).device
    results: dict[str, Any] = {"needle": needle, "question": question, "max_new_tokens": max_new_tokens, "modes": {}}
    bar = tqdm(total=len(modes) * len(lengths) * len(depths), desc="niah", unit="cell", disable=not progress,
               leave=False)
    try:
        for name, kwargs in modes:
            scores, answers = [], []
            with patched(model, name, kwargs):
                for n in lengths:
                    score_row, answer_row = [], []
                    for d in depths:
                        bar.set_description(f"niah {name} {n}@{d:g}")
                        ids = prompts[(n, d)].to(device)
                        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                             do_sample=False, eos_token_id=eos, pad_token_id=pad)
                        answer = tokenizer.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)
                        score_row.append(float(scorer(answer, needle)))
                        answer_row.append(answer)
                        bar.update()
                    scores.append(score_row)
                    answers.append(answer_row)
            results["modes"][name] = {"lengths": lengths, "depths": depths, "scores": scores, "answers": answers,
                                      "patch": None if kwargs is None else _json_safe(_patch_kwargs(name, kwargs))}
    finally:
        bar.close()
    return results


# ------------------------------------------------------------------------------------------------ plot


def save_niah_heatmap(results: dict[str, Any], path_png: str | os.PathLike) -> Path:
    """One red-yellow-green heatmap per mode (depth down, context length across, 0..1), and the JSON beside it.

    Writes `path_png` and `path_png` with suffix .json (the `results` dict). Returns the JSON path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    modes = results["modes"]
    if not modes:
        raise ValueError("results has no modes to plot")
    path_png = Path(path_png)
    path_png.parent.mkdir(parents=True, exist_ok=True)
    count = len(modes)
    first = next(iter(modes.values()))
    width = max(3.0, 0.9 * len(first["lengths"]) + 1.5)
    height = max(2.5, 0.45 * len(first["depths"]) + 1.5)
    figure = Figure(figsize=(width * count + 1.0, height), constrained_layout=True)
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, count, squeeze=False)[0]
    image = None
    for ax, (name, grid) in zip(axes, modes.items()):
        scores = torch.tensor(grid["scores"], dtype=torch.float64).reshape(len(grid["lengths"]), len(grid["depths"]))
        data = scores.T.numpy()  # rows: depth, columns: length
        image = ax.imshow(data, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto", origin="upper")
        ax.set_xticks(range(len(grid["lengths"])), [str(n) for n in grid["lengths"]], rotation=45)
        ax.set_yticks(range(len(grid["depths"])), [f"{d:.0%}" for d in grid["depths"]])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth")
        ax.set_title(f"{name}: mean {float(scores.mean()):.2f}" if scores.numel() else name)
        for row in range(data.shape[0]):
            for col in range(data.shape[1]):
                ax.text(col, row, f"{data[row, col]:.2f}", ha="center", va="center", fontsize=7)
    figure.colorbar(image, ax=list(axes), label="score")
    figure.savefig(path_png, dpi=100)
    path_json = path_png.with_suffix(".json")
    path_json.write_text(json.dumps(results, indent=2))
    return path_json

