"""``manager.set_teacher_logits`` hands logits only to the slots whose KD can read them: split
along their last dimension (the slots ``set_kd_head`` picks) and with KD logits that wide; logits
no slot reads are dropped with one warning and counted (docs/design.md §7)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from kasmina.kd.config import KDConfig
from kasmina.manager.manager import KasminaKernelManager
from kasmina.stages import SeedStage
from kasmina.utils.keyring import Keyring
from tests.manager.helpers import make_config

CLASSES = 4


class ConvNet(nn.Module):
    """A conv slot with as many channels as there are classes, and a linear slot over them."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, CLASSES, 3, padding=1)
        self.fc = nn.Linear(CLASSES, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.conv(x)).mean((2, 3)))


def _manager(tmp_path: Path, keyring: Keyring) -> tuple[KasminaKernelManager, ConvNet]:
    (tmp_path / "urza").mkdir()
    config = make_config(tmp_path, tmp_path / "urza", kd_enabled=True, kd=KDConfig())
    manager = KasminaKernelManager(config, keyring=keyring)
    torch.manual_seed(0)
    model = ConvNet()
    conv, fc = manager.attach(model, ["conv", "fc"], 2, 2)
    assert conv.chunk_dim == 1 and conv.kd_width == fc.kd_width == CLASSES
    # A seed training on its chunk of each slot (a stand-in for GERMINATE): both distil.
    conv.seeds[0].attach_kernel(nn.Conv2d(2, 2, 1))
    fc.seeds[0].attach_kernel(nn.Linear(2, 2))
    for slot in (conv, fc):
        slot.seeds[0].transition_to(SeedStage.ISOLATED_INIT)
    return manager, model


def test_class_logits_skip_a_conv_slot_as_wide_as_the_classes(
    tmp_path: Path, keyring: Keyring
) -> None:
    """[B, C] class logits go to the linear slot, not to the conv slot whose channel count
    happens to be C (its KD reads [B, C, H, W] along W): the training forward does not raise
    and the linear slot's seed distils."""
    manager, model = _manager(tmp_path, keyring)
    conv, fc = manager.require_registry().slots
    x = torch.randn(8, 3, 5, 5)
    assert manager.set_teacher_logits(torch.randn(8, CLASSES)) == [fc.layer_id]
    assert conv._teacher_logits is None and fc._teacher_logits is not None
    F.cross_entropy(model(x), torch.randint(0, CLASSES, (8,)))
    kd = manager.collect_kd_losses()
    assert kd is not None and torch.isfinite(kd)
    assert manager.counters["teacher_logits_unread"] == 0


def test_logits_no_slot_reads_are_dropped_with_one_warning(
    tmp_path: Path, keyring: Keyring, caplog: pytest.LogCaptureFixture
) -> None:
    manager, model = _manager(tmp_path, keyring)
    assert manager.set_teacher_logits(None) == []  # no teacher this step: nothing to say
    with caplog.at_level(logging.WARNING, logger="kasmina.manager.teaching"):
        for _ in range(3):
            assert manager.set_teacher_logits(torch.randn(8, 10)) == []  # 10 classes: no slot
    warnings = [r.getMessage() for r in caplog.records if r.name == "kasmina.manager.teaching"]
    assert len(warnings) == 1 and "10-wide teacher logits" in warnings[0]
    assert manager.counters["teacher_logits_unread"] == 3
    assert all(slot._teacher_logits is None for slot in manager.require_registry().slots)
    model(torch.randn(8, 3, 5, 5))
    assert manager.collect_kd_losses() is None


class Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.out = nn.Linear(8, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.inp(x)))


def test_a_slot_split_along_its_last_dimension_by_a_positive_index_distils(
    tmp_path: Path, keyring: Keyring
) -> None:
    """``chunk_dim=1`` on a ``[B, C]`` output is its last dimension: the logits were left
    unread (only ``-1`` counted as last) and a KD head was refused."""
    (tmp_path / "urza").mkdir()
    config = make_config(tmp_path, tmp_path / "urza", kd_enabled=True, kd=KDConfig())
    manager = KasminaKernelManager(config, keyring=keyring)
    torch.manual_seed(0)
    model = Head()
    (slot,) = manager.attach(model, "out", 2, 2, chunk_dim=1)
    x = torch.randn(5, 6)
    model(x)  # the slot records its [5, 4] output
    slot.seeds[0].attach_kernel(nn.Linear(2, 2))
    slot.seeds[0].transition_to(SeedStage.ISOLATED_INIT)
    assert manager.set_teacher_logits(torch.randn(5, CLASSES)) == [slot.layer_id]
    model(x)
    kd = manager.collect_kd_losses()
    assert kd is not None and kd.requires_grad
    assert manager.counters["teacher_logits_unread"] == 0
    # A move clears the recorded output until the next forward: the slot still reads its
    # last dimension (the logits set before that forward went to no slot, a head was refused).
    model.to("cpu")
    assert manager.set_teacher_logits(torch.randn(5, CLASSES)) == [slot.layer_id]
    assert manager.set_kd_head(torch.randn(9, CLASSES)) == [slot.layer_id]
    slot.set_kd_head(torch.randn(9, CLASSES))  # reads the last dimension: accepted


@pytest.mark.parametrize("kernel", ["frozen", "parameter-free"])
def test_kd_of_a_seed_with_nothing_to_train_leaves_the_step_whole(
    tmp_path: Path, keyring: Keyring, kernel: str
) -> None:
    """A distilling seed whose kernel has no parameter that needs a gradient makes a KD loss
    without one: ``manager.backward`` raised on it before the task loss ran."""
    manager, model = _manager(tmp_path, keyring)
    conv, fc = manager.require_registry().slots
    if kernel == "frozen":
        fc.seeds[0].kernel.requires_grad_(False)
    else:
        fc.seeds[0].detach_kernel()
        fc.seeds[0].attach_kernel(nn.Tanh())
    conv.seeds[0].kernel.requires_grad_(False)
    x, y = torch.randn(8, 3, 5, 5), torch.randint(0, CLASSES, (8,))
    manager.set_teacher_logits(torch.randn(8, CLASSES))
    loss = F.cross_entropy(model(x), y)
    kd = manager.collect_kd_losses()
    assert kd is not None and not kd.requires_grad
    manager.backward(loss, kd_loss=kd)
    assert all(p.grad is not None for p in model.fc.host.parameters())
