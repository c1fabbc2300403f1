"""The fake Discord server works with the real discord.py client (no mocks inside discord.py)."""

from __future__ import annotations

import asyncio
import hashlib
import io
import struct
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Dict, List

import aiohttp
import discord
import pytest
import pytest_asyncio
from discord import app_commands
from discord.ext import commands

from tests.fakediscord import FakeDiscord, running_bot

pytestmark = pytest.mark.asyncio

WEBHOOK_ORIGINAL = r"/webhooks/\d+/[^/]+/messages/@original"


def tiny_png(width: int = 2, height: int = 3) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(b"\x00" + b"\xff\x00\x00" * width for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


PNG = tiny_png()


@dataclass
class BotState:
    interactions: Dict[str, discord.Interaction] = field(default_factory=dict)  # by command/button name
    errors: List[BaseException] = field(default_factory=list)
    done: Dict[str, asyncio.Event] = field(default_factory=dict)
    described: Dict[str, Any] = field(default_factory=dict)

    def event(self, name: str) -> asyncio.Event:
        return self.done.setdefault(name, asyncio.Event())


class PingView(discord.ui.View):
    def __init__(self, state: BotState) -> None:
        super().__init__(timeout=None)
        self.state = state

    @discord.ui.button(label="Again", style=discord.ButtonStyle.primary, custom_id="ping:again")
    async def again(self, interaction: discord.Interaction, button: discord.ui.Button) -> None:
        self.state.interactions["again"] = interaction
        await interaction.response.send_message("pong again", ephemeral=True)
        self.state.event("again").set()


def make_bot(state: BotState) -> commands.Bot:
    bot = commands.Bot(
        command_prefix=commands.when_mentioned,
        intents=discord.Intents.default(),
        allowed_mentions=discord.AllowedMentions.none(),
    )

    @bot.tree.command(name="ping", description="Answer with a picture")
    @app_commands.describe(text="what to echo")
    async def ping(interaction: discord.Interaction, text: str) -> None:
        state.interactions["ping"] = interaction
        await interaction.response.defer(thinking=True)
        await interaction.edit_original_response(
            content=f"pong: {text} <@{interaction.user.id}>",
            attachments=[discord.File(io.BytesIO(PNG), filename="pong.png")],
            view=PingView(state),
        )
        await interaction.followup.send(f"follow-up for {text}")
        state.event("ping").set()

    @bot.tree.command(name="describe", description="Describe an uploaded image")
    async def describe(interaction: discord.Interaction, image: discord.Attachment) -> None:
        data = await image.read()
        state.described.update(name=image.filename, size=len(data), sha=hashlib.sha256(data).hexdigest(),
                               width=image.width)
        await interaction.response.send_message(f"{image.filename}: {len(data)} bytes", ephemeral=True)
        state.event("describe").set()

    queue = app_commands.Group(name="queue", description="Queue administration")

    @queue.command(name="clear", description="Clear the queue")
    async def clear(interaction: discord.Interaction, force: bool = False) -> None:
        state.described.update(force=force, admin=interaction.permissions.administrator)
        await interaction.response.send_message("cleared", ephemeral=True)
        state.event("clear").set()

    bot.tree.add_command(queue)

    @bot.tree.error
    async def on_tree_error(interaction: discord.Interaction, error: app_commands.AppCommandError) -> None:
        state.errors.append(error)

    return bot


@pytest_asyncio.fixture
async def fd():
    async with FakeDiscord() as fake:
        yield fake
        fake.assert_clean()


@pytest_asyncio.fixture
async def env(fd: FakeDiscord):
    state = BotState()
    bot = make_bot(state)
    async with running_bot(fd, bot):
        yield fd, bot, state
    assert not state.errors, state.errors


async def run_ping(fd: FakeDiscord, bot: commands.Bot, state: BotState, text: str = "hello"):
    inter = await fd.send_slash_command("ping", {"text": text}, user=fd.admin_user)
    await asyncio.wait_for(state.event("ping").wait(), 5)
    return inter


async def test_connects_and_sees_the_guild(env) -> None:
    fd, bot, state = env
    assert bot.user is not None and bot.user.id == fd.application_id
    assert bot.application_id == fd.application_id
    guild = bot.get_guild(fd.guild_id)
    assert guild is not None and not guild.unavailable
    assert {c.name for c in guild.text_channels} == {"general", "imagine"}
    admin_role = guild.get_role(fd.admin_role_id)
    assert admin_role is not None and admin_role.permissions.administrator
    assert guild.me is not None and guild.member_count == 3
    # discord.py asked for zlib-stream transport compression and JSON, API v10
    assert fd.gateway_connects[0] == {"v": "10", "encoding": "json", "compress": "zlib-stream"}
    assert fd.identify_count == 1
    assert [r.path for r in fd.requests] == ["/users/@me", "/oauth2/applications/@me"]
    # heartbeats are answered (the first one is sent right after HELLO)
    assert any(p.get("op") == 1 for p in fd.gateway_received)


async def test_slash_command_defer_edit_with_png_followup_and_button(env) -> None:
    fd, bot, state = env
    synced = await bot.tree.sync()
    assert {c.name for c in synced} == {"ping", "describe", "queue"}
    [put] = fd.find_requests("PUT", route="/applications/{application_id}/commands")
    assert put.status == 200 and put.spec_route == "/applications/{application_id}/commands"
    assert {c["name"] for c in put.json} == {"ping", "describe", "queue"}
    assert {c["name"] for c in fd.global_commands} == {"ping", "describe", "queue"}

    inter = await run_ping(fd, bot, state)
    assert state.interactions["ping"].id == inter.id
    assert state.interactions["ping"].namespace.text == "hello"
    assert "guild_id" not in inter.payload["data"]  # a global command
    assert inter.payload["data"]["id"] == str(next(c.id for c in synced if c.name == "ping"))
    assert inter.response_type == 5
    assert inter.callback_request.json == {"type": 5}

    patch = fd.find_requests("PATCH", WEBHOOK_ORIGINAL)
    assert len(patch) == 1 and patch[0].status == 200 and patch[0].multipart
    assert patch[0].files[0].data == PNG and patch[0].files[0].filename == "pong.png"
    assert patch[0].files[0].field_name == "files[0]"
    assert patch[0].json["allowed_mentions"] == {"parse": []}
    assert patch[0].json["attachments"] == [{"id": 0, "filename": "pong.png"}]

    original = inter.original_message
    assert original is not None and not original.ephemeral
    assert original.content == f"pong: hello <@{fd.admin_user['id']}>"
    assert original.data["mentions"] == []  # allowed_mentions none: the echoed mention does not ping
    assert original.custom_ids == ["ping:again"]
    assert original.flags & 128 == 0  # no longer "thinking"
    [att] = original.attachments
    assert (att["filename"], att["content_type"], att["width"], att["height"]) == ("pong.png", "image/png", 2, 3)
    async with aiohttp.ClientSession() as http:  # the attachment is served by the fake's CDN
        async with http.get(att["url"]) as resp:
            assert resp.status == 200 and await resp.read() == PNG
    [follow] = inter.followups
    assert follow.content == "follow-up for hello"
    assert [m.id for m in fd.channel_messages()] == [original.id, follow.id]

    click = await fd.click_button(original, "ping:again")
    await asyncio.wait_for(state.event("again").wait(), 5)
    await fd.wait_for_response(click)
    assert click.response_type == 4
    assert state.interactions["again"].message is not None and state.interactions["again"].message.id == original.id
    reply = click.original_message
    assert reply.ephemeral and reply.content == "pong again"
    assert reply not in fd.channel_messages()  # ephemeral messages are not in the channel's history


async def test_subcommand_and_attachment_option(env) -> None:
    fd, bot, state = env
    guild = discord.Object(fd.guild_id)
    bot.tree.copy_global_to(guild=guild)
    await bot.tree.sync(guild=guild)
    assert {c["name"] for c in fd.guild_commands[fd.guild_id]} == {"ping", "describe", "queue"}
    image = fd.host_attachment("cat.png", PNG, "image/png")
    inter = await fd.send_slash_command("describe", {"image": image})
    await asyncio.wait_for(state.event("describe").wait(), 5)
    assert state.described["name"] == "cat.png" and state.described["size"] == len(PNG)
    assert state.described["sha"] == hashlib.sha256(PNG).hexdigest() and state.described["width"] == 2
    assert len(fd.cdn_requests) == 1 and fd.cdn_requests[0].status == 200
    await fd.wait_for_response(inter)
    assert inter.original_message.ephemeral
    assert inter.payload["data"]["guild_id"] == str(fd.guild_id)  # a guild command now

    inter = await fd.send_slash_command("queue clear", {"force": True}, user=fd.admin_user)
    await asyncio.wait_for(state.event("clear").wait(), 5)
    assert inter.payload["data"]["options"] == [
        {"name": "clear", "type": 1, "options": [{"name": "force", "type": 5, "value": True}]}]
    assert state.described == {**state.described, "force": True, "admin": True}


async def test_rate_limit_is_waited_out_and_the_edit_lands_once(env) -> None:
    fd, bot, state = env
    rule = fd.rate_limit("PATCH", WEBHOOK_ORIGINAL, count=1, retry_after=0.2)
    inter = await run_ping(fd, bot, state)
    assert len(rule.hits) == 1 and rule.hits[0].status == 429
    assert rule.hits[0].response_headers["Via"] and rule.hits[0].response["retry_after"] == 0.2
    patches = fd.find_requests("PATCH", WEBHOOK_ORIGINAL)
    assert [p.status for p in patches] == [429, 200]
    assert patches[1].monotonic - patches[0].monotonic >= 0.19  # discord.py slept retry_after
    assert inter.original_message.edits == 1
    assert len(inter.original_message.attachments) == 1

    # the bot-token path (discord.http.HTTPClient) waits out a 429 too
    channel = bot.get_channel(fd.channel_id)
    rule = fd.rate_limit("POST", rf"/channels/{fd.channel_id}/messages", retry_after=0.05)
    sent = await channel.send("hello channel")
    assert len(rule.hits) == 1
    assert [m.content for m in fd.channel_messages()][-1] == "hello channel"
    assert fd.messages[sent.id].content == "hello channel"
    ok = fd.find_requests("POST", rf"/channels/{fd.channel_id}/messages", status=200)
    assert len(ok) == 1 and ok[0].response_headers["X-RateLimit-Bucket"]


async def test_expired_token_and_deleted_message(env) -> None:
    fd, bot, state = env
    inter = await run_ping(fd, bot, state)
    interaction = state.interactions["ping"]

    # a deleted message answers edits with 404 / 10008, both through the token and the channel
    await fd.delete_message(fd.channel_id, inter.original_message_id)
    with pytest.raises(discord.NotFound) as err:
        await interaction.edit_original_response(content="too late")
    assert err.value.code == 10008
    with pytest.raises(discord.NotFound) as err:
        await bot.get_channel(fd.channel_id).get_partial_message(inter.original_message_id).edit(content="x")
    assert err.value.code == 10008

    # after 15 minutes the interaction token is dead: 401 / 50027 ...
    fd.expire_tokens()
    with pytest.raises(discord.HTTPException) as err:
        await interaction.followup.send("still there?")
    assert (err.value.status, err.value.code) == (401, 50027)
    # ... while the bot token still edits the channel message
    follow = inter.followups[0]
    edited = await bot.get_channel(fd.channel_id).get_partial_message(follow.id).edit(content="edited by channel")
    assert edited.content == "edited by channel" and follow.content == "edited by channel"
    assert follow.data["edited_timestamp"] is not None


async def test_token_expiry_is_configurable(fd: FakeDiscord) -> None:
    state = BotState()
    async with running_bot(fd, make_bot(state)):
        inter = await run_ping(fd, None, state)
        await state.interactions["ping"].edit_original_response(content="still fresh")
        fd.token_expiry = time.monotonic() - inter.created + 0.2  # dies 0.2 s from now
        await asyncio.sleep(0.25)  # the clock is what is under test here
        with pytest.raises(discord.HTTPException) as err:
            await state.interactions["ping"].edit_original_response(content="late")
        assert (err.value.status, err.value.code) == (401, 50027)


async def test_invalid_bodies_are_rejected_and_recorded(env) -> None:
    fd, bot, state = env
    async with aiohttp.ClientSession() as http:
        url = f"{fd.api_base}/channels/{fd.channel_id}/messages"
        headers = {"Authorization": f"Bot {fd.bot_token}"}
        async with http.post(url, json={"content": "hi", "embeds": [{"title": "x" * 300}]}, headers=headers) as resp:
            body = await resp.json()
        assert resp.status == 400 and body["code"] == 50035
        assert "embeds" in body["errors"]
        async with http.post(url, json={"content": "hi"}) as resp:  # no bot token
            assert resp.status == 401
        async with http.get(f"{fd.api_base}/guilds/{fd.guild_id}/bans", headers=headers) as resp:
            assert resp.status == 404
    assert len(fd.violations) == 1 and "embeds.0.title" in fd.violations[0].message
    assert [r.path for r in fd.unknown_requests] == [f"/guilds/{fd.guild_id}/bans"]

    # discord.py surfaces the 400 as HTTPException with Discord's code
    with pytest.raises(discord.HTTPException) as err:
        await bot.get_channel(fd.channel_id).send("x" * 2001)
    assert (err.value.status, err.value.code) == (400, 50035)
    assert len(fd.violations) == 2 and fd.violations[1].message.startswith("content")
    fd.violations.clear()
    fd.requests.clear()  # the fixture asserts nothing unexpected was called


async def test_gateway_reconnect_resumes(env) -> None:
    fd, bot, state = env
    await fd.request_reconnect()
    await fd.wait_for(lambda: fd.resume_count == 1, 5, "a RESUME")
    await fd.wait_until_connected()
    assert fd.identify_count == 1 and len(fd.gateway_connects) == 2
    await run_ping(fd, bot, state, "after resume")
    assert fd.channel_messages()[-1].content == "follow-up for after resume"


async def test_edit_keeps_listed_attachments_and_adds_new_files(env) -> None:
    fd, bot, state = env
    channel = bot.get_channel(fd.channel_id)
    msg = await channel.send("two files", files=[discord.File(io.BytesIO(b"a" * 10), "a.png"),
                                                 discord.File(io.BytesIO(b"b" * 20), "b.mp4")])
    stored = fd.messages[msg.id]
    assert [a["filename"] for a in stored.attachments] == ["a.png", "b.mp4"]
    assert stored.attachments[1]["content_type"] == "video/mp4"
    since = len(fd.requests)
    msg = await msg.edit(attachments=[msg.attachments[0], discord.File(io.BytesIO(b"c" * 30), "c.png")])
    req = await fd.wait_for_request("PATCH", rf"/channels/{fd.channel_id}/messages/{msg.id}", since=since)
    assert req.json["attachments"][1] == {"id": 0, "filename": "c.png"}
    assert [a.filename for a in msg.attachments] == ["a.png", "c.png"]
    assert [fd.attachment_bytes(a) for a in stored.attachments] == [b"a" * 10, b"c" * 30]
    msg = await msg.edit(content="no attachments key: all kept")
    assert [a.filename for a in msg.attachments] == ["a.png", "c.png"]
    msg = await msg.edit(attachments=[])
    assert msg.attachments == [] and stored.attachments == []
    assert stored.edits == 3 and len(stored.history) == 3

    fd.attachment_size_limit = 1000  # what each file must stay under (interaction.filesize_limit)
    with pytest.raises(discord.HTTPException) as err:
        await channel.send(file=discord.File(io.BytesIO(b"x" * 1001), "big.mp4"))
    assert (err.value.status, err.value.code) == (413, 40005)
    # Per file, as Discord checks an app's uploads (since 2025-04): two that each fit go up
    # together, 1600 bytes in all; one over it refuses the message, however small the rest.
    msg = await channel.send(files=[discord.File(io.BytesIO(b"p" * 800), "final.png"),
                                    discord.File(io.BytesIO(b"v" * 800), "video.mp4")])
    assert [fd.attachment_bytes(a) for a in fd.messages[msg.id].attachments] == [b"p" * 800, b"v" * 800]
    with pytest.raises(discord.HTTPException) as err:
        await channel.send(files=[discord.File(io.BytesIO(b"p" * 10), "final.png"),
                                  discord.File(io.BytesIO(b"v" * 1001), "video.mp4")])
    assert (err.value.status, err.value.code) == (413, 40005)


async def _identify(fd: FakeDiscord, http: aiohttp.ClientSession, shard=None, *, resume=None):
    """A raw gateway client: HELLO, then IDENTIFY (``shard`` as given) or RESUME ``(session_id, seq)``."""
    ws = await http.ws_connect(f"{fd.gateway_url}?v=10&encoding=json")
    hello = await ws.receive_json(timeout=5)
    assert hello["op"] == 10
    if resume is not None:
        await ws.send_json({"op": 6, "d": {"token": fd.bot_token, "session_id": resume[0], "seq": resume[1]}})
    else:
        d: Dict[str, Any] = {"token": fd.bot_token, "intents": 1, "properties": {}}
        if shard is not None:
            d["shard"] = shard
        await ws.send_json({"op": 2, "d": d})
    return ws


async def _events(ws, until: str) -> List[Dict[str, Any]]:
    out = []
    while True:
        msg = await ws.receive_json(timeout=5)
        if msg["op"] == 0:
            out.append(msg)
            if msg["t"] == until:
                return out


async def test_shards_get_only_their_guilds_and_a_dropped_shard_gets_its_events_on_resume() -> None:
    async with FakeDiscord(shards=2, require_sharding=True) as fd, aiohttp.ClientSession() as http:
        first = fd.guild()
        second = fd.add_guild("Second Guild", shard_id=1 - fd.shard_of(first.id))
        assert fd.shard_of(second.id) != fd.shard_of(first.id) and len(fd.guilds) == 2
        assert {c["guild_id"] for c in fd.channels.values() if c["name"] == "general"} == {str(first.id), str(second.id)}

        async with http.get(f"{fd.api_base}/gateway/bot", headers={"Authorization": f"Bot {fd.bot_token}"}) as resp:
            assert (await resp.json())["shards"] == 2
        # Too few shards (or none) is refused like Discord does; a shard id outside the count too.
        for shard, code in ((None, 4011), ([0, 1], 4011), ([2, 2], 4010), ([0, 0], 4010)):
            ws = await _identify(fd, http, shard)
            msg = await ws.receive(timeout=5)
            assert msg.type == aiohttp.WSMsgType.CLOSE and ws.close_code == code, (shard, msg)
            await ws.close()
        assert fd.identify_count == 0

        ws = {}
        for shard_id in (0, 1):
            ws[shard_id] = await _identify(fd, http, [shard_id, 2])
        got = {}
        for shard_id in (0, 1):
            events = await _events(ws[shard_id], "GUILD_CREATE")
            assert [e["t"] for e in events] == ["READY", "GUILD_CREATE"]
            ready, guild = events[0]["d"], events[1]["d"]
            assert ready["shard"] == [shard_id, 2]
            got[shard_id] = [g["id"] for g in ready["guilds"]], guild["id"]
        for g in (first, second):
            owner = fd.shard_of(g.id)
            assert got[owner] == ([str(g.id)], str(g.id))
            assert {c["name"] for c in fd.guild_payload(g.id)["channels"]} == {"Text Channels", "general", "imagine"}
        assert fd.live_shards == [[0, 2], [1, 2]]

        # A guild's event goes to its shard only; an event of no guild (a DM) to shard 0.
        down = fd.shard_of(second.id)
        await fd.dispatch("TEST_EVENT", {"guild_id": str(second.id), "n": 1})
        await fd.dispatch("TEST_EVENT", {"n": 2})
        assert [e["d"]["n"] for e in await _events(ws[down], "TEST_EVENT")] == [1]
        by_shard = {s.shard_id: [d["n"] for d in s.events("TEST_EVENT")] for s in fd.sessions}
        assert by_shard == ({0: [1, 2], 1: []} if down == 0 else {0: [2], 1: [1]})
        session = next(s for s in fd.sessions if s.shard_id == down)
        seq = session.seq

        # The shard's connection drops: its guild's events wait for its RESUME, and never go elsewhere.
        assert await fd.drop_connection(down) == 1
        await fd.wait_for(lambda: fd.live_shards == [[1 - down, 2]], 5, "the drop")
        await fd.dispatch("TEST_EVENT", {"guild_id": str(second.id), "n": 3})
        assert session.events("TEST_EVENT")[-1]["n"] == 3
        other = next(s for s in fd.sessions if s.shard_id != down)
        assert 3 not in [d["n"] for d in other.events("TEST_EVENT")]
        resumed = await _identify(fd, http, resume=(session.session_id, seq))
        events = await _events(resumed, "RESUMED")
        assert [(e["t"], e["d"].get("n")) for e in events] == [("TEST_EVENT", 3), ("RESUMED", None)]
        assert fd.resume_count == 1 and fd.live_shards == [[0, 2], [1, 2]]
        for w in (resumed, *ws.values()):
            await w.close()
    fd.assert_clean()
