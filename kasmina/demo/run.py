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

Deterministic for a fixed ``--seed`` on the CPU (timings aside). The same host trained without
any seed is reported beside it, so the effect of growth is measured, not assumed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from kasmina.demo.config import (
    CHUNK,
    COMMAND_KEY,
    MARKER,
    PUBLISHER_KEY,
    REGROW,
    SEED_PLAN,
    DemoConfig,
)
from kasmina.demo.data import accuracy_and_loss, load_digits_split
from kasmina.demo.loop import DemoLoop
from kasmina.demo.models import HostMLP, teacher_mlp, train_plain
from kasmina.demo.report import DemoResult, format_report, plot
from kasmina.urza.blueprints import get_blueprint
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
    wanted = list(SEED_PLAN[: cfg.num_seeds])
    if any(sid == REGROW[0] for sid, _ in wanted):
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


_OWNED = ("urza", "checkpoints", "emergency")


def _claim_output_dir(out: Path) -> Path:
    """Create ``out``, or reuse one an earlier demo made (its store and checkpoints are cleared:
    each run has fresh keys, so an old store would not verify). Any other non-empty directory
    is refused rather than written into."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).exists():
        raise ValueError(f"--out {out} is a non-empty directory the demo did not create")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).touch()
    for name in _OWNED:
        shutil.rmtree(out / name, ignore_errors=True)
    return out


# ------------------------------------------------------------------------------ entry points


def run_demo(
    cfg: DemoConfig, prepared: dict[str, Any], rank: int = 0, world: int = 1
) -> DemoResult:
    """One rank's run (the whole run when ``world == 1``); returns its ``DemoResult``."""
    device = torch.device(cfg.device)
    data = load_digits_split(cfg.seed, device)
    torch.manual_seed(cfg.seed + 1)
    teacher = train_plain(
        teacher_mlp().to(device), cfg, data, cfg.teacher_epochs, 3e-3, rank, world
    )
    teacher_acc, _ = accuracy_and_loss(teacher, data, data.test)
    torch.manual_seed(cfg.seed + 2)
    baseline = train_plain(HostMLP().to(device), cfg, data, cfg.epochs, cfg.host_lr, rank, world)
    baseline_acc, _ = accuracy_and_loss(baseline, data, data.test)
    torch.manual_seed(cfg.seed + 2)  # the grown host starts from the baseline's initial weights
    model = HostMLP().to(device)
    loop = DemoLoop(cfg, prepared, model, teacher, data, rank, world)
    return loop.run(teacher_acc, baseline_acc)


def _rank_main(rank: int, world: int, cfg: DemoConfig, prepared: dict[str, Any]) -> None:
    _quiet_logging()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # ranks share the cores
    result = run_demo(replace(cfg, progress=cfg.progress and rank == 0), prepared, rank, world)
    if rank == 0:
        (cfg.out_dir / "result.json").write_text(json.dumps(result.to_json(), indent=1))


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

    from kasmina.control.processes import init_from_env

    backend = "nccl" if torch.device(cfg.device).type == "cuda" else "gloo"
    rank, world = init_from_env(backend, timeout_s=300)
    try:
        replace(cfg, nproc=world).validate()
        shared = [prepare(cfg) if rank == 0 else None]
        dist.broadcast_object_list(shared, src=0)  # keys and store location, within the job
        ranked = replace(cfg, nproc=world, progress=cfg.progress and rank == 0)
        result = run_demo(ranked, shared[0], rank, world)
    finally:
        dist.destroy_process_group()
    return result if rank == 0 else None


def run_demo_cli(cfg: DemoConfig) -> int:
    """``kasmina demo``: prepare, run (in ``cfg.nproc`` processes, or as one rank of a
    ``torchrun`` launch), then print and save the report (rank 0)."""
    cfg.validate()
    _quiet_logging()
    start = time.perf_counter()
    if _under_torchrun():
        result = _run_torchrun(cfg)
        if result is None:
            return 0
    elif cfg.nproc == 1:
        result = run_demo(cfg, prepare(cfg))
    else:
        from kasmina.control.processes import spawn

        prepared = prepare(cfg)
        backend = "nccl" if torch.device(cfg.device).type == "cuda" else "gloo"
        spawn(_rank_main, cfg.nproc, args=(cfg, prepared), backend=backend, timeout_s=300)
        result = DemoResult.from_json(json.loads((cfg.out_dir / "result.json").read_text()))
    result.wall_s = time.perf_counter() - start
    (cfg.out_dir / "result.json").write_text(json.dumps(result.to_json(), indent=1))
    report = format_report(result)
    (cfg.out_dir / "report.txt").write_text(report + "\n")
    png = plot(result, cfg.out_dir / "demo.png")
    print(report)
    print(f"\nwrote {cfg.out_dir / 'report.txt'}, {png}, {cfg.out_dir / 'telemetry.jsonl'}")
    sys.stdout.flush()
    return 0
