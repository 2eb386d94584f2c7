"""CPU training under mimalloc: freed host memory is kept for the next step instead of returned.

XLA's CPU runtime allocates a step's temporaries afresh at every execution. glibc's malloc serves
blocks that large with mmap (or from per-thread heaps it unmaps once empty) and hands them back to
the kernel on free, so every step the kernel maps and zeroes the same memory again: for the 125.8M
model of benchmarks/bench_peers.py (4 x 512 tokens, fp32) about 970k page faults (3.8 GB) and 2 s of
system time per 9.5 s step (getrusage's minor faults). mimalloc with purging switched off keeps what
was freed (about 2k faults per step) and the step takes about a tenth less (README, "Speed against
the peers"). glibc's own knobs do not get there: without the mmap threshold and trimming, its
per-thread heaps are still unmapped when empty; with a single arena the faults go but some steps
take twice as long.

The allocator has to be in place before the process starts (LD_PRELOAD), so the training entry
point re-executes itself once under it (`reexec_under_mimalloc`). Only on machines whose JAX
platform is the CPU; PLAMO_HOST_ALLOCATOR=system keeps glibc's.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from plamo_jax import platforms
from plamo_jax.errors import ConfigError

DISTRIBUTION = "cmeel-mimalloc"  # mimalloc's shared library as a wheel (Linux x86-64 and aarch64)
LIBRARY = "cmeel.prefix/lib/libmimalloc.so"
CHOICE = "PLAMO_HOST_ALLOCATOR"  # "mimalloc" (the default on CPU machines) or "system" (glibc's)
CHOICES = ("mimalloc", "system")
# mimalloc returns freed memory to the OS after a delay (10 ms by default): -1 never does
SETTINGS = {"MIMALLOC_PURGE_DELAY": "-1"}


def mimalloc_library() -> Path | None:
    """The installed libmimalloc.so, or None when the wheel is absent (not Linux, or not installed)."""
    try:
        path = Path(importlib.metadata.distribution(DISTRIBUTION).locate_file(LIBRARY))
    except importlib.metadata.PackageNotFoundError:
        return None
    return path if path.is_file() else None


def cpu_machine(environ: Mapping[str, str]) -> bool:
    """True when JAX will run on the CPU: JAX_PLATFORMS says so, or there is no TPU chip or NVIDIA GPU."""
    chosen = environ.get("JAX_PLATFORMS", "")
    if chosen:
        return chosen.split(",")[0].strip() == "cpu"
    return not platforms.has_tpu_chips() and not platforms.has_nvidia_gpu()


def allocator_environment(environ: Mapping[str, str], library: Path | None) -> dict[str, str]:
    """The variables to add to `environ` so that a process starts under mimalloc; {} when it already
    does, when the user chose the system allocator, or when the library is not installed."""
    choice = environ.get(CHOICE, "mimalloc")
    if choice not in CHOICES:
        raise ConfigError(f"environment variable {CHOICE}={choice!r}: expected one of {CHOICES}")
    preloaded = environ.get("LD_PRELOAD", "")
    if choice == "system" or library is None or str(library) in preloaded.split(":"):
        return {}
    return {"LD_PRELOAD": ":".join(filter(None, (str(library), preloaded)))} | {
        name: value for name, value in SETTINGS.items() if name not in environ}


def reexec_under_mimalloc() -> None:
    """Replace this process with itself under mimalloc on a CPU machine; return when there is nothing
    to do. Call it first thing in an entry point: the process starts over with the same arguments."""
    if not cpu_machine(os.environ):
        return
    added = allocator_environment(os.environ, mimalloc_library())
    if added:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, sys.orig_argv, {**os.environ, **added})


def running_under_mimalloc() -> bool:
    """Whether libmimalloc is mapped into this process (what the re-execution achieved)."""
    with open("/proc/self/maps") as maps:
        return any("libmimalloc" in line for line in maps)
