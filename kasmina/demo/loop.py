"""The demo's training loop: one rank's epochs, steps and epoch-boundary commands.

Wiring, per rank: the host's slots registered with a ``KasminaKernelManager`` (the executor of
every command), the host wrapped in ``DistributedDataParallel`` (``wrap_ddp``: the identity
without a process group) and the manager joined to the other ranks by a ``DistributedKasmina``.
Rank 0 also runs the controller and the adversary; their bytes are verified on arrival on rank
0 and applied by every rank, or by none, at the same epoch boundary.

A step is the manager's training step; data parallelism adds nothing to the loop::

    teacher logits -> DDP forward -> manager.backward(loss, kd)  (KD first, seed-only; DDP
    averages the host's gradients) -> manager.step()  (the seeds' gradients averaged across
    ranks, isolation verified, optimizers)

At a boundary the manager measures every live seed on the validation split
(``evaluate_seeds``: loss and accuracy, with and without each seed) and the controller decides
on ``manager.system_state()`` alone. The test split is scored each epoch for the report and
never reaches the controller.

In the continual scenario the host arrives trained and frozen (no host optimizer, no
gradient): only the seeds train, and the first boundary (epoch 0) comes before any step.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from kasmina.control.relay import EpochSyncResult
from kasmina.demo.config import COMMAND_KEY, KD, NEW_CLASSES, OLD_CLASSES, DemoConfig
from kasmina.demo.controller import Adversary, PlateauController, SeedPlan
from kasmina.demo.data import Digits, accuracy_and_loss, batch_accuracy, batches, with_classes
from kasmina.demo.models import HostMLP, graft_slots
from kasmina.demo.report import DemoResult, EpochRecord
from kasmina.manager.config import KasminaConfig
from kasmina.manager.ddp import DistributedKasmina, wrap_ddp
from kasmina.manager.manager import KasminaKernelManager
from kasmina.stages import BLENDING_STAGES, ISOLATED_STAGES, SeedStage
from kasmina.utils.jsonl_sink import JsonlFileSink
from kasmina.utils.keyring import Keyring
from kasmina.utils.telemetry import TelemetryReporter

logger = logging.getLogger(__name__)

# Two epochs of steps from alpha 0 to 1 (steps per epoch: the 1,197 training digits / 64).
GRAFT_STEPS = 36
# G5 and the controller: a seed may not cost any validation accuracy (the fraction of the
# validation digits it gets right, with it against without it).
MAX_ACCURACY_DROP = 0.0


# Seed stages whose output shapes the model's (the seed counts toward the grown model's size).
class DemoLoop:
    def __init__(
        self,
        cfg: DemoConfig,
        prepared: dict[str, Any],
        model: HostMLP,
        teacher: nn.Module | None,
        data: Digits,
        rank: int,
        world: int,
    ) -> None:
        continual = cfg.scenario == "continual"
        self.cfg, self.model, self.data, self.rank, self.world = cfg, model, data, rank, world
        keys = {k: bytes.fromhex(v) for k, v in prepared["keys"].items()}
        commands = Keyring({COMMAND_KEY: keys[COMMAND_KEY]})
        out = cfg.out_dir
        name = "telemetry.jsonl" if rank == 0 else f"telemetry.rank{rank}.jsonl"
        (out / name).unlink(missing_ok=True)
        self.sink = JsonlFileSink(out / name)
        self.telemetry = TelemetryReporter("kasmina-demo", [self.sink])
        config = KasminaConfig(
            device=cfg.device,
            cache_size_mb=64,
            urza_url=prepared["store"],
            # The publisher's public key only: nothing a trainer holds can sign an artifact.
            urza_trusted_publishers=prepared["publishers"],
            checkpoint_dir=str(out / "checkpoints" / f"rank{rank}"),
            emergency_checkpoint_dir=str(out / "emergency"),
            max_rollback_epochs=1,  # two checkpoints kept
            checkpoint_key_file=str(out / "checkpoints" / "checkpoint.key"),
            runs_root=str(out / "runs"),  # the nonce ledger too stays in the output directory
            min_isolated_epochs=1,
            latency_budget_ms=25.0,
            performance_gate=500,
            g5_max_metric_drop=MAX_ACCURACY_DROP,
            default_embargo_epochs=2,
            grafting_steps=GRAFT_STEPS,
            grafting_temperature=2.0,
            kd_enabled=teacher is not None,
            kd=KD,
        )
        self.manager = KasminaKernelManager(config, keyring=commands, telemetry=self.telemetry)
        self.slots = graft_slots(model, self.telemetry, config.default_embargo_epochs)
        host_lr = None if continual else cfg.host_lr  # continual: no host optimizer
        self.manager.register(model, self.slots, host_lr=host_lr, seed_lr=cfg.seed_lr)
        if continual:
            # The host's knowledge stays as phase 1 left it: no optimizer, and no gradient
            # either (``register`` needs a trainable host, so this comes after it).
            for module in self.host_modules():
                module.requires_grad_(False)
        if teacher is not None:
            self.manager.load_teacher(teacher)
        self.net = wrap_ddp(model)  # the host's gradients; the seeds' are the manager's
        self.replicas = DistributedKasmina(self.manager, on_divergence=self.quarantine_growing)
        self.coordinator = self.replicas.coordinator
        self.controller = PlateauController(
            commands,
            COMMAND_KEY,
            [SeedPlan(s, a) for s, a in prepared["plan"]],
            warmup=0 if continual else 4,
            patience=0 if continual else 2,
            min_delta=0.01,
            max_metric_drop=MAX_ACCURACY_DROP,
            max_in_flight=2 if continual else 3,
            grow_reason="new classes" if continual else "plateau",
        )
        self.adversary = Adversary(COMMAND_KEY)
        self.commands_keyring = commands
        self.pending_attacks: dict[str, list[int]] = {}
        self.attack_outcomes: dict[str, list[bool]] = {}
        self.artifacts: dict[str, list[str]] = {r.seed_id: [] for r in self.manager.registry}
        self.verified_seed_steps = 0
        self.kd_steps = 0
        self.first_growth: int | None = None  # the boundary the first seed germinated at

    # ---------------------------------------------------------------- consistency across ranks
    def quarantine_growing(self, result: EpochSyncResult) -> None:
        for record in self.manager.registry.in_stages(ISOLATED_STAGES):
            record.seed.quarantine(f"rank {self.rank} diverged at epoch {result.epoch}")

    # ---------------------------------------------------------------------------- one step
    def step(self, xb: torch.Tensor, yb: torch.Tensor) -> float:
        m = self.manager
        if m.config.kd_enabled:
            m.set_teacher_logits(m.get_teacher_predictions(xb))
        loss = F.cross_entropy(self.net(xb), yb)
        kd = m.collect_kd_losses()
        self.kd_steps += kd is not None
        # A frozen host with no seed training (continual): nothing to backpropagate.
        m.backward(loss if loss.requires_grad else None, kd_loss=kd)
        self.verified_seed_steps += sum(
            1 for r in m.registry.in_stages(ISOLATED_STAGES) if r.monitor is not None
        )
        m.step()
        return loss.item()

    # ----------------------------------------------------------------------- boundaries
    def evaluate(self) -> dict[str, float]:
        """Kasmina's own measurement of every live seed on the validation split (G5's evidence,
        recorded on the seeds): the loss and the accuracy with and without each seed; returns
        seed id -> relative validation-loss reduction. Every rank measures on the same split
        with the same weights, so every rank's G5 agrees."""
        data = self.data
        evaluations = self.manager.evaluate_seeds(
            [(data.x[data.val], data.y[data.val])],
            loss_fn=F.cross_entropy,
            metric_fn=batch_accuracy,
        )
        return {sid: ev.benefit for sid, ev in evaluations.items()}

    def boundary(self, epoch: int, val_acc: float, val_loss: float) -> bool:
        """Tick; Kasmina measures the live seeds; the controller (deciding on the manager's
        ``system_state()`` packet) and the adversary speak (rank 0); every rank applies.
        Returns whether a seed was germinated."""
        m = self.manager
        m.end_epoch(epoch, {"val_accuracy": val_acc, "val_loss": val_loss})
        before = {r.seed_id: r.artifact_id for r in m.registry}
        self.evaluate()  # recorded on the seeds: the packet carries it
        if self.rank == 0:
            commands = self.controller.observe_state(m.system_state())
            for raw in commands:
                self.coordinator.submit(raw)
            self.attack(epoch)
        result = self.replicas.sync_epoch(epoch)  # seed buffers averaged, then the commands
        for kind, indices in self.pending_attacks.items():
            self.attack_outcomes.setdefault(kind, []).extend(result.outcomes[i] for i in indices)
        self.pending_attacks = {}
        grown = False
        for r in m.registry:
            if r.artifact_id is not None and r.artifact_id != before[r.seed_id]:
                self.artifacts[r.seed_id].append(r.artifact_id)
                grown = True
        return grown

    def attack(self, epoch: int) -> None:
        """Forged (epoch 1), stale (epoch 2), and a replay and a tampered copy of the
        controller's first command at the boundary after it was sent."""
        victim = next(iter(self.artifacts))
        attacks: list[tuple[str, bytes]] = []
        if epoch == 1:
            attacks.append(("forged", self.adversary.forge(victim)))
        if epoch == 2:
            attacks.append(("stale", self.adversary.stale(self.commands_keyring, victim)))
        first = self.controller.decisions[0].epoch if self.controller.decisions else None
        if first is not None and epoch == first + 1:
            captured = self.controller.sent[0]
            attacks.append(("replayed", self.adversary.replay(captured)))
            attacks.append(("tampered", self.adversary.tamper(captured)))
        for kind, raw in attacks:
            queued = self.coordinator.pending
            if self.coordinator.submit(raw):  # passed the checks on arrival: judged at the sync
                self.pending_attacks.setdefault(kind, []).append(queued)
            else:
                self.attack_outcomes.setdefault(kind, []).append(False)

    # --------------------------------------------------------------------------- the run
    def run(self, teacher_acc: float = 0.0, baseline_acc: float = 0.0) -> DemoResult:
        """Train every epoch (with a boundary after each; in the continual scenario one more
        before the first), then close the manager. The model keeps its seeds."""
        from tqdm import tqdm

        cfg, data, m = self.cfg, self.data, self.manager
        records: list[EpochRecord] = []
        first = 0
        if cfg.scenario == "continual":  # the new classes have arrived: boundary 0, no step
            val_acc, val_loss = accuracy_and_loss(self.model, data, data.val)
            records.append(self.record(0, [], val_acc))
            if self.boundary(0, val_acc, val_loss):
                self.first_growth = 0
            first = 1
        epochs = range(first, first + cfg.epochs)
        desc = f"kasmina demo (seed {cfg.seed})"
        bar = tqdm(epochs, desc=desc, unit="epoch", disable=not cfg.progress, leave=False)
        for epoch in bar:
            self.model.train()
            # The shuffle of the ``epoch - first``-th training epoch, as ``train_plain`` draws
            # it: the fine-tuning baseline of the continual scenario (whose boundary 0 comes
            # before any step) sees the same phase-2 batches in the same order.
            shard = batches(data, epoch - first, cfg, self.rank, self.world)
            losses = [self.step(xb, yb) for xb, yb in shard]
            val_acc, val_loss = accuracy_and_loss(self.model, data, data.val)
            records.append(self.record(epoch, losses, val_acc))
            if self.boundary(epoch, val_acc, val_loss) and self.first_growth is None:
                self.first_growth = epoch
            growing = sum(1 for r in m.registry if r.stage not in (SeedStage.DORMANT,))
            bar.set_postfix(val=f"{val_acc:.3f}", seeds=growing)
        bar.close()
        targets = {}
        if cfg.measure_targets and self.rank == 0:
            checks = m.validate_performance_targets()
            threads = torch.get_num_threads()  # what they were timed on (the report says)
            targets = {name: {**vars(check), "threads": threads} for name, check in checks.items()}
        m.close()
        self.sink.close()
        return self.result(records, teacher_acc, baseline_acc, targets)

    def record(self, epoch: int, losses: list[float], val_acc: float) -> EpochRecord:
        """The epoch's row of the report, the test split scored for it. Those forwards run the
        COMPATIBILITY_CHECK probes like any other; G3 decides on a seed's last probe, so the
        probes the validation forward left are put back: no gate sees the test split."""
        m = self.manager
        data = self.data
        probes = [(r.seed, r.seed.probe_result) for r in m.registry]
        try:
            test_acc, _ = accuracy_and_loss(self.model, data, data.test)
            groups = {}
            if self.cfg.scenario == "continual":
                for name, classes in (("old", OLD_CLASSES), ("new", NEW_CLASSES)):
                    idx = with_classes(data.test, data, classes)
                    groups[name] = accuracy_and_loss(self.model, data, idx)[0]
        finally:
            for seed, probe in probes:
                seed.probe_result = probe
        return EpochRecord(
            epoch=epoch,
            train_loss=sum(losses) / max(len(losses), 1),
            val_acc=val_acc,
            alphas={r.seed_id: round(r.seed.alpha_value, 6) for r in m.registry},
            stages={r.seed_id: r.stage.name for r in m.registry},
            test_acc=test_acc,
            test_groups=groups,
        )

    def result(
        self,
        records: list[EpochRecord],
        teacher_acc: float,
        baseline_acc: float,
        targets: dict[str, dict[str, Any]],
    ) -> DemoResult:
        m = self.manager
        final_acc, _ = accuracy_and_loss(self.model, self.data, self.data.test)
        first = self.first_growth
        before = next((r.test_acc for r in records if r.epoch == first), final_acc)

        def seed_parameters(stages: Any) -> int:
            records = m.registry.in_stages(stages)
            return sum(p.numel() for r in records for p in r.seed.seed_parameters())

        host = sum(p.numel() for slot_host in self.host_modules() for p in slot_host.parameters())
        cache = m.kernel_cache
        return DemoResult(
            seed=self.cfg.seed,
            world_size=self.world,
            teacher_test_acc=teacher_acc,
            baseline_test_acc=baseline_acc,
            acc_before_growth=before,
            acc_after_growth=final_acc,
            epochs=records,
            timelines={r.seed_id: [(e, s) for e, _, s in r.timeline] for r in m.registry},
            artifacts=self.artifacts,
            decisions=[
                (d.epoch, d.seed_id, d.reason)
                for d in self.controller.decisions
                if d.reason != "next gate"
            ],
            commands=dict(m.handler.stats),
            adversarial=self.attack_outcomes,
            cache={"hits": cache.hits, "misses": cache.misses, "evictions": cache.evictions},
            isolation={
                "seed_steps": self.verified_seed_steps,
                "violations": int(m.counters["isolation_seed_violations"]),  # per seed-step
                "breaker_trips": int(m.counters["circuit_breaker_trips"]),
            },
            kd_steps=self.kd_steps,
            distributed={
                "syncs": int(self.coordinator.stats["syncs"]),
                "divergences": int(self.coordinator.stats["divergences"]),
            },
            grown_parameters=seed_parameters([SeedStage.ACTIVE]),
            host_parameters=host,
            blending_parameters=seed_parameters(BLENDING_STAGES),
            first_germination_epoch=first,
            targets=targets,
        )

    def host_modules(self) -> list[nn.Module]:
        """The host's own modules (each slot's wrapped host layer), seeds excluded."""
        return [slot.host for slot in self.slots]
