"""One module per `lowbit` subcommand.

Each module exposes `add_parser(subparsers) -> argparse.ArgumentParser` and
`run(args: argparse.Namespace) -> int`, and is listed by name in `lowbit.cli.COMMANDS`.
Keep heavy imports (torch, onnxruntime) inside `run`, so `lowbit --help` stays fast.
"""
