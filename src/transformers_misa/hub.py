"""Save, load and push patched models.

    save_patched(model, "out/")            # weights as safetensors + configuration_misa.py / modeling_misa.py
    AutoModelForCausalLM.from_pretrained("out/", trust_remote_code=True)   # the patched model again
    push_to_hub(model, "me/DeepSeek-V3.2-MISA")                            # the same folder plus a model card

A plain `model.save_pretrained` writes the *unpatched* checkpoint (the MisaIndexer keeps the stock state-dict
names, so the weights are the same); `save_patched` adds the settings and the custom code that re-applies them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

from torch import nn

from .calibration import CALIBRATION_FILE
from .config import MisaConfig, mode_option_problem
from .indexer import MisaIndexer
from .patching import is_patched, patch_model
from .registry import ModelFamily

MISA_KEY = "misa"
CONFIG_FILE = "configuration_misa.py"
MODELING_FILE = "modeling_misa.py"
# Entries of config.json's "misa" dict besides the MisaConfig fields.
_META_KEYS = ("version", "calibration")


@dataclasses.dataclass(frozen=True)
class ModelCardInfo:
    """What the model card of a family's MISA variant says about its base model."""

    title: str
    template: str  # file in transformers_misa/model_cards/
    base_model: str
    license: str


# Licences as the base models' own README front matter states them (both "license: mit", checked 2026-11-23).
MODEL_CARDS: dict[str, ModelCardInfo] = {
    "deepseek_v32": ModelCardInfo("DeepSeek-V3.2-MISA", "DeepSeek-V3.2-MISA.md", "deepseek-ai/DeepSeek-V3.2", "mit"),
    "glm_moe_dsa": ModelCardInfo("GLM-5-MISA", "GLM-5-MISA.md", "zai-org/GLM-5", "mit"),
}


def _version() -> str:
    from . import __version__

    return __version__


# --------------------------------------------------------------------------------------------- settings


def check_misa_settings(settings: dict[str, Any] | None) -> dict[str, Any] | None:
    """Validates config.json's "misa" entry against this version of transformers_misa (None passes through).

    Raises:
        ValueError: naming the unknown mode or option, the version that saved it and this version.
    """
    if settings is None:
        return None
    if not isinstance(settings, dict):
        raise ValueError(f"config.json's {MISA_KEY!r} entry must be a dict, got {type(settings).__name__}")
    saved, this = settings.get("version", "unknown"), _version()
    where = f"saved with transformers_misa {saved}; this is {this}; upgrade transformers_misa to load it"
    given = {name for name, value in settings.items() if value is not None and name not in _META_KEYS}
    problem = mode_option_problem(settings.get("mode"), given - {"mode"})
    if problem:
        raise ValueError(f"MISA settings in config.json: {problem} ({where})")
    return dict(settings)


def _settings_of(model: nn.Module) -> dict[str, Any]:
    config: MisaConfig = model.misa_config
    calibration = getattr(model, "misa_calibration", None)
    return {**config.to_dict(), "version": _version(), "calibration": CALIBRATION_FILE if calibration else None}


def register_weight_conversion(config_class: type) -> None:
    """Gives a MISA config's model_type the base family's checkpoint conversion (fused MoE experts, ...).

    transformers skips the conversions of custom-code models unless registered by the user; without this the
    per-expert checkpoint weights would not load into the fused expert parameters.
    """
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping, \
        register_checkpoint_conversion_mapping

    mapping = get_checkpoint_conversion_mapping(_stock_class(config_class, "transformers.models.").model_type)
    if mapping is not None:
        register_checkpoint_conversion_mapping(config_class.model_type, mapping, overwrite=True)


def apply_saved_settings(model: nn.Module) -> nn.Module:
    """Patches a model built from a `save_patched` checkpoint with its config's "misa" settings (modeling_misa.py)."""
    settings = check_misa_settings(getattr(model.config, MISA_KEY, None))
    if settings is None:
        raise ValueError(f"{type(model).__name__}'s config has no {MISA_KEY!r} settings; save it with save_patched")
    options = {name: value for name, value in settings.items() if name not in _META_KEYS}
    return patch_model(model, calibration=_saved_calibration(model.config, settings.get("calibration")), **options)


def _saved_calibration(config: Any, file_name: str | None) -> Any:
    """The calibration file a save_patched checkpoint names, fetched like its other files (a local folder, or
    the Hub / its cache under HF_HUB_OFFLINE): a path, or None when the checkpoint has none."""
    if not file_name:
        return None
    from transformers.utils import cached_file

    source = getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None)
    if not source:
        raise ValueError(f"config.json names the router calibration {file_name!r} but the checkpoint's location "
                         "is unknown; load the model with from_pretrained(path_or_repo_id, trust_remote_code=True)")
    return cached_file(source, file_name)


# --------------------------------------------------------------------------------------------- remote code


def _family(model: nn.Module) -> ModelFamily:
    for module in model.modules():
        if isinstance(module, MisaIndexer):
            return module.family
    raise ValueError(f"{type(model).__name__} has no MisaIndexer")


def _stock_class(cls: type, prefix: str) -> type:
    """The first class in `cls`'s MRO defined by transformers itself (a reloaded MISA model's stock base)."""
    for base in cls.__mro__:
        if base.__module__.startswith(prefix):
            return base
    raise ValueError(f"{cls.__name__} does not derive from a transformers class of {prefix}")


def remote_code_names(model: nn.Module) -> dict[str, str]:
    """The names filled into the remote-code templates: base and MISA classes of `model`'s family."""
    family = _family(model)
    base_model = _stock_class(type(model), family.modeling_module)
    if not base_model.__name__.endswith("ForCausalLM"):
        raise ValueError(f"save_patched saves causal LMs (…ForCausalLM); got {type(model).__name__}")
    base_config = _stock_class(type(model.config), "transformers.models.")
    return {
        "MISA_BASE_CONFIG": base_config.__name__,
        "MISA_CONFIG": "Misa" + base_config.__name__,
        "MISA_BASE_MODEL": base_model.__name__,
        "MISA_MODEL": "Misa" + base_model.__name__,
        # Not the stock model_type: without trust_remote_code, transformers then refuses instead of silently
        # loading an unpatched model.
        "MISA_MODEL_TYPE": f"{family.model_type}_misa",
    }


def render_remote_code(names: dict[str, str]) -> dict[str, str]:
    """{file name: source} of configuration_misa.py and modeling_misa.py, from the shipped templates."""
    pattern = re.compile(r"\b(" + "|".join(sorted(names, key=len, reverse=True)) + r")\b")
    folder = resources.files("transformers_misa") / "remote_code"
    return {name: pattern.sub(lambda m: names[m.group(1)], (folder / name).read_text(encoding="utf-8"))
            for name in (CONFIG_FILE, MODELING_FILE)}


# --------------------------------------------------------------------------------------------- save


def _check_patched(model: nn.Module) -> None:
    if not is_patched(model) or getattr(model, "misa_config", None) is None:
        raise ValueError(f"{type(model).__name__} is not patched by transformers_misa; call patch_model first "
                         "(a plain model.save_pretrained saves an unpatched model)")


def _write_into(save_directory: Path, write) -> None:
    """Runs write(tmp_dir) then moves the result to `save_directory`; on failure nothing is left behind."""
    save_directory = Path(save_directory)
    if save_directory.exists() and not save_directory.is_dir():
        raise ValueError(f"{save_directory} exists and is not a directory")
    save_directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{save_directory.name}.misa-tmp-", dir=save_directory.parent))
    try:
        write(tmp)
        if not save_directory.exists():
            os.replace(tmp, save_directory)
            return
        for item in sorted(tmp.iterdir()):  # an existing folder: same-filesystem renames, file by file
            target = save_directory / item.name
            if target.is_dir() and not item.is_dir():
                shutil.rmtree(target)
            os.replace(item, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _save_into(model: nn.Module, folder: Path, save_kwargs: dict[str, Any]) -> None:
    names = remote_code_names(model)
    sources = render_remote_code(names)
    model.save_pretrained(folder, **save_kwargs)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config.update({
        "model_type": names["MISA_MODEL_TYPE"],
        "architectures": [names["MISA_MODEL"]],
        "auto_map": {"AutoConfig": f"{CONFIG_FILE[:-3]}.{names['MISA_CONFIG']}",
                     "AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.{names['MISA_MODEL']}"},
        MISA_KEY: _settings_of(model),
    })
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    for name, source in sources.items():
        (folder / name).write_text(source, encoding="utf-8")
    calibration = getattr(model, "misa_calibration", None)
    if calibration is not None:
        calibration.save(folder / CALIBRATION_FILE)


def save_patched(model: nn.Module, save_directory: str | os.PathLike, **save_pretrained_kwargs: Any) -> Path:
    """Saves a `patch_model`-ed model so that `from_pretrained(..., trust_remote_code=True)` rebuilds it patched.

    Writes what `model.save_pretrained(save_directory, **save_pretrained_kwargs)` writes (unchanged weights under
    the stock names), then configuration_misa.py and modeling_misa.py, and adds to config.json the settings
    (`"misa": {mode, options..., "version", "calibration"}`), an `auto_map` to those classes and a model_type of
    its own (`<family>_misa`). Everything is written to a temporary folder first and then moved into place.

    Raises:
        ValueError: the model is not patched (nothing is written), or `push_to_hub` was passed (use push_to_hub).
    """
    _check_patched(model)
    if save_pretrained_kwargs.get("push_to_hub"):
        raise ValueError("save_patched does not push; use transformers_misa.hub.push_to_hub(model, repo_id)")
    save_pretrained_kwargs.pop("push_to_hub", None)
    remote_code_names(model)  # fail before writing anything
    _write_into(Path(save_directory), lambda tmp: _save_into(model, tmp, save_pretrained_kwargs))
    return Path(save_directory)


# --------------------------------------------------------------------------------------------- model card


def _results_section(path: str | os.PathLike) -> str:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    name = Path(path).name
    if isinstance(data, dict) and "per_layer" in data and "mean" in data:  # RecallReport.to_dict()
        rows = "\n".join(f"| {layer} | {data.get('sparse_queries', {}).get(layer, '')} | {value:.4f} |"
                         for layer, value in sorted(data["per_layer"].items(), key=lambda kv: int(kv[0])))
        return (f"Recall of DSA's top-k (`{name}`, mode `{data.get('mode')}`): mean **{data['mean']:.4f}**, "
                f"worst layer **{data['worst']:.4f}**.\n\n| layer | sparse queries | recall |\n|---:|---:|---:|\n"
                f"{rows}")
    kind = "Benchmark"
    if isinstance(data, dict) and isinstance(data.get("summary"), list):  # `transformers-misa eval` results.json
        kind = "Evaluation (recall of DSA's top-k, perplexity, NIAH)"
        data = {"results": data["summary"], "environment": {"model": data.get("model"), **{
            k: v for k, v in data.get("settings", {}).items() if k in ("device", "window", "block_size")}}}
    results = data.get("results", data) if isinstance(data, dict) else data
    rows = results if isinstance(results, list) else [results]
    rows = [row for row in rows if isinstance(row, dict)]
    columns: list[str] = []
    for row in rows:  # scalar columns in order of first appearance; lists and nested dicts are left out
        columns += [key for key, value in row.items()
                    if key not in columns and isinstance(value, (int, float, str, bool)) and value is not None]
    if not rows or not columns:
        raise ValueError(f"{path}: neither a recall report (per_layer, mean) nor benchmark results to tabulate")

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        text = "" if value is None or isinstance(value, (list, dict)) else str(value)
        return (text[:40] + "…" if len(text) > 40 else text).replace("|", "/").replace("\n", " ")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(column)) for column in columns) + " |" for row in rows]
    environment = data.get("environment") if isinstance(data, dict) else None
    where = ""
    if isinstance(environment, dict):  # say on what and when the numbers were measured
        where = " (" + ", ".join(f"{key} {value}" for key, value in environment.items() if value is not None) + ")"
    return f"{kind} `{name}`{where}:\n\n" + "\n".join(lines)


def model_card(model: nn.Module, *, card_data: dict[str, Any] | None = None,
               results_json: str | os.PathLike | None = None, repo_id: str | None = None):
    """The huggingface_hub `ModelCard` of a patched model, from its family's template in `model_cards/`.

    Args:
        card_data: overrides of the card's metadata (`base_model`, `license`, `tags` added to the defaults, ...).
        results_json: a `measure_recall(...).to_dict()` or benchmark JSON whose numbers the card shows.
        repo_id: the repository the card describes (shown in the usage snippet).
    """
    from huggingface_hub import ModelCard, ModelCardData

    _check_patched(model)
    family = _family(model)
    if family.model_type not in MODEL_CARDS:
        raise ValueError(f"no model card template for {family.model_type}; known: {sorted(MODEL_CARDS)}")
    info = MODEL_CARDS[family.model_type]
    extra = dict(card_data or {})
    tags = ["misa", "dsa", "sparse-attention", "long-context", "transformers-misa", family.model_type]
    tags += [tag for tag in extra.pop("tags", []) if tag not in tags]
    data = ModelCardData(**{"base_model": info.base_model, "library_name": "transformers",
                            "pipeline_tag": "text-generation", "tags": tags, "license": info.license, **extra})
    config: MisaConfig = model.misa_config
    settings = ", ".join(f"`{k}={v}`" for k, v in config.to_dict().items() if v is not None and k != "mode")
    if getattr(model, "misa_calibration", None) is not None:
        settings += f", router calibration `{CALIBRATION_FILE}`"
    template = resources.files("transformers_misa") / "model_cards" / info.template
    with resources.as_file(template) as template_path:
        return ModelCard.from_template(
            card_data=data, template_path=str(template_path), title=info.title, repo_id=repo_id or info.title,
            base_model=data.base_model, mode=config.mode, settings=settings, version=_version(),
            results=_results_section(results_json) if results_json else None)


# --------------------------------------------------------------------------------------------- push


def resolve_token(token: str | None = None) -> str:
    """The token argument, else HF_TOKEN, else huggingface_hub's stored token; ValueError if there is none."""
    from huggingface_hub import get_token

    token = token or os.environ.get("HF_TOKEN") or get_token()
    if not token:
        raise ValueError("no Hugging Face token: pass token=..., set HF_TOKEN or run `hf auth login` "
                         "(nothing was created or uploaded)")
    return token


def prepare_upload(model: nn.Module, folder: str | os.PathLike, *, card_data: dict[str, Any] | None = None,
                   results_json: str | os.PathLike | None = None, repo_id: str | None = None) -> list[str]:
    """Writes into `folder` what push_to_hub uploads (save_patched + README.md); returns the sorted file list."""
    folder = Path(folder)
    card = model_card(model, card_data=card_data, results_json=results_json, repo_id=repo_id)
    save_patched(model, folder)
    card.save(folder / "README.md")
    return sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())


def push_to_hub(model: nn.Module, repo_id: str, *, token: str | None = None, private: bool = False,
                revision: str | None = None, commit_message: str | None = None,
                card_data: dict[str, Any] | None = None, results_json: str | os.PathLike | None = None) -> Any:
    """Saves a patched model with `save_patched`, adds a model card and uploads the folder to `repo_id`.

    Raises:
        ValueError: no token (argument, HF_TOKEN or `hf auth login`), or the model is not patched; in both
            cases before anything is created or uploaded.
    """
    from huggingface_hub import HfApi

    _check_patched(model)
    token = resolve_token(token)
    with tempfile.TemporaryDirectory(prefix="misa-push-") as tmp:
        folder = Path(tmp) / "model"
        prepare_upload(model, folder, card_data=card_data, results_json=results_json, repo_id=repo_id)
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        message = commit_message or f"Upload {model.misa_config.mode} variant (transformers_misa {_version()})"
        return api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision, commit_message=message,
                                 repo_type="model")


def push_from_dir(model_dir: str | os.PathLike, repo_id: str, **kwargs: Any) -> Any:
    """push_to_hub for a `save_patched` folder (the CLI's `push`): loads it offline with its code, then pushes."""
    kwargs["token"] = resolve_token(kwargs.get("token"))  # before the (possibly long) load
    model = load_patched(model_dir)
    return push_to_hub(model, repo_id, **kwargs)


def load_patched(model_dir: str | os.PathLike, **kwargs: Any) -> nn.Module:
    """`AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True)` of a save_patched folder."""
    from transformers import AutoModelForCausalLM

    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    if MISA_KEY not in config:
        raise ValueError(f"{model_dir} is not a save_patched folder (config.json has no {MISA_KEY!r}); "
                         "load it and call patch_model, then save_patched")
    check_misa_settings(config[MISA_KEY])
    return AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True, **kwargs)


__all__ = ["save_patched", "push_to_hub", "model_card", "load_patched", "apply_saved_settings",
           "check_misa_settings", "prepare_upload", "resolve_token", "MODEL_CARDS"]
