"""secfed.progress: rich bars on a terminal, a few plain lines otherwise, always on stderr."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest

from secfed import progress


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _reset(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(progress.ENV, raising=False)
    monkeypatch.setenv("TERM", "xterm")
    yield
    progress.configure("auto")


def test_auto_is_plain_off_a_terminal_and_rich_on_one(monkeypatch: pytest.MonkeyPatch) -> None:
    progress.configure("auto", stream=io.StringIO())
    assert progress.mode() == "plain"
    progress.configure("auto", stream=_Tty())
    assert progress.mode() == "rich"
    monkeypatch.setenv("TERM", "dumb")
    assert progress.mode() == "plain"
    monkeypatch.setenv(progress.ENV, "off")  # the environment wins
    assert progress.mode() == "off"
    with pytest.raises(ValueError, match="progress mode must be one of"):
        progress.configure("loud")


def test_plain_small_task_prints_one_line_per_step() -> None:
    out = io.StringIO()
    progress.configure("plain", stream=out)
    progress.step("loading the model")
    for _ in progress.track(range(3), "rounds"):
        pass
    lines = out.getvalue().splitlines()
    assert lines[0] == "secfed: loading the model"
    assert lines[1] == "secfed: rounds (3): started"
    assert lines[2:4] == ["secfed: rounds: 1/3", "secfed: rounds: 2/3"]
    assert lines[4].startswith("secfed: rounds: done, 3/3 in ") and lines[4].endswith(" s")
    assert len(lines) == 5


def test_plain_long_task_prints_about_ten_lines_not_one_per_item() -> None:
    out = io.StringIO()
    progress.configure("plain", stream=out)
    with progress.task("tower features", total=1000) as bar:
        for _ in range(1000):
            bar.advance()
    lines = out.getvalue().splitlines()
    assert 10 <= len(lines) <= 12, lines  # start, 9 tenths, done
    assert lines[1] == "secfed: tower features: 100/1000"


def test_plain_task_that_raises_says_where_it_stopped() -> None:
    out = io.StringIO()
    progress.configure("plain", stream=out)
    with pytest.raises(RuntimeError), progress.task("check", total=5) as bar:
        bar.advance(2)
        raise RuntimeError("boom")
    assert out.getvalue().splitlines()[-1].startswith("secfed: check: stopped at 2/5 in ")


def test_rich_mode_draws_a_bar_and_off_mode_prints_nothing() -> None:
    out = _Tty()
    progress.configure("rich", stream=out)
    with progress.task("features", total=4) as bar:
        bar.advance(4)
    progress.step("trained")
    text = out.getvalue()
    assert "features" in text and "4/4" in text and "trained" in text
    quiet = io.StringIO()
    progress.configure("off", stream=quiet)
    progress.step("x")
    for _ in progress.track(range(3), "y"):
        pass
    assert quiet.getvalue() == ""


def test_progress_never_touches_stdout() -> None:
    """In a real process: bars and lines on stderr, stdout keeps only what the program printed."""
    code = ("from secfed import progress\n"
            "progress.configure('plain')\n"
            "progress.step('working')\n"
            "for _ in progress.track(range(3), 'items'): pass\n"
            "print('{\"ok\": true}')\n")
    for forced in ("plain", "rich"):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env={**os.environ, progress.ENV: forced}, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == '{"ok": true}\n', forced
        assert "items" in proc.stderr and "working" in proc.stderr, forced


def test_quiet_libraries_turns_transformers_bars_off(monkeypatch: pytest.MonkeyPatch) -> None:
    import warnings

    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    with warnings.catch_warnings():  # the hub warns when its env switch was set at import
        warnings.simplefilter("ignore")
        hf_logging.enable_progress_bar()
        try:
            progress.quiet_libraries()
            assert not hf_logging.is_progress_bar_enabled()
            assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
        finally:
            (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()


def test_detail_task_shows_on_a_terminal_only() -> None:
    out = io.StringIO()
    progress.configure("plain", stream=out)
    for _ in progress.track(range(3), "rounds of one row", plain=False):
        pass
    assert out.getvalue() == ""
    tty = _Tty()
    progress.configure("rich", stream=tty)
    for _ in progress.track(range(3), "rounds of one row", plain=False):
        pass
    assert "rounds of one row" in tty.getvalue() and "3/3" in tty.getvalue()
