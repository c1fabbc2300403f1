"""The final post when Discord refuses it: refusals (4xx other than 429) end, errors do not.

After the interaction token's TTL the final post is an edit of the channel message with the bot
token. Whatever Discord answers there that no retry can change (the channel or thread deleted:
404 / 10003; a locked archived thread: 400 / 50083 to the edit and to a new message; an upload
over a limit that shrank: 413) must end in a bounded number of requests: the result posted some
other way (a new message, the image without the video) or given up with an error in the log and
the job marked delivered, so that neither the send loop nor a restart's undelivered() tries it for
ever.

Threads archive themselves after 1 h to 7 days without a new message (edits are no activity), so a
job that waited long in a thread finds it archived: the fake refuses edits there (400 / 50083) and
lets a new message unarchive it, as Discord does; a locked thread refuses new messages too unless
the bot has Manage Threads.

All over the fake Discord (real HTTP), with the real SQLite queue; the test plays the GPU.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from bot import progress
from tests.fakediscord import Permission
from tests.test_bot_support import (  # noqa: F401 - the fixture
    claim_jobs, finish_jobs, harness, publish_frames, queued_job_in_a_thread, requests_matching, tiny_png,
)

pytestmark = pytest.mark.asyncio

CHANNEL_EDIT = r"/channels/{}/messages/\d+"
CHANNEL_POST = r"/channels/{}/messages"


async def _queued_job_past_its_token(h, prompt):
    """A job queued by /imagine whose interaction token has since expired (it waited > 14 min)."""
    await h.start(worker=False)
    inter = await h.imagine(prompt)
    msg = await h.reply_of(inter)
    job_id = h.job_id(msg)
    h.fd.expire_tokens()
    return msg, job_id


def _is_final(req) -> bool:
    return any(f.filename == "final.png" for f in req.files)


MP4_HEAD = b"\x00\x00\x00\x18ftypmp42"
MiB = 1024 * 1024


async def _finish_with(queue, job_id: str, png: bytes, video: bytes) -> None:
    """finish_jobs with this image and video (the job claimed)."""
    await queue.put_artifact(job_id, "final.png", png)
    await queue.put_artifact(job_id, "video.mp4", video)
    assert await queue.finish(job_id, (await queue.get(job_id)).lease_id, 0.2)


def _refuse_channel(h, msg, status: int, message: str, code: int) -> int:
    """Every edit and new message in the job's channel answered `status` / `code` from now on;
    returns where the fake Discord's request log stands (the `since` of later counts)."""
    body = {"message": message, "code": code}
    h.fd.inject_error("PATCH", CHANNEL_EDIT.format(msg.channel_id), status, body=body, count=10_000)
    h.fd.inject_error("POST", CHANNEL_POST.format(msg.channel_id), status, body=body, count=10_000)
    return len(h.fd.requests)


async def test_a_deleted_channel_ends_the_final_post_at_once(harness, caplog):
    """The channel (or thread) was deleted while the job ran: the edit answers 404 / 10003 Unknown
    Channel. That is the message gone: the bot tries one new message (404 too), then gives up with
    an error and marks the job delivered. No more requests, and a restart does not try again."""
    h = harness
    h.config.progress.message_interval = 0.01
    msg, job_id = await _queued_job_past_its_token(h, "a channel someone deletes")
    fd = h.fd
    since = _refuse_channel(h, msg, 404, "Unknown Channel", 10003)
    caplog.set_level(logging.INFO, logger="bot.progress")
    await claim_jobs(h.queue, [job_id])
    await finish_jobs(h.queue, [job_id])

    await h.wait_delivered(job_id, timeout=10)
    await asyncio.sleep(2.0)   # past several backoffs: nothing more is sent
    edits = requests_matching(fd, "PATCH", CHANNEL_EDIT.format(msg.channel_id), since)
    # The final post's edit (the "starting" edit has no files), unless that "starting" edit came
    # first, was answered 10003 and so already marked the message gone (a race of the two events).
    assert len([r for r in edits if r.files]) <= 1
    assert len(requests_matching(fd, "POST", CHANNEL_POST.format(msg.channel_id), since)) == 1
    assert f"job {job_id}: cannot post its result in channel {msg.channel_id}" in caplog.text
    assert job_id not in h.bot.progress.trackers

    await h.stop()
    await h.start(worker=False)
    await asyncio.sleep(1.5)   # past reconcile_interval: undelivered() does not name it
    assert len(requests_matching(fd, "PATCH", CHANNEL_EDIT.format(msg.channel_id), since)) == len(edits)
    assert len(requests_matching(fd, "POST", CHANNEL_POST.format(msg.channel_id), since)) == 1


@pytest.mark.parametrize("archived", ["before-frames", "before-result"])
@pytest.mark.parametrize("token_expired", [True, False], ids=["channel-edits", "token-edits"])
async def test_a_result_in_an_archived_thread_is_posted_as_a_new_message(harness, caplog, token_expired, archived):
    """The job waited in a thread until the thread archived itself. Its edits are refused (400 /
    50083) whether they go through the channel (token expired) or the interaction token (a moderator
    archived it early). Archived before its frames: one refused progress edit ends the progress
    edits (not one per frame), and the result goes straight out as a new message. Archived after
    them: the final edit is refused once, and the result goes out as a new message. The new message
    unarchives the thread; the job is delivered, with the video and the buttons, nothing given up.
    Then one edit of the old reply (no files, no buttons) points to the result: no live Cancel
    button, no "Iteration n/m" left on it for good."""
    h = harness
    h.config.progress.message_interval = 0.01
    msg, job_id = await queued_job_in_a_thread(h, "a thread that archives itself", expire_token=token_expired)
    fd = h.fd
    thread_id = msg.channel_id
    caplog.set_level(logging.INFO, logger="bot.progress")
    await claim_jobs(h.queue, [job_id])
    if archived == "before-frames":
        await fd.archive_thread(thread_id)
        since = len(fd.requests)
    await publish_frames(h.queue, [job_id], frames=20, every=0.05)
    if archived == "before-result":
        await fd.wait_for(lambda: "Iteration 19/19" in fd.messages[msg.id].content, 10, "the last frame")
        await fd.archive_thread(thread_id)
        since = len(fd.requests)
    await finish_jobs(h.queue, [job_id])

    record = await h.wait_delivered(job_id, timeout=20)
    await asyncio.sleep(1.0)   # nothing more comes
    edits = [r for r in fd.requests[since:] if r.method == "PATCH" and r.status != 401   # 401: the dead token
             and (r.path.startswith(f"/channels/{thread_id}/") or r.path.startswith("/webhooks/"))]
    # The last: after the result's post, the old reply's pointer to it (no files, no components).
    *edits, pointer = edits
    assert pointer.status == 200 and not pointer.files and pointer.json["components"] == [], pointer.json
    assert all(r.status == 400 and r.response["code"] == 50083 for r in edits), [(r.path, r.status) for r in edits]
    if archived == "before-frames":   # one progress edit (the "starting" one or a frame); the result not tried
        assert len([r for r in edits if not _is_final(r)]) == 1 and len(edits) == 1
    else:
        assert len([r for r in edits if _is_final(r)]) == 1 and len(edits) == 1
    posts = requests_matching(fd, "POST", CHANNEL_POST.format(thread_id), since)
    assert [r.status for r in posts] == [200]
    result = fd.messages[int(posts[0].response["id"])]
    assert {a["filename"] for a in result.attachments} == {"final.png", "video.mp4"}
    assert f"imagine:reroll:{job_id}" in result.custom_ids
    assert record.spec.reply["result_message_id"] == result.id
    assert not fd.thread_archived(thread_id)   # the new message unarchived it
    assert "refused its result" not in caplog.text and job_id not in h.bot.progress.trackers
    assert fd.requests.index(pointer) > fd.requests.index(posts[0])
    old = fd.messages[msg.id]
    assert old.custom_ids == [] and "Iteration" not in old.content and len(old.content) <= 2000
    assert f"https://discord.com/channels/{fd.guild_id}/{thread_id}/{result.id}" in old.content
    assert "final.png" not in {a["filename"] for a in old.attachments}   # not a second result


@pytest.mark.parametrize("manage_threads", [False, True], ids=["plain-bot", "thread-manager"])
async def test_a_locked_archived_thread_refuses_the_result_a_few_times_then_it_is_given_up(harness, caplog,
                                                                                           manage_threads):
    """A locked archived thread refuses new messages too (400 / 50083), unless the bot has Manage
    Threads. One edit is refused; the new message REFUSED_TRIES times, then the result is
    given up (an error naming the job and Discord's answer), the job marked delivered; not one
    request after that. With Manage Threads the new message goes out and unarchives the thread."""
    h = harness
    h.config.progress.message_interval = 0.01
    fd = h.fd
    if manage_threads:
        role = fd.roles[fd.bot_role_id]
        role["permissions"] = str(int(role["permissions"]) | Permission.MANAGE_THREADS)
    msg, job_id = await queued_job_in_a_thread(h, "a thread a moderator locked")
    thread_id = msg.channel_id
    await fd.archive_thread(thread_id, locked=True)
    since = len(fd.requests)
    await claim_jobs(h.queue, [job_id])
    await finish_jobs(h.queue, [job_id])

    await h.wait_delivered(job_id, timeout=20)
    await asyncio.sleep(2.0)
    # One edit refused: the "starting" one (then the result is not tried as an edit) or, if the job
    # finished before that went out, the final one.
    edits = requests_matching(fd, "PATCH", CHANNEL_EDIT.format(thread_id), since)
    # (With Manage Threads, after the post: the old reply's pointer to the result, without buttons.)
    assert [r.status for r in edits] == ([400, 200] if manage_threads else [400])
    posts = requests_matching(fd, "POST", CHANNEL_POST.format(thread_id), since)
    if manage_threads:
        assert [r.status for r in posts] == [200]
        assert fd.messages[msg.id].custom_ids == []
        assert not fd.thread_archived(thread_id)
        assert "refused its result" not in caplog.text
    else:
        assert [r.status for r in posts] == [400] * progress.REFUSED_TRIES
        assert all(r.response["code"] == 50083 for r in posts)
        assert "Discord refused its result 3 times (400, code 50083" in caplog.text and job_id in caplog.text
        assert fd.thread_archived(thread_id)
    assert job_id not in h.bot.progress.trackers


async def test_a_server_error_is_retried_until_it_is_posted(harness):
    """A 503 is not a refusal: the final post is retried (with backoff) past REFUSED_TRIES until
    Discord takes it; the video is on the reply."""
    h = harness
    h.config.progress.message_interval = 0.01
    msg, job_id = await _queued_job_past_its_token(h, "a flaky gateway")
    fd = h.fd
    rule = fd.inject_error("PATCH", CHANNEL_EDIT.format(msg.channel_id), 503,
                           body={"message": "Service Unavailable", "code": 0}, count=getattr(progress, "REFUSED_TRIES", 3) + 1)
    await claim_jobs(h.queue, [job_id])
    await finish_jobs(h.queue, [job_id])
    await h.wait_delivered(job_id, timeout=60)
    assert rule.remaining == 0
    assert len(h.final_edits(msg.id)) == 1
    assert {a["filename"] for a in fd.messages[msg.id].attachments} == {"final.png", "video.mp4"}


async def test_an_upload_over_a_limit_that_shrank_posts_the_image_alone(harness):
    """The job was queued under a 10 MiB limit; the server has since lost its boosts and Discord
    answers the final post 413. The bot posts the final image without the video, saying why,
    rather than uploading the same request for ever. The guild's limit as the bot knows it (10 MiB,
    boost tier 0) is no smaller than the job's, so the video is not fitted to it first."""
    h = harness
    h.config.progress.message_interval = 0.01
    await h.start(worker=False)
    fd = h.fd
    inter = await h.imagine("a server that loses its boosts")
    msg = await h.reply_of(inter)
    job_id = h.job_id(msg)
    # Discord measures each file on its own: the image fits the new limit, the video does not.
    fd.attachment_size_limit = 1024
    since = len(fd.requests)
    await claim_jobs(h.queue, [job_id])
    await _finish_with(h.queue, job_id, tiny_png(9, 9), MP4_HEAD + b"\x00" * 2048)

    await h.wait_delivered(job_id, timeout=20)
    refused = [r for r in fd.requests[since:] if r.status == 413]
    assert len(refused) == 1
    final = fd.messages[msg.id]
    assert [a["filename"] for a in final.attachments] == ["final.png"]
    assert "video is over this server's upload limit" in final.content
    assert f"imagine:reroll:{job_id}" in final.custom_ids


def _guild_update(fd, premium_tier: int) -> dict:
    """The guild's GUILD_UPDATE at boost tier `premium_tier` (discord.py's `filesize_limit` follows
    it): the fake's guild, less what only GUILD_CREATE carries."""
    data = fd.guild_payload()
    for key in ("joined_at", "large", "unavailable", "member_count", "members", "channels", "threads", "presences",
                "voice_states", "stage_instances", "guild_scheduled_events", "soundboard_sounds",
                "embedded_activities", "lazy"):
        data.pop(key, None)
    data["premium_tier"] = premium_tier
    return data


@pytest.mark.parametrize("refused_again", [False, True], ids=["refitted", "refitted-and-refused"])
async def test_a_video_over_the_limit_of_a_server_that_lost_its_boosts_is_fitted_to_its_limit_now(
        harness, monkeypatch, refused_again):
    """The job was queued in a server at boost tier 2 (its command said 50 MiB a file); the server
    lost its boosts (tier 0: 10 MiB) before the result was posted, so Discord answers the post of
    its 10.5 MiB video 413. The bot forgets the limit the job was queued under, fits the video to
    the guild's of now and posts it re-encoded: two attempts, one 413. Before: the 413 posted the
    image alone. Should Discord refuse the refitted post too, the image goes alone: one refit, no
    loop."""
    from tests.test_bot_delivery_races import _until

    h = harness
    h.config.progress.message_interval = 0.01
    fd = h.fd
    smaller = MP4_HEAD + b"\x02" * (8 * MiB)
    made = []

    async def reencode_to_fit(data, max_bytes):
        made.append(max_bytes)
        return smaller

    monkeypatch.setattr(progress, "_reencode_to_fit", reencode_to_fit)
    await h.start(worker=False)
    guild = h.bot.get_guild(fd.guild_id)
    await fd.dispatch("GUILD_UPDATE", _guild_update(fd, 2))
    await _until(lambda: guild.filesize_limit == 50 * MiB, what="boost tier 2")
    fd.attachment_size_limit = 50 * MiB
    inter = await h.imagine("a server that loses its boosts before the result")
    msg = await h.reply_of(inter)
    job_id = h.job_id(msg)
    await fd.dispatch("GUILD_UPDATE", _guild_update(fd, 0))
    # What Discord checks now: the guild's 10 MiB; or less, refusing the refitted video as well.
    fd.attachment_size_limit = 1 * MiB if refused_again else 10 * MiB
    await _until(lambda: guild.filesize_limit == 10 * MiB, what="boost tier 0")
    png, video = tiny_png(9, 9), MP4_HEAD + b"\x01" * (10 * MiB + MiB // 2)
    since = len(fd.requests)
    await claim_jobs(h.queue, [job_id])
    await _finish_with(h.queue, job_id, png, video)

    await h.wait_delivered(job_id, timeout=30)
    attempts = [r.status for r in fd.requests[since:] if _is_final(r)]
    assert made == [10 * MiB - progress.FILE_MARGIN]   # no re-encode before the 413: it fitted 50 MiB
    final = fd.messages[msg.id]
    if refused_again:
        assert attempts == [413, 413, 200]
        assert [fd.attachment_bytes(a) for a in final.attachments] == [png]
        assert "video is over this server's upload limit" in final.content
    else:
        assert attempts == [413, 200]
        assert [fd.attachment_bytes(a) for a in final.attachments] == [png, smaller]
        assert "re-encoded to 8.0 MiB to fit this server's upload limit of 10.0 MiB a file" in final.content
    assert f"imagine:reroll:{job_id}" in final.custom_ids
    fd.assert_clean()


async def test_an_image_and_a_video_that_each_fit_the_limit_are_posted_as_they_are(harness, monkeypatch):
    """Discord checks an app's upload limit per file, not per message (since 2025-04-03): a 1.4 MiB
    final image and a 9 MiB video under a 10 MiB limit go up as they are, 10.4 MiB in one message.
    Before: the bot budgeted the video as what the image left of the limit, so it re-encoded it
    (or, failing that, dropped it with a note calling a 9 MiB video over a 10 MiB limit)."""
    from tests.test_bot_brainstorm import noise_png

    h = harness
    h.config.progress.message_interval = 0.01
    fd = h.fd
    fd.attachment_size_limit = 10 * MiB   # what the command's interaction says, and what Discord checks
    made = []

    async def reencode_to_fit(data, max_bytes):
        made.append(max_bytes)
        return None

    monkeypatch.setattr(progress, "_reencode_to_fit", reencode_to_fit)
    await h.start(worker=False)
    inter = await h.imagine("a big image and a big video")
    msg = await h.reply_of(inter)
    job_id = h.job_id(msg)
    png, video = noise_png(700), MP4_HEAD + b"\x01" * (9 * MiB)
    assert len(png) < fd.attachment_size_limit < len(png) + len(video)
    since = len(fd.requests)
    await claim_jobs(h.queue, [job_id])
    await _finish_with(h.queue, job_id, png, video)

    await h.wait_delivered(job_id, timeout=20)
    assert made == []
    assert [r for r in fd.requests[since:] if r.status == 413] == []
    (edit,) = h.final_edits(msg.id)
    assert {f.filename: f.data for f in edit.files} == {"final.png": png, "video.mp4": video}
    final = fd.messages[msg.id]
    assert [fd.attachment_bytes(a) for a in final.attachments] == [png, video]
    assert "upload limit" not in final.content and "re-encoded" not in final.content
    assert f"imagine:reroll:{job_id}" in final.custom_ids
    fd.assert_clean()


@pytest.mark.parametrize("fits", [True, False], ids=["re-encoded", "left-out"])
async def test_a_video_over_the_limit_on_its_own_is_reencoded_to_the_limit_or_left_out(harness, monkeypatch, fits):
    """A 10.5 MiB video under a 10 MiB limit is over it whatever the image: it is re-encoded to fit
    the limit on its own (less FILE_MARGIN), not what the image leaves of it, and goes up with a
    word saying so; when the re-encode cannot meet that, the image goes alone, and the note names
    the per-file limit without contradicting itself. Before: the re-encode aimed at the limit
    less the image and 64 KiB."""
    h = harness
    h.config.progress.message_interval = 0.01
    fd = h.fd
    fd.attachment_size_limit = 10 * MiB
    smaller = MP4_HEAD + b"\x02" * (8 * MiB)
    made = []

    async def reencode_to_fit(data, max_bytes):
        made.append(max_bytes)
        return smaller if fits else None

    monkeypatch.setattr(progress, "_reencode_to_fit", reencode_to_fit)
    await h.start(worker=False)
    inter = await h.imagine("a video too big on its own")
    msg = await h.reply_of(inter)
    job_id = h.job_id(msg)
    png, video = tiny_png(9, 9), MP4_HEAD + b"\x01" * (10 * MiB + MiB // 2)
    since = len(fd.requests)
    await claim_jobs(h.queue, [job_id])
    await _finish_with(h.queue, job_id, png, video)

    await h.wait_delivered(job_id, timeout=20)
    assert made == [10 * MiB - progress.FILE_MARGIN]
    assert [r for r in fd.requests[since:] if r.status == 413] == []
    final = fd.messages[msg.id]
    if fits:
        assert [fd.attachment_bytes(a) for a in final.attachments] == [png, smaller]
        assert "re-encoded to 8.0 MiB to fit this server's upload limit of 10.0 MiB a file" in final.content
    else:
        assert [fd.attachment_bytes(a) for a in final.attachments] == [png]
        assert ("The video (10.5 MiB) does not fit this server's upload limit of 10.0 MiB a file, even "
                "re-encoded, so here is the final image only") in final.content
    assert f"imagine:reroll:{job_id}" in final.custom_ids
    fd.assert_clean()


async def test_a_video_ffmpeg_cannot_reencode_is_left_out_with_a_note_that_says_so(harness, caplog):
    """A video over the limit that ffmpeg fails to re-encode (here a damaged one; the real ffmpeg
    runs): the image goes alone, and the note says the re-encode failed, not that no smaller
    encode fits. Before: an ffmpeg failure read as "does not fit ... even re-encoded"."""
    h = harness
    h.config.progress.message_interval = 0.01
    fd = h.fd
    fd.attachment_size_limit = 1 * MiB
    await h.start(worker=False)
    msg = await h.reply_of(await h.imagine("a damaged video"))
    job_id = h.job_id(msg)
    png, video = tiny_png(9, 9), MP4_HEAD + b"\x01" * (MiB + MiB // 2)
    await claim_jobs(h.queue, [job_id])
    with caplog.at_level(logging.ERROR, logger="bot.progress"):
        await _finish_with(h.queue, job_id, png, video)
        await h.wait_delivered(job_id, timeout=60)
    final = fd.messages[msg.id]
    assert [fd.attachment_bytes(a) for a in final.attachments] == [png]
    assert ("The video (1.5 MiB) is over this server's upload limit of 1.0 MiB a file, and re-encoding it "
            "smaller failed, so here is the final image only") in final.content
    assert "even re-encoded" not in final.content
    assert "re-encoding the video failed" in caplog.text
    fd.assert_clean()


async def test_a_store_failure_while_giving_up_a_refused_post_is_tried_again(harness, caplog):
    """The final post is refused REFUSED_TRIES times, and marking the job delivered then fails: the
    queue's SQLite file is write-locked by another process past the busy timeout ("database is
    locked"). The send loop does not die with it: it backs off and tries again, and once the lock
    is gone the job is given up and marked delivered."""
    import sqlite3
    from pathlib import Path

    h = harness
    db = Path(h.config.queue.url.removeprefix("sqlite:///"))
    h.config.queue.url = f"sqlite:///{db}?busy_timeout=0.3"
    h.config.progress.message_interval = 0.01
    msg, job_id = await queued_job_in_a_thread(h, "a thread locked while the store is down")
    fd = h.fd
    await fd.archive_thread(msg.channel_id, locked=True)
    since = len(fd.requests)
    caplog.set_level(logging.INFO, logger="bot.progress")
    await claim_jobs(h.queue, [job_id])
    await finish_jobs(h.queue, [job_id])
    # The first refusal, after the reply's `reposting` mark was written (a new message follows it).
    await fd.wait_for(lambda: [r for r in requests_matching(fd, "POST", CHANNEL_POST.format(msg.channel_id), since)
                               if r.status == 400], 10, "the first refused post")
    other = sqlite3.connect(db, isolation_level=None, check_same_thread=False, timeout=30)
    try:
        await asyncio.to_thread(other.execute, "BEGIN IMMEDIATE")   # another process's write lock
        for _ in range(200):   # the give-up (a log line: fd.wait_for wakes on requests only)
            if "Discord refused its result 3 times" in caplog.text:
                break
            await asyncio.sleep(0.1)
        assert "Discord refused its result 3 times" in caplog.text
        await asyncio.sleep(1.0)   # past the busy timeout: marking it delivered has failed
        await asyncio.to_thread(other.execute, "ROLLBACK")
    finally:
        other.close()
    await h.wait_delivered(job_id, timeout=15)
    tries = requests_matching(fd, "POST", CHANNEL_POST.format(msg.channel_id), since)   # new messages: edits cannot
    assert [r.status for r in tries] == [400] * (progress.REFUSED_TRIES + 1)   # once more after the store failed
    assert job_id not in h.bot.progress.trackers


async def test_a_refused_progress_edit_stops_the_progress_edits(harness, caplog):
    """Past the token's TTL the progress edits go through the channel; in a channel the bot can no
    longer view (an admin's overwrite) every request is refused (403 / 50001), and Discord bans
    bots that make many refused requests. The first 403 ends the job's progress edits; the final
    post tries the edit once and a new message once (refused too: the token has expired, so there
    is no follow-up), then gives up, logged, and nothing more is sent there."""
    from tests.test_bot_reach import _deny_the_bot

    h = harness
    h.config.progress.message_interval = 0.01
    msg, job_id = await _queued_job_past_its_token(h, "a channel the bot lost access to")
    fd = h.fd
    caplog.set_level(logging.INFO, logger="bot.progress")
    _deny_the_bot(fd, msg.channel_id, Permission.VIEW_CHANNEL)
    since = len(fd.requests)
    await claim_jobs(h.queue, [job_id])
    await publish_frames(h.queue, [job_id], frames=20, every=0.05)
    await finish_jobs(h.queue, [job_id])
    await h.wait_delivered(job_id, timeout=20)
    edits = requests_matching(fd, "PATCH", CHANNEL_EDIT.format(msg.channel_id), since)
    assert all(r.status == 403 for r in edits), [r.status for r in edits]
    progress_refused = [r for r in edits if not any(f.filename == "final.png" for f in r.files)]
    assert len(progress_refused) == 1, [r.path for r in progress_refused]
    assert len(edits) == 2   # and the final post's edit, which then tries a new message
    posts = requests_matching(fd, "POST", CHANNEL_POST.format(msg.channel_id), since)
    assert [r.status for r in posts] == [403]
    assert f"job {job_id}: cannot post its result in channel {msg.channel_id}" in caplog.text
    settled = len(fd.requests)
    await asyncio.sleep(0.5)
    assert not [r for r in fd.requests[settled:] if str(msg.channel_id) in r.path]


@pytest.mark.parametrize("token_expired", [True, False], ids=["channel-edits", "token-edits"])
async def test_a_lost_job_in_an_archived_thread_says_so_in_a_new_message(harness, caplog, token_expired):
    """The store lost a job (a Redis that came back empty; here its row is deleted) while its reply
    waited in a thread that has since archived itself. The notice that it was lost cannot be an
    edit there (400 / 50083, once): it goes out as a new message, which unarchives the thread, as a
    result would (before: "nothing to tell", and the reply showed it queued for ever)."""
    h = harness
    h.config.progress.message_interval = 0.01
    msg, job_id = await queued_job_in_a_thread(h, "a job the store forgets", expire_token=token_expired)
    fd = h.fd
    thread_id = msg.channel_id
    caplog.set_level(logging.INFO, logger="bot.progress")
    await fd.archive_thread(thread_id)
    since = len(fd.requests)
    await h.write_store(lambda db: db.execute("DELETE FROM jobs WHERE id = ?", (job_id,)))

    await fd.wait_for(lambda: requests_matching(fd, "POST", CHANNEL_POST.format(thread_id), since), 10, "the notice")
    await asyncio.sleep(1.0)   # nothing more comes
    edits = [r for r in fd.requests[since:] if r.method == "PATCH" and r.status != 401   # 401: the dead token
             and (r.path.startswith(f"/channels/{thread_id}/") or r.path.startswith("/webhooks/"))]
    assert [(r.status, r.response["code"]) for r in edits] == [(400, 50083)]
    (post,) = requests_matching(fd, "POST", CHANNEL_POST.format(thread_id), since)
    assert post.status == 200
    notice = fd.messages[int(post.response["id"])]
    assert "Lost:" in notice.content and "a job the store forgets" in notice.content and not notice.custom_ids
    assert not fd.thread_archived(thread_id)   # the new message unarchived it
    assert job_id not in h.bot.progress.trackers
    fd.assert_clean()


async def test_a_lost_job_without_a_message_does_not_end_a_discord_outage(harness, caplog):
    """Discord fails every edit (503): one WARNING. Meanwhile the store loses a job that has no
    message to edit (none was ever made): its notice makes no request, so it says nothing of the
    outage; before, the bot logged "Discord answers again" while the outage went on."""
    from engine.jobs import JobSpec
    from tests.test_bot_support import CHANNEL_MESSAGE

    h = harness
    h.config.progress.token_ttl = 0   # edits with the bot token: a 503 is not retried by discord.py
    caplog.set_level(logging.DEBUG, logger="bot.progress")
    await h.start(worker=False)
    fd = h.fd
    drawn = h.job_id(await h.reply_of(await h.imagine("a job that cannot be drawn")))
    spec = JobSpec(prompt="a job without a message", user_id=int(fd.member_user["id"]), channel_id=fd.channel_id,
                   guild_id=fd.guild_id, iterations=4, grid=8, frame_every=2, cutn=2)
    silent = (await h.queue.submit(spec)).id
    await h.stop()   # a restart: both are followed from the store, one with no message to edit
    await h.start(worker=False)
    await fd.wait_for(lambda: {drawn, silent} <= set(h.bot.progress.trackers), 10, "both followed")

    outage = fd.inject_error("PATCH", CHANNEL_MESSAGE, 503, count=10_000)
    await claim_jobs(h.queue, [drawn])   # its reply is edited (running), and fails
    await _until(lambda: _logged(caplog, "cannot reach Discord"), "the outage noticed")
    await h.write_store(lambda db: db.execute("DELETE FROM jobs WHERE id = ?", (silent,)))
    await _until(lambda: silent not in h.bot.progress.trackers, "the lost job dropped")
    await asyncio.sleep(0.3)
    assert not _logged(caplog, "Discord answers again")

    outage.remaining = 0   # Discord is back: the next request says so (the result's post)
    await finish_jobs(h.queue, [drawn])
    await h.wait_delivered(drawn)
    await _until(lambda: _logged(caplog, "Discord answers again"), "the outage's end")


def _logged(caplog, text: str) -> bool:
    return any(text in r.getMessage() for r in caplog.records)


async def _until(predicate, what: str, timeout: float = 10.0) -> None:
    """Poll `predicate` (the bot's state or log, which fd.wait_for does not wake on)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)
