"""``secfed data check`` on a folder with a missing, unreadable or broken file: one line naming
it, exit 1, found while loading (before the embedding, the minutes of work); no weight-loading
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
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("secfed: error: "), result.stderr
    assert named in lines[0] and "Traceback" not in result.output


def test_model_without_weights_is_one_line(site_copy: Path, model_bundle, tmp_path: Path) -> None:
    _, model_dir = model_bundle
    broken = tmp_path / "model"
    shutil.copytree(model_dir, broken)
    (broken / "text_tower" / "model.safetensors").unlink()
    result = CliRunner().invoke(cli, ["data", "check", "--data", str(site_copy),
                                      "--model", str(broken)])
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "text_tower" in lines[0] and "safetensors" in lines[0], lines


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
    assert proc.stderr.splitlines() == [proc.stderr.strip()], proc.stderr[-2000:]
