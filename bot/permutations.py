"""Permutation prompts: `/imagine a {red, blue, golden} house by {Escher, Magritte}` queues one job
per combination (6 here) and, once every one of them has ended, posts one contact sheet.

- Syntax: `{a, b, c}` groups of comma-separated options, or `{a|b|c}` (sd-dynamic-prompts' style:
  in a group with a `|`, only `|` separates the options, so they may hold commas:
  `{oil painting, detailed|watercolor}` is two); no nesting,
  no empty option, no repeat. A prompt with braces that do not balance is refused with what to
  fix. A prompt whose groups all have one option is an ordinary prompt (the braces dropped).
  `\\{` and `\\}` are literal braces (`a \\{red\\} house` is the one prompt `a {red} house`); /remix
  takes those, and refuses any other brace (a set: one picture only).
- Length: the template may be up to `template_chars` (TEMPLATE_FACTOR x `[imagine]
  max_prompt_chars`, at most Discord's 6000 for an option; bot.imagine.validate), and each
  combination up to `max_prompt_chars`, as any prompt (check_set).
- Limits: at most `[imagine] max_permutations` combinations (default 9), and the set counts
  against the user's cap of waiting jobs (`[queue] max_queued_per_user`, or `/queue-admin limit`):
  over either limit the bot says how many it would make and how many are allowed (a set larger
  than the cap itself: that it can never be queued whole), and queues
  nothing. Every prompt of the set is checked against the server's refused words first. The set
  is queued with one `queue.submit_many(..., max_queued=)`: the store counts and queues in one
  step, so two commands at once cannot both pass the cap, and a crash never queues half a set.
- Every job of a set has the same settings (seed included, so only the words change) and carries
  `spec.extra["set"] = {"id", "size", "index", "options"}`. Each gets its own reply as any job
  does: the first is the interaction's reply, the others are follow-ups of the interaction (a
  webhook: they need no channel permission, as the slash command itself needs none; a set is
  only asked for where the bot may post, bot.permissions.results_refusal, but one whose channel
  closed to the bot since still gets its replies). Only when the first reply could not be made are
  the others channel messages (a follow-up would take over the deferred "thinking…" message that
  the first job's edits go to); each of those, made or refused by the channel, is still handed
  the command, so its result, should the channel refuse it as a new message (the channel closed
  to the bot since), can go out as a follow-up while the token lives. The progress cog edits the
  follow-ups through the token while it lives, the channel messages with the bot token only.
- The contact sheet: the set is recorded in the store (`set:<id>`: job ids, captions, channel) and
  listed in `sheets.open`. `SheetsCog` polls the open sets; when every job of one has ended it
  posts one message with `contact-sheet.png` (the DONE finals in order, captioned with their
  options; failed / cancelled ones are named in the text; a job cancelled for a banned word,
  render.withholds_prompt, DONE after the cancel too, gets no tile and its line says
  `(prompt withheld)`, and then the text withholds the template as well: it holds every option),
  then records `sheet:<id>`. A post that
  fails with a 5xx or a network error is tried again with backoff (`SHEET_RETRY_FIRST` doubling up
  to `SHEET_RETRY_MAX`), not on every poll; a refusal (a 4xx: `bot.progress.is_refusal`) is final: the set is closed with
  an error marker. A 403 (the bot may not post in the channel) is first retried as a follow-up of
  the command that made the set, while its token lives and this process has it.

Retention: `set:<id>` and `sheet:<id>` are written with an expiry (`set_setting(...,
expire_after=keep_seconds(bot))`: 30 days, or `[worker] keep_days` when that is longer), so the
store does not keep them forever. While a set is open, the poll writes its record again (with a
fresh expiry) once half of that time has passed since it was written (`kept_at`), so a set waiting
longer (a queue paused for a month) still has its record after a restart. Only one whose record
expired while no bot ran (down for longer than that) is dropped from `sheets.open` without a sheet.

Exactly once, honestly: the JobQueue protocol has no atomic compare-and-set on settings (and
`mark_delivered` needs a job). So the sheet is posted like a job's result as a new message
(bot.progress): check `sheet:<id>`, mark the set's record (`posting_after` in `set:<id>`: a
snowflake REPOST_CLOCK_SLACK before the mark), post with the nonce `sheet-<id>` (Discord drops a
repeat of it within a few minutes), then set `sheet:<id>`. A later try of a marked set (a restart
between the post and the marker, past the nonce's minutes; or a 5xx that posted after all) first
reads the channel's messages since the mark (REPOST_SEARCH at most) for the bot's sheet of this set
(a `contact-sheet` attachment, and a job id of the set in its text) and takes that one as the
sheet. Without Read Message History (Discord returns no messages) the nonce alone guards it, and a
sheet more than REPOST_SEARCH messages back is not found. One process never posts a set twice (one
check of a set at a time, and the marker; no lock is held while a sheet renders or uploads, so new
sets are answered meanwhile); two bot processes polling the same set at the same moment post the
same nonce and Discord keeps one.

Polling: every `[progress] line_interval` the open sets are checked with two batched reads for all
of them (the line's ids and the running jobs); a job in neither is read alone, and a finished and
posted one is remembered, so a set waiting in line costs no read of its own. `sheet:<id>` (written
by another process, or before a restart) is read only once every job of a set has ended.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import io
import itertools
import logging
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import aiohttp
import discord
from discord.ext import commands

from bot import contact_sheet, moderation, render
from bot.progress import (
    INVALID_WEBHOOK_TOKEN, REPOST_CLOCK_SLACK, REPOST_SEARCH, created_monotonic, is_refusal, write_reply,
)
from engine.jobs import JobRecord, JobSpec, JobState, QueueLimitReached, UploadGone, new_job_id, pause_of
from engine.prompts import PromptError, parse_prompt

if TYPE_CHECKING:
    from bot.attachments import Uploads
    from bot.client import ImagineBot
    from bot.imagine import ImagineCog

log = logging.getLogger(__name__)

OPEN_KEY = "sheets.open"
UPLOAD_MARGIN = 64 * 1024
# A set's bookkeeping is needed until its sheet is posted (and the marker a little after, for another
# process that still has the set open): far less than this.
KEEP_SETS_DAYS = 30.0
# A failed sheet post (5xx, network) waits this long before the next try, doubling up to the max:
# each try renders and uploads the whole sheet again.
SHEET_RETRY_FIRST = 2.0
SHEET_RETRY_MAX = 300.0
# A template holds every option of its groups, so it may be longer than one prompt: up to this many
# times `[imagine] max_prompt_chars` (each combination is still checked against that limit). Not
# beyond what Discord lets a string option carry (the /imagine prompt option sets no max_length of
# its own): a longer limit would only promise what Discord never sends.
TEMPLATE_FACTOR = 4
DISCORD_OPTION_CHARS = 6000


def template_chars(max_prompt_chars: int) -> int:
    """The longest permutation template (the prompt as typed, with its `{…}` groups) accepted."""
    return max(max_prompt_chars, min(DISCORD_OPTION_CHARS, TEMPLATE_FACTOR * max_prompt_chars))


def keep_seconds(bot: Any) -> float:
    """How long `set:<id>` and `sheet:<id>` are kept: KEEP_SETS_DAYS, or as long as the jobs
    themselves (`[worker] keep_days`) when that is longer."""
    worker = getattr(getattr(bot, "config", None), "worker", None)
    keep_days = float(getattr(worker, "keep_days", 0.0) or 0.0)
    return max(KEEP_SETS_DAYS, keep_days) * 86400.0


def set_key(set_id: str) -> str:
    return f"set:{set_id}"


def sheet_key(set_id: str) -> str:
    return f"sheet:{set_id}"


# --- the syntax ----------------------------------------------------------------------------------

class TemplateError(ValueError):
    """A prompt whose braces cannot be read; the message says what to fix."""


@dataclass(frozen=True)
class Variant:
    prompt: str
    options: tuple[str, ...]     # the chosen option of each group with more than one option


@dataclass(frozen=True)
class Template:
    text: str
    parts: tuple[str | tuple[str, ...], ...]   # literal text, or a group's options

    @property
    def groups(self) -> list[tuple[str, ...]]:
        return [p for p in self.parts if isinstance(p, tuple)]

    @property
    def count(self) -> int:
        n = 1
        for g in self.groups:
            n *= len(g)
        return n

    def expand(self) -> list[Variant]:
        choices = [p if isinstance(p, tuple) else (p,) for p in self.parts]
        varying = [isinstance(p, tuple) and len(p) > 1 for p in self.parts]
        out = []
        for combo in itertools.product(*choices):
            prompt = " ".join("".join(combo).split())
            out.append(Variant(prompt, tuple(c for c, v in zip(combo, varying) if v)))
        return out


# `\{` and `\}` are literal braces, never a group's: `a \{red, blue\} house` is the one prompt
# `a {red, blue} house`. (Any other backslash is itself.)
_SET_BRACE = re.compile(r"(?<!\\)[{}]")


def has_set_braces(text: str) -> bool:
    """Whether `text` has a brace that opens or closes a group (one not escaped as `\\{` / `\\}`)."""
    return _SET_BRACE.search(text) is not None


def unescape_braces(text: str) -> str:
    """`text` with `\\{` and `\\}` as the literal braces they stand for (what CLIP reads)."""
    return text.replace("\\{", "{").replace("\\}", "}")


def escape_braces(text: str) -> str:
    """A prompt's literal braces written as `\\{` / `\\}`, to be typed back (the Remix form)."""
    return text.replace("{", "\\{").replace("}", "\\}")


def parse(text: str) -> Template | None:
    """The prompt's option groups, None when it has no braces, TemplateError when they are wrong.
    Escaped braces (`\\{`, `\\}`) are literal text, in an option too: a prompt with only those is
    one prompt (a Template of no group), its braces unescaped."""
    if "{" not in text and "}" not in text:
        return None
    parts: list[str | tuple[str, ...]] = []
    literal: list[str] = []
    body_chars: list[str] = []   # the open group's text, its escapes undone
    start: int | None = None
    escaped = False
    for i, ch in enumerate(text):
        if escaped:   # the brace after a backslash
            escaped = False
            (literal if start is None else body_chars).append(ch)
        elif ch == "\\" and text[i + 1:i + 2] in ("{", "}"):
            escaped = True
        elif ch == "{":
            if start is not None:
                raise TemplateError(
                    f"Braces cannot be nested: a `{{` opens inside the group that starts with "
                    f"{render.quote(text[start:i + 1])}. Write each group on its own, e.g. `a {{red, blue}} house "
                    f"by {{Escher, Magritte}}`.")
            start = i
            parts.append("".join(literal))
            literal, body_chars = [], []
        elif ch == "}":
            if start is None:
                raise TemplateError(
                    f"A `}}` closes a group that was never opened (after {render.quote(text[max(0, i - 30):i])}). "
                    "Add the missing `{` or remove the `}` (`\\}` is a literal brace).")
            body = "".join(body_chars)
            group = render.quote(text[start:i + 1])
            # `{cat|dog}` (sd-dynamic-prompts' style) is a set too: in a group with a `|`, `|` alone
            # separates the options and commas are their own (`{oil painting, detailed|watercolor}`:
            # two). (Unwrapped as one option, `a cat|dog` would be a weighted prompt.)
            options = [o.strip() for o in body.split("|" if "|" in body else ",")]
            if any(not o for o in options):
                raise TemplateError(
                    f"The group {group} has an empty option. Write options between commas or `|`, "
                    "e.g. `{red, blue, golden}`, or `{red|blue|golden}` (an option with a comma: `{oil painting, "
                    "detailed|watercolor}`).")
            # A repeat is an option CLIP reads as one already listed: Template.expand collapses the
            # white space of each prompt, and CLIP's tokenizer lowercases (str.lower) what is left.
            seen: set[str] = set()
            for o in options:
                read = _as_clip_reads(o)
                if read in seen:
                    raise TemplateError(f"The group {group} lists {render.quote(o)} twice (case and spacing "
                                        "aside): remove one.")
                seen.add(read)
            parts.append(tuple(options))
            start = None
        else:
            (literal if start is None else body_chars).append(ch)
    if start is not None:
        raise TemplateError(
            f"The group {render.quote(text[start:])} is never closed: add the missing `}}` "
            "(`\\{` is a literal brace).")
    parts.append("".join(literal))
    return Template(text, tuple(p for p in parts if p != ""))


def _as_clip_reads(text: str) -> str:
    """`text` as CLIP reads it: white space collapsed (Template.expand), lowercased (its tokenizer)."""
    return " ".join(text.split()).lower()


def _as_read(prompt: str) -> Any:
    """A combination as CLIP and the engine read it: its parts' texts (white space collapsed,
    lowercased, as CLIP's tokenizer does) and weights, so that `a cat` and `a cat:1` are one. As
    text when its weights do not parse (the weights check refuses it, with its own words)."""
    try:
        return tuple((_as_clip_reads(p.text), p.weight) for p in parse_prompt(prompt))
    except PromptError:
        return _as_clip_reads(prompt)


def caption(options: list[str] | tuple[str, ...], prompt: str) -> str:
    return render.tame(" · ".join(options) if options else prompt)   # drawn on the sheet: one tame line


# --- submitting a set ----------------------------------------------------------------------------

@dataclass(frozen=True)
class SetCheck:
    """What `check_set` found: why to refuse (`problem`; nothing is queued), or the combinations
    to queue (`variants`, in order)."""
    problem: str | None
    variants: tuple[Variant, ...] = ()


async def check_set(bot: "ImagineBot", spec: JobSpec, image_weights: Sequence[float] | None = None) -> SetCheck:
    """Every refusal of the permutation prompt `spec.prompt`, in one pass: its braces, the number
    of combinations, each combination's weights and the server's refused words, the user's cap.
    /imagine runs it once, before it downloads any attached picture, and hands the result to
    `submit_set`; a prompt whose groups all have one option is one job, checked the same way.
    `image_weights`: the weight of the set's image prompt, if it has one (a positive one lets a
    combination's parts all be negative); None: the one `spec.extra` names (/imagine passes it:
    its picture is stored only after this check)."""
    from bot import imagine   # noqa: PLC0415 - imagine imports this module

    if image_weights is None:
        image_weights = imagine.image_weights_of(spec)

    try:
        template = parse(spec.prompt)
    except TemplateError as exc:
        return SetCheck(str(exc))
    if template is None:   # no braces: one job as typed
        variants: tuple[Variant, ...] = (Variant(spec.prompt, ()),)
    else:
        n, cap = template.count, bot.config.imagine.max_permutations
        if n > cap:
            sizes = " × ".join(str(len(g)) for g in template.groups if len(g) > 1)
            if len(sizes) > 200:
                sizes = sizes[:199] + "…"
            limit = await bot.user_limit(spec.guild_id)
            allowed = f"at most {cap} are allowed per prompt"
            if limit < cap:   # the user's cap is the smaller: say the number that can really be queued
                allowed += f", and at most {limit} here (each is a waiting job; the limit is {limit} per person)"
            return SetCheck(f"That prompt makes {n} combinations ({sizes}); {allowed}. Use fewer options. "
                            "Nothing was queued.")
        variants = tuple(template.expand())
        # Repeats across groups (`{big red, big} {house, red house}`: "big red house" twice): the
        # same job twice, as CLIP reads it (white space collapsed, lowercased, as within a group).
        seen: dict[Any, str] = {}
        for variant in variants:
            read = _as_read(variant.prompt)
            if read in seen:
                return SetCheck(f"The combinations {render.quote(seen[read], 80)} and {render.quote(variant.prompt, 80)} "
                                "are the same prompt (case, spacing and a weight of 1 aside), so that set would make the same "
                                "picture twice: change the options. Nothing was queued.")
            seen[read] = variant.prompt
        # validate() let the template be longer than a prompt (template_chars): each combination is
        # what CLIP reads, so each must fit the prompt limit.
        longest = max(variants, key=lambda v: len(v.prompt))
        max_chars = bot.config.imagine.max_prompt_chars
        if len(longest.prompt) > max_chars:
            return SetCheck(
                f"The combination {render.quote(longest.prompt, 80)} is {len(longest.prompt):,} characters long; "
                f"each combination may be up to {max_chars:,}. Shorten its options: CLIP only reads the first "
                f"{render.CLIP_TOKENS} tokens (about 300 characters of English) and ignores the rest anyway. "
                "Nothing was queued.")
    for variant in variants:
        # validate() skips the weighted-prompt check for templates: check every expansion here.
        if (problem := imagine.prompt_problem(variant.prompt, image_weights)) is not None:
            return SetCheck(f"{problem} (in the combination {render.quote(variant.prompt)})")
    problem = await moderation.refusal(bot, spec.guild_id, [v.prompt for v in variants])
    if problem:
        return SetCheck(problem)
    n = len(variants)
    if n == 1:
        problem = await imagine.over_limit(bot, spec.user_id, spec.guild_id)
        return SetCheck(problem) if problem else SetCheck(None, variants)
    limit = await bot.user_limit(spec.guild_id)
    queued = await bot.queue.count_queued(spec.user_id)
    if queued + n > limit:
        return SetCheck(imagine.limit_text(queued, limit, n))
    return SetCheck(None, variants)


async def submit_set(cog: "ImagineCog", interaction: discord.Interaction, spec: JobSpec,
                     checked: SetCheck | None = None, *, uploads: "Uploads | None" = None) -> list[JobRecord]:
    """Queue every combination of `spec.prompt` (a template), or refuse; returns the jobs queued.
    `checked`: what `check_set` found for this spec already (it is not run again). The set is queued
    in one `submit_many` within the user's cap: all of it or, refused by the store, none of it.
    `uploads`: the pictures the command stored (stored again if the submit finds one gone; the
    caller discards them when nothing was queued)."""
    from bot.imagine import (  # noqa: PLC0415 - imagine imports this module
        clip_notes, ephemeral, image_weights_of, late_refusal, limit_text, progress_view,
    )

    bot = cog.bot
    queue = bot.queue
    check = checked if checked is not None else await check_set(bot, spec)
    if check.problem is not None:
        # Private even after a public defer (attachments may have made /imagine defer already).
        await ephemeral(interaction, check.problem)
        return []
    variants = list(check.variants)
    if len(variants) == 1:   # one option per group: an ordinary prompt, the braces dropped
        spec.prompt = variants[0].prompt
        record = await cog.submit(interaction, spec, checked=True, uploads=uploads)
        return [record] if record is not None else []

    n = len(variants)
    if not interaction.response.is_done():
        await interaction.response.defer(thinking=True)
    set_id = new_job_id()
    progress = bot.progress
    notes = await clip_notes([v.prompt for v in variants], image_weights_of(spec))   # its picture is stored by now
    specs: list[JobSpec] = []
    for index, variant in enumerate(variants):
        one = JobSpec.from_dict(copy.deepcopy(spec.to_dict()))
        one.prompt = variant.prompt
        one.extra["set"] = {"id": set_id, "size": n, "index": index, "options": list(variant.options)}
        if notes[index]:
            one.extra["clip_notes"] = notes[index]
        specs.append(one)
    max_queued = await bot.user_limit(spec.guild_id)
    # An entry added since check_set would let the set through (imagine.late_refusal says why, and
    # what window remains): every combination again, just before the write.
    if problem := await late_refusal(bot, spec.guild_id, [one.prompt for one in specs]):
        await ephemeral(interaction, problem)   # private, after the defer; the caller discards `uploads`
        return []
    try:   # counted and queued in one step: a racing command cannot push the user past the cap
        if uploads is not None:
            records = await uploads.submit(lambda: queue.submit_many(specs, max_queued=max_queued))
        else:
            records = await queue.submit_many(specs, max_queued=max_queued)
    except QueueLimitReached as exc:
        await ephemeral(interaction, limit_text(exc.queued, exc.limit, n))   # private, after the defer
        return []
    except UploadGone as exc:   # stored again RESTORE_TRIES times and gone each time: told, nothing queued
        from bot.imagine import picture_gone_text   # noqa: PLC0415 - imagine imports this module
        await ephemeral(interaction, picture_gone_text(spec, exc.upload_id, uploads))
        return []
    if progress is not None:
        for index, record in enumerate(records):
            progress.register(record, interaction if index == 0 else None)

    # From here on the jobs are queued and registered: every one of them is attached whatever
    # happens to another one's reply (the finally below), so each one's result is posted.
    channel_id = interaction.channel_id or spec.channel_id
    attached: set[str] = set()
    sheets = bot.get_cog("Sheets")
    recorded = False   # the set's record was saved: SheetsCog will close it (and forget its command)
    try:
        # The set first: its contact sheet comes from this record, whatever happens to the replies.
        info = {
            "id": set_id, "template": spec.prompt, "jobs": [r.id for r in records],
            "captions": [caption(v.options, v.prompt) for v in variants],
            "user_id": spec.user_id, "channel_id": channel_id, "guild_id": interaction.guild_id,
            "seed": spec.seed, "created_at": time.time(),
        }
        recorded = await _track_set(bot, info)
        try:
            paused = await pause_of(queue, interaction.guild_id)
        except Exception:  # noqa: BLE001 - a queue outage: the replies go out without it
            log.exception("set %s: could not read whether the queue is paused", set_id)
            paused = ""
        try:   # the line once for every reply (a read of it per reply read it 25 times)
            places: dict[str, int] | None
            if progress is not None:   # counted as its later redraws count them (registered above)
                places = (await progress.places())[0]
            else:
                places = {job_id: n for n, job_id in enumerate(await queue.line(), 1)}
        except Exception:  # noqa: BLE001 - a queue outage: the replies without their places in line
            log.exception("set %s: could not read the places in line", set_id)
            places = None
        channel = bot.get_partial_messageable(channel_id, guild_id=interaction.guild_id)
        if isinstance(sheets, SheetsCog):   # its 403 fallback: the sheet as a follow-up
            sheets.remember(set_id, interaction)
        by_followup = False   # replies 2..n as follow-ups, once the first reply is made
        for index, record in enumerate(records):
            content: str | None = None
            message_id = None
            unsaved: dict[str, Any] | None = None
            message: discord.Message
            followup = by_followup and index > 0
            try:
                content = render.queued_text(record, None if places is None else places.get(record.id), paused)
                if index == 0:
                    message = await interaction.edit_original_response(content=content, view=progress_view(record.id))
                    by_followup = True
                elif followup:   # the command's webhook: no channel permission needed
                    message = await interaction.followup.send(content=content, view=progress_view(record.id),
                                                              wait=True, allowed_mentions=discord.AllowedMentions.none())
                else:
                    message = await channel.send(content=content, view=progress_view(record.id))
                message_id = message.id
                reply = {"channel_id": message.channel.id, "message_id": message.id, "guild_id": interaction.guild_id,
                         "upload_limit": interaction.filesize_limit}
                record.spec.reply = reply
                unsaved = await write_reply(queue, record.id, reply)
            except Exception:  # noqa: BLE001 - one reply's trouble is that job's alone: log, go on
                log.exception("set %s: could not show the reply of job %s", set_id, record.id)
            finally:
                attached.add(record.id)
                if progress is not None:
                    # A follow-up reply is edited through the command's token, like the first one.
                    # A channel-message reply (the first reply failed) cannot be: the token edits only
                    # the command's own messages. Made or not, it still keeps the command as a fallback
                    # for its result alone: a new message (when the reply was refused, deleted, or its
                    # edit is refused) that the channel refuses (it closed to the bot) goes out as a
                    # follow-up while the token lives (progress._post_new), not given up. (By then
                    # the first job's own edits, which go on through the token, have normally made the
                    # "thinking…" message its reply, so the follow-up does not take that over.)
                    progress.attach(record.id, channel_id, message_id, content if message_id else None,
                                    followup_of=interaction if index > 0 and followup else None,
                                    fallback_of=interaction if index > 0 and not followup else None,
                                    unsaved_reply=unsaved)
        if not recorded:   # one more try, the replies made
            recorded = await _track_set(bot, info)
        if not recorded:
            log.error("set %s: could not be recorded; its jobs are posted one by one, with no contact sheet", set_id)
    finally:
        if not recorded and isinstance(sheets, SheetsCog):
            sheets.forget(set_id)   # no sheet will close it: do not keep its command (and token) for good
        if progress is not None:
            for record in records:
                if record.id not in attached:
                    progress.attach(record.id, channel_id, None, None)
    return records


async def _track_set(bot: "ImagineBot", info: dict[str, Any]) -> bool:
    """Record the set (`set:<id>` and `sheets.open`) for this process's SheetsCog or, without one,
    for a process that has it. False (logged) when the store could not be written."""
    try:
        sheets = bot.get_cog("Sheets")
        if isinstance(sheets, SheetsCog):
            await sheets.track(info)
        else:   # no poller in this process: record it for one that has
            queue = bot.queue
            await queue.set_setting(set_key(info["id"]), info, expire_after=keep_seconds(bot))
            opened = await queue.get_setting(OPEN_KEY, []) or []
            await queue.set_setting(OPEN_KEY, [*opened, info["id"]])
        return True
    except Exception:  # noqa: BLE001 - the caller goes on showing the jobs' replies
        log.exception("set %s: recording it (for its contact sheet) failed", info["id"])
        return False


# --- the contact sheet ---------------------------------------------------------------------------

# The sheet's text, tried in order until it fits in one message: (template characters, caption
# characters, links to the replies). The last step fits 25 jobs whatever their captions say (each
# line at most about 60 characters: a caption of 12, Markdown-escaped, the reason, the id).
SHEET_TEXT_STEPS = ((300, 100, True), (300, 40, True), (300, 100, False), (300, 40, False), (100, 20, False),
                    (60, 12, False))


class MarkFailed(Exception):
    """The store failed writing a set's `posting_after` mark: nothing was posted (tried again after
    a backoff, as a failed post is: SheetsCog._check)."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")


@dataclass(frozen=True)
class SheetEntry:
    """One job of a set as the contact sheet's text lists it."""
    label: str                     # its caption: the options it was made with
    job_id: str
    url: str | None                # its reply, when known
    left_out: str | None = None    # why it has no tile (its state, gone, no final image)
    withheld: bool = False         # cancelled for a banned word: its caption is not shown (label "")
    number: int = 0                # its place in the set (1, 2, ...): its tile's caption starts with it

    def line(self, caption_chars: int, links: bool) -> str:
        shown = render.PROMPT_WITHHELD if self.withheld else render.snippet(self.label, caption_chars)
        # The tile's number, not a bullet: a caption the sheet's font cannot draw (CJK, emoji) is
        # still matched to its line here.
        text = f"{self.number}. {shown}"
        if self.left_out:
            text += f" ({self.left_out})"
        text += f" · `{self.job_id}`"
        if links and self.url:
            text += f" · {self.url}"
        return text


class SheetsCog(commands.Cog, name="Sheets"):
    """Posts each permutation set's contact sheet once all its jobs have ended."""

    def __init__(self, bot: "ImagineBot"):
        self.bot = bot
        self.queue = bot.queue
        self._open: dict[str, dict[str, Any]] = {}          # set id -> its info
        self._ended: dict[str, JobRecord] = {}              # job id -> its finished record (final)
        # Held only for the read-modify-write of `sheets.open` (never while a sheet renders or
        # uploads: `track`, which a command awaits before its first reply, takes it too).
        self._lock = asyncio.Lock()
        self._checking: set[str] = set()   # sets being checked (and maybe posted) now: one check at a time
        self._wake = asyncio.Event()
        self._retry: dict[str, tuple[int, float]] = {}      # set id -> (failed posts, next try at: monotonic)
        # Set id -> its marker, once its sheet is posted (or given up) and until the marker is
        # stored: a failed store write is retried on later polls, never the post. In memory only:
        # across a restart a sheet posted just before a crash (its marker unwritten) is found by its
        # record's `posting_after` mark and the channel's history (_find_sheet), or, within a few
        # minutes, dropped by Discord as a repeat of its nonce.
        self._posted: dict[str, dict[str, Any]] = {}
        self._unrecorded: set[str] = set()   # sets whose failed marker write was logged (once)
        self._interactions: dict[str, tuple[discord.Interaction, float]] = {}   # set id -> (its command, at)
        self._tasks: list[asyncio.Task] = []

    async def cog_load(self) -> None:
        if self.bot.background and self.queue is not None:
            self._tasks = [asyncio.create_task(self._poll_loop(), name="sheets-poll")]

    async def cog_unload(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    # --- bookkeeping ------------------------------------------------------------------------

    async def track(self, info: dict[str, Any]) -> None:
        set_id = info["id"]
        async with self._lock:
            await self.queue.set_setting(set_key(set_id), info, expire_after=keep_seconds(self.bot))
            opened = list(await self.queue.get_setting(OPEN_KEY, []) or [])
            if set_id not in opened:
                await self.queue.set_setting(OPEN_KEY, [*opened, set_id])
            self._open[set_id] = info
        self._wake.set()

    def remember(self, set_id: str, interaction: discord.Interaction) -> None:
        """The command that made the set, for posting its sheet as a follow-up while its token lives."""
        self._interactions[set_id] = (interaction, created_monotonic(interaction))   # the token's age

    def forget(self, set_id: str) -> None:
        """Drop the command remembered for a set that will have no sheet (its record was never saved)."""
        self._interactions.pop(set_id, None)

    def _live_interaction(self, set_id: str) -> discord.Interaction | None:
        interaction, at = self._interactions.get(set_id, (None, 0.0))
        if interaction is None or time.monotonic() - at >= self.bot.config.progress.token_ttl:
            return None
        return interaction

    async def _load_open(self) -> None:
        expired = []
        for set_id in list(await self.queue.get_setting(OPEN_KEY, []) or []):
            if set_id not in self._open:
                info = await self.queue.get_setting(set_key(set_id))
                if isinstance(info, dict):
                    self._open[set_id] = info
                else:   # its record expired (or was never written): nothing to post it from
                    expired.append(set_id)
        if expired:
            log.warning("sets %s: their records are gone (expired); no contact sheet", ", ".join(expired))
            async with self._lock:
                opened = list(await self.queue.get_setting(OPEN_KEY, []) or [])
                kept = [s for s in opened if s not in expired]
                if kept != opened:
                    await self.queue.set_setting(OPEN_KEY, kept)

    async def _keep_open(self) -> None:
        """Write again the record of each open set written more than half its expiry ago, with a
        fresh expiry: a set kept only in memory would otherwise be dropped by a restart after its
        record expired (its jobs still waiting), while this process would still post its sheet. A
        store failure is logged and tried again at the next reload; the sets are checked meanwhile."""
        keep = keep_seconds(self.bot)
        for set_id, info in list(self._open.items()):
            written = float(info.get("kept_at") or info.get("created_at") or 0.0)
            if time.time() - written < keep / 2 or set_id in self._posted or set_id in self._checking:
                continue   # fresh enough; or being posted and closed (its record is needed no more)
            now = time.time()
            try:
                await self.queue.set_setting(set_key(set_id), {**info, "kept_at": now}, expire_after=keep)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the record has time left: try again later
                log.warning("set %s: writing its record again failed (%s: %s)", set_id, type(exc).__name__, exc)
                return
            info["kept_at"] = now

    async def _close(self, set_id: str, marker: dict[str, Any] | None) -> None:
        """Record the sheet as posted (if `marker`) and drop the set from the open list."""
        if marker is not None:
            await self.queue.set_setting(sheet_key(set_id), marker, expire_after=keep_seconds(self.bot))
        self._posted.pop(set_id, None)
        self._unrecorded.discard(set_id)
        info = self._open.pop(set_id, None) or {}
        self._retry.pop(set_id, None)
        self._interactions.pop(set_id, None)
        for job_id in info.get("jobs", []):
            self._ended.pop(job_id, None)
        async with self._lock:   # the open list's read-modify-write (track adds to it meanwhile)
            opened = list(await self.queue.get_setting(OPEN_KEY, []) or [])
            if set_id in opened:
                opened.remove(set_id)
                await self.queue.set_setting(OPEN_KEY, opened)

    # --- polling ------------------------------------------------------------------------------

    async def _poll_loop(self) -> None:
        reloaded = 0.0
        while True:
            try:
                if time.monotonic() - reloaded >= self.bot.config.progress.reconcile_interval:
                    await self._load_open()   # sets opened by other processes (or before a restart)
                    reloaded = time.monotonic()
                    await self._keep_open()
                going = await self._going()
                for set_id in list(self._open):
                    try:
                        await self.check(set_id, going)
                    except asyncio.CancelledError:
                        raise
                    except Exception:  # noqa: BLE001 - one set's trouble must not skip the others
                        log.exception("set %s: checking it failed", set_id)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - never end the task
                log.exception("checking permutation sets failed")
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=max(0.05, self.bot.config.progress.line_interval))
            except asyncio.TimeoutError:
                pass

    async def _going(self) -> set[str] | None:
        """The ids of the jobs queued or running now, in two batched reads for every open set (a
        read of each set's jobs was about two reads a set every poll: 440 at 220 open sets), or None
        when no open set has a job still to be read (all ended, or no set open).

        Read in the order a job moves on (the line, then the running jobs): one claimed between the
        two reads is in the second. One that moves back meanwhile (a failed attempt goes back to
        the line) or finishes is in neither: `_records` reads it alone, as any job in neither."""
        if not any(job_id not in self._ended for set_id, info in self._open.items() if set_id not in self._posted
                   for job_id in info.get("jobs", [])):
            return None
        line = await self.queue.line()
        running = await self.queue.running()
        return {*line, *(record.id for record in running)}

    async def _records(self, info: dict[str, Any], going: set[str] | None = None) -> list[JobRecord | None] | None:
        """Every job's record, or None while any is still queued, running, or not yet delivered:
        the sheet comes after every result (and links each where it was posted: a result that went
        out as a new message, its reply deleted, has its `result_message_id` only once delivered).
        `going`: the jobs queued or running as `_going` read them; one of them is not read again."""
        out: list[JobRecord | None] = []
        for job_id in info["jobs"]:
            record = self._ended.get(job_id)
            if record is None:
                if going is not None and job_id in going:
                    return None
                record = await self.queue.get(job_id)
                if record is not None and not (record.state.finished and record.delivered):
                    return None   # the first one still going or being posted: no need to look further
                if record is not None:
                    self._ended[job_id] = record
            out.append(record)
        return out

    async def check(self, set_id: str, going: set[str] | None = None) -> bool:
        """Post the set's sheet if every job ended and it was not posted; True once it is done.
        `going`: the jobs queued or running (`_going`), read once for every open set; None: each
        job of the set is read.

        No lock is held while the sheet renders and uploads (a 429 wait, discord.py's 5xx retries,
        a slow store): `track`, which every new set's command awaits before its first reply, would
        wait for all of it. One check of a set at a time instead (`_checking`, claimed with no await
        in between): a second one while the first is posting returns False, and the set is closed
        (marker, then the open list) before it is released, so it is never posted twice here. If
        the marker's write fails, the marker is kept (`_posted`) and only its write is retried."""
        if set_id not in self._open:
            return True
        if set_id in self._checking:   # being checked (maybe posted) right now
            return False
        self._checking.add(set_id)
        try:
            return await self._check(set_id, going)
        finally:
            self._checking.discard(set_id)

    async def _check(self, set_id: str, going: set[str] | None = None) -> bool:
        info = self._open.get(set_id)
        if info is None:
            return True
        marker = self._posted.get(set_id)
        if marker is not None:   # posted already; its marker's write failed: retry that alone
            return await self._record(set_id, marker)
        records = await self._records(info, going)
        if records is None:
            return False
        # Posted by another process, or before a restart: only once every job has ended (the sheet
        # waits for them all), so a set still waiting costs no read of its marker.
        if await self.queue.get_setting(sheet_key(set_id)):
            await self._close(set_id, None)
            return True
        failed, next_at = self._retry.get(set_id, (0, 0.0))
        if time.monotonic() < next_at:   # backing off after a failed post
            return False
        try:
            marker = await self._post(info, records)
        except (discord.HTTPException, OSError, aiohttp.ClientError, asyncio.TimeoutError, MarkFailed) as exc:
            if isinstance(exc, MarkFailed) or not isinstance(exc, discord.HTTPException) or not is_refusal(exc):
                # 5xx, or the network failed (no answer at all): Discord may take it later. Not on
                # every poll: each try re-renders and re-uploads the sheet.
                delay = min(SHEET_RETRY_MAX, SHEET_RETRY_FIRST * 2 ** failed)
                self._retry[set_id] = (failed + 1, time.monotonic() + delay)
                why = (f"{exc.status} {exc.text}" if isinstance(exc, discord.HTTPException)
                       else f"the store failed marking it: {exc}" if isinstance(exc, MarkFailed)
                       else f"{type(exc).__name__}: {exc}")
                log.warning("set %s: posting the contact sheet failed (%s); will retry in %.1f s",
                            set_id, why, delay)
                return False
            # A refusal (the channel gone or closed to the bot, the upload too large, a bad form):
            # the same post would be refused again.
            log.error("set %s: Discord refused its contact sheet in channel %s (%s, code %s: %s); giving up",
                      set_id, info.get("channel_id"), exc.status, exc.code, exc.text)
            marker = {"error": f"{exc.status} {exc.text}"[:200], "at": time.time()}
        self._posted[set_id] = marker   # before the store write: a failure of it must not post again
        return await self._record(set_id, marker)

    async def _record(self, set_id: str, marker: dict[str, Any]) -> bool:
        """Close a set whose sheet is posted (or given up); False if the store failed (tried again
        on the next poll: the store write, not the post). Logged once per set, then quietly."""
        try:
            await self._close(set_id, marker)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a store hiccup: never post the sheet again for it
            if set_id not in self._posted:   # the marker is stored; the open list's write failed
                log.warning("set %s: dropping it from the open sets failed (%s: %s)",
                            set_id, type(exc).__name__, exc)
            elif set_id not in self._unrecorded:
                self._unrecorded.add(set_id)
                log.warning("set %s: its contact sheet is done (posted or given up) but storing that failed (%s: %s); "
                            "retrying the store write (not the post)", set_id, type(exc).__name__, exc)
            else:
                log.debug("set %s: storing its contact sheet's marker failed again (%s: %s)",
                          set_id, type(exc).__name__, exc)
            return False
        return True

    async def _refused_now(self, info: dict[str, Any], records: list[JobRecord | None]) -> tuple[set[int], bool]:
        """Which of the set's jobs (their indexes) have a prompt the server's refused words match
        now, and whether its template does: an entry added after they finished (its add withholds
        only jobs still waiting or running) must not be shown by the sheet either. A match that
        timed out counts as one (as the add's check)."""
        listed = await moderation.entries(self.queue, info.get("guild_id"))
        if not listed:
            return set(), False
        max_chars = self.bot.config.imagine.max_prompt_chars

        def check() -> tuple[set[int], bool]:   # off the event loop: patterns may take a while
            hits = {i for i, r in enumerate(records)
                    if r is not None and moderation.find(listed, r.spec.prompt, max_chars) is not None}
            template = info.get("template") or ""
            return hits, bool(template) and moderation.find(listed, template, len(template)) is not None

        return await asyncio.to_thread(check)

    async def _post(self, info: dict[str, Any], records: list[JobRecord | None]) -> dict[str, Any]:
        set_id = info["id"]
        captions = info.get("captions") or []
        refused, template_refused = await self._refused_now(info, records)
        tiles: list[tuple[bytes, str]] = []
        numbers: list[int] = []   # each tile's job's place in the set: its line in the text
        entries: list[SheetEntry] = []
        for index, (job_id, record) in enumerate(zip(info["jobs"], records)):
            label = captions[index] if index < len(captions) else (record.spec.prompt if record else job_id)
            number = index + 1
            if record is None:
                entries.append(SheetEntry(label, job_id, None, "gone from the store", number=number))
                continue
            url = render.reply_url(record.spec)
            if render.withholds_prompt(record) or index in refused:
                # Cancelled for a banned word (DONE too: its worker finished before it saw the
                # cancel): no tile, no caption, as its reply shows no picture and no prompt. Or a
                # word refused since it finished: not shown here either.
                why = JobState.CANCELLED.value if render.withholds_prompt(record) else "its prompt is refused now"
                entries.append(SheetEntry("", job_id, url, why, withheld=True, number=number))
                continue
            if record.state != JobState.DONE:
                entries.append(SheetEntry(label, job_id, url, record.state.value, number=number))
                continue
            png = await self.queue.get_artifact(record.id, "final.png")
            if png is None:
                entries.append(SheetEntry(label, job_id, url, "no final image", number=number))
                continue
            tiles.append((png, label))
            numbers.append(number)
            entries.append(SheetEntry(label, job_id, url, number=number))
        if not tiles:
            log.info("set %s: none of its %d jobs finished with an image; no contact sheet", set_id, len(records))
            return {"skipped": "no finished image", "at": time.time()}

        channel = self.bot.get_partial_messageable(int(info["channel_id"]), guild_id=info.get("guild_id"))
        # Before the sheet is rendered (twice, when the PNG is over the limit): a store that fails
        # the mark fails it on every try, and each try would render it again for nothing.
        if info.get("posting_after"):
            # Marked before an earlier try (or before a restart): that try may have posted it.
            found = await self._find_sheet(info, channel, int(info["posting_after"]))
            if found is not None:
                log.info("set %s: its contact sheet was posted before (message %s); not posting it again",
                         set_id, found.id)
                return {"message_id": found.id, "channel_id": found.channel.id, "at": time.time()}
        else:
            try:
                await self._mark_posting(info)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the store's error, of either backend
                raise MarkFailed(exc) from exc
        data, filename = await asyncio.to_thread(contact_sheet.render_sheet, tiles, "PNG", numbers)
        limit = self._upload_limit(info) - UPLOAD_MARGIN
        if len(data) > limit:
            data, filename = await asyncio.to_thread(contact_sheet.render_sheet, tiles, "JPEG", numbers)
        content = self._content(info, len(tiles), entries, template_refused)
        try:
            # The nonce lets Discord drop a repeat within a few minutes (a crash between this post and
            # the marker); later, the mark above lets the next try find this post (_find_sheet).
            message = await channel.send(content=content, file=discord.File(io.BytesIO(data), filename=filename),
                                         nonce=f"sheet-{set_id}")
        except discord.Forbidden as refused:
            interaction = self._live_interaction(set_id)
            if interaction is None:
                raise
            # The bot may not post in this channel; the command's token may (as the set's replies did).
            log.warning("set %s: channel %s refuses the bot's messages; posting the contact sheet as a follow-up",
                        set_id, info.get("channel_id"))
            try:
                message = await interaction.followup.send(content=content, wait=True,
                                                          file=discord.File(io.BytesIO(data), filename=filename),
                                                          allowed_mentions=discord.AllowedMentions.none())
            except discord.HTTPException as exc:
                if exc.status == 401 or exc.code == INVALID_WEBHOOK_TOKEN:   # the token expired early
                    self._interactions.pop(set_id, None)
                    raise refused from exc   # the channel's refusal is the one to record
                raise
        return {"message_id": message.id, "channel_id": message.channel.id, "at": time.time()}

    async def _mark_posting(self, info: dict[str, Any]) -> None:
        """Write `posting_after` (a snowflake REPOST_CLOCK_SLACK before now, for a clock a little
        ahead of Discord's) into the set's record before its sheet is posted: a restart between the
        post and its marker then looks for the post (_find_sheet) instead of posting a second sheet
        once Discord has forgotten the nonce. A failed write raises: nothing is posted, and the next
        poll tries again."""
        since = discord.utils.utcnow() - datetime.timedelta(seconds=REPOST_CLOCK_SLACK)
        marked = {**info, "posting_after": str(discord.utils.time_snowflake(since))}
        await self.queue.set_setting(set_key(info["id"]), marked, expire_after=keep_seconds(self.bot))
        info["posting_after"] = marked["posting_after"]   # the dict `_open` holds: later tries search

    async def _find_sheet(self, info: dict[str, Any], channel: Any, after: int) -> discord.Message | None:
        """The bot's contact sheet of this set among the channel's messages since the snowflake
        `after` (at most REPOST_SEARCH of them), or None: none there, or the channel cannot be read
        (gone, no View Channel; without Read Message History Discord returns no messages), when the
        nonce still guards the post. A sheet of this set is one with a `contact-sheet` attachment
        (PNG or JPEG) whose text names a job of the set as its lines do (`` `<job id>` ``): a job id
        is this set's alone, and user text cannot spell it so (Markdown-escaped, its backticks are
        `\\``). Whatever else its text says (captions shortened, the template withheld by a word
        refused since the first try), and the first line's id is there even in a text cut short."""
        me = self.bot.user.id if self.bot.user else None
        stem = contact_sheet.FILENAME.rsplit(".", 1)[0] + "."
        ids = [f"`{job_id}`" for job_id in info["jobs"]]
        try:
            async for message in channel.history(limit=REPOST_SEARCH, after=discord.Object(after), oldest_first=True):
                if message.author.id != me:
                    continue
                if (any(a.filename.startswith(stem) for a in message.attachments)
                        and any(job_id in message.content for job_id in ids)):
                    return message
        except (discord.Forbidden, discord.NotFound) as exc:
            log.info("set %s: cannot read channel %s for an earlier post of its contact sheet (%s %s); relying "
                     "on the nonce", info["id"], info.get("channel_id"), exc.status, exc.text)
        return None

    def _upload_limit(self, info: dict[str, Any]) -> int:
        guild = self.bot.get_guild(int(info["guild_id"])) if info.get("guild_id") else None
        if guild is not None:
            return guild.filesize_limit
        return self.bot.config.progress.upload_limit or 10 * 1024 * 1024

    @staticmethod
    def _content(info: dict[str, Any], shown: int, entries: list["SheetEntry"], withhold_template: bool = False) -> str:
        """The sheet's text: the template, then one line per job of the set, in order: its caption
        (and why it has no tile), its id (for `/remix`) and a link to its reply. Within Discord's
        2000 characters: shorter captions, then no links, then a shorter template, until it fits;
        an id is never cut (at most 25 jobs a set: their lines without links fit). When a job of the
        set was cancelled for a banned word, the template (which has every option) is withheld too, as
        it is when `withhold_template` (the server's refused words match it now)."""
        line = f"{shown} of {len(entries)} variations"
        if info.get("seed") is not None:
            line += f" · seed {info['seed']}"
        line += f" · <@{info.get('user_id', 0)}>"
        text = ""
        withheld = withhold_template or any(entry.withheld for entry in entries)
        for head_chars, caption_chars, links in SHEET_TEXT_STEPS:
            template = render.PROMPT_WITHHELD if withheld else render.snippet(info.get("template") or "", head_chars)
            head = f"**Contact sheet** · {template}"
            rows = [entry.line(caption_chars, links) for entry in entries]
            text = "\n".join([head, line, *rows])
            if len(text) <= render.CONTENT_LIMIT:
                return text
        return text[: render.CONTENT_LIMIT]
