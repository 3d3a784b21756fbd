"""A slot's constants, and how they come back after a deferred init (docs/design.md §3).

A :class:`~kasmina.seeds.layer.KasminaLayer` and its seeds hold buffers that carry no learned
data: the layer's ``_one``, its fault flags (``_finite_flags``, ``_fault_flags``, ``_cut_flags``;
each seed's ``SEED_FLAGS`` are views of them) and ``sat_out_compiled``, and each seed's
``alpha``, whose value the seed keeps in ``_alpha_value``. They are made on the host
parameters' device, so a model built under ``torch.device("meta")`` (or accelerate's
``init_empty_weights``) gets them on ``meta``, where they have no values.

``to_empty`` puts them back (``KasminaLayer._apply``, with :data:`CONSTANTS`). A
``load_state_dict(..., assign=True)`` does not: it replaces the host's parameters with the
checkpoint's tensors and leaves these buffers (non-persistent, or absent from a checkpoint of
the bare model) on ``meta``, and every GERMINATE, ``kasmina.save`` and seed forward that reads
them fails, with no move left to the user (``to("cpu")`` cannot copy out of ``meta``,
``to_empty`` wipes the loaded weights). :func:`rebuild_constants` makes them again, with their
values, on the host's device once every host parameter is real: after each load through the
slot (:func:`rebuild_after_load`, its post-hook), when a manager registers the model (for
weights put in place without ``load_state_dict``, accelerate's ``set_module_tensor_to_device``),
and for a load past the slot (into ``slot.host`` alone) at the slot's next record, plan change
or poll (:func:`rebuild_if_left`). A pickle keeps no storage shared either: an unpickled slot
links its seeds' flags again (:func:`link_after_unpickle`).

Kasmina writes a layer's ``_one`` in place only here (a move's copy, a refill), and notes the
tensor's version counter after each such write and after an unpickling (which rebuilds it with
``set_``: version 1); :func:`one_written_elsewhere` sees any other in-place write, as a
``DistributedDataParallel`` built over the model by hand makes when its constructor broadcasts
rank 0's buffers, Kasmina's among them (``kasmina.manager.ddp``).

A loader may also replace them by tensors of its own: transformers' ``from_pretrained`` builds
the model on ``meta`` and then gives every non-persistent buffer an ``empty_like`` (uninitialised
memory, as nothing it knows re-initialises them), so a class that attaches slots in its
``__init__`` came back with ``_one`` and ``sat_out_compiled`` holding garbage and each seed's
flags a buffer of its own, no longer a view of the layer's: a forward recorded faults in the
layer's flags while the poll read the seeds', so a seed gone non-finite was never charged and
healthy ones were. :func:`constants_replaced` sees that: the layer marks an assignment to one
of its constants (``KasminaLayer.__setattr__``; a move, which links the flags again, keeps the
mark), else a flag not a view of the layer's; :func:`rebuild_constants` then
refills them in place and links the flags again, every seed's ``alpha`` set to its
``_alpha_value``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch.utils.weak import WeakIdKeyDictionary

from kasmina.utils.grad_modes import training_tensors

logger = logging.getLogger(__name__)

__all__ = [
    "CONSTANTS",
    "SEED_CONSTANTS",
    "SEED_FLAGS",
    "add_missing_flag",
    "constants_on_meta",
    "host_device",
    "keep_constants",
    "reset_flags",
    "one_written_elsewhere",
    "rebuild_after_load",
    "rebuild_constants",
]

# The layer's constants and their values (``to_empty`` and :func:`rebuild_constants` fill them).
CONSTANTS = {"_one": 1, "_finite_flags": True, "_fault_flags": False, "_cut_flags": False,
             "sat_out_compiled": 0}  # fmt: skip
# A seed's device flags, in the order ``settle_nonfinite`` takes them, and its constants.
SEED_FLAGS = {"finite_flag": True, "fault_flag": False, "cut_flag": False}  # and clean values
SEED_CONSTANTS = ("alpha", *SEED_FLAGS)  # a seed's: alpha, its flags' views


def keep_constants(
    buffers: dict[str, torch.Tensor | None],
    before: dict[str, torch.Tensor | None],
    values: dict[str, Any],
) -> None:
    """After a module's ``_apply`` (a move or a cast), its constants ``before`` it: each keeps
    its dtype (``Module.type()`` casts bool and integer buffers too, and alpha stays float32)
    and its values (``to_empty`` leaves none, onto the same device too; from ``meta``, where
    there were none, they are ``values``'). A move has copied them already: one small copy."""
    for name, old in before.items():
        new = buffers[name]
        if new is None or old is None or new is old:
            continue
        new = new if new.dtype == old.dtype else new.to(old.dtype)
        if old.is_meta and not new.is_meta:
            new.fill_(values[name])
        elif not new.is_meta:  # (onto meta: no values to keep)
            new.copy_(old)
        _note_own_write(new)
        buffers[name] = new


# Each constant's version counter after Kasmina's own last in-place write of it, keyed by
# identity (a tensor's ``==`` compares values) and held weakly: a tensor missing here was never
# written in place by Kasmina, and its version is 0.
_OWN_WRITES = WeakIdKeyDictionary()


def _note_own_write(tensor: torch.Tensor) -> None:
    # An inference tensor (a move made under ``inference_mode``) keeps no version counter.
    if not tensor.is_meta and not tensor.is_inference():
        _OWN_WRITES[tensor] = tensor._version


def one_written_elsewhere(layer: Any) -> bool:
    """Whether something other than Kasmina wrote the layer's ``_one`` in place since the layer
    made it: its version counter is past the one Kasmina's own last write left. One read, no
    device sync. An inference tensor keeps no counter (and no DDP broadcasts into one outside
    ``inference_mode``): never seen as written."""
    one = layer._buffers.get("_one")
    if one is None or one.is_meta or one.is_inference():
        return False
    return one._version != _OWN_WRITES.get(one, 0)


def _is_meta(tensor: torch.Tensor | None) -> bool:
    return tensor is not None and tensor.is_meta


def constants_on_meta(layer: Any) -> list[str]:
    """A KasminaLayer's constants (its own and its seeds') on the meta device, named as in its
    ``named_buffers``."""
    names = [name for name in CONSTANTS if _is_meta(layer._buffers.get(name))]
    for k, seed in enumerate(layer.seeds):
        names += [f"seeds.{k}.{n}" for n in SEED_CONSTANTS if _is_meta(seed._buffers.get(n))]
    return names


def host_device(layer: Any) -> torch.device | None:
    """The device of the host's first parameter (where ``__init__`` puts the constants) when
    every host parameter holds values; None while one is on ``meta``, or with none at all."""
    params = list(layer.host.parameters())
    if not params or any(p.is_meta for p in params):
        return None
    return params[0].device


def constants_replaced(layer: Any) -> bool:
    """Whether the layer's real (not ``meta``) constants were replaced since it made them (see
    the module docstring): an assignment the layer marked, or a seed's flag that is not a
    view of the layer's. No device read (a load through every slot asks)."""
    finite, faulted = layer._flags()
    if finite.is_meta or faulted.is_meta or layer._buffers["_one"].is_meta:
        return False
    if layer.__dict__.get("_constants_stale"):  # assigned over (``KasminaLayer.__setattr__``)
        return True
    for k, seed in enumerate(layer.seeds):
        mine = seed._buffers["finite_flag"], seed._buffers["fault_flag"]
        if (
            mine[0].data_ptr() != finite[k].data_ptr()
            or mine[1].data_ptr() != faulted[k].data_ptr()
        ):
            return True
    return False


def _refill(layer: Any) -> list[str]:
    """Refill replaced constants in place (their values, the flags linked again)."""
    layer.__dict__.pop("_constants_stale", None)
    for name, value in CONSTANTS.items():
        layer._buffers[name].fill_(value)
        _note_own_write(layer._buffers[name])
    layer._link_flags()
    for seed in layer.seeds:
        seed._buffers["alpha"].fill_(seed.alpha_value)
    layer._masks.clear()
    logger.warning(
        "%s: its constants were replaced by a loader (transformers' from_pretrained of a class "
        "that attaches slots in __init__ leaves them uninitialised): refilled, flags relinked",
        layer.layer_id,
    )
    return list(CONSTANTS)


def rebuild_constants(layer: Any) -> list[str]:
    """Make the layer's constants that are on ``meta`` again on the host's device, with their
    values, when the host's parameters are real (:func:`host_device`); the names rebuilt.

    Nothing learned is lost: each is a fixed value or, for ``alpha``, the seed's ``_alpha_value``
    (a checkpoint's extra state sets it). The seeds' flags are linked to the layer's again, and
    the table, made on a guessed device for a meta model, follows the host as ``to_empty``
    makes it; a record of the host's output taken on ``meta`` is taken again at the next
    forward, keeping its shapes (as after a move).

    Made outside ``torch.inference_mode`` whatever the caller's mode: the first forward (a
    validation pass, a serving warm-up) or the load that rebuilds them may run inside it, and
    an inference tensor (or a view made there) cannot be written outside it: entering GRAFTING
    wrote alpha before torch raised, and the next ``step()`` raised after the optimizers'."""
    with training_tensors():
        return _rebuild(layer)


def _rebuild(layer: Any) -> list[str]:
    names = constants_on_meta(layer)
    if not names and constants_replaced(layer):
        return _refill(layer)
    device = host_device(layer) if names else None
    if device is None:
        return []
    for name, value in CONSTANTS.items():
        held = layer._buffers.get(name)
        if held is not None and held.is_meta:
            layer._buffers[name] = torch.full(held.shape, value, dtype=held.dtype, device=device)
    for seed in layer.seeds:
        alpha = seed._buffers["alpha"]
        if alpha is not None and alpha.is_meta:
            value = seed.alpha_value
            seed._buffers["alpha"] = torch.full((), value, dtype=alpha.dtype, device=device)
    layer._link_flags()  # the seeds' flags: views of the layer's (rebuilt) ones
    layer._masks.clear()
    layer.state_table.to(device)
    spec = layer.output_contract
    if isinstance(spec, tuple) and spec[2].type == "meta":  # recorded before the load
        if layer._moved is None:
            layer._moved = (spec, layer.input_spec)
        layer.output_contract = None
    layer._refresh_plan()
    logger.info("%s: %s rebuilt on %s (deferred init)", layer.layer_id, ", ".join(names), device)
    return names


def rebuild_after_load(layer: Any, incompatible_keys: Any) -> None:
    """``load_state_dict`` post-hook of every slot: after a load (``assign=True``) that put real
    parameters in a host built on ``meta``, its constants follow (:func:`rebuild_constants`);
    otherwise a few ``is_meta`` reads."""
    rebuild_constants(layer)


def rebuild_if_left(layer: Any) -> None:
    """:func:`rebuild_constants` if the layer's constants are on ``meta`` (one read): a deferred
    init loaded past the slot (``slot.host.load_state_dict(..., assign=True)``, accelerate's
    per-module loads) never ran its post-hook, and a seed that ran there faulted at every call
    ("Tensor on device meta"); and the seeds' flags linked, if an unpickle left that for later
    (:func:`link_after_unpickle`). Asked off the hot path: at a record, a plan change, a poll."""
    if "_unlinked" in vars(layer):
        relink_flags(layer)
    if layer._buffers["_one"].is_meta:
        rebuild_constants(layer)


def reset_flags(buffers: dict[str, torch.Tensor], *, keep_cut: bool = False) -> None:
    """A seed's ``SEED_FLAGS`` (in its ``_buffers``) back to their clean values, in place: the
    views of its slot's flags stay views. ``keep_cut``: its ``cut_flag`` stays as it is (a step
    clears it once it has judged the cut: ``SlotRegistry.charge_failed_steps``)."""
    for name, value in SEED_FLAGS.items():
        if not keep_cut or name != "cut_flag":
            buffers[name].fill_(value)


def add_missing_flag(module: Any, name: str, like: str) -> None:
    """A flag buffer ``name`` that a module pickled before it existed lacks, made clean (all
    False, non-persistent) beside its flag ``like``: a ``torch.save``-d model of an older
    version loads, moves and polls (a state dict never held these)."""
    buffers = vars(module).get("_buffers")
    if buffers is not None and name not in buffers and buffers.get(like) is not None:
        buffers[name] = torch.zeros_like(buffers[like], dtype=torch.bool)
        module._non_persistent_buffers_set.add(name)


def link_after_unpickle(layer: Any) -> None:
    """An unpickled slot's seeds' flags are views of its own again (a pickle keeps no storage
    shared: the guard wrote the slot's flags and a poll read the seeds', so a non-finite output
    was never charged): now if every seed is built, else at the slot's next use of its flags
    (:func:`relink_flags`); a seed pickled alone reaches its slot, through the state table's
    listener, before the seed itself is built."""
    add_missing_flag(layer, "_cut_flags", "_fault_flags")
    one = vars(layer).get("_buffers", {}).get("_one")
    if one is not None:  # rebuilt by the unpickler (``set_``: version 1), not written over
        _note_own_write(one)
    seeds = vars(layer).get("_modules", {}).get("seeds")
    built = seeds is not None and "_modules" in vars(seeds)
    if built and all("_buffers" in vars(seed) for seed in seeds._modules.values()):
        layer._link_flags()
    else:
        vars(layer)["_unlinked"] = True


def relink_flags(layer: Any) -> None:
    """The link :func:`link_after_unpickle` left for later, the seeds' own flags merged in (a
    fault a seed recorded meanwhile is kept); the views made outside ``torch.inference_mode``,
    as in :func:`rebuild_constants`."""
    with training_tensors():
        _relink(layer)


def _relink(layer: Any) -> None:
    del vars(layer)["_unlinked"]
    finite, faulted = layer._buffers["_finite_flags"], layer._buffers["_fault_flags"]
    for k, seed in enumerate(layer.seeds):
        finite[k].logical_and_(seed._buffers["finite_flag"])
        faulted[k].logical_or_(seed._buffers["fault_flag"])
        layer._buffers["_cut_flags"][k].logical_or_(seed._buffers["cut_flag"])
    layer._link_flags()
