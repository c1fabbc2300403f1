"""Untrusted pictures (Discord attachments, CLI files) -> a safe 8-bit RGB image, or a clear refusal.

Torch-free: the bot validates attachments with this before anything is queued.
"""

from __future__ import annotations

import io
import math
import re
import struct
import warnings

from PIL import ExifTags, Image, ImageSequence, UnidentifiedImageError

MAX_IMAGE_BYTES = 8 * 1024 * 1024
MAX_IMAGE_PIXELS = 4096 * 4096       # Pillow's decompression-bomb guard, tighter than its default
# The only decoders untrusted bytes reach: Pillow would otherwise try every format it knows (EPS runs
# Ghostscript on the file; rarely used decoders are where Pillow's memory bugs were found).
FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
# No caller needs more: the bot stores attachments at most 1024 a side, a worker's init image is
# 8 x grid (at most 1024), CLIP's input 224.
MAX_SIDE_NEEDED = 1024
REDUCING_GAP = 2.0   # Image.thumbnail's default: reduce while the picture stays twice the target
# A progressive JPEG may hold any number of scans, and libjpeg passes over every block of the picture
# for each one: 5,000 copies of one 33-byte scan (231 KB) take 30 s of CPU at 4096x4096, 8 MiB of
# them ~25 min. Ordinary progressive JPEGs have about 10 (libjpeg's script); 100 scans of a
# 4096x4096 picture decode in under a second (0.7 s measured). Counted by walking the markers as
# libjpeg reads them (_count_scans), not as FF DA anywhere in the file: a phone's "motion photo" is
# a JPEG with an MP4 after its end (EOI), whose compressed bytes hold FF DA about once per 64 KiB,
# and an EXIF thumbnail is a whole JPEG of its own (scans, EOI) inside an APP1 segment.
MAX_JPEG_SCANS = 100
# A marker with a length, or EOI: FF and a byte that is none of these. 00: a 0xFF byte of
# entropy-coded data (stuffed); FF: fill (the marker is the last FF of the run); D0-D7 (restart)
# and 01 (TEM): markers without a length, read as part of a scan or skipped between segments;
# D8: a second SOI, an error to libjpeg, walked over here (a count may only err upward).
_MARKER = re.compile(rb"\xff[^\x00\x01\xd0-\xd8\xff]")
_EOI, _SOS = 0xD9, 0xDA
# What Pillow raises on damaged files besides OSError / SyntaxError / ValueError: a GIF cut inside a
# frame's descriptor gives struct.error or IndexError, other truncations EOFError; a mangled header
# can give TypeError or KeyError. For an untrusted picture each means the same: it cannot be read.
DAMAGED = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, TypeError, KeyError)
# EXIF Orientation (2-8) -> the transposition that shows the picture upright, as viewers show it
# (ImageOps.exif_transpose's table; 1 or none: upright already).
UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class ImageRejected(ValueError):
    """The message says what was wrong and what to do."""


def load_image(data: bytes, max_bytes: int = MAX_IMAGE_BYTES, max_pixels: int = MAX_IMAGE_PIXELS,
               max_side: int | None = MAX_SIDE_NEEDED) -> tuple[Image.Image, list[str]]:
    """Decode `data` into an RGB image. Returns (image, notes): notes say what was converted.

    Refused: over `max_bytes`, not a PNG, JPEG, WebP or GIF (FORMATS: no other decoder is tried),
    more than `max_pixels` pixels (a pixel bomb: checked from the header before decoding), a JPEG
    of more than MAX_JPEG_SCANS scans (a CPU bomb: counted before decoding), damaged (whatever
    Pillow raises on it: DAMAGED). Converted, with a note: animations (first frame),
    16-bit and other modes (to 8-bit RGB), transparency (onto white). Turned upright, silently, as
    its EXIF orientation says (the pixel limit holds either way: a turn swaps the sides).

    `max_side`: the largest side any caller scales the picture to (None: keep every pixel). A
    picture whose short side is at least twice that comes back reduced by a whole factor, as
    `Image.thumbnail((max_side, max_side))` reduces before it resamples (both sides stay at least
    twice what the thumbnail or a square crop needs; a JPEG is decoded at that scale,
    `Image.draft`), so a caller's thumbnail or resize to at most `max_side` gives the same picture
    (a JPEG's: to a few levels), for a fraction of the memory. 16-bit pictures are converted with
    integer arithmetic, transparency is flattened onto white without RGBA copies.
    """
    if len(data) > max_bytes:
        raise ImageRejected(
            f"the image is {len(data) / 2**20:.1f} MiB; the limit is {max_bytes / 2**20:.0f} MiB: send a smaller file"
        )
    notes: list[str] = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image: Image.Image = Image.open(io.BytesIO(data), formats=FORMATS)
            width, height = image.size
            if width * height > max_pixels:
                raise ImageRejected(
                    f"the image is {width}x{height} pixels; at most {max_pixels:,} pixels are accepted: scale it down"
                )
            if image.format in ("JPEG", "MPO"):   # MPO: a JPEG followed by more (a phone's depth map...)
                _check_scans(data)
            if getattr(image, "is_animated", False) and getattr(image, "n_frames", 1) > 1:
                notes.append(f"the image is animated ({image.n_frames} frames): its first frame was used")
                image = next(iter(ImageSequence.Iterator(image)))
            if max_side is not None and image.format == "JPEG":
                # Decoded at 1/2, 1/4 or 1/8 scale when that is still twice max_side (thumbnail's draft).
                gap = int(max_side * REDUCING_GAP)
                image.draft(None, (gap, gap))
            image.load()
            orientation = _orientation(image)
    except ImageRejected:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        if isinstance(exc, UnidentifiedImageError):
            raise ImageRejected("the file is not an image I can read: use a PNG, JPEG, WebP or GIF") from exc
        raise ImageRejected(f"the image is too large to decode safely ({exc}): scale it down") from exc
    except DAMAGED as exc:
        raise ImageRejected(f"the image is damaged or truncated ({str(exc) or type(exc).__name__})") from exc
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F") or image.mode.startswith("I;16"):
        notes.append(f"the image has {image.mode} pixels (more than 8 bits): converted to 8-bit RGB")
        image = _to_8bit(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Onto white: the picture pasted through its own alpha onto a white RGB picture (one new
        # picture; no RGBA copies of the whole picture).
        rgba = image if image.mode == "RGBA" else image.convert("RGBA")
        image = Image.new("RGB", rgba.size, (255, 255, 255))
        image.paste(rgba, mask=rgba)
        del rgba
    elif image.mode not in ("L", "RGB"):
        image = image.convert("RGB")   # P, 1, CMYK, YCbCr...: what the thumbnail would have resampled
    if orientation in UPRIGHT:   # before _reduce, whose promise is about the picture as shown
        image = image.transpose(UPRIGHT[orientation])
    if max_side is not None:
        image = _reduce(image, max_side)
    return image if image.mode == "RGB" else image.convert("RGB"), notes


def _check_scans(data: bytes) -> None:
    """Refuse a JPEG of more than MAX_JPEG_SCANS scans (why: at MAX_JPEG_SCANS)."""
    if _count_scans(data, MAX_JPEG_SCANS) > MAX_JPEG_SCANS:
        raise ImageRejected(
            f"the JPEG has more than {MAX_JPEG_SCANS} scans (progressive passes); at most {MAX_JPEG_SCANS} are "
            "accepted, as each one means decoding the whole picture again: save it again as an ordinary JPEG or a PNG"
        )


def _count_scans(data: bytes, limit: int) -> int:
    """The scans (SOS segments) libjpeg reads in the JPEG `data`, counted up to `limit` + 1 (no
    further: the file is refused then).

    Walked as libjpeg's jdmarker.c walks it: from SOI, each marker segment skipped by its length
    (an APP1's EXIF thumbnail, scans and EOI included); between segments, bytes that are no marker
    skipped (libjpeg skips them with a warning); after a scan's header, its entropy-coded data up to
    the next marker (_MARKER: not a stuffed FF 00, a restart marker or fill); the end at the EOI
    reached so, whatever follows it. Where the walk cannot go on (no SOI, a length past the end) the
    count so far is returned: Pillow's decoder says what is wrong with such a file. One regex search
    per marker with a length, not a Python step per byte: 8 MiB of FF 00 pairs take milliseconds;
    the worst, 8 MiB of empty 4-byte segments, under a second (Pillow's own parse of them, before a
    first scan, takes longer)."""
    if data[:2] != b"\xff\xd8":
        return 0
    search, end = _MARKER.search, len(data) - 2
    scans, at = 0, 2
    while (found := search(data, at)) is not None:
        at = found.end()
        marker = data[at - 1]
        if marker == _EOI or at > end:
            break
        # The length counts its own two bytes; libjpeg skips nothing more for one under 2.
        at += max((data[at] << 8) | data[at + 1], 2)
        if marker == _SOS:
            scans += 1
            if scans > limit:
                break
    return scans


def _orientation(image: Image.Image) -> int:
    """The picture's EXIF Orientation (2-8: a key of UPRIGHT), or 1 (upright) when it has none, or
    EXIF that cannot be read (the pixels are fine: used as they are)."""
    try:
        value = image.getexif().get(ExifTags.Base.Orientation, 1)
    except DAMAGED:
        return 1
    return value if isinstance(value, int) and value in UPRIGHT else 1


def _reduce(image: Image.Image, max_side: int) -> Image.Image:
    """`image` reduced by the whole factor `Image.thumbnail((max_side, max_side))` reduces it by
    before it resamples (Image.resize's reducing_gap rule), so that the thumbnail of the result is
    the thumbnail of `image`, pixel for pixel; or `image` itself. Only when that factor is the same
    on both axes and divides both sides (with a remainder Pillow samples a fraction of a pixel
    further), and the short side stays at least twice `max_side` (a square crop of it, as
    image_prompts.to_tensor takes, keeps the detail)."""
    width, height = image.size
    if max(width, height) <= max_side:
        return image
    target = _thumbnail_size(width, height, max_side)
    factor = int(width / target[0] / REDUCING_GAP)
    if (factor < 2 or factor != int(height / target[1] / REDUCING_GAP) or width % factor or height % factor
            or min(width, height) < factor * REDUCING_GAP * max_side
            or _thumbnail_size(width // factor, height // factor, max_side) != target):
        return image
    return image.reduce(factor)


def _thumbnail_size(width: int, height: int, side: int) -> tuple[int, int]:
    """The size `Image.thumbnail((side, side))` gives a `width` x `height` picture (Pillow's rule)."""
    def round_aspect(number: float, key) -> int:
        return max(min(math.floor(number), math.ceil(number), key=key), 1)

    x, y = side, side
    aspect = width / height
    if x / y >= aspect:
        x = round_aspect(y * aspect, key=lambda n: abs(aspect - n / y))
    else:
        y = round_aspect(x / aspect, key=lambda n: 0 if n == 0 else abs(aspect - x / n))
    return x, y


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit (I;16*), 32-bit integer (I) or float (F) pixels to 8-bit gray ("L"): 0..65535 onto
    0..255 (v // 257) for 16-bit pictures and integer ones above 255, else 0..255 as is. Integer
    arithmetic into one uint8 array (no float64 copies of the picture)."""
    import numpy as np

    pixels = np.asarray(image)   # one copy: uint16, int32 or float32
    out = np.empty(pixels.shape, dtype=np.uint8)
    if pixels.dtype.kind == "f":
        top = np.float32(65535.0 if pixels.max() > 255 else 255.0)
        np.clip(pixels / top * np.float32(255), 0, 255, out=out, casting="unsafe")
    elif image.mode.startswith("I;16") or pixels.max() > 255:
        np.floor_divide(np.clip(pixels, 0, 65535) if pixels.dtype.kind == "i" else pixels, 257,
                        out=out, casting="unsafe")
    else:
        np.clip(pixels, 0, 255, out=out, casting="unsafe")
    del pixels
    return Image.fromarray(out, "L")
