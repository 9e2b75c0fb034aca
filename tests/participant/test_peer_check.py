"""A site's check of the peers' signed confirmations of a round's new global hash (issue 18).

In a secagg+ round a site checks only its neighbourhood's confirmations (itself and its k
neighbours: k + 1 signatures, not n), and the Flower workflow sends it only those. Each one
checked must still verify under its sender's pinned key over this round and agree with the
site's own hash; the neighbourhood must have confirmed at all. Without a neighbourhood
(secagg, ckks, catch-up) every listed confirmation is checked, as before."""

from __future__ import annotations

import pytest
from e2e.harness import make_federation

from secfed.errors import ProtocolAbort
from secfed.federation.kits import EnterpriseKit
from secfed.flower.server import outcome_for
from secfed.participant import Participant
from secfed.participant.adapter import SyntheticSite
from secfed.transport.api import AppliedConfirmation, RoundOutcome, applied_signed_bytes

IDS = ["a-site", "b-site", "c-site", "d-site"]
NEAR = frozenset({"a-site", "b-site", "c-site"})  # a-site's neighbourhood; d-site is not in it
R = 4


class _Outcome:
    def __init__(self, outcome: RoundOutcome):
        self.o = outcome

    def outcome(self, *, round_number: int, until: float | None = None) -> RoundOutcome:
        assert round_number == R
        return self.o

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    """a-site's participant and every site's identity key."""
    kits = make_federation(tmp_path_factory.mktemp("peers") / "fed", enterprises=IDS, dim=8,
                           schedule=("secagg+",), rounds=R)
    keys = {e: EnterpriseKit.load(kits.enterprises[e]).identity() for e in IDS}
    kit = EnterpriseKit.load(kits.enterprises["a-site"])
    p = Participant(kit, SyntheticSite(kit.root, "a-site", kit.federation.model), new_ledger=True)
    yield p, keys
    p.close()


def _conf(keys, signer: str, global_hash: str) -> AppliedConfirmation:
    sig = keys[signer].sign(applied_signed_bytes(federation="e2e", round_number=R,
                                                 global_hash=global_hash))
    return AppliedConfirmation(global_hash=global_hash, signature_hex=sig.hex())


def _check(p, confirmations, *, peers=NEAR) -> int:
    p.client = _Outcome(RoundOutcome(round_number=R, status="done", mode="secagg+",
                                     confirmations=confirmations))
    return p.check_peers(R, peers=peers)


def test_only_the_neighbourhood_is_checked_and_counted(fed) -> None:
    p, keys = fed
    mine, other = p.site.global_hash(), "ab" * 32
    confs = {e: _conf(keys, e, mine) for e in NEAR}
    # a non-neighbour's confirmation is neither verified nor counted (k + 1 checks, not n) ...
    confs["d-site"] = _conf(keys, "a-site", other)  # forged and disagreeing
    assert _check(p, confs) == 3
    # ... while without a neighbourhood (secagg, ckks, catch-up) every one is, as before
    with pytest.raises(ProtocolAbort, match="confirmation of 'd-site' does not verify"):
        _check(p, confs, peers=None)


def test_a_neighbour_reporting_another_hash_is_caught(fed) -> None:
    p, keys = fed
    mine, other = p.site.global_hash(), "cd" * 32
    confs = {e: _conf(keys, e, mine) for e in NEAR}
    confs["c-site"] = _conf(keys, "c-site", other)
    with pytest.raises(ProtocolAbort, match="peer 'c-site' reports global hash cdcdcdcdcdcd"):
        _check(p, confs)


def test_a_neighbours_confirmation_must_verify_under_its_own_key(fed) -> None:
    p, keys = fed
    mine = p.site.global_hash()
    confs = {e: _conf(keys, e, mine) for e in NEAR}
    confs["b-site"] = _conf(keys, "d-site", mine)  # signed by someone else
    with pytest.raises(ProtocolAbort, match="confirmation of 'b-site' does not verify"):
        _check(p, confs)
    confs["b-site"] = AppliedConfirmation(  # signed over another round
        global_hash=mine, signature_hex=keys["b-site"].sign(applied_signed_bytes(
            federation="e2e", round_number=R + 1, global_hash=mine)).hex())
    with pytest.raises(ProtocolAbort, match="confirmation of 'b-site' does not verify"):
        _check(p, confs)


def test_no_confirmation_from_the_neighbourhood_is_refused(fed) -> None:
    p, keys = fed
    confs = {"d-site": _conf(keys, "d-site", p.site.global_hash())}
    with pytest.raises(ProtocolAbort, match="no signed confirmation from this site's neighbourhood"):
        _check(p, confs)


def test_the_flower_outcome_carries_the_neighbourhoods_confirmations_only(fed) -> None:
    _p, keys = fed
    confs = {e: _conf(keys, e, "00" * 32) for e in IDS}
    outcome = RoundOutcome(round_number=R, status="done", mode="secagg+", confirmations=confs,
                           receipts={e: [f"{i:02x}"] for i, e in enumerate(IDS)})
    sent = RoundOutcome.model_validate_json(outcome_for(outcome, "a-site", NEAR))
    assert set(sent.confirmations) == NEAR and sent.receipts == {"a-site": ["00"]}
    assert all(sent.confirmations[e] == confs[e] for e in NEAR)
    everyone = RoundOutcome.model_validate_json(outcome_for(outcome, "d-site"))
    assert set(everyone.confirmations) == set(IDS) and everyone.receipts == {"d-site": ["03"]}
