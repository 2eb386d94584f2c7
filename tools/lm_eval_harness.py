"""lm-evaluation-harness with the `plamo_jax` model registered: its own command line and every flag.

    python tools/lm_eval_harness.py --model plamo_jax --model_args checkpoint=runs/tiny/checkpoints,tensor=2 \
        --tasks jcommonsenseqa --batch_size 8 [--include_path my_tasks/] [--output_path results/]

model_args are those of plamo_jax/evaluate/lm_eval_adapter.py (checkpoint, step, max_length,
max_gen_toks, add_bos_token, kv_cache, mesh sizes by axis name). lm-eval 0.4 only knows the models
in its own registry, so `lm_eval --model plamo_jax` itself cannot find ours; this is that command with
the adapter imported first (named so as not to shadow the `lm_eval` package when run as a script).
Needs the optional extra: pip install 'plamo_jax[lm_eval]'.
"""

from __future__ import annotations

import sys

from lm_eval.__main__ import cli_evaluate

from plamo_jax import cli
from plamo_jax.evaluate import lm_eval_adapter


def main(argv: list[str]) -> int:
    if lm_eval_adapter.MODEL_NAME not in " ".join(argv) and not {"-h", "--help"} & set(argv):
        print(f"note: the model this tool adds is --model {lm_eval_adapter.MODEL_NAME}", file=sys.stderr)
    sys.argv = ["lm_eval", *argv]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    cli.run(main)
