"""Does a CUDA-graph-replayed static-cache decode step compute what the same step computes eagerly?

bench_e2e's model (DeepSeek-V3.2's attention and indexer dimensions, random bf16 weights) prefills a prompt into a
static cache and decodes teacher-forced (every run reads the same tokens, so one difference cannot change the next
step's input): once eagerly, once replaying one captured graph per step, once eagerly again (run-to-run noise). Per
step it compares the final logits and, per patched indexer, its inputs (hidden states, q_resid), its projections
(wq_b, wk, k_norm, weights_proj) and its top-k set, bit for bit, and names the first place where they part. Forward
hooks run at capture only; they keep the captured buffers, which every replay rewrites in place. Each run prefills
anew: every tensor its cache holds after the prefill (main keys and values, indexer keys) is compared too, by a
position-weighted sum of its bits, so that a step's difference can be told from a prefill's.

`--deterministic` runs all three under torch's deterministic algorithms (warn-only; cuBLAS given a fixed workspace
config): the ops that have no deterministic implementation come back as `nondeterministic_ops`, and every tensor
made by `torch.empty` is NaN-filled first, so that a read of memory nothing wrote would show.

    python benchmarks/graph_replay_check.py --mode dsa --context 32768 --steps 254
    python benchmarks/graph_replay_check.py --mode dsa --tokens results/bench_e2e-....json   # its generated tokens
    python benchmarks/graph_replay_check.py --mode dsa --deterministic                        # noise sources
    python benchmarks/graph_replay_check.py --tiny --context 300 --steps 4                    # CPU: eager twice
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import warnings

import torch
from transformers import StaticCache

from bench_e2e import (MODES, RESULTS, StaticDecodeStep, chosen_modes, patched, real_dims_model, results_file,
                       run_device)
from gpu_timing import outside_capture
from transformers_misa.indexer import MisaIndexer
from transformers_misa.tiny import tiny_model

PROJECTIONS = ("wq_b", "wk", "k_norm", "weights_proj")
# What each step records, in the order of the computation: a difference in an earlier entry explains the later ones.
FIELDS = ("hidden_states", "q_resid") + PROJECTIONS + ("topk",)


def record_hooks(model, sink: list) -> list:
    """Hooks appending (layer, field, tensor) for every patched indexer's inputs, projections and output."""
    handles = []
    for layer, indexer in enumerate(m for m in model.modules() if isinstance(m, MisaIndexer)):
        handles.append(indexer.register_forward_pre_hook(
            lambda mod, args, kwargs, layer=layer: sink.extend(
                [(layer, "hidden_states", args[0] if args else kwargs["hidden_states"]),
                 (layer, "q_resid", args[1] if len(args) > 1 else kwargs["q_resid"])]), with_kwargs=True))
        for name in PROJECTIONS:
            handles.append(getattr(indexer, name).register_forward_hook(
                lambda mod, args, out, layer=layer, name=name: sink.append((layer, name, out))))
        handles.append(indexer.register_forward_hook(
            lambda mod, args, out, layer=layer: sink.append((layer, "topk", out.sort(-1).values))))
    return handles


def bit_fingerprint(tensor: torch.Tensor) -> int:
    """A sum of the tensor's bit patterns weighted by position (int64, wrapping): any changed element changes it,
    barring a collision; computed where the tensor lives, in slices (a cache layer holds gigabytes)."""
    flat = tensor.detach().reshape(-1)
    bits = flat.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()])
    total, step = 0, 1 << 26
    for start in range(0, bits.numel(), step):
        part = bits[start : start + step].long()
        weight = torch.arange(start, start + part.numel(), device=part.device) % 1_000_003 + 1
        total += int((part * weight).sum())
    return total


def cache_fingerprints(cache) -> dict[str, int]:
    """`bit_fingerprint` of every tensor each layer of `cache` holds (main keys and values, indexer keys, ...)."""
    return {f"layer {layer} {name}": bit_fingerprint(value) for layer, cached in enumerate(cache.layers)
            for name, value in sorted(vars(cached).items()) if isinstance(value, torch.Tensor) and value.numel()}


@torch.no_grad()
def decode_records(model, prompt: torch.Tensor, forced: torch.Tensor, replay: bool) -> tuple[dict, list[dict]]:
    """(`cache_fingerprints` after the prefill, per decode step after the warm-up step: {"logits": ..., (layer,
    field): ...} on the CPU), teacher-forced by `forced` (step i reads forced[i], step 0 is the warm-up); `replay`:
    the steps replay one CUDA graph captured at step 1, the warm-up ran on a side stream (as graph capture asks)."""
    context = prompt.shape[1]
    length = context + forced.numel() + 1  # as bench_e2e's static cache for as many steps (prompt + new tokens)
    cache = StaticCache(config=model.config, max_cache_len=length)
    model(input_ids=prompt, past_key_values=cache)
    prefill = cache_fingerprints(cache)
    step = StaticDecodeStep(cache, context, length, forced[0])
    if replay:
        outside_capture(lambda: model(**step.inputs))
    else:
        model(**step.inputs)
    sink: list = []
    handles = record_hooks(model, sink)
    records, graph = [], None
    try:
        for i in range(1, forced.numel()):
            step.advance(forced[i])
            if replay:
                if graph is None:
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        logits = model(**step.inputs).logits
                graph.replay()
            else:
                sink.clear()
                logits = model(**step.inputs).logits
            record = {(layer, field): tensor.float().cpu() for layer, field, tensor in sink}
            record["logits"] = logits.float().cpu()
            records.append(record)
    finally:
        for handle in handles:
            handle.remove()
    return prefill, records


def first_differences(records: list[dict], others: list[dict]) -> list[dict]:
    """Each step where two runs' records differ: the step, the largest logits difference and, per layer, the first
    field (in computation order) that differs."""
    found = []
    for index, (record, other) in enumerate(zip(records, others)):
        layers = sorted({key[0] for key in record if key != "logits"})
        parted = {layer: next((field for field in FIELDS if (layer, field) in record and
                               not torch.equal(record[layer, field], other[layer, field])), None) for layer in layers}
        logits_diff = float((record["logits"] - other["logits"]).abs().max())
        if logits_diff > 0 or any(parted.values()):
            found.append({"step": index + 1, "logits_max_diff": logits_diff,
                          "first_differing_field": {str(layer): field for layer, field in parted.items() if field}})
    return found


def selection_faults(records: list[dict], context: int) -> list[dict]:
    """Steps where an indexer's top-k repeats an index or picks a key the step cannot see (step s, after the warm-up
    step, decodes position context + s and sees keys [0, context + s]): what an output slot left unwritten, or a
    future slot's score not masked, would give."""
    faults = []
    for index, record in enumerate(records):
        for key, picked in record.items():
            if key == "logits" or key[1] != "topk":
                continue
            layer = key[0]
            picked = picked.flatten()
            distinct = int((picked[1:] != picked[:-1]).sum()) + 1  # sorted
            unseen = int((picked > context + index + 1).sum())
            if distinct < picked.numel() or unseen:
                faults.append({"step": index + 1, "layer": layer, "distinct": distinct, "of": picked.numel(),
                               "unseen_keys": unseen})
    return faults


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool):
    """Inside: torch's deterministic algorithms in warn-only mode (cuBLAS given the fixed workspace config it needs,
    where the environment sets none; uninitialized memory NaN-filled). Yields the list it fills, on exit, with the
    distinct warnings of ops that have no deterministic implementation (empty when not `enabled`)."""
    found: list[str] = []
    if not enabled:
        yield found
        return
    set_workspace = "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield found
        found.extend(dict.fromkeys(str(w.message).split(". ")[0] for w in caught
                                   if "deterministic" in str(w.message)))
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        if set_workspace:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", default="dsa", help=f"one of {[m for m in MODES if m != 'unpatched']}")
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--steps", type=int, default=254, help="teacher-forced decode steps compared")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokens", type=pathlib.Path,
                        help="a bench_e2e JSON: force the tokens it generated for --tokens-mode")
    parser.add_argument("--tokens-mode", help="whose tokens in --tokens (default: --mode)")
    parser.add_argument("--tiny", action="store_true", help="the tiny test model on the CPU: eager against eager")
    parser.add_argument("--deterministic", action="store_true",
                        help="torch's deterministic algorithms (warn-only), NaN-filled torch.empty; lists the ops "
                             "without a deterministic implementation")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
    args = parser.parse_args(argv)
    (mode,) = chosen_modes(parser, args.mode, [m for m in MODES if m != "unpatched"])
    device = run_device(args.tiny)
    model = tiny_model("deepseek_v32") if args.tiny else real_dims_model(args.layers, device)
    model = patched(model.to(device), mode)
    prompt = torch.randint(2, model.config.vocab_size, (1, args.context), device=device,
                           generator=torch.Generator(device=device).manual_seed(1))  # bench_e2e's prompt
    if args.tokens:
        rows = {r["mode"]: r for r in json.loads(args.tokens.read_text())["results"]}
        tokens_mode = args.tokens_mode or mode
        if tokens_mode not in rows:
            parser.error(f"{args.tokens} has no tokens of mode {tokens_mode!r} (it has {sorted(rows)}): "
                         f"pass --tokens-mode")
        row = rows[tokens_mode]
        forced = torch.tensor(row["tokens"][: args.steps + 1], device=device)
    else:
        forced = torch.randint(2, model.config.vocab_size, (args.steps + 1,),
                               generator=torch.Generator().manual_seed(2)).to(device)
    with deterministic_algorithms(args.deterministic) as nondeterministic_ops:
        eager_prefill, eager = decode_records(model, prompt, forced, replay=False)
        replayed_prefill, replayed = decode_records(model, prompt, forced, replay=device == "cuda")
        eager_again_prefill, eager_again = decode_records(model, prompt, forced, replay=False)
    report = {"mode": mode, "context": args.context, "steps": len(eager), "deterministic": args.deterministic,
              "nondeterministic_ops": nondeterministic_ops,
              "replayed_vs_eager": first_differences(replayed, eager),
              "eager_vs_eager": first_differences(eager_again, eager),
              # the cached tensors whose bits differ after the prefill (each run prefills anew, eagerly)
              "prefill_cache_differs": {
                  "replayed_run_vs_eager": sorted(k for k in eager_prefill if replayed_prefill[k] != eager_prefill[k]),
                  "eager_vs_eager": sorted(k for k in eager_prefill if eager_again_prefill[k] != eager_prefill[k])},
              "selection_faults": {"eager": selection_faults(eager, args.context),
                                   "replayed": selection_faults(replayed, args.context)}}
    path, environment = results_file(args.out, "graph_replay_check", args.tiny, device)
    path.write_text(json.dumps({"environment": environment, **report}, indent=1))
    comparison = "replayed" if device == "cuda" else "eager (no GPU: no graph)"
    print(f"{mode}{' (deterministic algorithms)' if args.deterministic else ''}: {report['steps']} steps; "
          f"{comparison} vs eager differ in {len(report['replayed_vs_eager'])} steps, eager vs eager in "
          f"{len(report['eager_vs_eager'])}; top-k with a repeated or unseen key: "
          f"{len(report['selection_faults']['eager'])} eager, "
          f"{len(report['selection_faults']['replayed'])} {comparison}")
    for runs, names in report["prefill_cache_differs"].items():
        print(f"  after the prefill, {runs}: {', '.join(names) if names else 'the same cache'}")
    for op in nondeterministic_ops:
        print(f"  no deterministic implementation: {op}")
    for runs in ("replayed_vs_eager", "eager_vs_eager"):
        for difference in report[runs][:5]:
            print(f"  {runs}, step {difference['step']}: logits differ by up to {difference['logits_max_diff']:.3g}; "
                  f"first differing field per layer {difference['first_differing_field']}")
    print(f"wrote {path}")
    return report


if __name__ == "__main__":
    main()
