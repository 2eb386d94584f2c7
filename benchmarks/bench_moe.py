"""Step time of a small MoE decoder vs a dense decoder with the same active parameters, and the share of
the MoE layer's time spent on routing and dispatch rather than expert matmuls.

    python benchmarks/bench_moe.py [--d-model 256 --experts 8 --top-k 2 --expert-mlp 256 --batch 8 --seq 256]

The dense model's MLP width is top_k * expert_mlp, so both models do the same matmul FLOPs per token
(the MoE adds only its router). "Dispatch overhead" compares one MoE MLP layer with a SwiGLU of width
top_k * expert_mlp on the same tokens (forward + backward): (t_moe - t_dense) / t_moe.
Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
from flax import nnx

from plamo_jax.configuration import default_config
from plamo_jax.models.decoder import Decoder
from plamo_jax.models.layers import SwiGLU
from plamo_jax.models.moe import MoEMLP


def seconds_per_call(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / repeats


def model_configs(args):
    dense = default_config().model
    dense.update(vocab_size=args.vocab, d_model=args.d_model, num_layers=args.layers, num_heads=args.heads,
                 num_kv_heads=args.heads, head_dim=args.d_model // args.heads,
                 mlp_dim=args.top_k * args.expert_mlp)
    moe = dense.copy_and_resolve_references()
    moe.update(family="moe", num_experts=args.experts, num_experts_per_token=args.top_k,
               expert_mlp_dim=args.expert_mlp)
    return dense, moe


def train_step_time(cfg, ids, repeats: int) -> tuple[float, int]:
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)

    @nnx.jit
    def step(model, ids):
        def loss_fn(model):
            logits, aux = model(ids, jnp.ones_like(ids), positions)
            loss = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), ids[:, 1:, None], -1))
            for name in ("load_balance_loss", "router_z_loss"):
                if name in aux:
                    loss = loss + 0.01 * jnp.sum(aux[name])
            return loss

        return nnx.grad(loss_fn)(model)

    params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    return seconds_per_call(step, model, ids, repeats=repeats), params


def mlp_layer_times(dense_cfg, moe_cfg, tokens, repeats: int) -> tuple[float, float]:
    moe_layer = MoEMLP(moe_cfg, rngs=nnx.Rngs(0))
    dense_layer = SwiGLU(dense_cfg.d_model, dense_cfg.mlp_dim, init_std=0.02, out_init_std=0.02,
                         dtype=jnp.float32, rngs=nnx.Rngs(0))
    moe_grad = nnx.jit(nnx.grad(lambda layer, x: jnp.sum(layer(x)[0] ** 2), argnums=(0, 1)))
    dense_grad = nnx.jit(nnx.grad(lambda layer, x: jnp.sum(layer(x) ** 2), argnums=(0, 1)))
    return (seconds_per_call(moe_grad, moe_layer, tokens, repeats=repeats),
            seconds_per_call(dense_grad, dense_layer, tokens, repeats=repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--expert-mlp", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    dense_cfg, moe_cfg = model_configs(args)
    ids = jax.random.randint(jax.random.key(0), (args.batch, args.seq), 0, args.vocab)
    dense_step, dense_params = train_step_time(dense_cfg, ids, args.repeats)
    moe_step, moe_params = train_step_time(moe_cfg, ids, args.repeats)
    per_expert = 3 * args.d_model * args.expert_mlp * args.layers
    moe_active = moe_params - (args.experts - args.top_k) * per_expert
    tokens = jax.random.normal(jax.random.key(1), (args.batch, args.seq, args.d_model))
    moe_mlp, dense_mlp = mlp_layer_times(dense_cfg, moe_cfg, tokens, args.repeats)

    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}; tokens per step: {ids.size}")
    print(f"dense: {dense_params / 1e6:.2f}M params, train step {dense_step * 1e3:.1f} ms")
    print(f"moe:   {moe_params / 1e6:.2f}M params ({moe_active / 1e6:.2f}M active, {args.experts} experts, "
          f"top-{args.top_k}), train step {moe_step * 1e3:.1f} ms ({moe_step / dense_step:.2f}x dense)")
    overhead = max(0.0, (moe_mlp - dense_mlp) / moe_mlp)
    print(f"one MLP layer fwd+bwd: moe {moe_mlp * 1e3:.2f} ms, dense of equal FLOPs "
          f"{dense_mlp * 1e3:.2f} ms; dispatch overhead share {overhead:.0%}")


if __name__ == "__main__":
    main()
