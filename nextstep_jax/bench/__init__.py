"""Benchmarks: measurements, never tests. Nothing here imports JAX at import time (the CLIs limit threads
before JAX starts).

    __main__.py   ``python -m nextstep_jax.bench``: the model workloads, one JSON report
    workloads.py  those workloads (flow-matching sampler, backbone prefill/decode, train step, end-to-end
                  generation)
    convert.py    ``python -m nextstep_jax.bench.convert``: checkpoint conversion throughput and memory
    data.py       ``python -m nextstep_jax.bench.data``: data pipeline throughput
    gpu_check.py  ``python -m nextstep_jax.bench.gpu_check``: the one-shot GPU check (14B generation against the
                  weight-streaming roofline, train-step MFU; ``scripts/gpu_check.sh``)
"""
