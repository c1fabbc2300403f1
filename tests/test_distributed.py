"""Distributed runs: real `imagine-worker` processes (`python -m engine.worker`) with tiny model
files, sharing a real redis-server (started here, on a free port, append-only file on) or one
SQLite file. The test process plays the bot: it submits, cancels and follows events through the
same `JobQueue` client the bot uses.

What is shown (issue 4): a worker killed with SIGKILL mid-job -> another takes the job over from
its last checkpoint, one final result (Redis and SQLite); a cancel reaches a job on a remote worker
within about a second and it is never claimed again; a job failing on every worker is retried up to
the attempts cap and then failed with the reason; Redis killed and restarted mid-run -> the bot's
client and the workers reconnect and every job completes once; a small load run: none lost, none
finished twice, fair claim order.

Worker processes start once per module (torch import + model load: ~10 s on this machine) and
are reused; the lease is 2 s (`?lease=2`) so a dead worker's job comes back fast.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from engine.jobs import Checkpoint, EventKind, JobEvent, JobSpec, JobState
from engine.queue import open_queue
from tests.queue_fixtures import start_redis_process, start_redis_with_aof

ROOT = Path(__file__).resolve().parent.parent
LEASE = 2


# --- worker processes ---------------------------------------------------------------------------


@dataclass
class WorkerProc:
    worker_id: str
    url: str
    argv: list[str]
    log_path: Path
    proc: subprocess.Popen
    started_at: float = field(default_factory=time.time)   # this process's start (a restart: the new one's)

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        stop_all([self])

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def stop_all(workers: list[WorkerProc]) -> None:
    for w in workers:
        if w.proc.poll() is None:
            w.proc.terminate()  # graceful: hands running jobs back
    for w in workers:
        try:
            w.proc.wait(30)
        except subprocess.TimeoutExpired:
            w.proc.kill()
            w.proc.wait(10)


def worker_env() -> dict[str, str]:
    # No Discord token, nothing of the bot's: a worker needs only the queue URL and the models.
    env = {k: v for k, v in os.environ.items() if "DISCORD" not in k.upper() and "TOKEN" not in k.upper()}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def start_worker(url: str, worker_id: str, files, log_dir: Path, decoder: Path | None = None,
                 extra: tuple[str, ...] = ()) -> WorkerProc:
    argv = [
        sys.executable, "-m", "engine.worker", "--queue", url,
        "--clip-model", str(files.clip_torchscript), "--decoder", str(decoder or files.decoder_pickle),
        "--trust-decoder", "--device", "cpu", "--max-batch", "1", "--worker-id", worker_id,
        "--cache-dir", str(files.cache_dir),
        "--encoder", str(files.encoder_pickle),   # the tiny one: the default, openai's, is a download
        # A checkpoint at every frame (the default is timed, every 60 s): the kill -9 tests take
        # a job over from the last frame's checkpoint.
        "--checkpoint-every", "0", *extra,
    ]
    log_path = log_dir / f"{worker_id}.log"
    log_file = open(log_path, "a")
    proc = subprocess.Popen(argv, cwd=ROOT, env=worker_env(), stdout=log_file, stderr=subprocess.STDOUT)
    log_file.close()
    return WorkerProc(worker_id, url, argv, log_path, proc)


def restart(w: WorkerProc) -> WorkerProc:
    log_file = open(w.log_path, "a")
    proc = subprocess.Popen(w.argv, cwd=ROOT, env=worker_env(), stdout=log_file, stderr=subprocess.STDOUT)
    log_file.close()
    return WorkerProc(w.worker_id, w.url, w.argv, w.log_path, proc)


async def wait_workers(queue, workers: list[WorkerProc], timeout: float = 90.0) -> None:
    """Until every worker process has claimed since it started (models loaded, GPU thread up), so
    a killed one's last record does not count for its restart. Claimed, not only announced: a
    worker still loading announces itself, and a retry waits for a worker that claims."""
    deadline = time.monotonic() + timeout
    while True:
        seen = await queue.workers()
        now = time.time()
        missing = [w for w in workers if w.worker_id not in seen
                   or (seen[w.worker_id]["claimed_at"] or 0.0) < max(now - 10, w.started_at)]
        if not missing:
            return
        for w in missing:
            assert w.proc.poll() is None, f"worker {w.worker_id} exited:\n{w.log()[-3000:]}"
        assert time.monotonic() < deadline, f"workers not up: {[w.worker_id for w in missing]}"
        await asyncio.sleep(0.2)


# --- following events, as the bot does ----------------------------------------------------------


class Follower:
    def __init__(self, queue) -> None:
        self.queue = queue
        self.cursor = 0
        self.events: list[tuple[float, JobEvent]] = []   # (monotonic arrival time, event)

    async def skip_to_end(self) -> None:
        while batch := await self.queue.events(self.cursor, timeout=0):
            self.cursor = batch[-1].seq

    async def pump(self, timeout: float = 0.2) -> list[JobEvent]:
        batch = await self.queue.events(self.cursor, timeout=timeout)
        now = time.monotonic()
        if batch:
            self.cursor = batch[-1].seq
            self.events += [(now, e) for e in batch]
        return batch

    async def until(self, predicate, timeout: float = 60.0, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            await self.pump()

    def of(self, job_id: str) -> list[JobEvent]:
        return [e for _, e in self.events if e.job_id == job_id]

    def kinds(self, job_id: str) -> list[EventKind]:
        return [e.kind for e in self.of(job_id)]

    def count(self, job_id: str, kind: EventKind) -> int:
        return sum(1 for e in self.of(job_id) if e.kind == kind)

    def finished(self, job_ids) -> bool:
        final = (EventKind.DONE, EventKind.FAILED, EventKind.CANCELLED)
        return all(any(k in final for k in self.kinds(j)) for j in job_ids)


def spec(user: int = 1, **kw) -> JobSpec:
    return JobSpec(prompt=kw.pop("prompt", "a red house"), user_id=user, channel_id=10, grid=kw.pop("grid", 8), cutn=2,
                   iterations=kw.pop("iterations", 2), frame_every=kw.pop("frame_every", 2), seed=1, **kw)


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_aof(tmp_path_factory):
    """A redis-server of our own with the append-only file on (fsync always), so a kill -9 and a
    restart on the same port keep every acknowledged write."""
    server = start_redis_with_aof(tmp_path_factory.mktemp("redis-data"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def redis_url(redis_aof) -> str:
    return f"redis://127.0.0.1:{redis_aof.port}/0?prefix=dist&lease={LEASE}"


@pytest.fixture(scope="module")
def redis_workers(redis_url, tiny_model_files, tiny_models, tmp_path_factory):
    # `tiny_models` first: it fills the model cache, so the workers only read it.
    logs = tmp_path_factory.mktemp("worker-logs")
    workers = [start_worker(redis_url, f"gpu{i}", tiny_model_files, logs) for i in range(2)]
    yield workers
    stop_all(workers)


@pytest.fixture
async def rq(redis_url):
    queue = open_queue(redis_url)
    await queue.start()
    yield queue
    await queue.close()


# --- kill -9 and take over from the checkpoint --------------------------------------------------


async def _kill_and_take_over(queue, workers: list[WorkerProc]) -> tuple[WorkerProc, WorkerProc]:
    await wait_workers(queue, workers)
    follow = Follower(queue)
    await follow.skip_to_end()
    job = await queue.submit(spec(iterations=40, frame_every=4))
    # Kill the worker running it once it has checkpointed a few frames.
    while (cp := await queue.load_checkpoint(job.id)) is None or cp.iteration < 8:
        await follow.pump(0.05)
    record = await queue.get(job.id)
    victim = next(w for w in workers if w.worker_id == record.worker_id)
    other = next(w for w in workers if w is not victim)
    victim.kill9()
    resumed_at = (await queue.load_checkpoint(job.id)).iteration  # the last one it wrote
    killed_at = time.monotonic()

    await follow.until(lambda: follow.finished([job.id]), timeout=90, what="the job to finish")
    record = await queue.get(job.id)
    assert record.state == JobState.DONE and record.iteration == 40
    assert record.worker_id == other.worker_id and record.attempts == 2

    events = follow.of(job.id)
    kinds = [e.kind for e in events]
    assert kinds.count(EventKind.STARTED) == 2 and kinds.count(EventKind.DONE) == 1
    second = kinds.index(EventKind.STARTED, kinds.index(EventKind.STARTED) + 1)
    assert events[second - 1].kind == EventKind.QUEUED and events[second - 1].message == "worker lost"
    takeover = next(t for t, e in follow.events if e.job_id == job.id and e.kind == EventKind.STARTED
                    and t >= killed_at)
    assert takeover - killed_at < LEASE + 2.0   # within the lease (+ a claim poll, on a loaded CPU)
    progress = [e.iteration for e in events if e.kind == EventKind.PROGRESS]
    after = [e.iteration for e in events[second:] if e.kind == EventKind.PROGRESS]
    assert progress.count(0) == 1                    # never started again from iteration 0
    assert after[0] == resumed_at + 4 and after[-1] == 40
    assert sorted(set(progress)) == list(range(0, 41, 4))
    last_frame = [e for e in events if e.kind == EventKind.PROGRESS][-1]
    assert await queue.get_artifact(job.id, "final.png") == last_frame.frame_png
    assert (await queue.get_artifact(job.id, "video.mp4"))[4:8] == b"ftyp"
    assert "Traceback" not in other.log()
    return victim, other


async def test_redis_worker_killed_mid_job_another_resumes_from_its_checkpoint(rq, redis_workers):
    victim, _ = await _kill_and_take_over(rq, redis_workers)
    # The same worker, restarted, joins again (the next tests use it).
    redis_workers[redis_workers.index(victim)] = restart(victim)


# --- retries with a cap -------------------------------------------------------------------------


async def test_a_job_failing_on_every_worker_is_retried_up_to_the_cap_then_failed(rq, redis_workers):
    """A truncated checkpoint (as a crash of a store or a torch-version mismatch leaves it): every
    worker's `_begin` raises loading it, calls queue.fail(retry=True), the job goes back to the
    front and is claimed again, by the other worker, until `max_attempts` (3) claims."""
    from engine.worker import pack_checkpoint

    await wait_workers(rq, redis_workers)   # both up (the one an earlier test restarted too)
    follow = Follower(rq)
    await follow.skip_to_end()
    await rq.set_setting("paused", True)  # so that no worker claims it before its checkpoint is in
    try:
        job = await rq.submit(spec(iterations=8))
        blob = pack_checkpoint({"iteration": 4, "logits": torch.zeros(1, 8192, 8, 8)}, [])
        await rq.save_checkpoint(Checkpoint(job.id, 4, blob[: len(blob) // 2]))
    finally:
        await rq.set_setting("paused", False)
    await follow.until(lambda: follow.finished([job.id]), timeout=60, what="the job to fail")
    record = await rq.get(job.id)
    assert record.state == JobState.FAILED and record.attempts == 3
    assert "zip archive" in record.error or "Error" in record.error
    kinds = follow.kinds(job.id)
    assert kinds.count(EventKind.STARTED) == 3 and kinds.count(EventKind.QUEUED) == 1 + 2
    assert kinds[-1] == EventKind.FAILED and EventKind.PROGRESS not in kinds
    failed = next(e for e in follow.of(job.id) if e.kind == EventKind.FAILED)
    assert failed.message == record.error
    await asyncio.sleep(1.0)  # several claim polls later: never claimed again
    await follow.pump(0)
    assert follow.count(job.id, EventKind.STARTED) == 3
    logs = "".join(w.log() for w in redis_workers)
    assert logs.count(f"job {job.id} failed") == 3
    # each retry went to the other worker (both are alive): neither failed it three times alone
    assert all(f"job {job.id} failed" in w.log() for w in redis_workers), [w.log().count(job.id) for w in redis_workers]


# --- cancel reaches a remote worker -------------------------------------------------------------


async def test_cancel_reaches_a_job_on_a_worker_process_within_a_heartbeat(rq, redis_workers):
    await wait_workers(rq, redis_workers)
    follow = Follower(rq)
    await follow.skip_to_end()
    long_a = await rq.submit(spec(user=1, iterations=100_000, frame_every=1000))
    long_b = await rq.submit(spec(user=2, iterations=100_000, frame_every=1000))
    await follow.until(lambda: all(follow.count(j.id, EventKind.PROGRESS) for j in (long_a, long_b)),
                       what="both long jobs running")
    short = await rq.submit(spec(user=3))          # both workers busy: it waits
    assert await rq.position(short.id) == 1
    on_a = (await rq.get(long_a.id)).worker_id

    latencies = []
    for job in (long_a, long_b):
        t0 = time.monotonic()
        assert await rq.cancel(job.id)
        await follow.until(lambda: follow.count(job.id, EventKind.CANCELLED), timeout=10, what="CANCELLED")
        arrived = next(t for t, e in follow.events if e.job_id == job.id and e.kind == EventKind.CANCELLED)
        latencies.append(arrived - t0)
        if job is long_a:  # the slot is free: the waiting job starts there
            await follow.until(lambda: follow.count(short.id, EventKind.STARTED), timeout=5, what="next job")
            assert (await rq.get(short.id)).worker_id == on_a
    print(f"cancel -> CANCELLED event: {', '.join(f'{x:.2f} s' for x in latencies)}")
    # heartbeat every 1 s + one step + two round trips; slack for a loaded 2-core machine
    assert max(latencies) < 1.75, latencies
    await follow.until(lambda: follow.finished([short.id]), what="the short job")
    await asyncio.sleep(1.0)
    await follow.pump(0)
    for job in (long_a, long_b):
        record = await rq.get(job.id)
        assert record.state == JobState.CANCELLED and record.attempts == 1
        assert follow.kinds(job.id).count(EventKind.STARTED) == 1   # never claimed again
    assert (await rq.get(short.id)).state == JobState.DONE


# --- Redis killed and restarted mid-run ---------------------------------------------------------


async def test_redis_killed_and_restarted_mid_run_every_job_completes_once(rq, redis_workers, redis_aof):
    await wait_workers(rq, redis_workers)
    follow = Follower(rq)
    await follow.skip_to_end()
    jobs = [await rq.submit(spec(user=1 + i % 3, iterations=12, frame_every=4)) for i in range(6)]
    await follow.until(lambda: sum(follow.count(j.id, EventKind.PROGRESS) for j in jobs) >= 3,
                       what="jobs under way")
    redis_aof.proc.send_signal(signal.SIGKILL)   # a crash, not a shutdown
    redis_aof.proc.wait(5)
    await asyncio.sleep(1.0)
    redis_aof.proc = start_redis_process(redis_aof.args, redis_aof.port)
    await follow.until(lambda: follow.finished([j.id for j in jobs]), timeout=90, what="every job")
    for job in jobs:
        record = await rq.get(job.id)
        assert record.state == JobState.DONE, (record.state, record.error)
        assert follow.count(job.id, EventKind.DONE) == 1
        assert await rq.get_artifact(job.id, "final.png") is not None
    assert all(w.proc.poll() is None for w in redis_workers)   # the same processes, reconnected
    await wait_workers(rq, redis_workers, timeout=20)


async def test_redis_down_longer_than_the_lease_costs_a_running_job_no_attempt(rq, redis_workers, redis_aof):
    """Redis stopped for three leases mid-job, then back with its data (append-only file): by its
    clock the running job's lease ran out meanwhile. The first sweep after the restart (the test's
    here, as the idle worker's next claim would be) used to requeue the job: a second attempt,
    resumed from an older checkpoint. Now a Redis that restarted gives the workers a full lease to
    renew first: the job keeps its run (one claim, the same lease) and its frames go on."""
    await wait_workers(rq, redis_workers)
    follow = Follower(rq)
    await follow.skip_to_end()
    job = await rq.submit(spec(iterations=100_000, frame_every=20))
    await follow.until(lambda: follow.count(job.id, EventKind.PROGRESS) >= 2, what="the job under way")
    before = await rq.get(job.id)
    redis_aof.stop()
    await asyncio.sleep(3 * LEASE)
    redis_aof.proc = start_redis_process(redis_aof.args, redis_aof.port)
    assert await rq.sweep() == 0   # every lease ran out by Redis's clock: none counts as expired yet
    last_before = max(e.iteration for e in follow.of(job.id) if e.kind == EventKind.PROGRESS)
    await follow.until(lambda: any(e.kind == EventKind.PROGRESS and e.iteration > last_before + 40
                                   for e in follow.of(job.id)), what="frames after the restart")
    await asyncio.sleep(2 * LEASE)   # past the grace: its worker renewed the lease
    record = await rq.get(job.id)
    assert record.state == JobState.RUNNING and record.attempts == 1, record
    assert record.lease_id == before.lease_id and record.worker_id == before.worker_id
    await follow.pump(0)
    kinds = follow.kinds(job.id)
    assert kinds.count(EventKind.STARTED) == 1 and kinds.count(EventKind.QUEUED) == 1, kinds   # never requeued
    frames = [e.iteration for e in follow.of(job.id) if e.kind == EventKind.PROGRESS]
    assert frames == sorted(set(frames)), frames   # one run's frames, on from where it was
    assert await rq.cancel(job.id)
    await follow.until(lambda: follow.finished([job.id]), what="the cancel")


# --- load: none lost, none twice, fair ----------------------------------------------------------


async def test_small_load_run_none_lost_none_twice_fair_order(rq, redis_workers):
    await wait_workers(rq, redis_workers)
    follow = Follower(rq)
    await follow.skip_to_end()
    users, per_user = 6, 5
    await rq.set_setting("paused", True)   # the whole burst is in line before anyone claims
    try:
        jobs = []  # (job id, user, rank within the user's jobs); users submit in blocks
        for user in range(1, users + 1):
            for rank in range(per_user):
                record = await rq.submit(spec(user=100 + user))
                jobs.append((record.id, user, rank))
    finally:
        await rq.set_setting("paused", False)
    t0 = time.monotonic()
    ids = [j for j, _, _ in jobs]
    await follow.until(lambda: follow.finished(ids), timeout=120, what="all 30 jobs")
    elapsed = time.monotonic() - t0

    done = Counter(e.job_id for _, e in follow.events if e.kind == EventKind.DONE)
    assert set(done) == set(ids) and set(done.values()) == {1}           # none lost, none twice
    starts = [e for _, e in follow.events if e.kind == EventKind.STARTED and e.job_id in set(ids)]
    assert len(starts) == len(ids)                                      # none ran twice
    rank = {j: r for j, _, r in jobs}
    order = [rank[e.job_id] for e in sorted(starts, key=lambda e: e.seq)]
    assert order == sorted(order), order   # no user's k-th job before another user's (k-1)-th
    waits: dict[int, float] = defaultdict(float)
    created = {j: (await rq.get(j)).created_at for j in ids}
    user_of = {j: u for j, u, _ in jobs}
    for e in starts:
        waits[user_of[e.job_id]] = max(waits[user_of[e.job_id]], e.at - created[e.job_id])
    print(f"30 jobs / 6 users / 2 workers: {elapsed:.1f} s; longest wait per user: "
          + ", ".join(f"u{u} {w:.1f}s" for u, w in sorted(waits.items())))


# --- SQLite: two worker processes on one file ---------------------------------------------------


async def test_sqlite_worker_killed_mid_job_another_resumes_from_its_checkpoint(
    tmp_path, tiny_model_files, tiny_models
):
    url = f"sqlite:///{tmp_path}/jobs.db?lease={LEASE}"
    queue = open_queue(url)
    await queue.start()
    workers = [start_worker(url, f"sq{i}", tiny_model_files, tmp_path) for i in range(2)]
    try:
        await _kill_and_take_over(queue, workers)
    finally:
        stop_all(workers)
        await queue.close()


async def test_a_worker_with_grids_takes_only_jobs_of_those_grids(tmp_path, tiny_model_files):
    """`imagine-worker --grids 4` (a smaller GPU's worker) runs the grid-4 job queued behind a
    grid-8 one and leaves the grid-8 job queued for a worker that takes it."""
    url = f"sqlite:///{tmp_path}/jobs.db?lease={LEASE}"
    queue = open_queue(url)
    await queue.start()
    worker = start_worker(url, "small", tiny_model_files, tmp_path, extra=("--grids", "4"))
    try:
        large = await queue.submit(spec(iterations=4, frame_every=2))             # grid 8
        small = await queue.submit(spec(iterations=4, frame_every=2, grid=4))
        deadline = time.monotonic() + 90
        while (record := await queue.get(small.id)).state != JobState.DONE:
            assert time.monotonic() < deadline and worker.proc.poll() is None, worker.log()[-3000:]
            await asyncio.sleep(0.2)
        assert record.worker_id == "small"
        assert (await queue.get(large.id)).state == JobState.QUEUED
        assert "grids=4" in worker.log()
    finally:
        stop_all([worker])
        await queue.close()


def test_grids_flag_refuses_what_is_no_grid():
    from engine.worker import build_parser

    assert build_parser().parse_args(["--queue", "x.db", "--grids", "64, 32,64"]).grids == (32, 64)
    for bad in ("0", "256", "32;64", "big"):
        proc = subprocess.run([sys.executable, "-m", "engine.worker", "--queue", "x.db", "--grids", bad],
                              cwd=ROOT, env=worker_env(), capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and "--grids" in proc.stderr, (bad, proc.stderr)


# --- a worker whose GPU work raises (regression: it used to kill the GPU thread) ----------------


async def test_a_worker_whose_decoder_cannot_run_fails_jobs_through_the_cap(tmp_path, tiny_model_files):
    """A host with a wrong decoder file (2 image channels, not 3): frame 0 raises on the GPU
    thread. The job must go through queue.fail(retry=True) and end FAILED after the cap; before the
    fix the GPU thread died and the job stayed RUNNING, heartbeated forever."""
    from engine import random_models
    from engine.models import Decoder, load_models
    from engine.worker import Worker

    torch.manual_seed(0)
    bad = Decoder(n_init=32, n_hid=64, n_blk_per_group=1, vocab_size=8192, output_channels=1, requires_grad=False)
    path = random_models.save_pickled_module(bad.eval(), tmp_path / "wrong-decoder.pkl")
    models = load_models(str(tiny_model_files.clip_torchscript), str(path), "cpu", tmp_path / "cache", True)
    queue = open_queue(f"sqlite:///{tmp_path}/jobs.db")
    await queue.start()
    try:
        async with Worker(queue, lambda: models, worker_id="bad", heartbeat_every=0.2) as worker:
            job = await queue.submit(spec())
            deadline = time.monotonic() + 30
            while not (record := await queue.get(job.id)).state.finished:
                assert time.monotonic() < deadline, (record.state, record.attempts, worker.gpu_alive)
                await asyncio.sleep(0.1)
            assert worker.gpu_alive
        assert record.state == JobState.FAILED and record.attempts == 3
        assert "RuntimeError" in record.error
    finally:
        await queue.close()
