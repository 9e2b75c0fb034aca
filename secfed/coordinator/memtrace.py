"""Opt-in allocation tracing of a coordinator process, to find memory that grows with rounds.

``SECFED_TRACEMALLOC=DIR`` in the environment of ``secfed aggregate`` starts :mod:`tracemalloc`
at start-up; every SIGUSR1 and the process's end write ``DIR/tracemalloc-<pid>-<n>.txt``: the
top allocation sites (file:line) and, from the second dump on, the growth of each since the
first dump (a baseline taken after warm-up: send SIGUSR1 then, and again later). Text only --
file names, line numbers, sizes and counts, never an allocated value. Off (no cost) without the
variable.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import re
import tracemalloc
from collections.abc import Callable
from pathlib import Path

__all__ = ["ENV_VAR", "TRIM_ENV_VAR", "MemTrace", "rss_kib", "trim_heap", "heap_trimmer"]

ENV_VAR = "SECFED_TRACEMALLOC"
TRIM_ENV_VAR = "SECFED_MALLOC_TRIM"  # "0": no heap trim after each round (default: trim)
TOP = 40  # allocation sites listed per dump
FRAMES = 1  # file:line of the allocating frame (deeper traces cost much more memory)


def rss_kib() -> int:
    """This process's resident memory (VmRSS, KiB); 0 where /proc is not there."""
    try:
        found = re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text())
    except OSError:
        return 0
    return int(found.group(1)) if found else 0


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None


def trim_heap() -> bool:
    """Give the C heap's free pages back to the system (glibc ``malloc_trim(0)``).

    Why: a round's buffers (uploads, masks, TLS records) are freed at its end, but glibc keeps
    freed memory in its arenas, so the coordinator's resident memory only ever climbs to the
    high-water mark of its busiest round and then creeps up with fragmentation although Python
    holds no more objects (measured: ``docs/RESULTS.md``, soak). Returns False where there is no
    glibc (then nothing happens)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def heap_trimmer() -> Callable[[dict[str, object]], None] | None:
    """An event hook that trims the heap whenever a round ends (done or aborted); None when
    ``SECFED_MALLOC_TRIM=0`` or without glibc."""
    if os.environ.get(TRIM_ENV_VAR, "1") == "0" or _malloc_trim() is None:
        return None

    def on_event(event: dict[str, object]) -> None:
        if event.get("event") in ("round_done", "round_aborted"):
            trim_heap()

    return on_event


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
                 f"peak {tracemalloc.get_traced_memory()[1]} B; VmRSS {rss_kib()} KiB"]
        lines += ["", f"top {TOP} by size:"] + [str(s) for s in snap.statistics("lineno")[:TOP]]
        if self._baseline is None:
            self._baseline = snap
        else:
            lines += ["", f"top {TOP} growth since dump 1:"]
            lines += [str(s) for s in snap.compare_to(self._baseline, "lineno")[:TOP]]
        path = self.out / f"tracemalloc-{os.getpid()}-{self._n}.txt"
        path.write_text("\n".join(lines) + "\n")
        return path
