"""Every Kasmina setting in one validated dataclass.

Defaults are safe for a single machine: the Urza store is a local directory and each run keeps
its state (checkpoints, emergency checkpoints) in its own directory
``<cache>/kasmina/runs/<run_id>/`` under the user's cache directory (``$KASMINA_HOME``,
``$XDG_CACHE_HOME/kasmina`` or ``~/.cache/kasmina``), never the working directory and never
another run's. HMAC keys are never part of the configuration itself, only where to find them;
Urza publisher *public* keys are (they verify artifacts and cannot sign one).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kasmina.control.auth import MAX_FRESHNESS_S
from kasmina.control.commands import MAX_EMBARGO_EPOCHS
from kasmina.control.ledger import DURABILITY_MODES, LEDGER_FILE_NAME
from kasmina.kd.config import KDConfig, check_seed_kd
from kasmina.manager.config_values import (
    absolute_path,
    bounded_number,
    id_tuple,
    optional_path,
    publisher_keys,
)
from kasmina.ops.backend import backend
from kasmina.urza.artifact import absolute_local_url
from kasmina.urza.cache import DEFAULT_MAX_KERNELS
from kasmina.urza.keys import TrustedPublishers
from kasmina.urza.redaction import redact_urls
from kasmina.urza.resilience import STORE_SETTINGS, check_store_settings
from kasmina.utils.checks import check_int, check_positive
from kasmina.utils.jsonl_sink import DEFAULT_JSONL_MAX_BYTES
from kasmina.utils.keyring import Keyring, command_keyring
from kasmina.utils.state_io import check_checkpoint_key

__all__ = ["KasminaConfig", "default_cache_root"]

_TEACHER_DTYPES = ("float32", "bfloat16", "float16")
# Strings a path setting refuses: a flag's spelling, from a file or a command line.
_NOT_PATHS = frozenset({"true", "false", "yes", "no", "on", "off", "0", "1", "none", "null"})
# Where epoch checkpoints are kept (see KasminaConfig.checkpoint_mode).
CHECKPOINT_MODES = ("disk", "memory", "off")


def default_cache_root() -> Path:
    """``$KASMINA_HOME``, else ``$XDG_CACHE_HOME/kasmina``, else ``~/.cache/kasmina``."""
    home = os.environ.get("KASMINA_HOME", "").strip()
    if home:
        return Path(home)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "kasmina"


def _default_urza_url() -> str:
    return str(default_cache_root() / "urza")


def _default_runs_root() -> str:
    return str(default_cache_root() / "runs")


def new_run_id() -> str:
    """A fresh run id: the UTC start time and 32 random bits (``20261201-175133-9f2c4e1a``)."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(4)


RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# The run's checkpoint key file when ``checkpoint_key_file`` is unset, in its run directory.
CHECKPOINT_KEY_NAME = "checkpoint.key"
# A run's checkpoint lock is ``.<run_id>`` this, in its checkpoint directory (checkpoints.py).
CHECKPOINT_LOCK_SUFFIX = ".checkpoints.lock"
_RUN_DIRS = (("checkpoint_dir", "checkpoints"), ("emergency_checkpoint_dir", "emergency"))
# Optional file settings: None (unset) or a non-empty path, kept as a string.
_OPTIONAL_PATHS = tuple(
    "urza_publishers_file hmac_keys_file checkpoint_key_file teacher_checkpoint_path "
    "telemetry_jsonl_path".split()
)


# Settings a manager reads at each use (the gates, GRAFTING's schedule): set on a config a
# manager holds, one applies from its next use, validated as the constructor validates it. The
# manager read every other setting when it was built (devices, stores, keys, paths, KD, limits),
# so a change to one would apply half-way, or not at all: refused (``KasminaConfig.hold``).
LIVE_FIELDS = frozenset(
    "performance_gate g5_max_metric_drop max_seed_cost_ratio latency_budget_ms "
    "min_isolated_epochs grafting_steps grafting_temperature".split()
)


# Settings an earlier version had, and what a saved config holding one should say instead.
_REMOVED_SETTINGS = {
    "urza_trusted_key_ids": "artifacts are signed with Ed25519 publisher keys now; set "
    "urza_trusted_publishers to {key id: public key}",
    "checkpoints_kept": "set max_rollback_epochs, the epochs a ROLLBACK may reach back (the "
    "checkpoints kept follow from it and checkpoint_every_epochs)",
}


@dataclass
class KasminaConfig:
    """Settings of one Kasmina executor (see each field's comment for its unit and meaning).

    A manager holds its config (:meth:`hold`): from then on the fields in ``LIVE_FIELDS`` may be
    set (validated, applied from their next use) and the others are read-only."""

    # Where seeds' kernels run: "auto" picks CUDA when available, else CPU.
    device: str = "auto"
    # Byte budget of the GPU-resident kernel cache (parameters + buffers of cached kernels).
    cache_size_mb: float = 512.0
    # Kernels the cache holds at most, pinned ones included (>= 1): each also keeps its program
    # on the host (about 100 KB for a tiny one), which cache_size_mb does not count.
    cache_max_kernels: int = DEFAULT_MAX_KERNELS

    # --- Urza artifact store -------------------------------------------------------------
    # Any fsspec URL; a plain local directory is the embedded default.
    urza_url: str = field(default_factory=_default_urza_url)
    # Per-operation timeout of one store read (seconds).
    urza_timeout_s: float = 10.0
    # Extra attempts after a failed read (0 = try once).
    urza_retries: int = 3
    # First retry delay; doubles per attempt up to urza_backoff_max_s.
    urza_backoff_s: float = 0.1
    urza_backoff_max_s: float = 2.0
    # Consecutive failed fetches (manifest + payload, after retries) that open the breaker.
    urza_breaker_threshold: int = 5
    # Seconds an open breaker waits before letting one trial request through.
    urza_breaker_reset_s: float = 30.0
    # Publishers whose artifacts this trainer loads: key id -> Ed25519 *public* key (base64 or
    # hex of its 32 raw bytes, as 'kasmina keygen --publisher' prints). Nothing here can sign.
    # With none (and no urza_publishers_file) no publisher is trusted: every artifact is refused.
    urza_trusted_publishers: dict[str, str] = field(default_factory=dict)
    # JSON file {"key_id": "public key", ...}, merged with urza_trusted_publishers.
    urza_publishers_file: str | None = None

    # --- Authentication (docs/design.md §5) -------------------------------------------------------
    # Environment variable holding the HMAC keyring ("id:hex,..." or a JSON object).
    hmac_keys_env: str = "KASMINA_HMAC_KEYS"
    # JSON key file {"key_id": "hex"}; when set it is used instead of the environment variable.
    hmac_keys_file: str | None = None
    # Commands whose timestamp is further than this from now are rejected (seconds, in
    # (0, 3600]: a longer window only lengthens the time a captured command stays replayable).
    command_freshness_s: float = 60.0
    # Key ids whose signatures count on commands; empty = any key in the keyring.
    command_key_ids: tuple[str, ...] = ()
    # Accepted nonces kept on disk so a restarted trainer refuses replays (docs/design.md §5):
    # True = <run_dir>/nonces.log, a path = that file, False = memory only (then a command
    # captured within one freshness window before a restart can be replayed after it).
    nonce_ledger: bool | str = True
    # "fsync": each nonce is on disk before its command is accepted (survives a power loss;
    # one disk flush per command); "flush": handed to the OS only (survives the process dying).
    nonce_ledger_durability: str = "fsync"
    # Verified commands waiting for the training thread's next safe point; more are refused.
    max_pending_commands: int = 256
    # Worker threads fetching GERMINATE kernels ahead of their safe point.
    fetch_workers: int = 2

    # --- Run state (docs/design.md §6a) -----------------------------------------------------
    # This run's id ("" = a fresh one, see new_run_id); its files live in <runs_root>/<run_id>/,
    # and no run reads, rotates or deletes another's.
    run_id: str = ""
    runs_root: str = field(default_factory=_default_runs_root)

    # --- Gradient isolation, checkpoints (docs/design.md §4) --------------------------------------
    # Isolation violations of one seed that trip its circuit breaker (QUARANTINE).
    max_isolation_violations: int = 3
    # Faults of one seed's kernel (raised, wrong shape/dtype, non-finite) before QUARANTINE;
    # each fault falls back to the host output for that forward.
    seed_fault_limit: int = 3
    # Contain a kernel whose backward raises (before ACTIVE): one guarded autograd node per seed.
    # Its cost per step is in perf/bench_faults.py; False trades that safety for the time.
    guard_seed_backward: bool = True
    # How step() clears the host optimizer's gradients after stepping: True (PyTorch's default)
    # sets them to None; False zeroes them in place, as zero_grad(set_to_none=False) in a plain
    # loop: a parameter a step did not reach keeps a zero gradient, and an optimizer with state
    # (Adam's moments, weight decay) steps it. Seeds' gradients are always set to None.
    host_grads_set_to_none: bool = True
    # Atomic, signed per-epoch checkpoints for rollback ("" = <run_dir>/checkpoints).
    checkpoint_dir: str = ""
    # Emergency checkpoints written when a breaker trips ("" = <run_dir>/emergency); written
    # whatever checkpoint_mode says (a seed's state row and kernel, small).
    emergency_checkpoint_dir: str = ""
    # Where epoch checkpoints live: "disk" (signed files in checkpoint_dir), "memory" (deep
    # copies on the CPU, for small models; gone with the process) or "off" (none: end_epoch
    # writes nothing and a ROLLBACK is refused).
    checkpoint_mode: str = "disk"
    # end_epoch(n) writes a checkpoint when n % checkpoint_every_epochs == 0 (>= 1).
    checkpoint_every_epochs: int = 1
    # How many epochs back from the newest checkpoint a rollback can reach (>= 0): writing the
    # checkpoint of epoch n deletes those older than n - max_rollback_epochs. Cost: up to
    # max_rollback_epochs // checkpoint_every_epochs + 1 checkpoints, each one full model +
    # optimizers state, on disk or in RAM.
    max_rollback_epochs: int = 5
    # The 32-byte key whose HMAC signs this run's checkpoints (raw bytes or 64 hex digits);
    # None = <run_dir>/checkpoint.key, created 0600 on first use. A checkpoint of another run
    # is refused even when the key is shared (the run id is signed too).
    checkpoint_key_file: str | None = None

    # --- Lifecycle gates (docs/design.md §3) ------------------------------------------------------
    # G2: epochs a seed trains in ISOLATED_INIT (with zero violations) before its check.
    min_isolated_epochs: int = 3
    # G3: a seed may cost at most this many times the host layer, both counted as FLOPs per
    # output element (torch's FLOP counter: a function of operators and shapes, so the decision
    # never depends on machine load).
    max_seed_cost_ratio: float = 16.0
    # G3, advisory: a compatibility probe slower than this (milliseconds, wall clock) is logged
    # as a warning and reported; it never refuses a seed (a timing depends on the machine's load).
    latency_budget_ms: float = 5.0
    # G5: GATE_SCORE must reach this value, per mille (0..1000, the scale of ALPHA_BLEND).
    performance_gate: int = 500
    # G5, when evaluate_seeds was given a metric_fn: a seed whose metric with it is below its
    # metric without it by more than this is refused, whatever its loss benefit. The metric is
    # read as higher is better (pass an error rate negated), in its own units: 0.01 tolerates
    # one point of an accuracy in [0, 1]; inf never refuses. >= 0. No metric: loss alone.
    g5_max_metric_drop: float = 0.0
    # Epochs of COOLDOWN after a CULL when the command gives no "embargo_epochs".
    default_embargo_epochs: int = 5
    # GRAFTING alpha = sigmoid((step - steps/2) / temperature), step: the steps that trained the
    # seed; G4 passes at the last step when steps/2/temperature >= ln(1999) ~ 7.6 (100/2/5 = 10).
    grafting_steps: int = 100
    grafting_temperature: float = 5.0

    # --- Knowledge distillation (docs/design.md §7) -----------------------------------------------
    kd_enabled: bool = False
    kd: KDConfig = field(default_factory=KDConfig)
    # Teacher weights/activations dtype: "bfloat16" halves its memory against "float32".
    teacher_dtype: str = "bfloat16"
    # Checkpoint (state dict) of the teacher; None = the caller hands a teacher model in.
    teacher_checkpoint_path: str | None = None
    # A teacher forward slower than this (milliseconds) logs a warning, rate-limited, and counts
    # in the teacher's figures ("slow_count", "within_budget"); it is never cut short. > 0; inf:
    # no forward is slow.
    teacher_budget_ms: float = 10.0

    # --- Telemetry ------------------------------------------------------------------------
    # When set, every telemetry packet is appended to this JSON-lines file (a regular file).
    telemetry_jsonl_path: str | None = None
    # Size cap of that file (bytes, >= 1): past it the file is renamed <path>.1 (one rotated
    # file is kept) and a new one started, between two lines; both hold <= ~2x this.
    telemetry_jsonl_max_bytes: int = DEFAULT_JSONL_MAX_BYTES

    def __post_init__(self) -> None:
        # In this order: the first bad setting is the one reported, and a later check reads what
        # an earlier one normalised (the run's directories default under run_id and runs_root).
        self._check_device_and_store()
        self._check_files()
        self._check_commands()
        self._check_limits_and_flags()
        self._check_run_state()
        self._check_checkpoints_and_gates()
        self._check_kd_and_telemetry()

    def _check_device_and_store(self) -> None:
        """``device``, the kernel cache's bounds and the Urza store's settings and publishers."""
        if not isinstance(self.device, str) or not self.device:
            raise ValueError(f"device must be a non-empty string, got {self.device!r}")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except (RuntimeError, ValueError):
                raise ValueError(f"device {self.device!r} is not a valid torch device") from None
        self.cache_size_mb = check_positive("cache_size_mb", self.cache_size_mb)
        self.cache_max_kernels = check_int("cache_max_kernels", self.cache_max_kernels, 1)
        if isinstance(self.urza_url, os.PathLike):  # a store directory given as a Path
            self.urza_url = os.fspath(self.urza_url)
        if not isinstance(self.urza_url, str) or not self.urza_url:
            raise ValueError("urza_url must be a non-empty string")
        self.urza_url = absolute_local_url(self.urza_url)  # as runs_root
        for name, value in check_store_settings("urza_", **self.store_settings()).items():
            setattr(self, f"urza_{name}", value)
        self.urza_trusted_publishers = publisher_keys(self.urza_trusted_publishers)

    def _check_files(self) -> None:
        """The optional file settings (``_OPTIONAL_PATHS``), and the checkpoint key's file."""
        for name in _OPTIONAL_PATHS:
            setattr(self, name, optional_path(name, getattr(self, name)))
        if self.checkpoint_key_file:  # read at the first end_epoch: a wrong file fails now
            try:
                check_checkpoint_key(self.checkpoint_key_file)
            except OSError as exc:  # unreadable, a directory, a name too long
                raise ValueError(f"checkpoint_key_file cannot be read: {exc}") from None

    def _check_commands(self) -> None:
        """The command keys' settings, the freshness window and the nonce ledger."""
        if not isinstance(self.hmac_keys_env, str) or not self.hmac_keys_env:
            raise ValueError("hmac_keys_env must name an environment variable")
        self.command_freshness_s = bounded_number(
            "command_freshness_s",
            self.command_freshness_s,
            f"a number in (0, {MAX_FRESHNESS_S:g}]",
            lambda s: 0 < s <= MAX_FRESHNESS_S,
        )
        self.command_key_ids = id_tuple("command_key_ids", self.command_key_ids)
        ledger = self.nonce_ledger
        if isinstance(ledger, os.PathLike):  # a file given as a Path, as the other paths
            ledger = os.fspath(ledger)
        if not isinstance(ledger, bool) and not (isinstance(ledger, str) and ledger.strip()):
            raise ValueError(f"nonce_ledger must be True, False or a file path, got {ledger!r}")
        if isinstance(ledger, str) and ledger.strip().lower() in _NOT_PATHS:
            raise ValueError(  # from a file or the command line, "false" would be a file name
                f"nonce_ledger {ledger!r} reads as a flag, not a file: pass True or False"
            )
        if isinstance(ledger, str):  # absolute, as runs_root
            self.nonce_ledger = absolute_path("nonce_ledger", ledger)
        if self.nonce_ledger_durability not in DURABILITY_MODES:
            raise ValueError(
                f"nonce_ledger_durability must be one of {DURABILITY_MODES}, "
                f"got {self.nonce_ledger_durability!r}"
            )

    def _check_limits_and_flags(self) -> None:
        """The counts that must be at least 1 and the settings that must be ``bool``."""
        for name in ("max_pending_commands", "fetch_workers", "max_isolation_violations"):
            setattr(self, name, check_int(name, getattr(self, name), 1))
        self.seed_fault_limit = check_int("seed_fault_limit", self.seed_fault_limit, 1)
        for flag in ("guard_seed_backward", "host_grads_set_to_none", "kd_enabled"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be True or False, got {getattr(self, flag)!r}")

    def _check_run_state(self) -> None:
        """``run_id`` (a fresh one when ""), ``runs_root`` and the run's directories, absolute."""
        if not isinstance(self.run_id, str):
            raise ValueError(f"run_id must be a string, got {self.run_id!r}")
        if not self.run_id:
            self.run_id = new_run_id()
        if not RUN_ID_PATTERN.fullmatch(self.run_id):
            raise ValueError(
                f"run_id must be 1-64 of [A-Za-z0-9._-] starting with a letter or digit, "
                f"got {self.run_id!r}"
            )
        if isinstance(self.runs_root, os.PathLike):
            self.runs_root = os.fspath(self.runs_root)
        if not isinstance(self.runs_root, str) or not self.runs_root.strip():
            raise ValueError(f"runs_root must be a non-empty path, got {self.runs_root!r}")
        # Absolute now: resolved at each use, a chdir between two (a notebook, Hydra) split one
        # run's ledger, key and checkpoints across two directories.
        self.runs_root = absolute_path("runs_root", self.runs_root)
        # Directories left to their default: to_dict gives them as "" again, so a template
        # saved from this run never pins the next run's state into this run's directory.
        self._defaulted_dirs: dict[str, str] = {}
        for name, default in _RUN_DIRS:
            self._check_run_dir(name, default)

    def _check_run_dir(self, name: str, default: str) -> None:
        """One of ``_RUN_DIRS``: absolute, ``<run_dir>/<default>`` when "", never the working
        directory or an existing file."""
        value = getattr(self, name)
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a path, got {value!r}")
        if not value:
            value = str(self.run_dir / default)
            self._defaulted_dirs[name] = value
        value = absolute_path(name, value)  # as runs_root
        setattr(self, name, value)
        try:
            here = Path(value).resolve() == Path.cwd().resolve()
            file = Path(value).exists() and not Path(value).is_dir()
        except (OSError, RuntimeError, ValueError) as exc:  # too long, a symlink loop
            raise ValueError(f"{name} {value!r:.80} cannot be used: {exc}") from None
        if here:
            raise ValueError(f"{name} must not be the working directory")
        if file:  # else the first end_epoch
            raise ValueError(f"{name} {value} exists and is not a directory")

    def _check_checkpoints_and_gates(self) -> None:
        """The checkpoints' mode and cadence, the lifecycle gates and GRAFTING's schedule."""
        if self.checkpoint_mode not in CHECKPOINT_MODES:
            raise ValueError(
                f"checkpoint_mode must be one of {CHECKPOINT_MODES}, got {self.checkpoint_mode!r}"
            )
        self.checkpoint_every_epochs = check_int(
            "checkpoint_every_epochs", self.checkpoint_every_epochs, 1
        )
        self.max_rollback_epochs = check_int("max_rollback_epochs", self.max_rollback_epochs, 0)
        self.min_isolated_epochs = check_int("min_isolated_epochs", self.min_isolated_epochs, 0)
        self.max_seed_cost_ratio = check_positive("max_seed_cost_ratio", self.max_seed_cost_ratio)
        self.latency_budget_ms = check_positive("latency_budget_ms", self.latency_budget_ms)
        self.performance_gate = check_int("performance_gate", self.performance_gate, 0, 1000)
        self.g5_max_metric_drop = bounded_number(
            "g5_max_metric_drop",
            self.g5_max_metric_drop,
            "a number >= 0 (inf: never refuses)",
            lambda drop: drop >= 0,
        )
        self.default_embargo_epochs = check_int(  # at most the table's int32 counter holds
            "default_embargo_epochs", self.default_embargo_epochs, 0, MAX_EMBARGO_EPOCHS
        )
        self.grafting_steps = check_int("grafting_steps", self.grafting_steps, 1)
        temperature = check_positive("grafting_temperature", self.grafting_temperature)
        self.grafting_temperature = temperature

    def _check_kd_and_telemetry(self) -> None:
        """The KD settings, the teacher's dtype and the telemetry file's size cap."""
        if not isinstance(self.kd, KDConfig):
            raise TypeError(f"kd must be a KDConfig, got {type(self.kd).__name__}")
        check_seed_kd(self.kd, "kd")
        if self.teacher_dtype not in _TEACHER_DTYPES:
            raise ValueError(
                f"teacher_dtype must be one of {_TEACHER_DTYPES}, got {self.teacher_dtype!r}"
            )
        self.teacher_budget_ms = bounded_number(
            "teacher_budget_ms",
            self.teacher_budget_ms,
            "a number > 0 (inf: no forward is slow)",
            lambda ms: ms > 0,
        )
        self.telemetry_jsonl_max_bytes = check_int(
            "telemetry_jsonl_max_bytes", self.telemetry_jsonl_max_bytes, 1
        )

    def __setattr__(self, name: str, value: Any) -> None:
        if problem := _no_setting(type(self), name):
            raise AttributeError(problem)
        if self.__dict__.get("_held") and name in _FIELD_NAMES:
            if name not in LIVE_FIELDS:
                raise AttributeError(
                    f"KasminaConfig.{name} was read when the manager was built: changed now it "
                    "would apply half-way or not at all; build a new config and manager "
                    f"(settable while a manager runs: {', '.join(sorted(LIVE_FIELDS))})"
                )
            # validated as the constructor does, kept as it keeps it (a NumPy number as a float)
            value = getattr(dataclasses.replace(self, **{name: value}), name)
        super().__setattr__(name, value)

    def __delattr__(self, name: str) -> None:  # a deleted field showed the class default
        if name in _FIELD_NAMES:
            raise AttributeError(f"KasminaConfig.{name} is a setting: set it, never delete it")
        super().__delattr__(name)

    def __getstate__(self) -> dict[str, Any]:  # a copy or a pickle is nobody's config yet
        return {k: v for k, v in self.__dict__.items() if k != "_held"}

    def __repr__(self) -> str:
        """The dataclass's repr, with the store URL's credentials and query redacted."""
        shown = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self))
        return redact_urls(f"{type(self).__name__}({shown})")

    def hold(self) -> KasminaConfig:
        """Mark this config as a manager's (see the class doc) and check the environment the
        manager reads later (``$KASMINA_BACKEND``, read at the first op: a bad value failed
        the first GERMINATE and end_epoch after an epoch of training); returns it."""
        backend()
        checked = dataclasses.replace(self)  # validated whole: a setting changed before too
        for name in _NUMBERS:  # one set since as a NumPy number: kept as its Python value
            object.__setattr__(self, name, getattr(checked, name))
        object.__setattr__(self, "_held", True)
        return self

    @property
    def torch_device(self) -> torch.device:
        """The resolved device ("auto": CUDA when available, else CPU)."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    @property
    def nonce_ledger_path(self) -> Path | None:
        """The nonce ledger's file (``<run_dir>/nonces.log`` by default; None: memory only)."""
        if self.nonce_ledger is False:
            return None
        if self.nonce_ledger is True:
            return self.run_dir / LEDGER_FILE_NAME
        return Path(self.nonce_ledger).expanduser()

    @property
    def run_dir(self) -> Path:
        """This run's own state directory: ``<runs_root>/<run_id>``."""
        return Path(self.runs_root).expanduser() / self.run_id

    @property
    def checkpoint_key_path(self) -> Path:
        """The file of the key that signs this run's checkpoints (see ``checkpoint_key_file``)."""
        if self.checkpoint_key_file:
            return Path(self.checkpoint_key_file).expanduser()
        return self.run_dir / CHECKPOINT_KEY_NAME

    @property
    def teacher_torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.teacher_dtype)

    @property
    def cache_size_bytes(self) -> int:
        return int(self.cache_size_mb * 1024 * 1024)

    def load_keyring(self) -> Keyring:
        """The HMAC keyring from ``hmac_keys_file`` if set, else from ``hmac_keys_env``; one
        with no key is refused (``ValueError``), as a trainer with it refused every command."""
        if self.hmac_keys_file:
            path = self.hmac_keys_file
            return command_keyring(Keyring.from_file(path), f"keyring file {path}")
        return command_keyring(Keyring.from_env(self.hmac_keys_env), f"${self.hmac_keys_env}")

    def store_settings(self) -> dict[str, Any]:
        """The Urza client's read settings under its own argument names (``urza_`` dropped)."""
        return {name: getattr(self, f"urza_{name}") for name in STORE_SETTINGS}

    def load_trusted_publishers(self) -> TrustedPublishers:
        """The publisher public keys artifacts are verified with: ``urza_trusted_publishers``
        plus ``urza_publishers_file`` when set (one key id bound to two keys is an error)."""
        publishers = TrustedPublishers(self.urza_trusted_publishers)
        if self.urza_publishers_file:
            publishers = publishers.merged(TrustedPublishers.from_file(self.urza_publishers_file))
        return publishers

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (``kd`` as a nested dict). A checkpoint directory left to its
        default is given as "" (still the default), so ``from_dict`` of it with another run id
        uses that run's directory; one set explicitly is kept. ``g5_max_metric_drop=inf`` (or
        ``teacher_budget_ms``) is a float inf: ``json.dumps`` writes ``Infinity``, which Python
        reads back (a strict JSON parser does not: write such a config with ``allow_nan`` and
        read it with Python)."""
        data = dataclasses.asdict(self)
        for name, value in getattr(self, "_defaulted_dirs", {}).items():
            if data[name] == value:  # not reassigned since
                data[name] = ""
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> KasminaConfig:
        """Build from a mapping; unknown keys are an error (a typo must not be ignored)."""
        if not isinstance(data, Mapping):
            raise TypeError(f"KasminaConfig.from_dict takes a mapping, got {type(data).__name__}")
        for name, advice in _REMOVED_SETTINGS.items():
            if name in data:
                raise ValueError(f"{name} was removed: {advice}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown KasminaConfig settings: {', '.join(unknown)}")
        values = dict(data)
        if isinstance(values.get("kd"), Mapping):
            kd_known = {f.name for f in dataclasses.fields(KDConfig)}
            kd_unknown = sorted(set(values["kd"]) - kd_known)
            if kd_unknown:
                raise ValueError(f"unknown KasminaConfig settings: kd.{', kd.'.join(kd_unknown)}")
            values["kd"] = KDConfig(**values["kd"])
        return cls(**values)


_FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(KasminaConfig))
_NUMBERS = [f.name for f in dataclasses.fields(KasminaConfig) if type(f.default) in (int, float)]


def _no_setting(cls: type, name: str) -> str | None:
    """Why ``name`` is no setting of ``cls``, or None: a field, a ``_`` name (the config's own
    bookkeeping), a subclass's field or property. A misspelt one (``performance_gait``) would
    be an attribute nothing reads; a removed one says what replaced it."""
    if name in _FIELD_NAMES or name.startswith("_") or hasattr(getattr(cls, name, None), "__set__"):
        return None
    if name in {f.name for f in dataclasses.fields(cls)}:
        return None
    if name in _REMOVED_SETTINGS:
        return f"{name} was removed: {_REMOVED_SETTINGS[name]}"
    close = difflib.get_close_matches(name, sorted(_FIELD_NAMES), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{cls.__name__} has no setting {name!r}{hint}"


def manager_inputs(config: object, keyring: object) -> tuple[KasminaConfig, Keyring]:
    """A manager's ``config`` and ``keyring`` (None: the defaults', the config's), checked before
    it makes a file: $KASMINA_BACKEND and every setting (one set since the config was built)."""
    if config is None:
        config = KasminaConfig()
    elif not isinstance(config, KasminaConfig):
        raise TypeError(
            f"config must be a KasminaConfig, got {type(config).__name__} "
            "(KasminaConfig.from_dict builds one from a mapping)"
        )
    backend()
    dataclasses.replace(config)  # ``hold`` refused one set since only after the run's files
    keyring = config.load_keyring() if keyring is None else command_keyring(keyring)
    if shared := config.load_trusted_publishers().ids_holding(map(keyring.get, keyring.key_ids)):
        raise ValueError(
            f"publisher key(s) {shared} are command keys: the trusted publishers (a file of "
            "what 'kasmina keygen --publisher' prints) are never the command keyring"
        )
    return config, keyring
