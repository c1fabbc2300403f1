"""Hostile and awkward pictures for the tests of engine.images and the bot's attachments, built
small and fast from Pillow's own output."""

from __future__ import annotations

import io

from PIL import Image

# A GIF whose trailer (`;`) is replaced by the start of a second frame's image descriptor (0x2C),
# cut short: Pillow raises struct.error (cut inside the descriptor) or IndexError (cut before the
# frame's LZW code size) while it counts the frames.
GIF_CUTS = {"struct.error": b"\x2c\x00\x00", "IndexError": b"\x2c" + b"\x00" * 9}


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def progressive_jpeg(side: int = 256, extra_scans: int = 0) -> bytes:
    """A gray progressive JPEG (libjpeg's script: a handful of scans) with its last scan (an AC
    refinement scan, which libjpeg applies again to every block each time) repeated `extra_scans`
    times more: the scan bomb of the audit, which decodes ever slower and stays tiny."""
    data = encode(Image.new("L", (side, side), 128), "JPEG", progressive=True, quality=90)
    last_scan, end = data.rindex(b"\xff\xda"), data.rindex(b"\xff\xd9")
    return data[:end] + data[last_scan:end] * extra_scans + data[end:]


def damaged_gif(cut: str) -> bytes:
    """A valid 8x8 GIF with its trailer replaced by GIF_CUTS[cut]."""
    gif = encode(Image.new("P", (8, 8)), "GIF")
    assert gif.endswith(b";")
    return gif[:-1] + GIF_CUTS[cut]


def sideways_jpeg(orientation: int = 6) -> bytes:
    """A 200x100 JPEG, red left half and blue right half, tagged with EXIF `orientation` (6: shown
    turned a quarter clockwise, 100x200 with the red half on top)."""
    image = Image.new("RGB", (200, 100), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 100, 100))
    exif = Image.Exif()
    exif[0x0112] = orientation   # ExifTags.Base.Orientation
    return encode(image, "JPEG", exif=exif, quality=95)
