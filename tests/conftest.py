"""Test-wide setup.

Without a GPU the Triton kernels run through the interpreter: ``TRITON_INTERPRET=1`` must be in
the environment before triton is first imported, so it is set here, before anything else.
"""

from __future__ import annotations

import os
import sys

if "TRITON_INTERPRET" not in os.environ:
    import torch

    assert "triton" not in sys.modules or os.environ.get("TRITON_INTERPRET") == "1", (
        "triton was imported before TRITON_INTERPRET could be set"
    )
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def triton_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """Force the fused ops onto their Triton kernels (the interpreter on a CPU)."""
    monkeypatch.setenv("KASMINA_BACKEND", "triton")


@pytest.fixture
def reference_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KASMINA_BACKEND", "reference")


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
