"""Flower's deployment engine on loopback for the slow e2e test: a SuperLink with TLS and
CLI-managed node authentication, one SuperNode per site (its own EC key, registered with
``flwr supernode register``), each site's ``secfed flower site`` process, and ``flwr run`` of
``examples/flower`` against that SuperLink."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from secfed.federation.pki import issue_server_cert, make_ca, write_private_pem

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]
PORT_TRIES = 3  # a port free_port() picked may be taken before the process binds it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ssh_key(path: Path) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    write_private_pem(path, key.private_bytes(serialization.Encoding.PEM,
                                              serialization.PrivateFormat.OpenSSH,
                                              serialization.NoEncryption()))
    path.with_suffix(".pub").write_bytes(key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))


class Deployment:
    def __init__(self, root: Path, kits: Any):
        self.root, self.kits = root, kits
        self.procs: dict[str, subprocess.Popen] = {}
        self.home = root / "flwr-home"
        self.home.mkdir(parents=True)
        self.env = {**os.environ, "FLWR_HOME": str(self.home), "HF_HUB_OFFLINE": "1",
                    "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
        tls = root / "tls"
        tls.mkdir()
        ca = make_ca("flower-e2e")
        server = issue_server_cert(ca, "127.0.0.1")
        (tls / "ca.pem").write_bytes(ca.cert_pem)
        (tls / "server.pem").write_bytes(server.cert_pem)
        write_private_pem(tls / "server.key", server.key_pem)
        self.tls = tls
        self.port = free_port()
        self._write_config()

    def _write_config(self) -> None:
        (self.home / "config.toml").write_text(
            '[superlink]\ndefault = "e2e"\n\n[superlink.e2e]\n'
            f'address = "127.0.0.1:{self.port}"\nroot-certificates = "{self.tls / "ca.pem"}"\n')

    def _start(self, name: str, args: list[str]) -> None:
        log = open(self.root / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        self.procs[name] = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                            env=self.env, cwd=self.root)

    def _flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "flwr"), *args], capture_output=True, text=True,
                              env=self.env, timeout=timeout, cwd=self.root)

    def start(self) -> None:
        self._start_superlink()
        for eid, kit in sorted(self.kits.enterprises.items()):
            key = self.root / f"node-{eid}.key"
            _ssh_key(key)
            done = self._flwr("supernode", "register", str(key.with_suffix(".pub")))
            if done.returncode != 0:
                raise RuntimeError(f"register {eid}: {done.stdout} {done.stderr}")
            self._start(f"site-{eid}", [str(BIN / "secfed"), "flower", "site", "--kit", str(kit),
                                        "--new-ledger"])
            self._start_supernode(eid)
        self._wait_ready(end=time.monotonic() + 300)

    def _start_superlink(self) -> None:
        """Start the SuperLink and wait until its Control API answers. A port picked by
        :func:`free_port` can be taken by another process before the SuperLink binds it (other
        suites run beside this one): a SuperLink that exits is started again on a new port."""
        for attempt in range(PORT_TRIES):
            if attempt:
                self.port = free_port()
                self._write_config()
            self._start("superlink", [
                str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(self.tls / "ca.pem"),
                "--ssl-certfile", str(self.tls / "server.pem"), "--ssl-keyfile",
                str(self.tls / "server.key"), "--enable-supernode-auth",
                "--disable-runtime-dependency-installation", "--host", "127.0.0.1",
                "--port", str(self.port), "--database", str(self.root / "superlink.db")])
            end = time.monotonic() + 120
            while self.procs["superlink"].poll() is None and time.monotonic() < end:
                if self._flwr("supernode", "ls", timeout=60).returncode == 0:
                    return
                time.sleep(1)
            self._stop("superlink")
        raise RuntimeError("SuperLink did not come up: " + self.log("superlink"))

    def _start_supernode(self, eid: str) -> None:
        key, kit = self.root / f"node-{eid}.key", self.kits.enterprises[eid]
        self._start(f"supernode-{eid}", [
            str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{self.port}",
            "--root-certificates", str(self.tls / "ca.pem"),
            "--auth-supernode-private-key", str(key),
            "--node-config", f'kit="{kit}"', "--port", str(free_port())])

    def _wait_ready(self, *, end: float) -> None:
        """Every site's agent socket exists and every SuperNode is online before the run (a
        node registered but not connected yet would miss the first steps). A SuperNode that
        exited (its runtime port taken meanwhile) is started again on a new port."""
        from secfed.flower.agent import socket_path

        restarts = 0
        while True:
            for eid in self.kits.enterprises:
                if self.procs[f"site-{eid}"].poll() is not None:
                    raise RuntimeError(f"site {eid} exited: {self.log(f'site-{eid}')}")
                if self.procs[f"supernode-{eid}"].poll() is not None and restarts < PORT_TRIES:
                    restarts += 1
                    self._start_supernode(eid)
            online = self._online()
            sockets = all(socket_path(k).exists() for k in self.kits.enterprises.values())
            if sockets and online >= len(self.kits.enterprises):
                return
            if time.monotonic() > end:
                raise RuntimeError(f"{online} nodes online, sockets {sockets}: {self.logs()}")
            time.sleep(1)

    def _online(self) -> int:
        done = self._flwr("supernode", "ls", "--format", "json", timeout=60)
        try:
            nodes = json.loads(done.stdout)["nodes"]
        except (ValueError, KeyError, TypeError):
            return 0
        return sum(1 for node in nodes if node.get("status") == "online")

    def run(self, timeout: float) -> subprocess.CompletedProcess:
        app = REPO / "examples" / "flower"
        done = self._flwr("run", str(app), "--stream", "--run-config",
                          f'coordinator-kit="{self.kits.coordinator}"', timeout=timeout)
        (self.root / "flwr-run.log").write_text(done.stdout + done.stderr)  # the steps' times
        return done

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def logs(self) -> str:
        """The tail of every process's log (for a failed assertion's message)."""
        return "".join(f"\n--- {name}\n{self.log(name)[-1500:]}" for name in self.procs)

    def _stop(self, name: str) -> None:
        proc = self.procs.pop(name)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
