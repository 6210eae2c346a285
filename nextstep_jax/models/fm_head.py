"""Flow-matching head of NextStep-1 (REFERENCE §5): the `SimpleMLPAdaLN` network, its training loss and its
samplers (the released SDE sampler, the NextStep-1.1 grid, and a plain Euler ODE).

Numerics: params float32, matmuls in the compute dtype, LayerNorm statistics, the sinusoidal time features,
the loss and the sampler state / score / drift / noise in float32 (ARCHITECTURE "Numerics policy").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

FREQ_DIM = 256
MAX_PERIOD = 10000.0
LN_EPS = 1e-6
GRIDS = ("nextstep1", "nextstep1.1")
METHODS = ("sde", "ode")

VelocityFn = Callable[[jax.Array, jax.Array, Any], jax.Array]

_xavier = nn.initializers.xavier_uniform()  # == torch xavier_uniform_ on the transposed [out, in] weight
_zeros = nn.initializers.zeros_init()


def _dense(features: int, axes: tuple[str, str], dtype, param_dtype, name: str | None = None,
           kernel_init=_xavier) -> nn.Dense:
    # name=None inside setup(): the attribute name is the param name.
    return nn.Dense(features, dtype=dtype, param_dtype=param_dtype, name=name,
                    kernel_init=nn.with_logical_partitioning(kernel_init, axes),
                    bias_init=nn.with_logical_partitioning(_zeros, (axes[1],)))


def _layer_norm(dtype, param_dtype, name: str | None, affine: bool) -> nn.LayerNorm:
    # Two-pass variance in float32, as torch.nn.LayerNorm.
    return nn.LayerNorm(epsilon=LN_EPS, dtype=dtype, param_dtype=param_dtype, use_bias=affine,
                        use_scale=affine, use_fast_variance=False, name=name,
                        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("fm_embed",)),
                        bias_init=nn.with_logical_partitioning(_zeros, ("fm_embed",)))


def timestep_embedding(t: jax.Array, dim: int = FREQ_DIM, max_period: float = MAX_PERIOD) -> jax.Array:
    """[N] -> [N, dim] float32 features cat(cos, sin)(t·freq); t in [0, 1] is used as is (no ×1000)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


def _modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    dim: int
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, t: jax.Array) -> jax.Array:
        init = nn.initializers.normal(0.02)
        h = timestep_embedding(t).astype(self.dtype)
        h = _dense(self.dim, ("fm_freq", "fm_mlp"), self.dtype, self.param_dtype, "mlp_0", init)(h)
        h = _dense(self.dim, ("fm_mlp", "fm_embed"), self.dtype, self.param_dtype, "mlp_2", init)(nn.silu(h))
        return nn.with_logical_constraint(h, ("activation_batch", "activation_embed"))


class ResBlock(nn.Module):
    """``x + gate · MLP(modulate(LN(x), shift, scale))`` with (shift, scale, gate) = ``modulation(y)``."""

    dim: int
    mlp_dim: int
    dtype: Any
    param_dtype: Any

    def setup(self):
        dt, pdt = self.dtype, self.param_dtype
        self.adaLN_modulation_1 = _dense(3 * self.dim, ("fm_embed", "fm_modulation"), dt, pdt, kernel_init=_zeros)
        self.in_ln = _layer_norm(dt, pdt, None, True)
        self.mlp_0 = _dense(self.mlp_dim, ("fm_embed", "fm_mlp"), dt, pdt)
        self.mlp_2 = _dense(self.dim, ("fm_mlp", "fm_embed"), dt, pdt)

    def modulation(self, y: jax.Array) -> jax.Array:
        """[..., dim] -> [..., 3·dim] = cat(shift, scale, gate); depends on (t, c) only, not on x."""
        return self.adaLN_modulation_1(nn.silu(y))

    def modulated(self, x: jax.Array, mod: jax.Array) -> jax.Array:
        shift, scale, gate = jnp.split(mod, 3, axis=-1)
        h = _modulate(self.in_ln(x), shift, scale)
        h = nn.with_logical_constraint(nn.silu(self.mlp_0(h)), ("activation_batch", "activation_mlp"))
        h = self.mlp_2(h)
        return nn.with_logical_constraint(x + gate * h, ("activation_batch", "activation_embed"))

    def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
        return self.modulated(x, self.modulation(y))


class FinalLayer(nn.Module):
    dim: int
    token_dim: int
    dtype: Any
    param_dtype: Any

    def setup(self):
        dt, pdt = self.dtype, self.param_dtype
        self.adaLN_modulation_1 = _dense(2 * self.dim, ("fm_embed", "fm_modulation"), dt, pdt, kernel_init=_zeros)
        self.norm_final = _layer_norm(dt, pdt, None, False)
        self.linear = _dense(self.token_dim, ("fm_embed", "token"), dt, pdt, kernel_init=_zeros)

    def modulation(self, y: jax.Array) -> jax.Array:
        """[..., dim] -> [..., 2·dim] = cat(shift, scale)."""
        return self.adaLN_modulation_1(nn.silu(y))

    def modulated(self, x: jax.Array, mod: jax.Array) -> jax.Array:
        shift, scale = jnp.split(mod, 2, axis=-1)
        v = self.linear(_modulate(self.norm_final(x), shift, scale))
        return nn.with_logical_constraint(v, ("activation_batch", "activation_token"))

    def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
        return self.modulated(x, self.modulation(y))


class SimpleMLPAdaLN(nn.Module):
    """The released head network: ``v = net(x [N, token_dim], t [N], c [N, cond_dim])``.

    It is split along what each part depends on: ``embed_condition(c)`` (c only), ``modulations(t, c_emb)``
    (every block's and the final layer's adaLN shift/scale/gate: t and c, not x) and
    ``velocity_with_modulations(x, mods)`` (input_proj → blocks → final layer). ``velocity`` and ``__call__``
    are exactly their composition. While one token is sampled c is fixed and t runs over a static grid, so
    a sampler can compute the modulations of all steps in one matmul per block (``sample_head``).
    """

    token_dim: int = 64
    dim: int = 1536
    num_layers: int = 12
    mlp_ratio: float = 1.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        dtype, pdt = jnp.dtype(self.dtype), jnp.dtype(self.param_dtype)
        self.time_embed = TimestepEmbedder(self.dim, dtype, pdt)
        self.cond_embed = _dense(self.dim, ("embed", "fm_embed"), dtype, pdt)
        self.input_proj = _dense(self.dim, ("token", "fm_embed"), dtype, pdt)
        self.res_blocks = [ResBlock(self.dim, int(self.dim * self.mlp_ratio), dtype, pdt)
                           for _ in range(self.num_layers)]
        self.final_layer = FinalLayer(self.dim, self.token_dim, dtype, pdt)

    def embed_condition(self, c: jax.Array) -> jax.Array:
        """[N, cond_dim] -> [N, dim] in the compute dtype."""
        return nn.with_logical_constraint(self.cond_embed(c), ("activation_batch", "activation_embed"))

    def modulations(self, t: jax.Array, c_emb: jax.Array) -> tuple[list[jax.Array], jax.Array]:
        """(per block [..., 3·dim], final layer [..., 2·dim]) for y = time_embed(t) + c_emb.

        ``t`` has any shape T; ``c_emb`` [..., dim] broadcasts against T + (dim,): t [N] with c_emb [N, dim]
        gives one row per (t, c) pair, t [S, 1] with c_emb [N, dim] gives the [S, N, ·] table of a step grid.
        """
        t_emb = self.time_embed(t.reshape(-1)).reshape(*t.shape, self.dim)
        y = t_emb + c_emb
        return [block.modulation(y) for block in self.res_blocks], self.final_layer.modulation(y)

    def velocity_with_modulations(self, x: jax.Array, mods: tuple[list[jax.Array], jax.Array]) -> jax.Array:
        """v [N, token_dim] (compute dtype) from x [N, token_dim] and ``modulations`` rows [N, ·]."""
        block_mods, final_mod = mods
        h = nn.with_logical_constraint(self.input_proj(x), ("activation_batch", "activation_embed"))
        for block, mod in zip(self.res_blocks, block_mods, strict=True):
            h = block.modulated(h, mod)
        return self.final_layer.modulated(h, final_mod)

    def velocity(self, x: jax.Array, t: jax.Array, c_emb: jax.Array) -> jax.Array:
        """v [N, token_dim] (compute dtype) from the precomputed condition embedding."""
        return self.velocity_with_modulations(x, self.modulations(t, c_emb))

    def __call__(self, x: jax.Array, t: jax.Array, c: jax.Array) -> jax.Array:
        return self.velocity(x, t, self.embed_condition(c))


def flow_matching_loss(net_fn: VelocityFn, target: jax.Array, c: jax.Array, mask: jax.Array | None = None, *,
                       batch_mul: int = 1, key: jax.Array | None = None, noise: jax.Array | None = None,
                       u: jax.Array | None = None) -> jax.Array:
    """Scalar float32 flow-matching loss (REFERENCE §5.2).

    Rows of (target, c, mask) are tiled ``batch_mul`` times as whole blocks; ``noise`` [N·batch_mul, D] and
    ``u`` [N·batch_mul] (t = sigmoid(u)) are injected or drawn from ``key``.
    """
    x1 = jax.lax.stop_gradient(jnp.tile(target.astype(jnp.float32), (batch_mul, 1)))
    c = jnp.tile(c, (batch_mul, 1))
    n, d = x1.shape
    if (noise is None or u is None) and key is None:
        raise ValueError("flow_matching_loss needs `key` unless both `noise` and `u` are given")
    k_noise, k_u = jax.random.split(key) if key is not None else (None, None)
    noise = jax.random.normal(k_noise, (n, d)) if noise is None else noise.astype(jnp.float32)
    u = jax.random.normal(k_u, (n,)) if u is None else u.astype(jnp.float32)
    if noise.shape != (n, d) or u.shape != (n,):
        raise ValueError(f"noise {noise.shape} / u {u.shape} must be {(n, d)} / {(n,)} (rows × batch_mul)")
    t = 1 / (1 + jnp.exp(-u))  # official op order rather than jax.nn.sigmoid
    x_t = t[:, None] * x1 + (1 - t[:, None]) * noise
    v = net_fn(x_t, t, c).astype(jnp.float32)
    per_row = jnp.mean((v - (x1 - noise)) ** 2, axis=-1)
    if mask is None:
        return jnp.mean(per_row)
    mask = jnp.tile(mask.astype(jnp.float32), batch_mul)
    return jnp.sum(per_row * mask) / (jnp.sum(mask) + 1e-8)


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


def cfg_combine(v: jax.Array, cfg_mult: int, cfg=1.0, cfg_img=1.0) -> jax.Array:
    """Guided velocity from rows [cond; uncond] (2) or [cond; uncond1; uncond2] (3) (REFERENCE §5.4)."""
    if cfg_mult == 1:
        return v
    if cfg_mult == 2:
        cond, uncond = jnp.split(v, 2)
        return uncond + cfg * (cond - uncond)
    if cfg_mult == 3:
        cond, uncond1, uncond2 = jnp.split(v, 3)
        return uncond2 + cfg_img * (uncond1 - uncond2) + cfg * (cond - uncond1)
    raise ValueError(f"cfg_mult must be 1, 2 or 3, got {cfg_mult}")


def sample(velocity_fn: VelocityFn, cond: Any, *, cfg_mult: int, cfg=1.0, cfg_img=1.0, num_steps: int,
           timesteps_shift: float = 1.0, last_step_size: float = 0.04, grid: str = "nextstep1",
           method: str = "sde", noise_repeat: int = 1, key: jax.Array | None = None,
           noises: jax.Array | None = None, compute_dtype: Any = jnp.float32, token_dim: int = 64) -> jax.Array:
    """Sample one token per row group: returns float32 [B, token_dim], B = rows(cond) / cfg_mult.

    ``velocity_fn(x, t, cond)`` gets x [B·cfg_mult, D] and t [B·cfg_mult] already cast to ``compute_dtype``
    (the released sampler rounds t to bf16) and ``cond`` unchanged (e.g. the precomputed condition
    embedding). ``cfg``/``cfg_img`` may be traced; everything else is static. Noise comes from ``key`` or
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
        return cfg_combine(v, cfg_mult, cfg, cfg_img)

    def step(i, x):
        ti, dt = ts_j[i], dts[i]
        v = guided_v(x, ti)
        if method == "ode":
            return x + v * dt
        # Official op order (FlowMatchingHead.sample): score with var = (1-t)^2 + t(1-t), then drift.
        score = (ti * v - x) / ((1 - ti) ** 2 + ti * (1 - ti))
        drift = v + (1 - ti) * score
        return x + drift * dt + jnp.sqrt(2 * (1 - ti)) * (noises[i + 1] * jnp.sqrt(dt))

    x = jax.lax.fori_loop(0, len(ts) - 1, step, noises[0])
    if grid == "nextstep1":
        # Fixed-size terminal Euler step: ends at t = ts[-1] + δ (< 1 for shift != 1, §14 #4).
        x = x + guided_v(x, ts_j[-1]) * jnp.float32(last_step_size)
    return x


def eval_times(num_steps: int, timesteps_shift: float = 1.0, last_step_size: float = 0.04,
               grid: str = "nextstep1") -> np.ndarray:
    """The t values (float32) at which ``sample`` evaluates the network, in order."""
    ts = timesteps(num_steps, timesteps_shift, last_step_size, grid)
    return ts if grid == "nextstep1" else ts[:-1]


def head_module(head_params, dtype: Any = jnp.float32) -> SimpleMLPAdaLN:
    """The ``SimpleMLPAdaLN`` whose params are ``head_params`` (e.g. a model's ``image_head`` subtree)."""
    dim = head_params["input_proj"]["kernel"].shape[-1]
    return SimpleMLPAdaLN(token_dim=head_params["final_layer"]["linear"]["kernel"].shape[-1], dim=dim,
                          num_layers=sum(1 for k in head_params if k.startswith("res_blocks_")),
                          mlp_ratio=head_params["res_blocks_0"]["mlp_0"]["kernel"].shape[-1] / dim, dtype=dtype)


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
