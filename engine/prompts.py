"""Weighted prompts: `a house | by Escher:0.5 | blurry:-1` -> parts, each its own CLIP target.

Torch-free: the bot validates prompts with this before anything is queued; engine.generate
re-exports these names.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from engine.text import clip, has_visible_text, is_format

MAX_PROMPT_PARTS = 8
CLIP_CONTEXT = 77   # tokens CLIP's text encoder reads, its start and end markers included


class PromptError(ValueError):
    """A prompt the engine refuses; the message says what to fix."""


# Signs as people type them: ASCII, and the Unicode minus (U+2212) that word processors and phone
# keyboards substitute, its small and full-width forms, the full-width plus; and the en and em
# dashes (U+2013, U+2014) that phones and macOS autocorrect "-" and "--" into (`blurry:–1`). A dash
# is a sign only right before a weight's number: `a house – blurry`, with no `:number`, stays text.
_MINUS = "\u2212\ufe63\uff0d\u2013\u2014"
_PLUS = "\uff0b"
_SIGN = f"[+\\-{_MINUS}{_PLUS}]"
_NUMBER = rf"{_SIGN}?(\d+(\.\d*)?|\.\d+)([eE]{_SIGN}?\d+)?"   # 0.5, -1, .5, -1e1, 1E-2
_WEIGHT = re.compile(rf"^(?P<text>.*?):\s*(?P<weight>{_NUMBER})\s*$", re.S)
# A colon directly between digits and followed by a whole number only is text, not a weight's: a
# time (10:30, 7:00), a ratio (16:9), a verse (John 3:16). Read as weights these changed the words
# and the pull ("a clock showing 10" at weight 30), or refused the prompt (7:00: weight 0). A
# decimal weight stays one (`photo from 1985:0.5`, as written before this rule); a whole one after a
# digit takes a space: `16:9: 2`.
# Brackets, quotes and marks that may wrap a weight or follow it: `(blurry:-1)`, `blurry:-1,`.
_OPENERS = "([{<\"'`*\u201c\u2018\u00ab"
_CLOSERS = ")]}>\"'`*\u201d\u2019\u00bb,;.!?"
_DIGIT_COLON_WHOLE = re.compile(rf"\d:\d+[\s{re.escape(_CLOSERS)}]*$")   # `at 10:30.`, `(16:9)` too
_FULL_NUMBER = re.compile(rf"{_NUMBER}")
# What follows a part's last ':' that is meant as a weight but is no number the parser takes.
# Read as text, such a part would get weight +1: "push away" turned into "pull toward". Only a
# tail that is one token and plainly number-like, so ordinary text after a colon stays text
# ("temperature: -5 degrees", "sale: -50%", "price: 1,000", "my grandmother: Nan"):
# - a signed nan / inf (-inf), or an unsigned one written straight after the colon (blurry:nan);
# - a decimal comma: signed (-0,5) or 0,5;
# - a sign, digits and dots, then at most two letters (-1x, -1.5.2, -0.5a);
# - the same with a space after the sign (- 1, + 1) or a doubled sign (--1): the tail as a whole
#   is still one number gone wrong, and read as text `- 1` would pull toward the part;
# - any of these, or a number, with brackets, quotes or marks around or after it: `(blurry:-1)`,
#   `blurry:(-1)`, `blurry:-1,` (Stable Diffusion's `(blurry:1.5)` too: read as text it lost its
#   pull); an unsigned one only straight after the colon, as a weight is written: `rated: 5!`,
#   `(rated: 18)` and `room: 101?` are text. Not a word (`smile :-)`), nor a time (`(at 10:30)`:
#   _DIGIT_COLON_WHOLE).
_SIGNED_JUNK = re.compile(rf"^{_SIGN}(nan|inf|infinity)$|^({_SIGN}\d+|{_SIGN}?0),\d+$"
                          rf"|^{_SIGN}+\s*\.?\d[\d.]*[a-z]{{0,2}}$", re.I)
_BARE_NAN = re.compile(r"^(nan|inf|infinity)$", re.I)


def _colon_is_text(raw: str, colon: int) -> bool:
    """Whether the colon at `raw[colon]` follows a digit and only a whole number follows it (see
    _DIGIT_COLON_WHOLE)."""
    return colon > 0 and _DIGIT_COLON_WHOLE.match(raw, colon - 1) is not None


def _not_a_weight(tail: str) -> bool:
    """Whether `tail`, what follows a part's last ':', is a weight gone wrong (see _SIGNED_JUNK)."""
    token = tail.strip()
    if _SIGNED_JUNK.match(token) or (tail == token and _BARE_NAN.match(token)):
        return True
    bare = token.lstrip(_OPENERS + " \t").rstrip(_CLOSERS + " \t")
    if bare == token or not (_FULL_NUMBER.fullmatch(bare) or _SIGNED_JUNK.match(bare)):
        return False
    return bare[:1] in f"+-{_MINUS}{_PLUS}" or not tail[:1].isspace()
_SIGNS = str.maketrans({c: "-" for c in _MINUS} | {_PLUS: "+"})
# Full-width and small colons, as Chinese and Japanese input methods type them (`ぼやけた：-1`).
_WIDE_COLONS = "\uff1a\ufe55"


def _hidden_weight(raw: str) -> str | None:
    """The weight `raw` ends in once its format characters (a zero-width space or a bidi mark
    pasted from the web or typed by a right-to-left keyboard, a soft hyphen) are dropped and a
    full-width colon is read as ':', when `raw` itself has none: `blurry:-1` + U+200B was text at
    weight +1, "push away" turned into "pull toward" with nothing to see. None otherwise."""
    seen = "".join(c for c in raw if not is_format(c))
    for colon in _WIDE_COLONS:
        seen = seen.replace(colon, ":")
    match = _WEIGHT.match(seen) if seen != raw else None
    if match is None or _colon_is_text(seen, match.end("text")) or not has_visible_text(match["text"]):
        return None
    return ":" + match["weight"]


def _quote(text: str, limit: int = 40) -> str:
    """`text` for an error message: tamed (engine.text: one line, no bidi controls, combining
    marks capped), quoted (repr: what else is invisible is spelled out), at most `limit` + 2
    characters with the quotes: fewer of the text's characters when spelled-out ones (`\u200b`:
    six each) would pass that, so a message that quotes it is never cut inside an escape."""
    quoted = repr(clip(text, limit))
    keep = limit
    while len(quoted) > limit + 2 and keep > 1:
        keep -= max(1, (len(quoted) - limit - 2) // 6)
        quoted = repr(clip(text, max(1, keep)))
    return quoted


@dataclass(frozen=True)
class PromptPart:
    text: str
    weight: float = 1.0


def parse_prompt(prompt: str, image_weights: Sequence[float] = (), *, strict: bool = True) -> list[PromptPart]:
    """`a house | by Escher:0.5 | blurry:-1` -> parts with weights (default 1).

    A trailing `:<number>` is a weight; any other colon is part of the text, and so is one directly
    between digits with only a whole number after it (`10:30`, `16:9`; `1985:0.5` is a weight).

    Something must be pulled toward: a part with a positive weight, or an image prompt with one
    (`image_weights`: the job's image prompts' weights). Its loss is minus the weighted sum of the
    picture's similarities to every target (engine.generate), text and image alike, so
    `blurry:-1` with an image prompt of weight 1 is well defined: toward the image, away from
    "blurry". With nothing positive the loss only pushes away, toward nothing in particular.

    `strict` (a prompt being submitted): a part ending in what looks like a weight gone wrong
    (`blurry:-1x`, `(blurry:-1)`, `blurry:-1,`) is refused. Not strict (a stored prompt read again:
    the worker's targets, a Reroll or Continue of a job, its reply's weights line): such a part is
    text at weight 1, as older versions read it, so a job queued before the rules tightened still
    runs as it was queued.
    """
    if prompt is None or not has_visible_text(prompt):
        raise PromptError("the prompt is empty: describe the picture you want")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:   # JSON can carry half of a UTF-16 pair; nothing downstream can store it
        raise PromptError("the prompt has a broken character (half of a UTF-16 surrogate pair): type it again") from None
    parts = []
    for raw in prompt.split("|"):
        raw = raw.strip()
        if not has_visible_text(raw):
            raise PromptError("an empty part between '|' separators: remove the extra '|'")
        match = _WEIGHT.match(raw)
        if match and not _colon_is_text(raw, match.end("text")):
            text, weight = match["text"].strip(), float(match["weight"].translate(_SIGNS))
        else:
            text, weight = raw, 1.0
            head, colon, tail = raw.rpartition(":")
            hidden = _hidden_weight(raw) if strict else None
            if hidden is not None:
                raise PromptError(f"the part {_quote(raw)} ends in what reads as the weight {_quote(hidden, 20)}, but "
                                  "with an invisible character or a full-width colon in it, so it would be text: "
                                  f"type it again as {hidden} with a plain ':' (or, if it is text, drop the colon)")
            if (strict and colon and has_visible_text(head) and not _colon_is_text(raw, len(head))
                    and _not_a_weight(tail)):
                raise PromptError(f"the part {_quote(raw)} ends in {_quote(':' + tail.strip(), 20)}, which is not a "
                                  "weight: write a number between -100 and 100, with nothing around or after it "
                                  "(e.g. blurry:-1 or by Escher:0.5); if it is text, not a weight, drop that colon")
        if not has_visible_text(text):
            raise PromptError(f"the part {_quote(raw)} has a weight but no text")
        if not math.isfinite(weight) or abs(weight) > 100:
            # A weight comes only after a colon, and "retro movie poster: 1984" meant its colon as text.
            written = raw[match.end("text"):].strip() if match else ""
            raise PromptError(f"the weight of {_quote(text)} must be a number between -100 and 100; if "
                              f"{_quote(written, 20)} is text, not a weight, drop that colon or add a word "
                              "after the number")
        parts.append(PromptPart(text, weight))
    if len(parts) > MAX_PROMPT_PARTS:
        raise PromptError(f"{len(parts)} prompt parts; at most {MAX_PROMPT_PARTS} are allowed")
    if not any(p.weight > 0 for p in parts) and not any(w > 0 for w in image_weights):
        if image_weights:
            raise PromptError("at least one part, or the image prompt, needs a positive weight")
        raise PromptError("at least one part needs a positive weight")
    return parts


@functools.lru_cache(maxsize=1)
def _clip_tokenizer() -> Any:
    """openai-clip's own BPE tokenizer (the one engine.generate tokenizes with), loaded from its
    file: `import clip` would import torch, and the bot checks prompts without it."""
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("openai-clip is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "simple_tokenizer.py"
    module_spec = importlib.util.spec_from_file_location("_imagine_clip_simple_tokenizer", path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.SimpleTokenizer()


def clip_overflow(parts: Sequence[PromptPart], context_length: int = CLIP_CONTEXT) -> list[str]:
    """A note for each part longer than CLIP reads (it is cut there, as engine.generate does),
    naming the words it ignores, so that a person can move what matters forward. [] when all fit."""
    tokenizer = _clip_tokenizer()
    room = context_length - 2   # the start and end markers
    notes = []
    for part in parts:
        tokens = tokenizer.encode(part.text)
        if len(tokens) > room:
            ignored, n = tokenizer.decode(tokens[room:]).strip(), len(tokens) - room
            notes.append(f"CLIP reads only the first {room} tokens of {_quote(part.text)}: "
                         f"it ignores {_quote(ignored, 60)} ({n} token{'s' if n != 1 else ''})")
    return notes


__all__ = ["CLIP_CONTEXT", "MAX_PROMPT_PARTS", "PromptError", "PromptPart", "clip_overflow", "has_visible_text",
           "parse_prompt"]
