"""What bounds the radix top-k's row pass? One histogram pass over real indexer logits, four ways side by side.

`atomic` is the top-k's first pass (a shared-memory atomic per key into the k-th bin histogram); `private` sends
each thread's atomics to its own bins (no two lanes of a warp share an address); `copies` spreads them over 8 copies
of the histogram (two 16-bit counters per word); `none` only loads and converts (no atomics at all). Same workloads
as `sweep_topk.py`. If `atomic` costs what `none` costs, contention on the histogram is not what bounds the pass.

    python benchmarks/topk_probe.py --out benchmarks/results

`--phases` instead times the scorer's own top-k (its shape for each workload) and reads, per row, the SM clock at the
ends of its phases (`topk.build_radix_topk(phase_clock=True)`): the cycles each phase of a row takes, averaged over
the rows taking the usual path, and how many do.

    python benchmarks/topk_probe.py --phases --out benchmarks/results
    python benchmarks/topk_probe.py --phases --options '{"value_filter": false}'
"""

# No `from __future__ import annotations`: TileLang evaluates the T.Tensor annotations.

import argparse
import json
import pathlib

import tilelang
import tilelang.language as T
import torch

from gpu_timing import cuda_time_ms, environment  # this folder's GPU timing
from bench_indexer import TOPK  # this folder's indexer benchmark
from sweep_topk import rewrite_before_each, workloads
from sweeps import RESULTS, write_results
from transformers_misa.kernels.common import compile_target
from transformers_misa.kernels.scorer import radix_shape
from transformers_misa.kernels.topk import PHASE_MARKS, build_radix_topk

BINS = 4096  # the top-k's first level (12 bits)
COPIES = 8


def build_histogram_pass(mode: str, threads: int, unroll: int, arch: str | None = None):
    words = BINS * COPIES // 2 if mode == "copies" else BINS

    @tilelang.jit(target=compile_target(arch), out_idx=[-1],
                  pass_configs={tilelang.PassConfigKey.TL_DISABLE_THREAD_STORAGE_SYNC: True})
    def program():
        rows, width = T.dynamic("rows"), T.dynamic("width")

        @T.prim_func
        def histogram_pass(Scores: T.Tensor((rows, width), T.float32), Ends: T.Tensor((rows,), T.int32),
                           Out: T.Tensor((rows,), T.int32)):
            with T.Kernel(rows, threads=threads) as row:
                tx = T.get_thread_binding()
                hist = T.alloc_shared((words,), T.int32)
                folded = T.alloc_var(T.uint32)  # `none`: keeps the loads and conversions alive
                values = T.alloc_local((unroll,), T.float32)
                end = T.alloc_var(T.int32)
                folded = T.uint32(0)
                end = T.min(Ends[row], width)
                for i in T.serial(T.ceildiv(words, threads)):
                    if i * threads + tx < words:
                        hist[i * threads + tx] = 0
                T.sync_threads()
                for step in T.serial(T.ceildiv(end, threads * unroll)):
                    for j in T.unroll(unroll):
                        col = (step * unroll + j) * threads + tx
                        values[j] = T.if_then_else(col < end, Scores[row, T.min(col, width - 1)], 0.0)
                    for j in T.unroll(unroll):
                        col = (step * unroll + j) * threads + tx
                        if col < end:
                            bits = T.reinterpret(values[j], T.uint32)
                            key = T.if_then_else(values[j] < 0, ~bits, bits | T.uint32(0x80000000))
                            digit = T.cast(key >> 20, T.int32)
                            if mode == "atomic":  # Python-level: one variant per program
                                T.atomic_add(hist[digit], 1)
                            elif mode == "private":
                                T.atomic_add(hist[(tx * 8 + j) % BINS], 1)
                            elif mode == "copies":
                                T.atomic_add(hist[(digit // 2) * COPIES + tx % COPIES],
                                             T.if_then_else(digit % 2 == 1, 65536, 1))
                            else:
                                folded = folded ^ key
                T.sync_threads()
                if tx == 0:
                    Out[row] = hist[5] + T.cast(folded, T.int32)

        return histogram_pass

    return program()


def phase_cycles(clock: torch.Tensor) -> dict:
    """Clock [rows, len(PHASE_MARKS)] from a clocked run -> the usual-path rows' mean cycles per phase and their share
    of a row's cycles, and the fraction of rows on that path (the others leave the later marks at 0)."""
    usual = (clock != 0).all(-1)
    spans = (clock[usual, 1:] - clock[usual, :-1]).double()
    mean = spans.mean(0)
    return {"usual_path_rows": float(usual.double().mean()),
            "mean_cycles": {phase: float(c) for phase, c in zip(PHASE_MARKS[1:], mean)},
            "share": {phase: float(c / mean.sum()) for phase, c in zip(PHASE_MARKS[1:], mean)},
            "mean_row_cycles": float(mean.sum())}


def run_phases(workloads_: dict, reps: int, options: dict | None = None) -> list[dict]:
    """The scorer's top-k shape per workload (with `options` on top), plain and clocked (time, then the phases of one
    clocked call)."""
    rows = []
    sm_count = torch.cuda.get_device_properties(0).multi_processor_count
    for workload, (scores, ends) in workloads_.items():
        shape = {**radix_shape(scores.shape[0], sm_count, scores.shape[1] % 4 == 0), **(options or {})}
        if shape.get("vector", 1) == 1:
            continue
        grouped = scores.view(scores.shape[0], -1, shape["vector"])
        # the plain program without the probe-only option (second_pass_writes=False selects wrongly: clock only)
        plain = build_radix_topk(TOPK, **{name: value for name, value in shape.items()
                                          if name != "second_pass_writes"})()
        clocked = build_radix_topk(TOPK, phase_clock=True, **shape)()
        clock = torch.zeros(scores.shape[0], len(PHASE_MARKS), dtype=torch.int64, device=scores.device)
        before = rewrite_before_each(scores)
        row = {"workload": workload, "shape": shape,
               "ms": cuda_time_ms(lambda: plain(grouped, ends), reps, before=before),
               "clocked_ms": cuda_time_ms(lambda: clocked(grouped, ends, clock), reps, before=before)}
        before()
        clock.zero_()
        clocked(grouped, ends, clock)
        row.update(phase_cycles(clock))
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
    parser.add_argument("--phases", action="store_true", help="the scorer's top-k, its phases by the SM clock")
    parser.add_argument("--options", type=json.loads, default={},
                        help="with --phases: build options (JSON) on top of the scorer's shape")
    args = parser.parse_args(argv)
    if args.phases:
        rows = run_phases(workloads(), args.reps, args.options)
        write_results(args.out, "topk_phases", {"environment": environment(), "topk": TOPK, "marks": PHASE_MARKS,
                                                "options": args.options, "results": rows})
        return
    rows = []
    for workload, (scores, ends) in workloads().items():
        for mode in ("atomic", "private", "copies", "none"):
            for threads, unroll in ((512, 4), (1024, 8)):
                kernel = build_histogram_pass(mode, threads, unroll)
                ms = cuda_time_ms(lambda: kernel(scores, ends), args.reps)
                rows.append({"workload": workload, "mode": mode, "threads": threads, "unroll": unroll, "ms": ms})
                print(f"{workload:>20} {mode:>8} {threads:>5}x{unroll}: {ms:.4f} ms", flush=True)
        del scores, ends
        torch.cuda.empty_cache()
    write_results(args.out, "topk_probe", {"environment": environment(), "results": rows})

if __name__ == "__main__":
    main()
