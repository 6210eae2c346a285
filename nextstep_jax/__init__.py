"""nextstep_jax: NextStep-1 (autoregressive text-to-image with continuous tokens) in JAX/Flax."""

__version__ = "0.1.0"
