"""Opt-in allocation tracing of a coordinator process, to find memory that grows with rounds.

``SECFED_TRACEMALLOC=DIR`` in the environment of ``secfed aggregate`` starts :mod:`tracemalloc`
at start-up; every SIGUSR1 and the process's end write ``DIR/tracemalloc-<pid>-<n>.txt``: the
top allocation sites (file:line) and, from the second dump on, the growth of each since the
first dump (a baseline taken after warm-up: send SIGUSR1 then, and again later). Text only --
file names, line numbers, sizes and counts, never an allocated value. Off (no cost) without the
variable.
"""

from __future__ import annotations

import os
import tracemalloc
from pathlib import Path

__all__ = ["ENV_VAR", "MemTrace"]

ENV_VAR = "SECFED_TRACEMALLOC"
TOP = 40  # allocation sites listed per dump
FRAMES = 1  # file:line of the allocating frame (deeper traces cost much more memory)


class MemTrace:
    """Allocation dumps to a folder (see the module docstring); None from :meth:`from_env`
    when the variable is not set."""

    def __init__(self, out: Path):
        self.out = out
        self.out.mkdir(parents=True, exist_ok=True)
        self._baseline: tracemalloc.Snapshot | None = None
        self._n = 0
        if not tracemalloc.is_tracing():
            tracemalloc.start(FRAMES)

    @classmethod
    def from_env(cls) -> MemTrace | None:
        where = os.environ.get(ENV_VAR)
        return cls(Path(where)) if where else None

    def dump(self) -> Path:
        """Write one dump now; the first one is the baseline later dumps compare to."""
        snap = tracemalloc.take_snapshot().filter_traces(
            (tracemalloc.Filter(False, tracemalloc.__file__),))
        self._n += 1
        lines = [f"traced now {tracemalloc.get_traced_memory()[0]} B; "
                 f"peak {tracemalloc.get_traced_memory()[1]} B"]
        lines += ["", f"top {TOP} by size:"] + [str(s) for s in snap.statistics("lineno")[:TOP]]
        if self._baseline is None:
            self._baseline = snap
        else:
            lines += ["", f"top {TOP} growth since dump 1:"]
            lines += [str(s) for s in snap.compare_to(self._baseline, "lineno")[:TOP]]
        path = self.out / f"tracemalloc-{os.getpid()}-{self._n}.txt"
        path.write_text("\n".join(lines) + "\n")
        return path
