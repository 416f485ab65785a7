"""Order keys of the radix top-k (`topk.py`, `topk_stream.py`): floats and columns as unsigned integers whose order
is the selection's order."""

# No `from __future__ import annotations`: TileLang evaluates these inside the programs.

import tilelang.language as T

NEG_INF_KEY = 0x00800000  # order_key(-inf): 2^31 - 0x7F800000


def lowest_value_with_key(key):
    """uint32 order key -> the smallest float32 whose `order_key` is at least `key` (key 0: -inf), so that a
    float compare with it tells which values reach that key (the inverse of `order_key`)."""
    magnitude_bits = T.if_then_else(key >= T.uint32(0x80000000), key - T.uint32(0x80000000),
                                    T.uint32(0x80000000) | (T.uint32(0x80000000) - key))
    return T.if_then_else(key == T.uint32(0), -T.infinity(T.float32), T.reinterpret(magnitude_bits, T.float32))


def column_key(col):
    """int32 column -> uint32 whose unsigned order is the reverse column order (the lowest column largest)."""
    return ~T.cast(col, T.uint32)


def order_key(value):
    """float32 -> uint32 whose unsigned order is the float order (-inf lowest), branch-free: 2^31 plus the value's
    magnitude bits, negated for negative values, so that -0.0 and +0.0 share one key (they tie, as in torch)."""
    bits = T.reinterpret(value, T.int32)
    sign = bits >> 31  # 0, or -1 for negative values
    signed_magnitude = ((bits & T.int32(0x7FFFFFFF)) ^ sign) - sign
    return T.reinterpret(signed_magnitude, T.uint32) + T.uint32(0x80000000)
