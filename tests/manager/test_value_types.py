"""Numbers of other types at the manager's API: NumPy scalars, Fractions, tensors, strings and
bools, each taken as the Python number it equals or refused naming the argument."""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from kasmina.control.auth import sign_command
from kasmina.control.builders import make_rollback_command
from kasmina.manager.manager import KasminaKernelManager
from kasmina.manager.report import epoch_metrics
from kasmina.utils.keyring import Keyring
from tests.manager.helpers import Host, make_config, run_command


def _manager(tmp_path: Path, store: Path, keyring: Keyring) -> KasminaKernelManager:
    return KasminaKernelManager(make_config(tmp_path, store), keyring=keyring)


def _train_epochs(manager: KasminaKernelManager, model: Host, epochs: int) -> None:
    x, y = torch.randn(16, 6), torch.randint(0, 4, (16,))
    for epoch in range(epochs):
        manager.backward(F.cross_entropy(model(x), y))
        manager.step()
        manager.end_epoch(epoch, {"val_accuracy": 0.5})


@pytest.mark.parametrize(
    "options",
    [
        {"host_lr": np.float64(0.05)},
        {"host_lr": Fraction(1, 20)},
        {"eps": np.float64(1e-8), "betas": (np.float64(0.9), 0.999)},
        {"schedule": np.float64(0.01)},  # a user's schedule writes a NumPy lr into the group
    ],
    ids=["numpy-lr", "fraction-lr", "numpy-options", "numpy-schedule"],
)
def test_numbers_of_other_types_leave_checkpoints_a_rollback_can_read(
    tmp_path: Path, store: Path, keyring: Keyring, options: dict
) -> None:
    """A NumPy or Fraction learning rate or option went into every checkpoint as it was, and
    ``torch.load(weights_only=True)`` refuses those: every ROLLBACK failed ("Unsupported
    global: numpy...scalar") although the checkpoints were written without a word."""
    manager = _manager(tmp_path, store, keyring)
    model = Host()
    schedule = options.pop("schedule", None)
    manager.attach(model, "out", 2, 2, **options)
    group = manager.optimizers.optimizer("host").param_groups[0]
    assert type(group["lr"]) is not Fraction  # the host optimizer got a float
    if schedule is not None:
        group["lr"] = schedule
    _train_epochs(manager, model, 2)
    raw = sign_command(make_rollback_command(0), keyring, "ctl").SerializeToString()
    assert run_command(manager, raw)
    assert manager.counters["rollbacks_committed"] == 1
    manager.close()


@pytest.mark.parametrize(
    "lr", [torch.tensor(math.inf), torch.tensor(math.nan), torch.tensor(-1.0), torch.ones(2)]
)
def test_a_tensor_host_lr_is_held_to_the_same_range(
    tmp_path: Path, store: Path, keyring: Keyring, lr: torch.Tensor
) -> None:
    """A tensor ``host_lr`` skipped the "finite and > 0" check: an inf one made every host
    weight inf at the first step."""
    manager = _manager(tmp_path, store, keyring)
    model = Host()
    with pytest.raises(ValueError, match="host_lr"):
        manager.attach(model, "out", 2, 2, host_lr=lr)
    manager.attach(model, "out", 2, 2, host_lr=torch.tensor(0.05))  # a good one trains
    _train_epochs(manager, model, 1)
    assert all(p.isfinite().all() for p in model.parameters())
    manager.close()


def test_teacher_logits_of_a_dtype_the_kd_loss_refuses_are_refused_when_set(
    tmp_path: Path, store: Path, keyring: Keyring
) -> None:
    """A NumPy (or integer) teacher was accepted and the next forward of the user's model
    raised from the slot's KD loss: refused when it is set. A float64 one is read in fp32 by
    the slots, so the manager takes it too (it once refused what a slot took)."""
    manager = _manager(tmp_path, store, keyring)
    manager.attach(Host(), "out", 2, 2)
    for teacher in (np.zeros((16, 4), np.float32), torch.zeros(16, 4, dtype=torch.long)):
        with pytest.raises(ValueError, match="teacher_logits must be"):
            manager.set_teacher_logits(teacher)  # type: ignore[arg-type]
    assert manager.set_teacher_logits(torch.randn(16, 4, dtype=torch.float64)) == ["out"]
    manager.close()


def test_epoch_metrics_take_numbers_and_one_element_tensors_only() -> None:
    given = {"a": np.float32(0.5), "b": torch.tensor(0.25), "c": Fraction(1, 4)}
    got = epoch_metrics(given | {"d": torch.tensor([0.75]).numpy()})
    assert got == {"a": 0.5, "b": 0.25, "c": 0.25, "d": 0.75}
    assert all(type(v) is float for v in got.values())
    cases = (("0.9", "float"), (True, "float"), (torch.ones(2), "one number"), (10**400, "bits"))
    for value, message in cases:  # an int past a float's range raised OverflowError
        with pytest.raises(ValueError, match=rf"val_metrics\['a'\] must be.*{message}"):
            epoch_metrics({"a": value})


@pytest.mark.parametrize("given", [3, "ab", [("a", 0.5)]])
def test_val_metrics_that_are_no_mapping_are_refused_by_name(given: object) -> None:
    """``end_epoch(epoch, 3)`` raised "'int' object is not iterable", ``"ab"`` a ValueError about
    a dictionary update sequence, and a list of pairs was taken: each is a TypeError."""
    with pytest.raises(TypeError, match="val_metrics must be a mapping or None, got"):
        epoch_metrics(given)  # type: ignore[arg-type]
