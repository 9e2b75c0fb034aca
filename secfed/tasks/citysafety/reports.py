"""Incident-report texts in each enterprise's own vocabulary and style.

An energy utility writes terse work orders about assets; a residential security operator writes
patrol-log prose; a city operations centre writes structured tickets. Fields go missing, words
get typos, and some reports are too vague to name the hazard at all.
"""

from __future__ import annotations

import numpy as np

# Per enterprise, per class: observation phrases (the class cue in that enterprise's words).
_PHRASES: dict[str, dict[str, tuple[str, ...]]] = {
    "energy_utility": {
        "fire_smoke": ("smoke from transformer bay", "fire at cable trench", "burning smell and "
                       "flames near switchgear", "visible smoke plume over yard",
                       "oil fire on tx2"),
        "flooding": ("cable trench flooded", "water ingress in control room",
                     "substation yard under water", "pump failure, basement flooded",
                     "standing water over busbar pit"),
        "structural_damage": ("pylon leaning after storm", "cracked foundation at tower 14",
                              "control building wall collapsed", "fallen pole on access road",
                              "roof of relay hut caved in"),
        "intrusion": ("unauthorised entry at perimeter", "fence cut, person inside compound",
                      "copper theft in progress", "trespasser near live equipment",
                      "gate forced open, intruder seen"),
        "equipment_fault": ("breaker trip on feeder 3", "arc flash on switchgear",
                            "transformer overheating alarm", "relay fault, sparking cabinet",
                            "insulator flashover"),
        "crowding": ("crowd gathered at works entrance", "protest group blocking depot gate",
                     "large group near substation fence", "public crowding around outage site"),
        "normal": ("routine inspection no anomaly", "scheduled maintenance completed",
                   "visual check ok", "meter reading taken, all normal",
                   "patrol of yard, nothing to report"),
    },
    "residential_security": {
        "fire_smoke": ("resident reports smoke in stairwell", "bin fire behind block C",
                       "smell of burning from flat 12", "flames seen at car park",
                       "smoke alarm going off, smoke visible"),
        "flooding": ("water coming under lobby door", "car park flooded after rain",
                     "burst pipe, corridor flooded", "basement storage under water"),
        "structural_damage": ("balcony railing came loose", "crack in garage ceiling",
                              "part of boundary wall fell down", "ceiling collapsed in hallway"),
        "intrusion": ("person climbing rear fence", "unknown male trying car doors",
                      "someone loitering at gate, ran off", "break-in attempt at flat 4",
                      "intruder seen on cctv near bike store"),
        "equipment_fault": ("lift stuck, sparks from panel", "gate motor burning out",
                            "lobby lights flickering, panel buzzing"),
        "crowding": ("large party crowd in courtyard", "crowd at main gate",
                     "residents gathering in lobby, too many people", "queue blocking exit"),
        "normal": ("all quiet on patrol", "routine round, nothing to report",
                   "doors checked, all secure", "visitor signed in, ok"),
    },
    "city_operations": {
        "fire_smoke": ("Caller reports vehicle fire", "Smoke visible from warehouse roof",
                       "Dumpster fire at alley", "Heavy smoke on overpass", "Building fire"),
        "flooding": ("Water over roadway up to curb", "Underpass flooded, closed",
                     "Storm drain overflow", "Street flooding, cars stranded",
                     "River level over embankment"),
        "structural_damage": ("Facade debris falling onto sidewalk", "Sinkhole in carriageway",
                              "Bridge joint cracked", "Scaffolding collapse",
                              "Retaining wall failure"),
        "intrusion": ("Unauthorised person in rail yard", "Trespass at water works",
                      "Break-in at municipal depot", "Person inside closed construction site"),
        "equipment_fault": ("Traffic signal dark", "Streetlight sparking",
                            "Pump station fault alarm", "Sparking junction box"),
        "crowding": ("Large crowd at plaza", "Overcrowding at metro entrance",
                     "Crowd spilling onto road after event", "Dense crowd near stadium gate",
                     "Unplanned gathering blocking traffic"),
        "normal": ("Routine camera check, no incident", "Traffic flowing normally",
                   "Area patrol completed, no issues", "Duplicate call, no incident found"),
    },
}

#: Reports that name no hazard; they occur in every class.
_VAGUE = ("see attached", "pls check asap", "follow up required", "caller hung up",
          "details to follow", "as per phone call", "cam footage saved")

_SITES = {
    "energy_utility": ("Substation Northgate", "Substation Riverside", "Feeder F7", "Tower 14",
                       "Depot East", "Substation Hillcrest"),
    "residential_security": ("Block A", "Block C", "Rear gate", "Car park", "Lobby", "Bike store"),
    "city_operations": ("5th Ave & Pine", "Harbour Rd", "Central Plaza", "Ring Rd underpass",
                        "Market St", "Old Town bridge"),
}


def _typo(word: str, rng: np.random.Generator) -> str:
    if len(word) < 4:
        return word
    i = int(rng.integers(1, len(word) - 1))
    kind = rng.integers(0, 3)
    if kind == 0:  # swap
        return word[: i - 1] + word[i] + word[i - 1] + word[i + 1 :]
    if kind == 1:  # drop
        return word[:i] + word[i + 1 :]
    return word[:i] + word[i] + word[i:]  # double


def add_typos(text: str, rng: np.random.Generator, rate: float = 0.06) -> str:
    """Misspell about ``rate`` of the words of ``text``."""
    return " ".join(_typo(w, rng) if rng.random() < rate else w for w in text.split(" "))


def write_report(enterprise: str, label: str, rng: np.random.Generator) -> str:
    """One incident report about ``label`` in ``enterprise``'s style.

    Raises:
        KeyError: unknown enterprise or class.
    """
    phrases = _PHRASES[enterprise][label]
    observation = str(rng.choice(phrases))
    if rng.random() < 0.08:
        observation = str(rng.choice(_VAGUE))
    elif rng.random() < 0.25:
        observation += ", " + str(rng.choice(_VAGUE))
    site = str(rng.choice(_SITES[enterprise])) if rng.random() > 0.15 else ""
    severity = str(int(rng.integers(1, 6))) if rng.random() > 0.3 else ""
    if enterprise == "energy_utility":
        text = f"WO#{int(rng.integers(10000, 99999))} | {site or '?'} | {observation} | sev {severity}"
        if rng.random() < 0.5:
            text = text.upper()
    elif enterprise == "residential_security":
        hh, mm = int(rng.integers(0, 24)), int(rng.integers(0, 60))
        guard = " Guard dispatched." if rng.random() < 0.5 else ""
        where = f"{site}: " if site else ""
        text = f"Patrol log {hh:02d}:{mm:02d} - {where}{observation}.{guard}"
    else:
        text = (f"[CITY-OPS] Ticket {int(rng.integers(100000, 999999))}. Location: {site} "
                f"Priority: {severity} Desc: {observation}.")
    return add_typos(text, rng)


def edit_report(text: str, rng: np.random.Generator) -> str:
    """A near-duplicate report: the same text with one or two small edits."""
    return add_typos(text, rng, rate=0.05) if rng.random() < 0.7 else text + " (resent)"
