"""Shared harness for the bot's end-to-end tests (no tests here).

The real discord.py client (bot.client.ImagineBot, built by the launcher's helpers) runs against
the fake Discord on 127.0.0.1, with the real SQLite queue in tmp_path and the real embedded
Worker on tiny random-weight models. The sizes are 64 (grid 8, the default) and 128 (grid 16), and
frames come every 2 iterations, so a job takes a fraction of a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable, TypeVar

import pytest_asyncio

from bot.config import Config, config_from_dict
from bot.launcher import Resources, make_bot, open_resources
from engine.jobs import EventKind, JobEvent, JobRecord, JobState
from tests.fakediscord import FakeDiscord, InteractionRecord, StoredMessage, running_bot

T = TypeVar("T")

WEBHOOK_ORIGINAL = r"/webhooks/\d+/[^/]+/messages/@original"
CHANNEL_MESSAGE = r"/channels/\d+/messages/\d+"
CALLBACK = r"/interactions/\d+/[^/]+/callback"
JOB_ID_RE = re.compile(r"job `?([0-9a-f]{12})")   # a reply's "job `<id>`" (and a log's "job <id>")
EPHEMERAL = 1 << 6
FLAG_LOADING = 1 << 7   # a deferred "thinking…" message


def tiny_png(width: int = 2, height: int = 2) -> bytes:
    """A valid RGB PNG (red), `width` x `height`."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(b"\x00" + b"\xff\x00\x00" * width for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_config(tmp_path: Path, **overrides: Any) -> Config:
    data: dict[str, Any] = {
        "queue": {"url": f"sqlite:///{tmp_path / 'queue.db'}", "max_queued_per_user": 5},
        "worker": {"embedded": True},
        "imagine": {
            "default_iterations": 4, "max_iterations": 40, "frame_every": 2, "cutn": 2,
            # Honest labels (the key is 8 × grid, as the config check requires): 64×64 and 128×128.
            "sizes": {"64": 8, "128": 16}, "default_size": 64,
        },
        "progress": {
            "message_interval": 0.05, "channel_interval": 0.01, "line_interval": 0.05,
            "poll_timeout": 0.5, "reconcile_interval": 0.5,
        },
        "discord": {"admin_roles": ["Imagine Admin"]},
        # The presets scaled to the tiny sizes and iterations above (draft < normal < best, as by default).
        "presets": {"draft": {"size": 64, "iterations": 2, "cutn": 2}, "normal": {"size": 64, "iterations": 4, "cutn": 3},
                    "best": {"size": 128, "iterations": 6, "cutn": 4}},
    }
    for section, values in overrides.items():
        data.setdefault(section, {}).update(values)
    return config_from_dict(data)


test_config.__test__ = False  # type: ignore[attr-defined]  # not a test, despite its name


@dataclass
class Harness:
    fd: FakeDiscord
    config: Config
    models: Any
    resources: Resources | None = None
    bot: Any = None
    _stack: contextlib.AsyncExitStack | None = None
    synced: bool = False
    starts: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    http_port: int | None = None   # 0: serve /healthz and /metrics on a free port (resources.http_port)

    @property
    def queue(self):
        assert self.resources is not None
        return self.resources.queue

    async def start(self, *, worker: bool = True) -> None:
        """Launcher resources + the Bot, connected to the fake; commands synced to the guild once."""
        self.config.worker.embedded = worker
        stack = contextlib.AsyncExitStack()
        await stack.__aenter__()
        try:
            self.resources = await stack.enter_async_context(open_resources(
                self.config, models_loader=lambda: self.models,
                worker_options={"poll_every": 0.05, "heartbeat_every": 0.2}, http_port=self.http_port,
            ))
            self.bot = make_bot(self.resources)
            await stack.enter_async_context(running_bot(self.fd, self.bot))
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack
        self.starts += 1
        if not self.synced:
            await self.bot.tree.sync(guild=None)
            self.synced = True

    async def stop(self) -> None:
        if self._stack is not None:
            stack, self._stack = self._stack, None
            await stack.aclose()

    async def write_store(self, change: Callable[[sqlite3.Connection], T]) -> T:
        """`change` run on a connection of its own to the harness's SQLite store, behind the bot's
        back (a row as an older version wrote it, a lost picture, a renamed table), and committed.
        In a thread: the bot shares this test's event loop, and its aiosqlite transactions finish
        only while the loop runs, so a wait for the write lock on the loop would wait for itself
        (CI: "database is locked" after the timeout, "heartbeat blocked for more than 10 seconds")."""
        path = self.config.queue.url.removeprefix("sqlite:///")

        def run() -> T:
            with contextlib.closing(sqlite3.connect(path, timeout=60)) as db, db:
                return change(db)
        return await asyncio.to_thread(run)

    # --- driving --------------------------------------------------------------------------------

    async def imagine(self, prompt: str, *, user: Any = None, **options: Any) -> InteractionRecord:
        inter = await self.fd.send_slash_command("imagine", {"prompt": prompt, **options}, user=user)
        await self.fd.wait_for_response(inter)
        return inter

    async def reply_of(self, inter: InteractionRecord, timeout: float = 10.0) -> StoredMessage:
        """The job's reply once it shows its queued state (the deferred message, edited)."""
        await self.fd.wait_for(lambda: inter.original_message is not None
                               and JOB_ID_RE.search(inter.original_message.content), timeout,
                               "the queued reply")
        msg = inter.original_message
        assert msg is not None
        return msg

    def job_id(self, msg: StoredMessage) -> str:
        found = JOB_ID_RE.search(msg.content) or JOB_ID_RE.search(
            " ".join(h["content"] for h in msg.history))
        assert found, msg.content
        return found.group(1)

    async def wait_delivered(self, job_id: str, timeout: float = 30.0) -> JobRecord:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            record = await self.queue.get(job_id)
            if record is not None and record.delivered:
                return record
            if loop.time() > deadline:
                raise TimeoutError(f"job {job_id} was not delivered in {timeout}s (state {record and record.state})")
            await asyncio.sleep(0.05)

    async def wait_state(self, job_id: str, *states: JobState, timeout: float = 30.0) -> JobRecord:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            record = await self.queue.get(job_id)
            if record is not None and record.state in states:
                return record
            if loop.time() > deadline:
                raise TimeoutError(f"job {job_id} did not reach {states} in {timeout}s (state {record and record.state})")
            await asyncio.sleep(0.05)

    def final_edits(self, message_id: int) -> list:
        """Successful requests that put a video on `message_id` (the final post)."""
        out = []
        for req in self.fd.requests:
            if req.status != 200 or req.method not in ("PATCH", "POST"):
                continue
            if not any(f.filename == "video.mp4" for f in req.files):
                continue
            body = req.response if isinstance(req.response, dict) else {}
            if str(body.get("id")) == str(message_id):
                out.append(req)
        return out

    def posts_of_job(self, job_id: str) -> list:
        """Successful requests whose message carries the job's result buttons."""
        wanted = f"imagine:reroll:{job_id}"
        out = []
        for req in self.fd.requests:
            if req.status != 200 or req.method not in ("PATCH", "POST") or not isinstance(req.json, dict):
                continue
            ids = [c.get("custom_id") for row in req.json.get("components") or [] for c in row.get("components", [])]
            if wanted in ids:
                out.append(req)
        return out


# A stand-in for a fast GPU: the test claims the jobs and publishes frames itself.

async def ephemeral_answer(h, name, options=None, **kw) -> str:
    """Run a slash command and return its answer, asserting that only the user saw it."""
    inter = await h.fd.send_slash_command(name, options or {}, **kw)
    return await private_answer(h, inter)


async def private_answer(h, inter: InteractionRecord, timeout: float = 10.0) -> str:
    """The answer to `inter`, asserting that only the user saw it: an ephemeral message at once
    (callback 4), or an ephemeral "thinking…" (a defer, callback 5: the bot had a slow store write
    to make first) that the answer then replaced."""
    await h.fd.wait_for_response(inter)
    data = inter.response.get("data") or {}
    assert inter.response_type in (4, 5), inter.response_type
    assert data.get("flags", 0) & EPHEMERAL, data
    if inter.response_type == 4:
        return data["content"]
    await h.fd.wait_for(lambda: inter.original_message is not None
                        and not inter.original_message.flags & FLAG_LOADING, timeout, "the answer after the defer")
    msg = inter.original_message
    assert msg.ephemeral and not inter.followups, (msg, inter.followups)
    return msg.content


async def claim_jobs(queue, job_ids) -> None:
    claimed = [(await queue.claim("test-gpu")).id for _ in job_ids]
    assert sorted(claimed) == sorted(job_ids)


async def publish_frames(queue, job_ids, frames: int, every: float) -> None:
    for i in range(frames):
        for job_id in job_ids:
            await queue.publish(JobEvent(job_id, EventKind.PROGRESS, iteration=i, total=frames - 1,
                                         similarity=0.1 + i / 1000, frame_png=tiny_png(1 + i, 1)))
        await asyncio.sleep(every)


async def finish_jobs(queue, job_ids) -> None:
    for job_id in job_ids:
        await queue.put_artifact(job_id, "final.png", tiny_png(9, 9))
        await queue.put_artifact(job_id, "video.mp4", b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 64)
        assert await queue.finish(job_id, (await queue.get(job_id)).lease_id, 0.2)  # the claim's lease


def requests_matching(fd: FakeDiscord, method: str, pattern: str, since: int = 0) -> list[Any]:
    """The fake's recorded `method` requests since index `since` whose path matches `pattern` whole."""
    rx = re.compile(pattern)
    return [r for r in fd.requests[since:] if r.method == method and rx.fullmatch(r.path)]


async def queued_job_in_a_thread(h, prompt: str, *, expire_token: bool = True) -> tuple[Any, str]:
    """A job queued by /imagine in a public thread of #general (its reply is in the thread), whose
    interaction token has since expired (edits go through the channel, as after a restart) unless
    `expire_token` is False: (its reply, its id). No worker: the test plays the job."""
    fd = h.fd
    thread_id = fd.add_thread("renders", fd.channel_id, owner_id=int(fd.member_user["id"]), private=False)
    await h.start(worker=False)
    inter = await fd.send_slash_command("imagine", {"prompt": prompt}, channel_id=thread_id)
    await fd.wait_for_response(inter)
    msg = await h.reply_of(inter)
    assert msg.channel_id == thread_id
    job_id = h.job_id(msg)
    if expire_token:
        fd.expire_tokens()
    return msg, job_id


async def finished_job(h, prompt: str = "a lighthouse", channel_id: int | None = None, command: str = "imagine",
                       options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """A DONE job with a final state (Continue, Remix), delivered in `channel_id` (the default
    channel when None), its buttons shown: (its reply, its id). No worker: the test finishes it.
    `command` and `options`: another command than /imagine `prompt` (a /remix)."""
    fd = h.fd
    inter = await fd.send_slash_command(command, options or {"prompt": prompt}, channel_id=channel_id)
    await fd.wait_for_response(inter)
    msg = await h.reply_of(inter)
    job_id = h.job_id(msg)
    await claim_jobs(h.queue, [job_id])
    await h.queue.put_artifact(job_id, "state.pt", b"a final state")
    await finish_jobs(h.queue, [job_id])
    await h.wait_delivered(job_id)
    await fd.wait_for(lambda: f"imagine:remix:{job_id}" in fd.messages[msg.id].custom_ids, 5, "the result's buttons")
    return msg, job_id


@pytest_asyncio.fixture
async def harness(tmp_path, tiny_models) -> AsyncIterator[Harness]:
    fd = FakeDiscord()
    await fd.start()
    h = Harness(fd=fd, config=test_config(tmp_path), models=tiny_models)
    try:
        yield h
    finally:
        await h.stop()
        await fd.close()
