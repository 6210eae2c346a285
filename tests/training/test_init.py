"""Initialisation sources: a tiny Qwen2 LLM folder written here with the safetensors package (Hugging Face key
names spelled out, independently of the mapping table), the golden release as an init checkpoint, and the
errors that name a missing source, a wrong vocabulary or a missing tensor."""

import json

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from nextstep_jax.checkpoint import load_model, read_model_config
from nextstep_jax.configs import replace
from nextstep_jax.models.nextstep import init_params
from nextstep_jax.sharding import make_mesh
from nextstep_jax.training.init import InitError, from_qwen, init_config, initial_params


@pytest.fixture(scope="module")
def cfg(golden_dir):
    return read_model_config(golden_dir / "model")


def _qwen_tensors(cfg, rng, tied: bool) -> dict[str, np.ndarray]:
    e, h, kv, d, m, v = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size,
                         cfg.vocab_size)
    shapes = {"model.embed_tokens.weight": (v, e), "model.norm.weight": (e,)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}"
        shapes.update({
            f"{p}.input_layernorm.weight": (e,), f"{p}.post_attention_layernorm.weight": (e,),
            f"{p}.self_attn.q_proj.weight": (h * d, e), f"{p}.self_attn.q_proj.bias": (h * d,),
            f"{p}.self_attn.k_proj.weight": (kv * d, e), f"{p}.self_attn.k_proj.bias": (kv * d,),
            f"{p}.self_attn.v_proj.weight": (kv * d, e), f"{p}.self_attn.v_proj.bias": (kv * d,),
            f"{p}.self_attn.o_proj.weight": (e, h * d),
            f"{p}.mlp.gate_proj.weight": (m, e), f"{p}.mlp.up_proj.weight": (m, e), f"{p}.mlp.down_proj.weight": (e, m),
            # Qwen files hold rotary caches in some versions: not parameters, must be ignored.
            f"{p}.self_attn.rotary_emb.inv_freq": (d // 2,),
        })
    if not tied:
        shapes["lm_head.weight"] = (v, e)
    return {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}


def _write_qwen(folder, cfg, *, tied=False, vocab=None, drop=None, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    tensors = _qwen_tensors(cfg, np.random.default_rng(seed), tied)
    if drop:
        del tensors[drop]
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "vocab_size": vocab or cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": tied}))
    return tensors


def _init(source, path=""):
    init = init_config()
    init.source, init.path = source, str(path)
    return init


@pytest.mark.parametrize("tied", [False, True])
def test_qwen_weights_land_on_the_backbone_and_new_modules_keep_the_scratch_init(tmp_path, cfg, tied):
    tensors = _write_qwen(tmp_path / "qwen", cfg, tied=tied)
    rng = jax.random.key(3)
    mesh = make_mesh({"fsdp": 1}, devices=jax.devices()[:1])
    params = initial_params(_init("qwen", tmp_path / "qwen"), cfg, rng, mesh=mesh)
    scratch = init_params(cfg, rng)
    h, kv, d, e = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
    layers = params["backbone"]["layers"]
    np.testing.assert_array_equal(params["embed_tokens"]["embedding"], tensors["model.embed_tokens.weight"])
    np.testing.assert_array_equal(params["backbone"]["norm"]["scale"], tensors["model.norm.weight"])
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}"
        np.testing.assert_array_equal(layers["self_attn"]["q_proj"]["kernel"][i],
                                      tensors[f"{p}.self_attn.q_proj.weight"].T.reshape(e, h, d))
        np.testing.assert_array_equal(layers["self_attn"]["k_proj"]["bias"][i],
                                      tensors[f"{p}.self_attn.k_proj.bias"].reshape(kv, d))
        np.testing.assert_array_equal(layers["self_attn"]["o_proj"]["kernel"][i],
                                      tensors[f"{p}.self_attn.o_proj.weight"].T.reshape(h, d, e))
        np.testing.assert_array_equal(layers["mlp"]["down_proj"]["kernel"][i], tensors[f"{p}.mlp.down_proj.weight"].T)
        np.testing.assert_array_equal(layers["input_layernorm"]["scale"][i], tensors[f"{p}.input_layernorm.weight"])
    head = tensors["model.embed_tokens.weight" if tied else "lm_head.weight"]
    np.testing.assert_array_equal(params["lm_head"]["kernel"], head.T)
    for module in ("image_in_projector", "image_out_projector", "image_head"):
        jax.tree.map(np.testing.assert_array_equal, params[module], scratch[module])
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(params))
    assert jax.tree.structure(params) == jax.tree.structure(scratch)


def test_qwen_vocabulary_mismatch_is_named(tmp_path, cfg):
    _write_qwen(tmp_path / "qwen", cfg, vocab=cfg.vocab_size - 20)
    with pytest.raises(InitError, match=f"vocabulary has {cfg.vocab_size - 20} embedding rows, "
                                        f"config.model.vocab_size is {cfg.vocab_size}"):
        from_qwen(tmp_path / "qwen", cfg, jax.random.key(0))


def test_qwen_missing_tensor_and_architecture_are_named(tmp_path, cfg):
    _write_qwen(tmp_path / "qwen", cfg, drop="model.layers.1.mlp.up_proj.weight")
    with pytest.raises(InitError, match=r"no tensor 'layers.1.mlp.up_proj.weight'"):
        from_qwen(tmp_path / "qwen", cfg, jax.random.key(0))
    with pytest.raises(InitError, match=rf"num_layers: {cfg.num_layers} vs {cfg.num_layers + 1}"):
        from_qwen(tmp_path / "qwen", replace(cfg, num_layers=cfg.num_layers + 1), jax.random.key(0))


def test_missing_init_folder_is_named(tmp_path, cfg):
    with pytest.raises(InitError, match=f"init.path='{tmp_path / 'nope'}': no such folder"):
        initial_params(_init("checkpoint", tmp_path / "nope"), cfg, jax.random.key(0))
    with pytest.raises(InitError, match="init.source='hub'"):
        initial_params(_init("hub"), cfg, jax.random.key(0))


@pytest.mark.parametrize("scan_layers", [True, False])
def test_init_from_a_release_checkpoint(golden_dir, cfg, scan_layers):
    run_cfg = replace(cfg, scan_layers=scan_layers)
    params = initial_params(_init("checkpoint", golden_dir / "model"), run_cfg, jax.random.key(0))
    _, want = load_model(golden_dir / "model", layers="scanned" if scan_layers else "unrolled")
    jax.tree.map(np.testing.assert_array_equal, params, want)
    with pytest.raises(InitError, match=rf"hidden_size: {cfg.hidden_size} vs {2 * cfg.hidden_size}"):
        initial_params(_init("checkpoint", golden_dir / "model"), replace(cfg, hidden_size=2 * cfg.hidden_size),
                       jax.random.key(0))
