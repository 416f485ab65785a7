"""A self-contained CPU demo: every mode on the built-in trained DeepSeek-V3.2 / GLM-5 shaped models.

    python -m transformers_misa demo            # or: transformers-misa demo [--quick] [--random] [--json out.json]

For each family it generates greedily with the stock (unpatched) model, then with each mode patched in, and
reports per-layer recall of DSA's top-k (`measure_recall`), generate time, tokens/s, the peak extra resident
memory of the `generate` call, and whether the generated tokens equal the stock model's. The models are the
package's small trained ones (`transformers_misa.trained`, router calibration included); the prompt is Python
source of the standard library on this machine. `--random` runs seeded random-weight models instead.
"""

from __future__ import annotations

import ctypes
import gc
import math
import os
import platform
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from .patching import temporarily_patched
from .recall import measure_recall
from .tiny import FAMILY_DEFAULTS, tiny_model
from .trained import load_trained

DEFAULT_CONTEXT = 2048
DEFAULT_NEW_TOKENS = 16
QUICK_CONTEXT = 384
QUICK_NEW_TOKENS = 4
RANDOM_TOPK = 64  # index_topk of the random models (the trained ones have their own, 256)
DEFAULT_BLOCK_SIZE = 64
PROMPT_MODULES = ("argparse", "typing", "dataclasses", "inspect")  # standard-library source as the prompt
FAMILY_NAMES = {"deepseek_v32": "DeepSeek-V3.2", "glm_moe_dsa": "GLM-5"}

HEADER = {
    "trained": """\
transformers-misa demo: the built-in small TRAINED DeepSeek-V3.2 / GLM-5 shaped models (examples/train_small_dsa.py),
CPU, pure-PyTorch reference indexers, a prompt of Python standard-library source. misa rows route with the shipped
router calibration. "same" says whether the generated tokens equal the stock model's. Memory is the peak extra
resident memory (RSS) of the whole generate call, model activations and KV cache included.""",
    "random": """\
transformers-misa demo: small seeded DeepSeek-V3.2 / GLM-5 models with RANDOM weights, CPU, pure-PyTorch
reference indexers. Recall shows how far each mode's top-k is from DSA's on this input, not how a trained model
fares (drop --random for the trained ones). Memory is the peak extra resident memory (RSS) of generate.""",
}

_MIB = 2**20


# ----------------------------------------------------------------------------------------------- memory


def current_rss() -> int:
    """Resident set size of this process, in bytes."""
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:  # pragma: no cover - psutil comes with accelerate
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _release_freed_memory() -> None:
    """Returns freed heap pages to the OS (glibc), so a new baseline is not inflated by earlier peaks."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_high_water_mark() -> bool:
    """Resets the kernel's peak-RSS counter (VmHWM) to the current RSS; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _high_water_mark() is not None
    except OSError:
        return False


def _high_water_mark() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class PeakRSS:
    """Peak extra resident memory of this process during a `with` block.

    torch's CPU allocations are invisible to tracemalloc, so this watches the RSS itself: a background thread
    samples it every `interval` seconds, and on Linux the kernel's exact high-water mark (VmHWM, reset on entry)
    is read as well; the larger of the two counts. `peak_extra` = peak RSS − RSS on entry, in bytes.
    """

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.baseline = 0
        self.peak = 0
        self.sampled_peak = 0
        self.kernel_peak: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._hwm = False

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.sampled_peak = max(self.sampled_peak, current_rss())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        _release_freed_memory()
        self._hwm = _reset_high_water_mark()
        self.baseline = self.sampled_peak = current_rss()
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        self.sampled_peak = max(self.sampled_peak, current_rss())
        self.kernel_peak = _high_water_mark() if self._hwm else None
        self.peak = max(self.sampled_peak, self.kernel_peak or 0)

    @property
    def peak_extra(self) -> int:
        return max(0, self.peak - self.baseline)


# ----------------------------------------------------------------------------------------------- demo


def demo_modes(num_heads: int, block_size: int) -> list[tuple[str, str, dict[str, Any]]]:
    """(label, mode, patch options) of the rows after the stock model: dsa, misa at 4/8/16 heads, misa†, hisa."""
    rows: list[tuple[str, str, dict[str, Any]]] = [("dsa", "dsa", {})]
    for heads in (4, 8, 16):
        if heads < num_heads:
            rows.append((f"misa h={heads}", "misa", dict(active_heads=heads, block_size=block_size)))
    rows.append(("misa_hierarchical", "misa_hierarchical", dict(active_heads=8, block_size=block_size)))
    rows.append(("hisa", "hisa", dict(block_size=block_size)))
    return rows


def _settings_text(config: Any, num_heads: int, calibrated: bool = False) -> str:
    if config is None:
        return f"transformers' indexer, {num_heads} heads"
    if config.mode == "dsa":
        return f"{num_heads} heads, chunked"
    parts = []
    if config.active_heads is not None:
        parts.append(f"{config.active_heads}/{num_heads} heads")
    parts.append(f"block {config.block_size}")
    if config.candidate_factor is not None:
        parts.append(f"{config.candidate_factor}x cand.")
    if config.keep_blocks is not None:
        parts.append(f"keep {config.keep_blocks} blocks")
    if calibrated:
        parts.append("cal.")
    return ", ".join(parts)


def _fmt(value: float | None, width: int, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-".rjust(width)
    return f"{value:>{width}.{digits}f}"


def format_table(family_result: dict[str, Any]) -> str:
    """The plain-text table of one family's rows."""
    info = family_result["model"]
    lines = [
        f"{FAMILY_NAMES.get(info['family'], info['family'])} ({info['family']}): {info['indexer_layers']} indexer "
        f"layers{info['shared_note']}, {info['index_n_heads']} indexer heads x {info['index_head_dim']}, "
        f"top-k {info['topk']} of {info['context']} prompt tokens, {info['new_tokens']} new tokens (greedy)",
        f"{'mode':<18} {'settings':<38} {'recall':>7} {'worst':>7} {'gen s':>7} {'tok/s':>7} {'peak MiB':>9}  same",
    ]
    for row in family_result["rows"]:
        same = "ref" if row["label"] == "stock" else ("yes" if row["same_as_stock"] else "no")
        lines.append(
            f"{row['label']:<18} {row['settings']:<38} {_fmt(row['recall_mean'], 7, 3)} "
            f"{_fmt(row['recall_worst'], 7, 3)} {row['generate_s']:>7.2f} {row['tokens_per_s']:>7.2f} "
            f"{row['peak_extra_mib']:>9.0f}  {same}"
        )
    return "\n".join(lines)


def _timed_generate(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, float, PeakRSS]:
    with PeakRSS() as memory:
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False)
        seconds = time.perf_counter() - start
    return out, seconds, memory


def _model_and_prompt(family: str, context: int, random_weights: bool, seed: int,
                      overrides: dict[str, Any]) -> tuple[torch.nn.Module, torch.Tensor]:
    """The demo's model and [1, context] prompt: trained model + standard-library source, or random + random ids."""
    if random_weights:
        model = tiny_model(family, seed=seed, **overrides)
        prompt = torch.randint(2, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(seed + 1))
        return model, prompt
    import importlib
    import inspect

    model, tokenizer = load_trained(family)
    source = "\n\n".join(inspect.getsource(importlib.import_module(name)) for name in PROMPT_MODULES)
    ids = [tokenizer.bos_token_id] + tokenizer(source, add_special_tokens=False)["input_ids"]
    if len(ids) < context:
        raise ValueError(f"context={context} is longer than the demo's prompt text ({len(ids)} tokens)")
    return model, torch.tensor([ids[:context]])


def run_demo(context: int | None = None, new_tokens: int | None = None, *, quick: bool = False,
             topk: int | None = None, block_size: int = DEFAULT_BLOCK_SIZE, seed: int = 0,
             families: Sequence[str] = ("deepseek_v32", "glm_moe_dsa"), random_weights: bool = False,
             progress: bool = True, json_path: str | os.PathLike | None = None,
             print_fn: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Runs the demo and returns its results (also printed through `print_fn`, unless None).

    Args:
        context: prompt tokens (default 2048; 384 with `quick`). Must exceed the top-k so it is really sparse.
        new_tokens: greedy new tokens per generate call (default 16; 4 with `quick`).
        quick: the short setting, for tests.
        topk: `index_topk` of the random models (default 64); the trained models keep their own (256).
        block_size: key block size of misa / misa_hierarchical / hisa.
        seed: seeds the random models' weights and prompt.
        families: model families to run ("deepseek_v32", "glm_moe_dsa").
        random_weights: seeded random-weight models instead of the built-in trained ones.
        progress: show a tqdm bar over (family, mode).
        json_path: where to write the returned dict as JSON, if given.
        print_fn: where the header and tables go.

    Returns:
        {"settings": ..., "environment": ..., "families": {family: {"model": ..., "rows": [...]}}, "wall_s": ...};
        each row has label, mode, config, settings, recall_mean, recall_worst, recall_per_layer, generate_s,
        tokens_per_s, peak_extra_mib, same_as_stock, tokens.
    """
    context = context if context is not None else (QUICK_CONTEXT if quick else DEFAULT_CONTEXT)
    new_tokens = new_tokens if new_tokens is not None else (QUICK_NEW_TOKENS if quick else DEFAULT_NEW_TOKENS)
    if topk is not None and not random_weights:
        raise ValueError("topk applies to the random models (--random); the trained models keep their top-k of 256")
    topk = topk or RANDOM_TOPK
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be >= 1, got {new_tokens}")
    unknown = sorted(set(families) - set(FAMILY_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown families {unknown}; choose from {sorted(FAMILY_DEFAULTS)}")
    if random_weights and context <= topk:
        raise ValueError(f"context={context} must exceed topk={topk}, or top-k selects every key (nothing sparse)")

    wall_start = time.perf_counter()
    total_runs = sum(1 + len(demo_modes(FAMILY_DEFAULTS[f]["index_n_heads"], block_size)) for f in families)
    bar = tqdm(total=total_runs, desc="demo", unit="run", disable=not progress, leave=False)

    def emit(text: str) -> None:
        if print_fn is None:
            return
        if progress and print_fn is print:
            tqdm.write(text)
        else:
            print_fn(text)

    emit(HEADER["random" if random_weights else "trained"])
    results: dict[str, Any] = {
        "settings": dict(context=context, new_tokens=new_tokens, block_size=block_size, seed=seed, quick=quick,
                         families=list(families), weights="random" if random_weights else "trained"),
        "environment": dict(torch=torch.__version__, threads=torch.get_num_threads(), machine=platform.machine(),
                            processor=platform.processor() or platform.machine(), python=platform.python_version()),
        "families": {},
    }
    overrides = {"index_topk": topk}
    if context + new_tokens > 8192:
        overrides["max_position_embeddings"] = context + new_tokens
    try:
        for family in families:
            model, prompt = _model_and_prompt(family, context, random_weights, seed, overrides)
            config = model.config
            num_heads, topk = config.index_n_heads, config.index_topk
            if context <= topk:
                raise ValueError(f"context={context} must exceed the model's top-k {topk}, or top-k selects every "
                                 "key (nothing sparse)")
            modes = demo_modes(num_heads, block_size)
            # Warm-up (first-call overheads stay out of the timings).
            model.generate(prompt[:, : topk + 8], attention_mask=torch.ones_like(prompt[:, : topk + 8]),
                           max_new_tokens=2, do_sample=False)
            indexer_types = list(getattr(config, "indexer_types", None) or ["full"] * config.num_hidden_layers)
            shared = sum(t == "shared" for t in indexer_types)
            info = dict(family=family, indexer_layers=config.num_hidden_layers - shared,
                        shared_layers=shared, shared_note=f" (+{shared} shared)" if shared else "",
                        index_n_heads=num_heads, index_head_dim=config.index_head_dim, topk=topk,
                        context=context, new_tokens=new_tokens, hidden_size=config.hidden_size)
            rows: list[dict[str, Any]] = []

            bar.set_description(f"{family}: stock")
            reference, seconds, memory = _timed_generate(model, prompt, new_tokens)
            rows.append(dict(label="stock", mode=None, config=None, settings=_settings_text(None, num_heads),
                             recall_mean=None, recall_worst=None, recall_per_layer=None, generate_s=seconds,
                             tokens_per_s=new_tokens / seconds, peak_extra_mib=memory.peak_extra / _MIB,
                             same_as_stock=True, tokens=reference[0, context:].tolist()))
            bar.update()

            for label, mode, options in modes:
                bar.set_description(f"{family}: {label}")
                with temporarily_patched(model, mode=mode, **options):
                    out, seconds, memory = _timed_generate(model, prompt, new_tokens)
                    recall = measure_recall(model, prompt)
                    patched = model.misa_config
                    calibrated = model.misa_calibration is not None
                rows.append(dict(label=label, mode=mode, config=patched.to_dict(),
                                 settings=_settings_text(patched, num_heads, calibrated), recall_mean=recall.mean,
                                 recall_worst=recall.worst, recall_per_layer=recall.per_layer,
                                 generate_s=seconds, tokens_per_s=new_tokens / seconds,
                                 peak_extra_mib=memory.peak_extra / _MIB,
                                 same_as_stock=bool(torch.equal(out, reference)), tokens=out[0, context:].tolist()))
                bar.update()
            family_result = {"model": info, "rows": rows}
            results["families"][family] = family_result
            emit("")
            emit(format_table(family_result))
            del model
    finally:
        bar.close()
    results["wall_s"] = time.perf_counter() - wall_start
    emit(f"\ndone in {results['wall_s']:.1f} s")
    if json_path is not None:
        import json

        with open(json_path, "w") as f:
            json.dump(results, f, indent=2)
        emit(f"results written to {json_path}")
    return results
