"""Log output without Discord secrets.

At DEBUG, discord.py logs every gateway event whole (an INTERACTION_CREATE carries the
interaction's token) and every webhook request's URL (`/webhooks/<app id>/<token>/...`,
`/interactions/<id>/<token>/callback`). An interaction token lets whoever reads it post and edit
as the bot in that channel for 15 minutes; the bot token, for ever. `setup_logging` installs the
bot's one log handler (discord.py's format, on the root logger) with a `Redactor`: its filter
rewrites each record's message (so any handler after it sees the redacted text too), and the
handler redacts its whole formatted output as well (tracebacks, whose exception texts may quote a
URL). DEBUG stays useful: ids, routes and payloads are kept, only the secrets read `***`.
"""

from __future__ import annotations

import logging
import re
from typing import IO, Iterable

import discord

MASK = "***"

# What discord.py's own DEBUG lines and errors put secrets in.
PATTERNS: list[tuple[re.Pattern[str], str]] = [
    # https://discord.com/api/v10/interactions/<id>/<token>/callback
    (re.compile(r"(/interactions/\d+/)[^/\s'\"?#]+"), r"\1" + MASK),
    # .../webhooks/<application or webhook id>/<token>[/messages/@original][?wait=true]
    (re.compile(r"(/webhooks/\d+/)[^/\s'\"?#]+"), r"\1" + MASK),
    # a payload's 'token': '...' (a dict's repr) or "token": "..." (JSON), any *_token key too
    (re.compile(r"""(['"](?:\w*_)?token['"]\s*:\s*)(['"])[^'"]*\2""", re.IGNORECASE), r"\1\2" + MASK + r"\2"),
    # a bot token's shape (the configured token is masked as itself; this is for any other):
    # <base64 of the user id's 17-20 digits>.<6-character timestamp>.<27+ character hmac>
    # Base64 of ASCII digits comes in groups of four characters, each from a small set ([MNO],
    # [DTjz], [AEIMQUYcgk], [w-z0-5]): 17 digits are five groups and three characters, 18 six
    # groups, 19 six and two ([MNO][AQgw]), 20 six and three (23-27 characters in all). A long
    # dotted name (`a_long_module_name.something.and_a_long_tail`) is not of that alphabet.
    (re.compile(r"(?<![A-Za-z0-9_-])(?:[MNO][DTjz][AEIMQUYcgk][w-z0-5]){5,6}(?:[MNO][DTjz][AEIMQUYcgk]|[MNO][AQgw])?"
                r"\.[A-Za-z0-9_-]{6}\.[A-Za-z0-9_-]{27,}"), MASK),
]


class Redactor(logging.Filter):
    """A filter that rewrites a record's message with every secret masked (never drops one).
    `secrets`: exact strings to mask as well (the bot token)."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self.secrets = sorted({s for s in secrets if s and len(s) >= 8}, key=len, reverse=True)

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        for pattern, replacement in PATTERNS:
            text = pattern.sub(replacement, text)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string: logging reports it as it always does
            return True
        clean = self.redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        return True


class RedactingHandler(logging.StreamHandler):
    """A stream handler whose every output line went through `redactor` (message and traceback)."""

    def __init__(self, redactor: Redactor, stream: IO[str] | None = None) -> None:
        super().__init__(stream)
        self.redactor = redactor
        self.addFilter(redactor)

    def format(self, record: logging.LogRecord) -> str:
        return self.redactor.redact(super().format(record))


PLAIN_FORMAT = "[{asctime}] [{levelname:<8}] {name}: {message}"   # discord.py's own, without colour


def setup_logging(level: int, secrets: Iterable[str] = (), stream: IO[str] | None = None) -> RedactingHandler:
    """The bot's logging: discord.py's setup (root logger) with a redacting handler on stderr (or
    `stream`). Returns the handler. Its colour format only on a terminal: discord.py also colours
    any stream inside a container (it finds /.dockerenv), which puts ANSI codes in `docker logs`
    and in every log collector's lines."""
    handler = RedactingHandler(Redactor(secrets), stream)
    colour = getattr(discord.utils, "_ColourFormatter", None)   # discord.py's, as it would pick
    if colour is not None and colour_terminal(handler.stream):
        formatter: logging.Formatter = colour()
    else:
        formatter = logging.Formatter(PLAIN_FORMAT, "%Y-%m-%d %H:%M:%S", style="{")
    discord.utils.setup_logging(handler=handler, formatter=formatter, level=level, root=True)
    return handler


def colour_terminal(stream: IO[str]) -> bool:
    """A terminal that shows colours: a TTY, and one discord.py thinks can (Windows consoles)."""
    try:
        tty = bool(stream.isatty())
    except (AttributeError, ValueError):   # no isatty, or a closed stream
        return False
    return tty and discord.utils.stream_supports_colour(stream)
