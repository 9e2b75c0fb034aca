"""Running a coordinator day to day (issue J items 1, 2, 6, 7): ``secfed aggregate`` as a real
process -- its status listener, a busy port, a second coordinator on the same kit, a status
address that is not loopback, a prompt stop on SIGTERM with a long poll in flight -- and
``secfed join`` with another federation's kit. Each error is one line on stderr, exit 1."""

from __future__ import annotations

import fcntl
import json
import re
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from secfed.federation.kits import EnterpriseKit, create_kits
from secfed.federation.plan import model_settings_for
from secfed.transport.client import CoordinatorClient
from secfed.transport.tls import server_ssl_context

from .harness import ENV, PY, make_federation

ENTERPRISES = ["org-a", "org-b", "org-c"]


def _aggregate(kit: Path, *args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([PY, "-m", "secfed.cli.main", "aggregate", "--kit", str(kit), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            **kw)


def _one_error_line(proc: subprocess.Popen, timeout: float = 120) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 1, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("secfed: error: "), err
    assert "Traceback" not in err
    return lines[0]


def _url(kits) -> str:
    text = (kits.coordinator / "federation.toml").read_text()
    return re.search(r'coordinator_url = "([^"]+)"', text).group(1)


def _port(kits) -> int:
    return int(_url(kits).rsplit(":", 1)[1])


@pytest.fixture
def kits(tmp_path):
    # start=0: round 1 opens at once, no site needs to report ready (no site runs here)
    return make_federation(tmp_path / "fed", enterprises=ENTERPRISES, dim=16,
                           schedule=("secagg",), rounds=1, train=120.0, start=0.0)


def test_busy_coordinator_port_is_one_line_naming_it(kits) -> None:
    port = _port(kits)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen(1)
        line = _one_error_line(_aggregate(kits.coordinator, "--status-listen", "off"))
    assert f"port {port} on 127.0.0.1 is already in use" in line


def test_busy_status_port_is_one_line_naming_it(kits) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        line = _one_error_line(_aggregate(kits.coordinator, "--status-listen",
                                          f"127.0.0.1:{port}"))
    assert f"--status-listen port {port} on 127.0.0.1 is already in use" in line


def test_second_coordinator_on_the_same_kit_is_one_line_naming_the_lock(kits) -> None:
    lock = kits.coordinator / "coordinator.lock"
    with open(lock, "w") as held:  # what a running coordinator holds
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("4242\n")
        held.flush()
        line = _one_error_line(_aggregate(kits.coordinator, "--status-listen", "off"))
    assert str(lock) in line and "pid 4242" in line and "one secfed aggregate at a time" in line


def test_status_on_a_non_loopback_address_needs_the_explicit_flag(kits) -> None:
    line = _one_error_line(_aggregate(kits.coordinator, "--status-listen", "0.0.0.0:0"))
    assert "--status-public" in line and "'0.0.0.0'" in line


def _wait_line(proc: subprocess.Popen, event: str, timeout: float = 120) -> dict:
    found: dict = {}

    def read() -> None:
        for line in proc.stdout:
            if line.startswith("{") and json.loads(line).get("event") == event:
                found.update(json.loads(line))
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    assert found, f"no {event} event within {timeout} s"
    return found


def _get(url: str) -> tuple[int, str, dict]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read().decode(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(), dict(exc.headers)


def test_status_listener_then_a_prompt_stop_on_sigterm_with_a_long_poll_open(kits) -> None:
    proc = _aggregate(kits.coordinator, "--json", "--status-listen", "127.0.0.1:0")
    try:
        listening = _wait_line(proc, "status_listening")
        _wait_line(proc, "round_opened")
        base = listening["url"]
        status, page, headers = _get(base)
        assert status == 200 and "Federation <span data-field=\"federation\">e2e</span>" in page
        assert "default-src 'none'" in headers["content-security-policy"]
        snap = json.loads(_get(base + "status.json")[1])
        assert snap["round"]["number"] == 1 and snap["round"]["stage"] == "advertise"
        assert [e["state"] for e in snap["enterprises"]] == ["waiting"] * 3
        status, metrics, _ = _get(listening["metrics"])
        assert status == 200 and "secfed_current_round 1.0" in metrics
        request = urllib.request.Request(base, data=b"x", method="POST")
        assert _get_request(request) == 405  # read-only
        # a site's long poll (up to 60 s) is in flight when the operator stops the coordinator
        kit = EnterpriseKit.load(kits.enterprises["org-a"])
        client = CoordinatorClient(base_url=_url(kits), cert=kit.cert,
                                   key=kit.key, ca=kit.ca, retry_for=0.0)
        poll = threading.Thread(target=_swallow, args=(client,), daemon=True)
        poll.start()
        time.sleep(1.0)
        assert poll.is_alive()
        start = time.monotonic()
        proc.terminate()
        proc.wait(timeout=60)
        took = time.monotonic() - start
        err = proc.stderr.read()
        assert proc.returncode == 0, err
        assert "stopped by SIGTERM (state saved" in err and "Traceback" not in err
        assert took < 5.0, f"aggregate took {took:.1f} s to stop after SIGTERM"
        assert not (kits.coordinator / "coordinator.lock").exists() or _lock_free(kits)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _get_request(request: urllib.request.Request) -> int:
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _swallow(client: CoordinatorClient) -> None:
    try:
        client.round_info(after=1, wait=60.0)
    except Exception:  # the coordinator went away under it: expected
        pass


def _lock_free(kits) -> bool:
    with open(kits.coordinator / "coordinator.lock", "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if still held
    return True


def test_join_with_another_federations_kit_names_both_federations(tmp_path) -> None:
    """A coordinator of federation 'e2e' answers on the address that the kit of federation
    'other' names: the join ends in one line saying so, not CERTIFICATE_VERIFY_FAILED."""
    ours = make_federation(tmp_path / "ours", enterprises=ENTERPRISES, dim=16,
                           schedule=("secagg",), rounds=1)
    port = _port(ours)
    theirs = create_kits(tmp_path / "theirs", name="other", enterprises=ENTERPRISES,
                         coordinator_url=f"https://127.0.0.1:{port}", mode_schedule=("secagg",),
                         rounds=1, model=model_settings_for(model_dir=None, synthetic_dim=16))
    ctx = server_ssl_context(cert=ours.coordinator / "server.pem",
                             key=ours.coordinator / "server.key", ca=ours.coordinator / "ca.pem")
    stop = threading.Event()
    listener = socket.create_server(("127.0.0.1", port))
    listener.settimeout(0.2)

    def serve() -> None:  # the other federation's coordinator: TLS only, as its server is
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            try:
                with ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(1)
            except (OSError, ssl.SSLError):
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        proc = subprocess.run(
            [PY, "-m", "secfed.cli.main", "join", "--kit", str(theirs.enterprises["org-a"]),
             "--synthetic", "--new-ledger"], capture_output=True, text=True, env=ENV, timeout=180)
    finally:
        stop.set()
        thread.join(5)
        listener.close()
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("secfed: error: ")]
    assert proc.returncode == 1 and len(errors) == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "CERTIFICATE_VERIFY_FAILED" not in proc.stderr
    assert errors[0].startswith("secfed: error: this kit belongs to federation 'other'")
    assert f"coordinator at 127.0.0.1:{port} serves federation 'e2e'" in errors[0]


def test_keep_serving_keeps_the_status_page_up_after_the_last_round_until_sigterm(
        tmp_path) -> None:
    """``aggregate --keep-serving`` (what ``secfed demo run --keep-serving`` starts): after the
    last round the coordinator does not exit; its status page shows the finished federation
    until SIGTERM stops it cleanly."""
    kits = make_federation(tmp_path / "fed", enterprises=ENTERPRISES, dim=16,
                           schedule=("secagg",), rounds=1, train=120.0, start=120.0)
    proc = _aggregate(kits.coordinator, "--json", "--status-listen", "127.0.0.1:0",
                      "--keep-serving")
    joins = [subprocess.Popen([PY, "-m", "secfed.cli.main", "join", "--kit",
                               str(kits.enterprises[e]), "--synthetic", "--json", "--new-ledger"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env=ENV) for e in ENTERPRISES]
    try:
        listening = _wait_line(proc, "status_listening")
        _wait_line(proc, "serving_until_stopped", timeout=240)
        assert [j.wait(timeout=60) for j in joins] == [0, 0, 0]
        time.sleep(2.0)
        assert proc.poll() is None, "the coordinator exited although --keep-serving was given"
        snap = json.loads(_get(listening["url"] + "status.json")[1])
        assert snap["round"]["number"] == 1 and snap["round"]["status"] == "done"
        assert snap["completed"] == 1
        proc.terminate()
        proc.wait(timeout=60)
        err = proc.stderr.read()
        assert proc.returncode == 0 and "stopped by SIGTERM (state saved" in err, err
    finally:
        for p in [proc, *joins]:
            if p.poll() is None:
                p.kill()
                p.wait()
