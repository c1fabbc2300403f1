"""Weighted prompts: `a house | by Escher:0.5 | blurry:-1` -> parts, each its own CLIP target.

Torch-free: the bot validates prompts with this before anything is queued; engine.generate
re-exports these names.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from engine.text import clip, has_visible_text

MAX_PROMPT_PARTS = 8


class PromptError(ValueError):
    """A prompt the engine refuses; the message says what to fix."""


_WEIGHT = re.compile(r"^(?P<text>.*?):\s*(?P<weight>[+-]?(\d+(\.\d*)?|\.\d+))\s*$", re.S)


def _quote(text: str, limit: int = 40) -> str:
    """`text` for an error message: tamed (engine.text: one line, no bidi controls, combining
    marks capped), at most `limit` characters, quoted (repr: what else is invisible is spelled out)."""
    return repr(clip(text, limit))


@dataclass(frozen=True)
class PromptPart:
    text: str
    weight: float = 1.0


def parse_prompt(prompt: str) -> list[PromptPart]:
    """`a house | by Escher:0.5 | blurry:-1` -> parts with weights (default 1).

    A trailing `:<number>` is a weight; any other colon is part of the text.
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
        text, weight = (match["text"].strip(), float(match["weight"])) if match else (raw, 1.0)
        if not has_visible_text(text):
            raise PromptError(f"the part {_quote(raw)} has a weight but no text")
        if not math.isfinite(weight) or abs(weight) > 100:
            raise PromptError(f"the weight of {_quote(text)} must be a number between -100 and 100")
        parts.append(PromptPart(text, weight))
    if len(parts) > MAX_PROMPT_PARTS:
        raise PromptError(f"{len(parts)} prompt parts; at most {MAX_PROMPT_PARTS} are allowed")
    if not any(p.weight > 0 for p in parts):
        raise PromptError("at least one part needs a positive weight")
    return parts


__all__ = ["MAX_PROMPT_PARTS", "PromptError", "PromptPart", "has_visible_text", "parse_prompt"]
