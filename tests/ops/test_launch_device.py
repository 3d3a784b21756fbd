"""Every Triton launch runs inside its tensors' device (``kasmina.kernels.device.on_device``).

Triton launches on the *current* CUDA device and its stream, not on the device of the tensors it
is given, so a launcher handed tensors on ``cuda:1`` while ``cuda:0`` is current (a model split
across GPUs) would run in the wrong context. A CPU cannot show that, but it can show the
structure that prevents it: each kernel module's ``on_device`` is replaced by a recorder, each
kernel by a proxy that refuses a launch outside it, and every launcher runs through the ops.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import kasmina.kernels.alpha_blend as blend_kernels
import kasmina.kernels.grad_norms as norm_kernels
import kasmina.kernels.kd_loss as kd_kernels
import kasmina.kernels.lifecycle as lifecycle_kernels
import pytest
import torch

from kasmina import ops
from kasmina.stages import NUM_STATE_COLUMNS, SeedStage

MODULES = (blend_kernels, kd_kernels, norm_kernels, lifecycle_kernels)


class _Launches:
    """Records the devices entered and the kernels launched inside them."""

    def __init__(self) -> None:
        self.entered: list[torch.device] = []
        self.launched: list[str] = []
        self.depth = 0

    @contextlib.contextmanager
    def on_device(self, device: torch.device) -> Iterator[None]:
        self.entered.append(device)
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1


class _Guarded:
    def __init__(self, name: str, kernel: object, launches: _Launches) -> None:
        self.name, self.kernel, self.launches = name, kernel, launches

    def __getitem__(self, grid: object) -> object:
        assert self.launches.depth > 0, f"{self.name} launched outside on_device"
        self.launches.launched.append(self.name)
        return self.kernel[grid]  # type: ignore[index]


@pytest.fixture
def launches(monkeypatch: pytest.MonkeyPatch, triton_backend: None) -> _Launches:
    record = _Launches()
    for module in MODULES:
        monkeypatch.setattr(module, "on_device", record.on_device)
        for name in dir(module):
            if name.startswith("_") and name.endswith("_kernel"):
                kernel = getattr(module, name)
                monkeypatch.setattr(module, name, _Guarded(name, kernel, record))
    return record


def test_every_launch_enters_its_tensors_device(launches: _Launches) -> None:
    gen = torch.Generator().manual_seed(0)
    seed, host = torch.randn(3, 8, generator=gen), torch.randn(3, 8, generator=gen)
    seed.requires_grad_(True)
    for alpha in (0.3, torch.tensor(0.3, requires_grad=True), torch.rand(4).requires_grad_()):
        ops.alpha_blend(seed, host, alpha).sum().backward()
    student = torch.randn(3, 5, generator=gen, requires_grad=True)
    ops.kd_kl_loss(student, torch.randn(3, 5, generator=gen), temperature=2.0).backward()
    ops.grad_norms([seed, None, host])
    ops.leak_check([seed, host], 0.0)
    state = torch.zeros(4, NUM_STATE_COLUMNS, dtype=torch.int32)
    ops.lifecycle_update(state, [0, 2], [int(SeedStage.ISOLATED_INIT)] * 2)
    ops.lifecycle_tick(state)
    assert {"_blend_fwd_kernel", "_blend_bwd_kernel", "_blend_bwd_chunked_kernel"} <= set(
        launches.launched
    )
    assert {"_kd_fwd_kernel", "_kd_bwd_kernel", "_update_kernel", "_tick_kernel"} <= set(
        launches.launched
    )
    assert any(name.startswith("_sumsq") for name in launches.launched), launches.launched
    assert launches.entered and all(d == torch.device("cpu") for d in launches.entered)
