"""Shared fixtures: the golden directory (env NEXTSTEP_GOLDEN_DIR, default tests/golden)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest

TESTS_DIR = Path(__file__).resolve().parent
# The programs the tests start stay on 4 KiB pages (nextstep_jax/host_memory.py): they are short, and zeroing huge
# pages costs them more than the page faults it saves (one training test: 36.6 s with huge pages, 33.2 s without).
os.environ.setdefault("NEXTSTEP_HUGE_PAGES", "0")
# One persistent compilation cache for the whole test session: this process, its xdist workers and every program a
# test starts inherit it (set before jax is imported), so a program compiled once (the same train step in another
# test or the restarted run of a resume test) is loaded instead of compiled again; a cached executable is the same
# program, so every number stays bit for bit that of a fresh compile. Set before the workers start, the variable
# names the folder of the process that made it, which alone removes it. A size limit makes jax lock the folder, so
# no process reads an entry another is still writing.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="nextstep_test_jax_cache_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(16 << 30))
# The tests compile far more than they compute (tiny models, a few steps each), and LLVM's optimisation of XLA's CPU
# kernels is most of a compile: with -O0, tests/models + tests/sharding took 377 s instead of 617 s. Every program a
# test starts inherits the flag (train_runs.environment), so two runs a test compares were compiled alike. An
# optimisation level already in XLA_FLAGS is kept (XLA_FLAGS=--xla_backend_optimization_level=3: as users run), and
# where the TPU runtime is installed (make test-tpu) XLA keeps its defaults: the TPU programs' figures are checked.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", "") and find_spec("libtpu") is None:
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()


def golden_root() -> Path:
    return Path(os.environ.get("NEXTSTEP_GOLDEN_DIR", TESTS_DIR / "golden")).resolve()


def pytest_collection_modifyitems(items):
    """Mark every test that reads the golden folder: ``-m golden`` reruns exactly those on another set."""
    for item in items:
        if "golden_dir" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.golden)


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    root = golden_root()
    if not (root / "cases").is_dir():
        pytest.fail(f"golden directory {root} has no cases/ (set NEXTSTEP_GOLDEN_DIR)")
    return root


@pytest.fixture(scope="session")
def load_case(golden_dir):
    """load_case('b_backbone') -> dict of numpy arrays from cases/b_backbone.npz."""
    cache: dict[str, dict[str, np.ndarray]] = {}

    def load(name: str) -> dict[str, np.ndarray]:
        if name not in cache:
            with np.load(golden_dir / "cases" / f"{name}.npz") as z:
                cache[name] = {k: z[k] for k in z.files}
        return cache[name]

    return load


@pytest.fixture(scope="session")
def golden_model(golden_dir):
    """golden_model(scan_layers=True, dtype="float32", fused=False, **overrides) -> (cfg, variables) of
    golden/model; ``fused``: q/k/v and gate/up in the fused layout."""
    from nextstep_jax.checkpoint import load_model

    loaded: dict[tuple[bool, bool], tuple] = {}

    def get(scan_layers: bool = True, dtype: str = "float32", fused: bool = False, **overrides):
        if (scan_layers, fused) not in loaded:
            loaded[scan_layers, fused] = load_model(golden_dir / "model", layers="scanned" if scan_layers else "unrolled",
                                                    fused=fused)
        cfg, params = loaded[scan_layers, fused]
        cfg = cfg.copy_and_resolve_references()
        cfg.dtype = dtype
        cfg.update(overrides)
        return cfg, {"params": params}

    return get


def repo_config(name: str):
    """get_config() of configs/<name>.py, its model's special-token ids read from its data.tokenizer."""
    from nextstep_jax.configs import load_config_file, with_tokenizer_ids

    return with_tokenizer_ids(load_config_file(TESTS_DIR.parent / "configs" / f"{name}.py"))


@pytest.fixture
def tiny_config():
    return repo_config("tiny")
