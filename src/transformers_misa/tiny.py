"""Small seeded DeepSeek-V3.2 and GLM-5 models built from config (no download), for the demo and the tests."""

from __future__ import annotations

from typing import Any

import torch
from transformers import (
    DeepseekV32Config,
    DeepseekV32ForCausalLM,
    GlmMoeDsaConfig,
    GlmMoeDsaForCausalLM,
    PreTrainedModel,
)

# Tiny main model, real indexer head dim; heads and top-k are set per family / call.
_BASE: dict[str, Any] = dict(
    vocab_size=512, hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
    topk_group=1, kv_lora_rank=32, q_lora_rank=64, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16,
    head_dim=16, index_head_dim=128, index_topk=64, first_k_dense_replace=1, max_position_embeddings=8192,
    bos_token_id=0, eos_token_id=None, pad_token_id=1,
)

FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "deepseek_v32": dict(index_n_heads=64),
    # Three layers: full, shared (reuses layer 0's top-k, no indexer), full.
    "glm_moe_dsa": dict(index_n_heads=32, num_hidden_layers=3, indexer_types=["full", "shared", "full"]),
}

_CLASSES = {
    "deepseek_v32": (DeepseekV32Config, DeepseekV32ForCausalLM),
    "glm_moe_dsa": (GlmMoeDsaConfig, GlmMoeDsaForCausalLM),
}


def tiny_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32,
               attn_implementation: str = "sdpa", **overrides: Any) -> PreTrainedModel:
    """A randomly initialised (seeded) small model of `family` ("deepseek_v32" or "glm_moe_dsa"), in eval mode."""
    if family not in _CLASSES:
        raise ValueError(f"unknown family {family!r}; choose one of {sorted(_CLASSES)}")
    config_class, model_class = _CLASSES[family]
    config = config_class(**{**_BASE, **FAMILY_DEFAULTS[family], **overrides})
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    return model_class(config).to(dtype).eval()
