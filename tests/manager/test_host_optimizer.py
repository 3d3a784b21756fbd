"""The host optimizer under controller commands: a user's LR scheduler on it keeps working
through a promotion (ACTIVE) and a ROLLBACK, which keeps the optimizer objects and their
constructor options (docs/design.md §4 "ACTIVE", §6a "Rollback")."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch.nn import functional as F

from kasmina.control.builders import make_optimizer_command, make_rollback_command
from kasmina.manager.manager import KasminaKernelManager
from kasmina.utils.keyring import Keyring, generate_key
from tests.manager.helpers import SEED0, Rig, S, make_config, run_command, through_a_seed

Schedule = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]
SCHEDULES: dict[str, Schedule] = {
    # What transformers' get_linear_schedule_with_warmup returns.
    "lambda": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / 1000),
    "onecycle": lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=1000),
}


class Trainer:
    """The user's loop: the manager's step, then the scheduler's."""

    def __init__(self, rig: Rig, schedule: Schedule) -> None:
        self.rig = rig
        self.host_opt = rig.manager.optimizers.optimizer("host")
        self.sched = schedule(self.host_opt)

    def __call__(self, steps: int) -> None:
        for _ in range(steps):
            assert self.rig.train(1)["host_stepped"]
            self.sched.step()

    def check(self) -> None:
        """The schedule drives the optimizer that trains; its group count never changed."""
        live = self.rig.manager.optimizers.optimizer("host")
        assert live is self.host_opt and len(live.param_groups) == 1
        assert live.param_groups[0]["lr"] == self.sched.get_last_lr()[0]


def walk_to_active(rig: Rig, train: Callable[[int], None], epoch: int) -> int:
    """GERMINATE'd SEED0 through G2..G5 by signed commands; returns the next epoch."""
    train(2)
    rig.manager.end_epoch(epoch)
    for _ in range(2):  # COMPATIBILITY_CHECK, then GRAFTING (the forward probes the kernel)
        assert rig.send("advance", SEED0), rig.manager.command_log[-1]
        train(1)
    train(4)
    assert rig.send("advance", SEED0) and rig.stage(SEED0) == S.STABILIZATION
    train(1)
    rig.manager.evaluate_seeds([(rig.x, rig.y)], loss_fn=F.cross_entropy)
    assert rig.send("advance", SEED0) and rig.stage(SEED0) == S.ACTIVE
    return epoch + 1


def host_group_ids(rig: Rig) -> list[int]:
    return [id(p) for p in rig.manager.optimizers.optimizer("host").param_groups[0]["params"]]


@pytest.mark.parametrize("kind", sorted(SCHEDULES))
def test_a_host_scheduler_keeps_stepping_through_active_and_rollbacks(rig: Rig, mlp, kind):
    manager = rig.manager
    train = Trainer(rig, SCHEDULES[kind])
    base = host_group_ids(rig)
    assert rig.send("germinate", SEED0, mlp)
    train(2)
    manager.end_epoch(0)  # SEED0 isolated, with its own optimizer
    epoch = walk_to_active(rig, train, 1)
    seed_params = manager.seed(SEED0).seed_parameters()
    assert host_group_ids(rig) == base + [id(p) for p in seed_params]  # joined the host group
    before = [p.detach().clone() for p in seed_params]
    train(2)
    train.check()
    assert any(not torch.equal(a, p) for a, p in zip(before, seed_params, strict=True))
    manager.end_epoch(epoch)  # SEED0 promoted

    # Back across the promotion: the seed has its own optimizer again, the host keeps its
    # object (the scheduler's) and one group.
    assert run_command(manager, rig.signed(make_rollback_command(0, reason="test")))
    assert rig.stage(SEED0) == S.ISOLATED_INIT and manager.optimizers.seed_ids == [SEED0]
    assert host_group_ids(rig) == base
    lr = train.host_opt.param_groups[0]["lr"]
    train(3)
    train.check()
    assert train.host_opt.param_groups[0]["lr"] != lr  # the live lr follows the schedule

    # And forward again, to the checkpoint holding the promotion: rebuilt into the live host.
    assert run_command(manager, rig.signed(make_rollback_command(epoch, reason="test")))
    assert rig.stage(SEED0) == S.ACTIVE and manager.optimizers.seed_ids == []
    assert host_group_ids(rig) == base + [id(p) for p in manager.seed(SEED0).seed_parameters()]
    train(3)
    train.check()


def test_a_scheduler_made_after_the_checkpoint_keeps_its_group_keys(rig: Rig, mlp):
    """OneCycleLR writes initial_lr, max_lr, ... into the groups when it is made; a checkpoint
    older than the scheduler lacks them, and the rollback keeps the live ones."""
    manager = rig.manager
    assert rig.send("germinate", SEED0, mlp)
    rig.train(2)
    manager.end_epoch(0)
    train = Trainer(rig, SCHEDULES["onecycle"])
    epoch = walk_to_active(rig, train, 1)
    manager.end_epoch(epoch)
    assert run_command(manager, rig.signed(make_rollback_command(0, reason="test")))
    assert "initial_lr" in train.host_opt.param_groups[0]
    train(3)  # KeyError: 'initial_lr' without them
    train.check()


@pytest.mark.parametrize("option", ["fused", "foreach"])
def test_a_rollback_keeps_the_optimizers_constructor_options(
    tmp_path, store, keyring: Keyring, mlp, option
):
    rig = Rig(make_config(tmp_path, store), keyring, **{option: True})
    manager = rig.manager
    host_opt = manager.optimizers.optimizer("host")
    assert rig.send("germinate", SEED0, mlp)
    rig.train(2)
    manager.end_epoch(0)
    assert rig.send("cull", SEED0)  # its optimizer goes: the rollback must make one again
    rig.train(1)
    manager.end_epoch(1)
    assert run_command(manager, rig.signed(make_rollback_command(0, reason="test")))
    assert manager.optimizers.optimizer("host") is host_opt
    for oid in ("host", SEED0):
        opt = manager.optimizers.optimizer(oid)
        assert opt.defaults[option] is True, oid
        assert opt.param_groups[0][option] is True, oid
        if option == "fused":  # set by the constructor only; GradScaler reads it
            assert getattr(opt, "_step_supports_amp_scaling", False), oid
    report = rig.train(2)
    assert report["host_stepped"] and report["seeds_stepped"] == [SEED0]


@pytest.mark.parametrize(
    "make",
    [
        lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=6),
        lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5),
        lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=6),
    ],
    ids=["cosine", "step", "onecycle"],
)
def test_a_tracked_scheduler_follows_a_rollback(rig: Rig, make) -> None:
    """A scheduler left at its own step count after a ROLLBACK set the restored lr from the
    abandoned timeline: a chained cosine schedule climbed to 6x its base lr on the replay, and
    OneCycleLR raised once it passed its last step. ``manager.track`` saves its state in every
    checkpoint and puts it back with the rollback, so the replay repeats the first pass."""
    manager = rig.manager
    host_opt = manager.optimizers.optimizer("host")
    scheduler = make(host_opt)
    manager.track("scheduler", scheduler)
    first: list[float] = []
    for epoch in range(4):
        rig.train(1)
        manager.end_epoch(epoch)
        scheduler.step()
        first.append(host_opt.param_groups[0]["lr"])
    assert run_command(manager, rig.signed(make_rollback_command(1)))
    assert scheduler.last_epoch == 1  # as when epoch 1's checkpoint was written
    replay = []
    for epoch in range(2, 6):
        rig.train(1)
        manager.end_epoch(epoch)
        scheduler.step()
        replay.append(host_opt.param_groups[0]["lr"])
    assert replay[:2] == first[1:3]  # the lrs of the first pass, from the same epoch on
    assert max(replay) <= max(first)


def test_a_rollback_that_fails_leaves_a_tracked_object_as_it_was(rig: Rig) -> None:
    """All or nothing: a tracked object's state is loaded with the weights; when a later part
    of the rollback fails, it is put back as it was, with everything else."""

    class Counter:
        def __init__(self) -> None:
            self.count = 0

        def state_dict(self) -> dict[str, int]:
            return {"count": self.count}

        def load_state_dict(self, state: dict[str, int]) -> None:
            self.count = state["count"]

    class Broken(Counter):
        def load_state_dict(self, state: dict[str, int]) -> None:
            if self.fail:
                raise ValueError("cannot load")
            super().load_state_dict(state)

    manager = rig.manager
    counter, broken = Counter(), Broken()
    broken.fail = False
    manager.track("counter", counter)
    manager.track("broken", broken)  # loaded after the counter
    rig.train(1)
    manager.end_epoch(0)
    rig.train(1)
    counter.count = broken.count = 7
    weights = [p.detach().clone() for p in rig.model.parameters()]
    broken.fail = True
    assert not run_command(manager, rig.signed(make_rollback_command(0)))
    assert counter.count == broken.count == 7  # the counter's load was undone
    assert all(torch.equal(a, b) for a, b in zip(weights, rig.model.parameters(), strict=True))
    broken.fail = False
    assert run_command(manager, rig.signed(make_rollback_command(0)))
    assert counter.count == broken.count == 0
    assert not all(torch.equal(a, b) for a, b in zip(weights, rig.model.parameters(), strict=True))
    with pytest.raises(TypeError, match="no state_dict/load_state_dict"):
        manager.track("lr", 0.1)


class _Holder:
    """A tracked object whose state is whatever value it holds."""

    def __init__(self, value: object) -> None:
        self.value = value

    def state_dict(self) -> dict[str, object]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.value = state["value"]


def test_a_tracked_state_a_checkpoint_cannot_hold_is_refused_or_left_out(rig: Rig, caplog) -> None:
    """A tracked state holding a NumPy array (or a deque, a function) went into every
    checkpoint, which ``weights_only=True`` then refused: every later ROLLBACK failed."""
    import numpy as np

    manager = rig.manager
    with pytest.raises(TypeError, match="'bad'.* holds .*numpy"):
        manager.track("bad", _Holder(np.zeros(3)))
    later = _Holder([1, 2.0, "x", torch.ones(2), np.float64(0.5)])  # plain, when tracked
    manager.track("later", later)
    rig.train(1)
    manager.end_epoch(0)
    later.value = np.zeros(3)  # no longer plain: left out of the next checkpoint, logged
    rig.train(1)
    manager.end_epoch(1)
    assert "tracked 'later' left out of the checkpoint" in caplog.text
    assert run_command(manager, rig.signed(make_rollback_command(1)))  # not vetoed
    assert isinstance(later.value, np.ndarray)  # epoch 1 holds no state of it: left alone
    assert run_command(manager, rig.signed(make_rollback_command(0)))
    assert later.value[:3] == [1, 2.0, "x"] and later.value[4] == 0.5


def test_a_tracked_state_weights_only_reads_is_kept_and_restored(rig: Rig) -> None:
    """Bytes, a set and a device are what ``weights_only`` reads: ``track`` refused them (a
    list of types judged it), though a checkpoint holds them and a rollback puts them back."""

    manager = rig.manager
    held = _Holder([b"xy", {1, 2}, torch.device("cpu")])
    manager.track("held", held)
    rig.train(1)
    manager.end_epoch(0)
    held.value = None
    assert run_command(manager, rig.signed(make_rollback_command(0)))
    assert held.value == [b"xy", {1, 2}, torch.device("cpu")]


def test_an_object_tracked_again_under_a_name_is_left_alone_by_older_checkpoints(
    rig: Rig,
) -> None:
    """An EMA copy made again after a CULL (as README advises) and tracked under the same
    name: the old copy's state, in older checkpoints, vetoed every rollback to them."""

    class Strict:
        def __init__(self, size: int) -> None:
            self.weights = torch.zeros(size)

        def state_dict(self) -> dict[str, torch.Tensor]:
            return {"weights": self.weights}

        def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
            if state["weights"].shape != self.weights.shape:
                raise ValueError("size mismatch")
            self.weights = state["weights"].clone()

    manager = rig.manager
    manager.track("ema", Strict(3))
    rig.train(1)
    manager.end_epoch(0)
    again = Strict(5)
    manager.track("ema", again)  # a new generation
    rig.train(1)
    manager.end_epoch(1)
    again.weights += 1
    assert run_command(manager, rig.signed(make_rollback_command(0)))
    assert torch.equal(again.weights, torch.ones(5))  # the old copy's state is not its
    assert run_command(manager, rig.signed(make_rollback_command(1)))
    assert torch.equal(again.weights, torch.zeros(5))


class TwoHeads(torch.nn.Module):
    """A body and two heads; each step uses one (multi-task training, a head used rarely)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Linear(6, 8)
        self.head_a = torch.nn.Linear(8, 4)
        self.head_b = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor, task: int) -> torch.Tensor:
        return (self.head_a if task == 0 else self.head_b)(torch.relu(self.body(x)))


@pytest.mark.parametrize("set_to_none", [True, False])
def test_the_host_gradients_are_cleared_as_the_config_says(tmp_path, set_to_none: bool) -> None:
    """``step()`` cleared the host's gradients to None, whatever the user's loop meant: with
    Adam, a head a step does not reach keeps stepping on its moments in a plain loop that
    zeroes in place (``zero_grad(set_to_none=False)``), and under the manager it stopped.
    ``host_grads_set_to_none=False`` gives that loop's update, every seed DORMANT."""
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 4, (16,), generator=torch.Generator().manual_seed(2))
    tasks = [0, 1, 0, 0, 0]
    plain = TwoHeads()
    opt = torch.optim.Adam(plain.parameters(), lr=1e-2)
    for task in tasks:
        opt.zero_grad(set_to_none=set_to_none)
        F.cross_entropy(plain(x, task), y).backward()
        opt.step()
    config = make_config(tmp_path, tmp_path / "urza", host_grads_set_to_none=set_to_none)
    manager = KasminaKernelManager(config, keyring=Keyring({"ctl": generate_key()}))
    grown = TwoHeads()
    manager.attach(grown, ["head_a"], seeds_per_layer=2, chunk_size=2, host_lr=1e-2)
    for task in tasks:
        manager.backward(F.cross_entropy(grown(x, task), y))
        assert manager.step()["host_stepped"]
    for name, p in plain.named_parameters():
        got = grown.get_parameter(name.replace("head_a.", "head_a.host."))
        assert torch.equal(got, p), name
    kept = [p.grad for p in manager.require_registry().host_params]
    assert all((g is None) == set_to_none for g in kept)
    assert set_to_none or all(not g.any() for g in kept)
    manager.close()


def test_a_step_command_at_a_safe_point_moves_no_weight(tmp_path, store, keyring) -> None:
    """A controller's STEP (the command that sets a learning rate at run time) is applied at
    a safe point, where the step's gradients were applied and cleared. Kept as zeros
    (``host_grads_set_to_none=False``), Adam stepped on them: the host's weights moved on its
    moments alone. It sets the rate and steps nothing now."""
    rig = Rig(make_config(tmp_path, store, host_grads_set_to_none=False), keyring)
    rig.train(3)
    before = [p.detach().clone() for p in rig.manager.require_registry().host_params]
    command = make_optimizer_command("step", "host", learning_rate=0.01)
    assert run_command(rig.manager, rig.signed(command))
    assert rig.manager.optimizers.optimizer("host").param_groups[0]["lr"] == 0.01
    after = rig.manager.require_registry().host_params
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_a_refused_optimizer_command_says_why_in_the_command_log(rig: Rig) -> None:
    """The command log said only "rejected by the optimizer manager (see its log)"."""
    command = make_optimizer_command("create_seed", "no-such-seed", learning_rate=0.01)
    assert not run_command(rig.manager, rig.signed(command))
    reason = rig.manager.command_log[-1][3]
    assert "rejected by the optimizer manager: KeyError" in reason and "no-such-seed" in reason


def test_a_seed_fossilized_before_initialize_host_joins_the_host_optimizer(
    tmp_path, store, keyring, mlp
) -> None:
    """With no host optimizer (``host_lr=None``) an ACTIVE seed keeps stepping on its own.
    INITIALIZE_HOST then made the host's without it: the fossilized seed trained on at its own
    lr, outside the host's groups and schedules, and its optimizer outlived its TERMINATE. It
    joins the new host optimizer in its slot's group, and a TERMINATE drops an own one."""
    rig = Rig(make_config(tmp_path, store), keyring, host_lr=None)
    manager = rig.manager
    assert rig.send("germinate", SEED0, mlp)
    walk_to_active(rig, rig.train, 0)
    assert manager.optimizers.optimizer_ids == [SEED0]  # stepped alone, as documented
    command = make_optimizer_command("initialize_host", learning_rate=0.01)
    assert run_command(manager, rig.signed(command))
    assert manager.optimizers.optimizer_ids == ["host"]
    kernel = manager.seed(SEED0).seed_parameters()
    group = manager.optimizers.optimizer("host").param_groups[0]["params"]
    assert all(any(p is q for q in group) for p in kernel)
    assert manager.optimizers.promoted()[SEED0][0] == 0
    rig.train(1)
    second = Rig(make_config(tmp_path / "b", store), keyring, host_lr=None)
    assert second.send("germinate", SEED0, mlp)
    walk_to_active(second, second.train, 0)
    assert second.send("terminate", SEED0) and second.stage(SEED0) == S.TERMINATED
    assert second.manager.optimizers.optimizer_ids == []
    # Nor does a CREATE_SEED give the TERMINATED seed one back (over weights that run no more).
    create = make_optimizer_command("create_seed", SEED0)
    assert not run_command(second.manager, second.signed(create))
    assert "TERMINATED: it runs no kernel" in second.manager.command_log[-1][3]
    assert second.manager.optimizers.optimizer_ids == []
    second.train(1)
    manager.close()
    second.manager.close()


def test_initialize_host_builds_with_attachs_optimizer_options(tmp_path, store, keyring):
    """``attach(host_lr=None, optimizer_cls=AdamW, weight_decay=0.0)`` and then INITIALIZE_HOST
    gave a host optimizer with AdamW's default decay (0.01): the command's options alone. Its
    own parameters still go over attach's."""
    options = {"host_lr": None, "optimizer_cls": torch.optim.AdamW, "weight_decay": 0.0}
    rig = Rig(make_config(tmp_path, store), keyring, eps=1e-6, **options)
    command = make_optimizer_command("initialize_host", learning_rate=0.01)
    assert run_command(rig.manager, rig.signed(command))
    group = rig.manager.optimizers.optimizer("host").param_groups[0]
    assert (group["weight_decay"], group["eps"], group["lr"]) == (0.0, 1e-6, 0.01)
    other = Rig(make_config(tmp_path / "b", store), keyring, eps=1e-6, **options)
    command = make_optimizer_command(
        "initialize_host", learning_rate=0.01, parameters={"weight_decay": 0.5}
    )
    assert run_command(other.manager, other.signed(command))
    group = other.manager.optimizers.optimizer("host").param_groups[0]
    assert (group["weight_decay"], group["eps"]) == (0.5, 1e-6)
    rig.manager.close()
    other.manager.close()


def test_a_host_optimizer_a_rollback_rebuilds_keeps_initialize_hosts_options(
    tmp_path, store, keyring
) -> None:
    """A ROLLBACK back past INITIALIZE_HOST and forward again (or one in a resumed process)
    rebuilt the host optimizer with attach's options and lr 1e-3: its groups came back, its
    ``defaults`` did not, and a group added afterwards (``add_param_group`` of a layer
    unfrozen) trained at lr 1e-3 without weight decay or momentum."""
    rig = Rig(make_config(tmp_path, store), keyring, host_lr=None, optimizer_cls=torch.optim.SGD)
    manager = rig.manager
    rig.train(1)
    manager.end_epoch(0)  # saved without a host optimizer
    command = make_optimizer_command(
        "initialize_host", learning_rate=0.25, parameters={"weight_decay": 0.1, "momentum": 0.5}
    )
    assert run_command(manager, rig.signed(command))
    keys = ("lr", "weight_decay", "momentum")
    made = {k: manager.optimizers.optimizer("host").defaults[k] for k in keys}
    assert made == {"lr": 0.25, "weight_decay": 0.1, "momentum": 0.5}
    rig.train(1)
    manager.end_epoch(1)
    for epoch in (0, 1):
        assert run_command(manager, rig.signed(make_rollback_command(epoch)))
    host = manager.optimizers.optimizer("host")
    assert {k: host.defaults[k] for k in keys} == made
    host.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})
    assert {k: host.param_groups[-1][k] for k in keys} == made
    manager.close()


def test_a_seed_promoted_into_a_host_group_with_momentum_keeps_the_host_training(
    tmp_path, store, keyring, mlp
) -> None:
    """Signed commands alone: INITIALIZE_HOST built an RMSprop host optimizer with momentum,
    the seeds' own had none. At ACTIVE the seed's state was carried into the host's group as
    it was, without the ``momentum_buffer`` that group steps with: every ``step()`` after
    raised ``KeyError`` (the host step not contained, global_step stuck). Now the state that
    does not fit the group is left behind and the seed and the host train on."""
    rig = Rig(
        make_config(tmp_path, store), keyring, host_lr=None, optimizer_cls=torch.optim.RMSprop
    )
    manager = rig.manager
    command = make_optimizer_command(
        "initialize_host", learning_rate=0.01, parameters={"momentum": 0.9}
    )
    assert run_command(manager, rig.signed(command))
    assert rig.send("germinate", SEED0, mlp)
    rig.train(2)
    manager.end_epoch(0)
    walk_to_active(rig, rig.train, 1)
    assert SEED0 in manager.optimizers.promoted()
    seed_params = manager.seed(SEED0).seed_parameters()
    before, step = [p.detach().clone() for p in seed_params], manager.global_step
    for _ in range(2):
        assert rig.train(1)["host_stepped"]  # raised KeyError: 'momentum_buffer'
    assert manager.global_step == step + 2
    assert any(not torch.equal(a, p) for a, p in zip(before, seed_params, strict=True))
    state = manager.optimizers.optimizer("host").state
    assert all("momentum_buffer" in state[p] for p in seed_params)
    manager.close()


@pytest.mark.parametrize("host_lr", [0.05, None])
def test_an_active_seed_skips_an_unclean_step_with_the_host(
    tmp_path, store, keyring, mlp, host_lr
) -> None:
    """An ACTIVE seed is part of the host: a step whose isolation check failed skips it with
    the host's parameters, and drops its gradient. Under ``host_lr=None`` it keeps an optimizer
    of its own, which was still stepped, while every other host gradient was dropped."""
    rig = Rig(make_config(tmp_path, store), keyring, host_lr=host_lr)
    manager = rig.manager
    assert rig.send("germinate", SEED0, mlp)
    walk_to_active(rig, rig.train, 0)
    kernel = manager.seed(SEED0).seed_parameters()
    before = [p.detach().clone() for p in kernel]
    loss = F.cross_entropy(rig.model(rig.x), rig.y)
    manager.backward(loss, kd_loss=through_a_seed(rig.model.inp.bias.sum()))  # a seed's leak
    report = manager.step()
    assert not report["isolation_clean"] and not report["host_stepped"]
    assert SEED0 not in report["seeds_stepped"]
    assert all(torch.equal(a, p) for a, p in zip(before, kernel, strict=True))
    assert all(p.grad is None or not p.grad.any() for p in kernel)
    rig.train(1)  # a clean step trains it again
    assert not all(torch.equal(a, p) for a, p in zip(before, kernel, strict=True))
    manager.close()


def test_initialize_host_after_active_under_fused_sgd_momentum_keeps_the_host_stepping(
    tmp_path, store, keyring, mlp
) -> None:
    """Under ``attach(host_lr=None)`` with fused SGD and momentum, a seed gone ACTIVE stepped on
    its own optimizer (momentum buffers); INITIALIZE_HOST then made the host's, whose parameters
    had none beside the seed's carried ones, and torch's fused step raised at every ``step()``.
    Now every parameter of the group steps, each with a buffer."""
    options = {"optimizer_cls": torch.optim.SGD, "momentum": 0.9, "fused": True}
    rig = Rig(make_config(tmp_path, store), keyring, host_lr=None, **options)
    manager = rig.manager
    assert rig.send("germinate", SEED0, mlp)
    walk_to_active(rig, rig.train, 0)
    command = make_optimizer_command("initialize_host", learning_rate=0.01)
    assert run_command(manager, rig.signed(command))
    host = manager.optimizers.optimizer("host")
    assert host.param_groups[0]["fused"] and SEED0 in manager.optimizers.promoted()
    step = manager.global_step
    for _ in range(2):
        assert rig.train(1)["host_stepped"]  # raised TypeError: expected Tensor, got NoneType
    assert manager.global_step == step + 2
    assert all("momentum_buffer" in host.state[p] for p in host.param_groups[0]["params"])
    manager.close()
