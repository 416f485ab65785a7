"""Logits as two 16-bit planes (`split_halves`): the logits program writes each fp32 logit's high and low halves, the
radix top-k reads the high plane in its passes and a low half only for the keys in the k-th key's bin. They compile
for sm_90a everywhere (CI); on a Hopper GPU (marked gpu) the halves join back to the fp32 program's logits and the
top-k over them selects exactly the set it selects over fp32."""

from __future__ import annotations

import re
import shutil

import pytest
import torch

from transformers_misa.ops.blocks import ChunkMask

HAS_HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)
gpu = pytest.mark.skipif(not HAS_HOPPER, reason="needs a CUDA GPU of compute capability >= 9.0")


def _tilelang_or_skip():
    pytest.importorskip("tilelang", reason="TileLang is not installed")
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is absent: TileLang cannot compile CUDA here")


def split_into_halves(scores: torch.Tensor) -> torch.Tensor:
    """fp32 [...] -> [2, ...] int16 as the logits program writes them: high and low halves, -0.0 as +0.0."""
    bits = (scores + 0.0).view(torch.int32)  # x + 0.0 turns -0.0 into +0.0 and leaves every other value alone
    high = (bits >> 16).to(torch.int16)
    low = (bits & 0xFFFF).to(torch.int32)
    low = torch.where(low >= 0x8000, low - 0x10000, low).to(torch.int16)
    return torch.stack([high, low])


def test_join_halves_inverts_the_split():
    from transformers_misa.kernels.scorer import join_halves, to_halves

    values = torch.tensor([0.0, -0.0, 1.5, -1.5, 3.4e38, -3.4e38, 1e-40, -1e-40, float("inf"), float("-inf"),
                           1.0000001, -2.0000002])
    joined = join_halves(split_into_halves(values))
    assert torch.equal(joined, values)  # -0.0 == +0.0
    assert not bool(torch.signbit(joined[1])), "-0.0 is written as +0.0"
    assert torch.equal(joined.view(torch.int32)[2:], values.view(torch.int32)[2:])
    assert torch.equal(to_halves(values), split_into_halves(values))


@pytest.mark.parametrize("program", ["misa8_overlapped", "dsa64_wide", "decode8_split_keys", "fp8_8"])
def test_split_halves_logits_compile_for_sm90a(program):
    """The shapes the scorer runs: halves straight from the registers (interleaved), or through the fp32 tile in
    shared memory (every other layout), staged (TMA) or per thread."""
    _tilelang_or_skip()
    from transformers_misa.kernels.scoring import build_weighted_relu_logits

    heads, options = {
        "misa8_overlapped": (8, dict(staged_stores=True, interleaved=True, overlapped=True, num_stages=4)),
        "dsa64_wide": (64, dict(rows_per_cta=256, block_n=64, overlapped=True, num_stages=4)),
        "decode8_split_keys": (8, dict(rows_per_cta=8, key_splits=4)),
        "fp8_8": (8, dict(staged_stores=True, fp8=True)),
    }[program]
    source = build_weighted_relu_logits(heads, 128, fill_future=False, split_halves=True, arch="sm_90a",
                                        **options)().get_kernel_source()
    assert "short* __restrict__ Logits" in source or "Logits_desc" in source
    if options.get("staged_stores"):
        assert source.count("tma_store(") % 2 == 0 and "high_shared" in source and "low_shared" in source
    if options.get("overlapped") and options.get("staged_stores"):
        # a consumer barrier before each staged tile's shared-memory writes and one before its two stores
        sites = source.count("tma_store_arrive()") // 2
        assert source.count("__sync_thread_partial(") == 2 * sites


def test_split_halves_refuses_the_candidate_variant():
    _tilelang_or_skip()
    from transformers_misa.kernels.scoring import build_weighted_relu_logits
    from transformers_misa.kernels.topk import build_radix_topk

    with pytest.raises(ValueError, match="split_halves is for the dense programs"):
        build_weighted_relu_logits(8, 128, capacity=1024, split_halves=True, arch="sm_90a")
    with pytest.raises(ValueError, match="with_keys"):
        build_radix_topk(2048, with_keys=True, split_halves=True, arch="sm_90a")


def test_radix_topk_on_halves_compiles_for_sm90a():
    _tilelang_or_skip()
    from transformers_misa.kernels.topk import build_radix_topk

    source = build_radix_topk(2048, split_halves=True, min_ctas_per_sm=4, arch="sm_90a")().get_kernel_source()
    assert "short* __restrict__ Scores" in source
    # the passes over the row read the high plane; the low plane only where a key falls in the k-th key's bin
    assert re.search(r"values\[\w+\] = \(\(int\)Scores\[", source)


def test_logits_options_stage_halves_on_16_byte_rows():
    pytest.importorskip("tilelang", reason="TileLang is not installed")
    from transformers_misa.kernels.scorer import logits_options

    def staged(num_keys, halves):
        return logits_options(8, 1, 8192, num_keys, 132, fill_future=False, interleaved=True,
                              split_halves=halves)["staged_stores"]

    assert staged(65536, True) and staged(65532, False)
    assert not staged(65532, True)  # 65532 halves are not a whole number of 16-byte units
    assert logits_options(8, 1, 8192, 65536, 132, fill_future=False, split_halves=True)["split_halves"]


# ----------------------------------------------------------------------------------------------- GPU


def _inputs(batch, num_queries, num_keys, heads, seed=0):
    generator = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(batch, num_queries, heads, 128, device="cuda", generator=generator).bfloat16()
    keys = torch.randn(batch, num_keys, 128, device="cuda", generator=generator).bfloat16()
    weights = torch.randn(batch, num_queries, heads, device="cuda", generator=generator)
    return q, keys, weights


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("heads,num_queries,num_keys,first_key", [
    (8, 700, 9000, 8300),  # interleaved, overlapped, staged: halves from the registers
    (8, 300, 9002, 8702),  # keys not a multiple of 8: per-thread halves stores
    (64, 300, 5000, 4700),  # the wide 256-row DSA shape: halves through the fp32 tile
    (4, 3, 40000, 39997),  # decode: key tiles split over CTAs
    (32, 129, 3000, 2871),  # GLM-5's 32 heads
])
@pytest.mark.parametrize("fill_future", [False, True])
def test_split_halves_join_to_the_fp32_logits(heads, num_queries, num_keys, first_key, fill_future):
    from transformers_misa.kernels.scorer import _logits, join_halves

    q, keys, weights = _inputs(2, num_queries, num_keys, heads, seed=heads)
    ke = (torch.arange(num_queries, device="cuda", dtype=torch.int32) + first_key + 1).clamp_max(num_keys)
    ke = ke.expand(2, -1).contiguous()
    ks = torch.zeros_like(ke)
    ks[1] = 5  # a left-padded row
    fp32 = _logits(q, weights, keys, ks, ke, 128**-0.5, fill_future=fill_future)
    halves = _logits(q, weights, keys, ks, ke, 128**-0.5, fill_future=fill_future, split_halves=True)
    assert halves.shape == (2, *fp32.shape) and halves.dtype == torch.int16
    joined = join_halves(halves)
    written = torch.arange(num_keys, device="cuda") < ke.unsqueeze(-1)
    if fill_future:
        written = torch.ones_like(written)
    assert torch.equal(torch.isinf(joined[written]), torch.isinf(fp32[written]))
    assert not bool(torch.signbit(joined[written]).logical_and(joined[written] == 0).any()), "-0.0 written as +0.0"
    finite = written & torch.isfinite(fp32)
    torch.testing.assert_close(joined[finite], fp32[finite], rtol=1e-5, atol=1e-4)


def _rows_with_ties_and_signs(rows: int, width: int, seed: int) -> torch.Tensor:
    generator = torch.Generator(device="cuda").manual_seed(seed)
    scores = torch.randn(rows, width, device="cuda", generator=generator) * 4
    scores[0] = scores[0].round()  # heavy ties
    scores[1, : width // 2] = 0.0  # a run of zeros straddling the k-th
    scores[1, : width // 4] = -0.0  # ... half of them -0.0 (written as +0.0): they tie
    scores[2] = -scores[2].abs()  # all negative
    scores[3] = scores[3] * 1e-39  # denormals
    scores[4, width // 3 :] = float("-inf")  # masked tail
    return scores


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("buffer", [16, 4096])  # the re-reading path (bin past the buffer) and the buffered one
@pytest.mark.parametrize("shape", [dict(min_ctas_per_sm=4), dict(threads=1024, unroll=8)])
def test_radix_topk_on_halves_selects_what_it_selects_on_fp32(buffer, shape):
    from transformers_misa.kernels.topk import build_radix_topk

    width = 70001
    scores = _rows_with_ties_and_signs(8, width, seed=buffer)
    ends = torch.tensor([70001, 70000, 65537, 33000, 16385, 4097, 2048, 100], device="cuda", dtype=torch.int32)
    garbage = torch.arange(width, device="cuda") >= ends.unsqueeze(-1)
    scores = scores.masked_fill(garbage, 1e30)  # never read
    expected = build_radix_topk(2048, buffer=buffer, **shape)()(scores, ends)
    halves = split_into_halves(scores).contiguous()
    got = build_radix_topk(2048, buffer=buffer, split_halves=True, **shape)()(halves, ends)
    for row, end in enumerate(ends.tolist()):  # rows seeing fewer than k keys fill up with any unread columns
        assert {c for c in got[row].tolist() if c < end} == {c for c in expected[row].tolist() if c < end}, row
        assert len(set(got[row].tolist())) == 2048, f"row {row}: repeated index"


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("batch,num_queries,num_keys,heads,pads", [
    (1, 1500, 9000, 8, [0]),
    (2, 300, 5000, 64, [0, 700]),
    (3, 4, 40000, 64, [0, 1, 39000]),
])
def test_fused_select_on_halves_equals_fp32(batch, num_queries, num_keys, heads, pads):
    """The default select (halves) and the fp32 one pick the same keys from the same logits."""
    from transformers_misa.kernels.scorer import tilelang_select_tokens

    q, keys, weights = _inputs(batch, num_queries, num_keys, heads, seed=5)
    query_pos = torch.arange(num_queries, device="cuda") + num_keys - num_queries
    mask = (torch.arange(num_keys, device="cuda")[None, None, :] <= query_pos[None, :, None]).expand(batch, -1, -1)
    mask = mask.clone()
    for row, pad in enumerate(pads):
        mask[row, :, :pad] = False
    chunk = ChunkMask(mask, slice(0, num_queries), batch, num_queries, num_keys, q.device)
    halves = tilelang_select_tokens(q, weights, keys, chunk, 128**-0.5, 2048)
    fp32 = tilelang_select_tokens(q, weights, keys, chunk, 128**-0.5, 2048, split_halves=False)
    def visible_picks(picked):  # rows seeing fewer than k keys fill up with masked ones, in no meaningful order
        return torch.where(mask.gather(-1, picked.long()), picked, -1).sort(-1).values

    assert torch.equal(visible_picks(halves), visible_picks(fp32))
