"""Llama-3-8B (configs/llama3_8b.py) with a 4-stage pipeline: stage=4 x fsdp=16 on 64 devices.

Each stage holds 8 of the 32 layers; FSDP gathers weights only among the 16 devices of its stage, and
between stages only one microbatch's activations move per iteration. `stage` is the outermost mesh axis,
so on 8 nodes of 8 GPUs each stage is 2 whole nodes (put it on mesh.dcn_stage across TPU slices).
32 pipeline microbatches of one 8192-token sequence per FSDP shard: bubble 3 / 35 = 8.6%.
Memory (tools/estimate_memory.py --devices 64 --device h100): 27.58 GiB per device, 34% of 80 GiB, under
the 80% rule: parameters, gradients and AdamW states of one stage (2.3 GiB), every block's input over
the 35 iterations (17.5 GiB), the stream of 32 microbatches and its cotangent (4.2 GiB), the LM head
and loss phase (4.0 GiB). The LM head and loss run after the pipeline on all 32 sequences of a shard
at once: train.loss_chunk=256 computes them 256 positions at a time. The TPU compiler
(tools/aot_compile.py --topology v5p:4x4x4) needed 90.69 GiB of arguments + temporaries per chip
without it (fp32 logits of 262,144 tokens: 31 GiB each copy); with it, it peaks at 30.95 GiB per chip
against an estimate of 27.58 GiB (0.89).
"""

from plamo_jax.configuration import load_recipe


def get_config():
    config = load_recipe("llama3_8b")
    config.name = "llama3_8b_pipeline"
    config.mesh.stage, config.mesh.data, config.mesh.fsdp = 4, 1, -1
    config.model.pipeline_schedule = "gpipe"
    config.model.pipeline_microbatches = 32
    config.train.microbatches = 1  # the pipeline's microbatches replace gradient accumulation
    # the LM head and loss run after the pipeline on all 32 sequences: 256 positions at a time
    config.train.loss_chunk = 256
    config.train.output_dir = "runs/llama3_8b_pipeline"
    return config
