"""What limits a NextStep model's mini GenEval on the built-in shapes data: its own autoregressive drift, the token
error its VAE's decoder tolerates, one draw against the best of several.

    python scripts/drift_probe.py --model outputs/demo/model --prompts 100 --given 0,8,16 --teacher-forced
    python scripts/drift_probe.py --model outputs/demo/model --prompts 200 --given 0 --candidates 8

For each of the first ``--prompts`` held-out images of ``--split``, the first k image tokens are the VAE's own
tokens of that image and the model draws the others one by one after them, with its stored sampling settings
(k = 0: the model draws every token, as ``sample`` does; k = all: nothing is drawn, the VAE's reconstruction).
``--teacher-forced`` also draws every token from the true tokens before it: the quality of one token when no
error has accumulated. ``--token-noise`` decodes the true tokens with Gaussian noise of each given standard
deviation added (in the model's token units, which the VAE's per-token norm keeps at unit variance) and no
model at all: how much token error the decoder tolerates. ``--candidates N`` draws every token N times over (draw
0 is the ``--given 0`` one) and reports how often at least one draw is right, and how often the draw that each of
the model's own scores ranks first is right (best of N, without the scorer): ``caption_error``, the head's
flow-matching error on the drawn tokens given the caption (low: likely); ``caption_evidence``, how much lower it
is than without the caption (a diffusion classifier); ``cycle``, the distance of the tokens to the VAE's tokens
of their own decoded image (low: on the VAE's manifold), and ``cycle_worst``, that of the worst token. One JSON
line per measurement on stdout. Each drawn token reruns the whole prefix (no KV cache): slow, but the same math
as the generation program, and simple enough to trust.
"""

from __future__ import annotations

import argparse
import functools
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
from nextstep_jax.data.scorer import accuracies, evaluate
from nextstep_jax.data.scorer import score as score_image
from nextstep_jax.encode_latents import vae_encode_fn
from nextstep_jax.generation.generator import uint8_from_pixels
from nextstep_jax.generation.prompts import PromptBuilder, PromptTokenizer
from nextstep_jax.generation.settings import SamplingSettings, read_stored_settings
from nextstep_jax.latents import normalize_tokens, patchify, unpatchify
from nextstep_jax.models.fm_head import flow_matching_errors, head_module
from nextstep_jax.models.fm_sampler import sample_head
from nextstep_jax.models.nextstep import NextStep
from nextstep_jax.models.vae import AutoencoderKL, from_model_latents

SCORE_DRAWS = 16  # (t, noise) draws per token of the caption scores' flow-matching error


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a release folder with its vae/ (e.g. the demo's)")
    parser.add_argument("--split", default="eval", choices=("eval", "novel"))
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--given", default="0", help="comma-separated k: true tokens before the drawn ones")
    parser.add_argument("--teacher-forced", action="store_true")
    parser.add_argument("--token-noise", default="", help="comma-separated noise stds added to the true tokens")
    parser.add_argument("--candidates", type=int, default=0, help="free-running draws per prompt to pick from")
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

    def vae_tokens(images):  # uint8 images -> the VAE's tokens of them [n, M, D]
        return patchify(encode(encoder_params, jnp.asarray(normalize(images))), model_cfg.latent_patch_size)

    true_tokens = vae_tokens(images)
    n, m, dim = true_tokens.shape
    prompt_len, mult = rows.input_ids.shape[1], rows.cfg_mult
    ids = np.concatenate([rows.input_ids, np.full((len(rows.input_ids), m), model_cfg.image_placeholder_id)], 1)
    mask = np.concatenate([rows.attention_mask, np.ones((len(rows.input_ids), m), np.int32)], 1)
    head = params["image_head"]
    if args.candidates and mult != 2:
        parser.error("--candidates needs text guidance alone (cfg_mult 2): the caption scores compare its two rows")
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

    @jax.jit
    def caption_errors(tokens, key):  # the head's FM error given the caption and without it, [n] each
        c = conditions(tokens)
        x1 = tokens.reshape(n * m, dim)
        noise = jax.random.normal(key, (SCORE_DRAWS, n * m, dim))
        u = jax.random.normal(jax.random.fold_in(key, 1), (SCORE_DRAWS, n * m))
        velocity = functools.partial(net.apply, {"params": head})

        def error(rows_c):
            per_draw = jax.vmap(lambda e, t: flow_matching_errors(velocity, x1, rows_c, e, t))(noise, u)
            return per_draw.mean(0).reshape(n, m).mean(1)

        return error(c[:n].reshape(n * m, -1)), error(c[n:2 * n].reshape(n * m, -1))

    def decode(tokens) -> np.ndarray:
        latents = from_model_latents(unpatchify(tokens, *rows.grid, model_cfg.latent_patch_size), vae_cfg)
        return np.asarray(uint8_from_pixels(vae.apply({"params": vae_params}, latents, method=AutoencoderKL.decode)))

    def score(tokens) -> float:
        return round(evaluate(list(decode(tokens)), captions)["overall"], 4)

    def overall(right) -> float:  # per-image verdicts [n] -> evaluate's overall
        return round(accuracies(right, captions)["overall"], 4)

    def draw_after(given: int, key):  # the true tokens before token `given`, the drawn ones from there on
        tokens = true_tokens
        for k in range(given, m):
            tokens = tokens.at[:, k].set(draw(conditions(tokens)[:, k], jax.random.fold_in(key, k)))
        return tokens

    key = jax.random.key(args.seed)
    for given in (int(k) for k in args.given.split(",")):
        tokens = draw_after(min(given, m), key)
        print(json.dumps({"given": given, "drawn": m - min(given, m), "mini_geneval": score(tokens)}), flush=True)
    if args.teacher_forced:
        # [rows, M, E] with rows = guidance groups of n: flattened, the groups stay outermost as sample_head wants.
        c = conditions(true_tokens)
        drawn = draw(c.reshape(mult * n * m, -1), jax.random.fold_in(key, m)).reshape(n, m, dim)
        print(json.dumps({"teacher_forced": True, "mini_geneval": score(drawn)}), flush=True)
    noise = jax.random.normal(jax.random.fold_in(key, m + 1), true_tokens.shape)
    for std in (float(s) for s in args.token_noise.split(",") if s):
        print(json.dumps({"token_noise": std, "mini_geneval": score(true_tokens + std * noise)}), flush=True)
    if args.candidates:
        candidate_root, score_key = jax.random.split(jax.random.fold_in(key, m + 2))
        right, ranks = [], {}
        for j in range(args.candidates):
            tokens = draw_after(0, key if j == 0 else jax.random.fold_in(candidate_root, j))
            pixels = decode(tokens)
            right.append([score_image(image, caption) for image, caption in zip(pixels, captions)])
            with_caption, without = caption_errors(tokens, score_key)  # the same draws for every candidate
            cycle = jnp.mean(jnp.square(vae_tokens(pixels) - tokens), -1)
            for name, rank in dict(caption_error=-with_caption, caption_evidence=without - with_caption,
                                   cycle=-cycle.mean(1), cycle_worst=-cycle.max(1)).items():
                ranks.setdefault(name, []).append(np.asarray(rank))
            print(json.dumps({"candidate": j, "mini_geneval": overall(right[j])}), flush=True)
        right = np.asarray(right)
        best = {name: overall(right[np.argmax(rank, 0), np.arange(n)]) for name, rank in ranks.items()}
        print(json.dumps({"candidates": args.candidates, "any_right": overall(right.any(0)), "best_of": best}),
              flush=True)


if __name__ == "__main__":
    main()
