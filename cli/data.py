"""``secfed data``: generate the city-safety federation, check a dataset's quality locally."""

from __future__ import annotations

import os
from pathlib import Path

import click

from secfed.cli.options import emit_json, json_option

_DIR = click.Path(file_okay=False, path_type=Path)


@click.group("data")
def command() -> None:
    """Datasets: generate the city-safety federation, check and clean a site's data."""


@command.command("generate")
@click.option("--out", "out_dir", type=_DIR, required=True, help="Empty or new directory.")
@click.option("--seed", type=click.IntRange(min=0), required=True, help="Data seed.")
@click.option("--scale", type=click.Choice(["tiny", "demo", "full"]), default="demo",
              show_default=True, help="Records per enterprise: tiny (tests), demo, full.")
@json_option
def generate(out_dir: Path, seed: int, scale: str, as_json: bool) -> None:
    """Write one dataset per enterprise, the shared test set and the defect truth."""
    from secfed.tasks.citysafety import generate_federation

    fed = generate_federation(out_dir, seed=seed, scale=scale)
    if as_json:
        emit_json({"root": str(fed.root), "seed": seed, "scale": scale, "counts": fed.counts})
        return
    for name, count in fed.counts.items():
        click.echo(f"{name:22s} {count:6d} records")
    click.echo(f"defect truth (keep away from training): {fed.truth_dir}")


@command.command("check")
@click.option("--data", "data_dir", type=_DIR, required=True, help="Dataset directory.")
@click.option("--model", "model_dir", type=_DIR, required=True, help="Model directory.")
@click.option("--fix", is_flag=True, help="Write a cleaned copy to --out (original untouched).")
@click.option("--out", "out_dir", type=_DIR, default=None, help="Where --fix writes.")
@click.option("--mislabels", "mislabel_policy", type=click.Choice(["review", "drop", "relabel"]),
              default=None,
              help="What --fix does with likely mislabels (default review): keep them listed "
              "for review, drop them, or take the suggested label. Duplicates are always dropped and a report "
              "that contradicts its image is always removed (image and label kept).")
@click.option("--truth", "truth_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Defect truth of a generated dataset (truth/<enterprise>.json):"
              " also print precision and recall of each check against it.")
@json_option
def check(data_dir: Path, model_dir: Path, fix: bool, out_dir: Path | None,
          mislabel_policy: str | None, truth_path: Path | None, as_json: bool) -> None:
    """Find duplicates, likely mislabels, image/text mismatches, missing modalities."""
    if fix and out_dir is None:
        raise click.BadParameter("--fix needs --out DIR (the original is never modified)",
                                 param_hint="--out")
    if out_dir is not None and not fix:
        raise click.BadParameter("--out is only used with --fix", param_hint="--out")
    if mislabel_policy is not None and not fix:
        raise click.BadParameter("--mislabels is only used with --fix", param_hint="--mislabels")
    mislabel_policy = mislabel_policy or "review"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from secfed.models import GENERATIVE_TASKS, task_of

    if task_of(model_dir) in GENERATIVE_TASKS:
        if truth_path is not None or mislabel_policy != "review":
            raise click.BadParameter("an instruction dataset has no labels: --truth and "
                                     "--mislabels are for classification data")
        _check_instructions(data_dir, model_dir, out_dir if fix else None, as_json)
        return
    from secfed.data.quality import check_dataset, write_cleaned
    from secfed.tasks.citysafety.scoring import read_truth, score_against_truth

    truth = read_truth(truth_path) if truth_path is not None else None
    report, _ = check_dataset(data_dir, model_dir=model_dir)
    cleaned = (write_cleaned(data_dir, out_dir, report, mislabels=mislabel_policy)
               if fix else None)
    score = score_against_truth(report, truth) if truth is not None else None
    if as_json:
        body = report.to_json()
        body["cleaned"] = str(cleaned) if cleaned else None
        if cleaned:
            body["fix"] = report.fix_plan(mislabel_policy).to_json()
        if score is not None:
            body["score"] = score
        emit_json(body)
        return
    s = report.summary()
    click.echo(f"{data_dir}: {s['records']} records")
    click.echo("class balance: " + ", ".join(f"{k}={v}" for k, v in report.class_balance.items()))
    for key in ("missing_text", "missing_image", "exact_duplicates", "near_duplicates",
                "mislabels", "mismatches"):
        click.echo(f"  {key.replace('_', ' '):18s} {s[key]:5d}")
    for m in report.mislabels[:10]:
        click.echo(f"  likely mislabel {m['id']}: {m['given_label']} -> "
                   f"{m['suggested_label']} ({m['confidence']:.2f})")
    for kind, v in (score or {}).items():
        click.echo(f"  vs truth {kind:10s} precision {v['precision']:.2f} recall "
                   f"{v['recall']:.2f} ({v['found']} found, {v['expected']} injected)")
    if cleaned is not None:
        plan = report.fix_plan(mislabel_policy)
        click.echo(f"cleaned copy ({s['records'] - len(plan.drop)} records; "
                   f"{len(plan.drop)} dropped, {len(plan.strip_text)} reports removed, "
                   f"{len(plan.relabel)} relabelled, {len(plan.review)} to review): {cleaned}")


def _check_instructions(data_dir: Path, model_dir: Path, out_dir: Path | None,
                        as_json: bool) -> None:
    """``data check`` for a generative model's instruction records (causal-lm, vision-language)."""
    from secfed.data.quality.instructions import (
        check_instruction_dataset,
        write_cleaned_instructions,
    )

    report = check_instruction_dataset(data_dir, model_dir=model_dir)
    cleaned = write_cleaned_instructions(data_dir, out_dir, report) if out_dir else None
    if as_json:
        emit_json(report.to_json() | {"cleaned": str(cleaned) if cleaned else None})
        return
    s = report.summary()
    click.echo(f"{data_dir}: {s['records']} instruction records (max length {report.max_length})")
    for key in ("truncated", "without_target", "exact_duplicates", "near_duplicates"):
        click.echo(f"  {key.replace('_', ' '):18s} {s[key]:5d}")
    if cleaned is not None:
        click.echo(f"cleaned copy ({s['records'] - len(report.flagged())} records; "
                   f"{len(report.flagged())} duplicates dropped): {cleaned}")


@command.command("score")
@click.option("--federation", "federation_dir", type=_DIR, required=True,
              help="A federation written by `secfed data generate` (with its truth/).")
@click.option("--model", "model_dir", type=_DIR, required=True, help="Model directory.")
@json_option
def score(federation_dir: Path, model_dir: Path, as_json: bool) -> None:
    """Check every enterprise of a generated federation; precision/recall vs the truth."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from secfed.tasks.citysafety.scoring import score_federation

    result = score_federation(federation_dir, model_dir=model_dir)
    if as_json:
        emit_json(result)
        return
    kinds = ("duplicates", "mislabels", "mismatches")
    click.echo("| enterprise | records | " + " | ".join(f"{k} P / R" for k in kinds) + " |")
    click.echo("|---|---|" + "---|" * len(kinds))
    rows = [(name, s, str(s["records"])) for name, s in result["enterprises"].items()]
    rows.append(("pooled", result["pooled"], ""))
    for name, s, records in rows:
        cells = [f"{s[k]['precision']:.2f} / {s[k]['recall']:.2f} "
                 f"({s[k]['hits']} of {s[k]['found']} found, {s[k]['expected']} injected)"
                 for k in kinds]
        click.echo(f"| {name} | {records} | " + " | ".join(cells) + " |")
