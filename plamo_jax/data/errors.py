"""The error raised for unusable data, data configs or tokenizer files."""


class DataError(ValueError):
    """Bad data input or data config; the message names the file or key, the value and what was expected."""
