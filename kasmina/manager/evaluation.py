"""Kasmina measures each live seed's worth itself (docs/design.md §3, gate G5).

Why: a fossilization decided on a number that arrives inside the command asking for it is
self-certifying. Here the manager runs the model on the caller's validation batches twice over:
once as it is, and once per contributing seed with that seed's chunk replaced by the host's own
output (alpha = 0; every other seed untouched). The difference is the seed's benefit; with a
``metric_fn`` (higher is better, e.g. accuracy) the metric is measured both ways too. G5
compares these and nothing else: the loss benefit against the performance gate, and the
metric's change against ``g5_max_metric_drop``.

Cost, per validation batch: ``1 + C`` forwards, ``C`` the number of seeds whose output reaches
the model's output now (GRAFTING with alpha > 0, STABILIZATION, ACTIVE). A seed in
ISOLATED_INIT or COMPATIBILITY_CHECK passes the host's value through by construction, so its
"without" equals its "with" and costs no forward. One forward per contributing seed, rather than
one batched forward over a new dimension, keeps the model's own batch semantics untouched
(any host, any loss, batch norm in eval mode) at the price of ``C`` forwards, each on its own
copy of the batch (a model may change its inputs in place, a loss its targets).

Side effects: none that training can see. Evaluation runs in eval mode (modes restored), under
``no_grad``, inside ``torch.random.fork_rng`` (no global random number is drawn), and restores
what a forward leaves on the slots (COMPATIBILITY_CHECK probes, pending teacher logits, the
captured kernel outputs the isolation check reads), the seeds' non-finite flags and the
model's buffers, its kernels' included (batch-norm statistics that a kernel exported in train
mode updates whatever ``eval()`` says, a QAT host's observer statistics, which move in eval
mode too). No stage, alpha or weight changes.

Faults: a kernel that faults while evaluated is contained as in any forward (the host's output
stands in for the seed's), but the fault is the measurement's, not training's: it is not
counted toward ``fault_limit`` (so evaluation can never quarantine a seed), and a seed that
faulted, or whose output was not finite, in the forward that measures it gets an evaluation
that says so (``SeedEvaluation.faults``) and that G5 refuses: the host standing in for it would
otherwise read as "no effect", which the default gate fossilizes.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kasmina.manager.ablation import (
    ablate,
    kernels_on_copies,
    rng_states,
    set_rng_states,
    watched_call,
)
from kasmina.manager.batches import batch_size, checked_pair, copied, moved
from kasmina.manager.records import SeedRecord
from kasmina.manager.slots import HostShapes, SlotRegistry
from kasmina.manager.wrap_records import host_buffers_aligned
from kasmina.seeds.faults import measuring
from kasmina.seeds.gates import SeedEvaluation, count_flops
from kasmina.seeds.side_effects import kept_buffers
from kasmina.stages import CONTRIBUTING_STAGES, RUNS_KERNEL, SeedStage
from kasmina.utils.modules import eager_compiles, hooks_held, in_eval_mode

logger = logging.getLogger(__name__)

__all__ = ["LossFn", "MetricFn", "evaluate_seeds", "host_flops_per_element"]

LossFn = Callable[[Any, Any], torch.Tensor | float]
MetricFn = Callable[[Any, Any], torch.Tensor | float]


# Stages whose seed output reaches the layer's output (with alpha > 0 in GRAFTING).
def _contributes(record: SeedRecord) -> bool:
    if record.stage not in CONTRIBUTING_STAGES:
        return False
    return record.stage != SeedStage.GRAFTING or record.seed.alpha_value > 0.0


def _value(result: torch.Tensor | float) -> float:
    if isinstance(result, torch.Tensor):
        if result.numel() != 1:  # a per-sample loss (reduction="none"): item() named neither
            raise TypeError(
                "loss_fn and metric_fn must return a batch mean (a tensor or a real number), got "
                f"a tensor of shape {tuple(result.shape)}"
            )
        return float(result.detach().float().item())
    # float() read the str "1.0" as 1.0; a NumPy scalar or 0-d array is a number
    if isinstance(result, (str, bytes, complex)) or not hasattr(result, "__float__"):
        raise TypeError(
            "loss_fn and metric_fn must return a batch mean (a tensor or a real number), got "
            f"{type(result).__name__} {result!r:.40}"
        )
    return float(result)


def evaluate_seeds(
    registry: SlotRegistry,
    batches: Iterable[tuple[Any, Any]],
    loss_fn: LossFn,
    metric_fn: MetricFn | None = None,
    *,
    epoch: int = -1,
    step: int = 0,
) -> dict[str, SeedEvaluation]:
    """Measure every live seed (a kernel attached, a stage that runs it) on ``batches``.

    ``batches`` yields ``(inputs, targets)``; ``inputs`` is passed to the model (a tuple is
    unpacked, a ``PackedSequence`` is not, a mapping such as a tokenizer's output is passed as
    keyword arguments), tensors are moved to the model's device. ``loss_fn(output, targets)``
    and ``metric_fn(output, targets)`` return a batch mean (tensor or float); the results are
    averaged weighted by batch size (an empty batch weighs nothing and is skipped, not run):
    the targets' (else the inputs') first dimension, or for a list of per-sample targets (a
    detection batch's dicts, tensors of different lengths) the number of samples.
    G5 reads the metric as higher is better and refuses a seed that lowers it by more than
    ``KasminaConfig.g5_max_metric_drop``: pass the metric the fossilization should not cost
    (accuracy), negated if lower is better. A metric that is
    not finite on any batch makes the average not finite (it is not skipped): the evaluation
    says a metric was asked for (``metric_given``), so G5 refuses rather than reading NaN as
    "no metric", and a warning counts the batches. Each seed's :class:`SeedEvaluation` is
    recorded on it (``seed.record_evaluation``) and returned by seed id. No live seed: ``{}``,
    no forward. A seed that faulted or was not finite in the forward measuring it (the host
    stood in for it) gets an evaluation with ``faults`` > 0, which G5 refuses; evaluation
    never counts a fault toward the seed's ``fault_limit``. A batch a seed sat out (a kernel's
    signed size it lacks: a partial last batch; a size its program's input checks refuse) is
    left out of that seed's measurement (``samples`` counts the rest); one that sat out every
    batch is refused as never measured. Arguments of the wrong kind are a ``TypeError``, before
    anything changes (they raised from inside the measurement, a live seed's only), as is a
    batch that is no pair, before its forward (``batches.checked_pair``).
    """
    _check_arguments(batches, loss_fn, metric_fn)
    live = [r for r in registry if r.stage in RUNS_KERNEL and r.seed.kernel is not None]
    if not live:
        return {}
    model = registry.model
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    cuda = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    run = _Run(model, loss_fn, metric_fn, cuda, [_SeedTally(r, _contributes(r)) for r in live])
    with _slots_kept(registry, run.tallies), _measuring(model, [r.seed for r in live], cuda):
        for i_batch, batch in enumerate(batches, 1):
            inputs, targets = checked_pair(batch, i_batch)  # before any forward of it
            inputs, targets = moved(inputs, device), moved(targets, device)
            n = batch_size(inputs, targets)
            if n == 0:  # weight 0: its mean loss (0/0, NaN) would still poison the sums
                run.empty += 1
                continue
            run.samples += n
            run.batches += 1
            _measure_batch(run, inputs, targets, n)
    if run.samples == 0:
        given = f" (given {run.empty}, every one empty)" if run.empty else ""
        raise ValueError(f"evaluate_seeds needs at least one non-empty validation batch{given}")
    if run.bad_metric:
        logger.warning(
            "metric_fn was not finite on %d of %d validation batches: the measured metric is "
            "not finite, and G5 refuses the seeds measured with it",
            len(run.bad_metric),
            run.batches,
        )
    return {t.record.seed_id: _concluded(t, run, epoch, step) for t in run.tallies}


def _check_arguments(batches: object, loss_fn: object, metric_fn: object) -> None:
    """A ``TypeError`` naming the argument of the wrong kind, before anything changes."""
    # What ``for`` takes, as iter() finds it (``__iter__``, else ``__getitem__``: a map-style
    # Dataset of batches), not called: a DataLoader's iter() starts its workers and draws a seed.
    iterate = getattr(type(batches), "__iter__", getattr(type(batches), "__getitem__", None))
    if iterate is None or isinstance(batches, str | bytes):
        raise TypeError(f"batches must yield (inputs, targets), got {type(batches).__name__}")
    for name, fn in (("loss_fn", loss_fn), ("metric_fn", metric_fn)):
        if not callable(fn) and (fn is not None or name == "loss_fn"):
            raise TypeError(f"{name} must be callable(output, targets), got {type(fn).__name__}")


@dataclass
class _SeedTally:
    """What one live seed's measurement adds up over the batches."""

    record: SeedRecord
    contributes: bool  # its output reaches the model's now: measured without it too
    observed: list[str] = field(default_factory=list)  # its faults, seen and not counted
    # Over the batches it did not sit out: samples, and loss and metric with it in place and
    # with its chunk the host's (the sums of batch means times batch sizes).
    samples: int = 0
    loss_with: float = 0.0
    metric_with: float = 0.0
    loss_without: float = 0.0
    metric_without: float = 0.0
    sat_out: int = 0  # the batches it sat out (not measured there)
    faults: int = 0  # the batches it faulted on in the measuring forward
    last_fault: str = ""

    def add(self, n: int, loss: float, metric: float, sat: bool) -> None:
        """One batch of ``n`` samples measured with the seed in place (``loss`` already times
        ``n``, ``metric`` a mean), unless the seed sat it out (``sat``: the host stood in)."""
        if sat:
            self.sat_out += 1
        else:
            self.samples, self.loss_with = self.samples + n, self.loss_with + loss
            self.metric_with += n * metric

    def fault(self, why: str) -> None:
        self.faults += 1
        self.last_fault = why

    def evaluation(self, run: _Run, epoch: int, step: int) -> SeedEvaluation:
        """The seed's measurement: its sums over the batches it was measured on, as means."""
        record, n = self.record, self.samples
        faults, last_fault = self.faults, self.last_fault
        if not n:  # never measured: the host stood in on every batch
            faults, last_fault = self.sat_out, "sat out every validation batch"
        samples = n or run.samples  # (never measured: the host's loss on every batch)
        mean_loss = self.loss_with / samples if n else run.loss / run.samples
        mean_metric = self.metric_with / samples if n else run.metric / run.samples
        given = run.metric_fn is not None
        mean_metric = mean_metric if given else math.nan  # the one NaN, as before
        without = self.loss_without / samples if self.contributes and n else mean_loss
        if not given:
            metric_off = math.nan
        elif self.contributes and n:
            metric_off = self.metric_without / samples
        else:
            metric_off = mean_metric
        return SeedEvaluation(
            seed_id=record.seed_id,
            stage=record.stage,
            alpha=record.seed.alpha_value,
            loss_with=mean_loss,
            loss_without=without,
            metric_with=mean_metric,
            metric_without=metric_off,
            samples=samples,
            epoch=epoch,
            step=step,
            metric_given=given,
            faults=faults,
            last_fault=last_fault,
        )


@dataclass
class _Run:
    """One evaluation: the model, the caller's functions, each live seed's tally, and what
    every non-empty batch adds whichever seeds sat it out (the loss and metric of the model as
    it is over all of them: what a seed measured on none is given)."""

    model: nn.Module
    loss_fn: LossFn
    metric_fn: MetricFn | None
    cuda: list[int]  # the devices whose generators every forward of a batch starts from alike
    tallies: list[_SeedTally]
    samples: int = 0
    batches: int = 0
    empty: int = 0
    loss: float = 0.0
    metric: float = 0.0
    bad_metric: set[int] = field(default_factory=set)  # the batches metric_fn was not finite on

    def scored(self, output: Any, targets: Any, n: int) -> tuple[float, float]:
        """``n`` times the loss of ``output``, and its metric (NaN without ``metric_fn``; one
        that is not finite marks this batch in ``bad_metric``)."""
        loss = n * _value(self.loss_fn(output, targets))
        value = math.nan if self.metric_fn is None else _value(self.metric_fn(output, targets))
        if not math.isfinite(value) and self.metric_fn is not None:
            self.bad_metric.add(self.batches)
        return loss, value


@contextmanager
def _slots_kept(registry: SlotRegistry, tallies: list[_SeedTally]) -> Iterator[None]:
    """Inside, the live seeds report their faults to their tallies, and the slots hold no
    pending teacher logits; after, what a forward leaves on the slots is as before: the records'
    last outputs and inputs, the probes, the teacher logits, the ``sat_out`` counts."""
    saved_records = [(r, r.last_output, r.last_input) for r in registry]
    saved_probes = [(r.seed, r.seed.probe_result) for r in registry]
    saved_sat_out = [(slot.sat_out, dict(slot.sat_out)) for slot in registry.slots]
    teachers = ExitStack()
    for slot in registry.slots:
        teachers.enter_context(slot.teacher_logits_set_aside())
    for tally in tallies:
        tally.record.seed.observed_faults = tally.observed
    try:
        yield
    finally:
        for tally in tallies:  # (their finite flags are buffers: kept_buffers put them back)
            tally.record.seed.observed_faults = None
        for record, output, spec in saved_records:
            record.last_output, record.last_input = output, spec
        for seed, probe in saved_probes:
            seed.probe_result = probe
        teachers.close()
        for counts, before in saved_sat_out:  # the training's count: not the measurement's
            counts.clear()
            counts.update(before)


@contextmanager
def _measuring(model: nn.Module, seeds: list[Any], cuda: list[int]) -> Iterator[None]:
    """Eval mode, no gradient, forked generators, eager, the buffers kept: what the
    measurement's forwards run under (the module docstring's "Side effects")."""
    with (
        in_eval_mode(model),
        # The model's buffers, not only the kernels': a host's may move in eval mode too
        # (a QAT observer's statistics). The kernels' are among them (a kernel the model
        # does not hold, in a slot taken out of it, is never run by its forward), so one
        # copy of each buffer is kept.
        kept_buffers(model),
        host_buffers_aligned(model),  # under wrap_ddp rank 0's, as DDP's next forward's
        kernels_on_copies(seeds),  # a train-mode kernel's statistics: its pending backward
        torch.random.fork_rng(devices=cuda),
        torch.no_grad(),
        measuring(),  # every fallback sets the finite flag, the host's NaN's included
        # Eager: a compiled forward (``model.compile()``, a compiled ``forward``) would
        # keep running its cached graph without the ablation's hooks (TorchDynamo does not
        # guard on hooks added later), and measure the seed against itself.
        eager_compiles(),
    ):
        yield


def _measure_batch(run: _Run, inputs: Any, targets: Any, n: int) -> None:
    """One batch of ``n`` samples: the model as it is, then once per contributing seed that
    did not sit it out with that seed's chunk the host's (``ablate``), added to the tallies."""
    tallies = run.tallies
    records, sinks = [t.record for t in tallies], [t.observed for t in tallies]
    # Every forward of the batch (and its loss) draws the same random numbers: a host or loss
    # that samples (dropout left on, a VAE, a diffusion loss's noise) would otherwise measure
    # each ablation on other draws than the seed's.
    draws = rng_states(run.cuda)
    # A model that changes its inputs in place (an in-place normalization or activation first),
    # or a loss its targets, ran each ablation on what the forward before it left, and measured
    # a seed that does nothing as a benefit: each ablation runs on its own copy of the batch.
    ablated = any(t.contributes for t in tallies)
    pristine = (copied(inputs), copied(targets)) if ablated else (inputs, targets)
    output, seen, sat = watched_call(run.model, inputs, records, sinks)
    for tally, fault in zip(tallies, seen, strict=True):
        if fault is not None:
            tally.fault(fault)
    loss, value = run.scored(output, targets, n)
    run.loss, run.metric = run.loss + loss, run.metric + n * value
    for tally, sat_it in zip(tallies, sat, strict=True):
        tally.add(n, loss, value, sat_it)
    for i, tally in enumerate(tallies):
        if not tally.contributes or sat[i]:
            continue  # sat out: no ablation to compare with, the host stood in already
        set_rng_states(draws, run.cuda)
        hooks = ablate(tally.record)
        try:  # watched too: "the other seeds as they are" must hold
            output, seen_without, _ = watched_call(run.model, copied(pristine[0]), records, sinks)
        finally:
            for hook in hooks:
                hook.remove()
        # Another seed that faults only with this one taken out: the counterfactual is not
        # "the others as they are", and fails closed, as a fault would.
        caused = (j for j, f in enumerate(seen_without) if f and not seen[j])
        other = next((j for j in caused if j != i), None)
        if other is not None and seen[i] is None:
            tally.fault(
                f"seed {records[other].seed_id} faulted with this seed taken out "
                f"({seen_without[other]}): its counterfactual could not be measured"
            )
        loss, value = run.scored(output, copied(pristine[1]), n)
        tally.loss_without += loss
        tally.metric_without += n * value  # (NaN without a metric_fn: never read then)


def _concluded(tally: _SeedTally, run: _Run, epoch: int, step: int) -> SeedEvaluation:
    """The seed's evaluation, said (warnings for batches it sat out or faulted on) and
    recorded on it (``seed.record_evaluation``)."""
    evaluation = tally.evaluation(run, epoch, step)
    sid = evaluation.seed_id
    if tally.sat_out:
        logger.warning(
            "seed %s sat out %d of %d validation batches (its kernel did not run): measured "
            "on the others%s", sid, tally.sat_out, run.batches,
            "" if tally.samples else "; on none, so G5 refuses it",
        )  # fmt: skip
    if evaluation.faults:
        logger.warning(
            "seed %s faulted on %d of %d validation batches while measured (last: %s): "
            "the host's output stood in for it, so G5 refuses it (not counted as a fault)",
            sid,
            evaluation.faults,
            run.batches,
            evaluation.last_fault,
        )
    tally.record.seed.record_evaluation(evaluation)
    logger.info(
        "seed %s (%s): val loss %.5f with, %.5f without, benefit %+.4f; "
        "metric %.5f with, %.5f without",
        sid,
        tally.record.stage.name,
        evaluation.loss_with,
        evaluation.loss_without,
        evaluation.benefit,
        evaluation.metric_with,
        evaluation.metric_without,
    )
    return evaluation


def host_shapes(registry: SlotRegistry) -> dict[str, dict[str, Any]]:
    """Each slot's :data:`HostShapes` as the slot recorded them (or as a checkpoint restored
    them), in plain data for a checkpoint: a process resumed from it counts G3's host cost
    before its first forward, as the run it resumes did."""
    shapes: dict[str, dict[str, Any]] = {}
    for slot in registry.slots:
        known = _recorded_shapes(slot) or registry.saved_host_shapes.get(slot.layer_id)
        if known is not None:
            shape, dtype, out = known
            shapes[slot.layer_id] = {"input": list(shape), "dtype": str(dtype), "output": list(out)}
    return shapes


def parse_host_shapes(saved: object, registry: SlotRegistry) -> dict[str, HostShapes]:
    """A checkpoint's ``host_shapes`` back, for the ``registry``'s slots. An entry that is not
    well formed, or does not fit its slot (an output whose chunked dim is not the slot's
    seeds' width, an input of more than 2^31 elements), is dropped: that slot's cost goes
    unchecked until its first forward, as with an older checkpoint."""
    shapes: dict[str, HostShapes] = {}
    entries = saved if isinstance(saved, dict) else {}
    for slot in registry.slots:
        try:
            entry = entries[slot.layer_id]
            dtype = getattr(torch, str(entry["dtype"]).removeprefix("torch."))
            shape, out_shape = (tuple(int(n) for n in entry[k]) for k in ("input", "output"))
            fits = out_shape[slot.chunk_dim] == slot.num_seeds * slot.chunk_size
        except Exception:  # missing or malformed: the cost stays unchecked until a forward
            continue
        if (
            fits
            and isinstance(dtype, torch.dtype)
            and dtype.is_floating_point
            and all(n >= 0 for n in (*shape, *out_shape))
            and math.prod(shape) < 2**31
        ):
            shapes[slot.layer_id] = (shape, dtype, out_shape)
    return shapes


def _recorded_shapes(slot: nn.Module) -> HostShapes | None:
    spec = getattr(slot, "input_spec", None)
    contract = getattr(slot, "output_contract", None)
    if spec is None or contract is None or isinstance(contract, str):
        return None
    return tuple(spec[0]), spec[1], tuple(contract[0])


def host_flops_per_element(record: SeedRecord, saved: HostShapes | None = None) -> float | None:
    """The host layer of ``record``'s slot, counted in FLOPs per output element on an input of
    its first-seen shape (zeros: the count depends on shapes only), or of ``saved`` (what a
    checkpoint recorded) before the slot's first forward in this process. None without
    either, or when the counter sees no FLOPs (a host of operators it does not count), in
    which case G3 cannot compare costs."""
    slot = record.slot
    known = _recorded_shapes(slot) or saved
    if known is None:
        return None
    shape, dtype, out_shape = known
    if not dtype.is_floating_point:
        return None
    host = slot.host
    spec = getattr(slot, "input_spec", None)
    held = (t.device for t in itertools.chain(host.parameters(), host.buffers()))
    device = spec[2] if spec is not None else next(held, torch.device("cpu"))
    try:
        with in_eval_mode(host), hooks_held(host):  # zeros reach no user hook
            flops = count_flops(host, torch.zeros(shape, dtype=dtype, device=device))
    except Exception as exc:  # a host the counter cannot run: cost not comparable
        logger.warning("host of %s: FLOPs not counted (%s)", slot.layer_id, exc)
        return None
    elements = math.prod(out_shape)
    if flops <= 0 or elements <= 0:
        return None
    return flops / elements
