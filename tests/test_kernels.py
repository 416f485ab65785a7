"""The TileLang kernels: they compile for sm_90a everywhere (CI), match the reference on a Hopper GPU (marked gpu),
and the dispatch picks the reference wherever they cannot run. The logits program's own tests are in
test_logits_kernel.py, the top-k's, the router's and the threshold path's in theirs."""

from __future__ import annotations

import warnings

import pytest
import torch

from conftest import exact_fraction
from kernel_helpers import _assert_same_selection, _inputs, _padded_causal_mask, _tilelang_or_skip, gpu
from transformers_misa import backend
from transformers_misa.ops import reference
from transformers_misa.ops.blocks import TailBlock
from transformers_misa.ops.masks import ChunkMask


@pytest.mark.parametrize("heads", [64, 32])
def test_router_kernel_compiles_for_sm90a(heads):
    _tilelang_or_skip()
    from transformers_misa.kernels.router import build_head_importance

    source = build_head_importance(heads, 128, 128, arch="sm_90a")().get_kernel_source()
    assert "wgmma" in source


@pytest.mark.parametrize("heads", [64, 32])
def test_gathered_kernel_compiles_for_sm90a(heads):
    _tilelang_or_skip()
    from transformers_misa.kernels.gathered import build_gathered_logits

    assert "wgmma" in build_gathered_logits(heads, 128, arch="sm_90a")().get_kernel_source()


def test_checkout_kernels_folder_does_not_shadow_the_hub_kernels_library(tmp_path):
    """From a source checkout's root (on sys.path first, as `python -m pytest` puts it), `import kernels` must reach the
    Hub's `kernels` library, which transformers imports where it is installed, not this repository's folder; without
    that library the folder stands in, empty."""
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    library = tmp_path / "site" / "kernels"
    library.mkdir(parents=True)
    (library / "__init__.py").write_text("CUDAProperties = 'the Hub library'\n")
    probe = "import kernels; print(getattr(kernels, 'CUDAProperties', 'checkout'))"
    for extra, expected in ((str(tmp_path / "site"), "the Hub library"), ("", "checkout")):
        # -S: no site-packages, so that an installed Hub library cannot answer for the folder
        result = subprocess.run([sys.executable, "-S", "-c", probe], cwd=root, capture_output=True, text=True,
                                env={"PATH": "", "PYTHONPATH": extra, "PYTHONNOUSERSITE": "1"}, timeout=60)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == expected


def test_dispatch_uses_reference_on_cpu():
    assert backend.select_scorer(torch.device("cpu")) is reference.REFERENCE
    assert "CUDA" in backend.kernel_unavailable_reason(torch.device("cpu"))
    with pytest.raises(RuntimeError, match="backend='tilelang' cannot run here"):
        backend.select_scorer(torch.device("cpu"), "tilelang")


def test_failing_kernel_falls_back_once_with_a_warning(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("simulated compile failure")

    monkeypatch.setattr(backend, "_broken_kernels", set())
    failing = reference.Scorer("always-fails", broken, reference.top_indices, lambda h, t: 4 * t)
    guarded = backend._guarded(failing)
    q, keys, weights = torch.randn(1, 5, 4, 16), torch.randn(1, 9, 16), torch.randn(1, 5, 4)
    chunk = ChunkMask(None, slice(0, 5), 1, 5, 9, q.device)
    expected = reference.reference_token_logits(q, weights, keys, chunk, 0.25)
    with pytest.warns(RuntimeWarning, match="always-fails kernel failed"):
        first = guarded.token_logits(q, weights, keys, chunk, 0.25)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        second = guarded.token_logits(q, weights, keys, chunk, 0.25)
    torch.testing.assert_close(first, expected)
    torch.testing.assert_close(second, expected)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("batch,num_queries,num_keys,heads,k,pads", [
    (2, 300, 5000, 64, 2048, [0, 700]),  # prefill chunk at the end of a longer cache, left padding
    (2, 700, 9000, 8, 2048, [0, 3]),  # routed-head width
    (3, 4, 40000, 64, 2048, [0, 1, 39000]),  # decode (4 speculative queries): key tiles split over CTAs
    (32, 1, 20000, 32, 2048, [0] * 32),  # decode batch, GLM-5's 32 heads
    (1, 3, 6000, 8, 4096, [2100]),  # k above some rows' visible keys
    (4, 1, 30000, 8, 2048, [0, 0, 5, 29000]),  # decode with 8 routed heads: an 8-row CTA
])
def test_fused_select_matches_reference(batch, num_queries, num_keys, heads, k, pads):
    """tilelang_select_tokens (unwritten future + per-row ends) picks DSA's top-k up to near-ties."""
    from transformers_misa.kernels.logits_shapes import key_splits_for
    from transformers_misa.kernels.scorer import tilelang_select_tokens

    q, keys, weights = _inputs(batch, num_queries, num_keys, heads, seed=7)
    mask = _padded_causal_mask(batch, num_queries, num_keys, pads)
    chunk = ChunkMask(mask, slice(0, num_queries), batch, num_queries, num_keys, q.device)
    ours = tilelang_select_tokens(q, weights, keys, chunk, 128**-0.5, k)
    dense = reference.reference_token_logits(q, weights, keys, chunk, 128**-0.5)
    ref = reference.top_indices(dense, k)
    assert ours.shape == (batch, num_queries, k)
    assert bool((ours.sort(-1).values.diff(dim=-1) > 0).all()), "repeated index"
    _assert_same_selection(ours, ref, dense, tolerance=5e-2)
    visible = torch.isfinite(dense).sum(-1)
    picked_visible = torch.isfinite(dense.gather(-1, ours.long())).sum(-1)
    assert torch.equal(picked_visible, visible.clamp_max(k)), "a visible key was left out for a masked one"
    if num_queries <= 4:
        assert key_splits_for(q.device, batch * num_queries, num_keys) > 1, "decode should split the key tiles"
    out = torch.full((batch, num_queries, k), -1, dtype=torch.int32, device="cuda")  # a caller's output: in place
    assert tilelang_select_tokens(q, weights, keys, chunk, 128**-0.5, k, out=out) is out
    # the same visible keys (the order, and which masked keys fill a row short of k visible ones, are the atomics')
    assert exact_fraction(out, ours, dense) == 1.0
    # build options reach the top-k: without the second pass's value filter, the same visible keys
    unfiltered = tilelang_select_tokens(q, weights, keys, chunk, 128**-0.5, k, topk_options=dict(value_filter=False))
    assert exact_fraction(unfiltered, ours, dense) == 1.0
    compact = tilelang_select_tokens(q, weights, keys, chunk, 128**-0.5, k,
                                     topk_options=dict(compact_second_pass=True, bins_in_registers=True))
    assert exact_fraction(compact, ours, dense) == 1.0


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("batch,num_queries,num_keys,heads,block_size,pads", [
    (1, 33, 33, 64, 16, [0]),
    (2, 200, 1000, 64, 128, [0, 300]),
    (3, 5, 4099, 32, 64, [0, 1, 4000]),
])
def test_router_kernel_matches_reference(batch, num_queries, num_keys, heads, block_size, pads):
    from transformers_misa.kernels.routing import tilelang_head_importance

    q, keys, weights = _inputs(batch, num_queries, num_keys, heads, seed=2)
    mask = _padded_causal_mask(batch, num_queries, num_keys, pads)
    pooled = reference.pooled_keys(keys, mask, block_size)
    for chunk_mask in (None, mask):
        chunk = ChunkMask(chunk_mask, slice(0, num_queries), batch, num_queries, num_keys, q.device)
        for tail in (None, TailBlock(keys, chunk, block_size)):  # the kernel sums full blocks, the tail on top
            ours = tilelang_head_importance(q, weights, pooled, chunk, block_size, 128**-0.5, tail=tail)
            ref = reference.reference_head_importance(q, weights, pooled, chunk, block_size, 128**-0.5, tail=tail)
            torch.testing.assert_close(ours, ref, rtol=3e-2, atol=3e-2)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("batch,num_queries,num_keys,heads,candidates", [
    (1, 3, 100, 64, 37), (2, 50, 5000, 64, 512), (3, 7, 3000, 32, 130)])
def test_gathered_kernel_matches_reference(batch, num_queries, num_keys, heads, candidates):
    from transformers_misa.kernels.scorer import tilelang_candidate_logits

    q, keys, weights = _inputs(batch, num_queries, num_keys, heads, seed=4)
    generator = torch.Generator(device="cuda").manual_seed(5)
    positions = torch.randint(0, num_keys, (batch, num_queries, candidates), device="cuda", generator=generator)
    ours = tilelang_candidate_logits(q, weights, keys, positions, 128**-0.5)
    ref = reference.reference_candidate_logits(q, weights, keys, positions, 128**-0.5)
    torch.testing.assert_close(ours, ref, rtol=2e-2, atol=2e-2)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["dsa", "misa", "misa_hierarchical", "hisa"])
@pytest.mark.parametrize("num_queries,num_keys,topk,heads", [(200, 200, 64, 64), (300, 300, 512, 32), (3, 1030, 64, 64)])
def test_modes_on_kernels_match_reference(mode, num_queries, num_keys, topk, heads):
    from transformers_misa.kernels.scorer import TILELANG_SCORER

    q, keys, weights = _inputs(2, num_queries, num_keys, heads, seed=1)
    mask = _padded_causal_mask(2, num_queries, num_keys, [0, 9])
    options = {
        "dsa": {},
        "misa": dict(active_heads=8, block_size=64),
        "misa_hierarchical": dict(active_heads=8, block_size=64, candidate_factor=2),
        "hisa": dict(block_size=64, keep_blocks=max(2, -(-topk // 64))),
    }[mode]
    run = getattr(reference, f"{mode}_topk")
    ours = run(q, keys, weights, topk, softmax_scale=128**-0.5, mask=mask, scorer=TILELANG_SCORER, **options)
    ref = run(q, keys, weights, topk, softmax_scale=128**-0.5, mask=mask, **options)
    assert ours.shape == ref.shape and ours.dtype == torch.int32
    # Judge both against the full DSA score; bf16 tensor-core products differ from fp32 by ~1e-2.
    chunk = ChunkMask(mask, slice(0, num_queries), 2, num_queries, num_keys, q.device)
    dense = reference.reference_token_logits(q, weights, keys, chunk, 128**-0.5)
    if mode == "dsa":
        _assert_same_selection(ours, ref, dense, tolerance=5e-2)
    else:
        # Routed modes may legitimately route a near-tied head differently; their recall must stay close.
        overlap = (torch.sort(ours, -1).values.unsqueeze(-1) == ref.unsqueeze(-2)).any(-1).float().mean()
        assert overlap > 0.97, f"kernel and reference {mode} selections overlap only {overlap:.3f}"


@pytest.mark.parametrize("mode", ["dsa", "misa", "misa_hierarchical", "hisa"])
def test_narrowing_to_live_keys_keeps_selections(mode):
    """The kernel path skips keys past each chunk's last visible key; on the reference math that must not change
    which keys are picked (checked with the CPU scorer, narrowing switched on, many small chunks)."""
    import dataclasses

    generator = torch.Generator().manual_seed(3)
    q = torch.randn(2, 70, 8, 16, generator=generator)
    keys, weights = torch.randn(2, 90, 16, generator=generator), torch.randn(2, 70, 8, generator=generator)
    mask = torch.ones(2, 70, 90, dtype=torch.bool).tril(diagonal=20)
    mask[1, :, :7] = False  # left padding
    options = {"dsa": {}, "misa": dict(active_heads=3, block_size=8),
               "misa_hierarchical": dict(active_heads=3, block_size=8, candidate_factor=2),
               "hisa": dict(block_size=8, keep_blocks=3)}[mode]
    run = getattr(reference, f"{mode}_topk")
    narrowing = dataclasses.replace(reference.REFERENCE, narrow_keys=True)
    full = run(q, keys, weights, 12, softmax_scale=0.25, mask=mask, chunk_size=9, **options)
    narrow = run(q, keys, weights, 12, softmax_scale=0.25, mask=mask, chunk_size=9, scorer=narrowing, **options)
    chunk = ChunkMask(mask, slice(0, 70), 2, 70, 90, q.device)
    scores = reference.reference_token_logits(q, weights, keys, chunk, 0.25)
    finite_full = torch.isfinite(scores.gather(-1, full.long()))
    finite_narrow = torch.isfinite(scores.gather(-1, narrow.long()))
    assert int(narrow.max()) < 90
    if mode.startswith("misa"):
        # The router sums over fewer (zero) blocks, so a near-tied head may flip: the picks stay close.
        overlap = (narrow.unsqueeze(-1) == full.unsqueeze(-2)).any(-1).float().mean()
        assert overlap > 0.97
        return
    assert torch.equal(finite_full, finite_narrow)
    assert torch.equal(full.sort(-1).values[finite_full.all(-1)], narrow.sort(-1).values[finite_narrow.all(-1)])
