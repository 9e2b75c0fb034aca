"""Verified norm probes and contribution shares (issue 17): the maths, the stages, each check."""

from __future__ import annotations

import secrets

import numpy as np
import pytest

from secfed.crypto.encoding import encode
from secfed.crypto.prg import keystream
from secfed.errors import ConfigError, ProtocolAbort, ProtocolError
from secfed.protocol import CoordinatorRound, RoundSpec, Stage
from secfed.protocol.messages import (
    SHARE_KIND_MASK_KEY,
    SHARE_KIND_SELF_MASK,
    ContributionReport,
    ProbeReport,
    ProbeRequest,
    UnmaskRequest,
    decode_message,
)
from secfed.protocol.probes import (
    PIECE_WORDS,
    SKETCH,
    centered,
    contribution_vector,
    fold_sources,
    folded_products,
    mask_products,
    norm_estimate,
    probe_basis,
    probe_products,
    probe_seed,
    sum_of_squares,
)
from secfed.protocol.simulate import simulate

from .harness import make_harness

CLIP = 1.0


def role_updates(n: int, d: int, *, attackers=(), free_riders=(), scale=10.0, seed=0):
    """Honest: norm 0.999 x clip, 0.8 x a shared direction + 0.6 x private noise; free rider:
    the noise part only (no signal); attacker: ``scale`` x clip against the shared direction.
    A free rider's share is about ||noise||^2 / ||U||^2 (its noise is in U too)."""
    rng = np.random.default_rng(seed)
    g = rng.standard_normal(d)
    g /= np.linalg.norm(g)
    out = []
    for i in range(n):
        w = rng.standard_normal(d)
        w -= (w @ g) * g
        w /= np.linalg.norm(w)
        if i in attackers:
            u = -scale * CLIP * g
        elif i in free_riders:
            u = 0.999 * CLIP * 0.6 * w
        else:
            u = 0.999 * CLIP * (0.8 * g + 0.6 * w)
        out.append(u.astype(np.float32))
    return out


def plaintext_shares(updates, survivors):
    total = np.sum([updates[i].astype(np.float64) for i in survivors], axis=0)
    return {i: float(updates[i].astype(np.float64) @ total / (total @ total)) for i in survivors}


# -- maths ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("ring_bits", [64, 32])
def test_probe_products_are_exact_ring_inner_products(ring_bits: int) -> None:
    dtype = np.uint64 if ring_bits == 64 else np.uint32
    d, k = PIECE_WORDS + 1000, 5  # three sketch blocks (the last partial), two keystream pieces
    assert PIECE_WORDS >= 2 * SKETCH
    x = keystream(secrets.token_bytes(32), d, dtype)
    mask_seed = secrets.token_bytes(32)
    seed = probe_seed(b"s" * 32, [("a", bytes(32)), ("b", bytes(range(32)))])
    got = probe_products([x, mask_seed], seed=seed, k=k, ring_bits=ring_bits, length=d)
    signs = probe_basis(seed, k, length=d, ring_bits=ring_bits).vectors().astype(int)
    assert signs.shape == (k, d) and set(np.unique(signs)) == {-1, 1}
    # probes differ from each other and are balanced (the folding keeps entries +-1 and random)
    assert all(abs(int(row.sum())) < 4 * d**0.5 for row in signs)
    assert len({row.tobytes() for row in signs}) == k
    mask = keystream(mask_seed, d, dtype)
    for source, products in ((x, got[0]), (mask, got[1])):
        values = [int(v) for v in source.tolist()]
        want = tuple(
            sum(v * s for v, s in zip(values, signs[j].tolist())) % (1 << ring_bits) for j in range(k)
        )
        assert products == want
    # <PRG(seed), x> for a general ring vector (the contribution stage)
    want_dot = sum(int(a) * int(b) for a, b in zip(mask.tolist(), x.tolist())) % (1 << ring_bits)
    assert mask_products([mask_seed], x, ring_bits=ring_bits) == [want_dot]


@pytest.mark.parametrize("ring_bits", [64, 32])
def test_probe_products_exact_at_the_largest_folded_words(ring_bits: int) -> None:
    """The folded words at 2^r - 1 in an odd number m (about width/2) of the buckets where
    probe 0 is +1, and 0 elsewhere: probe 0's low-limb sum is m x the largest limb, an odd
    integer, and the float products must still be exact (with a limb too wide for
    width x limb < 2^53 that sum is an odd integer above 2^53, which float64 cannot hold)."""
    dtype = np.uint64 if ring_bits == 64 else np.uint32
    d, k = SKETCH, 4
    seed = secrets.token_bytes(32)
    basis = probe_basis(seed, k, length=d, ring_bits=ring_bits)
    probes = basis.vectors().astype(np.int64)
    sign = np.where(basis.signs == 1, 1, -1)
    top = dtype(np.iinfo(dtype).max)
    # one block: coordinate i lands alone in its bucket, with sign s_i, so S x = s_i x_i there
    plus = np.flatnonzero(probes[0] * sign > 0)
    m = len(plus) - 1 + len(plus) % 2  # odd
    x = np.zeros(d, dtype=dtype)
    x[plus[:m]] = np.multiply(basis.signs[plus[:m]], top)
    got = probe_products([x], seed=seed, k=k, ring_bits=ring_bits, length=d)[0]
    want = tuple(int(np.dot(x, probes[j].astype(dtype))) % (1 << ring_bits) for j in range(k))
    assert got == want
    assert got[0] == -m % (1 << ring_bits)  # m buckets holding -1 in the ring, met by +1


def test_fold_sources_on_threads_equals_one_thread_and_hands_over_every_piece() -> None:
    d = 3 * PIECE_WORDS + 777  # four ranges on four workers, the last one short
    seeds = [secrets.token_bytes(32) for _ in range(2)]
    x = keystream(secrets.token_bytes(32), d)
    probe = secrets.token_bytes(32)
    basis = probe_basis(probe, 8, length=d, ring_bits=64)
    rebuilt = [np.zeros(d, np.uint64) for _ in seeds]
    seen = [np.zeros(d, bool) for _ in seeds]

    def hook(i: int, at: int, piece: np.ndarray) -> None:
        assert not seen[i][at:at + piece.shape[0]].any()  # each word handed over once
        rebuilt[i][at:at + piece.shape[0]] = piece
        seen[i][at:at + piece.shape[0]] = True

    one = fold_sources(basis, [seeds[0], x, seeds[1]], workers=1)
    many = fold_sources(basis, [seeds[0], x, seeds[1]], workers=4, each=lambda i, at, p: hook(i // 2, at, p))
    assert all(np.array_equal(a, b) for a, b in zip(one, many))
    for seed, words, covered in zip(seeds, rebuilt, seen):
        assert covered.all() and np.array_equal(words, keystream(seed, d))
    # the products of the threaded folds are the exact ring inner products with the probes
    signs = basis.vectors().astype(np.int64).view(np.uint64)
    want = [tuple(int(np.dot(v, signs[j])) for j in range(8)) for v in (keystream(seeds[0], d), x)]
    assert folded_products(basis, many)[:2] == want


def _shaped(shape: str, d: int) -> np.ndarray:
    rng = np.random.default_rng(3)
    x = np.zeros(d, dtype=np.int64)
    if shape in ("dense", "one-block"):
        x[:] = rng.integers(-1000, 1001, d)
    elif shape == "spike":
        x[d // 2] = 10**6
    else:  # comb: one coordinate at the same offset of every block, which a fixed fold would add up
        x[7::SKETCH] = 1000
    return x


@pytest.mark.parametrize("shape", ["dense", "spike", "comb", "one-block"])
def test_norm_estimate_is_unbiased_with_the_jl_spread_for_every_shape(shape: str) -> None:
    """The squared estimate's mean is ||x||^2 and its relative s.d. at most sqrt(2/k + 2/SKETCH)
    (with sampling slack), whatever the update's shape: the random block shifts keep coordinates
    an attacker lines up across blocks from adding up."""
    d = 5000 if shape == "one-block" else 3 * SKETCH + 123
    x = _shaped(shape, d)
    words = x.astype(np.uint64)  # two's complement: the ring encoding at scale 0
    norm2 = float(np.dot(x.astype(np.float64), x.astype(np.float64)))
    k, trials = 32, 200
    ratios = []
    for t in range(trials):
        seed = probe_seed(b"s" * 32, [("a", t.to_bytes(32, "big"))])
        products = probe_products([words], seed=seed, k=k, ring_bits=64, length=d)[0]
        ratios.append(norm_estimate(products, ring_bits=64, scale_bits=0) ** 2 / norm2)
    bound = (2 / k + 2 / SKETCH) ** 0.5
    assert abs(float(np.mean(ratios)) - 1.0) < 4 * bound / trials**0.5
    assert float(np.std(ratios, ddof=1)) < 1.3 * bound


def test_probe_seed_depends_on_every_upload_and_the_session() -> None:
    uploads = [("a", bytes(32)), ("b", b"\x01" * 32), ("c", b"\x02" * 32)]
    base = probe_seed(b"s" * 32, uploads)
    for i in range(3):
        changed = list(uploads)
        changed[i] = (uploads[i][0], secrets.token_bytes(32))
        assert probe_seed(b"s" * 32, changed) != base
    assert probe_seed(b"t" * 32, uploads) != base
    assert probe_seed(b"s" * 32, uploads[:2]) != base


def test_contribution_vector_cannot_wrap_for_bounded_updates() -> None:
    rng = np.random.default_rng(1)
    d, s = 5000, 24
    ups = [rng.standard_normal(d) for _ in range(6)]
    ups = [u / np.linalg.norm(u) for u in ups]
    enc = [encode(u.astype(np.float32), scale_bits=s, ring_bits=64, n_participants=6) for u in ups]
    total = np.sum(enc, axis=0, dtype=np.uint64)
    coarse, scale = contribution_vector(total, ring_bits=64, scale_bits=s, update_bound=2.0)
    terms = [centered(int(np.multiply(e, coarse).sum(dtype=np.uint64)), 64) for e in enc]
    exact = np.sum([u.astype(np.float32).astype(np.float64) for u in ups], axis=0)
    for u, t in zip(ups, terms):
        assert abs(t) < 2**62
        assert t / 2.0 ** (s + scale) == pytest.approx(float(u.astype(np.float32) @ exact), rel=1e-6)


def _reference_grid(words: list[int], *, ring_bits: int, scale_bits: int,
                    bound: float) -> tuple[list[int], int]:
    """contribution_vector in pure Python integers and fractions (the definition, slowly)."""
    from fractions import Fraction

    square = sum(x * x for x in words)
    b = max(Fraction(bound), Fraction(1, 2**scale_bits))
    e = -300
    while True:  # least e with b (sqrt(square) / 2^s + 1) <= 2^e, i.e. sqrt(square) <= t
        t = 2**scale_bits * (Fraction(2) ** e / b - 1)
        if t >= 0 and square <= t * t:
            break
        e += 1
    coarse = min(scale_bits, ring_bits - 3 - scale_bits - e)
    shift = scale_bits - coarse
    modulus = 2**ring_bits
    if shift == 0:
        return [x % modulus for x in words], coarse
    return [((x + 2 ** (shift - 1)) >> shift) % modulus for x in words], coarse  # half up


@pytest.mark.parametrize("ring_bits", [32, 64])
def test_contribution_grid_is_integer_exact_against_a_python_reference(ring_bits: int) -> None:
    # Sites and coordinator must derive U' bit for bit on any CPU: the grid is decided by exact
    # integers. Case 1: ||U|| + 1 lies one part in 2^60 above a power of two (words T and 1 with
    # T = 2^24 (2^10 - 1), bound 2^20): a float64 sum of squares drops the 1 and picks the grid
    # one bit finer, so each end's rounding would decide the pair reports.
    dtype = np.uint64 if ring_bits == 64 else np.uint32
    s = 24 if ring_bits == 64 else 8
    edge = 2**s * (2**10 - 1)
    rng = np.random.default_rng(7)
    cases: list[tuple[list[int], float]] = [([edge, 1] + [0] * 5, 2.0**20 if ring_bits == 64 else 2.0**4)]
    top = 2 ** (ring_bits - 1)
    for size, mag, bound in ((1000, 2**30, 2.0), (3 * 2**18 + 5, 2**40, 0.5), (17, top, 1e-9)):
        mag = min(mag, top)
        vals = [int(v) for v in rng.integers(-mag, mag, size=size, dtype=np.int64, endpoint=False)]
        cases.append((vals, bound))
    cases.append(([-top, top - 1, -top], 3.0))  # the extreme words of the ring
    for words, bound in cases:
        ring = np.array([w % 2**ring_bits for w in words], dtype=dtype)
        got, scale = contribution_vector(ring, ring_bits=ring_bits, scale_bits=s, update_bound=bound)
        want, want_scale = _reference_grid(words, ring_bits=ring_bits, scale_bits=s, bound=bound)
        assert scale == want_scale
        assert [int(v) for v in got] == want
    assert sum_of_squares(np.array([-(2**63), 2**63 - 1], dtype=np.int64)) == 2**126 + (2**63 - 1) ** 2


# -- spec ----------------------------------------------------------------------------------------


def test_ckks_rounds_say_they_carry_no_verified_probes() -> None:
    with pytest.raises(ConfigError, match="ckks rounds carry no verified probes"):
        RoundSpec.create(federation="f", round_number=1, mode="ckks", participants=["a", "b"],
                         vector_length=4, clip_bound=1.0, probes=32)


def test_probes_need_a_bound_and_round_trip() -> None:
    with pytest.raises(ConfigError, match="probes need a bound"):
        RoundSpec.create(federation="f", round_number=1, mode="secagg", participants=["a", "b", "c"],
                         vector_length=4, probes=32)
    spec = RoundSpec.create(federation="f", round_number=1, mode="secagg", participants=["a", "b", "c"],
                            vector_length=4, clip_bound=1.0, probes=32)
    assert spec.probe_margin == 1.5
    assert RoundSpec.from_bytes(spec.to_bytes()) == spec
    plain = RoundSpec.create(federation="f", round_number=1, mode="secagg", participants=["a", "b", "c"],
                             vector_length=4, clip_bound=1.0)
    assert spec.digest() != plain.digest()  # the probe terms are bound into every advert
    with pytest.raises(ConfigError, match="ring_bits must be 64 when probes are on"):
        RoundSpec.create(federation="f", round_number=1, mode="secagg", participants=["a", "b", "c"],
                         vector_length=4, clip_bound=1.0, probes=32, ring_bits=32)


# -- the stages ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["secagg", "secagg+"])
def test_attacker_excluded_honest_kept_and_shares_match_plaintext(mode: str) -> None:
    n, d = 8, 3000
    updates = role_updates(n, d, attackers=(7,), free_riders=(6,))
    transcript: list = []
    result = simulate(updates, mode=mode, probes=32, clip_bound=CLIP, transcript=transcript,
                      neighbours=6 if mode == "secagg+" else None)
    ids = [f"enterprise-{i:04d}" for i in range(n)]
    probes = result.probes
    assert probes is not None
    assert probes.excluded == (ids[7],)
    assert result.survivors == tuple(range(7))
    assert probes.norm_estimates[ids[7]] > 5 * CLIP
    # the sum excludes the attacker exactly
    want = np.sum([updates[i].astype(np.float64) for i in range(7)], axis=0)
    assert np.max(np.abs(result.aggregate - want)) < 1e-5
    assert result.participants_agree
    plain = plaintext_shares(updates, range(7))
    for i in range(7):
        assert probes.contributions[ids[i]] == pytest.approx(plain[i], abs=1e-6)
    assert sum(probes.contributions.values()) == pytest.approx(1.0, abs=1e-9)
    assert probes.contributions[ids[6]] < 0.02  # the free rider
    # treated as dropped: its pairwise key was asked, its self-mask seed never
    shares = [
        (owner, kind)
        for stage, _, name, payload in transcript if name == "UnmaskResponse"
        for owner, kind, _ in decode_message(payload).shares
    ]
    assert (ids[7], SHARE_KIND_MASK_KEY) in shares
    assert (ids[7], SHARE_KIND_SELF_MASK) not in shares


@pytest.mark.parametrize("mode", ["secagg", "secagg+"])
@pytest.mark.parametrize("stage", ["share", "upload", "probe", "consistency", "unmask", "contribute"])
def test_dropouts_at_every_stage_with_probes(mode: str, stage: str) -> None:
    n, d = 8, 2000
    updates = role_updates(n, d, attackers=(7,))
    result = simulate(updates, mode=mode, probes=32, clip_bound=CLIP, dropouts={stage: [2]},
                      neighbours=6 if mode == "secagg+" else None)
    in_sum = [i for i in range(7) if not (stage in ("share", "upload", "probe") and i == 2)]
    assert list(result.survivors) == in_sum
    want = np.sum([updates[i].astype(np.float64) for i in in_sum], axis=0)
    assert np.max(np.abs(result.aggregate - want)) < 1e-5
    probes = result.probes
    assert probes is not None and probes.excluded == ("enterprise-0007",)
    plain = plaintext_shares(updates, in_sum)
    for i in in_sum:
        assert probes.contributions[f"enterprise-{i:04d}"] == pytest.approx(plain[i], abs=1e-6)


def _tamper_report(stage_name: str, who: int, change):
    def tamper(stage: Stage, i: int, payload: bytes) -> bytes:
        if stage.value != stage_name or i != who:
            return payload
        return change(decode_message(payload)).to_bytes()
    return tamper


def test_mismatched_pair_reports_abort_naming_the_pair() -> None:
    updates = role_updates(6, 1000)

    def lie(m: ProbeReport) -> ProbeReport:
        peer, terms = m.pair_terms[0]
        return ProbeReport(m.round_number, m.session_id, m.sender, m.self_terms,
                           ((peer, (terms[0] + 1,) + terms[1:]),) + m.pair_terms[1:])

    with pytest.raises(ProtocolAbort, match="pair reports of 'enterprise-0000' and 'enterprise-0001' disagree"):
        simulate(updates, probes=32, clip_bound=CLIP, tamper=_tamper_report("probe", 0, lie))


def _probed_harness(n: int, d: int):
    h = make_harness(n=n, d=d, clip_bound=CLIP, probes=32)
    for p, u in zip(h.ids, role_updates(n, d)):
        h.parties[p].set_update(u, ledger_head=f"head-{p}".encode())
    return h


def _through_uploads(h) -> None:
    h.advertise()
    while h.coord.stage is not Stage.UPLOAD:
        h.step()


def test_false_self_mask_report_aborts_at_unmask_naming_the_enterprise() -> None:
    """A poisoner at 10x the bound shifts its self-mask terms so that its update reads as 0:
    it passes the norm check, and the revealed seed exposes it before the sum is released."""
    n, d = 6, 1500
    h = _probed_harness(n, d)
    cheat = h.ids[2]
    poison = (np.ones(d) * 10 * CLIP / np.sqrt(d)).astype(np.float32)
    h.parties[cheat].set_update(poison, ledger_head=b"head")
    _through_uploads(h)
    requests = h.coord.close_stage()
    assert h.coord.stage is Stage.PROBE
    for p, payload in requests.items():
        reply = h.parties[p].handle(Stage.PROBE, payload)
        if p == cheat:
            req = decode_message(payload)
            report = decode_message(reply)
            assert isinstance(req, ProbeRequest) and isinstance(report, ProbeReport)
            seed = probe_seed(req.session_id, req.uploads)
            enc = encode(poison, scale_bits=24, ring_bits=64, n_participants=n)
            true_terms = probe_products([enc], seed=seed, k=32, ring_bits=64, length=d)[0]
            lie = tuple((a + b) % 2**64 for a, b in zip(report.self_terms, true_terms))
            reply = ProbeReport(report.round_number, report.session_id, cheat, lie, report.pair_terms).to_bytes()
        h.coord.receive(p, reply)
    h.step()  # probe stage closes: the lie makes the poisoner look like a zero update
    assert h.coord.stage is Stage.CONSISTENCY
    outcome = h.coord._probe
    assert outcome is not None and cheat not in outcome.excluded
    assert outcome.norm_estimates[cheat] == 0.0
    h.step()  # consistency -> unmask requests answered
    with pytest.raises(ProtocolAbort, match=f"self-mask probe report of '{cheat}' is false"):
        h.coord.close_stage()
    assert h.coord.stage is Stage.ABORTED
    with pytest.raises(ProtocolError):
        h.coord.result()  # the sum is discarded, never sent
    for p in h.ids:
        with pytest.raises(ProtocolError):
            h.parties[p].result()


def test_probe_request_outside_the_announced_count_is_refused() -> None:
    h = _probed_harness(5, 500)
    _through_uploads(h)
    requests = h.coord.close_stage()
    target = h.ids[0]
    req = decode_message(requests[target])
    assert isinstance(req, ProbeRequest) and req.probes == 32
    greedy = ProbeRequest(req.round_number, req.session_id, 64, req.uploads).to_bytes()
    with pytest.raises(ProtocolAbort, match="asks for 64 probes; the round terms announce 32"):
        h.parties[target].handle(Stage.PROBE, greedy)
    assert h.parties[target].stage is Stage.ABORTED


def test_probes_cannot_be_chosen_before_the_uploads() -> None:
    """The request carries no seed: each enterprise derives the probes from the listed upload
    digests, which must include its own upload unchanged. A coordinator that fixed probes in
    advance (a digest list it chose before the uploads) is refused."""
    assert "seed" not in ProbeRequest.__dataclass_fields__
    h = _probed_harness(5, 500)
    _through_uploads(h)
    requests = h.coord.close_stage()
    target = h.ids[1]
    req = decode_message(requests[target])
    assert isinstance(req, ProbeRequest)
    chosen_early = tuple((p, bytes(32)) for p, _ in req.uploads)
    forged = ProbeRequest(req.round_number, req.session_id, req.probes, chosen_early).to_bytes()
    with pytest.raises(ProtocolAbort, match="own upload digest unchanged"):
        h.parties[target].handle(Stage.PROBE, forged)


def test_survivor_set_with_an_unprobed_upload_is_refused() -> None:
    h = _probed_harness(6, 500)
    _through_uploads(h)
    requests = h.coord.close_stage()
    left_out = h.ids[5]
    req = decode_message(requests[h.ids[0]])
    assert isinstance(req, ProbeRequest)
    partial = ProbeRequest(req.round_number, req.session_id, req.probes,
                           tuple(u for u in req.uploads if u[0] != left_out)).to_bytes()
    h.parties[h.ids[0]].handle(Stage.PROBE, partial)
    from secfed.protocol.messages import ConsistencyRequest

    sneaky = ConsistencyRequest(req.round_number, req.session_id, tuple(h.ids)).to_bytes()
    with pytest.raises(ProtocolAbort, match="probe request did not list"):
        h.parties[h.ids[0]].handle(Stage.CONSISTENCY, sneaky)


def test_contribution_pair_reports_that_disagree_leave_both_without_a_share() -> None:
    updates = role_updates(6, 1000)

    def lie(m: ContributionReport) -> ContributionReport:
        (peer, term), *rest = m.pair_terms
        return ContributionReport(m.round_number, m.session_id, m.sender, ((peer, (term + 1) % 2**64), *rest))

    result = simulate(updates, probes=32, clip_bound=CLIP, tamper=_tamper_report("contribute", 0, lie))
    probes = result.probes
    assert probes is not None
    assert probes.disputed == ("enterprise-0000", "enterprise-0001")
    assert "enterprise-0000" not in probes.contributions
    assert "enterprise-0001" not in probes.contributions
    plain = plaintext_shares(updates, range(6))
    for i in range(2, 6):
        assert probes.contributions[f"enterprise-{i:04d}"] == pytest.approx(plain[i], abs=1e-6)


def test_contributions_prepared_before_the_reports_arrive_give_the_shares_in_the_clear(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The service runs the coordinator's own part of the shares (grid, <U, U'>, each upload less
    # its known masks) as soon as the sum is out, beside the reports arriving; the close must
    # then need nothing but those parts and the reports (the uploads are dropped here to prove it).
    real = CoordinatorRound.receive
    prepared: list[bool] = []

    def receive(self: CoordinatorRound, sender: str, payload: bytes) -> None:
        if self.stage is Stage.CONTRIBUTE and not prepared:
            self.prepare_contributions()
            self.prepare_contributions()  # idempotent
            prepared.append(True)
            self._uploads = {}
        real(self, sender, payload)

    monkeypatch.setattr(CoordinatorRound, "receive", receive)
    updates = role_updates(6, 1000)
    result = simulate(updates, probes=32, clip_bound=CLIP)
    assert prepared and result.probes is not None
    plain = plaintext_shares(updates, range(6))
    assert set(result.probes.contributions) == {f"enterprise-{i:04d}" for i in range(6)}
    for i in range(6):
        assert result.probes.contributions[f"enterprise-{i:04d}"] == pytest.approx(plain[i], abs=1e-6)


def test_probe_products_prepared_before_the_reports_arrive_exclude_the_attacker(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The service computes every upload's probe products as soon as the probe seed exists, while
    # the sites compute their reports; the probe stage's close must then use those products
    # (products are refused once prepared, to prove it) and exclude exactly as without.
    import secfed.protocol.coordinator as coordinator_module

    real_receive = CoordinatorRound.receive
    real_products = coordinator_module.probe_products
    prepared: list[bool] = []

    def receive(self: CoordinatorRound, sender: str, payload: bytes) -> None:
        if self.stage is Stage.PROBE and not prepared:
            self.prepare_probes()
            self.prepare_probes()  # idempotent
            prepared.append(True)
        real_receive(self, sender, payload)

    def products(*args, **kwargs):
        assert not prepared, "the probe stage recomputed products it had prepared"
        return real_products(*args, **kwargs)

    monkeypatch.setattr(CoordinatorRound, "receive", receive)
    monkeypatch.setattr(coordinator_module, "probe_products", products)
    n, d = 6, 1000
    updates = role_updates(n, d, attackers=(5,))
    result = simulate(updates, probes=32, clip_bound=CLIP)
    ids = [f"enterprise-{i:04d}" for i in range(n)]
    assert prepared and result.probes is not None
    assert result.probes.excluded == (ids[5],)
    want = np.sum([updates[i].astype(np.float64) for i in range(5)], axis=0)
    assert np.max(np.abs(result.aggregate - want)) < 1e-5


def test_excluded_enterprise_is_asked_only_for_its_pairwise_key() -> None:
    h = _probed_harness(6, 800)
    cheat = h.ids[4]
    h.parties[cheat].set_update((np.ones(800) * 10 * CLIP / np.sqrt(800)).astype(np.float32))
    _through_uploads(h)
    h.step()  # upload closes: probe requests out, reports back
    h.step()  # probe closes: consistency requests out, signatures back
    assert h.coord._probe is not None and h.coord._probe.excluded == (cheat,)
    unmask = h.step()
    for payload in unmask.values():
        req = decode_message(payload)
        assert isinstance(req, UnmaskRequest)
        assert cheat in req.mask_key_of and cheat not in req.self_mask_of
        assert cheat not in req.survivors
