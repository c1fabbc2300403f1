"""Sharding end to end: the real bot (discord.py's AutoShardedBot) against the fake Discord with two
guilds on different shards, the real SQLite queue and the embedded worker on the tiny models.

The fake does what Discord does: GET /gateway/bot recommends a shard count, each IDENTIFY carries
`shard: [id, count]`, a guild's events go only to the session of shard `(guild_id >> 22) % count`,
an IDENTIFY with too few shards is closed with 4011, and a dropped shard's events wait for its
RESUME."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from bot.__main__ import main
from engine.jobs import JobState
from tests.fakediscord import FakeDiscord, FakeGuild, InteractionRecord
from tests.test_bot_support import Harness, test_config
from tests.metrics_support import get

pytestmark = pytest.mark.asyncio


@pytest_asyncio.fixture
async def make_harness(tmp_path, tiny_models):
    made: list[Harness] = []

    async def make(*, discord: dict[str, Any] | None = None, **fake_options: Any) -> Harness:
        fd = await FakeDiscord(**fake_options).start()
        h = Harness(fd=fd, config=test_config(tmp_path, discord=discord or {}), models=tiny_models, http_port=0)
        made.append(h)
        return h

    try:
        yield make
    finally:
        for h in made:
            await h.stop()
            await h.fd.close()


async def discord_health(h: Harness, http: aiohttp.ClientSession) -> tuple[int, dict]:
    code, body = await get(http, f"http://127.0.0.1:{h.resources.http_port}/healthz")
    return code, json.loads(body)["checks"]["discord"]


async def shard_metrics(h: Harness, http: aiohttp.ClientSession) -> dict[str, dict[str, float]]:
    code, text = await get(http, f"http://127.0.0.1:{h.resources.http_port}/metrics")
    assert code == 200
    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in ("imagine_discord_shard_connected", "imagine_discord_gateway_latency_seconds"):
                out.setdefault(s.name, {})[s.labels["shard"]] = s.value
    return out


async def wait_health(h: Harness, http: aiohttp.ClientSession, ok: bool, timeout: float = 10.0) -> dict:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        code, report = await discord_health(h, http)
        if report["ok"] is ok:
            assert code == (200 if ok else 503)
            return report
        if loop.time() > deadline:
            raise TimeoutError(f"discord health did not become ok={ok}: {report}")
        await asyncio.sleep(0.05)


async def imagine_in(h: Harness, guild: FakeGuild, prompt: str) -> InteractionRecord:
    inter = await h.fd.send_slash_command("imagine", {"prompt": prompt}, guild_id=guild.id)
    await h.fd.wait_for_response(inter)
    return inter


async def assert_posted(h: Harness, inter: InteractionRecord, guild: FakeGuild) -> None:
    """The job was queued (the reply names it) and its result posted on the reply, in the guild."""
    msg = await h.reply_of(inter)
    job_id = h.job_id(msg)
    record = await h.wait_delivered(job_id)
    assert record.state == JobState.DONE
    assert record.spec.guild_id == guild.id
    (final,) = h.final_edits(msg.id)
    assert sorted(f.filename for f in final.files) == ["final.png", "video.mp4"]
    assert msg.channel_id == guild.channel_id


def interaction_ids(session) -> list[str]:
    return [d["id"] for d in session.events("INTERACTION_CREATE")]


async def test_two_recommended_shards_serve_both_guilds_and_health_follows_each_shard(make_harness):
    h = await make_harness(shards=2, require_sharding=True, max_concurrency=2)
    fd = h.fd
    first = fd.guild()
    second = fd.add_guild("Second Guild", shard_id=1 - fd.shard_of(first.id))
    assert {fd.shard_of(first.id), fd.shard_of(second.id)} == {0, 1}
    await h.start()
    bot = h.bot

    # No count configured: discord.py asked Discord, and one process identified both shards.
    assert h.config.discord.shard_count == 0 and bot.shard_count == 2
    assert fd.find_requests("GET", "/gateway/bot", status=200)
    assert [i["shard"] for i in fd.identifies] == [[0, 2], [1, 2]]
    assert fd.live_shards == [[0, 2], [1, 2]]
    session = {s.shard_id: s for s in fd.sessions}
    for g in (first, second):   # each guild arrived on its own shard only
        owner = fd.shard_of(g.id)
        assert [d["id"] for d in session[owner].events("GUILD_CREATE")] == [str(g.id)]
        assert bot.get_guild(g.id) is not None and bot.get_guild(g.id).shard_id == owner

    async with aiohttp.ClientSession() as http:
        report = await wait_health(h, http, ok=True)
        assert set(report["shards"]) == {"0", "1"}
        for shard in report["shards"].values():
            assert shard["state"] == "ready" and 0 <= shard["latency"] < 5
        m = await shard_metrics(h, http)
        assert m["imagine_discord_shard_connected"] == {"0": 1.0, "1": 1.0}
        assert set(m["imagine_discord_gateway_latency_seconds"]) == {"0", "1"}

        # /imagine in each guild: the interaction reaches only its guild's shard; queued, posted.
        for g in (first, second):
            inter = await imagine_in(h, g, f"a lighthouse in {g.name}")
            owner = fd.shard_of(g.id)
            assert str(inter.id) in interaction_ids(session[owner])
            assert str(inter.id) not in interaction_ids(session[1 - owner])
            await assert_posted(h, inter, g)

        # The second guild's shard drops. Until it has resumed, Discord is not ok.
        down, up = fd.shard_of(second.id), fd.shard_of(first.id)
        fd.hold_resumes()
        sent = len(fd.gateway_received)
        assert await fd.drop_connection(down) == 1
        await fd.wait_for(lambda: any(p.get("op") == 6 for p in fd.gateway_received[sent:]), 10,
                          "the dropped shard's RESUME")
        code, report = await discord_health(h, http)
        assert code == 503 and report["ok"] is False
        assert report["shards"][str(down)]["state"] == "disconnected"
        assert report["shards"][str(up)]["state"] == "ready"
        assert report["error"] == f"shard {down} is not connected (disconnected)"
        m = await shard_metrics(h, http)
        assert m["imagine_discord_shard_connected"] == {str(down): 0.0, str(up): 1.0}
        assert str(up) in m["imagine_discord_gateway_latency_seconds"]

        # A command in the dropped shard's guild waits for that shard (never the other one) ...
        inter = await fd.send_slash_command("imagine", {"prompt": "a lighthouse after the storm"},
                                            guild_id=second.id)
        assert str(inter.id) in interaction_ids(session[down])
        assert str(inter.id) not in interaction_ids(session[up])
        assert not inter.acknowledged
        fd.release_resumes()
        # ... and is answered once the shard has resumed (the events are replayed).
        await fd.wait_for_response(inter, timeout=10)
        report = await wait_health(h, http, ok=True)
        assert {s["state"] for s in report["shards"].values()} == {"ready"}
        assert (fd.identify_count, fd.resume_count) == (2, 1)
        assert fd.live_shards == [[0, 2], [1, 2]]
        await assert_posted(h, inter, second)
        m = await shard_metrics(h, http)
        assert m["imagine_discord_shard_connected"] == {"0": 1.0, "1": 1.0}
    fd.assert_clean()


async def test_a_configured_shard_count_is_used_instead_of_the_recommendation(make_harness):
    h = await make_harness(discord={"shard_count": 3}, shards=2, require_sharding=True, max_concurrency=2)
    fd = h.fd
    third = fd.add_guild("Third Guild", shard_id=2, shard_count=3)
    await h.start()
    bot = h.bot

    assert bot.shard_count == 3
    assert [i["shard"] for i in fd.identifies] == [[0, 3], [1, 3], [2, 3]]
    # Asked once, for max_concurrency (2): shards 0 and 1 identify at once; shard 2 shares shard 0's
    # bucket (2 % 2) and waits out Discord's 5 seconds.
    assert len(fd.find_requests("GET", "/gateway/bot")) == 1
    at = [i["at"] for i in fd.identifies]
    assert at[1] - at[0] < 2.5 and at[2] - at[0] >= 4.9
    session = {s.shard_id: s for s in fd.sessions}
    for shard_id in range(3):   # each shard got exactly its guilds, by the count of 3
        mine = [str(g.id) for g in fd.guilds.values() if fd.shard_of(g.id, 3) == shard_id]
        assert [d["id"] for d in session[shard_id].events("GUILD_CREATE")] == mine
    assert str(third.id) in [d["id"] for d in session[2].events("GUILD_CREATE")]
    assert {g.id: g.shard_id for g in bot.guilds} == {g: fd.shard_of(g, 3) for g in fd.guilds}

    inter = await imagine_in(h, third, "a lighthouse on the third shard")
    assert str(inter.id) in interaction_ids(session[2])
    await assert_posted(h, inter, third)
    async with aiohttp.ClientSession() as http:
        report = await wait_health(h, http, ok=True)
        assert set(report["shards"]) == {"0", "1", "2"}
    fd.assert_clean()


async def test_too_few_shards_stop_the_bot_with_a_clear_message(tmp_path, capsys, monkeypatch):
    async with FakeDiscord(shards=2, require_sharding=True) as fd:
        cfg = tmp_path / "config.toml"
        cfg.write_text(f'[queue]\nurl = "sqlite:///{tmp_path / "q.db"}"\n[worker]\nembedded = false\n'
                       "[discord]\nshard_count = 1\n")
        monkeypatch.setenv("DISCORD_TOKEN", fd.bot_token)
        # main() runs its own event loop: give it a thread, the fake keeps serving on this loop.
        code = await asyncio.to_thread(main, ["--config", str(cfg)])
        logging.getLogger().handlers[:] = [h for h in logging.getLogger().handlers
                                           if type(h).__module__.startswith("_pytest")]
        assert code == 2
        err = capsys.readouterr().err
        assert "4011 (sharding required)" in err and "[discord] shard_count = 1 is too few shards" in err
        assert "shard_count = 0" in err and fd.bot_token not in err
        assert [i["shard"] for i in fd.identifies] == []   # refused: no session was made
        assert [p["d"].get("shard") for p in fd.gateway_received if p.get("op") == 2] == [[0, 1]]


async def test_a_token_revoked_while_the_bot_runs_stops_it_with_a_clear_message(tmp_path, capsys, monkeypatch):
    """The token is reset in the Developer Portal while the bot runs: Discord closes the gateway with
    4004 (authentication failed), which no reconnect mends. One line saying so, exit 2 (a setting
    to fix), never the token. Before: a traceback ending in ConnectionClosed, exit 1."""
    async with FakeDiscord() as fd:
        cfg = tmp_path / "config.toml"
        cfg.write_text(f'[queue]\nurl = "sqlite:///{tmp_path / "q.db"}"\n[worker]\nembedded = false\n')
        monkeypatch.setenv("DISCORD_TOKEN", fd.bot_token)
        token = fd.bot_token
        # main() runs its own event loop: give it a thread, the fake keeps serving on this loop.
        running = asyncio.ensure_future(asyncio.to_thread(main, ["--config", str(cfg)]))
        try:
            await fd.wait_until_connected(60)
            # Reset in the Developer Portal: the old token is refused from now on (the gateway's
            # IDENTIFY and RESUME too, so a reconnect racing the close ends the same way).
            fd.bot_token = "a-new-token"
            await fd.drop_connection(code=4004)
            code = await asyncio.wait_for(running, 60)
        finally:
            if not running.done():   # failed before the reset: end the bot's thread, or the loop waits for it
                fd.bot_token = "a-new-token"
                await fd.drop_connection(code=4004)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(running, 60)
            logging.getLogger().handlers[:] = [h for h in logging.getLogger().handlers
                                               if type(h).__module__.startswith("_pytest")]
        assert code == 2
        err = capsys.readouterr().err
        assert "4004 (authentication failed)" in err and "Bot > Reset Token" in err, err
        assert "Traceback" not in err and token not in err
