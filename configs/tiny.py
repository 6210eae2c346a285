"""A CPU-sized NextStep (same architecture, tiny widths): `--config=configs/tiny.py`."""

import ml_collections

from nextstep_jax.configs import model_config, vae_config


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model = model_config(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        fm_head_dim=64,
        fm_head_layers=3,
        # Special ids of the tiny byte-level tokenizer in tests/golden/tokenizer.
        boi=293,
        eoi=294,
        image_placeholder_id=295,
        pad_token_id=291,
        bos_token_id=290,
        eos_token_id=290,
    )
    config.vae = vae_config(ch=32, ch_mult=(1, 1, 2, 1), num_res_blocks=1)
    config.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1, "sequence": 1})
    return config
