"""``secfed federation``: the admin's commands.

``invite`` makes the CA and the invitation (the settings to pin); ``sign`` checks the parties'
requests, certifies their keys and pins the roster into a bundle. ``init`` runs the whole
enrolment of every party on this machine (tests, demos): one folder per party, but whoever runs
it holds every party's keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

import click

from secfed.cli.options import emit_json, json_option, report, stack_options
from secfed.config import (
    Deadlines,
    DistributedDPSettings,
    DPSettings,
    FederationConfig,
    LRSchedule,
    ModelSettings,
    Optimizer,
    default_of,
)
from secfed.names import TRAINABLE_SCOPES

if TYPE_CHECKING:
    from secfed.federation.plan import FederationPlan


@click.group("federation")
def command() -> None:
    """Create and inspect federations (startup kits)."""


def _defaults_to(model: type, field: str, *decls: str, **attrs: Any) -> Any:
    """An option whose default (shown in ``--help``) is ``model``'s own default for ``field``."""
    return click.option(*decls, default=default_of(model, field), show_default=True, **attrs)


_SETTINGS = [
    click.option("--mode-schedule", default=",".join(default_of(FederationConfig, "mode_schedule")),
                 show_default=True,
                 help="Comma-separated modes per round, repeated: e.g. secagg,secagg,secagg,ckks."),
    _defaults_to(FederationConfig, "rounds", "--rounds", type=click.IntRange(min=1),
                 help="Rounds the federation runs; the coordinator and every site stop after "
                      "the last (each site's σ is calibrated to its budget over them)."),
    click.option("--threshold", type=int, default=None, help="Shamir threshold: holders besides each responder (default floor(2n/3))."),
    click.option("--min-participants", type=int, default=None,
                 help="Fewest enterprises a round may finish with (at least --threshold; "
                      "default: the threshold)."),
    click.option("--model", "model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
                 default=None, help="Model directory: the adapter length and initial hash come from it."),
    click.option("--synthetic-dim", type=int, default=None,
                 help="No model: a zero-initialised synthetic adapter of this length (tests, benches)."),
    _defaults_to(DPSettings, "target_epsilon", "--epsilon", "target_epsilon", type=float,
                 help="Target epsilon = each site's budget."),
    _defaults_to(DPSettings, "delta", "--delta", type=float,
                 help="DP delta per enterprise (each site's policy refuses a larger one)."),
    click.option("--noise-multiplier", type=float, default=None, help="sigma (default: calibrated)."),
    _defaults_to(DPSettings, "sample_rate", "--sample-rate", type=float,
                 help="DP-SGD Poisson sampling rate q: each record joins a step's batch with "
                      "this probability."),
    _defaults_to(DPSettings, "local_steps", "--local-steps", type=int,
                 help="DP-SGD steps each site takes per round."),
    _defaults_to(DPSettings, "learning_rate", "--learning-rate", type=float,
                 help="Sites' learning rate (the start of the schedule)."),
    _defaults_to(DPSettings, "max_grad_norm", "--max-grad-norm", type=float,
                 help="DP-SGD per-example gradient clipping norm."),
    _defaults_to(DPSettings, "optimizer", "--optimizer", type=click.Choice(get_args(Optimizer)),
                 help="DP-SGD update rule at the sites."),
    _defaults_to(DPSettings, "lr_schedule", "--lr-schedule",
                 type=click.Choice(get_args(LRSchedule)), help="cosine: the learning rate decays over the planned rounds."),
    _defaults_to(ModelSettings, "trainable", "--trainable", type=click.Choice(TRAINABLE_SCOPES),
                 help="What sites train and the federation aggregates: LoRA on both towers + the "
                      "fusion head (adapter), the head + the last layer's LoRA (top), the head "
                      "(head; towers frozen, so sites train on tower features computed once), or "
                      "the head's MLP (classifier)."),
    _defaults_to(Deadlines, "train", "--train-deadline", type=float,
                 help="Seconds the advertise and upload stages stay open (they cover local "
                      "training)."),
    _defaults_to(Deadlines, "stage", "--stage-deadline", type=float,
                 help="Seconds every other stage stays open."),
    click.option("--start-deadline", type=float, default=600.0, show_default=True,
                 help="Seconds round 1 waits for every site to report ready (model loaded, "
                      "features computed) before it opens anyway."),
    click.option("--clip-bound", type=float, default=None,
                 help="L2 bound on one site's update (default "
                      f"{default_of(ModelSettings, 'clip_bound'):g}); larger updates are scaled down."),
    click.option("--dp-distributed", is_flag=True,
                 help="Enterprise-level (distributed) DP: each site clips its whole update and adds "
                      "a Skellam noise share before masking (mask modes only; off by default)."),
    click.option("--dp-distributed-clip", type=float, default=None,
                 help="Distributed DP: L2 bound C of one site's whole update "
                      f"[default: {default_of(DistributedDPSettings, 'clip_norm')}]."),
    click.option("--dp-distributed-noise", type=float, default=None,
                 help="Distributed DP: central sigma over the guaranteed noise shares "
                      f"[default: {default_of(DistributedDPSettings, 'noise_multiplier')}]."),
    click.option("--dp-distributed-min-participants", type=int, default=None,
                 help="Distributed DP: refuse rounds with fewer enterprises "
                      f"[default: {default_of(DistributedDPSettings, 'min_participants')}]."),
    click.option("--dp-distributed-force", is_flag=True,
                 help="Distributed DP: run even below --dp-distributed-min-participants."),
]
#: The federation settings an invitation pins (every ``init`` option but the roster).
_settings_options = stack_options(*_SETTINGS)


def _plan(opts: dict[str, Any]) -> FederationPlan:
    """The federation's plan from the options (validated by the config models' own rules)."""
    from secfed.config import default_policy_refusals, validated
    from secfed.federation.plan import make_plan, model_settings_for

    modes = tuple(m.strip() for m in str(opts["mode_schedule"]).split(",") if m.strip())
    ddp_opts = {"clip_norm": "dp_distributed_clip", "noise_multiplier": "dp_distributed_noise",
                "min_participants": "dp_distributed_min_participants"}
    distributed = None
    if opts["dp_distributed"]:
        distributed = validated(
            DistributedDPSettings, force=bool(opts["dp_distributed_force"]),
            **{k: opts[o] for k, o in ddp_opts.items() if opts[o] is not None},
        )
    else:
        given = [o for o in [*ddp_opts.values(), "dp_distributed_force"] if opts[o]]
        if given:
            raise click.UsageError(
                f"--{given[0].replace('_', '-')} needs --dp-distributed (distributed DP is off)"
            )
    model = model_settings_for(model_dir=opts["model_dir"], synthetic_dim=opts["synthetic_dim"],
                               trainable=str(opts["trainable"]))
    if opts["clip_bound"] is not None:
        model = validated(ModelSettings, **{**model.model_dump(), "clip_bound": opts["clip_bound"]})
    dp = validated(
        DPSettings,
        max_grad_norm=opts["max_grad_norm"],
        sample_rate=opts["sample_rate"],
        local_steps=opts["local_steps"],
        learning_rate=opts["learning_rate"],
        optimizer=opts["optimizer"],
        lr_schedule=opts["lr_schedule"],
        noise_multiplier=opts["noise_multiplier"],
        target_epsilon=opts["target_epsilon"],
        delta=opts["delta"],
        distributed=distributed,
    )
    # (a σ below the default floor is refused in every round: the budget warning adds nothing)
    for warning in default_policy_refusals(dp) or _budget_refusals(dp, int(opts["rounds"])):
        click.echo(f"secfed: warning: {warning}", err=True)
    return make_plan(
        name=str(opts["name"]),
        coordinator_url=str(opts["coordinator_url"]),
        model=model,
        mode_schedule=modes,
        rounds=int(opts["rounds"]),
        threshold=opts["threshold"],
        min_participants=opts["min_participants"],
        deadlines=validated(Deadlines, train=opts["train_deadline"], stage=opts["stage_deadline"],
                            start=opts["start_deadline"]),
        dp=dp,
    )


def _budget_refusals(dp: Any, rounds: int) -> list[str]:
    """With σ given (not calibrated for the horizon): the round from which a site with the
    default budget (site.toml: budget_epsilon = the federation's target ε, the RDP gate)
    refuses every round, if the planned rounds do not all fit."""
    if dp.noise_multiplier is None:
        return []
    from secfed.privacy.accounting import rounds_within_budget

    fit = rounds_within_budget(noise_multiplier=dp.noise_multiplier, sample_rate=dp.sample_rate,
                               steps=dp.local_steps, rounds=rounds, budget=dp.target_epsilon,
                               delta=dp.delta)
    if fit >= rounds:
        return []
    return [f"--noise-multiplier {dp.noise_multiplier:g} with --sample-rate {dp.sample_rate:g} "
            f"and --local-steps {dp.local_steps} fits {fit} of the {rounds} --rounds in the "
            f"default site budget (--epsilon {dp.target_epsilon:g}, RDP): every site enrolled with "
            f"the defaults refuses round {fit + 1} and later (raise --noise-multiplier, lower "
            "--rounds, or leave --noise-multiplier out to calibrate it for the rounds)"]


@command.command("invite")
@click.option("--name", required=True, help="Federation name.")
@click.option("--coordinator-url", required=True, help="https://HOST:PORT of the coordinator.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="The admin's folder: ca.pem, ca.key (keep it here) and invitation.toml.")
@_settings_options
@click.option("--force", is_flag=True, help="Replace a non-empty --out directory.")
@json_option
def invite(**opts: Any) -> None:
    """Admin: make the federation CA and the invitation (every setting but the roster).

    Send OUT/invitation.toml to the coordinator and every site; keep OUT/ca.key.
    """
    from secfed.federation.enrol import INVITATION_FILE
    from secfed.federation.enrol import invite as make_invitation

    plan = _plan(opts)
    inv = make_invitation(opts["out"], **plan.invitation_settings(), force=bool(opts["force"]))
    path = Path(opts["out"]) / INVITATION_FILE
    if opts["as_json"]:
        emit_json({"invitation": str(path), "ca": str(Path(opts["out"]) / "ca.pem"),
                  "uses_ckks": inv.uses_ckks, "vector_length": inv.model.vector_length})
    else:
        click.echo(f"invitation written to {path} (send it to the coordinator and every site)")
        click.echo(f"  CA key: {Path(opts['out']) / 'ca.key'} (stays here)")


@command.command("sign")
@click.option("--admin", "admin_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              required=True, help="The admin's folder (from federation invite).")
@click.option("--request", "requests", multiple=True, required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A party's request.toml (repeat: the coordinator's and each site's; the "
                   "roster follows the sites' order).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="The bundle folder to hand back to every party (public material only).")
@click.option("--force", is_flag=True, help="Replace a non-empty --out directory.")
@json_option
def sign(admin_dir: Path, requests: tuple[Path, ...], out: Path, force: bool,
         as_json: bool) -> None:
    """Admin: check the requests, certify the keys, pin the roster; write the bundle."""
    from secfed.federation.enrol import FEDERATION_FILE, fingerprint, sign_requests

    fed = sign_requests(admin_dir, list(requests), out, force=force)
    digest = fingerprint(out / FEDERATION_FILE)
    report(as_json, {"bundle": str(out), "roster": list(fed.enterprise_ids()),
                     "federation_sha256": digest},
           f"bundle written to {out} (hand it to the coordinator and every site)",
           f"  roster: {', '.join(fed.enterprise_ids())}", f"  federation.toml sha256: {digest}")


@command.command("init")
@click.option("--name", required=True, help="Federation name.")
@click.option("--enterprise", "enterprises", multiple=True, required=True,
              help="Enterprise id (repeat, at least 2): 1-63 lower-case letters a-z, digits, "
                   "'_' or '-', starting with a letter or digit.")
@click.option("--coordinator-url", required=True, help="https://HOST:PORT of the coordinator.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="New or empty folder: ca/ (the admin's), coordinator/ and one kit per "
                   "enterprise.")
@_settings_options
@click.option("--force", is_flag=True, help="Replace a non-empty --out directory.")
@json_option
def init(**opts: Any) -> None:
    """Every party's enrolment on this machine (tests, demos): OUT/ca, OUT/coordinator and
    OUT/<enterprise>, each made by its own step; the admin's and coordinator's folders hold
    no enterprise secret, but whoever runs this held them all. For a real federation use
    ``federation invite``, ``coordinator init``, ``site init``, ``federation sign``."""
    from secfed.federation.plan import plan_federation

    plan = _plan(opts)
    paths = plan_federation(plan, opts["out"], enterprises=list(opts["enterprises"]),
                            force=bool(opts["force"]))
    model, distributed = plan.model, plan.dp.distributed
    summary = {
        "root": str(paths.root),
        "coordinator": str(paths.coordinator),
        "enterprises": {k: str(v) for k, v in paths.enterprises.items()},
        "vector_length": model.vector_length,
        "trainable": model.trainable,
        "distributed_dp": distributed.model_dump() if distributed else None,
    }
    if opts["as_json"]:
        emit_json(summary)
    else:
        click.echo(f"federation kits written to {paths.root}")
        click.echo(f"  coordinator: {paths.coordinator}")
        for eid, path in paths.enterprises.items():
            click.echo(f"  {eid}: {path}")


@command.command("renew")
@click.option("--kit-root", type=click.Path(exists=True, file_okay=False, path_type=Path),
              required=True, help="The folder `federation init` made (ca/, coordinator/, sites).")
@click.option("--enterprise", "enterprises", multiple=True,
              help="Renew only this enterprise's client certificate (repeat); default: the "
                   "coordinator's and every enterprise's.")
@click.option("--days", type=click.IntRange(1, 90), default=90, show_default=True,
              help="Validity of the new certificates.")
@json_option
def renew(kit_root: Path, enterprises: tuple[str, ...], days: int, as_json: bool) -> None:
    """Admin: fresh TLS certificates from the federation CA for the same TLS keys.

    Identity keys, ledgers, state and federation.toml are not touched; a running coordinator
    serves its new certificate from its next connection on."""
    import datetime as dt

    from secfed.federation.lifecycle import renew as renew_certs

    done = renew_certs(kit_root, enterprises=enterprises, validity=dt.timedelta(days=days))
    if as_json:
        emit_json({"renewed": [{"party": r.party, "path": str(r.path), "serial": r.serial,
                                "not_after": r.not_after.isoformat()} for r in done]})
    else:
        for r in done:
            click.echo(f"renewed {r.party}: {r.path} (valid until {r.not_after:%Y-%m-%d %H:%M} UTC)")


@command.command("revoke")
@click.argument("enterprise")
@click.option("--kit-root", type=click.Path(exists=True, file_okay=False, path_type=Path),
              required=True, help="The folder `federation init` made (ca/, coordinator/, sites).")
@json_option
def revoke(enterprise: str, kit_root: Path, as_json: bool) -> None:
    """Admin: revoke ENTERPRISE. The coordinator refuses its certificate from the next
    connection on (CRL) and takes it off the allow-list; its ledger stays for `secfed audit`."""
    from secfed.federation.lifecycle import revoke as revoke_enterprise

    serials = revoke_enterprise(kit_root, enterprise)
    report(as_json, {"revoked": enterprise, "serials": [str(s) for s in serials]},
           f"revoked {enterprise}: {len(serials)} certificate(s) in "
           f"{kit_root / 'coordinator' / 'crl.pem'}")
