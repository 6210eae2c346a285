"""The benchmark workloads (README "Benchmarks": sampler, backbone, train step, generation);
``python -m nextstep_jax.bench`` imports this after limiting threads.

Times are medians over ``repeats`` runs after ``warmup`` runs, blocked on the results; ``compile_s`` is the
first call minus that median. Machine limits are the best of several runs (noise only slows a run down).
Weights are random and non-zero (the released init zeroes the adaLN and final layers).
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import linen as nn

from nextstep_jax.configs import model_config, vae_config
from nextstep_jax.generation.generator import Generator
from nextstep_jax.generation.prompts import PromptTokenizer
from nextstep_jax.generation.settings import SamplingSettings
from nextstep_jax.models.backbone import init_cache
from nextstep_jax.models.fm_head import SimpleMLPAdaLN, head_module
from nextstep_jax.models.fm_sampler import sample_head
from nextstep_jax.models.layouts import for_decoding
from nextstep_jax.models.nextstep import NextStep, init_variables, loss_counts, token_dim
from nextstep_jax.models.vae import AutoencoderKL
from nextstep_jax.sharding import make_mesh
from nextstep_jax.training.flops import train_step_flops
from nextstep_jax.training.optimizer import make_optimizer, nextstep_layer_norm_paths, optim_config, schedule_config
from nextstep_jax.training.state import init_train_state
from nextstep_jax.training.step import make_train_step

IMAGE_MODULES = ("image_head", "image_in_projector", "image_out_projector")
# What the Generator runs (models.layouts.for_decoding): layers unrolled, q/k/v and gate/up fused.
GENERATION_LAYOUT = "unrolled_fused"


def _timed(fn, warmup: int, repeats: int) -> tuple[float, float]:
    """(first call seconds, median seconds of ``repeats`` calls after ``warmup`` calls in total)."""
    return _timed_with_cpu(fn, warmup, repeats)[:2]


def _timed_with_cpu(fn, warmup: int, repeats: int) -> tuple[float, float, float]:
    """``_timed`` and the median CPU seconds of the process per call (all threads; a call that waits for a
    CPU the host gives to other jobs does not accumulate them)."""
    start = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - start
    for _ in range(warmup - 1):
        jax.block_until_ready(fn())
    times, cpu = [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - cpu_start)
    return first, statistics.median(times), statistics.median(cpu)


def _best(fn, runs: int) -> float:
    jax.block_until_ready(fn())
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return best


def measure_machine(runs: int = 7) -> dict:
    key = jax.random.key(0)
    gflops = {}
    matmul = jax.jit(jnp.matmul)
    for n in (1024, 2048, 4096):
        a, b = jax.random.normal(key, (2, n, n), jnp.float32)
        gflops[n] = 2 * n ** 3 / _best(lambda: matmul(a, b), runs) / 1e9
    big = jax.random.normal(key, (8192, 8192), jnp.float32)  # 256 MiB
    vec = jnp.ones((8192,), jnp.float32)
    bandwidth = big.nbytes / _best(lambda: matmul(big, vec), runs) / 1e9
    del big
    return {"matmul_f32_gflops": max(gflops.values()), "matmul_f32_gflops_by_size": gflops,
            "mem_bandwidth_gbs": bandwidth}


def randomize(params, key):
    """Every leaf redrawn: norm scales 1 + N(0, 0.02²), everything else N(0, 0.02²)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(key, len(leaves))
    out = []
    for (path, leaf), k in zip(leaves, keys):
        noise = 0.02 * jax.random.normal(k, leaf.shape, jnp.float32)
        out.append((1 + noise if "scale" in str(path[-1]) else noise).astype(leaf.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


def _bytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree))


def _matmul_weights(tree) -> int:
    return sum(x.size for x in jax.tree.leaves(tree) if x.ndim >= 2)


def _head_params(dim, layers, token_dim, cond_dim, key):
    module = SimpleMLPAdaLN(token_dim=token_dim, dim=dim, num_layers=layers)
    shapes = jax.eval_shape(module.init, key, jnp.zeros((1, token_dim)), jnp.zeros((1,)), jnp.zeros((1, cond_dim)))
    return randomize(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), nn.unbox(shapes))["params"], key)


def fm_sample(config: dict, machine: dict) -> dict:
    w, dtype = config["fm_sample"], config["dtype"]
    key = jax.random.key(config["seed"])
    head = _head_params(w["dim"], w["layers"], w["token_dim"], w["cond_dim"], key)
    rows = 2 * w["batch"]
    cond = jax.random.normal(key, (rows, w["cond_dim"]), jnp.float32).astype(dtype)
    module = head_module(head, dtype)
    fn = jax.jit(lambda p, c, k: sample_head(module, {"params": p}, c, cfg_mult=2, guidance_scale=w["cfg"],
                                             num_steps=w["steps"], timesteps_shift=w["timesteps_shift"], key=k))
    first, median = _timed(lambda: fn(head, cond, key), config["warmup"], config["repeats"])
    flops = 2 * rows * w["steps"] * _matmul_weights(head)
    return {"median_s": median, "per_step_ms": median / w["steps"] * 1e3, "gflops": flops / median / 1e9,
            "fraction_of_matmul_peak": flops / median / 1e9 / machine["matmul_f32_gflops"],
            "compile_s": first - median, "rows": rows, "head_params": sum(x.size for x in jax.tree.leaves(head)),
            "flops": flops, "flops_counted_as": "2 * rows * steps * head matmul weights"}


def _backbone_cfg(b: dict, dtype: str, scan_layers: bool, **extra):
    return model_config(vocab_size=b["vocab"], hidden_size=b["hidden"], intermediate_size=b["intermediate"],
                        num_layers=b["layers"], num_heads=b["heads"], num_kv_heads=b["kv_heads"],
                        head_dim=b["hidden"] // b["heads"], dtype=dtype, scan_layers=scan_layers,
                        **({"fm_head_dim": 64, "fm_head_layers": 1} | extra))


def _model_params(cfg, key):
    return randomize(nn.unbox(init_variables(cfg, key))["params"], key)


def _decode_programs(cfg, b: dict):
    """Jitted prefill, and a decode loop of ``decode`` greedy steps with the LM head (the text path)."""
    model = NextStep(cfg)
    batch, prefill_len, steps = b["batch"], b["prefill"], b["decode"]
    cache_len = prefill_len + steps
    kv_valid = jnp.ones((batch, cache_len), bool)

    @jax.jit
    def prefill(params, ids):
        v = {"params": params}
        cache = init_cache(cfg, batch, cache_len)
        embeds = model.apply(v, ids, method=NextStep.embed)
        hidden, cache = model.apply(v, embeds, kv_valid, cache, 0, method=NextStep.step)
        return jnp.argmax(model.apply(v, hidden[:, -1], method=NextStep.logits), -1), cache

    @jax.jit
    def decode(params, token, cache):
        v = {"params": params}

        def body(i, carry):
            token, cache = carry
            embeds = model.apply(v, token[:, None], method=NextStep.embed)
            hidden, cache = model.apply(v, embeds, kv_valid, cache, prefill_len + i, method=NextStep.step)
            return jnp.argmax(model.apply(v, hidden[:, 0], method=NextStep.logits), -1), cache

        return jax.lax.fori_loop(0, steps, body, (token, cache))[0]

    return prefill, decode


def backbone(config: dict, machine: dict) -> dict:
    b, dtype = config["backbone"], config["dtype"]
    key = jax.random.key(config["seed"])
    ids = jax.random.randint(key, (b["batch"], b["prefill"]), 0, b["vocab"])
    unrolled_cfg = _backbone_cfg(b, dtype, False)
    unrolled = (unrolled_cfg, _model_params(unrolled_cfg, key))
    scan_cfg = _backbone_cfg(b, dtype, True)
    layouts = {"unrolled": unrolled, "scan": (scan_cfg, _model_params(scan_cfg, key)),
               GENERATION_LAYOUT: for_decoding(*unrolled)}
    out = {}
    for layout, (cfg, params) in layouts.items():
        backbone_params = {k: v for k, v in params.items() if k not in IMAGE_MODULES}
        prefill, decode = _decode_programs(cfg, b)
        token, cache = prefill(params, ids)
        _, pre = _timed(lambda: prefill(params, ids), config["warmup"], config["repeats"])
        _, dec = _timed(lambda: decode(params, token, cache), config["warmup"], config["repeats"])
        out[layout] = {"prefill_median_ms": pre * 1e3, "decode_per_token_ms": dec / b["decode"] * 1e3}
    param_bytes = _bytes(backbone_params)
    streamed = param_bytes - _bytes(backbone_params["embed_tokens"])
    bandwidth = machine["mem_bandwidth_gbs"] * 1e9
    used = out[GENERATION_LAYOUT]
    return {"prefill_median_ms": used["prefill_median_ms"], "decode_per_token_ms": used["decode_per_token_ms"],
            "weight_stream_bound_ms": param_bytes / bandwidth * 1e3,
            "decode_vs_bound": used["decode_per_token_ms"] / (param_bytes / bandwidth * 1e3),
            "param_bytes": param_bytes,
            # Decode reads one embedding row, not the table: the tighter bound.
            "streamed_bytes": streamed, "streamed_bound_ms": streamed / bandwidth * 1e3,
            "decode_vs_streamed_bound": used["decode_per_token_ms"] / (streamed / bandwidth * 1e3),
            "layouts": out, "layout_used_by_generation": GENERATION_LAYOUT}


def _byte_tokenizer(folder: Path) -> Path:
    """A byte-level tokenizer.json with the NextStep special tokens (ids 256…)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tk = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(sorted(alphabet))}, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(["<|endoftext|>", "[PAD]", "<|image_area|>", "<|begin_of_image|>", "<|end_of_image|>",
                           "<|image_placeholder|>"])
    path = folder / "tokenizer.json"
    tk.save(str(path))
    return path


def generate(config: dict, machine: dict) -> dict:
    g, b, dtype = config["generate"], config["backbone"], config["dtype"]
    key = jax.random.key(config["seed"])
    with tempfile.TemporaryDirectory() as tmp:
        tok = PromptTokenizer(_byte_tokenizer(Path(tmp)))
    sp = tok.special
    model_cfg = _backbone_cfg(b, dtype, False, fm_head_dim=g["fm_dim"], fm_head_layers=g["fm_layers"], boi=sp.boi,
                              eoi=sp.eoi, image_placeholder_id=sp.placeholder, pad_token_id=sp.pad,
                              bos_token_id=sp.eos, eos_token_id=sp.eos)
    vcfg = vae_config(ch=g["vae_ch"], ch_mult=tuple(g["vae_ch_mult"]), num_res_blocks=g["vae_res_blocks"],
                      z_channels=model_cfg.latent_channels, dtype=dtype)
    vae_params = randomize(nn.unbox(AutoencoderKL(vcfg).init(key, jnp.zeros((1, 32, 32, 3))))["params"], key)
    gen = Generator(model_cfg, _model_params(model_cfg, key), vcfg, vae_params, tok, donate=True)
    params = gen.variables["params"]
    # As a user runs it: the caption padded to its own length only (no length bucket).
    settings = SamplingSettings.from_config(hw=tuple(g["hw"]), guidance_scale=g["cfg"], num_steps=g["steps"],
                                            timesteps_shift=g["timesteps_shift"], use_norm=g["use_norm"],
                                            length_bucket=1)
    seeds = itertools.count()

    def one_image():
        return gen.generate([g["caption"]], settings, seed=next(seeds)).images

    first, median = _timed(one_image, config["warmup"], config["repeats"])
    tokens = gen.prompts.num_image_tokens(settings)
    head_bytes = _bytes(params["image_head"])
    decode_bytes = _bytes({k: v for k, v in params.items() if k not in ("image_head", "embed_tokens", "lm_head")})
    roofline_ms = (decode_bytes + g["steps"] * head_bytes) / (machine["mem_bandwidth_gbs"] * 1e9) * 1e3
    per_token_ms = median / tokens * 1e3
    return {"median_s": median, "per_token_ms": per_token_ms, "roofline_ms_per_token": roofline_ms,
            "per_token_vs_roofline": per_token_ms / roofline_ms, "compile_s": first - median,
            "image_tokens": tokens, "head_bytes": head_bytes, "decode_bytes_per_token": decode_bytes,
            "head_ms_per_token": _head_ms(config, params["image_head"], model_cfg, precomputed=True),
            "head_ms_per_token_plain_sampler": _head_ms(config, params["image_head"], model_cfg, precomputed=False)}


def _head_ms(config, head, model_cfg, precomputed: bool) -> float:
    """One image token's flow-matching sampling at batch 1 with text CFG (2 rows), in ms, through
    ``fm_sampler.sample_head`` with or without the precomputed modulations."""
    g = config["generate"]
    c = jax.random.normal(jax.random.key(1), (2, model_cfg.hidden_size), jnp.float32).astype(model_cfg.dtype)
    kw = dict(cfg_mult=2, guidance_scale=g["cfg"], num_steps=g["steps"], timesteps_shift=g["timesteps_shift"],
              key=jax.random.key(2))
    module = head_module(head, model_cfg.dtype)
    fn = jax.jit(lambda p, c: sample_head(module, {"params": p}, c, precompute_modulations=precomputed, **kw))
    return _timed(lambda: fn(head, c), config["warmup"], config["repeats"])[1] * 1e3


def _train_batch(cfg, t: dict, key) -> dict:
    """``batch`` rows of ``seq`` tokens: text, then <boi>, ``image_tokens`` placeholders, <eoi>, then text."""
    rows, seq, n_img = t["batch"], t["seq"], t["image_tokens"]
    ids_key, tok_key = jax.random.split(key)
    ids = jax.random.randint(ids_key, (rows, seq), 0, cfg.boi)  # text: every id below the special tokens
    start = (seq - n_img - 2) // 2
    ids = ids.at[:, start].set(cfg.boi).at[:, start + 1:start + 1 + n_img].set(cfg.image_placeholder_id)
    ids = ids.at[:, start + 1 + n_img].set(cfg.eoi)
    is_image = ids == cfg.image_placeholder_id
    return {"input_ids": ids, "labels": jnp.where(is_image, -100, ids),
            "segment_ids": jnp.ones_like(ids), "positions": jnp.broadcast_to(jnp.arange(seq), ids.shape),
            "image_loss_mask": is_image.astype(jnp.int32),
            "image_tokens": jax.random.normal(tok_key, (rows, seq, token_dim(cfg)), jnp.float32)}


def train(config: dict, machine: dict) -> dict:
    """One step of the trainer's loss on the ``backbone`` sizes with an FM head of ``fm_dim`` x ``fm_layers``:
    forward+backward alone (``value_and_grad`` of ``NextStep.loss``, called as ``training/step.py`` calls
    it), the AdamW update alone, and the full jitted train step (``make_train_step``) with the official
    optimizer (``make_optimizer``). Every row holds ``image_tokens`` image targets, the bound the FM head's
    slots are sized to. FLOPs are the trainer's analytic count of the useful work (``training/flops.py``: the
    LM head on the text positions, the image path on the image targets, causal attention), as the official
    trainer does it; ``hardware_flops`` is what the step runs."""
    t, b, dtype = config["train"], config["backbone"], config["dtype"]
    key = jax.random.key(config["seed"])
    load_before = os.getloadavg()
    v = b["vocab"]  # the special tokens take the top ids of the vocabulary
    cfg = _backbone_cfg(b, dtype, True, fm_head_dim=t["fm_dim"], fm_head_layers=t["fm_layers"],
                        fm_head_batch_mul=t["fm_head_batch_mul"], boi=v - 4, eoi=v - 3, image_placeholder_id=v - 2,
                        pad_token_id=v - 1, bos_token_id=v - 1, eos_token_id=v - 1)
    model = NextStep(cfg)
    params = _model_params(cfg, key)
    batch = _train_batch(cfg, t, key)
    row_keys = jax.random.split(jax.random.key(1), t["batch"])
    totals = loss_counts(cfg, batch["input_ids"], batch["labels"], batch["image_loss_mask"],
                         segment_ids=batch["segment_ids"])
    text_slots = t["seq"] - t["image_tokens"]  # every row's text targets (the LM head's gathered slots)

    def loss(p):
        return model.apply({"params": p}, batch["input_ids"], batch["labels"], batch["image_tokens"],
                           batch["image_loss_mask"], segment_ids=batch["segment_ids"], positions=batch["positions"],
                           rng=row_keys, totals=totals, image_positions=t["image_tokens"],
                           text_positions=text_slots, method=NextStep.loss)

    fwd_bwd_fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
    fb_first, fwd_bwd, fwd_bwd_cpu = _timed_with_cpu(lambda: fwd_bwd_fn(params), config["warmup"], config["repeats"])
    grads = fwd_bwd_fn(params)[1]

    optim, schedule = optim_config(), schedule_config()
    schedule.warmup_steps = 0  # a non-zero learning rate from the first step
    optimizer, _ = make_optimizer(optim, schedule, params, total_steps=1,
                                  layer_norm_paths=nextstep_layer_norm_paths(cfg))
    mesh = make_mesh({"fsdp": 1}, devices=jax.devices()[:1])
    state = init_train_state(cfg, optimizer, mesh, params=params, seed=config["seed"])

    @jax.jit
    def update(grads, opt_state, params):
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    _, adamw = _timed(lambda: update(grads, state.opt_state, state.params), config["warmup"], config["repeats"])
    del grads
    step_config = ml_collections.ConfigDict({"model": cfg.to_dict(), "train_step": {"text_positions": text_slots}})
    step_fn = make_train_step(step_config, model, optimizer, mesh, image_positions=t["image_tokens"])
    carry = {"state": state}  # the step donates its state: each call continues from the previous one

    def one_step():
        carry["state"], carry["metrics"] = step_fn(carry["state"], batch)
        return carry["metrics"]

    step_first, step = _timed(one_step, config["warmup"], config["repeats"])

    rows, seq = t["batch"], t["seq"]
    # The backbone MLP's matmul on this batch, [B·T, hidden]·[hidden, intermediate]: the shape the step runs.
    a = jax.random.normal(key, (rows * seq, b["hidden"]), jnp.float32)
    w = jax.random.normal(key, (b["hidden"], b["intermediate"]), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    train_shape = 2 * a.size * w.shape[1] / _best(lambda: matmul(a, w), 5) / 1e9
    flops = train_step_flops(cfg, rows, seq, image_targets=t["image_tokens"], image_positions=t["image_tokens"],
                             text_positions=text_slots)
    peak = machine["matmul_f32_gflops"]
    fb_gflops, step_gflops = flops["model"] / fwd_bwd / 1e9, flops["model"] / step / 1e9
    return {"fwd_bwd_median_s": fwd_bwd, "step_median_s": step, "tokens_per_s": rows * seq / step,
            "mfu_vs_matmul_peak": step_gflops / peak, "fwd_bwd_fraction_of_matmul_peak": fb_gflops / peak,
            "fwd_bwd_gflops": fb_gflops, "step_gflops": step_gflops,
            "adamw_median_s": adamw, "adamw_fraction_of_step": adamw / step,
            "step_minus_fwd_bwd_fraction": (step - fwd_bwd) / step,
            "fwd_bwd_cpu_median_s": fwd_bwd_cpu, "fwd_bwd_cpu_utilisation": fwd_bwd_cpu / fwd_bwd,
            "fwd_bwd_compile_s": fb_first - fwd_bwd, "compile_s": step_first - step,
            "matmul_train_shape_gflops": train_shape,
            "fwd_bwd_fraction_of_train_shape_matmul": fb_gflops / train_shape,
            "flops": flops["model"], "hardware_flops": flops["hardware"],
            "flops_counted_as": "training/flops.py: 6N of the layers, causal attention, the LM head on the text "
                                "positions, the image path on the image targets (fm_head_batch_mul times)",
            "params": sum(x.size for x in jax.tree.leaves(params)), "layers": "scan",
            "last_step_loss": float(carry["metrics"]["loss"]),
            "load_average": {"before": load_before, "after": os.getloadavg()}}


WORKLOADS = {"fm_sample": fm_sample, "backbone": backbone, "train": train, "generate": generate}


def run(config: dict, only: list[str], threads: dict) -> dict:
    machine = measure_machine()
    results = {name: WORKLOADS[name](config, machine) for name in only}
    return json.loads(json.dumps({
        "impl": "nextstep_jax", "jax": jax.__version__, "backend": jax.default_backend(),
        "threads": config["threads"], "thread_limit": threads, "config": config, "machine": machine,
        "results": results}, default=float))
