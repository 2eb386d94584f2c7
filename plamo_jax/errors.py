"""One error hierarchy for everything a user's config, data, mesh, checkpoint or model files can get wrong.

Every message names the key or file, the value found and what was expected. Entry points
(`launch/train.py`, `tools/*.py`) catch `PlamoError`, print its message on one line and exit with
status 2; anything else is a bug and keeps its traceback.
"""


class PlamoError(Exception):
    """Input a user can fix: a config value, a data file, a mesh layout, a checkpoint or a model file."""

    exit_status = 2


class ConfigError(PlamoError, ValueError):
    """A config value that cannot work."""


class DataError(PlamoError, ValueError):
    """Unusable data input, data config or tokenizer file."""


class ShardingError(ConfigError):
    """A tensor that cannot be laid out on the mesh as the rules ask."""


class CheckpointError(PlamoError, RuntimeError):
    """A checkpoint that cannot be read or written as asked."""


class IncompatibleCheckpointError(CheckpointError):
    """A readable checkpoint saved for a different model (family, parameter names or shapes differ)."""


class ConversionError(PlamoError, ValueError):
    """A model file or config that cannot be converted to or from a Hugging Face format."""


class TrainingDiverged(PlamoError, RuntimeError):
    """The guards skipped train.max_bad_steps steps in a row (or could not rewind): the run stopped."""

    exit_status = 3
