"""Kasmina's own measuring forwards leave no trace on a host that changes state in eval mode.

Two kinds of host do, and ``eval()`` cannot stop either: one that draws random numbers in eval
mode (``F.dropout`` with its default ``training=True``: MC dropout, noise injection) and one
whose buffers update on every forward (a QAT ``FakeQuantize`` with a moving-average observer).
The dormant-overhead timing (run by a plain ``end_epoch`` the first time) and G5's
``evaluate_seeds`` must leave the global RNG stream and every host buffer bitwise as they were.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn
from torch.ao.quantization import FakeQuantize, MovingAverageMinMaxObserver
from torch.nn import functional as F

from kasmina.control.auth import sign_command
from kasmina.control.builders import make_seed_command
from kasmina.manager.manager import KasminaKernelManager
from kasmina.utils.keyring import Keyring
from tests.manager.helpers import SEED0, make_config, record_activations, run_command


class NoisyOut(nn.Module):
    """Draws from the global RNG in eval mode too: functional dropout defaults to training."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(self.fc(x), 0.1)


class QuantOut(nn.Module):
    """A QAT layer: the observer's min/max statistics move on every forward, eval or not."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)
        self.fq = FakeQuantize(observer=MovingAverageMinMaxObserver)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fq(self.fc(x))


class Host(nn.Module):
    def __init__(self, out: nn.Module) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(6, 8)
        self.out = out  # the slot: two seeds over two features each

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.inp(x)))


def _managed(tmp_path: Path, store: Path, keyring: Keyring, out: nn.Module):
    manager = KasminaKernelManager(make_config(tmp_path, store), keyring=keyring)
    model = Host(out)
    manager.attach(model, "out", 2, 2, host_lr=0.05, seed_lr=0.05)
    generator = torch.Generator().manual_seed(2)
    x, y = torch.randn(16, 6, generator=generator), torch.randint(0, 4, (16,), generator=generator)
    record_activations(model, x)  # the slot's input shape: the overhead timing replays it
    return manager, model, x, y


def _buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: b.detach().clone() for name, b in model.named_buffers()}


def _same_buffers(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    after = dict(model.named_buffers())
    return after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_dormant_overhead_timing_draws_no_global_random_number(tmp_path, store, keyring) -> None:
    manager, model, _, _ = _managed(tmp_path, store, keyring, NoisyOut())
    rng = torch.get_rng_state()
    assert math.isfinite(manager.measure_dormant_overhead(repeats=3))  # timed: the host ran
    assert torch.equal(torch.get_rng_state(), rng)
    manager.close()


def test_dormant_overhead_timing_leaves_a_qat_hosts_observer_as_it_was(
    tmp_path, store, keyring
) -> None:
    manager, model, _, _ = _managed(tmp_path, store, keyring, QuantOut())
    before = _buffers(model)
    assert math.isfinite(manager.measure_dormant_overhead(repeats=3))
    assert _same_buffers(model, before)
    manager.close()


def test_a_plain_end_epoch_leaves_the_rng_and_host_buffers_as_they_were(
    tmp_path, store, keyring
) -> None:
    # end_epoch times the dormant overhead the first time (its telemetry asks for it).
    noisy_quant = nn.Sequential(NoisyOut(), FakeQuantize(observer=MovingAverageMinMaxObserver))
    manager, model, x, y = _managed(tmp_path, store, keyring, noisy_quant)
    manager.backward(F.cross_entropy(model(x), y))
    manager.step()
    before, rng = _buffers(model), torch.get_rng_state()
    manager.end_epoch(0)
    assert math.isfinite(manager.get_performance_metrics()["dormant_overhead_us"])  # measured
    assert torch.equal(torch.get_rng_state(), rng)
    assert _same_buffers(model, before)
    manager.close()


class StreamingOut(nn.Module):
    """Carries a state across calls by replacing its buffer (``self.h = ...``), not writing it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)
        self.register_buffer("h", torch.zeros(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc(x) + self.h
        self.h = out.detach().mean(0)
        return out


def test_a_plain_end_epoch_puts_back_a_host_buffer_the_forward_replaced(
    tmp_path, store, keyring
) -> None:
    """The overhead timing's random forwards replaced the buffer object, and only the old
    object got its values back: the host's state came out of ~200 random batches."""
    manager, model, x, y = _managed(tmp_path, store, keyring, StreamingOut())
    manager.backward(F.cross_entropy(model(x), y))
    manager.step()
    state, before = model.out.h, _buffers(model)
    manager.end_epoch(0)
    assert math.isfinite(manager.get_performance_metrics()["dormant_overhead_us"])  # measured
    assert model.out.h is state and _same_buffers(model, before)
    manager.close()


def test_a_plain_end_epoch_runs_no_forward_hook_of_the_host(tmp_path, store, keyring) -> None:
    """The overhead timing ran the slot and its host 201 times each: an activation collector
    hooked on the host (or the slot) got 402 calls on random inputs at a plain epoch's end."""
    manager, model, x, y = _managed(tmp_path, store, keyring, NoisyOut())
    slot = model.out
    seen: list[str] = []
    slot.host.fc.register_forward_pre_hook(lambda m, args: seen.append("fc pre"))
    slot.host.register_forward_hook(lambda m, args, out: seen.append("host"))
    slot.register_forward_hook(lambda m, args, kwargs, out: seen.append("slot"), with_kwargs=True)
    manager.backward(F.cross_entropy(model(x), y))
    manager.step()
    assert seen == ["fc pre", "host", "slot"]
    manager.end_epoch(0)
    assert math.isfinite(manager.get_performance_metrics()["dormant_overhead_us"])  # measured
    assert seen == ["fc pre", "host", "slot"]
    model(x)  # the hooks are back
    assert seen == ["fc pre", "host", "slot"] * 2
    manager.close()


def test_evaluate_seeds_leaves_a_qat_hosts_observer_as_it_was(
    tmp_path, store, keyring, mlp
) -> None:
    manager, model, x, y = _managed(tmp_path, store, keyring, QuantOut())
    germinate = make_seed_command("germinate", SEED0, mlp)
    assert run_command(manager, sign_command(germinate, keyring, "ctl").SerializeToString())
    # A batch the observer has not seen: on the one it last saw its moving average would stay.
    batch = (2 * x, y)
    before, rng = _buffers(model), torch.get_rng_state()
    results = manager.evaluate_seeds([batch], loss_fn=F.cross_entropy)
    assert set(results) == {SEED0}  # measured: the model ran on the batch
    assert _same_buffers(model, before)
    assert torch.equal(torch.get_rng_state(), rng)
    manager.close()


def test_g3s_host_flop_count_runs_no_forward_hook_of_the_host(
    tmp_path, store, keyring, mlp
) -> None:
    """G3 counts the host layer's FLOPs on a zeros batch: an activation collector hooked on the
    host got that fabricated batch at every ADVANCE to GRAFTING."""
    manager, model, x, y = _managed(tmp_path, store, keyring, QuantOut())
    seen: list[float] = []
    model.out.host.register_forward_hook(lambda m, args, out: seen.append(float(args[0].sum())))

    def send(op: str, artifact: str = "") -> bool:
        command = sign_command(make_seed_command(op, SEED0, artifact), keyring, "ctl")
        return run_command(manager, command.SerializeToString())

    def train() -> None:
        manager.backward(F.cross_entropy(model(x), y))
        manager.step()

    assert send("germinate", mlp)
    train()
    manager.end_epoch(0)
    assert send("advance")  # -> COMPATIBILITY_CHECK
    train()
    seen.clear()
    assert send("advance")  # -> GRAFTING: G3, which counts the host's FLOPs
    assert manager.seed(SEED0).stage.name == "GRAFTING" and seen == []
    manager.close()
