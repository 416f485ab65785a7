"""What the variant sweeps share (sweep_logits, sweep_topk, sweep_router): their common arguments, compiling every
variant's program in parallel processes first, and writing the results file (the probes write theirs here too)."""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import importlib
import json
import multiprocessing
import pathlib
from collections.abc import Hashable

Job = tuple[str, tuple, dict]  # ("module:builder", positional arguments, build options)
RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def sweep_parser(doc: str, reps: int, workers: int) -> argparse.ArgumentParser:
    """An argument parser with the sweeps' common options (--reps, --workers, --out, --variants) and these defaults."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=reps)
    parser.add_argument("--workers", type=int, default=workers, help="processes compiling the variants")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
    parser.add_argument("--variants", default="", help="comma-separated variant names to run (default: all)")
    return parser


def chosen(variants: dict, names: str) -> list:
    """The variant names `--variants` picks (all when empty), in the table's order; an unknown name is an error."""
    wanted = [name for name in names.split(",") if name]
    unknown = sorted(set(wanted) - set(variants))
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose among {sorted(variants)}")
    return [name for name in variants if not wanted or name in wanted]


def _compile(job: Job) -> str:
    """Builds one program (filling TileLang's disk cache); '' when it built, else the error in one line."""
    builder, args, options = job
    module, name = builder.split(":")
    try:
        getattr(importlib.import_module(module), name)(*args, **options)()
        return ""
    except Exception as error:  # reported per variant, the others go on
        return f"{type(error).__name__}: {str(error)[:200]}"


def compile_variants(jobs: dict[Hashable, Job], workers: int) -> dict[Hashable, str]:
    """Compiles every job in `workers` spawned processes (the caller's CUDA context stays its own); key -> error."""
    spawn = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=spawn) as pool:
        return dict(zip(jobs, pool.map(_compile, jobs.values())))


def write_results(out: pathlib.Path, name: str, payload: dict) -> pathlib.Path:
    """Writes payload as out/name-<UTC stamp>.json and says where."""
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    path = out / f"{name}-{stamp}.json"
    path.write_text(json.dumps(payload, indent=1))
    print(f"wrote {path}")
    return path
