"""Gradient isolation, verified (docs/design.md §4): a graph walk, a two-phase monitor, a breaker.

Isolation is enforced structurally (seeds see ``x.detach()``, optimizers own disjoint parameter
sets); this module checks that the structure holds:

- ``verify_gradient_isolation`` walks the autograd graph from a seed's output and fails if it
  reaches a host parameter, i.e. if any gradient of that output could flow into the host.
  ``check_graph`` counts only a path it can attribute: an output that came out of a compiled
  region (``torch.compile`` with an AOT backend) reaches every input of the region's one
  backward node, so there the walk says nothing; the phase checks below (and the manager's
  kernel-input check, docs/design.md §4) are the evidence.
- ``GradientIsolationMonitor`` brackets backward passes. During a *seed* backward (a loss only
  the seed may learn from, e.g. KD) the host's grads are set aside and must stay ``None``/zero;
  during a *host* backward the seed's likewise. The check is one ``leak_check`` launch whose flag
  stays on the device until ``verify_isolation_after_step`` reads it, once per step. Whatever
  leaked is discarded when the set-aside grads are put back, so a leak never reaches an
  optimizer. Backward hooks on parameters are an optional debug mode (they sync per gradient).
- After ``max_violations`` violating steps the circuit breaker trips: the seed is sent to
  QUARANTINE through ``on_quarantine``, an emergency checkpoint is written atomically into the
  configured directory, and ``GradientIsolationViolationError`` is raised. The monitor is inert
  for that seed from then on; the host keeps training. Given a ``checkpoint_signer`` (a
  manager's monitors are), the emergency checkpoint is a signed file of that run
  (``<run_id>.emergency_isolation_<seed>_<ns>.ckpt``, read back only through
  ``CheckpointSigner.read(path, kind="emergency")``), so it is as tamper-evident as an epoch
  checkpoint; a stand-alone monitor writes a plain ``torch.save`` file.
"""

from __future__ import annotations

import getpass
import logging
import os
import re
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from glob import escape as glob_escape
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kasmina.errors import GradientIsolationViolationError
from kasmina.isolation.stepping import torch_norms
from kasmina.isolation.verify import HostIndex, NamedParams, graph_isolation, named_params
from kasmina.leyline import MetricType
from kasmina.ops.backend import SUPPORTED_DTYPES
from kasmina.ops.grad_norms import leak_check
from kasmina.utils.atomic import remove_stale_temporaries
from kasmina.utils.checks import check_non_negative, check_positive_int
from kasmina.utils.state_io import CheckpointSigner, atomic_torch_save

logger = logging.getLogger(__name__)

# Emergency checkpoints kept per directory (and run): a seed that trips its breaker again and
# again (culled and germinated anew) writes one per trip, and nothing reads them but a person.
EMERGENCY_KEEP = 64


def _gradient_params(params: list[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    """The parameters that can carry a gradient (floating or complex, whatever their dtype)."""
    return [(name, p) for name, p in params if p.is_floating_point() or p.is_complex()]


def host_index(host_params: NamedParams) -> HostIndex:
    """The host side a monitor watches (its gradient-carrying parameters), built once: one
    shared by many monitors (a manager's, ``IsolationGuard.new_monitor``) is read by each
    step's graph checks as it is."""
    return HostIndex(_gradient_params(named_params(host_params, "host")))


def leak_check_any(
    grads: list[torch.Tensor], tol: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``ops.leak_check`` over gradients of any dtype: one launch when all are of those the op
    takes (fp32, fp16, bf16), else torch's own norms in float64 (``torch_norms``: a model cast with
    ``.double()`` after its seeds' monitors were made: the op's refusal escaped the backward),
    fp32 norms and a flag either way."""
    if all(g.dtype in SUPPORTED_DTYPES for g in grads):
        return leak_check(grads, tol)
    norms = torch_norms(grads)
    return norms.float(), (norms <= tol).logical_not_().any()


def _user_tag() -> str:
    try:
        return re.sub(r"[^A-Za-z0-9_.-]", "_", getpass.getuser())
    except (KeyError, OSError):
        return str(os.getuid()) if hasattr(os, "getuid") else "user"


def default_emergency_dir() -> Path:
    """Per-user directory under the system temp dir, used when none is configured.

    If that path exists but belongs to someone else (a shared temp dir), a fresh private
    directory is created instead rather than writing into one another user controls.
    """
    path = Path(tempfile.gettempdir()) / f"kasmina-{_user_tag()}" / "emergency"
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    if hasattr(os, "getuid") and path.stat().st_uid != os.getuid():
        return Path(tempfile.mkdtemp(prefix="kasmina-emergency-"))
    return path


@dataclass
class _PendingCheck:
    phase: str
    names: list[str]
    norms: torch.Tensor
    flag: torch.Tensor


class GradientIsolationMonitor:
    """Two-phase isolation check and circuit breaker for one seed."""

    def __init__(
        self,
        seed_id: str,
        seed_params: NamedParams,
        host_params: NamedParams | HostIndex,
        *,
        max_violations: int = 3,
        checkpoint_dir: str | Path | None = None,
        checkpoint_signer: CheckpointSigner | None = None,
        on_quarantine: Callable[[], None] | None = None,
        state_provider: Callable[[], dict[str, Any]] | None = None,
        telemetry: Any | None = None,
        tol: float = 0.0,
    ) -> None:
        # Checked here, not at the first backward: ``leak_check`` refused a bad tol only then,
        # out of a training step (and a float64 model's norms compared with it as it was).
        self.max_violations = check_positive_int("max_violations", max_violations)
        self.tol = float(check_non_negative("tol", tol))
        self.seed_id = seed_id
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.checkpoint_signer = checkpoint_signer
        self.on_quarantine = on_quarantine
        self.state_provider = state_provider
        self.telemetry = telemetry
        self._seed = _gradient_params(named_params(seed_params, "seed"))
        # Shared, never changed in place (``extend_host`` replaces it): ``host_index``.
        if not isinstance(host_params, HostIndex):
            host_params = host_index(host_params)
        self._host_index = host_params
        host = host_params.names  # looked up per seed parameter, not built per monitor
        shared = [host[id(p)] for _, p in self._seed if id(p) in host]
        if shared:
            logger.error("seed %s shares host parameters %s", seed_id, shared)
        self.violation_count = 0
        self.violations: list[list[str]] = []
        self.tripped = False
        self.last_checkpoint: Path | None = None
        self._phase: str | None = None
        self._stash: list[torch.Tensor | None] = []
        self._pending: list[_PendingCheck] = []
        self._noted: list[str] = []  # leaks found by hooks or graph checks this step
        self.unattributed_graphs = 0  # graph checks that could not tell (compiled outputs)
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []

    @property
    def _host(self) -> list[tuple[str, torch.Tensor]]:
        """The host's parameters this monitor watches, named."""
        return self._host_index.params

    # ------------------------------------------------------------------ phases
    def begin_seed_backward(self) -> None:
        """Host grads are set aside; the coming backward must not produce any."""
        self._begin("seed", self._host)

    def end_seed_backward(self) -> None:
        self._end("seed", self._host)

    def begin_host_backward(self) -> None:
        """Seed grads are set aside; the coming backward must not produce any."""
        self._begin("host", self._seed)

    def end_host_backward(self) -> None:
        self._end("host", self._seed)

    def _begin(self, phase: str, watched: list[tuple[str, torch.Tensor]]) -> None:
        if self.tripped:
            return
        if self._phase is not None:
            raise RuntimeError(f"{phase} backward begun while the {self._phase} phase is open")
        self._stash = [p.grad for _, p in watched]
        for _, p in watched:
            p.grad = None
        self._phase = phase

    def _end(self, phase: str, watched: list[tuple[str, torch.Tensor]]) -> None:
        if self.tripped:
            return
        if self._phase != phase:
            raise RuntimeError(f"end_{phase}_backward without begin_{phase}_backward")
        try:
            # Only grads created during the phase can leak; all None needs no launch at all.
            by_device: dict[torch.device, list[tuple[str, torch.Tensor]]] = defaultdict(list)
            for name, p in watched:
                if p.grad is not None:  # a sparse one (an Embedding's) by its values
                    g = p.grad._values() if p.grad.is_sparse else p.grad
                    by_device[g.device].append((name, g))
            for group in by_device.values():
                norms, flag = leak_check_any([g for _, g in group], self.tol)
                self._pending.append(_PendingCheck(phase, [n for n, _ in group], norms, flag))
        finally:  # the set-aside grads come back whatever happens; leaked ones are dropped
            for (_, p), grad in zip(watched, self._stash, strict=True):
                p.grad = grad
            self._stash = []
            self._phase = None

    @contextmanager
    def seed_backward(self) -> Iterator[None]:
        """``with monitor.seed_backward(): kd_loss.backward()`` (begin/end, even on error)."""
        self.begin_seed_backward()
        try:
            yield
        finally:
            self.end_seed_backward()

    @contextmanager
    def host_backward(self) -> Iterator[None]:
        """``with monitor.host_backward(): host_loss.backward()`` (begin/end, even on error)."""
        self.begin_host_backward()
        try:
            yield
        finally:
            self.end_host_backward()

    def check_graph(self, seed_output: torch.Tensor) -> bool | None:
        """Graph-walk ``seed_output``; a path to the host counts at the next step's verify.

        None, counting nothing, when the host is reachable only through a compiled region's
        backward node (``verify.graph_isolation``): under ``torch.compile`` with an AOT backend
        the seed's output is an output of that node, which reaches every parameter the region
        read, so the walk cannot tell a leak from a clean seed. Logged once per monitor."""
        verdict = graph_isolation(seed_output, self._host_index)
        if verdict is False and not self.tripped:
            self._noted.append("graph: seed output reaches a host parameter")
        elif verdict is None:
            self.unattributed_graphs += 1
            if self.unattributed_graphs == 1:
                logger.warning(
                    "seed %s: its output comes from a compiled region whose backward is one "
                    "node; the graph walk cannot attribute it and counts nothing for such "
                    "outputs (docs/design.md §4 lists the checks that still run)",
                    self.seed_id,
                )
        return verdict

    def extend_host(self, params: Iterable[torch.Tensor], prefix: str) -> None:
        """Put ``params`` on the host side too (a seed promoted to ACTIVE after this monitor's
        seed germinated), named ``prefix[i]``: the graph walk and leak checks watch them now.
        Monitors that shared their host side share the extended one (``HostIndex.extended``)."""
        self._host_index = self._host_index.extended(list(params), prefix, _gradient_params)

    def note_violation(self, reason: str) -> None:
        """Count a leak found outside this monitor (e.g. in a seed-only backward shared by
        several seeds) at the next ``verify_isolation_after_step``."""
        if not self.tripped:
            self._noted.append(reason)

    # ------------------------------------------------------------------ verdict
    def verify_isolation_after_step(self, *, count: bool = True) -> bool:
        """Read this step's leak flags (the one host sync) and count a violation if any leaked.

        Returns True for a clean step, False for a violating one (and for every call after the
        breaker tripped: the monitor is inert). Raises ``GradientIsolationViolationError`` on
        the violation that trips the breaker. ``count=False``: a step already counted (checked
        before, after an earlier micro-batch): the evidence read and the verdict given, nothing
        counted again.
        """
        if self.tripped:
            return False
        if self._phase is not None:
            raise RuntimeError(f"the {self._phase} backward phase is still open")
        pending, self._pending = self._pending, []
        leaked, self._noted = self._noted, []
        if pending:
            device = pending[0].flag.device
            flags = [check.flag.to(device) for check in pending]
            any_leak = flags[0] if len(flags) == 1 else torch.stack(flags).any()
            if bool(any_leak):
                leaked += self._describe(pending)
        if not leaked:
            return True
        if not count:
            return False
        self.violation_count += 1
        self.violations.append(leaked)
        logger.error(
            "gradient isolation violation %d/%d for seed %s: %s",
            self.violation_count,
            self.max_violations,
            self.seed_id,
            "; ".join(leaked),
        )
        self._emit("gradient_isolation_violation", float(self.violation_count))
        if self.violation_count >= self.max_violations:
            self._trip()
        return False

    def _describe(self, pending: list[_PendingCheck]) -> list[str]:
        out = []
        for check in pending:
            if not bool(check.flag):
                continue
            other = "host" if check.phase == "seed" else "seed"
            for name, norm in zip(check.names, check.norms.tolist(), strict=True):
                if not norm <= self.tol:  # also catches NaN
                    out.append(f"{other} grad {name} |g|={norm:.3g} during {check.phase} backward")
        return out

    def _trip(self) -> None:
        self.tripped = True
        self.clear_hooks()
        logger.critical(
            "circuit breaker: seed %s quarantined after %d gradient isolation violations",
            self.seed_id,
            self.violation_count,
        )
        if self.on_quarantine is not None:
            try:
                self.on_quarantine()
            except Exception:  # the breaker must still checkpoint and raise
                logger.exception("on_quarantine callback failed for seed %s", self.seed_id)
        path = self._write_emergency_checkpoint()
        self._emit("gradient_isolation_circuit_breaker", float(self.violation_count))
        error = GradientIsolationViolationError(
            f"seed {self.seed_id}: {self.violation_count} gradient isolation violations; "
            f"seed quarantined; emergency checkpoint: {path}"
        )
        error.seed_id = self.seed_id  # type: ignore[attr-defined]
        error.checkpoint_path = path  # type: ignore[attr-defined]
        raise error

    def _write_emergency_checkpoint(self) -> Path | None:
        directory = self.checkpoint_dir
        if directory is None:
            directory = default_emergency_dir()
            logger.warning(
                "no checkpoint_dir configured: emergency checkpoint goes to %s", directory
            )
        payload: dict[str, Any] = {
            "seed_id": self.seed_id,
            "violation_count": self.violation_count,
            "violations": self.violations,
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        if self.state_provider is not None:
            try:
                payload["state"] = self.state_provider()
            except Exception:
                logger.exception("state_provider failed; emergency checkpoint without state")
        safe_id = re.sub(r"[^A-Za-z0-9_-]", "_", self.seed_id)  # no dot: ``_OURS``
        signer = self.checkpoint_signer
        prefix, suffix = (f"{signer.run_id}.", ".ckpt") if signer else ("", ".pt")
        stamp = _next_stamp(Path(directory), f"{prefix}emergency_isolation_", suffix)
        path = Path(directory) / f"{prefix}emergency_isolation_{safe_id}_{stamp}{suffix}"
        try:
            if signer is not None:
                self.last_checkpoint = signer.write(payload, path, kind="emergency")
            else:
                self.last_checkpoint = atomic_torch_save(payload, path)
        except Exception:
            logger.exception("could not write the emergency checkpoint to %s", path)
            return None
        logger.critical("emergency checkpoint for seed %s written to %s", self.seed_id, path)
        _prune_emergency(path, f"{prefix}emergency_isolation_", suffix)
        remove_stale_temporaries(path.parent, emergency_names(prefix, suffix))  # killed writes
        return self.last_checkpoint

    # ------------------------------------------------------------------ debug hooks
    def register_hooks(self, host_model: nn.Module, seed_model: nn.Module) -> None:
        """Debug mode: a hook on every parameter flags a nonzero grad on the wrong side.

        Each hook reads its gradient on the host (a device sync per parameter), so this is for
        finding *which* layer leaks, not for production steps. Only the parameters the monitor
        was built with on each side are hooked (a host side given without its seeds' kernels
        hooks none of them).
        """
        self.clear_hooks()
        for side, model in (("host", host_model), ("seed", seed_model)):
            watched = {id(p) for _, p in (self._host if side == "host" else self._seed)}
            for name, p in model.named_parameters():
                if p.requires_grad and id(p) in watched:
                    hook = partial(self._on_grad, side, f"{side}.{name}")
                    self._hooks.append(p.register_hook(hook))

    def clear_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def _on_grad(self, side: str, name: str, grad: torch.Tensor | None) -> None:
        wrong_phase = "seed" if side == "host" else "host"
        if self.tripped or self._phase != wrong_phase or grad is None:
            return  # (None: a seed's backward guard had no gradient for it; nothing leaked)
        if bool((grad != 0).any()):
            logger.critical(
                "gradient leak: %s got a gradient during %s backward", name, self._phase
            )
            self._noted.append(f"hook: {name} during {self._phase} backward")

    def _emit(self, name: str, value: float) -> None:
        if self.telemetry is not None:
            self.telemetry.emit(
                name, value, MetricType.METRIC_TYPE_EVENT, labels={"seed_id": self.seed_id}
            )


def _stamp_ns(path: Path, suffix: str) -> int:
    """The time in an emergency checkpoint's name (``..._<time_ns><suffix>``); -1 if none."""
    stamp = path.name[: -len(suffix)].rpartition("_")[2]
    return int(stamp) if stamp.isdigit() else -1


# What follows a monitor's prefix in its checkpoints' names: a seed id without dots and a time.
# A run id may hold dots and underscores, so another run's files in a shared directory can
# start with the prefix ("exp." + "emergency_isolation_" is how run "exp.emergency_isolation_b"
# starts); each of those has a dot past it, and rotation deleted them as the oldest.
_OURS = r"[A-Za-z0-9_-]+_[0-9]+"


def _emergency_files(directory: Path, prefix: str, suffix: str) -> list[Path]:
    ours = re.compile(re.escape(prefix) + _OURS + re.escape(suffix))
    found = directory.glob(f"{glob_escape(prefix)}*{suffix}")
    return [p for p in found if ours.fullmatch(p.name) and p.is_file()]


def _next_stamp(directory: Path, prefix: str, suffix: str) -> int:
    """The time for the next emergency checkpoint's name: now, or past the newest one there
    (a clock stepped back would name the newest file the oldest, and pruning deletes those)."""
    try:
        files = _emergency_files(directory, prefix, suffix)
    except OSError:  # not there yet: the write makes it
        files = []
    newest = max((_stamp_ns(p, suffix) for p in files), default=-1)
    return max(time.time_ns(), newest + 1)


def _prune_emergency(written: Path, prefix: str, suffix: str) -> None:
    """Keep ``written`` (the checkpoint just written) and the newest ``EMERGENCY_KEEP - 1``
    other emergency checkpoints named ``<prefix>...<time_ns><suffix>`` beside it; delete the
    rest, oldest first by the time in the name (``_next_stamp`` names each file after the
    ones there). The one just written is never a candidate."""
    directory = written.parent
    try:
        found = [p for p in _emergency_files(directory, prefix, suffix) if p != written]
        by_time = sorted(found, key=lambda p: _stamp_ns(p, suffix))
        for old in by_time[: max(0, len(found) - (EMERGENCY_KEEP - 1))]:
            old.unlink(missing_ok=True)
            logger.info("deleted the old emergency checkpoint %s", old)
    except OSError:
        logger.warning("could not prune emergency checkpoints in %s", directory, exc_info=True)


def emergency_names(prefix: str, suffix: str) -> str:
    """The regular expression of the emergency checkpoints' names a monitor writes with
    ``prefix`` (``"<run_id>."`` when signed) and ``suffix`` (``.ckpt`` signed, else ``.pt``)."""
    return re.escape(f"{prefix}emergency_isolation_") + _OURS + re.escape(suffix)
