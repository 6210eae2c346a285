"""Fine-tune a NextStep release for image editing: `--config=configs/edit.py --config.init.path=RELEASE`.

The NextStep-1-Large-Edit recipe: from NextStep-1-Large (a release folder with its vae/, or a converted
checkpoint), 20k steps on editing pairs at 512 px, lr 1e-5 after 1000 warmup steps. The model's architecture,
special-token ids and tokenizer are the release's; its VAE is the release's vae/ folder.
"""

from pathlib import Path

import ml_collections

from nextstep_jax.configs import load_config_file

DATA = "data/records"


def get_config() -> ml_collections.ConfigDict:
    config = load_config_file(Path(__file__).with_name("14b.py"))
    config.init.source = "checkpoint"
    config.init.path = "models/NextStep-1-Large"
    config.init.vae = ""  # the release's own vae/
    config.total_steps = 20_000
    config.schedule.peak_lr = 1e-5
    config.schedule.warmup_steps = 1000
    config.checkpoint.every_steps = 1000
    config.eval.every_steps = 1000
    config.eval.hw = (512, 512)
    config.data.image_size = 512
    config.data.batch_size = config.data.batch_size // 2
    config.data.edit_dropout = 0.2  # as released: a fifth of two-image edits drop the source or the text
    # Editing records (source image, instruction, edited image; python -m nextstep_jax.data.build --edits) with
    # some text-to-image documents so the model keeps generating from text alone.
    config.data.datasets = (
        {"source": f"{DATA}/GPT-Image-Edit-1.5M_hqedit", "weight": 0.9},
        {"source": f"{DATA}/BLIP3o-60k", "weight": 0.1},
    )
    return config
