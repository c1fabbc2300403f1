"""Pictures attached to /imagine (`image`, `init_image`): checked, downloaded, re-encoded, stored.

Torch-free. What a worker gets is never the user's file: the bot decodes it safely
(engine.images.load_image: size, pixel-bomb and format refusals; animations and 16-bit images
converted, with a note), scales it down, re-encodes it as PNG and stores it in the queue as an
artifact under a fresh upload id (`engine.jobs.new_upload_id()`: `upload_<hex>`, name `image.png`)
*before* the job is submitted, so no worker can claim the job before its picture is there. The spec
names it in `extra`: `{"image_prompt": {"artifact": [id, "image.png"], "weight": w}, "init_image":
{"artifact": [...]}}`. The queue's `prune` deletes an upload once it is older than its `older_than`
and no job left in the store names it (so one whose job was never submitted goes too).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import discord

from bot import render
from engine.images import MAX_IMAGE_PIXELS, ImageRejected, load_image
from engine.jobs import new_upload_id

ARTIFACT_NAME = "image.png"
# The worker needs at most CLIP's input (224) and the init image's 8 * grid (512): a stored copy
# of up to 1024 a side keeps the detail and keeps the queue small.
STORE_SIDE = 1024
SPEC_KEYS = {"image": "image_prompt", "init_image": "init_image"}


class AttachmentRefused(ValueError):
    """An attachment to refuse; the message (shown ephemerally) says which option and what to do."""


@dataclass
class CheckedImage:
    option: str                     # "image" | "init_image"
    png: bytes                      # the decoded picture, scaled down, re-encoded
    notes: list[str] = field(default_factory=list)   # what load_image converted


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def precheck(attachment: discord.Attachment, option: str, max_bytes: int) -> None:
    """Refusals that need no download: Discord's size, content type and dimensions."""
    if attachment.size > max_bytes:
        raise AttachmentRefused(f"`{option}`: the file is {_mib(attachment.size)}; the limit is {_mib(max_bytes)}. "
                                "Send a smaller image.")
    ctype = (attachment.content_type or "").split(";")[0].strip().lower()
    if ctype and not ctype.startswith("image/"):
        raise AttachmentRefused(f"`{option}`: {render.quote(attachment.filename, 80)} is not an image "
                                f"({render.quote(ctype, 80)}). Send a PNG, JPEG, WebP or GIF.")
    width, height = attachment.width or 0, attachment.height or 0
    if width * height > MAX_IMAGE_PIXELS:
        raise AttachmentRefused(f"`{option}`: the image is {width}x{height} pixels; at most {MAX_IMAGE_PIXELS:,} "
                                "pixels are accepted. Scale it down.")


async def download(attachment: discord.Attachment, option: str, max_bytes: int) -> bytes:
    try:
        data = await attachment.read()
    except discord.HTTPException as exc:
        raise AttachmentRefused(f"`{option}`: Discord did not hand me the file (HTTP {exc.status}). "
                                "Attach it again.") from exc
    except (aiohttp.ClientError, OSError) as exc:   # the connection failed or broke off
        raise AttachmentRefused(f"`{option}`: Discord did not hand me the file (the download failed: "
                                f"{type(exc).__name__}). Attach it again.") from exc
    if len(data) > max_bytes:   # the size Discord announced was wrong
        raise AttachmentRefused(f"`{option}`: the file is {_mib(len(data))}; the limit is {_mib(max_bytes)}. "
                                "Send a smaller image.")
    return data


def check(data: bytes, option: str, max_bytes: int) -> CheckedImage:
    """Decode (refusing what is not a safe image), scale down, re-encode as PNG. CPU work: run it
    in a thread."""
    try:
        image, notes = load_image(data, max_bytes=max_bytes)
    except ImageRejected as exc:
        raise AttachmentRefused(f"`{option}`: {exc}.") from None
    image.thumbnail((STORE_SIDE, STORE_SIDE))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return CheckedImage(option, buf.getvalue(), notes)


async def store(queue: Any, checked: CheckedImage) -> list[str]:
    """Put the picture in the queue under a fresh id; returns the artifact reference [id, name]."""
    upload_id = new_upload_id()
    await queue.put_artifact(upload_id, ARTIFACT_NAME, checked.png)
    return [upload_id, ARTIFACT_NAME]
