"""Instructions per training step of the fault-containment peers, counted under callgrind.

``perf/bench_faults.py`` times the guarded GRAFTING step against its peers in interleaved rounds,
but on a shared machine a step's wall time drifts by tens of percent between rounds, more than
the 2 % target it is compared with. This script counts instead: each peer runs in its own
process under valgrind's callgrind with instrumentation off; after the models are built and
warmed up, the process switches instrumentation on (``callgrind_control -i on``), runs
``--steps`` training steps and leaves at once (``os._exit``), so the count holds those steps
and nothing else. The count is deterministic (the same code gives the same number on any load)
and it is a count of work, not of time: a cache miss or a stall costs one instruction here.
Both numbers go in ``perf/results``; neither is asserted.

Usage: ``python perf/instructions_faults.py [--size small|wide] [--steps 50]`` (needs valgrind;
about two minutes per peer on one core, two peers at a time).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PEERS = ("unguarded", "device_half_only", "no_host_guard", "no_backward_guard", "guarded")
HERE = Path(__file__).resolve().parent


def _child(peer: str, size: str, steps: int) -> None:
    """Inside valgrind: build, warm up, count ``steps`` steps, leave without tearing down."""
    os.environ["KASMINA_BACKEND"] = "reference"
    sys.path.insert(0, str(HERE))
    import torch

    torch.set_num_threads(1)
    import bench_faults

    nets, x = bench_faults._models(size)
    step = bench_faults._trainer(nets[peer], x)
    for _ in range(20):
        step()
    switch = subprocess.Popen(
        ["callgrind_control", "-i", "on", str(os.getpid())], stdout=subprocess.DEVNULL
    )
    while switch.poll() is None:  # valgrind takes the command at its next poll of this process
        time.sleep(0.01)
    for _ in range(steps):
        step()
    os._exit(0)  # interpreter teardown would be counted too


def _count(peer: str, size: str, steps: int, workdir: str) -> int:
    out = Path(workdir) / f"callgrind.{peer}"
    run = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",
            f"--callgrind-out-file={out}",
            sys.executable,
            __file__,
            "--child",
            peer,
            "--size",
            size,
            "--steps",
            str(steps),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    found = re.search(r"Collected : (\d+)", run.stderr)
    if found is None:
        raise RuntimeError(f"{peer}: callgrind reported no count:\n{run.stderr[-2000:]}")
    return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=("small", "wide"), default="small")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--child", choices=PEERS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.size, args.steps)
        return
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found: this count needs valgrind installed")
    with tempfile.TemporaryDirectory() as workdir, ThreadPoolExecutor(2) as pool:
        counts = dict(
            zip(
                PEERS,
                pool.map(lambda p: _count(p, args.size, args.steps, workdir), PEERS),
                strict=True,
            )
        )
    base = counts["unguarded"]
    print(f"instructions per training step, {args.size} host, {args.steps} steps per peer")
    for peer, total in counts.items():
        per_step = total / args.steps
        print(f"{peer:<18} {per_step:>12,.0f}  {total / base:.3f}x the unguarded peer")


if __name__ == "__main__":
    main()
