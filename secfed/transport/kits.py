"""Startup kits: one directory per party, written once by the federation admin.

Layout under the output directory::

    ca/            ca.pem, ca.key (0600)          -- the admin's; never copied into a kit
    coordinator/   federation.toml, ca.pem, server.pem, server.key (0600), ckks_public.ctx,
                   identity.key (0600, Ed25519: the coordinator's own; signs ledger receipts
                   and its transcript)
    <enterprise>/  federation.toml, site.toml, ca.pem, client.pem, client.key (0600),
                   identity.pem (0600, Ed25519), ckks_secret.ctx (0600)

The coordinator's kit holds no enterprise secret: no client key, no identity key, no CKKS secret
key (its CKKS context is serialised without one).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from secfed.config import (
    Deadlines,
    DistributedDPSettings,
    DPSettings,
    FederationConfig,
    ModelSettings,
    RosterEntry,
    SitePolicy,
    default_threshold,
    federation_to_toml,
    load_federation,
    load_site_policy,
    site_policy_to_toml,
    validated,
)
from secfed.crypto.errors import ConfigError
from secfed.crypto.keys import IdentityKey
from secfed.transport.pki import (
    issue_client_cert,
    issue_server_cert,
    make_ca,
    write_private_pem,
)

__all__ = [
    "KitPaths",
    "CoordinatorKit",
    "EnterpriseKit",
    "create_kits",
    "write_coordinator_identity",
]

FEDERATION_FILE = "federation.toml"
SITE_FILE = "site.toml"
CA_FILE = "ca.pem"
CKKS_PUBLIC_FILE = "ckks_public.ctx"
CKKS_SECRET_FILE = "ckks_secret.ctx"
STATE_FILE = "state.sqlite"
LEDGER_FILE = "ledger.sqlite"
COORDINATOR_IDENTITY_FILE = "identity.key"


@dataclass(frozen=True)
class KitPaths:
    root: Path
    coordinator: Path
    enterprises: dict[str, Path]


@dataclass(frozen=True)
class CoordinatorKit:
    """The coordinator's kit, loaded and validated."""

    root: Path
    federation: FederationConfig

    @classmethod
    def load(cls, root: str | Path) -> CoordinatorKit:
        r = Path(root)
        for name in (FEDERATION_FILE, CA_FILE, "server.pem", "server.key", COORDINATOR_IDENTITY_FILE):
            if not (r / name).is_file():
                raise ConfigError(f"coordinator kit {r} must contain {name} (missing)")
        return cls(r, load_federation(r / FEDERATION_FILE))

    def identity(self) -> IdentityKey:
        """The coordinator's own Ed25519 identity (``identity.key``), checked against the key
        ``federation.toml`` pins.

        Raises:
            ConfigError: the file is not an Ed25519 PKCS#8 PEM key, or does not match the pin.
        """
        identity = IdentityKey.from_pem((self.root / COORDINATOR_IDENTITY_FILE).read_bytes())
        if identity.public_bytes() != self.federation.coordinator_public_key():
            raise ConfigError(
                "identity.key must match federation.toml's coordinator_identity_public_key (mismatch)"
            )
        return identity

    @property
    def ca(self) -> Path:
        return self.root / CA_FILE

    @property
    def cert(self) -> Path:
        return self.root / "server.pem"

    @property
    def key(self) -> Path:
        return self.root / "server.key"

    @property
    def state(self) -> Path:
        return self.root / STATE_FILE

    @property
    def ckks_public(self) -> Path:
        return self.root / CKKS_PUBLIC_FILE


@dataclass(frozen=True)
class EnterpriseKit:
    """An enterprise's kit, loaded and validated."""

    root: Path
    federation: FederationConfig
    policy: SitePolicy

    @classmethod
    def load(cls, root: str | Path) -> EnterpriseKit:
        r = Path(root)
        for name in (FEDERATION_FILE, SITE_FILE, CA_FILE, "client.pem", "client.key", "identity.pem"):
            if not (r / name).is_file():
                raise ConfigError(f"enterprise kit {r} must contain {name} (missing)")
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
    def ca(self) -> Path:
        return self.root / CA_FILE

    @property
    def cert(self) -> Path:
        return self.root / "client.pem"

    @property
    def key(self) -> Path:
        return self.root / "client.key"

    @property
    def state(self) -> Path:
        return self.root / STATE_FILE

    @property
    def ledger(self) -> Path:
        return self.root / LEDGER_FILE

    @property
    def ckks_secret(self) -> Path:
        return self.root / CKKS_SECRET_FILE

    def identity(self) -> IdentityKey:
        identity = IdentityKey.from_pem((self.root / "identity.pem").read_bytes())
        pinned = self.federation.public_key_of(self.enterprise_id)
        if identity.public_bytes() != pinned:
            raise ConfigError("identity.pem must match the roster's pinned public key (mismatch)")
        return identity


def write_coordinator_identity(kit_dir: str | Path) -> bytes:
    """Generate the coordinator's Ed25519 identity into ``kit_dir/identity.key`` (0600) and return
    its raw public key, which ``federation.toml`` pins as ``coordinator_identity_public_key``.

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


def _ckks_contexts() -> tuple[bytes, bytes] | None:
    """(secret context, public context) from secfed.crypto.ckks, or None if not built yet."""
    try:
        from secfed.crypto import ckks  # tenseal is heavy: import on use
    except ImportError:
        return None
    ctx = ckks.new_context()
    return ctx.serialize(secret=True), ctx.serialize(secret=False)


def distributed_sum_abs(n_participants: int, model: ModelSettings,
                        distributed: DistributedDPSettings) -> int:
    """Ring units a coordinate of the noised sum stays within, whatever the round's guaranteed
    number of noise shares (sized for one share: the largest per-share noise)."""
    from secfed.privacy.distributed import DistributedDP

    hook = DistributedDP(clip_norm=distributed.clip_norm,
                         noise_multiplier=distributed.noise_multiplier,
                         min_participants=distributed.min_participants,
                         norm_units=distributed.norm_units, force=distributed.force)
    return hook.max_sum_abs(n_participants=n_participants, guaranteed=1,
                            dim=model.vector_length, scale_bits=model.scale_bits)


def ring_bits_for(n_participants: int, model: ModelSettings,
                  distributed: DistributedDPSettings | None = None) -> int:
    """The smaller ring (Z_2^32 before Z_2^64) whose headroom holds the sum of ``n`` clipped
    updates at the model's scale (and, with distributed DP, their noise shares): half the
    upload bytes whenever the federation is small."""
    from secfed.crypto.encoding import check_headroom
    from secfed.crypto.errors import HeadroomError

    try:
        check_headroom(n_participants=n_participants, max_abs=model.clip_bound,
                       scale_bits=model.scale_bits, ring_bits=32)
    except HeadroomError:
        return 64
    if distributed is not None and distributed_sum_abs(n_participants, model, distributed) > 2**31 - 1:
        return 64
    return 32


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
    policy_min_noise_multiplier: float = 0.5,
    force: bool = False,
) -> KitPaths:
    """Create the CA, certificates, identity keys, settings and CKKS contexts for a federation.

    Raises:
        ConfigError: a setting breaks a rule, or ``out`` exists and is not empty (without force).
    """
    root = Path(out)
    if root.exists() and any(root.iterdir()):
        if not force:
            raise ConfigError(f"--out must be a new or empty directory (got {root}, not empty)")
        shutil.rmtree(root)
    if len(set(enterprises)) != len(enterprises):
        raise ConfigError(f"--enterprise values must be unique (got {enterprises})")
    host = urlsplit(coordinator_url).hostname or ""
    n = len(enterprises)
    t = threshold if threshold is not None else default_threshold(n)
    dp = dp or DPSettings()
    if "ring_bits" not in model.model_fields_set:
        model = model.model_copy(update={"ring_bits": ring_bits_for(n, model, dp.distributed)})
    elif dp.distributed is not None:
        need = distributed_sum_abs(n, model, dp.distributed)
        if need > 2 ** (model.ring_bits - 1) - 1:
            raise ConfigError(
                f"model.ring_bits = {model.ring_bits} cannot hold the distributed-DP noised sum "
                f"({need} ring units); use 64 or a smaller dp.distributed noise_multiplier/clip_norm"
            )
    identities = {eid: IdentityKey.generate() for eid in enterprises}
    coord = root / "coordinator"
    coord.mkdir(parents=True)
    coordinator_public = write_coordinator_identity(coord)
    roster = tuple(
        RosterEntry(id=eid, identity_public_key=identities[eid].public_bytes().hex())
        for eid in enterprises
    )
    fed = validated(
        FederationConfig,
        name=name,
        coordinator_url=coordinator_url,
        coordinator_identity_public_key=coordinator_public.hex(),
        roster=roster,
        rounds=rounds,
        mode_schedule=mode_schedule,
        threshold=t,
        min_participants=min_participants if min_participants is not None else t,
        deadlines=deadlines or Deadlines(),
        dp=dp,
        model=model,
    )
    fed_toml = federation_to_toml(fed)

    ca = make_ca(name)
    (root / "ca").mkdir(parents=True, exist_ok=True)
    (root / "ca" / CA_FILE).write_bytes(ca.cert_pem)
    write_private_pem(root / "ca" / "ca.key", ca.key_pem)

    contexts = _ckks_contexts()

    (coord / FEDERATION_FILE).write_text(fed_toml)
    (coord / CA_FILE).write_bytes(ca.cert_pem)
    server = issue_server_cert(ca, host)
    (coord / "server.pem").write_bytes(server.cert_pem)
    write_private_pem(coord / "server.key", server.key_pem)
    if contexts is not None:
        (coord / CKKS_PUBLIC_FILE).write_bytes(contexts[1])

    paths: dict[str, Path] = {}
    for eid in enterprises:
        d = root / eid
        d.mkdir()
        (d / FEDERATION_FILE).write_text(fed_toml)
        policy = SitePolicy(
            enterprise_id=eid,
            budget_epsilon=policy_budget_epsilon or dp.target_epsilon,
            delta=dp.delta,
            min_noise_multiplier=policy_min_noise_multiplier,
            min_threshold=2,
            min_participants=2,
        )
        (d / SITE_FILE).write_text(site_policy_to_toml(policy))
        (d / CA_FILE).write_bytes(ca.cert_pem)
        client = issue_client_cert(ca, eid)
        (d / "client.pem").write_bytes(client.cert_pem)
        write_private_pem(d / "client.key", client.key_pem)
        write_private_pem(d / "identity.pem", identities[eid].to_pem())
        if contexts is not None:
            write_private_pem(d / CKKS_SECRET_FILE, contexts[0])
        paths[eid] = d
    return KitPaths(root=root, coordinator=coord, enterprises=paths)
