"""``kasmina.load`` of crafted, malformed files (docs/design.md §6a): the file is unsigned, so
nothing in it may size an allocation before it is checked, and every refusal is a
``SavedModelError`` (``ArtifactIntegrityError`` only for a digest or a kernel that does not
verify) that leaves the model bitwise unchanged."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import struct
import tracemalloc
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import kasmina
from kasmina.persist import format as fmt
from kasmina.persist.format import SavedModelError, read_saved, write_saved
from kasmina.seeds.layer import KasminaLayer
from kasmina.seeds.table import GPUStateTensor
from kasmina.stages import NUM_STATE_COLUMNS
from tests.manager.helpers import PUBLISHER, Host

PEAK_LIMIT = 4 << 20  # bytes Python may allocate while refusing a crafted file


def _write_raw(path: Path, header: dict[str, Any], payload: bytes) -> Path:
    encoded = json.dumps(header).encode("ascii")
    path.write_bytes(fmt.MAGIC + struct.pack(">I", len(encoded)) + encoded + payload)
    return path


def _header(payload: bytes, **changes: Any) -> dict[str, Any]:
    header = {
        "format": fmt.FORMAT,
        "format_version": fmt.FORMAT_VERSION,
        "size": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(),
    }
    return {**header, **changes}


def _refused(path: Path, match: str | None = None) -> int:
    """Load ``path`` into a fresh host: asserts a ``SavedModelError`` and an unchanged model;
    returns the peak of Python allocations meanwhile."""
    model = Host()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tracemalloc.start()
    try:
        with pytest.raises(SavedModelError, match=match):
            kasmina.load(path, model, publishers=PUBLISHER.trusted_publishers())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    after = model.state_dict()
    assert not any(isinstance(m, KasminaLayer) for m in model.modules())
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    return peak


def test_a_huge_size_claim_is_refused_without_allocating_it(tmp_path: Path) -> None:
    path = _write_raw(tmp_path / "huge", _header(b"", size=2**62), b"x" * 10)
    assert path.stat().st_size < 200
    assert _refused(path, "header says 4611686018427387904") < PEAK_LIMIT


def test_a_truncated_or_extended_body_is_refused(saved: Path, tmp_path: Path) -> None:
    raw = saved.read_bytes()
    for name, data in (("short", raw[:-1]), ("long", raw + b"\0")):
        (tmp_path / name).write_bytes(data)
        _refused(tmp_path / name, "truncated or extended")


def test_a_zero_width_state_table_allocates_nothing(saved: Path, tmp_path: Path) -> None:
    body = read_saved(saved)
    body["table"]["state_tensor"] = torch.empty((2_000_000, 0), dtype=torch.int32)
    path = write_saved(tmp_path / "amp", body)
    assert path.stat().st_size < 64 << 10
    assert _refused(path, "saved state table is malformed") < PEAK_LIMIT


@pytest.mark.parametrize(
    "table",
    [
        lambda t: t.to(torch.int64),  # another dtype
        lambda t: t.t().contiguous().t(),  # the right shape, not contiguous
        lambda t: t[:1].expand(t.shape[0], -1),  # rows that are not in the file (stride 0)
        lambda t: torch.cat([t, t]),  # more rows than the slots have seeds
        lambda t: t[:, :-1].contiguous(),  # a column short
    ],
)
def test_a_state_table_not_of_the_slots_shape_is_refused(
    saved: Path, tmp_path: Path, table: Callable[[torch.Tensor], torch.Tensor]
) -> None:
    body = read_saved(saved)
    body["table"]["state_tensor"] = table(body["table"]["state_tensor"])
    _refused(write_saved(tmp_path / "table", body), "saved state table is malformed")


def _drop(mapping: dict[str, Any], key: str) -> None:
    del mapping[key]


MUTATIONS: dict[str, Callable[[dict[str, Any]], None]] = {
    "slot not a mapping": lambda b: b.__setitem__("slots", [1]),
    "slot without fault_limit": lambda b: _drop(b["slots"][0], "fault_limit"),
    "slot num_seeds not an int": lambda b: b["slots"][0].__setitem__("num_seeds", "x"),
    "slot num_seeds a float": lambda b: b["slots"][0].__setitem__("num_seeds", 2.0),
    "slot repeated": lambda b: b["slots"].append(copy.deepcopy(b["slots"][0])),
    "seed not a mapping": lambda b: b.__setitem__("seeds", [None]),
    "seed index a bool": lambda b: b["seeds"][0].__setitem__("index", True),
    "table without embargo_epochs": lambda b: _drop(b["table"], "embargo_epochs"),
    "embargo_epochs not an int": lambda b: b["table"].__setitem__("embargo_epochs", "x"),
    "weights with a non-str key": lambda b: b["weights"].__setitem__(1, torch.zeros(1)),
}


@pytest.mark.parametrize("mutate", MUTATIONS.values(), ids=MUTATIONS.keys())
def test_a_malformed_entry_is_a_saved_model_error(
    saved: Path, tmp_path: Path, mutate: Callable[[dict[str, Any]], None]
) -> None:
    body = read_saved(saved)
    mutate(body)
    _refused(write_saved(tmp_path / "malformed", body))


def _without_kernel(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in entry.items() if k not in ("artifact_id", "kernel_state")}


@pytest.mark.parametrize(
    "repeat",
    [copy.deepcopy, _without_kernel],
    ids=["with its kernel", "without a kernel"],
)
def test_a_seed_saved_twice_is_refused(
    saved: Path, tmp_path: Path, repeat: Callable[[dict[str, Any]], dict[str, Any]]
) -> None:
    """Which of two entries of one seed it took was the order's choice (the last kernel won,
    or a kernel-less repeat was skipped), and the file loaded as if whole."""
    body = read_saved(saved)
    first = body["seeds"][0]
    assert "artifact_id" in first
    body["seeds"].append(repeat(first))
    _refused(write_saved(tmp_path / "twice", body), "seed 0 of slot 'out' is saved twice")


def test_a_kernel_weight_saved_in_the_host_weights_too_is_refused(
    saved: Path, tmp_path: Path
) -> None:
    """The seed's entry held one value and ``weights`` another: the entry's silently won."""
    body = read_saved(saved)
    key = next(iter(body["seeds"][0]["kernel_state"]))
    body["weights"][f"out.seeds.0.kernel.{key}"] = torch.zeros_like(
        body["seeds"][0]["kernel_state"][key]
    )
    _refused(write_saved(tmp_path / "twice", body), f"0.kernel.{key} is saved twice")


@pytest.mark.parametrize("part", ["manifest", "payload"])
def test_an_artifact_without_its_manifest_or_payload_is_refused_by_name(
    saved: Path, tmp_path: Path, part: str
) -> None:
    body = read_saved(saved)
    artifact_id, entry = next(iter(body["artifacts"].items()))
    entry[part] = None
    _refused(write_saved(tmp_path / "partial", body), f"{artifact_id!r}: manifest or payload")


class _NotPlainData:
    pass


def test_a_body_that_is_not_plain_data_is_a_saved_model_error(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    torch.save({"slots": [], "x": _NotPlainData()}, buffer)
    payload = buffer.getvalue()
    _refused(_write_raw(tmp_path / "pickle", _header(payload), payload), "does not load")


def test_a_bodys_own_text_reaches_the_error_escaped_and_cut(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The unpickler's error quotes the crafted file's own strings (a class name): the
    refusal, which a service logs, shows them escaped (no raw newline or escape code to forge
    a log line) and cut short."""
    buffer = io.BytesIO()
    torch.save({"slots": []}, buffer)
    payload = buffer.getvalue()
    path = _write_raw(tmp_path / "crafted", _header(payload), payload)

    def load(*args, **kwargs):
        raise RuntimeError("Unsupported global: x\r\n2026-01-01 INFO forged\x1b[2K" + "y" * 5000)

    monkeypatch.setattr(torch, "load", load)
    with pytest.raises(SavedModelError) as raised:
        kasmina.load(path, Host(), publishers=PUBLISHER.trusted_publishers())
    text = str(raised.value)
    assert "\n" not in text and "\x1b" not in text and "\r" not in text
    assert "forged" in text and len(text) < 600 and "(5049 characters)" in text


def test_a_non_hex_digest_is_a_saved_model_error(tmp_path: Path) -> None:
    path = _write_raw(tmp_path / "digest", _header(b"x", sha256="\u00e9" * 64), b"x")
    _refused(path, "sha256 is malformed")


@pytest.mark.parametrize(
    "raw",
    [b"[" * 60000, b'{"format": "kasmina-model", "format": "kasmina-model"}'],
    ids=["nested", "duplicate key"],
)
def test_a_header_nested_too_deeply_or_with_a_duplicate_key_is_refused(
    tmp_path: Path, raw: bytes
) -> None:
    """Read before anything is verified: 60,000 ``[`` raised RecursionError from the JSON parser,
    and a duplicated key was read as its last value."""
    path = tmp_path / "crafted.kasmina"
    path.write_bytes(fmt.MAGIC + struct.pack(">I", len(raw)) + raw)
    _refused(path, "header is not valid JSON")


def test_save_keeps_only_the_rows_the_slots_use(tmp_path: Path) -> None:
    """A table with rows no slot uses (a slot detached keeps its own) was refused; its slots'
    rows alone are saved, the table ``kasmina.load`` rebuilds."""
    model = Host()
    kasmina.attach(model, "out", 2, 2, state=GPUStateTensor(3))
    body = read_saved(kasmina.save(model, tmp_path / "wide"))
    assert tuple(body["table"]["state_tensor"].shape) == (2, NUM_STATE_COLUMNS)


def test_the_unmutated_file_loads(saved: Path) -> None:
    # The cases above are refused for their mutation, not for the file or host they start from.
    model: nn.Module = Host()
    assert len(kasmina.load(saved, model, publishers=PUBLISHER.trusted_publishers())) == 1


def _with_pickle(pickle: bytes) -> bytes:
    """A ``torch.save`` archive whose pickle is ``pickle``."""
    buffer = io.BytesIO()
    torch.save({"slots": []}, buffer)
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as source:
        with zipfile.ZipFile(out, "w") as archive:
            for name in source.namelist():
                data = pickle if name.endswith("data.pkl") else source.read(name)
                archive.writestr(name, data)
    return out.getvalue()


@pytest.mark.parametrize(
    "pickle, match",
    [
        (b"\x80\x02c" + b"a" * 20_000 + b"\nb\n.", "a class name of 20002 characters"),
        (b"\x80\x04\x8c\x01a\x8c\x01b\x93.", "a protocol-4 name"),
    ],
    ids=["long_global", "stack_global"],
)
def test_a_crafted_class_name_is_refused_before_torch_reads_it(
    tmp_path: Path, pickle: bytes, match: str
) -> None:
    """torch's refusal of a class name runs a regex quadratic in the name's length (20,000
    characters: over ten seconds here, 40,000: over a minute); the body's pickle is read first and
    a name no ``torch.save`` of this format writes is refused at once."""
    payload = _with_pickle(pickle)
    _refused(_write_raw(tmp_path / "crafted", _header(payload), payload), match)


def test_a_decoy_pickle_beside_the_real_one_is_refused(tmp_path: Path) -> None:
    """A second ``*data.pkl`` entry beside the archive's own made the pickle check pass the
    archive unread, and torch then read the real pickle, a crafted class name included (30 s
    for 40,000 characters). An archive with more than one pickle is refused at once."""
    payload = _with_pickle(b"\x80\x02c" + b"a" * 20_000 + b"\nb\n.")
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(payload)) as source, zipfile.ZipFile(out, "w") as archive:
        for name in source.namelist():
            archive.writestr(name, source.read(name))
        prefix = source.namelist()[0].split("/")[0]
        archive.writestr(f"{prefix}/decoy_data.pkl", b"\x80\x02}q\x00.")
    crafted = out.getvalue()
    _refused(_write_raw(tmp_path / "decoy", _header(crafted), crafted), "2 pickles")


@pytest.mark.parametrize("entry", ["storage", "pickle"])
def test_a_compressed_entry_is_refused_before_torch_inflates_it(tmp_path: Path, entry: str) -> None:
    """torch.load inflates a deflated entry of the archive: 3 MB of deflated zeros made a load
    allocate 3 GB before any check of the body (the header's digest is unsigned, so a forger
    recomputes it). ``torch.save`` stores every entry, and so must the body."""
    buffer = io.BytesIO()
    zeros = torch.zeros(64 << 20 if entry == "storage" else 16, dtype=torch.uint8)
    torch.save({"format_version": 1, "weights": {"x": zeros}}, buffer)
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as source, zipfile.ZipFile(out, "w") as z:
        for info in source.infolist():
            deflate = ("data.pkl" in info.filename) == (entry == "pickle")
            mode = zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED
            z.writestr(info.filename, source.read(info), compress_type=mode)
    bomb = out.getvalue()
    assert len(bomb) < 1 << 20  # 64 MB of zeros in under 1 MB
    peak = _refused(_write_raw(tmp_path / "bomb", _header(bomb), bomb), "compressed entry")
    assert peak < PEAK_LIMIT


def test_a_host_on_meta_is_refused_before_anything_changes(saved: Path) -> None:
    """A model built on the meta device took the load: every copy into it was a no-op, the
    kernels were built on meta too, and after ``to_empty`` the seeds reported their saved
    stages over uninitialised weights. Refused now, the model as it was; built on a real
    device, the same file loads."""
    with torch.device("meta"):
        model: nn.Module = Host()
    before = dict(model.named_modules())
    with pytest.raises(SavedModelError, match="meta device"):
        kasmina.load(saved, model, publishers=PUBLISHER.trusted_publishers())
    assert dict(model.named_modules()) == before
    model.to_empty(device="cpu")
    assert len(kasmina.load(saved, model, publishers=PUBLISHER.trusted_publishers())) == 1


class _Scripted(nn.Module):
    """``Host`` with its ``out`` layer inside a block shipped scripted (``torch.jit.script``)."""

    def __init__(self, scripted: bool) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 4)
        block = nn.Sequential(nn.Linear(4, 4))
        self.block = torch.jit.script(block) if scripted else block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.inp(x))


def test_a_slot_the_model_could_not_call_is_refused_before_any_write(tmp_path: Path) -> None:
    """A saved slot whose host sits in a scripted block of the same architecture passed every
    check; the load wrote the host's weights, installed the first slot and raised torch's
    ``RuntimeError`` at the scripted one."""
    source = _Scripted(scripted=False)
    kasmina.attach(source, ["inp", "block.0"], 2, 2)
    source(torch.randn(3, 4))
    path = tmp_path / "scripted.kasm"
    kasmina.save(source, path)
    model = _Scripted(scripted=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SavedModelError, match=r"'block.0' is inside a scripted module"):
        kasmina.load(path, model, publishers=PUBLISHER.trusted_publishers())
    assert not any(isinstance(m, KasminaLayer) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
