"""``ManagerOptimizer`` as the loops around it use a ``torch.optim.Optimizer``: under a
``GradScaler`` (``scaler.step(optimizer)``, accelerate's and Trainer's fp16 path), with a step
the loop skips or a batch it drops (``zero_grad``), with hooks, copied or pickled.

Each rig holds a seed in ISOLATED_INIT (a real exported kernel) beside the host, trained by
SGD, whose step moves a weight by exactly the gradient it is given.
"""

from __future__ import annotations

import copy
import pickle
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from kasmina.manager.framework import ManagerOptimizer
from kasmina.utils.keyring import Keyring
from tests.manager.helpers import SEED0, Rig, S, make_config


def _rig(tmp_path: Path, store: Path, keyring: Keyring, mlp: str) -> Rig:
    rig = Rig(make_config(tmp_path, store), keyring, optimizer_cls=torch.optim.SGD)
    assert rig.send("germinate", SEED0, mlp)
    assert rig.stage(SEED0) == S.ISOLATED_INIT
    return rig


def _weights(rig: Rig) -> list[torch.Tensor]:
    return [p.detach().clone() for p in rig.model.parameters()]


def _a_refused_step_gives_the_gradients_back(rig: Rig, optimizer: ManagerOptimizer, scaler) -> None:
    """The manager's step raises once inside ``scaler.step``: the gradients come back as they
    were before it."""
    grads = [p.grad.clone() for p in rig.model.parameters() if p.grad is not None]

    def refused(manager=rig.manager, step=rig.manager.step, **_):
        manager.step = step  # once
        raise RuntimeError("refused")

    rig.manager.step = refused
    with pytest.raises(RuntimeError, match="refused"):
        scaler.step(optimizer)
    now = [p.grad for p in rig.model.parameters() if p.grad is not None]
    assert all(torch.equal(a, b) for a, b in zip(grads, now, strict=True))


def _scaled_step(rig: Rig, optimizer: ManagerOptimizer, scaler, factor: float = 1.0) -> None:
    loss = F.cross_entropy(rig.model(rig.x), rig.y) * factor
    rig.manager.backward(scaler.scale(loss), kd_loss=rig.manager.collect_kd_losses())
    scaler.step(optimizer)
    scaler.update()


def test_a_grad_scaler_step_unscales_the_seeds_too(
    tmp_path: Path, store: Path, keyring: Keyring, mlp: str
) -> None:
    """``scaler.step(ManagerOptimizer)`` unscaled (and inf-checked) the host's groups only: the
    seed stepped on its gradient times the scale (65536), its weights thrown far off. The step
    takes the scale and unscales every optimizer's gradients: the same weights as the README's
    hand-written loop (every optimizer unscaled, then ``manager.step``)."""
    rigs = [_rig(tmp_path / name, store, keyring, mlp) for name in ("framework", "hand")]
    framework, hand = rigs
    optimizer = ManagerOptimizer(framework.manager)
    scaler = torch.amp.GradScaler("cpu")
    _scaled_step(framework, optimizer, scaler)
    hand_scaler = torch.amp.GradScaler("cpu")
    loss = F.cross_entropy(hand.model(hand.x), hand.y)
    hand.manager.backward(hand_scaler.scale(loss))
    for optimizer_id in hand.manager.optimizers.optimizer_ids:
        hand_scaler.unscale_(hand.manager.optimizers.optimizer(optimizer_id))
    hand.manager.step(grad_clip_norm=float("inf"))
    hand_scaler.update()
    assert framework.manager.state.global_step == hand.manager.state.global_step == 1
    assert all(torch.equal(a, b) for a, b in zip(_weights(framework), _weights(hand), strict=True))
    for rig in rigs:
        rig.manager.close()


def test_an_overflowing_step_skips_and_the_next_one_steps(
    tmp_path: Path, store: Path, keyring: Keyring, mlp: str
) -> None:
    """An overflow made GradScaler skip the optimizer's step altogether, and ``zero_grad``
    did nothing, so its inf gradients stayed: every later step overflowed too, and the
    manager never stepped (nor reached a safe point) again. Now the manager's step runs and
    skips the non-finite optimizers, the scale halves, and training goes on."""
    rig = _rig(tmp_path, store, keyring, mlp)
    optimizer = ManagerOptimizer(rig.manager)
    scaler = torch.amp.GradScaler("cpu")
    for step, factor in enumerate([1.0, float("inf"), 1.0, 1.0]):
        before = _weights(rig)
        optimizer.zero_grad()
        _scaled_step(rig, optimizer, scaler, factor)
        moved = not all(torch.equal(a, b) for a, b in zip(before, _weights(rig), strict=True))
        assert moved == (factor == 1.0)
        assert rig.manager.state.global_step == step + 1
    assert scaler.get_scale() == 65536.0 / 2
    assert all(torch.isfinite(w).all() for w in _weights(rig))
    rig.manager.close()


def test_a_framework_unscaling_the_host_alone_is_refused(
    tmp_path: Path, store: Path, keyring: Keyring, mlp: str
) -> None:
    """``scaler.unscale_(ManagerOptimizer)`` (a framework's own clipping) reaches the host's
    groups only: the step refuses rather than train the seed on scaled gradients."""
    rig = _rig(tmp_path, store, keyring, mlp)
    optimizer = ManagerOptimizer(rig.manager)
    scaler = torch.amp.GradScaler("cpu")
    rig.manager.backward(scaler.scale(F.cross_entropy(rig.model(rig.x), rig.y)))
    scaler.unscale_(optimizer)
    before = _weights(rig)
    with pytest.raises(RuntimeError, match="unscaled ManagerOptimizer before its step"):
        scaler.step(optimizer)
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(rig), strict=True))
    rig.manager.close()


def test_zero_grad_drops_a_batch_the_loop_discards(
    tmp_path: Path, store: Path, keyring: Keyring, mlp: str
) -> None:
    """A loop that drops a batch after its backward (``optimizer.zero_grad(); continue``)
    had its gradients applied with the next batch's: ``zero_grad`` did nothing. It clears the
    host's and the seeds' gradients (the seeds' to None whatever ``set_to_none`` says)."""
    rigs = [_rig(tmp_path / name, store, keyring, mlp) for name in ("dropped", "clean")]
    for rig in rigs:
        optimizer = ManagerOptimizer(rig.manager)
        if rig is rigs[0]:
            rig.manager.backward(F.cross_entropy(rig.model(rig.x * 100), rig.y))
            optimizer.zero_grad(set_to_none=False)
            host = rig.manager.optimizers.parameters("host")
            assert all(p.grad is not None and not p.grad.any() for p in host)
            assert all(p.grad is None for p in rig.manager.optimizers.parameters(SEED0))
        rig.manager.backward(F.cross_entropy(rig.model(rig.x), rig.y))
        optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(*map(_weights, rigs), strict=True))
    for rig in rigs:
        rig.manager.close()


def test_hooks_run_and_a_copy_is_refused_without_harm(
    tmp_path: Path, store: Path, keyring: Keyring, mlp: str
) -> None:
    """A copy or an unpickle went through ``Optimizer.__setstate__``, which wrapped the class's
    ``step`` with torch's hook runner, and every ``ManagerOptimizer`` in the process then
    raised on ``step`` (no hook dicts). A copy is refused; step and state-dict hooks run."""
    rig = _rig(tmp_path, store, keyring, mlp)
    optimizer = ManagerOptimizer(rig.manager)
    calls: list[str] = []
    optimizer.register_step_pre_hook(lambda *_: calls.append("pre"))
    optimizer.register_step_post_hook(lambda *_: calls.append("post"))
    optimizer.register_state_dict_post_hook(lambda _, state: calls.append("state") or state)
    for copier in (copy.copy, copy.deepcopy, pickle.dumps):
        with pytest.raises(TypeError, match="cannot be copied or pickled"):
            copier(optimizer)
    for _ in range(2):
        rig.manager.backward(F.cross_entropy(rig.model(rig.x), rig.y))
        optimizer.step()
    assert ManagerOptimizer(rig.manager).state_dict()["optimizers"].keys() == {"host", SEED0}
    optimizer.state_dict()
    assert calls == ["pre", "post", "pre", "post", "state"]
    assert rig.manager.state.global_step == 2
    rig.manager.close()


@pytest.mark.parametrize("optimizer_cls", [torch.optim.Adam, torch.optim.SGD])
def test_a_state_with_moments_of_another_shape_is_refused_before_it_loads(
    tmp_path: Path, store: Path, keyring: Keyring, mlp: str, optimizer_cls
) -> None:
    """The load checked the parameters' shapes, not the state's tensors: Adam moments of
    another shape loaded without a word, and every later host step raised (as after a group
    without ``betas``). Refused, nothing loaded; an empty live state (a fresh, resumed manager)
    is checked all the same."""
    options = {"momentum": 0.9} if optimizer_cls is torch.optim.SGD else {}
    rig = Rig(make_config(tmp_path, store), keyring, optimizer_cls=optimizer_cls, **options)
    optimizer = ManagerOptimizer(rig.manager)
    for _ in range(2):
        rig.manager.backward(F.cross_entropy(rig.model(rig.x), rig.y))
        optimizer.step()
    saved = copy.deepcopy(optimizer.state_dict())
    host_state = saved["optimizers"]["host"]["state"]["state"]
    key = "exp_avg" if optimizer_cls is torch.optim.Adam else "momentum_buffer"
    rig.manager.optimizers.optimizer("host").state.clear()
    for wrong in (torch.zeros(3), torch.zeros(1), torch.tensor(0.0)):  # one element broadcasts
        host_state[0][key] = wrong
        with pytest.raises(ValueError, match=f"state '{key}' of parameter 0 is \\("):
            optimizer.load_state_dict(saved)
    host_state[0][key] = 0.5  # not a tensor: refused too
    with pytest.raises(ValueError, match=f"state '{key}' of parameter 0 is a float"):
        optimizer.load_state_dict(saved)
    if "step" in host_state[0]:  # a scalar of three elements: every step raised
        step, host_state[0]["step"] = host_state[0]["step"], torch.zeros(3)
        with pytest.raises(ValueError, match="state 'step' of parameter 0 is not a number"):
            optimizer.load_state_dict(saved)
        host_state[0]["step"] = step
    assert not rig.manager.optimizers.optimizer("host").state  # nothing loaded
    host_state[0][key] = torch.zeros(rig.manager.optimizers.parameters("host")[0].shape)
    # A group without a hyperparameter the step reads loaded, and every later step raised
    # KeyError; one the class fills in on load (a key newer than the state) is no problem.
    group = saved["optimizers"]["host"]["state"]["param_groups"][0]
    needed = "betas" if optimizer_cls is torch.optim.Adam else "momentum"
    value = group.pop(needed)
    with pytest.raises(ValueError, match=f"param group 0 has no '{needed}'"):
        optimizer.load_state_dict(saved)
    assert not rig.manager.optimizers.optimizer("host").state
    group[needed] = value
    group.pop("maximize"), group.pop("foreach")
    optimizer.load_state_dict(saved)  # the right shape loads, and steps
    rig.manager.backward(F.cross_entropy(rig.model(rig.x), rig.y))
    optimizer.step()
    assert rig.manager.state.global_step == 3
    rig.manager.close()


def test_a_step_that_raises_under_a_grad_scaler_leaves_the_gradients_as_they_came(
    tmp_path: Path, store: Path, keyring: Keyring, mlp: str
) -> None:
    """The step unscaled the gradients, then the manager's step raised: they stayed unscaled,
    and the scaler's ``grad_scale`` stayed on the optimizer, so the retry unscaled them again
    by the square of the scale and trained nothing. They come back scaled, nothing is left
    behind, and the retry steps as one first try does. A bad norm is refused when built."""
    with pytest.raises(ValueError, match="grad_clip_norm must be >= 0"):
        ManagerOptimizer(_rig(tmp_path / "bad", store, keyring, mlp).manager, grad_clip_norm=-1)
    rigs = [_rig(tmp_path / name, store, keyring, mlp) for name in ("retried", "once")]
    for rig in rigs:
        optimizer = ManagerOptimizer(rig.manager)
        scaler = torch.amp.GradScaler("cpu")
        rig.manager.backward(scaler.scale(F.cross_entropy(rig.model(rig.x), rig.y)))
        if rig is rigs[0]:
            _a_refused_step_gives_the_gradients_back(rig, optimizer, scaler)
            assert not hasattr(optimizer, "grad_scale") and not hasattr(optimizer, "found_inf")
        scaler.step(optimizer)
        scaler.update()
    assert all(torch.equal(a, b) for a, b in zip(*map(_weights, rigs), strict=True))
    for rig in rigs:
        rig.manager.close()


def _overflowing_at_a_high_scale(rig: Rig, scaler) -> None:
    """The seed's gradients overflow while the scale is above 2**10 (an fp16 backward through
    the seed at too high a scale); the host's never do."""
    for p in rig.manager.optimizers.parameters(SEED0):
        p.register_hook(lambda g: g * float("inf") if scaler.get_scale() > 2**10 else g)


def test_given_its_scaler_a_seeds_overflow_lowers_the_scale(
    tmp_path: Path, store: Path, keyring: Keyring, mlp: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The scaler checked the host's groups only (the optimizer's ``param_groups``): a seed
    that overflowed at too high a scale never lowered it, was skipped every step, and was
    charged a fault after 8 and quarantined. Given the scaler, the step unscales each
    optimizer through it, which records the seed's overflow: the scale backs off as in the
    README's hand-written loop and the seed trains. Without it, a warning says so; and a
    framework's own ``unscale_`` of the optimizer is followed by the seeds'."""
    rigs = {name: _rig(tmp_path / name, store, keyring, mlp) for name in ("given", "hand")}
    scalers = {name: torch.amp.GradScaler("cpu") for name in rigs}
    for name, rig in rigs.items():
        _overflowing_at_a_high_scale(rig, scalers[name])
    optimizer = ManagerOptimizer(rigs["given"].manager, scaler=scalers["given"])
    for step in range(12):
        for name, rig in rigs.items():
            scaler = scalers[name]
            loss = F.cross_entropy(rig.model(rig.x), rig.y)
            rig.manager.backward(scaler.scale(loss))
            if name == "given":
                if step % 2:  # a framework that clips unscales first
                    scaler.unscale_(optimizer)
                scaler.step(optimizer)
            else:
                for optimizer_id in rig.manager.optimizers.optimizer_ids:
                    scaler.unscale_(rig.manager.optimizers.optimizer(optimizer_id))
                rig.manager.step(grad_clip_norm=float("inf"))
            scaler.update()
    assert scalers["given"].get_scale() == scalers["hand"].get_scale() <= 2**10
    assert all(torch.equal(a, b) for a, b in zip(*map(_weights, rigs.values()), strict=True))
    record = rigs["given"].manager.require_registry()[SEED0]
    assert rigs["given"].stage(SEED0) == S.ISOLATED_INIT and record.seed.faults == 0
    unnamed = _rig(tmp_path / "unnamed", store, keyring, mlp)
    scaler = torch.amp.GradScaler("cpu")
    with caplog.at_level("WARNING", logger="kasmina.manager.framework"):
        _scaled_step(unnamed, ManagerOptimizer(unnamed.manager), scaler)
    assert "without being given to it" in caplog.text
    for rig in [*rigs.values(), unnamed]:
        rig.manager.close()


def test_a_sparse_host_steps_under_a_grad_scaler(tmp_path: Path, store: Path, keyring) -> None:
    """The step checks every optimizer's gradients for overflow by clipping at +inf, and
    clipping refused sparse gradients: a host with a sparse embedding never stepped again.
    At +inf their coalesced values are read (nothing is scaled)."""
    from kasmina.manager.manager import KasminaKernelManager

    manager = KasminaKernelManager(make_config(tmp_path, store), keyring=keyring)
    model = torch.nn.Sequential(torch.nn.Embedding(10, 8, sparse=True), torch.nn.Linear(8, 4))
    manager.attach(model, ["1"], 2, 2, host_lr=0.1, optimizer_cls=torch.optim.SGD)
    optimizer, scaler = ManagerOptimizer(manager), torch.amp.GradScaler("cpu")
    tokens, labels = torch.tensor([1, 2, 3, 2]), torch.tensor([0, 1, 2, 3])
    before = model[0].weight.detach().clone()
    for _ in range(2):
        manager.backward(scaler.scale(F.cross_entropy(model(tokens), labels)))
        scaler.step(optimizer)
        scaler.update()
    assert manager.state.global_step == 2
    moved = (model[0].weight != before).any(dim=1)
    assert moved.tolist() == [i in (1, 2, 3) for i in range(10)]
    manager.close()


def test_the_scaler_given_must_be_the_one_stepping(
    tmp_path: Path, store: Path, keyring: Keyring, mlp: str
) -> None:
    """``scaler=`` another GradScaler than the one stepping unscaled the gradients by its own
    scale (a weight moved by 36 in one SGD step): refused by name, nothing left behind. A step
    that raised with the right scaler gives the gradients back scaled, and after the scaler's
    ``update()`` a retry steps as one first try does."""
    rigs = [_rig(tmp_path / name, store, keyring, mlp) for name in ("retried", "once")]
    for rig in rigs:
        scaler = torch.amp.GradScaler("cpu")
        other = torch.amp.GradScaler("cpu", init_scale=16.0)
        other.scale(torch.ones(()))  # used: it holds a scale of its own
        optimizer = ManagerOptimizer(rig.manager, scaler=other)
        rig.manager.backward(scaler.scale(F.cross_entropy(rig.model(rig.x), rig.y)))
        before = _weights(rig)
        with pytest.raises(ValueError, match="scaler= .* is not the GradScaler that steps it"):
            scaler.step(optimizer)
        assert not hasattr(optimizer, "grad_scale") and not hasattr(optimizer, "found_inf")
        assert all(torch.equal(a, b) for a, b in zip(before, _weights(rig), strict=True))
        optimizer.scaler = scaler
        if rig is rigs[0]:
            _a_refused_step_gives_the_gradients_back(rig, optimizer, scaler)
            scaler.update()  # the scaler's records of the refused step
        scaler.step(optimizer)
        scaler.update()
    assert all(torch.equal(a, b) for a, b in zip(*map(_weights, rigs), strict=True))
    for rig in rigs:
        rig.manager.close()


@pytest.mark.parametrize("given", [True, False], ids=["given", "not-given"])
def test_a_rollback_in_a_scaled_step_leaves_the_tracked_scaler_as_its_checkpoint(
    tmp_path: Path, store: Path, keyring: Keyring, mlp: str, given: bool
) -> None:
    """A ROLLBACK applied at the safe point of a step inside ``scaler.step`` restores the
    tracked GradScaler, and the framework's ``scaler.update()`` then applied that abandoned
    step's overflow to it (scale halved, growth count reset): one update off its checkpoint
    for the rest of the run. That update keeps the restored scale now, and the next one is the
    class's own (or the user's wrapper, kept). With ``scaler=`` given, only that one is held.
    A hold the loop never used (a step without the scaler next) ends at that step."""
    from kasmina.control.builders import make_rollback_command

    rig = _rig(tmp_path, store, keyring, mlp)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)
    other = torch.amp.GradScaler("cpu", init_scale=8.0)  # tracked, another optimizer's
    optimizer = ManagerOptimizer(rig.manager, scaler=scaler if given else None)
    rig.manager.track("scaler", scaler)
    rig.manager.track("other", other)
    updates: list[float | None] = []
    update = scaler.update

    def wrapper(new_scale=None):  # a user's own wrapper (a logging callback)
        updates.append(new_scale)
        update(new_scale)

    scaler.update = wrapper
    _scaled_step(rig, optimizer, scaler)
    rig.manager.end_epoch(0)
    saved = scaler.state_dict()
    assert saved["_growth_tracker"] == 1
    for _ in range(2):
        _scaled_step(rig, optimizer, scaler)
    assert scaler.state_dict() != saved
    assert rig.manager.handle_adaptation_command(rig.signed(make_rollback_command(0)))
    _scaled_step(rig, optimizer, scaler, float("inf"))  # applied at this step's safe point
    assert optimizer.rolled_back
    assert scaler.state_dict() == saved
    assert vars(scaler)["update"] is wrapper and updates[-1] == 1024.0  # through the user's
    assert ("update" in vars(other)) == (not given)  # the one given is the one held
    _scaled_step(rig, optimizer, scaler, float("inf"))  # the class's update: halved
    assert scaler.get_scale() == 512.0 and updates[-1] is None
    assert rig.manager.handle_adaptation_command(rig.signed(make_rollback_command(0)))
    loss = F.cross_entropy(rig.model(rig.x), rig.y)
    rig.manager.backward(scaler.scale(loss))
    scaler.step(optimizer)  # rolled back; the loop goes on without the scaler
    assert vars(scaler)["update"] is not wrapper
    optimizer.zero_grad()
    rig.manager.backward(F.cross_entropy(rig.model(rig.x), rig.y))
    optimizer.step()
    assert vars(scaler)["update"] is wrapper
    rig.manager.close()


def test_a_group_added_since_the_last_step_is_saved_and_loaded(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, store: Path, keyring: Keyring
) -> None:
    """Gradual unfreezing through the framework's optimizer: a ``state_dict()`` taken before
    the next step recorded no added group, and a load into a resumed manager that had added
    the same group was refused ("saved added groups [...] != []") until a step ran."""
    import tests.manager.helpers as helpers
    from tests.manager.test_host_param_groups import FrozenOut

    monkeypatch.setattr(helpers, "Host", FrozenOut)
    names = ["out.host.weight", "out.host.bias"]

    def unfrozen(rig: Rig) -> ManagerOptimizer:
        optimizer = ManagerOptimizer(rig.manager)
        layer = list(rig.model.out.host.parameters())
        for p in layer:
            p.requires_grad_(True)
        optimizer.add_param_group({"params": layer, "lr": 0.01})
        return optimizer

    first = Rig(make_config(tmp_path / "a", store), keyring)
    optimizer = unfrozen(first)
    saved = copy.deepcopy(optimizer.state_dict())  # before any step takes the group up
    assert saved["optimizers"]["host"]["added_groups"] == [names]
    resumed = Rig(make_config(tmp_path / "b", store), keyring)
    again = unfrozen(resumed)
    again.load_state_dict(saved)
    resumed.manager.backward(F.cross_entropy(resumed.model(resumed.x), resumed.y))
    again.step()
    assert resumed.manager.optimizers.optimizer("host").param_groups[1]["lr"] == 0.01


def test_a_refused_load_leaves_the_added_groups_to_fix(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, store: Path, keyring: Keyring
) -> None:
    """A load refused for a group unlike the saved one had taken that group up already: the
    user's fix (the group replaced) was then an illegal edit, refused at every step."""
    import tests.manager.helpers as helpers
    from tests.manager.test_host_param_groups import FrozenOut

    monkeypatch.setattr(helpers, "Host", FrozenOut)
    first = Rig(make_config(tmp_path / "a", store), keyring)
    layer = list(first.model.out.host.parameters())
    for p in layer:
        p.requires_grad_(True)
    ManagerOptimizer(first.manager).add_param_group({"params": layer})
    saved = copy.deepcopy(ManagerOptimizer(first.manager).state_dict())
    resumed = Rig(make_config(tmp_path / "b", store), keyring)
    optimizer, host = ManagerOptimizer(resumed.manager), resumed.model.out.host
    for p in host.parameters():
        p.requires_grad_(True)
    optimizer.add_param_group({"params": [host.weight]})  # the bias forgotten
    with pytest.raises(ValueError, match="saved added groups"):
        optimizer.load_state_dict(saved)
    optimizer.param_groups.pop()
    optimizer.add_param_group({"params": [host.weight, host.bias]})
    optimizer.load_state_dict(saved)
    resumed.manager.backward(F.cross_entropy(resumed.model(resumed.x), resumed.y))
    optimizer.step()


def test_a_state_dict_waits_for_a_step_in_progress(tmp_path: Path, store: Path, keyring) -> None:
    """``state_dict()`` takes up added groups, as a step does: under the step's lock, or a
    checkpoint thread and a step took one group up twice and every later step raised."""
    import threading

    rig = Rig(make_config(tmp_path, store), keyring)
    optimizer, done = ManagerOptimizer(rig.manager), threading.Event()
    with rig.manager.intake.lock:  # a step in progress on another thread
        thread = threading.Thread(target=lambda: (optimizer.state_dict(), done.set()))
        thread.start()
        assert not done.wait(0.2)
    thread.join(10)
    assert done.is_set()


def test_a_wrong_manager_scaler_or_state_is_refused_when_given(
    tmp_path: Path, store: Path, keyring: Keyring, mlp: str
) -> None:
    """A scaler that is no GradScaler was taken, and the first ``scaler.step`` died inside the
    step (AttributeError 'get_scale'); ``ManagerOptimizer(<not a manager>)`` and
    ``load_state_dict(None)`` raised internal AttributeErrors. Each is a TypeError when given,
    and leaves the optimizer as it was."""
    rig = _rig(tmp_path, store, keyring, mlp)
    with pytest.raises(TypeError, match="torch.amp.GradScaler"):
        ManagerOptimizer(rig.manager, scaler="not a GradScaler")
    with pytest.raises(TypeError, match="KasminaKernelManager, got object"):
        ManagerOptimizer(object())  # type: ignore[arg-type]
    optimizer, scaler = ManagerOptimizer(rig.manager), torch.amp.GradScaler("cpu")
    optimizer.scaler = scaler  # as a framework sets it once it has made it
    with pytest.raises(TypeError, match="torch.amp.GradScaler"):
        optimizer.scaler = object()
    saved = copy.deepcopy(optimizer.state_dict())
    with pytest.raises(TypeError, match="takes a ManagerOptimizer.state_dict"):
        optimizer.load_state_dict(None)  # type: ignore[arg-type]
    assert optimizer.scaler is scaler and optimizer.state_dict().keys() == saved.keys()
    _scaled_step(rig, optimizer, scaler)
    assert optimizer.steps == 1
    rig.manager.close()
