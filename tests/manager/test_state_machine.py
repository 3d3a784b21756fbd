"""The kernel manager under random, correctly signed command sequences (hypothesis stateful):
GERMINATE / ADVANCE / CULL / TERMINATE, ROLLBACK, optimizer commands, replays and duplicates,
sent queued or applied at once, interleaved with training steps, eval-mode forwards, seed
evaluations and epoch ends; the manager's invariants are checked after every action (the stage
in every place it is kept, the table's columns, kernels, optimizers and pins following the
stages, the command log and counters, a refused command changing nothing bit for bit, a
rollback restoring what its epoch's ``end_epoch`` left). Derandomized by default (the same
examples in every run, which take a seed to ACTIVE: the run checks they did);
``KASMINA_STATEFUL_RANDOM=1`` draws fresh ones, and ``KASMINA_STATEFUL_EXAMPLES`` /
``KASMINA_STATEFUL_STEPS`` run longer searches.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from torch.nn import functional as F

from kasmina.control.builders import (
    make_optimizer_command,
    make_rollback_command,
    make_seed_command,
)
from kasmina.seeds.extra_state import decode_extra_state
from kasmina.seeds.gates import sigmoid_alpha
from kasmina.stages import (
    BLENDING_STAGES,
    CONTRIBUTING_STAGES,
    ISOLATED_STAGES,
    ISOLATED_TRAINING_STAGES,
    LEGAL_TRANSITIONS,
    NEXT_STAGE,
    RUNS_KERNEL,
    SeedStage,
    StateColumn,
)
from kasmina.utils.state_io import clone_state
from tests.manager.helpers import SEED0, SEED1, Rig, make_config

S = SeedStage
SEEDS = (SEED0, SEED1)
# Stages whose seed never holds a kernel (the kernel is released on the way in).
NO_KERNEL = frozenset({S.DORMANT, S.HARVESTING, S.COOLDOWN, S.RECYCLING})
EXAMPLES = int(os.environ.get("KASMINA_STATEFUL_EXAMPLES", "40"))
STEPS = int(os.environ.get("KASMINA_STATEFUL_STEPS", "30"))


# ---------------------------------------------------------------------- comparisons
def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu().reshape(-1).contiguous()
    return t.view(torch.uint8) if t.is_floating_point() else t


def same(a: Any, b: Any, path: str = "") -> str | None:
    """None when ``a`` and ``b`` are equal bit for bit (tensors, nested containers, NaN ==
    NaN); else where they first differ."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return f"{path}: {type(a).__name__} vs {type(b).__name__}"
        if a.shape != b.shape or a.dtype != b.dtype:
            return f"{path}: {tuple(a.shape)}/{a.dtype} vs {tuple(b.shape)}/{b.dtype}"
        if not torch.equal(_bits(a), _bits(b)):
            return f"{path}: values differ"
        return None
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return f"{path}: keys {sorted(map(str, set(a) ^ set(b)))[:6]} differ"
        for k in a:
            if (d := same(a[k], b[k], f"{path}.{k}")) is not None:
                return d
        return None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return f"{path}: length {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            if (d := same(x, y, f"{path}[{i}]")) is not None:
                return d
        return None
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return None
    return None if a == b else f"{path}: {a!r:.80} vs {b!r:.80}"


def state_of(rig: Rig) -> dict[str, Any]:
    """Everything a command may change, cloned: weights (host and seeds, extra states), every
    optimizer's state and layout, the state table, records, pins, the clock."""
    m = rig.manager
    reg = m.require_registry()
    return {
        "model": clone_state(rig.model.state_dict()),
        "optimizers": clone_state(m.optimizers.state_dict()),
        "table": reg.table.state_tensor.clone(),
        "stages": [r.stage for r in reg],
        "records": [
            (r.seed_id, r.artifact_id, r.kernel is not None, r.pinned, r.graft_steps) for r in reg
        ],
        "seed_optimizers": sorted(m.optimizers.seed_ids),
        # a queued GERMINATE's fetch pins its kernel on a worker thread, at any time
        "pins": dict(m.kernel_cache._pins) if not len(m.pending) else None,
        "clock": (m.epoch, m.global_step, dict(m.val_metrics)),
    }


class Outstanding:
    """A command sent and accepted, not yet logged."""

    def __init__(self, op: str, seed_id: str | None, raw: bytes) -> None:
        self.op, self.seed_id, self.raw = op, seed_id, raw


def manager_machine(
    published_,
    keyring_,
    root: Path,
    checkpoint_mode: str,
    reached: set[SeedStage],
    rig_options=None,
    **overrides,
) -> type:
    """The machine's class; ``reached`` collects every stage a seed was seen in."""
    store_src, mlp, aff = published_

    class ManagerMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            tmp = Path(tempfile.mkdtemp(dir=root))
            store = tmp / "urza"
            shutil.copytree(store_src, store)
            config = make_config(tmp, store, checkpoint_mode=checkpoint_mode, **overrides)
            self.rig = Rig(config, keyring_, **(rig_options or {}))
            self.m = self.rig.manager
            self.outstanding: dict[str, Outstanding] = {}
            self.logged = 0  # command_log entries seen (the log is bounded: fine here)
            self.ckpt: dict[int, dict[str, Any]] = {}  # state right after end_epoch(e) saved
            self.sent: list[bytes] = []  # every raw command accepted, for replays
            self.dropped = 0  # commands verified, then dropped for a full queue

        def teardown(self) -> None:
            self.m.close()

        # ------------------------------------------------------------------ helpers
        def signed(self, cmd) -> bytes:
            return self.rig.signed(cmd)

        def seed_cmd(self, op: str, seed_id: str, artifact: str = "", **params: float) -> bytes:
            # A GERMINATE's fetch gets a minute: one that outlived a refusal would pin and unpin
            # on a worker thread while an invariant reads the pins.
            timeout = 60.0 if op == "germinate" else 5.0
            cmd = make_seed_command(op, seed_id, artifact, params, timeout, validate=False)
            return self.signed(cmd)

        def new_log(self) -> list[tuple]:
            log = list(self.m.command_log)
            new, self.logged = log[self.logged :], len(log)
            for command_id, _kind, _ok, _reason in new:
                assert command_id in self.outstanding, f"logged {command_id} never outstanding"
                del self.outstanding[command_id]
            return new

        def send(self, raw: bytes, op: str, seed_id: str | None) -> bool:
            from kasmina.leyline import AdaptationCommand

            logged = len(self.m.command_log)
            accepted = self.m.handle_adaptation_command(raw)
            cid = AdaptationCommand.FromString(raw).command_id
            if accepted:
                assert cid not in self.outstanding
                self.outstanding[cid] = Outstanding(op, seed_id, raw)
                self.sent.append(raw)
            elif len(self.m.command_log) > logged:  # verified, then dropped: the queue is full
                assert len(self.m.command_log) == logged + 1
                assert self.m.command_log[-1][0] == cid and not self.m.command_log[-1][2]
                assert len(self.m.pending) >= self.m.config.max_pending_commands
                self.outstanding[cid] = Outstanding(op, seed_id, raw)
                self.sent.append(raw)
                self.dropped += 1
                self.new_log()
            return accepted

        def at_once(
            self, raw: bytes, op: str, seed_id: str | None
        ) -> tuple[bool | None, dict, dict]:
            """Send and apply now (``run_command``'s way); (ok, state before, state after), ok
            None where it cannot be judged alone: refused at the door or for a full queue,
            deferred by an open graph, or applied after other queued commands. Strict checks
            where it is the only one applied: a refused command changed nothing."""
            graph = self.m.state.graph_open()
            queued = len(self.m.pending)
            before = state_of(self.rig)
            counters = Counter(self.m.counters)
            if not self.send(raw, op, seed_id):
                self.new_log()
                assert same(before, state_of(self.rig)) is None
                return None, before, before
            outcomes = self.m.apply_pending(wait=True)
            new = self.new_log()
            after = state_of(self.rig)
            if graph:
                assert outcomes == [] and new == [], "applied with a forward's graph open"
                return None, before, after  # deferred: applied at the step's end
            assert len(outcomes) == queued + 1, (outcomes, queued)
            assert len(new) == len(outcomes)
            assert [o.command_id for o in outcomes] == [e[0] for e in new]
            assert [o.ok for o in outcomes] == [e[2] for e in new]
            if queued:  # others applied first: its seed's stage then is not known here
                return None, before, after
            (outcome,) = outcomes
            if not outcome.ok:
                diff = same(before, after)
                assert diff is None, f"{op} {seed_id} refused ({outcome.reason}) but changed {diff}"
                grown = Counter(self.m.counters)
                grown.subtract(counters)
                assert +grown <= Counter(
                    {
                        "commands_refused": 1,
                        f"{new[0][1]}:refused": 1,
                        "gate_score_ignored": 1,
                        "kernel_load_failures": 1,
                        "kernel.loads_failed": 1,
                    }
                ), grown
            return outcome.ok, before, after

        def sent_or_applied(self, raw: bytes, op: str, seed_id: str, queued: bool) -> bool | None:
            """``queued``: sent, applied at a later safe point (None); else ``at_once``'s ok."""
            if queued:
                self.send(raw, op, seed_id)
                return None
            return self.at_once(raw, op, seed_id)[0]

        def seed_stage(self, seed_id: str) -> S:
            return self.m.seed(seed_id).stage

        # ------------------------------------------------------------------ rules: seeds
        @rule(
            seed_id=st.sampled_from(SEEDS),
            which=st.sampled_from(["mlp", "aff"]),
            queued=st.booleans(),
        )
        def germinate(self, seed_id: str, which: str, queued: bool) -> None:
            artifact = mlp if which == "mlp" else aff
            stage = self.seed_stage(seed_id)
            raw = self.seed_cmd("germinate", seed_id, artifact)
            ok = self.sent_or_applied(raw, "germinate", seed_id, queued)
            if ok is None:
                return
            if stage != S.DORMANT:
                assert not ok, f"GERMINATE applied to a {stage.name} seed"
            if ok:
                assert self.seed_stage(seed_id) == S.ISOLATED_INIT

        @rule(seed_id=st.sampled_from(SEEDS), bad=st.sampled_from(["unknown", "malformed"]))
        def germinate_unknown_artifact(self, seed_id: str, bad: str) -> None:
            artifact = "mlp-0123456789abcdef" if bad == "unknown" else "not an id!"
            ok, _, _ = self.at_once(
                self.seed_cmd("germinate", seed_id, artifact), "germinate", seed_id
            )
            assert not ok  # None (deferred, or refused at the door) or False

        @rule(op=st.sampled_from(["germinate", "advance", "cull", "terminate"]))
        def unknown_seed(self, op: str) -> None:
            raw = self.seed_cmd(op, "out[7]", mlp if op == "germinate" else "")
            ok, _, _ = self.at_once(raw, op, "out[7]")
            assert not ok

        @rule(seed_id=st.sampled_from(SEEDS), queued=st.booleans())
        def advance(self, seed_id: str, queued: bool) -> None:
            stage = self.seed_stage(seed_id)
            raw = self.seed_cmd("advance", seed_id)
            ok = self.sent_or_applied(raw, "advance", seed_id, queued)
            if ok is None:
                return
            if ok:
                assert stage in NEXT_STAGE and stage != S.DORMANT
                assert self.seed_stage(seed_id) == NEXT_STAGE[stage]
            if stage not in NEXT_STAGE or stage == S.DORMANT:
                assert not ok

        @rule(
            seed_id=st.sampled_from(SEEDS),
            embargo=st.sampled_from([None, 0, 1, 3]),
            queued=st.booleans(),
        )
        def cull(self, seed_id: str, embargo: int | None, queued: bool) -> None:
            stage = self.seed_stage(seed_id)
            params = {} if embargo is None else {"embargo_epochs": embargo}
            raw = self.seed_cmd("cull", seed_id, **params)
            ok = self.sent_or_applied(raw, "cull", seed_id, queued)
            if ok is None:
                return
            legal = S.HARVESTING in LEGAL_TRANSITIONS[stage]
            assert ok == legal, (stage, ok)
            if ok:
                record = self.m.require_registry()[seed_id]
                assert record.stage == S.COOLDOWN and record.kernel is None
                want = 1 if embargo is None else embargo  # default_embargo_epochs=1 (make_config)
                got = self.m.require_registry().table.state_tensor[
                    record.index, StateColumn.EMBARGO_COUNTER
                ]
                assert int(got) == want

        @rule(seed_id=st.sampled_from(SEEDS), queued=st.booleans())
        def terminate(self, seed_id: str, queued: bool) -> None:
            stage = self.seed_stage(seed_id)
            raw = self.seed_cmd("terminate", seed_id)
            ok = self.sent_or_applied(raw, "terminate", seed_id, queued)
            if ok is None:
                return
            assert ok == (S.TERMINATED in LEGAL_TRANSITIONS[stage]), (stage, ok)
            if ok:
                assert self.seed_stage(seed_id) == S.TERMINATED

        @rule(seed_id=st.sampled_from(SEEDS), which=st.sampled_from(["mlp", "aff"]))
        def push(self, seed_id: str, which: str) -> None:
            """One step along the main path for ``seed_id``: what its next gate needs (training,
            an epoch, an evaluation), then GERMINATE or ADVANCE (the checked rules)."""
            stage = self.seed_stage(seed_id)
            if stage == S.DORMANT:
                self.germinate(seed_id, which, queued=False)
            elif stage in NEXT_STAGE:
                if stage == S.ISOLATED_INIT:
                    self.train(1)
                    self.end_epoch(0.5)
                elif stage == S.GRAFTING:
                    self.train(3)
                    self.train(2)
                elif stage == S.STABILIZATION:
                    self.train(1)
                    self.evaluate()
                else:
                    self.train(1)
                if self.seed_stage(seed_id) == stage:
                    self.advance(seed_id, queued=False)

        @rule(seed_id=st.sampled_from(SEEDS), which=st.sampled_from(["mlp", "aff"]))
        def grow(self, seed_id: str, which: str) -> None:
            """``push`` until the seed is ACTIVE or a push moves it no further (a gate, a
            command still queued): the later stages' rules and invariants get seeds to act on."""
            for _ in range(6):
                stage = self.seed_stage(seed_id)
                if stage != S.DORMANT and stage not in NEXT_STAGE:
                    return
                self.push(seed_id, which)
                if self.seed_stage(seed_id) == stage:
                    return

        @rule(seed_id=st.sampled_from(SEEDS))
        def corrupt_kernel(self, seed_id: str) -> None:
            """A kernel that diverged (a NaN weight) in a stage before ACTIVE: contained, the
            host's step untouched; the seed is quarantined at its fault limit."""
            record = self.m.require_registry()[seed_id]
            if record.kernel is None or record.stage not in ISOLATED_STAGES:
                return
            with torch.no_grad():
                next(record.kernel.parameters()).fill_(float("nan"))
            # A command still queued applies at the first step's end (a ROLLBACK puts the
            # kernel's weights back): then the seed need not have faulted.
            queued = bool(self.outstanding)
            for _ in range(4):
                if record.stage not in ISOLATED_STAGES:
                    break
                self.train(1)
            reg = self.m.require_registry()
            assert all(torch.isfinite(p).all() for p in reg.host_params)
            if not queued:
                assert record.stage not in ISOLATED_TRAINING_STAGES, (
                    seed_id,
                    record.stage,
                    record.seed.faults,
                )

        # ------------------------------------------------------------------ rules: rollback
        @rule(
            where=st.sampled_from(["past", "current", "future", "any"]),
            queued=st.booleans(),
            pick=st.integers(0, 1000),
        )
        def rollback(self, where: str, queued: bool, pick: int) -> None:
            epoch = self.m.epoch
            live = self.m.state.checkpoints.epochs()
            if where == "future":
                target = max([epoch, *live]) + 1
            elif where == "current":
                target = max(epoch, 0)
            elif where == "past":
                target = pick % (max(epoch, 0) + 1)
            else:
                choices = sorted(self.ckpt) or [0]
                target = choices[pick % len(choices)]
            raw = self.signed(make_rollback_command(target, reason="stateful"))
            if queued:
                self.send(raw, "rollback", None)
                return
            ok, before, after = self.at_once(raw, "rollback", None)
            if ok is None:
                return
            if target not in live and not len(before["records"]) == 0:
                assert not ok, f"rollback to {target} applied with checkpoints {live}"
            if ok:
                self.check_restored(target)

        def check_restored(self, target: int) -> None:
            expected = self.ckpt.get(target)
            if expected is None:
                return
            now = state_of(self.rig)
            # Pins follow the rollback's own rule (a live seed's cached original is pinned,
            # whether or not it was when the checkpoint was taken: ``pins_are_the_records``).
            expected = {
                **expected,
                "pins": None,
                "records": [r[:3] + r[4:] for r in expected["records"]],
            }
            now = {**now, "pins": None, "records": [r[:3] + r[4:] for r in now["records"]]}
            diff = same(expected, now)
            assert diff is None, f"rollback to {target}: {diff}"

        # ------------------------------------------------------------------ rules: optimizer
        @rule(
            kind=st.sampled_from(["step", "reset_state", "create_seed", "initialize_host"]),
            oid=st.sampled_from(["host", SEED0, SEED1]),
        )
        def optimizer_command(self, kind: str, oid: str) -> None:
            lr = 0.05 if kind == "step" else 0.0
            try:
                cmd = make_optimizer_command(kind, oid, learning_rate=lr, validate=False)
            except ValueError:
                return
            self.at_once(self.signed(cmd), "optimizer", None)

        # ------------------------------------------------------------------ rules: replays
        @precondition(lambda self: bool(self.sent))
        @rule(pick=st.integers(0, 1000))
        def replay(self, pick: int) -> None:
            raw = self.sent[pick % len(self.sent)]
            before = state_of(self.rig)
            log = len(self.m.command_log)
            assert not self.m.handle_adaptation_command(raw), "a replayed command was accepted"
            assert len(self.m.command_log) == log
            assert same(before, state_of(self.rig)) is None

        @precondition(lambda self: bool(self.sent))
        @rule(pick=st.integers(0, 1000))
        def resend_same_id(self, pick: int) -> None:
            """The same command id, signed again (a fresh nonce): a duplicate, refused at the
            door, nothing logged or changed."""
            from kasmina.leyline import AdaptationCommand

            cmd = AdaptationCommand.FromString(self.sent[pick % len(self.sent)])
            before = state_of(self.rig)
            log = len(self.m.command_log)
            assert not self.m.handle_adaptation_command(self.signed(cmd))
            assert len(self.m.command_log) == log
            assert same(before, state_of(self.rig)) is None

        # ------------------------------------------------------------------ rules: training
        @rule(steps=st.integers(1, 3))
        def train(self, steps: int) -> None:
            if self.m.state.graph_open():  # an eval forward's graph: its step first
                self.m.step()
                self.new_log()
            reg = self.m.require_registry()
            for _ in range(steps):
                host = [p.detach().clone() for p in reg.host_params]
                stages = [r.stage for r in reg]
                had_host = self.m.optimizers.has_host
                self.m.set_teacher_logits(None)
                loss = F.cross_entropy(self.rig.model(self.rig.x), self.rig.y)
                assert torch.isfinite(loss)
                self.m.backward(loss, kd_loss=self.m.collect_kd_losses())
                report = self.m.step()
                new = self.new_log()
                assert [o.command_id for o in report["commands"]] == [e[0] for e in new]
                assert report["host_stepped"] == had_host and report["isolation_clean"], report
                if any(kind == "rollback" and ok for _, kind, ok, _ in new):
                    continue  # the step's end rolled the weights back
                if not had_host or all(old in BLENDING_STAGES for old in stages):
                    continue  # every chunk blends against the detached host: no host gradient
                assert any(
                    not torch.equal(a, p) for a, p in zip(host, reg.host_params, strict=True)
                ), (
                    "the host's parameters did not change in a training step",
                    report,
                    {r.seed_id: r.stage.name for r in reg},
                    new,
                    [len(g["params"]) for g in self.m.optimizers.optimizer("host").param_groups],
                    [g["lr"] for g in self.m.optimizers.optimizer("host").param_groups],
                )
                if not new:  # no command applied: only faults move a seed in a step
                    for old, r in zip(stages, reg, strict=True):
                        assert r.stage == old or r.stage in (S.QUARANTINE, S.TERMINATED), (
                            r.seed_id,
                            old,
                            r.stage,
                        )

        @rule(grad=st.booleans())
        def eval_forward(self, grad: bool) -> None:
            before = state_of(self.rig)
            self.rig.model.eval()
            try:
                with torch.set_grad_enabled(grad):
                    out = self.rig.model(self.rig.x)
            finally:
                self.rig.model.train()
            assert out.shape == (16, 4) and torch.isfinite(out).all()
            after = state_of(self.rig)
            assert same(before, after) is None, same(before, after)
            assert self.new_log() == []

        @rule()
        def evaluate(self) -> None:
            if self.m.state.graph_open():
                return
            before = state_of(self.rig)
            self.m.evaluate_seeds([(self.rig.x, self.rig.y)], loss_fn=F.cross_entropy)
            after = state_of(self.rig)
            # GATE_SCORE is the evaluation's to write: compare the rest
            for snap in (before, after):
                snap["table"][:, StateColumn.GATE_SCORE] = 0
                for key in [k for k in snap["model"] if k.endswith("_extra_state")]:
                    extra = decode_extra_state(snap["model"][key])
                    extra["gate_score"] = 0.0
                    extra["row"][StateColumn.GATE_SCORE] = 0
                    snap["model"][key] = extra
            assert same(before, after) is None, same(before, after)

        @rule(metric=st.floats(0, 1))
        def end_epoch(self, metric: float) -> None:
            reg = self.m.require_registry()
            graph = self.m.state.graph_open()
            if graph:  # the user's loop ends the step first
                self.m.step()
                self.new_log()
            epoch = max(self.m.epoch, self.m.state.checkpoints.abandoned_after or -1, -1) + 1
            live = [e for e in self.m.state.checkpoints.epochs()]
            after_ab = self.m.state.checkpoints.abandoned_after
            live = [e for e in live if after_ab is None or e <= after_ab]
            epoch = max([epoch, *(e + 1 for e in live)])
            stages = [r.stage for r in reg]
            pending = len(self.m.pending)
            try:
                self.m.end_epoch(epoch, {"val_accuracy": metric})
            except ValueError:  # a queued ROLLBACK it applied first moved the clock past epoch
                new = self.new_log()  # (documented); the commands stay applied
                assert any(kind == "rollback" and ok for _, kind, ok, _ in new), new
                assert self.m.epoch >= epoch
                return
            new = self.new_log()
            assert self.m.epoch == epoch
            for e in [e for e in self.ckpt if e >= epoch]:
                del self.ckpt[e]
            if epoch in self.m.state.checkpoints.epochs():
                self.ckpt[epoch] = state_of(self.rig)
            for e in list(self.ckpt):
                if e not in self.m.state.checkpoints.epochs():
                    del self.ckpt[e]
            if not new and not pending:
                auto = {(S.COOLDOWN, S.RECYCLING), (S.RECYCLING, S.DORMANT)}
                for old, r in zip(stages, reg, strict=True):
                    assert r.stage == old or (old, r.stage) in auto, (r.seed_id, old, r.stage)

        @rule()
        def apply_pending(self) -> None:
            graph = self.m.state.graph_open()
            outcomes = self.m.apply_pending(wait=True)
            new = self.new_log()
            assert [o.command_id for o in outcomes] == [e[0] for e in new]
            if not graph:
                assert len(self.m.pending) == 0 and not self.outstanding, self.outstanding

        # ------------------------------------------------------------------ invariants
        @invariant()
        def stages_agree(self) -> None:
            reg = self.m.require_registry()
            reached.update(r.stage for r in reg)
            table = reg.table
            for r in reg:
                seed = r.seed
                row = int(table.state_tensor[seed.state_index, StateColumn.LIFECYCLE_STAGE])
                assert seed.stage == table.stage(seed.state_index) == S(row), (r.seed_id, row)
                assert seed._stage_code == int(seed.stage)
                k = next(i for i, s in enumerate(r.slot.seeds) if s is seed)
                assert r.slot._plan[k] == seed.stage

        @invariant()
        def table_columns_follow_stages(self) -> None:
            reg = self.m.require_registry()
            table = reg.table.state_tensor
            for r in reg:
                row = table[r.seed.state_index].tolist()
                stage, alpha = r.stage, r.seed.alpha_value
                assert row[StateColumn.EPOCHS_IN_STATE] == reg.table.epochs_in_state(
                    r.seed.state_index
                )
                assert row[StateColumn.READY_FLAG] == 0, (
                    r.seed_id,
                    stage,
                    row,
                )  # between boundaries
                if stage != S.COOLDOWN:
                    assert row[StateColumn.EMBARGO_COUNTER] == 0, (r.seed_id, stage, row)
                if stage in (S.STABILIZATION, S.ACTIVE):
                    assert alpha == 1.0 and row[StateColumn.ALPHA_BLEND] == 1000, (
                        r.seed_id,
                        alpha,
                        row,
                    )
                elif stage == S.GRAFTING:
                    want = sigmoid_alpha(r.graft_steps, 4, 0.25)
                    assert alpha == want, (r.seed_id, alpha, want, r.graft_steps)
                    assert row[StateColumn.ALPHA_BLEND] == round(want * 1000)
                elif stage not in RUNS_KERNEL:
                    assert alpha == 0.0 and row[StateColumn.ALPHA_BLEND] == 0, (
                        r.seed_id,
                        stage,
                        alpha,
                    )
                if stage not in CONTRIBUTING_STAGES:
                    assert row[StateColumn.GATE_SCORE] == 0 or stage in (
                        S.ISOLATED_INIT,
                        S.COMPATIBILITY_CHECK,
                    ), (r.seed_id, stage, row)
                if stage == S.DORMANT:
                    assert row[StateColumn.BLUEPRINT_ID] == 0, (r.seed_id, row)

        @invariant()
        def kernels_follow_stages(self) -> None:
            for r in self.m.require_registry():
                if r.stage in RUNS_KERNEL:
                    assert r.kernel is not None and r.seed.kernel is r.kernel, r.seed_id
                if r.stage in NO_KERNEL:
                    assert r.kernel is None and r.seed.kernel is None, (r.seed_id, r.stage)
                if r.kernel is None:
                    assert not r.pinned and r.hook is None
                if r.stage in ISOLATED_STAGES:
                    assert r.monitor is not None, r.seed_id
                if r.stage == S.DORMANT:
                    assert r.artifact_id is None, (r.seed_id, r.artifact_id)

        @invariant()
        def optimizers_follow_stages(self) -> None:
            reg = self.m.require_registry()
            have = set(self.m.optimizers.seed_ids)
            train = {r.seed_id for r in reg if r.stage in ISOLATED_TRAINING_STAGES}
            assert train <= have, (train, have)
            # a seed optimizer only for a seed that holds a kernel and was not fossilized into a
            # host optimizer (without one, an ACTIVE seed keeps its own)
            host = self.m.optimizers.has_host
            allowed = {
                r.seed_id
                for r in reg
                if r.kernel is not None
                and (r.stage != S.ACTIVE or not host)
                and r.stage != S.TERMINATED
            }
            assert have <= allowed, (have, {r.seed_id: r.stage.name for r in reg})
            active = {r.seed_id for r in reg if r.stage == S.ACTIVE}
            if not host:
                assert active <= have, (active, have)
            else:
                for r in reg:
                    if r.stage == S.ACTIVE:
                        assert all(
                            self.m.optimizers.owner_of(p) == "host"
                            for p in r.seed.seed_parameters()
                        )

        @invariant()
        def pins_are_the_records(self) -> None:
            if len(self.m.pending):
                return  # a queued GERMINATE may hold a fetch's pin
            reg = self.m.require_registry()
            want = Counter(r.artifact_id for r in reg if r.pinned)
            assert dict(want) == dict(self.m.kernel_cache._pins), (want, self.m.kernel_cache._pins)
            for r in reg:
                live = r.kernel is not None and r.stage != S.TERMINATED
                if r.pinned:  # a pin only for a live seed (one whose original was served
                    assert live and r.artifact_id in self.m.kernel_cache  # uncached has none)
                elif live and self.m.kernel_cache.max_bytes >= 2**20:
                    assert r.artifact_id not in self.m.kernel_cache, (r.seed_id, r.stage)

        @invariant()
        def log_and_counters(self) -> None:
            self.new_log()
            log = list(self.m.command_log)
            ids = [e[0] for e in log]
            assert len(ids) == len(set(ids)), "a command logged twice"
            stats = self.m.handler.stats
            assert stats["executed"] == sum(1 for e in log if e[2])
            assert stats["failed"] == sum(1 for e in log if not e[2])
            assert stats["accepted"] == len(log) + len(self.outstanding)
            assert len(self.m.pending) == len(self.outstanding)
            internal = [e for e in log if e[3].startswith("internal error")]
            assert not internal, internal  # a command whose application raised: a bug
            assert stats.get("rejected:internal_error", 0) == 0
            assert self.m.counters["commands_refused"] == stats["failed"] - self.dropped
            counted = Counter()
            for _, kind, ok, _ in log:
                counted[f"{kind}:{'ok' if ok else 'refused'}"] += 1
            for key, n in counted.items():
                assert self.m.counters[key] == n, (key, self.m.counters[key], n)

    return ManagerMachine


VARIANTS = [
    pytest.param("memory", {}, id="memory"),
    pytest.param("disk", {}, id="disk"),
    # a kernel cache with room for one original only: originals served uncached, evictions
    pytest.param("memory", {"cache_size_mb": 90 / 2**20}, id="small-cache"),
    pytest.param("memory", {"max_pending_commands": 2}, id="short-queue"),
    pytest.param("memory", {"checkpoint_every_epochs": 2, "max_rollback_epochs": 2}, id="sparse"),
    # no host optimizer: an ACTIVE seed keeps its own (a TERMINATE drops it; nothing gives a
    # TERMINATED seed one back)
    pytest.param("memory", {"rig_options": {"host_lr": None}}, id="no-host-optimizer"),
]


@pytest.mark.parametrize(("checkpoint_mode", "overrides"), VARIANTS)
def test_manager_state_machine(published, keyring, tmp_path, checkpoint_mode, overrides) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    reached: set[SeedStage] = set()
    machine = manager_machine(published, keyring, tmp_path, checkpoint_mode, reached, **overrides)
    try:
        run_state_machine_as_test(
            machine,
            settings=settings(
                max_examples=EXAMPLES,
                stateful_step_count=STEPS,
                deadline=None,
                database=None,
                derandomize=os.environ.get("KASMINA_STATEFUL_RANDOM") != "1",
                suppress_health_check=list(HealthCheck),
            ),
        )
    finally:
        torch.set_num_threads(threads)
    assert S.ACTIVE in reached, sorted(stage.name for stage in reached)  # the search went there
