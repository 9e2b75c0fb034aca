"""Enrolment: every party makes its own keys; the admin only certifies and pins public keys.

The flow, one CLI command per step (:func:`secfed.federation.kits.create_kits` runs them all
in-process for tests and the demo, still writing one folder per party):

1. admin, ``secfed federation invite``: the CA (``ca.pem``, ``ca.key``) and ``invitation.toml``
   (the settings it will pin -- everything but the roster -- and the CA certificate).
2. coordinator, ``secfed coordinator init``: its TLS key and Ed25519 identity key, locally; a
   request (CSR + identity public key, signed by that key) for the admin.
3. each site, ``secfed site init``: its Ed25519 identity key, TLS key and -- only when the
   federation schedules ``ckks`` -- an X25519 key to receive the CKKS secret, locally; a request
   holding only public material, each key proven by a signature.
4. admin, ``secfed federation sign``: checks every request (CSR signature, CN/SAN = the id, key
   types, proofs of possession), issues the certificates, pins the roster in
   ``federation.toml`` and writes a bundle: certificates, ``federation.toml``, the CA
   certificate and (ckks only) the sites' signed X25519 keys. No private key of anyone.
5. each party, ``secfed site import`` / ``secfed coordinator import``: checks the bundle against
   its own invitation (same CA, the same pinned settings) and its own keys, then installs it.
6. ckks only: one site, ``secfed site ckks-keygen``, makes the CKKS secret context and seals one
   copy to each other enterprise's enrolled X25519 key (ephemeral X25519 + HKDF-SHA256 +
   AES-256-GCM, associated data binding the federation, sender and receiver; the copy is signed
   by the sender's identity key); the coordinator gets only the key-free public context
   (``site ckks-import`` / ``coordinator ckks-import``).

The admin's folder ends up holding the CA key and public material only; the coordinator's kit
holds its own keys and the CKKS public context only.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import shutil
import struct
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.exceptions import InvalidSignature as PycaInvalidSignature
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from pydantic import ValidationError

from secfed import names
from secfed.config import (
    ENTERPRISE_ID,
    ENTERPRISE_ID_RULE,
    Deadlines,
    DPSettings,
    FederationConfig,
    ModelSettings,
    RosterEntry,
    SitePolicy,
    _validation_message,
    default_threshold,
    dump_toml,
    federation_to_toml,
    load_federation,
    site_policy_to_toml,
    validated,
)
from secfed.crypto.aead import open_sealed, seal
from secfed.crypto.keys import IdentityKey, X25519KeyPair, agree, hkdf, verify_signature
from secfed.errors import ConfigError, DecryptionError, InvalidSignature
from secfed.federation.pki import (
    CertifiedKey,
    issue_from_csr,
    load_csr,
    load_tls_key,
    make_ca,
    make_csr,
    new_tls_key,
    private_key_pem,
    server_names,
    write_private_pem,
)

__all__ = [
    "Invitation",
    "Request",
    "invite",
    "load_invitation",
    "site_init",
    "coordinator_init",
    "load_request",
    "sign_requests",
    "site_import",
    "coordinator_import",
    "ckks_keygen",
    "site_ckks_import",
    "coordinator_ckks_import",
    "fingerprint",
    "ring_bits_for",
    "distributed_sum_abs",
]

# Domain separation (CONVENTIONS.md): one label per purpose.
LABEL_REQUEST = names.LABEL_ENROL_REQUEST  # a request's proof of possession of the identity key
LABEL_KEM_KEY = names.LABEL_KEM_KEY  # a site's X25519 key, signed by its identity
LABEL_CKKS_TRANSFER = names.LABEL_CKKS_TRANSFER  # HKDF info and AEAD AD of a copy
LABEL_CKKS_COPY = names.LABEL_CKKS_COPY  # the sender's signature on a sealed copy
LABEL_CKKS_PUBLIC = names.LABEL_CKKS_PUBLIC  # the sender's signature on the public ctx

VERSION = 1
COORDINATOR_ID = "coordinator"
RESERVED_IDS = frozenset({COORDINATOR_ID, "ca", "exchange", "admin"})

FEDERATION_FILE = "federation.toml"
SITE_FILE = "site.toml"
CA_FILE = "ca.pem"
CA_KEY_FILE = "ca.key"
INVITATION_FILE = "invitation.toml"
REQUEST_FILE = "request.toml"
RECIPIENTS_FILE = "ckks_recipients.toml"
KEM_FILE = "ckks_kem.key"
CKKS_PUBLIC_FILE = "ckks_public.ctx"
CKKS_PUBLIC_SIGNATURE = "ckks_public.toml"
CKKS_SECRET_FILE = "ckks_secret.ctx"
CLIENT_CERT, CLIENT_KEY, SITE_IDENTITY = "client.pem", "client.key", "identity.pem"
SERVER_CERT, SERVER_KEY, COORDINATOR_IDENTITY = "server.pem", "server.key", "identity.key"
BUNDLE_CERTS = "certs"
COORDINATOR_CERT = "coordinator.pem"  # in the bundle
COPY_SUFFIX = ".ckks"


# --------------------------------------------------------------------------------------------
# Small helpers


def _field(value: bytes) -> bytes:
    return struct.pack(">I", len(value)) + value


def _fields(*values: bytes | str) -> bytes:
    return b"".join(_field(v.encode("utf-8") if isinstance(v, str) else v) for v in values)


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def fingerprint(path: str | Path) -> str:
    """SHA-256 (hex) of a file: parties compare ``federation.toml``'s out of band."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _read_toml(path: Path, what: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} must exist (not found)") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} {path} must be a file (got a directory)") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{what} {path} must be valid TOML ({exc})") from None


def _table(data: Mapping[str, Any], name: str, source: str) -> dict[str, Any]:
    table = data.get(name)
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: table [{name}] must be present (missing)")
    return table


def _str(table: Mapping[str, Any], key: str, source: str) -> str:
    value = table.get(key)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{source}: {key} must be a non-empty string (got {value!r})")
    return value


def _hex(table: Mapping[str, Any], key: str, source: str, length: int) -> bytes:
    value = _str(table, key, source)
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raise ConfigError(f"{source}: {key} must be hex (got {value[:20]!r})") from None
    if len(raw) != length:
        raise ConfigError(f"{source}: {key} must be {length} bytes (got {len(raw)})")
    return raw


def _b64(table: Mapping[str, Any], key: str, source: str) -> bytes:
    value = _str(table, key, source)
    try:
        return base64.b64decode(value, validate=True)
    except ValueError:
        raise ConfigError(f"{source}: {key} must be base64 (unreadable)") from None


def _version(table: Mapping[str, Any], source: str) -> None:
    if table.get("version") != VERSION:
        raise ConfigError(f"{source}: version must be {VERSION} (got {table.get('version')!r})")


def _fresh_dir(path: Path, option: str, force: bool) -> None:
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        if not force:
            raise ConfigError(f"{option} must be a new or empty directory (got {path}, not empty)")
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    path.mkdir(parents=True, exist_ok=True)


def _need(path: Path, what: str) -> Path:
    if not path.is_file():
        raise ConfigError(f"{what} must contain {path.name} (missing: {path})")
    return path


def _ed25519_public(raw: bytes, source: str, key: str) -> None:
    try:
        Ed25519PublicKey.from_public_bytes(raw)
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(f"{source}: {key} must be an Ed25519 public key (invalid)") from None


def _write_kem_key(path: Path, kem: X25519KeyPair) -> None:
    write_private_pem(path, kem.private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))


def _load_kem_key(path: Path) -> X25519KeyPair:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise ConfigError(f"site kit must contain {KEM_FILE} (missing: {path})") from None
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ConfigError(f"{path}: must be an unencrypted PKCS#8 PEM key (unreadable)") from None
    if not isinstance(key, X25519PrivateKey):
        raise ConfigError(f"{path}: key must be X25519 (got {type(key).__name__})")
    return X25519KeyPair(key)


# --------------------------------------------------------------------------------------------
# Ring size (moved here from kits.py: the federation's settings are derived once the roster is
# known, by the admin when it signs and by every party when it checks the bundle)


def distributed_sum_abs(n_participants: int, model: ModelSettings, distributed: Any) -> int:
    """Ring units a coordinate of the noised sum stays within, whatever the round's guaranteed
    number of noise shares (sized for one share: the largest per-share noise)."""
    from secfed.privacy.distributed import DistributedDP

    hook = DistributedDP(clip_norm=distributed.clip_norm,
                         noise_multiplier=distributed.noise_multiplier,
                         min_participants=distributed.min_participants,
                         norm_units=distributed.norm_units, force=distributed.force)
    return hook.max_sum_abs(n_participants=n_participants, guaranteed=1,
                            dim=model.vector_length, scale_bits=model.scale_bits)


def ring_bits_for(n_participants: int, model: ModelSettings, distributed: Any = None) -> int:
    """The smaller ring (Z_2^32 before Z_2^64) whose headroom holds the sum of ``n`` clipped
    updates at the model's scale (and, with distributed DP, their noise shares): half the
    upload bytes whenever the federation is small."""
    from secfed.crypto.encoding import check_headroom
    from secfed.errors import HeadroomError

    try:
        check_headroom(n_participants=n_participants, max_abs=model.clip_bound,
                       scale_bits=model.scale_bits, ring_bits=32)
    except HeadroomError:
        return 64
    if distributed is not None and distributed_sum_abs(n_participants, model, distributed) > 2**31 - 1:
        return 64
    return 32


# --------------------------------------------------------------------------------------------
# The invitation


@dataclass(frozen=True)
class Invitation:
    """What the admin will pin (every federation setting but the roster) and its CA certificate.

    ``threshold``/``min_participants`` of None and a model without an explicit ``ring_bits``
    are derived from the roster size when the admin signs; every party re-derives them from the
    same invitation when it checks the bundle.
    """

    name: str
    coordinator_url: str
    rounds: int
    mode_schedule: tuple[str, ...]
    threshold: int | None
    min_participants: int | None
    neighbours: int
    deadlines: Deadlines
    dp: DPSettings
    model: ModelSettings
    ca_pem: bytes

    @property
    def uses_ckks(self) -> bool:
        return "ckks" in self.mode_schedule

    @property
    def host(self) -> str:
        return urlsplit(self.coordinator_url).hostname or ""

    def ca_der(self) -> bytes:
        return x509.load_pem_x509_certificate(self.ca_pem).public_bytes(serialization.Encoding.DER)

    def federation(self, roster: Sequence[RosterEntry], *,
                   coordinator_identity: bytes) -> FederationConfig:
        """The federation these settings make with ``roster`` and the coordinator's identity key.

        Raises:
            ConfigError: a setting breaks a rule for this roster size.
        """
        n = len(roster)
        t = self.threshold if self.threshold is not None else default_threshold(n)
        model, dp = self.model, self.dp
        if "ring_bits" not in model.model_fields_set:
            model = model.model_copy(update={"ring_bits": ring_bits_for(n, model, dp.distributed)})
        elif dp.distributed is not None:
            need = distributed_sum_abs(n, model, dp.distributed)
            if need > 2 ** (model.ring_bits - 1) - 1:
                raise ConfigError(
                    f"model.ring_bits = {model.ring_bits} cannot hold the distributed-DP noised "
                    f"sum ({need} ring units); use 64 or a smaller dp.distributed "
                    "noise_multiplier/clip_norm"
                )
        fields: dict[str, Any] = dict(
            name=self.name, coordinator_url=self.coordinator_url, roster=tuple(roster),
            rounds=self.rounds, mode_schedule=self.mode_schedule, threshold=t,
            min_participants=self.min_participants if self.min_participants is not None else t,
            neighbours=self.neighbours, deadlines=self.deadlines, dp=dp, model=model,
            coordinator_identity_public_key=coordinator_identity.hex(),
        )
        return validated(FederationConfig, **fields)

    def check(self, n_enterprises: int | None = None) -> None:
        """Check the settings now, against a placeholder roster of ``n_enterprises`` (default:
        the smallest the settings allow), so a bad setting fails before anyone enrols.

        Raises:
            ConfigError: a setting breaks a rule.
        """
        if n_enterprises is None:
            ddp = self.dp.distributed
            n_enterprises = max(2, self.threshold or 2, self.min_participants or 2,
                                ddp.min_participants if ddp is not None and not ddp.force else 2)
        placeholder = [f"enterprise-{i}" for i in range(n_enterprises)]
        roster = tuple(RosterEntry(id=e, identity_public_key=secrets.token_hex(32)) for e in placeholder)
        self.federation(roster, coordinator_identity=secrets.token_bytes(32))

    def to_toml(self) -> str:
        model = self.model.model_dump(mode="json")
        if "ring_bits" not in self.model.model_fields_set:
            del model["ring_bits"]  # derived from the roster size when the admin signs
        federation = {
            "name": self.name, "coordinator_url": self.coordinator_url, "rounds": self.rounds,
            "mode_schedule": list(self.mode_schedule), "threshold": self.threshold,
            "min_participants": self.min_participants, "neighbours": self.neighbours,
        }
        doc = {
            "invitation": {"version": VERSION,
                           "ca_certificate": base64.b64encode(self.ca_der()).decode()},
            "federation": federation,
            "deadlines": self.deadlines.model_dump(mode="json"),
            "dp": self.dp.model_dump(mode="json"),
            "model": model,
        }
        return ("# secfed federation invitation: the settings the admin will pin, and its CA "
                "certificate (public)\n" + dump_toml(doc))


def load_invitation(path: str | Path) -> Invitation:
    """Read and check an ``invitation.toml``.

    Raises:
        ConfigError: missing, not TOML, or a field breaks a rule.
    """
    p = Path(path)
    source = f"invitation {p}"
    data = _read_toml(p, "invitation")
    head = _table(data, "invitation", source)
    _version(head, source)
    der = _b64(head, "ca_certificate", source)
    try:
        ca = x509.load_der_x509_certificate(der)
    except ValueError:
        raise ConfigError(f"{source}: ca_certificate must be a DER certificate (unparseable)") from None
    fed = _table(data, "federation", source)
    unknown = set(data) - {"invitation", "federation", "deadlines", "dp", "model"}
    if unknown:
        raise ConfigError(f"{source}: top-level tables must be known (got {sorted(unknown)})")
    try:
        deadlines = Deadlines.model_validate(data.get("deadlines", {}))
        dp = DPSettings.model_validate(data.get("dp", {}))
        model = ModelSettings.model_validate(_table(data, "model", source))
    except ValidationError as exc:
        raise ConfigError(_validation_message(source, exc)) from None
    schedule = fed.get("mode_schedule", ["secagg"])
    if not isinstance(schedule, list) or not all(isinstance(m, str) for m in schedule):
        raise ConfigError(f"{source}: mode_schedule must be a list of modes (got {schedule!r})")
    inv = Invitation(
        name=_str(fed, "name", source), coordinator_url=_str(fed, "coordinator_url", source),
        rounds=fed.get("rounds", 4), mode_schedule=tuple(schedule),
        threshold=fed.get("threshold"), min_participants=fed.get("min_participants"),
        neighbours=fed.get("neighbours", 0), deadlines=deadlines, dp=dp, model=model,
        ca_pem=ca.public_bytes(serialization.Encoding.PEM),
    )
    inv.check()
    return inv


def invite(out: str | Path, *, name: str, coordinator_url: str, model: ModelSettings,
           mode_schedule: tuple[str, ...] = ("secagg",), rounds: int = 4,
           threshold: int | None = None, min_participants: int | None = None,
           neighbours: int = 0, deadlines: Deadlines | None = None, dp: DPSettings | None = None,
           n_enterprises: int | None = None, force: bool = False) -> Invitation:
    """The admin's first step: make the CA and write ``ca.pem``, ``ca.key`` (0600) and
    ``invitation.toml`` under ``out``.

    Raises:
        ConfigError: a setting breaks a rule, or ``out`` is not new/empty (without force).
    """
    root = Path(out)
    draft = Invitation(name=name, coordinator_url=coordinator_url, rounds=rounds,
                       mode_schedule=tuple(mode_schedule), threshold=threshold,
                       min_participants=min_participants, neighbours=neighbours,
                       deadlines=deadlines or Deadlines(), dp=dp or DPSettings(), model=model,
                       ca_pem=b"")
    draft.check(n_enterprises)  # before any file exists
    _fresh_dir(root, "--out", force)
    ca = make_ca(name)
    write_private_pem(root / CA_KEY_FILE, ca.key_pem)
    (root / CA_FILE).write_bytes(ca.cert_pem)
    inv = Invitation(**{**draft.__dict__, "ca_pem": ca.cert_pem})
    (root / INVITATION_FILE).write_text(inv.to_toml())
    return inv


# --------------------------------------------------------------------------------------------
# Requests


@dataclass(frozen=True)
class Request:
    """What a party sends the admin: public material only, each key proven by a signature."""

    role: str  # "enterprise" | "coordinator"
    id: str
    federation: str
    invitation_sha256: str
    identity_public_key: bytes
    csr: bytes
    kem_public_key: bytes | None
    kem_signature: bytes | None
    signature: bytes

    def signed_bytes(self) -> bytes:
        return LABEL_REQUEST + _fields(self.role, self.id, self.federation, self.invitation_sha256,
                                       self.identity_public_key, self.csr,
                                       self.kem_public_key or b"")

    def to_toml(self) -> str:
        body: dict[str, Any] = {
            "version": VERSION, "role": self.role, "id": self.id, "federation": self.federation,
            "invitation_sha256": self.invitation_sha256,
            "identity_public_key": self.identity_public_key.hex(),
            "csr": base64.b64encode(self.csr).decode(),
            "ckks_kem_public_key": self.kem_public_key.hex() if self.kem_public_key else None,
            "ckks_kem_signature": self.kem_signature.hex() if self.kem_signature else None,
            "signature": self.signature.hex(),
        }
        return (f"# secfed enrolment request of {self.id!r} (public material only)\n"
                + dump_toml({"request": body}))


def _kem_signed_bytes(federation: str, enterprise_id: str, kem_public: bytes) -> bytes:
    return LABEL_KEM_KEY + _fields(federation, enterprise_id, kem_public)


def load_request(path: str | Path) -> Request:
    """Parse a request file (shape only; :func:`check_request` checks what it claims).

    Raises:
        ConfigError: missing, not TOML, or a field of the wrong shape.
    """
    p = Path(path)
    source = f"request {p}"
    body = _table(_read_toml(p, "request"), "request", source)
    _version(body, source)
    role = _str(body, "role", source)
    if role not in ("enterprise", "coordinator"):
        raise ConfigError(f"{source}: role must be enterprise or coordinator (got {role!r})")
    has_kem = "ckks_kem_public_key" in body
    return Request(
        role=role, id=_str(body, "id", source), federation=_str(body, "federation", source),
        invitation_sha256=_str(body, "invitation_sha256", source),
        identity_public_key=_hex(body, "identity_public_key", source, 32),
        csr=_b64(body, "csr", source),
        kem_public_key=_hex(body, "ckks_kem_public_key", source, 32) if has_kem else None,
        kem_signature=_hex(body, "ckks_kem_signature", source, 64) if has_kem else None,
        signature=_hex(body, "signature", source, 64),
    )


def check_request(req: Request, inv: Invitation, invitation_sha256: str, *, source: str) -> Any:
    """Check everything a request claims; returns the TLS public key to certify.

    Raises:
        ConfigError: the first rule it breaks (one line naming the field and value).
    """
    if req.federation != inv.name:
        raise ConfigError(f"{source}: federation must be {inv.name!r} (got {req.federation!r})")
    if req.invitation_sha256 != invitation_sha256:
        raise ConfigError(f"{source}: invitation_sha256 must be this federation's invitation "
                          f"{invitation_sha256[:16]}... (got {req.invitation_sha256[:16]}...)")
    if req.role == "coordinator":
        if req.id != COORDINATOR_ID:
            raise ConfigError(f"{source}: id of a coordinator request must be "
                              f"{COORDINATOR_ID!r} (got {req.id!r})")
    elif not ENTERPRISE_ID.match(req.id) or req.id in RESERVED_IDS:
        raise ConfigError(f"{source}: id must match {ENTERPRISE_ID.pattern} and not be one of "
                          f"{sorted(RESERVED_IDS)} (got {req.id!r})")
    _ed25519_public(req.identity_public_key, source, "identity_public_key")
    try:
        verify_signature(req.identity_public_key, req.signature, req.signed_bytes())
    except InvalidSignature:
        raise ConfigError(f"{source}: signature must verify under identity_public_key "
                          "(invalid: not signed by that key, or the request was changed)") from None
    if req.role == "coordinator":
        tls_key = load_csr(req.csr, who=source, common_name=inv.host, sans=None)
    else:
        tls_key = load_csr(req.csr, who=source, common_name=req.id, sans=[x509.DNSName(req.id)])
    wants_kem = inv.uses_ckks and req.role == "enterprise"
    if wants_kem and req.kem_public_key is None:
        raise ConfigError(f"{source}: ckks_kem_public_key must be present: the federation "
                          f"schedules ckks (got none)")
    if not wants_kem and req.kem_public_key is not None:
        raise ConfigError(f"{source}: ckks_kem_public_key must be absent: "
                          + ("a coordinator never receives the CKKS secret" if inv.uses_ckks
                             else "the federation never schedules ckks") + " (got one)")
    if req.kem_public_key is not None:
        assert req.kem_signature is not None  # load_request reads both or neither
        try:
            verify_signature(req.identity_public_key, req.kem_signature,
                             _kem_signed_bytes(inv.name, req.id, req.kem_public_key))
        except InvalidSignature:
            raise ConfigError(f"{source}: ckks_kem_signature must verify under "
                              "identity_public_key (invalid)") from None
    return tls_key


def _invitation_copy(invitation: Path, out: Path) -> tuple[Invitation, str]:
    inv = load_invitation(invitation)
    text = invitation.read_bytes()
    (out / INVITATION_FILE).write_bytes(text)
    (out / CA_FILE).write_bytes(inv.ca_pem)
    return inv, hashlib.sha256(text).hexdigest()


def _write_request(path: Path, identity: IdentityKey, inv: Invitation,
                   invitation_sha256: str, *, role: str, party_id: str, csr: bytes,
                   kem_public_key: bytes | None = None,
                   kem_signature: bytes | None = None) -> Path:
    """A party's request for the admin, signed by its own identity key, written to ``path``
    (returned)."""
    unsigned = Request(role=role, id=party_id, federation=inv.name,
                       invitation_sha256=invitation_sha256,
                       identity_public_key=identity.public_bytes(), csr=csr,
                       kem_public_key=kem_public_key, kem_signature=kem_signature, signature=b"")
    req = replace(unsigned, signature=identity.sign(unsigned.signed_bytes()))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(req.to_toml())
    return path


def site_init(invitation: str | Path, enterprise_id: str, out: str | Path, *,
              request: str | Path | None = None, budget_epsilon: float | None = None,
              min_noise_multiplier: float = 0.5, force: bool = False) -> Path:
    """A site's own keys, made locally under ``out``; returns the request file to send.

    Writes ``identity.pem``, ``client.key`` and (ckks federations only) ``ckks_kem.key``, all
    0600, plus ``site.toml`` (this site's own policy), ``invitation.toml``, ``ca.pem`` and the
    request (default ``out/request.toml``).

    Raises:
        ConfigError: a bad id or invitation, or ``out`` not new/empty (without force).
    """
    if not ENTERPRISE_ID.match(enterprise_id) or enterprise_id in RESERVED_IDS:
        raise ConfigError(f"--id must be {ENTERPRISE_ID_RULE}, and not one of "
                          f"{sorted(RESERVED_IDS)} (got {enterprise_id!r})")
    inv = load_invitation(invitation)  # before anything is written
    root = Path(out)
    _fresh_dir(root, "--out", force)
    inv, digest = _invitation_copy(Path(invitation), root)
    identity = IdentityKey.generate()
    tls = new_tls_key()
    write_private_pem(root / SITE_IDENTITY, identity.to_pem())
    write_private_pem(root / CLIENT_KEY, private_key_pem(tls))
    kem_public = kem_signature = None
    if inv.uses_ckks:
        kem = X25519KeyPair.generate()
        _write_kem_key(root / KEM_FILE, kem)
        kem_public = kem.public_bytes()
        kem_signature = identity.sign(_kem_signed_bytes(inv.name, enterprise_id, kem_public))
    policy = SitePolicy(
        enterprise_id=enterprise_id,
        budget_epsilon=budget_epsilon or inv.dp.target_epsilon,
        delta=inv.dp.delta,
        min_noise_multiplier=min_noise_multiplier,
        min_threshold=2,
        min_participants=2,
    )
    (root / SITE_FILE).write_text(site_policy_to_toml(policy))
    path = root / REQUEST_FILE if request is None else Path(request)
    return _write_request(path, identity, inv, digest, role="enterprise", party_id=enterprise_id,
                          csr=make_csr(tls, enterprise_id, [x509.DNSName(enterprise_id)]),
                          kem_public_key=kem_public, kem_signature=kem_signature)


def coordinator_init(invitation: str | Path, out: str | Path, *,
                     request: str | Path | None = None, force: bool = False) -> Path:
    """The coordinator's own keys, made locally under ``out``; returns the request file.

    Writes ``server.key`` and ``identity.key`` (Ed25519, its own identity), both 0600, plus
    ``invitation.toml``, ``ca.pem`` and the request (default ``out/request.toml``).

    Raises:
        ConfigError: a bad invitation, or ``out`` not new/empty (without force).
    """
    load_invitation(invitation)
    root = Path(out)
    _fresh_dir(root, "--out", force)
    from secfed.federation.kits import write_coordinator_identity

    inv, digest = _invitation_copy(Path(invitation), root)
    write_coordinator_identity(root)  # the coordinator's own: made here, never by the admin
    identity = IdentityKey.from_pem((root / COORDINATOR_IDENTITY).read_bytes())
    tls = new_tls_key()
    write_private_pem(root / SERVER_KEY, private_key_pem(tls))
    path = root / REQUEST_FILE if request is None else Path(request)
    return _write_request(path, identity, inv, digest, role="coordinator", party_id=COORDINATOR_ID,
                          csr=make_csr(tls, inv.host, server_names(inv.host)))


# --------------------------------------------------------------------------------------------
# The admin signs


def sign_requests(admin: str | Path, requests: Sequence[str | Path], out: str | Path, *,
                  force: bool = False) -> FederationConfig:
    """Check every request, certify the keys, pin the roster (enterprises in the order given)
    and write the bundle under ``out``: ``ca.pem``, ``federation.toml``, ``coordinator.pem``,
    ``certs/<id>.pem`` and (ckks) ``ckks_recipients.toml``. The admin keeps a copy of the
    ``federation.toml`` it pinned.

    Raises:
        ConfigError: a request breaks a rule (named, one line), or not exactly one coordinator
            request, or the settings break a rule for this roster.
    """
    adm = Path(admin)
    inv_path = _need(adm / INVITATION_FILE, f"admin folder {adm}")
    inv = load_invitation(inv_path)
    digest = fingerprint(inv_path)
    ca = CertifiedKey(_need(adm / CA_KEY_FILE, f"admin folder {adm}").read_bytes(),
                      _need(adm / CA_FILE, f"admin folder {adm}").read_bytes())
    if ca.certificate.public_bytes(serialization.Encoding.DER) != inv.ca_der():
        raise ConfigError(f"admin folder {adm}: ca.pem must be the invitation's CA (mismatch)")
    coordinator: tuple[Request, Any] | None = None
    sites: list[tuple[Request, Any]] = []
    seen_ids: set[str] = set()
    seen_keys: set[bytes] = set()
    for path in requests:
        source = f"request {path}"
        req = load_request(path)
        key = check_request(req, inv, digest, source=source)
        if req.id in seen_ids:
            raise ConfigError(f"{source}: id must be unique (got {req.id!r} twice)")
        if req.identity_public_key in seen_keys:
            raise ConfigError(f"{source}: identity_public_key must be unique (already enrolled)")
        seen_ids.add(req.id)
        seen_keys.add(req.identity_public_key)
        if req.role == "coordinator":
            coordinator = (req, key)
        else:
            sites.append((req, key))
    if coordinator is None:
        raise ConfigError("--request must include the coordinator's request (got none)")
    roster = tuple(RosterEntry(id=r.id, identity_public_key=r.identity_public_key.hex())
                   for r, _ in sites)
    fed = inv.federation(roster, coordinator_identity=coordinator[0].identity_public_key)
    root = Path(out)
    _fresh_dir(root, "--out", force)
    (root / CA_FILE).write_bytes(ca.cert_pem)
    fed_toml = federation_to_toml(fed)
    (root / FEDERATION_FILE).write_text(fed_toml)
    (adm / FEDERATION_FILE).write_text(fed_toml)
    (root / COORDINATOR_CERT).write_bytes(issue_from_csr(
        ca, coordinator[1], common_name=inv.host, sans=server_names(inv.host), server=True))
    (root / BUNDLE_CERTS).mkdir()
    for req, key in sites:
        (root / BUNDLE_CERTS / f"{req.id}.pem").write_bytes(issue_from_csr(
            ca, key, common_name=req.id, sans=[x509.DNSName(req.id)], server=False))
    if inv.uses_ckks:
        recipients = [{"id": r.id, "ckks_kem_public_key": r.kem_public_key.hex(),  # type: ignore[union-attr]
                       "ckks_kem_signature": r.kem_signature.hex()}  # type: ignore[union-attr]
                      for r, _ in sites]
        (root / RECIPIENTS_FILE).write_text(
            "# each site's X25519 key for the CKKS secret, signed by its pinned identity key\n"
            + dump_toml({"recipient": recipients}))
    return fed


# --------------------------------------------------------------------------------------------
# Each party imports the bundle


def _check_bundle_federation(inv: Invitation, bundle: Path) -> FederationConfig:
    try:
        ca = x509.load_pem_x509_certificate(_need(bundle / CA_FILE, f"bundle {bundle}").read_bytes())
    except ValueError:
        raise ConfigError(f"bundle {bundle}: ca.pem must be a PEM certificate (unparseable)") from None
    if ca.public_bytes(serialization.Encoding.DER) != inv.ca_der():
        raise ConfigError(f"bundle {bundle}: ca.pem must be the invitation's CA (got another)")
    fed = load_federation(_need(bundle / FEDERATION_FILE, f"bundle {bundle}"))
    expected = inv.federation(fed.roster, coordinator_identity=fed.coordinator_public_key()
                              ).model_dump(mode="json")
    got = fed.model_dump(mode="json")
    for key in expected:
        if expected[key] != got.get(key):
            raise ConfigError(f"bundle federation.toml: {key} must be what the invitation pinned "
                              f"(invitation {expected[key]!r}, got {got.get(key)!r})")
    return fed


def _check_cert(cert_path: Path, inv: Invitation, public_der: bytes, common_name: str) -> bytes:
    pem = _need(cert_path, "bundle").read_bytes()
    try:
        cert = x509.load_pem_x509_certificate(pem)
        cert.verify_directly_issued_by(x509.load_pem_x509_certificate(inv.ca_pem))
    except (ValueError, TypeError, PycaInvalidSignature) as exc:
        raise ConfigError(f"{cert_path}: certificate must be issued by the invitation's CA "
                          f"({type(exc).__name__})") from None
    got = cert.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    if got != public_der:
        raise ConfigError(f"{cert_path}: certificate must certify this party's own TLS key "
                          "(it certifies another key)")
    cns = [str(a.value) for a in cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)]
    if cns != [common_name]:
        raise ConfigError(f"{cert_path}: certificate CN must be {common_name!r} (got {cns})")
    return pem


def _tls_public_der(key_path: Path) -> bytes:
    key = load_tls_key(key_path.read_bytes())
    return key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def site_import(kit: str | Path, bundle: str | Path) -> FederationConfig:
    """Install the admin's bundle into a site's kit after checking it: the invitation's CA and
    settings, this site pinned with its own identity key, a certificate for its own TLS key and
    (ckks) its own X25519 key among the recipients.

    Raises:
        ConfigError: the bundle differs from what this site asked for.
    """
    root, b = Path(kit), Path(bundle)
    what = f"site kit {root}"
    inv = load_invitation(_need(root / INVITATION_FILE, what))
    from secfed.config import load_site_policy

    eid = load_site_policy(_need(root / SITE_FILE, what)).enterprise_id
    identity = IdentityKey.from_pem(_need(root / SITE_IDENTITY, what).read_bytes())
    fed = _check_bundle_federation(inv, b)
    if eid not in fed.enterprise_ids():
        raise ConfigError(f"bundle federation.toml: roster must list {eid!r} "
                          f"(got {list(fed.enterprise_ids())})")
    if fed.public_key_of(eid) != identity.public_bytes():
        raise ConfigError(f"bundle federation.toml: roster must pin {eid!r}'s own identity key "
                          "(it pins another key)")
    cert = _check_cert(b / BUNDLE_CERTS / f"{eid}.pem", inv,
                       _tls_public_der(_need(root / CLIENT_KEY, what)), eid)
    if inv.uses_ckks:
        recipients = _load_recipients(_need(b / RECIPIENTS_FILE, f"bundle {b}"), fed)
        own = _load_kem_key(root / KEM_FILE).public_bytes()
        if recipients.get(eid) != own:
            raise ConfigError(f"bundle {RECIPIENTS_FILE}: must list {eid!r}'s own X25519 key "
                              "(it lists another key or none)")
        shutil.copyfile(b / RECIPIENTS_FILE, root / RECIPIENTS_FILE)
    (root / CLIENT_CERT).write_bytes(cert)
    shutil.copyfile(b / FEDERATION_FILE, root / FEDERATION_FILE)
    return fed


def coordinator_import(kit: str | Path, bundle: str | Path) -> FederationConfig:
    """Install the bundle into the coordinator's kit after checking it (the invitation's CA and
    settings, a server certificate for its own TLS key, its own identity key pinned).

    Raises:
        ConfigError: the bundle differs from what the coordinator asked for.
    """
    root, b = Path(kit), Path(bundle)
    what = f"coordinator kit {root}"
    inv = load_invitation(_need(root / INVITATION_FILE, what))
    identity = IdentityKey.from_pem(_need(root / COORDINATOR_IDENTITY, what).read_bytes())
    fed = _check_bundle_federation(inv, b)
    if fed.coordinator_public_key() != identity.public_bytes():
        raise ConfigError("bundle federation.toml: coordinator_identity_public_key must be the "
                          "coordinator's own identity key (it pins another key)")
    cert = _check_cert(b / COORDINATOR_CERT, inv, _tls_public_der(_need(root / SERVER_KEY, what)),
                       inv.host)
    (root / SERVER_CERT).write_bytes(cert)
    shutil.copyfile(b / FEDERATION_FILE, root / FEDERATION_FILE)
    return fed


# --------------------------------------------------------------------------------------------
# The CKKS secret: made by one enterprise, sealed to each other enterprise


def _load_recipients(path: Path, fed: FederationConfig) -> dict[str, bytes]:
    """Each roster enterprise's X25519 key, every signature checked under its pinned key."""
    source = f"{path}"
    entries = _read_toml(path, "recipients").get("recipient")
    if not isinstance(entries, list):
        raise ConfigError(f"{source}: [[recipient]] entries must be present (missing)")
    out: dict[str, bytes] = {}
    for entry in entries:
        if not isinstance(entry, dict):
            raise ConfigError(f"{source}: each recipient must be a table (got {entry!r})")
        eid = _str(entry, "id", source)
        kem = _hex(entry, "ckks_kem_public_key", source, 32)
        sig = _hex(entry, "ckks_kem_signature", source, 64)
        try:
            verify_signature(fed.public_key_of(eid), sig, _kem_signed_bytes(fed.name, eid, kem))
        except InvalidSignature:
            raise ConfigError(f"{source}: ckks_kem_signature of {eid!r} must verify under its "
                              "pinned identity key (invalid)") from None
        out[eid] = kem
    missing = [e for e in fed.enterprise_ids() if e not in out]
    if missing:
        raise ConfigError(f"{source}: must list every roster enterprise (missing {missing})")
    return out


def _transfer_context(fed_digest: bytes, sender: str, receiver: str, ephemeral: bytes,
                      kem_public: bytes, public_digest: bytes) -> bytes:
    return LABEL_CKKS_TRANSFER + _fields(fed_digest, sender, receiver, ephemeral, kem_public,
                                         public_digest)


def seal_ckks_secret(secret: bytes, *, public_digest: bytes, fed_digest: bytes, sender: str,
                     sender_identity: IdentityKey, receiver: str, kem_public: bytes) -> dict[str, Any]:
    """One sealed, signed copy of the CKKS secret context for ``receiver``."""
    eph = X25519KeyPair.generate()
    ctx = _transfer_context(fed_digest, sender, receiver, eph.public_bytes(), kem_public,
                            public_digest)
    key = hkdf(agree(eph, kem_public), salt=eph.public_bytes() + kem_public, info=ctx)
    sealed = seal(key, secret, associated_data=ctx)
    signature = sender_identity.sign(LABEL_CKKS_COPY + _fields(ctx, _sha256(sealed)))
    return {"version": VERSION, "federation_sha256": fed_digest.hex(), "sender": sender,
            "receiver": receiver, "ephemeral_public_key": eph.public_bytes().hex(),
            "ckks_kem_public_key": kem_public.hex(), "public_context_sha256": public_digest.hex(),
            "sealed": base64.b64encode(sealed).decode(), "signature": signature.hex()}


def open_ckks_secret(copy: Mapping[str, Any], *, fed: FederationConfig, fed_digest: bytes,
                     receiver: str, kem: X25519KeyPair, source: str) -> tuple[bytes, bytes]:
    """Check and open a sealed copy; returns ``(secret context, public context digest)``.

    Raises:
        ConfigError: addressed to another site, from a sender off the roster, a bad signature,
            another federation, or it does not open with this site's key.
    """
    _version(copy, source)
    sender = _str(copy, "sender", source)
    if _str(copy, "receiver", source) != receiver:
        raise ConfigError(f"{source}: receiver must be {receiver!r} (got {copy['receiver']!r})")
    if sender not in fed.enterprise_ids() or sender == receiver:
        raise ConfigError(f"{source}: sender must be another roster enterprise (got {sender!r})")
    if _hex(copy, "federation_sha256", source, 32) != fed_digest:
        raise ConfigError(f"{source}: federation_sha256 must be this kit's federation.toml "
                          "(it names another federation)")
    eph = _hex(copy, "ephemeral_public_key", source, 32)
    kem_public = _hex(copy, "ckks_kem_public_key", source, 32)
    public_digest = _hex(copy, "public_context_sha256", source, 32)
    sealed = _b64(copy, "sealed", source)
    ctx = _transfer_context(fed_digest, sender, receiver, eph, kem_public, public_digest)
    try:
        verify_signature(fed.public_key_of(sender), _hex(copy, "signature", source, 64),
                         LABEL_CKKS_COPY + _fields(ctx, _sha256(sealed)))
    except InvalidSignature:
        raise ConfigError(f"{source}: signature must verify under {sender!r}'s pinned identity "
                          "key (invalid)") from None
    if kem_public != kem.public_bytes():
        raise ConfigError(f"{source}: copy must be sealed to this site's ckks_kem.key "
                          "(sealed to another key)")
    try:
        key = hkdf(agree(kem, eph), salt=eph + kem_public, info=ctx)
        secret = open_sealed(key, sealed, associated_data=ctx)
    except DecryptionError:
        raise ConfigError(f"{source}: sealed secret must open with this site's ckks_kem.key "
                          "(it does not)") from None
    return secret, public_digest


def ckks_keygen(kit: str | Path, out: str | Path, *, force: bool = False) -> list[Path]:
    """Make the federation's CKKS secret at this site and seal one copy to each other roster
    enterprise; write them, the public context and its signature under ``out`` (to hand to the
    other sites and the coordinator: nothing there opens without a site's X25519 key).

    Raises:
        ConfigError: the federation never schedules ckks, the kit already holds a CKKS secret
            (without force), or the recipients file is missing or forged.
    """
    from secfed.crypto import ckks
    from secfed.federation.kits import EnterpriseKit

    k = EnterpriseKit.load(kit)
    fed = k.federation
    if "ckks" not in fed.mode_schedule:
        raise ConfigError(f"mode_schedule never schedules ckks (got {list(fed.mode_schedule)}): "
                          "a federation without ckks has no CKKS secret")
    if k.ckks_secret.exists() and not force:
        raise ConfigError(f"site kit {k.root} already holds {CKKS_SECRET_FILE} "
                          "(--force makes a new one)")
    recipients = _load_recipients(_need(k.root / RECIPIENTS_FILE, f"site kit {k.root}"), fed)
    identity = k.identity()
    fed_digest = _sha256((k.root / FEDERATION_FILE).read_bytes())
    ctx = ckks.new_context()
    secret, public = ctx.serialize(secret=True), ctx.serialize(secret=False)
    public_digest = _sha256(public)
    root = Path(out)
    _fresh_dir(root, "--out", force)
    written = []
    for eid in fed.enterprise_ids():
        if eid == k.enterprise_id:
            continue
        copy = seal_ckks_secret(secret, public_digest=public_digest, fed_digest=fed_digest,
                                sender=k.enterprise_id, sender_identity=identity, receiver=eid,
                                kem_public=recipients[eid])
        path = root / f"{eid}{COPY_SUFFIX}"
        path.write_text(f"# the CKKS secret, sealed to {eid!r}'s X25519 key\n"
                        + dump_toml({"ckks_secret_copy": copy}))
        written.append(path)
    (root / CKKS_PUBLIC_FILE).write_bytes(public)
    signature = identity.sign(LABEL_CKKS_PUBLIC + _fields(fed_digest, public_digest))
    (root / CKKS_PUBLIC_SIGNATURE).write_text(dump_toml({"ckks_public": {
        "version": VERSION, "sender": k.enterprise_id, "federation_sha256": fed_digest.hex(),
        "public_context_sha256": public_digest.hex(), "signature": signature.hex()}}))
    write_private_pem(k.ckks_secret, secret)
    return written


def site_ckks_import(kit: str | Path, source_dir: str | Path) -> str:
    """Open this site's sealed copy from ``source_dir`` and install ``ckks_secret.ctx``;
    returns the sender.

    Raises:
        ConfigError: no copy for this site, or the copy fails a check.
    """
    from secfed.crypto import ckks
    from secfed.errors import CkksError
    from secfed.federation.kits import EnterpriseKit

    k = EnterpriseKit.load(kit)
    eid = k.enterprise_id
    path = Path(source_dir) / f"{eid}{COPY_SUFFIX}"
    copy = _table(_read_toml(path, "CKKS secret copy"), "ckks_secret_copy", str(path))
    fed_digest = _sha256((k.root / FEDERATION_FILE).read_bytes())
    secret, public_digest = open_ckks_secret(copy, fed=k.federation, fed_digest=fed_digest,
                                             receiver=eid, kem=_load_kem_key(k.root / KEM_FILE),
                                             source=str(path))
    try:
        ctx = ckks.load_context(secret, expect_secret=True)
    except CkksError as exc:
        raise ConfigError(f"{path}: sealed secret must be a CKKS secret context ({exc})") from None
    if _sha256(ctx.serialize(secret=False)) != public_digest:
        raise ConfigError(f"{path}: public_context_sha256 must match the secret's public form "
                          "(mismatch)")
    write_private_pem(k.ckks_secret, secret)
    return _str(copy, "sender", str(path))


def coordinator_ckks_import(kit: str | Path, source_dir: str | Path) -> str:
    """Install the key-free CKKS public context after checking its sender's signature; returns
    the sender.

    Raises:
        ConfigError: missing, unsigned, signed by no roster enterprise, or carrying a secret key.
    """
    from secfed.crypto import ckks
    from secfed.errors import CkksError
    from secfed.federation.kits import CoordinatorKit

    k = CoordinatorKit.load(kit)
    src = Path(source_dir)
    public = _need(src / CKKS_PUBLIC_FILE, f"folder {src}").read_bytes()
    meta_path = _need(src / CKKS_PUBLIC_SIGNATURE, f"folder {src}")
    meta = _table(_read_toml(meta_path, "CKKS public context signature"), "ckks_public",
                  str(meta_path))
    _version(meta, str(meta_path))
    sender = _str(meta, "sender", str(meta_path))
    fed_digest = _sha256((k.root / FEDERATION_FILE).read_bytes())
    if sender not in k.federation.enterprise_ids():
        raise ConfigError(f"{meta_path}: sender must be a roster enterprise (got {sender!r})")
    try:
        verify_signature(k.federation.public_key_of(sender),
                         _hex(meta, "signature", str(meta_path), 64),
                         LABEL_CKKS_PUBLIC + _fields(fed_digest, _sha256(public)))
    except InvalidSignature:
        raise ConfigError(f"{meta_path}: signature must verify under {sender!r}'s pinned "
                          "identity key over this federation and ckks_public.ctx (invalid)") from None
    try:
        ckks.load_context(public, expect_secret=False)
    except CkksError as exc:
        raise ConfigError(f"{src / CKKS_PUBLIC_FILE}: must be a key-free CKKS context ({exc})") from None
    (k.root / CKKS_PUBLIC_FILE).write_bytes(public)
    return sender
