"""The forwards ``evaluate_seeds`` runs (docs/design.md §3, gate G5): the model watched (each
seed's fault in the call, and whether it sat the call out), with one seed's chunk put back to the
host's output (the ablation), every forward of a batch on the same random draws, and the seeds'
kernels on copies of their buffers.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from kasmina.manager.records import SeedRecord
from kasmina.seeds.outputs import dense, on_dense, output_element, replace_output_element
from kasmina.utils.flags import read_flags

__all__ = ["ablate", "kernels_on_copies", "rng_states", "set_rng_states", "watched_call"]


def _chunk_index(record: SeedRecord) -> int:
    return next(k for k, seed in enumerate(record.slot.seeds) if seed is record.seed)


def ablate(record: SeedRecord) -> list[Any]:
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


def rng_states(cuda: list[int]) -> list[torch.Tensor]:
    return [torch.get_rng_state(), *(torch.cuda.get_rng_state(d) for d in cuda)]


def set_rng_states(states: list[torch.Tensor], cuda: list[int]) -> None:
    torch.set_rng_state(states[0])
    for d, state in zip(cuda, states[1:], strict=True):
        torch.cuda.set_rng_state(state, d)


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return model(**inputs)
    unpacked = isinstance(inputs, tuple) and not isinstance(inputs, PackedSequence)
    return model(*inputs) if unpacked else model(inputs)


def watched_call(
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
