"""Standardising indicators against synthetic noise, and combining them into ``relatedness``.

The reference needs no in-distribution data: a few thousand noise images
(uniform, Gaussian, smooth blobs) at the teacher's input spec, scored by the
same teacher in the same run. Each indicator becomes a z-score against that
noise; ``relatedness`` averages the z-scores within each family (logits,
BatchNorm, features) and sums the families, so a family with more indicators
does not outvote the others. The prototype found standardising on the pool
itself or by ranks much worse (AUROC 0.60 against 0.90): the pool's own
statistics depend on what the pool happens to contain.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from curate.score.indicators import FAMILIES, INDICATORS

# A floor on the reference spread: an indicator that is constant on noise would otherwise explode.
_MIN_STD = 1e-3
_Z_CLIP = 50.0


@dataclass
class Reference:
    """Per-indicator mean and standard deviation on the noise reference (NaN: indicator unavailable)."""

    count: int
    mean: dict[str, float]
    std: dict[str, float]

    @classmethod
    def fit(cls, values: dict[str, torch.Tensor]) -> Reference:
        mean, std = {}, {}
        for name in INDICATORS:
            column = values[name].double()
            if torch.isnan(column).all():
                mean[name] = std[name] = float("nan")
                continue
            mean[name] = float(column.mean())
            std[name] = max(float(column.std()), _MIN_STD * max(1.0, abs(mean[name])))
        return cls(len(values[INDICATORS[0]]), mean, std)

    def to_json(self) -> dict:
        return {"count": self.count, "mean": _nan_to_none(self.mean), "std": _nan_to_none(self.std)}

    @classmethod
    def from_json(cls, data: dict) -> Reference:
        def restore(d: dict) -> dict[str, float]:
            return {k: float("nan") if v is None else float(v) for k, v in d.items()}

        return cls(int(data["count"]), restore(data["mean"]), restore(data["std"]))

    def available(self) -> list[str]:
        return [name for name in INDICATORS if not math.isnan(self.mean[name])]

    def standardize(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """z-score of every indicator against the noise reference (NaN stays NaN), clipped to +-50."""
        return {name: ((values[name].double() - self.mean[name]) / self.std[name]).clamp(-_Z_CLIP, _Z_CLIP).float()
                for name in INDICATORS}

    def relatedness(self, z: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sum over families of the mean z-score of the family's available indicators."""
        available = set(self.available())
        total = torch.zeros_like(z[INDICATORS[0]])
        for members in FAMILIES.values():
            present = [z[name] for name in members if name in available]
            if present:
                total = total + torch.stack(present).mean(0)
        return total


def _nan_to_none(values: dict[str, float]) -> dict[str, float | None]:
    return {k: None if math.isnan(v) else v for k, v in values.items()}
