"""A channel or thread deleted under the bot's jobs (QueueCog.on_guild_channel_delete,
on_raw_thread_delete).

Before, the bot did nothing: the deleted channel's waiting jobs stayed in line (counting against
their authors' cap in every server, then running on the GPU for nothing), its running ones ran to
the end, and each result's post then failed. Now its waiting jobs are cancelled and its running
ones asked to stop, with the reason render.CANCEL_CHANNEL_GONE; the progress cog marks them
delivered without trying a post there (nowhere to post) and drops their trackers.
A job of another channel of the same server is untouched; a deleted category has no jobs.

The fake Discord deletes the channel (CHANNEL_DELETE / THREAD_DELETE over the gateway, then 404 /
10003 for anything sent there); the real SQLite queue; the test plays the GPU.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from bot import render
from engine.jobs import JobState
from tests.test_bot_admin_reach import _log_line
from tests.test_bot_support import claim_jobs, ephemeral_answer, harness  # noqa: F401 - the fixture

pytestmark = pytest.mark.asyncio

GONE = render.CANCEL_CHANNEL_GONE


async def _queue(h, prompt, channel_id):
    """A job queued by /imagine in `channel_id` (Bob's); its interaction and id."""
    inter = await h.fd.send_slash_command("imagine", {"prompt": prompt}, channel_id=channel_id)
    await h.fd.wait_for_response(inter)
    return inter, h.job_id(await h.reply_of(inter))


def _addressed_to(fd, channel_id, interactions, since):
    """The bot's requests since `since` to channel `channel_id` or through these interactions' tokens."""
    tokens = [inter.token for inter in interactions]
    return [r for r in fd.requests[since:]
            if r.path.startswith(f"/channels/{channel_id}/") or any(f"/{t}/" in r.path for t in tokens)]


async def _given_up(h, job_ids):
    """Once these jobs are delivered (given up) and the progress cog follows none of them."""
    for job_id in job_ids:
        await h.wait_delivered(job_id, timeout=15)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while any(job_id in h.bot.progress.trackers for job_id in job_ids):
        assert loop.time() < deadline, "the progress cog still follows a job of the deleted channel"
        await asyncio.sleep(0.05)


async def _nothing_more_sent(h, channel_id, interactions):
    """The bot sends nothing more to the deleted channel (nor through its commands' tokens): no
    retry loop. Everything it sent there since the deletion was refused with a 404."""
    since = len(h.fd.requests)
    await asyncio.sleep(2.0)   # past several of the send loop's backoffs
    assert _addressed_to(h.fd, channel_id, interactions, since) == []


async def _started_with_a_thread(h, caplog):
    """The bot started, #general with a public thread of Bob's: (the harness, the fake, the thread's id)."""
    caplog.set_level(logging.INFO, logger="bot.queue_admin")
    fd = h.fd
    thread = fd.add_thread("renders", fd.channel_id, owner_id=int(fd.member_user["id"]), private=False)
    await h.start(worker=False)
    return h, fd, thread


async def test_deleting_a_channel_cancels_its_waiting_and_running_jobs(harness, caplog):
    """#general is deleted with Bob's running job and waiting job in it, and his waiting job in
    #imagine: the waiting one ends CANCELLED at once, the running one is asked to stop and ends
    CANCELLED when its worker sees it; both with the reason, both delivered without a post, no
    more requests. The one in #imagine still waits; Bob's cap counts it alone; the bot
    answers commands."""
    caplog.set_level(logging.INFO, logger="bot.queue_admin")
    h = harness
    h.config.progress.message_interval = 0.01
    await h.start(worker=False)
    fd = h.fd
    general = fd.channel_id
    running_inter, running = await _queue(h, "a lighthouse at dusk", general)
    await claim_jobs(h.queue, [running])
    lease = (await h.queue.get(running)).lease_id
    waiting_inter, waiting = await _queue(h, "a harbour at dawn", general)
    _, elsewhere = await _queue(h, "a field of poppies", fd.other_channel_id)

    await fd.delete_channel(general)
    since = len(fd.requests)   # from here on the fake answers 404 for anything sent there
    line = await _log_line(caplog, rf"channel {general} was deleted")
    assert line == f"channel {general} was deleted: 1 waiting jobs cancelled, 1 running jobs asked to stop"
    record = await h.queue.get(waiting)
    assert (record.state, record.error) == (JobState.CANCELLED, GONE)
    record = await h.queue.get(running)
    assert (record.state, record.cancel_requested, record.error) == (JobState.RUNNING, True, GONE)
    assert not await h.queue.heartbeat(running, lease)   # the worker is told to stop...
    await h.queue.mark_cancelled(running, lease)         # ...and does
    assert (await h.queue.get(running)).error == GONE

    await _given_up(h, [waiting, running])
    assert (await h.queue.get(elsewhere)).state == JobState.QUEUED
    assert await h.queue.count_queued(int(fd.member_user["id"])) == 1
    sent = _addressed_to(fd, general, [running_inter, waiting_inter], since)
    # No result is tried there (it was a 404 and an error logged for each job): delivered as they
    # are. An edit of a reply already on its way may still meet the 404.
    assert all(r.status == 404 for r in sent), [(r.method, r.path, r.status) for r in sent]
    assert [r for r in sent if r.method == "POST"] == []
    await _nothing_more_sent(h, general, [running_inter, waiting_inter])
    text = await ephemeral_answer(h, "queue show", channel_id=fd.other_channel_id)
    assert elsewhere in text and waiting not in text and running not in text
    fd.assert_clean()


async def test_deleting_a_thread_cancels_its_jobs_and_not_its_channels(harness, caplog):
    """A thread of #general is deleted (THREAD_DELETE) with a waiting job in it: that job is
    cancelled and given up; the job in #general itself still waits."""
    h, fd, thread = await _started_with_a_thread(harness, caplog)
    in_thread_inter, in_thread = await _queue(h, "a moth in the lamplight", thread)
    _, in_channel = await _queue(h, "a moth on the window", fd.channel_id)

    await fd.delete_channel(thread)
    line = await _log_line(caplog, rf"thread {thread} was deleted")
    assert line == f"thread {thread} was deleted: 1 waiting jobs cancelled, 0 running jobs asked to stop"
    record = await h.queue.get(in_thread)
    assert (record.state, record.error) == (JobState.CANCELLED, GONE)
    await _given_up(h, [in_thread])
    assert (await h.queue.get(in_channel)).state == JobState.QUEUED
    await _nothing_more_sent(h, thread, [in_thread_inter])
    fd.assert_clean()


async def test_a_thread_the_bot_had_not_cached_is_seen_deleted_too(harness, caplog):
    """An archived thread is out of discord.py's cache: its THREAD_DELETE comes raw, with no
    thread object. Its waiting job is cancelled all the same."""
    h, fd, thread = await _started_with_a_thread(harness, caplog)
    _, job = await _queue(h, "a moth asleep", thread)
    await fd.archive_thread(thread)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while h.bot.get_guild(fd.guild_id).get_thread(thread) is not None:   # THREAD_UPDATE handled
        assert loop.time() < deadline
        await asyncio.sleep(0.02)

    await fd.delete_channel(thread)
    await _log_line(caplog, rf"thread {thread} was deleted: 1 waiting jobs cancelled")
    assert (await h.queue.get(job)).state == JobState.CANCELLED


async def test_deleting_a_channel_cancels_the_jobs_of_its_threads(harness, caplog):
    """#general is deleted while a thread of it has a waiting job: the thread goes with it (Discord
    sends no THREAD_DELETE for it; discord.py reports its cached threads), so that job is
    cancelled too."""
    h, fd, thread = await _started_with_a_thread(harness, caplog)
    _, in_thread = await _queue(h, "a heron in the reeds", thread)
    _, in_channel = await _queue(h, "a heron in flight", fd.channel_id)

    await fd.delete_channel(fd.channel_id)
    await _log_line(caplog, rf"channel {fd.channel_id} was deleted: 1 waiting jobs cancelled")
    await _log_line(caplog, rf"thread {thread} was deleted: 1 waiting jobs cancelled")
    assert [(await h.queue.get(j)).state for j in (in_thread, in_channel)] == [JobState.CANCELLED] * 2
    await _given_up(h, [in_thread, in_channel])


async def test_a_deleted_category_cancels_nothing(harness, caplog):
    """The category of #general and #imagine is deleted: its channels stay (uncategorised), and so
    do their jobs; no line is logged for it."""
    caplog.set_level(logging.INFO, logger="bot.queue_admin")
    h = harness
    fd = h.fd
    extra = fd.add_channel("scratch")
    await h.start(worker=False)
    _, job = await _queue(h, "a quiet street", fd.channel_id)
    _, marker = await _queue(h, "a marker job", extra)

    await fd.delete_channel(fd.category_id)
    # Events are handled in order: once the next deletion's line is logged, the category's was handled.
    await fd.delete_channel(extra)
    await _log_line(caplog, rf"channel {extra} was deleted: 1 waiting jobs cancelled")
    assert (await h.queue.get(job)).state == JobState.QUEUED
    assert (await h.queue.get(marker)).state == JobState.CANCELLED
    assert not [r for r in caplog.records if str(fd.category_id) in r.getMessage()]
    assert h.bot.get_channel(fd.channel_id).category is None


async def test_a_store_error_is_logged_and_the_bot_stays_up(harness, caplog, monkeypatch):
    """The store fails while the deleted channel's jobs are looked up: a warning says so, nothing
    is cancelled (their authors can still cancel them), and the bot goes on answering."""
    caplog.set_level(logging.INFO, logger="bot.queue_admin")
    h = harness
    await h.start(worker=False)
    fd = h.fd
    _, job = await _queue(h, "a storm over the sea", fd.channel_id)

    async def failing_queued():
        raise OSError("disk I/O error")
    monkeypatch.setattr(h.queue, "queued", failing_queued)
    await fd.delete_channel(fd.channel_id)
    line = await _log_line(caplog, rf"channel {fd.channel_id} was deleted")
    assert line == f"channel {fd.channel_id} was deleted, but its jobs could not be cancelled"
    monkeypatch.undo()
    assert (await h.queue.get(job)).state == JobState.QUEUED
    text = await ephemeral_answer(h, "queue cancel", {"job": job}, channel_id=fd.other_channel_id)
    assert text == f"Cancelled job `{job}`."
