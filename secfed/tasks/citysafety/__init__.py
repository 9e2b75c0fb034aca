"""The city-safety task of the demo: hazard taxonomy, three enterprises' generated data, the
image+text classifier recipe, scoring of the data check against the generator's truth, and the
generative variant (instruction records in ``instructions``, the small causal LM in
``generative``).

The generator and taxonomy need only numpy and Pillow; the model recipe and the scoring (torch)
are imported on first use so ``import secfed.tasks.citysafety`` is cheap.
"""

from __future__ import annotations

from typing import Any

from secfed.tasks.citysafety.generate import FederationData, generate_federation, generate_held_out
from secfed.tasks.citysafety.instructions import GenerativeData, generate_instruction_federation
from secfed.tasks.citysafety.taxonomy import (
    ENTERPRISES,
    HAZARD_CLASSES,
    HAZARD_DESCRIPTIONS,
    TEST_PER_CLASS,
    EnterpriseProfile,
)

__all__ = [
    "ENTERPRISES",
    "HAZARD_CLASSES",
    "HAZARD_DESCRIPTIONS",
    "TEST_PER_CLASS",
    "EnterpriseProfile",
    "FederationData",
    "GenerativeData",
    "build_city_safety_classifier",
    "generate_federation",
    "generate_held_out",
    "generate_instruction_federation",
    "prepare_demo_model",
]

_LAZY = {"build_city_safety_classifier": "secfed.tasks.citysafety.model",
         "prepare_demo_model": "secfed.tasks.citysafety.model"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)
