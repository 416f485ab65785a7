"""Where an indexer call's wall time goes between its kernels: one call per method and context under torch.profiler,
its kernels laid on the GPU's timeline, and the idle stretches between them (the part of `bench_indexer`'s total
that no stage accounts for).

    python benchmarks/timeline.py --contexts 32768,65536 --methods dsa_kernel,misa8

Per call: wall (the host's call start to the last kernel's end), lead (call start to the first kernel's start:
host work before anything runs), busy (the union of kernel intervals), idle inside (between the first kernel and the
last), the kernel count and the largest idle stretches with the kernels on either side. JSON under
benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile

import torch

from bench_indexer import inputs, methods  # this folder's indexer benchmark
from gpu_timing import environment
from sweeps import RESULTS, write_results

CALL = "indexer_call"


def kernel_intervals(trace: dict) -> tuple[float, list[tuple[float, float, str]]]:
    """(start of the CALL range in µs, [(start, end, kernel name)] sorted) from a chrome trace of one call."""
    events = trace["traceEvents"]
    call = next(e for e in events
                if e.get("name") == CALL and e.get("ph") == "X" and e.get("cat") != "gpu_user_annotation")
    kernels = sorted((e["ts"], e["ts"] + e["dur"], e["name"]) for e in events
                     if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"))
    return call["ts"], kernels


def idle_stretches(kernels: list[tuple[float, float, str]]) -> tuple[float, list[dict]]:
    """(busy µs: the union of the intervals, idle stretches between them as dicts, largest first)."""
    busy, gaps, reach, before = 0.0, [], None, ""
    for start, end, name in kernels:
        if reach is None or start > reach:
            if reach is not None:
                gaps.append({"us": round(start - reach, 1), "after": before[:60], "before": name[:60]})
            busy += end - start
            reach = end
        elif end > reach:
            busy += end - reach
            reach = end
        if end >= reach:
            before = name
    return busy, sorted(gaps, key=lambda gap: -gap["us"])


def timeline(call, label: str) -> dict:
    """One profiled call of `call` (after a warm-up): lead, busy and idle time in ms, kernel count, top idle gaps."""
    call()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        with torch.profiler.record_function(CALL):
            call()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as folder:
        path = pathlib.Path(folder) / "trace.json"
        prof.export_chrome_trace(str(path))
        call_start, kernels = kernel_intervals(json.loads(path.read_text()))
    busy, gaps = idle_stretches(kernels)
    first, last = kernels[0][0], max(end for _, end, _ in kernels)
    return {"method": label, "kernels": len(kernels), "wall_ms": round((last - call_start) / 1e3, 3),
            "lead_ms": round((first - call_start) / 1e3, 3), "busy_ms": round(busy / 1e3, 3),
            "idle_inside_ms": round((last - first - busy) / 1e3, 3), "top_gaps": gaps[:8]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", default="32768,65536,131072")
    parser.add_argument("--methods", default="dsa_kernel,misa8")
    parser.add_argument("--heads", type=int, default=64)
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
    args = parser.parse_args(argv)
    table = methods(args.heads, None)
    rows = []
    for context in (int(c) for c in args.contexts.split(",") if c):
        q, keys, weights = inputs(1, context, context, args.heads)
        for name in args.methods.split(","):
            key = f"dsa{args.heads}_kernel" if name == "dsa_kernel" else name
            row = {"context": context, **timeline(lambda: table[key](q, keys, weights), key)}
            rows.append(row)
            print(f"T={context:>6} {key:>14}: wall {row['wall_ms']:.2f} ms = lead {row['lead_ms']:.2f} + busy "
                  f"{row['busy_ms']:.2f} + idle {row['idle_inside_ms']:.2f} ({row['kernels']} kernels); largest "
                  f"gaps {[(g['us'], g['after'][:24], g['before'][:24]) for g in row['top_gaps'][:3]]}", flush=True)
        del q, keys, weights
        torch.cuda.empty_cache()
    write_results(args.out, "timeline", {"environment": environment(), "results": rows})


if __name__ == "__main__":
    main()
