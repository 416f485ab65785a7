"""Full-head DSA scores over per-query candidate keys, in TileLang: MISA†'s re-rank and HISA's token stage.

    out[n, c] = Σ_j w[n, j] · ReLU(q[n, j] · k[b(n), pos[n, c]])

Each query has its own candidates, so a CTA takes one query: its H head vectors stay in shared memory while the
candidate keys are gathered tile by tile (from L2: the key cache of one sequence is tens of MiB at most) and
multiplied on the tensor cores. The gathered [C, D] keys are never written to memory, unlike a PyTorch gather.
"""

# No `from __future__ import annotations`: TileLang evaluates the T.Tensor annotations.

import functools

import tilelang
import tilelang.language as T

from .common import compile_target


@functools.lru_cache(maxsize=None)
def build_gathered_logits(heads: int, dim: int, tile: int = 64, threads: int = 128,
                          arch: str | None = None):
    """Compiles the candidate-scoring program for `heads` heads of width `dim`; cached per shape."""
    target = compile_target(arch)

    @tilelang.jit(target=target, out_idx=[-1])
    def program():
        queries, batch, num_keys, candidates = (T.dynamic("queries"), T.dynamic("batch"), T.dynamic("num_keys"),
                                                T.dynamic("candidates"))

        @T.prim_func
        def gathered_logits(
            Q: T.Tensor((queries, heads, dim), T.bfloat16),
            K: T.Tensor((batch, num_keys, dim), T.bfloat16),
            W: T.Tensor((queries, heads), T.float32),
            Pos: T.Tensor((queries, candidates), T.int32),
            Row: T.Tensor((queries,), T.int32),  # which sequence of the batch each query belongs to
            Out: T.Tensor((queries, candidates), T.float32),
        ):
            with T.Kernel(queries, threads=threads) as n:
                q_shared = T.alloc_shared((heads, dim), T.bfloat16)
                k_shared = T.alloc_shared((tile, dim), T.bfloat16)
                scores = T.alloc_fragment((tile, heads), T.float32)
                logits = T.alloc_fragment((tile,), T.float32)
                weights = T.alloc_fragment((heads,), T.float32)
                positions = T.alloc_shared((tile,), T.int32)
                seq = Row[n]

                T.copy(Q[n, :, :], q_shared)
                T.copy(W[n, :], weights)
                for step in T.serial(T.ceildiv(candidates, tile)):  # latency hidden by several CTAs per SM
                    for i in T.Parallel(tile):
                        positions[i] = Pos[n, T.min(step * tile + i, candidates - 1)]
                    for i, d in T.Parallel(tile, dim):
                        k_shared[i, d] = K[seq, positions[i], d]
                    T.gemm(k_shared, q_shared, scores, transpose_B=True, clear_accum=True,
                           policy=T.GemmWarpPolicy.FullCol)
                    for i, j in T.Parallel(tile, heads):
                        scores[i, j] = T.max(scores[i, j], 0.0) * weights[j]
                    T.reduce_sum(scores, logits, dim=1, clear=True)
                    for i in T.Parallel(tile):
                        if step * tile + i < candidates:
                            Out[n, step * tile + i] = logits[i]

        return gathered_logits

    return program
