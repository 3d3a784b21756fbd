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
(any host, any loss, batch norm in eval mode) at the price of ``C`` forwards.

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
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from kasmina.manager.batches import batch_size, checked_pair, moved
from kasmina.manager.records import SeedRecord
from kasmina.manager.slots import HostShapes, SlotRegistry
from kasmina.manager.wrap_records import host_buffers_aligned
from kasmina.seeds.faults import measuring
from kasmina.seeds.gates import SeedEvaluation, count_flops
from kasmina.seeds.outputs import dense, on_dense, output_element, replace_output_element
from kasmina.seeds.side_effects import kept_buffers
from kasmina.stages import CONTRIBUTING_STAGES, RUNS_KERNEL, SeedStage
from kasmina.utils.flags import read_flags
from kasmina.utils.modules import hooks_held, in_eval_mode

logger = logging.getLogger(__name__)

__all__ = ["LossFn", "MetricFn", "evaluate_seeds", "host_flops_per_element"]

LossFn = Callable[[Any, Any], torch.Tensor | float]
MetricFn = Callable[[Any, Any], torch.Tensor | float]


# Stages whose seed output reaches the layer's output (with alpha > 0 in GRAFTING).
def _contributes(record: SeedRecord) -> bool:
    if record.stage not in CONTRIBUTING_STAGES:
        return False
    return record.stage != SeedStage.GRAFTING or record.seed.alpha_value > 0.0


def _chunk_index(record: SeedRecord) -> int:
    return next(k for k, seed in enumerate(record.slot.seeds) if seed is record.seed)


def _ablate(record: SeedRecord) -> list[Any]:
    """Hooks that put the host's own output back into ``record``'s chunk of its slot: the
    counterfactual with this seed at alpha 0 and the slot's other seeds as they are.

    The slot's own view of its output (the chosen element of a tuple output, the chunked
    dimension) is used, so the chunk replaced is exactly the one the seed owns.
    """
    slot = record.slot
    k, width = _chunk_index(record), slot.chunk_size
    dim = getattr(slot, "chunk_dim", -1)
    index = getattr(slot, "output_index", None)  # a KasminaLayer's element of a tuple output

    def element(out: Any) -> Any:
        return out if index is None else output_element(out, index)

    def replace(out: Any, new: torch.Tensor) -> Any:
        return new if index is None else replace_output_element(out, index, new)

    captured: list[Any] = []

    def keep_host(_module: nn.Module, _args: tuple[Any, ...], output: Any) -> None:
        captured.append(output)

    def restore_chunk(_module: nn.Module, _args: tuple[Any, ...], output: Any) -> Any:
        host, mine = element(captured.pop()), element(output)
        if not isinstance(mine, torch.Tensor) or not isinstance(host, torch.Tensor):
            return output
        if mine.is_nested != host.is_nested:
            return output
        host = dense(host)  # a packed encoder batch: replaced on the padded form, as grafted

        def put_back(padded: torch.Tensor) -> torch.Tensor:
            if padded.shape != host.shape:
                return padded
            out = padded.clone()
            out.narrow(dim, k * width, width).copy_(host.narrow(dim, k * width, width))
            return out

        out = on_dense(mine, put_back)
        return output if out is mine else replace(output, out)

    return [
        slot.host.register_forward_hook(keep_host),
        slot.register_forward_hook(restore_chunk),
    ]


def _rng_states(cuda: list[int]) -> list[torch.Tensor]:
    return [torch.get_rng_state(), *(torch.cuda.get_rng_state(d) for d in cuda)]


def _set_rng_states(states: list[torch.Tensor], cuda: list[int]) -> None:
    torch.set_rng_state(states[0])
    for d, state in zip(cuda, states[1:], strict=True):
        torch.cuda.set_rng_state(state, d)


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return model(**inputs)
    unpacked = isinstance(inputs, tuple) and not isinstance(inputs, PackedSequence)
    return model(*inputs) if unpacked else model(inputs)


def _watched_call(
    model: nn.Module, inputs: Any, records: list[SeedRecord], observed: list[list[str]]
) -> tuple[Any, list[str | None], list[bool]]:
    """``model(inputs)`` watching the seeds of ``records``, whose faults go to ``observed``
    (one list per seed, ``seed.observed_faults``): the output, per seed the fault it had in
    this call (None if none: a non-finite output is one, each seed's flag set before the
    forward and read after it, one transfer), and per seed whether it sat the call out (its
    kernel never ran: its slot sat it out, for a signed input shape this batch does not have or
    an output that does not fit, or the forward never reached the slot; or its kernel was
    called and returned nothing, with no fault: its program refused the input,
    ``KernelInputRefused``), where the host stood in for it: no measurement. A seed measured
    on no batch is refused by G5 (a slot only training reaches passed as "no effect")."""
    seeds = [r.seed for r in records]
    marks = [len(sink) for sink in observed]
    ran, returned = [False] * len(seeds), [False] * len(seeds)

    def calls(i: int, flags: list[bool]) -> Any:
        return lambda *_: flags.__setitem__(i, True)

    hooks = []
    try:
        for i, (seed, record) in enumerate(zip(seeds, records, strict=True)):
            try:
                hooks.append(seed.kernel.register_forward_pre_hook(calls(i, ran)))
                hooks.append(seed.kernel.register_forward_hook(calls(i, returned)))
            except RuntimeError:  # a scripted kernel takes no hook: its slot's are watched
                hooks.extend(_slot_ran(record.slot, i, ran, returned))
        for seed in seeds:
            seed.finite_flag.fill_(True)
        output = _call(model, inputs)
    finally:
        for hook in hooks:
            hook.remove()
    finite = read_flags([seed.finite_flag for seed in seeds])
    seen = [
        sink[-1] if len(sink) > mark else (None if ok else "nonfinite: non-finite output")
        for sink, mark, ok in zip(observed, marks, finite, strict=True)
    ]
    refused = [ran[i] and not returned[i] and seen[i] is None for i in range(len(seeds))]
    # Whatever kept its kernel from running (a sit-out its slot counted, a slot the forward
    # never reached: a branch not taken, an expert given no tokens), the host stood in.
    return output, seen, [not called or r for called, r in zip(ran, refused, strict=True)]


def _slot_ran(slot: nn.Module, i: int, ran: list[bool], returned: list[bool]) -> list[Any]:
    """Hooks that mark seed ``i`` as run when ``slot``'s forward ran without sitting its seeds
    out (for a kernel that takes no hook of its own): a slot never reached leaves it unmarked."""
    counts: list[int] = []

    def before(*_: Any) -> None:
        counts.append(slot.sat_out["seeds"])

    def after(*_: Any) -> None:
        if slot.sat_out["seeds"] == counts.pop():
            ran[i] = returned[i] = True

    return [slot.register_forward_pre_hook(before), slot.register_forward_hook(after)]


@contextmanager
def kernels_on_copies(seeds: Sequence[Any]) -> Iterator[None]:
    """The seeds' kernels run on copies of their buffers inside the block. A kernel exported in
    train mode writes its batch-norm statistics on every call, which ``eval()`` cannot stop:
    evaluated between a training forward and its backward, that write (and putting the values
    back) moved the versions that forward's graph saved, and the seed's backward raised, a
    fault charged to it by the manager's own measurement."""
    swapped = [
        (module, name, buffer)
        for seed in seeds
        for module in seed.kernel.modules()
        for name, buffer in module._buffers.items()
        if buffer is not None
    ]
    for module, name, buffer in swapped:
        module._buffers[name] = buffer.detach().clone()
    try:
        yield
    finally:
        for module, name, buffer in swapped:
            module._buffers[name] = buffer


def _value(result: torch.Tensor | float) -> float:
    if isinstance(result, torch.Tensor):
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
    # What ``for`` takes, as iter() finds it (``__iter__``, else ``__getitem__``: a map-style
    # Dataset of batches), not called: a DataLoader's iter() starts its workers and draws a seed.
    iterate = getattr(type(batches), "__iter__", getattr(type(batches), "__getitem__", None))
    if iterate is None or isinstance(batches, str | bytes):
        raise TypeError(f"batches must yield (inputs, targets), got {type(batches).__name__}")
    for name, fn in (("loss_fn", loss_fn), ("metric_fn", metric_fn)):
        if not callable(fn) and (fn is not None or name == "loss_fn"):
            raise TypeError(f"{name} must be callable(output, targets), got {type(fn).__name__}")
    live = [r for r in registry if r.stage in RUNS_KERNEL and r.seed.kernel is not None]
    if not live:
        return {}
    contributing = [r for r in live if _contributes(r)]
    position = {id(r): i for i, r in enumerate(live)}
    model = registry.model
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    cuda = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    saved_records = [(r, r.last_output, r.last_input) for r in registry]
    saved_probes = [(r.seed, r.seed.probe_result) for r in registry]
    saved_teacher = [(slot, slot._teacher_logits) for slot in registry.slots]
    saved_sat_out = [(slot.sat_out, dict(slot.sat_out)) for slot in registry.slots]
    for slot in registry.slots:
        slot._teacher_logits = None
    seeds = [r.seed for r in live]
    observed: list[list[str]] = [[] for _ in live]  # each seed's faults, seen and not counted
    faults = [0] * len(live)  # per seed: the batches it faulted on in the measuring forward
    last_fault = [""] * len(live)
    n_total = n_batches = n_empty = 0
    bad_metric: set[int] = set()  # the batches on which metric_fn was not finite
    # Per seed, over the batches it did not sit out: samples, loss and metric with it in place.
    n_seed, loss_with, metric_with = [0] * len(live), [0.0] * len(live), [0.0] * len(live)
    sat_out = [0] * len(live)  # per seed: the batches it sat out (not measured there)
    loss_with_all = metric_with_all = 0.0  # over every batch (for a seed measured on none)
    loss_without = {r.seed_id: 0.0 for r in contributing}
    metric_without = {r.seed_id: 0.0 for r in contributing}
    for seed, sink in zip(seeds, observed, strict=True):
        seed.observed_faults = sink
    try:
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
            torch.compiler.set_stance("force_eager"),
        ):
            for i_batch, batch in enumerate(batches, 1):
                inputs, targets = checked_pair(batch, i_batch)  # before any forward of it
                inputs, targets = moved(inputs, device), moved(targets, device)
                n = batch_size(inputs, targets)
                if n == 0:  # weight 0: its mean loss (0/0, NaN) would still poison the sums
                    n_empty += 1
                    continue
                n_total += n
                n_batches += 1
                # Every forward of the batch (and its loss) draws the same random numbers: a
                # host or loss that samples (dropout left on, a VAE, a diffusion loss's noise)
                # would otherwise measure each ablation on other draws than the seed's.
                draws = _rng_states(cuda)
                output, seen, sat = _watched_call(model, inputs, live, observed)
                for i, fault in enumerate(seen):
                    if fault is not None:
                        faults[i] += 1
                        last_fault[i] = fault
                loss = n * _value(loss_fn(output, targets))
                value = math.nan if metric_fn is None else _value(metric_fn(output, targets))
                if not math.isfinite(value) and metric_fn is not None:
                    bad_metric.add(n_batches)
                loss_with_all, metric_with_all = loss_with_all + loss, metric_with_all + n * value
                for i in range(len(live)):
                    if sat[i]:
                        sat_out[i] += 1
                    else:
                        n_seed[i], loss_with[i] = n_seed[i] + n, loss_with[i] + loss
                        metric_with[i] += n * value
                for record in contributing:
                    if sat[position[id(record)]]:
                        continue  # no ablation to compare with: the host stood in already
                    _set_rng_states(draws, cuda)
                    hooks = _ablate(record)
                    try:  # watched too: "the other seeds as they are" must hold
                        output, seen_without, _ = _watched_call(model, inputs, live, observed)
                    finally:
                        for hook in hooks:
                            hook.remove()
                    i = position[id(record)]
                    # Another seed that faults only with this one taken out: the counterfactual
                    # is not "the others as they are", and fails closed, as a fault would.
                    caused = (j for j, f in enumerate(seen_without) if f and not seen[j])
                    other = next((j for j in caused if j != i), None)
                    if other is not None and seen[i] is None:
                        faults[i] += 1
                        last_fault[i] = (
                            f"seed {live[other].seed_id} faulted with this seed taken out "
                            f"({seen_without[other]}): its counterfactual could not be measured"
                        )
                    loss_without[record.seed_id] += n * _value(loss_fn(output, targets))
                    if metric_fn is not None:
                        value = _value(metric_fn(output, targets))
                        metric_without[record.seed_id] += n * value
                        if not math.isfinite(value):
                            bad_metric.add(n_batches)
    finally:
        for seed in seeds:  # (their finite flags are buffers: kept_buffers put them back)
            seed.observed_faults = None
        for record, output, spec in saved_records:
            record.last_output, record.last_input = output, spec
        for seed, probe in saved_probes:
            seed.probe_result = probe
        for slot, logits in saved_teacher:
            slot._teacher_logits = logits
        for counts, before in saved_sat_out:  # the training's count: not the measurement's
            counts.clear()
            counts.update(before)
    if n_total == 0:
        given = f" (given {n_empty}, every one empty)" if n_empty else ""
        raise ValueError(f"evaluate_seeds needs at least one non-empty validation batch{given}")
    if bad_metric:
        logger.warning(
            "metric_fn was not finite on %d of %d validation batches: the measured metric is "
            "not finite, and G5 refuses the seeds measured with it",
            len(bad_metric),
            n_batches,
        )
    results: dict[str, SeedEvaluation] = {}
    for i, record in enumerate(live):
        sid = record.seed_id
        if sat_out[i]:
            logger.warning(
                "seed %s sat out %d of %d validation batches (its kernel did not run): measured "
                "on the others%s", sid, sat_out[i], n_batches,
                "" if n_seed[i] else "; on none, so G5 refuses it",
            )  # fmt: skip
        if not n_seed[i]:  # never measured: the host stood in on every batch
            faults[i], last_fault[i] = sat_out[i], "sat out every validation batch"
        samples = n_seed[i] or n_total  # (never measured: the host's loss on every batch)
        mean_loss = loss_with[i] / samples if n_seed[i] else loss_with_all / n_total
        mean_metric = metric_with[i] / samples if n_seed[i] else metric_with_all / n_total
        mean_metric = math.nan if metric_fn is None else mean_metric  # the one NaN, as before
        if faults[i]:
            logger.warning(
                "seed %s faulted on %d of %d validation batches while measured (last: %s): "
                "the host's output stood in for it, so G5 refuses it (not counted as a fault)",
                sid,
                faults[i],
                n_batches,
                last_fault[i],
            )
        without = loss_without[sid] / samples if sid in loss_without and n_seed[i] else mean_loss
        if metric_fn is None:
            metric_off = math.nan
        elif sid in metric_without and n_seed[i]:
            metric_off = metric_without[sid] / samples
        else:
            metric_off = mean_metric
        evaluation = SeedEvaluation(
            seed_id=sid,
            stage=record.stage,
            alpha=record.seed.alpha_value,
            loss_with=mean_loss,
            loss_without=without,
            metric_with=mean_metric,
            metric_without=metric_off,
            samples=samples,
            epoch=epoch,
            step=step,
            metric_given=metric_fn is not None,
            faults=faults[i],
            last_fault=last_fault[i],
        )
        record.seed.record_evaluation(evaluation)
        results[sid] = evaluation
        logger.info(
            "seed %s (%s): val loss %.5f with, %.5f without, benefit %+.4f; "
            "metric %.5f with, %.5f without",
            sid,
            record.stage.name,
            evaluation.loss_with,
            evaluation.loss_without,
            evaluation.benefit,
            evaluation.metric_with,
            evaluation.metric_without,
        )
    return results


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
