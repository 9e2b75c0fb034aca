"""What a participant pays to verify a CKKS sum against the members' signed uploads.

    .venv/bin/python bench/ckks_aggregate.py            # n = 3, 10; d = 39,943 (demo) and 1e5
    .venv/bin/python bench/ckks_aggregate.py --repeats 1

Since the CKKS aggregate carries every member's signed upload (issue 20, item 3), a participant
checks n signatures over n ciphertext digests, parses n x ceil(d/4096) ciphertexts, adds them and
decrypts one sum. The old aggregate carried the coordinator's sum: one parse and one decryption
per ciphertext. The table gives, per (n, d), the aggregate's size on the wire and the median
participant time of both (``open_ckks_aggregate`` against ``ckks.decrypt`` of one sum), and the
largest CKKS decryption error of the sum before rounding (against half a grid step, 2^-25 at
scale_bits 24: below it, rounding returns exactly the sum of the quantised uploads). The
demo's d is the ``head`` trainable set of the ``demo`` model size (text_proj 384x64 + image_proj
96x64 + two 64-d missing-modality embeddings + LayerNorm(128) + 128x64 + 64x7, with biases).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

from secfed.crypto import ckks
from secfed.crypto.keys import IdentityKey
from secfed.protocol.messages import CkksAggregate, ciphertext_digest, ckks_upload_signed_bytes
from secfed.protocol.participant import open_ckks_aggregate

DEMO_D = 384 * 64 + 64 + 96 * 64 + 64 + 64 + 64 + 2 * 128 + 128 * 64 + 64 + 64 * 7 + 7


def measure(n: int, d: int, repeats: int, ctx: ckks.CkksContext) -> dict[str, float]:
    sid = os.urandom(32)
    ids = [f"org-{i}" for i in range(n)]
    keys = [IdentityKey.generate() for _ in ids]
    roster = {p: k.public_bytes() for p, k in zip(ids, keys)}
    rng = np.random.default_rng(0)  # benchmark inputs, not secrets
    members = []
    exact = np.zeros(d)
    for p, k in zip(ids, keys):
        x = np.rint(rng.standard_normal(d) * 0.01 * 2.0**24) * 2.0**-24  # on the grid, as uploaded
        exact += x
        cts = tuple(ckks.encrypt(ctx, x))
        sig = k.sign(ckks_upload_signed_bytes(session_id=sid, round_number=1, sender=p,
                                              ledger_head=b"", ct_digest=ciphertext_digest(cts)))
        members.append((p, b"", cts, sig))
    agg = CkksAggregate(1, sid, tuple(members))
    payload = agg.to_bytes()
    public = ctx.public()
    old_sum = ckks.add_encrypted(public, [list(m[2]) for m in members], length=d)
    new_t, old_t = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        open_ckks_aggregate(agg, ckks_context=ctx, roster=roster, vector_length=d, scale_bits=24)
        new_t.append(time.perf_counter() - t)
        t = time.perf_counter()
        ckks.decrypt(ctx, old_sum, d)
        old_t.append(time.perf_counter() - t)
    old_bytes = sum(len(c) for c in old_sum) + n * (32 + 64 + 16)
    error = float(np.max(np.abs(ckks.decrypt_sum(ctx, [list(m[2]) for m in members], d) - exact)))
    return {"n": n, "d": d, "new_mb": len(payload) / 1e6, "old_mb": old_bytes / 1e6,
            "new_s": statistics.median(new_t), "old_s": statistics.median(old_t), "error": error}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    ctx = ckks.new_context()
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    print("   n        d  aggregate MB (old)  participant s (old)  max CKKS error / half step")
    for d in (DEMO_D, 100_000):
        for n in (3, 10):
            r = measure(n, d, args.repeats, ctx)
            print(f"{r['n']:>4} {r['d']:>8}  {r['new_mb']:>8.1f} ({r['old_mb']:>5.1f})"
                  f"  {r['new_s']:>9.2f} ({r['old_s']:.2f})  {r['error']:.2e} / {2.0**-25:.2e}")


if __name__ == "__main__":
    main()
