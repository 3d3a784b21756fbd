"""Shared pieces of the manager tests: a small host, a config over a local store, a rig that
signs and applies commands and trains."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from kasmina.control.auth import sign_command
from kasmina.control.builders import make_seed_command
from kasmina.kd.graph import sum_kd_losses
from kasmina.leyline import AdaptationCommand
from kasmina.manager.config import KasminaConfig
from kasmina.manager.manager import KasminaKernelManager
from kasmina.stages import SeedStage
from kasmina.urza.keys import PublisherKey
from kasmina.utils.keyring import Keyring
from kasmina.utils.state_io import clone_state
from kasmina.utils.telemetry import MemorySink, TelemetryReporter

S = SeedStage
SEED0, SEED1 = "out[0]", "out[1]"
# The test artifacts' publisher. make_config gives trainers its public key only.
PUBLISHER = PublisherKey.generate("pub")


class Host(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(6, 8)
        self.out = nn.Linear(8, 4)  # the slot: two seeds over two features each

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.inp(x)))


def make_config(tmp_path: Path, store: Path, **overrides) -> KasminaConfig:
    settings = dict(
        device="cpu",
        urza_url=str(store),
        urza_trusted_publishers={PUBLISHER.key_id: PUBLISHER.public_key_text},
        urza_retries=0,
        urza_backoff_s=0.0,
        runs_root=str(tmp_path / "runs"),  # the run's key and default dirs stay in the test's dir
        checkpoint_dir=str(tmp_path / "ckpt"),
        emergency_checkpoint_dir=str(tmp_path / "emergency"),
        min_isolated_epochs=1,
        grafting_steps=4,
        grafting_temperature=0.25,
        latency_budget_ms=1e4,  # CPU timing in a shared CI box is no test of compatibility
        default_embargo_epochs=1,
    )
    settings.update(overrides)
    return KasminaConfig(**settings)


def run_command(manager: KasminaKernelManager, command: bytes | AdaptationCommand) -> bool:
    """Send one command and apply it at once (a safe point: no forward or backward is under
    way); whether it was accepted *and* carried out."""
    if isinstance(command, AdaptationCommand):
        accepted = asyncio.run(manager.handle_leyline_command(command))
    else:
        accepted = manager.handle_adaptation_command(command)
    if not accepted:
        return False
    outcomes = manager.apply_pending(wait=True)
    assert len(outcomes) == 1, outcomes
    return outcomes[0].ok


class Rig:
    """A manager over a fresh Host, with helpers to send signed commands and train."""

    def __init__(
        self,
        config: KasminaConfig,
        keyring: Keyring,
        urza_client=None,
        device: str = "cpu",
        record: bool = True,
        **attach_options,
    ) -> None:
        """``record``: run one forward first, so that GERMINATE has the slot's activations."""
        self.keyring = keyring
        self.sink = MemorySink()
        self.manager = KasminaKernelManager(
            config,
            keyring=keyring,
            telemetry=TelemetryReporter(sinks=[self.sink]),
            urza_client=urza_client,
        )
        self.model = Host().to(device)
        attach_options = {"host_lr": 0.05, "seed_lr": 0.05, **attach_options}
        self.slot = self.manager.attach(self.model, "out", 2, 2, **attach_options)[0]
        generator = torch.Generator().manual_seed(2)
        self.x = torch.randn(16, 6, generator=generator).to(device)
        self.y = torch.randint(0, 4, (16,), generator=generator).to(device)
        if record:
            record_activations(self.model, self.x)

    def signed(self, cmd, key_id: str = "ctl") -> bytes:
        return sign_command(cmd, self.keyring, key_id).SerializeToString()

    def send(self, op: str, seed_id: str, artifact_id: str = "", **params: float) -> bool:
        """A signed seed command through the manager; built unchecked, so that a test can
        send one the trainer must refuse."""
        raw = self.signed(make_seed_command(op, seed_id, artifact_id, params, validate=False))
        return run_command(self.manager, raw)

    def train(self, steps: int = 1, teacher: torch.Tensor | None = None) -> dict:
        report = {}
        for _ in range(steps):
            self.manager.set_teacher_logits(teacher)
            loss = F.cross_entropy(self.model(self.x), self.y)
            self.manager.backward(loss, kd_loss=self.manager.collect_kd_losses())
            report = self.manager.step()
        return report

    def stage(self, seed_id: str) -> SeedStage:
        return self.manager.seed(seed_id).stage


def record_activations(model: nn.Module, x: torch.Tensor) -> None:
    """One forward, so that the slots record their activations' shapes (GERMINATE refuses a
    slot that has recorded none): in eval mode without a graph, so that nothing trains, no
    dropout or other random op draws from the global generator, and no gradient is left."""
    training = model.training
    model.eval()
    with torch.no_grad():
        model(x)
    model.train(training)


def through_a_seed(kd_loss: torch.Tensor) -> torch.Tensor:
    """``kd_loss`` as a slot's collected KD loss that reaches the host through a seed (a
    kernel holding a host tensor), the leak the step's check exists for: marked as collected
    (``sum_kd_losses``), so ``manager.backward`` does not refuse it as a loss that reaches the
    host by another way (``isolation.verify.reaches_host_beyond``), and the leak is found at
    the step."""
    total = sum_kd_losses([kd_loss])
    assert total is not None
    return total


def host_params(rig: Rig) -> list[torch.Tensor]:
    return [p.detach().clone() for p in rig.manager.require_registry().host_params]


def loads_changed(
    manager: KasminaKernelManager,
    monkeypatch: pytest.MonkeyPatch,
    change: Callable[[dict[str, Any]], None],
) -> None:
    """The checkpoint store's loads return what ``change`` makes of each checkpoint (an
    authentic file that another version, or a bug, wrote)."""
    store = manager.state.checkpoints
    real_load = store.load

    def load(epoch: int, map_location: Any = None) -> dict[str, Any]:
        checkpoint = real_load(epoch, map_location)
        change(checkpoint)
        return checkpoint

    monkeypatch.setattr(store, "load", load)


def walk_to_active(rig: Rig, seed_ids: list[str], epoch: int = 0) -> None:
    """ADVANCE through G2..G5, training in between; asserts each gate refuses first."""
    rig.train(2)
    rig.manager.end_epoch(epoch)
    for sid in seed_ids:
        assert rig.send("advance", sid) and rig.stage(sid) == S.COMPATIBILITY_CHECK
    rig.train(1)  # the forward probes the kernel on real activations (G3)
    for sid in seed_ids:
        assert rig.send("advance", sid) and rig.stage(sid) == S.GRAFTING
    rig.train(1)
    assert not rig.send("advance", seed_ids[0])  # G4: alpha not yet 1
    rig.train(4)
    for sid in seed_ids:
        assert rig.send("advance", sid) and rig.stage(sid) == S.STABILIZATION
    rig.train(1)
    # G5: a score claimed in the command is no evidence, and nothing was measured yet.
    assert not rig.send("advance", seed_ids[0], gate_score=1.0)
    measured = rig.manager.evaluate_seeds([(rig.x, rig.y)], loss_fn=F.cross_entropy)
    for sid in seed_ids:
        assert measured[sid].stage == S.STABILIZATION and measured[sid].score >= 0.5, measured
        assert rig.send("advance", sid) and rig.stage(sid) == S.ACTIVE


def to_stabilization(rig: Rig, seed_ids: list[str]) -> None:
    """ADVANCE through G2..G4, training in between (each seed was GERMINATEd)."""
    rig.train(2)
    rig.manager.end_epoch(0)
    for sid in seed_ids:
        assert rig.send("advance", sid) and rig.stage(sid) == S.COMPATIBILITY_CHECK
    rig.train(1)
    for sid in seed_ids:
        assert rig.send("advance", sid) and rig.stage(sid) == S.GRAFTING
    rig.train(5)
    for sid in seed_ids:
        assert rig.send("advance", sid) and rig.stage(sid) == S.STABILIZATION
    rig.train(1)


def snapshot_state(rig: Rig) -> tuple[dict, dict, torch.Tensor]:
    model = clone_state(rig.model.state_dict())
    return (
        model,
        clone_state(rig.manager.optimizers.state_dict()),
        rig.slot.state_table.state_tensor.clone(),
    )


def assert_same(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert set(a) == set(b)
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        assert a == b


def _live(rig: Rig) -> dict:
    """Everything an all-or-nothing operation must leave bitwise as it was."""
    manager, table = rig.manager, rig.slot.state_table
    return {
        "model": clone_state(rig.model.state_dict()),
        "optimizers": clone_state(manager.optimizers.state_dict()),
        "table": table.state_tensor.clone(),
        "stages": table.stages(),
        "epochs": [table.epochs_in_state(i) for i in range(table.num_seeds)],
        "epoch": manager.epoch,
        "global_step": manager.global_step,
        "val_metrics": dict(manager.val_metrics),
        "kernels": [id(manager.seed(s).kernel) for s in (SEED0, SEED1)],
        "pinned": {a: manager.kernel_cache.is_pinned(a) for a in ("mlp", "aff")},
        "seed_optimizers": manager.optimizers.seed_ids,
    }


def _fail_once(monkeypatch: pytest.MonkeyPatch, owner: object, name: str) -> None:
    """``owner.name`` raises on its first call, then behaves."""
    real, calls = getattr(owner, name), []

    def failing(*args, **kwargs):
        calls.append(name)
        if len(calls) == 1:
            raise RuntimeError(f"injected failure in {name}")
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, failing)
