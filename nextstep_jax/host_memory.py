"""Transparent huge pages for the host's heap: the long-running programs (train, demo, bench, encode_latents)
restart themselves once with glibc's ``glibc.malloc.hugetlb=1`` tunable.

The XLA CPU runtime allocates fresh buffers for every step's intermediates, and with 4 KiB pages touching them
costs a page fault each (~0.75 s of a 2.9 s benchmark training step on the project's 2-core host). Asking malloc
for huge pages (it ``madvise``s its memory; the kernel honours that in its ``madvise`` and ``always`` THP modes)
measured, side by side on that host: the demo's training step 0.134 -> 0.112 s, the ``bench`` training step's
forward+backward 9-14% shorter (README, "Benchmarks"). Numbers are unchanged: only where the memory comes from
differs. Short programs lose: zeroing 2 MiB pages costs more than the faults it saves (a 35 s test ran 10%
slower), so one-off commands such as ``sample`` do not restart. glibc reads its tunables at start-up, hence
the restart; it happens before any work, keeps the process id, and only when the variable lacks the tunable.
``NEXTSTEP_HUGE_PAGES=0`` turns it off; other C libraries and glibc before 2.35 (no such tunable) are left alone.
"""

from __future__ import annotations

import os
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "NEXTSTEP_HUGE_PAGES"


def tunables_with_huge_pages(environ: dict) -> str | None:
    """The ``GLIBC_TUNABLES`` value to restart with, or None when no restart is due."""
    if environ.get(OPT_OUT, "1") == "0" or not _glibc_has_the_tunable():
        return None
    current = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb=" in current:
        return None
    return f"{current}:{TUNABLE}" if current else TUNABLE


def restart_with_huge_pages() -> None:
    """Re-executes this program (same interpreter, same command line) with the tunable set; returns when no
    restart is due. Call it first thing when running as a program, never from library code."""
    tunables = tunables_with_huge_pages(os.environ)
    if tunables is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, {**os.environ, "GLIBC_TUNABLES": tunables})


def _glibc_has_the_tunable() -> bool:
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
    except (ValueError, OSError, AttributeError):  # not glibc, or no confstr
        return False
    major, minor = (int(v) for v in version.split(".")[:2])
    return name == "glibc" and (major, minor) >= (2, 35)
