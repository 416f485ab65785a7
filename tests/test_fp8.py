"""The FP8 (e4m3, per-token power-of-two scale) numerics option of the indexer's q and k."""

from __future__ import annotations

import pytest
import torch

from transformers_misa import measure_recall, patch_model, unpatch_model
from transformers_misa.ops.blocks import FP8_E4M3_MAX, fp8_e4m3_quantize, fp8_e4m3_roundtrip
from transformers_misa.tiny import tiny_model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_roundtrip_is_fp8_values_times_a_power_of_two(dtype):
    x = (torch.randn(3, 5, 128) * torch.logspace(-3, 3, 5)[None, :, None]).to(dtype)
    y = fp8_e4m3_roundtrip(x)
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.equal(fp8_e4m3_roundtrip(y), y)  # idempotent: already on the FP8 grid
    amax = x.float().abs().amax(-1, keepdim=True)
    scale = torch.exp2(torch.ceil(torch.log2(amax / FP8_E4M3_MAX)))
    grid = y.float() / scale
    assert torch.equal(grid.to(torch.float8_e4m3fn).float(), grid) and grid.abs().max() <= FP8_E4M3_MAX
    # e4m3 keeps 3 mantissa bits: error at most half a step, 2^-4 of the value, or half the subnormal step.
    error = (y.float() - x.float()).abs()
    assert (error <= torch.maximum(x.float().abs() * 2**-4, scale * 2**-10) + 1e-6 * amax).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_in_the_input_dtype_equals_quantizing_from_fp32(dtype):
    """The quantizer divides in x's dtype (no fp32 copy): bit for bit what dividing in fp32 gives, and quantizing
    FP8-rounded values again reproduces each product value·scale exactly (what the FP8 kernels rely on)."""
    x = (torch.randn(4, 9, 128) * torch.logspace(-6, 5, 9)[None, :, None]).to(dtype)
    x[0, 0] = 0.0
    values, scale = fp8_e4m3_quantize(x)
    in_fp32 = (x.float() / scale.unsqueeze(-1)).to(torch.float8_e4m3fn)
    assert torch.equal(values.view(torch.uint8), in_fp32.view(torch.uint8))
    again, again_scale = fp8_e4m3_quantize(fp8_e4m3_roundtrip(x))
    assert torch.equal(again.float() * again_scale.unsqueeze(-1), values.float() * scale.unsqueeze(-1))


def test_rows_are_scaled_independently():
    x = torch.tensor([[1.0, 2.0, 3.0], [1000.0, 2000.0, 3000.0]])
    y = fp8_e4m3_roundtrip(x)
    assert torch.allclose(y[1] / 1000, y[0], rtol=0.07)
    assert torch.equal(fp8_e4m3_roundtrip(torch.zeros(2, 4)), torch.zeros(2, 4))


@pytest.mark.parametrize("mode, options", [("dsa", {}), ("misa", dict(active_heads=8, block_size=16)),
                                           ("hisa", dict(block_size=16))])
def test_fp8_mode_runs_and_stays_close_to_bf16(mode, options):
    model = tiny_model("deepseek_v32", index_topk=32)
    ids = torch.randint(2, 512, (1, 160), generator=torch.Generator().manual_seed(0))
    patch_model(model, mode=mode, qk_format="fp8_e4m3", **options)
    assert model.misa_config.qk_format == "fp8_e4m3"
    recall = measure_recall(model, ids)  # against bf16 (as computed) DSA
    out = model.generate(ids, max_new_tokens=2, do_sample=False)
    unpatch_model(model)
    assert out.shape == (1, 162)
    if mode == "dsa":
        assert 0.8 < recall.mean < 1.0  # FP8 rounding moves a few boundary keys, not many
