"""The Unicode rules for user text, in one place (torch-free, no bot imports).

- invisible: what draws nothing -- white space, control and format characters (zero-width spaces
  and joiners, soft hyphens, bidi marks), combining marks with nothing to sit on, and the blank
  letters (Hangul fillers, the braille blank). `has_visible_text` says whether anything is left.
- format characters (`is_format`, category Cf): invisible and meaningless to how text reads, so a
  look-alike spelling is read without them (bot.moderation.fold).
- bidi controls: embeddings, overrides and isolates (U+202A-U+202E, U+2066-U+2069). Echoed, they
  would reorder the text around them (the job id and mention after a prompt, the rest of a
  refusal); `tame` drops them.
- combining marks: at most MAX_MARKS in a row are echoed (`tame`); hundreds on one letter (zalgo)
  pile up over other messages.

Used by engine.prompts (emptiness of prompts and parts, the quotes in PromptError messages),
bot.render (every echo of user text) and bot.moderation.fold.
"""

from __future__ import annotations

import unicodedata

MAX_MARKS = 4     # combining marks in a row: enough for any script's stacked diacritics
BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
# Letters that draw nothing (Hangul fillers, the braille blank): used to make text look empty.
BLANK_LETTERS = frozenset("\u115f\u1160\u3164\uffa0\u2800")
_MARKS = ("Mn", "Me")
_INVISIBLE = ("Cc", "Cf", "Cs", "Mn", "Me", "Zs", "Zl", "Zp")


def is_mark(ch: str) -> bool:
    """A combining mark (it sits on the character before it)."""
    return unicodedata.category(ch) in _MARKS


def is_format(ch: str) -> bool:
    """A format character: zero-width spaces and joiners, soft hyphens, bidi marks and controls."""
    return unicodedata.category(ch) == "Cf"


def is_invisible(ch: str) -> bool:
    """`ch` draws nothing on its own (see the module's docstring)."""
    return ch.isspace() or ch in BLANK_LETTERS or unicodedata.category(ch) in _INVISIBLE


def has_visible_text(text: str) -> bool:
    """False when `text` shows nothing: only spaces, control and format characters (zero-width
    spaces, bidi marks, soft hyphens...), combining marks with nothing to sit on, blank letters."""
    return any(not is_invisible(ch) for ch in text)


def tame(text: str) -> str:
    """`text` on one line (white space runs as one space), without bidi embeddings, overrides and
    isolates, with at most MAX_MARKS combining marks in a row."""
    out: list[str] = []
    marks = 0
    for ch in " ".join(text.split()):
        if ch in BIDI_CONTROLS:
            continue
        marks = marks + 1 if is_mark(ch) else 0
        if marks <= MAX_MARKS:
            out.append(ch)
    return "".join(out)


def clip(text: str, limit: int) -> str:
    """`text` tamed, cut to at most `limit` characters (the last one then "…")."""
    flat = tame(text)
    if len(flat) > limit:
        flat = flat[: max(0, limit - 1)].rstrip() + "…"
    return flat


__all__ = ["BIDI_CONTROLS", "BLANK_LETTERS", "MAX_MARKS", "clip", "has_visible_text", "is_format",
           "is_invisible", "is_mark", "tame"]
