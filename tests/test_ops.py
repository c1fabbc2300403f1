"""Operations: /healthz and /metrics of a real `imagine-worker` process, its log lines, and the
container files (Dockerfile through hadolint, compose.yaml through `docker compose config`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from engine.jobs import JobSpec, JobState
from engine.observability import Observability, bound_port, queue_check
from tests.metrics_support import get, samples, value

try:
    from queue_fixtures import start_redis
except ImportError:  # pragma: no cover - run from another rootdir
    from tests.queue_fixtures import start_redis

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SECRET_PROMPT = "a lighthouse made of xyzzy-quartz"


# --- helpers ---------------------------------------------------------------------------------------


def tool(name: str) -> str:
    """A linter binary from the venv (installed by the test extras) or PATH; fail when absent."""
    path = BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed (pip install '.[test]' brings it)")
    return found


class WorkerProcess:
    """`imagine-worker` as an operator runs it, with the tiny models, an HTTP port chosen by the OS."""

    def __init__(self, queue_url: str, files, log_path: Path, url_in_env: bool = False, *,
                 clip_model: str | None = None, cache_dir: Path | None = None, env: dict[str, str] | None = None,
                 prelude: str = ""):
        exe = BIN / "imagine-worker"
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "engine.worker"]
        if prelude:   # Python run first in the worker's process (a test's stand-in for the models' load)
            cmd = [sys.executable, "-c",
                   prelude + "\nimport sys; from engine.worker import main; sys.exit(main(sys.argv[1:]))"]
        # url_in_env: the queue URL (where a Redis password would be) only in IMAGINE_QUEUE_URL
        cmd += [] if url_in_env else ["--queue", queue_url]
        cmd += ["--clip-model", clip_model or str(files.clip_torchscript),
                "--decoder", str(files.decoder_pickle), "--trust-decoder", "--device", "cpu",
                "--encoder", "",   # none: the default, openai's, is a download
                "--cache-dir", str(cache_dir or files.cache_dir), "--worker-id", "ops-test",
                "--http-port", "0", "--log-level", "INFO"]
        env = {**{k: v for k, v in os.environ.items() if k != "IMAGINE_QUEUE_URL"}, **(env or {})}
        if url_in_env:
            env["IMAGINE_QUEUE_URL"] = queue_url
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        self.base = ""

    def wait_ready(self) -> "WorkerProcess":
        self.base = self._wait_for_port()
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _wait_for_port(self, timeout: float = 90.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(r"health and metrics on (http://127\.0\.0\.1:\d+)", self.log())
            if m:
                return m.group(1)
            if self.proc.poll() is not None:
                raise AssertionError(f"imagine-worker exited with {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.05)
        raise AssertionError(f"imagine-worker never served HTTP:\n{self.log()}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode


async def wait_health(session, base: str, status: int, timeout: float = 60.0) -> dict:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        code, body = await get(session, f"{base}/healthz")
        if code == status:
            return json.loads(body)
        if loop.time() > deadline:
            raise AssertionError(f"/healthz stayed {code}: {body}")
        await asyncio.sleep(0.1)


# --- a real imagine-worker ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workers(tmp_path_factory, tiny_model_files):
    """Two `imagine-worker` processes started together (importing torch takes seconds each): one on a
    SQLite queue, one on a throwaway redis-server that a test may kill."""
    root = tmp_path_factory.mktemp("ops")
    redis = start_redis()
    sqlite_url = f"sqlite:///{root}/jobs.db"
    procs = {
        "sqlite": WorkerProcess(sqlite_url, tiny_model_files, root / "sqlite-worker.log"),
        "redis": WorkerProcess(f"{redis.url}?prefix=ops&socket_timeout=1", tiny_model_files,
                               root / "redis-worker.log", url_in_env=True),
    }
    try:
        for proc in procs.values():
            proc.wait_ready()
        yield {"sqlite_url": sqlite_url, "redis": redis, "sqlite_worker": procs["sqlite"],
               "redis_worker": procs["redis"]}
    finally:
        redis.stop()
        for proc in procs.values():
            proc.stop()


async def test_worker_health_and_metrics_move_with_a_job(workers):
    from engine.queue import open_queue

    queue = open_queue(workers["sqlite_url"])
    await queue.start()
    worker = workers["sqlite_worker"]
    try:
        async with aiohttp.ClientSession() as http:
            health = await wait_health(http, worker.base, 200)
            assert health == {"ok": True, "checks": {"queue": {"ok": True}, "gpu": {"ok": True}}}

            code, text = await get(http, f"{worker.base}/metrics")
            assert code == 200
            before = samples(text)
            assert value(before, "imagine_iterations_total") == 0
            assert value(before, "imagine_jobs_total", state="done") == 0
            assert value(before, "imagine_job_latency_seconds_count") == 0
            assert value(before, "imagine_gpu_thread_alive") == 1
            assert not any(name.startswith("imagine_gpu_memory") for name, _ in before)  # a CPU: absent

            job = await queue.submit(JobSpec(prompt=SECRET_PROMPT, user_id=7, channel_id=1, grid=8,
                                             iterations=4, frame_every=2, cutn=2, seed=1))
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60
            while (record := await queue.get(job.id)).state != JobState.DONE:
                assert not record.state.finished, f"job ended {record.state}: {record.error}"
                assert loop.time() < deadline, "the job did not finish"
                await asyncio.sleep(0.1)

            # The worker counts a job's end just after the store has it DONE: wait for that count.
            while True:
                code, text = await get(http, f"{worker.base}/metrics")
                after = samples(text)
                if value(after, "imagine_jobs_total", state="done") or loop.time() > deadline:
                    break
                await asyncio.sleep(0.05)
            assert value(after, "imagine_iterations_total") == 4
            assert value(after, "imagine_jobs_total", state="started") == 1
            assert value(after, "imagine_jobs_total", state="done") == 1
            assert value(after, "imagine_jobs_total", state="failed") == 0
            assert value(after, "imagine_job_latency_seconds_count") == 1
            assert 0 < value(after, "imagine_job_latency_seconds_sum") < 120
            assert value(after, "imagine_queue_length") == 0
            assert value(after, "imagine_jobs_running") == 0
            # No Discord client in this process: no imagine_discord_* family, not even a HELP line.
            assert "imagine_discord" not in text, text

    finally:
        rc = await asyncio.to_thread(worker.stop)
        await queue.close()
    log = worker.log()
    assert rc == 0, log
    # One INFO line per job event, with the job id; the prompt never at INFO.
    assert re.search(rf"INFO engine\.worker: job {job.id} started", log), log
    assert re.search(rf"INFO engine\.worker: job {job.id} done", log), log
    assert "xyzzy" not in log


async def test_health_is_503_when_the_queue_is_unreachable(workers):
    worker = workers["redis_worker"]
    async with aiohttp.ClientSession() as http:
        await wait_health(http, worker.base, 200)
        workers["redis"].stop()   # the queue's server is gone
        health = await wait_health(http, worker.base, 503, timeout=30)
        assert health["ok"] is False
        assert health["checks"]["queue"]["ok"] is False and health["checks"]["queue"]["error"]
        assert health["checks"]["gpu"] == {"ok": True}
        # /metrics still answers (without a fresh queue length).
        code, text = await get(http, f"{worker.base}/metrics")
        assert code == 200 and "imagine_iterations_total" in text
    assert await asyncio.to_thread(worker.stop) == 0   # and SIGTERM still stops it cleanly


# --- stop signals -----------------------------------------------------------------------------------


async def wait_until(predicate, what: str, proc: WorkerProcess, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.proc.poll() is None, f"imagine-worker exited with {proc.proc.returncode}:\n{proc.log()}"
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s:\n{proc.log()}"
        await asyncio.sleep(0.05)


async def exit_status(popen: subprocess.Popen, timeout: float) -> int | None:
    """The process's exit status, or None if it still runs after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while popen.poll() is None and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return popen.poll()


async def wait_exit(proc: WorkerProcess, timeout: float) -> int | None:
    return await exit_status(proc.proc, timeout)


async def assert_exits(popen: subprocess.Popen, log: Callable[[], str], expect: int, within: float,
                       send: signal.Signals | None = None) -> None:
    """Send `send` (if any), then assert the process exits with status `expect` within `within` seconds."""
    if send is not None:
        popen.send_signal(send)
    code = await exit_status(popen, within)
    assert code == expect, f"exit status {code} (None: still running):\n{log()}"


async def _stopped_once(worker: WorkerProcess, ready, what: str, settle: float) -> str:
    """SIGTERM to `worker` `settle` seconds after `ready()`; it must exit 0 within 15 s. Its log."""
    try:
        await wait_until(ready, what, worker)
        await asyncio.sleep(settle)
        await assert_exits(worker.proc, worker.log, 0, within=15, send=signal.SIGTERM)
    finally:
        worker.stop()
    return worker.log()


async def test_imagine_worker_stopped_while_its_models_download_exits_at_once(tmp_path, tiny_model_files):
    """A first start downloads CLIP (~340 MB; a few minutes on a slow link). SIGTERM meanwhile was not
    even logged, and the worker exited only once the download was over (the load ran on asyncio's
    executor, which asyncio.run waits for): Docker SIGKILLs 10 s after its SIGTERM. Now it says
    "stopping" and exits 0 at once, leaving the download's thread behind. The download here hangs
    on an HTTPS proxy that never answers."""
    from tests.test_bot_ops import stalled_https_proxy

    with stalled_https_proxy() as (proxy, downloading):
        worker = WorkerProcess(f"sqlite:///{tmp_path}/jobs.db", tiny_model_files, tmp_path / "worker.log",
                               clip_model="ViT-B/32", cache_dir=tmp_path / "empty-cache",
                               env={"https_proxy": proxy, "HTTPS_PROXY": proxy, "no_proxy": "127.0.0.1,localhost"})
        try:
            await wait_until(downloading, "the download to start", worker)
            await assert_exits(worker.proc, worker.log, 0, within=15, send=signal.SIGTERM)
        finally:
            worker.stop()
    log = worker.log()
    assert "worker ops-test stopping (SIGTERM)" in log and "stopped before its models were loaded" in log, log
    assert "Traceback" not in log and " started (max_batch" not in log


async def test_imagine_worker_stopped_while_its_queue_is_retried_exits_0_at_once(tmp_path, tiny_model_files):
    """A Redis that is down at start is retried for up to 30 s. SIGTERM meanwhile killed the process
    outright (and as PID 1 in a container, where SIGTERM has no default action, was ignored until
    the retries ran out), SIGINT with two tracebacks. Now the signal handlers are in place before
    the queue opens: it says so and exits 0 at once."""
    from tests.queue_fixtures import free_port

    worker = WorkerProcess(f"redis://127.0.0.1:{free_port()}/0", tiny_model_files, tmp_path / "worker.log")
    log = await _stopped_once(worker, lambda: "opening the queue" in worker.log(), "the queue to be opened",
                              settle=0.5)   # inside its retries
    assert "imagine-worker stopping (SIGTERM) before it started" in log, log
    assert "Traceback" not in log and "cannot open the queue" not in log, log


# A models' load that stays inside torch code (a stand-in for CLIP's build: minutes of torch ops on a
# slow host): matrix products, the GIL released in each, for up to 2 minutes. It touches $LOAD_MARK
# from inside its loop, once its first torch op is done: from then on the thread spends nearly all
# its time in torch ops, so a signal sent once the mark exists finds it in one.
SLOW_TORCH_LOAD = """
import os, pathlib, time, torch
def _slow_torch_load(*args, **kwargs):
    a = torch.randn(1024, 1024)
    mark = pathlib.Path(os.environ["LOAD_MARK"])
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        a = torch.mm(a, a).clamp_(-1, 1)
        if mark is not None:
            mark.touch()
            mark = None
    raise RuntimeError("the test's slow load ran out")
"""


async def test_imagine_worker_stopped_while_its_models_build_in_torch_exits_0(tmp_path, tiny_model_files):
    """The stop during the models' load leaves the load's (daemon) thread behind. Inside a torch op at
    the interpreter's exit, Python 3.11 ended it as it took the GIL back, within C++: "terminate
    called without an active exception", exit 134 (SIGABRT) instead of 0. Now the worker leaves with
    os._exit(0) when such a thread is still running."""
    mark = tmp_path / "loading"
    worker = WorkerProcess(f"sqlite:///{tmp_path}/jobs.db", tiny_model_files, tmp_path / "worker.log",
                           env={"LOAD_MARK": str(mark)},
                           prelude=SLOW_TORCH_LOAD + "import engine.models\n"
                                                     "engine.models.load_models = _slow_torch_load\n")
    log = await _stopped_once(worker, mark.exists, "the load to start", settle=0)   # inside the torch ops
    assert "stopped before its models were loaded" in log, log
    assert "terminate called" not in log and "Traceback" not in log, log


async def test_imagine_worker_says_stopping_at_once_and_a_second_signal_exits_143(tmp_path, tiny_model_files):
    """SIGTERM: "stopping" is logged at once (nothing was said until the jobs had been checkpointed,
    seconds later, or longer: here another process holds the store's write lock, so the hand-back
    waits for it). A second signal used to be ignored; now the worker exits at once with 143
    (128 + SIGTERM), handing nothing back: the job's lease runs out instead."""
    from engine.queue import open_queue
    from tests.test_bot_ops import locked_store, wait_job

    db = tmp_path / "jobs.db"
    queue = open_queue(f"sqlite:///{db}")
    await queue.start()
    worker = WorkerProcess(f"sqlite:///{db}", tiny_model_files, tmp_path / "worker.log")
    try:
        job = await queue.submit(JobSpec(prompt="a slow lighthouse", user_id=7, channel_id=1, grid=8,
                                         iterations=100_000, frame_every=50, cutn=2, seed=1))
        await wait_job(queue, job.id, JobState.RUNNING)
        with locked_store(db):
            worker.proc.send_signal(signal.SIGTERM)
            # "At once": before the checkpoint and the hand-back, which cannot be written while the lock
            # is held (the queue's busy_timeout is 30 s; the old worker said nothing until after them).
            # The time allowed is for a loaded CI machine, not a measure of promptness.
            await wait_until(lambda: "worker ops-test stopping (SIGTERM)" in worker.log(), "stopping", worker,
                             timeout=15)
            assert "(worker stopping)" not in worker.log(), worker.log()   # no checkpoint nor hand-back yet
            assert await wait_exit(worker, 2) is None, worker.log()   # the hand-back waits for the lock
            await assert_exits(worker.proc, worker.log, 143, within=10, send=signal.SIGTERM)
        assert "SIGTERM again: stopping at once (exit status 143)" in worker.log()
        assert (await queue.get(job.id)).state == JobState.RUNNING   # not handed back
    finally:
        worker.stop()
        await queue.close()


# --- the module in-process --------------------------------------------------------------------------


async def test_checks_registries_and_rate_limit_counter():
    a, b = Observability(CollectorRegistry()), Observability(CollectorRegistry(), check_timeout=0.3)
    a.export_discord_metrics()   # both are a bot's: a process with a Discord client
    b.export_discord_metrics()
    a.discord_rate_limited()
    a.discord_rate_limited(2)

    class Queue:
        async def count_queued(self) -> int:
            return 5

    async def raises() -> bool:
        raise ConnectionError("gateway closed")

    async def hangs() -> bool:
        await asyncio.sleep(10)
        return True

    async def up() -> bool:
        return True

    a.track_queue(Queue())
    runner_a = await a.start_http("127.0.0.1", 0, {"queue": queue_check(Queue()), "discord": up})
    runner_b = await b.start_http("127.0.0.1", 0, {"discord": raises, "gpu": hangs, "queue": up})
    try:
        async with aiohttp.ClientSession() as http:
            code, body = await get(http, f"http://127.0.0.1:{bound_port(runner_a)}/healthz")
            assert code == 200 and json.loads(body)["ok"] is True
            code, text = await get(http, f"http://127.0.0.1:{bound_port(runner_a)}/metrics")
            metrics = samples(text)
            assert value(metrics, "imagine_discord_rate_limited_total") == 3
            assert value(metrics, "imagine_queue_length") == 5

            code, body = await get(http, f"http://127.0.0.1:{bound_port(runner_b)}/healthz")
            report = json.loads(body)
            assert code == 503 and report["ok"] is False
            assert report["checks"]["discord"] == {"ok": False, "error": "ConnectionError: gateway closed"}
            assert report["checks"]["gpu"]["ok"] is False and "0.3 s" in report["checks"]["gpu"]["error"]
            assert report["checks"]["queue"] == {"ok": True}
            code, text = await get(http, f"http://127.0.0.1:{bound_port(runner_b)}/metrics")
            assert value(samples(text), "imagine_discord_rate_limited_total") == 0   # its own registry
    finally:
        await runner_a.cleanup()
        await runner_b.cleanup()


def test_worker_cli_http_is_off_by_default_and_the_log_masks_passwords():
    from engine.queue import redact_secrets, redact_url
    from engine.worker import _redact, build_parser

    args = build_parser().parse_args(["--queue", "sqlite:///x.db"])
    assert args.http_port is None and args.http_host == "127.0.0.1" and args.log_level == "INFO"
    assert args.device == "auto"
    assert build_parser().parse_args(["--queue", "q", "--log-level", "debug"]).log_level == "DEBUG"
    assert _redact("redis://:hunter2@redis:6379/0?prefix=x") == "redis://:***@redis:6379/0?prefix=x"
    assert _redact("redis://redis:6379/0") == "redis://redis:6379/0"
    # One masking for the worker and the bot (engine.queue), whatever the URL looks like.
    for url, shown in [("redis://user:s3cret@127.0.0.1:6379/0", "redis://user:***@127.0.0.1:6379/0"),
                       ("rediss://:p%40ss@[::1]:6380/1", "rediss://:***@[::1]:6380/1"),
                       ("redis://:raw/pass@word@host:6379/0", "redis://:***@host:6379/0"),   # malformed
                       ("redis://host:6379/0?password=s3cret&prefix=x", "redis://host:6379/0?password=***&prefix=x"),
                       ("redis://:s3cret@host:notaport/0", "redis://:***@host:notaport/0"),
                       ("sqlite:////var/lib/a@b:c.db", "sqlite:////var/lib/a@b:c.db"),
                       ("imagine.db", "imagine.db")]:
        assert redact_url(url) == shown
    error = "Error connecting to redis://user:s3cret@h:1/0 (AUTH s3cret refused)"
    assert redact_secrets(error, "redis://user:s3cret@h:1/0") == \
        "Error connecting to redis://user:***@h:1/0 (AUTH *** refused)"


def test_imagine_worker_without_a_queue_url_exits_2_naming_the_flag_and_the_variable():
    env = {k: v for k, v in os.environ.items() if k != "IMAGINE_QUEUE_URL"}
    proc = subprocess.run(_worker_cmd("--device", "cpu"), cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "--queue URL or the IMAGINE_QUEUE_URL environment variable is required" in proc.stderr


def test_imagine_worker_whose_http_port_is_taken_exits_2_with_the_reason(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(_worker_cmd("--queue", f"sqlite:///{tmp_path}/jobs.db", "--device", "cpu",
                                          "--http-port", str(port)),
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"cannot serve HTTP on 127.0.0.1:{port}" in proc.stderr and "Traceback" not in proc.stderr


def _worker_cmd(*args: str) -> list[str]:
    exe = BIN / "imagine-worker"
    return [*([str(exe)] if exe.exists() else [sys.executable, "-m", "engine.worker"]), *args]


def test_imagine_worker_with_device_auto_and_no_gpu_exits_2_before_it_touches_the_queue(tmp_path):
    """`--device auto` (the default) on a host without CUDA: a CPU worker would claim users' jobs at
    ~10 s a step, so it does not start; `--device cpu` is the explicit way (the `workers` fixture
    above runs with it). CUDA_VISIBLE_DEVICES="" hides any GPU: this host is one without CUDA."""
    db = tmp_path / "jobs.db"
    proc = subprocess.run(_worker_cmd("--queue", f"sqlite:///{db}", "--log-level", "INFO"), cwd=ROOT,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no CUDA GPU" in proc.stderr and "--device cpu" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not db.exists()   # refused before the queue was opened: nothing claimed, nothing created


# --- container files -------------------------------------------------------------------------------


def test_dockerfile_passes_hadolint_and_has_the_operational_parts():
    result = subprocess.run([tool("hadolint"), "--no-color", str(ROOT / "Dockerfile")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=pytorch/pytorch:\d+\.\d+\.\d+-cuda[\d.]+-cudnn\d+-runtime$", text, re.M)
    assert re.search(r"^USER 10001", text, re.M)                      # not root
    assert "IMAGINE_CACHE=/cache" in text and 'VOLUME ["/cache", "/data"]' in text
    assert "chown imagine:imagine /cache /data" in text   # volumes the non-root user can write
    assert "ffmpeg" in text and "pip install --no-cache-dir ." in text
    assert 'CMD ["imagine-bot", "--config", "/config/config.toml"]' in text


def test_dockerignore_keeps_secrets_out_of_the_image():
    lines = [l.strip() for l in (ROOT / ".dockerignore").read_text().splitlines()
             if l.strip() and not l.startswith("#")]
    assert lines[0] == "*"                                    # an allowlist
    assert not any(l.startswith("!") and (".env" in l or "config.toml" in l) for l in lines)
    assert "DISCORD_TOKEN=" in (ROOT / ".env.example").read_text()


def test_compose_file_is_valid_and_wires_bot_redis_and_one_worker_per_gpu(tmp_path):
    compose = tool("docker-compose")
    shutil.copy(ROOT / "compose.yaml", tmp_path / "compose.yaml")
    shutil.copy(ROOT / ".env.example", tmp_path / ".env")      # the env file must exist, as for an operator
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("COMPOSE_", "DOCKER_")) and k != "IMAGINE_QUEUE_URL"}

    def config(*args: str, profiles: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
        enabled = [a for p in profiles for a in ("--profile", p)]
        return subprocess.run([compose, "-f", str(tmp_path / "compose.yaml"), *enabled, "config", *args],
                              capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env)

    checked = config("-q")
    assert checked.returncode == 0, checked.stderr
    project = json.loads(config("--format", "json").stdout)
    services = project["services"]

    assert services["redis"]["image"].startswith("redis:")
    bot = services["bot"]
    assert bot["command"][:3] == ["imagine-bot", "--config", "/config/config.toml"]
    assert "--queue" not in bot["command"]   # the URL (maybe with a password) is in the environment
    assert bot["environment"]["IMAGINE_QUEUE_URL"] == "redis://redis:6379/0"
    assert "--no-worker" in bot["command"] and "--http-port" in bot["command"]   # no GPU in the bot's container
    assert "DISCORD_TOKEN" in bot["environment"]              # from .env at run time
    assert "deploy" not in bot                                # the bot needs no GPU
    mounts = {v["target"]: v for v in bot["volumes"]}
    assert mounts["/config/config.toml"]["read_only"] is True
    # A missing config.toml is refused at `up`, not made an empty folder of that name by Docker.
    assert mounts["/config/config.toml"]["bind"]["create_host_path"] is False

    # A one-GPU host: `docker compose up` starts worker-0 only (on GPU 0); more GPUs are profiles.
    assert sorted(name for name in services if name.startswith("worker-")) == ["worker-0"]
    assert services["worker-0"]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] == ["0"]
    two_gpus = config("--format", "json", profiles=("gpu1",))
    assert two_gpus.returncode == 0, two_gpus.stderr
    services = json.loads(two_gpus.stdout)["services"]
    workers = {name: s for name, s in services.items() if name.startswith("worker-")}
    assert sorted(workers) == ["worker-0", "worker-1"] and workers["worker-1"]["profiles"] == ["gpu1"]
    gpus = []
    for name, s in workers.items():
        assert s["command"][0] == "imagine-worker" and "--queue" not in s["command"]
        assert s["environment"]["IMAGINE_QUEUE_URL"] == "redis://redis:6379/0"
        assert "--http-port" in s["command"]
        keep = s["command"].index("--keep-days")   # finished jobs are pruned, not kept forever
        assert float(s["command"][keep + 1]) == 30
        # ...and their states kept to a budget: one user's 1-iteration jobs must not fill Redis's memory.
        budget = s["command"].index("--keep-state-gib")
        assert 0 < float(s["command"][budget + 1]) <= 64
        (device,) = s["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        gpus += device["device_ids"]
        assert "healthz" in " ".join(s["healthcheck"]["test"])
    assert len(gpus) == len(set(gpus)) == len(workers)        # one worker per GPU
    for s in [bot, *workers.values()]:
        assert any(v["source"] == "model-cache" and v["target"] == "/cache" for v in s["volumes"])
    # Only the workers write the model cache (they download and convert); the bot loads no model
    # and must not be able to change what the workers load.
    (cache_mount,) = [v for v in bot["volumes"] if v["target"] == "/cache"]
    assert cache_mount.get("read_only") is True
    for s in workers.values():
        assert not any(v["target"] == "/cache" and v.get("read_only") for v in s["volumes"])

    # The check really checks: a misspelt key fails.
    broken = (tmp_path / "compose.yaml").read_text().replace("device_ids:", "device_idz:", 1)
    (tmp_path / "compose.yaml").write_text(broken)
    assert config("-q").returncode != 0


# --- imagine-worker: settings to fix are one line and exit 2 (1 means "my GPU thread died") ----------


@pytest.mark.parametrize("args, message", [
    (["--queue", "foo://x"], "--queue: expected redis://host:6379/0"),
    (["--queue", "postgres://user:s3cret@db/x"], "'postgres://user:***@db/x'"),
    (["--queue", "redis://127.0.0.1:6379/0?lease=abc"], "?lease= in 'redis://127.0.0.1:6379/0?lease=abc' must be a number"),
    (["--queue", "sqlite:///x.db?max_attempts=0"], "?max_attempts= in"),
    (["--queue", "sqlite:///x.db?busy_timeout=nan"], "?busy_timeout= in"),
    (["--queue", "sqlite:///x.db?busy_timeout=-0.5"], "?busy_timeout= in"),
    (["--queue", "sqlite:///x.db?lease=0"], "?lease= in"),
    (["--queue", "redis://127.0.0.1:6379/0?reconnect_timeout=inf"], "?reconnect_timeout= in"),
    # redis-py reads these as no database: db 0, another deployment's queue.
    (["--queue", "redis://:s3cret@127.0.0.1:6379/abc"], "the database in 'redis://:***@127.0.0.1:6379/abc' must "
                                                        "be a number (redis://host:6379/0), got 'abc'"),
    (["--queue", "redis://127.0.0.1:6379/0/extra"], "must be a number (redis://host:6379/0), got '0/extra'"),
    (["--queue", "x.db", "--cache-dir", ""], "argument --cache-dir: --cache-dir must name a folder, not an empty string"),
    (["--queue", "x.db", "--device", "gpu"], "argument --device: expected auto, cpu, cuda or cuda:N, got 'gpu'"),
    (["--queue", "x.db", "--max-batch", "-1"], "argument --max-batch: must be at least 1"),
    (["--queue", "x.db", "--compile", "foo"], "argument --compile: compile 'foo': torch has no backend 'foo'"),
    (["--queue", "x.db", "--known-sha256", "abc"], "argument --known-sha256: expected a SHA-256 as 64 hex digits"),
    (["--queue", "x.db", "--http-port", "70000"], "argument --http-port: expected a port"),
    # 0 is no watchdog here, not "every frame" as for --checkpoint-every, whose parser it borrowed.
    (["--queue", "x.db", "--stall-timeout", "-5"], "argument --stall-timeout: must be 0 (no watchdog) or a "
                                                   "number of seconds, got -5.0"),
    (["--queue", "x.db", "--stall-timeout", "inf"], "argument --stall-timeout: must be 0 (no watchdog) or a "
                                                    "number of seconds, got inf"),
    (["--queue", "x.db", "--keep-state-gib", "-1"], "argument --keep-state-gib: must be 0 (no budget) or a "
                                                    "positive number of GiB, got -1.0"),
    (["--queue", "x.db", "--keep-state-gib", "nan"], "argument --keep-state-gib: must be 0 (no budget) or a "
                                                     "positive number of GiB, got nan"),
    (["--queue", "x.db", "--keep-state-gib", "inf"], "argument --keep-state-gib: must be 0 (no budget) or a "
                                                     "positive number of GiB, got inf"),
    # SAQ's worker registry splits its keys on ':': such a worker was never listed (/healthz: no GPU worker).
    (["--queue", "x.db", "--worker-id", "box1:gpu0"], "argument --worker-id: must not contain ':' (the worker "
                                                      "registry splits on it), got 'box1:gpu0'"),
    # A Redis address without its scheme: no SQLite file named `redis:6379` made and waited on.
    (["--queue", "redis:6379"], "--queue: 'redis:6379' looks like a Redis address: write redis://redis:6379"),
])
def test_imagine_worker_refuses_bad_settings_at_parse_time_in_one_line(args, message, tmp_path, capsys, monkeypatch):
    from engine.worker import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(args)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert "s3cret" not in err and not os.listdir(tmp_path)


def test_the_bot_refuses_a_worker_id_with_a_colon_as_imagine_worker_does(tmp_path, monkeypatch, capsys):
    """[worker] worker_id names the embedded worker in the same registry as --worker-id: refused at
    start in one line, exit 2, not found out later as a missing worker on /healthz."""
    from bot.__main__ import main as bot_main
    from bot.config import config_from_dict
    from tests.test_bot_config import GOOD_TOKEN

    cfg = tmp_path / "config.toml"
    cfg.write_text('[worker]\nworker_id = "box1:gpu0"\n')
    monkeypatch.setenv("DISCORD_TOKEN", GOOD_TOKEN)
    assert bot_main(["--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err == (f"imagine-bot: {cfg}: [worker] worker_id: must not contain ':' (the worker registry splits on it), "
                   "got 'box1:gpu0'\n")
    assert config_from_dict({"worker": {"worker_id": "box1-gpu0"}}).worker.worker_id == "box1-gpu0"


def test_imagine_worker_parses_what_it_accepts():
    from engine.worker import build_parser

    digest = "AB" * 32
    args = build_parser().parse_args(["--queue", "x.db", "--device", "cuda:1", "--max-batch", "0", "--compile", "eager",
                                      "--known-sha256", digest, "--known-sha256", "cd" * 32])
    assert args.device == "cuda:1" and args.max_batch is None and args.compile == "eager"
    assert args.known_sha256 == ["ab" * 32, "cd" * 32]
    assert args.keep_days == 30.0   # finished jobs' state.pt (48-192 MiB each) is not kept for ever
    # The dVAE encoder (init images) as the bot's embedded worker has it; '' is none.
    assert args.encoder == "openai" and build_parser().parse_args(["--queue", "x.db", "--encoder", ""]).encoder == ""
    # torch.compile: inductor on CUDA unless told otherwise (it paid on an H200), '' is off.
    assert build_parser().parse_args(["--queue", "x.db"]).compile == "auto"
    assert build_parser().parse_args(["--queue", "x.db", "--compile", ""]).compile == ""
    assert build_parser().parse_args(["--queue", "x.db", "--keep-days", "0"]).keep_days is None   # 0: never
    # The least values the queues take are taken here too (a shared IMAGINE_QUEUE_URL must start both).
    from engine.queue import check_queue_url
    assert check_queue_url("sqlite:///x.db?max_attempts=1&busy_timeout=0&lease=0.5") is None
    assert check_queue_url("redis://127.0.0.1:6379/0?max_attempts=1&reconnect_timeout=0") is None
    assert check_queue_url("redis://127.0.0.1:6379") is None and check_queue_url("redis://h:6379/") is None
    assert check_queue_url("rediss://h:6380/12") is None
    # A Redis address without its scheme was a SQLite file named `redis:6379`, silently.
    for url in ("redis:6379", "10.0.0.5:6379/0", "localhost:6379?lease=10"):
        assert check_queue_url(url) == (f"{url!r} looks like a Redis address: write redis://{url.partition('?')[0]} "
                                        f"(or sqlite:///{url} for a SQLite file of that name)"), url
    assert check_queue_url("jobs.db") is None and check_queue_url("sqlite:///redis:6379") is None
    assert check_queue_url("/var/lib/imagine/jobs.db?lease=10") is None


def test_a_queue_url_whose_password_has_a_slash_is_refused_without_quoting_it():
    """`openssl rand -base64` passwords have '/' (and '?', '#' in others): unescaped, they cut the
    URL's host part short, and the database check (or redis-py's port error) quoted the rest."""
    from engine.queue import check_queue_url, redact_secrets

    for url in ("redis://:Ab3/Kx9+QzP1mW@redis:6379/0", "redis://:Xq9?zzz@redis:6379/0", "rediss://u:Xq9#zz@h:1/0"):
        problem = check_queue_url(url)
        assert problem and "percent-encode" in problem and "Kx9" not in problem and "zz" not in problem, problem
    assert check_queue_url("redis://:Ab3%2FKx9@host:6379/0") is None
    # A piece of such a password in a library's message is masked too.
    assert "Xq9" not in redact_secrets("Port could not be cast to integer value as 'Xq9'", "redis://:Xq9?zzz@redis:6379/0")


def test_a_file_url_names_an_absolute_path_and_one_with_a_host_is_refused(tmp_path, monkeypatch):
    """file:///abs/jobs.db is /abs/jobs.db (RFC 8089), whatever the service's folder: it was opened
    as abs/jobs.db under the current folder, another queue or none."""
    from engine.queue import check_queue_url, open_queue

    monkeypatch.chdir(tmp_path)
    assert open_queue(f"file://{tmp_path}/jobs.db").path == f"{tmp_path}/jobs.db"
    queue = open_queue(f"file://localhost{tmp_path}/jobs.db?lease=5")
    assert (queue.path, queue.lease) == (f"{tmp_path}/jobs.db", 5.0)
    assert check_queue_url(f"file://{tmp_path}/jobs.db") is None
    assert check_queue_url("file://jobs.db") == ("a file URL's path is absolute: file:///abs/path.db, got "
                                                 "'file://jobs.db' (for a path relative to the current folder "
                                                 "write sqlite:///path.db)")
    with pytest.raises(ValueError, match="absolute"):
        open_queue("file://jobs.db")


def test_a_plain_sqlite_path_takes_its_options(tmp_path):
    """`imagine-worker --queue jobs.db?lease=10` beside a bot on `sqlite:///jobs.db?lease=10`: the
    options were checked, then the whole text opened as a file named `jobs.db?lease=10`."""
    from engine.queue import open_queue

    q = open_queue(f"{tmp_path}/jobs.db?lease=10&busy_timeout=2")
    assert q.path == f"{tmp_path}/jobs.db" and q.lease == 10


def _bad_model_files(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(bytes(range(256)) * 40)
    return junk


def test_imagine_worker_with_a_missing_or_junk_model_exits_2_in_one_line(tmp_path):
    junk = _bad_model_files(tmp_path)
    for clip_model, message in ((str(tmp_path / "nope.pt"), f"CLIP model '{tmp_path / 'nope.pt'}' is neither"),
                                (str(junk), f"CLIP file {junk} is corrupt or not a CLIP model (")):
        proc = subprocess.run(_worker_cmd("--queue", f"sqlite:///{tmp_path}/jobs.db", "--device", "cpu",
                                          "--clip-model", clip_model, "--cache-dir", str(tmp_path / "cache"),
                                          "--log-level", "WARNING"),
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("imagine-worker: ") and message in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and "\x1b" not in proc.stderr, proc.stderr


def test_imagine_worker_names_its_own_known_sha256_option_and_trusts_it(tiny_model_files, tmp_path):
    """The refusal of an untrusted decoder said 'or list its SHA-256 in known_sha256', an option
    imagine-worker did not have; --known-sha256 HEX trusts the file (engine.models' known_sha256)."""
    from engine.models import sha256_of
    from engine.worker import TRUST_HINT_WORKER

    f = tiny_model_files
    base = ["--queue", f"sqlite:///{tmp_path}/jobs.db", "--device", "cpu", "--clip-model", str(f.clip_state_dict),
            "--decoder", str(f.decoder_pickle), "--cache-dir", str(tmp_path / "cache"), "--log-level", "WARNING"]
    proc = subprocess.run(_worker_cmd(*base), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "refusing to unpickle" in proc.stderr and "--known-sha256" in proc.stderr
    assert "[worker]" not in proc.stderr

    from engine.models import load_dvae

    decoder = load_dvae("decoder", str(f.decoder_pickle), cache_dir=tmp_path / "cache2",
                        known_sha256={sha256_of(f.decoder_pickle)}, trust_hint=TRUST_HINT_WORKER)
    assert decoder.vocab_size == 8192


def test_the_download_advice_names_no_setting_the_caller_lacks(tmp_path, monkeypatch):
    """A decoder that cannot be downloaded: the advice for one placed by hand is the caller's own
    trust hint, not the bot's config key for everyone."""
    import engine.models as m

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(m.urllib.request, "urlopen", offline)
    with pytest.raises(m.ModelLoadError) as err:
        m.load_dvae("decoder", "openai", cache_dir=tmp_path, trust_hint="pass --trust-decoder")
    message = str(err.value)
    assert "only if you trust it: pass --trust-decoder." in message and "known_sha256" not in message


def test_imagine_worker_with_an_unreachable_redis_exits_1_in_one_line_with_the_password_masked(tmp_path):
    """Status 1 (a supervisor restarts it once Redis is back), not 2, a setting to fix."""
    from tests.queue_fixtures import free_port

    port = free_port()
    # reconnect_timeout: how long it waits for Redis to come up (30 s by default), 2 s here.
    url = f"redis://:s3cret@127.0.0.1:{port}/0?reconnect_timeout=2"
    started = time.monotonic()
    proc = subprocess.run(_worker_cmd("--queue", url, "--device", "cpu", "--log-level", "ERROR"),
                          cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 1, proc.stderr
    assert time.monotonic() - started < 25   # it gave up after 2 s, not the default 30 s
    assert (f"imagine-worker: cannot open the queue redis://:***@127.0.0.1:{port}/0?reconnect_timeout=2: "
            in proc.stderr), proc.stderr
    assert "Traceback" not in proc.stderr and "s3cret" not in proc.stderr


def _self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 signed by its own key (as a private CA's would be, to a client
    without that CA), made by openssl."""
    exe = shutil.which("openssl")
    if exe is None:
        pytest.fail("openssl is not on PATH: it makes this test's self-signed certificate")
    cert, key = folder / "server.crt", folder / "server.key"
    subprocess.run([exe, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True, timeout=60)
    return cert, key


@contextlib.asynccontextmanager
async def _tls_in_front_of(port: int, cert: Path, key: Path):
    """A TLS server (Python's ssl, this certificate) that forwards each connection to the plain
    redis-server on `port`: a rediss:// server, which this redis-server, built without TLS, is not.
    Yields its port."""
    import ssl

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def serve(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        redis_reader, redis_writer = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.gather(pipe(client_reader, redis_writer), pipe(redis_reader, client_writer))

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=context)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


A_TOKEN = "MTIzNDU2Nzg5MDEyMzQ1Njc4.GaBcDe.abcdefghijklmnopqrstuvwxyz0123456789AB"   # shaped as a bot's


async def test_a_tls_certificate_that_cannot_be_verified_fails_at_once_naming_ssl_ca_certs(tmp_path):
    """rediss:// to a server whose certificate a private CA signed, without that CA: the handshake's
    certificate verification error was retried for reconnect_timeout like a dropped link, then
    reported as "check ... that its server is up". Now imagine-worker (and imagine-bot) exits 2 at once, in one line
    naming the cause and the fix, and the fix it names works."""
    from engine.queue import open_queue
    from engine.queue.redis import CertificateNotVerified

    cert, key = _self_signed_certificate(tmp_path)
    redis = start_redis()
    try:
        async with _tls_in_front_of(redis.port, cert, key) as port:
            url = f"rediss://127.0.0.1:{port}/0"
            started = time.monotonic()
            proc = await asyncio.create_subprocess_exec(
                *_worker_cmd("--queue", f"{url}?reconnect_timeout=60", "--device", "cpu", "--log-level", "ERROR"),
                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            _, stderr = await asyncio.wait_for(proc.communicate(), 180)
            err = stderr.decode()
            assert proc.returncode == 2, err
            # At once: not after the 60 s of retries an unreachable server gets (torch's import aside).
            assert time.monotonic() - started < 45, err
            assert err.startswith(f"imagine-worker: cannot open the queue {url}?reconnect_timeout=60: the Redis "
                                  "server's TLS certificate could not be verified ("), err
            assert err.rstrip().endswith("give that CA's certificate on the URL, ?ssl_ca_certs=/path/ca.crt"), err
            assert "server is up" not in err and len(err.strip().splitlines()) == 1, err

            # The bot says the same, in the same one line.
            bot = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bot", "--queue", url, "--no-worker", cwd=tmp_path,
                env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "DISCORD_TOKEN": A_TOKEN},
                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            _, stderr = await asyncio.wait_for(bot.communicate(), 180)
            err = stderr.decode()
            assert bot.returncode == 2, err
            assert f"imagine-bot: cannot open the queue {url}: the Redis server's TLS certificate could not" in err, err
            assert "ssl_ca_certs" in err and "server is up" not in err, err

            started = time.monotonic()
            with pytest.raises(CertificateNotVerified, match="self-signed certificate"):
                await open_queue(f"{url}?reconnect_timeout=60").start()
            assert time.monotonic() - started < 5
            # The fix named: the CA's certificate (this self-signed one is its own CA) on the URL.
            queue = open_queue(f"{url}?ssl_ca_certs={cert}")
            await queue.start()
            try:
                job = await queue.submit(JobSpec(prompt="a cat", user_id=1, channel_id=2))
                assert (await queue.get(job.id)).state == JobState.QUEUED
            finally:
                await queue.close()
    finally:
        redis.stop()


async def test_a_stored_file_is_not_written_into_a_debug_log(tmp_path, caplog):
    """At --log-level DEBUG (the root logger at DEBUG) aiosqlite logged each call's arguments: a
    1 MiB put_artifact was megabytes of log (a state.pt, hundreds)."""
    from engine.jobs import JobSpec
    from engine.queue import open_queue

    caplog.set_level(logging.DEBUG)   # the root logger, as the bot's and the worker's --log-level DEBUG
    async with open_queue(str(tmp_path / "jobs.db")) as queue:
        record = await queue.submit(JobSpec(prompt="a red house"))
        caplog.clear()
        await queue.put_artifact(record.id, "final.png", b"\x89PNG" + bytes(1 << 20))
    assert sum(len(r.getMessage()) for r in caplog.records) < 10_000


def test_each_command_says_its_version_so_hosts_sharing_a_queue_can_be_compared(capsys):
    """README, Upgrading several hosts: the bot and every worker on one Redis must run the same
    version. It said to check each host's version, and no command could tell it."""
    from importlib.metadata import version

    from bot.__main__ import build_parser as bot_parser
    from engine.cli import build_parser as imagine_parser
    from engine.worker import build_parser as worker_parser

    for prog, parser in (("imagine", imagine_parser), ("imagine-bot", bot_parser), ("imagine-worker", worker_parser)):
        with pytest.raises(SystemExit) as exit_:
            parser().parse_args(["--version"])
        assert exit_.value.code == 0
        assert capsys.readouterr().out == f"{prog} {version('imagine-bot')}\n"


def test_a_sqlite_queue_that_cannot_be_opened_is_not_blamed_on_a_server(tmp_path, capsys):
    """A SQLite file has no server: its error said "check ... that its server is up"."""
    from engine.worker import main

    url = f"sqlite:///{tmp_path}/missing/q.db"
    assert main(["--queue", url, "--device", "cpu", "--log-level", "WARNING"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"imagine-worker: cannot open the queue {url}: ") and len(err.strip().splitlines()) == 1, err
    assert err.rstrip().endswith("check --queue / IMAGINE_QUEUE_URL and that the file can be opened"), err
    assert "server" not in err and not (tmp_path / "missing").exists(), err


def test_imagine_worker_says_why_its_model_cache_cannot_be_made_without_an_errno(tmp_path, capsys):
    """`--cache-dir` under a file: "[Errno 20] Not a directory: ..." is Python's form, not a sentence
    (imagine already said it without the number)."""
    from engine.worker import main

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cache = blocker / "cache"
    assert main(["--queue", f"sqlite:///{tmp_path}/q.db", "--device", "cpu", "--log-level", "WARNING",
                 "--cache-dir", str(cache)]) == 2
    assert capsys.readouterr().err == (f"imagine-worker: cannot load the models: Not a directory: "
                                       f"'{cache / 'clip'}' (--cache-dir {cache})\n")


def test_only_a_queue_server_out_of_reach_is_a_failure_for_a_restart():
    """`cannot open the queue`: status 1 (a supervisor restarts it) for a Redis down, restarting or
    loading its data; 2 (a setting to fix) for a refused password, an unverified certificate or a
    SQLite file that cannot be opened."""
    import sqlite3
    import ssl

    from redis import exceptions as redis_errors

    from engine.queue.redis import unreachable

    for exc in (redis_errors.ConnectionError("Connection refused"), redis_errors.TimeoutError("Timeout connecting"),
                redis_errors.BusyLoadingError("Redis is loading the dataset in memory")):
        assert unreachable(exc), exc
    wrapped = redis_errors.ConnectionError("SSL: CERTIFICATE_VERIFY_FAILED")
    verify = ssl.SSLCertVerificationError(1, "certificate verify failed")
    verify.verify_message, verify.reason = "self-signed certificate", "CERTIFICATE_VERIFY_FAILED"   # as ssl sets them
    wrapped.__context__ = verify
    for exc in (redis_errors.AuthenticationError("invalid username-password pair"),
                redis_errors.AuthorizationError("NOPERM"), wrapped, sqlite3.OperationalError("unable to open database"),
                ValueError("x")):
        assert not unreachable(exc), exc
