"""``secfed federation init``: write the startup kits of a new federation."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import click

from secfed.cli.options import emit_json, json_option
from secfed.config import LRSchedule, Optimizer, TrainableSet


@click.group("federation")
def command() -> None:
    """Create and inspect federations (startup kits)."""


@command.command("init")
@click.option("--name", required=True, help="Federation name.")
@click.option("--enterprise", "enterprises", multiple=True, required=True, help="Enterprise id (repeat).")
@click.option("--coordinator-url", required=True, help="https://HOST:PORT of the coordinator.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--mode-schedule", default="secagg", show_default=True,
              help="Comma-separated modes per round, repeated: e.g. secagg,secagg,secagg,ckks.")
@click.option("--rounds", type=int, default=4, show_default=True)
@click.option("--threshold", type=int, default=None, help="Shamir threshold (default floor(2n/3)+1).")
@click.option("--min-participants", type=int, default=None)
@click.option("--model", "model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=None, help="Model directory: the adapter length and initial hash come from it.")
@click.option("--synthetic-dim", type=int, default=None,
              help="No model: a zero-initialised synthetic adapter of this length (tests, benches).")
@click.option("--epsilon", "target_epsilon", type=float, default=8.0, show_default=True,
              help="Target epsilon = each site's budget.")
@click.option("--delta", type=float, default=1e-5, show_default=True)
@click.option("--noise-multiplier", type=float, default=None, help="sigma (default: calibrated).")
@click.option("--sample-rate", type=float, default=0.05, show_default=True)
@click.option("--local-steps", type=int, default=20, show_default=True)
@click.option("--learning-rate", type=float, default=0.05, show_default=True)
@click.option("--max-grad-norm", type=float, default=1.0, show_default=True)
@click.option("--optimizer", type=click.Choice(get_args(Optimizer)), default="sgd", show_default=True,
              help="DP-SGD update rule at the sites.")
@click.option("--lr-schedule", type=click.Choice(get_args(LRSchedule)), default="constant",
              show_default=True, help="cosine: the learning rate decays over the planned rounds.")
@click.option("--trainable", type=click.Choice(get_args(TrainableSet)),
              default="adapter", show_default=True,
              help="What sites train and the federation aggregates: LoRA on both towers + the "
                   "fusion head (adapter), the head + the last layer's LoRA (top), the head "
                   "(head; towers frozen, so sites train on tower features computed once), or "
                   "the head's MLP (classifier).")
@click.option("--train-deadline", type=float, default=600.0, show_default=True)
@click.option("--stage-deadline", type=float, default=60.0, show_default=True)
@click.option("--clip-bound", type=float, default=None,
              help="L2 bound on one site's update (default 8); larger updates are scaled down.")
@click.option("--dp-distributed", is_flag=True,
              help="Enterprise-level (distributed) DP: each site clips its whole update and adds "
                   "a Skellam noise share before masking (mask modes only; off by default).")
@click.option("--dp-distributed-clip", type=float, default=None,
              help="Distributed DP: L2 bound C of one site's whole update [default: 1.0].")
@click.option("--dp-distributed-noise", type=float, default=None,
              help="Distributed DP: central sigma over the guaranteed noise shares [default: 1.0].")
@click.option("--dp-distributed-min-participants", type=int, default=None,
              help="Distributed DP: refuse rounds with fewer enterprises [default: 10].")
@click.option("--dp-distributed-force", is_flag=True,
              help="Distributed DP: run even below --dp-distributed-min-participants.")
@click.option("--force", is_flag=True, help="Replace a non-empty --out directory.")
@json_option
def init(**opts: object) -> None:
    """Create the CA, certificates, identity keys, federation.toml and CKKS contexts."""
    from secfed.config import Deadlines, DistributedDPSettings, DPSettings, ModelSettings, validated
    from secfed.participant.adapter import model_settings_for
    from secfed.transport.kits import create_kits

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
    paths = create_kits(
        opts["out"],  # type: ignore[arg-type]
        name=str(opts["name"]),
        enterprises=list(opts["enterprises"]),  # type: ignore[call-overload]
        coordinator_url=str(opts["coordinator_url"]),
        model=model,
        mode_schedule=modes,
        rounds=int(opts["rounds"]),  # type: ignore[call-overload]
        threshold=opts["threshold"],  # type: ignore[arg-type]
        min_participants=opts["min_participants"],  # type: ignore[arg-type]
        deadlines=validated(Deadlines, train=opts["train_deadline"], stage=opts["stage_deadline"]),
        dp=validated(
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
        ),
        force=bool(opts["force"]),
    )
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
