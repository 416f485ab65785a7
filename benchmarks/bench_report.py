"""bench_indexer's output: the printed rows (with each method's speed-up over the DSA kernel timed the same way), the
JSON file kept row by row, and the PNG plot."""

from __future__ import annotations

import json
import pathlib

import torch


def round_ratio_ranges(row: dict, heads: int) -> list[tuple[str, str, float, float]]:
    """(method, DSA kernel, lowest, highest) host-hidden speed-up over the rounds of a prefill row, each round's
    DSA time over the same round's method time (`bench_indexer.time_in_rounds`), for the MISA and HISA methods; a
    variant timed for both methods (misa8_X beside dsa{heads}_X) also against its own DSA variant."""
    ranges = []
    for key, rounds in row.items():
        name = key.removesuffix("_gpu_rounds")
        if not (key.endswith("_gpu_rounds") and name.startswith(("misa", "hisa"))):
            continue
        variant = f"dsa{heads}_{name.removeprefix('misa8_')}"
        for base in (f"dsa{heads}_kernel",) + ((variant,) if name.startswith("misa8_") else ()):
            base_rounds = row.get(f"{base}_gpu_rounds", [])
            if len(rounds) == len(base_rounds) > 1:
                paired = [dsa / method for dsa, method in zip(base_rounds, rounds)]
                ranges.append((name, base, min(paired), max(paired)))
    return ranges


def print_row(row: dict, heads: int) -> None:
    """One measured row on one line: each method's time with its speed-up over the DSA kernel, the scoring stage's
    TFLOP/s, the per-round speed-up ranges; then the stage times of the methods that have them."""
    timings = {k[:-3]: v for k, v in row.items() if k.endswith("_ms")}

    def ratio(name: str) -> str:  # against the DSA kernel timed the same way (eager, host hidden or graph-replayed;
        # bf16 or fp8), the fastest of its bf16 variants (overlapped or pipelined logits, dense or sampled top-k)
        stem, timing = name.rsplit("_", 1) if name.endswith(("_graph", "_gpu")) else (name, "")
        suffix = f"_{timing}" if timing else ""
        bases = ([f"dsa{heads}_fp8"] if stem.endswith("_fp8") else
                 [f"dsa{heads}_kernel", f"dsa{heads}_pipelined", f"dsa{heads}_threshold",
                  f"dsa{heads}_budget_chunks"])
        base = min((timings[n + suffix] for n in bases if n + suffix in timings), default=None)
        return f"({base / timings[name]:.1f}x)" if base and name.startswith(("misa", "hisa")) else ""

    cells = " ".join(f"{k}={v:.2f}ms{ratio(k)}" for k, v in timings.items())
    extra = f" scoring={row['scoring']['tflops']:.0f}TFLOP/s" if "scoring" in row else ""
    extra += (f" scoring_pipelined={row['scoring_pipelined']['tflops']:.0f}TFLOP/s"
              if "scoring_pipelined" in row else "")
    extra += f" scoring_fp8={row['scoring_fp8']['tflops']:.0f}TFLOP/s" if "scoring_fp8" in row else ""
    for variant, stats in row.get("routed8_logits", {}).items():
        extra += f" 8-head logits[{variant}]={stats['ms']:.2f}ms"
    extra += "".join(f" {name}/{base}={low:.2f}-{high:.2f}x"
                     for name, base, low, high in round_ratio_ranges(row, heads))
    queries = f" q={row['new_tokens']}" if "new_tokens" in row else ""
    print(f"{row['phase']:>7} H={heads} B={row['batch']:>2} T={row['context']:>6}{queries}: {cells}{extra}", flush=True)
    for name, stages in row.get("stages", {}).items():
        print(f"{'':>9}{name} stages: " + " ".join(f"{k}={v:.2f}ms" for k, v in stages.items() if k != "other_top")
              + f" other_top={stages.get('other_top')}", flush=True)


def plot(results: list[dict], path: pathlib.Path, topk: int) -> None:
    """The H = 64 prefill rows' times over the context, log-log, one line per method (eager timings)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prefill = [r for r in results if r["phase"] == "prefill" and r["heads"] == 64]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key in sorted({k for r in prefill for k in r if k.endswith("_ms") and not k.endswith("_gpu_ms")}):
        points = [(r["context"], r[key]) for r in prefill if key in r]
        ax.plot(*zip(*points), marker="o", label=key[:-3])
    ax.set(xscale="log", yscale="log", xlabel="context (tokens, causal prefill)", ylabel="ms per layer",
           title=f"Indexer prefill, H=64, topk={topk} ({torch.cuda.get_device_name()})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


class ResultsFile(list):
    """The rows measured so far, rewritten to `path` after each one ("complete": false until `finish`), so that a run
    cut short (a device call's time limit) still leaves every row it measured."""

    def __init__(self, path: pathlib.Path, header: dict) -> None:
        super().__init__()
        self.path, self.header = path, header
        path.parent.mkdir(parents=True, exist_ok=True)
        self._write(complete=False)

    def append(self, row: dict) -> None:
        super().append(row)
        self._write(complete=False)

    def finish(self) -> None:
        self._write(complete=True)

    def _write(self, complete: bool) -> None:
        self.path.write_text(json.dumps({**self.header, "complete": complete, "results": list(self)}, indent=1))
