"""The per-step throughput figures: the model FLOP rate counts the batch's own image targets (the useful work of
``training/flops.py``), and MFU divides it by the configured peak of all devices."""

from types import SimpleNamespace

import jax
import numpy as np
import pytest

from conftest import repo_config
from nextstep_jax.training.flops import train_step_flops
from nextstep_jax.training.step_meter import StepMeter


def test_flop_rate_counts_the_batch_image_targets():
    config = repo_config("tiny")
    config.peak_flops_per_device = 1e12
    rows, seq = config.data.batch_size, 64
    m = config.model
    ids = np.full((rows, seq), 7, np.int32)
    ids[0, 10] = m.boi
    ids[0, 11:27] = m.image_placeholder_id  # one 16-token image in row 0, none elsewhere
    meter = StepMeter(config, SimpleNamespace(seq_len=seq), m)
    data = {"data/documents": 5.0, "data/pad_fraction": 0.25, "data/skipped/too_long": 2.0}
    values = meter.measure({"input_ids": ids}, data, seconds=0.5)
    flops = train_step_flops(m, rows, seq, image_targets=16 / rows)["model"]
    assert values["model_tflops_per_s"] == pytest.approx(flops / 0.5 / 1e12, rel=1e-12)
    assert values["mfu"] == pytest.approx(flops / 0.5 / (1e12 * jax.device_count()), rel=1e-12)
    assert values["tokens_per_s"] == rows * seq / 0.5 and values["images_per_s"] == 1 / 0.5
    assert values["data/skipped"] == 2.0 and values["data/documents"] == 5.0 and values["step_time"] == 0.5


def test_peak_flops_come_from_the_chip_tables_by_device_kind():
    from nextstep_jax.training.chips import CHIPS, GPU_PEAK_FLOPS, peak_flops_of

    assert peak_flops_of("TPU v5 lite") == CHIPS["v5e"]["peak_flops"]  # the v5e, not the v5p
    assert peak_flops_of("TPU v5") == CHIPS["v5p"]["peak_flops"]
    assert peak_flops_of("NVIDIA H200") == GPU_PEAK_FLOPS["NVIDIA H200"]
    assert peak_flops_of("cpu") is None
