"""A host module's output as a slot sees it: which tensor the seeds apply to, along which
dimension and how wide (as far as the module declares it), and putting the result back.

A host's forward may return a tensor, a tuple or list (an attention module's ``(output,
weights)``), a namedtuple, a dataclass such as a Hugging Face ``ModelOutput``, or a dict (all its
values in order, None included: a ``ModelOutput`` skips its None fields, so a key set to None
in one mode alone would move the index). The seeds apply to the element at the slot's
``output_index``; everything else passes through untouched,
and the output keeps its type.

A nested (ragged) tensor reaches a slot from ``nn.TransformerEncoder``'s inference path with a
padding mask: the encoder packs its batch when its *first* layer can take the fused path, and
a later layer whose slot runs seeds then calls its modules with the packed tensor. The seeds
see it zero-padded to a dense ``[B, T, ...]`` tensor (what the unpacked path would give them),
and their output is packed back to the input's ragged lengths (``on_dense``). What keeps that
layer's fused path from skipping a slot while its seeds run is at the end (``force_regular_path``).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from kasmina.kd.loss import teacher_shape_problem
from kasmina.utils.checks import check_positive_int

__all__ = [
    "CHANNELS_LAST",
    "FUSED_PATH_TENSORS",
    "ActivationSpec",
    "SeedsLive",
    "activation_spec",
    "channels_last_name",
    "checked_chunk_dim",
    "chunk_spec",
    "contract_problem",
    "declared_width",
    "default_chunk_dim",
    "dense",
    "fits",
    "kernels_refuse",
    "signed_misfit",
    "signed_shape",
    "force_regular_path",
    "forward_owner",
    "inputs_need_grad",
    "memory_format_of",
    "no_tensor_reason",
    "on_dense",
    "output_index_problem",
    "recorded_spec",
    "recording_deferred",
    "output_element",
    "replace_output_element",
    "splits_last_dim",
    "teacher_goes_to",
]

# Shape, dtype and device of one tensor the slot saw.
ActivationSpec = tuple[torch.Size, torch.dtype, torch.device]


def fits(
    x: torch.Tensor,
    dim: int,
    width: int,
    contract: ActivationSpec | str | None,
    rank: int | None = None,
) -> bool:
    """Whether ``x`` has ``width`` features along ``dim`` (a call of a module called with more
    than one shape may not: its seeds sit that call out). A ``dim`` counted from the front also
    needs the recorded output's rank (``contract``), or the host's batched ``rank`` where it
    declares one (:func:`batched_rank`, also before anything is recorded): an unbatched call
    of a conv slot has its channels at dim 0, and an output height equal to the channel count
    passed the width check alone, its seeds handed slices of the height (faults, then
    QUARANTINE, for healthy seeds). The last dimension is the last at any rank (``[B, F]``
    then ``[B, T, F]``)."""
    if dim >= 0 and isinstance(contract, tuple) and x.dim() != len(contract[0]):
        return False
    if rank is not None and x.dim() != rank:  # an unbatched call: its seeds sit it out
        return False
    return -x.dim() <= dim < x.dim() and x.shape[dim] == width


def batched_rank(host: nn.Module) -> int | None:
    """The rank of a batched output of ``host`` where the module declares it (a ``ConvNd``:
    ``N + 2``), else None. A slot records its contract from a batched call only: one unbatched
    call first (a single image served after a load or a ``model.to``) had recorded a rank that
    every later batched call failed, and the seeds sat out from then on (with a ``chunk_dim``
    counted from the back too: GERMINATE then refused every kernel of the batched rank). A
    module that declares none (a block) records provisionally (``rerecorded``)."""
    if isinstance(host, nn.modules.conv._ConvNd):
        return len(host.kernel_size) + 2
    return None


def rerecorded(
    args: tuple[Any, ...], out: Any, index: int, host: nn.Module, contract: Any
) -> tuple[ActivationSpec | str, ActivationSpec | None] | None:
    """A slot's new record (as :func:`slot_record`) when ``out`` is a batched call of the
    unbatched one ``contract`` may have been recorded from (one more dim), else None.

    For a host that declares no batched rank (a ``Linear``, a block) no call tells whether it
    was batched; a first call on one image recorded ``(C, H, W)`` (or a sanity call on one
    sequence ``(T, F)``), and GERMINATE refused every kernel that fits the training calls (or
    took one of the record's rank that sat every batched call out). While no seed of the slot
    holds a kernel, the record follows the first call with one more dim, whatever its other
    sizes (the training images' resolution, the sequences' length, may differ)."""
    element = output_element(out, index)
    if (
        not isinstance(contract, tuple)
        or not isinstance(element, torch.Tensor)
        or element.is_nested  # no shape to compare (a packed encoder batch): a later call
        or element.dim() != len(contract[0]) + 1
    ):
        return None
    return slot_record(args, out, index, host, None, None)


def slot_record(
    args: tuple[Any, ...],
    out: Any,
    index: int,
    host: nn.Module,
    rank: int | None,
    before: tuple[Any, Any] | None,
    over: Any = None,
) -> tuple[ActivationSpec | str, ActivationSpec | None] | None:
    """A slot's ``(output_contract, input_spec)`` from a call of ``host`` (``args`` when it
    is ``slot(x)``, else ()), or None to leave the record to a later call: under autocast or
    tracing (:func:`recording_deferred`), for an output not of the host's batched ``rank``, or
    for an empty one.
    ``before`` is the record kept when the module was moved or cast (``_apply``): a move
    changes dtype and device, never the shapes, so the new record keeps ``before``'s shapes;
    the first call after a move need not be shaped as the calls the record was made from
    (one unbatched call had switched the seeds off for every batched call after it).
    ``over``: a provisional record, which only its batched form replaces (``rerecorded``)."""
    if over is not None:
        return rerecorded(args, out, index, host, over)
    element = dense(output_element(out, index))
    if recording_deferred(element, host):  # autocast's dtype only: a later forward records
        return None
    if rank is not None and isinstance(element, torch.Tensor) and element.dim() != rank:
        return None  # unbatched: the call sits out (``fits``), a batched call records
    if isinstance(element, torch.Tensor) and element.numel() == 0:
        return None  # an empty batch: G3 would count the host's cost per element on it
    contract = recorded_spec(element, host) or no_tensor_reason(out, element, index)
    spec_in = recorded_spec(dense(args[0]), host) if len(args) == 1 else None  # autocast's
    if before is not None:
        contract, spec_in = _shaped_as(before[0], contract), _shaped_as(before[1], spec_in)
    return contract, spec_in


def _shaped_as(old: Any, new: Any) -> Any:
    """``new`` (a spec, a reason or None) with ``old``'s shape where both are specs."""
    if isinstance(old, tuple) and isinstance(new, tuple):
        return (old[0], new[1], new[2])
    return new


def contract_problem(
    contract: ActivationSpec | str | None, dim: int, num_seeds: int, chunk_size: int
) -> str | None:
    """Why a slot of ``num_seeds`` chunks of ``chunk_size`` along ``dim`` cannot chunk the
    recorded output ``contract``, or None (also before the first forward, ``contract`` None)."""
    if contract is None or isinstance(contract, str):
        return contract
    shape, width = contract[0], num_seeds * chunk_size
    if not -len(shape) <= dim < len(shape):
        return f"chunk_dim {dim} is outside output {tuple(shape)}"
    if shape[dim] != width:
        return (
            f"host output {tuple(shape)} has {shape[dim]} features along dim {dim}, the seeds "
            f"cover {num_seeds} x {chunk_size} = {width}"
        )
    return None


def chunk_spec(
    contract: ActivationSpec | str | None, dim: int, num_seeds: int, chunk_size: int
) -> ActivationSpec | None:
    """Shape, dtype and device of one seed's chunk of the recorded output ``contract`` (a
    seed's input and output), or None before the first forward or off the contract."""
    if not isinstance(contract, tuple) or contract_problem(contract, dim, num_seeds, chunk_size):
        return None
    dims = list(contract[0])
    dims[dim] = chunk_size
    return (torch.Size(dims), contract[1], contract[2])


_NONE_REFUSED: tuple[frozenset[int], str] = (frozenset(), "")


def signed_shape(kernel: object) -> tuple[int | None, ...] | None:
    """An exported kernel's signed input shape (``GPUKernel.signed_input_shape``: ints, None
    for a dynamic size), or None for a kernel that declares none (any module)."""
    shape = getattr(kernel, "signed_input_shape", None)
    ok = isinstance(shape, tuple) and all(d is None or type(d) is int for d in shape)
    return shape if ok else None


def kernels_refuse(
    x: torch.Tensor, dim: int, chunk_size: int, shapes: tuple[tuple[int | None, ...] | None, ...]
) -> tuple[frozenset[int], str]:
    """The seeds (indices into ``shapes``, one per seed: ``signed_shape`` of its kernel) whose
    kernel takes no chunk of ``x`` (``chunk_size`` along ``dim``), and why: a signed shape
    fixes a rank and sizes. Such a call (a last-dim slot's ``[T, F]`` or ``[B, T, F]`` after
    ``[B, F]``, an unseen sequence length) made the kernel raise, each call a fault; those
    seeds sit it out instead, the others run."""
    if not shapes:  # no exported kernel runs (every call while all pass the host through)
        return _NONE_REFUSED
    chunk = tuple(chunk_size if i == dim % x.dim() else n for i, n in enumerate(x.shape))
    refused, why = set(), ""
    for k, shape in enumerate(shapes):
        taken = signed_misfit(shape, chunk)
        if taken is not None:
            refused.add(k)
            why = why or f"chunk of output {tuple(x.shape)} is not a kernel's input {taken}"
    return frozenset(refused), why


def signed_misfit(shape: tuple[int | None, ...] | None, sizes: tuple[int, ...]) -> str | None:
    """``shape`` (``signed_shape``) as ``"[3, *]"`` when an input of ``sizes`` does not fit it
    (another rank, or a fixed size that differs), else None (also for no signed shape)."""
    if shape is None or (
        len(shape) == len(sizes)
        and all(d is None or d == n for d, n in zip(shape, sizes, strict=True))
    ):
        return None
    return "[" + ", ".join("*" if d is None else str(d) for d in shape) + "]"


def splits_last_dim(dim: int, contract: ActivationSpec | str | None) -> bool:
    """Whether a slot split along ``dim`` splits its output's last dimension (the one a KD loss
    reads): ``-1``, or the last index of the recorded output (``chunk_dim=1`` on ``[B, F]``)."""
    return dim == -1 or (isinstance(contract, tuple) and dim == len(contract[0]) - 1)


def output_element(out: Any, index: int) -> Any:
    """The element of ``out`` at ``index`` (a tensor output is its own element 0), or None when
    there is none; anything that is not a container is returned as it is."""
    if isinstance(out, torch.Tensor):
        return out if index == 0 else None
    if isinstance(out, tuple | list):
        return out[index] if -len(out) <= index < len(out) else None
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        names = _present_fields(out)
        return getattr(out, names[index]) if -len(names) <= index < len(names) else None
    if isinstance(out, dict):  # every value in order, None too: the index holds in every mode
        values = list(out.values())
        return values[index] if -len(values) <= index < len(values) else None
    return out


def teacher_goes_to(slot: Any, teacher: torch.Tensor | None, out: Any) -> bool:
    """Whether pending ``teacher`` logits go to the ``slot`` call that gave ``out``: one they fit,
    or one that distils nothing (no KD, no seed running, no tensor). A call they do not fit
    leaves them to a later call of the forward that they fit (a module called with several
    shapes), else to the step's end; a call that takes them and does not fit would sit out."""
    if teacher is None or slot.kd_config is None or not slot._runs_any:
        return True
    element = output_element(out, slot.output_index)
    if not isinstance(element, torch.Tensor) or element.is_nested:  # padded before its check
        return True
    return teacher_shape_problem(element.shape, teacher, slot._kd_head) is None


def no_tensor_reason(out: Any, element: Any, index: int) -> str:
    """Why a slot has no tensor to chunk: the host's output (``out``), or its ``element`` at
    ``index``, is not a Tensor (recorded as the slot's ``output_contract``)."""
    if element is out:
        return f"host output is a {type(out).__name__}, not a Tensor"
    return (
        f"element {index} of the host's {type(out).__name__} output is a "
        f"{type(element).__name__}, not a Tensor"
    )


def replace_output_element(out: Any, index: int, new: torch.Tensor) -> Any:
    """``out`` with its element at ``index`` replaced by ``new``, of the same type."""
    if isinstance(out, torch.Tensor):
        return new
    if isinstance(out, list):
        return [new if j == index % len(out) else item for j, item in enumerate(out)]
    if isinstance(out, tuple):
        items = tuple(new if j == index % len(out) else item for j, item in enumerate(out))
        if hasattr(out, "_fields"):  # a namedtuple
            return type(out)(*items)
        if hasattr(type(out), "n_fields"):  # a structseq: torch.sort's, max(dim)'s (.values)
            return type(out)(items)
        return items
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        return dataclasses.replace(out, **{_present_fields(out)[index]: new})  # type: ignore[type-var]
    if isinstance(out, dict):  # its type, a subclass's too (TorchDynamo traces a dict's copy)
        replaced = dict(out) if type(out) is dict else copy.copy(out)
        replaced[list(out)[index]] = new
        return replaced
    return new


def inputs_need_grad(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether a tensor among a call's arguments, positional or keyword (Hugging Face calls
    ``self_attn(hidden_states=...)``), needs a gradient: under ``no_grad`` that is a reentrant
    checkpoint's first run, whose recompute runs the seeds' kernels with a graph."""
    return any(isinstance(v, torch.Tensor) and v.requires_grad for v in (*args, *kwargs.values()))


def _present_fields(out: Any) -> list[str]:
    """A dataclass output's fields that hold a value, in order: what ``ModelOutput`` indexes."""
    return [f.name for f in dataclasses.fields(out) if getattr(out, f.name) is not None]


def default_chunk_dim(host: nn.Module) -> int:
    """Channels (dim 1) for a ``ConvNd``, the last dimension for every other module."""
    return 1 if isinstance(host, nn.modules.conv._ConvNd) else -1


def declared_width(host: nn.Module, chunk_dim: int, output_index: int) -> int | None:
    """The width along ``chunk_dim`` of the host's output element at ``output_index`` as far
    as the module declares it.

    None when the module does not say (a whole block, a custom module, the attention weights
    of a ``MultiheadAttention``, any element but a single-tensor module's output): the first
    forward's recorded shape decides then.
    """
    if isinstance(host, nn.MultiheadAttention):  # (output [..., embed_dim], weights [.., S])
        return host.embed_dim if chunk_dim == -1 and output_index in (0, -2) else None
    if output_index != 0:
        return None
    if isinstance(host, nn.modules.conv._ConvNd):  # channels: 1, or 1 - rank from the back
        return host.out_channels if chunk_dim in (1, 1 - len(host.kernel_size) - 2) else None
    if chunk_dim != -1:
        return None
    if isinstance(host, nn.Embedding):
        return host.embedding_dim
    for name in ("out_features", "nf"):  # nn.Linear and friends; Hugging Face's Conv1D
        width = getattr(host, name, None)
        if isinstance(width, int) and not isinstance(width, bool):
            return width
    return None


# Hosts whose forward (the class's own, not an override) returns one tensor: the slot's element
# is the output itself, which ``output_element`` finds at index 0 only.
_TENSOR_FORWARD = (
    nn.Linear,
    nn.Bilinear,
    nn.Embedding,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)


def checked_chunk_dim(
    host: nn.Module,
    num_seeds: int,
    chunk_size: int,
    chunk_dim: int | None,
    output_index: int,
    layer_id: str,
) -> int:
    """A slot's ``chunk_dim`` (``default_chunk_dim`` for None), once its layout is checked
    against what the host declares; ``ValueError`` naming ``layer_id`` otherwise."""
    if not isinstance(host, nn.Module):
        raise ValueError(f"host must be an nn.Module, got {type(host).__name__}")
    for name, count in (("num_seeds", num_seeds), ("chunk_size", chunk_size)):
        check_positive_int(name, count)  # True was one seed
        if type(count) is not int:  # a slot keeps it as given: a NumPy int would reach its saves
            raise ValueError(f"{name} must be a Python int, got {type(count).__name__}")
    if chunk_dim is None:
        chunk_dim = default_chunk_dim(host)
    if not isinstance(chunk_dim, int) or isinstance(chunk_dim, bool):
        raise ValueError(f"{layer_id}: chunk_dim must be an int, got {chunk_dim!r}")
    if not isinstance(output_index, int) or isinstance(output_index, bool):
        raise ValueError(f"{layer_id}: output_index must be an int, got {output_index!r}")
    problem = output_index_problem(output_index, host)
    if problem is not None:
        raise ValueError(f"{layer_id!r}: {problem}")
    rank = batched_rank(host)
    if rank is not None and output_index == 0 and not -rank <= chunk_dim < rank:
        raise ValueError(
            f"{layer_id}: chunk_dim {chunk_dim} is outside the {rank}-D output of "
            f"{type(host).__name__}"
        )
    width = declared_width(host, chunk_dim, output_index)
    if width is not None and width != num_seeds * chunk_size:
        raise ValueError(
            f"{layer_id}: {num_seeds} seeds x chunk {chunk_size} = {num_seeds * chunk_size}"
            f" != {width} features of {type(host).__name__} along dim {chunk_dim}"
        )
    return chunk_dim


def forward_owner(host: nn.Module) -> type:
    """The class whose ``forward`` the host runs (``nn.Module`` itself defines one)."""
    return next(cls for cls in type(host).__mro__ if "forward" in vars(cls))


def output_index_problem(index: int, host: nn.Module) -> str | None:
    """Why ``output_index`` cannot pick a tensor of ``host``'s output, or None: checked where a
    slot is made (``attach``) and restored (``kasmina.load``). Known only for the torch modules
    above and ``MultiheadAttention`` (a pair); for any other host it is known at the first
    forward: a slot whose seeds run raises ``TypeError`` naming ``output_index`` (seeds without
    a kernel pass the host through)."""
    owner = forward_owner(host)
    if owner in _TENSOR_FORWARD and index != 0:
        return f"output_index {index}, but a {owner.__name__} returns one tensor (index 0)"
    if owner is nn.MultiheadAttention and not -2 <= index < 2:
        return f"output_index {index}, but a MultiheadAttention returns a pair"
    return None


def activation_spec(value: object) -> ActivationSpec | None:
    """Shape, dtype and device of ``value`` when it is a tensor, else None."""
    if isinstance(value, torch.Tensor):
        return (value.shape, value.dtype, value.device)
    return None


def recorded_spec(value: object, host: nn.Module) -> ActivationSpec | None:
    """:func:`activation_spec` of a host's output as a slot records it: under ``torch.autocast``
    the output's dtype is autocast's, and the dtype recorded is the one the host computes in
    outside it (its floating parameters'), the dtype the seeds must share to run in both (an
    fp32 kernel runs under bf16 autocast too; a bf16 kernel faults in an fp32 evaluation).
    A host without floating parameters does not say: see :func:`recording_deferred`."""
    spec = activation_spec(value)
    if spec is None or not _under_autocast(spec):
        return spec
    dtype = next((p.dtype for p in host.parameters() if p.is_floating_point()), spec[1])
    return (spec[0], dtype, spec[2])


def recording_deferred(value: object, host: nn.Module) -> bool:
    """Whether a slot leaves its record to a later forward: under ``torch.fx`` tracing the
    output is a ``Proxy`` with no shape; under ``torch.autocast`` a host without floating
    parameters (an activation, a residual sum) has no dtype of its own to record, only
    autocast's; a forward outside autocast records it."""
    if isinstance(value, torch.fx.Proxy):
        return True
    spec = activation_spec(value)
    if spec is None or not _under_autocast(spec):
        return False
    return not any(p.is_floating_point() for p in host.parameters())


def _under_autocast(spec: ActivationSpec) -> bool:
    kind = spec[2].type
    if not spec[1].is_floating_point or not torch.amp.is_autocast_available(kind):
        return False
    return torch.is_autocast_enabled(kind)


def dense(value: Any) -> Any:
    """A nested tensor zero-padded to a dense one; anything else as it is."""
    if isinstance(value, torch.Tensor) and value.is_nested:
        return value.to_padded_tensor(0.0)
    return value


def on_dense(value: Any, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(value, *args)``; for a nested tensor, ``fn`` of its zero-padded form, packed back to
    the components' own shapes (the padding the seeds saw is dropped)."""
    if not (isinstance(value, torch.Tensor) and value.is_nested):
        return fn(value, *args)
    padded = fn(value.to_padded_tensor(0.0), *args)
    parts = [
        row[tuple(slice(0, n) for n in part.shape)]
        for row, part in zip(padded.unbind(0), value.unbind(), strict=True)
    ]
    return torch.nested.as_nested_tensor(parts, layout=value.layout)


# -- PyTorch's fused encoder-layer path ----------------------------------------------------
# ``nn.TransformerEncoderLayer`` in inference calls ``torch._transformer_encoder_layer_fwd``
# with its submodules' tensors instead of calling them, which skips a slot in it. It takes the
# regular path, which calls every submodule, when any module in it has a forward (pre-)hook:
# a slot's seeds hold one while a seed runs (``force_regular_path``). ``nn.TransformerEncoder``
# packs a padded batch into a nested tensor (inference) from its first layer's tensors alone,
# looking at no hook: it declines when one ``has_torch_function``.

# Tensors that packing test reads from the first layer's modules; a slot there hands that test
# (and no other reader) a marked view of them while a seed runs (``forwarding.HostForwarding``).
FUSED_PATH_TENSORS = frozenset({"weight", "bias", "in_proj_weight", "in_proj_bias"})
PACKING_TEST = nn.TransformerEncoder.forward.__code__  # the frame that reads them


class SeedsLive(torch.Tensor):
    """Marks a host tensor handed to the packing test while seeds run: a plain subclass, for
    which ``has_torch_function`` (what the test checks) is true. Packed past a first-layer seed
    that trains (inference with grad on, a frozen host), the batch would reach the next layer's
    attention as a nested tensor needing grad, which it refuses outside its fast path. Code
    for the bare module (``fc.weight``: its ``.grad``, an optimizer, ``.data =``) gets the
    host's own tensor; compiled, where no frame is looked at, every read in the graph."""


def _regular_path(module: nn.Module, args: tuple[Any, ...]) -> None:
    """A forward pre-hook that does nothing: a ``TransformerEncoderLayer`` holding a module with
    a hook declines its fused path, whichever submodule the slot wraps (a Dropout or an
    activation, which the fused path neither calls nor reads a tensor of)."""


def force_regular_path(module: nn.Module, on: bool) -> None:
    """Put ``_regular_path`` on ``module`` once when ``on``, else take it off. A slot puts it on
    its ``seeds`` (a ModuleList, never called: no call ever runs it) while a seed runs."""
    hooks = module._forward_pre_hooks
    keys = [key for key, hook in hooks.items() if hook is _regular_path]
    if on and not keys:
        module.register_forward_pre_hook(_regular_path)
    elif not on:
        for key in keys:
            del hooks[key]


def host_holds(host: nn.Module | None, name: str, built: bool) -> bool:
    """Whether ``name`` is the host's own to assign (so a slot's ``__setattr__`` sets it there):
    a parameter or buffer, a parametrized tensor (its setter applies ``right_inverse``), or,
    once the slot is ``built``, a child module or any other attribute of the host's, its
    class's included (a class default its forward reads, a property's setter). False without
    a host."""
    return host is not None and (
        name in host._parameters
        or name in host._buffers
        or parametrize.is_parametrized(host, name)
        or (built and (name in vars(host) or name in host._modules or hasattr(type(host), name)))
    )


def memory_format_of(t: torch.Tensor) -> torch.memory_format | None:
    """``t``'s memory format when it is the contiguous or a channels-last one, else None."""
    if t.is_contiguous():
        return torch.contiguous_format
    for layout, rank in ((torch.channels_last, 4), (torch.channels_last_3d, 5)):
        if t.dim() == rank and t.is_contiguous(memory_format=layout):
            return layout
    return None


# A channels-last layout by name: what a slot keeps of its output's (``output_layout``), since
# ``torch.save`` cannot pickle a ``torch.memory_format`` (a whole-model save would fail).
CHANNELS_LAST = {"channels_last": torch.channels_last, "channels_last_3d": torch.channels_last_3d}


def channels_last_name(t: torch.Tensor) -> str | None:
    """The ``CHANNELS_LAST`` name of ``t``'s layout, or None (contiguous, or neither)."""
    layout = memory_format_of(t)
    return next((name for name, value in CHANNELS_LAST.items() if value == layout), None)
