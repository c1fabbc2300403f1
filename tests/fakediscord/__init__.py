"""A fake Discord server (REST + gateway + CDN) for end-to-end tests of the discord.py bot.

See server.py for the API; the usual entry points are :class:`FakeDiscord` and :func:`running_bot`.
"""

from .server import (
    SPEC_PATH,
    FakeDiscord,
    FakeGuild,
    GatewaySession,
    InjectedError,
    InteractionRecord,
    Permission,
    RecordedFile,
    RecordedRequest,
    StoredMessage,
    Violation,
    load_spec,
    running_bot,
)

__all__ = [
    "SPEC_PATH",
    "FakeDiscord",
    "FakeGuild",
    "GatewaySession",
    "InjectedError",
    "InteractionRecord",
    "Permission",
    "RecordedFile",
    "RecordedRequest",
    "StoredMessage",
    "Violation",
    "load_spec",
    "running_bot",
]
