"""Test-wide setup.

Without a GPU the Triton kernels run through the interpreter: ``TRITON_INTERPRET=1`` must be in
the environment before triton is first imported, so it is set here, before anything else.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

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
def sigint_raises() -> Iterator[None]:
    """SIGINT raises ``KeyboardInterrupt`` in the test (Python's own handler), also where the
    suite runs with SIGINT ignored (a job started in the background), for the tests that send
    themselves a real Ctrl-C."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def fifo(tmp_path) -> Iterator[Path]:
    """A FIFO no writer opens: reading it blocks. Should the code under test block on it (the
    bug a test with it pins), a watchdog opens its write end after 20 s, so that the code goes
    on, and the test fails when it ends, instead of hanging the suite."""
    path = tmp_path / "blocking.fifo"
    os.mkfifo(path)
    done, unblocked = threading.Event(), threading.Event()

    def unblock() -> None:
        if not done.wait(20.0):
            try:  # a reader is blocked in open(): this lets it through (it reads EOF)
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
                unblocked.set()
            except OSError:  # no reader (ENXIO): nothing was blocked
                pass

    watchdog = threading.Thread(target=unblock, daemon=True)
    watchdog.start()
    yield path
    done.set()
    watchdog.join()
    if unblocked.is_set():
        pytest.fail(f"blocked reading the FIFO {path} until the watchdog opened its write end")


def _interpreter_problem() -> str | None:
    """Why this Triton's interpreter cannot run the kernels, or None.

    Every kernel loops over runtime bounds (``range(0, n, BLOCK)``). Triton before 3.7 turns
    such a bound into a Python int with ``int()`` of a one-element array, which recent NumPy
    refuses (2.4 here), so each kernel test would fail with the same cryptic
    ``InterpreterError``.
    A three-element kernel answers it once, before any test runs.
    """
    import triton
    import triton.language as tl

    @triton.jit
    def _count(out_ptr, n):
        acc = 0
        for _ in range(0, n):
            acc += 1
        tl.store(out_ptr, acc)

    out = torch.zeros(1, dtype=torch.int32)
    try:
        _count[(1,)](out, 3)
    except Exception as exc:  # the interpreter's own failure, whatever its type
        import numpy

        return (
            f"Triton {triton.__version__}'s interpreter cannot run a loop over a runtime bound "
            f"with NumPy {numpy.__version__} ({type(exc).__name__}: {exc}); install "
            f"triton>=3.7 to run the kernel tests on a CPU"
        )
    return None if int(out[0]) == 3 else f"the interpreter counted {int(out[0])} for 3"


def pytest_sessionstart(session: pytest.Session) -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        problem = _interpreter_problem()
        if problem is not None:
            pytest.exit(problem, returncode=4)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _OWN_INDUCTOR_CACHE is not None:
        shutil.rmtree(_OWN_INDUCTOR_CACHE, ignore_errors=True)
