"""The bot's operations side: /healthz and /metrics over real HTTP on a running bot (fake Discord,
real SQLite queue, embedded worker on the tiny models), Discord 429s counted, job log lines, and the
options that switch these on and off ([http], --http-port, --no-worker, [worker] max_batch = 0)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

import aiohttp
import pytest

from bot.__main__ import build_parser, load
from bot.config import ConfigError, load_config
from bot.launcher import make_bot, open_resources
from tests.fakediscord import FakeDiscord, running_bot
from tests.test_bot_support import WEBHOOK_ORIGINAL, Harness, test_config
from tests.metrics_support import get, samples, value

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

    config = test_config(tmp_path, worker={"max_batch": 0, "keep_days": 30})   # 0: the worker chooses (1 on a CPU)
    assert config.http.port == 0                                # off by default...
    async with contextlib.AsyncExitStack() as stack:
        fd = await FakeDiscord().start()
        stack.push_async_callback(fd.close)
        resources = await stack.enter_async_context(open_resources(
            config, models_loader=lambda: tiny_models, http_port=0,   # ...here: any free port
            worker_options={"poll_every": 0.05, "heartbeat_every": 0.2}))
        assert resources.worker is not None and resources.worker.max_batch == 1
        assert resources.worker.keep_days == 30
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
        with pytest.raises(ConfigError, match=r"^" + __import__("re").escape(message)):
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
    obs.discord_shards({0: (True, 0.25), 1: (True, 0.5)})
    m = samples(generate_latest(obs.registry).decode())
    assert value(m, "imagine_discord_shard_connected", shard="0") == 1
    assert value(m, "imagine_discord_gateway_latency_seconds", shard="1") == 0.5
    obs.discord_shards({0: (False, None)})   # shard 0 down, shard 1 gone (a smaller count)
    m = samples(generate_latest(obs.registry).decode())
    assert value(m, "imagine_discord_shard_connected", shard="0") == 0
    assert value(m, "imagine_discord_shard_connected", shard="1") is None
    assert not any(name == "imagine_discord_gateway_latency_seconds" for name, _ in m)


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
