"""Shared pieces of the fault tests: kernels that fail, a stand-alone seed on a small host
(``Net``), a layer with seeds in the four running stages, and the fault telemetry.

Every fault is injected for real, with small modules as kernels: one that raises (in its forward,
or in its backward), one that raises on some calls only, a wrong shape, a tuple, NaN and inf, an
output that overflows.
"""

from __future__ import annotations

import torch
from torch import nn

from kasmina.seeds.layer import KasminaLayer
from kasmina.seeds.seed import GradientIsolatedSeed
from kasmina.seeds.table import GPUStateTensor
from kasmina.stages import SeedStage
from kasmina.utils.telemetry import MemorySink, TelemetryReporter
from tests.seeds.helpers import S, walk

RUNNING = [S.ISOLATED_INIT, S.GRAFTING, S.STABILIZATION, S.ACTIVE]
C = 3  # the stand-alone seed's chunk width
BATCH = 5


# ----------------------------------------------------------------------------- faulty kernels


class Raises(nn.Module):
    """Does real work, then fails: a kernel with a bug in its forward."""

    def __init__(self, width: int, message: str = "kernel exploded") -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.message = message

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.lin(x)
        raise RuntimeError(self.message)


class Flaky(nn.Module):
    """A healthy Linear + Tanh, except on the calls (1-based) in ``bad_calls``, where it raises."""

    def __init__(self, width: int, bad_calls: set[int]) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.bad_calls = bad_calls
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls in self.bad_calls:
            raise ValueError(f"bad batch {self.calls}")
        return torch.tanh(self.lin(x))


class WrongShape(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


class ReturnsTuple(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.lin(x)
        return y, y


class NonFinite(nn.Module):
    """Right shape and dtype, but every element is ``value`` (NaN or inf)."""

    def __init__(self, width: int, value: float) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.value = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) + self.value


class Overflows(nn.Module):
    """``x + eps * exp(w * x)``: finite on small inputs, inf where ``x`` exceeds about 89; its
    backward then meets ``0 * inf`` (NaN) in the zero gradient a fallback gives it."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(width))
        self.eps = nn.Parameter(torch.full((width,), 1e-3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.eps * torch.exp(self.w * x)


class _ExplodingBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x * 1.0

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        raise RuntimeError("kernel backward exploded")


class RaisesInBackward(nn.Module):
    """A kernel whose forward is fine and whose backward raises."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.full((width,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ExplodingBackward.apply(x * self.scale)


# ----------------------------------------------------------------------------------- helpers


def reporting_table(num_seeds: int) -> tuple[GPUStateTensor, MemorySink]:
    sink = MemorySink()
    return GPUStateTensor(num_seeds, "cpu", telemetry=TelemetryReporter(sinks=[sink])), sink


def fault_events(sink: MemorySink) -> list[dict[str, str]]:
    return [dict(metric.labels) for metric in sink.events("seed.fault")]


def make_seed(
    kernel: nn.Module,
    stage: SeedStage,
    state: GPUStateTensor | None = None,
    fault_limit: int = 3,
) -> GradientIsolatedSeed:
    seed = GradientIsolatedSeed(C, "s0", state=state, fault_limit=fault_limit)
    seed.attach_kernel(kernel)
    walk(seed, stage)
    seed.update_alpha_blending(5, 10)  # GRAFTING: alpha 0.5; a no-op in the other stages
    return seed


class Net(nn.Module):
    """upstream -> seed slot -> downstream; ``Net(None)`` is the host alone, same weights."""

    def __init__(self, seed: GradientIsolatedSeed | None) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.up = nn.Linear(4, C)
        self.down = nn.Linear(C, 2)
        self.seed = seed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        if self.seed is not None:
            h = self.seed(h)
        return self.down(h)

    def host_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if not n.startswith("seed.")}


def train_step(net: Net, x: torch.Tensor) -> torch.Tensor:
    """Forward, backward and an SGD step on the host's parameters; returns the output."""
    optimizer = torch.optim.SGD(net.host_parameters().values(), lr=0.1)
    out = net(x)
    out.pow(2).sum().backward()
    optimizer.step()
    return out


def assert_host_trained(net: Net, before: dict[str, torch.Tensor], expect_grad: set[str]) -> None:
    for name, p in net.host_parameters().items():
        if name in expect_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            assert not torch.equal(p.detach(), before[name]), f"{name} did not move"
        else:
            assert p.grad is None, name


def four_stage_layer(
    kernels: list[nn.Module], state: GPUStateTensor | None = None
) -> tuple[KasminaLayer, torch.Tensor]:
    """Seeds 0..3 in ISOLATED_INIT, GRAFTING, STABILIZATION, ACTIVE, with the given kernels."""
    torch.manual_seed(5)
    layer = KasminaLayer(nn.Linear(6, 8), 4, 2, state=state)
    for k, (stage, kernel) in enumerate(zip(RUNNING, kernels, strict=True)):
        layer.seed(k).attach_kernel(kernel)
        walk(layer.seed(k), stage)
    layer.update_alpha_blending(3, 10, 2.0)
    return layer, torch.randn(BATCH, 6)
