"""The bot's operations side: /healthz and /metrics over real HTTP on a running bot (fake Discord,
real SQLite queue, embedded worker on the tiny models), Discord 429s counted, job log lines, and the
options that switch these on and off ([http], --http-port, --no-worker, [worker] max_batch = 0).
Then `imagine-bot` as a real process: stop signals (while the gateway reconnects, while the models
download, a second one), a dying GPU thread, Discord failing at start; the log during a Discord
outage, and its format (no colour codes off a terminal)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bot.__main__ import build_parser, load
from bot.config import ConfigError, load_config
from bot.launcher import make_bot, open_resources
from engine.jobs import JobSpec, JobState
from tests.fakediscord import FakeDiscord, running_bot
from tests.test_bot_support import CHANNEL_MESSAGE, WEBHOOK_ORIGINAL, Harness, test_config
from tests.metrics_support import get, samples, value
from tests.test_ops import SLOW_TORCH_LOAD, assert_exits, exit_status

PROMPT = "a lighthouse of xyzzy-quartz"
GOOD_TOKEN = "MTIzNDU2Nzg5MDEyMzQ1Njc4.GaBcDe.abcdefghijklmnopqrstuvwxyz0123456789AB"


async def health(http, base: str) -> tuple[int, dict]:
    code, body = await get(http, f"{base}/healthz")
    return code, json.loads(body)


async def metrics(http, base: str) -> dict:
    code, text = await get(http, f"{base}/metrics")
    assert code == 200
    return samples(text)


async def test_health_and_metrics_of_a_running_bot(tmp_path, tiny_models, caplog):
    caplog.set_level(logging.INFO)
    from tests.fakediscord import FakeDiscord

    config = test_config(tmp_path, worker={"max_batch": 0, "keep_days": 30,   # 0: the worker chooses (1 on a CPU)
                                           "keep_state_gib": 2.5, "cuda_graphs": True})
    assert config.http.port == 0                                # off by default...
    async with contextlib.AsyncExitStack() as stack:
        fd = await FakeDiscord().start()
        stack.push_async_callback(fd.close)
        resources = await stack.enter_async_context(open_resources(
            config, models_loader=lambda: tiny_models, http_port=0,   # ...here: any free port
            worker_options={"poll_every": 0.05, "heartbeat_every": 0.2}))
        assert resources.worker is not None and resources.worker.max_batch == 1
        assert resources.worker.keep_days == 30
        assert resources.worker.keep_state_bytes == int(2.5 * 1024 ** 3)   # [worker] keep_state_gib reaches it
        assert resources.worker.cuda_graphs is True                           # and cuda_graphs (none on a CPU)
        base = f"http://127.0.0.1:{resources.http_port}"
        http = await stack.enter_async_context(aiohttp.ClientSession())

        # Before the bot connects: Discord is not ok (the GPU thread is up within moments).
        for _ in range(100):
            code, report = await health(http, base)
            if report["checks"]["gpu"]["ok"]:
                break
            await asyncio.sleep(0.05)
        assert code == 503 and report["ok"] is False
        assert report["checks"]["discord"]["ok"] is False and "not started" in report["checks"]["discord"]["error"]
        assert report["checks"]["queue"] == {"ok": True} and report["checks"]["gpu"] == {"ok": True}

        bot = make_bot(resources)
        await stack.enter_async_context(running_bot(fd, bot))
        await bot.tree.sync(guild=None)
        code, report = await health(http, base)
        shard = report["checks"]["discord"].pop("shards")
        assert (code, report) == (200, {"ok": True, "checks": {"discord": {"ok": True}, "queue": {"ok": True},
                                                               "gpu": {"ok": True}}})
        assert list(shard) == ["0"] and shard["0"]["state"] == "ready"   # one shard: Discord's recommendation
        assert 0 <= shard["0"]["latency"] < 5
        before = await metrics(http, base)
        assert value(before, "imagine_discord_shard_connected", shard="0") == 1
        assert 0 <= value(before, "imagine_discord_gateway_latency_seconds", shard="0") < 5
        assert value(before, "imagine_iterations_total") == 0
        assert value(before, "imagine_jobs_total", state="done") == 0
        assert value(before, "imagine_discord_rate_limited_total") == 0
        assert value(before, "imagine_gpu_thread_alive") == 1
        assert value(before, "imagine_queue_length") == 0

        # A job whose first two edits Discord answers with 429 (discord.py waits them out).
        fd.rate_limit("PATCH", WEBHOOK_ORIGINAL, count=2, retry_after=0.05)
        h = Harness(fd=fd, config=config, models=tiny_models, resources=resources, bot=bot)
        inter = await h.imagine(PROMPT)
        job_id = h.job_id(await h.reply_of(inter))
        await h.wait_delivered(job_id)
        assert len([r for r in fd.requests if r.status == 429]) == 2

        after = await metrics(http, base)
        assert value(after, "imagine_iterations_total") == config.imagine.default_iterations
        assert value(after, "imagine_jobs_total", state="started") == 1
        assert value(after, "imagine_jobs_total", state="done") == 1
        assert value(after, "imagine_jobs_total", state="failed") == 0
        assert value(after, "imagine_job_latency_seconds_count") == 1
        assert value(after, "imagine_discord_rate_limited_total") == 2
        assert value(after, "imagine_queue_length") == 0
        assert not any(name.startswith("imagine_gpu_memory") for name, _ in after)   # a CPU: absent

        # The gateway closes: Discord is not ok any more; the rest still is.
        await bot.close()
        code, report = await health(http, base)
        assert code == 503 and report["checks"]["discord"]["ok"] is False
        assert report["checks"]["queue"] == {"ok": True}
        assert value(await metrics(http, base), "imagine_discord_shard_connected", shard="0") == 0

    # One INFO line per job event with the job id; neither the prompt nor the token at INFO.
    info = [r for r in caplog.records if r.levelno >= logging.INFO]
    lines = [r.getMessage() for r in info if r.name.startswith("bot")]
    for event in ("queued", "started", "done"):
        assert f"job {job_id} {event}" in lines, lines
    assert any(line.startswith(f"job {job_id} result posted") for line in lines), lines
    text = "\n".join(r.getMessage() for r in info)
    assert "xyzzy" not in text and fd.bot_token not in text


def test_http_and_worker_options_parse(tmp_path, monkeypatch):
    path = tmp_path / "config.toml"
    path.write_text('[http]\nport = 9200\nhost = "0.0.0.0"\n[worker]\nmax_batch = 0\nkeep_days = 7\n')
    config = load_config(path)
    assert (config.http.port, config.http.host, config.worker.max_batch) == (9200, "0.0.0.0", 0)
    assert config.worker.keep_days == 7
    for toml, message in [("[http]\nport = 70000", "[http] port: must be between 0 (off) and 65535"),
                          ("[http]\nport = \"9200\"", "[http] port: expected an integer"),
                          ("[worker]\nmax_batch = -1", "[worker] max_batch: must not be negative"),
                          ("[worker]\nkeep_days = -1", "[worker] keep_days: must not be negative")]:
        path.write_text(toml)
        with pytest.raises(ConfigError, match=r"^" + __import__("re").escape(f"{path}: {message}")):
            load_config(path)

    path.write_text("[worker]\nembedded = true\n")
    monkeypatch.setenv("DISCORD_TOKEN", GOOD_TOKEN)
    config, _ = load(build_parser().parse_args(["--config", str(path)]))
    assert config.worker.embedded is True and config.http.port == 0
    for argv in (["--config", str(path), "--no-worker", "--http-port", "9300", "--http-host", "0.0.0.0"],
                 ["--config", str(path), "run", "--no-worker", "--http-port", "9300", "--http-host", "0.0.0.0"]):
        config, _ = load(build_parser().parse_args(argv))
        assert (config.worker.embedded, config.http.port, config.http.host) == (False, 9300, "0.0.0.0")
    with pytest.raises(ConfigError, match="--http-port"):
        load(build_parser().parse_args(["--config", str(path), "--http-port", "-1"]))


async def test_no_worker_runs_no_embedded_worker_and_no_gpu_check(tmp_path, monkeypatch):
    path = tmp_path / "config.toml"
    path.write_text(f'[queue]\nurl = "sqlite:///{tmp_path / "q.db"}"\n[worker]\nembedded = true\n[http]\nport = 0\n')
    monkeypatch.setenv("DISCORD_TOKEN", GOOD_TOKEN)
    config, _ = load(build_parser().parse_args(["--config", str(path), "--no-worker"]))

    def no_models():
        raise AssertionError("no models are loaded without a worker")

    async with open_resources(config, models_loader=no_models) as resources:   # [http] port 0: off
        assert resources.worker is None and resources.http_port is None
    async with open_resources(config, models_loader=no_models, http_port=0) as resources:
        assert resources.worker is None
        async with aiohttp.ClientSession() as http:
            code, report = await health(http, f"http://127.0.0.1:{resources.http_port}")
        # no gpu check: the (advisory) workers check asks whether a GPU worker elsewhere is alive
        assert code == 503 and set(report["checks"]) == {"discord", "queue", "workers"}
        assert report["checks"]["workers"]["alive"] == 0 and report["degraded"] == ["workers"]
        assert report["checks"]["queue"] == {"ok": True}


def test_shard_gauges_follow_the_shards_given():
    from prometheus_client import generate_latest

    from engine.observability import Observability

    obs = Observability()
    obs.export_discord_metrics()   # what track_shards does first
    obs.discord_shards({0: (True, 0.25), 1: (True, 0.5)})
    m = samples(generate_latest(obs.registry).decode())
    assert value(m, "imagine_discord_shard_connected", shard="0") == 1
    assert value(m, "imagine_discord_gateway_latency_seconds", shard="1") == 0.5
    obs.discord_shards({0: (False, None)})   # shard 0 down, shard 1 gone (a smaller count)
    m = samples(generate_latest(obs.registry).decode())
    assert value(m, "imagine_discord_shard_connected", shard="0") == 0
    assert value(m, "imagine_discord_shard_connected", shard="1") is None
    assert not any(name == "imagine_discord_gateway_latency_seconds" for name, _ in m)


async def test_a_cuda_device_this_host_lacks_is_refused_before_the_queue_opens(tmp_path, tiny_model_files):
    """[worker] device = "cuda:1" on a one-GPU host ("cuda" on one with none): the bot opened the
    queue, took its lease, logged in, loaded the models (minutes of downloading CLIP) and only then
    failed, with a hint that named the model files, not the device."""
    import torch

    from bot.launcher import LaunchError

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    config = test_config(tmp_path, worker={"device": f"cuda:{gpus}"})
    with pytest.raises(LaunchError) as err:
        async with open_resources(config, http_port=0):
            pass
    assert err.value.exit_code == 2
    assert str(err.value).startswith(f"[worker] device = 'cuda:{gpus}': this host has {gpus or 'no'} CUDA GPU")
    assert not list(tmp_path.glob("*.db")), "the queue was opened"


async def test_device_auto_without_a_gpu_runs_no_embedded_worker_and_says_so(tmp_path, tiny_model_files, caplog):
    """[worker] device = "auto" (the default) on a host without CUDA: no embedded worker (a CPU one
    would claim shared jobs at ~10 s a step), a WARNING that says what to do, and /healthz as with
    --no-worker. device = "cpu" runs it on the CPU anyway, through the same default loader."""
    import torch

    from bot.launcher import NO_GPU_WARNING

    if torch.cuda.is_available():
        pytest.skip("this host has a CUDA GPU: device auto means cuda here")
    caplog.set_level(logging.INFO)
    f = tiny_model_files
    worker = {"clip_model": str(f.clip_torchscript), "decoder": str(f.decoder_pickle), "encoder": "",
              "trust_decoder": True, "cache_dir": str(f.cache_dir)}
    config = test_config(tmp_path, worker=worker)
    assert config.worker.embedded is True and config.worker.device == "auto"
    async with open_resources(config, http_port=0) as resources:
        assert resources.worker is None
        async with aiohttp.ClientSession() as http:
            code, report = await health(http, f"http://127.0.0.1:{resources.http_port}")
        # no gpu check: the (advisory) workers check asks whether a GPU worker elsewhere is alive
        assert code == 503 and set(report["checks"]) == {"discord", "queue", "workers"}
        assert report["checks"]["workers"]["alive"] == 0 and report["degraded"] == ["workers"]
        assert report["checks"]["queue"] == {"ok": True}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "bot.launcher"]
    assert warnings == [NO_GPU_WARNING]
    assert 'set [worker] device = "cpu"' in NO_GPU_WARNING and "imagine-worker on a GPU host" in NO_GPU_WARNING

    caplog.clear()
    config = test_config(tmp_path, worker={**worker, "device": "cpu"})
    async with open_resources(config, http_port=0, worker_options={"poll_every": 0.05}) as resources:
        assert resources.worker is not None and str(resources.worker.models.device) == "cpu"
        # Its automatic max_batch (on a GPU) is sized for the costliest job this config queues.
        im = config.imagine
        assert resources.worker.costliest == (max(im.sizes.values()),
                                              max([im.cutn] + [config.presets.best.cutn, config.presets.normal.cutn,
                                                               config.presets.draft.cutn]))
        async with aiohttp.ClientSession() as http:
            code, report = await health(http, f"http://127.0.0.1:{resources.http_port}")
        assert report["checks"]["gpu"] == {"ok": True}
    assert NO_GPU_WARNING not in caplog.text


async def test_a_rejected_token_stops_the_bot_before_the_embedded_worker_loads_its_models(
        tmp_path, tiny_model_files, monkeypatch, capsys, caplog):
    """Discord refuses the token: `imagine-bot` exits 2 at once with the message about DISCORD_TOKEN,
    before its embedded worker loads anything (on a GPU host's first start: minutes of downloads and
    loading, wasted). Seen from outside: loading leaves the decoder's safetensors copy in the model
    cache, and a started worker claims from the queue; neither happened."""
    from bot.__main__ import main
    from bot.launcher import default_models_loader
    from engine.queue import open_queue

    f = tiny_model_files
    cache = tmp_path / "cache"
    queue_url = f"sqlite:///{tmp_path / 'q.db'}"
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[queue]\nurl = "{queue_url}"\n'
                   f'[worker]\nembedded = true\ndevice = "cpu"\nclip_model = "{f.clip_torchscript}"\n'
                   f'decoder = "{f.decoder_pickle}"\ntrust_decoder = true\nencoder = ""\ncache_dir = "{cache}"\n')
    caplog.set_level(logging.INFO)
    async with FakeDiscord() as fd:
        assert GOOD_TOKEN != fd.bot_token
        monkeypatch.setenv("DISCORD_TOKEN", GOOD_TOKEN)   # well formed, but not this bot's
        try:
            # main() runs its own event loop: give it a thread, the fake keeps serving on this loop.
            code = await asyncio.to_thread(main, ["--config", str(cfg)])
        finally:   # main() calls discord.utils.setup_logging(root=True): take its handler off again
            logging.getLogger().handlers[:] = [h for h in logging.getLogger().handlers
                                               if type(h).__module__.startswith("_pytest")]
        assert code == 2
        err = capsys.readouterr().err
        assert "Discord rejected the token in DISCORD_TOKEN" in err and GOOD_TOKEN not in err
        assert [r.status for r in fd.find_requests("GET", "/users/@me")] == [401]
        assert not fd.identifies   # never reached the gateway either

    assert not list(cache.glob("dvae/*.safetensors")), "the embedded worker loaded its models"
    assert not [r for r in caplog.records if r.name == "engine.worker" and " started (" in r.getMessage()]
    queue = open_queue(queue_url)
    await queue.start()
    try:
        assert await queue.workers(max_age=3600) == {}   # no worker ever claimed
    finally:
        await queue.close()
    assert GOOD_TOKEN not in caplog.text

    # The control: loading these models does leave that copy in this cache.
    await asyncio.to_thread(default_models_loader(load_config(cfg).worker))
    assert list(cache.glob("dvae/decoder-*.safetensors"))


# --- `imagine-bot` as a process: signals, a dying GPU thread, Discord failing at start ---------------

ROOT = Path(__file__).resolve().parents[1]
# `imagine-bot` pointed at the fake Discord: its REST base (the gateway's URL comes from GET /gateway/bot).
BOT_MAIN = ("import os, sys, discord.http; discord.http.Route.BASE = os.environ['FAKE_DISCORD_API']; "
            "from bot.__main__ import main; sys.exit(main(sys.argv[1:]))")
# A GPU thread that dies as it starts, for real: the models on a CUDA device this host does not have
# (cuda:99; on a GPU host too), so the GPU thread cannot build its runner (as in test_worker's
# test_imagine_worker_exits_1_when_its_gpu_thread_dies). The models themselves load as configured.
GPU_THAT_DIES = """
import dataclasses, torch, bot.launcher as launcher
real_loader = launcher.default_models_loader
def default_models_loader(wc):
    load = real_loader(wc)
    return lambda: dataclasses.replace(load(), device=torch.device("cuda", 99))
launcher.default_models_loader = default_models_loader
"""


class BotProcess:
    """`imagine-bot --config PATH ARGS` in a process of its own against `fd`, its output in a file."""

    def __init__(self, fd: FakeDiscord, tmp_path: Path, config: str, *args: str, prelude: str = "",
                 env: dict[str, str] | None = None, name: str = "bot"):
        cfg = tmp_path / f"{name}.toml"
        cfg.write_text(config)
        self.log_path = tmp_path / f"{name}.log"
        self._log = open(self.log_path, "wb")
        environ = {k: v for k, v in os.environ.items() if k not in ("IMAGINE_QUEUE_URL", "DISCORD_TOKEN")}
        environ.update({"DISCORD_TOKEN": fd.bot_token, "FAKE_DISCORD_API": fd.api_base,
                        "PYTHONUNBUFFERED": "1", **(env or {})})
        self.proc = subprocess.Popen([sys.executable, "-c", prelude + BOT_MAIN, "--config", str(cfg), *args],
                                     cwd=tmp_path, env=environ, stdout=self._log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def wait_log(self, text: str, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log():
            assert self.proc.poll() is None, f"the bot exited with {self.proc.returncode}:\n{self.log()}"
            assert time.monotonic() < deadline, f"no {text!r} in the bot's log:\n{self.log()}"
            await asyncio.sleep(0.05)

    async def wait_exit(self, timeout: float) -> int | None:
        """The exit status, or None if it still runs after `timeout` seconds."""
        return await exit_status(self.proc, timeout)

    async def run_out(self, timeout: float = 90) -> tuple[int | None, str]:
        """Wait for the process to exit by itself (killed after `timeout`): its status (None: it was
        still running) and its log."""
        try:
            code = await self.wait_exit(timeout)
        finally:
            self.kill()
        return code, self.log()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


def bot_config(tmp_path: Path, files=None, **worker: Any) -> str:
    """A config on a SQLite queue in tmp_path; with model `files`, an embedded CPU worker on them."""
    text = f'[queue]\nurl = "sqlite:///{tmp_path / "q.db"}"\n'
    if files is None:
        return text + "[worker]\nembedded = false\n"
    settings = {"embedded": True, "device": "cpu", "clip_model": str(files.clip_torchscript),
                "decoder": str(files.decoder_pickle), "trust_decoder": True, "encoder": "",
                "cache_dir": str(files.cache_dir), "max_batch": 1, **worker}
    return text + "[worker]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in settings.items())


@contextlib.asynccontextmanager
async def sqlite_queue(tmp_path: Path):
    from engine.queue import open_queue

    queue = open_queue(f"sqlite:///{tmp_path / 'q.db'}")
    await queue.start()
    try:
        yield queue
    finally:
        await queue.close()


async def wait_job(queue, job_id: str, state, timeout: float = 90.0):
    deadline = time.monotonic() + timeout
    while (record := await queue.get(job_id)).state != state:
        assert time.monotonic() < deadline, f"job {job_id} stayed {record.state}"
        await asyncio.sleep(0.1)
    return record


@contextlib.contextmanager
def locked_store(path: Path):
    """Another process's write lock on the SQLite queue (a migration, a backup tool): every write of
    the bot waits it out, up to the queue's busy_timeout (30 s)."""
    import sqlite3

    con = sqlite3.connect(str(path), timeout=30, isolation_level=None)
    try:
        con.execute("BEGIN EXCLUSIVE")
        yield
    finally:
        con.execute("ROLLBACK")
        con.close()


@contextlib.contextmanager
def stalled_https_proxy():
    """An HTTPS proxy that takes connections and never answers: with https_proxy pointing at it, a
    first start's model download (urllib, 60 s timeout a read) hangs as one over a dead link does.
    Yields (its URL, a function that says whether a connection is waiting on it)."""
    import select
    import socket

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)   # never accepted: the kernel completes the handshake, nothing answers

        def pending() -> bool:
            return bool(select.select([server], [], [], 0)[0])

        yield f"http://127.0.0.1:{server.getsockname()[1]}", pending


async def test_sigterm_while_the_gateway_reconnects_stops_the_bot(tmp_path):
    """The gateway drops and its reconnect hangs (no HELLO: discord.py waits up to 60 s, then tries
    again, for ever). SIGTERM then used to cancel only that reconnect, which discord.py swallows
    (Shard.reidentify returns), so the bot carried on and refused a second signal. Now the bot is
    closed as well: it exits 0 within seconds."""
    # DEBUG: discord.py logs "Created websocket connected to ..." as it connects, just before it
    # waits for the HELLO (a held connection gets none).
    connected = "Created websocket connected to"
    async with FakeDiscord() as fd:
        bot = BotProcess(fd, tmp_path, bot_config(tmp_path), "--log-level", "DEBUG")
        try:
            await bot.wait_log("gateway shard 0/1 ready")
            assert bot.log().count(connected) == 1, bot.log()
            fd.hold_gateway()
            assert await fd.drop_connection() == 1
            await bot.wait_log("gateway shard 0 disconnected")
            deadline = time.monotonic() + 30
            while bot.log().count(connected) < 2:   # its reconnect, held: waiting for a HELLO
                assert bot.proc.poll() is None, bot.log()
                assert time.monotonic() < deadline, f"the bot did not reconnect:\n{bot.log()}"
                await asyncio.sleep(0.05)
            await assert_exits(bot.proc, bot.log, 0, within=20, send=signal.SIGTERM)
        finally:
            bot.kill()
    log = bot.log()
    assert "stopping (SIGTERM)" in log and "Traceback" not in log, log


async def test_a_second_signal_stops_the_bot_at_once_with_130(tmp_path, tiny_model_files):
    """The first SIGTERM stops the bot gracefully (the progress cursor saved, the running job
    checkpointed and handed back), and that takes as long as the store needs: here another process
    holds its write lock. A second signal (Ctrl-C) used to be refused ("already stopping; kill -9");
    now it stops the process at once with 130 (128 + SIGINT): nothing is handed back, the job's lease
    expires and another worker resumes it from its last checkpoint."""
    async with FakeDiscord() as fd, sqlite_queue(tmp_path) as queue:
        job = await queue.submit(JobSpec(prompt="a slow lighthouse", user_id=7, channel_id=1, grid=8,
                                         iterations=100_000, frame_every=50, cutn=2, seed=1))
        bot = BotProcess(fd, tmp_path, bot_config(tmp_path, tiny_model_files))
        try:
            await bot.wait_log("gateway shard 0/1 ready")
            await wait_job(queue, job.id, JobState.RUNNING)
            with locked_store(tmp_path / "q.db"):
                bot.proc.send_signal(signal.SIGTERM)
                await bot.wait_log("bot: stopping", timeout=10)
                assert await bot.wait_exit(2) is None, bot.log()   # waiting for the store's lock
                await assert_exits(bot.proc, bot.log, 130, within=10, send=signal.SIGINT)
        finally:
            bot.kill()
        assert "SIGINT again: stopping at once (exit status 130)" in bot.log(), bot.log()
        record = await queue.get(job.id)
        assert record.state == JobState.RUNNING   # not handed back: its lease runs out instead


async def test_sigterm_while_the_embedded_worker_downloads_its_models_stops_the_bot_at_once(
        tmp_path, tiny_model_files):
    """A first start downloads CLIP (~340 MB) before the bot connects. SIGTERM during the download
    used to wait for it to end (the load ran on asyncio's executor, which asyncio.run waits for at
    exit): Docker SIGKILLs 10 s after its SIGTERM. Now the bot exits 0 at once; the download's
    thread is left behind. Here the download hangs on an HTTPS proxy that never answers."""
    empty_cache = tmp_path / "cache"
    async with FakeDiscord() as fd:
        with stalled_https_proxy() as (proxy, downloading):
            bot = BotProcess(fd, tmp_path, bot_config(tmp_path, tiny_model_files, clip_model="ViT-B/32",
                                                      cache_dir=str(empty_cache)),
                             env={"https_proxy": proxy, "HTTPS_PROXY": proxy, "no_proxy": "127.0.0.1,localhost"})
            try:
                await bot.wait_log("logging in using static token")
                deadline = time.monotonic() + 90
                while not downloading():
                    assert bot.proc.poll() is None and time.monotonic() < deadline, bot.log()
                    await asyncio.sleep(0.05)
                await assert_exits(bot.proc, bot.log, 0, within=15, send=signal.SIGTERM)
            finally:
                bot.kill()
    log = bot.log()
    assert "stopping (SIGTERM)" in log and "Traceback" not in log, log
    assert not fd.identifies   # it never got as far as the gateway


async def test_sigterm_while_the_embedded_worker_builds_its_models_in_torch_exits_0(tmp_path, tiny_model_files):
    """The models' load thread, abandoned by the stop, was still inside a torch op when the interpreter
    exited: Python 3.11 ended it within C++ ("terminate called without an active exception", exit
    134). Now the bot leaves with os._exit(0) when such a thread is still running."""
    mark = tmp_path / "looping"
    async with FakeDiscord() as fd:
        bot = BotProcess(fd, tmp_path, bot_config(tmp_path, tiny_model_files), env={"LOAD_MARK": str(mark)},
                         prelude=SLOW_TORCH_LOAD + "import bot.launcher as launcher\n"
                                                      "launcher.default_models_loader = lambda wc: _slow_torch_load\n")
        try:
            deadline = time.monotonic() + 90
            while not mark.exists():   # touched from inside the loop of torch ops
                assert bot.proc.poll() is None and time.monotonic() < deadline, bot.log()
                await asyncio.sleep(0.05)
            await assert_exits(bot.proc, bot.log, 0, within=15, send=signal.SIGTERM)
        finally:
            bot.kill()
    log = bot.log()
    assert "stopping (SIGTERM)" in log and "terminate called" not in log and "Traceback" not in log, log


async def test_a_dead_gpu_thread_of_the_embedded_worker_stops_the_bot_with_1(tmp_path, tiny_model_files):
    """imagine-worker exits 1 when its GPU thread dies; the bot with its embedded worker used to run
    on, taking commands whose jobs sat "Queued" for ever. It exits 1 now (a supervisor starts a
    fresh one) with one ERROR line, and the queued job is still in the queue."""
    async with FakeDiscord() as fd, sqlite_queue(tmp_path) as queue:
        job = await queue.submit(JobSpec(prompt="a lighthouse", user_id=7, channel_id=1, grid=8,
                                         iterations=10, frame_every=5, cutn=2, seed=1))
        bot = BotProcess(fd, tmp_path, bot_config(tmp_path, tiny_model_files), prelude=GPU_THAT_DIES)
        try:
            await assert_exits(bot.proc, bot.log, 1, within=120)
        finally:
            bot.kill()
        record = await queue.get(job.id)
        assert record.state == JobState.QUEUED, record
    log = bot.log()
    # The cause: the thread's own traceback. Not its first line: threading's excepthook writes
    # "Exception in thread ", the name and ":" separately (unbuffered), so another thread's log
    # line can land in between; a traceback line is one write.
    assert ", in _gpu_loop" in log, log
    errors = [line for line in log.splitlines() if "[ERROR   ] bot.launcher" in line]
    assert len(errors) == 1 and "the embedded worker's GPU thread died or hung" in errors[0], log
    assert "exit status 1" in errors[0] and "stopping (" not in log


@pytest.mark.parametrize("args, route", [([], "/users/@me"), ([], "/gateway/bot"), (["sync"], "/users/@me")])
async def test_a_discord_server_error_at_start_is_one_line_and_exit_1(tmp_path, args, route):
    """A 503 at login (GET /users/@me) or from GET /gateway/bot (discord.py's GatewayNotFound) used to
    end in a 40-line traceback. An outage is no setting to fix: one line and exit 1, as for a
    Discord that cannot be reached, so that a supervisor tries again later."""
    async with FakeDiscord() as fd:
        fd.inject_error("GET", route, 503, count=100)
        code, log = await BotProcess(fd, tmp_path, bot_config(tmp_path), *args).run_out()
    assert code == 1, f"exit status {code}:\n{log}"
    ours = [line for line in log.splitlines() if line.startswith("imagine-bot:")]
    assert ours == [f"imagine-bot: Discord answered GET /api/v10{route} with 503 Service Unavailable "
                    "(503: injected); an outage on Discord's side, not a setting: try again later "
                    "(https://discordstatus.com)"], log
    assert "Traceback" not in log and fd.bot_token not in log


async def test_sync_to_a_guild_the_bot_is_not_in_is_a_setting_exit_2(tmp_path):
    """`imagine-bot sync --guild G` with a guild the bot is not in: Discord answers 403 Missing Access.
    That used to be taken for an outage ("try again later", exit 1, which a supervisor retries for
    ever); it is a setting to fix: one line naming the error, exit 2."""
    async with FakeDiscord() as fd:
        fd.inject_error("PUT", r"/applications/\d+/guilds/999/commands", 403,
                        {"message": "Missing Access", "code": 50001}, count=100)
        code, log = await BotProcess(fd, tmp_path, bot_config(tmp_path), "sync", "--guild", "999").run_out()
    assert code == 2, f"exit status {code}:\n{log}"
    ours = [line for line in log.splitlines() if line.startswith("imagine-bot:")]
    assert len(ours) == 1, log
    assert "403 Forbidden (Missing Access)" in ours[0] and "setting to fix" in ours[0], log
    assert "try again later" not in ours[0] and "Traceback" not in log and fd.bot_token not in log


async def test_a_start_up_failure_is_said_once(tmp_path):
    """A launch error (here: the HTTP port taken) was logged and then printed: the same message twice
    on stderr. Once now, as `imagine-bot: ...`."""
    import socket

    async with FakeDiscord() as fd:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            code, log = await BotProcess(fd, tmp_path, bot_config(tmp_path), "--http-port", str(port)).run_out()
    assert code == 2, log
    assert log.count(f"cannot serve /healthz and /metrics on 127.0.0.1:{port}") == 1, log
    assert f"imagine-bot: cannot serve /healthz and /metrics on 127.0.0.1:{port}" in log


# --- the log ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [0, 503], ids=["connection-dropped", "503"])
async def test_a_discord_outage_is_one_warning_not_a_traceback_per_edit(tmp_path, tiny_models, caplog, status):
    """Discord unreachable (the connection dropped: aiohttp's ServerDisconnectedError) or failing (503)
    while a job runs: every progress edit failed, each logged with a full traceback (or a WARNING per
    edit), every few seconds per job for as long as it lasted. Now: one WARNING when it begins, the
    failures at DEBUG, one INFO line when Discord answers again; and the result is still posted.
    (The edits go with the bot token here, token_ttl 0: through the interaction's token discord.py
    itself retries a 5xx four times, 16 s, before the bot sees it fail.)"""
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.DEBUG, logger="bot.progress")
    async with FakeDiscord() as fd:
        h = Harness(fd=fd, config=test_config(tmp_path, progress={"token_ttl": 0}), models=tiny_models)
        await h.start()
        try:
            inter = await h.imagine(PROMPT, iterations=40)
            job_id = h.job_id(await h.reply_of(inter))
            outage = fd.inject_error("PATCH", CHANNEL_MESSAGE, status, count=10_000)
            deadline = time.monotonic() + 60
            while len(outage.hits) < 4:   # progress edits, then the result's tries (backing off)
                assert time.monotonic() < deadline, "the edits did not fail"
                await asyncio.sleep(0.05)
            outage.remaining = 0   # Discord is back
            await h.wait_delivered(job_id, timeout=60)
        finally:
            await h.stop()
    assert len(outage.hits) >= 4
    ours = [r for r in caplog.records if r.name == "bot.progress"]
    assert not [r for r in ours if r.exc_info], "a traceback for an outage"
    loud = [r.getMessage() for r in ours if r.levelno >= logging.WARNING]
    assert len(loud) == 1 and loud[0].startswith(f"cannot reach Discord (job {job_id}: "), loud
    assert ("ServerDisconnectedError" if status == 0 else "DiscordServerError: 503") in loud[0]
    quiet = [r for r in ours if r.levelno == logging.DEBUG and "Discord not reached" in r.getMessage()]
    assert len(quiet) >= 3   # the failures after the first: seen, at DEBUG
    back = [r.getMessage() for r in ours if r.levelno == logging.INFO and "Discord answers again" in r.getMessage()]
    assert len(back) == 1, back


def test_the_log_has_colour_codes_only_on_a_terminal(monkeypatch):
    """discord.py's log setup colours any stream in a container (it finds /.dockerenv): `docker logs`
    and the log collectors got ANSI codes. The bot's handler colours a terminal only, and still masks
    the token. (The container is stood in for here: not every host running the tests is one.)"""
    import discord
    import pty

    from bot import redact

    monkeypatch.setattr(discord.utils, "is_docker", lambda: True)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        pipe = io.StringIO()   # not a terminal: a pipe to `docker logs`, a file
        handler = redact.setup_logging(logging.INFO, secrets=[GOOD_TOKEN], stream=pipe)
        logging.getLogger("bot.test").warning("token %s here", GOOD_TOKEN)
        root.removeHandler(handler)
        text = pipe.getvalue()
        assert "\x1b" not in text and "] [WARNING ] bot.test: token *** here" in text, repr(text)

        leader, follower = pty.openpty()   # a terminal: colours
        try:
            with os.fdopen(follower, "w", closefd=False) as tty:
                handler = redact.setup_logging(logging.INFO, secrets=[GOOD_TOKEN], stream=tty)
                logging.getLogger("bot.test").warning("token %s here", GOOD_TOKEN)
                root.removeHandler(handler)
            out = os.read(leader, 65536).decode(errors="replace")
        finally:
            os.close(leader)
            os.close(follower)
        assert "\x1b[" in out and "token *** here" in out and GOOD_TOKEN not in out, repr(out)
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
