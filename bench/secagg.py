"""Secure aggregation against Flower's SecAgg+, the keystream limit and per-tensor CKKS.

    .venv/bin/python bench/secagg.py            # table with ratios
    .venv/bin/python bench/secagg.py --json     # one JSON object
    .venv/bin/python bench/secagg.py --quick    # smaller sizes (smoke test; figures not comparable)

Measured in one run on the same input:
1. Masking, n=10, d=1e6, 3 participants dropping before upload (so their pairwise masks must be
   removed). Ours: the real state machines through ``secfed.protocol.simulate`` --
   ``participant_protect`` (encode + self mask + 9 pairwise masks, two threads) and
   ``coordinator_unmask`` (Shamir recovery, one ``apply_masks`` over every mask to remove,
   decoding). Flower 1.42: its own helpers called in the order its ``secaggplus_mod`` and
   ``secaggplus_workflow`` call them -- participant: ``parameters_multiply``, ``quantize``,
   ``factor_combine``, ``pseudo_rand_gen`` self mask + 9 pairwise masks (ECDH keys from its
   ``generate_shared_key``), ``parameters_mod``; coordinator: ``combine_shares`` of the 7
   survivors' seeds and the 3 dropouts' PEM keys, mask regeneration for each, ``parameters_mod``,
   ``factor_extract``, ``dequantize``. Flower's result is checked against the plaintext sum so
   the peer is known to have run correctly. Peer code is called, never copied.
2. Keystream limit: single-core AES-256-CTR and ChaCha20 into a preallocated buffer; our masking
   throughput as a fraction of it.
3. Bytes per parameter uploaded at Z_(2^64) and in the compact Z_(2^32) mode.
4. CKKS: ours (``secfed.crypto.ckks``: N=8192, [60,60], symmetric, tensors packed across 4096
   slots) against NVIDIA FLARE's HE filter way (context N=8192, [60,40,40], scale 2^40, public-key
   encryption, one ``ckks_vector`` per tensor), on a tiny-BERT LoRA list and a LLaMA-7B q/v LoRA
   r=8 list (32 layers x {q,v} x {A: 8x4096, B: 4096x8}).
5. Scale curve: SecAgg+ at d=1e5 for n = 10, 100, 1000 (5 % drop before upload), one round each,
   with the coordinator in its own process (framed bytes over a pipe, no pickle): its seconds
   inside ``receive``/``close_stage`` (all stages, and unmask alone) and its peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import sys
import time
from typing import Any

import numpy as np

from secfed.crypto import prg
from secfed.protocol import CoordinatorRound, ParticipantRound, RoundSpec, Stage, simulate

MIB = 1 << 20


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


def _updates(n: int, d: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)  # benchmark inputs only
    return [(rng.standard_normal(d) * 0.01).astype(np.float32) for _ in range(n)]


# -- 1. masking: ours vs Flower ------------------------------------------------------------------


def ours_masking(updates: list[np.ndarray], dropped: list[int], reps: int) -> dict[str, Any]:
    protect, unmask, errors, upload = [], [], [], []
    for _ in range(reps):
        res = simulate(updates, mode="secagg", dropouts={"upload": dropped})
        protect.append(res.timings["participant_protect"])
        unmask.append(res.timings["coordinator_unmask"])
        expected = np.sum([updates[i].astype(np.float64) for i in res.survivors], axis=0)
        errors.append(float(np.max(np.abs(res.aggregate - expected))))
        upload.append(res.bytes_per_participant["upload"])
    return {
        "participant_s": _median(protect),
        "coordinator_s": _median(unmask),
        "max_abs_error": max(errors),
        "upload_bytes": _median(upload),
    }


def flower_masking(updates: list[np.ndarray], dropped: list[int], reps: int) -> dict[str, Any] | None:
    try:
        from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
        from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
        from flwr.common.secure_aggregation.ndarrays_arithmetic import (
            factor_combine,
            factor_extract,
            get_parameters_shape,
            parameters_addition,
            parameters_mod,
            parameters_multiply,
            parameters_subtraction,
        )
        from flwr.common.secure_aggregation.quantization import dequantize, quantize
        from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
        from flwr.supercore.primitives.asymmetric import (
            bytes_to_private_key,
            bytes_to_public_key,
            generate_key_pairs,
            private_key_to_bytes,
            public_key_to_bytes,
        )
    except ImportError:
        return None
    n = len(updates)
    # Flower's SecAggPlusWorkflow defaults.
    clipping_range, target_range, mod_range = 8.0, 1 << 22, 1 << 32
    threshold = (2 * n) // 3 + 1
    nids = list(range(1, n + 1))
    keys = {nid: generate_key_pairs() for nid in nids}
    pk = {nid: public_key_to_bytes(keys[nid][1]) for nid in nids}
    sk = {nid: private_key_to_bytes(keys[nid][0]) for nid in nids}
    rd_seed = {nid: os.urandom(32) for nid in nids}
    # The shares each party would have sent (setup work, not timed).
    seed_shares = {nid: create_shares(rd_seed[nid], threshold, n) for nid in nids}
    sk_shares = {nid: create_shares(sk[nid], threshold, n) for nid in nids}

    def participant(nid: int, vec: np.ndarray) -> list[np.ndarray]:
        ratio = 1.0  # num_examples / max_weight with equal weights
        q_ratio = round(ratio * target_range)
        params = parameters_multiply([vec], q_ratio / target_range)
        quantized = factor_combine(q_ratio, quantize(params, clipping_range, target_range))
        dims = [a.shape for a in quantized]
        quantized = parameters_addition(quantized, pseudo_rand_gen(rd_seed[nid], mod_range, dims))
        for other in nids:
            if other == nid:
                continue
            shared = generate_shared_key(bytes_to_private_key(sk[nid]), bytes_to_public_key(pk[other]))
            mask = pseudo_rand_gen(shared, mod_range, dims)
            if nid > other:
                quantized = parameters_addition(quantized, mask)
            else:
                quantized = parameters_subtraction(quantized, mask)
        return parameters_mod(quantized, mod_range)

    active = [nid for i, nid in enumerate(nids) if i not in dropped]
    dead = [nid for i, nid in enumerate(nids) if i in dropped]
    p_times: list[float] = []
    masked: dict[int, list[np.ndarray]] = {}
    for rep in range(reps):
        for i, nid in enumerate(nids):
            if i in dropped:
                continue
            t0 = time.perf_counter()
            masked[nid] = participant(nid, updates[i])
            if rep == reps - 1 or i == 0:
                p_times.append(time.perf_counter() - t0)
    aggregate = masked[active[0]]
    for nid in active[1:]:
        aggregate = parameters_addition(aggregate, masked[nid])
    holders = active[:threshold]

    def coordinator() -> list[np.ndarray]:
        vec = [a.copy() for a in aggregate]
        for nid in nids:
            share_list = [(seed_shares if nid in active else sk_shares)[nid][h - 1] for h in holders]
            secret = combine_shares(share_list)
            if nid in active:
                vec = parameters_subtraction(vec, pseudo_rand_gen(secret, mod_range, get_parameters_shape(vec)))
            else:
                for other in nids:
                    if other == nid:
                        continue
                    shared = generate_shared_key(bytes_to_private_key(secret), bytes_to_public_key(pk[other]))
                    mask = pseudo_rand_gen(shared, mod_range, get_parameters_shape(vec))
                    vec = parameters_addition(vec, mask) if nid > other else parameters_subtraction(vec, mask)
        vec = parameters_mod(vec, mod_range)
        q_total, vec = factor_extract(vec)
        out = dequantize(vec, clipping_range, target_range)
        offset = -(len(active) - 1) * clipping_range
        for v in out:
            v += offset
            v *= target_range / q_total
        return out

    c_times = []
    result = None
    for _ in range(reps):
        t0 = time.perf_counter()
        result = coordinator()
        c_times.append(time.perf_counter() - t0)
    assert result is not None
    # Flower's workflow returns the weighted mean (equal weights here); compare it as a sum.
    expected = np.sum([updates[i].astype(np.float64) for i in range(n) if i not in dropped], axis=0)
    return {
        "participant_s": _median(p_times),
        "coordinator_s": _median(c_times),
        "max_abs_error": float(np.max(np.abs(result[0] * len(active) - expected))),
        "upload_bytes_per_param": float(masked[active[0]][1].dtype.itemsize),
        "dropped": [nids[i] for i in dropped],
        "dead": dead,
    }


# -- 2. keystream limit --------------------------------------------------------------------------


def keystream_gbps(nbytes: int, reps: int) -> dict[str, float]:
    out = np.empty(nbytes // 8, dtype=np.uint64)
    seed = secrets.token_bytes(32)
    nonce = secrets.token_bytes(16)
    aes, cha = [], []
    prg.keystream_into(seed, out)
    for _ in range(reps):
        t0 = time.perf_counter()
        prg.keystream_into(seed, out)
        aes.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        prg.chacha20_keystream_into(seed, nonce, out)
        cha.append(time.perf_counter() - t0)
    return {"aes_ctr_gbps": nbytes / min(aes) / 1e9, "chacha20_gbps": nbytes / min(cha) / 1e9}


# -- 3. bytes per parameter ----------------------------------------------------------------------


def bytes_per_param(d: int) -> dict[str, float]:
    ups = [u * 0.1 for u in _updates(3, d, seed=5)]
    r64 = simulate(ups, mode="secagg")
    r32 = simulate(ups, mode="secagg", ring_bits=32, scale_bits=16)
    return {
        "ring64": (r64.bytes_per_participant["upload"]) / d,
        "ring32": (r32.bytes_per_participant["upload"]) / d,
    }


# -- 4. CKKS: packed vs per-tensor ---------------------------------------------------------------


def tensor_lists(quick: bool) -> dict[str, list[tuple[int, int]]]:
    tiny_bert = [(8, 128), (128, 8)] * 2 * 2  # 2 layers x {query, value} x {A, B}, r=8, hidden 128
    layers = 4 if quick else 32
    llama = [(8, 4096), (4096, 8)] * 2 * layers  # {q, v} x {A, B} per layer, r=8, hidden 4096
    return {"tiny-bert-lora-r8": tiny_bert, f"llama-7b-qv-lora-r8{'-4layers' if quick else ''}": llama}


def ckks_compare(quick: bool) -> list[dict[str, Any]]:
    import tenseal as ts

    from secfed.crypto import ckks

    ours_ctx = ckks.new_context()
    flare_ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=8192, coeff_mod_bit_sizes=[60, 40, 40])
    flare_ctx.global_scale = 2**40
    rows: list[dict[str, Any]] = []
    rng = np.random.default_rng(1)
    for name, shapes in tensor_lists(quick).items():
        tensors = [rng.standard_normal(s).astype(np.float32) * 0.01 for s in shapes]
        values = sum(t.size for t in tensors)
        flat = np.concatenate([t.ravel() for t in tensors])
        t0 = time.perf_counter()
        cts = ckks.encrypt(ours_ctx, flat)
        ours_s = time.perf_counter() - t0
        ours_bytes = sum(map(len, cts))
        back = ckks.decrypt(ours_ctx, cts, values)
        assert np.max(np.abs(back - flat)) < 1e-5
        t0 = time.perf_counter()
        per_tensor = [ts.ckks_vector(flare_ctx, t.ravel().tolist()).serialize() for t in tensors]
        flare_s = time.perf_counter() - t0
        flare_bytes = sum(map(len, per_tensor))
        for method, seconds, nbytes in (
            ("secfed-packed-symmetric", ours_s, ours_bytes),
            ("flare-per-tensor-public-key", flare_s, flare_bytes),
        ):
            rows.append({
                "tensor_list": name, "method": method, "tensors": len(tensors), "values": values,
                "seconds": seconds, "bytes": nbytes, "values_per_s": values / seconds,
                "bytes_per_value": nbytes / values,
            })
        del cts, per_tensor
    return rows


# -- 5. scale curve ------------------------------------------------------------------------------


def _write_frame(stream: Any, data: bytes) -> None:
    stream.write(len(data).to_bytes(8, "big"))
    stream.write(data)
    stream.flush()


def _read_frame(stream: Any) -> bytes:
    head = stream.read(8)
    if len(head) != 8:
        raise EOFError("coordinator worker pipe closed")
    n = int.from_bytes(head, "big")
    data = stream.read(n)
    if len(data) != n:
        raise EOFError("coordinator worker pipe truncated")
    return bytes(data)


def _peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM): unlike ru_maxrss it starts afresh at exec, so
    it does not count the parent's pages the child held between fork and exec."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def coordinator_worker() -> int:
    """The coordinator in its own process: framed bytes on stdin/stdout, no pickle.

    Frame 1: spec bytes; frame 2: JSON roster (hex keys). Then commands: ``R`` + u8 id length +
    id + payload (receive), ``C`` (close stage; answers the per-recipient payloads framed with
    ``secfed.protocol.wire``), ``S`` (answers JSON stats and exits).
    """
    from secfed.protocol.wire import Reader, Writer

    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    spec = RoundSpec.from_bytes(_read_frame(stdin))
    roster = {p: bytes.fromhex(k) for p, k in json.loads(_read_frame(stdin)).items()}
    coord = CoordinatorRound(spec, roster=roster, clock=time.perf_counter, keep_records=False)
    spent = 0.0
    while True:
        frame = _read_frame(stdin)
        op = frame[:1]
        if op == b"R":
            r = Reader(frame[1:], "worker")
            sender = r.text()
            payload = frame[2 + len(sender.encode()):]
            t0 = time.perf_counter()
            coord.receive(sender, payload)
            spent += time.perf_counter() - t0
        elif op == b"C":
            t0 = time.perf_counter()
            out = coord.close_stage()
            spent += time.perf_counter() - t0
            # A payload shared by many recipients (key roster, aggregate) is one object in the
            # coordinator; frame it once so the pipe does not multiply it.
            unique: dict[int, int] = {}
            blobs: list[bytes] = []
            for payload in out.values():
                if id(payload) not in unique:
                    unique[id(payload)] = len(blobs)
                    blobs.append(payload)
            w = Writer().u8(1 if coord.stage is Stage.DONE else 0).u32(len(blobs))
            for blob in blobs:
                w.blob(blob)
            w.u32(len(out))
            for p, payload in out.items():
                w.text(p).u32(unique[id(payload)])
            _write_frame(stdout, w.getvalue())
        elif op == b"S":
            res = coord.result()
            assert res.aggregate is not None
            stats = {
                "coordinator_s": spent,
                "coordinator_unmask_s": coord.timings.get("unmask"),
                "peak_rss_mib": _peak_rss_mib(),
                "survivors": len(res.survivors),
                "aggregate_head": [float(x) for x in res.aggregate[:8]],
            }
            _write_frame(stdout, json.dumps(stats).encode())
            return 0


def _idle_worker_rss() -> float:
    """Peak RSS of a worker process that imported everything but ran no round (its baseline)."""
    import subprocess

    code = (
        "import numpy, secfed.protocol, secfed.crypto.masking;"
        "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')][0])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip()) / 1024


def scale_point(n: int, d: int, drop_fraction: float = 0.05) -> dict[str, Any]:
    """One SecAgg+ round with the coordinator in a separate process (its time and peak RSS)."""
    import subprocess

    from secfed.crypto.keys import IdentityKey
    from secfed.protocol.wire import Reader, Writer

    ids = [f"e{i:05d}" for i in range(n)]
    identities = [IdentityKey.generate() for _ in ids]
    roster = {p: k.public_bytes() for p, k in zip(ids, identities)}
    spec = RoundSpec.create(federation="bench", round_number=1, mode="secagg+", participants=ids, vector_length=d)
    update = _updates(1, d, seed=n)[0]
    parties = {p: ParticipantRound(spec, me=p, identity=k, roster=roster) for p, k in zip(ids, identities)}
    n_drop = int(n * drop_fraction)
    dropped = set(ids[1 : 1 + 20 * n_drop : 20]) if n_drop else set()
    worker = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--coordinator-worker"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )
    assert worker.stdin is not None and worker.stdout is not None
    _write_frame(worker.stdin, spec.to_bytes())
    _write_frame(worker.stdin, json.dumps({p: k.hex() for p, k in roster.items()}).encode())

    def send(p: str, payload: bytes) -> None:
        _write_frame(worker.stdin, b"R" + Writer().text(p).getvalue() + payload)

    participant_s = 0.0
    for p in ids:
        parties[p].set_update(update)
        t0 = time.perf_counter()
        advert = parties[p].start()
        participant_s += time.perf_counter() - t0
        send(p, advert)
    done = False
    while not done:
        _write_frame(worker.stdin, b"C")
        r = Reader(_read_frame(worker.stdout), "worker reply")
        done = r.u8() == 1
        blobs = [r.blob() for _ in range(r.count())]
        out = {}
        for _ in range(r.count()):
            p = r.text()
            out[p] = blobs[r.u32()]
        stage = Stage.DONE if done else None
        for p, payload in out.items():
            party = parties[p]
            st = stage or party.stage
            assert st is not None
            if st is Stage.UPLOAD and p in dropped:
                continue
            t0 = time.perf_counter()
            reply = party.handle(st, payload)
            participant_s += time.perf_counter() - t0
            if reply is not None:
                send(p, reply)
    _write_frame(worker.stdin, b"S")
    stats = json.loads(_read_frame(worker.stdout))
    worker.wait(timeout=60)
    expected = float(update[0]) * stats["survivors"]
    assert abs(stats["aggregate_head"][0] - expected) < 1e-4, (stats["aggregate_head"][0], expected)
    return {
        "n": n, "d": d, "neighbours": spec.neighbours, "threshold": spec.threshold,
        "dropped": len(dropped), "coordinator_s": stats["coordinator_s"],
        "coordinator_unmask_s": stats["coordinator_unmask_s"],
        "coordinator_peak_rss_mib": stats["peak_rss_mib"],
        "participant_mean_s": participant_s / n,
    }


# -- driver --------------------------------------------------------------------------------------


def measure(quick: bool) -> dict[str, Any]:
    n, d, dropped = 10, (100_000 if quick else 1_000_000), [7, 8, 9]
    reps = 2 if quick else 3
    updates = _updates(n, d)
    ours = ours_masking(updates, dropped, reps)
    flower = flower_masking(updates, dropped, reps)
    ks = keystream_gbps((16 if quick else 64) * MIB, 3 if quick else 5)
    # participant: self mask + 9 pairwise masks of d words each
    masks_bytes = 10 * d * 8
    ours_gbps = masks_bytes / ours["participant_s"] / 1e9
    report: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "loadavg_1m": os.getloadavg()[0]},
        "n": n, "d": d, "dropped_before_upload": len(dropped),
        "ours_participant_s": ours["participant_s"],
        "ours_coordinator_s": ours["coordinator_s"],
        "ours_max_abs_error": ours["max_abs_error"],
        "flower_participant_s": flower["participant_s"] if flower else None,
        "flower_coordinator_s": flower["coordinator_s"] if flower else None,
        "flower_max_abs_error": flower["max_abs_error"] if flower else None,
        "keystream_gbps": ks["aes_ctr_gbps"],
        "chacha20_gbps": ks["chacha20_gbps"],
        "ours_masking_gbps": ours_gbps,
        "ours_fraction_of_keystream_limit": ours_gbps / ks["aes_ctr_gbps"],
        "bytes_per_param": bytes_per_param(10_000 if quick else 100_000),
        "flower_bytes_per_param": flower["upload_bytes_per_param"] if flower else None,
    }
    if flower:
        report["participant_speedup_vs_flower"] = flower["participant_s"] / ours["participant_s"]
        report["coordinator_speedup_vs_flower"] = flower["coordinator_s"] / ours["coordinator_s"]
    report["ckks"] = ckks_compare(quick)
    report["scale_curve"] = [scale_point(m, 10_000 if quick else 100_000) for m in ((10, 30) if quick else (10, 100, 1000))]
    report["coordinator_idle_rss_mib"] = _idle_worker_rss()
    return report


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:6.2f}x" if a and b else "   n/a"


def print_table(r: dict[str, Any]) -> None:
    print(f"secure aggregation, n={r['n']} d={r['d']:.0e}, {r['dropped_before_upload']} dropped before upload"
          f"  (cpus {r['machine']['cpus']}, load {r['machine']['loadavg_1m']:.2f})")
    print(f"{'':32}{'ours':>12}{'flower 1.42':>14}{'speedup':>10}")
    for label, ours, peer in (
        ("participant protect (s)", r["ours_participant_s"], r["flower_participant_s"]),
        ("coordinator unmask (s)", r["ours_coordinator_s"], r["flower_coordinator_s"]),
    ):
        print(f"{label:32}{ours:12.4f}{(peer or float('nan')):14.4f}{_ratio(peer, ours):>10}")
    print(f"{'max |error| vs plaintext sum':32}{r['ours_max_abs_error']:12.2e}{(r['flower_max_abs_error'] or float('nan')):14.2e}")
    print(f"keystream limit, one core: AES-256-CTR {r['keystream_gbps']:.2f} GB/s, ChaCha20 {r['chacha20_gbps']:.2f} GB/s")
    print(f"our participant masking: {r['ours_masking_gbps']:.2f} GB/s of masks = "
          f"{100 * r['ours_fraction_of_keystream_limit']:.0f} % of the single-core AES limit")
    bpp = r["bytes_per_param"]
    print(f"upload bytes/parameter: Z_2^64 {bpp['ring64']:.3f}, Z_2^32 {bpp['ring32']:.3f}, flower {r['flower_bytes_per_param']}")
    print("\nCKKS encryption: packed symmetric (ours) vs per-tensor public-key (NVIDIA FLARE HE filter)")
    print(f"{'tensor list':28}{'method':30}{'seconds':>9}{'values/s':>12}{'MB':>9}{'B/value':>9}")
    for row in r["ckks"]:
        print(f"{row['tensor_list']:28}{row['method']:30}{row['seconds']:9.3f}{row['values_per_s']:12.3g}"
              f"{row['bytes'] / 1e6:9.2f}{row['bytes_per_value']:9.1f}")
    by_list: dict[str, dict[str, Any]] = {}
    for row in r["ckks"]:
        by_list.setdefault(row["tensor_list"], {})[row["method"]] = row
    for name, rows in by_list.items():
        ours, flare = rows["secfed-packed-symmetric"], rows["flare-per-tensor-public-key"]
        print(f"  {name}: {ours['values_per_s'] / flare['values_per_s']:.2f}x values/s, "
              f"{ours['bytes'] / flare['bytes']:.2f}x bytes")
    print("\nSecAgg+ scale curve")
    print(f"(coordinator in its own process; idle worker RSS {r['coordinator_idle_rss_mib']:.0f} MiB)")
    print(f"{'n':>6}{'k':>5}{'t':>5}{'dropped':>9}{'coord s':>10}{'unmask s':>10}{'peak RSS MiB':>14}{'part. s':>9}")
    for p in r["scale_curve"]:
        print(f"{p['n']:6d}{p['neighbours']:5d}{p['threshold']:5d}{p['dropped']:9d}{p['coordinator_s']:10.3f}"
              f"{p['coordinator_unmask_s']:10.3f}{p['coordinator_peak_rss_mib']:14.1f}{p['participant_mean_s']:9.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    parser.add_argument("--coordinator-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.coordinator_worker:
        return coordinator_worker()
    # TenSEAL prints size warnings on stdout from C++; keep stdout for the report alone.
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        report = measure(args.quick)
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
