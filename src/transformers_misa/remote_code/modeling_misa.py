"""MISA variant of a transformers DSA model, written by `transformers_misa.save_patched`.

The weights are the base model's, under the same names; building the model applies
`transformers_misa.patch_model(self, **config.misa settings)`. Needs `pip install transformers-misa`.
"""

import transformers_misa
import transformers_misa.hub
from transformers import MISA_BASE_MODEL

from .configuration_misa import MISA_CONFIG

transformers_misa.hub.register_weight_conversion(MISA_CONFIG)


class MISA_MODEL(MISA_BASE_MODEL):
    config_class = MISA_CONFIG

    def __init__(self, config):
        super().__init__(config)
        transformers_misa.hub.apply_saved_settings(self)
