"""A round number in a request path that SQLite cannot hold is refused at the door (422), never
a 500 from an overflow deep in the service (the schemathesis fuzz found /applied with round
-2^63 - 1 answering 500)."""

from __future__ import annotations

from pathlib import Path

from starlette.testclient import TestClient

from e2e.test_openapi_fuzz import _app

CONFIRMATION = {"global_hash": "0" * 64, "signature_hex": "0" * 128}


def test_round_numbers_beyond_the_state_are_refused_with_422(tmp_path: Path) -> None:
    app, _ = _app(tmp_path / "fed")
    with TestClient(app) as client:
        for r in (-(2**63) - 1, -1, 2**63):
            calls = [
                client.post(f"/v1/rounds/{r}/applied", json=CONFIRMATION),
                client.get(f"/v1/rounds/{r}/outcome"),
                client.get(f"/v1/rounds/{r}/aggregate"),
                client.get(f"/v1/rounds/{r}/inbox/upload"),
                client.post(f"/v1/rounds/{r}/stages/upload", content=b"x"),
            ]
            assert [c.status_code for c in calls] == [422] * len(calls), [c.text[:200] for c in calls]
        # an ordinary earlier or later round still reaches the service's own refusals
        assert client.post("/v1/rounds/7/applied", json=CONFIRMATION).status_code in (409, 410)
