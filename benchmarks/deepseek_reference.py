"""DeepSeek-V3.2-Exp's own indexer kernel (`fp8_index` in its inference/kernel.py), loaded from the user's checkout
(`bench_indexer.py --deepseek-ref PATH`) and timed as they ship it. The file is read, never copied into the project."""

from __future__ import annotations

import pathlib
import types

import tilelang
import torch

from transformers_misa.ops.masks import ChunkMask

# DeepSeek's fp8_index launches one CTA row per query on the grid's y axis, which CUDA caps at 65535: longer prefills
# call it per chunk of this many queries (its per-query work is the same either way).
DEEPSEEK_QUERY_CHUNK = 32768


def deepseek_fp8_index(kernel_module, q, keys, weights, softmax_scale: float, topk: int):
    """DeepSeek-V3.2-Exp's own fp8_index (full [S, T] logits, no causal skip) + torch.topk, timed as they ship it,
    per chunk of at most DEEPSEEK_QUERY_CHUNK queries."""
    q8, k8 = q.to(torch.float8_e4m3fn), keys.to(torch.float8_e4m3fn).contiguous()
    k_scale = torch.ones(keys.shape[:2], device="cuda")
    scaled_weights = weights * softmax_scale
    num_queries, picks = q.shape[1], []
    for first in range(0, num_queries, DEEPSEEK_QUERY_CHUNK):
        rows = slice(first, min(first + DEEPSEEK_QUERY_CHUNK, num_queries))
        logits = kernel_module.fp8_index(q8[:, rows].contiguous(), scaled_weights[:, rows].contiguous(), k8, k_scale)
        chunk = ChunkMask(None, rows, q.shape[0], num_queries, keys.shape[1], q.device)
        picks.append((logits + chunk.bias).topk(min(topk, keys.shape[1]), dim=-1).indices)
        del logits
    return torch.cat(picks, dim=1)


# Pass configs that DeepSeek-V3.2-Exp's kernel.py names and later TileLang releases renamed (0.1.15: fast math became
# opt-in): (as written there, the same setting as this TileLang spells it).
RENAMED_PASS_CONFIGS = (("TL_DISABLE_FAST_MATH: True", "TL_ENABLE_FAST_MATH: False"),)


def load_deepseek_kernel(checkout: pathlib.Path) -> types.ModuleType:
    """DeepSeek-V3.2-Exp's inference/kernel.py from the user's checkout, as a module. Where this TileLang lacks a pass
    config it names, the renamed key with the same meaning is used (the file is read, not copied or changed)."""
    path = checkout / "inference" / "kernel.py"
    source = path.read_text()
    for written, current in RENAMED_PASS_CONFIGS:
        if not hasattr(tilelang.PassConfigKey, written.split(":")[0]):
            source = source.replace(written, current)
    module = types.ModuleType("deepseek_v32_exp_kernel")
    module.__file__ = str(path)
    exec(compile(source, str(path), "exec"), module.__dict__)
    return module
