"""A small controller for the demo (a stand-in for Tamiyo) and the adversary it is tested by.

The controller only ever speaks Leyline: it reads the manager's ``SystemStatePacket``
(validation accuracy, each seed's stage and the benefit Kasmina measured; ``observe_state``),
decides, and emits *signed* ``AdaptationCommand`` bytes. It never touches the model and never
sees the test split. Its policy:

- a plateau (no gain of ``min_delta`` in ``patience`` epochs, after ``warmup``) germinates the
  next planned seed, at most ``max_in_flight`` seeds growing at once (with ``patience=0`` it
  grows as soon as a slot is free: the continual scenario's "new classes arrived");
- every growing seed gets an ADVANCE each epoch; the executor's gates decide whether it moves;
- after ``settle_epochs`` in STABILIZATION what Kasmina measured itself decides
  (``manager.evaluate_seeds``, the seed's chunk replaced by the host's): its *help*, the
  relative validation-loss reduction, and the validation accuracy with and without it. Enough
  help at no more than ``max_metric_drop`` of accuracy sends a plain ADVANCE (gate G5 checks
  the same measurement against the performance gate and ``g5_max_metric_drop``; a command
  carries no evidence); too little help (or none measured: NaN), or an accuracy cost, sends CULL
  with an embargo, as does a seed its faults quarantined. A culled slot, once recycled, may be
  germinated again.

``Adversary`` replays, forges and back-dates commands, to show the handler refusing them.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from kasmina.control.auth import sign_command
from kasmina.control.builders import make_seed_command
from kasmina.leyline import SeedLifecycleStage, SeedOperation, SystemStatePacket
from kasmina.stages import NEXT_STAGE, SeedStage
from kasmina.utils.keyring import Keyring
from kasmina.utils.ratelimit import rarely

logger = logging.getLogger(__name__)

GERMINATE = SeedOperation.SEED_OPERATION_GERMINATE
ADVANCE = SeedOperation.SEED_OPERATION_ADVANCE
CULL = SeedOperation.SEED_OPERATION_CULL


@dataclass(frozen=True)
class SeedPlan:
    """Grow ``seed_id`` from ``artifact_id`` when the controller next decides to grow."""

    seed_id: str
    artifact_id: str


@dataclass(frozen=True)
class SeedView:
    """What the controller knows of a seed at an epoch boundary."""

    stage: SeedStage
    epochs_in_stage: int = 0
    help: float | None = None  # Kasmina's measured benefit in STABILIZATION, else None
    # The metric (validation accuracy in the demo) with and without the seed, measured with
    # ``help``; None when it was not measured.
    metric_with: float | None = None
    metric_without: float | None = None


_KNOWN_STAGES = frozenset(SeedLifecycleStage.values())
_UNKNOWN_STAGES = itertools.count(1)


def views_from_state(packet: SystemStatePacket) -> dict[str, SeedView]:
    """Each seed as the manager's ``SystemStatePacket`` describes it: its stage, epochs in the
    stage and, in STABILIZATION, the benefit Kasmina measured there (``seed/<id>/benefit``)
    and the metric with and without the seed (``seed/<id>/metric_with``, ``.../metric_without``)
    when one was measured."""
    metrics = packet.training_metrics
    views: dict[str, SeedView] = {}
    for seed_id, value in sorted(packet.seed_stages.items()):
        if value not in _KNOWN_STAGES:  # a newer trainer's stage: nothing this controller decides
            n = next(_UNKNOWN_STAGES)  # every packet repeats it: logged at a bounded rate
            message = "seed %s is in a stage this controller does not know (%d) [%d so far]"
            logger.log(rarely(n, 1000), message, seed_id, value, n)
            continue
        stage = SeedStage[SeedLifecycleStage.Name(value).removeprefix("SEED_STAGE_")]
        measured_in = metrics.get(f"seed/{seed_id}/evaluated_stage")
        help_ = metric_with = metric_without = None
        if stage == SeedStage.STABILIZATION and measured_in == float(stage.value):
            help_ = metrics.get(f"seed/{seed_id}/benefit")
            metric_with = metrics.get(f"seed/{seed_id}/metric_with")
            metric_without = metrics.get(f"seed/{seed_id}/metric_without")
        epochs = int(metrics.get(f"seed/{seed_id}/epochs_in_stage", 0.0))
        views[seed_id] = SeedView(stage, epochs, help_, metric_with, metric_without)
    return views


@dataclass(frozen=True)
class Decision:
    epoch: int
    operation: int
    seed_id: str
    reason: str


class PlateauController:
    """Decides growth from validation accuracy; emits signed command bytes (see module doc)."""

    def __init__(
        self,
        keyring: Keyring,
        key_id: str,
        plan: list[SeedPlan],
        *,
        warmup: int = 3,
        patience: int = 2,
        min_delta: float = 0.005,
        max_in_flight: int = 2,
        help_threshold: float = 0.02,
        max_metric_drop: float = 0.0,
        settle_epochs: int = 2,
        embargo_epochs: int = 2,
        grow_reason: str = "plateau",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.keyring = keyring
        self.key_id = key_id
        self.queue = list(plan)
        self.warmup = warmup
        self.patience = patience
        self.min_delta = min_delta
        self.max_in_flight = max_in_flight
        self.help_threshold = help_threshold
        self.max_metric_drop = max_metric_drop
        self.settle_epochs = settle_epochs
        self.embargo_epochs = embargo_epochs
        self.grow_reason = grow_reason
        self.clock = clock
        self.best = float("-inf")
        self.since_best = 0
        self.decisions: list[Decision] = []
        self.sent: list[bytes] = []
        self._count = 0

    def observe_state(self, packet: SystemStatePacket) -> list[bytes]:
        """One epoch boundary, decided on the manager's state packet alone."""
        return self.observe(
            packet.current_epoch, packet.validation_accuracy, views_from_state(packet)
        )

    def observe(self, epoch: int, val_acc: float, seeds: Mapping[str, SeedView]) -> list[bytes]:
        """One epoch boundary: returns the signed commands to send, in order."""
        if val_acc > self.best + self.min_delta:
            self.best, self.since_best = val_acc, 0
        else:
            self.since_best += 1
        out: list[bytes] = []
        growing = [
            sid
            for sid, v in seeds.items()
            if v.stage in NEXT_STAGE and v.stage != SeedStage.DORMANT
        ]
        for seed_id, view in seeds.items():  # its kernel pinned, its slot held: give it back
            if view.stage == SeedStage.QUARANTINE:
                params = {"embargo_epochs": float(self.embargo_epochs)}
                out.append(self._command(epoch, CULL, seed_id, "", params, "cull: quarantined"))
        for seed_id in growing:
            view = seeds[seed_id]
            if view.stage == SeedStage.STABILIZATION and view.epochs_in_stage < self.settle_epochs:
                continue  # let the layers downstream settle on the seed before judging it
            if view.stage == SeedStage.STABILIZATION and view.help is not None:
                measured = f"val loss {-100 * view.help:+.1f}% with it"
                with_, without = view.metric_with, view.metric_without
                costs = False
                if with_ is not None and without is not None:
                    measured += f", val acc {100 * with_:.1f}% (without: {100 * without:.1f}%)"
                    costs = not with_ >= without - self.max_metric_drop  # NaN: unknown, a cost
                # A NaN help is no measurement (the seed faulted while measured): G5 refuses
                # it, and an ADVANCE every epoch would hold its slot for ever.
                if not view.help >= self.help_threshold or costs:
                    params = {"embargo_epochs": float(self.embargo_epochs)}
                    why = f"cull: {measured}"
                    out.append(self._command(epoch, CULL, seed_id, "", params, why))
                    continue
                why = f"fossilize: {measured}"
                out.append(self._command(epoch, ADVANCE, seed_id, "", None, why))
                continue
            out.append(self._command(epoch, ADVANCE, seed_id, "", None, "next gate"))
        plateau = epoch >= self.warmup and self.since_best >= self.patience
        if plateau and len(growing) < self.max_in_flight:
            dormant = {sid for sid, v in seeds.items() if v.stage == SeedStage.DORMANT}
            pick = next((p for p in self.queue if p.seed_id in dormant), None)
            if pick is not None:
                self.queue.remove(pick)
                why = f"germinate: {self.grow_reason}"
                out.append(
                    self._command(epoch, GERMINATE, pick.seed_id, pick.artifact_id, None, why)
                )
                self.since_best = 0  # give the new seed time before the next plateau
        self.sent.extend(out)
        return out

    def _command(
        self,
        epoch: int,
        op: int,
        seed_id: str,
        artifact_id: str,
        params: Mapping[str, float] | None,
        reason: str,
    ) -> bytes:
        self._count += 1
        cmd = make_seed_command(
            op, seed_id, artifact_id, params, command_id=f"tamiyo-{epoch}-{self._count}"
        )
        self.decisions.append(Decision(epoch, op, seed_id, reason))
        return sign_command(
            cmd, self.keyring, self.key_id, timestamp=self.clock()
        ).SerializeToString()


class Adversary:
    """Sends what an attacker on the wire could: replays, forgeries, stale commands."""

    def __init__(self, key_id: str, clock: Callable[[], float] = time.time) -> None:
        self.key_id = key_id
        self.clock = clock
        # Same key id as the controller, a key the attacker made up.
        self.wrong = Keyring({key_id: b"attacker-guess-0123456789abcdef"})

    def replay(self, captured: bytes) -> bytes:
        return captured

    def forge(self, seed_id: str) -> bytes:
        cmd = make_seed_command(CULL, seed_id, command_id="forged")
        return sign_command(cmd, self.wrong, self.key_id).SerializeToString()

    def tamper(self, captured: bytes) -> bytes:
        """A captured command with one byte flipped (its signature no longer matches)."""
        data = bytearray(captured)
        data[len(data) // 3] ^= 0x01
        return bytes(data)

    def stale(self, keyring: Keyring, seed_id: str, age_s: float = 3600.0) -> bytes:
        """A genuine command delayed an hour in transit (signed then; refused as stale now)."""
        cmd = make_seed_command(CULL, seed_id, command_id="stale")
        return sign_command(
            cmd, keyring, self.key_id, timestamp=self.clock() - age_s
        ).SerializeToString()
