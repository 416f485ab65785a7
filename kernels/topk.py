"""Top-k selection without a sort: an exact radix select per row, in TileLang.

One CTA per row. Each float maps to an order-preserving 32-bit key; three histogram passes over the row
(12, 12 and 8 bits, each restricted to the prefix found so far) pin down the exact k-th largest key, and a
last pass writes every index above it plus just enough of the ties. Nothing is sorted; the k indices come
back in no particular order (the consumers, sparse attention and re-ranking, need none), but the selected set is
deterministic: when more keys tie with the k-th than are needed, the same radix select over their column numbers
takes the lowest columns, so runs (and CUDA-graph replays) never differ.

Each row reads only its first `Ends[row]` columns: the columns past it count as -inf without being read
(or even written: the logits kernel skips a causal query's future). A causal row of a 64K prefill is half
its width on average, so this halves the traffic. One row (<= 512 KiB) mostly stays in L2 between passes.
The suffix sums over the histogram run as a warp-shuffle scan (three barriers per level).

`with_keys` selects among candidate lists instead: each row's entries carry their own key index (Keys), which is
what comes out and what breaks ties, so the result equals the top-k of the full row the candidates came from.

One program in one file (over the usual ~400 lines): its macros close over the build options of `build_radix_topk`,
and the measurements behind each default shape stand beside that shape's constant.
"""

# No `from __future__ import annotations`: TileLang evaluates the T.Tensor annotations.

import functools
import math

import tilelang
import tilelang.language as T

from .common import compile_target

RADIX_BITS = (12, 12, 8)  # most significant first; sums to 32
# Row elements each thread loads per loop step, all issued before any is used. Many rows (prefill) fill the GPU with
# CTAs and more loads in flight only cost registers (64K causal rows, H200: 0.60 ms at 4, 1.01 at 16); a decode step
# has a few dozen rows, one CTA each, and streams them faster with wide CTAs and deeper loads (FEW_ROWS_SHAPE: 0.07
# against 0.10 ms for 32 rows of 128K), see benchmarks/sweep_topk.py.
UNROLL = 4
FEW_ROWS_SHAPE = dict(threads=1024, unroll=8)
# Many rows: registers capped at 32 so that four CTAs (rows) share an SM, one row's barrier-bound levels overlapping
# the others' loads (64K causal rows, H200, sweep_topk-20261128-124328.json: 0.43 ms at four CTAs per SM, 0.45-0.46
# at three, 0.51 at the compiler's two).
MANY_ROWS_SHAPE = dict(min_ctas_per_sm=4)
# The same with 16-byte loads (`vector`), taken where rows allow them (width a multiple of 4, 16-byte aligned rows):
# H200, sweep_topk-20261202-221921.json, against the scalar shapes above: 64K causal rows 0.419 against 0.434 ms;
# decode 128K, batch 32, 1 / 4 queries 0.0491 / 0.0607 against 0.0499 / 0.0637 ms; the same sets selected.
FEW_ROWS_VECTOR_SHAPE: dict | None = dict(FEW_ROWS_SHAPE, vector=4, unroll=4)
# Prefill rows also take `compact_second_pass` and `bins_in_registers` (fewer instructions per row, the program being
# issue-bound): H200, sweep_topk-20261204-043751.json, 64K causal rows 0.362 against 0.406 ms, the same sets
# selected; the MISA-8 indexer's top-k stage (bench_indexer-20261204-044100.json) 2.13 -> 1.75 ms at 32K, 6.26 ->
# 5.52 at 64K, 20.99 -> 20.09 at 128K. A decode step's wide CTAs lose with them (128K, batch 32, 1 / 4 queries:
# 0.0561 / 0.0690 against 0.0477 / 0.0548 ms) and keep the plain passes.
# They also take `sample_every` (each row's bound from a sample of itself, most rows read once; the same sets).
# 1/16: H200, sweep_topk-20261204-174833.json, 64K / 128K causal rows 0.329 / 0.957 against 0.363 / 1.267 ms; in the
# indexer, host hidden (bench_indexer-20261204-180516.json), MISA-8 4.22 / 13.99 / 52.76 against 4.28 / 15.22 / 57.63
# ms at 32K / 64K / 128K, DSA-64 17.64 / 69.22 / 272.36 against 17.90 / 70.58 / 280.11. 1/32 (fewer sectors read for
# a bound of a little more spread; 87% / 92% of rows read once against 87% / 93%): sweep_topk-20261204-190305.json,
# 0.331 / 0.927 against 0.329 / 0.957 ms (1/8: 0.345 / 1.039); in the indexer (bench_indexer-20261204-190326.json,
# host hidden) MISA-8 14.07 / 52.37 against 14.30 / 52.71 ms at 64K / 128K. The decode shape keeps the plain first
# pass (128K, batch 32, 1 / 4 queries, wide CTAs with the compact second pass: 0.048 / 0.074 against 0.056 / 0.065 ms;
# the indexer's decode step even either way, bench_indexer-20261204-175227.json).
MANY_ROWS_VECTOR_SHAPE: dict | None = dict(MANY_ROWS_SHAPE, vector=4, unroll=1, compact_second_pass=True,
                                           bins_in_registers=True, sample_every=32)
# Tried on an H200 and not kept, each written up with its figures in the README's latest GPU section or in
# benchmarks/RESULTS.md (search for the commit): a one-read path (280dfb6), 16-bit planes of the logits (27b4688), the
# second pass read backward / rows reversed (81f9364), per-thread cp.async rings (b6322b7), slot claims once per warp
# (2c1aebc) or per thread and loop step (c19e281), three CTAs per SM with one or two loads in flight (66ac447; in the
# indexer, bench_indexer-20261204-090233.json: top-k stage 5.81 against 5.59 ms at 64K, 20.01 against 19.99 at 128K).
# Skipping the buffered path's finer levels once the k-th key's bin holds exactly the keys still wanted (0565cac,
# `resolve_early`; the same sets): 64K / 128K causal rows 0.387 / 1.312 against 0.363 / 1.204 ms
# (sweep_topk-20261204-141514-resolve-early-not-kept.json).
# A warp-aggregated first pass (`__match_any_sync`, one atomic per distinct bin of a warp; 6fa3231, and on 2026-11-28):
# 64K / 128K causal rows 1.003 / 3.695 against 0.363 / 1.206 ms (sweep_topk-20261204-145025.json).
# Reading rows once with a bound from the logits program's maxima over groups of 8 keys (fc6a672 - 18553dc, removed
# in favour of the sampled bound): the top-k gained (64K / 128K rows 0.327 / 0.916 against 0.363 / 1.205 ms,
# sweep_topk-20261204-162655.json) about what the maxima cost the logits program; in the indexer MISA-8 15.33 /
# 57.03 ms against the sampled bound's 14.27 / 54.39 at 64K / 128K, host hidden (bench_indexer-20261204-174851.json).
# Nsight Compute (benchmarks/results/ncu-20261204-0231-detail.txt): bound by instruction issue and the L1 /
# shared-memory pipe (84% busy), not DRAM (43%).
# (bits of this level, bit position above which the prefix is already fixed)
LEVELS = tuple((bits, 32 - sum(RADIX_BITS[:i])) for i, bits in enumerate(RADIX_BITS))
NEG_INF_KEY = 0x00800000  # _order_key(-inf): 2^31 - 0x7F800000
WARP_SCAN_OFFSETS = (1, 2, 4, 8, 16)
# Shared-memory slots for the keys of the k-th key's first-level bin (8 bytes each); a fuller bin re-reads the row.
BUFFER = 4096
# `sample_every`: the rank taken in the sample, as a multiple of the k / S its values would hold at the k-th value
# (above 1: the bound stays below the k-th value despite the sample's spread; the kept values stay within BUFFER);
# rows shorter than this many times k take no bound (their sample would be too small, their read short anyway).
SAMPLE_MARGIN = 1.25
SAMPLE_MIN_KEYS_PER_K = 4
# Where `phase_clock` reads the SM clock in a row taking the usual path (a row taking the re-reading path leaves the
# marks after the first level at 0).
PHASE_MARKS = ("start", "first pass", "first level", "second pass", "later levels", "output")


def _lowest_value_with_key(key):
    """uint32 order key -> the smallest float32 whose `_order_key` is at least `key` (key 0: -inf), so that a
    float compare with it tells which values reach that key (the inverse of `_order_key`)."""
    magnitude_bits = T.if_then_else(key >= T.uint32(0x80000000), key - T.uint32(0x80000000),
                                    T.uint32(0x80000000) | (T.uint32(0x80000000) - key))
    return T.if_then_else(key == T.uint32(0), -T.infinity(T.float32), T.reinterpret(magnitude_bits, T.float32))


def _column_key(col):
    """int32 column -> uint32 whose unsigned order is the reverse column order (the lowest column largest)."""
    return ~T.cast(col, T.uint32)


def _order_key(value):
    """float32 -> uint32 whose unsigned order is the float order (-inf lowest), branch-free: 2^31 plus the value's
    magnitude bits, negated for negative values, so that -0.0 and +0.0 share one key (they tie, as in torch)."""
    bits = T.reinterpret(value, T.int32)
    sign = bits >> 31  # 0, or -1 for negative values
    signed_magnitude = ((bits & T.int32(0x7FFFFFFF)) ^ sign) - sign
    return T.reinterpret(signed_magnitude, T.uint32) + T.uint32(0x80000000)


@functools.lru_cache(maxsize=None)
def build_radix_topk(k: int, threads: int = 512, buffer: int = BUFFER, with_keys: bool = False,
                     unroll: int = UNROLL, min_ctas_per_sm: int = 0, value_filter: bool = True,
                     caller_allocates_out: bool = False, vector: int = 1, compact_second_pass: bool = False,
                     bins_in_registers: bool = False, phase_clock: bool = False, second_pass_writes: bool = True,
                     longest_first: bool = False, bounded: bool = False, sample_every: int = 0,
                     arch: str | None = None):
    """Compiles the top-`k` selector for fp32 rows of any width >= k; cached per k.

    The program takes (Scores [rows, width] fp32, Ends [rows] int32) and returns Out [rows, k] int32 columns;
    with_keys: (Scores, Keys [rows, width] int32, Ends) -> the Keys of the k largest, ties to the lowest key.
    `min_ctas_per_sm` > 0 caps the registers so that this many CTAs fit on an SM (0: the compiler's choice).
    `value_filter`: the second pass compares each value with the lowest float of the k-th key's bin and computes keys
    only for the few that reach it (False: a key for every value, the program before 700c9e1).
    `caller_allocates_out`: the same program called with Out as its last argument (a contiguous int32 [rows, k] the
    caller owns, e.g. a query chunk's slice of the whole output) instead of returning a new tensor.
    `vector` > 1: each thread loads `vector` adjacent floats at once (one 16-byte load for 4): Scores comes as
    [rows, width / vector, vector], so rows must be 16-byte aligned (width a multiple of 4); not with_keys.
    `compact_second_pass`: the second pass first marks which of a loop step's values pass (a bit each), then visits
    only those, lowest bit first, so that a warp runs the write-or-buffer code as often as its busiest lane has passing
    values in the step (about once) instead of once per value slot in which any lane has one (nearly every slot; Nsight
    Compute: the program issues ~120 instructions per 16-byte load, warps half diverged). Not with_keys.
    `bins_in_registers`: each level's search for the k-th key's bin keeps a thread's `bins / threads` adjacent counts
    in registers between its two reads of them instead of reading shared memory twice (adjacent lanes' bins are 8
    words apart: every such read is an 8-way bank conflict; Nsight Compute counted 73% of the program's shared-memory
    load wavefronts as excess).
    `phase_clock` (a probe, `benchmarks/topk_probe.py --phases`; vector > 1): the program also takes Clock [rows,
    PHASE_MARKS] int64 (zeros from the caller) and records each row's SM clock at the ends of its phases (see
    PHASE_MARKS), with a barrier before each mark so that it counts the slowest thread. `second_pass_writes=False`
    (probe only: the selection comes out wrong) makes the second pass count its passing values instead of claiming
    slots and writing them, to tell the pass's reads and compares from its claims and writes.
    `longest_first`: the CTAs take the rows last to first (a causal prefill's last rows are its longest, and the
    logits program with its own `longest_first` writes them first); the same selection.
    `bounded` (opt-in, vector > 1): the program also takes Bounds [rows] fp32, each at most its row's k-th value
    (-inf: none), e.g. the k-th largest of the row's maxima over groups of keys (`topk_bounds.group_maxima_bounds`).
    The first pass then counts and keeps in shared memory only the values at or above the bound; where they all fit
    the buffer, the finer levels and the output run on them and the row is read once instead of twice. A bound that
    keeps fewer than k values (above the k-th value: the caller's mistake) is dropped for a plain first pass; one that
    keeps more than the buffer holds leaves the second pass to read the row, comparing with the bound too. The same
    selection as without it.
    `sample_every` S > 0 (bounded, with its bound found in the program from the row itself; no extra input): a row of
    at least SAMPLE_MIN_KEYS_PER_K · k keys first reads one 32-byte sector of every S (1/S of its values, spread over
    the row), and its bound is the lowest float of the first-level bin holding the sample's SAMPLE_MARGIN · k / S-th
    largest value: about SAMPLE_MARGIN · k of the row's values reach it. Not a sure bound: where fewer than k do, the
    first pass runs again unbounded (the same selection, one more read).
    """
    if vector > 1 and with_keys:
        raise ValueError("vector loads are for the plain top-k (with_keys=False)")
    if compact_second_pass and with_keys:
        raise ValueError("compact_second_pass is for the plain top-k (with_keys=False)")
    if phase_clock and vector == 1:
        raise ValueError("phase_clock probes the vector program (vector > 1)")
    if sample_every and (sample_every < 0 or 8 % vector):
        raise ValueError(f"sample_every samples whole 32-byte sectors: vector 2, 4 or 8 and sample_every > 0; got "
                         f"vector={vector}, sample_every={sample_every}")
    bounded = bounded or sample_every > 0
    if bounded and (vector == 1 or phase_clock or not value_filter):
        raise ValueError("bounded is for the vector program (vector > 1) with the value filter, without phase_clock")
    if not second_pass_writes and not phase_clock:
        raise ValueError("second_pass_writes=False selects nothing right: it is for the phase probe (phase_clock)")
    target = compile_target(arch)
    bins = 1 << max(RADIX_BITS)
    per_thread = bins // threads
    warps = threads // 32
    (first_bits, first_shift), later_levels = LEVELS[0], LEVELS[1:]
    first_digit = first_shift - first_bits  # bits below the first level's digit
    sector = 8 // vector  # `sample_every`: vector loads per 32-byte sector

    # Every barrier is written out below; TileLang's own pass would add one per loop step, as it cannot see that
    # atomically claimed slots never collide. Every global access is in bounds by construction (columns below the
    # row's end, which is clamped to the width; output slots below k): TileLang's own guard would cost a compare
    # per element in a loop that runs out of instruction issue.
    @tilelang.jit(target=target, out_idx=None if caller_allocates_out else [-1],
                  pass_configs={tilelang.PassConfigKey.TL_DISABLE_THREAD_STORAGE_SYNC: True,
                                tilelang.PassConfigKey.TL_DISABLE_SAFE_MEMORY_ACCESS: True})
    def program():
        rows = T.dynamic("rows")
        if vector > 1:  # Python-level: Scores as [rows, width / vector, vector], one wide load per group
            groups = T.dynamic("groups")
            width = groups * vector
        else:
            width = T.dynamic("width")

        def column(step, j, v, tx):
            """The column of a thread's value v of load j in loop step `step` (a TileLang expression)."""
            return ((step * unroll + j) * threads + tx) * vector + v

        def value_at(values, position):
            """values[position] for a position known only at run time, as selects (registers, not local memory)."""
            return functools.reduce(lambda chosen, slot: T.if_then_else(position == slot, values[slot], chosen),
                                    range(1, unroll * vector), values[0])

        def bin_count(hist, thread_bins, tx, i):
            """The count of a thread's i-th bin: from shared memory, or from its registers (`bins_in_registers`);
            an expression, so that TileLang binds no variable of its own."""
            return hist[tx * per_thread + i] if thread_bins is None else thread_bins[i]

        def visit_condition(col, value, end, checked, floor):
            """Whether a loaded value is visited: its column before the row's end (only in the `checked` step) and
            the value at or above `floor` (unless None); True where every value is (composed at Python level)."""
            tests = ([col < end] if checked else []) + ([value >= floor] if floor is not None else [])
            return functools.reduce(T.And, tests) if tests else True

        @T.macro
        def visit_slice(source, row, step, tx, end, values, visit, context, checked, floor, compact=None):
            """One loop step: `unroll` columns (groups of `vector`) per thread, all loads issued before any is used
            (several requests in flight). `checked` (Python-level): the row's last, partial step, whose columns are
            compared with `end`; the full steps before it skip that test (the top-k runs out of instruction issue,
            not bandwidth). `floor` (None at Python level: every value): only values at or above it are visited.
            `compact` (None at Python level, or a thread's (mask, position) scratch variables): the passing values are
            marked first and visited lowest bit first (`compact_second_pass`)."""
            Scores, Keys, keys = source
            for j in T.unroll(unroll):
                col = (step * unroll + j) * threads + tx  # with vector > 1: the group of columns
                if vector > 1:  # Python-level; a checked group past the width loads the last one (never visited)
                    group = T.min(col, groups - 1) if checked else col
                    for v in T.vectorized(vector):
                        values[j * vector + v] = Scores[row, group, v]
                elif checked:
                    values[j] = T.if_then_else(col < end, Scores[row, col], 0.0)
                    if with_keys:  # Python-level
                        keys[j] = T.if_then_else(col < end, Keys[row, col], 0)
                else:
                    values[j] = Scores[row, col]
                    if with_keys:  # Python-level
                        keys[j] = Keys[row, col]
            if compact is not None:  # Python-level
                mask, position = compact
                mask = 0
                for i in T.unroll(unroll * vector):
                    passes = visit_condition(column(step, i // vector, i % vector, tx), values[i], end, checked, floor)
                    mask = mask | T.if_then_else(passes, 1 << i, 0)
                for _ in T.unroll(unroll * vector):  # a warp runs this as often as its busiest lane needs
                    if mask != 0:
                        position = T.call_extern("int32", "__ffs", mask) - 1
                        mask = mask & (mask - 1)
                        visit(_order_key(value_at(values, position)),
                              column(step, position // vector, position % vector, tx), context)
                return
            for j in T.unroll(unroll):
                for v in T.unroll(vector):
                    col = column(step, j, v, tx)
                    i = j * vector + v
                    if checked or floor is not None:  # Python-level: a test per value
                        if visit_condition(col, values[i], end, checked, floor):
                            visit(_order_key(values[i]), keys[j] if with_keys else col, context)
                    else:
                        visit(_order_key(values[i]), keys[j] if with_keys else col, context)

        @T.macro
        def for_each_key(source, row, tx, end, values, visit, context, floor=None, compact=None):
            """visit(order key, column (with_keys: its key index), context) for every column before `end` (whose
            value reaches `floor`, unless None); source = (Scores, Keys or None, a thread's key slots or None).
            `compact`: see `visit_slice`."""
            per_step = threads * unroll * vector
            for step in T.serial(end // per_step):
                visit_slice(source, row, step, tx, end, values, visit, context, False, floor, compact)
            for step in T.serial(end // per_step, T.ceildiv(end, per_step)):  # the partial last step, if any
                visit_slice(source, row, step, tx, end, values, visit, context, True, floor, compact)

        @T.macro
        def clear_histogram(hist, tx):
            for i in T.serial(per_thread):
                hist[tx * per_thread + i] = 0
            T.sync_threads()

        @T.macro
        def find_kth_bin(hist, suffix, found, tx, need, thread_bins=None):
            """After a histogram pass: found = (bin holding the need-th largest key, keys above it, keys in it).
            Each thread owns `per_thread` adjacent bins; the suffix sums over the threads run as a shuffle scan within
            each warp plus one pass over the warps' totals (in `suffix`): three barriers in all. `thread_bins` (None,
            or a thread's `per_thread` registers: `bins_in_registers`) keeps the thread's counts from the first read."""
            T.sync_threads()
            local_sum = T.alloc_var(T.int32)
            carry = T.alloc_var(T.int32)
            other = T.alloc_var(T.int32)
            running = T.alloc_var(T.int32)
            local_sum = 0
            for i in (T.serial if thread_bins is None else T.unroll)(per_thread):  # registers: constant indices
                if thread_bins is not None:  # Python-level
                    thread_bins[i] = hist[tx * per_thread + i]
                    local_sum = local_sum + thread_bins[i]
                else:
                    local_sum = local_sum + hist[tx * per_thread + i]
            carry = local_sum  # becomes the keys in this lane's bins and every higher lane's of the warp
            for offset in WARP_SCAN_OFFSETS:  # unrolled in Python; every lane shuffles, the top lanes add nothing
                other = T.shfl_down(carry, offset)
                carry = carry + T.if_then_else(tx % 32 + offset < 32, other, 0)
            if tx % 32 == 0:
                suffix[tx // 32] = carry  # the warp's total
            T.sync_threads()
            running = carry - local_sum  # keys in the bins above this thread's, counted within the warp so far
            for w in T.serial(warps):
                running = running + T.if_then_else(w > tx // 32, suffix[w], 0)
            for i in (T.serial if thread_bins is None else T.unroll)(per_thread):  # registers: constant indices
                b = tx * per_thread + per_thread - 1 - i
                if running < need and running + bin_count(hist, thread_bins, tx, per_thread - 1 - i) >= need:
                    found[0] = b
                    found[1] = running
                    found[2] = bin_count(hist, thread_bins, tx, per_thread - 1 - i)
                running = running + bin_count(hist, thread_bins, tx, per_thread - 1 - i)
            T.sync_threads()

        @T.macro
        def take(Out, row, key, col, prefix, need, counters, lowest, slot):
            """Final pass, per key: above the k-th key always, equal to it if its column key reaches `lowest` (the
            tie-breaking threshold) while ties are still needed. `slot`: the thread's scratch variable."""
            if key > prefix:
                slot = T.atomic_add(counters[0], 1, return_prev=True)
                Out[row, slot] = col
            elif key == prefix and _column_key(col) >= lowest:
                slot = T.atomic_add(counters[1], 1, return_prev=True)
                if slot < need:
                    Out[row, k - need + slot] = col

        @T.macro
        def count_column_digit(key, col, context):
            """Histogram of one digit of the tied keys' column keys (lowest column = largest), within the column
            prefix found so far (a 64-bit shift: the first level's prefix is empty)."""
            hist, prefix, column_prefix, high_shift, shift, digit_mask = context
            column = _column_key(col)
            if key == prefix and (T.cast(column, T.uint64) >> high_shift) == T.cast(column_prefix, T.uint64):
                T.atomic_add(hist[T.cast((column >> shift) & digit_mask, T.int32)], 1)

        @T.macro
        def for_each_buffered(buffer_keys, buffer_cols, in_bin, tx, visit, context):
            """visit(order key, column, context) for every key buffered in shared memory."""
            for i in T.serial(T.ceildiv(in_bin, threads)):
                index = i * threads + tx
                if index < in_bin:
                    visit(buffer_keys[index], buffer_cols[index], context)

        # Per-key visits of `for_each_key`; `context` carries the buffers and values each one needs.
        @T.macro
        def count_first_digit(key, col, hist):
            T.atomic_add(hist[T.cast(key >> first_digit, T.int32)], 1)

        @T.macro
        def count_and_keep(key, col, context):
            """`bounded` first pass, per value at or above the bound: counted, and kept in shared memory while the
            buffer has room (the count goes on past it: more than `buffer` sends the row to the second pass)."""
            hist, counters, buffer_keys, buffer_cols, slot = context
            T.atomic_add(hist[T.cast(key >> first_digit, T.int32)], 1)
            slot = T.atomic_add(counters[2], 1, return_prev=True)
            if slot < buffer:
                buffer_keys[slot] = key
                buffer_cols[slot] = col

        @T.macro
        def count_digit(key, col, context):
            hist, prefix, high_shift, shift, digit_mask = context
            if (key >> high_shift) == prefix:
                T.atomic_add(hist[T.cast((key >> shift) & digit_mask, T.int32)], 1)

        @T.macro
        def write_or_buffer(key, col, context):
            """Above the k-th key's first-level bin: taken; in that bin: kept in shared memory for the finer levels."""
            Out, row, prefix, counters, buffer_keys, buffer_cols, slot = context
            if (key >> first_digit) > prefix:
                slot = T.atomic_add(counters[0], 1, return_prev=True)
                Out[row, slot] = col
            elif (key >> first_digit) == prefix:
                slot = T.atomic_add(counters[2], 1, return_prev=True)
                buffer_keys[slot] = key
                buffer_cols[slot] = col

        @T.macro
        def count_passing(key, col, context):
            """second_pass_writes=False (probe): a value the second pass would write or buffer, counted."""
            passing, prefix = context
            passing[0] += T.if_then_else((key >> first_digit) >= prefix, 1, 0)

        @T.macro
        def take_key(key, col, context):
            Out, row, prefix, need, counters, lowest, slot = context
            take(Out, row, key, col, prefix, need, counters, lowest, slot)

        @T.macro
        def mark(Clock, row, tx, phase, after_barrier=False):
            """`phase_clock`: the SM clock at the end of `phase` (a name in PHASE_MARKS) once every thread got there
            (behind a barrier of its own unless `after_barrier`: the program's last statement was one)."""
            if phase_clock:  # Python-level
                if phase != "start" and not after_barrier:  # Python-level
                    T.sync_threads()
                if tx == 0:
                    Clock[row, PHASE_MARKS.index(phase)] = T.call_extern("int64", "clock64")

        @T.macro
        def select(Scores, Keys, Ends, Out, Clock=None, Bounds=None):
            with T.Kernel(rows, threads=threads) as cta:
                row = rows - 1 - cta if longest_first else cta
                if min_ctas_per_sm:  # Python-level: caps the registers so that this many CTAs share an SM
                    T.annotate_min_blocks_per_sm(min_ctas_per_sm)
                tx = T.get_thread_binding()
                hist = T.alloc_shared((bins,), T.int32)
                suffix = T.alloc_shared((warps,), T.int32)  # the warps' bin totals
                found = T.alloc_shared((3,), T.int32)  # (bin of the k-th key, keys above that bin, keys in it)
                counters = T.alloc_shared((3,), T.int32)  # (written above threshold, ties written, buffered)
                buffer_keys = T.alloc_shared((buffer,), T.uint32)
                buffer_cols = T.alloc_shared((buffer,), T.int32)
                prefix = T.alloc_var(T.uint32)
                need = T.alloc_var(T.int32)
                end = T.alloc_var(T.int32)
                in_bin = T.alloc_var(T.int32)
                ties = T.alloc_var(T.int32)  # keys equal to the k-th key
                wanted = T.alloc_var(T.int32)
                lowest = T.alloc_var(T.uint32)  # tie-breaking threshold on column keys (0: every tie qualifies)
                # the lowest value of the k-th key's first-level bin (None without the value filter)
                floor = T.alloc_var(T.float32) if value_filter else None
                slot = T.alloc_var(T.int32)
                passing = None if second_pass_writes else T.alloc_local((1,), T.int32)  # the probe's count
                # compact_second_pass: a loop step's passing values (a bit each) and the one visited next
                compact = (T.alloc_var(T.int32), T.alloc_var(T.int32)) if compact_second_pass else None
                thread_bins = T.alloc_local((per_thread,), T.int32) if bins_in_registers else None
                # `bounded`: the row's bound (-inf once dropped) and the values at or above it (0: not used)
                bound = T.alloc_var(T.float32) if bounded else None
                kept = T.alloc_var(T.int32) if bounded else None
                values = T.alloc_local((unroll * vector,), T.float32)
                keys = T.alloc_local((unroll,), T.int32) if with_keys else None
                source = (Scores, Keys, keys)
                prefix = T.uint32(0)
                lowest = T.uint32(0)
                ties = 0
                need = k
                end = T.max(T.min(Ends[row], width), 0)
                if tx == 0:
                    counters[0] = 0
                    counters[1] = 0
                    counters[2] = 0
                mark(Clock, row, tx, "start")

                if sample_every:  # Python-level: the bound from a sample of the row (one histogram of it)
                    bound = -T.infinity(T.float32)
                    if end >= SAMPLE_MIN_KEYS_PER_K * k:
                        sampled = T.ceildiv(T.ceildiv(end, vector), sector * sample_every) * sector
                        clear_histogram(hist, tx)
                        for i in T.serial(T.ceildiv(sampled, threads)):  # a load, then its count
                            load = i * threads + tx
                            group = load // sector * (sector * sample_every) + load % sector  # 1 sector of every S
                            if load < sampled and group * vector < end:  # one 16-byte load (group < groups)
                                for v in T.vectorized(vector):
                                    values[v] = Scores[row, group, v]
                                for v in T.unroll(vector):
                                    if group * vector + v < end:
                                        T.atomic_add(hist[T.cast(_order_key(values[v]) >> first_digit, T.int32)], 1)
                        find_kth_bin(hist, suffix, found, tx, math.ceil(SAMPLE_MARGIN * k / sample_every), thread_bins)
                        bound = _lowest_value_with_key(T.cast(found[0], T.uint32) << first_digit)

                # Level 1 over the whole row (from HBM).
                clear_histogram(hist, tx)
                if bounded:  # Python-level: only the values at or above the row's bound, counted and kept
                    if not sample_every:  # Python-level: the caller's bound
                        bound = Bounds[row]
                    kept = 0
                    if bound > -T.infinity(T.float32):
                        for_each_key(source, row, tx, end, values, count_and_keep,
                                     (hist, counters, buffer_keys, buffer_cols, slot), bound, compact)
                        T.sync_threads()
                        kept = counters[2]
                        T.sync_threads()  # every thread has read the count before it is reset
                        if tx == 0:
                            counters[2] = 0
                        if kept < k:  # a bound above the k-th value: every value counted instead
                            kept = 0
                            bound = -T.infinity(T.float32)
                            clear_histogram(hist, tx)
                # every value counted (True at Python level: the plain program)
                counts_every_value = (kept == 0) if bounded else True
                if counts_every_value:
                    for_each_key(source, row, tx, end, values, count_first_digit, hist)
                    mark(Clock, row, tx, "first pass")
                    if tx == 0 and end < width:  # the unread columns [end, width) are -inf
                        T.atomic_add(hist[NEG_INF_KEY >> first_digit], width - end)
                find_kth_bin(hist, suffix, found, tx, need, thread_bins)
                prefix = T.cast(found[0], T.uint32)
                need = need - found[1]
                in_bin = found[2]
                T.sync_threads()
                mark(Clock, row, tx, "first level", after_barrier=True)

                if in_bin <= buffer and prefix != T.uint32(NEG_INF_KEY >> first_digit):
                    # Usual case: one more pass writes the keys above the k-th key's bin and buffers that bin's
                    # keys in shared memory; the finer levels and the ties are then resolved on chip.
                    # With the value filter only values at or above the bin's lowest float are written or buffered:
                    # one float compare per value instead of its key (a few thousand of a row's values pass).
                    if value_filter:  # Python-level
                        floor = _lowest_value_with_key(prefix << first_digit)
                    if bounded:  # Python-level: level 1 counted only the values at or above the bound (-inf: all)
                        floor = T.max(floor, bound)
                    # the row read again (True at Python level: the plain program); else every value at or above
                    # the bound is in the buffer already
                    reads_again = T.Or(kept == 0, kept > buffer) if bounded else True
                    if reads_again:
                        if not second_pass_writes:  # Python-level: the probe's reads and compares only
                            passing[0] = 0
                            for_each_key(source, row, tx, end, values, count_passing, (passing, prefix), floor)
                            T.atomic_add(counters[1], passing[0])  # keeps the count (and so the pass) alive
                        else:
                            for_each_key(source, row, tx, end, values, write_or_buffer,
                                         (Out, row, prefix, counters, buffer_keys, buffer_cols, slot), floor, compact)
                    else:
                        in_bin = kept
                    T.sync_threads()
                    mark(Clock, row, tx, "second pass", after_barrier=True)
                    for bits, high_shift in later_levels:  # unrolled in Python
                        clear_histogram(hist, tx)
                        for_each_buffered(buffer_keys, buffer_cols, in_bin, tx, count_digit,
                                          (hist, prefix, high_shift, high_shift - bits, (1 << bits) - 1))
                        find_kth_bin(hist, suffix, found, tx, need, thread_bins)
                        prefix = (prefix << bits) | T.cast(found[0], T.uint32)
                        need = need - found[1]
                        ties = found[2]
                        T.sync_threads()
                    if ties > need:  # more ties than needed: the lowest columns win (same radix select)
                        wanted = need
                        for bits, high_shift in LEVELS:  # unrolled in Python
                            clear_histogram(hist, tx)
                            for_each_buffered(buffer_keys, buffer_cols, in_bin, tx, count_column_digit,
                                              (hist, prefix, lowest, high_shift, high_shift - bits, (1 << bits) - 1))
                            find_kth_bin(hist, suffix, found, tx, wanted, thread_bins)
                            lowest = (lowest << bits) | T.cast(found[0], T.uint32)
                            wanted = wanted - found[1]
                            T.sync_threads()
                    mark(Clock, row, tx, "later levels", after_barrier=True)
                    for_each_buffered(buffer_keys, buffer_cols, in_bin, tx, take_key,
                                      (Out, row, prefix, need, counters, lowest, slot))
                    mark(Clock, row, tx, "output")
                else:
                    # The k-th key's bin is too full for the buffer (heavy ties) or is -inf: finer levels re-read
                    # the row, each restricted to the prefix found so far.
                    for bits, high_shift in later_levels:  # unrolled in Python
                        shift = high_shift - bits
                        digit_mask = (1 << bits) - 1
                        clear_histogram(hist, tx)
                        for_each_key(source, row, tx, end, values, count_digit,
                                     (hist, prefix, high_shift, shift, digit_mask))
                        if tx == 0 and end < width and T.uint32(NEG_INF_KEY >> high_shift) == prefix:
                            T.atomic_add(hist[(NEG_INF_KEY >> shift) & digit_mask], width - end)
                        find_kth_bin(hist, suffix, found, tx, need, thread_bins)
                        prefix = (prefix << bits) | T.cast(found[0], T.uint32)
                        need = need - found[1]
                        ties = found[2]
                        T.sync_threads()
                    # Ties at -inf are masked keys: which of them fill up carries no meaning.
                    if ties > need and prefix != T.uint32(NEG_INF_KEY):
                        wanted = need
                        for bits, high_shift in LEVELS:  # unrolled in Python
                            clear_histogram(hist, tx)
                            for_each_key(source, row, tx, end, values, count_column_digit,
                                         (hist, prefix, lowest, high_shift, high_shift - bits, (1 << bits) - 1))
                            find_kth_bin(hist, suffix, found, tx, wanted, thread_bins)
                            lowest = (lowest << bits) | T.cast(found[0], T.uint32)
                            wanted = wanted - found[1]
                            T.sync_threads()
                    for_each_key(source, row, tx, end, values, take_key,
                                 (Out, row, prefix, need, counters, lowest, slot))
                    if prefix == T.uint32(NEG_INF_KEY):  # fewer than k keys above -inf: unread columns fill up
                        for step in T.serial(T.ceildiv(width - end, threads)):
                            col = end + step * threads + tx
                            if col < width:
                                slot = T.atomic_add(counters[1], 1, return_prev=True)
                                if slot < need:
                                    Out[row, k - need + slot] = col

        if with_keys:
            @T.prim_func
            def radix_topk_keys(Scores: T.Tensor((rows, width), T.float32), Keys: T.Tensor((rows, width), T.int32),
                                Ends: T.Tensor((rows,), T.int32), Out: T.Tensor((rows, k), T.int32)):
                select(Scores, Keys, Ends, Out)

            return radix_topk_keys

        if vector > 1 and phase_clock:
            @T.prim_func
            def radix_topk_vector_clocked(Scores: T.Tensor((rows, groups, vector), T.float32),
                                          Ends: T.Tensor((rows,), T.int32),
                                          Clock: T.Tensor((rows, len(PHASE_MARKS)), T.int64),
                                          Out: T.Tensor((rows, k), T.int32)):
                select(Scores, None, Ends, Out, Clock)

            return radix_topk_vector_clocked

        if vector > 1 and bounded and not sample_every:
            @T.prim_func
            def radix_topk_vector_bounded(Scores: T.Tensor((rows, groups, vector), T.float32),
                                          Ends: T.Tensor((rows,), T.int32), Bounds: T.Tensor((rows,), T.float32),
                                          Out: T.Tensor((rows, k), T.int32)):
                select(Scores, None, Ends, Out, Bounds=Bounds)

            return radix_topk_vector_bounded

        if vector > 1:
            @T.prim_func
            def radix_topk_vector(Scores: T.Tensor((rows, groups, vector), T.float32), Ends: T.Tensor((rows,), T.int32),
                                  Out: T.Tensor((rows, k), T.int32)):
                select(Scores, None, Ends, Out)

            return radix_topk_vector

        @T.prim_func
        def radix_topk(Scores: T.Tensor((rows, width), T.float32), Ends: T.Tensor((rows,), T.int32),
                       Out: T.Tensor((rows, k), T.int32)):
            select(Scores, None, Ends, Out)

        return radix_topk

    return program
