"""Top-k selection without a sort: an exact radix select per row, in TileLang.

One CTA per row. Each float maps to an order-preserving 32-bit key; three histogram passes over the row
(12, 12 and 8 bits, each restricted to the prefix found so far) pin down the exact k-th largest key, and a
last pass writes every index above it plus just enough of the ties. Nothing is sorted; the k indices come
back in no particular order (the consumers, sparse attention and re-ranking, need none).

Each row reads only its first `Ends[row]` columns: the columns past it count as -inf without being read
(or even written: the logits kernel skips a causal query's future). A causal row of a 64K prefill is half
its width on average, so this halves the traffic. One row (<= 512 KiB) mostly stays in L2 between passes.
The suffix sums over the histogram run as a parallel (Hillis-Steele) scan over the threads.
"""

# No `from __future__ import annotations`: TileLang evaluates the T.Tensor annotations.

import functools

import tilelang
import tilelang.language as T

RADIX_BITS = (12, 12, 8)  # most significant first; sums to 32
UNROLL = 4  # row elements each thread handles per loop step
# (bits of this level, bit position above which the prefix is already fixed)
LEVELS = tuple((bits, 32 - sum(RADIX_BITS[:i])) for i, bits in enumerate(RADIX_BITS))
NEG_INF_KEY = 0x007FFFFF  # _order_key(-inf): ~0xFF800000


def _order_key(value):
    """float32 -> uint32 whose unsigned order is the float order (-inf lowest)."""
    bits = T.reinterpret(value, T.uint32)
    return T.if_then_else(value < 0, ~bits, bits | T.uint32(0x80000000))


@functools.lru_cache(maxsize=None)
def build_radix_topk(k: int, threads: int = 512, arch: str | None = None):
    """Compiles the top-`k` selector for fp32 rows of any width >= k; cached per k.

    The program takes (Scores [rows, width] fp32, Ends [rows] int32) and returns Out [rows, k] int32.
    """
    target = "auto" if arch is None else {"kind": "cuda", "arch": arch}
    bins = 1 << max(RADIX_BITS)
    per_thread = bins // threads
    scan_offsets = tuple(1 << i for i in range(threads.bit_length() - 1))

    @tilelang.jit(target=target, out_idx=[-1])
    def program():
        rows, width = T.dynamic("rows"), T.dynamic("width")

        @T.macro
        def load_row_slice(Scores, row, step, tx, end, values):
            # All UNROLL loads issued before any is used: several requests in flight per thread.
            for j in T.unroll(UNROLL):
                col = (step * UNROLL + j) * threads + tx
                values[j] = T.if_then_else(col < end, Scores[row, T.min(col, width - 1)], 0.0)

        @T.prim_func
        def radix_topk(Scores: T.Tensor((rows, width), T.float32), Ends: T.Tensor((rows,), T.int32),
                       Out: T.Tensor((rows, k), T.int32)):
            with T.Kernel(rows, threads=threads) as row:
                tx = T.get_thread_binding()
                hist = T.alloc_shared((bins,), T.int32)
                suffix = T.alloc_shared((threads + 1,), T.int32)
                found = T.alloc_shared((2,), T.int32)  # (bin of the k-th key, keys above that bin)
                counters = T.alloc_shared((2,), T.int32)  # (written above threshold, ties written)
                prefix = T.alloc_var(T.uint32)
                need = T.alloc_var(T.int32)
                end = T.alloc_var(T.int32)
                local_sum = T.alloc_var(T.int32)
                carry = T.alloc_var(T.int32)
                running = T.alloc_var(T.int32)
                slot = T.alloc_var(T.int32)
                values = T.alloc_local((UNROLL,), T.float32)
                prefix = T.uint32(0)
                need = k
                end = T.max(T.min(Ends[row], width), 0)

                for bits, high_shift in LEVELS:  # unrolled in Python: one pass per radix level
                    shift = high_shift - bits  # keys must match `prefix` above `high_shift`
                    digit_mask = (1 << bits) - 1
                    for i in T.serial(per_thread):
                        hist[tx * per_thread + i] = 0
                    T.sync_threads()
                    for step in T.serial(T.ceildiv(end, threads * UNROLL)):
                        load_row_slice(Scores, row, step, tx, end, values)
                        for j in T.unroll(UNROLL):
                            col = (step * UNROLL + j) * threads + tx
                            if col < end:
                                key = _order_key(values[j])
                                matches = high_shift == 32 or (key >> high_shift) == prefix
                                if matches:
                                    T.atomic_add(hist[T.cast((key >> shift) & digit_mask, T.int32)], 1)
                    # The unread columns [end, width) are -inf: counted at once, when -inf is still in play.
                    neg_inf_matches = high_shift == 32 or T.uint32(NEG_INF_KEY >> high_shift) == prefix
                    if tx == 0 and end < width and neg_inf_matches:
                        T.atomic_add(hist[(NEG_INF_KEY >> shift) & digit_mask], width - end)
                    T.sync_threads()
                    # Inclusive suffix sums over the threads' bin groups: suffix[t] = keys in bins >= t·per_thread.
                    local_sum = 0
                    for i in T.serial(per_thread):
                        local_sum = local_sum + hist[tx * per_thread + i]
                    suffix[tx] = local_sum
                    if tx == 0:
                        suffix[threads] = 0
                    T.sync_threads()
                    for offset in scan_offsets:  # unrolled in Python: log2(threads) scan steps
                        carry = T.if_then_else(tx + offset < threads, suffix[T.min(tx + offset, threads - 1)], 0)
                        T.sync_threads()
                        suffix[tx] = suffix[tx] + carry
                        T.sync_threads()
                    # The bin holding the k-th largest key: above(bin) < need <= above(bin) + hist[bin].
                    running = suffix[tx + 1]
                    for i in T.serial(per_thread):
                        b = tx * per_thread + per_thread - 1 - i
                        if running < need and running + hist[b] >= need:
                            found[0] = b
                            found[1] = running
                        running = running + hist[b]
                    T.sync_threads()
                    prefix = (prefix << bits) | T.cast(found[0], T.uint32)
                    need = need - found[1]
                    T.sync_threads()

                # `prefix` is now the exact k-th largest key; `need` of its ties are taken.
                if tx == 0:
                    counters[0] = 0
                    counters[1] = 0
                T.sync_threads()
                for step in T.serial(T.ceildiv(end, threads * UNROLL)):
                    load_row_slice(Scores, row, step, tx, end, values)
                    for j in T.unroll(UNROLL):
                        col = (step * UNROLL + j) * threads + tx
                        if col < end:
                            key = _order_key(values[j])
                            if key > prefix:
                                slot = T.atomic_add(counters[0], 1, return_prev=True)
                                Out[row, slot] = col
                            elif key == prefix:
                                slot = T.atomic_add(counters[1], 1, return_prev=True)
                                if slot < need:
                                    Out[row, k - need + slot] = col
                if prefix == T.uint32(NEG_INF_KEY):  # fewer than k keys above -inf: unread columns fill up
                    for step in T.serial(T.ceildiv(width - end, threads)):
                        col = end + step * threads + tx
                        if col < width:
                            slot = T.atomic_add(counters[1], 1, return_prev=True)
                            if slot < need:
                                Out[row, k - need + slot] = col

        return radix_topk

    return program
