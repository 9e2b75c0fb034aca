"""Fixtures: one short real federation per session, and a private copy of it per test."""

from __future__ import annotations

import shutil

import pytest

from .federation_run import FederationRun, run_federation


@pytest.fixture(scope="session")
def federation_master(tmp_path_factory) -> FederationRun:
    """Three enterprises, rounds secagg, ckks (city-operations drops out), ckks.

    The dropout round is ckks: a 3-party secagg round needs all three (t = 2 holders besides
    each responder, issue 20), so a masked round can no longer lose one of three."""
    root = tmp_path_factory.mktemp("federation")
    return run_federation(root, modes=("secagg", "ckks", "ckks"), dropped={2: "city-operations"})


@pytest.fixture
def federation(federation_master, tmp_path) -> FederationRun:
    """A private copy of the federation's files that a test may tamper with."""
    root = tmp_path / "run"
    shutil.copytree(federation_master.root, root)
    m = federation_master
    return FederationRun(
        root=root,
        federation_toml=root / m.federation_toml.relative_to(m.root),
        transcript=root / m.transcript.relative_to(m.root),
        ledgers={e: root / p.relative_to(m.root) for e, p in m.ledgers.items()},
        outbound={e: root / p.relative_to(m.root) for e, p in m.outbound.items()},
        identities=m.identities,
        coordinator_identity=m.coordinator_identity,
        modes=m.modes,
        dropped=m.dropped,
    )
