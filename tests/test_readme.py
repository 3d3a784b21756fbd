"""The README's Python blocks run as a user would copy them, so what it shows stays true.

Each ```python block of README.md runs in a fresh temporary working directory (with
``KASMINA_HOME`` there too, so run directories stay in it), executed in this process: a new
process per block would spend most of the budget importing torch. Many blocks are fragments of
a user's script that use names the user has (``model``, ``loader``, ``x``): an HTML comment on
the line before the block, invisible where the README is rendered, says what the test supplies:

    <!-- readme-test: setup=NAME continues needs=cuda -->

- ``setup=NAME``: run ``SETUPS[NAME]`` below first, in the block's namespace (the user's own
  names: a model, a loader, a batch); ``CHECKS[NAME]``, where
  there is one, runs after the block and asserts what the block's comments promise.
- ``continues``: the block goes on from the Python block before it: that one runs first (with
  its own marker), in the same namespace.
- ``follows``: the block before it runs first, in the same directory, and this one in a fresh
  namespace (the README's "a new process").
- ``needs=cuda``: the block is written for a CUDA device; without one it is skipped, saying so.

A block without a marker must run as it stands. A ``print(...)  # TEXT`` line promises TEXT in
the block's output, and the test holds it to that. Every block finds the files of the README's
key setup in its directory (``commands.json``, ``publishers.json``, ``publisher.key`` and the
``./urza`` store): that shell block runs once per module, line by line through the CLI, as
written. The other shell blocks are not run here: ``make demo``/``make test`` are the demo and
this suite, and the ``torchrun`` lines start processes (the loop they run is the block above
them, run here as one rank).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
_MARKER = re.compile(r"<!--\s*readme-test:((?:(?!-->).)*)-->\s*\Z", re.S)
_PROMISE = re.compile(r"^print\(.*\)\s+#\s*(\S.*?)\s*$", re.M)


@dataclass(frozen=True)
class Block:
    index: int  # among the README's python blocks
    line: int  # of its opening fence
    section: str
    code: str
    setup: str | None
    continues: bool
    follows: bool
    needs_cuda: bool

    @property
    def name(self) -> str:
        return f"L{self.line}-{self.section}"


def _blocks() -> tuple[list[Block], str]:
    text = README.read_text(encoding="utf-8")
    blocks: list[Block] = []
    keygen = ""
    end, section = 0, "top"
    for match in _FENCE.finditer(text):
        before, end = text[end : match.start()], match.end()
        headings = re.findall(r"^#+ (.+)$", before, re.M)  # outside code: not a `# comment`
        if headings:
            section = re.sub(r"\W+", "-", headings[-1]).strip("-").lower()
        lang, code = match.group(1), match.group(2)
        if lang in ("sh", "bash") and code.startswith("kasmina keygen") and not keygen:
            keygen = code
        if lang != "python":
            continue
        marker = _MARKER.search(before)
        words = marker.group(1).split() if marker else []
        options = dict(w.split("=", 1) for w in words if "=" in w)
        flags = {w for w in words if "=" not in w}
        unknown = (set(options) - {"setup", "needs"}) | (flags - {"continues", "follows"})
        line = text.count("\n", 0, match.start()) + 1
        assert not unknown, f"README line {line}: unknown readme-test marker words {unknown}"
        assert options.get("needs", "cuda") == "cuda", f"README line {line}: needs=cuda only"
        blocks.append(
            Block(
                len(blocks),
                line,
                section,
                code,
                options.get("setup"),
                "continues" in flags,
                "follows" in flags,
                "needs" in options,
            )
        )
    return blocks, keygen


BLOCKS, KEYGEN = _blocks()


def _key_setup(directory: Path) -> list[str]:
    """The README's key setup, its shell block run line by line through the CLI as written
    (``kasmina ...``, a ``> FILE`` redirect of stdout) in ``directory``; the ids it published."""
    from kasmina.cli.main import main

    published: list[str] = []
    for line in KEYGEN.replace("\\\n", " ").splitlines():
        words = shlex.split(line.split("#", 1)[0])
        if not words:
            continue
        assert words[0] == "kasmina", line
        target = None
        if ">" in words:
            words, target = words[: words.index(">")], words[words.index(">") + 1]
        out, here = io.StringIO(), os.getcwd()
        os.chdir(directory)  # the README's relative paths (contextlib.chdir is Python 3.11+)
        try:
            with contextlib.redirect_stdout(out):
                assert main(words[1:]) == 0, line
        finally:
            os.chdir(here)
        if target is not None:
            (directory / target).write_text(out.getvalue(), encoding="utf-8")
        if words[1:3] == ["urza", "publish"]:
            published.append(out.getvalue().strip())
    return published


@pytest.fixture(scope="module")
def key_setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    directory = tmp_path_factory.mktemp("key-setup")
    return directory, _key_setup(directory)


_MLP = """
import torch
import torch.nn.functional as F
from torch import nn

class MyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(784, 32), nn.Linear(32, 32), nn.Linear(32, 10)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))

torch.manual_seed(0)
model = MyNet()
epochs, accuracy = 2, 0.5
loader = val_loader = shard_of_this_rank = [
    (torch.randn(8, 784), torch.randint(0, 10, (8,))) for _ in range(2)
]
"""

# The signed command the loop hands the manager: a GERMINATE of fc2[0] on the key setup's first
# artifact (exported on (8, 16): the slot's chunks are 16 wide), applied at a later step.
_RAW_BYTES = """
from kasmina import Keyring, make_seed_command, sign_command
raw_bytes = sign_command(
    make_seed_command("germinate", "fc2[0]", _published[0], {"learning_rate": 1e-3}),
    Keyring.from_file("commands.json"),
    "tamiyo",
).SerializeToString()
"""

_TINY_LLAMA = """
from transformers import LlamaConfig, LlamaForCausalLM
hidden = 32
llama = LlamaForCausalLM(LlamaConfig(hidden_size=hidden, intermediate_size=64, vocab_size=128,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
"""

SETUPS: dict[str, str] = {
    "keys": "from kasmina import KasminaConfig",
    "loop": _MLP + _RAW_BYTES,
    "two-losses": """
x, y = loader[0]
out = model(x)
aux_weight = 0.1
def aux_loss(out):
    return out.pow(2).mean()
""",
    "sam": "manager.step()\nrho, teacher_logits = 0.05, None",
    # A ROLLBACK waits at the step's safe point, so the block takes its rollback branch.
    "grad-scaler": """
from kasmina import make_rollback_command
manager.step()
scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
manager.track("scaler", scaler)
rollback = make_rollback_command(0)
assert manager.handle_adaptation_command(
    sign_command(rollback, Keyring.from_file("commands.json"), "tamiyo").SerializeToString()
)
loss, kd = F.cross_entropy(model(x), y), manager.collect_kd_losses()
""",
    "models": "import kasmina\nimport torch\nimport torch.nn.functional as F\n"
    + "from torch import nn\n"
    + _TINY_LLAMA
    + """
class Block(nn.Module):  # torchvision's BasicBlock without its downsampling
    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + x)

class ResNet(nn.Module):  # resnet18's names and widths in its first two stages
    def __init__(self):
        super().__init__()
        self.conv1, self.down = nn.Conv2d(3, 64, 3, padding=1), nn.Conv2d(64, 128, 1, stride=2)
        self.layer1 = nn.Sequential(Block(64), Block(64))
        self.layer2 = nn.Sequential(Block(128), Block(128))

    def forward(self, x):
        return self.layer2(self.down(self.layer1(self.conv1(x))))

resnet = ResNet()
""",
    "mynet": _MLP,
    "serve": _MLP,  # the same host class, built again
    # torchrun's variables for one rank on this machine.
    "torchrun": _MLP
    + """
for name, value in dict(RANK=0, WORLD_SIZE=1, LOCAL_RANK=0, MASTER_ADDR="127.0.0.1",
                        MASTER_PORT=_free_port()).items():
    _setenv(name, str(value))
""",
    "ops": """
import torch
from torch import nn
host, seed = nn.Linear(16, 16).cuda(), nn.Linear(16, 16).cuda()
model = nn.ModuleDict({"host": host, "seed": seed})
x = host(torch.randn(4, 16, device="cuda"))
def task_loss(y):
    return y.pow(2).mean()
student_logits = torch.randn(4, 10, device="cuda", requires_grad=True)
teacher_logits = torch.randn(4, 10, device="cuda")
""",
    "lm-heads": """
import torch
from torch import nn
from types import SimpleNamespace
student = SimpleNamespace(lm_head=nn.Linear(16, 64, bias=False))
teacher = SimpleNamespace(lm_head=nn.Linear(32, 64, bias=False))
student_hidden = torch.randn(2, 5, 16, requires_grad=True)
teacher_hidden = torch.randn(2, 5, 32)
attention_mask = torch.ones(2, 5, dtype=torch.long)
attention_mask[0, -2:] = 0
""",
    "kd-head": _TINY_LLAMA
    + """
import torch
import kasmina
model = llama
manager = kasmina.KasminaKernelManager(
    kasmina.KasminaConfig(urza_url="./urza", kd_enabled=True),
    keyring=kasmina.Keyring({"tamiyo": kasmina.generate_key()}),
)
manager.attach(model, ["mlp.down_proj"], seeds_per_layer=2, chunk_size=hidden // 2)
teacher_logits = torch.randn(2, 5, 128)
""",
}

CHECKS: dict[str, str] = {
    "keys": "assert config.hmac_keys_file.endswith('commands.json')",
    "loop": """
assert manager.system_state().global_step == epochs * len(loader)
manager.apply_pending(wait=True)  # where the kernel's fetch outlasted the loop's steps
assert manager.seed("fc2[0]").stage.name == "ISOLATED_INIT"
""",
    "grad-scaler": """
assert [o.kind for o in report["commands"] if o.ok] == ["rollback"]
assert scaler.get_scale() == 1024.0
assert manager.seed("fc2[0]").stage.name == "DORMANT"  # as at epoch 0, before the GERMINATE
""",
    "models": """
assert llama(torch.randint(0, 128, (2, 5))).logits.shape == (2, 5, 128)
assert resnet(torch.randn(2, 3, 8, 8)).shape == (2, 128, 4, 4)
assert sum(type(m).__name__ == "KasminaLayer" for m in llama.modules()) == 4
assert sum(type(m).__name__ == "KasminaLayer" for m in resnet.modules()) == 3
""",
    "mynet": "assert Path('grown.kasmina').stat().st_size > 0",
    "serve": """
assert program.module()(torch.randn(5, 784)).shape == (5, 10)
assert Path('grown.pt2').stat().st_size > 0
""",
    "ops": "assert norms.shape == (2,) and not bool(leaked)",
    "lm-heads": "loss.backward()\nassert student_hidden.grad.shape == student_hidden.shape",
    "kd-head": "model(torch.randint(0, 128, (2, 5)))\nassert manager.collect_kd_losses() is None",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _close(namespace: dict[str, Any]) -> None:
    from kasmina.manager.manager import KasminaKernelManager

    for value in list(namespace.values()):
        if isinstance(value, KasminaKernelManager):
            value.close()


def _run(block: Block, namespace: dict[str, Any], out: io.StringIO) -> None:
    if block.continues or block.follows:
        earlier = namespace
        if block.follows:
            earlier = _namespace() | {k: namespace[k] for k in ("_setenv", "_published")}
        try:
            _run(BLOCKS[block.index - 1], earlier, io.StringIO())
        finally:
            if earlier is not namespace:
                _close(earlier)
    if block.setup is not None:
        assert block.setup in SETUPS, f"README line {block.line}: no setup {block.setup!r}"
        exec(SETUPS[block.setup], namespace)
    code = compile(block.code, f"README.md:{block.line}", "exec")
    with contextlib.redirect_stdout(out):
        exec(code, namespace)
    if block.setup in CHECKS:
        exec(CHECKS[block.setup], namespace)


def _namespace() -> dict[str, Any]:
    return {"__name__": "__readme__", "_free_port": _free_port, "Path": Path}


def test_every_python_block_is_found() -> None:
    assert len(BLOCKS) >= 10 and "kasmina urza publish" in KEYGEN
    for block in BLOCKS:
        assert not (block.continues and block.follows), block.name
        assert block.index > 0 or not (block.continues or block.follows), block.name
        assert block.setup is None or block.setup in SETUPS, (block.name, block.setup)
    assert set(CHECKS) <= set(SETUPS)
    assert {b.setup for b in BLOCKS} >= set(SETUPS), "a setup no README block names"


@pytest.mark.parametrize("block", BLOCKS, ids=[b.name for b in BLOCKS])
def test_readme_block_runs(
    block: Block,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    key_setup: tuple[Path, list[str]],
) -> None:
    if block.needs_cuda and not torch.cuda.is_available():
        pytest.skip(f"README line {block.line} is written for a CUDA device (needs=cuda)")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KASMINA_HOME", str(tmp_path / "home"))
    keys, published = key_setup
    shutil.copytree(keys, tmp_path, dirs_exist_ok=True)  # the key setup's files, modes kept
    namespace, out = _namespace(), io.StringIO()
    namespace["_setenv"] = monkeypatch.setenv  # torchrun's variables, put back after the test
    namespace["_published"] = published
    try:
        _run(block, namespace, out)
    finally:
        _close(namespace)
        from kasmina.control.processes import shutdown_process_group

        shutdown_process_group()  # a no-op unless a block left its group behind
    printed = out.getvalue().splitlines()
    for promised in _PROMISE.findall(block.code):
        assert promised in printed, f"README line {block.line} promises {promised!r}: {printed}"
