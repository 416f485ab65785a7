"""Tiny models patched onto the kernels (GPU only): static and dynamic caches select alike, a static-cache decode
step captured in a CUDA graph replays the eager step bit for bit (its CPU side, no host reads: test_sync_free.py),
and FP8 on the kernels selects as the reference. Kernel-level comparisons: test_kernels.py, test_topk_kernel.py."""

from __future__ import annotations

import pytest
import torch

from conftest import KERNEL_MODES

HAS_HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)
gpu = pytest.mark.skipif(not HAS_HOPPER, reason="needs a CUDA GPU of compute capability >= 9.0")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("family", ["deepseek_v32", "glm_moe_dsa"])
@pytest.mark.parametrize("mode,options", KERNEL_MODES)
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


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("family", ["deepseek_v32", "glm_moe_dsa"])
@pytest.mark.parametrize("mode,options", KERNEL_MODES)
def test_patched_decode_on_kernels_dynamic_equals_static_cache(family, mode, options):
    """A tiny model on the kernels: prefill past the radix top-k's width, then 1- and 3-token steps (split key tiles);
    a static cache (slack slots past the written ones) selects the dynamic cache's keys."""
    from transformers import DynamicCache, StaticCache

    from transformers_misa import MisaIndexer, patch_model
    from transformers_misa.tiny import tiny_model

    model = tiny_model(family).cuda()
    patch_model(model, mode=mode, backend="tilelang", **options)
    generator = torch.Generator().manual_seed(5)
    prompt = torch.randint(2, 512, (2, 4200), generator=generator)
    mask = torch.ones_like(prompt)
    mask[1, :9] = 0  # left padding
    steps = [prompt] + [torch.randint(2, 512, (2, n), generator=generator) for n in (1, 3, 1)]
    indexers = [m for m in model.modules() if isinstance(m, MisaIndexer)]

    def run(cache):
        selected, logits, attention = [], [], mask
        hooks = [m.register_forward_hook(lambda mod, args, out: selected.append(out.cpu())) for m in indexers]
        with torch.no_grad():
            for i, step in enumerate(steps):
                if i:
                    attention = torch.cat([attention, torch.ones_like(step)], 1)
                out = model(input_ids=step.cuda(), attention_mask=attention.cuda(), past_key_values=cache)
                logits.append(out.logits[:, -1].float().cpu())
        for hook in hooks:
            hook.remove()
        return selected, logits

    dynamic, dynamic_logits = run(DynamicCache(config=model.config))
    static, static_logits = run(StaticCache(config=model.config, max_cache_len=4300))
    assert len(static) == len(dynamic) == len(indexers) * len(steps)
    for got, want in zip(static, dynamic):
        # Rows of the padded sequence that see fewer than k keys carry masked filler indices: compare the rest.
        same = (got.sort(-1).values.unsqueeze(-1) == want.unsqueeze(-2)).any(-1).float().mean()
        assert same > 0.99, f"static and dynamic caches select different keys ({float(same):.3f} overlap)"
    assert all(torch.isfinite(t).all() for t in static_logits + dynamic_logits)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["dsa", "misa"])
def test_fp8_patched_model_on_kernels_selects_as_the_reference(mode):
    """qk_format='fp8_e4m3' on the kernels (FP8 tensor cores) and on the reference (fp32 over FP8-rounded inputs)
    select nearly the same keys past the radix top-k's width: the tensor cores' shorter accumulation swaps keys
    near the k-th score (MISA-8 on the H100: 0.982 overlap)."""
    from transformers_misa import MisaIndexer, patch_model
    from transformers_misa.tiny import tiny_model

    options = dict(active_heads=8, block_size=64) if mode == "misa" else {}
    prompt = torch.randint(2, 512, (1, 4500), generator=torch.Generator().manual_seed(2)).cuda()
    selections = {}
    for backend_name in ("tilelang", "reference"):
        model = patch_model(tiny_model("deepseek_v32").cuda(), mode=mode, qk_format="fp8_e4m3",
                            backend=backend_name, **options)
        picked = []
        for m in model.modules():
            if isinstance(m, MisaIndexer):
                m.register_forward_hook(lambda mod, args, out: picked.append(out.cpu()))
        with torch.no_grad():
            model(input_ids=prompt, use_cache=False)
        selections[backend_name] = picked
    for ours, ref in zip(selections["tilelang"], selections["reference"]):
        overlap = (ours.sort(-1).values.unsqueeze(-1) == ref.unsqueeze(-2)).any(-1).float().mean()
        assert overlap > 0.97, f"FP8 kernels and reference select different keys ({float(overlap):.3f} overlap)"
