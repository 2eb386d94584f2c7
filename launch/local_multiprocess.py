"""Run N local processes of launch/train.py as N "hosts" joined by jax.distributed on 127.0.0.1.

    python launch/local_multiprocess.py --processes 2 --devices-per-process 4 -- \
        --config configs/tiny.py --config.mesh.data=-1

On CPU each process simulates `--devices-per-process` devices and collectives go over gloo, so the
multi-host code paths (per-host data, global arrays, checkpoint coordination) run on one machine.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from plamo_jax.parallel.mesh import free_local_port

TRAIN = Path(__file__).resolve().parent / "train.py"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--devices-per-process", type=int, default=4)
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="arguments for launch/train.py after --")
    args = parser.parse_args()
    train_args = [a for a in args.train_args if a != "--"]
    coordinator = f"127.0.0.1:{free_local_port()}"
    children = []
    for process_id in range(args.processes):
        env = dict(
            os.environ,
            PLAMO_COORDINATOR=coordinator,
            PLAMO_NUM_PROCESSES=str(args.processes),
            PLAMO_PROCESS_ID=str(process_id),
            JAX_PLATFORMS="cpu",
            XLA_FLAGS=f"--xla_force_host_platform_device_count={args.devices_per_process}",
        )
        children.append(subprocess.Popen([sys.executable, str(TRAIN), *train_args], env=env))
    codes = [child.wait() for child in children]
    failed = [(i, c) for i, c in enumerate(codes) if c != 0]
    for process_id, code in failed:
        print(f"process {process_id} exited with status {code}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
