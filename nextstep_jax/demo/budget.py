"""How much work each demo stage does, in counts and steps (never seconds, so a seed fixes every number).

``FULL`` is what ``make demo`` runs: its sizes come from the feasibility study in the README's demo section.
``MINIATURE`` runs every stage for a few steps at 32 px (the tests, a smoke check of an install).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Budget:
    image_size: int  # px, the side of every shapes image (VAE, latents, NextStep, samples)
    tokenizer_captions: int  # train-split captions the text tokenizer is trained on
    vocab_size: int  # SentencePiece pieces, special tokens included (configs/demo.py's model.vocab_size)
    latent_images: int  # train-split images encoded once for the NextStep stage (it repeats them)
    eval_prompts: int  # the first N prompts of the held-out splits, sampled and scored
    novel_prompts: int
    grid_eval: int  # images of each split in the labelled grid
    grid_novel: int
    vae: tuple[str, ...] = ()  # "a.b=value" overrides of configs/tokenizer_shapes.py
    decoder: tuple[str, ...] = ()  # of configs/tokenizer_shapes_decoder.py
    nextstep: tuple[str, ...] = ()  # "a.b=value" overrides of configs/demo.py


FULL = Budget(image_size=48, tokenizer_captions=20_000, vocab_size=128, latent_images=20_000, eval_prompts=200,
              novel_prompts=100, grid_eval=20, grid_novel=4, vae=("total_steps=1400",))

MINIATURE = Budget(
    image_size=32, tokenizer_captions=500, vocab_size=128, latent_images=64, eval_prompts=5, novel_prompts=5,
    grid_eval=4, grid_novel=2,
    vae=("total_steps=3", "eval.every_steps=0", "eval.num_images=4", "eval.batch_size=4", "eval.grid_images=2",
         "checkpoint.every_steps=2"),
    decoder=("total_steps=2", "eval.num_images=4", "eval.batch_size=4", "eval.grid_images=2",
             "checkpoint.every_steps=1"),
    nextstep=("total_steps=300", "checkpoint.every_steps=100", "model.hidden_size=32", "model.intermediate_size=64",
              "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=1", "model.head_dim=16",
              "model.fm_head_dim=32", "model.fm_head_layers=1", "data.seq_len=64", "data.batch_size=2",
              "sampling.num_steps=2"))
