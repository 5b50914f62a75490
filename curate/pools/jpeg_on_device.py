"""JPEG decoding where the teacher runs. Pools of encoded images (files, tar members, table cells) can hand a
batch's JPEGs over as bytes; the scoring process then decodes them on its device (nvJPEG through torchvision's
``decode_jpeg`` on CUDA, batched), crops and resizes them there to the teacher's geometry, and fills them into
the batch beside the images the workers decoded (every other format). On a GPU host the workers' share of a
JPEG is then reading its bytes, and the host cores stop being the bound of a 224x224 teacher.

The pixels are close to the CPU path's, not equal: the GPU resizes the full decoded image straight to the
teacher's size (the CPU path first decodes at a reduced scale and bounds the shorter side by ``max_side``), and a
grey teacher gets the JPEG's own luma plane. A JPEG the device cannot decode (CMYK, damaged) is decoded on the
CPU in the scoring process; one that no decoder reads is reported as an unreadable sample, as anywhere else.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from PIL import Image

from curate.device import to_device
from curate.pools.base import SampleError, to_chw_uint8
from curate.pools.images import Decoding
from curate.spec import Geometry

if TYPE_CHECKING:
    from torchvision.io import ImageReadMode

JPEG_MAGIC = b"\xff\xd8\xff"  # start-of-image marker and the first segment's marker


def for_the_device(data: bytes) -> bool:
    """Whether ``data`` is a JPEG to hand to the device decoder: its header parses and claims no more pixels
    than Pillow's decompression-bomb limit. The device decoder has no such limit, and a crafted header could
    make it allocate gigabytes; whatever fails here goes to the CPU decoder, which reports it."""
    if data[:3] != JPEG_MAGIC:
        return False
    try:
        with warnings.catch_warnings():  # a size over the limit is this function's answer, not a warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))  # reads the header only
        with image:
            return image.format == "JPEG" and image.width * image.height <= (Image.MAX_IMAGE_PIXELS or math.inf)
    except Exception:  # noqa: BLE001 - untrusted bytes: any failure means the CPU decoder's verdict
        return False


@dataclass
class EncodedJpeg:
    """One batch row still encoded: its bytes, how its pool makes images square, its name for errors."""

    row: int
    data: torch.Tensor  # uint8, the file's bytes
    decoding: Decoding
    name: str


def decode_jpegs(jpegs: list[EncodedJpeg], geometry: Geometry,
                 device: torch.device) -> tuple[torch.Tensor, list[tuple[int, str]]]:
    """The decoded images (N x C x H x W uint8 on ``device``, in the teacher's geometry) of the JPEGs that some
    decoder could read, in order, and (index in ``jpegs``, reason) for those none could."""
    from torchvision.io import ImageReadMode, decode_jpeg  # here: importing torchvision costs every command seconds

    mode = ImageReadMode.GRAY if geometry.shape[0] == 1 else ImageReadMode.RGB
    if device.type == "cuda":
        # torchvision's CUDA decoder takes its output memory on this stream but writes it from a stream of its
        # own without waiting for this one (pytorch/vision#9606): let this stream's queued work finish first, or
        # it may write into blocks that queued kernels still read
        torch.cuda.current_stream(device).synchronize()
    try:
        decoded: list[torch.Tensor | None] = list(decode_jpeg([j.data for j in jpegs], mode=mode, device=device))
    except RuntimeError:  # one bad file fails the whole batch: find it
        decoded = [_decode_one(j.data, mode, device) for j in jpegs]
    failures: list[tuple[int, str]] = []
    groups: dict[tuple[int, ...], list[int]] = {}
    ready: list[torch.Tensor | None] = [None] * len(jpegs)
    for number, (jpeg, image) in enumerate(zip(jpegs, decoded)):
        if image is None:  # the CPU decoder, which reads more of what is out there, and says why it cannot
            try:
                image = to_chw_uint8(jpeg.decoding(bytes(jpeg.data.numpy()), jpeg.name)).to(device)
            except SampleError as err:
                failures.append((number, str(err)))
                continue
        if jpeg.decoding.square == "crop":
            image = _center_square(image)
        ready[number] = image
        groups.setdefault(tuple(image.shape), []).append(number)
    kept = [n for n, image in enumerate(ready) if image is not None]
    out = torch.empty((len(kept), *geometry.shape), dtype=torch.uint8, device=device)
    slot = {n: k for k, n in enumerate(kept)}
    for numbers in groups.values():  # one resize per shape: crawls repeat a few sizes
        converted = geometry(torch.stack([ready[n] for n in numbers]))
        out[to_device(torch.tensor([slot[n] for n in numbers]), device)] = converted
    return out, failures


def _decode_one(data: torch.Tensor, mode: ImageReadMode, device: torch.device) -> torch.Tensor | None:
    from torchvision.io import decode_jpeg

    try:
        return decode_jpeg(data, mode=mode, device=device)
    except RuntimeError:
        return None


def _center_square(image: torch.Tensor) -> torch.Tensor:
    """The centre square of a C x H x W image, the crop ``Decoding`` makes."""
    height, width = image.shape[-2:]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return image[:, top:top + side, left:left + side]
