"""Discord's limits: 429s, pacing and coalescing, token expiry, deleted messages, upload size."""

from __future__ import annotations

import asyncio

import pytest

from bot.queue_admin import user_limit_key
from engine.jobs import JobState
from tests.fakediscord import FakeDiscord
from tests.test_bot_support import (  # noqa: F401 - the fixture
    CALLBACK, WEBHOOK_ORIGINAL, Harness, claim_jobs, finish_jobs, harness, publish_frames, test_config,
)

pytestmark = pytest.mark.asyncio


def _patches(fd, message_id: int) -> list:
    return [r for r in fd.requests if r.method == "PATCH" and r.status == 200
            and isinstance(r.response, dict) and r.response.get("id") == str(message_id)]


async def test_429_on_edits_is_waited_out_coalesced_and_the_final_arrives_once(harness):
    h = harness
    await h.start(worker=False)
    fd = h.fd
    # The next edits through the interaction answer 429 (discord.py waits retry_after and retries).
    rule = fd.rate_limit("PATCH", WEBHOOK_ORIGINAL, count=4, retry_after=0.2)
    inter = await h.imagine("rate limited")
    msg = await h.reply_of(inter, timeout=20)
    job_id = h.job_id(msg)
    assert len(rule.hits) == 4   # the queued reply itself went through the 429s
    rule = fd.rate_limit("PATCH", WEBHOOK_ORIGINAL, count=3, retry_after=0.3)
    await claim_jobs(h.queue, [job_id])
    started = asyncio.get_running_loop().time()
    await publish_frames(h.queue, [job_id], 30, every=0.02)   # 30 frames while the edits wait
    took = asyncio.get_running_loop().time() - started
    await fd.wait_for(lambda: "Iteration 29/29" in fd.messages[msg.id].content, 10, "the newest frame")
    await finish_jobs(h.queue, [job_id])
    record = await h.wait_delivered(job_id)
    assert record.state == JobState.DONE and len(rule.hits) == 3
    frames_sent = [r for r in _patches(fd, msg.id) if any(f.filename == "frame.png" for f in r.files)]
    # Not 30: an edit at most every message_interval while the frames came (none while the 429s
    # were waited out), and one more for frames the bot read after the last was published.
    bound = took / h.config.progress.message_interval + 3
    assert 1 <= len(frames_sent) <= bound, (took, [r.json["content"] for r in frames_sent])
    (final,) = h.final_edits(msg.id)
    assert sorted(f.filename for f in final.files) == ["final.png", "video.mp4"]
    assert len(h.posts_of_job(job_id)) == 1
    fd.assert_clean()


async def test_a_429_on_the_final_edit_still_posts_it_once(harness):
    h = harness
    await h.start()
    fd = h.fd
    await h.queue.set_setting("paused", True)
    inter = await h.imagine("final under pressure", iterations=2)
    msg = await h.reply_of(inter)
    job_id = h.job_id(msg)
    rule = fd.rate_limit("PATCH", WEBHOOK_ORIGINAL, count=12, retry_after=0.05)
    await h.queue.set_setting("paused", False)
    record = await h.wait_delivered(job_id, timeout=60)
    assert record.state == JobState.DONE and len(rule.hits) == 12   # discord.py gave up twice; the bot did not
    assert len(h.final_edits(msg.id)) == 1
    assert len(h.posts_of_job(job_id)) == 1


async def test_edits_are_paced_per_message_and_per_channel_newest_frame_wins(tmp_path, tiny_models):
    fd = FakeDiscord()
    await fd.start()
    cfg = test_config(tmp_path, progress={"message_interval": 0.3, "channel_interval": 0.2})
    h = Harness(fd=fd, config=cfg, models=tiny_models)
    try:
        await h.start(worker=False)   # frames come from the test, 50 a second per job
        first = await h.imagine("paced one")
        second = await h.imagine("paced two", user=fd.admin_user)
        msgs = [await h.reply_of(first), await h.reply_of(second)]
        ids = [h.job_id(m) for m in msgs]
        await claim_jobs(h.queue, ids)
        started = asyncio.get_running_loop().time()
        await publish_frames(h.queue, ids, frames=60, every=0.02)
        took = asyncio.get_running_loop().time() - started
        await finish_jobs(h.queue, ids)
        for job_id in ids:
            await h.wait_delivered(job_id, timeout=30)
        progress_edits = []
        for m in msgs:
            edits = _patches(fd, m.id)[1:]   # after the command's own first edit
            times = [r.monotonic for r in edits]
            gaps = [b - a for a, b in zip(times, times[1:])]
            assert all(g >= 0.3 - 0.03 for g in gaps), gaps
            frames = [r for r in edits if any(f.filename == "frame.png" for f in r.files)]
            # 60 frames in `took` s (~1.2): one edit per message_interval at most, newer frames
            # replacing unsent older ones (+ the first, and one for frames read after the last was
            # published); the iterations only go forward, and the final came last.
            its = [int(r.json["content"].split("Iteration ")[1].split("/")[0]) for r in frames]
            assert its == sorted(its) and 1 <= len(frames) <= took / 0.3 + 3, (took, its)
            assert edits[-1] is h.final_edits(m.id)[0]
            progress_edits += edits
        times = sorted(r.monotonic for r in progress_edits)
        gaps = [b - a for a, b in zip(times, times[1:])]
        assert all(g >= 0.2 - 0.03 for g in gaps), gaps
        for job_id in ids:
            assert len(h.posts_of_job(job_id)) == 1
        fd.assert_clean()
    finally:
        await h.stop()
        await fd.close()


async def test_expired_interaction_token_edits_through_the_channel(harness):
    h = harness
    await h.start()
    fd = h.fd
    await h.queue.set_setting("paused", True)
    inter = await h.imagine("a slow queue", iterations=4)
    msg = await h.reply_of(inter)
    job_id = h.job_id(msg)
    fd.expire_tokens()   # the job waited 15 minutes in line
    since = len(fd.requests)
    await h.queue.set_setting("paused", False)
    await h.wait_delivered(job_id)
    later = fd.requests[since:]
    webhook_ok = [r for r in later if r.path.startswith("/webhooks/") and r.status == 200]
    assert webhook_ok == []
    channel_edits = [r for r in later if r.method == "PATCH" and r.status == 200
                     and r.path == f"/channels/{msg.channel_id}/messages/{msg.id}"]
    assert any(any(f.filename == "frame.png" for f in r.files) for r in channel_edits)
    (final,) = h.final_edits(msg.id)
    assert final.path == f"/channels/{msg.channel_id}/messages/{msg.id}"
    assert final.json["allowed_mentions"] == {"parse": []}
    assert len(h.posts_of_job(job_id)) == 1
    fd.assert_clean()


async def test_deleted_reply_stops_edits_and_the_result_is_a_new_message(harness):
    h = harness
    await h.start(worker=False)
    fd = h.fd
    inter = await h.imagine("a message someone deletes")
    msg = await h.reply_of(inter)
    job_id = h.job_id(msg)
    await claim_jobs(h.queue, [job_id])
    await publish_frames(h.queue, [job_id], 2, every=0.01)
    await fd.wait_for(lambda: "Iteration" in fd.messages[msg.id].content, 10, "a first frame")
    await fd.delete_message(msg.channel_id, msg.id)
    await publish_frames(h.queue, [job_id], 30, every=0.02)   # frames keep coming: one try, then silence
    await fd.wait_for(lambda: fd.find_requests("PATCH", status=404), 10, "the 404")
    await finish_jobs(h.queue, [job_id])
    record = await h.wait_delivered(job_id)
    assert record.state == JobState.DONE
    failed = [r for r in fd.requests if r.method == "PATCH" and r.status == 404]
    assert len(failed) == 1 and failed[0].response["code"] == 10008
    new = [m for m in fd.channel_messages() if m.id != msg.id]
    assert len(new) == 1
    result = new[0]
    assert sorted(a["filename"] for a in result.attachments) == ["final.png", "video.mp4"]
    assert result.custom_ids == [f"imagine:reroll:{job_id}", f"imagine:continue:{job_id}", f"imagine:remix:{job_id}"]
    assert "a message someone deletes" in result.content and "Done" in result.content
    post = [r for r in fd.requests if r.method == "POST" and r.path == f"/channels/{msg.channel_id}/messages"]
    assert len(post) == 1 and post[0].json["allowed_mentions"] == {"parse": []}
    assert post[0].json["nonce"] == f"imagine-{job_id}" and post[0].json["enforce_nonce"] is True
    assert len(h.posts_of_job(job_id)) == 1
    assert record.spec.reply["result_message_id"] == result.id
    fd.assert_clean()


async def test_video_over_the_upload_limit_is_reencoded_or_left_out(tmp_path, tiny_models):
    """The real re-encode (engine.video.reencode_to_fit, ffmpeg): under a limit it can meet, the
    smaller video goes up (ffprobe reads it as H.264 yuv420p with every frame); under one it
    cannot, the final image goes alone. The limit is per file (Discord's, for apps): the video is
    measured against it alone, whatever the image."""
    from bot.progress import FILE_MARGIN
    from engine.video import reencode_to_fit
    from tests.test_video import probe

    fd = FakeDiscord(attachment_size_limit=3 * 1024 * 1024)
    await fd.start()
    h = Harness(fd=fd, config=test_config(tmp_path), models=tiny_models)
    try:
        await h.start()
        # Find the sizes of a real result first (16 frames of 128x128: a video re-encoding can shrink).
        inter = await h.imagine("size probe", seed=1, size=128, iterations=30)
        msg = await h.reply_of(inter)
        probe_id = h.job_id(msg)
        await h.wait_delivered(probe_id)
        png = await h.queue.get_artifact(probe_id, "final.png")
        mp4 = await h.queue.get_artifact(probe_id, "video.mp4")
        budget = FILE_MARGIN   # the bot keeps the video this far under the per-file limit
        smaller = reencode_to_fit(mp4, len(mp4) - 1)
        assert smaller is not None and len(smaller) < len(mp4), (len(mp4), smaller and len(smaller))
        room = (len(mp4) + len(smaller)) // 2   # what the re-encode meets, with a margin on either side
        source = probe(_write(tmp_path / "source.mp4", mp4))["streams"][0]

        # 1. Re-encoding makes it fit: the smaller video goes up, with a word saying so. The limit
        # is what the command's interaction says. At this scale the image is larger than the video
        # (unlike at Discord's: a few MiB, under a limit of 10 or more), so the fake's own per-file
        # check goes back up at once (the job is far from done) to let the image through.
        fd.attachment_size_limit = budget + room
        inter = await h.imagine("size probe", seed=1, size=128, iterations=30)
        fd.attachment_size_limit = 3 * 1024 * 1024
        msg = await h.reply_of(inter)
        job_id = h.job_id(msg)
        await h.wait_delivered(job_id)
        stored = await h.queue.get_artifact(job_id, "video.mp4")
        assert len(stored) > room   # too big as it is: it had to be re-encoded
        (final,) = h.final_edits(msg.id)
        assert "re-encoded" in final.json["content"]
        (posted,) = [f.data for f in final.files if f.filename == "video.mp4"]
        assert len(posted) <= room and posted != stored
        info = probe(_write(tmp_path / "posted.mp4", posted))
        (stream,) = info["streams"]
        assert (stream["codec_name"], stream["pix_fmt"]) == ("h264", "yuv420p")
        assert int(stream["nb_read_frames"]) == int(source["nb_read_frames"])
        assert 0 < int(stream["width"]) <= int(source["width"])
        assert fd.attachment_bytes([a for a in fd.messages[msg.id].attachments
                                    if a["filename"] == "video.mp4"][0]) == posted

        # 2. Nothing fits (no mp4 is 200 bytes): the image alone, and the reply says why (the
        # limit from the command's interaction again, as in 1).
        fd.attachment_size_limit = budget + 200
        inter = await h.imagine("size probe", seed=1, size=128, iterations=30)
        fd.attachment_size_limit = 3 * 1024 * 1024
        msg = await h.reply_of(inter)
        job_id = h.job_id(msg)
        await h.wait_delivered(job_id)
        await fd.wait_for(lambda: "upload limit" in fd.messages[msg.id].content, 5, "the note")
        stored = fd.messages[msg.id]
        assert [a["filename"] for a in stored.attachments] == ["final.png"]
        assert "final image only" in stored.content
        assert h.final_edits(msg.id) == [] and len(h.posts_of_job(job_id)) == 1
        fd.assert_clean()
    finally:
        await h.stop()
        await fd.close()


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("prompt", ["a house", "a {red, blue} house"], ids=["one-job", "a-set"])
async def test_two_commands_racing_for_the_last_place_queue_only_one(harness, prompt):
    """The user's cap holds for two commands at once. The first one passes the early check (nothing
    waiting yet), then its defer meets a 429 and discord.py waits to retry it; meanwhile a second
    command of the same user passes the same check and is queued. The first one then reaches the
    store, which counts and queues in one step: it is refused, privately, with the words of the
    early check, and nothing of it (not one job of a set) is queued."""
    h = harness
    await h.start(worker=False)   # the queued jobs stay queued
    fd = h.fd
    size = 2 if "{" in prompt else 1
    await h.queue.set_setting(user_limit_key(fd.guild_id), size)   # room for this command alone
    rule = fd.rate_limit("POST", CALLBACK, count=1, retry_after=2.0)
    held = await fd.send_slash_command("imagine", {"prompt": prompt})
    await fd.wait_for(lambda: rule.hits, 5, "the first command's defer (answered 429)")
    other = await h.imagine("another house")
    shown = await h.reply_of(other)
    assert not held.acknowledged, "the held command was answered before the other one was queued"

    await fd.wait_for(lambda: held.followups, 10, "the first command's refusal")
    assert held.response_type == 5 and len(rule.hits) == 1   # deferred (on the retry), then refused
    (told,) = held.followups
    assert told.ephemeral
    if size == 1:
        assert "You already have 1 job waiting; the limit is 1." in told.content
    else:
        assert ("That prompt makes 2 images, but you may queue only 1 more right now (you have 1 waiting; "
                "the limit is 2)") in told.content and "Nothing was queued." in told.content
    assert held.original_message is None or held.original_message.deleted   # no public "thinking…" left
    assert [r.spec.prompt for r in await h.queue.queued()] == ["another house"]
    assert [m.id for m in fd.channel_messages()] == [shown.id]
    fd.assert_clean()
