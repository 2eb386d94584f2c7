"""Train a model from a config file.

    python launch/train.py --config configs/tiny.py --config.train.steps=200

Running the same command again resumes from the newest complete checkpoint in train.output_dir.
Several processes (hosts): set PLAMO_COORDINATOR / PLAMO_NUM_PROCESSES / PLAMO_PROCESS_ID, or
PLAMO_DISTRIBUTED=auto on SLURM and TPU VMs (see launch/local_multiprocess.py).
A config, data, mesh or checkpoint problem is one line on stderr and exit status 2.
On a CPU machine the process first restarts itself with glibc's malloc on transparent huge pages and,
on one CPU device, keeping the memory it frees, so that the kernel does not map and zero XLA's step
temporaries afresh every step (plamo_jax/host_memory.py; PLAMO_HOST_MEMORY=off keeps it as started).
"""

from __future__ import annotations

import logging
import re
import sys

from plamo_jax import cli, host_memory
from plamo_jax.errors import PlamoError

if __name__ == "__main__":  # before the imports below (3 s), which only the restarted process then pays
    try:
        host_memory.reexec_for_cpu_training()  # on CPU machines; returns when there is nothing to do
    except PlamoError as error:
        cli.fail(error)

from absl import app, flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from plamo_jax.parallel.mesh import maybe_initialize_distributed  # noqa: E402
from plamo_jax.train.trainer import train  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/tiny.py", "Recipe file (get_config()).", lock_config=True
)


def main(argv):
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax and Grain log every save and read at INFO
    logging.getLogger("absl").setLevel(logging.WARNING)
    logging.getLogger("plamo_jax").setLevel(logging.INFO)  # absl lowered the root logger to WARNING
    try:
        maybe_initialize_distributed()
        result = train(_CONFIG.value)
    except PlamoError as error:
        cli.fail(error)
    print(
        f"finished at step {result.final_step}: "
        + ", ".join(
            f"{k}={result.last_metrics[k]:.4f}"
            for k in ("loss", "cross_entropy", "accuracy")
            if k in result.last_metrics
        )
    )
    return 0


def parse_flags(argv: list[str]) -> list[str]:
    """absl parsing, but a bad override (unknown key, wrong type) is one line naming it, not a traceback."""
    try:
        cli.check_recipe_flag(argv)
        return flags.FLAGS(argv)
    except PlamoError as error:
        cli.fail(error)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError) as error:
        cli.fail(config_override_error(error, argv))


def config_override_error(error: Exception, argv: list[str]) -> str:
    """'bad config override --config.x.y=v: <why>' naming the whole override that absl refused.

    absl names only one part of the key (a KeyError for `moe` in --config.model.moe.num_experts), so
    the override whose path holds the named part is the one reported.
    """
    message = str(error).strip("'\"").replace("\\'", "'")
    overrides = [arg for arg in argv[1:] if arg.startswith("--config.")]
    words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", message))
    named = [arg for arg in overrides if set(arg.split("=", 1)[0].split(".")[1:]) & words]
    shown = named[0] if named else " ".join(overrides)
    return f"bad config override {shown}: {message}; expected an existing key and a value of its type"


if __name__ == "__main__":
    sys.exit(app.run(main, flags_parser=parse_flags))
