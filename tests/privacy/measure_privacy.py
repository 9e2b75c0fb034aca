"""Measure privacy-part figures: PRV cost vs steps, ledger charge latency, verify time, noise hook.

Run: .venv/bin/python tests/privacy/measure_privacy.py   (not collected by pytest)
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

import secfed.privacy.accounting as accounting
from secfed.crypto.keys import IdentityKey
from secfed.privacy import DPSGDEvent, Ledger, compute_epsilon, verify_ledger
from secfed.privacy.distributed import DistributedDP
from secfed.protocol import RoundSpec


def timed(fn, *args, **kwargs) -> tuple[object, float]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def clear_caches() -> None:
    accounting._prv_epsilon.cache_clear()
    accounting._event_rdp_cached.cache_clear()


def main() -> None:
    for steps in (1000, 10_000, 100_000):
        kwargs = {"noise_multiplier": 1.0, "sample_rate": 0.01, "steps": steps, "delta": 1e-5}
        prv, seconds = timed(compute_epsilon, accountant="prv", **kwargs)
        rdp = compute_epsilon(accountant="rdp", **kwargs)
        print(f"PRV steps={steps}: eps={prv:.4f} (RDP {rdp:.4f}) in {seconds:.2f}s")

    path = Path(tempfile.mkdtemp()) / "ledger.sqlite"
    key = IdentityKey.generate()
    ledger = Ledger.open(path, enterprise_id="acme", identity=key, delta=1e-5, create=True)
    charges = [
        timed(ledger.charge, round_number=r, session_id=os.urandom(32),
              event=DPSGDEvent(1.0, 0.01, 50))[1]
        for r in range(30)
    ]
    ledger.close()
    print(f"charge (50 steps/round, 30 rounds): median {statistics.median(charges) * 1e3:.0f} ms, "
          f"max {max(charges) * 1e3:.0f} ms")
    clear_caches()
    _, seconds = timed(verify_ledger, path, public_key=key.public_bytes())
    print(f"verify 30 entries, PRV recomputed for each: {seconds:.2f}s")
    clear_caches()
    _, seconds = timed(verify_ledger, path, public_key=key.public_bytes(), recompute_prv=False)
    print(f"verify 30 entries, PRV for the newest only (--fast): {seconds:.2f}s")

    d = 1_000_000
    spec = RoundSpec.create(federation="f", round_number=1, mode="secagg",
                            participants=[f"p{i}" for i in range(10)], vector_length=d)
    hook = DistributedDP(clip_norm=1.0, noise_multiplier=1.0, min_participants=10)
    encoded = (np.random.default_rng(0).normal(size=d) * 1e-3 * 2**24).astype(np.int64).view(np.uint64)
    hook_times = [timed(hook, encoded.copy(), spec=spec, me="p0")[1] for _ in range(3)]
    print(f"distributed-DP hook, d=1e6: median {statistics.median(hook_times):.2f}s")


if __name__ == "__main__":
    main()
