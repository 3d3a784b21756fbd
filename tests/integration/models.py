"""Models nobody here wrote, small enough to run in a second: the cases of the integration suite.

Each :class:`Case` builds a freshly initialised model (same weights every call), an input, a
scalar loss over the model's output, and says where the seeds go: the targets, the seeds per
slot and their width, ``chunk_dim`` and ``output_index``. Hugging Face models are built from a
config with random init, so nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], dict[str, torch.Tensor]]
    targets: str | list[str]
    seeds_per_layer: int
    chunk_size: int
    chunk_dim: int | None = None
    output_index: int = 0
    conv: bool = False  # seeds over channels: 1x1 convolution kernels

    def loss(self, out: Any) -> torch.Tensor:
        logits = getattr(out, "logits", out)
        return logits.float().pow(2).mean()

    def kernel(self, seed: int) -> nn.Module:
        """A seed kernel for one chunk, different per ``seed``."""
        torch.manual_seed(seed)
        c = self.chunk_size
        if self.conv:
            return nn.Sequential(nn.Conv2d(c, c, 1), nn.Tanh())
        return nn.Sequential(nn.Linear(c, c), nn.Tanh())


def _ids() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(0, 128, (2, 6), generator=generator)}


def tiny_llama(tie_word_embeddings: bool = False) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        use_cache=False,
        tie_word_embeddings=tie_word_embeddings,
        attn_implementation="eager",
    )
    return LlamaForCausalLM(config)


def tiny_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=32,
        vocab_size=128,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        use_cache=False,
        attn_implementation="eager",
    )
    return GPT2LMHeadModel(config)


def encoder() -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


def _tokens() -> dict[str, torch.Tensor]:
    return {"src": torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))}


class BasicBlock(nn.Module):
    """ResNet's basic block: two 3x3 convolutions with batch norm and a shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class TinyResNet(nn.Module):
    """A ResNet-style classifier: stem, two stages of basic blocks, pooling, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.layer1 = nn.Sequential(BasicBlock(8, 8, 1), BasicBlock(8, 8, 1))
        self.layer2 = nn.Sequential(BasicBlock(8, 16, 2), BasicBlock(16, 16, 1))
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(x.mean((2, 3)))


def _images() -> dict[str, torch.Tensor]:
    return {"x": torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))}


CASES = [
    Case("llama-down_proj", tiny_llama, _ids, ["mlp.down_proj"], 2, 16),
    Case("llama-o_proj", tiny_llama, _ids, ["self_attn.o_proj"], 4, 8),
    Case("llama-self_attn", tiny_llama, _ids, ["self_attn"], 2, 16, output_index=0),
    Case("gpt2-c_proj", tiny_gpt2, _ids, ["mlp.c_proj"], 2, 16),
    Case("encoder-linear2", encoder, _tokens, ["linear2"], 2, 8),
    Case("encoder-self_attn", encoder, _tokens, ["self_attn"], 2, 8),
    # A regex picks the first stage's second convolutions; the seeds split their channels.
    Case("resnet-conv2", TinyResNet, _images, r"layer1\.\d\.conv2", 2, 4, conv=True),
    # A whole block: not a ConvNd, so its channels are asked for with chunk_dim=1.
    Case("resnet-block", TinyResNet, _images, r"layer2\.1", 2, 8, chunk_dim=1, conv=True),
]
