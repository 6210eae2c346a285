"""How much of a NextStep model's mini GenEval its own autoregressive drift costs, on the built-in shapes data.

    python scripts/drift_probe.py --model outputs/demo/model --prompts 100 --given 0,8,16 --teacher-forced

For each of the first ``--prompts`` held-out images of ``--split``, the first k image tokens are the VAE's own
tokens of that image and the model draws the others one by one after them, with its stored sampling settings
(k = 0: the model draws every token, as ``sample`` does; k = all: nothing is drawn, the VAE's reconstruction).
``--teacher-forced`` also draws every token from the true tokens before it: the quality of one token when no
error has accumulated. ``--token-noise`` decodes the true tokens with Gaussian noise of each given standard
deviation added (in the model's token units, which the VAE's per-token norm keeps at unit variance) and no
model at all: how much token error the decoder tolerates. One JSON line per measurement on stdout. Each drawn
token reruns the whole prefix (no KV cache): slow, but the same math as the generation program, and simple
enough to trust.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from nextstep_jax import configs
from nextstep_jax.checkpoint import load_model, load_vae, release_files
from nextstep_jax.data.images import normalize
from nextstep_jax.data.image_pipeline import held_out_images
from nextstep_jax.data.pipeline import SHAPES, DatasetSpec
from nextstep_jax.data.scorer import evaluate
from nextstep_jax.encode_latents import vae_encode_fn
from nextstep_jax.generation.generator import uint8_from_pixels
from nextstep_jax.generation.prompts import PromptBuilder, PromptTokenizer
from nextstep_jax.generation.settings import SamplingSettings, read_stored_settings
from nextstep_jax.latents import normalize_tokens, patchify, unpatchify
from nextstep_jax.models.fm_head import head_module
from nextstep_jax.models.fm_sampler import sample_head
from nextstep_jax.models.nextstep import NextStep
from nextstep_jax.models.vae import AutoencoderKL, from_model_latents


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a release folder with its vae/ (e.g. the demo's)")
    parser.add_argument("--split", default="eval", choices=("eval", "novel"))
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--given", default="0", help="comma-separated k: true tokens before the drawn ones")
    parser.add_argument("--teacher-forced", action="store_true")
    parser.add_argument("--token-noise", default="", help="comma-separated noise stds added to the true tokens")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    model_cfg, params = load_model(args.model)
    vae_cfg, vae_params = load_vae(args.model / "vae")
    sampling = configs.default_config().sampling
    sampling.update(read_stored_settings(release_files(args.model)) or {})
    settings = SamplingSettings.from_config(sampling).for_model(model_cfg)
    images, captions = held_out_images(DatasetSpec(source=SHAPES, split=args.split), args.prompts, settings.hw[0])
    rows = PromptBuilder(PromptTokenizer(release_files(args.model)), model_cfg, vae_cfg).rows(captions, settings)
    model, vae = NextStep(model_cfg), AutoencoderKL(vae_cfg)

    encode, encoder_params = vae_encode_fn(args.model / "vae")
    true_tokens = patchify(encode(encoder_params, jnp.asarray(normalize(images))), model_cfg.latent_patch_size)
    n, m, dim = true_tokens.shape
    prompt_len, mult = rows.input_ids.shape[1], rows.cfg_mult
    ids = np.concatenate([rows.input_ids, np.full((len(rows.input_ids), m), model_cfg.image_placeholder_id)], 1)
    mask = np.concatenate([rows.attention_mask, np.ones((len(rows.input_ids), m), np.int32)], 1)
    head = params["image_head"]
    net = head_module(head)

    @jax.jit
    def conditions(tokens):  # [n, M, D] -> the head's condition for every token [rows, M, E]
        image = jnp.concatenate([jnp.zeros((mult * n, prompt_len, dim)), jnp.tile(tokens, (mult, 1, 1))], 1)
        hidden = model.apply({"params": params}, ids, image, mask)[:, prompt_len - 1: prompt_len - 1 + m]
        return model.apply({"params": params}, hidden, method=NextStep.condition)

    @jax.jit
    def draw(c, key):  # conditions [rows·k, E] -> tokens [n·k, D]
        x = sample_head(net, {"params": head}, c, cfg_mult=mult, num_steps=settings.num_steps,
                        timesteps_shift=settings.timesteps_shift, last_step_size=settings.last_step_size,
                        grid=settings.time_grid, method=settings.method, key=key,
                        guidance_scale=settings.guidance_scale, image_guidance_scale=settings.image_guidance_scale)
        return normalize_tokens(x) if settings.use_norm else x

    def score(tokens) -> float:
        latents = from_model_latents(unpatchify(tokens, *rows.grid, model_cfg.latent_patch_size), vae_cfg)
        pixels = vae.apply({"params": vae_params}, latents, method=AutoencoderKL.decode)
        return round(evaluate(list(np.asarray(uint8_from_pixels(pixels))), captions)["overall"], 4)

    key = jax.random.key(args.seed)
    for given in (int(k) for k in args.given.split(",")):
        tokens = true_tokens
        for k in range(min(given, m), m):
            tokens = tokens.at[:, k].set(draw(conditions(tokens)[:, k], jax.random.fold_in(key, k)))
        print(json.dumps({"given": given, "drawn": m - min(given, m), "mini_geneval": score(tokens)}), flush=True)
    if args.teacher_forced:
        # [rows, M, E] with rows = guidance groups of n: flattened, the groups stay outermost as sample_head wants.
        c = conditions(true_tokens)
        drawn = draw(c.reshape(mult * n * m, -1), jax.random.fold_in(key, m)).reshape(n, m, dim)
        print(json.dumps({"teacher_forced": True, "mini_geneval": score(drawn)}), flush=True)
    noise = jax.random.normal(jax.random.fold_in(key, m + 1), true_tokens.shape)
    for std in (float(s) for s in args.token_noise.split(",") if s):
        print(json.dumps({"token_noise": std, "mini_geneval": score(true_tokens + std * noise)}), flush=True)


if __name__ == "__main__":
    main()
