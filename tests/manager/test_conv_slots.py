"""Slots on convolutional hosts through the manager: the recorded contract of a block whose
batched rank no module declares, the dry run on the strided chunk a seed is handed, and the
host's memory format kept by every path of the slot and by a merge."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import kasmina
from kasmina.control.auth import sign_command
from kasmina.control.builders import make_seed_command
from kasmina.manager.manager import KasminaKernelManager
from kasmina.urza.blueprints import AffineShift, ResidualMLP
from kasmina.urza.publish import publish_artifact
from kasmina.utils.keyring import Keyring
from tests.manager.helpers import PUBLISHER, S, make_config, run_command


class ChannelKernel(nn.Module):
    """``x + conv1x1(x)`` over a chunk of channels."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x)


class PerChannel(nn.Module):
    """One 3x3 filter on every channel, through ``view``: fine on any contiguous input, not on a
    channel slice of an NCHW tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        return x + self.conv(x.view(n * c, 1, h, w)).view(n, c, h, w)


class Net(nn.Module):
    def __init__(self, block: nn.Module, flatten: bool = False) -> None:
        super().__init__()
        self.block, self.fc, self.flatten = block, nn.Linear(8, 4), flatten

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        if self.flatten:  # NHWC rows: a view only a channels-last output allows
            return self.fc(y.permute(0, 2, 3, 1).reshape(-1, 8).view(len(x), -1, 8).mean(1))
        return self.fc(y.mean((-2, -1)))


class ConvRig:
    """A manager over ``Net(block)`` with one slot on ``block`` (``num_seeds`` seeds)."""

    def __init__(self, tmp: Path, store: Path, keyring: Keyring, model: Net, n: int, **attach):
        torch.manual_seed(0)
        self.manager = KasminaKernelManager(make_config(tmp, store), keyring=keyring)
        self.model, self.keyring = model, keyring
        options = {"host_lr": 0.05, "seed_lr": 0.05, **attach}
        self.slot = self.manager.attach(model, "block", n, 8 // n, **options)[0]
        gen = torch.Generator().manual_seed(3)
        self.x, self.y = torch.randn(4, 3, 7, 5, generator=gen), torch.randint(0, 4, (4,))

    def send(self, op: str, seed_id: str, artifact_id: str = "") -> bool:
        command = make_seed_command(op, seed_id, artifact_id, {}, validate=False)
        return run_command(self.manager, sign_command(command, self.keyring, "ctl"))

    def train(self, steps: int = 1) -> dict:
        report: dict = {}
        for _ in range(steps):
            self.manager.backward(F.cross_entropy(self.model(self.x), self.y))
            report = self.manager.step()
        return report


def _publish(store: Path, module: nn.Module, example: torch.Tensor) -> str:
    torch.manual_seed(1)
    return publish_artifact(module, [example], str(store), "conv", PUBLISHER).artifact_id


@pytest.mark.parametrize(
    "block, chunk_dim",
    [
        (lambda: nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()), 1),
        (lambda: nn.Conv2d(3, 8, 3, padding=1), -3),
    ],
    ids=["block-dim1", "conv-dim-3"],
)
def test_an_unbatched_first_call_does_not_fix_the_slots_record(
    tmp_path: Path, store: Path, keyring: Keyring, block, chunk_dim: int
) -> None:
    """One image served before training (``model(x[0])``) recorded the slot's contract as
    ``(C, H, W)`` for good when no module declared the batched rank: a block chunked on dim 1,
    or a conv chunked on ``-3``. GERMINATE then refused every kernel that fits the training
    calls, telling the user to export a 3-D one. A conv's rank is its own whatever the sign of
    ``chunk_dim``; a block's record follows the first call that is it with a batch dim."""
    rig = ConvRig(tmp_path, store, keyring, Net(block()), 2, chunk_dim=chunk_dim)
    with torch.no_grad():
        rig.model.eval()(rig.x[0])
    rig.model.train()
    rig.train(1)
    assert tuple(rig.slot.output_contract[0]) == (4, 8, 7, 5)
    kernel = _publish(store, ChannelKernel(4), torch.randn(2, 4, 6, 6))
    assert rig.send("germinate", "block[0]", kernel), rig.manager.command_log[-1]
    report = rig.train(2)
    assert report["seeds_stepped"] == ["block[0]"] and not rig.slot.sat_out
    with torch.no_grad():  # an unbatched call later: the seeds sit it out, the record stays
        rig.model.eval()(rig.x[0])
    assert tuple(rig.slot.output_contract[0]) == (4, 8, 7, 5)
    assert rig.slot.sat_out == {"seeds": 1}


class SeqNet(nn.Module):
    """A token-wise ``Linear`` (the slot, chunked on its last dim) over ``[B, T, F]``."""

    def __init__(self) -> None:
        super().__init__()
        self.block, self.fc = nn.Linear(6, 8), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.block(x).mean(-2))


@pytest.mark.parametrize("host", ["sequence", "block"])
def test_a_first_unbatched_call_of_another_size_gives_way_to_the_batched_calls(
    tmp_path: Path, store: Path, keyring: Keyring, host: str
) -> None:
    """One sanity call on one sample before training: a sequence model's ``(T, F)`` fixed a
    ``Linear`` slot's record at rank 2 for good (its dim counted from the back made it no
    provisional record), and a block's image of another resolution than the training batches
    was no "batched form" of its record. GERMINATE refused every kernel of the training rank,
    and the rank-2 kernel its refusal asked for sat out every training call."""
    if host == "sequence":
        rig = ConvRig(tmp_path, store, keyring, SeqNet(), 2)  # type: ignore[arg-type]
        rig.x = torch.randn(4, 5, 6, generator=torch.Generator().manual_seed(4))
        first, example = rig.x[0, :3], torch.randn(3, 5, 4)
        kernel = publish_artifact(ResidualMLP(4), [example], str(store), "tok", PUBLISHER)
        artifact, trained = kernel.artifact_id, (4, 5, 8)
    else:
        block = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        rig = ConvRig(tmp_path, store, keyring, Net(block), 2, chunk_dim=1)
        first = torch.randn(3, 9, 9, generator=torch.Generator().manual_seed(5))
        artifact, trained = _publish(store, ChannelKernel(4), torch.randn(2, 4, 6, 6)), (4, 8, 7, 5)
    with torch.no_grad():
        rig.model.eval()(first)
    rig.model.train()
    rig.train(1)
    assert tuple(rig.slot.output_contract[0]) == trained
    assert rig.send("germinate", "block[0]", artifact), rig.manager.command_log[-1]
    assert rig.train(2)["seeds_stepped"] == ["block[0]"] and not rig.slot.sat_out
    rig.manager.close()


def test_a_settled_record_costs_a_dormant_slot_no_check_per_call(
    tmp_path: Path, store: Path, keyring: Keyring
) -> None:
    """A slot chunked from the back keeps its record open only until a call of the record's
    rank confirms it: re-checking every dormant call cost a few microseconds each."""
    rig = ConvRig(tmp_path, store, keyring, SeqNet(), 2)  # type: ignore[arg-type]
    rig.x = torch.randn(4, 5, 6, generator=torch.Generator().manual_seed(4))
    rig.train(1)
    assert rig.slot._provisional
    rig.train(1)
    assert not rig.slot._provisional and tuple(rig.slot.output_contract[0]) == (4, 5, 8)
    rig.manager.close()


def test_a_record_is_replaced_only_by_its_batched_form_and_before_any_kernel(
    tmp_path: Path, store: Path, keyring: Keyring
) -> None:
    """A block's provisional record is replaced by a call of its shape with a batch dim in
    front, by no other, and only while no seed holds a kernel (GERMINATE read the record): a
    kernel taken on an unbatched record keeps it, and sits the batched calls out."""
    block = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
    rig = ConvRig(tmp_path, store, keyring, Net(block), 2, chunk_dim=1)
    rig.x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        rig.model.eval()(rig.x[0])  # (8, 8, 8): H == C, so dim 1 fits the slot's width
        rig.model(rig.x[0, :, :, :7])  # (8, 8, 7): another shape, not the batched form
    assert tuple(rig.slot.output_contract[0]) == (8, 8, 8)
    affine = publish_artifact(AffineShift(8), [torch.randn(8, 4, 8)], str(store), "aff", PUBLISHER)
    assert rig.send("germinate", "block[0]", affine.artifact_id)
    rig.model.train()
    rig.train(2)
    assert tuple(rig.slot.output_contract[0]) == (8, 8, 8)
    assert rig.slot.sat_out == {"seeds": 2}


def test_the_dry_run_probes_the_strided_chunk_a_seed_is_handed(
    tmp_path: Path, store: Path, keyring: Keyring
) -> None:
    """A seed's chunk of channels is a strided view of the NCHW output; the dry run probed a
    fresh contiguous tensor, so a kernel that ``view``s its input was accepted, then raised at
    every call: three faults, QUARANTINE. It is refused at GERMINATE."""
    rig = ConvRig(tmp_path, store, keyring, Net(nn.Conv2d(3, 8, 3, padding=1)), 2)
    rig.train(1)
    kernel = _publish(store, PerChannel(), torch.randn(2, 4, 6, 6))
    assert not rig.send("germinate", "block[0]", kernel)
    assert "view size is not compatible" in str(rig.manager.command_log[-1])
    assert rig.train(2)["host_stepped"] and rig.manager.seed("block[0]").faults == 0


class FlatScale(nn.Module):
    """Scales its chunk through a flat view per sample: fine on an NCHW channel slice (each
    sample's block dense), not on a channel slice of a channels-last tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.view(x.shape[0], -1) * self.w).view(x.shape)


def test_the_dry_run_probes_a_channels_last_hosts_chunk_in_its_layout(
    tmp_path: Path, store: Path, keyring: Keyring
) -> None:
    """The dry run probed an NCHW tensor's chunk whatever the host's layout: on a channels-last
    model a kernel that works only on the NCHW strides was accepted, then faulted at every
    call. The probe takes the layout the slot's output was recorded in."""
    model = Net(nn.Conv2d(3, 8, 3, padding=1)).to(memory_format=torch.channels_last)
    rig = ConvRig(tmp_path, store, keyring, model, 2)
    rig.x = rig.x.contiguous(memory_format=torch.channels_last)
    rig.train(1)
    assert rig.slot.output_layout == "channels_last"
    torch.save(model, io.BytesIO())  # kept by name: a whole-model save cannot pickle a format
    kernel = _publish(store, FlatScale(), torch.randn(2, 4, 6, 6))
    assert not rig.send("germinate", "block[0]", kernel)
    assert "view size is not compatible" in str(rig.manager.command_log[-1])
    assert rig.train(2)["host_stepped"] and rig.manager.seed("block[0]").faults == 0
    plain = ConvRig(tmp_path / "plain", store, keyring, Net(nn.Conv2d(3, 8, 3, padding=1)), 2)
    plain.train(1)  # an NCHW model's chunks are what the kernel takes: accepted there
    assert plain.send("germinate", "block[0]", kernel), plain.manager.command_log[-1]
    assert plain.train(2)["host_stepped"] and plain.manager.seed("block[0]").faults == 0


def test_a_channels_last_slot_keeps_its_layout_with_a_seed_active(
    tmp_path: Path, store: Path, keyring: Keyring
) -> None:
    """With a seed ACTIVE and none blending the slot returned the chunks' ``cat``, contiguous
    (size-1 channel chunks, or a kernel that returns a contiguous tensor), and code after the
    slot that relies on the host's channels-last layout raised; a merge lost it too."""
    model = Net(nn.Conv2d(3, 8, 3, padding=1), flatten=True)
    rig = ConvRig(tmp_path, store, keyring, model.to(memory_format=torch.channels_last), 8)
    rig.x = rig.x.contiguous(memory_format=torch.channels_last)
    rig.train(1)
    kernel = _publish(store, ChannelKernel(1), torch.randn(2, 1, 6, 6))
    assert rig.send("germinate", "block[0]", kernel)
    rig.train(2)
    rig.manager.end_epoch(0)
    for stage in (S.COMPATIBILITY_CHECK, S.GRAFTING, S.STABILIZATION):
        assert rig.send("advance", "block[0]") and rig.manager.seed("block[0]").stage == stage
        rig.train(5 if stage == S.GRAFTING else 1)
    rig.manager.evaluate_seeds([(rig.x, rig.y)], loss_fn=F.cross_entropy)
    assert rig.send("advance", "block[0]"), rig.manager.command_log[-1]
    assert rig.train(1)["host_stepped"]
    out = rig.slot(rig.x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    rig.manager.close()
    want = model(rig.x)
    merged = kasmina.merge(model)
    assert merged.block(rig.x).is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(merged(rig.x), want)
    traced = torch.fx.symbolic_trace(merged.block)  # torch ops only: as unpickling traces it
    assert traced(rig.x).is_contiguous(memory_format=torch.channels_last)
