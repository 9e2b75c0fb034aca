"""``secfed simulate``: run one secure-aggregation round in-process and report its cost."""

from __future__ import annotations

import sys
from typing import Any

import click

from secfed.cli.options import emit_json, json_option
from secfed.names import ADVERSARIES, MESSAGE_STAGES, MODES

_MODES = MODES
_STAGES = tuple(s.value for s in MESSAGE_STAGES)  # reveal: secagg+; probe, contribute: probed rounds
_ADVERSARIES = ADVERSARIES


def _parse_drops(values: tuple[str, ...], n: int) -> dict[str, list[int]]:
    drops: dict[str, list[int]] = {}
    for value in values:
        stage, sep, rest = value.partition(":")
        if not sep or stage not in _STAGES:
            raise click.BadParameter(
                f"must be STAGE:i,j with STAGE one of {', '.join(_STAGES)} (got {value!r})",
                param_hint="--drop",
            )
        try:
            idx = [int(x) for x in rest.split(",") if x.strip()]
        except ValueError:
            raise click.BadParameter(f"indices must be integers (got {rest!r})", param_hint="--drop") from None
        bad = [i for i in idx if not 0 <= i < n]
        if bad:
            raise click.BadParameter(f"indices must be in [0, {n - 1}] (got {bad})", param_hint="--drop")
        drops.setdefault(stage, []).extend(idx)
    return drops


def _check_threshold(threshold: int | None, n: int, mode: str) -> None:
    """Name --threshold when it cannot fit n participants (the round spec would otherwise
    report it as the min_participants it also sets)."""
    if threshold is None:
        return
    low, high, meaning = (1, n, "the fewest uploads the sum must contain") if mode == "ckks" \
        else (2, n - 1, "holders besides each responder")
    if not low <= threshold <= high:
        raise click.BadParameter(
            f"must be in [{low}, {high}] for {n} participants in mode {mode} ({meaning}) "
            f"(got {threshold})", param_hint="--threshold")


@click.command("simulate")
@click.option("--participants", "-n", type=click.IntRange(2, 5000), default=10, show_default=True,
              help="Enterprises in the round.")
@click.option("--dim", "-d", type=click.IntRange(1, 50_000_000), default=100_000, show_default=True,
              help="Length of each update vector.")
@click.option("--mode", "-m", type=click.Choice(_MODES), default="secagg", show_default=True,
              help="Protection of the updates: pairwise masks (secagg, secagg+) or CKKS.")
@click.option("--drop", "drops", multiple=True, metavar="STAGE:i,j",
              help="Participants that vanish before sending STAGE's message (repeatable); "
                   "i, j are 0-based indices, 0 to n-1: e.g. upload:0,3.")
@click.option("--adversary", type=click.Choice(_ADVERSARIES), default=None,
              help="Let the coordinator play this attack (the round must abort).")
@click.option("--threshold", "-t", type=click.IntRange(1), default=None,
              help="Shamir threshold: holders besides each responder (default floor(2n/3); "
                   "secagg+: of a neighbourhood).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random test updates.")
@click.option("--probes", type=click.IntRange(0, 256), default=None,
              help="Verified norm probes k (mask modes; 0 = none). Default 32 with roles, else 0.")
@click.option("--free-riders", type=click.IntRange(0), default=0, show_default=True,
              help="Enterprises that send only noise (no signal), at the clip bound.")
@click.option("--attackers", type=click.IntRange(0), default=0, show_default=True,
              help="Enterprises that send -S x the clip bound along the honest direction.")
@click.option("--attack-scale", type=click.FloatRange(0.0, min_open=True), default=10.0, show_default=True,
              help="S: the attackers' update norm in multiples of the clip bound.")
@click.option("--clip", type=click.FloatRange(0.0, min_open=True), default=1.0, show_default=True,
              help="Per-update L2 bound announced in probed rounds.")
@json_option
def command(
    participants: int, dim: int, mode: str, drops: tuple[str, ...], adversary: str | None,
    threshold: int | None, seed: int, probes: int | None, free_riders: int, attackers: int,
    attack_scale: float, clip: float, as_json: bool,
) -> None:
    """Simulate one round: timings per stage, bytes per participant, error vs the plaintext sum.

    With --probes (default with --free-riders/--attackers) the round checks each update's norm
    and computes contribution shares, reported next to the same shares computed in the clear.
    """
    import numpy as np

    from secfed.errors import ProtocolAbort
    from secfed.protocol import simulate
    from secfed.protocol.simulate import plaintext_contributions, role_updates

    dropouts = _parse_drops(drops, participants)
    _check_threshold(threshold, participants, mode)
    with_roles = bool(free_riders or attackers)
    k = (32 if with_roles else 0) if probes is None else probes
    if free_riders + attackers > participants:
        raise click.BadParameter(
            f"free riders + attackers must be <= participants ({participants}) "
            f"(got {free_riders} + {attackers})", param_hint="--free-riders/--attackers",
        )
    if k and mode == "ckks":
        raise click.BadParameter("ckks rounds carry no verified probes (use secagg or secagg+)",
                                 param_hint="--probes")
    roles: list[str] = []
    if with_roles or k:
        updates, roles = role_updates(
            participants, dim, free_riders=free_riders, attackers=attackers,
            attack_scale=attack_scale, bound=clip, seed=seed,
        )
    else:
        rng = np.random.default_rng(seed)  # test inputs only; every key and mask uses the OS CSPRNG
        updates = [(rng.standard_normal(dim) * 0.01).astype(np.float32) for _ in range(participants)]
    try:
        result = simulate(
            updates, mode=mode, threshold=threshold, dropouts=dropouts, adversary=adversary,
            probes=k, clip_bound=clip if k else 0.0,
        )
    except ProtocolAbort as exc:
        report: dict[str, Any] = {"aborted": True, "stage": exc.stage, "reason": str(exc)}
        if as_json:
            emit_json(report)
        else:
            click.echo(f"round aborted at stage {exc.stage}: {exc}")
        sys.exit(1)
    expected = np.sum([updates[i].astype(np.float64) for i in result.survivors], axis=0)
    max_error = float(np.max(np.abs(result.aggregate - expected)))
    report = {
        "aborted": False,
        "mode": mode,
        "participants": participants,
        "dim": dim,
        "threshold": result.threshold,
        "neighbours": result.neighbours,
        "survivors": list(result.survivors),
        "timings_s": dict(result.timings),
        "bytes_per_participant": dict(result.bytes_per_participant),
        "max_abs_error": max_error,
        "participants_agree": result.participants_agree,
    }
    if result.probes is not None:
        ids = [f"enterprise-{i:04d}" for i in range(participants)]
        outcome = result.probes
        plain = plaintext_contributions(updates, result.survivors)
        report.update({
            "probes": outcome.probes,
            "exclusion_limit": outcome.limit,
            "roles": dict(zip(ids, roles)),
            "contributions": dict(outcome.contributions),
            "plaintext_contributions": {ids[i]: v for i, v in plain.items()},
            "excluded": list(outcome.excluded),
            "norm_estimates": dict(outcome.norm_estimates),
            "unverified": list(outcome.unverified),
            "without_share": list(outcome.without_share),
        })
    if as_json:
        emit_json(report)
        return
    _print_report(report, result, mode=mode, participants=participants, dim=dim)


def _print_report(report: dict[str, Any], result: Any, *, mode: str, participants: int,
                  dim: int) -> None:
    """The simulated round in words: timings, bytes, error and (with probes) the shares."""
    click.echo(
        f"{mode}: n={participants} d={dim} t={result.threshold}"
        + (f" k={result.neighbours}" if result.neighbours else "")
        + f"  survivors {len(result.survivors)}/{participants}"
    )
    click.echo("timings (s):")
    for name, seconds in result.timings.items():
        click.echo(f"  {name:<34} {seconds:10.4f}")
    click.echo("bytes per participant:")
    for name, value in result.bytes_per_participant.items():
        click.echo(f"  {name:<34} {value:12.0f}")
    click.echo(f"upload bytes per parameter: {result.bytes_per_participant['upload'] / dim:.3f}")
    click.echo(f"max |error| vs plaintext sum: {report['max_abs_error']:.3e}")
    if result.probes is not None:
        click.echo(f"norm probes k={result.probes.probes}, exclusion above {result.probes.limit:.6g}:")
        for enterprise, estimate in report["norm_estimates"].items():
            share = report["contributions"].get(enterprise)
            role = report["roles"].get(enterprise, "")
            shown = "excluded" if enterprise in result.probes.excluded else (
                f"share {share:.6f}" if share is not None else "no share")
            click.echo(f"  {enterprise}  {role:<10} norm ~{estimate:10.4g}  {shown}")
