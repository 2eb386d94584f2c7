"""The configuration schema: every key with its default, and validation at start.

Recipes in `configs/` start from `default_config()` and change fields. The returned ConfigDict is
locked, so a misspelt key in a recipe or a command-line override fails instead of being ignored.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import ml_collections

from plamo_jax.data.config import data_defaults
from plamo_jax.errors import ConfigError
from plamo_jax.models import registry
from plamo_jax.models.attention import splash_unsupported
from plamo_jax.models.cudnn_attention import cudnn_unsupported
from plamo_jax.models.decoder import REMAT_POLICIES
from plamo_jax.parallel import context, pipeline
from plamo_jax.parallel.context import STRATEGIES as CONTEXT_STRATEGIES
from plamo_jax.parallel.mesh import resolve_axis_sizes
from plamo_jax.parallel.rules import DEFAULT_RULES, merge_rules
from plamo_jax.train.optimizer import SCHEDULES, WSD_DECAY_SHAPES

ATTENTION_IMPLS = ("auto", "dense", "flash", "cudnn", "splash")

def _model_defaults() -> ml_collections.ConfigDict:
    m = ml_collections.ConfigDict()
    m.family = "dense"  # dense | hybrid | moe (models/registry.py; each family reads only its own keys)
    m.vocab_size = 512
    m.d_model = 128
    m.num_layers = 2
    m.num_heads = 4
    m.num_kv_heads = 2
    m.head_dim = 32
    m.mlp_dim = 384  # dense and hybrid MLP width (MoE experts have expert_mlp_dim)
    m.qk_norm = False  # per-head RMSNorm on q and k before RoPE (PLaMo-100B, Qwen3)
    m.tie_embeddings = True
    m.rope_theta = 10000.0
    m.norm_eps = 1e-5
    m.init_std = 0.02
    m.dtype = "float32"  # compute dtype; parameters are always fp32
    # FP8 weight matmuls (attention, MLP, shared experts, Mamba in/out projections): E4M3 operands,
    # E5M2 gradients, per-tensor current scaling (plamo_jax/models/fp8.py). Embeddings, the LM head,
    # routers and routed experts stay in model.dtype.
    m.fp8 = False
    m.remat = "none"  # none | save_dots | full
    # dense: one [L, L] score matrix per head (fastest for short sequences). flash: blockwise online
    # softmax with a hand-written backward, memory linear in the sequence (models/flash_attention.py).
    # cudnn: cuDNN's fused attention, NVIDIA GPUs, bf16/fp16 (models/cudnn_attention.py). splash: the
    # Pallas TPU kernel (models/splash_attention.py). auto: splash on TPU, cudnn on GPU where they apply,
    # else dense up to 2048 tokens and flash beyond (models/attention.py).
    m.attention_impl = "dense"
    m.attention_block = 512  # flash: query / key block length
    # Context parallelism: how attention works when mesh.sequence > 1 (models/context_attention.py). none: the
    # sequence is gathered for attention (heads stay sharded); all_gather: keys/values gathered, queries
    # stay sharded; ring: key/value blocks rotate with ppermute, nothing gathered; ulysses: all-to-alls
    # trade heads for sequence around attention (heads and key/value heads divisible by sequence x tensor).
    m.context_parallel = "all_gather"
    # Lay each training batch out so that every sequence shard does the same causal attention work.
    m.context_load_balance = True
    m.scan_unroll = 1  # layers per scan iteration; 1 keeps compile time flat in depth
    # False: the blocks run in a Python loop (models/decoder.py): no stacked per-layer activation buffers
    # to zero-fill and write each step, compile time grows with depth. Decoding always scans.
    m.scan_layers = True
    # Pipeline parallelism over mesh.stage (parallel/pipeline.py, models/pipelined_stack.py). gpipe: each
    # stage holds consecutive blocks; circular: pipeline_repeats chunks per stage, a microbatch goes round
    # the stages that many times (smaller bubble, needs microbatches >= stages).
    m.pipeline_schedule = "gpipe"
    m.pipeline_repeats = 1
    m.pipeline_microbatches = 0  # 0 = as many as stages; the bubble is (S-1)/(repeats*M+S-1)
    # Also checkpoint each pipeline iteration: the backward keeps only stage inputs across iterations
    # (not every block's), for one more forward pass of each stage.
    m.pipeline_remat_iterations = False
    # hybrid (PLaMo 2 / Samba)
    m.mamba_step = 2
    m.ssm_num_heads = 4
    m.ssm_head_dim = 32
    m.ssm_state_dim = 16
    m.ssm_conv_width = 4
    m.ssm_chunk_size = 64
    # Mamba layers under context parallelism's balanced layout (parallel/context.py). in_place: each shard
    # scans its two chunks where they are and the chunk states are gathered; undo_redo (Megatron's): the
    # tokens move to contiguous chunks before each Mamba layer and back after it.
    m.ssm_context_layout = "in_place"
    m.attention_window = 0  # 0 = full attention; otherwise a sliding window of this many tokens
    m.full_attention_layers = ()  # layer indices that use full attention despite the window
    # mixture of experts
    m.num_experts = 0  # routed experts per MoE layer (family "moe" needs >= 1)
    m.num_experts_per_token = 2  # top-k
    m.num_shared_experts = 0  # always-on experts, one SwiGLU of num_shared_experts * expert_mlp_dim
    m.expert_mlp_dim = 0  # hidden width of each expert
    m.router_softmax_before_topk = True  # False: softmax over the k chosen logits only
    m.router_renormalize = True  # divide the chosen top-k probabilities by their sum (Mixtral)
    m.capacity_factor = 0.0  # 0 = dropless; else each expert takes ceil(factor * tokens * k / experts)
    m.moe_aux_loss = 0.01  # Switch load-balancing loss coefficient
    m.router_z_loss = 0.001  # ST-MoE router z-loss coefficient
    return m


def _mesh_defaults() -> ml_collections.ConfigDict:
    mesh = ml_collections.ConfigDict()
    # ICI (within a host or slice) sizes; one may be -1 to take the remaining devices.
    mesh.stage = 1  # pipeline stages (model.pipeline_*); put dcn_stage across slow links
    mesh.data = -1
    mesh.fsdp = 1
    mesh.expert = 1
    mesh.sequence = 1
    mesh.tensor = 1
    # DCN (across slices / hosts) sizes multiply the ICI sizes; 1 = single slice.
    mesh.dcn_stage = 1
    mesh.dcn_data = 1
    mesh.dcn_fsdp = 1
    # logical axis -> comma-separated mesh axes ("" = replicated); override any single key.
    mesh.rules = ml_collections.ConfigDict(
        {name: ",".join(axes or ()) for name, axes in DEFAULT_RULES.items()}
    )
    return mesh


def _optimizer_defaults() -> ml_collections.ConfigDict:
    o = ml_collections.ConfigDict()
    o.learning_rate = 3e-3
    o.b1 = 0.9
    o.b2 = 0.95
    o.eps = 1e-8
    o.weight_decay = 0.1
    # parameter path substrings excluded from weight decay (comma-separated)
    o.no_decay = "norm,bias,embed"
    o.clip_norm = 1.0
    o.schedule = "cosine"  # cosine | wsd | constant
    o.warmup_steps = 20
    o.min_lr_ratio = 0.1
    o.wsd_decay_fraction = 0.2  # final fraction of steps spent decaying (warmup-stable-decay)
    o.wsd_decay_shape = "linear"  # linear | cosine | sqrt
    return o


def _train_defaults() -> ml_collections.ConfigDict:
    t = ml_collections.ConfigDict()
    t.steps = 300
    t.seed = 0
    t.global_batch_size = 16  # sequences per optimizer step, across all devices
    t.seq_len = 128  # tokens per sequence
    t.microbatches = 1  # gradient accumulation steps inside one jitted step
    t.z_loss = 1e-4  # PaLM z-loss coefficient: z * log(Z)^2
    # LM head + cross entropy in chunks of this many positions along the sequence (0: all at once): the
    # fp32 logits of one chunk live at a time and are recomputed in the backward pass (train/losses.py).
    # What makes a pipeline's head fit: it runs on every microbatch's rows at once.
    t.loss_chunk = 0
    # lm: next-token loss (pre-training, SFT). dpo: Direct Preference Optimization against the
    # frozen checkpoint.init_params, on data.format=preference pairs. distill: logit distillation
    # from the frozen train.teacher_checkpoint on text / chat corpora (plamo_jax/train/objectives/).
    t.objective = "lm"
    t.dpo_beta = 0.1  # DPO: strength of the implicit KL constraint to the reference model
    t.dpo_label_smoothing = 0.0  # DPO: assumed fraction of flipped preference labels (cDPO)
    t.teacher_checkpoint = ""  # distill: the teacher's checkpoint (any size or family, same vocabulary)
    t.distill_temperature = 1.0  # distill: T of softmax(logits / T); the KL is scaled by T^2
    t.distill_alpha = 0.0  # distill: loss = (1 - alpha) * T^2 * KL + alpha * cross entropy
    t.distill_top_k = 0  # distill: > 0 = only the teacher's top-k tokens (renormalised); 0 = all
    t.log_every = 10
    t.output_dir = "runs/default"
    # MFU's denominator: > 0 = this figure; 0 = the vendor figure for the device and compute dtype, or,
    # where there is none (CPUs, unknown devices), a matmul measured once per machine when
    # calibrate_peak_flops (train/peak_flops.py); otherwise no MFU is shown.
    t.peak_flops_per_device = 0.0
    t.calibrate_peak_flops = True
    # Guards (train/guards.py). A step whose loss, gradient norm or updated parameters are not finite,
    # or whose loss or gradient norm spikes above mean + spike_sigma x std of the last spike_window
    # healthy steps, is skipped: parameters and optimizer state stay as they were.
    t.max_bad_steps = 10  # this many consecutive skipped steps stop the run (exit status 3)
    t.spike_sigma = 6.0  # 0 turns the spike test off (the non-finite test always applies)
    t.spike_window = 128  # healthy steps the mean and std are taken over
    t.spike_warmup = 20  # healthy steps seen before the spike test applies
    # A gradient-norm spike (with a normal loss) still there after spike_patience skipped steps is a new
    # gradient-norm level, not a bad batch: it is taken and training goes on. Loss spikes never are.
    # 0 = never.
    t.spike_patience = 4
    # After rewind_after consecutive skipped steps, restart from the newest checkpoint a later healthy
    # step vouched for and skip the rewind_skip_batches batches that follow it (PaLM); 0 = never rewind.
    t.rewind_after = 0
    t.rewind_skip_batches = 0
    t.max_rewinds = 3
    # Batch-size ramp-up, Megatron's --rampup-batch-size START INCREMENT SAMPLES: the global batch starts
    # at rampup_batch_start and grows by rampup_batch_increment sequences every
    # rampup_samples / ((global_batch_size - start) / increment) samples. 0 = off. Under a ramp the
    # learning-rate schedule runs on consumed samples (optimizer.warmup_steps and train.steps count
    # batches of the full global_batch_size).
    t.rampup_batch_start = 0
    t.rampup_batch_increment = 0
    t.rampup_samples = 0
    return t


def _checkpoint_defaults() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.enabled = True
    c.every_steps = 100  # save when step % every_steps == 0 (0 = never by step count)
    c.every_minutes = 0.0  # also save when this many minutes passed since the last save (0 = off)
    c.keep_last = 3  # the newest checkpoints always kept
    c.keep_every = 0  # additionally keep every checkpoint whose step is a multiple of this (0 = off)
    c.async_save = True  # write in the background; the step loop only waits for the device-to-host copy
    c.init_params = ""  # start from the parameters of this checkpoint (e.g. tools/convert_checkpoint from-hf)
    return c


def default_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.name = "default"
    config.model = _model_defaults()
    config.mesh = _mesh_defaults()
    config.data = data_defaults()
    config.optimizer = _optimizer_defaults()
    config.train = _train_defaults()
    config.checkpoint = _checkpoint_defaults()
    return config


RECIPES_DIR = Path(__file__).resolve().parents[1] / "configs"


def load_recipe(path_or_name: str | Path) -> ml_collections.ConfigDict:
    """`get_config()` of a recipe file; a bare name such as "tiny" means configs/tiny.py of this checkout."""
    path = Path(path_or_name)
    if path.suffix != ".py":
        path = RECIPES_DIR / f"{path_or_name}.py"
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; expected a recipe such as configs/tiny.py")
    spec = importlib.util.spec_from_file_location(f"plamo_recipe_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path} has no get_config() function")
    return module.get_config()


def finalize(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Lock a recipe so unknown keys in overrides fail loudly."""
    config.lock()
    return config


def mesh_rules(config: ml_collections.ConfigDict) -> dict[str, tuple[str, ...] | None]:
    """The logical-axis rules table with the config's `mesh.rules` entries applied."""
    overrides = {
        name: tuple(a for a in str(value).split(",") if a) for name, value in config.mesh.rules.items()
    }
    return merge_rules(overrides)


def _require(condition: bool, key: str, value, expected: str) -> None:
    if not condition:
        raise ConfigError(f"config key {key}={value!r}: expected {expected}")


def mesh_sizes(config: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
    """Devices along each mesh axis (ICI x DCN) for `num_devices`; ConfigError when they cannot work."""
    ici, dcn = resolve_axis_sizes(config.mesh, num_devices)
    return {axis: ici[axis] * dcn[axis] for axis in ici}


def validate_config(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """Fail at start, naming the key, its value and what was expected, for configs that cannot work.

    The model keys are checked by the family's spec; the objective's and data keys by
    `plamo_jax.train.run.validate`, which calls this first.
    """
    m, t = config.model, config.train
    size = mesh_sizes(config, num_devices)
    registry.validate_model(m, size)
    _require(m.remat in REMAT_POLICIES, "model.remat", m.remat, f"one of {sorted(REMAT_POLICIES)}")
    _require(
        m.dtype in ("float32", "bfloat16", "float16"), "model.dtype", m.dtype, "float32, bfloat16 or float16"
    )
    _require(m.attention_impl in ATTENTION_IMPLS, "model.attention_impl", m.attention_impl,
             f"one of {ATTENTION_IMPLS}")
    reason = {"cudnn": lambda: cudnn_unsupported(m.dtype, m.head_dim),
              "splash": lambda: splash_unsupported(m.dtype, t.seq_len, m.attention_block)}.get(
        m.attention_impl, lambda: None)()
    _require(reason is None, "model.attention_impl", m.attention_impl,
             f"auto, dense or flash for these shapes ({reason})")
    _require(m.attention_block > 0, "model.attention_block", m.attention_block, "a positive block length")
    _require(m.context_parallel in CONTEXT_STRATEGIES, "model.context_parallel", m.context_parallel,
             f"one of {CONTEXT_STRATEGIES}")
    if m.context_parallel == "ulysses":
        _validate_ulysses(m, size)
    _require(t.microbatches >= 1, "train.microbatches", t.microbatches, "an integer >= 1")
    _require(
        t.global_batch_size % t.microbatches == 0,
        "train.global_batch_size",
        t.global_batch_size,
        f"divisible by train.microbatches={t.microbatches}",
    )
    batch_shards = size["data"] * size["fsdp"] * size["expert"]
    microbatch = t.global_batch_size // t.microbatches
    _require(
        microbatch > 0 and microbatch % batch_shards == 0,
        "train.global_batch_size",
        t.global_batch_size,
        f"a microbatch ({microbatch} sequences) divisible by data x fsdp x expert = {batch_shards}",
    )
    _require(t.seq_len > 0, "train.seq_len", t.seq_len, "a positive length")
    _require(t.loss_chunk == 0 or (t.loss_chunk > 0 and t.seq_len % t.loss_chunk == 0), "train.loss_chunk",
             t.loss_chunk, f"0 or a positive divisor of train.seq_len={t.seq_len}")
    _validate_pipeline(config, size, microbatch, batch_shards)
    sequence_chunks = size["sequence"] * (2 if context.load_balanced(m, size["sequence"]) else 1)
    _require(
        t.seq_len % sequence_chunks == 0,
        "train.seq_len",
        t.seq_len,
        f"divisible by {sequence_chunks} (mesh.sequence={size['sequence']}"
        + (", x 2 chunks per shard for model.context_load_balance)"
           if sequence_chunks > size["sequence"] else ")"),
    )
    _require(t.steps > 0, "train.steps", t.steps, "a positive number of steps")
    _require(t.log_every > 0, "train.log_every", t.log_every, "a positive number of steps")
    _require(bool(t.output_dir), "train.output_dir", t.output_dir, "a directory for checkpoints and metrics")
    _require(t.max_bad_steps >= 1, "train.max_bad_steps", t.max_bad_steps, "at least 1")
    _require(t.spike_sigma >= 0, "train.spike_sigma", t.spike_sigma, ">= 0 (0 = no spike test)")
    _require(t.spike_window >= 2, "train.spike_window", t.spike_window, "at least 2 steps")
    _require(t.spike_warmup >= 2, "train.spike_warmup", t.spike_warmup, "at least 2 steps")
    _require(t.spike_patience >= 0, "train.spike_patience", t.spike_patience, ">= 0 steps")
    for key in ("rewind_after", "rewind_skip_batches", "max_rewinds"):
        _require(t[key] >= 0, f"train.{key}", t[key], ">= 0")
    _require(t.rewind_after == 0 or t.rewind_after < t.max_bad_steps, "train.rewind_after", t.rewind_after,
             f"0 or fewer than train.max_bad_steps={t.max_bad_steps} (a rewind must come before the stop)")
    o = config.optimizer
    _require(o.learning_rate >= 0, "optimizer.learning_rate", o.learning_rate, ">= 0")
    _require(o.warmup_steps >= 0, "optimizer.warmup_steps", o.warmup_steps, ">= 0")
    _require(0 <= o.min_lr_ratio <= 1, "optimizer.min_lr_ratio", o.min_lr_ratio, "in [0, 1]")
    _require(o.clip_norm >= 0, "optimizer.clip_norm", o.clip_norm, ">= 0 (0 = no clipping)")
    _require(o.weight_decay >= 0, "optimizer.weight_decay", o.weight_decay, ">= 0")
    _require(0 < o.wsd_decay_fraction <= 1, "optimizer.wsd_decay_fraction", o.wsd_decay_fraction, "in (0, 1]")
    pipeline_rows = (int(m.pipeline_microbatches) or size["stage"]) if size["stage"] > 1 else 1
    _validate_rampup(t, batch_shards * t.microbatches * pipeline_rows)
    c = config.checkpoint
    _require(c.keep_last >= 1, "checkpoint.keep_last", c.keep_last, "at least 1")
    for key in ("every_steps", "every_minutes", "keep_every"):
        _require(c[key] >= 0, f"checkpoint.{key}", c[key], ">= 0 (0 = off)")
    _require(
        config.optimizer.schedule in SCHEDULES,
        "optimizer.schedule",
        config.optimizer.schedule,
        f"one of {SCHEDULES}",
    )
    _require(
        config.optimizer.wsd_decay_shape in WSD_DECAY_SHAPES,
        "optimizer.wsd_decay_shape",
        config.optimizer.wsd_decay_shape,
        f"one of {WSD_DECAY_SHAPES}",
    )


def _validate_ulysses(m: ml_collections.ConfigDict, size: dict[str, int]) -> None:
    """Ulysses splits every device's query and key/value heads over the sequence axis."""
    head_shards = size["sequence"] * size["tensor"]
    for key in ("num_heads", "num_kv_heads"):
        _require(m[key] % head_shards == 0, f"model.{key}", m[key],
                 f"divisible by mesh.sequence x mesh.tensor = {head_shards} "
                 "(model.context_parallel='ulysses' splits each device's heads over the sequence axis)")


def _validate_pipeline(config: ml_collections.ConfigDict, size: dict[str, int], microbatch: int,
                       batch_shards: int) -> None:
    """Stages, schedule and microbatches that can work, checked at start (parallel/pipeline.py)."""
    m, stages = config.model, size[pipeline.STAGE_AXIS]
    _require(m.pipeline_schedule in pipeline.SCHEDULES, "model.pipeline_schedule", m.pipeline_schedule,
             f"one of {pipeline.SCHEDULES}")
    if stages == 1:
        return
    settings = pipeline.PipelineSettings.from_config(m)
    plan = settings.plan(registry.get_family(m).num_blocks(m), stages, m.num_layers)
    rules = mesh_rules(config)
    pipeline.validate_rules(rules, stages)
    vocab_shards = size["tensor"] * stages
    split_vocab = pipeline.STAGE_AXIS in (rules["vocab"] or ())
    _require(not split_vocab or m.vocab_size % vocab_shards == 0, "model.vocab_size", m.vocab_size,
             f"divisible by mesh.tensor x mesh.stage = {vocab_shards} (the stages split the "
             "embedding and the LM head)")
    rows = plan.microbatches * batch_shards
    _require(microbatch % rows == 0, "train.global_batch_size", config.train.global_batch_size,
             f"microbatches of {microbatch} sequences divisible by model.pipeline_microbatches x "
             f"(data x fsdp x expert) = {plan.microbatches} x {batch_shards}")


def _validate_rampup(t: ml_collections.ConfigDict, batch_multiple: int) -> None:
    """Every batch of a ramp must split over microbatches and batch shards like the full batch."""
    keys = (t.rampup_batch_start, t.rampup_batch_increment, t.rampup_samples)
    if not any(keys):
        return
    _require(all(k > 0 for k in keys), "train.rampup_batch_start", keys,
             "rampup_batch_start, rampup_batch_increment and rampup_samples all > 0 (or all 0: no ramp)")
    _require(t.rampup_batch_start < t.global_batch_size, "train.rampup_batch_start", t.rampup_batch_start,
             f"less than train.global_batch_size={t.global_batch_size}")
    growth = t.global_batch_size - t.rampup_batch_start
    _require(growth % t.rampup_batch_increment == 0, "train.rampup_batch_increment", t.rampup_batch_increment,
             f"a divisor of global_batch_size - rampup_batch_start = {growth}")
    for key in ("rampup_batch_start", "rampup_batch_increment"):
        _require(t[key] % batch_multiple == 0, f"train.{key}", t[key],
                 f"a multiple of train.microbatches x (data x fsdp x expert) = {batch_multiple}")
