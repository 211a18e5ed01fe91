"""The `lowbit` command line: subcommand listing, exit codes and error reporting."""

from __future__ import annotations

import os
import subprocess
import sys
import types

import pytest

from lowbit import __version__, cli
from lowbit.errors import LowbitError


def _run_module(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, LOWBIT_NO_PROGRESS="1")
    return subprocess.run([sys.executable, "-m", "lowbit", *args], capture_output=True, text=True,
                          env=env, timeout=120)


def test_help_lists_every_subcommand_and_exits_zero(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert name in out


def test_help_through_python_dash_m():
    done = _run_module("--help")
    assert done.returncode == 0
    assert "demo" in done.stdout and "usage: lowbit" in done.stdout


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"lowbit {__version__}"


def test_unknown_subcommand_exits_two(capsys):
    assert cli.main(["frobnicate"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_missing_subcommand_exits_two(capsys):
    assert cli.main([]) == 2
    assert "required" in capsys.readouterr().err


def test_unknown_subcommand_through_python_dash_m():
    done = _run_module("frobnicate")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr


def test_user_error_in_a_command_is_one_line_without_traceback(tmp_path):
    # The demo refuses a --json path whose folder is missing, before it trains anything.
    missing = tmp_path / "no-such-folder" / "out.json"
    done = _run_module("demo", "--json", str(missing))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("lowbit: error: ") and "does not exist" in lines[0]
    assert "Traceback" not in done.stderr
    assert done.stdout == ""
    assert not missing.parent.exists()


def test_bad_epochs_is_a_user_error(capsys):
    assert cli.main(["demo", "--epochs", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lowbit: error: --epochs must be at least 1") and err.count("\n") == 1


@pytest.fixture
def fake_command(monkeypatch):
    """Register a subcommand `boom` whose run() raises whatever the test puts in `raise_this`."""
    module = types.ModuleType("lowbit.commands.boom")
    module.raise_this = None

    def add_parser(subparsers):
        return subparsers.add_parser("boom", help="raise an exception (test only)")

    def run(args):
        if module.raise_this is not None:
            raise module.raise_this
        return 7

    module.add_parser, module.run = add_parser, run
    monkeypatch.setitem(sys.modules, "lowbit.commands.boom", module)
    monkeypatch.setattr(cli, "COMMANDS", cli.COMMANDS + ["boom"])
    return module


def test_command_return_value_is_the_exit_code(fake_command):
    assert cli.main(["boom"]) == 7


def test_lowbit_error_message_is_folded_to_one_line(fake_command, capsys):
    fake_command.raise_this = LowbitError("model.onnx is not a model;\n  pass an .onnx file")
    assert cli.main(["boom"]) == 2
    captured = capsys.readouterr()
    assert captured.err == "lowbit: error: model.onnx is not a model; pass an .onnx file\n"
    assert captured.out == ""


def test_keyboard_interrupt_exits_130(fake_command, capsys):
    fake_command.raise_this = KeyboardInterrupt()
    assert cli.main(["boom"]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_internal_errors_keep_their_traceback(fake_command):
    fake_command.raise_this = RuntimeError("a bug in lowbit")
    with pytest.raises(RuntimeError, match="a bug in lowbit"):
        cli.main(["boom"])
