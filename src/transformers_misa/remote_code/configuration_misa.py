"""MISA variant of a transformers DSA config, written by `transformers_misa.save_patched`.

config.json's "misa" entry holds the patch settings; they are checked against the installed transformers_misa
when the config loads.
"""

import transformers_misa.hub
from transformers import MISA_BASE_CONFIG


class MISA_CONFIG(MISA_BASE_CONFIG):
    model_type = "MISA_MODEL_TYPE"

    def __post_init__(self, **kwargs):
        self.misa = transformers_misa.hub.check_misa_settings(kwargs.pop("misa", None))
        super().__post_init__(**kwargs)
