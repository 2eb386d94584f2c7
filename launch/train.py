"""Train a model from a config file.

    python launch/train.py --config configs/tiny.py --config.train.steps=200

Running the same command again resumes from the newest complete checkpoint in train.output_dir.
Several processes (hosts): set PLAMO_COORDINATOR / PLAMO_NUM_PROCESSES / PLAMO_PROCESS_ID, or
PLAMO_DISTRIBUTED=auto on SLURM and TPU VMs (see launch/local_multiprocess.py).
"""

from __future__ import annotations

import logging
import sys

from absl import app
from ml_collections import config_flags

from plamo_jax.configuration import ConfigError
from plamo_jax.parallel.mesh import maybe_initialize_distributed

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Recipe file (get_config()).",
                                          lock_config=True)


def main(argv):
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    maybe_initialize_distributed()
    from plamo_jax.train.trainer import train  # after jax.distributed starts

    try:
        result = train(_CONFIG.value)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"finished at step {result.final_step}: " + ", ".join(
        f"{k}={result.last_metrics[k]:.4f}" for k in ("loss", "cross_entropy", "accuracy")
        if k in result.last_metrics))
    return 0


if __name__ == "__main__":
    app.run(main)
