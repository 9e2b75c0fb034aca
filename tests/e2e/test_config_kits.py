"""Federation settings and startup kits (no network)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from cryptography import x509

from secfed.config import (
    RoundTerms,
    SitePolicy,
    federation_to_toml,
    load_federation,
    load_site_policy,
)
from secfed.errors import BudgetExceeded, ConfigError
from secfed.federation.kits import CoordinatorKit, EnterpriseKit, create_kits
from secfed.federation.pki import make_ca
from secfed.federation.plan import model_settings_for
from secfed.transport.tls import peer_identity

ENTERPRISES = ["energy-utility", "security-operator", "city-ops"]


@pytest.fixture(scope="module")
def kits(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("kits") / "fed"
    return create_kits(
        out,
        name="demo",
        enterprises=ENTERPRISES,
        coordinator_url="https://127.0.0.1:8443",
        model=model_settings_for(model_dir=None, synthetic_dim=16),
        mode_schedule=("secagg", "secagg", "secagg", "ckks"),
    )


def test_federation_toml_round_trips(kits) -> None:
    fed = load_federation(kits.coordinator / "federation.toml")
    assert fed.enterprise_ids() == tuple(ENTERPRISES)
    assert fed.threshold == 2  # floor(2*3/3): holders besides each responder (issue 20)
    assert [fed.mode_for_round(r) for r in range(1, 6)] == [
        "secagg", "secagg", "secagg", "ckks", "secagg"
    ]
    again = tmp = kits.root / "again.toml"
    tmp.write_text(federation_to_toml(fed))
    assert load_federation(again) == fed


def test_private_files_are_0600_and_coordinator_holds_no_enterprise_secret(kits) -> None:
    for eid, d in kits.enterprises.items():
        for name in ("client.key", "identity.pem", "ckks_secret.ctx"):
            mode = stat.S_IMODE(os.stat(d / name).st_mode)
            assert mode == 0o600, (eid, name, oct(mode))
        assert EnterpriseKit.load(d).identity().public_bytes().hex() == next(
            e.identity_public_key for e in load_federation(d / "federation.toml").roster if e.id == eid
        )
    coord = kits.coordinator
    assert stat.S_IMODE(os.stat(coord / "server.key").st_mode) == 0o600
    names = {p.name for p in coord.iterdir()}
    assert stat.S_IMODE(os.stat(coord / "identity.key").st_mode) == 0o600
    # enrolment (issue 20 item 2): the coordinator keeps its invitation and makes its own
    # Ed25519 identity key next to its TLS key
    assert names == {"federation.toml", "invitation.toml", "ca.pem", "server.pem", "server.key",
                     "identity.key", "ckks_public.ctx"}
    secrets = set()
    for d in kits.enterprises.values():
        for name in ("client.key", "identity.pem", "ckks_secret.ctx"):
            secrets.add((d / name).read_bytes())
    secrets.add((kits.root / "ca" / "ca.key").read_bytes())
    for p in coord.iterdir():
        blob = p.read_bytes()
        assert all(s not in blob for s in secrets), p
    from secfed.crypto import ckks

    ckks.load_context((coord / "ckks_public.ctx").read_bytes(), expect_secret=False)
    with pytest.raises(Exception):  # noqa: B017 - whichever CkksError the loader picks
        ckks.load_context((coord / "ckks_public.ctx").read_bytes(), expect_secret=True)
    CoordinatorKit.load(coord)


def test_client_certificate_names_the_enterprise(kits) -> None:
    for eid, d in kits.enterprises.items():
        cert = x509.load_pem_x509_certificate((d / "client.pem").read_bytes())
        cn = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
        assert cn == eid
        ca = x509.load_pem_x509_certificate((d / "ca.pem").read_bytes())
        cert.verify_directly_issued_by(ca)
    assert peer_identity({"subject": ((("commonName", "a"),),), "subjectAltName": (("DNS", "a"),)}) == "a"
    with pytest.raises(Exception, match="CN equal"):
        peer_identity({"subject": ((("commonName", "a"),),), "subjectAltName": (("DNS", "b"),)})


def _terms(**over) -> RoundTerms:
    base = dict(
        round_number=1, mode="secagg", participants=tuple(ENTERPRISES), threshold=3,
        min_participants=3, noise_multiplier=1.0, sample_rate=0.05, local_steps=10,
        max_grad_norm=1.0, learning_rate=0.1, delta=1e-5,
    )
    base.update(over)
    return RoundTerms(**base)


def test_site_policy_refuses_weaker_terms(kits) -> None:
    policy = load_site_policy(kits.enterprises["city-ops"] / "site.toml")
    roster = tuple(ENTERPRISES)
    policy.check_round(_terms(), roster=roster)
    bad = {
        "noise_multiplier": (_terms(noise_multiplier=0.1), "noise_multiplier must be >= 0.5"),
        "delta": (_terms(delta=1e-3), "delta must be <="),
        "threshold": (_terms(threshold=1), "threshold must be in"),
        "roster": (_terms(participants=("city-ops", "mallory")), "pinned roster"),
        "missing": (_terms(participants=("energy-utility", "security-operator")), "include"),
    }
    for _field, (terms, message) in bad.items():
        with pytest.raises(ConfigError, match=message):
            policy.check_round(terms, roster=roster)
    strict = SitePolicy(enterprise_id="city-ops", allowed_modes=("ckks",))
    with pytest.raises(ConfigError, match="mode must be one of"):
        strict.check_round(_terms(), roster=roster)
    with pytest.raises(BudgetExceeded, match="budget 8.0"):
        policy.check_budget(spent_epsilon=7.5, round_epsilon_after=8.3)


def test_config_errors_name_field_rule_value(tmp_path: Path, kits) -> None:
    text = (kits.coordinator / "federation.toml").read_text()
    bad = tmp_path / "f.toml"
    bad.write_text(text.replace("threshold = 2", "threshold = 1"))
    with pytest.raises(ConfigError, match=r"threshold must be in \[2, 3\] \(got 1\)"):
        load_federation(bad)
    bad.write_text(text.replace('coordinator_url = "https://', 'coordinator_url = "http://'))
    with pytest.raises(ConfigError, match="coordinator_url"):
        load_federation(bad)
    bad.write_text("[federation\n")
    with pytest.raises(ConfigError, match="valid TOML"):
        load_federation(bad)
    with pytest.raises(ConfigError, match="must be a new or empty directory"):
        create_kits(
            kits.root, name="x", enterprises=["a", "b"], coordinator_url="https://h:1",
            model=model_settings_for(model_dir=None, synthetic_dim=2),
        )
    assert make_ca("x").certificate.extensions  # the CA is a CA certificate


def test_ring_is_the_smallest_whose_headroom_holds_the_sum(tmp_path: Path, kits) -> None:
    from secfed.crypto.encoding import check_headroom
    from secfed.errors import HeadroomError
    from secfed.federation.kits import ring_bits_for

    model = model_settings_for(model_dir=None, synthetic_dim=16)  # clip 8, scale 2^24
    # n * round(8 * 2^24) <= 2^31 - 1  <=>  n <= 15
    assert ring_bits_for(15, model) == 32
    assert ring_bits_for(16, model) == 64
    check_headroom(n_participants=15, max_abs=8.0, scale_bits=24, ring_bits=32)
    with pytest.raises(HeadroomError):
        check_headroom(n_participants=16, max_abs=8.0, scale_bits=24, ring_bits=32)
    assert EnterpriseKit.load(kits.enterprises["city-ops"]).federation.model.ring_bits == 32
    # an explicit choice is kept
    wide = model.model_copy(update={"ring_bits": 64})
    paths = create_kits(tmp_path / "wide", name="wide", enterprises=ENTERPRISES,
                        coordinator_url="https://127.0.0.1:8443", model=wide)
    assert CoordinatorKit.load(paths.coordinator).federation.model.ring_bits == 64


def test_round_terms_carry_the_optimizer_and_the_scheduled_learning_rate(tmp_path: Path) -> None:
    import math

    from secfed.config import DPSettings
    from secfed.coordinator.service import Coordinator

    constant = DPSettings(learning_rate=0.02)
    assert [constant.round_learning_rate(r, 5) for r in (1, 3, 5)] == [0.02, 0.02, 0.02]
    cosine = DPSettings(learning_rate=0.02, lr_schedule="cosine")
    rates = [cosine.round_learning_rate(r, 5) for r in range(1, 6)]
    assert rates[0] == 0.02
    assert rates[-1] == pytest.approx(0.01 * (1 + math.cos(math.pi * 4 / 5)))
    assert all(a > b > 0 for a, b in zip(rates, rates[1:], strict=False))
    assert cosine.round_learning_rate(9, 5) == rates[-1]  # past the horizon: never 0

    paths = create_kits(
        tmp_path / "fed", name="sched", enterprises=ENTERPRISES,
        coordinator_url="https://127.0.0.1:8443",
        model=model_settings_for(model_dir=None, synthetic_dim=16), rounds=5,
        dp=DPSettings(learning_rate=0.02, optimizer="adam", lr_schedule="cosine",
                      noise_multiplier=1.0),
    )
    kit = CoordinatorKit.load(paths.coordinator)
    assert kit.federation.dp.optimizer == "adam"  # through federation.toml and back
    coordinator = Coordinator(kit)
    terms = [coordinator.terms(r) for r in range(1, 6)]
    assert [t.learning_rate for t in terms] == rates
    assert {t.optimizer for t in terms} == {"adam"}


def test_coordinator_kit_holds_its_own_identity_pinned_in_the_federation(tmp_path: Path, kits) -> None:
    from secfed.federation.kits import write_coordinator_identity

    coord = CoordinatorKit.load(kits.coordinator)
    pinned = load_federation(kits.coordinator / "federation.toml").coordinator_identity_public_key
    assert coord.identity().public_bytes().hex() == pinned
    for d in kits.enterprises.values():  # every party pins the same coordinator key
        assert load_federation(d / "federation.toml").coordinator_identity_public_key == pinned
        assert EnterpriseKit.load(d).identity().public_bytes().hex() != pinned
    # never overwritten: every receipt a site keeps is anchored under it
    with pytest.raises(ConfigError, match="must not be overwritten"):
        write_coordinator_identity(kits.coordinator)
    # a kit whose identity.key is not the pinned one is refused
    other = tmp_path / "other"
    write_coordinator_identity(other)
    swapped = tmp_path / "swapped"
    swapped.mkdir()
    for p in kits.coordinator.iterdir():
        if p.is_file() and p.name != "identity.key":
            (swapped / p.name).write_bytes(p.read_bytes())
    (swapped / "identity.key").write_bytes((other / "identity.key").read_bytes())
    with pytest.raises(ConfigError, match="coordinator_identity_public_key"):
        CoordinatorKit.load(swapped).identity()
    (swapped / "identity.key").unlink()
    with pytest.raises(ConfigError, match="identity.key"):
        CoordinatorKit.load(swapped)


def test_federation_file_without_coordinator_key_is_refused(tmp_path: Path, kits) -> None:
    text = (kits.coordinator / "federation.toml").read_text()
    old = "\n".join(line for line in text.splitlines()
                    if not line.startswith("coordinator_identity_public_key"))
    assert old != text
    (tmp_path / "old.toml").write_text(old)
    with pytest.raises(ConfigError, match="coordinator_identity_public_key"):
        load_federation(tmp_path / "old.toml")
    fed = load_federation(kits.coordinator / "federation.toml")
    enterprise_key = fed.roster[0].identity_public_key
    reused = text.replace(fed.coordinator_identity_public_key, enterprise_key)
    (tmp_path / "reused.toml").write_text(reused)
    with pytest.raises(ConfigError, match="must differ from every roster key"):
        load_federation(tmp_path / "reused.toml")
