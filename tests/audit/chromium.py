"""Open a page in headless Debian Chromium over the DevTools protocol and report what happened.

Test-side only. Records console errors, uncaught exceptions, log errors and every network request,
evaluates a probe expression in the loaded page and takes a full-page screenshot.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from websockets.sync.client import connect

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--mute-audio",
)


def ensure_chromium() -> str:
    """Path of the chromium binary, installing Debian's package if it is missing (we are root)."""
    found = shutil.which("chromium")
    if found:
        return found
    subprocess.run(
        "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium",
        shell=True,
        check=True,
        stdout=subprocess.DEVNULL,
        timeout=1200,
    )
    found = shutil.which("chromium")
    assert found, "apt-get installed chromium but it is not on PATH"
    return found


@dataclass
class PageVisit:
    """What a page load produced."""

    loaded: bool = False
    console_errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    probe: Any = None
    screenshot: bytes = b""


class _Session:
    def __init__(self, ws_url: str) -> None:
        self._ws = connect(ws_url, max_size=64 * 2**20, open_timeout=20)
        self._next_id = 0
        self.events: list[dict[str, Any]] = []

    def call(self, method: str, params: dict[str, Any] | None = None, timeout: float = 30) -> Any:
        self._next_id += 1
        my_id = self._next_id
        self._ws.send(json.dumps({"id": my_id, "method": method, "params": params or {}}))
        deadline = time.monotonic() + timeout
        while True:
            msg = json.loads(self._ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if msg.get("id") == my_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def wait_for(self, method: str, timeout: float = 30) -> dict[str, Any]:
        for ev in self.events:
            if ev.get("method") == method:
                return ev
        deadline = time.monotonic() + timeout
        while True:
            msg = json.loads(self._ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            self.events.append(msg)
            if msg.get("method") == method:
                return msg

    def drain(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                self.events.append(json.loads(self._ws.recv(timeout=left)))
            except TimeoutError:
                return

    def close(self) -> None:
        self._ws.close()


def _devtools_port(profile: Path, proc: subprocess.Popen[bytes], timeout: float) -> int:
    marker = profile / "DevToolsActivePort"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"chromium exited early with status {proc.returncode}")
        if marker.exists():
            text = marker.read_text().split()
            if text:
                return int(text[0])
        time.sleep(0.1)
    raise TimeoutError("chromium did not open its DevTools port")


def _end(proc: subprocess.Popen[bytes]) -> None:
    """End the chromium we started and the helper processes in its own process group."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=10)
            break
        except subprocess.TimeoutExpired:
            continue
    proc.wait()
    time.sleep(0.2)  # helpers of the group exit after the browser; let them release the profile


def visit(page: Path, probe_js: str, *, width: int = 1200, timeout: float = 60) -> PageVisit:
    """Load ``page`` (a local file) in headless Chromium; return errors, requests, probe, screenshot."""
    binary = ensure_chromium()
    result = PageVisit()
    with tempfile.TemporaryDirectory(
        prefix="secfed-chromium-", ignore_cleanup_errors=True
    ) as profile_dir:
        profile = Path(profile_dir)
        proc = subprocess.Popen(
            [
                binary,
                *CHROMIUM_FLAGS,
                f"--user-data-dir={profile}",
                "--remote-debugging-port=0",
                "--remote-allow-origins=*",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: renderers are ended with it
        )
        try:
            port = _devtools_port(profile, proc, timeout)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as resp:
                targets = json.load(resp)
            ws_url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
            session = _Session(ws_url)
            try:
                for domain in ("Page", "Runtime", "Log", "Network"):
                    session.call(f"{domain}.enable")
                session.call(
                    "Emulation.setDeviceMetricsOverride",
                    {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False},
                )
                session.events.clear()
                session.call("Page.navigate", {"url": page.resolve().as_uri()})
                session.wait_for("Page.loadEventFired", timeout)
                result.loaded = True
                session.drain(0.5)  # late console messages
                evaluated = session.call(
                    "Runtime.evaluate", {"expression": probe_js, "returnByValue": True}
                )
                result.probe = evaluated.get("result", {}).get("value")
                shot = session.call(
                    "Page.captureScreenshot",
                    {"format": "png", "captureBeyondViewport": True},
                    timeout,
                )
                result.screenshot = base64.b64decode(shot["data"])
                for ev in session.events:
                    method, params = ev.get("method"), ev.get("params", {})
                    if method == "Runtime.exceptionThrown":
                        result.console_errors.append(json.dumps(params["exceptionDetails"])[:500])
                    elif method == "Runtime.consoleAPICalled" and params.get("type") in (
                        "error",
                        "assert",
                    ):
                        result.console_errors.append(json.dumps(params.get("args"))[:500])
                    elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                        result.console_errors.append(params["entry"].get("text", "")[:500])
                    elif method == "Network.requestWillBeSent":
                        result.requests.append(params["request"]["url"][:80])
            finally:
                session.close()
        finally:
            _end(proc)
    return result
