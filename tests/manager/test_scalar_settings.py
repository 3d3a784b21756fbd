"""Numbers of other types in the manager's settings (``KasminaConfig``, the checkpoint store,
``prune_runs``): held to ``kasmina.utils.checks`` as the manager's own arguments are: a bool is no
number, a NumPy number is kept as the Python number it equals."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from kasmina.manager.checkpoints import NoCheckpointStore
from kasmina.manager.config import KasminaConfig
from kasmina.manager.runs import prune_runs

NUMPY_SETTINGS = {
    "cache_size_mb": np.float32(0.5),
    "cache_max_kernels": np.int64(16),
    "urza_timeout_s": np.float32(5.0),
    "urza_retries": np.int64(2),
    "urza_backoff_s": np.float64(0.25),
    "urza_breaker_threshold": np.int32(4),
    "command_freshness_s": np.float64(30.0),
    "max_pending_commands": np.int64(8),
    "seed_fault_limit": np.int64(2),
    "checkpoint_every_epochs": np.int64(2),
    "max_seed_cost_ratio": Fraction(3, 2),
    "performance_gate": np.int64(400),
    "g5_max_metric_drop": np.float32(0.25),
    "default_embargo_epochs": np.int16(3),
    "grafting_temperature": np.float64(2.0),
    "telemetry_jsonl_max_bytes": np.int64(4096),
}


def _config(tmp_path: Path, **settings) -> KasminaConfig:
    return KasminaConfig(urza_url=str(tmp_path / "urza"), runs_root=str(tmp_path), **settings)


def test_numpy_settings_are_kept_as_python_numbers(tmp_path) -> None:
    """A NumPy float32 setting was refused where ``KDConfig`` took one, a float64 was kept as a
    NumPy scalar (``to_dict`` promises plain JSON values), and a NumPy integer count was refused
    where ``attach`` took one: each is now the Python number it equals."""
    config = _config(tmp_path, **NUMPY_SETTINGS)
    for name, value in NUMPY_SETTINGS.items():
        got = getattr(config, name)
        assert got == value and type(got) in (int, float), (name, type(got))
    assert type(config.urza_retries) is int and type(config.cache_size_mb) is float
    json.dumps(config.to_dict())


def test_a_numpy_setting_changed_later_is_kept_as_a_python_number(tmp_path) -> None:
    """Set before ``hold`` (validated there) or on a held config (validated at once), a NumPy
    number is kept as its Python value, as the constructor keeps it."""
    config = _config(tmp_path)
    config.latency_budget_ms = np.float32(2.0)
    config.hold()
    assert config.latency_budget_ms == 2.0 and type(config.latency_budget_ms) is float
    config.grafting_temperature = np.float32(0.5)  # a live setting
    config.min_isolated_epochs = np.int64(2)
    assert type(config.grafting_temperature) is float and type(config.min_isolated_epochs) is int
    with pytest.raises(ValueError, match="grafting_temperature must be a float, got bool"):
        config.grafting_temperature = True
    assert config.grafting_temperature == 0.5


def test_checkpoint_cadence_takes_a_numpy_count_as_an_int() -> None:
    store = NoCheckpointStore(every_epochs=np.int64(2), max_rollback_epochs=np.int32(3))
    assert (store.every_epochs, store.max_rollback_epochs) == (2, 3)
    assert type(store.every_epochs) is int and type(store.max_rollback_epochs) is int


def test_prune_runs_refuses_a_bool_age(tmp_path) -> None:
    """``prune_runs(older_than_s=True)`` was an age of one second: every run idle for a second
    was removed."""
    (tmp_path / "old").mkdir()
    with pytest.raises(ValueError, match="older_than_s must be a float, got bool"):
        prune_runs(tmp_path, older_than_s=True)
    with pytest.raises(ValueError, match="keep must be an int >= 0, got True"):
        prune_runs(tmp_path, keep=True)
    assert (tmp_path / "old").is_dir()
    assert prune_runs(tmp_path, older_than_s=np.float32(1e9), dry_run=True) == []
