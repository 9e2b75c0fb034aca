"""``secfed model init``: turn a local Hugging Face checkpoint into a secfed model directory."""

from __future__ import annotations

from pathlib import Path

import click

from secfed.cli.options import emit_json, json_option


@click.group("model")
def command() -> None:
    """Models: bring your own Hugging Face checkpoint."""


@command.command("init")
@click.option("--base", required=True, help="Local Hugging Face checkpoint directory "
              "(safetensors).")
@click.option("--task", required=True, help="causal-lm, seq-cls, image-cls, image-text-cls or "
              "vision-language.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True,
              help="New or empty directory for the secfed model.")
@click.option("--base-image", default=None, help="image-text-cls: the image tower's checkpoint.")
@click.option("--lora-r", type=click.IntRange(min=1), default=8, show_default=True,
              help="LoRA rank: the inner size of each adapter (more parameters to aggregate).")
@click.option("--lora-alpha", type=click.FloatRange(min=0, min_open=True), default=16.0,
              show_default=True, help="LoRA scaling: the update is scaled by alpha / r.")
@click.option("--lora-targets", default="auto", show_default=True,
              help="'auto' (attention query/value projections) or module names NAME,...")
@click.option("--lora-vision", is_flag=True, default=False,
              help="vision-language: put LoRA on the vision tower too.")
@click.option("--labels", default=None, help="Classification tasks: class names A,B,...")
@click.option("--max-length", type=click.IntRange(min=2), default=None,
              help="Tokens per record (generative default 256; longer records are cut and "
                   "counted).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Fixes the LoRA/head initialisation (public).")
@json_option
def init(base: str, task: str, out_dir: Path, base_image: str | None, lora_r: int,
         lora_alpha: float, lora_targets: str, lora_vision: bool, labels: str | None,
         max_length: int | None, seed: int, as_json: bool) -> None:
    """Load BASE offline, attach LoRA, write OUT for `secfed federation init --model OUT`
    and `secfed join --model OUT`."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from secfed import progress
    from secfed.models import init_model

    progress.quiet_libraries()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # load reports of unused heads: secfed says what it built
    names = [x.strip() for x in labels.split(",")] if labels else None
    # each step on stderr: a styled line on a terminal, one plain line otherwise
    report = init_model(base, task=task, out=out_dir, base_image=base_image, lora_r=lora_r,
                        lora_alpha=lora_alpha, lora_targets=lora_targets, labels=names,
                        max_length=max_length, lora_vision=lora_vision, seed=seed,
                        log=lambda message: progress.step(f"model init: {message}"))
    summary = {"out": str(report.out), "task": report.task, "lora_targets": list(report.targets),
               "lora_target_regex": report.target_regex, "adapter_size": report.adapter_size}
    if as_json:
        emit_json(summary)
        return
    click.echo(f"model directory: {report.out} (task {report.task})")
    click.echo(f"LoRA on {len(report.targets)} modules, for example:")
    for name in report.targets[:6]:
        click.echo(f"  {name}")
    if len(report.targets) > 6:
        click.echo(f"  ... and {len(report.targets) - 6} more")
    click.echo(f"adapter vector: {report.adapter_size} floats (what each round aggregates)")
