"""What a step and a safe point cost as the seeds grow in number (docs/design.md §4, §6a, §8:
1,024-seed batches): counted in work done, never timed. A cost per seed of the host's size, or
per command of the model's, is quadratic in the slots."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import kasmina.isolation.monitor as monitor_module
import kasmina.isolation.ownership as ownership_module
import kasmina.isolation.verify as verify_module
import kasmina.utils.memory as memory_module
from kasmina.control.auth import sign_command
from kasmina.control.builders import make_seed_command
from kasmina.manager.manager import KasminaKernelManager
from kasmina.utils.keyring import Keyring
from tests.manager.helpers import S, make_config, record_activations

WIDTH = 2  # the published AffineShift's


class Layers(nn.Module):
    """``n`` linear layers in a row, each a slot of one seed."""

    def __init__(self, n: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Linear(WIDTH, WIDTH) for _ in range(n))
        self.head = nn.Linear(WIDTH, WIDTH)  # not a slot

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def _grown(tmp_path: Path, store: Path, keyring: Keyring, affine: str, n: int):
    """A manager over ``n`` slots and the model, a GERMINATE queued for each slot's seed."""
    config = make_config(tmp_path / f"n{n}", store, checkpoint_mode="off")
    manager = KasminaKernelManager(config, keyring=keyring)
    model = Layers(n)
    manager.attach(model, [f"layers.{i}" for i in range(n)], 1, WIDTH, host_lr=0.05, seed_lr=0.05)
    record_activations(model, torch.randn(5, WIDTH))
    for i in range(n):
        command = make_seed_command("GERMINATE", f"layers.{i}[0]", affine, {}, validate=False)
        raw = sign_command(command, keyring, "ctl").SerializeToString()
        assert manager.handle_adaptation_command(raw)
    return manager, model


def _model_walks(model: nn.Module, monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Counts each walk of the whole ``model`` (``named_modules`` called on it: ``modules``,
    ``parameters`` and ``named_parameters`` all start there)."""
    walks: Counter[str] = Counter()
    original = nn.Module.named_modules

    def counting(self: nn.Module, *args, **kwargs):
        if self is model:
            walks["model"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "named_modules", counting)
    return walks


def _walks_of_a_safe_point(
    tmp_path: Path, published, keyring: Keyring, monkeypatch: pytest.MonkeyPatch, action: str
) -> dict[int, int]:
    """Whole-model walks of one safe point applying a queued ``action`` (GERMINATE, or CULL
    after the GERMINATEs) for every one of 4 and of 16 slots' seeds."""
    store, affine = published[0], published[2]
    walks = {}
    for n in (4, 16):
        manager, model = _grown(tmp_path / action, store, keyring, affine, n)
        if action == "CULL":
            assert all(o.ok for o in manager.apply_pending(wait=True))
            for i in range(n):
                command = make_seed_command("CULL", f"layers.{i}[0]", "", {}, validate=False)
                raw = sign_command(command, keyring, "ctl").SerializeToString()
                assert manager.handle_adaptation_command(raw)
        counted = _model_walks(model, monkeypatch)
        outcomes = manager.apply_pending(wait=True)
        monkeypatch.undo()
        assert len(outcomes) == n and all(o.ok for o in outcomes), outcomes
        walks[n] = counted["model"]
        manager.close()
    return walks


@pytest.mark.parametrize("action", ["GERMINATE", "CULL"])
def test_a_safe_point_of_k_commands_walks_the_model_a_bounded_number_of_times(
    tmp_path: Path, published, keyring: Keyring, monkeypatch: pytest.MonkeyPatch, action: str
) -> None:
    """Each GERMINATE registers its kernel in the model (a CULL takes it out), which moves the
    process-wide count the hold check watches; the check before the next command then walked
    the whole model again (and every seed's parameters): K such commands at one safe point cost
    K model walks, quadratic in the slots (1,024 GERMINATEs held the training thread for
    minutes). The manager's own registrations no longer count as a change to look for."""
    walks = _walks_of_a_safe_point(tmp_path, published, keyring, monkeypatch, action)
    assert walks[16] == walks[4], walks  # not one (or more) per command


def test_a_change_after_the_germinates_is_still_found(
    tmp_path: Path, published, keyring: Keyring
) -> None:
    """The GERMINATEs' own registrations are passed over; a user's change after them (a layer
    replaced) moves the count again, and the next step walks the model and refuses it."""
    manager, model = _grown(tmp_path, published[0], keyring, published[2], 3)
    assert all(o.ok for o in manager.apply_pending(wait=True))
    assert manager.seed("layers.2[0]").stage == S.ISOLATED_INIT
    model.head = nn.Linear(WIDTH, WIDTH)  # trainable, in no optimizer
    loss = F.mse_loss(model(torch.randn(5, WIDTH)), torch.zeros(5, WIDTH))
    with pytest.raises(RuntimeError, match="did not hold when the manager registered it"):
        manager.backward(loss)
        manager.step()
    manager.close()


def test_a_registration_by_another_thread_during_the_managers_own_is_not_passed_over(
    tmp_path: Path, published, keyring: Keyring
) -> None:
    """``ModelHold.own`` takes the count as checked only if every registration since the last
    check was its block's, on its thread: one made meanwhile elsewhere (a layer replaced by
    another thread) is still looked for."""
    manager, model = _grown(tmp_path, published[0], keyring, published[2], 2)
    registry = manager.require_registry()
    registry.check_held(manager.optimizers)

    def replace() -> None:
        model.head = nn.Linear(WIDTH, WIDTH)

    with registry.hold.own():
        thread = threading.Thread(target=replace)
        thread.start()
        thread.join()
    with pytest.raises(RuntimeError, match="did not hold when the manager registered it"):
        registry.check_held(manager.optimizers)
    manager.close()


def _host_entries_per_step(
    manager: KasminaKernelManager, model: nn.Module, monkeypatch: pytest.MonkeyPatch
) -> tuple[int, int]:
    """(host-parameter entries built, seed outputs graph-walked) in one training step, the
    step after a first one."""
    x, y = torch.randn(5, WIDTH), torch.randn(5, WIDTH)

    def step() -> dict:
        manager.backward(F.mse_loss(model(x), y))
        return manager.step()

    step()
    counts: Counter[str] = Counter()
    named, walk = verify_module.named_params, monitor_module.graph_isolation

    def counting_named(params, prefix):
        out = named(params, prefix)
        counts[prefix] += len(out)
        return out

    def counting_walk(output, host):
        counts["walks"] += 1
        return walk(output, host)

    monkeypatch.setattr(verify_module, "named_params", counting_named)
    monkeypatch.setattr(monitor_module, "named_params", counting_named)
    monkeypatch.setattr(monitor_module, "graph_isolation", counting_walk)
    report = step()
    monkeypatch.undo()
    assert report["isolation_clean"]
    return counts["host"], counts["walks"]


def test_a_steps_graph_checks_cost_the_seeds_graphs_not_seeds_times_host(
    tmp_path: Path, published, keyring: Keyring, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each isolated seed's output is graph-walked at every step; each walk rebuilt a lookup
    of every host parameter first (and each monitor kept its own list of them): a step's
    checks cost seeds x host parameters, quadratic in the slots (2.3 s of a step at 1,024).
    The monitors share one lookup now: the host entries built per step do not grow faster
    than the seeds, while every seed's output is still walked."""
    store, affine = published[0], published[2]
    built: dict[int, int] = {}
    for n in (4, 16):
        manager, model = _grown(tmp_path, store, keyring, affine, n)
        assert all(o.ok for o in manager.apply_pending(wait=True))
        built[n], walked = _host_entries_per_step(manager, model, monkeypatch)
        assert walked == n  # every seed's output is still checked
        manager.close()
    assert built[16] <= 4 * built[4], built  # linear in the seeds at most (it is 0 now)


def _spans_read(
    manager: KasminaKernelManager, model: nn.Module, monkeypatch: pytest.MonkeyPatch
) -> Counter[str]:
    """Byte ranges read (``byte_span``) while the queued GERMINATEs are applied: of the host's
    parameters, and of any other tensor."""
    host = {id(p) for p in model.parameters()}
    counted: Counter[str] = Counter()
    span = memory_module.byte_span

    def counting(t: torch.Tensor):
        counted["host" if id(t) in host else "other"] += 1
        return span(t)

    monkeypatch.setattr(memory_module, "byte_span", counting)
    monkeypatch.setattr(ownership_module, "byte_span", counting, raising=False)
    outcomes = manager.apply_pending(wait=True)
    monkeypatch.undo()
    assert outcomes and all(o.ok for o in outcomes), outcomes
    return counted


def test_a_germinate_reads_the_memory_of_its_seeds_parameters_not_of_every_owned_one(
    tmp_path: Path, published, keyring: Keyring, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each GERMINATE's overlap check read the byte range of every parameter owned so far (the
    host's and every seed's before it): K GERMINATEs beside a host cost K x owned reads,
    quadratic in the slots (28 ms a GERMINATE beside ~2,000 host parameters). The owned ranges
    are kept and only their cheap signatures read again: a safe point of GERMINATEs reads no
    host parameter's range, and the others' grow with the seeds, not their square."""
    store, affine = published[0], published[2]
    reads: dict[int, Counter[str]] = {}
    for n in (4, 16):
        manager, model = _grown(tmp_path, store, keyring, affine, n)
        reads[n] = _spans_read(manager, model, monkeypatch)
        manager.close()
    assert reads[4]["host"] == reads[16]["host"] == 0, reads
    assert reads[16]["other"] <= 4 * reads[4]["other"], reads
