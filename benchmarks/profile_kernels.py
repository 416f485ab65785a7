"""The launches to read under Nsight Compute: one radix top-k over real causal logit rows, one 64-head (DSA) and one
8-head (MISA) logits call, each between cudaProfilerStart/Stop (warm-up and input building are not profiled).

    ncu --clock-control none --profile-from-start off --section SpeedOfLight --section WarpStateStats \\
        --section SchedulerStats --section Occupancy --section ComputeWorkloadAnalysis \\
        --section MemoryWorkloadAnalysis python benchmarks/profile_kernels.py
"""

from __future__ import annotations

import torch

from bench_indexer import SCALE, TOPK, inputs  # this folder's indexer benchmark: same inputs
from sweep_topk import logits_rows
from transformers_misa.kernels.scorer import _logits
from transformers_misa.kernels.topk import build_radix_topk

CONTEXT = 65536  # the top-k's rows: every 16th query of a causal prefill of this length
QUERIES, KEYS = 4096, 32768  # the logits calls: the last QUERIES causal queries of a KEYS context


def main() -> None:
    ends = torch.arange(16, CONTEXT + 1, 16, dtype=torch.int32, device="cuda")
    scores = logits_rows(1, ends.numel(), CONTEXT, ends)
    topk = build_radix_topk(TOPK)()
    topk(scores, ends)  # compile and warm up outside the profiled range
    calls = {}
    for heads in (64, 8):
        q, keys, weights = inputs(1, QUERIES, KEYS, heads)
        ks = torch.zeros(1, QUERIES, dtype=torch.int32, device="cuda")
        ke = (torch.arange(QUERIES, dtype=torch.int32, device="cuda") + KEYS - QUERIES + 1).view(1, QUERIES)
        calls[heads] = (q, weights, keys, ks, ke)
        _logits(*calls[heads], SCALE, fill_future=False)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    topk(scores, ends)
    for heads in (64, 8):
        _logits(*calls[heads], SCALE, fill_future=False)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


if __name__ == "__main__":
    main()
