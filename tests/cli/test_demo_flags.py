"""The demo's flags: an invalid one is refused before anything runs or is written, and the
error names only the flag at fault; so is a run whose optional dependencies are missing."""

from __future__ import annotations

import sys

import pytest

from kasmina.demo.config import DemoConfig
from tests.cli.helpers import assert_one_line_error, run


@pytest.mark.parametrize("scenario", [(), ("--scenario", "standard")])
def test_replay_outside_the_continual_scenario_is_one_line_error(
    tmp_path, capsys, scenario
) -> None:
    """--replay was silently ignored by the standard scenario (exit 0, the flag dropped)."""
    out = tmp_path / "out"
    rc, _, err = run(capsys, "demo", *scenario, "--replay", "5", "--out", str(out))
    assert_one_line_error(rc, err, "--replay 5", "--scenario continual")
    assert not out.exists()


@pytest.mark.parametrize("value", ["-1", "-20"])
def test_a_negative_replay_is_a_usage_error_naming_only_replay(tmp_path, capsys, value) -> None:
    """--replay -1 got an exit 1 naming --repeats and the phase-1 epochs, flags never given;
    like --repeats and --seeds it is now refused by argparse: usage, exit 2."""
    out = tmp_path / "out"
    rc, _, err = run(
        capsys, "demo", "--scenario", "continual", "--replay", value, "--out", str(out)
    )
    assert rc == 2
    assert err.startswith("usage: kasmina demo")
    assert f"argument --replay: expected 0 or more, got {value}" in err
    assert "--repeats" not in err.splitlines()[-1] and "phase-1" not in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"epochs": 0}, "--epochs must be positive, got 0"),
        ({"nproc": 0}, "--nproc must be positive, got 0"),
        ({"repeats": 0}, "--repeats must be positive, got 0"),
        ({"phase1_epochs": 0}, "phase1_epochs must be positive, got 0"),
        # Not flags: a batch of 0 failed mid-run, one below 0 or a teacher of no epochs ran
        # nothing (exit 0), a rate that is no rate failed after the store was made.
        ({"teacher_epochs": 0}, "teacher_epochs must be positive, got 0"),
        ({"batch_size": 0}, "batch_size must be positive, got 0"),
        ({"batch_size": -8}, "batch_size must be positive, got -8"),
        ({"host_lr": float("nan")}, "host_lr must be finite and > 0, got nan"),
        ({"seed_lr": -1.0}, "seed_lr must be finite and > 0, got -1.0"),
        ({"scenario": "continual", "replay": -1}, "--replay must be 0 or more, got -1"),
        ({"replay": 3}, "--replay 3 applies only to --scenario continual"),
        ({"nproc": 3}, "--nproc 3: the demo's batch of 64 does not split"),  # and what does
    ],
)
def test_each_config_error_names_only_its_own_setting(tmp_path, changes, message) -> None:
    with pytest.raises(ValueError) as info:
        DemoConfig(out_dir=tmp_path, **changes).validate()
    text = str(info.value)
    assert text.startswith(message), text
    others = {"--epochs", "--nproc", "--repeats", "phase1_epochs", "phase-1"} - {message.split()[0]}
    assert not any(flag in text for flag in others), text


def test_replay_in_the_continual_scenario_still_validates(tmp_path) -> None:
    DemoConfig(out_dir=tmp_path, scenario="continual", replay=20).validate()
    DemoConfig(out_dir=tmp_path, replay=0).validate()


def test_an_empty_out_is_refused_not_taken_for_the_current_directory(tmp_path, capsys) -> None:
    """``--out ""`` is ``Path("")``, the current directory: the demo wrote into it if empty."""
    rc, _, err = run(capsys, "demo", "--out", "")
    assert_one_line_error(rc, err, "--out is empty")


def test_seeds_beyond_the_plan_is_a_usage_error(tmp_path, capsys) -> None:
    """--seeds 7 got exit 1 from the config, where --seeds 0 got argparse's usage error (2)."""
    rc, _, err = run(capsys, "demo", "--seeds", "7", "--out", str(tmp_path / "out"))
    assert rc == 2 and "argument --seeds: expected 1 to 6, got 7" in err
    assert not (tmp_path / "out").exists()


def test_a_missing_demo_dependency_is_refused_before_anything_runs(
    tmp_path, capsys, monkeypatch
) -> None:
    """matplotlib is imported only by the plot: without it the demo trained the whole run, then
    exited 1 before writing report.txt. It is now named, with how to install it, up front."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    out = tmp_path / "out"
    argv = ("demo", "--epochs", "1", "--seeds", "1", "--no-progress", "--out", str(out))
    rc, _, err = run(capsys, *argv)
    assert_one_line_error(rc, err, "needs matplotlib,", "pip install 'kasmina[demo]'")
    assert not out.exists()
