"""Variant sweep of the radix top-k (threads per CTA, loads in flight per thread) on real indexer logits.

Before each timed call the logits are rewritten in place (`--before-each rewrite`, the default; result files before
2026-12-04 timed calls without it), so that the L2 holds what the logits program would leave there, not the previous
call's last reads.

Two workloads, the ones the indexer gives it: causal prefill rows of a 64K context (one row per 16th query, so the
rows' widths average half the context, as a whole prefill's do) and decode rows (batch 32 x 1 and 4 queries, 128K
cache). The logits come from the 8-head logits program on random inputs. Each variant must select exactly the
default's set (ties break alike); its time is reported with the bandwidth of one read of the visible columns.
Compiles run in parallel processes first. The `*_bounded*` variants (`build_radix_topk(bounded=True)`) take each row's
bound from `group_maxima_bounds` over groups of 16 or 8 columns, computed in PyTorch before the timed calls: their
times leave out what producing the bound would cost (the most a bound could give). The `*_sampled16` variants
(`sample_every=16`, the prefill default's bound) find their bound from a sample of each row itself: the whole cost of
that path.

    python benchmarks/sweep_topk.py --out benchmarks/results
"""

from __future__ import annotations

import json

import torch

from bench_indexer import DIM, SCALE, TOPK, inputs  # this folder's indexer benchmark
from gpu_timing import cuda_time_ms, environment
from sweeps import chosen, compile_variants, sweep_parser, write_results
from transformers_misa.kernels.scoring import build_weighted_relu_logits
from transformers_misa.kernels.topk import BUFFER, FEW_ROWS_SHAPE, MANY_ROWS_SHAPE, UNROLL, build_radix_topk
from transformers_misa.kernels.topk_bounds import group_maxima_bounds, sampled_bounds

# The compact second pass with counts in registers over 16-byte loads, in both CTA shapes: the base of the bounded and
# sampled variants below
MANY_COMPACT_BINS = dict(MANY_ROWS_SHAPE, vector=4, unroll=1, compact_second_pass=True, bins_in_registers=True)
FEW_COMPACT_BINS = dict(FEW_ROWS_SHAPE, vector=4, unroll=4, compact_second_pass=True, bins_in_registers=True)

VARIANTS = {  # name -> build options
    "default": {},
    "unroll2": dict(unroll=2),
    "unroll4": dict(unroll=4),
    "unroll8": dict(unroll=8),
    "unroll16": dict(unroll=16),
    "threads1024_unroll2": dict(threads=1024, unroll=2),
    "threads1024_unroll4": dict(threads=1024, unroll=4),
    "threads1024_unroll8": dict(threads=1024, unroll=8),
    "threads256_unroll4": dict(threads=256, unroll=4),
    # registers capped so that more CTAs (rows) share an SM: one row's barrier-bound levels overlap others' loads
    "ctas3": dict(min_ctas_per_sm=3),
    "ctas3_unroll8": dict(min_ctas_per_sm=3, unroll=8),
    "ctas3_buffer2048": dict(min_ctas_per_sm=3, buffer=2048),
    "ctas4_buffer2048": dict(min_ctas_per_sm=4, buffer=2048),
    "threads256_ctas6_buffer2048": dict(threads=256, min_ctas_per_sm=6, buffer=2048),
    # the scorer's shapes (prefill, decode), with and without the second pass's value filter
    "many_rows": dict(MANY_ROWS_SHAPE),
    "many_rows_no_value_filter": dict(MANY_ROWS_SHAPE, value_filter=False),
    "few_rows": dict(FEW_ROWS_SHAPE),
    "few_rows_no_value_filter": dict(FEW_ROWS_SHAPE, value_filter=False),
    # 16-byte loads: 4 adjacent floats per thread and load (fewer load and address instructions per value)
    "many_rows_vector4_unroll1": dict(MANY_ROWS_SHAPE, vector=4, unroll=1),
    "many_rows_vector4_unroll2": dict(MANY_ROWS_SHAPE, vector=4, unroll=2),
    "vector4_unroll2": dict(vector=4, unroll=2),
    "few_rows_vector4_unroll2": dict(FEW_ROWS_SHAPE, vector=4, unroll=2),
    "few_rows_vector4_unroll4": dict(FEW_ROWS_SHAPE, vector=4, unroll=4),
    # a 16-key buffer: (nearly) every row re-reads itself for the finer levels instead of buffering its k-th key's bin
    # (passes whose atomics return nothing; the output pass claims ~k slots), against the second pass's buffering
    "many_rows_vector4_unroll1_rereads": dict(MANY_ROWS_SHAPE, vector=4, unroll=1, buffer=16),
    # the same threads per SM as the prefill default in half as many (wider) rows: half the rows' bytes between the
    # two passes of each row, for the L2 to keep
    "threads1024_ctas2_vector4_unroll1": dict(threads=1024, min_ctas_per_sm=2, vector=4, unroll=1),
    "threads1024_ctas2_vector4_unroll2": dict(threads=1024, min_ctas_per_sm=2, vector=4, unroll=2),
    # fewer instructions (Nsight Compute, ncu-20261204-0231-detail.txt: ~120 per 16-byte load, issue-bound): the second
    # pass visits only its passing values, and / or the bin search keeps a thread's counts in registers
    "many_rows_vector4_unroll1_compact": dict(MANY_ROWS_SHAPE, vector=4, unroll=1, compact_second_pass=True),
    "many_rows_vector4_unroll1_bins_in_registers": dict(MANY_ROWS_SHAPE, vector=4, unroll=1, bins_in_registers=True),
    "many_rows_vector4_unroll1_compact_bins": MANY_COMPACT_BINS,
    "few_rows_vector4_unroll4_compact_bins": FEW_COMPACT_BINS,
    # rows read once where a bound keeps their values at or above it within the buffer (`bounded`; BOUND_GROUPS)
    "many_rows_vector4_unroll1_compact_bins_bounded16": dict(MANY_COMPACT_BINS, bounded=True),
    "many_rows_vector4_unroll1_compact_bins_bounded8": dict(MANY_COMPACT_BINS, bounded=True),
    # the bound from a sample of each row itself (`sample_every`): the whole cost of this one-read path
    "many_rows_vector4_unroll1_compact_bins_sampled16": dict(MANY_COMPACT_BINS, sample_every=16),
    "few_rows_vector4_unroll4_compact_bins_sampled16": dict(FEW_COMPACT_BINS, sample_every=16),
    # a sparser / denser sample: fewer sample sectors read, a bound of more spread (`topk_bound_model.py --sample`)
    "many_rows_vector4_unroll1_compact_bins_sampled32": dict(MANY_COMPACT_BINS, sample_every=32),
    "many_rows_vector4_unroll1_compact_bins_sampled8": dict(MANY_COMPACT_BINS, sample_every=8),
    # (the sample's loads issued in rounds of 2 / 4 before the histogram's clearing, `sample_unroll` of 721f245, lost:
    # sweep_topk-20261204-190305.json, 64K / 128K rows 0.336 / 0.984 and 0.334 / 0.983 against 0.329 / 0.957; removed)
    # three CTAs per SM (40 registers): the compact second pass without the spills it has at four (32 registers:
    # 16 B spill stores, 96 B spill loads per thread, nvcc -Xptxas -v)
    "many_rows_ctas3_vector4_unroll1_compact_bins": dict(MANY_ROWS_SHAPE, min_ctas_per_sm=3, vector=4, unroll=1,
                                                         compact_second_pass=True, bins_in_registers=True),
    "many_rows_ctas3_vector4_unroll2_compact_bins": dict(MANY_ROWS_SHAPE, min_ctas_per_sm=3, vector=4, unroll=2,
                                                         compact_second_pass=True, bins_in_registers=True),
}
HEADS = 8


# bounded variants: the group size of their bounds (`group_maxima_bounds`)
BOUND_GROUPS = {"many_rows_vector4_unroll1_compact_bins_bounded16": 16,
                "many_rows_vector4_unroll1_compact_bins_bounded8": 8}


def logits_rows(batch: int, queries: int, num_keys: int, ends: torch.Tensor) -> torch.Tensor:
    """[rows, num_keys] fp32 logits of the 8-head program, each row valid up to its end (unwritten past it)."""
    q, keys, weights = inputs(batch, queries, num_keys, HEADS)
    kernel = build_weighted_relu_logits(HEADS, DIM, fill_future=False, staged_stores=False)()
    ks = torch.zeros(batch, queries, dtype=torch.int32, device="cuda")
    logits = kernel(q.reshape(batch, queries * HEADS, DIM), keys, (weights * SCALE).contiguous(), ks,
                    ends.view(batch, queries).contiguous())
    return logits.reshape(batch * queries, num_keys)


def workloads(prefill_contexts: tuple[int, ...] = (65536,)) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Causal prefill rows (every 16th query of each context) and decode rows (128K cache, batch 32, 1 / 4 queries)."""
    out = {}
    for context in prefill_contexts:
        prefill_ends = torch.arange(16, context + 1, 16, dtype=torch.int32, device="cuda")
        out[f"prefill_{context // 1024}K_causal"] = (logits_rows(1, prefill_ends.numel(), context, prefill_ends),
                                                     prefill_ends)
    for queries in (1, 4):
        ends = torch.full((32 * queries,), 131072, dtype=torch.int32, device="cuda")
        out[f"decode_128K_b32_q{queries}"] = (logits_rows(32, queries, 131072, ends), ends)
    return out


def rewrite_before_each(scores: torch.Tensor):
    """A `cuda_time_ms` hook rewriting the logits in place (the same values), so that each timed call finds in the L2
    what the logits program would leave there, not the previous call's last reads."""
    return lambda: scores.mul_(1.0)


def visible_picks(picked: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """The picked columns before each row's end, sorted (rows seeing fewer than k keys fill up with any unread
    columns, which are not compared)."""
    return torch.where(picked < ends.unsqueeze(-1), picked, -1).sort(-1).values


def rows_read_once(scores: torch.Tensor, ends: torch.Tensor, bounds: torch.Tensor, buffer: int) -> float:
    """The share of rows with a bound (not -inf) whose values at or above it number k to `buffer` (the bounded
    program reads them once; a row without one takes the plain two reads)."""
    visible = torch.arange(scores.shape[1], device=scores.device) < ends.unsqueeze(-1)
    kept = ((scores >= bounds.unsqueeze(-1)) & visible).sum(-1)
    return float(((kept >= TOPK) & (kept <= buffer) & (bounds > float("-inf"))).float().mean())


def main(argv: list[str] | None = None) -> None:
    parser = sweep_parser(__doc__, reps=10, workers=8)
    parser.add_argument("--before-each", choices=("rewrite", "nothing"), default="rewrite",
                        help="rewrite: the logits rewritten in place before each timed call (untimed)")
    parser.add_argument("--prefill-contexts", default="65536", help="comma-separated causal prefill contexts")
    args = parser.parse_args(argv)
    builder = "transformers_misa.kernels.topk:build_radix_topk"
    variants = {name: VARIANTS[name] for name in chosen(VARIANTS, args.variants)}
    errors = compile_variants({name: (builder, (TOPK,), options) for name, options in variants.items()}, args.workers)
    rows = []
    for workload, (scores, ends) in workloads(tuple(map(int, args.prefill_contexts.split(",")))).items():
        expected = visible_picks(build_radix_topk(TOPK)()(scores, ends), ends)
        read_gb = float(ends.clamp_max(scores.shape[1]).sum()) * 4 / 1e9
        before = rewrite_before_each(scores) if args.before_each == "rewrite" else None
        for name, options in variants.items():
            row = {"workload": workload, "variant": name, "before_each": args.before_each,
                   "threads": options.get("threads", 512),
                   "unroll": options.get("unroll", UNROLL), "buffer": options.get("buffer", BUFFER),
                   "min_ctas_per_sm": options.get("min_ctas_per_sm", 0),
                   "value_filter": options.get("value_filter", True), "vector": options.get("vector", 1)}
            if errors[name]:
                row["error"] = errors[name]
            else:
                kernel = build_radix_topk(TOPK, **options)()
                rows_in = scores.view(scores.shape[0], -1, row["vector"]) if row["vector"] > 1 else scores
                extra = ()
                if name in BOUND_GROUPS:  # the bounds, untimed (the logits are unwritten past each row's end)
                    row["bound_group"] = BOUND_GROUPS[name]
                    extra = (group_maxima_bounds(scores, ends, TOPK, BOUND_GROUPS[name]),)
                    row["rows_read_once"] = rows_read_once(scores, ends, extra[0], options.get("buffer", BUFFER))
                elif options.get("sample_every"):  # the program finds its bound: the share it reads once
                    row["rows_read_once"] = rows_read_once(scores, ends, sampled_bounds(
                        scores, ends, TOPK, options["sample_every"]), options.get("buffer", BUFFER))
                row["same_selection"] = bool(torch.equal(visible_picks(kernel(rows_in, ends, *extra), ends), expected))
                row["ms"] = cuda_time_ms(lambda: kernel(rows_in, ends, *extra), args.reps, before=before)
                row["GB_per_s_one_read"] = read_gb / row["ms"] * 1e3
            rows.append(row)
            print(json.dumps(row), flush=True)
        del scores, ends
        torch.cuda.empty_cache()
    write_results(args.out, "sweep_topk", {"environment": environment(), "topk": TOPK, "results": rows})


if __name__ == "__main__":
    main()
