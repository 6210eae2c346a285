"""Flow-matching head: network and loss against the golden vectors and float64 numpy references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from numerics import assert_close_rel, linear_field

from nextstep_jax.models.fm_head import SimpleMLPAdaLN, flow_matching_loss, timestep_embedding
from nextstep_jax.sharding import LOGICAL_AXIS_RULES

F32_REL = 1e-4  # golden README: net/loss atol=rtol=1e-4, sampler 1e-4·max|ref|
# bf16 compute: unit roundoff 2^-8 ≈ 3.9e-3; observed ≤ 1e-2·max|ref| on net, loss and sampler outputs
# (a few roundoffs accumulated through the layers and steps), so 3e-2 leaves a ~3x margin.
BF16_REL = 3e-2
DTYPES = [("float32", F32_REL), ("bfloat16", BF16_REL)]


@pytest.fixture(autouse=True)
def _highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


def _rel(got, ref):
    return float(np.max(np.abs(np.asarray(got, np.float64) - ref)) / max(np.max(np.abs(ref)), 1e-30))


# --- network ------------------------------------------------------------------------------------------------
def test_param_tree_mirrors_checkpoint_and_has_logical_axes(golden_head, load_case):
    kwargs, params = golden_head
    d = load_case("d_fm_net")
    module = SimpleMLPAdaLN(**kwargs)
    boxed = jax.eval_shape(module.init, jax.random.key(0), d["x"], d["t"], d["c"])
    shapes = jax.tree.map(lambda a: a.shape, nn.unbox(boxed))
    assert shapes == jax.tree.map(lambda a: a.shape, params)
    known = {name for name, _ in LOGICAL_AXIS_RULES}
    specs = jax.tree.leaves(nn.get_partition_spec(boxed), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    assert len(specs) == len(jax.tree.leaves(params))
    for spec in specs:
        assert spec and all(name in known for name in spec), spec


def test_init_follows_official_scheme():
    dim, cond_dim = 32, 48
    module = SimpleMLPAdaLN(token_dim=16, dim=dim, num_layers=2)
    x, t, c = jnp.ones((4, 16)), jnp.full((4,), 0.3), jnp.ones((4, cond_dim))
    p = nn.unbox(module.init(jax.random.key(1), x, t, c))["params"]
    zero = [p["final_layer"]["linear"], p["final_layer"]["adaLN_modulation_1"]]
    zero += [p[f"res_blocks_{j}"]["adaLN_modulation_1"] for j in range(2)]
    for leaf in jax.tree.leaves(zero):
        assert not np.any(leaf)
    for name in ("mlp_0", "mlp_2"):
        assert abs(float(jnp.std(p["time_embed"][name]["kernel"])) - 0.02) < 0.004
    for kernel in (p["cond_embed"]["kernel"], p["input_proj"]["kernel"], p["res_blocks_0"]["mlp_0"]["kernel"]):
        bound = math.sqrt(6 / sum(kernel.shape))
        assert float(jnp.max(jnp.abs(kernel))) <= bound
        assert abs(float(jnp.std(kernel)) / (bound / math.sqrt(3)) - 1) < 0.15
    np.testing.assert_array_equal(p["res_blocks_1"]["in_ln"]["scale"], np.ones(dim))
    assert not np.any(module.apply({"params": p}, x, t, c))  # zero-initialised output, as released


def test_timestep_embedding_golden_and_float64(load_case):
    d = load_case("d_fm_net")
    dim = d["t_freq"].shape[1]
    np.testing.assert_allclose(timestep_embedding(jnp.asarray(d["t"]), dim), d["t_freq"], atol=1e-4, rtol=1e-4)
    t = np.concatenate([d["t"], np.random.default_rng(0).uniform(0, 1, 16)]).astype(np.float32)
    for n in (dim, 7):
        half = n // 2
        args = t.astype(np.float64)[:, None] * np.exp(-math.log(1e4) * np.arange(half) / half)[None]
        ref = np.concatenate([np.cos(args), np.sin(args), np.zeros((len(t), n % 2))], axis=1)
        np.testing.assert_allclose(timestep_embedding(jnp.asarray(t), n), ref, atol=1e-6)


@pytest.mark.parametrize("dtype,rel", DTYPES)
def test_net_matches_golden(golden_head, load_case, dtype, rel):
    kwargs, params = golden_head
    d = load_case("d_fm_net")
    module = SimpleMLPAdaLN(**kwargs, dtype=dtype)
    v = module.apply(params, d["x"], d["t"], d["c"])
    assert v.dtype == jnp.dtype(dtype)
    assert_close_rel(v, d["velocity"], rel, "velocity")
    t_emb = module.apply(params, jnp.asarray(d["t"]), method=lambda m, t: m.time_embed(t))
    assert_close_rel(t_emb, d["t_emb"], rel, "t_emb")
    c_emb = module.apply(params, d["c"], method=module.embed_condition)
    split = module.apply(params, d["x"], d["t"], c_emb, method=module.velocity)
    np.testing.assert_array_equal(np.asarray(split, np.float32), np.asarray(v, np.float32))


# --- loss ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,rel", DTYPES)
def test_loss_matches_golden(golden_head, load_case, dtype, rel):
    kwargs, params = golden_head
    e = load_case("e_fm_loss")
    module = SimpleMLPAdaLN(**kwargs, dtype=dtype)
    net_fn = lambda x, t, c: module.apply(params, x, t, c)  # noqa: E731
    for sub, mask in (("masked", e["mask"]), ("nomask", None)):
        loss = flow_matching_loss(net_fn, e["target"], e["c"], mask, noise=e[f"{sub}_noise"], u=e[f"{sub}_u"])
        assert loss.dtype == jnp.float32 and loss.shape == ()
        assert_close_rel(loss, e[f"{sub}_loss"], rel, sub)


def test_loss_tiling_mask_and_gradients_against_numpy():
    rng = np.random.default_rng(0)
    n, dim, mul = 5, 8, 3
    net, net64 = linear_field(rng, dim, 6)
    target = rng.normal(size=(n, dim)).astype(np.float32)
    c = rng.normal(size=(n, 6)).astype(np.float32)
    mask = np.array([1, 0, 1, 1, 0], np.float32)
    noise = rng.normal(size=(n * mul, dim)).astype(np.float32)
    u = rng.normal(size=n * mul).astype(np.float32)

    x1, c64, m64 = np.tile(target, (mul, 1)), np.tile(c, (mul, 1)), np.tile(mask, mul)  # whole-block tiling
    t = 1 / (1 + np.exp(-u.astype(np.float64)))
    xt = t[:, None] * x1 + (1 - t[:, None]) * noise
    rows = np.mean((net64(xt, t, c64) - (x1 - noise)) ** 2, axis=1)
    for m, ref in ((mask, np.sum(rows * m64) / (np.sum(m64) + 1e-8)), (None, np.mean(rows))):
        got = flow_matching_loss(net, target, c, m, batch_mul=mul, noise=noise, u=u)
        np.testing.assert_allclose(float(got), ref, rtol=1e-5)

    grad_fn = jax.jit(jax.grad(lambda tg, cc, mk, key: flow_matching_loss(net, tg, cc, mk, batch_mul=mul, key=key),
                               argnums=(0, 1)))
    g_target, g_c = grad_fn(target, c, mask, jax.random.key(0))
    assert not np.any(g_target)  # target is stop-gradient
    assert np.all(np.any(g_c[mask == 1] != 0, axis=1)) and not np.any(g_c[mask == 0])


def test_loss_without_key_raises_a_clear_error():
    v = lambda x, t, c: x  # noqa: E731
    with pytest.raises(ValueError, match="needs `key`"):
        flow_matching_loss(v, jnp.zeros((2, 4)), jnp.zeros((2, 1)), noise=jnp.zeros((2, 4)))
