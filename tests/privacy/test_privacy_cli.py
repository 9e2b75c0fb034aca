"""``secfed budget status`` over a real ledger: text, JSON, pinned keys, failure verdicts."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner

from secfed.cli.main import cli
from secfed.crypto.keys import IdentityKey
from secfed.privacy import DPSGDEvent, Ledger, compose_epsilon

EVENT = DPSGDEvent(noise_multiplier=1.2, sample_rate=0.02, steps=100)


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, IdentityKey]:
    key = IdentityKey.generate()
    path = tmp_path / "ledger.sqlite"
    with Ledger.open(path, enterprise_id="acme", identity=key, budget_epsilon=8.0, delta=1e-5,
                     create=True) as ledger:
        for r in range(3):
            ledger.charge(round_number=r, session_id=bytes([r]) * 32, event=EVENT)
    return path, key


def test_status_json_reports_the_verified_figures(setup: tuple[Path, IdentityKey]) -> None:
    path, key = setup
    result = CliRunner().invoke(cli, ["budget", "status", "--ledger", str(path), "--identity",
                                      key.public_bytes().hex(), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["verified"] and data["key_pinned"] and data["entries"] == 3
    assert data["rounds"] == [0, 1, 2] and data["budget"] == 8.0 and data["delta"] == 1e-5
    assert data["spent_rdp"] == pytest.approx(compose_epsilon([EVENT] * 3, delta=1e-5, accountant="rdp"))
    assert data["spent_prv"] == pytest.approx(compose_epsilon([EVENT] * 3, delta=1e-5, accountant="prv"))
    assert data["remaining"] == pytest.approx(8.0 - data["spent_rdp"])


def test_status_text_and_key_files(setup: tuple[Path, IdentityKey], tmp_path: Path) -> None:
    path, key = setup
    pem = tmp_path / "id.pem"
    pem.write_bytes(key.to_pem())
    hexfile = tmp_path / "id.hex"
    hexfile.write_text(key.public_bytes().hex() + "\n")
    for ident in (str(pem), str(hexfile)):
        result = CliRunner().invoke(cli, ["budget", "status", "--ledger", str(path), "--identity", ident])
        assert result.exit_code == 0, result.output
        assert "verdict     OK: 3 entries" in result.output and "pinned key" in result.output
    result = CliRunner().invoke(cli, ["budget", "status", "--ledger", str(path), "--fast"])
    assert result.exit_code == 0 and "NOT pinned" in result.output


def test_status_fails_naming_the_entry(setup: tuple[Path, IdentityKey]) -> None:
    path, key = setup
    conn = sqlite3.connect(path)
    conn.executescript("DROP TRIGGER entries_no_update;")
    conn.execute("UPDATE entries SET eps_rdp = eps_rdp / 2 WHERE idx = 2")
    conn.commit()
    conn.close()
    result = CliRunner().invoke(cli, ["budget", "status", "--ledger", str(path), "--identity",
                                      key.public_bytes().hex(), "--json"])
    assert result.exit_code == 1
    data = json.loads(result.output)
    assert data["verified"] is False and data["failed_entry"] == 2
    other = IdentityKey.generate().public_bytes().hex()
    result = CliRunner().invoke(cli, ["budget", "status", "--ledger", str(path), "--identity", other])
    assert result.exit_code == 1 and "FAILED" in result.output


def test_status_bad_identity_is_one_error_line(setup: tuple[Path, IdentityKey]) -> None:
    path, _ = setup
    result = CliRunner().invoke(cli, ["budget", "status", "--ledger", str(path), "--identity", "zz"])
    assert result.exit_code == 1 and "--identity must be" in result.output
