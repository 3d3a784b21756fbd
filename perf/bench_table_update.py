"""GPUStateTensor.batch_state_update with 1,024 transitions: this tree against a git revision.

docs/design.md §8: a 1,024-seed batch update <= 1 ms. The baseline is ``kasmina/seeds/table.py``
as of ``--baseline`` (default HEAD), loaded from git into its own module, with the CPU op that
revision ran (the torch reference; ``kasmina.ops.lifecycle_update_reference``, unchanged). Both
run in this process, interleaved (alternating order), each call on a fresh 1,024-seed table
(construction not timed); medians of ``--rounds`` calls. One thread, as the other CPU benches.

    .venv/bin/python perf/bench_table_update.py [--baseline REV] [--rounds 200]
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from arguments import positive_int  # perf/ is sys.path[0] when run as a script

from kasmina.manager.perf_targets import _batch_update_us
from kasmina.ops import lifecycle_update_reference
from kasmina.seeds.table import GPUStateTensor
from kasmina.stages import SeedStage

ROOT = Path(__file__).resolve().parents[1]
K = 1024


def _baseline_module(rev: str) -> ModuleType:
    shown = subprocess.run(
        ["git", "show", f"{rev}:kasmina/seeds/table.py"], cwd=ROOT, capture_output=True, text=True
    )
    if shown.returncode != 0:  # not a git checkout (an sdist), or no such revision
        raise SystemExit(f"--baseline {rev}: git could not show its table.py: {shown.stderr}")
    source = shown.stdout
    spec = importlib.util.spec_from_loader("kasmina_table_baseline", loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    exec(compile(source, f"{rev}:kasmina/seeds/table.py", "exec"), module.__dict__)

    def reference_op(state: torch.Tensor, idx: Any, new: Any, gate: Any = None) -> torch.Tensor:
        codes = lifecycle_update_reference(state, idx, new, gate)
        torch.autograd.graph.increment_version(state)
        return codes

    module.lifecycle_update = reference_op  # what that revision ran on a CPU
    return module


class _Watcher:
    """A seed-like observer and a slot-like listener (bound methods, as the real ones)."""

    def on_transition(self, idx: int, old: SeedStage, new: SeedStage) -> None:
        pass

    def refresh(self) -> None:
        pass


def _case(kind: str, table_cls: type, watcher: _Watcher) -> tuple[Callable[[], Any], Callable]:
    updates = [(i, SeedStage.ISOLATED_INIT) for i in range(K)]
    idx = torch.arange(K)
    new = torch.full((K,), int(SeedStage.ISOLATED_INIT))

    def make() -> Any:
        table = table_cls(K, "cpu")
        if kind == "observed":
            table.listen(watcher.refresh)
            for i in range(K):
                table.observe(i, watcher.on_transition)
        return table

    if kind == "tensors":
        return make, lambda table: table.batch_state_update_tensors(idx, new)
    return make, lambda table: table.batch_state_update(updates)


def _interleaved(variants: dict[str, tuple[Callable, Callable]], rounds: int) -> dict[str, float]:
    times: dict[str, list[int]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(rounds + 1):
        for name in names if r % 2 else reversed(names):
            make, run = variants[name]
            table = make()
            start = time.perf_counter_ns()
            run(table)
            elapsed = time.perf_counter_ns() - start
            if r:  # round 0 warms up
                times[name].append(elapsed)
    return {name: statistics.median(t) / 1e3 for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="HEAD")
    parser.add_argument("--rounds", type=positive_int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.getLogger("kasmina").setLevel(logging.WARNING)
    baseline = _baseline_module(args.baseline).GPUStateTensor
    watcher = _Watcher()
    print(f"# torch {torch.__version__}, Python {sys.version.split()[0]}, one thread")
    print(f"# {K} DORMANT -> ISOLATED_INIT transitions per call, fresh {K}-seed table per call")
    print(f"# medians of {args.rounds} interleaved calls (us)")
    for label, kind in [
        ("list of (int, SeedStage), nothing listening", "plain"),
        ("same, every seed observed + one listener", "observed"),
    ]:
        variants = {
            f"baseline {args.baseline}": _case(kind, baseline, watcher),
            "this tree": _case(kind, GPUStateTensor, watcher),
        }
        if kind == "plain":
            variants["this tree, batch_state_update_tensors"] = _case(
                "tensors", GPUStateTensor, watcher
            )
        result = _interleaved(variants, args.rounds)
        print(f"{label}:")
        base = result[f"baseline {args.baseline}"]
        for name, us in result.items():
            print(f"  {name:<42} {us:9.1f} us   ({base / us:5.2f}x baseline)")
    manager = _batch_update_us(torch.device("cpu"), 20)
    print(f"ManagerReport batch_update_1024_us (target <= 1000): {manager:.1f}")


if __name__ == "__main__":
    main()
