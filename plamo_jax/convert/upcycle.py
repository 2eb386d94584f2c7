"""Drop-Upcycling: a dense checkpoint becomes an MoE whose experts are partially re-initialised copies.

For every layer and expert, floor(ratio * F) of the F intermediate neurons are drawn (seeded, a new
set per expert and layer) and their weights are replaced by samples from N(mean, std) of the weights
being replaced; everything else is copied from the dense FFN. By default a neuron is replaced whole
(the same index set for its gate row, up row and down column), as the paper describes; with
`whole_neurons=False` each of the three matrices draws its own set, as the authors' released script does.
ratio = 0 is plain upcycling: every expert equals the dense FFN. Attention, norms and embeddings are
copied; the router is new (N(0, 0.02)).

Parameters are pure nested dicts (`nnx.to_pure_dict(nnx.state(model, nnx.Param))`), stacked over layers.
"""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np

from plamo_jax.errors import ConfigError
from plamo_jax.models.moe import check_upcycle_compatible

ROUTER_INIT_STD = 0.02


def drop_neurons(weight: np.ndarray, neuron_axis: int, indices: np.ndarray,
                 rng: np.random.Generator) -> np.ndarray:
    """A copy of `weight` whose neurons `indices` along `neuron_axis` are N(mean, std) of that slice."""
    out = np.array(weight, dtype=np.float32, copy=True)
    if indices.size == 0:
        return out
    moved = np.moveaxis(out, neuron_axis, 0)  # a view: writes land in `out`
    replaced = moved[indices]
    moved[indices] = rng.normal(replaced.mean(), replaced.std(), size=replaced.shape).astype(np.float32)
    return out


def upcycle_expert(gate_DF: np.ndarray, up_DF: np.ndarray, down_FD: np.ndarray, ratio: float,
                   rng: np.random.Generator, whole_neurons: bool = True):
    """One expert's (gate, up, down) from the dense FFN with floor(ratio * F) neurons re-initialised."""
    width = gate_DF.shape[1]
    num_dropped = int(np.floor(ratio * width))
    draw = lambda: np.sort(rng.choice(width, size=num_dropped, replace=False))
    shared = draw() if whole_neurons else None
    gate = drop_neurons(gate_DF, 1, shared if whole_neurons else draw(), rng)
    up = drop_neurons(up_DF, 1, shared if whole_neurons else draw(), rng)
    down = drop_neurons(down_FD, 0, shared if whole_neurons else draw(), rng)
    return gate, up, down


def upcycle_params(dense_params: dict[str, Any], dense_model_cfg: ml_collections.ConfigDict,
                   moe_model_cfg: ml_collections.ConfigDict, ratio: float, seed: int,
                   whole_neurons: bool = True) -> dict[str, Any]:
    """MoE parameter tree (numpy fp32 for new or changed tensors) from a dense one; see module doc."""
    if not 0.0 <= ratio <= 1.0:
        raise ConfigError(f"upcycle ratio={ratio}: expected a fraction in [0, 1]")
    check_upcycle_compatible(dense_model_cfg, moe_model_cfg)
    blocks = dense_params["blocks"]
    mlp = blocks["mlp"]
    gate_LDF, up_LDF, down_LFD = (np.asarray(mlp[name], dtype=np.float32) for name in ("gate", "up", "down"))
    num_layers, d_model, _ = gate_LDF.shape
    num_experts = moe_model_cfg.num_experts
    rng = np.random.default_rng(seed)

    gates, ups, downs = [], [], []
    for layer in range(num_layers):
        per_expert = [
            upcycle_expert(gate_LDF[layer], up_LDF[layer], down_LFD[layer], ratio, rng, whole_neurons)
            for _ in range(num_experts)
        ]
        gates.append(np.stack([g for g, _, _ in per_expert]))
        ups.append(np.stack([u for _, u, _ in per_expert]))
        downs.append(np.stack([d for _, _, d in per_expert]))
    router = rng.normal(0.0, ROUTER_INIT_STD, size=(num_layers, d_model, num_experts)).astype(np.float32)

    moe_params = {key: value for key, value in dense_params.items() if key != "blocks"}
    moe_params["blocks"] = {key: value for key, value in blocks.items() if key != "mlp"}
    moe_params["blocks"]["mlp"] = {"router": router, "gate": np.stack(gates), "up": np.stack(ups),
                                   "down": np.stack(downs)}
    return moe_params
