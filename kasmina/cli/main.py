"""The ``kasmina`` command line: demo, Urza store tools, key generation, benchmarks.

User mistakes (a missing file, a bad store, a malformed key) end with one ``kasmina: error:``
line on stderr and exit status 1; argparse usage errors exit 2. A stdout whose reader went away
(``kasmina urza list | head -1``) ends a command quietly with exit status 141, as SIGPIPE ends a
Unix tool. Subcommands import their dependencies lazily so that ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import select
import shlex
import stat
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None  # type: ignore[assignment]

from kasmina.cli.common import (
    PROG,
    CLIError,
    bounded_int,
    non_negative_int,
    one_line,
    positive_int,
    redacted,
)
from kasmina.errors import KasminaError

# kasmina.demo.config.MAX_SEED and kasmina.utils.keyring.MIN_KEY_BYTES (the shortest key a
# keyring accepts), repeated here so that --help does not import torch (kasmina.demo and
# kasmina.utils do).
DEMO_MAX_SEED = 2**32 - 1
MIN_KEY_BYTES = 16
# The exit status of a command whose stdout's reader went away: 128 + SIGPIPE (13), what a Unix
# tool the signal ends reports.
EXIT_CLOSED_STDOUT = 141

# ------------------------------------------------------------------------------------ keygen


# HMAC key ids keygen makes: the characters publisher key ids allow (urza.keys.validate_key_id),
# so an id is safe in the printed export line, in file names and in logs. A Keyring accepts any
# non-empty id (hand-written files still load); every id allowed here round-trips through both
# of its formats, "id:hex,..." ($KASMINA_HMAC_KEYS) and JSON.
_HMAC_KEY_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _cmd_keygen(args: argparse.Namespace) -> int:
    from kasmina.utils.keyring import generate_key

    out = _output_file(args.out)
    if args.publisher:
        return _keygen_publisher(args, out)
    if out is None and (args.append or args.force):  # else ignored: a key printed, none written
        flag = "--append" if args.append else "--force"
        raise CLIError(f"{flag} acts on the key file --out names; give --out FILE")
    key_id = "default" if args.key_id is None else args.key_id
    if not _HMAC_KEY_ID_RE.fullmatch(key_id):
        raise CLIError(
            f"invalid key id {key_id!r}: 1-64 characters of [A-Za-z0-9._-], starting with a "
            "letter or digit"
        )
    key = generate_key() if args.bytes is None else generate_key(args.bytes)
    if out is not None:
        with _directory_locked(out):
            return _keygen_file(args, out, key_id, key)
    print(f"export KASMINA_HMAC_KEYS={_export_value({key_id: key})}")
    return 0


def _directory_locked(path: Path) -> contextlib.AbstractContextManager[None]:
    """Held while keygen reads and rewrites a key file: an exclusive lock on its directory, so
    that concurrent ``--append`` runs each add their key (read, add, replace: without it, runs
    at once read the same file and the last rename dropped the others' keys)."""

    @contextlib.contextmanager
    def locked() -> Iterator[None]:
        if fcntl is None:  # no flock here: as before, one run at a time is the caller's job
            yield
            return
        path.parent.mkdir(parents=True, exist_ok=True)  # as the write would
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    return locked()


def _keygen_file(args: argparse.Namespace, out: Path, key_id: str, key: bytes) -> int:
    """Write (or with ``--append`` add to) the HMAC keyring ``out``; print the export line."""
    from kasmina.utils.keyring import Keyring

    keys: dict[str, bytes] = {}
    if out.exists():
        if not args.append:
            raise CLIError(
                f"{args.out} exists; pass --append to add a key (--append --force replaces one "
                "of the same id) or choose another file"
            )
        existing = Keyring.from_file(out)
        if key_id in existing and not args.force:
            raise CLIError(f"{args.out} already holds key {key_id!r}; pass --force to replace it")
        keys = {k: existing.get(k) or b"" for k in existing.key_ids}
    keys[key_id] = key
    text = json.dumps({k: v.hex() for k, v in keys.items()}, indent=2) + "\n"
    try:
        _write_private(out, text)
    except OSError as exc:
        raise _cannot_write(args.out, exc) from None
    print(f"wrote key {key_id!r} to {args.out} ({len(keys)} key(s), mode 0600)", file=sys.stderr)
    print(f"export KASMINA_HMAC_KEYS={_export_value(keys)}")
    return 0


def _export_value(keys: dict[str, bytes]) -> str:
    """``$KASMINA_HMAC_KEYS`` for ``keys``, quoted for a POSIX shell: the "id:hex,..." form,
    or the JSON form when an id from an appended file is one that form cannot hold."""
    if all(_HMAC_KEY_ID_RE.fullmatch(k) for k in keys):
        value = ",".join(f"{k}:{v.hex()}" for k, v in keys.items())
    else:
        value = json.dumps({k: v.hex() for k, v in keys.items()}, separators=(",", ":"))
    return shlex.quote(value)


def _output_file(text: str | None) -> Path | None:
    """``--out`` as the key file to write, or None without one. Refused: an empty name, a path
    whose last part names a directory (``dir/``, ``dir/.``, ``a/b/..``), and anything that
    exists and is not a regular file (a directory, a FIFO, a device), which a key file must
    never replace or be read from. Both keygen paths check here."""
    if text is None:
        return None
    if not text.strip():
        raise CLIError("--out is empty: name the key file to write")
    # A last component that is no file's name: realpath resolves "dir/", "dir/." and "a/b/.."
    # to a directory's own path, and a key file named after the directory was written.
    if os.path.basename(text) in ("", os.curdir, os.pardir):
        raise CLIError(f"--out {text} names a directory: name the key file to write")
    # A link's target is the file to write (replacing the link would leave the keyring the
    # trainers read, through it, without the new key).
    path = Path(os.path.realpath(text))
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return path
    except OSError as exc:
        raise CLIError(f"cannot use --out {text}: {exc.strerror or one_line(exc)}") from None
    if not stat.S_ISREG(mode):
        raise CLIError(
            f"--out {text} exists and is not a regular file; key files are written only to a "
            "new or a regular file"
        )
    return path


def _cannot_write(text: str, exc: OSError) -> CLIError:
    """The error for a key file that could not be written, naming the path as given."""
    return CLIError(f"cannot write {text}: {exc.strerror or one_line(exc)}")


def _keygen_publisher(args: argparse.Namespace, out: Path | None) -> int:
    """An Ed25519 publisher key: the private key goes only to ``--out`` (0600); stdout gets the
    public key as the JSON object trainers are configured with."""
    from kasmina.urza.keys import PublisherKey, check_private_key_file, validate_key_id

    if out is None:
        raise CLIError("--publisher needs --out FILE: a private key is never printed")
    if args.append:
        raise CLIError("--append is for HMAC keyrings; a publisher key file holds one key")
    if args.bytes is not None:  # ignored, it read as if the key had that length
        raise CLIError("--bytes is for HMAC keys; an Ed25519 publisher key is 32 bytes")
    if args.key_id is not None:
        try:
            validate_key_id(args.key_id)
        except ValueError as exc:
            raise CLIError(str(exc)) from None
    key = PublisherKey.generate(args.key_id)
    with _directory_locked(out):  # what is checked below is what is replaced
        if out.exists():
            if not args.force:
                raise CLIError(f"{args.out} exists; pass --force to replace the key in it")
            try:
                check_private_key_file(out)
            except (OSError, ValueError) as exc:
                raise CLIError(
                    f"{args.out} holds no publisher key ({one_line(exc)}); --force replaces only "
                    "a publisher key file, never a command keyring or other file: choose another "
                    "--out"
                ) from None
        try:
            key.save(out, overwrite=args.force)
        except OSError as exc:
            raise _cannot_write(args.out, exc) from None
    print(
        f"wrote publisher key {key.key_id!r} to {args.out} (mode 0600); trainers need only the "
        f"public key: {key.public_key_text}",
        file=sys.stderr,
    )
    print(json.dumps({key.key_id: key.public_key_text}))
    return 0


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, readable by the owner only (mode 0600)."""
    from kasmina.utils.atomic import atomic_write_bytes

    atomic_write_bytes(path, [text.encode("utf-8")])


# ------------------------------------------------------------------------------------- bench


def _repo_root() -> Path:
    """The source checkout holding perf/ (benchmarks are not installed with the package)."""
    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):
        if (base / "perf").is_dir():
            return base
    raise CLIError("no perf/ directory found: run 'kasmina bench' from a Kasmina source checkout")


def _cmd_bench(args: argparse.Namespace) -> int:
    root = _repo_root()
    if args.gpu:
        script = root / "perf" / "bench_gpu.py"
        if not script.is_file():
            raise CLIError(f"{script} not found")
        cmd = [sys.executable, str(script), *args.extra]
    else:
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            str(root / "perf"),
            "-q",
            "--benchmark-only",
            "--benchmark-columns=min,median,mean,ops",
            *args.extra,
        ]
    return subprocess.call(cmd, cwd=root)


# -------------------------------------------------------------------------------------- demo


def _cmd_demo(args: argparse.Namespace) -> int:
    from kasmina.demo.config import DemoConfig
    from kasmina.demo.run import run_demo_cli

    if not args.out.strip():  # Path("") is ".", the current directory
        raise CLIError("--out is empty: name the directory to write into")
    config = DemoConfig(
        epochs=args.epochs,
        num_seeds=args.seeds,
        device=args.device,
        out_dir=Path(args.out),
        seed=args.seed,
        nproc=args.nproc,
        progress=not args.no_progress,
        repeats=args.repeats,
        scenario=args.scenario,
        replay=args.replay,
    )
    return run_demo_cli(config)


# -------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Kasmina grows a neural network while it trains by grafting seed modules, on "
            "signed controller commands. Run 'kasmina <command> --help' for details."
        ),
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)

    demo = sub.add_parser(
        "demo",
        help="a complete morphogenetic training run on the digits dataset (CPU, under a minute)",
        description=(
            "Train a small MLP on scikit-learn's bundled handwritten digits; a controller sends "
            "signed commands to germinate seeds on plateaus, carries them through the lifecycle "
            "gates, culls one that does not help, and distils a teacher into them. The grown "
            "host is scored on the test split beside the never-grown host and a static MLP of "
            "the grown size. Writes report.txt, result.json, telemetry.jsonl, a PNG plot and an "
            "Urza store into --out."
        ),
    )
    demo.add_argument(
        "--epochs",
        type=positive_int,
        default=40,
        help="training epochs; in the continual scenario, the epochs after the new classes (40)",
    )
    demo.add_argument(
        "--seeds", type=bounded_int(1, 6), default=4, help="seeds the controller may grow, 1-6 (4)"
    )
    demo.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (cpu)")
    demo.add_argument("--out", default="kasmina-demo", help="output directory (./kasmina-demo)")
    demo.add_argument(
        "--seed",
        type=bounded_int(0, DEMO_MAX_SEED),
        default=0,
        help="RNG seed, 0 to 2**32-1; same seed, same run (0)",
    )
    demo.add_argument(
        "--nproc", type=positive_int, default=1, help="data-parallel processes on loopback (1)"
    )
    demo.add_argument(
        "--repeats",
        type=positive_int,
        default=1,
        help="runs with rng seeds SEED .. SEED+N-1; prints mean ± sd and paired gains (1)",
    )
    demo.add_argument(
        "--scenario",
        choices=("standard", "continual"),
        default="standard",
        help="standard, or continual: digits 0-4 first, 5-9 later; Kasmina vs fine-tuning vs "
        "a static net retrained on everything (standard)",
    )
    demo.add_argument(
        "--replay",
        type=non_negative_int,
        default=0,
        metavar="K",
        help="with --scenario continual only: K training digits of each old class stay in the "
        "phase-2 data (0)",
    )
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    demo.set_defaults(func=_cmd_demo)

    from kasmina.cli.urza import add_urza_parser

    add_urza_parser(sub)

    from kasmina.cli.runs import add_runs_parser

    add_runs_parser(sub)

    keygen = sub.add_parser(
        "keygen",
        help="generate an HMAC command key, or an Ed25519 artifact publisher key (--publisher)",
        description=(
            "Generate a random HMAC-SHA256 key for signing controller commands. Prints an "
            "'export KASMINA_HMAC_KEYS=...' line (the format Keyring.from_env reads); with --out "
            "also writes a JSON keyring file (mode 0600, the format Keyring.from_file reads). "
            "With --publisher, generate an Ed25519 key for signing Urza artifacts instead: the "
            "private key is written to --out (mode 0600, never printed) and stdout gets "
            '{"key_id": "public key"}, the JSON trainers are configured with '
            "(urza_trusted_publishers, --publishers). Status goes to stderr."
        ),
    )
    keygen.add_argument(
        "--publisher", action="store_true", help="an Ed25519 artifact publisher key (needs --out)"
    )
    keygen.add_argument(
        "--key-id",
        help="id of the new key (HMAC: default; publisher: publisher-<fingerprint>)",
    )
    keygen.add_argument("--out", help="keyring JSON file, or publisher key file, to write")
    keygen.add_argument("--append", action="store_true", help="add to an existing --out file")
    keygen.add_argument(
        "--force",
        action="store_true",
        help="with --append, replace the keyring's key of the same id (its other keys stay); "
        "with --publisher, replace the publisher key file (never a keyring or other file)",
    )
    keygen.add_argument(
        "--bytes",
        type=bounded_int(MIN_KEY_BYTES, 1024, " bytes"),
        help=f"HMAC key length, {MIN_KEY_BYTES}-1024 (32)",
    )
    keygen.set_defaults(func=_cmd_keygen)

    bench = sub.add_parser(
        "bench",
        help="run the benchmarks in perf/ (pytest-benchmark), or the GPU table with --gpu",
        description=(
            "Run the CPU benchmarks (pytest perf/ --benchmark-only), each printed beside its "
            "target; --gpu runs perf/bench_gpu.py instead (needs CUDA). Extra arguments after "
            "'--' go to pytest or the GPU script. Run from a source checkout."
        ),
    )
    bench.add_argument("--gpu", action="store_true", help="run the GPU table (perf/bench_gpu.py)")
    bench.add_argument("extra", nargs=argparse.REMAINDER, help="arguments passed through")
    bench.set_defaults(func=_cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command ``argv`` names; its exit status. A closed stdout (its reader went away:
    ``| head -1``) ends it quietly with ``EXIT_CLOSED_STDOUT``: no error line, and no
    "Exception ignored" from the flush at exit, whose output goes to ``os.devnull``."""
    if sys.stderr is None:  # started without one (2>&-): print(file=None) wrote it to stdout
        with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):
            return main(argv)
    try:
        try:
            return _run(argv)
        finally:
            if sys.stdout is not None:  # None: started without one (its descriptor closed, >&-)
                sys.stdout.flush()  # here, not at exit, where its failure is only printed
    except BrokenPipeError:  # stdout's (_run passes on no other)
        _discard_stdout()
        return EXIT_CLOSED_STDOUT


def _stdout_closed() -> bool:
    """Whether stdout's reader has gone away: its pipe or socket reports an error or a hang-up
    (assumed where that cannot be asked: no ``poll``, or no file descriptor)."""
    try:
        fd = sys.stdout.fileno()
        poller = select.poll()
    except (AttributeError, OSError, ValueError):
        return True
    poller.register(fd, 0)  # errors and hang-ups are reported whatever is asked for
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))


def _discard_stdout() -> None:
    """Point stdout's file descriptor at ``os.devnull``: what is left in its buffer is flushed
    there at exit, not into the closed pipe (the Python documentation's way, "Note on
    SIGPIPE")."""
    # No file descriptor (a replaced stdout): nothing of it reaches the closed pipe anyway.
    with contextlib.suppress(AttributeError, OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, sys.stdout.fileno())
        finally:
            os.close(devnull)


def _run(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "extra", None) and args.extra[0] == "--":
        args.extra = args.extra[1:]
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except (CLIError, KasminaError, OSError, ValueError, KeyError, ImportError) as exc:
        if isinstance(exc, BrokenPipeError) and _stdout_closed():
            raise  # main answers it: not the command's error
        # ImportError: a store URL whose fsspec backend is not installed (s3://, gs://).
        message = one_line(exc)
        store = getattr(args, "store", None)
        if isinstance(store, str):  # a store's error may quote its URL: never its credentials
            message = redacted(message, store)
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
