"""JobEvents -> message edits, and the final post of every job exactly once.

How it keeps within Discord's limits (see DESIGN.md, "Discord facts"):

- One `_Tracker` per job shown in Discord holds only the newest state (queue position, newest
  frame, finished). An edit renders that state when it is sent, so a newer frame replaces an
  older unsent one and nothing queues up.
- One sender task per job at most; before each edit it waits until the message's last edit is
  `message_interval` old and the channel gives it a slot (`channel_interval` apart). A slot goes
  to the channel's most urgent waiter: a final post (or lost notice), then a frame (or the
  "starting" edit), then a redraw of a place in line (one that has waited LINE_AGING slots counts
  as a frame, so it is not starved for ever); first come first served within each. discord.py still
  waits out any 429 on its own; there is no second limiter here.
- Places in line: when the line moves, only the first LINE_REDRAWS queued jobs of each channel are
  redrawn; a job further back keeps the place it was last shown until it gets among them (a pause
  or resume is redrawn for every job). So a start or finish costs a channel at most LINE_REDRAWS
  position edits, however long its line.
- While the interaction token is young the bot edits through it (the original response, or a
  follow-up: replies 2..n of a permutation set); after `token_ttl` (or on 401 / 50027) it edits
  the channel message with the bot token, which never expires. The token's age counts from the
  interaction's creation (its snowflake), not from when the job was registered: an attachment
  download and a slow store come before that.
- An archived thread (auto-archived after 1 h to 7 days without a new message; edits are no
  activity) refuses edits with 400 / 50083: that ends the job's progress edits (like a 403), and its
  result goes out as a new message, which unarchives the thread (a locked one refuses that too,
  unless the bot has Manage Threads: then a refusal like any other, below).
- A deleted message (any 404 of the channel edit: 10008 Unknown Message, or 10003 Unknown Channel
  when the channel or thread went) ends the edits for that job; its result goes out as a new
  message. A new message the channel refuses (403: the bot may not post there; slash commands
  still work) goes out as an interaction follow-up while the token lives; after that, and on 404,
  nothing can post it: the bot logs an error and marks it delivered. A permutation set's reply
  that is a channel message (its first reply failed, bot.permutations) has no token to edit it,
  but keeps the set's command for this one fallback (`_Tracker.fallback`), with the same age rule.
  Tokens are never stored: after a restart no job has one.
- Refusals are final, errors are not: Discord's 5xx and network errors are retried with backoff
  for ever (nothing is lost), but a 4xx (other than 429, 408, 401) would be refused again. A 413 (too large:
  the server lost its boosts since the job was queued) first drops the limit kept from the
  command for the guild's of now, when that is known and smaller, and fits the video to it again;
  a 413 after that (or at once, with no smaller limit known) posts the image without the video,
  then the text alone; any other 4xx of the final post (or the lost-job notice) is tried
  `REFUSED_TRIES` times, then given up: logged as an error and marked delivered.
- The final post: built from the store (record + artifacts), sent, then `mark_delivered`. It is
  an idempotent edit of the job's reply, so a crash before `mark_delivered` repeats the same edit
  rather than posting twice; a fallback new message carries a nonce that Discord deduplicates.
  Once it is posted, its message's id is kept (and written as the reply's `result_message_id`):
  a store write that fails after the post is retried alone, and a restart before `mark_delivered`
  finds that id and only repeats the store writes (an edit of the original reply would be a
  second result when the first went out as a new message). Before a result goes out as a new
  message the reply is marked `reposting` in the store: a restart between that post and the write
  of its id posts it again with the same nonce (Discord returns the first message for a nonce it
  saw in the last few minutes), never as an edit of the original reply, which the first post may
  have made editable again (an archived thread unarchives). Discord keeps a nonce only a few
  minutes, so a restart later than that first reads the channel's messages since the mark
  (`reposting_after`, a snowflake a minute before it) for the bot's post with this job's buttons
  (or, for a result without buttons, withheld or a banned word's cancel, naming the job), and takes
  that one as the result (REPOST_SEARCH messages at most; without Read Message History the nonce
  alone guards it). Jobs that finished while the bot was
  down come back through `undelivered()`; at most FINALS_AT_ONCE finals hold their files in memory
  at a time, so a backlog after downtime is not read all at once.
- A result is checked against its server's refused words as they are when it is posted (the same
  matching as the add's cancel, moderation.find): a word added after the job finished (its result
  waiting: the bot down or behind) cancels nothing, so the final post itself withholds it
  (render.withheld_text): no picture, no prompt, no buttons; delivered as any.
- A reply whose id could not be written to the store when it was made (`set_reply` failed: a
  store hiccup) is kept on its tracker and written again by the reconcile pass (and with the
  result), so a restart still finds the reply and edits it, instead of leaving it at "Queued" with
  a live Cancel button and posting the result apart.
- A followed job whose record is gone from the store before its result was posted (the store lost
  its data: a Redis restarted empty) will get no more events: the reconcile pass finds it (at once
  when the event numbering restarts, else every `reconcile_interval`), edits its reply once into a
  notice (render.lost_text) and stops following it.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import io
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable

import aiohttp
import discord
from discord.ext import commands

from bot import moderation, render
from engine.jobs import PAUSED_KEY, EventKind, JobEvent, JobRecord, JobState, pause_of, places_in_line
from engine.outage import OutageLog

if TYPE_CHECKING:
    from bot.client import ImagineBot

log = logging.getLogger(__name__)

CURSOR_KEY = "bot.events_cursor"
DEFAULT_UPLOAD_LIMIT = 10 * 1024 * 1024
# Discord checks an app's upload limit per file, not per message (since 2025-04-03: discord-api-docs
# #7451), so the final image and the video are each measured against the whole limit on their own.
# The video is kept this far under it all the same: whether Discord counts a file of exactly the
# limit, or a part's few hundred bytes of multipart headers, is not documented, and a 413 costs the
# whole video (the 413 path posts the image alone), while this room costs at most a re-encode of a
# video that was within 4 KiB of the limit.
FILE_MARGIN = 4 * 1024
UNKNOWN_MESSAGE = 10008
INVALID_WEBHOOK_TOKEN = 50027
MISSING_PERMISSIONS = 50013   # a 403: the bot lacks a permission (Send Messages, Attach Files...) there
THREAD_ARCHIVED = 50083
# When the line moves, the places of only this many queued jobs per channel are redrawn (the first).
LINE_REDRAWS = 10
# A channel's slots go to final posts, then frames, then redraws of places in line...
FINAL_TURN, FRAME_TURN, LINE_TURN = 0, 1, 2
# ...but a redraw that has waited this many channel intervals goes as a frame.
LINE_AGING = 20
# A 4xx (is_refusal) of the final post is tried this many times, then given up: the same request would
# be refused again, and each try re-reads the artifacts and re-uploads them.
REFUSED_TRIES = 3
NO_PING = discord.AllowedMentions.none()
# Discord takes a message nonce of at most this many characters.
NONCE_MAX = 25
# Final posts prepared at once (each holds its final image and video in memory until it is posted):
# a backlog of results after downtime is read from the store a few at a time, not all together.
FINALS_AT_ONCE = 4
# A result reposted before a restart is looked for among this many of the channel's messages since
# its `reposting` mark (two history pages): a busy channel's later chatter may hide an older post.
REPOST_SEARCH = 200
# The mark's snowflake is this much older than the mark, for a clock a little ahead of Discord's.
REPOST_CLOCK_SLACK = 60.0


def _nonce(prefix: str, job_id: str) -> str:
    """The nonce of a new message of a job (Discord drops a repeat of it): `prefix` and the job id,
    or, should that be longer than NONCE_MAX, a hash of both (distinct prefixes stay distinct)."""
    nonce = f"{prefix}{job_id}"
    if len(nonce) > NONCE_MAX:
        nonce = "i" + hashlib.sha256(nonce.encode()).hexdigest()[:NONCE_MAX - 1]
    return nonce


# What an edit or a post fails with while Discord, or the way to it, is down: expected, retried (a
# result) or replaced by the next frame (an edit), so logged as an outage, without tracebacks.
# Only what a request to Discord raises: not every OSError, or a local I/O error (a file of the
# result unreadable, a disk full) would be taken for an outage and logged at DEBUG only.
NETWORK_ERRORS: tuple[type[BaseException], ...] = (
    aiohttp.ClientError, asyncio.TimeoutError, TimeoutError, ConnectionError, discord.DiscordServerError)
# While an outage lasts, a reminder this often (seconds); the rest of its failures only at DEBUG.
OUTAGE_REMINDER = 60.0


class _Outage:
    """Discord failing every edit and post (network errors, 5xx): one WARNING when it begins, a
    reminder a minute while it lasts, an INFO line when Discord answers again; each failure at
    DEBUG. Without this, every job logged a traceback for every frame's edit (one every few seconds
    per job) for as long as the outage lasted."""

    def __init__(self) -> None:
        self.since: float | None = None   # monotonic start of the current outage
        self.failures = 0
        self.said_at = 0.0

    def failed(self, job_id: str, exc: BaseException) -> None:
        now = time.monotonic()
        reason = f"{type(exc).__name__}: {' '.join(str(exc).split()) or 'no detail'}"
        if self.since is None:
            self.since, self.failures, self.said_at = now, 1, now
            log.warning("cannot reach Discord (job %s: %s); progress edits are skipped and results retried "
                        "until it answers (a reminder a minute while this lasts)", job_id, reason)
            return
        self.failures += 1
        if now - self.said_at >= OUTAGE_REMINDER:
            self.said_at = now
            log.warning("Discord still cannot be reached after %.0f s (%d failed requests; the last: %s)",
                        now - self.since, self.failures, reason)
        else:
            log.debug("job %s: Discord not reached (%s)", job_id, reason)

    def answered(self) -> None:
        if self.since is not None:
            log.info("Discord answers again after %.0f s (%d requests failed meanwhile)",
                     time.monotonic() - self.since, self.failures)
            self.since = None


# A failed job's reason in the log line of its FAILED event: of the kind its public reply reads
# (render.classify_failure), but a worker's reason (an exception, a lost worker) as the worker
# logged it, not what the reply says. A rejected input's reason is the user's text: logged only
# when it quotes nothing (engine.prompts._quote quotes the prompt's parts).
FAILURE_REASON_CHARS = 200


def _failure_reason(reason: str | None) -> str:
    """A failed job's reason (its record's error, which its FAILED event carries) for the log line:
    one line, at most FAILURE_REASON_CHARS, none that quotes the prompt."""
    kind = render.classify_failure(reason).kind
    text = " ".join((reason or "").split())
    if kind == render.FAILURE_NONE:
        return "no reason given"
    if kind == render.FAILURE_INPUT and ("'" in text or '"' in text):
        return "its input was rejected (the reason quotes the prompt: not logged)"
    return text if len(text) <= FAILURE_REASON_CHARS else text[:FAILURE_REASON_CHARS - 1] + "…"


def is_refusal(exc: discord.HTTPException) -> bool:
    """Discord refused the request itself (a 4xx): repeating it cannot help, unlike a 5xx or a
    network error. Not 429 (wait and retry), 408 (a timeout) or 401: the bot token itself is
    refused, so nothing gets through until it is fixed, and nothing should be given up meanwhile."""
    return 400 <= exc.status < 500 and exc.status not in (401, 408, 429)


class MessageGone(Exception):
    """The job's message was deleted (404, code 10008): stop editing, post the result anew."""


class NoMessage(Exception):
    """No message of the job is known (yet): nothing to edit."""


class ThreadArchived(Exception):
    """The job's message is in an archived thread (400, code 50083): edits are refused until a new
    message unarchives it."""


def created_monotonic(interaction: discord.Interaction) -> float:
    """When `interaction` was made, on time.monotonic()'s clock (its id's timestamp, Discord's
    clock): its token's 15 minutes count from then. A creation time ahead of ours (clock skew)
    counts as now."""
    now = time.monotonic()
    created = getattr(interaction, "created_at", None)
    if created is None:
        return now
    return now - max(0.0, (discord.utils.utcnow() - created).total_seconds())


@dataclass
class _Frame:
    iteration: int
    total: int
    similarity: float | None
    png: bytes | None


@dataclass
class _Final:
    record: JobRecord
    content: str
    files: list[tuple[str, bytes]]   # (name, data): fresh discord.File objects for every attempt
    withheld: bool = False           # its prompt is refused now (render.withheld_text): no buttons either


@dataclass
class _Tracker:
    job_id: str
    record: JobRecord
    channel_id: int
    guild_id: int | None
    message_id: int | None = None
    interaction: discord.Interaction | None = None   # its token edits the message, posts follow-ups
    interaction_at: float = 0.0       # when the interaction was made (created_monotonic)
    followup: bool = False            # the message is a follow-up of `interaction`, not its original
    # The command of a permutation set whose reply here is a channel message (made with the bot
    # token, or refused): its token cannot edit that message, so it is not `interaction` (edits
    # would go to the command's own message, or be refused). It only posts the result as a
    # follow-up when the channel refuses a new message (_post_new), while younger than token_ttl.
    fallback: discord.Interaction | None = None
    fallback_at: float = 0.0          # when `fallback` was made (created_monotonic)
    attached: bool = False            # the message exists (or never will); edits may go out
    dead: bool = False                # the message was deleted: no more edits
    muted: bool = False               # a progress edit was refused (403, 50083): no more progress edits
    archived: bool = False            # an edit answered 50083: the result goes out as a new message
    position: int | None = None
    line_stale: bool = False          # its place in line changed and was not redrawn (LINE_REDRAWS)
    requeued: bool = False            # back in line after a run (QUEUED): its place is drawn at the next round
    paused: str = ""   # engine.jobs.pause_of
    started: bool = False
    frame: _Frame | None = None
    framed: bool = False              # the message may carry a frame.png: a progress edit without one removes it
    first_progress: tuple[float, int] | None = None   # (at, iteration) for the ETA
    new_run: bool = True              # no frame of the job's current run (claim) seen yet
    eta: float | None = None
    final: bool = False
    lost: bool = False                # gone from the store before it ended: one notice, then dropped
    delivered: bool = False
    dirty: bool = False
    last_content: str | None = None
    last_sent: float = 0.0
    sender: asyncio.Task | None = None
    upload_limit: int | None = None
    refused: int = 0                  # 4xx answers to the final post (or lost notice) so far
    shrink: int = 0                   # 413s so far: 1 = post without the video, 2 = the text alone
    # The first 413 is handled (`_refused`): the limit kept from the command (`upload_limit`) gave way to
    # the guild's smaller one of now (the server lost boosts), or none smaller was known. Later 413s shrink.
    refitted: bool = False
    # The result's message once it is posted (0: nothing can post it, given up): a retry after a
    # failed store write (set_reply, mark_delivered) repeats only those, never the post.
    posted: int | None = None
    # (video size, room, what _reencode_to_fit made of it): a retry of the final post does not run
    # ffmpeg again.
    fitted: tuple[int, int, bytes | None] | None = None
    # The reply's store entry (spec.reply) when writing it failed as the reply was made: written
    # again by the reconcile pass (or before the result), and merged into every later write of
    # the reply (_reply_of), since a record read before that write landed lacks it.
    unsaved_reply: dict[str, Any] | None = None
    reply_saved: bool = False         # `unsaved_reply` is in the store now
    # One write of the reply's entry at a time (the reconcile pass's and the final post's): a late
    # one must not undo a later one (the `reposting` mark, the result's id).
    reply_lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass
class _Waiter:
    tracker: _Tracker
    seq: int
    since: float                      # loop time it began waiting
    future: asyncio.Future


@dataclass
class _ChannelTurns:
    """One channel's slots: the next one's loop time, who waits for one, the timer that grants it."""
    next_at: float = 0.0
    waiters: list[_Waiter] = field(default_factory=list)
    timer: asyncio.TimerHandle | None = None


class ProgressCog(commands.Cog, name="Progress"):
    """Follows the queue's events and keeps every job's message up to date."""

    def __init__(self, bot: "ImagineBot"):
        self.bot = bot
        self.queue = bot.queue
        self.cfg = bot.config.progress
        self.trackers: dict[str, _Tracker] = {}
        self._foreign: OrderedDict[str, None] = OrderedDict()   # job ids that are not ours to show
        self._turns: dict[int, _ChannelTurns] = {}
        self._turn_seq = 0
        self._tasks: list[asyncio.Task] = []
        self._line_dirty = asyncio.Event()
        self._reconcile_now = asyncio.Event()
        self._closing = False
        self.cursor = 0
        self._outage = _Outage()   # Discord unreachable: logged once, not per edit
        self._finals = asyncio.Semaphore(FINALS_AT_ONCE)   # finals holding their files (FINALS_AT_ONCE)

    # --- lifecycle --------------------------------------------------------------------------

    async def cog_load(self) -> None:
        self._closing = False
        self.cursor = int(await self.queue.get_setting(CURSOR_KEY, 0) or 0)
        self._tasks = [
            asyncio.create_task(self._event_loop(), name="progress-events"),
            asyncio.create_task(self._line_loop(), name="progress-line"),
            asyncio.create_task(self._reconcile_loop(), name="progress-reconcile"),
        ]

    async def cog_unload(self) -> None:
        self._closing = True
        tasks = self._tasks + [t.sender for t in self.trackers.values() if t.sender is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks = []
        for turns in self._turns.values():
            if turns.timer is not None:
                turns.timer.cancel()
        self._turns.clear()
        try:
            await self.queue.set_setting(CURSOR_KEY, self.cursor)
        except Exception:  # noqa: BLE001 - the queue may already be gone; events replay harmlessly
            log.warning("could not save the event cursor", exc_info=True)

    # --- registration by the commands ---------------------------------------------------------

    def register(self, record: JobRecord, interaction: discord.Interaction | None) -> _Tracker:
        """A job this process just submitted; its message is attached once it exists."""
        t = self.trackers.get(record.id)
        if t is None:
            t = _Tracker(record.id, record, record.spec.channel_id, record.spec.guild_id)
            self.trackers[record.id] = t
        t.attached = False   # until the command's own first edit has made the reply
        t.dead = False
        t.muted = False
        t.archived = False
        t.interaction = interaction
        t.interaction_at = created_monotonic(interaction) if interaction is not None else time.monotonic()
        t.fallback = None   # attach() hands it over, for a set's channel-message reply
        t.unsaved_reply, t.reply_saved = None, False
        if interaction is not None:
            t.upload_limit = getattr(interaction, "filesize_limit", None)
        return t

    def attach(self, job_id: str, channel_id: int | None, message_id: int | None, content: str | None,
               *, followup_of: discord.Interaction | None = None,
               fallback_of: discord.Interaction | None = None,
               unsaved_reply: dict[str, Any] | None = None) -> None:
        """The job's reply exists now (or could not be made: message_id None). `followup_of`: the
        reply is (or was to be) a follow-up of that interaction, edited through its token while it
        lives, like an original response: no channel permission needed. `fallback_of`: the reply is
        (or was to be) a channel message made for that interaction (a permutation set's), edited
        with the bot token only; the interaction is kept just to post the result as its follow-up
        should the channel refuse the bot (`_Tracker.fallback`). `unsaved_reply`: the reply's store
        entry, whose write failed: the reconcile pass writes it (`_save_replies`)."""
        t = self.trackers.get(job_id)
        if t is None:
            return
        if unsaved_reply is not None:
            t.unsaved_reply, t.reply_saved = dict(unsaved_reply), False
            self._reconcile_now.set()
        if followup_of is not None:
            t.interaction, t.followup = followup_of, True
            t.interaction_at = created_monotonic(followup_of)
        if fallback_of is not None:
            t.fallback, t.fallback_at = fallback_of, created_monotonic(fallback_of)
        if channel_id:
            t.channel_id = channel_id
        t.message_id = message_id
        t.attached = True
        t.last_content = content
        t.last_sent = time.monotonic()
        self._line_dirty.set()
        if (message_id is not None and content is not None and t.position is None
                and not (t.started or t.final or t.lost)):
            # The reply shows the job queued, with the place the command read; no round of the line
            # has placed it yet, so an edit now could only draw it without its place ("Queued.").
            # The line's next round redraws the place if it has changed (LINE_REDRAWS).
            return
        self._kick(t)

    # --- events -----------------------------------------------------------------------------

    async def _event_loop(self) -> None:
        saved, saved_at = self.cursor, time.monotonic()
        # A store outage fails these every second: one traceback, a line a minute, one at its end.
        reads, cursor_saves = OutageLog(log, "reads of queue events"), OutageLog(log, "saves of the event cursor")
        while True:
            try:
                events = await self.queue.events(after=self.cursor, timeout=self.cfg.poll_timeout)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a queue outage must not end the task
                reads.failed(exc, "retrying every second")
                await asyncio.sleep(1.0)
                continue
            reads.worked()
            if events and events[0].seq <= self.cursor:
                # The numbering restarted: the store lost its data (a Redis that came back empty),
                # and with it the jobs we follow. Look for them now, not at the next round.
                log.warning("the queue's event numbering restarted (%s after %s): checking the jobs followed",
                            events[0].seq, self.cursor)
                self._reconcile_now.set()
            for event in events:
                try:
                    await self._on_event(event)
                except asyncio.CancelledError:
                    raise
                except Exception:  # noqa: BLE001
                    log.exception("handling event %s of job %s failed", event.kind, event.job_id)
                # Not max(): events come in order, and after a Redis that lost its data the
                # numbering restarts below the saved cursor (engine.queue.redis reads from 0 then).
                self.cursor = event.seq
            if self.cursor != saved and time.monotonic() - saved_at > 2.0:
                try:
                    await self.queue.set_setting(CURSOR_KEY, self.cursor)
                    saved, saved_at = self.cursor, time.monotonic()
                except Exception as exc:  # noqa: BLE001
                    cursor_saves.failed(exc)
                else:
                    cursor_saves.worked()

    async def _on_event(self, event: JobEvent) -> None:
        kind = EventKind(event.kind)
        if kind != EventKind.PROGRESS:   # someone joined or left the line
            self._line_dirty.set()
        t = await self._tracker(event.job_id)
        if t is not None and kind == EventKind.FAILED:
            log.info("job %s failed: %s", event.job_id, _failure_reason(event.message))
        elif t is not None and kind != EventKind.PROGRESS:   # one INFO line per job event; no prompt
            log.info("job %s %s", event.job_id, kind.value)
        if t is None or t.final or t.lost:
            return
        if kind == EventKind.STARTED:
            t.started, t.position, t.new_run, t.requeued = True, None, True, False
            self._kick(t)
        elif kind == EventKind.PROGRESS:
            t.started, t.position = True, None
            if t.frame is not None and event.iteration < t.frame.iteration and not t.new_run:
                # A late frame of this run: a worker's frames can reach the log out of order (their
                # publishes retried concurrently after a queue outage). Keep showing the newer one.
                return
            t.new_run = False   # a new run (resumed from a checkpoint) may start below the last frame
            if t.first_progress is None or event.iteration < t.first_progress[1]:
                t.first_progress = (event.at, event.iteration)
            at0, it0 = t.first_progress
            if event.iteration > it0 and event.at > at0:
                t.eta = (event.total - event.iteration) * (event.at - at0) / (event.iteration - it0)
            else:
                t.eta = None
            png = event.frame_png if event.frame_png else (t.frame.png if t.frame else None)
            t.frame = _Frame(event.iteration, event.total, event.similarity, png)
            self._kick(t)
        elif kind == EventKind.QUEUED:
            if t.started or t.frame is not None:
                # Back in line after a run (released, failed for a retry, its worker's lease expired):
                # show its place again, not the last frame and ETA of the run that stopped. The line's
                # next round (its event set _line_dirty) draws it, among the first LINE_REDRAWS or not.
                t.started, t.frame, t.eta, t.first_progress, t.new_run = False, None, None, None, True
                t.position, t.requeued = None, True
                t.framed = True   # it may show a frame (drawn before a restart of the bot, too): remove it
        elif kind in (EventKind.DONE, EventKind.FAILED, EventKind.CANCELLED):
            self._finish(t)

    async def _tracker(self, job_id: str, record: JobRecord | None = None) -> _Tracker | None:
        t = self.trackers.get(job_id)
        if t is not None or job_id in self._foreign:
            return t
        if record is None:
            record = await self.queue.get(job_id)
        t = self.trackers.get(job_id)   # made while we waited
        if t is not None or job_id in self._foreign:   # (or delivered and dropped meanwhile)
            return t
        if record is None or record.delivered or not record.spec.channel_id:
            self._forget(job_id)
            return None
        reply = record.spec.reply or {}
        t = _Tracker(job_id, record, int(reply.get("channel_id") or record.spec.channel_id), record.spec.guild_id)
        t.message_id = int(reply["message_id"]) if reply.get("message_id") else None
        if reply.get("reposting"):
            # Its result was (being) posted as a new message when the bot stopped: post it as one
            # again (the same nonce: Discord returns the first), never as an edit of the reply,
            # which that post may have made editable again (it unarchives a thread).
            t.dead = True
        if reply.get("result_message_id"):
            # Its result was posted (set_reply writes this only after the post) but not marked
            # delivered (a crash in between): that message is the job's now, and only the store
            # writes are left to repeat. Not the reply: after a repost (deleted reply, archived
            # thread) an edit of it would be a second result.
            t.message_id = t.posted = int(reply["result_message_id"])
        t.upload_limit = reply.get("upload_limit")
        t.started = record.state == JobState.RUNNING
        # Made by another process (or before a restart): nothing more will attach it.
        t.attached = True
        # What its message shows is not known here: a frame of a run that stopped meanwhile (the job
        # handed back while the bot was down) goes with the first edit that draws none.
        t.framed = True
        self.trackers[job_id] = t
        return t

    def _forget(self, job_id: str) -> None:
        """No tracker is made for `job_id` from now on: not ours to show, or delivered (a queue
        snapshot read before that must not bring it back)."""
        self._foreign[job_id] = None
        while len(self._foreign) > 10_000:
            self._foreign.popitem(last=False)

    def _finish(self, t: _Tracker) -> None:
        if not t.final:
            t.final = True
            self._kick(t)

    # --- the line (queue positions) ------------------------------------------------------------

    async def _line_loop(self) -> None:
        while True:
            await self._line_dirty.wait()
            self._line_dirty.clear()
            try:
                await self._refresh_line()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001
                log.exception("refreshing queue positions failed")
            await asyncio.sleep(self.cfg.line_interval)

    async def _refresh_line(self) -> None:
        """Every queued job's place; redrawn for the first LINE_REDRAWS queued jobs of each channel
        only (a pause or resume for all): a long line would otherwise cost one edit per job at each
        start and finish."""
        line, pauses = await self._line_places()
        ranks: dict[int, int] = {}           # queued jobs of ours seen so far, per channel
        for t, position in line:
            if t is None or t.final or t.started:
                continue
            rank = ranks[t.channel_id] = ranks.get(t.channel_id, 0) + 1
            paused = pauses[t.guild_id]
            moved = t.position != position
            repaused = t.paused != paused
            t.position, t.paused = position, paused
            if moved or repaused:
                # Until an edit has shown it (_edit_progress): one that failed (a 5xx) is tried
                # again at the next round, not left showing the old place.
                t.line_stale = True
            requeued, t.requeued = t.requeued, False
            if repaused or requeued or (rank <= LINE_REDRAWS and t.line_stale):
                # else shown once it is among its channel's first LINE_REDRAWS (a job back in line
                # after a run at once: it still shows its last frame)
                self._kick(t)

    async def _line_places(self) -> tuple[list[tuple[_Tracker | None, int]], dict[int | None, str]]:
        """The line, in claim order: each job's tracker (None: not ours to show) and place
        (engine.jobs.places_in_line: not counting another paused server's jobs ahead; a job of no
        tracker counts, its server unknown), and each server's pause (pause_of) as read now. The
        line's ids only are read: a record is read for a job not followed yet (new here, or of
        another process), once; a long line's records were most of a round's cost. The owner's
        pause is read once, and each server's once."""
        everywhere = await self.queue.get_setting(PAUSED_KEY, False)
        pauses: dict[int | None, str] = {}
        trackers = [await self._tracker(job_id) for job_id in await self.queue.line()]
        for t in trackers:
            if t is not None and t.guild_id not in pauses:
                pauses[t.guild_id] = await pause_of(self.queue, t.guild_id, everywhere)
        places = places_in_line([t.guild_id if t is not None else None for t in trackers],
                                {g for g, why in pauses.items() if why == "server" and g is not None})
        return list(zip(trackers, places)), pauses

    async def places(self) -> tuple[dict[str, int], dict[int | None, str]]:
        """The places in line of the jobs shown here (a new one's first reply: registered first), and
        each of their servers' pauses, counted as the line pass counts them."""
        line, pauses = await self._line_places()
        return {t.job_id: place for t, place in line if t is not None}, pauses

    def line_changed(self) -> None:
        """Called by the admin commands (pause/resume/clear) so positions are redrawn."""
        self._line_dirty.set()

    def record_changed(self, record: JobRecord) -> None:
        """A followed job's record changed with no event of its own (a running job asked to stop for
        a banned word: its messages withhold its prompt from now on, render.withholds_prompt): its
        message is redrawn from it, and so is every later frame until it ends."""
        t = self.trackers.get(record.id)
        if t is not None and not (t.final or t.lost or record.state.finished):
            t.record = record
            self._kick(t)

    # --- undelivered results --------------------------------------------------------------------

    async def _reconcile_loop(self) -> None:
        first = True
        while True:
            self._reconcile_now.clear()
            try:
                if first:  # pick up jobs that were queued / running before a restart
                    for record in [*await self.queue.running(), *await self.queue.queued()]:
                        await self._tracker(record.id, record)
                    self._line_dirty.set()
                    first = False
                for record in await self.queue.undelivered():
                    t = await self._tracker(record.id, record)
                    if t is not None:
                        t.record = record
                        self._finish(t)
                await self._find_lost()
                await self._save_replies()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001
                log.exception("checking for undelivered results failed")
            try:
                await asyncio.wait_for(self._reconcile_now.wait(), self.cfg.reconcile_interval)
            except asyncio.TimeoutError:
                pass

    async def _find_lost(self) -> None:
        """Jobs followed here whose record is gone from the store before their result was posted:
        the store lost its data (a Redis restarted empty). No event will ever come for them, so
        their reply would stay at its last frame: tell the user once, then stop following them.
        (Nothing else deletes an undelivered job: pruning takes delivered ones only.)"""
        followed = [t for t in self.trackers.values() if not (t.delivered or t.lost)]
        present = await self.queue.existing([t.job_id for t in followed])   # one batched read
        for t in followed:
            if t.job_id in present or t.delivered or t.lost:
                continue
            log.warning("job %s is gone from the store before its result was posted (the queue lost its "
                        "data?): telling the user", t.job_id)
            t.lost = True
            self._kick(t)

    async def _save_replies(self) -> None:
        """Write the replies whose first write failed (`_Tracker.unsaved_reply`), while their job
        is not final (the final post writes it first itself)."""
        for t in list(self.trackers.values()):
            try:
                await self._save_reply(t, t.record, before_result=False)
            except Exception:  # noqa: BLE001 - the store is still down: the next round tries again
                log.warning("job %s: writing its reply to the store failed again; retrying", t.job_id,
                            exc_info=True)
                return

    async def _save_reply(self, t: _Tracker, record: JobRecord, *, before_result: bool) -> None:
        """Write the reply whose first write failed, completed from `record`'s entry, unless a write
        has stored it already. The reconcile pass's (`before_result` False) leaves a job that is
        final to the final post's own (a restart during the post must find the reply, or the
        `reposting` mark). One write of the entry at a time (`reply_lock`)."""
        if t.unsaved_reply is None or t.reply_saved:
            return
        async with t.reply_lock:
            if t.reply_saved or (not before_result and (t.final or t.delivered or t.lost)):
                return
            reply = self._reply_of(t, record)
            await self.queue.set_reply(t.job_id, reply)
            record.spec.reply = reply
            t.reply_saved = True
            log.info("job %s: its reply is written to the store now", t.job_id)

    def _reply_of(self, t: _Tracker, record: JobRecord) -> dict[str, Any]:
        """The job's reply entry to write with its result: the store's, completed by the one whose
        write failed (`unsaved_reply`)."""
        reply = dict(record.spec.reply or {})
        for key, value in (t.unsaved_reply or {}).items():
            reply.setdefault(key, value)
        reply.setdefault("channel_id", t.channel_id)
        return reply

    # --- sending ------------------------------------------------------------------------------

    def _kick(self, t: _Tracker) -> None:
        t.dirty = True
        if self._closing or t.delivered or not t.attached:
            return
        if t.sender is None or t.sender.done():
            t.sender = asyncio.create_task(self._send_loop(t), name=f"progress-{t.job_id}")

    async def _wait_turn(self, t: _Tracker) -> None:
        """Until the message's last edit is `message_interval` old and its channel gives `t` a slot
        (`_grant`: the most urgent waiter first)."""
        wait = t.last_sent + self.cfg.message_interval - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        loop = asyncio.get_running_loop()
        turns = self._turns.get(t.channel_id)
        if turns is None:
            turns = self._turns[t.channel_id] = _ChannelTurns()
        self._turn_seq += 1
        waiter = _Waiter(t, self._turn_seq, loop.time(), loop.create_future())
        turns.waiters.append(waiter)
        self._grant(t.channel_id)
        try:
            await waiter.future
        finally:
            if not waiter.future.done():   # cancelled while waiting: out of the line
                waiter.future.cancel()
                if waiter in turns.waiters:
                    turns.waiters.remove(waiter)

    def _turn_priority(self, waiter: "_Waiter", now: float) -> tuple[int, int]:
        t = waiter.tracker
        if t.final or t.lost:
            kind = FINAL_TURN
        elif t.started or t.frame is not None:
            kind = FRAME_TURN
        elif now - waiter.since >= LINE_AGING * self.cfg.channel_interval:
            kind = FRAME_TURN
        else:
            kind = LINE_TURN
        return kind, waiter.seq

    def _grant(self, channel_id: int) -> None:
        """Give the channel's slot to its most urgent waiter if the slot has come; else (or if more
        are waiting) come back when it does."""
        turns = self._turns.get(channel_id)
        if turns is None:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        turns.waiters = [w for w in turns.waiters if not w.future.done()]
        if not turns.waiters:
            if turns.timer is None and turns.next_at <= now:
                del self._turns[channel_id]
            return
        if turns.timer is not None:   # a later call will grant
            return
        if now < turns.next_at:
            turns.timer = loop.call_later(turns.next_at - now, self._on_turn_timer, channel_id)
            return
        best = min(turns.waiters, key=lambda w: self._turn_priority(w, now))
        turns.waiters.remove(best)
        best.future.set_result(None)
        turns.next_at = now + self.cfg.channel_interval
        if turns.waiters:
            turns.timer = loop.call_later(self.cfg.channel_interval, self._on_turn_timer, channel_id)

    def _on_turn_timer(self, channel_id: int) -> None:
        turns = self._turns.get(channel_id)
        if turns is not None:
            turns.timer = None
            self._grant(channel_id)

    async def _send_loop(self, t: _Tracker) -> None:
        failures = 0
        try:
            while t.dirty and t.attached and not t.delivered and not self._closing:
                ok = False
                sent = False   # a request went to Discord and came back (the end of an outage)
                try:
                    if t.lost:
                        t.dirty = False
                        await self._wait_turn(t)
                        sent = await self._post_lost(t)   # False: no request was made (no reply)
                    elif t.final:
                        t.dirty = False
                        async with self._finals:   # its files are in memory from here until it is posted
                            # Everything slow (the store, a re-encode) before taking a turn.
                            final = await self._prepare_final(t)
                            if final is not None:
                                posting = t.posted is None   # else only store writes are left
                                if posting:   # no slot needed otherwise
                                    await self._wait_turn(t)
                                    # A word added while it waited for its slot (seconds, more
                                    # behind other finals): the add could not cancel a finished job.
                                    if (not final.withheld and not render.withholds_prompt(final.record)
                                            and await self._refused_now(final.record)):
                                        final = _Final(final.record, render.withheld_text(final.record), [],
                                                       withheld=True)
                                try:
                                    await self._post_final(t, final)
                                finally:
                                    # Posted: Discord answered, even if the store writes after it failed.
                                    if posting and t.posted is not None:
                                        self._outage.answered()
                    elif t.dead or t.muted or self._progress_content(t)[0] == t.last_content:
                        t.dirty = False   # nothing to draw: take none of the channel's slots
                        t.line_stale = False   # what is drawn is current, or nothing ever will be
                    else:
                        await self._wait_turn(t)
                        if t.final:   # it ended while we waited: post the final instead
                            continue
                        t.dirty = False
                        if not t.dead and not t.muted:
                            drawn = t.last_content
                            await self._edit_progress(t)
                            sent = t.last_content != drawn or t.dead or t.muted
                    ok = True
                    if sent:
                        self._outage.answered()
                except asyncio.CancelledError:
                    raise
                except NETWORK_ERRORS as exc:   # an outage: no traceback, and not one line per edit
                    self._outage.failed(t.job_id, exc)
                except discord.HTTPException as exc:
                    self._outage.answered()   # a 4xx (or a 429 discord.py gave up on) is an answer
                    log.warning("job %s: Discord answered %s (code %s): %s", t.job_id, exc.status, exc.code, exc.text)
                    if (t.final or t.lost) and is_refusal(exc):
                        try:
                            await self._refused(t, exc)
                        except Exception:  # noqa: BLE001 - the store failed marking it: try again later
                            log.exception("job %s: recording that Discord refused its result failed; "
                                          "trying again", t.job_id)
                except Exception:  # noqa: BLE001 - never let one job's trouble end the task silently
                    log.exception("job %s: updating its message failed", t.job_id)
                t.last_sent = time.monotonic()
                if ok or t.delivered:
                    failures = 0
                elif t.final or t.lost:
                    # The final post (or the notice of a lost job) is never dropped: back off, try again.
                    failures += 1
                    t.dirty = True
                    await asyncio.sleep(min(30.0, max(0.5, self.cfg.message_interval) * 2 ** min(failures, 6)))
        finally:
            if t.delivered:
                if self.trackers.get(t.job_id) is t:
                    del self.trackers[t.job_id]
                if not t.lost:
                    # A queue snapshot read before this (the line's round) must not make it a new
                    # tracker, drawn queued again over its final post. (A lost job is not remembered:
                    # should its record come back, it is followed again.)
                    self._forget(t.job_id)

    async def _refused(self, t: _Tracker, exc: discord.HTTPException) -> None:
        """Discord refused the final post (or the lost notice) with a 4xx: the same request would be
        refused for ever. Too large (413): the first time, when the guild's upload limit is smaller
        now than the one the job was queued under (it lost boosts), fit the video to that; else (and
        at the next 413) post less next time: no video, then no files. Otherwise give up after
        REFUSED_TRIES: the job is marked delivered, so neither this loop nor a restart's
        undelivered() tries it again."""
        if exc.status == 413 and t.final and not t.refitted:
            t.refitted = True   # once: a 413 to the refitted post goes on to `shrink`
            smaller = self._shrunk_limit(t)
            if smaller is not None:
                log.warning("job %s: Discord refused its result as too large: its server's upload limit is %s now, "
                            "%s when the job was queued; fitting the video to it", t.job_id, render.mib(smaller),
                            render.mib(int(t.upload_limit or 0)))
                # _upload_limit falls back to the guild's; the video fitted to the old limit goes.
                t.upload_limit, t.fitted = None, None
                return
        if exc.status == 413 and t.final and t.shrink < 2:
            t.shrink += 1
            log.warning("job %s: Discord refused its result as too large; posting it %s", t.job_id,
                        "without the video" if t.shrink == 1 else "without files")
            return
        t.refused += 1
        if t.refused < REFUSED_TRIES:
            return
        what = "its result" if t.final else "the notice that it was lost"
        log.error("job %s: Discord refused %s %d times (%s, code %s: %s); giving up, it is not posted",
                  t.job_id, what, t.refused, exc.status, exc.code, exc.text)
        if t.final:
            await self.queue.mark_delivered(t.job_id)
        t.delivered = True

    def _progress_content(self, t: _Tracker) -> tuple[str, bytes | None]:
        if t.frame is not None:
            f = t.frame
            return render.progress_text(t.record, f.iteration, f.total, f.similarity, t.eta), f.png
        if t.started:
            return render.starting_text(t.record), None
        return render.queued_text(t.record, t.position, t.paused), None

    async def _edit_progress(self, t: _Tracker) -> None:
        drawn = (t.position, t.paused)
        content, png = self._progress_content(t)
        if content == t.last_content:   # the content names the iteration: same frame
            t.line_stale = False
            return
        kwargs: dict[str, Any] = {"content": content}
        if t.message_id is None and t.interaction is not None:
            # The command's own edit (with the Cancel button) never made the reply (a dropped
            # connection): this edit, through its token, makes it, with the button.
            from bot.imagine import progress_view   # noqa: PLC0415 - imagine imports this module

            kwargs["view"] = progress_view(t.job_id)
        if png is not None:
            kwargs["attachments"] = [discord.File(io.BytesIO(png), filename="frame.png")]
            t.framed = True   # (a failed edit may have gone through)
        elif t.framed:   # back in line after a run: its last frame goes with the rest of it
            kwargs["attachments"] = []
        try:
            await self._edit(t, **kwargs)
        except NoMessage:
            return
        except MessageGone:
            log.info("job %s: its message was deleted; the result will be a new message", t.job_id)
            t.dead = True
            return
        except discord.Forbidden as exc:
            # The bot may not edit there (its token expired and it cannot access the channel): every
            # later frame would be refused too, and Discord bans bots that make many refused
            # requests. No more progress edits for this job; the final post has its own handling.
            log.warning("job %s: Discord refused a progress edit (%s, code %s); no more progress "
                        "updates for it", t.job_id, exc.status, exc.code)
            t.muted = True
            return
        except ThreadArchived:
            # Every later edit would be refused too (only a new message unarchives a thread), and
            # Discord bans bots that make many refused requests.
            log.info("job %s: its thread is archived; no more progress updates, the result will be a "
                     "new message", t.job_id)
            t.muted = t.archived = True
            return
        t.last_content = content
        t.framed = png is not None
        if (t.position, t.paused) == drawn:   # not moved again while the edit went out
            t.line_stale = False   # what is drawn now is the current place (not before: an edit may fail)

    async def _edit(self, t: _Tracker, **kwargs: Any) -> None:
        """Edit the job's reply: through the interaction while its token lives, else the channel.

        Raises MessageGone when the message (or its channel) was deleted, NoMessage when none is
        known, ThreadArchived when it is in an archived thread.
        """
        # A follow-up whose post failed has no id to edit; its token still posts the result.
        if self._token_live(t) and (t.message_id is not None or not t.followup):
            try:
                await self._edit_by_token(t, **kwargs)
                return
            except discord.HTTPException as exc:
                if exc.code == UNKNOWN_MESSAGE:
                    raise MessageGone() from exc
                if exc.code == THREAD_ARCHIVED:
                    raise ThreadArchived() from exc
                if exc.status not in (401, 404) and exc.code != INVALID_WEBHOOK_TOKEN:
                    raise
                log.info("job %s: the interaction token is no longer valid; editing through the channel",
                         t.job_id)
                t.interaction = None
                for f in kwargs.get("attachments") or []:   # rewind what the failed request read
                    f.reset()
        if t.message_id is None or t.dead:
            raise NoMessage()
        channel = self.bot.get_partial_messageable(t.channel_id, guild_id=t.guild_id)
        try:
            await channel.get_partial_message(t.message_id).edit(**kwargs)
        except discord.NotFound as exc:
            # 10008 (the message) or 10003 (its channel or thread was deleted): either way there is
            # nothing left to edit, and retrying the edit would fail for ever.
            raise MessageGone() from exc
        except discord.HTTPException as exc:
            if exc.code == THREAD_ARCHIVED:
                raise ThreadArchived() from exc
            raise

    def _token_live(self, t: _Tracker) -> bool:
        """Whether the job's interaction token may still be used (younger than `token_ttl`)."""
        if t.interaction is not None and time.monotonic() - t.interaction_at >= self.cfg.token_ttl:
            t.interaction = None   # the bot token from now on
        return t.interaction is not None

    def _followup_interaction(self, t: _Tracker) -> discord.Interaction | None:
        """The interaction whose token may post the job's result as a follow-up now: the job's own
        (`interaction`), else the set's command its channel-message reply keeps (`fallback`), each
        while younger than `token_ttl`, counted from its creation; None when neither lives."""
        if self._token_live(t):
            return t.interaction
        if t.fallback is not None and time.monotonic() - t.fallback_at >= self.cfg.token_ttl:
            t.fallback = None
        return t.fallback

    async def _edit_by_token(self, t: _Tracker, **kwargs: Any) -> None:
        assert t.interaction is not None
        if t.followup:
            assert t.message_id is not None   # _edit: a follow-up without one is not edited
            await t.interaction.followup.edit_message(t.message_id, **kwargs)
            return
        message = await t.interaction.edit_original_response(**kwargs)
        if t.message_id is None:   # its first edit failed: learn the id, or the final post repeats
            t.message_id = message.id
            # ...and store it (as the command would have), so that a restart finds the reply.
            t.unsaved_reply = {"channel_id": message.channel.id, "message_id": message.id, "guild_id": t.guild_id,
                               "upload_limit": t.upload_limit}
            t.reply_saved = False
            self._reconcile_now.set()

    # --- the final post -----------------------------------------------------------------------

    def _upload_limit(self, t: _Tracker) -> int:
        """The most bytes one file of the job's result may have. The command's interaction says
        (`attachment_size_limit`, kept in the job's reply, so a restart or a post with the bot token
        after the token expired has it too); without it (the reply could not be made) the guild's,
        from its boost tier (the guilds intent), else `[progress] upload_limit` or 10 MiB, Discord's
        default (a DM, a guild the bot is not in). A limit that has since shrunk is met by a 413, after
        which the guild's is used (`_refused`, `_shrunk_limit`)."""
        if t.upload_limit:
            return int(t.upload_limit)
        guild = self.bot.get_guild(t.guild_id) if t.guild_id else None
        if guild is not None:
            return guild.filesize_limit
        return self.cfg.upload_limit or DEFAULT_UPLOAD_LIMIT

    def _shrunk_limit(self, t: _Tracker) -> int | None:
        """The guild's upload limit now (its boost tier, kept current by the guilds intent's
        GUILD_UPDATE) when it is smaller than the limit kept from the job's command, which the
        result was fitted to; None when the guild is not known here (a DM, not in the cache) or its
        limit is no smaller: a post fitted to it would be the one just refused."""
        if not t.upload_limit:
            return None   # the result was fitted to the guild's limit, or the default, already
        guild = self.bot.get_guild(t.guild_id) if t.guild_id else None
        if guild is None or guild.filesize_limit >= int(t.upload_limit):
            return None
        return guild.filesize_limit

    async def _final_files(self, t: _Tracker, record: JobRecord) -> tuple[list[tuple[str, bytes]], str | None]:
        if record.state != JobState.DONE:
            return [], None
        png = await self.queue.get_artifact(record.id, "final.png")
        mp4 = await self.queue.get_artifact(record.id, "video.mp4")
        files: list[tuple[str, bytes]] = []
        note = None
        limit = self._upload_limit(t)
        if t.shrink >= 2:   # refused as too large even without the video (_refused)
            return [], "The image and video are over this server's upload limit, so they could not be posted."
        if t.shrink == 1 and png is not None:
            # The limit the job was queued under is gone (the server lost its boosts): Discord said 413,
            # to the video fitted to the guild's limit of now too, or no smaller limit was known.
            return [("final.png", png)], "The video is over this server's upload limit, so here is the final image only."
        if png is not None:
            files.append(("final.png", png))
        # The video against the limit on its own (FILE_MARGIN), not what the image leaves of it. The
        # image is not measured: a final image over the limit is met by the 413 path (_refused).
        room = limit - FILE_MARGIN
        if mp4 is not None:
            fitted: Any   # bytes, None (no size fits) or REENCODE_FAILED
            if len(mp4) <= room:
                fitted = mp4
            elif t.fitted is not None and t.fitted[:2] == (len(mp4), room):   # a retry: ffmpeg ran already
                fitted = t.fitted[2]
            else:
                fitted = await _reencode_to_fit(mp4, room)
                if fitted is not REENCODE_FAILED:   # a failure is tried again with the post's retry
                    t.fitted = (len(mp4), room, fitted)
            if fitted is REENCODE_FAILED:
                note = (f"The video ({render.mib(len(mp4))}) is over this server's upload limit of "
                        f"{render.mib(limit)} a file, and re-encoding it smaller failed, so here is the final "
                        "image only.")
            elif fitted is not None:
                files.append(("video.mp4", fitted))
                if fitted is not mp4:
                    note = (f"The video was re-encoded to {render.mib(len(fitted))} to fit this server's "
                            f"upload limit of {render.mib(limit)} a file.")
            else:
                note = (f"The video ({render.mib(len(mp4))}) does not fit this server's upload limit of "
                        f"{render.mib(limit)} a file, even re-encoded, so here is the final image only.")
        elif png is not None:
            note = "The video could not be made; here is the final image."
        return files, note

    async def _prepare_final(self, t: _Tracker) -> _Final | None:
        """The final post from the store, or None when there is nothing (more) to post."""
        record = await self.queue.get(t.job_id)
        if record is None:   # gone before it was posted: the store lost its data
            t.lost, t.dirty = True, True
            return None
        if record.delivered:
            t.delivered = True
            return None
        if not record.state.finished:   # a stale reconcile; keep following it
            t.final = False
            return None
        t.record = record
        if t.posted is not None:   # posted already: only the store writes are left (_post_final)
            return _Final(record, "", [])
        if record.state == JobState.CANCELLED and (record.error or "").strip() == render.CANCEL_CHANNEL_GONE:
            # Cancelled because its channel or thread was deleted (bot.queue_admin): there is nowhere
            # to post it. Tried, it was two requests answered 404 and an error logged for each job.
            await self.queue.mark_delivered(t.job_id)
            t.delivered = True
            log.info("job %s: cancelled with its deleted channel; nothing to post", t.job_id)
            return None
        if render.withholds_prompt(record):
            # Cancelled for a banned word: posted as that cancel (render.final_text), which withholds
            # it already, whatever the list holds now.
            if record.state == JobState.DONE:
                # Asked to stop for a banned word, then finished DONE by a worker of an older version
                # (the store's finish now ends such a job CANCELLED; a worker not yet upgraded, or a
                # record it finished before the upgrade and not yet posted): the admin was told it was
                # cancelled, so it is posted as that cancel (no picture or video of a banned prompt),
                # delivered as any.
                record = replace(record, state=JobState.CANCELLED)
        elif await self._refused_now(record):
            # A refused word (or pattern) added since it was queued matches its prompt, and the add
            # did not cancel it: it had finished (its result waiting for the bot: down, or behind an
            # outage), or finished while the add read the line. Posted, it would show the channel
            # that prompt and its picture: withheld instead, delivered as any, so it is not retried.
            return _Final(record, render.withheld_text(record), [], withheld=True)
        files, note = await self._final_files(t, record)
        return _Final(record, render.final_text(record, note), files)

    async def _refused_now(self, record: JobRecord) -> bool:
        """Whether the server's refused words match a prompt `record`'s post would quote now (its
        own; a remix's parent's, in its lineage line), as the add's cancel (moderation.
        cancel_matching) matches them: moderation.refused_now. A store failure is raised, and the
        final post tried again later, rather than posting what may be refused."""
        return record.id in await moderation.refused_now(
            self.queue, record.spec.guild_id, [record], self.bot.config.imagine.max_prompt_chars,
            quoted=True, budget=None)

    async def _post_final(self, t: _Tracker, final: _Final) -> None:
        def files() -> list[discord.File]:
            return [discord.File(io.BytesIO(data), filename=name) for name, data in final.files]

        if t.posted is None:
            t.posted = await self._post_result(t, final, files) or 0
        if not t.posted:   # nothing can post it: given up
            await self.queue.mark_delivered(t.job_id)
            t.delivered = True
            return
        # Posted: a failure from here on (the store) repeats only these writes, not the post (a new
        # message's follow-up fallback has no nonce; any repost re-uploads the files).
        result_message_id = t.posted
        reply = self._reply_of(t, final.record)
        reply["result_message_id"] = result_message_id
        async with t.reply_lock:
            await self.queue.set_reply(t.job_id, reply)
        if not await self.queue.mark_delivered(t.job_id):
            log.warning("job %s was already delivered by someone else", t.job_id)
        else:
            withheld = ", withheld: its prompt matches a word or pattern its server refuses now"
            log.info("job %s result posted (message %s)%s", t.job_id, result_message_id,
                     withheld if final.withheld else "")
        t.delivered = True

    async def _post_result(self, t: _Tracker, final: _Final, files: Callable[[], list[discord.File]]) -> int | None:
        """Post the result: an edit of the job's reply, else a new message. Its message's id, or None
        (logged) when nothing can post it."""
        from bot.imagine import result_view   # noqa: PLC0415 - imagine imports this module

        await self._save_reply(t, final.record, before_result=True)
        # A withheld result keeps no button: each would start a job from the refused prompt (a Reroll,
        # a Continue) or from its final state (a Remix). An empty view removes the reply's Cancel.
        view = _no_buttons() if final.withheld else result_view(final.record)
        if not t.dead and not t.archived and (t.message_id is not None or t.interaction is not None):
            # Editing the reply is idempotent: a repeat after a crash changes nothing. The attachments
            # always: without files (the text alone after 413s, no final.png) the last frame goes too.
            try:
                await self._edit(t, content=final.content, view=view, attachments=files())
                return t.message_id
            except (MessageGone, NoMessage, discord.Forbidden):
                t.dead = True
            except ThreadArchived:
                # A new message unarchives the thread (edits never do): post the result as one.
                log.info("job %s: its thread is archived; posting the result as a new message", t.job_id)
                t.archived = True
        reply = self._reply_of(t, final.record)
        if reply.get("reposting_after"):
            # Marked before an earlier try (or before a restart): that try may have posted it.
            found = await self._find_repost(t, int(reply["reposting_after"]))
            if found is not None:
                log.info("job %s: its result was posted before (message %s); not posting it again", t.job_id, found)
                return found
        elif not reply.get("reposting"):   # (a mark of before `reposting_after` was kept: the nonce alone)
            # A restart between the new message and the write of its id must not edit the reply
            # (editable again once the post unarchived its thread) into a second result: it finds
            # this mark and posts again, with the same nonce (_tracker), or, past the nonce's few
            # minutes, finds the post among the channel's messages since the mark (_find_repost).
            reply["reposting"] = True
            since = discord.utils.utcnow() - datetime.timedelta(seconds=REPOST_CLOCK_SLACK)
            reply["reposting_after"] = str(discord.utils.time_snowflake(since))
            async with t.reply_lock:
                await self.queue.set_reply(t.job_id, reply)
            final.record.spec.reply = reply
        posted = await self._post_new(t, final, files, view)
        if posted and t.archived and not t.dead:
            await self._point_to_result(t, posted)
        return posted

    async def _point_to_result(self, t: _Tracker, posted: int) -> None:
        """After a result went out as a new message because the reply's thread was archived (the
        reply is still there; the post unarchived the thread): one best-effort edit of the reply,
        without its Cancel button and with its last progress text replaced by a link to the result.
        Never the result itself (no view, no files): a restart before the result's id is written
        reposts it (the `reposting` mark), and this reply must not read as a second result. Its
        failure (still archived: the result went as a follow-up; deleted; an outage) is logged and
        changes nothing of the delivery."""
        url = render.jump_url(t.guild_id, t.channel_id, posted)
        content = f"Job `{t.job_id}` has ended; its result is in a new message (this thread was archived): {url}"
        try:
            await self._edit(t, content=content, view=None)
        except Exception as exc:  # noqa: BLE001 - a courtesy: the result is posted either way
            log.info("job %s: could not point its old reply to the result (%s: %s)", t.job_id,
                     type(exc).__name__, exc)
        else:
            log.debug("job %s: its old reply points to the result (message %s)", t.job_id, posted)

    async def _find_repost(self, t: _Tracker, after: int) -> int | None:
        """The id of the bot's earlier post of this job's result among the channel's messages since
        the snowflake `after` (at most REPOST_SEARCH of them), or None: none there, or the channel
        cannot be read (gone, no View Channel; without Read Message History Discord returns no
        messages): the nonce still guards the post. A post is the bot's message with this job's
        result buttons, or, for a result that has none (withheld, a banned word's cancel), one that
        names the job as its messages do (render._compose), other than the job's reply, which names
        it too. Before, only the buttons were looked for: a result without them was posted again."""
        me = self.bot.user.id if self.bot.user else None
        ours = {f"imagine:{action}:{t.job_id}" for action in ("reroll", "continue", "remix")}
        # The job line of render._compose. A prompt or a failure reason cannot forge it: their
        # backticks are escaped; a lineage line names a parent otherwise ("continues `<id>`").
        named = f" · job `{t.job_id}` · "
        channel = self.bot.get_partial_messageable(t.channel_id, guild_id=t.guild_id)
        try:
            async for message in channel.history(limit=REPOST_SEARCH, after=discord.Object(after), oldest_first=True):
                if message.author.id != me:
                    continue
                if any(getattr(item, "custom_id", None) in ours
                       for row in message.components for item in getattr(row, "children", ())):
                    return message.id
                if message.id != t.message_id and named in message.content:
                    return message.id
        except (discord.Forbidden, discord.NotFound) as exc:
            log.info("job %s: cannot read channel %s for an earlier post of its result (%s %s); relying on "
                     "the nonce", t.job_id, t.channel_id, exc.status, exc.text)
        return None

    async def _post_new(self, t: _Tracker, final: _Final, files: Callable[[], list[discord.File]],
                        view: discord.ui.View) -> int | None:
        """The result as a new message; its id, or None (logged) when nothing can post it.

        A channel that refuses it (403) is tried in this order, and the first post that succeeds is
        the result (never a second one): the command's follow-up with the files while its token
        lives (a webhook: the channel's permissions do not apply to it, so the user still gets the
        image and video), then, when the refusal was Missing Permissions (50013) and there were
        files, the channel again without them (the bot lacks Attach Files there; Discord answers
        the same 403 / 50013 when it lacks Send Messages, and then this is refused too). The text
        alone only once the token cannot bring the files: better than nothing, the job is not
        given up silently."""
        channel = self.bot.get_partial_messageable(t.channel_id, guild_id=t.guild_id)
        # The nonce lets Discord drop a repeat of this post (a crash before mark_delivered); the post
        # without files has the same one (the refused post made no message).
        nonce = _nonce("imagine-", t.job_id)
        why: discord.HTTPException
        try:
            message = await channel.send(content=final.content, files=files(), view=view, nonce=nonce)
            return message.id
        except discord.Forbidden as exc:
            why = exc
        except discord.NotFound as exc:
            why = exc
        if isinstance(why, discord.Forbidden):
            interaction = self._followup_interaction(t)
            if interaction is not None:
                # The bot may not post in this channel, but the command's token may: answer there.
                log.warning("job %s: channel %s refuses the bot's messages (%s %s); posting the result as "
                            "a follow-up of the command", t.job_id, t.channel_id, why.status, why.text)
                try:
                    message = await interaction.followup.send(content=final.content, files=files(), view=view,
                                                              wait=True, allowed_mentions=NO_PING)
                    return message.id
                except discord.HTTPException as late:
                    if late.status != 401 and late.code != INVALID_WEBHOOK_TOKEN:
                        raise
                    # It expired before its TTL here: as if it had.
                    if interaction is t.interaction:
                        t.interaction = None
                    if interaction is t.fallback:
                        t.fallback = None
            if why.code == MISSING_PERMISSIONS and final.files:
                log.warning("job %s: channel %s refuses its files (%s %s: the bot lacks Attach Files there); "
                            "posting the result without them", t.job_id, t.channel_id, why.status, why.text)
                content = render.final_text(final.record, _unattached_note(final.files))
                try:
                    message = await channel.send(content=content, view=view, nonce=nonce)
                    return message.id
                except (discord.Forbidden, discord.NotFound) as exc:
                    why = exc
        # The channel is gone, or closed to the bot with the command's token expired: no retry can post it.
        log.error("job %s: cannot post its result in channel %s (%s %s); giving up",
                  t.job_id, t.channel_id, why.status, why.text)
        return None

    async def _post_lost(self, t: _Tracker) -> bool:
        """Edit the reply of a job the store lost into a notice (render.lost_text), without its Cancel
        button; the last frame stays. In an archived thread (edits refused) the notice is a new
        message, which unarchives it, as a result would be. Then the job is dropped here
        (`delivered`). Other HTTP errors are the send loop's: retried, a refusal given up after
        REFUSED_TRIES. True when Discord answered a request; False when none was made (no reply to
        edit), which says nothing of an outage."""
        content = render.lost_text(t.record)
        if not t.archived:
            try:
                await self._edit(t, content=content, view=None)
            except (MessageGone, NoMessage, discord.Forbidden) as exc:
                log.info("job %s: lost, and its reply is gone too; nothing to tell", t.job_id)
                t.delivered = True
                return not isinstance(exc, NoMessage)
            except ThreadArchived:
                log.info("job %s: lost, and its reply is in an archived thread; saying so in a new message",
                         t.job_id)
                t.archived = True
            else:
                log.info("job %s: its reply says it was lost", t.job_id)
                t.delivered = True
                return True
        channel = self.bot.get_partial_messageable(t.channel_id, guild_id=t.guild_id)
        try:
            message = await channel.send(content=content, nonce=_nonce("imagine-lost-", t.job_id))
        except (discord.Forbidden, discord.NotFound) as exc:
            log.info("job %s: lost, and no notice can be posted in channel %s (%s %s)", t.job_id, t.channel_id,
                     exc.status, exc.text)
        else:
            log.info("job %s: lost; a new message (%s) says so", t.job_id, message.id)
        t.delivered = True
        return True


async def write_reply(queue: Any, job_id: str, reply: dict[str, Any]) -> dict[str, Any] | None:
    """Write a job's reply entry as its command makes the reply: None when written; the entry when
    the store failed (a hiccup: the job is queued and its reply shown), for `ProgressCog.attach`'s
    `unsaved_reply`, which writes it again."""
    try:
        await queue.set_reply(job_id, reply)
        return None
    except Exception:  # noqa: BLE001 - the progress cog retries the write
        log.exception("job %s: could not write its reply to the store; retrying", job_id)
        return reply


def _no_buttons() -> discord.ui.View:
    """A view without items: the message's buttons are removed (`components: []`)."""
    view = discord.ui.View(timeout=None)
    view.stop()
    return view


def _unattached_note(files: list[tuple[str, bytes]]) -> str:
    """The result's note when the channel refused its files (no Attach Files for the bot there)."""
    what = " and ".join({"final.png": "image", "video.mp4": "video"}.get(name, name) for name, _ in files)
    return (f"The {what} could not be attached: the bot lacks the Attach Files permission in this channel "
            "(ask a server admin).")


# _reencode_to_fit's answer when ffmpeg failed (not: no size fits), so the note says which.
REENCODE_FAILED: Any = object()


async def _reencode_to_fit(data: bytes, max_bytes: int) -> Any:
    """The video re-encoded to at most `max_bytes`; None when no size tried fits; REENCODE_FAILED
    when ffmpeg failed (missing, a damaged video, a timeout)."""
    if max_bytes <= 0:
        return None
    from engine.video import reencode_to_fit   # noqa: PLC0415 - ffmpeg's module, only when needed

    try:
        return await asyncio.to_thread(reencode_to_fit, data, max_bytes)
    except Exception:  # noqa: BLE001 - ffmpeg missing or failing: post the image
        log.exception("re-encoding the video failed")
        return REENCODE_FAILED
