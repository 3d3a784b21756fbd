"""The durable nonce ledger: replays refused across restarts, bounded, crash-tolerant.

A "restart" here is a new ``CommandVerifier`` over the same ledger file after the old one was
closed (or its process died), which is what a restarted trainer does. See docs/design.md §5,
"Replay across restarts".
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import pytest

from kasmina.control.auth import MAX_FRESHNESS_S, CommandVerifier, sign_command
from kasmina.control.builders import make_seed_command
from kasmina.control.ledger import LEDGER_FILE_NAME, NonceLedger
from kasmina.leyline import AdaptationCommand
from kasmina.utils.keyring import Keyring

KEY = bytes(range(32))
T0 = 1_700_000_000.0
WINDOW = 60.0


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def keyring() -> Keyring:
    return Keyring({"ctl": KEY, "pub": bytes(range(100, 132))})


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "run" / LEDGER_FILE_NAME


def signed(keyring: Keyring, nonce: str, timestamp: float, key_id: str = "ctl"):
    cmd = make_seed_command("germinate", "layer0:1", "artifact-1")
    return sign_command(cmd, keyring, key_id, nonce=nonce, timestamp=timestamp)


def start(
    keyring, clock, path: Path, durability: str = "fsync", window: float = WINDOW
) -> CommandVerifier:
    """A verifier over the ledger at ``path``, as a (re)starting trainer builds it."""
    ledger = NonceLedger(path, durability=durability)
    return CommandVerifier(keyring, window, clock=clock, ledger=ledger)


@pytest.mark.parametrize("durability", ["fsync", "flush"])
def test_a_restart_inside_the_window_refuses_every_replay(keyring, clock, path, durability):
    first = start(keyring, clock, path, durability)
    commands = [signed(keyring, f"n{i}", T0 - i) for i in range(5)]
    assert all(first.verify(c) == (True, "ok") for c in commands)
    first.close()  # or the process died: the ledger was written before each "ok"

    clock.now += 30.0  # the restart, well inside the window of every command
    second = start(keyring, clock, path, durability)
    assert second.ledger_size == 5
    assert [second.verify(c) for c in commands] == [(False, "replay")] * 5
    fresh = signed(keyring, "new", clock.now)
    assert second.verify(fresh) == (True, "ok")
    second.close()
    assert start(keyring, clock, path, durability).verify(fresh) == (False, "replay")


def test_the_ledger_is_written_before_ok_is_returned(keyring, clock, path) -> None:
    """A crash right after acceptance cannot forget the nonce: it is in the file already."""
    verifier = start(keyring, clock, path)
    assert verifier.verify(signed(keyring, "just-accepted", T0))[0]
    text = path.read_text()
    assert b"just-accepted".hex() in text  # no close(), no flush by anyone else


def test_a_restart_after_the_window_forgets_nonces_but_keeps_them_stale(keyring, clock, path):
    first = start(keyring, clock, path)
    old = signed(keyring, "old", T0)
    assert first.verify(old)[0]
    first.close()

    clock.now = T0 + WINDOW + 5.0
    second = start(keyring, clock, path)
    assert second.ledger_size == 0  # nothing inside the window is left to remember
    assert second.verify(old) == (False, "stale")
    second.close()
    assert b"old".hex() not in path.read_text()  # compacted away at the restart

    clock.now = T0 + 1.0  # the clock steps back after a restart: the floor still holds
    third = start(keyring, clock, path)
    assert third.verify(old) == (False, "stale")
    assert third.verify(signed(keyring, "later", T0 + 0.5)) == (True, "ok")


def test_a_corrupt_tail_line_is_skipped_with_one_warning(keyring, clock, path, caplog) -> None:
    first = start(keyring, clock, path)
    kept = [signed(keyring, f"kept{i}", T0) for i in range(3)]
    assert all(first.verify(c)[0] for c in kept)
    first.close()
    with path.open("ab") as f:
        f.write(b"N 1700000000.0 74")  # a write torn by a crash: no CRC, no newline
    with path.open("ab") as f:
        f.write(b"\nN 1700000000.0 6666 00000000\n")  # and a line whose CRC is wrong

    with caplog.at_level(logging.WARNING, logger="kasmina.control.auth"):
        second = start(keyring, clock, path)
    warnings = [r for r in caplog.records if "damaged" in r.getMessage()]
    assert len(warnings) == 1 and "skipped 2" in warnings[0].getMessage()
    assert [second.verify(c) for c in kept] == [(False, "replay")] * 3
    assert second.verify(signed(keyring, "ff", T0)) == (True, "ok")  # 0x6666 never counted
    second.close()
    assert start(keyring, clock, path).ledger_size == 4  # the rewrite dropped the bad lines


def test_a_path_that_names_another_file_is_refused_not_overwritten(keyring, clock, path):
    """A mistyped ledger path must not destroy what it names: a file with no header and not
    one record is no ledger (a torn last line of a real one still is)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"precious user data\nmore of it\n")
    with pytest.raises(ValueError, match="is not a kasmina nonce ledger"):
        start(keyring, clock, path)
    assert path.read_bytes() == b"precious user data\nmore of it\n"


def test_a_ledger_of_a_newer_format_is_refused_not_rewritten(keyring, clock, path) -> None:
    """After a downgrade, the older Kasmina must not read a newer ledger's records as damaged
    and compact them away: the nonces they hold would be accepted again."""
    first = start(keyring, clock, path)
    accepted = signed(keyring, "newer", T0)
    assert first.verify(accepted) == (True, "ok")
    first.close()
    newer = path.read_bytes().replace(b"ledger v1:", b"ledger v2:", 1)
    newer = newer.replace(b"\nN ", b"\nN2 ")  # records of a layout this version cannot parse
    path.write_bytes(newer)
    with pytest.raises(ValueError, match="nonce ledger of another format \\('v2'"):
        start(keyring, clock, path)
    assert path.read_bytes() == newer


def test_the_file_stays_bounded_after_many_commands(keyring, clock, path) -> None:
    """20,000 commands at 1,000/s through a 2 s window: at most ~4,000 live nonces, and the
    file never holds more than twice those plus the compaction slack. (Durability does not
    change what is written, only when it reaches the disk; "flush" keeps this test fast.)"""
    slack = 256
    ledger = NonceLedger(path, durability="flush", compact_slack=slack)
    verifier = CommandVerifier(keyring, 2.0, clock=clock, ledger=ledger)
    template = signed(keyring, "x", T0)
    most_lines = most_live = 0
    for i in range(20_000):
        clock.now = T0 + i * 1e-3
        cmd = AdaptationCommand()
        cmd.CopyFrom(template)
        cmd.command_id = f"c{i}"
        sign_command(cmd, keyring, "ctl", nonce=f"{i:08x}", timestamp=clock.now)
        assert verifier.verify(cmd)[0]
        most_live = max(most_live, verifier.ledger_size)
        most_lines = max(most_lines, ledger.lines)
    assert most_live <= 2 * 2.0 / 1e-3 + 2
    assert most_lines <= 2 * most_live + slack + 1
    size = path.stat().st_size
    assert size <= (2 * most_live + slack + 2) * 64  # ~56-byte lines
    assert len(path.read_text().splitlines()) == ledger.lines + 1  # + the header line
    verifier.close()
    restarted = start(keyring, clock, path, window=2.0)
    assert restarted.ledger_size == verifier.ledger_size
    assert restarted.ledger.lines <= most_live + 1


def test_two_live_verifiers_cannot_share_a_ledger(keyring, clock, path) -> None:
    first = start(keyring, clock, path)
    with pytest.raises(RuntimeError, match="held by another live trainer") as refused:
        start(keyring, clock, path)
    # The advice: a run_id of its own (a ledger of its own leaves the checkpoints shared).
    assert "its own run_id (a nonce_ledger path of its own is not enough" in str(refused.value)
    first.close()
    start(keyring, clock, path).close()  # released on close (and by the kernel on a crash)


def test_a_ledger_that_cannot_be_written_refuses_commands(keyring, clock, path, caplog) -> None:
    """Fail closed: accepting a command whose nonce is not recorded would leave a replay
    open after the next restart. The ledger recovers (rewrites itself) when it can."""
    verifier = start(keyring, clock, path)
    ledger = verifier.ledger
    assert ledger is not None

    class BrokenFile:
        def write(self, data: bytes) -> int:
            raise OSError(28, "No space left on device")

        def fileno(self) -> int:
            raise OSError(9, "closed")

        def close(self) -> None:
            pass

    good = ledger._file
    ledger._file = BrokenFile()  # type: ignore[assignment]
    with caplog.at_level(logging.ERROR, logger="kasmina.control.auth"):
        assert verifier.verify(signed(keyring, "a", T0)) == (False, "ledger_error")
    assert ledger.broken and len(caplog.records) == 1
    ledger._file = good
    assert verifier.verify(signed(keyring, "b", T0)) == (True, "ok")  # rewritten first
    assert not ledger.broken
    assert verifier.verify(signed(keyring, "a", T0)) == (False, "replay")  # "a" stays used
    verifier.close()
    assert verifier.verify(signed(keyring, "c", T0)) == (False, "ledger_error")  # closed


def test_concurrent_commands_share_fdatasyncs(keyring, clock, path, monkeypatch) -> None:
    """Group commit: every command is durable before its "ok", with fewer syncs than commands
    when they arrive together."""
    import kasmina.control.ledger as ledger_module

    syncs = []
    real = ledger_module._datasync

    def counting(fd: int) -> None:
        syncs.append(fd)
        real(fd)

    monkeypatch.setattr(ledger_module, "_datasync", counting)
    verifier = start(keyring, clock, path)
    commands = [signed(keyring, f"t{i}", T0) for i in range(400)]
    results: list[tuple[bool, str]] = []
    barrier = threading.Barrier(8)

    def send(chunk: list) -> None:
        barrier.wait()
        results.extend(verifier.verify(c) for c in chunk)

    threads = [threading.Thread(target=send, args=(commands[i::8],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [(True, "ok")] * 400
    assert 1 <= len(syncs) <= 400
    verifier.close()
    assert start(keyring, clock, path).ledger_size == 400


def test_checking_without_recording_writes_nothing(keyring, clock, path) -> None:
    verifier = start(keyring, clock, path)
    lines = verifier.ledger.lines
    assert verifier.verify(signed(keyring, "peek", T0), record_nonce=False) == (True, "ok")
    assert verifier.ledger.lines == lines and verifier.ledger_size == 0


def test_ledger_arguments_are_checked(path) -> None:
    with pytest.raises(ValueError, match="durability"):
        NonceLedger(path, durability="sometimes")
    with pytest.raises(ValueError, match=">= 1"):
        NonceLedger(path, compact_slack=0)


# --- the verifier's own bounds ------------------------------------------------------------------


@pytest.mark.parametrize("freshness", [0, -1.0, MAX_FRESHNESS_S + 1, float("nan"), float("inf")])
def test_freshness_must_be_within_an_hour(keyring, freshness) -> None:
    with pytest.raises(ValueError, match=r"\(0, 3600\]"):
        CommandVerifier(keyring, freshness)


def test_key_ids_restrict_which_keys_may_sign_commands(keyring, clock) -> None:
    verifier = CommandVerifier(keyring, clock=clock, key_ids=["ctl"])
    assert verifier.verify(signed(keyring, "a", T0, "pub")) == (False, "untrusted_key_id")
    assert verifier.verify(signed(keyring, "b", T0, "ctl")) == (True, "ok")
    with pytest.raises(TypeError, match="single string 'ctl'"):
        CommandVerifier(keyring, key_ids="ctl")
    with pytest.raises(ValueError, match="non-empty"):
        CommandVerifier(keyring, key_ids=[""])
    # A typo ("ctI") refused every command at arrival as untrusted, silently: refused here.
    with pytest.raises(ValueError, match=r"\['ctI'\] are not in the keyring"):
        CommandVerifier(keyring, key_ids=["ctl", "ctI"])


def test_a_failed_fdatasync_refuses_until_the_file_is_rewritten(
    keyring, clock, path, monkeypatch
) -> None:
    """A second fdatasync may "succeed" after the kernel dropped the pages of the first: so
    nothing counts as durable after a failure until the ledger has rewritten itself."""
    import kasmina.control.ledger as ledger_module

    verifier = start(keyring, clock, path)
    real = ledger_module._datasync
    failures = [OSError(5, "Input/output error")]

    def flaky(fd: int) -> None:
        if failures:
            raise failures.pop()
        real(fd)

    monkeypatch.setattr(ledger_module, "_datasync", flaky)
    assert verifier.verify(signed(keyring, "lost", T0)) == (False, "ledger_error")
    assert verifier.ledger.broken
    assert verifier.verify(signed(keyring, "next", T0)) == (True, "ok")  # after a rewrite
    assert not verifier.ledger.broken
    verifier.close()
    restarted = start(keyring, clock, path)
    assert restarted.verify(signed(keyring, "lost", T0)) == (False, "replay")  # never reusable
    assert restarted.verify(signed(keyring, "next", T0)) == (False, "replay")


@pytest.mark.parametrize("failing", ["append", "fdatasync"])
def test_a_command_the_ledger_could_not_keep_leaves_its_id_free(
    keyring, clock, path, monkeypatch, failing: str
) -> None:
    """Refused as ``ledger_error``, the command never ran: the controller's retry under the
    same command id (signed anew) is no duplicate, whichever write failed."""
    import kasmina.control.ledger as ledger_module

    verifier = start(keyring, clock, path)
    fail = [OSError(5, "Input/output error")]

    def once(real):
        def flaky(*args):
            if fail:
                raise fail.pop()
            return real(*args)

        return flaky

    if failing == "append":
        monkeypatch.setattr(NonceLedger, "append", once(NonceLedger.append))
    else:
        monkeypatch.setattr(ledger_module, "_datasync", once(ledger_module._datasync))
    command = make_seed_command("advance", "layer0:1", command_id="adv-1")
    first = sign_command(command, keyring, "ctl", nonce="first", timestamp=T0)
    assert verifier.verify(first) == (False, "ledger_error")
    retry = sign_command(command, keyring, "ctl", nonce="retry", timestamp=T0 + 1)
    assert verifier.verify(retry) == (True, "ok")
    again = sign_command(command, keyring, "ctl", nonce="again", timestamp=T0 + 2)
    assert verifier.verify(again) == (False, "duplicate_command")


def test_deferred_sync_writes_and_syncs_once_before_acting(
    keyring, clock, path, monkeypatch
) -> None:
    """``defer_sync``: verify only stages the nonce (memory, no I/O); one ``make_durable``
    writes every nonce accepted so far and syncs them once, and a failure there is raised so
    the caller acts on none of them. A staged nonce is refused as a replay at once."""
    import kasmina.control.ledger as ledger_module

    syncs: list[int] = []
    real = ledger_module._datasync

    def counting(fd: int) -> None:
        syncs.append(fd)
        real(fd)

    monkeypatch.setattr(ledger_module, "_datasync", counting)
    ledger = NonceLedger(path, durability="fsync")
    verifier = CommandVerifier(keyring, WINDOW, clock=clock, ledger=ledger, defer_sync=True)
    before, size = len(syncs), path.stat().st_size
    commands = [signed(keyring, f"d{i}", T0) for i in range(5)]
    assert all(verifier.verify(cmd)[0] for cmd in commands)
    assert len(syncs) == before and path.stat().st_size == size  # no I/O on arrival
    assert verifier.verify(commands[0]) == (False, "replay")  # in memory already
    verifier.make_durable()
    assert len(syncs) == before + 1  # one fdatasync for all five
    assert all(f"d{i}".encode().hex() in path.read_text() for i in range(5))  # written
    verifier.make_durable()
    assert len(syncs) == before + 1  # nothing new to sync
    assert verifier.verify(signed(keyring, "lost", T0))[0]
    monkeypatch.setattr(
        ledger_module, "_datasync", lambda fd: (_ for _ in ()).throw(OSError(5, "EIO"))
    )
    with pytest.raises(OSError):
        verifier.make_durable()
    assert verifier.ledger.broken
    verifier.close()
    restarted = start(keyring, clock, path)
    assert restarted.verify(signed(keyring, "d0", T0)) == (False, "replay")
    assert restarted.verify(signed(keyring, "lost", T0)) == (False, "replay")  # written first


def test_release_ids_frees_only_the_acceptance_it_names(keyring, clock, path) -> None:
    """``release_ids`` frees an id only for the acceptance it names (id and signed
    timestamp): one a later command took once the first left the window stays taken."""
    ledger = NonceLedger(path, durability="fsync")
    verifier = CommandVerifier(keyring, WINDOW, clock=clock, ledger=ledger, defer_sync=True)

    def command(nonce: str, timestamp: float):
        cmd = make_seed_command("germinate", "layer0:1", "artifact-1")
        cmd.command_id = "x"
        return sign_command(cmd, keyring, "ctl", nonce=nonce, timestamp=timestamp)

    assert verifier.verify(command("a", T0))[0]
    clock.now += WINDOW + 1  # "a" and its id leave the window
    later = clock.now
    assert verifier.verify(command("b", later))[0]  # the id, taken anew
    verifier.release_ids([("x", T0)])  # the first acceptance's: not this one's
    assert verifier.verify(command("c", later)) == (False, "duplicate_command")
    verifier.release_ids([("x", later)])
    assert verifier.verify(command("d", later)) == (True, "ok")
    verifier.close()


@pytest.mark.parametrize("durability", ["fsync", "flush"])
def test_deferred_records_survive_a_rewrite_and_a_failed_write(
    keyring, clock, path, durability, monkeypatch
) -> None:
    """Staged nonces are live ones: a rewrite (compaction) puts them in the new file; a write
    that fails at ``make_durable`` is raised, refuses until rewritten, and loses nothing."""
    ledger = NonceLedger(path, durability=durability, compact_slack=3)
    verifier = CommandVerifier(keyring, WINDOW, clock=clock, ledger=ledger, defer_sync=True)
    for i in range(12):  # several rewrites on the way, each taking the staged nonces along
        assert verifier.verify(signed(keyring, f"c{i}", T0))[0]
    verifier.make_durable()
    assert verifier.verify(signed(keyring, "w", T0))[0]

    def failing(data: bytes) -> int:
        raise OSError(28, "ENOSPC")

    monkeypatch.setattr(ledger._file, "write", failing, raising=False)
    with pytest.raises(OSError):
        verifier.make_durable()
    assert ledger.broken
    monkeypatch.undo()
    assert verifier.verify(signed(keyring, "after", T0))[0]  # the rewrite recovers
    verifier.make_durable()
    verifier.close()
    restarted = start(keyring, clock, path)
    for nonce in [f"c{i}" for i in range(12)] + ["w", "after"]:
        assert restarted.verify(signed(keyring, nonce, T0)) == (False, "replay"), nonce


def test_a_deferred_ledger_is_rewritten_at_the_safe_point_not_on_arrival(
    keyring, clock, path, monkeypatch
) -> None:
    """Arrival holds the lock the safe point's ``make_durable`` takes: a rewrite there (a
    write, an fdatasync and a rename) would stall the training step behind a controller
    thread's disk. With ``defer_sync`` a file grown past its bound is rewritten by
    ``make_durable`` instead, and stays bounded across safe points."""
    ledger = NonceLedger(path, durability="fsync", compact_slack=3)
    verifier = CommandVerifier(keyring, WINDOW, clock=clock, ledger=ledger, defer_sync=True)
    rewrites: list[bool] = []  # whether each rewrite ran on arrival
    arriving = [False]
    real = ledger.compact

    def compact(live, floor) -> None:
        rewrites.append(arriving[0])
        real(live, floor)

    monkeypatch.setattr(ledger, "compact", compact)
    sent = []
    for i in range(40):  # four a window: the live nonces stay few, the file's lines grow
        clock.now = T0 + i * WINDOW / 4
        sent.append(signed(keyring, f"a{i}", clock.now))
        arriving[0] = True
        assert verifier.verify(sent[-1])[0]
        arriving[0] = False
        if i % 5 == 4:
            verifier.make_durable()  # the safe point
            lines = path.read_text().splitlines()
            assert len(lines) <= 2 * 5 + 3 + 1, (i, len(lines))  # + the floor's line
    assert rewrites and not any(rewrites), rewrites  # rewritten, never on arrival
    verifier.close()
    restarted = start(keyring, clock, path)
    assert not any(restarted.verify(cmd)[0] for cmd in sent)  # replays, or stale


def test_a_stalled_trainers_staged_nonces_stay_bounded(keyring, clock, path) -> None:
    """With ``defer_sync`` the nonces wait in memory for the next safe point. A trainer that
    reaches none for many windows (a long evaluation) while commands keep arriving keeps only
    the staged nonces still inside the window; the dropped ones are stale, and the rewrite at
    the next safe point writes the floor that keeps them so after a restart, even with the
    clock stepped back."""
    ledger = NonceLedger(path, durability="fsync", compact_slack=3)
    verifier = CommandVerifier(keyring, WINDOW, clock=clock, ledger=ledger, defer_sync=True)
    sent = []
    for i in range(200):  # four a window, 50 windows without a safe point
        clock.now = T0 + i * WINDOW / 4
        sent.append(signed(keyring, f"s{i}", clock.now))
        assert verifier.verify(sent[-1])[0]
        assert ledger.staged <= 2 * 5 + 3 + 1, (i, ledger.staged)
    verifier.make_durable()  # the safe point: everything accepted is durable
    assert ledger.staged == 0 and len(path.read_text().splitlines()) <= 2 * 5 + 3 + 2
    verifier.close()
    clock.now = T0  # restarted with the clock stepped back to the first command's time
    restarted = start(keyring, clock, path)
    assert not any(restarted.verify(cmd)[0] for cmd in sent)  # replays, or under the floor


@pytest.mark.parametrize("failure", ["write", "interrupt"])
def test_nonces_a_failed_make_durable_owed_are_made_durable_by_the_next_call(
    keyring, clock, path, failure, monkeypatch
) -> None:
    """A safe point whose ``make_durable`` failed refuses the commands it took, but commands
    still queued (a GERMINATE whose fetch was running) had their nonces in that batch: the
    next safe point's call returned at once (nothing left owed) and applied them with their
    nonces never written, so a restarted trainer accepted them again."""
    ledger = NonceLedger(path, durability="fsync")
    verifier = CommandVerifier(keyring, WINDOW, clock=clock, ledger=ledger, defer_sync=True)
    assert verifier.verify(signed(keyring, "taken", T0))[0]
    assert verifier.verify(signed(keyring, "queued", T0))[0]

    def failing(data: bytes) -> int:
        raise OSError(28, "ENOSPC") if failure == "write" else KeyboardInterrupt

    monkeypatch.setattr(ledger._file, "write", failing, raising=False)
    with pytest.raises(OSError if failure == "write" else KeyboardInterrupt):
        verifier.make_durable()
    monkeypatch.undo()
    verifier.make_durable()  # the next safe point, no command arrived in between
    assert not ledger.broken
    assert b"queued".hex() in path.read_text()
    verifier.close()
    restarted = start(keyring, clock, path)
    assert restarted.verify(signed(keyring, "queued", T0)) == (False, "replay")


def test_opening_removes_the_temporaries_of_a_rewrite_a_crash_cut_short(tmp_path: Path) -> None:
    path = tmp_path / LEDGER_FILE_NAME
    torn = tmp_path / f".{LEDGER_FILE_NAME}.a1b2c3.tmp"  # a compaction killed mid-way
    other = tmp_path / ".checkpoint.key.d4e5f6.tmp"  # not the ledger's
    torn.write_text("half")
    other.write_text("key")
    ledger = NonceLedger(path)
    assert not torn.exists() and other.exists()
    ledger.close()


def test_a_fifo_at_the_ledger_path_is_refused_not_blocked_on(keyring, clock, path) -> None:
    """Reading the ledger at start would block for good on a FIFO (no writer): refused at once,
    naming the file, before the verifier accepts anything."""
    path.parent.mkdir(parents=True)
    os.mkfifo(path)
    ledger = NonceLedger(path)
    outcome: list[BaseException | None] = []

    def build() -> None:
        try:
            CommandVerifier(keyring, WINDOW, clock=clock, ledger=ledger)
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=build, daemon=True)
    worker.start()
    worker.join(timeout=10)
    assert outcome, "the verifier blocked on the FIFO"
    assert isinstance(outcome[0], ValueError) and "nonce ledger" in str(outcome[0])
    ledger.close()


def test_closing_waits_for_a_write_in_flight(keyring, clock, path) -> None:
    """``close()`` on another thread (a manager closed while its training thread's
    ``end_epoch`` makes the queued commands' nonces durable) closed the file between
    ``write_staged``'s open check and its write: the trainer got ``ValueError: I/O operation
    on closed file``. The close now waits for the write; what follows it refuses cleanly."""
    ledger = NonceLedger(path, durability="fsync")
    verifier = CommandVerifier(keyring, WINDOW, clock=clock, ledger=ledger, defer_sync=True)
    assert all(verifier.verify(signed(keyring, f"n{i}", T0))[0] for i in range(3))
    writing, closing = threading.Event(), threading.Event()
    staged_lines = ledger._staged_lines

    def slow_lines() -> bytes:
        writing.set()
        closing.wait(5)  # the closer is blocked on the lock, or has closed the file
        return staged_lines()

    ledger._staged_lines = slow_lines  # type: ignore[method-assign]
    closer = threading.Thread(target=lambda: (writing.wait(5), verifier.close(), closing.set()))
    closer.start()
    threading.Timer(0.3, closing.set).start()  # a close that waits lets the write go on
    try:  # written; the sync then either runs first or finds the file closed
        verifier.make_durable()
    except OSError as exc:
        assert "not open" in str(exc)
    closer.join(5)
    assert not closer.is_alive()
    assert all(f"n{i}".encode().hex() in path.read_text() for i in range(3))
    assert not verifier.verify(signed(keyring, "after", T0))[0]  # closed: refused


def test_the_largest_ledger_a_verifier_can_write_is_one_its_restart_reads() -> None:
    """The file was bounded by the live nonces (twice them, plus the slack) and read with a
    fixed cap: a run holding enough live nonces (long ones, a long window) wrote a ledger its
    own restart refused as too large, and the run could not restart. The live nonces are
    capped so that the largest file compaction allows fits the read cap."""
    from kasmina.control.ledger import (
        LEDGER_COMPACT_SLACK,
        MAX_LEDGER_BYTES,
        MAX_LIVE_NONCES,
        _ledger_line,
    )

    longest = max(
        len(_ledger_line("N", stamp, chr(0x10FFFF) * 256))
        for stamp in (-62_135_596_800.123456, 253_402_300_799.99998, T0 + 0.1234567)
    )
    assert (2 * MAX_LIVE_NONCES + LEDGER_COMPACT_SLACK + 2) * longest <= MAX_LEDGER_BYTES


def test_a_full_window_refuses_commands_until_nonces_leave_it(
    keyring, clock, path, monkeypatch
) -> None:
    """Past ``MAX_LIVE_NONCES`` accepted in the window, a command is refused without using its
    nonce up (``too_many_commands``); once older nonces leave the window it is accepted."""
    from kasmina.control import auth

    monkeypatch.setattr(auth, "MAX_LIVE_NONCES", 3)
    verifier = start(keyring, clock, path)
    for i in range(3):
        assert verifier.verify(signed(keyring, f"n{i}", T0 + i)) == (True, "ok")
    late = signed(keyring, "late", T0 + 3)
    # A check that would not use the nonce up answers as the verify after it will.
    assert verifier.verify(late, record_nonce=False) == (False, "too_many_commands")
    assert verifier.verify(late) == (False, "too_many_commands")
    assert verifier.verify(late) == (False, "too_many_commands")  # not a replay: not used up
    clock.now = T0 + WINDOW + 1.5  # n0 and n1 have left the window
    assert verifier.verify(late) == (True, "ok")
    verifier.close()


@pytest.mark.parametrize("length", [243, 250, 255])
def test_a_ledger_of_a_long_legal_name_compacts_and_clears_a_crashs_leftover(
    keyring, tmp_path: Path, length: int
) -> None:
    """A ledger named with 242-255 bytes: its rewrite's temp file (``.<name>.<pid>.tmp``) had
    a name the filesystem refused, so the verifier failed at start; it is cut to fit, and a
    crash's leftover, of the cut name or the full one, is removed at the next start."""
    from kasmina.utils.atomic import temporary_stem

    path = tmp_path / ("n" * length)
    pid = os.getpid()
    full = tmp_path / f".{path.name}.{pid}.tmp"  # an older Kasmina's, where it fits
    left = [full] if len(os.fsencode(full.name)) <= 255 else []
    left.append(tmp_path / f".{temporary_stem(tmp_path, path.name)}.{pid + 1}.tmp")
    ledger = NonceLedger(path)
    CommandVerifier(keyring, ledger=ledger)  # rewrites the file at start
    ledger.compact([("abc", 1.0)], float("-inf"))
    ledger.close()
    cut = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert not cut and path.exists()
    for leftover in left:
        leftover.write_bytes(b"partial")
    NonceLedger(path).close()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_close_writes_the_nonces_still_staged(keyring, clock, path) -> None:
    """A manager that closes before its next safe point drops the commands it queued, but
    their nonces were spent on arrival: close writes them, so the run's next process refuses
    the captured bytes as replays (they were only staged in memory, and a restarted trainer
    accepted them inside the window)."""
    ledger = NonceLedger(path, durability="fsync")
    verifier = CommandVerifier(keyring, WINDOW, clock=clock, ledger=ledger, defer_sync=True)
    sent = [signed(keyring, f"q{i}", T0) for i in range(3)]
    assert all(verifier.verify(cmd)[0] for cmd in sent)
    assert ledger.staged == 3
    verifier.close()
    restarted = start(keyring, clock, path)
    assert [restarted.verify(cmd) for cmd in sent] == [(False, "replay")] * 3
    restarted.close()


def test_close_closes_a_ledger_that_cannot_take_the_staged_nonces(
    keyring, clock, path, monkeypatch, caplog
) -> None:
    ledger = NonceLedger(path, durability="fsync")
    verifier = CommandVerifier(keyring, WINDOW, clock=clock, ledger=ledger, defer_sync=True)
    assert verifier.verify(signed(keyring, "lost", T0))[0]

    def failing(data: bytes) -> int:
        raise OSError(28, "ENOSPC")

    monkeypatch.setattr(ledger._file, "write", failing, raising=False)
    with caplog.at_level(logging.ERROR, logger="kasmina.control.auth"):
        verifier.close()  # never raises: logged
    assert "staged at close were not written" in caplog.text
    assert verifier.verify(signed(keyring, "later", T0)) == (False, "ledger_error")  # closed
    monkeypatch.undo()
    start(keyring, clock, path).close()  # the lock was let go
