"""The regular-file helpers: anything but a regular file is refused at once (a FIFO is never
waited on), no descriptor leaks on a refusal, and whole-file reads stop at their limit."""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import time
from pathlib import Path

import pytest

from kasmina.errors import NotARegularFileError
from kasmina.utils.files import (
    MAX_CONFIG_FILE_BYTES,
    fitting_name,
    name_max,
    open_regular_fd,
    open_regular_file,
    read_regular_file,
    read_text_file,
)
from tests.cli.helpers import fifo_never_blocks

needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")


def _open_fds() -> int | None:
    """How many descriptors this process holds (None where /proc/self/fd is missing)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return None


@pytest.fixture
def odd_files(tmp_path: Path) -> dict[str, Path]:
    """A FIFO, a symlink to /dev/zero and a directory, by the kind the error names."""
    fifo, zero, folder = tmp_path / "fifo", tmp_path / "zero", tmp_path / "dir"
    os.mkfifo(fifo)
    zero.symlink_to("/dev/zero")
    folder.mkdir()
    return {"a FIFO": fifo, "a character device": zero, "a directory": folder}


@needs_fifo
@pytest.mark.parametrize(
    "flags", [os.O_RDONLY, os.O_RDWR | os.O_APPEND | os.O_CREAT], ids=["read", "append"]
)
def test_anything_but_a_regular_file_is_refused_at_once(odd_files, flags) -> None:
    before = _open_fds()
    for kind, path in odd_files.items():
        if kind == "a character device" and flags != os.O_RDONLY:
            continue  # never open /dev/zero to write, even to see it refused
        started = time.monotonic()
        with fifo_never_blocks(odd_files["a FIFO"]), pytest.raises(NotARegularFileError) as info:
            open_regular_fd(path, flags, what="thing")
        assert time.monotonic() - started < 2
        assert str(info.value) == f"thing {path} is not a regular file ({kind})"
        assert (info.value.path, info.value.kind) == (os.fspath(path), kind)
        assert isinstance(info.value, ValueError)
    assert _open_fds() == before  # every refused descriptor was closed


@needs_fifo
def test_the_readers_refuse_a_fifo_without_reading(odd_files) -> None:
    fifo = odd_files["a FIFO"]
    readers = {
        "open_regular_file": lambda: open_regular_file(fifo, what="x"),
        "read_regular_file": lambda: read_regular_file(fifo, what="x"),
        "read_text_file": lambda: read_text_file(fifo, what="x"),
    }
    for read in readers.values():
        with fifo_never_blocks(fifo), pytest.raises(NotARegularFileError, match="a FIFO"):
            read()


def test_a_regular_file_opens_blocking_and_can_be_created(tmp_path) -> None:
    path = tmp_path / "new"
    fd = open_regular_fd(path, os.O_WRONLY | os.O_CREAT, mode=0o600)
    try:
        assert os.get_blocking(fd)
        os.write(fd, b"abc")
    finally:
        os.close(fd)
    if os.name == "posix":
        assert path.stat().st_mode & 0o777 == 0o600 & ~_umask()
    with open_regular_file(path) as f:
        assert f.read() == b"abc"
    with pytest.raises(FileNotFoundError):
        open_regular_fd(tmp_path / "missing", os.O_RDONLY)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_read_regular_file_reads_at_most_one_byte_past_its_limit(tmp_path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"abcdef")
    data, st = read_regular_file(path, 6)
    assert data == b"abcdef" and st.st_size == 6
    with pytest.raises(ValueError, match="larger than 5 bytes"):
        read_regular_file(path, 5)
    with pytest.raises(FileNotFoundError):
        read_regular_file(tmp_path / "missing", 5)


def test_the_default_limit_refuses_a_huge_file_after_a_bounded_read(tmp_path) -> None:
    path = tmp_path / "big"
    with open(path, "wb") as f:
        f.truncate(64 * MAX_CONFIG_FILE_BYTES)  # sparse
    message = f"config {path} is larger than {MAX_CONFIG_FILE_BYTES} bytes; not read whole"
    for read in (read_regular_file, read_text_file):
        with pytest.raises(ValueError) as info:
            read(path, what="config")
        assert str(info.value) == message


def test_read_text_file_decodes_utf8_and_names_a_file_that_is_not(tmp_path) -> None:
    path = tmp_path / "t"
    path.write_bytes("héllo".encode())
    text, st = read_text_file(path, what="notes")
    assert text == "héllo" and st.st_size == 6
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match=f"notes {path} is not UTF-8 text") as info:
        read_text_file(path, what="notes")
    assert not isinstance(info.value, UnicodeDecodeError)


@needs_fifo
def test_a_fifo_opened_to_write_only_is_refused_as_a_fifo(tmp_path) -> None:
    """A lock file's open (write only) of a FIFO nobody reads fails ENXIO without blocking:
    that is reported as the FIFO it is, not as an I/O error."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    before = _open_fds()
    with pytest.raises(NotARegularFileError) as info:
        open_regular_fd(fifo, os.O_WRONLY | os.O_APPEND | os.O_CREAT, what="lock file")
    assert info.value.kind == "a FIFO" and _open_fds() == before


@pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="needs Unix sockets")
def test_a_socket_is_an_os_error_not_a_fifo(tmp_path, monkeypatch) -> None:
    """Opening a socket fails ENXIO too; only a FIFO is reported as one (a socket is the
    ``OSError`` its open raised)."""
    monkeypatch.chdir(tmp_path)  # a socket's path must be short
    with socket.socket(socket.AF_UNIX) as server:
        server.bind("sock")
        for flags in (os.O_RDONLY, os.O_WRONLY | os.O_APPEND):
            with pytest.raises(OSError) as info:
                open_regular_fd("sock", flags)
            assert not isinstance(info.value, NotARegularFileError)
            assert info.value.errno == errno.ENXIO


def test_open_regular_file_closes_the_descriptor_when_it_cannot_wrap_it(
    tmp_path, monkeypatch
) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x")
    before = _open_fds()

    def fail(fd: int, mode: str) -> None:
        raise MemoryError("no file object")

    monkeypatch.setattr(os, "fdopen", fail)
    with pytest.raises(MemoryError):
        open_regular_file(path)
    assert _open_fds() == before


def test_fitting_name_keeps_a_name_that_fits_and_cuts_one_that_does_not_to_fit(tmp_path) -> None:
    limit = name_max(tmp_path)
    fits = "a" * (limit - 5)
    assert fitting_name(tmp_path, fits, 5) == fits  # exactly the longest name, with its extra
    long = "b" * (limit - 4)
    tag = "~" + hashlib.sha256(long.encode()).hexdigest()[:8]
    cut = fitting_name(tmp_path, long, 5)
    assert cut == "b" * (limit - 5 - len(tag)) + tag  # as long as it may be, and no longer
    assert fitting_name(tmp_path, long, 5) == cut and fitting_name(tmp_path, long + "c", 5) != cut
    wide = "é" * limit  # two bytes a character: cut whole characters, never past the limit
    cut = fitting_name(tmp_path, wide, 5)
    assert cut.endswith("~" + hashlib.sha256(wide.encode()).hexdigest()[:8])
    assert limit - 1 <= len(cut.encode()) + 5 <= limit
