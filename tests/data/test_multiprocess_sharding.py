"""Two real JAX processes with the default per-process sharding see disjoint documents whose union is the
dataset, and each packs its share of the global batch."""

import json
import socket
import subprocess
import sys
from pathlib import Path

from nextstep_jax.data.records import RecordWriter
from nextstep_jax.data.samples import Sample
from train_runs import environment

SCRIPT = Path(__file__).with_name("process_shard_keys.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_get_disjoint_shards_covering_the_dataset(golden_dir, tmp_path):
    records = tmp_path / "records"
    with RecordWriter(records) as writer:
        for i in range(13):
            writer.write(Sample(f"doc{i}", "text", (f"document number {i}",)))
    port = _free_port()
    env = environment()
    procs = [subprocess.Popen([sys.executable, str(SCRIPT), str(i), str(port), str(records),
                               str(golden_dir / "tokenizer")], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = []
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-3000:]
        outputs.append(json.loads(out.strip().splitlines()[-1]))
    keys = {o["process"]: o["keys"] for o in outputs}
    assert set(keys) == {0, 1}
    assert keys[0] and keys[1]
    assert not set(keys[0]) & set(keys[1])
    assert set(keys[0]) | set(keys[1]) == {f"doc{i}" for i in range(13)}
    assert len(keys[0]) + len(keys[1]) == 13
    # data.batch_size=4 counts rows over both processes: 2 each, sharded by process index.
    assert {o["process"]: o["from_config"] for o in outputs} == {0: [2, 0, 2], 1: [2, 1, 2]}
