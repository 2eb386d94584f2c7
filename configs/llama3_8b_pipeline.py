"""Llama-3-8B (configs/llama3_8b.py) with a 4-stage pipeline: stage=4 x fsdp=16 on 64 devices.

Each stage holds 8 of the 32 layers; FSDP gathers weights only among the 16 devices of its stage, and
between stages only one microbatch's activations move per iteration. `stage` is the outermost mesh axis,
so on 8 nodes of 8 GPUs each stage is 2 whole nodes (put it on mesh.dcn_stage across TPU slices).
32 pipeline microbatches of one 8192-token sequence per FSDP shard: bubble 3 / 35 = 8.6%.
Memory (tools/estimate_memory.py --devices 64 --device h100): 32.49 GiB per device, 41% of 80 GiB, under
the 80% rule: parameters, gradients and AdamW states of one stage (2.3 GiB), every block's input over
the 35 iterations (17.5 GiB; model.pipeline_remat_iterations=True keeps only stage inputs: 17.67 GiB in
all, for one more forward of each stage), the stream of 32 microbatches and its cotangent (4.2 GiB).
"""

from plamo_jax.configuration import load_recipe


def get_config():
    config = load_recipe("llama3_8b")
    config.name = "llama3_8b_pipeline"
    config.mesh.stage, config.mesh.data, config.mesh.fsdp = 4, 1, -1
    config.model.pipeline_schedule = "gpipe"
    config.model.pipeline_microbatches = 32
    config.train.microbatches = 1  # the pipeline's microbatches replace gradient accumulation
    config.train.output_dir = "runs/llama3_8b_pipeline"
    return config
