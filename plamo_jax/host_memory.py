"""CPU training's host memory: malloc on transparent huge pages, and freed memory kept for the next step.

XLA's CPU runtime allocates a step's temporaries anew at every execution (one 3.4 GiB block for the
125.8M Llama shape of benchmarks/bench_peers.py, 4 x 512 tokens, fp32), and glibc's malloc serves blocks
that large with mmap and unmaps them on free, so every step the kernel maps and zeroes the same memory
again: 4 KiB at a time, about 900k page faults and 2.5 s of system time in a 9.4 s step on 2 cores.
Two remedies, both glibc tunables (read only when a process starts) and both measured on that step:

- huge pages, `glibc.malloc.hugetlb=1` (glibc 2.35 or newer, the kernel's THP mode `madvise`; under
  `always` malloc's memory is on huge pages already): malloc asks for 2 MiB transparent huge pages, about
  5-20k faults and 0.9-1.3 s of system time per step, the step about a tenth shorter (README, "Speed
  against the peers");
- keeping freed memory (`KEEP_TUNABLES`), where one process runs one CPU device: large blocks come from
  the heap instead of mappings of their own (`mmap_max=0`) and the heap's free top is never handed back
  (`trim_threshold`), with JAX's dispatch synchronous (`jax_cpu_enable_async_dispatch`). Each step then
  runs, and allocates its temporaries, on the calling thread, whose arena is the main heap, just after
  the last step freed its own there: the same memory, no faults, ~0.03 s of system time, and the step
  another tenth shorter (about 8.6 -> 7.8 s). Dispatched asynchronously, a step runs on one of JAX's
  threads, whose own arena cannot hold a block over 64 MiB and maps it after all; with every thread on
  the main heap (`arena_max=1`) the next step's temporaries were allocated before the last step's were
  freed, the heap grew by whole blocks of them (peak 12.6 GiB against 5.7 GiB) and that fresh memory
  faulted slowly (steps of 12 s), and the small model of `make train` lost a tenth to malloc's lock.
  The data pipeline prefetches on threads of its own either way. The process keeps its peak memory,
  which training reaches every step anyway. With several CPU devices (simulated meshes) or several
  processes, computations run asynchronously whatever the setting, so only huge pages apply there.

The training entry point re-executes itself once with the tunables added (`reexec_for_cpu_training`),
and only where that changes something: JAX runs on the CPU and the tunables are not set already (by the
user, whose values win, or by the re-execution). PLAMO_HOST_MEMORY chooses: `keep` (the default: both
remedies where they apply), `huge_pages` (huge pages only), `off` (the process as started).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path

import jax

from plamo_jax import platforms
from plamo_jax.errors import ConfigError
from plamo_jax.parallel.mesh import launched_distributed

HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb"
FIRST_HUGE_PAGES_GLIBC = (2, 35)  # the first glibc with the hugetlb tunable
KEEP_TUNABLES = {
    "glibc.malloc.mmap_max": "0",
    "glibc.malloc.trim_threshold": str(1 << 40),  # 1 TiB: never
}
CHOICE = "PLAMO_HOST_MEMORY"
CHOICES = ("keep", "huge_pages", "off")
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


def one_device_one_process(environ: Mapping[str, str]) -> bool:
    """Whether the process will run one CPU device and no other process (XLA_FLAGS or JAX_NUM_CPU_DEVICES
    simulate several devices; PLAMO_NUM_PROCESSES, or the variables of a distributed launch, several
    processes)."""
    simulated = re.findall(r"--xla_force_host_platform_device_count=(\d+)", environ.get("XLA_FLAGS", ""))
    devices = _count(environ, "JAX_NUM_CPU_DEVICES", int(simulated[-1]) if simulated else 1)
    processes = _count(environ, "PLAMO_NUM_PROCESSES", 1)
    return devices <= 1 and processes <= 1 and not launched_distributed(environ)


def _count(environ: Mapping[str, str], name: str, default: int) -> int:
    value = environ.get(name) or str(default)
    if not value.isdigit():
        raise ConfigError(f"environment variable {name}={value!r}: expected a whole number")
    return int(value)


def tunables(environ: Mapping[str, str]) -> dict[str, str]:
    """GLIBC_TUNABLES as name -> value."""
    return dict(item.split("=", 1) for item in environ.get("GLIBC_TUNABLES", "").split(":") if "=" in item)


def keeps_freed_memory(environ: Mapping[str, str]) -> bool:
    """Whether a process with this environment starts with malloc keeping freed memory (KEEP_TUNABLES)."""
    return all(tunables(environ).get(name) == value for name, value in KEEP_TUNABLES.items())


def host_memory_environment(environ: Mapping[str, str], mode: str | None,
                            glibc: tuple[int, int] | None) -> dict[str, str]:
    """GLIBC_TUNABLES to set in `environ` for CPU training's host memory (the module's docstring); {}
    when the user chose off or nothing would change: not glibc, no tunable that applies, or every one set
    already (by the user, or by the re-execution that started this process)."""
    choice = environ.get(CHOICE, "keep")
    if choice not in CHOICES:
        raise ConfigError(f"environment variable {CHOICE}={choice!r}: expected one of {CHOICES}")
    if choice == "off" or glibc is None:
        return {}
    wanted = {}
    if mode == "madvise" and glibc >= FIRST_HUGE_PAGES_GLIBC:
        wanted[HUGE_PAGES_TUNABLE] = "1"
    if choice == "keep" and one_device_one_process(environ):
        wanted |= KEEP_TUNABLES
    already = tunables(environ)
    added = [f"{name}={value}" for name, value in wanted.items() if name not in already]
    if not added:
        return {}
    return {"GLIBC_TUNABLES": ":".join(filter(None, (environ.get("GLIBC_TUNABLES", ""), *added)))}


def reexec_for_cpu_training() -> None:
    """Replace this process with itself, its host memory set up for training (module docstring), on a CPU
    machine where that changes something; return otherwise, with JAX's dispatch synchronous where malloc
    keeps freed memory. Call it first thing in an entry point, before JAX starts its CPU backend: the
    process starts over with the same arguments."""
    if not platforms.runs_on_cpu(os.environ):
        return
    added = host_memory_environment(os.environ, thp_mode(), glibc_version())
    if added:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, sys.orig_argv, {**os.environ, **added})
    if keeps_freed_memory(os.environ):
        jax.config.update("jax_cpu_enable_async_dispatch", False)
