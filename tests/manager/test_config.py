"""KasminaConfig: defaults, validation, round trip, keyring loading."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from kasmina.kd.config import KDConfig
from kasmina.manager.config import _OPTIONAL_PATHS, KasminaConfig, default_cache_root
from kasmina.manager.manager import KasminaKernelManager
from kasmina.utils.keyring import Keyring


def test_defaults_are_valid_and_stay_out_of_the_working_directory(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("KASMINA_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    config = KasminaConfig()
    assert config.urza_url == str(tmp_path / "xdg" / "kasmina" / "urza")
    cwd = Path.cwd().resolve()
    for path in (config.checkpoint_dir, config.emergency_checkpoint_dir):
        assert Path(path).resolve() != cwd and Path(path).is_relative_to(tmp_path)
    assert config.torch_device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert config.cache_size_bytes == 512 * 1024 * 1024
    assert config.teacher_torch_dtype is torch.bfloat16
    monkeypatch.setenv("KASMINA_HOME", str(tmp_path / "home"))
    assert default_cache_root() == tmp_path / "home"


def test_each_run_has_its_own_state_directory(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("KASMINA_HOME", str(tmp_path / "home"))
    first, second = KasminaConfig(), KasminaConfig()
    assert first.run_id != second.run_id
    runs = tmp_path / "home" / "runs"
    for config in (first, second):
        assert config.run_dir == runs / config.run_id
        assert Path(config.checkpoint_dir) == config.run_dir / "checkpoints"
        assert Path(config.emergency_checkpoint_dir) == config.run_dir / "emergency"
    named = KasminaConfig(run_id="exp-7")
    assert named.run_dir == runs / "exp-7"
    assert KasminaConfig.from_dict(named.to_dict()).run_dir == named.run_dir


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("device", "gpu0"),
        ("cache_size_mb", 0),
        ("cache_size_mb", float("nan")),
        ("cache_max_kernels", 0),  # refused here, never first where the manager makes its cache
        ("cache_max_kernels", 1.0),
        ("cache_max_kernels", True),
        ("urza_url", ""),
        ("urza_timeout_s", -1.0),
        ("urza_retries", -1),
        ("urza_retries", 1.5),
        ("urza_retries", True),
        ("urza_breaker_reset_s", float("nan")),
        ("urza_backoff_s", float("inf")),
        ("urza_breaker_threshold", 0),
        ("urza_trusted_publishers", "pub"),
        ("urza_trusted_publishers", {"pub": "AAAA"}),
        ("command_freshness_s", 0),
        ("max_isolation_violations", 0),
        ("checkpoint_dir", "."),
        ("emergency_checkpoint_dir", 3),
        ("run_id", "../escape"),
        ("run_id", "a" * 65),
        ("runs_root", ""),
        ("performance_gate", 1001),
        ("performance_gate", 0.5),
        ("g5_max_metric_drop", -0.01),
        ("g5_max_metric_drop", float("nan")),
        ("g5_max_metric_drop", "0.01"),
        ("g5_max_metric_drop", True),
        ("min_isolated_epochs", True),
        ("teacher_dtype", "int8"),
        ("teacher_budget_ms", 0),
        ("teacher_budget_ms", float("nan")),
        ("teacher_budget_ms", "10"),
        ("teacher_budget_ms", True),
        ("kd", {"temperature": 2.0}),
        ("grafting_steps", 0),
        ("performance_gate", True),
        ("telemetry_jsonl_path", 123),
        ("telemetry_jsonl_path", ""),
        ("hmac_keys_file", 5),
        ("hmac_keys_file", ""),
        ("teacher_checkpoint_path", 5),
        ("teacher_checkpoint_path", ""),
        ("telemetry_jsonl_max_bytes", 0),
        ("telemetry_jsonl_max_bytes", True),
        ("default_embargo_epochs", -1),
        ("default_embargo_epochs", 2**31),  # the table's counter is int32
        ("urza_timeout_s", 1e10),  # past threading.TIMEOUT_MAX: every wait failed at use
        ("nonce_ledger", "false"),  # a flag's spelling from a file, not a file name
        ("nonce_ledger", "Off"),
        ("nonce_ledger", " "),
    ],
)
def test_invalid_values_are_rejected(field, value) -> None:
    with pytest.raises((ValueError, TypeError)):
        KasminaConfig(**{field: value})


@pytest.mark.parametrize("value", [0.0, 0.01, 1, float("inf")])
def test_g5_max_metric_drop_accepts_a_tolerance_or_inf(value) -> None:
    config = KasminaConfig(g5_max_metric_drop=value)
    assert config.g5_max_metric_drop == value
    assert KasminaConfig().g5_max_metric_drop == 0.0


def test_dict_round_trip_and_unknown_keys(tmp_path) -> None:
    config = KasminaConfig(
        device="cpu",
        urza_url="memory://store",
        urza_trusted_publishers={"pub": "11" * 32},
        kd=KDConfig(temperature=3.0),
        checkpoint_dir=str(tmp_path / "ckpt"),
    )
    data = json.loads(json.dumps(config.to_dict()))
    assert KasminaConfig.from_dict(data) == config
    with pytest.raises(ValueError, match="checkpoints_kept was removed: set max_rollback_epochs"):
        KasminaConfig.from_dict({**config.to_dict(), "checkpoints_kept": 5})  # a saved older one
    with pytest.raises(ValueError, match="unknown KasminaConfig settings: cache_size"):
        KasminaConfig.from_dict({"cache_size": 1})
    with pytest.raises(ValueError, match="unknown KasminaConfig settings: kd.bogus"):
        KasminaConfig.from_dict({"kd": {"bogus": 1}})


def test_path_settings_are_none_or_a_non_empty_path(tmp_path) -> None:
    config = KasminaConfig(
        hmac_keys_file=tmp_path / "k.json", telemetry_jsonl_path=None, urza_url=tmp_path / "u"
    )
    assert config.hmac_keys_file == str(tmp_path / "k.json")  # a PathLike, kept as a string
    assert config.urza_url == str(tmp_path / "u")  # a store directory too
    assert config.telemetry_jsonl_path is None
    json.dumps(config.to_dict())


def test_a_saved_config_used_as_a_template_never_pins_the_old_runs_directories(tmp_path) -> None:
    old = KasminaConfig(runs_root=str(tmp_path), run_id="old-run")
    data = json.loads(json.dumps(old.to_dict()))
    assert KasminaConfig.from_dict(data) == old  # same run id: the same directories
    data["run_id"] = ""  # a fresh run from the template
    new = KasminaConfig.from_dict(data)
    assert new.run_id != "old-run"
    assert Path(new.checkpoint_dir) == new.run_dir / "checkpoints"
    assert Path(new.emergency_checkpoint_dir) == new.run_dir / "emergency"
    # An explicitly given directory is the user's choice and round-trips as given.
    pinned = KasminaConfig(runs_root=str(tmp_path), checkpoint_dir=str(tmp_path / "mine"))
    data = pinned.to_dict()
    data["run_id"] = ""
    again = KasminaConfig.from_dict(data)
    assert again.checkpoint_dir == str(tmp_path / "mine")
    assert Path(again.emergency_checkpoint_dir) == again.run_dir / "emergency"


def test_directories_may_be_paths_and_from_dict_wants_a_mapping(tmp_path) -> None:
    """A ``Path`` for runs_root or a checkpoint directory was refused as "must be a non-empty
    path"; ``from_dict`` of a string read its letters as settings."""
    config = KasminaConfig(runs_root=tmp_path / "runs", checkpoint_dir=tmp_path / "ckpt")
    assert config.runs_root == str(tmp_path / "runs")
    assert config.checkpoint_dir == str(tmp_path / "ckpt")
    assert KasminaConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    for bad in (None, "abc", ["run_id"]):
        with pytest.raises(TypeError, match="takes a mapping"):
            KasminaConfig.from_dict(bad)  # type: ignore[arg-type]


def test_a_manager_refuses_a_dict_for_its_config_or_keyring(tmp_path) -> None:
    """Dicts reached deep into the constructor: AttributeError on load_keyring or key_ids."""
    with pytest.raises(TypeError, match="KasminaConfig.from_dict builds one"):
        KasminaKernelManager({"device": "cpu"})  # type: ignore[arg-type]
    config = KasminaConfig(urza_url=str(tmp_path / "urza"), runs_root=str(tmp_path / "runs"))
    with pytest.raises(TypeError, match="keyring must be a Keyring, .*got dict"):
        KasminaKernelManager(config, keyring={"k": b"x" * 32})  # type: ignore[arg-type]
    assert not (tmp_path / "runs").exists()  # refused before anything was created


def test_keyring_from_file_or_environment(tmp_path, monkeypatch) -> None:
    key_file = tmp_path / "keys.json"
    key_file.write_text(json.dumps({"file-key": "11" * 32}))
    key_file.chmod(0o600)
    assert KasminaConfig(hmac_keys_file=str(key_file)).load_keyring().key_ids == ("file-key",)
    monkeypatch.setenv("MY_KEYS", "env-key:" + "22" * 32)
    assert KasminaConfig(hmac_keys_env="MY_KEYS").load_keyring().get("env-key") == b"\x22" * 32
    monkeypatch.delenv("MY_KEYS")
    with pytest.raises(ValueError, match="MY_KEYS"):
        KasminaConfig(hmac_keys_env="MY_KEYS").load_keyring()


def test_a_trainer_refuses_a_keyring_with_no_key(tmp_path, monkeypatch) -> None:
    """A keyring file or $KASMINA_HMAC_KEYS holding ``{}``, or ``keyring=Keyring({})``, made a
    trainer that refused every command (signed by an unknown key). Now each is refused where
    the trainer takes it, naming where it came from, before the run makes a file."""
    key_file = tmp_path / "keys.json"
    key_file.write_text("{}")
    key_file.chmod(0o600)
    with pytest.raises(ValueError, match=f"keyring file {key_file} holds no key"):
        KasminaConfig(hmac_keys_file=str(key_file)).load_keyring()
    monkeypatch.setenv("MY_KEYS", "{}")
    with pytest.raises(ValueError, match=r"\$MY_KEYS holds no key"):
        KasminaConfig(hmac_keys_env="MY_KEYS").load_keyring()
    config = KasminaConfig(urza_url=str(tmp_path / "urza"), runs_root=str(tmp_path / "runs"))
    with pytest.raises(ValueError, match="the keyring holds no key"):
        KasminaKernelManager(config, keyring=Keyring({}))
    assert not (tmp_path / "runs").exists()


def test_the_backward_guard_setting_reaches_every_seed(tmp_path) -> None:
    from torch import nn

    from kasmina.manager.manager import KasminaKernelManager
    from kasmina.urza.keys import PublisherKey
    from kasmina.utils.keyring import Keyring, generate_key

    publisher = PublisherKey.generate("pub")
    config = KasminaConfig(
        device="cpu",
        urza_url=str(tmp_path / "urza"),
        runs_root=str(tmp_path / "runs"),
        guard_seed_backward=False,
        urza_trusted_publishers=publisher.trusted_publishers().to_json(),
    )
    manager = KasminaKernelManager(config, keyring=Keyring({"ctl": generate_key()}))
    model = nn.Sequential(nn.Linear(4, 4))
    manager.attach(model, "0", 2, 2)
    assert all(not record.seed.guard_backward for record in manager.registry)
    with pytest.raises(ValueError, match="guard_seed_backward"):
        KasminaConfig(guard_seed_backward="yes")
    with pytest.raises(ValueError, match="kd_enabled"):
        KasminaConfig(kd_enabled="false")  # a truthy string would switch KD on
    manager.close()


def test_a_register_refused_leaves_the_seeds_settings_as_they_were(tmp_path) -> None:
    """``register`` gave the seeds the config's fault limit and backward guard before building
    the host optimizer: one it refused (a frozen host) left the user's slots with its guard
    off and its limit, though it managed nothing."""
    import kasmina
    from kasmina.urza.keys import PublisherKey
    from kasmina.utils.keyring import Keyring, generate_key

    config = KasminaConfig(
        device="cpu",
        urza_url=str(tmp_path / "urza"),
        runs_root=str(tmp_path / "runs"),
        seed_fault_limit=7,
        guard_seed_backward=False,
        urza_trusted_publishers=PublisherKey.generate("pub").trusted_publishers().to_json(),
    )
    manager = KasminaKernelManager(config, keyring=Keyring({"ctl": generate_key()}))
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    seeds = list(kasmina.attach(model, "0", 2, 2)[0].seeds)
    before = [(seed.fault_limit, seed.guard_backward) for seed in seeds]
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        manager.register(model)
    assert manager.registry is None
    assert [(seed.fault_limit, seed.guard_backward) for seed in seeds] == before
    manager.register(model, host_lr=None)
    assert all(s.fault_limit == 7 and not s.guard_backward for s in seeds)
    manager.close()


def test_an_attach_that_cannot_register_leaves_the_model_as_it_was(tmp_path) -> None:
    from torch import nn

    from kasmina.manager.manager import KasminaKernelManager
    from kasmina.urza.keys import PublisherKey
    from kasmina.utils.keyring import Keyring, generate_key

    config = KasminaConfig(
        device="cpu",
        urza_url=str(tmp_path / "urza"),
        runs_root=str(tmp_path / "runs"),
        urza_trusted_publishers=PublisherKey.generate("pub").trusted_publishers().to_json(),
    )
    manager = KasminaKernelManager(config, keyring=Keyring({"ctl": generate_key()}))
    model = nn.Sequential(nn.Linear(4, 4))
    host = model[0]
    for rate in (-1.0, 10**400):  # an int past a float's range: every step raised after it
        with pytest.raises(ValueError, match="host_lr must be finite and > 0"):
            manager.attach(model, "0", 2, 2, host_lr=rate)
    assert model[0] is host and manager.registry is None
    assert not model._load_state_dict_pre_hooks
    # What only the seeds' optimizer reads (with host_lr=None, first at a GERMINATE, each one
    # an "internal error" then) is refused here too: a typo, an infinite or a bool rate.
    for options in ({"weight_decy": 0.01}, {"seed_lr": float("inf")}, {"seed_lr": True}):
        with pytest.raises(ValueError, match="seed"):
            manager.attach(model, "0", 2, 2, host_lr=None, **options)
        assert model[0] is host and manager.registry is None
    # A class given by name, a rate as a string: refused naming the argument.
    for options, error, match in (
        ({"optimizer_cls": "Adam"}, TypeError, "optimizer_cls must be a torch.optim.Optimizer"),
        ({"host_lr": "1e-3"}, ValueError, "host_lr must be a float, got str"),
    ):
        with pytest.raises(error, match=match):
            manager.attach(model, "0", 2, 2, **options)
        assert model[0] is host and manager.registry is None
    # A class whose step() needs a closure or sparse gradients: every manager.step() raised.
    for cls, why in ((torch.optim.LBFGS, "closure"), (torch.optim.SparseAdam, "dense")):
        with pytest.raises(ValueError, match=f"optimizer_cls {cls.__name__} cannot step.*{why}"):
            manager.attach(model, "0", 2, 2, optimizer_cls=cls)
        assert model[0] is host and manager.registry is None
    assert manager.attach(model, "0", 2, 2, seed_lr=torch.tensor(0.01))  # torch.optim takes it
    manager.close()


class _Lookahead(torch.optim.Optimizer):
    """An optimizer that owns the one it steps, as ZeroRedundancyOptimizer does."""

    def __init__(self, params, lr: float = 1e-3) -> None:
        params = list(params)
        super().__init__(params, {"lr": lr})
        self.inner = torch.optim.SGD(params, lr=lr)

    def step(self, closure=None):  # type: ignore[override]
        return self.inner.step(closure)


def test_an_optimizer_that_wraps_another_is_refused_at_attach(tmp_path) -> None:
    """ZeroRedundancyOptimizer was accepted as optimizer_cls: a seed promoted at ACTIVE joined
    its param_groups, which ZeRO (partitioned when built) never sees, so the seed never
    trained, and with checkpoints on the first end_epoch raised "Optimizer state has not been
    consolidated". It, and any optimizer that owns another it steps, is refused with a reason
    and what to pass instead, with a process group or without, and the model left as it was."""
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.optim import ZeroRedundancyOptimizer

    from kasmina.utils.keyring import Keyring, generate_key

    config = KasminaConfig(
        device="cpu", urza_url=str(tmp_path / "urza"), runs_root=str(tmp_path / "runs")
    )
    manager = KasminaKernelManager(config, keyring=Keyring({"ctl": generate_key()}))
    model = nn.Sequential(nn.Linear(4, 4))
    host = model[0]
    zero = {"optimizer_cls": ZeroRedundancyOptimizer, "optimizer_class": torch.optim.Adam}
    refused = "wraps another optimizer.*optimizer_cls=torch.optim.Adam"
    with pytest.raises(ValueError, match=refused):  # no process group yet
        manager.attach(model, "0", 2, 2, **zero)
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1
    )
    try:
        for options in (zero, {"optimizer_cls": _Lookahead}):
            with pytest.raises(ValueError, match=refused):
                manager.attach(model, "0", 2, 2, **options)
            assert model[0] is host and manager.registry is None
    finally:
        dist.destroy_process_group()
    assert manager.attach(model, "0", 2, 2, optimizer_cls=torch.optim.Adam)
    manager.close()


def test_a_model_off_the_kernels_device_is_refused_at_attach(tmp_path) -> None:
    """Kernels load on config.device; a model elsewhere ("auto" on a GPU machine, a CPU model)
    trained on with every GERMINATE refused by its dry run, the reason naming no setting."""
    from torch import nn

    from kasmina.manager.manager import KasminaKernelManager
    from kasmina.utils.keyring import Keyring, generate_key

    config = KasminaConfig(
        device="meta", urza_url=str(tmp_path / "urza"), runs_root=str(tmp_path / "runs")
    )
    manager = KasminaKernelManager(config, keyring=Keyring({"ctl": generate_key()}))
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="model is on cpu but config.device"):
        manager.attach(model, "0", 2, 2)
    assert isinstance(model[0], nn.Linear) and manager.registry is None
    manager.close()


def test_a_managers_config_takes_live_changes_validated_and_refuses_the_rest(tmp_path) -> None:
    """The manager reads most settings once, when it is built: a change to one afterwards
    applied half-way (grafting_steps = 0 raised inside step() after the optimizers stepped;
    checkpoint_mode = "Disk" silently turned checkpoints off). The gates and GRAFTING's
    schedule are read at each use: those may change, validated."""
    from kasmina.manager.manager import KasminaKernelManager
    from kasmina.utils.keyring import Keyring

    config = KasminaConfig(urza_url=str(tmp_path / "urza"), runs_root=str(tmp_path / "runs"))
    config.checkpoint_mode = "memory"  # not held yet: anything goes, as before
    manager = KasminaKernelManager(config, keyring=Keyring({"ctl": b"k" * 32}))
    assert manager.config is config
    for name, value in (("checkpoint_mode", "disk"), ("device", "cpu"), ("kd", KDConfig())):
        with pytest.raises(AttributeError, match="read when the manager was built"):
            setattr(config, name, value)
    assert config.checkpoint_mode == "memory"
    with pytest.raises(ValueError, match="grafting_steps"):
        config.grafting_steps = 0
    assert config.grafting_steps == 100
    config.grafting_steps, config.performance_gate = 50, 0
    assert (manager.config.grafting_steps, manager.config.performance_gate) == (50, 0)
    free = dataclasses.replace(config, checkpoint_mode="off")  # a new config is a new config
    assert free.checkpoint_mode == "off"
    manager.close()


def test_a_misspelt_setting_is_refused_held_or_not(tmp_path) -> None:
    """``config.performance_gait = 0`` made a new attribute that nothing reads: the gate
    stayed at 500 and nothing said so, on a manager's config and on a free one."""
    from kasmina.utils.keyring import Keyring

    free = KasminaConfig(urza_url=str(tmp_path / "urza"), runs_root=str(tmp_path / "runs"))
    with pytest.raises(AttributeError, match="no setting 'performance_gait'.*'performance_gate'"):
        free.performance_gait = 0
    held = dataclasses.replace(free)
    manager = KasminaKernelManager(held, keyring=Keyring({"ctl": b"k" * 32}))
    with pytest.raises(AttributeError, match="no setting 'xyzzy'"):
        held.xyzzy = 1
    for config in (free, held):
        assert config.performance_gate == 500 and "performance_gait" not in vars(config)
    held.performance_gate = 0  # a real live setting still takes
    assert manager.config.performance_gate == 0
    manager.close()
    with pytest.raises(AttributeError, match="checkpoints_kept was removed: set max_rollback"):
        free.checkpoints_kept = 3  # a removed setting says what replaced it

    @dataclasses.dataclass
    class Mine(KasminaConfig):
        note: str = ""

        @property
        def lr_note(self) -> str:
            return self.note

        @lr_note.setter
        def lr_note(self, value: str) -> None:
            self.note = value

    mine = Mine(urza_url=free.urza_url, runs_root=free.runs_root)
    mine.lr_note = "a subclass's own field and property take"
    assert mine.note == mine.lr_note
    with pytest.raises(AttributeError, match="Mine has no setting 'nite'"):
        mine.nite = ""


def test_a_setting_changed_before_a_manager_holds_the_config_is_validated_then(tmp_path) -> None:
    """Changes to a config no manager holds are not validated (it may pass through invalid
    states while being built); a manager built on it took them as they were (a negative gate,
    a KD reduction its seeds refuse, reported at ``attach`` as a ``kd_config`` never passed)."""
    from kasmina.utils.keyring import Keyring

    for name, value, fragment in (
        ("performance_gate", -5, "performance_gate"),
        ("kd", KDConfig(reduction="none"), "kd: reduction 'none'"),
    ):
        config = KasminaConfig(urza_url=str(tmp_path / "urza"), runs_root=str(tmp_path / "runs"))
        setattr(config, name, value)
        with pytest.raises(ValueError, match=fragment):
            KasminaKernelManager(config, keyring=Keyring({"ctl": b"k" * 32}))
        setattr(config, name, getattr(KasminaConfig(), name))  # still settable: not held


def test_the_seeds_kd_takes_a_scalar_reduction_only(tmp_path) -> None:
    """``KDConfig(reduction="none")`` gives per-row losses; a manager's or a slot's KD term is
    one scalar, and it was silently summed ("sum" under another name). Refused where a
    seed's KD is configured; ``StaticKDLoss`` and the op keep it."""
    from torch import nn

    from kasmina.kd.loss import StaticKDLoss
    from kasmina.seeds.inject import attach

    none = KDConfig(reduction="none")
    with pytest.raises(ValueError, match="kd: reduction 'none'"):
        KasminaConfig(urza_url=str(tmp_path / "urza"), kd_enabled=True, kd=none)
    model = nn.Sequential(nn.Linear(3, 4))
    with pytest.raises(ValueError, match="kd_config: reduction 'none'"):
        attach(model, "0", seeds_per_layer=2, chunk_size=2, kd_config=none)
    assert isinstance(model[0], nn.Linear)  # refused before anything changed
    rows = StaticKDLoss(reduction="none")(torch.randn(3, 5), torch.randn(3, 5))
    assert rows.shape == (3,)


def test_relative_state_paths_are_made_absolute_when_the_config_is_built(
    tmp_path, monkeypatch
) -> None:
    """Resolved at each use, a chdir between two uses (a notebook, Hydra) split one run's
    nonce ledger, checkpoint key and checkpoints across two directories, and its Urza store."""
    monkeypatch.chdir(tmp_path)
    config = KasminaConfig(runs_root="runs", run_id="r", nonce_ledger="n.log", checkpoint_dir="c")
    stores = [KasminaConfig(urza_url=url) for url in ("urza", "file:urza", Path("urza"))]
    files = {name: f"{name}.file" for name in _OPTIONAL_PATHS}
    with_files = KasminaConfig(**files, nonce_ledger=Path("n.log"))  # PathLike, as the others
    monkeypatch.chdir("/")
    assert config.run_dir == tmp_path / "runs" / "r"
    assert config.nonce_ledger_path == tmp_path / "n.log"
    assert config.checkpoint_key_path == tmp_path / "runs" / "r" / "checkpoint.key"
    assert Path(config.checkpoint_dir) == tmp_path / "c"
    for store in stores:  # the store a client or a resumed run reads
        assert store.urza_url == str(tmp_path / "urza")
        assert KasminaConfig.from_dict(store.to_dict()).urza_url == str(tmp_path / "urza")
    assert KasminaConfig(urza_url="memory://s").urza_url == "memory://s"
    # A relative path holding fsspec's ``::``: a directory's name, or a chain's last layer.
    monkeypatch.chdir(tmp_path)
    named, chained = (KasminaConfig(urza_url=url) for url in ("a::b", "simplecache::urza"))
    monkeypatch.chdir("/")
    assert named.urza_url == str(tmp_path / "a::b")
    assert chained.urza_url == f"simplecache::{tmp_path / 'urza'}"
    for kept in ("simplecache::/abs", "simplecache::", "simplecache::file:x"):  # no bare path
        assert KasminaConfig(urza_url=kept).urza_url == kept
    for name, file in files.items():  # a key file read at the first checkpoint was made anew
        assert getattr(with_files, name) == str(tmp_path / file)
    assert with_files.checkpoint_key_path == tmp_path / "checkpoint_key_file.file"
    assert with_files.nonce_ledger_path == tmp_path / "n.log"
    monkeypatch.setenv("KASMINA_HOME", f"  {tmp_path / 'home'}\n")  # as a shell may leave it
    assert default_cache_root() == tmp_path / "home"


def test_the_backend_variable_is_checked_when_the_manager_is_built(tmp_path, monkeypatch) -> None:
    """Read at the first op, a bad $KASMINA_BACKEND failed the first GERMINATE and end_epoch
    after a whole epoch of training. Refused first, it leaves no file behind (checked as the
    config was held, it left the run's marker, lock and ledger)."""
    from kasmina.manager.manager import KasminaKernelManager
    from kasmina.utils.keyring import Keyring

    monkeypatch.setenv("KASMINA_BACKEND", "cuda")
    config = KasminaConfig(urza_url=str(tmp_path / "urza"), runs_root=str(tmp_path / "runs"))
    with pytest.raises(ValueError, match="KASMINA_BACKEND"):
        KasminaKernelManager(config, keyring=Keyring({"ctl": b"k" * 32}))
    config.checkpoint_mode = "memory"  # a constructor that raised leaves the config settable
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*"))
    # So is a setting set before the manager held the config (validated by the constructor).
    monkeypatch.delenv("KASMINA_BACKEND")
    config.command_freshness_s = -5.0
    with pytest.raises(ValueError, match="command_freshness_s"):
        KasminaKernelManager(config, keyring=Keyring({"ctl": b"k" * 32}))
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*"))


def test_a_copy_of_a_held_config_is_settable(tmp_path) -> None:
    import copy
    import pickle

    from kasmina.manager.manager import KasminaKernelManager
    from kasmina.utils.keyring import Keyring

    config = KasminaConfig(urza_url=str(tmp_path / "urza"), runs_root=str(tmp_path / "runs"))
    manager = KasminaKernelManager(config, keyring=Keyring({"ctl": b"k" * 32}))
    for copied in (copy.deepcopy(config), pickle.loads(pickle.dumps(config))):
        copied.run_id = "another"
        assert copied.run_id == "another" and config.run_id != "another"
    manager.close()


def test_a_checkpoint_setting_that_cannot_work_fails_when_the_config_is_built(tmp_path) -> None:
    """Read at the first end_epoch, after a whole epoch of training: a checkpoint directory that
    is a file, a checkpoint key file that is a keyring's JSON."""
    a_file = tmp_path / "not-a-dir"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        KasminaConfig(checkpoint_dir=str(a_file), runs_root=str(tmp_path / "runs"))
    keyring = tmp_path / "commands.json"
    keyring.write_text(json.dumps({"ctl": "00" * 32}))
    keyring.chmod(0o600)
    with pytest.raises(ValueError, match="checkpoint key"):
        KasminaConfig(checkpoint_key_file=str(keyring), runs_root=str(tmp_path / "runs"))
    key = tmp_path / "checkpoint.key"
    key.write_text("ab" * 32 + "\n")
    key.chmod(0o600)
    assert KasminaConfig(checkpoint_key_file=str(key)).checkpoint_key_path == key


@pytest.mark.parametrize(
    "field",
    ["runs_root", "checkpoint_dir", "nonce_ledger", "checkpoint_key_file", "hmac_keys_file"],
)
def test_a_path_the_os_cannot_take_is_a_value_error_naming_the_setting(field, tmp_path) -> None:
    """``~nobody/...`` (no such home) raised pathlib's RuntimeError, and a name too long for
    the OS an OSError, out of the constructor."""
    paths = ["~kasmina_no_such_user_x/p"]
    if field in ("checkpoint_dir", "checkpoint_key_file"):  # looked at on the disk now
        paths.append(str(tmp_path / ("a" * 300) / "p"))
    for path in paths:
        settings = {field: path}
        if field != "runs_root":
            settings["runs_root"] = str(tmp_path / "runs")
        with pytest.raises(ValueError, match=field):
            KasminaConfig(**settings)


def test_a_symlink_loop_or_a_nul_in_a_path_is_a_value_error_naming_it(tmp_path) -> None:
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        KasminaConfig(runs_root=str(tmp_path / "runs"), checkpoint_dir=str(loop / "c"))
    for field in ("nonce_ledger", "checkpoint_dir", "teacher_checkpoint_path"):
        with pytest.raises(ValueError, match=field):
            KasminaConfig(runs_root=str(tmp_path / "runs"), **{field: "a\0b"})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_optimizer_trial_step_runs_on_the_kernels_gpu(tmp_path) -> None:
    """``capturable=True`` steps only on a GPU: a trial step on a CPU parameter refused it
    for a CUDA model that trains with it."""
    from torch import nn

    from kasmina.manager.manager import KasminaKernelManager
    from kasmina.utils.keyring import Keyring, generate_key

    config = KasminaConfig(
        device="cuda", urza_url=str(tmp_path / "urza"), runs_root=str(tmp_path / "runs")
    )
    manager = KasminaKernelManager(config, keyring=Keyring({"ctl": generate_key()}))
    model = nn.Sequential(nn.Linear(4, 4)).cuda()
    assert manager.attach(model, "0", 2, 2, capturable=True)
    manager.close()


@pytest.mark.parametrize(
    "setting",
    ["grafting_steps", "grafting_temperature", "urza_backoff_s", "urza_backoff_max_s",
     "max_pending_commands", "min_isolated_epochs"],
)  # fmt: skip
def test_a_setting_past_a_floats_range_is_refused_naming_it(tmp_path, setting: str) -> None:
    """An int of 10**400 passed every range check (``< inf`` holds for it): the manager's
    constructor then raised ``OverflowError`` naming nothing (the store's backoffs), or every
    ``step()`` raised after the optimizers had stepped (the GRAFTING schedule)."""
    with pytest.raises(ValueError, match=setting):
        KasminaConfig(urza_url=str(tmp_path), **{setting: 10**400})


def test_a_setting_is_never_deleted_nor_a_count_given_as_a_bool(tmp_path) -> None:
    """``del manager.config.run_id`` passed the held config's guard: the class default showed
    through and the run directory moved to the runs root; ``del config.kd`` broke the next
    attach. ``KasminaConfig(seed_fault_limit=True)`` was taken as a limit of 1."""
    from kasmina.manager.manager import KasminaKernelManager
    from kasmina.utils.keyring import Keyring

    config = KasminaConfig(
        urza_url=str(tmp_path / "urza"), runs_root=str(tmp_path / "runs"), run_id="myrun"
    )
    with pytest.raises(AttributeError, match="never delete"):
        del config.kd  # a free config too: a dataclass without a field is no config
    manager = KasminaKernelManager(config, keyring=Keyring({"ctl": b"k" * 32}))
    for name in ("run_id", "kd", "grafting_steps"):
        with pytest.raises(AttributeError, match=f"KasminaConfig.{name} is a setting"):
            delattr(config, name)
    assert config.run_id == "myrun" and isinstance(config.kd, KDConfig)
    assert config.run_dir == (tmp_path / "runs" / "myrun")
    manager.close()
    for name in ("seed_fault_limit", "max_rollback_epochs", "telemetry_jsonl_max_bytes"):
        with pytest.raises(ValueError, match=f"{name} must be an int"):
            KasminaConfig(**{name: True})
