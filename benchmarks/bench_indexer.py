"""Indexer speed on one Hopper GPU: stock transformers math, PyTorch reference, DSA-64 kernel, MISA, MISA†, HISA.

Every ratio comes from one run, side by side. Prints a table and writes JSON (GPU, versions, date) and a PNG
under benchmarks/results/.

    python benchmarks/bench_indexer.py                       # prefill 4K..128K + decode, H=64 and GLM-5's H=32
    python benchmarks/bench_indexer.py --quick               # a few small shapes (smoke test)
    python benchmarks/bench_indexer.py --contexts 65536 --glm-contexts "" --decode-caches 131072  # one shape
    python benchmarks/bench_indexer.py --deepseek-ref PATH   # also time DeepSeek-V3.2-Exp's own fp8_index
"""

from __future__ import annotations

import argparse
import datetime
import functools
import pathlib
import statistics
import sys

import torch

from bench_report import ResultsFile, plot, print_row  # this folder's table, JSON and plot
from deepseek_reference import deepseek_fp8_index, load_deepseek_kernel  # DeepSeek's kernel from --deepseek-ref
from gpu_timing import cuda_time_ms, environment, graph_time_ms, peak_extra_gib, stage_ms  # this folder's timing
from transformers_misa.kernels.logits_shapes import logits_options
from transformers_misa.kernels.scorer import TILELANG_FP8_SCORER, TILELANG_SCORER
from transformers_misa.kernels.variants import (TILELANG_BLOCKS_AS_M_ROUTER_SCORER, TILELANG_BUDGET_CHUNKS_SCORER,
                                                TILELANG_EVERY_TILE_TESTED_SCORER, TILELANG_FORWARD_ORDER_SCORER,
                                                TILELANG_LAST_REMAINDER_SCORER, TILELANG_LEAN_SCRATCH_SCORER,
                                                TILELANG_LONGEST_FIRST_SCORER, TILELANG_PIPELINED_SCORER,
                                                TILELANG_PLAIN_LAYOUT_SCORER, TILELANG_PLAIN_MANY_HEADS_SCORER,
                                                TILELANG_PLAIN_TOPK_SCORER, TILELANG_RUNNING_SUM_ROUTER_SCORER,
                                                TILELANG_SAMPLED16_TOPK_SCORER, TILELANG_SINGLE_RUN_TAIL_MEANS_SCORER,
                                                TILELANG_SQUARE_FEW_HEADS_SCORER, TILELANG_STEPWISE_ROUTE_CHUNKS_SCORER,
                                                TILELANG_STEPWISE_ROUTING_SCORER, TILELANG_TAIL_KEYS_SCORER,
                                                TILELANG_THRESHOLD_SCORER, TILELANG_TWO_STREAMS_SCORER,
                                                TILELANG_UNSAMPLED_TOPK_SCORER)
from transformers_misa.kernels.scoring import build_weighted_relu_logits, stages_stores
from transformers_misa.ops import reference
from transformers_misa.ops.blocks import fp8_e4m3_quantize, fp8_e4m3_roundtrip
from transformers_misa.ops.masks import ChunkMask

DIM, TOPK, BLOCK = 128, 2048, 128
SCALE = DIM**-0.5
RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def inputs(batch: int, num_queries: int, num_keys: int, heads: int, seed: int = 0):
    generator = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(batch, num_queries, heads, DIM, device="cuda", generator=generator, dtype=torch.bfloat16)
    keys = torch.randn(batch, num_keys, DIM, device="cuda", generator=generator, dtype=torch.bfloat16)
    weights = torch.randn(batch, num_queries, heads, device="cuda", generator=generator)
    return q, keys, weights


def stock_transformers(q, keys, weights):
    """transformers' indexer math verbatim: a [B, S, H, T] fp32 tensor, then torch.topk."""
    scores = torch.matmul(q.float(), keys.transpose(-1, -2).float().unsqueeze(1)) * SCALE
    index = torch.matmul(weights.unsqueeze(-2), torch.relu(scores)).squeeze(-2)
    chunk = ChunkMask(None, slice(0, q.shape[1]), q.shape[0], q.shape[1], keys.shape[1], q.device)
    return (index + chunk.bias).topk(min(TOPK, keys.shape[1]), dim=-1).indices


def _dsa(scorer, fp8: bool = False, **options):
    """DSA's top-k on `scorer` (fp8: q and keys rounded to FP8 first, as the indexer with qk_format="fp8_e4m3")."""
    cast = fp8_e4m3_roundtrip if fp8 else (lambda x: x)
    return lambda q, k, w: reference.dsa_topk(cast(q), cast(k), w, TOPK, softmax_scale=SCALE, scorer=scorer, **options)


def _misa(select, scorer, fp8: bool = False, **options):
    """A routed mode's top-k (`select`: reference.misa_topk, misa_hierarchical_topk) with 8 heads on `scorer`."""
    cast = fp8_e4m3_roundtrip if fp8 else (lambda x: x)
    return lambda q, k, w: select(cast(q), cast(k), w, TOPK, active_heads=8, block_size=BLOCK, softmax_scale=SCALE,
                                  scorer=scorer, **options)


def methods(heads: int, deepseek_kernel):
    table = {
        "stock": stock_transformers,
        "reference": _dsa(reference.REFERENCE),
        f"dsa{heads}_kernel": _dsa(TILELANG_SCORER),
        "misa8": _misa(reference.misa_topk, TILELANG_SCORER),
        # earlier programs, timed beside the current ones: the plain row order of the few-head logits (before the
        # interleaved layout), the pipelined logits driver (before the overlapped one), the routing step in separate
        # launches (before the fused routing program)
        "misa8_plain_layout": _misa(reference.misa_topk, TILELANG_PLAIN_LAYOUT_SCORER),
        "misa8_pipelined": _misa(reference.misa_topk, TILELANG_PIPELINED_SCORER),
        f"dsa{heads}_pipelined": _dsa(TILELANG_PIPELINED_SCORER),
        "misa8_stepwise_routing": _misa(reference.misa_topk, TILELANG_STEPWISE_ROUTING_SCORER),
        # the routing program reading a prefill's tails from the key cache, and also testing every tile
        "misa8_tail_keys": _misa(reference.misa_topk, TILELANG_TAIL_KEYS_SCORER),
        "misa8_every_tile_tested": _misa(reference.misa_topk, TILELANG_EVERY_TILE_TESTED_SCORER),
        # query chunks sized by the memory budget alone (before chunks of whole waves of logits CTAs)
        f"dsa{heads}_budget_chunks": _dsa(TILELANG_BUDGET_CHUNKS_SCORER),
        "misa8_budget_chunks": _misa(reference.misa_topk, TILELANG_BUDGET_CHUNKS_SCORER),
        # the router programs with the pooled blocks as the matmuls' M (before the query rows were)
        "misa8_blocks_as_m_router": _misa(reference.misa_topk, TILELANG_BLOCKS_AS_M_ROUTER_SCORER),
        # 4-16 routed heads in the square 128-row CTAs over 128-key tiles (before WIDE_FEW_HEADS)
        "misa8_square": _misa(reference.misa_topk, TILELANG_SQUARE_FEW_HEADS_SCORER),
        # the prefill top-k without the compact second pass and counts in registers, both methods alike
        f"dsa{heads}_plain_topk": _dsa(TILELANG_PLAIN_TOPK_SCORER),
        "misa8_plain_topk": _misa(reference.misa_topk, TILELANG_PLAIN_TOPK_SCORER),
        # the prefill routing program with a running [rows, blocks] sum reduced at the end (before reduce_per_tile)
        "misa8_running_sum_router": _misa(reference.misa_topk, TILELANG_RUNNING_SUM_ROUTER_SCORER),
        # the prefill top-k reading every row twice (before its bound from a sample of the row), both methods alike
        f"dsa{heads}_unsampled_topk": _dsa(TILELANG_UNSAMPLED_TOPK_SCORER),
        "misa8_unsampled_topk": _misa(reference.misa_topk, TILELANG_UNSAMPLED_TOPK_SCORER),
        # the prefill top-k's bound from a denser sample (1/16 of each row, before 1/32), both methods alike
        f"dsa{heads}_sampled16_topk": _dsa(TILELANG_SAMPLED16_TOPK_SCORER),
        "misa8_sampled16_topk": _misa(reference.misa_topk, TILELANG_SAMPLED16_TOPK_SCORER),
        # MISA's chunks sized for the step-by-step routing's block scores (smaller chunks; before route_scratch_bytes)
        "misa8_stepwise_route_chunks": _misa(reference.misa_topk, TILELANG_STEPWISE_ROUTE_CHUNKS_SCORER),
        # both methods' chunks sized by their logits alone: fewer, larger chunks, 2.5x the peak memory (opt-in)
        f"dsa{heads}_lean_scratch": _dsa(TILELANG_LEAN_SCRATCH_SCORER),
        "misa8_lean_scratch": _misa(reference.misa_topk, TILELANG_LEAN_SCRATCH_SCORER),
        # the query chunks taking two CUDA streams in turn (one chunk's top-k beside the next one's logits; opt-in)
        f"dsa{heads}_two_streams": _dsa(TILELANG_TWO_STREAMS_SCORER),
        "misa8_two_streams": _misa(reference.misa_topk, TILELANG_TWO_STREAMS_SCORER),
        # a prefill's logits query blocks and top-k rows last to first for many heads too (opt-in; the default for
        # at most 16 heads, logits_shapes.longest_first_for)
        f"dsa{heads}_longest_first": _dsa(TILELANG_LONGEST_FIRST_SCORER),
        # a prefill's queries past whole waves of logits CTAs in its last query chunk (before remainder_first)
        f"dsa{heads}_last_remainder": _dsa(TILELANG_LAST_REMAINDER_SCORER),
        "misa8_last_remainder": _misa(reference.misa_topk, TILELANG_LAST_REMAINDER_SCORER),
        # launch order and the remainder last for every head count (the schedule before both)
        f"dsa{heads}_forward_order": _dsa(TILELANG_FORWARD_ORDER_SCORER),
        "misa8_forward_order": _misa(reference.misa_topk, TILELANG_FORWARD_ORDER_SCORER),
        # a prefill's tail means summed by one thread per dimension over each whole block (before TAIL_MEAN_SEGMENTS)
        "misa8_single_run_tail_means": _misa(reference.misa_topk, TILELANG_SINGLE_RUN_TAIL_MEANS_SCORER),
        # GLM-5's 32 heads in the plain layout of the wide CTAs (64 heads: always plain)
        f"dsa{heads}_plain_many_heads": _dsa(TILELANG_PLAIN_MANY_HEADS_SCORER),
        # the wide top-k via a sampled threshold
        f"dsa{heads}_threshold": _dsa(TILELANG_THRESHOLD_SCORER),
        "misa8_threshold": _misa(reference.misa_topk, TILELANG_THRESHOLD_SCORER),
        "misa8_hier": _misa(reference.misa_hierarchical_topk, TILELANG_SCORER, candidate_factor=4),
        "hisa": lambda q, k, w: reference.hisa_topk(q, k, w, TOPK, block_size=BLOCK, keep_blocks=64,
                                                    softmax_scale=SCALE, scorer=TILELANG_SCORER),
        # qk_format="fp8_e4m3" as the indexer runs it: q and keys rounded to FP8, token logits on the FP8 cores.
        f"dsa{heads}_fp8": _dsa(TILELANG_FP8_SCORER, fp8=True),
        "misa8_fp8": _misa(reference.misa_topk, TILELANG_FP8_SCORER, fp8=True),
    }
    if deepseek_kernel is not None:
        table["deepseek_fp8_index"] = functools.partial(deepseek_fp8_index, deepseek_kernel, softmax_scale=SCALE,
                                                        topk=TOPK)
    return table


def fits(method: str, batch: int, num_queries: int, num_keys: int, heads: int) -> bool:
    free = torch.cuda.mem_get_info()[0]
    if method == "stock":
        return batch * num_queries * heads * num_keys * 4 * 2.2 < free
    if method == "reference":
        return num_queries * num_keys <= 16384 * 16384  # correct everywhere, but minutes per call beyond
    if method == "deepseek_fp8_index":
        return batch * num_queries * num_keys * 4 * 2.5 < free
    return True


def scoring_tflops(heads: int, num_queries: int, num_keys: int, reps: int, **variant) -> dict:
    """The logits program alone over a causal prefill in one call, as achieved tensor-core throughput; as the
    indexer's top-k path runs it (its prefill CTA shape, each query's future left unwritten) unless `variant`
    overrides program options. (Before 2026-11-28 12:00 it took 128-row CTAs and wrote the future as -inf; before
    13:40 the same day, TileLang's pipeline instead of the overlapped driver.)"""
    q, keys, weights = inputs(1, num_queries, num_keys, heads)
    sm_count = torch.cuda.get_device_properties(q.device).multi_processor_count
    options = logits_options(heads, 1, num_queries, num_keys, sm_count, fill_future=False,
                             fp8=variant.get("fp8", False))
    kernel = build_weighted_relu_logits(heads, DIM, **{**options, **variant})()
    chunk = ChunkMask(None, slice(0, num_queries), 1, num_queries, num_keys, q.device)
    ks, ke, _ = chunk.key_range
    if variant.get("fp8"):  # e4m3 inputs with their scales, as the FP8 scorer passes them
        (q8, q_scale), (keys8, key_scale) = fp8_e4m3_quantize(q), fp8_e4m3_quantize(keys)
        flat_q8, scaled = q8.reshape(1, num_queries * heads, DIM), weights * q_scale
        ms = cuda_time_ms(lambda: kernel(flat_q8, keys8, key_scale, scaled, ks, ke), reps)
    else:
        flat_q = q.reshape(1, num_queries * heads, DIM)
        ms = cuda_time_ms(lambda: kernel(flat_q, keys, weights, ks, ke), reps)
    visible_pairs = float(ke.sum() - ks.sum())
    flops = 2.0 * heads * DIM * visible_pairs
    return {"ms": ms, "tflops": flops / ms / 1e9}


def chosen(name: str, heads: int, only: set[str] | None) -> bool:
    """Whether `--methods` (names as in `methods`, with "dsa" for dsa{heads}_*) asks for this method."""
    return only is None or name.replace(f"dsa{heads}", "dsa") in only


def time_in_rounds(calls: dict, reps: int, rounds: int, row: dict, context: int) -> None:
    """Times the row's methods in turn, once per round (A B C, A B C, ...), and records each method's median over the
    rounds, eager (`name_ms`) and host hidden (`name_gpu_ms`), its host-hidden time per round (`name_gpu_rounds`)
    and its peak extra memory. Rounds spread the GPU's drift (clocks, heat: one method's time moved 5% between
    runs of 2026-12-04) over every method alike, where timing each method's repetitions back to back left a ratio
    to whichever method ran in a hot or a cool stretch. A method that raises is recorded as an error in the row
    (e.g. a launch the GPU refuses) and left out of later rounds; the others are still timed."""
    samples: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            if f"{name}_error" in row:
                continue
            try:
                samples[name][0].append(cuda_time_ms(call, reps))
                samples[name][1].append(cuda_time_ms(call, reps, host_hidden=True))
            except Exception as error:
                row[f"{name}_error"] = f"{type(error).__name__}: {error}"[:300]
                print(f"{name} failed at {context} tokens: {row[f'{name}_error']}", file=sys.stderr, flush=True)
            torch.cuda.empty_cache()  # each method's cached blocks would crowd out the next one's
    for name, call in calls.items():
        if f"{name}_error" in row:
            continue
        eager, hidden = samples[name]
        row[f"{name}_ms"] = statistics.median(eager)
        row[f"{name}_gpu_ms"] = statistics.median(hidden)
        row[f"{name}_gpu_rounds"] = hidden
        row[f"{name}_peak_gib"] = peak_extra_gib(call)
        torch.cuda.empty_cache()


def run_prefill(contexts, heads, deepseek_kernel, reps, results, only=None, rounds: int = 3):
    for context in contexts:
        q, keys, weights = inputs(1, context, context, heads)
        row = {"phase": "prefill", "heads": heads, "batch": 1, "context": context, "rounds": rounds}
        calls = {name: functools.partial(fn, q, keys, weights) for name, fn in methods(heads, deepseek_kernel).items()
                 if chosen(name, heads, only) and fits(name, 1, context, context, heads)}
        time_in_rounds(calls, reps if context <= 32768 else max(1, reps // 2), rounds, row, context)
        row["scoring"] = scoring_tflops(heads, context, context, reps)
        row["scoring_pipelined"] = scoring_tflops(heads, context, context, reps, overlapped=False, num_stages=2)
        if chosen(f"dsa{heads}_fp8", heads, only) and (not stages_stores(heads) or context <= 32768):
            # staged: one call under the TMA limit
            row["scoring_fp8"] = scoring_tflops(heads, context, context, reps, fp8=True)
        if context == 32768 and heads == 64 and chosen("misa8_plain_layout", heads, only):
            # why few-head logits go through shared memory, interleaved (scoring.py)
            row["routed8_logits"] = {
                f"staged_stores={staged}": scoring_tflops(8, context, context, reps, staged_stores=staged,
                                                          fill_future=False)
                for staged in (False, True)}
            row["routed8_logits"]["staged_stores=True,interleaved"] = scoring_tflops(
                8, context, context, reps, staged_stores=True, fill_future=False, interleaved=True)
        if context >= 32768:
            table = methods(heads, None)
            row["stages"] = {name: stage_ms(functools.partial(table[name], q, keys, weights))
                                for name in (f"dsa{heads}_kernel", f"dsa{heads}_pipelined", "misa8", "misa8_pipelined",
                                             "misa8_budget_chunks", "misa8_blocks_as_m_router",
                                             "misa8_square", f"dsa{heads}_plain_topk", "misa8_plain_topk",
                                             f"dsa{heads}_plain_many_heads",
                                             "misa8_running_sum_router", "misa8_single_run_tail_means",
                                             f"dsa{heads}_longest_first",
                                             f"dsa{heads}_unsampled_topk", "misa8_unsampled_topk",
                                             f"dsa{heads}_sampled16_topk", "misa8_sampled16_topk",
                                             f"dsa{heads}_last_remainder", "misa8_last_remainder",
                                             f"dsa{heads}_forward_order", "misa8_forward_order",
                                             "misa8_plain_layout",
                                             f"dsa{heads}_threshold", "misa8_threshold",
                                             f"dsa{heads}_fp8", "misa8_fp8") if chosen(name, heads, only)}
        results.append(row)
        print_row(row, heads)
        del q, keys, weights
        torch.cuda.empty_cache()


def run_decode(caches, batches, new_tokens_options, heads, reps, results):
    """One decode step per (cache, batch, new tokens): the DSA kernel, MISA-8 and MISA-8 with stepwise routing."""
    common = dict(softmax_scale=SCALE, scorer=TILELANG_SCORER, sync_free=True)  # as static-cache decode runs
    for cache in caches:
        for batch in batches:
            for new_tokens in new_tokens_options:
                q, keys, weights = inputs(batch, new_tokens, cache, heads)
                pooled = reference.pooled_keys(keys, None, BLOCK)  # kept incrementally in the cache in real decode
                row = {"phase": "decode", "heads": heads, "batch": batch, "context": cache, "new_tokens": new_tokens}
                calls = {
                    f"dsa{heads}_kernel": lambda: reference.dsa_topk(q, keys, weights, TOPK, **common),
                    "misa8": lambda: reference.misa_topk(q, keys, weights, TOPK, active_heads=8, block_size=BLOCK,
                                                         pooled=pooled, **common),
                    "misa8_stepwise_routing": lambda: reference.misa_topk(
                        q, keys, weights, TOPK, active_heads=8, block_size=BLOCK, pooled=pooled,
                        **dict(common, scorer=TILELANG_STEPWISE_ROUTING_SCORER)),
                }
                for name, call in calls.items():
                    row[f"{name}_ms"] = cuda_time_ms(call, reps)
                for name, call in calls.items():
                    try:
                        row[f"{name}_graph_ms"] = graph_time_ms(call, max(reps, 10))
                    except Exception as error:  # report, keep the other numbers
                        row[f"{name}_graph_error"] = f"{type(error).__name__}: {error}"[:300]
                        print(f"CUDA graph of {name} failed: {row[f'{name}_graph_error']}", flush=True)
                if cache == max(caches):
                    row["stages"] = {name: stage_ms(call) for name, call in calls.items()}
                results.append(row)
                print_row(row, heads)
                del q, keys, weights, pooled
                torch.cuda.empty_cache()


def profile_misa(context: int) -> None:
    """Where MISA-8's time goes at one context (torch.profiler, CUDA time per op)."""
    q, keys, weights = inputs(1, context, context, 64)
    call = methods(64, None)["misa8"]
    call(q, keys, weights)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        call(q, keys, weights)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", default="4096,8192,16384,32768,65536,131072")
    parser.add_argument("--decode-caches", default="8192,32768,131072")
    parser.add_argument("--decode-batches", default="1,8,32")
    parser.add_argument("--decode-new-tokens", default="1,4", help="queries per sequence per decode step (MTP)")
    parser.add_argument("--glm-contexts", default="32768,65536", help="contexts for GLM-5's H=32 shape")
    parser.add_argument("--methods", default="", help="only these prefill methods, e.g. dsa_kernel,misa8,misa8_hier,"
                        "hisa (dsa_* for the DSA kernel of each head count); default: all")
    parser.add_argument("--reps", type=int, default=5, help="timed calls per method and round (half beyond 32K)")
    parser.add_argument("--rounds", type=int, default=3, help="prefill: rounds over the methods in turn (medians)")
    parser.add_argument("--quick", action="store_true", help="small shapes only")
    parser.add_argument("--deepseek-ref", type=pathlib.Path, help="checkout of deepseek-ai/DeepSeek-V3.2-Exp")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
    parser.add_argument("--profile", type=int, default=0, help="print a kernel-time profile of misa8 at this context")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_indexer needs a CUDA GPU (H100/H200)")
    if args.quick:
        args.contexts, args.decode_caches, args.decode_batches, args.glm_contexts = "4096", "8192", "1,8", "4096"
    parse = lambda text: [int(x) for x in text.split(",") if x]  # noqa: E731
    deepseek_kernel = None
    if args.deepseek_ref:
        try:
            deepseek_kernel = load_deepseek_kernel(args.deepseek_ref)
        except Exception as error:  # e.g. a TileLang release that no longer has a pass config it names
            print(f"cannot load DeepSeek's inference/kernel.py from {args.deepseek_ref} ({type(error).__name__}: "
                  f"{error}); timing without it", file=sys.stderr)

    if args.profile:
        profile_misa(args.profile)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    path = args.out / f"bench_indexer-{stamp}.json"
    results = ResultsFile(path, {"environment": environment(), "topk": TOPK, "block_size": BLOCK})
    only = set(args.methods.split(",")) if args.methods else None
    run_prefill(parse(args.contexts), 64, deepseek_kernel, args.reps, results, only, args.rounds)
    run_prefill(parse(args.glm_contexts), 32, None, args.reps, results, only, args.rounds)
    run_decode(parse(args.decode_caches), parse(args.decode_batches), parse(args.decode_new_tokens), 64, args.reps,
               results)
    results.finish()
    plot(results, path.with_suffix(".png"), TOPK)
    print(f"wrote {path} and .png")


if __name__ == "__main__":
    main()
