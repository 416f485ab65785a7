"""The radix top-k's one-read path: a row streams from HBM once, keeping only the values that can still be in its
top k, instead of a histogram pass and a second read of the row.

Why: the two-pass select reads each row twice (the second read misses L2 for most of a 64K prefill's rows) and its
first pass computes an order key and a shared atomic for every value. Here each value is compared with a running
floor and only the few that reach it are kept (key, column) in shared memory, with their first-level histogram.

Exactness: after each round the k-th largest first-level bin of the kept values sets the floor. Every value that
reached the floor when it was read is kept, and the floor only rises, so the histogram is complete for every bin at
or above it; at least k values sit there, so the row's k-th largest value is at or above it too. The kept values
thus hold every value above the k-th and all its ties, and the select's later levels, tie break and output run on
them as the two-pass path runs on its buffered bin (`topk.py`), with the same result.

Layout: each warp appends to its own segment of the buffer, slots claimed by a ballot (no atomics, no shared counter);
a warp whose segment could overflow in the next round first drops its values below the floor (a stable in-place
compaction within the warp). Where even that leaves no room (heavy ties at the floor), or the k-th key is -inf, the
row falls back to the two-pass path, which then re-reads it.
"""

# No `from __future__ import annotations`: TileLang evaluates the T.Tensor annotations.

import tilelang.language as T

from .topk_keys import lowest_value_with_key, order_key

WARP = 32


def stream_shape_errors(threads: int, vector: int, unroll: int, round_steps: int, capacity: int, k: int,
                        update_every: int = 1) -> list[str]:
    """What is wrong with these one-read build options (empty when nothing is)."""
    errors = []
    per_round = threads * vector * unroll * round_steps
    if capacity % threads:
        errors.append(f"capacity {capacity} must be a multiple of threads {threads}")
    segment = capacity // (threads // WARP)
    if segment < 2 * (per_round // (threads // WARP)):
        errors.append(f"each warp's {segment} buffer slots must hold two rounds ({per_round} values per round)")
    if update_every < 1:
        errors.append(f"update_every must be at least 1, not {update_every}")
    if per_round < k:
        errors.append(f"a round ({per_round} values) must hold at least k = {k} values, so that the first sets a floor")
    return errors


def build_stream(threads: int, vector: int, unroll: int, round_steps: int, capacity: int, k: int, update_every: int,
                 first_digit: int, find_kth_bin, clear_histogram):
    """The one-read pass as a TileLang macro; `find_kth_bin` and `clear_histogram` are the select's own macros.

    stream(Scores, row, tx, end, hist, suffix, found, failed, buffer_keys, buffer_cols, values, stored, floor)
    (`stored`, `floor`: one-slot local arrays, as a macro cannot assign its caller's variables) reads columns [0, end) of the row once (end >= `per_round(...)`), leaves every value at or above the final floor
    in the buffer (warp w's entries at [w * segment, w * segment + stored)), their first-level histogram in `hist`,
    and failed[0] = 1 where a segment ran out of room."""
    warps = threads // WARP
    segment = capacity // warps
    per_step = threads * unroll * vector
    per_round = per_step * round_steps
    per_round_per_warp = per_round // warps

    @T.macro
    def load_step(Scores, row, step, tx, values, checked):
        for j in T.unroll(unroll):
            group = (step * unroll + j) * threads + tx  # with vector > 1: the group of columns
            if vector > 1:  # Python-level; a checked group past the width loads the last one (never kept)
                if checked:
                    group = T.min(group, Scores.shape[1] - 1)
                for v in T.vectorized(vector):
                    values[j * vector + v] = Scores[row, group, v]
            elif checked:
                values[j] = Scores[row, T.min(group, Scores.shape[1] - 1)]
            else:
                values[j] = Scores[row, group]

    @T.macro
    def keep_step(step, tx, end, hist, buffer_keys, buffer_cols, values, stored, floor, checked):
        """Every value of this step reaching the floor goes to the warp's segment: a ballot claims the slots in lane
        order, so all lanes of a warp keep the same `stored`."""
        lane = tx % WARP
        lanes_below = (T.uint64(1) << T.cast(lane, T.uint64)) - T.uint64(1)
        base = (tx // WARP) * segment
        for j in T.unroll(unroll):
            for v in T.unroll(vector):
                col = ((step * unroll + j) * threads + tx) * vector + v
                value = values[j * vector + v]
                keep = T.if_then_else(col < end, value >= floor[0], False) if checked else value >= floor[0]
                ballot = T.ballot_sync(keep)
                slot = stored[0] + T.cast(T.popcount(ballot & lanes_below), T.int32)
                if keep and slot < segment:
                    key = order_key(value)
                    buffer_keys[base + slot] = key
                    buffer_cols[base + slot] = col
                    T.atomic_add(hist[T.cast(key >> first_digit, T.int32)], 1)
                stored[0] = stored[0] + T.cast(T.popcount(ballot), T.int32)

    @T.macro
    def compact(tx, buffer_keys, buffer_cols, stored, floor_bin):
        """Drops the warp's entries below the floor's bin, keeping the others in order (a destination never lies
        past its source, and each group of 32 is read by every lane before any lane writes into it)."""
        lane = tx % WARP
        lanes_below = (T.uint64(1) << T.cast(lane, T.uint64)) - T.uint64(1)
        base = (tx // WARP) * segment
        kept = T.alloc_var(T.int32)
        kept = 0
        for group in T.serial(T.ceildiv(stored[0], WARP)):
            index = group * WARP + lane
            key = buffer_keys[base + T.min(index, segment - 1)]
            col = buffer_cols[base + T.min(index, segment - 1)]
            live = T.if_then_else(index < stored[0], (key >> first_digit) >= floor_bin, False)
            ballot = T.ballot_sync(live)
            T.sync_warp()  # every lane's read of this group before any lane's write into it
            if live:
                slot = kept + T.cast(T.popcount(ballot & lanes_below), T.int32)
                buffer_keys[base + slot] = key
                buffer_cols[base + slot] = col
            kept = kept + T.cast(T.popcount(ballot), T.int32)
        stored[0] = kept

    @T.macro
    def round_(Scores, row, r, tx, end, hist, suffix, found, failed, buffer_keys, buffer_cols, values, stored,
               floor, checked):
        for s in T.serial(round_steps):
            step = r * round_steps + s
            load_step(Scores, row, step, tx, values, checked)
            keep_step(step, tx, end, hist, buffer_keys, buffer_cols, values, stored, floor, checked)
        # The floor rises to the k-th largest bin of what is kept so far (a bin the row's k-th value cannot lie below)
        # after rounds 1, 2, 4, 8, ... and every `update_every`-th: each update costs three barriers, and once the
        # floor is high few values pass it anyway. The schedule depends on r alone, so every thread agrees.
        if ((r + 1) & r) == 0 or (r + 1) % update_every == 0:
            find_kth_bin(hist, suffix, found, tx, k)
            floor[0] = T.if_then_else(failed[0] != 0, T.infinity(T.float32),
                                      lowest_value_with_key(T.cast(found[0], T.uint32) << first_digit))
        # `found[0]` holds the floor's bin until the next update writes it, after a barrier this warp has not reached.
        if stored[0] + per_round_per_warp > segment:
            compact(tx, buffer_keys, buffer_cols, stored, T.cast(found[0], T.uint32))
            if stored[0] + per_round_per_warp > segment:  # heavy ties at the floor: the two-pass path takes the row
                failed[0] = 1
                floor[0] = T.infinity(T.float32)
        # No barrier here: the next write of `found` (and the next atomic on `hist`) comes after the next scan's
        # opening barrier, which every thread reaches only after reading `found` above.

    @T.macro
    def stream(Scores, row, tx, end, hist, suffix, found, failed, buffer_keys, buffer_cols, values, stored, floor):
        stored[0] = 0
        floor[0] = -T.infinity(T.float32)
        if tx == 0:
            failed[0] = 0
        clear_histogram(hist, tx)
        for r in T.serial(end // per_round):
            round_(Scores, row, r, tx, end, hist, suffix, found, failed, buffer_keys, buffer_cols, values, stored,
                   floor, False)
        for r in T.serial(end // per_round, T.ceildiv(end, per_round)):  # the partial last round, if any
            round_(Scores, row, r, tx, end, hist, suffix, found, failed, buffer_keys, buffer_cols, values, stored,
                   floor, True)

    @T.macro
    def for_each_kept(buffer_keys, buffer_cols, warp_counts, tx, visit, context):
        """visit(order key, column, context) for every kept entry (entries below the final floor included: every
        visit compares the key with the prefix found so far)."""
        for i in T.serial(capacity // threads):
            index = i * threads + tx
            if index % segment < warp_counts[index // segment]:
                visit(buffer_keys[index], buffer_cols[index], context)

    return stream, for_each_kept, per_round
