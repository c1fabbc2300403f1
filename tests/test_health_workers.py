"""The bot's view of the GPU workers and of the whole store, over real HTTP, when the workers are
not inside the bot (`--no-worker`, as in compose): /healthz's advisory `workers` check,
`imagine_workers_alive`, and `imagine_queue_jobs{state}`.

A "remote" worker here is a real `engine.worker.Worker` on the tiny models with its own queue
object on the same SQLite file / Redis prefix: it shares nothing with the bot but the store, as an
`imagine-worker` process would. Both backends run (a throwaway redis-server for Redis)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import aiohttp
import pytest

from bot.launcher import MIN_WORKER_WINDOW, make_bot, open_resources, worker_window
from engine.jobs import JobSpec
from engine.observability import Observability, bound_port
from tests.fakediscord import FakeDiscord, running_bot
from tests.queue_fixtures import QueueFactory, queue_factory, redis_server  # noqa: F401 - fixtures
from tests.test_bot_support import Harness, test_config
from tests.metrics_support import get, samples, value
from tests.test_ops import WorkerProcess

LEASE = 2   # seconds: the liveness window is then MIN_WORKER_WINDOW (two leases would be 4 s)
# What a GPU worker's process exports and a bot without a worker must not (names as on /metrics).
WORKER_METRICS = ("imagine_gpu_thread_alive", "imagine_jobs_running", "imagine_jobs_total", "imagine_iterations_total",
                  "imagine_job_latency_seconds", "imagine_gpu_memory_allocated_bytes",
                  "imagine_gpu_memory_reserved_bytes")


async def health(http: aiohttp.ClientSession, base: str) -> tuple[int, dict]:
    code, body = await get(http, f"{base}/healthz")
    return code, json.loads(body)


async def metrics(http: aiohttp.ClientSession, base: str) -> dict:
    code, text = await get(http, f"{base}/metrics")
    assert code == 200
    return samples(text)


async def wait_workers_check(http: aiohttp.ClientSession, base: str, ok: bool, timeout: float) -> tuple[int, dict]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        code, report = await health(http, base)
        if report["checks"]["workers"]["ok"] is ok:
            return code, report
        assert loop.time() < deadline, f"the workers check did not turn {ok} within {timeout} s: {report}"
        await asyncio.sleep(0.2)


def queue_url(factory: QueueFactory) -> str:
    if factory.kind == "sqlite":
        return f"sqlite:///{factory.target}?lease={LEASE}"
    return f"{factory.target}?prefix={factory.defaults['prefix']}&lease={LEASE}"


async def bot_without_a_worker(stack: contextlib.AsyncExitStack, config) -> tuple[FakeDiscord, Any, Any, str,
                                                                                   aiohttp.ClientSession]:
    """A bot on `config`'s store with no embedded worker, against a fake Discord, its HTTP port
    open, all closed by `stack`: (the fake Discord, its resources, the bot, its base URL, a client)."""
    fd = await FakeDiscord().start()
    stack.push_async_callback(fd.close)
    resources = await stack.enter_async_context(open_resources(config, http_port=0))
    bot = make_bot(resources)
    await stack.enter_async_context(running_bot(fd, bot))
    http = await stack.enter_async_context(aiohttp.ClientSession())
    return fd, resources, bot, f"http://127.0.0.1:{resources.http_port}", http


def spec(user_id: int, n: int) -> JobSpec:
    return JobSpec(prompt=f"a lighthouse number {n}", user_id=user_id, channel_id=1, grid=8, iterations=4,
                   frame_every=2, cutn=2, seed=n)


@pytest.mark.asyncio
async def test_a_bot_without_an_embedded_worker_reports_whether_any_gpu_worker_is_alive(
        queue_factory, tmp_path, tiny_models):
    """No worker: /healthz stays 200 (the bot still takes commands; advisory check) but says so in
    its `workers` check and in "degraded", and imagine_workers_alive is 0 while the line grows.
    A worker starts: alive 1, listed by id. It stops cleanly: reported gone at once."""
    from engine.queue import open_queue
    from engine.worker import Worker

    url = queue_url(queue_factory)
    config = test_config(tmp_path, queue={"url": url}, worker={"embedded": False})
    async with contextlib.AsyncExitStack() as stack:
        fd, resources, bot, base, http = await bot_without_a_worker(stack, config)
        assert resources.worker is None
        assert worker_window(resources.queue) == MIN_WORKER_WINDOW
        await bot.tree.sync(guild=None)

        code, report = await health(http, base)
        assert code == 200 and report["ok"] is True, report
        assert report["degraded"] == ["workers"]
        workers = report["checks"]["workers"]
        assert (workers["ok"], workers["alive"], workers["workers"]) == (False, 0, [])
        assert f"no GPU worker claimed, heartbeated or announced itself in the last {MIN_WORKER_WINDOW:g} s" in workers["error"]
        assert report["checks"]["discord"]["ok"] is True and report["checks"]["queue"] == {"ok": True}

        # Users queue jobs; nobody runs them: the line grows, and /metrics says so.
        h = Harness(fd=fd, config=config, models=tiny_models, resources=resources, bot=bot)
        jobs = []
        for user in (None, fd.admin_user):   # two people: each job is first in line for its user
            inter = await h.imagine("a lighthouse in the fog", user=user)
            jobs.append(h.job_id(await h.reply_of(inter)))
        m = await metrics(http, base)
        assert value(m, "imagine_workers_alive") == 0
        assert value(m, "imagine_queue_jobs", state="queued") == 2
        assert value(m, "imagine_queue_jobs", state="running") == 0
        assert value(m, "imagine_queue_jobs", state="undelivered") == 0

        # A GPU worker elsewhere (its own connection to the store) comes up and runs them.
        worker_queue = open_queue(url)
        await worker_queue.start()
        stack.push_async_callback(worker_queue.close)
        worker = Worker(worker_queue, lambda: tiny_models, worker_id="gpu-elsewhere", max_batch=1,
                        poll_every=0.05, heartbeat_every=0.2)
        await worker.start()
        try:
            code, report = await wait_workers_check(http, base, True, timeout=10)
            assert code == 200 and "degraded" not in report
            assert report["checks"]["workers"] == {"ok": True, "alive": 1, "workers": ["gpu-elsewhere"]}
            for job_id in jobs:
                await h.wait_delivered(job_id)
            m = await metrics(http, base)
            assert value(m, "imagine_workers_alive") == 1
            assert value(m, "imagine_queue_jobs", state="queued") == 0
            assert value(m, "imagine_queue_jobs", state="running") == 0
            assert value(m, "imagine_queue_jobs", state="undelivered") == 0
        finally:
            await worker.stop()

        # It stopped cleanly: it left the registry, so it is reported gone at once, not after the
        # window (a worker killed without stopping is, having no claim nor heartbeat since).
        code, report = await health(http, base)
        assert code == 200 and report["degraded"] == ["workers"], report
        assert report["checks"]["workers"]["alive"] == 0
        assert value(await metrics(http, base), "imagine_workers_alive") == 0
        fd.assert_clean()


@pytest.mark.asyncio
async def test_only_the_bot_exports_workers_alive_and_the_store_gauges_not_an_imagine_worker_process(
        queue_factory, tmp_path, tiny_model_files):
    """The README's scrape config scrapes the bot and every worker, and its alert reads
    `imagine_workers_alive == 0 and on() imagine_queue_jobs{state="queued"} > 0`. So a real
    `imagine-worker` process on the bot's store must not export imagine_workers_alive at all (a 0
    there fired that alert on every worker target), nor the store's gauges the bot alone tracks;
    the bot's /metrics counts that worker."""
    url = queue_url(queue_factory)
    config = test_config(tmp_path, queue={"url": url}, worker={"embedded": False})
    async with contextlib.AsyncExitStack() as stack:
        fd, _, _, bot_base, http = await bot_without_a_worker(stack, config)
        worker = WorkerProcess(url, tiny_model_files, tmp_path / "worker.log")
        stack.push_async_callback(asyncio.to_thread, worker.stop)
        await asyncio.to_thread(worker.wait_ready)

        try:   # it claims once its models have loaded (seconds; more on a busy machine)
            code, report = await wait_workers_check(http, bot_base, True, timeout=90)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nthe worker's log:\n{worker.log()}") from None
        assert report["checks"]["workers"]["workers"] == ["ops-test"], worker.log()
        m = await metrics(http, bot_base)
        assert value(m, "imagine_workers_alive") == 1
        assert value(m, "imagine_queue_jobs", state="queued") == 0
        assert value(m, "imagine_kept_state_bytes") == 0

        code, text = await get(http, f"{worker.base}/metrics")
        assert code == 200
        for name in ("imagine_workers_alive", "imagine_queue_jobs", "imagine_kept_state_bytes"):
            assert name not in text, f"a worker exports {name}:\n{text}"
        m = samples(text)   # its own view of the queue stays
        assert value(m, "imagine_queue_length") == 0 and value(m, "imagine_queue_up") == 1
        assert value(m, "imagine_gpu_thread_alive") == 1
        fd.assert_clean()


@pytest.mark.asyncio
async def test_only_a_process_that_runs_a_gpu_worker_exports_the_worker_metrics(queue_factory, tmp_path, tiny_models):
    """imagine_gpu_thread_alive, imagine_jobs_running and the job, iteration, latency and GPU memory
    metrics describe a GPU worker: a bot without one must not export them at all (its 0 fired
    `imagine_gpu_thread_alive == 0` on every such bot). A bot with its embedded worker, on the same
    store, exports them with their real values while it runs a job, and the other bot counts it."""
    url = queue_url(queue_factory)
    async with contextlib.AsyncExitStack() as stack:
        _, _, _, bot_base, http = await bot_without_a_worker(
            stack, test_config(tmp_path, queue={"url": url}, worker={"embedded": False}))
        code, text = await get(http, f"{bot_base}/metrics")
        assert code == 200
        for name in WORKER_METRICS:
            assert name not in text, f"a bot without a worker exports {name}:\n{text}"
        m = samples(text)   # the bot's own side stays
        assert value(m, "imagine_workers_alive") == 0 and value(m, "imagine_queue_up") == 1
        assert value(m, "imagine_discord_shard_connected", shard="0") == 1

        embedded = await stack.enter_async_context(open_resources(
            test_config(tmp_path, queue={"url": url}), models_loader=lambda: tiny_models, http_port=0,
            worker_options={"poll_every": 0.05, "heartbeat_every": 0.2}))
        assert embedded.worker is not None
        await embedded.queue.submit(JobSpec(prompt="a slow lighthouse", user_id=7, channel_id=1, grid=8,
                                            iterations=100_000, frame_every=50, cutn=2, seed=1))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while True:   # the embedded worker claims it and steps it (hours at this pace)
            m = await metrics(http, f"http://127.0.0.1:{embedded.http_port}")
            if value(m, "imagine_jobs_running") == 1 and value(m, "imagine_iterations_total"):
                break
            assert loop.time() < deadline, f"the embedded worker did not run the job: {m}"
            await asyncio.sleep(0.1)
        assert value(m, "imagine_gpu_thread_alive") == 1
        assert value(m, "imagine_jobs_total", state="started") == 1
        assert value(m, "imagine_job_latency_seconds_count") == 0

        code, text = await get(http, f"{bot_base}/metrics")
        assert code == 200 and value(samples(text), "imagine_workers_alive") == 1
        for name in WORKER_METRICS:   # that worker is in another process: its metrics are there
            assert name not in text, f"a bot without a worker exports {name}:\n{text}"


@pytest.mark.asyncio
async def test_store_gauges_count_queued_running_and_undelivered_jobs_of_every_process(queue_factory):
    """imagine_queue_jobs{state} is read from the store at each scrape, so it counts what other
    processes did: here two other queue objects (a "bot" that submits, a "worker" that claims and
    finishes), and the scraped process did nothing itself."""
    scraped, submitter, claimer = [await queue_factory.open(lease=LEASE) for _ in range(3)]
    obs = Observability()
    obs.track_queue(scraped)
    obs.track_store(scraped)
    obs.track_workers(scraped, within=MIN_WORKER_WINDOW)
    runner = await obs.start_http("127.0.0.1", 0)
    try:
        async with aiohttp.ClientSession() as http:
            base = f"http://127.0.0.1:{bound_port(runner)}"
            m = await metrics(http, base)
            assert [value(m, "imagine_queue_jobs", state=s) for s in ("queued", "running", "undelivered")] == [0, 0, 0]
            assert value(m, "imagine_kept_state_bytes") == 0
            assert value(m, "imagine_workers_alive") == 0

            for n, user in enumerate((1, 2, 3, 3)):
                await submitter.submit(spec(user, n))
            first = await claimer.claim("w1")
            second = await claimer.claim("w1")
            assert first is not None and second is not None and first.lease_id and second.lease_id
            assert await claimer.put_artifact(first.id, "state.pt", b"s" * 1000, first.lease_id)
            assert await claimer.finish(first.id, first.lease_id, 0.5)

            m = await metrics(http, base)
            assert value(m, "imagine_queue_jobs", state="queued") == 2
            assert value(m, "imagine_queue_jobs", state="running") == 1
            assert value(m, "imagine_queue_jobs", state="undelivered") == 1
            assert value(m, "imagine_kept_state_bytes") == 1000   # the kept state (keep_state_gib's measure)
            assert value(m, "imagine_queue_length") == 2
            assert value(m, "imagine_workers_alive") == 1
            # Not the counter of a worker's own transitions: a process that runs none has no such series.
            assert value(m, "imagine_jobs_total", state="done") is None

            assert await submitter.mark_delivered(first.id)
            m = await metrics(http, base)
            assert value(m, "imagine_queue_jobs", state="undelivered") == 0
    finally:
        await runner.cleanup()
