"""Untrusted pictures (Discord attachments, CLI files) -> a safe 8-bit RGB image, or a clear refusal.

Torch-free: the bot validates attachments with this before anything is queued.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, ImageSequence, UnidentifiedImageError

MAX_IMAGE_BYTES = 8 * 1024 * 1024
MAX_IMAGE_PIXELS = 4096 * 4096       # Pillow's decompression-bomb guard, tighter than its default
# The only decoders untrusted bytes reach: Pillow would otherwise try every format it knows (EPS runs
# Ghostscript on the file; rarely used decoders are where Pillow's memory bugs were found).
FORMATS = ("PNG", "JPEG", "WEBP", "GIF")


class ImageRejected(ValueError):
    """The message says what was wrong and what to do."""


def load_image(data: bytes, max_bytes: int = MAX_IMAGE_BYTES, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[Image.Image, list[str]]:
    """Decode `data` into an RGB image. Returns (image, notes): notes say what was converted.

    Refused: over `max_bytes`, not a PNG, JPEG, WebP or GIF (FORMATS: no other decoder is tried),
    more than `max_pixels` pixels (a pixel bomb: checked from the header before decoding). Converted, with a note: animations (first frame),
    16-bit and other modes (to 8-bit RGB), transparency (onto white).
    """
    if len(data) > max_bytes:
        raise ImageRejected(
            f"the image is {len(data) / 2**20:.1f} MiB; the limit is {max_bytes / 2**20:.0f} MiB: send a smaller file"
        )
    notes: list[str] = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
            width, height = image.size
            if width * height > max_pixels:
                raise ImageRejected(
                    f"the image is {width}x{height} pixels; at most {max_pixels:,} pixels are accepted: scale it down"
                )
            if getattr(image, "is_animated", False) and getattr(image, "n_frames", 1) > 1:
                notes.append(f"the image is animated ({image.n_frames} frames): its first frame was used")
                image = next(iter(ImageSequence.Iterator(image)))
            image.load()
    except ImageRejected:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        if isinstance(exc, UnidentifiedImageError):
            raise ImageRejected("the file is not an image I can read: send a PNG, JPEG, WebP or GIF") from exc
        raise ImageRejected(f"the image is too large to decode safely ({exc}): scale it down") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageRejected(f"the image is damaged or truncated ({exc})") from exc
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F") or image.mode.startswith("I;16"):
        notes.append(f"the image has {image.mode} pixels (more than 8 bits): converted to 8-bit RGB")
        image = _to_8bit(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB"), notes


def _to_8bit(image: Image.Image) -> Image.Image:
    import numpy as np

    pixels = np.asarray(image, dtype=np.float64)
    top = 65535.0 if image.mode.startswith("I;16") or pixels.max() > 255 else 255.0
    return Image.fromarray((pixels / top * 255).clip(0, 255).astype(np.uint8)).convert("RGB")
