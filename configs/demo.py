"""The demo's NextStep (``python -m nextstep_jax.demo`` trains it): a small backbone + flow-matching head on cached
latents of the built-in shapes data at 48 px, on a CPU.

The demo fills in the paths it makes (``data.tokenizer``: the SentencePiece tokenizer trained on the captions;
``data.datasets``: the cached latents; ``init.vae``: the demo's VAE, which brings its architecture). The sizes,
learning rate, batch, step count and sampling settings come from a short study on the project's 2-core CPU
(the README's demo section has the tables). Two findings shaped them. In a budget of minutes the run is short of
optimizer steps more than of parameters or samples (a 1.3M-parameter backbone at 4 packed rows per step beat a
4.9M one at 8 rows; 2 rows for twice the steps did not beat 4 at 48 px: 0.55 against 0.63). And what breaks the
images is the autoregressive drift of continuous tokens, not a lack of caption conditioning: given the true
previous tokens, the 16-channel model drew 0.77 of the images right, caption or not, but drawing all its own
tokens only ~0.1. A 4-channel latent (16-d tokens) drifts much less, and a wider
flow-matching head samples each token closer to the data, so the demo uses both. 48 px images (9 tokens
instead of 16 at 64 px) scored as well as 64 px ones at the same step count in 60% of the time, which buys
twice the steps (0.63 against 0.37 in the same 15 minutes). Later: 192-token rows hold the same 8 documents as
256-token ones at 6% padding instead of 30%, for a step about a quarter shorter, and the official trainer's
input-token noise, which did nothing at 1,000 steps, lifts the 6,000-step model (0.49 without it, 0.57 at 0.3).
5,000 steps (and a 1,400-step VAE) keep the demo within 20 minutes on the slower of the project's hosts; at
that length noise 0.5 beat 0.3 with both training seeds tried (0.59 / 0.49 against 0.53 / 0.47), and 0.8 fell
to 0.44.
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
        fm_head_dim=256,
        fm_head_layers=3,
        latent_channels=4,  # the demo's VAE is built with as many (demo/stages.py)
        noise_strength=0.5,  # the official code's optional input-token noise (std 0 -> 0.5 across an image)
        loss_chunk_size=256,
        **dict.fromkeys(TOKENIZER_ID_FIELDS),  # from data.tokenizer
    )
    # 48 px images are 9 tokens (f8 VAE, patch 2); a shapes document is ~22.5 tokens. At most 8 documents
    # (8 images) per row: 192-token rows hold them with 6% padding, where 256-token rows held the same 8 with
    # 30% and took a 30% longer step. The flow-matching head runs on 72 of the 192 positions.
    config.data = data_config(seq_len=192, batch_size=4, image_size=48, image_input="latents",
                              caption_dropout=0.1, tokenizer=None, datasets=(), max_images_per_row=8)
    config.sampling = sampling_config(hw=(48, 48), guidance_scale=3.0, num_steps=25)
    config.mesh = mesh_config()
    config.init = ml_collections.ConfigDict(dict(source="scratch", path="", vae=""))
    config.total_steps = 5000
    config.schedule = schedule_config()
    config.schedule.update(dict(kind="cosine", peak_lr=2e-3, warmup_steps=20, final_lr_fraction=0.05))
    config.checkpoint = ml_collections.ConfigDict(dict(every_steps=500, keep=2))
    config.eval = ml_collections.ConfigDict(dict(every_steps=0, prompts=(
        "a red circle", "a blue square on the left", "two green triangles", "a yellow circle above a purple square"),
        seed=0, hw=None))
    return config
