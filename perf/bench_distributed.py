"""What multi-process runs cost: Kasmina's per-epoch command sync and per-step seed all-reduce,
beside the host's own DDP all-reduce, measured in one run on 2 gloo ranks (docs/design.md §5).

Run it directly (``python perf/bench_distributed.py``; ``--help`` for sizes), or through
``make bench``, where one pytest-benchmark round runs the whole measurement and the medians are
printed with the other targets. Every figure is rank 0's wall time per operation, each rep
starting after a barrier, as median and p90 over the reps:

- ``sync_epoch``: ``DistributedCoordinator.sync_epoch`` with k signed commands received on rank
  0 (exchange as raw bytes, re-verification on rank 1, the all-gathered agreement, a null
  executor, the replica checksum all-gather); k = 0 is the fixed cost of an epoch boundary;
- ``seed_sync``: ``SeedGradientSync`` once (the 3-integer layout check and the bucketed flat
  all-reduce of every live seed's gradients), as ``manager.step()`` runs it each step;
- ``seed_flat``: one flat all-reduce of the same number of floats, for the check's share;
- ``host_flat``: one flat all-reduce of the host's gradient floats, what DDP moves per step;
- ``ddp_backward`` / ``local_backward``: the host's backward through DDP and under
  ``no_sync()`` (no reduction); their difference is what DDP's reduction adds to a step after
  its overlap with the backward.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from arguments import positive_int  # perf/ is sys.path[0] when run as a script
from torch import nn
from torch.nn import functional as F

from kasmina.control.auth import CommandVerifier, sign_command
from kasmina.control.builders import make_seed_command
from kasmina.control.commands import KasminaCommand
from kasmina.control.distributed import DistributedCoordinator
from kasmina.control.handler import LeylineAdaptationHandler
from kasmina.control.processes import spawn
from kasmina.manager.ddp import wrap_ddp
from kasmina.manager.grad_sync import SeedGradientSync
from kasmina.manager.slots import SlotRegistry
from kasmina.seeds.inject import attach
from kasmina.stages import SeedStage
from kasmina.utils.keyring import Keyring

KEY = bytes(range(32))
COMMAND_COUNTS = (0, 1, 16, 64)


class NullExecutor:
    def execute(self, command: KasminaCommand) -> bool:
        return True


class Host(nn.Module):
    def __init__(self, width: int, seeds: int, chunk: int) -> None:
        super().__init__()
        self.inp = nn.Linear(256, width)
        self.mid = nn.Linear(width, seeds * chunk)  # the slot
        self.out = nn.Linear(seeds * chunk, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.mid(F.relu(self.inp(x)))))


def _kernel(chunk: int) -> nn.Module:
    return nn.Sequential(nn.Linear(chunk, chunk), nn.ReLU(), nn.Linear(chunk, chunk))


def _timed(fn: Any, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        dist.barrier()
        started = time.perf_counter()
        fn()
        out.append(time.perf_counter() - started)
    return out


def _summary(samples: list[float]) -> tuple[float, float]:
    """Median and p90 (nearest rank: the smallest sample at or above 90 % of them), in ms."""
    ordered = sorted(samples)
    p90 = ordered[math.ceil(0.9 * len(ordered)) - 1]
    return statistics.median(ordered) * 1e3, p90 * 1e3


def _worker(rank: int, world: int, opts: dict[str, Any]) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    reps = opts["reps"]
    rows: list[tuple[str, str, float, float]] = []

    # ---- the host: DDP over its own parameters, seeds in GRAFTING with kernels attached
    model = Host(opts["width"], opts["seeds"], opts["chunk"])
    slot = attach(model, "mid", seeds_per_layer=opts["seeds"], chunk_size=opts["chunk"])[0]
    registry = SlotRegistry(model, [slot])
    for record in registry:
        torch.manual_seed(1)
        kernel = _kernel(opts["chunk"])
        record.seed.attach_kernel(kernel, "bench")
        record.kernel = kernel  # type: ignore[assignment]  # what GERMINATE records
        for stage in ("ISOLATED_INIT", "COMPATIBILITY_CHECK", "GRAFTING"):
            slot.state_table.update_seed_state(record.index, SeedStage[stage])
    net = wrap_ddp(model)
    sync = SeedGradientSync(registry)
    seed_floats = sum(p.numel() for _, p in sync.live_parameters())
    host_floats = sum(p.numel() for p in registry.host_params)
    x = torch.randn(opts["batch"], 256, generator=torch.Generator().manual_seed(rank))
    y = torch.randint(0, 10, (opts["batch"],), generator=torch.Generator().manual_seed(rank))

    def backward(ddp: bool) -> None:
        model.zero_grad(set_to_none=True)
        if ddp:
            F.cross_entropy(net(x), y).backward()
        else:
            with net.no_sync():  # type: ignore[operator]
                F.cross_entropy(net(x), y).backward()

    for _ in range(3):
        backward(True)
    rows.append(("host", "ddp_backward", *_summary(_timed(lambda: backward(True), reps))))
    rows.append(("host", "local_backward", *_summary(_timed(lambda: backward(False), reps))))
    backward(True)
    rows.append(("seeds", "seed_sync", *_summary(_timed(sync, reps))))
    seed_buf, host_buf = torch.randn(seed_floats), torch.randn(host_floats)
    rows.append(("seeds", "seed_flat", *_summary(_timed(lambda: dist.all_reduce(seed_buf), reps))))
    rows.append(("host", "host_flat", *_summary(_timed(lambda: dist.all_reduce(host_buf), reps))))

    # ---- the epoch boundary: commands received on rank 0, verified again on rank 1
    table_state = {"table": slot.state_table.state_tensor}
    for count in COMMAND_COUNTS:
        samples = []
        for _ in range(opts["sync_reps"]):
            keyring = Keyring({"k1": KEY})
            handler = LeylineAdaptationHandler(CommandVerifier(keyring), NullExecutor())
            coord = DistributedCoordinator(handler, lambda: table_state)
            if rank == 0:
                for i in range(count):
                    cmd = make_seed_command("advance", f"mid[{i % opts['seeds']}]")
                    coord.submit(sign_command(cmd, keyring, "k1").SerializeToString())
            dist.barrier()
            started = time.perf_counter()
            result = coord.sync_epoch(0)
            samples.append(time.perf_counter() - started)
            assert len(result.commands) == count and all(result.outcomes)
        rows.append(("boundary", f"sync_epoch[{count} commands]", *_summary(samples)))
    if rank == 0:
        sizes = {"host_floats": host_floats, "seed_floats": seed_floats}
        torch.save({"rows": rows, "sizes": sizes}, Path(opts["out"]) / "bench.pt")


def measure(opts: dict[str, Any]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as out:
        spawn(
            _worker,
            2,
            args=({**opts, "out": out},),
            backend="gloo",
            timeout_s=120,
            join_timeout_s=900,
        )
        return torch.load(Path(out) / "bench.pt")


def report(result: dict[str, Any], opts: dict[str, Any], load: tuple[float, ...]) -> str:
    sizes = result["sizes"]
    lines = [
        f"# Distributed costs: perf/bench_distributed.py, {time.strftime('%Y-%m-%d')}, 2 gloo "
        f"ranks on loopback, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"Python {platform.python_version()}",
        f"# Command: python perf/bench_distributed.py {' '.join(sys.argv[1:])}".rstrip(),
        f"# Host: {sizes['host_floats']:,} gradient floats (DDP); seeds: {opts['seeds']} "
        f"GRAFTING seeds, {sizes['seed_floats']:,} gradient floats (Kasmina); batch "
        f"{opts['batch']}; {opts['reps']} reps per step figure, {opts['sync_reps']} per sync.",
        f"# load average before: {' '.join(f'{v:.2f}' for v in load)}, after: "
        f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}",
        "",
        f"{'what':<10} {'operation':<28} {'median ms':>10} {'p90 ms':>10}",
    ]
    for group, name, median, p90 in result["rows"]:
        lines.append(f"{group:<10} {name:<28} {median:>10.3f} {p90:>10.3f}")
    rows = {name: median for _, name, median, _ in result["rows"]}
    added = rows["ddp_backward"] - rows["local_backward"]
    lines += [
        "",
        f"per step: Kasmina's seed all-reduce {rows['seed_sync']:.3f} ms beside DDP's "
        f"reduction adding {added:.3f} ms to the host's backward "
        f"({rows['host_flat']:.3f} ms for one flat all-reduce of the host's floats); beyond "
        f"a bare all-reduce of the seeds' floats (the layout check, packing, unpacking): "
        f"{rows['seed_sync'] - rows['seed_flat']:.3f} ms",
        f"per epoch: sync_epoch {rows['sync_epoch[0 commands]']:.3f} ms with no command, "
        f"{rows['sync_epoch[16 commands]']:.3f} ms with 16",
    ]
    return "\n".join(lines)


def _options(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=positive_int, default=1024, help="host hidden width (1024)")
    parser.add_argument("--seeds", type=positive_int, default=8, help="seeds in the slot (8)")
    parser.add_argument("--chunk", type=positive_int, default=128, help="seed chunk width (128)")
    parser.add_argument("--batch", type=positive_int, default=64, help="batch per rank (64)")
    parser.add_argument("--reps", type=positive_int, default=50, help="reps per step figure (50)")
    parser.add_argument(
        "--sync-reps", type=positive_int, default=10, help="reps per sync figure (10)"
    )
    parser.add_argument("--out", type=Path, help="also write the report to this file")
    args = parser.parse_args(argv)
    return vars(args)


def test_distributed_costs(benchmark, smoke: bool) -> None:
    """One round of the whole measurement (small sizes); medians shown with the targets."""
    reps = ["--reps", "2", "--sync-reps", "1"] if smoke else ["--reps", "20", "--sync-reps", "5"]
    opts = _options(["--width", "512", *reps])
    result = benchmark.pedantic(measure, args=(opts,), rounds=1, iterations=1)
    rows = {name: median for _, name, median, _ in result["rows"]}
    benchmark.extra_info["target"] = (
        f"seed all-reduce {rows['seed_sync']:.3f} ms/step vs DDP host flat all-reduce "
        f"{rows['host_flat']:.3f} ms; sync_epoch {rows['sync_epoch[0 commands]']:.3f} ms "
        f"(0 commands), {rows['sync_epoch[16 commands]']:.3f} ms (16)"
    )


def main(argv: list[str] | None = None) -> int:
    opts = _options(argv)
    out = opts.pop("out")
    load = os.getloadavg()
    text = report(measure(opts), opts, load)
    print(text)
    if out is not None:
        out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
