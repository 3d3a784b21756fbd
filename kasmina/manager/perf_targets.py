"""The docs/design.md §8 targets the manager measures on itself, and how each is timed.

``measure_targets`` times every target the running device can measure and returns each value
beside its bound and unit (a ``Measurement``). Each figure but one is timed on private objects (a
throwaway command key, handler, cache and state table), so measuring changes nothing the run
depends on: no nonce is spent, no counter moves. The one exception, the dormant-seed overhead,
runs the live model: ``dormant_overhead_us`` times a slot against its bare host, leaving no
trace on either. ``ManagerReport`` (``report``) calls both, on the training thread only for the
live model, keeps the last dormant figure, and reports each measurement as a ``TargetCheck``.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable
from typing import NamedTuple

import torch

from kasmina.control.auth import CommandVerifier, sign_command
from kasmina.control.builders import make_seed_command
from kasmina.control.commands import KasminaCommand
from kasmina.control.handler import LeylineAdaptationHandler
from kasmina.leyline import SystemStatePacket
from kasmina.seeds.layer import KasminaLayer
from kasmina.seeds.side_effects import kept_buffers
from kasmina.seeds.table import GPUStateTensor
from kasmina.stages import SeedStage
from kasmina.urza.cache import GPUKernelCache
from kasmina.utils.keyring import Keyring, generate_key
from kasmina.utils.modules import hooks_held, in_eval_mode, rng_forked

__all__ = ["Measurement", "dormant_overhead_us", "measure_targets"]

logger = logging.getLogger(__name__)

_COMMANDS_PER_VERIFIER = 1000  # command-path timing: far below MAX_LIVE_NONCES, each accepted


class Measurement(NamedTuple):
    """One docs/design.md §8 target measured: the value, the bound (every target here is an
    upper bound) and its unit."""

    measured: float
    target: float
    unit: str


def measure_targets(
    repeats: int,
    *,
    device: torch.device,
    dormant_overhead: Callable[[], float],
    state_version: int,
) -> dict[str, Measurement]:
    """Measure, now, each docs/design.md §8 target this device can measure, and return
    ``{name: Measurement(measured, target, unit)}``; a target not measurable now (NaN) is left
    out.

    Every value is a median of ``repeats`` timed runs on private objects. Measured on every
    device:

    - ``command_path_p50_us``: parse + verify + validate + dispatch of a signed command
      (distinct nonces, a memory-only ledger, a no-op executor, a fresh verifier every
      1,000 commands, so each is accepted) <= 20 µs;
    - ``state_packet_serialize_p50_us`` <= 2 µs and ``state_packet_bytes`` <= 100 for the
      reference packet (version ``state_version``, epoch, accuracy, 3 metrics);
    - ``cache_hit_p50_us``: a kernel-cache hit <= 2 µs;
    - ``batch_update_1024_us``: 1,024 transitions in one ``batch_state_update`` <= 1 ms, on
      ``device`` (on a GPU that is the one-launch lifecycle update);
    - ``dormant_overhead_us`` <= 10 µs, as ``dormant_overhead`` gives it, called last.

    The GPU kernel rows (bandwidth, KD loss, grad norms, spills) need peers and rooflines:
    ``make bench-gpu`` measures them.
    """
    measurements: dict[str, Measurement] = {}

    def add(name: str, measured: float, target: float, unit: str) -> None:
        if math.isnan(measured):
            logger.debug("target %s not measurable now", name)
            return
        measurements[name] = Measurement(measured, target, unit)

    add("command_path_p50_us", _command_path_us(repeats), 20.0, "us")
    packet = _reference_state_packet(state_version)
    serialize_us = _median_us(packet.SerializeToString, repeats)
    add("state_packet_serialize_p50_us", serialize_us, 2.0, "us")
    add("state_packet_bytes", float(len(packet.SerializeToString())), 100.0, "bytes")
    add("cache_hit_p50_us", _cache_hit_us(repeats), 2.0, "us")
    add("batch_update_1024_us", _batch_update_us(device, repeats), 1000.0, "us")
    add("dormant_overhead_us", dormant_overhead(), 10.0, "us")
    return measurements


def dormant_overhead_us(slot: KasminaLayer, x: torch.Tensor, repeats: int) -> float:
    """Median forward time of ``slot`` minus its bare host's on ``x`` (µs), timed in ``repeats``
    back-to-back pairs; NaN, with a warning, when a forward raises. In eval mode, on a forked
    RNG, its buffers put back and its hooks held: the host sees no trace, no global random
    draw (a host's eval-mode ``F.dropout``), no buffer move (a QAT observer's statistics), no
    hook call (an activation collector). The caller runs it on the training thread."""
    host_ns: list[int] = []
    slot_ns: list[int] = []
    try:
        # The slot's buffers cover its host's and its seeds': kept once, outside the loop,
        # so the copies cost nothing inside the timed pairs.
        with in_eval_mode(slot), kept_buffers(slot), hooks_held(slot):
            with rng_forked(x.device), torch.no_grad():
                slot(x), slot.host(x)  # warm up
                for _ in range(repeats):
                    t0 = time.perf_counter_ns()
                    slot.host(x)
                    t1 = time.perf_counter_ns()
                    slot(x)
                    t2 = time.perf_counter_ns()
                    host_ns.append(t1 - t0)
                    slot_ns.append(t2 - t1)
    except Exception as exc:  # a measurement, never a reason for end_epoch to fail
        logger.warning("dormant overhead of %s not measured: %r", slot.layer_id, exc)
        return math.nan
    # The median of paired differences: each pair ran back to back, so a burst of load
    # on a shared machine shifts both halves of a pair rather than one median. It is
    # reported as it came out: a negative median (a slot cannot be faster than its host)
    # says the overhead is below what this machine's noise can resolve.
    return statistics.median(s - h for s, h in zip(slot_ns, host_ns, strict=True)) / 1e3


class _NullExecutor:
    """Accepts every command: the command-path measurement times the handler, not the work."""

    def execute(self, command: KasminaCommand) -> bool:
        return True


class _TinyKernel:
    """A stand-in cached kernel (the cache only asks its size and to release it)."""

    def get_memory_size(self) -> int:
        return 64

    def release_gpu_memory(self) -> None:
        return None


def _median_us(fn: Callable[[], object], repeats: int) -> float:
    return statistics.median(_times_ns(fn, repeats)) / 1e3


def _times_ns(fn: Callable[[], object], repeats: int) -> list[int]:
    fn()  # warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - start)
    return times


def _reference_state_packet(version: int) -> SystemStatePacket:
    """docs/design.md §8's reference packet: version, epoch, accuracy, 3 metrics."""
    return SystemStatePacket(
        version=version,
        current_epoch=42,
        validation_accuracy=0.9137,
        training_metrics={"loss": 0.2871, "grad_norm": 1.734, "lr": 3e-4},
    )


def _command_path_us(repeats: int) -> float:
    """Median µs of ``repeats`` accepted commands, in batches of ``_COMMANDS_PER_VERIFIER``,
    each signed at a fresh timestamp for a fresh verifier (one verifier refuses every command
    past ``MAX_LIVE_NONCES`` live nonces, ``too_many_commands``: not the path measured). NaN if
    any timed command was refused."""
    keyring = Keyring({"probe": generate_key()})
    times: list[int] = []
    while len(times) < repeats:
        count = min(repeats - len(times), _COMMANDS_PER_VERIFIER)
        handler = LeylineAdaptationHandler(CommandVerifier(keyring), _NullExecutor())
        now = time.time()
        pool = [
            sign_command(
                make_seed_command("germinate", "probe[0]", "artifact-probe", command_id=f"p{i}"),
                keyring,
                "probe",
                nonce=f"{i:016x}",
                timestamp=now,
            ).SerializeToString()
            for i in range(count + 1)
        ]
        times += _times_ns(map(handler.handle_adaptation_command, pool).__next__, count)
        if handler.stats["rejected"]:
            logger.warning("command path not measured, commands refused: %s", handler.stats)
            return math.nan
    return statistics.median(times) / 1e3


def _cache_hit_us(repeats: int) -> float:
    cache = GPUKernelCache(1.0)
    cache.put("probe", _TinyKernel())
    return _median_us(lambda: cache.get("probe"), repeats)


def _batch_update_us(device: torch.device, repeats: int) -> float:
    """1,024 DORMANT -> ISOLATED_INIT transitions applied in one call (result codes read back,
    the one sync), on a fresh table each round; the first round is a warm-up."""
    updates = [(i, SeedStage.ISOLATED_INIT) for i in range(1024)]
    times = []
    for _ in range(max(1, min(repeats, 20)) + 1):
        table = GPUStateTensor(1024, device)
        table.log_transitions = False  # 1,024 INFO lines a round in the run's log, timed too
        start = time.perf_counter_ns()
        table.batch_state_update(updates)
        times.append(time.perf_counter_ns() - start)
    return statistics.median(times[1:]) / 1e3
