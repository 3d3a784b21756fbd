"""Fixtures shared by the fused ops' tests."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from tests.ops.kd_helpers import DEVICE


@pytest.fixture
def launched(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the Triton kernels launched during the test, in order, whether interpreted
    (a CPU) or compiled (a GPU). A test of the Triton backend asserts that its kernels ran, and
    one of the reference that none did: a dispatch change that sent either to the other path
    would otherwise pass it unnoticed, both paths being right."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    names: list[str] = []
    for cls in (InterpretedFunction, JITFunction):  # ``kernel[grid](...)`` calls ``run``

        def run(self: Any, *args: Any, _run: Any = cls.run, **kwargs: Any) -> Any:
            names.append(self.fn.__name__)
            return _run(self, *args, **kwargs)

        monkeypatch.setattr(cls, "run", run)
    return names


@pytest.fixture(params=["triton", "reference"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The test runs on each backend: the Triton kernels (the interpreter on a CPU), then the
    reference (the CPU path)."""
    monkeypatch.setenv("KASMINA_BACKEND", request.param)
    return request.param


@pytest.fixture
def on_device() -> Iterator[None]:
    """Every factory call in the test allocates on ``DEVICE``: the GPU when there is one (the
    KD ops' test files take it for every test, through their ``pytestmark``)."""
    with DEVICE:
        yield


@pytest.fixture
def poisoned_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fresh float buffers start as NaN, so an element the kernels never write cannot pass."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(out: torch.Tensor) -> torch.Tensor:
        if out.dtype.is_floating_point:
            out.fill_(float("nan"))
        return out

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))
