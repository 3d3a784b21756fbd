"""A seed-only KD leak under ``wrap_ddp``: contained on every rank, as in one process.

The KD backward reached the leaked host parameter and ran its gradient accumulator, whose DDP
hook marked it ready; the host's own backward then marked it again, and torch's reducer raised
"Expected to mark a variable ready only once" on every rank. Two gloo ranks (``ddp_helpers``'s
``Trainer``), and one in this process. The KD phase walks its graph for the leaves only where a
process group is up (DDP needs one); without one it takes torch's own backward.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.nn import functional as F

from kasmina.control.processes import spawn
from kasmina.kd.config import KDConfig
from kasmina.manager.ddp import wrap_ddp
from kasmina.utils import autograd_nodes
from kasmina.utils.keyring import Keyring
from tests.manager.ddp_helpers import (
    Trainer,
    _assert_equal_states,
    _load,
    _signed,
    _spec,
    one_rank_group,
)
from tests.manager.helpers import SEED0, Rig, make_config, through_a_seed


def _worker_kd_leak(rank: int, world: int, spec: dict[str, Any]) -> None:
    """Every rank's kernel holds a host parameter: its KD gradient reaches the host."""
    t = Trainer(rank, world, spec)
    t.epoch_with({0: [_signed(t.rig, "germinate", SEED0, spec["mlp"])]}, steps=0)
    t.manager.seed(SEED0).kernel.inner.fc1.bias = t.rig.model.out.host.bias
    weight = t.rig.model.inp.weight
    before = weight.detach().clone()
    t.train(1)
    t.save(
        spec["out"],
        "kdleak",
        stepped=t.host_stepped,
        moved=not torch.equal(before, weight),
        violations=t.manager.seed(SEED0).isolation_violations,
    )
    t.manager.close()


@pytest.mark.slow  # spawns processes: most of the time is their imports
def test_a_seed_only_kd_leak_under_ddp_skips_the_host_step_on_every_rank(
    tmp_path: Path, published
) -> None:
    """In one process the leak is dropped where it is found, the seed charged and the host's
    step skipped; under DDP the host's backward raised on every rank. Now every rank skips."""
    spec = _spec(tmp_path, published, "gloo")
    spawn(_worker_kd_leak, 2, args=(spec,), backend="gloo", timeout_s=60, join_timeout_s=120)
    runs = _load(tmp_path, "kdleak", 2)
    assert [run["stepped"] for run in runs] == [[False], [False]]
    assert [run["moved"] for run in runs] == [False, False]
    assert [run["violations"] for run in runs] == [1, 1]
    _assert_equal_states(runs)  # host weights included: no rank stepped its host


def _kd_rig(tmp_path: Path, store: Path, keyring: Keyring) -> Rig:
    kd = KDConfig(temperature=2.0, alpha=1.0)
    return Rig(make_config(tmp_path, store, kd_enabled=True, kd=kd), keyring)


def _counting_walks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The KD phase's graph walks for its leaves (``leaves_below``), counted."""
    walks = [0]
    real = autograd_nodes.leaves_below

    def leaves_below(roots: Any) -> Any:
        walks[0] += 1
        return real(roots)

    monkeypatch.setattr(autograd_nodes, "leaves_below", leaves_below)
    return walks


@pytest.mark.parametrize("host_loss", [True, False], ids=["with_host_loss", "kd_only"])
def test_the_kd_phase_walks_the_graph_only_where_ddp_can_hook_it(
    tmp_path: Path, store: Path, keyring: Keyring, mlp: str, monkeypatch, host_loss: bool
) -> None:
    """The seed-only KD backward walked its whole graph in Python on every step to find the
    leaves (``backward_into_leaves``), which only DDP's reducer hooks need. Without a process
    group (no DDP possible) torch's own backward runs, no walk; under one the walk runs; the
    seeds' gradients are the same either way (the KD cut's route and the whole loss's)."""
    rig = _kd_rig(tmp_path, store, keyring)
    manager = rig.manager
    assert rig.send("germinate", SEED0, mlp)
    walks = _counting_walks(monkeypatch)
    teacher = torch.randn(16, 4, generator=torch.Generator().manual_seed(5))
    params = manager.seed(SEED0).seed_parameters()
    grads = []
    for grouped in (False, True):
        with one_rank_group(tmp_path / "rendezvous") if grouped else contextlib.nullcontext():
            manager.set_teacher_logits(teacher)
            loss = F.cross_entropy(rig.model(rig.x), rig.y)
            kd = manager.collect_kd_losses()
            manager.backward(loss if host_loss else None, kd_loss=kd)
            grads.append([p.grad.clone() for p in params])
            assert walks[0] == (1 if grouped else 0)
            for p in params:
                p.grad = None
            rig.model.zero_grad(set_to_none=True)
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_kd_leak_under_a_one_rank_ddp_is_contained(
    tmp_path: Path, store: Path, keyring: Keyring, mlp: str
) -> None:
    """The leak of the spawned test above in this process, on one rank: the KD phase under
    ``wrap_ddp`` still runs no accumulator (a process group is up), so the host's backward
    marks the leaked parameter ready once, the leak is found and the host's step skipped."""
    rig = _kd_rig(tmp_path, store, keyring)
    manager = rig.manager
    with one_rank_group(tmp_path / "rendezvous"):
        net = wrap_ddp(rig.model)
        assert rig.send("germinate", SEED0, mlp)
        manager.seed(SEED0).kernel.inner.fc1.bias = rig.model.out.host.bias
        before = rig.model.inp.weight.detach().clone()
        manager.set_teacher_logits(torch.randn(16, 4, generator=torch.Generator().manual_seed(6)))
        loss = F.cross_entropy(net(rig.x), rig.y)
        manager.backward(loss, kd_loss=through_a_seed(manager.collect_kd_losses()))
        assert not manager.step()["host_stepped"]
        assert torch.equal(before, rig.model.inp.weight)
        assert manager.seed(SEED0).isolation_violations == 1
        del net
    manager.close()
