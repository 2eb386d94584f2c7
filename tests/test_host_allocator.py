"""CPU training under mimalloc (plamo_jax/host_allocator.py): the environment it needs, the entry
point's re-execution, that freed host memory is kept (page faults), and that numerics do not change."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from plamo_jax import host_allocator
from plamo_jax.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
LIBRARY = host_allocator.mimalloc_library()
needs_mimalloc = pytest.mark.skipif(LIBRARY is None, reason="cmeel-mimalloc is not installed (not Linux)")

# Re-executes itself under mimalloc as launch/train.py does, then reports whether mimalloc is loaded, a
# result, and the page faults of allocating and freeing a 256 MiB output on each of 5 calls.
PROBE = """
import json, resource, sys
from plamo_jax import host_allocator
host_allocator.reexec_under_mimalloc()
import jax, jax.numpy as jnp
fresh = jax.jit(lambda x, k: x * k + 1.0)
x = jnp.arange(64 * 2**20, dtype=jnp.float32)
jax.block_until_ready(fresh(x, 2.0))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for k in range(5):
    out = fresh(x, float(k))
    total = float(jnp.sum(out[:: 2**16]))
    del out
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"mimalloc": host_allocator.running_under_mimalloc(), "faults": faults, "total": total}))
"""


def run_probe(**env) -> dict:
    environ = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", host_allocator.CHOICE)}
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=REPO,
                          env=environ | {"JAX_PLATFORMS": "cpu"} | env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_environment_preloads_mimalloc_ahead_of_other_preloads():
    library = Path("/opt/lib/libmimalloc.so")
    added = host_allocator.allocator_environment({"LD_PRELOAD": "/x/libother.so"}, library)
    assert added == {"LD_PRELOAD": "/opt/lib/libmimalloc.so:/x/libother.so", "MIMALLOC_PURGE_DELAY": "-1"}
    # the user's own mimalloc settings win; a process already under it needs nothing
    assert host_allocator.allocator_environment({"MIMALLOC_PURGE_DELAY": "5"}, library) == {
        "LD_PRELOAD": "/opt/lib/libmimalloc.so"}
    assert host_allocator.allocator_environment({"LD_PRELOAD": "/opt/lib/libmimalloc.so"}, library) == {}


def test_environment_is_empty_for_the_system_allocator_or_without_the_library():
    library = Path("/opt/lib/libmimalloc.so")
    assert host_allocator.allocator_environment({host_allocator.CHOICE: "system"}, library) == {}
    assert host_allocator.allocator_environment({}, None) == {}


def test_bad_choice_is_one_clear_error():
    with pytest.raises(ConfigError, match=r"PLAMO_HOST_ALLOCATOR='tcmalloc': expected one of"):
        host_allocator.allocator_environment({host_allocator.CHOICE: "tcmalloc"}, None)


def test_cpu_machine_follows_jax_platforms():
    assert host_allocator.cpu_machine({"JAX_PLATFORMS": "cpu"})
    assert not host_allocator.cpu_machine({"JAX_PLATFORMS": "cuda,cpu"})
    assert not host_allocator.cpu_machine({"JAX_PLATFORMS": "tpu"})


@needs_mimalloc
def test_reexecuted_process_keeps_freed_memory_and_computes_the_same():
    mimalloc = run_probe()
    system = run_probe(**{host_allocator.CHOICE: "system"})
    assert mimalloc["mimalloc"] and not system["mimalloc"]
    assert mimalloc["total"] == system["total"]
    # glibc maps and zeroes the 256 MiB output afresh on every call (~65k faults each); mimalloc reuses it
    assert system["faults"] > 5 * 32_000
    assert mimalloc["faults"] < system["faults"] / 10


def test_train_entry_point_checks_the_choice_first(tmp_path):
    environ = os.environ | {"JAX_PLATFORMS": "cpu", host_allocator.CHOICE: "tcmalloc"}
    done = subprocess.run([sys.executable, "launch/train.py", "--config", "configs/tiny.py",
                           f"--config.train.output_dir={tmp_path}"], capture_output=True, text=True, cwd=REPO,
                          env=environ, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: environment variable PLAMO_HOST_ALLOCATOR='tcmalloc': expected one of ('mimalloc', 'system')"]
