"""Is an indexer mode GPU-bound or launch-bound? Host enqueue time vs wall time, kernel time per stage, host syncs.

    python benchmarks/host_probe.py                          # misa8 / dsa64_kernel at 64K, misa8_hier / hisa at 32K
    python benchmarks/host_probe.py --runs misa8_hier@32768

A call whose enqueue time (the host returning before the GPU finishes) is close to its wall time is launch-bound:
the GPU waits for the host. Writes JSON under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import pathlib
import sys
import time
import warnings

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench_indexer  # noqa: E402  (the benchmark's inputs and methods)
import gpu_timing  # noqa: E402  (the stage profile and environment)
from sweeps import write_results  # noqa: E402


def host_vs_gpu(call, reps: int) -> list[dict]:
    """Per run: ms until the call returns on the host (enqueued) and ms until the GPU is done (wall)."""
    call()
    torch.cuda.synchronize()
    runs = []
    for _ in range(reps):
        start = time.perf_counter()
        call()
        enqueued = time.perf_counter()
        torch.cuda.synchronize()
        runs.append({"enqueue_ms": (enqueued - start) * 1e3, "wall_ms": (time.perf_counter() - start) * 1e3})
    return runs


def host_syncs(call) -> dict[str, int]:
    """Where the call makes the host wait for the GPU (torch's sync debug mode), by source line."""
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call()
            torch.cuda.synchronize()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    places = collections.Counter(f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message))
    return dict(places.most_common(12))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="misa8@65536,dsa64_kernel@65536,misa8_hier@32768,hisa@32768",
                        help="method@context pairs, methods as in bench_indexer.py (H = 64)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", type=pathlib.Path, default=bench_indexer.RESULTS)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("host_probe needs a CUDA GPU")
    results = {}
    for run in args.runs.split(","):
        name, context = run.split("@")
        q, keys, weights = bench_indexer.inputs(1, int(context), int(context), 64)
        call = functools.partial(bench_indexer.methods(64, None)[name], q, keys, weights)
        results[run] = {"host_vs_gpu": host_vs_gpu(call, args.reps), "stages": gpu_timing.stage_ms(call),
                        "syncs": host_syncs(call)}
        print(run, json.dumps(results[run]), flush=True)
        del q, keys, weights
        torch.cuda.empty_cache()
    write_results(args.out, "host_probe", {"environment": gpu_timing.environment(), "results": results})

if __name__ == "__main__":
    main()
