"""What the TileLang programs share: the compile target and the query-block shape."""

ROWS_PER_CTA = 128  # query rows (queries x heads) a CTA multiplies at once: one wgmma N


def compile_target(arch: str | None) -> str | dict:
    """TileLang's target: the current GPU (None), or `arch` such as "sm_90a" (compiling without a GPU, as CI does)."""
    return "auto" if arch is None else {"kind": "cuda", "arch": arch}


def queries_per_cta(heads: int, rows_per_cta: int = ROWS_PER_CTA) -> int:
    """Queries one CTA takes, all heads of each: `rows_per_cta` query rows in all (at least one query)."""
    return max(1, rows_per_cta // heads)
