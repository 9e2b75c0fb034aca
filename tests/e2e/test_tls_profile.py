"""The coordinator's TLS is the one ``secfed.transport.tls`` configures: TLS 1.3 only, its AEAD
suites, X25519/P-256 key exchange, leaf certificates of at most 90 days -- Mozilla's "modern"
profile, checked from outside by sslyze (slow test) and by plain handshakes here.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from cryptography import x509

from e2e.harness import Processes, make_federation
from secfed.federation.kits import EnterpriseKit
from secfed.transport import tls as transport_tls

ENTERPRISES = ["energy-utility", "security-operator", "city-ops"]
SSLYZE = "sslyze==6.3.1"
HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory):
    kits = make_federation(tmp_path_factory.mktemp("tls") / "fed", enterprises=ENTERPRISES,
                           dim=16, schedule=("secagg",), rounds=1, train=600.0)
    procs = Processes(kits)
    procs.start_coordinator()
    url = urlsplit(EnterpriseKit.load(kits.enterprises[ENTERPRISES[0]]).federation.coordinator_url)
    address = (url.hostname or "127.0.0.1", url.port or 443)
    site = kits.enterprises[ENTERPRISES[0]]
    for _ in range(600):  # the coordinator's start-up
        try:
            socket.create_connection(address, timeout=1).close()
            break
        except OSError:
            time.sleep(0.05)
    yield kits, address, site
    procs.stop()


def _client_context(site: Path, *, tls12: bool = False) -> ssl.SSLContext:
    """A client that is not ours: OpenSSL's defaults, the site's certificate, the federation CA."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(site / "ca.pem"))
    ctx.load_cert_chain(str(site / "client.pem"), str(site / "client.key"))
    if tls12:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def _handshake(ctx: ssl.SSLContext, address: tuple[str, int]) -> tuple[str, str]:
    with socket.create_connection(address, timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname=address[0]) as tls:
        tls.sendall(b"GET /v1/health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        answer = tls.recv(64)  # a client-certificate refusal surfaces here in TLS 1.3
        assert answer.startswith(b"HTTP/1.1 200"), answer
        return tls.version() or "", tls.cipher()[0]


def test_default_client_gets_tls13_and_an_aead_suite(live) -> None:
    _kits, address, site = live
    version, suite = _handshake(_client_context(site), address)
    assert version == "TLSv1.3"
    assert suite in transport_tls.TLS13_CIPHER_SUITES


def test_tls12_client_is_refused(live) -> None:
    _kits, address, site = live
    # asyncio closes the socket on a failed handshake, before or after OpenSSL's alert leaves
    with pytest.raises((ssl.SSLError, ConnectionError)):
        _handshake(_client_context(site, tls12=True), address)


def test_client_offering_only_groups_outside_x25519_p256_is_refused(live) -> None:
    import ctypes

    _kits, address, site = live
    ctx = _client_context(site)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_3  # _openssl_ctx checks it
    lib, pointer = transport_tls._openssl_ctx(ctx)
    groups = ctypes.c_char_p(b"X448:P-384:P-521")  # what OpenSSL's defaults also offer
    assert lib.SSL_CTX_ctrl(pointer, transport_tls._SSL_CTRL_SET_GROUPS_LIST, 0,
                            ctypes.cast(groups, ctypes.c_void_p)) == 1
    with pytest.raises((ssl.SSLError, ConnectionError)):
        _handshake(ctx, address)


def test_our_client_context_speaks_tls13_only_with_x25519_or_p256(live) -> None:
    _kits, address, site = live
    ours = transport_tls.client_ssl_context(cert=site / "client.pem", key=site / "client.key",
                                  ca=site / "ca.pem")
    assert ours.minimum_version == ours.maximum_version == ssl.TLSVersion.TLSv1_3
    version, suite = _handshake(ours, address)
    assert (version, suite in transport_tls.TLS13_CIPHER_SUITES) == ("TLSv1.3", True)


def test_leaf_certificates_last_at_most_90_days(live) -> None:
    kits, _address, site = live
    for path in (kits.coordinator / "server.pem", site / "client.pem"):
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        lifespan = cert.not_valid_after_utc - cert.not_valid_before_utc
        assert lifespan.days <= 90, (path, lifespan)


def _sslyze_python(root: Path) -> Path:
    """sslyze in its own virtual environment (its pins are not the project's); reused from
    ``$SECFED_SSLYZE_VENV`` when set."""
    venv = Path(os.environ.get("SECFED_SSLYZE_VENV") or root / "sslyze-venv")
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
        subprocess.run([str(python), "-m", "pip", "install", "-q",
                        "--disable-pip-version-check", SSLYZE], check=True, timeout=900)
    return python


@pytest.mark.slow
def test_sslyze_finds_mozilla_modern_compliance(live, tmp_path_factory) -> None:
    """sslyze scans the live coordinator (with a site's client certificate, the federation CA as
    its trust store: the one allowance) and checks Mozilla's "modern" profile: no issue at all."""
    _kits, address, site = live
    python = _sslyze_python(tmp_path_factory.getbasetemp())
    proc = subprocess.run(
        [str(python), str(HERE / "sslyze_modern.py"), address[0], str(address[1]),
         str(site / "client.pem"), str(site / "client.key"), str(site / "ca.pem")],
        capture_output=True, text=True, timeout=900, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(report, indent=1, sort_keys=True))
    assert "error" not in report, report
    assert report["trusted_via_federation_ca"] is True
    assert report["issues"] == {}, report
    accepted = report["accepted_cipher_suites"]
    assert {k for k, v in accepted.items() if v} == {"tls_1_3"}
    assert set(accepted["tls_1_3"]) <= set(transport_tls.TLS13_CIPHER_SUITES)
    assert set(report["curves"]) <= {"X25519", "secp256r1", "prime256v1"}  # P-256 by two names
    assert report["leaf_lifespan_days"] <= 90
