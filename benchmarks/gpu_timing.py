"""GPU timing for the benchmarks: CUDA-event wall times (with or without the host's launches hidden), CUDA-graph
replays, peak memory, per-stage kernel times and the environment a result file records."""

from __future__ import annotations

import datetime
import functools
import platform
import time

import torch


def cuda_time_ms(fn, reps: int, before=None, host_hidden: bool = False) -> float:
    """Median wall time of `fn` on the GPU (events: from the call to its last kernel, host launches included), after
    one warm-up call; `before` runs ahead of each call, untimed.

    `host_hidden`: each timed call is queued behind a GPU spin longer than the call's host time, so that its kernels
    run back to back (as inside a model, whose earlier layers keep the GPU busy while the host launches the next
    ones); a read-back inside `fn` still shows, as it would there."""
    before = before or (lambda: None)
    before()
    fn()
    torch.cuda.synchronize()
    spin = 0
    if host_hidden:
        before()
        started = time.perf_counter()
        fn()
        host_ms = (time.perf_counter() - started) * 1e3
        torch.cuda.synchronize()
        spin = int((2 * host_ms + 1) * _spin_cycles_per_ms())
    times = []
    for _ in range(reps):
        before()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if spin:
            torch.cuda._sleep(spin)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


@functools.lru_cache(maxsize=None)
def _spin_cycles_per_ms() -> float:
    """`torch.cuda._sleep` cycles per millisecond on this GPU, measured once."""
    cycles = 10**7
    torch.cuda._sleep(cycles)  # first launch out of the timing
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    torch.cuda.synchronize()
    return cycles / start.elapsed_time(end)


def outside_capture(fn):
    """`fn()` on a side stream, ordered with the current one: the warm-up CUDA graph capture asks for before it."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        result = fn()
    torch.cuda.current_stream().wait_stream(side)
    return result


def graph_time_ms(fn, reps: int) -> float:
    """Median time of one replay of `fn` captured in a CUDA graph: a decode step without its host overhead (Python,
    kernel launches), as a static-cache decode loop with CUDA graphs runs it."""
    outside_capture(fn)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return cuda_time_ms(graph.replay, reps)


def peak_extra_gib(fn) -> float:
    """Peak GPU memory `fn` allocates beyond what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


STAGES = {"weighted_relu_logits": "logits", "weighted_relu_candidates": "candidates", "radix_topk": "topk",
          "head_importance": "router", "route_heads": "router", "gathered_logits": "rerank"}


def stage_ms(call) -> dict:
    """GPU time of one call split by stage (torch.profiler kernel times; every other kernel counts as "other"), and
    "host": how long the call takes to return, unprofiled (its launches; near the GPU time, the GPU waits on them)."""
    call()
    torch.cuda.synchronize()
    start = time.perf_counter()
    call()
    host_ms = (time.perf_counter() - start) * 1e3
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    totals: dict[str, float] = {}
    others: dict[str, float] = {}
    for event in prof.key_averages():
        device_us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0.0)
        if device_us <= 0 or event.key.startswith(("cudaLaunch", "cudaMemcpy", "cudaStream", "cudaDevice")):
            continue
        stage = next((name for pattern, name in STAGES.items() if pattern in event.key), "other")
        totals[stage] = totals.get(stage, 0.0) + device_us / 1e3
        if stage == "other":  # the whole name (a PyTorch kernel's functor comes late in it) and its launch count
            others[f"{event.key[:240]} x{event.count}"] = device_us / 1e3
    stages = {stage: round(ms, 3) for stage, ms in sorted(totals.items())}
    stages["host"] = round(host_ms, 3)
    stages["other_top"] = {name: round(ms, 3) for name, ms in sorted(others.items(), key=lambda kv: -kv[1])[:6]}
    return stages


def environment() -> dict:
    """What a result file records of the run: GPU, torch / CUDA / TileLang / transformers / Python versions, date."""
    import tilelang
    import transformers

    return {
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "tilelang": tilelang.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
    }
