"""/imagine end to end: deferral, queued reply, frames, final post with video and buttons."""

from __future__ import annotations

import asyncio

import pytest

from engine.jobs import JobState
from tests.test_bot_support import EPHEMERAL, harness  # noqa: F401 - the fixture

pytestmark = pytest.mark.asyncio

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_mp4(data: bytes) -> bool:
    return data[4:8] == b"ftyp"


def _edits_of(fd, message_id: int, since: int = 0) -> list:
    """Successful PATCHes of one message, through the interaction webhook or the channel."""
    out = []
    for req in fd.requests[since:]:
        if req.method != "PATCH" or req.status != 200:
            continue
        if isinstance(req.response, dict) and str(req.response.get("id")) == str(message_id):
            out.append(req)
    return out


async def test_imagine_defers_queues_streams_frames_and_posts_the_result(harness):
    h = harness
    h.config.progress.message_interval = 0.0   # every frame that arrives while no edit is in flight
    await h.start()
    fd = h.fd
    inter = await h.imagine("a house by Escher", seed=7, iterations=20)

    # Deferred within the deadline, as a public "thinking" reply (callback type 5).
    assert inter.response_type == 5
    assert not (inter.response.get("data") or {}).get("flags", 0) & EPHEMERAL

    msg = await h.reply_of(inter)
    job_id = h.job_id(msg)
    record = await h.wait_delivered(job_id)
    assert record.state == JobState.DONE

    edits = _edits_of(fd, msg.id)
    # The first edit is the queued reply, with a Cancel button and the job's place in line.
    first = edits[0].json
    assert "a house by Escher" in first["content"]
    assert "Queued" in first["content"]
    assert "seed 7 · 20 iterations · 64×64" in first["content"]
    ids = [c["custom_id"] for row in first["components"] for c in row["components"]]
    assert ids == [f"imagine:cancel:{job_id}"]
    assert first["allowed_mentions"] == {"parse": []}

    # Frames: PNG attachments named frame.png, with iteration, similarity and (after the first) an ETA.
    frames = [r for r in edits if any(f.filename == "frame.png" for f in r.files)]
    assert len(frames) >= 2, [r.json.get("content") for r in edits]
    for req in frames:
        (f,) = req.files
        assert f.data.startswith(PNG_MAGIC)
        assert [a["filename"] for a in req.json["attachments"]] == ["frame.png"]
        assert "Iteration " in req.json["content"] and "/20" in req.json["content"]
        assert "similarity " in req.json["content"]
        assert req.json["allowed_mentions"] == {"parse": []}
    assert any("left" in r.json["content"] for r in frames)

    # The final: the same message, now with final.png + video.mp4 and Reroll / Continue.
    (final,) = h.final_edits(msg.id)
    names = sorted(f.filename for f in final.files)
    assert names == ["final.png", "video.mp4"]
    by_name = {f.filename: f.data for f in final.files}
    assert by_name["final.png"].startswith(PNG_MAGIC)
    assert _is_mp4(by_name["video.mp4"])
    assert by_name["final.png"] == await h.queue.get_artifact(job_id, "final.png")
    content = final.json["content"]
    assert "a house by Escher" in content and "Done" in content and "seed 7" in content
    ids = [c["custom_id"] for row in final.json["components"] for c in row["components"]]
    assert ids == [f"imagine:reroll:{job_id}", f"imagine:continue:{job_id}", f"imagine:remix:{job_id}"]
    assert final is edits[-1]

    stored = fd.messages[msg.id]
    assert sorted(a["filename"] for a in stored.attachments) == ["final.png", "video.mp4"]
    assert stored.custom_ids == [f"imagine:reroll:{job_id}", f"imagine:continue:{job_id}", f"imagine:remix:{job_id}"]
    # Exactly one final post, and no stray messages in the channel.
    assert len(h.posts_of_job(job_id)) == 1
    assert [m.id for m in fd.channel_messages()] == [msg.id]
    fd.assert_clean()


async def test_queued_replies_show_the_place_in_line_and_follow_it(harness):
    h = harness
    await h.start()
    fd = h.fd
    await h.queue.set_setting("paused", True)
    carol = fd.add_user("carol")
    msgs = []
    for user in (None, fd.admin_user, carol):     # three users: the line is first come, first served
        inter = await h.imagine("waiting in line", user=user)
        msgs.append(await h.reply_of(inter))
    ids = [h.job_id(m) for m in msgs]

    def content(i):
        return fd.messages[msgs[i].id].content

    await fd.wait_for(lambda: "#3 in line" in content(2) and "#2 in line" in content(1)
                      and "next in line" in content(0), 5, "positions 1-3")
    assert "paused" in content(0)
    await h.queue.cancel(ids[0])
    await fd.wait_for(lambda: "next in line" in content(1) and "#2 in line" in content(2), 5, "the line moving")
    await h.queue.set_setting("paused", False)
    h.bot.progress.line_changed()
    for job_id in ids[1:]:
        assert (await h.wait_delivered(job_id)).state == JobState.DONE
    assert "Cancelled." in content(0)
    fd.assert_clean()


LONG_PROMPT = "tree " * 74 + "a purple zebra with `code` and **bold** @everyone"


async def test_a_prompt_longer_than_clip_reads_names_the_ignored_words(harness):
    """CLIP reads 77 tokens (75 of text): the queued reply (and every later state of it, the final
    post included) says which words of a longer prompt it ignores, quoted as inline code so that
    the echoed words cannot format the message or ping anyone. A prompt that fits has no such note."""
    h = harness
    await h.start()
    fd = h.fd
    inter = await h.imagine(LONG_PROMPT, iterations=2)
    msg = await h.reply_of(inter)
    job_id = h.job_id(msg)
    first = _edits_of(fd, msg.id)[0].json
    (line,) = [x for x in first["content"].split("\n") if "CLIP" in x]
    assert line.startswith("-# ✂ `CLIP reads only the first 75 tokens of 'tree tree tree"), line
    # The ignored words, in one code span (the prompt's backticks become look-alikes).
    assert line.endswith("it ignores 'purple zebra with ˋ code ˋ and ** bold ** @ everyone' (12 tokens)`"), line
    assert line.count("`") == 2
    assert first["allowed_mentions"] == {"parse": []}
    record = await h.wait_delivered(job_id)
    assert record.state == JobState.DONE
    # Stored as the engine said it (engine.prompts.clip_overflow); quoted only when shown.
    assert [n.replace("`", "ˋ") for n in record.spec.extra["clip_notes"]] == [line[len("-# ✂ `"):-1]]
    (final,) = h.final_edits(msg.id)
    assert line in final.json["content"] and "Done" in final.json["content"]

    inter = await h.imagine("a short prompt", iterations=2)
    msg = await h.reply_of(inter)
    assert "CLIP" not in msg.content
    record = await h.wait_delivered(h.job_id(msg))
    assert "clip_notes" not in record.spec.extra
    assert "CLIP" not in fd.messages[msg.id].content
    fd.assert_clean()


async def test_a_queue_outage_right_after_the_submit_still_shows_and_posts_the_job(harness, monkeypatch):
    """The job is queued, then the queue fails the reads of the line (its place in line) until the
    reply is shown: the reply is shown without the place, and the job's progress and result still
    reach it. (The outage is the line's reads made to raise: an SQLite file fails no read on its
    own between two calls.)"""
    h = harness
    await h.start()
    fd = h.fd
    real_line = h.queue.line
    outage = [True]
    failed = []

    async def line_in_an_outage():
        if outage[0]:
            failed.append(True)
            raise ConnectionError("the queue is unreachable")
        return await real_line()

    monkeypatch.setattr(h.queue, "line", line_in_an_outage)
    inter = await h.imagine("a house in a storm", iterations=4)
    msg = await h.reply_of(inter)
    outage[0] = False
    job_id = h.job_id(msg)
    assert failed
    first = _edits_of(fd, msg.id)[0].json["content"]
    assert "Queued" in first and "in line" not in first, first
    record = await h.wait_delivered(job_id)
    assert record.state == JobState.DONE
    (final,) = h.final_edits(msg.id)
    assert "Done" in final.json["content"]
    assert len(h.posts_of_job(job_id)) == 1 and inter.followups == []
    assert [m.id for m in fd.channel_messages()] == [msg.id]
    fd.assert_clean()


async def test_a_dropped_connection_showing_the_queued_reply_leaves_the_job_shown_not_a_try_again(harness):
    """The job is queued, then the edit that shows its reply loses its connection (no answer:
    aiohttp's error, which discord.py does not wrap in an HTTPException). The user is not told to
    try again (that queued a second job): the job's tracker shows it in the reply, with its Cancel
    button. Before: the command's error handler deleted the reply and said "otherwise try again"."""
    from tests.test_bot_support import WEBHOOK_ORIGINAL, claim_jobs, finish_jobs, requests_matching

    h = harness
    await h.start(worker=False)
    fd = h.fd
    dropped = fd.inject_error("PATCH", WEBHOOK_ORIGINAL, 0, count=1)
    inter = await h.imagine("a house by the sea")
    msg = await h.reply_of(inter, timeout=20)
    job_id = h.job_id(msg)
    assert len(dropped.hits) == 1 and "Queued" in msg.content
    assert f"imagine:cancel:{job_id}" in msg.custom_ids and not msg.deleted
    await asyncio.sleep(0.5)   # an error answer would have come by now
    assert inter.followups == [] and await h.queue.count_queued() == 1
    assert requests_matching(fd, "DELETE", WEBHOOK_ORIGINAL) == []
    # The reply the tracker made is stored as the command's would have been: a restart finds it,
    # and the result is that reply, not a new message beside a reply stuck at "Queued".
    for _ in range(200):
        record = await h.queue.get(job_id)
        if (record.spec.reply or {}).get("message_id"):
            break
        await asyncio.sleep(0.05)
    assert record.spec.reply["message_id"] == msg.id
    await h.stop()
    await h.start(worker=False)
    since = len(fd.requests)
    await claim_jobs(h.queue, [job_id])
    await finish_jobs(h.queue, [job_id])
    await h.wait_delivered(job_id, timeout=20)
    assert len(h.final_edits(msg.id)) == 1
    assert requests_matching(fd, "POST", rf"/channels/{msg.channel_id}/messages", since) == []
