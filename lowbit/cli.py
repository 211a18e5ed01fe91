"""The `lowbit` command.

Subcommands live in `lowbit/commands/<name>.py` (see that package's docstring) and are listed in
`COMMANDS`; adding one is a new module plus one name here. `main` turns user errors
(`LowbitError`) into one line on stderr and exit code 2; any other exception is a bug in lowbit
and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from lowbit import __version__
from lowbit.errors import LowbitError

COMMANDS: list[str] = ["demo", "quantize", "inspect", "bench", "analyze", "export"]

EXIT_USER_ERROR = 2  # as argparse uses for usage errors
EXIT_INTERRUPTED = 130  # 128 + SIGINT, the shell convention


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subparser per entry of `COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="lowbit",
        description="Quantize neural networks and prove the result is smaller, faster and still right.",
    )
    parser.add_argument("--version", action="version", version=f"lowbit {__version__}")
    subparsers = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in COMMANDS:
        module = importlib.import_module(f"lowbit.commands.{name}")
        module.add_parser(subparsers).set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line with `argv` (default: sys.argv[1:]); returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help / --version exit 0, usage errors exit 2
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    try:
        return int(args._run(args) or 0)
    except LowbitError as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"lowbit: error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("lowbit: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `lowbit inspect ... | head`: the reader left; not an error
        # Point stdout at devnull so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
