"""A seed-only KD leak under ``wrap_ddp``: contained on every rank, as in one process.

The KD backward reached the leaked host parameter and ran its gradient accumulator, whose DDP
hook marked it ready; the host's own backward then marked it again, and torch's reducer raised
"Expected to mark a variable ready only once" on every rank. Two gloo ranks (``test_ddp``'s
``Trainer``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from kasmina.control.processes import spawn
from tests.manager.helpers import SEED0
from tests.manager.test_ddp import Trainer, _assert_equal_states, _load, _signed, _spec


def _worker_kd_leak(rank: int, world: int, spec: dict[str, Any]) -> None:
    """Every rank's kernel holds a host parameter: its KD gradient reaches the host."""
    t = Trainer(rank, world, spec)
    t.epoch_with({0: [_signed(t.rig, "germinate", SEED0, spec["mlp"])]}, steps=0)
    t.manager.seed(SEED0).kernel.inner.fc1.bias = t.rig.model.out.host.bias
    weight = t.rig.model.inp.weight
    before = weight.detach().clone()
    t.train(1)
    t.save(
        spec["out"],
        "kdleak",
        stepped=t.host_stepped,
        moved=not torch.equal(before, weight),
        violations=t.manager.seed(SEED0).isolation_violations,
    )
    t.manager.close()


@pytest.mark.slow  # spawns processes: most of the time is their imports
def test_a_seed_only_kd_leak_under_ddp_skips_the_host_step_on_every_rank(
    tmp_path: Path, published
) -> None:
    """In one process the leak is dropped where it is found, the seed charged and the host's
    step skipped; under DDP the host's backward raised on every rank. Now every rank skips."""
    spec = _spec(tmp_path, published, "gloo")
    spawn(_worker_kd_leak, 2, args=(spec,), backend="gloo", timeout_s=60, join_timeout_s=120)
    runs = _load(tmp_path, "kdleak", 2)
    assert [run["stepped"] for run in runs] == [[False], [False]]
    assert [run["moved"] for run in runs] == [False, False]
    assert [run["violations"] for run in runs] == [1, 1]
    _assert_equal_states(runs)  # host weights included: no rank stepped its host
