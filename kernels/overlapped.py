"""Prototype: the few-head logits program with each tile's epilogue overlapping the next tile's matmul.

Same contract as `scoring.build_weighted_relu_logits(heads, dim, fill_future=False, staged_stores=True,
interleaved=True)` (bf16, 128 query rows per CTA, 128-key tiles). The pipelined program waits for each tile's wgmma
before its epilogue (ReLU, weights, head sum, store) and only then issues the next tile's: the tensor cores idle
during every epilogue. Here a producer warpgroup streams key tiles through a ring of shared-memory stages (TMA,
mbarriers), and the consumers keep two accumulators: tile t+1's wgmma is issued before tile t's epilogue runs.
"""

# No `from __future__ import annotations`: TileLang evaluates the T.Tensor annotations.

import functools

import tilelang
import tilelang.language as T

from .common import ROWS_PER_CTA, compile_target, queries_per_cta
from .scoring import interleaved_query_head


@functools.lru_cache(maxsize=None)
def build_overlapped_logits(heads: int, dim: int, stages: int = 4, arch: str | None = None):
    """Compiles the overlapped few-head logits program; (Q [B, S·H, D] bf16 interleaved rows, K [B, T, D] bf16,
    W [B, S, H] fp32, KS, KE [B, S] int32) -> Logits [B, S, T] fp32, each query's future left unwritten."""
    if not (heads % 2 == 0 and 16 % heads == 0):
        raise ValueError(f"the overlapped program takes 2-16 heads dividing 16, got {heads}")
    target = compile_target(arch)
    block_n, rows, consumers = 128, ROWS_PER_CTA, 256
    block_q = queries_per_cta(heads, rows)

    @tilelang.jit(target=target, out_idx=[-1], pass_configs={tilelang.PassConfigKey.TL_ENABLE_FAST_MATH: False})
    def program():
        batch, num_queries, num_keys = T.dynamic("batch"), T.dynamic("num_queries"), T.dynamic("num_keys")

        @T.macro
        def epilogue(scores, tile, context):
            """ReLU, head weights and head sum in registers; the tile's logits out through shared memory."""
            Logits, bb, q0, weights, head_pairs, logits, logits_shared, ks_local, ke_local = context
            for n, r in T.Parallel(block_n, rows):
                scores[n, r] = T.max(scores[n, r], 0.0) * weights[r]
            T.reduce_sum(T.reshape(scores, (block_n, 2, 16 // heads, heads // 2, 4, 2)), head_pairs, dim=5,
                         clear=True)
            T.reduce_sum(head_pairs, T.reshape(logits, (block_n, 2, 16 // heads, 4)), dim=3, clear=True)
            for i, n in T.Parallel(block_q, block_n):
                key = tile * block_n + n
                logits_shared[i, n] = T.if_then_else(key >= ks_local[i] and key < ke_local[i], logits[n, i],
                                                     -T.infinity(T.float32))
            T.copy(logits_shared, Logits[bb, q0 : q0 + block_q, tile * block_n : (tile + 1) * block_n])

        @T.macro
        def issue(scores, tile, k_shared, q_shared, full):
            """Waits for the tile's keys and issues its wgmma without waiting for it."""
            T.barrier_wait(full[tile % stages], (tile // stages) & 1)
            T.wgmma_gemm(k_shared[tile % stages, :, :], q_shared, scores, transpose_B=True, clear_accum=True,
                         policy=T.GemmWarpPolicy.FullCol)

        @T.macro
        def retire(scores, tile, empty):
            """Waits for the tile's wgmma (its accumulator readable from here on) and hands its stage back."""
            T.wait_wgmma(0)
            T.warpgroup_fence_operand(scores)  # keeps nvcc from hoisting reads of the accumulator above the wait
            T.barrier_arrive(empty[tile % stages])

        @T.prim_func
        def overlapped_logits(Q: T.Tensor((batch, num_queries * heads, dim), T.bfloat16),
                              K: T.Tensor((batch, num_keys, dim), T.bfloat16),
                              W: T.Tensor((batch, num_queries, heads), T.float32),
                              KS: T.Tensor((batch, num_queries), T.int32),
                              KE: T.Tensor((batch, num_queries), T.int32),
                              Logits: T.Tensor((batch, num_queries, num_keys), T.float32)):
            with T.Kernel(T.ceildiv(num_queries, block_q), batch, threads=consumers + 128) as (bq, bb):
                q_shared = T.alloc_shared((rows, dim), T.bfloat16)
                k_shared = T.alloc_shared((stages, block_n, dim), T.bfloat16)
                logits_shared = T.alloc_shared((block_q, block_n), T.float32)
                scores_a = T.alloc_fragment((block_n, rows), T.float32)
                scores_b = T.alloc_fragment((block_n, rows), T.float32)
                head_pairs = T.alloc_fragment((block_n, 2, 16 // heads, heads // 2, 4), T.float32)
                logits = T.alloc_fragment((block_n, block_q), T.float32)
                weights = T.alloc_fragment((rows,), T.float32)
                ks_local = T.alloc_fragment((block_q,), T.int32)
                ke_local = T.alloc_fragment((block_q,), T.int32)
                q_ready = T.alloc_barrier([1])
                full = T.alloc_barrier([1] * stages)
                empty = T.alloc_barrier([consumers] * stages)
                ke_max = T.alloc_var(T.int32)
                tx = T.get_thread_binding()
                q0 = bq * block_q
                ke_max = 0
                for i in T.serial(block_q):
                    ke_max = T.max(ke_max, T.if_then_else(q0 + i < num_queries,
                                                          KE[bb, T.min(q0 + i, num_queries - 1)], 0))
                tiles = T.min(T.ceildiv(ke_max, block_n), T.ceildiv(num_keys, block_n))

                if tx >= consumers:  # the producer warpgroup: queries once, then the key tiles through the ring
                    T.set_max_nreg(40, 0)
                    T.tma_copy(Q[bb, q0 * heads : q0 * heads + rows, :], q_shared, barrier=q_ready[0])
                    if tx == consumers:
                        T.barrier_arrive(q_ready[0])
                    for tile in T.serial(tiles):
                        T.barrier_wait(empty[tile % stages], ((tile // stages) & 1) ^ 1)
                        T.tma_copy(K[bb, tile * block_n : (tile + 1) * block_n, :], k_shared[tile % stages, :, :],
                                   barrier=full[tile % stages])
                        if tx == consumers:
                            T.barrier_arrive(full[tile % stages])
                else:
                    T.set_max_nreg(232, 1)
                    for r in T.Parallel(rows):
                        query, head = interleaved_query_head(r, heads)
                        weights[r] = T.if_then_else(q0 + query < num_queries,
                                                    W[bb, T.min(q0 + query, num_queries - 1), head], 0.0)
                    for i in T.Parallel(block_q):
                        ks_local[i] = T.if_then_else(q0 + i < num_queries, KS[bb, T.min(q0 + i, num_queries - 1)], 0)
                        ke_local[i] = T.if_then_else(q0 + i < num_queries, KE[bb, T.min(q0 + i, num_queries - 1)], 0)
                    T.clear(scores_b)  # read only from the second pair on; cleared so that no path reads it unset
                    T.barrier_wait(q_ready[0], 0)
                    # Tiles in pairs (a, b): b's wgmma runs during a's epilogue, the next a's during b's.
                    context = (Logits, bb, q0, weights, head_pairs, logits, logits_shared, ks_local, ke_local)
                    for pair in T.serial(T.ceildiv(tiles, 2)):
                        issue(scores_a, 2 * pair, k_shared, q_shared, full)
                        if pair > 0:
                            epilogue(scores_b, 2 * pair - 1, context)
                        retire(scores_a, 2 * pair, empty)
                        if 2 * pair + 1 < tiles:
                            issue(scores_b, 2 * pair + 1, k_shared, q_shared, full)
                            epilogue(scores_a, 2 * pair, context)
                            retire(scores_b, 2 * pair + 1, empty)
                        else:
                            epilogue(scores_a, 2 * pair, context)
                    if tiles > 0 and tiles % 2 == 0:
                        epilogue(scores_b, tiles - 1, context)

        return overlapped_logits

    return program
