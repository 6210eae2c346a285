"""Fixtures for the launcher tests: running a launcher as a user does, and fake ``gcloud``, ``git``, ``sbatch``
and ``srun`` executables that record their arguments (one JSON list per line) instead of reaching a cloud or a
cluster."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

FAKE = """#!{python}
import json, os, sys
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps([os.path.basename(sys.argv[0])] + sys.argv[1:]) + "\\n")
if "describe" in sys.argv:
    print(os.environ.get("FAKE_DESCRIBE", ""))
if os.environ.get("FAKE_FAIL") in sys.argv:
    sys.exit(3)
"""


@pytest.fixture
def fakes(tmp_path):
    """(environment with the fakes first on PATH, function returning the recorded calls)."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    for name in ("gcloud", "git", "sbatch", "srun"):
        path = bin_dir / name
        path.write_text(FAKE.format(python=sys.executable))
        path.chmod(0o755)
    log = tmp_path / "calls.jsonl"
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_LOG=str(log))

    def calls():
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    return env, calls


@pytest.fixture
def run_launcher():
    """Run ``launch/SCRIPT`` with arguments as a user does; returns the CompletedProcess."""

    def run(script: str, args, env=None):
        return subprocess.run([sys.executable, str(REPO / "launch" / script), *args], capture_output=True,
                              text=True, env=env, cwd=REPO, timeout=60)

    return run
