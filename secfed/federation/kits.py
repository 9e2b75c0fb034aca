"""Startup kits: one directory per party, each made by its own party (see
:mod:`secfed.federation.enrol`).

:func:`create_kits` runs the whole enrolment in-process on one machine (tests, benches, ``make
demo``), one folder per party under the output directory::

    ca/            the admin: ca.pem, ca.key (0600), invitation.toml, federation.toml (a copy)
    coordinator/   federation.toml, invitation.toml, ca.pem, server.pem, server.key (0600),
                   identity.key (0600, its own Ed25519), ckks_public.ctx (ckks federations only)
    <enterprise>/  federation.toml, invitation.toml, site.toml, ca.pem, client.pem,
                   client.key (0600), identity.pem (0600, Ed25519); in ckks federations also
                   ckks_kem.key (0600, X25519), ckks_recipients.toml, ckks_secret.ctx (0600)
    exchange/      what travels between parties, all public or sealed: requests/, bundle/, ckks/

Neither the admin's folder nor the coordinator's holds an enterprise secret: every enterprise key
is made in the enterprise's own folder, and the CKKS secret reaches the other enterprises sealed
to their X25519 keys. A federation that never schedules ``ckks`` has no CKKS secret anywhere.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from secfed.config import (
    Deadlines,
    DPSettings,
    FederationConfig,
    ModelSettings,
    SitePolicy,
    check_enterprise_id,
    default_of,
    load_federation,
    load_site_policy,
)
from secfed.crypto.keys import IdentityKey
from secfed.errors import ConfigError
from secfed.federation.enrol import (
    CA_FILE,
    CKKS_PUBLIC_FILE,
    CKKS_SECRET_FILE,
    FEDERATION_FILE,
    RESERVED_IDS,
    SITE_FILE,
    distributed_sum_abs,
    ring_bits_for,
)
from secfed.federation.pki import write_private_pem

__all__ = ["KitPaths", "CoordinatorKit", "EnterpriseKit", "create_kits", "ring_bits_for",
           "distributed_sum_abs", "write_coordinator_identity"]

STATE_FILE = "state.sqlite"
LEDGER_FILE = "ledger.sqlite"
COORDINATOR_IDENTITY_FILE = "identity.key"


@dataclass(frozen=True)
class KitPaths:
    root: Path
    coordinator: Path
    enterprises: dict[str, Path]

    @property
    def admin(self) -> Path:
        """The admin's folder: the CA key and public material only."""
        return self.root / "ca"

    @property
    def exchange(self) -> Path:
        """What travelled between the parties: requests, the bundle, sealed CKKS copies."""
        return self.root / "exchange"


@dataclass(frozen=True)
class _PartyKit:
    """What the coordinator's and an enterprise's kits share: the folder, its federation.toml,
    the CA certificate, the party's TLS certificate and key, its state and its identity key."""

    root: Path
    federation: FederationConfig

    _WHAT: ClassVar[str]  # the party, in errors
    _TLS_NAME: ClassVar[str]  # <name>.pem and <name>.key: the TLS certificate and key
    _IDENTITY_FILE: ClassVar[str]  # the party's Ed25519 identity key

    @classmethod
    def _required(cls, root: Path, *more: str) -> None:
        """Every file a kit of this party must hold exists under ``root``.

        Raises:
            ConfigError: the first file missing.
        """
        for name in (FEDERATION_FILE, *more, CA_FILE, f"{cls._TLS_NAME}.pem",
                     f"{cls._TLS_NAME}.key", cls._IDENTITY_FILE):
            if not (root / name).is_file():
                raise ConfigError(f"{cls._WHAT} kit {root} must contain {name} (missing)")

    def _pinned_identity(self, pinned: bytes, pin: str) -> IdentityKey:
        """The party's identity key, checked against its ``pinned`` public key (``pin`` names
        where that key is pinned).

        Raises:
            ConfigError: the file is not an Ed25519 PKCS#8 PEM key, or does not match the pin.
        """
        identity = IdentityKey.from_pem((self.root / self._IDENTITY_FILE).read_bytes())
        if identity.public_bytes() != pinned:
            raise ConfigError(f"{self._IDENTITY_FILE} must match {pin} (mismatch)")
        return identity

    @property
    def ca(self) -> Path:
        return self.root / CA_FILE

    @property
    def cert(self) -> Path:
        return self.root / f"{self._TLS_NAME}.pem"

    @property
    def key(self) -> Path:
        return self.root / f"{self._TLS_NAME}.key"

    @property
    def state(self) -> Path:
        return self.root / STATE_FILE


@dataclass(frozen=True)
class CoordinatorKit(_PartyKit):
    """The coordinator's kit, loaded and validated."""

    _WHAT = "coordinator"
    _TLS_NAME = "server"
    _IDENTITY_FILE = COORDINATOR_IDENTITY_FILE

    @classmethod
    def load(cls, root: str | Path) -> CoordinatorKit:
        r = Path(root)
        cls._required(r)
        return cls(r, load_federation(r / FEDERATION_FILE))

    def identity(self) -> IdentityKey:
        """The coordinator's own Ed25519 identity (``identity.key``), checked against the key
        ``federation.toml`` pins.

        Raises:
            ConfigError: the file is not an Ed25519 PKCS#8 PEM key, or does not match the pin.
        """
        return self._pinned_identity(self.federation.coordinator_public_key(),
                                     "federation.toml's coordinator_identity_public_key")

    @property
    def ckks_public(self) -> Path:
        return self.root / CKKS_PUBLIC_FILE


@dataclass(frozen=True)
class EnterpriseKit(_PartyKit):
    """An enterprise's kit, loaded and validated."""

    policy: SitePolicy

    _WHAT = "enterprise"
    _TLS_NAME = "client"
    _IDENTITY_FILE = "identity.pem"

    @classmethod
    def load(cls, root: str | Path) -> EnterpriseKit:
        r = Path(root)
        cls._required(r, SITE_FILE)
        fed = load_federation(r / FEDERATION_FILE)
        policy = load_site_policy(r / SITE_FILE)
        if policy.enterprise_id not in fed.enterprise_ids():
            raise ConfigError(
                f"site.toml enterprise_id must be on the roster (got {policy.enterprise_id!r})"
            )
        return cls(r, fed, policy)

    @property
    def enterprise_id(self) -> str:
        return self.policy.enterprise_id

    @property
    def ledger(self) -> Path:
        return self.root / LEDGER_FILE

    @property
    def ckks_secret(self) -> Path:
        return self.root / CKKS_SECRET_FILE

    def identity(self) -> IdentityKey:
        return self._pinned_identity(self.federation.public_key_of(self.enterprise_id),
                                     "the roster's pinned public key")


def write_coordinator_identity(kit_dir: str | Path) -> bytes:
    """Generate the coordinator's Ed25519 identity into ``kit_dir/identity.key`` (0600) and return
    its raw public key, which ``federation.toml`` pins as ``coordinator_identity_public_key``.
    Run by the coordinator itself (``secfed coordinator init``), never by the admin.

    Raises:
        ConfigError: ``kit_dir`` already holds an identity key (it is never overwritten: every
            receipt a site keeps is anchored under it).
    """
    path = Path(kit_dir) / COORDINATOR_IDENTITY_FILE
    if path.exists():
        raise ConfigError(f"coordinator identity key must not be overwritten (got existing {path})")
    path.parent.mkdir(parents=True, exist_ok=True)
    identity = IdentityKey.generate()
    write_private_pem(path, identity.to_pem())
    return identity.public_bytes()


def create_kits(
    out: str | Path,
    *,
    name: str,
    enterprises: list[str],
    coordinator_url: str,
    model: ModelSettings,
    mode_schedule: tuple[str, ...] = ("secagg",),
    rounds: int = 4,
    threshold: int | None = None,
    min_participants: int | None = None,
    deadlines: Deadlines | None = None,
    dp: DPSettings | None = None,
    policy_budget_epsilon: float | None = None,
    policy_min_noise_multiplier: float | None = None,
    force: bool = False,
) -> KitPaths:
    """Run the whole enrolment on this machine: the admin's invitation, each party's own keys
    and request, the admin's signature, each party's import and (ckks federations only) one
    enterprise's CKKS secret sealed to the others. One folder per party (module docstring).

    Raises:
        ConfigError: a setting breaks a rule, or ``out`` exists and is not empty (without force).
    """
    from secfed.federation import enrol

    root = Path(out)
    if root.exists() and any(root.iterdir()):
        if not force:
            raise ConfigError(f"--out must be a new or empty directory (got {root}, not empty)")
        shutil.rmtree(root)
    for eid in enterprises:  # before pydantic sees it: one line that states the rule
        check_enterprise_id(eid, field="--enterprise")
    if len(set(enterprises)) != len(enterprises):
        raise ConfigError(f"--enterprise values must be unique (got {enterprises})")
    reserved = sorted(set(enterprises) & RESERVED_IDS)
    if reserved:
        raise ConfigError(f"--enterprise must not be one of {sorted(RESERVED_IDS)} (got {reserved})")
    admin, exchange = root / "ca", root / "exchange"
    # invite checks every setting against the real roster size before any key or file exists
    enrol.invite(admin, name=name, coordinator_url=coordinator_url, model=model,
                 mode_schedule=tuple(mode_schedule), rounds=rounds, threshold=threshold,
                 min_participants=min_participants, deadlines=deadlines, dp=dp,
                 n_enterprises=len(enterprises))
    invitation = admin / enrol.INVITATION_FILE
    requests = [enrol.coordinator_init(invitation, root / "coordinator",
                                       request=exchange / "requests" / "coordinator.toml")]
    paths: dict[str, Path] = {}
    for eid in enterprises:
        paths[eid] = root / eid
        requests.append(enrol.site_init(
            invitation, eid, paths[eid], request=exchange / "requests" / f"{eid}.toml",
            budget_epsilon=policy_budget_epsilon,
            min_noise_multiplier=(default_of(SitePolicy, "min_noise_multiplier")
                                  if policy_min_noise_multiplier is None
                                  else policy_min_noise_multiplier),
        ))
    bundle = exchange / "bundle"
    enrol.sign_requests(admin, requests, bundle)
    enrol.coordinator_import(root / "coordinator", bundle)
    for eid in enterprises:
        enrol.site_import(paths[eid], bundle)
    if "ckks" in mode_schedule:
        ckks_dir = exchange / "ckks"
        enrol.ckks_keygen(paths[enterprises[0]], ckks_dir)
        for eid in enterprises[1:]:
            enrol.site_ckks_import(paths[eid], ckks_dir)
        enrol.coordinator_ckks_import(root / "coordinator", ckks_dir)
    return KitPaths(root=root, coordinator=root / "coordinator", enterprises=paths)
