"""Refused words and patterns, per server: `/queue-admin ban-word add | remove | list` (admins only).

The list lives in the queue's store (setting `banned:<guild_id>`, a JSON list of entries as the
admin typed them), so it survives restarts and every bot process sharing the queue sees it; each
check reads it afresh (one small read per prompt).

Entries:
- a plain word or phrase: matched case-insensitively as a whole word (`cat` refuses "a Cat" but
  not "concatenate"); "whole" as CLIP splits words: only a letter (or a letter's mark: a Hindi
  vowel sign) next to it makes it part of a longer word, so "cat1" and "cat_x" still hit. An entry that begins or ends
  in a script written without spaces (Han, Hiragana, Katakana, Thai, Lao, Khmer, Myanmar) needs no
  boundary on that side: `猫` refuses "黒猫の絵";
- `re:<pattern>`: a regular expression, case-insensitive, searched anywhere in the prompt.

`list` (in pages of up to 20 entries: its `page` option) shows each entry as itself or, where that
would not show it exactly (a run of spaces, a backtick, a bidi control), as a JSON string; `remove`
takes what it shows and removes exactly that entry (`shown`). An entry is refused when added if its
shown form passes MAX_SHOWN characters; every answer cuts a longer one (an older list's), marked.

Look-alike spellings match too: each entry is tried on the prompt as typed and on its folded form
(`fold`: first cleaned exactly as CLIP's tokenizer cleans it -- ftfy, HTML entities unescaped
twice, so `c&#97;t` and `c&amp;#97;t` read `cat` -- then NFKC's compatibility folding, so
fullwidth `ｃｕｒｓｅｄ` -- which CLIP reads exactly as `cursed` -- and other compatibility forms
become plain letters and a decomposed `café` is composed; zero-width and other format characters
such as the soft hyphen removed, and the marks left stacked on a Latin, Greek or Cyrillic letter
(`cat\u0301` reads `cat`), while accented letters stay themselves (`año` is not `ano`) and marks of
other scripts (Thai, Hindi vowels and tones) stay; runs of white space made one space; and a word
that mixes Cyrillic or Greek letters drawn like Latin ones with Latin letters, or is made of such
letters alone, read as Latin: `сat` with a Cyrillic `с` is `cat`, while `кот` stays Russian). A plain
entry is folded the same way, so `ｃａｔ` entries match too; a pattern is used as typed.

Guards against a pattern that backtracks for ever: entries are at most MAX_ENTRY characters, a
pattern is compiled and tried on a few adversarial strings when it is added (refused if that is
slow), and every match runs with the `regex` module's timeout against at most the prompt's
allowed length. A match that times out counts as a refusal (fail closed) and is logged, so an
admin can fix the pattern. One request's whole check (every prompt of a permutation set) has
MATCH_BUDGET seconds; past it the request is refused the same way. Compiling is guarded too:
`regex` unrolls counted repeats (`x{1000}`) while it compiles, holding the GIL, so a pattern whose
minimum counts multiply past MAX_UNROLL (`(?:a{65535}){65535}` would stop the whole process for
hours) is refused before it is compiled.

The check runs before anything is queued: /imagine makes it before it
downloads any attached picture (ImagineCog.refusal; permutations.check_set for each prompt of a
permutation set), and the Reroll / Continue buttons and Remix make it before they submit
(anything else that submits through ImagineCog.submit unchecked gets it there). A refusal quotes what matched through render.quote (tamed:
no bidi controls, combining marks capped). It runs once more just before the store's write
(imagine.late_refusal), against the list as it is then: an entry added while a request downloads
its pictures would otherwise let it through.

Jobs already in line when an entry is added would otherwise run and be posted publicly: the add
cancels this server's queued and running jobs whose prompt the new entry matches (`cancel_matching`,
the same `find`), with the reason render.CANCEL_BANNED: their replies say so without naming the
entry or showing the prompt (render.withholds_prompt), one already asked to stop for another
reason (its author's cancel) included; one whose worker finishes it before it sees the request
ends CANCELLED all the same (the store's `finish`), without its picture. The admin's answer
names the ids of the jobs cancelled that they may see (`/queue show`'s rule) and counts the others:
the ids of a channel hidden from them would tell them which patterns its prompts match. A
pattern that matches half of a few ordinary prompts (`_ORDINARY`) is refused when added: it would
refuse nearly every prompt (`re:.`, `re:[a-z]`).
"""

from __future__ import annotations

import asyncio
import functools
import html
import json
import logging
import time
import unicodedata
from typing import TYPE_CHECKING, Iterable

import discord
import ftfy   # an openai-clip dependency: its tokenizer cleans every prompt with it
import regex
from discord import app_commands
from discord.ext import commands

from bot import render
from bot.permissions import ThreadLookups, can_see_job, require_admin
from engine.jobs import JobRecord
from engine.text import has_visible_text, is_format

if TYPE_CHECKING:
    from bot.client import ImagineBot

log = logging.getLogger(__name__)

REGEX_PREFIX = "re:"
MAX_ENTRY = 200
MAX_ENTRIES = 100
MAX_SHOWN = 1500              # characters of an entry's shown form (`shown`: escapes included)
MATCH_TIMEOUT = 0.05          # seconds per entry and prompt
# Seconds for the whole check of one request (every prompt of a permutation set, folding
# included): 100 entries at MATCH_TIMEOUT each would otherwise take up to 10 s a prompt, 90 s for
# a set of 9. Past it the request is refused as a timeout is (fail closed).
MATCH_BUDGET = 3.0
MAX_UNROLL = 100_000          # the product of a pattern's minimum repeat counts (compiles in ~0.05 s)
_COUNTED_REPEAT = regex.compile(r"\\.|\{\s*(\d*)\s*(?:,\s*\d*\s*)?\}")
_FLAGS = regex.IGNORECASE | regex.V0
# An inline flag group that turns on verbose mode: `(?x)`, `(?ix)`, `(?x:...)`. There `regex`
# ignores spaces and `#` comments inside a repeat's count (`a{6 5}` is `a{65}`), which
# _COUNTED_REPEAT does not read as a count: `(?x)(?:a{65 535}){65 535}` got past MAX_UNROLL and
# held the GIL (every server's bot) for as long as it took to compile.
_VERBOSE_FLAG = regex.compile(r"\(\?[a-zA-Z^-]*[xX]")
# Strings that make badly nested repeats backtrack; a new pattern must get through them quickly.
_PROBES = ("a" * 400 + "!", "ab" * 200 + "!", " " * 400 + "!", "aaa0" * 100 + "\n", "x" * 400, "a1 " * 130)
# Ordinary prompts that share no word: a pattern matching half of them or more would refuse nearly
# every prompt (`re:.`, `re:\S`, `re:[a-z]`, `re:\b`, `re:\s`, `re:e`), so it is refused when added.
_ORDINARY = ("a red bicycle", "lighthouse at dusk", "1984", "猫", "Zebra", "portrait, oil on canvas")


def setting_key(guild_id: int) -> str:
    return f"banned:{guild_id}"


class BadEntry(ValueError):
    """An entry that cannot go on the list; the message says what to fix."""


class TooManyRepeats(regex.error):
    """A pattern whose counted repeats would unroll past MAX_UNROLL: never compiled."""


class VerbosePattern(regex.error):
    """A pattern that turns on verbose mode (_VERBOSE_FLAG): never compiled."""


@functools.lru_cache(maxsize=2048)
def _compiled(entry: str) -> "regex.Pattern[str] | tuple[type[regex.error], str]":
    """The entry's pattern, or why it has none (cached too: each entry is compiled, or refused,
    once, whoever asks)."""
    try:
        if is_regex(entry):
            source = entry[len(REGEX_PREFIX):]
            if _VERBOSE_FLAG.search(source):   # its counts cannot be read: not compiled at all
                raise VerbosePattern("it turns on verbose mode ((?x)), which this list does not take")
            if unrolled(source) > MAX_UNROLL:   # before `regex` unrolls it, holding the GIL
                raise TooManyRepeats(f"its counted repeats multiply to more than {MAX_UNROLL:,}")
            return regex.compile(source, _FLAGS)
        return regex.compile(_word_pattern(entry), _FLAGS)
    except regex.error as exc:
        return type(exc), str(exc)
    except Exception as exc:   # noqa: BLE001 - `regex`'s own failures on odd input: `\p{inf}`
        # (OverflowError), `\p{1e999}`, `[[:inf:]]` and the like. Still no pattern: an invalid one.
        return regex.error, f"it cannot be compiled ({type(exc).__name__})"


def _compile(entry: str) -> "regex.Pattern[str]":
    """The entry's pattern; regex.error (TooManyRepeats for one that repeats too much) if it has none."""
    found = _compiled(entry)
    if isinstance(found, tuple):
        kind, message = found
        raise kind(message)
    return found


def is_regex(entry: str) -> bool:
    return entry[: len(REGEX_PREFIX)].lower() == REGEX_PREFIX


def unrolled(pattern: str) -> int:
    """An upper bound of how many copies of its atoms `regex` makes compiling `pattern`: the
    product of the minimum counts of its counted repeats (`{m}`, `{m,}`, `{m,n}`), nested or not."""
    total = 1
    for match in _COUNTED_REPEAT.finditer(pattern):
        if match[1]:   # escapes (group 1 None) and `{,n}` (empty) unroll nothing
            total *= max(1, int(match[1]))
            if total > MAX_UNROLL:
                break
    return total


# Scripts written without spaces between words: an entry's edge in one of them needs no boundary.
_UNSPACED = regex.compile(r"[\p{Han}\p{Hiragana}\p{Katakana}\p{Thai}\p{Lao}\p{Khmer}\p{Myanmar}]")
_LETTER = regex.compile(r"\p{L}")
# Letters whose leftover combining marks are decoration (cat + U+0301, ca + U+0332 + t): after
# NFKC, every mark a Latin, Greek or Cyrillic letter really takes is part of a precomposed letter
# (ñ, ồ, й). In other scripts marks are vowels and tones (Hindi, Thai...): never dropped.
_DECORATED = regex.compile(r"[\p{Latin}\p{Greek}\p{Cyrillic}]")


def _edge(ch: str, before: bool) -> str:
    """The boundary on one side of a plain entry whose edge character is `ch`."""
    if _UNSPACED.match(ch):
        return ""                                     # CJK, Thai...: matched inside text
    if _LETTER.match(ch):                             # CLIP splits a word from digits and `_`
        # A mark goes on with the word: a Hindi vowel sign after an entry makes it another word.
        return r"(?<![\p{L}\p{M}])" if before else r"(?![\p{L}\p{M}])"
    return r"(?<!\w)" if before else r"(?!\w)"       # "c++", "1984": as before


def _word_pattern(entry: str) -> str:
    """A plain entry's pattern: its folded form as a whole word (works for "c++" and phrases)."""
    word = fold(entry)
    if not word:
        raise regex.error("the entry is empty once folded (only invisible characters or marks)")
    return _edge(word[0], True) + regex.escape(word) + _edge(word[-1], False)


def clip_clean(text: str) -> str:
    """`text` as CLIP's tokenizer cleans it before it reads it (clip.simple_tokenizer's
    basic_clean then whitespace_clean: ftfy, HTML entities unescaped twice -- `c&amp;#97;t`
    reads `cat` -- white space runs as one space), less its final lower-casing."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return regex.sub(r"\s+", " ", text).strip()


def fold(text: str) -> str:
    """`text` as a look-alike spelling reads: cleaned as CLIP cleans it (clip_clean), NFKC (full-width
    letters, ligatures; a decomposed `café` composed), without format characters (zero-width
    spaces and joiners, soft hyphens, bidi marks) or the combining marks left on a Latin, Greek or
    Cyrillic letter once composed (`cat\u0301`, `ca\u0332t` read `cat`); accented letters stay
    themselves (`año` is not `ano`), and marks of other scripts stay; white space runs as one space;
    a word of Latin and look-alike Cyrillic or Greek letters, or of look-alikes alone, read as Latin
    (`сat` reads `cat`, `кот` stays itself)."""
    out: list[str] = []
    # Whether a mark here is dropped: after a Latin, Greek or Cyrillic letter, or on no letter at
    # all (the start, a space, a digit); kept after a letter of another script.
    decorated = True
    for ch in unicodedata.normalize("NFKC", clip_clean(text)):
        if is_format(ch):
            continue
        if unicodedata.category(ch) == "Mn":
            if not decorated:
                out.append(ch)
            continue
        decorated = bool(_DECORATED.match(ch)) or not unicodedata.category(ch).startswith("L")
        out.append(ch)
    return _LOOKALIKE_WORD.sub(_as_latin, " ".join("".join(out).split()))


# Cyrillic and Greek letters drawn like a Latin one (Unicode's confusables.txt, both cases): `сat`
# with a Cyrillic `с` is `cat` to the eye. A word that mixes them with Latin letters, or is made of
# them alone, is read as Latin; a word with any other letter of its alphabet (`кот`, `γάτα`) is
# that language and stays itself.
_LOOKALIKES = str.maketrans(
    "аеѕіјорсухԁһԛԝӏүАВЕКМНОРСТХУЅІЈԚԜ" "οανιρυκχγΑΒΕΖΗΙΚΜΝΟΡΤΥΧ",
    "aesijopcyxdhqwlyABEKMHOPCTXYSIJQW" "oavipukxyABEZHIKMNOPTYX",
)
_LOOKALIKE_LETTERS = "".join(chr(code) for code in _LOOKALIKES)
_LOOKALIKE_WORD = regex.compile(
    r"[\p{L}\p{M}]*[" + _LOOKALIKE_LETTERS + r"][\p{L}\p{M}]*"
)


def _as_latin(match: "regex.Match[str]") -> str:
    word = match[0]
    others = regex.sub(r"[\p{Latin}\p{M}" + _LOOKALIKE_LETTERS + "]", "", word)
    return word if others else word.translate(_LOOKALIKES)


def normalise(raw: str) -> str:
    """The entry as it will be stored, or BadEntry saying what is wrong with it."""
    text = (raw or "").strip()
    if is_regex(text):
        entry = REGEX_PREFIX + text[len(REGEX_PREFIX):]   # the pattern as typed (spaces matter)
        if entry == REGEX_PREFIX:
            raise BadEntry("The pattern after `re:` is empty.")
    else:
        entry = " ".join(text.split())
        if entry and not fold(entry):
            raise BadEntry("That entry is only invisible characters or accents once folded; give a word.")
    if not entry:
        raise BadEntry("Give a word, a phrase, or `re:<pattern>`.")
    if len(entry) > MAX_ENTRY:
        raise BadEntry(f"That entry is {len(entry)} characters long; the limit is {MAX_ENTRY}.")
    if len(shown(entry)) > MAX_SHOWN:   # the answers name it as `shown` does: escapes and all
        raise BadEntry(f"That entry is too long to show: the list would write it as {len(shown(entry))} "
                       "characters (an invisible character, a mark or a space of a run as an escape such as "
                       f"`\\u0301`, one beyond U+FFFF as two), and the limit is {MAX_SHOWN}. Use fewer such "
                       "characters. Nothing was added.")
    try:
        pattern = _compile(entry)
    except TooManyRepeats:
        raise BadEntry(f"That pattern repeats too much: its counted repeats (like `{{1000}}`) multiply to more than "
                       f"{MAX_UNROLL:,}. A prompt is at most a few hundred characters: use smaller counts. "
                       "Nothing was added.") from None
    except VerbosePattern:
        raise BadEntry("That pattern turns on verbose mode (`(?x)`), which this list does not take: write it "
                       "without the flag (a space then matches a space). Nothing was added.") from None
    except regex.error as exc:
        raise BadEntry(f"That is not a valid regular expression: {exc}. Nothing was added.") from None
    if is_regex(entry):
        try:
            if pattern.search("", timeout=MATCH_TIMEOUT) is not None:
                raise BadEntry("That pattern matches an empty prompt, so it would refuse everything. "
                               "Nothing was added.")
            for probe in _PROBES:
                pattern.search(probe, timeout=MATCH_TIMEOUT, concurrent=True)
            _refuse_broad(pattern)
        except TimeoutError:
            raise BadEntry("That pattern is too slow to match (nested repeats like `(a+)+` can take exponential "
                           "time). Simplify it. Nothing was added.") from None
    return entry


def _refuse_broad(pattern: "regex.Pattern[str]") -> None:
    """BadEntry when `pattern` matches half of _ORDINARY or more: it would refuse nearly everything."""
    hits = [p for p in _ORDINARY if pattern.search(p, timeout=MATCH_TIMEOUT, concurrent=True) is not None]
    if 2 * len(hits) >= len(_ORDINARY):
        examples = ", ".join(render.quote(p) for p in hits[:3])
        raise BadEntry(f"That pattern matches ordinary prompts such as {examples}, so it would refuse nearly "
                       "every prompt. Make it match only what you mean to refuse. Nothing was added.")


def same(a: str, b: str) -> bool:
    """Whether two entries are one: patterns exactly (`\\b` is not `\\B`, `[a-z]` not `[A-Z]`, and
    `re:a  b` with two spaces not `re:a b`), except the `re:` prefix's case; plain words as they
    fold, in any case."""
    return identity(a) == identity(b)


def identity(entry: str) -> tuple[bool, str]:
    """What `same` compares: (is it a pattern, the pattern exactly or the plain word folded). Each
    stored entry's is worked out once (cached, as its pattern is); compare a typed entry's with
    them rather than calling `same` per entry, which would fold the typed text again each time."""
    if is_regex(entry):
        return True, entry[len(REGEX_PREFIX):]
    return _word_identity(entry)


@functools.lru_cache(maxsize=2048)
def _word_identity(entry: str) -> tuple[bool, str]:
    return False, fold(entry).casefold()


def find(entries: Iterable[str], prompt: str, max_chars: int,
         deadline: float | None = None) -> tuple[str, str | None] | None:
    """The first entry that matches `prompt` (cut to `max_chars`) as typed or folded, with the
    matched text.

    The matched text is None when the match timed out, or `deadline` (time.monotonic()) passed
    before every entry was tried (counted as a match: fail closed).
    """
    text = prompt[:max_chars]
    folded = fold(text)
    texts = [text] if folded == text else [text, folded]
    for entry in entries:
        try:
            pattern = _compile(entry)
        except regex.error:   # stored by an older version, or edited by hand: skip, say so
            log.warning("banned entry %r does not compile; ignoring it", entry)
            continue
        for candidate in texts:
            timeout = MATCH_TIMEOUT
            if deadline is not None:
                timeout = min(timeout, deadline - time.monotonic())
                if timeout <= 0:
                    log.warning("checking a %d-character prompt against the refused words took longer than "
                                "%.1f s in all; refusing the prompt", len(candidate), MATCH_BUDGET)
                    return entry, None
            try:
                found = pattern.search(candidate, timeout=timeout, concurrent=True)
            except TimeoutError:
                log.warning("banned entry %r timed out on a %d-character prompt; refusing the prompt",
                            entry, len(candidate))
                return entry, None
            if found is not None:
                return entry, found.group(0)
    return None


async def entries(queue, guild_id: int | None) -> list[str]:
    if not guild_id:
        return []
    value = await queue.get_setting(setting_key(guild_id), [])
    return [e for e in value if isinstance(e, str)] if isinstance(value, list) else []


async def refused_now(queue, guild_id: int | None, records: Iterable[JobRecord], max_chars: int, *,
                      quoted: bool = False, budget: float | None = MATCH_BUDGET) -> set[str]:
    """The ids of `records` whose prompt the server's refused words match now (find, a timeout
    counting as a match: fail closed), read afresh (a store failure is raised). For what an add
    could not cancel: jobs that ended before it. `quoted`: every prompt a job's public reply
    quotes (render.quoted_prompts: a remix's parent's too), not its own alone. `budget`: seconds
    for each record's check (None: each entry's MATCH_TIMEOUT alone)."""
    listed = await entries(queue, guild_id)
    if not listed:
        return set()
    records = list(records)

    def matches(record: JobRecord) -> bool:
        deadline = None if budget is None else time.monotonic() + budget
        prompts = render.quoted_prompts(record.spec) if quoted else [record.spec.prompt]
        return any(find(listed, prompt, max_chars, deadline) is not None for prompt in prompts)

    return await asyncio.to_thread(lambda: {r.id for r in records if matches(r)})


# The refusal when the list could not be matched in time (MATCH_BUDGET): not a match.
UNCHECKED = ("Your prompt could not be checked against this server's list of refused words in time, so "
             "it was not queued. Try a shorter prompt, or ask an admin to simplify the list's patterns.")


async def refusal(bot: "ImagineBot", guild_id: int | None, prompts: Iterable[str]) -> str | None:
    """The ephemeral refusal for the first prompt that hits the server's list, else None."""
    listed = await entries(bot.queue, guild_id)
    if not listed:
        return None
    max_chars = bot.config.imagine.max_prompt_chars
    prompts = list(prompts)

    def check() -> tuple[str, str | None] | None:   # every prompt within MATCH_BUDGET, from its start here
        deadline = time.monotonic() + MATCH_BUDGET
        for prompt in prompts:
            hit = find(listed, prompt, max_chars, deadline)
            if hit is not None:
                return hit
        return None

    hit = await asyncio.to_thread(check)   # off the event loop
    if hit is not None:
        _, matched = hit
        if matched is None:
            return UNCHECKED
        if not has_visible_text(matched):   # `re:\b`, `re:\s`: nothing to quote
            return ("Your prompt matches a pattern this server's admins have refused. Change it and try again; "
                    "nothing was queued.")
        return (f"Your prompt contains {render.quote(matched, 50)}, which this server's admins have refused. "
                "Change it and try again; nothing was queued.")
    return None


# --- jobs already in line when an entry is added -------------------------------------------------

async def _line(queue, guild_id: int) -> list[JobRecord]:
    """Server `guild_id`'s queued and running jobs, each once, as last read. Two reads are not one
    moment: a job claimed between queued() and running() is in both, and one that failed and went
    back in line between them in neither, so queued() is read again after running()."""
    jobs: dict[str, JobRecord] = {}
    for record in [*await queue.queued(), *await queue.running(), *await queue.queued()]:
        if record.spec.guild_id == guild_id:
            jobs.pop(record.id, None)   # its newest read, where it was last seen
            jobs[record.id] = record
    return list(jobs.values())


async def cancel_matching(bot: "ImagineBot", guild_id: int, entry: str) -> list[JobRecord]:
    """Cancel server `guild_id`'s queued and running jobs whose prompt (as submitted: each job of a
    permutation set its own; a remix's parent's too, which its replies quote) `entry` matches as `find` matches a new prompt (a timeout counts, as
    it refuses one); their replies say why without naming the entry or showing the prompt
    (render.CANCEL_BANNED, render.withholds_prompt). A running job already asked to stop for a
    banned word is left to that request; one asked for another reason (its author, an admin) gets
    this reason instead (`replace_reason`): the reason is what withholds its prompt. The jobs
    cancelled, as read before the cancel."""
    jobs = [r for r in await _line(bot.queue, guild_id) if not render.withholds_prompt(r)]
    max_chars = bot.config.imagine.max_prompt_chars
    # Each prompt its replies quote: a remix's parent's too (its lineage line), as a Reroll of it is refused.
    hits = await asyncio.to_thread(lambda: [r for r in jobs if any(
        find([entry], prompt, max_chars) is not None for prompt in render.quoted_prompts(r.spec))])
    if hits and identity(entry) not in {identity(e) for e in await entries(bot.queue, guild_id)}:
        # Removed again (another admin) while the line was read and matched: it refuses nothing now.
        log.info("the refused entry %r was removed before its jobs were cancelled; cancelling none", entry)
        return []
    cancelled = [r for r in hits if await bot.queue.cancel(r.id, reason=render.CANCEL_BANNED, replace_reason=True)]
    if cancelled:
        log.info("the refused entry %r cancelled jobs %s of server %s", entry, ", ".join(r.id for r in cancelled),
                 guild_id)
        if bot.progress is not None:
            bot.progress.line_changed()
            for r in cancelled:   # a running one's frames until its worker stops: without the prompt
                if (now := await bot.queue.get(r.id)) is not None:
                    bot.progress.record_changed(now)
    return cancelled


async def _visible(interaction: discord.Interaction, records: list[JobRecord]) -> list[str]:
    """The ids of `records` the admin may see (their own, or of channels they can view: what
    `/queue show` lists them). Any other id would tell them that a prompt in a channel hidden from
    them matches what they just added: a pattern at a time, its words."""
    lookups = ThreadLookups()
    return [r.id for r in records
            if r.spec.user_id == interaction.user.id or await can_see_job(interaction, r, lookups)]


def _cancelled_line(job_ids: list[str], room: int, hidden: int = 0) -> str:
    """The admin's line on the jobs `cancel_matching` cancelled, at most `room` characters: the ids
    they may see (`job_ids`) that fit, how many more, and how many of channels they cannot see
    (`hidden`: counted, never named)."""
    n = len(job_ids) + hidden
    if not n:
        return "No queued or running job of this server matches it."
    text = (f"Cancelled {n} of this server's queued or running job{'s' if n != 1 else ''} whose prompt matches it "
            "(a running one stops at its worker's next check):")
    unseen = f"{hidden} in {'a channel' if hidden == 1 else 'channels'} you cannot see" if hidden else ""
    shown = list(job_ids)
    while True:
        listed = ", ".join(f"`{j}`" for j in shown)
        if len(shown) < len(job_ids):
            listed += f" …and {len(job_ids) - len(shown)} more"
        if unseen:
            listed = f"{listed}, and {unseen}" if listed else unseen
        line = f"{text} {listed}."
        if len(line) <= room or not shown:
            return line
        shown.pop()


# --- the commands --------------------------------------------------------------------------------

def _code(text: str) -> str:
    """Text the admin typed, as inline code (render.quote: tamed, a backtick inside becomes a look-alike)."""
    return render.quote(text, MAX_ENTRY)


# How the list (and every answer naming an entry) shows an entry, so that what an admin copies
# from it and gives `remove` removes that entry and no other. render.quote would not do: it shows
# `re:a  b` (two spaces) as `re:a b`, drops bidi controls, caps stacked marks and shows a backtick
# as a look-alike, so two entries could look alike and a copy would not be the entry. Rather than
# guess which entry a changed copy meant, an entry quote cannot show exactly is shown as a JSON
# string: in double quotes, ASCII only (`\u0020` a space of a run, `\u0060` a backtick, `\u202e`
# a bidi control...), which `remove` decodes back to exactly that entry (`_typed`). Every other
# entry is shown as itself. One shown as itself never both begins and ends with `"` (such an
# entry is shown as JSON too), so no entry's copy can be read as another's.

def _quoted(text: str) -> bool:
    return len(text) >= 2 and text[0] == text[-1] == '"'


# Characters a JSON form escapes beyond JSON's own: those an inline code span would not show as
# they are (controls, format and bidi characters, separators, private and unassigned code
# points, combining marks that stack), a backtick (it would end the span) and runs of spaces.
# Every other character shows as itself: an emoji or a CJK word is not six characters a letter.
# An escaped character is 6 characters (`\u0301`), one beyond U+FFFF 12 (a surrogate pair:
# `\ud834\udd67`), so 200 such characters would be 2402: an entry is refused when added if its
# shown form passes MAX_SHOWN (`normalise`), and every answer cuts a longer one that an older list
# holds (`_shown_code`), so that no answer passes Discord's 2000 characters.
_ESCAPED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs", "Mn", "Me"})


def _escape_char(ch: str) -> str:
    if ch == " " or (ch != "`" and unicodedata.category(ch) not in _ESCAPED_CATEGORIES):
        return ch
    units = ch.encode("utf-16-be")   # a surrogate pair beyond the BMP, as JSON writes one
    return "".join(f"\\u{int.from_bytes(units[i:i + 2], 'big'):04x}" for i in range(0, len(units), 2))


def _escaped(entry: str) -> str:
    """`entry` as a JSON string that shows (and copies) exactly in an inline code span."""
    text = "".join(_escape_char(ch) for ch in json.dumps(entry, ensure_ascii=False))
    return regex.sub(r" {2,}", lambda run: "\\u0020" * len(run[0]), text)


def shown(entry: str) -> str:
    """`entry` as the list shows it, inside its inline code span: itself, or its JSON form."""
    if render.quote(entry, MAX_ENTRY) == f"`{entry}`" and not _quoted(entry):
        return entry
    return _escaped(entry)


# One escape (`\u0301`, a surrogate pair as one, `\"`) or one character of a shown form: where it may be cut.
_SHOWN_TOKEN = regex.compile(r"\\u[dD][89abAB][0-9a-fA-F]{2}\\u[0-9a-fA-F]{4}|\\u[0-9a-fA-F]{4}|\\.|.", regex.DOTALL)


def _shown_code(entry: str, limit: int = MAX_SHOWN + 2) -> str:
    """`entry` as an inline code span of its shown form, at most `limit` characters: a form too
    long for that (one an older list holds: every entry added now fits MAX_SHOWN) is cut at an
    escape's edge and marked as cut, saying how long it is whole."""
    text = shown(entry)
    if len(text) + 2 <= limit:
        return f"`{text}`"
    mark = f"… *(cut: {len(text)} characters whole, too long to show)*"
    room = max(0, limit - len(mark) - 2)
    kept, used = [], 0
    for token in _SHOWN_TOKEN.findall(text):
        if used + len(token) > room:
            break
        kept.append(token)
        used += len(token)
    if not kept:   # no room for any of it (never with the limits used here)
        return f"*(an entry of {len(text)} characters, too long to show)*"
    return f"`{''.join(kept)}`{mark}"


def _cut(entry: str) -> bool:
    """Whether `_shown_code` cuts `entry` in a list's line (only an older list's entry can be)."""
    return len(shown(entry)) > MAX_SHOWN


def _shown_entries(entries: list[str], room: int) -> str:
    """`entries` as inline code spans, comma-separated, at most `room` characters: the first one
    (cut if it must be), then those that fit whole and how many more."""
    parts = [_shown_code(entries[0], max(40, min(MAX_SHOWN + 2, room - 20)))]
    for n, entry in enumerate(entries[1:], 1):
        part = _shown_code(entry)
        left = len(entries) - n - 1
        tail = len(f" and {left} more") if left else 0
        if len(", ".join(parts)) + 2 + len(part) + tail > room:
            return ", ".join(parts) + f" and {len(entries) - n} more"
        parts.append(part)
    return ", ".join(parts)


def _typed(wanted: str) -> str:
    """The entry a typed (or copied) `wanted` names: a JSON string (`shown`) decoded, else as typed."""
    if _quoted(wanted):
        try:
            decoded = json.loads(wanted)
        except ValueError:
            return wanted
        if isinstance(decoded, str):
            return decoded
    return wanted


_ESCAPES_NOTE = ("-# An entry in double quotes is written with escapes (`\\u0020` a space, `\\u0060` a backtick): "
                 "give it to `/queue-admin ban-word remove` as shown, quotes included.")
_CUT_NOTE = ("-# An entry marked *cut* is too long to show whole: remove it by giving "
             "`/queue-admin ban-word remove` the entry as it was added.")
_PAGE_LINE_ROOM = 120   # a page's "Page i of n: ... page:i+1 for the next" line


def _listing(items: list[str], page: int = 1) -> tuple[str, int]:
    """Page `page` (1-based) of the list's answer, and how many pages it has; the text is "" when
    there is no such page. Pages hold up to queue_admin.SHOW_MAX entries (fewer when long ones
    would pass Discord's 2000 characters: an entry too long for a page is cut, `_shown_code`);
    the entries are numbered in the whole list, and the same list always pages the same way."""
    from bot.queue_admin import _pages   # noqa: PLC0415 - bot.queue_admin imports bot.imagine

    head = f"Refused in prompts ({len(items)}):"
    # Room for the page's lines whatever notes it shows, so that the pages never depend on them.
    room = render.CONTENT_LIMIT - len(head) - len(_ESCAPES_NOTE) - len(_CUT_NOTE) - _PAGE_LINE_ROOM - 4

    def line(n: int, entry: str) -> str:
        start, end = f"{n}. ", "  (regex)" if is_regex(entry) else ""
        return start + _shown_code(entry, min(MAX_SHOWN + 2, room - len(start) - len(end))) + end

    pages = _pages([line(n, e) for n, e in enumerate(items, 1)], room)
    if not 1 <= page <= len(pages):
        return "", len(pages)
    first = sum(len(p) for p in pages[:page - 1])
    on_page = items[first:first + len(pages[page - 1])]
    text = [head, *pages[page - 1]]
    if any(shown(e) != e for e in on_page):
        text.append(_ESCAPES_NOTE)
    if any(_cut(e) for e in on_page):
        text.append(_CUT_NOTE)
    if len(pages) > 1:
        last = first + len(on_page)
        text.append(f"-# Page {page} of {len(pages)} (entries {first + 1}-{last} of {len(items)})"
                    + (f": `/queue-admin ban-word list page:{page + 1}` for the next." if page < len(pages) else "."))
    return "\n".join(text)[:render.CONTENT_LIMIT], len(pages)


async def _defer_privately(interaction: discord.Interaction) -> None:
    """Answer Discord (a private "thinking…") before the list's read-modify-write: the write may
    wait seconds behind another (SQLite: a worker's checkpoint), or behind another admin's edit
    (the cog's lock), and Discord wants an answer within 3 s. The answers that follow are
    ephemeral follow-ups, which replace the "thinking…"."""
    if not interaction.response.is_done():
        await interaction.response.defer(ephemeral=True, thinking=True)


class BanWordGroup(app_commands.Group):
    """`/queue-admin ban-word ...`: added to the QueueAdmin cog's group by ModerationCog."""

    def __init__(self, cog: "ModerationCog"):
        super().__init__(name="ban-word", description="Admin: words and patterns refused in prompts")
        self.cog = cog

    @app_commands.command(name="add", description="Admin: refuse prompts with this word (or re:<regex>)")
    @app_commands.describe(entry=f"A word or phrase (whole words, any case), or re:<regex>; up to {MAX_ENTRY} characters")
    async def add(self, interaction: discord.Interaction, entry: str) -> None:
        await self.cog.add(interaction, entry)

    @app_commands.command(name="remove", description="Admin: allow this word or pattern again")
    @app_commands.describe(entry="The entry as /queue-admin ban-word list shows it")
    async def remove(self, interaction: discord.Interaction, entry: str) -> None:
        await self.cog.remove(interaction, entry)

    @app_commands.command(name="list", description="Admin: the words and patterns refused in this server")
    @app_commands.describe(page="Which page of the list (1 first; each shows up to 20 entries)")
    async def list_(self, interaction: discord.Interaction, page: app_commands.Range[int, 1, None] = 1) -> None:
        await self.cog.show(interaction, page)


class ModerationCog(commands.Cog, name="Moderation"):
    def __init__(self, bot: "ImagineBot"):
        self.bot = bot
        self.group = BanWordGroup(self)
        self._lock = asyncio.Lock()   # one read-modify-write of the list at a time (in this process)

    async def cog_load(self) -> None:
        admin_cog = self.bot.get_cog("QueueAdmin")
        if admin_cog is None or admin_cog.app_command is None:
            raise RuntimeError("ModerationCog needs the QueueAdmin cog (its /queue-admin group) loaded first")
        admin_cog.app_command.add_command(self.group, override=True)

    async def cog_unload(self) -> None:
        admin_cog = self.bot.get_cog("QueueAdmin")
        if admin_cog is not None and admin_cog.app_command is not None:
            admin_cog.app_command.remove_command(self.group.name)

    async def _admin(self, interaction: discord.Interaction) -> bool:
        return await require_admin(interaction, self.bot.config)

    async def add(self, interaction: discord.Interaction, raw: str) -> None:
        from bot.imagine import ephemeral   # noqa: PLC0415

        if not await self._admin(interaction):
            return
        # Answer Discord first: normalise tries a pattern for up to ~0.65 s in the thread pool that
        # other work shares, so under load it may not even start within Discord's 3 s.
        await _defer_privately(interaction)
        try:
            entry = await asyncio.to_thread(normalise, raw)
        except BadEntry as exc:
            await ephemeral(interaction, str(exc))
            return
        guild_id = interaction.guild_id or 0
        async with self._lock:
            current = await entries(self.bot.queue, guild_id)
            key = identity(entry)
            listed = next((e for e in current if identity(e) == key), None)
            if listed is None:
                if len(current) >= MAX_ENTRIES:
                    await ephemeral(interaction, f"The list is full ({MAX_ENTRIES} entries); remove one first.")
                    return
                current.append(entry)
                await self.bot.queue.set_setting(setting_key(guild_id), current)
        if listed is None:
            log.info("user %s added %r to the refused words of server %s", interaction.user.id, entry, guild_id)
            kind = "pattern" if is_regex(entry) else "word"
            head = (f"Added the {kind} {_shown_code(entry)}: prompts that contain it are refused. The list has "
                    f"{len(current)} entr{'y' if len(current) == 1 else 'ies'}.")
        else:
            # Listed already: still cancel the jobs in line that match it. An add that stored the
            # entry and then failed before (or during) its cancel pass is finished by a retry.
            entry = listed
            head = f"{_shown_code(entry)} is already on the list; nothing was added."
        # After the write: a job submitted from now on is refused at submit (its check just before the
        # store's write, ImagineCog.submit, permutations.submit_set), one before it is here.
        cancelled = await cancel_matching(self.bot, guild_id, entry)
        visible = await _visible(interaction, cancelled)
        line = _cancelled_line(visible, render.CONTENT_LIMIT - len(head) - 1, hidden=len(cancelled) - len(visible))
        await ephemeral(interaction, f"{head}\n{line}")

    async def remove(self, interaction: discord.Interaction, raw: str) -> None:
        from bot.imagine import ephemeral   # noqa: PLC0415

        if not await self._admin(interaction):
            return
        # As typed, else as the list shows it (`shown`: a JSON string, decoded): an entry stored
        # with its quotes (`"bad phrase"`) is removed when typed as it was added, never another
        # that its decoded text names. No white space is collapsed here: a plain word's identity is
        # folded (runs of white space as one space) anyway, and a pattern's white space is part of
        # it (`re:a  b` is not `re:a b`).
        typed = (raw or "").strip()
        candidates = list(dict.fromkeys([typed, _typed(typed)]))

        def size(text: str) -> int:   # as `normalise` counts
            return len(text if is_regex(text) else " ".join(text.split()))

        fitting = [c for c in candidates if size(c) <= MAX_ENTRY]
        if not fitting:   # before any folding: it is on the event loop
            await ephemeral(interaction, f"That entry is {min(map(size, candidates))} characters long; no entry "
                                         f"is longer than {MAX_ENTRY}. Nothing was removed.")
            return
        keys = [identity(c) for c in fitting]   # each folded once; the stored entries' are cached
        guild_id = interaction.guild_id or 0
        await _defer_privately(interaction)
        async with self._lock:
            current = await entries(self.bot.queue, guild_id)
            removed: list[str] = []
            for key in keys:
                removed = [e for e in current if identity(e) == key]
                if removed:
                    break
            if not removed:
                await ephemeral(interaction, f"{_code(fitting[-1])} is not on the "
                                             "list; `/queue-admin ban-word list` shows it.")
                return
            keep = [e for e in current if e not in removed]
            await self.bot.queue.set_setting(setting_key(guild_id), keep)
        log.info("user %s removed %r from the refused words of server %s (entries %r)",
                 interaction.user.id, typed, guild_id, removed)
        tail = (f": {'they are' if len(removed) > 1 else 'it is'} allowed again. "
                f"The list has {len(keep)} entr{'y' if len(keep) == 1 else 'ies'}.")
        # What was removed, cut to fit (an older list may hold an entry too long to show whole).
        what = _shown_entries(removed, render.CONTENT_LIMIT - len("Removed ") - len(tail))
        await ephemeral(interaction, f"Removed {what}{tail}")

    async def show(self, interaction: discord.Interaction, page: int = 1) -> None:
        from bot.imagine import ephemeral, in_time   # noqa: PLC0415

        if not await self._admin(interaction):
            return
        if page < 1:   # Discord enforces the option's minimum; this is for a value that arrives anyway
            await ephemeral(interaction, f"`page` must be 1 or more (you gave {page}).")
            return
        # A read: a private "thinking…" first when it is slower than Discord's window allows.
        current = await in_time(interaction, entries(self.bot.queue, interaction.guild_id), defer="private")
        if not current:
            await ephemeral(interaction, "No words or patterns are refused in this server.")
            return
        text, pages = _listing(current, page)
        if not text:
            await ephemeral(interaction, f"There is no page {page}: the list has {pages} "
                                         f"page{'s' if pages != 1 else ''} of {len(current)} entr{'y' if len(current) == 1 else 'ies'}. "
                                         f"`/queue-admin ban-word list page:{pages}` shows the last.")
            return
        await ephemeral(interaction, text)
