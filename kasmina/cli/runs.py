"""``kasmina runs list|prune``: the run directories earlier trainers left under a runs root.

Each manager keeps its state in ``<runs_root>/<run_id>/`` (the default root is ``runs`` in
Kasmina's cache directory: ``$KASMINA_HOME``, ``$XDG_CACHE_HOME/kasmina`` or
``~/.cache/kasmina``), and nothing removes it when the run ends. ``list`` shows them, newest
first; ``prune`` removes those no trainer holds, by age and count (``kasmina.manager.runs``).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import TYPE_CHECKING

from kasmina.cli.common import PROG, CLIError, non_negative_int

if TYPE_CHECKING:  # imported lazily at run time so that --help stays instant
    from kasmina.manager.runs import RunInfo

__all__ = ["add_runs_parser"]


def add_runs_parser(sub: argparse._SubParsersAction) -> None:
    runs = sub.add_parser(
        "runs",
        help="list or prune the run directories (checkpoints, nonce ledgers) of earlier runs",
        description=(
            "Every manager keeps its state (nonce ledger, epoch and emergency checkpoints, "
            "checkpoint key) in <runs-root>/<run_id>/, kept after the run ends so that a restart "
            "with its run id resumes. 'list' shows them; 'prune' removes those no trainer holds."
        ),
    )
    runs_sub = runs.add_subparsers(dest="runs_command", metavar="<action>", required=True)

    def root(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--runs-root",
            help="the runs root (default: runs/ in the cache directory, as KasminaConfig's)",
        )

    listing = runs_sub.add_parser("list", help="each run: id, size, last written, in use")
    root(listing)
    listing.set_defaults(func=_cmd_list)

    prune = runs_sub.add_parser(
        "prune",
        help="remove runs no trainer holds, by age (--older-than) and count (--keep)",
        description=(
            "Remove the runs that no trainer holds (one that holds a run's ledger or checkpoint "
            "lock keeps it), that are not among the --keep newest, and whose newest file is at "
            "least --older-than days old. Give --older-than, --keep or both."
        ),
    )
    root(prune)
    prune.add_argument("--older-than", type=_days, metavar="DAYS", help="age in days (0.5: 12 h)")
    prune.add_argument("--keep", type=non_negative_int, metavar="N", help="keep the N newest")
    prune.add_argument("--dry-run", action="store_true", help="say what would go; remove nothing")
    prune.add_argument(
        "--unlocked",
        action="store_true",
        help="also runs with no lock file in their directory (a trainer whose ledger and "
        "checkpoints live elsewhere holds none there: judged by age alone)",
    )
    prune.set_defaults(func=_cmd_prune)


def _days(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of days, got {text!r}") from None
    if not math.isfinite(value * 86400) or value < 0:  # in seconds too
        raise argparse.ArgumentTypeError(f"expected a finite number of days >= 0, got {text}")
    return value


def _root(args: argparse.Namespace) -> str:
    if args.runs_root is not None:
        if not args.runs_root.strip():
            raise CLIError("--runs-root is empty: name the runs root")
        return str(args.runs_root)
    from kasmina.manager.config import default_cache_root

    return str(default_cache_root() / "runs")


def _row(info: RunInfo, now: float) -> str:
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(info.modified))
    age = (now - info.modified) / 86400
    use = "  in use" if info.in_use else "" if info.locked else "  no lock (--unlocked)"
    return f"{info.run_id:<40} {_size(info.size_bytes):>9}  {when} ({age:.1f} d){use}"


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _cmd_list(args: argparse.Namespace) -> int:
    from kasmina.manager.runs import list_runs

    root = _root(args)
    runs = list_runs(root)
    now = time.time()
    for info in runs:
        print(_row(info, now))
    total = sum(r.size_bytes for r in runs)
    print(f"{len(runs)} run(s), {_size(total)} under {root}", file=sys.stderr)
    return 0


def _cmd_prune(args: argparse.Namespace) -> int:
    """Exit 0 when every run chosen was removed (or, with --dry-run, would be), 1 when one or
    more could not be removed whole, each named on stderr."""
    from kasmina.manager.runs import PruneError, prune_runs

    if args.older_than is None and args.keep is None:
        raise CLIError("give --older-than DAYS, --keep N or both; prune removes nothing by default")
    root = _root(args)
    older = None if args.older_than is None else args.older_than * 86400
    failed: list = []
    try:
        removed = prune_runs(
            root, older_than_s=older, keep=args.keep, dry_run=args.dry_run, unlocked=args.unlocked
        )
    except PruneError as exc:
        removed, failed = exc.removed, exc.failed
    now = time.time()
    for info in removed:
        print(_row(info, now))
    verb = "would remove" if args.dry_run else "removed"
    total = _size(sum(r.size_bytes for r in removed))
    print(f"{verb} {len(removed)} run(s), {total}, under {root}", file=sys.stderr)
    for info, reason in failed:
        reason = " ".join(reason.split())
        print(f"{PROG}: error: run {info.run_id}: {reason}", file=sys.stderr)  # says what of it
    return 1 if failed else 0
