"""CPU training's host memory (plamo_jax/host_memory.py): the environment it needs, the entry point's
re-execution, XLA's fresh buffers faulted in 2 MiB pages or not at all, the same numerics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from plamo_jax import host_memory
from plamo_jax.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
GLIBC = (2, 36)
applies = pytest.mark.skipif(
    not host_memory.host_memory_environment({}, host_memory.thp_mode(), host_memory.glibc_version())
    .get("GLIBC_TUNABLES", "").startswith(host_memory.HUGE_PAGES_TUNABLE),
    reason=f"needs THP mode madvise (here {host_memory.thp_mode()}) and glibc >= 2.35 "
           f"(here {host_memory.glibc_version()})")

# Re-executes itself as launch/train.py does, then reports the tunables it started with, whether JAX
# dispatches asynchronously, a result, the page faults of each of 5 calls that allocate a 256 MiB output
# (freed before the next), and its huge-page memory while the last output is alive.
PROBE = """
import json, os, re, resource
from plamo_jax import host_memory
host_memory.reexec_for_cpu_training()
import jax, jax.numpy as jnp
fresh = jax.jit(lambda x, k: x * k + 1.0)
x = jnp.arange(64 * 2**20, dtype=jnp.float32)
jax.block_until_ready(fresh(x, 2.0))
faults = []
for k in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    out = fresh(x, float(k))
    jax.block_until_ready(out)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    total = float(jnp.sum(out[:: 2**16]))
    rollup = open("/proc/self/smaps_rollup").read()  # anonymous memory on huge pages while `out` lives
    huge = int(re.search(r"AnonHugePages:\\s+(\\d+) kB", rollup).group(1)) * 1024
    del out
print(json.dumps({"tunables": os.environ.get("GLIBC_TUNABLES", ""), "faults": faults, "total": total,
                  "huge": huge, "async": jax.config.read("jax_cpu_enable_async_dispatch")}))
"""


def run_probe(**env) -> dict:
    # one device in one process: the tests' simulated devices (XLA_FLAGS) would leave out kept memory
    skipped = ("GLIBC_TUNABLES", host_memory.CHOICE, "XLA_FLAGS")
    environ = {k: v for k, v in os.environ.items() if k not in skipped}
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=REPO,
                          env=environ | {"JAX_PLATFORMS": "cpu"} | env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


HUGE = "glibc.malloc.hugetlb=1"
KEEP = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1099511627776"


def added(mode="madvise", glibc=GLIBC, **environ):
    return host_memory.host_memory_environment(environ, mode, glibc)


def test_environment_adds_the_tunables_after_the_users_own():
    assert added() == {"GLIBC_TUNABLES": f"{HUGE}:{KEEP}"}
    assert host_memory.keeps_freed_memory(added())
    # the user's own values win: mmap_max=4 stays, the others are added after the user's own tunables
    assert added(GLIBC_TUNABLES="glibc.malloc.arena_max=2:glibc.malloc.mmap_max=4") == {
        "GLIBC_TUNABLES": f"glibc.malloc.arena_max=2:glibc.malloc.mmap_max=4:{HUGE}:"
                          "glibc.malloc.trim_threshold=1099511627776"}
    assert not host_memory.keeps_freed_memory(added(GLIBC_TUNABLES="glibc.malloc.mmap_max=4"))
    # a process started by the re-execution needs nothing more
    assert added(GLIBC_TUNABLES=f"{HUGE}:{KEEP}") == {}


def test_freed_memory_is_kept_only_for_one_device_in_one_process():
    huge_pages_only = {"GLIBC_TUNABLES": HUGE}
    assert added(XLA_FLAGS="--xla_force_host_platform_device_count=8") == huge_pages_only
    assert added(XLA_FLAGS="--xla_force_host_platform_device_count=1") == {"GLIBC_TUNABLES": f"{HUGE}:{KEEP}"}
    assert added(JAX_NUM_CPU_DEVICES="4") == huge_pages_only
    assert added(PLAMO_NUM_PROCESSES="2") == huge_pages_only
    assert added(PLAMO_COORDINATOR="127.0.0.1:1234") == huge_pages_only
    assert added(PLAMO_DISTRIBUTED="auto") == huge_pages_only


def test_each_part_applies_only_where_it_changes_something_or_is_chosen():
    keep_only = {"GLIBC_TUNABLES": KEEP}
    assert added(**{host_memory.CHOICE: "off"}) == {}
    assert added(**{host_memory.CHOICE: "huge_pages"}) == {"GLIBC_TUNABLES": HUGE}
    assert added(mode="always") == keep_only  # on huge pages already
    assert added(mode="never") == keep_only
    assert added(mode=None) == keep_only  # no THP
    assert added(glibc=(2, 34)) == keep_only  # glibc without the hugetlb tunable
    assert added(glibc=None) == {}  # not glibc (musl, macOS): none of the tunables exists
    assert added(mode="never", **{host_memory.CHOICE: "huge_pages"}) == {}


def test_bad_choice_is_one_clear_error():
    with pytest.raises(ConfigError, match=r"PLAMO_HOST_MEMORY='yes': expected one of "
                                          r"\('keep', 'huge_pages', 'off'\)"):
        added(**{host_memory.CHOICE: "yes"})


def test_bad_count_is_one_clear_error():
    with pytest.raises(ConfigError, match=r"PLAMO_NUM_PROCESSES='two': expected a whole number"):
        added(PLAMO_NUM_PROCESSES="two")


def test_entry_point_names_a_bad_choice_in_one_line():
    environ = os.environ | {host_memory.CHOICE: "yes", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "launch/train.py", "--config", "configs/tiny.py"], env=environ,
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == ("error: environment variable PLAMO_HOST_MEMORY='yes': "
                                   "expected one of ('keep', 'huge_pages', 'off')")


def test_thp_mode_reads_the_bracketed_choice(tmp_path):
    enabled = tmp_path / "enabled"
    enabled.write_text("always [madvise] never\n")
    assert host_memory.thp_mode(enabled) == "madvise"
    assert host_memory.thp_mode(tmp_path / "absent") is None


@applies
def test_reexecuted_process_reuses_or_maps_huge_pages_and_computes_the_same():
    kept = run_probe()
    huge = run_probe(**{host_memory.CHOICE: "huge_pages"})
    small = run_probe(**{host_memory.CHOICE: "off"})
    assert (kept["tunables"], kept["async"]) == (f"{HUGE}:{KEEP}", False)
    assert (huge["tunables"], huge["async"]) == (HUGE, True)
    assert (small["tunables"], small["async"]) == ("", True)
    assert kept["total"] == huge["total"] == small["total"]
    # the fewest faults of a call, since JAX's other threads fault now and then too:
    # 4 KiB pages: the 256 MiB output is mapped and zeroed afresh on every call (65,536 faults)
    assert min(small["faults"]) > 32_000
    # 2 MiB pages: 128 faults a call
    assert 128 <= min(huge["faults"]) < 2_000
    # kept: each call's output reuses the memory the last one freed
    assert min(kept["faults"]) < 64
    for probe in (kept, huge):
        assert probe["huge"] >= 128 * 2**20 and small["huge"] < probe["huge"] / 4
