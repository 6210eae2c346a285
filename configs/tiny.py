"""A CPU-sized NextStep (same architecture, tiny widths) trained on the built-in shapes data:
`--config=configs/tiny.py`.

The text tokenizer is the built-in byte-level one (no files, any caption); the model's special-token ids are
left unset here and read from that tokenizer when the config is resolved (``configs.with_tokenizer_ids``), so
naming another tokenizer with ``--config.data.tokenizer=DIR`` brings its ids along.
"""

import ml_collections

from nextstep_jax.configs import (TOKENIZER_ID_FIELDS, data_config, mesh_config, model_config, sampling_config,
                                  vae_config)
from nextstep_jax.data.tokenizer import BYTE_LEVEL
from nextstep_jax.training.optimizer import schedule_config


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
        **dict.fromkeys(TOKENIZER_ID_FIELDS),  # from data.tokenizer
    )
    config.vae = vae_config(ch=32, ch_mult=(1, 1, 2, 1), num_res_blocks=1)
    # 64 px shapes: 16 image tokens and a short caption per document, a few documents per packed row.
    config.data = data_config(seq_len=256, batch_size=8, image_size=64, tokenizer=BYTE_LEVEL,
                              datasets=({"source": "shapes"},))
    config.sampling = sampling_config(hw=(64, 64))  # the training resolution
    config.mesh = mesh_config()

    # ---- Training (python -m nextstep_jax.train): 300 steps take ~5 minutes on a 2-core CPU. The frozen VAE
    # is a scratch one (random weights) unless --config.init.vae names a trained VAE.
    config.data.max_images_per_row = 6  # a 256-token row holds ~5 shapes documents: fewer empty slots to encode
    config.total_steps = 300
    config.schedule = schedule_config()
    config.schedule.peak_lr = 1e-3
    config.schedule.warmup_steps = 20
    config.checkpoint = ml_collections.ConfigDict(dict(every_steps=100, keep=2))
    config.eval = ml_collections.ConfigDict(dict(every_steps=100, prompts=(
        "a red circle", "a blue square on the left", "two green triangles", "a yellow circle above a purple square")))
    return config
