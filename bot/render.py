"""Message texts: pure functions of a job and its progress, so tests can check them directly.

Prompts are echoed with Markdown escaped and links defanged (`defang_links`: shown as typed, never
a link, an embed or an invite card); mentions in them (`@everyone`, `<@id>`) are shown as
typed and never ping, because the client sends `allowed_mentions` with nothing allowed. An echoed
prompt is also made harmless to the text around it (`tame`, engine.text's rules): one line, no
bidi embeddings, overrides or isolates (they would reorder the job id and mention after it), and
at most MAX_MARKS combining marks in a row (zalgo piles up over other messages). The stored prompt
is as typed.

User text quoted in a refusal or an answer (a matched refused word, a permutation combination, a
job id or file name as given) goes through `quote`: tamed, cut, in an inline code span. A whole
prompt to copy back (a refused Remix form's) goes through `copyable`: a code block.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import discord

from engine.jobs import CLEARED, JobRecord, JobSpec, JobState
from engine.prompts import PromptError, parse_prompt
from engine.text import MAX_MARKS, clip, has_visible_text, tame  # noqa: F401 - re-exported: the bot's echo rules

CONTENT_LIMIT = 2000
CLIP_TOKENS = 77
MAX_CLIP_NOTES = 3       # lines naming what CLIP ignores; more parts cut are counted in one line
CLIP_NOTE_CHARS = 220    # clip_overflow's note quotes at most 40 + 60 characters of the prompt


def size_of(spec: JobSpec) -> int:
    size = spec.extra.get("size")
    return int(size) if isinstance(size, int) else spec.grid * 8


# Links in echoed prompts are defanged: `https://x` is sent as `https\://x` and `discord.gg/x` as
# `discord.gg\/x`. Discord shows the escaped character without its backslash (the text reads as
# typed) but neither makes a link of it nor unfurls it (no embed, no invite card): a prompt cannot
# turn the bot's public reply, /queue or a contact sheet into a live link or an invite.
_SCHEME = re.compile(r"(?<=[A-Za-z0-9+.-])://")
_INVITE = re.compile(r"(?i)\b(discord(?:app)?\.com/invite|discord\.gg|discord\.me|dsc\.gg)/")


def defang_links(text: str) -> str:
    """`text` (Markdown-escaped already) with every `scheme://` and invite host's `/` escaped."""
    return _INVITE.sub(r"\1\\/", _SCHEME.sub(r"\\://", text))


def escape_prompt(prompt: str) -> str:
    """A prompt for Markdown text: tamed, Markdown escaped, links defanged (defang_links)."""
    # ignore_links=False: a defanged URL is plain text, so its `_`, `*` or `~` must not turn into Markdown.
    return defang_links(discord.utils.escape_markdown(tame(prompt), as_needed=False, ignore_links=False))


def snippet(prompt: str, limit: int = 60) -> str:
    """`prompt` tamed, cut to `limit` characters, Markdown escaped (for bold or italic text)."""
    return escape_prompt(clip(prompt, limit))


_SURROGATE = re.compile(r"[\ud800-\udfff]")   # a lone surrogate: no character


def quote(text: str, limit: int = 40) -> str:
    """User text for a refusal (or any answer that repeats it): tamed, cut to `limit` characters,
    as inline code (shown literally, Markdown and mentions included; a backtick inside becomes a
    look-alike). The one way the bot quotes what a user typed.

    A lone surrogate (no character: JSON carries it, UTF-8 cannot) shows as U+FFFD. Text that
    shows nothing once tamed (empty, only spaces, only invisible characters) is named instead,
    in italics: an empty span would show as two literal backticks, a blank one as nothing."""
    flat = _SURROGATE.sub("\ufffd", clip(text, limit))
    if not has_visible_text(flat):
        return "*(empty)*" if not flat else "*(only invisible characters)*"
    return "`" + flat.replace("`", "ˋ") + "`"


def copyable(text: str) -> str:
    """User text in a code block, to copy back (a refused Remix form's prompt: Discord keeps no copy
    of a submitted form). Tamed (one line: CLIP reads white space runs as one space anyway), a lone
    surrogate as U+FFFD, and a run of three or more backticks (which would end the block early)
    as look-alikes; single and double backticks stay as typed. Mentions in it never ping."""
    flat = _SURROGATE.sub("\ufffd", tame(text))
    flat = re.sub(r"`{3,}", lambda run: "ˋ" * len(run[0]), flat)
    return f"```\n{flat}\n```"


WEIGHT_PART_CHARS = 24   # of each part's text in the weights as read (`weights_read`)


def weights_read(spec: JobSpec) -> str | None:
    """How the prompt's weights were read (engine.prompts.parse_prompt), e.g. `a cat ×2 · blurry ×-1`,
    each part's text cut to WEIGHT_PART_CHARS, as inline code; None when every part weighs 1 (or
    the stored prompt no longer parses). At most MAX_PROMPT_PARTS parts: short enough for the reply."""
    image = spec.extra.get("image_prompt")
    image_weights = (float(image.get("weight", 1.0)),) if isinstance(image, dict) else ()
    try:
        parts = parse_prompt(spec.prompt, image_weights, strict=False)   # as the worker reads it
    except PromptError:
        return None
    if all(part.weight == 1.0 for part in parts):
        return None
    text = " · ".join(f"{clip(part.text, WEIGHT_PART_CHARS)} ×{part.weight:g}" for part in parts)
    return "`" + _SURROGATE.sub("\ufffd", text).replace("`", "ˋ") + "`"


def settings_line(spec: JobSpec) -> str:
    size = size_of(spec)
    parts = [f"seed {spec.seed}", f"{spec.iterations} iterations", f"{size}×{size}"]
    if spec.preset:
        parts.append(f"quality {spec.preset}")
    image = spec.extra.get("image_prompt")
    if isinstance(image, dict):
        parts.append(f"image prompt ×{float(image.get('weight', 1.0)):g}")
    if isinstance(spec.extra.get("init_image"), dict):
        parts.append("init image")
    return " · ".join(parts)


def reply_url(spec: JobSpec) -> str | None:
    """The link to the message that shows `spec`'s job (its result message, else its reply); None
    while it has none."""
    reply = spec.reply or {}
    message_id = reply.get("result_message_id") or reply.get("message_id")
    if not message_id:
        return None
    return jump_url(spec.guild_id, int(reply.get("channel_id") or spec.channel_id), int(message_id))


_JUMP_URL = re.compile(r"https://discord\.com/channels/(?:\d+|@me)/(?P<channel>\d+)/\d+")


def url_channel(url: object) -> int | None:
    """The channel of a link made by `jump_url`; None for anything else."""
    match = _JUMP_URL.fullmatch(url) if isinstance(url, str) else None
    return int(match["channel"]) if match else None


# Lineage: where a job came from, one line per job it names (a fresh /imagine has none).
#   ↻ reroll of `R`                        a Reroll of R (spec.extra["rerolls"]): R's settings, a new seed
#   → continues `B`                        a Continue of B (parent_kind "continue", not a reroll)
#   ↳ remix of `P` *<prompt>* by <@user>   a remix of P (parent_kind "remix"; a Reroll of a remix has it too)
#   ↳ remix of a job from another channel  a remix of a job of another channel (OTHER_CHANNEL below)
# In a job's own messages (`details`) each line ends with the link to that job's message (spec.extra:
# "source_url" for a Reroll or Continue, the remix's "parent"), and a Reroll of a Continue also names
# the job both start from. The mention never pings: the client allows no mentions. /history shows the
# short form (`details=False`), and only what its reader may see (`hidden`).
#
# A job's messages are public in its channel, so a remix records its parent's id, prompt, author and
# link (`extra["parent"]`) only when the parent is of the remix's own channel (bot.imagine.
# remix_source). A parent of another channel (a private one, or a thread: its own channel) is
# recorded as {OTHER_CHANNEL: True, "channel_id": <its channel>}: the reply says only that much, and
# /history names the job (its id) to a reader who may see that channel.
REROLL, CONTINUE, REMIX = "reroll", "continue", "remix"
HIDDEN_JOB = "a job you cannot see"
OTHER_CHANNEL = "other_channel"
FROM_OTHER_CHANNEL = "a job from another channel"


def lineage(spec: JobSpec) -> list[tuple[str, str]]:
    """The jobs `spec`'s lineage lines name, in their order: (kind, job id) pairs."""
    out = []
    rerolls = spec.extra.get("rerolls")
    if isinstance(rerolls, str) and rerolls:
        out.append((REROLL, rerolls))
    elif spec.parent_kind == "continue" and spec.parent_job_id:
        out.append((CONTINUE, spec.parent_job_id))
    if spec.parent_kind == "remix" and spec.parent_job_id:
        out.append((REMIX, spec.parent_job_id))
    return out


def lineage_lines(spec: JobSpec, *, details: bool = True, hidden: frozenset[str] | set[str] = frozenset()) -> list[str]:
    """`spec`'s lineage lines (see above). `details=False`: each names its job (and a remix its
    author) only. A job in `hidden` (one the reader may not see) is named as HIDDEN_JOB, without id,
    prompt, author or link."""
    lines = []
    url = spec.extra.get("source_url") if details and isinstance(spec.extra.get("source_url"), str) else None
    for kind, job_id in lineage(spec):
        if kind == REROLL:
            if job_id in hidden:
                lines.append(f"↻ reroll of {HIDDEN_JOB}")
                continue
            text = f"↻ reroll of `{job_id}`"
            if details and spec.parent_kind == "continue" and spec.parent_job_id:
                text += f", which continues `{spec.parent_job_id}`"   # where both start from
            lines.append(text + (f" · {url}" if url else ""))
        elif kind == CONTINUE:
            lines.append(f"→ continues {HIDDEN_JOB}" if job_id in hidden
                         else f"→ continues `{job_id}`" + (f" · {url}" if url else ""))
        else:
            lines.append(_remix_line(spec, job_id, details=details, hidden=job_id in hidden))
    return lines


def quoted_prompts(spec: JobSpec) -> list[str]:
    """The prompts a job's public reply quotes: its own, and a remix's parent's (its lineage line,
    `_remix_line`, unless the parent is of another channel)."""
    parent = spec.extra.get("parent") if isinstance(spec.extra.get("parent"), dict) else {}
    if parent.get("prompt") and not parent.get(OTHER_CHANNEL):
        return [spec.prompt, str(parent["prompt"])]
    return [spec.prompt]


def _remix_line(spec: JobSpec, job_id: str, *, details: bool, hidden: bool) -> str:
    if hidden:
        return f"↳ remix of {HIDDEN_JOB}"
    parent = spec.extra.get("parent") if isinstance(spec.extra.get("parent"), dict) else {}
    if parent.get(OTHER_CHANNEL):
        # Public (`details`): not which job; /history (`details=False`): its reader may see it (`hidden`).
        return f"↳ remix of {FROM_OTHER_CHANNEL}" if details else f"↳ remix of `{job_id}`"
    text = f"↳ remix of `{job_id}`"
    if details and parent.get("prompt"):
        text += f" *{snippet(str(parent['prompt']), 60)}*"
    if parent.get("user_id"):
        text += f" by <@{int(parent['user_id'])}>"
    if details and parent.get("url"):
        text += f" · {parent['url']}"
    return text


def remix_channel(parent: dict, fallback: int | None) -> int | None:
    """The channel of a remix's parent as its record (`extra["parent"]`) says: its `channel_id`,
    else its link's channel; a full record (not OTHER_CHANNEL) with neither (made before it held
    `channel_id`, of a parent without a message yet) is of the remix's own channel, `fallback`."""
    channel = parent.get("channel_id")
    if isinstance(channel, int) and not isinstance(channel, bool) and channel:
        return channel
    channel = url_channel(parent.get("url"))
    if channel is None and not parent.get(OTHER_CHANNEL):
        channel = fallback or None
    return channel


def lineage_channels(spec: JobSpec) -> dict[str, int | None]:
    """For each job `spec`'s lineage names, the channel of its message as `spec` recorded it, or
    None: what is known of it once that job is pruned from the store. A remix's parent: the channel
    its record names (remix_channel). The source of a Reroll or Continue: its
    link's channel; without a link (jobs made before `source_url`, or a source without a
    message) `spec`'s own channel, since a button acts from its message's channel, the source's."""
    remix = spec.extra.get("parent") if isinstance(spec.extra.get("parent"), dict) else {}
    out: dict[str, int | None] = {}
    for kind, job_id in lineage(spec):
        if kind == REMIX:
            channel = remix_channel(remix, spec.channel_id)
        else:
            channel = url_channel(spec.extra.get("source_url")) or spec.channel_id or None
        out[job_id] = channel
    return out


def clip_note_lines(spec: JobSpec) -> list[str]:
    """The notes on what CLIP ignores of the prompt (`spec.extra["clip_notes"]`, made by
    engine.prompts.clip_overflow: one per prompt part cut at 77 tokens, naming the ignored words).
    They quote the prompt, so each goes through `quote`; at most MAX_CLIP_NOTES lines."""
    notes = [str(n) for n in spec.extra.get("clip_notes") or []]
    lines = [f"-# ✂ {quote(n, CLIP_NOTE_CHARS)}" for n in notes[:MAX_CLIP_NOTES]]
    if len(notes) > MAX_CLIP_NOTES:
        more = len(notes) - MAX_CLIP_NOTES
        lines.append(f"-# ✂ …and {more} more prompt part{'s' if more != 1 else ''} longer than CLIP reads.")
    return lines


def _extra_lines(spec: JobSpec) -> list[str]:
    """The lineage (Reroll, Continue, remix), the notes about converted attachments and what CLIP
    ignores of the prompt, each a line, most needed first (_compose drops from the end)."""
    # The attachment notes are the bot's own words (engine.images), never user text.
    lines = lineage_lines(spec) + [f"-# {n}" for n in spec.extra.get("notes") or []] + clip_note_lines(spec)
    return [line for line in lines if line]


def duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


PROMPT_WITHHELD = "*(prompt withheld)*"


def withholds_prompt(record: JobRecord) -> bool:
    """Whether `record`'s public messages leave its prompt out: a job cancelled for a banned word
    (CANCEL_BANNED), or asked to stop for one (still running, or finished by its worker before it
    saw the request). Its reply would otherwise show the banned word to the channel, above the
    line saying that it was banned."""
    return (record.error or "").strip() == CANCEL_BANNED and (
        record.state == JobState.CANCELLED or record.cancel_requested)


def shown_prompt(record: JobRecord, limit: int = 60, *, refused: bool = False) -> str:
    """A listing's snippet of `record`'s prompt (render.snippet), withheld as its public reply
    withholds it (withholds_prompt), or when `refused`: a refused word matches it now
    (moderation.refused_now: `/history`'s jobs that ended before the word was added)."""
    return PROMPT_WITHHELD if refused or withholds_prompt(record) else snippet(record.spec.prompt, limit)


# The prompt keeps at least this many characters before _compose drops note lines to fit.
PROMPT_KEPT = 200
NOTES_LEFT_OUT = "-# (some notes are left out: too long for one message)"


def _compose(record: JobRecord, status: str, *, withheld: bool = False) -> str:
    """The job's message: its prompt, `status`, the lineage and notes, settings and weights, id and
    author, within CONTENT_LIMIT. Too long (a long prompt, a long failure reason, many notes): the
    prompt is cut to PROMPT_KEPT, then note lines are left out (CLIP's first, the lineage last),
    then the weights (and the notes tried again without them), then the prompt cut further, then
    the status; never past the limit. `withheld` (or withholds_prompt): PROMPT_WITHHELD instead of
    the prompt, and none of the lines that quote it."""
    spec = record.spec
    # The id in a code span of its own: copied, it is what `/remix job:` takes.
    job = f" · job `{record.id}` · <@{spec.user_id}>"
    if withheld or withholds_prompt(record):
        # Nor the lines that quote it (what CLIP ignores of it, its weights) or a remix's parent's prompt.
        return _fit(f"{PROMPT_WITHHELD}\n{status}\n`{settings_line(spec)}`{job}")
    prompt = escape_prompt(spec.prompt)
    extras = _extra_lines(spec)
    weights = weights_read(spec)

    def text(prompt_room: int | None, lines: list[str], weights: str, status: str) -> str:
        shown = prompt if prompt_room is None or len(prompt) <= prompt_room else prompt[:prompt_room] + "…"
        tail = "".join(f"{line}\n" for line in lines) + f"`{settings_line(spec)}`"
        return f"**{shown}**\n{status}\n{tail}" + (f" · read as {weights}" if weights else "") + job

    def room_for_prompt(lines: list[str], weights: str, status: str) -> int:
        return max(0, CONTENT_LIMIT - len(text(0, lines, weights, status)))

    def attempt(lines: list[str], weights: str) -> str | None:
        """The message with these lines and weights: the prompt whole, else cut to the room left
        if that keeps PROMPT_KEPT of it; None when neither fits."""
        whole = text(None, lines, weights, status)
        if len(whole) <= CONTENT_LIMIT:
            return whole
        room = room_for_prompt(lines, weights, status)
        return text(room, lines, weights, status) if room >= PROMPT_KEPT else None

    for shown_weights in dict.fromkeys((weights, "")):   # with the weights, then without them
        if (found := attempt(extras, shown_weights)) is not None:
            return found
        lines = list(extras)
        while lines:   # the notes, least needed first
            lines.pop()
            if (found := attempt(lines + [NOTES_LEFT_OUT], shown_weights)) is not None:
                return found
    lines = [NOTES_LEFT_OUT] if extras else []
    room = room_for_prompt(lines, "", status)
    if room > 0:
        return text(room, lines, "", status)
    # The status alone is too long (a long failure reason with a note): it is cut too.
    over = len(text(0, lines, "", status)) - CONTENT_LIMIT
    return _fit(text(0, lines, "", status[:max(0, len(status) - over - 1)] + "…"))


def _fit(text: str) -> str:
    """The last guard of CONTENT_LIMIT (Discord refuses a longer message, and the result is lost)."""
    return text if len(text) <= CONTENT_LIMIT else text[:CONTENT_LIMIT - 1] + "…"


def queued_text(record: JobRecord, position: int | None, paused: str = "") -> str:
    """`paused`: what holds it back (engine.jobs.pause_of): "everywhere", "server" or ""."""
    if position is None:
        status = "Queued."
    elif position == 1:
        status = "Queued: next in line."
    else:
        status = f"Queued: #{position} in line."
    if paused == "everywhere":
        status += " The queue is paused; it will start when the bot's owner resumes it."
    elif paused == "server":
        status += " This server's jobs are paused; it will start when an admin uses `/queue-admin resume`."
    return _compose(record, status)


def starting_text(record: JobRecord) -> str:
    return _compose(record, "Starting…")


def progress_text(record: JobRecord, iteration: int, total: int, similarity: float | None,
                  eta_seconds: float | None) -> str:
    status = f"Iteration {iteration}/{total}"
    if similarity is not None:
        status += f" · similarity {similarity:.3f}"
    if eta_seconds is not None and iteration < total:
        status += f" · about {duration(eta_seconds)} left"
    return _compose(record, status)


def final_text(record: JobRecord, note: str | None = None) -> str:
    if withholds_prompt(record):
        # Finished by its worker before it saw the request, too: the cancel the admin was told of.
        # (bot.progress posts no picture of it.)
        status = cancelled_status(CANCEL_BANNED)
    elif record.state == JobState.DONE:
        status = "Done"
        if record.similarity is not None:
            status += f" · similarity {record.similarity:.3f}"
        if record.started_at and record.finished_at:
            status += f" · took {duration(record.finished_at - record.started_at)}"
        status += "."
    elif record.state == JobState.CANCELLED:
        status = cancelled_status(record.error)
    else:
        # A reason may quote the prompt (a PromptError): its links defanged as the prompt's are.
        status = f"Failed: {defang_links(discord.utils.escape_markdown(failure_reason(record.error), ignore_links=False))}"
    if note:
        status += f"\n{note}"
    return _compose(record, status)


def withheld_text(record: JobRecord) -> str:
    """The final post of a finished job whose prompt a refused word (or pattern) added since it was
    queued matches, and that the add did not cancel (it had finished, or finished while the add
    read the line): no prompt, and no failure reason (one may quote the prompt). The channel is
    told why there is nothing to see, as a banned cancel tells it; the entry is not named.
    (bot.progress posts no picture and no buttons with it.)"""
    return _compose(record, RESULT_WITHHELD, withheld=True)


# A failed job's stored reason: what kind it is (classify_failure), and what its public reply says
# of it (failure_reason). The worker stores what went wrong for the operator (`OutOfMemoryError:
# CUDA out of memory. Tried to allocate ... Process 48211 ...`, a CUDA error's four lines of
# debugging advice); the channel gets what it means for the job and what to do. A reason of the
# user's own input (a PromptError, a pruned parent) is shown as it is. The bot's log line of the
# failure (bot.progress) reads the same kinds, and may show more of a worker's reason.
#
# Where the reasons come from: the worker's `_failed` stores an exception as `f"{type(exc).__name__}:
# {exc}"` (any class name: `error` of struct.error, `Error` of binascii.Error, `BadZipFile`,
# `StopIteration`, its message possibly empty), except a PromptError (the input) and NoEncoder,
# stored as their message alone; the store's lease sweep stores "worker lost N times". A
# PromptError's message is a sentence ("the part 'x' ...", "the prompt is empty: ...", "3 prompt
# parts; ..."): it never begins with a name right before a colon, and only its start is read, so
# what it quotes of the prompt ("out of memory", "CUDA error") is not taken for a worker's failure.
FAILURE_NONE = "none"          # no reason stored
FAILURE_LOST = "worker lost"   # its worker stopped (lease expired) on every attempt
FAILURE_WORKER = "worker"      # the worker failed: an exception (its class shown, never its text)
FAILURE_INPUT = "input"        # its input was refused: the reason is the user's to read, quoting it

_WORKER_LOST = re.compile(r"worker lost (\d+) times?")
_TYPED = re.compile(r"([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*):(?:\s|$)")   # the worker's `Class: message`
# A class name with no colon after it (stored by an older version): a worker's exception all the same.
_EXCEPTION = re.compile(r"([A-Z][A-Za-z0-9_.]*(?:Error|Exception|Died|Interrupted|Failure))\b")
_NO_ENCODER = re.compile(r"this worker has no dVAE encoder")   # NoEncoder's message: no class name
# A worker's failure (only: a rejected input may quote these words) said in plain words.
_FAILURES = (
    (re.compile(r"OutOfMemoryError|out of memory", re.I),
     "the GPU ran out of memory. Reroll it later, or pick a smaller size."),
    (re.compile(r"NonFiniteError"), "the picture's numbers overflowed. Reroll it (a new seed)."),
    (re.compile(r"GpuThreadDied|CUDA error|cuDNN error|CUBLAS", re.I), "the GPU failed while running it. Reroll it."),
)
FAILURE_SHOWN = 300
CLASS_SHOWN = 60


@dataclass(frozen=True)
class Failure:
    kind: str   # FAILURE_NONE, FAILURE_LOST, FAILURE_WORKER or FAILURE_INPUT
    said: str   # what the public reply says of it (failure_reason)


def classify_failure(error: str | None) -> Failure:
    """What a failed job's stored reason is (see above), and what its reply says of it: a known
    failure of the worker in plain words, another exception of the worker by its class name only,
    a reason of the input as written, on one line (engine.text.clip), at most FAILURE_SHOWN
    characters."""
    reason = (error or "").strip()
    if not reason:
        return Failure(FAILURE_NONE, "unknown error.")
    if lost := _WORKER_LOST.fullmatch(reason):
        times = int(lost.group(1))
        return Failure(FAILURE_LOST, f"its worker stopped {'once' if times == 1 else f'{times} times'} while "
                                     "running it. Reroll it.")
    if _NO_ENCODER.match(reason):
        return Failure(FAILURE_WORKER, "no worker that can start from an init image was running. Reroll it "
                                       "later, or ask an admin.")
    exception = _TYPED.match(reason) or _EXCEPTION.match(reason)
    if exception is None:
        return Failure(FAILURE_INPUT, clip(reason, FAILURE_SHOWN))
    for pattern, said in _FAILURES:
        if pattern.search(reason):
            return Failure(FAILURE_WORKER, said)
    return Failure(FAILURE_WORKER, f"an error on the GPU worker ({clip(exception.group(1), CLASS_SHOWN)}). Reroll "
                                   "it; if it fails again, tell an admin (the worker's log has the details).")


def failure_reason(error: str | None) -> str:
    """What a failed job's reply says of why (classify_failure)."""
    return classify_failure(error).said


# Why a job was cancelled, as the bot stores it (`queue.cancel(reason=)`, `queue.clear`: the record's
# `error`), and what its public reply says of it. No reason (None): its author cancelled it. The
# reply never names a banned word, nor shows the prompt that has it (withholds_prompt): the channel
# would read it.
CANCEL_BY_ADMIN = "by an admin"
CANCEL_BANNED = "banned word"
CANCEL_CHANNEL_GONE = "channel deleted"   # its channel or thread was deleted (bot.queue_admin)
# Why a job's public reply shows nothing of it: a banned cancel's, and a withheld result's (withheld_text).
REFUSED_PROMPT = "its prompt matches a word or pattern this server's admins refuse."
RESULT_WITHHELD = f"Result withheld: {REFUSED_PROMPT}"
_CANCELLED = {
    None: "Cancelled.",
    CANCEL_BY_ADMIN: "Cancelled by an admin.",
    CLEARED: "Cancelled: the server's queue was cleared.",
    CANCEL_BANNED: f"Cancelled: {REFUSED_PROMPT}",
    CANCEL_CHANNEL_GONE: "Cancelled: its channel was deleted.",
}


def cancelled_status(reason: str | None) -> str:
    """A cancelled job's status line for `reason` (its record's `error`). A reason the bot does
    not know is plain "Cancelled.": the known ones are the constants above, and anything else is
    not why it was cancelled (an earlier attempt's failure, `RuntimeError: …`, which a cancel kept
    in `error` before cancels stored their reason) or came from another version."""
    return _CANCELLED.get((reason or "").strip() or None, _CANCELLED[None])


def lost_text(record: JobRecord) -> str:
    """The job's reply when the job is gone from the queue's store before it ended (a Redis that
    came back without its data): it will never finish, and nothing else will say so."""
    status = ("Lost: the queue lost its data (its store restarted empty) before this job finished, "
              "so it will not finish. Run `/imagine` again.")
    return _compose(record, status)


def jump_url(guild_id: int | None, channel_id: int, message_id: int) -> str:
    return f"https://discord.com/channels/{guild_id or '@me'}/{channel_id}/{message_id}"


def mib(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MiB"
