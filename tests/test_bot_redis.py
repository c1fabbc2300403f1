"""The bot end to end on the Redis backend: the real discord.py client against the fake Discord,
a real redis-server (started here, on a free port), the bot's embedded worker off (`--no-worker`)
and one real `imagine-worker` process (`python -m engine.worker --device cpu`, tiny model files).

What is shown: /imagine over Redis reaches the user as progress frames and one final post (bot
event cursor, final post built from Redis, mark_delivered); Redis killed and restarted with its
data (append-only file, fsync always) mid-job: the job finishes on the same run and is posted
once, the bot and the worker reconnect; Redis restarted having lost its data after the bot had
read many events (its cursor far above the restarted numbering): new jobs' progress and final
posts still reach the user promptly, and the reply of the job lost with the data says so, once
(no result, no stray message), and the bot stops following it.

The worker process is started once per module (torch import: up to ~30 s on a loaded 2-core
machine) and is reused; so are the Redis server and its data folder. Each test has its own fake
Discord and its own bot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from engine.jobs import EventKind, JobState
from tests.fakediscord import FakeDiscord
from tests.queue_fixtures import RedisServer, job_events, start_redis_process, start_redis_with_aof
from tests.test_bot_support import Harness, test_config

pytestmark = pytest.mark.asyncio

ROOT = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ITERATION_RE = re.compile(r"Iteration (\d+)/(\d+)")
CURSOR_KEY = "bot.events_cursor"   # bot.progress.CURSOR_KEY
WORKER_ID = "redis-gpu0"


# --- Redis and the worker process (once per module) ----------------------------------------------


@dataclass
class RedisWithData:
    server: RedisServer
    data: Path   # its --dir: the append-only file lives here

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.server.port}/0"   # default prefix and lease, as deployed

    def kill(self) -> None:
        """A crash: SIGKILL, nothing flushed beyond what fsync-always already wrote."""
        self.server.proc.send_signal(signal.SIGKILL)
        self.server.proc.wait(10)

    def start(self) -> None:
        self.server.proc = start_redis_process(self.server.args, self.server.port, timeout=30)

    def wipe(self) -> None:
        """Lose every byte of data, as a Redis without persistence (or on a fresh volume) comes back."""
        for entry in self.data.iterdir():
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


@pytest.fixture(scope="module")
def redis_db(tmp_path_factory):
    data = tmp_path_factory.mktemp("bot-redis-data")
    db = RedisWithData(start_redis_with_aof(data), data)
    yield db
    db.server.stop()


@dataclass
class WorkerProcess:
    proc: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture(scope="module")
def gpu_worker(redis_db, tiny_model_files, tmp_path_factory):
    """One `imagine-worker` on the tiny model files; --device cpu always given explicitly."""
    files = tiny_model_files
    argv = [
        sys.executable, "-m", "engine.worker", "--queue", redis_db.url,
        "--clip-model", str(files.clip_torchscript), "--decoder", str(files.decoder_pickle), "--trust-decoder",
        "--device", "cpu", "--max-batch", "1", "--worker-id", WORKER_ID, "--cache-dir", str(files.cache_dir),
        "--encoder", str(files.encoder_pickle),   # the tiny one: the default, openai's, is a download
    ]
    env = {k: v for k, v in os.environ.items() if "DISCORD" not in k.upper() and "TOKEN" not in k.upper()}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    log_path = tmp_path_factory.mktemp("bot-redis-worker") / "worker.log"
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    worker = WorkerProcess(proc, log_path)
    yield worker
    if proc.poll() is None:
        proc.terminate()   # graceful: hands a running job back
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


async def wait_worker_up(queue, worker: WorkerProcess, timeout: float = 150.0) -> None:
    """Until the worker has claimed (registered itself) recently: models loaded, GPU thread up."""
    deadline = time.monotonic() + timeout
    while True:
        assert worker.proc.poll() is None, f"the worker exited ({worker.proc.returncode}):\n{worker.log()[-3000:]}"
        seen = (await queue.workers()).get(WORKER_ID)
        if seen is not None and seen["last_seen"] > time.time() - 10:
            return
        assert time.monotonic() < deadline, f"the worker did not come up in {timeout}s:\n{worker.log()[-3000:]}"
        await asyncio.sleep(0.2)


# --- the bot, per test ----------------------------------------------------------------------------


@pytest_asyncio.fixture
async def rh(tmp_path, redis_db, gpu_worker):
    """A Harness whose bot is on the module's Redis, embedded worker off (start it with
    `h.start(worker=False)`); `h.extra["worker"]` is the worker process."""
    fd = FakeDiscord()
    await fd.start()
    config = test_config(tmp_path, queue={"url": redis_db.url}, worker={"embedded": False})
    config.progress.message_interval = 0.0   # every frame that arrives while no edit is in flight
    h = Harness(fd=fd, config=config, models=None)
    h.extra["worker"] = gpu_worker
    h.extra["redis"] = redis_db
    try:
        yield h
    finally:
        if h.resources is not None and h._stack is not None and redis_db.server.proc.poll() is None:
            # Leave the shared worker idle for the next test: cancel whatever this test left.
            with contextlib.suppress(Exception):
                async def drain() -> None:
                    for record in await h.queue.running():
                        await h.queue.cancel(record.id)
                    await h.queue.clear()
                await asyncio.wait_for(drain(), 10)
        await h.stop()
        await fd.close()


# --- what the user saw ------------------------------------------------------------------------------


def edits_of(fd, message_id: int) -> list:
    """Successful PATCHes of one message (interaction webhook or channel), in order."""
    return [r for r in fd.requests if r.method == "PATCH" and r.status == 200
            and isinstance(r.response, dict) and str(r.response.get("id")) == str(message_id)]


def shown_iterations(fd, message_id: int) -> list[tuple[float, int, int]]:
    """(time.time() it reached Discord, iteration, total) of each progress edit of the message."""
    out = []
    for req in edits_of(fd, message_id):
        m = ITERATION_RE.search((req.json or {}).get("content") or "")
        if m:
            out.append((req.timestamp, int(m.group(1)), int(m.group(2))))
    return out


def frame_edits(fd, message_id: int) -> list:
    return [r for r in edits_of(fd, message_id) if any(f.filename == "frame.png" for f in r.files)]


def assert_result_message(h, msg, job_id: str) -> object:
    """Exactly one final post for the job: the reply itself, edited to final.png + video.mp4 and the
    result buttons. Returns that request."""
    assert len(h.posts_of_job(job_id)) == 1, [r.path for r in h.posts_of_job(job_id)]
    (final,) = h.final_edits(msg.id)
    assert sorted(f.filename for f in final.files) == ["final.png", "video.mp4"]
    by_name = {f.filename: f.data for f in final.files}
    assert by_name["final.png"].startswith(PNG_MAGIC)
    assert by_name["video.mp4"][4:8] == b"ftyp"
    assert "Done" in final.json["content"]
    buttons = [f"imagine:reroll:{job_id}", f"imagine:continue:{job_id}", f"imagine:remix:{job_id}"]
    assert [c["custom_id"] for row in final.json["components"] for c in row["components"]] == buttons
    stored = h.fd.messages[msg.id]
    assert sorted(a["filename"] for a in stored.attachments) == ["final.png", "video.mp4"]
    assert stored.custom_ids == buttons
    return final


def bot_errors(caplog) -> list[str]:
    return [f"{r.name}: {r.getMessage()}" for r in caplog.records
            if r.levelno >= logging.ERROR and r.name.startswith("bot")]


# --- 1. /imagine over Redis, worker in its own process ---------------------------------------------


async def test_imagine_over_redis_streams_frames_and_posts_the_result_once(rh, caplog):
    h = rh
    caplog.set_level(logging.WARNING)
    fd = h.fd
    await h.start(worker=False)
    assert h.resources.worker is None   # --no-worker: only the imagine-worker process runs jobs
    await wait_worker_up(h.queue, h.extra["worker"])

    inter = await h.imagine("a lighthouse in the fog", seed=11, iterations=8)
    assert inter.response_type == 5   # deferred, publicly
    msg = await h.reply_of(inter)
    job_id = h.job_id(msg)
    record = await h.wait_delivered(job_id, timeout=90)
    assert record.state == JobState.DONE, (record.state, record.error)
    assert record.worker_id == WORKER_ID and record.attempts == 1 and record.iteration == 8
    assert record.spec.reply["result_message_id"] == msg.id

    edits = edits_of(fd, msg.id)
    assert "a lighthouse in the fog" in edits[0].json["content"] and "Queued" in edits[0].json["content"]
    # Frames from the worker process, through Redis's event log, onto the reply.
    frames = frame_edits(fd, msg.id)
    assert len(frames) >= 2, [r.json.get("content") for r in edits]
    shown = [it for _, it, total in shown_iterations(fd, msg.id)]
    assert shown == sorted(shown) and len(set(shown)) == len(shown), shown
    assert all(total == 8 for _, _, total in shown_iterations(fd, msg.id))
    progress = [e for e in await job_events(h.queue, job_id) if e.kind == EventKind.PROGRESS]
    assert [e.iteration for e in progress] == [0, 2, 4, 6, 8]   # frame_every 2
    published = {e.frame_png for e in progress}
    for req in frames:
        (f,) = req.files
        assert f.data.startswith(PNG_MAGIC) and f.data in published   # the worker's own frames
        assert "similarity " in req.json["content"]
    assert any("left" in r.json["content"] for r in frames)   # an ETA from the frames' timing

    final = assert_result_message(h, msg, job_id)
    assert final is edits[-1]
    by_name = {f.filename: f.data for f in final.files}
    assert by_name["final.png"] == await h.queue.get_artifact(job_id, "final.png")
    assert by_name["video.mp4"] == await h.queue.get_artifact(job_id, "video.mp4")
    assert "seed 11" in final.json["content"]
    assert [m.id for m in fd.channel_messages()] == [msg.id]   # no stray message
    # Nothing more once delivered: a few reconcile and poll rounds later, still one post.
    await asyncio.sleep(1.0)
    assert len(h.posts_of_job(job_id)) == 1 and edits_of(fd, msg.id)[-1] is final
    assert bot_errors(caplog) == []
    fd.assert_clean()


# --- 2. Redis killed and restarted with its data, mid-job -----------------------------------------


async def test_redis_restarted_with_its_data_mid_job_the_job_finishes_and_is_posted_once(rh, caplog):
    h = rh
    caplog.set_level(logging.WARNING)
    fd = h.fd
    redis_db: RedisWithData = h.extra["redis"]
    worker: WorkerProcess = h.extra["worker"]
    # Long enough that frames still come after the restart: a fast CPU ran 30 iterations out within
    # the outage, and then only the final post was left to show.
    h.config.imagine.max_iterations = total = 150
    await h.start(worker=False)
    await wait_worker_up(h.queue, worker)

    inter = await h.imagine("a harbour at dusk", iterations=total)
    msg = await h.reply_of(inter)
    job_id = h.job_id(msg)
    await fd.wait_for(lambda: any(it >= 2 for _, it, _ in shown_iterations(fd, msg.id)), 90, "frames on the reply")
    before = await h.queue.get(job_id)
    assert before.state == JobState.RUNNING and before.iteration < total   # really mid-job

    redis_db.kill()              # a crash; the append-only file (fsync always) keeps every acknowledged write
    killed_at = time.time()
    await asyncio.sleep(0.5)     # down long enough for every client to see refused connections
    redis_db.start()
    restarted_at = time.time()

    record = await h.wait_delivered(job_id, timeout=90)
    assert record.state == JobState.DONE and record.iteration == total, (record.state, record.error)
    # The same run went on: the worker kept its lease through the outage, no retry, no second start.
    assert record.attempts == 1 and record.worker_id == WORKER_ID
    kinds = [e.kind for e in await job_events(h.queue, job_id)]
    assert kinds.count(EventKind.STARTED) == 1 and kinds.count(EventKind.DONE) == 1
    assert kinds[0] == EventKind.QUEUED and kinds[-1] == EventKind.DONE

    # The bot's event loop reconnected: frames newer than any shown before the crash reached the user
    # after the restart, before the final post.
    shown = shown_iterations(fd, msg.id)
    last_before = max(it for t, it, _ in shown if t < killed_at)
    after = [it for t, it, _ in shown if t >= restarted_at]
    assert after and max(after) > last_before, (last_before, shown)
    # Never backwards, though the worker's frames queued up during the outage may reach the log
    # out of order (their publishes are retried concurrently).
    assert [it for _, it, _ in shown] == sorted(it for _, it, _ in shown), shown

    assert_result_message(h, msg, job_id)
    assert edits_of(fd, msg.id)[-1] is h.final_edits(msg.id)[0]
    assert [m.id for m in fd.channel_messages()] == [msg.id]
    assert worker.proc.poll() is None   # the same process, reconnected
    await wait_worker_up(h.queue, worker, timeout=30)
    await asyncio.sleep(1.0)   # a few more rounds of the bot's loops: still one post
    assert len(h.posts_of_job(job_id)) == 1
    assert bot_errors(caplog) == []
    fd.assert_clean()


# --- 3. Redis restarted having lost its data, bot cursor far ahead ----------------------------------


def _lags(fd, msg_id: int, final_req, events) -> tuple[list[float], float]:
    """For each frame the worker published: seconds until the user's message showed it (or a later
    iteration, or the result); and the same for the DONE event and the final post."""
    shown = shown_iterations(fd, msg_id)

    def seen_at(iteration: int) -> float:
        return min([t for t, it, _ in shown if it >= iteration] + [final_req.timestamp])

    frames = [e for e in events if e.kind == EventKind.PROGRESS]
    (done,) = [e for e in events if e.kind == EventKind.DONE]
    return [seen_at(e.iteration) - e.at for e in frames], final_req.timestamp - done.at


async def test_redis_restarted_without_its_data_new_jobs_still_reach_the_user_promptly(rh, caplog):
    h = rh
    caplog.set_level(logging.WARNING)
    fd = h.fd
    redis_db: RedisWithData = h.extra["redis"]
    worker: WorkerProcess = h.extra["worker"]
    # Production timing: a long-poll of 5 s (Redis BLOCKs in slices of 2.5 s) and a reconcile pass
    # only every 30 s, so the final post of a job in this test can only come from the event log.
    h.config.progress.poll_timeout = 5.0
    h.config.progress.reconcile_interval = 30.0
    h.config.imagine.max_iterations = 1000
    await h.start(worker=False)
    await wait_worker_up(h.queue, worker)

    # A Redis with a long history: its event counter where thousands of earlier events leave it.
    evseq = f"{h.queue.prefix}:evseq"
    if int(await h.queue.redis.get(evseq) or 0) < 5000:
        await h.queue.redis.set(evseq, 5000)
    # A long job runs; the bot follows its events, so its cursor (saved every ~2 s) is past 5000.
    inter = await h.imagine("lost with the data", iterations=400)
    lost_msg = await h.reply_of(inter)
    lost_id = h.job_id(lost_msg)
    await fd.wait_for(lambda: len(frame_edits(fd, lost_msg.id)) >= 2, 90, "frames of the long job")
    deadline = time.monotonic() + 30
    while int(await h.queue.get_setting(CURSOR_KEY, 0) or 0) <= 5000:
        assert time.monotonic() < deadline, "the bot never saved its event cursor"
        await asyncio.sleep(0.1)
    assert h.bot.progress.cursor > 5000

    redis_db.kill()
    redis_db.wipe()
    await asyncio.sleep(0.5)
    redis_db.start()   # empty: no jobs, no settings, the event numbering starts again at 1
    restarted_at = time.time()
    assert await h.queue.get(lost_id) is None

    # The first job after the restart: the bot has to notice that the numbering restarted.
    inter = await h.imagine("after the flood", iterations=4)
    first_msg = await h.reply_of(inter, timeout=30)
    first_id = h.job_id(first_msg)
    record = await h.wait_delivered(first_id, timeout=60)
    assert record.state == JobState.DONE and record.worker_id == WORKER_ID, (record.state, record.error)
    assert_result_message(h, first_msg, first_id)
    assert h.bot.progress.cursor < 5000   # it follows the restarted numbering

    # The next job: every frame and the result reach the user as they happen, each read where the
    # restarted log is (not first waited out for a 2.5 s BLOCK slice past its end, then read again
    # from its start with a warning, as for a cursor left at the old numbering).
    total = 16
    logged = len(caplog.records)
    inter = await h.imagine("a second job after the flood", iterations=total)
    msg = await h.reply_of(inter, timeout=30)
    job_id = h.job_id(msg)
    record = await h.wait_delivered(job_id, timeout=60)
    assert record.state == JobState.DONE and record.iteration == total, (record.state, record.error)
    final = assert_result_message(h, msg, job_id)
    assert len(frame_edits(fd, msg.id)) >= 3
    events = await job_events(h.queue, job_id)
    assert events[0].seq < 100   # numbered from 1 again, far below the bot's old cursor
    lags, final_lag = _lags(fd, msg.id, final, events)
    print(f"frame lags: {' '.join(f'{x:.2f}' for x in lags)}; final post {final_lag:.2f} s after DONE")
    # Redis BLOCKs in 2.5 s slices: a bot reading after its old cursor would wait out a slice at
    # every read, then find the log restarted (a warning each time) and read it all again.
    restarts = [r.getMessage() for r in caplog.records[logged:] if "restarted" in r.getMessage()]
    assert restarts == [], restarts
    assert events[-1].seq <= h.bot.progress.cursor < 5000, (h.bot.progress.cursor, events[-1].seq)

    # The job lost with the data: the worker dropped it (it ran the new jobs). The bot saw the event
    # numbering restart and looked for the jobs it follows at once (not at its next reconcile round,
    # 30 s apart here): the lost one's reply says so, once, keeps its last frame and loses its Cancel
    # button; no result, no stray message, and the bot no longer follows the job.
    assert worker.proc.poll() is None
    await fd.wait_for(lambda: "Lost:" in fd.messages[lost_msg.id].content, 40, "the lost job's notice")
    notices = [r for r in edits_of(fd, lost_msg.id) if "Lost:" in r.json.get("content", "")]
    assert len(notices) == 1 and edits_of(fd, lost_msg.id)[-1] is notices[0]
    print(f"lost job's notice {notices[0].timestamp - restarted_at:.2f} s after the restart")
    assert notices[0].timestamp - restarted_at < 25.0   # the restart was noticed, not the 30 s round
    shown = fd.messages[lost_msg.id]
    assert "lost with the data" in shown.content   # the prompt, as before
    assert "the queue lost its data" in shown.content and "Run `/imagine` again" in shown.content
    assert not ITERATION_RE.search(shown.content)
    assert [a["filename"] for a in shown.attachments] == ["frame.png"] and shown.custom_ids == []
    assert lost_id not in h.bot.progress.trackers
    assert h.posts_of_job(lost_id) == [] and h.final_edits(lost_msg.id) == []
    await asyncio.sleep(1.0)   # a few more rounds: still the one notice
    assert edits_of(fd, lost_msg.id)[-1] is notices[0]
    assert sorted(m.id for m in fd.channel_messages()) == sorted([lost_msg.id, first_msg.id, msg.id])
    assert bot_errors(caplog) == []
    fd.assert_clean()
