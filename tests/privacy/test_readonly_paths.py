"""Read-only readers open the file they are given, whatever characters its folder holds
(the ledger reader once built its SQLite URI by hand: '#' cut the path, '%20' was decoded)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from secfed.crypto.keys import IdentityKey
from secfed.errors import LedgerError
from secfed.privacy import DPSGDEvent, Ledger, read_ledger
from secfed.privacy.ledger import read_ledger_meta

EVENT = DPSGDEvent(noise_multiplier=1.0, sample_rate=0.01, steps=50)


@pytest.mark.parametrize("folder", ["site #1", "what?mode=rw", "100%20 sure"])
def test_a_ledger_in_a_folder_with_uri_characters_reads_back(tmp_path: Path, folder: str) -> None:
    path = tmp_path / folder / "ledger.sqlite"
    path.parent.mkdir()
    with Ledger.open(path, enterprise_id="acme", identity=IdentityKey.generate(), delta=1e-5,
                     create=True) as ledger:
        for r in range(2):
            ledger.charge(round_number=r, session_id=os.urandom(32), event=EVENT)
    entries = read_ledger(path)
    assert [e.round_number for e in entries] == [0, 1]
    assert read_ledger_meta(path)["enterprise_id"] == "acme"


def test_a_file_that_is_not_sqlite_is_a_ledger_error(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    path.write_bytes(b"not a database, just text " * 100)
    with pytest.raises(LedgerError, match="ledger"):
        read_ledger(path)
