"""The Bot: gets its resources (queue, worker, HTTP session) from the launcher, adds one Cog per
feature and the persistent buttons in `setup_hook`. Commands are synced only on request
(`imagine-bot sync`), never on every start."""

from __future__ import annotations

import logging
from typing import Any, cast

import aiohttp
import discord
from discord import app_commands
from discord.ext import commands

from bot.config import Config
from engine.jobs import JobQueue

log = logging.getLogger(__name__)


class ImagineBot(commands.Bot):
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
        super().__init__(
            command_prefix=commands.when_mentioned,
            help_command=None,
            tree_cls=_Tree,
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

    @property
    def progress(self):  # -> ProgressCog | None
        return self.get_cog("Progress")

    async def setup_hook(self) -> None:
        from bot.imagine import DYNAMIC_ITEMS, ImagineCog
        from bot.progress import ProgressCog
        from bot.queue_admin import HistoryCog, QueueCog

        await self.add_cog(ImagineCog(self))
        await self.add_cog(QueueCog(self))
        await self.add_cog(HistoryCog(self))
        from bot.moderation import ModerationCog   # /queue ban-word: joins QueueCog's group, so after it
        from bot.permutations import SheetsCog     # contact sheets of permutation sets
        await self.add_cog(ModerationCog(self))
        await self.add_cog(SheetsCog(self))
        self.add_dynamic_items(*DYNAMIC_ITEMS)
        if self.background and self.queue is not None:
            await self.add_cog(ProgressCog(self))

    async def user_limit(self) -> int:
        from bot.queue_admin import USER_LIMIT_KEY

        value = await self.queue.get_setting(USER_LIMIT_KEY, None)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return value
        return self.config.queue.max_queued_per_user

    async def on_ready(self) -> None:
        log.info("logged in as %s (%s) in %d guilds", self.user, getattr(self.user, "id", "?"), len(self.guilds))


class _Tree(app_commands.CommandTree):
    async def on_error(self, interaction: discord.Interaction, error: app_commands.AppCommandError) -> None:
        """Every failed command gets an ephemeral word (a refusal of the checks, or our error)."""
        if isinstance(error, app_commands.NoPrivateMessage):
            message = "This command works in a server channel, not in direct messages."
        elif isinstance(error, app_commands.TransformerError):
            message = f"I could not read `{error.value}` as the right kind of value: {error}"
        elif isinstance(error, app_commands.CheckFailure):
            message = "You cannot use this command here."
        else:
            log.error("command %s failed", getattr(interaction.command, "qualified_name", "?"), exc_info=error)
            message = "Something went wrong on my side; the error is logged. Try again in a moment."
        try:
            if interaction.response.is_done():
                await interaction.followup.send(message, ephemeral=True)
            else:
                await interaction.response.send_message(message, ephemeral=True)
        except discord.HTTPException:
            pass
