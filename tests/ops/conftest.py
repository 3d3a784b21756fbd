"""Fixtures shared by the fused ops' tests."""

from __future__ import annotations

from typing import Any

import pytest


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
