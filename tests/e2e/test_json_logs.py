"""``--log-format json`` (issue J item 4): a whole federation -- a coordinator and three sites,
a secagg round and a ckks round -- logs one JSON event per line with round/stage/enterprise
fields, and nothing in any of its output is key material, a share or an update value: no
private key of any kit (PEM body or raw scalar), no 16-byte window of any protocol message the
coordinator accepted (sealed and unmasking shares, masked and encrypted uploads), no window of
a CKKS secret context, no value of any site's update or of the new global adapter."""

from __future__ import annotations

import base64
import json
import subprocess

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, x25519

from secfed.participant.adapter import synthetic_update

from .harness import ENV, PY, adapter_of, coordinator_db, make_federation

ENTERPRISES = ["org-a", "org-b", "org-c"]
DIM = 64
LOG_KEYS = {"ts", "level", "component", "event", "round", "stage", "enterprise"}


def _run(tmp_path):
    kits = make_federation(tmp_path / "fed", enterprises=ENTERPRISES, dim=DIM,
                           schedule=("secagg", "ckks"), rounds=2)
    logs = {}
    procs = {"coordinator": subprocess.Popen(
        [PY, "-m", "secfed.cli.main", "aggregate", "--kit", str(kits.coordinator),
         "--log-format", "json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)}
    for eid in ENTERPRISES:
        procs[eid] = subprocess.Popen(
            [PY, "-m", "secfed.cli.main", "join", "--kit", str(kits.enterprises[eid]),
             "--synthetic", "--new-ledger", "--log-format", "json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    try:
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=240)
            logs[name] = (proc.returncode, out.decode(), err.decode())
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    return kits, logs


def _key_secrets(path) -> list[str]:
    """Text forms of a private key file: its PEM body lines and its raw secret in hex."""
    data = path.read_bytes()
    lines = [ln for ln in data.decode(errors="replace").splitlines()
             if ln and not ln.startswith("-----")]
    forms = [ln for ln in lines if len(ln) >= 16]
    key = serialization.load_pem_private_key(data, password=None)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        forms.append(f"{key.private_numbers().private_value:x}")
    elif isinstance(key, ed25519.Ed25519PrivateKey | x25519.X25519PrivateKey):
        raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                serialization.NoEncryption())
        forms += [raw.hex(), base64.b64encode(raw).decode()]
    return forms


def _windows(blob: bytes, size: int = 16) -> list[str]:
    out = []
    for i in range(0, max(0, len(blob) - size) + 1, size):
        chunk = blob[i:i + size]
        out += [chunk.hex(), base64.b64encode(chunk).decode()[:20]]
    return out


def _values(vec: np.ndarray, n: int = 24) -> list[str]:
    v32 = np.asarray(vec, dtype=np.float32)[:n]
    return ([repr(float(x)) for x in v32 if abs(float(x)) > 1e-6]
            + [f"{float(x):.7f}" for x in v32 if abs(float(x)) > 1e-4]
            + _windows(v32.tobytes()))


@pytest.mark.slow
def test_a_whole_federations_json_logs_hold_no_key_share_or_update_value(tmp_path) -> None:
    kits, logs = _run(tmp_path)
    assert {n: rc for n, (rc, _o, _e) in logs.items()} == {n: 0 for n in logs}, logs
    text = "\n".join(o + "\n" + e for _rc, o, e in logs.values())
    # one JSON event per line on stderr, with the fixed fields
    events = {}
    for name, (_rc, _out, err) in logs.items():
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert lines, f"{name} logged nothing"
        for line in lines:
            record = json.loads(line)
            assert LOG_KEYS <= set(record), record
            events.setdefault(name, set()).add(record["event"])
            if record["event"] in ("message", "stage_closed", "charged", "round_opened"):
                assert isinstance(record["round"], int), record
    assert {"round_opened", "stage_closed", "message", "round_done",
            "federation_finished"} <= events["coordinator"]
    for eid in ENTERPRISES:
        assert {"charged", "applied", "round_report"} <= events[eid]
    # what must never appear
    secrets: list[str] = []
    for folder in [kits.coordinator, *kits.enterprises.values(), kits.root / "ca"]:
        for path in folder.iterdir():
            if path.suffix == ".key" or path.name == "identity.pem":
                secrets += _key_secrets(path)
            elif path.name == "ckks_secret.ctx":
                secrets += _windows(path.read_bytes()[:4096])
    db = coordinator_db(kits)
    payloads = [bytes(p) for (p,) in db.execute("SELECT payload FROM transcript")]
    assert len(payloads) >= 2 * 3 * len(ENTERPRISES)
    for payload in payloads:
        secrets += _windows(payload[-512:])  # the tail: shares and vector words, past headers
    for r in (1, 2):
        for eid in ENTERPRISES:
            secrets += _values(synthetic_update(eid, r, DIM))
    secrets += _values(adapter_of(kits, "org-a"))
    assert len(secrets) > 1000
    # the scan finds a leak where there is one (a message tail, an update value as printed)
    planted = payloads[-1][-512:].hex() + json.dumps(synthetic_update("org-b", 2, DIM)[:4].tolist())
    assert [s for s in secrets if s in planted]
    leaked = [s for s in secrets if s in text]
    assert leaked == [], f"{len(leaked)} secret forms in the logs, e.g. {leaked[:3]}"
