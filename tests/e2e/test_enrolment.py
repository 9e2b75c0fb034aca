"""Enrolment (issue 20 item 2): every party makes its own keys; the admin holds the CA key and
public material only; the CKKS secret exists only in ckks federations, sealed enterprise to
enterprise."""

from __future__ import annotations

import base64
import os
import re
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from secfed.cli.main import cli
from secfed.config import federation_to_toml, load_federation
from secfed.crypto import ckks
from secfed.crypto.aead import open_sealed
from secfed.crypto.keys import IdentityKey, agree, hkdf
from secfed.errors import ConfigError, DecryptionError
from secfed.federation import enrol
from secfed.federation.kits import CoordinatorKit, EnterpriseKit, create_kits
from secfed.federation.plan import model_settings_for

SITES = ["energy-utility", "security-operator", "city-ops"]
PEM_KEY = re.compile(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY-----",
                     re.S)


def _model():
    return model_settings_for(model_dir=None, synthetic_dim=16)


@pytest.fixture(scope="module")
def ckks_kits(tmp_path_factory: pytest.TempPathFactory):
    return create_kits(tmp_path_factory.mktemp("enrol") / "fed", name="enrol", enterprises=SITES,
                       coordinator_url="https://127.0.0.1:8443", model=_model(),
                       mode_schedule=("secagg", "ckks"))


# --------------------------------------------------------------------------------------------
# The scanner: what an enterprise's secrets look like, and where they must not be


def _site_secrets(kit: Path) -> dict[str, bytes]:
    """Every form of this site's private keys and CKKS secret that could leak into a file."""
    out: dict[str, bytes] = {}
    for name in ("client.key", "identity.pem", "ckks_kem.key", "ckks_secret.ctx"):
        if (kit / name).is_file():
            out[f"{name} file"] = (kit / name).read_bytes()
    tls = serialization.load_pem_private_key((kit / "client.key").read_bytes(), None)
    assert isinstance(tls, ec.EllipticCurvePrivateKey)
    out["tls scalar"] = tls.private_numbers().private_value.to_bytes(32, "big")
    out["tls der"] = tls.private_bytes(serialization.Encoding.DER,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption())
    out["identity raw"] = IdentityKey.from_pem((kit / "identity.pem").read_bytes()).private_bytes()
    if (kit / "ckks_kem.key").is_file():
        out["kem raw"] = enrol._load_kem_key(kit / "ckks_kem.key").private_bytes()
    for key, raw in list(out.items()):  # the text encodings a file could carry them in
        out[f"{key} hex"] = raw.hex().encode()
        out[f"{key} b64"] = base64.b64encode(raw)
    return out


def _site_public_keys(kit: Path) -> set[bytes]:
    keys = set()
    tls = serialization.load_pem_private_key((kit / "client.key").read_bytes(), None)
    keys.add(tls.public_key().public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo))
    keys.add(IdentityKey.from_pem((kit / "identity.pem").read_bytes()).public_bytes())
    if (kit / "ckks_kem.key").is_file():
        keys.add(enrol._load_kem_key(kit / "ckks_kem.key").public_bytes())
    return keys


def _leaks(folder: Path, site_kits: list[Path]) -> list[str]:
    """Every place under ``folder`` that holds a site's private key or the CKKS secret."""
    secrets = {f"{kit.name} {k}": v for kit in site_kits for k, v in _site_secrets(kit).items()}
    publics = set().union(*(_site_public_keys(kit) for kit in site_kits))
    found = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        blob = path.read_bytes()
        found += [f"{path}: {what}" for what, secret in secrets.items() if secret in blob]
        for pem in PEM_KEY.findall(blob):  # any private key here must not be a site's
            key = serialization.load_pem_private_key(pem, None)
            pub = key.public_key()
            raw = (pub.public_bytes(serialization.Encoding.DER,
                                    serialization.PublicFormat.SubjectPublicKeyInfo)
                   if isinstance(key, ec.EllipticCurvePrivateKey)
                   else pub.public_bytes(serialization.Encoding.Raw,
                                         serialization.PublicFormat.Raw))
            if raw in publics:
                found.append(f"{path}: a site's private key (PEM)")
        try:  # a CKKS context that carries a secret key, whichever one
            if ckks.load_context(blob, expect_secret=True):
                found.append(f"{path}: a CKKS secret context")
        except Exception:  # noqa: BLE001,S110 - not a secret context: what we want
            pass
    return found


def test_admin_and_coordinator_folders_hold_no_enterprise_private_key(ckks_kits) -> None:
    sites = list(ckks_kits.enterprises.values())
    for folder in (ckks_kits.admin, ckks_kits.coordinator, ckks_kits.exchange):
        assert _leaks(folder, sites) == [], folder
    # the admin holds its CA key and public material only
    assert {p.name for p in ckks_kits.admin.iterdir()} == {
        "ca.pem", "ca.key", "invitation.toml", "federation.toml"}
    # the coordinator's own keys are its own: pinned, 0600, and no site's
    coord = CoordinatorKit.load(ckks_kits.coordinator)
    for name in ("server.key", "identity.key"):
        assert stat.S_IMODE(os.stat(coord.root / name).st_mode) == 0o600
    coord_identity = IdentityKey.from_pem((coord.root / "identity.key").read_bytes()).public_bytes()
    assert coord_identity not in {bytes.fromhex(e.identity_public_key) for e in coord.federation.roster}
    assert coord.identity().public_bytes() == coord_identity  # pinned in federation.toml
    ckks.load_context((coord.root / "ckks_public.ctx").read_bytes(), expect_secret=False)
    # every site holds its own keys (0600) and the same CKKS secret
    secrets = set()
    for kit in sites:
        for name in ("client.key", "identity.pem", "ckks_kem.key", "ckks_secret.ctx"):
            assert stat.S_IMODE(os.stat(kit / name).st_mode) == 0o600, (kit, name)
        EnterpriseKit.load(kit).identity()  # matches the pinned key
        secrets.add((kit / "ckks_secret.ctx").read_bytes())
    assert len(secrets) == 1


def test_the_scanner_finds_a_planted_site_key(ckks_kits, tmp_path: Path) -> None:
    """The scan above can fail: a site's key or the CKKS secret anywhere in a folder is found,
    as a file, inside another file, or re-encoded."""
    site = ckks_kits.enterprises["city-ops"]
    sites = list(ckks_kits.enterprises.values())
    for name in ("client.key", "identity.pem", "ckks_kem.key", "ckks_secret.ctx"):
        planted = tmp_path / name
        planted.mkdir()
        (planted / "x").write_bytes(b"prefix" + (site / name).read_bytes() + b"suffix")
        assert _leaks(planted, sites), name
    reencoded = tmp_path / "reencoded"
    reencoded.mkdir()
    raw = IdentityKey.from_pem((site / "identity.pem").read_bytes()).private_bytes()
    (reencoded / "x.toml").write_text(f'key = "{raw.hex()}"\n')
    assert _leaks(reencoded, sites)


def test_secagg_only_federation_has_no_ckks_secret_anywhere(tmp_path: Path) -> None:
    kits = create_kits(tmp_path / "fed", name="noc", enterprises=SITES,
                       coordinator_url="https://127.0.0.1:8443", model=_model(),
                       mode_schedule=("secagg", "secagg+"))
    names = {p.name for p in kits.root.rglob("*")}
    assert not names & {"ckks_secret.ctx", "ckks_public.ctx", "ckks_kem.key",
                        "ckks_recipients.toml"}, names
    for path in kits.root.rglob("*"):
        if path.is_file():
            with pytest.raises(Exception):  # noqa: B017 - no file is a CKKS context of any kind
                ckks.load_context(path.read_bytes(), expect_secret=True)
    with pytest.raises(ConfigError, match="never schedules ckks"):
        enrol.ckks_keygen(kits.enterprises["city-ops"], tmp_path / "ckks")
    # a request with an X25519 key for a secagg-only federation is refused
    other = tmp_path / "other"
    enrol.invite(other, name="noc", coordinator_url="https://127.0.0.1:8443", model=_model(),
                 mode_schedule=("ckks",))
    req = enrol.site_init(other / "invitation.toml", "eve", tmp_path / "eve")
    inv = enrol.load_invitation(kits.admin / "invitation.toml")
    forged = enrol.load_request(req)
    forged = _resign(forged, IdentityKey.from_pem((tmp_path / "eve" / "identity.pem").read_bytes()),
                     invitation_sha256=enrol.fingerprint(kits.admin / "invitation.toml"))
    with pytest.raises(ConfigError, match="ckks_kem_public_key must be absent: the federation "
                                          "never schedules ckks"):
        enrol.check_request(forged, inv, enrol.fingerprint(kits.admin / "invitation.toml"),
                            source="eve")


# --------------------------------------------------------------------------------------------
# The CKKS secret: sealed to each enterprise, opened only by it


def test_ckks_copy_for_one_site_cannot_be_opened_by_another(ckks_kits, tmp_path: Path) -> None:
    sender, b, c = SITES  # the first enterprise made the secret
    ckks_dir = ckks_kits.exchange / "ckks"
    assert sorted(p.name for p in ckks_dir.glob("*.ckks")) == sorted(f"{e}.ckks" for e in (b, c))
    b_kit, c_kit = EnterpriseKit.load(ckks_kits.enterprises[b]), EnterpriseKit.load(ckks_kits.enterprises[c])
    copy_b = enrol._table(enrol._read_toml(ckks_dir / f"{b}.ckks", "copy"), "ckks_secret_copy", "b")
    fed_digest = enrol._sha256((c_kit.root / "federation.toml").read_bytes())
    c_kem = enrol._load_kem_key(c_kit.root / "ckks_kem.key")
    # B opens its copy: the very secret the sender holds
    secret, _ = enrol.open_ckks_secret(copy_b, fed=b_kit.federation, fed_digest=fed_digest,
                                       receiver=b, kem=enrol._load_kem_key(b_kit.root / "ckks_kem.key"),
                                       source="b")
    assert secret == (ckks_kits.enterprises[sender] / "ckks_secret.ctx").read_bytes()
    # C handed B's copy under its own name: refused
    stolen = tmp_path / "stolen"
    stolen.mkdir()
    (stolen / f"{c}.ckks").write_bytes((ckks_dir / f"{b}.ckks").read_bytes())
    with pytest.raises(ConfigError, match=f"receiver must be '{c}'"):
        enrol.site_ckks_import(c_kit.root, stolen)
    # ... relabelled for C: the sender's signature no longer verifies
    relabelled = {**copy_b, "receiver": c}
    with pytest.raises(ConfigError, match="signature must verify"):
        enrol.open_ckks_secret(relabelled, fed=c_kit.federation, fed_digest=fed_digest,
                               receiver=c, kem=c_kem, source="c")
    # ... and C's own X25519 key does not open the ciphertext, whatever the checks say
    eph = bytes.fromhex(copy_b["ephemeral_public_key"])
    kem_b = bytes.fromhex(copy_b["ckks_kem_public_key"])
    ctx = enrol._transfer_context(fed_digest, sender, b, eph, kem_b,
                                  bytes.fromhex(copy_b["public_context_sha256"]))
    for salt in (eph + kem_b, eph + c_kem.public_bytes()):
        key = hkdf(agree(c_kem, eph), salt=salt, info=ctx)
        with pytest.raises(DecryptionError):
            open_sealed(key, base64.b64decode(copy_b["sealed"]), associated_data=ctx)
    # a flipped bit in the ciphertext is refused before decryption
    sealed = bytearray(base64.b64decode(copy_b["sealed"]))
    sealed[40] ^= 1
    tampered = {**copy_b, "sealed": base64.b64encode(bytes(sealed)).decode()}
    with pytest.raises(ConfigError, match="signature must verify"):
        enrol.open_ckks_secret(tampered, fed=b_kit.federation, fed_digest=fed_digest,
                               receiver=b, kem=enrol._load_kem_key(b_kit.root / "ckks_kem.key"),
                               source="b")


def test_coordinator_refuses_a_ckks_context_that_carries_a_secret(ckks_kits, tmp_path: Path) -> None:
    src = tmp_path / "ckks"
    src.mkdir()
    secret = (ckks_kits.enterprises[SITES[0]] / "ckks_secret.ctx").read_bytes()
    (src / "ckks_public.ctx").write_bytes(secret)
    (src / "ckks_public.toml").write_bytes(
        (ckks_kits.exchange / "ckks" / "ckks_public.toml").read_bytes())
    with pytest.raises(ConfigError, match="signature must verify"):
        enrol.coordinator_ckks_import(ckks_kits.coordinator, src)


# --------------------------------------------------------------------------------------------
# What the admin receives is checked


def _resign(req: enrol.Request, identity: IdentityKey, **changes) -> enrol.Request:
    forged = enrol.Request(**{**req.__dict__, **changes, "signature": b""})
    return enrol.Request(**{**forged.__dict__, "signature": identity.sign(forged.signed_bytes())})


@pytest.fixture()
def invited(tmp_path: Path):
    admin = tmp_path / "admin"
    inv = enrol.invite(admin, name="checks", coordinator_url="https://127.0.0.1:8443",
                       model=_model(), mode_schedule=("secagg", "ckks"))
    path = enrol.site_init(admin / "invitation.toml", "mallory", tmp_path / "mallory")
    identity = IdentityKey.from_pem((tmp_path / "mallory" / "identity.pem").read_bytes())
    tls = serialization.load_pem_private_key((tmp_path / "mallory" / "client.key").read_bytes(), None)
    return inv, enrol.fingerprint(admin / "invitation.toml"), enrol.load_request(path), identity, tls


def _csr(key, cn: str, sans: list[str]) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, cn)]))
    if sans:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(s) for s in sans]), critical=False)
    algo = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algo).public_bytes(serialization.Encoding.DER)


def test_forged_or_tampered_requests_are_refused(invited) -> None:
    inv, digest, req, identity, tls = invited
    enrol.check_request(req, inv, digest, source="r")  # the honest one passes

    def refused(forged: enrol.Request, message: str) -> None:
        with pytest.raises(ConfigError, match=message) as info:
            enrol.check_request(forged, inv, digest, source="r")
        assert "\n" not in str(info.value)

    # a CSR for another enterprise's name, properly signed by mallory's own keys
    refused(_resign(req, identity, csr=_csr(tls, "energy-utility", ["energy-utility"])),
            r"csr CN must be 'mallory' \(got \['energy-utility'\]\)")
    refused(_resign(req, identity, csr=_csr(tls, "mallory", ["mallory", "energy-utility"])),
            r"csr SAN must be exactly \['mallory'\]")
    refused(_resign(req, identity, csr=_csr(tls, "mallory", [])), "csr SAN must be exactly")
    # the wrong key types
    refused(_resign(req, identity, csr=_csr(ed25519.Ed25519PrivateKey.generate(), "mallory",
                                             ["mallory"])), "csr key must be ECDSA P-256")
    refused(_resign(req, identity, csr=_csr(ec.generate_private_key(ec.SECP384R1()), "mallory",
                                             ["mallory"])), "csr key must be ECDSA P-256")
    # a CSR whose self-signature is broken (not signed by the key it carries)
    bad = bytearray(req.csr)
    bad[-3] ^= 1
    refused(_resign(req, identity, csr=bytes(bad)), "csr")
    # a request changed after it was signed: another id, another identity key, another X25519 key
    refused(enrol.Request(**{**req.__dict__, "id": "energy-utility"}), "signature must verify")
    other = IdentityKey.generate()
    refused(enrol.Request(**{**req.__dict__, "identity_public_key": other.public_bytes()}),
            "signature must verify")
    refused(_resign(req, identity, kem_public_key=os.urandom(32)), "ckks_kem_signature must verify")
    refused(_resign(req, identity, kem_public_key=None, kem_signature=None),
            "ckks_kem_public_key must be present")
    # not an Ed25519 key at all / for another invitation / another federation / a reserved id
    refused(_resign(req, identity, invitation_sha256="0" * 64), "invitation_sha256 must be")
    refused(_resign(req, identity, federation="other"), "federation must be 'checks'")
    refused(_resign(req, identity, id="coordinator"), "id must match")
    refused(_resign(req, identity, role="coordinator"), "id of a coordinator request")


def test_sign_refuses_duplicates_and_a_missing_coordinator(tmp_path: Path) -> None:
    admin = tmp_path / "admin"
    enrol.invite(admin, name="dups", coordinator_url="https://127.0.0.1:8443", model=_model())
    inv = admin / "invitation.toml"
    coord = enrol.coordinator_init(inv, tmp_path / "coordinator")
    a = enrol.site_init(inv, "a-site", tmp_path / "a")
    a2 = enrol.site_init(inv, "a-site", tmp_path / "a2")
    b = enrol.site_init(inv, "b-site", tmp_path / "b")
    with pytest.raises(ConfigError, match="must include the coordinator's request"):
        enrol.sign_requests(admin, [a, b], tmp_path / "bundle")
    with pytest.raises(ConfigError, match="id must be unique"):
        enrol.sign_requests(admin, [coord, a, a2, b], tmp_path / "bundle")
    # b-site's request re-signed with a-site's identity key: one key may not hold two ids
    a_identity = IdentityKey.from_pem((tmp_path / "a" / "identity.pem").read_bytes())
    twin = tmp_path / "twin.toml"
    twin.write_text(_resign(enrol.load_request(b), a_identity,
                            identity_public_key=a_identity.public_bytes()).to_toml())
    with pytest.raises(ConfigError, match="identity_public_key must be unique"):
        enrol.sign_requests(admin, [coord, a, twin], tmp_path / "bundle")
    with pytest.raises(ConfigError, match="roster must list at least 2"):
        enrol.sign_requests(admin, [coord, a], tmp_path / "bundle")
    fed = enrol.sign_requests(admin, [coord, b, a], tmp_path / "bundle")
    assert fed.enterprise_ids() == ("b-site", "a-site")


def test_import_refuses_a_bundle_that_differs_from_the_invitation(tmp_path: Path) -> None:
    kits = create_kits(tmp_path / "fed", name="imp", enterprises=SITES,
                       coordinator_url="https://127.0.0.1:8443", model=_model())
    bundle, site = kits.exchange / "bundle", kits.enterprises["city-ops"]
    fed = load_federation(bundle / "federation.toml")
    cases = {
        "mode_schedule": fed.model_copy(update={"mode_schedule": ("ckks",)}),
        # the invitation pinned t = 2 (3 sites, issue 20): a bundle with t = 3 differs
        "threshold": fed.model_copy(update={"threshold": 3, "min_participants": 3}),
        "dp": fed.model_copy(update={"dp": fed.dp.model_copy(update={"noise_multiplier": 0.1})}),
    }
    for field, changed in cases.items():
        (bundle / "federation.toml").write_text(federation_to_toml(changed))
        with pytest.raises(ConfigError, match=f"{field} must be what the invitation pinned"):
            enrol.site_import(site, bundle)
    # the roster pins another key for this site (the admin substituting its own)
    roster = tuple(e.model_copy(update={"identity_public_key": IdentityKey.generate().public_bytes().hex()})
                   if e.id == "city-ops" else e for e in fed.roster)
    (bundle / "federation.toml").write_text(federation_to_toml(fed.model_copy(update={"roster": roster})))
    with pytest.raises(ConfigError, match="roster must pin 'city-ops''s own identity key"):
        enrol.site_import(site, bundle)
    (bundle / "federation.toml").write_text(federation_to_toml(fed))
    # a certificate for another key (the admin keeping a TLS key of its own for the site)
    (bundle / "certs" / "city-ops.pem").write_bytes((bundle / "certs" / "energy-utility.pem").read_bytes())
    with pytest.raises(ConfigError, match="must certify this party's own TLS key"):
        enrol.site_import(site, bundle)
    # another CA
    from secfed.federation.pki import make_ca

    (bundle / "ca.pem").write_bytes(make_ca("rogue").cert_pem)
    with pytest.raises(ConfigError, match="ca.pem must be the invitation's CA"):
        enrol.site_import(site, bundle)


# --------------------------------------------------------------------------------------------
# The same flow through the CLI, each party in its own folder


def _run(*args: str, cwd: Path) -> str:
    old = Path.cwd()
    os.chdir(cwd)
    try:
        result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    finally:
        os.chdir(old)
    assert result.exit_code == 0, (args, result.output)
    return result.output


def test_enrolment_through_the_cli(tmp_path: Path) -> None:
    sites = ["north", "south", "east"]
    _run("federation", "invite", "--name", "cli", "--coordinator-url", "https://127.0.0.1:8443",
         "--synthetic-dim", "32", "--mode-schedule", "secagg,ckks", "--out", "admin", cwd=tmp_path)
    _run("coordinator", "init", "--invitation", "admin/invitation.toml", "--out", "coordinator",
         cwd=tmp_path)
    for s in sites:
        _run("site", "init", "--invitation", "admin/invitation.toml", "--id", s, "--out", s,
             cwd=tmp_path)
    # the admin sees the requests and nothing else of the parties'
    requests = [a for p in ["coordinator", *sites] for a in ("--request", f"{p}/request.toml")]
    out = _run("federation", "sign", "--admin", "admin", *requests, "--out", "bundle", cwd=tmp_path)
    digest = re.search(r"sha256: ([0-9a-f]{64})", out).group(1)
    assert digest in _run("coordinator", "import", "--kit", "coordinator", "--bundle", "bundle",
                          cwd=tmp_path)
    for s in sites:
        assert digest in _run("site", "import", "--kit", s, "--bundle", "bundle", cwd=tmp_path)
    _run("site", "ckks-keygen", "--kit", "south", "--out", "ckks", cwd=tmp_path)
    for s in ("north", "east"):
        assert "from south" in _run("site", "ckks-import", "--kit", s, "--from", "ckks", cwd=tmp_path)
    _run("coordinator", "ckks-import", "--kit", "coordinator", "--from", "ckks", cwd=tmp_path)

    kits = [tmp_path / s for s in sites]
    for folder in ("admin", "bundle", "coordinator", "ckks"):
        assert _leaks(tmp_path / folder, kits) == [], folder
    fed = CoordinatorKit.load(tmp_path / "coordinator").federation
    assert fed.enterprise_ids() == tuple(sites)
    assert len({(k / "ckks_secret.ctx").read_bytes() for k in kits}) == 1
    for k in kits:
        kit = EnterpriseKit.load(k)
        assert kit.identity().public_bytes() == fed.public_key_of(kit.enterprise_id)
        cert = x509.load_pem_x509_certificate((k / "client.pem").read_bytes())
        cert.verify_directly_issued_by(x509.load_pem_x509_certificate((k / "ca.pem").read_bytes()))

    # a forged request through the CLI: one line on stderr, exit 1, no bundle
    forged = tmp_path / "forged.toml"
    forged.write_text((tmp_path / "east" / "request.toml").read_text()
                      .replace('id = "east"', 'id = "west"'))
    result = CliRunner().invoke(cli, ["federation", "sign", "--admin", str(tmp_path / "admin"),
                                      "--request", str(tmp_path / "coordinator" / "request.toml"),
                                      "--request", str(tmp_path / "north" / "request.toml"),
                                      "--request", str(forged), "--out", str(tmp_path / "b2")])
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and "signature must verify" in result.output
    assert not (tmp_path / "b2").exists()
