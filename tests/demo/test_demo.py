"""The demo end to end, shortened: outputs, refused attacks, isolation, the baselines on the
test split, determinism under a CPU hog, --repeats, --scenario continual, --nproc 2.

Seventeen epochs are enough for the controller to see a plateau and germinate a seed (with seed
0, fc2[0] at the epoch-13 boundary; it is grafting by the last epoch), so the whole command path
runs: Urza fetch and verification, the kernel cache, the gates, isolated training, and the
adversary's refusals.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import resource
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from cryptography.hazmat.primitives import serialization

from kasmina.cli import main as cli
from kasmina.demo import loop as demo_loop
from kasmina.demo import models as demo_models
from kasmina.demo import run as demo_run
from kasmina.demo.config import COMMAND_KEY, DemoConfig
from kasmina.demo.controller import (
    ADVANCE,
    CULL,
    PlateauController,
    SeedView,
    views_from_state,
)
from kasmina.demo.data import Digits, accuracy_and_loss
from kasmina.demo.loop import DemoLoop
from kasmina.demo.models import HostMLP, graft_slots, plain_parameters
from kasmina.demo.report import CONTINUAL_METHODS, ContinualResult, DemoResult, EpochRecord
from kasmina.demo.run import prepare, run_demo_cli, run_one
from kasmina.leyline import SystemStatePacket
from kasmina.manager.slots import SlotRegistry
from kasmina.stages import SeedStage
from kasmina.urza.keys import PublisherKey
from kasmina.utils.keyring import Keyring

SHORT = {"epochs": 17, "num_seeds": 2, "teacher_epochs": 4, "progress": False}
TINY = {"epochs": 3, "teacher_epochs": 1, "progress": False, "measure_targets": False}


@pytest.fixture(scope="module")
def short_run(tmp_path_factory) -> tuple[Path, DemoResult]:
    out = tmp_path_factory.mktemp("demo") / "out"
    assert run_demo_cli(DemoConfig(out_dir=out, **SHORT)) == 0
    return out, DemoResult.from_json(json.loads((out / "result.json").read_text()))


def test_outputs_are_written(short_run, capsys) -> None:
    out, result = short_run
    report = (out / "report.txt").read_text()
    for heading in ("Test accuracy", "Seed timelines", "Commands", "Kernel cache", "isolation"):
        assert heading in report
    assert (out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert stat.S_IMODE((out / "keys.json").stat().st_mode) == 0o600
    assert stat.S_IMODE((out / "publisher.key").stat().st_mode) == 0o600
    events = [json.loads(line) for line in (out / "telemetry.jsonl").read_text().splitlines()]
    names = {m["name"] for e in events for m in e["metrics"]}
    assert {"command.ack", "command.rejected", "lifecycle.transition"} <= names
    assert len(result.epochs) == SHORT["epochs"]
    assert list((out / "runs").glob("*/nonces.log"))  # the run's ledger too is under --out


def test_the_published_store_verifies_with_the_written_keys(short_run, capsys) -> None:
    out, result = short_run
    store = str(out / "urza")
    publishers = str(out / "publishers.json")
    assert cli.main(["urza", "verify", "--store", store, "--publishers", publishers]) == 0
    listed = capsys.readouterr().out
    assert all(f"ok     {a}" in listed for ids in result.artifacts.values() for a in ids)
    # The trainers' side holds only the publisher's public key; the command keyring cannot
    # stand in for it.
    assert json.loads((out / "publishers.json").read_text()).keys() == {"urza-publisher"}
    assert "PRIVATE" not in (out / "publishers.json").read_text()
    assert cli.main(["urza", "verify", "--store", store, "--keys", str(out / "keys.json")]) == 1
    assert "no longer signs or verifies artifacts" in capsys.readouterr().err


def test_trainers_are_given_only_the_publishers_public_key(tmp_path) -> None:
    out = tmp_path / "out"
    prepared = prepare(DemoConfig(out_dir=out, **{**SHORT, "num_seeds": 1}))
    key = PublisherKey.from_file(out / "publisher.key")  # refuses anything but mode 0600
    assert prepared["publishers"] == {"urza-publisher": key.public_key_text}
    assert set(prepared["keys"]) == {"tamiyo"}  # the command key, and no publisher secret
    private = key._private.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    shared = json.dumps(prepared)  # what every rank receives
    for secret in (private.hex(), base64.b64encode(private).decode(), "PRIVATE KEY"):
        assert secret not in shared
    assert json.loads((out / "publishers.json").read_text()) == prepared["publishers"]


def test_commands_are_authenticated_and_attacks_refused(short_run) -> None:
    _, result = short_run
    assert result.adversarial == {
        "forged": [False],
        "stale": [False],
        "replayed": [False],
        "tampered": [False],
    }
    cmd = result.commands
    assert cmd["rejected"] == 4
    assert cmd["rejected:bad_signature"] == 2  # the forgery and the tampered copy
    assert cmd["rejected:replay"] == 1 and cmd["rejected:stale"] == 1
    assert cmd["accepted"] == cmd["executed"] + cmd["failed"] >= 3


def test_a_seed_was_grown_through_urza_in_isolation(short_run) -> None:
    _, result = short_run
    assert result.decisions[0][1:] == ("fc2[0]", "germinate: plateau")
    assert result.artifacts["fc2[0]"][0].startswith("residual-mlp-")
    stages = [stage for _, stage in result.timelines["fc2[0]"]]
    assert stages[:3] == ["ISOLATED_INIT", "COMPATIBILITY_CHECK", "GRAFTING"]
    assert result.cache["misses"] == 1
    assert result.isolation["seed_steps"] > 0 and result.isolation["violations"] == 0
    assert result.epochs[-1].alphas["fc2[0]"] > 0  # grafting has begun
    assert result.distributed == {"syncs": SHORT["epochs"], "divergences": 0}
    assert 0.5 < result.baseline_test_acc < 1 and 0.8 < result.teacher_test_acc <= 1


def test_the_plot_puts_each_stage_change_on_the_boundary_the_timeline_names(
    short_run, tmp_path, monkeypatch
) -> None:
    import matplotlib.pyplot as plt
    from matplotlib import cbook

    from kasmina.demo.report import plot
    from kasmina.stages import SeedStage

    _, result = short_run
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    plot(result, tmp_path / "p.png")
    ax_stage = figures[0].axes[2]
    checked = 0
    for line in ax_stage.get_lines():
        seed_id = line.get_label()
        xs, ys = cbook.STEP_LOOKUP_MAP[line.get_drawstyle()](*line.get_data())

        def value_at(x: float, xs=xs, ys=ys, seed_id=seed_id) -> float:
            for i in range(len(xs) - 1):
                if ys[i] == ys[i + 1] and xs[i] <= x <= xs[i + 1]:
                    return float(ys[i])
            raise AssertionError(f"{seed_id}: no stage drawn at x={x}")

        timeline = result.timelines[seed_id]
        for n, (epoch, stage) in enumerate(timeline):
            overwritten = n + 1 < len(timeline) and timeline[n + 1][0] == epoch
            if overwritten or epoch + 1 >= len(result.epochs):
                continue  # left at the same boundary, or entered after the last epoch
            # Just after the boundary the new stage is drawn; just before it, the old one.
            assert value_at(epoch + 0.75) == SeedStage[stage].value, (seed_id, epoch, stage)
            assert value_at(epoch + 0.25) != SeedStage[stage].value, (seed_id, epoch, stage)
            checked += 1
    assert checked >= 3  # fc2[0]: ISOLATED_INIT, COMPATIBILITY_CHECK, GRAFTING


def test_the_report_has_the_three_baselines_on_the_test_split(short_run) -> None:
    out, result = short_run
    report = (out / "report.txt").read_text()
    assert "every model on the same held-out test split" in report
    for row in ("teacher", "not a competitor", "never-grown host", "grown host", "static"):
        assert row in report
    assert "grown minus never-grown" in report and "grown minus static" in report
    # The static net has the grown model's parameter count, to within a few parameters.
    grown = result.grown_model_parameters
    assert grown > result.host_parameters  # fc2[0] is blending in at the end
    assert result.static_parameters == plain_parameters(tuple(result.static_widths))
    assert abs(result.static_parameters - grown) <= 0.02 * grown
    assert 0.5 < result.static_test_acc <= 1
    # Test curves for all three, one point per epoch; "before growth" is the grown host's own
    # test accuracy at the boundary of the first germination (not a minimum of the curve).
    epochs = SHORT["epochs"]
    assert len(result.baseline_curve) == len(result.static_curve) == epochs
    assert result.baseline_curve[-1] == result.baseline_test_acc
    assert result.static_curve[-1] == result.static_test_acc
    assert result.epochs[-1].test_acc == result.acc_after_growth
    assert result.first_germination_epoch == 13
    assert result.acc_before_growth == result.epochs[13].test_acc
    # Timings are reported but kept out of the reproducible fingerprint.
    assert "validate_performance_targets" in report and result.targets
    assert "targets" not in result.fingerprint() and "wall_s" not in result.fingerprint()
    # What the report says of the run is what this run did: no head seed distilled here, one
    # rank compared nothing, and the targets were timed on the threads this process had.
    assert result.kd_steps == 0 and "distilled into" not in report
    assert "one rank: nothing to broadcast or compare" in report
    threads = next(iter(result.targets.values()))["threads"]
    assert f"timed here on {threads} CPU thread" in report


def test_the_controller_reads_the_managers_state_packet() -> None:
    packet = SystemStatePacket(
        current_epoch=7,
        validation_accuracy=0.5,
        seed_stages={"a[0]": 4, "a[1]": 3, "b[0]": 0},
        training_metrics={
            "seed/a[0]/epochs_in_stage": 2.0,
            "seed/a[0]/benefit": 0.25,
            "seed/a[0]/evaluated_stage": 4.0,
            "seed/a[0]/metric_with": 0.6,
            "seed/a[0]/metric_without": 0.7,
            "seed/a[1]/benefit": 0.5,  # measured while grafting: not STABILIZATION's evidence
            "seed/a[1]/evaluated_stage": 3.0,
        },
    )
    views = views_from_state(packet)
    assert list(views) == ["a[0]", "a[1]", "b[0]"]
    assert views["a[0]"].stage == SeedStage.STABILIZATION and views["a[0]"].epochs_in_stage == 2
    assert views["a[0]"].help == pytest.approx(0.25)
    assert views["a[0]"].metric_with == pytest.approx(0.6)
    assert views["a[0]"].metric_without == pytest.approx(0.7)
    assert views["a[1]"].metric_with is None and views["b[0]"].metric_without is None
    assert views["a[1]"].stage == SeedStage.GRAFTING and views["a[1]"].help is None
    assert views["b[0]"].stage == SeedStage.DORMANT
    packet.seed_stages["c[0]"] = 11  # a newer trainer's stage: left out, not a crash
    assert list(views_from_state(packet)) == ["a[0]", "a[1]", "b[0]"]


def test_the_controller_culls_a_seed_that_cuts_the_loss_but_costs_accuracy() -> None:
    keyring = Keyring({COMMAND_KEY: b"k" * 32})
    controller = PlateauController(keyring, COMMAND_KEY, [], warmup=99, settle_epochs=0)
    stab = SeedStage.STABILIZATION
    seeds = {
        "costly": SeedView(stab, 2, help=0.375, metric_with=0.268, metric_without=0.485),
        "good": SeedView(stab, 2, help=0.06, metric_with=0.91, metric_without=0.90),
        "no-metric": SeedView(stab, 2, help=0.06),
    }
    assert len(controller.observe(5, 0.5, seeds)) == 3
    reasons = {d.seed_id: (d.operation, d.reason) for d in controller.decisions}
    assert reasons["costly"] == (
        CULL,
        "cull: val loss -37.5% with it, val acc 26.8% (without: 48.5%)",
    )
    assert reasons["good"][0] == ADVANCE and reasons["good"][1].startswith("fossilize:")
    assert reasons["no-metric"] == (ADVANCE, "fossilize: val loss -6.0% with it")


def test_the_controller_culls_an_unmeasured_or_quarantined_seed() -> None:
    """A NaN help (the seed faulted while measured, which G5 refuses) compared as neither too
    little nor a cost: the controller sent ADVANCE every epoch and the seed held its slot for
    ever; a quarantined seed was never culled, its kernel pinned and its slot never regrown."""
    keyring = Keyring({COMMAND_KEY: b"k" * 32})
    controller = PlateauController(keyring, COMMAND_KEY, [], warmup=99, settle_epochs=0)
    stab, nan = SeedStage.STABILIZATION, float("nan")
    seeds = {
        "unmeasured": SeedView(stab, 2, help=nan, metric_with=nan, metric_without=nan),
        "nan-metric": SeedView(stab, 2, help=0.06, metric_with=nan, metric_without=0.9),
        "quarantined": SeedView(SeedStage.QUARANTINE, 0),
    }
    assert len(controller.observe(5, 0.5, seeds)) == 3
    assert {d.seed_id: d.operation for d in controller.decisions} == dict.fromkeys(seeds, CULL)


def test_the_demo_measures_accuracy_for_g5(short_run) -> None:
    out, _ = short_run
    events = [json.loads(line) for line in (out / "telemetry.jsonl").read_text().splitlines()]
    metrics = [m for e in events for m in e["metrics"]]
    measured = [m for m in metrics if m["name"] == "seed.benefit" and "loss_with" in m["labels"]]
    assert measured and all("metric_with" in m["labels"] for m in measured)
    assert any(m["name"] == "seed.metric_with" for m in metrics)  # the periodic gauges too


def _cpu_hogs(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def test_a_fixed_seed_reproduces_the_run_under_a_cpu_hog(short_run, tmp_path) -> None:
    _, first = short_run
    hogs = _cpu_hogs(2)  # both cores of the test machine busy while the second run trains
    try:
        again = run_one(DemoConfig(out_dir=tmp_path / "again", **SHORT))
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    assert again.fingerprint() == first.fingerprint()


def test_repeats_report_mean_sd_and_paired_gains(tmp_path, capsys) -> None:
    cfg = DemoConfig(out_dir=tmp_path / "rep", repeats=2, seed=3, **TINY)
    assert run_demo_cli(cfg) == 0
    printed = capsys.readouterr().out
    report = (cfg.out_dir / "report.txt").read_text()
    assert report.strip() in printed
    assert "2 runs, rng seeds 3..4" in report and "± " in report
    for row in ("teacher (not a competitor)", "never-grown host", "grown host", "static"):
        assert row in report
    assert "grown - never-grown" in report and "grown - static same-size" in report
    summary = json.loads((cfg.out_dir / "result.json").read_text())
    assert summary["summary"]["seeds"] == [3, 4]
    runs = [DemoResult.from_json(r) for r in summary["runs"]]
    assert [r.seed for r in runs] == [3, 4]
    gain = summary["summary"]["paired"]["grown - never-grown"]
    assert gain["values"] == [r.acc_after_growth - r.baseline_test_acc for r in runs]
    for seed in (3, 4):
        assert (cfg.out_dir / f"seed-{seed}" / "report.txt").is_file()
        assert (cfg.out_dir / f"seed-{seed}" / "demo.png").is_file()


def test_repeats_and_continual_refuse_several_processes(tmp_path) -> None:
    with pytest.raises(ValueError, match="one process"):
        DemoConfig(out_dir=tmp_path, repeats=2, nproc=2).validate()
    with pytest.raises(ValueError, match="one process"):
        DemoConfig(out_dir=tmp_path, scenario="continual", nproc=2).validate()
    with pytest.raises(ValueError, match="--scenario"):
        DemoConfig(out_dir=tmp_path, scenario="other").validate()


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"device": "meta"}, "--device 'meta' is not supported by the demo"),
        ({"device": "mps"}, "--device 'mps' is not supported"),
        ({"device": "xpu"}, "--device 'xpu' is not supported"),
        ({"device": "gpu0"}, "unknown device 'gpu0'"),
        ({"device": "cuda:99"}, "--device 'cuda:99'"),  # no machine here has 100 GPUs
        ({"device": "cpu:1"}, "--device 'cpu:1': the CPU is one device"),
        ({"seed": 2**32}, "--seed 4294967296"),
        ({"seed": -1}, "--seed -1"),
        ({"seed": 2**32 - 1, "repeats": 2}, "with --repeats 2"),
    ],
)
def test_a_bad_device_or_seed_is_refused_before_anything_is_written(
    tmp_path, changes, fragment
) -> None:
    """meta, mps and xpu passed validation and failed half-way, as did a seed torch could not
    take: a traceback and keys, a store and a marker left in --out."""
    cfg = DemoConfig(out_dir=tmp_path / "out", **{**TINY, **changes})
    with pytest.raises(ValueError, match=re.escape(fragment)):
        run_demo_cli(cfg)
    assert not (tmp_path / "out").exists()
    replace(cfg, seed=2**32 - 1, repeats=1, device="cpu").validate()  # the bounds themselves


def test_scoring_the_test_split_leaves_g3_the_validation_probe() -> None:
    """G3 decides on a seed's last COMPATIBILITY_CHECK probe: the report's test-split forward
    (``DemoLoop.record``) must not replace the one the validation forward left."""
    torch.manual_seed(0)
    model = HostMLP()
    slots = graft_slots(model, None, 2)
    registry = SlotRegistry(model, slots)
    seed = slots[1].seeds[0]
    seed.attach_kernel(torch.nn.Identity())
    seed.transition_to(SeedStage.ISOLATED_INIT)
    seed.transition_to(SeedStage.COMPATIBILITY_CHECK)
    split = torch.arange(12).split(4)
    data = Digits(torch.rand(12, 64), torch.arange(12) % 10, *split)
    accuracy_and_loss(model, data, data.val)
    probe = seed.probe_result
    assert probe is not None
    loop = SimpleNamespace(
        manager=SimpleNamespace(registry=registry),
        data=data,
        model=model,
        cfg=SimpleNamespace(scenario="standard"),
    )
    record = DemoLoop.record(loop, 1, [0.5], 0.25)  # type: ignore[arg-type]
    assert seed.probe_result is probe
    assert record.test_acc == accuracy_and_loss(model, data, data.test)[0]


def test_the_continual_scenario_protects_the_host_and_scores_every_method(
    tmp_path, monkeypatch
) -> None:
    drawn: dict[str, list[tuple[int, int]]] = {"kasmina": [], "plain": []}

    def spy(name: str, draw: Any) -> Any:
        def batches(data: Digits, epoch: int, *args: Any) -> Any:
            drawn[name].append((id(data.train), epoch))
            return draw(data, epoch, *args)

        return batches

    monkeypatch.setattr(demo_loop, "batches", spy("kasmina", demo_loop.batches))
    monkeypatch.setattr(demo_models, "batches", spy("plain", demo_models.batches))
    cfg = DemoConfig(
        out_dir=tmp_path / "cont",
        scenario="continual",
        **{**TINY, "epochs": 8},
        phase1_epochs=6,
        num_seeds=2,
        replay=3,
    )
    assert run_demo_cli(cfg) == 0
    result = ContinualResult.from_json(json.loads((cfg.out_dir / "result.json").read_text()))
    report = (cfg.out_dir / "report.txt").read_text()
    kasmina, tuned, static, phase1 = CONTINUAL_METHODS
    for method in CONTINUAL_METHODS:
        assert method in report
        assert set(result.accuracy[method]) == {"old", "new", "all"}
    assert "forgetting" in report and "bit-identical to phase 1" in report
    assert result.host_unchanged
    assert result.accuracy[phase1]["new"] < 0.05  # the host never saw a new class
    assert result.accuracy[phase1]["old"] > 0.5
    assert result.forgetting(tuned) > 0  # fine-tuning on the new classes costs old ones
    # The same data and the same total steps: the phase-2 set is the new classes plus the
    # replayed digits, and the static net trains as many steps as both phases together.
    assert result.train_sizes["replay"] == 15
    assert result.steps["static"] == result.steps["phase1"] + result.steps["phase2"]
    assert abs(result.parameters["static"] - result.parameters["grown"]) <= 20
    growth = result.growth
    assert growth.decisions[0] == (0, "head[1]", "germinate: new classes")
    assert growth.isolation["violations"] == 0 and growth.isolation["seed_steps"] > 0
    assert [r.epoch for r in growth.epochs] == list(range(cfg.epochs + 1))
    assert len(result.fine_tune_curve) == cfg.epochs + 1
    # Fine-tuning trains on the same phase-2 batches as Kasmina, in the same order.
    phase2 = {train for train, _ in drawn["kasmina"]}
    assert [d for d in drawn["plain"] if d[0] in phase2] == drawn["kasmina"]
    assert [epoch for _, epoch in drawn["kasmina"]] == list(range(cfg.epochs))
    # A second run with the same seed reproduces it.
    again = run_one(replace(cfg, out_dir=tmp_path / "again"))
    assert isinstance(again, ContinualResult)
    assert again.fingerprint() == result.fingerprint()


def test_a_rerun_into_its_output_directory_clears_the_earlier_runs(tmp_path) -> None:
    """Each run's manager makes its own run directory (nonce ledger, lock) under ``runs/``: a
    demo rerun into the same ``--out`` clears them with the store and checkpoints, so reruns do
    not pile them up."""
    cfg = DemoConfig(out_dir=tmp_path, epochs=1, progress=False)
    prepare(cfg)
    earlier = tmp_path / "runs" / "run-earlier"
    earlier.mkdir(parents=True)
    (earlier / "nonces.log").write_text("")
    # An earlier run's report, results and repeats: left beside this run's keys, they
    # described another run (another seed) as this one's.
    stale = ["report.txt", "result.json", "demo.png", "telemetry.jsonl", "telemetry.jsonl.1"]
    for name in [*stale, "telemetry.rank1.jsonl"]:
        (tmp_path / name).write_text("an earlier run's")
    (tmp_path / "seed-7").mkdir()
    (tmp_path / "seed-7" / "report.txt").write_text("an earlier repeat's")
    prepare(cfg)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "seed-7").exists()
    assert not [name for name in stale if (tmp_path / name).exists()]
    assert not (tmp_path / "telemetry.rank1.jsonl").exists()


def test_a_second_demo_into_the_same_output_directory_at_once_is_refused(tmp_path) -> None:
    """Two demos into one --out: the second cleared the first's store and keys under it, and
    both reported success."""
    from kasmina.demo.run import _output_locked

    cfg = DemoConfig(out_dir=tmp_path / "out", epochs=1, progress=False)
    with _output_locked(cfg.out_dir), pytest.raises(ValueError, match="in use by another demo"):
        run_demo_cli(cfg)
    assert [p.name for p in cfg.out_dir.iterdir()] == [".kasmina-demo.lock"]


def test_repeats_under_torchrun_are_refused_before_anything_is_written(
    tmp_path, monkeypatch
) -> None:
    """Under torchrun every rank ran the whole --repeats loop into one --out, and they
    collided; --nproc 2 --repeats 2 was refused in one line."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    cfg = DemoConfig(out_dir=tmp_path / "out", epochs=1, repeats=2, progress=False)
    with pytest.raises(ValueError, match="--repeats"):
        run_demo_cli(cfg)
    assert not cfg.out_dir.exists()


def test_the_demo_refuses_a_foreign_output_directory(tmp_path, capsys) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    assert cli.main(["demo", "--out", str(tmp_path), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("kasmina: error: --out") and "did not create" in err
    assert (tmp_path / "precious.txt").read_text() == "keep me"
    with pytest.raises(SystemExit) as usage:  # argparse's usage error, as for --seeds 0
        cli.main(["demo", "--out", str(tmp_path / "x"), "--seeds", "9"])
    assert usage.value.code == 2
    assert "argument --seeds: expected 1 to 6, got 9" in capsys.readouterr().err


def test_a_finished_run_prints_an_out_path_that_is_not_utf8(tmp_path, monkeypatch) -> None:
    """A --out byte that is not UTF-8 is printed as its escape on a strict UTF-8 stdout (the
    final "wrote ..." line raised UnicodeEncodeError, and a run that had written every file
    exited 1)."""
    monkeypatch.setattr(demo_run, "run_one", lambda cfg: SimpleNamespace())
    monkeypatch.setattr(demo_run, "_write", lambda result, out: "the report")
    monkeypatch.setattr(demo_run, "_plot", lambda result, out: None)
    buf = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(buf, encoding="utf-8", errors="strict"))
    out = tmp_path / os.fsdecode(b"demo\xff")
    assert demo_run._run_cli(DemoConfig(out_dir=out, **TINY)) == 0
    printed = buf.getvalue().decode()
    assert printed.startswith("the report\n") and f"{tmp_path}/demo\\udcff/report.txt" in printed


def test_a_run_started_without_stdout_writes_every_file(tmp_path, monkeypatch) -> None:
    """A demo started with its stdout closed (``>&-``: ``sys.stdout`` is None) wrote its report,
    then failed printing it (AttributeError), and demo.png was never drawn."""
    plotted = []
    monkeypatch.setattr(demo_run, "run_one", lambda cfg: SimpleNamespace())
    monkeypatch.setattr(demo_run, "_write", lambda result, out: "the report")
    monkeypatch.setattr(demo_run, "_plot", lambda result, out: plotted.append(out))
    monkeypatch.setattr(sys, "stdout", None)
    out = tmp_path / "out"
    assert demo_run._run_cli(DemoConfig(out_dir=out, **TINY)) == 0
    assert plotted == [out]


def test_the_report_is_written_and_printed_before_the_plot(tmp_path, monkeypatch, capsys) -> None:
    """A plot that fails loses neither report.txt nor the printed report (the plot came first,
    and a run without matplotlib, trained to the end, lost both)."""

    def no_plot(result: Any, path: Path) -> None:
        raise RuntimeError("no plot")

    result = SimpleNamespace(to_json=lambda: {"fake": 1})
    monkeypatch.setattr(demo_run, "run_one", lambda cfg: result)
    monkeypatch.setattr(demo_run, "format_report", lambda result: "the report")
    monkeypatch.setattr(demo_run, "plot", no_plot)
    out = tmp_path / "out"
    out.mkdir()  # run_one's prepare() makes it
    with pytest.raises(RuntimeError, match="no plot"):
        demo_run._run_cli(DemoConfig(out_dir=out, **TINY))
    assert (out / "report.txt").read_text() == "the report\n"
    assert capsys.readouterr().out == "the report\n"


@contextmanager
def files_cut_at(limit: int) -> Iterator[None]:
    """While inside, a write past ``limit`` bytes of any file fails (EFBIG), as on a full disk."""
    before = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the signal ends the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, before[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, before)
        signal.signal(signal.SIGXFSZ, handler)


def test_an_output_cut_short_leaves_no_partial_file(tmp_path, monkeypatch) -> None:
    """A report, result or plot whose write failed part way (a full disk) was left behind,
    empty or truncated, beside the error: each is written whole or not at all."""
    monkeypatch.setattr(demo_run, "format_report", lambda result: "x" * 10_000)
    small, large = ({"n": 1}, {"n": "y" * 10_000})
    for name, data in (("report", small), ("result", large)):  # result.json first, then report
        (tmp_path / name).mkdir()
        with files_cut_at(100), pytest.raises(OSError):
            demo_run._write(SimpleNamespace(to_json=lambda data=data: data), tmp_path / name)
    assert [p.name for p in (tmp_path / "report").iterdir()] == ["result.json"]
    assert not any((tmp_path / "result").iterdir())

    records = [EpochRecord(e, 1.0 - e / 10, 0.5, test_acc=0.5) for e in range(3)]
    result = DemoResult(0, 1, 0.9, 0.5, 0.5, 0.6, records, {}, {}, [], {}, {}, {}, {}, 0, {}, 0, 9)
    demo_run._plot(result, tmp_path / "warm")  # matplotlib's caches, written before the limit
    (tmp_path / "plot").mkdir()
    with files_cut_at(100), pytest.raises(OSError):
        demo_run._plot(result, tmp_path / "plot")
    assert not any((tmp_path / "plot").iterdir())


def test_cli_defaults_match_the_demo_config() -> None:
    args = cli.build_parser().parse_args(["demo"])
    defaults = DemoConfig()
    assert (
        args.epochs,
        args.seeds,
        args.device,
        args.seed,
        args.nproc,
        args.repeats,
        args.scenario,
        args.replay,
    ) == (
        defaults.epochs,
        defaults.num_seeds,
        defaults.device,
        defaults.seed,
        defaults.nproc,
        defaults.repeats,
        defaults.scenario,
        defaults.replay,
    )


def test_two_gloo_ranks_run_the_demo_in_lockstep(tmp_path) -> None:
    cfg = DemoConfig(out_dir=tmp_path, epochs=3, teacher_epochs=1, nproc=2, progress=False)
    assert run_demo_cli(cfg) == 0
    result = DemoResult.from_json(json.loads((tmp_path / "result.json").read_text()))
    assert result.world_size == 2
    assert result.distributed == {"syncs": 3, "divergences": 0}
    assert result.adversarial["forged"] == [False] and result.adversarial["stale"] == [False]
    assert (tmp_path / "telemetry.rank1.jsonl").stat().st_size > 0


def test_torchrun_launches_the_demo_as_two_ranks(tmp_path) -> None:
    root = Path(cli.__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    argv = ["--out", str(tmp_path), "--epochs", "2", "--no-progress"]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
        + ["-m", "kasmina", "demo", *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("Kasmina demo:") == 1  # only rank 0 reports
    result = DemoResult.from_json(json.loads((tmp_path / "result.json").read_text()))
    assert result.world_size == 2 and result.distributed == {"syncs": 2, "divergences": 0}
    assert (tmp_path / "telemetry.rank1.jsonl").stat().st_size > 0
