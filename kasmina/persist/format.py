"""The file a grown model is saved in (docs/design.md §6a, "Keeping what you grew").

Layout: ``MAGIC`` (8 bytes), the header's length (4 bytes, big-endian), the header as JSON,
then the body. The header holds the format name and version, the body's size and SHA-256,
and when and with which torch it was written. The body is a ``torch.save`` of plain
containers, tensors and bytes, read back with ``torch.load(weights_only=True)``, so reading
it runs no code; the kernel programs inside it are artifacts that are verified against their
signed manifests before they are deserialised (``kasmina.persist.loading``).

Why a version check before anything else: an incompatible file must be refused with a message
that says so, not with whatever error its unexpected contents would cause further in. Why a
digest: truncation and damage are refused before ``torch.load`` sees a byte. The digest is not
a signature; the kernel programs are what can execute, and they carry their publisher's.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import os
import pickletools
import struct
import time
import zipfile
from pathlib import Path
from typing import Any

import torch

from kasmina.errors import ArtifactIntegrityError, KasminaError, NotARegularFileError
from kasmina.utils.atomic import atomic_write_bytes, remove_stale_temporaries_of
from kasmina.utils.files import open_regular_file
from kasmina.utils.ratelimit import clipped
from kasmina.utils.signed_json import strict_json_loads
from kasmina.utils.state_io import is_hex

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MAGIC",
    "MAX_HEADER_BYTES",
    "SavedModelError",
    "read_saved",
    "write_saved",
]

MAGIC = b"KASMGROW"
FORMAT = "kasmina/grown-model"
# Bumped whenever the body's layout changes; a reader refuses every other version.
FORMAT_VERSION = 1
# The header is a few hundred bytes; a length field claiming more is damage.
MAX_HEADER_BYTES = 64 << 10
_LENGTH = struct.Struct(">I")
# The longest class name the body's pickle may name. The body's are torch's own (such as
# ``torch._utils _rebuild_tensor_v2``); torch's error text for a name it refuses runs a regex
# whose time grows with the square of the name's length (40,000 characters: over a minute).
MAX_GLOBAL_CHARS = 256


class SavedModelError(KasminaError, ValueError):
    """A saved grown model cannot be written or restored: an incompatible format version, a
    malformed file, or a model whose architecture does not match the saved slots. The target
    model was left unchanged."""


# Why a body is refused when unpickling it (as plain data only) fails.
_NOT_LOADED = "body does not load as a torch file of plain data"


def write_saved(path: str | os.PathLike[str], body: dict[str, Any]) -> Path:
    """Serialise ``body`` and write header and body atomically to ``path``. The temp files of
    earlier writes to ``path`` that were killed (a SIGKILL skips their cleanup) go first, once
    old enough not to be a live writer's (``remove_stale_temporaries``)."""
    target = Path(path)
    remove_stale_temporaries_of(target)
    buffer = io.BytesIO()
    torch.save(body, buffer)
    payload = buffer.getvalue()
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "size": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(),
        "created": time.time(),
        "torch_version": torch.__version__,
    }
    encoded = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("ascii")
    return atomic_write_bytes(path, [MAGIC, _LENGTH.pack(len(encoded)), encoded, payload])


def read_saved(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The body of a saved model, after its magic, header, version, size and SHA-256 check.

    Raises ``SavedModelError`` for a file that is not a saved model, has another format
    version, is not a regular file, is truncated or extended (its size is compared with the
    header's before the body is read, so a forged size allocates nothing), or whose body does
    not load; ``ArtifactIntegrityError`` when the body does not match its digest. Running out
    of memory while loading the body is no fault of the file: that error is raised as itself.
    """
    where = f"saved model {os.fspath(path)!r}"
    try:
        handle = open_regular_file(path, what="saved model")
    except NotARegularFileError as exc:
        raise SavedModelError(f"{where} is not a regular file ({exc.kind})") from exc
    with handle:
        if handle.read(len(MAGIC)) != MAGIC:
            raise SavedModelError(f"{where} is not a Kasmina grown-model file (bad magic)")
        raw_length = handle.read(_LENGTH.size)
        if len(raw_length) != _LENGTH.size:
            raise SavedModelError(f"{where} is truncated (no header)")
        (length,) = _LENGTH.unpack(raw_length)
        if length > MAX_HEADER_BYTES:
            raise SavedModelError(f"{where}: header length {length} is not plausible")
        raw_header = handle.read(length)
        if len(raw_header) != length:
            raise SavedModelError(f"{where} is truncated inside its header")
        header = _parse_header(raw_header, where)
        size = header["size"]
        # The header is unsigned: its size is checked against the file before it sizes a read.
        on_disk = os.fstat(handle.fileno()).st_size - (len(MAGIC) + _LENGTH.size + length)
        if on_disk != size:
            raise SavedModelError(
                f"{where}: body is {on_disk} bytes, its header says {size} (truncated or extended)"
            )
        payload = handle.read(size)
        if len(payload) != size or handle.read(1):
            raise SavedModelError(f"{where}: body changed size while read")
    if not hmac.compare_digest(hashlib.sha256(payload).hexdigest(), header["sha256"]):
        raise ArtifactIntegrityError(f"{where}: body SHA-256 does not match its header")
    problem = _pickle_problem(payload)
    if problem is not None:
        raise SavedModelError(f"{where}: {_NOT_LOADED} ({problem})")
    try:
        body = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except (torch.OutOfMemoryError, MemoryError):  # this machine's memory, not the file
        raise
    except Exception as exc:  # any failure to unpickle plain data is a malformed body
        # Cut and quoted (escaped): the text may carry the crafted file's own strings.
        problem = f"{type(exc).__name__}: {clipped(str(exc), 300)!r}"
        raise SavedModelError(f"{where}: {_NOT_LOADED} ({problem})") from exc
    if not isinstance(body, dict):
        raise SavedModelError(f"{where}: body is not a mapping")
    return body


def _pickle_problem(payload: bytes) -> str | None:
    """Why the body's pickle is not one ``torch.save`` wrote for this format, read before
    ``torch.load`` sees it, or None (also where the archive does not parse: ``torch.load``
    then says why). The format's pickles are protocol 2, stored uncompressed: names come in
    ``GLOBAL`` opcodes, none longer than :data:`MAX_GLOBAL_CHARS`. Reading the opcodes is
    linear in the pickle, which holds the body's structure and not its tensors' data."""
    try:
        with zipfile.ZipFile(io.BytesIO(payload)) as archive:
            every = archive.infolist()
            # torch.save stores every entry; torch.load inflates a deflated one, so a few MB
            # of zeros would allocate gigabytes (the memory a load takes is the file's size).
            packed = [i for i in every if i.compress_type != zipfile.ZIP_STORED]
            if packed or any(i.file_size != i.compress_size for i in every):
                return "a compressed entry; the format stores every entry as it is"
            entries = [i for i in every if i.filename.endswith("data.pkl")]
            if len(entries) > 1:  # which one torch reads is torch's choice: check all or none
                return f"{len(entries)} pickles; the format writes one"
            if not entries:
                return None
            pickle = archive.read(entries[0])
        for opcode, arg, _ in pickletools.genops(pickle):
            if opcode.name == "STACK_GLOBAL":
                return "a protocol-4 name; the format writes protocol 2"
            if opcode.name == "GLOBAL" and len(arg) > MAX_GLOBAL_CHARS:
                return f"a class name of {len(arg)} characters"
    except (zipfile.BadZipFile, ValueError, EOFError, OSError):
        return None
    return None


def _parse_header(raw: bytes, where: str) -> dict[str, Any]:
    try:
        header = strict_json_loads(raw.decode("ascii"))  # nesting, a duplicated key: refused
    except (UnicodeDecodeError, ValueError) as exc:
        raise SavedModelError(f"{where}: header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise SavedModelError(f"{where}: not a {FORMAT!r} file")
    version = header.get("format_version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise SavedModelError(
            f"{where} has format version {version!r}; this Kasmina reads version "
            f"{FORMAT_VERSION} only (save it again with a matching Kasmina)"
        )
    size, digest = header.get("size"), header.get("sha256")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise SavedModelError(f"{where}: header size is malformed")
    if not is_hex(digest, 64):
        raise SavedModelError(f"{where}: header sha256 is malformed")
    return header
