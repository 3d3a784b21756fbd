"""``kasmina urza publish --factory``: the user's module exported as it is, its failures one
line each."""

from __future__ import annotations

import copy
import sys

import pytest
import torch

from kasmina.urza.artifact import PAYLOAD_SUFFIX
from tests.cli.helpers import assert_one_line_error, publish, run


@pytest.fixture
def factories(tmp_path, monkeypatch):
    """A module of factories importable by the commands (and by the test, to inspect)."""
    (tmp_path / "cli_factories.py").write_text(
        "import sys\n"
        "import torch\n"
        "from torch import nn\n"
        "MADE = []\n"
        "def batch_norm(train):\n"
        "    module = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).train(train)\n"
        "    MADE.append(module)\n"
        "    return module\n"
        "def training():\n"
        "    return batch_norm(True)\n"
        "def evaluating():\n"
        "    return batch_norm(False)\n"
        "def lazy_norm():  # sized by the trial run: its buffers uninitialised before it\n"
        "    return nn.Sequential(nn.LazyLinear(4), nn.LazyBatchNorm1d())\n"
        "def from_program():  # an exported kernel published again: its eval() raises\n"
        "    return torch.export.export(nn.Linear(4, 4), (torch.randn(8, 4),)).module()\n"
        "class Lazy(nn.Module):  # its first call (the trial run) passes, the export does not\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.lin = nn.Linear(4, 4)\n"
        "        self.calls = 0\n"
        "    def forward(self, x):\n"
        "        self.calls += 1\n"
        "        return (self.lin if self.calls == 1 else self.lin_fused)(x)\n"
        "class Exits(Lazy):\n"
        "    def forward(self, x):\n"
        "        self.calls += 1\n"
        "        if self.calls > 1:\n"
        "            sys.exit(0)\n"
        "        return self.lin(x)\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("cli_factories", None)


@pytest.mark.parametrize("factory", ["training", "evaluating"])
def test_a_factory_module_is_exported_in_its_own_mode(
    factory, factories, tmp_path, keys, capsys
) -> None:
    """The trial run before the export called ``eval()`` and never put the mode back: a
    train-mode module (batch norm, dropout) was published in eval mode, where
    ``publish_artifact`` and the design export it in its current mode."""
    import cli_factories

    store = tmp_path / "store"
    argv = ["--factory", f"cli_factories:{factory}", "--input-shape", "8,4"]
    artifact = publish(capsys, store, keys, *argv)
    made = cli_factories.MADE[-1]
    train = factory == "training"
    assert made.training is train and made[1].training is train  # its mode, as it was
    assert int(made[1].num_batches_tracked) == 0  # the trial run left its statistics alone
    assert torch.equal(made[1].running_mean, torch.zeros(4))

    program = torch.export.load(store / f"{artifact}{PAYLOAD_SUFFIX}").module()
    x = torch.randn(6, 4) * 3 + 2
    expected = copy.deepcopy(made)(x)  # batch statistics in train mode, running ones in eval
    other = copy.deepcopy(made).train(not train)(x)
    torch.testing.assert_close(program(x), expected)
    assert not torch.allclose(program(x), other)


@pytest.mark.parametrize(
    ("factory", "fragment"),
    [
        ("Lazy", "torch.export of Lazy failed: AttributeError: 'Lazy' object has no attribute"),
        # An exit() in the traced forward exited 0, silently, as if the publish had succeeded.
        ("Exits", "torch.export of Exits failed: SystemExit: 0"),
    ],
)
def test_an_export_failing_in_the_users_forward_is_one_line(
    factory, fragment, factories, tmp_path, keys, capsys
) -> None:
    store = tmp_path / "store"
    argv = ["urza", "publish", "--store", str(store), "--key", str(keys)]
    rc, out, err = run(
        capsys, *argv, "--factory", f"cli_factories:{factory}", "--input-shape", "8,4"
    )
    assert_one_line_error(rc, err, fragment)
    assert out == "" and not store.exists()  # nothing signed, nothing written


def test_an_exported_programs_module_is_published(factories, tmp_path, keys, capsys) -> None:
    """Its ``eval()`` raises NotImplementedError: the trial run called it, a traceback."""
    store = tmp_path / "store"
    argv = ["--factory", "cli_factories:from_program", "--input-shape", "8,4"]
    artifact = publish(capsys, store, keys, *argv)
    program = torch.export.load(store / f"{artifact}{PAYLOAD_SUFFIX}").module()
    assert program(torch.randn(8, 4)).shape == (8, 4)


@pytest.mark.parametrize(
    ("limit", "argv", "fragment"),
    [
        # Parameters of 112 bytes under the limit, an exported payload of kilobytes over it.
        (1000, ["--factory", "cli_factories:evaluating"], "evaluating exported to "),
        (1000, ["--builtin", "affine-shift", "--dim", "4"], "affine-shift exported to "),
        # Parameters over it: refused before the export (of a large module, minutes long).
        (100, ["--factory", "cli_factories:evaluating"], "has 112 bytes of parameters, above"),
    ],
)
def test_a_kernel_no_client_would_fetch_is_not_published(
    limit, argv, fragment, factories, tmp_path, keys, capsys, monkeypatch
) -> None:
    """The ``--builtin`` path refused parameters above what a client fetches, the
    ``--factory`` path published any size: an artifact every verify and GERMINATE refuses."""
    import kasmina.cli.publish_checks

    monkeypatch.setattr(kasmina.cli.publish_checks, "MAX_BUILD_BYTES", limit)
    store = tmp_path / "store"
    argv = ["--store", str(store), "--key", str(keys), *argv, "--input-shape", "2,4"]
    rc, out, err = run(capsys, "urza", "publish", *argv)
    assert_one_line_error(rc, err, fragment, f"above the {limit} bytes an Urza client fetches")
    assert out == "" and not store.exists()  # nothing signed, nothing written


def test_a_lazy_factory_module_is_sized_by_the_trial_run(factories, tmp_path, keys, capsys):
    """The trial run's buffer keeping copied every buffer first, and a lazy module's are not
    there to copy until that run sizes them: a lazy batch norm was refused as a module that
    "does not run", where it published before."""
    store = tmp_path / "store"
    artifact = publish(
        capsys, store, keys, "--factory", "cli_factories:lazy_norm", "--input-shape", "8,6"
    )
    program = torch.export.load(store / f"{artifact}{PAYLOAD_SUFFIX}").module()
    assert program(torch.randn(5, 6)).shape == (5, 4)
