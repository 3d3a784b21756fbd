"""The seeds' gradients averaged across ranks (docs/design.md §5, "Multi-process runs").

``SeedGradientSync`` averages the gradients of every live seed across ranks, once per step, as
one flat all-reduce per bucket, from ``manager.step()`` before any optimizer steps. It runs after
the backward rather than overlapped with it: the manager's KD phase backpropagates twice into the
seeds, and gradient accumulation may add more backwards before a step, so a seed's gradient is
known to be final only when ``step()`` begins. DDP (``kasmina.manager.ddp.wrap_ddp``) registers
only the host parameters that require a gradient when it wraps the model: the others, in the
model's ``WrapRecord`` (``kasmina.manager.wrap_records``), are averaged with the seeds' once
unfrozen.
"""

from __future__ import annotations

import logging
import time
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from kasmina.control.processes import copy_into_grads, fill_missing_grads, flat_grad
from kasmina.control.replica import buckets
from kasmina.manager.slots import SlotRegistry
from kasmina.manager.wrap_records import wrap_record
from kasmina.seeds.charging import DeferredFaults, Held, charge_gathered, encode
from kasmina.stages import TRAINING_STAGES
from kasmina.utils.perfstats import LatencyStats
from kasmina.utils.process_group import process_group_active
from kasmina.utils.ratelimit import rarely

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_BUCKET_CAP_MB", "GradSync", "SeedGradientSync"]

# What ``manager.step()`` calls once per step in a multi-rank run, a ``SeedGradientSync``: this
# rank's isolation verdict and seed flags in; whether the seeds' gradients were averaged, and
# every rank's verdict, out.
GradSync = Callable[[bool, dict[str, list[bool]]], tuple[bool, bool]]

# Seeds whose gradients are averaged: those an optimizer steps (their own, or the host's once
# ACTIVE), the same set ``manager.step()`` steps.
DEFAULT_BUCKET_CAP_MB = 25.0
# A seed's flags where it ran clean (``settle_nonfinite``'s order): what a shorter list lacks.
_CLEAN = (True, False, False)


class SeedGradientSync:
    """Averages live seeds' gradients across ranks; ``manager.step()`` calls it each step.

    One step costs a 4-integer all-reduce (the layout check: every rank must be about to
    average the same seeds, or sizes would mismatch and the collective would fail or hang; and
    the isolation verdict, agreed: DDP averaged the host's gradients in the backward, so a graph
    leak one rank found is in every rank's, and the ranks' hosts must take the same step: every
    rank skips it) and
    then one all-reduce per bucket of at most ``bucket_cap_mb`` per dtype and device, all
    launched before the first is waited on. A layout that differs across ranks (a seed's stage
    changed on one rank only) skips the averaging for that step, is logged and counted
    (``stats["layout_mismatch"]``), and is repaired at the next epoch sync. In such a step every
    rank drops its live seeds' gradients (``grad = None``: the optimizers skip them), since every
    rank learns of the mismatch from the same collective: stepped on its own unaveraged
    gradients, each healthy rank would drift from the others, and the sync's vote, split three
    ways or more, would go to rank 0's group even where rank 0 is the one that diverged. Only the
    host steps, on DDP's average, so the healthy ranks stay bitwise equal and the majority
    repairs the odd one. A gradient missing on some ranks is taken as zero there; one missing on
    every rank stays missing.
    """

    def __init__(
        self,
        registry: SlotRegistry,
        *,
        group: Any = None,
        bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB,
    ) -> None:
        if not bucket_cap_mb > 0:
            raise ValueError(f"bucket_cap_mb must be > 0, got {bucket_cap_mb}")
        self.registry = registry
        self.group = group
        self.bucket_cap_bytes = int(bucket_cap_mb * 2**20)
        self.stats: Counter[str] = Counter()
        self.latency = LatencyStats()
        # The seeds' faults found on this rank's host since the last step, while a
        # ``DistributedKasmina`` defers them (``charging.defer_faults``): charged at the step
        # (or the epoch sync: ``charge_held_faults``) on every rank alike.
        self.faults = DeferredFaults()

    def live_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """``(seed id, parameter)`` of every seed an optimizer steps, in registry order; then
        ``("", parameter)`` of each host parameter frozen when registered, or when
        ``wrap_ddp`` wrapped the model, and trainable now (gradual unfreezing): DDP registered
        only those that required a gradient when it wrapped the model, so without this each
        rank stepped such a layer on its own shard's gradient and every epoch's sync found the
        ranks apart. (Wrapped again after the unfreeze, DDP averages it too: the same average,
        averaged twice.)"""
        host = self.registry.hold.unfrozen()
        seen = {id(p) for p in host}
        for p in wrap_record(self.registry.model).not_reduced:
            if p.requires_grad and id(p) not in seen:
                host.append(p)
                seen.add(id(p))
        return [
            (record.seed_id, p)
            for record in self.registry.in_stages(TRAINING_STAGES)
            if record.kernel is not None
            for p in record.seed.seed_parameters()
            if p.requires_grad
        ] + [("", p) for p in host]

    def __call__(
        self, clean: bool = True, flags: dict[str, list[bool]] | None = None
    ) -> tuple[bool, bool]:
        """Average now (a collective: every rank calls it at the same step): whether it did,
        and whether every rank's isolation check found the step ``clean``.

        ``flags``: each running seed's flags as this rank read them, ``[finite, faulted, cut]``
        (``settle_nonfinite``'s; a shorter list stands for the rest clean), agreed here across
        ranks in place: not finite if any rank's was not, faulted (or cut) if any rank's was,
        so that every rank settles them alike
        (charged on the one rank whose data made it fall back, the fault differed across ranks
        and the epoch sync "repaired" it away, every epoch). A seed whose output fell back on
        this rank has a gradient here that is zero but for NaN where its kernel's backward met
        ``0 * inf``: this rank sends none (a zero in the average, as for a gradient missing
        here), and the ranks step on the same finite average (``settle_nonfinite`` then keeps
        it). Any other non-finite entry is averaged as it is, so every rank sees it: a clipped
        step skips that seed on every rank alike, and the check of seeds whose gradient alone
        stays non-finite (``SlotRegistry.charge_failed_steps``) charges it alike.

        The faults seeds found on this rank's host since the last step (a kernel that raised,
        an output of the wrong shape, a backward that raised: ``self.faults``) are gathered from
        every rank in the same rare second collective, and every rank charges them all
        (``charging.charge_gathered``), as one process seeing every rank's data would."""
        held = self.faults.take()
        if not process_group_active() or dist.get_world_size(self.group) == 1:
            self.faults.charge_here(held)
            return False, clean
        world = dist.get_world_size(self.group)
        started = time.perf_counter_ns()
        flags = {} if flags is None else flags
        live = self.live_parameters()
        for seed_id, p in live:
            if not flags.get(seed_id, (True,))[0]:
                p.grad = None
        params = [p for _, p in live]
        layout = _layout_key(live)
        missing = any(p.grad is None for p in params)
        device = _device_for(params, self.group)
        raised = bool(held) or any(not f[0] or any(f[1:]) for f in flags.values())
        seeds = 0 if self.registry is None else len(self.registry.records)  # _agree's length
        row = [layout, -layout, int(missing), int(not clean), int(raised), seeds, -seeds]
        header = torch.tensor(row, dtype=torch.int64, device=device)
        check = dist.all_reduce(header, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        # Packed while the check is in flight; thrown away if the check says otherwise.
        packed = None if missing else self._pack(params)
        check.wait()
        top, neg_bottom, any_missing, any_leak, any_raised, most, neg_least = header.tolist()
        # Rare: a second small collective, only in a step where a seed fell back or faulted
        # somewhere, and only between ranks whose registries have as many seeds (else the
        # layout differs too, and the epoch sync repairs: each rank charges its own faults).
        self._settle(flags, device, held, bool(any_raised) and most == seeds == -neg_least)
        if any_leak and clean:
            self.stats["peer_leaks"] += 1  # this rank's host skips the step with the others
        clean = not any_leak
        if top != layout or neg_bottom != -layout:
            self._drop_mismatched(params)
            return False, clean
        if not params:
            return False, clean
        if any_missing:
            packed = self._pack(self._fill_missing(params, device))
        assert packed is not None
        self._average(packed, world)
        self.latency.add_ns(time.perf_counter_ns() - started)
        return True, clean

    def _drop_mismatched(self, params: list[nn.Parameter]) -> None:
        """A step whose seed layouts differ across ranks. Every rank sees the mismatch in the
        same reduced header: all drop their seeds' gradients alike, so no rank steps a seed on
        a gradient the others did not see."""
        for p in params:
            p.grad = None
        self.stats["layout_mismatch"] += 1
        logger.log(
            rarely(self.stats["layout_mismatch"], 1000, logging.ERROR),
            "seed layouts differ across ranks (%d step(s) so far): seed gradients are "
            "dropped on every rank (no seed steps) until the next epoch sync repairs "
            "the divergent rank",
            self.stats["layout_mismatch"],
        )

    def _average(self, packed: list[tuple[list[nn.Parameter], torch.Tensor]], world: int) -> None:
        """The buckets all-reduced (every one launched before the first is waited on) and
        copied back into their parameters' gradients."""
        # Divided before the sum, as DDP does: summed first, fp16 gradients of 65504 / world
        # and more overflowed to inf on every rank, which then skipped and charged the seed.
        handles = [
            (bucket, flat, dist.all_reduce(flat.div_(world), group=self.group, async_op=True))
            for bucket, flat in packed
        ]
        for bucket, flat, handle in handles:
            handle.wait()
            copy_into_grads(flat, bucket)
        self.stats["steps"] += 1
        self.stats["buckets"] += len(handles)

    def charge_held_faults(self) -> None:
        """Charge the seeds' faults held since the last step on every rank alike (a collective:
        the epoch sync calls it on every rank, before any command applies, so that a fault a
        validation pass or a G3 probe found at the epoch's end is charged to the seed that
        committed it, not to what a CULL or a ROLLBACK made of it). One 3-integer all-reduce;
        where some rank held a fault, ``_agree``'s two more."""
        held = self.faults.take()
        if not process_group_active() or dist.get_world_size(self.group) == 1:
            self.faults.charge_here(held)
            return
        device = _device_for([p for _, p in self.live_parameters()], self.group)
        seeds = 0 if self.registry is None else len(self.registry.records)
        header = torch.tensor([int(bool(held)), seeds, -seeds], dtype=torch.int64, device=device)
        dist.all_reduce(header, op=dist.ReduceOp.MAX, group=self.group)
        any_held, most, neg_least = header.tolist()
        self._settle({}, device, held, bool(any_held) and most == seeds == -neg_least)

    def _settle(
        self, flags: dict[str, list[bool]], device: torch.device, held: dict[str, Held], agree: bool
    ) -> None:
        """With ``agree`` (decided alike on every rank: some rank has flags or faults to agree,
        and the registries are as long), ``flags`` agreed and every rank's ``held`` faults
        charged on every rank; else each rank charges its own ``held`` (registries of other
        sizes: the sync repairs). A seed not in the registry (a slot that is not the manager's,
        on its table) is charged here in any case."""
        if not agree:
            self.faults.charge_here(held)
            return
        seeds = {record.seed_id: record.seed for record in self.registry}
        charge_gathered(seeds, self._agree(flags, device, encode(held)))
        self.faults.charge_here({s: h for s, h in held.items() if s not in seeds})

    def _agree(
        self, flags: dict[str, list[bool]], device: torch.device, mine: bytes
    ) -> list[bytes]:
        """Every rank's ``flags`` made the same (a collective): not finite where any rank's
        was not, faulted where any rank's was; and every rank's held faults (``mine``, as
        ``charging.encode`` wrote them), in rank order, gathered by a third collective where
        any rank held some. The summed vector covers every seed of the registry, the same list
        on every rank whatever their stages, then each rank's ``len(mine)`` in its own entry."""
        ids, width = [record.seed_id for record in self.registry], len(_CLEAN)
        got = [[*(f := flags.get(s, [])), *_CLEAN[len(f) :]] for s in ids]  # missing: clean
        sizes = [0] * dist.get_world_size(self.group)
        sizes[dist.get_rank(self.group)] = len(mine)
        row = [int(flag) for f in got for flag in (not f[0], *f[1:])] + sizes
        agreed = torch.tensor(row, dtype=torch.int64, device=device)
        dist.all_reduce(agreed, group=self.group)  # a sum: a flag any rank set is positive
        values = agreed.tolist()
        for i, seed_id in enumerate(ids):
            if seed_id in flags:  # as long as it came
                sums = values[width * i : width * i + len(flags[seed_id])]
                flags[seed_id] = [not sums[0], *map(bool, sums[1:])]
        self.stats["flags_agreed"] += 1
        sizes = values[width * len(ids) :]
        return self._gather(mine, sizes, device) if any(sizes) else []

    def _gather(self, mine: bytes, sizes: list[int], device: torch.device) -> list[bytes]:
        """Every rank's ``mine`` (``sizes[rank]`` bytes), in rank order: one all-gather of
        frames padded to the longest."""
        frame = torch.zeros(max(sizes), dtype=torch.uint8, device=device)
        if mine:
            frame[: len(mine)] = torch.frombuffer(bytearray(mine), dtype=torch.uint8)
        every = [torch.empty_like(frame) for _ in sizes]
        dist.all_gather(every, frame, group=self.group)
        self.stats["faults_gathered"] += 1
        return [t[:n].cpu().numpy().tobytes() for t, n in zip(every, sizes, strict=True)]

    def _fill_missing(self, params: list[nn.Parameter], device: torch.device) -> list[nn.Parameter]:
        """Agree which gradients exist anywhere; zeros where only this rank lacks one."""
        kept = fill_missing_grads(params, device, self.group)
        if zeros := sum(filled for _, filled in kept):
            self.stats["zero_filled"] += zeros
        return [p for p, _ in kept]

    def _pack(self, params: list[nn.Parameter]) -> list[tuple[list[nn.Parameter], torch.Tensor]]:
        """Each bucket with its gradients copied into one flat tensor."""
        return [
            (bucket, torch.cat([flat_grad(p) for p in bucket])) for bucket in self._buckets(params)
        ]

    def _buckets(self, params: list[nn.Parameter]) -> Any:
        """Consecutive runs of one gradient dtype and device, at most ``bucket_cap_bytes`` each
        (one parameter larger than the cap is a bucket of its own)."""
        return buckets(params, lambda p: p.grad, self.bucket_cap_bytes)


def _layout_key(live: Sequence[tuple[str, nn.Parameter]]) -> int:
    """A 31-bit digest of which seeds and parameter shapes are about to be averaged."""
    text = ";".join(f"{sid}:{tuple(p.shape)}:{p.dtype}" for sid, p in live)
    return zlib.crc32(text.encode()) & 0x7FFFFFFF


def _device_for(params: Sequence[nn.Parameter], group: Any) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return params[0].device if params else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
