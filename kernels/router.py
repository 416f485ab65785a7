"""MISA's router in TileLang: per-head block-level importance, one pass over the pooled keys.

    importance[b, t, j] = |w[b, t, j]| · Σ_{m visible to t} ReLU(q[b, t, j] · k̄[b, m])

A block m is visible to query t when it overlaps t's visible keys [ks, ke). A CTA takes `128 / heads` queries
(all their heads: 128 query rows, the matmuls' M; `rows_as_m`), streams the pooled keys in tiles and adds each tile's
masked ReLU scores into a register accumulator of the tile's shape, reduced over the blocks once at the end rather
than with a cross-thread reduction per tile: the [S, H, M] block-score tensor is never written.

`active_heads` > 0 builds the whole routing step instead (what `ops.reference.route_queries` does in ~30 small
launches, a decode step's largest cost after the logits): the full blocks as above, plus each query's partly
visible last block (`ops.blocks.TailBlock`) — ReLU of the mean of q·k over the block's visible keys, i.e. q against
the tail's mean key — then each query's `active_heads` most important heads (ties to the lowest head, ascending),
and their query rows and weights written out ready for the token logits. The tail comes either straight from the key
cache (a decode step's few queries) or, with `tail_means`, as each query's mean tail key computed beforehand
(`tail_means.build_causal_tail_means`, for a causal prefill chunk: one small matmul per CTA instead of loading and
multiplying up to a block of keys tile by tile, which TileLang 0.1.15 would not pipeline).

Tiles of pooled blocks that every query of the CTA sees whole skip the per-score visibility test (with
`split_tiles`): for a causal prefill that is all tiles but the last. On an H200 (sweep_router-20261203-132328, 64K
causal prefill, the wide prefill CTAs) the routing program took 2.22 ms testing every tile, 1.78 with whole tiles,
1.53 with whole tiles and tail means.
"""

# No `from __future__ import annotations`: TileLang evaluates the T.Tensor annotations.

import functools

import tilelang
import tilelang.language as T

from .common import ROWS_PER_CTA, compile_target, queries_per_cta


def _tail_block(ks, ke, block_size: int):
    """(first key of the block holding key ke - 1, whether the query seeing keys [ks, ke) sees only part of that block:
    then it is the query's tail block) as TileLang expressions."""
    start = ke // block_size * block_size
    return start, T.And(ke > start, ke > ks)


def _full_blocks(ks, ke, block_size: int, routing: bool):
    """(first block, end block) of the pooled blocks a query seeing keys [ks, ke) sums; with `routing` (Python-level)
    only its full blocks, ending where its tail block starts (the routing program adds the tail on its own)."""
    full_end = ke
    if routing:
        start, has_tail = _tail_block(ks, ke, block_size)
        full_end = T.if_then_else(has_tail, start, ke)
    return ks // block_size, T.if_then_else(full_end > ks, T.ceildiv(full_end, block_size), 0)


@functools.lru_cache(maxsize=None)
def build_head_importance(heads: int, dim: int, block_size: int, active_heads: int = 0, block_m: int = 64,
                          num_stages: int = 2, threads: int = 256, rows_per_cta: int = ROWS_PER_CTA,
                          min_ctas_per_sm: int = 0, tail_means: bool = False, split_tiles: bool = True,
                          rows_as_m: bool = True, reduce_per_tile: bool = False, arch: str | None = None):
    """Compiles the router program for `heads` heads of width `dim` over keys pooled by `block_size`.

    Shape: `rows_per_cta` query rows (whole queries, at most 256: one wgmma N) per CTA of `threads`; pooled-key
    tiles of `block_m` blocks in a `num_stages` pipeline. `min_ctas_per_sm` > 0 caps the registers so that this many
    CTAs share an SM (0: the compiler's choice).

    (Q [B, S·H, D] bf16, Pooled [B, M, D] bf16, W [B, S, H] fp32, KS, KE [B, S] int32) -> Importance [B, S, H] fp32
    (without the softmax scale); the caller passes the full blocks' end as KE and adds the tail block itself.
    `active_heads` > 0: the routing program, (Q, Pooled, Keys [B, T, D] bf16, W, HeadScale [H] fp32, KS, KE) ->
    (QRouted [B, S·A, D] bf16, WRouted [B, S, A] fp32, Heads [B, S, A] int32, Importance [B, S, H] fp32 with the
    tail and HeadScale, without the softmax scale), A = active_heads.
    `tail_means` (routing only): TailMeans [B, S, D] bf16, each query's mean tail key (`TailBlock.means`, zero where
    it has none), in the place of Keys.
    `split_tiles`: fully visible tiles of pooled blocks skip the visibility test (False: every tile tests it).
    `rows_as_m`: the query rows are the matmuls' M and the pooled blocks their N (scores [rows, block_m]): wgmma for
    any block_m, and each row's block sum within a thread's registers and its lane quad. False: the blocks are M
    (scores [block_m, rows]), the program before, which for block_m < 64 (the wide prefill shape) lowers to mma.sync.
    H200, sweep_router-20261203-221219.json, routing a causal prefill, rows as M against blocks as M: wide shape with
    tail means 0.42 / 1.08 / 3.34 ms against 0.53 / 1.51 / 4.88 at 32K / 64K / 128K; default shape 1.94 against 3.45
    at 64K; a decode step (batch 32 x 4 queries, 128K) 0.033 against 0.035.
    `reduce_per_tile`: each tile's ReLU scores are summed over its blocks at once (within each row's lane quad with
    rows as M) into the row's total, instead of into a running [rows, block_m] sum reduced once at the end: a fragment
    of registers less (the wide prefill shape's few spills gone). H200, sweep_router-20261204-093250.json, routing a
    causal prefill in the wide shape: 0.412 / 1.022 / 3.120 ms against 0.440 / 1.148 / 3.402 at 32K / 64K / 128K.
    A causal prefill's router time fits ~0.63 ms of per-CTA cost plus ~0.40 ms of tiles at 64K (that sweep's 32K / 64K
    times as CTAs x (fixed + tiles x per tile); 10% under its 128K time), so the CTA's fixed steps are most of it.
    Tried and not kept (that sweep): the query rows copied once into registers (wgmma reading A from registers): 1.49
    ms at 64K in 128-row CTAs (two per SM), and wrong heads picked in the wide CTAs (two consumer warpgroups; not
    investigated further). The head pick's inputs (each row's weight and head scale) in shared memory before the tiles
    and its loops over a query's heads unrolled (`fast_pick`, measured and removed): routing alone
    0.389 / 1.010 / 3.150 ms against 0.455 / 1.026 / 3.066 at 32K / 64K / 128K (sweep_router-20261204-121937.json),
    the indexer's router stage 0.40 / 1.07 / 3.62 against 0.39 / 1.08 / 3.63 (bench_indexer-20261204-121957.json).
    """
    if not 0 <= active_heads <= heads:
        raise ValueError(f"active_heads must lie in [0, heads={heads}], got {active_heads}")
    if tail_means and not active_heads:
        raise ValueError("tail_means is an input of the routing program (active_heads > 0)")
    target = compile_target(arch)
    block_q = queries_per_cta(heads, rows_per_cta)
    rows = block_q * heads
    if rows > 256:  # rows as N: one wgmma N; rows as M: kept to the same CTAs (not measured beyond)
        raise ValueError(f"a router CTA holds at most 256 query rows (one wgmma N), got {rows} ({heads} heads)")
    routing = active_heads > 0
    unset = 2**30  # the start of a running minimum (tail_lo of a CTA none of whose queries has a tail block)

    score_shape = (rows, block_m) if rows_as_m else (block_m, rows)
    block_axis = 1 if rows_as_m else 0  # the axis of `scores` and `running` that the sums run over

    def block_and_row(first, second):
        """The loop variables over `score_shape`, in its order -> (block m, query row r)."""
        return (second, first) if rows_as_m else (first, second)

    def cell(m, r):
        """(block m, query row r) -> its index in `scores` and `running`."""
        return (r, m) if rows_as_m else (m, r)

    @tilelang.jit(target=target, out_idx=[-4, -3, -2, -1] if routing else [-1])
    def program():
        batch, num_queries, num_blocks = T.dynamic("batch"), T.dynamic("num_queries"), T.dynamic("num_blocks")
        num_keys = T.dynamic("num_keys")

        @T.macro
        def score_matmul(keys_shared, q_shared, scores):
            """scores = the CTA's query rows against `block_m` keys (pooled blocks, tail keys or tail means), in the
            orientation `rows_as_m` chose."""
            if rows_as_m:  # Python-level
                T.gemm(q_shared, keys_shared, scores, transpose_B=True, clear_accum=True,
                       policy=T.GemmWarpPolicy.FullRow)
            else:
                T.gemm(keys_shared, q_shared, scores, transpose_B=True, clear_accum=True,
                       policy=T.GemmWarpPolicy.FullCol)

        def take(scores, running, m, r, value):
            """One masked score: added to its slot of `running` (reduced after the last tile), or with
            `reduce_per_tile` left in `scores` for `add_row_sums`. A plain function, not a macro: the value goes in
            as an expression, not a bound variable (the same program as before `reduce_per_tile` existed)."""
            if reduce_per_tile:
                T.buffer_store(scores, value, list(cell(m, r)))
            else:
                T.buffer_store(running, running[cell(m, r)] + value, list(cell(m, r)))

        @T.macro
        def add_row_sums(scores, partial, sums):
            """With `reduce_per_tile`: sums[r] += the tile's scores summed over its blocks (else nothing here)."""
            if reduce_per_tile:  # Python-level
                T.reduce_sum(scores, partial, dim=block_axis, clear=True)
                for r in T.Parallel(rows):
                    sums[r] += partial[r]

        @T.macro
        def pooled_tile(Pooled, bb, tile, p_shared, q_shared, scores, running, partial, total, first_block, end_block,
                        tested):
            """One tile of pooled blocks: ReLU scores added to the rows' sums (`take`), each tested against its row's
            visible blocks where `tested` (a condition, or True at Python level), else all of them (a tile every row of
            the CTA sees whole)."""
            T.copy(Pooled[bb, tile * block_m : (tile + 1) * block_m, :], p_shared)
            score_matmul(p_shared, q_shared, scores)
            if tested:
                for first, second in T.Parallel(*score_shape):
                    m, r = block_and_row(first, second)
                    block = tile * block_m + m
                    take(scores, running, m, r, T.if_then_else(block >= first_block[r] and block < end_block[r],
                                                               T.max(scores[cell(m, r)], 0.0), 0.0))
            else:
                for first, second in T.Parallel(*score_shape):
                    m, r = block_and_row(first, second)
                    take(scores, running, m, r, T.max(scores[cell(m, r)], 0.0))
            add_row_sums(scores, partial, total)

        @T.macro
        def body(Q, Pooled, Keys, W, HeadScale, KS, KE, Importance, QRouted=None, WRouted=None, Heads=None):
            with T.Kernel(T.ceildiv(num_queries, block_q), batch, threads=threads) as (bq, bb):
                if min_ctas_per_sm:  # Python-level
                    T.annotate_min_blocks_per_sm(min_ctas_per_sm)
                q_shared = T.alloc_shared((rows, dim), T.bfloat16)
                p_shared = T.alloc_shared((block_m, dim), T.bfloat16)
                scores = T.alloc_fragment(score_shape, T.float32)
                # per-slot sums reduced once at the end, or (reduce_per_tile) each tile's row sums
                running = None if reduce_per_tile else T.alloc_fragment(score_shape, T.float32)
                partial = T.alloc_fragment((rows,), T.float32) if reduce_per_tile else None
                total = T.alloc_fragment((rows,), T.float32)
                first_block = T.alloc_fragment((rows,), T.int32)
                end_block = T.alloc_fragment((rows,), T.int32)
                last_end = None if split_tiles else T.alloc_var(T.int32)  # the tiles' end, every tile tested
                if split_tiles:  # Python-level: the CTA's lowest / highest first block and end of full blocks
                    first_lo = T.alloc_var(T.int32)
                    first_hi = T.alloc_var(T.int32)
                    end_lo = T.alloc_var(T.int32)
                    end_hi = T.alloc_var(T.int32)
                q0 = bq * block_q
                if routing:  # Python-level: the tail block and the head pick
                    k_shared = T.alloc_shared((block_m, dim), T.bfloat16)  # tail keys, or the queries' tail means
                    tail_sum = T.alloc_fragment((rows,), T.float32)
                    tail_first = None if tail_means else T.alloc_fragment((rows,), T.int32)
                    tail_end = None if tail_means else T.alloc_fragment((rows,), T.int32)
                    rank = T.alloc_fragment((rows,), T.int32)
                    importance = T.alloc_shared((rows,), T.float32)
                    chosen = T.alloc_shared((rows,), T.int32)
                    source_row = T.alloc_shared((block_q * active_heads,), T.int32)
                    tail_lo = T.alloc_var(T.int32)
                    tail_hi = T.alloc_var(T.int32)

                T.copy(Q[bb, q0 * heads : q0 * heads + rows, :], q_shared)
                for r in T.Parallel(rows):
                    query = T.min(q0 + r // heads, num_queries - 1)
                    ks, ke = KS[bb, query], KE[bb, query]
                    if routing and not tail_means:  # Python-level: the tail's keys, read from the cache below
                        start, has_tail = _tail_block(ks, ke, block_size)
                        tail_first[r] = T.if_then_else(has_tail, T.max(ks, start), 0)
                        tail_end[r] = T.if_then_else(has_tail, ke, 0)
                    first, end = _full_blocks(ks, ke, block_size, routing)
                    first_block[r] = first
                    end_block[r] = end
                T.clear(total if reduce_per_tile else running)
                if not split_tiles:  # Python-level
                    last_end = 0
                if split_tiles:  # Python-level
                    first_lo = unset
                    first_hi = 0
                    end_lo = unset
                    end_hi = 0
                if routing and not tail_means:
                    tail_lo = unset
                    tail_hi = 0
                for i in T.serial(block_q):
                    query = T.min(q0 + i, num_queries - 1)
                    ks, ke = KS[bb, query], KE[bb, query]
                    if not split_tiles:  # Python-level
                        last_end = T.max(last_end, T.ceildiv(ke, block_size))
                    if routing and not tail_means:  # Python-level: the key range holding the CTA's tail blocks
                        start, has_tail = _tail_block(ks, ke, block_size)
                        if has_tail:
                            tail_lo = T.min(tail_lo, start)
                            tail_hi = T.max(tail_hi, ke)
                    if split_tiles:  # Python-level: the blocks every query sees (none if one sees no full block)
                        first, end = _full_blocks(ks, ke, block_size, routing)
                        first_lo = T.min(first_lo, first)
                        first_hi = T.max(first_hi, first)
                        end_lo = T.min(end_lo, end)
                        end_hi = T.max(end_hi, end)

                if split_tiles:  # Python-level
                    # tiles [whole_from, whole_to) hold only blocks every row sees; the others test each score
                    lead = first_lo // block_m
                    whole_from = T.max(T.ceildiv(first_hi, block_m), lead)
                    whole_to = T.max(end_lo // block_m, whole_from)
                    for tile in T.Pipelined(lead, T.max(T.ceildiv(end_hi, block_m), whole_to), num_stages=num_stages):
                        pooled_tile(Pooled, bb, tile, p_shared, q_shared, scores, running, partial, total, first_block,
                                    end_block, T.Or(tile < whole_from, tile >= whole_to))
                else:
                    for tile in T.Pipelined(T.ceildiv(last_end, block_m), num_stages=num_stages):
                        pooled_tile(Pooled, bb, tile, p_shared, q_shared, scores, running, partial, total, first_block,
                                    end_block, True)
                if not reduce_per_tile:  # Python-level
                    T.reduce_sum(running, total, dim=block_axis, clear=True)

                if not routing:
                    for r in T.Parallel(rows):
                        if q0 + r // heads < num_queries:
                            Importance[bb, q0 + r // heads, r % heads] = total[r] * T.abs(
                                W[bb, q0 + r // heads, r % heads])
                else:
                    T.clear(tail_sum if reduce_per_tile else running)
                    if tail_means:  # Python-level: the CTA's queries' mean tail keys, one matmul per block_m queries
                        for part in range(-(-block_q // block_m)):
                            for m, d in T.Parallel(block_m, dim):
                                query = q0 + part * block_m + m
                                k_shared[m, d] = T.if_then_else(
                                    part * block_m + m < block_q and query < num_queries,
                                    Keys[bb, T.min(query, num_queries - 1), d], T.cast(0, T.bfloat16))
                            score_matmul(k_shared, q_shared, scores)
                            for first, second in T.Parallel(*score_shape):
                                m, r = block_and_row(first, second)
                                take(scores, running, m, r,
                                     T.if_then_else(part * block_m + m == r // heads, scores[cell(m, r)], 0.0))
                            add_row_sums(scores, partial, tail_sum)
                    else:
                        # q·k summed over each row's visible keys of its last block (ReLU of the mean after).
                        for tile in T.serial(T.ceildiv(T.max(tail_hi - tail_lo, 0), block_m)):
                            T.copy(Keys[bb, tail_lo + tile * block_m : tail_lo + (tile + 1) * block_m, :], k_shared)
                            score_matmul(k_shared, q_shared, scores)
                            for first, second in T.Parallel(*score_shape):
                                m, r = block_and_row(first, second)
                                key = tail_lo + tile * block_m + m
                                take(scores, running, m, r,
                                     T.if_then_else(key >= tail_first[r] and key < tail_end[r], scores[cell(m, r)],
                                                    0.0))
                            add_row_sums(scores, partial, tail_sum)
                    if not reduce_per_tile:  # Python-level
                        T.reduce_sum(running, tail_sum, dim=block_axis, clear=True)
                    for r in T.Parallel(rows):
                        query = T.min(q0 + r // heads, num_queries - 1)
                        if tail_means:  # Python-level: zero means where a query has no tail
                            tail = T.max(tail_sum[r], 0.0)
                        else:
                            count = tail_end[r] - tail_first[r]
                            tail = T.if_then_else(count > 0, T.max(tail_sum[r] / T.max(count, 1), 0.0), 0.0)
                        importance[r] = (total[r] + tail) * T.abs(W[bb, query, r % heads]) * HeadScale[r % heads]
                    # Rank of each head within its query (ties to the lowest head): the top `active_heads` are kept,
                    # and each kept head's slot is its rank among the kept heads by head index (ascending).
                    for r in T.Parallel(rows):
                        rank[r] = 0
                        for other in T.serial(heads):
                            value = importance[r // heads * heads + other]
                            rank[r] += T.if_then_else(
                                value > importance[r] or (value == importance[r] and other < r % heads), 1, 0)
                        chosen[r] = T.if_then_else(rank[r] < active_heads, 1, 0)
                    for r in T.Parallel(rows):
                        if chosen[r] == 1:
                            rank[r] = 0
                            for other in T.serial(r % heads):
                                rank[r] += chosen[r // heads * heads + other]
                            source_row[r // heads * active_heads + rank[r]] = r
                    for i, d in T.Parallel(block_q * active_heads, dim):
                        if q0 + i // active_heads < num_queries:
                            QRouted[bb, q0 * active_heads + i, d] = q_shared[source_row[i], d]
                    for i in T.Parallel(block_q * active_heads):
                        query = q0 + i // active_heads
                        if query < num_queries:
                            WRouted[bb, query, i % active_heads] = W[bb, query, source_row[i] % heads]
                            Heads[bb, query, i % active_heads] = source_row[i] % heads
                    for r in T.Parallel(rows):
                        if q0 + r // heads < num_queries:
                            Importance[bb, q0 + r // heads, r % heads] = importance[r]

        if routing:
            # the key cache, or with tail_means each query's mean tail key
            tail_source = (batch, num_queries, dim) if tail_means else (batch, num_keys, dim)

            @T.prim_func
            def route_heads(
                Q: T.Tensor((batch, num_queries * heads, dim), T.bfloat16),
                Pooled: T.Tensor((batch, num_blocks, dim), T.bfloat16),
                Keys: T.Tensor(tail_source, T.bfloat16),
                W: T.Tensor((batch, num_queries, heads), T.float32),
                HeadScale: T.Tensor((heads,), T.float32),
                KS: T.Tensor((batch, num_queries), T.int32),
                KE: T.Tensor((batch, num_queries), T.int32),
                QRouted: T.Tensor((batch, num_queries * active_heads, dim), T.bfloat16),
                WRouted: T.Tensor((batch, num_queries, active_heads), T.float32),
                Heads: T.Tensor((batch, num_queries, active_heads), T.int32),
                Importance: T.Tensor((batch, num_queries, heads), T.float32),
            ):
                body(Q, Pooled, Keys, W, HeadScale, KS, KE, Importance, QRouted, WRouted, Heads)

            return route_heads

        @T.prim_func
        def head_importance(
            Q: T.Tensor((batch, num_queries * heads, dim), T.bfloat16),
            Pooled: T.Tensor((batch, num_blocks, dim), T.bfloat16),
            W: T.Tensor((batch, num_queries, heads), T.float32),
            KS: T.Tensor((batch, num_queries), T.int32),
            KE: T.Tensor((batch, num_queries), T.int32),
            Importance: T.Tensor((batch, num_queries, heads), T.float32),
        ):
            body(Q, Pooled, None, W, None, KS, KE, Importance)

        return head_importance

    return program
