"""Peak extra CPU memory of the pure-PyTorch reference indexers, against the stock transformers indexer.

    python benchmarks/reference_memory.py                 # S = T = 16384, H = 64, D = 128, topk 2048, bf16
    python benchmarks/reference_memory.py --seq 4096      # quick check
    python benchmarks/reference_memory.py --dtype fp32 bf16

Each method runs in a fresh subprocess (so peaks never mix): the inputs q [1,S,H,D], keys [1,T,D] and fp32
weights [1,S,H] are allocated first, the RSS is read as the baseline, then the method runs while a thread
samples the RSS every 5 ms and the kernel's exact high-water mark (VmHWM) is read at the end; the peak extra
memory is the larger of the two peaks minus the baseline. mask=None, i.e. causal with the queries at the last
positions (prefill).

The stock transformers indexer (DeepseekV32Indexer / GlmMoeDsaIndexer) materialises `q·kᵀ` as a [B,S,H,T]
fp32 tensor and then its scaled copy, so its peak is at least 2·B·S·H·T·4 bytes. That is computed, not run,
unless it fits comfortably in this machine's memory (then it is also measured, emulating the stock forward's
exact tensor ops, to check the arithmetic).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

METHODS = ("stock", "dsa", "misa", "misa_hierarchical", "hisa")
ACTIVE_HEADS = 8
BLOCK_SIZE = 128
CANDIDATE_FACTOR = 4
HISA_TOKEN_FACTOR = 4  # transformers_misa's default: keep 4·topk tokens' worth of blocks
RESULTS = Path(__file__).resolve().parent / "results"
GIB = 2**30
MIB = 2**20


def method_settings(method: str, topk: int) -> dict:
    if method == "misa":
        return dict(active_heads=ACTIVE_HEADS, block_size=BLOCK_SIZE)
    if method == "misa_hierarchical":
        return dict(active_heads=ACTIVE_HEADS, block_size=BLOCK_SIZE, candidate_factor=CANDIDATE_FACTOR)
    if method == "hisa":
        return dict(block_size=BLOCK_SIZE, keep_blocks=max(2, math.ceil(HISA_TOKEN_FACTOR * topk / BLOCK_SIZE)))
    return {}


def stock_score_bytes(batch: int, seq: int, heads: int, keys: int) -> int:
    """One [B, S, H, T] fp32 tensor: what the stock indexer materialises (twice at its peak)."""
    return batch * seq * heads * keys * 4


# ------------------------------------------------------------------------------------------- worker


def worker(method: str, seq: int, heads: int, dim: int, topk: int, dtype_name: str) -> dict:
    import torch
    import torch.nn.functional as F

    from transformers_misa.demo import PeakRSS
    from transformers_misa.ops import reference

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, seq, heads, dim, generator=gen).to(dtype)
    keys = torch.randn(1, seq, dim, generator=gen).to(dtype)
    weights = torch.randn(1, seq, heads, generator=gen) * heads**-0.5
    scale = dim**-0.5
    settings = method_settings(method, topk)
    mask = None
    if method == "stock":  # transformers passes the causal mask; it is an input, allocated before the baseline
        mask = torch.ones(seq, seq, dtype=torch.bool).tril_().unsqueeze(0)

    def stock() -> torch.Tensor:  # the stock indexer's tensor ops, line for line
        scores = torch.matmul(q.float(), keys.transpose(-1, -2).float().unsqueeze(1)) * scale
        scores = F.relu(scores)
        index_scores = torch.matmul(weights.unsqueeze(-2), scores).squeeze(-2)
        index_scores = index_scores.masked_fill(~mask, float("-inf"))
        return index_scores.topk(min(topk, index_scores.shape[-1]), dim=-1).indices.to(torch.int32)

    run = {
        "stock": stock,
        "dsa": lambda: reference.dsa_topk(q, keys, weights, topk, softmax_scale=scale),
        "misa": lambda: reference.misa_topk(q, keys, weights, topk, softmax_scale=scale, **settings),
        "misa_hierarchical": lambda: reference.misa_hierarchical_topk(q, keys, weights, topk, softmax_scale=scale,
                                                                      **settings),
        "hisa": lambda: reference.hisa_topk(q, keys, weights, topk, softmax_scale=scale, **settings),
    }[method]
    with PeakRSS() as memory:
        start = time.perf_counter()
        out = run()
        seconds = time.perf_counter() - start
    return dict(method=method, settings=settings, dtype=dtype_name, seconds=seconds, baseline_rss=memory.baseline,
                peak_rss=memory.peak, peak_extra_bytes=memory.peak_extra, sampled_peak_rss=memory.sampled_peak,
                kernel_peak_rss=memory.kernel_peak, output_shape=list(out.shape), output_bytes=out.numel() * 4,
                input_bytes=sum(t.numel() * t.element_size() for t in (q, keys, weights)),
                threads=torch.get_num_threads())


# ------------------------------------------------------------------------------------------- driver


def cpu_info() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    """The repository's HEAD commit (with "+dirty" if the reference code has uncommitted changes), if known."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src/transformers_misa/ops"], cwd=root,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def total_ram() -> int | None:
    try:
        import psutil

        return psutil.virtual_memory().total
    except ImportError:
        return None


def run_worker(method: str, args: argparse.Namespace, dtype_name: str) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--worker", method, "--seq", str(args.seq),
               "--heads", str(args.heads), "--dim", str(args.dim), "--topk", str(args.topk), "--dtype", dtype_name]
    start, commit = time.perf_counter(), git_commit()
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        return dict(method=method, dtype=dtype_name, error=proc.stderr.strip()[-2000:] or f"exit {proc.returncode}",
                    wall_s=time.perf_counter() - start)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - start
    result["git_commit"] = commit
    result["load_average_1_5_15_at_end"] = os.getloadavg()
    return result


def settings_text(method: str, settings: dict) -> str:
    if method == "stock":
        return "transformers indexer (emulated)"
    if method == "dsa":
        return "all heads, query chunks"
    names = dict(active_heads="heads", block_size="block", candidate_factor="cand x", keep_blocks="keep")
    return ", ".join(f"{names[k]} {v}" for k, v in settings.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq", type=int, default=16384, help="S = T (default 16384)")
    parser.add_argument("--heads", type=int, default=64)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--topk", type=int, default=2048)
    parser.add_argument("--dtype", nargs="+", choices=["fp32", "bf16"], default=["bf16"],
                        help="input dtype(s) of q and keys (default bf16; weights are fp32 as in transformers)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--run-stock", choices=["auto", "yes", "no"], default="auto",
                        help="measure the stock ops too: auto = only if 2 [B,S,H,T] tensors fit in 40%% of RAM")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON output (default results/reference_memory_cpu.json at 16384, else "
                             "results/reference_memory_cpu_seq<S>.json)")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(args.worker, args.seq, args.heads, args.dim, args.topk, args.dtype[0])))
        return 0

    seq, heads, dim, topk = args.seq, args.heads, args.dim, args.topk
    one_tensor = stock_score_bytes(1, seq, heads, seq)
    stock_peak_estimate = 2 * one_tensor
    ram = total_ram()
    run_stock = args.run_stock == "yes" or (args.run_stock == "auto" and ram is not None
                                            and stock_peak_estimate < 0.4 * ram)
    methods = [m for m in args.methods if m != "stock" or run_stock]
    import torch

    commit_at_start, load_at_start = git_commit(), os.getloadavg()

    print(f"reference indexer memory, CPU: S = T = {seq}, H = {heads}, D = {dim}, topk {topk}, batch 1, causal; "
          f"torch {torch.__version__}, {cpu_info()}, {os.cpu_count()} cores")
    print(f"stock transformers indexer: one [B,S,H,T] fp32 tensor = {one_tensor / GIB:.2f} GiB, peak >= 2 of them "
          f"= {stock_peak_estimate / GIB:.2f} GiB (arithmetic{'; also measured below' if run_stock else ', not run'})")
    results = []
    for dtype_name in args.dtype:
        for method in methods:
            print(f"  running {method} ({dtype_name}) ...", flush=True)
            result = run_worker(method, args, dtype_name)
            results.append(result)
            if "error" in result:
                print(f"    failed: {result['error'].splitlines()[-1]}", flush=True)
            else:
                print(f"    {result['seconds']:.1f} s, peak extra {result['peak_extra_bytes'] / MIB:.0f} MiB", flush=True)

    header = f"{'method':<18} {'dtype':<5} {'settings':<32} {'time s':>8} {'peak extra MiB':>15} {'vs stock':>9}"
    lines = [header, "-" * len(header)]
    for dtype_name in args.dtype:
        lines.append(f"{'stock (arithmetic)':<18} {dtype_name:<5} {'2 x [B,S,H,T] fp32':<32} {'-':>8} "
                     f"{stock_peak_estimate / MIB:>15.0f} {'1x':>9}")
        for r in results:
            if r["dtype"] != dtype_name:
                continue
            if "error" in r:
                lines.append(f"{r['method']:<18} {dtype_name:<5} failed: {r['error'].splitlines()[-1][:60]}")
                continue
            ratio = stock_peak_estimate / max(r["peak_extra_bytes"], 1)
            lines.append(f"{r['method']:<18} {dtype_name:<5} {settings_text(r['method'], r['settings']):<32} "
                         f"{r['seconds']:>8.1f} {r['peak_extra_bytes'] / MIB:>15.0f} {'1/' + format(ratio, '.0f'):>9}")
    print()
    print("\n".join(lines))

    out = args.out or RESULTS / ("reference_memory_cpu.json" if seq == 16384 else f"reference_memory_cpu_seq{seq}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    record = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        git_commit=commit_at_start, git_commit_at_end=git_commit(),
        load_average_1_5_15=dict(start=load_at_start, end=os.getloadavg()),
        torch=torch.__version__, python=platform.python_version(), cpu=cpu_info(), cpu_count=os.cpu_count(),
        ram_bytes=ram, platform=platform.platform(),
        shape=dict(batch=1, seq=seq, keys=seq, heads=heads, dim=dim, topk=topk, mask="None (causal)"),
        method="fresh subprocess per method; baseline RSS after the inputs are allocated; peak = max(5 ms RSS "
               "sampling thread, kernel VmHWM reset at start); peak_extra = peak - baseline",
        stock_arithmetic=dict(score_tensor_bytes=one_tensor, score_tensor_gib=one_tensor / GIB,
                              peak_estimate_bytes=stock_peak_estimate, peak_estimate_gib=stock_peak_estimate / GIB,
                              note="transformers' indexer holds q·kᵀ [B,S,H,T] fp32 and its scaled copy at once; "
                                   "computed, not run" + ("; also measured as method 'stock'" if run_stock else "")),
        results=results,
        table="\n".join(lines),
    )
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
