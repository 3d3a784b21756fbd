"""Numbers given to the store's client, its breaker and the built-in blueprints: held to
``kasmina.utils.checks`` (a bool is no size, a NumPy number is kept as its Python value)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kasmina.urza.blueprints import get_blueprint
from kasmina.urza.cache import GPUKernelCache
from kasmina.urza.client import UrzaLibraryClient
from kasmina.urza.loader import KernelLoader
from kasmina.urza.resilience import MAX_TIMEOUT_S, CircuitBreaker, check_store_settings
from kasmina.utils.telemetry import TelemetryReporter


@pytest.mark.parametrize("dim", [True, np.bool_(True), 2.0, "2", 0])
def test_a_blueprints_width_is_a_count(dim) -> None:
    """``build(True)`` passed the width check (``True`` is an ``int``) and failed in torch
    with a ``TypeError`` naming no argument."""
    with pytest.raises(ValueError, match="blueprint dim must be an int >= 1"):
        get_blueprint("residual-mlp").build(dim)


def test_a_blueprints_hidden_width_is_a_count() -> None:
    """``build(4, hidden=True)`` built a 1-wide hidden layer; a NumPy width reached ``Linear``
    as given."""
    with pytest.raises(ValueError, match="blueprint hidden width must be an int >= 1, got True"):
        get_blueprint("residual-mlp").build(4, hidden=True)
    block = get_blueprint("residual-mlp").build(np.int64(4), hidden=np.int64(3))
    assert block.fc1.in_features == 4 and block.fc1.out_features == 3
    assert type(block.fc1.out_features) is int


def test_numpy_client_settings_are_kept_as_python_numbers(tmp_path) -> None:
    """A NumPy size or float32 timeout was refused (a float64 one kept as a NumPy scalar), where
    the manager's own settings take them: each is the Python number it equals."""
    client = UrzaLibraryClient(
        str(tmp_path),
        {},
        timeout_s=np.float32(2.0),
        retries=np.int64(1),
        breaker_threshold=np.int64(3),
        breaker_reset_s=np.float64(4.0),
        max_manifest_bytes=np.int64(4096),
        chunk_bytes=np.int32(1024),
    )
    try:
        assert (client.max_manifest_bytes, client.chunk_bytes, client.timeout_s) == (4096, 1024, 2)
        assert type(client.max_manifest_bytes) is int and type(client.chunk_bytes) is int
        assert type(client.breaker.threshold) is int and type(client.breaker.reset_s) is float
    finally:
        client.close()
    with pytest.raises(ValueError, match="chunk_bytes must be an int >= 1, got True"):
        UrzaLibraryClient(str(tmp_path), {}, chunk_bytes=True)
    breaker = CircuitBreaker(np.int64(2), np.float32(1.5))
    assert (breaker.threshold, breaker.reset_s) == (2, 1.5) and type(breaker.reset_s) is float


@pytest.mark.parametrize("timeout_s", [0, 0.0, -1.0, MAX_TIMEOUT_S * (1 + 1e-12)])
def test_a_read_timeout_outside_zero_to_a_week_is_refused(timeout_s) -> None:
    """A zero timeout failed every read before it began; past a week it is a typo, not a wait."""
    with pytest.raises(ValueError, match=r"^timeout_s must be a number in \(0, 604800\]"):
        check_store_settings(timeout_s=timeout_s)


def test_a_read_timeout_of_a_week_or_a_moment_is_taken() -> None:
    for timeout_s in (MAX_TIMEOUT_S, 1e-9):
        assert check_store_settings(timeout_s=timeout_s) == {"timeout_s": timeout_s}


@pytest.mark.parametrize("attempts", [0, -1, True, 1.0])
def test_pinned_original_refuses_attempts_that_are_no_count_of_one_or_more(
    tmp_path, attempts
) -> None:
    """``attempts=0`` loaded nothing and raised ``UnboundLocalError`` at its return; a bool or
    a float was taken (or failed in ``range``). Refused before the store is read."""
    client = UrzaLibraryClient(str(tmp_path), {})
    loader = KernelLoader(client, GPUKernelCache(64), torch.device("cpu"), TelemetryReporter())
    try:
        with pytest.raises(ValueError, match=r"^attempts must be an int >= 1"):
            loader.pinned_original("art-1", attempts=attempts)
        assert loader.cache.stats()["misses"] == 0
    finally:
        client.close()
