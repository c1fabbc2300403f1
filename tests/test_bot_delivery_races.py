"""The final post against races and retries: exactly one result, and nothing drawn over it.

- A round of the line that read the queue before a job was cancelled and delivered must not make
  it a new tracker and draw it "Queued" over its final post.
- A store write (set_reply, mark_delivered) that fails after the result went out as a new message
  (the reply deleted, its thread archived) is retried alone: the result is not posted again. A
  restart in that window finds the result's message (`result_message_id`) and does not edit the
  original reply into a second result.
- A job back in line after a run (released by its worker) shows its place again, not the frozen
  last frame and ETA of the run that stopped.
- A final post without files (the text alone after two 413s) leaves no frame.png on the message.
- A retry of the final post does not re-encode the video again.

All over the fake Discord (real HTTP), with the real SQLite queue; the test plays the GPU.
"""

from __future__ import annotations

import asyncio

import pytest

from bot import progress
from engine.jobs import JobState
from engine.queue import open_queue
from tests.test_bot_support import (WEBHOOK_ORIGINAL, claim_jobs, finish_jobs, harness,  # noqa: F401 - the fixture
                                    publish_frames, queued_job_in_a_thread, requests_matching)

pytestmark = pytest.mark.asyncio

CHANNEL_POST = r"/channels/{}/messages"


async def _until(predicate, timeout=10.0, what="a condition"):
    """Until `predicate()` (a state of the bot, not of the fake: fd.wait_for wakes on requests only)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


async def _queued_job(h, prompt):
    """A job queued by /imagine (no worker: the test plays it); its reply and id."""
    await h.start(worker=False)
    inter = await h.imagine(prompt)
    msg = await h.reply_of(inter)
    return msg, h.job_id(msg)


async def _job_showing_its_last_frame(h, prompt):
    """A job claimed and run to its last frame (iteration 2 of 2), which its reply shows with
    frame.png; its reply and id."""
    msg, job_id = await _queued_job(h, prompt)
    fd = h.fd
    await claim_jobs(h.queue, [job_id])
    await publish_frames(h.queue, [job_id], frames=3, every=0.05)
    await fd.wait_for(lambda: "Iteration 2/2" in fd.messages[msg.id].content
                      and [a["filename"] for a in fd.messages[msg.id].attachments] == ["frame.png"], 10,
                      "the last frame")
    return msg, job_id


async def _job_starting_in_an_archived_thread(h, prompt):
    """A job queued by /imagine in a thread (its token expired), claimed and shown starting; then
    its thread archives itself: (its reply, its id, the thread's id, the fake's request count then)."""
    h.config.progress.message_interval = 0.01
    msg, job_id = await queued_job_in_a_thread(h, prompt)
    fd = h.fd
    await claim_jobs(h.queue, [job_id])
    await fd.wait_for(lambda: "Starting" in fd.messages[msg.id].content, 10, "the starting edit")
    await fd.archive_thread(msg.channel_id)
    return msg, job_id, msg.channel_id, len(fd.requests)


async def test_a_stale_line_snapshot_does_not_bring_back_a_delivered_job(harness):
    """The line's round reads the line, then awaits the store once per server; meanwhile the job is
    cancelled, its "Cancelled." post goes out and its tracker is dropped. The round then reaches
    the job's stale entry. Before: a new tracker was made from it (it leaked) and the reply was
    edited to "Queued: next in line." for good, over the final post."""
    h = harness
    h.config.progress.message_interval = 0.01
    msg, job_id = await _queued_job(h, "cancelled behind a stale snapshot")
    fd = h.fd
    cog = h.bot.progress
    for _ in range(500):   # the command writes the reply's id (set_reply) just after showing it
        snapshot = await h.queue.queued()
        if snapshot and (snapshot[0].spec.reply or {}).get("message_id"):
            break
        await asyncio.sleep(0.02)
    assert [(r.id, r.spec.reply["message_id"]) for r in snapshot] == [(job_id, msg.id)]

    assert await h.queue.cancel(job_id)
    record = await h.wait_delivered(job_id, timeout=10)
    assert record.state == JobState.CANCELLED
    await fd.wait_for(lambda: "Cancelled." in fd.messages[msg.id].content, 10, "the cancelled reply")
    await _until(lambda: job_id not in cog.trackers, 10, "the delivered job's tracker dropped")

    rounds = []

    async def stale_line():
        rounds.append(1)
        return [r.id for r in snapshot]

    real_line = h.queue.line
    h.queue.line = stale_line
    try:
        since = len(fd.requests)
        cog.line_changed()
        await _until(lambda: len(rounds) >= 1, 10, "a round of the line on the stale snapshot")
        cog.line_changed()   # the loop is sequential: a second round means the first one is over
        await _until(lambda: len(rounds) >= 2, 10, "a second round of the line")
    finally:
        h.queue.line = real_line
    assert job_id not in cog.trackers
    await asyncio.sleep(0.3)   # an edit kicked by that round would have gone out by now
    assert "Cancelled." in fd.messages[msg.id].content
    assert not [r for r in fd.requests[since:] if r.method == "PATCH"], fd.requests[since:]
    fd.assert_clean()


async def test_a_store_failure_after_a_new_message_does_not_post_the_result_again(harness, monkeypatch):
    """The reply was deleted, so the result goes out as a new message; then set_reply fails once,
    and on the retry mark_delivered fails once. Each retry repeats only the store writes. Before:
    each went through the new message again, three results in the channel."""
    h = harness
    h.config.progress.message_interval = 0.01
    msg, job_id = await _queued_job(h, "a store that hiccups after the post")
    fd = h.fd
    await claim_jobs(h.queue, [job_id])
    await fd.wait_for(lambda: "Starting" in fd.messages[msg.id].content, 10, "the starting edit")
    await fd.delete_message(msg.channel_id, msg.id)
    since = len(fd.requests)

    failed = {"set_reply": 0, "mark_delivered": 0}
    real_set_reply, real_mark_delivered = h.queue.set_reply, h.queue.mark_delivered

    async def set_reply(jid, reply):
        if jid == job_id and "result_message_id" in reply and not failed["set_reply"]:
            failed["set_reply"] += 1
            raise RuntimeError("the store is down (set_reply)")
        return await real_set_reply(jid, reply)

    async def mark_delivered(jid):
        if jid == job_id and not failed["mark_delivered"]:
            failed["mark_delivered"] += 1
            raise RuntimeError("the store is down (mark_delivered)")
        return await real_mark_delivered(jid)

    monkeypatch.setattr(h.queue, "set_reply", set_reply)
    monkeypatch.setattr(h.queue, "mark_delivered", mark_delivered)
    await finish_jobs(h.queue, [job_id])
    record = await h.wait_delivered(job_id, timeout=20)
    assert failed == {"set_reply": 1, "mark_delivered": 1}

    posts = requests_matching(fd, "POST", CHANNEL_POST.format(msg.channel_id), since)
    assert [r.status for r in posts] == [200], posts
    assert len(h.posts_of_job(job_id)) == 1
    result = fd.messages[int(posts[0].response["id"])]
    assert {a["filename"] for a in result.attachments} == {"final.png", "video.mp4"}
    assert record.spec.reply["result_message_id"] == result.id
    assert job_id not in h.bot.progress.trackers


async def test_a_restart_before_mark_delivered_does_not_edit_the_original_into_a_second_result(harness, monkeypatch):
    """The job waited in a thread that archived itself: its result went out as a new message M2
    (which unarchived the thread) and `result_message_id` = M2 was written, but the bot stopped
    before mark_delivered. The restarted bot finds M2 and only marks the job delivered. Before: it
    read only the reply's message_id and edited the original M1 (editable again) into a second
    result."""
    h = harness
    msg, job_id, thread_id, since = await _job_starting_in_an_archived_thread(h, "a crash between the post and the store")
    fd = h.fd

    async def mark_delivered(jid):
        raise RuntimeError("the bot dies before marking it delivered")

    monkeypatch.setattr(h.queue, "mark_delivered", mark_delivered)
    await finish_jobs(h.queue, [job_id])
    posts = await fd.wait_for(lambda: requests_matching(fd, "POST", CHANNEL_POST.format(thread_id), since), 10,
                              "the result as a new message")
    result_id = int(posts[0].response["id"])

    async def reply_written():
        for _ in range(500):
            record = await h.queue.get(job_id)
            if (record.spec.reply or {}).get("result_message_id"):
                return record
            await asyncio.sleep(0.02)
        raise TimeoutError("result_message_id was not written")

    record = await reply_written()
    assert record.spec.reply["result_message_id"] == result_id and not record.delivered
    assert not fd.thread_archived(thread_id)   # the new message unarchived it
    await h.stop()

    await h.start(worker=False)   # a fresh queue object: mark_delivered works again
    await h.wait_delivered(job_id, timeout=20)
    await _until(lambda: job_id not in h.bot.progress.trackers, 10, "the tracker dropped")
    assert [r.status for r in requests_matching(fd, "POST", CHANNEL_POST.format(thread_id), since)] == [200]
    assert h.final_edits(msg.id) == []   # the original reply was not made a second result
    assert "final.png" not in {a["filename"] for a in fd.messages[msg.id].attachments}
    assert len(h.posts_of_job(job_id)) == 1
    assert (await h.queue.get(job_id)).spec.reply["result_message_id"] == result_id


async def test_a_job_handed_back_while_the_bot_was_down_drops_its_stale_frame(harness):
    """The bot stops while its reply shows a run's last frame; meanwhile the job is handed back to
    the line (its worker stopped gracefully). The restarted bot knows nothing of what the reply
    shows, and a job back in line draws no frame: before, its place in line was drawn over the
    stopped run's frame.png, which stayed until the job ran again."""
    h = harness
    h.config.progress.message_interval = 0.01
    msg, job_id = await _job_showing_its_last_frame(h, "a worker that stops while the bot is down")
    fd = h.fd
    lease = (await h.queue.get(job_id)).lease_id
    await h.stop()
    async with open_queue(h.config.queue.url) as queue:   # the worker's own connection, say
        assert await queue.release(job_id, lease)
    await h.start(worker=False)
    await fd.wait_for(lambda: "next in line" in fd.messages[msg.id].content, 10, "its place in line again")
    assert fd.messages[msg.id].attachments == []


async def test_a_requeued_job_shows_its_place_in_line_again(harness):
    """A worker releases the job it ran (a graceful stop): it is back at the front of the line
    (QUEUED). Its reply shows its place again, without the last frame and ETA of the stopped run.
    Before: QUEUED events were ignored and the reply kept its frozen frame until the job restarted."""
    h = harness
    h.config.progress.message_interval = 0.01
    msg, job_id = await _job_showing_its_last_frame(h, "a worker that stops mid-run")
    fd = h.fd

    lease = (await h.queue.get(job_id)).lease_id
    assert await h.queue.release(job_id, lease)
    await fd.wait_for(lambda: "next in line" in fd.messages[msg.id].content, 10, "its place in line again")
    shown = fd.messages[msg.id]
    assert "Iteration" not in shown.content and "left" not in shown.content
    assert shown.attachments == []   # the stopped run's frame went with it

    await claim_jobs(h.queue, [job_id])   # and it runs again as before
    await publish_frames(h.queue, [job_id], frames=2, every=0.05)
    await fd.wait_for(lambda: "Iteration 1/1" in fd.messages[msg.id].content, 10, "a frame of the new run")
    await finish_jobs(h.queue, [job_id])
    await h.wait_delivered(job_id, timeout=20)
    await fd.wait_for(lambda: f"imagine:reroll:{job_id}" in fd.messages[msg.id].custom_ids, 10, "the result")
    fd.assert_clean()


async def test_a_final_post_without_files_removes_the_last_frame(harness):
    """Discord refuses the final post as too large twice (413: the server lost its boosts), so the
    result goes out as the text alone. Before: that edit sent no attachments, and the last
    progress frame stayed under the final text."""
    h = harness
    h.config.progress.message_interval = 0.01
    msg, job_id = await _job_showing_its_last_frame(h, "a result too large twice")
    fd = h.fd
    rule = fd.inject_error("PATCH", WEBHOOK_ORIGINAL, 413, body={"message": "Request entity too large",
                                                                 "code": 40005}, count=2)
    await finish_jobs(h.queue, [job_id])
    await h.wait_delivered(job_id, timeout=20)
    assert rule.remaining == 0
    final = fd.messages[msg.id]
    assert "could not be posted" in final.content
    assert final.attachments == []
    assert f"imagine:reroll:{job_id}" in final.custom_ids
    fd.assert_clean()


async def test_a_retry_of_the_final_post_does_not_reencode_the_video_again(harness, monkeypatch):
    """The video is over the upload limit, so it is re-encoded to fit; the final edit (through the
    channel: the token has expired) then answers 503 and is retried. The retry posts the video made the first time. Before: ffmpeg ran again
    at every retry."""
    h = harness
    h.config.progress.message_interval = 0.01
    msg, job_id = await _queued_job(h, "a video re-encoded once")
    fd = h.fd
    made = []

    async def reencode_to_fit(data, max_bytes):
        made.append(max_bytes)
        return b"\x00\x00\x00\x08ftyp"[:max_bytes]

    monkeypatch.setattr(progress, "_reencode_to_fit", reencode_to_fit)
    # Room for 8 bytes a file (the limit is per file; FILE_MARGIN under it): the 76-byte video does not fit.
    h.bot.progress.trackers[job_id].upload_limit = progress.FILE_MARGIN + 8
    # Through the channel: discord.py retries a webhook's (the token's) 5xx itself, unseen by the bot.
    fd.expire_tokens()
    await claim_jobs(h.queue, [job_id])
    await fd.wait_for(lambda: "Starting" in fd.messages[msg.id].content, 10, "the starting edit")
    rule = fd.inject_error("PATCH", f"/channels/{msg.channel_id}/messages/{msg.id}", 503,
                           body={"message": "Service Unavailable", "code": 0})
    await finish_jobs(h.queue, [job_id])
    await h.wait_delivered(job_id, timeout=20)
    assert rule.remaining == 0
    assert made == [8]
    final = fd.messages[msg.id]
    assert {a["filename"] for a in final.attachments} == {"final.png", "video.mp4"}
    assert "re-encoded" in final.content


async def test_nonces_fit_discord_limit():
    """Discord takes nonces of at most 25 characters; the lost notice's and the result's differ."""
    job_id = "0123456789ab"
    assert progress._nonce("imagine-", job_id) == f"imagine-{job_id}"
    assert len(progress._nonce("imagine-lost-", job_id)) <= progress.NONCE_MAX
    longer = "f" * 32
    a, b = progress._nonce("imagine-", longer), progress._nonce("imagine-lost-", longer)
    assert len(a) <= 25 and len(b) <= 25 and a != b


@pytest.mark.parametrize("nonce_kept", [True, False], ids=["within-the-nonce-window", "after-it"])
async def test_a_restart_between_a_new_message_and_its_write_posts_no_second_result(harness, monkeypatch, nonce_kept):
    """The job waited in a thread that archived itself: its result went out as a new message M2
    (which unarchived the thread), and the bot stopped before it could write M2's id. The reply
    was marked `reposting` before that post, so the restarted bot never edits the original reply
    M1 (editable again) into a second result, as it did before. It finds M2 among the thread's
    messages since the mark; within Discord's nonce window a post with the same nonce would
    return M2 too, but after it (a restart minutes later) that post made a second result."""
    h = harness
    msg, job_id, thread_id, since = await _job_starting_in_an_archived_thread(h, "a crash between the post and its write")
    fd = h.fd
    real_set_reply = h.queue.set_reply

    async def set_reply(jid, reply):
        if "result_message_id" in reply:
            raise RuntimeError("the bot dies before writing the result's id")
        return await real_set_reply(jid, reply)

    monkeypatch.setattr(h.queue, "set_reply", set_reply)
    await finish_jobs(h.queue, [job_id])
    posts = await fd.wait_for(lambda: requests_matching(fd, "POST", CHANNEL_POST.format(thread_id), since), 10,
                              "the result as a new message")
    result_id = int(posts[0].response["id"])
    assert (await h.queue.get(job_id)).spec.reply.get("reposting") is True
    assert not fd.thread_archived(thread_id)   # the new message unarchived it: M1 is editable again
    await h.stop()
    if not nonce_kept:
        fd.nonce_window = 0.0   # Discord has forgotten the nonce

    await h.start(worker=False)   # a fresh queue object: set_reply works again
    record = await h.wait_delivered(job_id, timeout=20)
    assert record.spec.reply["result_message_id"] == result_id
    posts = requests_matching(fd, "POST", CHANNEL_POST.format(thread_id), since)
    assert [(r.status, int(r.response["id"])) for r in posts] == [(200, result_id)]
    assert requests_matching(fd, "GET", CHANNEL_POST.format(thread_id), since)   # it looked
    assert h.final_edits(msg.id) == []   # the original reply was not made a second result
    assert "final.png" not in {a["filename"] for a in fd.messages[msg.id].attachments}
    assert {int(r.response["id"]) for r in h.posts_of_job(job_id)} == {result_id}
    fd.assert_clean()


async def test_a_reply_whose_first_write_failed_is_written_again_and_found_after_a_restart(harness, monkeypatch):
    """Writing the reply's id to the store fails once as /imagine makes it (a store hiccup). The
    user still sees the job queued, the progress cog writes the reply again, and after a restart
    the result is an edit of that reply. Before: the command ended with the error, and after a
    restart the reply stayed at "Queued" with a live Cancel button while the result went out as
    a new message."""
    h = harness
    h.config.progress.message_interval = 0.01
    await h.start(worker=False)
    failed = []
    real_set_reply = h.queue.set_reply

    async def set_reply(jid, reply):
        if not failed:
            failed.append(jid)
            raise RuntimeError("the store hiccups (set_reply)")
        return await real_set_reply(jid, reply)

    monkeypatch.setattr(h.queue, "set_reply", set_reply)
    inter = await h.imagine("a reply written late")
    msg = await h.reply_of(inter)
    job_id = h.job_id(msg)
    for _ in range(500):
        record = await h.queue.get(job_id)
        if (record.spec.reply or {}).get("message_id"):
            break
        await asyncio.sleep(0.02)
    assert failed == [job_id]
    assert record.spec.reply["message_id"] == msg.id
    assert "Queued" in h.fd.messages[msg.id].content
    await h.stop()

    fd = h.fd
    await h.start(worker=False)
    since = len(fd.requests)
    await claim_jobs(h.queue, [job_id])
    await finish_jobs(h.queue, [job_id])
    await h.wait_delivered(job_id, timeout=20)
    assert len(h.final_edits(msg.id)) == 1   # the reply became the result
    assert requests_matching(fd, "POST", CHANNEL_POST.format(msg.channel_id), since) == []
    assert f"imagine:reroll:{job_id}" in fd.messages[msg.id].custom_ids
    fd.assert_clean()


async def test_a_backlog_of_results_is_read_a_few_at_a_time(harness, monkeypatch):
    """Eight jobs finish at once in one channel, whose turns come one at a time: at most
    FINALS_AT_ONCE of them hold their files in memory (read, not yet posted) at a time, and all
    are posted once. Before: all eight read their image and video at once and waited for the
    channel's turns with them (a backlog after downtime: every result in memory together)."""
    h = harness
    h.config.progress.message_interval = 0.01
    h.config.progress.channel_interval = 0.1
    h.config.queue.max_queued_per_user = 10
    await h.start(worker=False)
    job_ids = []
    for i in range(8):
        job_ids.append(h.job_id(await h.reply_of(await h.imagine(f"backlog {i}"))))
    active, most = [0], [0]
    real_prepare, real_post = progress.ProgressCog._prepare_final, progress.ProgressCog._post_final

    async def prepare(self, t):
        final = await real_prepare(self, t)
        if final is not None and final.files:
            active[0] += 1
            most[0] = max(most[0], active[0])
        return final

    async def post(self, t, final):
        try:
            await real_post(self, t, final)
        finally:
            if final.files:
                active[0] -= 1

    monkeypatch.setattr(progress.ProgressCog, "_prepare_final", prepare)
    monkeypatch.setattr(progress.ProgressCog, "_post_final", post)
    await claim_jobs(h.queue, job_ids)
    await finish_jobs(h.queue, job_ids)
    for job_id in job_ids:
        await h.wait_delivered(job_id, timeout=30)
    assert 1 < most[0] <= progress.FINALS_AT_ONCE, most
    assert [len(h.posts_of_job(j)) for j in job_ids] == [1] * 8
    h.fd.assert_clean()


async def test_a_reply_written_late_still_gets_its_reposting_mark(harness, monkeypatch):
    """The reply's first write failed; the reconcile pass's second write is slow and lands just
    after the final post read the job's record (which has no reply yet). The new message that
    follows (the reply's thread archived) is still preceded by the `reposting` mark, and a restart
    before the result's id is written does not edit the original reply into a second result.
    Before: the landed write cleared what the tracker kept, the mark was skipped (no reply id in
    the stale record), and the restart made two results."""
    h = harness
    h.config.progress.message_interval = 0.01
    h.config.progress.reconcile_interval = 3600   # the one pass attach() asks for, no more
    fd = h.fd
    thread_id = fd.add_thread("renders", fd.channel_id, owner_id=int(fd.member_user["id"]), private=False)
    await h.start(worker=False)
    real_set_reply = h.queue.set_reply
    calls, gate, entered, saved = [], asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def set_reply(jid, reply):
        calls.append(dict(reply))
        if len(calls) == 1:
            raise RuntimeError("the store hiccups as the reply is made")
        if "result_message_id" in reply:
            raise RuntimeError("the bot dies before writing the result's id")
        if len(calls) == 2:   # the reconcile pass's write: slow, until the final post has read the record
            entered.set()
            await gate.wait()
            await real_set_reply(jid, reply)
            saved.set()
            return
        return await real_set_reply(jid, reply)

    monkeypatch.setattr(h.queue, "set_reply", set_reply)
    real_prepare = progress.ProgressCog._prepare_final

    async def prepare(self, t):
        final = await real_prepare(self, t)   # the record as read before the slow write landed
        gate.set()
        await asyncio.wait_for(saved.wait(), 10)
        return final

    monkeypatch.setattr(progress.ProgressCog, "_prepare_final", prepare)
    inter = await fd.send_slash_command("imagine", {"prompt": "a reply written late"}, channel_id=thread_id)
    await fd.wait_for_response(inter)
    msg = await h.reply_of(inter)
    job_id = h.job_id(msg)
    await asyncio.wait_for(entered.wait(), 10)
    fd.expire_tokens()
    await claim_jobs(h.queue, [job_id])
    await fd.wait_for(lambda: "Starting" in fd.messages[msg.id].content, 10, "the starting edit")
    await fd.archive_thread(thread_id)
    since = len(fd.requests)
    await finish_jobs(h.queue, [job_id])
    await fd.wait_for(lambda: requests_matching(fd, "POST", CHANNEL_POST.format(thread_id), since), 10,
                      "the result as a new message")
    stored = (await h.queue.get(job_id)).spec.reply
    assert stored.get("reposting") is True and stored["message_id"] == msg.id, stored
    await h.stop()

    await h.start(worker=False)
    await h.wait_delivered(job_id, timeout=20)
    assert h.final_edits(msg.id) == []
    assert len({int(r.response["id"]) for r in h.posts_of_job(job_id)}) == 1
    fd.assert_clean()
