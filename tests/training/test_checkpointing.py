"""Training checkpoints: exact round trip (params, optimizer state, step, typed RNG key), keep-N, the save
period, fallback from a corrupt or partial latest step, exact data-iterator resume, SIGTERM, and a restore on
8 fake devices into a different sharding (subprocess)."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nextstep_jax.data.pipeline import DataConfig, DatasetSpec, make_iterator
from nextstep_jax.training.checkpointing import (CheckpointRestoreError, StopSignal, TrainCheckpointer,
                                                 abstract_like)
from nextstep_jax.training.optimizer import make_optimizer, optim_config, schedule_config
from train_runs import environment

SCRIPT = Path(__file__).with_name("sharded_checkpoint.py")
SMALL_DATA = dict(seq_len=192, batch_size=2, image_size=32, max_images_per_row=4, shard_index=0, shard_count=1)


def _state(seed: int = 0):
    rng = np.random.default_rng(seed)
    params = {"dense": {"kernel": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
                        "bias": jnp.asarray(rng.normal(size=(4,)), jnp.float32)},
              "embed": {"embedding": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)}}
    optim = optim_config()
    optim.freeze = ("embed/.*",)  # the optimizer state then holds masked (empty) nodes too
    tx, _ = make_optimizer(optim, schedule_config(), params, total_steps=10)
    opt_state = tx.init(params)
    grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.5, params)
    _, opt_state = tx.update(grads, opt_state, params)  # non-trivial moments and count
    return {"params": params, "opt_state": opt_state, "step": jnp.int32(7),
            "rng": jax.random.fold_in(jax.random.key(seed), 3)}


def _assert_trees_equal(a, b):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_is_exact(tmp_path):
    state = _state()
    ckpt = TrainCheckpointer(tmp_path, every_steps=1, keep=3)
    assert ckpt.restore_latest(abstract_like(state)) is None
    assert ckpt.save(7, state)
    ckpt.close()
    step, restored = TrainCheckpointer(tmp_path, every_steps=1, keep=3).restore_latest(abstract_like(state))
    assert step == 7
    _assert_trees_equal(restored, state)
    np.testing.assert_array_equal(jax.random.normal(restored["rng"], (4,)), jax.random.normal(state["rng"], (4,)))


def test_save_period_and_keep_n(tmp_path):
    state = _state()
    ckpt = TrainCheckpointer(tmp_path, every_steps=3, keep=2)
    saved = [step for step in range(1, 11) if ckpt.save(step, state)]
    assert ckpt.save(10, state, force=True)  # final save of a run off the period
    assert not ckpt.save(10, state, force=True)  # never twice
    ckpt.close()
    assert saved == [3, 6, 9]
    assert TrainCheckpointer(tmp_path, every_steps=3, keep=2).all_steps() == [9, 10]


def _corrupt(step_dir: Path):
    for f in (step_dir / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"not a checkpoint")


def test_corrupt_and_partial_latest_fall_back_to_previous(tmp_path, capsys):
    ckpt = TrainCheckpointer(tmp_path, every_steps=2, keep=5)
    states = {step: _state(step) for step in (2, 4)}
    for step, state in states.items():
        ckpt.save(step, state)
    ckpt.close()
    _corrupt(tmp_path / "4")
    (tmp_path / "6.orbax-checkpoint-tmp-1234").mkdir()  # a run killed while writing step 6

    ckpt = TrainCheckpointer(tmp_path, every_steps=2, keep=5)
    step, restored = ckpt.restore_latest(abstract_like(states[2]))
    assert step == 2
    _assert_trees_equal(restored, states[2])
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2
    assert "6.orbax-checkpoint-tmp-1234" in lines[0] and "incomplete" in lines[0]
    assert f"{tmp_path / '4'}: unreadable (" in lines[1] and "using step 2 instead" in lines[1]
    assert [p.name.split("-")[0] for p in tmp_path.glob("4.corrupt-*")] == ["4.corrupt"]
    # The moved-aside step can be written again.
    assert ckpt.save(4, states[4])
    ckpt.close()
    step, restored = TrainCheckpointer(tmp_path, every_steps=2, keep=5).restore_latest(abstract_like(states[4]))
    assert step == 4
    _assert_trees_equal(restored, states[4])


def test_no_readable_checkpoint_is_an_error(tmp_path):
    ckpt = TrainCheckpointer(tmp_path, every_steps=1, keep=2)
    ckpt.save(1, _state())
    ckpt.close()
    _corrupt(tmp_path / "1")
    with pytest.raises(CheckpointRestoreError, match=r"/1: unreadable .*no older step"):
        TrainCheckpointer(tmp_path, every_steps=1, keep=2).restore_latest(abstract_like(_state()))
    assert (tmp_path / "1").is_dir()  # nothing moved when nothing could be restored


def test_data_iterator_resumes_exactly(tmp_path, golden_dir):
    from nextstep_jax.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(golden_dir / "tokenizer")
    config = DataConfig(**SMALL_DATA, caption_dropout=0.3)
    state = _state()
    it = make_iterator(config, [DatasetSpec("shapes")], tokenizer)
    for _ in range(2):
        next(it)
    ckpt = TrainCheckpointer(tmp_path, every_steps=2, keep=2)
    ckpt.save(2, state, it)  # async: the iterator moves on while the arrays are written
    expected = [next(it) for _ in range(3)]
    ckpt.close()

    fresh = make_iterator(config, [DatasetSpec("shapes")], tokenizer)
    step, _ = TrainCheckpointer(tmp_path, every_steps=2, keep=2).restore_latest(abstract_like(state), fresh)
    assert step == 2
    for want in expected:
        got = next(fresh)
        assert got.keys() == want.keys()
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert fresh.metrics() == it.metrics()


def test_sigterm_requests_a_stop(tmp_path):
    ckpt = TrainCheckpointer(tmp_path, every_steps=1, keep=1)
    previous = signal.getsignal(signal.SIGTERM)
    with StopSignal() as stop:
        assert not ckpt.should_stop(1, stop)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and ckpt.should_stop(1, stop)
    assert signal.getsignal(signal.SIGTERM) is previous
    ckpt.close()


def test_restore_on_8_devices_into_a_different_sharding(tmp_path):
    env = environment(8)
    out = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "ok"
