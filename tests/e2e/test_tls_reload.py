"""ReloadingServerContext in-process (issue 19 item 2): a renewed certificate is served from the
next handshake on, a CRL written by ``revoke`` refuses the revoked client in the handshake, and a
half-written certificate keeps the previous one. Handshakes over memory BIOs, no sockets."""

from __future__ import annotations

import datetime as dt
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from secfed.federation import pki
from secfed.transport import tls


def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> int:
    """Run one TLS 1.3 handshake (plus one byte, so the server checks the client certificate);
    returns the serial of the certificate the server presented."""
    s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="127.0.0.1")
    done = {"client": False, "server": False}
    for _ in range(20):
        for name, end in (("client", client), ("server", server)):
            if not done[name]:
                try:
                    end.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            break
    der = client.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der or b"").serial_number


@pytest.fixture()
def pair(tmp_path: Path):
    ca = pki.make_ca("reload")
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem)
    server = pki.issue_server_cert(ca, "127.0.0.1")
    (tmp_path / "server.pem").write_bytes(server.cert_pem)
    pki.write_private_pem(tmp_path / "server.key", server.key_pem)
    client = pki.issue_client_cert(ca, "acme")
    (tmp_path / "client.pem").write_bytes(client.cert_pem)
    pki.write_private_pem(tmp_path / "client.key", client.key_pem)
    events: list[str] = []
    ctx = tls.ReloadingServerContext(cert=tmp_path / "server.pem", key=tmp_path / "server.key",
                                     ca=tmp_path / "ca.pem", crl=tmp_path / "crl.pem",
                                     on_reload=events.append)
    client_ctx = tls.client_ssl_context(cert=tmp_path / "client.pem",
                                        key=tmp_path / "client.key", ca=tmp_path / "ca.pem")
    return tmp_path, ca, server, client, ctx, client_ctx, events


def test_renewed_certificate_is_served_from_the_next_handshake(pair) -> None:
    d, ca, server, _client, ctx, client_ctx, events = pair
    first = _handshake(ctx, client_ctx)
    assert first == server.certificate.serial_number
    key = pki.load_tls_key(server.key_pem)
    renewed = pki._sign_leaf(ca, key.public_key(), common_name="127.0.0.1",
                             sans=pki.server_names("127.0.0.1"),
                             usage=x509.oid.ExtendedKeyUsageOID.SERVER_AUTH,
                             not_before=None, not_after=None)
    (d / "server.pem").write_bytes(renewed)
    assert _handshake(ctx, client_ctx) == x509.load_pem_x509_certificate(renewed).serial_number
    assert any("reloaded" in e for e in events)


def test_half_written_certificate_keeps_the_previous_one(pair) -> None:
    d, _ca, server, _client, ctx, client_ctx, events = pair
    (d / "server.pem").write_bytes(b"-----BEGIN CERTIFICATE-----\ntrunc")
    assert _handshake(ctx, client_ctx) == server.certificate.serial_number
    assert any("keeping the previous certificate" in e for e in events)


def test_crl_refuses_the_revoked_client_in_the_handshake(pair) -> None:
    d, ca, _server, client, ctx, client_ctx, _events = pair
    _handshake(ctx, client_ctx)  # accepted before
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    now = dt.datetime.now(dt.UTC)
    crl = (x509.CertificateRevocationListBuilder().issuer_name(ca.certificate.subject)
           .last_update(now - dt.timedelta(minutes=1)).next_update(now + dt.timedelta(days=1))
           .add_revoked_certificate(x509.RevokedCertificateBuilder()
                                    .serial_number(client.certificate.serial_number)
                                    .revocation_date(now).build())
           .sign(ca_key, hashes.SHA256()))  # type: ignore[arg-type]
    (d / "crl.pem").write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(ssl.SSLError, match="(?i)revoked"):
        _handshake(ctx, client_ctx)
