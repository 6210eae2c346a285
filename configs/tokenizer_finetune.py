"""Fine-tune the released f8ch16 tokenizer at 256 px on an accelerator mesh: `--config=configs/tokenizer_finetune.py`.

    python -m nextstep_jax.train --config=configs/tokenizer_finetune.py --workdir /runs/vae \\
        --config.init.vae=NextStep-1-f8ch16-Tokenizer --config.data.datasets='({"source": "/data/train"},)' \\
        --config.eval.dataset='{"source": "/data/eval"}' \\
        --config.vae_train.perceptual_weights=/weights/vgg16_lpips.safetensors --export /runs/vae/release

``init.vae`` is the released tokenizer (its folder, or a checkpoint converted by ``nextstep_jax.convert``):
its config.json brings the architecture, ``encoder_norm``/``psz`` and the deterministic posterior. The data are
image records built by ``python -m nextstep_jax.data.build`` (every image of every sample is used, resized and
centre-cropped to 256 px). The perceptual loss needs VGG16 + LPIPS weights as one file (format in
``nextstep_jax/training/perceptual.py``; nothing is downloaded); ``--config.vae_train.perceptual=0`` trains
without it. The mesh is pure data parallelism (the VAE's 84M parameters fit on any chip); the global batch of
``data.batch_size`` images is split over all devices.
"""

import ml_collections

from nextstep_jax.configs import data_config, mesh_config, vae_config
from nextstep_jax.training.optimizer import optim_config, schedule_config
from nextstep_jax.training.vae_task import vae_eval_config, vae_train_config


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.task = "vae"
    config.seed = 0
    config.total_steps = 20_000
    config.vae = vae_config(dtype="bfloat16")  # compute dtype; params, norms and losses stay float32
    config.init = ml_collections.ConfigDict(dict(source="scratch", path="", vae="NextStep-1-f8ch16-Tokenizer"))
    config.data = data_config(image_size=256, batch_size=64, datasets=({"source": "records/train"},),
                              num_workers=8, read_threads=8)
    config.mesh = mesh_config(data=-1, fsdp=1)
    # A fine-tune moves a trained network: a small constant rate after a short warmup, no weight decay.
    config.optim = optim_config()
    config.optim.update(dict(weight_decay=0.0, b2=0.99))
    config.schedule = schedule_config()
    config.schedule.update(dict(kind="warmup_constant", peak_lr=1e-5, warmup_steps=500))
    # The paper's recipe: reconstruction + perceptual losses and noise regularisation of the normalised latent
    # (the released strength is not published; 0.5 trades a little reconstruction for a more robust decoder),
    # here with the PatchGAN critic switched on once the reconstruction has settled.
    config.vae_train = vae_train_config(l1=1.0, perceptual=0.1, perceptual_weights="vgg16_lpips.safetensors",
                                        noise_gamma=0.5, gan=0.05, gan_start_step=5_000)
    config.eval = vae_eval_config(every_steps=1_000, dataset={"source": "records/eval"}, num_images=256,
                                  batch_size=64, grid_images=16)
    config.checkpoint = ml_collections.ConfigDict(dict(every_steps=1_000, keep=3))
    return config
