"""The KD teacher (docs/design.md §7): a frozen reduced-precision copy of a model, and timed
teacher forwards that survive an OOM."""

from __future__ import annotations

import copy
import itertools
import logging
import math
import sys
import threading
import time
import warnings
from collections import deque
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kasmina.kd.activation_peak import cuda_activation_peak, hooked_activation_peak
from kasmina.kd.holds import check_in_place, hold
from kasmina.utils.checks import check_real
from kasmina.utils.files import open_regular_file
from kasmina.utils.modules import hooks_held, rng_forked
from kasmina.utils.ratelimit import rarely
from kasmina.utils.state_io import cast_in_place

logger = logging.getLogger(__name__)

TeacherInput = torch.Tensor | Mapping[str, Any]  # a batch, or its keyword inputs (Hugging Face)

_TEACHER_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_FP32_BYTES = torch.empty((), dtype=torch.float32).element_size()


def is_oom_error(exc: BaseException) -> bool:
    """An allocator out-of-memory error, whatever the backend raised it as (CUDA's own class,
    or a ``RuntimeError``: "out of memory", the CPU allocator's "can't allocate memory")."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    message = str(exc).lower() if isinstance(exc, RuntimeError) else ""
    return "out of memory" in message or "can't allocate memory" in message


def _param_bytes(params: Iterable[torch.Tensor]) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def _logits_of(output: object) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise TypeError(
        f"the teacher must return a logits tensor (or an object with .logits), got "
        f"{type(output).__name__}"
    )


class CheckpointedTeacher:
    """A frozen teacher: eval mode, no gradients, optionally bf16/fp16.

    Its memory saving comes from the reduced precision alone: bf16/fp16 parameters and
    activations take half the bytes of fp32. Activation checkpointing would save nothing here —
    without autograd no activation is kept for a backward pass — so none is used.

    The model is deep-copied (``copy_model=True``: the caller's model is untouched) or taken over
    in place (``copy_model=False``: no transient second copy, for large teachers; ``ValueError``
    for a model another live teacher holds, or any memory under it, whose forwards its load and
    casts would break, and for what the packages above refuse, a live manager's model:
    ``kd.holds.check_in_place``, run here whoever builds it). Its
    parameters get ``requires_grad=False`` and are held as teacher-only until :meth:`close` or
    collection (:func:`is_teacher_parameter`, :meth:`teacher_parameters`): no optimizer takes
    them.
    ``checkpoint_path`` optionally loads a plain ``state_dict`` file first. ``replaces``: the
    teacher this one takes over from (a manager's next ``load_teacher``), whose model it may take
    in place; the caller closes that one once this one is built.

    ``forward`` runs under ``torch.inference_mode``, with a caller's autocast off (the teacher
    computes in its own dtype). Floating inputs are moved to the teacher's device and cast to
    its dtype, finite values past its range saturating at half of it (an fp32 mask at fp32's min
    stays finite, with room for the scores added to it; integer inputs such as token ids keep
    their dtype). Logits come
    back as ``output_dtype`` (fp32 by default; ``None`` keeps the teacher dtype) and as ordinary
    tensors, not inference tensors, so any loss may save them for its backward. This is not an
    ``nn.Module`` on purpose: assigning it to a student never registers the teacher's weights.
    """

    TRAIN_MODE_WARNING_EVERY = 100  # a forward finding train mode warns the first, every 100th

    def __init__(
        self,
        model: nn.Module,
        dtype: torch.dtype | None = torch.bfloat16,
        device: torch.device | str | None = None,
        *,
        copy_model: bool = True,
        output_dtype: torch.dtype | None = torch.float32,
        checkpoint_path: str | Path | None = None,
        replaces: CheckpointedTeacher | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"teacher must be an nn.Module, got {type(model).__name__}")
        for name, value in (("dtype", dtype), ("output_dtype", output_dtype)):
            if value is not None and value not in _TEACHER_DTYPES:
                raise ValueError(f"teacher {name} must be fp32, fp16, bf16 or None, got {value}")
        if not copy_model:  # what a package above guards (a live manager's model): refused
            check_in_place(model)  # here, so a teacher built without a manager is checked too
        teacher = copy.deepcopy(model) if copy_model else model
        self.teacher = teacher  # named by a refusal of another teacher while this one builds
        # Held first (a model another teacher holds in place is refused before anything
        # changes), and what the load and the cast leave held (either may make new parameters).
        params = list(teacher.parameters())
        self._release, undo = hold(params, self, replaces)
        try:
            if checkpoint_path is not None:
                _load_checked(teacher, Path(checkpoint_path), own=not copy_model)
            # The fp32 figure is counted on the model as given, before any cast.
            self.full_precision_parameter_bytes = _FP32_BYTES * sum(
                p.numel() for p in teacher.parameters()
            )
            if dtype is not None or device is not None:
                teacher.to(device=device, dtype=dtype)
            if [id(p) for p in teacher.parameters()] != [id(p) for p in params]:
                undo()
                self._release, undo = hold(list(teacher.parameters()), self, replaces)
        except BaseException:
            undo()
            raise
        teacher.eval()
        for param in teacher.parameters():
            param.requires_grad_(False)
        self.train_mode_count = 0  # forwards that found it in train mode
        self.output_dtype = output_dtype
        first = next(iter(teacher.parameters()), None)
        self.dtype = dtype or (first.dtype if first is not None else torch.float32)
        self.device = first.device if first is not None else torch.device(device or "cpu")
        # Held by every forward and by a measurement at another dtype, which casts the shared
        # teacher in place and back: a forward on another thread (``load_kernel_with_teacher``
        # runs one on a worker) would otherwise meet, or leave, a half-cast teacher.
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        model = self.teacher
        return f"CheckpointedTeacher of {type(model).__name__} (model id {id(model):#x})"

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_lock", "_release")}

    def __setstate__(self, state: dict) -> None:
        # A copy (``copy.deepcopy``, an unpickled teacher) has parameters of its own: teacher-only
        # as the original's are, or an optimizer would take them (a shallow copy is refused).
        self.__dict__.update(state, _lock=threading.RLock())
        self._release = hold(self.teacher_parameters(), self)[0]

    def close(self) -> None:
        """Let the model go (idempotent), once a forward in flight has ended: its parameters are
        no longer teacher-only, so an optimizer, or another teacher in place, may take them. The
        manager closes its teacher when it closes or loads another; a collected teacher lets go
        too. A closed teacher runs no forward or measurement (``RuntimeError``): its model, the
        caller's again, was set back to eval mode, and another teacher in place recast it."""
        with self._lock:
            self._release()

    @property
    def closed(self) -> bool:
        """Whether the teacher let its model go (``close``)."""
        return not self._release.alive

    def _require_open(self) -> None:
        if self.closed:
            raise RuntimeError(
                "this teacher is closed (close(), or its manager's close() or next "
                "load_teacher): its model is no longer held; load a new teacher"
            )

    def teacher_parameters(self) -> list[nn.Parameter]:
        """The frozen teacher-only parameters (to register with the optimizer manager)."""
        return list(self.teacher.parameters())

    def parameter_bytes(self) -> int:
        """Bytes the teacher's parameters take now, at the teacher dtype."""
        return _param_bytes(self.teacher.parameters())

    def __call__(self, input_batch: TeacherInput) -> torch.Tensor:
        return self.forward(input_batch)

    def forward(self, input_batch: TeacherInput) -> torch.Tensor:
        """Teacher logits for ``input_batch``; no autograd graph is ever recorded."""
        with self._lock:
            self._require_open()  # the model is the caller's again: left as it is
            self._in_eval()
            with torch.inference_mode():
                logits = self._run(input_batch)
        # Outside inference mode (a caller's too), so the result is an ordinary tensor.
        target = self.output_dtype or logits.dtype
        with torch.inference_mode(False):
            return logits.to(target) if logits.dtype != target else logits.clone()

    def _in_eval(self) -> None:
        """The teacher put back in eval where it was switched to train (a forward in train mode
        draws dropout and moves the batch-norm statistics the teacher is frozen at), with a
        warning, rarely: a loop's ``model.train()`` over a model holding it each step. Only its
        own mode is checked: a module an in-place teacher shares with a student follows the
        student's (switched here, the student would train on in eval)."""
        if self.teacher.training:
            self.train_mode_count += 1
            level = rarely(self.train_mode_count, self.TRAIN_MODE_WARNING_EVERY)
            msg = "teacher was switched to train mode (%d times); returning it to eval mode"
            logger.log(level, msg, self.train_mode_count)
            self.teacher.eval()

    def _run(self, input_batch: TeacherInput) -> torch.Tensor:
        """The teacher's logits for a tensor, or for a mapping of keyword inputs (a Hugging Face
        batch: ``input_ids`` with its ``attention_mask``, without which a left-padded row
        attends to its padding), each tensor on the teacher's device, floats in its dtype,
        computed in that dtype: a caller's ``torch.autocast`` (the natural place to ask for
        teacher logits) is off inside, or an fp16 autocast overflowed a bf16 teacher."""
        kind = self.device.type
        if torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind):
            with torch.autocast(kind, enabled=False):
                return self._run(input_batch)
        if isinstance(input_batch, Mapping):
            kwargs = {k: self._placed(v) if isinstance(v, torch.Tensor) else v
                      for k, v in input_batch.items()}  # fmt: skip
            return _logits_of(self.teacher(**kwargs))
        if not isinstance(input_batch, torch.Tensor):
            raise TypeError(
                f"input_batch must be a tensor or a mapping of keyword inputs, got "
                f"{type(input_batch).__name__}"
            )
        return _logits_of(self.teacher(self._placed(input_batch)))

    def _placed(self, t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point():
            t = t.to(device=self.device)
            big = torch.finfo(self.dtype).max
            if torch.finfo(t.dtype).max > big:  # saturated, not overflowed: an additive mask
                # at fp32's min became -inf in bf16, and a row it masks whole NaN. At half the
                # range, not its edge: fp16's -65504 plus a score below -16 overflowed again.
                # Every finite value is clamped, not only those past the range: a mask at
                # -65504 itself kept its place and overflowed, and the values between half the
                # range and the edge ranked below those past it (their order flipped).
                half = big / 2
                t = torch.where(t.isfinite(), t.clamp(-half, half), t)  # ±inf and NaN stay
            return t.to(dtype=self.dtype)
        return t.to(device=self.device)

    def measure_forward_peak_bytes(
        self, input_batch: TeacherInput, dtype: torch.dtype | None = None
    ) -> int:
        """Measured peak memory of one teacher forward at ``dtype`` (default: the teacher's).

        Peak = parameter bytes + the activation peak. On CUDA the activation peak is
        ``max_memory_allocated`` above the allocation before the forward (this resets the
        device's peak statistics). On CPU, which has no allocator statistics, it is the largest
        input+output bytes of any module call, captured by forward hooks: a lower bound of the
        true peak. For another dtype the teacher is cast in place for the measurement and cast
        back, so only a cast that holds every value exactly is allowed (to fp32 from bf16/fp16):
        one that would round a weight (fp32 to bf16, bf16 to fp16...) raises ``ValueError``.
        The forward draws on a forked RNG and runs none of the teacher's hooks.
        """
        with self._lock:  # no forward meets the teacher half-cast, nor reads its dtype so
            self._require_open()  # its casts would be of a model no longer held
            # Its own dtype is measured whatever it is (``dtype=None`` keeps a float64 model's,
            # whose measurement was refused for a dtype the caller never named); only a cast's
            # target must be one a teacher takes.
            target = self.dtype if dtype is None else dtype
            if target != self.dtype and target not in _TEACHER_DTYPES:
                raise ValueError(f"dtype must be fp32, fp16 or bf16, got {target}")
            self._in_eval()  # the forward measured is the one KD runs
            return self._measure(input_batch, target)

    def _measure(self, input_batch: TeacherInput, target: torch.dtype) -> int:
        own_dtype = self.dtype
        cast = target != own_dtype
        saved = _floating_dtypes(self.teacher)
        exact = {target} | ({torch.float16, torch.bfloat16} if target == torch.float32 else set())
        lossy = sorted({str(d) for d in saved.values()} - {str(d) for d in exact})
        if cast and lossy:
            raise ValueError(
                f"measuring at {target} would round the teacher's {', '.join(lossy)} tensors "
                "for good; measure at its own dtype or at float32"
            )
        try:
            if cast:  # through ``.data``, as it is cast back: the teacher keeps its tensor
                # objects, held teacher-only (``module.to`` makes new ones under torch's
                # ``set_overwrite_module_params_on_conversion``, which no hold covered)
                cast_in_place(self.teacher, dict.fromkeys(saved, target))
                self.dtype = target
            run = lambda: self._run(input_batch)  # noqa: E731
            # As every measurement: the caller's RNG stream unmoved (a teacher drawing in eval
            # mode shifted the run's data order and dropout) and no hook of the teacher's run.
            with torch.inference_mode(), rng_forked(self.device), hooks_held(self.teacher):
                if self.device.type == "cuda":
                    activations = cuda_activation_peak(self.device, run)
                else:
                    activations = hooked_activation_peak(self.teacher, run)
            return self.parameter_bytes() + activations
        finally:
            if cast:
                cast_in_place(self.teacher, saved)
                self.dtype = own_dtype


def _load_checked(teacher: nn.Module, path: Path, own: bool) -> None:
    """Load the ``state_dict`` file at ``path`` into ``teacher`` (strict), ``ValueError`` naming
    the file when it cannot be read or does not fit. ``load_state_dict`` copies what matches
    before it raises for what does not, so into the caller's ``own`` model (``copy_model=False``)
    it loads a clone on the meta device first (torch's own checks and hooks, no bytes copied),
    or for a model that cannot be cloned so (lazy parameters) a plain deep copy."""
    try:  # a FIFO or a device is refused at once, never blocked on
        with open_regular_file(path, what="teacher checkpoint") as handle:
            state = torch.load(handle, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # a truncated or foreign file: torch's reader or the unpickler
        raise ValueError(f"teacher checkpoint {path} cannot be read: {exc}") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state_dict")
    try:
        trial = (_meta_clone(teacher) or _full_clone(teacher)) if own else None
        if trial is not None:
            with warnings.catch_warnings():  # "copying to a meta parameter is a no-op": meant
                warnings.simplefilter("ignore", UserWarning)
                trial.load_state_dict(state)
        teacher.load_state_dict(state)
    except (RuntimeError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ValueError(
            f"teacher checkpoint {path} does not fit the teacher model, nothing loaded: "
            f"{' '.join(str(exc).split())[:400]}"
        ) from None


def _full_clone(model: nn.Module) -> nn.Module | None:
    """``model`` deep-copied as it is (its memory twice, for the load's trial only), or None: a
    model with lazy parameters, which no meta clone can hold."""
    try:
        return copy.deepcopy(model)
    except Exception:  # a module that does not deep-copy: loaded directly, as before
        return None


def _meta_clone(model: nn.Module) -> nn.Module | None:
    """``model`` deep-copied with every parameter and buffer on the meta device, or None."""
    memo: dict[int, object] = {}
    try:
        for t in itertools.chain(model.parameters(), model.buffers()):
            meta = torch.empty_like(t, device="meta")
            is_param = isinstance(t, nn.Parameter)
            memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if is_param else meta
        return copy.deepcopy(model, memo)
    except Exception:  # lazy parameters, a module that does not deep-copy
        return None


def _floating_dtypes(module: nn.Module) -> dict[str, torch.dtype]:
    tensors = [*module.named_parameters(), *module.named_buffers()]
    return {name: t.dtype for name, t in tensors if t.is_floating_point()}


def _without_tracebacks(exc: BaseException) -> BaseException:
    """``exc`` with its traceback and those of the exceptions it chains cleared. Kept, they
    would hold the failed forward's frames (and activations) through a cycle with the caller's
    frame until the next collection, so the cache could not be emptied of them."""
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        link.__traceback__ = None
        link = link.__cause__ or link.__context__
    return exc


class TeacherForwardPassManager:
    """Timed teacher forwards that never stop training (docs/design.md §7).

    Each forward is timed: CUDA events on a GPU (read back lazily on later calls, so a step
    never waits on the device for its own timing), ``perf_counter`` on CPU. A forward slower
    than ``budget_ms`` logs a warning (the first, then every 100th). An out-of-memory error skips
    KD for that step: ``None`` is returned, the CUDA cache is emptied, ``oom_count`` goes up and
    the caller trains on (an ERROR the first, then every 100th time). Any other error
    propagates: a broken teacher is a bug, not a budget.

    With ``profile_memory`` (default) the first successful forward's batch is also used to
    measure the teacher's peak forward memory at its own precision and at fp32
    (:meth:`profile_memory`); that costs one extra forward of each kind, once.
    """

    SLOW_WARNING_EVERY = 100
    OOM_LOG_EVERY = 100  # an OOM is logged at ERROR the first and every this-many-th time

    def __init__(
        self,
        teacher: CheckpointedTeacher | None,
        budget_ms: float = 10.0,
        *,
        profile_memory: bool = True,
    ) -> None:
        if teacher is not None and not isinstance(teacher, CheckpointedTeacher):
            raise TypeError(f"teacher must be a CheckpointedTeacher, got {type(teacher).__name__}")
        # A real number (a str raised a bare TypeError from ``>``, a bool passed as 1 ms); an
        # infinite budget is kept (no forward is ever slow), an int past a float's range not.
        budget = check_real("budget_ms", budget_ms)
        if not (budget > 0 and (budget == math.inf or budget <= sys.float_info.max)):
            raise ValueError(f"budget_ms must be > 0, got {budget_ms!r:.40}")
        self.checkpointed_teacher = teacher
        self.budget_ms = float(budget)
        self.auto_profile = profile_memory
        self.oom_count = 0
        self.slow_count = 0
        self._count = 0
        self._mean = 0.0
        self._m2 = 0.0
        self._max = 0.0
        self._pending: deque[tuple[torch.cuda.Event, torch.cuda.Event]] = deque()
        self._memory: dict[str, float] | None = None
        self._profiling = threading.Lock()
        # One thread reads the pending CUDA timings at a time: a reader of the figures (which
        # waits on the device) and the training thread's next forward took the same oldest one.
        self._timing = threading.Lock()

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_profiling", "_timing")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _profiling=threading.Lock(), _timing=threading.Lock())

    def get_teacher_predictions(self, input_batch: TeacherInput) -> torch.Tensor | None:
        """Teacher logits for ``input_batch``, or ``None`` (no teacher, or OOM: skip KD)."""
        teacher = self.checkpointed_teacher
        if teacher is None:
            return None
        on_cuda = teacher.device.type == "cuda"
        failed: BaseException | None = None
        try:
            if on_cuda:
                self._drain(block=False)
                # On the teacher's device's stream, which need not be the current device's.
                stream = torch.cuda.current_stream(teacher.device)
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record(stream)
                logits = teacher.forward(input_batch)
                end.record(stream)
                self._pending.append((start, end))
            else:
                began = time.perf_counter()
                logits = teacher.forward(input_batch)
                self._record((time.perf_counter() - began) * 1e3)
        except Exception as exc:
            if not is_oom_error(exc):
                raise
            failed = _without_tracebacks(exc)
        if failed is not None:
            # Outside the except block, whose handled exception also pins the frames.
            self._after_oom(failed, on_cuda)
            return None
        if self.auto_profile and self._memory is None:
            self._auto_profile(input_batch)
        return logits

    def _auto_profile(self, input_batch: TeacherInput) -> None:
        """The first forward's memory profile, a measurement that must never stop training: a
        second forward beside the logits just computed may run out of memory (or fail), and
        then the peaks are recorded as not measured (NaN), once, with a warning. One thread
        profiles; another that finds it under way goes on without waiting."""
        if not self._profiling.acquire(blocking=False):
            return
        try:
            if self._memory is None:
                self.profile_memory(input_batch)
        except Exception as exc:
            reason = "ran out of memory" if is_oom_error(exc) else f"failed: {exc!r}"
            logger.warning("the teacher's memory profile %s; its peaks are not measured", reason)
            self._memory = {
                "peak_forward_bytes_full": math.nan,
                "peak_forward_bytes_reduced": math.nan,
            }
            teacher = self.checkpointed_teacher
            if teacher is not None and teacher.device.type == "cuda":
                torch.cuda.empty_cache()
        finally:
            self._profiling.release()

    def _after_oom(self, exc: BaseException, on_cuda: bool) -> None:
        self.oom_count += 1
        msg = "teacher forward ran out of memory; KD skipped for this step (%d OOMs): %s"
        level = rarely(self.oom_count, self.OOM_LOG_EVERY, logging.ERROR)
        logger.log(level, msg, self.oom_count, exc)
        if on_cuda:
            torch.cuda.empty_cache()

    def _record(self, elapsed_ms: float) -> None:
        self._count += 1
        delta = elapsed_ms - self._mean
        self._mean += delta / self._count
        self._m2 += delta * (elapsed_ms - self._mean)
        self._max = max(self._max, elapsed_ms)
        if elapsed_ms > self.budget_ms:
            self.slow_count += 1
            msg = "teacher forward took %.2f ms, above the %.2f ms budget (%d slow of %d)"
            args = (elapsed_ms, self.budget_ms, self.slow_count, self._count)
            logger.log(rarely(self.slow_count, self.SLOW_WARNING_EVERY), msg, *args)

    def _drain(self, block: bool) -> None:
        # Not blocking: a forward never waits for another thread's read, which takes them all.
        if not self._timing.acquire(blocking=block):
            return
        try:
            while self._pending:
                start, end = self._pending[0]
                if not block and not end.query():
                    return
                end.synchronize()
                self._pending.popleft()
                self._record(start.elapsed_time(end))
        finally:
            self._timing.release()

    def profile_memory(self, input_batch: TeacherInput) -> dict[str, float]:
        """Measure the peak forward memory at the teacher's precision and at fp32, once.

        An OOM while measuring fp32 is itself the answer (fp32 does not fit); that or any other
        failure of the fp32 run is recorded as NaN with a warning and the reduced figure stands.
        A float64 teacher (``dtype=None`` on a float64 model) is measured at its own dtype; its
        fp32 figure is NaN, since casting it to fp32 and back would round its weights.
        """
        teacher = self.checkpointed_teacher
        if teacher is None:
            raise ValueError("no teacher to profile")
        with teacher._lock:  # both at the teacher's own dtype, read once
            return self._profile(teacher, input_batch)

    def _profile(self, teacher: CheckpointedTeacher, input_batch: TeacherInput) -> dict[str, float]:
        reduced = float(teacher.measure_forward_peak_bytes(input_batch))
        full = reduced
        if teacher.dtype not in _TEACHER_DTYPES:  # wider than fp32 (float64): a cast to fp32
            full = math.nan  # would round its weights for good, so that peak is not measured
        elif teacher.dtype != torch.float32:
            try:
                full = float(teacher.measure_forward_peak_bytes(input_batch, torch.float32))
            except Exception as exc:  # a measurement must never stop training
                full = math.nan
                reason = "does not fit in memory" if is_oom_error(exc) else f"failed: {exc!r}"
                logger.warning("the fp32 teacher forward %s; its peak is not measured", reason)
                if teacher.device.type == "cuda":
                    torch.cuda.empty_cache()
        self._memory = {"peak_forward_bytes_full": full, "peak_forward_bytes_reduced": reduced}
        return dict(self._memory)

    def get_checkpoint_effectiveness(self) -> dict[str, float]:
        """Measured memory and overhead figures (no assumed constants; NaN = not measured yet).

        ``param_bytes_full`` counts the original model's parameters at fp32;
        ``param_bytes_reduced`` the teacher's parameters as held. Peak figures come from
        :meth:`profile_memory` (``memory_measured_on_cuda`` says which method measured them).
        Forward times are in ms over every timed forward (population std).
        """
        self._drain(block=True)
        teacher = self.checkpointed_teacher
        nan = math.nan
        full_params = float(teacher.full_precision_parameter_bytes) if teacher else nan
        reduced_params = float(teacher.parameter_bytes()) if teacher else nan
        memory = self._memory or {}
        peak_full = memory.get("peak_forward_bytes_full", nan)
        peak_reduced = memory.get("peak_forward_bytes_reduced", nan)
        mean = self._mean if self._count else nan
        return {
            "param_bytes_full": full_params,
            "param_bytes_reduced": reduced_params,
            "param_bytes_saved": full_params - reduced_params,
            "param_memory_ratio": _ratio(reduced_params, full_params),
            "peak_forward_bytes_full": peak_full,
            "peak_forward_bytes_reduced": peak_reduced,
            "peak_memory_saved": peak_full - peak_reduced,
            "peak_memory_ratio": _ratio(peak_reduced, peak_full),
            "memory_measured_on_cuda": float(teacher is not None and teacher.device.type == "cuda"),
            "forward_ms_mean": mean,
            "forward_ms_std": math.sqrt(self._m2 / self._count) if self._count else nan,
            "forward_ms_max": self._max if self._count else nan,
            "forwards": float(self._count),
            "slow_forwards": float(self.slow_count),
            "budget_ms": self.budget_ms,
            "within_budget": float(mean <= self.budget_ms) if self._count else nan,
            "ooms": float(self.oom_count),
        }


def _ratio(part: float, whole: float) -> float:
    return part / whole if whole and not math.isnan(whole) else math.nan
