"""Peak host memory of writing one safetensors shard: our streaming writer vs `safetensors.numpy.save_file`.

Exports hold one stacked parameter at a time; the package's writer needs the whole shard in memory.
Each writer runs in a fresh process (peak RSS is per process) on the same tensors, and the file each
wrote is read back with `safetensors.safe_open` and compared.

    python benchmarks/bench_safetensors.py [--shard-mib 1024] [--tensor-mib 64]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors import safe_open

from plamo_jax.convert.hf import peak_rss_mib
from plamo_jax.convert.safetensors_io import SafetensorsWriter


def tensors(shard_mib: int, tensor_mib: int):
    for index in range(max(1, shard_mib // tensor_mib)):
        yield f"layer.{index}.weight", np.full(tensor_mib * 2**20 // 4, index, np.float32)


def write(writer: str, out: Path, shard_mib: int, tensor_mib: int) -> None:
    """Child process: write the shard, print seconds and peak RSS."""
    start = time.perf_counter()
    if writer == "package":
        from safetensors.numpy import save_file

        save_file(dict(tensors(shard_mib, tensor_mib)), str(out / "model.safetensors"))
    else:
        streaming = SafetensorsWriter(out, max_shard_bytes=2 * shard_mib * 2**20)
        for name, value in tensors(shard_mib, tensor_mib):
            streaming.add(name, value)
        streaming.close()
    print(f"{time.perf_counter() - start:.3f} {peak_rss_mib():.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shard-mib", type=int, default=1024)
    parser.add_argument("--tensor-mib", type=int, default=64)
    parser.add_argument("--child", nargs=2, metavar=("WRITER", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        write(args.child[0], Path(args.child[1]), args.shard_mib, args.tensor_mib)
        return
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for writer in ("package", "streaming"):
            out = Path(scratch) / writer
            out.mkdir()
            command = [sys.executable, __file__, "--shard-mib", str(args.shard_mib),
                       "--tensor-mib", str(args.tensor_mib), "--child", writer, str(out)]
            done = subprocess.run(command,
                                  capture_output=True, text=True, check=True)
            seconds, peak = (float(v) for v in done.stdout.split())
            with safe_open(str(out / "model.safetensors"), framework="numpy") as f:
                ok = all(np.array_equal(f.get_tensor(name), value)
                         for name, value in tensors(args.shard_mib, args.tensor_mib))
            results[writer] = (seconds, peak)
            print(f"{writer:>9}: {args.shard_mib} MiB shard in {seconds:.2f} s, peak RSS {peak:,.0f} MiB, "
                  f"read back {'equal' if ok else 'DIFFERENT'}")
    ratio = results["package"][1] / results["streaming"][1]
    print(f"peak RSS package / streaming: {ratio:.2f}x")


if __name__ == "__main__":
    main()
