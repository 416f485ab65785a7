"""What the TileLang programs share: the compile target and the query-block shape."""

ROWS_PER_CTA = 128  # query rows (queries x heads) a CTA multiplies at once: one wgmma N


def compile_target(arch: str | None) -> str | dict:
    """TileLang's target: the current GPU (None), or `arch` such as "sm_90a" (compiling without a GPU, as CI does)."""
    return "auto" if arch is None else {"kind": "cuda", "arch": arch}


def queries_per_cta(heads: int) -> int:
    """Queries one CTA takes, all heads of each: ROWS_PER_CTA query rows in all."""
    return max(1, ROWS_PER_CTA // heads)
