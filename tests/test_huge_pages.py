"""CPU training with malloc on transparent huge pages (plamo_jax/huge_pages.py): the environment it
needs, the entry point's re-execution, fewer page faults for XLA's fresh outputs, the same numerics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from plamo_jax import huge_pages
from plamo_jax.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
GLIBC = (2, 36)
applies = pytest.mark.skipif(
    not huge_pages.huge_page_environment({}, huge_pages.thp_mode(), huge_pages.glibc_version()),
    reason=f"needs THP mode madvise (here {huge_pages.thp_mode()}) and glibc >= 2.35 "
           f"(here {huge_pages.glibc_version()})")

# Re-executes itself as launch/train.py does, then reports the tunables it started with, a result, the
# page faults of allocating and freeing a 256 MiB output on each of 5 calls, and its huge-page memory
# while the last output is alive.
PROBE = """
import json, os, re, resource
from plamo_jax import huge_pages
huge_pages.reexec_with_huge_pages()
import jax, jax.numpy as jnp
fresh = jax.jit(lambda x, k: x * k + 1.0)
x = jnp.arange(64 * 2**20, dtype=jnp.float32)
jax.block_until_ready(fresh(x, 2.0))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for k in range(5):
    out = fresh(x, float(k))
    total = float(jnp.sum(out[:: 2**16]))
    rollup = open("/proc/self/smaps_rollup").read()  # anonymous memory on huge pages while `out` lives
    huge = int(re.search(r"AnonHugePages:\\s+(\\d+) kB", rollup).group(1)) * 1024
    del out
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"tunables": os.environ.get("GLIBC_TUNABLES", ""), "faults": faults, "total": total,
                  "huge": huge}))
"""


def run_probe(**env) -> dict:
    environ = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", huge_pages.CHOICE)}
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=REPO,
                          env=environ | {"JAX_PLATFORMS": "cpu"} | env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_environment_adds_the_tunable_after_the_users_own():
    def added(**environ):
        return huge_pages.huge_page_environment(environ, "madvise", GLIBC)

    assert added() == {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    assert added(GLIBC_TUNABLES="glibc.malloc.arena_max=2") == {
        "GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"}
    # the user's own hugetlb setting wins; a process started by the re-execution needs nothing more
    assert added(GLIBC_TUNABLES="glibc.malloc.hugetlb=0") == {}


def test_environment_is_empty_where_it_would_change_nothing_or_is_switched_off():
    assert huge_pages.huge_page_environment({huge_pages.CHOICE: "off"}, "madvise", GLIBC) == {}
    assert huge_pages.huge_page_environment({}, "always", GLIBC) == {}  # on huge pages already
    assert huge_pages.huge_page_environment({}, "never", GLIBC) == {}
    assert huge_pages.huge_page_environment({}, None, GLIBC) == {}  # no THP (not Linux)
    assert huge_pages.huge_page_environment({}, "madvise", (2, 34)) == {}  # glibc without the tunable
    assert huge_pages.huge_page_environment({}, "madvise", None) == {}  # not glibc (musl, macOS)


def test_bad_choice_is_one_clear_error():
    with pytest.raises(ConfigError, match=r"PLAMO_HUGE_PAGES='yes': expected one of \('on', 'off'\)"):
        huge_pages.huge_page_environment({huge_pages.CHOICE: "yes"}, "madvise", GLIBC)


def test_entry_point_names_a_bad_choice_in_one_line():
    environ = os.environ | {huge_pages.CHOICE: "yes", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "launch/train.py", "--config", "configs/tiny.py"], env=environ,
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == ("error: environment variable PLAMO_HUGE_PAGES='yes': "
                                   "expected one of ('on', 'off')")


def test_thp_mode_reads_the_bracketed_choice(tmp_path):
    enabled = tmp_path / "enabled"
    enabled.write_text("always [madvise] never\n")
    assert huge_pages.thp_mode(enabled) == "madvise"
    assert huge_pages.thp_mode(tmp_path / "absent") is None


@applies
def test_reexecuted_process_maps_huge_pages_and_computes_the_same():
    huge = run_probe()
    small = run_probe(**{huge_pages.CHOICE: "off"})
    assert huge["tunables"] == huge_pages.SETTING and small["tunables"] == ""
    assert huge["total"] == small["total"]
    # 4 KiB pages: the 256 MiB output is mapped and zeroed afresh on every call (~65k faults each)
    assert small["faults"] > 5 * 32_000
    assert huge["faults"] < small["faults"] / 10
    assert huge["huge"] >= 128 * 2**20 and small["huge"] < huge["huge"] / 4
