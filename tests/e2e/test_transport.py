"""The coordinator's HTTPS API refuses what it must: foreign/expired/unknown certificates, oversized
and malformed bodies, replays from an earlier round. A real coordinator process on loopback."""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import threading
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from e2e.harness import Processes, coordinator_db, make_federation, wait_for
from secfed.errors import ConfigError, MessageFormatError, TransportError
from secfed.federation.kits import EnterpriseKit
from secfed.federation.pki import CertifiedKey, issue_client_cert, make_ca, write_private_pem
from secfed.participant import Participant
from secfed.participant.adapter import SyntheticSite
from secfed.transport.api import Envelope
from secfed.transport.client import CoordinatorClient

ENTERPRISES = ["energy-utility", "security-operator", "city-ops"]


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("transport")
    # start=0: round 1 opens at once (the raw-client tests post to it before any site joins)
    kits = make_federation(root / "fed", enterprises=ENTERPRISES, dim=64,
                           schedule=("secagg",), rounds=2, train=300.0, stage=30.0, start=0.0)
    procs = Processes(kits)
    procs.start_coordinator()
    good = _client(kits, ENTERPRISES[0], retry_for=60.0)
    assert good.health()["caller"] == ENTERPRISES[0]  # waits out the coordinator's start-up
    yield kits, procs
    procs.stop()


def _client(kits, eid: str, *, retry_for: float = 3.0, cert: Path | None = None,
            key: Path | None = None, ca: Path | None = None) -> CoordinatorClient:
    d = kits.enterprises[eid]
    url = EnterpriseKit.load(d).federation.coordinator_url
    return CoordinatorClient(base_url=url, cert=cert or d / "client.pem", key=key or d / "client.key",
                             ca=ca or d / "ca.pem", retry_for=retry_for, timeout=10.0)


def _write(tmp: Path, name: str, ck: CertifiedKey) -> tuple[Path, Path]:
    cert, key = tmp / f"{name}.pem", tmp / f"{name}.key"
    cert.write_bytes(ck.cert_pem)
    write_private_pem(key, ck.key_pem)
    return cert, key


def _real_ca(kits) -> CertifiedKey:
    root = kits.root / "ca"
    return CertifiedKey((root / "ca.key").read_bytes(), (root / "ca.pem").read_bytes())


def test_client_certificate_from_another_ca_is_refused(federation, tmp_path) -> None:
    kits, _ = federation
    other = make_ca("rogue")
    cert, key = _write(tmp_path, "rogue", issue_client_cert(other, ENTERPRISES[0]))
    with pytest.raises(TransportError):
        _client(kits, ENTERPRISES[0], cert=cert, key=key).health()


def test_expired_client_certificate_is_refused(federation, tmp_path) -> None:
    kits, _ = federation
    now = dt.datetime.now(dt.UTC)
    expired = issue_client_cert(_real_ca(kits), ENTERPRISES[1], not_before=now - dt.timedelta(days=10),
                                not_after=now - dt.timedelta(days=1))
    cert, key = _write(tmp_path, "expired", expired)
    # issue 19: our client refuses it before connecting, naming the date and the renew command
    day = expired.certificate.not_valid_after_utc.strftime("%Y-%m-%d")
    with pytest.raises(ConfigError, match=f"expired on {day} .*secfed federation renew --kit-root"):
        _client(kits, ENTERPRISES[1], cert=cert, key=key)
    # and the coordinator refuses it in the handshake (a client that is not ours)
    url = urlsplit(EnterpriseKit.load(kits.enterprises[ENTERPRISES[1]]).federation.coordinator_url)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(kits.enterprises[ENTERPRISES[1]] / "ca.pem"))
    ctx.load_cert_chain(str(cert), str(key))
    with socket.create_connection((url.hostname, url.port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname=url.hostname) as tls:
        tls.sendall(b"GET /v1/health HTTP/1.1\r\nhost: x\r\n\r\n")
        with pytest.raises(ssl.SSLError, match="(?i)certificate expired"):
            tls.recv(64)  # TLS 1.3: the client-certificate alert arrives after the handshake


def test_unknown_enterprise_with_a_valid_certificate_gets_403(federation, tmp_path) -> None:
    kits, _ = federation
    cert, key = _write(tmp_path, "mallory", issue_client_cert(_real_ca(kits), "mallory"))
    client = _client(kits, ENTERPRISES[0], cert=cert, key=key)
    with pytest.raises(TransportError, match="allow-list"):
        client.health()
    assert client.raw("GET", "/v1/round").status_code == 403


def test_server_from_another_ca_is_not_trusted(federation, tmp_path) -> None:
    kits, _ = federation
    ca = tmp_path / "other-ca.pem"
    ca.write_bytes(make_ca("elsewhere").cert_pem)
    with pytest.raises(TransportError):
        _client(kits, ENTERPRISES[0], ca=ca).health()


def test_oversized_body_gets_413(federation) -> None:
    kits, _ = federation
    client = _client(kits, ENTERPRISES[0])
    body = bytes(4 << 20)
    r = client.raw("POST", "/v1/rounds/1/stages/advertise", content=body,
                   headers={"content-type": "application/octet-stream"})
    assert r.status_code == 413
    assert r.json()["error"] == "MessageFormatError"


@pytest.mark.parametrize("body", [b"", b"garbage", Envelope(
    round_number=1, stage="advertise", ledger_head=b"", payload=b"\x01\x02not a message").to_bytes()])
def test_malformed_body_gets_typed_4xx(federation, body) -> None:
    kits, _ = federation
    client = _client(kits, ENTERPRISES[2])
    r = client.raw("POST", "/v1/rounds/1/stages/advertise", content=body,
                   headers={"content-type": "application/octet-stream"})
    assert r.status_code == 400, r.text
    assert r.json()["error"] == "MessageFormatError"
    with pytest.raises(MessageFormatError):
        client._raise_for(r)


def test_openapi_schema_is_served(federation) -> None:
    kits, _ = federation
    schema = _client(kits, ENTERPRISES[0]).raw("GET", "/openapi.json").json()
    assert "/v1/rounds/{round_number}/stages/{stage}" in schema["paths"]


def test_exchange_checks_the_next_stage_before_accepting(federation) -> None:
    kits, _ = federation
    client = _client(kits, ENTERPRISES[1])
    body = Envelope(round_number=1, stage="advertise", ledger_head=b"",
                    payload=b"\x01\x02not a message").to_bytes()
    r = client.raw("POST", "/v1/rounds/1/stages/advertise/exchange",
                   params={"next": "bogus", "wait": 0}, content=body)
    assert r.status_code == 400 and r.json()["error"] == "MessageFormatError", r.text
    assert "bogus" in r.json()["message"]
    r = client.raw("POST", "/v1/rounds/1/stages/advertise/exchange",
                   params={"next": "share", "wait": 0}, content=body)
    assert r.status_code == 400, r.text  # the message itself is checked as in a plain submit
    with coordinator_db(kits) as db:
        assert db.execute("SELECT COUNT(*) FROM transcript WHERE sender = ?",
                          (ENTERPRISES[1],)).fetchone()[0] == 0


def test_replayed_upload_from_an_earlier_round_is_refused(federation) -> None:
    kits, procs = federation
    errors: list[BaseException] = []

    def take_part(eid: str) -> None:
        try:
            kit = EnterpriseKit.load(kits.enterprises[eid])
            site = SyntheticSite(kit.root, eid, kit.federation.model)
            p = Participant(kit, site, retry_for=60.0, new_ledger=True)
            try:
                reports = p.run(max_rounds=1)
                assert reports[0].status == "done", reports
            finally:
                p.close()
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=take_part, args=(e,)) for e in ENTERPRISES]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors

    def round_two_open() -> bool:
        with coordinator_db(kits) as db:
            return db.execute("SELECT 1 FROM rounds WHERE round = 2").fetchone() is not None

    assert wait_for(round_two_open, 30)
    with coordinator_db(kits) as db:
        rows = db.execute("SELECT stage, payload FROM transcript WHERE round = 1 AND sender = ?",
                          (ENTERPRISES[0],)).fetchall()
    old = dict(rows)
    client = _client(kits, ENTERPRISES[0])
    # the same bytes sent again for round 1: that round is over
    r = client.raw("POST", "/v1/rounds/1/stages/upload", content=Envelope(
        round_number=1, stage="upload", ledger_head=b"", payload=old["upload"]).to_bytes())
    assert r.status_code == 410, r.text
    # round 1's advertisement replayed into round 2: the protocol sees round_number 1 and refuses
    r = client.raw("POST", "/v1/rounds/2/stages/advertise", content=Envelope(
        round_number=2, stage="advertise", ledger_head=b"", payload=old["advertise"]).to_bytes())
    assert r.status_code == 409, r.text
    assert "round" in r.json()["message"]
    with coordinator_db(kits) as db:
        assert db.execute("SELECT COUNT(*) FROM transcript WHERE round = 2").fetchone()[0] == 0
