"""Top-k selection without a sort: an exact radix select per row, in TileLang.

One CTA per row. Each float maps to an order-preserving 32-bit key; three histogram passes over the row
(12, 12 and 8 bits, each restricted to the prefix found so far) pin down the exact k-th largest key, and a
last pass writes every index above it plus just enough of the ties. The row is read four times, but one row
(<= 512 KiB at 128K keys) stays in L2 between passes, so HBM sees it about once; nothing is sorted.
The k indices come back in no particular order (the consumers, sparse attention and re-ranking, need none).
"""

# No `from __future__ import annotations`: TileLang evaluates the T.Tensor annotations.

import functools

import tilelang
import tilelang.language as T

RADIX_BITS = (12, 12, 8)  # most significant first; sums to 32
UNROLL = 4  # row elements each thread handles per loop step
# (bits of this level, bit position above which the prefix is already fixed)
LEVELS = tuple((bits, 32 - sum(RADIX_BITS[:i])) for i, bits in enumerate(RADIX_BITS))


def _order_key(value):
    """float32 -> uint32 whose unsigned order is the float order (-inf lowest)."""
    bits = T.reinterpret(value, T.uint32)
    return T.if_then_else(value < 0, ~bits, bits | T.uint32(0x80000000))


@functools.lru_cache(maxsize=None)
def build_radix_topk(k: int, threads: int = 512, arch: str | None = None):
    """Compiles the top-`k` selector for fp32 rows of any length >= k; cached per k."""
    target = "auto" if arch is None else {"kind": "cuda", "arch": arch}
    bins = 1 << max(RADIX_BITS)
    per_thread = bins // threads

    @tilelang.jit(target=target, out_idx=[-1])
    def program():
        rows, width = T.dynamic("rows"), T.dynamic("width")

        @T.macro
        def load_row_slice(Scores, row, step, tx, values):
            # All UNROLL loads issued before any is used: several requests in flight per thread.
            for j in T.unroll(UNROLL):
                col = (step * UNROLL + j) * threads + tx
                values[j] = T.if_then_else(col < width, Scores[row, T.min(col, width - 1)], 0.0)

        @T.prim_func
        def radix_topk(Scores: T.Tensor((rows, width), T.float32), Out: T.Tensor((rows, k), T.int32)):
            with T.Kernel(rows, threads=threads) as row:
                tx = T.get_thread_binding()
                hist = T.alloc_shared((bins,), T.int32)
                suffix = T.alloc_shared((threads + 1,), T.int32)
                found = T.alloc_shared((2,), T.int32)  # (bin of the k-th key, keys above that bin)
                counters = T.alloc_shared((2,), T.int32)  # (written above threshold, ties written)
                prefix = T.alloc_var(T.uint32)
                need = T.alloc_var(T.int32)
                local_sum = T.alloc_var(T.int32)
                running = T.alloc_var(T.int32)
                slot = T.alloc_var(T.int32)
                values = T.alloc_local((UNROLL,), T.float32)
                prefix = T.uint32(0)
                need = k

                for bits, high_shift in LEVELS:  # unrolled in Python: one pass per radix level
                    shift = high_shift - bits  # keys must match `prefix` above `high_shift`
                    for i in T.serial(per_thread):
                        hist[tx * per_thread + i] = 0
                    T.sync_threads()
                    for step in T.serial(T.ceildiv(width, threads * UNROLL)):
                        load_row_slice(Scores, row, step, tx, values)
                        for j in T.unroll(UNROLL):
                            col = (step * UNROLL + j) * threads + tx
                            if col < width:
                                key = _order_key(values[j])
                                matches = high_shift == 32 or (key >> high_shift) == prefix
                                if matches:
                                    T.atomic_add(hist[T.cast((key >> shift) & ((1 << bits) - 1), T.int32)], 1)
                    T.sync_threads()
                    # Suffix sums: suffix[t] = number of keys in bins >= t * per_thread.
                    local_sum = 0
                    for i in T.serial(per_thread):
                        local_sum = local_sum + hist[tx * per_thread + i]
                    suffix[tx] = local_sum
                    if tx == 0:
                        suffix[threads] = 0
                    T.sync_threads()
                    if tx == 0:
                        running = 0
                        for j in T.serial(threads):
                            running = running + suffix[threads - 1 - j]
                            suffix[threads - 1 - j] = running
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
                for step in T.serial(T.ceildiv(width, threads * UNROLL)):
                    load_row_slice(Scores, row, step, tx, values)
                    for j in T.unroll(UNROLL):
                        col = (step * UNROLL + j) * threads + tx
                        if col < width:
                            key = _order_key(values[j])
                            if key > prefix:
                                slot = T.atomic_add(counters[0], 1, return_prev=True)
                                Out[row, slot] = col
                            elif key == prefix:
                                slot = T.atomic_add(counters[1], 1, return_prev=True)
                                if slot < need:
                                    Out[row, k - need + slot] = col

        return radix_topk

    return program
