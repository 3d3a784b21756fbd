"""Counts given to a seed, a slot and a state table: held to ``kasmina.utils.checks`` as
``attach`` holds its own (a bool is no count, a NumPy integer is kept as a Python int)."""

from __future__ import annotations

import numpy as np
import pytest
from torch import nn

from kasmina.seeds.layer import KasminaLayer
from kasmina.seeds.seed import GradientIsolatedSeed
from kasmina.seeds.table import GPUStateTensor


@pytest.mark.parametrize("chunk_size", [True, np.bool_(True), 2.0, "2", 0, 10**400])
def test_a_seeds_chunk_size_is_a_count(chunk_size) -> None:
    """``GradientIsolatedSeed(True, "s0")`` made a seed of chunk 1 (``True`` is an ``int``),
    where ``attach`` refused the same chunk size."""
    with pytest.raises(ValueError, match="chunk_size must be an int >= 1"):
        GradientIsolatedSeed(chunk_size, "s0")


def test_a_seeds_numpy_counts_are_kept_as_python_ints() -> None:
    """A NumPy chunk size or fault limit was refused, where ``attach`` took it; it is kept as a
    Python int (a NumPy scalar in a whole-model save fails a ``weights_only`` load)."""
    seed = GradientIsolatedSeed(np.int64(3), "s0", fault_limit=np.int32(2))
    assert (seed.chunk_size, seed.fault_limit) == (3, 2)
    assert type(seed.chunk_size) is int and type(seed.fault_limit) is int
    seed.fault_limit = np.int64(5)
    assert type(seed.fault_limit) is int
    with pytest.raises(ValueError, match="fault_limit must be an int >= 1, got True"):
        seed.fault_limit = True


def test_a_slot_of_a_bool_number_of_seeds_is_refused() -> None:
    """``KasminaLayer(host, True, 2, state=...)`` passed the layout check (``True * 2`` is the
    host's width) and made a slot whose ``num_seeds`` was ``True``."""
    with pytest.raises(ValueError, match="num_seeds must be an int >= 1, got True"):
        KasminaLayer(nn.Linear(4, 2), True, 2, state=GPUStateTensor(1, "cpu"))
    with pytest.raises(ValueError, match="chunk_size must be a Python int, got int64"):
        KasminaLayer(nn.Linear(4, 2), 1, np.int64(2))  # the slot would keep it as given
    assert KasminaLayer(nn.Linear(4, 2), 1, 2).num_seeds == 1


@pytest.mark.parametrize("embargo", [True, np.bool_(True), 1.0])
def test_a_state_tables_embargo_is_no_bool(embargo) -> None:
    """``GPUStateTensor(2, embargo_epochs=True)`` made an embargo of one epoch, which the table's
    own ``load_state_dict`` refuses."""
    with pytest.raises(ValueError, match=r"is not an int in \[0, 2147483647\]"):
        GPUStateTensor(2, "cpu", embargo_epochs=embargo)
    table = GPUStateTensor(2, "cpu", embargo_epochs=np.int64(3))
    assert table.embargo_epochs == 3 and type(table.embargo_epochs) is int
