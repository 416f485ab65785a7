"""transformers-misa: MISA / HISA indexers for long-context inference of DSA models in HuggingFace Transformers.

    from transformers_misa import patch_model
    patch_model(model, mode="misa", active_heads=8)
"""

from .calibration import CALIBRATION_FILE, RouterCalibration, calibrate
from .config import MODES, MisaConfig
from .hub import push_to_hub, save_patched
from .indexer import MisaIndexer
from .patching import PatchedLayer, is_patched, misa_summary, patch_model, unpatch_model
from .recall import RecallReport, measure_recall
from .registry import FAMILIES, ModelFamily

__version__ = "0.1.0"

__all__ = [
    "MODES", "MisaConfig", "MisaIndexer", "PatchedLayer", "is_patched", "misa_summary", "patch_model",
    "unpatch_model", "RecallReport", "measure_recall", "FAMILIES", "ModelFamily", "__version__",
    "save_patched", "push_to_hub", "calibrate", "RouterCalibration", "CALIBRATION_FILE",
]
