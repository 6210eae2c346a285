"""NextStep-1-Large (14B) with the released f8ch16 tokenizer: `--config=configs/14b.py`."""

import ml_collections

from nextstep_jax.configs import model_config, vae_config


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    # REFERENCE §3.1: every default of model_config() is the released NextStep-1-Large value.
    config.model = model_config(dtype="bfloat16", scan_layers=True, remat_policy="full")
    config.vae = vae_config(dtype="bfloat16")
    config.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1, "sequence": 1})
    return config
