"""Hashes of the generated CUDA of the package's TileLang programs, in the shapes the indexers build them (CPU: compiled
for sm_90a, nothing runs). A change meant to leave the default programs alone (a refactor, an opt-in path) is checked
by hashing before and after:

    python benchmarks/program_hashes.py --out /tmp/before.json          # at the old commit
    python benchmarks/program_hashes.py --out /tmp/after.json --compare /tmp/before.json

Programs: the logits program for every call shape `logits_shapes.logits_options` picks for 8 / 32 / 64 heads
(prefill, keys split over CTAs, decode; bf16 and FP8), the candidate-scoring program, the routing program (prefill's
wide shape with tail means, decode's), the tail-means program, and the top-k in its default shapes (prefill's vector
shape with the sampled bound, decode's, the scalar ones) and in the variants kept beside them (unsampled, a given
bound, the caller's output, longest first). `--only SUBSTRING` hashes the programs whose name holds it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Callable

ARCH = "sm_90a"
# (heads, batch, queries, keys, wide_few_heads) of the logits calls to hash: 64K prefills of MISA-8 and DSA-64, GLM-5's
# 32 heads, too few queries to fill the GPU (keys split over CTAs), decode steps
LOGITS_CALLS = [(8, 1, 65536, 65536, True), (64, 1, 65536, 65536, False), (32, 1, 46336, 46336, True),
                (8, 1, 1200, 40000, True), (64, 1, 300, 9000, True), (32, 1, 2100, 20000, True),
                (8, 1, 4, 30000, True), (64, 32, 1, 131072, True)]


def programs() -> dict[str, Callable]:
    """name -> a thunk compiling that program (TileLang's compiled kernel, with `get_kernel_source`)."""
    from transformers_misa.kernels import topk
    from transformers_misa.kernels.gathered import build_gathered_logits
    from transformers_misa.kernels.router import build_head_importance
    from transformers_misa.kernels.routing import WIDE_ROUTER, tail_mean_segments
    from transformers_misa.kernels.logits_shapes import logits_options, query_layout
    from transformers_misa.kernels.scoring import build_weighted_relu_logits
    from transformers_misa.kernels.tail_means import build_causal_tail_means

    table: dict[str, Callable] = {}
    for heads, batch, queries, keys, wide in LOGITS_CALLS:
        for fp8 in (False, True):
            interleaved, wide_few_heads, _ = query_layout(heads, queries, fp8, True, wide, True)
            options = logits_options(heads, batch, queries, keys, 132, False, fp8=fp8, interleaved=interleaved,
                                     wide_few_heads=wide_few_heads)
            table[f"logits h{heads} b{batch} q{queries} k{keys} {'fp8' if fp8 else 'bf16'}"] = (
                lambda heads=heads, options=options: build_weighted_relu_logits(heads, 128, arch=ARCH, **options)())
    table["candidates h64"] = lambda: build_gathered_logits(64, 128, arch=ARCH)()
    table["routing h64 a8 prefill"] = lambda: build_head_importance(64, 128, 128, active_heads=8, tail_means=True,
                                                                    arch=ARCH, **WIDE_ROUTER)()
    table["routing h64 a8 decode"] = lambda: build_head_importance(64, 128, 128, active_heads=8, arch=ARCH)()
    table["tail means"] = lambda: build_causal_tail_means(128, 128, tail_mean_segments(128, 128), arch=ARCH)()
    for name, shape in [("prefill vector", topk.MANY_ROWS_VECTOR_SHAPE), ("decode vector", topk.FEW_ROWS_VECTOR_SHAPE),
                        ("prefill scalar", topk.MANY_ROWS_SHAPE), ("decode scalar", topk.FEW_ROWS_SHAPE),
                        ("prefill unsampled", dict(topk.MANY_ROWS_VECTOR_SHAPE, sample_every=0)),
                        ("prefill given bound", dict(topk.MANY_ROWS_VECTOR_SHAPE, sample_every=0, bounded=True)),
                        ("prefill out longest first", dict(topk.MANY_ROWS_VECTOR_SHAPE, caller_allocates_out=True,
                                                           longest_first=True))]:
        table[f"topk {name}"] = lambda shape=shape: topk.build_radix_topk(2048, arch=ARCH, **shape)()
    return table


def program_hashes(only: str = "") -> dict[str, str]:
    """name -> the first 16 hex digits of the SHA-256 of the program's generated CUDA."""
    hashes = {}
    for name, build in programs().items():
        if only in name:
            hashes[name] = hashlib.sha256(build().get_kernel_source().encode()).hexdigest()[:16]
            print(f"{hashes[name]}  {name}", flush=True)
    return hashes


def differences(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """The programs whose hash changed, or that only one side has."""
    return sorted(name for name in before.keys() | after.keys() if before.get(name) != after.get(name))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="write the hashes as JSON here")
    parser.add_argument("--compare", help="a JSON file of hashes from before: exit 1 if any differs")
    parser.add_argument("--only", default="", help="hash only the programs whose name holds this")
    args = parser.parse_args(argv)
    hashes = program_hashes(args.only)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(hashes, handle, indent=1)
    if args.compare:
        with open(args.compare) as handle:
            before = {name: value for name, value in json.load(handle).items() if args.only in name}
        changed = differences(before, hashes)
        names = before.keys() | hashes.keys()
        print(f"{len(names) - len(changed)} of {len(names)} programs identical"
              + (f"; changed or missing: {changed}" if changed else ""))
        return 1 if changed else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
