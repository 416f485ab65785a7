"""The one-read top-k's bounds in PyTorch: bounds given to `topk.build_radix_topk(bounded=True)` (the k-th largest of
a row's group maxima, `group_maxima_bounds`: what a free bound would give) and the one it finds itself
(`sample_every`: `sampled_bounds`), for the models in benchmarks/ and the tests."""

import math

import torch

from .topk import RADIX_BITS, SAMPLE_MARGIN, SAMPLE_MIN_KEYS_PER_K


def order_keys(values: torch.Tensor) -> torch.Tensor:
    """float32 -> the top-k's order key (`topk._order_key`: unsigned order is the float order), as int64."""
    bits = values.float().contiguous().view(torch.int32).to(torch.int64)
    sign = bits >> 31
    return (((bits & 0x7FFFFFFF) ^ sign) - sign) + 2**31


def lowest_values_with_keys(keys: torch.Tensor) -> torch.Tensor:
    """int64 order keys -> the smallest float32 with each key (`topk._lowest_value_with_key`; key 0: -inf)."""
    signed_magnitude = keys - 2**31
    bits = torch.where(signed_magnitude >= 0, signed_magnitude, -signed_magnitude + 2**31)
    values = (bits - (bits >= 2**31).long() * 2**32).to(torch.int32).view(torch.float32)
    return values.masked_fill(keys == 0, float("-inf"))


def group_maxima(scores: torch.Tensor, ends: torch.Tensor, group: int) -> torch.Tensor:
    """Each row's maxima over its groups of `group` consecutive columns before its end (-inf for none): [rows,
    ceil(width / group)] fp32. In PyTorch; scores [rows, width], ends [rows]."""
    if group < 1:
        raise ValueError(f"group must be at least 1; got {group}")
    rows, width = scores.shape
    padded = -(-width // group) * group
    columns = torch.arange(padded, device=scores.device)
    visible = torch.nn.functional.pad(scores, (0, padded - width), value=float("-inf"))
    visible = visible.masked_fill(columns >= ends.reshape(-1, 1), float("-inf"))
    return visible.view(rows, padded // group, group).amax(-1)


def group_maxima_bounds(scores: torch.Tensor, ends: torch.Tensor, k: int, group: int) -> torch.Tensor:
    """Bounds [rows] fp32 for `build_radix_topk(bounded=True)`: the k-th largest of each row's `group_maxima` (each of
    k groups holds a value at or above it, so it is at most the row's k-th value); -inf for a row of fewer than k
    groups. In PyTorch; scores [rows, width] fp32, ends [rows]."""
    maxima = group_maxima(scores, ends, group)
    if maxima.shape[1] < k:
        return torch.full((scores.shape[0],), float("-inf"), device=scores.device)
    return maxima.topk(k, dim=-1).values[:, -1].contiguous()  # -inf where fewer than k groups are visible


def sampled_bounds(scores: torch.Tensor, ends: torch.Tensor, k: int, sample_every: int) -> torch.Tensor:
    """Bounds [rows] fp32 as `build_radix_topk(sample_every=...)` finds them (PyTorch, for models and tests): the
    lowest float of the first-level bin holding the ceil(SAMPLE_MARGIN · k / sample_every)-th largest of the row's
    sampled values (columns c < end with c mod (8 · sample_every) < 8: one 32-byte sector of every `sample_every`);
    -inf for rows shorter than SAMPLE_MIN_KEYS_PER_K · k. Not a sure bound (see `build_radix_topk`)."""
    columns = torch.arange(scores.shape[1], device=scores.device)
    sampled = (columns % (8 * sample_every) < 8) & (columns < ends.reshape(-1, 1))
    first_level = order_keys(scores) >> (32 - RADIX_BITS[0])
    rank = math.ceil(SAMPLE_MARGIN * k / sample_every)
    if sampled.sum(-1).min() < rank:  # only rows too short to sample lack `rank` samples
        first_level = torch.nn.functional.pad(first_level, (0, rank))
        sampled = torch.nn.functional.pad(sampled, (0, rank))
    low_key = torch.where(sampled, first_level, -1).topk(rank, dim=-1).values[:, -1] << (32 - RADIX_BITS[0])
    short = (ends.reshape(-1) < SAMPLE_MIN_KEYS_PER_K * k) | (low_key <= 0)
    return lowest_values_with_keys(low_key).masked_fill(short, float("-inf")).contiguous()
