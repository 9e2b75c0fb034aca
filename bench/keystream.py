"""Mask-generation throughput against the hardware limit and Flower's mask PRG.

    .venv/bin/python bench/keystream.py            # table
    .venv/bin/python bench/keystream.py --json     # machine-readable
    .venv/bin/python bench/keystream.py --quick    # fewer runs, smaller buffers (smoke test)

Rows: memory bandwidth (numpy copy, the ceiling for anything that writes a vector); the
single-core AES-256-CTR and ChaCha20 keystream written by pyca into a preallocated buffer; their
ratio; ``apply_masks`` on a 1e6-word vector with 10 masks on one and on two threads; Flower
1.42's SecAgg+ mask PRG (``pseudo_rand_gen``: a 32-bit-folded seed into ``np.random``) plus the
same additions, on the same job; fixed-point ``encode`` of 1e6 float32; CKKS encryption of 1e6
values. Every figure is the median of several warm runs. The load average is printed because
on a shared two-core machine a busy second core makes the two-thread figures meaningless.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from secfed.crypto import encoding, masking, prg

MIB = 1 << 20


def median_seconds(fn: Callable[[], object], runs: int) -> float:
    fn()  # warm: page faults, lazy imports, thread pool start
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def memory_bandwidth(nbytes: int, runs: int) -> float:
    src = np.ones(nbytes // 8, dtype=np.uint64)
    dst = np.empty_like(src)
    seconds = median_seconds(lambda: np.copyto(dst, src), runs)
    return nbytes / seconds / 1e9


def aes_keystream(nbytes: int, runs: int) -> float:
    out = np.empty(nbytes // 8, dtype=np.uint64)
    seed = secrets.token_bytes(32)
    seconds = median_seconds(lambda: prg.keystream_into(seed, out), runs)
    return nbytes / seconds / 1e9


def chacha_keystream(nbytes: int, runs: int) -> float:
    out = np.empty(nbytes // 8, dtype=np.uint64)
    seed = secrets.token_bytes(32)
    nonce = bytes(16)
    seconds = median_seconds(lambda: prg.chacha20_keystream_into(seed, nonce, out), runs)
    return nbytes / seconds / 1e9


def apply_masks_seconds(n: int, n_masks: int, workers: int, runs: int) -> tuple[float, float]:
    """Median wall seconds, and the median ratio of process CPU time to wall time: near 2.0
    means both threads really ran at once; near 1.0 (or below) means the second core was busy."""
    acc = np.zeros(n, dtype=np.uint64)
    masks = [(secrets.token_bytes(32), 1 if i % 2 else -1) for i in range(n_masks)]
    masking.apply_masks(acc, masks, workers=workers)
    walls, ratios = [], []
    for _ in range(runs):
        wall, cpu = time.perf_counter(), time.process_time()
        masking.apply_masks(acc, masks, workers=workers)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        walls.append(wall)
        ratios.append(cpu / wall)
    return statistics.median(walls), statistics.median(ratios)


def flower_mask_seconds(n: int, n_masks: int, runs: int) -> float | None:
    """Flower 1.42's SecAgg+ mask PRG on the same job (generate + add mod 2^32)."""
    try:
        from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
    except ImportError:
        return None
    acc = np.zeros(n, dtype=np.int64)
    seeds = [secrets.token_bytes(32) for _ in range(n_masks)]

    def job() -> None:
        for i, seed in enumerate(seeds):
            (mask,) = pseudo_rand_gen(seed, 1 << 32, [(n,)])
            if i % 2:
                np.add(acc, mask, out=acc)
            else:
                np.subtract(acc, mask, out=acc)
        np.remainder(acc, 1 << 32, out=acc)

    return median_seconds(job, runs)


def encode_seconds(n: int, runs: int) -> float:
    x = np.random.default_rng(0).uniform(-1, 1, n).astype(np.float32)
    return median_seconds(lambda: encoding.encode(x, n_participants=10), runs)


def ckks_figures(n: int, runs: int) -> dict[str, float]:
    from secfed.crypto import ckks

    ctx = ckks.new_context()
    x = np.random.default_rng(0).uniform(-1, 1, n)
    out: dict[str, float] = {}
    for workers in (1, 2):
        seconds = median_seconds(lambda w=workers: ckks.encrypt(ctx, x, workers=w), runs)
        out[f"encrypt_values_per_s_{workers}w"] = n / seconds
    cts = ckks.encrypt(ctx, x)
    out["bytes_per_value"] = sum(map(len, cts)) / n
    out["decrypt_values_per_s"] = n / median_seconds(lambda: ckks.decrypt(ctx, cts, n), runs)
    return out


def measure(*, quick: bool, with_ckks: bool) -> dict[str, Any]:
    runs = 3 if quick else 7
    buf = 8 * MIB if quick else 64 * MIB
    n, n_masks = 1_000_000, 10
    results: dict[str, Any] = {
        "cpus_available": len(os.sched_getaffinity(0)),
        "load_average_before": os.getloadavg()[0],
        "buffer_mib": buf // MIB,
        "runs": runs,
    }
    results["memcpy_gb_s"] = memory_bandwidth(buf, runs)
    results["aes256_ctr_gb_s"] = aes_keystream(buf, runs)
    results["chacha20_gb_s"] = chacha_keystream(buf, runs)
    results["aes_over_chacha"] = results["aes256_ctr_gb_s"] / results["chacha20_gb_s"]
    mask_bytes = n * 8 * n_masks
    for workers in (1, 2):
        seconds, cpu_per_wall = apply_masks_seconds(n, n_masks, workers, runs)
        results[f"apply_masks_ms_{workers}w"] = seconds * 1e3
        results[f"apply_masks_cpu_per_wall_{workers}w"] = cpu_per_wall
        results[f"apply_masks_gb_s_{workers}w"] = mask_bytes / seconds / 1e9
    results["apply_masks_speedup_2w"] = results["apply_masks_ms_1w"] / results["apply_masks_ms_2w"]
    flower = flower_mask_seconds(n, n_masks, runs)
    results["flower_masks_ms"] = None if flower is None else flower * 1e3
    results["encode_1e6_f32_ms"] = encode_seconds(n, runs) * 1e3
    if with_ckks:
        results["ckks"] = ckks_figures(n if not quick else 100_000, max(3, runs // 2))
    results["load_average_after"] = os.getloadavg()[0]
    return results


def print_table(r: dict[str, Any]) -> None:
    rows: list[tuple[str, str, str]] = [
        ("memory bandwidth (numpy copy)", f"{r['memcpy_gb_s']:.2f} GB/s", "hardware limit"),
        (
            "AES-256-CTR keystream, 1 core",
            f"{r['aes256_ctr_gb_s']:.2f} GB/s",
            f"{r['aes256_ctr_gb_s'] / r['memcpy_gb_s']:.2f} x memcpy",
        ),
        (
            "ChaCha20 keystream, 1 core",
            f"{r['chacha20_gb_s']:.2f} GB/s",
            f"AES/ChaCha = {r['aes_over_chacha']:.2f}",
        ),
        (
            "apply_masks 1e6 x 10, 1 thread",
            f"{r['apply_masks_ms_1w']:.1f} ms",
            f"{r['apply_masks_gb_s_1w']:.2f} GB/s of masks, "
            f"cpu/wall {r['apply_masks_cpu_per_wall_1w']:.2f}",
        ),
        (
            "apply_masks 1e6 x 10, 2 threads",
            f"{r['apply_masks_ms_2w']:.1f} ms",
            f"{r['apply_masks_gb_s_2w']:.2f} GB/s, speedup {r['apply_masks_speedup_2w']:.2f}, "
            f"cpu/wall {r['apply_masks_cpu_per_wall_2w']:.2f}",
        ),
    ]
    if r["flower_masks_ms"] is not None:
        rows.append(
            (
                "Flower 1.42 pseudo_rand_gen, same job",
                f"{r['flower_masks_ms']:.1f} ms",
                f"ours (2 thr) is {r['flower_masks_ms'] / r['apply_masks_ms_2w']:.1f}x faster",
            )
        )
    else:
        rows.append(("Flower 1.42 pseudo_rand_gen, same job", "n/a", "flwr not installed"))
    rows.append(("encode 1e6 float32 -> Z_2^64", f"{r['encode_1e6_f32_ms']:.2f} ms", ""))
    if "ckks" in r:
        c = r["ckks"]
        rows += [
            (
                "CKKS encrypt, 1 thread",
                f"{c['encrypt_values_per_s_1w'] / 1e6:.2f} M values/s",
                f"{c['bytes_per_value']:.1f} B/value ({c['bytes_per_value'] / 4:.1f}x fp32)",
            ),
            (
                "CKKS encrypt, 2 threads (GIL held)",
                f"{c['encrypt_values_per_s_2w'] / 1e6:.2f} M values/s",
                f"speedup {c['encrypt_values_per_s_2w'] / c['encrypt_values_per_s_1w']:.2f}",
            ),
            ("CKKS decrypt, 1 thread", f"{c['decrypt_values_per_s'] / 1e6:.2f} M values/s", ""),
        ]
    width = max(len(name) for name, _, _ in rows)
    print(
        f"secfed keystream bench: {r['cpus_available']} CPUs, load average "
        f"{r['load_average_before']:.2f} before / {r['load_average_after']:.2f} after, "
        f"{r['buffer_mib']} MiB buffers, median of {r['runs']} warm runs"
    )
    for name, value, note in rows:
        print(f"  {name:<{width}}  {value:>18}  {note}")
    if r["load_average_before"] > 0.5:
        print("  note: other processes were running; two-thread figures understate two free cores")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quick", action="store_true", help="fewer runs, 8 MiB buffers")
    parser.add_argument("--no-ckks", action="store_true", help="skip the CKKS rows")
    args = parser.parse_args(argv)
    results = measure(quick=args.quick, with_ckks=not args.no_ckks)
    if args.json:
        print(json.dumps(results, indent=2, sort_keys=True))
    else:
        print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
