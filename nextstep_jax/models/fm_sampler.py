"""Samplers of the flow-matching head: the released SDE sampler (``FlowMatchingHead.sample``), the NextStep-1.1 time
grid, a plain Euler ODE, classifier-free guidance and its per-token schedules.

Numerics: the sampler state, score, drift and noise are float32; only the network inputs (x, t) are cast to
the compute dtype, as the released sampler does.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nextstep_jax.models.fm_head import SimpleMLPAdaLN, VelocityFn

GRIDS = ("nextstep1", "nextstep1.1")
METHODS = ("sde", "ode")
GUIDANCE_SCHEDULES = ("constant", "linear", "linear_increasing")


def _torch_linspace(start: float, stop: float, n: int) -> np.ndarray:
    """float32 linspace with torch's CPU formula (first half from start, second half from stop)."""
    start32, stop32 = np.float32(start), np.float32(stop)
    if n == 1:
        return np.array([start32], np.float32)
    step = (stop32 - start32) / np.float32(n - 1)
    i = np.arange(n)
    lo = start32 + step * i.astype(np.float32)
    hi = stop32 - step * (n - 1 - i).astype(np.float32)
    return np.where(i < n // 2, lo, hi).astype(np.float32)


def timesteps(num_steps: int, timesteps_shift: float = 1.0, last_step_size: float = 0.04,
              grid: str = "nextstep1") -> np.ndarray:
    """The float32 time grid: N points ending at 1-δ (shifted) for "nextstep1" (a final δ step follows),
    N+1 points ending at exactly 1 for "nextstep1.1"."""
    if grid not in GRIDS:
        raise ValueError(f"unknown grid {grid!r}; expected one of {GRIDS}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    s = timesteps_shift
    if grid == "nextstep1":
        tau = _torch_linspace(0.0, 1.0 - last_step_size, num_steps)
        return (tau / (s - (s - 1) * tau)).astype(np.float32)
    tau = _torch_linspace(0.0, 1.0, num_steps + 1)[:-1]
    return np.append(tau / (s - (s - 1) * tau), np.float32(1.0)).astype(np.float32)


def eval_times(num_steps: int, timesteps_shift: float = 1.0, last_step_size: float = 0.04,
               grid: str = "nextstep1") -> np.ndarray:
    """The t values (float32) at which ``sample`` evaluates the network, in order."""
    ts = timesteps(num_steps, timesteps_shift, last_step_size, grid)
    return ts if grid == "nextstep1" else ts[:-1]


def num_noise_draws(num_steps: int, grid: str = "nextstep1", method: str = "sde") -> int:
    """Gaussian draws per sample() call, in the reference's call order (draw 0 = initial noise)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    if method == "ode":
        return 1
    return num_steps if grid == "nextstep1" else num_steps + 1


def draw_noise(key: jax.Array, num_draws: int, batch: int, token_dim: int, noise_repeat: int = 1) -> jax.Array:
    """[num_draws, batch, token_dim] float32; each draw has ``noise_repeat`` rows tiled as [r0..rk-1, r0..]."""
    _check_repeat(batch, noise_repeat)
    raw = jax.random.normal(key, (num_draws, noise_repeat, token_dim), jnp.float32)
    return jnp.tile(raw, (1, batch // noise_repeat, 1))


def _check_repeat(batch: int, noise_repeat: int) -> None:
    if noise_repeat < 1 or batch % noise_repeat:
        raise ValueError(f"batch size {batch} must be divisible by noise_repeat {noise_repeat}")


def combine_guidance(v: jax.Array, cfg_mult: int, guidance_scale=1.0, image_guidance_scale=1.0) -> jax.Array:
    """Guided velocity from rows [cond; uncond] (``cfg_mult`` 2) or [cond; uncond1; uncond2] (3)
    (the official code calls the two scales ``cfg`` and ``cfg_img``)."""
    if cfg_mult == 1:
        return v
    if cfg_mult == 2:
        cond, uncond = jnp.split(v, 2)
        return uncond + guidance_scale * (cond - uncond)
    if cfg_mult == 3:
        cond, uncond1, uncond2 = jnp.split(v, 3)
        return uncond2 + image_guidance_scale * (uncond1 - uncond2) + guidance_scale * (cond - uncond1)
    raise ValueError(f"cfg_mult must be 1, 2 or 3, got {cfg_mult}")


def guidance_at(schedule: str, scale, k, num_tokens: int):
    """Guidance scale for image token k of ``num_tokens``: "constant"; "linear" = the
    official NextStep-1 pipeline's, decreasing from ``scale`` towards 1 over the tokens;
    "linear_increasing" = the later official pipeline's ``max(scale/2, 1 + (scale-1)·k/M)``."""
    if schedule == "constant":
        return scale
    if schedule == "linear":
        return 1 + (scale - 1) * (num_tokens - k) / num_tokens
    if schedule == "linear_increasing":
        return jnp.maximum(scale / 2, 1 + (scale - 1) * k / num_tokens)
    raise ValueError(f"unknown guidance schedule {schedule!r}; expected one of {GUIDANCE_SCHEDULES}")


def sample(velocity_fn: VelocityFn, cond: Any, *, cfg_mult: int, guidance_scale=1.0, image_guidance_scale=1.0,
           num_steps: int, timesteps_shift: float = 1.0, last_step_size: float = 0.04, grid: str = "nextstep1",
           method: str = "sde", noise_repeat: int = 1, key: jax.Array | None = None,
           noises: jax.Array | None = None, compute_dtype: Any = jnp.float32, token_dim: int = 64) -> jax.Array:
    """Sample one token per row group: returns float32 [B, token_dim], B = rows(cond) / cfg_mult.

    ``velocity_fn(x, t, cond)`` gets x [B·cfg_mult, D] and t [B·cfg_mult] already cast to ``compute_dtype``
    (the released sampler rounds t to bf16) and ``cond`` unchanged (e.g. the precomputed condition
    embedding). The guidance scales may be traced; everything else is static. Noise comes from ``key`` or
    from ``noises`` [num_noise_draws(...), B, D] (draw 0 = initial noise).
    """
    if cfg_mult not in (1, 2, 3):
        raise ValueError(f"cfg_mult must be 1, 2 or 3, got {cfg_mult}")
    rows = jax.tree.leaves(cond)[0].shape[0]
    if rows % cfg_mult:
        raise ValueError(f"{rows} condition rows are not divisible by cfg_mult {cfg_mult}")
    batch = rows // cfg_mult
    ts = timesteps(num_steps, timesteps_shift, last_step_size, grid)
    n_draws = num_noise_draws(num_steps, grid, method)
    _check_repeat(batch, noise_repeat)
    if noises is None:
        if key is None:
            raise ValueError("sample needs `key` or `noises`")
        noises = draw_noise(key, n_draws, batch, token_dim, noise_repeat)
    elif noises.shape != (n_draws, batch, token_dim):
        raise ValueError(f"noises must have shape {(n_draws, batch, token_dim)}, got {noises.shape}")
    noises = jnp.asarray(noises, jnp.float32)
    ts_j = jnp.asarray(ts)
    dts = jnp.asarray(ts[1:] - ts[:-1])

    def guided_v(x, ti):
        xin = jnp.concatenate([x] * cfg_mult).astype(compute_dtype)
        tin = jnp.full((rows,), ti, jnp.float32).astype(compute_dtype)
        v = velocity_fn(xin, tin, cond).astype(jnp.float32)
        return combine_guidance(v, cfg_mult, guidance_scale, image_guidance_scale)

    def step(i, x):
        ti, dt = ts_j[i], dts[i]
        v = guided_v(x, ti)
        if method == "ode":
            return x + v * dt
        # Official op order (FlowMatchingHead.sample): score with var = (1-t)^2 + t(1-t), then drift.
        score = (ti * v - x) / ((1 - ti) ** 2 + ti * (1 - ti))
        drift = v + (1 - ti) * score
        return x + drift * dt + jnp.sqrt(2 * (1 - ti)) * (noises[i + 1] * jnp.sqrt(dt))

    x = noises[0]
    if len(ts) > 1:  # a one-point grid has no steps here (and fori_loop would still trace the body on dts[0])
        x = jax.lax.fori_loop(0, len(ts) - 1, step, x)
    if grid == "nextstep1":
        # Fixed-size terminal Euler step: ends at t = ts[-1] + δ (< 1 for shift != 1, as released).
        x = x + guided_v(x, ts_j[-1]) * jnp.float32(last_step_size)
    return x


def sample_head(module: SimpleMLPAdaLN, params, c: jax.Array, *, precompute_modulations: bool = True,
                **kwargs) -> jax.Array:
    """``sample`` with the head network in its compute dtype for conditions c [rows, cond_dim]; ``kwargs``
    are those of ``sample``. The condition embedding is computed once, outside the step loop.

    With ``precompute_modulations`` (default) every step's adaLN modulations — about 60% of the head's
    weights — are computed before the loop in one [steps·rows]-row matmul per block, and each step only
    streams input_proj, the block MLPs and the final linear layer. Same ops, same dtypes: the result is
    identical to evaluating the full network at every step (``precompute_modulations=False``).
    """
    c_emb = module.apply(params, c, method=module.embed_condition)
    sample_kw = dict(token_dim=module.token_dim, compute_dtype=module.dtype, **kwargs)
    if not precompute_modulations:
        def velocity_fn(x, t, ce):
            return module.apply(params, x, t, ce, method=module.velocity)

        return sample(velocity_fn, c_emb, **sample_kw)

    dtype = jnp.dtype(module.dtype)
    grid_kw = {k: kwargs[k] for k in ("timesteps_shift", "last_step_size", "grid") if k in kwargs}
    # sample() feeds t rounded to the compute dtype: the table is built from, and looked up by, those values.
    # Grid points that round to the same value have identical modulations, so any match is the right one.
    t_keys = jnp.asarray(eval_times(kwargs["num_steps"], **grid_kw)).astype(dtype)
    table = module.apply(params, t_keys[:, None], c_emb, method=module.modulations)  # [steps, rows, ·]

    def velocity_fn(x, t, cond):
        tab = cond[1]
        index = jnp.argmax(t_keys == t[0])
        mods = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, index, 0, keepdims=False), tab)
        return module.apply(params, x, mods, method=module.velocity_with_modulations)

    # c_emb leads the pytree: sample() counts rows from its first leaf.
    return sample(velocity_fn, (c_emb, table), **sample_kw)
