"""The built-in trained models: small DeepSeek-V3.2 / GLM-5 shaped DSA models shipped inside the package.

    model, tokenizer = load_trained("deepseek_v32")      # 64 indexer heads x 128, top-k 256, 4 layers
    model, tokenizer = load_trained("glm_moe_dsa")       # 32 indexer heads x 128, one shared layer

They were trained from scratch by examples/train_small_dsa.py (training.json beside the weights says with what,
on which machine, for how long) on the Python standard library's source and the NIAH essays, with retrieval tasks
mixed in, so their indexers are trained, unlike the random `tiny_model`s. Each folder may also hold the router
calibration fitted for it (misa_calibration.safetensors), which `patch_model` then picks up by default.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import torch

TRAINED_FAMILIES: tuple[str, ...] = ("deepseek_v32", "glm_moe_dsa")


def trained_model_dir(family: str) -> Path:
    """Folder of the shipped trained model of `family` (config.json, model.safetensors, tokenizer, training.json).

    Raises:
        ValueError: unknown family. FileNotFoundError: the package was installed without its model files.
    """
    if family not in TRAINED_FAMILIES:
        raise ValueError(f"no built-in trained model for {family!r}; choose one of {list(TRAINED_FAMILIES)}")
    folder = Path(str(resources.files("transformers_misa") / "trained" / family))
    if not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"{folder} has no model.safetensors: reinstall transformers-misa with its package "
                                "data, or train one with examples/train_small_dsa.py")
    return folder


def training_info(model_dir: str | Path) -> dict[str, Any]:
    """training.json of a model written by examples/train_small_dsa.py ({} if there is none)."""
    path = Path(model_dir) / "training.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def load_trained(family: str = "deepseek_v32", *, model_dir: str | Path | None = None,
                 dtype: torch.dtype = torch.float32, device: str | torch.device | None = None,
                 attn_implementation: str = "sdpa") -> tuple[Any, Any]:
    """(model in eval mode, tokenizer) of the shipped trained model of `family`, or of `model_dir` if given."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(model_dir) if model_dir is not None else trained_model_dir(family)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation=attn_implementation)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if device is not None:
        model.to(device)
    return model.eval(), tokenizer
