"""A ``DistributedDataParallel`` the user builds over the model by hand, not with ``wrap_ddp``.

DDP takes the parameters and buffers a module has when it is built, and broadcasts every buffer
it does not ignore from rank 0, at its construction and at each forward. Built over the model
after attach, it gave every rank rank 0's running statistics of a seed's batch-norm kernel,
and, with no ``WrapRecord`` to align the host's buffers before a measurement, G5 scored a seed
differently on each rank under a host batch norm, and the next epoch sync "repaired" a healthy
rank. Built before attach and handed to it, the slots went inside a wrapper whose lists were
already made. Both are refused, naming ``wrap_ddp``: the one-rank tests run a gloo group of one
in this process; one test runs two gloo ranks.
"""

from __future__ import annotations

import copy
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import kasmina
from kasmina.control.builders import make_seed_command
from kasmina.control.processes import UnsupportedParallelismError, spawn
from kasmina.manager.ddp import DistributedKasmina, check_not_wrapped_by_hand, wrap_ddp
from kasmina.manager.manager import KasminaKernelManager
from kasmina.seeds.layer import KasminaLayer
from tests.manager.ddp_helpers import _load, _rank_rig, _spec, one_rank_group
from tests.manager.helpers import SEED0, Host, Rig, make_config, run_command


def test_a_model_wrapped_in_ddp_before_attach_is_refused(tmp_path, store, keyring) -> None:
    """The wrapper itself, or a model holding one: refused at attach (and by ``register``,
    which attach calls), the model left without slots."""
    manager = KasminaKernelManager(make_config(tmp_path, store), keyring=keyring)
    with one_rank_group(tmp_path / "rendezvous"):
        wrapped = DistributedDataParallel(Host())
        with pytest.raises(
            UnsupportedParallelismError, match="the model is a Distributed.*wrap_ddp"
        ):
            manager.attach(wrapped, "module.out", 2, 2)
        outer = nn.Sequential(DistributedDataParallel(Host()))
        with pytest.raises(UnsupportedParallelismError, match="0 is a DistributedDataParallel"):
            manager.attach(outer, "0.module.out", 2, 2)
    for model in (wrapped, outer):
        assert not any(isinstance(m, KasminaLayer) for m in model.modules())
    manager.close()


def test_a_ddp_built_by_hand_after_attach_is_refused(tmp_path, store, keyring, mlp) -> None:
    """By ``DistributedKasmina`` (nothing joined: the manager runs alone as before), by
    ``wrap_ddp``, and, built after ``DistributedKasmina``, at the next epoch sync, before its
    first collective. ``wrap_ddp``'s own DDP, and a move of the model, are not."""
    ours = Rig(make_config(tmp_path / "ours", store), keyring)
    rig = Rig(make_config(tmp_path / "hand", store), keyring)
    later = Rig(make_config(tmp_path / "later", store), keyring)
    moved = Host()
    kasmina.attach(moved, "out", 2, 2)
    moved.to(torch.float64)  # a move copies the slots' constants: Kasmina's own write
    with one_rank_group(tmp_path / "rendezvous"):
        check_not_wrapped_by_hand(moved)
        assert isinstance(wrap_ddp(ours.model), DistributedDataParallel)
        DistributedKasmina(ours.manager).sync_epoch(0)
        DistributedDataParallel(rig.model)
        with pytest.raises(UnsupportedParallelismError, match="slot out .*wrap_ddp"):
            DistributedKasmina(rig.manager)
        with pytest.raises(UnsupportedParallelismError, match="wrap_ddp"):
            wrap_ddp(rig.model)
        germinate = make_seed_command("germinate", SEED0, mlp, timeout_s=60.0)
        assert run_command(rig.manager, rig.signed(germinate))  # applied here: not in a run
        dk = DistributedKasmina(later.manager)
        DistributedDataParallel(later.model)
        with pytest.raises(UnsupportedParallelismError, match="wrap_ddp"):
            dk.sync_epoch(0)
        assert dk.coordinator.stats["syncs"] == 0
    for r in (ours, rig, later):
        r.manager.close()


def test_a_move_under_inference_mode_is_not_a_ddp_built_by_hand() -> None:
    """A move made under ``inference_mode`` gives the slots inference constants, which keep no
    version counter: the move, its forward and the check all run (the check raised there)."""
    model = Host()
    kasmina.attach(model, "out", 2, 2)
    with torch.inference_mode():
        model.to(torch.float64)
        assert model(torch.randn(3, 6, dtype=torch.float64)).dtype == torch.float64
    check_not_wrapped_by_hand(model)


def test_copies_of_an_attached_model_are_not_ddps_built_by_hand(tmp_path: Path) -> None:
    """``copy.deepcopy``, pickle and ``torch.save`` of a whole model rebuild each tensor with
    ``set_``, which leaves a fresh ``_one`` at version 1: a copy read as written over, and
    ``wrap_ddp`` refused it, with a process group and without one."""
    model = Host()
    kasmina.attach(model, "out", 2, 2)
    saved = tmp_path / "model.pt"
    torch.save(model, saved)
    copies = [
        copy.deepcopy(model),
        pickle.loads(pickle.dumps(model)),
        torch.load(saved, weights_only=False),
    ]
    assert all(c.out._buffers["_one"]._version > 0 for c in copies)  # what made it look written
    assert wrap_ddp(copies[0]) is copies[0]  # no process group: no DDP to see
    with one_rank_group(tmp_path / "rendezvous"):
        for c in copies:
            check_not_wrapped_by_hand(c)
        assert isinstance(wrap_ddp(copies[1]), DistributedDataParallel)


def _refusal(rig: Rig) -> str:
    try:
        DistributedKasmina(rig.manager)
    except UnsupportedParallelismError as e:
        return str(e)
    return ""


def _worker_by_hand(rank: int, world: int, spec: dict[str, Any]) -> None:
    # One rank's buffers written alone (user code on rank 1): both ranks refuse, rank 0 for
    # the other's, where rank 1 alone raised and rank 0 went on into the next collective.
    alone = _rank_rig(rank, {**spec, "out": str(Path(spec["out"], "alone"))})
    if rank == 1:
        alone.model.out._buffers["_one"].fill_(1.0)
    refused_alone = _refusal(alone)
    alone.manager.close()
    rig = _rank_rig(rank, spec)
    DistributedDataParallel(rig.model, find_unused_parameters=True)
    refused = _refusal(rig)
    torch.save({"refused": refused, "alone": refused_alone}, Path(spec["out"], f"byhand{rank}.pt"))
    rig.manager.close()


@pytest.mark.slow  # spawns processes: most of the time is their imports
def test_every_rank_refuses_a_ddp_built_by_hand(tmp_path: Path, published) -> None:
    """Two gloo ranks, each wrapping its attached model in a DDP of its own: both refuse it
    at ``DistributedKasmina``, alike (no rank left waiting in a collective); and both refuse
    where one rank alone found its slots' buffers written."""
    spec = _spec(tmp_path, published, "gloo")
    spawn(_worker_by_hand, 2, args=(spec,), backend="gloo", timeout_s=30, join_timeout_s=120)
    runs = _load(tmp_path, "byhand", 2)
    assert all("wrap_ddp" in run["refused"] for run in runs), runs
    assert runs[0]["alone"].startswith("another rank found"), runs
    assert "slot out were overwritten" in runs[1]["alone"], runs
