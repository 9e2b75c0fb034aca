"""Certificate lifecycle (issue 19): renew while a federation runs, revoke an enterprise, and the
one-line error an expired certificate gives. Real coordinator and join processes on loopback."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import socket
import ssl
import subprocess
from urllib.parse import urlsplit

import numpy as np
import pytest
from cryptography import x509

from e2e.harness import (
    ENV,
    PY,
    Processes,
    adapter_of,
    coordinator_db,
    expected_global,
    make_federation,
    wait_for,
)
from secfed.errors import ConfigError, TransportError
from secfed.federation.kits import EnterpriseKit
from secfed.federation.lifecycle import renew
from secfed.federation.pki import CertifiedKey, issue_client_cert, write_private_pem
from secfed.privacy import read_ledger
from secfed.transport.client import CoordinatorClient

ENTERPRISES = ["energy-utility", "security-operator", "city-ops", "transit-authority"]
DIM = 32


def _secfed(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "secfed.cli.main", *args], capture_output=True, text=True,
                          env=ENV, timeout=120, check=False)


def _address(kits) -> tuple[str, int]:
    url = urlsplit(EnterpriseKit.load(kits.enterprises[ENTERPRISES[0]]).federation.coordinator_url)
    return url.hostname or "127.0.0.1", url.port or 443


def _served_serial(kits) -> int:
    """The serial of the certificate the coordinator presents to a new connection."""
    site = kits.enterprises[ENTERPRISES[0]]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(site / "ca.pem"))
    ctx.load_cert_chain(str(site / "client.pem"), str(site / "client.key"))
    host, port = _address(kits)
    with socket.create_connection((host, port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname=host) as tls:
        der = tls.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der or b"").serial_number


def _digests(kits) -> dict[str, str]:
    """Everything renew must leave alone: identity keys, TLS keys, pins, site policies."""
    files = [kits.coordinator / n for n in ("identity.key", "server.key", "federation.toml")]
    for eid in ENTERPRISES:
        files += [kits.enterprises[eid] / n for n in
                  ("identity.pem", "client.key", "federation.toml", "site.toml")]
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def _client(kits, eid: str, **kw) -> CoordinatorClient:
    d = kits.enterprises[eid]
    return CoordinatorClient(base_url=EnterpriseKit.load(d).federation.coordinator_url,
                             cert=d / "client.pem", key=d / "client.key", ca=d / "ca.pem",
                             timeout=10.0, **kw)


def test_renew_while_a_round_runs_loses_no_round(tmp_path) -> None:
    kits = make_federation(tmp_path / "fed", enterprises=ENTERPRISES, dim=DIM,
                           schedule=("secagg",), rounds=3, stage=20.0, train=60.0)
    before = _digests(kits)
    procs = Processes(kits)
    procs.start_coordinator()
    for eid in ENTERPRISES:
        procs.start_join(eid, "--synthetic-train-s", "1.0")
    try:
        def in_round_2() -> bool:
            with coordinator_db(kits) as db:
                return db.execute("SELECT 1 FROM transcript WHERE round=2").fetchone() is not None

        assert wait_for(in_round_2, 120, period=0.01), procs.log("coordinator.0")
        old_serial = _served_serial(kits)
        done = _secfed("federation", "renew", "--kit-root", str(kits.root), "--json")
        assert done.returncode == 0, done.stderr
        renewed = json.loads(done.stdout)["renewed"]
        assert [r["party"] for r in renewed] == ["coordinator", *sorted(ENTERPRISES)]
        new_serial = x509.load_pem_x509_certificate(
            (kits.coordinator / "server.pem").read_bytes()).serial_number
        assert new_serial != old_serial
        assert _served_serial(kits) == new_serial  # the next connection gets the new one
        codes = procs.wait(240)
    finally:
        procs.stop()
    assert set(codes.values()) == {0}, procs.log("coordinator.0")
    assert _digests(kits) == before  # identity keys, TLS keys, pins untouched
    db = coordinator_db(kits)
    rows = db.execute("SELECT round, status, survivors FROM rounds ORDER BY round").fetchall()
    assert [(r, st) for r, st, _ in rows] == [(1, "done"), (2, "done"), (3, "done")]
    want = expected_global([(r, tuple(json.loads(s))) for r, _, s in rows], DIM)
    for eid in ENTERPRISES:
        np.testing.assert_allclose(adapter_of(kits, eid), want, atol=2e-6, rtol=0)
        ledger = [e.round_number for e in read_ledger(kits.enterprises[eid] / "ledger.sqlite")]
        assert ledger == [1, 2, 3]  # none lost, none doubled
        cert = x509.load_pem_x509_certificate((kits.enterprises[eid] / "client.pem").read_bytes())
        assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days <= 90
    assert '"tls_reloaded"' in procs.log("coordinator.0")


def test_revoked_enterprise_is_refused_from_the_next_connection(tmp_path) -> None:
    kits = make_federation(tmp_path / "fed", enterprises=ENTERPRISES, dim=DIM,
                           schedule=("secagg",), rounds=1, train=600.0)
    procs = Processes(kits)
    procs.start_coordinator()
    victim, other = ENTERPRISES[1], ENTERPRISES[0]
    try:
        kept = _client(kits, victim, retry_for=60.0)
        assert kept.health()["caller"] == victim  # a keep-alive connection is now open
        done = _secfed("federation", "revoke", victim, "--kit-root", str(kits.root), "--json")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["revoked"] == victim
        # a new connection: the certificate is refused in the handshake
        with pytest.raises(TransportError, match="(?i)certificate revoked"):
            _client(kits, victim).health()
        # the connection opened before: the id is off the allow-list
        with pytest.raises(TransportError, match="allow-list"):
            kept.health()
        assert _client(kits, other, retry_for=10.0).health()["caller"] == other
        # renew refuses a revoked enterprise; the others renew and still get in
        refused = _secfed("federation", "renew", "--kit-root", str(kits.root),
                          "--enterprise", victim)
        assert refused.returncode == 1 and refused.stderr.count("\n") == 1
        assert "must not be revoked" in refused.stderr
        renew(kits.root)
        assert _client(kits, other).health()["caller"] == other
        with pytest.raises(TransportError, match="(?i)certificate revoked"):
            _client(kits, victim).health()  # its old certificate was not renewed
    finally:
        procs.stop()


def _expired(kits, eid: str) -> x509.Certificate:
    admin = kits.root / "ca"
    ca = CertifiedKey((admin / "ca.key").read_bytes(), (admin / "ca.pem").read_bytes())
    now = dt.datetime.now(dt.UTC)
    old = issue_client_cert(ca, eid, not_before=now - dt.timedelta(days=91),
                            not_after=now - dt.timedelta(days=1))
    site = kits.enterprises[eid]
    (site / "client.pem").write_bytes(old.cert_pem)
    write_private_pem(site / "client.key", old.key_pem)
    return old.certificate


def test_expired_certificates_give_one_line_naming_the_date_and_the_renew_command(tmp_path) -> None:
    kits = make_federation(tmp_path / "fed", enterprises=ENTERPRISES, dim=DIM,
                           schedule=("secagg",), rounds=1, train=30.0)
    eid = ENTERPRISES[2]
    cert = _expired(kits, eid)
    out = _secfed("join", "--kit", str(kits.enterprises[eid]), "--synthetic", "--new-ledger")
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert f"expired on {cert.not_valid_after_utc:%Y-%m-%d}" in lines[0]
    assert f"secfed federation renew --kit-root {kits.root.resolve()} --enterprise {eid}" in lines[0]
    # the coordinator's own certificate, expired
    server = kits.coordinator / "server.pem"
    server_cert = x509.load_pem_x509_certificate(server.read_bytes())
    admin = kits.root / "ca"
    from secfed.federation.pki import _sign_leaf, load_tls_key, server_names

    ca = CertifiedKey((admin / "ca.key").read_bytes(), (admin / "ca.pem").read_bytes())
    now = dt.datetime.now(dt.UTC)
    host = server_cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
    server.write_bytes(_sign_leaf(
        ca, load_tls_key((kits.coordinator / "server.key").read_bytes()).public_key(),
        common_name=str(host), sans=server_names(str(host)),
        usage=x509.oid.ExtendedKeyUsageOID.SERVER_AUTH, not_before=now - dt.timedelta(days=91),
        not_after=now - dt.timedelta(days=2)))
    out = _secfed("aggregate", "--kit", str(kits.coordinator))
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert f"expired on {(now - dt.timedelta(days=2)):%Y-%m-%d}" in lines[0]
    assert f"secfed federation renew --kit-root {kits.root.resolve()}" in lines[0]
    # renewing fixes both
    assert _secfed("federation", "renew", "--kit-root", str(kits.root)).returncode == 0
    with pytest.raises(ConfigError):  # unknown enterprise
        renew(kits.root, enterprises=["nobody"])
    _client(kits, eid).close()  # constructs: the certificate is valid again
