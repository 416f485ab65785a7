"""One indexer call as a model makes it, with the model's attention mask and without one.

A prefill through a model with DeepSeek-V3.2's attention and indexer dimensions (`bench_e2e.real_dims_model`)
captures the patched indexer's inputs; the call is then timed alone, with the model's mask and with
`attention_mask=None` (what `bench_indexer` times, from q, keys and weights on). With the mask, a forward's first
layer reads what it needs from it (whether it is plain causal; if not, as with `--pad`, each query chunk's key
ranges) and the later layers reuse that: both are timed. The difference from
`bench_indexer` is what the model path adds: projections, RoPE, the mask's handling. Each call gets a fresh cache.
Prints one line per mode and writes JSON under benchmarks/results/; `--profile` adds each mode's largest kernels.

    python benchmarks/bench_indexer_in_model.py                      # GPU: 1 layer, 32K prompt, dsa and misa8
    python benchmarks/bench_indexer_in_model.py --profile
    python benchmarks/bench_indexer_in_model.py --tiny --context 96  # CPU smoke test with the tiny test model
"""

import argparse
import json
import pathlib
import sys
import time

import torch
from transformers import DynamicCache

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
# this folder's end-to-end benchmark: its model, modes and results files
from bench_e2e import (MODES, RESULTS, chosen_modes, patched, real_dims_model, results_file,  # noqa: E402
                       run_device)
from transformers_misa.indexer import MisaIndexer  # noqa: E402
from transformers_misa.ops import masks  # noqa: E402
from transformers_misa.tiny import tiny_model  # noqa: E402

INDEXER_ARGS = ("hidden_states", "q_resid", "position_embeddings", "attention_mask", "position_ids", "past_key_values")


def wall_time_ms(fn, reps: int, device: str, before=None) -> float:
    """Median time of `fn` after one warm-up call; `before` runs ahead of each call, untimed."""
    if device == "cuda":
        from gpu_timing import cuda_time_ms

        return cuda_time_ms(fn, reps, before)
    before = before or (lambda: None)
    times = []
    for _ in range(reps + 1):
        before()
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times[1:])[(len(times) - 1) // 2]  # the first call warms up


@torch.no_grad()
def captured_call(model, context: int, pad: int, device: str) -> tuple[MisaIndexer, dict]:
    """The first patched indexer and the keyword arguments of its call during a prefill of `context` tokens (pad > 0:
    two sequences, the second left-padded by `pad` tokens)."""
    indexer = next(module for module in model.modules() if isinstance(module, MisaIndexer))
    captured = {}

    def keep(module, args, kwargs):
        captured.update(zip(INDEXER_ARGS, args), **kwargs)

    handle = indexer.register_forward_pre_hook(keep, with_kwargs=True)
    batch = 2 if pad else 1
    prompt = torch.randint(2, model.config.vocab_size, (batch, context), device=device,
                           generator=torch.Generator(device=device).manual_seed(1))
    attention_mask = torch.ones(batch, context, dtype=torch.long, device=device)
    attention_mask[1:, :pad] = 0
    try:
        model(input_ids=prompt, attention_mask=attention_mask, past_key_values=DynamicCache(config=model.config),
              use_cache=True)
    finally:
        handle.remove()
    captured.pop("cache", None)
    return indexer, captured


def measure(name: str, args, device: str) -> dict:
    model = patched((tiny_model("deepseek_v32") if args.tiny else real_dims_model(1, device)).to(device), name)
    indexer, inputs = captured_call(model, args.context, args.pad, device)
    mask = inputs["attention_mask"]

    @torch.no_grad()
    def call(with_mask: bool) -> torch.Tensor:
        kwargs = dict(inputs, past_key_values=DynamicCache(config=model.config))
        if not with_mask:
            kwargs["attention_mask"] = None
        return indexer(**kwargs)

    # Rows that see fewer than k keys are filled up with masked columns in no fixed order: compare the others. With
    # padding the maskless call is another problem: the first layer's picks are compared with a later layer's.
    full_rows = slice(min(indexer.index_topk, args.context) - 1 + args.pad, None)
    masks._MASK_FACTS.clear()  # what a forward's first layer reads from the mask, forgotten
    picks = [call(True), call(True) if args.pad else call(False)]
    row = {"mode": name, "context": args.context, "pad": args.pad,
           "mask": None if mask is None else {"dtype": str(mask.dtype), "shape": list(mask.shape)},
           # A forward's first layer reads the mask (plain causal? key ranges); the later layers reuse what it read.
           "first_layer_ms": wall_time_ms(lambda: call(True), args.reps, device,
                                          before=masks._MASK_FACTS.clear),
           "with_mask_ms": wall_time_ms(lambda: call(True), args.reps, device),
           "no_mask_ms": wall_time_ms(lambda: call(False), args.reps, device),
           "same_picks": bool(torch.equal(*[torch.sort(p[:, full_rows], -1).values for p in picks]))}
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        with profile(activities=activities) as prof:
            call(True)
            if device == "cuda":
                torch.cuda.synchronize()
        attribute = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
        events = sorted(prof.key_averages(), key=lambda event: getattr(event, attribute), reverse=True)
        row["profile_top_ms"] = {event.key[:60]: round(getattr(event, attribute) / 1e3, 3) for event in events[:15]}
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--modes", default="dsa,misa8", help="comma-separated patched modes of bench_e2e")
    parser.add_argument("--pad", type=int, default=0, help="> 0: a batch of two, the second left-padded this much")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="also record each mode's 15 largest kernels / ops")
    parser.add_argument("--tiny", action="store_true", help="the tiny test model on the CPU (smoke test)")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
    args = parser.parse_args(argv)
    patched_modes = [name for name in MODES if MODES[name] is not None]
    modes = chosen_modes(parser, args.modes, patched_modes, refused="unknown or unpatched")
    device = run_device(args.tiny)
    path, environment = results_file(args.out, "bench_indexer_in_model", args.tiny, device)
    rows = []
    for name in modes:
        rows.append(measure(name, args, device))
        row = rows[-1]
        print(f"{name:>10} at {args.context}: with the model's mask ({row['mask']}) {row['first_layer_ms']:.2f} ms in "
              f"the first layer, {row['with_mask_ms']:.2f} ms in the others; {row['no_mask_ms']:.2f} ms without a "
              f"mask{' (unpadded)' if args.pad else ''}; same picks: {row['same_picks']}", flush=True)
        for kernel, ms in row.get("profile_top_ms", {}).items():
            print(f"{'':>12}{ms:9.3f} ms  {kernel}")
        path.write_text(json.dumps({"environment": environment, "results": rows}, indent=1))  # after every mode
        if device == "cuda":
            torch.cuda.empty_cache()
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
