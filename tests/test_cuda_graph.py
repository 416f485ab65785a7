"""A static-cache decode step of a model patched onto the kernels is captured in a CUDA graph and replayed: every
replay gives the eager step's logits bit for bit (GPU only; the CPU side of it, no host reads: test_sync_free.py)."""

from __future__ import annotations

import pytest
import torch

HAS_HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_HOPPER, reason="needs a CUDA GPU of compute capability >= 9.0")
@pytest.mark.parametrize("family", ["deepseek_v32", "glm_moe_dsa"])
@pytest.mark.parametrize("mode,options", [("dsa", {}), ("misa", dict(active_heads=8, block_size=64)),
                                          ("misa_hierarchical", dict(active_heads=8, block_size=64)),
                                          ("hisa", dict(block_size=64))])
@pytest.mark.parametrize("new_tokens", [1, 3])
def test_static_cache_decode_step_replays_in_a_cuda_graph(family, mode, options, new_tokens):
    pytest.importorskip("tilelang", reason="TileLang is not installed")
    from transformers import StaticCache

    from transformers_misa import patch_model
    from transformers_misa.tiny import tiny_model

    # Dense MLPs: transformers' MoE dispatch reads the GPU back (expert hit list), which a graph cannot hold.
    model = patch_model(tiny_model(family, first_k_dense_replace=99).cuda(), mode=mode, backend="tilelang", **options)
    batch, prompt_len, steps, cache_len = 2, 4200, 4, 4300
    generator = torch.Generator().manual_seed(7)
    prompt = torch.randint(2, 512, (batch, prompt_len), generator=generator).cuda()
    tokens = [torch.randint(2, 512, (batch, new_tokens), generator=generator).cuda() for _ in range(steps)]
    key_pos = torch.arange(cache_len, device="cuda")
    real = torch.ones(batch, cache_len, dtype=torch.bool, device="cuda")
    real[1, :9] = False  # left padding

    def inputs(ids: torch.Tensor, start: int) -> dict:
        query_pos = start + torch.arange(ids.shape[1], device="cuda")
        visible = (key_pos <= query_pos[:, None])[None] & real[:, None, :]
        return dict(input_ids=ids, position_ids=query_pos.expand(batch, -1).contiguous(),
                    attention_mask={"indexed_attention": visible[:, None]})  # prepared 4D mask: no mask building

    def prefilled() -> StaticCache:
        cache = StaticCache(config=model.config, max_cache_len=cache_len)
        model(**inputs(prompt, 0), past_key_values=cache)
        return cache

    with torch.no_grad():
        eager_cache, graph_cache = prefilled(), prefilled()
        expected = [model(**inputs(ids, prompt_len + i * new_tokens), past_key_values=eager_cache).logits.clone()
                    for i, ids in enumerate(tokens)]

        # Step 0 runs eagerly on a side stream (warm-up, compiles the decode kernels); step 1 is captured.
        static = {k: v for k, v in inputs(tokens[1], prompt_len + new_tokens).items() if k != "attention_mask"}
        static_mask = inputs(tokens[1], prompt_len + new_tokens)["attention_mask"]["indexed_attention"].clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            first = model(**inputs(tokens[0], prompt_len), past_key_values=graph_cache).logits.clone()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = model(**static, attention_mask={"indexed_attention": static_mask}, past_key_values=graph_cache).logits

        replayed = [first]
        for i in range(1, steps):
            step = inputs(tokens[i], prompt_len + i * new_tokens)
            static["input_ids"].copy_(step["input_ids"])
            static["position_ids"].copy_(step["position_ids"])
            static_mask.copy_(step["attention_mask"]["indexed_attention"])
            graph.replay()
            replayed.append(out.clone())
    for i, (got, want) in enumerate(zip(replayed, expected)):
        assert torch.equal(got, want), f"step {i}: the replayed graph's logits differ from the eager step's"
