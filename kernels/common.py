"""What the TileLang programs and their host code share: the compile target, the query-block shape, the SM count."""

import functools

import torch

ROWS_PER_CTA = 128  # query rows (queries x heads) a CTA multiplies at once: one wgmma N


def compile_target(arch: str | None) -> str | dict:
    """TileLang's target: the current GPU (None), or `arch` such as "sm_90a" (compiling without a GPU, as CI does)."""
    return "auto" if arch is None else {"kind": "cuda", "arch": arch}


def queries_per_cta(heads: int, rows_per_cta: int = ROWS_PER_CTA) -> int:
    """Queries one CTA takes, all heads of each: `rows_per_cta` query rows in all (at least one query)."""
    return max(1, rows_per_cta // heads)


@functools.lru_cache(maxsize=None)
def _sm_count_of(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (the current CUDA device when it names no index)."""
    return _sm_count_of(device.index if device.index is not None else torch.cuda.current_device())
