"""``secfed demo run --out demo-out``: the whole federation on this machine (``make demo``)."""

from __future__ import annotations

from pathlib import Path

import click

from secfed.cli.options import emit_json, json_option


@click.group("demo")
def command() -> None:
    """The local demo federation."""
    import os

    # before transformers is imported: the demo prints its own progress, not weight-loading bars
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


@command.command("prepare")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("demo-out"),
              show_default=True, help="Where data/ and model/ are written.")
@click.option("--seed", type=int, default=7, show_default=True,
              help="Seed of the generated data and of the model's initialisation.")
@click.option("--scale", type=click.Choice(["tiny", "demo", "full"]), default="demo",
              show_default=True, help="Data scale and model size.")
@click.option("--task", type=click.Choice(["classify", "generative"]), default="classify",
              show_default=True, help="classify: the image+text classifier of `demo run`; "
              "generative: instruction records and a small causal LM pre-trained here "
              "(no weights exist offline), LoRA-ready.")
@click.option("--vision", is_flag=True, default=False,
              help="With --task generative: the vision-language variant (each record carries "
              "its camera frame; a LLaVA-style model built from the pre-trained LM and a small "
              "vision tower).")
@json_option
def prepare(out: Path, seed: int, scale: str, task: str, vision: bool, as_json: bool) -> None:
    """Generate the city-safety data and build the model (pre-training) once."""
    from rich.console import Console

    from secfed.demo import DemoSettings, prepare_demo

    console = Console(highlight=False)
    data, model = prepare_demo(out, settings=DemoSettings(seed=seed, scale=scale), task=task,
                               vision=vision, say=(lambda m: None) if as_json else (lambda m: console.print(m)))
    if as_json:
        emit_json({"data": str(data), "model": str(model)})
    else:
        console.print(f"data: {data}\nmodel: {model}")


@command.command("run")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("demo-out"),
              show_default=True, help="Everything the demo writes goes here.")
@click.option("--seed", type=int, default=7, show_default=True,
              help="Seed of the generated data and of the model's initialisation.")
@click.option("--local-steps", type=int, default=None, help="DP-SGD steps per round.")
@click.option("--scale", type=click.Choice(["tiny", "demo", "full"]), default="demo",
              show_default=True, help="Data scale and model size (tiny: a quick smoke run).")
@click.option("--keep-serving", is_flag=True, default=False,
              help="After the last round (and the audit), keep the coordinator's status page "
                   "up for a look until Ctrl-C or SIGTERM.")
@json_option
def run(out: Path, seed: int, local_steps: int | None, scale: str, keep_serving: bool,
        as_json: bool) -> None:
    """Build data + model, start a coordinator and three enterprises on loopback, run 20 DP rounds."""
    from rich.console import Console

    from secfed.demo import DemoSettings, run_demo

    console = Console(highlight=False)
    settings = DemoSettings(seed=seed, scale=scale)
    if local_steps is not None:
        settings = DemoSettings(seed=seed, scale=scale, local_steps=local_steps)
    result = run_demo(out, settings=settings, keep_serving=keep_serving,
                      say=(lambda m: None) if as_json else (lambda m: console.print(m)))
    if as_json:
        emit_json({"out": str(result.out), "rounds": result.rounds,
                   "report": str(result.report) if result.report else None,
                   "seconds": round(result.seconds, 1)})
