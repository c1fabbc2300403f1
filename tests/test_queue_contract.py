"""The JobQueue contract, run against every backend (SQLite and Redis)."""

from __future__ import annotations

import asyncio
import json
import math
import os
import sqlite3
import time

import pytest

from engine.jobs import (
    CLEARED, PAUSED_KEY, Checkpoint, EventKind, JobEvent, JobQueue, JobRecord, JobSpec, JobState, ParentGone,
    QueueLimitReached, UploadGone, guild_paused_key, is_upload_id, new_upload_id, upload_id_of,
)

try:
    from queue_fixtures import (  # noqa: F401
        QueueFactory, free_port, queue, queue_factory, redis_server, start_redis,
    )
except ImportError:  # tests/ imported as a package
    from tests.queue_fixtures import (  # noqa: F401
        QueueFactory, free_port, queue, queue_factory, redis_server, start_redis,
    )

pytestmark = pytest.mark.asyncio

BIG_USER = 2**62 + 12345          # Discord snowflakes do not fit in a double
CHANNEL = 1_100_000_000_000_000_001


def spec(user: int = 1, prompt: str = "a house by Escher", channel: int = CHANNEL, grid: int = 32, **kw) -> JobSpec:
    return JobSpec(prompt=prompt, user_id=user, channel_id=channel, grid=grid, **kw)


async def all_events(q: JobQueue, after: int = 0) -> list[JobEvent]:
    out: list[JobEvent] = []
    while True:
        batch = await q.events(after=after, timeout=0)
        if not batch:
            return out
        out.extend(batch)
        after = batch[-1].seq


async def last_seq(q: JobQueue) -> int:
    events = await all_events(q)
    return events[-1].seq if events else 0


async def lease(q: JobQueue, job_id: str) -> str:
    """The lease id of the job's current claim (what the worker that claimed it was given)."""
    rec = await q.get(job_id)
    assert rec is not None and rec.lease_id, rec
    return rec.lease_id


async def test_submit_and_get(queue: JobQueue):
    s = spec(user=BIG_USER, guild_id=BIG_USER + 1, seed=7, reply={"message_id": BIG_USER + 2}, extra={"k": [1, 2]})
    assert isinstance(queue, JobQueue)
    rec = await queue.submit(s)
    assert rec.state == JobState.QUEUED and len(rec.id) == 12
    got = await queue.get(rec.id)
    assert got is not None
    assert got.spec == s
    assert got.state == JobState.QUEUED and got.attempts == 0 and got.worker_id is None
    assert abs(got.created_at - time.time()) < 5
    assert await queue.get("nope") is None
    events = await all_events(queue)
    assert [(e.job_id, e.kind) for e in events] == [(rec.id, EventKind.QUEUED)]
    assert events[0].seq > 0


async def test_existing_names_the_jobs_whose_records_are_kept(queue: JobQueue):
    kept = [await queue.submit(spec(1, f"job {n}")) for n in range(3)]
    assert await queue.existing([]) == set()
    assert await queue.existing([kept[0].id, "nope", kept[2].id, kept[0].id]) == {kept[0].id, kept[2].id}
    many = [f"{n:012x}" for n in range(1200)] + [r.id for r in kept]   # more than one batch
    assert await queue.existing(many) == {r.id for r in kept}


async def test_fair_order_and_positions(queue: JobQueue):
    a1 = await queue.submit(spec(1, "a1"))
    a2 = await queue.submit(spec(1, "a2"))
    b1 = await queue.submit(spec(BIG_USER, "b1"))
    a3 = await queue.submit(spec(1, "a3"))
    c1 = await queue.submit(spec(3, "c1"))
    b2 = await queue.submit(spec(BIG_USER, "b2"))
    expected = [a1, b1, c1, a2, b2, a3]
    assert [r.id for r in await queue.queued()] == [r.id for r in expected]
    assert await queue.line() == [r.id for r in expected]   # the same order, ids only
    for place, rec in enumerate(expected, 1):
        assert await queue.position(rec.id) == place
    assert await queue.count_queued() == 6
    assert await queue.count_queued(1) == 3 and await queue.count_queued(BIG_USER) == 2
    assert await queue.count_queued(99) == 0

    got = await queue.claim("w1")
    assert got is not None and got.id == a1.id
    assert await queue.position(a1.id) is None
    # user 1 was served: to the back of the turn order
    assert [r.id for r in await queue.queued()] == [b1.id, c1.id, a2.id, b2.id, a3.id]
    d1 = await queue.submit(spec(4, "d1"))  # a new user enters behind everybody in the line
    assert [r.id for r in await queue.queued()] == [b1.id, c1.id, a2.id, d1.id, b2.id, a3.id]
    assert await queue.line() == [b1.id, c1.id, a2.id, d1.id, b2.id, a3.id]
    order = []
    while (rec := await queue.claim("w1")) is not None:
        order.append(rec.id)
    assert order == [b1.id, c1.id, a2.id, d1.id, b2.id, a3.id]
    assert await queue.count_queued() == 0
    assert {r.id for r in await queue.running()} == {a1.id, *order}


async def test_claim_sets_running_and_started_event(queue: JobQueue):
    rec = await queue.submit(spec())
    after = await last_seq(queue)
    got = await queue.claim("w1")
    assert got is not None and got.id == rec.id
    assert got.state == JobState.RUNNING and got.attempts == 1 and got.worker_id == "w1"
    assert got.lease_id and (await queue.get(rec.id)).lease_id == got.lease_id
    assert got.started_at is not None and abs(got.started_at - time.time()) < 5
    events = await all_events(queue, after)
    assert [(e.job_id, e.kind) for e in events] == [(rec.id, EventKind.STARTED)]
    assert [r.id for r in await queue.running()] == [rec.id]


async def test_claim_respects_grids_and_pause(queue: JobQueue):
    small = await queue.submit(spec(1, grid=32))
    big = await queue.submit(spec(2, grid=64))
    assert await queue.claim("w", grids=(128,)) is None
    assert await queue.claim("w", grids=()) is None
    got = await queue.claim("w", grids=(64,))
    assert got is not None and got.id == big.id
    await queue.set_setting("paused", True)
    assert await queue.get_setting("paused") is True
    assert await queue.claim("w") is None
    assert (await queue.get(small.id)).state == JobState.QUEUED
    await queue.set_setting("paused", False)
    got = await queue.claim("w", grids=(32, 64))
    assert got is not None and got.id == small.id


async def test_a_claim_without_init_images_passes_over_the_jobs_that_need_the_encoder(queue: JobQueue):
    """A worker without the dVAE encoder claims with init_images=False: a job that starts from its
    init image keeps its place (no attempt spent) and waits for a worker with the encoder, and the
    job behind it is taken. One resumed from a checkpoint, or starting from a parent's state, needs
    no encoder: taken like any other."""
    upload = upload_id_of(b"a start picture")
    assert await queue.put_artifact(upload, "image.png", b"png") is True
    init = await queue.submit(spec(1, "from a picture", extra=image_ref(upload, "init_image")))
    plain = await queue.submit(spec(2, "from noise"))
    got = await queue.claim("no-encoder", init_images=False)
    assert got is not None and got.id == plain.id
    assert await queue.claim("no-encoder", init_images=False) is None
    waiting = await queue.get(init.id)
    assert (waiting.state, waiting.attempts) == (JobState.QUEUED, 0) and await queue.position(init.id) == 1
    got = await queue.claim("encoder")   # init_images=True, the default
    assert got is not None and got.id == init.id
    assert await queue.put_artifact(init.id, "state.pt", b"state", got.lease_id) is True
    assert await queue.finish(init.id, got.lease_id, 0.3) is True

    resumed = await queue.submit(spec(3, "resumed", extra=image_ref(upload, "init_image")))
    assert await queue.save_checkpoint(Checkpoint(resumed.id, 10, b"ckpt")) is True
    child = await queue.submit(spec(4, "a remix", extra=image_ref(upload, "init_image"), parent_job_id=init.id,
                                    parent_kind="remix"))
    assert [(await queue.claim("no-encoder", init_images=False)).id for _ in range(2)] == [resumed.id, child.id]


async def test_a_paused_server_waits_while_other_servers_jobs_start(queue: JobQueue):
    """An admin's pause of one server: claims skip its queued jobs (they keep their places) and take
    the others in the fair order; its running job goes on; resuming lets its jobs start. The bot
    owner's pause of everything still stops every claim."""
    # Discord's ids are 64-bit: two servers a double cannot tell apart (cjson would round both alike).
    a, b = 1_180_000_000_000_000_001, 1_180_000_000_000_000_002
    assert float(a) == float(b)
    a_run = await queue.submit(spec(5, "a running", guild_id=a))
    assert (await queue.claim("w")).id == a_run.id
    a1 = await queue.submit(spec(1, "a1", guild_id=a))
    b1 = await queue.submit(spec(2, "b1", guild_id=b))
    a2 = await queue.submit(spec(3, "a2", guild_id=a, grid=64))
    dm = await queue.submit(spec(4, "dm"))                 # no server: never paused by one
    b2 = await queue.submit(spec(1, "b2", guild_id=b))
    line = [a1.id, b1.id, a2.id, dm.id, b2.id]
    assert [r.id for r in await queue.queued()] == line

    await queue.set_setting(guild_paused_key(a), True)
    assert await queue.claim("w", grids=(64,)) is None     # the one grid-64 job is A's
    assert [r.id for r in await queue.queued()] == line    # paused jobs keep their places
    claimed = [(await queue.claim("w")).id for _ in range(3)]
    assert claimed == [b1.id, dm.id, b2.id]                # the others, in the fair order
    assert await queue.claim("w") is None
    # user 1 was served (b2), so the user of a2 has the first turn now
    assert [r.id for r in await queue.queued()] == [a2.id, a1.id]
    assert [(await queue.get(r.id)).state for r in (a1, a2)] == [JobState.QUEUED] * 2
    assert await queue.heartbeat(a_run.id, await lease(queue, a_run.id)) is True   # running: goes on

    await queue.set_setting(PAUSED_KEY, True)              # the owner's pause, over A's resume
    await queue.set_setting(guild_paused_key(a), False)
    assert await queue.claim("w") is None
    await queue.set_setting(PAUSED_KEY, False)
    assert [(await queue.claim("w")).id for _ in range(2)] == [a2.id, a1.id]
    assert await queue.finish(a_run.id, await lease(queue, a_run.id), 0.5) is True


async def test_pausing_one_server_leaves_a_server_with_a_neighbouring_id_running(queue: JobQueue):
    """The other way round from the test above, on ids one apart: only the paused one waits."""
    a, b = 1_180_000_000_000_000_001, 1_180_000_000_000_000_002
    b_job = await queue.submit(spec(1, "b", guild_id=b))
    a_job = await queue.submit(spec(2, "a", guild_id=a))
    await queue.set_setting(guild_paused_key(b), True)
    assert (await queue.claim("w")).id == a_job.id
    assert await queue.claim("w") is None
    await queue.set_setting(guild_paused_key(b), False)
    assert (await queue.claim("w")).id == b_job.id


async def test_progress_events_in_order_with_frames(queue_factory: QueueFactory):
    q = await queue_factory.open()
    rec = await q.submit(spec())
    await q.claim("w1")
    start = await last_seq(q)
    frames = [os.urandom(1000 + i) for i in range(3)]
    for i, frame in enumerate(frames):
        ev = JobEvent(rec.id, EventKind.PROGRESS, iteration=50 * (i + 1), total=300,
                      similarity=0.1 + i / 10, frame_png=frame)
        await q.publish(ev)
        assert ev.seq > start
    await q.publish(JobEvent(rec.id, EventKind.PROGRESS, iteration=175, total=300, message="no frame"))
    other = await queue_factory.open()  # another process sees the same log
    events = await all_events(other, start)
    assert [e.kind for e in events] == [EventKind.PROGRESS] * 4
    assert [e.seq for e in events] == sorted(e.seq for e in events) and len({e.seq for e in events}) == 4
    assert [e.frame_png for e in events] == [*frames, None]
    assert [e.iteration for e in events] == [50, 100, 150, 175]
    assert [e.similarity for e in events] == [0.1, 0.2, 0.1 + 2 / 10, None]
    assert events[-1].message == "no frame" and events[0].message is None
    assert all(e.job_id == rec.id and e.total == 300 for e in events)
    got = await other.get(rec.id)
    assert got.iteration == 175 and got.similarity == pytest.approx(0.3)


async def test_frames_and_events_pruned(queue_factory: QueueFactory):
    q = await queue_factory.open(keep_events=40, keep_frames=3)
    rec = await q.submit(spec())
    for i in range(100):
        await q.publish(JobEvent(rec.id, EventKind.PROGRESS, iteration=i, frame_png=b"png%d" % i))
    events = await all_events(q)
    assert 40 <= len(events) <= 40 + 32 and events[-1].iteration == 99  # pruning may run in steps
    with_frames = [e.iteration for e in events if e.frame_png is not None]
    assert with_frames == [97, 98, 99]   # exactly the latest keep_frames frames
    assert events[-1].frame_png == b"png99"


async def test_cancel_queued(queue: JobQueue):
    keep = await queue.submit(spec(1))
    rec = await queue.submit(spec(2))
    after = await last_seq(queue)
    assert await queue.cancel(rec.id) is True
    got = await queue.get(rec.id)
    assert got.state == JobState.CANCELLED and got.finished_at is not None
    assert await queue.position(rec.id) is None
    assert await queue.count_queued() == 1
    assert [(e.job_id, e.kind) for e in await all_events(queue, after)] == [(rec.id, EventKind.CANCELLED)]
    assert await queue.cancel(rec.id) is False
    assert await queue.cancel("missing") is False
    assert (await queue.claim("w")).id == keep.id
    assert await queue.claim("w") is None


async def test_cancel_running(queue: JobQueue):
    rec = await queue.submit(spec())
    w1 = (await queue.claim("w1")).lease_id
    assert await queue.heartbeat(rec.id, w1) is True
    assert await queue.cancel(rec.id) is True
    got = await queue.get(rec.id)
    assert got.state == JobState.RUNNING and got.cancel_requested
    assert await queue.heartbeat(rec.id, w1) is False
    after = await last_seq(queue)
    await queue.mark_cancelled(rec.id, "not-its-lease")  # not its claim: nothing happens
    await queue.mark_cancelled(rec.id, "w1")             # a worker id is not a lease
    assert (await queue.get(rec.id)).state == JobState.RUNNING
    await queue.mark_cancelled(rec.id, w1)
    got = await queue.get(rec.id)
    assert got.state == JobState.CANCELLED and got.finished_at is not None and got.lease_id is None
    assert [(e.job_id, e.kind) for e in await all_events(queue, after)] == [(rec.id, EventKind.CANCELLED)]
    assert await queue.claim("w1") is None
    assert await queue.cancel(rec.id) is False
    assert await queue.finish(rec.id, w1, 0.5) is False


async def test_a_cancelled_run_that_then_fails_ends_cancelled(queue: JobQueue):
    """The user pressed Cancel, and before the worker saw it the run failed (a step that ran out
    of memory, say): the job ends as its user asked, cancelled, not failed or retried."""
    for retry in (True, False):
        rec = await queue.submit(spec())
        lease = (await queue.claim("w1")).lease_id
        assert await queue.cancel(rec.id) is True
        after = await last_seq(queue)
        assert await queue.fail(rec.id, lease, "RuntimeError: out of memory", retry=retry) == JobState.CANCELLED
        got = await queue.get(rec.id)
        assert got.state == JobState.CANCELLED and got.error is None and got.lease_id is None
        assert [(e.job_id, e.kind) for e in await all_events(queue, after)] == [(rec.id, EventKind.CANCELLED)]
        assert await queue.claim("w1") is None


async def test_a_cancel_stores_its_reason_as_the_records_error(queue: JobQueue):
    """`cancel(reason=)`: a queued job's record says why at once (its event too); no reason, no
    `error`. An earlier attempt's failure reason is not how a cancelled job ended: it goes."""
    rec = await queue.submit(spec(1))
    after = await last_seq(queue)
    assert await queue.cancel(rec.id, reason="by an admin") is True
    got = await queue.get(rec.id)
    assert got.state == JobState.CANCELLED and got.error == "by an admin"
    assert [(e.kind, e.message) for e in await all_events(queue, after)] == [(EventKind.CANCELLED, "by an admin")]
    assert await queue.cancel(rec.id, reason="again") is False and (await queue.get(rec.id)).error == "by an admin"

    for reason in (None, "banned word"):
        retried = await queue.submit(spec(2))
        lease = (await queue.claim("w1")).lease_id
        assert await queue.fail(retried.id, lease, "RuntimeError: out of memory") == JobState.QUEUED
        assert (await queue.get(retried.id)).error == "RuntimeError: out of memory"
        assert await queue.cancel(retried.id, reason=reason) is True
        got = await queue.get(retried.id)
        assert got.state == JobState.CANCELLED and got.error == reason, reason


async def test_a_running_jobs_cancel_reason_survives_every_way_its_worker_ends_it(queue_factory: QueueFactory):
    """The reason goes with the request and stays through mark_cancelled, fail, release and a
    sweep of the lost worker's lease; a second request keeps the first one's reason; an author's
    request (no reason) leaves no earlier failure reason behind."""
    q = await queue_factory.open(lease=0.3, max_attempts=5)

    async def running_job() -> tuple[str, str]:
        rec = await q.submit(spec(1))
        got = await q.claim("w1")
        assert got.id == rec.id
        return rec.id, got.lease_id

    endings = {
        "mark_cancelled": lambda job_id, lease: q.mark_cancelled(job_id, lease),
        "fail": lambda job_id, lease: q.fail(job_id, lease, "RuntimeError: out of memory"),
        "release": lambda job_id, lease: q.release(job_id, lease),
    }
    for name, end in endings.items():
        job_id, lease = await running_job()
        assert await q.cancel(job_id, reason="by an admin") is True
        running = await q.get(job_id)
        assert running.state == JobState.RUNNING and running.cancel_requested and running.error == "by an admin"
        assert await q.cancel(job_id, reason="banned word") is True      # asked again: the first reason stays
        await end(job_id, lease)
        got = await q.get(job_id)
        assert got.state == JobState.CANCELLED and got.error == "by an admin", name

    job_id, lease = await running_job()                # its worker is lost: the sweep ends the cancel
    assert await q.cancel(job_id, reason="banned word") is True
    await asyncio.sleep(0.45)                          # the lease has passed
    assert await q.sweep() == 1
    got = await q.get(job_id)
    assert got.state == JobState.CANCELLED and got.error == "banned word"

    job_id, lease = await running_job()                # an earlier attempt failed; its author cancels this one
    assert await q.fail(job_id, lease, "RuntimeError: out of memory") == JobState.QUEUED
    lease = (await q.claim("w1")).lease_id
    assert (await q.get(job_id)).error == "RuntimeError: out of memory"
    assert await q.cancel(job_id) is True
    await q.mark_cancelled(job_id, lease)
    got = await q.get(job_id)
    assert got.state == JobState.CANCELLED and got.error is None


async def test_a_run_finished_after_its_cancel_was_asked_ends_cancelled(queue: JobQueue):
    """Its worker finished the run before it saw the request (between two heartbeats): the cancel
    wins, as it does over `fail` and `release`. CANCELLED with the cancel's reason and the CANCELLED
    event, no DONE; `finish` still says it ended the job; the run's similarity is kept. Redis's
    worker stats count it aborted, not complete."""
    cancelled = await queue.submit(spec(1))
    done = await queue.submit(spec(2))
    leases = {r.id: r.lease_id for r in [await queue.claim("w1"), await queue.claim("w1")]}
    assert await queue.cancel(cancelled.id, reason="by an admin") is True
    after = await last_seq(queue)
    assert await queue.finish(cancelled.id, leases[cancelled.id], 0.42) is True
    assert await queue.finish(done.id, leases[done.id], 0.5) is True
    got = await queue.get(cancelled.id)
    assert (got.state, got.error, got.lease_id) == (JobState.CANCELLED, "by an admin", None)
    assert got.finished_at is not None and got.similarity == pytest.approx(0.42)
    assert (await queue.get(done.id)).state == JobState.DONE
    assert [(e.job_id, e.kind) for e in await all_events(queue, after)] == [
        (cancelled.id, EventKind.CANCELLED), (done.id, EventKind.DONE)]
    assert {r.id for r in await queue.undelivered()} == {cancelled.id, done.id}
    assert await queue.finish(cancelled.id, leases[cancelled.id], 0.5) is False   # ended: the fence refuses
    if hasattr(queue, "_stats"):   # Redis: SAQ's worker registry
        assert queue._stats["w1"] == {"complete": 1, "failed": 0, "retried": 0, "aborted": 1}


async def test_a_replacing_cancel_sets_its_reason_only_while_the_job_has_not_ended(queue: JobQueue):
    """`cancel(replace_reason=True)` (a banned word's) puts its reason over an earlier request's on
    a running job, and the worker's end keeps it; a plain second request keeps the first reason.
    A finished job's reason never changes."""
    rec = await queue.submit(spec(1))
    lease_id = (await queue.claim("w1")).lease_id
    assert await queue.cancel(rec.id, reason="by an admin") is True
    assert await queue.cancel(rec.id, reason="banned word") is True
    assert (await queue.get(rec.id)).error == "by an admin"
    assert await queue.cancel(rec.id, reason="banned word", replace_reason=True) is True
    got = await queue.get(rec.id)
    assert (got.state, got.cancel_requested, got.error) == (JobState.RUNNING, True, "banned word")
    await queue.mark_cancelled(rec.id, lease_id)
    assert await queue.cancel(rec.id, reason="by an admin", replace_reason=True) is False
    got = await queue.get(rec.id)
    assert (got.state, got.error) == (JobState.CANCELLED, "banned word")

    done = await queue.submit(spec(2))
    assert await queue.finish(done.id, (await queue.claim("w1")).lease_id, 0.3) is True
    assert await queue.cancel(done.id, reason="banned word", replace_reason=True) is False
    got = await queue.get(done.id)
    assert (got.state, got.error, got.cancel_requested) == (JobState.DONE, None, False)


async def test_finish_and_late_finish(queue: JobQueue):
    rec = await queue.submit(spec())
    w1 = (await queue.claim("w1")).lease_id
    assert await queue.finish(rec.id, "w1", 0.9) is False  # the worker id is not the lease
    assert await queue.finish(rec.id, "", 0.9) is False
    assert (await queue.get(rec.id)).state == JobState.RUNNING
    after = await last_seq(queue)
    assert await queue.finish(rec.id, w1, 0.31) is True
    got = await queue.get(rec.id)
    assert got.state == JobState.DONE and got.similarity == pytest.approx(0.31) and got.finished_at is not None
    events = await all_events(queue, after)
    assert [(e.job_id, e.kind) for e in events] == [(rec.id, EventKind.DONE)]
    assert events[0].similarity == pytest.approx(0.31)
    assert await queue.finish(rec.id, w1, 0.5) is False
    assert await queue.heartbeat(rec.id, w1) is False
    assert (await queue.get(rec.id)).worker_id == "w1"  # who ran it stays on the record
    assert await queue.running() == []


async def test_a_failed_job_is_retried_on_another_worker_when_one_is_alive(queue_factory: QueueFactory):
    """A job that failed on w1 (out of memory on the smallest GPU, say) is not w1's to claim again
    for a lease while another worker is alive (it claimed or heartbeated within two leases): the
    retry goes elsewhere. A worker alone takes it back at once, and after the lease anyone may. A
    worker that has only announced itself (compiling before its first claim: minutes on a GPU)
    can take no retry yet: it does not count."""
    q = await queue_factory.open(lease=2.0, max_attempts=5)
    rec = await q.submit(spec(1))
    got = await q.claim("w1")
    await q.announce_worker("w-compiling", init_images=True)
    assert await q.fail(rec.id, got.lease_id, "out of memory") == JobState.QUEUED
    got = await q.claim("w1")                       # alone (w-compiling claims nothing yet): w1 takes it back
    assert got.id == rec.id and got.attempts == 2 and got.worker_id == "w1"

    assert await q.claim("w2") is None             # w2 is alive now (nothing for it yet)
    assert await q.fail(rec.id, got.lease_id, "out of memory") == JobState.QUEUED
    assert await q.claim("w1") is None             # w2 is alive: not w1's again for now
    got = await q.claim("w2")
    assert got.id == rec.id and got.attempts == 3 and got.worker_id == "w2"
    assert await q.finish(rec.id, got.lease_id, 0.5)

    other = await q.submit(spec(2))
    got = await q.claim("w2")
    assert await q.fail(other.id, got.lease_id, "out of memory") == JobState.QUEUED
    assert await q.claim("w2") is None             # w1 still alive: not w2's for a lease
    await asyncio.sleep(2.3)                       # the lease has passed (w1 is still within two)
    got = await q.claim("w2")
    assert got.id == other.id and got.attempts == 2


async def test_fail_retries_at_front_until_cap(queue_factory: QueueFactory):
    q = await queue_factory.open(max_attempts=3)
    rec = await q.submit(spec(1))
    other = await q.submit(spec(2))
    for attempt in (1, 2):
        got = await q.claim("w")
        assert got.id == rec.id and got.attempts == attempt
        after = await last_seq(q)
        assert await q.fail(rec.id, got.lease_id, f"boom {attempt}") == JobState.QUEUED
        assert await q.fail(rec.id, got.lease_id, "twice") is None  # refused, no change: not running
        assert await q.position(rec.id) == 1 and await q.position(other.id) == 2
        got = await q.get(rec.id)
        assert got.state == JobState.QUEUED and got.worker_id is None
        events = await all_events(q, after)
        assert [(e.kind, e.message) for e in events] == [(EventKind.QUEUED, f"boom {attempt}")]
    got = await q.claim("w")
    assert got.id == rec.id and got.attempts == 3
    assert await q.fail(rec.id, "other-lease", "late") is None  # not its claim: refused, no change
    assert await q.fail("nosuchjob", got.lease_id, "late") is None
    assert (await q.get(rec.id)).state == JobState.RUNNING
    after = await last_seq(q)
    assert await q.fail(rec.id, got.lease_id, "boom 3") == JobState.FAILED
    got = await q.get(rec.id)
    assert got.state == JobState.FAILED and got.error == "boom 3" and got.finished_at is not None
    assert [(e.kind, e.message) for e in await all_events(q, after)] == [(EventKind.FAILED, "boom 3")]
    # retry=False fails at once
    got = await q.claim("w")
    assert got.id == other.id
    assert await q.fail(other.id, got.lease_id, "bad prompt", retry=False) == JobState.FAILED
    assert (await q.get(other.id)).attempts == 1


async def test_lease_expiry_requeues_at_front(queue_factory: QueueFactory):
    q = await queue_factory.open(lease=0.3, max_attempts=2)
    a = await q.submit(spec(1))
    b = await q.submit(spec(2))
    got = await q.claim("w1")
    assert got.id == a.id
    w1 = got.lease_id
    await asyncio.sleep(0.45)
    after = await last_seq(q)
    assert await q.sweep() == 1
    got = await q.get(a.id)
    assert got.state == JobState.QUEUED and got.worker_id is None and got.attempts == 1 and got.lease_id is None
    assert await q.position(a.id) == 1 and await q.position(b.id) == 2
    assert [(e.kind, e.message) for e in await all_events(q, after)] == [(EventKind.QUEUED, "worker lost")]
    got = await q.claim("w2")
    assert got.id == a.id and got.attempts == 2 and got.worker_id == "w2"
    w2 = got.lease_id
    assert w2 and w2 != w1
    # the first worker comes back late: its lease is gone
    assert await q.heartbeat(a.id, w1) is False
    assert await q.finish(a.id, w1, 0.1) is False
    assert await q.heartbeat(a.id, w2) is True
    await asyncio.sleep(0.45)
    after = await last_seq(q)
    got = await q.claim("w3")  # sweeps first: a has used its 2 attempts
    assert got.id == b.id
    failed = await q.get(a.id)
    assert failed.state == JobState.FAILED and failed.error == "worker lost 2 times"
    events = [e for e in await all_events(q, after) if e.job_id == a.id]
    assert [(e.kind, e.message) for e in events] == [(EventKind.FAILED, "worker lost 2 times")]
    assert await q.finish(a.id, w2, 0.1) is False


async def test_a_claim_leaves_the_claiming_workers_own_expired_leases_to_others(queue_factory: QueueFactory):
    """A claim sweeps expired leases first, but not the claiming worker's own: a claim of w1's that
    reached the store only after w1's lease ran out (sent just before the link went down, retried
    until it came back) must not hand w1 back the job it is still running, as a second attempt with
    the first run dropped. Another worker's claim does sweep it, and takes it over."""
    q = await queue_factory.open(lease=0.3)
    a = await q.submit(spec(1, "a"))
    b = await q.submit(spec(2, "b"))
    first = await q.claim("w1")
    assert first.id == a.id
    await asyncio.sleep(0.45)   # w1's lease on a ran out (its heartbeats did not get through)
    got = await q.claim("w1")
    assert got is not None and got.id == b.id   # the next job, not a again
    assert await q.claim("w1") is None
    still = await q.get(a.id)
    assert (still.state, still.worker_id, still.lease_id, still.attempts) == (JobState.RUNNING, "w1", first.lease_id, 1)
    got = await q.claim("w2")
    assert got is not None and got.id == a.id and got.worker_id == "w2" and got.attempts == 2
    assert await q.heartbeat(a.id, first.lease_id) is False


async def test_heartbeat_keeps_the_lease(queue_factory: QueueFactory):
    q = await queue_factory.open(lease=0.3)
    rec = await q.submit(spec())
    w1 = (await q.claim("w1")).lease_id
    for _ in range(4):
        await asyncio.sleep(0.12)
        assert await q.heartbeat(rec.id, w1) is True
    assert await q.sweep() == 0
    assert (await q.get(rec.id)).worker_id == "w1"


async def test_leases_expiring_together_go_back_in_the_order_their_runs_started(queue_factory: QueueFactory):
    """Two leases found expired by one sweep go back to the front of the line in the order their
    runs started, the earliest frontmost, whatever their expiries (a heartbeat moved the first
    one's past the second's): the same line on every backend."""
    q = await queue_factory.open(lease=0.6)
    a = await q.submit(spec(1, "a"))
    b = await q.submit(spec(2, "b"))
    got_a = await q.claim("w1")
    got_b = await q.claim("w2")
    assert (got_a.id, got_b.id) == (a.id, b.id)
    assert await q.heartbeat(a.id, got_a.lease_id) is True   # a's lease now ends after b's
    await asyncio.sleep(0.9)
    assert await q.sweep() == 2
    assert [r.id for r in await q.queued()] == [a.id, b.id]
    assert [(await q.claim("w3")).id, (await q.claim("w3")).id] == [a.id, b.id]


async def test_release_returns_to_front_without_counting(queue: JobQueue):
    a = await queue.submit(spec(1))
    b = await queue.submit(spec(2))
    w1 = (await queue.claim("w1")).lease_id
    assert await queue.release(a.id, "w1") is False  # a worker id, not the claim's lease
    assert await queue.release(a.id, w1) is True
    assert await queue.release(a.id, w1) is False
    got = await queue.get(a.id)
    assert got.state == JobState.QUEUED and got.attempts == 0 and got.worker_id is None and got.lease_id is None
    assert [r.id for r in await queue.queued()] == [a.id, b.id]
    assert (await queue.claim("w1")).attempts == 1


async def test_history_newest_first(queue: JobQueue):
    j1 = await queue.submit(spec(1, "one", channel=10))
    j2 = await queue.submit(spec(2, "two", channel=10))
    other = await queue.submit(spec(1, "elsewhere", channel=CHANNEL))
    j3 = await queue.submit(spec(1, "three", channel=10))
    await queue.claim("w")
    await queue.finish(j1.id, await lease(queue, j1.id), 0.2)
    assert [r.id for r in await queue.history(10)] == [j3.id, j2.id, j1.id]
    assert [r.id for r in await queue.history(10, limit=2)] == [j3.id, j2.id]
    assert (await queue.history(10))[2].state == JobState.DONE
    assert [r.id for r in await queue.history(CHANNEL)] == [other.id]
    assert await queue.history(12345) == []


async def test_delivery_once_and_undelivered(queue_factory: QueueFactory):
    q = await queue_factory.open()
    q2 = await queue_factory.open()
    done = await q.submit(spec(1))
    failed = await q.submit(spec(2))
    cancelled = await q.submit(spec(3))
    waiting = await q.submit(spec(4))
    await q.claim("w")
    await q.claim("w")
    await q.finish(done.id, await lease(q, done.id), 0.3)
    await q.fail(failed.id, await lease(q, failed.id), "oops", retry=False)
    await q.cancel(cancelled.id)
    assert {r.id for r in await q.undelivered()} == {done.id, failed.id, cancelled.id}
    results = await asyncio.gather(q.mark_delivered(done.id), q2.mark_delivered(done.id), q.mark_delivered(done.id))
    assert sorted(results) == [False, False, True]
    assert (await q.get(done.id)).delivered is True
    assert await q2.mark_delivered(done.id) is False
    assert {r.id for r in await q2.undelivered()} == {failed.id, cancelled.id}
    assert await q.mark_delivered(failed.id) is True
    assert await q.mark_delivered(cancelled.id) is True
    assert await q.undelivered() == []
    assert (await q.get(waiting.id)).delivered is False


async def test_settings_and_reply_persist_across_reopen(queue_factory: QueueFactory):
    q = await queue_factory.open()
    rec = await q.submit(spec(reply={"interaction_token": "t"}))
    await q.set_setting("paused", True)
    await q.set_setting("limits", {"per_user": 3, "presets": ["fast", "seed"]})
    await q.set_reply(rec.id, {"channel_id": CHANNEL, "message_id": BIG_USER})
    assert await q.get_setting("missing", "dflt") == "dflt"
    await q.close()
    q2 = await queue_factory.open()
    assert await q2.get_setting("paused") is True
    assert await q2.get_setting("limits") == {"per_user": 3, "presets": ["fast", "seed"]}
    assert (await q2.get(rec.id)).spec.reply == {"channel_id": CHANNEL, "message_id": BIG_USER}
    await q2.set_setting("paused", False)
    assert await q2.get_setting("paused") is False


async def test_queue_survives_reopen(queue_factory: QueueFactory):
    q = await queue_factory.open()
    recs = [await q.submit(spec(u % 3, f"p{u}")) for u in range(7)]
    running = await q.claim("w")
    order = [r.id for r in await q.queued()]
    seq_before = await last_seq(q)
    await q.close()

    q2 = await queue_factory.open()
    assert [r.id for r in await q2.queued()] == order
    assert [await q2.position(i) for i in order] == list(range(1, 7))
    assert [r.id for r in await q2.running()] == [running.id]
    assert (await q2.get(recs[-1].id)).spec.prompt == "p6"
    old = await all_events(q2)
    assert old and old[-1].seq == seq_before
    await q2.publish(JobEvent(running.id, EventKind.PROGRESS, iteration=50))
    new = await q2.events(after=seq_before, timeout=0)
    assert len(new) == 1 and new[0].seq > seq_before
    assert (await q2.claim("w")).id == order[0]


async def test_checkpoints_and_artifacts_round_trip(queue: JobQueue):
    rec = await queue.submit(spec())
    assert await queue.load_checkpoint(rec.id) is None
    blob = os.urandom(5 * 1024 * 1024)
    await queue.save_checkpoint(Checkpoint(rec.id, 50, b"old"))
    await queue.save_checkpoint(Checkpoint(rec.id, 100, blob))
    ck = await queue.load_checkpoint(rec.id)
    assert ck is not None and ck.job_id == rec.id and ck.iteration == 100 and ck.data == blob
    assert await queue.get_artifact(rec.id, "video.mp4") is None
    await queue.put_artifact(rec.id, "video.mp4", blob)
    await queue.put_artifact(rec.id, "final.png", b"\x89PNG")
    assert await queue.get_artifact(rec.id, "video.mp4") == blob
    assert await queue.get_artifact(rec.id, "final.png") == b"\x89PNG"
    assert await queue.get_artifact("other", "final.png") is None
    assert await queue.has_artifact(rec.id, "video.mp4") and not await queue.has_artifact(rec.id, "state.pt")
    assert not await queue.has_artifact("other", "final.png")


async def test_events_long_poll_wakes_on_publish(queue_factory: QueueFactory):
    q = await queue_factory.open()
    other = await queue_factory.open()
    rec = await q.submit(spec())
    after = await last_seq(q)

    started = time.monotonic()
    assert await q.events(after=after, timeout=0.3) == []
    assert 0.25 <= time.monotonic() - started < 1.5

    async def publish_later(target: JobQueue) -> None:
        await asyncio.sleep(0.3)
        await target.publish(JobEvent(rec.id, EventKind.PROGRESS, iteration=50, frame_png=b"x"))

    for publisher in (q, other):  # the same object, and another process
        task = asyncio.create_task(publish_later(publisher))
        started = time.monotonic()
        events = await q.events(after=after, timeout=5)
        elapsed = time.monotonic() - started
        await task
        assert [e.iteration for e in events] == [50] and events[0].frame_png == b"x"
        assert 0.2 <= elapsed < 1.5
        after = events[-1].seq


async def test_concurrent_claimers_never_share_a_job(queue_factory: QueueFactory):
    q = await queue_factory.open()
    ids = {(await q.submit(spec(i % 5, f"job {i}"))).id for i in range(50)}
    claimers = [await queue_factory.open() for _ in range(4)]
    claimed: list[tuple[str, str]] = []

    async def work(worker: JobQueue, name: str) -> None:
        while (rec := await worker.claim(name)) is not None:
            claimed.append((rec.id, name))
            await asyncio.sleep(0.01)  # "work", so that the claimers interleave
            assert await worker.finish(rec.id, rec.lease_id, 0.5) is True

    await asyncio.gather(*(work(c, f"w{i}") for i, c in enumerate(claimers)))
    assert sorted(i for i, _ in claimed) == sorted(ids)
    assert len({name for _, name in claimed}) > 1
    for job_id in ids:
        rec = await q.get(job_id)
        assert rec.attempts == 1 and rec.state == JobState.DONE


# --- submit_many and the per-user cap (max_queued) ------------------------------------------------


async def _snapshot(q: JobQueue, user: int) -> tuple:
    """What a refused submit must leave as it was: the counts, the line, the event log."""
    return (await q.count_queued(), await q.count_queued(user), [r.id for r in await q.queued()], await last_seq(q))


async def test_submit_many_queues_a_batch_in_order_each_with_its_event(queue: JobQueue):
    a0 = await queue.submit(spec(1, "a0"))
    b0 = await queue.submit(spec(BIG_USER, "b0"))
    after = await last_seq(queue)
    batch = [spec(1, f"set {i}", grid=32 * (1 + i % 2), extra={"set": {"index": i}}) for i in range(3)]
    recs = await queue.submit_many(batch, max_queued=4)  # 1 + 3: exactly at the cap
    assert [r.spec.prompt for r in recs] == ["set 0", "set 1", "set 2"]
    assert len({r.id for r in recs} | {a0.id, b0.id}) == 5 and all(r.state == JobState.QUEUED for r in recs)
    for rec, s in zip(recs, batch):
        got = await queue.get(rec.id)
        assert got.spec == s and got.state == JobState.QUEUED and got.created_at == pytest.approx(rec.created_at)
    # FIFO behind the user's own first job; the fair line puts the other user's first job in between.
    line = [a0, b0, *recs]
    assert [r.id for r in await queue.queued()] == [r.id for r in line]
    for place, rec in enumerate(line, 1):
        assert await queue.position(rec.id) == place
    assert await queue.count_queued(1) == 4 and await queue.count_queued() == 5
    assert [(e.job_id, e.kind) for e in await all_events(queue, after)] == [(r.id, EventKind.QUEUED) for r in recs]
    assert [r.id for r in await queue.history(CHANNEL)] == [r.id for r in reversed(line)]
    got = await queue.submit(spec(1, "single"), max_queued=5)  # submit() takes the cap too
    assert await queue.position(got.id) == 6
    assert [(await queue.claim("w")).id for _ in range(6)] == [r.id for r in line] + [got.id]


async def test_submit_many_takes_one_users_jobs_and_an_empty_batch_is_nothing(queue: JobQueue):
    await queue.submit(spec(1))
    before = await _snapshot(queue, 1)
    assert await queue.submit_many([]) == [] and await queue.submit_many([], max_queued=0) == []
    for cap in (None, 10):
        with pytest.raises(ValueError):
            await queue.submit_many([spec(1, "mine"), spec(2, "not mine")], max_queued=cap)
    assert await _snapshot(queue, 1) == before


async def test_max_queued_refuses_over_the_cap_and_queues_nothing(queue: JobQueue):
    first = await queue.submit(spec(1, "first"), max_queued=3)
    await queue.submit_many([spec(1, "second"), spec(1, "third")], max_queued=3)
    for _ in range(4):
        await queue.submit(spec(2, "theirs"), max_queued=4)  # another user's jobs count for them alone
    before = await _snapshot(queue, 1)
    with pytest.raises(QueueLimitReached) as err:
        await queue.submit(spec(1, "refused"), max_queued=3)
    assert (err.value.queued, err.value.limit) == (3, 3) and isinstance(err.value, Exception)
    with pytest.raises(QueueLimitReached) as err:  # one of the two would fit: neither is queued
        await queue.submit_many([spec(1, "refused"), spec(1, "refused")], max_queued=4)
    assert (err.value.queued, err.value.limit) == (3, 4)
    with pytest.raises(QueueLimitReached) as err:
        await queue.submit(spec(3, "refused"), max_queued=0)
    assert (err.value.queued, err.value.limit) == (0, 0)
    assert await _snapshot(queue, 1) == before
    assert "refused" not in {r.spec.prompt for r in await queue.history(CHANNEL, 50)}

    # Only QUEUED jobs count: not a running one, not a cancelled one; a job put back in line does.
    got = await queue.claim("w")
    assert got.id == first.id
    fourth = await queue.submit(spec(1, "fourth"), max_queued=3)
    assert await queue.cancel(fourth.id) is True
    await queue.submit(spec(1, "fifth"), max_queued=3)
    assert await queue.fail(first.id, got.lease_id, "retry me") == JobState.QUEUED
    with pytest.raises(QueueLimitReached) as err:
        await queue.submit(spec(1, "sixth"), max_queued=4)
    assert (err.value.queued, err.value.limit) == (4, 4)
    await queue.submit(spec(1, "no cap"))  # without max_queued nothing is refused
    assert await queue.count_queued(1) == 5


async def _submit_or_refusal(q: JobQueue, specs: list[JobSpec], cap: int) -> list[JobRecord] | QueueLimitReached:
    try:
        return await q.submit_many(specs, max_queued=cap)
    except QueueLimitReached as exc:
        return exc


async def test_the_cap_holds_when_submits_race(queue_factory: QueueFactory):
    """Ten submits at once for one user with room for three: three queued, seven refused. Once on
    one queue object, once spread over three (other processes on the same file / Redis), and with
    sets: each set all or nothing, never interleaved with another."""
    one = await queue_factory.open()
    many = [one, await queue_factory.open(), await queue_factory.open()]
    for user, queues in ((7, [one]), (8, many)):
        results = await asyncio.gather(*(
            _submit_or_refusal(queues[i % len(queues)], [spec(user, f"race {i}")], 3) for i in range(10)))
        queued = [r[0] for r in results if isinstance(r, list)]
        refused = [r for r in results if isinstance(r, QueueLimitReached)]
        assert len(queued) == 3 and len(refused) == 7, results
        assert all((e.queued, e.limit) == (3, 3) for e in refused)
        assert await one.count_queued(user) == 3
        assert sorted(r.id for r in await many[1].queued() if r.spec.user_id == user) == sorted(r.id for r in queued)

    sets = [[spec(9, f"set {i} #{k}") for k in range(2)] for i in range(6)]
    results = await asyncio.gather(*(_submit_or_refusal(many[i % 3], s, 5) for i, s in enumerate(sets)))
    accepted = [r for r in results if isinstance(r, list)]
    refused = [r for r in results if isinstance(r, QueueLimitReached)]
    assert len(accepted) == 2 and len(refused) == 4, results
    assert all((e.queued, e.limit) == (4, 5) for e in refused)
    line = [r.id for r in await one.queued() if r.spec.user_id == 9]
    first, second = ([r.id for r in s] for s in accepted)
    assert line in (first + second, second + first)


async def test_sqlite_reads_are_answered_while_a_large_write_holds_the_file(tmp_path):
    """A full-size checkpoint takes the file's write lock for seconds; the bot's quick reads before
    it answers Discord (3 s) must not wait for it: they use the reader connection (WAL)."""
    from engine.queue.sqlite import SQLiteJobQueue

    q = SQLiteJobQueue(tmp_path / "q.db")
    await q.start()
    try:
        job = await q.submit(spec(1, "a house"))
        blob = os.urandom(192 * 2**20)   # a grid-64 state.pt, as the worker keeps it
        write = asyncio.create_task(q.put_artifact(job.id, "state.pt", blob))
        await asyncio.sleep(0.01)        # the write has the connection (and soon the file)
        reads = 0
        while not write.done():
            assert await q.count_queued(1) == 1 and (await q.get(job.id)).state == JobState.QUEUED
            reads += 1
        await write
        assert reads >= 2, "every read waited for the write"
        assert await q.get_artifact(job.id, "state.pt") == blob
    finally:
        await q.close()


async def test_sqlite_reads_are_answered_while_a_large_read_is_in_flight(tmp_path):
    """A worker loading a big state or checkpoint (here 192 MiB) reads for a while; the bot's quick
    reads (a Remix button opening its form must answer within 3 s) go through another connection."""
    from engine.queue.sqlite import SQLiteJobQueue

    q = SQLiteJobQueue(tmp_path / "q.db")
    await q.start()
    try:
        job = await q.submit(spec(1, "a house"))
        blob = os.urandom(192 * 2**20)
        await q.put_artifact(job.id, "state.pt", blob)
        big_read = asyncio.create_task(q.get_artifact(job.id, "state.pt"))
        await asyncio.sleep(0.01)        # the big read has its connection
        reads = 0
        while not big_read.done():
            assert (await q.get(job.id)).state == JobState.QUEUED and await q.has_artifact(job.id, "state.pt")
            reads += 1
        assert await big_read == blob
        assert reads >= 2, "every quick read waited for the big one"
    finally:
        await q.close()


async def test_sqlite_submit_many_that_fails_half_way_queues_nothing(tmp_path):
    """The second job's insert fails (a channel id SQLite cannot store) after the first one's went
    in: the transaction is rolled back whole."""
    from engine.queue.sqlite import SQLiteJobQueue

    q = SQLiteJobQueue(tmp_path / "q.db")
    await q.start()
    try:
        await q.submit(spec(1, "before"))
        before = await _snapshot(q, 1)
        with pytest.raises(OverflowError):
            await q.submit_many([spec(1, "ok"), spec(1, "too big", channel=2**63), spec(1, "after")], max_queued=9)
        assert await _snapshot(q, 1) == before
        assert [r.spec.prompt for r in await q.history(CHANNEL)] == ["before"]
        rec = await q.submit(spec(1, "later"))  # and the queue goes on as before
        assert [r.id for r in await q.queued()][-1] == rec.id and await q.position(rec.id) == 2
    finally:
        await q.close()


async def test_redis_event_log_lost_and_renumbered_past_the_cursor_is_read_from_its_start(redis_server):
    """Redis lost its data (FLUSHDB here) and its new event numbering has already passed the
    reader's cursor: the new log's epoch differs, so events() reads it from the start instead of
    skipping the first new events."""
    import uuid

    from engine.queue.redis import RedisJobQueue

    q = RedisJobQueue(redis_server.url, prefix=f"epoch-{uuid.uuid4().hex[:8]}")
    await q.start()
    try:
        for i in range(3):
            await q.submit(spec(1, f"old {i}"))
        old = await all_events(q)
        cursor = old[-1].seq
        assert cursor == 3
        await q.redis.flushdb()
        new = [await q.submit(spec(2, f"new {i}")) for i in range(5)]   # new numbers 1..5, past 3
        got = await q.events(after=cursor, timeout=0)
        assert [e.job_id for e in got] == [r.id for r in new]
        assert [e.seq for e in got] == [1, 2, 3, 4, 5]
        # and from then on, the same log: nothing read twice
        more = await q.submit(spec(2, "later"))
        assert [e.job_id for e in await q.events(after=got[-1].seq, timeout=0)] == [more.id]
    finally:
        await q.close()


async def test_redis_jobs_from_before_the_guild_field_are_held_by_their_servers_pause(redis_server):
    """A job queued by the version before the `guild` field (made here by removing the field) gets
    it when a queue object starts, from its spec, exactly (64-bit ids), so that its server's pause
    holds it like any other."""
    import uuid

    from engine.jobs import guild_paused_key
    from engine.queue.redis import RedisJobQueue

    prefix = f"guild-{uuid.uuid4().hex[:8]}"
    old = RedisJobQueue(redis_server.url, prefix=prefix)
    await old.start()
    try:
        guild = 1_180_000_000_000_000_001
        job = await old.submit(spec(1, guild_id=guild))
        other = await old.submit(spec(2, guild_id=guild + 1))
        for j in (job, other):
            await old.redis.hdel(old._k("job", j.id), "guild")
        await old.set_setting(guild_paused_key(guild), True)
        new = RedisJobQueue(redis_server.url, prefix=prefix)
        await new.start()
        try:
            assert await new.redis.hget(new._k("job", job.id), "guild") == str(guild).encode()
            assert (await new.claim("w")).id == other.id   # the paused server's job is held
            assert await new.claim("w") is None
        finally:
            await new.close()
    finally:
        await old.close()


async def test_redis_jobs_from_before_the_needs_encoder_field_are_marked_at_the_next_start(redis_server):
    """Submit marks a job that needs the dVAE encoder (`needs_encoder`). One queued by a version
    before that field (made here by removing it) is not known to until the next start() marks it
    (its spec read, as for the `guild` field); until then a worker without the encoder claims it
    (and its NoEncoder failure hands it on)."""
    import uuid

    from engine.queue.redis import RedisJobQueue

    q = RedisJobQueue(redis_server.url, prefix=f"enc-{uuid.uuid4().hex[:8]}")
    await q.start()
    try:
        upload = upload_id_of(b"a start picture")
        assert await q.put_artifact(upload, "image.png", b"png") is True
        new = await q.submit(spec(1, extra=image_ref(upload, "init_image")))
        old = await q.submit(spec(2, extra=image_ref(upload, "init_image")))
        plain = await q.submit(spec(3))
        assert await q.redis.hget(q._k("job", new.id), "needs_encoder") == b"1"
        assert await q.redis.hget(q._k("job", plain.id), "needs_encoder") is None
        await q.redis.hdel(q._k("job", old.id), "needs_encoder")
        again = RedisJobQueue(redis_server.url, prefix=q.prefix)
        await again.start()   # as after the upgrade
        try:
            assert await q.redis.hget(q._k("job", old.id), "needs_encoder") == b"1"
            assert await q.redis.hget(q._k("job", plain.id), "needs_encoder") is None
        finally:
            await again.close()
        await q.redis.hdel(q._k("job", old.id), "needs_encoder")   # an old job again, not restarted since
        assert [(await q.claim("w", init_images=False)).id for _ in range(2)] == [old.id, plain.id]
        assert await q.claim("w", init_images=False) is None
        assert (await q.claim("w")).id == new.id
    finally:
        await q.close()


async def test_redis_restart_grace_ends_when_the_clock_is_behind_its_start(redis_server):
    """The grace a restarted Redis gives (no sweep for a lease) is measured from when the first sweep
    saw it back (`<prefix>:server` since). Were the host's clock to step back after that (NTP after a
    reboot), the grace would last the step longer, every lost worker's job stuck meanwhile: a clock
    behind `since` gets no grace. (Redis's clock cannot be stepped here: `since` is put an hour
    ahead instead, which is what the clock an hour back looks like.)"""
    import uuid

    from engine.queue.redis import RedisJobQueue

    q = RedisJobQueue(redis_server.url, prefix=f"clock-{uuid.uuid4().hex[:8]}", lease=0.3)
    await q.start()
    try:
        rec = await q.submit(spec())
        assert (await q.claim("w1")).id == rec.id   # its sweep records this Redis's run_id and since when
        await asyncio.sleep(0.45)   # the lease ran out, and so did the grace
        await q.redis.hset(q._k("server"), "since", repr(time.time() + 3600))
        assert await q.sweep() == 1
        assert (await q.get(rec.id)).state == JobState.QUEUED
    finally:
        await q.close()


async def test_redis_refusing_the_password_fails_at_once_not_after_the_reconnect_timeout():
    """A Redis that wants a password, given none or a wrong one: the queue's start fails within
    seconds with Redis's own reason (and the URL's password never in it), instead of retrying an
    authentication error as if the link were down until `reconnect_timeout` (30 s) ran out."""
    from redis import exceptions as redis_errors

    from engine.queue.redis import RedisJobQueue

    server = start_redis("--requirepass", "right-pw")
    try:
        for url in (server.url, server.url.replace("redis://", "redis://:wrong-pw@")):
            q = RedisJobQueue(url, prefix="auth", reconnect_timeout=30)
            started = time.monotonic()
            with pytest.raises(redis_errors.AuthenticationError) as refused:
                await q.start()
            await q.close()
            assert time.monotonic() - started < 5, time.monotonic() - started
            assert "wrong-pw" not in str(refused.value)
        q = RedisJobQueue(server.url.replace("redis://", "redis://:right-pw@"), prefix="auth")
        await q.start()
        try:
            assert (await q.get((await q.submit(spec())).id)).state == JobState.QUEUED
        finally:
            await q.close()
    finally:
        server.stop()


async def test_redis_start_that_failed_leaves_the_queue_unstarted_and_can_be_retried():
    """No Redis there yet (reconnect_timeout 0: no waiting for it): start() fails, and fails again
    when retried (not "started" by the first try's half-made client), the queue refuses calls as
    unstarted in between; once Redis is up, start() connects and the queue works."""
    from redis import exceptions as redis_errors

    from engine.queue.redis import RedisJobQueue

    port = free_port()
    q = RedisJobQueue(f"redis://127.0.0.1:{port}/0", prefix="restart-start", reconnect_timeout=0)
    for _ in range(2):
        with pytest.raises(redis_errors.ConnectionError):
            await q.start()
        assert q.redis is None
        with pytest.raises(RuntimeError, match="not started"):
            await q.submit(spec())
    server = start_redis(port=port)
    try:
        await q.start()
        rec = await q.submit(spec())
        assert (await q.get(rec.id)).state == JobState.QUEUED
    finally:
        await q.close()
        server.stop()


async def test_redis_a_cancelled_blob_write_leaves_no_staged_chunks(redis_server):
    """A checkpoint write cancelled half-way through its chunks (the worker's task cancelled) drops
    what it had staged at once, as a failed one does, instead of leaving it for the staging TTL."""
    import uuid

    from engine.queue.redis import RedisJobQueue

    q = RedisJobQueue(redis_server.url, prefix=f"stage-{uuid.uuid4().hex[:8]}", blob_chunk=1024)
    await q.start()
    try:
        rec = await q.submit(spec())
        got = await q.claim("w")
        run, third_chunk = q._run, asyncio.Event()

        async def stalled_at_the_third_chunk(name: str, *args, **kwargs):
            if name == "stage_chunk" and args[1] == 2:   # args: blob id, chunk number, bytes, ttl
                third_chunk.set()
                await asyncio.Event().wait()             # until cancelled
            return await run(name, *args, **kwargs)

        q._run = stalled_at_the_third_chunk
        write = asyncio.create_task(q.save_checkpoint(Checkpoint(rec.id, 5, os.urandom(8 * 1024)), got.lease_id))
        await asyncio.wait_for(third_chunk.wait(), 10)
        staged = q._k("stage", "*")
        assert len(await q.redis.keys(staged)) == 1      # chunks 0 and 1 are there
        write.cancel()
        with pytest.raises(asyncio.CancelledError):
            await write
        del q._run
        assert await q.redis.keys(staged) == []
        assert await q.load_checkpoint(rec.id) is None
    finally:
        await q.close()


async def test_redis_submit_resent_after_a_lost_reply_queues_once(redis_server):
    """The submit script re-sent with the same token (a reconnect retry) answers the same and queues
    the batch once; a refusal re-sent is the same refusal."""
    import uuid

    from engine.queue.redis import RedisJobQueue

    q = RedisJobQueue(redis_server.url, prefix=f"idem-{uuid.uuid4().hex[:8]}")
    await q.start()
    try:
        def args(token: str, cap: str, *ids: str) -> list:
            out = [q.prefix, token, repr(time.time()), q.keep_events, q.max_attempts, repr(q.lease), cap, "5", len(ids)]
            for job_id in ids:
                out += [job_id, str(CHANNEL), "32", "300", json.dumps(spec(5, job_id).to_dict()), "", "", "", "0"]
            return out

        batch = args("token-s1", "2", "job0000000a1", "job0000000a2")
        assert await q._scripts["submit"](keys=[], args=batch) == b"ok"
        assert await q._scripts["submit"](keys=[], args=batch) == b"ok"
        assert await q.count_queued(5) == 2 and len(await all_events(q)) == 2
        refused = args("token-s2", "2", "job0000000a3")
        assert await q._scripts["submit"](keys=[], args=refused) == b"limit 2"
        assert await q._scripts["submit"](keys=[], args=refused) == b"limit 2"
        assert await q._scripts["submit"](keys=[], args=args("token-s3", "", "job0000000a1")) == b"exists"
        assert await q.count_queued(5) == 2 and len(await all_events(q)) == 2
        assert await q.get("job0000000a3") is None
    finally:
        await q.close()


async def test_clear_cancels_every_queued_job(queue: JobQueue):
    recs = [await queue.submit(spec(i % 2)) for i in range(4)]
    running = await queue.claim("w")
    assert await queue.clear() == 3
    assert await queue.count_queued() == 0
    for r in recs:
        if r.id != running.id:
            assert (await queue.get(r.id)).state == JobState.CANCELLED
    assert (await queue.get(running.id)).state == JobState.RUNNING
    assert await queue.clear() == 0


async def test_clear_of_one_server_cancels_only_its_queued_jobs(queue: JobQueue):
    # Discord's ids are 64-bit: two servers whose ids a double could not tell apart
    a, b = 1_180_000_000_000_000_001, 1_180_000_000_000_000_002
    a_jobs = [await queue.submit(spec(u, guild_id=a)) for u in (1, 2, 1)]
    b_jobs = [await queue.submit(spec(u, guild_id=b)) for u in (1, 3)]
    dm_job = await queue.submit(spec(4))
    running = await queue.claim("w")
    assert running.id == a_jobs[0].id
    assert await queue.clear(guild_id=a) == 2
    assert {r.id for r in await queue.queued()} == {b_jobs[0].id, b_jobs[1].id, dm_job.id}
    assert [(await queue.get(r.id)).state for r in a_jobs[1:]] == [JobState.CANCELLED] * 2
    assert (await queue.get(running.id)).state == JobState.RUNNING     # running jobs go on
    cancelled = [e for e in await all_events(queue) if e.kind == EventKind.CANCELLED]
    assert sorted(e.job_id for e in cancelled) == sorted(r.id for r in a_jobs[1:])
    assert await queue.clear(guild_id=a) == 0
    assert await queue.count_queued(1) == 1 and await queue.count_queued(2) == 0
    assert await queue.clear(guild_id=b) == 2 and [r.id for r in await queue.queued()] == [dm_job.id]


async def test_clear_stores_its_reason_on_every_job_it_cancels(queue: JobQueue):
    """`clear` stores CLEARED as each cancelled job's `error` unless given another reason, on the
    whole line and on one server's (two paths in the Redis backend); its events carry it too."""
    server = 1_180_000_000_000_000_001
    mine = [await queue.submit(spec(u, guild_id=server)) for u in (1, 2)]
    after = await last_seq(queue)
    assert await queue.clear(guild_id=server, reason="by the owner") == 2
    assert [(await queue.get(r.id)).error for r in mine] == ["by the owner"] * 2
    assert {e.message for e in await all_events(queue, after)} == {"by the owner"}
    everyone = [await queue.submit(spec(u, guild_id=g)) for u, g in ((1, server), (3, None))]
    after = await last_seq(queue)
    assert await queue.clear() == 2
    assert [(await queue.get(r.id)).error for r in everyone] == [CLEARED] * 2 == ["queue cleared"] * 2
    assert {e.message for e in await all_events(queue, after)} == {CLEARED}
    cleared = await queue.submit(spec(4, guild_id=server))
    assert await queue.clear(guild_id=server) == 1 and (await queue.get(cleared.id)).error == CLEARED


async def test_workers_registry(queue: JobQueue):
    rec = await queue.submit(spec())
    got = await queue.claim("gpu-0")
    assert await queue.heartbeat(rec.id, got.lease_id) is True
    workers = await queue.workers()
    assert "gpu-0" in workers and workers["gpu-0"]["job_id"] == rec.id
    assert abs(workers["gpu-0"]["last_seen"] - time.time()) < 5


async def test_a_worker_that_stopped_leaves_the_registry_and_the_retry_rule_at_once(queue_factory: QueueFactory):
    """forget_worker (a clean stop): the worker is out of workers() at once, through any queue
    object, not two leases later, and no longer counts as another live worker for claim's retry
    rule: a job that failed on the one left is that one's to take back at once. A claim under the
    same id (it started again) lists it again; forgetting an unknown id is no error."""
    q, other = await queue_factory.open(lease=30.0, max_attempts=5), await queue_factory.open(lease=30.0)
    assert await q.claim("w-stopping") is None                  # idle, alive
    rec = await q.submit(spec(1))
    await q.announce_worker("w-compiling", init_images=True)
    got = await q.claim("w1")
    assert await q.fail(rec.id, got.lease_id, "out of memory") == JobState.QUEUED
    assert await q.claim("w1") is None                          # w-stopping is alive: not w1's for a lease
    assert set(await other.workers()) == {"w-stopping", "w-compiling", "w1"}

    await q.forget_worker("w-stopping")
    await other.forget_worker("w-compiling")                    # announced only: it goes too
    assert set(await q.workers()) == set(await other.workers()) == {"w1"}
    got = await q.claim("w1")                                   # alone now: w1 takes it back at once
    assert got is not None and got.id == rec.id and got.attempts == 2
    await q.forget_worker("never-seen")
    assert await q.claim("w-stopping") is None                  # started again: listed again
    assert set(await other.workers()) == {"w-stopping", "w1"}
    assert await q.heartbeat(rec.id, got.lease_id) is True


async def test_workers_registry_says_which_workers_take_init_image_jobs(queue_factory: QueueFactory):
    """Each worker's entry says whether its claims take the jobs that need the dVAE encoder
    (`init_images`, as its last claim said), kept through its heartbeats, whichever queue object
    (process) they go through: the bot reads it to refuse an init_image job that no live worker
    would ever run."""
    claims, other = await queue_factory.open(), await queue_factory.open()
    first, second = await claims.submit(spec()), await claims.submit(spec(user=2))
    held = [await claims.claim("gpu-no-encoder", init_images=False) for _ in range(2)]
    assert [r.id for r in held] == [first.id, second.id]
    assert await claims.claim("gpu-encoder") is None   # the default: it has one
    # A heartbeat through a queue object that never saw its claims (on Redis: one that writes the
    # entry at once, knowing nothing of the worker) keeps what the claim said.
    assert await other.heartbeat(second.id, held[1].lease_id) is True
    workers = await claims.workers()
    assert workers["gpu-no-encoder"]["init_images"] is False and workers["gpu-no-encoder"]["job_id"] == second.id
    assert workers["gpu-encoder"]["init_images"] is True
    # Its next claim (the worker restarted with an encoder) says so, through either object; a later
    # heartbeat through the object that saw the earlier claim (it writes: another job) keeps that.
    assert await other.claim("gpu-no-encoder", init_images=True) is None
    assert (await claims.workers())["gpu-no-encoder"]["init_images"] is True
    assert await claims.heartbeat(first.id, held[0].lease_id) is True
    workers = await other.workers()
    assert workers["gpu-no-encoder"]["init_images"] is True and workers["gpu-no-encoder"]["job_id"] == first.id


async def test_a_worker_that_announces_itself_is_in_the_registry_before_its_first_claim(queue: JobQueue):
    """A worker that claims nothing yet (compiling before its first claim: minutes on a GPU)
    announces itself: it is live at once, with whether it takes init_image jobs, and no job. Its
    claims then keep it there, as they do any worker."""
    await queue.announce_worker("gpu-compiling", init_images=False)
    await queue.announce_worker("gpu-encoder", init_images=True)
    workers = await queue.workers(max_age=10)
    assert set(workers) == {"gpu-compiling", "gpu-encoder"}
    assert (workers["gpu-compiling"]["init_images"], workers["gpu-compiling"]["job_id"]) == (False, None)
    assert (workers["gpu-encoder"]["init_images"], workers["gpu-encoder"]["job_id"]) == (True, None)
    assert abs(workers["gpu-compiling"]["last_seen"] - time.time()) < 5
    assert workers["gpu-compiling"]["claimed_at"] is None   # announced, never claimed

    rec = await queue.submit(spec())
    got = await queue.claim("gpu-compiling", init_images=False)   # compiled: its first claim
    assert got is not None and got.id == rec.id
    workers = await queue.workers(max_age=10)
    assert (workers["gpu-compiling"]["init_images"], workers["gpu-compiling"]["job_id"]) == (False, rec.id)
    assert workers["gpu-compiling"]["last_seen"] >= workers["gpu-encoder"]["last_seen"]
    assert abs(workers["gpu-compiling"]["claimed_at"] - time.time()) < 5
    assert workers["gpu-encoder"]["claimed_at"] is None
    # An announcement after claims (the worker restarted, compiling again) keeps its last claim's time.
    claimed_at = workers["gpu-compiling"]["claimed_at"]
    await queue.announce_worker("gpu-compiling", init_images=False)
    assert (await queue.workers(max_age=10))["gpu-compiling"]["claimed_at"] == claimed_at


async def test_redis_worker_entry_of_an_earlier_version_reads_as_taking_init_images(redis_server):
    """An entry an earlier version wrote (SAQ's worker_info without `init_images`) reads as a worker
    with the encoder until its next claim says (a wrong True fails safe: the job is queued, as
    before). (SQLite: the migration test.)"""
    import uuid

    from engine.queue.redis import RedisJobQueue

    q = RedisJobQueue(redis_server.url, prefix=f"old-worker-{uuid.uuid4().hex[:8]}")
    await q.start()
    try:
        await q.saq.write_worker_info("old-gpu", {"stats": {}, "queue_key": q.prefix,
                                                  "metadata": {"job_id": None, "last_seen": time.time()}}, ttl=60)
        assert (await q.workers())["old-gpu"]["init_images"] is True
    finally:
        await q.close()


async def test_redis_worker_entries_live_through_the_bots_window_of_a_long_lease(redis_server):
    """The bot asks `workers(max_age=)` for two leases (bot.launcher.worker_window); SAQ's registry
    entries must outlive that, or with a lease over 30 s a worker silent for a minute would vanish
    from /healthz and the encoder check sooner on Redis than on SQLite."""
    import uuid

    from engine.queue.redis import RedisJobQueue

    for lease in (2.0, 30.0, 45.0):
        q = RedisJobQueue(redis_server.url, prefix=f"ttl-{uuid.uuid4().hex[:8]}", lease=lease)
        await q.start()
        try:
            await q.announce_worker("gpu", init_images=True)
            ttl = await q._client().ttl(q.saq.namespace("worker_info:gpu"))
            assert ttl >= max(60, 2 * lease + 5) - 1, (lease, ttl)   # - 1: the TTL counts down
        finally:
            await q.close()


@pytest.mark.parametrize("lease", ["inf", "nan", "0", "-5"])
async def test_a_lease_that_is_no_time_is_refused_by_either_backend(tmp_path, redis_server, lease):
    from engine.queue import open_queue

    for url in (f"sqlite:///{tmp_path}/l.db?lease={lease}", f"{redis_server.url}?lease={lease}"):
        with pytest.raises(ValueError, match="lease must be a finite number of seconds above 0"):
            open_queue(url)


async def test_open_queue_urls(tmp_path, redis_server):
    from engine.queue import open_queue
    from engine.queue.redis import RedisJobQueue
    from engine.queue.sqlite import SQLiteJobQueue

    q = open_queue(str(tmp_path / "a.db"))
    assert isinstance(q, SQLiteJobQueue) and q.path == str(tmp_path / "a.db")
    q = open_queue(f"sqlite:///{tmp_path}/b.db?lease=5&max_attempts=4")
    assert isinstance(q, SQLiteJobQueue) and q.path == f"{tmp_path}/b.db" and q.lease == 5 and q.max_attempts == 4
    q = open_queue("sqlite:///rel.db")
    assert isinstance(q, SQLiteJobQueue) and q.path == "rel.db"
    q = open_queue(redis_server.url + "?prefix=p1&lease=2")
    assert isinstance(q, RedisJobQueue) and q.prefix == "p1" and q.lease == 2
    async with open_queue(redis_server.url + "?prefix=p-open") as rq:
        rec = await rq.submit(spec())
        assert (await rq.get(rec.id)).state == JobState.QUEUED
    with pytest.raises(ValueError):
        open_queue("postgres://x/y")


async def test_redis_survives_server_restart(tmp_path):
    """A redis-server restart mid-run: calls wait for it and go on (persistence on, as in production)."""
    from engine.queue.redis import RedisJobQueue

    server = start_redis("--appendonly", "yes", "--appendfsync", "always", "--dir", str(tmp_path))
    q = RedisJobQueue(server.url, prefix="restart")
    try:
        await q.start()
        rec = await q.submit(spec())
        got = await q.claim("w")
        assert got.id == rec.id
        server.stop()
        restart = asyncio.get_running_loop().run_in_executor(None, lambda: (time.sleep(0.5), server.restart()))
        assert await q.heartbeat(rec.id, got.lease_id) is True  # waits for the server to come back
        await restart
        after = await last_seq(q)
        waiter = asyncio.create_task(q.events(after=after, timeout=5))
        await asyncio.sleep(0.2)
        server.restart()  # while a long-poll is blocked
        await q.publish(JobEvent(rec.id, EventKind.PROGRESS, iteration=10))
        events = await waiter
        assert [e.iteration for e in events] == [10]
        assert await q.finish(rec.id, got.lease_id, 0.4) is True
        assert (await q.get(rec.id)).state == JobState.DONE
    finally:
        await q.close()
        server.stop()


async def test_redis_keeps_a_scripts_reply_longer_than_a_call_retries(redis_server):
    """A re-sent script returns its first reply while its token lives; with a `reconnect_timeout`
    longer than the old fixed two minutes, a re-send could outlive it and a submit ran twice."""
    from engine.queue.redis import RedisJobQueue

    async with RedisJobQueue(redis_server.url, prefix="tokttl", reconnect_timeout=600) as q:
        await q.submit(spec())
        tokens = [k async for k in q.redis.scan_iter(match="tokttl:tok:*")]
        assert tokens and min([await q.redis.ttl(k) for k in tokens]) > 600 + 7 * q.socket_timeout


async def test_redis_demoted_to_a_replica_is_waited_out_like_an_outage(tmp_path):
    """READONLY (the server a queue talks to became a replica in a failover) failed every call at
    once until the process restarted; it is retried like an unreachable Redis, on new connections."""
    from engine.queue.redis import RedisJobQueue

    server = start_redis("--dir", str(tmp_path))
    q = RedisJobQueue(server.url, prefix="demoted", reconnect_timeout=20)
    admin = RedisJobQueue(server.url, prefix="admin")
    try:
        await q.start()
        await admin.start()
        await admin.redis.execute_command("REPLICAOF", "127.0.0.1", "1")   # a replica of nothing: read-only
        submit = asyncio.create_task(q.submit(spec()))
        await asyncio.sleep(1.0)
        assert not submit.done()   # waiting, not failed
        await admin.redis.execute_command("REPLICAOF", "NO", "ONE")     # promoted again
        record = await asyncio.wait_for(submit, 20)
        assert (await q.get(record.id)).state == JobState.QUEUED
    finally:
        await q.close()
        await admin.close()
        server.stop()


async def test_redis_idle_claims_write_nothing(tmp_path):
    """An idle worker claims about 4 times a second, and with production's `appendfsync always`
    every write is an fsync: a claim that finds nothing must write nothing. The worker's liveness
    score (for retrying a failed job on another worker) is rewritten only once it is a quarter of a
    lease old, by a claim or a heartbeat."""
    from engine.queue.redis import RedisJobQueue

    # Its own server, persisting as in production: its write counter and AOF see only this test.
    server = start_redis("--appendonly", "yes", "--appendfsync", "always", "--dir", str(tmp_path))
    q = RedisJobQueue(server.url, prefix="idle")                # a 30 s lease: rewritten after 7.5 s
    quick = RedisJobQueue(server.url, prefix="idle", lease=0.4)  # the same queue, with 0.1 s for a quarter
    try:
        await q.start()
        await quick.start()
        other = await q.submit(spec(1, grid=64))   # queued, not for w1's grid: each claim walks the line

        async def writes() -> tuple[int, int]:
            info = await q.redis.info("persistence")
            return info["rdb_changes_since_last_save"], info["aof_current_size"]

        async def seen(worker: str) -> float | None:
            return await q.redis.zscore(q._k("alive"), worker)

        assert await q.claim("w1", grids=(32,)) is None    # the first: w1 is seen (a write)
        first, before = await seen("w1"), await writes()
        assert first is not None
        for _ in range(20):
            assert await q.claim("w1", grids=(32,)) is None
        assert await writes() == before                    # not one write, nothing appended to the AOF
        assert await seen("w1") == first

        await asyncio.sleep(0.15)                          # a quarter lease has passed: refreshed
        assert await quick.claim("w1", grids=(32,)) is None
        assert await seen("w1") > first

        got = await q.claim("w2")                          # a heartbeat likewise
        assert got.id == other.id
        w2 = await seen("w2")
        assert await q.heartbeat(other.id, got.lease_id) is True
        assert await seen("w2") == w2
        await asyncio.sleep(0.15)
        assert await quick.heartbeat(other.id, got.lease_id) is True
        assert await seen("w2") > w2
    finally:
        await quick.close()
        await q.close()
        server.stop()


async def test_redis_scripts_are_idempotent_when_resent(redis_server):
    """A script re-sent after a lost reply (what a reconnect retry does) answers the same, runs once."""
    import uuid

    from engine.queue.redis import RedisJobQueue

    q = RedisJobQueue(redis_server.url, prefix=f"idem-{uuid.uuid4().hex[:8]}")
    await q.start()
    try:
        a = await q.submit(spec(1))
        b = await q.submit(spec(2))
        base = [q.prefix, "token-1", repr(time.time()), q.keep_events, q.max_attempts, repr(q.lease)]
        first = await q._scripts["claim"](keys=[], args=[*base, "w", "lease-1", "1", -1])
        again = await q._scripts["claim"](keys=[], args=[*base, "w", "lease-1", "1", -1])
        assert first == again == a.id.encode()
        assert (await q.get(b.id)).state == JobState.QUEUED and (await q.get(a.id)).attempts == 1
        assert (await q.get(a.id)).lease_id == "lease-1"
        before = await last_seq(q)
        pub = [*base[:1], "token-2", *base[2:], a.id, "progress", 5, 10, "", "", repr(time.time()), "0", b"", 8]
        assert await q._scripts["publish"](keys=[], args=pub) == await q._scripts["publish"](keys=[], args=pub)
        assert len(await all_events(q, before)) == 1
    finally:
        await q.close()


# --- fencing, checkpoint cleanup, retention, sweeping ---------------------------------------------


async def test_a_stale_workers_writes_are_refused_after_a_take_over(queue_factory: QueueFactory):
    q = await queue_factory.open(lease=0.2)
    rec = await q.submit(spec())
    waiting = await q.submit(spec(2))
    # Not running yet, or not this claim's: refused (and nothing written).
    assert await q.save_checkpoint(Checkpoint(rec.id, 1, b"early"), "some-lease") is False
    assert await q.put_artifact(rec.id, "final.png", b"early", "some-lease") is False
    assert await q.load_checkpoint(rec.id) is None and not await q.has_artifact(rec.id, "final.png")
    w1 = (await q.claim("w1")).lease_id
    assert await q.save_checkpoint(Checkpoint(rec.id, 10, b"w1-ckpt"), w1) is True
    assert await q.put_artifact(rec.id, "final.png", b"w1-png", w1) is True
    assert await q.publish(JobEvent(rec.id, EventKind.PROGRESS, iteration=10, frame_png=b"f1"), w1) is True
    assert await q.save_checkpoint(Checkpoint(rec.id, 11, b"other"), "other-lease") is False
    assert await q.save_checkpoint(Checkpoint(rec.id, 11, b"other"), "w1") is False  # a worker id is no lease
    await asyncio.sleep(0.3)
    assert await q.sweep() == 1  # w1's lease expired, nobody claimed: the sweep alone requeues it
    assert (await q.get(rec.id)).state == JobState.QUEUED and await q.position(rec.id) == 1
    assert await q.save_checkpoint(Checkpoint(rec.id, 12, b"late"), w1) is False  # queued: nobody's
    w2 = (await q.claim("w2")).lease_id
    assert (await q.get(rec.id)).lease_id == w2 != w1
    assert await q.heartbeat(rec.id, w2) is True
    assert await q.save_checkpoint(Checkpoint(rec.id, 20, b"w2-ckpt"), w2) is True
    assert await q.put_artifact(rec.id, "final.png", b"w2-png", w2) is True
    after = await last_seq(q)
    # w1 comes back late: none of its writes land.
    stale = JobEvent(rec.id, EventKind.PROGRESS, iteration=15, frame_png=b"stale")
    assert await q.publish(stale, w1) is False
    assert await q.save_checkpoint(Checkpoint(rec.id, 15, b"w1-stale"), w1) is False
    assert await q.put_artifact(rec.id, "final.png", b"w1-stale", w1) is False
    assert await q.put_artifact(rec.id, "video.mp4", b"w1-stale", w1) is False
    assert await all_events(q, after) == []
    ck = await q.load_checkpoint(rec.id)
    assert (ck.iteration, ck.data) == (20, b"w2-ckpt")
    assert await q.get_artifact(rec.id, "final.png") == b"w2-png" and not await q.has_artifact(rec.id, "video.mp4")
    assert (await q.get(rec.id)).iteration == 10  # the stale PROGRESS did not move the record either
    # Without a lease the writes are unconditional (the bot's uploads, the queue's own events).
    assert await q.put_artifact("upload_x", "image.png", b"img") is True
    assert await q.put_artifact(waiting.id, "note", b"n") is True
    assert await q.publish(JobEvent(waiting.id, EventKind.PROGRESS, iteration=1)) is True
    assert await q.save_checkpoint(Checkpoint(waiting.id, 1, b"c")) is True
    assert await q.finish(rec.id, w2, 0.5) is True
    assert await q.put_artifact(rec.id, "final.png", b"after", w2) is False  # finished: nobody's


async def test_delete_artifact_is_fenced_and_removes_an_earlier_attempts_result(queue_factory: QueueFactory):
    """A run that makes no video deletes the video.mp4 an earlier attempt stored (it lost the job
    before `finish`): fenced as put_artifact, so a stale run cannot delete the new run's; a state.pt
    deleted leaves the kept states' total (and, Redis, no blob behind)."""
    q = await queue_factory.open(lease=0.2)
    rec = await q.submit(spec())
    first = (await q.claim("w1")).lease_id
    big = os.urandom(300_000)
    for name, data in (("final.png", b"run1-png"), ("video.mp4", big), ("state.pt", b"run1-state")):
        assert await q.put_artifact(rec.id, name, data, first) is True
    assert await q.state_bytes() == len(b"run1-state") and await states_stored(q) == 1
    await asyncio.sleep(0.3)   # w1 dies before `finish`: its lease expires, the job goes back
    assert await q.sweep() == 1
    second = (await q.claim("w2")).lease_id
    assert await q.delete_artifact(rec.id, "video.mp4", first) is False   # the stale run: nothing changes
    assert await q.get_artifact(rec.id, "video.mp4") == big
    assert await q.delete_artifact(rec.id, "video.mp4", "some-lease") is False
    assert await q.delete_artifact(rec.id, "video.mp4", second) is True
    assert not await q.has_artifact(rec.id, "video.mp4") and await q.get_artifact(rec.id, "video.mp4") is None
    assert await q.delete_artifact(rec.id, "video.mp4", second) is True   # none there: nothing to do
    assert await q.delete_artifact(rec.id, "state.pt", second) is True
    assert await q.state_bytes() == 0 and await states_stored(q) == 0
    assert await q.get_artifact(rec.id, "final.png") == b"run1-png"   # only the one named goes
    assert await q.finish(rec.id, second, 0.5) is True
    assert await q.delete_artifact(rec.id, "final.png", second) is False   # finished: nobody's
    assert await q.delete_artifact(rec.id, "final.png") is True            # without a lease: unconditional
    assert not await q.has_artifact(rec.id, "final.png")


async def test_the_same_worker_claiming_its_job_again_fences_off_its_first_run(queue_factory: QueueFactory):
    """A worker that stalled past its lease and then claimed the same job again holds a new lease:
    whatever its first (stale) run still writes is refused, the second run's writes land."""
    q = await queue_factory.open(lease=0.2)
    rec = await q.submit(spec())
    first = await q.claim("gpu-1")
    assert await q.save_checkpoint(Checkpoint(rec.id, 10, b"run1-ckpt"), first.lease_id) is True
    assert await q.put_artifact(rec.id, "final.png", b"run1-png", first.lease_id) is True
    await asyncio.sleep(0.3)  # the worker stalls: no heartbeat, its lease expires
    assert await q.sweep() == 1   # swept back (its own claims never sweep its jobs: another's, or its own sweep)
    second = await q.claim("gpu-1")  # ... and the same worker takes it again
    assert second.id == rec.id and second.worker_id == "gpu-1" and second.attempts == 2
    assert second.lease_id and second.lease_id != first.lease_id
    old, new = first.lease_id, second.lease_id
    after = await last_seq(q)

    # The stale run: every fenced call is refused and changes nothing.
    assert await q.heartbeat(rec.id, old) is False
    assert await q.publish(JobEvent(rec.id, EventKind.PROGRESS, iteration=15, frame_png=b"stale"), old) is False
    assert await q.save_checkpoint(Checkpoint(rec.id, 15, b"run1-stale"), old) is False
    assert await q.put_artifact(rec.id, "final.png", b"run1-stale", old) is False
    assert await q.put_artifact(rec.id, "state.pt", b"run1-stale", old) is False
    assert await q.finish(rec.id, old, 0.9) is False
    assert await q.fail(rec.id, old, "stale failure") is None
    assert await q.fail(rec.id, old, "stale failure", retry=False) is None
    await q.mark_cancelled(rec.id, old)
    assert await q.release(rec.id, old) is False
    assert await all_events(q, after) == []
    got = await q.get(rec.id)
    assert (got.state, got.lease_id, got.worker_id, got.attempts, got.iteration) == (
        JobState.RUNNING, new, "gpu-1", 2, 0)
    assert got.error is None and got.similarity is None
    ck = await q.load_checkpoint(rec.id)
    assert (ck.iteration, ck.data) == (10, b"run1-ckpt")  # what run 1 wrote while it held the job stays
    assert await q.get_artifact(rec.id, "final.png") == b"run1-png" and not await q.has_artifact(rec.id, "state.pt")

    # The second run: its writes land.
    assert await q.heartbeat(rec.id, new) is True
    assert await q.publish(JobEvent(rec.id, EventKind.PROGRESS, iteration=20, frame_png=b"run2"), new) is True
    assert await q.save_checkpoint(Checkpoint(rec.id, 20, b"run2-ckpt"), new) is True
    assert await q.put_artifact(rec.id, "final.png", b"run2-png", new) is True
    assert (await q.load_checkpoint(rec.id)).data == b"run2-ckpt"
    assert await q.save_checkpoint(Checkpoint(rec.id, 21, b"run1-stale"), old) is False  # still refused
    assert (await q.load_checkpoint(rec.id)).data == b"run2-ckpt"
    assert await q.finish(rec.id, old, 0.9) is False
    assert await q.finish(rec.id, new, 0.4) is True
    got = await q.get(rec.id)
    assert got.state == JobState.DONE and got.similarity == pytest.approx(0.4) and got.lease_id is None
    assert await q.get_artifact(rec.id, "final.png") == b"run2-png"
    events = [(e.kind, e.iteration) for e in await all_events(q, after)]
    assert events == [(EventKind.PROGRESS, 20), (EventKind.DONE, 20)]


async def test_a_stale_lease_cannot_requeue_or_release_the_new_run(queue_factory: QueueFactory):
    """fail(retry=True) and release() with an old lease must not put the new run back in line."""
    q = await queue_factory.open(lease=0.2, max_attempts=5)
    rec = await q.submit(spec())
    old = (await q.claim("gpu-1")).lease_id
    await asyncio.sleep(0.3)
    assert await q.sweep() == 1   # its lease ran out: back in line, and the same worker takes it again
    new = (await q.claim("gpu-1")).lease_id
    assert await q.fail(rec.id, old, "oom", retry=True) is None
    assert await q.release(rec.id, old) is False
    assert (await q.get(rec.id)).state == JobState.RUNNING and await q.position(rec.id) is None
    assert await q.release(rec.id, new) is True
    got = await q.get(rec.id)
    assert got.state == JobState.QUEUED and got.lease_id is None and got.attempts == 1
    third = await q.claim("gpu-1")
    assert third.lease_id not in (old, new)
    assert await q.fail(rec.id, new, "oom", retry=True) is None  # the released run is stale too
    assert await q.fail(rec.id, third.lease_id, "oom", retry=True) == JobState.QUEUED


async def test_checkpoints_are_deleted_when_a_job_ends(queue: JobQueue):
    recs = [await queue.submit(spec(u)) for u in range(6)]
    done, failed, cancelled, retried, released, queued = recs
    leases = {}
    for _ in range(5):
        got = await queue.claim("w")
        leases[got.id] = got.lease_id
    for rec in recs:
        assert await queue.save_checkpoint(Checkpoint(rec.id, 5, b"ck-" + rec.id.encode())) is True
    await queue.put_artifact(done.id, "state.pt", b"state", leases[done.id])
    assert await queue.finish(done.id, leases[done.id], 0.3) is True
    assert await queue.fail(failed.id, leases[failed.id], "bad", retry=False) == JobState.FAILED
    assert await queue.cancel(cancelled.id) is True
    await queue.mark_cancelled(cancelled.id, leases[cancelled.id])
    assert await queue.fail(retried.id, leases[retried.id], "oom", retry=True) == JobState.QUEUED
    assert await queue.release(released.id, leases[released.id]) is True
    assert await queue.cancel(queued.id) is True
    for rec in (done, failed, cancelled, queued):
        assert await queue.load_checkpoint(rec.id) is None, (await queue.get(rec.id)).state
    for rec in (retried, released):  # back in the line: they resume from it
        assert (await queue.load_checkpoint(rec.id)).data == b"ck-" + rec.id.encode()
    assert await queue.get_artifact(done.id, "state.pt") == b"state"  # Continue / Remix need it


async def test_prune_removes_old_delivered_jobs_only(queue_factory: QueueFactory):
    q = await queue_factory.open()
    q2 = await queue_factory.open()
    chan = 77
    old = [await q.submit(spec(u, f"old {u}", channel=chan)) for u in range(3)]   # done, failed, cancelled
    old_undelivered = await q.submit(spec(3, "old, never posted", channel=chan))
    leases = {}
    for _ in range(4):
        got = await q.claim("w")
        leases[got.id] = got.lease_id
    for rec in (old[0], old_undelivered):
        await q.publish(JobEvent(rec.id, EventKind.PROGRESS, iteration=1, frame_png=b"frame-" + rec.id.encode()))
        await q.put_artifact(rec.id, "final.png", b"png", leases[rec.id])
        await q.put_artifact(rec.id, "state.pt", b"state", leases[rec.id])
        await q.save_checkpoint(Checkpoint(rec.id, 1, b"ck"), leases[rec.id])
    await q.finish(old[0].id, leases[old[0].id], 0.2)
    await q.finish(old_undelivered.id, leases[old_undelivered.id], 0.2)
    await q.fail(old[1].id, leases[old[1].id], "bad", retry=False)
    await q.cancel(old[2].id)
    await q.mark_cancelled(old[2].id, leases[old[2].id])
    for rec in old:
        assert await q.mark_delivered(rec.id) is True
    await q.put_artifact("upload_keep", "image.png", b"img")  # old, but a waiting job (below) names it
    assert await q.prune(3600) == 0  # nothing that old
    await asyncio.sleep(0.3)
    recent = await q.submit(spec(5, "recent", channel=chan))
    got = await q.claim("w")
    await q.finish(recent.id, got.lease_id, 0.1)
    await q.mark_delivered(recent.id)
    running = await q.submit(spec(6, "running", channel=chan))
    waiting = await q.submit(spec(7, "waiting", channel=chan,
                                  extra={"image_prompt": {"artifact": ["upload_keep", "image.png"], "weight": 1}}))
    await q.claim("w")

    pruned_at = time.monotonic()
    counts = await asyncio.gather(q.prune(0.2), q2.prune(0.2))  # two workers at once: each job once
    assert sum(counts) == 3
    for rec in old:
        assert await q.get(rec.id) is None
        assert not await q.has_artifact(rec.id, "final.png") and await q.get_artifact(rec.id, "state.pt") is None
        assert await q.load_checkpoint(rec.id) is None
        assert await q.mark_delivered(rec.id) is False
    assert [e.frame_png for e in await all_events(q) if e.job_id == old[0].id and e.frame_png] == []
    history = [r.id for r in await q.history(chan, limit=50)]
    assert history == [waiting.id, running.id, recent.id, old_undelivered.id]
    kept = await q.get(old_undelivered.id)
    assert kept.state == JobState.DONE and await q.get_artifact(old_undelivered.id, "state.pt") == b"state"
    assert [r.id for r in await q.undelivered()] == [old_undelivered.id]
    frames = [e.frame_png for e in await all_events(q) if e.job_id == old_undelivered.id and e.frame_png]
    assert frames == [b"frame-" + old_undelivered.id.encode()]
    assert (await q.get(recent.id)).state == JobState.DONE
    assert (await q.get(running.id)).state == JobState.RUNNING and (await q.get(waiting.id)).state == JobState.QUEUED
    assert await q.get_artifact("upload_keep", "image.png") == b"img"
    # Again: nothing left to prune. (Counted from the first prune: `recent`, under 0.2 s old then,
    # may have aged past 0.2 s during the checks on a slow machine.)
    assert await q.prune(0.2 + (time.monotonic() - pruned_at) + 1.0) == 0
    # Delivered later: pruned once it is old enough.
    assert await q.mark_delivered(old_undelivered.id) is True
    assert await q.prune(0.2) == 1 and await q.get(old_undelivered.id) is None
    assert await q.prune(0) == 1 and await q.get(recent.id) is None


async def states_stored(q: JobQueue) -> int:
    """How many `state.pt` artifacts the backend's storage holds, and (Redis) that no blob is left
    behind by a dropped one: every blob key is pointed to by an artifact or a checkpoint."""
    if hasattr(q, "redis"):
        client = q.redis
        pointed, states = set(), 0
        async for key in client.scan_iter(match=q._k("artp", "*")):
            for name, ptr in (await client.hgetall(key)).items():
                pointed.add(ptr.split()[0].decode())
                states += name == b"state.pt"
        async for key in client.scan_iter(match=q._k("ckpt", "*")):
            pointed.add((await client.hget(key, "blob")).decode())
        blobs = {key.decode().rsplit(":", 1)[1] async for key in client.scan_iter(match=q._k("blob", "*"))}
        assert blobs == pointed
        return states
    with sqlite3.connect(q.path) as db:
        return db.execute("SELECT COUNT(*) FROM artifacts WHERE name = 'state.pt'").fetchone()[0]


async def test_prune_drops_old_states_alone_and_keeps_their_jobs(queue_factory: QueueFactory):
    """prune(older_than, state_older_than): the state.pt of jobs finished and delivered more than
    `state_older_than` ago goes; their records, pictures, videos and history stay until `older_than`."""
    q = await queue_factory.open()
    q2 = await queue_factory.open()
    chan = 78
    old = [await q.submit(spec(u, f"old {u}", channel=chan)) for u in range(5)]  # done x3, failed, cancelled
    undelivered = await q.submit(spec(5, "old, never posted", channel=chan))
    running = await q.submit(spec(6, "running", channel=chan))
    leases = {}
    for _ in range(7):
        got = await q.claim("w")
        leases[got.id] = got.lease_id
    for rec in (*old, undelivered, running):
        for name in ("final.png", "video.mp4", "state.pt"):
            assert await q.put_artifact(rec.id, name, f"{name} {rec.id}".encode(), leases[rec.id]) is True
    for rec in (*old[:3], undelivered):
        assert await q.finish(rec.id, leases[rec.id], 0.2) is True
    assert await q.fail(old[3].id, leases[old[3].id], "bad", retry=False) == JobState.FAILED
    assert await q.cancel(old[4].id) is True
    await q.mark_cancelled(old[4].id, leases[old[4].id])
    for rec in old:
        assert await q.mark_delivered(rec.id) is True
    assert await q.prune(3600, 5) == 0 and await states_stored(q) == 7   # nothing is 5 s old yet
    old_end = time.time()
    await asyncio.sleep(0.3)
    young = await q.submit(spec(7, "young", channel=chan))
    got = await q.claim("w")
    for name in ("final.png", "state.pt"):
        await q.put_artifact(young.id, name, f"{name} {young.id}".encode(), got.lease_id)
    young_start = time.time()
    await q.finish(young.id, got.lease_id, 0.1)

    def between() -> float:
        """An age that the old jobs have passed and the young one has not (however slow this runs)."""
        return time.time() - (old_end + young_start) / 2

    await q.mark_delivered(young.id)
    # state_older_than None (the default) is older_than's: nothing more than before.
    assert await q.prune(3600) == 0 and await states_stored(q) == 8

    # Two workers at once, in small batches (paging past jobs that keep theirs): no whole job goes.
    counts = await asyncio.gather(q.prune(3600, between(), batch=2), q2.prune(3600, between(), batch=2))
    assert counts == [0, 0]
    for rec in old:
        kept = await q.get(rec.id)
        assert kept is not None and kept.state in (JobState.DONE, JobState.FAILED, JobState.CANCELLED)
        assert not await q.has_artifact(rec.id, "state.pt") and await q.get_artifact(rec.id, "state.pt") is None
        for name in ("final.png", "video.mp4"):
            assert await q.get_artifact(rec.id, name) == f"{name} {rec.id}".encode(), name
        assert await q.mark_delivered(rec.id) is False   # still delivered, once
    for rec in (undelivered, running, young):   # not delivered, not finished, too young: everything stays
        assert await q.get_artifact(rec.id, "state.pt") == f"state.pt {rec.id}".encode(), rec.prompt
        assert await q.has_artifact(rec.id, "final.png")
    assert await states_stored(q) == 3
    history = [r.id for r in await q.history(chan, limit=50)]
    assert set(history) == {r.id for r in (*old, undelivered, running, young)}
    assert [r.id for r in await q.undelivered()] == [undelivered.id]
    assert (await q.get(running.id)).state == JobState.RUNNING
    assert await q.prune(3600, between()) == 0 and await states_stored(q) == 3   # again: nothing more to drop

    # Once delivered, the old undelivered one loses its state too; `older_than` math.inf: states only.
    assert await q.mark_delivered(undelivered.id) is True
    assert await q.prune(math.inf, between()) == 0
    assert await q.get_artifact(undelivered.id, "state.pt") is None and await q.get(undelivered.id) is not None
    assert await q.has_artifact(undelivered.id, "final.png") and await states_stored(q) == 2
    # A `state_older_than` longer than `older_than` changes nothing: the whole jobs go as before.
    assert await q.prune(between(), 3600) == 6   # the old five and the once-undelivered one
    for rec in (*old, undelivered):
        assert await q.get(rec.id) is None and not await q.has_artifact(rec.id, "final.png")
    assert await q.get_artifact(young.id, "state.pt") == f"state.pt {young.id}".encode()
    assert await q.prune(0, 0) == 1 and await q.get(young.id) is None   # count: whole jobs only
    assert await states_stored(q) == 1   # the running job's


# --- retention of the parents of queued and running jobs -------------------------------------------


async def finished_parent(q: JobQueue, user: int, prompt: str, chan: int = 79) -> JobRecord:
    """A job run to the end (final.png, state.pt) and delivered: what Continue / Remix start from.
    Call it while nothing else is queued (it claims the next job)."""
    rec = await q.submit(spec(user, prompt, channel=chan))
    got = await q.claim("w")
    assert got.id == rec.id
    for name in ("final.png", "state.pt"):
        assert await q.put_artifact(rec.id, name, f"{name} {rec.id}".encode(), got.lease_id) is True
    assert await q.finish(rec.id, got.lease_id, 0.3) is True
    assert await q.mark_delivered(rec.id) is True
    return rec


def child(user: int, parent: JobRecord, kind: str = "continue", prompt: str = "more") -> JobSpec:
    return spec(user, prompt, channel=80, parent_job_id=parent.id, parent_kind=kind)


async def intact(q: JobQueue, rec: JobRecord) -> bool:
    """The job is still in the store with its record, picture and final state."""
    return (await q.get(rec.id) is not None
            and await q.get_artifact(rec.id, "final.png") == f"final.png {rec.id}".encode()
            and await q.get_artifact(rec.id, "state.pt") == f"state.pt {rec.id}".encode())


async def test_prune_keeps_the_parent_of_a_queued_or_running_job_until_it_ends(queue_factory: QueueFactory):
    """A job that a queued or running job starts from (`parent_job_id`: a Continue, a Remix) is not
    pruned, neither whole nor its state alone, however old: not while its child waits in the line,
    runs (claimed, under a lease), or is back in the line for another attempt; nor while any of
    several children is left. The first prune after its last such child has ended (done,
    cancelled) removes it like any other."""
    q = await queue_factory.open()
    q2 = await queue_factory.open()
    p_queued = await finished_parent(q, 1, "parent of a queued remix")
    p_running = await finished_parent(q, 2, "parent of a running continue")
    p_retried = await finished_parent(q, 3, "parent of a continue back in line after a failure")
    p_two = await finished_parent(q, 4, "parent of two")
    free = await finished_parent(q, 5, "nobody's parent")   # the control: it goes
    parents = (p_queued, p_running, p_retried, p_two)
    running = await q.submit(child(11, p_running))
    got = await q.claim("w2")
    assert got.id == running.id
    retried = await q.submit(child(12, p_retried))
    got_retried = await q.claim("w2")
    assert got_retried.id == retried.id
    assert await q.fail(retried.id, got_retried.lease_id, "out of memory", retry=True) == JobState.QUEUED
    two = [await q.submit(child(13, p_two, "remix")), await q.submit(child(14, p_two))]
    queued = await q.submit(child(10, p_queued, "remix"))
    await asyncio.sleep(0.3)   # every parent is past both cutoffs below

    # States alone first (older_than math.inf), then whole jobs: from two processes at once, in
    # batches smaller than the parents kept (paging past them).
    assert await q.prune(math.inf, 0.2, batch=2) == 0
    assert await q.get(free.id) is not None and not await q.has_artifact(free.id, "state.pt")
    counts = await asyncio.gather(q.prune(0.2, 0.2, batch=2), q2.prune(0.2, 0.2, batch=2))
    assert sorted(counts) == [0, 1] and await q.get(free.id) is None
    for rec in parents:
        assert await intact(q, rec), rec.spec.prompt
    assert (await q.get(running.id)).state == JobState.RUNNING
    assert (await q.get(retried.id)).state == JobState.QUEUED and (await q.get(queued.id)).state == JobState.QUEUED

    # One of two children ends: the other still holds the parent. The running child finishes, the
    # queued one is cancelled, the retried one runs to the end: their parents go at the next prune.
    assert await q.cancel(two[0].id) is True
    assert await q.finish(running.id, got.lease_id, 0.4) is True
    assert await q.cancel(queued.id) is True
    got_retried = await q.claim("w")
    assert got_retried.id == retried.id
    assert await q.finish(retried.id, got_retried.lease_id, 0.4) is True
    assert await q.prune(0.2, 0.2) == 3
    for rec in (p_queued, p_running, p_retried):
        assert await q.get(rec.id) is None and not await q.has_artifact(rec.id, "state.pt"), rec.spec.prompt
    assert await intact(q, p_two)
    assert await q.prune(math.inf, 0.2) == 0 and await intact(q, p_two)   # not its state alone either
    got = await q.claim("w")
    assert got.id == two[1].id
    assert await q.prune(0.2, 0.2) == 0 and await intact(q, p_two)      # running now: still held
    assert await q.fail(two[1].id, got.lease_id, "bad prompt", retry=False) == JobState.FAILED
    assert await q.prune(math.inf, 0.2) == 0
    assert await q.get(p_two.id) is not None and not await q.has_artifact(p_two.id, "state.pt")
    # The children themselves (finished, not delivered) are all still there.
    for rec in (running, retried, queued, *two):
        assert (await q.get(rec.id)).state.finished, rec.spec.prompt


async def test_a_child_whose_parents_state_is_gone_is_refused_and_nothing_is_written(queue_factory: QueueFactory):
    """submit / submit_many of a job whose parent's state.pt is gone (pruned, or never there) raises
    ParentGone naming that parent, and queues nothing of the batch: no job, no event, no place in
    the line, no reference. A child of a parent whose state is there is queued as usual."""
    q = await queue_factory.open()
    kept = await finished_parent(q, 1, "its state is kept")
    pruned = await finished_parent(q, 2, "its state is pruned")
    await asyncio.sleep(0.3)
    kept_child = await q.submit(child(3, kept))          # holds `kept` through the prune
    assert await q.prune(math.inf, 0.2) == 0
    assert await q.get(pruned.id) is not None and not await q.has_artifact(pruned.id, "state.pt")
    assert await q.has_artifact(kept.id, "state.pt")
    before = await _snapshot(q, 4)
    history = [r.id for r in await q.history(80, 50)]
    for specs in ([child(4, pruned)], [spec(4, "plain"), child(4, kept), child(4, pruned, "remix")],
                  [spec(4, "plain", parent_job_id="nosuchjob00", parent_kind="remix")]):
        for cap in (None, 10):
            with pytest.raises(ParentGone) as err:
                await q.submit_many(specs, max_queued=cap)
            assert err.value.job_id == (specs[-1].parent_job_id)
            assert "gone" in str(err.value) and err.value.job_id in str(err.value)
    with pytest.raises(ParentGone):
        await q.submit(child(4, pruned), max_queued=5)
    assert await _snapshot(q, 4) == before
    assert [r.id for r in await q.history(80, 50)] == history
    if hasattr(q, "redis"):   # no parent index written for a refused child
        assert not await q.redis.exists(q._k("kids", pruned.id), q._k("kids", "nosuchjob00"))
    else:
        with sqlite3.connect(q.path) as db:
            assert db.execute("SELECT COUNT(*) FROM jobs WHERE user_id = 4").fetchone()[0] == 0

    accepted = await q.submit_many([spec(4, "plain"), child(4, kept, "remix")], max_queued=2)
    assert [r.state for r in accepted] == [JobState.QUEUED] * 2
    assert await q.count_queued(4) == 2 and (await q.get(kept_child.id)).state == JobState.QUEUED


async def test_submits_racing_a_prune_never_queue_a_child_without_its_parents_state(queue_factory: QueueFactory):
    """Children of old parents submitted (by one process) while another process prunes their states:
    each submit either is refused (ParentGone: that state was already gone) or queues a child whose
    parent keeps its state for as long as the child waits, whichever came first."""
    q = await queue_factory.open()
    pruner = await queue_factory.open()
    parents = [await finished_parent(q, 100 + i, f"parent {i}") for i in range(12)]
    await asyncio.sleep(0.3)

    async def submit(i: int, parent: JobRecord) -> JobRecord | ParentGone:
        await asyncio.sleep(0.002 * i)
        try:
            return await q.submit(child(200 + i, parent))
        except ParentGone as exc:
            return exc

    results = await asyncio.gather(pruner.prune(math.inf, 0.2, batch=1),
                                   *(submit(i, p) for i, p in enumerate(parents)))
    outcomes = results[1:]
    for parent, outcome in zip(parents, outcomes):
        if isinstance(outcome, ParentGone):
            assert outcome.job_id == parent.id and not await q.has_artifact(parent.id, "state.pt")
        else:
            assert await q.has_artifact(parent.id, "state.pt"), parent.spec.prompt
    assert await pruner.prune(math.inf, 0.2) == 0   # and again, later: the queued children hold theirs
    for parent, outcome in zip(parents, outcomes):
        assert await q.has_artifact(parent.id, "state.pt") is isinstance(outcome, JobRecord), parent.spec.prompt


async def test_redis_children_queued_before_the_parent_index_hold_their_parents(redis_server):
    """A child queued or running under the version before the parent index (made here by removing
    its `parent` field and its parent's `kids` set) is indexed when a queue object starts, from its
    spec, so prune keeps its parent; a child that had already ended is not (its parent goes)."""
    import uuid

    from engine.queue.redis import RedisJobQueue

    prefix = f"kids-{uuid.uuid4().hex[:8]}"
    old = RedisJobQueue(redis_server.url, prefix=prefix)
    await old.start()
    new = RedisJobQueue(redis_server.url, prefix=prefix)
    try:
        p_queued = await finished_parent(old, 1, "queued child")
        p_running = await finished_parent(old, 2, "running child")
        p_ended = await finished_parent(old, 3, "ended child")
        running = await old.submit(child(11, p_running))
        assert (await old.claim("w")).id == running.id
        ended = await old.submit(child(12, p_ended))
        assert await old.cancel(ended.id) is True
        queued = await old.submit(child(10, p_queued))
        for c, p in ((queued, p_queued), (running, p_running), (ended, p_ended)):
            await old.redis.hdel(old._k("job", c.id), "parent")
            await old.redis.delete(old._k("kids", p.id))
        await new.start()
        for c, p in ((queued, p_queued), (running, p_running)):
            assert await new.redis.hget(new._k("job", c.id), "parent") == p.id.encode()
        assert not await new.redis.hexists(new._k("job", ended.id), "parent")
        await asyncio.sleep(0.3)
        assert await new.prune(0.2) == 1
        assert await intact(new, p_queued) and await intact(new, p_running) and await new.get(p_ended.id) is None
    finally:
        await new.close()
        await old.close()


# --- the budget of the kept states (prune_states_over) ---------------------------------------------


async def job_with_state(q: JobQueue, user: int, prompt: str, size: int, *, finish: bool = True,
                         deliver: bool = True) -> JobRecord:
    """A job whose run stored final.png and a state.pt of `size` bytes, then finished and was
    delivered (unless told otherwise; not finished: left running). Call it while nothing else is queued."""
    rec = await q.submit(spec(user, prompt, channel=81))
    got = await q.claim("w")
    assert got.id == rec.id
    assert await q.put_artifact(rec.id, "final.png", f"final.png {rec.id}".encode(), got.lease_id) is True
    assert await q.put_artifact(rec.id, "state.pt", bytes([user]) * size, got.lease_id) is True
    if finish:
        assert await q.finish(rec.id, got.lease_id, 0.3) is True
        if deliver:
            assert await q.mark_delivered(rec.id) is True
    return rec


async def test_a_budget_of_kept_states_drops_the_oldest_delivered_ones_first(queue_factory: QueueFactory):
    """prune_states_over(budget): while the stored state.pt artifacts total more than `budget`
    bytes, the state of the job finished and delivered first goes (its record and picture stay),
    then the next, until the total fits; never a state not yet delivered, a running job's, or one a
    queued job starts from. Two processes at once delete each state once, and none the budget did
    not need."""
    q = await queue_factory.open()
    q2 = await queue_factory.open()
    old = [await job_with_state(q, 1, "oldest", 100), await job_with_state(q, 2, "old", 100)]
    parent = await job_with_state(q, 3, "parent of a queued continue", 100)
    undelivered = await job_with_state(q, 4, "never posted", 100, deliver=False)
    young = [await job_with_state(q, 5, "young", 100), await job_with_state(q, 6, "youngest", 150)]
    running = await job_with_state(q, 7, "running", 100, finish=False)
    continued = await q.submit(child(10, parent))
    assert await q.state_bytes() == await q2.state_bytes() == 750
    assert await q.prune_states_over(750) == 0 and await states_stored(q) == 7   # it fits: nothing goes

    def states_of(*records: JobRecord) -> list:
        return [q.has_artifact(rec.id, "state.pt") for rec in records]

    # 100 bytes too many: the oldest delivered one goes, alone; then the next.
    assert await q.prune_states_over(650) == 1 and await q.state_bytes() == 650
    assert await asyncio.gather(*states_of(*old, *young)) == [False, True, True, True]
    assert await q.prune_states_over(550) == 1 and await q.state_bytes() == 550
    assert await asyncio.gather(*states_of(*old, *young)) == [False, False, True, True]
    # 100 more, from two processes at once: the next that may go (the parent and the undelivered
    # one, older, are passed over), once; the youngest stays.
    counts = await asyncio.gather(q.prune_states_over(450), q2.prune_states_over(450))
    assert sorted(counts) == [0, 1] and await q.state_bytes() == await q2.state_bytes() == 450
    assert await asyncio.gather(*states_of(*old, *young)) == [False, False, False, True]
    for rec in (*old, young[0]):
        assert await q.get_artifact(rec.id, "state.pt") is None
        assert (await q.get(rec.id)).state == JobState.DONE
        assert await q.get_artifact(rec.id, "final.png") == f"final.png {rec.id}".encode()
    for rec in (parent, undelivered, running):
        assert await q.get_artifact(rec.id, "state.pt") == bytes([rec.spec.user_id]) * 100, rec.spec.prompt
    assert await states_stored(q) == 4
    # A Continue / Remix of a state the budget took is refused, "gone (pruned)", as after prune.
    with pytest.raises(ParentGone, match=r"gone \(pruned\)"):
        await q.submit(child(11, old[0]))

    # Budget 0: whatever may go goes; the held ones stay until they may.
    assert await q.prune_states_over(0) == 1 and await q.state_bytes() == 300   # the youngest's
    assert await q.cancel(continued.id) is True              # `parent` is nobody's parent any more
    assert await q.mark_delivered(undelivered.id) is True
    assert await q.finish(running.id, await lease(q, running.id), 0.2) is True   # not delivered yet
    assert await q.prune_states_over(0) == 2 and await q.state_bytes() == 100
    assert await q.has_artifact(running.id, "state.pt")
    assert await q.mark_delivered(running.id) is True
    assert await q.prune_states_over(0) == 1 and await q.state_bytes() == 0 and await states_stored(q) == 0
    assert await q.prune_states_over(0) == 0
    with pytest.raises(ValueError, match="budget_bytes must not be negative"):
        await q.prune_states_over(-1)


async def test_the_kept_states_total_follows_every_write_and_delete_of_a_state(queue_factory: QueueFactory):
    """state_bytes(): the stored state.pt artifacts' total, read cheaply, stays their sum through
    a rewrite, the age prune of states, the prune of whole jobs; other artifacts are not counted."""
    q = await queue_factory.open()
    q2 = await queue_factory.open()
    assert await q.state_bytes() == 0
    first = await job_with_state(q, 1, "first", 100)
    second = await job_with_state(q, 2, "second", 200)
    kept = await job_with_state(q, 3, "not posted yet", 50, deliver=False)
    assert await q.state_bytes() == 350
    assert await q.put_artifact(first.id, "state.pt", b"s" * 40) is True   # rewritten: its new size, once
    assert await q.put_artifact(first.id, "video.mp4", b"v" * 1000) is True
    assert await q.put_artifact(upload_id_of(b"a picture"), "image.png", b"p" * 1000) is True
    assert await q.state_bytes() == await q2.state_bytes() == 290
    assert await q.prune(math.inf, 0) == 0 and await q.state_bytes() == 50   # states alone: the delivered ones
    assert await q.mark_delivered(kept.id) is True
    assert await q.prune(0) == 3 and await q.state_bytes() == 0               # whole jobs, states and all
    assert await states_stored(q) == 0 and await q.get(second.id) is None


async def test_states_stored_before_the_budget_existed_are_counted(queue_factory: QueueFactory):
    """A store written by the version before the budget: SQLite's start() builds the index of the
    states' lengths (the total is read from it alone, never the rows); Redis's start() indexes
    the states it finds, and the budget drops an index entry whose state an earlier version
    deleted (its total would otherwise stay too high for ever)."""
    q = await queue_factory.open()
    first = await job_with_state(q, 1, "first", 100)
    second = await job_with_state(q, 2, "second", 200)
    third = await job_with_state(q, 3, "third", 300)
    if hasattr(q, "redis"):
        await q.redis.delete(q._k("states"), q._k("statesize"), q._k("statebytes"))
    else:
        with sqlite3.connect(q.path) as db:
            db.execute("DROP INDEX IF EXISTS artifacts_states")
    new = await queue_factory.open()
    assert await new.state_bytes() == 600
    if not hasattr(new, "redis"):
        with sqlite3.connect(new.path) as db:
            plan = " ".join(str(row) for row in db.execute(
                "EXPLAIN QUERY PLAN SELECT COALESCE(SUM(length(data)), 0) FROM artifacts WHERE name = 'state.pt'"))
        assert "artifacts_states" in plan, plan
        return
    assert await new.prune_states_over(600) == 0
    # The earlier version's prune of states: the state went, its index entry stayed.
    bid = (await new.redis.hget(new._k("artp", second.id), "state.pt")).split()[0].decode()
    await new.redis.hdel(new._k("artp", second.id), "state.pt")
    await new.redis.unlink(new._k("blob", bid))
    assert await new.state_bytes() == 600   # not known yet
    assert await new.prune_states_over(350) == 1   # `first` goes (500), `second`'s entry leaves (300)
    assert await new.state_bytes() == 300 and await states_stored(new) == 1
    assert not await new.has_artifact(first.id, "state.pt") and await new.has_artifact(third.id, "state.pt")


# --- retention of uploads and settings ------------------------------------------------------------


def image_ref(upload_id: str, key: str = "image_prompt") -> dict:
    return {key: {"artifact": [upload_id, "image.png"], **({"weight": 1.0} if key == "image_prompt" else {})}}


async def stored_anywhere(q: JobQueue, upload_id: str) -> bool:
    """Whether anything of the upload is left in the backend's storage (not only through the API)."""
    if hasattr(q, "redis"):
        client = q.redis
        return bool(
            await client.exists(q._k("art", upload_id), q._k("artp", upload_id), q._k("refs", upload_id))
            or await client.zscore(q._k("uploads"), upload_id) is not None
            or await client.hexists(q._k("upload_at"), upload_id)
        )
    with sqlite3.connect(q.path) as db:
        return any(
            db.execute(f"SELECT COUNT(*) FROM {table} WHERE {column} = ?", (upload_id,)).fetchone()[0]
            for table, column in (("artifacts", "job_id"), ("uploads", "id"), ("upload_refs", "upload_id"))
        )


async def setting_stored(q: JobQueue, key: str) -> bool:
    """Whether the setting is still in the backend's storage (expired or not)."""
    if hasattr(q, "redis"):
        return bool(await q.redis.exists(q._k("setting", key)) or await q.redis.hexists(q._k("settings"), key))
    with sqlite3.connect(q.path) as db:
        return db.execute("SELECT COUNT(*) FROM settings WHERE key = ?", (key,)).fetchone()[0] > 0


async def test_prune_deletes_uploads_that_no_job_needs(queue_factory: QueueFactory):
    q = await queue_factory.open()
    q2 = await queue_factory.open()
    names = ["orphan", "queued", "running", "undelivered", "old_done", "shared", "remixed"]
    up = {name: new_upload_id() for name in names}
    for name, upload_id in up.items():
        assert is_upload_id(upload_id)
        assert await q.put_artifact(upload_id, "image.png", name.encode()) is True
    # `orphan` was stored and its job never submitted (refused, or the bot crashed in between).
    running = await q.submit(spec(1, extra=image_ref(up["running"], "init_image")))
    undelivered = await q.submit(spec(2, extra=image_ref(up["undelivered"])))
    old_done = await q.submit(spec(3, extra=image_ref(up["old_done"])))
    # A permutation set: several jobs name one upload (and both pictures, at any depth).
    set_a = await q.submit(spec(4, extra={**image_ref(up["shared"]), "set": {"id": "s", "index": 0}}))
    set_b = await q.submit(spec(5, extra={"nested": [image_ref(up["shared"]), image_ref(up["remixed"], "init_image")]}))
    leases = {}
    for _ in range(5):
        got = await q.claim("w")
        leases[got.id] = got.lease_id
    queued = await q.submit(spec(6, extra=image_ref(up["queued"])))
    for rec in (undelivered, old_done, set_a, set_b):
        assert await q.finish(rec.id, leases[rec.id], 0.2) is True
    for rec in (old_done, set_a):
        assert await q.mark_delivered(rec.id) is True
    assert await q.prune(3600) == 0
    assert all([await q.has_artifact(u, "image.png") for u in up.values()])  # nothing is that old
    await asyncio.sleep(0.3)
    fresh = new_upload_id()
    await q.put_artifact(fresh, "image.png", b"fresh")  # not named by any job yet: its job is on the way

    counts = await asyncio.gather(q.prune(0.2), q2.prune(0.2))  # two workers at once
    assert sum(counts) == 2  # old_done and set_a
    for name in ("orphan", "old_done"):
        assert await q.get_artifact(up[name], "image.png") is None, name
        assert not await stored_anywhere(q, up[name]), name
    for name in ("queued", "running", "undelivered", "shared", "remixed"):  # a job left still names it
        assert await q.get_artifact(up[name], "image.png") == name.encode(), name
    assert await q.get_artifact(fresh, "image.png") == b"fresh"
    assert (await q.get(queued.id)).state == JobState.QUEUED and (await q.get(running.id)).state == JobState.RUNNING

    # The last job naming `shared` and `remixed` is delivered and pruned: they go with it.
    assert await q.mark_delivered(set_b.id) is True
    assert await q.prune(0.2) == 1
    for name in ("shared", "remixed"):
        assert not await q.has_artifact(up[name], "image.png") and not await stored_anywhere(q, up[name]), name
    # Jobs that end and are delivered release theirs; a job submitted later naming an old upload keeps it.
    again = await q.submit(spec(7, extra=image_ref(up["running"], "init_image")))
    assert await q.finish(running.id, leases[running.id], 0.1) is True
    assert await q.mark_delivered(running.id) and await q.mark_delivered(undelivered.id)
    await asyncio.sleep(0.25)
    assert await q.prune(0.2) == 2
    assert not await stored_anywhere(q, up["undelivered"])
    assert await q.get_artifact(up["running"], "image.png") == b"running"  # `again` names it
    assert await q.get_artifact(up["queued"], "image.png") == b"queued"
    assert await q.get(again.id) is not None and await q.prune(0) == 0
    assert await q.get_artifact(fresh, "image.png") is None  # by now older than 0 s, named by nobody


async def test_upload_pruning_goes_past_uploads_still_needed(queue_factory: QueueFactory):
    """Many old uploads, most still needed: pruning in small batches still reaches the orphans."""
    q = await queue_factory.open()
    needed = [new_upload_id() for _ in range(5)]
    orphans = [new_upload_id() for _ in range(7)]
    for upload_id in needed + orphans:
        await q.put_artifact(upload_id, "image.png", b"x")
    for i, upload_id in enumerate(needed):
        await q.submit(spec(i, extra=image_ref(upload_id)))
    await asyncio.sleep(0.25)
    assert await q.prune(0.2, batch=2) == 0
    assert [await q.has_artifact(u, "image.png") for u in needed] == [True] * 5
    assert [await stored_anywhere(q, u) for u in orphans] == [False] * 7


async def test_an_upload_id_is_the_hash_of_its_content_and_storing_it_again_refreshes_its_age(
        queue_factory: QueueFactory):
    q = await queue_factory.open()
    a, b = upload_id_of(b"picture a"), upload_id_of(b"picture b")
    assert a == upload_id_of(b"picture a") != b and is_upload_id(a) and len(a) == len("upload_") + 32
    assert await q.put_artifact(a, "image.png", b"picture a") is True
    await asyncio.sleep(0.3)
    # The same picture sent again: the same id, one copy, its age counted from now (so a prune
    # cannot take it between this store and the submit that names it).
    assert await q.put_artifact(a, "image.png", b"picture a") is True
    assert await q.prune(0.25) == 0
    assert await q.get_artifact(a, "image.png") == b"picture a"
    rec = await q.submit(spec(1, extra=image_ref(a)))
    await asyncio.sleep(0.3)
    assert await q.prune(0.2) == 0 and await q.get_artifact(a, "image.png") == b"picture a"  # named
    assert (await q.get(rec.id)).state == JobState.QUEUED


async def test_a_submit_naming_an_upload_not_stored_queues_nothing(queue_factory: QueueFactory):
    q = await queue_factory.open()
    stored, missing = upload_id_of(b"here"), upload_id_of(b"never stored")
    await q.put_artifact(stored, "image.png", b"here")
    before = await last_seq(q)
    with pytest.raises(UploadGone) as err:   # a set: one job names a missing upload, nothing of it is queued
        await q.submit_many([spec(1, extra=image_ref(stored)), spec(1, extra={"x": [image_ref(missing, "init_image")]})])
    assert err.value.upload_id == missing
    assert await q.count_queued() == 0 and await last_seq(q) == before and await q.history(CHANNEL) == []
    assert await q.discard_uploads([stored]) == 1   # still named by nobody: nothing was queued
    # The cap comes first: a user over it is told so, not that a picture is gone.
    await q.put_artifact(stored, "image.png", b"here")
    await q.submit(spec(1, extra=image_ref(stored)), max_queued=1)
    with pytest.raises(QueueLimitReached):
        await q.submit(spec(1, extra=image_ref(missing)), max_queued=1)
    rec = await q.submit(spec(2, extra=image_ref(stored)), max_queued=1)   # stored: queued as ever
    assert (await q.get(rec.id)).state == JobState.QUEUED


async def test_discard_uploads_deletes_at_once_those_no_job_names(queue_factory: QueueFactory):
    q = await queue_factory.open()
    named, orphan, other = (upload_id_of(n.encode()) for n in ("named", "orphan", "other"))
    for u in (named, orphan, other):
        await q.put_artifact(u, "image.png", u.encode())
    rec = await q.submit(spec(1, extra=image_ref(named)))
    await q.put_artifact(rec.id, "final.png", b"not an upload")
    # `rec.id` is a job, not an upload; an id stored nowhere changes nothing.
    assert await q.discard_uploads([named, orphan, rec.id, upload_id_of(b"nowhere"), orphan]) == 1
    assert not await stored_anywhere(q, orphan)
    assert await q.get_artifact(named, "image.png") == named.encode()   # a queued job names it
    assert await q.get_artifact(other, "image.png") == other.encode()   # not asked for
    assert await q.get_artifact(rec.id, "final.png") == b"not an upload"
    assert await q.discard_uploads([]) == 0
    with pytest.raises(UploadGone):   # gone at once, not 30 days later
        await q.submit(spec(1, extra=image_ref(orphan)))
    # Once the job that named it ends (and until it is pruned), it still names it.
    got = await q.claim("w")
    assert await q.finish(got.id, got.lease_id, 0.1) is True
    assert await q.discard_uploads([named]) == 0 and await q.has_artifact(named, "image.png")


async def test_discard_racing_submits_never_leaves_a_job_without_its_upload(queue_factory: QueueFactory):
    """The check and the delete are one step: a submit naming the upload either came first (the
    upload stays) or comes after (UploadGone, nothing queued); never a queued job whose picture is gone."""
    q, q2 = await queue_factory.open(), await queue_factory.open()
    queued = refused = 0
    for i in range(30):
        u = upload_id_of(f"picture {i}".encode())
        await q.put_artifact(u, "image.png", b"png")
        submitted, discarded = await asyncio.gather(
            q.submit(spec(1, extra=image_ref(u))), q2.discard_uploads([u]), return_exceptions=True)
        if isinstance(submitted, UploadGone):
            refused += 1
            assert discarded == 1 and not await stored_anywhere(q, u)
        else:
            assert isinstance(submitted, JobRecord), submitted
            queued += 1
            assert discarded == 0 and await q.get_artifact(u, "image.png") == b"png"
    assert queued + refused == 30 and await q.count_queued() == queued


async def test_a_job_cancelled_while_queued_drops_its_uploads_that_no_other_job_names(queue_factory: QueueFactory):
    q = await queue_factory.open()
    alone, shared, ran, cleared, kept = (upload_id_of(n.encode()) for n in ("alone", "shared", "ran", "cleared", "kept"))
    for u in (alone, shared, ran, cleared, kept):
        await q.put_artifact(u, "image.png", u.encode())
    runs = await q.submit(spec(1, extra=image_ref(ran)))
    got = await q.claim("w")
    assert got.id == runs.id
    first = await q.submit(spec(1, extra={**image_ref(alone), **image_ref(shared, "init_image")}))
    second = await q.submit(spec(2, extra=image_ref(shared)))   # a set, a Reroll: another job names it too
    assert await q.cancel(first.id) is True
    assert not await stored_anywhere(q, alone)                    # at once, not after keep_days
    assert await q.get_artifact(shared, "image.png") == shared.encode()
    cancelled = await q.get(first.id)
    assert cancelled.state == JobState.CANCELLED and cancelled.spec.extra["image_prompt"]["artifact"][0] == alone
    assert await q.cancel(second.id) is True
    assert not await stored_anywhere(q, shared)
    # A running job's cancel is a request: it ran, its picture stays with it until it is pruned.
    assert await q.cancel(runs.id) is True
    await q.mark_cancelled(runs.id, got.lease_id)
    assert await q.get_artifact(ran, "image.png") == ran.encode()
    # /queue-admin clear, of one server and of all: the same.
    in_guild = await q.submit(spec(3, guild_id=BIG_USER, extra=image_ref(cleared)))
    elsewhere = await q.submit(spec(3, guild_id=BIG_USER + 1, extra=image_ref(kept)))
    assert await q.clear(BIG_USER) == 1
    assert not await stored_anywhere(q, cleared) and await q.has_artifact(kept, "image.png")
    assert await q.clear() == 1
    assert not await stored_anywhere(q, kept)
    assert {(await q.get(r.id)).state for r in (in_guild, elsewhere)} == {JobState.CANCELLED}
    # Their records still name them (for /history, the Reroll button): a new job naming one is refused.
    with pytest.raises(UploadGone):
        await q.submit(spec(4, extra=image_ref(alone)))
    # The same picture sent again is stored again under the same id, and the cancelled jobs'
    # later prune leaves it alone (they name it no more).
    await q.put_artifact(alone, "image.png", b"again")
    again = await q.submit(spec(4, extra=image_ref(alone)))
    for rec in (first, second, in_guild, elsewhere, runs):
        assert await q.mark_delivered(rec.id) is True
    await asyncio.sleep(0.25)
    assert await q.prune(0.2) == 5
    assert await q.get_artifact(alone, "image.png") == b"again" and (await q.get(again.id)).state == JobState.QUEUED
    assert not await stored_anywhere(q, ran)   # its job pruned: it went with it


async def test_settings_can_expire(queue_factory: QueueFactory):
    q = await queue_factory.open()
    await q.set_setting("set:a", {"jobs": ["j1", "j2"], "user_id": BIG_USER}, expire_after=0.4)
    await q.set_setting("sheet:a", {"message_id": BIG_USER}, expire_after=60)
    await q.set_setting("kept", [1, 2])
    await q.set_setting("flip", 1, expire_after=0.4)
    await q.set_setting("flip", 2)                      # rewritten without an expiry: kept
    await q.set_setting("flop", 1)
    await q.set_setting("flop", 2, expire_after=0.4)    # rewritten with one: goes
    other = await queue_factory.open()  # another process sees the same
    assert await other.get_setting("set:a") == {"jobs": ["j1", "j2"], "user_id": BIG_USER}
    assert await other.get_setting("flip") == 2 and await other.get_setting("flop") == 2
    await asyncio.sleep(0.6)
    for reader in (q, other):
        assert await reader.get_setting("set:a", "gone") == "gone"
        assert await reader.get_setting("flop") is None
        assert await reader.get_setting("sheet:a") == {"message_id": BIG_USER}
        assert await reader.get_setting("kept") == [1, 2] and await reader.get_setting("flip") == 2
    assert await q.prune(3600) == 0  # SQLite deletes expired settings here; Redis already has
    for key in ("set:a", "flop"):
        assert not await setting_stored(q, key), key
    for key in ("sheet:a", "kept", "flip"):
        assert await setting_stored(q, key), key
    # A pause with an expiry ends by itself.
    rec = await q.submit(spec())
    await q.set_setting("paused", True, expire_after=0.3)
    assert await q.claim("w") is None
    await asyncio.sleep(0.4)
    assert (await q.claim("w")).id == rec.id


async def test_a_named_lease_has_one_holder_at_a_time(queue_factory: QueueFactory):
    """The bot's "one bot per store" lease (bot.launcher): taken when free, renewed by its holder,
    refused to another holder (who learns whose it is), taken over once it expires, released only by
    its holder. Two queues on one store, as two processes."""
    import socket

    one, two = await queue_factory.open(), await queue_factory.open()
    assert await one.hold_lease("bot", "host-1-a", ttl=30) is None
    held = await two.hold_lease("bot", "host-2-b", ttl=30)
    assert held is not None and held["holder"] == "host-1-a"
    assert held["host"] == socket.gethostname() and held["pid"] == os.getpid()   # the process that took it
    assert held["since"] == held["renewed"] and abs(held["since"] - time.time()) < 5   # the store's clock
    assert 25 < held["expires_in"] <= 30
    await asyncio.sleep(0.05)
    assert await one.hold_lease("bot", "host-1-a", ttl=30) is None   # renewed by its holder
    renewed = await two.hold_lease("bot", "host-2-b", ttl=30)
    assert renewed is not None and renewed["holder"] == "host-1-a"
    assert renewed["since"] == held["since"] and renewed["renewed"] > held["renewed"]
    assert await two.hold_lease("another", "host-2-b", ttl=30) is None   # names are independent

    # Released only by its holder; then free at once.
    assert await two.release_lease("bot", "host-2-b") is False
    assert (await two.hold_lease("bot", "host-2-b", ttl=30))["holder"] == "host-1-a"
    assert await one.release_lease("bot", "host-1-a") is True
    assert await one.release_lease("bot", "host-1-a") is False
    assert await two.hold_lease("bot", "host-2-b", ttl=0.3) is None

    # Not renewed within its ttl (a holder that crashed): another holder takes it over.
    assert (await one.hold_lease("bot", "host-1-a", ttl=30))["holder"] == "host-2-b"
    await asyncio.sleep(0.5)
    assert await one.hold_lease("bot", "host-1-a", ttl=30) is None
    lapsed = await two.hold_lease("bot", "host-2-b", ttl=30)   # the lapsed holder's renewal is refused
    assert lapsed is not None and lapsed["holder"] == "host-1-a" and lapsed["since"] > held["since"]
    assert await two.release_lease("bot", "host-2-b") is False
    assert (await two.hold_lease("bot", "host-2-b", ttl=30))["holder"] == "host-1-a"
    for ttl in (0, -1, math.inf, math.nan):
        with pytest.raises(ValueError):
            await one.hold_lease("bot", "host-1-a", ttl=ttl)
    assert (await two.hold_lease("bot", "host-2-b", ttl=30))["holder"] == "host-1-a"   # unchanged


async def test_sqlite_prune_keeping_every_job_still_forgets_old_workers_and_users_out_of_line(tmp_path):
    """keep_days unset prunes with `older_than` = math.inf: no job goes, but the row of a worker
    not seen for a day does, and so does the turn (`rotation` row) of each user with nothing queued
    (Redis drops a user from `rot` when their line empties). A user who queues again after that
    enters at the back of the turn order, as one who kept their row would."""
    from engine.queue.sqlite import _FORGET_WORKERS_AFTER, SQLiteJobQueue

    path = tmp_path / "q.db"
    q = SQLiteJobQueue(str(path))
    await q.start()
    try:
        a = await q.submit(spec(1, "a"))
        b1 = await q.submit(spec(2, "b1"))
        c = await q.submit(spec(3, "c"))
        b2 = await q.submit(spec(2, "b2"))
        got = await q.claim("gone-gpu")
        assert got.id == a.id and await q.finish(a.id, got.lease_id, 0.1) is True
        assert await q.cancel(c.id) is True            # user 3 leaves the line by cancelling
        assert (await q.claim("gpu")).id == b1.id      # user 2 still has b2 queued
        with sqlite3.connect(path) as db:              # the first worker was last seen two days ago
            db.execute("UPDATE workers SET last_seen = ? WHERE worker_id = 'gone-gpu'",
                       (time.time() - 2 * _FORGET_WORKERS_AFTER,))

        def rotation() -> set[int]:
            with sqlite3.connect(path) as db:
                return {row[0] for row in db.execute("SELECT user_id FROM rotation")}

        assert rotation() == {1, 2, 3}
        assert await q.prune(math.inf) == 0
        assert rotation() == {2}
        assert set(await q.workers(max_age=10 * _FORGET_WORKERS_AFTER)) == {"gpu"}
        assert (await q.get(a.id)).state == JobState.DONE   # every job kept

        # The fair line does not miss the rows: user 1 comes back behind user 2, user 3 behind both.
        a2 = await q.submit(spec(1, "a2"))
        c2 = await q.submit(spec(3, "c2"))
        assert [r.id for r in await q.queued()] == [b2.id, a2.id, c2.id]
        assert rotation() == {1, 2, 3}
        assert [(await q.claim("gpu")).id for _ in range(3)] == [b2.id, a2.id, c2.id]
    finally:
        await q.close()


async def test_sqlite_file_from_the_previous_version_opens_and_migrates(tmp_path):
    """A file made before lease ids and upload/setting retention: opened, migrated, still works."""
    from engine.queue.sqlite import SQLiteJobQueue

    path = tmp_path / "old.db"
    now = time.time()
    upload_needed, upload_orphan = "upload_00aa11bb22cc33dd", "upload_deadbeefdeadbeef"
    with sqlite3.connect(path) as db:
        db.executescript(_PREVIOUS_SCHEMA)
        queued_spec = spec(1, extra=image_ref(upload_needed)).to_dict()
        db.execute("INSERT INTO jobs(id, spec, user_id, channel_id, grid, total, state, created_at, qseq)"
                   " VALUES ('queuedjob0001', ?, 1, 5, 32, 300, 'queued', ?, 1)", (json.dumps(queued_spec), now))
        db.execute("INSERT INTO rotation(user_id, rpos) VALUES (1, 1)")
        # RUNNING under the old version, owned by a worker id, lease already past.
        db.execute("INSERT INTO jobs(id, spec, user_id, channel_id, grid, total, state, created_at, started_at,"
                   " attempts, worker_id, lease_until, qseq) VALUES ('runningjob01', ?, 2, 5, 32, 300, 'running',"
                   " ?, ?, 1, 'old-worker', ?, 2)", (json.dumps(spec(2).to_dict()), now, now, now - 1))
        for upload_id in (upload_needed, upload_orphan):
            db.execute("INSERT INTO artifacts(job_id, name, data) VALUES (?, 'image.png', X'00')", (upload_id,))
        db.execute("INSERT INTO settings(key, value) VALUES ('paused', 'false'), ('limits', '{\"per_user\": 3}')")
        db.execute("INSERT INTO workers(worker_id, last_seen, job_id) VALUES ('old-worker', ?, 'runningjob01')", (now,))
    q = SQLiteJobQueue(path, lease=5)
    await q.start()
    try:
        # Its worker's row reads as one with the dVAE encoder until its next claim says (fails safe).
        # And as claiming when last seen, as the retry rule read every row before announcements.
        old_worker = (await q.workers(max_age=3600))["old-worker"]
        assert old_worker["init_images"] is True and old_worker["claimed_at"] == old_worker["last_seen"] == now
        running = await q.get("runningjob01")
        assert running.state == JobState.RUNNING and running.worker_id == "old-worker" and running.lease_id is None
        # The old claim holds no lease id: nothing passes the fence in its name.
        assert await q.finish("runningjob01", "old-worker", 0.1) is False
        assert await q.get_setting("limits") == {"per_user": 3}
        await q.set_setting("sheet:x", 1, expire_after=60)
        assert await q.get_setting("sheet:x") == 1
        got = await q.claim("new-worker")  # sweeps the old claim back (front of the line), then takes it
        assert got.id == "runningjob01" and got.lease_id and got.attempts == 2
        assert await q.finish(got.id, got.lease_id, 0.3) is True
        await q.mark_delivered(got.id)
        # Uploads already stored count as stored at the migration; the queued job's still counts as named.
        assert await q.prune(3600) == 0 and await q.has_artifact(upload_orphan, "image.png")
        await asyncio.sleep(0.05)
        assert await q.prune(0.01) == 1
        assert not await q.has_artifact(upload_orphan, "image.png")
        assert await q.has_artifact(upload_needed, "image.png")
    finally:
        await q.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 4
        columns = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
        assert {"lease_id", "failed_on", "retry_after"} <= columns
        assert {"init_images", "claimed_at"} <= {row[1] for row in db.execute("PRAGMA table_info(workers)")}
    q = SQLiteJobQueue(path)  # opened again: nothing to migrate, nothing lost
    await q.start()
    try:
        assert (await q.get("queuedjob0001")).state == JobState.QUEUED
        assert await q.get_setting("sheet:x") == 1
    finally:
        await q.close()


# The schema of the version before lease ids (engine/queue/sqlite.py at commit 39a5af6).
_PREVIOUS_SCHEMA = """
CREATE TABLE jobs (
    id TEXT PRIMARY KEY, spec TEXT NOT NULL, reply TEXT, user_id INTEGER NOT NULL,
    channel_id INTEGER NOT NULL, grid INTEGER NOT NULL, total INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL, created_at REAL NOT NULL, started_at REAL, finished_at REAL,
    iteration INTEGER NOT NULL DEFAULT 0, similarity REAL, attempts INTEGER NOT NULL DEFAULT 0,
    worker_id TEXT, error TEXT, delivered INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0, lease_until REAL, qseq INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX jobs_state ON jobs(state, user_id, qseq);
CREATE INDEX jobs_channel ON jobs(channel_id);
CREATE INDEX jobs_undelivered ON jobs(finished_at)
    WHERE delivered = 0 AND state IN ('done', 'failed', 'cancelled');
CREATE INDEX jobs_delivered ON jobs(finished_at) WHERE delivered = 1;
CREATE TABLE rotation (user_id INTEGER PRIMARY KEY, rpos INTEGER NOT NULL);
CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL, kind TEXT NOT NULL,
    iteration INTEGER NOT NULL DEFAULT 0, total INTEGER NOT NULL DEFAULT 0, similarity REAL,
    message TEXT, at REAL NOT NULL, frame BLOB
);
CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE checkpoints (job_id TEXT PRIMARY KEY, iteration INTEGER NOT NULL, data BLOB NOT NULL);
CREATE TABLE artifacts (
    job_id TEXT NOT NULL, name TEXT NOT NULL, data BLOB NOT NULL, PRIMARY KEY (job_id, name)
);
CREATE TABLE workers (worker_id TEXT PRIMARY KEY, last_seen REAL NOT NULL, job_id TEXT);
INSERT INTO counters(name, value) VALUES ('line', 10);
"""


# --- start-up under contention, atomic setting reads ------------------------------------------------


@pytest.mark.parametrize("previous", [False, True], ids=["new-file", "file-to-migrate"])
async def test_sqlite_start_that_cannot_get_the_write_lock_fails_cleanly_and_can_be_retried(tmp_path, previous):
    """Another process holds the file's write lock (e.g. mid-migration) past `busy_timeout`: start()
    fails with a clear error and leaves the queue unstarted; once the lock is free, start() does the
    whole schema work (and migration) and the queue works."""
    from engine.queue import open_queue

    path = tmp_path / "locked.db"
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("PRAGMA journal_mode = WAL")
        if previous:
            holder.executescript(_PREVIOUS_SCHEMA)
            holder.execute("INSERT INTO jobs(id, spec, user_id, channel_id, grid, total, state, created_at, qseq)"
                           " VALUES ('queuedjob0001', ?, 1, 5, 32, 300, 'queued', ?, 1)",
                           (json.dumps(spec(1).to_dict()), time.time()))
            holder.execute("INSERT INTO rotation(user_id, rpos) VALUES (1, 1)")
        holder.execute("BEGIN IMMEDIATE")  # the other process's write transaction
        q = open_queue(f"sqlite:///{path}?busy_timeout=0.2")
        for _ in range(2):  # and again: a failed start leaves nothing half-open behind
            started = time.monotonic()
            with pytest.raises(RuntimeError, match=r"locked.*busy_timeout") as err:
                await q.start()
            assert time.monotonic() - started < 5
            assert str(path) in str(err.value)
            with pytest.raises(RuntimeError, match="not started"):
                await q.submit(spec())
        holder.execute("ROLLBACK")
    finally:
        holder.close()
    await q.start()
    try:
        with sqlite3.connect(path) as db:
            assert db.execute("PRAGMA user_version").fetchone()[0] == 4
        if previous:
            got = await q.claim("w")
            assert got.id == "queuedjob0001" and got.lease_id
            assert await q.finish(got.id, got.lease_id, 0.2) is True
        rec = await q.submit(spec(2))
        got = await q.claim("w")
        assert got.id == rec.id and await q.finish(rec.id, got.lease_id, 0.3) is True
        assert (await q.get(rec.id)).state == JobState.DONE
    finally:
        await q.close()


async def _dribbling_proxy(port: int, chunk: int = 8, pause: float = 0.0005):
    """A TCP proxy to 127.0.0.1:`port` that hands the client's bytes on `chunk` bytes at a time,
    with a pause between: Redis then runs a pipeline's commands one at a time, other clients'
    commands in between, unless they are one MULTI/EXEC transaction (or one script)."""
    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, step: int | None) -> None:
        try:
            while data := await reader.read(65536):
                for i in range(0, len(data), step or len(data)):
                    writer.write(data[i:i + (step or len(data))])
                    await writer.drain()
                    if step:
                        await asyncio.sleep(pause)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.gather(pipe(client_r, server_w, chunk), pipe(server_r, client_w, None))

    return await asyncio.start_server(handle, "127.0.0.1", 0)


async def test_redis_setting_reads_never_miss_a_setting_that_switches_form(redis_server):
    """A setting rewritten with and without an expiry moves between the settings hash and its own
    TTL key. A reader must see one form or the other, never neither (bot/permutations.py takes the
    default for "expired" and drops the set for good). The reader's commands reach Redis a few bytes
    at a time, so a read made of two separate commands would let the writers in between."""
    import uuid

    from engine.queue.redis import RedisJobQueue

    prefix = f"atomic-{uuid.uuid4().hex[:8]}"
    proxy = await _dribbling_proxy(redis_server.port)
    port = proxy.sockets[0].getsockname()[1]
    reader = RedisJobQueue(f"redis://127.0.0.1:{port}/0", prefix=prefix)
    writers = [RedisJobQueue(redis_server.url, prefix=prefix) for _ in range(3)]
    for q in (reader, *writers):
        await q.start()
    stop = asyncio.Event()

    async def flip(q: RedisJobQueue, n: int) -> None:
        while not stop.is_set():
            await q.set_setting("set:s", {"jobs": [n]}, expire_after=3600)
            await q.set_setting("set:s", {"jobs": [n]})

    try:
        await writers[0].set_setting("set:s", {"jobs": [0]})
        tasks = [asyncio.create_task(flip(q, n)) for n, q in enumerate(writers)]
        seen = [await reader.get_setting("set:s", "missing") for _ in range(150)]
        stop.set()
        await asyncio.gather(*tasks)
        assert "missing" not in seen, f"{seen.count('missing')} of {len(seen)} reads saw neither form"
    finally:
        stop.set()
        for q in (reader, *writers):
            await q.close()
        proxy.close()
        await proxy.wait_closed()


# --- parity: one semantic on both backends (see engine/queue/__init__.py) --------------------------

async def test_keep_frames_counts_frames_not_events(queue_factory: QueueFactory):
    """`keep_frames` is how many frames (PNGs) the log keeps: the latest that many, however many
    frameless events (other jobs', messages, state changes) came between them."""
    q = await queue_factory.open(keep_frames=3)
    rec = await q.submit(spec())
    other = await q.submit(spec(2, "another job"))
    for i in range(12):
        await q.publish(JobEvent(rec.id, EventKind.PROGRESS, iteration=10 * i, frame_png=b"png%d" % i))
        for k in range(7):   # frameless events between two frames
            await q.publish(JobEvent(other.id if k % 2 else rec.id, EventKind.PROGRESS, iteration=10 * i + k + 1))
    events = await all_events(await queue_factory.open(keep_frames=3))
    assert [e.frame_png for e in events if e.frame_png is not None] == [b"png9", b"png10", b"png11"]
    # Fewer frames than that: every one of them is kept.
    q2 = await queue_factory.open(keep_frames=300)
    start = await last_seq(q2)
    await q2.publish(JobEvent(rec.id, EventKind.PROGRESS, iteration=1000, frame_png=b"last"))
    frames = [e.frame_png for e in await all_events(q2) if e.frame_png is not None]
    assert frames == [b"png9", b"png10", b"png11", b"last"]
    assert [e.frame_png for e in await all_events(q2, start)] == [b"last"]


async def test_prune_takes_a_pruned_jobs_events_and_every_cursor_reads_on(queue_factory: QueueFactory):
    """A pruned job's events (frames, messages) leave the log with it; the other jobs' events stay,
    and a reader's cursor, even one on a deleted event or past the last one left, reads on."""
    q = await queue_factory.open()
    old = await q.submit(spec(1, "old"))
    got = await q.claim("w")
    assert await q.publish(JobEvent(old.id, EventKind.PROGRESS, iteration=1, frame_png=b"old frame",
                                    message="old message"), got.lease_id)
    kept = await q.submit(spec(2, "kept"))
    before_kept = await last_seq(q) - 1
    got2 = await q.claim("w")
    assert got2.id == kept.id
    assert await q.publish(JobEvent(kept.id, EventKind.PROGRESS, iteration=2, frame_png=b"kept frame"), got2.lease_id)
    assert await q.finish(old.id, got.lease_id, 0.5) and await q.mark_delivered(old.id)
    on_last = await last_seq(q)   # the old job's DONE: the log's last event, deleted by the prune
    reader = await queue_factory.open()   # the bot: another process
    assert [e.job_id for e in await all_events(reader)].count(old.id) == 4
    await asyncio.sleep(0.05)
    assert await q.prune(0.01) == 1

    events = await all_events(reader)
    assert [e for e in events if e.job_id == old.id] == []
    assert [(e.kind, e.frame_png) for e in events] == [
        (EventKind.QUEUED, None), (EventKind.STARTED, None), (EventKind.PROGRESS, b"kept frame")]
    assert [e.kind for e in await all_events(reader, before_kept)] == [
        EventKind.QUEUED, EventKind.STARTED, EventKind.PROGRESS]
    assert await reader.events(after=on_last, timeout=0) == []
    assert await q.finish(kept.id, got2.lease_id, 0.1)   # a new event: read from every cursor
    assert [(e.job_id, e.kind) for e in await all_events(reader, on_last)] == [(kept.id, EventKind.DONE)]
    assert [e.kind for e in await all_events(reader, before_kept)][-1] == EventKind.DONE
    assert (await all_events(reader))[-1].seq > on_last   # the numbering goes on past the deleted ones


@pytest.mark.parametrize("expire_after", [math.inf, -math.inf, math.nan, 0, 0.0, -1.5])
async def test_a_setting_expiry_that_is_no_time_is_refused(queue: JobQueue, expire_after):
    """`expire_after` must be a finite number of seconds above 0 (None: no expiry): anything else is
    a ValueError on either backend, and the setting is left as it was."""
    await queue.set_setting("k", "before", expire_after=60)
    with pytest.raises(ValueError):
        await queue.set_setting("k", "after", expire_after=expire_after)
    assert await queue.get_setting("k") == "before"
    await queue.set_setting("k", "kept")
    assert await queue.get_setting("k") == "kept"


async def test_history_limit_zero_is_nothing_and_a_negative_limit_is_refused(queue: JobQueue):
    await queue.submit(spec(1, "one", channel=10))
    await queue.submit(spec(1, "two", channel=10))
    assert await queue.history(10, limit=0) == []
    assert len(await queue.history(10, limit=1)) == 1
    for bad in (-1, -5):
        with pytest.raises(ValueError):
            await queue.history(10, limit=bad)


PAUSE_OFF = [0, 0.0, -0.0, False, None, "", [], {}]
PAUSE_ON = [True, 1, 0.5, -1, "0", "false", [0], {"by": 0}, math.nan, -math.inf]


@pytest.mark.parametrize("value", PAUSE_OFF + PAUSE_ON, ids=repr)
async def test_a_pause_is_on_exactly_when_its_value_is_true_in_python(queue: JobQueue, value):
    """A pause setting (everywhere or one server's) holds the claims back exactly when its value is
    true as Python reads it (what engine.jobs.pause_of, and so the bot, says): 0.0 pauses nothing,
    as 0 and False do; the string "0" does pause."""
    from engine.jobs import pause_of

    server = 1_180_000_000_000_000_001
    on = bool(value)
    job = await queue.submit(spec(1, "a job", guild_id=server))
    await queue.set_setting(guild_paused_key(server), value)
    assert await pause_of(queue, server) == ("server" if on else "")
    got = await queue.claim("w")
    assert (got is None) == on
    if on:
        await queue.set_setting(guild_paused_key(server), False)
        await queue.set_setting(PAUSED_KEY, value)
        assert await pause_of(queue, server) == "everywhere"
        assert await queue.claim("w") is None
        await queue.set_setting(PAUSED_KEY, False)
        assert (await queue.claim("w")).id == job.id
    else:
        assert got.id == job.id
        second = await queue.submit(spec(2, "another", guild_id=server))
        await queue.set_setting(PAUSED_KEY, value)
        assert await pause_of(queue, server) == ""
        assert (await queue.claim("w")).id == second.id


async def test_redis_a_heartbeat_never_writes_back_an_init_images_older_than_a_claims(redis_server):
    """The registry entry's `init_images` is the worker's last claim's: a heartbeat keeps the stored
    value. A claim (another process) that lands between the heartbeat's read of the entry and its
    write must not be undone. The claim is run at that very point, if the heartbeat has one (the
    client's GET of the entry), else right after the heartbeat: either way its value must stand."""
    import uuid

    from engine.queue.redis import RedisJobQueue

    prefix = f"hb-race-{uuid.uuid4().hex[:8]}"
    claims, beats, restarted = (RedisJobQueue(redis_server.url, prefix=prefix) for _ in range(3))
    for q in (claims, beats, restarted):
        await q.start()
    try:
        rec = await claims.submit(spec())
        got = await claims.claim("gpu", init_images=True)
        assert got.id == rec.id and (await claims.workers())["gpu"]["init_images"] is True
        client = beats._client()
        real_get, injected = client.get, []

        async def get_then_claim(key, *args, **kwargs):
            value = await real_get(key, *args, **kwargs)
            if "worker_info" in str(key) and not injected:
                injected.append(key)
                assert await restarted.claim("gpu", init_images=False) is None   # the worker, now without an encoder
            return value

        client.get = get_then_claim
        try:
            assert await beats.heartbeat(rec.id, got.lease_id) is True
        finally:
            client.get = real_get
        if not injected:
            assert await restarted.claim("gpu", init_images=False) is None
        assert (await claims.workers())["gpu"]["init_images"] is False
        # A heartbeat after it keeps it too.
        beats._seen.clear()
        assert await beats.heartbeat(rec.id, got.lease_id) is True
        assert (await claims.workers())["gpu"]["init_images"] is False
    finally:
        for q in (claims, beats, restarted):
            await q.close()
