"""A contact sheet: the finals of a permutation set in one grid image, each captioned.

Pure Pillow (the bot never imports torch). The layout is a function of the tile count and the
tile size only, so a test can find every tile in the sheet (`layout`).

    cols = ceil(sqrt(n)), rows = ceil(n / cols)
    each cell: the image (tile x tile) over a caption band (CAPTION px), GAP px between cells

Each caption starts with its tile's number (`1. red · Escher`), so that a caption the font cannot
draw (a script or emoji it lacks: boxes) still matches its line in the message's text.
"""

from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

from bot.config import MAX_GRID

log = logging.getLogger(__name__)

GAP = 6
CAPTION = 18
MIN_TILE = 128
MAX_TILE = 256
BACKGROUND = (24, 24, 27)
TEXT = (235, 235, 235)
RESAMPLE = Image.Resampling.BICUBIC
FILENAME = "contact-sheet.png"
MAX_FINAL_SIDE = 8 * MAX_GRID   # the largest final a worker writes (1024 a side)
# Latin, Greek and Cyrillic (Debian's fonts-dejavu-core); Pillow's own font draws Latin only.
CAPTION_FONT = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
FONT_SIZE = 11


@dataclass(frozen=True)
class Layout:
    size: tuple[int, int]                       # (width, height) of the sheet
    cols: int
    rows: int
    tile: int
    boxes: list[tuple[int, int, int, int]]      # the image box of each tile (left, top, right, bottom)
    captions: list[tuple[int, int, int, int]]   # the caption band under each tile


def grid_shape(n: int) -> tuple[int, int]:
    if n < 1:
        raise ValueError("a contact sheet needs at least one image")
    cols = math.ceil(math.sqrt(n))
    return cols, math.ceil(n / cols)


def tile_size(sizes: list[tuple[int, int]]) -> int:
    """The side of every tile: the largest final's side, kept between MIN_TILE and MAX_TILE."""
    biggest = max((max(w, h) for w, h in sizes), default=MIN_TILE)
    return max(MIN_TILE, min(MAX_TILE, biggest))


def layout(n: int, tile: int) -> Layout:
    cols, rows = grid_shape(n)
    width = cols * tile + (cols + 1) * GAP
    height = rows * (tile + CAPTION) + (rows + 1) * GAP
    boxes, captions = [], []
    for i in range(n):
        col, row = i % cols, i // cols
        x = GAP + col * (tile + GAP)
        y = GAP + row * (tile + CAPTION + GAP)
        boxes.append((x, y, x + tile, y + tile))
        captions.append((x, y + tile, x + tile, y + tile + CAPTION))
    return Layout((width, height), cols, rows, tile, boxes, captions)


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """CAPTION_FONT where the system has it, else Pillow's default (Latin only: other scripts are boxes)."""
    if CAPTION_FONT.is_file():
        try:
            return ImageFont.truetype(str(CAPTION_FONT), FONT_SIZE)
        except OSError as exc:   # unreadable or damaged: the captions still come, in Latin
            log.warning("contact sheets: cannot load %s (%s); captions use Pillow's default font", CAPTION_FONT, exc)
    try:
        return ImageFont.load_default(size=FONT_SIZE)
    except TypeError:  # Pillow < 10.1: the bitmap font, no size
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """`text` cut (with "...") to fit `width` pixels: the longest prefix that fits with "..." after
    it (none: just "..."). A binary search over the prefix length (a prefix's width grows with its
    length), so a long caption costs about log2(len) measurements, not one per character."""
    text = " ".join(text.split())
    if draw.textlength(text, font=font) <= width:
        return text
    lo, hi = 0, len(text)   # the answer is in [lo, hi]; prefixes longer than hi do not fit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if draw.textlength(text[:mid] + "...", font=font) <= width:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo].rstrip() + "..."


def _drawable(text: str, font) -> str:
    """The bitmap fallback font only knows Latin-1."""
    if isinstance(font, ImageFont.FreeTypeFont):
        return text
    return text.encode("latin-1", "replace").decode("latin-1")


def _final(data: bytes) -> Image.Image | None:
    """A job's final.png as RGB, or None when it is not what a worker writes: only Pillow's PNG
    decoder is tried, and the size is checked from the header before any pixel is decoded (at
    most MAX_FINAL_SIDE a side: 8 x the largest grid). The store is shared with every worker (and,
    with Redis, whoever has its password), so a final is not trusted to be small."""
    try:
        with Image.open(io.BytesIO(data), formats=("PNG",)) as img:
            width, height = img.size
            if not (0 < width <= MAX_FINAL_SIDE and 0 < height <= MAX_FINAL_SIDE):
                log.warning("a contact sheet tile is a %dx%d PNG (at most %d a side): left empty",
                            width, height, MAX_FINAL_SIDE)
                return None
            return img.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        log.warning("a contact sheet tile is not a readable PNG (%s): left empty", exc)
        return None


def render_sheet(tiles: list[tuple[bytes, str]], fmt: str = "PNG",
                 numbers: Sequence[int] | None = None) -> tuple[bytes, str]:
    """The sheet's bytes and file name: one (final PNG bytes, caption) per tile, in order.

    Each caption starts with its number: `numbers[i]` for tile i (the line of its job in the
    message's text, when some jobs of the set have no tile), by default 1, 2, ... in order.
    PNG by default (lossless: a test can compare tiles with the finals); "JPEG" when a PNG is
    over the upload limit. A tile that is not a PNG of at most MAX_FINAL_SIDE a side is left empty
    and its caption says "(unreadable image)"."""
    if numbers is None:
        numbers = range(1, len(tiles) + 1)
    if len(numbers) != len(tiles):
        raise ValueError(f"{len(numbers)} numbers for {len(tiles)} tiles")
    images = [_final(data) for data, _ in tiles]
    spec = layout(len(images), tile_size([img.size for img in images if img is not None]))
    sheet = Image.new("RGB", spec.size, BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = _font()
    for img, (_, caption), number, box, band in zip(images, tiles, numbers, spec.boxes, spec.captions):
        caption = f"{number}. {caption}"
        if img is None:   # not a final a worker wrote: its place stays empty, the caption says so
            caption = f"{caption} (unreadable image)"
        else:
            if img.size != (spec.tile, spec.tile):
                img = img.resize((spec.tile, spec.tile), RESAMPLE)
            sheet.paste(img, box[:2])
        text = _fit(draw, _drawable(caption, font), font, spec.tile - 4)
        draw.text((band[0] + 2, band[1] + 3), text, fill=TEXT, font=font)
    out = io.BytesIO()
    if fmt.upper() == "JPEG":
        sheet.save(out, format="JPEG", quality=85)
        return out.getvalue(), FILENAME.replace(".png", ".jpg")
    sheet.save(out, format="PNG")
    return out.getvalue(), FILENAME
