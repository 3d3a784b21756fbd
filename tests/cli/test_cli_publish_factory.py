"""``kasmina urza publish --factory``: the user's module exported as it is, its failures one
line each."""

from __future__ import annotations

import copy
import sys

import pytest
import torch

from kasmina.urza.artifact import PAYLOAD_SUFFIX
from tests.cli.helpers import publish


@pytest.fixture
def factories(tmp_path, monkeypatch):
    """A module of factories importable by the commands (and by the test, to inspect)."""
    (tmp_path / "cli_factories.py").write_text(
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
