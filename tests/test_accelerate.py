"""accelerate: patching a model dispatched with CPU and disk offload keeps its hooks working."""

import pytest
import torch
from accelerate import dispatch_model

from conftest import KERNEL_MODES
from transformers_misa import MisaIndexer, patch_model, unpatch_model
from transformers_misa.tiny import tiny_model


@pytest.mark.parametrize("family", ["deepseek_v32", "glm_moe_dsa"])
def test_patch_on_cpu_and_disk_offloaded_model(family, tmp_path):
    ids = torch.randint(2, 512, (1, 150), generator=torch.Generator().manual_seed(0))
    in_memory = patch_model(tiny_model(family), mode="misa", active_heads=8, block_size=32)
    expected = in_memory.generate(ids, max_new_tokens=4, do_sample=False)

    model = tiny_model(family)
    layers = model.config.num_hidden_layers
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu",
                  "model.layers.0": "cpu", **{f"model.layers.{i}": "disk" for i in range(1, layers)}}
    model = dispatch_model(model, device_map=device_map, offload_dir=str(tmp_path))
    unpatched = model.generate(ids, max_new_tokens=4, do_sample=False)
    patch_model(model, mode="misa", active_heads=8, block_size=32)

    indexers = [m for m in model.modules() if isinstance(m, MisaIndexer)]
    assert indexers and all(hasattr(m, "_hf_hook") for m in indexers)  # the replacement carries accelerate's hook
    assert all(m.wq_b.weight.device.type == "meta" for m in indexers[1:])  # disk layers: weights stay offloaded
    assert torch.equal(model.generate(ids, max_new_tokens=4, do_sample=False), expected)
    unpatch_model(model)
    assert torch.equal(model.generate(ids, max_new_tokens=4, do_sample=False), unpatched)


TWO_GPUS = torch.cuda.is_available() and torch.cuda.device_count() >= 2


@pytest.mark.gpu
@pytest.mark.skipif(not TWO_GPUS, reason="needs two CUDA GPUs (run on the device machine's 2-GPU kind)")
@pytest.mark.parametrize("family", ["deepseek_v32", "glm_moe_dsa"])
@pytest.mark.parametrize("mode,options", KERNEL_MODES)
@pytest.mark.parametrize("backend_name", ["reference", "tilelang"])
def test_patch_on_model_split_over_two_gpus(family, mode, options, backend_name):
    """Layers on cuda:0 and cuda:1: each patched indexer stays on its layer's GPU, runs there (the kernels too: a
    prompt past the radix top-k's width, then decode steps with split key tiles) and generates the very tokens of
    the same patched model on one GPU; unpatching gives back the dispatched model's own tokens."""
    import warnings

    from transformers_misa import backend

    if backend_name == "tilelang" and backend.kernel_unavailable_reason(torch.device("cuda", 1)) is not None:
        pytest.skip(backend.kernel_unavailable_reason(torch.device("cuda", 1)))
    options = dict(options, backend=backend_name)
    ids = torch.randint(2, 512, (1, 4200), generator=torch.Generator().manual_seed(3))
    on_one_gpu = patch_model(tiny_model(family, dtype=torch.bfloat16).to("cuda:0"), mode=mode, **options)
    expected = on_one_gpu.generate(ids.to("cuda:0"), max_new_tokens=6, do_sample=False).cpu()
    del on_one_gpu

    model = tiny_model(family, dtype=torch.bfloat16)
    last = model.config.num_hidden_layers - 1
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": 1, "lm_head": 1,
                  **{f"model.layers.{i}": 0 if i < last else 1 for i in range(last + 1)}}
    model = dispatch_model(model, device_map=device_map)
    unpatched = model.generate(ids.to("cuda:0"), max_new_tokens=6, do_sample=False).cpu()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a kernel falling back to the reference fails the test
        patch_model(model, mode=mode, **options)
        indexers = [m for m in model.modules() if isinstance(m, MisaIndexer)]
        assert {m.wq_b.weight.device.index for m in indexers} == {0, 1}
        for m in indexers:
            layer_device = model.model.layers[m.layer_idx].self_attn.kv_a_proj_with_mqa.weight.device
            assert all(p.device == layer_device for p in m.parameters())
        got = model.generate(ids.to("cuda:0"), max_new_tokens=6, do_sample=False).cpu()
    assert torch.equal(got, expected)
    unpatch_model(model)
    assert torch.equal(model.generate(ids.to("cuda:0"), max_new_tokens=6, do_sample=False).cpu(), unpatched)
