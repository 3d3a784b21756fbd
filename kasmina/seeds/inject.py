r"""Put seeds into any ``nn.Module`` by module name, and take them out again.

Like PEFT's injection by module name: each matching submodule is replaced, in its parent, by a
:class:`~kasmina.seeds.layer.KasminaLayer` wrapping it; ``detach`` puts the originals back, so
the model is the one you started with (its parameters were never copied). All slots share one
:class:`~kasmina.seeds.table.GPUStateTensor`, so one fused launch updates every seed of the model.

Targets follow PEFT's ``target_modules``, so a name that works there works here:

- a list (or tuple, or set) of names: an entry matches a module whose full name equals it or
  ends with ``"." + entry`` (``"down_proj"`` matches every ``model.layers.N.mlp.down_proj``);
- a single string is a regular expression that must match a full name (``re.fullmatch``):
  ``"conv1"`` is the top-level ``conv1`` only, ``r"layer\d\.0\.conv1"`` picks blocks.

Mistakes are errors, never silently ignored: an entry that matches nothing raises ``ValueError``
naming it and the closest module names; so does a module that is already a slot ("already
attached"), and a match nested inside another.

While attached, a wrapped module's parameters appear in ``state_dict`` under ``<name>.host.``.
In a Hugging Face model the tied-weight names and output-recording hooks follow the slots
(``kasmina.seeds.hf``).
"""

from __future__ import annotations

import difflib
import gc
import re
import weakref
from collections.abc import Collection, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from kasmina.kd.config import KDConfig, check_seed_kd
from kasmina.kd.graph import sum_kd_losses
from kasmina.seeds import hf
from kasmina.seeds.constants import rebuild_constants
from kasmina.seeds.faults import DEFAULT_FAULT_LIMIT
from kasmina.seeds.layer import KasminaLayer, check_states_loaded_here
from kasmina.seeds.load_hooks import check_seed_states
from kasmina.seeds.outputs import checked_chunk_dim, default_chunk_dim, forward_owner
from kasmina.seeds.seed import GradientIsolatedSeed
from kasmina.seeds.table import GPUStateTensor
from kasmina.stages import SeedStage, StateColumn
from kasmina.utils.checks import check_positive_int

if TYPE_CHECKING:
    from kasmina.utils.telemetry import TelemetryReporter


def _closest(wanted: str, names: list[str]) -> list[str]:
    """Module names nearest to ``wanted``, comparing it with whole names and dotted suffixes
    (so a typo in ``"mlp.down_prj"`` still finds ``model.layers.0.mlp.down_proj``)."""
    by_key: dict[str, str] = {}
    for name in names:
        parts = name.split(".")
        for i in range(len(parts)):
            by_key.setdefault(".".join(parts[i:]), name)
    keys = difflib.get_close_matches(wanted, list(by_key), n=3, cutoff=0.5)
    return list(dict.fromkeys(by_key[key] for key in keys))


def _no_match(what: str, model: nn.Module, names: list[str], pattern: bool) -> ValueError:
    near = _closest(what, names)
    hint = f"; closest: {near}" if near else ""
    if pattern and any(n == what or n.endswith("." + what) for n in names):
        hint += f" (a pattern matches whole names; [{what!r}] selects by name or name suffix)"
    elif not pattern and _would_match(what, names):
        hint += " (a list holds module names or name suffixes; pass a pattern as one string)"
    return ValueError(f"target {what!r} matches no submodule of {type(model).__name__}{hint}")


def _would_match(entry: str, names: list[str]) -> bool:
    """Whether a list entry is a regular expression that matches a name: one meant as a
    pattern, which only a string target is."""
    try:
        pattern = re.compile(entry)
    except re.error:
        return False
    return any(pattern.fullmatch(n) for n in names)


def _resolve(model: nn.Module, targets: str | Collection[str]) -> list[str]:
    """Names of the modules ``targets`` selects (module docstring), in module order."""
    slots = [n for n, m in model.named_modules() if n and isinstance(m, KasminaLayer)]
    # Inside a slot only its host's subtree is the user's model; seeds and kernels are ours.
    internal = tuple(f"{slot}.seeds" for slot in slots)
    named = [
        (n, m)
        for n, m in model.named_modules(remove_duplicate=False)
        if n and not any(n == i or n.startswith(i + ".") for i in internal)
    ]
    names = [n for n, _ in named]
    aliases: dict[int, list[str]] = {}
    for n, m in named:
        aliases.setdefault(id(m), []).append(n)
    if isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as exc:
            raise ValueError(f"target {targets!r} is not a regular expression: {exc}") from None
        matched = [n for n in names if pattern.fullmatch(n)]
        if not matched:
            raise _no_match(targets, model, names, pattern=True)
    else:
        if not isinstance(targets, Iterable) or isinstance(targets, (bytes, bytearray)):
            raise TypeError(
                "targets must be a pattern (str) or a collection of module names, got "
                f"{type(targets).__name__} {targets!r}"
            )
        entries = list(targets)
        if not entries:
            raise ValueError("attach needs at least one target name")
        for entry in entries:
            if not isinstance(entry, str) or not entry:
                raise ValueError(f"a target name must be a non-empty string, got {entry!r}")
        matched = []
        for entry in entries:
            hits = [n for n in names if n == entry or n.endswith("." + entry)]
            if not hits:
                raise _no_match(entry, model, names, pattern=False)
            matched += hits
        order = {n: i for i, n in enumerate(names)}
        matched = sorted(set(matched), key=order.__getitem__)
    wrapped = {id(m): n for n, m in model.named_modules() if isinstance(m, KasminaLayer)}
    wrapped |= {id(m.host): n for n, m in model.named_modules() if isinstance(m, KasminaLayer)}
    for name in matched:
        slot = wrapped.get(id(model.get_submodule(name)))
        if slot is not None:
            raise ValueError(f"{name!r} is already attached (slot {slot!r}); detach it first")
        shared = aliases[id(model.get_submodule(name))]
        # One module under several names is one slot only if a single parent attribute holds
        # it (inside a shared block, every path calls the slot): ``[block] * 3`` or
        # ``self.a = self.b = layer`` would keep calling the bare module under the other names.
        homes = {(id(_parent(model, n)[0]), _parent(model, n)[1]) for n in shared}
        if len(homes) > 1:
            raise ValueError(
                f"{name!r} is one module registered under several names ({', '.join(shared)}): "
                "a slot would replace it under one of them only; target a module that is not "
                "shared, or give each name its own module"
            )
    # A module inside a shared block goes by its first name (``named_modules``' own).
    return list(dict.fromkeys(aliases[id(model.get_submodule(n))][0] for n in matched))


# The load_state_dict pre-hook attach put on each model and each module between it and its
# slots, with the hook (weakly: the model owns its hooks).
_LOAD_CHECKS: weakref.WeakKeyDictionary[nn.Module, tuple[object, RemovableHandle]] = (
    weakref.WeakKeyDictionary()
)


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def _refuse_unreachable(model: nn.Module, name: str) -> None:
    """Refuse a module its parent never calls: a seed there would never run.

    ``nn.MultiheadAttention`` hands ``out_proj``'s weight and bias to
    ``F.multi_head_attention_forward`` (or a fused kernel) instead of calling it. A container
    with no ``forward`` (``ModuleList``, ``ModuleDict``, ``ParameterList``) is iterated or
    indexed by its parent, which a slot refuses: the model's own forward raised, in Python's
    words, at its first call.
    """
    host = model.get_submodule(name)
    if forward_owner(host) is nn.Module and "forward" not in vars(host):
        children = ", ".join(f"{name}.{child}" for child in list(host._modules)[:2])
        pattern = re.escape(name) + r"\.\w+"
        hint = f"its children ({children}, ...: the pattern {pattern})" if children else "its user"
        raise ValueError(
            f"{name!r}: a {type(host).__name__} has no forward (its parent iterates or indexes "
            f"it, never calls it), so a seed there would never run; target {hint}"
        )
    problem = uncallable_slot_problem(model, name)
    if problem is not None:
        raise ValueError(problem)
    parent, attr = _parent(model, name)
    if isinstance(parent, nn.MultiheadAttention) and attr == "out_proj":
        raise ValueError(
            f"{name!r}: nn.MultiheadAttention never calls out_proj as a module (it passes its "
            f"weight to a fused function), so a seed there would never run; target the "
            f"attention module itself ({name.rpartition('.')[0]!r}), whose output[0] it projects"
        )


def attach(
    model: nn.Module,
    targets: str | Collection[str],
    seeds_per_layer: int,
    chunk_size: int,
    *,
    chunk_dim: int | None = None,
    output_index: int = 0,
    kd_config: KDConfig | None = None,
    state: GPUStateTensor | None = None,
    embargo_epochs: int = 0,
    telemetry: TelemetryReporter | None = None,
    fault_limit: int = DEFAULT_FAULT_LIMIT,
) -> list[KasminaLayer]:
    """Wrap every submodule named by ``targets`` in a KasminaLayer; returns the slots in order.

    Each slot gets ``seeds_per_layer`` DORMANT seeds of ``chunk_size`` features along
    ``chunk_dim`` (default: channels, dim 1, for a ``ConvNd``; the last dim otherwise) of its
    output, or of element ``output_index`` of a tuple, list, dataclass or dict output; their product
    must equal that width. Seed ``k`` of the slot at ``name`` is called ``"<name>[k]"``. The
    slots share ``state`` (default: a new table of ``len(slots) * seeds_per_layer`` seeds on the
    model's device); slot ``i`` holds rows ``b + i * seeds_per_layer ...`` and REGION_ID
    ``r + i``, where ``b`` and ``r`` are 0, or on a given ``state`` follow the rows and regions
    taken on it (``_taken_rows``): those of ``model``'s slots (another ``attach`` with other
    widths) and every row not DORMANT or still followed by a seed, such as a detached slot's or
    another model's (a manager refuses two seeds on one row). Every seed gets ``fault_limit``
    (the faults it may commit before QUARANTINE). Raises ``ValueError``, leaving the model and
    ``state`` untouched, when a target matches nothing, a match is already a slot, nested in
    another or holds one, a declared width does not fit, ``state`` has too few rows after the
    taken ones, or ``output_index`` cannot pick a tensor of a host whose class fixes its output
    (``output_index_problem``).
    """
    seeds_per_layer, chunk_size = _checked_arguments(
        model, seeds_per_layer, chunk_size, kd_config, state
    )
    names = _checked_targets(model, targets, seeds_per_layer, chunk_size, chunk_dim, output_index)
    total = len(names) * seeds_per_layer
    state, base, region = _table_rows(model, state, total, embargo_epochs, telemetry)
    # Build every slot before touching the model, so a bad shape leaves it unchanged.
    layers = []
    for i, name in enumerate(names):
        host = model.get_submodule(name)
        layer = KasminaLayer(
            host,
            seeds_per_layer,
            chunk_size,
            chunk_dim=default_chunk_dim(host) if chunk_dim is None else chunk_dim,
            output_index=output_index,
            kd_config=kd_config,
            state=state,
            state_offset=base + i * seeds_per_layer,
            layer_id=name,
            region_id=region + i,
            fault_limit=fault_limit,
        )
        layers.append(layer)
    install(model, dict(zip(names, layers, strict=True)))
    add_load_checks(model)
    return layers


def _checked_arguments(
    model: nn.Module,
    seeds_per_layer: int,
    chunk_size: int,
    kd_config: KDConfig | None,
    state: GPUStateTensor | None,
) -> tuple[int, int]:
    """``attach``'s arguments checked by type and range, whatever the caller passed; returns
    the two counts as ``check_positive_int`` gives them."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"attach wraps submodules of an nn.Module, got {type(model).__name__}")
    seeds_per_layer = check_positive_int("seeds_per_layer", seeds_per_layer)
    chunk_size = check_positive_int("chunk_size", chunk_size)
    if kd_config is not None and not isinstance(kd_config, KDConfig):
        raise TypeError(
            f"kd_config must be a KDConfig or None, got {type(kd_config).__name__} "
            "(KDConfig(**settings) builds one)"
        )
    check_seed_kd(kd_config, "kd_config")
    if state is not None and not isinstance(state, GPUStateTensor):
        raise TypeError(f"state must be a GPUStateTensor or None, got {type(state).__name__}")
    return seeds_per_layer, chunk_size


def _checked_targets(
    model: nn.Module,
    targets: str | Collection[str],
    seeds_per_layer: int,
    chunk_size: int,
    chunk_dim: int | None,
    output_index: int,
) -> list[str]:
    """The modules ``targets`` selects (``_resolve``), each refused unless a slot can wrap it:
    not nested in another, called by its parent, its declared layout fitting the seeds."""
    names = _resolve(model, targets)
    _refuse_nesting(model, names)
    for name in names:  # and each layout the host declares, before a table is allocated
        _refuse_unreachable(model, name)
        host = model.get_submodule(name)
        checked_chunk_dim(host, seeds_per_layer, chunk_size, chunk_dim, output_index, name)
    return names


def _table_rows(
    model: nn.Module,
    state: GPUStateTensor | None,
    total: int,
    embargo_epochs: int,
    telemetry: TelemetryReporter | None,
) -> tuple[GPUStateTensor, int, int]:
    """The table the new slots' ``total`` seeds go on, and their first row and region: a new
    table on the model's device when ``state`` is None, else after every row taken on ``state``
    (``_taken_rows``), refused when too few rows are left."""
    base = region = 0
    if state is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        state = GPUStateTensor(total, device, embargo_epochs=embargo_epochs, telemetry=telemetry)
    else:  # after every taken row: the model's slots' (an earlier attach) and any other
        rows = _taken_rows(model, state)
        base = max(rows, default=-1) + 1
        if rows:
            region = int(state.state_tensor[rows, StateColumn.REGION_ID].max()) + 1
        if state.num_seeds < base + total:
            raise ValueError(
                f"state table has {state.num_seeds} seeds; the model's slots and the seeds not "
                f"DORMANT or still following theirs (a detached slot's, another model's) hold "
                f"rows up to {base}, and attach needs {total} more; give it a larger table or none"
            )
    return state, base, region


def _taken_rows(model: nn.Module, state: GPUStateTensor) -> list[int]:
    """The rows of ``state`` a new seed must not get: those of ``model``'s slots on it, and
    every row that is not DORMANT or that a live seed or owner follows. A slot taken out by
    ``detach`` or ``merge`` keeps its rows, stages and observers (its seeds still mirror them),
    and another model's slots are not in ``model``: a new seed on such a row started in that
    row's stage (ACTIVE: an untrained kernel live, with no lifecycle) and shared it."""
    gc.collect()  # a closed manager's cycles hold seeds until a pass: rows by timing else
    mine = {
        seed.state_index
        for m in model.modules()
        if isinstance(m, KasminaLayer) and m.state_table is state
        for seed in m.seeds
    }
    stages = state.stages()
    busy = (i for i, s in enumerate(stages) if s != SeedStage.DORMANT or state.followed(i))
    return sorted(mine.union(busy))


def install(model: nn.Module, layers: Mapping[str, KasminaLayer]) -> None:
    """Put each slot of ``layers`` in place of the module at its name in ``model``, all or none
    (a parent's ``__setattr__`` that raises: those put in place are taken out again), as every
    installer of slots does (``attach``, ``kasmina.load``), deciding what depends on where it
    sits: inside an ``nn.TransformerEncoderLayer`` it guards that layer's fused path
    (``guards_fused_path``: while a seed runs the layer takes its regular path, which calls the
    slot)."""
    done: list[tuple[nn.Module, str, KasminaLayer]] = []
    try:
        for name, layer in layers.items():
            parent, attr = _parent(model, name)
            layer.guards_fused_path = isinstance(parent, nn.TransformerEncoderLayer)
            setattr(parent, attr, layer)
            done.append((parent, attr, layer))
    except BaseException:
        for parent, attr, layer in reversed(done):
            setattr(parent, attr, layer.host)
        raise


def uncallable_slot_problem(model: nn.Module, name: str) -> str | None:
    """Why a slot at ``name`` could not take its module's place (None: it can). A scripted
    parent (``torch.jit.script``) calls the module its compiled forward was built with and
    refuses another in its place."""
    parent, attr = _parent(model, name)
    if isinstance(parent, torch.jit.ScriptModule):
        where = f"{name.rpartition('.')[0]!r}" if "." in name else "the model"
        return (
            f"{name!r} is inside a scripted module ({where}, torch.jit.script), whose compiled "
            f"forward cannot call a slot; attach before scripting, or target a module outside it"
        )
    return None


def _refuse_nesting(model: nn.Module, names: Collection[str]) -> None:
    """``ValueError`` for a target inside another target or an existing slot, or holding an
    existing slot (detach and merge would find it moved), by module identity: a block the
    model also registers under a second parent hides one path from the names."""
    targets = {name: model.get_submodule(name) for name in names}
    slots = [(n, m) for n, m in model.named_modules() if n and isinstance(m, KasminaLayer)]
    for name, module in targets.items():
        below = {id(m) for m in module.modules() if m is not module}
        for other, inner in targets.items():
            if id(inner) in below:
                raise ValueError(f"{other!r} is nested inside {name!r}; target one of them")
        for slot_name, slot in slots:
            if id(slot) in below:
                raise ValueError(f"{name!r} holds the slot {slot_name!r}; target one of them")
            if any(m is module for m in slot.modules()):
                raise ValueError(f"{name!r} is nested inside {slot_name!r}; target one of them")


def add_load_checks(model: nn.Module) -> None:
    """Put the ``load_state_dict`` pre-hook on ``model`` that asks every seed in it to check
    its incoming state before any module loads (``check_seed_states``), once: a load refused
    by any seed then changes no module of the model (PyTorch loads module by module, and each
    slot's own hook runs only when the load reaches it). Each module between the model and a
    slot gets one too (:func:`check_states_loaded_here`), for a load of that module alone
    (``model.encoder.load_state_dict``), and one no slot is below any more loses it. Whoever
    installs or removes slots calls it (``attach``, ``kasmina.load``, ``detach``);
    ``remove_load_checks`` takes them all off."""
    modules = dict(model.named_modules())
    between = {
        ".".join(parts[:i])
        for name, module in modules.items()
        if isinstance(module, KasminaLayer)
        for parts in [name.split(".")]
        for i in range(1, len(parts))
    }
    for name, module in modules.items():
        if isinstance(module, KasminaLayer):  # its own, from its construction
            continue
        hook = check_states_loaded_here if name in between else None
        hook = hook if name else check_seed_states  # the model's own: every load it is in
        held = _LOAD_CHECKS.get(module)
        if held is not None and held[0] is not hook:
            held[1].remove()
            del _LOAD_CHECKS[module]
        if hook is not None and module not in _LOAD_CHECKS:
            _LOAD_CHECKS[module] = (hook, module.register_load_state_dict_pre_hook(hook))
    hf.sync(model)


def kasmina_layers(model: nn.Module) -> list[KasminaLayer]:
    """Every KasminaLayer in ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, KasminaLayer)]


def slot_list(given: Any, what: str) -> list[KasminaLayer]:
    """``given`` (one slot, or any iterable of slots: what ``attach`` returns) as a list; anything
    else (a module's name) is a ``TypeError`` naming ``what`` and the first wrong item."""
    one = isinstance(given, str | KasminaLayer) or not hasattr(given, "__iter__")
    slots = [given] if one else list(given)
    for slot in slots:
        if not isinstance(slot, KasminaLayer):
            raise TypeError(
                f"{what} must hold the model's slots (KasminaLayer, as attach returns them; "
                f"model.get_submodule(name) for a name), got {type(slot).__name__} {slot!r:.60}"
            )
    return slots


def given_slots(model: nn.Module, slots: Any) -> list[KasminaLayer]:
    """The slots a manager registers: ``slots`` (checked by ``slot_list``), or when none are
    given (None, or empty) every slot in ``model``."""
    return (slot_list(slots, "slots") if slots is not None else []) or kasmina_layers(model)


def fill_constants(model: nn.Module) -> list[str]:
    """Rebuild every slot's constants that a deferred init left on ``meta`` where its host's
    parameters are real (``seeds.constants.rebuild_constants``); their names in ``model``."""
    named = ((name, m) for name, m in model.named_modules() if isinstance(m, KasminaLayer))
    return [f"{name}.{n}" if name else n for name, m in named for n in rebuild_constants(m)]


def detach(model: nn.Module, *, only: Collection[KasminaLayer] | None = None) -> list[KasminaLayer]:
    """Put every wrapped module (or those of the slots in ``only``) back in place of its
    KasminaLayer; returns the removed slots. ``only`` holds slots (what ``attach`` returns):
    anything else (a module's name) is a ``TypeError``, and a slot not in ``model`` (the original
    of a deep copy's) a ``ValueError`` before any is detached, not a silent no-op."""
    if only is not None:
        only = slot_list(only, "only")
    chosen = None if only is None else {id(slot) for slot in only}
    slots = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, KasminaLayer) and (chosen is None or id(m) in chosen)
    ]
    if any(name == "" for name, _ in slots):
        raise ValueError("the model itself is a KasminaLayer; use its .host")
    if only is not None and len(slots) < len(chosen):  # another model's (a copy's are its own)
        here = {id(m) for _, m in slots}
        absent = sorted({slot.layer_id for slot in only if id(slot) not in here})
        raise ValueError(
            f"only holds slots that are not in the model: {absent[:4]} (a deep copy has slots of "
            "its own: take them from it, model.get_submodule(name)); nothing was detached"
        )
    for name, layer in slots:
        parent, attr = _parent(model, name)
        setattr(parent, attr, layer.host)
        hf.unslot(layer)
    hf.sync(model)
    if any(isinstance(m, KasminaLayer) for m in model.modules()):
        add_load_checks(model)  # the modules above the removed slots only: theirs go
    else:
        remove_load_checks(model)
    return [layer for _, layer in slots]


def remove_load_checks(model: nn.Module) -> None:
    """Remove the ``load_state_dict`` pre-hook ``attach`` put on ``model`` or any module in it,
    once their slots are gone (``detach``, ``kasmina.merge``): what is left must load, run and
    pickle without Kasmina. A deep copy or an unpickled model holds the hook without a handle
    here, so it is found by its function."""
    hf.sync(model)  # ``kasmina.merge`` comes here once the slots are replaced
    for module in model.modules():
        held = _LOAD_CHECKS.pop(module, None)
        if held is not None:
            held[1].remove()
        hooks = module._load_state_dict_pre_hooks
        for key, hook in list(hooks.items()):
            if getattr(hook, "hook", hook) in (check_seed_states, check_states_loaded_here):
                del hooks[key]


def collect_kd_losses(model: nn.Module) -> torch.Tensor | None:
    """Sum (and clear) the KD losses of every slot and stand-alone seed in ``model``, or None."""
    losses = []
    for module in model.modules():
        if isinstance(module, KasminaLayer):
            loss = module.get_and_clear_kd_losses()
        elif isinstance(module, GradientIsolatedSeed):
            loss = module.get_and_clear_kd_losses()
        else:
            continue
        if loss is not None:
            losses.append(loss)
    return sum_kd_losses(losses)
