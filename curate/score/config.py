"""What `curate score` is asked to do: one dataclass, every default declared here, checked when built."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from curate.options import at_least, one_of

if TYPE_CHECKING:
    import torch

DECODE_PLACES = ("auto", "workers", "device")


@dataclass
class ScoreConfig:
    teacher: Path
    pool: str
    out: Path = Path("scored")
    root: Path | None = None
    pool_options: dict = field(default_factory=dict)
    teacher_meta: Path | None = None
    teacher_weights: Path | None = None  # a state_dict for a library teacher (torchvision:NAME, timm:NAME)
    trust_pickle: bool = False
    batch_size: int = 256
    workers: int | None = None  # None: none for array-backed pools, one per core for decoded ones
    shard_rows: int = 65536
    limit: int | None = None
    device: str = "auto"
    autocast: bool | None = None  # None: on CUDA only
    channels_last: bool = True
    decode: str = "auto"  # where JPEGs of encoded-image pools are decoded; auto: on the device when it is CUDA
    reference_count: int = 2048
    seed: int = 0
    executor: str = "local"  # where the teacher runs (curate/score/executors); not part of the output's identity
    address: str | None = None  # ray: the cluster to join (default: $RAY_ADDRESS, else a local Ray)
    num_actors: int | None = None  # ray: teachers running at once (default: one per GPU, else one per CPU)

    def __post_init__(self) -> None:
        at_least(1, batch_size=self.batch_size, shard_rows=self.shard_rows, limit=self.limit,
                 num_actors=self.num_actors)
        at_least(0, workers=self.workers)
        at_least(64, reference_count=self.reference_count)
        one_of(DECODE_PLACES, decode=self.decode)

    def jpegs_on_device(self, device: torch.device) -> bool:
        """Whether JPEGs reach the scoring process encoded, to be decoded on ``device``."""
        return self.decode == "device" or (self.decode == "auto" and device.type == "cuda")
