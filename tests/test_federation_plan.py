"""secfed.federation: a pydantic plan writes the kits, and `federation init` takes its option
defaults from the config models (one place for every default)."""

from __future__ import annotations

import pytest

from secfed.config import (
    Deadlines,
    DistributedDPSettings,
    DPSettings,
    FederationConfig,
    ModelSettings,
    default_of,
    load_federation,
    validated,
)
from secfed.errors import ConfigError
from secfed.federation.plan import make_plan, model_settings_for, plan_federation


def test_plan_writes_kits_that_pin_its_settings(tmp_path) -> None:
    dp = validated(DPSettings, sample_rate=0.1, local_steps=3, noise_multiplier=1.3)
    plan = make_plan(name="plan-test", coordinator_url="https://127.0.0.1:8443",
                     model=model_settings_for(model_dir=None, synthetic_dim=32),
                     mode_schedule=("secagg", "secagg+"), rounds=3, dp=dp,
                     deadlines=validated(Deadlines, train=30.0, stage=5.0))
    paths = plan_federation(plan, tmp_path / "kits", enterprises=["a-site", "b-site", "c-site"])
    for folder in (paths.coordinator, *paths.enterprises.values()):
        fed = load_federation(folder / "federation.toml")
        assert fed.name == "plan-test" and fed.rounds == 3
        assert tuple(fed.mode_schedule) == ("secagg", "secagg+")
        assert fed.dp.model_dump(exclude={"noise_multiplier"}) == dp.model_dump(exclude={"noise_multiplier"})
        assert fed.dp.noise_multiplier == 1.3
        # the ring is chosen for the roster when the kits are written (headroom for 3 sums)
        assert fed.model.model_dump(exclude={"ring_bits"}) == plan.model.model_dump(exclude={"ring_bits"})
        assert (fed.deadlines.train, fed.deadlines.stage) == (30.0, 5.0)
        assert fed.enterprise_ids() == ("a-site", "b-site", "c-site")


def test_bad_plan_is_one_config_error() -> None:
    with pytest.raises(ConfigError, match="rounds"):
        make_plan(name="x", coordinator_url="https://127.0.0.1:1",
                  model=model_settings_for(model_dir=None, synthetic_dim=4), rounds="many")
    with pytest.raises(ConfigError, match="exactly one of --model and --synthetic-dim"):
        model_settings_for(model_dir=None, synthetic_dim=None)


@pytest.mark.parametrize(("option", "model", "field"), [
    ("rounds", FederationConfig, "rounds"),
    ("target_epsilon", DPSettings, "target_epsilon"),
    ("delta", DPSettings, "delta"),
    ("sample_rate", DPSettings, "sample_rate"),
    ("local_steps", DPSettings, "local_steps"),
    ("learning_rate", DPSettings, "learning_rate"),
    ("max_grad_norm", DPSettings, "max_grad_norm"),
    ("optimizer", DPSettings, "optimizer"),
    ("lr_schedule", DPSettings, "lr_schedule"),
    ("trainable", ModelSettings, "trainable"),
    ("train_deadline", Deadlines, "train"),
    ("stage_deadline", Deadlines, "stage"),
])
def test_init_option_defaults_are_the_config_defaults(option, model, field) -> None:
    from secfed.cli.federation import init

    params = {p.name: p for p in init.params}
    assert params[option].default == default_of(model, field)


def test_init_help_states_the_config_defaults() -> None:
    from click.testing import CliRunner

    from secfed.cli.main import cli

    text = " ".join(CliRunner().invoke(cli, ["federation", "init", "--help"]).output.split())
    assert f"(default {default_of(ModelSettings, 'clip_bound'):g})" in text
    assert f"[default: {default_of(DistributedDPSettings, 'min_participants')}]" in text
    assert "[default: " + ",".join(default_of(FederationConfig, "mode_schedule")) + "]" in text
