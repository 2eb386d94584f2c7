"""The 100B-class dense model (configs/plamo_100b_like.py) on 512 H100s with the pipeline across nodes.

stage=4 x fsdp=16 x tensor=8: tensor parallelism inside each 8-GPU node (NVLink), FSDP over the 16 nodes
of a stage, and 4 pipeline stages of 28 layers each, one after another over InfiniBand: between stages
only activations at the stage boundaries move, and FSDP's weight gathers stay inside a stage's 16 nodes
instead of spanning all 64. The circular schedule (2 repeats: each stage holds layers 14s..14s+13 and
56+14s..56+14s+13) with 16 microbatches of 4 sequences (4 rows per FSDP shard): bubble 3 / 35 = 8.6%.
Memory (tools/estimate_memory.py --devices 512 --device h100): 30.89 GiB per device, 39% of 80 GiB, under
the 80% rule, with model.pipeline_remat_iterations (every block's input over the 35 iterations would
be 122.5 GiB; the stage inputs are 8.75 GiB). The stream of 16 microbatches and its cotangent: 8.75 GiB.
The LM head and loss run after the pipeline on all 64 sequences of a shard at once, 512 positions at a
time (train.loss_chunk; all at once their logits would add 6.7 GiB).
"""

from plamo_jax.configuration import load_recipe


def get_config():
    config = load_recipe("plamo_100b_like")
    config.name = "plamo_100b_like_pipeline"
    config.mesh.stage, config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 4, 1, -1, 8
    config.model.pipeline_schedule = "circular"
    config.model.pipeline_repeats = 2
    config.model.pipeline_microbatches = 16
    # keep only stage inputs across the 35 iterations (8.75 GiB) instead of every block's (122.5 GiB)
    config.model.pipeline_remat_iterations = True
    config.train.microbatches = 1
    # the LM head and loss run after the pipeline on all 64 sequences of a shard: 512 positions at a time
    config.train.loss_chunk = 512
    config.train.output_dir = "runs/plamo_100b_like_pipeline"
    return config
