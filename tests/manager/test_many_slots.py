"""What a step and a safe point cost as the seeds grow in number (docs/design.md §4, §6a, §8:
1,024-seed batches): counted in work done, never timed. A cost per seed of the host's size, or
per command of the model's, is quadratic in the slots."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import kasmina.isolation.monitor as monitor_module
import kasmina.isolation.verify as verify_module
from kasmina.control.auth import sign_command
from kasmina.control.commands import make_seed_command
from kasmina.manager.manager import KasminaKernelManager
from kasmina.utils.keyring import Keyring
from tests.manager.helpers import make_config, record_activations

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
