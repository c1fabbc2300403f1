"""How the progress edits share a channel, and how long the interaction token is trusted.

- Places in line: when the line moves, only the first LINE_REDRAWS queued jobs of a channel are
  redrawn, so a start in a channel with a long line costs at most that many edits (a job further
  back shows its new place once it gets among them); a redraw that failed is tried again at the
  next round.
- A channel's slots go to final posts first, then frames, then places in line: a result is not
  held up behind a burst of position redraws.
- The interaction token's clock starts when the interaction was made, not when the job was
  registered: a command that waited for the store first does not edit through a dead token (401).

All over the fake Discord (real HTTP), with the real SQLite queue; the test plays the GPU.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from bot import progress
from tests.test_bot_support import claim_jobs, finish_jobs, harness, publish_frames  # noqa: F401 - the fixture

pytestmark = pytest.mark.asyncio


def _edits_since(fd, since):
    """Successful edits of messages (through the interaction token or the channel), in order."""
    return [r for r in fd.requests[since:] if r.method == "PATCH" and r.status == 200
            and (r.path.startswith("/webhooks/") or r.path.startswith("/channels/"))]


def _is_position(req) -> bool:
    return isinstance(req.json, dict) and "in line." in (req.json.get("content") or "")


def _is_final(req) -> bool:
    return any(f.filename == "final.png" for f in req.files)


def _positions_since(fd, since):
    return [r for r in _edits_since(fd, since) if _is_position(r)]


async def _queue_jobs(h, n):
    """`n` jobs queued by /imagine in #general (one user, so the line is in this order); their replies."""
    msgs = []
    for i in range(n):
        inter = await h.imagine(f"a long line, job {i}")
        msgs.append(await h.reply_of(inter))
    return msgs


async def _quiet(fd, seconds=0.5, timeout=15.0):
    """Until the fake has had no request for `seconds`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        seen = len(fd.requests)
        await asyncio.sleep(seconds)
        if len(fd.requests) == seen:
            return
    raise TimeoutError("the bot kept sending requests")


async def test_a_start_redraws_the_places_of_the_first_jobs_of_the_channel_only(harness):
    """25 jobs wait in one channel. The first starts: every other job moves up one place, but only
    the first LINE_REDRAWS of them are redrawn (10 edits, not 24). A job further back shows its new
    place once it is among them."""
    h = harness
    h.config.queue.max_queued_per_user = 100
    await h.start(worker=False)
    fd = h.fd
    msgs = await _queue_jobs(h, 25)
    ids = [h.job_id(m) for m in msgs]
    await fd.wait_for(lambda: "#12 in line" in fd.messages[msgs[11].id].content, 10, "job 12 shown at #12")
    await _quiet(fd)

    since = len(fd.requests)
    await claim_jobs(h.queue, ids[:1])
    # The 10 redraws first, then a quiet spell in which no 11th comes.
    await fd.wait_for(lambda: len(_positions_since(fd, since)) >= progress.LINE_REDRAWS, 10, "the first redraws")
    await fd.wait_for(lambda: "next in line" in fd.messages[msgs[1].id].content, 10, "job 2 first in line")
    await _quiet(fd)
    positions = _positions_since(fd, since)
    assert len(positions) == progress.LINE_REDRAWS == 10, [r.json["content"][-40:] for r in positions]
    for i in range(1, 11):   # jobs 2..11: places 1..10
        expected = "next in line" if i == 1 else f"#{i} in line"
        assert expected in fd.messages[msgs[i].id].content
    assert "#12 in line" in fd.messages[msgs[11].id].content   # job 12 (now 11th): not redrawn yet

    since = len(fd.requests)
    await claim_jobs(h.queue, ids[1:2])
    await fd.wait_for(lambda: len(_positions_since(fd, since)) >= 10, 10, "the second round's redraws")
    await fd.wait_for(lambda: "#10 in line" in fd.messages[msgs[11].id].content, 10, "job 12 redrawn at #10")
    await _quiet(fd)
    assert len(_positions_since(fd, since)) == 10
    assert "#14 in line" in fd.messages[msgs[13].id].content   # still as queued: never among the first 10


async def test_a_place_whose_redraw_failed_is_redrawn_at_the_next_round(harness):
    """Three jobs wait (past their tokens' 15 minutes: edits go through the channel); the first is
    cancelled, and the third one's redraw of its new place (#2) answers 503. The line's next round
    (a fourth job joins behind it: its own place does not change) redraws it. Before, its place
    counted as drawn before the edit went out, so it kept showing #3 until it moved again."""
    h = harness
    await h.start(worker=False)
    fd = h.fd
    msgs = await _queue_jobs(h, 3)
    ids = [h.job_id(m) for m in msgs]
    await _quiet(fd)
    assert "#3 in line" in fd.messages[msgs[2].id].content
    fd.expire_tokens()
    rule = fd.inject_error("PATCH", f"/channels/{msgs[2].channel_id}/messages/{msgs[2].id}", 503,
                           body={"message": "Service Unavailable", "code": 0})
    await h.queue.cancel(ids[0])
    await fd.wait_for(lambda: rule.remaining == 0, 10, "the failed redraw")
    await fd.wait_for(lambda: "next in line" in fd.messages[msgs[1].id].content, 10, "job 2 first in line")
    await _quiet(fd)
    assert "#3 in line" in fd.messages[msgs[2].id].content   # discord.py does not retry a 503 here

    fourth = await h.reply_of(await h.imagine("a short line, job 3"))
    await fd.wait_for(lambda: "#2 in line" in fd.messages[msgs[2].id].content, 10, "job 3 redrawn at #2")
    assert "#3 in line" in fd.messages[fourth.id].content
    fd.assert_clean()


async def test_a_result_is_not_held_up_behind_position_redraws(harness):
    """A channel with a running job and a long line. Another job starts: ten places to redraw and
    its "Starting…" edit wait for the channel's slots. The first slot goes out; the next is
    SLOT s later, and meanwhile the running job finishes and its result is read from the store
    (milliseconds; SLOT leaves any loaded host time for it). That next slot goes to the result,
    ahead of everything that waited longer; the redraws come after it."""
    h = harness
    h.config.queue.max_queued_per_user = 100
    h.config.progress.message_interval = 0.01
    await h.start(worker=False)
    fd = h.fd
    msgs = await _queue_jobs(h, 14)
    ids = [h.job_id(m) for m in msgs]
    since = len(fd.requests)
    await claim_jobs(h.queue, ids[:1])   # the job whose result we watch: "Starting…", jobs 2..11 redrawn
    await fd.wait_for(lambda: len(_positions_since(fd, since)) >= 10, 10, "the first start's redraws")
    await fd.wait_for(lambda: "Starting" in fd.messages[msgs[0].id].content, 10, "job 1 starting")
    await _quiet(fd)

    SLOT = 5.0
    h.config.progress.channel_interval = SLOT
    since = len(fd.requests)
    await claim_jobs(h.queue, ids[1:2])   # the line moves: jobs 3..12 to redraw, job 2 "Starting…"
    await fd.wait_for(lambda: _edits_since(fd, since), 10, "the channel's first slot")
    h.config.progress.channel_interval = 0.01   # the slots after the next one (granted SLOT s after the first)
    await finish_jobs(h.queue, ids[:1])
    await h.wait_delivered(ids[0], timeout=SLOT + 20)
    await fd.wait_for(lambda: len(_positions_since(fd, since)) >= 10, 10, "the second start's redraws")

    edits = _edits_since(fd, since)
    shown = [("final" if _is_final(r) else (r.json or {}).get("content", "")[-30:]) for r in edits]
    final_at = next(i for i, r in enumerate(edits) if _is_final(r))
    # Before it: only what took the first slot (a redraw or job 2's "Starting…"), sent before the
    # result was ready; the next slot, granted with the result waiting, is the result's.
    assert final_at == 1, shown
    assert len([r for r in edits[final_at:] if _is_position(r)]) >= 9, shown   # the rest came after


async def test_the_token_clock_starts_when_the_command_was_made(harness):
    """The interaction's token lives 3 s here (Discord: 15 minutes) and the bot trusts it for 2 s
    (`token_ttl`: 14 minutes). The command waits 1.5 s for the store (another process holds its
    write lock) before its job is registered. Counting from the registration, the bot would edit
    through the token until 3.5 s, past its death at 3 s (401 Invalid Webhook Token); counting from
    the command, it moves to the channel at 2 s, and no edit is refused."""
    h = harness
    fd = h.fd
    fd.token_expiry = 3.0
    h.config.progress.token_ttl = 2.0
    h.config.progress.message_interval = 0.05
    await h.start(worker=False)
    db = Path(h.config.queue.url.removeprefix("sqlite:///"))
    other = sqlite3.connect(db, isolation_level=None, check_same_thread=False, timeout=30)
    try:
        await asyncio.to_thread(other.execute, "BEGIN IMMEDIATE")   # another process's write
        loop = asyncio.get_running_loop()
        made = loop.time()
        inter = await h.imagine("a command that waits for the store")
        await asyncio.sleep(1.5 - (loop.time() - made))
        await asyncio.to_thread(other.execute, "ROLLBACK")
    finally:
        other.close()
    msg = await h.reply_of(inter)
    job_id = h.job_id(msg)
    await claim_jobs(h.queue, [job_id])
    await publish_frames(h.queue, [job_id], frames=60, every=0.05)   # until past 4.5 s
    await finish_jobs(h.queue, [job_id])
    await h.wait_delivered(job_id, timeout=20)

    refused = [(r.method, r.path, r.status) for r in fd.requests if r.status == 401]
    assert refused == []
    through_channel = [r for r in fd.requests if r.method == "PATCH" and r.path.startswith(f"/channels/{msg.channel_id}/")
                       and r.status == 200]
    assert through_channel   # after its 2 s, the frames went through the channel
    assert len(h.final_edits(msg.id)) == 1
