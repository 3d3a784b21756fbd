"""The KD losses over the fused ``kd_kl_loss``: a module for trainers, and the one helper
that seeds and slots use to distil a seed's output (``kd.graph`` sums what they collected).

Both also take a linear head instead of logits: given the student's hidden states and the head's
weight (and bias), they run ``fused_linear_kd_loss``, which never forms the ``[rows, V]`` logits
(docs/design.md §2, §7); the teacher may then be logits or its own hidden states and head."""

from __future__ import annotations

import math

import torch
from torch import nn

from kasmina.kd.config import KDConfig
from kasmina.kd.graph import mark_cut
from kasmina.ops.backend import SUPPORTED_DTYPES, through_dispatcher
from kasmina.ops.fused_linear_kd import fused_linear_kd_loss, head_factor
from kasmina.ops.kd_loss import kd_kl_loss
from kasmina.ops.kd_oracle import kd_kl_loss_reference
from kasmina.ops.transforms import functorch_active, in_compiled_transform
from kasmina.utils.checks import check_positive_int

__all__ = [
    "PendingKDLosses",
    "StaticKDLoss",
    "checked_teacher_logits",
    "kd_head_problem",
    "seed_kd_loss",
    "slot_kd_loss",
    "teacher_fit_problem",
    "teacher_shape_problem",
]


class StaticKDLoss(nn.Module):
    """KD loss at a fixed temperature: ``T²·KL(softmax(t/T) ‖ softmax(s/T))`` via ``kd_kl_loss``.

    The teacher logits are detached (the teacher never gets a gradient); the student's gradient
    is kept, so the loss trains whatever produced ``student_logits``. They are read as
    ``seed_kd_loss`` reads them: a row holding a NaN or ``+inf``, or only ``-inf``, is masked
    (beside the rows ``mask`` drops), float64 logits are read in fp32, and float64 student and
    teacher logits take the float64 reference.

    Head path: ``forward(hidden, teacher_logits, student_weight=W)`` (optionally
    ``student_bias``, and ``teacher_hidden``/``teacher_weight``/``teacher_bias`` instead of
    ``teacher_logits``) computes the same loss of ``hidden @ W.T + bias`` with
    ``fused_linear_kd_loss``, chunked so the logits never exist. The heads' logit scale and
    soft-cap, and ``chunk_rows``, are fixed and checked at construction (None: none, default
    chunking; anything but a positive number, or a positive int for ``chunk_rows``, is a
    ``ValueError``); the scale and soft-cap apply to the heads only, so with them set, logits
    raise ``ValueError``. Under ``torch.autocast`` hidden states of another dtype than their
    head are cast to the head's, as the slots' KD does (the ``[V, H]`` head is never copied).
    """

    def __init__(
        self,
        temperature: float = 1.0,
        reduction: str = "batchmean",
        *,
        chunk_rows: int | None = None,
        student_logit_scale: float | None = None,
        teacher_logit_scale: float | None = None,
        student_softcap: float | None = None,
        teacher_softcap: float | None = None,
    ) -> None:
        super().__init__()
        checked = KDConfig(temperature=temperature, reduction=reduction)  # the one validation
        self.temperature = float(checked.temperature)
        self.reduction = checked.reduction
        shaping = {
            "student_logit_scale": student_logit_scale,
            "teacher_logit_scale": teacher_logit_scale,
            "student_softcap": student_softcap,
            "teacher_softcap": teacher_softcap,
        }  # each checked now, as fused_linear_kd_loss would at the first forward
        self.head_options: dict[str, float | int | None] = {
            "chunk_rows": None
            if chunk_rows is None
            else check_positive_int("chunk_rows", chunk_rows),
            **{k: head_factor(k, v) for k, v in shaping.items()},
        }

    @classmethod
    def from_config(cls, config: KDConfig) -> StaticKDLoss:
        if not isinstance(config, KDConfig):
            raise TypeError(f"from_config takes a KDConfig, got {type(config).__name__}")
        return cls(temperature=config.temperature, reduction=config.reduction)

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        *,
        student_weight: torch.Tensor | None = None,
        student_bias: torch.Tensor | None = None,
        teacher_hidden: torch.Tensor | None = None,
        teacher_weight: torch.Tensor | None = None,
        teacher_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``student_logits`` are logits, or hidden states when ``student_weight`` is given."""
        if student_weight is None:
            heads = (teacher_hidden, teacher_weight, teacher_bias, student_bias)
            if not isinstance(teacher_logits, torch.Tensor) or any(t is not None for t in heads):
                raise ValueError(
                    "without student_weight, pass logits: teacher_logits (no hidden, weight or "
                    f"bias), got teacher_logits of {type(teacher_logits).__name__}"
                )
            opts = self.head_options
            shaped = [k for k, v in opts.items() if v is not None and k != "chunk_rows"]
            if shaped:  # they shape a head's logits; given logits are taken as they are
                raise ValueError(f"{', '.join(shaped)} apply to a head: pass student_weight")
            return _taught_loss(
                student_logits, teacher_logits, self.temperature, self.reduction, mask
            )
        if torch.is_autocast_enabled(student_logits.device.type):  # as the slots' KD does:
            student_logits = student_logits.to(student_weight.dtype)  # the hidden, not the head
            if teacher_hidden is not None and teacher_weight is not None:
                teacher_hidden = teacher_hidden.to(teacher_weight.dtype)
        if teacher_logits is not None and all(
            t is None for t in (teacher_hidden, teacher_weight, teacher_bias)
        ):
            return _taught_loss(
                student_logits,
                teacher_logits,
                self.temperature,
                self.reduction,
                mask,
                head_weight=student_weight,
                head_bias=student_bias,
                **self.head_options,
            )
        return fused_linear_kd_loss(
            student_logits,
            student_weight,
            teacher_logits,
            teacher_hidden=teacher_hidden,
            teacher_weight=teacher_weight,
            student_bias=student_bias,
            teacher_bias=teacher_bias,
            temperature=self.temperature,
            reduction=self.reduction,
            mask=mask,
            **self.head_options,  # type: ignore[arg-type]
        )

    def extra_repr(self) -> str:
        head = "".join(f", {k}={v}" for k, v in self.head_options.items() if v is not None)
        return f"temperature={self.temperature}, reduction={self.reduction!r}{head}"


def seed_kd_loss(
    config: KDConfig,
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    head_weight: torch.Tensor | None = None,
    head_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``kd_kl_loss`` of a seed-path student against detached teacher logits.

    With ``head_weight`` (``[V, H]``, and ``head_bias``), ``student`` is hidden states
    ``[..., H]`` that the head maps to logits: the loss is then ``fused_linear_kd_loss``, which
    never forms them.

    A teacher row that holds a NaN or a ``+inf`` (an fp16 teacher's overflow), or is all
    ``-inf``, teaches nothing: it is masked (as ``mask`` drops a row), found on the device by
    its maximum (one reduction that propagates NaN, no logits-sized temporary, no host sync), so
    one bad logit cannot turn every distilling seed's gradient into NaN. On eager CPU tensors a
    finite sum of the logits (read on the host, free there) passes no mask at all: the masked
    CPU path costs more. A ``-inf`` logit
    among finite ones is a class the teacher rules out (probability 0, as ``kd_kl_loss``
    defines it): its row still teaches. A float64 student (a slot of an fp64 model, in a
    gradient check) takes the float64 reference, differentiable by autograd; a float64
    teacher of a narrower student is read in fp32, as the kernel reads the others.
    ``StaticKDLoss`` computes its loss the same way."""
    return _taught_loss(
        student,
        teacher,
        config.temperature,
        config.reduction,
        None,
        head_weight=head_weight,
        head_bias=head_bias,
    )


def _taught_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float,
    reduction: str,
    mask: torch.Tensor | None,
    *,
    head_weight: torch.Tensor | None = None,
    head_bias: torch.Tensor | None = None,
    **head_options: float | int | None,
) -> torch.Tensor:
    """``seed_kd_loss``'s loss at ``temperature`` and ``reduction``, the rows ``mask`` drops
    (a bool tensor of the teacher's leading dims, or None) dropped too; ``head_options`` go to
    ``fused_linear_kd_loss`` with the head."""
    if problem := dense_float_problem(teacher):  # a stand-alone seed's, never checked before
        raise ValueError(f"teacher logits must be a dense floating-point tensor, got {problem}")
    teacher = teacher.detach()
    if teacher.dim() == 0 or teacher.shape[-1] == 0:
        raise ValueError(f"teacher logits need a non-empty last dim, got {tuple(teacher.shape)}")
    if teacher.dtype == torch.float64 and (
        head_weight is not None or student.dtype != teacher.dtype
    ):
        teacher = teacher.float()  # first: a row finite in fp64 only is masked as bad
    if head_weight is None and teacher.shape != student.shape:
        raise ValueError(
            f"teacher logits of shape {tuple(teacher.shape)} do not match the student's "
            f"{tuple(student.shape)}"
        )
    rows_ok = _rows_to_keep(teacher, mask)
    if head_weight is None:
        if head_bias is not None:
            raise ValueError("head_bias needs head_weight")
        if student.dtype == torch.float64:
            return kd_kl_loss_reference(student, teacher, temperature, reduction, rows_ok)
        return kd_kl_loss(student, teacher, temperature, reduction, rows_ok)
    return fused_linear_kd_loss(
        student,
        head_weight,
        teacher,
        student_bias=head_bias,
        temperature=temperature,
        reduction=reduction,
        mask=rows_ok,
        **head_options,  # type: ignore[arg-type]
    )


def _rows_to_keep(teacher: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
    """The mask of the rows that teach: ``teacher``'s rows whose maximum is finite, and of them
    those ``mask`` keeps. None where no mask is given and every row is fine, found on the host
    where reading the logits is free (eager CPU tensors): the loss without a mask costs less
    on the CPU path (the masked one makes two logits-sized passes more). Elsewhere the mask is
    always formed: on an accelerator a read would sync, and under ``torch.compile``, tracing,
    a faking mode or a ``torch.func`` transform a branch on the data cannot be taken."""
    readable = teacher.device.type == "cpu" and not through_dispatcher() and not functorch_active()
    wide = torch.float32 if teacher.dtype == torch.float16 else None  # fp16 sums overflow early
    if mask is None and readable and math.isfinite(teacher.sum(dtype=wide)):
        return None  # a finite sum: no NaN or infinity anywhere (one cheap pass, no temporary)
    rows_ok = teacher.amax(-1).isfinite()
    if mask is not None:  # checked first: ``&`` would broadcast a mask of another shape
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise ValueError("mask must be a bool tensor")
        if mask.shape != rows_ok.shape or mask.device != rows_ok.device:
            raise ValueError(
                f"mask {tuple(mask.shape)} on {mask.device} must equal the teacher logits' "
                f"leading dims {tuple(rows_ok.shape)} on {rows_ok.device}"
            )
        return rows_ok & mask
    # The sum overflowed, or a -inf among finite logits: rows that still teach.
    return None if readable and bool(rows_ok.all()) else rows_ok


def slot_kd_loss(
    config: KDConfig,
    full: torch.Tensor,
    students: list[torch.Tensor | None],
    teacher: torch.Tensor,
    chunk_size: int,
    dim: int,
    ok: torch.Tensor | None,
    host: torch.Tensor,
    head: tuple[torch.Tensor, torch.Tensor | None] | None,
) -> torch.Tensor:
    """A slot's KD loss for one call: ``full`` is its output (chunks of ``chunk_size`` along
    ``dim``), ``students[k]`` seed k's output when it distils (else None), ``ok`` the chunks'
    finiteness (None: all finite), ``host`` the host's output and ``head`` the slot's KD head.

    The student is ``full`` with every chunk that does not distil detached, so the KD gradient
    reaches the seeds that are training and nothing else; a non-finite chunk is the host's
    here too, so no NaN enters rows the seeds share. The head is read detached: the seeds'
    loss trains the seeds alone; a student of another dtype than the head (autocast) is cast to
    the head's. ``ValueError`` when the teacher does not fit the student."""
    pieces = full.split(chunk_size, dim=dim)
    student = torch.cat(
        [p.detach() if s is None else s for p, s in zip(pieces, students, strict=True)], dim=dim
    )
    if ok is not None:
        shape = [-1 if i == dim else 1 for i in range(student.dim())]
        keep = ok.repeat_interleave(chunk_size).view(shape)
        student = torch.where(keep, student, host.detach())  # one op for every chunk
    weight, bias = (None, None) if head is None else head
    if weight is not None and student.dtype != weight.dtype:
        # Under autocast (or a half model with a float32 head) the slot's output is not the
        # head's dtype: the hidden-sized student is cast (autograd casts its gradient back),
        # never the [V, H] head.
        student = student.to(weight.dtype)
    loss = seed_kd_loss(
        config,
        student,
        teacher,
        head_weight=None if weight is None else weight.detach(),
        head_bias=None if bias is None else bias.detach(),
    )
    mark_cut(loss, students)  # its graph meets the shared one at the students only
    return loss


def teacher_shape_problem(
    output: torch.Size, teacher: torch.Tensor, head: tuple[torch.Tensor, object] | None
) -> str | None:
    """Why ``teacher`` logits do not fit a slot call whose output has the shape ``output``
    (the student's; through the slot's KD ``head``, logits ``[..., V]`` for ``[..., H]``), or
    None: a module called with other shapes in one forward distils only the call they fit."""
    want = tuple(output) if head is None else (*output[:-1], int(head[0].shape[0]))
    if tuple(teacher.shape) == want:
        return None
    through = "" if head is None else f" (the KD head's logits of {tuple(output)})"
    return f"teacher logits {tuple(teacher.shape)} do not fit {want}{through}"


def teacher_fit_problem(
    output: torch.Tensor, teacher: torch.Tensor, head: tuple[torch.Tensor, object] | None
) -> str | None:
    """``teacher_shape_problem`` for the student ``output``, or that the logits or the head
    are on another device than it (a model moved after they were handed over): the call sits
    out, the host's forward never raises. Logits handed to the slot's call itself
    (``slot(x, teacher_logits=...)``) were not checked at a hand-over: anything but a dense
    floating-point tensor sits out here."""
    if reason := dense_float_problem(teacher):
        return f"teacher logits are not a dense floating-point tensor ({reason})"
    problem = teacher_shape_problem(output.shape, teacher, head)
    if problem is None and head is not None and torch.float64 in (output.dtype, head[0].dtype):
        # A model converted after ``set_kd_head`` (``double()`` for a gradient check): the
        # fused head takes fp32 and 16-bit students only.
        problem = "a float64 student or KD head: the fused KD head takes fp32, fp16 or bf16"
    for what, tensor in (("teacher logits", teacher), ("the KD head", head and head[0])):
        if problem is None and isinstance(tensor, torch.Tensor) and tensor.device != output.device:
            problem = f"{what} on {tensor.device}, the output on {output.device}"
    return problem


def dense_float_problem(teacher: object) -> str:
    """Why ``teacher`` is not a dense (strided) tensor of a dtype the KD op reads (fp16, bf16,
    fp32, fp64), or "": a sparse, nested or float8 one passed a dtype check and then failed
    inside the KD op, in the user's forward."""
    if not isinstance(teacher, torch.Tensor):
        return type(teacher).__name__
    if teacher.is_nested:
        return "a nested tensor"
    if teacher.layout != torch.strided:
        return f"layout {teacher.layout}"
    if teacher.dtype not in _TEACHER_DTYPES:
        return str(teacher.dtype)
    return ""


_TEACHER_DTYPES = (*SUPPORTED_DTYPES, torch.float64)  # fp64: read in fp32


def checked_teacher_logits(
    teacher: object, device: torch.device | None = None
) -> torch.Tensor | None:
    """Teacher logits as a slot keeps them: None stays None; a floating-point tensor with a
    last (vocabulary) dimension, moved to the slot's ``device`` when it is elsewhere (a teacher
    on its own GPU, ``load_teacher(device=...)``); anything else, or meta-device logits (no
    values) for a slot that is not on the meta device itself, a ``ValueError`` at hand-over,
    never at the next forward. Without a ``device`` only the tensor itself is checked.

    Logits a teacher made under ``torch.inference_mode()`` are copied out of it here, once, on
    the slot's device: autograd refuses to save an inference tensor, and a compiled forward
    cannot copy one itself (TorchDynamo cannot trace the test), so such logits made the user's
    compiled model raise where the eager one trained (``saveable`` copies them in eager)."""
    if teacher is None:
        return None
    if problem := dense_float_problem(teacher):
        raise ValueError(f"teacher_logits must be a dense floating-point tensor, got {problem}")
    assert isinstance(teacher, torch.Tensor)
    if teacher.dim() == 0:
        raise ValueError(f"teacher_logits need a last (vocabulary) dim, got {teacher!r:.60}")
    if device is None:
        return teacher
    if teacher.device == device:
        # Inside a compiled torch.func transform the test cannot be traced (nor a copy made);
        # elsewhere while compiling, it breaks the graph and the copy is made eagerly.
        if in_compiled_transform() or not teacher.is_inference():
            return teacher
        with torch.inference_mode(False):
            return teacher.clone()
    if teacher.is_meta:
        raise ValueError(f"teacher_logits on the meta device hold no values for a {device} slot")
    # Non-blocking only into an accelerator: a copy to the CPU would return before the data
    # is there, and the CPU's KD op would read logits the GPU has not written yet. Out of
    # inference mode: a hand-over inside ``torch.inference_mode()`` made the copy an inference
    # tensor, which a compiled model cannot save.
    with torch.inference_mode(False):
        return teacher.to(device, non_blocking=device.type != "cpu")


def kd_head_problem(
    weight: object, bias: object, width: int, device: torch.device | None = None
) -> str | None:
    """Why ``weight`` (``[V, H]``) and ``bias`` (``[V]`` or None) cannot map an output whose
    last dimension is ``width`` wide to logits, or None when they can: a float32, float16 or
    bfloat16 weight on the slot's ``device``, and a bias of the weight's dtype and device."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.shape[0]:
        return "a KD head weight is a [V, H] tensor, V >= 1"
    if weight.shape[1] != width:
        return f"a KD head over a {width}-wide output needs H = {width}, got {tuple(weight.shape)}"
    if weight.dtype not in SUPPORTED_DTYPES:
        return f"a KD head weight must be float32, float16 or bfloat16, got {weight.dtype}"
    if device is not None and weight.device != device:
        return f"a KD head weight must be on the slot's device {device}, got {weight.device}"
    if bias is None:
        return None
    if not isinstance(bias, torch.Tensor) or bias.shape != weight[:, 0].shape:
        return f"a KD head bias is [{weight.shape[0]}], got {bias!r:.60}"
    if bias.dtype != weight.dtype:
        return f"a KD head bias needs the weight's dtype {weight.dtype}, got {bias.dtype}"
    if bias.device != weight.device:
        return f"a KD head bias needs the weight's device {weight.device}, got {bias.device}"
    return None


class PendingKDLosses(list):  # type: ignore[type-arg]
    """A slot's KD losses waiting for a collect, and how many of them it has already reported
    as left uncollected: a forward loop that never collects reports each loss once, not once
    per later forward (the count grew with the square of the forwards)."""

    reported = 0

    def newly_uncollected(self) -> int:
        """How many losses became uncollected since the last call or ``clear``."""
        new, self.reported = len(self) - self.reported, len(self)
        return new

    def clear(self) -> None:
        super().clear()
        self.reported = 0
