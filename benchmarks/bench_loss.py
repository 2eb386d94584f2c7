"""The language-modelling loss on one batch's logits, forward + backward, and what its accuracy costs.

The loss of every training step: fp32 cross entropy, PaLM z-loss and the accuracy count over [B, L, V]
logits (`train/losses.py` `cross_entropy_sums`), differentiated with respect to the logits. Three
versions run interleaved: as shipped (accuracy as `first_best_index`), with accuracy as `jnp.argmax`
(what the loss did before), and without accuracy (its cost is the difference). Each figure is the
median over --rounds rounds of a round's mean over --repeats calls. The first two are checked to give
the same sums and gradient. Asserts nothing.

    python benchmarks/bench_loss.py [--batch 4] [--seq-len 512] [--vocab 32768] [--rounds 5] [--repeats 5]

The defaults are the logits of benchmarks/bench_peers.py's step.
"""

from __future__ import annotations

import argparse
import statistics

import jax
import jax.numpy as jnp
import numpy as np
from bench_moe import seconds_per_call  # the sibling script (benchmarks/ is on sys.path)

from plamo_jax.train.losses import cross_entropy_sums

Z_LOSS = 1e-4


def with_argmax_accuracy(logits, targets, mask, z_loss):
    sums = cross_entropy_sums(logits, targets, mask, z_loss)
    return sums | {"correct": jnp.sum((jnp.argmax(logits, axis=-1) == targets) * mask)}


def without_accuracy(logits, targets, mask, z_loss):
    # the count is not returned, so XLA drops its computation from the compiled program
    return {name: value for name, value in cross_entropy_sums(logits, targets, mask, z_loss).items()
            if name != "correct"}


def loss_and_gradient(sums_fn):
    def objective(logits, targets, mask):
        sums = sums_fn(logits, targets, mask, Z_LOSS)
        return sums["cross_entropy"] + sums["z_loss"], sums

    return jax.jit(jax.value_and_grad(objective, has_aux=True))


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(args.batch, args.seq_len, args.vocab)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, args.vocab, (args.batch, args.seq_len)), jnp.int32)
    mask = jnp.ones((args.batch, args.seq_len), jnp.float32)
    versions = {"as shipped": cross_entropy_sums, "argmax accuracy": with_argmax_accuracy,
                "no accuracy": without_accuracy}
    compiled = {name: loss_and_gradient(fn) for name, fn in versions.items()}
    (shipped, shipped_grad), (before, before_grad) = (compiled[n](logits, targets, mask)
                                                      for n in ("as shipped", "argmax accuracy"))
    same = all(np.allclose(shipped[1][k], before[1][k], rtol=1e-6) for k in before[1]) and np.allclose(
        shipped_grad, before_grad, rtol=1e-6)
    print(f"logits {args.batch} x {args.seq_len} x {args.vocab} fp32, {jax.devices()[0].device_kind}; "
          f"seconds per forward + backward; shipped == argmax version: {same}")
    rounds = {name: [] for name in versions}
    for _ in range(args.rounds):
        for name, fn in compiled.items():
            rounds[name].append(seconds_per_call(fn, logits, targets, mask, repeats=args.repeats))
    medians = {name: statistics.median(times) for name, times in rounds.items()}
    for name, seconds in medians.items():
        print(f"  {name:16s} {seconds:.4f} s  [{' '.join(f'{t:.4f}' for t in rounds[name])}]")
    base = medians["no accuracy"]
    print(f"accuracy costs {medians['as shipped'] - base:.4f} s as shipped, "
          f"{medians['argmax accuracy'] - base:.4f} s as argmax")


if __name__ == "__main__":
    main()
