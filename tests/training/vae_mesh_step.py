"""Run by test_vae_task.py with 8 fake CPU devices: two VAE train steps (with the PatchGAN critic on) on a
(data=2, fsdp=2, tensor=2) mesh and on one device from the same params and batches; prints as JSON the
metrics' relative differences and, for the VAE and the critic, the largest parameter difference relative to
the largest update.

Adam's eps is raised above the float32 noise of gradients that are zero in exact arithmetic (a conv bias that
only reaches the loss through a GroupNorm of one channel per group, which removes it): with the default 1e-8,
Adam turns that noise into full-size updates of either sign, which differ between any two reduction orders."""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from nextstep_jax.checkpoint import read_vae_config
from nextstep_jax.configs import load_config_file, replace
from nextstep_jax.sharding import make_mesh
from nextstep_jax.training.optimizer import make_optimizer
from nextstep_jax.training.vae_task import VaeStateLayout, abstract_vae_variables, make_vae_train_step


def main(golden_vae: str, image_size: int, config_file: str) -> None:
    assert jax.device_count() == 8
    config = load_config_file(config_file)
    config.vae = replace(read_vae_config(golden_vae), dtype="float32")
    config.data.image_size, config.data.batch_size = image_size, 8
    config.vae_train.update(dict(gan=0.1, disc_channels=16, disc_layers=2, kl=1e-3, noise_gamma=0.5))
    config.optim.eps, config.schedule.warmup_steps = 1e-3, 0
    rng = np.random.default_rng(0)
    batches = [rng.uniform(-1, 1, (8, image_size, image_size, 3)).astype(np.float32) for _ in range(2)]
    results, params = [], None
    for mesh in (make_mesh({}, devices=jax.devices()[:1]), make_mesh({"data": 2, "fsdp": 2, "tensor": 2})):
        abstract = nn.unbox(abstract_vae_variables(config.vae, image_size))["params"]
        tx, _ = make_optimizer(config.optim, config.schedule, abstract, total_steps=10)
        layout = VaeStateLayout(config, tx, mesh)
        params = layout.scratch_params(jax.random.PRNGKey(0)) if params is None else params
        state = layout.new_state(params, 0)
        start = jax.device_get((state.params, state.disc_params))
        step = make_vae_train_step(config, layout)
        for x in batches:
            state, metrics = step(state, {"images": jnp.asarray(x)})
        results.append((jax.device_get(metrics), jax.device_get(state.params), jax.device_get(state.disc_params)))
    (m1, p1, d1), (m8, p8, d8) = results
    rel = lambda a, b: float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))
    biggest = lambda pairs: max(float(np.max(np.abs(a - b))) for a, b in pairs)

    def relative_to_update(ours, ref, init):
        return biggest(zip(jax.tree.leaves(ours), jax.tree.leaves(ref))) / biggest(
            zip(jax.tree.leaves(ref), jax.tree.leaves(init)))

    print(json.dumps({"metrics": {k: rel(np.asarray(m8[k]), np.asarray(m1[k])) for k in m1},
                      "params": relative_to_update(p8, p1, start[0]),
                      "disc_params": relative_to_update(d8, d1, start[1])}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
