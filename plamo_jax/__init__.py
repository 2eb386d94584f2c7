"""plamo_jax: a JAX training stack for dense, hybrid state-space and mixture-of-experts LLMs."""

from plamo_jax.platforms import skip_absent_tpu

# Before any backend starts: with the `tpu` extra installed, JAX would otherwise probe for a TPU in
# every process on CPU and GPU machines (see platforms.py).
skip_absent_tpu()
