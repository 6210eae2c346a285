"""The demo's NextStep (``python -m nextstep_jax.demo`` trains it): a small backbone + flow-matching head on cached
latents of the built-in shapes data at 64 px, on a CPU.

The demo fills in the paths it makes (``data.tokenizer``: the SentencePiece tokenizer trained on the captions;
``data.datasets``: the cached latents; ``init.vae``: the demo's VAE, which brings its architecture). The sizes,
learning rate, batch, step count and sampling settings come from a short study on the project's 2-core CPU
(the README's demo section has the table): in a budget of minutes the run is short of optimizer steps more than
of parameters or samples, so a 1.3M-parameter model at 4 packed rows per step did better than a 4.9M one at 8
rows and than itself at 8 rows (which needed 2.5x the wall time for the same FM loss); a peak learning rate of
6e-3 learned slower than 3e-3; guidance 3 did as well as 5-8 and much better than none.
"""

import ml_collections

from nextstep_jax.configs import TOKENIZER_ID_FIELDS, data_config, mesh_config, model_config, sampling_config
from nextstep_jax.training.optimizer import schedule_config


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.task = "nextstep"
    config.seed = 0
    config.model = model_config(
        vocab_size=128,  # the demo tokenizer's vocabulary (every caption word is one piece)
        hidden_size=128,
        intermediate_size=384,
        num_layers=4,
        num_heads=4,
        num_kv_heads=4,
        head_dim=32,
        fm_head_dim=128,
        fm_head_layers=3,
        loss_chunk_size=256,
        **dict.fromkeys(TOKENIZER_ID_FIELDS),  # from data.tokenizer
    )
    # 64 px images are 16 tokens (f8 VAE, patch 2); a shapes document is ~35 tokens, ~7 per 256-token row.
    config.data = data_config(seq_len=256, batch_size=4, image_size=64, image_input="latents",
                              caption_dropout=0.1, tokenizer=None, datasets=())
    config.sampling = sampling_config(hw=(64, 64), guidance_scale=3.0, num_steps=25)
    config.mesh = mesh_config()
    config.init = ml_collections.ConfigDict(dict(source="scratch", path="", vae=""))
    config.total_steps = 2500
    config.schedule = schedule_config()
    config.schedule.update(dict(kind="cosine", peak_lr=2e-3, warmup_steps=20, final_lr_fraction=0.05))
    config.checkpoint = ml_collections.ConfigDict(dict(every_steps=500, keep=2))
    config.eval = ml_collections.ConfigDict(dict(every_steps=0, prompts=(
        "a red circle", "a blue square on the left", "two green triangles", "a yellow circle above a purple square"),
        seed=0, hw=None))
    return config
