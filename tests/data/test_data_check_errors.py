"""``secfed data check`` on a folder with a missing, unreadable or broken file: one error line
naming it (after the progress lines of what ran), exit 1, found while loading (before the embedding, the minutes of work); no weight-loading
bars from transformers (issue 22, item 7)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from secfed.cli.main import cli

SITE = "energy_utility"


@pytest.fixture
def site_copy(federation, tmp_path: Path) -> Path:
    dst = tmp_path / SITE
    shutil.copytree(federation.enterprises[SITE], dst)
    return dst


def _error_line(stderr: str) -> str:
    """The one error line; every other stderr line is a progress line (``secfed: ...``)."""
    lines = stderr.splitlines()
    errors = [ln for ln in lines if ln.startswith("secfed: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr[-2000:]
    assert all(ln.startswith("secfed: ") for ln in lines), stderr[-2000:]
    return errors[0]


def _fifth_image(site: Path) -> Path:
    return sorted((site / "images").iterdir())[4]


def _missing(site: Path) -> str:
    image = _fifth_image(site)
    image.unlink()
    return f"images/{image.name}"


def _truncated(site: Path) -> str:
    image = _fifth_image(site)
    image.write_bytes(image.read_bytes()[:60])  # a PNG signature, then nothing readable
    return f"images/{image.name}"


def _not_png(site: Path) -> str:
    image = _fifth_image(site)
    image.write_bytes(b"not an image at all")
    return f"images/{image.name}"


def _a_folder(site: Path) -> str:
    image = _fifth_image(site)
    image.unlink()
    image.mkdir()
    return f"images/{image.name}"


@pytest.mark.parametrize("breaks", [_missing, _truncated, _not_png, _a_folder])
def test_broken_data_file_is_one_line_naming_it_before_embedding(
        site_copy: Path, model_bundle, monkeypatch: pytest.MonkeyPatch, breaks) -> None:
    import secfed.data.quality.check as check

    def never(*args, **kwargs):
        raise AssertionError("the dataset was embedded before the broken file was found")

    monkeypatch.setattr(check, "embed_dataset", never)
    named = breaks(site_copy)
    _, model_dir = model_bundle
    result = CliRunner().invoke(cli, ["data", "check", "--data", str(site_copy),
                                      "--model", str(model_dir)])
    assert result.exit_code == 1, result.output
    assert named in _error_line(result.stderr) and "Traceback" not in result.output


def test_model_without_weights_is_one_line(site_copy: Path, model_bundle, tmp_path: Path) -> None:
    _, model_dir = model_bundle
    broken = tmp_path / "model"
    shutil.copytree(model_dir, broken)
    (broken / "text_tower" / "model.safetensors").unlink()
    result = CliRunner().invoke(cli, ["data", "check", "--data", str(site_copy),
                                      "--model", str(broken)])
    assert result.exit_code == 1
    line = _error_line(result.stderr)
    assert "text_tower" in line and "safetensors" in line, line


def test_model_loading_prints_no_transformers_bars(site_copy: Path, model_bundle) -> None:
    """A real process without HF_HUB_DISABLE_PROGRESS_BARS (make sets it): loading the model
    prints no "Loading weights" bar, only the one error line of the broken dataset."""
    _truncated(site_copy)
    _, model_dir = model_bundle
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}
    proc = subprocess.run([sys.executable, "-m", "secfed.cli.main", "data", "check", "--data",
                           str(site_copy), "--model", str(model_dir)], capture_output=True,
                          text=True, timeout=300, env={**env, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Loading weights" not in proc.stderr
    assert "cannot be decoded" in _error_line(proc.stderr)


def test_data_check_shows_its_steps_and_records_embedded(federation, model_bundle,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Plain progress lines (as off a terminal): model, records, then the towers' embedding
    counted in records."""
    import io

    import secfed.data.quality.check as check
    from secfed import progress
    from secfed.data.quality.embed import _tower_outputs

    class Stop(Exception):
        pass

    def embedded_here(model, dataset, **kwargs):
        _tower_outputs(model, dataset, batch_size=16)
        raise Stop

    monkeypatch.delenv(progress.ENV, raising=False)
    monkeypatch.setattr(check, "embed_dataset", embedded_here)
    out = io.StringIO()
    progress.configure("plain", stream=out)
    try:
        with pytest.raises(Stop):
            check.check_dataset(federation.enterprises[SITE], model_dir=model_bundle[1])
    finally:
        progress.configure("auto")
    lines = out.getvalue().splitlines()
    assert lines[0] == "secfed: data check: loading the model: started"
    assert lines[1].startswith("secfed: data check: loading the model: done, ")
    assert lines[2] == "secfed: data check: reading the records and decoding their images: started"
    n = len([ln for ln in (federation.enterprises[SITE] / "records.jsonl").read_text().splitlines()
             if ln.strip()])
    towers = "secfed: data check: the model's towers embed each record"
    assert f"{towers} ({n}): started" in lines
    assert any(ln.startswith(f"{towers}: done, {n}/{n} in ") for ln in lines), lines
