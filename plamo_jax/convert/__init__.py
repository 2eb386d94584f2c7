"""Conversion between our checkpoints and other formats: Hugging Face (hf.py and one module per
architecture) and Drop-Upcycling of dense checkpoints into MoE ones (upcycle.py)."""
