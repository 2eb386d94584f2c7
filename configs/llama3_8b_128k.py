"""Llama-3-8B (configs/llama3_8b.py) at 131,072 tokens per sequence: long-context training with context
parallelism (the sequence sharded 8 ways, key/value blocks passed around a ring, no [L, L] scores).

Memory (tools/estimate_memory.py --devices 64 --device h100: sequence=8 x fsdp=8, one 16,384-token
shard of one sequence per device per microbatch, full remat): 33.84 GiB per device, 42% of 80 GiB,
under the 80% rule (64.0 GiB), the LM head and loss phase the larger (the ring's block in flight, its
fp32 dK/dV and the flash kernel's 512 x 512 temporaries, in the block phase, are 0.69 GiB).
The TPU compiler (tools/aot_compile.py --topology v5p:4x4x8 --config.train.microbatches=2: fsdp=16 x
sequence=8, the same sequence per chip per microbatch; 103 s to compile here) peaks at 24.29 GiB per
chip (26% of 95 GiB) against an estimate of 24.49 GiB (1.01).
"""

from plamo_jax.configuration import load_recipe


def get_config():
    config = load_recipe("llama3_8b")
    config.name = "llama3_8b_128k"
    m = config.model
    m.attention_impl = "flash"  # what context parallelism runs anyway; also the path without it
    m.context_parallel = "ring"  # keys/values never gathered: 2 blocks of 16k tokens per device
    m.context_load_balance = True  # causal work equal on every shard (chunks r and 15 - r)
    m.remat = "full"
    config.mesh.data, config.mesh.sequence, config.mesh.fsdp = 1, 8, -1
    config.train.seq_len = 131072
    config.train.global_batch_size = 32  # 4.2M tokens per step, as llama3_8b's 512 x 8192
    config.train.microbatches = 4  # one sequence per FSDP shard per microbatch on 64 devices
    config.train.output_dir = "runs/llama3_8b_128k"
    return config
