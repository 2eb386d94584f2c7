"""CPU training with glibc's malloc on transparent huge pages.

XLA's CPU runtime allocates a step's temporaries afresh at every execution, and glibc's malloc serves
blocks that large with mmap and unmaps them on free, so every step the kernel maps and zeroes the same
memory again, 4 KiB at a time: for the 125.8M model of benchmarks/bench_peers.py (4 x 512 tokens, fp32,
2 cores) about 900k page faults and 2.5 s of system time in a 9.4 s step. glibc's tunable
`glibc.malloc.hugetlb=1` makes malloc ask the kernel for 2 MiB transparent huge pages
(madvise(MADV_HUGEPAGE)) for the memory it maps: about 10k faults, 0.9 s of system time, and the step
takes about a tenth less (README, "Speed against the peers"). Keeping freed memory instead (mimalloc)
removed the faults but not the time.

glibc reads its tunables when a process starts, so the training entry point re-executes itself once
with GLIBC_TUNABLES extended (`reexec_with_huge_pages`), and only where that changes something: JAX runs
on the CPU, the kernel's THP mode is `madvise` (under `always` malloc's memory is on huge pages already,
under `never` it cannot be), and glibc is 2.35 or newer (the tunable's first release).
PLAMO_HUGE_PAGES=off keeps the process as it was started.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path

from plamo_jax import platforms
from plamo_jax.errors import ConfigError

TUNABLE = "glibc.malloc.hugetlb"
SETTING = f"{TUNABLE}=1"
FIRST_GLIBC = (2, 35)  # the first glibc with the hugetlb tunable
CHOICE = "PLAMO_HUGE_PAGES"
CHOICES = ("on", "off")
THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_mode(path: Path = THP_ENABLED) -> str | None:
    """The kernel's transparent huge page mode (`always`, `madvise`, `never`), None where there is none."""
    try:
        chosen = re.search(r"\[(\w+)\]", path.read_text())
    except OSError:
        return None
    return chosen.group(1) if chosen else None


def glibc_version() -> tuple[int, int] | None:
    """(major, minor) of the C library this process runs on, None when it is not glibc."""
    try:
        found = re.fullmatch(r"glibc (\d+)\.(\d+).*", os.confstr("CS_GNU_LIBC_VERSION") or "")
    except (ValueError, OSError):  # not a GNU system: the name is unknown
        return None
    return (int(found.group(1)), int(found.group(2))) if found else None


def huge_page_environment(environ: Mapping[str, str], mode: str | None,
                          glibc: tuple[int, int] | None) -> dict[str, str]:
    """The variables to set in `environ` so that a process starts with malloc on huge pages; {} when the
    user chose off, when it would change nothing (THP mode, glibc), or when the tunable is set already
    (by the user, or by the re-execution that started this process)."""
    choice = environ.get(CHOICE, "on")
    if choice not in CHOICES:
        raise ConfigError(f"environment variable {CHOICE}={choice!r}: expected one of {CHOICES}")
    tunables = environ.get("GLIBC_TUNABLES", "")
    already = any(item.split("=", 1)[0] == TUNABLE for item in tunables.split(":"))
    if choice == "off" or mode != "madvise" or glibc is None or glibc < FIRST_GLIBC or already:
        return {}
    return {"GLIBC_TUNABLES": ":".join(filter(None, (tunables, SETTING)))}


def reexec_with_huge_pages() -> None:
    """Replace this process with itself, malloc on huge pages, on a CPU machine where that changes
    something; return otherwise. Call it first thing in an entry point: the process starts over with
    the same arguments."""
    if not platforms.runs_on_cpu(os.environ):
        return
    added = huge_page_environment(os.environ, thp_mode(), glibc_version())
    if added:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, sys.orig_argv, {**os.environ, **added})
