"""TPU programs compiled ahead of time on this host: they need the TPU runtime of requirements-tpu.txt
(``make test-tpu`` builds .venv-tpu with it). Without it these tests skip, unless NEXTSTEP_REQUIRE_TPU=1
(set by ``make test-tpu``) makes the missing runtime an error."""

import importlib.util
import os

import pytest

HAS_TPU_RUNTIME = importlib.util.find_spec("libtpu") is not None


def pytest_collection_modifyitems(config, items):
    if HAS_TPU_RUNTIME:
        return
    if os.environ.get("NEXTSTEP_REQUIRE_TPU") == "1":
        raise pytest.UsageError("NEXTSTEP_REQUIRE_TPU=1 but the TPU runtime is not installed: "
                                "pip install -r requirements-tpu.txt (or run `make test-tpu`)")
    skip = pytest.mark.skip(reason="no TPU runtime (requirements-tpu.txt)")
    for item in items:
        if "tests/tpu" in str(item.fspath):
            item.add_marker(skip)
