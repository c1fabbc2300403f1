"""/queue: the line for anyone (`show`, `cancel`); /queue-admin: the subcommands that change it.

The admin subcommands are a top-level group of their own so that Discord's permission settings can
hide them from members (`default_member_permissions`: bot.permissions.admin_command_permissions;
a server's admins change who sees it under Server Settings → Integrations). Who may use them is
still the bot's own check (`require_admin`): a member Discord shows them to anyway is refused.

One queue serves every server the bot is in, so each subcommand is scoped to the server it is
used in (the caller's own jobs in direct messages):
- `show [page]` (anyone): the caller's own jobs of other servers first (their author may always
  see and cancel them: one waiting in a paused server counts against their cap everywhere), then
  this server's running and waiting jobs of channels the caller can view (a private channel's
  prompts stay in it: bot.permissions.can_see_job) and the caller's own, with their places in the
  shared line (a place counts every server's jobs ahead), and how many others are not shown; up to
  SHOW_MAX jobs a page;
- `cancel <job>`: a job's author may cancel it, from any server; an admin of the job's server may
  cancel any job of that server. Another's job of another server gets the same answer as an id
  that does not exist, so ids of other servers are never confirmed;
- `/queue-admin clear`: cancels this server's waiting jobs only;
- `/queue-admin limit <n>`: this server's cap of waiting jobs per person (setting
  `bot.max_queued_per_user:<guild_id>`; without one, `[queue] max_queued_per_user`), checked when
  they queue here against their waiting jobs in every server (the store counts per person);
- `/queue-admin pause` / `resume`: stop or start this server's jobs (setting `paused:<guild_id>`):
  the workers skip its waiting jobs, which keep their places, and go on with other servers' jobs;
  running jobs finish. `everywhere:True` stops or starts every worker for every server (setting
  `paused`), so that is for the bot's owner alone (the application's owner, or its team's admins
  and developers);
- `/queue-admin ban-word add | remove | list`: bot.moderation.

When the bot is removed from a server (`on_guild_remove`), that server's waiting jobs are cancelled
and its running ones stopped: no result could be posted there. Likewise a deleted channel's or
thread's jobs (`on_guild_channel_delete`, `on_raw_thread_delete`). Admins' actions are logged
(INFO: who, where, on what).

Admins: Manage Server or a role named in config `admin_roles` (bot.permissions). Every refusal is
private and changes nothing; echoed prompts go through bot.render, and the client allows no mentions.
A subcommand that writes to the store defers (privately) first: a write can wait seconds for the
SQLite file (behind a worker's checkpoint) and Discord drops an interaction not answered in 3 s.
One that only reads (`show`, `cancel`'s look-up, `/history`) races its reads against that window
(bot.imagine.in_time) and defers privately when they are slower (a Redis reconnect).
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Callable, Collection

import discord
from discord import app_commands
from discord.ext import commands

from bot import moderation, render
from bot.imagine import JOB_ID, cancel_and_answer, ephemeral, in_time
from bot.permissions import (ThreadLookups, admin_command_permissions, admin_roles_text, can_see_job, can_view_channel,
                             is_admin, may_know_job, require_admin)
from engine.jobs import PAUSED_KEY, JobRecord, JobState, guild_paused_key, places_in_line

if TYPE_CHECKING:
    from bot.client import ImagineBot

log = logging.getLogger(__name__)

USER_LIMIT_KEY = "bot.max_queued_per_user"   # global; written by earlier versions, read by none now
SHOW_MAX = 20          # jobs on one page of `/queue show` (fewer when their lines pass CONTENT_LIMIT)
CONTENT_LIMIT = 2000
LIMIT_MIN, LIMIT_MAX = 1, 100   # `/queue-admin limit n`
PAGE_LINES_ROOM = 160  # kept free on a page for its "…and N more" and "Page n of m" lines


def log_admin_action(interaction: discord.Interaction, action: str, *args: object) -> None:
    """One INFO line for an admin's action on the line (who, in which server, on what), so that a
    server's owner asking "who cleared our queue?" has an answer. The name is logged repr()'d: it
    is the user's own text."""
    user = interaction.user
    log.info("admin %s (%r) in server %s: " + action, user.id, user.name, interaction.guild_id, *args)


def user_limit_key(guild_id: int) -> str:
    """The setting that holds one server's cap of waiting jobs per person (`/queue-admin limit`)."""
    return f"{USER_LIMIT_KEY}:{int(guild_id)}"


def in_scope(record: JobRecord, guild_id: int | None, user_id: int) -> bool:
    """Whether a caller in `guild_id` (None: direct messages) may see `record`: a job of that
    server, or in direct messages the caller's own job."""
    if guild_id is None:
        return record.spec.user_id == user_id
    return record.spec.guild_id == guild_id


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"


def limit_sentence(limit: int, guild_id: int | None, *, now: bool = False) -> str:
    """The cap as it works: `limit` is this server's, but the store counts a person's waiting jobs
    in every server (`count_queued(user)`), so saying "in this server" alone would be wrong."""
    have = f"Each person may {'now ' if now else ''}have {_plural(limit, 'job')} waiting"
    if guild_id is None:
        return f"{have}, counting every server."
    return f"{have} when they queue in this server; jobs waiting in other servers count too."


def elsewhere(record: JobRecord, guild_id: int | None, user_id: int) -> bool:
    """Whether `record` is the caller's own job of another server (or of direct messages), seen from
    server `guild_id`: its author may always see and cancel it from here. A job waiting in a server
    that paused its jobs, or that removed the bot while it was offline, would otherwise block its
    author's cap in every server with no way to learn its id."""
    return guild_id is not None and record.spec.user_id == user_id and record.spec.guild_id != guild_id


def _elsewhere_item(record: JobRecord, place: int | None, paused_servers: Collection[int]) -> str:
    """One line for the caller's own job of another server: no mention (it is theirs), and why it
    does not start when its server is paused."""
    where = "in another server" if record.spec.guild_id is not None else "in direct messages"
    line = f"`{record.id}` {render.shown_prompt(record)} · yours, {where}"
    if place is None:
        return f"▶ {line} · {record.iteration}/{record.spec.iterations}"
    if record.spec.guild_id in paused_servers:
        line += " (its server's jobs are paused)"
    return f"**#{place}** {line}"


def _pages(items: list[str], room: int) -> list[list[str]]:
    """`items` cut into pages of at most SHOW_MAX entries and `room` characters (one newline each),
    in order: the same pages for every `/queue show page:` while the line stays the same."""
    pages: list[list[str]] = [[]]
    used = 0
    for item in items:
        if pages[-1] and (len(pages[-1]) == SHOW_MAX or used + len(item) + 1 > room):
            pages.append([])
            used = 0
        pages[-1].append(item)
        used += len(item) + 1
    return pages


def show_text(running: list[JobRecord], queued: list[JobRecord], guild_id: int | None, user_id: int,
              *, paused: bool, limit: int, server_paused: bool = False,
              can_see: Callable[[JobRecord], bool] | None = None, page: int = 1,
              paused_servers: Collection[int] = ()) -> str:
    """The `/queue show` answer, page `page` (1-based; past the last: the last, saying so): first the
    caller's own jobs of other servers (`elsewhere`), then the jobs in scope (see `in_scope`) that
    the caller `can_see` (the channel check, bot.permissions.can_see_job; None: all of them) or
    asked for, with their places in the whole line (`queued` in claim order; engine.jobs.
    places_in_line: another paused server's jobs ahead do not count), and how many of the others
    are not shown. `paused`: every server is paused; `server_paused`: this one is;
    `paused_servers`: the servers of the line that are paused."""
    def here(record: JobRecord) -> bool:
        # One's own job is shown whatever its channel: its author wrote the prompt.
        return in_scope(record, guild_id, user_id) and (
            can_see is None or record.spec.user_id == user_id or can_see(record))

    def away(record: JobRecord) -> bool:
        return elsewhere(record, guild_id, user_id)

    held = () if paused else paused_servers
    places = dict(zip((r.id for r in queued), places_in_line([r.spec.guild_id for r in queued], held)))
    away_items = ([_elsewhere_item(r, None, paused_servers) for r in running if away(r)]
                  + [_elsewhere_item(r, places[r.id], paused_servers) for r in queued if away(r)])
    here_items = ([f"▶ `{r.id}` {render.shown_prompt(r)} · <@{r.spec.user_id}> · "
                   f"{r.iteration}/{r.spec.iterations}" for r in running if here(r)]
                  + [f"**#{places[r.id]}** `{r.id}` {render.shown_prompt(r)} · <@{r.spec.user_id}>"
                     for r in queued if here(r)])
    other_running = sum(1 for r in running if not here(r) and not away(r))
    other_queued = sum(1 for r in queued if not here(r) and not away(r))
    # This server's jobs hidden by the channel check: counted, never described (nor their ids).
    unseen = sum(1 for r in running + queued if in_scope(r, guild_id, user_id) and not here(r))
    whose = "of this server" if guild_id is not None else "of yours"

    head: list[str] = []
    if paused:
        head.append("**The queue is paused** for every server: no job starts until the bot's owner resumes it.")
    if server_paused:
        head.append("**This server's jobs are paused**: none of them starts until an admin uses "
                    "`/queue-admin resume` (other servers' jobs go on).")
    if not running and not queued:
        head.append("The line is empty.")
    elif not here_items:
        head.append(f"No job {whose}{' that you can see' if unseen else ''} is in the line.")

    foot: list[str] = []
    if other_queued or other_running:
        parts = [f"{other_queued} waiting"] if other_queued else []
        if other_running:
            parts.append(f"{other_running} running")
        noun = "job" if other_queued + other_running == 1 else "jobs"
        if guild_id is None:
            where = "other people"
        elif not unseen:
            where = "other servers"
        elif unseen == other_queued + other_running:
            where = "channels you cannot see"
        else:
            where = "other servers or of channels you cannot see"
        foot.append(f"-# Not shown: {' and '.join(parts)} {noun} of {where}. "
                    "Places (#) count every job in the line.")
    if away_items:
        foot.append("-# Yours in other servers are listed first: `/queue cancel` takes their ids here too.")
    foot.append(f"-# {limit_sentence(limit, guild_id)}")

    items = away_items + here_items
    room = CONTENT_LIMIT - len("\n".join(head + foot)) - PAGE_LINES_ROOM
    pages = _pages(items, room)
    number = min(page, len(pages))
    shown = pages[number - 1]
    after = items[sum(len(p) for p in pages[:number]):]
    more = []
    if after:
        # Past this page: this server's jobs alone, unless the caller's own of other servers spill over.
        only_here = len(after) <= len(here_items)
        more.append(f"…and {len(after)} more{f' {whose}' if only_here else ''}.")
    if len(pages) > 1 or page > number:
        line = f"-# Page {number} of {len(pages)}"
        if page > number:
            line += f" (there is no page {page} now)"
        more.append(line + (f": `/queue show page:{number + 1}` for the next." if after else "."))
    return "\n".join(head + shown + more + foot)[:CONTENT_LIMIT]


def _line_changed(bot: "ImagineBot") -> None:
    if bot.progress is not None:
        bot.progress.line_changed()


@app_commands.guild_only()
class QueueCog(commands.GroupCog, name="Queue", group_name="queue",
               group_description="The line of imagine jobs: see it, cancel yours"):
    def __init__(self, bot: "ImagineBot"):
        self.bot = bot
        self.queue = bot.queue
        super().__init__()

    @commands.Cog.listener()
    async def on_guild_remove(self, guild: discord.Guild) -> None:
        """The bot was removed from `guild` (kicked, banned, or the server deleted; discord.py reports
        an outage as guild_unavailable, not this): no result of its jobs could ever be posted there,
        and its waiting jobs would count against their authors' cap in every server for ever. So its
        waiting jobs are cancelled and its running ones asked to stop. A removal while the bot was
        offline is never told: those jobs stay for their authors' `/queue cancel`
        (docs/ARCHITECTURE.md, Known gaps)."""
        try:
            cleared = await self.queue.clear(guild_id=guild.id)
            # Read after the clear: a job claimed meanwhile left the line and is running now.
            running = [r.id for r in await self.queue.running() if r.spec.guild_id == guild.id]
            stopping = sum([await self.queue.cancel(job_id) for job_id in running])
        except Exception:   # noqa: BLE001 - the store failed: said, and their authors can still cancel them
            log.warning("removed from server %s, but could not cancel its jobs", guild.id, exc_info=True)
            return
        log.info("removed from server %s: %d waiting jobs cancelled, %d running jobs asked to stop",
                 guild.id, cleared, stopping)
        if cleared or stopping:
            _line_changed(self.bot)

    @commands.Cog.listener()
    async def on_guild_channel_delete(self, channel: discord.abc.GuildChannel) -> None:
        """A channel of a server was deleted. Before, its jobs stayed: the waiting ones counted
        against their authors' cap and ran on the GPU for nothing, and every result's post failed.
        Its cached threads go with it: discord.py reports each as a thread delete
        (`on_raw_thread_delete`). A category has no jobs: nothing to do."""
        await self._cancel_jobs_of_channel(channel.id, "channel")

    @commands.Cog.listener()
    async def on_raw_thread_delete(self, payload: discord.RawThreadDeleteEvent) -> None:
        """A thread was deleted (raw: one the bot had not cached too); as `on_guild_channel_delete`."""
        await self._cancel_jobs_of_channel(payload.thread_id, "thread")

    async def _cancel_jobs_of_channel(self, channel_id: int, kind: str) -> None:
        """Cancel the waiting jobs shown in channel `channel_id` and ask its running ones to stop,
        with render.CANCEL_CHANNEL_GONE: nothing of them can be posted there any more (the progress
        cog gives their final post up on Discord's 404 and marks them delivered). A deletion while
        the bot was offline is never told: those jobs stay (docs/ARCHITECTURE.md, Known gaps)."""
        # A job's channel is its command's (a thread for a command used in one), and its reply is
        # there too: the command's response, or a follow-up of it (bot.imagine).
        reason = render.CANCEL_CHANNEL_GONE
        try:
            waiting = [r.id for r in await self.queue.queued() if r.spec.channel_id == channel_id]
            cancelled = sum([await self.queue.cancel(job_id, reason) for job_id in waiting])
            # Read after the cancels: one claimed meanwhile was asked to stop by its cancel already.
            running = [r.id for r in await self.queue.running()
                       if r.spec.channel_id == channel_id and r.id not in waiting]
            stopping = sum([await self.queue.cancel(job_id, reason) for job_id in running])
        except Exception:   # noqa: BLE001 - the store failed: said, and their authors can still cancel them
            log.warning("%s %s was deleted, but its jobs could not be cancelled", kind, channel_id, exc_info=True)
            return
        if not cancelled and not stopping:
            return   # most deleted channels never had a job: no line for them
        log.info("%s %s was deleted: %d waiting jobs cancelled, %d running jobs asked to stop",
                 kind, channel_id, cancelled, stopping)
        _line_changed(self.bot)

    @app_commands.command(name="show",
                          description="Show this server's jobs in the line (and yours in other servers): "
                                      "who waits for what, and what runs")
    @app_commands.describe(page=f"Which page of the list (1 first; each shows up to {SHOW_MAX} jobs)")
    async def show(self, interaction: discord.Interaction, page: app_commands.Range[int, 1, None] = 1) -> None:
        guild_id = interaction.guild_id
        user_id = interaction.user.id
        if page < 1:   # Discord enforces the option's minimum; this is for a value that arrives anyway
            await ephemeral(interaction, f"`page` must be 1 or more (you gave {page}).")
            return

        async def read() -> str:
            running = await self.queue.running()
            queued = await self.queue.queued()
            # A private channel's jobs stay in it: which of this server's the caller may see, with
            # one Discord lookup at most per private thread (and at most 10) for the whole list.
            # The caller's own jobs are shown whatever their channel (show_text): no lookup for them.
            lookups = ThreadLookups()
            seen = set() if guild_id is None else {
                r.id for r in running + queued
                if in_scope(r, guild_id, user_id) and r.spec.user_id != user_id
                and await can_see_job(interaction, r, lookups)}
            paused = bool(await self.queue.get_setting(PAUSED_KEY, False))
            server_paused = (guild_id is not None
                             and bool(await self.queue.get_setting(guild_paused_key(guild_id), False)))
            limit = await self.bot.user_limit(guild_id)
            return show_text(running, queued, guild_id, user_id, paused=paused, limit=limit,
                             server_paused=server_paused,
                             can_see=None if guild_id is None else (lambda r: r.id in seen), page=page,
                             paused_servers=await self._paused_servers_of(queued))

        await ephemeral(interaction, await in_time(interaction, read(), defer="private"))

    async def _paused_servers_of(self, records: list[JobRecord]) -> set[int]:
        """Which of these jobs' servers are paused (one setting read per server): their jobs wait
        until that server's admins resume it, and the workers take the jobs behind them first."""
        servers = {r.spec.guild_id for r in records if r.spec.guild_id is not None}
        return {g for g in servers if await self.queue.get_setting(guild_paused_key(g), False)}

    @app_commands.command(name="cancel",
                          description="Cancel a queued or running job (yours, or as an admin this server's)")
    @app_commands.describe(job="The job id (shown under each reply and in /queue show)")
    async def cancel(self, interaction: discord.Interaction, job: str) -> None:
        job = job.strip()
        admin = is_admin(interaction, self.bot.config)

        async def find() -> JobRecord | None:
            """The job, if the caller may know of it (`may_know_job`; a private thread's may ask Discord)."""
            # Only what can be an id is looked up: other text (a lone surrogate, which the store
            # cannot even encode) is no job, as in /remix.
            record = await self.queue.get(job) if re.fullmatch(JOB_ID, job) else None
            return record if record is not None and await may_know_job(interaction, record, admin=admin) else None

        record = await in_time(interaction, find(), defer="private")
        own = record is not None and record.spec.user_id == interaction.user.id
        if record is None:
            # Another server's job, or (to a member who may not cancel it anyway) one of a channel
            # they cannot see, reads exactly as an unknown id: its existence is not confirmed.
            await ephemeral(interaction, f"There is no job {render.quote(job)} in this server; "
                                         "see `/queue show` for the ids.")
            return
        if not own and not admin:
            roles = admin_roles_text(self.bot.config)
            await ephemeral(interaction, f"Only the person who asked for job `{record.id}`, or an admin, can cancel "
                                         "it: admins need the Manage Server permission"
                                         + (f" or one of the roles {roles}." if roles else "."))
            return
        await cancel_and_answer(self.bot, interaction, record)   # it defers before the store's write


@app_commands.guild_only()
class QueueAdminCog(commands.GroupCog, name="QueueAdmin", group_name="queue-admin",
                    group_description="Admin: manage this server's line of imagine jobs"):
    """`/queue-admin ...` (bot.moderation adds its `ban-word` group). Shown to members with Manage
    Server only when no admin role is configured (`admin_command_permissions`); used by admins
    only either way (`require_admin`, `_owner`)."""

    def __init__(self, bot: "ImagineBot"):
        self.bot = bot
        self.queue = bot.queue
        super().__init__()
        # Per config, so not the class decorator's: the group is made before __init__ runs.
        group = self.app_command
        assert group is not None   # a GroupCog's own group
        group.default_permissions = admin_command_permissions(bot.config)

    async def _admin(self, interaction: discord.Interaction) -> bool:
        return await require_admin(interaction, self.bot.config)

    async def _owner(self, interaction: discord.Interaction) -> bool:
        """True for the bot's owner; anyone else (server admins included) gets a private refusal.
        discord.py asks Discord who owns the application on its first call (then remembers it): a
        slow answer defers privately rather than miss the 3 s window (in_time)."""
        if await in_time(interaction, self.bot.is_owner(interaction.user), defer="private"):
            return True
        await ephemeral(interaction, "Only the bot's owner can pause or resume every server at once: the queue is "
                                     "shared by every server the bot is in. Admins can `/queue-admin pause` and "
                                     "`/queue-admin resume` this server's jobs (without `everywhere`).")
        return False

    async def _may_pause(self, interaction: discord.Interaction, everywhere: bool) -> bool:
        """Every server: the bot's owner alone; this server: its admins. Refused: answered privately."""
        return await (self._owner(interaction) if everywhere else self._admin(interaction))

    @app_commands.command(name="clear", description="Admin: cancel this server's queued jobs (running ones go on)")
    async def clear(self, interaction: discord.Interaction) -> None:
        if not await self._admin(interaction):
            return
        # _admin refuses outside a server. The store cancels only jobs still waiting, so one a
        # worker claims meanwhile goes on.
        await interaction.response.defer(ephemeral=True)
        count = await self.queue.clear(guild_id=interaction.guild_id)
        log_admin_action(interaction, "clear: %d queued jobs cancelled", count)
        if count:
            _line_changed(self.bot)
        await ephemeral(interaction, f"Cleared this server's jobs from the line: "
                                     f"{_plural(count, 'job')} cancelled.")

    @app_commands.command(name="pause", description="Admin: stop starting this server's jobs (running ones finish)")
    @app_commands.describe(everywhere="Bot owner only: pause every server the bot is in")
    async def pause(self, interaction: discord.Interaction, everywhere: bool = False) -> None:
        await self._set_paused(interaction, everywhere, True)

    @app_commands.command(name="resume", description="Admin: start this server's jobs again")
    @app_commands.describe(everywhere="Bot owner only: resume every server the bot is in")
    async def resume(self, interaction: discord.Interaction, everywhere: bool = False) -> None:
        await self._set_paused(interaction, everywhere, False)

    async def _set_paused(self, interaction: discord.Interaction, everywhere: bool, paused: bool) -> None:
        """`/queue-admin pause` and `resume`: every server's setting (the owner's), or this server's."""
        if not await self._may_pause(interaction, everywhere):
            return
        if not interaction.response.is_done():   # the owner check may have deferred already
            await interaction.response.defer(ephemeral=True)
        if everywhere:
            # The owner's setting only: a server its admins paused stays paused when it is resumed.
            await self.queue.set_setting(PAUSED_KEY, paused)
            text = ("Paused for every server: no new job starts until `/queue-admin resume everywhere:True` "
                    "(running ones finish)." if paused else
                    "Resumed: jobs start again (except in servers whose admins paused them).")
        else:
            guild_id = interaction.guild_id or 0   # never 0: _admin refuses outside a server
            await self.queue.set_setting(guild_paused_key(guild_id), paused)
            if paused:
                text = ("Paused this server's jobs: none of them starts until `/queue-admin resume` (running "
                        "ones finish; other servers' jobs go on).")
            else:
                text = "Resumed: this server's jobs start again."
                if await self.queue.get_setting(PAUSED_KEY, False):
                    text += " But the bot's owner has paused every server: nothing starts until they resume it."
        log_admin_action(interaction, "%s%s", "pause" if paused else "resume", " everywhere" if everywhere else "")
        _line_changed(self.bot)
        await ephemeral(interaction, text)

    @app_commands.command(name="limit",
                          description="Admin: how many waiting jobs (in every server) a person may have to queue here")
    @app_commands.describe(n=f"Jobs one person may have waiting ({LIMIT_MIN}-{LIMIT_MAX})")
    async def limit(self, interaction: discord.Interaction, n: app_commands.Range[int, LIMIT_MIN, LIMIT_MAX]) -> None:
        if not await self._admin(interaction):
            return
        if not LIMIT_MIN <= n <= LIMIT_MAX:   # Discord enforces the option's range; for a value that arrives anyway
            await ephemeral(interaction, f"`n` must be between {LIMIT_MIN} and {LIMIT_MAX} (you gave {n}).")
            return
        guild_id = interaction.guild_id or 0   # never 0: _admin refuses outside a server
        await interaction.response.defer(ephemeral=True)
        await self.queue.set_setting(user_limit_key(guild_id), n)
        log_admin_action(interaction, "limit set to %d", n)
        await ephemeral(interaction, limit_sentence(n, guild_id, now=True))


class HistoryCog(commands.Cog, name="History"):
    def __init__(self, bot: "ImagineBot"):
        self.bot = bot

    @app_commands.command(name="history", description="This channel's recent prompts, with links to the results")
    @app_commands.guild_only()
    async def history(self, interaction: discord.Interaction) -> None:
        # Reads only: a private "thinking…" first when they are slow (bot.imagine.in_time).
        lines = await in_time(interaction, self._lines(interaction), defer="private")
        text = "\n".join(lines) if lines else "No prompts in this channel yet: try `/imagine`."
        while len(text) > 2000 and lines:
            lines.pop()
            text = "\n".join(lines)
        await ephemeral(interaction, text)

    async def _lines(self, interaction: discord.Interaction) -> list[str]:
        """One entry per job of this channel, newest first, each with its lineage (render.lineage_lines:
        ↻ reroll of, → continues, ↳ remix of) in the short form, naming only jobs the caller may see."""
        records = await self.bot.queue.history(interaction.channel_id or 0, limit=15)
        hidden = await self._hidden_sources(interaction, records)
        refused = await moderation.refused_now(self.bot.queue, interaction.guild_id, records,
                                               self.bot.config.imagine.max_prompt_chars)
        lines = []
        for record in records:
            url = render.reply_url(record.spec)
            shown = render.shown_prompt(record, 80, refused=record.id in refused)
            line = (f"• {shown} · <@{record.spec.user_id}> · {self._shown_state(record)}"
                    f" · `{record.id}`" + (f" · {url}" if url else ""))
            lines.append("\n  ".join([line] + render.lineage_lines(record.spec, details=False, hidden=hidden)))
        return lines

    @staticmethod
    def _shown_state(record: JobRecord) -> str:
        """Its state; one that ended DONE after a banned-word cancel (its worker finished before it saw
        the request) reads "cancelled", as its reply does: no picture of it was posted."""
        if record.state.finished and render.withholds_prompt(record):
            return JobState.CANCELLED.value
        return record.state.value

    async def _hidden_sources(self, interaction: discord.Interaction, records: list[JobRecord]) -> set[str]:
        """The jobs these records' lineage names that the caller may not see. A remix (or a Reroll of
        one) may come from a job of a channel the caller cannot view (/remix takes any job id its
        user may see), and its id and author belong to that channel (bot.permissions.can_see_job).
        A job pruned since is judged by the channel `record` recorded for it (render.lineage_channels:
        its link's; a Reroll's or Continue's source without one, the record's own, this channel); one
        of no known channel, hidden: what cannot be checked is hidden."""
        lookups = ThreadLookups()
        verdicts: dict[str, bool] = {}
        for record in records:
            for job_id, channel_id in render.lineage_channels(record.spec).items():
                if job_id in verdicts:
                    continue
                source = await self.bot.queue.get(job_id)
                if source is not None:
                    verdicts[job_id] = await can_see_job(interaction, source, lookups)
                else:
                    verdicts[job_id] = (channel_id is not None
                                        and await can_view_channel(interaction, channel_id, lookups))
        return {job_id for job_id, visible in verdicts.items() if not visible}
