"""Weighted-ReLU indexer logits, the heavy stage of DSA and MISA, in TileLang.

    logits[b, t, s] = Σ_j w[b, t, j] · ReLU(q[b, t, j] · k[b, s])     for ks[b, t] <= s < ke[b, t], else -inf

`q` holds `heads` query vectors per token: all H heads for DSA (the DSA-64 baseline kernel), or each token's
own routed heads (gathered beforehand) for MISA; one program serves both, so the comparison is like for like.
A CTA takes `block_q` tokens (block_q · heads query rows, 128 by default, one wgmma N), streams the key
cache in `block_n`-token tiles, multiplies on the tensor cores (bf16 in, fp32 accumulate), and fuses ReLU, the head
weights and the head sum before writing one fp32 logit per (t, s). Two drivers run the same per-tile epilogue:
TileLang's software pipeline, or (`overlapped`) a producer warpgroup feeding key tiles through TMA stages to
consumers with two accumulators, so that each tile's epilogue runs while the next tile's wgmma is in flight.
Key tiles past the block's last visible key are not computed at all (causal skip); they are written as -inf,
unless `fill_future=False`: then they are left unwritten, for a top-k that reads each row only up to its end.
`key_splits` > 1 also splits the key tiles over that many CTAs: a decode step has too few queries to fill the
GPU otherwise (32 sequences x 1 query would stream their caches on 32 of 132 SMs).

`capacity` > 0 builds the candidate variant instead: nothing dense is written; each query keeps only the logits at
or above its threshold Theta[b, t] as (value, key) pairs in its own `capacity`-slot list, and Count[b, t, j] says
how many passed in segment j. A top-k then reads thousands of candidates per query instead of the whole row (see
`ops.threshold`).
Each tile's logits are staged in shared memory; then every consumer thread scans its own (query, key residue
modulo `segments`) share of the tile and appends the passing keys to its own segment of the query's list, with the
counter in a register: no atomics, and few instructions per logit (a first version appended through a shared-memory
atomic counter straight from the accumulator layout and cost more than the dense stores it replaced). A segment
that fills up is reported by its count (Count[b, t, j] > capacity / segments) and sends the query back to the
dense path.
"""

# No `from __future__ import annotations`: TileLang evaluates the T.Tensor annotations.

import functools

import tilelang
import tilelang.language as T

from .common import ROWS_PER_CTA, compile_target, queries_per_cta


def interleaved_query_head(row, heads: int, rows_per_cta: int = ROWS_PER_CTA):
    """(query within the CTA's block, head) that query row `row` holds in the interleaved layout.

    Each of the two consumer warpgroups multiplies G = rows_per_cta / 2 query rows (wgmma N = G); its accumulator gives
    a thread the columns 8j + 2m + e (j < G / 8, e < 2) of its G, m being the thread's lane % 4. The interleaved layout
    puts all heads of a query in those G / 4 columns of one thread, so the head sum is register adds: no shuffles, and
    every logit is stored by one thread (the plain layout, row = query * heads + head, splits a query's 8 heads over
    4 lanes). Works on ints, torch tensors and TileLang expressions alike, so the host's row permutation and the
    kernel read the same formula.
    """
    group = rows_per_cta // 2
    within = 2 * ((row % group) // 8) + row % 2  # position among the thread's G / 4 columns
    query = (row // group) * (group // heads) + (within // heads) * 4 + (row // 2) % 4
    return query, within % heads


def can_interleave(heads: int, rows_per_cta: int = ROWS_PER_CTA, threads: int = 256) -> bool:
    """Whether the interleaved layout applies: two consumer warpgroups of 64 or 128 query rows, whole queries per
    thread (heads dividing the G / 4 columns a thread holds)."""
    return rows_per_cta in (128, 256) and threads == 256 and heads % 2 == 0 and (rows_per_cta // 8) % heads == 0


def stages_stores(heads: int) -> bool:
    """Whether the program for `heads` heads writes its logits through shared memory (see `staged_stores`)."""
    return queries_per_cta(heads) >= 8  # 16 heads or fewer: a key tile carries 8+ queries' logits


@functools.lru_cache(maxsize=None)
def build_weighted_relu_logits(heads: int, dim: int, block_n: int = 128, num_stages: int = 2,
                               threads: int = 256, key_splits: int = 1, fill_future: bool = True,
                               staged_stores: bool | None = None, rows_per_cta: int = ROWS_PER_CTA,
                               fp8: bool = False, capacity: int = 0, interleaved: bool = False,
                               overlapped: bool = False, explicit_wgmma_wait: bool = True, store_buffers: int = 1,
                               longest_first: bool = False, arch: str | None = None):
    """Compiles the logits program for `heads` query rows per token of width `dim`; cached per shape.

    `staged_stores` (default: for 16 heads or fewer) writes each tile's logits through shared memory with one bulk
    (TMA) store instead of scattered per-thread stores: with few heads a tile holds many queries' logits, and the
    stores, not the matmul, set the pace. Its callers keep num_keys a multiple of 4 (a TMA row stride is a multiple
    of 16 bytes) and num_queries · num_keys < 2^31 (the descriptor's index range).

    `rows_per_cta`: query rows (queries x heads) per CTA; its callers size the grid with the same number.
    `fp8`: q and keys come as FP8 e4m3 (the tensor cores' FP8 path, twice bf16's rate) with one fp32 scale per key,
    (Q, K, KScale, W, KS, KE): ReLU(s·x) = s·ReLU(x) for a positive scale, so each key's scale multiplies its head
    sum and each query head's scale folds into W (the caller's part).
    `capacity` > 0 (a multiple of block_n): the candidate variant (bf16, one CTA per query block), (Q, K, W, KS, KE,
    Theta, CandVal [B, S, capacity] fp32 filled with -inf by the caller) -> (CandKey [B, S, capacity] int32, Count
    [B, S, segments] int32: keys passed per segment, more than capacity / segments where it overflowed); CandVal is
    written in place; unused slots keep -inf and hold any key.
    `interleaved` (bf16, 2 to 16 heads; up to 32 in 256-row CTAs; see `interleaved_query_head`): Q's rows come
    permuted within each CTA's block of `rows_per_cta` (the caller takes it only for whole query blocks), so that the
    head sum stays in registers.
    `overlapped` (bf16 dense programs): a producer warpgroup and two accumulators instead of TileLang's pipeline, so
    that each tile's epilogue runs during the next tile's wgmma; `num_stages` key tiles in flight.
    `explicit_wgmma_wait` (overlapped): the program states the wgmma wait before each pair's second epilogue (one group
    in flight); False builds the program before 3d9922f, where ptxas injected a full wait there (C7517), for the
    sweep to time both. `store_buffers` (overlapped with staged stores): 2 alternates two shared-memory buffers for
    the tiles' logits, so a tile's bulk store may still read one while the next tile fills the other (1: each store is
    waited for before the next epilogue may start writing).
    `longest_first`: the CTAs take the query blocks last to first. In a causal prefill the last queries see the most
    keys, and the GPU starts CTAs in launch order, so the longest run first and the shortest fill the launch's last
    wave instead of leaving SMs idle while the longest finish (the same logits).
    `arch` (e.g. "sm_90a") compiles for that GPU without one present (CI); None targets the current device.
    """
    if overlapped and (fp8 or capacity):
        raise ValueError("the overlapped driver is for the bf16 dense programs (no fp8, no candidates)")
    if store_buffers not in (1, 2) or (store_buffers == 2 and not overlapped):
        raise ValueError(f"store_buffers is 1, or 2 with the overlapped driver; got {store_buffers} "
                         f"(overlapped={overlapped})")
    if capacity and (fp8 or key_splits != 1 or capacity % block_n):
        raise ValueError("the candidate variant is bf16 with key_splits=1 (its counters live in one CTA) and a "
                         f"capacity that is a multiple of block_n={block_n}")
    if interleaved and (fp8 or capacity or not can_interleave(heads, rows_per_cta, threads)):
        raise ValueError(f"the interleaved layout is for the bf16 dense programs with 256 threads and an even number "
                         f"of heads dividing rows_per_cta / 8 (128 or 256 rows per CTA); got heads={heads}, fp8={fp8}, "
                         f"capacity={capacity}, rows_per_cta={rows_per_cta}, threads={threads}")
    target = compile_target(arch)
    block_q = queries_per_cta(heads, rows_per_cta)
    rows = block_q * heads
    segments = min(block_n, threads // block_q)  # candidate variant: one consumer thread per (query, segment)
    thread_queries = rows_per_cta // 8 // heads  # interleaved: queries per thread and lane quad (see the epilogue)
    segment = capacity // segments
    if staged_stores is None:
        staged_stores = stages_stores(heads)

    @tilelang.jit(target=target, out_idx=[-2, -1] if capacity else [-1],
                  pass_configs={tilelang.PassConfigKey.TL_ENABLE_FAST_MATH: False})
    def program():
        # Symbolic sizes: one compiled kernel serves every batch, chunk and cache length.
        batch, num_queries, num_keys = T.dynamic("batch"), T.dynamic("num_queries"), T.dynamic("num_keys")
        qk_dtype = T.float8_e4m3fn if fp8 else T.bfloat16

        @T.macro
        def tile_epilogue(scores, tile, buffers):
            """One key tile's scores [block_n, rows] -> ReLU, head weights, head sum, then the tile's logits out (or
            its candidates appended): the same for both loop drivers."""
            (Logits, KScale, CandVal, CandKey, bb, q0, weights, logits, head_pairs, logits_shared, ks_local, ke_local,
             theta, appended) = buffers
            for n, r in T.Parallel(block_n, rows):
                scores[n, r] = T.max(scores[n, r], 0.0) * weights[r]
            if interleaved:  # Python-level: each (key, query) sums its heads within one thread
                # scores' column Gg + 8(qi·heads/2 + jh) + 2m + e holds head 2jh + e of query (g, qi, m)
                T.reduce_sum(T.reshape(scores, (block_n, 2, thread_queries, heads // 2, 4, 2)), head_pairs, dim=5,
                             clear=True)
                T.reduce_sum(head_pairs, T.reshape(logits, (block_n, 2, thread_queries, 4)), dim=3, clear=True)
            else:
                T.reduce_sum(T.reshape(scores, (block_n, block_q, heads)), logits, dim=-1, clear=True)
            if fp8:  # Python-level: each key's scale, after the head sum (read from global: no pipelining)
                for n, i in T.Parallel(block_n, block_q):
                    logits[n, i] = logits[n, i] * KScale[bb, T.min(tile * block_n + n, num_keys - 1)]
            if capacity:
                # Staged in shared memory, then each thread scans its own (query, key residue) segment.
                for i, n in T.Parallel(block_q, block_n):
                    logits_shared[i, n] = logits[n, i]
                for i, j in T.Parallel(block_q, segments):
                    for step_n in T.serial(block_n // segments):
                        key = tile * block_n + step_n * segments + j
                        value = logits_shared[i, step_n * segments + j]
                        if key >= ks_local[i] and key < ke_local[i] and value >= theta[i]:
                            if appended[i, j] < segment:
                                CandVal[bb, q0 + i, j * segment + appended[i, j]] = value
                                CandKey[bb, q0 + i, j * segment + appended[i, j]] = key
                            appended[i, j] = appended[i, j] + 1
            elif staged_stores:  # Python-level: one variant or the other is compiled
                # Without the interleaved layout (FP8) a query's head sum is replicated across a lane quad and one lane
                # of four stores it; TileLang 0.1.15 warns it hoists a sync out of that branch. The generated code is
                # fenced on both sides (tests/test_logits_kernel.py, `_assert_quad_stores_fenced`).
                two_buffers = store_buffers == 2  # Python-level: this tile's buffer is tile % 2
                if two_buffers:  # Python-level: the store issued from this tile's buffer two tiles ago must have
                    # read it (the other buffer's, one tile ago, may still run); only its issuing thread waits
                    T.tma_store_wait(1)
                if overlapped:  # Python-level: the previous tile's bulk store may still be reading logits_shared (its
                    # elected thread waits for that; the others wait here), which TileLang's sync pass misses when
                    # the previous epilogue ran in another branch of the pair loop
                    T.sync_threads(barrier_id=3, arrive_count=threads)
                for i, n in T.Parallel(block_q, block_n):
                    key = tile * block_n + n
                    T.buffer_store(logits_shared, T.if_then_else(key >= ks_local[i] and key < ke_local[i],
                                                                 logits[n, i], -T.infinity(T.float32)),
                                   [tile % 2, i, n] if two_buffers else [i, n])
                # Rows past num_queries and columns past num_keys fall outside the tensor: the TMA store clips them.
                target = Logits[bb, q0 : q0 + block_q, tile * block_n : (tile + 1) * block_n]
                if two_buffers:  # Python-level: the bulk store issued, not waited for
                    T.fence_proxy_async()  # the generic-proxy writes, before the bulk store (async proxy) reads them
                    T.sync_threads(barrier_id=3, arrive_count=threads)
                    T.tma_copy(logits_shared[tile % 2, :, :], target)
                else:
                    T.copy(logits_shared, target)
            else:
                for i, n in T.Parallel(block_q, block_n):
                    key = tile * block_n + n
                    if q0 + i < num_queries and key < num_keys:
                        Logits[bb, q0 + i, key] = T.if_then_else(key >= ks_local[i] and key < ke_local[i],
                                                                 logits[n, i], -T.infinity(T.float32))

        @T.macro
        def load_query_block(W, KS, KE, Theta, bb, q0, weights, ks_local, ke_local, theta, appended):
            """The block's head weights, key ranges (and candidate thresholds) into the consumers' fragments."""
            for r in T.Parallel(rows):
                query, head = (interleaved_query_head(r, heads, rows_per_cta) if interleaved
                               else (r // heads, r % heads))
                weights[r] = T.if_then_else(q0 + query < num_queries,
                                            W[bb, T.min(q0 + query, num_queries - 1), head], 0.0)
            for i in T.Parallel(block_q):
                ks_local[i] = T.if_then_else(q0 + i < num_queries, KS[bb, T.min(q0 + i, num_queries - 1)], 0)
                ke_local[i] = T.if_then_else(q0 + i < num_queries, KE[bb, T.min(q0 + i, num_queries - 1)], 0)
            if capacity:  # Python-level: the candidate variant's thresholds and per-segment counters
                for i, j in T.Parallel(block_q, segments):
                    theta[i] = Theta[bb, T.min(q0 + i, num_queries - 1)]
                    appended[i, j] = 0

        @T.macro
        def finish(Logits, Count, bb, q0, appended, live_tiles, first_tile, last_tile):
            """After the tiles: the candidate counts, or -inf over the tiles past the block's last visible key."""
            if capacity:
                for i, j in T.Parallel(block_q, segments):  # more than `segment`: the segment overflowed
                    if q0 + i < num_queries:
                        Count[bb, q0 + i, j] = appended[i, j]
            elif fill_future:  # masked without computing anything
                for tile in T.serial(T.max(live_tiles, first_tile), last_tile):
                    for i, n in T.Parallel(block_q, block_n):
                        key = tile * block_n + n
                        if q0 + i < num_queries and key < num_keys:
                            Logits[bb, q0 + i, key] = -T.infinity(T.float32)

        @T.macro
        def issue(scores, step, k_shared, q_shared, full):
            """Overlapped driver: waits for the step's key tile and issues its wgmma without waiting for it."""
            T.barrier_wait(full[step % num_stages], (step // num_stages) & 1)
            T.wgmma_gemm(k_shared[step % num_stages, :, :], q_shared, scores, transpose_B=True, clear_accum=True,
                         policy=T.GemmWarpPolicy.FullCol)

        @T.macro
        def retire(scores, step, empty):
            """Overlapped driver: waits for the step's wgmma (its accumulator readable from here on) and hands the
            stage back to the producer."""
            T.wait_wgmma(0)
            # Keeps nvcc from hoisting reads of the accumulator above the wait. The count is the thread's registers:
            # left to TileLang it is the whole fragment's shape (block_n * rows), past this accumulator.
            if explicit_wgmma_wait:  # Python-level
                T.warpgroup_fence_operand(scores, num_regs=block_n * rows // threads)
            else:
                T.warpgroup_fence_operand(scores)
            T.barrier_arrive(empty[step % num_stages])

        @T.macro
        def logits_body(Q, K, KScale, W, KS, KE, Logits, Theta=None, CandVal=None, CandKey=None, Count=None):
            cta_threads = threads + 128 if overlapped else threads  # overlapped: plus the producer warpgroup
            with T.Kernel(T.ceildiv(num_queries, block_q), batch, key_splits, threads=cta_threads) as (bq, bb, split):
                q_shared = T.alloc_shared((rows, dim), qk_dtype)
                scores = T.alloc_fragment((block_n, rows), T.float32)
                logits = T.alloc_fragment((block_n, block_q), T.float32)
                logits_shared = T.alloc_shared(((store_buffers,) if store_buffers > 1 else ()) + (block_q, block_n),
                                               T.float32)
                # the head sum's first step (pairs of heads in adjacent columns)
                head_pairs = (T.alloc_fragment((block_n, 2, thread_queries, heads // 2, 4), T.float32)
                              if interleaved else None)
                weights = T.alloc_fragment((rows,), T.float32)
                ks_local = T.alloc_fragment((block_q,), T.int32)
                ke_local = T.alloc_fragment((block_q,), T.int32)
                theta = T.alloc_fragment((block_q,), T.float32) if capacity else None
                appended = T.alloc_fragment((block_q, segments), T.int32) if capacity else None  # one per thread
                ke_max = T.alloc_var(T.int32)
                q0 = ((T.ceildiv(num_queries, block_q) - 1 - bq) if longest_first else bq) * block_q
                buffers = (Logits, KScale, CandVal, CandKey, bb, q0, weights, logits, head_pairs, logits_shared,
                           ks_local, ke_local, theta, appended)
                ke_max = 0
                for i in T.serial(block_q):
                    ke_max = T.max(ke_max, T.if_then_else(q0 + i < num_queries,
                                                          KE[bb, T.min(q0 + i, num_queries - 1)], 0))
                live_tiles = T.ceildiv(ke_max, block_n)
                # This CTA's share of the key tiles: [first_tile, first_tile + tiles_per_split).
                tiles_per_split = T.ceildiv(T.ceildiv(num_keys, block_n), key_splits)
                first_tile = split * tiles_per_split
                last_tile = T.min(first_tile + tiles_per_split, T.ceildiv(num_keys, block_n))
                steps = T.max(T.min(live_tiles, last_tile) - first_tile, 0)

                if not overlapped:  # Python-level: TileLang's pipeline, each tile's epilogue after its wgmma
                    k_shared = T.alloc_shared((block_n, dim), qk_dtype)
                    T.copy(Q[bb, q0 * heads : q0 * heads + rows, :], q_shared)
                    load_query_block(W, KS, KE, Theta, bb, q0, weights, ks_local, ke_local, theta, appended)
                    for step in T.Pipelined(steps, num_stages=num_stages):
                        tile = first_tile + step
                        T.copy(K[bb, tile * block_n : (tile + 1) * block_n, :], k_shared)
                        T.gemm(k_shared, q_shared, scores, transpose_B=True, clear_accum=True,
                               policy=T.GemmWarpPolicy.FullCol)
                        tile_epilogue(scores, tile, buffers)
                    finish(Logits, Count, bb, q0, appended, live_tiles, first_tile, last_tile)
                else:
                    # A producer warpgroup streams the key tiles through `num_stages` shared-memory stages (TMA,
                    # mbarriers); the consumers keep two accumulators, so that tile t+1's wgmma is in flight during
                    # tile t's epilogue (the pipelined driver leaves the tensor cores idle during every epilogue).
                    k_shared = T.alloc_shared((num_stages, block_n, dim), qk_dtype)
                    scores_b = T.alloc_fragment((block_n, rows), T.float32)
                    q_ready = T.alloc_barrier([1])
                    full = T.alloc_barrier([1] * num_stages)
                    empty = T.alloc_barrier([threads] * num_stages)
                    tx = T.get_thread_binding()
                    if tx >= threads:  # the producer
                        T.set_max_nreg(40, 0)
                        T.tma_copy(Q[bb, q0 * heads : q0 * heads + rows, :], q_shared, barrier=q_ready[0])
                        if tx == threads:
                            T.barrier_arrive(q_ready[0])
                        for step in T.serial(steps):
                            tile = first_tile + step
                            T.barrier_wait(empty[step % num_stages], ((step // num_stages) & 1) ^ 1)
                            T.tma_copy(K[bb, tile * block_n : (tile + 1) * block_n, :],
                                       k_shared[step % num_stages, :, :], barrier=full[step % num_stages])
                            if tx == threads:
                                T.barrier_arrive(full[step % num_stages])
                    else:
                        T.set_max_nreg(232, 1)
                        load_query_block(W, KS, KE, Theta, bb, q0, weights, ks_local, ke_local, theta, appended)
                        T.clear(scores_b)  # read only from the second pair on; cleared so that no path reads it unset
                        T.barrier_wait(q_ready[0], 0)
                        # Steps in pairs (a, b): b's wgmma runs during a's epilogue, the next a's during b's.
                        for pair in T.serial(T.ceildiv(steps, 2)):
                            issue(scores, 2 * pair, k_shared, q_shared, full)
                            if pair > 0:
                                # b's group is complete (retired last pair); saying so keeps ptxas from injecting a
                                # full wait here (C7517: it does not carry the retire across the loop's back edge),
                                # which would hold this epilogue until a's wgmma had finished: no overlap
                                if explicit_wgmma_wait:  # Python-level
                                    T.wait_wgmma(1)
                                tile_epilogue(scores_b, first_tile + 2 * pair - 1, buffers)
                            retire(scores, 2 * pair, empty)
                            if 2 * pair + 1 < steps:
                                issue(scores_b, 2 * pair + 1, k_shared, q_shared, full)
                                tile_epilogue(scores, first_tile + 2 * pair, buffers)
                                retire(scores_b, 2 * pair + 1, empty)
                            else:
                                tile_epilogue(scores, first_tile + 2 * pair, buffers)
                        if steps > 0 and steps % 2 == 0:
                            tile_epilogue(scores_b, first_tile + steps - 1, buffers)
                        if staged_stores and store_buffers == 2:  # Python-level: no CTA exits with a store reading
                            T.tma_store_wait(0)
                        finish(Logits, Count, bb, q0, appended, live_tiles, first_tile, last_tile)

        if capacity:
            @T.prim_func
            def weighted_relu_candidates(
                Q: T.Tensor((batch, num_queries * heads, dim), T.bfloat16),
                K: T.Tensor((batch, num_keys, dim), T.bfloat16),
                W: T.Tensor((batch, num_queries, heads), T.float32),
                KS: T.Tensor((batch, num_queries), T.int32),
                KE: T.Tensor((batch, num_queries), T.int32),
                Theta: T.Tensor((batch, num_queries), T.float32),
                CandVal: T.Tensor((batch, num_queries, capacity), T.float32),
                CandKey: T.Tensor((batch, num_queries, capacity), T.int32),
                Count: T.Tensor((batch, num_queries, segments), T.int32),
            ):
                logits_body(Q, K, None, W, KS, KE, None, Theta, CandVal, CandKey, Count)

            return weighted_relu_candidates
        if fp8:
            @T.prim_func
            def weighted_relu_logits(
                Q: T.Tensor((batch, num_queries * heads, dim), T.float8_e4m3fn),
                K: T.Tensor((batch, num_keys, dim), T.float8_e4m3fn),
                KScale: T.Tensor((batch, num_keys), T.float32),
                W: T.Tensor((batch, num_queries, heads), T.float32),
                KS: T.Tensor((batch, num_queries), T.int32),
                KE: T.Tensor((batch, num_queries), T.int32),
                Logits: T.Tensor((batch, num_queries, num_keys), T.float32),
            ):
                logits_body(Q, K, KScale, W, KS, KE, Logits)
        else:
            @T.prim_func
            def weighted_relu_logits(
                Q: T.Tensor((batch, num_queries * heads, dim), T.bfloat16),
                K: T.Tensor((batch, num_keys, dim), T.bfloat16),
                W: T.Tensor((batch, num_queries, heads), T.float32),
                KS: T.Tensor((batch, num_queries), T.int32),
                KE: T.Tensor((batch, num_queries), T.int32),
                Logits: T.Tensor((batch, num_queries, num_keys), T.float32),
            ):
                logits_body(Q, K, None, W, KS, KE, Logits)

        return weighted_relu_logits

    return program
