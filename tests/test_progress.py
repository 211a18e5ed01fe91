"""Progress bars: on stderr only, and off when stderr is not a terminal or when asked."""

from __future__ import annotations

import io

from lowbit import progress as progress_module
from lowbit.progress import progress, progress_enabled


class _FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_disabled_when_stderr_is_not_a_terminal(monkeypatch):
    monkeypatch.delenv("LOWBIT_NO_PROGRESS", raising=False)
    monkeypatch.setattr(progress_module.sys, "stderr", io.StringIO())
    assert not progress_enabled()


def test_enabled_on_a_terminal_unless_the_environment_says_no(monkeypatch):
    monkeypatch.setattr(progress_module.sys, "stderr", _FakeTerminal())
    monkeypatch.delenv("LOWBIT_NO_PROGRESS", raising=False)
    assert progress_enabled()
    monkeypatch.setenv("LOWBIT_NO_PROGRESS", "1")
    assert not progress_enabled()
    monkeypatch.setenv("LOWBIT_NO_PROGRESS", "0")
    assert progress_enabled()


def test_bar_writes_to_stderr_only(monkeypatch, capsys):
    terminal = _FakeTerminal()
    monkeypatch.setattr(progress_module.sys, "stderr", terminal)
    monkeypatch.delenv("LOWBIT_NO_PROGRESS", raising=False)
    assert list(progress(range(5), desc="counting")) == [0, 1, 2, 3, 4]
    assert "counting" in terminal.getvalue()
    assert capsys.readouterr().out == ""


def test_disabled_bar_still_iterates_and_prints_nothing(monkeypatch):
    quiet = io.StringIO()
    monkeypatch.setattr(progress_module.sys, "stderr", quiet)
    with progress(total=3, desc="steps") as bar:
        for _ in range(3):
            bar.update(1)
    assert list(progress([1, 2], disable=True)) == [1, 2]
    assert quiet.getvalue() == ""
