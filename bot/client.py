"""The Bot: gets its resources (queue, worker, HTTP session) from the launcher, adds one Cog per
feature and the persistent buttons in `setup_hook`. Commands are synced on request
(`imagine-bot sync`), and by the launcher only on a first start, when Discord has none of ours.

Discord connection: discord.py's `AutoShardedBot`, so one process runs every gateway shard.
`[discord] shard_count` 0 asks Discord (GET /gateway/bot) how many (one below 2,500 guilds; from
2,500 on Discord refuses an unsharded IDENTIFY with close code 4011); a number is used as given.
Each shard's state (`shard_status`) feeds /healthz and the per-shard metrics. Running shards in
several processes (discord.py's `shard_ids`) is not supported: result posting, the reconcile loop
and contact sheets assume that one bot process sees every guild.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Any, cast

import aiohttp
import discord
from discord import app_commands
from discord.ext import commands

from bot.config import Config
from engine.jobs import JobQueue

log = logging.getLogger(__name__)

# Discord lets `max_concurrency` sessions IDENTIFY per this many seconds (one per bucket
# shard_id % max_concurrency).
IDENTIFY_WINDOW = 5.0


@dataclass(frozen=True)
class ShardStatus:
    """One gateway shard as the bot sees it. `state`: "not started" (not launched yet),
    "connecting" (identified, its guilds still arriving), "ready" (ready or resumed),
    "disconnected" (dropped; discord.py reconnects and resumes it). `latency`: the last heartbeat's
    round trip in seconds (None before the first one is answered, and while the socket is closed)."""

    shard_id: int
    state: str
    latency: float | None
    open: bool

    @property
    def connected(self) -> bool:
        return self.state == "ready" and self.open and self.latency is not None


class ImagineBot(commands.AutoShardedBot):
    def __init__(
        self,
        *,
        config: Config,
        queue: JobQueue | None,
        http_session: aiohttp.ClientSession | None = None,
        worker: Any = None,
        background: bool = True,
        **kwargs: Any,
    ):
        intents = discord.Intents.none()
        intents.guilds = True   # roles by name (admin_roles) and the guilds' upload limits
        kwargs.setdefault("intents", intents)
        # None: discord.py asks GET /gateway/bot for Discord's recommendation when it connects.
        kwargs.setdefault("shard_count", config.discord.shard_count or None)
        super().__init__(
            command_prefix=commands.when_mentioned,
            help_command=None,
            tree_cls=_Tree,
            # Guild install only: a user install would run the commands in servers the bot is not
            # in, where it can post no result and /queue would keep settings for them. Synced as
            # `integration_types: [0]` on every command.
            allowed_installs=app_commands.AppInstallationType(guild=True, user=False),
            # Echoed prompts never ping anyone: this holds for every send and edit.
            allowed_mentions=discord.AllowedMentions.none(),
            **kwargs,
        )
        self.config = config
        # None only for `imagine-bot sync`, which never runs a command.
        self.queue = cast(JobQueue, queue)
        self.http_session = http_session
        self.worker = worker
        self.background = background
        self._shard_states: dict[int, str] = {}
        self._identify_concurrency: int | None = None
        self._identify_slots: dict[int, float] = {}   # bucket -> loop time of its latest IDENTIFY

    @property
    def progress(self):  # -> ProgressCog | None
        return self.get_cog("Progress")

    async def setup_hook(self) -> None:
        from bot.imagine import DYNAMIC_ITEMS, ImagineCog
        from bot.progress import ProgressCog
        from bot.queue_admin import HistoryCog, QueueAdminCog, QueueCog

        await self.add_cog(ImagineCog(self))
        await self.add_cog(QueueCog(self))
        await self.add_cog(QueueAdminCog(self))
        await self.add_cog(HistoryCog(self))
        from bot.moderation import ModerationCog   # ban-word joins QueueAdminCog's group, so after it
        from bot.permutations import SheetsCog     # contact sheets of permutation sets
        await self.add_cog(ModerationCog(self))
        await self.add_cog(SheetsCog(self))
        self.add_dynamic_items(*DYNAMIC_ITEMS)
        if self.background and self.queue is not None:
            await self.add_cog(ProgressCog(self))

    async def user_limit(self, guild_id: int | None = None) -> int:
        """How many waiting jobs one person may have when queueing in `guild_id`: that server's
        `/queue-admin limit` (setting `bot.max_queued_per_user:<guild_id>`), else `[queue]
        max_queued_per_user` (also without a guild: direct messages). The global setting that
        earlier versions' `/queue limit` wrote is ignored: one server's admin set it for all. The
        person's waiting jobs are counted across every server."""
        from bot.queue_admin import user_limit_key

        if guild_id is not None:
            value = await self.queue.get_setting(user_limit_key(guild_id), None)
            if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
                return value
        return self.config.queue.max_queued_per_user

    async def on_ready(self) -> None:
        log.info("logged in as %s (%s) in %d guilds on %d shard(s)", self.user, getattr(self.user, "id", "?"),
                 len(self.guilds), self.shard_count or 1)

    # --- gateway shards -------------------------------------------------------------------------

    async def on_shard_connect(self, shard_id: int) -> None:   # READY: its guilds are on their way
        self._shard_states[shard_id] = "connecting"

    async def on_shard_ready(self, shard_id: int) -> None:
        self._shard_states[shard_id] = "ready"
        log.info("gateway shard %d/%d ready", shard_id, self.shard_count or 1)

    async def on_shard_resumed(self, shard_id: int) -> None:
        self._shard_states[shard_id] = "ready"
        log.info("gateway shard %d resumed", shard_id)

    async def on_shard_disconnect(self, shard_id: int) -> None:
        if self._shard_states.get(shard_id) != "disconnected" and not self.is_closed():
            log.warning("gateway shard %d disconnected", shard_id)
        self._shard_states[shard_id] = "disconnected"

    def shard_status(self) -> dict[int, ShardStatus]:
        """Every shard this process runs (0 .. shard_count-1 once the count is known), by id."""
        shards = self.shards
        ids = sorted(set(range(self.shard_count or 0)) | set(shards))
        out: dict[int, ShardStatus] = {}
        for shard_id in ids:
            info = shards.get(shard_id)
            if info is None:
                out[shard_id] = ShardStatus(shard_id, "not started", None, False)
                continue
            latency, is_open = info.latency, not info.is_closed()
            # A closed socket is down even before discord.py's disconnect event has run.
            state = self._shard_states.get(shard_id, "connecting") if is_open else "disconnected"
            # A closed socket's latency is its last one: stale, not reported.
            out[shard_id] = ShardStatus(shard_id, state, latency if is_open and math.isfinite(latency) else None,
                                        is_open)
        return out

    async def before_identify_hook(self, shard_id: int | None, *, initial: bool = False) -> None:
        """Discord's IDENTIFY rate limit: `max_concurrency` buckets (shard_id % max_concurrency), each
        one IDENTIFY per 5 s. discord.py's default waits 5 s before every IDENTIFY but the first,
        whatever the concurrency; this waits only when the shard's bucket identified less than 5 s ago
        (max_concurrency from GET /gateway/bot, asked once, only with more than one shard)."""
        concurrency = await self._max_concurrency() if (self.shard_count or 1) > 1 else 1
        bucket = (shard_id or 0) % concurrency
        loop = asyncio.get_running_loop()
        now = loop.time()
        last = self._identify_slots.get(bucket)
        slot = now if last is None else max(now, last + IDENTIFY_WINDOW)
        self._identify_slots[bucket] = slot   # reserved before sleeping: a second caller queues behind
        if slot > now:
            await asyncio.sleep(slot - now)

    async def _max_concurrency(self) -> int:
        if self._identify_concurrency is None:
            try:
                limits = await self.fetch_session_start_limits()
            except (discord.DiscordException, aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
                log.warning("could not read the IDENTIFY concurrency from Discord (%s); one at a time", exc)
                return 1
            self._identify_concurrency = max(1, int(limits.max_concurrency))
        return self._identify_concurrency


class _Tree(app_commands.CommandTree):
    async def interaction_check(self, interaction: discord.Interaction, /) -> bool:
        """No command in a server that has not installed the bot (a user install made before
        installs were restricted to servers, or one Discord lets through): told why, privately."""
        from bot.permissions import NOT_INSTALLED, not_installed_here   # noqa: PLC0415

        if not not_installed_here(interaction):
            return True
        log.info("command %s refused: server %s has not installed the bot",
                 getattr(interaction.command, "qualified_name", "?"), interaction.guild_id)
        with contextlib.suppress(discord.HTTPException):
            await interaction.response.send_message(NOT_INSTALLED, ephemeral=True)
        return False

    async def on_error(self, interaction: discord.Interaction, error: app_commands.AppCommandError) -> None:
        """Every failed command gets an ephemeral word (a refusal of the checks, an outdated command, or our
        error)."""
        if isinstance(error, (app_commands.CommandNotFound, app_commands.CommandSignatureMismatch)):
            # Discord still offers a command as it was before an upgrade (until `imagine-bot sync`):
            # one this bot no longer has, or whose options changed. Not our error: no traceback.
            message = outdated_command_text(error)
            log.warning("command %s: Discord's copy is out of date with this bot (%s); run `imagine-bot sync`",
                        stale_command_name(error), type(error).__name__)
        elif isinstance(error, app_commands.NoPrivateMessage):
            message = "This command works in a server channel, not in direct messages."
        elif isinstance(error, app_commands.TransformerError):
            from bot.render import quote   # noqa: PLC0415 - user text in a refusal: tamed, as inline code
            kind = getattr(error.type, "name", "value").replace("_", " ")
            message = f"I could not read {quote(str(error.value))} as the right kind of value ({kind})."
        elif isinstance(error, app_commands.CheckFailure):
            message = "You cannot use this command here."
        else:
            log.error("command %s failed", getattr(interaction.command, "qualified_name", "?"), exc_info=error)
            from bot.imagine import OUR_ERROR   # noqa: PLC0415 - bot.imagine imports this module
            message = OUR_ERROR
        from bot.imagine import ephemeral   # noqa: PLC0415 - private before or after a defer; keeps a real reply

        with contextlib.suppress(discord.HTTPException):
            await ephemeral(interaction, message)


# The admin subcommands that left /queue for /queue-admin: a stale `/queue clear` names its new place.
MOVED_TO_QUEUE_ADMIN = frozenset({"clear", "pause", "resume", "limit", "ban-word"})


def stale_command_name(error: app_commands.CommandNotFound | app_commands.CommandSignatureMismatch) -> str:
    """The outdated command as the user called it ("/queue clear"), for the log."""
    if isinstance(error, app_commands.CommandNotFound):
        return "/" + " ".join([*error.parents, error.name])
    return "/" + error.command.qualified_name


def outdated_command_text(error: app_commands.CommandNotFound | app_commands.CommandSignatureMismatch) -> str:
    """The private answer to a command that Discord still offers as it was before the bot's upgrade
    (until `imagine-bot sync`, which only whoever runs the bot can do): nothing was done, and what
    to ask for; a moved admin subcommand names its new place."""
    if (isinstance(error, app_commands.CommandNotFound) and error.parents == ["queue"]
            and error.name in MOVED_TO_QUEUE_ADMIN):
        return (f"`/queue {error.name}` is now `/queue-admin {error.name}`, and Discord still offers the old "
                "command: nothing was done. Ask whoever runs the bot to run `imagine-bot sync`, then use "
                f"`/queue-admin {error.name}`.")
    return ("This command has changed since the bot was updated, and Discord still offers its old version: "
            "nothing was done. Ask whoever runs the bot to run `imagine-bot sync`, then try again.")
