"""Redis blobs (checkpoints, artifacts) over a slow link.

redis-py gives each command `socket_timeout` for its whole payload and its whole reply, so a blob
sent or fetched in one command times out on any link slower than size / timeout. Here the queue
talks to the real redis-server through a TCP proxy on 127.0.0.1 that lets `RATE` bytes a second
through each way, with a `TIMEOUT` socket timeout: every blob below is several times what one
command can carry in that time, so it only gets across in chunks.
"""

from __future__ import annotations

import asyncio
import os
import uuid

import pytest
from redis import exceptions as redis_errors

from engine.jobs import Checkpoint, JobSpec, JobState
from engine.queue.redis import RedisJobQueue

try:
    from queue_fixtures import redis_server  # noqa: F401 - the fixture
except ImportError:  # tests/ imported as a package
    from tests.queue_fixtures import redis_server  # noqa: F401 - the fixture

pytestmark = pytest.mark.asyncio

RATE = 2 * 1024 * 1024          # bytes per second, each way
TIMEOUT = 0.5                   # the slow client's socket_timeout
CHUNK = 64 * 1024               # its blob_chunk: 1/16 of what crosses the link in TIMEOUT
BIG = 4 * int(RATE * TIMEOUT) + 12345   # four times what one command could carry, not a whole number of chunks


class SlowLink:
    """A TCP proxy to 127.0.0.1:`port` that passes at most `rate` bytes a second in each direction of
    each connection; `cut()` drops every connection and refuses new ones (a link that went down)."""

    def __init__(self, port: int, rate: int) -> None:
        self.port, self.rate = port, rate
        self.server: asyncio.base_events.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []
        self.tasks: set[asyncio.Task] = set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        step = max(1, self.rate // 50)   # 20 ms worth at a time
        try:
            while data := await reader.read(step):
                writer.write(data)
                await writer.drain()
                await asyncio.sleep(len(data) / self.rate)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self.port)
        self.writers += [client_w, server_w]
        pipes = [asyncio.ensure_future(self._pipe(client_r, server_w)),
                 asyncio.ensure_future(self._pipe(server_r, client_w))]
        self.tasks.update(pipes)
        await asyncio.gather(*pipes, return_exceptions=True)

    async def cut(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self.tasks):
            task.cancel()
        for writer in self.writers:
            writer.close()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def close(self) -> None:
        await self.cut()
        if self.server is not None:
            await self.server.wait_closed()


@pytest.fixture
async def link(redis_server):
    proxy = SlowLink(redis_server.port, RATE)
    await proxy.start()
    yield proxy
    await proxy.close()


@pytest.fixture
async def queues(redis_server, link):
    """(slow, fast): the same queue (one key prefix) through the slow link and directly."""
    prefix = f"blobs-{uuid.uuid4().hex[:8]}"
    port = link.server.sockets[0].getsockname()[1]
    slow = RedisJobQueue(f"redis://127.0.0.1:{port}/0", prefix=prefix, socket_timeout=TIMEOUT,
                         blob_chunk=CHUNK, reconnect_timeout=2.0)
    fast = RedisJobQueue(redis_server.url, prefix=prefix)
    await slow.start()
    await fast.start()
    yield slow, fast
    await slow.close()
    await fast.close()


def blob(tag: bytes, size: int = BIG) -> bytes:
    """`size` random bytes that start with `tag` (so a mix of two versions shows in any part)."""
    return tag + os.urandom(size - len(tag))


async def keys(q: RedisJobQueue, kind: str) -> list[bytes]:
    return [k async for k in q.redis.scan_iter(match=q._k(kind, "*"))]


async def staging(q: RedisJobQueue) -> list[bytes]:
    """Every key of a write not yet committed (`stage:`, a hash of the chunks staged so far); and no
    `staged:` key, which an earlier staging format kept beside it."""
    return await keys(q, "stage") + await keys(q, "staged")


async def test_blobs_far_larger_than_one_command_can_carry_save_and_load_intact(queues):
    slow, fast = queues
    rec = await fast.submit(JobSpec(prompt="a slow link", user_id=1, channel_id=2))
    lease = (await fast.claim("gpu-far-away")).lease_id
    first, second, state = blob(b"ckpt-1"), blob(b"ckpt-2"), blob(b"state", BIG + CHUNK)
    # What an earlier version stored inline (in the record itself) is still read, then replaced.
    await fast.redis.hset(fast._k("ckpt", rec.id), mapping={"iteration": 5, "data": b"inline ckpt"})
    await fast.redis.hset(fast._k("art", rec.id), mapping={"state.pt": b"inline state", "final.png": b"inline png"})
    loaded = await slow.load_checkpoint(rec.id)
    assert (loaded.iteration, loaded.data) == (5, b"inline ckpt")
    assert await slow.get_artifact(rec.id, "state.pt") == b"inline state"

    assert await slow.save_checkpoint(Checkpoint(rec.id, 100, first), lease) is True
    assert (await fast.load_checkpoint(rec.id)).data == first
    assert await fast.save_checkpoint(Checkpoint(rec.id, 200, second), lease) is True   # a replace
    # stored in 4 MiB chunks (fast's blob_chunk), each more than slow can fetch in one command: it
    # reads them in ranges of its own blob_chunk
    loaded = await slow.load_checkpoint(rec.id)
    assert (loaded.iteration, loaded.data == second) == (200, True)

    assert await slow.put_artifact(rec.id, "state.pt", state, lease) is True
    assert await slow.has_artifact(rec.id, "state.pt")
    assert await slow.get_artifact(rec.id, "state.pt") == state
    upload = "upload_" + uuid.uuid4().hex[:16]
    assert await fast.put_artifact(upload, "image.png", first) is True      # the bot's upload: unfenced
    assert await fast.get_artifact(upload, "image.png") == first

    assert await fast.get_artifact(rec.id, "final.png") == b"inline png"   # not rewritten: still inline
    assert not await fast.redis.hexists(fast._k("ckpt", rec.id), "data")     # the replaced inline forms
    assert not await fast.redis.hexists(fast._k("art", rec.id), "state.pt")

    # Nothing left behind: one blob per stored thing, no staging keys; the replaced checkpoint's gone.
    assert await staging(fast) == []
    assert len(await keys(fast, "blob")) == 3
    assert await fast.finish(rec.id, lease, 0.3) is True   # a job's end drops its checkpoint
    assert await fast.load_checkpoint(rec.id) is None and len(await keys(fast, "blob")) == 2
    assert await fast.mark_delivered(rec.id) is True
    assert await fast.prune(0) == 1                        # pruning the job and the upload drops theirs
    assert await fast.get_artifact(rec.id, "state.pt") is None and not await fast.has_artifact(rec.id, "state.pt")
    assert await fast.get_artifact(upload, "image.png") is None
    assert await fast.get_artifact(rec.id, "final.png") is None
    assert await keys(fast, "blob") == [] and await keys(fast, "artp") == []


async def test_a_run_that_loses_its_lease_during_a_slow_save_is_refused(queues):
    """The fence is checked when the staged checkpoint is committed: a run whose lease expired
    while its bytes were on the way replaces nothing, and its staged bytes are dropped."""
    slow, fast = queues
    slow.lease = fast.lease = 0.3
    rec = await fast.submit(JobSpec(prompt="a stalled worker", user_id=1, channel_id=2))
    old = (await fast.claim("gpu-stalled")).lease_id
    assert await fast.save_checkpoint(Checkpoint(rec.id, 10, b"old run, in time"), old) is True
    saving = asyncio.create_task(slow.save_checkpoint(Checkpoint(rec.id, 50, blob(b"stale")), old))
    await asyncio.sleep(0.6)                  # the lease expires while the upload goes on
    assert not saving.done()
    new = await fast.claim("gpu-healthy")     # swept back and taken over
    assert new.id == rec.id and new.lease_id != old
    assert await fast.save_checkpoint(Checkpoint(rec.id, 20, b"new run"), new.lease_id) is True

    assert await saving is False
    loaded = await fast.load_checkpoint(rec.id)
    assert (loaded.iteration, loaded.data) == (20, b"new run")
    assert await staging(fast) == []
    # Known stale before it starts: refused without sending the bytes at all.
    assert await slow.save_checkpoint(Checkpoint(rec.id, 60, blob(b"stale")), old) is False
    assert await slow.put_artifact(rec.id, "state.pt", blob(b"stale"), old) is False
    assert not await fast.has_artifact(rec.id, "state.pt")
    assert (await fast.load_checkpoint(rec.id)).data == b"new run"


async def test_a_write_cut_off_half_way_leaves_the_previous_checkpoint_whole(queues, link):
    slow, fast = queues
    rec = await fast.submit(JobSpec(prompt="a flaky link", user_id=1, channel_id=2))
    lease = (await fast.claim("gpu-far-away")).lease_id
    previous = blob(b"previous")
    assert await slow.save_checkpoint(Checkpoint(rec.id, 100, previous), lease) is True

    saving = asyncio.create_task(slow.save_checkpoint(Checkpoint(rec.id, 200, blob(b"next")), lease))
    await asyncio.sleep(0.5)   # a quarter of it sent
    await link.cut()           # the link goes down and stays down
    with pytest.raises((redis_errors.ConnectionError, redis_errors.TimeoutError)):
        await saving

    loaded = await fast.load_checkpoint(rec.id)
    assert (loaded.iteration, loaded.data == previous) == (100, True)
    # What was staged of the new one is not kept for good: it expires.
    staged = await staging(fast)
    assert len(staged) == 1
    for key in staged:
        assert 0 < await fast.redis.pttl(key) <= slow.staging_ttl_ms
    assert (await fast.get(rec.id)).state == JobState.RUNNING


async def test_a_read_that_races_a_replace_returns_one_whole_version(queues):
    slow, fast = queues
    rec = await fast.submit(JobSpec(prompt="read while written", user_id=1, channel_id=2))
    lease = (await fast.claim("gpu-near")).lease_id
    old_ckpt, new_ckpt = blob(b"ckpt-old"), blob(b"ckpt-new")
    old_art, new_art = blob(b"art-old"), blob(b"art-new")
    assert await fast.save_checkpoint(Checkpoint(rec.id, 1, old_ckpt), lease) is True
    assert await fast.put_artifact(rec.id, "video.mp4", old_art, lease) is True

    loading = asyncio.create_task(slow.load_checkpoint(rec.id))
    fetching = asyncio.create_task(slow.get_artifact(rec.id, "video.mp4"))
    await asyncio.sleep(0.5)   # both reads part-way through the old versions
    assert not loading.done() and not fetching.done()
    assert await fast.save_checkpoint(Checkpoint(rec.id, 2, new_ckpt), lease) is True
    assert await fast.put_artifact(rec.id, "video.mp4", new_art, lease) is True

    loaded, fetched = await loading, await fetching
    assert (loaded.iteration, loaded.data == new_ckpt) == (2, True)   # the new one whole, with its iteration
    assert fetched == new_art


@pytest.mark.parametrize("lost", ["deleted", "expired"])
async def test_a_write_whose_staged_bytes_vanish_half_way_starts_again_and_lands_whole(queues, lost):
    """Staged bytes lost mid-write (a Redis restarted without persistence, a staging key expired or
    evicted): the next chunk finds a gap where they were (fewer chunks staged than come before it),
    so the write starts again instead of committing a blob with a hole in it."""
    slow, fast = queues
    rec = await fast.submit(JobSpec(prompt="a forgetful redis", user_id=1, channel_id=2))
    lease = (await fast.claim("gpu-far-away")).lease_id
    data = blob(b"whole")
    saving = asyncio.create_task(slow.save_checkpoint(Checkpoint(rec.id, 7, data), lease))
    await asyncio.sleep(0.5)
    staged = await staging(fast)
    assert len(staged) == 1 and not saving.done()
    if lost == "deleted":
        await fast.redis.delete(*staged)
    else:
        await fast.redis.pexpire(staged[0], 1)
    assert await saving is True
    loaded = await fast.load_checkpoint(rec.id)
    assert (loaded.iteration, loaded.data == data) == (7, True)
    assert await staging(fast) == []


async def test_a_staged_blob_is_a_hash_of_chunks_none_bigger_than_one(queues):
    """Staging must not build one value the size of the blob: grown chunk by chunk, Redis reallocates
    and copies the whole string as it grows; pre-sized, it zero-fills the whole size at the first
    chunk (0.2-0.4 s for 256 MiB); either on the main thread every client waits on. Seen from Redis
    itself, during a slow write: the staging key is a hash whose fields are the chunks sent so far
    (0 .. n-1, in order), none bigger than one chunk, always with a TTL; and the blob it becomes is
    that same hash."""
    slow, fast = queues
    rec = await fast.submit(JobSpec(prompt="a chunked stage", user_id=1, channel_id=2))
    lease = (await fast.claim("gpu-far-away")).lease_id
    data = blob(b"chunked")
    saving = asyncio.create_task(slow.save_checkpoint(Checkpoint(rec.id, 3, data), lease))
    counts, biggest = set(), 0
    while not saving.done():
        for key in await keys(fast, "stage"):
            # at once (MULTI): the commit may rename the key away between the scan and here
            async with fast.redis.pipeline(transaction=True) as pipe:
                pipe.type(key).pttl(key).hkeys(key)
                kind, ttl, fields = await pipe.execute()
            if kind == b"none":
                continue
            assert kind == b"hash" and 0 < ttl <= slow.staging_ttl_ms
            assert sorted(int(f) for f in fields) == list(range(len(fields)))   # no gap
            lengths = [await fast.redis.hstrlen(key, f) for f in fields]
            biggest = max([biggest, *lengths])
            counts.add(len(fields))
        await asyncio.sleep(0.01)
    assert await saving is True
    chunks = -(-len(data) // CHUNK)
    assert len([c for c in counts if 0 < c < chunks]) >= 2   # seen part-way, more than once
    assert biggest == CHUNK                                    # never more than one chunk in a value
    (key,) = await keys(fast, "blob")
    assert await fast.redis.type(key) == b"hash" and await fast.redis.hlen(key) == chunks
    assert max([await fast.redis.hstrlen(key, str(n)) for n in range(chunks)]) == CHUNK
    assert (await fast.load_checkpoint(rec.id)).data == data
    # A blob of one chunk or less is stored by the commit itself: the same shape, one field.
    assert await slow.save_checkpoint(Checkpoint(rec.id, 4, b"small"), lease) is True
    (key,) = await keys(fast, "blob")
    assert await fast.redis.hgetall(key) == {b"0": b"small"}
    assert (await slow.load_checkpoint(rec.id)).data == b"small"
    assert await staging(fast) == []


async def test_staged_chunks_resent_out_of_turn_and_a_commit_missing_one(queues):
    """The staging scripts themselves, chunk by chunk (what `_put_blob` sends, here in an order a
    retry after a lost reply can produce): a re-sent chunk rewrites its own field and nothing else
    (the first one too, once later ones are in); a chunk past a missing one is a gap, which drops
    the write's key (it starts again under a new id); and a commit is refused unless every chunk is
    there at its length."""
    _, fast = queues
    rec = await fast.submit(JobSpec(prompt="chunk by chunk", user_id=1, channel_id=2))
    lease = (await fast.claim("gpu-near")).lease_id
    assert await fast.save_checkpoint(Checkpoint(rec.id, 1, b"the previous one"), lease) is True
    size = 3 * CHUNK + 5
    data = blob(b"chunks", size - 1) + b"\xff"
    ttl = fast.staging_ttl_ms

    def part(n: int) -> bytes:
        return data[n * CHUNK:(n + 1) * CHUNK]

    async def chunks(bid: str, *ns: int) -> list[str]:
        return [await fast._run("stage_chunk", bid, n, part(n), ttl, token=False) for n in ns]

    async def commit(bid: str) -> str:
        return await fast._run("put_blob", "ckpt", rec.id, lease, 2, bid, size, CHUNK, b"")

    async def previous_still_there() -> None:
        assert (await fast.load_checkpoint(rec.id)).data == b"the previous one"
        assert await staging(fast) == []

    skipped = uuid.uuid4().hex
    assert await chunks(skipped, 0, 2) == ["1", "gap"]
    assert await staging(fast) == []

    short = uuid.uuid4().hex
    assert await chunks(short, 0, 0, 1, 0, 1) == ["1"] * 5
    assert await staging(fast) == [fast._k("stage", short).encode()]
    assert 0 < await fast.redis.pttl(fast._k("stage", short)) <= ttl   # each chunk renews the TTL
    assert await fast.redis.hgetall(fast._k("stage", short)) == {b"0": part(0), b"1": part(1)}
    assert await commit(short) == "gone"       # chunks 2 and 3 never came
    await previous_still_there()

    # A chunk of the wrong length (a writer with another blob_chunk, a torn value): not complete.
    torn = uuid.uuid4().hex
    assert await chunks(torn, 0, 1, 2, 3) == ["1"] * 4
    await fast.redis.hset(fast._k("stage", torn), "1", part(1)[:-1])
    assert await commit(torn) == "gone"
    await previous_still_there()

    # One field too many is not this blob either.
    extra = uuid.uuid4().hex
    assert await chunks(extra, 0, 1, 2, 3) == ["1"] * 4
    await fast.redis.hset(fast._k("stage", extra), "4", b"x")
    assert await commit(extra) == "gone"
    await previous_still_there()

    whole = uuid.uuid4().hex
    assert await chunks(whole, 0, 1, 2, 3, 3, 0, 2) == ["1"] * 7
    assert await commit(whole) == "1"
    loaded = await fast.load_checkpoint(rec.id)
    assert (loaded.iteration, loaded.data == data) == (2, True)
    assert await staging(fast) == [] and await fast.redis.ttl(fast._k("blob", whole)) == -1
    assert await fast.redis.type(fast._k("blob", whole)) == b"hash"
    assert await chunks(whole, 3) == ["gap"]   # a late duplicate after the commit brings nothing back
    assert await staging(fast) == []
