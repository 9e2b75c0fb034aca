"""Progress on long work: a rich bar on a terminal, one plain line per step otherwise.

Everything goes to **stderr**, so a command's ``--json`` document (or event lines) stays the
only thing on stdout. Any layer may import this module (it imports nothing of secfed).

Use::

    from secfed import progress

    progress.step("loading the model")                  # one line, both modes
    with progress.task("tower features", total=n) as bar:
        for batch in batches:
            ...
            bar.advance()                               # or bar.advance(k)
    for item in progress.track(items, "checking records"):
        ...

Modes (:func:`configure`, or the ``SECFED_PROGRESS`` environment variable, which wins):

* ``auto`` (default): ``rich`` when stderr is a terminal, else ``plain``;
* ``rich``: live bars and styled step lines on stderr;
* ``plain``: one line per step; a task prints a line when it starts, when it ends (with its
  time) and in between at most once per tenth of its total (every advance when the total is
  20 or less), so a log stays short;
* ``off``: nothing.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO, TypeVar

__all__ = ["configure", "mode", "quiet_libraries", "step", "task", "track", "Task"]

MODES = ("auto", "rich", "plain", "off")
ENV = "SECFED_PROGRESS"
# a plain-mode task prints every advance up to this total, else once per tenth of it
_EVERY_STEP_UP_TO = 20

_T = TypeVar("_T")
_lock = threading.RLock()
_state: dict[str, Any] = {"mode": "auto", "stream": None, "live": None, "open": 0}


def configure(mode: str = "auto", *, stream: TextIO | None = None) -> None:
    """Choose how progress is shown (the CLI calls this once; tests pass a ``stream``).

    Raises:
        ValueError: ``mode`` is not one of ``auto``, ``rich``, ``plain``, ``off``.
    """
    if mode not in MODES:
        raise ValueError(f"progress mode must be one of {', '.join(MODES)} (got {mode!r})")
    with _lock:
        _state["mode"], _state["stream"] = mode, stream


def _stream() -> TextIO:
    return _state["stream"] or sys.stderr


def mode() -> str:
    """The mode in effect: ``rich``, ``plain`` or ``off`` (``auto`` resolved)."""
    chosen = os.environ.get(ENV) or _state["mode"]
    if chosen not in MODES:
        chosen = "auto"
    if chosen != "auto":
        return str(chosen)
    stream = _stream()
    tty = bool(getattr(stream, "isatty", lambda: False)()) and os.environ.get("TERM") != "dumb"
    return "rich" if tty else "plain"


def quiet_libraries() -> None:
    """Silence third-party progress bars (transformers' weight loading, hub downloads).

    Sets the environment switch for later imports and, if transformers is already imported,
    turns its bars off too: secfed shows its own progress instead.
    """
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def _console() -> Any:
    from rich.console import Console

    live = _state["live"]
    return live.console if live is not None else Console(file=_stream(), highlight=False)


def step(message: str) -> None:
    """Say that a step starts or ended: one line on stderr (none in ``off`` mode)."""
    current = mode()
    if current == "off":
        return
    with _lock:
        if current == "rich":
            _console().print(f"[dim]secfed:[/dim] {message}", markup=True, highlight=False)
        else:
            print(f"secfed: {message}", file=_stream(), flush=True)


class Task:
    """One counted piece of work; :func:`task` makes it, ``advance`` moves it on."""

    def __init__(self, description: str, total: int | None, current: str) -> None:
        self.description, self.total, self.done = description, total, 0
        self._mode, self._started = current, time.monotonic()
        self._printed_tenth = 0
        self._rich_id: Any = None

    def advance(self, amount: int = 1) -> None:
        """Count ``amount`` more units of work done."""
        with _lock:
            self.done += amount
            if self._mode == "rich" and _state["live"] is not None:
                _state["live"].advance(self._rich_id, amount)
            elif self._mode == "plain" and self.total:
                self._plain_line()

    def _plain_line(self) -> None:
        assert self.total
        if self.done >= self.total:
            return  # the closing line says it
        if self.total > _EVERY_STEP_UP_TO:
            tenth = self.done * 10 // self.total
            if tenth <= self._printed_tenth:
                return
            self._printed_tenth = tenth
        print(f"secfed: {self.description}: {self.done}/{self.total}", file=_stream(), flush=True)

    def _finish(self, failed: bool) -> None:
        if self._mode != "plain":
            return
        took = time.monotonic() - self._started
        count = f"{self.done}/{self.total}" if self.total else f"{self.done}"
        verb = "stopped at" if failed else "done,"
        print(f"secfed: {self.description}: {verb} {count} in {took:.1f} s", file=_stream(),
              flush=True)


@contextmanager
def task(description: str, *, total: int | None = None, plain: bool = True) -> Iterator[Task]:
    """A counted piece of work shown as a bar (rich) or a few lines (plain) on stderr.

    ``total`` may be ``None`` when the amount is unknown (a spinner / a start and end line).
    ``plain=False``: a detail bar inside a bigger task (e.g. rounds within one row of a
    table), shown on a terminal only, so a log gets no line for it.
    """
    current = mode()
    if current == "plain" and not plain:
        current = "off"
    job = Task(description, total, current)
    if current == "rich":
        _open_rich(job)
    elif current == "plain":
        size = f" ({total})" if total else ""
        print(f"secfed: {description}{size}: started", file=_stream(), flush=True)
    failed = True
    try:
        yield job
        failed = False
    finally:
        job._finish(failed)
        if current == "rich":
            _close_rich(job)


def track(items: Iterable[_T], description: str, *, total: int | None = None,
          plain: bool = True) -> Iterator[_T]:
    """Iterate over ``items`` inside a :func:`task`, advancing once per item."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with task(description, total=total, plain=plain) as bar:
        for item in items:
            yield item
            bar.advance()


def _open_rich(job: Task) -> None:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    with _lock:
        if _state["live"] is None:
            # stdout goes through the bar's console only when it is the same terminal (lines
            # then print above the bar); piped or redirected, it is never touched, so a --json
            # document stays on stdout as it is
            same_terminal = _state["stream"] is None and sys.stdout.isatty()
            _state["live"] = Progress(
                SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                MofNCompleteColumn(), TimeElapsedColumn(),
                console=Console(file=_stream(), highlight=False),
                redirect_stdout=same_terminal, redirect_stderr=False,
            )
            _state["live"].start()
        _state["open"] += 1
        job._rich_id = _state["live"].add_task(job.description, total=job.total)


def _close_rich(job: Task) -> None:
    with _lock:
        live = _state["live"]
        if live is None:
            return
        if job.total is None:
            live.update(job._rich_id, total=job.done or 1, completed=job.done or 1)
        live.stop_task(job._rich_id)
        _state["open"] -= 1
        if _state["open"] == 0:
            live.stop()
            _state["live"] = None
