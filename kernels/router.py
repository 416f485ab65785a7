"""MISA's router in TileLang: per-head block-level importance, one pass over the pooled keys.

    importance[b, t, j] = |w[b, t, j]| · Σ_{m visible to t} ReLU(q[b, t, j] · k̄[b, m])

A block m is visible to query t when it overlaps t's visible keys [ks, ke). A CTA takes `128 / heads` queries
(all their heads: 128 query rows, one wgmma N), streams the pooled keys in tiles and adds each tile's masked
ReLU scores into a register accumulator of the tile's shape, reduced over the blocks once at the end rather than
with a cross-thread reduction per tile: the [S, H, M] block-score tensor is never written. The top-`active_heads`
heads per query are then a tiny [S, H] top-k on the host side.
"""

# No `from __future__ import annotations`: TileLang evaluates the T.Tensor annotations.

import functools

import tilelang
import tilelang.language as T

from .common import compile_target, queries_per_cta


@functools.lru_cache(maxsize=None)
def build_head_importance(heads: int, dim: int, block_size: int, block_m: int = 64, num_stages: int = 2,
                          threads: int = 256, arch: str | None = None):
    """Compiles the router program for `heads` heads of width `dim` over keys pooled by `block_size`."""
    target = compile_target(arch)
    block_q = queries_per_cta(heads)
    rows = block_q * heads

    @tilelang.jit(target=target, out_idx=[-1])
    def program():
        batch, num_queries, num_blocks = T.dynamic("batch"), T.dynamic("num_queries"), T.dynamic("num_blocks")

        @T.prim_func
        def head_importance(
            Q: T.Tensor((batch, num_queries * heads, dim), T.bfloat16),
            Pooled: T.Tensor((batch, num_blocks, dim), T.bfloat16),
            W: T.Tensor((batch, num_queries, heads), T.float32),
            KS: T.Tensor((batch, num_queries), T.int32),
            KE: T.Tensor((batch, num_queries), T.int32),
            Importance: T.Tensor((batch, num_queries, heads), T.float32),
        ):
            with T.Kernel(T.ceildiv(num_queries, block_q), batch, threads=threads) as (bq, bb):
                q_shared = T.alloc_shared((rows, dim), T.bfloat16)
                p_shared = T.alloc_shared((block_m, dim), T.bfloat16)
                scores = T.alloc_fragment((block_m, rows), T.float32)
                running = T.alloc_fragment((block_m, rows), T.float32)  # per-slot sums; reduced once at the end
                total = T.alloc_fragment((rows,), T.float32)
                first_block = T.alloc_fragment((rows,), T.int32)
                end_block = T.alloc_fragment((rows,), T.int32)
                last_end = T.alloc_var(T.int32)
                q0 = bq * block_q

                T.copy(Q[bb, q0 * heads : q0 * heads + rows, :], q_shared)
                for r in T.Parallel(rows):
                    query = T.min(q0 + r // heads, num_queries - 1)
                    first_block[r] = KS[bb, query] // block_size
                    end_block[r] = T.if_then_else(KE[bb, query] > KS[bb, query],
                                                  T.ceildiv(KE[bb, query], block_size), 0)
                T.clear(running)
                last_end = 0
                for i in T.serial(block_q):
                    last_end = T.max(last_end, T.ceildiv(KE[bb, T.min(q0 + i, num_queries - 1)], block_size))

                for tile in T.Pipelined(T.ceildiv(last_end, block_m), num_stages=num_stages):
                    T.copy(Pooled[bb, tile * block_m : (tile + 1) * block_m, :], p_shared)
                    T.gemm(p_shared, q_shared, scores, transpose_B=True, clear_accum=True,
                           policy=T.GemmWarpPolicy.FullCol)
                    for m, r in T.Parallel(block_m, rows):
                        block = tile * block_m + m
                        running[m, r] += T.if_then_else(block >= first_block[r] and block < end_block[r],
                                                        T.max(scores[m, r], 0.0), 0.0)
                T.reduce_sum(running, total, dim=0, clear=True)

                for r in T.Parallel(rows):
                    if q0 + r // heads < num_queries:
                        Importance[bb, q0 + r // heads, r % heads] = total[r] * T.abs(
                            W[bb, q0 + r // heads, r % heads])

        return head_importance

    return program
