"""host_memory: when the programs restart for huge pages, and that the restart is one exec of the same command."""

import os
import subprocess
import sys

import pytest

from nextstep_jax import host_memory

HAS_TUNABLE = host_memory._glibc_has_the_tunable()


@pytest.mark.skipif(not HAS_TUNABLE, reason="needs glibc >= 2.35")
def test_the_tunable_is_added_once_and_never_overrides_a_choice():
    assert host_memory.tunables_with_huge_pages({}) == "glibc.malloc.hugetlb=1"
    assert (host_memory.tunables_with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
            == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1")
    assert host_memory.tunables_with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}) is None
    assert host_memory.tunables_with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None
    assert host_memory.tunables_with_huge_pages({"NEXTSTEP_HUGE_PAGES": "0"}) is None


@pytest.mark.skipif(not HAS_TUNABLE, reason="needs glibc >= 2.35")
def test_restart_reexecutes_the_same_command_once_in_the_same_process():
    code = ("import os, sys; from nextstep_jax import host_memory; "
            "print(os.getpid(), os.environ.get('GLIBC_TUNABLES'), sys.argv[1:], flush=True); "
            "host_memory.restart_with_huge_pages()")
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", host_memory.OPT_OUT)}
    out = subprocess.run([sys.executable, "-c", code, "x", "--y"], env=env, capture_output=True, text=True,
                         check=True, timeout=60).stdout.splitlines()
    assert len(out) == 2, out
    first, second = (line.split(" ", 2) for line in out)
    assert first[0] == second[0]  # exec: the same process
    assert first[1:] == ["None", "['x', '--y']"]
    assert second[1:] == ["glibc.malloc.hugetlb=1", "['x', '--y']"]
    off = subprocess.run([sys.executable, "-c", code], env={**env, host_memory.OPT_OUT: "0"}, capture_output=True,
                         text=True, check=True, timeout=60).stdout.splitlines()
    assert len(off) == 1
