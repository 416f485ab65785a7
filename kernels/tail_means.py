"""A causal prefill chunk's tail means in TileLang: each query's mean key over its partly visible last block, which
MISA's routing program (`router.py`, `tail_means=True`) takes in the place of the tail block's keys."""

# No `from __future__ import annotations`: TileLang evaluates the T.Tensor annotations.

import functools

import tilelang
import tilelang.language as T

from .common import compile_target


@functools.lru_cache(maxsize=None)
def build_causal_tail_means(dim: int, block_size: int, segments: int = 1, arch: str | None = None):
    """Compiles the tail means of a causal prefill chunk: (Keys [B, T, D] bf16, first_end int32, Means [B, c, D] bf16,
    written in place), query i seeing keys [0, first_end + i); its mean over its partly visible last block, zero on a
    block boundary (`ops.blocks.TailBlock.means` of the chunk, summed in fp32). One CTA per key block: the block is
    staged in shared memory and each thread keeps one dimension's running sum, writing the mean at every query's last
    key; one launch where the PyTorch prefix sums took ~25.

    `segments` > 1 splits each block's keys into that many runs, one thread per (run, dimension): each sums its run,
    then starts its running sum from the runs before it (their totals through shared memory), so a thread's serial
    chain is 2 * block_size / segments + segments adds instead of block_size (a prefill chunk's launch is one wave of
    these CTAs, its time that chain's latency). Sums in another order than segments=1: within the reference's
    tolerance, not bit-equal."""
    if segments < 1 or block_size % segments:
        raise ValueError(f"segments must divide block_size={block_size}, got {segments}")
    target = compile_target(arch)
    run = block_size // segments  # keys per thread

    @tilelang.jit(target=target)
    def program():
        batch, num_keys, num_queries = T.dynamic("batch"), T.dynamic("num_keys"), T.dynamic("num_queries")

        @T.prim_func
        def causal_tail_means(Keys: T.Tensor((batch, num_keys, dim), T.bfloat16), first_end: T.int32,
                              Means: T.Tensor((batch, num_queries, dim), T.bfloat16)):
            last_of_first = first_end - 1  # query 0's last visible key
            with T.Kernel(T.ceildiv(last_of_first % block_size + num_queries, block_size), batch,
                          threads=dim * segments) as (bx, bb):
                block = T.alloc_shared((block_size, dim), T.bfloat16)
                running = T.alloc_var(T.float32)
                thread = T.get_thread_binding()
                d = thread % dim
                first = thread // dim * run  # the thread's first key within the block
                block_start = (last_of_first // block_size + bx) * block_size
                T.copy(Keys[bb, block_start : block_start + block_size, :], block)
                running = 0.0
                if segments > 1:  # Python-level: start from the totals of the runs before this thread's
                    totals = T.alloc_shared((segments, dim), T.float32)
                    for m in T.serial(run):
                        running = running + T.cast(block[first + m, d], T.float32)
                    totals[thread // dim, d] = running
                    T.sync_threads()
                    running = 0.0
                    for earlier in T.serial(segments):
                        if earlier < thread // dim:
                            running = running + totals[earlier, d]
                for m in T.serial(run):
                    key = first + m
                    running = running + T.cast(block[key, d], T.float32)
                    query = block_start + key - last_of_first  # the query whose last visible key this is
                    if query >= 0 and query < num_queries:
                        # a query ending on the block's last key sees the whole block: no tail
                        Means[bb, query, d] = T.cast(
                            T.if_then_else(key + 1 < block_size, running / (key + 1), 0.0), T.bfloat16)

        return causal_tail_means

    return program
