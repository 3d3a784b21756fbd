"""What ``kasmina.save`` and ``kasmina.load`` refuse, each as a ``SavedModelError`` (a wrong
argument as a ``TypeError``) with the reason: a save writes no file, and a load leaves the
model it was given bitwise unchanged, with no slot added."""

from __future__ import annotations

import hashlib
import io
import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import kasmina
from kasmina.persist import format as fmt
from kasmina.persist import loading
from kasmina.persist.format import SavedModelError
from kasmina.seeds.layer import KasminaLayer
from tests.manager.helpers import PUBLISHER, Host
from tests.persist.test_load_malformed import _header


def _unchanged_after(load: Callable[[nn.Module], Any]) -> None:
    """Run ``load`` on a fresh host (it must raise) and check the host is as it was."""
    model = Host()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layout = [(name, type(m)) for name, m in model.named_modules()]
    load(model)
    assert [(name, type(m)) for name, m in model.named_modules()] == layout
    assert not any(isinstance(m, KasminaLayer) for m in model.modules())
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


def _refused(path: Path, match: str) -> None:
    def load(model: nn.Module) -> None:
        with pytest.raises(SavedModelError, match=match):
            kasmina.load(path, model, publishers=PUBLISHER.trusted_publishers())

    _unchanged_after(load)


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    """A real saved model: ``Host`` with one slot of DORMANT seeds."""
    model = Host()
    kasmina.attach(model, ["out"], 2, 2)
    return kasmina.save(model, tmp_path / "saved" / "host.kasmina")


def _file(header: dict[str, Any], payload: bytes) -> bytes:
    encoded = json.dumps(header).encode("ascii")
    return fmt.MAGIC + struct.pack(">I", len(encoded)) + encoded + payload


def _torch_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def test_save_refuses_slots_on_two_state_tables_and_writes_nothing(tmp_path: Path) -> None:
    """Two ``attach`` calls without ``state=`` give each slot its own table, which one file
    cannot hold: refused, pointing at ``kasmina.attach``; the directory stays empty."""
    model = Host()
    kasmina.attach(model, ["inp"], 2, 4)
    kasmina.attach(model, ["out"], 2, 2)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(SavedModelError, match=r"all slots must share one state table"):
        kasmina.save(model, out / "model.kasmina")
    assert list(out.iterdir()) == []


class _NumpyExtraState(nn.Module):
    def get_extra_state(self) -> object:
        return {"seen": np.arange(3)}  # torch.save writes it; weights_only does not read it

    def set_extra_state(self, value: object) -> None:
        self.seen = value


def test_save_refuses_a_state_load_cannot_read_and_keeps_the_previous_file(
    saved: Path,
) -> None:
    """A module's extra state that ``torch.load(weights_only=True)`` refuses made a file that
    ``kasmina.load`` never read, written over the good one at that path."""
    before = saved.read_bytes()
    model = Host()
    kasmina.attach(model, ["out"], 2, 2)
    model.extra = _NumpyExtraState()
    with pytest.raises(SavedModelError, match=r"extra\._extra_state: .*numpy.*nothing written"):
        kasmina.save(model, saved)
    assert saved.read_bytes() == before
    assert sorted(p.name for p in saved.parent.iterdir()) == [saved.name]


class _PlainExtraState(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.value: object = {"raw": b"xy", "seen": {1, 2}, "on": torch.device("cpu")}

    def get_extra_state(self) -> object:
        return self.value

    def set_extra_state(self, value: object) -> None:
        self.value = value


def test_an_extra_state_weights_only_reads_is_saved_and_loaded(tmp_path: Path) -> None:
    """Bytes, a set and a device are what ``weights_only`` reads: saved and read back."""
    model = Host()
    kasmina.attach(model, ["out"], 2, 2)
    model.extra = _PlainExtraState()
    path = kasmina.save(model, tmp_path / "plain.kasmina")
    fresh = Host()
    fresh.extra = _PlainExtraState()
    fresh.extra.value = None
    kasmina.load(path, fresh, publishers=PUBLISHER.trusted_publishers())
    assert fresh.extra.value == {"raw": b"xy", "seen": {1, 2}, "on": torch.device("cpu")}


def test_save_refuses_a_bare_slot_and_writes_nothing(tmp_path: Path) -> None:
    """The slot itself is not a model to save (no host around it to load it into)."""
    model = Host()
    (slot,) = kasmina.attach(model, ["out"], 2, 2)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(SavedModelError, match="the model itself is a KasminaLayer; save the model"):
        kasmina.save(slot, out / "slot.kasmina")
    assert list(out.iterdir()) == []
    kasmina.save(model, out / "model.kasmina")  # the model around it saves
    assert [p.name for p in out.iterdir()] == ["model.kasmina"]


@pytest.mark.parametrize("make", ["script", "trace"])
def test_save_and_load_refuse_a_torchscript_module(tmp_path: Path, saved: Path, make: str) -> None:
    """A TorchScript module (``torch.jit.script``/``trace`` of a host) raised an internal
    AttributeError ('OrderedModuleDict' object has no attribute 'get') from both: now a
    ``SavedModelError`` that names it, with no file written and the module left as it was."""
    host = Host()
    if make == "script":
        scripted = torch.jit.script(host)
    else:
        scripted = torch.jit.trace(host, torch.ones(2, 6))
    before = {k: v.clone() for k, v in scripted.state_dict().items()}
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(SavedModelError, match="is a TorchScript module"):
        kasmina.save(scripted, out / "model.kasmina")
    assert list(out.iterdir()) == []
    with pytest.raises(SavedModelError, match="is a TorchScript module"):
        kasmina.load(saved, scripted, publishers=PUBLISHER.trusted_publishers())
    after = scripted.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_save_refuses_a_slot_its_host_was_resized_under_and_writes_nothing(tmp_path) -> None:
    """A host resized after ``attach`` (``resize_token_embeddings`` under a tied head's slot:
    the seeds sit out and the model runs) was saved as it was, into a file that ``load``
    refused for every model of its architecture. The save refuses, naming the way out."""
    model = Host()
    (slot,) = kasmina.attach(model, ["out"], 2, 2)
    slot.weight = nn.Parameter(torch.zeros(6, 8))  # written through the slot, as a resize does
    slot.bias = nn.Parameter(torch.zeros(6))
    slot.out_features = 6
    assert model(torch.randn(3, 6)).shape == (3, 6)  # the seeds sit out
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(SavedModelError, match=r"slot 'out' no longer fits its host .* 4 != 6"):
        kasmina.save(model, out / "model.kasmina")
    assert list(out.iterdir()) == []
    kasmina.detach(model)
    kasmina.attach(model, ["out"], 2, 3)  # at the host's width: saved, and loaded back
    kasmina.save(model, out / "model.kasmina")
    fresh = Host()
    fresh.out = nn.Linear(8, 6)
    kasmina.load(out / "model.kasmina", fresh, publishers=PUBLISHER.trusted_publishers())


def test_load_refuses_a_directory(tmp_path: Path) -> None:
    _refused(tmp_path, r"is not a regular file \(a directory\)")


def test_load_refuses_publishers_given_as_a_dict(saved: Path) -> None:
    """Kernels are verified with ``TrustedPublishers`` (public keys); a plain dict (a keyring's
    shape) is a ``TypeError`` naming the expected type, before the file is read."""

    def load(model: nn.Module) -> None:
        with pytest.raises(TypeError, match="verifies kernels with TrustedPublishers"):
            kasmina.load(saved, model, publishers={})

    _unchanged_after(load)


def test_the_unchanged_file_loads(saved: Path) -> None:
    """The counterpart of the refusals below: the real file loads into a fresh host."""
    model = Host()
    kasmina.load(saved, model, publishers=PUBLISHER.trusted_publishers())
    assert isinstance(model.out, KasminaLayer)


LIST = _torch_bytes([1, 2, 3])

# name: (what the file's bytes become, given the real file's bytes; the refusal's words)
CRAFTED: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "empty": (lambda raw: b"", r"not a Kasmina grown-model file \(bad magic\)"),
    "a zip's magic": (lambda raw: b"PK\x03\x04" + raw[4:], r"\(bad magic\)"),
    "no header length": (lambda raw: raw[:10], r"is truncated \(no header\)"),
    "huge header length": (
        lambda raw: fmt.MAGIC + struct.pack(">I", 10**6) + raw[12:],
        "header length 1000000 is not plausible",
    ),
    "cut in its header": (lambda raw: raw[:40], "is truncated inside its header"),
    "another format": (lambda raw: _file(_header(LIST, format="x"), LIST), "not a 'kasmina/"),
    "version 2": (
        lambda raw: _file(_header(LIST, format_version=2), LIST),
        "has format version 2; this Kasmina reads version 1 only",
    ),
    "version true": (
        lambda raw: _file(_header(LIST, format_version=True), LIST),
        "has format version True",
    ),
    "negative size": (lambda raw: _file(_header(LIST, size=-1), LIST), "header size is malformed"),
    "float size": (
        lambda raw: _file(_header(LIST, size=float(len(LIST))), LIST),
        "header size is malformed",
    ),
    "uppercase digest": (
        lambda raw: _file(_header(LIST, sha256=hashlib.sha256(LIST).hexdigest().upper()), LIST),
        "header sha256 is malformed",
    ),
    "body a list": (lambda raw: _file(_header(LIST), LIST), "body is not a mapping"),
    "body no torch file": (lambda raw: _file(_header(b"hello"), b"hello"), "body does not load"),
}


@pytest.mark.parametrize("name", CRAFTED)
def test_load_refuses_a_crafted_file_leaving_the_model(saved: Path, name: str) -> None:
    make, match = CRAFTED[name]
    path = saved.parent / "crafted.kasmina"
    path.write_bytes(make(saved.read_bytes()))
    _refused(path, match)


@pytest.mark.parametrize("where", ["body", "slots"])
@pytest.mark.parametrize("error", [torch.OutOfMemoryError, MemoryError])
def test_running_out_of_memory_is_raised_as_itself_not_as_a_malformed_file(
    saved: Path, monkeypatch: pytest.MonkeyPatch, where: str, error: type[BaseException]
) -> None:
    """A sound file met by a full device or host (reading its body, building the slots) is
    not malformed: the memory error reaches the caller as itself, so that code freeing memory
    and retrying on it does, and nobody deletes a good file; the model is unchanged."""

    def exhausted(*args: Any, **kwargs: Any) -> Any:
        raise error("out of memory")

    if where == "body":
        monkeypatch.setattr(torch, "load", exhausted)
    else:
        monkeypatch.setattr(loading, "GPUStateTensor", exhausted)

    def load(model: nn.Module) -> None:
        with pytest.raises(error, match="out of memory"):
            kasmina.load(saved, model, publishers=PUBLISHER.trusted_publishers())

    _unchanged_after(load)
