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
    spatial: int = 2  # of those convolutions: Conv2d, or Conv1d over a sequence
    output: str = "logits"  # the field of a ModelOutput the loss is taken on
    # How test_models compiles it: after every transition, or once with a seed ACTIVE, or not
    # at all (a recompile costs a Hugging Face model about 10 s on two CPU cores).
    compiled: str = "every stage"  # or "active", or ""

    def logits(self, out: Any) -> torch.Tensor:
        """The tensor the loss is taken on: the output's ``output`` field, or the output."""
        return getattr(out, self.output, out)

    def loss(self, out: Any) -> torch.Tensor:
        return self.logits(out).float().pow(2).mean()

    def kernel(self, seed: int) -> nn.Module:
        """A seed kernel for one chunk, different per ``seed``."""
        torch.manual_seed(seed)
        c = self.chunk_size
        if self.conv:
            conv = nn.Conv1d if self.spatial == 1 else nn.Conv2d
            return nn.Sequential(conv(c, c, 1), nn.Tanh())
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


def tiny_albert() -> nn.Module:
    """ALBERT: one transformer layer shared by its three layers, so each module in it runs three
    times per forward."""
    from transformers import AlbertConfig, AlbertModel

    torch.manual_seed(0)
    config = AlbertConfig(
        vocab_size=128,
        embedding_size=16,
        hidden_size=32,
        num_hidden_layers=3,
        num_hidden_groups=1,
        num_attention_heads=2,
        intermediate_size=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_implementation="eager",
    )
    return AlbertModel(config)


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


def tiny_gemma2() -> nn.Module:
    """Gemma 2: tied embeddings, attention and final logit softcapping, sandwich norms."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
        use_cache=False,
        attn_implementation="eager",
    )
    return Gemma2ForCausalLM(config)


def tiny_vit() -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=16,
        patch_size=8,
        num_labels=5,
        attn_implementation="eager",
    )
    return ViTForImageClassification(config)


def _pixels() -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))}


def tiny_whisper() -> nn.Module:
    """Whisper: a Conv1d front end over mel frames, an encoder and a decoder."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(0)
    config = WhisperConfig(
        vocab_size=64,
        num_mel_bins=8,
        encoder_layers=1,
        decoder_layers=1,
        d_model=16,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_source_positions=8,
        max_target_positions=16,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
        use_cache=False,
        attn_implementation="eager",
    )
    return WhisperForConditionalGeneration(config)


def _speech() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {
        "input_features": torch.randn(2, 8, 16, generator=generator),  # 2 x max_source_positions
        "decoder_input_ids": torch.randint(3, 64, (2, 5), generator=generator),
    }


def tiny_clip() -> nn.Module:
    """CLIP: a text and a vision tower, each projected (``outputs.pooler_output = ...``)."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    tower = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1}
    config = CLIPConfig(
        text_config={**tower, "num_attention_heads": 2, "vocab_size": 64, "bos_token_id": 0,
                     "eos_token_id": 2, "max_position_embeddings": 16},
        vision_config={**tower, "num_attention_heads": 2, "image_size": 16, "patch_size": 8},
        projection_dim=8,
        attn_implementation="eager",
    )  # fmt: skip
    return CLIPModel(config)


def _text_and_pixels() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {
        "input_ids": torch.randint(3, 64, (2, 6), generator=generator),
        "pixel_values": torch.randn(2, 3, 16, 16, generator=generator),
    }


def tiny_wav2vec2() -> nn.Module:
    """Wav2Vec2: a Conv1d feature encoder over raw audio that, in training, marks its input as
    needing grad (under ``no_grad`` too), then a transformer encoder; no dropout or layerdrop."""
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

    torch.manual_seed(0)
    config = Wav2Vec2Config(
        vocab_size=32,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        conv_dim=(8, 8),
        conv_stride=(4, 2),
        conv_kernel=(8, 4),
        num_conv_pos_embeddings=4,
        num_conv_pos_embedding_groups=2,
        hidden_dropout=0.0,
        activation_dropout=0.0,
        attention_dropout=0.0,
        feat_proj_dropout=0.0,
        final_dropout=0.0,
        layerdrop=0.0,
        apply_spec_augment=False,
        attn_implementation="eager",
    )
    return Wav2Vec2ForCTC(config)


def audio() -> dict[str, torch.Tensor]:
    return {"input_values": torch.randn(2, 200, generator=torch.Generator().manual_seed(1))}


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
    Case("gemma2-o_proj", tiny_gemma2, _ids, ["self_attn.o_proj"], 2, 16, compiled=""),
    Case("vit-fc2", tiny_vit, _pixels, ["mlp.fc2"], 2, 16, compiled=""),
    # The front end's convolutions: seeds over channels of a (batch, channels, frames) output.
    Case(
        "whisper-conv",
        tiny_whisper,
        _speech,
        r"model\.encoder\.conv\d",
        2,
        8,
        conv=True,
        spatial=1,
        compiled="active",
    ),
    # Rank-2 outputs, written into the towers' output objects by the model.
    Case(
        "clip-projection",
        tiny_clip,
        _text_and_pixels,
        ["visual_projection", "text_projection"],
        2,
        4,
        output="logits_per_image",
        compiled="active",
    ),
    Case("encoder-linear2", encoder, _tokens, ["linear2"], 2, 8),
    Case("encoder-self_attn", encoder, _tokens, ["self_attn"], 2, 8),
    # A regex picks the first stage's second convolutions; the seeds split their channels.
    Case("resnet-conv2", TinyResNet, _images, r"layer1\.\d\.conv2", 2, 4, conv=True),
    # A whole block: not a ConvNd, so its channels are asked for with chunk_dim=1.
    Case("resnet-block", TinyResNet, _images, r"layer2\.1", 2, 8, chunk_dim=1, conv=True),
]
