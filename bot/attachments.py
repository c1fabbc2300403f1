"""Pictures attached to /imagine (`image`, `init_image`): checked, downloaded, re-encoded, stored.

Torch-free. What a worker gets is never the user's file: the bot decodes it safely
(engine.images.load_image: size, pixel-bomb and format refusals; animations and 16-bit images
converted, with a note), crops it to the centre square the worker uses (as it always did, in
engine.image_prompts.to_tensor), scales that down, re-encodes it as PNG and stores it in the queue as an
artifact under the PNG's content id (`engine.jobs.upload_id_of`: `upload_<32 hex of its SHA-256>`,
name `image.png`; the same picture is stored once, however often it is sent) *before* the job is
submitted, so no worker can claim the job before its picture is there. The spec names it in
`extra`: `{"image_prompt": {"artifact": [id, "image.png"], "weight": w}, "init_image":
{"artifact": [...]}}`.

What a command stored and then did not queue goes at once (`Uploads.discard`: the store's
`discard_uploads`, which keeps whatever a job names); a job cancelled while queued takes its
uploads along in the store; the queue's `prune` deletes the rest once it is older than its
`older_than` and no job left in the store names it (a bot that crashed between store and submit).
One user's commands with pictures take turns (`UserTurns`, held by bot.imagine from the early
checks to the submit), so a burst of them cannot all pass the early cap check and download first.
"""

from __future__ import annotations

import asyncio
import io
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, TypeVar

import aiohttp
import discord

from bot import render
from engine.images import MAX_IMAGE_PIXELS, ImageRejected, load_image
from engine.jobs import UploadGone, upload_id_of

log = logging.getLogger(__name__)

T = TypeVar("T")

ARTIFACT_NAME = "image.png"
# The worker needs at most CLIP's input (224) and the init image's 8 * grid (512), of the picture's
# centre square (engine.image_prompts.to_tensor crops it): the stored copy is that square, of up to
# 1024 a side, which keeps the detail and keeps the queue small. (Shrunk before the crop, a
# 3000x1000 picture's square was 341 px.)
STORE_SIDE = 1024
SPEC_KEYS = {"image": "image_prompt", "init_image": "init_image"}
# How many times `Uploads.submit` stores a picture of its own again when the submit finds it gone
# (another command's discard or cancel of the same picture came between this store and this submit).
RESTORE_TRIES = 3
# Pictures are decoded on threads of their own, not on asyncio's default pool, which the rest of
# the bot shares (ban-word matching, contact sheets, video re-encoding): a thread cannot be stopped,
# so a picture still decoding when its command gives up (bot.imagine's ATTACHMENT_TIMEOUT) keeps its
# thread until it is done, and enough of them would make every other command wait. engine.images
# bounds one decode (pixels, a JPEG's scans); this bounds how many run at once. The others wait
# their turn; a command that gives up while its picture waits takes it out of the line.
DECODE_THREADS = 2
_decoders = ThreadPoolExecutor(max_workers=DECODE_THREADS, thread_name_prefix="attachment-decode")


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


def centre_square(image: Any) -> Any:
    """The centre square of `image`, as engine.image_prompts.to_tensor crops it (same offsets)."""
    w, h = image.size
    s = min(w, h)
    return image if w == h else image.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))


def check(data: bytes, option: str, max_bytes: int) -> CheckedImage:
    """Decode (refusing what is not a safe image), crop to the centre square the worker uses,
    scale down, re-encode as PNG. CPU work: run it on the decoders' threads (`check_on_decoders`)."""
    try:
        image, notes = load_image(data, max_bytes=max_bytes)
    except ImageRejected as exc:
        # engine.images' words, which may carry Pillow's exception text, made of the file's own
        # bytes (`broken PNG file (chunk b'||*_')`): tamed, cut and Markdown escaped
        # (render.snippet), so the file cannot format (spoil, italicise, link) the answer.
        raise AttachmentRefused(f"`{option}`: {render.snippet(str(exc), 300)}.") from None
    image = centre_square(image)
    image.thumbnail((STORE_SIDE, STORE_SIDE))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return CheckedImage(option, buf.getvalue(), notes)


async def check_on_decoders(data: bytes, option: str, max_bytes: int) -> CheckedImage:
    """`check`, on the attachments' own threads (DECODE_THREADS, why: there)."""
    return await asyncio.get_running_loop().run_in_executor(_decoders, check, data, option, max_bytes)


def timeout_text(decoding: list[str]) -> str:
    """What to tell the user when their pictures were not ready in time: `decoding`, the options
    whose picture was downloaded and was being read (or waiting for a decoder) when time ran out."""
    if decoding:
        return (f"`{decoding[0]}`: reading the picture took too long (it may be too complex to decode, or "
                "I am busy reading other pictures). Try again, or send a simpler picture (a PNG or a plain JPEG).")
    return "Downloading the attachment from Discord took too long. Try again."


async def store(queue: Any, checked: CheckedImage) -> list[str]:
    """Put the picture in the queue under its content id (storing one already there rewrites the
    same bytes and counts its age from now); returns the artifact reference [id, name]."""
    upload_id = upload_id_of(checked.png)
    await queue.put_artifact(upload_id, ARTIFACT_NAME, checked.png)
    return [upload_id, ARTIFACT_NAME]


class Uploads:
    """The pictures one command stored, for its submit: stored again when the submit finds one gone
    (`submit`), deleted when the command queues nothing (`discard`)."""

    def __init__(self, queue: Any) -> None:
        self.queue = queue
        self.pngs: dict[str, bytes] = {}

    async def store(self, checked: CheckedImage) -> list[str]:
        upload_id = upload_id_of(checked.png)
        if upload_id in self.pngs:   # `image` and `init_image` the same picture: one upload, stored once
            return [upload_id, ARTIFACT_NAME]
        self.pngs[upload_id] = checked.png   # first: a store that fails half-way is discarded too
        return await store(self.queue, checked)

    async def submit(self, submit: Callable[[], Awaitable[T]]) -> T:
        """`submit()` (the store's submit / submit_many). The same picture is one upload for every
        command that sends it, so another command's refusal (`discard`) or a cancelled job may have
        deleted ours between our store and this submit: the store refuses the job then (UploadGone,
        nothing queued), and the picture is stored again and the job submitted again, up to
        RESTORE_TRIES times. UploadGone of a picture this command did not store (a Reroll's, carried
        from another job) is raised."""
        for attempt in range(RESTORE_TRIES + 1):
            try:
                return await submit()
            except UploadGone as exc:
                png = self.pngs.get(exc.upload_id)
                if png is None or attempt == RESTORE_TRIES:
                    raise
                log.info("upload %s went before its job was queued; storing it again", exc.upload_id)
                await self.queue.put_artifact(exc.upload_id, ARTIFACT_NAME, png)
        raise AssertionError("unreachable")

    async def discard(self) -> None:
        """The command queued nothing: delete its pictures now, those no job names (another job may
        use the same picture: it keeps it). Never raises; `prune` takes what this could not."""
        if not self.pngs:
            return
        try:
            await self.queue.discard_uploads(sorted(self.pngs))
        except Exception:   # noqa: BLE001 - the store is down: prune deletes them after keep_days
            log.warning("could not delete the uploads of a command that queued nothing", exc_info=True)


class UserTurns:
    """One turn at a time per user (an asyncio lock per user id, made on first use and dropped once
    nobody holds or waits for it): bot.imagine holds a user's turn for a command with pictures from
    its early checks (the cap) to its submit, so a burst of such commands cannot all pass the cap
    check and download and store their pictures before the store's cap refuses them."""

    def __init__(self) -> None:
        self._turns: dict[int, tuple[asyncio.Lock, list[int]]] = {}   # user -> (lock, [holders + waiters])

    def __len__(self) -> int:
        return len(self._turns)

    async def acquire(self, user_id: int) -> None:
        """Wait for the user's turn (cancel it to stop waiting: nothing is held then)."""
        lock, users = self._turns.setdefault(user_id, (asyncio.Lock(), [0]))
        users[0] += 1
        try:
            await lock.acquire()
        except BaseException:
            self._leave(user_id)
            raise

    def release(self, user_id: int) -> None:
        self._turns[user_id][0].release()
        self._leave(user_id)

    def _leave(self, user_id: int) -> None:
        _, users = self._turns[user_id]
        users[0] -= 1
        if users[0] == 0:
            del self._turns[user_id]
