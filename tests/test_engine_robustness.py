"""The engine under conditions that really happen: cancelled writes, a store that refuses a write,
a state from another device type, a mistyped queue path, a long-lived workers table."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from dataclasses import replace

import pytest
import torch

from engine.generate import GenerationSettings, Slot, encode_targets
from engine.jobs import Checkpoint, JobSpec, JobState
from engine.queue import open_queue
from engine.queue.sqlite import SQLiteJobQueue
from engine.worker import Worker, pack_checkpoint
from tests.test_worker import wait_state

S = GenerationSettings(iterations=6, frame_every=2, grid=4, cutn=1, seed=3)


def spec(**kw) -> JobSpec:
    return JobSpec(prompt="a red house", user_id=1, channel_id=10, grid=kw.pop("grid", 4),
                   iterations=kw.pop("iterations", 6), frame_every=kw.pop("frame_every", 2),
                   cutn=kw.pop("cutn", 1), seed=kw.pop("seed", 1), **kw)


def other_process_can_write(path) -> bool:
    """Whether another connection (another process, as far as SQLite's locks go) gets the write lock."""
    conn = sqlite3.connect(str(path), isolation_level=None, timeout=0.5)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("ROLLBACK")
        return True
    except sqlite3.OperationalError:
        return False
    finally:
        conn.close()


# --- 1. a cancelled write leaves no transaction open ---------------------------------------------


@pytest.mark.parametrize("turns", [1, 2, 3])
async def test_a_write_cancelled_a_loop_turn_in_leaves_the_queue_writable(tmp_path, turns):
    """Worker.stop() cancels its heartbeat loop, maybe inside heartbeat(): the transaction begun on
    aiosqlite's thread is rolled back, for this queue object and for every other process."""
    path = tmp_path / "q.db"
    q = SQLiteJobQueue(path, busy_timeout=1)
    await q.start()
    try:
        for i in range(5):
            task = asyncio.create_task(q.set_setting("x", i))
            for _ in range(turns):
                await asyncio.sleep(0)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await q.set_setting("y", i)                          # this object still writes
            assert await q.get_setting("y") == i
            assert other_process_can_write(path)                 # and holds no lock
        job = await q.submit(spec())
        assert (await q.get(job.id)).state == JobState.QUEUED
    finally:
        await q.close()


async def test_a_write_cancelled_while_another_process_holds_the_lock_leaves_nothing_open(tmp_path):
    """The write waits at BEGIN IMMEDIATE for another process's lock (a big checkpoint) and is
    cancelled there; once the other process commits, both can write again."""
    path = tmp_path / "q.db"
    q = SQLiteJobQueue(path, busy_timeout=5)
    await q.start()
    other = sqlite3.connect(str(path), isolation_level=None, timeout=0.1)
    try:
        other.execute("BEGIN IMMEDIATE")
        task = asyncio.create_task(q.set_setting("x", 1))
        await asyncio.sleep(0.2)
        task.cancel()
        other.execute("COMMIT")
        await asyncio.gather(task, return_exceptions=True)
        await q.submit(spec())
        assert await q.count_queued() == 1
        assert other_process_can_write(path)
    finally:
        other.close()
        await q.close()


async def test_a_transaction_left_open_on_the_connection_is_rolled_back_by_the_next_write(tmp_path):
    path = tmp_path / "q.db"
    q = SQLiteJobQueue(path, busy_timeout=1)
    await q.start()
    try:
        await q._db.execute("BEGIN IMMEDIATE")     # whatever left it open
        await q._db.execute("INSERT INTO settings(key, value) VALUES ('stray', '1')")
        await q.set_setting("y", 2)
        assert await q.get_setting("y") == 2 and await q.get_setting("stray") is None
        assert other_process_can_write(path)
    finally:
        await q.close()


# --- 2. failing frame / checkpoint writes are logged ---------------------------------------------


async def _run_with_trigger(tmp_path, tiny_models, caplog, trigger_sql):
    path = tmp_path / "q.db"
    q = SQLiteJobQueue(path)
    await q.start()
    conn = sqlite3.connect(str(path), isolation_level=None)
    conn.execute(trigger_sql)      # a real write failure in the store, for that table only
    conn.close()
    caplog.set_level(logging.DEBUG, logger="engine.worker")
    try:
        async with Worker(q, lambda: tiny_models, worker_id="w1", checkpoint_every=0):
            job = await q.submit(spec(iterations=6, frame_every=2))
            record = await wait_state(q, job.id, {JobState.DONE, JobState.FAILED})
    finally:
        await q.close()
    return job, record


async def test_a_checkpoint_the_store_refuses_is_logged_once_per_failure(tmp_path, tiny_models, caplog):
    job, record = await _run_with_trigger(
        tmp_path, tiny_models, caplog,
        "CREATE TRIGGER no_room BEFORE INSERT ON checkpoints BEGIN SELECT RAISE(ABORT, 'disk full'); END")
    assert record.state == JobState.DONE           # the job runs on
    logged = [r for r in caplog.records if job.id in r.getMessage() and "checkpoint" in r.getMessage()]
    # checkpoint_every=0: one at frames 2 and 4 (frame 0 has none, 6 is the end): two failures, two
    # lines: the first a WARNING with its traceback, the next (within a minute: engine.outage) DEBUG.
    assert len(logged) == 2, [r.getMessage() for r in caplog.records]
    _said_as_an_outage(logged, "disk full")


def _said_as_an_outage(logged, why: str) -> None:
    first, *rest = logged
    assert first.levelno == logging.WARNING and first.exc_info and why in str(first.exc_info[1]), first.getMessage()
    assert all(r.levelno == logging.DEBUG and why in r.getMessage() for r in rest), [r.getMessage() for r in rest]


async def test_a_frame_the_store_refuses_to_publish_is_logged(tmp_path, tiny_models, caplog):
    job, record = await _run_with_trigger(
        tmp_path, tiny_models, caplog,
        "CREATE TRIGGER no_frames BEFORE INSERT ON events WHEN NEW.kind = 'progress'"
        " BEGIN SELECT RAISE(ABORT, 'no frames today'); END")
    assert record.state == JobState.DONE
    logged = [r for r in caplog.records if job.id in r.getMessage() and "frame" in r.getMessage()]
    assert len(logged) == 4, [r.getMessage() for r in caplog.records]   # frames 0, 2, 4, 6
    _said_as_an_outage(logged, "no frames today")


# --- 3. the Slot refuses a batch and resumes a state from another device type --------------------


def test_initial_logits_of_a_batch_are_refused(tiny_models):
    targets = encode_targets(tiny_models, "a cat")
    logits = torch.zeros(2, tiny_models.vocab_size, S.grid, S.grid)
    with pytest.raises(ValueError, match=r"initial logits \(2, "):
        Slot("x", tiny_models, targets, S, init_logits=logits)
    with pytest.raises(ValueError, match="initial logits"):
        Slot("x", tiny_models, targets, S, init_logits=logits[0])       # no batch dimension


def _cuda_state(tiny_models) -> dict:
    """A Slot state as a CUDA worker writes it: its generator state is CUDA's (seed, offset): 16 bytes."""
    targets = encode_targets(tiny_models, "a cat")
    slot = Slot("x", tiny_models, targets, S)
    slot.iteration = 4
    state = slot.state()
    cuda_like = torch.tensor([7, 0, 0, 0, 0, 0, 0, 0, 12, 0, 0, 0, 0, 0, 0, 0], dtype=torch.uint8)
    return dict(state, generator=cuda_like)


def test_a_state_from_a_cuda_worker_resumes_on_a_cpu_one_with_new_noise(tiny_models, caplog):
    state = _cuda_state(tiny_models)
    targets = encode_targets(tiny_models, "a cat")
    caplog.set_level(logging.WARNING, logger="engine.generate")
    one = Slot("a", tiny_models, targets, S, checkpoint=state)
    two = Slot("b", tiny_models, targets, S, checkpoint=state)
    assert one.iteration == 4 and torch.equal(one.logits.detach(), state["logits"])
    assert one.reseeded_from == "CUDA"
    # deterministic: the same state resumes the same way wherever it lands
    assert torch.equal(one.generator.get_state(), two.generator.get_state())
    assert any("CUDA" in r.getMessage() and "different noise" in r.getMessage() for r in caplog.records)
    # and a state from this device type is taken exactly, as before
    same = Slot("c", tiny_models, targets, S, checkpoint=one.state())
    assert same.reseeded_from is None and torch.equal(same.generator.get_state(), one.generator.get_state())


def test_a_generator_state_of_no_known_device_is_refused_clearly(tiny_models):
    targets = encode_targets(tiny_models, "a cat")
    state = dict(_cuda_state(tiny_models), generator=torch.zeros(3, dtype=torch.float32))
    with pytest.raises(ValueError, match="random generator"):
        Slot("x", tiny_models, targets, S, checkpoint=state)


async def test_a_checkpoint_from_a_cuda_worker_resumes_on_a_cpu_worker(tmp_path, tiny_models):
    q = SQLiteJobQueue(tmp_path / "q.db")
    await q.start()
    try:
        job = await q.submit(spec(iterations=8, frame_every=2, grid=4))
        settings = replace(S, iterations=8, seed=1)
        targets = encode_targets(tiny_models, "a red house")
        slot = Slot("x", tiny_models, targets, settings)
        slot.iteration = 4
        state = dict(slot.state(), generator=torch.zeros(16, dtype=torch.uint8))
        await q.save_checkpoint(Checkpoint(job.id, 4, pack_checkpoint(state, [])))
        async with Worker(q, lambda: tiny_models, worker_id="cpu-worker"):
            record = await wait_state(q, job.id, {JobState.DONE, JobState.FAILED})
        assert record.state == JobState.DONE and record.attempts == 1, record.error
    finally:
        await q.close()


# --- 4. a mistyped SQLite path is refused, the file used is logged -------------------------------


async def test_a_queue_in_a_missing_directory_is_refused_with_its_path(tmp_path):
    missing = tmp_path / "no-such-dir" / "x.db"
    q = open_queue(f"sqlite:///{missing}")
    with pytest.raises(ValueError, match=str(missing.parent)):
        await q.start()
    assert not missing.parent.exists()
    await q.close()


async def test_the_queue_file_is_logged_with_its_absolute_path(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.INFO, logger="engine.queue.sqlite")
    for fresh in (True, False):
        caplog.clear()
        q = open_queue("sqlite:///rel.db")
        await q.start()
        await q.close()
        lines = [r.getMessage() for r in caplog.records if str(tmp_path / "rel.db") in r.getMessage()]
        assert len(lines) == 1 and ("new" in lines[0]) == fresh, lines


# --- 5. the workers table is pruned ----------------------------------------------------------------


async def test_prune_forgets_workers_not_seen_for_long(tmp_path):
    q = SQLiteJobQueue(tmp_path / "q.db")
    await q.start()
    try:
        await q.claim("old-worker")
        await q.claim("live-worker")
        await q._db.execute("UPDATE workers SET last_seen = ? WHERE worker_id = 'old-worker'",
                            (time.time() - 10 * 86400,))
        assert set(await q.workers(max_age=30 * 86400)) == {"old-worker", "live-worker"}
        await q.prune(older_than=7 * 86400)
        assert set(await q.workers(max_age=30 * 86400)) == {"live-worker"}
    finally:
        await q.close()


def test_a_damaged_state_is_refused_with_a_value_error_whatever_its_damage(tiny_models):
    """`check_state` (where a checkpoint is read: a ValueError there makes it damaged, and the
    job starts over) refuses a state of any malformed structure with ValueError, never the
    AttributeError / TypeError of reading it, and takes what `Slot.state()` writes."""
    import copy

    from engine.generate import BatchRunner, check_state

    runner = BatchRunner(tiny_models)
    slot = runner.add(Slot("x", tiny_models, encode_targets(tiny_models, "a cat"), S))
    runner.step()
    good = slot.state()
    shape = tuple(slot.logits.shape)
    assert check_state(copy.deepcopy(good), shape)["iteration"] == 1

    def damaged(mutate):
        state = copy.deepcopy(good)
        mutate(state)
        return state

    cases = {
        "not a dict": [good],
        "per-parameter state an int": damaged(lambda s: s["optimizer"]["state"].__setitem__(0, 5)),
        "per-parameter state a list": damaged(lambda s: s["optimizer"]["state"].__setitem__(0, [1])),
        "params nested": damaged(lambda s: s["optimizer"]["param_groups"][0].__setitem__("params", [[0]])),
        "param_groups an int": damaged(lambda s: s["optimizer"].__setitem__("param_groups", 5)),
        "param_groups empty": damaged(lambda s: s["optimizer"].__setitem__("param_groups", [])),
        "a state for another parameter": damaged(lambda s: s["optimizer"].__setitem__(
            "state", {7: s["optimizer"]["state"][0]})),
        "logits a list": damaged(lambda s: s.__setitem__("logits", [0.0])),
        "iteration a float": damaged(lambda s: s.__setitem__("iteration", 1.5)),
        "no generator": damaged(lambda s: s.pop("generator")),
        "moments of ints": damaged(lambda s: s["optimizer"]["state"][0].__setitem__(
            "exp_avg", torch.zeros(shape, dtype=torch.int32))),
    }
    for name, state in cases.items():
        with pytest.raises(ValueError):
            check_state(state, shape)
        print("refused:", name)
