"""/queue: the line for anyone (`/queue show`), and the admin subcommands.

Admin subcommands (cancel, clear, pause, resume, limit) need Manage Server or a role named in
config `admin_roles`; anyone else gets an ephemeral refusal and nothing changes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot import render
from bot.imagine import ephemeral
from bot.permissions import require_admin

if TYPE_CHECKING:
    from bot.client import ImagineBot

USER_LIMIT_KEY = "bot.max_queued_per_user"
SHOW_MAX = 20


@app_commands.guild_only()
class QueueCog(commands.GroupCog, name="Queue", group_name="queue",
               group_description="The line of imagine jobs (admins: manage it)"):
    def __init__(self, bot: "ImagineBot"):
        self.bot = bot
        self.queue = bot.queue
        super().__init__()

    async def _admin(self, interaction: discord.Interaction) -> bool:
        return await require_admin(interaction, self.bot.config)

    def _line_changed(self) -> None:
        if self.bot.progress is not None:
            self.bot.progress.line_changed()

    @app_commands.command(name="show", description="Show the line: who waits for what, and what runs")
    async def show(self, interaction: discord.Interaction) -> None:
        running = await self.queue.running()
        queued = await self.queue.queued()
        paused = bool(await self.queue.get_setting("paused", False))
        lines: list[str] = []
        if paused:
            lines.append("**The queue is paused.**")
        for record in running:
            total = record.spec.iterations
            lines.append(f"▶ `{record.id}` {render.snippet(record.spec.prompt)} · <@{record.spec.user_id}> · "
                         f"{record.iteration}/{total}")
        for position, record in enumerate(queued[:SHOW_MAX], 1):
            lines.append(f"**#{position}** `{record.id}` {render.snippet(record.spec.prompt)} · "
                         f"<@{record.spec.user_id}>")
        if len(queued) > SHOW_MAX:
            lines.append(f"…and {len(queued) - SHOW_MAX} more.")
        if not running and not queued:
            lines.append("The line is empty.")
        limit = await self.bot.user_limit()
        lines.append(f"-# Each person may have {limit} job{'s' if limit != 1 else ''} waiting.")
        await interaction.response.send_message("\n".join(lines)[:2000], ephemeral=True)

    @app_commands.command(name="cancel", description="Admin: cancel a queued or running job")
    @app_commands.describe(job="The job id (shown under each reply and in /queue show)")
    async def cancel(self, interaction: discord.Interaction, job: str) -> None:
        if not await self._admin(interaction):
            return
        job = job.strip()
        record = await self.queue.get(job)
        if record is None:
            await ephemeral(interaction, f"There is no job `{discord.utils.escape_markdown(job)[:64]}`; "
                                      "see `/queue show` for the ids.")
            return
        if record.state.finished:
            await ephemeral(interaction, f"Job `{job}` has already ended ({record.state.value}).")
            return
        ok = await self.queue.cancel(job)
        self._line_changed()
        await ephemeral(interaction, f"Cancelled job `{job}`." if ok else f"Job `{job}` had already ended.")

    @app_commands.command(name="clear", description="Admin: cancel every queued job (running ones go on)")
    async def clear(self, interaction: discord.Interaction) -> None:
        if not await self._admin(interaction):
            return
        count = await self.queue.clear()
        self._line_changed()
        await ephemeral(interaction, f"Cleared the line: {count} job{'s' if count != 1 else ''} cancelled.")

    @app_commands.command(name="pause", description="Admin: stop starting new jobs (running ones finish)")
    async def pause(self, interaction: discord.Interaction) -> None:
        if not await self._admin(interaction):
            return
        await self.queue.set_setting("paused", True)
        self._line_changed()
        await ephemeral(interaction, "Paused: no new job starts until `/queue resume`.")

    @app_commands.command(name="resume", description="Admin: start jobs again")
    async def resume(self, interaction: discord.Interaction) -> None:
        if not await self._admin(interaction):
            return
        await self.queue.set_setting("paused", False)
        self._line_changed()
        await ephemeral(interaction, "Resumed: jobs start again.")

    @app_commands.command(name="limit", description="Admin: how many waiting jobs each person may have")
    @app_commands.describe(n="Jobs one person may have waiting (1-100)")
    async def limit(self, interaction: discord.Interaction, n: int) -> None:
        if not await self._admin(interaction):
            return
        if not 1 <= n <= 100:
            await ephemeral(interaction, f"`n` must be between 1 and 100 (you gave {n}).")
            return
        await self.queue.set_setting(USER_LIMIT_KEY, n)
        await ephemeral(interaction, f"Each person may now have {n} job{'s' if n != 1 else ''} waiting.")


class HistoryCog(commands.Cog, name="History"):
    def __init__(self, bot: "ImagineBot"):
        self.bot = bot

    @app_commands.command(name="history", description="This channel's recent prompts, with links to the results")
    @app_commands.guild_only()
    async def history(self, interaction: discord.Interaction) -> None:
        records = await self.bot.queue.history(interaction.channel_id or 0, limit=15)
        lines = []
        for record in records:
            reply = record.spec.reply or {}
            message_id = reply.get("result_message_id") or reply.get("message_id")
            channel_id = reply.get("channel_id") or record.spec.channel_id
            line = (f"• {render.snippet(record.spec.prompt, 80)} · <@{record.spec.user_id}> · {record.state.value}"
                    f" · `{record.id}`")
            if message_id:
                line += f" · {render.jump_url(record.spec.guild_id, channel_id, message_id)}"
            lineage = render.parent_line(record.spec, details=False)   # ↳ remix of <job> by <user>
            if lineage:
                line += f"\n  {lineage}"
            lines.append(line)
        text = "\n".join(lines) if lines else "No prompts in this channel yet: try `/imagine`."
        while len(text) > 2000 and lines:
            lines.pop()
            text = "\n".join(lines)
        await interaction.response.send_message(text, ephemeral=True)
