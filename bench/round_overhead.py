"""End-to-end secure round vs plaintext FedAvg over the same transport (mutual TLS on loopback).

Both runs: one server process and 3 client processes, d = 1e5 float32 per client.

* secure: ``secfed aggregate`` + three ``secfed join --synthetic`` processes, rounds in ``secagg``
  mode (or ``secagg+``/``ckks``).
* plaintext: the same FastAPI/uvicorn server stack, certificates and HTTP client, with a
  minimal in-memory service that takes raw float32 uploads and hands back their mean (one
  upload-and-wait ``exchange`` call per client, as the secure stages use).

Two figures per round, both printed with their ratio (target <= 1.2x):

* **tail**: from the moment the *last* client has its update (``trained``: local training
  returned) until the *last* client has applied the aggregate (``applied``). For secfed this is
  upload -> consistency -> unmask -> result (key set-up overlaps training), for plaintext
  upload -> result. The ledger charge runs beside training and is joined before the upload: it
  reaches this window only when it outlasts training.
* **round**: the whole round, from the moment the server opens it until the last client has
  applied the aggregate: fetching the round, (secfed: checking it; key set-up and the ledger
  charge alongside) training and the tail. Plaintext clients poll for the next round every
  millisecond; secfed participants long-poll it.

The signed-hash confirmation that follows (which plaintext FedAvg has no counterpart for) is
shown apart (``+confirm``: trained -> the last ``round_report``).

Local training is stood in for by ``--train-s`` seconds of CPU work (float32 matmuls, which
release the GIL like torch) before each client's update is ready, the same in both runs. With
``--train-s 0`` the secure key set-up is on the critical path too.

Prints medians over the measured rounds (round 1, with the connection set-up, is left out),
alternating plaintext and secure runs so load changes hit both, and Flower 1.42's figure from
issue 8 on this machine (SecAgg+ 31 s vs plaintext 6.4 s for the same size).

    .venv/bin/python bench/round_overhead.py [--dim 100000] [--rounds 5] [--mode secagg]
                                             [--train-s 0,1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from secfed.config import Deadlines, DPSettings
from secfed.federation.kits import create_kits
from secfed.federation.plan import model_settings_for
from secfed.participant.adapter import (
    synthetic_training,
    synthetic_update,
)
from secfed.transport.api import Envelope, RoundInfo, RoundOutcome, SubmitAck

ENTERPRISES = ["energy-utility", "security-operator", "city-ops"]
FLOWER_SECURE_S, FLOWER_PLAIN_S = 31.0, 6.4  # issue 8: Flower 1.42, 3 clients, d = 1e5, loopback
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kits(root: Path, *, dim: int, rounds: int, mode: str):
    return create_kits(
        root, name="bench", enterprises=ENTERPRISES,
        coordinator_url=f"https://127.0.0.1:{_port()}",
        model=model_settings_for(model_dir=None, synthetic_dim=dim), mode_schedule=(mode,),
        rounds=rounds, deadlines=Deadlines(train=120, stage=60, applied=60),
        # small per-round charges so many rounds fit the default budget
        dp=DPSettings(noise_multiplier=2.0, sample_rate=0.001, local_steps=1),
    )


# ------------------------------------------------------------------ secure


def _set_probes(root: Path, probes: int) -> None:
    """Every party's federation.toml gains ``probes`` and the Z_2^64 ring (probes need it; the
    run without probes gets the same ring, so only the probes differ)."""
    from secfed.config import federation_to_toml, load_federation

    for path in sorted(root.rglob("federation.toml")):
        fed = load_federation(path)
        model = fed.model.model_copy(update={"ring_bits": 64})
        path.write_text(federation_to_toml(fed.model_copy(update={"probes": probes, "model": model})))


def secure_rounds(root: Path, *, dim: int, rounds: int, mode: str, train_s: float,
                  probes: int | None = None
                  ) -> tuple[list[float], list[float], list[float], list[float]]:
    """(trained -> applied, trained -> confirmed, opened -> applied, opened -> next opened) per
    round, seconds (the last is the round period: it includes what follows the sites' apply,
    e.g. a probed round's contribution stage and the confirmations).
    ``probes``: None = the kit as made; else that many norm probes on the Z_2^64 ring."""
    root = root / ("secure" if probes is None else f"secure-probes-{probes}")
    root.mkdir(parents=True, exist_ok=True)
    kits = _kits(root / "secure", dim=dim, rounds=rounds, mode=mode)
    if probes is not None:
        _set_probes(kits.root, probes)
    py = [sys.executable, "-m", "secfed.cli.main"]
    logs = {}
    procs = []
    logs["coordinator"] = open(root / "coordinator.jsonl", "wb")
    procs.append(subprocess.Popen([*py, "aggregate", "--kit", str(kits.coordinator), "--json"],
                                  stdout=logs["coordinator"], stderr=subprocess.STDOUT, env=ENV))
    for eid in ENTERPRISES:
        logs[eid] = open(root / f"{eid}.jsonl", "wb")
        procs.append(subprocess.Popen(
            [*py, "join", "--kit", str(kits.enterprises[eid]), "--synthetic", "--json", "--new-ledger",
             "--synthetic-train-s", str(train_s)],
            stdout=logs[eid], stderr=subprocess.STDOUT, env=ENV))
    for p in procs:
        if p.wait(timeout=900) != 0:
            raise SystemExit(f"secure run failed; logs under {root}")
    ready: dict[int, list[float]] = {}
    applied: dict[int, list[float]] = {}
    done: dict[int, list[float]] = {}
    opened: dict[int, float] = {}
    for e in json_events(root / "coordinator.jsonl"):
        if e.get("event") == "round_opened":
            opened[e["round"]] = e["at"]
    for eid in ENTERPRISES:
        for e in json_events(root / f"{eid}.jsonl"):
            if e.get("event") == "trained":
                ready.setdefault(e["round"], []).append(e["at"])
            elif e.get("event") == "applied":
                applied.setdefault(e["round"], []).append(e["at"])
            elif e.get("event") == "round_report" and e.get("status") == "done":
                done.setdefault(e["round"], []).append(e["at"])
    want = np.mean([synthetic_update(e, r, dim) for r in range(1, rounds + 1)
                    for e in ENTERPRISES], axis=0) * rounds
    got = np.fromfile(kits.enterprises[ENTERPRISES[0]] / "adapter.f32", dtype="<f4")
    err = float(np.abs(got - want).max())
    print(f"secure: max |adapter - plaintext average| = {err:.2e}")
    full = [r for r in sorted(done) if len(done[r]) == 3]
    return ([max(applied[r]) - max(ready[r]) for r in full],
            [max(done[r]) - max(ready[r]) for r in full],
            [max(applied[r]) - opened[r] for r in full],
            [opened[r + 1] - opened[r] for r in full if r + 1 in opened])


# ------------------------------------------------------------------ plaintext, same transport


class PlaintextFedAvg:
    """FedAvg in the clear over the same HTTP API: raw float32 uploads, mean handed back."""

    def __init__(self, *, dim: int, n: int, opened: mp.Queue | None = None):
        self.dim, self.n = dim, n
        self.round = 1
        self._opened = opened
        if opened is not None:
            opened.put((1, time.time()))
        self.uploads: dict[str, np.ndarray] = {}
        self.mean: np.ndarray | None = None
        self.total = np.zeros(dim, np.float32)
        self.mean_bytes = b""
        self.changed = asyncio.Condition()

    async def round_info(self, *, after: int, wait: float) -> RoundInfo:
        return RoundInfo(round_number=self.round, status="open", stage="upload")

    async def submit(self, *, sender: str, envelope: Envelope) -> SubmitAck:
        vec = np.frombuffer(envelope.payload, dtype="<f4")
        async with self.changed:
            # running sum off the event loop, as the secure coordinator does with its ring sum
            if not self.uploads:
                self.total = np.zeros(self.dim, np.float32)
            await asyncio.to_thread(np.add, self.total, vec, out=self.total)
            self.uploads[sender] = vec
            if len(self.uploads) == self.n:
                self.mean_bytes = (self.total / np.float32(self.n)).astype("<f4").tobytes()
                self.mean = self.total
                self.changed.notify_all()
        return SubmitAck(accepted=True, round_number=envelope.round_number, stage="upload",
                         sha256=envelope.payload_sha256())

    async def inbox(self, *, sender: str, round_number: int, stage: str, wait: float):
        async with self.changed:
            end = time.monotonic() + wait
            while self.mean is None or round_number != self.round:
                left = end - time.monotonic()
                if left <= 0:
                    return None
                try:
                    await asyncio.wait_for(self.changed.wait(), left)
                except TimeoutError:
                    return None
            data = self.mean_bytes
        return data

    async def confirm(self, *, sender: str, round_number: int, confirmation) -> SubmitAck:
        async with self.changed:
            self.uploads.pop(sender, None)
            if not self.uploads:  # everyone has the mean: next round
                self.round += 1
                self.mean = None
                if self._opened is not None:
                    self._opened.put((self.round, time.time()))
        return SubmitAck(accepted=True, round_number=round_number, stage="done", sha256="0" * 64)

    async def outcome(self, *, round_number: int) -> RoundOutcome:
        return RoundOutcome(round_number=round_number, status="done", mode="plaintext")


def _serve_plain(kit_dir: str, dim: int, opened: mp.Queue) -> None:
    from urllib.parse import urlsplit

    from secfed.coordinator import max_body_bytes
    from secfed.federation.kits import CoordinatorKit
    from secfed.transport.server import create_app, serve

    kit = CoordinatorKit.load(kit_dir)
    url = urlsplit(kit.federation.coordinator_url)
    service = PlaintextFedAvg(dim=dim, n=len(ENTERPRISES), opened=opened)
    app = create_app(service, allowed=frozenset(ENTERPRISES), max_body=max_body_bytes(dim))
    asyncio.run(serve(app, host=url.hostname, port=url.port, cert=kit.cert, key=kit.key,
                      ca=kit.ca, stop=asyncio.Event()))


def _plain_client(kit_dir: str, eid: str, dim: int, rounds: int, train_s: float,
                  out: mp.Queue) -> None:
    from secfed.federation.kits import EnterpriseKit
    from secfed.transport.api import AppliedConfirmation
    from secfed.transport.client import CoordinatorClient

    kit = EnterpriseKit.load(kit_dir)
    client = CoordinatorClient(base_url=kit.federation.coordinator_url, cert=kit.cert,
                               key=kit.key, ca=kit.ca, retry_for=60)
    client.health()
    glob = np.zeros(dim, np.float32)
    for r in range(1, rounds + 1):
        while client.round_info().round_number != r:
            time.sleep(0.001)
        synthetic_training(train_s)
        update = synthetic_update(eid, r, dim)
        ready = time.time()
        data = client.exchange(Envelope(round_number=r, stage="upload", ledger_head=b"",
                                        payload=update.astype("<f4").tobytes()),
                               next_stage="done", wait=30)
        while data is None:
            data = client.inbox(round_number=r, stage="done", wait=30)
        glob = glob + np.frombuffer(data, dtype="<f4")
        done = time.time()
        client.confirm(round_number=r, confirmation=AppliedConfirmation(
            global_hash="0" * 64, signature_hex="0" * 128))
        out.put((r, ready, done))
    client.close()


def plaintext_rounds(root: Path, *, dim: int, rounds: int, train_s: float
                     ) -> tuple[list[float], list[float]]:
    """(ready -> applied, opened -> applied) per round, seconds."""
    kits = _kits(root / "plain", dim=dim, rounds=rounds, mode="secagg")
    ctx = mp.get_context("spawn")
    opened_q: mp.Queue = ctx.Queue()
    server = ctx.Process(target=_serve_plain, args=(str(kits.coordinator), dim, opened_q),
                         daemon=True)
    server.start()
    q: mp.Queue = ctx.Queue()
    clients = [ctx.Process(target=_plain_client, args=(str(kits.enterprises[e]), e, dim, rounds, train_s, q))
               for e in ENTERPRISES]
    for c in clients:
        c.start()
    results = [q.get(timeout=600) for _ in range(rounds * len(ENTERPRISES))]
    for c in clients:
        c.join(60)
    opened = dict(opened_q.get(timeout=60) for _ in range(rounds))
    server.terminate()
    server.join(10)
    per_round: dict[int, list[tuple[float, float]]] = {}
    for r, ready, done in results:
        per_round.setdefault(r, []).append((ready, done))
    return ([max(d for _, d in v) - max(s for s, _ in v) for _, v in sorted(per_round.items())],
            [max(d for _, d in v) - opened[r] for r, v in sorted(per_round.items())])


def _median(xs: list[float]) -> float:
    return statistics.median(xs[1:] or xs)  # round 1 carries the connection set-up


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dim", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--mode", default="secagg", choices=["secagg", "secagg+", "ckks"])
    ap.add_argument("--repeats", type=int, default=3,
                    help="plaintext/secure run pairs per training time (alternating)")
    ap.add_argument("--train-s", default="0,1",
                    help="comma-separated stand-in training seconds per round (one run each)")
    ap.add_argument("--keep", default="",
                    help="probe runs: keep every run's kits and JSON logs under this folder")
    ap.add_argument("--probes", type=int, default=0,
                    help="also run the secure rounds with this many norm probes and without, "
                         "both on the Z_2^64 ring, and print the probes' extra time (issue 17)")
    args = ap.parse_args()
    if args.probes:
        probe_overhead(args)
        return
    print(f"d = {args.dim}, 3 clients, {args.rounds} rounds per run, mode {args.mode}, "
          f"{args.repeats} alternating run pairs, load average {os.getloadavg()[0]:.2f}; "
          "medians of per-run medians, round 1 (connection set-up) left out")
    print("tail = last trained -> last applied; round = round opened -> last applied "
          "(training included)")
    print(f"{'train s':>7} | {'tail: plain s':>13} {'secure s':>9} {'ratio':>6} "
          f"{'+confirm s':>10} | {'round: plain s':>14} {'secure s':>9} {'ratio':>6}")
    tails = []
    for train_s in [float(x) for x in args.train_s.split(",")]:
        runs: dict[str, list[float]] = {k: [] for k in ("pt", "st", "sc", "pr", "sr")}
        for _ in range(args.repeats):  # alternate, so load changes hit both alike
            with tempfile.TemporaryDirectory() as tmp:
                root = Path(tmp)
                p_tail, p_round = plaintext_rounds(root, dim=args.dim, rounds=args.rounds,
                                                   train_s=train_s)
                s_tail, s_conf, s_round, _ = secure_rounds(root, dim=args.dim, rounds=args.rounds,
                                                           mode=args.mode, train_s=train_s)
            for key, xs in zip(("pt", "st", "sc", "pr", "sr"),
                               (p_tail, s_tail, s_conf, p_round, s_round), strict=True):
                runs[key].append(_median(xs))
        med = {k: statistics.median(v) for k, v in runs.items()}
        tails.append(med["st"])
        print(f"{train_s:>7.1f} | {med['pt']:>13.3f} {med['st']:>9.3f} "
              f"{med['st'] / med['pt']:>5.2f}x {med['sc']:>10.3f} | {med['pr']:>14.3f} "
              f"{med['sr']:>9.3f} {med['sr'] / med['pr']:>5.2f}x")
        pairs = zip(runs["st"], runs["pt"], runs["sr"], runs["pr"], strict=True)
        print("        per run (tail ratio, round ratio): "
              + ", ".join(f"({st / pt:.2f}, {sr / pr:.2f})" for st, pt, sr, pr in pairs)
              + f"; plaintext tail per run {[round(x, 3) for x in runs['pt']]}")
    print("target: secure <= 1.2x plaintext")
    print(f"Flower 1.42 (issue 8, this machine): {FLOWER_SECURE_S} s / {FLOWER_PLAIN_S} s = "
          f"{FLOWER_SECURE_S / FLOWER_PLAIN_S:.1f}x; secfed's slowest secure tail median is "
          f"{FLOWER_SECURE_S / max(tails):.0f}x faster than Flower's secure round")


def json_events(path: Path) -> list[dict]:
    """The JSON event lines of a ``--json`` log (other lines, e.g. library warnings, skipped)."""
    events = []
    for line in path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    return events


def stage_spans(path: Path) -> dict[str, list[float]]:
    """Per stage, the seconds from the previous stage's close (or the round's opening) to this
    stage's close, one value per round after round 1, from the coordinator's event log; the
    last span, ``confirm``, runs from the last stage's close (the sum sent) to ``round_done``
    (every survivor confirmed). A probed round's contribute stage closes as the confirmations
    (which carry the reports) arrive, so compare ``contribute + confirm`` with ``confirm``."""
    opened: dict[int, float] = {}
    closed: dict[int, list[tuple[float, str]]] = {}
    for e in json_events(path):
        if e.get("event") == "round_opened":
            opened[e["round"]] = e["at"]
        elif e.get("event") == "stage_closed":
            closed.setdefault(e["round"], []).append((e["at"], e["stage"]))
        elif e.get("event") == "round_done":
            closed.setdefault(e["round"], []).append((e["at"], "~confirm"))  # sorts last at ties
    spans: dict[str, list[float]] = {}
    for r, events in closed.items():
        if r == 1 or r not in opened:
            continue  # round 1 carries the connection set-up
        last = opened[r]
        for at, stage in sorted(events):
            spans.setdefault(stage.lstrip("~"), []).append(at - last)
            last = at
    return spans


def probe_overhead(args: argparse.Namespace) -> None:
    """Secure rounds with probes off and on (alternating, same ring): round and tail medians."""
    print(f"d = {args.dim}, 3 clients, {args.rounds} rounds per run, mode {args.mode}, ring 2^64, "
          f"{args.repeats} alternating run pairs, load average {os.getloadavg()[0]:.2f}")
    for train_s in [float(x) for x in args.train_s.split(",")]:
        runs: dict[str, list[float]] = {
            k: [] for k in ("off_tail", "on_tail", "off_round", "on_round", "off_period", "on_period")}
        spans: dict[str, dict[str, list[float]]] = {"off": {}, "on": {}}
        for rep in range(args.repeats):
            for k, tag in ((0, "off"), (args.probes, "on")):
                with tempfile.TemporaryDirectory() as tmp:
                    where = Path(args.keep) / f"train-{train_s:g}-run-{rep}" if args.keep else Path(tmp)
                    tail, _conf, rnd, period = secure_rounds(
                        where, dim=args.dim, rounds=args.rounds, mode=args.mode,
                        train_s=train_s, probes=k)
                    log = where / f"secure-probes-{k}" / "coordinator.jsonl"
                    for stage, xs in stage_spans(log).items():
                        spans[tag].setdefault(stage, []).extend(xs)
                runs[f"{tag}_tail"].append(_median(tail))
                runs[f"{tag}_round"].append(_median(rnd))
                runs[f"{tag}_period"].append(_median(period))
        med = {k: statistics.median(v) for k, v in runs.items()}
        print(f"train {train_s:.1f} s | tail: probes off {med['off_tail']:.3f} s, on "
              f"{med['on_tail']:.3f} s | round: off {med['off_round']:.3f} s, on "
              f"{med['on_round']:.3f} s, extra {100 * (med['on_round'] / med['off_round'] - 1):.0f} % | "
              f"period (opened -> next opened): off {med['off_period']:.3f} s, on "
              f"{med['on_period']:.3f} s, extra {100 * (med['on_period'] / med['off_period'] - 1):.0f} %")
        print("        per run pair (round extra %, period extra %): " + ", ".join(
            f"({100 * (b / a - 1):.0f}, {100 * (d / c - 1):.0f})" for a, b, c, d in zip(
                runs["off_round"], runs["on_round"], runs["off_period"], runs["on_period"],
                strict=True)))
        print("        coordinator stage spans, median s over rounds (previous close -> close), "
              "off / on: " + ", ".join(
                  f"{stage} {statistics.median(spans['off'][stage]) if stage in spans['off'] else 0:.3f}"
                  f"/{statistics.median(spans['on'][stage]):.3f}"
                  for stage in spans["on"]))
        after = {tag: sum(statistics.median(xs) for stage, xs in spans[tag].items()
                          if stage in AFTER_UPLOAD) for tag in ("off", "on")}
        extra = after["on"] - after["off"]
        print(f"        stages after the uploads ({', '.join(AFTER_UPLOAD)}; sums of medians): "
              f"off {after['off']:.3f} s, on {after['on']:.3f} s: extra {extra:.3f} s = "
              f"{100 * extra / med['off_round']:.0f} % of the round, "
              f"{100 * extra / med['off_period']:.0f} % of the period without probes")
    print("target (issue 17): extra time per round <= 10 % of a secure round at d = 1e6")


# the spans the probes add to or lengthen: all after every upload is in (less load noise than
# whole rounds, whose training and upload spans swing by more than the probes cost)
AFTER_UPLOAD = ("probe", "consistency", "unmask", "contribute", "confirm")


if __name__ == "__main__":
    main()
