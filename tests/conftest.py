"""Test-wide setup.

Without a GPU the Triton kernels run through the interpreter: ``TRITON_INTERPRET=1`` must be in
the environment before triton is first imported, so it is set here, before anything else.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

# A fresh Inductor cache per run: a cache left by an earlier build of the custom ops (whose
# schemas are not part of its key) could replay a stale compiled graph.
_OWN_INDUCTOR_CACHE = None
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    _OWN_INDUCTOR_CACHE = tempfile.mkdtemp(prefix="kasmina-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = _OWN_INDUCTOR_CACHE

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


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _OWN_INDUCTOR_CACHE is not None:
        shutil.rmtree(_OWN_INDUCTOR_CACHE, ignore_errors=True)
