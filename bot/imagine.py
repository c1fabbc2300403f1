"""/imagine, /remix, /help and the buttons on the replies (Reroll, Continue, Remix, Cancel).

Buttons survive restarts: their custom ids carry the job id (`imagine:reroll:<job_id>`) and are
handled by `discord.ui.DynamicItem` subclasses registered in `setup_hook`; whatever a button needs
is read from the queue's store, never from memory. So does the Remix modal: it is never kept in
discord.py's modal store; its submit (`imagine:remix-modal:<job_id>` and the typed prompt) is
answered by the cog's `on_interaction` listener, before or after a restart alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import math
import random
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Optional, Sequence, TypeVar

import discord
from discord import app_commands
from discord.ext import commands

from bot import attachments, render
from bot.config import PIXELS_PER_CELL, PRESET_NAMES
from bot.help import help_text
from bot.permutations import escape_braces, has_set_braces, unescape_braces   # (it imports this module lazily)
from bot.permissions import NOT_INSTALLED, can_see_job, is_admin, may_know_job, not_installed_here, results_refusal
from bot.progress import write_reply
from engine.jobs import JobQueue, JobRecord, JobSpec, JobState, ParentGone, QueueLimitReached, UploadGone, pause_of
from engine.prompts import MAX_PROMPT_PARTS, PromptError, clip_overflow, has_visible_text, parse_prompt

if TYPE_CHECKING:
    from bot.client import ImagineBot

log = logging.getLogger(__name__)

SEED_MAX = 2**32 - 1
JOB_ID = r"(?P<job_id>[0-9A-Za-z_-]{1,64})"
# A job id as the store makes them (engine.jobs.new_job_id: 12 hex digits), found in a pasted line.
NEW_JOB_ID = re.compile(r"(?<![0-9A-Za-z_-])[0-9a-f]{12}(?![0-9A-Za-z_-])")
RESULT_JOB_ID = re.compile(r"\bjob `?([0-9a-f]{12})(?![0-9A-Za-z_-])")   # a result line's (render._compose)
REMIX_MODAL = re.compile(r"imagine:remix-modal:" + JOB_ID)
REMIX_PROMPT_INPUT = "prompt"   # the custom id of the modal's text input
# Seconds of Discord's 3 s answer window (counted from the interaction's creation) that the checks
# before the first answer may use (`in_time`): reading the store (the ban-word list, the user's cap,
# a job's row: seconds behind a busy SQLite file, up to ~30 s while Redis reconnects) and matching
# the ban words. Slower, and the bot defers first and answers after.
ANSWER_WINDOW = 2.0
# The same for downloading and checking attachments; a slower download goes on after a public defer.
ATTACHMENT_WINDOW = 2.0
ATTACHMENT_TIMEOUT = 60.0
# The age (`interaction_age`) trusts this host's clock against Discord's. A host clock seconds ahead
# makes every interaction look old: without a floor, no wait is left, so every command would defer
# at once and the Remix button (whose modal cannot follow a defer) would always answer
# REMIX_TOO_SLOW. So `in_time` waits at least MIN_ANSWER_WAIT before a modal, and before a defer
# when the age reads over CLOCK_SUSPECT_AFTER (were it true, Discord's 3 s would be over: nothing
# is lost by waiting). Ages outside [-CLOCK_TOLERANCE, CLOCK_SUSPECT_AFTER] are logged, once.
MIN_ANSWER_WAIT = 0.5
CLOCK_SUSPECT_AFTER = 3.0
CLOCK_TOLERANCE = 0.5
# A user's second command with pictures waits (deferred publicly once past the answer window) while
# their first one downloads, checks, stores and submits (`attachments.UserTurns`), at most this long:
# the first one's download alone may take ATTACHMENT_TIMEOUT, its store and submit a busy store's
# seconds. Then it is refused, privately (BUSY_WITH_PICTURES).
TURN_WAIT = 120.0
BUSY_WITH_PICTURES = ("Your previous command with a picture is still being handled, so this one was not queued. "
                      "Send it again once that one has its reply.")
# The Remix button's answer is its modal, which cannot follow a defer: reads slower than the window
# get this instead.
REMIX_TOO_SLOW = ("I could not read that job in time (the store is slow right now), so there is no Remix form. "
                  "Try the button again in a moment.")
# /remix and the Remix form take one prompt: a `{…}` set (bot.permutations) is /imagine's alone.
REMIX_NO_SETS = ("A remix makes one picture; `{…}` sets work with `/imagine`. Write the remix's prompt "
                 "without braces, or `\\{` and `\\}` for literal ones. Nothing was queued.")

T = TypeVar("T")


# The pictures a job's spec.extra names (bot/attachments.py stores them; the worker reads them).
PICTURE_KEYS = ("image_prompt", "init_image")
OPTION_OF_KEY = {key: option for option, key in attachments.SPEC_KEYS.items()}   # "image_prompt" -> "image"


def carried_pictures(spec: JobSpec, keys: tuple[str, ...]) -> dict[str, Any]:
    """Copies of the picture references among `keys` in `spec.extra` (`{"artifact": [upload_id, name],
    ...}`), for a new job that reuses the same uploads."""
    out = {}
    for key in keys:
        ref = spec.extra.get(key)
        artifact = ref.get("artifact") if isinstance(ref, dict) else None
        if isinstance(artifact, (list, tuple)) and len(artifact) == 2:
            out[key] = copy.deepcopy(ref)
    return out


def pasted_job_id(text: str) -> str:
    """The job id in what was given as /remix's `job`: the text itself when it is one (JOB_ID), else
    the one after `job ` (a result's line, or its whole reply, pasted: `... · job `b36b…` · @user`),
    else the one store-made id (NEW_JOB_ID) in it, or in its first line (a /history entry pasted
    with its lineage line); the text as given when it holds none or several (then refused as no
    job, quoted)."""
    text = text.strip()
    if re.fullmatch(JOB_ID, text):
        return text
    # A whole reply copied (mobile's Copy Text) also holds its lineage line's id (`↳ remix of
    # `X``): the result line's `job <id>` is the reply's own.
    own = set(RESULT_JOB_ID.findall(text))
    if len(own) == 1:
        return own.pop()
    found = set(NEW_JOB_ID.findall(text))
    if len(found) > 1:   # a /history entry: its own id on its first line, its lineage's below
        found = set(NEW_JOB_ID.findall(text.split("\n", 1)[0]))
    return found.pop() if len(found) == 1 else text


def with_typed_prompt(message: str, prompt: str) -> str:
    """A refusal of the Remix form's submit, with the prompt typed into it quoted back to copy
    (render.copyable): Discord keeps no copy of a submitted form, so it would be lost. Only its
    start when the whole would not fit Discord's 2000 characters (then said)."""
    if not has_visible_text(prompt):
        return message
    intro = "\nYour prompt, to copy and send again:\n"
    block = render.copyable(prompt)
    if len(message) + len(intro) + len(block) > render.CONTENT_LIMIT:
        intro = "\nThe start of your prompt (too long to show whole here):\n"
        room = render.CONTENT_LIMIT - len(message) - len(intro) - len(render.copyable(""))
        block = render.copyable(render.clip(prompt, max(1, room)))
    return message + intro + block


def remix_source(parent: JobSpec, channel_id: int) -> dict[str, Any]:
    """What a remix made in channel `channel_id` records of the job it remixes (`extra["parent"]`,
    for its lineage line: render._remix_line). The parent's prompt, author and link only when the
    parent is of that very channel (its command's channel and its reply's): the remix's reply is
    public there, and a job of another channel (a private one, say) belongs to that channel's
    audience, not to everyone where the remix was asked for. A thread is a channel of its own: its
    parent channel's audience is not its own (a private thread), nor the other way round. Else only
    render.OTHER_CHANNEL and the parent's channel (for /history to judge who may see it once the
    parent is pruned: render.lineage_channels), None when its two channels differ."""
    channels = {parent.channel_id}
    reply_channel = (parent.reply or {}).get("channel_id")
    if reply_channel:
        channels.add(int(reply_channel))
    if channels == {channel_id}:
        # Its channel too: its link is None until the parent has a reply (render.remix_channel).
        return {"prompt": parent.prompt, "user_id": parent.user_id, "url": render.reply_url(parent),
                "channel_id": channel_id}
    return {render.OTHER_CHANNEL: True, "channel_id": next(iter(channels)) if len(channels) == 1 else None}


def carried_source(source: dict[str, Any], channel_id: int, recorded_in: int | None = None) -> dict[str, Any]:
    """The remix's `extra["parent"]` for its Reroll, made in channel `channel_id` (the remix's own,
    where the button is): as recorded, or, for a remix recorded with another channel's parent
    named in full (before remix_source), only render.OTHER_CHANNEL and that channel. `recorded_in`:
    the remix's channel, that of a full record naming none (render.remix_channel)."""
    if source.get(render.OTHER_CHANNEL):
        return copy.deepcopy(source)
    where = render.remix_channel(source, recorded_in if recorded_in is not None else channel_id)
    if where == channel_id:
        return copy.deepcopy(source)
    return {render.OTHER_CHANNEL: True, "channel_id": where}


def image_weights_of(spec: JobSpec) -> tuple[float, ...]:
    """The weight of the job's image prompt (`spec.extra["image_prompt"]`), as engine.prompts.parse_prompt
    takes it: `(w,)`, or `()` without one. A positive one is a target to pull toward, so the text
    prompt may then be all negative (`blurry:-1`)."""
    ref = spec.extra.get("image_prompt")
    return (float(ref.get("weight", 1.0)),) if isinstance(ref, dict) else ()


async def clip_notes(prompts: list[str], image_weights: Sequence[float] = ()) -> list[list[str]]:
    """For each prompt, the notes on the words CLIP will not read (engine.prompts.clip_overflow, one
    per weighted part cut at 77 tokens); [] for a prompt that fits. `image_weights`: the weight of
    the jobs' image prompt, if any (a negative-only prompt is parsed with a positive one). Off the
    event loop: the first call loads CLIP's vocabulary. Never raises: no tokenizer (or a prompt
    it cannot parse) means no notes."""
    def work() -> list[list[str]]:
        clip_overflow([])   # loads the vocabulary (once): the preload asks for nothing more
        out = []
        for prompt in prompts:
            try:
                out.append(clip_overflow(parse_prompt(prompt, image_weights, strict=False)))   # (checked apart)
            except PromptError:
                out.append([])
        return out

    try:
        return await asyncio.to_thread(work)
    except Exception:  # noqa: BLE001 - e.g. openai-clip missing: the job goes on without the notes
        log.warning("could not check the prompts' length in CLIP tokens", exc_info=True)
        return [[] for _ in prompts]


async def add_clip_notes(spec: JobSpec) -> None:
    """Name in `spec.extra["clip_notes"]` what CLIP will ignore of the prompt (render shows them, quoted)."""
    (notes,) = await clip_notes([spec.prompt], image_weights_of(spec))
    if notes:
        spec.extra["clip_notes"] = notes
    else:
        spec.extra.pop("clip_notes", None)


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
    cutn: int = 12
    preset: str | None = None       # the `quality` used, if any


def prompt_problem(text: str, image_weights: Sequence[float] = (), *, strict: bool = True) -> str | None:
    """Why the engine would refuse this (weighted) prompt, said for the user; None if it is fine.
    `image_weights`: the weight of the job's image prompt (`image`, `image_weight`), if it has one:
    a positive one lets every part of the text be negative (engine.prompts.parse_prompt).
    Permutation prompts (`{a, b}`) are checked per expansion."""
    try:
        parse_prompt(text, image_weights, strict=strict)
    except PromptError as exc:   # it quotes at most 40 characters of the prompt: shown as text
        reason = render.defang_links(discord.utils.escape_markdown(str(exc), ignore_links=False))
        positive = ("at least one of them, or the `image_weight`, positive" if image_weights
                    else "at least one of them positive")
        return (f"The prompt cannot be used: {reason}. Weighted prompts look like `a house | by Escher:0.5 | "
                f"blurry:-1`: up to {MAX_PROMPT_PARTS} parts split by `|`, each with an optional `:weight` "
                f"from -100 to 100, {positive}.")
    return None


def checked_prompt(bot: "ImagineBot", prompt: str | None, image_weights: Sequence[float] = (), *,
                   strict: bool = True) -> str:
    """The prompt (stripped), checked against today's limits (its length, a set's, its weights), or
    BadInput (what to fix). `image_weights`, `strict`: as prompt_problem's (engine.prompts.parse_prompt;
    not strict: a stored prompt, read as it was when queued). validate's check, also for the
    prompt a Reroll or Continue takes from its job (ImagineCog._button_spec)."""
    cfg = bot.config.imagine
    text = (prompt or "").strip()
    if not has_visible_text(text):   # zero-width and format characters alone look empty too
        raise BadInput("The prompt is empty: write what to imagine, e.g. `/imagine a house by Escher`.")
    is_template = has_set_braces(text)   # `\{` and `\}` are literal braces, no set
    plain = unescape_braces(text)   # a prompt without sets as CLIP reads it (and it is stored)
    if is_template:
        # A permutation template holds every option: its own, longer limit here, and each
        # combination (what CLIP reads) is held to max_prompt_chars by permutations.check_set.
        from bot.permutations import TemplateError, parse, template_chars   # noqa: PLC0415
        most = template_chars(cfg.max_prompt_chars)
        try:
            parse(text)
        except TemplateError as exc:
            # Braces that do not parse are said here. A stray one may not have been meant as a set:
            # one over the plain limit gets both reasons at once, not the second after a fix.
            if len(plain) > cfg.max_prompt_chars:
                raise BadInput(
                    f"{exc} Also, at {len(text):,} characters the prompt is over the limit of "
                    f"{cfg.max_prompt_chars:,} for a prompt without `{{…}}` sets (one with sets may be up to "
                    f"{most:,}, each combination it makes up to {cfg.max_prompt_chars:,}).") from None
            raise BadInput(str(exc)) from None
        if len(text) > most:
            raise BadInput(
                f"The prompt is {len(text):,} characters long; a prompt with `{{…}}` sets may be up to {most:,} "
                f"(and each combination it makes up to {cfg.max_prompt_chars:,}). Use fewer or shorter options.")
    elif len(plain) > cfg.max_prompt_chars:
        raise BadInput(
            f"The prompt is {len(plain):,} characters long; the limit is {cfg.max_prompt_chars:,}. "
            f"Shorten it: CLIP only reads the first {render.CLIP_TOKENS} tokens (about 300 characters of "
            "English) and ignores the rest anyway."
        )
    if not is_template:   # permutation prompts: checked per expansion
        problem = prompt_problem(plain, image_weights, strict=strict)
        if problem:
            raise BadInput(problem)
    return text


def validate(bot: "ImagineBot", prompt: str | None, iterations: int | None, seed: int | None,
             size: int | None, quality: str | None = None, image_weights: Sequence[float] = ()) -> ImagineRequest:
    """The request, checked against the config's limits, or BadInput (what to fix). `image_weights`:
    as prompt_problem's (/imagine's attached `image`)."""
    cfg = bot.config.imagine
    text = checked_prompt(bot, prompt, image_weights)
    preset = None
    if quality is not None:
        preset = bot.config.presets.get(quality)
        if preset is None:
            raise BadInput(f"`quality` must be one of {', '.join(PRESET_NAMES)} "
                           f"(you gave {render.quote(str(quality))}).")
    if iterations is None:
        iterations = preset.iterations if preset else cfg.default_iterations
    if not 1 <= iterations <= cfg.max_iterations:
        raise BadInput(f"`iterations` must be between 1 and {cfg.max_iterations:,} (you gave {iterations:,}).")
    if seed is None:
        seed = random.randint(0, SEED_MAX)
    elif not 0 <= seed <= SEED_MAX:
        raise BadInput(f"`seed` must be between 0 and {SEED_MAX:,} (you gave {seed:,}).")
    if size is None:
        size = preset.size if preset else cfg.default_size
    if str(size) not in cfg.sizes:
        raise BadInput(f"`size` must be one of {', '.join(cfg.sizes)} (you gave {size}).")
    return ImagineRequest(text, iterations, seed, size, cfg.sizes[str(size)],
                          cutn=preset.cutn if preset else cfg.cutn, preset=quality if preset else None)


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
    if render.withholds_prompt(record):
        return _button_view()   # cancelled for a banned word: nothing may start from it (withheld_refusal)
    items: list[discord.ui.Item[Any]] = [RerollButton(record.id)]
    if record.state == JobState.DONE:
        items.append(ContinueButton(record.id))
        items.append(RemixButton(record.id))
    return _button_view(*items)


# The refusal of a button (or the Remix form) to a member without Use Application Commands here.
NO_COMMANDS = ("You can't start a job from this message: you don't have the Use Application Commands permission "
               "in this channel, which the bot's commands need. Nothing was queued.")


def may_use_commands(interaction: discord.Interaction) -> bool:
    """Whether the presser may use application commands here (`interaction.permissions`: the member's
    permissions in this channel, as Discord resolved them for this interaction; no store read, no
    request). Discord checks Use Application Commands (and the per-command overrides of Server
    Settings → Integrations) for slash commands only, never for a component's click or a modal's
    submit: the buttons that start a job (Reroll, Continue, Remix) and the Remix form check that
    permission themselves. Not the per-command overrides (a role or channel barred from /imagine):
    those are not in the interaction (README). Outside a server there is nothing to check."""
    return interaction.guild_id is None or interaction.permissions.use_application_commands


class _JobButton(discord.ui.DynamicItem[discord.ui.Button], template=r"imagine:(?P<action>[a-z]+):" + JOB_ID):
    action = ""
    label = ""
    style = discord.ButtonStyle.secondary
    emoji: str | None = None
    # A job's start (Reroll, Continue, Remix): only for who may use the bot's commands here
    # (may_use_commands). Not Cancel: stopping one's own job is not using the bot (and an admin's
    # cancel is an admin's).
    starts_a_job = True

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

    async def callback(self, interaction: discord.Interaction) -> None:
        """The click, with the one error handler of every button: discord.py would only log
        "Ignoring exception in dynamic item callback" and leave the user without an answer (and a
        "thinking…" placeholder for ever), so a failure is logged and answered here."""
        try:
            if not_installed_here(interaction):   # a reply made through a user install, before they were refused
                await ephemeral(interaction, NOT_INSTALLED)
                return
            if self.starts_a_job and not may_use_commands(interaction):   # before any store read
                await ephemeral(interaction, NO_COMMANDS)
                return
            await self.on_click(_imagine_cog(interaction), interaction)
        except Exception:   # noqa: BLE001 - ours (the store down or locked, a bug): logged, told
            await answer_our_error(interaction, f"the {self.action} button of job {self.job_id}")

    async def on_click(self, cog: "ImagineCog", interaction: discord.Interaction) -> None:
        raise NotImplementedError


class RerollButton(_JobButton, template=r"imagine:reroll:" + JOB_ID):
    action, label, style, emoji = "reroll", "Reroll", discord.ButtonStyle.primary, "🎲"

    async def on_click(self, cog: "ImagineCog", interaction: discord.Interaction) -> None:
        await cog.from_button(interaction, self.job_id, "reroll")


class ContinueButton(_JobButton, template=r"imagine:continue:" + JOB_ID):
    action, label, style, emoji = "continue", "Continue", discord.ButtonStyle.secondary, "➕"

    async def on_click(self, cog: "ImagineCog", interaction: discord.Interaction) -> None:
        await cog.from_button(interaction, self.job_id, "continue")


class RemixButton(_JobButton, template=r"imagine:remix:" + JOB_ID):
    action, label, style, emoji = "remix", "Remix", discord.ButtonStyle.secondary, "🎨"

    async def on_click(self, cog: "ImagineCog", interaction: discord.Interaction) -> None:
        await cog.remix_button(interaction, self.job_id)


def remix_default(parent_prompt: str, max_chars: int) -> tuple[str, int]:
    """The Remix form's pre-fill and its `max_length`: the parent's prompt (at most `max_chars`
    characters) with its braces escaped (a literal `{` typed back unescaped would read as a set,
    refused), and room for those escapes on top of `max_chars` (each `\\{` is one character of the
    prompt: validate counts the text unescaped), at most Discord's 4000. Never cut mid-escape."""
    escaped = escape_braces(parent_prompt[:max_chars])
    max_length = min(4000, max_chars + escaped.count("\\{") + escaped.count("\\}"))
    default = escaped[:max_length]
    if default.endswith("\\") and escaped[len(default):len(default) + 1] in ("{", "}"):
        default = default[:-1]   # the escape's brace did not fit: drop its backslash too
    return default, max_length


class RemixModal(discord.ui.Modal):
    """Asks for the remix's prompt (pre-filled with the parent's). Built only to be sent: it is
    stopped at once, so discord.py does not keep it in its modal store (keyed by custom id alone,
    lost on a restart, and shared by everyone remixing the same job). The submit is answered by
    `ImagineCog.on_remix_submit` from the custom id (the job) and the submitted text alone, exactly
    once, whether the bot restarted in between or not."""

    def __init__(self, job_id: str, parent_prompt: str, max_chars: int):
        super().__init__(title="Remix: a new prompt from this picture", timeout=None,
                         custom_id=f"imagine:remix-modal:{job_id}")
        self.job_id = job_id
        default, max_length = remix_default(parent_prompt, max_chars)
        self.prompt = discord.ui.TextInput(
            label="New prompt", style=discord.TextStyle.paragraph, custom_id=REMIX_PROMPT_INPUT,
            default=default, max_length=max_length,
            placeholder="a house | by Escher:0.5 | blurry:-1",
        )
        self.add_item(self.prompt)
        # Stopped: `send_modal` then sends it without storing it, so discord.py never dispatches
        # its submit and the cog's listener is the one answer (no second reply racing it).
        self.stop()


def submitted_value(components: Any, custom_id: str) -> str | None:
    """The value of text input `custom_id` in a MODAL_SUBMIT's components (action rows of type 1,
    or labels of type 18 holding one component); None if it is not there."""
    for component in components if isinstance(components, list) else []:
        if not isinstance(component, dict):
            continue
        if component.get("type") == 1:
            found = submitted_value(component.get("components"), custom_id)
        elif component.get("type") == 18:
            found = submitted_value([component.get("component")], custom_id)
        elif component.get("custom_id") == custom_id:
            value = component.get("value")
            found = value if isinstance(value, str) else None
        else:
            found = None
        if found is not None:
            return found
    return None


class CancelButton(_JobButton, template=r"imagine:cancel:" + JOB_ID):
    action, label, style, emoji = "cancel", "Cancel", discord.ButtonStyle.danger, None
    starts_a_job = False   # its author (or an admin) stops it, with or without Use Application Commands

    async def on_click(self, cog: "ImagineCog", interaction: discord.Interaction) -> None:
        await cog.cancel_job(interaction, self.job_id)


DYNAMIC_ITEMS = (RerollButton, ContinueButton, RemixButton, CancelButton)


def _imagine_cog(interaction: discord.Interaction) -> "ImagineCog":
    cog = interaction.client.get_cog("Imagine")  # type: ignore[attr-defined]
    assert isinstance(cog, ImagineCog)
    return cog


# Our own error, told privately. A job whose reply already shows is queued: trying again would
# make a second one, so the text says to look first.
OUR_ERROR = ("Something went wrong on my side; the error is logged. If a reply above shows your job, "
             "it is queued; otherwise try again in a moment.")


# What a public "thinking…" placeholder says when our own error stopped what it was for.
FAILED_PLACEHOLDER = "This did not go through: something went wrong on my side (the error is logged)."


async def ephemeral(interaction: discord.Interaction, message: str, *, public_placeholder: str | None = None) -> None:
    """Tell the user alone: the one way the bot answers privately, before or after a defer (every
    refusal, and our own errors: `answer_our_error`, bot.client's `_Tree.on_error`).

    Not answered yet: an ephemeral response. Answered already: an ephemeral follow-up. After an
    ephemeral defer the first follow-up replaces the private "thinking…" message: that is the
    answer. After a public defer it would replace the "thinking…" message *publicly*, whatever its
    flags, so that message is first deleted, or edited to `public_placeholder` when one is given
    (our errors: the channel sees that it failed) -- but only while it is still thinking: a reply
    made since (a job's queued message with its Cancel button, the message a button is on) stays.
    HTTP errors of the answer itself are the caller's."""
    if not interaction.response.is_done():
        await interaction.response.send_message(message, ephemeral=True)
        return
    with contextlib.suppress(discord.HTTPException):   # none (a modal was the answer), or gone
        original = await interaction.original_response()
        if original.flags.loading and not original.flags.ephemeral:
            if public_placeholder is None:
                await interaction.delete_original_response()
            else:
                await interaction.edit_original_response(content=public_placeholder)
    await interaction.followup.send(message, ephemeral=True)


def interaction_age(interaction: discord.Interaction) -> float:
    """Seconds since Discord made the interaction (the time in its id, Discord's clock, against this
    host's), never below 0. A reading that cannot be right (`_note_clock`) is logged, once."""
    age = (discord.utils.utcnow() - interaction.created_at).total_seconds()
    _note_clock(age)
    return max(0.0, age)


_clock_logged = False


def _note_clock(age: float) -> None:
    """Log (once per process, not per interaction) an age the bot should never see before its
    first answer: below -CLOCK_TOLERANCE (this host's clock behind Discord's) or over
    CLOCK_SUSPECT_AFTER (ahead of it, or the event came after Discord's 3 s were over)."""
    global _clock_logged
    if _clock_logged or -CLOCK_TOLERANCE <= age <= CLOCK_SUSPECT_AFTER:
        return
    _clock_logged = True
    log.warning("an interaction reads %.1f s old when the bot gets it: this host's clock is probably %s "
                "Discord's (is it synchronised, e.g. NTP?)%s. The answer window counts from that age, so "
                "answers may come late or be deferred needlessly; logged once.", age,
                "behind" if age < 0 else "ahead of", "" if age < 0 else ", or the event came late (a resume)")


class TooSlow(Exception):
    """The checks before a modal (which cannot follow a defer) did not end within the window."""


async def in_time(interaction: discord.Interaction, work: Awaitable[T], *, defer: str | None,
                  window: float | None = None) -> T:
    """Run `work` (what comes before the first answer: the store's reads, the ban-word check) while
    Discord waits: its 3 s count from the interaction's creation, not from when this handler got
    it. Not done `window` (ANSWER_WINDOW) seconds after that: defer, then wait for it. `defer`:
    "public" (a "thinking…" that becomes the job's reply; a private refusal after it goes through
    `ephemeral`, which removes it) or "private" (every answer is private); None when the answer must
    be a modal, which cannot follow a defer: then `work` is cancelled and TooSlow raised. The wait
    is never under MIN_ANSWER_WAIT for a modal, nor for an age this host's clock got wrong (see
    there). An interaction answered already just waits for `work`."""
    task = asyncio.ensure_future(work)
    try:
        if not interaction.response.is_done():
            age = interaction_age(interaction)
            left = (ANSWER_WINDOW if window is None else window) - age
            if defer is None or age > CLOCK_SUSPECT_AFTER:
                # A modal has no defer to fall back on; an age past Discord's 3 s is this host's
                # clock (the interaction would be dead): MIN_ANSWER_WAIT rather than none.
                left = max(left, MIN_ANSWER_WAIT)
            done, _ = await asyncio.wait({task}, timeout=max(0.0, left))
            if not done:
                if defer is None:
                    raise TooSlow()
                await interaction.response.defer(ephemeral=defer == "private", thinking=True)
        return await task
    finally:
        if not task.done():   # a defer that failed, TooSlow, or we were cancelled: nobody waits for it
            task.cancel()


async def answer_our_error(interaction: discord.Interaction, what: str) -> None:
    """The one handler of our own errors in a button or the Remix modal (call it from `except`):
    logs the exception with `what` failed and who pressed (never the interaction's token or the
    prompt), tells the user privately (OUR_ERROR, a follow-up if the bot had answered already)
    and turns a public "thinking…" placeholder the bot left into FAILED_PLACEHOLDER. Never raises."""
    log.exception("%s failed (user %s, guild %s)", what, interaction.user.id, interaction.guild_id)
    try:
        await ephemeral(interaction, OUR_ERROR, public_placeholder=FAILED_PLACEHOLDER)
    except Exception as exc:   # noqa: BLE001 - e.g. Discord's 15 minutes are over: nothing more to do
        log.warning("could not tell user %s that %s failed: %s", interaction.user.id, what, exc)


def limit_text(queued: int, limit: int, wanted: int = 1) -> str:
    """The refusal when `wanted` more jobs would pass the user's cap of waiting jobs (`queued` waiting
    now, at most `limit`): one wording for the early checks and for the store's QueueLimitReached.
    The limit is this server's, but the store counts the user's waiting jobs in every server, so
    the text says so: someone with nothing waiting here would not see why otherwise. A set larger
    than the limit itself would never fit, however long one waits: that is said instead."""
    everywhere = "Jobs waiting in other servers count too."
    if wanted == 1:
        return (f"You already have {queued} job{'s' if queued != 1 else ''} waiting; the limit is {limit}. "
                f"{everywhere} Wait for one to start, or cancel one (`/queue show` lists yours, those of "
                "other servers first; `/queue cancel job:` works from any server), and try again.")
    if wanted > limit:
        return (f"That prompt makes {wanted} images, but you may have at most {limit} waiting at once here, "
                f"so it can never be queued whole. Use fewer options (at most {limit} combinations). "
                "Nothing was queued.")
    room = max(0, limit - queued)
    return (f"That prompt makes {wanted} images, but you may queue only {room} more right now "
            f"(you have {queued} waiting; the limit is {limit}). {everywhere} Use fewer options, or "
            "wait for some to start. Nothing was queued.")


def picture_gone(job_id: str | None, key: str, *, cancelled: bool = False) -> str:
    """The refusal of a new job that would reuse job `job_id`'s picture `key` (Reroll, Continue)
    when that upload is no longer stored: its job was cancelled while it waited in line (`cancelled`:
    the store drops such a job's pictures at once), or pruned after every job naming it."""
    what = "picture it aims at" if key == "image_prompt" else "picture it starts from"
    of = f" of job `{job_id}`" if job_id else ""
    why = " (the job was cancelled while it waited in line, and its pictures went with it)" if cancelled else ""
    return (f"The {what} (`{OPTION_OF_KEY.get(key, key)}`){of} is gone from the store{why}, so it cannot be "
            "reused. `/imagine` the prompt again with the picture attached.")


PICTURE_NOT_STORED = "Your picture could not be stored, so nothing was queued. Try again."

# A job that starts from a picture needs a worker with the dVAE encoder; while workers run and none
# has one (`imagine-worker --encoder ""`), it would only ever say "queued". An `image` (a picture to
# aim at) and a Continue or Remix (they start from a job's final state) need none.
NO_ENCODER = ("No GPU worker running now can start from a picture (`init_image`): none of them has the "
              "dVAE encoder that it needs, so nothing was queued. Attach the picture as `image` instead "
              "(a picture to aim at, which needs no encoder), or try again in a minute if a worker with "
              "the encoder is restarting.")


def no_encoder_for_reroll(job_id: str) -> str:
    """The Reroll's NO_ENCODER: the job it would repeat starts from its init image."""
    return (f"Job `{job_id}` starts from a picture (`init_image`), and no GPU worker running now has the "
            "dVAE encoder that it needs, so it cannot be rerolled now. Continue or Remix it instead (once it "
            "has finished: they start from its final state and need no encoder), or try again in a minute "
            "if a worker with the encoder is restarting. Nothing was queued.")


def starts_from_init_image(spec: JobSpec) -> bool:
    """Whether the job's first run starts from its init image, through the dVAE encoder: the jobs a
    worker without one passes over (the stores' needs_encoder rule; a parent's state sets the start otherwise)."""
    return isinstance(spec.extra.get("init_image"), dict) and not spec.parent_job_id


_registry_failing = False   # encoder_refusal's last read of the worker registry failed (logged once)


async def encoder_refusal(queue: JobQueue, rerolls: str | None = None) -> str | None:
    """NO_ENCODER (for the Reroll of job `rerolls`: no_encoder_for_reroll) when GPU workers are
    live (claimed, heartbeated or announced themselves within bot.launcher's `worker_window`, the /healthz `workers`
    check's) and none of them can take a job that starts from an init image. None while none is
    live at all (starting, restarting): the job waits for them, as every job does. Advisory: when
    the registry cannot be read, logged (once until a read succeeds) and None, the job queued."""
    global _registry_failing
    from bot.launcher import worker_window   # noqa: PLC0415 - bot.launcher imports this module (via bot.client)
    try:
        live = await queue.workers(max_age=worker_window(queue))
    except Exception:  # noqa: BLE001 - the check only spares a job that would wait; the submit says if the store is down
        if not _registry_failing:
            log.warning("could not read the worker registry, so an init_image job is queued without "
                        "checking for a worker with the dVAE encoder", exc_info=True)
        _registry_failing = True
        return None
    _registry_failing = False
    if live and not any(w.get("init_images", True) for w in live.values()):
        return NO_ENCODER if rerolls is None else no_encoder_for_reroll(rerolls)
    return None


def picture_gone_text(spec: JobSpec, upload_id: str, uploads: attachments.Uploads | None = None) -> str:
    """The refusal for the store's UploadGone at submit. A picture this command stored (`uploads`)
    went each time it was stored again (RESTORE_TRIES): PICTURE_NOT_STORED. Else `picture_gone`:
    the job that `spec` reuses pictures of (a Reroll's, a Continue's), and which of them is gone."""
    if uploads is not None and upload_id in uploads.pngs:
        return PICTURE_NOT_STORED
    key = next((k for k in PICTURE_KEYS if isinstance(spec.extra.get(k), dict)
                and (spec.extra[k].get("artifact") or [None])[0] == upload_id), "image_prompt")
    source = spec.extra.get("rerolls") or spec.parent_job_id
    return picture_gone(str(source) if source else None, key) + " Nothing was queued."


def withheld_refusal(job_id: str, verb: str) -> str:
    """The refusal of a new job from a job cancelled (or being cancelled) for a banned word
    (render.withholds_prompt): its prompt and its final state hold the banned word, and its public
    reply withholds them. Also once the word is removed from the list: the admins cancelled that job.
    Names neither the prompt nor the word."""
    return (f"Job `{job_id}` was cancelled by this server's admins: its prompt matches a banned word, "
            f"so it cannot be {verb}.")


def banned_parent_refusal(job_id: str, verb: str, timed_out: bool = False) -> str:
    """The refusal of a remix of a job whose prompt the server's refused words match now (an entry
    added since it finished, not cancelled by it: withheld_refusal is for those), or of a Reroll of
    a remix of such a job: the remix starts from its picture, and its public reply would quote
    that prompt (render's lineage line). Reroll and Continue of the job itself are refused by the
    same check (ImagineCog.refusal: it is their prompt). Names neither the prompt nor the word, as
    withheld_refusal. `timed_out`: the match ran out of time (moderation.UNCHECKED), no match."""
    if timed_out:
        return (f"The prompt of job `{job_id}` could not be checked against this server's list of refused "
                f"words in time, so it was not {verb}. Try again in a moment. Nothing was queued.")
    return (f"The prompt of job `{job_id}` is refused by this server's list of refused words, so it cannot be "
            f"{verb} (a remix starts from its picture and names its prompt). Nothing was queued.")


def lineage_gone(job_id: str, kind: str | None, parent_id: str | None) -> str:
    """The refusal of a Reroll whose job started from `parent_id`'s final state (a remix, a
    continue) when that state has been pruned: without it the reroll would start from noise.
    `parent_id` None: a remix's parent of another channel, not named (render.FROM_OTHER_CHANNEL),
    as the remix's reply does not name it."""
    parent = f"job `{parent_id}`" if parent_id is not None else render.FROM_OTHER_CHANNEL
    if kind == "remix":
        return (f"Job `{job_id}` is a remix of {parent}, whose final state is gone (pruned), so it "
                "cannot be rerolled from the same start. `/remix` another job or `/imagine` the prompt instead.")
    return (f"Job `{job_id}` continues {parent}, whose final state is gone (pruned), so it cannot be "
            "rerolled from the same start. `/imagine` the prompt instead.")


async def cancel_and_answer(bot: "ImagineBot", interaction: discord.Interaction, record: JobRecord,
                            reason: str | None = None) -> None:
    """Cancel a job the caller may cancel (the Cancel button, `/queue cancel`) and say privately
    what happened: cancelled (it was waiting), stopping (it runs), or it had already ended.

    `reason`: why, stored with the cancel (render.final_text shows it publicly); by default none
    when the caller asked for the job, else render.CANCEL_BY_ADMIN (only an admin may cancel
    another's job: the callers check).

    The store's write may wait seconds (SQLite: behind a worker's checkpoint write), longer than
    Discord's 3 s to answer: an interaction not answered yet is deferred (privately) first. One
    the caller deferred already is answered with follow-ups (`ephemeral`)."""
    if record.state.finished:
        await ephemeral(interaction, f"Job `{record.id}` has already ended ({record.state.value}).")
        return
    if not interaction.response.is_done():
        await interaction.response.defer(ephemeral=True, thinking=True)
    by_author = interaction.user.id == record.spec.user_id
    if reason is None and not by_author:
        reason = render.CANCEL_BY_ADMIN
    # Who, where and whose (the name repr()'d: the user's own text), for "who cancelled my job?".
    log.info("user %s (%r) in server %s cancels job %s (%s) of user %s (%s)", interaction.user.id,
             interaction.user.name, interaction.guild_id, record.id, record.state.value, record.spec.user_id,
             "its author" if by_author else f"not its author; reason {reason!r}")
    ok = await bot.queue.cancel(record.id, reason=reason)
    if bot.progress is not None:
        bot.progress.line_changed()
    # Read again: a worker may have claimed the job since `record` was read, and then it is
    # being stopped, not cancelled in line. Still running now: it was claimed before the cancel.
    # A running job asked to stop ends CANCELLED whatever its worker does next (the store's finish
    # and fail see the request); DONE or FAILED here only from a worker of an older version.
    try:
        now = await bot.queue.get(record.id) or record
    except Exception:  # noqa: BLE001 - the cancel went through: answer from what was read before it
        log.warning("job %s: cancelled, but reading it again failed", record.id, exc_info=True)
        now = record
    if not ok:
        await ephemeral(interaction, f"Job `{record.id}` had already ended.")
    elif now.state == JobState.RUNNING:
        await ephemeral(interaction, f"Stopping job `{record.id}`…")
    elif now.state == JobState.DONE:
        await ephemeral(interaction, f"Job `{record.id}` had already finished.")
    elif now.state == JobState.FAILED:
        await ephemeral(interaction, f"Job `{record.id}` had already failed.")
    else:
        await ephemeral(interaction, f"Cancelled job `{record.id}`.")


async def late_refusal(bot: "ImagineBot", guild_id: int | None, prompts: list[str]) -> str | None:
    """The refused words checked again just before the store's write (ImagineCog.submit,
    permutations.submit_set), against the list as it is now: the first check came before the
    attachments' download (up to ATTACHMENT_TIMEOUT), the defer, the CLIP notes and the cap's read,
    and an entry added meanwhile would let the job through (the add cancels only what its scan of
    the line finds, after its own write). What remains: a job whose list is read here just before
    an add's write, and committed just after that add's scan (bot.moderation.cancel_matching), still
    slips through. That window is this one small read and the match in memory, then the commit:
    milliseconds, longer only while the commit waits behind another write."""
    from bot.moderation import refusal   # noqa: PLC0415
    return await refusal(bot, guild_id, prompts)


def unchecked(refusal_text: str | None) -> bool:
    """Whether late_refusal's answer says the list could not be matched in time (not a match)."""
    from bot.moderation import UNCHECKED   # noqa: PLC0415
    return refusal_text == UNCHECKED


async def over_limit(bot: "ImagineBot", user_id: int, guild_id: int | None = None) -> str | None:
    """Why the user may not queue one more job in `guild_id` (that server's cap, against their
    waiting jobs in every server: the store counts per user), or None. An early answer before
    deferring; the store has the last word (`submit(..., max_queued=)`, see ImagineCog.submit)."""
    limit = await bot.user_limit(guild_id)
    queued = await bot.queue.count_queued(user_id)
    if queued >= limit:
        return limit_text(queued, limit)
    return None


# --- one Continue of a job ---------------------------------------------------------------------

# A Continue goes on exactly as its job would have (the job's seed, optimiser and noise:
# engine.worker), so two Continues of one job are the same picture, twice the GPU time. A Continue
# of a job that has one queued, running or done is answered with where that one is instead.
# Looked for among the channel's latest jobs, first CONTINUE_LOOKBACK[0] of them, then, for an older
# result, CONTINUE_LOOKBACK[1] (see ImagineCog._continued_as).
CONTINUE_LOOKBACK = (50, 1000)


class JobTurns:
    """One turn at a time per job id (an asyncio lock per id, made on first use and dropped once
    nobody holds or waits for it). The Continues of one job hold its turn from the look-up of an
    existing Continue to their submit, so two clicks at once cannot both find none and both queue.
    One bot process answers every click (several processes are not supported: docs/ARCHITECTURE.md),
    so a lock in memory is enough."""

    def __init__(self) -> None:
        self._turns: dict[str, tuple[asyncio.Lock, list[int]]] = {}   # id -> (lock, [holders + waiters])

    def __len__(self) -> int:
        return len(self._turns)

    async def acquire(self, job_id: str) -> None:
        """Wait for the job's turn (cancel it to stop waiting: nothing is held then)."""
        lock, users = self._turns.setdefault(job_id, (asyncio.Lock(), [0]))
        users[0] += 1
        try:
            await lock.acquire()
        except BaseException:
            self._leave(job_id)
            raise

    def release(self, job_id: str) -> None:
        self._turns[job_id][0].release()
        self._leave(job_id)

    def _leave(self, job_id: str) -> None:
        _, users = self._turns[job_id]
        users[0] -= 1
        if users[0] == 0:
            del self._turns[job_id]


def already_continued(job_id: str, child: JobRecord) -> str:
    """The private answer to a Continue of `job_id` when `child` continues it already (queued,
    running or done): where to find it, and that a second one would be the same picture."""
    url = render.reply_url(child.spec)
    where = f"job `{child.id}`" + (f" {url}" if url else "")
    same = "A Continue goes on exactly as the job would have, so another one would be the same picture."
    if child.state == JobState.DONE:
        return (f"Job `{job_id}` was already continued as {where}. {same} Continue that one to go further, "
                "or Reroll it for a different path. Nothing was queued.")
    return (f"Job `{job_id}` is already being continued: {where} ({child.state.value}). {same} Once it is "
            "done, Continue that one to go further. Nothing was queued.")


# --- the cog -------------------------------------------------------------------------------------

class ImagineCog(commands.Cog, name="Imagine"):
    def __init__(self, bot: "ImagineBot"):
        self.bot = bot
        self.queue = bot.queue
        self.command = self._build_command()
        self.more_commands = [self._build_remix_command(), self._build_help_command()]
        self.picture_turns = attachments.UserTurns()   # one command with pictures per user at a time
        self.continue_turns = JobTurns()   # one Continue of a job at a time, its check to its submit

    async def cog_load(self) -> None:
        self.bot.tree.add_command(self.command)
        for command in self.more_commands:
            self.bot.tree.add_command(command)
        # Load CLIP's vocabulary (about a second) in a thread now, not in the first /imagine.
        self._preload = asyncio.ensure_future(clip_notes([]))

    async def cog_unload(self) -> None:
        preload = getattr(self, "_preload", None)
        if preload is not None:
            await asyncio.gather(preload, return_exceptions=True)   # a thread: it cannot be cancelled
        self.bot.tree.remove_command(self.command.name)
        for command in self.more_commands:
            self.bot.tree.remove_command(command.name)

    @commands.Cog.listener("on_interaction")
    async def on_remix_submit(self, interaction: discord.Interaction) -> None:
        """A Remix modal's submit (see RemixModal): the job from the custom id, the prompt from the
        submitted text input, then the same path (and checks) as /remix."""
        if interaction.type != discord.InteractionType.modal_submit:
            return
        data: Any = interaction.data or {}
        match = REMIX_MODAL.fullmatch(str(data.get("custom_id") or ""))
        if match is None or interaction.response.is_done():
            return
        prompt = submitted_value(data.get("components"), REMIX_PROMPT_INPUT) or ""
        try:
            if not_installed_here(interaction):
                await ephemeral(interaction, with_typed_prompt(NOT_INSTALLED, prompt))
                return
            if not may_use_commands(interaction):   # Discord does not check it for a modal's submit
                await ephemeral(interaction, with_typed_prompt(NO_COMMANDS, prompt))
                return
            await self.remix(interaction, match["job_id"], prompt, None, form=True)
        except Exception:   # noqa: BLE001 - a listener's errors reach no one else: log, tell the user
            # Privately; the job's message stays if submit() had already made it (see ephemeral).
            await answer_our_error(interaction, f"the remix modal of job {match['job_id']}")

    def _build_command(self) -> app_commands.Command:
        from bot.permutations import template_chars   # noqa: PLC0415 - permutations imports this module

        cfg = self.bot.config.imagine
        sizes = [app_commands.Choice(name=f"{s}×{s}", value=s) for s in self.bot.config.size_choices]
        qualities = [
            app_commands.Choice(name=f"{name}: {p.size}×{p.size}, {p.iterations} iterations, {p.cutn} cut-outs", value=name)
            for name in PRESET_NAMES for p in [getattr(self.bot.config.presets, name)]
        ]
        cog = self
        # Each picture's prompt (a set's every combination) and a `{…}` set as typed have their own
        # limits. At most 100 characters (Discord's limit for a description): 94 with 6000 and 6000.
        prompt_text = (f"What to imagine: up to {cfg.max_prompt_chars} characters a picture, "
                       f"{template_chars(cfg.max_prompt_chars)} for a {{a, b}} set; CLIP reads ~77 tokens")
        if len(prompt_text) > 100:   # a max_prompt_chars beyond what Discord sends (6000) anyway
            prompt_text = f"What to imagine: up to {cfg.max_prompt_chars} characters a picture"

        # Built here rather than with class decorators: the choices and the limits come from config.
        @app_commands.command(name="imagine", description="Imagine a picture: CLIP steers DALL-E's decoder")
        @app_commands.describe(
            prompt=prompt_text,
            iterations=f"Optimisation steps, 1-{cfg.max_iterations} (default {cfg.default_iterations})",
            seed="Random seed, to repeat a result (default: a new one)",
            size=f"Image size (default {cfg.default_size})",
            quality="A preset of size, iterations and cut-outs; options you give override it",
            image="A picture to aim at as well as the prompt (its CLIP embedding is a target)",
            image_weight="How strongly to aim at the image, -100 to 100 (default 1)",
            init_image="A picture to start from (its DALL-E codes) instead of noise",
        )
        @app_commands.choices(size=sizes, quality=qualities)
        @app_commands.guild_only()
        async def imagine(interaction: discord.Interaction, prompt: str, iterations: Optional[int] = None,
                          seed: Optional[int] = None, size: Optional[int] = None, quality: Optional[str] = None,
                          image: Optional[discord.Attachment] = None, image_weight: Optional[float] = None,
                          init_image: Optional[discord.Attachment] = None) -> None:
            await cog.imagine(interaction, prompt, iterations, seed, size, quality=quality, image=image,
                              image_weight=image_weight, init_image=init_image)

        return imagine

    def _build_remix_command(self) -> app_commands.Command:
        cfg = self.bot.config.imagine
        cog = self

        @app_commands.command(name="remix", description="Start from another job's final picture, toward a new prompt")
        @app_commands.describe(
            job="The job id (under each result, and in /history)",
            prompt=f"The new prompt (up to {cfg.max_prompt_chars} characters)",
            iterations=f"Optimisation steps, 1-{cfg.max_iterations} (default: as many as the job remixed)",
        )
        @app_commands.guild_only()
        async def remix(interaction: discord.Interaction, job: str, prompt: str,
                        iterations: Optional[int] = None) -> None:
            await cog.remix(interaction, pasted_job_id(job), prompt, iterations)

        return remix

    def _build_help_command(self) -> app_commands.Command:
        cog = self

        @app_commands.command(name="help", description="How to use imagine-bot: prompts, buttons, presets, limits")
        async def help_(interaction: discord.Interaction) -> None:
            # The limit is a store read: a private "thinking…" first when it is slow.
            limit = await in_time(interaction, cog.bot.user_limit(interaction.guild_id), defer="private")
            await ephemeral(interaction, help_text(cog.bot.config, limit))

        return help_

    # --- /imagine -----------------------------------------------------------------------------

    async def imagine(self, interaction: discord.Interaction, prompt: str, iterations: int | None,
                      seed: int | None, size: int | None, *, quality: str | None = None,
                      image: discord.Attachment | None = None, image_weight: float | None = None,
                      init_image: discord.Attachment | None = None) -> None:
        problem = results_refusal(interaction)   # first: no prompt could be posted here
        if problem is not None:
            await ephemeral(interaction, problem)
            return
        pictures = [(option, a) for option, a in (("image", image), ("init_image", init_image)) if a is not None]
        try:
            # The image prompt's weight first: the prompt's check takes it (a positive image prompt
            # lets every part of the text be negative: `blurry:-1`).
            if image_weight is not None and image is None:
                raise BadInput("`image_weight` goes with `image`: attach the picture to aim at, or leave the weight out.")
            weight = 1.0 if image_weight is None else float(image_weight)
            if not math.isfinite(weight) or not -100 <= weight <= 100:
                raise BadInput(f"`image_weight` must be between -100 and 100 (you gave {image_weight}).")
            weights = (weight,) if image is not None else ()
            request = validate(self.bot, prompt, iterations, seed, size, quality, image_weights=weights)
            for option, a in pictures:
                attachments.precheck(a, option, self.bot.config.imagine.max_image_bytes)
        except (BadInput, attachments.AttachmentRefused) as exc:
            await ephemeral(interaction, str(exc))
            return
        spec = self._spec(interaction, request.prompt, request.iterations, request.seed, request.grid,
                          request.size, cutn=request.cutn, preset=request.preset)
        if not pictures:
            await self._check_and_submit(interaction, spec, [], weight)
            return
        # With pictures: one such command of a user at a time, from the early checks (the cap) to
        # the submit, so a burst of them cannot all pass the cap and store their pictures.
        if not await self._wait_for_turn(interaction):
            return
        try:
            await self._check_and_submit(interaction, spec, pictures, weight)
        finally:
            self.picture_turns.release(interaction.user.id)

    async def _wait_for_turn(self, interaction: discord.Interaction) -> bool:
        """Wait for the user's turn for a command with pictures (`attachments.UserTurns`): at once
        when they have no other one in flight; else, past the answer window, after a public defer
        (`in_time`: the "thinking…" that becomes the job's reply), for up to TURN_WAIT seconds.
        False (the user was told, privately) when the turn did not come by then. True: the turn is
        held, and the caller releases it.

        The turn belongs to this method until it returns True: every other way out (the refusal,
        a defer that failed, a cancel) goes through the `finally`, which gives back whatever the
        turn task took, now or, if it has not ended yet, once it does (`_give_back_turn`). A
        defer's own timeout (aiohttp's ServerTimeoutError is an asyncio.TimeoutError) is not the
        turn's: only the turn task's TimeoutError (TURN_WAIT passed) is the busy refusal."""
        user_id = interaction.user.id
        turn = asyncio.ensure_future(asyncio.wait_for(self.picture_turns.acquire(user_id), TURN_WAIT))
        handed_over = False
        try:
            try:
                await in_time(interaction, turn, defer="public")
            except Exception:
                if turn.done() and not turn.cancelled() and isinstance(turn.exception(), asyncio.TimeoutError):
                    await ephemeral(interaction, BUSY_WITH_PICTURES)
                    return False
                raise   # the defer failed: our error (the tree's on_error tells the user)
            handed_over = True
            return True
        finally:
            if not handed_over:
                self._give_back_turn(turn, user_id)

    def _give_back_turn(self, turn: asyncio.Future, user_id: int) -> None:
        """Release the user's turn if `turn` took it: at once when it has ended, else when it ends
        (it is cancelled; on Python 3.11 `wait_for` still returns the lock it had just taken)."""
        def give_back(task: asyncio.Future) -> None:
            if not task.cancelled() and task.exception() is None:
                self.picture_turns.release(user_id)

        if turn.done():
            give_back(turn)
        else:
            turn.cancel()
            turn.add_done_callback(give_back)

    async def _check_and_submit(self, interaction: discord.Interaction, spec: JobSpec,
                                pictures: list[tuple[str, discord.Attachment]], weight: float) -> None:
        """/imagine past its input checks: the refusals, the pictures, the submit."""
        # Every refusal first, once (refused words, the user's cap; for a permutation prompt its
        # braces, count and every combination), so a refused prompt leaves no stored upload behind;
        # what it found goes on to submit() / submit_set(), which do not check again. They read the
        # store, so they race Discord's answer window (`in_time`): slower, a public "thinking…" first.
        # A picture to start from first: with no live worker able to take it, nothing else matters.
        if any(option == "init_image" for option, _ in pictures):
            problem = await in_time(interaction, encoder_refusal(self.queue), defer="public")
            if problem is not None:
                await ephemeral(interaction, problem)
                return
        # A permutation prompt (bot/permutations.py), or one with escaped braces (`\{`: parse() unescapes
        # them, and one combination is an ordinary job).
        if "{" in spec.prompt or "}" in spec.prompt:
            from bot.permutations import check_set, submit_set   # noqa: PLC0415
            # The image prompt is not in spec.extra yet (stored once every check has passed): its weight.
            weights = (weight,) if any(option == "image" for option, _ in pictures) else ()
            check = await in_time(interaction, check_set(self.bot, spec, weights), defer="public")
            if check.problem is not None:
                await ephemeral(interaction, check.problem)
                return
        else:
            check = None
            problem = await in_time(interaction, self.refusal(spec), defer="public")
            if problem is not None:
                await ephemeral(interaction, problem)
                return
        # The pictures this command stores: deleted again (those no job names) unless a job was
        # queued: refused by the store (its cap, a picture gone), or any error on the way.
        uploads = attachments.Uploads(self.queue)
        queued = False
        try:
            if pictures and not await self._attach_pictures(interaction, spec, pictures, weight, uploads):
                return
            if check is not None:
                queued = bool(await submit_set(self, interaction, spec, check, uploads=uploads))
            else:
                queued = await self.submit(interaction, spec, checked=True, uploads=uploads) is not None
        finally:
            if not queued:
                await uploads.discard()

    async def _attach_pictures(self, interaction: discord.Interaction, spec: JobSpec,
                               pictures: list[tuple[str, discord.Attachment]], weight: float,
                               uploads: attachments.Uploads) -> bool:
        """Download and check the attachments, store them as artifacts (through `uploads`, which the
        caller discards unless a job is queued) and name them in spec.extra. False when refused (the
        user was told why, privately; nothing is queued). The prompt's refusals come first
        (ImagineCog.imagine): nothing is downloaded for a refused prompt."""
        max_bytes = self.bot.config.imagine.max_image_bytes

        decoding: list[str] = []   # the options whose picture is downloaded and being read: the timeout's words

        async def one(option: str, a: discord.Attachment) -> attachments.CheckedImage:
            data = await attachments.download(a, option, max_bytes)
            decoding.append(option)
            checked = await attachments.check_on_decoders(data, option, max_bytes)
            decoding.remove(option)
            return checked

        work = asyncio.wait_for(asyncio.gather(*(one(o, a) for o, a in pictures)), ATTACHMENT_TIMEOUT)
        try:
            # Discord wants an answer within 3 s of the command: slower, answer (publicly, the job's
            # reply) and go on.
            checked = await in_time(interaction, work, defer="public", window=ATTACHMENT_WINDOW)
        except attachments.AttachmentRefused as exc:
            await ephemeral(interaction, str(exc))
            return False
        except asyncio.TimeoutError:
            await ephemeral(interaction, attachments.timeout_text(decoding))
            return False
        # Storing is a write: it may wait seconds behind a worker's (SQLite), so Discord gets its
        # answer first: the public "thinking…" that becomes the job's reply.
        if not interaction.response.is_done():
            await interaction.response.defer(thinking=True)
        notes = []
        for picture in checked:
            ref = await uploads.store(picture)
            key = attachments.SPEC_KEYS[picture.option]
            spec.extra[key] = {"artifact": ref, "weight": weight} if key == "image_prompt" else {"artifact": ref}
            notes += [f"`{picture.option}`: {note}" for note in picture.notes]
        if notes:
            spec.extra["notes"] = notes
        return True

    def _spec(self, interaction: discord.Interaction, prompt: str, iterations: int, seed: int, grid: int,
              size: int, **more: Any) -> JobSpec:
        cfg = self.bot.config.imagine
        more.setdefault("cutn", cfg.cutn)
        return JobSpec(
            prompt=prompt, user_id=interaction.user.id, channel_id=interaction.channel_id or 0,
            guild_id=interaction.guild_id, iterations=iterations, seed=seed, grid=grid,
            frame_every=cfg.frame_every, extra={"size": size}, **more,
        )

    async def refusal(self, spec: JobSpec) -> str | None:
        """Why this one job may not be queued: the server's refused words (bot/moderation.py), then
        the user's cap; None when it may go."""
        from bot.moderation import refusal   # noqa: PLC0415
        return (await refusal(self.bot, spec.guild_id, [spec.prompt])
                or await over_limit(self.bot, spec.user_id, spec.guild_id))

    async def submit(self, interaction: discord.Interaction, spec: JobSpec, *, checked: bool = False,
                     uploads: attachments.Uploads | None = None, typed: str | None = None) -> JobRecord | None:
        """Check the job (unless the caller has: `checked`), defer, queue it within the user's cap and
        show its place in line; None when refused (the user was told why, privately). `uploads`: the
        pictures this command stored (stored again if the submit finds one gone; the caller
        discards them when nothing was queued). `typed`: the Remix form's prompt, quoted back in
        every refusal (with_typed_prompt)."""
        def told(message: str) -> str:
            return message if typed is None else with_typed_prompt(message, typed)

        if not checked:
            problem = await in_time(interaction, self.refusal(spec), defer="public")
            if problem:
                await ephemeral(interaction, told(problem))
                return None
        if not interaction.response.is_done():   # attachments may have made us defer already
            await interaction.response.defer(thinking=True)
        await add_clip_notes(spec)
        max_queued = await self.bot.user_limit(spec.guild_id)
        if problem := await late_refusal(self.bot, spec.guild_id, [spec.prompt]):
            await ephemeral(interaction, told(problem))   # private, after the defer; the caller discards `uploads`
            return None
        try:   # the store counts and queues in one step: the cap holds against a racing command
            if uploads is not None:
                record = await uploads.submit(lambda: self.queue.submit(spec, max_queued=max_queued))
            else:
                record = await self.queue.submit(spec, max_queued=max_queued)
        except QueueLimitReached as exc:
            await ephemeral(interaction, told(limit_text(exc.queued, exc.limit)))   # private, after the defer
            return None
        except ParentGone as exc:   # pruned since our has_artifact check: the store refused it, nothing queued
            await ephemeral(interaction, told(f"The final state of job `{exc.job_id}` is gone (pruned), so nothing "
                                              "was queued. `/imagine` its prompt again instead."))
            return None
        except UploadGone as exc:   # a carried picture gone since our has_artifact check (its job cancelled,
            # pruned), or ours, gone each time it was stored again
            await ephemeral(interaction, told(picture_gone_text(spec, exc.upload_id, uploads)))
            return None
        progress = self.bot.progress
        if progress is not None:
            progress.register(record, interaction)
        # From here on the job is queued and its tracker registered: whatever fails below, the
        # tracker is attached (finally), so its progress and result still reach the user.
        message_id = channel_id = None
        content: str | None = None
        unsaved: dict[str, Any] | None = None
        try:
            try:
                position: int | None
                if progress is not None:   # counted as its later redraws count it
                    places, pauses = await progress.places()
                    position, paused = places.get(record.id), pauses.get(record.spec.guild_id, "")
                else:
                    position = await self.queue.position(record.id)
                    paused = await pause_of(self.queue, record.spec.guild_id)
            except Exception:  # noqa: BLE001 - a queue outage: show the reply without the place in line
                log.exception("job %s: could not read its place in line", record.id)
                position, paused = None, ""
            content = render.queued_text(record, position, paused)
            try:
                message = await interaction.edit_original_response(content=content, view=progress_view(record.id))
                message_id, channel_id = message.id, message.channel.id
                reply = {"channel_id": channel_id, "message_id": message_id, "guild_id": interaction.guild_id,
                         "upload_limit": interaction.filesize_limit}
                record.spec.reply = reply
                unsaved = await write_reply(self.queue, record.id, reply)   # a restart must find the reply
            except Exception:  # noqa: BLE001 - Discord's error or the network's (aiohttp, a timeout, not wrapped
                # by discord.py): the job is queued; its tracker (attached below) shows it through the
                # token, and the user is not told to try again (a second job)
                log.exception("job %s: could not show its queued reply", record.id)
        finally:
            if progress is not None:
                progress.attach(record.id, channel_id, message_id, content if message_id else None,
                                unsaved_reply=unsaved)
        return record

    # --- buttons ------------------------------------------------------------------------------

    async def from_button(self, interaction: discord.Interaction, job_id: str, kind: str) -> None:
        """Reroll: the job again with a new seed, from the same start: its image prompt and init image
        (`spec.extra`, the same uploads), and for a remix or a continue the same parent's final state.
        Continue: more steps from the finished job's final state (`state.pt`, checked here), toward
        the same targets (the prompt and the image prompt). Both within today's limits: a button
        made before an admin lowered them must not queue what /imagine would refuse. The store's
        reads and the checks race Discord's answer window (`in_time`).

        A job continued already (queued, running or done) is not continued again: that would be the
        same picture (see CONTINUE_LOOKBACK); the click is told where that Continue is. The
        Continues of one job take turns (`continue_turns`) from that look-up to their submit, so of
        two clicks at once the second finds the first's job. Its wait for the turn is inside
        `in_time`: a long one defers first."""
        problem = results_refusal(interaction)
        if problem is not None:
            await ephemeral(interaction, problem)
            return
        turns, held = self.continue_turns, False

        async def checked() -> JobSpec | str:
            nonlocal held
            if kind == "continue":
                await turns.acquire(job_id)
                held = True   # given back below, whatever happens (also if this task is cancelled)
            return await self._button_spec(interaction, job_id, kind)

        try:
            found = await in_time(interaction, checked(), defer="public")
            if isinstance(found, str):
                await ephemeral(interaction, found)
                return
            await self.submit(interaction, found, checked=True)
        finally:
            if held:   # queued (or refused) by now: the next Continue of this job finds it
                turns.release(job_id)

    async def _button_spec(self, interaction: discord.Interaction, job_id: str, kind: str) -> JobSpec | str:
        """The new job of a Reroll or Continue of `job_id`, checked (refused words, the user's cap),
        or why it may not be queued (for the user)."""
        parent = await self.queue.get(job_id)
        # A job of another server or of a channel the caller cannot see (a forged custom id: the
        # buttons Discord shows name this channel's jobs) reads exactly as an unknown id: its
        # prompt, uploads and final state belong to that channel, not to whoever has the id.
        if parent is None or not await can_see_job(interaction, parent):
            return f"Job `{job_id}` is no longer in the store, so it cannot be reused."
        p = parent.spec
        verb = "rerolled" if kind == "reroll" else "continued"
        if render.withholds_prompt(parent):   # (a DONE one too: its worker finished before it saw the cancel)
            return withheld_refusal(job_id, verb)
        try:
            # Its prompt as /imagine checks one today (the length limit, the weights), e.g. after an
            # admin lowered max_prompt_chars: the refused words are matched only up to that limit.
            # As stored its braces are literal: escaped, so that they are not read as a set again.
            checked_prompt(self.bot, escape_braces(p.prompt), image_weights_of(p), strict=False)
        except BadInput as exc:
            return f"Job `{job_id}` cannot be {verb} within today's limits. {exc}"
        problem = self.size_problem(p, job_id, verb)
        if problem:
            return problem
        # The label of the parent's grid, not the parent's label: a job queued under an old config
        # (`"256" = 8`) says 256 for a 64-pixel picture; the config now requires key = 8 × grid.
        size = p.grid * PIXELS_PER_CELL
        max_iterations = self.bot.config.imagine.max_iterations
        if kind == "reroll":
            spec = self._spec(interaction, p.prompt, min(p.iterations, max_iterations), random.randint(0, SEED_MAX),
                              p.grid, size, parent_kind="reroll", cutn=p.cutn, preset=p.preset)
            carried = carried_pictures(p, PICTURE_KEYS)
            if p.parent_kind in ("remix", "continue") and p.parent_job_id:
                # A remix or a continue starts from another job's final state: so does its reroll,
                # or it would start from noise and show a different picture from the same settings.
                if not await self.queue.has_artifact(p.parent_job_id, "state.pt"):
                    # A remix's parent of another channel is not named (the clicker may not see it),
                    # as the remix's reply and the Reroll's (carried_source) do not name it.
                    recorded = p.extra.get("parent")
                    recorded = recorded if isinstance(recorded, dict) else {}
                    elsewhere = p.parent_kind == "remix" and bool(carried_source(
                        recorded, interaction.channel_id or 0, p.channel_id).get(render.OTHER_CHANNEL))
                    return lineage_gone(job_id, p.parent_kind, None if elsewhere else p.parent_job_id)
                if await self._withheld(p.parent_job_id):   # its start is that job's final state
                    # (Not named: a remix's parent may be of a channel the clicker cannot see.)
                    return (f"Job `{job_id}` starts from the final state of a job this server's admins "
                            "cancelled (its prompt matches a banned word), so it cannot be rerolled.")
                if p.parent_kind == "remix":
                    # As /remix of that job today (_remix_parent): its picture, and its prompt in
                    # the reroll's lineage line. (A continue's prompt is its own: self.refusal.)
                    source = await self.queue.get(p.parent_job_id)
                    banned = source is not None and await late_refusal(self.bot, interaction.guild_id,
                                                                       [source.spec.prompt])
                    if banned:
                        return (f"Job `{job_id}` starts from the picture of a job whose prompt "
                                + ("could not be checked against this server's list of refused words in "
                                   "time, so it was not rerolled. Try again in a moment."
                                   if unchecked(banned) else
                                   "is refused by this server's list of refused words, so it cannot be "
                                   "rerolled.") + " Nothing was queued.")
                spec.parent_job_id, spec.parent_kind = p.parent_job_id, p.parent_kind
                if p.parent_kind == "remix" and isinstance(p.extra.get("parent"), dict):
                    spec.extra["parent"] = carried_source(p.extra["parent"], spec.channel_id, p.channel_id)
        else:
            if parent.state != JobState.DONE:
                return "Only a finished job can be continued."
            child = await self._continued_as(parent, interaction.channel_id or 0)
            if child is not None:
                return already_continued(job_id, child)
            if not await self.queue.has_artifact(job_id, "state.pt"):
                return (f"The final state of job `{job_id}` is gone (pruned), so it cannot be "
                        "continued. Reroll it or `/imagine` its prompt again instead.")
            more = min(self.bot.config.imagine.continue_iterations or p.iterations, max_iterations)
            spec = self._spec(interaction, p.prompt, more, p.seed if p.seed is not None else 0, p.grid, size,
                              parent_job_id=job_id, parent_kind="continue", cutn=p.cutn, preset=p.preset)
            # The init image only set the parent's start; the image prompt is a target all along.
            carried = carried_pictures(p, ("image_prompt",))
        for key, ref in carried.items():
            upload_id, name = ref["artifact"]
            if not await self.queue.has_artifact(upload_id, name):
                # Cancelled while it waited in line (not running: started_at is unset in line).
                cancelled = parent.state == JobState.CANCELLED and parent.started_at is None
                return picture_gone(job_id, key, cancelled=cancelled)
        spec.extra.update(carried)   # the same uploads: submit records the new job's references to them
        if kind == "reroll":
            spec.extra["rerolls"] = job_id
        source_url = render.reply_url(p)
        if source_url:   # the link of its lineage line (render.lineage_lines)
            spec.extra["source_url"] = source_url
        if starts_from_init_image(spec) and (problem := await encoder_refusal(self.queue, rerolls=job_id)):
            return problem
        return await self.refusal(spec) or spec

    async def _continued_as(self, parent: JobRecord, channel_id: int) -> JobRecord | None:
        """The Continue of `parent` already queued, running or done in this channel, if any: not a
        Reroll of one (its own seed: a different picture), nor one failed, cancelled or being
        cancelled (no picture to point to).

        Looked for among the channel's latest jobs, newest first, down to `parent` itself. That is
        enough for clicks on a result: a click comes from the channel of the message it is on,
        which is where its Continue is queued (`_spec`: the interaction's channel), and a Continue
        is queued after the job it continues finished, so once the search reaches `parent` it has
        seen every Continue made from that message. The search reads CONTINUE_LOOKBACK[0] jobs,
        and only for an older result (the channel moved on) CONTINUE_LOOKBACK[1]. A result older
        than that is not searched further: its Continue is queued again, which costs GPU time but
        no correctness. The store has no look-up by parent (Redis indexes only the queued and
        running children, for prune), and this needs none."""
        for limit in CONTINUE_LOOKBACK:
            records = await self.queue.history(channel_id, limit=limit)
            for record in records:
                if record.id == parent.id:
                    return None
                spec = record.spec
                if (spec.parent_job_id == parent.id and spec.parent_kind == "continue" and not spec.extra.get("rerolls")
                        and (record.state == JobState.DONE
                             or record.state in (JobState.QUEUED, JobState.RUNNING) and not record.cancel_requested)):
                    return record
            if len(records) < limit:      # the channel's every job seen
                return None
        return None

    async def _withheld(self, job_id: str) -> bool:
        """Whether job `job_id` (still in the store) was cancelled for a banned word."""
        record = await self.queue.get(job_id)
        return record is not None and render.withholds_prompt(record)

    def size_problem(self, p: JobSpec, job_id: str, verb: str) -> str | None:
        """Why a new job on `p`'s grid may not be queued: a grid no size offers any more (an admin
        took it out of `[imagine] sizes`, e.g. for its cost), or None. A job from another's state
        keeps that state's grid, so there is no other size to fall back to: refused, not shrunk."""
        sizes = self.bot.config.imagine.sizes
        if p.grid in sizes.values():
            return None
        size = p.grid * PIXELS_PER_CELL   # what its pictures are (its own label may be an old config's)
        return (f"Job `{job_id}` is {size}×{size}, a size no longer offered here (now {', '.join(sizes)}), "
                f"so it cannot be {verb}. `/imagine` its prompt at one of those sizes instead.")

    # --- remix --------------------------------------------------------------------------------

    async def _remix_parent(self, interaction: discord.Interaction, job_id: str) -> JobRecord | str:
        """The job to remix, if the caller may see it (its server and channel), it has finished, its
        final state is there, its size is still offered and its prompt is not refused here now; else
        why not (for the user)."""
        shown = render.quote(job_id, 64)
        parent = await self.queue.get(job_id) if re.fullmatch(JOB_ID, job_id) else None
        # Who may see it (a private thread's member the bot has not cached: a Discord lookup),
        # whether its state is there and whether the server's refused words match its prompt now
        # (an entry added since it finished), at once: the Remix button has Discord's window and
        # no defer. The last is the check a Reroll or Continue of it gets (ImagineCog.refusal).
        visible, has_state, banned = (False, False, None) if parent is None else await asyncio.gather(
            can_see_job(interaction, parent), self.queue.has_artifact(job_id, "state.pt"),
            late_refusal(self.bot, interaction.guild_id, [parent.spec.prompt]))
        # A job of another server or of a channel the caller cannot see reads exactly as an unknown
        # id: its prompt, author and final picture belong to that channel, not to whoever has the id.
        if parent is None or not visible:
            return (f"There is no job {shown} you can see in this server (or it has been "
                    "pruned), so there is nothing to remix. The ids are under each result "
                    "and in `/history`.")
        if render.withholds_prompt(parent):   # before its state: a DONE one has a final state too
            return withheld_refusal(job_id, "remixed")
        if banned:   # its picture is that prompt's, and the remix's public reply would quote it
            return banned_parent_refusal(job_id, "remixed", timed_out=unchecked(banned))
        if parent.state != JobState.DONE:
            return (f"Job {shown} has not finished ({parent.state.value}): only a finished "
                    "picture can be remixed.")
        if not has_state:
            return (f"The final state of job {shown} is gone (pruned), so it cannot be "
                    "remixed. `/imagine` its prompt again instead.")
        problem = self.size_problem(parent.spec, job_id, "remixed")   # the remix keeps the parent's grid
        return problem if problem else parent

    async def remix_button(self, interaction: discord.Interaction, job_id: str) -> None:
        """The Remix form, or why there is none. Its answer is the modal, which cannot follow a
        defer, so only reads come first, and only small ones: the job's row (`queue.get`: the
        prompt to pre-fill, the server, the state) and whether its `state.pt` exists
        (`has_artifact`: an indexed lookup, no data read), the latter alongside the check that the
        presser may see the job (for a private thread's member the bot has not cached, one Discord
        lookup), and the match of the server's refused words against its prompt (the list: one more
        small read). Alongside them, the presser's cap (`over_limit`: their server's limit and their
        count of waiting jobs, two more small reads), so that a form they could not send is not
        offered. On SQLite all go through the reader
        connection, which never waits behind a write (WAL); on Redis, one HGETALL and one HEXISTS
        (and the cap's GET and count), which retry through a reconnect: reads not done within
        Discord's answer window get a private "try again" (REMIX_TOO_SLOW) instead of no answer at
        all. Everything else (the prompt's checks, the cap again, the write) waits for the submit."""
        problem = results_refusal(interaction)   # before the form: no typing for a refusal
        if problem is not None:
            await ephemeral(interaction, problem)
            return

        async def checked() -> JobRecord | str:
            found, over = await asyncio.gather(self._remix_parent(interaction, job_id),
                                               over_limit(self.bot, interaction.user.id, interaction.guild_id))
            return found if isinstance(found, str) else over or found   # the job's refusal first

        try:
            found = await in_time(interaction, checked(), defer=None)
        except TooSlow:
            log.warning("the Remix button of job %s: the store's reads took longer than %.1f s; told to retry",
                        job_id, ANSWER_WINDOW)
            await ephemeral(interaction, REMIX_TOO_SLOW)
            return
        if isinstance(found, str):
            await ephemeral(interaction, found)
            return
        modal = RemixModal(job_id, found.spec.prompt, self.bot.config.imagine.max_prompt_chars)
        await interaction.response.send_modal(modal)

    async def remix(self, interaction: discord.Interaction, job_id: str, prompt: str, iterations: int | None,
                    *, form: bool = False) -> None:
        """A new job from `job_id`'s final logits toward `prompt` (anyone may remix anyone's job).
        The store's reads and the checks race Discord's answer window (`in_time`). `form`: the
        prompt was typed into the Remix form, so every refusal quotes it back (with_typed_prompt)."""
        def told(message: str) -> str:
            return with_typed_prompt(message, prompt) if form else message

        problem = results_refusal(interaction)
        if problem is not None:
            await ephemeral(interaction, told(problem))
            return
        if has_set_braces(prompt):
            # Sent on, CLIP would read the braces and every option as words of one prompt. Escaped
            # ones (`\{`, `\}`) are literal braces, as in /imagine; the Remix form's pre-filled text
            # (the parent's prompt) has its braces escaped (RemixModal).
            await ephemeral(interaction, told(REMIX_NO_SETS))
            return
        found = await in_time(interaction, self._remix_spec(interaction, job_id, prompt, iterations), defer="public")
        if isinstance(found, str):
            await ephemeral(interaction, told(found))
            return
        await self.submit(interaction, found, checked=True, typed=prompt if form else None)

    async def _remix_spec(self, interaction: discord.Interaction, job_id: str, prompt: str,
                          iterations: int | None) -> JobSpec | str:
        """The remix's job, checked (the parent, the prompt, refused words, the user's cap), or why
        it may not be queued (for the user). It aims at the parent's image prompt too, as a Continue
        does (the same upload, the same weight): a target all along, and a positive one is what let a
        negative-only prompt (`blurry:-1`) through, also when the form sends that prompt back. Not
        the init image: a remix starts from the parent's final state. (/remix has no picture option
        of its own.) Only a parent of this very channel's: another channel's picture stays there, as
        its prompt does (remix_source). An image prompt gone from the store (only a store's loss: the
        parent names it) is left out, not a refusal: the parent's final state is what a remix needs."""
        parent = await self._remix_parent(interaction, job_id)
        if isinstance(parent, str):
            return parent
        p = parent.spec
        if iterations is None:
            iterations = min(p.iterations, self.bot.config.imagine.max_iterations)
        source = remix_source(p, interaction.channel_id or 0)
        carried = {} if source.get(render.OTHER_CHANNEL) else carried_pictures(p, ("image_prompt",))
        for key, ref in list(carried.items()):
            if not await self.queue.has_artifact(*ref["artifact"]):
                log.warning("remix of job %s: its %s upload %s is gone from the store; the remix goes without it",
                            job_id, key, ref["artifact"][0])
                del carried[key]
        try:
            # remix() refused braces that open or close a set: any left are escaped (`\{`), literal.
            # Its prompt's weights included, with the carried image prompt's.
            request = validate(self.bot, prompt, iterations, None, None,
                               image_weights=image_weights_of(p) if carried else ())
        except BadInput as exc:
            return str(exc)
        # The parent's grid and cut-outs: the logits' shape is the parent's; so its preset's label,
        # as a Reroll's and a Continue's. (Its size label: the grid's, see _button_spec.)
        spec = self._spec(interaction, unescape_braces(request.prompt), request.iterations, request.seed,
                          p.grid, p.grid * PIXELS_PER_CELL,
                          cutn=p.cutn, parent_job_id=job_id, parent_kind="remix", preset=p.preset)
        spec.extra.update(carried)   # the same upload: submit records the new job's reference to it
        # Named in full only to the parent's own channel: the remix's reply is public where it is made.
        spec.extra["parent"] = source
        return await self.refusal(spec) or spec

    async def cancel_job(self, interaction: discord.Interaction, job_id: str) -> None:
        admin = is_admin(interaction, self.bot.config)

        async def find() -> JobRecord | None:
            """The job, if the caller may know of it (/queue cancel's rule; a private thread's may
            ask Discord: inside the answer window)."""
            record = await self.queue.get(job_id)
            return record if record is not None and await may_know_job(interaction, record, admin=admin) else None

        # Every answer is private: a private "thinking…" first when the store's read is slow.
        record = await in_time(interaction, find(), defer="private")
        if record is None:
            # Unknown, or another server's job or a hidden channel's (a forged custom id: the
            # buttons Discord shows name this channel's jobs): its existence is not confirmed.
            await ephemeral(interaction, f"There is no job `{job_id}`.")
            return
        # (Not theirs: then it is of this server, found through `admin` or its channel.)
        if interaction.user.id != record.spec.user_id and not admin:
            await ephemeral(interaction, "Only the person who asked for this image, or an admin, can cancel it.")
            return
        await cancel_and_answer(self.bot, interaction, record)
