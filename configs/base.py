"""Defaults for every key (the schema lives in plamo_jax.configuration); other recipes start here."""

from plamo_jax.configuration import default_config, finalize


def get_config():
    return finalize(default_config())
