"""What a ``/metrics`` scrape and a status-page load cost the coordinator (issue J target:
a scrape <= 5 ms at 100 enterprises).

A :class:`secfed.coordinator.status.StatusBoard` is fed the events of ``--rounds`` finished
rounds of ``--enterprises`` sites (every message, stage close, ledger head and confirmation a
secagg round produces), then timed:

* **metrics render**: ``Metrics.render()`` -- the work a scrape puts on the coordinator's event
  loop (the Prometheus text of every series);
* **page render**: ``render_page`` -- the HTML of the status page (50 rounds of history shown);
* **status.json**: the snapshot serialised;
* **HTTP scrape**: a GET of ``/metrics`` from the real status listener (uvicorn, plain HTTP on
  loopback) as a Prometheus server would do it: render + HTTP parsing + the loopback round trip
  (client time included, so an upper bound of the coordinator's share);
* **event update**: one ``observe`` of a message event (what every accepted message adds).

Wall-clock medians, and for the metrics render also its CPU time (``time.thread_time``): on a
loaded machine the wall figure includes time the thread waited for a core.

Prints medians over ``--repeats`` runs and the ratios to the metrics render.

    .venv/bin/python bench/status_scrape.py [--enterprises 100] [--rounds 200] [--repeats 300]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import threading
import time

import httpx

from secfed.coordinator.metrics import CONTENT_TYPE, Metrics
from secfed.coordinator.status import StatusBoard
from secfed.coordinator.status_page import PAGE_CSP, render_page
from secfed.transport.status_http import StatusViews, bind, create_status_app, serve_status

STAGES = ("advertise", "share", "upload", "consistency", "unmask")


def feed(board: StatusBoard, ids: list[str], rounds: int) -> None:
    t = 1000.0
    for r in range(1, rounds + 1):
        board.observe({"event": "round_opened", "round": r, "mode": "secagg", "at": t,
                       "participants": ids, "deadline": t + 600})
        for i, stage in enumerate(STAGES):
            for e in ids:
                board.observe({"event": "message", "round": r, "stage": stage, "sender": e,
                               "bytes": 400_000 if stage == "upload" else 2_000, "at": t})
                if stage == "upload":
                    board.observe({"event": "ledger_head", "round": r, "enterprise": e,
                                   "stage": "upload", "index": r})
                board.count_sent(r, stage, 2_000)
            nxt = STAGES[i + 1] if i + 1 < len(STAGES) else "done"
            t += 1.5
            board.observe({"event": "stage_closed", "round": r, "stage": stage, "at": t,
                           "received": len(ids), "missing": [], "next": nxt, "deadline": t + 60})
        board.observe({"event": "aggregated", "round": r, "mode": "secagg", "survivors": ids})
        for e in ids:
            board.observe({"event": "confirmed", "round": r, "sender": e})
        t += 1.0
        board.observe({"event": "round_done", "round": r, "at": t, "global_hash": "0" * 64,
                       "confirmed": ids})


def median_ms(fn, repeats: int, clock=time.perf_counter) -> float:
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        times.append((clock() - start) * 1e3)
    return statistics.median(times)


def http_scrape_ms(board: StatusBoard, repeats: int) -> float:
    views = StatusViews(page=lambda: render_page(board), csp=PAGE_CSP, snapshot=board.snapshot,
                        metrics=Metrics(board).render, metrics_type=CONTENT_TYPE)
    sock = bind("127.0.0.1", 0, what="bench")
    port = sock.getsockname()[1]
    stop = asyncio.Event()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, daemon=True,
                              args=(serve_status(create_status_app(views), sock=sock, stop=stop),))
    thread.start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", trust_env=False) as client:
            for _ in range(50):
                try:
                    client.get("/metrics").raise_for_status()
                    break
                except httpx.TransportError:
                    time.sleep(0.1)
            return median_ms(lambda: client.get("/metrics").raise_for_status(), repeats)
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--enterprises", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=300)
    args = ap.parse_args()
    ids = [f"site-{i:03d}" for i in range(args.enterprises)]
    board = StatusBoard(federation="bench", rounds_planned=args.rounds + 1, roster=ids,
                        target_epsilon=8.0, terms_for=lambda _r: (1.0, 0.01, 20, 1e-5))
    start = time.perf_counter()
    feed(board, ids, args.rounds)
    fed_s = time.perf_counter() - start
    n_events = board.events_seen
    metrics = Metrics(board)
    size = len(metrics.render())
    m_ms = median_ms(metrics.render, args.repeats)
    m_cpu = median_ms(metrics.render, args.repeats, clock=time.thread_time)
    p_ms = median_ms(lambda: render_page(board), args.repeats)
    j_ms = median_ms(lambda: json.dumps(board.snapshot()), args.repeats)
    h_ms = http_scrape_ms(board, args.repeats)
    event = {"event": "message", "round": args.rounds, "stage": "unmask", "sender": ids[0],
             "bytes": 10, "at": 0.0}
    e_us = median_ms(lambda: board.observe(event), args.repeats * 10) * 1e3
    print(f"status board: {args.enterprises} enterprises, {args.rounds} rounds "
          f"({n_events} events fed in {fed_s:.2f} s); /metrics body {size} B")
    print(f"  metrics render   {m_ms:8.3f} ms  (1.00x)   target <= 5 ms "
          f"(CPU time of the rendering thread: {m_cpu:.3f} ms; wall grows with machine load)")
    print(f"  HTTP scrape      {h_ms:8.3f} ms  ({h_ms / m_ms:.2f}x)")
    print(f"  page render      {p_ms:8.3f} ms  ({p_ms / m_ms:.2f}x)")
    print(f"  status.json      {j_ms:8.3f} ms  ({j_ms / m_ms:.2f}x)")
    print(f"  event update     {e_us:8.3f} us  ({e_us / 1e3 / m_ms:.4f}x)")


if __name__ == "__main__":
    main()
