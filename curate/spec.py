"""The input a model expects (channels, size, normalisation) and the transform that gets any image there."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import torch

from curate.errors import UserError

if TYPE_CHECKING:
    from torchvision.transforms import v2

INTERPOLATIONS = ("nearest", "bilinear", "bicubic")


@dataclass(frozen=True)
class InputSpec:
    """Channels, square size and per-channel mean/std (in [0, 1] units) of a model's input; with
    ``resize_size``, the evaluation transform of ImageNet-size models: the shorter side resized to it, then the
    centre ``image_size`` square cropped (crop fraction ``image_size / resize_size``), with ``interpolation``."""

    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize_size: int | None = None
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise UserError(f"interpolation {self.interpolation!r} is not one of {', '.join(INTERPOLATIONS)}: fix "
                            "the teacher's meta")
        if self.resize_size is not None and self.resize_size < self.image_size:
            raise UserError(f"resize_size {self.resize_size} is smaller than image_size {self.image_size}: the centre "
                            "crop must fit inside the resized image; fix the teacher's meta")
        if self.in_channels not in (1, 3):
            raise UserError(f"in_channels must be 1 or 3, got {self.in_channels}: fix the teacher's meta")
        if self.image_size < 4:
            raise UserError(f"image_size must be at least 4, got {self.image_size}: fix the teacher's meta")
        for name, values in (("mean", self.mean), ("std", self.std)):
            if len(values) != self.in_channels:
                raise UserError(
                    f"{name} has {len(values)} values but in_channels is {self.in_channels}: "
                    f"give one {name} per channel in the teacher's meta"
                )
        if min(self.std) <= 0:
            raise UserError("std values must be positive: fix the teacher's meta")

    @classmethod
    def from_meta(cls, meta: dict) -> InputSpec:
        missing = [k for k in ("in_channels", "image_size", "mean", "std") if k not in meta]
        if missing:
            raise UserError(
                f"teacher meta lacks {', '.join(missing)}: supply them with --teacher-meta meta.json"
            )
        resize = meta.get("resize_size")
        if resize is None and meta.get("crop_pct") is not None:  # timm's way of saying it
            resize = int(int(meta["image_size"]) / float(meta["crop_pct"]))
        return cls(
            in_channels=int(meta["in_channels"]),
            image_size=int(meta["image_size"]),
            mean=tuple(float(v) for v in meta["mean"]),
            std=tuple(float(v) for v in meta["std"]),
            resize_size=None if resize is None else int(resize),
            interpolation=str(meta.get("interpolation", "bilinear")),
        )

    def to_meta(self) -> dict:
        meta = {
            "in_channels": self.in_channels,
            "image_size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
        }
        if self.resize_size is not None:
            meta |= {"resize_size": self.resize_size, "interpolation": self.interpolation}
        return meta

    def shape(self) -> tuple[int, int, int]:
        return (self.in_channels, self.image_size, self.image_size)

    def geometry(self) -> Geometry:
        """uint8 CHW image (or NCHW batch) of any channel count and size -> uint8 image(s) of this spec's shape."""
        return Geometry(self.in_channels, self.image_size, self.resize_size, self.interpolation)

    def normalize(self) -> Normalize:
        """Per batch (or sample): uint8 images of this spec's shape -> the normalised float32 input the model takes."""
        return Normalize(self.mean, self.std)


def merge_meta(base: dict, overrides: dict) -> dict:
    """``overrides`` over ``base``; an ``image_size`` given without ``resize_size`` keeps the base's crop fraction
    (a 224 model with resize 256 asked to run at 64 resizes to 73, not to 256 before a 64-pixel centre crop)."""
    merged = {**base, **overrides}
    if "image_size" in overrides and "resize_size" not in overrides and base.get("resize_size") and \
            base.get("image_size"):
        merged["resize_size"] = round(int(overrides["image_size"]) * base["resize_size"] / base["image_size"])
    return merged


class Normalize:
    """uint8 -> float32 in [0, 1] -> (x - mean) / std per channel: the arithmetic of torchvision's
    ``ToDtype(float32, scale=True)`` and ``Normalize`` (bit for bit), in place on one new tensor. The composed
    v2 transforms cost 2.8 us a row in scoring (dispatch and a copy per step), a third of the pipeline's own
    time with a trivial teacher."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.mean, self.std = mean, std
        self._constants: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.device not in self._constants:
            self._constants[images.device] = (torch.tensor(self.mean, device=images.device).view(-1, 1, 1),
                                              torch.tensor(self.std, device=images.device).view(-1, 1, 1))
        mean, std = self._constants[images.device]
        if images.is_floating_point():  # already in [0, 1], as ToDtype leaves it
            return images.to(torch.float32, copy=True).sub_(mean).div_(std)
        return images.to(torch.float32).mul_(1.0 / 255).sub_(mean).div_(std)


class Geometry:
    """Channel conversion and resize with torchvision: to the square size, or (``resize_size``) the shorter side
    to ``resize_size`` and the centre square cropped; a no-op (no copy) when the image already fits.

    The shortcut matters: most pools are already at the model's size, and v2
    transforms cost tens of microseconds each even when they change nothing.
    """

    def __init__(self, in_channels: int, image_size: int, resize_size: int | None = None,
                 interpolation: str = "bilinear") -> None:
        self.shape = (in_channels, image_size, image_size)
        self.resize_size, self.interpolation = resize_size, interpolation
        # an image already at the crop size still goes through the resize-then-crop of an evaluation transform
        self.fits = self.shape if resize_size is None else None

    @cached_property
    def convert(self) -> v2.Transform:
        """The transform, built on first need: importing torchvision costs a command seconds, and a pool already
        at the model's size never needs it."""
        from torchvision.transforms import v2

        in_channels, image_size, _ = self.shape
        channels: v2.Transform = v2.Grayscale(1) if in_channels == 1 else v2.RGB()
        mode = v2.InterpolationMode(self.interpolation)
        size: v2.Transform = v2.Resize((image_size, image_size), mode, antialias=True) \
            if self.resize_size is None else \
            v2.Compose([v2.Resize(self.resize_size, mode, antialias=True), v2.CenterCrop(image_size)])
        return v2.Compose([channels, size])

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """One CHW image or an NCHW batch (whose images all share a size)."""
        if tuple(image.shape[-3:]) == self.fits:
            return image
        return self.convert(image)
