"""Mamba2 state-space layer (SSD) with PLaMo 2's projections.

The scan `h_t = exp(dt_t * A) h_{t-1} + dt_t * x_t B_t^T`, `y_t = h_t C_t` is computed two ways:
`ssd_naive` (a sequential `lax.scan`, the reference) and `ssd_chunked` (Mamba2's state-space duality:
quadratic attention-like work inside chunks, linear state passing between chunks).

Packed sequences: a *document index* (0 for tokens that continue the initial state, +1 at each change
of segment id) decides which tokens may interact; the state and the depthwise convolution never carry
information across a document boundary.

Shapes: B batch, L length, H SSM heads, P head dim, N state dim, K conv width, Q chunk, C chunks.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from plamo_jax.errors import ShardingError
from plamo_jax.models.layers import RMSNorm, constant, normal, param
from plamo_jax.models.projection import projection
from plamo_jax.parallel import context
from plamo_jax.parallel import rules as sharding_rules
from plamo_jax.parallel.rules import constrain


def document_index(segment_ids_BL: jax.Array, previous_segment_B: jax.Array | None = None) -> jax.Array:
    """int32 [B, L]: 0 while tokens continue the document of `previous_segment_B`, +1 at each new document.

    Without `previous_segment_B` the first token starts document 1 (no initial state to continue).
    """
    segment_ids_BL = jnp.asarray(segment_ids_BL)
    if previous_segment_B is None:
        first_is_new = jnp.ones(segment_ids_BL.shape[:1], dtype=bool)
    else:
        first_is_new = segment_ids_BL[:, 0] != previous_segment_B
    changed = segment_ids_BL[:, 1:] != segment_ids_BL[:, :-1]
    changes = jnp.concatenate([first_is_new[:, None], changed], axis=1)
    return jnp.cumsum(changes.astype(jnp.int32), axis=1)


def ssd_naive(x_BLHP, dt_BLH, A_H, B_BLN, C_BLN, doc_BL, initial_state_BHPN=None):
    """Sequential reference recurrence in fp32. Returns (y [B, L, H, P], final state [B, H, P, N])."""
    batch, _, heads, head_dim = x_BLHP.shape
    state_dim = B_BLN.shape[-1]
    f32 = jnp.float32
    if initial_state_BHPN is None:
        initial_state_BHPN = jnp.zeros((batch, heads, head_dim, state_dim), f32)
    previous_doc = jnp.concatenate([jnp.zeros_like(doc_BL[:, :1]), doc_BL[:, :-1]], axis=1)
    keep_BL = (doc_BL == previous_doc).astype(f32)

    def step(h_BHPN, inputs):
        x, dt, b, c, keep = inputs
        decay = jnp.exp(dt * A_H) * keep[:, None]
        h_BHPN = decay[:, :, None, None] * h_BHPN + jnp.einsum("bh,bhp,bn->bhpn", dt, x, b)
        return h_BHPN, jnp.einsum("bhpn,bn->bhp", h_BHPN, c)

    inputs = tuple(jnp.moveaxis(t.astype(f32), 1, 0) for t in (x_BLHP, dt_BLH, B_BLN, C_BLN, keep_BL))
    final, y_LBHP = jax.lax.scan(step, initial_state_BHPN.astype(f32), inputs)
    return jnp.moveaxis(y_LBHP, 0, 1), final


def _pad_length(t: jax.Array, pad: int, mode: str = "constant") -> jax.Array:
    widths = [(0, 0)] * t.ndim
    widths[1] = (0, pad)
    return jnp.pad(t, widths, mode=mode)


def _combine_states(left, right):
    """Associative operator on (decay [..., H], state [..., H, P, N]): apply left, then right."""
    decay_l, state_l = left
    decay_r, state_r = right
    return decay_l * decay_r, decay_r[..., None, None] * state_l + state_r


def initial_state_terms(a_BLH, doc_BL, C_BLN, initial_state_BHPN):
    """What an initial state adds: (y contribution [B, L, H, P], its factor in the final state [B, H]).

    The state reaches token t decayed by exp(sum_{k<=t} a_k) while t is still in document 0.
    """
    log_decay_BLH = jnp.cumsum(a_BLH, axis=1)
    reaches_BLH = jnp.exp(log_decay_BLH) * (doc_BL == 0)[..., None]
    y = reaches_BLH[..., None] * jnp.einsum("bln,bhpn->blhp", C_BLN, initial_state_BHPN)
    return y, reaches_BLH[:, -1]


def ssd_chunked(x_BLHP, dt_BLH, A_H, B_BLN, C_BLN, doc_BL, *, chunk_size: int,
                initial_state_BHPN=None):
    """Chunked SSD in fp32, equal to `ssd_naive`. Lengths not divisible by the chunk are padded."""
    batch, length, heads, head_dim = x_BLHP.shape
    state_dim = B_BLN.shape[-1]
    f32 = jnp.float32
    x_BLHP, dt_BLH, B_BLN, C_BLN = (t.astype(f32) for t in (x_BLHP, dt_BLH, B_BLN, C_BLN))
    a_BLH = dt_BLH * A_H.astype(f32)
    chunk = min(chunk_size, length)
    pad = (-length) % chunk
    num_chunks = (length + pad) // chunk
    # Padding has dt = 0 (no input, no decay) and stays in the last document, so it changes nothing.
    x, dt, a, b, c = (_pad_length(t, pad) for t in (x_BLHP, dt_BLH, a_BLH, B_BLN, C_BLN))
    doc = _pad_length(doc_BL, pad, mode="edge")

    x = x.reshape(batch, num_chunks, chunk, heads, head_dim)
    dt = dt.reshape(batch, num_chunks, chunk, heads)
    a = a.reshape(batch, num_chunks, chunk, heads)
    b = b.reshape(batch, num_chunks, chunk, state_dim)
    c = c.reshape(batch, num_chunks, chunk, state_dim)
    doc = doc.reshape(batch, num_chunks, chunk)

    # Within a chunk: decay from s to t is exp(sum_{s<k<=t} a_k); summing the masked matrix avoids the
    # cancellation of a difference of two long cumulative sums.
    a_BCHQ = jnp.moveaxis(a, 3, 2)
    target = jnp.arange(chunk)[:, None]
    source = jnp.arange(chunk)[None, :]
    seg_sum = jnp.cumsum(jnp.where(target > source, a_BCHQ[..., :, None], 0.0), axis=-2)
    same_doc = doc[:, :, :, None] == doc[:, :, None, :]
    allowed = (target >= source) & same_doc
    decay_BCHTS = jnp.exp(seg_sum) * allowed[:, :, None]

    x_dt = x * dt[..., None]
    scores_BCTS = jnp.einsum("bctn,bcsn->bcts", c, b)
    y_diag = jnp.einsum("bchts,bcshp->bcthp", scores_BCTS[:, :, None] * decay_BCHTS, x_dt)

    # State each chunk leaves behind on its own (zero initial state).
    decay_to_end_BCHS = decay_BCHTS[..., -1, :]
    chunk_states = jnp.einsum("bchs,bcsn,bcshp->bchpn", decay_to_end_BCHS, b, x_dt)

    # A chunk passes on the incoming state only if its last token is in the incoming state's document.
    previous_end_doc = jnp.concatenate([jnp.zeros_like(doc[:, :1, -1]), doc[:, :-1, -1]], axis=1)
    carries = (doc[:, :, -1] == previous_end_doc)[..., None]
    chunk_decay_BCH = jnp.exp(jnp.sum(a, axis=2)) * carries
    _, states_after = jax.lax.associative_scan(_combine_states, (chunk_decay_BCH, chunk_states), axis=1)
    states_before = jnp.concatenate([jnp.zeros_like(states_after[:, :1]), states_after[:, :-1]], axis=1)

    reaches_BCQH = jnp.exp(jnp.cumsum(a, axis=2)) * (doc == previous_end_doc[..., None])[..., None]
    y_off = reaches_BCQH[..., None] * jnp.einsum("bctn,bchpn->bcthp", c, states_before)

    y = (y_diag + y_off).reshape(batch, num_chunks * chunk, heads, head_dim)[:, :length]
    final = states_after[:, -1]
    if initial_state_BHPN is not None:
        y_init, final_factor_BH = initial_state_terms(a_BLH, doc_BL, C_BLN, initial_state_BHPN.astype(f32))
        y = y + y_init
        final = final + final_factor_BH[..., None, None] * initial_state_BHPN
    return y, final


def causal_conv(x_BLHP, weight_KHP, segment_ids_BL, history_BKHP=None, history_segment_ids_BK=None):
    """Depthwise causal conv: out_t = sum_k w_k x_{t-K+1+k}, reading only tokens of t's document.

    `history` holds the K-1 inputs before x (a decode cache or the previous sequence shard); without it
    the sequence starts from zeros.
    """
    batch, length = x_BLHP.shape[:2]
    width = weight_KHP.shape[0]
    if history_BKHP is None:
        history_BKHP = jnp.zeros((batch, width - 1) + x_BLHP.shape[2:], x_BLHP.dtype)
        history_segment_ids_BK = jnp.broadcast_to(segment_ids_BL[:, :1], (batch, width - 1))
    padded = jnp.concatenate([history_BKHP.astype(x_BLHP.dtype), x_BLHP], axis=1)
    doc = document_index(jnp.concatenate([history_segment_ids_BK, segment_ids_BL], axis=1))
    own_doc = doc[:, width - 1:]
    out = jnp.zeros_like(x_BLHP)
    for k in range(width):
        same = (doc[:, k:k + length] == own_doc)[..., None, None]
        out = out + jnp.where(same, padded[:, k:k + length], 0) * weight_KHP[k].astype(x_BLHP.dtype)
    return out


def inverse_softplus(y: jax.Array) -> jax.Array:
    return y + jnp.log(-jnp.expm1(-y))


def dt_bias_init(dt_min: float = 1e-3, dt_max: float = 1e-1, dt_floor: float = 1e-4):
    """dt ~ log-uniform[dt_min, dt_max] floored at dt_floor, stored as softplus^-1(dt) (Mamba2 init)."""

    def init(key, shape, dtype=jnp.float32):
        u = jax.random.uniform(key, shape, jnp.float32)
        dt = jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        return inverse_softplus(jnp.maximum(dt, dt_floor)).astype(dtype)

    return init


def a_log_init(key, shape, dtype=jnp.float32):
    del key
    return jnp.broadcast_to(jnp.log(jnp.arange(1, shape[-1] + 1, dtype=jnp.float32)), shape).astype(dtype)


def conv_init(key, shape, dtype=jnp.float32):
    bound = 1.0 / math.sqrt(shape[0])  # fan-in of a depthwise filter is its width (PyTorch Conv1d default)
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def dt_rank(d_model: int) -> int:
    """PLaMo 2's width of the dt projection input."""
    return max(64, d_model // 16)


def mamba_flops_per_token(cfg: ml_collections.ConfigDict) -> float:
    """PLaMo 2's Mamba mixer: projections, depthwise conv, and the recurrence itself.

    The recurrence is counted as the sequential scan does it (state update x B^T and readout C h,
    2 x inner x state_dim each); the chunked SSD spends more to use matrix units.
    """
    d, inner, state = cfg.d_model, cfg.ssm_num_heads * cfg.ssm_head_dim, cfg.ssm_state_dim
    dt_dim = dt_rank(d)
    projections = 2 * d * 2 * inner + 2 * inner * (2 * state + dt_dim) + 2 * dt_dim * cfg.ssm_num_heads
    return projections + 2 * inner * cfg.ssm_conv_width + 4 * inner * state + 2 * inner * d


class MambaMixer(nnx.Module):
    """PLaMo 2's Mamba: in_proj -> (z, x); conv+SiLU on x; B, C, dt from x; SSD; (y + D x) * silu(z)."""

    def __init__(self, *, d_model: int, num_heads: int, head_dim: int, state_dim: int, conv_width: int,
                 chunk_size: int, norm_eps: float, init_std: float, out_init_std: float, dtype,
                 rngs: nnx.Rngs, fp8: bool = False, context_layout: str = "in_place"):
        self.num_heads, self.head_dim, self.state_dim = num_heads, head_dim, state_dim
        self.conv_width, self.chunk_size = conv_width, chunk_size
        self.context_layout = context_layout  # under the balanced layout: context.SSM_LAYOUTS
        self.dt_dim = dt_rank(d_model)
        self.dtype = dtype
        self.fp8 = fp8
        # Per head [z_h, x_h], as PLaMo 2 stores in_proj; heads shard on the tensor axis.
        self.in_proj = param(rngs, normal(init_std), (d_model, num_heads, 2, head_dim),
                             ("embed", "ssm_heads", None, "head_dim"))
        self.conv = param(rngs, conv_init, (conv_width, num_heads, head_dim),
                          ("conv", "ssm_heads", "head_dim"))
        self.bcdt_proj = param(rngs, normal(init_std), (num_heads, head_dim, 2 * state_dim + self.dt_dim),
                               ("ssm_heads", "head_dim", None))
        self.dt_norm = RMSNorm(self.dt_dim, eps=norm_eps, rngs=rngs)
        self.B_norm = RMSNorm(state_dim, eps=norm_eps, rngs=rngs)
        self.C_norm = RMSNorm(state_dim, eps=norm_eps, rngs=rngs)
        self.dt_proj = param(rngs, normal(init_std), (self.dt_dim, num_heads), (None, "ssm_heads"))
        self.dt_bias = param(rngs, dt_bias_init(), (num_heads,), ("ssm_heads",))
        self.A_log = param(rngs, a_log_init, (num_heads,), ("ssm_heads",))
        self.D = param(rngs, constant(1.0), (num_heads,), ("ssm_heads",))
        self.out_proj = param(rngs, normal(out_init_std), (num_heads, head_dim, d_model),
                              ("ssm_heads", "head_dim", "embed"))

    def _project_in(self, x_BLD):
        zx = projection("bld,dhkp->blhkp", x_BLD, self.in_proj[...], self.dtype, self.fp8)
        z = constrain(zx[..., 0, :], ("act_batch", "act_length", "act_ssm_heads", None))
        x = constrain(zx[..., 1, :], ("act_batch", "act_length", "act_ssm_heads", None))
        return z, x

    def _ssm_inputs(self, x_BLHP):
        """B, C (fp32, normalised) and dt (fp32, after softplus) from the convolved x."""
        bcdt = jnp.einsum("blhp,hpe->ble", x_BLHP, self.bcdt_proj[...].astype(self.dtype))
        b, c, dt = jnp.split(bcdt, [self.state_dim, 2 * self.state_dim], axis=-1)
        b = self.B_norm(b.astype(jnp.float32))
        c = self.C_norm(c.astype(jnp.float32))
        dt = self.dt_norm(dt.astype(jnp.float32))
        dt = jax.nn.softplus(jnp.einsum("blr,rh->blh", dt, self.dt_proj[...]) + self.dt_bias[...])
        return b, c, constrain(dt, ("act_batch", "act_length", "act_ssm_heads"))

    def _project_out(self, y_BLHP, x_BLHP, z_BLHP):
        y = y_BLHP + self.D[...][:, None] * x_BLHP.astype(jnp.float32)
        y = (y * jax.nn.silu(z_BLHP.astype(jnp.float32))).astype(self.dtype)
        out = projection("blhp,hpd->bld", y, self.out_proj[...], self.dtype, self.fp8)
        return constrain(out, ("act_batch", "act_length", "act_embed"))

    def A(self) -> jax.Array:
        return -jnp.exp(self.A_log[...])

    def __call__(self, x_BLD: jax.Array, segment_ids_BL: jax.Array) -> jax.Array:
        if self.context_layout == "undo_redo" and context.chunks_per_shard() == 2:
            return self._mix_contiguous(x_BLD, segment_ids_BL)
        return self._mix(x_BLD, segment_ids_BL)

    def _mix_contiguous(self, x_BLD: jax.Array, segment_ids_BL: jax.Array) -> jax.Array:
        """Megatron's undo/redo: the balanced layout's tokens go to contiguous chunks (one per shard, so
        the scan passes states between S chunks instead of 2S) and the output comes back."""
        axes = ("act_batch", "act_length", "act_embed")
        x = context.to_contiguous(x_BLD, axes)
        segments = context.to_contiguous(segment_ids_BL, axes[:2])
        with context.balanced_layout(False):
            out = self._mix(x, segments)
        return context.to_balanced(out, axes)

    def _mix(self, x_BLD: jax.Array, segment_ids_BL: jax.Array) -> jax.Array:
        z, x = self._project_in(x_BLD)
        weight = self.conv[...].astype(self.dtype)
        sharded = context.sequence_shards() > 1
        if sharded:
            x = causal_conv_sharded(x, weight, segment_ids_BL)
        else:
            x = causal_conv(x, weight, segment_ids_BL)
        x = constrain(jax.nn.silu(x), ("act_batch", "act_length", "act_ssm_heads", None))
        b, c, dt = self._ssm_inputs(x)
        if sharded:
            y = ssd_sharded(x, dt, self.A(), b, c, segment_ids_BL, chunk_size=self.chunk_size)
        else:
            y, _ = ssd_chunked(x, dt, self.A(), b, c, document_index(segment_ids_BL),
                               chunk_size=self.chunk_size)
        y = constrain(y, ("act_batch", "act_length", "act_ssm_heads", None))
        return self._project_out(y, x, z)

    def init_cache(self, batch: int) -> dict[str, jax.Array]:
        return {
            "conv": jnp.zeros((batch, self.conv_width - 1, self.num_heads, self.head_dim), self.dtype),
            "ssm": jnp.zeros((batch, self.num_heads, self.head_dim, self.state_dim), jnp.float32),
        }

    def extend(self, x_BTD: jax.Array, cache: dict[str, jax.Array]):
        """Process T new tokens of one document after the cached ones; returns (out, new cache)."""
        batch, length = x_BTD.shape[:2]
        z, x_raw = self._project_in(x_BTD)
        segment_ids = jnp.zeros((batch, length), jnp.int32)
        history_segments = jnp.zeros((batch, self.conv_width - 1), jnp.int32)
        x = jax.nn.silu(causal_conv(x_raw, self.conv[...].astype(self.dtype), segment_ids,
                                    cache["conv"], history_segments))
        b, c, dt = self._ssm_inputs(x)
        doc = jnp.zeros((batch, length), jnp.int32)  # everything continues the cached state
        if length == 1:
            y, state = ssd_naive(x, dt, self.A(), b, c, doc, cache["ssm"])
        else:
            y, state = ssd_chunked(x, dt, self.A(), b, c, doc, chunk_size=self.chunk_size,
                                   initial_state_BHPN=cache["ssm"])
        conv_history = jnp.concatenate([cache["conv"], x_raw.astype(cache["conv"].dtype)], axis=1)
        new_cache = {"conv": conv_history[:, -(self.conv_width - 1):], "ssm": state}
        return self._project_out(y, x, z), new_cache


# ---------------------------------------------------------------------------------------------------------
# Sequence parallelism: each shard of the "sequence" mesh axis holds one contiguous chunk of the original
# sequence, or two under context parallelism's balanced layout (chunks r and 2S-1-r: parallel/context.py),
# and scans each chunk from a zero state. The chunks' final states and decays are gathered (an all-gather
# of [B, H, P, N] states, never of the sequence), combined in the original chunk order by an associative
# scan, and each chunk adds what its incoming state contributes. The conv reads the K-1 inputs before each
# chunk from the gathered chunk tails. So the balanced layout costs the SSM no data movement (unless
# `model.ssm_context_layout="undo_redo"` moves the tokens to contiguous chunks around the mixer).

SEQUENCE_AXIS = context.SEQUENCE_AXIS


def _active_mesh_and_rules():
    current = sharding_rules.active_mesh_and_rules()
    return (None, None) if current is None else current


def _spec(logical_axes):
    mesh, rules = _active_mesh_and_rules()
    return sharding_rules.logical_to_spec(logical_axes, rules, mesh)


class _Chunks:
    """The local chunks of a shard (inside shard_map) and where they sit in the original sequence."""

    def __init__(self, num_shards: int, chunks: int):
        self.count = chunks
        order = context.chunk_order(num_shards, chunks)  # [shards, chunks] original chunk ids
        self.ids = jnp.asarray(order)[jax.lax.axis_index(SEQUENCE_AXIS)]  # this shard's, traced
        # gathered [shards, chunks, ...] flattened -> original chunk order
        self.by_original = np.argsort(order.reshape(-1))

    def split(self, t: jax.Array) -> list[jax.Array]:
        size = t.shape[1] // self.count
        return [t[:, h * size:(h + 1) * size] for h in range(self.count)]

    def gather(self, per_chunk: list[jax.Array]) -> jax.Array:
        """[original chunks, ...]: every shard's per-chunk values in the original order."""
        gathered = jax.lax.all_gather(jnp.stack(per_chunk), SEQUENCE_AXIS)  # [shards, chunks, ...]
        return gathered.reshape((-1,) + gathered.shape[2:])[self.by_original]

    def previous(self, ordered: jax.Array, h: int, first) -> jax.Array:
        """The value of the chunk before local chunk h in the original order (`first` for chunk 0)."""
        chunk_id = self.ids[h]
        return jnp.where(chunk_id == 0, first, ordered[jnp.maximum(chunk_id - 1, 0)])


def causal_conv_sharded(x_BLHP, weight_KHP, segment_ids_BL):
    """`causal_conv` over a sequence-sharded x; each chunk's halo of K-1 inputs comes from the one before."""
    mesh, _ = _active_mesh_and_rules()
    num_shards, chunks = mesh.shape[SEQUENCE_AXIS], context.chunks_per_shard()
    width = weight_KHP.shape[0]
    x_spec = _spec(("act_batch", "act_length", "act_ssm_heads", None))
    w_spec = _spec((None, "act_ssm_heads", None))
    seg_spec = _spec(("act_batch", "act_length"))

    def body(x, w, seg):
        if x.shape[1] // chunks < width - 1:
            raise ShardingError(f"train.seq_len: a sequence chunk holds {x.shape[1] // chunks} tokens; "
                                f"expected at least model.ssm_conv_width - 1 = {width - 1} per chunk of "
                                "mesh.sequence")
        layout = _Chunks(num_shards, chunks)
        xs, segs = layout.split(x), layout.split(seg)
        tails = layout.gather([t[:, -(width - 1):] for t in xs])
        tail_segments = layout.gather([t[:, -(width - 1):] for t in segs])
        outs = []
        for h, (x_h, seg_h) in enumerate(zip(xs, segs, strict=True)):
            history = layout.previous(tails, h, jnp.zeros_like(tails[0]))
            own_first = jnp.broadcast_to(seg_h[:, :1], seg_h[:, :width - 1].shape)
            history_segments = layout.previous(tail_segments, h, own_first)
            outs.append(causal_conv(x_h, w, seg_h, history, history_segments))
        return jnp.concatenate(outs, axis=1)

    # check_vma=False: under the pipeline's vmaps (spmd_axis_name "stage", "data") the batching rule adds
    # those axes to the specs, which the replication check does not follow (models/pipelined_stack.py)
    return jax.shard_map(body, mesh=mesh, in_specs=(x_spec, w_spec, seg_spec), out_specs=x_spec,
                         check_vma=False)(x_BLHP, weight_KHP, segment_ids_BL)


def ssd_sharded(x_BLHP, dt_BLH, A_H, B_BLN, C_BLN, segment_ids_BL, *, chunk_size: int):
    """`ssd_chunked` (zero initial state) with the length split over the "sequence" mesh axis."""
    mesh, _ = _active_mesh_and_rules()
    num_shards, chunks = mesh.shape[SEQUENCE_AXIS], context.chunks_per_shard()
    x_spec = _spec(("act_batch", "act_length", "act_ssm_heads", None))
    dt_spec = _spec(("act_batch", "act_length", "act_ssm_heads"))
    a_spec = _spec(("act_ssm_heads",))
    bc_spec = _spec(("act_batch", "act_length", None))
    seg_spec = _spec(("act_batch", "act_length"))

    def body(x, dt, A, b, c, seg):
        layout = _Chunks(num_shards, chunks)
        pieces = [layout.split(t) for t in (x, dt, b, c, seg)]
        last_segments = layout.gather([seg_h[:, -1] for seg_h in pieces[4]])
        per_chunk = []
        for h, (x_h, dt_h, b_h, c_h, seg_h) in enumerate(zip(*pieces, strict=True)):
            previous_segment = layout.previous(last_segments, h, last_segments[0])
            doc = jnp.where(layout.ids[h] == 0, document_index(seg_h),
                            document_index(seg_h, previous_segment))
            y, local_state = ssd_chunked(x_h, dt_h, A, b_h, c_h, doc, chunk_size=chunk_size)
            a = dt_h.astype(jnp.float32) * A.astype(jnp.float32)
            decay = jnp.exp(jnp.sum(a, axis=1)) * (doc[:, -1] == 0)[:, None]
            per_chunk.append((y, local_state, a, doc, c_h, decay))
        decays = layout.gather([p[5] for p in per_chunk])
        states = layout.gather([p[1] for p in per_chunk])
        _, states_after = jax.lax.associative_scan(_combine_states, (decays, states), axis=0)
        outs = []
        for h, (y, _, a, doc, c_h, _) in enumerate(per_chunk):
            incoming = layout.previous(states_after, h, jnp.zeros_like(states_after[0]))
            y_in, _ = initial_state_terms(a, doc, c_h.astype(jnp.float32), incoming)
            outs.append(y + y_in)
        return jnp.concatenate(outs, axis=1)

    return jax.shard_map(body, mesh=mesh, in_specs=(x_spec, dt_spec, a_spec, bc_spec, bc_spec, seg_spec),
                         out_specs=x_spec, check_vma=False)(x_BLHP, dt_BLH, A_H, B_BLN, C_BLN, segment_ids_BL)
