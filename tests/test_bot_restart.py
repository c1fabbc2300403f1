"""Stopping the bot (Bot + launcher resources) and starting it again on the same SQLite file."""

from __future__ import annotations

import asyncio

import pytest

from bot.launcher import open_resources
from engine.jobs import JobState
from tests.test_bot_support import claim_jobs, harness, publish_frames  # noqa: F401 - the fixture
from engine.queue import open_queue

pytestmark = pytest.mark.asyncio


async def _state(h, job_id):
    async with open_queue(h.config.queue.url) as queue:
        return (await queue.get(job_id)).state


async def test_queued_and_running_jobs_complete_after_a_restart_with_one_final_post_each(harness):
    h = harness
    fd = h.fd
    h.config.queue.url += "?lease=1"   # a dead worker's job goes back in line after 1 s
    await h.start(worker=False)
    # One job is taken by a worker that then dies mid-run (claimed, a frame, no more heartbeats).
    inter = await h.imagine("running when everything stopped", user=fd.admin_user)
    running_msg = await h.reply_of(inter)
    running_id = h.job_id(running_msg)
    await claim_jobs(h.queue, [running_id])
    await publish_frames(h.queue, [running_id], 1, every=0)
    await fd.wait_for(lambda: "Iteration 0/0" in fd.messages[running_msg.id].content, 10, "its frame")
    # Three more wait in line.
    msgs = []
    for n, user in enumerate([None, fd.admin_user, None]):
        inter = await h.imagine(f"restart job {n}", user=user)
        msgs.append(await h.reply_of(inter))
    ids = [h.job_id(m) for m in msgs]
    assert await h.queue.count_queued() == 3
    await h.stop()
    assert await _state(h, running_id) == JobState.RUNNING

    await h.start()   # a new bot and a new embedded worker on the same SQLite file
    for job_id in [running_id, *ids]:
        record = await h.wait_delivered(job_id, timeout=60)
        assert record.state == JobState.DONE, (job_id, record.state, record.error)
    for msg, job_id in zip([running_msg, *msgs], [running_id, *ids]):
        assert len(h.posts_of_job(job_id)) == 1, job_id
        stored = fd.messages[msg.id]   # edited in place, through the channel: the reply became the result
        assert sorted(a["filename"] for a in stored.attachments) == ["final.png", "video.mp4"]
        assert stored.custom_ids == [f"imagine:reroll:{job_id}", f"imagine:continue:{job_id}", f"imagine:remix:{job_id}"]
        (final,) = h.final_edits(msg.id)
        assert final.path == f"/channels/{msg.channel_id}/messages/{msg.id}"
    assert len(fd.channel_messages()) == len(msgs) + 1   # no duplicate posts
    fd.assert_clean()


async def test_a_job_that_finished_while_the_bot_was_down_is_posted_once(harness):
    h = harness
    fd = h.fd
    await h.start()
    await h.queue.set_setting("paused", True)
    inter = await h.imagine("finished in the dark", iterations=4)
    msg = await h.reply_of(inter)
    job_id = h.job_id(msg)
    await h.stop()

    # A worker alone (no bot) runs the job to the end; nobody posts it.
    h.config.worker.embedded = True
    async with open_resources(h.config, models_loader=lambda: h.models,
                              worker_options={"poll_every": 0.05}) as res:
        await res.queue.set_setting("paused", False)
        for _ in range(600):
            record = await res.queue.get(job_id)
            if record.state.finished:
                break
            await asyncio.sleep(0.05)
        assert record.state == JobState.DONE and not record.delivered

    await h.start(worker=False)
    record = await h.wait_delivered(job_id)
    assert record.state == JobState.DONE
    assert len(h.posts_of_job(job_id)) == 1
    assert sorted(a["filename"] for a in fd.messages[msg.id].attachments) == ["final.png", "video.mp4"]
    # Another restart does not post it again.
    await h.stop()
    await h.start(worker=False)
    await asyncio.sleep(0.3)
    assert len(h.posts_of_job(job_id)) == 1
    fd.assert_clean()
