"""Text decoding before the image (unified decoding, e.g. a thinking span), inside the generation program.

Rows ``[0, open_rows)`` continue their prompt with text sampled from the LM head (greedy, temperature,
top-p: the settings' ``text_tokens``, ``temperature``, ``top_p``). A row switches to image mode when it
samples ``<|image_area|>``, ``<|begin_of_image|>`` or EOS, or after ``max_tokens`` text tokens: the
generation prefix ``<|image_area|>h*w<|begin_of_image|>`` of the requested size is then forced token by
token (the sampled switch token is replaced by it, so the size is always the one asked for). The other
rows — the CFG rows, whose prompts already end with the prefix — wait. All rows step together through
``max_tokens + len(prefix)`` cache slots; a slot a row does not use is invalid for that row and its RoPE
position does not advance, so every row attends exactly to its own sequence, as if it had been decoded alone.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nextstep_jax.models.nextstep import NextStep

_TEXT, _FORCING, _DONE = 0, 1, 2


def next_token(logits: jax.Array, keys: jax.Array, temperature, top_p) -> jax.Array:
    """[rows, V] float32 logits -> [rows] int32: argmax if temperature == 0, else a draw from the smallest set
    of top tokens whose probability reaches ``top_p`` (the first token always stays)."""
    scaled = logits / jnp.maximum(temperature, 1e-6)
    ordered = -jnp.sort(-scaled, axis=-1)
    probs = jax.nn.softmax(ordered, axis=-1)
    keep = jnp.cumsum(probs, axis=-1) - probs < top_p
    threshold = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
    sampled = jax.vmap(jax.random.categorical)(keys, jnp.where(scaled >= threshold, scaled, -jnp.inf))
    return jnp.where(temperature > 0, sampled, jnp.argmax(logits, axis=-1)).astype(jnp.int32)


def decode_text(model: NextStep, variables, *, h, cache, kv_valid, pos, first_slot: int, open_rows: int,
                max_tokens: int, prefix: tuple[int, ...], keys, temperature, top_p):
    """Run the text phase from the prefill state; returns (hidden state at each row's
    ``<|begin_of_image|>`` [rows, E], cache, kv_valid, next positions [rows], text ids [rows, max_tokens]
    (pad-filled), text lengths [rows])."""
    cfg = model.cfg
    rows = h.shape[0]
    forced = jnp.asarray(prefix, jnp.int32)
    plen = len(prefix)
    stop = jnp.asarray([prefix[0], prefix[-1], cfg.eos_token_id], jnp.int32)
    # Tokens that have no meaning in free text (they would desynchronise image blocks).
    banned = jnp.asarray([cfg.pad_token_id, cfg.image_placeholder_id, cfg.eoi], jnp.int32)
    row_ids = jnp.arange(rows)

    def body(g, st):
        h, h_boi, cache, kv_valid, pos, phase, j, count, text = st
        # Only the conditional rows generate text (the CFG rows are done): no LM head on the others.
        logits = model.apply(variables, h[:open_rows], method=NextStep.logits).at[:, banned].set(-jnp.inf)
        sampled = next_token(logits, jax.vmap(jax.random.fold_in, (0, None))(keys[:open_rows], g), temperature,
                             top_p)
        sampled = jnp.concatenate([sampled, jnp.full((rows - open_rows,), cfg.pad_token_id, jnp.int32)])
        in_text = phase == _TEXT
        switch = in_text & (jnp.isin(sampled, stop) | (count >= max_tokens))
        emit = in_text & ~switch
        phase = jnp.where(switch, _FORCING, phase)
        tok = jnp.where(emit, sampled, jnp.where(phase == _FORCING, forced[jnp.minimum(j, plen - 1)],
                                                 cfg.pad_token_id))
        slot_text = jnp.minimum(count, max_tokens - 1)
        text = text.at[row_ids, slot_text].set(jnp.where(emit, sampled, text[row_ids, slot_text]))
        active = phase != _DONE
        slot = first_slot + g
        kv_valid = jax.lax.dynamic_update_slice(kv_valid, active[:, None], (0, slot))
        e = model.apply(variables, tok[:, None], method=NextStep.embed)
        hidden, cache = model.apply(variables, e, kv_valid, cache, slot, pos[:, None], method=NextStep.step)
        hidden = hidden[:, 0]
        fed_boi = (phase == _FORCING) & (j == plen - 1)
        h_boi = jnp.where(fed_boi[:, None], hidden, h_boi)
        j = jnp.where(phase == _FORCING, j + 1, j)
        phase = jnp.where(fed_boi, _DONE, phase)
        return (hidden, h_boi, cache, kv_valid, pos + active, phase, j, count + emit, text)

    zeros = jnp.zeros((rows,), jnp.int32)
    state = (h, h, cache, kv_valid, pos, jnp.where(row_ids < open_rows, _TEXT, _DONE).astype(jnp.int32), zeros,
             zeros, jnp.full((rows, max_tokens), cfg.pad_token_id, jnp.int32))
    _, h_boi, cache, kv_valid, pos, _, _, count, text = jax.lax.fori_loop(0, max_tokens + plen, body, state)
    return h_boi, cache, kv_valid, pos, text, count
