"""NextStep-1-Large (14B) with the released f8ch16 tokenizer: `--config=configs/14b.py`.

Its training sections are the official 256 px stage (from Qwen2.5-14B, 500k steps at 1e-4 after 5000 warmup
steps, caption dropout 0.3, the official data mixture); configs/14b_512px.py continues it at 512 px.
"""

import ml_collections

from nextstep_jax.configs import data_config, mesh_config, model_config, sampling_config, vae_config
from nextstep_jax.training.init import init_config
from nextstep_jax.training.optimizer import optim_config, schedule_config
from nextstep_jax.training.step import train_step_config


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    # Every default of model_config() is the released NextStep-1-Large value (its config.json).
    config.model = model_config(dtype="bfloat16", scan_layers=True, remat_policy="full")
    config.vae = vae_config(dtype="bfloat16")
    # The text tokenizer is the one the release ships beside the model (data.tokenizer=None).
    config.data = data_config()
    config.sampling = sampling_config()
    config.mesh = mesh_config(data=1, fsdp=-1, tensor=1, sequence=1)  # fsdp over all chips: see train_step

    # ---- Training (python -m nextstep_jax.train): the official 256 px stage, which starts from Qwen2.5-14B.
    config.seed = 42
    config.total_steps = 500_000
    config.init = init_config()
    config.init.source = "qwen"  # the LLM's embeddings, layers, final norm and lm_head; projectors and FM head new
    config.init.path = "models/Qwen2.5-14B"
    # The released VAE; its folder (stepfun-ai/NextStep-1-f8ch16-Tokenizer) also holds the text tokenizer.
    config.init.vae = "models/NextStep-1-f8ch16-Tokenizer"
    config.optim = optim_config()  # AdamW 0.9/0.95, eps 1e-8, wd 0.1 except biases and LayerNorms, clip 1.0
    config.schedule = schedule_config()
    config.schedule.kind = "warmup_constant"  # what the official "cosine" with scale_lr=1.0 computes
    config.schedule.peak_lr = 1e-4
    config.schedule.warmup_steps = 5000
    config.checkpoint = ml_collections.ConfigDict(dict(every_steps=2500, keep=3))
    config.eval = ml_collections.ConfigDict(dict(every_steps=2500, prompts=EVAL_PROMPTS, seed=0, hw=(256, 256)))
    config.data.seq_len = 8192
    # The global batch: 256 packed rows of 8192 tokens (2.1M tokens) per step. The official run gives 2 rows
    # per GPU on an unstated GPU count, so this is our choice, a usual 14B pretraining batch.
    config.data.batch_size = 256
    # It fits a v5p-64 pod (README "Scaling"; `python -m nextstep_jax.plan --config=configs/14b.py
    # --topology v5p:4x4x4`): params, gradients and AdamW moments over fsdp = all chips, the batch over fsdp
    # too (attention per shard), every layer rematerialised, the loss in 1024-position chunks, and 4
    # microbatches of 64 rows (one row per chip at a time): 32 GiB per chip; 2 microbatches need 65 GiB for
    # the same projected speed.
    config.train_step = train_step_config(microbatches=4)
    config.data.image_size = 256  # square crops; multi-aspect buckets need cached latents (encode_latents) and
    # --config.data.image_input=latents --config.data.multi_aspect=True
    config.data.caption_dropout = 0.3
    config.data.datasets = MIXTURE
    return config


# Record folders written by `python -m nextstep_jax.data.build` from the official data (one per dataset).
DATA = "data/records"
# The official mixture draws a dataset for every packed row of 8192 tokens with probability text 0.2,
# text-to-image 0.4, editing 0.1, interleaved 0.3. Our pipeline mixes documents, not rows: a dataset's share of
# the tokens is its document weight times its document length. So each document weight is the official row
# share times the documents that fill one row: a text document (a book, cut at seq_len) fills a row alone; a
# 256 px text-to-image document takes ~290 tokens (~28 per row), an edit (two images + instruction) ~560 (~14),
# an interleaved textbook page with several images ~3000 (~3; an estimate). Measure your own records
# (documents per row = data/documents / (step x data.batch_size) in the metrics.jsonl of a one-dataset run)
# and rescale if they differ.
MIXTURE = (
    {"source": f"{DATA}/allenai_dolma_v16_books", "weight": 0.2},  # 0.2 x 1
    {"source": f"{DATA}/BLIP3o-60k", "weight": 11.2},  # 0.4 x 28
    {"source": f"{DATA}/GPT-Image-Edit-1.5M_hqedit", "weight": 1.4},  # 0.1 x 14
    {"source": f"{DATA}/multimodal_textbook", "weight": 0.9},  # 0.3 x 3
)
EVAL_PROMPTS = (
    "A red fox sitting in fresh snow, soft morning light.",
    "A bowl of ramen on a wooden table, seen from above.",
    "An astronaut riding a horse on the surface of the moon.",
    "A watercolor painting of a lighthouse on a rocky coast.",
)
