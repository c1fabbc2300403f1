"""engine.worker with a real SQLite queue and tiny models: claims, frames, results, cancel, resume."""

from __future__ import annotations

import asyncio
import inspect
import io
import logging
import os
import shutil
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from engine.generate import GenerationSettings, state_from_bytes
from engine.jobs import Checkpoint, EventKind, JobRecord, JobSpec, JobState, ParentGone, upload_id_of
from engine.queue import open_queue
from engine.worker import Worker
from tests.compile_support import compile_backend
from tests.queue_fixtures import job_events


@pytest.fixture
async def queue(tmp_path):
    q = open_queue(f"sqlite:///{tmp_path}/jobs.db")
    await q.start()
    yield q
    await q.close()


def spec(prompt="a red house", user=1, **kw) -> JobSpec:
    return JobSpec(prompt=prompt, user_id=user, channel_id=10, grid=kw.pop("grid", 8),
                   iterations=kw.pop("iterations", 6), frame_every=kw.pop("frame_every", 2),
                   cutn=kw.pop("cutn", 4), seed=kw.pop("seed", 1), **kw)


def runs_of(worker: Worker, job_id: str) -> int:
    """How many runs of `job_id` the worker has (a stale one, having lost its lease, included)."""
    return sum(run.record.id == job_id for run in list(worker.running.values()))


class Ends:
    """A worker observer (engine.observability's hooks) that records `job_ended`."""

    def __init__(self) -> None:
        self.ended: list[tuple[str, str]] = []

    def iterations(self, n: int) -> None:
        pass

    def job_started(self, record) -> None:
        pass

    def job_ended(self, record, state: str) -> None:
        self.ended.append((record.id, state))


class Steps(Ends):
    """Also counts the worker's steps (job-iterations: with one job at a time, that job's iteration)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def iterations(self, n: int) -> None:   # called on the GPU thread, after each step
        self.count += n


async def final_of(queue, job_id):
    """The job's final picture and its kept logits (state.pt: fp16, engine.generate.compact_state)."""
    state = state_from_bytes(await queue.get_artifact(job_id, "state.pt"))
    return await queue.get_artifact(job_id, "final.png"), state["logits"]


async def wait_state(queue, job_id, states, timeout=60.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        record = await queue.get(job_id)
        if record.state in states:
            return record
        await asyncio.sleep(0.05)
    raise AssertionError(f"job {job_id} stuck in {record.state}")


async def test_a_job_runs_to_the_end_with_frames_video_and_state(queue, tiny_models):
    async with Worker(queue, lambda: tiny_models, worker_id="w1", heartbeat_every=0.2):
        job = await queue.submit(spec())
        record = await wait_state(queue, job.id, {JobState.DONE})
    assert record.iteration == 6 and record.similarity is not None
    events = await job_events(queue, job.id)
    kinds = [e.kind for e in events]
    assert kinds[:2] == [EventKind.QUEUED, EventKind.STARTED] and kinds[-1] == EventKind.DONE
    progress = [e for e in events if e.kind == EventKind.PROGRESS]
    assert [e.iteration for e in progress] == [0, 2, 4, 6]
    assert all(Image.open(io.BytesIO(e.frame_png)).size == (64, 64) for e in progress)
    final = await queue.get_artifact(job.id, "final.png")
    assert final == progress[-1].frame_png
    assert (await queue.get_artifact(job.id, "video.mp4"))[4:8] == b"ftyp"
    assert state_from_bytes(await queue.get_artifact(job.id, "state.pt"))["iteration"] == 6


async def test_a_compiling_worker_gives_the_same_job(queue, tiny_models):
    """`compile` (`[worker] compile`, `imagine-worker --compile`) reaches the BatchRunner: with the
    `eager` backend dynamo traces the hot loop (nothing is code-generated) and the job's frames are
    those of the plain worker, to float tolerance."""
    from torch._dynamo.utils import counters   # noqa: PLC0415 - dynamo's own tally of traced graphs

    finals, graphs = {}, {}
    for name, compile in (("plain", ""), ("compiled", "eager")):
        before = counters["stats"]["unique_graphs"]
        async with Worker(queue, lambda: tiny_models, worker_id=name, compile=compile):
            job = await queue.submit(spec())
            await wait_state(queue, job.id, {JobState.DONE})
        graphs[name] = counters["stats"]["unique_graphs"] - before
        finals[name] = [e.frame_png for e in await job_events(queue, job.id) if e.kind == EventKind.PROGRESS]
    plain, compiled = ([np.asarray(Image.open(io.BytesIO(png)), dtype=np.int16) for png in finals[k]]
                       for k in ("plain", "compiled"))
    assert graphs["plain"] == 0 and graphs["compiled"] >= 2   # the two compiled regions were traced
    assert len(plain) == len(compiled) == 4
    assert all(np.abs(a - b).max() <= 2 for a, b in zip(plain, compiled))


async def test_a_compiling_worker_compiles_before_its_first_claim(queue, tiny_models, caplog):
    """With torch.compile on, the GPU thread compiles (a step at batch 1 and one at batch 2 of
    throwaway slots) before the worker claims anything: a job waiting meanwhile stays queued, where
    any worker may take it, instead of sitting started with no frame while its worker compiles.
    An uncompiled worker claims at once."""
    import torch._dynamo   # noqa: PLC0415
    from torch._dynamo.utils import counters   # noqa: PLC0415 - dynamo's own tally of traced graphs

    torch._dynamo.reset()   # the regions traced by earlier tests are traced again here
    job = await queue.submit(spec())
    before = counters["stats"]["unique_graphs"]
    with caplog.at_level(logging.INFO, logger="engine.worker"):
        async with Worker(queue, lambda: tiny_models, worker_id="compiling", compile="eager", max_batch=2,
                          base_settings=GenerationSettings(grid=8, cutn=2)) as worker:
            await wait_state(queue, job.id, {JobState.DONE})
            assert worker.warmed_up.is_set()
    warmed = [r for r in caplog.records if "torch.compile warmed up" in r.getMessage()]
    assert len(warmed) == 1 and "batch sizes 1-2" in warmed[0].getMessage(), [r.getMessage() for r in caplog.records]
    # The picture region at batch 1 and at 2; the cut-outs' region (batch x cutn: 2, then 4) once.
    assert counters["stats"]["unique_graphs"] - before >= 3
    record = await queue.get(job.id)
    assert record.state == JobState.DONE and record.started_at >= warmed[0].created   # claimed after

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="engine.worker"):
        async with Worker(queue, lambda: tiny_models, worker_id="plain", compile="") as worker:
            assert worker.warmed_up.wait(timeout=30)
            plain = await queue.submit(spec())
            await wait_state(queue, plain.id, {JobState.DONE})
    assert not [r for r in caplog.records if "warmed up" in r.getMessage()]


@pytest.fixture
def slow_compile():
    """A torch.compile backend that takes 4 s to compile, standing for inductor's minutes on a GPU:
    its name, and an Event set when a compile begins."""
    compiling = threading.Event()

    def slow_backend(graph, example_inputs):
        compiling.set()
        time.sleep(4)
        return graph.forward

    with compile_backend("imagine_test_slow_compile", slow_backend) as name:
        yield name, compiling


async def test_a_worker_stopped_while_it_compiles_stops_at_once_and_took_no_job(queue, tiny_models, caplog,
                                                                               slow_compile):
    """A stop during torch.compile's warm-up (minutes on a GPU) does not wait out the compile: no
    job was claimed, so there is nothing to hand back, and the log says what happened (not that
    the GPU thread hung)."""
    backend, compiling = slow_compile
    job = await queue.submit(spec())
    try:
        with caplog.at_level(logging.INFO, logger="engine.worker"):
            worker = Worker(queue, lambda: tiny_models, worker_id="slow", compile=backend,
                            base_settings=GenerationSettings(grid=8, cutn=2))
            await worker.start()
            assert await asyncio.to_thread(compiling.wait, 30)
            began = time.monotonic()
            await worker.stop()
            took = time.monotonic() - began
        assert took < 3, took
        messages = [r.getMessage() for r in caplog.records]
        assert any("stopped during torch.compile's warm-up" in m for m in messages), messages
        assert not any("did not stop within" in m or "GPU thread died" in m for m in messages), messages
        record = await queue.get(job.id)
        assert (record.state, record.attempts) == (JobState.QUEUED, 0)
        await asyncio.sleep(4.5)   # the compile ends in the abandoned thread, which then claims nothing
        assert not any("warmed up in" in r.getMessage() or "GPU thread died" in r.getMessage() for r in caplog.records)
        assert (await queue.get(job.id)).state == JobState.QUEUED
    finally:
        if worker._thread is not None:
            await asyncio.to_thread(worker._thread.join, 60)


async def test_a_compiling_worker_is_in_the_registry_before_its_first_claim(queue, tiny_models, slow_compile):
    """While it compiles (minutes on a GPU) a worker claims nothing, yet it is live in the registry
    (the bot's /healthz `workers` check, imagine_workers_alive and its init_image check read it):
    it announces itself, saying whether it has the dVAE encoder (this one has none)."""
    from dataclasses import replace   # noqa: PLC0415

    backend, compiling = slow_compile
    job = await queue.submit(spec())
    worker = Worker(queue, lambda: replace(tiny_models, encoder=None), worker_id="compiling",
                    compile=backend, base_settings=GenerationSettings(grid=8, cutn=2))
    try:
        await worker.start()
        assert await asyncio.to_thread(compiling.wait, 30)
        for _ in range(20):   # within 2 s (the first announcement comes as the claim loop starts)
            if seen := await queue.workers(max_age=10):
                break
            await asyncio.sleep(0.1)
        assert not worker.warmed_up.is_set()   # still compiling: nothing claimed yet
        assert list(seen) == ["compiling"], seen
        assert (seen["compiling"]["init_images"], seen["compiling"]["job_id"]) == (False, None)
        assert abs(seen["compiling"]["last_seen"] - time.time()) < 5
        assert (await queue.get(job.id)).state == JobState.QUEUED
    finally:
        await worker.stop()
        if worker._thread is not None:   # a stop during the warm-up leaves the compile to end on its own
            await asyncio.to_thread(worker._thread.join, 60)


def test_a_bad_compile_setting_is_refused_before_anything_runs(queue, tiny_models, capsys):
    with pytest.raises(ValueError, match="the mode must be one of"):
        Worker(queue, lambda: tiny_models, compile="inductor:turbo")
    from engine.worker import main   # noqa: PLC0415
    with pytest.raises(SystemExit) as exit_:
        main(["--queue", "sqlite:///never.db", "--compile", "eager:reduce-overhead"])
    assert exit_.value.code == 2 and "a mode is inductor's" in capsys.readouterr().err


async def test_cancel_a_running_job_frees_the_slot_and_marks_it_cancelled(queue, tiny_models):
    async with Worker(queue, lambda: tiny_models, worker_id="w1", heartbeat_every=0.1):
        job = await queue.submit(spec(iterations=10_000, frame_every=1000))
        await wait_state(queue, job.id, {JobState.RUNNING})
        assert await queue.cancel(job.id)
        record = await wait_state(queue, job.id, {JobState.CANCELLED}, timeout=10)
        assert record.iteration < 10_000
        nxt = await queue.submit(spec("next", user=2, iterations=2))
        await wait_state(queue, nxt.id, {JobState.DONE})


async def test_a_bad_prompt_fails_with_the_reason_and_is_not_retried(queue, tiny_models):
    observer = Ends()
    async with Worker(queue, lambda: tiny_models, worker_id="w1", observer=observer):
        job = await queue.submit(spec("blurry:-1"))
        record = await wait_state(queue, job.id, {JobState.FAILED})
    assert "positive weight" in record.error and record.attempts == 1
    assert observer.ended == [(job.id, "failed")]


async def init_image_spec(queue, user: int = 1) -> JobSpec:
    """A job starting from an uploaded picture (as the bot uploads /imagine's init_image)."""
    rng = np.random.default_rng(user)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    upload = upload_id_of(buf.getvalue())
    assert await queue.put_artifact(upload, "init.png", buf.getvalue()) is True
    return spec(user=user, extra={"init_image": {"artifact": [upload, "init.png"]}})


NO_ENCODER = ("this worker has no dVAE encoder, so it cannot start from an init image (configure [worker] encoder, "
              "or imagine-worker --encoder)")


async def test_init_image_jobs_a_worker_without_an_encoder_claims_go_to_one_with_it(tmp_path, tiny_models):
    """Two workers on one queue: "with" has the dVAE encoder, "without" none (imagine-worker
    --encoder ''). An init-image job "without" claimed used to fail for good there (a ValueError,
    never retried) while "with" sat idle, then went back for another worker (an attempt spent
    each time); now "without" never claims one: "with" runs every one of them, at its first
    attempt."""
    from dataclasses import replace

    url = f"sqlite:///{tmp_path}/jobs.db"
    q_with, q_without = open_queue(url), open_queue(url)   # as two processes
    await q_with.start()
    await q_without.start()
    try:
        await q_with.set_setting("paused", True)   # both claim (and are seen alive) before the first job
        async with Worker(q_with, lambda: tiny_models, worker_id="with", max_batch=1, heartbeat_every=0.2), \
                Worker(q_without, lambda: replace(tiny_models, encoder=None), worker_id="without", max_batch=1,
                       heartbeat_every=0.2) as without:
            jobs = [await q_with.submit(await init_image_spec(q_with, user=1 + i % 3)) for i in range(6)]
            await asyncio.sleep(0.5)
            await q_with.set_setting("paused", False)
            records = [await wait_state(q_with, job.id, {JobState.DONE, JobState.FAILED}) for job in jobs]
            assert without.models.encoder is None
        assert [(r.state, r.worker_id, r.attempts) for r in records] == [(JobState.DONE, "with", 1)] * 6, \
            [(r.state, r.worker_id, r.attempts, r.error) for r in records]
        for record in records:
            kinds = [e.kind for e in await job_events(q_with, record.id)]
            assert kinds.count(EventKind.STARTED) == 1 and kinds.count(EventKind.QUEUED) == 1, kinds
    finally:
        await q_with.close()
        await q_without.close()


async def test_an_init_image_job_waits_for_the_busy_worker_with_an_encoder(tmp_path, tiny_models):
    """The worker with the encoder is busy with a long job; the one without stays idle for longer
    than max_attempts leases. The init-image job used to go to the idle one again after each
    lease (a failed job is held for another worker for one lease only) and end FAILED there after
    its attempts; now it waits in the line, QUEUED with no attempt spent, until the worker with
    the encoder is free, which runs it."""
    from dataclasses import replace

    url = f"sqlite:///{tmp_path}/jobs.db?lease=1"
    q_with, q_without = open_queue(url), open_queue(url)   # as two processes
    await q_with.start()
    await q_without.start()
    try:
        busy = await q_with.submit(spec("a long one", user=9, iterations=100_000, frame_every=1000))
        async with Worker(q_with, lambda: tiny_models, worker_id="with", max_batch=1, heartbeat_every=0.2):
            await wait_state(q_with, busy.id, {JobState.RUNNING})
            async with Worker(q_without, lambda: replace(tiny_models, encoder=None), worker_id="without",
                              max_batch=1, heartbeat_every=0.2, poll_every=0.05):
                job = await q_with.submit(await init_image_spec(q_with))
                await asyncio.sleep((q_with.max_attempts + 1) * q_with.lease)
                waiting = await q_with.get(job.id)
                assert (waiting.state, waiting.attempts) == (JobState.QUEUED, 0), waiting
                assert await q_with.position(job.id) == 1
                assert (await q_with.get(busy.id)).state == JobState.RUNNING
                assert await q_with.cancel(busy.id) is True   # "with" is free now
                record = await wait_state(q_with, job.id, {JobState.DONE, JobState.FAILED})
        assert (record.state, record.worker_id, record.attempts) == (JobState.DONE, "with", 1), record
    finally:
        await q_with.close()
        await q_without.close()


async def test_an_init_image_job_no_worker_can_start_fails_after_its_attempts_with_the_reason(queue, tiny_models):
    """Alone, the worker without an encoder leaves an init-image job in the line (it waits for a
    worker with one) and runs the job behind it. One the claim cannot tell needs the encoder (it
    has a checkpoint, which turns out damaged: the run starts over, from the init image) it does
    claim: alone, it takes it back (nobody else would) until its attempts are spent, and it ends
    FAILED with the reason itself, not another's."""
    from dataclasses import replace

    from engine.worker import pack_checkpoint

    observer = Ends()
    async with Worker(queue, lambda: replace(tiny_models, encoder=None), worker_id="w1", observer=observer):
        waiting = await queue.submit(await init_image_spec(queue))
        plain = await queue.submit(spec("from noise", user=2))
        await wait_state(queue, plain.id, {JobState.DONE})
        damaged = await queue.submit(await init_image_spec(queue, user=3))
        assert await queue.save_checkpoint(Checkpoint(damaged.id, 0, pack_checkpoint({"iteration": 0}, []))) is True
        record = await wait_state(queue, damaged.id, {JobState.FAILED}, timeout=20)
        still = await queue.get(waiting.id)
    assert (still.state, still.attempts) == (JobState.QUEUED, 0) and await queue.position(waiting.id) == 1
    assert record.attempts == queue.max_attempts == 3 and record.error == NO_ENCODER
    assert observer.ended == [(plain.id, "done"), (damaged.id, "retried"), (damaged.id, "retried"),
                              (damaged.id, "failed")]


async def test_a_failure_the_fence_refuses_is_not_counted_as_a_job_ending(queue, tiny_models, monkeypatch):
    """The run fails after it lost the job (taken over by w2): queue.fail is refused and changes
    nothing, so the worker must not count a job ending (the job is still running, on w2)."""
    real_fail, real_claim = queue.fail, queue.claim
    failing, taken_over = [], []

    async def claim(worker_id, grids=None, **options):
        if worker_id == "w1" and failing:
            return None   # w1 does not take the job back: only w2 runs it now
        return await real_claim(worker_id, grids, **options)

    async def fail_after_a_take_over(job_id, lease_id, reason, retry=True):
        failing.append(job_id)
        assert await queue.release(job_id, lease_id) is True   # as if its lease had expired ...
        taken_over.append(await real_claim("w2"))              # ... and w2 claimed the job
        return await real_fail(job_id, lease_id, reason, retry=retry)

    monkeypatch.setattr(queue, "claim", claim)
    monkeypatch.setattr(queue, "fail", fail_after_a_take_over)
    observer = Ends()
    async with Worker(queue, lambda: tiny_models, worker_id="w1", observer=observer) as worker:
        job = await queue.submit(spec("blurry:-1"))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while not taken_over or runs_of(worker, job.id):
            assert loop.time() < deadline, "the run never failed"
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
    assert taken_over[0] is not None and taken_over[0].id == job.id
    record = await queue.get(job.id)
    assert (record.state, record.worker_id, record.lease_id) == (JobState.RUNNING, "w2", taken_over[0].lease_id)
    assert record.error is None
    assert observer.ended == []


async def test_a_stopped_worker_hands_its_job_back_and_another_resumes_from_the_checkpoint(queue, tiny_models):
    worker = Worker(queue, lambda: tiny_models, worker_id="w1", heartbeat_every=0.1, checkpoint_every=0)
    await worker.start()
    job = await queue.submit(spec(iterations=400, frame_every=4))
    while (cp := await queue.load_checkpoint(job.id)) is None or cp.iteration < 8:
        await asyncio.sleep(0.05)
    await worker.stop()
    record = await queue.get(job.id)
    assert record.state == JobState.QUEUED
    resumed_at = (await queue.load_checkpoint(job.id)).iteration
    async with Worker(queue, lambda: tiny_models, worker_id="w2") :
        record = await wait_state(queue, job.id, {JobState.DONE}, timeout=120)
    assert record.worker_id in ("w2", None)
    assert await queue.load_checkpoint(job.id) is None  # deleted once the job is DONE (state.pt stays)
    assert await queue.has_artifact(job.id, "state.pt")
    starts = [e for e in await job_events(queue, job.id) if e.kind == EventKind.STARTED]
    assert len(starts) == 2
    progress = [e.iteration for e in await job_events(queue, job.id) if e.kind == EventKind.PROGRESS]
    # The second worker did not start again from 0: after its STARTED no frame 0 comes.
    assert progress.count(0) == 1 and progress[-1] == 400
    assert resumed_at >= 8


async def test_a_checkpoint_is_the_state_of_its_frame_though_the_worker_steps_on(queue, tiny_models, monkeypatch):
    """The GPU thread takes a job's state at a frame and steps on while the asyncio side encodes
    the PNG, publishes, then serialises the checkpoint. A checkpoint of iteration N must hold
    iteration N's logits, Adam moments and RNG (live optimiser tensors gave a later step's moments).
    Here a checkpoint is taken at every frame (checkpoint_every=0); the serialisation of the one at
    iteration 4 waits until the GPU thread is 3 steps further on (as a large state does on a fast
    GPU), the run loses its lease right after it is saved, resumes from it and ends exactly as an
    uninterrupted run with the same seed."""
    from engine import worker as worker_module

    steps = Steps()
    target: list[str] = []
    ahead: list[int] = []   # how far the GPU thread was when the iteration-4 checkpoint was serialised
    real_pack, real_save = worker_module.pack_checkpoint, queue.save_checkpoint

    def pack_once_the_gpu_moved_on(state, frames_png):   # on a thread (asyncio.to_thread)
        if target and state["iteration"] == 4 and not ahead:
            deadline = time.monotonic() + 60
            while steps.count < 4 + 3 and time.monotonic() < deadline:
                time.sleep(0.005)
            ahead.append(steps.count - 4)
        return real_pack(state, frames_png)   # the real serialisation

    async def save_then_lose_the_lease(checkpoint, lease_id=None):
        ok = await real_save(checkpoint, lease_id)
        if ok and checkpoint.job_id in target and checkpoint.iteration == 4:
            # As a lease that expired and was swept: this run's next write is refused and it stops.
            assert await queue.release(checkpoint.job_id, lease_id) is True
        return ok

    monkeypatch.setattr(worker_module, "pack_checkpoint", pack_once_the_gpu_moved_on)
    monkeypatch.setattr(queue, "save_checkpoint", save_then_lose_the_lease)
    job_spec = dict(iterations=20, frame_every=2, seed=5)
    async with Worker(queue, lambda: tiny_models, worker_id="w1", max_batch=1, heartbeat_every=0.2,
                      checkpoint_every=0, observer=steps):
        reference = await queue.submit(spec(**job_spec))
        await wait_state(queue, reference.id, {JobState.DONE})
        steps.count = 0   # the GPU thread is idle: from here on, the target's iteration in its first run
        job = await queue.submit(spec(**job_spec))
        target.append(job.id)
        record = await wait_state(queue, job.id, {JobState.DONE}, timeout=120)
    assert ahead and ahead[0] >= 3, ahead
    events = await job_events(queue, job.id)
    starts = [i for i, e in enumerate(events) if e.kind == EventKind.STARTED]
    assert len(starts) == 2 and record.iteration == 20
    second = starts[1]
    after = [e.iteration for e in events[second:] if e.kind == EventKind.PROGRESS]
    assert after == list(range(6, 21, 2))   # resumed from the checkpoint at 4
    picture, logits = await final_of(queue, job.id)
    ref_picture, ref_logits = await final_of(queue, reference.id)
    assert picture == ref_picture
    assert torch.allclose(logits.float(), ref_logits.float(), rtol=2 ** -10, atol=0)  # fp16 rounding of equal fp32


async def test_a_checkpoint_holds_its_iteration_and_the_frames_up_to_it(queue, tiny_models, monkeypatch):
    """Every checkpoint of a run whose GPU thread runs ahead of the asyncio side (a frame at every
    step): Adam's step count is the checkpoint's iteration, and it carries frames 0..N, in order."""
    from engine.worker import unpack_checkpoint

    saved = []
    real_save = queue.save_checkpoint

    async def noting_save(checkpoint, lease_id=None):
        saved.append(checkpoint)
        return await real_save(checkpoint, lease_id)

    monkeypatch.setattr(queue, "save_checkpoint", noting_save)
    async with Worker(queue, lambda: tiny_models, worker_id="w1", checkpoint_every=0):
        job = await queue.submit(spec(grid=4, cutn=1, iterations=12, frame_every=1))
        await wait_state(queue, job.id, {JobState.DONE})
    progress = {e.iteration: e.frame_png for e in await job_events(queue, job.id) if e.kind == EventKind.PROGRESS}
    # One at each frame while the store keeps up; a run holds at most one more snapshot behind a
    # save in flight, so with the GPU thread ahead some frames take none (see
    # test_a_slow_checkpoint_save_holds_back_the_runs_next_snapshot).
    iterations = [c.iteration for c in saved]
    assert iterations[:2] == [1, 2] and iterations == sorted(set(iterations)) and iterations[-1] <= 11, iterations
    for checkpoint in saved:
        state, frames = unpack_checkpoint(checkpoint.data)
        n = checkpoint.iteration
        assert state["iteration"] == n and int(state["optimizer"]["state"][0]["step"]) == n
        assert frames == [progress[i] for i in range(n + 1)]


async def test_a_stopping_worker_checkpoints_where_it_stopped_and_the_job_resumes_there(queue, tiny_models, monkeypatch):
    """checkpoint_every far off (longer than the whole job): no checkpoint is taken while it runs.
    Stopping the worker snapshots the job on the GPU thread after its current step, saves it
    (fenced by the run's lease) and hands the job back; the next worker resumes at that iteration,
    not 0, and ends as an uninterrupted run."""
    from engine.worker import unpack_checkpoint

    saved: list[int] = []
    real_save = queue.save_checkpoint

    async def noting_save(checkpoint, lease_id=None):
        saved.append(checkpoint.iteration)
        return await real_save(checkpoint, lease_id)

    monkeypatch.setattr(queue, "save_checkpoint", noting_save)
    job_spec = dict(iterations=80, frame_every=4, seed=6)
    steps = Steps()
    w1 = Worker(queue, lambda: tiny_models, worker_id="w1", heartbeat_every=0.2, checkpoint_every=3600,
                observer=steps)
    await w1.start()
    try:
        job = await queue.submit(spec(**job_spec))
        while steps.count < 9:   # past frames 4 and 8
            await asyncio.sleep(0.01)
        assert saved == [] and await queue.load_checkpoint(job.id) is None
    finally:
        await w1.stop()
    stopped_at = steps.count   # the GPU thread has been joined: the job's iteration
    assert 9 <= stopped_at < 80
    record = await queue.get(job.id)
    assert record.state == JobState.QUEUED
    checkpoint = await queue.load_checkpoint(job.id)
    assert saved == [stopped_at] and checkpoint.iteration == stopped_at
    state, frames = unpack_checkpoint(checkpoint.data)
    assert state["iteration"] == stopped_at and len(frames) == stopped_at // 4 + 1

    async with Worker(queue, lambda: tiny_models, worker_id="w2", heartbeat_every=0.2, checkpoint_every=3600):
        record = await wait_state(queue, job.id, {JobState.DONE}, timeout=120)
        reference = await queue.submit(spec(**job_spec))   # the same job, never stopped
        await wait_state(queue, reference.id, {JobState.DONE}, timeout=120)
    assert saved == [stopped_at]   # w2 took none: the resumed run's next was not due, nor the reference's first
    events = await job_events(queue, job.id)
    second = [i for i, e in enumerate(events) if e.kind == EventKind.STARTED][1]
    after = [e.iteration for e in events[second:] if e.kind == EventKind.PROGRESS]
    assert after == list(range((stopped_at // 4 + 1) * 4, 81, 4))   # from where it stopped, not 0
    progress = [e.iteration for e in events if e.kind == EventKind.PROGRESS]
    assert progress == list(range(0, 81, 4))
    picture, logits = await final_of(queue, job.id)
    ref_picture, ref_logits = await final_of(queue, reference.id)
    assert picture == ref_picture
    assert torch.allclose(logits.float(), ref_logits.float(), rtol=2 ** -10, atol=0)


async def test_mid_run_checkpoints_are_timed(queue, tiny_models, monkeypatch):
    """checkpoint_every: after a new run's first frame (a checkpoint there if the rest of the run
    takes longer), a frame takes one only once that many seconds have passed since the run's last
    one; the finished job keeps none."""
    saved: list[tuple[float, int]] = []
    real_save = queue.save_checkpoint

    async def noting_save(checkpoint, lease_id=None):
        saved.append((asyncio.get_running_loop().time(), checkpoint.iteration))
        return await real_save(checkpoint, lease_id)

    monkeypatch.setattr(queue, "save_checkpoint", noting_save)
    async with Worker(queue, lambda: tiny_models, worker_id="w1", checkpoint_every=0.5):
        job = await queue.submit(spec(grid=4, iterations=150, frame_every=1))
        started = asyncio.get_running_loop().time()
        await wait_state(queue, job.id, {JobState.DONE}, timeout=120)
        took = asyncio.get_running_loop().time() - started
    iterations = [i for _, i in saved]
    assert iterations == sorted(set(iterations)) and 0 not in iterations and 150 not in iterations
    assert 1 <= len(saved) <= took / 0.5 + 2, (saved, took)   # 150 frames; one every 0.5 s at most, + the first
    assert await queue.load_checkpoint(job.id) is None


async def test_a_long_new_run_checkpoints_at_its_first_frame_a_short_one_never(queue, tiny_models, monkeypatch):
    """A new run whose rest takes longer than checkpoint_every (at its pace so far) checkpoints at
    its first frame, so a crash soon after costs little; a job shorter than that writes none (a
    full-size checkpoint is 96-384 MiB) and loses no more than the timed rule would allow."""
    saved: list[tuple[str, int]] = []
    real_save = queue.save_checkpoint

    async def noting_save(checkpoint, lease_id=None):
        saved.append((checkpoint.job_id, checkpoint.iteration))
        return await real_save(checkpoint, lease_id)

    monkeypatch.setattr(queue, "save_checkpoint", noting_save)
    async with Worker(queue, lambda: tiny_models, worker_id="w1", max_batch=1, checkpoint_every=5.0):
        short = await queue.submit(spec(iterations=8, frame_every=4))          # well under 5 s
        await wait_state(queue, short.id, {JobState.DONE}, timeout=120)
        long = await queue.submit(spec(iterations=100_000, frame_every=4))     # hours at this pace
        deadline = time.monotonic() + 60
        while not saved:
            assert time.monotonic() < deadline, "no checkpoint at the long run's first frame"
            await asyncio.sleep(0.02)
        assert await queue.cancel(long.id)
        await wait_state(queue, long.id, {JobState.CANCELLED}, timeout=60)
    assert saved[0] == (long.id, 4) and all(job_id == long.id for job_id, _ in saved)


async def continue_of_a_damaged_parent_beside_a_companion(queue, tiny_models, damage) -> JobRecord:
    """A finished parent whose state.pt `damage(state)` changes; a long companion job running; a
    Continue of the parent queued into the same batch (max_batch 2). Waits for the Continue to
    fail, checks the companion stepped on with its one attempt, and returns the failed Continue."""
    from engine.generate import state_to_bytes

    async with Worker(queue, lambda: tiny_models, worker_id="w1", max_batch=2, heartbeat_every=0.2):
        parent = await queue.submit(spec(iterations=2))
        await wait_state(queue, parent.id, {JobState.DONE})
        state = state_from_bytes(await queue.get_artifact(parent.id, "state.pt"))
        damage(state)
        await queue.put_artifact(parent.id, "state.pt", state_to_bytes(state))
        companion = await queue.submit(spec("a blue boat", user=2, iterations=100_000, frame_every=5))
        while not [e for e in await job_events(queue, companion.id) if e.kind == EventKind.PROGRESS]:
            await asyncio.sleep(0.05)
        cont = await queue.submit(spec(user=3, parent_job_id=parent.id, parent_kind="continue", iterations=4))
        failed = await wait_state(queue, cont.id, {JobState.FAILED})
        before = (await queue.get(companion.id)).iteration
        while (record := await queue.get(companion.id)).iteration <= before:   # it steps on
            assert record.state == JobState.RUNNING
            await asyncio.sleep(0.05)
        assert record.attempts == 1 and record.state == JobState.RUNNING
        assert await queue.cancel(companion.id)
        await wait_state(queue, companion.id, {JobState.CANCELLED})
    return failed


async def test_a_continue_whose_parent_state_does_not_fit_fails_alone_not_its_batch(queue, tiny_models):
    """A parent's state.pt whose Adam moments do not fit its logits (a file from another version,
    or damaged): the optimiser would only raise at the Continue's first step, which is a batched
    step, and fail its companions too (each losing an attempt). It is refused when the slot is
    built instead: the Continue fails alone, at once (bad input), the companion keeps running."""
    def shrink_moments(state):
        moments = state["optimizer"]["state"][0]
        moments["exp_avg"] = moments["exp_avg"][..., :4, :4].clone()   # [1, 8192, 4, 4] for grid 8

    failed = await continue_of_a_damaged_parent_beside_a_companion(queue, tiny_models, shrink_moments)
    assert failed.attempts == 1 and "does not fit" in failed.error, failed.error


async def test_a_continue_whose_parent_step_count_is_damaged_fails_alone_at_once(queue, tiny_models):
    """A parent's state.pt whose Adam step counter is no count (a bool): fused Adam would take it
    as 1.0 and run on with the wrong bias correction. load_state refuses it: the Continue fails
    alone, at once (bad input), the companion keeps running."""
    def break_step(state):
        state["optimizer"]["state"][0]["step"] = torch.tensor(True)  # a 0-d tensor, of the wrong kind

    failed = await continue_of_a_damaged_parent_beside_a_companion(queue, tiny_models, break_step)
    assert failed.attempts == 1 and "step count" in failed.error, (failed.attempts, failed.error)


async def test_a_job_whose_step_fails_fails_alone_and_its_batch_steps_on(queue, tiny_models, monkeypatch):
    """An optimiser step that raises inside a batched step, for a state that load_state took (none
    it knows of gets that far now: a fault made here stands in): the Continue fails alone (each
    attempt), its companion keeps its attempt and runs on."""
    from engine.generate import Slot

    real = Slot.adam_step

    def adam_step(slot):
        if slot.settings.iterations < 100_000 and slot.iteration >= 2:   # the Continue (its parent ran 2)
            raise RuntimeError("the optimiser step failed")
        real(slot)

    monkeypatch.setattr(Slot, "adam_step", adam_step)
    failed = await continue_of_a_damaged_parent_beside_a_companion(queue, tiny_models, lambda state: None)
    assert failed.attempts > 1 and failed.error.startswith("RuntimeError"), (failed.attempts, failed.error)


async def test_continue_and_remix_start_from_the_parent(queue, tiny_models):
    async with Worker(queue, lambda: tiny_models, worker_id="w1"):
        parent = await queue.submit(spec())
        await wait_state(queue, parent.id, {JobState.DONE})
        remix = await queue.submit(spec("a blue boat", user=2, parent_job_id=parent.id, parent_kind="remix", seed=9))
        cont = await queue.submit(spec(parent_job_id=parent.id, parent_kind="continue", iterations=4))
        await wait_state(queue, remix.id, {JobState.DONE})
        await wait_state(queue, cont.id, {JobState.DONE})
        with pytest.raises(ParentGone):   # no such state: refused at submit, nothing queued
            await queue.submit(spec(parent_job_id="nosuchjob", parent_kind="remix"))
    parent_final = await queue.get_artifact(parent.id, "final.png")
    for child in (remix, cont):
        first = next(e for e in await job_events(queue, child.id) if e.kind == EventKind.PROGRESS)
        assert first.iteration == 0 and first.frame_png == parent_final  # pixel-exact


async def test_a_continue_of_a_non_finite_state_fails_once_and_is_not_retried(queue, tiny_models):
    """A parent whose state.pt holds NaN logits (a run that diverged before the frame check): its
    Continue fails at its first frame with the non-finite reason, on its first attempt (on the CPU,
    all fp32, run again it would diverge the same way), and the worker goes on with the next job."""
    from engine.generate import state_from_bytes, state_to_bytes

    async with Worker(queue, lambda: tiny_models, worker_id="w1"):
        parent = await queue.submit(spec())
        await wait_state(queue, parent.id, {JobState.DONE})
        state = state_from_bytes(await queue.get_artifact(parent.id, "state.pt"))
        state["logits"] = torch.full_like(state["logits"], float("nan"))
        await queue.put_artifact(parent.id, "state.pt", state_to_bytes(state))
        cont = await queue.submit(spec(user=2, parent_job_id=parent.id, parent_kind="continue", iterations=4))
        failed = await wait_state(queue, cont.id, {JobState.FAILED, JobState.DONE})
        assert failed.state == JobState.FAILED and failed.attempts == 1, failed
        assert "non-finite" in failed.error, failed.error
        after = await queue.submit(spec(user=3))
        await wait_state(queue, after.id, {JobState.DONE})


def _put_a_broken_ffmpeg_first_on_path(tmp_path, monkeypatch) -> None:
    """An ffmpeg build that fails as one without libx264 does: a real process, exit status 1."""
    broken = tmp_path / "bin"
    broken.mkdir()
    (broken / "ffmpeg").write_text("#!/bin/sh\necho \"Unknown encoder 'libx264'\" >&2\nexit 1\n")
    (broken / "ffmpeg").chmod(0o755)
    monkeypatch.setenv("PATH", f"{broken}:{os.environ['PATH']}")


def _last_frame_encodes_fail(monkeypatch, times):
    """Frame.png fails the first `times` encodes of a run's last frame (a MemoryError, say); the
    pixels it was asked to encode are recorded. A last frame it does encode comes out inverted: a
    mark of where final.png came from (a tiny model's last frames may be the same picture)."""
    from engine.generate import Frame, png_bytes

    asked: list[np.ndarray] = []

    def png(frame):
        if frame.iteration >= frame.total:
            asked.append(frame.pixels)
            if len(asked) <= times:
                raise MemoryError("no memory for the PNG")
            return png_bytes(255 - frame.pixels)
        return png_bytes(frame.pixels)

    monkeypatch.setattr(Frame, "png", png)
    return asked


async def test_a_last_frame_whose_encode_failed_is_encoded_again_for_final_png(queue, tiny_models, monkeypatch):
    """final.png is the result: the last frame, never the newest frame that happened to encode
    (before, a failed encode of the last frame posted the one before it as the result)."""
    asked = _last_frame_encodes_fail(monkeypatch, times=1)
    async with Worker(queue, lambda: tiny_models, worker_id="w1"):
        job = await queue.submit(spec())
        done = await wait_state(queue, job.id, {JobState.DONE, JobState.FAILED})
    assert done.state == JobState.DONE and done.attempts == 1, done
    assert len(asked) == 2 and np.array_equal(asked[0], asked[1])
    from engine.generate import png_bytes
    progress = [e for e in await job_events(queue, job.id) if e.kind == EventKind.PROGRESS]
    assert [e.iteration for e in progress] == [0, 2, 4]   # the failed frame was not published
    final = await queue.get_artifact(job.id, "final.png")
    assert final == png_bytes(255 - asked[-1])


async def test_a_last_frame_that_cannot_be_encoded_fails_the_run_with_the_reason(queue, tiny_models, monkeypatch):
    _last_frame_encodes_fail(monkeypatch, times=10**6)
    async with Worker(queue, lambda: tiny_models, worker_id="w1"):
        job = await queue.submit(spec())
        done = await wait_state(queue, job.id, {JobState.DONE, JobState.FAILED})
    assert done.state == JobState.FAILED and done.attempts == queue.max_attempts, done
    assert "its final image could not be encoded (MemoryError: no memory for the PNG)" in done.error
    assert await queue.get_artifact(job.id, "final.png") is None


async def test_a_job_whose_video_cannot_be_made_is_done_with_its_picture(queue, tiny_models, tmp_path, monkeypatch, caplog):
    """ffmpeg on PATH is a build that fails (here: one without libx264, a real failing process):
    the job still ends DONE with its final picture and state, without video.mp4 (the bot posts the
    picture alone and says so); before, the finished picture was failed and the job run again."""
    _put_a_broken_ffmpeg_first_on_path(tmp_path, monkeypatch)
    async with Worker(queue, lambda: tiny_models, worker_id="w1"):
        job = await queue.submit(spec(iterations=4))
        done = await wait_state(queue, job.id, {JobState.DONE, JobState.FAILED})
    assert done.state == JobState.DONE and done.attempts == 1, done
    assert await queue.get_artifact(job.id, "final.png") is not None
    assert await queue.get_artifact(job.id, "state.pt") is not None
    assert await queue.get_artifact(job.id, "video.mp4") is None
    assert "its video could not be made" in caplog.text and "libx264" in caplog.text


async def test_a_rerun_that_makes_no_video_leaves_no_earlier_attempts_video(queue, tiny_models, tmp_path, monkeypatch):
    """An earlier attempt stored its final.png and video.mp4, then lost the job before `finish`
    (its worker died). The next attempt's video cannot be made (a broken ffmpeg): it deletes that
    earlier video, which the bot would otherwise post beside this attempt's picture as its own."""
    from engine import video

    job = await queue.submit(spec(iterations=4))
    earlier = await queue.claim("w-dead")
    old_video = await asyncio.to_thread(video.encode_frames_bytes, [np.zeros((64, 64, 3), np.uint8)] * 3)
    assert await queue.put_artifact(job.id, "final.png", b"earlier picture", earlier.lease_id) is True
    assert await queue.put_artifact(job.id, "video.mp4", old_video, earlier.lease_id) is True
    assert await queue.release(job.id, earlier.lease_id) is True   # back in line, as a lost worker's job
    _put_a_broken_ffmpeg_first_on_path(tmp_path, monkeypatch)
    async with Worker(queue, lambda: tiny_models, worker_id="w1"):
        done = await wait_state(queue, job.id, {JobState.DONE, JobState.FAILED})
    assert done.state == JobState.DONE and done.worker_id == "w1", done
    progress = [e for e in await job_events(queue, job.id) if e.kind == EventKind.PROGRESS]
    assert await queue.get_artifact(job.id, "final.png") == progress[-1].frame_png
    assert await queue.get_artifact(job.id, "video.mp4") is None
    assert not await queue.has_artifact(job.id, "video.mp4")


async def test_an_encoder_killed_by_a_signal_is_run_again_and_the_job_keeps_its_video(
        queue, tiny_models, tmp_path, monkeypatch, caplog):
    """A supervisor stopping the service signals every process in it (systemd's control group):
    an ffmpeg killed so (here: a real ffmpeg process that SIGTERMs itself the first time) is not a
    broken encoder. The encode runs again and the job ends DONE with its video."""
    import imageio_ffmpeg

    real = shutil.which("ffmpeg") or imageio_ffmpeg.get_ffmpeg_exe()
    wrapper = tmp_path / "bin"
    wrapper.mkdir()
    marker = tmp_path / "killed-once"
    (wrapper / "ffmpeg").write_text(
        f"#!/bin/sh\nif [ ! -e '{marker}' ]; then touch '{marker}'; kill -TERM $$; sleep 5; fi\n"
        f"exec '{real}' \"$@\"\n")
    (wrapper / "ffmpeg").chmod(0o755)
    monkeypatch.setenv("PATH", f"{wrapper}:{os.environ['PATH']}")
    caplog.set_level(logging.INFO, logger="engine.worker")
    async with Worker(queue, lambda: tiny_models, worker_id="w1"):
        job = await queue.submit(spec(iterations=4))
        done = await wait_state(queue, job.id, {JobState.DONE, JobState.FAILED})
    assert marker.exists()
    assert done.state == JobState.DONE and done.attempts == 1, done
    assert (await queue.get_artifact(job.id, "video.mp4") or b"")[4:8] == b"ftyp"
    assert "stopped by signal 15" in caplog.text and "encoding it again" in caplog.text
    assert "could not be made" not in caplog.text


async def test_a_reroll_of_a_continue_has_its_own_noise_a_second_continue_does_not(queue, tiny_models):
    """Both start from the parent's final state and optimiser. A Continue keeps the parent's random
    generator too (the same Continue twice is the same picture); a Reroll of it (the bot marks it
    `rerolls`, with a new seed) draws its own noise, or it would copy the continue it rerolls."""
    async with Worker(queue, lambda: tiny_models, worker_id="w1"):
        parent = await queue.submit(spec())
        await wait_state(queue, parent.id, {JobState.DONE})
        kw = dict(parent_job_id=parent.id, parent_kind="continue", iterations=4)
        cont = await queue.submit(spec(**kw))
        again = await queue.submit(spec(user=2, **kw))
        await wait_state(queue, cont.id, {JobState.DONE})
        reroll = await queue.submit(spec(user=3, seed=12345, extra={"rerolls": cont.id}, **kw))
        for job in (again, reroll):
            await wait_state(queue, job.id, {JobState.DONE})
    logits = {job.id: (await final_of(queue, job.id))[1] for job in (cont, again, reroll)}
    assert torch.equal(logits[cont.id], logits[again.id])
    assert not torch.equal(logits[cont.id], logits[reroll.id])


async def test_a_continue_goes_on_with_its_parents_lr_ramp_a_remix_starts_it_afresh(queue, tiny_models):
    """A Continue's learning rate goes on from its parent's last step (the state's `lr_offset`: the
    steps before its own), as Adam's step count does, through a Continue of a Continue and a
    Reroll of one; a Remix (a fresh optimiser on the parent's logits) ramps from `lr` again."""
    async with Worker(queue, lambda: tiny_models, worker_id="w1"):
        parent = await queue.submit(spec())                                   # 6 iterations
        await wait_state(queue, parent.id, {JobState.DONE})
        kw = dict(parent_job_id=parent.id, parent_kind="continue", iterations=4)
        cont = await queue.submit(spec(**kw))
        remix = await queue.submit(spec(user=2, parent_job_id=parent.id, parent_kind="remix", iterations=4))
        await wait_state(queue, cont.id, {JobState.DONE})
        reroll = await queue.submit(spec(user=3, seed=12345, extra={"rerolls": cont.id}, **kw))
        again = await queue.submit(spec(user=4, parent_job_id=cont.id, parent_kind="continue", iterations=2))
        for job in (remix, reroll, again):
            await wait_state(queue, job.id, {JobState.DONE})

    async def kept(job):
        state = state_from_bytes(await queue.get_artifact(job.id, "state.pt"))
        return state["lr_offset"], state["iteration"], int(state["optimizer"]["state"][0]["step"])

    assert await kept(parent) == (0, 6, 6)
    assert await kept(cont) == (6, 4, 10)
    assert await kept(reroll) == (6, 4, 10)
    assert await kept(again) == (10, 2, 12)
    assert await kept(remix) == (0, 4, 4)


async def test_a_worker_that_lost_its_job_stops_it_and_overwrites_nothing(queue, tiny_models, caplog):
    # Heartbeats far apart: only the fenced writes (publish, save_checkpoint) can tell the worker.
    worker = Worker(queue, lambda: tiny_models, worker_id="w1", heartbeat_every=30, checkpoint_every=0)
    async with worker:
        job = await queue.submit(spec(iterations=100_000, frame_every=2))
        while await queue.load_checkpoint(job.id) is None:
            await asyncio.sleep(0.02)
        # Taken over, as an expired lease swept and claimed by another worker would be.
        assert await queue.release(job.id, (await queue.get(job.id)).lease_id) is True
        w2 = await queue.claim("w2")
        assert w2.id == job.id
        assert await queue.save_checkpoint(Checkpoint(job.id, 999, b"w2's"), w2.lease_id) is True
        cursor = (await queue.events(0, timeout=0))[-1].seq
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while runs_of(worker, job.id):
            assert loop.time() < deadline, "the worker kept running a job it lost"
            await asyncio.sleep(0.05)
    assert (await queue.load_checkpoint(job.id)).data == b"w2's"
    later = [e for e in await queue.events(cursor, timeout=0) if e.job_id == job.id]
    assert later == []   # no PROGRESS from w1 after the take-over
    record = await queue.get(job.id)
    assert record.state == JobState.RUNNING and record.worker_id == "w2"
    lost = [r for r in caplog.records if "is no longer ours" in r.getMessage()]
    assert len(lost) == 1  # logged once


async def test_a_busy_worker_sweeps_a_dead_workers_job_back_into_the_line(tmp_path, tiny_models):
    q = open_queue(f"sqlite:///{tmp_path}/lease.db?lease=1")
    await q.start()
    try:
        dead = await q.submit(spec(user=2))
        assert (await q.claim("dead-worker")).id == dead.id   # ... which never heartbeats
        async with Worker(q, lambda: tiny_models, worker_id="busy", max_batch=1, heartbeat_every=0.1):
            busy = await q.submit(spec(iterations=100_000, frame_every=1000))
            await wait_state(q, busy.id, {JobState.RUNNING})
            # Every slot is busy, so nobody claims: the heartbeat loop's sweep requeues it.
            record = await wait_state(q, dead.id, {JobState.QUEUED}, timeout=5)
            assert record.worker_id is None and await q.position(dead.id) == 1
            assert (await q.get(busy.id)).worker_id == "busy"
    finally:
        await q.close()


@pytest.mark.parametrize("max_batch", [1, 2])   # 1: only its heartbeat loop sweeps; 2: its claims sweep too
async def test_a_worker_whose_heartbeats_fail_past_its_lease_never_requeues_its_own_running_job(
        tmp_path, tiny_models, monkeypatch, max_batch):
    """The store drops the worker's heartbeats for three leases (a link down, Redis away for longer
    than its reconnect_timeout), while the rest gets through. Its next sweep (its own claims, or its
    heartbeat loop's) used to requeue the job it was still running: a second attempt, resumed from
    an older checkpoint. Now it sweeps and claims only once its own leases are renewed: the job
    keeps its run (one claim, the same lease) and steps on."""
    q = open_queue(f"sqlite:///{tmp_path}/jobs.db?lease=1")
    await q.start()
    renew = q.heartbeat
    dropped: list[str] = []
    failing = False

    async def flaky_heartbeat(job_id, lease_id):
        if failing:
            dropped.append(job_id)
            raise ConnectionError("the store is unreachable")
        return await renew(job_id, lease_id)

    monkeypatch.setattr(q, "heartbeat", flaky_heartbeat)
    steps = Steps()
    try:
        async with Worker(q, lambda: tiny_models, worker_id="w1", max_batch=max_batch, heartbeat_every=0.1,
                          poll_every=0.05, observer=steps) as worker:
            job = await q.submit(spec(iterations=100_000, frame_every=1000))
            before = await wait_state(q, job.id, {JobState.RUNNING})
            failing = True
            await asyncio.sleep(3.0)   # three leases without a renewal
            failing = False
            assert len(dropped) > 10
            await asyncio.sleep(1.5)   # renewed, then sweeps and claims again (w1's polls: 0.05 s)
            stepped = steps.count
            record = await q.get(job.id)
            assert record.state == JobState.RUNNING and record.attempts == 1, record
            assert record.lease_id == before.lease_id and runs_of(worker, job.id) == 1
            await wait_until(lambda: steps.count > stepped, "the job to step on")
            await q.cancel(job.id)
            await wait_state(q, job.id, {JobState.CANCELLED})
        kinds = [e.kind for e in await job_events(q, job.id)]
        assert kinds.count(EventKind.STARTED) == 1 and kinds.count(EventKind.QUEUED) == 1, kinds   # never requeued
    finally:
        await q.close()


async def test_a_worker_that_claims_its_own_lost_job_again_drops_the_stale_run(tmp_path, tiny_models, monkeypatch, caplog):
    """The worker stalls past its lease on a job (its heartbeats for that run renew nothing, and
    its writes hang), the job is swept back (its heartbeat loop's sweep: a claim never sweeps its
    own worker's jobs) and this same worker claims it again while the first run still steps: two
    runs of one job on one worker. The first run's writes are refused (its lease is old), so it
    stops; the second resumes from the checkpoint and finishes. One DONE, and no frame of the
    first run after the second started."""
    q = open_queue(f"sqlite:///{tmp_path}/reclaim.db?lease=1")
    await q.start()
    renew, claim, publish, save = q.heartbeat, q.claim, q.publish, q.save_checkpoint
    stalled: dict[str, str] = {}
    reclaimed = asyncio.Event()
    reclaimed_while_running: list[bool] = []
    holder: list[Worker] = []

    async def stalling_heartbeat(job_id, lease_id):
        if stalled.setdefault(job_id, lease_id) == lease_id:
            return True   # the first run's heartbeats never reach the queue (a stall, as the queue sees it)
        return await renew(job_id, lease_id)

    async def stalled_write(job_id, lease_id):
        # The first run's writes, once its job was swept back, hang until the job is claimed again:
        # the stall lasts past the re-claim (its first refused write would otherwise stop it before).
        if stalled.get(job_id) == lease_id and (await q.get(job_id)).lease_id != lease_id:
            await reclaimed.wait()

    async def stalling_publish(event, lease_id=None):
        await stalled_write(event.job_id, lease_id)
        return await publish(event, lease_id)

    async def stalling_save(checkpoint, lease_id=None):
        await stalled_write(checkpoint.job_id, lease_id)
        return await save(checkpoint, lease_id)

    async def watching_claim(worker_id, grids=None, **options):
        record = await claim(worker_id, grids, **options)
        if record is not None and record.attempts > 1:
            reclaimed_while_running.append(runs_of(holder[0], record.id) > 0)
            reclaimed.set()
        return record

    monkeypatch.setattr(q, "heartbeat", stalling_heartbeat)
    monkeypatch.setattr(q, "claim", watching_claim)
    monkeypatch.setattr(q, "publish", stalling_publish)
    monkeypatch.setattr(q, "save_checkpoint", stalling_save)
    try:
        worker = Worker(q, lambda: tiny_models, worker_id="w1", max_batch=2, heartbeat_every=0.1,
                        checkpoint_every=0)
        holder.append(worker)
        async with worker:
            job = await q.submit(spec(iterations=200, frame_every=2))
            record = await wait_state(q, job.id, {JobState.DONE}, timeout=120)
            # DONE is visible to a reader the moment it commits; the worker forgets the run just after.
            for _ in range(100):
                if runs_of(worker, job.id) == 0:
                    break
                await asyncio.sleep(0.05)
            assert runs_of(worker, job.id) == 0
        assert reclaimed_while_running == [True]
        assert record.attempts == 2 and record.worker_id == "w1", record
        events = await job_events(q, job.id)
        starts = [i for i, e in enumerate(events) if e.kind == EventKind.STARTED]
        assert len(starts) == 2
        assert [e.kind for e in events].count(EventKind.DONE) == 1
        after = [e.iteration for e in events[starts[-1]:] if e.kind == EventKind.PROGRESS]
        assert after == sorted(after) and len(set(after)) == len(after), after  # one run's frames only
        assert after[-1] == 200 and 0 not in after  # resumed from the checkpoint
        lost = [r for r in caplog.records if "is no longer ours" in r.getMessage()]
        assert len(lost) == 1
        assert state_from_bytes(await q.get_artifact(job.id, "state.pt"))["iteration"] == 200
    finally:
        await q.close()


def test_keep_days_is_zero_for_never_or_at_least_an_hour(capsys):
    """Pruning also deletes uploads no job names yet once they are keep_days old: a window of seconds
    could delete a picture between the bot storing it and submitting its job. So keep_days is 0
    (never) or at least an hour, for imagine-worker --keep-days and for Worker(keep_days=) alike."""
    from engine.worker import build_parser

    parse = build_parser().parse_args
    for given, taken in (("0", None), ("0.0416667", 0.0416667), ("7", 7.0)):
        assert parse(["--queue", "x.db", "--keep-days", given]).keep_days == taken
    assert parse(["--queue", "x.db"]).keep_days == 30.0   # finished jobs kept 30 days by default
    for bad, message in (("0.0001", "at least 0.04167 days (an hour), got 0.0001"),
                         ("-1", "must be 0 (never prune) or a number of days"),
                         ("soon", "expected a number of days, got 'soon'")):
        with pytest.raises(SystemExit) as exit_:
            parse(["--queue", "x.db", "--keep-days", bad])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert "--keep-days" in err and message in err, err
    assert Worker(object(), lambda: None, keep_days=0).keep_days is None
    assert Worker(object(), lambda: None, keep_days=None).keep_days is None
    assert Worker(object(), lambda: None, keep_days=2).keep_days == 2
    with pytest.raises(ValueError, match=r"keep_days: must be 0 \(never prune\) or at least 0.04167 days"):
        Worker(object(), lambda: None, keep_days=0.0001)


def test_keep_state_days_is_zero_for_as_long_as_the_job_or_at_least_an_hour(capsys):
    """`imagine-worker --keep-state-days` (7 by default), `Worker(keep_state_days=)` (None by
    default: as long as the job), `[worker] keep_state_days`: 0 is as long as the job, otherwise at
    least an hour; more than keep_days is the same as keep_days (the Worker keeps None then)."""
    from engine.worker import build_parser

    parse = build_parser().parse_args
    assert parse(["--queue", "x.db"]).keep_state_days == 7.0
    for given, taken in (("0", None), ("0.0416667", 0.0416667), ("2", 2.0), ("60", 60.0)):
        assert parse(["--queue", "x.db", "--keep-state-days", given]).keep_state_days == taken
    for bad, message in (("0.0001", "must be 0 (as long as the job: keep_days) or at least 0.04167 days"),
                         ("-1", "must be 0 (as long as the job: keep_days) or at least"),
                         ("soon", "expected a number of days, got 'soon'")):
        with pytest.raises(SystemExit) as exit_:
            parse(["--queue", "x.db", "--keep-state-days", bad])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert "--keep-state-days" in err and message in err, err
    assert Worker(object(), lambda: None).keep_state_days is None
    assert Worker(object(), lambda: None, keep_days=30, keep_state_days=0).keep_state_days is None
    assert Worker(object(), lambda: None, keep_days=30, keep_state_days=7).keep_state_days == 7.0
    assert Worker(object(), lambda: None, keep_days=3, keep_state_days=7).keep_state_days is None  # clamped
    assert Worker(object(), lambda: None, keep_days=7, keep_state_days=7).keep_state_days is None
    assert Worker(object(), lambda: None, keep_days=None, keep_state_days=7).keep_state_days == 7.0
    with pytest.raises(ValueError, match=r"keep_state_days: must be 0 \(as long as the job: keep_days\)"):
        Worker(object(), lambda: None, keep_state_days=0.0001)


@pytest.mark.parametrize("keep_days, keep_state_days, expected", [
    (30, 7, (30 * 86400.0, 7 * 86400.0)),
    (30, None, (30 * 86400.0, None)),
    (3, 7, (3 * 86400.0, None)),                 # a state never outlives its job
    (None, 7, (float("inf"), 7 * 86400.0)),      # jobs kept for ever, states not
    (None, None, None),                          # nothing pruned: prune is never called
])
async def test_the_hourly_prune_passes_both_retentions(queue, tiny_models, monkeypatch, keep_days, keep_state_days,
                                                       expected):
    calls = []

    async def prune(older_than, state_older_than=None):
        calls.append((older_than, state_older_than))
        return 0

    monkeypatch.setattr(queue, "prune", prune)
    async with Worker(queue, lambda: tiny_models, worker_id="w1", heartbeat_every=0.02,
                      keep_days=keep_days, keep_state_days=keep_state_days):
        await asyncio.sleep(0.3)
    assert calls == ([] if expected is None else [expected])   # at start, then an hour later


def test_keep_state_gib_is_zero_for_no_budget_or_a_positive_number(capsys):
    """`imagine-worker --keep-state-gib` (0 by default: no budget), `Worker(keep_state_gib=)`: GiB,
    kept by the Worker in bytes; negative, NaN or infinite values are refused."""
    from engine.jobs import GIB
    from engine.worker import build_parser

    parse = build_parser().parse_args
    assert parse(["--queue", "x.db"]).keep_state_gib is None
    for given, taken in (("0", None), ("0.5", 0.5), ("20", 20.0)):
        assert parse(["--queue", "x.db", "--keep-state-gib", given]).keep_state_gib == taken
    for bad, message in (("-1", "must be 0 (no budget) or a positive number of GiB, got -1.0"),
                         ("nan", "got nan"), ("inf", "got inf"), ("lots", "expected a number of GiB, got 'lots'")):
        with pytest.raises(SystemExit) as exit_:
            parse(["--queue", "x.db", "--keep-state-gib", bad])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert "--keep-state-gib" in err and message in err, err
    assert Worker(object(), lambda: None).keep_state_bytes is None
    assert Worker(object(), lambda: None, keep_state_gib=0).keep_state_bytes is None
    assert Worker(object(), lambda: None, keep_state_gib=1.5).keep_state_bytes == 3 * GIB // 2
    with pytest.raises(ValueError, match=r"keep_state_gib: must be 0 \(no budget\) or a positive number of GiB"):
        Worker(object(), lambda: None, keep_state_gib=-2)


async def wait_until(check, what: str, timeout: float = 60.0) -> None:
    """Poll `check()` (a bool, or an awaitable of one) until it is true."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        done = check()
        if inspect.isawaitable(done):
            done = await done
        if done:
            return
        if loop.time() > deadline:
            raise AssertionError(f"never: {what}")
        await asyncio.sleep(0.05)


async def test_a_worker_keeps_the_kept_states_within_their_budget(queue, tiny_models, caplog):
    """Worker(keep_state_gib=): at its start (the hourly prune) and after each job it finishes, the
    state.pt of the oldest delivered jobs go while the states total more than the budget (here
    room for one and a half); a state not yet delivered stays, and so does that of a job a queued
    Continue starts from, until that Continue ends. Records and pictures stay."""
    from engine.jobs import GIB

    async with Worker(queue, lambda: tiny_models, worker_id="w0", grids=(8,)):
        parent = await queue.submit(spec("a parent"))
        await wait_state(queue, parent.id, {JobState.DONE})
        older = await queue.submit(spec("older"))
        await wait_state(queue, older.id, {JobState.DONE})
    for rec in (parent, older):
        assert await queue.mark_delivered(rec.id)
    size = await queue.state_bytes() / 2
    assert size > 0
    # A Continue of `parent` that no worker here takes (grid 16): it holds the parent's state.
    held = await queue.submit(spec("held", user=2, grid=16, parent_job_id=parent.id, parent_kind="continue"))

    async def has_state(rec):
        return await queue.has_artifact(rec.id, "state.pt")

    async def gone(rec):
        return not await has_state(rec)

    ends = Ends()
    async with Worker(queue, lambda: tiny_models, worker_id="w1", grids=(8,), heartbeat_every=0.05,
                      observer=ends, keep_state_gib=1.5 * size / GIB) as worker:
        await wait_until(lambda: gone(older), "the start's prune took the oldest state that may go")
        assert await queue.has_artifact(parent.id, "state.pt")   # its Continue waits
        first = await queue.submit(spec("first"))
        await wait_until(lambda: (first.id, "done") in ends.ended, "first ended")
        assert await has_state(first) and await has_state(parent)   # over, but first is not posted yet
        # Over the budget with nothing that may go: said (once an hour at most).
        await wait_until(lambda: "over keep_state_gib" in caplog.text, "the over-budget warning")
        assert await queue.mark_delivered(first.id)
        second = await queue.submit(spec("second"))
        await wait_until(lambda: (second.id, "done") in ends.ended, "second ended")
        # The budget's check runs once a job has ended (a task of its own): it takes `first`.
        await wait_until(lambda: gone(first), "the check after second took first's state")
        assert await has_state(second) and await has_state(parent)
        assert await queue.state_bytes() <= 2 * size * 1.01
        with pytest.raises(ParentGone, match=r"gone \(pruned\)"):
            await queue.submit(spec(parent_job_id=first.id, parent_kind="continue"))
        # The Continue ends (cancelled): the next finished job's check may take the parent's state.
        assert await queue.cancel(held.id)
        assert await queue.mark_delivered(second.id)
        third = await queue.submit(spec("third"))
        await wait_until(lambda: (third.id, "done") in ends.ended, "third ended")
        await wait_until(lambda: gone(second), "the check after third took second's state")
        assert await gone(parent) and await has_state(third)
        assert abs(worker.keep_state_bytes - 1.5 * size) <= 1
    for rec in (parent, older, first, second):
        record = await queue.get(rec.id)
        assert record.state == JobState.DONE and await queue.has_artifact(rec.id, "final.png")


async def test_a_job_queued_before_its_weights_were_refused_still_runs(queue, tiny_models):
    """`portrait (smiling:1.2)` was text at weight 1 when an older bot queued it; the rules now
    refuse it at submit, but the worker reads a queued job as it was queued: it runs."""
    job = await queue.submit(spec("a portrait | (smiling:1.2)", iterations=2))
    async with Worker(queue, lambda: tiny_models, worker_id="w1"):
        done = await wait_state(queue, job.id, {JobState.DONE, JobState.FAILED})
    assert done.state == JobState.DONE, done.error


async def test_a_queued_continue_keeps_its_parents_state_through_a_prune(queue, tiny_models):
    """prune(older_than, state_older_than) keeps the state.pt of a job that a queued Continue or
    Remix starts from: they run from it, and the next prune drops it (the record and picture
    stay); a Continue of it is then refused at submit. A state lost anyway (deleted outside prune)
    fails the job with the "gone (pruned)" reason; the worker goes on."""
    import sqlite3

    async with Worker(queue, lambda: tiny_models, worker_id="w1"):
        parent = await queue.submit(spec())
        await wait_state(queue, parent.id, {JobState.DONE})
    assert await queue.mark_delivered(parent.id)
    cont = await queue.submit(spec(parent_job_id=parent.id, parent_kind="continue", iterations=4))
    remix = await queue.submit(spec("a blue boat", user=2, parent_job_id=parent.id, parent_kind="remix"))
    assert await queue.prune(3600, 0) == 0 and await queue.has_artifact(parent.id, "state.pt")
    async with Worker(queue, lambda: tiny_models, worker_id="w2"):
        for child in (cont, remix):
            done = await wait_state(queue, child.id, {JobState.FAILED, JobState.DONE})
            assert done.state == JobState.DONE, done.error
    assert await queue.prune(3600, 0) == 0
    assert await queue.get(parent.id) is not None and await queue.has_artifact(parent.id, "final.png")
    assert not await queue.has_artifact(parent.id, "state.pt")
    with pytest.raises(ParentGone):
        await queue.submit(spec(parent_job_id=parent.id, parent_kind="continue", iterations=4))

    again = await queue.submit(spec(user=3, parent_job_id=cont.id, parent_kind="continue", iterations=4))
    remixed = await queue.submit(spec("a red boat", user=5, parent_job_id=cont.id, parent_kind="remix"))
    with sqlite3.connect(queue.path) as db:   # lost outside prune: the worker finds it gone
        db.execute("DELETE FROM artifacts WHERE job_id = ? AND name = 'state.pt'", (cont.id,))
    async with Worker(queue, lambda: tiny_models, worker_id="w3"):
        failed = await wait_state(queue, again.id, {JobState.FAILED, JobState.DONE})
        assert failed.state == JobState.FAILED and failed.attempts == 1, failed
        assert f"the state of job {cont.id} is gone (pruned): it cannot be continued" in failed.error, failed.error
        failed = await wait_state(queue, remixed.id, {JobState.FAILED, JobState.DONE})
        assert "it cannot be remixed; use /imagine with its prompt instead" in failed.error, failed.error
        after = await queue.submit(spec(user=4))
        await wait_state(queue, after.id, {JobState.DONE})


def test_checkpoint_every_is_seconds_zero_or_more(capsys):
    """`checkpoint_every`: Worker(checkpoint_every=), `imagine-worker --checkpoint-every`, `[worker]
    checkpoint_every`; 60 s unless set, 0 for a checkpoint at every frame, never negative."""
    from bot.config import ConfigError, config_from_dict
    from engine.worker import build_parser

    parse = build_parser().parse_args
    assert parse(["--queue", "x.db"]).checkpoint_every == 60.0
    for given, taken in (("0", 0.0), ("2.5", 2.5), ("600", 600.0)):
        assert parse(["--queue", "x.db", "--checkpoint-every", given]).checkpoint_every == taken
    for bad, message in (("-1", "must be 0 (every frame) or a number of seconds"),
                         ("soon", "expected a number of seconds, got 'soon'")):
        with pytest.raises(SystemExit) as exit_:
            parse(["--queue", "x.db", "--checkpoint-every", bad])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert "--checkpoint-every" in err and message in err, err
    assert Worker(object(), lambda: None).checkpoint_every == 60.0
    assert Worker(object(), lambda: None, checkpoint_every=0).checkpoint_every == 0.0
    with pytest.raises(ValueError, match=r"checkpoint_every: must be 0 \(every frame\)"):
        Worker(object(), lambda: None, checkpoint_every=-5)
    assert config_from_dict({}).worker.checkpoint_every == 60.0
    assert config_from_dict({"worker": {"checkpoint_every": 0}}).worker.checkpoint_every == 0.0
    with pytest.raises(ConfigError, match=r"\[worker\] checkpoint_every: must not be negative"):
        config_from_dict({"worker": {"checkpoint_every": -1}})


async def test_a_job_claimed_as_the_worker_stops_is_handed_back_at_once(queue, tiny_models, monkeypatch):
    """stop() cancels the claim loop; if the store has just committed a claim (its reply still on
    the way: here held back after the real claim), the job goes back to the line at once, its
    attempt not counted, instead of sitting RUNNING until a lease nobody renews expires."""
    real_claim, committed = queue.claim, asyncio.Event()

    async def slow_reply(worker_id, grids=None, **options):
        record = await real_claim(worker_id, grids, **options)
        if record is not None:
            committed.set()
            await asyncio.sleep(5)   # the reply still travelling when stop() comes
        return record

    monkeypatch.setattr(queue, "claim", slow_reply)
    worker = Worker(queue, lambda: tiny_models, worker_id="w1", heartbeat_every=0.1)
    await worker.start()
    try:
        job = await queue.submit(spec())
        await asyncio.wait_for(committed.wait(), 30)
        assert (await queue.get(job.id)).state == JobState.RUNNING
    finally:
        await worker.stop()
    record = await queue.get(job.id)
    assert record.state == JobState.QUEUED and await queue.position(job.id) == 1
    monkeypatch.setattr(queue, "claim", real_claim)
    async with Worker(queue, lambda: tiny_models, worker_id="w2"):
        record = await wait_state(queue, job.id, {JobState.DONE})
    assert record.attempts == 1 and record.worker_id == "w2"


async def test_a_stopping_worker_makes_up_for_checkpoints_the_store_refused(queue, tiny_models, monkeypatch):
    """A checkpoint is taken at every frame (here every step) but the store refuses to save each
    one (a full disk, say): the stop must still snapshot the job where it stands, not trust the
    snapshots it took but could not save, or the job would start over at 0."""
    import inspect

    real_save = queue.save_checkpoint

    async def refusing_save(checkpoint, lease_id=None):
        # The checkpoints taken at frames are refused (the disk was full then); the one the stop
        # saves is not (it had room again by then).
        if any(frame.function == "_on_frame" for frame in inspect.stack()):
            raise OSError("no space left on device")
        return await real_save(checkpoint, lease_id)

    monkeypatch.setattr(queue, "save_checkpoint", refusing_save)
    steps = Steps()
    w1 = Worker(queue, lambda: tiny_models, worker_id="w1", heartbeat_every=0.2, checkpoint_every=0,
                observer=steps)
    await w1.start()
    try:
        job = await queue.submit(spec(iterations=400, frame_every=1))
        while steps.count < 6:
            await asyncio.sleep(0.01)
        assert await queue.load_checkpoint(job.id) is None   # every one so far refused
    finally:
        await w1.stop()
    stopped_at = steps.count
    checkpoint = await queue.load_checkpoint(job.id)
    assert checkpoint is not None and checkpoint.iteration == stopped_at >= 6
    assert (await queue.get(job.id)).state == JobState.QUEUED


async def test_a_worker_stopped_in_a_store_outage_does_not_write_its_queued_frames_one_by_one(
        queue, tiny_models, monkeypatch):
    """The store is down (each publish waits out a reconnect timeout, then fails, as Redis's does)
    while the GPU goes on making frames: their writes queue up, one after another. A stop then
    makes no new write for them (at most the one under way finishes): their frames go into the
    stop checkpoint, which carries every frame. Before: the stop waited for every queued write,
    one reconnect timeout each (minutes for tens of frames), past any supervisor's grace period."""
    real_publish = queue.publish
    outage = {"on": False, "calls": 0}
    stopping = asyncio.Event()
    after_stop = []

    async def publish(event, lease_id=None):
        if stopping.is_set():
            after_stop.append(event.iteration)
        if outage["on"] and event.kind == EventKind.PROGRESS:
            outage["calls"] += 1
            await asyncio.sleep(0.3)
            raise ConnectionError("the store is unreachable")
        return await real_publish(event, lease_id)

    monkeypatch.setattr(queue, "publish", publish)
    worker = Worker(queue, lambda: tiny_models, worker_id="w1", heartbeat_every=0.2, checkpoint_every=3600)
    await worker.start()
    job = await queue.submit(spec(iterations=100_000, frame_every=1))
    await wait_state(queue, job.id, {JobState.RUNNING})
    outage["on"] = True
    while True:   # frames pile up behind the failing writes
        run = next(iter(worker.running.values()))
        if sum(not t.done() for t in run.pending) >= 6:
            break
        await asyncio.sleep(0.05)
    stopping.set()
    await worker.stop()
    assert len(after_stop) <= 1, after_stop   # the write under way, if any; none for the queued frames
    checkpoint = await queue.load_checkpoint(job.id)
    assert checkpoint is not None
    from engine.worker import unpack_checkpoint

    state, frames = unpack_checkpoint(checkpoint.data)
    assert len(frames) == state["iteration"] + 1   # every frame, 0 to the stop's, in the stop checkpoint
    assert (await queue.get(job.id)).state == JobState.QUEUED


async def test_a_store_hiccup_while_storing_a_finished_result_is_tried_again_in_place(queue, tiny_models,
                                                                                     monkeypatch, caplog):
    """The run has finished; writing its state.pt fails once (a store hiccup). The write is tried
    again in place and the job ends DONE on its first attempt with every artifact. Before: the
    finished picture was thrown away and the job run again (an attempt spent; FAILED on its last)."""
    real_put = queue.put_artifact
    failed = []

    async def put_artifact(job_id, name, data, lease_id=None):
        if name == "state.pt" and not failed:
            failed.append(name)
            raise OSError("disk hiccup")
        return await real_put(job_id, name, data, lease_id)

    monkeypatch.setattr(queue, "put_artifact", put_artifact)
    ends = Ends()
    caplog.set_level(logging.WARNING, logger="engine.worker")
    async with Worker(queue, lambda: tiny_models, worker_id="w1", heartbeat_every=0.1, observer=ends):
        job = await queue.submit(spec())
        record = await wait_state(queue, job.id, {JobState.DONE, JobState.FAILED})
    assert failed == ["state.pt"]
    assert record.state == JobState.DONE and record.attempts == 1, record
    assert ends.ended == [(job.id, "done")]
    for name in ("final.png", "video.mp4", "state.pt"):
        assert await queue.get_artifact(job.id, name)
    assert "storing its result failed (OSError: disk hiccup); trying again in 2 s" in caplog.text


async def test_a_stopping_worker_keeps_its_leases_until_its_jobs_are_handed_back(tmp_path, tiny_models, monkeypatch):
    """Saving the stop checkpoints can outlast a lease (full-size states, one after another, over a
    slow link: here a 1 s lease and a 2.5 s save). Meanwhile another worker's sweep must not take
    the job back as lost (an attempt counted, the stop checkpoint refused)."""
    q = open_queue(f"sqlite:///{tmp_path}/jobs.db?lease=1")
    await q.start()
    try:
        real_save = q.save_checkpoint

        async def slow_save(checkpoint, lease_id=None):
            await asyncio.sleep(2.5)
            return await real_save(checkpoint, lease_id)

        worker = Worker(q, lambda: tiny_models, worker_id="w1", heartbeat_every=0.2, checkpoint_every=3600)
        await worker.start()
        job = await q.submit(spec(iterations=10_000, frame_every=1000))
        await wait_state(q, job.id, {JobState.RUNNING})
        await asyncio.sleep(0.5)   # some steps past the start
        monkeypatch.setattr(q, "save_checkpoint", slow_save)
        stopping = asyncio.create_task(worker.stop())
        swept = 0
        while not stopping.done():   # the other workers' sweeps, as often as they come
            swept += await q.sweep()
            await asyncio.sleep(0.1)
        await stopping
        assert swept == 0
        record = await q.get(job.id)
        assert record.state == JobState.QUEUED and record.attempts <= 1, record
        checkpoint = await q.load_checkpoint(job.id)
        assert checkpoint is not None and checkpoint.iteration > 0
    finally:
        await q.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")   # the thread's death
async def test_imagine_worker_exits_1_when_its_gpu_thread_dies(queue, tiny_models, caplog):
    """The GPU thread dies (here: the runner cannot be built on a device that does not exist, the
    real failure of a worker pointed at a GPU it cannot use): `imagine-worker`'s wait ends with
    exit status 1 instead of idling for ever, so its supervisor restarts it. Stopping normally is 0."""
    from engine.models import Models
    from engine.worker import until_stopped_or_gpu_dead

    broken = Models(clip=tiny_models.clip, decoder=tiny_models.decoder, device=torch.device("cuda", 99))
    worker = Worker(queue, lambda: broken, worker_id="w-dead", max_batch=2)
    await worker.start()
    try:
        code = await asyncio.wait_for(until_stopped_or_gpu_dead(worker, asyncio.Event(), poll=0.05), 30)
    finally:
        await worker.stop()
    assert code == 1 and not worker.gpu_thread_alive()
    assert "GPU thread died" in caplog.text and "exiting so that it is restarted" in caplog.text

    async with Worker(queue, lambda: tiny_models, worker_id="w-ok", max_batch=2) as healthy:
        stop = asyncio.Event()
        waiting = asyncio.create_task(until_stopped_or_gpu_dead(healthy, stop, poll=0.05))
        await asyncio.sleep(0.3)
        assert not waiting.done() and healthy.gpu_thread_alive()
        stop.set()
        assert await asyncio.wait_for(waiting, 5) == 0


async def test_a_gpu_step_past_the_stall_timeout_counts_as_hung_and_lets_its_job_go(tmp_path, tiny_models, caplog):
    """The watchdog, on steps that really take longer than its timeout (a grid-32 step of the tiny
    models, against 0.05 s): the GPU counts as hung, `imagine-worker`'s wait ends with 1, the job's
    lease is no longer renewed (a sweep puts it back in line) and the worker claims nothing more."""
    from engine.worker import until_stopped_or_gpu_dead

    queue = open_queue(f"sqlite:///{tmp_path}/jobs.db?lease=1")
    await queue.start()
    try:
        worker = Worker(queue, lambda: tiny_models, worker_id="w-hung", max_batch=1,
                        heartbeat_every=0.05, poll_every=0.05, stall_timeout=0.05)
        await worker.start()
        try:
            job = await queue.submit(spec(grid=32, cutn=16, iterations=100_000, frame_every=50))
            code = await asyncio.wait_for(until_stopped_or_gpu_dead(worker, asyncio.Event(), poll=0.05), 30)
            assert code == 1 and not worker.gpu_thread_alive()
            assert "counted as hung" in caplog.text
            await asyncio.sleep(1.5)                       # past the 1 s lease: not renewed
            await queue.sweep()
            assert (await queue.get(job.id)).state == JobState.QUEUED
            await asyncio.sleep(0.5)                       # several claim polls: it takes nothing
            assert (await queue.get(job.id)).state == JobState.QUEUED and runs_of(worker, job.id) <= 1
        finally:
            await asyncio.wait_for(worker.stop(), 30)
    finally:
        await queue.close()
    assert Worker(queue, lambda: tiny_models, stall_timeout=0).stall_timeout == 0   # 0: no watchdog
    from engine.worker import DEFAULT_STALL_TIMEOUT, build_parser
    parse = build_parser().parse_args
    assert parse(["--queue", "x.db"]).stall_timeout == DEFAULT_STALL_TIMEOUT == 900.0
    assert parse(["--queue", "x.db", "--stall-timeout", "0"]).stall_timeout == 0
    with pytest.raises(ValueError, match="stall_timeout"):
        Worker(queue, lambda: tiny_models, stall_timeout=-1)


class _Fatal(BaseException):
    """An error that escapes every per-step handler (as only a BaseException can)."""


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")   # the thread's death
async def test_jobs_of_a_gpu_thread_that_died_go_back_as_failed_attempts_not_releases(queue, tiny_models):
    """The GPU thread dies with a job on it (here: a BaseException from the step's metrics hook). The
    job may be why, so stopping the worker does not hand it back as a graceful release (attempt
    given back, at the front, for ever): it fails the attempt, retried elsewhere, up to the cap."""
    from engine.worker import until_stopped_or_gpu_dead

    class DiesAtStep3(Steps):
        def iterations(self, n: int) -> None:
            super().iterations(n)
            if self.count == 3:
                raise _Fatal("boom")

    worker = Worker(queue, lambda: tiny_models, worker_id="w-dies", max_batch=1, observer=DiesAtStep3())
    await worker.start()
    try:
        job = await queue.submit(spec(iterations=50, frame_every=10))
        code = await asyncio.wait_for(until_stopped_or_gpu_dead(worker, asyncio.Event(), poll=0.05), 60)
    finally:
        await worker.stop()
    assert code == 1
    record = await queue.get(job.id)
    assert record.state == JobState.QUEUED and record.attempts == 1, (record.state, record.attempts)
    assert record.error.startswith("GpuThreadDied: the worker's GPU thread died: _Fatal: boom"), record.error


async def test_a_store_refusing_claims_is_logged_once_with_its_traceback_then_its_end(queue, tiny_models, monkeypatch, caplog):
    """A full disk fails every claim poll: one traceback, not one per poll, and a line when claims
    work again (the job queued meanwhile is then run)."""
    real_claim = queue.claim
    refused = 0

    async def refusing_claim(*args, **kwargs):
        nonlocal refused
        if refused < 8:
            refused += 1
            raise OSError("database or disk is full")
        return await real_claim(*args, **kwargs)

    monkeypatch.setattr(queue, "claim", refusing_claim)
    caplog.set_level(logging.INFO, logger="engine.worker")
    async with Worker(queue, lambda: tiny_models, worker_id="w1", poll_every=0.02):
        job = await queue.submit(spec(iterations=2))
        done = await wait_state(queue, job.id, {JobState.DONE})
    assert done.state == JobState.DONE and refused == 8
    failures = [r for r in caplog.records if r.getMessage().startswith("claims failed; while they fail")]
    assert len(failures) == 1 and failures[0].exc_info is not None
    assert sum("claims work again" in r.getMessage() for r in caplog.records) == 1


async def test_a_slow_checkpoint_save_holds_back_the_runs_next_snapshot(queue, tiny_models, monkeypatch):
    """checkpoint_every=0 (a checkpoint at every frame) and a store slower than the frames (here
    the first save waits on a gate): while a run's save is in flight, its frames take one snapshot
    more (the next to save) and then none (each is a full state, up to 384 MiB, that would otherwise
    wait in memory behind the one before it, without bound). Once that save is over, the next
    frame takes one again, and the job ends DONE."""
    gate, saved_first = asyncio.Event(), asyncio.Event()
    saves: list[int] = []
    real_save = queue.save_checkpoint

    async def gated_save(checkpoint, lease_id=None):
        saves.append(checkpoint.iteration)
        if len(saves) == 1:
            await gate.wait()
        ok = await real_save(checkpoint, lease_id)
        if len(saves) == 1:
            saved_first.set()
        return ok

    import threading

    hold_at, held, release = 30, threading.Event(), threading.Event()

    class HoldsTheGpu(Steps):
        def iterations(self, n: int) -> None:   # GPU thread, after a step, before its frame's snapshot
            super().iterations(n)
            if self.count == hold_at:
                held.set()
                release.wait(60)

    monkeypatch.setattr(queue, "save_checkpoint", gated_save)
    worker = Worker(queue, lambda: tiny_models, worker_id="w1", max_batch=1, checkpoint_every=0,
                    observer=HoldsTheGpu())
    taken: list[int] = []   # iterations of the snapshots taken for checkpoints (GPU thread)
    real_snapshot = worker._checkpoint_snapshot

    def noting_snapshot(slot):
        state = real_snapshot(slot)
        if state is not None:
            taken.append(slot.iteration)
        return state

    monkeypatch.setattr(worker, "_checkpoint_snapshot", noting_snapshot)
    async with worker:
        try:
            job = await queue.submit(spec(grid=4, cutn=1, iterations=40, frame_every=1))
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60
            while not (saves and held.is_set()):   # the first save waits; the GPU thread is 30 steps in
                assert loop.time() < deadline, (saves, held.is_set())
                await asyncio.sleep(0.02)
            # Frames up to 29 came and went meanwhile: only frame 2 took a snapshot (the next to save).
            assert saves == [1] and taken == [1, 2], (taken, saves)
            gate.set()
            await asyncio.wait_for(saved_first.wait(), 30)
            release.set()   # frame 30's snapshot is decided now: the first save is over
            record = await wait_state(queue, job.id, {JobState.DONE}, timeout=120)
        finally:   # whatever failed above: nothing left waiting (the worker's stop waits for its frames)
            gate.set()
            release.set()
    assert record.iteration == 40 and record.attempts == 1
    assert taken[:3] == [1, 2, 30] and taken == saves and saves == sorted(set(saves)) and saves[-1] < 40, taken
    assert await queue.load_checkpoint(job.id) is None   # deleted once DONE


async def test_a_saved_checkpoint_never_races_the_gpu_thread_forgetting_its_run(queue, tiny_models, caplog):
    """The asyncio side raises the run's saved iteration (`_saved`) once a checkpoint is accepted,
    while the GPU thread may be dropping the run (cancelled, done, failed) and forgetting it. Here
    the GPU thread is made to drop the run exactly between the asyncio side's check and its write
    (the check waits up to a second for it): the write must not raise (logged as a checkpoint that
    "could not be saved") nor put back an entry for a run that is gone."""
    import threading

    holder: list[Worker] = []

    class Racing(dict):
        def __init__(self) -> None:
            super().__init__()
            self.armed, self.key, self.popped = True, None, threading.Event()

        def pop(self, key, *default):
            out = super().pop(key, *default)
            if key == self.key:
                self.popped.set()
            return out

        def __contains__(self, key) -> bool:
            found = super().__contains__(key)
            worker = holder[0]
            if found and self.armed and threading.current_thread() is not worker._thread:
                self.armed, self.key = False, key
                worker.running[key].cancel.set()   # the GPU thread drops the run and forgets it ...
                self.popped.wait(1.0)              # ... now, unless it has to wait for this write
            return found

    worker = Worker(queue, lambda: tiny_models, worker_id="w1", max_batch=1, checkpoint_every=0)
    worker._saved = racing = Racing()
    holder.append(worker)
    async with worker:
        job = await queue.submit(spec(grid=4, cutn=1, iterations=100_000, frame_every=1))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while racing.armed or runs_of(worker, job.id):   # a checkpoint accepted, then the run dropped
            assert loop.time() < deadline, "no checkpoint was saved, or the run was not dropped"
            await asyncio.sleep(0.02)
        assert racing.popped.wait(10)
    assert racing.key is not None and not dict.__contains__(racing, racing.key)   # not put back
    assert "could not be saved" not in caplog.text, caplog.text


async def _a_finished_state_and_frames(queue, tiny_models, job_spec):
    """A real state (Slot.state(), compact) and frames of a job run to its end with `job_spec`."""
    async with Worker(queue, lambda: tiny_models, worker_id="w-ref"):
        ref = await queue.submit(spec(**job_spec))
        await wait_state(queue, ref.id, {JobState.DONE})
    state = state_from_bytes(await queue.get_artifact(ref.id, "state.pt"))
    frames = [e.frame_png for e in await job_events(queue, ref.id) if e.kind == EventKind.PROGRESS]
    return state, frames


@pytest.mark.parametrize("at", [4, 6])   # the job's last iteration, and past it
async def test_a_checkpoint_at_or_past_the_last_iteration_is_damaged_and_the_job_starts_over(
        queue, tiny_models, caplog, at):
    """A checkpoint at or past the job's last iteration (never written by a worker: another
    version's, or a damaged store) resumed a run that was done before its first step: never
    stepped, never finished, never let go, its job RUNNING for ever under the worker's heartbeats.
    It is refused as damaged instead: the job starts over from 0 and ends DONE on its first attempt."""
    from engine.worker import pack_checkpoint

    job_spec = dict(iterations=4, frame_every=2)
    state, frames = await _a_finished_state_and_frames(queue, tiny_models, job_spec)
    state["iteration"] = at
    job = await queue.submit(spec(user=2, **job_spec))
    await queue.save_checkpoint(Checkpoint(job.id, at, pack_checkpoint(state, frames)))
    caplog.set_level(logging.WARNING, logger="engine.worker")
    async with Worker(queue, lambda: tiny_models, worker_id="w1", heartbeat_every=0.2):
        record = await wait_state(queue, job.id, {JobState.DONE, JobState.FAILED}, timeout=60)
    assert record.state == JobState.DONE and record.attempts == 1, record
    progress = [e.iteration for e in await job_events(queue, job.id) if e.kind == EventKind.PROGRESS]
    assert progress == [0, 2, 4]   # started over
    assert f"job {job.id}: its checkpoint is damaged (the checkpoint is at iteration {at};" in caplog.text


def _video_frames(data: bytes) -> int:
    """How many frames the real ffmpeg decodes from an mp4 of 64x64 frames (grid 8)."""
    import subprocess
    import tempfile

    from engine import video

    with tempfile.NamedTemporaryFile(suffix=".mp4") as f:
        f.write(data)
        f.flush()
        raw = subprocess.run([video.ffmpeg_binary(), "-v", "error", "-i", f.name, "-f", "rawvideo", "-pix_fmt",
                              "rgb24", "-"], check=True, capture_output=True).stdout
    return len(raw) // (64 * 64 * 3)


async def test_a_checkpoint_holding_more_frames_than_its_iteration_made_starts_the_job_over(
        queue, tiny_models, monkeypatch, caplog):
    """A checkpoint at iteration N holds the frames of 0, 2, ..., N (frame_every 2). One holding
    more (here the frames of a later point too, as a crash between saving frames and state would
    leave) resumed gave a video with those frames twice. Which ones are extra cannot be told: the
    job starts over, and its video has each frame once. A checkpoint that agrees resumes, its video
    the same length."""
    from engine.worker import pack_checkpoint, unpack_checkpoint

    saved: list[Checkpoint] = []
    real_save = queue.save_checkpoint

    async def noting_save(checkpoint, lease_id=None):
        saved.append(checkpoint)
        return await real_save(checkpoint, lease_id)

    monkeypatch.setattr(queue, "save_checkpoint", noting_save)
    job_spec = dict(iterations=12, frame_every=2)
    hold = 10   # the last frame held 1 s at 10 fps (video.encode_frames)
    async with Worker(queue, lambda: tiny_models, worker_id="w-ref", checkpoint_every=0):
        ref = await queue.submit(spec(**job_spec))
        await wait_state(queue, ref.id, {JobState.DONE})
    assert _video_frames(await queue.get_artifact(ref.id, "video.mp4")) == 7 + hold
    ref_frames = {e.iteration: e.frame_png for e in await job_events(queue, ref.id) if e.kind == EventKind.PROGRESS}
    checkpoint = saved[0]
    state, frames = unpack_checkpoint(checkpoint.data)
    n = checkpoint.iteration
    assert state["iteration"] == n and frames == [ref_frames[i] for i in range(0, n + 1, 2)]
    monkeypatch.setattr(queue, "save_checkpoint", real_save)

    torn = await queue.submit(spec(user=2, **job_spec))
    later = [ref_frames[i] for i in range(n + 2, 13, 2)][:2]   # frames saved past the state
    assert len(later) == 2
    await queue.save_checkpoint(Checkpoint(torn.id, n, pack_checkpoint(state, frames + later)))
    whole = await queue.submit(spec(user=3, **job_spec))
    await queue.save_checkpoint(Checkpoint(whole.id, n, pack_checkpoint(state, frames)))
    caplog.set_level(logging.INFO, logger="engine.worker")
    async with Worker(queue, lambda: tiny_models, worker_id="w1", heartbeat_every=0.2, checkpoint_every=3600):
        for job in (torn, whole):
            record = await wait_state(queue, job.id, {JobState.DONE, JobState.FAILED})
            assert record.state == JobState.DONE and record.attempts == 1, record
    assert _video_frames(await queue.get_artifact(torn.id, "video.mp4")) == 7 + hold   # each frame once
    progress = [e.iteration for e in await job_events(queue, torn.id) if e.kind == EventKind.PROGRESS]
    assert progress == list(range(0, 13, 2))   # started over
    assert (f"job {torn.id}: its checkpoint is damaged (the checkpoint at iteration {n} holds "
            f"{len(frames) + len(later)} frames; a run there with a frame every 2 has made at most "
            f"{len(frames)}): starting it over") in caplog.text
    assert f"job {whole.id} resumes from its checkpoint at iteration {n}" in caplog.text
    progress = [e.iteration for e in await job_events(queue, whole.id) if e.kind == EventKind.PROGRESS]
    assert progress == list(range(n + 2, 13, 2))   # resumed
    assert _video_frames(await queue.get_artifact(whole.id, "video.mp4")) == 7 + hold


async def test_a_run_admitted_already_done_is_finished_not_held_for_ever(queue, tiny_models, monkeypatch):
    """The GPU loop's backstop, with the checkpoint check out of the way: a slot admitted at its
    last iteration is never stepped (the runner skips done slots), so the loop finishes it itself,
    with a frame of where it is, instead of spinning on it with its job RUNNING for ever."""
    from engine import worker as worker_module

    job_spec = dict(iterations=4, frame_every=2)
    state, frames = await _a_finished_state_and_frames(queue, tiny_models, job_spec)
    job = await queue.submit(spec(user=2, **job_spec))
    await queue.save_checkpoint(Checkpoint(job.id, 4, worker_module.pack_checkpoint(state, frames)))
    monkeypatch.setattr(worker_module, "_check_checkpoint_iteration", lambda state, spec: None)
    async with Worker(queue, lambda: tiny_models, worker_id="w1", heartbeat_every=0.2):
        record = await wait_state(queue, job.id, {JobState.DONE, JobState.FAILED}, timeout=60)
    assert record.state == JobState.DONE and record.attempts == 1, record
    progress = [e for e in await job_events(queue, job.id) if e.kind == EventKind.PROGRESS]
    assert [e.iteration for e in progress] == [4]
    assert await queue.get_artifact(job.id, "final.png") == progress[-1].frame_png
    assert state_from_bytes(await queue.get_artifact(job.id, "state.pt"))["iteration"] == 4


async def test_a_gpu_failing_every_job_with_cuda_errors_counts_as_dead_not_a_black_hole(tmp_path, tiny_models, caplog):
    """A sticky CUDA error (an illegal memory access: every kernel fails from then on; here the
    decoder raises it at every call) fails each job alone, bisection or not. Without a latch the
    worker claims job after job and fails every one (an attempt each: here the last). After
    CUDA_FAILURES_TO_LATCH in a row the GPU counts as dead: no more claims, `imagine-worker`'s wait
    ends with 1 (restart me), and the jobs it did not take stay queued for healthy workers."""
    import dataclasses

    from engine.worker import CUDA_FAILURES_TO_LATCH, until_stopped_or_gpu_dead

    class StickyCudaError(torch.nn.Module):
        def __init__(self, real) -> None:
            super().__init__()
            self.vocab_size = real.vocab_size

        def forward(self, codes):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    broken = dataclasses.replace(tiny_models, decoder=StickyCudaError(tiny_models.decoder))
    q = open_queue(f"sqlite:///{tmp_path}/jobs.db?max_attempts=1")
    await q.start()
    try:
        jobs = [await q.submit(spec(user=i + 1)) for i in range(CUDA_FAILURES_TO_LATCH + 3)]
        worker = Worker(q, lambda: broken, worker_id="w-sticky", max_batch=1, poll_every=0.02, heartbeat_every=0.1)
        await worker.start()
        try:
            code = await asyncio.wait_for(until_stopped_or_gpu_dead(worker, asyncio.Event(), poll=0.02), 60)
            assert code == 1 and not worker.gpu_thread_alive()
            await asyncio.sleep(0.3)   # claim polls: it takes nothing more
        finally:
            await asyncio.wait_for(worker.stop(), 30)
        records = [await q.get(job.id) for job in jobs]
        failed = [r for r in records if r.state == JobState.FAILED]
        assert len(failed) == CUDA_FAILURES_TO_LATCH < len(jobs), [(r.state, r.attempts) for r in records]
        assert all("CUDA error: an illegal memory access" in r.error for r in failed)
        assert all(r.state == JobState.QUEUED and r.attempts == 0 for r in records if r not in failed)
        assert "jobs in a row failed with CUDA errors" in caplog.text
    finally:
        await q.close()
    from engine.worker import _looks_like_cuda_error
    assert _looks_like_cuda_error(RuntimeError("CUDA error: device-side assert triggered"))
    assert _looks_like_cuda_error(RuntimeError("CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasSgemm`"))
    assert _looks_like_cuda_error(RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR"))
    assert not _looks_like_cuda_error(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert not _looks_like_cuda_error(RuntimeError("CUDA error: out of memory"))
    assert not _looks_like_cuda_error(RuntimeError("the saved logits do not fit"))


async def test_a_run_that_diverged_since_its_last_checkpoint_leaves_that_checkpoint_when_stopping(
        queue, tiny_models, monkeypatch, caplog):
    """Frame checkpoints are checked finite by their frames; the one a stopping worker takes has no
    frame. A run whose logits went NaN (an fp16 overflow) after its last frame would overwrite its
    last good checkpoint with one that fails at its next frame, on every retry: it takes none, the
    job resumes from its last good one and finishes."""
    from engine.generate import Slot
    from engine.worker import unpack_checkpoint

    real_step = Slot.adam_step
    worker: list[Worker] = []

    def diverging_step(self):
        real_step(self)
        if self.iteration == 9:   # 10 after this step: between the frames at 8 and 12
            with torch.no_grad():
                self.logits.fill_(float("nan"))
            worker[0]._stop.set()   # the GPU loop ends after this step, as at a SIGTERM

    monkeypatch.setattr(Slot, "adam_step", diverging_step)
    caplog.set_level(logging.WARNING, logger="engine.worker")
    w = Worker(queue, lambda: tiny_models, worker_id="w1", heartbeat_every=0.2, checkpoint_every=0)
    worker.append(w)
    await w.start()
    job = await queue.submit(spec(iterations=40, frame_every=4))
    while not w._stop.is_set():
        await asyncio.sleep(0.01)
    await w.stop()
    checkpoint = await queue.load_checkpoint(job.id)
    state, frames = unpack_checkpoint(checkpoint.data)
    assert checkpoint.iteration == state["iteration"] == 8 and len(frames) == 3   # frames 0, 4, 8
    assert torch.isfinite(state["logits"]).all()
    assert f"job {job.id} diverged (non-finite logits or optimiser state at iteration 10)" in caplog.text

    monkeypatch.setattr(Slot, "adam_step", real_step)
    async with Worker(queue, lambda: tiny_models, worker_id="w2", heartbeat_every=0.2):
        record = await wait_state(queue, job.id, {JobState.DONE, JobState.FAILED})
    assert record.state == JobState.DONE, record.error
    progress = [e.iteration for e in await job_events(queue, job.id) if e.kind == EventKind.PROGRESS]
    assert progress[:4] == [0, 4, 8, 12]


@pytest.mark.parametrize("damage", ["another grid's logits", "no optimiser", "two param groups",
                                    "a float generator", "a bool step count"])
async def test_a_checkpoint_whose_state_fits_no_slot_of_its_job_is_damaged_and_the_job_starts_over(
        queue, tiny_models, caplog, damage):
    """A checkpoint's state is checked where the checkpoint is read, as its slot would check it:
    one that no slot of the job can take (written by another version, or damaged in the store)
    would fail the job at its start on every worker, for good (a ValueError is not retried) and
    with its checkpoint deleted. Like a bad frame it is damaged instead: the job starts over and
    ends DONE on its first attempt (a graceful stop's hand-back counts none)."""
    from engine.worker import pack_checkpoint, unpack_checkpoint

    job = await queue.submit(spec(iterations=12, frame_every=4))
    w = Worker(queue, lambda: tiny_models, worker_id="w1", heartbeat_every=0.2, checkpoint_every=0)
    await w.start()
    while (checkpoint := await queue.load_checkpoint(job.id)) is None or checkpoint.iteration < 4:
        await asyncio.sleep(0.02)
    await w.stop()
    checkpoint = await queue.load_checkpoint(job.id)
    state, frames = unpack_checkpoint(checkpoint.data)
    if damage == "another grid's logits":
        state["logits"] = state["logits"][..., :4, :4].clone()
    elif damage == "no optimiser":
        del state["optimizer"]
    elif damage == "two param groups":
        group = state["optimizer"]["param_groups"][0]
        state["optimizer"]["param_groups"] = [group, dict(group, params=[1])]
    elif damage == "a float generator":
        state["generator"] = state["generator"].float()
    else:
        state["optimizer"]["state"][0]["step"] = torch.tensor(True)
    await queue.save_checkpoint(Checkpoint(job.id, checkpoint.iteration, pack_checkpoint(state, frames)))
    caplog.set_level(logging.WARNING, logger="engine.worker")
    async with Worker(queue, lambda: tiny_models, worker_id="w2", heartbeat_every=0.2):
        record = await wait_state(queue, job.id, {JobState.DONE, JobState.FAILED})
    assert record.state == JobState.DONE and record.attempts == 1, record.error
    assert f"job {job.id}: its checkpoint is damaged" in caplog.text and "starting it over" in caplog.text
    progress = [e.iteration for e in await job_events(queue, job.id) if e.kind == EventKind.PROGRESS]
    assert progress[-4:] == [0, 4, 8, 12]   # started over


async def _until_logged(caplog, text: str, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline and not any(text in r.getMessage() for r in caplog.records):
        await asyncio.sleep(0.05)


async def test_heartbeats_failing_in_a_store_outage_log_one_traceback_not_one_per_job_per_beat(
        queue, tiny_models, monkeypatch, caplog):
    """A full disk (or Redis MISCONF) fails every heartbeat at once, for every running job: the first
    failure is logged with its traceback, then a line a minute with a count (here every 0.3 s), and
    one line when heartbeats work again; not a traceback per job per beat."""
    import engine.outage
    monkeypatch.setattr(engine.outage, "REMIND_EVERY", 0.3)
    real_heartbeat = queue.heartbeat
    failing, refused = False, 0

    async def heartbeat(job_id, lease_id):
        nonlocal refused
        if failing:
            refused += 1
            raise OSError("database or disk is full")
        return await real_heartbeat(job_id, lease_id)

    monkeypatch.setattr(queue, "heartbeat", heartbeat)
    caplog.set_level(logging.INFO, logger="engine.worker")
    async with Worker(queue, lambda: tiny_models, worker_id="w1", max_batch=3, heartbeat_every=0.02):
        jobs = [await queue.submit(spec(iterations=100_000, frame_every=100_000)) for _ in range(3)]
        for job in jobs:
            await wait_state(queue, job.id, {JobState.RUNNING})
        caplog.clear()
        failing = True
        await asyncio.sleep(1.2)
        failing = False
        await _until_logged(caplog, "heartbeats work again")
        for job in jobs:
            await queue.cancel(job.id)
    said = [r for r in caplog.records if r.levelno >= logging.WARNING and "heartbeat" in r.getMessage()]
    assert refused >= 60, refused   # 3 jobs, a beat every 0.02 s for 1.2 s
    assert len([r for r in said if r.exc_info]) == 1, [r.getMessage() for r in said]
    assert 1 <= sum("heartbeats still fail" in r.getMessage() for r in said) <= 5, [r.getMessage() for r in said]
    assert sum("heartbeats work again" in r.getMessage() for r in said) == 1, [r.getMessage() for r in said]
    assert len(said) <= 7, [r.getMessage() for r in said]


async def test_frames_and_checkpoints_failing_in_a_store_outage_log_one_traceback_each(
        queue, tiny_models, monkeypatch, caplog):
    """Every frame's publish (and checkpoint save) fails while the store refuses writes: one traceback
    each, not one per frame of every job, and a line when they work again."""
    real_publish, real_save = queue.publish, queue.save_checkpoint
    failing, refused = False, 0

    async def publish(event, lease_id=None):
        nonlocal refused
        if failing and event.kind == EventKind.PROGRESS:
            refused += 1
            raise OSError("database or disk is full")
        return await real_publish(event, lease_id)

    async def save_checkpoint(checkpoint, lease_id=None):
        if failing:
            raise OSError("database or disk is full")
        return await real_save(checkpoint, lease_id)

    monkeypatch.setattr(queue, "publish", publish)
    monkeypatch.setattr(queue, "save_checkpoint", save_checkpoint)
    caplog.set_level(logging.INFO, logger="engine.worker")
    async with Worker(queue, lambda: tiny_models, worker_id="w1", max_batch=3, heartbeat_every=0.2,
                      checkpoint_every=0):
        jobs = [await queue.submit(spec(iterations=100_000, frame_every=2)) for _ in range(3)]
        for job in jobs:
            await wait_state(queue, job.id, {JobState.RUNNING})
        caplog.clear()
        failing = True
        while refused < 20:
            await asyncio.sleep(0.05)
        failing = False
        await _until_logged(caplog, "frame publishes work again")
        await _until_logged(caplog, "checkpoint saves work again")
        for job in jobs:
            await queue.cancel(job.id)
    said = [r for r in caplog.records if r.levelno >= logging.WARNING]
    frames = [r for r in said if "frame" in r.getMessage()]
    checkpoints = [r for r in said if "checkpoint" in r.getMessage()]
    assert len([r for r in frames if r.exc_info]) == 1, [r.getMessage() for r in frames]
    assert sum("frame publishes work again" in r.getMessage() for r in frames) == 1, [r.getMessage() for r in frames]
    assert len([r for r in checkpoints if r.exc_info]) == 1, [r.getMessage() for r in checkpoints]
    assert sum("checkpoint saves work again" in r.getMessage() for r in checkpoints) == 1
