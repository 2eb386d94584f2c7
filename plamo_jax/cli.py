"""What every entry point shares: one line and exit status 2 for input a user can fix, never a traceback.

    def main(args: list[str]) -> int: ...   # the arguments after the program name; may raise PlamoError

    if __name__ == "__main__":
        cli.run(main)

`ArgumentParser` reports a bad flag the same way (one line, status 2) instead of argparse's usage block.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from plamo_jax.errors import ConfigError, PlamoError

USAGE_ERROR = 2


def one_line(message: object) -> str:
    """The message with newlines folded, so a log line or a terminal shows it whole."""
    return "; ".join(part.strip() for part in str(message).splitlines() if part.strip())


def fail(message: object) -> NoReturn:
    print(f"error: {one_line(message)}", file=sys.stderr)
    sys.exit(getattr(message, "exit_status", USAGE_ERROR))


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the help text taken from the tool's docstring and one-line usage errors."""

    def __init__(self, description: str | None = None, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(description=description, **kwargs)

    def error(self, message: str) -> NoReturn:
        fail(f"{self.prog}: {message}")


def call(main: Callable[[list[str]], int | None], args: Sequence[str]) -> int:
    """`main(args)`'s exit status; a PlamoError (or a file that cannot be opened) is one line, status 2."""
    try:
        return main(list(args)) or 0
    except PlamoError as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return error.exit_status
    except OSError as error:
        if error.filename is None:
            raise  # not about a file the user named: a bug, keep the traceback
        print(f"error: {error.filename}: {error.strerror}", file=sys.stderr)
    return USAGE_ERROR


def check_recipe_flag(argv: Sequence[str]) -> None:
    """`--config FILE[:ARG]` must name an existing recipe file (absl would print a long block)."""
    for index, arg in enumerate(argv):
        value = arg.removeprefix("--config=") if arg.startswith("--config=") else (
            argv[index + 1] if arg == "--config" and index + 1 < len(argv) else None)
        if value is not None and not Path(value.split(":")[0]).is_file():
            raise ConfigError(f"--config={value}: no such recipe file; expected e.g. configs/tiny.py")


def run(main: Callable[[list[str]], int | None]) -> NoReturn:
    """Run a tool's `main` on the command line's arguments and exit with its status."""
    sys.exit(call(main, sys.argv[1:]))
