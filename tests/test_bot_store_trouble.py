"""When the queue's store is slow or failing: the bot still answers Discord in time, and says so
when it fails.

Slow: another process holds the SQLite file's write lock (a real second connection in BEGIN
IMMEDIATE, as a worker's multi-second checkpoint write does) for longer than Discord's 3 s to
answer an interaction. Whatever writes to the store (Cancel, `/queue-admin ban-word add | remove`,
/imagine storing an attached picture) defers first, and gives its answer once the write is done.

Failing: the write lock is held past the queue's busy timeout, or a job's row cannot be read. A
button (Reroll, Continue, Remix, Cancel) then answers privately with our error, turns the public
"thinking…" it left into a note that it failed, and logs the error without the token or prompt.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from pathlib import Path
from typing import AsyncIterator

import pytest
import pytest_asyncio

from bot.imagine import FAILED_PLACEHOLDER
from engine.jobs import JobState
from tests.fakediscord import FakeDiscord
from tests.test_bot_support import (
    EPHEMERAL, FLAG_LOADING, Harness, claim_jobs, finish_jobs, private_answer, test_config, tiny_png,
)

pytestmark = pytest.mark.asyncio

DISCORD_ANSWER_WINDOW = 3.0   # seconds Discord gives a bot to answer an interaction
LOCK_HELD_FOR = 4.0           # longer than that window


class OtherWriter:
    """Another process writing to the queue's SQLite file: a second real connection that takes the
    file's write lock (BEGIN IMMEDIATE) and holds it. Reads go on meanwhile (WAL); writes wait.
    Its calls run in a thread: the bot shares this event loop, and must not stall while it waits."""

    def __init__(self, path: Path):
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)

    async def lock(self) -> None:
        await asyncio.to_thread(self.conn.execute, "BEGIN IMMEDIATE")

    async def unlock(self) -> float:
        """Let go of the lock; returns when (time.monotonic())."""
        await asyncio.to_thread(self.conn.execute, "ROLLBACK")
        return time.monotonic()


async def _harness(tmp_path: Path, tiny_models, busy_timeout: float) -> AsyncIterator[tuple[Harness, OtherWriter]]:
    db = tmp_path / "queue.db"
    fd = FakeDiscord()
    await fd.start()
    h = Harness(fd=fd, config=test_config(tmp_path, queue={"url": f"sqlite:///{db}?busy_timeout={busy_timeout}"}),
                models=tiny_models)
    await h.start(worker=False)   # the test plays the GPU where it needs one: no writer but the bot
    writer = OtherWriter(db)
    try:
        yield h, writer
    finally:
        writer.conn.close()
        await h.stop()
        await fd.close()


@pytest_asyncio.fixture
async def patient_harness(tmp_path, tiny_models):
    """The queue waits up to 30 s for another process's write lock (the default)."""
    async for pair in _harness(tmp_path, tiny_models, busy_timeout=30):
        yield pair


@pytest_asyncio.fixture
async def impatient_harness(tmp_path, tiny_models):
    """The queue gives up on another process's write lock after 0.3 s ("database is locked")."""
    async for pair in _harness(tmp_path, tiny_models, busy_timeout=0.3):
        yield pair


def _answered_in_time(inter) -> float:
    """Seconds from the interaction to the bot's first answer, asserting it was within Discord's window."""
    assert inter.callback_request is not None, "never answered"
    took = inter.callback_request.monotonic - inter.created
    assert took < DISCORD_ANSWER_WINDOW, f"first answer after {took:.1f} s"
    return took


def _answered_after(h, inter, moment: float) -> None:
    """The final answer to `inter` (the follow-up that replaced its "thinking…") came after `moment`."""
    answers = [r for r in h.fd.requests if r.method == "POST" and r.status in (200, 204)
               and r.path.startswith("/webhooks/") and r.path.endswith(f"/{inter.token}")]
    assert answers and answers[-1].monotonic >= moment, answers


# --- slow: the answer comes in time, the result once the write is done --------------------------

async def test_cancel_answers_in_time_while_another_process_holds_the_write_lock(patient_harness):
    h, writer = patient_harness
    fd = h.fd
    msg = await h.reply_of(await h.imagine("a cat on a piano"))
    job_id = h.job_id(msg)

    await writer.lock()
    click = await fd.click_button(msg, f"imagine:cancel:{job_id}")
    await fd.wait_for_response(click, DISCORD_ANSWER_WINDOW + 1)
    _answered_in_time(click)
    assert click.response_type == 5 and click.response["data"]["flags"] & EPHEMERAL   # a private "thinking…"
    await asyncio.sleep(LOCK_HELD_FOR - (time.monotonic() - click.created))
    assert (await h.queue.get(job_id)).state == JobState.QUEUED   # the write is still waiting
    released = await writer.unlock()

    assert await private_answer(h, click) == f"Cancelled job `{job_id}`."
    _answered_after(h, click, released)
    assert (await h.queue.get(job_id)).state == JobState.CANCELLED
    await fd.wait_for(lambda: "Cancelled." in fd.messages[msg.id].content, 5, "the cancelled reply")
    fd.assert_clean()


async def test_ban_word_add_and_remove_answer_in_time_while_another_process_holds_the_write_lock(patient_harness):
    h, writer = patient_harness
    fd = h.fd
    key = f"banned:{fd.guild_id}"
    for name, answer, stored in [("queue-admin ban-word add", "Added the word `cursed`", ["cursed"]),
                                 ("queue-admin ban-word remove", "Removed `cursed`: it is allowed again", [])]:
        await writer.lock()
        inter = await fd.send_slash_command(name, {"entry": "cursed"}, user=fd.admin_user)
        await fd.wait_for_response(inter, DISCORD_ANSWER_WINDOW + 1)
        _answered_in_time(inter)
        assert inter.response_type == 5 and inter.response["data"]["flags"] & EPHEMERAL
        await asyncio.sleep(LOCK_HELD_FOR - (time.monotonic() - inter.created))
        released = await writer.unlock()
        assert answer in await private_answer(h, inter), name
        _answered_after(h, inter, released)
        assert await h.queue.get_setting(key) == stored
    fd.assert_clean()


async def test_imagine_with_a_picture_answers_in_time_while_another_process_holds_the_write_lock(patient_harness):
    h, writer = patient_harness
    fd = h.fd
    picture = fd.host_attachment("p.png", tiny_png(4, 4))
    await writer.lock()
    inter = await fd.send_slash_command("imagine", {"prompt": "a lake", "image": picture})
    await fd.wait_for_response(inter, DISCORD_ANSWER_WINDOW + 1)
    _answered_in_time(inter)
    assert inter.response_type == 5 and not inter.response.get("data", {}).get("flags", 0) & EPHEMERAL  # public
    await asyncio.sleep(LOCK_HELD_FOR - (time.monotonic() - inter.created))
    await writer.unlock()
    record = await h.queue.get(h.job_id(await h.reply_of(inter)))
    assert record.state == JobState.QUEUED and "image_prompt" in record.spec.extra
    fd.assert_clean()


# --- failing: every button says so ------------------------------------------------------------------

async def _finished_job(h, prompt: str) -> tuple:
    """A DONE job with its final state, finished by the test (playing the GPU), and its result message."""
    msg = await h.reply_of(await h.imagine(prompt))
    job_id = h.job_id(msg)
    await claim_jobs(h.queue, [job_id])
    await h.queue.put_artifact(job_id, "state.pt", b"the final logits")
    await finish_jobs(h.queue, [job_id])
    await h.wait_delivered(job_id)
    await h.fd.wait_for(lambda: f"imagine:continue:{job_id}" in h.fd.messages[msg.id].custom_ids, 10, "buttons")
    return msg, job_id


def _no_secrets_logged(caplog, inter, prompt: str) -> None:
    for record in caplog.records:
        if record.levelno >= logging.INFO:
            text = record.getMessage() + (record.exc_text or "")
            assert inter.token not in text and prompt not in text, text


def _our_error_logged(caplog, what: str) -> None:
    failures = [r for r in caplog.records if r.levelno >= logging.ERROR and what in r.getMessage()]
    assert failures and failures[0].exc_info is not None, [r.getMessage() for r in caplog.records]
    assert not [r for r in caplog.records if "Ignoring exception" in r.getMessage()]


async def test_a_button_whose_store_write_fails_after_the_defer_says_so(impatient_harness, caplog):
    """Continue and Reroll defer publicly, then queueing fails (the file's write lock is held past
    the busy timeout): the public "thinking…" says it failed, the user gets our error privately,
    nothing is queued. Cancel defers privately: its "thinking…" becomes our error."""
    caplog.set_level(logging.INFO)
    h, writer = impatient_harness
    fd = h.fd
    prompt = "a secret lighthouse in fog"
    msg, job_id = await _finished_job(h, prompt)
    waiting = await h.reply_of(await h.imagine("a job still waiting"))
    waiting_id = h.job_id(waiting)
    jobs_before = len(await h.queue.history(fd.channel_id))

    await writer.lock()
    for action in ("continue", "reroll"):
        click = await fd.click_button(msg, f"imagine:{action}:{job_id}")
        await fd.wait_for_response(click)
        assert click.response_type == 5   # public: the reply the job would have had
        await fd.wait_for(lambda: click.followups, 10, "our error, privately")
        (told,) = click.followups
        assert told.ephemeral and "Something went wrong on my side" in told.content
        placeholder = click.original_message
        assert placeholder is not None and not placeholder.deleted and not placeholder.ephemeral
        assert placeholder.content == FAILED_PLACEHOLDER and not placeholder.flags & FLAG_LOADING
        _our_error_logged(caplog, f"the {action} button of job {job_id}")
        _no_secrets_logged(caplog, click, prompt)

    click = await fd.click_button(waiting, f"imagine:cancel:{waiting_id}")
    assert "Something went wrong on my side" in await private_answer(h, click)
    _our_error_logged(caplog, f"the cancel button of job {waiting_id}")
    await writer.unlock()

    assert len(await h.queue.history(fd.channel_id)) == jobs_before
    assert (await h.queue.get(waiting_id)).state == JobState.QUEUED
    # The store is back: the same button works.
    click = await fd.click_button(msg, f"imagine:continue:{job_id}")
    await fd.wait_for_response(click)
    continued = await h.queue.get(h.job_id(await h.reply_of(click)))
    assert continued.spec.parent_job_id == job_id
    fd.assert_clean()


async def test_a_button_whose_job_cannot_be_read_answers_with_our_error(impatient_harness, caplog):
    """A job's row that the store cannot read (here its stored reply is not JSON: written by hand,
    or by another version): every button fails before answering, and answers our error privately
    at once; the Remix button opens no form."""
    h, writer = impatient_harness
    fd = h.fd
    msg, job_id = await _finished_job(h, "a red house")
    await writer.lock()
    await asyncio.to_thread(writer.conn.execute, "UPDATE jobs SET reply = '{not json' WHERE id = ?", (job_id,))
    await asyncio.to_thread(writer.conn.execute, "COMMIT")

    for action in ("reroll", "continue", "remix"):
        click = await fd.click_button(msg, f"imagine:{action}:{job_id}")
        assert "Something went wrong on my side" in await private_answer(h, click)
        assert click.response_type == 4, action
        _our_error_logged(caplog, f"the {action} button of job {job_id}")
    assert await h.queue.count_queued() == 0
    fd.assert_clean()


# --- a store outage is said once, not every second ---------------------------------------------------

async def _until(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


async def test_reading_events_in_a_store_outage_logs_one_traceback_then_its_end(patient_harness, caplog, monkeypatch):
    """The store refuses every read of the event log (a full disk, Redis MISCONF): the bot's event
    reader retries every second, and logs the first failure with its traceback, not each one, and
    a line once reads work again."""
    h, _ = patient_harness
    caplog.set_level(logging.INFO, logger="bot.progress")
    refused = 0

    async def refusing_events(*args, **kwargs):
        nonlocal refused
        refused += 1
        raise sqlite3.OperationalError("database or disk is full")

    with monkeypatch.context() as patched:
        patched.setattr(h.queue, "events", refusing_events)
        await _until(lambda: refused >= 4, 15, "four failed reads")
    await _until(lambda: "reads of queue events work again" in caplog.text, 10, "the end of the outage")
    said = [r for r in caplog.records if r.name == "bot.progress" and "events" in r.getMessage()
            and r.levelno >= logging.WARNING]
    assert len([r for r in said if r.exc_info]) == 1, [r.getMessage() for r in said]
    assert len(said) == 2, [r.getMessage() for r in said]   # the first failure, and its end


async def test_a_failed_job_is_logged_with_its_reason_on_one_line(patient_harness, caplog):
    """The bot's "job X failed" line says why (the record's error: one line, at most ~200
    characters); a prompt's rejection, which quotes the prompt, is not logged."""
    h, _ = patient_harness
    caplog.set_level(logging.INFO, logger="bot.progress")
    jobs = [h.job_id(await h.reply_of(await h.imagine(prompt))) for prompt in ("a red house", "a blue house")]
    await claim_jobs(h.queue, jobs)
    reasons = ["OSError: the disk\nis full " + "x" * 300, "the weight of 'a blue house' must be a number"]
    for job_id, reason in zip(jobs, reasons):
        record = await h.queue.get(job_id)
        assert await h.queue.fail(job_id, record.lease_id, reason, retry=False) == JobState.FAILED
    lines = {}
    for job_id in jobs:
        await _until(lambda: any(r.getMessage().startswith(f"job {job_id} failed") for r in caplog.records),
                     10, f"the log line of {job_id}'s failure")
        lines[job_id] = next(r.getMessage() for r in caplog.records if r.getMessage().startswith(f"job {job_id} failed"))
    first = lines[jobs[0]]
    assert first.startswith(f"job {jobs[0]} failed: OSError: the disk is full xxx"), first
    assert "\n" not in first and len(first) <= len(f"job {jobs[0]} failed: ") + 200, first
    assert "a blue house" not in lines[jobs[1]] and lines[jobs[1]].startswith(f"job {jobs[1]} failed: "), lines[jobs[1]]
