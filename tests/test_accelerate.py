"""accelerate: patching a model dispatched with CPU and disk offload keeps its hooks working."""

import pytest
import torch
from accelerate import dispatch_model

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
