"""secfed.names is the one vocabulary: a mode or stage added there but not handled elsewhere
(or spelled out elsewhere but not there) fails here."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import get_args

import numpy as np
import pytest

from secfed import config, names
from secfed.names import (
    MESSAGE_STAGES,
    MODES,
    STAGES_OF,
    WIRE_STAGES,
    Mode,
    Protection,
    Stage,
    TrainableSet,
)

ROOT = Path(__file__).resolve().parent.parent


def test_names_is_a_torch_free_leaf() -> None:
    tree = ast.parse((ROOT / "secfed" / "names.py").read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not [m for m in imported if m.startswith("secfed")], imported
    code = "import secfed.names, sys; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_wire_codes_keep_their_meaning() -> None:
    from secfed.transport.api import STAGES, Envelope

    # Appended order: codes 0-5 as first shipped, "reveal" appended as 6.
    assert STAGES[:7] == ("advertise", "share", "upload", "consistency", "unmask", "done", "reveal")
    # Every stage but "aborted" has a wire code, exactly once.
    assert sorted(WIRE_STAGES) == sorted(set(Stage) - {Stage.ABORTED})
    for code, stage in enumerate(STAGES):
        env = Envelope(round_number=1, stage=stage, ledger_head=b"h", payload=b"p").to_bytes()
        assert env[13] == code and Envelope.from_bytes(env).stage == stage
    # The round-spec mode code is the index in MODES: append-only as well.
    assert MODES[:3] == ("secagg", "secagg+", "ckks")


def test_every_mode_is_handled_everywhere() -> None:
    from secfed.cli.simulate import _MODES
    from secfed.privacy.distributed import DistributedDP  # noqa: F401  (imports MASK_MODES)
    from secfed.protocol.spec import MODES as SPEC_MODES
    from secfed.protocol.spec import RoundSpec

    assert set(STAGES_OF) == set(Mode)
    from secfed.flower.simulate import MODES as FLOWER_MODES

    assert get_args(config.AggregationMode) == MODES == config.MODES == SPEC_MODES == _MODES
    assert FLOWER_MODES is MODES
    assert set(names.MASK_MODES) <= set(MODES) and config.MASK_MODES == names.MASK_MODES
    parties = tuple(f"org-{i}" for i in range(5))
    for mode in Mode:
        spec = RoundSpec.create(federation="f", round_number=1, mode=mode.value,
                                participants=parties, vector_length=4)
        assert RoundSpec.from_bytes(spec.to_bytes()).mode == mode
        for stage in STAGES_OF[mode]:
            assert stage in MESSAGE_STAGES
            assert names.protection_of(stage, mode) in Protection


def test_every_stage_is_known_to_the_tables() -> None:
    from secfed.cli.simulate import _STAGES
    from secfed.protocol.simulate import DROP_STAGES, PROBE_STAGES, REVEAL_STAGE

    assert set(MESSAGE_STAGES) == set(Stage) - {Stage.DONE, Stage.ABORTED}
    # every stage runs somewhere: probe and contribute in probed mask-mode rounds (issue 17)
    assert set().union(*STAGES_OF.values(), names.PROBE_ONLY_STAGES) == set(MESSAGE_STAGES)
    assert set(_STAGES) == set(MESSAGE_STAGES) == {*DROP_STAGES, REVEAL_STAGE, *PROBE_STAGES}
    from secfed.protocol import spec

    assert spec.Stage is Stage


def test_protections_and_trainable_sets_have_one_spelling() -> None:
    from secfed.audit.verify import PROTECTIONS, UPDATE_PROTECTIONS
    from secfed.participant.state import PROTECTIONS as SITE_PROTECTIONS

    assert PROTECTIONS == frozenset(Protection) and SITE_PROTECTIONS == names.PROTECTIONS
    assert UPDATE_PROTECTIONS == {names.protection_of(Stage.UPLOAD, m) for m in Mode}
    assert get_args(config.TrainableSet) == names.TRAINABLE_SCOPES == tuple(TrainableSet)
    assert config.FEATURE_SCOPES == ("head", "classifier")


def test_one_default_threshold_and_ckks_slot_count() -> None:
    from secfed.crypto import ckks
    from secfed.protocol import spec

    assert config.default_threshold is names.default_threshold is spec.default_threshold
    assert [names.default_threshold(n) for n in (3, 4, 5, 6, 9, 30)] == [2, 2, 3, 4, 6, 20]
    assert ckks.SLOTS == names.CKKS_SLOTS == ckks.POLY_MODULUS_DEGREE // 2


@pytest.mark.parametrize("label", sorted(names.DOMAIN_LABELS))
def test_domain_labels_are_distinct_and_versioned(label: bytes) -> None:
    assert label.startswith(b"secfed/v1/")
    body = label.removesuffix(b"\x00")
    others = {x.removesuffix(b"\x00") for x in names.DOMAIN_LABELS if x != label}
    assert body not in others


def test_no_domain_label_is_spelled_outside_names() -> None:
    spelled = []
    for base in ("secfed", "crypto", "cli"):
        for path in (ROOT / base).rglob("*.py"):
            if path.name == "names.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Constant) and isinstance(node.value, bytes) \
                        and node.value.startswith(b"secfed/v1/"):
                    spelled.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not spelled


def test_one_adapter_hash() -> None:
    from secfed.participant.adapter import vector_hash

    vec = np.arange(6, dtype=np.float32)
    assert vector_hash is names.vector_hash
    assert len(names.vector_hash(b"d", vec)) == 64
    assert names.vector_hash(b"d", vec) != names.vector_hash(b"e", vec)
