"""A fake Discord (REST API v10 + gateway websocket + CDN) for end-to-end tests of discord.py bots.

The real discord.py client talks to it over real HTTP and a real websocket on 127.0.0.1; the only
things patched in discord.py are two class attributes that hold Discord's addresses
(``discord.http.Route.BASE`` and ``discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY``).

Every request is recorded (``FakeDiscord.requests``); every JSON body and every multipart
``payload_json`` is validated against Discord's official OpenAPI spec (``openapi.json`` beside this
file) plus a few documented rules the spec does not express; what Discord would reject is answered
as Discord answers it (400 / 50035) and recorded in ``FakeDiscord.violations``.

Typical use::

    async with FakeDiscord() as fd:                    # starts the server, points discord.py at it
        bot = commands.Bot(command_prefix="!", intents=discord.Intents.default())
        async with running_bot(fd, bot):               # bot.start(fd.bot_token), waits until ready
            await bot.tree.sync(guild=discord.Object(fd.guild_id))
            inter = await fd.send_slash_command("ping", {"text": "hi"})
            await fd.wait_for(lambda: inter.original_message and inter.original_message.attachments)
        fd.assert_clean()                              # no spec violations, no unknown routes
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime as _dt
import hashlib
import itertools
import json
import mimetypes
import re
import secrets
import struct
import threading
import time
import traceback
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Dict, Iterable, List, Optional, Set, Tuple, Union
from urllib.parse import quote

import jsonschema
from aiohttp import WSMsgType, web
from multidict import CIMultiDict
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

try:  # zstd-stream transport compression, only if discord.py could ask for it
    from zstandard import ZstdCompressor as _ZstdCompressor  # type: ignore

    _ZSTD = "zstandard"
except ImportError:  # pragma: no cover - depends on the environment
    try:
        from compression.zstd import ZstdCompressor as _ZstdCompressor  # type: ignore

        _ZSTD = "compression.zstd"
    except ImportError:
        _ZstdCompressor = None
        _ZSTD = None

__all__ = [
    "FakeDiscord",
    "RecordedRequest",
    "RecordedFile",
    "Violation",
    "StoredMessage",
    "InteractionRecord",
    "InjectedError",
    "FakeGuild",
    "GatewaySession",
    "running_bot",
    "SPEC_PATH",
    "Permission",
]

SPEC_PATH = Path(__file__).with_name("openapi.json")
API_VERSION = 10
DISCORD_EPOCH_MS = 1420070400000


class Permission:
    CREATE_INSTANT_INVITE = 1 << 0
    ADMINISTRATOR = 1 << 3
    ADD_REACTIONS = 1 << 6
    VIEW_CHANNEL = 1 << 10
    SEND_MESSAGES = 1 << 11
    MANAGE_MESSAGES = 1 << 13
    EMBED_LINKS = 1 << 14
    ATTACH_FILES = 1 << 15
    READ_MESSAGE_HISTORY = 1 << 16
    MENTION_EVERYONE = 1 << 17
    USE_EXTERNAL_EMOJIS = 1 << 18
    CONNECT = 1 << 20
    SPEAK = 1 << 21
    CHANGE_NICKNAME = 1 << 26
    USE_APPLICATION_COMMANDS = 1 << 31
    MANAGE_THREADS = 1 << 34
    CREATE_PUBLIC_THREADS = 1 << 35
    SEND_MESSAGES_IN_THREADS = 1 << 38
    ALL = (1 << 51) - 1
    # Server-wide permissions, kept in a channel one cannot view (kick, ban, administrator, manage
    # server, audit log, insights, nicknames, expressions, timeouts, monetization analytics)
    GUILD_ONLY = sum(1 << b for b in (1, 2, 3, 5, 7, 19, 26, 27, 30, 40, 41, 43))

    EVERYONE = (
        CREATE_INSTANT_INVITE | ADD_REACTIONS | VIEW_CHANNEL | SEND_MESSAGES | EMBED_LINKS | ATTACH_FILES
        | READ_MESSAGE_HISTORY | USE_EXTERNAL_EMOJIS | CONNECT | SPEAK | CHANGE_NICKNAME
        | USE_APPLICATION_COMMANDS | CREATE_PUBLIC_THREADS | SEND_MESSAGES_IN_THREADS
    )
    BOT = EVERYONE | MANAGE_MESSAGES


# JSON error codes
THREAD_ARCHIVED = 50083

# message flags
FLAG_SUPPRESS_EMBEDS = 1 << 2
FLAG_EPHEMERAL = 1 << 6
FLAG_LOADING = 1 << 7
FLAG_SUPPRESS_NOTIFICATIONS = 1 << 12
FLAG_IS_COMPONENTS_V2 = 1 << 15

# gateway intents
INTENT_GUILDS = 1 << 0
INTENT_GUILD_MEMBERS = 1 << 1
INTENT_GUILD_MESSAGES = 1 << 9
INTENT_PRIVILEGED = (1 << 1) | (1 << 8) | (1 << 15)  # members, presences, message_content

MAX_CONTENT = 2000  # the spec says 4000 for some routes; bots get 2000
MAX_ACTION_ROWS = 5  # the spec allows 40 top-level components; without IS_COMPONENTS_V2 it is 5 rows
MAX_ATTACHMENTS = 10


# --------------------------------------------------------------------------------------------
# OpenAPI spec: loading, operation lookup, cached validators
# --------------------------------------------------------------------------------------------

_SPEC_URI = "urn:discord-openapi"
_spec_lock = threading.Lock()
_spec: Optional["_Spec"] = None


def _escape_pointer(token: str) -> str:
    return token.replace("~", "~0").replace("/", "~1")


class _PathTemplate:
    __slots__ = ("template", "segments", "literal_count")

    def __init__(self, template: str) -> None:
        self.template = template
        self.segments: List[Tuple[bool, str]] = []
        for seg in template.strip("/").split("/"):
            if seg.startswith("{") and seg.endswith("}"):
                self.segments.append((True, seg[1:-1]))
            else:
                self.segments.append((False, seg))
        self.literal_count = sum(1 for is_param, _ in self.segments if not is_param)

    def match(self, parts: List[str]) -> Optional[Dict[str, str]]:
        if len(parts) != len(self.segments):
            return None
        params: Dict[str, str] = {}
        for (is_param, name), part in zip(self.segments, parts):
            if is_param:
                if not part:
                    return None
                params[name] = part
            elif name != part:
                return None
        return params


def _best_template(templates: Iterable[_PathTemplate], path: str):
    """The matching template with the most literal segments (``@original`` beats ``{message_id}``)."""
    parts = path.strip("/").split("/")
    found = None
    for t in templates:
        params = t.match(parts)
        if params is not None and (found is None or t.literal_count > found[0].literal_count):
            found = (t, params)
    return found


def _bad_branch(errs) -> bool:
    # an anyOf/oneOf branch that fails on the discriminating "type" or is the wrong JSON type
    for c in errs:
        if list(c.relative_path) == ["type"] and c.validator in ("enum", "const"):
            return True
    return len(errs) == 1 and errs[0].validator == "type" and not errs[0].relative_path


def _deepest_error(err):
    while err.context:
        if all(c.validator == "const" and not c.relative_path for c in err.context):
            break  # an enum spelled as oneOf of consts: report it as such
        branches: Dict[Any, list] = {}
        for c in err.context:
            branches.setdefault(c.relative_schema_path[0], []).append(c)
        viable = [errs for errs in branches.values() if not _bad_branch(errs)]
        if not viable:
            break
        err = max((c for errs in viable for c in errs), key=lambda c: len(c.absolute_path))
    return err


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Spec:
    def __init__(self, doc: Dict[str, Any]) -> None:
        self.doc = doc
        self.registry = Registry().with_resource(_SPEC_URI, Resource(contents=doc, specification=DRAFT202012))
        self.operations: Dict[str, Dict[str, Any]] = {}
        self.templates: List[_PathTemplate] = []
        for path, ops in doc["paths"].items():
            self.templates.append(_PathTemplate(path))
            self.operations[path] = {m.upper(): op for m, op in ops.items() if m != "parameters"}
        self._validators: Dict[Tuple[str, str], Any] = {}
        self._lock = threading.Lock()

    def find(self, method: str, path: str) -> Optional[Tuple[str, bool]]:
        """(spec path template, whether the method is defined there) for an API path."""
        m = _best_template(self.templates, path)
        if m is None:
            return None
        return m[0].template, method.upper() in self.operations[m[0].template]

    def validator(self, template: str, method: str):
        key = (template, method.upper())
        try:
            return self._validators[key]
        except KeyError:
            pass
        with self._lock:
            if key not in self._validators:
                op = self.operations.get(template, {}).get(method.upper())
                v = None
                if op is not None and "requestBody" in op:
                    content = op["requestBody"].get("content", {})
                    for ct in ("application/json", "multipart/form-data"):
                        if ct in content:
                            pointer = "/".join(
                                ["#", "paths", _escape_pointer(template), method.lower(), "requestBody",
                                 "content", _escape_pointer(ct), "schema"]
                            )
                            v = jsonschema.Draft202012Validator({"$ref": _SPEC_URI + pointer}, registry=self.registry)
                            break
                self._validators[key] = v
            return self._validators[key]

    def validate(self, template: str, method: str, body: Any) -> Optional[Tuple[str, Dict[str, Any]]]:
        """None when valid (or when the operation has no request body), else (message, errors)."""
        v = self.validator(template, method)
        if v is None:
            return None
        err = jsonschema.exceptions.best_match(v.iter_errors(body))
        if err is None:
            return None
        err = _deepest_error(err)
        if err.context and all(c.validator == "const" for c in err.context):
            text = f"{_short(err.instance)} is not one of {[c.validator_value for c in err.context]}"
        elif isinstance(err.instance, dict) and any(_bad_branch([c]) and c.relative_path for c in err.context):
            # no anyOf/oneOf branch accepts this "type"
            text = f"a component/object of type {err.instance['type']!r} is not allowed here: {_short(err.instance)}"
        elif err.validator in ("maxLength", "minLength", "maxItems", "minItems", "maximum", "minimum"):
            text = f"{err.validator} {err.validator_value} violated by {_short(err.instance)}"
        else:
            text = err.message if len(err.message) < 300 else err.message[:297] + "..."
        path = [str(p) for p in err.absolute_path]
        return f"{'.'.join(path) or '<body>'}: {text}", _nested_error(path, text)


def _nested_error(path: List[str], text: str, code: str = "SCHEMA_VALIDATION") -> Dict[str, Any]:
    nested: Dict[str, Any] = {"_errors": [{"code": code, "message": text}]}
    for p in reversed(path):
        nested = {p: nested}
    return nested if path else {"_body": nested}


def load_spec() -> _Spec:
    """The parsed spec (cached per process). ``SnowflakeType`` also accepts non-negative integers:
    discord.py sends some ids (attachment ids, allowed_mentions users) as numbers, which Discord accepts."""
    global _spec
    with _spec_lock:
        if _spec is None:
            doc = json.loads(SPEC_PATH.read_bytes())
            schemas = doc["components"]["schemas"]
            schemas["SnowflakeType"] = {"anyOf": [copy.deepcopy(schemas["SnowflakeType"]), {"type": "integer", "minimum": 0}]}
            _spec = _Spec(doc)
        return _spec


# --------------------------------------------------------------------------------------------
# records
# --------------------------------------------------------------------------------------------


@dataclass
class RecordedFile:
    field_name: str  # e.g. "files[0]"
    filename: Optional[str]
    content_type: Optional[str]
    data: bytes


@dataclass
class RecordedRequest:
    method: str
    path: str  # the API path without the /api/v10 prefix, e.g. "/channels/1/messages"
    raw_path: str  # the full path as requested
    query: Dict[str, str]
    headers: "CIMultiDict[str]"  # case-insensitive
    json: Any = None  # the JSON body, or the multipart payload_json, parsed
    files: List[RecordedFile] = field(default_factory=list)
    form: Dict[str, str] = field(default_factory=dict)  # other multipart text fields
    body: bytes = b""  # the raw body when it was not multipart
    multipart: bool = False
    route: Optional[str] = None  # the implemented route template that handled it, if any
    spec_route: Optional[str] = None  # the OpenAPI path template it matches, if any
    params: Dict[str, str] = field(default_factory=dict)
    status: Optional[int] = None
    response: Any = None
    response_headers: Dict[str, str] = field(default_factory=dict)
    timestamp: float = field(default_factory=time.time)
    monotonic: float = field(default_factory=time.monotonic)
    injected: bool = False  # answered by an injected error (rate limit...)
    unknown: bool = False  # no implemented route

    def file(self, index: int = 0) -> RecordedFile:
        return self.files[index]

    def __repr__(self) -> str:
        return f"<RecordedRequest {self.method} {self.path} -> {self.status}>"


@dataclass
class Violation:
    method: str
    path: str
    message: str
    body: Any
    request: Optional[RecordedRequest] = None

    def __str__(self) -> str:
        return f"{self.method} {self.path}: {self.message}"


@dataclass
class InjectedError:
    """A rule that makes the next ``remaining`` requests matching ``method``/``path`` fail."""

    method: Optional[str]
    path: "re.Pattern[str]"
    status: int
    body: Any
    headers: Dict[str, str]
    remaining: int
    hits: List[RecordedRequest] = field(default_factory=list)

    def matches(self, method: str, path: str) -> bool:
        return self.remaining > 0 and (self.method in (None, "*", method)) and bool(self.path.fullmatch(path))


@dataclass
class StoredMessage:
    """A message in the fake's channel state. ``data`` is exactly what the API returns for it."""

    data: Dict[str, Any]
    ephemeral: bool = False
    deleted: bool = False
    interaction_id: Optional[int] = None
    allowed_mentions: Any = None  # as last sent (None = not sent)
    edits: int = 0
    history: List[Dict[str, Any]] = field(default_factory=list)  # snapshots before each edit

    @property
    def id(self) -> int:
        return int(self.data["id"])

    @property
    def channel_id(self) -> int:
        return int(self.data["channel_id"])

    @property
    def content(self) -> str:
        return self.data["content"]

    @property
    def embeds(self) -> List[Dict[str, Any]]:
        return self.data["embeds"]

    @property
    def attachments(self) -> List[Dict[str, Any]]:
        return self.data["attachments"]

    @property
    def components(self) -> List[Dict[str, Any]]:
        return self.data["components"]

    @property
    def flags(self) -> int:
        return self.data["flags"]

    @property
    def custom_ids(self) -> List[str]:
        return [c["custom_id"] for c in _walk_components(self.components) if "custom_id" in c]

    def __repr__(self) -> str:
        state = " deleted" if self.deleted else ""
        return f"<StoredMessage id={self.id} content={self.content[:40]!r} attachments={len(self.attachments)}{state}>"


@dataclass
class InteractionRecord:
    id: int
    token: str
    type: int  # 2 application command, 3 component, ...
    payload: Dict[str, Any]  # the INTERACTION_CREATE data sent to the bot
    created: float  # time.monotonic()
    channel_id: int
    message_id: Optional[int] = None  # for components: the message the component is on
    expired: bool = False
    response_type: Optional[int] = None  # the callback type the bot answered with
    response: Any = None  # the callback body
    callback_request: Optional[RecordedRequest] = None
    original_message_id: Optional[int] = None
    followup_ids: List[int] = field(default_factory=list)
    _fd: Any = field(default=None, repr=False)

    @property
    def acknowledged(self) -> bool:
        return self.response_type is not None

    @property
    def original_message(self) -> Optional[StoredMessage]:
        if self.original_message_id is None or self._fd is None:
            return None
        return self._fd.messages.get(self.original_message_id)

    @property
    def followups(self) -> List[StoredMessage]:
        return [self._fd.messages[m] for m in self.followup_ids]


@dataclass
class FakeGuild:
    """One guild of the fake. Its roles and channels live in :attr:`FakeDiscord.roles` /
    :attr:`FakeDiscord.channels` (keyed by id, unique across guilds); its members (the same users in
    every guild: the bot, Alice the owner with the Admin role, Bob) are its own."""

    id: int
    name: str
    owner_id: int
    admin_role_id: int = 0
    bot_role_id: int = 0
    category_id: int = 0
    channel_id: int = 0  # "general"
    other_channel_id: int = 0  # "imagine"
    role_ids: List[int] = field(default_factory=list)
    members: Dict[int, Dict[str, Any]] = field(default_factory=dict)

    @property
    def everyone_role_id(self) -> int:
        return self.id


class _ApiError(Exception):
    def __init__(self, status: int, code: int, message: str, errors: Any = None, *, violation: Optional[str] = None,
                 headers: Optional[Dict[str, str]] = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.errors = errors
        self.violation = violation
        self.headers = headers or {}

    def body(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"message": self.message, "code": self.code}
        if self.errors is not None:
            out["errors"] = self.errors
        return out


def _form_error(path: List[str], text: str, code: str = "BASE_TYPE_INVALID") -> _ApiError:
    where = ".".join(path) or "<body>"
    return _ApiError(400, 50035, "Invalid Form Body", _nested_error(path, text, code), violation=f"{where}: {text}")


def _unknown_message() -> _ApiError:
    return _ApiError(404, 10008, "Unknown Message")


def _walk_components(components: Iterable[Dict[str, Any]]):
    for c in components or ():
        yield c
        if c.get("components"):
            yield from _walk_components(c["components"])
        if isinstance(c.get("accessory"), dict):
            yield c["accessory"]
        if isinstance(c.get("component"), dict):
            yield c["component"]


def _json_response(status: int, body: Any, headers: Optional[Dict[str, str]] = None) -> web.Response:
    # discord.py parses JSON only when Content-Type is exactly "application/json" (no charset)
    h = {"Content-Type": "application/json"}
    h.update(headers or {})
    if body is None:
        del h["Content-Type"]
        return web.Response(status=status, headers=h)
    return web.Response(status=status, body=json.dumps(body).encode(), headers=h)


def _iso(ts: Optional[float] = None) -> str:
    ts = time.time() if ts is None else ts
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).isoformat(timespec="microseconds")


def _image_size(data: bytes) -> Optional[Tuple[int, int]]:
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
        return struct.unpack(">II", data[16:24])
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return struct.unpack("<HH", data[6:10])
    return None


def _files_index(name: str) -> Optional[int]:
    m = re.fullmatch(r"files\[(\d+)\]", name)
    return int(m.group(1)) if m else None


# --------------------------------------------------------------------------------------------
# gateway
# --------------------------------------------------------------------------------------------


class GatewaySession:
    """One IDENTIFYed gateway session: its shard ``(shard_id, shard_count)`` ((0, 1) when the IDENTIFY
    had no ``shard``), and every dispatch sent to it (``sent``, replayed after a RESUME)."""

    def __init__(self, session_id: str, intents: int, shard: Tuple[int, int] = (0, 1)) -> None:
        self.session_id = session_id
        self.intents = intents
        self.shard = shard
        self.seq = 0
        self.sent: List[Dict[str, Any]] = []  # dispatches, for RESUME replay
        self.conn: Optional["_GatewayConn"] = None
        self.ended = False  # the bot closed it (1000/1001): Discord keeps nothing for it

    @property
    def shard_id(self) -> int:
        return self.shard[0]

    def owns(self, guild_id: Optional[int]) -> bool:
        """Whether this session's shard gets the events of ``guild_id`` (Discord's formula); events of
        no guild (DMs) go to shard 0."""
        if guild_id is None:
            return self.shard[0] == 0
        return (int(guild_id) >> 22) % self.shard[1] == self.shard[0]

    def events(self, name: str) -> List[Dict[str, Any]]:
        """The ``d`` of every ``name`` dispatch sent to this session (kept: the last 500 dispatches)."""
        return [p["d"] for p in self.sent if p["t"] == name]

    def __repr__(self) -> str:
        return f"<GatewaySession shard={list(self.shard)} live={self.conn is not None}>"


class _GatewayConn:
    def __init__(self, ws: web.WebSocketResponse, compress: Optional[str]) -> None:
        self.ws = ws
        self.compress = compress
        self.session: Optional[GatewaySession] = None
        self.dropped = False  # the fake closed it (the session stays resumable)
        self.lock = asyncio.Lock()
        self._z = zlib.compressobj() if compress == "zlib-stream" else None
        self._zstd = None
        if compress == "zstd-stream":
            self._zstd = _ZstdCompressor() if _ZSTD == "compression.zstd" else _ZstdCompressor().compressobj()

    def _encode(self, raw: bytes) -> bytes:
        if self._z is not None:
            return self._z.compress(raw) + self._z.flush(zlib.Z_SYNC_FLUSH)  # ends with 00 00 ff ff
        if _ZSTD == "compression.zstd":  # pragma: no cover
            return self._zstd.compress(raw, mode=self._zstd.FLUSH_BLOCK)
        import zstandard  # type: ignore  # pragma: no cover

        return self._zstd.compress(raw) + self._zstd.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)  # pragma: no cover

    async def send(self, payload: Dict[str, Any]) -> None:
        raw = json.dumps(payload, separators=(",", ":")).encode()
        async with self.lock:  # the compression stream's order must be the sending order
            if self.ws.closed:
                return
            if self.compress:
                await self.ws.send_bytes(self._encode(raw))
            else:
                await self.ws.send_str(raw.decode())


# --------------------------------------------------------------------------------------------
# the fake
# --------------------------------------------------------------------------------------------


_RouteHandler = Callable[["RecordedRequest", Dict[str, str]], Awaitable[Tuple[int, Any]]]


class FakeDiscord:
    """A fake Discord server: one guild (:attr:`guild_id`) with text channels :attr:`channel_id` and
    :attr:`other_channel_id`, roles @everyone / Admin (:attr:`admin_role_id`) / the bot's, and members
    :attr:`bot_user`, :attr:`admin_user` (Admin role, guild owner) and :attr:`member_user` (no role);
    :meth:`add_guild` adds more guilds of the same layout (:attr:`guilds`).

    Sharding as Discord does it: ``GET /gateway/bot`` recommends ``shards`` (with ``max_concurrency``);
    each IDENTIFY may carry ``shard: [id, count]`` and gets the guilds with ``(guild_id >> 22) % count
    == id`` (READY, GUILD_CREATE, and every later event of those guilds; events of no guild go to
    shard 0). ``require_sharding=True`` closes an IDENTIFY with fewer than ``shards`` shards with 4011
    (Sharding required); a malformed ``shard`` is closed with 4010 (Invalid shard). Events for a shard
    whose connection dropped wait for its RESUME, as on Discord.

    Start it with ``async with FakeDiscord(...) as fd`` (or ``await fd.start()`` / ``await fd.close()``);
    run a bot against it with :func:`running_bot`. Then:

    * inject: :meth:`send_slash_command`, :meth:`click_button`, :meth:`select`, :meth:`submit_modal`,
      :meth:`delete_message`, :meth:`delete_channel`,
      :meth:`dispatch` (any gateway event), :meth:`request_reconnect`, :meth:`drop_connection`,
      :meth:`hold_resumes` / :meth:`release_resumes`, :meth:`hold_gateway` / :meth:`release_gateway`;
    * break things: :meth:`rate_limit`, :meth:`inject_error`, :meth:`expire_tokens`, :attr:`token_expiry`,
      :attr:`attachment_size_limit`, ``realistic_rate_limits=True`` with :attr:`bucket_limits`;
    * observe: :attr:`requests`, :meth:`find_requests`, :meth:`wait_for_request`, :meth:`wait_for`,
      :attr:`messages`, :meth:`channel_messages`, :attr:`interactions`, :attr:`global_commands`,
      :attr:`guild_commands`, :attr:`violations`, :attr:`unknown_requests`, :meth:`assert_clean`,
      :attr:`identifies`, :attr:`sessions`, :attr:`live_shards`.
    """

    def __init__(
        self,
        *,
        token_expiry: float = 15 * 60,
        interaction_deadline: Optional[float] = 3.0,
        validate: bool = True,
        realistic_rate_limits: bool = False,
        heartbeat_interval: float = 41.25,
        attachment_size_limit: int = 10 * 1024 * 1024,
        allowed_privileged_intents: int = INTENT_PRIVILEGED,
        bot_token: Optional[str] = None,
        host: str = "127.0.0.1",
        shards: int = 1,
        require_sharding: bool = False,
        max_concurrency: int = 1,
    ) -> None:
        if shards < 1 or max_concurrency < 1:
            raise ValueError("shards and max_concurrency must be at least 1")
        self.shards = shards  # what GET /gateway/bot recommends
        self.require_sharding = require_sharding
        self.max_concurrency = max_concurrency
        self.token_expiry = token_expiry
        self.interaction_deadline = interaction_deadline
        self.validate = validate
        self.realistic_rate_limits = realistic_rate_limits
        self.heartbeat_interval = heartbeat_interval
        self.attachment_size_limit = attachment_size_limit
        self.allowed_privileged_intents = allowed_privileged_intents
        self.host = host
        self.port: int = 0
        # (limit, period s) per bucket, as Discord roughly has them; honest in the headers only when
        # realistic_rate_limits (then exceeding one answers 429), else Remaining stays at limit - 1
        self.bucket_limits: Dict[str, Tuple[int, float]] = {
            "webhook": (5, 2.0),  # an interaction token's messages: ~5 edits / 2 s
            "channel-create": (5, 5.0),  # messages sent to one channel
            "channel-edit": (5, 5.0),  # message edits in one channel
            "channel-delete": (5, 1.0),
            "default": (50, 1.0),
        }

        self._last_snowflake = 0

        # identities
        self.bot_user: Dict[str, Any] = self._user("imagine-bot", bot=True, discriminator="4242")
        self.application_id: int = int(self.bot_user["id"])
        self.bot_token = bot_token or f"{_b64id(self.application_id)}.fake.{secrets.token_urlsafe(27)}"
        # The installation contexts enabled for the application in the Developer Portal (0: guild
        # install, 1: user install); a global command synced without `integration_types` gets these.
        self.install_types: List[int] = [0]
        # Every interaction's `authorizing_integration_owners`; None: the guild's install, {"0": guild
        # id}. {"1": user id} alone: the command came through a user install, in a server that never
        # added the bot. {}: no owners at all (Discord may send that for a component on a message
        # the bot posted with its own token); click_button / select / submit_modal take one too.
        self.integration_owners: Optional[Dict[str, str]] = None
        # Seconds by which the bot's clock is ahead of Discord's: every interaction's id (the time
        # Discord made it) reads that much older to the bot. Negative: behind. Discord's own 3 s
        # (interaction_deadline) still count from when the fake made the interaction.
        self.interaction_clock_skew: float = 0.0
        self.admin_user: Dict[str, Any] = self._user("alice", global_name="Alice")
        self.member_user: Dict[str, Any] = self._user("bob", global_name="Bob")
        self.users: Dict[int, Dict[str, Any]] = {}
        for u in (self.bot_user, self.admin_user, self.member_user):
            self.users[int(u["id"])] = u

        # one test guild (the primary one; add_guild adds more)
        self.guilds: Dict[int, FakeGuild] = {}
        self.roles: Dict[int, Dict[str, Any]] = {}
        self.channels: Dict[int, Dict[str, Any]] = {}
        # thread id -> ids of its members (the owner from the start; add_thread_member adds more)
        self.thread_members: Dict[int, Set[int]] = {}
        self.deleted_channels: Set[int] = set()  # delete_channel's: an interaction there cannot follow up
        primary = self._new_guild("Fake Guild", self.snowflake())
        self.guild_id: int = primary.id
        self.everyone_role_id = primary.everyone_role_id
        self.admin_role_id: int = primary.admin_role_id
        self.bot_role_id: int = primary.bot_role_id
        self.category_id = primary.category_id
        self.channel_id: int = primary.channel_id
        self.other_channel_id: int = primary.other_channel_id
        self.members: Dict[int, Dict[str, Any]] = primary.members

        # state
        self.requests: List[RecordedRequest] = []
        self.violations: List[Violation] = []
        self.server_errors: List[str] = []  # tracebacks of bugs in the fake itself
        self.cdn_requests: List[RecordedRequest] = []
        self.messages: Dict[int, StoredMessage] = {}
        # (channel id, nonce) -> (message id, monotonic time) of the bot's posts with enforce_nonce
        self.nonces: Dict[tuple, tuple] = {}
        # Discord: "checked for uniqueness in the past few minutes" (not documented more exactly)
        self.nonce_window = 300.0
        self.interactions: Dict[int, InteractionRecord] = {}
        self.global_commands: List[Dict[str, Any]] = []
        self.guild_commands: Dict[int, List[Dict[str, Any]]] = {}
        self.injected: List[InjectedError] = []
        self.gateway_received: List[Dict[str, Any]] = []  # what the bot sent over the gateway
        self.gateway_connects: List[Dict[str, str]] = []  # the query string of each websocket connection
        self.identify_count = 0
        self.resume_count = 0
        # every accepted IDENTIFY: {"shard": [id, count] or None, "at": time.monotonic(), "session_id": ...}
        self.identifies: List[Dict[str, Any]] = []
        self._resumes_open = asyncio.Event()
        self._resumes_open.set()
        self._gateway_open = asyncio.Event()  # hold_gateway(): new connections get no HELLO
        self._gateway_open.set()
        self._blobs: Dict[int, Tuple[str, str, bytes]] = {}
        self._sessions: Dict[str, GatewaySession] = {}
        self._conns: List[_GatewayConn] = []
        self._buckets: Dict[Tuple[str, Any], List[float]] = {}
        self._waiters: List[Tuple[Callable[[], Any], asyncio.Future]] = []
        self._runner: Optional[web.AppRunner] = None
        self._patched: Optional[Tuple[Any, Any]] = None
        self._spec = load_spec() if validate else None

        self._routes: List[Tuple[str, _PathTemplate, _RouteHandler]] = []
        r = self._route
        r("GET", "/gateway", self._h_gateway)
        r("GET", "/gateway/bot", self._h_gateway_bot)
        r("GET", "/users/@me", self._h_me)
        r("GET", "/users/{user_id}", self._h_user)
        r("GET", "/oauth2/applications/@me", self._h_application)
        r("GET", "/applications/@me", self._h_application)
        for base in ("/applications/{application_id}/commands", "/applications/{application_id}/guilds/{guild_id}/commands"):
            r("GET", base, self._h_commands_get)
            r("PUT", base, self._h_commands_put)
            r("POST", base, self._h_command_post)
            r("GET", base + "/{command_id}", self._h_command_get)
            r("PATCH", base + "/{command_id}", self._h_command_patch)
            r("DELETE", base + "/{command_id}", self._h_command_delete)
        r("POST", "/interactions/{interaction_id}/{interaction_token}/callback", self._h_callback)
        r("POST", "/webhooks/{webhook_id}/{webhook_token}", self._h_followup)
        for mid in ("@original", "{message_id}"):
            r("GET", "/webhooks/{webhook_id}/{webhook_token}/messages/" + mid, self._h_webhook_message_get)
            r("PATCH", "/webhooks/{webhook_id}/{webhook_token}/messages/" + mid, self._h_webhook_message_patch)
            r("DELETE", "/webhooks/{webhook_id}/{webhook_token}/messages/" + mid, self._h_webhook_message_delete)
        r("GET", "/channels/{channel_id}", self._h_channel_get)
        r("GET", "/channels/{channel_id}/messages", self._h_channel_history)
        r("POST", "/channels/{channel_id}/messages", self._h_channel_message_post)
        r("GET", "/channels/{channel_id}/messages/{message_id}", self._h_channel_message_get)
        r("PATCH", "/channels/{channel_id}/messages/{message_id}", self._h_channel_message_patch)
        r("DELETE", "/channels/{channel_id}/messages/{message_id}", self._h_channel_message_delete)
        r("POST", "/channels/{channel_id}/typing", self._h_typing)
        r("GET", "/guilds/{guild_id}", self._h_guild_get)
        r("GET", "/guilds/{guild_id}/channels", self._h_guild_channels)
        r("GET", "/guilds/{guild_id}/members/{user_id}", self._h_guild_member)
        r("GET", "/channels/{channel_id}/thread-members/{user_id}", self._h_thread_member)

    # ---------------------------------------------------------------- lifecycle

    async def start(self, *, patch_discord: bool = True) -> "FakeDiscord":
        app = web.Application(client_max_size=1024 ** 3)
        app.router.add_route("GET", "/gateway", self._ws_handler)
        app.router.add_route("GET", "/gateway/", self._ws_handler)
        app.router.add_route("GET", "/attachments/{channel_id}/{attachment_id}/{filename}", self._cdn_handler)
        app.router.add_route("*", "/{tail:.*}", self._http_handler)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        if patch_discord:
            self.patch_discord()
        return self

    async def close(self) -> None:
        self._resumes_open.set()
        self._gateway_open.set()
        for conn in list(self._conns):
            with contextlib.suppress(Exception):
                await conn.ws.close(code=1001, message=b"fake discord shutting down")
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self.unpatch_discord()
        for _, fut in self._waiters:
            if not fut.done():
                fut.cancel()

    async def __aenter__(self) -> "FakeDiscord":
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def api_base(self) -> str:
        return f"{self.base_url}/api/v{API_VERSION}"

    @property
    def gateway_url(self) -> str:
        return f"ws://{self.host}:{self.port}/gateway"

    def patch_discord(self) -> None:
        """Point discord.py at this server: ``Route.BASE`` (REST, incl. interaction webhooks) and
        ``DiscordWebSocket.DEFAULT_GATEWAY`` (a plain ``Client`` never asks ``/gateway/bot``; it connects
        to DEFAULT_GATEWAY, then to READY's ``resume_gateway_url``). Undone by :meth:`close`."""
        import yarl
        from discord.gateway import DiscordWebSocket
        from discord.http import Route

        if self._patched is None:
            self._patched = (Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY)
        Route.BASE = self.api_base
        DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(self.gateway_url)

    def unpatch_discord(self) -> None:
        if self._patched is not None:
            from discord.gateway import DiscordWebSocket
            from discord.http import Route

            Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY = self._patched
            self._patched = None

    # ---------------------------------------------------------------- ids and fixtures of the guild

    def snowflake(self) -> int:
        now = (int(time.time() * 1000) - DISCORD_EPOCH_MS) << 22
        self._last_snowflake = max(now, self._last_snowflake + 1)
        return self._last_snowflake

    def _user(self, username: str, *, bot: bool = False, discriminator: str = "0", global_name: Optional[str] = None):
        u: Dict[str, Any] = {
            "id": str(self.snowflake()),
            "username": username,
            "discriminator": discriminator,
            "global_name": global_name,
            "avatar": None,
            "avatar_decoration_data": None,
            "public_flags": 0,
            "flags": 0,
            "primary_guild": None,
            "collectibles": None,
            "banner": None,
            "accent_color": None,
        }
        if bot:
            u["bot"] = True
            u.update({"verified": True, "mfa_enabled": False, "locale": "en-US", "email": None, "bio": ""})
        return u

    def _new_guild(self, name: str, gid: int) -> FakeGuild:
        g = FakeGuild(id=gid, name=name, owner_id=int(self.admin_user["id"]))
        self.guilds[gid] = g
        g.admin_role_id = self.snowflake()
        g.bot_role_id = self.snowflake()
        self._add_role(g.everyone_role_id, "@everyone", Permission.EVERYONE, position=0, guild=g)
        self._add_role(g.admin_role_id, "Admin", Permission.ALL, position=2, hoist=True, guild=g)
        self._add_role(g.bot_role_id, "imagine-bot", Permission.BOT, position=1, managed=True,
                       tags={"bot_id": str(self.application_id)}, guild=g)
        g.category_id = self._add_channel("Text Channels", type=4, guild_id=gid)
        g.channel_id = self.add_channel("general", guild_id=gid)
        g.other_channel_id = self.add_channel("imagine", guild_id=gid)
        self._add_member(_public_user(self.bot_user), [g.bot_role_id], guild=g)
        self._add_member(self.admin_user, [g.admin_role_id], guild=g)
        self._add_member(self.member_user, [], guild=g)
        return g

    def add_guild(self, name: str = "Second Guild", *, shard_id: Optional[int] = None,
                  shard_count: Optional[int] = None) -> FakeGuild:
        """Another guild with the primary guild's layout: channels general and imagine, roles
        @everyone / Admin / the bot's, and the same three members (add it before the bot connects).
        ``shard_id``: its id is chosen so that Discord's formula ``(guild_id >> 22) % shard_count``
        (``shard_count`` defaults to :attr:`shards`) puts it on that shard."""
        gid = self.snowflake()
        if shard_id is not None:
            count = shard_count or self.shards
            if not 0 <= shard_id < count:
                raise ValueError(f"shard_id {shard_id} is not below the shard count {count}")
            ts = (gid >> 22) + 1  # a later timestamp than every id given out so far
            ts += (shard_id - ts) % count
            gid = ts << 22
            self._last_snowflake = gid
        return self._new_guild(name, gid)

    def shard_of(self, guild_id: int, shard_count: Optional[int] = None) -> int:
        """The shard a guild belongs to: ``(guild_id >> 22) % shard_count`` (default :attr:`shards`)."""
        return (int(guild_id) >> 22) % (shard_count or self.shards)

    def guild(self, guild_id: Optional[int] = None) -> FakeGuild:
        """A guild by id (default: the primary one); KeyError if the fake has no such guild."""
        return self.guilds[int(guild_id or self.guild_id)]

    def _guild_of_channel(self, channel_id: Union[int, str]) -> Optional[FakeGuild]:
        ch = self.channels.get(int(channel_id))
        gid = ch.get("guild_id") if ch else None
        return self.guilds.get(int(gid)) if gid else None

    def _guild_id_of(self, channel_id: Union[int, str]) -> str:
        return str((self._guild_of_channel(channel_id) or self.guild()).id)

    @property
    def owner_id(self) -> int:
        return self.guild().owner_id

    @owner_id.setter
    def owner_id(self, user_id: int) -> None:
        self.guild().owner_id = int(user_id)

    def _add_role(self, rid: int, name: str, perms: int, *, position: int, hoist: bool = False, managed: bool = False,
                  tags: Optional[Dict[str, Any]] = None, guild: Optional[FakeGuild] = None) -> None:
        role = {
            "id": str(rid), "name": name, "permissions": str(perms), "position": position, "color": 0,
            "colors": {"primary_color": 0, "secondary_color": None, "tertiary_color": None},
            "hoist": hoist, "managed": managed, "mentionable": False, "icon": None, "unicode_emoji": None,
            "flags": 0, "description": None,
        }
        if tags:
            role["tags"] = tags
        self.roles[rid] = role
        (guild or self.guild()).role_ids.append(rid)

    def _add_channel(self, name: str, *, type: int = 0, parent_id: Optional[int] = None,
                     guild_id: Optional[int] = None) -> int:
        cid = self.snowflake()
        gid = str(guild_id or self.guild_id)
        ch: Dict[str, Any] = {
            "id": str(cid), "type": type, "guild_id": gid, "name": name,
            "position": sum(1 for c in self.channels.values() if c.get("guild_id") == gid),
            "permission_overwrites": [], "flags": 0,
        }
        if type == 0:
            ch.update({"parent_id": str(parent_id) if parent_id else None, "topic": None, "nsfw": False,
                       "last_message_id": None, "rate_limit_per_user": 0, "last_pin_timestamp": None})
        self.channels[cid] = ch
        return cid

    def add_channel(self, name: str, *, guild_id: Optional[int] = None) -> int:
        """Add a text channel to a guild (default: the primary one; do it before the bot connects).
        Returns its id."""
        g = self.guild(guild_id)
        return self._add_channel(name, parent_id=g.category_id, guild_id=g.id)

    def add_thread(self, name: str, parent_id: int, *, owner_id: int, private: bool = True) -> int:
        """Add a thread (private: type 12; else public, type 11) under text channel ``parent_id``,
        made by ``owner_id`` (do it before the bot connects: it comes in GUILD_CREATE's
        ``threads``). Its other members reach the bot by ``THREAD_MEMBERS_UPDATE`` (``dispatch``).
        Returns its id."""
        parent = self.channels[int(parent_id)]
        cid = self.snowflake()
        self.channels[cid] = {
            "id": str(cid), "type": 12 if private else 11, "guild_id": parent["guild_id"], "name": name,
            "parent_id": str(parent_id), "owner_id": str(owner_id), "flags": 0, "last_message_id": None,
            "rate_limit_per_user": 0, "message_count": 0, "member_count": 1, "total_message_sent": 0,
            "thread_metadata": {"archived": False, "auto_archive_duration": 1440, "archive_timestamp": _iso(),
                                "locked": False, **({"invitable": False} if private else {})},
        }
        self.thread_members[cid] = {int(owner_id)}
        return cid

    def add_thread_member(self, thread_id: int, user_id: int) -> None:
        """Add ``user_id`` to thread ``thread_id`` without telling the bot: Discord sends
        THREAD_MEMBERS_UPDATE about other users only with the privileged members intent. Get Thread
        Member (``GET /channels/{id}/thread-members/{user}``) answers for them."""
        self.thread_members[int(thread_id)].add(int(user_id))
        self.channels[int(thread_id)]["member_count"] = len(self.thread_members[int(thread_id)])

    async def archive_thread(self, thread_id: int, *, locked: bool = False) -> None:
        """Archive a thread as its auto-archive (or a moderator) would; ``locked``: lock it too.
        Like Discord: edits of its messages answer 400 / 50083 "Thread is archived"; a new message
        (a channel post or an interaction follow-up) unarchives it, unless it is locked and the bot
        lacks Manage Threads (then 50083 too). The bot gets THREAD_UPDATE (Guilds intent), and an
        archived thread is left out of GUILD_CREATE's ``threads``."""
        thread = self.channels[int(thread_id)]
        meta = thread.get("thread_metadata")
        if meta is None:
            raise ValueError(f"channel {thread_id} is not a thread")
        meta.update({"archived": True, "locked": bool(locked), "archive_timestamp": _iso()})
        await self._thread_update(thread)
        self._notify()

    def thread_archived(self, thread_id: int) -> bool:
        return bool(self.channels[int(thread_id)]["thread_metadata"]["archived"])

    async def _thread_update(self, thread: Dict[str, Any]) -> None:
        await self._dispatch_intent("THREAD_UPDATE", copy.deepcopy(thread), INTENT_GUILDS)

    def _check_thread_edit(self, channel_id: Union[int, str]) -> None:
        """Editing a message in an archived thread is refused (edits are no activity)."""
        meta = (self.channels.get(int(channel_id)) or {}).get("thread_metadata")
        if meta and meta["archived"]:
            raise _ApiError(400, THREAD_ARCHIVED, "Thread is archived")

    def _thread_to_reopen(self, channel_id: Union[int, str]) -> Optional[Dict[str, Any]]:
        """Before a new message in ``channel_id``: the archived thread it will unarchive (pass it to
        :meth:`_reopen` once the message exists), or None; a locked archived thread refuses it
        (400 / 50083) unless the bot has Manage Threads."""
        thread = self.channels.get(int(channel_id))
        meta = (thread or {}).get("thread_metadata")
        if not meta or not meta["archived"]:
            return None
        guild = self._guild_of_channel(channel_id)
        if meta["locked"] and not self.permissions_of(self.application_id, guild.id if guild else None) \
                & Permission.MANAGE_THREADS:
            raise _ApiError(400, THREAD_ARCHIVED, "Thread is archived")
        return thread

    async def _reopen(self, thread: Optional[Dict[str, Any]]) -> None:
        if thread is not None:
            thread["thread_metadata"].update({"archived": False, "archive_timestamp": _iso()})
            await self._thread_update(thread)

    def _add_member(self, user: Dict[str, Any], roles: List[int], guild: Optional[FakeGuild] = None) -> Dict[str, Any]:
        m = {
            "user": user, "roles": [str(r) for r in roles], "nick": None, "avatar": None, "banner": None,
            "joined_at": _iso(), "premium_since": None, "deaf": False, "mute": False, "pending": False,
            "flags": 0, "communication_disabled_until": None, "unusual_dm_activity_until": None,
        }
        (guild or self.guild()).members[int(user["id"])] = m
        return m

    def add_user(self, username: str, *, admin: bool = False, guild_id: Optional[int] = None) -> Dict[str, Any]:
        """A new guild member (do it before the bot connects, or it is unknown to the bot's cache);
        of the primary guild unless ``guild_id`` names another."""
        g = self.guild(guild_id)
        u = self._user(username)
        self.users[int(u["id"])] = u
        self._add_member(u, [g.admin_role_id] if admin else [], guild=g)
        return u

    def permissions_of(self, user_id: int, guild_id: Optional[int] = None) -> int:
        g = self.guild(guild_id)
        member = g.members.get(int(user_id))
        if member is None:
            return Permission.EVERYONE
        perms = int(self.roles[g.everyone_role_id]["permissions"])
        for r in member["roles"]:
            perms |= int(self.roles[int(r)]["permissions"])
        if perms & Permission.ADMINISTRATOR or int(user_id) == g.owner_id:
            return Permission.ALL
        return perms

    def channel_permissions_of(self, user_id: int, channel_id: int, base: Optional[int] = None) -> int:
        """A member's permissions in a channel as Discord resolves them for an interaction's
        ``member.permissions`` and ``app_permissions``: the guild permissions (``base``, default
        :meth:`permissions_of`; administrators and the owner have all), then the channel's
        ``permission_overwrites`` (@everyone, the member's roles together, the member), then the
        implicit rules (no Send Messages: no Attach Files, Embed Links, Mention @everyone, TTS; in a
        thread the same for Send Messages in Threads; no View Channel: none of the channel's
        permissions). A thread has its parent's overwrites."""
        ch = self.channels[int(channel_id)]
        thread = ch.get("type") in (10, 11, 12)
        if thread and ch.get("parent_id"):
            ch = self.channels.get(int(ch["parent_id"]), ch)
        g = self._guild_of_channel(int(ch["id"])) or self.guild()
        perms = self.permissions_of(user_id, g.id) if base is None else int(base)
        if perms & Permission.ADMINISTRATOR or perms == Permission.ALL:
            return Permission.ALL
        member = g.members.get(int(user_id)) or {"roles": []}
        roles = {str(r) for r in member.get("roles", [])}
        overwrites = ch.get("permission_overwrites") or []
        for ow in overwrites:   # @everyone first
            if ow.get("type") == 0 and str(ow.get("id")) == str(g.everyone_role_id):
                perms = (perms & ~int(ow.get("deny") or 0)) | int(ow.get("allow") or 0)
        allow = deny = 0
        for ow in overwrites:   # the member's roles, together
            if ow.get("type") == 0 and str(ow.get("id")) in roles:
                allow |= int(ow.get("allow") or 0)
                deny |= int(ow.get("deny") or 0)
        perms = (perms & ~deny) | allow
        for ow in overwrites:   # the member
            if ow.get("type") == 1 and str(ow.get("id")) == str(user_id):
                perms = (perms & ~int(ow.get("deny") or 0)) | int(ow.get("allow") or 0)
        lose_with_send = Permission.ATTACH_FILES | Permission.EMBED_LINKS | Permission.MENTION_EVERYONE | (1 << 12)
        if not perms & Permission.SEND_MESSAGES:
            perms &= ~lose_with_send
        if thread and not perms & Permission.SEND_MESSAGES_IN_THREADS:
            perms &= ~lose_with_send
        if not perms & Permission.VIEW_CHANNEL:
            perms &= Permission.GUILD_ONLY
        return perms

    def guild_payload(self, guild_id: Optional[int] = None) -> Dict[str, Any]:
        g = self.guild(guild_id)
        channels = [dict(c) for c in self.channels.values()
                    if c.get("guild_id") == str(g.id) and c.get("type") not in (10, 11, 12)]
        for c in channels:
            c.pop("guild_id", None)
        threads = [dict(c) for c in self.channels.values()   # the active ones only, as on Discord
                   if c.get("guild_id") == str(g.id) and c.get("type") in (10, 11, 12)
                   and not c.get("thread_metadata", {}).get("archived")]
        return {
            "id": str(g.id), "name": g.name, "icon": None, "splash": None, "discovery_splash": None,
            "banner": None, "description": None, "owner_id": str(g.owner_id), "region": "deprecated",
            "afk_channel_id": None, "afk_timeout": 300, "verification_level": 0, "default_message_notifications": 1,
            "explicit_content_filter": 0, "mfa_level": 0, "nsfw_level": 0, "nsfw": False, "premium_tier": 0,
            "premium_subscription_count": 0, "premium_progress_bar_enabled": False, "preferred_locale": "en-US",
            "system_channel_id": str(g.channel_id), "system_channel_flags": 0, "rules_channel_id": None,
            "public_updates_channel_id": None, "safety_alerts_channel_id": None, "vanity_url_code": None,
            "max_members": 25000000, "max_video_channel_users": 25, "max_stage_video_channel_users": 50,
            "application_id": None, "features": [], "roles": [self.roles[r] for r in g.role_ids], "emojis": [],
            "stickers": [], "joined_at": g.members[self.application_id]["joined_at"], "large": False,
            "unavailable": False, "member_count": len(g.members), "members": list(g.members.values()),
            "channels": channels,
            "threads": threads, "presences": [], "voice_states": [], "stage_instances": [], "guild_scheduled_events": [],
            "soundboard_sounds": [], "embedded_activities": [], "lazy": True, "incidents_data": None,
            "home_header": None, "latest_onboarding_question_id": None, "hub_type": None, "version": 1,
        }

    def application_payload(self) -> Dict[str, Any]:
        return {
            "id": str(self.application_id), "name": self.bot_user["username"], "icon": None,
            "description": "fake application", "summary": "", "type": None, "hook": True, "is_monetized": False,
            "bot_public": True, "bot_require_code_grant": False, "verify_key": secrets.token_hex(32),
            "flags": (1 << 15) | (1 << 19), "owner": self.admin_user, "team": None, "bot": self.bot_user,
            "redirect_uris": [], "interactions_endpoint_url": None, "role_connections_verification_url": None,
            "tags": [], "approximate_guild_count": len(self.guilds),
            "integration_types_config": {str(t): {} for t in self.install_types},
        }

    # ---------------------------------------------------------------- waiting

    def _notify(self) -> None:
        for item in list(self._waiters):
            pred, fut = item
            if fut.done():
                continue
            try:
                value = pred()
            except Exception as exc:  # surface a failing predicate to the waiter
                fut.set_exception(exc)
                continue
            if value:
                fut.set_result(value)

    async def wait_for(self, predicate: Callable[[], Any], timeout: float = 5.0, what: Optional[str] = None) -> Any:
        """Wait until ``predicate()`` is truthy (re-checked after every request, gateway message and state
        change of the fake) and return its value. Raises ``TimeoutError`` naming ``what``."""
        value = predicate()
        if value:
            return value
        fut = asyncio.get_running_loop().create_future()
        item = (predicate, fut)
        self._waiters.append(item)
        try:
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"fake discord: timed out after {timeout}s waiting for {what or predicate}") from None
        finally:
            self._waiters.remove(item)

    def find_requests(self, method: Optional[str] = None, path: Optional[str] = None, *, route: Optional[str] = None,
                      status: Optional[int] = None, since: int = 0) -> List[RecordedRequest]:
        """Recorded requests; ``path`` is a regex that must match the whole API path (e.g.
        ``r"/webhooks/\\d+/[^/]+/messages/@original"``), ``route`` an exact route template
        (e.g. ``"/webhooks/{webhook_id}/{webhook_token}/messages/@original"``)."""
        rx = re.compile(path) if path is not None else None
        out = []
        for req in self.requests[since:]:
            if method is not None and req.method != method.upper():
                continue
            if rx is not None and not rx.fullmatch(req.path):
                continue
            if route is not None and route not in (req.route, req.spec_route):
                continue
            if status is not None and req.status != status:
                continue
            if req.status is None:
                continue  # still being handled
            out.append(req)
        return out

    async def wait_for_request(self, method: Optional[str] = None, path: Optional[str] = None, *,
                               route: Optional[str] = None, status: Optional[int] = None, since: int = 0,
                               count: int = 1, timeout: float = 5.0) -> RecordedRequest:
        """The ``count``-th matching request (answered) from index ``since`` of :attr:`requests` on."""

        def pred():
            found = self.find_requests(method, path, route=route, status=status, since=since)
            return found[count - 1] if len(found) >= count else None

        return await self.wait_for(pred, timeout, f"request #{count} {method or '*'} {path or route or '*'} "
                                                  f"status={status}")

    async def wait_for_response(self, interaction: InteractionRecord, timeout: float = 5.0) -> InteractionRecord:
        """Wait until the bot acknowledged the interaction (callback answered 2xx)."""
        await self.wait_for(lambda: interaction.acknowledged, timeout, f"a response to interaction {interaction.id}")
        return interaction

    @property
    def unknown_requests(self) -> List[RecordedRequest]:
        return [r for r in self.requests if r.unknown]

    def assert_clean(self) -> None:
        """Raise AssertionError if any request violated the spec, hit a route the fake does not know, or
        broke the fake itself."""
        problems = [f"violation: {v}" for v in self.violations]
        problems += [f"unknown route: {r.method} {r.path}" for r in self.unknown_requests]
        problems += [f"fake discord error: {e}" for e in self.server_errors]
        if problems:
            raise AssertionError("fake discord saw problems:\n  " + "\n  ".join(problems))

    # ---------------------------------------------------------------- state queries

    def channel_messages(self, channel_id: Optional[int] = None, *, include_ephemeral: bool = False,
                         include_deleted: bool = False) -> List[StoredMessage]:
        """Messages of a channel, oldest first (default: the test channel; visible messages only)."""
        cid = str(channel_id or self.channel_id)
        return [
            m for m in self.messages.values()
            if m.data["channel_id"] == cid and (include_ephemeral or not m.ephemeral) and (include_deleted or not m.deleted)
        ]

    def attachment_bytes(self, attachment: Union[Dict[str, Any], int, str]) -> bytes:
        aid = int(attachment["id"] if isinstance(attachment, dict) else attachment)
        return self._blobs[aid][2]

    def host_attachment(self, filename: str, data: bytes, content_type: Optional[str] = None, *,
                        description: Optional[str] = None, channel_id: Optional[int] = None) -> Dict[str, Any]:
        """Store a file on the fake's CDN and return a Discord attachment object (its url serves it),
        e.g. for slash-command attachment options: ``fd.send_slash_command("x", {"image": att})``."""
        att = self._make_attachment(int(channel_id or self.channel_id), filename, data, content_type, description)
        att["ephemeral"] = True
        return att

    # ---------------------------------------------------------------- failure injection

    def inject_error(self, method: Optional[str], path: str, status: int, body: Any = None, *, count: int = 1,
                     headers: Optional[Dict[str, str]] = None) -> InjectedError:
        """The next ``count`` requests with ``method`` (None/"*" = any) whose API path fully matches the
        regex ``path`` are answered ``status`` with ``body`` (JSON) without being processed.
        ``status`` 0: no answer, the connection is dropped (a network failure)."""
        rule = InjectedError(method.upper() if method else None, re.compile(path), status,
                             body if body is not None else {"message": f"{status}: injected", "code": 0},
                             dict(headers or {}), count)
        self.injected.append(rule)
        return rule

    def rate_limit(self, method: Optional[str], path: str, *, count: int = 1, retry_after: float = 0.05,
                   is_global: bool = False) -> InjectedError:
        """The next ``count`` matching requests get a 429 as Discord sends it (JSON body with
        ``retry_after``/``global``, ``Retry-After``/``X-RateLimit-*`` headers, and ``Via``, without which
        discord.py takes a 429 for a Cloudflare ban and raises instead of retrying)."""
        headers = {
            "Retry-After": str(max(1, int(-(-retry_after // 1)))),
            "X-RateLimit-Limit": "5",
            "X-RateLimit-Remaining": "0",
            "X-RateLimit-Reset": f"{time.time() + retry_after:.3f}",
            "X-RateLimit-Reset-After": f"{retry_after:.3f}",
            "X-RateLimit-Scope": "global" if is_global else "user",
        }
        if is_global:
            headers["X-RateLimit-Global"] = "true"
        body = {"message": "You are being rate limited.", "retry_after": retry_after, "global": is_global}
        if is_global:
            body["code"] = 0
        return self.inject_error(method, path, 429, body, count=count, headers=headers)

    def expire_tokens(self) -> None:
        """Every interaction token issued so far answers 401 / 50027 from now on."""
        for rec in self.interactions.values():
            rec.expired = True

    def expire_token(self, interaction: InteractionRecord) -> None:
        interaction.expired = True

    def _token_expired(self, rec: InteractionRecord) -> bool:
        return rec.expired or (time.monotonic() - rec.created) > self.token_expiry

    async def delete_message(self, channel_id: int, message_id: int) -> None:
        """Delete a message as a user (moderator) would: later edits answer 404 / 10008, and the bot
        gets MESSAGE_DELETE if it has the GUILD_MESSAGES intent."""
        msg = self.messages.get(int(message_id))
        if msg is None or msg.channel_id != int(channel_id):
            raise KeyError(f"no message {message_id} in channel {channel_id}")
        msg.deleted = True
        if not msg.ephemeral:
            await self._dispatch_intent("MESSAGE_DELETE", {"id": str(message_id), "channel_id": str(channel_id),
                                                           "guild_id": self._guild_id_of(channel_id)},
                                        INTENT_GUILD_MESSAGES)
        self._notify()

    async def delete_channel(self, channel_id: int) -> None:
        """Delete a guild channel or thread as a moderator would. A thread: THREAD_DELETE (id,
        guild_id, parent_id and type only); a channel: CHANNEL_DELETE (the channel), and its threads
        go with it with no event of their own (discord.py drops its cached ones itself); a category:
        CHANNEL_DELETE, and its channels stay, uncategorised (CHANNEL_UPDATE each). Guilds intent.
        Later requests to a deleted one answer 404 / 10003 Unknown Channel (a follow-up of an
        interaction made there too), and its messages are gone (an interaction token's edit: 404 /
        10008 Unknown Message)."""
        channel = self.channels.pop(int(channel_id))
        gone = {int(channel_id)} | {cid for cid, c in self.channels.items()
                                    if c.get("thread_metadata") and c.get("parent_id") == str(channel_id)}
        for cid in gone:
            self.channels.pop(cid, None)
            self.thread_members.pop(cid, None)
        self.deleted_channels |= gone
        for msg in self.messages.values():
            if msg.channel_id in gone:
                msg.deleted = True
        if channel.get("thread_metadata"):
            subset = {k: channel[k] for k in ("id", "guild_id", "parent_id", "type")}
            await self._dispatch_intent("THREAD_DELETE", subset, INTENT_GUILDS)
        else:
            await self._dispatch_intent("CHANNEL_DELETE", copy.deepcopy(channel), INTENT_GUILDS)
        for child in self.channels.values():
            if channel.get("type") == 4 and child.get("parent_id") == str(channel_id):
                child["parent_id"] = None
                await self._dispatch_intent("CHANNEL_UPDATE", copy.deepcopy(child), INTENT_GUILDS)
        self._notify()

    # ---------------------------------------------------------------- gateway: server side

    async def _ws_handler(self, request: web.Request) -> web.StreamResponse:
        query = request.query
        self.gateway_connects.append(dict(query))
        compress = query.get("compress")
        ws = web.WebSocketResponse(max_msg_size=0, autoping=True)
        await ws.prepare(request)
        if compress not in (None, "zlib-stream") and not (compress == "zstd-stream" and _ZSTD):
            await ws.close(code=4000, message=f"unsupported compress={compress}".encode())
            return ws
        conn = _GatewayConn(ws, compress)
        if query.get("encoding", "json") != "json":
            await ws.close(code=4002, message=b"only encoding=json is supported by the fake")
            return ws
        if query.get("v") not in (None, str(API_VERSION), "9"):
            await ws.close(code=4012, message=b"Invalid API version")
            return ws
        if not self._gateway_open.is_set():  # hold_gateway(): accepted, but no HELLO until released
            await self._gateway_open.wait()
            if ws.closed or request.transport is None or request.transport.is_closing():
                return ws
        self._conns.append(conn)
        try:
            await conn.send({"op": 10, "d": {"heartbeat_interval": int(self.heartbeat_interval * 1000),
                                             "_trace": ["[\"fake-gateway\"]"]}, "s": None, "t": None})
            async for msg in ws:
                if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                    break
                try:
                    payload = json.loads(msg.data)
                except ValueError:
                    await ws.close(code=4002, message=b"Error while decoding payload.")
                    break
                self.gateway_received.append(payload)
                await self._gateway_op(conn, payload)
                self._notify()
        finally:
            self._conns.remove(conn)
            if conn.session is not None and conn.session.conn is conn:
                conn.session.conn = None
                if ws.close_code in (1000, 1001) and not conn.dropped:  # the bot closed it: the session is over
                    conn.session.ended = True
            self._notify()
        return ws

    async def _gateway_op(self, conn: _GatewayConn, payload: Dict[str, Any]) -> None:
        op, d = payload.get("op"), payload.get("d") or {}
        if op == 1:
            await conn.send({"op": 11, "d": None, "s": None, "t": None})
        elif op == 2:
            if conn.session is not None:
                await conn.ws.close(code=4005, message=b"Already authenticated.")
                return
            if d.get("token") != self.bot_token:
                await conn.ws.close(code=4004, message=b"Authentication failed.")
                return
            intents = int(d.get("intents", 0))
            if intents & INTENT_PRIVILEGED & ~self.allowed_privileged_intents:
                await conn.ws.close(code=4014, message=b"Disallowed intent(s).")
                return
            shard = d.get("shard", [0, 1])
            if not (isinstance(shard, list) and len(shard) == 2
                    and all(isinstance(x, int) and not isinstance(x, bool) for x in shard)
                    and 0 <= shard[0] < shard[1]):
                await conn.ws.close(code=4010, message=b"Invalid shard.")
                return
            if self.require_sharding and shard[1] < self.shards:
                await conn.ws.close(code=4011, message=b"Sharding required.")
                return
            self.identify_count += 1
            session = GatewaySession(uuid.uuid4().hex, intents, (shard[0], shard[1]))
            session.conn = conn
            conn.session = session
            self._sessions[session.session_id] = session
            self.identifies.append({"shard": d.get("shard"), "at": time.monotonic(),
                                    "session_id": session.session_id})
            owned = [g for g in self.guilds.values() if session.owns(g.id)]
            ready = {
                "v": API_VERSION, "user": self.bot_user, "user_settings": {}, "private_channels": [],
                "relationships": [], "presences": [], "guild_join_requests": [],
                "guilds": [{"id": str(g.id), "unavailable": True} for g in owned],
                "session_id": session.session_id, "session_type": "normal",
                "resume_gateway_url": self.gateway_url,
                "application": {"id": str(self.application_id), "flags": self.application_payload()["flags"]},
                "auth": {}, "geo_ordered_rtc_regions": ["fake"], "_trace": ["[\"fake-gateway\"]"],
            }
            if "shard" in d:
                ready["shard"] = d["shard"]
            await self._dispatch_to(session, "READY", ready)
            for g in owned:  # only this shard's guilds
                guild = self.guild_payload(g.id)
                if not intents & INTENT_GUILD_MEMBERS:  # like Discord: only the bot's own member
                    guild["members"] = [m for m in guild["members"] if m["user"]["id"] == self.bot_user["id"]]
                await self._dispatch_to(session, "GUILD_CREATE", guild)
        elif op == 6:
            if not self._resumes_open.is_set():  # hold_resumes(): answered after release_resumes()
                self._notify()  # a waiter may be watching gateway_received for this RESUME
                await self._resumes_open.wait()
            session = self._sessions.get(d.get("session_id", ""))
            if session is None or d.get("token") != self.bot_token:
                await conn.send({"op": 9, "d": False, "s": None, "t": None})
                return
            self.resume_count += 1
            old = session.conn
            session.conn = conn
            conn.session = session
            if old is not None and old is not conn:
                old.dropped = True
                with contextlib.suppress(Exception):
                    await old.ws.close(code=4000)
            last = int(d.get("seq") or 0)
            for event in list(session.sent):
                if event["s"] > last:
                    await conn.send(event)
            await self._dispatch_to(session, "RESUMED", {"_trace": ["[\"fake-gateway\"]"]})
        elif op == 8:
            session = conn.session
            gid = str(d.get("guild_id") or self.guild_id)
            g = self.guilds.get(int(gid)) if gid.isdigit() else None
            if session is not None and g is not None:
                await self._dispatch_to(session, "GUILD_MEMBERS_CHUNK", {
                    "guild_id": str(g.id), "members": list(g.members.values()), "chunk_index": 0,
                    "chunk_count": 1, "not_found": [], "nonce": d.get("nonce"),
                })
        elif op in (3, 4):
            pass
        else:
            await conn.ws.close(code=4001, message=b"Unknown opcode.")

    async def _dispatch_to(self, session: GatewaySession, event: str, data: Dict[str, Any]) -> None:
        session.seq += 1
        payload = {"op": 0, "s": session.seq, "t": event, "d": data}
        session.sent.append(payload)
        del session.sent[:-500]
        if session.conn is not None:
            await session.conn.send(payload)

    def _live_sessions(self) -> List[GatewaySession]:
        seen: List[GatewaySession] = []
        for conn in self._conns:
            if conn.session is not None and conn.session not in seen:
                seen.append(conn.session)
        return seen

    def _targets(self, guild_id: Optional[int]) -> List[GatewaySession]:
        """The sessions that get an event of ``guild_id`` (None: of no guild): every live session of
        the owning shard; when that shard is between connections, its latest session, whose events
        then wait for its RESUME (as on Discord)."""
        live = [s for s in self._live_sessions() if s.owns(guild_id)]
        if live:
            return live
        waiting = [s for s in self._sessions.values() if s.owns(guild_id) and not s.ended]
        return waiting[-1:]

    @staticmethod
    def _event_guild(event: str, data: Any) -> Optional[int]:
        if not isinstance(data, dict):
            return None
        gid = data.get("guild_id")
        if gid is None and event in ("GUILD_CREATE", "GUILD_UPDATE", "GUILD_DELETE"):
            gid = data.get("id")
        return int(gid) if gid is not None else None

    async def dispatch(self, event: str, data: Dict[str, Any], *, guild_id: Optional[int] = None) -> None:
        """Send a DISPATCH event to the gateway session(s) of the shard that owns its guild
        (``guild_id``, else the data's ``guild_id``, else shard 0), buffered for RESUME."""
        if not self._live_sessions():
            raise RuntimeError("fake discord: no bot is connected to the gateway")
        gid = guild_id if guild_id is not None else self._event_guild(event, data)
        sessions = self._targets(gid)
        if not sessions:
            raise RuntimeError(f"fake discord: no gateway session has the shard of guild {gid}")
        for s in sessions:
            await self._dispatch_to(s, event, data)

    async def _dispatch_intent(self, event: str, data: Dict[str, Any], intent: int) -> None:
        for s in self._targets(self._event_guild(event, data)):
            if s.intents & intent:
                await self._dispatch_to(s, event, data)

    @property
    def connected(self) -> bool:
        return bool(self._live_sessions())

    @property
    def sessions(self) -> List[GatewaySession]:
        """Every IDENTIFYed session, oldest first (live or not)."""
        return list(self._sessions.values())

    @property
    def live_shards(self) -> List[List[int]]:
        """``[shard_id, shard_count]`` of every session with an open connection, sorted."""
        return sorted([list(s.shard) for s in self._live_sessions()])

    def hold_resumes(self) -> None:
        """From now on a RESUME (op 6) is not answered until :meth:`release_resumes`: the bot's
        reconnected shard stays not resumed (its events wait)."""
        self._resumes_open.clear()

    def release_resumes(self) -> None:
        self._resumes_open.set()

    def hold_gateway(self) -> None:
        """From now on a new gateway connection is accepted but gets no HELLO until
        :meth:`release_gateway` (or :meth:`close`): a gateway that hangs. discord.py waits for the
        HELLO inside its (re)connect, up to 60 s, then tries again. Connections already open are
        left alone (:meth:`drop_connection` makes the bot reconnect into the hold);
        :attr:`gateway_connects` counts the held ones too."""
        self._gateway_open.clear()

    def release_gateway(self) -> None:
        self._gateway_open.set()

    async def drop_connection(self, shard_id: Optional[int] = None, *, code: int = 4000) -> int:
        """Close the gateway connection of every live session (of shard ``shard_id`` only, when given)
        with ``code``, as Discord does when it drops one; with 4000 (unknown error) discord.py
        reconnects and RESUMEs. Returns how many connections were closed."""
        closed = 0
        for conn in list(self._conns):
            s = conn.session
            if s is None or (shard_id is not None and s.shard_id != shard_id):
                continue
            conn.dropped = True
            with contextlib.suppress(Exception):
                await conn.ws.close(code=code, message=b"fake discord dropped the connection")
            closed += 1
        return closed

    async def wait_until_connected(self, timeout: float = 10.0) -> None:
        await self.wait_for(lambda: self.connected, timeout, "a bot to IDENTIFY on the gateway")

    async def request_reconnect(self, shard_id: Optional[int] = None) -> None:
        """Send op 7 RECONNECT (to shard ``shard_id`` only, when given): discord.py drops the socket
        and RESUMEs on ``resume_gateway_url``."""
        for conn in list(self._conns):
            if shard_id is not None and (conn.session is None or conn.session.shard_id != shard_id):
                continue
            await conn.send({"op": 7, "d": None, "s": None, "t": None})

    # ---------------------------------------------------------------- interactions: injection

    def _resolve_user(self, user: Union[None, int, str, Dict[str, Any]]) -> Dict[str, Any]:
        if user is None:
            return self.member_user
        if isinstance(user, dict):
            return user
        return self.users[int(user)]

    def _interaction_id(self) -> int:
        """A new interaction id, its time `interaction_clock_skew` seconds before now."""
        iid = self.snowflake() - (int(self.interaction_clock_skew * 1000) << 22)
        while iid in self.interactions:
            iid += 1
        return iid

    def _interaction_base(self, itype: int, user: Dict[str, Any], channel_id: int,
                          member_permissions: Union[None, int, str], locale: str,
                          owners: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
        uid = int(user["id"])
        g = self._guild_of_channel(channel_id) or self.guild()
        member = dict(g.members.get(uid) or {
            "roles": [], "nick": None, "avatar": None, "banner": None, "joined_at": _iso(), "premium_since": None,
            "deaf": False, "mute": False, "pending": False, "flags": 0, "communication_disabled_until": None,
        })
        member["user"] = user
        # As Discord: the member's and the bot's permissions in this channel, overwrites included.
        perms = (self.channel_permissions_of(uid, channel_id) if member_permissions is None
                 else int(member_permissions))
        member["permissions"] = str(perms)
        channel = dict(self.channels[int(channel_id)])
        channel["permissions"] = str(perms)
        if owners is None:
            owners = self.integration_owners if self.integration_owners is not None else {"0": str(g.id)}
        return {
            "id": str(self._interaction_id()),
            "application_id": str(self.application_id),
            "type": itype,
            "token": "fakeitoken" + secrets.token_urlsafe(48),
            "version": 1,
            "guild_id": str(g.id),
            "guild": {"id": str(g.id), "locale": "en-US", "features": []},
            "channel_id": str(channel_id),
            "channel": channel,
            "member": member,
            "app_permissions": str(self.channel_permissions_of(self.application_id, channel_id)),
            "locale": locale,
            "guild_locale": "en-US",
            "entitlements": [],
            "entitlement_sku_ids": [],
            "authorizing_integration_owners": owners,
            "context": 0,
            "attachment_size_limit": self.attachment_size_limit,
        }

    def _find_command(self, name: str, guild_id: int) -> Tuple[Optional[Dict[str, Any]], bool]:
        for cmd in self.guild_commands.get(guild_id, []):
            if cmd["name"] == name and cmd.get("type", 1) == 1:
                return cmd, True
        for cmd in self.global_commands:
            if cmd["name"] == name and cmd.get("type", 1) == 1:
                return cmd, False
        return None, False

    def _build_options(self, given: Any, definitions: Optional[List[Dict[str, Any]]],
                       resolved: Dict[str, Dict[str, Any]], guild: FakeGuild) -> List[Dict[str, Any]]:
        if isinstance(given, list):  # raw option dicts; still collect resolved attachments
            for opt in given:
                if isinstance(opt.get("value"), dict):
                    opt["value"] = self._resolve_value(opt["value"], opt.get("type"), resolved, guild)
            return given
        defs = {d["name"]: d for d in (definitions or [])}
        out = []
        for name, value in (given or {}).items():
            d = defs.get(name)
            if definitions is not None and d is None:
                raise ValueError(f"option {name!r} is not in the synced command (known: {sorted(defs)})")
            otype = d["type"] if d else _infer_option_type(value)
            out.append({"name": name, "type": otype, "value": self._resolve_value(value, otype, resolved, guild)})
        return out

    def _resolve_value(self, value: Any, otype: Optional[int], resolved: Dict[str, Dict[str, Any]],
                       guild: FakeGuild) -> Any:
        if otype == 11 or (isinstance(value, dict) and "filename" in value):
            att = value if isinstance(value, dict) else None
            if att is None:
                raise ValueError("attachment options take the dict from fd.host_attachment()")
            resolved.setdefault("attachments", {})[att["id"]] = att
            return att["id"]
        if otype in (6, 9) or (isinstance(value, dict) and "username" in value):
            user = value if isinstance(value, dict) else self.users[int(value)]
            resolved.setdefault("users", {})[user["id"]] = user
            member = guild.members.get(int(user["id"]))
            if member is not None:
                m = {k: v for k, v in member.items() if k != "user"}
                m["permissions"] = str(self.permissions_of(int(user["id"]), guild.id))
                resolved.setdefault("members", {})[user["id"]] = m
            return user["id"]
        if otype == 7:
            ch = self.channels[int(value)]
            resolved.setdefault("channels", {})[ch["id"]] = {
                "id": ch["id"], "name": ch["name"], "type": ch["type"], "permissions": str(Permission.EVERYONE),
                "parent_id": ch.get("parent_id"), "flags": 0,
            }
            return ch["id"]
        if otype == 8:
            role = self.roles[int(value)]
            resolved.setdefault("roles", {})[role["id"]] = role
            return role["id"]
        return value

    async def send_slash_command(
        self,
        name: str,
        options: Union[None, Dict[str, Any], List[Dict[str, Any]]] = None,
        *,
        user: Union[None, int, Dict[str, Any]] = None,
        channel_id: Optional[int] = None,
        guild_id: Optional[int] = None,
        member_permissions: Union[None, int, str] = None,
        locale: str = "en-US",
    ) -> InteractionRecord:
        """Dispatch INTERACTION_CREATE for a chat-input command as Discord would.

        ``name`` may hold subcommands: ``"queue clear"`` or ``"admin queue clear"`` (group + subcommand).
        ``options`` is ``{name: value}`` (types come from the synced command definition when the
        command was synced, else are inferred: str 3, bool 5, int 4, float 10, a dict from
        :meth:`host_attachment` 11, a user dict 6) or a raw list of option dicts.
        ``user`` defaults to :attr:`member_user` (no admin role); ``member_permissions`` overrides the
        computed permission integer. ``guild_id`` / ``channel_id`` default to the primary guild and its
        channel "general" (a channel alone names its guild). Returns the record (id, token, and what
        the bot answered); the interaction goes to the shard that owns the guild."""
        if guild_id is None and channel_id is not None:
            guild = self._guild_of_channel(channel_id)
            if guild is None:
                raise ValueError(f"the fake has no guild channel {channel_id}")
        else:
            guild = self.guilds.get(int(guild_id or self.guild_id))
            if guild is None:
                raise ValueError(f"the fake has no guild {guild_id} (add_guild adds one)")
        guild_id = guild.id
        channel_id = int(channel_id or guild.channel_id)
        if self._guild_of_channel(channel_id) is not guild:
            raise ValueError(f"channel {channel_id} is not in guild {guild_id}")
        u = self._resolve_user(user)
        parts = name.split()
        cmd, is_guild_cmd = self._find_command(parts[0], guild_id)
        defs = cmd.get("options") if cmd else None
        chain = []
        for sub in parts[1:]:
            d = next((o for o in defs or [] if o["name"] == sub and o["type"] in (1, 2)), None) if cmd else None
            if cmd and d is None:
                raise ValueError(f"{sub!r} is not a subcommand of {parts[0]!r} in the synced command")
            chain.append((sub, d["type"] if d else None))
            defs = d.get("options") if d else None
        resolved: Dict[str, Dict[str, Any]] = {}
        leaf = self._build_options(options, defs if cmd else None, resolved, guild)
        if chain:
            if chain[-1][1] is None:  # unsynced: the last is a subcommand, an earlier one a group
                chain = [(n, 2) for n, _ in chain[:-1]] + [(chain[-1][0], 1)]
            nested: List[Dict[str, Any]] = leaf
            for sub, stype in reversed(chain):
                nested = [{"name": sub, "type": stype, "options": nested}]
            top_options = nested
        else:
            top_options = leaf
        payload = self._interaction_base(2, u, channel_id, member_permissions, locale)
        data: Dict[str, Any] = {
            "id": cmd["id"] if cmd else str(self.snowflake()),
            "name": parts[0],
            "type": 1,
            "options": top_options,
        }
        if is_guild_cmd:
            data["guild_id"] = str(guild_id)
        if resolved:
            data["resolved"] = resolved
        payload["data"] = data
        return await self._inject_interaction(payload, channel_id)

    async def click_button(self, message: Union[StoredMessage, Dict[str, Any], int], custom_id: str, *,
                           user: Union[None, int, Dict[str, Any]] = None,
                           member_permissions: Union[None, int, str] = None, locale: str = "en-US",
                           integration_owners: Optional[Dict[str, str]] = None) -> InteractionRecord:
        """Click the button ``custom_id`` on a stored message (type 3 interaction, component_type 2).
        ``integration_owners``: this interaction's ``authorizing_integration_owners`` ({} for none)
        instead of :attr:`integration_owners`'."""
        return await self._component(message, custom_id, 2, None, user, member_permissions, locale, integration_owners)

    async def select(self, message: Union[StoredMessage, Dict[str, Any], int], custom_id: str, values: List[str], *,
                     user: Union[None, int, Dict[str, Any]] = None,
                     member_permissions: Union[None, int, str] = None, locale: str = "en-US",
                     integration_owners: Optional[Dict[str, str]] = None) -> InteractionRecord:
        """Choose ``values`` in the string select ``custom_id`` on a stored message."""
        return await self._component(message, custom_id, 3, values, user, member_permissions, locale,
                                     integration_owners)

    async def submit_modal(self, interaction: InteractionRecord, values: Optional[Dict[str, str]] = None, *,
                           user: Union[None, int, Dict[str, Any]] = None,
                           member_permissions: Union[None, int, str] = None,
                           locale: str = "en-US",
                           integration_owners: Optional[Dict[str, str]] = None) -> InteractionRecord:
        """Submit the modal the bot opened in answer to ``interaction`` (callback type 9 MODAL), as
        Discord does: a type 5 MODAL_SUBMIT interaction with the modal's custom_id and every text
        input's value. ``values`` maps text-input custom ids to what the user typed; inputs not named
        keep their pre-filled ``value``. Input Discord's client would not let through (a required
        input left empty, a value outside min_length/max_length) raises ValueError. ``user`` defaults
        to the user who opened the modal."""
        values = dict(values or {})
        if interaction.response_type != 9:
            raise ValueError(f"interaction {interaction.id} was answered with callback type "
                             f"{interaction.response_type}, not a modal (9)")
        modal = (interaction.response or {}).get("data") or {}
        inputs = {c["custom_id"]: c for c in _walk_components(modal.get("components") or [])
                  if c.get("type") == 4 and "custom_id" in c}
        unknown = sorted(set(values) - set(inputs))
        if unknown:
            raise LookupError(f"the modal has no text input {unknown} (has {sorted(inputs)})")
        for cid, c in inputs.items():
            value = values.get(cid, c.get("value") or "")
            if c.get("required", True) and not value:
                raise ValueError(f"text input {cid!r} is required; Discord would not submit it empty")
            if value and not (c.get("min_length") or 0) <= len(value) <= (c.get("max_length") or 4000):
                raise ValueError(f"text input {cid!r}: {len(value)} characters is outside its length limits")

        def answered(components: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
            out: List[Dict[str, Any]] = []
            for c in components:
                if c.get("type") == 1:
                    out.append({"type": 1, "components": answered(c.get("components") or [])})
                elif c.get("type") == 18 and isinstance(c.get("component"), dict):
                    out.append({"type": 18, "component": answered([c["component"]])[0]})
                elif c.get("type") == 4:
                    out.append({"type": 4, "custom_id": c["custom_id"],
                                "value": values.get(c["custom_id"], c.get("value") or "")})
            return out

        u = self._resolve_user(user) if user is not None else interaction.payload["member"]["user"]
        payload = self._interaction_base(5, u, interaction.channel_id, member_permissions, locale, integration_owners)
        payload["data"] = {"custom_id": modal.get("custom_id"), "components": answered(modal.get("components") or [])}
        msg = self.messages.get(interaction.message_id) if interaction.message_id is not None else None
        if msg is not None and not msg.deleted:
            payload["message"] = copy.deepcopy(msg.data)   # a modal opened from a component
        return await self._inject_interaction(payload, interaction.channel_id, message_id=interaction.message_id)

    async def _component(self, message, custom_id, ctype, values, user, member_permissions, locale, owners=None):
        mid = message.id if isinstance(message, StoredMessage) else int(message["id"] if isinstance(message, dict) else message)
        msg = self.messages.get(mid)
        if msg is None or msg.deleted:
            raise LookupError(f"no message {mid} to click on")
        comp = next((c for c in _walk_components(msg.components) if c.get("custom_id") == custom_id), None)
        if comp is None:
            raise LookupError(f"message {mid} has no component {custom_id!r} (has {msg.custom_ids})")
        if comp.get("type") != ctype:
            raise ValueError(f"component {custom_id!r} has type {comp.get('type')}, not {ctype}")
        if comp.get("disabled"):
            raise ValueError(f"component {custom_id!r} is disabled; Discord would not let a user use it")
        u = self._resolve_user(user)
        payload = self._interaction_base(3, u, msg.channel_id, member_permissions, locale, owners)
        data: Dict[str, Any] = {"custom_id": custom_id, "component_type": ctype}
        if "id" in comp:
            data["id"] = comp["id"]
        if values is not None:
            data["values"] = list(values)
        payload["data"] = data
        payload["message"] = copy.deepcopy(msg.data)
        return await self._inject_interaction(payload, msg.channel_id, message_id=mid)

    async def _inject_interaction(self, payload: Dict[str, Any], channel_id: int, message_id: Optional[int] = None):
        if not self.connected:
            raise RuntimeError("fake discord: no bot is connected to the gateway")
        rec = InteractionRecord(
            id=int(payload["id"]), token=payload["token"], type=payload["type"], payload=payload,
            created=time.monotonic(), channel_id=channel_id, message_id=message_id, _fd=self,
        )
        self.interactions[rec.id] = rec
        await self.dispatch("INTERACTION_CREATE", payload)
        self._notify()
        return rec

    # ---------------------------------------------------------------- HTTP plumbing

    def _route(self, method: str, template: str, handler: _RouteHandler) -> None:
        self._routes.append((method, _PathTemplate(template), handler))

    def _match_route(self, method: str, path: str):
        m = _best_template([t for meth, t, _ in self._routes if meth == method], path)
        if m is None:
            return None
        template, params = m
        handler = next(h for meth, t, h in self._routes if meth == method and t is template)
        return template.template, params, handler

    async def _read_request(self, request: web.Request, rec: RecordedRequest) -> None:
        ctype = request.content_type
        if ctype.startswith("multipart/"):
            rec.multipart = True
            reader = await request.multipart()
            async for part in reader:
                if part is None:
                    break
                name = part.name or ""
                data = await part.read(decode=False)
                if part.filename is not None:
                    rec.files.append(RecordedFile(name, part.filename, part.headers.get("Content-Type"), bytes(data)))
                elif name == "payload_json":
                    try:
                        rec.json = json.loads(bytes(data))
                    except ValueError:
                        raise _ApiError(400, 50109, "The request body contains invalid JSON.",
                                        violation="payload_json is not valid JSON")
                else:
                    rec.form[name] = bytes(data).decode("utf-8", "replace")
        else:
            rec.body = await request.read()
            if rec.body and (ctype == "application/json" or rec.body[:1] in (b"{", b"[")):
                try:
                    rec.json = json.loads(rec.body)
                except ValueError:
                    raise _ApiError(400, 50109, "The request body contains invalid JSON.",
                                    violation="body is not valid JSON")

    def _bucket(self, method: str, route: str, params: Dict[str, str]) -> Tuple[str, Any, int, float]:
        """(bucket name, major parameter, limit, period in seconds) of a request."""
        if route.startswith("/webhooks/{webhook_id}/{webhook_token}"):
            kind, major = "webhook", (params.get("webhook_id"), params.get("webhook_token"))
        elif route == "/channels/{channel_id}/messages" and method == "POST":
            kind, major = "channel-create", params["channel_id"]
        elif route == "/channels/{channel_id}/messages/{message_id}" and method == "PATCH":
            kind, major = "channel-edit", params["channel_id"]
        elif route == "/channels/{channel_id}/messages/{message_id}" and method == "DELETE":
            kind, major = "channel-delete", params["channel_id"]
        else:
            limit, period = self.bucket_limits["default"]
            major = params.get("channel_id") or params.get("guild_id") or params.get("webhook_id")
            return f"{method} {route}", major, limit, period
        limit, period = self.bucket_limits[kind]
        return kind, major, limit, period

    def _rate_headers(self, method: str, route: Optional[str], params: Dict[str, str], *, count: bool
                      ) -> Tuple[Dict[str, str], Optional[float]]:
        """Headers for this request's bucket, and a retry_after if it is over the limit (realistic mode)."""
        if route is None:
            return {}, None
        name, major, limit, period = self._bucket(method, route, params)
        bucket_hash = hashlib.sha1(name.encode()).hexdigest()[:16]
        now = time.monotonic()
        if not self.realistic_rate_limits:
            remaining, reset_after, over = limit - 1, period, None
        else:
            window = self._buckets.setdefault((name, major), [])
            window[:] = [t for t in window if now - t < period]
            over = None
            if count:
                if len(window) >= limit:
                    over = period - (now - window[0])
                else:
                    window.append(now)
            remaining = max(0, limit - len(window))
            reset_after = (period - (now - window[0])) if window else period
        headers = {
            "X-RateLimit-Bucket": bucket_hash,
            "X-RateLimit-Limit": str(limit),
            "X-RateLimit-Remaining": str(remaining),
            "X-RateLimit-Reset": f"{time.time() + reset_after:.3f}",
            "X-RateLimit-Reset-After": f"{reset_after:.3f}",
        }
        return headers, over

    async def _http_handler(self, request: web.Request) -> web.StreamResponse:
        raw_path = request.path
        prefix = f"/api/v{API_VERSION}"
        path = raw_path[len(prefix):] if raw_path.startswith(prefix + "/") else None
        rec = RecordedRequest(
            method=request.method, path=path if path is not None else raw_path, raw_path=raw_path,
            query=dict(request.query), headers=CIMultiDict(request.headers),
        )
        self.requests.append(rec)
        headers: Dict[str, str] = {"Via": "1.1 google"}
        try:
            try:
                await self._read_request(request, rec)
                if path is None:
                    rec.unknown = True
                    raise _ApiError(404, 0, f"404: Not Found (the fake serves the API under {prefix})")
                if self._spec is not None:
                    found = self._spec.find(request.method, path)
                    if found is not None and found[1]:
                        rec.spec_route = found[0]
                match = self._match_route(request.method, path)
                if match is not None:
                    rec.route, rec.params = match[0], match[1]
                for rule in self.injected:
                    if rule.matches(rec.method, path):
                        rule.remaining -= 1
                        rule.hits.append(rec)
                        rec.injected = True
                        h, _ = self._rate_headers(rec.method, rec.route, rec.params, count=False)
                        headers.update(h)
                        headers.update(rule.headers)
                        rec.status, rec.response, rec.response_headers = rule.status, rule.body, headers
                        if rule.status == 0:   # a network failure: the connection drops, no answer
                            if request.transport is not None:
                                request.transport.close()
                            return web.Response(status=500)
                        return _json_response(rule.status, rule.body, headers)
                if match is None:
                    rec.unknown = True
                    known = f"; Discord has {request.method} {rec.spec_route}" if rec.spec_route else ""
                    raise _ApiError(404, 0, f"404: Not Found (the fake does not implement this route{known})")
                if not self._authorized(rec):
                    raise _ApiError(401, 0, "401: Unauthorized")
                h, over = self._rate_headers(rec.method, rec.route, rec.params, count=True)
                headers.update(h)
                if over is not None:
                    headers.update({"Retry-After": str(max(1, int(-(-over // 1)))), "X-RateLimit-Scope": "user",
                                    "X-RateLimit-Reset-After": f"{over:.3f}"})
                    raise _ApiError(429, 0, "You are being rate limited.", headers=headers)
                if self._spec is not None and rec.json is not None and rec.spec_route is not None:
                    problem = self._spec.validate(rec.spec_route, rec.method, rec.json)
                    if problem is not None:
                        raise _ApiError(400, 50035, "Invalid Form Body", problem[1], violation=problem[0])
                status, body = await match[2](rec, rec.params)
            except _ApiError as err:
                if err.violation:
                    self.violations.append(Violation(rec.method, rec.path, err.violation, rec.json, rec))
                headers.update(err.headers)
                status, body = err.status, err.body()
                if err.status == 429:
                    body = {"message": err.message, "retry_after": float(headers.get("X-RateLimit-Reset-After", 1)),
                            "global": False}
            except Exception:
                # a bug in the fake: report it, and answer 400 (not 500, which discord.py retries for ~25 s)
                self.server_errors.append(f"{rec.method} {rec.path}:\n{traceback.format_exc()}")
                status, body = 400, {"message": "fake discord bug, see fd.server_errors", "code": 0}
            rec.status, rec.response, rec.response_headers = status, body, headers
            return _json_response(status, body, headers)
        finally:
            self._notify()

    def _authorized(self, rec: RecordedRequest) -> bool:
        if rec.route and (rec.route.startswith("/webhooks/{webhook_id}/{webhook_token}")
                          or rec.route.startswith("/interactions/")):
            return True  # the interaction token is the credential
        return rec.headers.get("Authorization") == f"Bot {self.bot_token}"

    async def _cdn_handler(self, request: web.Request) -> web.StreamResponse:
        rec = RecordedRequest(method=request.method, path=request.path, raw_path=request.path,
                              query=dict(request.query), headers=CIMultiDict(request.headers))
        self.cdn_requests.append(rec)
        try:
            blob = self._blobs.get(int(request.match_info["attachment_id"]))
        except ValueError:
            blob = None
        if blob is None or blob[0] != request.match_info["filename"]:
            rec.status = 404
            return web.Response(status=404, text="Not Found")
        rec.status = 200
        return web.Response(status=200, body=blob[2], headers={"Content-Type": blob[1]})

    # ---------------------------------------------------------------- messages

    def _make_attachment(self, channel_id: int, filename: str, data: bytes, content_type: Optional[str],
                         description: Optional[str] = None) -> Dict[str, Any]:
        aid = self.snowflake()
        guessed = mimetypes.guess_type(filename)[0]
        ctype = guessed or content_type or "application/octet-stream"
        if ctype.startswith("text/") and "charset" not in ctype:
            ctype += "; charset=utf-8"
        url = f"{self.base_url}/attachments/{channel_id}/{aid}/{quote(filename)}"
        att: Dict[str, Any] = {
            "id": str(aid), "filename": filename, "size": len(data), "url": url, "proxy_url": url,
            "content_type": ctype,
        }
        if description is not None:
            att["description"] = description
        size = _image_size(data)
        if size:
            att["width"], att["height"] = size
        self._blobs[aid] = (filename, ctype, data)
        return att

    def _attachments(self, channel_id: int, payload: Dict[str, Any], files: List[RecordedFile],
                     existing: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        # Per file, as Discord checks an app's uploads since 2025-04-03 (discord-api-docs #7451):
        # files that each fit go up together, whatever their total.
        if any(len(f.data) > self.attachment_size_limit for f in files):
            raise _ApiError(413, 40005, "Request entity too large")
        by_index: Dict[int, RecordedFile] = {}
        for n, f in enumerate(files):
            idx = _files_index(f.field_name)
            by_index[idx if idx is not None else n] = f
        kept = {a["id"]: a for a in existing}
        result: List[Dict[str, Any]] = []
        used = set()
        listed = payload.get("attachments")
        if listed is None:
            result = list(existing)
        else:
            for i, a in enumerate(listed):
                aid = str(a.get("id"))
                if aid in kept:
                    att = dict(kept[aid])
                    if a.get("description") is not None:
                        att["description"] = a["description"]
                    result.append(att)
                elif aid.isdigit() and int(aid) in by_index:
                    f = by_index[int(aid)]
                    used.add(int(aid))
                    result.append(self._make_attachment(channel_id, a.get("filename") or f.filename or f"file{aid}",
                                                        f.data, f.content_type, a.get("description")))
                else:
                    raise _form_error(["attachments", str(i), "id"], f"Unknown attachment {aid!r}: neither an "
                                      "attachment of this message nor the index of an uploaded files[n]")
        for idx in sorted(by_index):
            if idx not in used:
                f = by_index[idx]
                result.append(self._make_attachment(channel_id, f.filename or f"file{idx}", f.data, f.content_type))
        if len(result) > MAX_ATTACHMENTS:
            raise _form_error(["attachments"], f"Must be {MAX_ATTACHMENTS} or fewer in length.")
        return result

    def _check_components(self, components: List[Dict[str, Any]], flags: int) -> None:
        if not components:
            return
        if not flags & FLAG_IS_COMPONENTS_V2:
            if len(components) > MAX_ACTION_ROWS:
                raise _form_error(["components"], f"Must be {MAX_ACTION_ROWS} or fewer in length.")
            for i, c in enumerate(components):
                if c.get("type") != 1:
                    raise _form_error(["components", str(i), "type"],
                                      "Top-level components must be action rows without the IS_COMPONENTS_V2 flag")
        seen = set()
        for c in _walk_components(components):
            cid = c.get("custom_id")
            if cid is not None:
                if cid in seen:
                    raise _form_error(["components"], f"Component custom id cannot be duplicated ({cid!r})",
                                      "COMPONENT_CUSTOM_ID_DUPLICATED")
                seen.add(cid)
            if c.get("type") == 2:
                style = c.get("style")
                if style == 5 and (not c.get("url") or cid is not None):
                    raise _form_error(["components"], "A link button needs url and no custom_id")
                if style in (1, 2, 3, 4) and (cid is None or c.get("url")):
                    raise _form_error(["components"], "A non-link button needs custom_id and no url")

    def _mentions(self, content: str, allowed: Any) -> Tuple[List[Dict[str, Any]], List[str], bool]:
        users = [int(x) for x in re.findall(r"<@!?(\d+)>", content)]
        roles = re.findall(r"<@&(\d+)>", content)
        everyone = "@everyone" in content or "@here" in content
        if allowed is None:
            parse = {"users", "roles", "everyone"}
            ok_users: set = set()
            ok_roles: set = set()
        else:
            parse = set(allowed.get("parse") or [])
            ok_users = {str(u) for u in allowed.get("users") or []}
            ok_roles = {str(r) for r in allowed.get("roles") or []}
        mentions, seen = [], set()
        for uid in users:
            if uid in self.users and uid not in seen and ("users" in parse or str(uid) in ok_users):
                seen.add(uid)
                mentions.append(self.users[uid])
        mention_roles = [r for r in dict.fromkeys(roles) if int(r) in self.roles and ("roles" in parse or r in ok_roles)]
        return mentions, mention_roles, everyone and "everyone" in parse

    def _check_content(self, payload: Dict[str, Any], flags: int) -> None:
        content = payload.get("content")
        if isinstance(content, str) and len(content) > MAX_CONTENT:
            raise _form_error(["content"], f"Must be {MAX_CONTENT} or fewer in length.")
        if flags & FLAG_IS_COMPONENTS_V2 and (payload.get("content") or payload.get("embeds")):
            raise _form_error(["content"], "content and embeds cannot be used with the IS_COMPONENTS_V2 flag")

    def _render_embeds(self, embeds: List[Dict[str, Any]], attachments: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        by_name = {a["filename"]: a for a in attachments}
        out = []
        for e in embeds or []:
            e = copy.deepcopy(e)
            e.setdefault("type", "rich")
            e.setdefault("content_scan_version", 0)
            for key in ("image", "thumbnail"):
                media = e.get(key)
                if isinstance(media, dict) and str(media.get("url", "")).startswith("attachment://"):
                    att = by_name.get(media["url"][len("attachment://"):])
                    if att is not None:
                        media.update({"url": att["url"], "proxy_url": att["proxy_url"]})
                        if "width" in att:
                            media.update({"width": att["width"], "height": att["height"]})
            out.append(e)
        return out

    def _render_components(self, components: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        comps = copy.deepcopy(components or [])
        used = {c["id"] for c in _walk_components(comps) if c.get("id") is not None}
        ids = (n for n in itertools.count(1) if n not in used)
        for c in _walk_components(comps):  # Discord numbers components per message, from 1
            for k in [k for k, v in c.items() if v is None]:
                del c[k]
            c.setdefault("id", next(ids))
        return comps

    def _is_empty(self, content: str, embeds, attachments, components, payload) -> bool:
        return not (content or embeds or attachments or components or payload.get("sticker_ids") or payload.get("poll"))

    def _create_message(self, channel_id: int, payload: Dict[str, Any], files: List[RecordedFile], *,
                        msg_type: int = 0, interaction: Optional[InteractionRecord] = None,
                        extra_flags: int = 0, allow_empty: bool = False) -> StoredMessage:
        payload = payload or {}
        flags = int(payload.get("flags") or 0)
        self._check_content(payload, flags)
        self._check_components(payload.get("components") or [], flags)
        attachments = self._attachments(channel_id, payload, files, [])
        content = payload.get("content") or ""
        if not allow_empty and self._is_empty(content, payload.get("embeds"), attachments, payload.get("components"),
                                              payload):
            raise _ApiError(400, 50006, "Cannot send an empty message", violation="empty message")
        allowed = payload.get("allowed_mentions")
        mentions, mention_roles, everyone = self._mentions(content, allowed)
        mid = self.snowflake()
        stored_flags = (flags & (FLAG_EPHEMERAL | FLAG_SUPPRESS_EMBEDS | FLAG_SUPPRESS_NOTIFICATIONS
                                 | FLAG_IS_COMPONENTS_V2)) | extra_flags
        data: Dict[str, Any] = {
            "type": msg_type, "content": content, "mentions": mentions, "mention_roles": mention_roles,
            "attachments": attachments, "embeds": self._render_embeds(payload.get("embeds") or [], attachments),
            "timestamp": _iso(), "edited_timestamp": None, "flags": stored_flags,
            "components": self._render_components(payload.get("components") or []),
            "id": str(mid), "channel_id": str(channel_id), "author": _public_user(self.bot_user), "pinned": False,
            "mention_everyone": everyone, "tts": bool(payload.get("tts")),
        }
        # No "nonce" in the stored message: Discord echoes it in the create's answer (and its
        # MESSAGE_CREATE, which this fake sends without it); a message read back (GET, history) has none.
        ref = payload.get("message_reference")
        if ref and ref.get("message_id"):
            target = self.messages.get(int(ref["message_id"]))
            if target is None or target.deleted:
                if ref.get("fail_if_not_exists", True):
                    raise _form_error(["message_reference"], "Unknown message", "MESSAGE_REFERENCE_UNKNOWN_MESSAGE")
            else:
                data["type"] = 19
                g = self._guild_of_channel(channel_id) or self.guild()
                data["message_reference"] = {"type": 0, "channel_id": str(channel_id), "message_id": str(target.id),
                                             "guild_id": str(g.id)}
                data["referenced_message"] = target.data
        if interaction is not None:
            data["webhook_id"] = str(self.application_id)
            data["application_id"] = str(self.application_id)
            user = interaction.payload["member"]["user"]
            meta: Dict[str, Any] = {
                "id": str(interaction.id), "type": interaction.type, "user": user,
                "authorizing_integration_owners": interaction.payload.get(
                    "authorizing_integration_owners", {"0": interaction.payload.get("guild_id", str(self.guild_id))}),
            }
            if interaction.type == 2:
                meta["name"] = interaction.payload["data"]["name"]
                meta["command_type"] = 1
                data["interaction"] = {"id": str(interaction.id), "type": 2, "name": meta["name"], "user": user}
            elif interaction.message_id is not None:
                meta["interacted_message_id"] = str(interaction.message_id)
            if interaction.original_message_id is not None and msg_type == 20 and interaction.type == 2:
                meta["original_response_message_id"] = str(interaction.original_message_id)
            data["interaction_metadata"] = meta
        msg = StoredMessage(data=data, ephemeral=bool(stored_flags & FLAG_EPHEMERAL),
                            interaction_id=interaction.id if interaction else None, allowed_mentions=allowed)
        self.messages[mid] = msg
        if not msg.ephemeral and int(channel_id) in self.channels:
            self.channels[int(channel_id)]["last_message_id"] = str(mid)
        return msg

    def _edit_message(self, msg: StoredMessage, payload: Dict[str, Any], files: List[RecordedFile],
                      *, finishes_loading: bool = False) -> StoredMessage:
        payload = payload or {}
        data = msg.data
        flags = data["flags"]
        if payload.get("flags") is not None:
            # only SUPPRESS_EMBEDS (and IS_COMPONENTS_V2, one way) can change on edit
            new = int(payload["flags"])
            flags = (flags & ~FLAG_SUPPRESS_EMBEDS) | (new & FLAG_SUPPRESS_EMBEDS) | (new & FLAG_IS_COMPONENTS_V2)
        self._check_content(payload, flags)
        components = payload["components"] if "components" in payload else None
        if components is not None:
            self._check_components(components, flags)
        attachments = self._attachments(msg.channel_id, payload, files, data["attachments"])
        content = (payload.get("content") or "") if "content" in payload else data["content"]
        embeds = (self._render_embeds(payload.get("embeds") or [], attachments) if "embeds" in payload
                  else data["embeds"])
        new_components = self._render_components(components or []) if "components" in payload else data["components"]
        if self._is_empty(content, embeds, attachments, new_components, {}):
            raise _ApiError(400, 50006, "Cannot send an empty message", violation="edit would leave an empty message")
        msg.history.append(copy.deepcopy(data))
        allowed = payload.get("allowed_mentions")
        if "allowed_mentions" in payload:
            msg.allowed_mentions = allowed
        if "content" in payload:
            data["mentions"], data["mention_roles"], data["mention_everyone"] = self._mentions(content, allowed)
        data["content"] = content
        data["embeds"] = embeds
        data["attachments"] = attachments
        data["components"] = new_components
        if finishes_loading and flags & FLAG_LOADING:
            flags &= ~FLAG_LOADING
        else:
            data["edited_timestamp"] = _iso()
        data["flags"] = flags
        msg.edits += 1
        return msg

    async def _announce(self, event: str, msg: StoredMessage) -> None:
        if msg.ephemeral:
            return
        data = dict(msg.data)
        g = self._guild_of_channel(msg.channel_id) or self.guild()
        data["guild_id"] = str(g.id)
        member = g.members.get(self.application_id)
        if member is not None:
            data["member"] = {k: v for k, v in member.items() if k != "user"}
        await self._dispatch_intent(event, data, INTENT_GUILD_MESSAGES)

    # ---------------------------------------------------------------- route handlers: basics

    async def _h_gateway(self, rec, p):
        return 200, {"url": self.gateway_url}

    async def _h_gateway_bot(self, rec, p):
        return 200, {"url": self.gateway_url, "shards": self.shards,
                     "session_start_limit": {"total": 1000, "remaining": 999, "reset_after": 86400000,
                                             "max_concurrency": self.max_concurrency}}

    async def _h_me(self, rec, p):
        return 200, self.bot_user

    async def _h_user(self, rec, p):
        u = self.users.get(int(p["user_id"])) if p["user_id"].isdigit() else None
        if u is None:
            raise _ApiError(404, 10013, "Unknown User")
        return 200, u

    async def _h_application(self, rec, p):
        return 200, self.application_payload()

    async def _h_typing(self, rec, p):
        self._channel(p["channel_id"])
        return 204, None

    async def _h_guild_get(self, rec, p):
        g = self.guild_payload(self._guild(p["guild_id"]).id)
        for k in ("members", "channels", "threads", "presences", "voice_states", "joined_at", "large", "member_count"):
            g.pop(k, None)
        return 200, g

    async def _h_guild_channels(self, rec, p):
        gid = str(self._guild(p["guild_id"]).id)
        return 200, [c for c in self.channels.values() if c.get("guild_id") == gid]

    async def _h_guild_member(self, rec, p):
        g = self._guild(p["guild_id"])
        m = g.members.get(int(p["user_id"])) if p["user_id"].isdigit() else None
        if m is None:
            raise _ApiError(404, 10007, "Unknown Member")
        return 200, m

    async def _h_thread_member(self, rec, p):
        """Get Thread Member: the member object, or 404 Unknown Member for a user not in the thread
        (no privileged intent needed, unlike listing the members)."""
        ch = self._channel(p["channel_id"])
        if "thread_metadata" not in ch:
            raise _ApiError(400, 50024, "Cannot execute action on this channel type")
        uid = int(p["user_id"]) if p["user_id"].isdigit() else None
        if uid is None or uid not in self.thread_members.get(int(ch["id"]), set()):
            raise _ApiError(404, 10007, "Unknown Member")
        return 200, {"id": ch["id"], "user_id": str(uid), "join_timestamp": _iso(), "flags": 0}

    def _guild(self, gid: str) -> FakeGuild:
        g = self.guilds.get(int(gid)) if gid.isdigit() else None
        if g is None:
            raise _ApiError(404, 10004, "Unknown Guild")
        return g

    def _channel(self, cid: str) -> Dict[str, Any]:
        ch = self.channels.get(int(cid)) if cid.isdigit() else None
        if ch is None:
            raise _ApiError(404, 10003, "Unknown Channel")
        return ch

    # ---------------------------------------------------------------- route handlers: commands

    def _check_app(self, p: Dict[str, str]) -> None:
        if p.get("application_id") != str(self.application_id):
            raise _ApiError(403, 50001, "Missing Access")

    def _command_list(self, p: Dict[str, str]) -> List[Dict[str, Any]]:
        self._check_app(p)
        if "guild_id" in p:
            self._guild(p["guild_id"])
            return self.guild_commands.setdefault(int(p["guild_id"]), [])
        return self.global_commands

    def _command_object(self, body: Dict[str, Any], p: Dict[str, str], old: Optional[Dict[str, Any]]) -> Dict[str, Any]:
        cmd = copy.deepcopy(body)
        cmd.setdefault("type", 1)
        cmd.setdefault("description", "" if cmd["type"] != 1 else cmd.get("description", ""))
        cmd.setdefault("options", [])
        cmd.setdefault("default_member_permissions", None)
        if cmd["default_member_permissions"] is not None:   # sent as an integer, kept as a string
            cmd["default_member_permissions"] = str(cmd["default_member_permissions"])
        cmd.setdefault("nsfw", False)
        cmd.setdefault("name_localizations", None)
        cmd.setdefault("description_localizations", None)
        cmd.setdefault("contexts", None)
        if cmd.get("integration_types") is None:   # as Discord: the app's installation contexts
            cmd["integration_types"] = list(self.install_types)
        cmd["id"] = old["id"] if old else str(self.snowflake())
        cmd["application_id"] = str(self.application_id)
        cmd["version"] = str(self.snowflake())
        if "guild_id" in p:
            cmd["guild_id"] = p["guild_id"]
        return cmd

    async def _h_commands_get(self, rec, p):
        return 200, self._command_list(p)

    async def _h_commands_put(self, rec, p):
        current = self._command_list(p)
        body = rec.json or []
        if not isinstance(body, list):
            raise _form_error([], "Expected an array of commands")
        old = {(c["name"], c.get("type", 1)): c for c in current}
        seen = set()
        new = []
        for i, c in enumerate(body):
            key = (c.get("name"), c.get("type", 1))
            if key in seen:
                raise _form_error([str(i), "name"], "Application command names must be unique",
                                  "APPLICATION_COMMANDS_DUPLICATE_NAME")
            seen.add(key)
            new.append(self._command_object(c, p, old.get(key)))
        current[:] = new
        self._notify()
        return 200, new

    async def _h_command_post(self, rec, p):
        current = self._command_list(p)
        body = rec.json or {}
        key = (body.get("name"), body.get("type", 1))
        old = next((c for c in current if (c["name"], c.get("type", 1)) == key), None)
        cmd = self._command_object(body, p, old)
        if old is not None:
            current[current.index(old)] = cmd
        else:
            current.append(cmd)
        self._notify()
        return (200 if old else 201), cmd

    def _command_by_id(self, p):
        current = self._command_list(p)
        for c in current:
            if c["id"] == p["command_id"]:
                return current, c
        raise _ApiError(404, 10063, "Unknown application command")

    async def _h_command_get(self, rec, p):
        return 200, self._command_by_id(p)[1]

    async def _h_command_patch(self, rec, p):
        current, c = self._command_by_id(p)
        merged = dict(c)
        merged.update(rec.json or {})
        cmd = self._command_object(merged, p, c)
        current[current.index(c)] = cmd
        return 200, cmd

    async def _h_command_delete(self, rec, p):
        current, c = self._command_by_id(p)
        current.remove(c)
        return 204, None

    # ---------------------------------------------------------------- route handlers: interactions

    def _interaction_by_token(self, p: Dict[str, str]) -> InteractionRecord:
        if p.get("webhook_id") != str(self.application_id):
            raise _ApiError(404, 10015, "Unknown Webhook")
        rec = next((r for r in self.interactions.values() if r.token == p["webhook_token"]), None)
        if rec is None or self._token_expired(rec):
            raise _ApiError(401, 50027, "Invalid Webhook Token")
        return rec

    async def _h_callback(self, rec, p):
        inter = self.interactions.get(int(p["interaction_id"])) if p["interaction_id"].isdigit() else None
        if inter is None or inter.token != p["interaction_token"]:
            raise _ApiError(404, 10062, "Unknown interaction")
        if inter.acknowledged:
            raise _ApiError(400, 40060, "Interaction has already been acknowledged.")
        if self.interaction_deadline is not None and time.monotonic() - inter.created > self.interaction_deadline:
            raise _ApiError(404, 10062, "Unknown interaction")
        body = rec.json or {}
        ctype = body.get("type")
        data = body.get("data") or {}
        message: Optional[StoredMessage] = None
        if ctype in (6, 7) and inter.type != 3:
            raise _ApiError(400, 40043, "Interaction callback type 6/7 is only valid for component interactions",
                            violation=f"callback type {ctype} for interaction type {inter.type}")
        if ctype == 1:
            raise _ApiError(400, 50035, "Invalid Form Body", violation="PONG is only for PING interactions")
        if ctype == 9 and inter.type not in (2, 3):
            raise _ApiError(400, 50035, "Invalid Form Body", violation="a modal answers only a command or a component")
        if ctype == 8 and inter.type != 4:
            raise _ApiError(400, 50035, "Invalid Form Body", violation="autocomplete result for a non-autocomplete")
        msg_type = 20 if inter.type == 2 else 0
        if ctype == 4:
            message = self._create_message(inter.channel_id, data, rec.files, msg_type=msg_type, interaction=inter)
            inter.original_message_id = message.id
        elif ctype == 5:
            message = self._create_message(inter.channel_id, {"flags": data.get("flags")}, [], msg_type=msg_type,
                                           interaction=inter, extra_flags=FLAG_LOADING, allow_empty=True)
            inter.original_message_id = message.id
        elif ctype in (6, 7):
            message = self.messages.get(inter.message_id) if inter.message_id else None
            inter.original_message_id = inter.message_id
            if ctype == 7:
                if message is None or message.deleted:
                    raise _unknown_message()
                self._edit_message(message, data, rec.files)
        inter.response_type = ctype
        inter.response = body
        inter.callback_request = rec
        if message is not None and ctype in (4, 5):
            await self._announce("MESSAGE_CREATE", message)
        elif message is not None and ctype == 7:
            await self._announce("MESSAGE_UPDATE", message)
        if rec.query.get("with_response") not in ("1", "true", "True"):
            return 204, None
        out: Dict[str, Any] = {"interaction": {
            "id": str(inter.id), "type": inter.type,
            "response_message_loading": ctype == 5,
            "response_message_ephemeral": bool(message and message.ephemeral),
        }}
        if message is not None and ctype in (4, 5, 7):
            out["interaction"]["response_message_id"] = str(message.id)
            out["resource"] = {"type": ctype, "message": message.data}
        elif ctype is not None:
            out["resource"] = None
        return 200, out

    def _webhook_target(self, inter: InteractionRecord, p: Dict[str, str]) -> StoredMessage:
        mid = p.get("message_id")
        if mid is None:  # @original
            if inter.original_message_id is None:
                raise _unknown_message()
            target = inter.original_message_id
        else:
            target = int(mid) if mid.isdigit() else -1
            if target != inter.original_message_id and target not in inter.followup_ids:
                raise _unknown_message()
        msg = self.messages.get(target)
        if msg is None or msg.deleted:
            raise _unknown_message()
        return msg

    async def _h_followup(self, rec, p):
        inter = self._interaction_by_token(p)
        if not inter.acknowledged:
            raise _ApiError(404, 10015, "Unknown Webhook")
        if int(inter.channel_id) in self.deleted_channels:
            raise _ApiError(404, 10003, "Unknown Channel")
        body = rec.json or {}
        reopen = self._thread_to_reopen(inter.channel_id)   # a new message unarchives its thread
        original = inter.original_message
        if original is not None and not original.deleted and original.data["flags"] & FLAG_LOADING:
            # Like Discord: the first follow-up after a defer *is* the deferred "thinking…" message,
            # as public (or ephemeral) as the defer was, whatever flags the follow-up asks for.
            self._edit_message(original, body, rec.files, finishes_loading=True)
            await self._reopen(reopen)
            await self._announce("MESSAGE_UPDATE", original)
            if rec.query.get("wait") in ("1", "true", "True"):
                return 200, original.data
            return 204, None
        msg = self._create_message(inter.channel_id, body, rec.files, msg_type=20 if inter.type == 2 else 0,
                                   interaction=inter)
        await self._reopen(reopen)
        inter.followup_ids.append(msg.id)
        await self._announce("MESSAGE_CREATE", msg)
        if rec.query.get("wait") in ("1", "true", "True"):
            return 200, msg.data
        return 204, None

    async def _h_webhook_message_get(self, rec, p):
        inter = self._interaction_by_token(p)
        return 200, self._webhook_target(inter, p).data

    async def _h_webhook_message_patch(self, rec, p):
        inter = self._interaction_by_token(p)
        msg = self._webhook_target(inter, p)
        self._check_thread_edit(msg.channel_id)
        self._edit_message(msg, rec.json or {}, rec.files, finishes_loading=True)
        await self._announce("MESSAGE_UPDATE", msg)
        return 200, msg.data

    async def _h_webhook_message_delete(self, rec, p):
        inter = self._interaction_by_token(p)
        msg = self._webhook_target(inter, p)
        msg.deleted = True
        if not msg.ephemeral:
            await self._dispatch_intent("MESSAGE_DELETE", {"id": str(msg.id), "channel_id": str(msg.channel_id),
                                                           "guild_id": self._guild_id_of(msg.channel_id)},
                                        INTENT_GUILD_MESSAGES)
        return 204, None

    # ---------------------------------------------------------------- route handlers: channels

    def _check_bot_may_view(self, channel_id: int) -> int:
        """As Discord, for the bot's reads and edits of a guild channel's messages: without View
        Channel 403 / 50001. Its permissions there (0 for a DM, which is not checked)."""
        if self._guild_of_channel(channel_id) is None:
            return 0
        perms = self.channel_permissions_of(self.application_id, channel_id)
        if not perms & Permission.VIEW_CHANNEL:
            raise _ApiError(403, 50001, "Missing Access")
        return perms

    def _channel_message(self, p: Dict[str, str]) -> StoredMessage:
        self._channel(p["channel_id"])
        self._check_bot_may_view(int(p["channel_id"]))
        msg = self.messages.get(int(p["message_id"])) if p["message_id"].isdigit() else None
        if msg is None or msg.deleted or msg.ephemeral or msg.data["channel_id"] != p["channel_id"]:
            raise _unknown_message()
        return msg

    async def _h_channel_get(self, rec, p):
        return 200, self._channel(p["channel_id"])

    async def _h_channel_history(self, rec, p):
        self._channel(p["channel_id"])
        perms = self._check_bot_may_view(int(p["channel_id"]))
        if self._guild_of_channel(int(p["channel_id"])) is not None and not perms & Permission.READ_MESSAGE_HISTORY:
            return 200, []   # as Discord: without Read Message History no messages are returned
        limit = max(1, min(100, int(rec.query.get("limit", 50))))
        msgs = self.channel_messages(int(p["channel_id"]))
        if "before" in rec.query:
            msgs = [m for m in msgs if m.id < int(rec.query["before"])]
        if "after" in rec.query:
            msgs = [m for m in msgs if m.id > int(rec.query["after"])][:limit]
        if "around" in rec.query:
            around = int(rec.query["around"])
            older = [m for m in msgs if m.id <= around][-((limit + 1) // 2):]
            newer = [m for m in msgs if m.id > around][: limit // 2]
            msgs = older + newer
        return 200, [m.data for m in reversed(msgs[-limit:])]

    def _check_bot_may_post(self, channel_id: int, payload: Dict[str, Any], files: List[RecordedFile]) -> None:
        """As Discord, for a new message from the bot in a guild channel (its permissions there,
        overwrites included: :meth:`channel_permissions_of`): without View Channel 403 / 50001;
        without Send Messages (Send Messages in Threads in a thread) 403 / 50013; with files (or
        ``attachments``) without Attach Files 403 / 50013. A DM is not checked."""
        if self._guild_of_channel(channel_id) is None:
            return
        perms = self.channel_permissions_of(self.application_id, channel_id)
        if not perms & Permission.VIEW_CHANNEL:
            raise _ApiError(403, 50001, "Missing Access")
        thread = self.channels[int(channel_id)].get("type") in (10, 11, 12)
        send = Permission.SEND_MESSAGES_IN_THREADS if thread else Permission.SEND_MESSAGES
        if not perms & send or ((files or payload.get("attachments")) and not perms & Permission.ATTACH_FILES):
            raise _ApiError(403, 50013, "Missing Permissions")

    async def _h_channel_message_post(self, rec, p):
        self._channel(p["channel_id"])
        self._check_bot_may_post(int(p["channel_id"]), rec.json or {}, rec.files)
        payload = rec.json or {}
        key = (int(p["channel_id"]), str(payload.get("nonce")))
        if payload.get("enforce_nonce") and payload.get("nonce") is not None and key in self.nonces:
            # As Discord: a post whose nonce the same author used within the window returns that
            # message; no new one is made.
            seen_id, seen_at = self.nonces[key]
            seen = self.messages.get(seen_id)
            if seen is not None and not seen.deleted and time.monotonic() - seen_at < self.nonce_window:
                return 200, {**seen.data, "nonce": payload["nonce"]}
        reopen = self._thread_to_reopen(p["channel_id"])
        msg = self._create_message(int(p["channel_id"]), payload, rec.files)
        if payload.get("enforce_nonce") and payload.get("nonce") is not None:
            self.nonces[key] = (int(msg.data["id"]), time.monotonic())
        await self._reopen(reopen)
        await self._announce("MESSAGE_CREATE", msg)
        if payload.get("nonce") is not None:
            return 200, {**msg.data, "nonce": payload["nonce"]}
        return 200, msg.data

    async def _h_channel_message_get(self, rec, p):
        return 200, self._channel_message(p).data

    async def _h_channel_message_patch(self, rec, p):
        msg = self._channel_message(p)
        if msg.data["author"]["id"] != self.bot_user["id"]:
            raise _ApiError(403, 50005, "Cannot edit a message authored by another user")
        self._check_thread_edit(msg.channel_id)
        self._edit_message(msg, rec.json or {}, rec.files, finishes_loading=True)
        await self._announce("MESSAGE_UPDATE", msg)
        return 200, msg.data

    async def _h_channel_message_delete(self, rec, p):
        msg = self._channel_message(p)
        msg.deleted = True
        await self._dispatch_intent("MESSAGE_DELETE", {"id": str(msg.id), "channel_id": str(msg.channel_id),
                                                       "guild_id": self._guild_id_of(msg.channel_id)},
                                    INTENT_GUILD_MESSAGES)
        return 204, None


_PRIVATE_USER_FIELDS = ("verified", "mfa_enabled", "locale", "email", "bio")


def _public_user(user: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in user.items() if k not in _PRIVATE_USER_FIELDS}


def _infer_option_type(value: Any) -> int:
    if isinstance(value, bool):
        return 5
    if isinstance(value, int):
        return 4
    if isinstance(value, float):
        return 10
    if isinstance(value, dict) and "filename" in value:
        return 11
    if isinstance(value, dict) and "username" in value:
        return 6
    return 3


def _b64id(n: int) -> str:
    import base64

    return base64.b64encode(str(n).encode()).decode().rstrip("=")


@contextlib.asynccontextmanager
async def running_bot(fd: FakeDiscord, bot: Any, *, ready_timeout: float = 10.0, fast_ready: bool = True):
    """Run ``bot.start(fd.bot_token)`` in a task, wait until it is ready, yield it, then close it cleanly.

    discord.py fires ``on_ready`` only ``guild_ready_timeout`` seconds (default 2.0) after the last
    GUILD_CREATE; ``fast_ready`` lowers it to 0.05 s on this bot so tests do not wait 2 s for nothing.
    If the bot's task dies first (bad token, refused intents...), its exception is raised here."""
    if fast_ready:
        bot._connection.guild_ready_timeout = min(bot._connection.guild_ready_timeout, 0.05)
    task = asyncio.create_task(bot.start(fd.bot_token), name="fakediscord-bot")
    try:
        # bot.wait_until_ready() cannot be awaited before login created its event: poll is_ready()
        deadline = time.monotonic() + ready_timeout
        while not bot.is_ready():
            if task.done():
                task.result()  # raises the bot's error
                raise RuntimeError("the bot stopped before it was ready")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the bot was not ready after {ready_timeout}s")
            await asyncio.sleep(0.01)
        yield bot
    finally:
        if not bot.is_closed():
            await bot.close()
        try:
            await asyncio.wait_for(task, 10)
        except asyncio.CancelledError:
            pass
