"""Parameters and buffers sharing memory: refused at publish; a kernel published with them
before that (an older Kasmina's artifact) is one no seed runs, refused with the reason."""

from __future__ import annotations

import copy
import io
from pathlib import Path

import pytest
import torch
from torch import nn

from kasmina.seeds.seed import GradientIsolatedSeed
from kasmina.urza.client import UrzaLibraryClient
from kasmina.urza.kernel import GPUKernel
from kasmina.urza.keys import PublisherKey, TrustedPublishers
from kasmina.urza.publish import publish_artifact, publish_payload


class TiedByData(nn.Module):
    """Weight tying by ``.data``: two Parameters over one storage."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(2, 2), nn.Linear(2, 2)
        self.b.weight.data = self.a.weight.data

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.5 * self.b(torch.tanh(self.a(x)))


class BufferViewsParameter(nn.Module):
    """A buffer over the parameter's memory (``w.detach()``), or a row of it."""

    def __init__(self, row: bool = False) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(2, 2) * 0.1)
        self.register_buffer("w_ref", self.w.detach()[1] if row else self.w.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + x @ self.w + 0.1 * (x * self.w_ref[..., -1])


class ParameterAsBuffer(nn.Module):
    """One tensor registered as a parameter and as a buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(2, 2) * 0.1)
        self.register_buffer("wb", self.w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + x @ self.w + 0.1 * (x @ self.wb)


class SlicesOfOneBuffer(nn.Module):
    """Two buffers, disjoint halves of one flat tensor (no memory in common); with ``whole``,
    the flat tensor too, a buffer overlapping both."""

    def __init__(self, whole: bool = False) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(2, 2) * 0.1)
        flat = torch.randn(4)
        if whole:
            self.register_buffer("flat", flat)
        self.register_buffer("lo", flat[:2])
        self.register_buffer("hi", flat[2:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + x @ self.w + self.lo * self.hi


SHARED = {
    "tied by .data": (TiedByData, "'a.weight' and 'b.weight' share memory"),
    "buffer views a parameter": (BufferViewsParameter, "'w' and 'w_ref' share memory"),
    "buffer views a row": (lambda: BufferViewsParameter(row=True), "'w' and 'w_ref' share"),
    "parameter as a buffer": (ParameterAsBuffer, "'w' and 'wb' are one tensor"),
}


@pytest.mark.parametrize("case", list(SHARED))
def test_publishing_refuses_parameters_and_buffers_that_share_memory(
    case: str, tmp_path: Path, publisher: PublisherKey
) -> None:
    """Only one tensor under two names was refused, parameters and buffers apart: two
    Parameters over one storage were published, and a seed's copy trained them apart; a buffer
    over a parameter's memory was published, and no seed could copy the kernel (GERMINATE
    failed as an internal error). Refused now, naming both, and nothing is written."""
    build, reason = SHARED[case]
    with pytest.raises(ValueError, match=reason):
        publish_artifact(build(), [torch.randn(4, 2)], str(tmp_path), "bp", publisher)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("whole", [False, True])
def test_publishing_takes_buffers_over_one_storage(
    whole: bool, tmp_path: Path, publisher: PublisherKey
) -> None:
    """Disjoint slices of one buffer, and a buffer over another (a lookup table and a view of
    it, which a seed's copy keeps shared: no parameter to come apart)."""
    module = SlicesOfOneBuffer(whole=whole)
    publish_artifact(module, [torch.randn(4, 2)], str(tmp_path), "bp", publisher)


def _published_before_the_check(
    module: nn.Module,
    store: Path,
    publisher: PublisherKey,
    trusted: TrustedPublishers,
    device: str = "cpu",
) -> GPUKernel:
    """``module`` published as an older Kasmina published it (no memory check), and loaded
    onto ``device``."""
    buffer = io.BytesIO()
    torch.export.save(torch.export.export(module, (torch.randn(4, 2),)), buffer)
    manifest = publish_payload(buffer.getvalue(), str(store), "old", publisher)
    payload, verified = UrzaLibraryClient(str(store), trusted).fetch(manifest.artifact_id)
    return GPUKernel.from_binary(payload, verified, device)


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize(
    ("build", "names"),
    [
        (TiedByData, "'a.weight' and 'b.weight'"),
        (BufferViewsParameter, "'w' and 'w_ref'"),
        (ParameterAsBuffer, "'w' and 'wb'"),
    ],
)
def test_a_seed_refuses_a_kernel_published_with_shared_memory(
    build,
    names: str,
    device: str,
    tmp_path: Path,
    publisher: PublisherKey,
    trusted: TrustedPublishers,
) -> None:
    """Loaded, such a kernel holds the tensors in one storage still; a seed's copy held tied
    weights apart (they drifted from the first step), or could not be made (a torch deepcopy
    error, reported by GERMINATE as an internal error). Its hazard names both tensors, and a
    seed refuses it. Read before the move to the kernel's device, which copies each tensor on
    its own: on any device but the CPU (meta stands in for a GPU here) the loaded tensors no
    longer share memory, yet the seed trains them apart all the same."""
    kernel = _published_before_the_check(build(), tmp_path, publisher, trusted, device)
    hazard = kernel.seed_hazard
    assert hazard is not None and f"holds {names} in shared memory" in hazard
    seed = GradientIsolatedSeed(2, "s")
    with pytest.raises(ValueError, match=f"the kernel holds {names} in shared memory"):
        seed.attach_kernel(kernel)
    assert seed.kernel is None


def test_a_copy_that_holds_tied_weights_apart_is_not_refused(
    tmp_path: Path, publisher: PublisherKey, trusted: TrustedPublishers
) -> None:
    """A seed that germinated such a kernel before the refusal trained a copy holding the two
    apart: restoring it (kasmina.load, a rollback) copies the original and loads its weights,
    and that copy is what it trained, not refused. Buffers over one storage stay shared in a
    copy, and a kernel with them runs."""
    original = _published_before_the_check(TiedByData(), tmp_path / "a", publisher, trusted)
    assert original.seed_hazard is not None
    trained = copy.deepcopy(original)
    assert trained.seed_hazard is None
    GradientIsolatedSeed(2, "s").attach_kernel(trained)
    views = SlicesOfOneBuffer(whole=True)
    kernel = _published_before_the_check(views, tmp_path / "b", publisher, trusted)
    assert kernel.seed_hazard is None
    buffers = dict(copy.deepcopy(kernel).named_buffers())
    shared = {b.untyped_storage().data_ptr() for b in buffers.values()}
    assert len(buffers) == 3 and len(shared) == 1
