"""Read-only access to the SQLite files secfed writes (ledgers, state, outbound logs).

A shared leaf (no secfed imports but the error family): the audit and the ledger readers open
files the same way, so a path with ``?``, ``#`` or ``%`` in it names the same file in both.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from secfed.errors import SecfedError


@contextmanager
def open_readonly(path: Path, what: str, error: type[SecfedError]) -> Iterator[sqlite3.Connection]:
    """A read-only connection to the SQLite file at ``path``, closed on exit.

    ``what`` names the file in messages (e.g. ``"ledger"``); ``error`` is the layer's error type.

    Raises:
        error: the file is missing, cannot be opened read-only, or is not an SQLite database.
    """
    if not path.is_file():
        raise error(f"{what} must be an existing SQLite file (got {str(path)!r}: it does not exist "
                    "or is not a file)")
    try:
        # as_uri() percent-encodes the path: '?', '#' and '%' in a folder name stay literal
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise error(f"{what} {str(path)!r} cannot be opened read-only: {exc}") from exc
    try:
        yield conn
    except sqlite3.DatabaseError as exc:
        raise error(f"{what} {str(path)!r} is not a readable SQLite database: {exc}") from exc
    finally:
        conn.close()
