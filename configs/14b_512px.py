"""The official 512 px stage of NextStep (after configs/14b.py): `--config=configs/14b_512px.py`.

It continues from the 256 px stage (the released NextStep-1.1-Pretrain-256px, or `--export` of your own 256 px
run): 512 px images, 10k steps at 1e-5 after 1000 warmup steps, a checkpoint every 1000 steps, half the packed
rows per step (the official per-device batch goes from 2 to 1); everything else as the 256 px stage.
"""

from pathlib import Path

import ml_collections

from nextstep_jax.configs import load_config_file

DATA = "data/records"


def get_config() -> ml_collections.ConfigDict:
    config = load_config_file(Path(__file__).with_name("14b.py"))
    config.init.source = "checkpoint"  # its architecture, special-token ids and tokenizer come with it
    config.init.path = "models/NextStep-1.1-Pretrain-256px"
    config.total_steps = 10_000
    config.schedule.peak_lr = 1e-5
    config.schedule.warmup_steps = 1000
    config.checkpoint.every_steps = 1000
    config.eval.every_steps = 1000
    config.eval.hw = (512, 512)
    config.data.image_size = 512
    config.data.batch_size = config.data.batch_size // 2
    # The per-document weights of configs/14b.py at 512 px, where an image is ~1030 tokens: ~8 text-to-image
    # documents, ~4 edits and ~1.5 interleaved pages fill a row. (The official 512 px run, at one row per
    # device, silently drops its text rows; we keep the intended 20 % of text.)
    config.data.datasets = (
        {"source": f"{DATA}/allenai_dolma_v16_books", "weight": 0.2},  # 0.2 x 1
        {"source": f"{DATA}/BLIP3o-60k", "weight": 3.2},  # 0.4 x 8
        {"source": f"{DATA}/GPT-Image-Edit-1.5M_hqedit", "weight": 0.4},  # 0.1 x 4
        {"source": f"{DATA}/multimodal_textbook", "weight": 0.45},  # 0.3 x 1.5
    )
    return config
