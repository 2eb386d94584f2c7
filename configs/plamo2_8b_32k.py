"""PLaMo 2 8B (configs/plamo2_8b.py) continued at 32,768 tokens per sequence, the PLaMo 2 way: every
attention layer full (no sliding window), flash attention, context parallelism over a ring.

Memory (tools/estimate_memory.py --devices 64 --device h100: sequence=4 x fsdp=16, one 8,192-token
shard of one sequence per device per microbatch, full remat): 19.96 GiB per device, 25% of 80 GiB,
under the 80% rule (64.0 GiB).
The TPU compiler (tools/aot_compile.py --topology v5p:4x4x4 --mesh sequence=4,fsdp=16, the recipe's
mesh; 438 s to compile here, loaded) peaks at 20.04 GiB per chip (21% of HBM) against an estimate of
19.71 GiB (0.98).
"""

from plamo_jax.configuration import load_recipe


def get_config():
    config = load_recipe("plamo2_8b")
    config.name = "plamo2_8b_32k"
    m = config.model
    m.attention_window = 0  # full attention in every attention layer (plamo2_8b: a 2048-token window)
    m.full_attention_layers = ()  # none needs singling out; the window stays a Python int for the ring
    m.attention_impl = "flash"
    m.context_parallel = "ring"
    m.context_load_balance = True
    m.remat = "full"
    config.mesh.data, config.mesh.sequence, config.mesh.fsdp = 1, 4, -1
    config.train.seq_len = 32768
    config.train.global_batch_size = 64  # 2.1M tokens per step, as plamo2_8b's 512 x 4096
    config.train.microbatches = 4  # one sequence per FSDP shard per microbatch on 64 devices
    config.train.output_dir = "runs/plamo2_8b_32k"
    return config
