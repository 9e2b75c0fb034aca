"""The assumptions secfed's privacy guarantee rests on, stated in every report."""

from __future__ import annotations

from collections.abc import Iterable

from secfed.audit.model import Assumption

__all__ = ["assumptions_for"]

_ALWAYS = (
    Assumption(
        "privacy unit",
        "Record-level differential privacy inside each enterprise: ε bounds what any party "
        "outside the enterprise can learn about one record of that enterprise's data, over every "
        "round the enterprise took part in. It is not a bound for a whole enterprise's data set.",
    ),
    Assumption(
        "where the guarantee comes from",
        "Each update is made (ε, δ)-DP by Opacus DP-SGD (Poisson sampling, per-example clipping, "
        "Gaussian noise) before it leaves the site; secure aggregation and CKKS are defence in "
        "depth, not what the ε rests on.",
    ),
    Assumption(
        "ledger charged before release",
        "Each enterprise's ledger is charged and committed before its protected update leaves "
        "the site; a crash in between over-reports ε, never under-reports it.",
    ),
    Assumption(
        "accounting",
        "ε is composed over all recorded mechanism events by the PRV accountant (reported) and "
        "the RDP accountant (used for the online budget check); both are recomputed by this audit "
        "from the events, not copied from the ledger.",
    ),
    Assumption(
        "identities",
        "Ledger signatures are trusted only as far as the Ed25519 identity keys pinned in the "
        "federation file; an enterprise whose key is not pinned is reported as unverified.",
    ),
    Assumption(
        "secure aggregation (masking)",
        "In secagg / secagg+ rounds the coordinator learns only the sum of the survivors' "
        "updates as long as it does not collude with threshold-many enterprises; dropout "
        "recovery never reveals both a survivor's self mask and its pairwise masks.",
    ),
)

_CKKS = Assumption(
    "shared CKKS key",
    "In CKKS rounds every enterprise holds the same CKKS secret key; encryption protects "
    "updates only from a coordinator that does not collude with any enterprise. Any single "
    "enterprise could decrypt another's ciphertext if it obtained it.",
)


def assumptions_for(modes: Iterable[str]) -> tuple[Assumption, ...]:
    """The assumptions for a federation whose rounds used ``modes`` (CKKS note always given)."""
    seen = set(modes)
    ckks = _CKKS
    if seen and "ckks" not in seen:
        ckks = Assumption(
            _CKKS.key, _CKKS.text + " (No CKKS round appears in the records audited here.)"
        )
    return (*_ALWAYS, ckks)
