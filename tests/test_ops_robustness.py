"""Metrics when their sources fail, the batch-size estimate for a ResNet CLIP, and the contact
sheet's caption fitting on long captions."""

from __future__ import annotations

import logging
import math
from dataclasses import replace

import aiohttp
import pytest
from PIL import Image, ImageDraw

from bot import contact_sheet
from engine import capacity
from engine.jobs import JobSpec
from engine.observability import Observability, bound_port
from tests.metrics_support import get, samples, value
from tests.queue_fixtures import QueueFactory, queue_factory, redis_server, start_redis  # noqa: F401 - fixtures


def spec(prompt: str = "a cat") -> JobSpec:
    return JobSpec(prompt=prompt, user_id=1, channel_id=2)


def queue_gauges(metrics: dict) -> dict[str, float | None]:
    return {
        "length": value(metrics, "imagine_queue_length"),
        "queued": value(metrics, "imagine_queue_jobs", state="queued"),
        "running": value(metrics, "imagine_queue_jobs", state="running"),
        "undelivered": value(metrics, "imagine_queue_jobs", state="undelivered"),
        "workers": value(metrics, "imagine_workers_alive"),
        "states": value(metrics, "imagine_kept_state_bytes"),
        "up": value(metrics, "imagine_queue_up"),
    }


async def scrape(http: aiohttp.ClientSession, port: int) -> dict:
    status, text = await get(http, f"http://127.0.0.1:{port}/metrics")
    assert status == 200, text
    return samples(text)


def tracked(queue) -> Observability:
    obs = Observability(refresh_timeout=1.0)
    obs.track_queue(queue)
    obs.track_store(queue)
    obs.track_workers(queue, within=60)
    return obs


async def test_queue_gauges_read_nan_and_queue_up_0_while_a_closed_sqlite_queue_cannot_be_read(tmp_path, caplog):
    factory = QueueFactory("sqlite", str(tmp_path / "queue.db"))
    queue = await factory.open()
    for i in range(3):
        await queue.submit(spec(f"cat {i}"))
    obs = tracked(queue)
    runner = await obs.start_http("127.0.0.1", 0)
    try:
        async with aiohttp.ClientSession() as http:
            before = queue_gauges(await scrape(http, bound_port(runner)))
            assert before == {"length": 3, "queued": 3, "running": 0, "undelivered": 0, "workers": 0, "states": 0,
                              "up": 1}
            await queue.close()   # the store is gone: every read of it raises
            with caplog.at_level(logging.WARNING, logger="engine.observability"):
                during = queue_gauges(await scrape(http, bound_port(runner)))
                again = queue_gauges(await scrape(http, bound_port(runner)))
    finally:
        await runner.cleanup()
        await factory.close_all()
    assert during["up"] == 0 and again["up"] == 0
    for name in ("length", "queued", "running", "undelivered", "workers", "states"):
        assert math.isnan(during[name]) and math.isnan(again[name]), (name, during)
    warnings = [r for r in caplog.records if "queue cannot be read" in r.getMessage()]
    assert len(warnings) == 1   # once per outage, not once per scrape


async def test_queue_gauges_follow_a_redis_server_that_stops_and_comes_back():
    server = start_redis()
    factory = QueueFactory("redis", server.url, prefix="robust")
    try:
        queue = await factory.open()
        await queue.submit(spec())
        await queue.claim("gpu0")   # one running job, one live worker
        await queue.submit(spec("a dog"))
        obs = tracked(queue)
        runner = await obs.start_http("127.0.0.1", 0)
        try:
            async with aiohttp.ClientSession() as http:
                port = bound_port(runner)
                up = queue_gauges(await scrape(http, port))
                assert up == {"length": 1, "queued": 1, "running": 1, "undelivered": 0, "workers": 1, "states": 0,
                              "up": 1}
                server.stop()
                down = queue_gauges(await scrape(http, port))
                assert down["up"] == 0
                assert all(math.isnan(down[k]) for k in down if k != "up"), down
                server.restart()   # no persistence: the store comes back empty
                back = queue_gauges(await scrape(http, port))
                assert back["up"] == 1 and back["length"] == 0 and back["queued"] == 0, back
        finally:
            await runner.cleanup()
    finally:
        await factory.close_all()
        server.stop()


async def test_queue_up_is_only_exported_when_a_queue_is_tracked():
    obs = Observability()
    await obs.refresh()
    assert value(samples(obs.exposition().decode()), "imagine_queue_up") is None


async def test_a_gauge_function_that_raises_reads_nan_and_metrics_still_answers_200(caplog):
    obs = Observability()
    obs.export_worker_metrics()   # a worker's process: what track_worker does first
    obs.metrics.jobs_running.set(2)

    def sticky_cuda_error() -> float:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    obs.set_function(obs.metrics.gpu_memory_allocated.labels("cuda:0"), sticky_cuda_error,
                     "imagine_gpu_memory_allocated_bytes{device=cuda:0}")
    obs.set_function(obs.metrics.gpu_memory_reserved.labels("cuda:0"), lambda: 1024, "reserved")
    runner = await obs.start_http("127.0.0.1", 0)
    try:
        async with aiohttp.ClientSession() as http:
            with caplog.at_level(logging.WARNING, logger="engine.observability"):
                first = await scrape(http, bound_port(runner))
                second = await scrape(http, bound_port(runner))
    finally:
        await runner.cleanup()
    for metrics in (first, second):
        assert math.isnan(value(metrics, "imagine_gpu_memory_allocated_bytes", device="cuda:0"))
        assert value(metrics, "imagine_gpu_memory_reserved_bytes", device="cuda:0") == 1024
        assert value(metrics, "imagine_jobs_running") == 2
    assert len([r for r in caplog.records if "cannot be read" in r.getMessage()]) == 1   # logged once


async def test_a_collector_that_raises_is_left_out_not_a_500():
    """A value function set on a gauge directly (not through Observability.set_function)."""
    obs = Observability()
    obs.export_worker_metrics()
    obs.metrics.jobs_running.set(3)
    obs.metrics.gpu_alive.set_function(lambda: 1 / 0)
    runner = await obs.start_http("127.0.0.1", 0)
    try:
        async with aiohttp.ClientSession() as http:
            metrics = await scrape(http, bound_port(runner))
    finally:
        await runner.cleanup()
    assert value(metrics, "imagine_jobs_running") == 3
    assert value(metrics, "imagine_gpu_thread_alive") is None


# --- capacity with a ResNet CLIP --------------------------------------------------------------------


def resnet_clip():
    """A real, tiny CLIP whose visual is a ModifiedResNet (as RN50's is): vision_layers a tuple."""
    from clip.model import CLIP, ModifiedResNet

    model = CLIP(embed_dim=32, image_resolution=64, vision_layers=(1, 1, 1, 1), vision_width=8,
                 vision_patch_size=None, context_length=77, vocab_size=49408, transformer_width=64,
                 transformer_heads=1, transformer_layers=1).eval()
    assert isinstance(model.visual, ModifiedResNet)
    return model


def test_choose_max_batch_with_a_resnet_clip_answers_1_with_a_warning_naming_why(tiny_models, caplog):
    models = replace(tiny_models, clip=resnet_clip())
    with pytest.raises(capacity.UnknownArchitecture, match="ModifiedResNet"):
        capacity.ClipVisualDims.of(models.clip)
    with caplog.at_level(logging.WARNING, logger="engine.capacity"):
        assert capacity.choose_max_batch("cuda", 8, free_bytes=80 * capacity.GiB, models=models) == 1
    message = " ".join(r.getMessage() for r in caplog.records)
    assert "ModifiedResNet" in message and "max_batch" in message
    # A ViT CLIP still gets the estimate.
    assert capacity.choose_max_batch("cuda", 8, free_bytes=4 * capacity.GiB, models=tiny_models) == capacity.DEFAULT_CAP


# --- the contact sheet's captions ---------------------------------------------------------------------


def _fit_one_char_at_a_time(draw, text: str, font, width: int) -> str:
    """The old `_fit`: the reference result."""
    text = " ".join(text.split())
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text.rstrip() + "..."


class CountingDraw(ImageDraw.ImageDraw):
    calls = 0

    def textlength(self, *args, **kwargs):
        self.calls += 1
        return super().textlength(*args, **kwargs)


CAPTIONS = ["", "a", "a cat", "hello world " * 3, "x" * 400, "word " * 80, "W" * 60, "i" * 300,
            "  spaces   inside  " * 20, "a cat in a hat, oil on canvas — seed 42, 512px", "🐱 猫 tail " * 30]


@pytest.mark.parametrize("width", [0, 5, 40, 124, 252])
def test_fit_gives_the_longest_prefix_that_fits_as_before(width):
    font = contact_sheet._font()
    draw = ImageDraw.Draw(Image.new("RGB", (8, 8)))
    for caption in CAPTIONS:
        text = contact_sheet._drawable(caption, font)
        assert contact_sheet._fit(draw, text, font, width) == _fit_one_char_at_a_time(draw, text, font, width)


def test_fit_measures_a_long_caption_a_logarithmic_number_of_times():
    font = contact_sheet._font()
    draw = CountingDraw(Image.new("RGB", (8, 8)))
    text = contact_sheet._fit(draw, "a long caption " * 140, font, 252)   # 2100 characters
    assert text.endswith("...") and draw.textlength(text, font=font) <= 252
    assert draw.calls - 1 <= 2 + math.ceil(math.log2(2100)), draw.calls   # not ~2000


def test_a_sheet_of_25_tiles_with_2000_character_captions_renders():
    import io

    buf = io.BytesIO()
    Image.new("RGB", (256, 256), (10, 200, 10)).save(buf, "PNG")
    data, name = contact_sheet.render_sheet([(buf.getvalue(), f"{i} " + "x" * 2000) for i in range(25)])
    with Image.open(io.BytesIO(data)) as sheet:
        assert sheet.size == contact_sheet.layout(25, 256).size


# --- lost workers: their jobs' sweep is logged --------------------------------------------------------

async def test_a_sweep_of_lost_workers_jobs_logs_how_many_went_where_with_their_first_10_ids(queue_factory, caplog):
    """Jobs whose worker vanished are swept (requeued, or FAILED "worker lost N times") by a sweep
    or a claim: one WARNING says how many went where, naming the first 10 ids, not silence."""
    import asyncio

    q = await queue_factory.open(lease=0.3, max_attempts=2)
    caplog.set_level(logging.WARNING, logger="engine.queue")
    jobs = [await q.submit(spec(f"job {i}")) for i in range(12)]
    for _ in jobs:
        assert await q.claim("w1") is not None
    await asyncio.sleep(0.45)
    assert await q.sweep() == 12
    said = [r.getMessage() for r in caplog.records if "swept" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("swept 12 jobs whose worker was lost"), said
    named = [j.id for j in jobs if j.id in said[0]]
    assert len(named) == 10 and "12 requeued: " in said[0] and " and 2 more" in said[0], said

    caplog.clear()
    lost = await q.claim("w2")   # a second attempt, lost too: the next claim's sweep fails it
    await asyncio.sleep(0.45)
    await q.claim("w3")
    said = [r.getMessage() for r in caplog.records if "swept" in r.getMessage()]
    assert len(said) == 1 and "1 failed (out of attempts): " + lost.id in said[0], said
    assert (await q.get(lost.id)).error == "worker lost 2 times"
    caplog.clear()
    assert await q.sweep() == 0   # nothing expired: nothing said
    assert not [r for r in caplog.records if "swept" in r.getMessage()]


def test_outage_log_says_the_first_failure_with_its_traceback_a_line_a_minute_and_its_end(caplog):
    from engine.outage import OutageLog

    now = [0.0]
    outage = OutageLog(logging.getLogger("test.outage"), "heartbeats", clock=lambda: now[0])
    caplog.set_level(logging.DEBUG, logger="test.outage")
    outage.worked()   # nothing failed: nothing said
    for second in range(150):   # 3 jobs failing every second for 150 s
        now[0] = float(second)
        for job in range(3):
            try:
                raise OSError("database or disk is full")
            except OSError as exc:
                outage.failed(exc, f"job {job}")
    now[0] = 151.0
    outage.worked(began=-1.0)   # in flight since before the outage began: says nothing of its end
    outage.worked()
    outage.worked()
    said = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.getMessage().split(" (")[0] for r in said] == [
        "heartbeats failed", "heartbeats still fail", "heartbeats still fail", "heartbeats work again"]
    assert said[0].exc_info is not None and not any(r.exc_info for r in said[1:])
    assert "for 60 s, 181 failures; the last (job 0): OSError: database or disk is full" in said[1].getMessage()
    assert said[3].getMessage() == "heartbeats work again (they failed for 151 s, 450 failures)"

    # A blip that nothing said the end of (no call worked since: a worker gone idle), then another
    # outage a day later: said as a new one, with its traceback, not "still fail (for 86400 s".
    caplog.clear()
    for moment in (200.0, 86_600.0):
        now[0] = moment
        try:
            raise OSError("database or disk is full")
        except OSError as exc:
            outage.failed(exc, "job 0")
    said = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.getMessage().split(" (")[0] for r in said] == ["heartbeats failed", "heartbeats failed"]
    assert all(r.exc_info for r in said)
