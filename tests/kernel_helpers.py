"""Shared by the kernel tests: the GPU marker, the TileLang check, seeded inputs, masks and the comparisons with the
reference (a module, not a test file, so that each kernel's test file imports what it uses)."""

from __future__ import annotations

import shutil

import pytest
import torch


HAS_HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)
gpu = pytest.mark.skipif(not HAS_HOPPER, reason="needs a CUDA GPU of compute capability >= 9.0")


def _tilelang_or_skip():
    tilelang = pytest.importorskip("tilelang", reason="TileLang is not installed")
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is absent: TileLang cannot compile CUDA here")
    return tilelang


def _ptxas_report(source: str, folder) -> str:
    """What ptxas says (-v) compiling a TileLang program's CUDA source for sm_90a with TileLang's headers."""
    import os
    import subprocess

    import tilelang

    root = os.path.dirname(tilelang.__file__)
    path = folder / "program.cu"
    path.write_text(source)
    command = ["nvcc", "-cubin", "-o", str(folder / "program.cubin"), "-gencode=arch=compute_90a,code=sm_90a",
               "-std=c++17", "-O3", "-w", f"-I{root}/src", f"-I{root}/3rdparty/cutlass/include",
               f"-I{root}/3rdparty/tvm/include", "-DENABLE_BF16", "--expt-relaxed-constexpr", "-Xptxas", "-v",
               str(path)]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stderr


def _changed_lines(before: str, after: str) -> list[str]:
    """Lines of `after` that `before` lacks and vice versa."""
    import difflib

    return [line for line in difflib.unified_diff(before.splitlines(), after.splitlines(), lineterm="", n=0)
            if line[:1] in "+-" and line[:3] not in ("+++", "---")]


def _inputs(batch, num_queries, num_keys, heads, dim=128, seed=0):
    generator = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(batch, num_queries, heads, dim, device="cuda", generator=generator).bfloat16()
    keys = torch.randn(batch, num_keys, dim, device="cuda", generator=generator).bfloat16()
    weights = torch.randn(batch, num_queries, heads, device="cuda", generator=generator)
    return q, keys, weights


def _padded_causal_mask(batch, num_queries, num_keys, pads):
    query_pos = torch.arange(num_queries, device="cuda") + num_keys - num_queries
    key_pos = torch.arange(num_keys, device="cuda")
    mask = (key_pos[None, None, :] <= query_pos[None, :, None]).expand(batch, -1, -1).clone()
    for row, pad in enumerate(pads):
        mask[row, :, :pad] = False
    return mask


def _assert_logits_match(ours, ref, tolerance):
    """The same masked (-inf) positions, and the finite logits close to the reference's."""
    assert torch.equal(torch.isinf(ours), torch.isinf(ref)), "masked positions differ"
    finite = torch.isfinite(ref)
    torch.testing.assert_close(ours[finite], ref[finite], rtol=tolerance, atol=tolerance)


def _assert_same_selection(ours, ref_idx, scores, tolerance):
    """Selections agree up to near-ties: every key we pick scores at least the reference's k-th score - tol."""
    kth = scores.gather(-1, ref_idx.long()).min(-1, keepdim=True).values
    picked = scores.gather(-1, ours.long())
    finite_rows = torch.isfinite(kth).squeeze(-1)
    assert bool((picked[finite_rows] >= kth[finite_rows] - tolerance).all())


def _assert_same_visible_columns(got, expected, ends, k):
    """Each row's picked columns before its end are the expected ones, and its k columns are distinct (a row seeing
    fewer than k keys fills up with any columns past its end)."""
    for row, end in enumerate(ends.tolist()):
        assert {c for c in got[row].tolist() if c < end} == {c for c in expected[row].tolist() if c < end}, row
        assert len(set(got[row].tolist())) == k, f"row {row}: repeated index"
