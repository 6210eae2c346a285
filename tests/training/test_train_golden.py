"""The train step the trainer runs, on the golden training case: its loss terms equal the golden values, its
gradient norm is the golden gradients' norm, and the gradient it hands the trainer's AdamW (read back from the
first moment) is the golden gradient, clipped by the trainer's global-norm clipping. Only the flow-matching
random draws are replayed from the golden case (the reference's noise and t); everything else is the trainer's
code: its config defaults, its optimizer, ``make_train_step`` and the train state."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from safetensors.numpy import load_file

from golden_inputs import image_loss_mask, image_tokens
from nextstep_jax.checkpoint.mapping import nextstep_table, tensors_from_params
from nextstep_jax.models.nextstep import NextStep
from nextstep_jax.sharding import make_mesh
from nextstep_jax.training.nextstep_task import optimizer_for
from nextstep_jax.training.run_config import train_config
from nextstep_jax.training.state import init_train_state
from nextstep_jax.training.step import make_train_step
from numerics import assert_close_rel

TOL = 1e-4  # golden README: losses and gradients within 1e-4 of max|ref| in float32


class ReplayedDraws:
    """The model as the step uses it (``cfg``, ``apply``), with the reference's FM noise and t injected."""

    def __init__(self, model: NextStep, noise: np.ndarray, u: np.ndarray):
        self.cfg, self._model = model.cfg, model
        self._draws = {"fm_noise": jnp.asarray(noise), "fm_u": jnp.asarray(u)}

    def apply(self, variables, *args, **kwargs):
        return self._model.apply(variables, *args, **kwargs, **self._draws)


def _prefixes(case):
    return sorted(k[: -len("_input_ids")] for k in case if k.endswith("_input_ids"))


def _latents(case, prefix):
    if f"{prefix}_latents" in case:
        return [case[f"{prefix}_latents"]]
    numbered = sorted((int(m.group(1)), k) for k in case if (m := re.fullmatch(rf"{prefix}_latent(\d+)", k)))
    return [case[k] for _, k in numbered]


@pytest.fixture(autouse=True)
def _highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


def test_trainer_step_on_the_golden_training_case(golden_model, load_case, golden_dir):
    case = load_case("g_train_loss")
    # The golden loss comes from the first official training forward, which skips image_out_projector.
    cfg, variables = golden_model(True, "float32", loss_uses_out_projector=False)
    mesh = make_mesh({"fsdp": -1}, devices=jax.devices()[:1])
    checked_grads = 0
    for p in _prefixes(case):
        ids, latents = case[f"{p}_input_ids"], _latents(case, p)
        config = train_config()
        config.model = cfg.to_dict()
        config.data.batch_size, config.data.seq_len = ids.shape
        optimizer, _ = optimizer_for(config)
        model = ReplayedDraws(NextStep(cfg), case[f"{p}_noise"], case[f"{p}_u"])
        step = make_train_step(config, model, optimizer, mesh)
        batch = {"input_ids": ids.astype(np.int32), "labels": case[f"{p}_labels"].astype(np.int32),
                 "image_tokens": np.asarray(image_tokens(cfg, ids, latents)),
                 "image_loss_mask": np.asarray(image_loss_mask(cfg, ids, latents, case[f"{p}_latents_mask"]))}
        state = init_train_state(cfg, optimizer, mesh, params=variables["params"], seed=0)
        state, metrics = step(state, batch)
        for name in ("loss", "lm_loss", "im_loss"):
            assert_close_rel(metrics[name], case[f"{p}_{name}"], TOL, f"{p} {name}")
        assert float(metrics["nonfinite"]) == 0.0

        grads_file = golden_dir / "cases" / f"g_train_grads_{p}.safetensors"
        if not grads_file.exists():
            continue
        expected = load_file(grads_file)
        norm = float(np.sqrt(sum(np.sum(np.square(g, dtype=np.float64)) for g in expected.values())))
        assert float(metrics["grad_norm"]) == pytest.approx(norm, rel=TOL)
        # First AdamW step: mu = (1 - b1) * the clipped gradient.
        clip = min(1.0, config.optim.clip_norm / norm) if config.optim.clip_norm else 1.0
        mu = optax.tree_utils.tree_get(state.opt_state, "mu")
        ours = {k: v / (1.0 - config.optim.b1) for k, v in tensors_from_params(nextstep_table(cfg), mu)}
        for key in ours.keys() - expected.keys():  # parameters the reference gave no gradient (unused here)
            assert not np.any(ours[key]), f"{key}: gradient where the reference has none"
        for key, ref in expected.items():
            assert_close_rel(ours[key], ref * clip, TOL, f"{p} clipped grad {key}")
        checked_grads += 1
    assert checked_grads, "the golden case has no gradient file"
