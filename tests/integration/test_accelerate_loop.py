"""A hand-written ``accelerate`` loop driving the manager's step (``ManagerOptimizer`` /
``ManagerScheduler``): with gradient accumulation, accelerate's loop steps the scheduler on
every micro-batch (its own wrapper skips those calls for the schedulers it prepares, and a
``ManagerScheduler`` is not one), so the schedule ran twice as fast as the manager's clock; and
its checkpoints keep the scheduler once it is registered for them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from kasmina.manager.framework import ManagerOptimizer, ManagerScheduler
from kasmina.manager.manager import KasminaKernelManager
from kasmina.utils.keyring import Keyring, generate_key
from tests.manager.helpers import make_config

accelerate = pytest.importorskip("accelerate")


def _run(tmp_path: Path, name: str, resume: Path | None = None, save: Path | None = None):
    config = make_config(tmp_path / name, tmp_path / "urza", run_id=name, checkpoint_mode="memory")
    manager = KasminaKernelManager(config, keyring=Keyring({"ctl": generate_key()}))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    manager.attach(model, ["2"], 2, 2, host_lr=0.05)
    optimizer = ManagerOptimizer(manager)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        manager.optimizers.optimizer("host"), lambda s: 0.9**s
    )
    manager.track("scheduler", schedule)
    scheduler = ManagerScheduler(schedule, optimizer)
    acc = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(32, 6, generator=g), torch.arange(32) % 4)
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    model, prepared, loader, scheduler = acc.prepare(model, optimizer, loader, scheduler)
    acc.register_for_checkpointing(scheduler)
    if resume is not None:
        acc.load_state(str(resume))
        loader = acc.skip_first_batches(loader, 4)  # the 2 steps the checkpoint had taken
    for i, (x, y) in enumerate(loader):
        with acc.accumulate(model):
            acc.backward(F.cross_entropy(model(x), y))
            prepared.step()
            scheduler.step()
            prepared.zero_grad()
        if save is not None and i == 3:
            acc.save_state(str(save))
    weights = [p.detach().clone() for p in model.parameters()]
    clock, last = manager.state.global_step, schedule.last_epoch
    manager.close()
    return clock, last, weights


def test_an_accelerate_loop_keeps_the_schedule_on_the_managers_clock_and_resumes_it(
    tmp_path: Path,
) -> None:
    clock, last, whole = _run(tmp_path, "whole", save=tmp_path / "state")
    assert clock == 4 and last == 4  # 8 micro-batches, 2 a step: the schedule ran 8 steps
    clock, last, resumed = _run(tmp_path, "resumed", resume=tmp_path / "state")
    assert last == 4  # the registered scheduler came back at 2 and stepped twice more
    assert all(torch.equal(a, b) for a, b in zip(whole, resumed, strict=True))


def test_a_manager_scheduler_takes_the_prepared_optimizer_and_refuses_another(tmp_path) -> None:
    """Built over what ``accelerator.prepare`` returned (the ``ManagerOptimizer`` wrapped), it
    raised AttributeError ('AcceleratedOptimizer' object has no attribute 'steps')."""
    config = make_config(tmp_path / "m", tmp_path / "urza", checkpoint_mode="memory")
    manager = KasminaKernelManager(config, keyring=Keyring({"ctl": generate_key()}))
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    manager.attach(model, ["2"], 2, 2, host_lr=0.05)
    optimizer = ManagerOptimizer(manager)
    host = manager.optimizers.optimizer("host")
    schedule = torch.optim.lr_scheduler.LambdaLR(host, lambda s: 0.9**s)
    prepared = accelerate.Accelerator(cpu=True).prepare(optimizer)
    assert ManagerScheduler(schedule, prepared).optimizer is optimizer
    with pytest.raises(TypeError, match="with a ManagerOptimizer, got"):
        ManagerScheduler(schedule, host)
    manager.close()
