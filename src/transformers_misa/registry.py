"""One row per supported model family: where its indexer class lives and which RoPE its indexer applies.

Adding a DSA family is one `ModelFamily(...)` entry in `FAMILIES`.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from functools import cached_property

import torch
from torch import nn

RopeFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """A DSA model family.

    Attributes:
        model_type: the `config.model_type` transformers gives it.
        modeling_module: the transformers module that defines its indexer.
        indexer_class_name: the indexer's class in that module.
        rope_function_name: the RoPE function of that module the indexer applies (called with unsqueeze_dim=2),
            so patched indexers rotate exactly as the stock one does.
    """

    model_type: str
    modeling_module: str
    indexer_class_name: str
    rope_function_name: str

    @cached_property
    def _module(self):
        return importlib.import_module(self.modeling_module)

    @property
    def indexer_class(self) -> type[nn.Module]:
        """The stock indexer class of this family."""
        return getattr(self._module, self.indexer_class_name)

    def apply_rope(self, q_rot: torch.Tensor, k_rot: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotates the indexer's [B, S, H, r] queries and [B, S, 1, r] keys as the family's own indexer does."""
        return getattr(self._module, self.rope_function_name)(q_rot, k_rot, cos, sin, unsqueeze_dim=2)


FAMILIES: tuple[ModelFamily, ...] = (
    # DeepSeek-V3.2: half-split (non-interleaved) RoPE in the indexer.
    ModelFamily("deepseek_v32", "transformers.models.deepseek_v32.modeling_deepseek_v32",
                "DeepseekV32Indexer", "apply_rotary_pos_emb"),
    # GLM-5: interleaved RoPE in the indexer; "shared" layers have no indexer at all.
    ModelFamily("glm_moe_dsa", "transformers.models.glm_moe_dsa.modeling_glm_moe_dsa",
                "GlmMoeDsaIndexer", "apply_rotary_pos_emb_interleave"),
)


def family_of(module: nn.Module) -> ModelFamily | None:
    """The family whose stock indexer `module` is (exact class or a subclass), else None."""
    for family in FAMILIES:
        if isinstance(module, family.indexer_class):
            return family
    return None


def supported_model_types() -> list[str]:
    """`config.model_type` of every supported family."""
    return [family.model_type for family in FAMILIES]
