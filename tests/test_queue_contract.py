"""The JobQueue contract, run against every backend (SQLite and Redis)."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from engine.jobs import Checkpoint, EventKind, JobEvent, JobQueue, JobSpec, JobState

try:
    from queue_fixtures import QueueFactory, queue, queue_factory, redis_server, start_redis  # noqa: F401
except ImportError:  # tests/ imported as a package
    from tests.queue_fixtures import QueueFactory, queue, queue_factory, redis_server, start_redis  # noqa: F401

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


async def test_fair_order_and_positions(queue: JobQueue):
    a1 = await queue.submit(spec(1, "a1"))
    a2 = await queue.submit(spec(1, "a2"))
    b1 = await queue.submit(spec(BIG_USER, "b1"))
    a3 = await queue.submit(spec(1, "a3"))
    c1 = await queue.submit(spec(3, "c1"))
    b2 = await queue.submit(spec(BIG_USER, "b2"))
    expected = [a1, b1, c1, a2, b2, a3]
    assert [r.id for r in await queue.queued()] == [r.id for r in expected]
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
    assert with_frames[-3:] == [97, 98, 99] and len(with_frames) <= 3 + 32
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
    await queue.claim("w1")
    assert await queue.heartbeat(rec.id, "w1") is True
    assert await queue.cancel(rec.id) is True
    got = await queue.get(rec.id)
    assert got.state == JobState.RUNNING and got.cancel_requested
    assert await queue.heartbeat(rec.id, "w1") is False
    after = await last_seq(queue)
    await queue.mark_cancelled(rec.id, "w2")  # not its job: nothing happens
    assert (await queue.get(rec.id)).state == JobState.RUNNING
    await queue.mark_cancelled(rec.id, "w1")
    got = await queue.get(rec.id)
    assert got.state == JobState.CANCELLED and got.finished_at is not None
    assert [(e.job_id, e.kind) for e in await all_events(queue, after)] == [(rec.id, EventKind.CANCELLED)]
    assert await queue.claim("w1") is None
    assert await queue.cancel(rec.id) is False
    assert await queue.finish(rec.id, "w1", 0.5) is False


async def test_finish_and_late_finish(queue: JobQueue):
    rec = await queue.submit(spec())
    await queue.claim("w1")
    assert await queue.finish(rec.id, "w2", 0.9) is False
    assert (await queue.get(rec.id)).state == JobState.RUNNING
    after = await last_seq(queue)
    assert await queue.finish(rec.id, "w1", 0.31) is True
    got = await queue.get(rec.id)
    assert got.state == JobState.DONE and got.similarity == pytest.approx(0.31) and got.finished_at is not None
    events = await all_events(queue, after)
    assert [(e.job_id, e.kind) for e in events] == [(rec.id, EventKind.DONE)]
    assert events[0].similarity == pytest.approx(0.31)
    assert await queue.finish(rec.id, "w1", 0.5) is False
    assert await queue.heartbeat(rec.id, "w1") is False
    assert await queue.running() == []


async def test_fail_retries_at_front_until_cap(queue_factory: QueueFactory):
    q = await queue_factory.open(max_attempts=3)
    rec = await q.submit(spec(1))
    other = await q.submit(spec(2))
    for attempt in (1, 2):
        got = await q.claim("w")
        assert got.id == rec.id and got.attempts == attempt
        after = await last_seq(q)
        assert await q.fail(rec.id, "w", f"boom {attempt}") == JobState.QUEUED
        assert await q.position(rec.id) == 1 and await q.position(other.id) == 2
        got = await q.get(rec.id)
        assert got.state == JobState.QUEUED and got.worker_id is None
        events = await all_events(q, after)
        assert [(e.kind, e.message) for e in events] == [(EventKind.QUEUED, f"boom {attempt}")]
    got = await q.claim("w")
    assert got.id == rec.id and got.attempts == 3
    assert await q.fail(rec.id, "other-worker", "late") == JobState.RUNNING  # not its job: no change
    after = await last_seq(q)
    assert await q.fail(rec.id, "w", "boom 3") == JobState.FAILED
    got = await q.get(rec.id)
    assert got.state == JobState.FAILED and got.error == "boom 3" and got.finished_at is not None
    assert [(e.kind, e.message) for e in await all_events(q, after)] == [(EventKind.FAILED, "boom 3")]
    # retry=False fails at once
    got = await q.claim("w")
    assert got.id == other.id
    assert await q.fail(other.id, "w", "bad prompt", retry=False) == JobState.FAILED
    assert (await q.get(other.id)).attempts == 1


async def test_lease_expiry_requeues_at_front(queue_factory: QueueFactory):
    q = await queue_factory.open(lease=0.3, max_attempts=2)
    a = await q.submit(spec(1))
    b = await q.submit(spec(2))
    got = await q.claim("w1")
    assert got.id == a.id
    await asyncio.sleep(0.45)
    after = await last_seq(q)
    assert await q.sweep() == 1
    got = await q.get(a.id)
    assert got.state == JobState.QUEUED and got.worker_id is None and got.attempts == 1
    assert await q.position(a.id) == 1 and await q.position(b.id) == 2
    assert [(e.kind, e.message) for e in await all_events(q, after)] == [(EventKind.QUEUED, "worker lost")]
    got = await q.claim("w2")
    assert got.id == a.id and got.attempts == 2 and got.worker_id == "w2"
    # the first worker comes back late: its lease is gone
    assert await q.heartbeat(a.id, "w1") is False
    assert await q.finish(a.id, "w1", 0.1) is False
    assert await q.heartbeat(a.id, "w2") is True
    await asyncio.sleep(0.45)
    after = await last_seq(q)
    got = await q.claim("w3")  # sweeps first: a has used its 2 attempts
    assert got.id == b.id
    failed = await q.get(a.id)
    assert failed.state == JobState.FAILED and failed.error == "worker lost 2 times"
    events = [e for e in await all_events(q, after) if e.job_id == a.id]
    assert [(e.kind, e.message) for e in events] == [(EventKind.FAILED, "worker lost 2 times")]
    assert await q.finish(a.id, "w2", 0.1) is False


async def test_heartbeat_keeps_the_lease(queue_factory: QueueFactory):
    q = await queue_factory.open(lease=0.3)
    rec = await q.submit(spec())
    await q.claim("w1")
    for _ in range(4):
        await asyncio.sleep(0.12)
        assert await q.heartbeat(rec.id, "w1") is True
    assert await q.sweep() == 0
    assert (await q.get(rec.id)).worker_id == "w1"


async def test_release_returns_to_front_without_counting(queue: JobQueue):
    a = await queue.submit(spec(1))
    b = await queue.submit(spec(2))
    await queue.claim("w1")
    assert await queue.release(a.id, "w2") is False
    assert await queue.release(a.id, "w1") is True
    got = await queue.get(a.id)
    assert got.state == JobState.QUEUED and got.attempts == 0 and got.worker_id is None
    assert [r.id for r in await queue.queued()] == [a.id, b.id]
    assert (await queue.claim("w1")).attempts == 1


async def test_history_newest_first(queue: JobQueue):
    j1 = await queue.submit(spec(1, "one", channel=10))
    j2 = await queue.submit(spec(2, "two", channel=10))
    other = await queue.submit(spec(1, "elsewhere", channel=CHANNEL))
    j3 = await queue.submit(spec(1, "three", channel=10))
    await queue.claim("w")
    await queue.finish(j1.id, "w", 0.2)
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
    await q.finish(done.id, "w", 0.3)
    await q.fail(failed.id, "w", "oops", retry=False)
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
            assert await worker.finish(rec.id, name, 0.5) is True

    await asyncio.gather(*(work(c, f"w{i}") for i, c in enumerate(claimers)))
    assert sorted(i for i, _ in claimed) == sorted(ids)
    assert len({name for _, name in claimed}) > 1
    for job_id in ids:
        rec = await q.get(job_id)
        assert rec.attempts == 1 and rec.state == JobState.DONE


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


async def test_workers_registry(queue: JobQueue):
    rec = await queue.submit(spec())
    await queue.claim("gpu-0")
    await queue.heartbeat(rec.id, "gpu-0")
    workers = await queue.workers()
    assert "gpu-0" in workers and workers["gpu-0"]["job_id"] == rec.id
    assert abs(workers["gpu-0"]["last_seen"] - time.time()) < 5


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
        assert (await q.claim("w")).id == rec.id
        server.stop()
        restart = asyncio.get_running_loop().run_in_executor(None, lambda: (time.sleep(0.5), server.restart()))
        assert await q.heartbeat(rec.id, "w") is True  # waits for the server to come back
        await restart
        after = await last_seq(q)
        waiter = asyncio.create_task(q.events(after=after, timeout=5))
        await asyncio.sleep(0.2)
        server.restart()  # while a long-poll is blocked
        await q.publish(JobEvent(rec.id, EventKind.PROGRESS, iteration=10))
        events = await waiter
        assert [e.iteration for e in events] == [10]
        assert await q.finish(rec.id, "w", 0.4) is True
        assert (await q.get(rec.id)).state == JobState.DONE
    finally:
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
        first = await q._scripts["claim"](keys=[], args=[*base, "w", -1])
        again = await q._scripts["claim"](keys=[], args=[*base, "w", -1])
        assert first == again == a.id.encode()
        assert (await q.get(b.id)).state == JobState.QUEUED and (await q.get(a.id)).attempts == 1
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
    # Not running yet, or not this worker's: refused (and nothing written).
    assert await q.save_checkpoint(Checkpoint(rec.id, 1, b"early"), "w1") is False
    assert await q.put_artifact(rec.id, "final.png", b"early", "w1") is False
    assert await q.load_checkpoint(rec.id) is None and not await q.has_artifact(rec.id, "final.png")
    await q.claim("w1")
    assert await q.save_checkpoint(Checkpoint(rec.id, 10, b"w1-ckpt"), "w1") is True
    assert await q.put_artifact(rec.id, "final.png", b"w1-png", "w1") is True
    assert await q.publish(JobEvent(rec.id, EventKind.PROGRESS, iteration=10, frame_png=b"f1"), "w1") is True
    assert await q.save_checkpoint(Checkpoint(rec.id, 11, b"other"), "w2") is False
    await asyncio.sleep(0.3)
    assert await q.sweep() == 1  # w1's lease expired, nobody claimed: the sweep alone requeues it
    assert (await q.get(rec.id)).state == JobState.QUEUED and await q.position(rec.id) == 1
    assert await q.save_checkpoint(Checkpoint(rec.id, 12, b"late"), "w1") is False  # queued: nobody's
    assert (await q.claim("w2")).id == rec.id
    assert await q.heartbeat(rec.id, "w2") is True
    assert await q.save_checkpoint(Checkpoint(rec.id, 20, b"w2-ckpt"), "w2") is True
    assert await q.put_artifact(rec.id, "final.png", b"w2-png", "w2") is True
    after = await last_seq(q)
    # w1 comes back late: none of its writes land.
    stale = JobEvent(rec.id, EventKind.PROGRESS, iteration=15, frame_png=b"stale")
    assert await q.publish(stale, "w1") is False
    assert await q.save_checkpoint(Checkpoint(rec.id, 15, b"w1-stale"), "w1") is False
    assert await q.put_artifact(rec.id, "final.png", b"w1-stale", "w1") is False
    assert await q.put_artifact(rec.id, "video.mp4", b"w1-stale", "w1") is False
    assert await all_events(q, after) == []
    ck = await q.load_checkpoint(rec.id)
    assert (ck.iteration, ck.data) == (20, b"w2-ckpt")
    assert await q.get_artifact(rec.id, "final.png") == b"w2-png" and not await q.has_artifact(rec.id, "video.mp4")
    assert (await q.get(rec.id)).iteration == 10  # the stale PROGRESS did not move the record either
    # Without a worker id the writes are unconditional (the bot's uploads, the queue's own events).
    assert await q.put_artifact("upload_x", "image.png", b"img") is True
    assert await q.put_artifact(waiting.id, "note", b"n") is True
    assert await q.publish(JobEvent(waiting.id, EventKind.PROGRESS, iteration=1)) is True
    assert await q.save_checkpoint(Checkpoint(waiting.id, 1, b"c")) is True
    assert await q.finish(rec.id, "w2", 0.5) is True
    assert await q.put_artifact(rec.id, "final.png", b"after", "w2") is False  # finished: nobody's


async def test_checkpoints_are_deleted_when_a_job_ends(queue: JobQueue):
    recs = [await queue.submit(spec(u)) for u in range(6)]
    done, failed, cancelled, retried, released, queued = recs
    for _ in range(5):
        await queue.claim("w")
    for rec in recs:
        assert await queue.save_checkpoint(Checkpoint(rec.id, 5, b"ck-" + rec.id.encode())) is True
    await queue.put_artifact(done.id, "state.pt", b"state", "w")
    assert await queue.finish(done.id, "w", 0.3) is True
    assert await queue.fail(failed.id, "w", "bad", retry=False) == JobState.FAILED
    assert await queue.cancel(cancelled.id) is True
    await queue.mark_cancelled(cancelled.id, "w")
    assert await queue.fail(retried.id, "w", "oom", retry=True) == JobState.QUEUED
    assert await queue.release(released.id, "w") is True
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
    for _ in range(4):
        await q.claim("w")
    for rec in (old[0], old_undelivered):
        await q.publish(JobEvent(rec.id, EventKind.PROGRESS, iteration=1, frame_png=b"frame-" + rec.id.encode()))
        await q.put_artifact(rec.id, "final.png", b"png", "w")
        await q.put_artifact(rec.id, "state.pt", b"state", "w")
        await q.save_checkpoint(Checkpoint(rec.id, 1, b"ck"), "w")
    await q.finish(old[0].id, "w", 0.2)
    await q.finish(old_undelivered.id, "w", 0.2)
    await q.fail(old[1].id, "w", "bad", retry=False)
    await q.cancel(old[2].id)
    await q.mark_cancelled(old[2].id, "w")
    for rec in old:
        assert await q.mark_delivered(rec.id) is True
    await q.put_artifact("upload_keep", "image.png", b"img")
    assert await q.prune(3600) == 0  # nothing that old
    await asyncio.sleep(0.3)
    recent = await q.submit(spec(5, "recent", channel=chan))
    await q.claim("w")
    await q.finish(recent.id, "w", 0.1)
    await q.mark_delivered(recent.id)
    running = await q.submit(spec(6, "running", channel=chan))
    waiting = await q.submit(spec(7, "waiting", channel=chan))
    await q.claim("w")

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
    assert await q.prune(0.2) == 0
    # Delivered later: pruned once it is old enough.
    assert await q.mark_delivered(old_undelivered.id) is True
    assert await q.prune(0.2) == 1 and await q.get(old_undelivered.id) is None
    assert await q.prune(0) == 1 and await q.get(recent.id) is None
