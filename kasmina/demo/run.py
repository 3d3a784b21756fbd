"""``kasmina demo``: a complete morphogenetic training run on the CPU in well under two minutes.

The story, on scikit-learn's bundled handwritten digits (no download):

1. a fresh HMAC key for the controller's commands and a fresh Ed25519 publisher key; seed
   blueprints exported with ``torch.export`` and published, signed by the publisher, into a
   local Urza store. The trainers get the command key and only the publisher's *public* key;
   the private key stays in ``publisher.key`` (0600) and is used only here;
2. a teacher MLP trains for a few epochs; the kernel manager then holds it frozen in bf16;
3. a deliberately narrow host MLP trains with DORMANT seed slots on all three of its layers,
   registered with a ``KasminaKernelManager``;
4. at each epoch boundary a controller (``kasmina.demo.controller``) watches validation
   accuracy and sends signed ``AdaptationCommand`` bytes; an adversary sends forged, replayed,
   tampered and stale ones. All of them go through ``DistributedCoordinator`` (every rank
   applies them at the same boundary) into the manager's ``LeylineAdaptationHandler``;
5. germinated seeds load through Urza and the kernel cache, train in isolation (verified every
   step), distil from the teacher (the head's seeds), blend in, and are fossilized or culled on
   their measured help;
6. a table, ``report.txt``, ``result.json``, ``telemetry.jsonl`` and ``demo.png``.

Deterministic for a fixed ``--seed`` on the CPU (timings aside), however busy the machine: one
process runs one intra-op thread (the models are tiny, and a fixed thread count keeps every
reduction in the same order). The growth is measured, not assumed: on the same test split
beside it stand the same host never grown and a static MLP with the grown model's parameter
count trained on the same batches for the same epochs. ``--repeats N`` runs rng seeds
``seed .. seed + N - 1`` and reports mean ± sd and the paired differences;
``--scenario continual`` is ``kasmina.demo.continual``.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kasmina.demo.config import CHUNK, COMMAND_KEY, MARKER, PUBLISHER_KEY, REGROW, DemoConfig
from kasmina.demo.data import accuracy, load_digits_split
from kasmina.demo.loop import DemoLoop
from kasmina.demo.models import (
    HostMLP,
    PlainMLP,
    matching_widths,
    plain_parameters,
    teacher_mlp,
    train_plain,
)
from kasmina.demo.report import (
    CONTINUAL_METHODS,
    ContinualResult,
    DemoResult,
    format_continual,
    format_repeats,
    format_report,
    plot,
    plot_continual,
    summarize,
)
from kasmina.urza.blueprints import get_blueprint
from kasmina.utils.atomic import atomic_write_bytes
from kasmina.utils.keyring import generate_key

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ preparation


def prepare(cfg: DemoConfig) -> dict[str, Any]:
    """Keys and the Urza store, once, before any rank starts; returns what every rank needs:
    the command key, the publisher's public key (never its private key), the store and the
    plan. Writes ``keys.json`` (the command keyring, 0600), ``publisher.key`` (the publisher's
    private key, 0600) and ``publishers.json`` (its public key, what ``kasmina urza verify
    --publishers`` reads)."""
    from kasmina.urza.keys import PublisherKey
    from kasmina.urza.publish import publish_artifact

    out = _claim_output_dir(cfg.out_dir)
    command_key = generate_key()
    key_file = out / "keys.json"
    key_file.touch(mode=0o600)
    key_file.chmod(0o600)
    key_file.write_text(json.dumps({COMMAND_KEY: command_key.hex()}, indent=2) + "\n")
    publisher = PublisherKey.generate(PUBLISHER_KEY)
    publisher.save(out / "publisher.key", overwrite=True)
    publishers = publisher.trusted_publishers().to_json()
    (out / "publishers.json").write_text(json.dumps(publishers, indent=2) + "\n")
    store = str(out / "urza")
    wanted = cfg.seed_plan()
    if cfg.scenario == "standard" and any(sid == REGROW[0] for sid, _ in wanted):
        wanted.append(REGROW)
    artifacts: dict[tuple[str, int], str] = {}
    plan = []
    for seed_id, name in wanted:
        key = (name, CHUNK[seed_id])
        if key not in artifacts:
            torch.manual_seed(cfg.seed * 31 + len(artifacts))
            module = get_blueprint(name).build(key[1]).eval()
            example = torch.randn(8, key[1], generator=torch.Generator().manual_seed(0))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.export internals
                manifest = publish_artifact(module, [example], store, name, publisher)
            artifacts[key] = manifest.artifact_id
        plan.append((seed_id, artifacts[key]))
    return {
        "keys": {COMMAND_KEY: command_key.hex()},
        "publishers": publishers,
        "store": store,
        "plan": plan,
    }


# What a demo writes into --out, cleared before the next one writes there.
_OWNED = ("urza", "checkpoints", "emergency", "runs", "seed-*")
_OWNED_FILES = ("report.txt", "result.json", "demo.png", "keys.json", "publisher.key")
_OWNED_FILES += ("publishers.json", "telemetry*.jsonl*")
LOCK = ".kasmina-demo.lock"


def _check_output_dir(out: Path) -> None:
    """``out`` is new, or one an earlier demo made; any other non-empty directory is refused
    rather than written into."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    if not out.is_dir() or (out / MARKER).exists():
        return
    if any(path.name != LOCK for path in out.iterdir()):
        raise ValueError(f"--out {out} is a non-empty directory the demo did not create")


def _claim_output_dir(out: Path) -> Path:
    """Create ``out``, or reuse one an earlier demo made: what that demo wrote is cleared (its
    report, plot and results, which would describe another run beside this one's keys; its
    store, checkpoints and run directories: each run has fresh keys, so an old store would not
    verify, and its own run id; an earlier ``--repeats``' runs)."""
    _check_output_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).touch()
    for pattern in _OWNED:
        for path in out.glob(pattern):
            shutil.rmtree(path, ignore_errors=True)
    for pattern in _OWNED_FILES:
        for path in out.glob(pattern):
            path.unlink(missing_ok=True)
    return out


@contextmanager
def _output_locked(out: Path) -> Iterator[None]:
    """Hold ``out`` for one demo run (an exclusive lock on ``out/.kasmina-demo.lock``): a second
    demo into the same directory at once cleared the first one's store and keys under it."""
    from kasmina.utils.locks import lock_exclusive

    _check_output_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    lock = lock_exclusive(out / LOCK)
    if lock is None:
        raise ValueError(f"--out {out} is in use by another demo running now")
    try:
        yield
    finally:
        lock.close()


# ------------------------------------------------------------------------------ entry points


def run_demo(
    cfg: DemoConfig, prepared: dict[str, Any], rank: int = 0, world: int = 1
) -> DemoResult:
    """One rank's run of the standard scenario (the whole run when ``world == 1``): the
    teacher, the never-grown host, the grown host and the static same-size net."""
    device = torch.device(cfg.device)
    data = load_digits_split(cfg.seed, device)
    torch.manual_seed(cfg.seed + 1)
    teacher = train_plain(
        teacher_mlp().to(device), cfg, data, cfg.teacher_epochs, 3e-3, rank, world
    )
    teacher_acc = accuracy(teacher, data, data.test)

    def test_curve(curve: list[float]) -> Callable[[nn.Module], None]:
        return lambda model: curve.append(accuracy(model, data, data.test))

    baseline_curve: list[float] = []
    torch.manual_seed(cfg.seed + 2)
    baseline = HostMLP().to(device)
    record = test_curve(baseline_curve)
    train_plain(baseline, cfg, data, cfg.epochs, cfg.host_lr, rank, world, on_epoch=record)
    baseline_acc = accuracy(baseline, data, data.test)
    torch.manual_seed(cfg.seed + 2)  # the grown host starts from the baseline's initial weights
    model = HostMLP().to(device)
    loop = DemoLoop(cfg, prepared, model, teacher, data, rank, world)
    result = loop.run(teacher_acc, baseline_acc)
    # The static net: as many parameters as the grown model ended with, the same batches.
    widths = matching_widths(result.grown_model_parameters)
    static_curve: list[float] = []
    torch.manual_seed(cfg.seed + 3)
    static = PlainMLP(widths).to(device)
    record = test_curve(static_curve)
    train_plain(static, cfg, data, cfg.epochs, cfg.host_lr, rank, world, on_epoch=record)
    result.static_test_acc = accuracy(static, data, data.test)
    result.static_widths = list(widths)
    result.static_parameters = plain_parameters(widths)
    result.baseline_curve = baseline_curve
    result.static_curve = static_curve
    return result


def _rank_main(rank: int, world: int, cfg: DemoConfig, prepared: dict[str, Any]) -> None:
    _quiet_logging()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # ranks share the cores
    result = run_demo(replace(cfg, progress=cfg.progress and rank == 0), prepared, rank, world)
    if rank == 0:
        _write_whole(cfg.out_dir / "result.json", json.dumps(result.to_json(), indent=1))


def _quiet_logging() -> None:
    """The demo prints its own report; library warnings (refused gates, rejected commands are
    part of the show) go to the telemetry file, not the terminal."""
    logging.basicConfig(level=logging.CRITICAL, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", category=FutureWarning)


def _under_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def _run_torchrun(cfg: DemoConfig) -> Any:
    """This process is one rank of a ``torchrun`` launch: rank 0 prepares, every rank trains.
    Returns rank 0's result (None on the other ranks)."""
    import torch.distributed as dist

    from kasmina.control.processes import init_from_env, shutdown_process_group

    backend = "nccl" if torch.device(cfg.device).type == "cuda" else "gloo"
    rank, world = init_from_env(backend, timeout_s=300)
    try:
        replace(cfg, nproc=world).validate()
        shared = [prepare(cfg) if rank == 0 else None]
        dist.broadcast_object_list(shared, src=0)  # keys and store location, within the job
        ranked = replace(cfg, nproc=world, progress=cfg.progress and rank == 0)
        result = run_demo(ranked, shared[0], rank, world)
    finally:
        shutdown_process_group()
    return result if rank == 0 else None


@contextmanager
def _one_thread() -> Iterator[None]:
    """One intra-op thread for a one-process run (restored after): the models are tiny, so
    more threads only add synchronisation, which a busy machine turns into seconds."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


Result = DemoResult | ContinualResult


def run_one(cfg: DemoConfig) -> Result:
    """One seed, one process, either scenario: prepare the output directory and run."""
    from kasmina.demo.continual import run_continual

    prepared = prepare(cfg)
    with _one_thread():
        if cfg.scenario == "continual":
            return run_continual(cfg, prepared)
        return run_demo(cfg, prepared)


# The modules of the `demo` extra (pyproject.toml) the run imports, and their packages.
_DEPENDENCIES = {"sklearn": "scikit-learn", "tqdm": "tqdm", "matplotlib": "matplotlib"}


def check_dependencies() -> None:
    """``ImportError`` naming each package of the ``demo`` extra that does not import, and how
    to install it. Called before anything is written or trained: matplotlib is imported only
    by the plot, at the very end, and a whole run was trained before its absence stopped it."""
    missing = []
    for module, package in _DEPENDENCIES.items():
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(package)
    if missing:
        raise ImportError(
            f"kasmina demo needs {', '.join(missing)}, which cannot be imported here: "
            f"pip install 'kasmina[demo]' (or pip install {' '.join(missing)})"
        )


def _write(result: Result, out: Path) -> str:
    """``result.json`` and ``report.txt`` in ``out``; returns the report. The plot is
    ``_plot``'s, afterwards, so that a plotting failure loses neither."""
    _write_whole(out / "result.json", json.dumps(result.to_json(), indent=1))
    if isinstance(result, ContinualResult):
        report = format_continual(result)
    else:
        report = format_report(result)
    _write_whole(out / "report.txt", report + "\n")
    return report


def _write_whole(path: Path, text: str) -> None:
    """``text`` in ``path``, whole or not at all (a temporary file renamed over it): a write
    that failed part way (a full disk) left an empty or truncated report.txt or result.json."""
    atomic_write_bytes(path, [text.encode("utf-8")], private=False)


def _plot(result: Result, out: Path) -> None:
    """``demo.png`` in ``out``."""
    if isinstance(result, ContinualResult):
        plot_continual(result, out / "demo.png")
    else:
        plot(result, out / "demo.png")


def run_demo_cli(cfg: DemoConfig) -> int:
    """``kasmina demo``: prepare, run (in ``cfg.nproc`` processes, or as one rank of a
    ``torchrun`` launch, or ``cfg.repeats`` seeds one after another), then print and save the
    report (rank 0)."""
    cfg.validate()
    check_dependencies()
    _quiet_logging()
    if _under_torchrun():  # its world is the launch's: --repeats, continual refused as for --nproc
        replace(cfg, nproc=int(os.environ["WORLD_SIZE"])).validate()
        if os.environ["RANK"] != "0":  # rank 0 writes --out
            _run_torchrun(cfg)
            return 0
    with _output_locked(cfg.out_dir):
        return _run_cli(cfg)


def _run_cli(cfg: DemoConfig) -> int:
    if cfg.repeats > 1:
        return _run_repeats(cfg)
    start = time.perf_counter()
    result: Result
    if _under_torchrun():
        ranked = _run_torchrun(cfg)
        if ranked is None:
            return 0
        result = ranked
    elif cfg.nproc == 1:
        result = run_one(cfg)
    else:
        from kasmina.control.processes import spawn

        prepared = prepare(cfg)
        backend = "nccl" if torch.device(cfg.device).type == "cuda" else "gloo"
        spawn(_rank_main, cfg.nproc, args=(cfg, prepared), backend=backend, timeout_s=300)
        result = DemoResult.from_json(json.loads((cfg.out_dir / "result.json").read_text()))
    result.wall_s = time.perf_counter() - start
    report = _write(result, cfg.out_dir)
    _say(report)
    _plot(result, cfg.out_dir)
    names = ("report.txt", "result.json", "demo.png", "telemetry.jsonl")
    _say(f"\nwrote {', '.join(str(cfg.out_dir / name) for name in names)}")
    return 0


def _say(text: str) -> None:
    """Print ``text`` on stdout, each character its encoding cannot take written as its
    backslash escape, as stderr writes it: a path's byte that is not UTF-8 (a lone surrogate
    in ``str``) raised ``UnicodeEncodeError`` on a strict UTF-8 stdout, and a run that had
    written every file exited 1."""
    if sys.stdout is None:  # started without one (its descriptor closed, >&-): print nothing
        return
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    print(text.encode(encoding, "backslashreplace").decode(encoding))
    sys.stdout.flush()


def _run_repeats(cfg: DemoConfig) -> int:
    """``--repeats N``: seeds ``seed .. seed + N - 1`` one after another, each in its own
    ``seed-<k>`` directory with its full report; the summary (mean ± sd per model, paired
    differences) goes to ``report.txt`` and ``result.json`` in ``--out``."""
    out = _claim_output_dir(cfg.out_dir)
    start = time.perf_counter()
    results: list[Result] = []
    for k in range(cfg.repeats):
        seed = cfg.seed + k
        one = replace(cfg, seed=seed, repeats=1, out_dir=out / f"seed-{seed}")
        t0 = time.perf_counter()
        result = run_one(one)
        result.wall_s = time.perf_counter() - t0
        _write(result, one.out_dir)
        _plot(result, one.out_dir)
        results.append(result)
        _say(f"seed {seed}: {_headline(result)}  ({result.wall_s:.0f} s)")
    summary = summarize(results)
    report = format_repeats(cfg.scenario, summary, time.perf_counter() - start)
    payload = {
        "scenario": cfg.scenario,
        "summary": summary,
        "runs": [r.to_json() for r in results],
    }
    _write_whole(out / "result.json", json.dumps(payload, indent=1))
    _write_whole(out / "report.txt", report + "\n")
    _say("\n" + report)
    _say(f"\nwrote {out / 'report.txt'}, {out / 'result.json'}; each run in {out}/seed-<k>/")
    return 0


def _headline(result: Result) -> str:
    """The one-line progress summary of a finished run."""
    if isinstance(result, ContinualResult):
        kasmina, tuned, static, _ = CONTINUAL_METHODS
        acc = result.accuracy
        return "  ".join(
            f"{label} old {100 * acc[m]['old']:.1f}% new {100 * acc[m]['new']:.1f}%"
            for label, m in (("Kasmina", kasmina), ("fine-tuned", tuned), ("static", static))
        )
    return (
        f"never-grown {100 * result.baseline_test_acc:.1f}%  grown "
        f"{100 * result.acc_after_growth:.1f}%  static {100 * result.static_test_acc:.1f}%"
    )
