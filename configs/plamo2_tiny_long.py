"""Long-context continual pre-training of configs/plamo2_tiny.py, the PLaMo 2 way: 4x the length
(512 tokens instead of 128), the sliding-window attention layers turned into full attention, flash
attention, and context parallelism (the sequence sharded 4 ways, key/value blocks passed around a ring).

    python launch/train.py --config configs/plamo2_tiny.py        # runs/plamo2_tiny
    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
        python launch/train.py --config configs/plamo2_tiny_long.py \
        [--config.checkpoint.init_params=<plamo2_tiny checkpoint>]  # runs/plamo2_tiny_long

`checkpoint.init_params` (default: the newest step of runs/plamo2_tiny) is any plamo2_tiny checkpoint,
a training run's root or one step's directory; only its parameters are read (fresh optimizer, step 0).
The window change is accepted and logged (`model.attention_window=0 differs from the checkpoint's 64`);
any other architecture difference is refused by name. The mesh is sequence=4 x data (the remaining
devices: 2 of 8 simulated CPU devices; `--config.mesh.sequence=1` runs on one device). Tokens per step
are the pre-training run's (4 x 512 = 16 x 128); 20 steps at a tenth of pre-training's peak learning
rate after a short warmup: a short continuation of an already trained model (on the ~33K-token bundled
corpus, 100 steps at 1e-3 raise the held-out loss by 0.25 nats; the same at 128 tokens, by 0.21).
"""

from plamo_jax.configuration import load_recipe

PRETRAINING_SEQ_LEN = 128  # configs/plamo2_tiny.py


def get_config():
    config = load_recipe("plamo2_tiny")
    config.name = "plamo2_tiny_long"
    m = config.model
    m.attention_window = 0  # every attention layer full (plamo2_tiny: window 64 except layer 3)
    m.full_attention_layers = (3,)  # kept as saved: with no window it changes nothing
    m.attention_impl = "flash"
    m.attention_block = 128  # blocks of the flash kernel; under the ring at most a shard's chunk
    m.context_parallel = "ring"
    m.context_load_balance = True
    config.mesh.sequence = 4
    config.mesh.data = -1
    t = config.train
    t.seq_len = 4 * PRETRAINING_SEQ_LEN
    t.global_batch_size = 4
    t.steps = 20  # ~1.2 epochs of the bundled corpus; longer continuations overfit it (see README)
    t.output_dir = "runs/plamo2_tiny_long"
    config.checkpoint.init_params = "runs/plamo2_tiny/checkpoints"
    o = config.optimizer
    o.learning_rate = 3e-4  # a tenth of pre-training's peak, cosine to a tenth of that
    o.warmup_steps = 5
    return config
