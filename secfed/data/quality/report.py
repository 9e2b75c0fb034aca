"""What the checks found (:class:`QualityReport`) and what ``--fix`` does with it (:class:`FixPlan`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from secfed.errors import DataError

__all__ = ["MISLABEL_POLICIES", "FixPlan", "QualityReport"]


#: What ``--fix`` does with likely mislabels: keep them unchanged and list them for a person to
#: review (default), drop them, or replace the label with the suggested one.
MISLABEL_POLICIES = ("review", "drop", "relabel")


@dataclass
class FixPlan:
    """The changes ``write_cleaned`` makes.

    ``drop``: the later copy of each duplicate (and the likely mislabels under policy
    ``drop``); ``strip_text``: image/text mismatches keep their image and label and lose the
    report that contradicts them (the check flags a mismatch only where the image supports the
    label); ``relabel``: new label per id (policy ``relabel``); ``review``: likely mislabels
    kept unchanged (policy ``review``).

    Why ``review`` is the default: on the full-scale generated federation (10 % random wrong
    labels) dropping the flagged mislabels lost more accuracy through the correct records it
    also dropped than it won (bench/utility.py); uniform label noise barely moves a classifier
    trained on thousands of records, while duplicates and contradicting reports do. Under DP
    both alternatives cost accuracy: federated DP-SGD eps=8 on the full-scale federation, head
    on frozen towers, 6 runs each (validation / test): kept for review 0.738 / 0.748, dropped
    0.725 / 0.732, relabelled 0.727 / 0.733, uncleaned 0.737 / 0.744 (standard errors
    0.002-0.005; ``bench/utility.py --mislabels drop --only eps=8 --dp-repeats 6`` measures
    the test column for one policy).
    """

    policy: str
    drop: set[str] = field(default_factory=set)
    strip_text: set[str] = field(default_factory=set)
    relabel: dict[str, str] = field(default_factory=dict)
    review: set[str] = field(default_factory=set)

    def to_json(self) -> dict:
        return {"mislabel_policy": self.policy, "dropped": sorted(self.drop),
                "text_removed": sorted(self.strip_text),
                "relabelled": dict(sorted(self.relabel.items())),
                "to_review": sorted(self.review)}


@dataclass
class QualityReport:
    """What :func:`find_defects` found, by record id."""

    records: int
    class_balance: dict[str, int]
    missing_text: list[str] = field(default_factory=list)
    missing_image: list[str] = field(default_factory=list)
    exact_duplicates: list[dict] = field(default_factory=list)
    near_duplicates: list[dict] = field(default_factory=list)
    mislabels: list[dict] = field(default_factory=list)
    mismatches: list[dict] = field(default_factory=list)

    def flagged(self) -> set[str]:
        """Every record some check flags: the later copy of each duplicate, likely mislabels,
        image/text mismatches."""
        out = {d["id"] for d in self.exact_duplicates + self.near_duplicates}
        out |= {m["id"] for m in self.mislabels} | {m["id"] for m in self.mismatches}
        return out

    def fix_plan(self, mislabels: str = "review") -> FixPlan:
        """What ``--fix`` does to each flagged record (see :class:`FixPlan`).

        Raises:
            DataError: ``mislabels`` is not one of :data:`MISLABEL_POLICIES`.
        """
        if mislabels not in MISLABEL_POLICIES:
            raise DataError(f"mislabels must be one of {list(MISLABEL_POLICIES)} "
                            f"(got {mislabels!r})")
        drop = {d["id"] for d in self.exact_duplicates + self.near_duplicates}
        plan = FixPlan(policy=mislabels, drop=drop,
                       strip_text={m["id"] for m in self.mismatches} - drop)
        for m in self.mislabels:
            if m["id"] in drop:
                continue
            if mislabels == "drop":
                plan.drop.add(m["id"])
            elif mislabels == "relabel":
                plan.relabel[m["id"]] = m["suggested_label"]
            else:
                plan.review.add(m["id"])
        return plan

    def summary(self) -> dict[str, int]:
        return {"records": self.records, "missing_text": len(self.missing_text),
                "missing_image": len(self.missing_image),
                "exact_duplicates": len(self.exact_duplicates),
                "near_duplicates": len(self.near_duplicates),
                "mislabels": len(self.mislabels), "mismatches": len(self.mismatches)}

    def to_json(self) -> dict:
        out = asdict(self)
        out["summary"] = self.summary()
        return out
