"""The demo's data: scikit-learn's bundled digits, split, batched per rank, and scored."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from kasmina.demo.config import DemoConfig


@dataclass
class Digits:
    x: torch.Tensor
    y: torch.Tensor
    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor


def load_digits_split(seed: int, device: torch.device) -> Digits:
    """The 1,797 8x8 digits scaled to [0, 1]; 2/3 train, 1/6 validation, 1/6 test."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32, device=device) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64, device=device)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed)).to(device)
    n = len(x) // 6
    return Digits(x, y, perm[2 * n :], perm[:n], perm[n : 2 * n])


def with_classes(idx: torch.Tensor, data: Digits, classes: tuple[int, ...]) -> torch.Tensor:
    """The indices in ``idx`` whose digit is one of ``classes`` (order kept)."""
    wanted = torch.tensor(classes, device=data.y.device)
    return idx[torch.isin(data.y[idx], wanted)]


def batch_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The fraction of ``targets`` the logits' argmax gets right (``evaluate_seeds``' metric)."""
    return (logits.argmax(-1) == targets).float().mean()


def accuracy(model: nn.Module, data: Digits, idx: torch.Tensor) -> float:
    return accuracy_and_loss(model, data, idx)[0]


def accuracy_and_loss(model: nn.Module, data: Digits, idx: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        logits = model(data.x[idx])
        acc = (logits.argmax(-1) == data.y[idx]).float().mean().item()
        return acc, F.cross_entropy(logits, data.y[idx]).item()


def batches(
    data: Digits, epoch: int, cfg: DemoConfig, rank: int, world: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled full minibatches of ``data.train``; every rank draws the same order and keeps
    its share of each."""
    gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    order = data.train[torch.randperm(len(data.train), generator=gen).to(data.train.device)]
    for start in range(0, len(order) - cfg.batch_size + 1, cfg.batch_size):
        idx = order[start : start + cfg.batch_size][rank::world]
        yield data.x[idx], data.y[idx]


def steps_per_epoch(data: Digits, cfg: DemoConfig) -> int:
    return len(data.train) // cfg.batch_size
