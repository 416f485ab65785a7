"""What bounds the radix top-k's row pass? One histogram pass over real indexer logits, four ways side by side.

`atomic` is the top-k's first pass (a shared-memory atomic per key into the k-th bin histogram); `private` sends
each thread's atomics to its own bins (no two lanes of a warp share an address); `copies` spreads them over 8 copies
of the histogram (two 16-bit counters per word); `none` only loads and converts (no atomics at all). Same workloads
as `sweep_topk.py`. If `atomic` costs what `none` costs, contention on the histogram is not what bounds the pass.

    python benchmarks/topk_probe.py --out benchmarks/results
"""

# No `from __future__ import annotations`: TileLang evaluates the T.Tensor annotations.

import argparse
import pathlib

import tilelang
import tilelang.language as T
import torch

from gpu_timing import cuda_time_ms, environment  # this folder's GPU timing
from sweep_topk import workloads
from sweeps import RESULTS, write_results
from transformers_misa.kernels.common import compile_target

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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
    args = parser.parse_args(argv)
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
