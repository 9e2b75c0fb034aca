"""schemathesis fuzzing of the coordinator's OpenAPI: no input gives a 5xx or an undocumented
response. Runs the real coordinator service (state in SQLite) through ASGI, as an allow-listed
enterprise; long polls answer at once so the fuzzer does not sit in them."""

from __future__ import annotations

from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from e2e.harness import make_federation
from secfed.coordinator import max_body_bytes
from secfed.coordinator.service import Coordinator
from secfed.federation.kits import CoordinatorKit
from secfed.transport.server import PEER_KEY, create_app

pytestmark = pytest.mark.slow

ENTERPRISES = ["energy-utility", "security-operator", "city-ops"]


class _NoWaitCoordinator(Coordinator):
    async def _wait_change(self, predicate, wait):  # type: ignore[override]
        return predicate()


def _app(root: Path):
    kits = make_federation(root, enterprises=ENTERPRISES, dim=32, schedule=("secagg",), rounds=1)
    service = _NoWaitCoordinator(CoordinatorKit.load(kits.coordinator))
    service._open_round(1)  # a round is open, as in production
    inner = create_app(service, allowed=frozenset(ENTERPRISES), max_body=max_body_bytes(32))

    async def as_enterprise(scope, receive, send):
        scope.setdefault("extensions", {})[PEER_KEY] = {"id": ENTERPRISES[0]}
        await inner(scope, receive, send)

    return as_enterprise, inner


def test_api_never_errors_5xx(tmp_path: Path) -> None:
    app, _ = _app(tmp_path / "fed")
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 6
    seen: set[int] = set()
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
        def fuzz(case) -> None:
            response = case.call()
            seen.add(response.status_code)
            assert response.status_code < 500, (case, response.status_code, response.text[:300])

        fuzz()
    assert seen & {400, 409, 410, 422}  # the fuzzer did reach the typed refusals
