"""The slash commands on Discord: the start-up drift check (bot.launcher.sync_if_unregistered) sees
where and by whom a command may be used, not only its options; `imagine-bot sync --global` and
`sync --clear-guild ID`, run for real against the fake Discord."""

from __future__ import annotations

import asyncio
import logging

import discord
import pytest
from discord import app_commands

from bot.__main__ import main
from bot.client import ImagineBot
from bot.config import Config, config_from_dict
from bot.launcher import sync_if_unregistered
from tests.fakediscord import FakeDiscord
from tests.test_bot_config import _drop_discord_log_handlers

NAMES = {"imagine", "queue", "queue-admin", "history", "remix", "help"}


@app_commands.command(name="lewd", description="an extra command with permissions and nsfw set", nsfw=True)
@app_commands.default_permissions(manage_guild=True)   # 32: Discord keeps it as the string "32"
async def _restricted(interaction: discord.Interaction) -> None:
    pass


async def _start_check(fd: FakeDiscord, caplog, guild_id: int | None = None, extra: bool = False,
                       config: Config | None = None) -> list[str]:
    """One start's check of the commands (registering them when Discord has none): its warnings
    (not discord.py's about voice). `config`: the built-in defaults when None."""
    caplog.clear()
    bot = ImagineBot(config=config or Config(), queue=None, background=False)
    async with bot:
        await bot.login(fd.bot_token)   # setup_hook: the cogs add their commands
        if extra:
            bot.tree.add_command(_restricted)
        await sync_if_unregistered(bot, guild_id)
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name == "bot.launcher"]


def _named(warning: str) -> set[str]:
    return set(warning.split("(")[1].split(":")[0].split(", "))


def _stored(commands: list[dict], name: str) -> dict:
    return next(c for c in commands if c["name"] == name)


@pytest.mark.parametrize("scope", ["global", "guild"])
async def test_freshly_synced_commands_read_as_unchanged_whatever_discord_leaves_out(caplog, scope):
    """Discord sends permissions as a string (the bot, an int), and may leave out nsfw and
    dm_permission, and a server copy's contexts and installs (global-only fields): none of that is a
    difference. An extra command has permissions and nsfw set, so they are compared for real."""
    caplog.set_level(logging.INFO)
    async with FakeDiscord() as fd:
        guild_id = fd.guild_id if scope == "guild" else None
        assert await _start_check(fd, caplog, guild_id, extra=True) == []
        stored = fd.guild_commands[guild_id] if guild_id else fd.global_commands
        assert {c["name"] for c in stored} == NAMES | {"lewd"}
        lewd = _stored(stored, "lewd")
        assert (lewd["default_member_permissions"], lewd["nsfw"]) == ("32", True)
        assert await _start_check(fd, caplog, guild_id, extra=True) == []

        for command in stored:   # what Discord may omit or null
            for field in ("dm_permission", "integration_types") + (("contexts",) if guild_id else ()):
                command.pop(field, None)
            if not command["nsfw"]:
                del command["nsfw"]
        assert await _start_check(fd, caplog, guild_id, extra=True) == []
        assert len(fd.find_requests("PUT")) == 1   # registered once, never updated
        fd.assert_clean()


@pytest.mark.parametrize("name, changed", [
    ("imagine", {"integration_types": [0, 1]}),          # installable on user accounts too
    ("imagine", {"contexts": [0, 1, 2]}),                 # usable in DMs and group DMs
    ("imagine", {"default_member_permissions": "32"}),    # Manage Server only
    ("imagine", {"default_member_permissions": "0"}),     # admins only (not the same as null)
    ("queue", {"nsfw": True}),
    ("help", {"dm_permission": False}),                   # /help has no contexts: dm_permission rules
    ("history", {"integration_types": [0, 1], "contexts": [0, 1, 2], "default_member_permissions": "32"}),
])
async def test_a_command_registered_for_other_places_or_people_is_named(caplog, name, changed):
    """After an upgrade that changes where a command may be used, the start says so (the stale one
    stays offered until `imagine-bot sync`)."""
    caplog.set_level(logging.INFO)
    async with FakeDiscord() as fd:
        assert await _start_check(fd, caplog) == []
        _stored(fd.global_commands, name).update(changed)
        warnings = await _start_check(fd, caplog)
        assert len(warnings) == 1 and "imagine-bot sync" in warnings[0], warnings
        assert _named(warnings[0]) == {f"/{name}"}
        assert len(fd.find_requests("PUT")) == 1
        fd.assert_clean()


async def test_a_server_copy_with_other_permissions_is_named(caplog):
    caplog.set_level(logging.INFO)
    async with FakeDiscord() as fd:
        assert await _start_check(fd, caplog, fd.guild_id) == []
        _stored(fd.guild_commands[fd.guild_id], "queue")["default_member_permissions"] = "8"
        warnings = await _start_check(fd, caplog, fd.guild_id)
        assert len(warnings) == 1 and _named(warnings[0]) == {"/queue"}, warnings


@pytest.mark.parametrize("scope", ["global", "guild"])
@pytest.mark.parametrize("admin_roles", [[], ["Imagine Admin"]])
async def test_queue_admin_reads_as_unchanged_after_a_sync_and_as_changed_when_the_roles_are(caplog, scope,
                                                                                           admin_roles):
    """/queue-admin's default_member_permissions follows `admin_roles` (Manage Server, "32", without
    roles; none with them): a fresh sync reads as unchanged in either configuration, and a start
    whose config set or emptied the roles since names /queue-admin alone."""
    caplog.set_level(logging.INFO)
    async with FakeDiscord() as fd:
        guild_id = fd.guild_id if scope == "guild" else None
        config = config_from_dict({"discord": {"admin_roles": admin_roles}})
        assert await _start_check(fd, caplog, guild_id, config=config) == []   # registers them
        stored = fd.guild_commands[guild_id] if guild_id else fd.global_commands
        assert _stored(stored, "queue-admin")["default_member_permissions"] == (None if admin_roles else "32")
        assert await _start_check(fd, caplog, guild_id, config=config) == []
        other = config_from_dict({"discord": {"admin_roles": [] if admin_roles else ["Imagine Admin"]}})
        warnings = await _start_check(fd, caplog, guild_id, config=other)
        assert len(warnings) == 1 and "imagine-bot sync" in warnings[0], warnings
        assert _named(warnings[0]) == {"/queue-admin"}
        assert len(fd.find_requests("PUT")) == 1
        fd.assert_clean()


async def test_commands_registered_before_queue_admin_are_named_until_a_sync(caplog):
    """An upgrade from the version whose /queue held the admin subcommands: the start names /queue
    (subcommands gone) and /queue-admin (missing), and after `sync` nothing."""
    caplog.set_level(logging.INFO)
    async with FakeDiscord() as fd:
        assert await _start_check(fd, caplog) == []
        # Discord's copies as the previous version registered them: /queue with every subcommand.
        queue, admin = _stored(fd.global_commands, "queue"), _stored(fd.global_commands, "queue-admin")
        queue["options"] += admin["options"]
        queue["description"] = "The line of imagine jobs (admins: manage it)"
        fd.global_commands.remove(admin)
        warnings = await _start_check(fd, caplog)
        assert len(warnings) == 1 and "imagine-bot sync" in warnings[0], warnings
        assert _named(warnings[0]) == {"/queue", "/queue-admin"}
        assert not any(r.levelno >= logging.ERROR for r in caplog.records)

        bot = ImagineBot(config=Config(), queue=None, background=False)   # what `imagine-bot sync` does
        async with bot:
            await bot.login(fd.bot_token)
            await bot.tree.sync()
        assert {c["name"] for c in fd.global_commands} == NAMES
        assert await _start_check(fd, caplog) == []
        fd.assert_clean()


# --- imagine-bot sync --global / --clear-guild ------------------------------------------------------


def _config_file(tmp_path, sync_guild: int = 0):
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[discord]\nsync_guild = {sync_guild}\n'
                   f'[queue]\nurl = "sqlite:///{tmp_path / "q.db"}"\n[worker]\nembedded = false\n')
    return str(cfg)


async def _sync(fd: FakeDiscord, monkeypatch, capsys, cfg: str, *flags: str) -> str:
    """`imagine-bot --config cfg sync *flags` for real; its stdout. main() runs its own event loop:
    a thread, while the fake keeps serving on this one."""
    monkeypatch.setenv("DISCORD_TOKEN", fd.bot_token)
    capsys.readouterr()
    try:
        assert await asyncio.to_thread(main, ["--config", cfg, "sync", *flags]) == 0
    finally:
        _drop_discord_log_handlers()
    return capsys.readouterr().out


async def test_sync_global_registers_globally_although_sync_guild_is_set(tmp_path, monkeypatch, capsys):
    async with FakeDiscord() as fd:
        cfg = _config_file(tmp_path, sync_guild=fd.guild_id)
        out = await _sync(fd, monkeypatch, capsys, cfg, "--global")
        assert {c["name"] for c in fd.global_commands} == NAMES
        assert not fd.guild_commands.get(fd.guild_id)
        (line,) = out.splitlines()
        assert line.startswith("synced 6 commands to every guild")
        # That server would keep (and a start would re-register) its own copies: say how to end that.
        assert f"sync_guild is {fd.guild_id}: set it to 0" in line and f"--clear-guild {fd.guild_id}" in line

        out = await _sync(fd, monkeypatch, capsys, cfg)   # without --global: sync_guild, as before
        assert {c["name"] for c in fd.guild_commands[fd.guild_id]} == NAMES
        assert out.startswith(f"synced 6 commands to guild {fd.guild_id}")
        fd.assert_clean()


async def test_sync_clear_guild_removes_that_servers_copies_and_leaves_the_global_ones(
        tmp_path, monkeypatch, capsys):
    async with FakeDiscord() as fd:
        other = fd.add_guild("Other Guild")
        cfg = _config_file(tmp_path)
        await _sync(fd, monkeypatch, capsys, cfg, "--guild", str(fd.guild_id))
        await _sync(fd, monkeypatch, capsys, cfg, "--guild", str(other.id))
        await _sync(fd, monkeypatch, capsys, cfg)
        assert {c["name"] for c in fd.global_commands} == NAMES

        out = await _sync(fd, monkeypatch, capsys, cfg, "--clear-guild", str(fd.guild_id))
        assert fd.guild_commands[fd.guild_id] == []
        assert {c["name"] for c in fd.guild_commands[other.id]} == NAMES   # only the one named
        assert {c["name"] for c in fd.global_commands} == NAMES
        (line,) = out.splitlines()
        assert line.startswith(f"removed 6 commands from guild {fd.guild_id}: /") and "global commands stay" in line
        assert "sync_guild" not in line
        puts = len(fd.find_requests("PUT"))

        out = await _sync(fd, monkeypatch, capsys, cfg, "--clear-guild", str(fd.guild_id))
        assert "nothing to remove" in out and len(fd.find_requests("PUT")) == puts   # no update spent

        # Clearing the server sync_guild names: a start would register them there again; said so.
        cfg = _config_file(tmp_path, sync_guild=other.id)
        out = await _sync(fd, monkeypatch, capsys, cfg, "--clear-guild", str(other.id))
        assert fd.guild_commands[other.id] == []
        assert "sync_guild still names it: set it to 0" in out
        fd.assert_clean()


@pytest.mark.parametrize("flags, message", [
    (["--global", "--guild", "1"], "not allowed with argument"),
    (["--clear-guild", "1", "--guild", "1"], "not allowed with argument"),
    (["--clear-guild", "1", "--global"], "not allowed with argument"),
    (["--clear-guild", "0"], "expected a server id (a positive number), got 0"),
    (["--clear-guild", "abc"], "invalid server id value: 'abc'"),
])
async def test_conflicting_or_bad_sync_flags_exit_2_and_do_nothing(tmp_path, monkeypatch, capsys, flags, message):
    async with FakeDiscord() as fd:
        monkeypatch.setenv("DISCORD_TOKEN", fd.bot_token)
        with pytest.raises(SystemExit) as exit_:
            main(["--config", _config_file(tmp_path), "sync", *flags])
        assert exit_.value.code == 2
        assert message in capsys.readouterr().err
        assert fd.requests == [] and fd.global_commands == []


def test_sync_help_names_the_new_flags(capsys):
    with pytest.raises(SystemExit):
        main(["sync", "--help"])
    out = capsys.readouterr().out
    assert "--global" in out and "even when [discord] sync_guild is set" in out
    assert "--clear-guild ID" in out and "registers nothing" in out
