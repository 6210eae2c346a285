"""Sampling of the next text token against a float64 numpy reference distribution."""

import jax
import numpy as np
import pytest

from nextstep_jax.generation.text_decoding import next_token

DRAWS = 40_000


def _reference(logits: np.ndarray, temperature: float, top_p: float) -> np.ndarray:
    """softmax(logits / T) restricted to the smallest set of most likely tokens whose probability reaches
    top_p, renormalised (float64)."""
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p)
    before = np.cumsum(p[order]) - p[order]  # probability of the tokens ranked above each one
    kept = np.zeros_like(p, bool)
    kept[order[before < top_p]] = True
    q = np.where(kept, p, 0.0)
    return q / q.sum()


def _frequencies(logits: np.ndarray, temperature: float, top_p: float) -> np.ndarray:
    keys = jax.random.split(jax.random.key(0), DRAWS)
    rows = np.broadcast_to(logits.astype(np.float32), (DRAWS, logits.size))
    tokens = np.asarray(jax.jit(next_token)(rows, keys, temperature, top_p))
    return np.bincount(tokens, minlength=logits.size) / DRAWS


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 1.0), (2.0, 1.0), (1.0, 0.8), (0.7, 0.5),
                                               (1.5, 0.9)])
def test_draws_follow_the_tempered_nucleus_distribution(temperature, top_p):
    logits = np.random.default_rng(1).normal(0, 1.5, 12)
    want = _reference(logits, temperature, top_p)
    got = _frequencies(logits, temperature, top_p)
    assert np.all(got[want == 0] == 0), "a token outside the nucleus was drawn"
    # Each frequency is a mean of DRAWS Bernoulli(q) draws: within 5 standard errors of q.
    np.testing.assert_array_less(np.abs(got - want), 5 * np.sqrt(want * (1 - want) / DRAWS) + 1e-12)


def test_the_nucleus_keeps_the_first_token_and_zero_temperature_is_argmax():
    logits = np.array([0.0, 3.0, 1.0, 2.5], np.float32)
    np.testing.assert_array_equal(_frequencies(logits, 1.0, 1e-6), [0, 1, 0, 0])
    keys = jax.random.split(jax.random.key(1), 3)
    rows = np.stack([logits, logits[::-1], np.roll(logits, 1)])
    np.testing.assert_array_equal(next_token(rows, keys, 0.0, 0.5), [1, 2, 2])
