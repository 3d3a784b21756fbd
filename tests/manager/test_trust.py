"""Trust boundaries of the kernel manager (docs/design.md §5): every door authenticated, replays
refused across restarts, rejection floods reported at a bounded rate, protections that the
configuration cannot switch off."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from kasmina.control.auth import sign_command
from kasmina.control.builders import (
    make_optimizer_command,
    make_rollback_command,
    make_seed_command,
)
from kasmina.control.distributed import DistributedCoordinator
from kasmina.control.handler import LeylineAdaptationHandler
from kasmina.control.ledger import LEDGER_FILE_NAME
from kasmina.isolation.optimizers import IsolatedOptimizerManager
from kasmina.leyline import AdaptationCommand
from kasmina.manager.config import KasminaConfig
from kasmina.manager.manager import KasminaKernelManager
from kasmina.utils.keyring import Keyring, generate_key
from kasmina.utils.telemetry import TelemetryReporter
from tests.manager.helpers import SEED0, Rig, make_config, run_command

ROOT = Path(__file__).resolve().parents[2]

# --- every door authenticated -------------------------------------------------------------------

# Public methods that take a command from outside the trainer's process (bytes or a message):
# each must verify the signature before anything changes, or refuse the input's type.
DOORS: dict[type, set[str]] = {
    KasminaKernelManager: {
        "handle_adaptation_command",
        "handle_leyline_command",
        "handle_optimizer_command",
        "verify_message_auth",
    },
    LeylineAdaptationHandler: {
        "handle_adaptation_command",
        "handle_adaptation_command_async",
        "accept",
        "accept_relayed",
    },
    DistributedCoordinator: {"submit"},
    IsolatedOptimizerManager: {"apply_optimizer_command"},
}
# Everything else is the in-process API: it takes modules, tensors, ids, epochs or a verified
# ``KasminaCommand`` (no parser builds one), and is trusted like the training script it serves.
IN_PROCESS: dict[type, set[str]] = {
    KasminaKernelManager: {
        "apply_pending",
        "attach",
        "backward",
        "cache_kernel",
        "check_gradient_isolation",
        "close",
        "collect_kd_losses",
        "end_epoch",
        "evaluate_seeds",
        "evict_kernel",
        "execute",
        "execute_kernel",
        "export_leyline_telemetry",
        "get_checkpoint_effectiveness",
        "get_performance_metrics",
        "get_teacher_predictions",
        "join_run",
        "load_kernel",
        "load_kernel_with_teacher",
        "load_teacher",
        "measure_dormant_overhead",
        "record_gate_score",
        "register",
        "register_gradient_monitors",
        "require_registry",
        "seed",
        "set_kd_head",
        "set_teacher_logits",
        "stages",
        "step",
        "system_state",
        "track",
        "validate_performance_targets",
    },
    LeylineAdaptationHandler: {"close", "complete", "flush_rejections"},
    DistributedCoordinator: {"drop_pending", "sync_epoch"},
    IsolatedOptimizerManager: {
        "adopt",
        "clip_grad_norm",
        "create_seed_optimizer",
        "follow_parameters",
        "initialize_host",
        "load_state_dict",
        "optimizer",
        "owner_of",
        "parameters",
        "promote_seed",
        "promoted",
        "register_teacher_params",
        "remove_seed",
        "reset_state",
        "set_lr",
        "set_parameter_source",
        "state_dict",
        "step",
        "step_many",
        "take_host_groups",
        "validate_state_dict",
        "zero_grad",
    },
}


@pytest.mark.parametrize("cls", list(DOORS), ids=lambda c: c.__name__)
def test_every_public_method_is_a_door_or_in_process(cls: type) -> None:
    """The audit, kept honest: a new public method fails here until it is classified (and, if
    it is a door, covered by the unsigned-command test below)."""
    public = {
        name
        for name, member in inspect.getmembers(cls, inspect.isfunction)
        if not name.startswith("_")
    }
    unclassified = public - DOORS[cls] - IN_PROCESS[cls]
    assert not unclassified, f"classify {sorted(unclassified)} of {cls.__name__} in this test"
    assert not (DOORS[cls] | IN_PROCESS[cls]) - public  # the lists name no stale method


def _unsigned_commands(keyring: Keyring) -> list[AdaptationCommand]:
    """Each a command that would change something if it were obeyed."""
    forger = Keyring({"ctl": generate_key()})  # the right key id, the wrong key
    forged = sign_command(make_optimizer_command("reset_state", "host"), forger, "ctl")
    return [
        make_seed_command("germinate", SEED0, "mlp-0000000000000000"),
        make_rollback_command(0, emergency=True),
        make_optimizer_command("step", "host", learning_rate=5.0),
        make_optimizer_command("reset_state", "host"),
        forged,
    ]


def _state(manager: KasminaKernelManager) -> dict[str, Any]:
    registry = manager.require_registry()
    optimizers = manager.optimizers
    return {
        "stages": manager.stages(),
        "groups": {
            oid: [(g["lr"], len(g["params"])) for g in optimizers.optimizer(oid).param_groups]
            for oid in optimizers.optimizer_ids
        },
        "moments": {oid: len(optimizers.optimizer(oid).state) for oid in optimizers.optimizer_ids},
        "teacher": optimizers.teacher_param_count,
        "epoch": manager.epoch,
        "accepted": manager.handler.stats["accepted"],
        "executed": manager.handler.stats["executed"],
        "log": len(manager.command_log),
        "nonces": manager.verifier.ledger_size,
        "pending": len(manager.pending),
        "params": [p.detach().clone() for p in registry.model.parameters()],
    }


def _assert_same(before: dict[str, Any], after: dict[str, Any]) -> None:
    params_before, params_after = before.pop("params"), after.pop("params")
    assert after == before
    assert all(torch.equal(a, b) for a, b in zip(params_before, params_after, strict=True))


def test_unsigned_commands_change_nothing_at_any_door(rig: Rig) -> None:
    manager = rig.manager
    rig.train(2)  # the host optimizer has moments a reset would clear
    manager.end_epoch(0)
    before = _state(manager)
    coordinator = DistributedCoordinator(manager.handler, lambda: {})
    refused_types = 0
    for cmd in _unsigned_commands(rig.keyring):
        raw = cmd.SerializeToString()
        assert manager.handle_adaptation_command(raw) is False
        assert asyncio.run(manager.handle_leyline_command(cmd)) is False
        assert asyncio.run(manager.handle_optimizer_command(cmd)) is False
        assert asyncio.run(manager.handle_optimizer_command(raw)) is False
        assert manager.verify_message_auth(cmd) is False
        assert manager.verify_message_auth(raw) is False
        assert manager.handler.handle_adaptation_command(raw) is False
        assert asyncio.run(manager.handler.handle_adaptation_command_async(raw)) is False
        assert manager.handler.accept(raw) is None
        assert coordinator.submit(raw) is False  # verified on arrival, like every door
        assert manager.handler.accept_relayed(raw, time.time()) is None  # another rank's relay
        # Wire messages are not commands to the optimizer manager (nor to the manager's
        # optimizer door when bare): refused by type, before anything runs.
        for wire in (cmd, raw, cmd.optimizer_command):
            with pytest.raises(TypeError, match="apply_optimizer_command takes a verified"):
                manager.optimizers.apply_optimizer_command(wire)  # type: ignore[arg-type]
            refused_types += 1
        if cmd.HasField("optimizer_command"):
            with pytest.raises(TypeError, match="expected a signed AdaptationCommand"):
                asyncio.run(manager.handle_optimizer_command(cmd.optimizer_command))
    assert coordinator.sync_epoch(0).outcomes == ()  # nothing reached the other ranks
    assert manager.apply_pending(wait=True) == []
    assert refused_types == 15
    _assert_same(before, _state(manager))
    assert manager.handler.stats["rejected"] >= 5 * 8


# --- replay across restarts ---------------------------------------------------------------------


def test_a_restarted_manager_refuses_a_replay_inside_the_window(tmp_path, store, keyring):
    config = make_config(tmp_path, store, run_id="restart-inside")
    rig = Rig(config, keyring)
    reset = rig.signed(make_optimizer_command("reset_state", "host"))
    assert run_command(rig.manager, reset)
    assert (config.run_dir / LEDGER_FILE_NAME).is_file()
    rig.manager.close()

    restarted_rig = Rig(make_config(tmp_path, store, run_id="restart-inside"), keyring)
    restarted = restarted_rig.manager
    restarted_rig.train(1)  # the host has moments again: a replayed reset would clear them
    assert restarted.handle_adaptation_command(reset) is False
    assert restarted.handler.stats["rejected:replay"] == 1
    assert restarted.verifier.ledger_size == 1
    restarted.close()


def test_a_replay_after_the_window_is_stale_after_a_restart(tmp_path, store, keyring) -> None:
    settings = {"run_id": "restart-after", "command_freshness_s": 0.3}
    rig = Rig(make_config(tmp_path, store, **settings), keyring)
    reset = rig.signed(make_optimizer_command("reset_state", "host"))
    assert run_command(rig.manager, reset)
    rig.manager.close()
    time.sleep(0.4)
    restarted = Rig(make_config(tmp_path, store, **settings), keyring).manager
    assert restarted.verifier.ledger_size == 0  # nothing left inside the window
    assert restarted.handle_adaptation_command(reset) is False
    assert restarted.handler.stats["rejected:stale"] == 1
    restarted.close()


_CRASHING_TRAINER = """
import os, sys
from kasmina.control.auth import CommandVerifier
from kasmina.control.ledger import NonceLedger
from kasmina.leyline import AdaptationCommand
from kasmina.manager.config import KasminaConfig
from kasmina.utils.keyring import Keyring

config = KasminaConfig(run_id="crashed", runs_root=sys.argv[1], device="cpu")
keyring = Keyring({"ctl": bytes.fromhex(sys.argv[2])})
verifier = CommandVerifier(keyring, ledger=NonceLedger(config.nonce_ledger_path))
command = AdaptationCommand.FromString(bytes.fromhex(sys.argv[3]))
assert verifier.verify(command) == (True, "ok")
os._exit(0)  # dies right after accepting: no close, no flush, no atexit
"""


def test_a_trainer_that_dies_right_after_accepting_still_refuses_the_replay(
    tmp_path, store, keyring
) -> None:
    runs = tmp_path / "runs"
    raw = sign_command(make_optimizer_command("reset_state", "host"), keyring, "ctl")
    raw_bytes = raw.SerializeToString()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    subprocess.run(
        [
            sys.executable,
            "-c",
            _CRASHING_TRAINER,
            str(runs),
            keyring.get("ctl").hex(),
            raw_bytes.hex(),
        ],
        check=True,
        env=env,
        timeout=120,
    )
    manager = Rig(make_config(tmp_path, store, run_id="crashed"), keyring).manager
    assert manager.handle_adaptation_command(raw_bytes) is False
    assert manager.handler.stats["rejected:replay"] == 1
    manager.close()


def test_two_live_managers_of_one_run_are_refused(tmp_path, store, keyring) -> None:
    config = make_config(tmp_path, store, run_id="one-owner")
    first = KasminaKernelManager(config, keyring=keyring)
    with pytest.raises(RuntimeError, match="held by another live trainer"):
        KasminaKernelManager(config, keyring=keyring)
    first.close()
    KasminaKernelManager(config, keyring=keyring).close()


def test_the_ledger_can_be_moved_or_switched_off(tmp_path, store, keyring, caplog) -> None:
    elsewhere = tmp_path / "ledgers" / "mine.log"
    config = make_config(
        tmp_path, store, nonce_ledger=str(elsewhere), nonce_ledger_durability="flush"
    )
    manager = KasminaKernelManager(config, keyring=keyring)
    assert manager.verifier.ledger.path == elsewhere and elsewhere.is_file()
    assert manager.verifier.ledger.durability == "flush"
    manager.close()
    with caplog.at_level(logging.WARNING, logger="kasmina.manager.intake"):
        off = KasminaKernelManager(
            make_config(tmp_path, store, nonce_ledger=False), keyring=keyring
        )
    assert off.verifier.ledger is None
    assert any("replayed" in r.getMessage() for r in caplog.records)
    off.close()


# --- bounded noise ------------------------------------------------------------------------------


class _DeadSink:
    def __init__(self) -> None:
        self.calls = 0

    def send(self, packet) -> None:
        self.calls += 1
        raise ConnectionError("collector unreachable")


def test_a_forgery_flood_is_counted_exactly_and_reported_at_a_bounded_rate(
    tmp_path, store, keyring, caplog
) -> None:
    jsonl = tmp_path / "telemetry.jsonl"
    config = make_config(tmp_path, store, telemetry_jsonl_path=str(jsonl))
    dead = _DeadSink()
    telemetry = TelemetryReporter(sinks=[dead], max_sink_failures=3)
    manager = KasminaKernelManager(config, keyring=keyring, telemetry=telemetry)
    forger = Keyring({"ctl": generate_key()})
    forgeries = [
        sign_command(
            make_seed_command("germinate", SEED0, "mlp-0"), forger, "ctl"
        ).SerializeToString()
        for _ in range(64)
    ]
    with caplog.at_level(logging.DEBUG, logger="kasmina"):
        for i in range(20_000):
            assert manager.handle_adaptation_command(forgeries[i % 64]) is False
        for raw in (b"\xff" * 7, b"junk"):  # and a second reason, a few times
            for _ in range(50):
                assert manager.handle_adaptation_command(raw) is False
        manager.close()  # reports what is still pending
    stats = manager.handler.stats
    assert stats["rejected:bad_signature"] == 20_000 and stats["rejected:malformed"] == 100
    assert stats["rejected"] == 20_100 and stats["accepted"] == 0

    events = [json.loads(line) for line in jsonl.read_text().splitlines()]
    rejected = [m for e in events for m in e["metrics"] if m["name"] == "command.rejected"]
    by_reason: dict[str, float] = {}
    for metric in rejected:
        reason = metric["labels"]["reason"]
        by_reason[reason] = by_reason.get(reason, 0.0) + metric.get("value", 0.0)
    assert by_reason == {"bad_signature": 20_000.0, "malformed": 100.0}  # counts, aggregated
    assert len(rejected) <= 8
    assert jsonl.stat().st_size < 10 * 1024

    records = [r for r in caplog.records if r.name.startswith("kasmina")]
    assert len(records) <= 12, [r.getMessage() for r in records]
    assert sum(r.exc_info is not None for r in records) <= 1  # one traceback, for the dead sink
    assert dead.calls <= 3 and telemetry.disabled_sinks == (dead,)


# --- configuration cannot switch protections off ------------------------------------------------


@pytest.mark.parametrize("value", [0, -1.0, 3600.5, 1e9, float("nan"), float("inf"), "60", True])
def test_command_freshness_is_bounded_to_an_hour(value) -> None:
    with pytest.raises(ValueError, match=r"command_freshness_s must be a number in \(0, 3600\]"):
        KasminaConfig(command_freshness_s=value)


def test_command_freshness_accepts_its_range() -> None:
    assert KasminaConfig(command_freshness_s=3600).command_freshness_s == 3600
    assert KasminaConfig(command_freshness_s=0.5).command_freshness_s == 0.5


def test_key_id_lists_refuse_a_bare_string(tmp_path, store) -> None:
    with pytest.raises(TypeError, match="command_key_ids must be a sequence of key ids, not"):
        KasminaConfig(command_key_ids="ctl")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="command_key_ids"):
        KasminaConfig(command_key_ids=5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-empty"):
        KasminaConfig(command_key_ids=["ctl", ""])
    config = KasminaConfig.from_dict({"command_key_ids": ["ctl"]})
    assert config.command_key_ids == ("ctl",)
    assert KasminaConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    # And the list is enforced: another key of the same keyring cannot sign a command.
    shared = Keyring({"ctl": generate_key(), "other-tool": generate_key()})
    rig = Rig(make_config(tmp_path, store, command_key_ids=["ctl"]), shared)
    reset = make_optimizer_command("reset_state", "host")
    assert not rig.manager.handle_adaptation_command(rig.signed(reset, key_id="other-tool"))
    assert rig.manager.handler.stats["rejected:untrusted_key_id"] == 1
    assert run_command(rig.manager, rig.signed(reset, key_id="ctl"))


@pytest.mark.parametrize(
    ("field", "value"),
    [("nonce_ledger", ""), ("nonce_ledger", 1), ("nonce_ledger_durability", "sometimes")],
)
def test_ledger_settings_are_checked(field, value) -> None:
    with pytest.raises(ValueError, match=field):
        KasminaConfig(**{field: value})


_RANGE = re.compile(r"(>=?|<=?|[\[(]\s*-?[\d.]|one of)")


def _numeric_fields() -> list[str]:
    return [
        f.name
        for f in dataclasses.fields(KasminaConfig)
        if isinstance(f.default, (int, float)) and not isinstance(f.default, bool)
    ]


@pytest.mark.parametrize("field", _numeric_fields())
@pytest.mark.parametrize("value", [-1e12, float("nan")])
def test_every_numeric_setting_states_its_range(field: str, value: float) -> None:
    """An out-of-range number is refused with a message naming the field and its range."""
    with pytest.raises((ValueError, TypeError)) as info:
        KasminaConfig(**{field: value})
    message = str(info.value)
    assert field in message and _RANGE.search(message), message


def test_a_stores_megabyte_field_stays_out_of_logs_and_the_command_log(
    rig: Rig, store: Path, mlp: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A store serving a manifest with a megabyte-long unverified field (its key id): the
    refused GERMINATE's log lines and command log entry quote it cut short, so a flood of
    such commands cannot grow the process's memory or its logs by megabytes each."""
    path = store / f"{mlp}.manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "key_id": "K" * 1_000_000}))
    with caplog.at_level(logging.DEBUG):
        for _ in range(3):
            assert not rig.send("germinate", SEED0, mlp)
    reasons = [entry[3] for entry in rig.manager.command_log]
    assert len(reasons) == 3 and all("unknown publisher key" in r for r in reasons)
    assert max(len(r) for r in reasons) < 1000
    assert max(len(record.getMessage()) for record in caplog.records) < 2000


def test_a_command_executed_at_once_refuses_when_its_nonce_cannot_be_made_durable(
    rig: Rig, mlp, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The handler's synchronous path (``handler.handle_adaptation_command``, which calls
    ``manager.execute``) stages the nonce on arrival like the queue does: it must reach the
    disk before the command acts, or a crash right after could have the command replayed.
    A disk that refuses the write refuses the command, and nothing changes."""
    from kasmina.stages import SeedStage

    def full(*_: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(rig.manager.verifier, "make_durable", full)
    germinate = make_seed_command("germinate", SEED0, mlp)
    assert rig.manager.handler.handle_adaptation_command(rig.signed(germinate)) is False
    assert rig.stage(SEED0) == SeedStage.DORMANT
    assert "could not be made durable" in rig.manager.command_log[-1][3]
    monkeypatch.undo()  # the disk back: the retry under the command's id applies
    assert rig.manager.handler.handle_adaptation_command(rig.signed(germinate)) is True
    assert rig.stage(SEED0) == SeedStage.ISOLATED_INIT


@pytest.mark.parametrize("embargo", [2.0**40, -1.0])
def test_an_unsigned_in_process_cull_with_an_embargo_out_of_range_changes_nothing(
    rig: Rig, mlp, embargo: float
) -> None:
    """``manager.execute`` takes a command object without the door's checks: a CULL whose
    embargo does not fit the table (int32) or is negative is refused before the cull begins
    (the cull had released the kernel, then raised writing the embargo)."""
    from kasmina.control.commands import KasminaCommand, SeedAction
    from kasmina.leyline import SeedOperation
    from kasmina.stages import SeedStage

    assert rig.send("germinate", SEED0, mlp)
    seed = rig.manager.seed(SEED0)
    kernel = seed.kernel
    cull = SeedAction(SeedOperation.SEED_OPERATION_CULL, SEED0, "", {"embargo_epochs": embargo})
    command = KasminaCommand("cull-1", "seed", 0, 5.0, seed=cull)
    assert rig.manager.execute(command) is False
    assert seed.stage == SeedStage.ISOLATED_INIT and seed.kernel is kernel


@pytest.mark.parametrize("lr", [0.0, -0.5, float("nan"), float("inf")])
def test_an_unsigned_in_process_germinate_with_a_learning_rate_not_above_0_changes_nothing(
    rig: Rig, mlp, lr: float
) -> None:
    """The door refuses a GERMINATE whose ``learning_rate`` is not in (0, 10]; ``manager.execute``
    does not pass it: the operation refuses one that is not above 0 itself (0 included: a seed
    whose optimizer steps by 0 never trains), or not finite (inf: every weight it steps inf),
    before anything is fetched or attached."""
    from kasmina.control.commands import KasminaCommand, SeedAction
    from kasmina.leyline import SeedOperation
    from kasmina.stages import SeedStage

    action = SeedAction(SeedOperation.SEED_OPERATION_GERMINATE, SEED0, mlp, {"learning_rate": lr})
    assert rig.manager.execute(KasminaCommand("germinate-1", "seed", 0, 5.0, seed=action)) is False
    assert "learning_rate must be finite and > 0" in rig.manager.command_log[-1][3]
    seed = rig.manager.seed(SEED0)
    assert seed.stage == SeedStage.DORMANT and seed.kernel is None
    assert SEED0 not in rig.manager.optimizers.seed_ids
