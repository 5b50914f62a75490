"""Characters rendered from TTF/OTF fonts with Pillow: kana and kanji, Latin letters, digits, emoji.

Only code points the font maps to a glyph (its cmap) and that are printable
are listed, so no sample is an empty box or a "missing glyph" square. Colour
bitmap fonts (Noto Color Emoji) render at their fixed strike size with their
embedded colours, then are resized like every other glyph.
"""

from __future__ import annotations

import unicodedata
from functools import cached_property
from pathlib import Path

import matplotlib
import numpy as np
from fontTools.ttLib import TTCollection, TTFont
from PIL import Image, ImageDraw, ImageFont

from curate.errors import UserError
from curate.pools.base import Pool, SampleError
from curate.pools.images import parse_background
from curate.pools.registry import register

NAMED_RANGES: dict[str, list[tuple[int, int]]] = {
    "digits": [(0x30, 0x39)],
    "latin": [(0x41, 0x5A), (0x61, 0x7A)],
    "latin-ext": [(0xC0, 0x24F)],
    "greek": [(0x391, 0x3C9)],
    "cyrillic": [(0x410, 0x44F)],
    "kana": [(0x3041, 0x3096), (0x30A1, 0x30FA)],
    "kanji": [(0x4E00, 0x9FFF)],
    "hangul": [(0xAC00, 0xD7A3)],
    "symbols": [(0x2190, 0x2BFF)],
    "emoji": [(0x2300, 0x23FF), (0x2600, 0x27BF), (0x1F300, 0x1FAFF)],
}

_PRINTABLE_CATEGORIES = ("L", "N", "S", "P")
FONT_FOLDERS = (Path("/usr/share/fonts"), Path(matplotlib.get_data_path()) / "fonts" / "ttf")


def find_font(name: str) -> Path:
    """A font by path, or by file name searched in the system font folders and matplotlib's fonts."""
    path = Path(name)
    if path.is_file():
        return path
    for folder in FONT_FOLDERS:
        if folder.is_dir():
            match = next(iter(sorted(folder.rglob(path.name))), None)
            if match is not None:
                return match
    raise UserError(
        f"font {name!r} not found (looked in {', '.join(map(str, FONT_FOLDERS))}): give a path, "
        "or install it (e.g. apt-get install fonts-ipafont-gothic fonts-noto-color-emoji)"
    )


def parse_ranges(ranges: list[str] | str) -> list[tuple[int, int]]:
    """Named ranges ("kana", "emoji", ...) and explicit ones ("0x3040-0x309F", "0x41") -> inclusive intervals."""
    items = [ranges] if isinstance(ranges, str) else list(ranges)
    parsed: list[tuple[int, int]] = []
    for item in items:
        for part in str(item).split(","):
            part = part.strip()
            if part in NAMED_RANGES:
                parsed.extend(NAMED_RANGES[part])
                continue
            try:
                low, _, high = part.partition("-")
                parsed.append((int(low, 0), int(high or low, 0)))
            except ValueError:
                raise UserError(
                    f"bad code-point range {part!r}: use a name ({', '.join(NAMED_RANGES)}) or e.g. 0x3040-0x309F"
                ) from None
    return parsed


def _open_font_file(path: Path) -> TTFont:
    try:
        if path.suffix.lower() == ".ttc":
            return TTCollection(str(path), lazy=True).fonts[0]
        return TTFont(str(path), lazy=True)
    except Exception as err:
        raise UserError(f"{path} is not a readable TTF/OTF font ({err}): check the fonts option") from None


def font_code_points(path: Path, intervals: list[tuple[int, int]]) -> tuple[list[int], int | None]:
    """Printable code points in ``intervals`` that the font maps to a glyph, and its bitmap strike size if any."""
    font = _open_font_file(path)
    cmap = font.getBestCmap() or {}
    wanted = sorted(
        cp for cp in cmap
        if any(lo <= cp <= hi for lo, hi in intervals)
        and unicodedata.category(chr(cp))[0] in _PRINTABLE_CATEGORIES
    )
    strike = None
    if "CBLC" in font:  # colour bitmap font: Pillow renders it only at its strike size
        strike = int(font["CBLC"].strikes[0].bitmapSizeTable.ppemY)
    return wanted, strike


@register
class GlyphsPool(Pool):
    cheap_to_read = False
    kind = "glyphs"
    summary = "characters rendered from TTF/OTF fonts (kana, kanji, Latin, digits, emoji, any code-point range)"
    options = {
        "fonts": "font files or names, e.g. ['ipag.ttf', 'DejaVuSans.ttf', 'NotoColorEmoji.ttf'] (default "
                 "DejaVuSans.ttf)",
        "ranges": f"code-point ranges: names ({', '.join(NAMED_RANGES)}) or '0x3040-0x309F' (default latin,digits)",
        "size": "side of the rendered image in pixels (default 32)",
        "background": "black | white (default black)",
        "invert": "true: negate the image after rendering (white-on-black from black-on-white) (default false)",
        "margin": "blank border around the glyph as a fraction of the side (default 0.1)",
        "name": "source name (default glyphs)",
    }
    root_help = "not used: fonts come from the fonts option"
    render_px = 96
    _transient = ("_fonts",)

    def __init__(self, root: Path | None = None, fonts: list[str] | str = "DejaVuSans.ttf",
                 ranges: list[str] | str = "latin,digits", size: int = 32, background: str = "black",
                 invert: bool = False, margin: float = 0.1, name: str = "glyphs") -> None:
        self.font_paths = [find_font(f) for f in ([fonts] if isinstance(fonts, str) else fonts)]
        self.intervals = parse_ranges(ranges)
        self.size, self.invert, self.margin = int(size), bool(invert), float(margin)
        self.background = parse_background(background)
        self.source = name
        self.entries: list[tuple[int, int]] = []  # (font number, code point)
        self.strikes: list[int | None] = []
        for number, path in enumerate(self.font_paths):
            code_points, strike = font_code_points(path, self.intervals)
            self.entries.extend((number, cp) for cp in code_points)
            self.strikes.append(strike)
        if not self.entries:
            raise UserError(
                f"none of the fonts {[p.name for p in self.font_paths]} has a glyph in ranges {ranges!r}: "
                "pick ranges these fonts cover"
            )

    @cached_property
    def _fonts(self) -> list[ImageFont.FreeTypeFont]:
        return [ImageFont.truetype(str(p), size=s or self.render_px) for p, s in zip(self.font_paths, self.strikes)]

    def __len__(self) -> int:
        return len(self.entries)

    def key(self, index: int) -> str:
        number, cp = self.entries[index]
        return f"{self.font_paths[number].stem}/U+{cp:04X}"

    def read(self, index: int) -> tuple[np.ndarray, None]:
        number, cp = self.entries[index]
        font = self._fonts[number]
        canvas_side = 2 * (self.strikes[number] or self.render_px)
        canvas = Image.new("RGBA", (canvas_side, canvas_side), (0, 0, 0, 0))
        ink = (0, 0, 0, 255) if self.background == (255, 255, 255) else (255, 255, 255, 255)
        ImageDraw.Draw(canvas).text((canvas_side // 4, canvas_side // 4), chr(cp), font=font, fill=ink,
                                    embedded_color=self.strikes[number] is not None)
        box = canvas.getchannel("A").getbbox()
        if box is None:
            raise SampleError(f"U+{cp:04X} renders blank in {self.font_paths[number].name}")
        glyph = canvas.crop(box)
        side = int(max(glyph.size) / (1 - 2 * self.margin))
        square = Image.new("RGB", (side, side), self.background)
        square.paste(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2), mask=glyph.getchannel("A"))
        pixels = np.asarray(square.resize((self.size, self.size), Image.Resampling.LANCZOS))
        return (255 - pixels if self.invert else pixels), None

    def describe(self) -> dict:
        return {**super().describe(), "fonts": [str(p) for p in self.font_paths], "ranges": self.intervals}
