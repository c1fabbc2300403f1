"""Hostile and awkward pictures for the tests of engine.images and the bot's attachments, built
small and fast from Pillow's own output."""

from __future__ import annotations

import io
import random
import struct

from PIL import Image

# A GIF whose trailer (`;`) is replaced by the start of a second frame's image descriptor (0x2C),
# cut short: Pillow raises struct.error (cut inside the descriptor) or IndexError (cut before the
# frame's LZW code size) while it counts the frames.
GIF_CUTS = {"struct.error": b"\x2c\x00\x00", "IndexError": b"\x2c" + b"\x00" * 9}


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def progressive_jpeg(side: int = 256, extra_scans: int = 0, **options) -> bytes:
    """A gray progressive JPEG (libjpeg's script: a handful of scans) with its last scan (an AC
    refinement scan, which libjpeg applies again to every block each time) repeated `extra_scans`
    times more: the scan bomb of the audit, which decodes ever slower and stays tiny. `options`:
    Pillow's JPEG options (restart_marker_blocks=1: a restart marker after every block)."""
    data = encode(Image.new("L", (side, side), 128), "JPEG", progressive=True, quality=90, **options)
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


def motion_photo(trailer_bytes: int = 7_000_000) -> bytes:
    """A Samsung/Pixel "motion photo": an ordinary (baseline, one scan) 1200x900 JPEG with a video
    after its end (EOI). The video is random bytes, as compressed video looks: FF DA about once per
    64 KiB, each of which a count over the whole file took for a scan."""
    photo = encode(Image.new("RGB", (1200, 900), (120, 80, 40)), "JPEG", quality=90)
    return photo + random.Random(0).randbytes(trailer_bytes)


def with_exif_thumbnail(jpeg: bytes, thumbnail: bytes, orientation: int = 1) -> bytes:
    """`jpeg` with an EXIF APP1 segment after its SOI, as cameras and phones write one: IFD0 holds
    the Orientation, IFD1 the `thumbnail`, a whole JPEG of its own (its scans, its EOI) inside the
    segment (JPEGInterchangeFormat / JPEGInterchangeFormatLength)."""
    ifd0 = 8                       # after the TIFF header
    ifd1 = ifd0 + 2 + 12 + 4       # after IFD0: its count, one entry, the next IFD's offset
    thumb = ifd1 + 2 + 2 * 12 + 4  # after IFD1: its count, two entries, no next IFD
    tiff = (b"MM\x00\x2a" + struct.pack(">I", ifd0)
            + struct.pack(">H", 1) + struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack(">I", ifd1)
            + struct.pack(">H", 2) + struct.pack(">HHII", 0x0201, 4, 1, thumb)
            + struct.pack(">HHII", 0x0202, 4, 1, len(thumbnail)) + struct.pack(">I", 0)
            + thumbnail)
    payload = b"Exif\x00\x00" + tiff
    assert jpeg[:2] == b"\xff\xd8" and len(payload) + 2 <= 0xFFFF
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]
