"""Pools of image files: a folder tree of JPEG/PNG/WebP, and random patches cut from large photos."""

from __future__ import annotations

import abc
import io
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL
from PIL import Image

from curate.cache import array_cache_bytes, cached_array, file_version
from curate.errors import UserError
from curate.pools.base import Pool, SampleError, require_dir
from curate.pools.registry import register

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def list_images(folder: Path) -> list[Path]:
    """Every JPEG/PNG/WebP under ``folder``, recursively, in a stable (sorted) order."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def open_image(image: Path | bytes, max_side: int, background: tuple[int, int, int] = (0, 0, 0),
               name: str | None = None, shorter_side: bool = False) -> Image.Image:
    """Decode an image file (or its bytes, called ``name`` in errors) no larger than ``max_side`` (its longer
    side; with ``shorter_side``, its shorter side, which is what survives a centre crop): grey files to
    one channel (L), everything else to RGB, transparency flattened onto ``background``. Grey stays grey
    because the round trip through RGB is not exact: torchvision's RGB -> grey weights sum to 0.9999 and
    truncate, which darkened about half the grey levels by one for a one-channel teacher."""
    name = name or (image.name if isinstance(image, Path) else "image bytes")
    try:
        with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as im:
            # JPEG decodes at 1/2, 1/4, 1/8 scale when that suffices
            im.draft("L" if im.mode == "L" else "RGB", (max_side, max_side))
            if not shorter_side:
                im.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
            elif min(im.size) > max_side:
                scale = max_side / min(im.size)
                size = (max(max_side, round(im.width * scale)), max(max_side, round(im.height * scale)))
                im = im.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
            if im.mode in ("L", "1"):
                return im.convert("L")
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                flat = Image.new("RGB", rgba.size, background)
                flat.paste(rgba, mask=rgba.getchannel("A"))
                return flat
            return im.convert("RGB")
    except Image.UnidentifiedImageError:  # its message names the file object, an address for bytes
        raise SampleError(f"cannot decode {name}: not a format Pillow can identify") from None
    except Exception as err:  # untrusted bytes: any decoder failure (a decompression bomb too) is this file's alone
        raise SampleError(f"cannot decode {name}: {type(err).__name__}: {err}") from None


def center_square(image: Image.Image) -> Image.Image:
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side))


_BACKGROUNDS = {"black": (0, 0, 0), "white": (255, 255, 255)}


def parse_background(value: str) -> tuple[int, int, int]:
    if value not in _BACKGROUNDS:
        raise UserError(f"background must be black or white, got {value!r}")
    return _BACKGROUNDS[value]


# The options of every pool of encoded images (files, tar members, Parquet cells), and their help.
DECODING_OPTIONS = {
    "square": "crop | stretch: how non-square images become square (default crop, the centre)",
    "background": "black | white: what transparent pixels become (default black)",
    "max_side": "decode large files down to about this many pixels on their shorter side (default 256; ImageNet-"
                "size teachers resize to 232-256 before their centre crop)",
}


@dataclass(frozen=True)
class Decoding:
    """How encoded images become pixels: decoded at most ``max_side`` large, transparency on ``background``,
    made square by a centre crop (or left to the resize to stretch)."""

    square: str = "crop"
    background: str = "black"
    max_side: int = 256

    def __post_init__(self) -> None:
        if self.square not in ("crop", "stretch"):
            raise UserError(f"square must be crop or stretch, got {self.square!r}")
        parse_background(self.background)

    def __call__(self, image: Path | bytes, name: str | None = None) -> np.ndarray:
        decoded = open_image(image, self.max_side, parse_background(self.background), name, shorter_side=True)
        return np.asarray(center_square(decoded) if self.square == "crop" else decoded)


class EncodedImagePool(Pool):
    """A pool whose samples are encoded image files (file, tar member or table cell): ``read_encoded`` gives a
    sample's bytes, ``read`` decodes them on the CPU. Scoring on a GPU may take the bytes instead and decode
    JPEGs there (curate/pools/jpeg_on_device.py)."""

    cheap_to_read = False
    decode: Decoding

    @abc.abstractmethod
    def read_encoded(self, index: int) -> tuple[bytes, int | None]:
        """The encoded bytes and label of sample ``index``; :class:`SampleError` when it has none."""

    def read(self, index: int) -> tuple[np.ndarray, int | None]:
        data, label = self.read_encoded(index)
        return self.decode(data, self.key(index)), label


@register
class FolderPool(EncodedImagePool):
    kind = "folder"
    summary = "any tree of JPEG/PNG/WebP files, read recursively one file at a time"
    options = {
        "labels": "true: the first subfolder names the class (default false)",
        **DECODING_OPTIONS,
        "name": "source name (default: the folder's name)",
    }
    root_help = "the folder itself"

    def __init__(self, root: Path | None = None, labels: bool = False, square: str = "crop",
                 background: str = "black", max_side: int = 256, name: str | None = None) -> None:
        if root is None:
            raise UserError("the folder pool needs --root pointing at the image folder")
        self.root = require_dir(Path(root), "image folder", "pass --root with an existing folder")
        self.decode = Decoding(square, background, int(max_side))
        self.source = name or self.root.resolve().name
        self.files = [p.relative_to(self.root).as_posix() for p in list_images(self.root)]
        if not self.files:
            raise UserError(f"no JPEG/PNG/WebP files under {self.root}: point --root at a folder of images")
        self.class_names = sorted({f.split("/")[0] for f in self.files if "/" in f}) if labels else None
        self._class_index = {c: i for i, c in enumerate(self.class_names or [])}

    def __len__(self) -> int:
        return len(self.files)

    def key(self, index: int) -> str:
        return self.files[index]

    def read_encoded(self, index: int) -> tuple[bytes, int | None]:
        relative = self.files[index]
        label = self._class_index.get(relative.split("/")[0]) if "/" in relative else None
        try:
            return (self.root / relative).read_bytes(), label
        except OSError as err:
            raise SampleError(f"cannot read {relative}: {err.strerror or err}") from None

    def describe(self) -> dict:
        return {**super().describe(), "root": str(self.root)}


@register
class PatchesPool(Pool):
    cheap_to_read = False
    kind = "patches"
    summary = "random square crops of varied size from a folder of large photos (seeded, as many as asked)"
    options = {
        "count": "how many patches (default 10000)",
        "seed": "random seed (default 0)",
        "size": "side of each patch in pixels (default 64)",
        "min_scale": "smallest crop side as a fraction of the photo's shorter side (default 0.05)",
        "max_scale": "largest crop side, same units (default 0.5)",
        "name": "source name (default patches)",
    }
    root_help = "folder of photos, e.g. /usr/share/backgrounds or /usr/share/wallpapers"
    # Patches of one photo are neighbours (photo = index * photos // count), so a reader in pool order decodes
    # each photo about once: decoding a large PNG or WebP costs 0.1-0.3 s, cropping a patch well under 1 ms.
    decode_side = 1024
    _transient = ("_photos",)

    def __init__(self, root: Path | None = None, count: int = 10000, seed: int = 0, size: int = 64,
                 min_scale: float = 0.05, max_scale: float = 0.5, name: str = "patches") -> None:
        if root is None:
            raise UserError("the patches pool needs --root pointing at a folder of photos")
        self.root = require_dir(Path(root), "photo folder", "pass --root with a folder of large photos")
        self.photos = [p.relative_to(self.root).as_posix() for p in list_images(self.root)]
        if not self.photos:
            raise UserError(f"no JPEG/PNG/WebP photos under {self.root}: point --root at a folder of photos")
        if not 0 < min_scale <= max_scale <= 1:
            raise UserError("patch scales must satisfy 0 < min_scale <= max_scale <= 1")
        self.count, self.seed, self.size = int(count), int(seed), int(size)
        self.min_scale, self.max_scale = float(min_scale), float(max_scale)
        self.source = name
        array_cache_bytes()  # a bad $CURATE_CACHE_GIB fails now, not in a reader process

    def __len__(self) -> int:
        return self.count

    def _photo(self, number: int) -> Image.Image:
        cache: OrderedDict[int, Image.Image] = self.__dict__.setdefault("_photos", OrderedDict())
        if number not in cache:
            if len(cache) >= 4:
                cache.popitem(last=False)
            cache[number] = Image.fromarray(self._decoded(self.root / self.photos[number]))
        return cache[number]

    def _decoded(self, path: Path) -> np.ndarray:
        """The photo at ``path`` decoded to ``decode_side``, from the user's cache when decoded before: every
        export of a selection decodes again nearly every photo its patches come from (0.1-1.6 s each for the
        large PNG/WebP wallpapers; 24 s for the 231 of a Debian desktop), an array from the cache ~1 ms."""
        try:
            version = file_version(path)
        except OSError as err:
            raise SampleError(f"cannot read {path.name} ({err.strerror or err}): is the photo folder whole?") from None
        key = f"{version}:{self.decode_side}:Pillow {PIL.__version__}"
        return cached_array("photos", key, lambda: np.asarray(open_image(path, self.decode_side)))

    def _photo_number(self, index: int) -> int:
        return index * len(self.photos) // self.count

    def _plan(self, index: int) -> tuple[int, tuple[int, int, int, int]]:
        """Photo number and crop box of patch ``index``, a pure function of (seed, index)."""
        number = self._photo_number(index)
        width, height = self._photo(number).size
        rng = np.random.default_rng([self.seed, index])
        side = max(4, int(min(width, height) * rng.uniform(self.min_scale, self.max_scale)))
        left = int(rng.integers(0, width - side + 1))
        top = int(rng.integers(0, height - side + 1))
        return number, (left, top, left + side, top + side)

    def key(self, index: int) -> str:
        return f"{index}:{self.photos[self._photo_number(index)]}"

    def read(self, index: int) -> tuple[np.ndarray, None]:
        number, box = self._plan(index)
        patch = self._photo(number).crop(box).resize((self.size, self.size), Image.Resampling.BILINEAR)
        return np.asarray(patch), None

    def describe(self) -> dict:
        return {**super().describe(), "root": str(self.root), "seed": self.seed, "photos": len(self.photos)}
