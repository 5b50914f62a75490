"""Batched augmentation (crop, flip, random affine, mixup, CutMix) on image tensors, on whatever device the batch
is on, and the views of a training step made of them (StepViews).

Per-sample torchvision transforms cost about half a millisecond each on a CPU
core, as much as the training step of a small network; doing crop and flip
for a whole batch with one gather keeps augmentation off the critical path.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from curate.device import to_device
from train.config import DistillConfig


def random_crop_flip(images: torch.Tensor, padding: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Per-sample random crop of the zero-padded images back to their size, and random horizontal flips.

    ``images`` is N x C x H x W; ``generator`` lives on the CPU so runs are reproducible across devices.
    """
    n, _, h, w = images.shape
    if padding <= 0 and not flip:
        return images
    padded = F.pad(images, (padding, padding, padding, padding))
    # all of the step's draws in one copy to the device (a copy per draw would stall a GPU three times a step)
    shifts = torch.randint(0, 2 * padding + 1, (2, n), generator=generator)
    mirrored = torch.rand(n, generator=generator) < 0.5 if flip else torch.zeros(n, dtype=torch.bool)
    draws = to_device(torch.cat([shifts, mirrored[None]]), images.device)
    dy, dx, mirrored = draws[0], draws[1], draws[2].bool()
    rows = dy[:, None] + torch.arange(h, device=images.device)
    cols = dx[:, None] + torch.arange(w, device=images.device)
    if flip:
        cols = torch.where(mirrored[:, None], cols.flip(1), cols)
    batch = torch.arange(n, device=images.device)[:, None, None]
    # Advanced indexing puts the indexed dims first: N x H x W x C. A plain .contiguous() would keep the
    # permuted strides when C is 1 (they count as contiguous), and convolutions would then take the
    # channels-last path even for a model kept in the default layout: copy into standard strides.
    gathered = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]
    return gathered.permute(0, 3, 1, 2).clone(memory_format=torch.contiguous_format)


def random_affine(inputs: torch.Tensor, strength: float, fill: torch.Tensor,
                  generator: torch.Generator) -> torch.Tensor:
    """Each view rotated, scaled and sheared by its own random draw, all in one resampling: rotation up to
    30 degrees x ``strength`` either way, scale between 2**(-0.5 x strength) and 2**(0.5 x strength), horizontal
    shear up to 0.3 x ``strength``. ``inputs`` are normalised N x C x H x W views; the area the warp uncovers
    takes ``fill`` (C values: the normalised value of a black pixel, the background of the pool's images)."""
    n = len(inputs)
    draws = torch.rand(3, n, generator=generator) * 2 - 1  # in [-1, 1): angle, log2 scale, shear
    angle = draws[0] * (torch.pi / 6) * strength
    zoom = torch.exp2(-draws[1] * 0.5 * strength)  # the grid's scale: above 1 shows more, so the content shrinks
    shear = draws[2] * 0.3 * strength
    cos, sin = torch.cos(angle) * zoom, torch.sin(angle) * zoom
    theta = torch.stack([torch.stack([cos, -sin + shear * cos, torch.zeros(n)], 1),
                         torch.stack([sin, cos + shear * sin, torch.zeros(n)], 1)], 1)
    theta = to_device(theta, inputs.device).to(inputs.dtype)
    grid = F.affine_grid(theta, list(inputs.shape), align_corners=False)
    fill = fill.to(inputs.device, inputs.dtype).view(1, -1, 1, 1)
    # grid_sample pads with zeros: warp the views less their background so that the padding is the background
    return F.grid_sample(inputs - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill


def step_generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
    """The CPU generator of every random draw of one training step on one rank: resumes exactly."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step + (rank << 40))


def mix(images: torch.Tensor, mixup: float, cutmix: float, seed: int, step: int, rank: int = 0,
        prob: float = 1.0) -> torch.Tensor:
    """Each sample mixed with another of the batch (a seeded permutation), with a Beta(alpha, alpha) share per
    sample, the larger share kept by the sample itself: mixup blends the whole images, CutMix pastes a box of the
    other image covering the smaller share of the area. With both, each step draws one of the two (even odds).
    With ``prob`` below 1 the step mixes with that chance and otherwise returns ``images`` as they are."""
    rng = np.random.default_rng([seed, step, rank] if rank else [seed, step])
    if prob < 1 and rng.random() >= prob:  # drawn only then: a run mixing every step keeps its draws
        return images
    use_cutmix = cutmix > 0 and (mixup <= 0 or rng.random() < 0.5)
    lam = torch.from_numpy(rng.beta(*(2 * [cutmix if use_cutmix else mixup]), len(images)).astype(np.float32))
    lam = torch.maximum(lam, 1 - lam)
    perm = to_device(torch.from_numpy(rng.permutation(len(images))), images.device)
    if use_cutmix:
        return torch.where(to_device(_boxes(images.shape, 1 - lam, rng), images.device), images[perm], images)
    lam = to_device(lam, images.device).view(-1, 1, 1, 1)
    return lam * images + (1 - lam) * images[perm]


def _boxes(shape: torch.Size, share: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """N x 1 x H x W masks, each a box inside the image covering about ``share`` of its area."""
    n, _, h, w = shape
    box_h = (h * share.sqrt()).round().long()
    box_w = (w * share.sqrt()).round().long()
    top = torch.from_numpy(np.floor(rng.random(n) * (h - box_h.numpy() + 1)).astype(np.int64))
    left = torch.from_numpy(np.floor(rng.random(n) * (w - box_w.numpy() + 1)).astype(np.int64))
    rows = torch.arange(h)[None, :]
    cols = torch.arange(w)[None, :]
    in_rows = (rows >= top[:, None]) & (rows < (top + box_h)[:, None])
    in_cols = (cols >= left[:, None]) & (cols < (left + box_w)[:, None])
    return (in_rows[:, :, None] & in_cols[:, None, :])[:, None]


class StepViews:
    """The normalised views a training step trains on: cropped, flipped, warped and, until the clean finish
    (``--clean-finish``), mixed; every draw seeded by (seed, step, rank), so a resumed run sees the same views."""

    def __init__(self, cfg: DistillConfig, normalize: Callable[[torch.Tensor], torch.Tensor], channels: int,
                 steps: int, rank: int, memory_format: torch.memory_format) -> None:
        self.cfg, self.normalize, self.rank, self.memory_format = cfg, normalize, rank, memory_format
        # the normalised value of a black pixel: the background of the pool's images, where a warp uncovers
        self.black = normalize(torch.zeros(1, channels, 1, 1, dtype=torch.uint8)).flatten()
        self.mixing_steps = steps - round(steps * cfg.clean_finish) if cfg.mixup > 0 or cfg.cutmix > 0 else 0

    def __call__(self, pixels: torch.Tensor, step: int, generator: torch.Generator) -> torch.Tensor:
        """Views of the uint8 ``pixels`` for step ``step``; ``generator`` is the step's (step_generator)."""
        cfg = self.cfg
        inputs = self.normalize(random_crop_flip(pixels, cfg.crop_padding, cfg.flip, generator))
        if cfg.affine > 0:
            inputs = random_affine(inputs, cfg.affine, self.black, generator)
        if step < self.mixing_steps:
            inputs = mix(inputs, cfg.mixup, cfg.cutmix, cfg.seed, step, self.rank, cfg.mix_prob)
        return inputs.contiguous(memory_format=self.memory_format)
