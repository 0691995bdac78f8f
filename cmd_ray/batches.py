"""What every peer trains on, step by step: each epoch's order and batches (a function of the
seed and the epoch only, so every peer and worker agrees without talking), a replica's shard of
a batch, per-channel normalisation and the seeded crop-and-flip augmentation. Pure torch.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from cmd_ray.datasets import DatasetInfo


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """Training order of one epoch: a function of (seed, epoch) only, so every peer agrees."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(num_samples, generator=generator)


def epoch_batches(num_samples: int, batch_size: int, seed: int, epoch: int) -> Iterator[torch.Tensor]:
    """Positions of each training batch of an epoch; the last batch may be smaller."""
    order = epoch_permutation(num_samples, seed, epoch)
    yield from order.split(batch_size)


def shard(positions: torch.Tensor, replica: int, replicas: int) -> torch.Tensor:
    """Replica r's contiguous share of a global batch (the shards partition the batch)."""
    return positions.tensor_split(replicas)[replica]


def normalise(images: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 standardised per channel."""
    mean = torch.tensor(info.mean, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(info.std, device=images.device).view(1, -1, 1, 1)
    return (images.float() / 255.0 - mean) / std


def augment(images: torch.Tensor, generator: torch.Generator, padding: int = 4, flip: bool = True) -> torch.Tensor:
    """Random crop (zero padding `padding`) and, where `flip`, horizontal flip of half of a
    (B, C, H, W) batch. The draws are the same either way (one seed, one stream)."""
    batch, _, height, width = images.shape
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (batch,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (batch,), generator=generator)
    flip = (torch.rand(batch, generator=generator) < 0.5) & flip
    rows = (dy[:, None] + torch.arange(height)[None, :]).to(images.device)
    cols = (dx[:, None] + torch.arange(width)[None, :]).to(images.device)
    cols = torch.where(flip.to(images.device)[:, None], cols.flip(1), cols)
    b = torch.arange(batch, device=images.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[b, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()
