"""The city-safety hazard taxonomy and the three enterprises of the demo federation.

The enterprises differ on purpose (label skew, size, missing text, camera style, report
vocabulary) so that federation has something to win over local-only training.
"""

from __future__ import annotations

from dataclasses import dataclass

#: One taxonomy shared by every enterprise; the label index is the position in this tuple.
HAZARD_CLASSES: tuple[str, ...] = (
    "fire_smoke",
    "flooding",
    "structural_damage",
    "intrusion",
    "equipment_fault",
    "crowding",
    "normal",
)

TAXONOMY_VERSION = "city-safety/v1"

#: Zero-shot prompts for the taxonomy: generic words for each hazard (written for the taxonomy,
#: not taken from any enterprise's reports). The generator writes them into each dataset's
#: ``meta.json`` (``label_descriptions``), where ``secfed data check`` reads them.
HAZARD_DESCRIPTIONS: dict[str, tuple[str, ...]] = {
    "fire_smoke": ("fire", "smoke", "flames and burning", "a fire with smoke"),
    "flooding": ("flooding", "flood water", "water leak, area under water", "flooded"),
    "structural_damage": ("structural damage", "collapsed wall or building",
                          "crack in the structure", "fallen debris, collapse"),
    "intrusion": ("intrusion", "trespasser or intruder", "break-in, unauthorised person",
                  "theft, burglar"),
    "equipment_fault": ("equipment fault", "electrical fault, sparks", "broken machine alarm",
                        "power equipment failure"),
    "crowding": ("crowding", "a large crowd of people", "many people gathering",
                 "overcrowded area"),
    "normal": ("normal", "routine check, nothing to report", "all clear, no incident",
               "everything ok"),
}


@dataclass(frozen=True)
class EnterpriseProfile:
    """How one enterprise's data is generated.

    ``class_weights`` follows :data:`HAZARD_CLASSES`; ``sizes`` maps a scale to a record count
    before defects are injected; ``text_missing`` and ``image_missing`` are per-record
    probabilities; ``night_fraction`` and ``tint`` shape the camera style.
    """

    name: str
    display_name: str
    class_weights: tuple[float, ...]
    sizes: tuple[tuple[str, int], ...]
    text_missing: float
    image_missing: float
    night_fraction: float
    tint: tuple[float, float, float]

    def size(self, scale: str) -> int:
        return dict(self.sizes)[scale]


ENTERPRISES: tuple[EnterpriseProfile, ...] = (
    EnterpriseProfile(
        name="energy_utility",
        display_name="Energy utility (substations, feeders, pylons)",
        # fire, flood, struct, intrusion, equip, crowd, normal
        class_weights=(0.20, 0.14, 0.10, 0.07, 0.30, 0.02, 0.17),
        sizes=(("tiny", 150), ("demo", 4000), ("full", 8000)),
        text_missing=0.08,
        image_missing=0.05,
        night_fraction=0.15,
        tint=(1.05, 1.05, 0.85),
    ),
    EnterpriseProfile(
        name="residential_security",
        display_name="Residential-community security operator (CCTV, patrols)",
        class_weights=(0.14, 0.06, 0.04, 0.32, 0.02, 0.12, 0.30),
        sizes=(("tiny", 100), ("demo", 2500), ("full", 5000)),
        # Cameras first: most records are a CCTV frame with no written report.
        text_missing=0.75,
        image_missing=0.0,
        night_fraction=0.55,
        tint=(0.9, 1.08, 0.9),
    ),
    EnterpriseProfile(
        name="city_operations",
        display_name="City operations centre (tickets, street cameras)",
        class_weights=(0.10, 0.21, 0.20, 0.04, 0.07, 0.23, 0.15),
        sizes=(("tiny", 200), ("demo", 5000), ("full", 10000)),
        text_missing=0.10,
        image_missing=0.12,
        night_fraction=0.25,
        tint=(0.95, 0.97, 1.08),
    ),
)

#: Records per class in the shared held-out test set, by scale. ``full`` (thousands of records
#: per enterprise) is the scale of the utility table, where DP-SGD has enough records per site;
#: ``demo`` is half of it, what ``make demo`` trains through in a few minutes on 2 cores (the
#: head on frozen towers: at a few hundred records per site DP-SGD at eps=8 learned nothing).
TEST_PER_CLASS: dict[str, int] = {"tiny": 12, "demo": 100, "full": 400}

SCALES: tuple[str, ...] = ("tiny", "demo", "full")


def enterprise_profile(name: str) -> EnterpriseProfile:
    """The profile called ``name``; raises ``KeyError`` for an unknown one."""
    for profile in ENTERPRISES:
        if profile.name == name:
            return profile
    raise KeyError(name)
