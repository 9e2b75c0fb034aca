"""Certificate lifecycle: renew TLS certificates before they expire, revoke an enterprise.

Both work on a kit root as ``secfed federation init`` lays it out (``ca/`` with the CA key,
``coordinator/``, one folder per enterprise). Only TLS material changes: identity keys, ledgers,
state, ``federation.toml`` and every pin stay as they are.

* :func:`renew` certifies each party's *existing* TLS key again (fresh serial, fresh validity,
  same names) and replaces ``server.pem`` / ``client.pem`` atomically (write, then rename), so a
  running coordinator -- whose TLS context reloads its files per connection
  (:class:`~secfed.transport.tls.ReloadingServerContext`) -- serves the new certificate from
  its next connection on, and a round in flight is not disturbed.
* :func:`revoke` adds the enterprise to ``ca/revoked.toml``, signs a CRL (``crl.pem``) listing
  every certificate serial the admin knows for it, and puts both into the coordinator's kit: the
  coordinator refuses that certificate in the TLS handshake from its next connection on, and the
  enterprise id is off its allow-list (any other certificate for it gets 403). The rounds'
  pinned participant list is every site's ``federation.toml`` and is not rewritten: a revoked
  enterprise is a dropout in every later round. Its ledger and the coordinator's transcript are
  untouched, so ``secfed audit`` still verifies them.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from secfed.errors import ConfigError
from secfed.federation.pki import (
    DEFAULT_LEAF_VALIDITY,
    CertifiedKey,
    _sign_leaf,
    load_tls_key,
    server_names,
)

__all__ = ["Renewed", "renew", "revoke", "revoked_ids", "CRL_FILE", "REVOKED_FILE",
           "renew_command", "AllowList"]

CRL_FILE = "crl.pem"
REVOKED_FILE = "revoked.toml"
ISSUED_LOG = "issued.tsv"  # the admin's record of every leaf it issued: serial, id, not after


@dataclass(frozen=True)
class Renewed:
    """One renewed certificate."""

    party: str
    path: Path
    serial: int
    not_after: dt.datetime


def renew_command(kit_root: str | Path, enterprise: str | None = None) -> str:
    """The command line that renews a certificate (error messages quote it)."""
    tail = f" --enterprise {enterprise}" if enterprise else ""
    return f"secfed federation renew --kit-root {kit_root}{tail}"


def _ca(kit_root: Path) -> CertifiedKey:
    admin = kit_root / "ca"
    try:
        return CertifiedKey((admin / "ca.key").read_bytes(), (admin / "ca.pem").read_bytes())
    except OSError as exc:
        raise ConfigError(f"--kit-root {kit_root} must hold the admin's ca/ca.key and ca/ca.pem "
                          f"({exc.strerror}: {exc.filename})") from None


def _atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` in one rename: a reader sees the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _log_issued(kit_root: Path, party: str, cert_pem: bytes) -> x509.Certificate:
    cert = x509.load_pem_x509_certificate(cert_pem)
    with open(kit_root / "ca" / ISSUED_LOG, "a", encoding="utf-8") as log:
        log.write(f"{cert.serial_number}\t{party}\t{cert.not_valid_after_utc.isoformat()}\n")
    return cert


def _names(cert_path: Path) -> tuple[str, list[x509.GeneralName]]:
    """CN and SANs of the certificate being renewed (the admin's own earlier choice)."""
    try:
        old = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{cert_path} must be the PEM certificate to renew ({exc})") from None
    cns = [str(a.value) for a in old.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    try:
        sans = list(old.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        sans = []
    if len(cns) != 1:
        raise ConfigError(f"{cert_path} must carry one CN (got {cns})")
    return cns[0], sans


def _renew_one(kit_root: Path, ca: CertifiedKey, party: str, folder: Path, *, server: bool,
               validity: dt.timedelta) -> Renewed:
    cert_path = folder / ("server.pem" if server else "client.pem")
    key_path = folder / ("server.key" if server else "client.key")
    try:
        key = load_tls_key(key_path.read_bytes())
    except OSError as exc:
        raise ConfigError(f"{party}: TLS key must exist ({exc.strerror}: {key_path})") from None
    common_name, sans = _names(cert_path)
    if server:
        sans = server_names(common_name)
    elif sans != [x509.DNSName(party)] or common_name != party:
        raise ConfigError(f"{cert_path}: client certificate must name {party!r} as CN and only "
                          f"SAN (got CN {common_name!r})")
    now = dt.datetime.now(dt.UTC)
    pem = _sign_leaf(ca, key.public_key(), common_name=common_name, sans=sans,
                     usage=(x509.oid.ExtendedKeyUsageOID.SERVER_AUTH if server
                            else x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH),
                     not_before=now - dt.timedelta(minutes=5), not_after=now + validity)
    cert = _log_issued(kit_root, party, pem)
    _atomic_write(cert_path, pem)
    return Renewed(party, cert_path, cert.serial_number, cert.not_valid_after_utc)


def renew(kit_root: str | Path, *, enterprises: Sequence[str] = (),
          validity: dt.timedelta = DEFAULT_LEAF_VALIDITY) -> list[Renewed]:
    """Fresh TLS certificates from the federation CA for the same TLS keys: every party's
    (coordinator first), or only ``enterprises``'. Nothing else in the kits changes.

    Raises:
        ConfigError: no CA under ``kit_root/ca``, an unknown or revoked enterprise, a missing
            key or certificate, or a validity over 90 days or not positive.
    """
    root = Path(kit_root)
    if not dt.timedelta(0) < validity <= DEFAULT_LEAF_VALIDITY:
        raise ConfigError(f"validity must be in (0, 90] days (got {validity.days} days)")
    ca = _ca(root)
    revoked = revoked_ids(root / "ca")
    known = sorted(p.name for p in root.iterdir()
                   if (p / "client.key").is_file() and (p / "site.toml").is_file())
    for eid in enterprises:
        if eid not in known:
            raise ConfigError(f"--enterprise must be an enterprise under {root} (got {eid!r}; "
                              f"known: {known})")
        if eid in revoked:
            raise ConfigError(f"--enterprise {eid!r} must not be revoked (it is, since "
                              f"{revoked[eid]})")
    out: list[Renewed] = []
    if not enterprises:
        out.append(_renew_one(root, ca, "coordinator", root / "coordinator", server=True,
                              validity=validity))
    for eid in enterprises or [e for e in known if e not in revoked]:
        out.append(_renew_one(root, ca, eid, root / eid, server=False, validity=validity))
    return out


def revoked_ids(folder: str | Path) -> dict[str, str]:
    """Enterprise id -> revocation time from ``folder/revoked.toml`` (empty when none).

    Raises:
        ConfigError: the file exists but is not the list :func:`revoke` writes.
    """
    path = Path(folder) / REVOKED_FILE
    if not path.is_file():
        return {}
    try:
        doc = tomllib.loads(path.read_text())
        return {str(r["id"]): str(r["at"]) for r in doc.get("revoked", [])}
    except (tomllib.TOMLDecodeError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path} must list [[revoked]] tables with id and at ({exc})") from None


def _serials_of(kit_root: Path, eid: str) -> set[int]:
    """Every serial the admin knows it issued to ``eid``: the issued log, the bundle's and the
    enterprise folder's current certificate."""
    serials: set[int] = set()
    log = kit_root / "ca" / ISSUED_LOG
    if log.is_file():
        for line in log.read_text().splitlines():
            serial, party, *_ = line.split("\t")
            if party == eid:
                serials.add(int(serial))
    for path in (kit_root / eid / "client.pem", kit_root / "exchange" / "bundle" / "certs" /
                 f"{eid}.pem"):
        if path.is_file():
            serials.add(x509.load_pem_x509_certificate(path.read_bytes()).serial_number)
    return serials


def _crl(ca: CertifiedKey, revoked: dict[int, dt.datetime]) -> bytes:
    """A CRL signed by the CA. Its nextUpdate is the CA's own expiry: OpenSSL refuses every
    client once a CRL's nextUpdate has passed, and a new CRL is written at each revocation."""
    ca_cert = ca.certificate
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ConfigError("CA key must be an ECDSA key (got another key type)")
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateRevocationListBuilder()
               .issuer_name(ca_cert.subject)
               .last_update(now - dt.timedelta(minutes=5))
               .next_update(ca_cert.not_valid_after_utc))
    for serial, when in sorted(revoked.items()):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build())
    return builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def revoke(kit_root: str | Path, enterprise: str) -> list[int]:
    """Revoke ``enterprise``: listed in ``revoked.toml``, its certificate serials in a CA-signed
    ``crl.pem``, both copied into the coordinator's kit (module docstring). Returns the serials.

    Raises:
        ConfigError: no CA, or ``enterprise`` is not an enterprise of this kit root.
    """
    root = Path(kit_root)
    ca = _ca(root)
    if not (root / enterprise / "site.toml").is_file():
        raise ConfigError(f"enterprise must be one under {root} (got {enterprise!r})")
    admin = root / "ca"
    revoked = revoked_ids(admin)
    now = dt.datetime.now(dt.UTC)
    revoked.setdefault(enterprise, now.isoformat(timespec="seconds"))
    serials: dict[int, dt.datetime] = {}
    for eid, at in revoked.items():
        for serial in _serials_of(root, eid):
            serials[serial] = dt.datetime.fromisoformat(at)
    crl = _crl(ca, serials)
    listing = "# revoked enterprises (secfed federation revoke); crl.pem lists their serials\n"
    listing += "".join(f"[[revoked]]\nid = {json.dumps(eid)}\nat = {json.dumps(at)}\n\n"
                       for eid, at in sorted(revoked.items()))
    for folder in (admin, root / "coordinator"):
        _atomic_write(folder / REVOKED_FILE, listing.encode())
        _atomic_write(folder / CRL_FILE, crl)
    return sorted(s for s, _ in serials.items() if s in _serials_of(root, enterprise))


class AllowList:
    """The coordinator's allow-list: the roster less the enterprises in ``folder/revoked.toml``,
    read again whenever that file changes (a revocation applies to the next request, even on a
    connection opened before it)."""

    def __init__(self, roster: Sequence[str], folder: str | Path):
        self._roster = frozenset(roster)
        self._path = Path(folder) / REVOKED_FILE
        self._seen: tuple[int, int] | None = None
        self._revoked: frozenset[str] = frozenset()

    def revoked(self) -> frozenset[str]:
        try:
            st = self._path.stat()
            seen: tuple[int, int] | None = (st.st_mtime_ns, st.st_size)
        except OSError:
            seen = None
        if seen != self._seen:
            try:
                self._revoked = frozenset(revoked_ids(self._path.parent)) if seen else frozenset()
                self._seen = seen
            except ConfigError:
                pass  # a half-written list: keep the previous one until it is whole
        return self._revoked

    def __contains__(self, enterprise_id: object) -> bool:
        return enterprise_id in self._roster and enterprise_id not in self.revoked()
