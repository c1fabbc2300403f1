"""/imagine and the buttons on its replies (Reroll, Continue, Cancel).

Buttons survive restarts: their custom ids carry the job id (`imagine:reroll:<job_id>`) and are
handled by `discord.ui.DynamicItem` subclasses registered in `setup_hook`; whatever a button needs
is read from the queue's store, never from memory.
"""

from __future__ import annotations

import logging
import random
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import discord
from discord import app_commands
from discord.ext import commands

from bot import render
from bot.permissions import is_admin
from engine.jobs import JobRecord, JobSpec, JobState

if TYPE_CHECKING:
    from bot.client import ImagineBot

log = logging.getLogger(__name__)

SEED_MAX = 2**32 - 1
JOB_ID = r"(?P<job_id>[0-9A-Za-z_-]{1,64})"


# --- validation ----------------------------------------------------------------------------------

class BadInput(ValueError):
    """Input to refuse; the message (shown ephemerally) says what to fix."""


@dataclass
class ImagineRequest:
    prompt: str
    iterations: int
    seed: int
    size: int
    grid: int


def validate(bot: "ImagineBot", prompt: str | None, iterations: int | None, seed: int | None,
             size: int | None) -> ImagineRequest:
    cfg = bot.config.imagine
    text = (prompt or "").strip()
    if not text:
        raise BadInput("The prompt is empty: write what to imagine, e.g. `/imagine a house by Escher`.")
    if len(text) > cfg.max_prompt_chars:
        raise BadInput(
            f"The prompt is {len(text):,} characters long; the limit is {cfg.max_prompt_chars:,}. "
            f"Shorten it: CLIP only reads the first {render.CLIP_TOKENS} tokens (about 300 characters of "
            "English) and ignores the rest anyway."
        )
    if iterations is None:
        iterations = cfg.default_iterations
    if not 1 <= iterations <= cfg.max_iterations:
        raise BadInput(f"`iterations` must be between 1 and {cfg.max_iterations:,} (you gave {iterations:,}).")
    if seed is None:
        seed = random.randint(0, SEED_MAX)
    elif not 0 <= seed <= SEED_MAX:
        raise BadInput(f"`seed` must be between 0 and {SEED_MAX:,} (you gave {seed:,}).")
    if size is None:
        size = cfg.default_size
    if str(size) not in cfg.sizes:
        raise BadInput(f"`size` must be one of {', '.join(cfg.sizes)} (you gave {size}).")
    return ImagineRequest(text, iterations, seed, size, cfg.sizes[str(size)])


# --- buttons -------------------------------------------------------------------------------------

def _button_view(*items: discord.ui.Item[Any]) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    for item in items:
        view.add_item(item)
    # Stopped: discord.py then sends its components without keeping the view in memory; the
    # dynamic items registered on the client handle the clicks, after restarts too.
    view.stop()
    return view


def progress_view(job_id: str) -> discord.ui.View:
    return _button_view(CancelButton(job_id))


def result_view(record: JobRecord) -> discord.ui.View:
    items: list[discord.ui.Item[Any]] = [RerollButton(record.id)]
    if record.state == JobState.DONE:
        items.append(ContinueButton(record.id))
    return _button_view(*items)


class _JobButton(discord.ui.DynamicItem[discord.ui.Button], template=r"imagine:(?P<action>[a-z]+):" + JOB_ID):
    action = ""
    label = ""
    style = discord.ButtonStyle.secondary
    emoji: str | None = None

    def __init__(self, job_id: str):
        self.job_id = job_id
        super().__init__(discord.ui.Button(
            label=self.label, style=self.style, emoji=self.emoji,
            custom_id=f"imagine:{self.action}:{job_id}",
        ))

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction, item: discord.ui.Item[Any],
                             match: re.Match[str], /):
        return cls(match["job_id"])


class RerollButton(_JobButton, template=r"imagine:reroll:" + JOB_ID):
    action, label, style, emoji = "reroll", "Reroll", discord.ButtonStyle.primary, "🎲"

    async def callback(self, interaction: discord.Interaction) -> None:
        cog = _imagine_cog(interaction)
        await cog.from_button(interaction, self.job_id, "reroll")


class ContinueButton(_JobButton, template=r"imagine:continue:" + JOB_ID):
    action, label, style, emoji = "continue", "Continue", discord.ButtonStyle.secondary, "➕"

    async def callback(self, interaction: discord.Interaction) -> None:
        cog = _imagine_cog(interaction)
        await cog.from_button(interaction, self.job_id, "continue")


class CancelButton(_JobButton, template=r"imagine:cancel:" + JOB_ID):
    action, label, style, emoji = "cancel", "Cancel", discord.ButtonStyle.danger, None

    async def callback(self, interaction: discord.Interaction) -> None:
        cog = _imagine_cog(interaction)
        await cog.cancel_job(interaction, self.job_id)


DYNAMIC_ITEMS = (RerollButton, ContinueButton, CancelButton)


def _imagine_cog(interaction: discord.Interaction) -> "ImagineCog":
    cog = interaction.client.get_cog("Imagine")  # type: ignore[attr-defined]
    assert isinstance(cog, ImagineCog)
    return cog


async def ephemeral(interaction: discord.Interaction, message: str) -> None:
    """An ephemeral answer; never after a public defer (its follow-ups are public)."""
    if interaction.response.is_done():
        await interaction.followup.send(message, ephemeral=True)
    else:
        await interaction.response.send_message(message, ephemeral=True)


# --- the cog -------------------------------------------------------------------------------------

class ImagineCog(commands.Cog, name="Imagine"):
    def __init__(self, bot: "ImagineBot"):
        self.bot = bot
        self.queue = bot.queue
        self.command = self._build_command()

    async def cog_load(self) -> None:
        self.bot.tree.add_command(self.command)

    async def cog_unload(self) -> None:
        self.bot.tree.remove_command(self.command.name)

    def _build_command(self) -> app_commands.Command:
        cfg = self.bot.config.imagine
        sizes = [app_commands.Choice(name=f"{s}×{s}", value=s) for s in self.bot.config.size_choices]
        cog = self

        # Built here rather than with class decorators: the choices and the limits come from config.
        @app_commands.command(name="imagine", description="Imagine a picture: CLIP steers DALL-E's decoder")
        @app_commands.describe(
            prompt=f"What to imagine (up to {cfg.max_prompt_chars} characters; CLIP reads about 77 tokens)",
            iterations=f"Optimisation steps, 1-{cfg.max_iterations} (default {cfg.default_iterations})",
            seed="Random seed, to repeat a result (default: a new one)",
            size=f"Image size (default {cfg.default_size})",
        )
        @app_commands.choices(size=sizes)
        @app_commands.guild_only()
        async def imagine(interaction: discord.Interaction, prompt: str, iterations: Optional[int] = None,
                          seed: Optional[int] = None, size: Optional[int] = None) -> None:
            await cog.imagine(interaction, prompt, iterations, seed, size)

        return imagine

    # --- /imagine -----------------------------------------------------------------------------

    async def imagine(self, interaction: discord.Interaction, prompt: str, iterations: int | None,
                      seed: int | None, size: int | None) -> None:
        try:
            request = validate(self.bot, prompt, iterations, seed, size)
        except BadInput as exc:
            await ephemeral(interaction, str(exc))
            return
        spec = self._spec(interaction, request.prompt, request.iterations, request.seed, request.grid,
                          request.size)
        await self.submit(interaction, spec)

    def _spec(self, interaction: discord.Interaction, prompt: str, iterations: int, seed: int, grid: int,
              size: int, **more: Any) -> JobSpec:
        cfg = self.bot.config.imagine
        return JobSpec(
            prompt=prompt, user_id=interaction.user.id, channel_id=interaction.channel_id or 0,
            guild_id=interaction.guild_id, iterations=iterations, seed=seed, grid=grid,
            frame_every=cfg.frame_every, cutn=cfg.cutn, extra={"size": size}, **more,
        )

    async def _over_limit(self, user_id: int) -> str | None:
        limit = await self.bot.user_limit()
        queued = await self.queue.count_queued(user_id)
        if queued >= limit:
            return (f"You already have {queued} job{'s' if queued != 1 else ''} waiting; the limit is {limit}. "
                    "Wait for one to start (or cancel one) and try again.")
        return None

    async def submit(self, interaction: discord.Interaction, spec: JobSpec) -> JobRecord | None:
        """Check the user's cap, defer, queue the job and show its place in line."""
        problem = await self._over_limit(spec.user_id)
        if problem:
            await ephemeral(interaction, problem)
            return None
        await interaction.response.defer(thinking=True)
        record = await self.queue.submit(spec)
        progress = self.bot.progress
        if progress is not None:
            progress.register(record, interaction)
        position = await self.queue.position(record.id)
        paused = bool(await self.queue.get_setting("paused", False))
        content = render.queued_text(record, position, paused)
        message_id = channel_id = None
        try:
            message = await interaction.edit_original_response(content=content, view=progress_view(record.id))
            message_id, channel_id = message.id, message.channel.id
            reply = {"channel_id": channel_id, "message_id": message_id, "guild_id": interaction.guild_id,
                     "upload_limit": interaction.filesize_limit}
            record.spec.reply = reply
            await self.queue.set_reply(record.id, reply)
        except discord.HTTPException:
            log.exception("job %s: could not show its queued reply", record.id)
        finally:
            if progress is not None:
                progress.attach(record.id, channel_id, message_id, content if message_id else None)
        return record

    # --- buttons ------------------------------------------------------------------------------

    async def from_button(self, interaction: discord.Interaction, job_id: str, kind: str) -> None:
        parent = await self.queue.get(job_id)
        if parent is None:
            await ephemeral(interaction, f"Job `{job_id}` is no longer in the store, so it cannot be reused.")
            return
        p = parent.spec
        size = render.size_of(p)
        if kind == "reroll":
            spec = self._spec(interaction, p.prompt, p.iterations, random.randint(0, SEED_MAX), p.grid, size,
                              parent_kind="reroll")
            spec.extra["rerolls"] = job_id
        else:
            if parent.state != JobState.DONE:
                await ephemeral(interaction, "Only a finished job can be continued.")
                return
            more = self.bot.config.imagine.continue_iterations or p.iterations
            spec = self._spec(interaction, p.prompt, more, p.seed if p.seed is not None else 0, p.grid, size,
                              parent_job_id=job_id, parent_kind="continue")
        await self.submit(interaction, spec)

    async def cancel_job(self, interaction: discord.Interaction, job_id: str) -> None:
        record = await self.queue.get(job_id)
        if record is None:
            await ephemeral(interaction, f"There is no job `{job_id}`.")
            return
        if interaction.user.id != record.spec.user_id and not is_admin(interaction, self.bot.config):
            await ephemeral(interaction, "Only the person who asked for this image, or an admin, can cancel it.")
            return
        if record.state.finished:
            await ephemeral(interaction, f"Job `{job_id}` has already ended ({record.state.value}).")
            return
        ok = await self.queue.cancel(job_id)
        if self.bot.progress is not None:
            self.bot.progress.line_changed()
        if not ok:
            await ephemeral(interaction, f"Job `{job_id}` could not be cancelled (it has just ended).")
        elif record.state == JobState.RUNNING:
            await ephemeral(interaction, f"Stopping job `{job_id}`…")
        else:
            await ephemeral(interaction, f"Cancelled job `{job_id}`.")
