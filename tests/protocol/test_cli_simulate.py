"""``secfed simulate``: exact sums reported, attacks end in a clean non-zero exit."""

from __future__ import annotations

import json

from click.testing import CliRunner

from secfed.cli.main import cli


def _run(*args: str):
    return CliRunner().invoke(cli, ["simulate", *args])


def test_simulate_json_reports_exact_sum_and_costs() -> None:
    res = _run("-n", "10", "-d", "2000", "--drop", "upload:1,2", "--drop", "share:3", "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert report["survivors"] == [0, 4, 5, 6, 7, 8, 9]
    assert report["max_abs_error"] < 10 * 2.0**-24
    assert report["timings_s"]["participant_protect"] > 0
    assert report["timings_s"]["coordinator_unmask"] > 0
    assert 8 * 2000 < report["bytes_per_participant"]["upload"] < 8 * 2000 + 200


def test_simulate_text_output() -> None:
    res = _run("-n", "4", "-d", "100", "--mode", "secagg")
    assert res.exit_code == 0, res.output
    assert "max |error| vs plaintext sum" in res.output and "participant_protect" in res.output


def test_simulate_adversary_aborts_with_exit_1() -> None:
    res = _run("-n", "10", "-d", "100", "--adversary", "substitute-key", "--json")
    assert res.exit_code == 1
    report = json.loads(res.output)
    assert report["aborted"] and report["stage"] == "share"


def test_simulate_bad_drop_is_a_usage_error() -> None:
    res = _run("-n", "4", "--drop", "upload:9")
    assert res.exit_code == 2 and "--drop" in res.output


def test_simulate_roles_report_probes_and_contributions() -> None:
    res = _run("-n", "10", "-d", "5000", "--free-riders", "2", "--attackers", "1",
               "--attack-scale", "10", "--drop", "probe:3", "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    ids = [f"enterprise-{i:04d}" for i in range(10)]
    assert list(report["roles"]) == ids
    assert [report["roles"][p] for p in ids] == ["honest"] * 7 + ["free-rider"] * 2 + ["attacker"]
    assert report["probes"] == 32
    assert report["excluded"] == [ids[9]]
    assert set(report["norm_estimates"]) == set(ids) - {ids[3]}  # 3 dropped before reporting
    assert report["survivors"] == [0, 1, 2, 4, 5, 6, 7, 8]
    assert set(report["contributions"]) == set(report["plaintext_contributions"]) == {
        ids[i] for i in report["survivors"]
    }
    for p, share in report["contributions"].items():
        assert abs(share - report["plaintext_contributions"][p]) < 1e-6
    assert abs(sum(report["contributions"].values()) - 1.0) < 1e-9
    assert max(report["contributions"][ids[7]], report["contributions"][ids[8]]) < 0.02
    assert report["max_abs_error"] < 10 * 2.0**-24


def test_simulate_ckks_with_probes_is_a_usage_error() -> None:
    res = _run("-n", "4", "-d", "100", "--mode", "ckks", "--probes", "32")
    assert res.exit_code == 2 and "ckks rounds carry no verified probes" in res.output
