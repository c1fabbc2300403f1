"""Backends of `engine.jobs.JobQueue`.

    open_queue("sqlite:///imagine.db")        # SQLAlchemy style: relative path "imagine.db"
    open_queue("sqlite:////var/lib/imagine.db")  # absolute path
    open_queue("imagine.db")                  # a plain path is a SQLite file too
    open_queue("file:///var/lib/imagine.db")  # a file URL: its path is absolute
    open_queue("redis://localhost:6379/0?prefix=imagine")

Options in the query string (both backends): `lease` (seconds, default 30), `max_attempts`
(default 3); Redis only: `prefix` (key namespace, default "imagine") and `reconnect_timeout`
(seconds a call, the first one at start included, retries an unreachable Redis before it fails,
default 30); SQLite only: `busy_timeout` (seconds a write waits for another process's write lock,
default 30). Other query parameters of a
redis URL go to redis-py (`socket_timeout`, ...). The queue comes back unstarted: call
`await queue.start()` (or `async with open_queue(url) as queue:`).

A queue URL may hold a password (`redis://:PASSWORD@host:6379/0`): print or log it only through
`redact_url(url)`, and an error message that may quote it through `redact_secrets(text, url)`.

Where `engine.jobs.JobQueue` leaves a choice open, both backends make the same one (the contract
suite, tests/test_queue_contract.py, runs each of these against both):

* Frames: `keep_frames` (a constructor option, default 256) is a number of *frames*: the log keeps
  the PNGs of the latest `keep_frames` events that carry one, whatever the frameless events
  between them, and drops older ones at once (their events stay, `frame_png` None). `keep_events`
  caps the events themselves (SQLite trims it in steps of 32, Redis exactly).
* `prune` deletes a pruned job's events from the log too (its frames, messages, state changes).
  The other events keep their `seq`, and a cursor (`events(after=seq)`) reads on past the deleted
  ones, whether `seq` was one of them or the last event left: numbering never goes back.
* `set_setting(..., expire_after=)`: None keeps the setting until overwritten; anything else must be
  a finite number of seconds above 0 (`math.inf`, NaN, 0 and negatives: ValueError, nothing written).
  There is no "expire now": overwrite it, or let it expire.
* `history(channel_id, limit)`: `limit` 0 is no jobs; a negative limit is a ValueError.
* A pause (`paused`, `paused:<server id>`) is on exactly when its value is true as Python reads it
  (`bool(value)`, what `engine.jobs.pause_of` shows): False, None, any numeric zero (0, 0.0, -0.0),
  "", [] and {} pause nothing; anything else (the string "0", NaN, [0]) pauses. The claims read it
  that way too (SQLite in SQL, Redis in Lua).
"""

from __future__ import annotations

import math
import re
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from engine.jobs import JobQueue

__all__ = ["check_expire_after", "check_history_limit", "check_queue_url", "open_queue", "redact_url",
           "redact_secrets", "store_trouble_hint"]

_NUMERIC_OPTS = {"lease": float, "max_attempts": int}
_SQLITE_OPTS = {**_NUMERIC_OPTS, "busy_timeout": float}
_REDIS_OPTS = {**_NUMERIC_OPTS, "reconnect_timeout": float}


# scheme://user:PASSWORD@rest: the password runs to the last "@" (a raw "@" or "/" in a password
# is a malformed URL, but its text is still a secret); "sqlite:///a.db" has no user part.
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://[^:@/?#]*):(.*)@([^@]*)$", re.S)
_PASSWORD_OPTION = re.compile(r"([?&]password=)[^&#]*", re.I)   # redis-py also takes ?password=


def redact_url(url: str) -> str:
    """The URL with its password masked, for logs and messages:
    `redis://user:s3cret@host:6379/0` -> `redis://user:***@host:6379/0` (also `?password=...`).
    Never raises, whatever the URL looks like."""
    url = str(url)
    url = _USERINFO.sub(lambda m: f"{m.group(1)}:***@{m.group(3)}", url, count=1)
    return _PASSWORD_OPTION.sub(r"\1***", url)


def _passwords(url: str) -> set[str]:
    url = str(url)
    m = _USERINFO.match(url)
    found = {m.group(2)} if m else set()
    query = url.split("?", 1)[1].split("#", 1)[0] if "?" in url else ""
    found.update(v for k, v in parse_qsl(query, keep_blank_values=True) if k.lower() == "password")
    found |= {unquote(p) for p in found}
    # A password with a raw '/', '?' or '#' is cut there by URL parsers, whose errors quote a piece.
    return found | {piece for p in found for piece in re.split(r"[/?#]", p)}


def redact_secrets(text: str, url: str) -> str:
    """`text` (an error message, say) with `url` and its password masked wherever they appear."""
    text = str(text).replace(str(url), redact_url(url))
    for password in sorted(_passwords(url), key=len, reverse=True):
        if len(password) >= 3:   # shorter: masking it would garble the message and hide little
            text = text.replace(password, "***")
    return _PASSWORD_OPTION.sub(r"\1***", text)


def _split_options(query: str, names: set[str]) -> tuple[dict[str, str], str]:
    ours: dict[str, str] = {}
    rest: list[tuple[str, str]] = []
    for key, value in parse_qsl(query, keep_blank_values=True):
        (ours.__setitem__(key, value) if key in names else rest.append((key, value)))
    return ours, urlencode(rest)


def check_expire_after(expire_after: float | None) -> float | None:
    """A setting's `expire_after` checked (see the module docstring): None, or finite seconds > 0."""
    if expire_after is None:
        return None
    seconds = float(expire_after)
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"expire_after must be a finite number of seconds above 0 (None: no expiry), "
                         f"got {expire_after!r}")
    return seconds


def check_history_limit(limit: int) -> int:
    """`history`'s `limit` checked: a whole number, 0 or more."""
    count = int(limit)
    if count < 0:
        raise ValueError(f"history's limit must be 0 or more, got {limit!r}")
    return count


def check_queue_url(url: str) -> str | None:
    """Why `url` cannot be a queue URL (its password masked), or None: the scheme, and the numbers
    in its query string (`?lease=abc` was a float() traceback)."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    # unix:// (a Redis socket) is left out: the Redis backend's connection options do not fit it.
    if scheme not in ("redis", "rediss", "sqlite", "file", ""):
        return f"expected redis://host:6379/0, rediss://..., or sqlite:///path.db, got {redact_url(url)!r}"
    # `redis:6379`, `10.0.0.5:6379/0`: a Redis address without its scheme read as a plain path made
    # a SQLite file of that name, and a worker waited on it for jobs that never came.
    if not scheme and re.fullmatch(r"[A-Za-z0-9._-]+:\d+(/\d*)?", url.partition("?")[0]):
        return (f"{redact_url(url)!r} looks like a Redis address: write redis://{url.partition('?')[0]} "
                f"(or sqlite:///{url} for a SQLite file of that name)")
    if scheme == "file" and urlsplit(url).netloc.lower() not in ("", "localhost"):
        # file://jobs.db names a host, not a file: file:///abs/jobs.db (a file URL's path is absolute).
        return (f"a file URL's path is absolute: file:///abs/path.db, got {redact_url(url)!r} "
                f"(for a path relative to the current folder write sqlite:///path.db)")
    if scheme in ("redis", "rediss") and "@" not in urlsplit(url).netloc and "@" in url.split("://", 1)[1]:
        # `redis://:Ab3/Kx9@host/0`: a '/', '?' or '#' in the password ends the host part early, and
        # redis-py's complaint (or the database check below) would quote the password's rest.
        return ("the queue URL's password has a '/', '?' or '#' (or an '@' follows the host): percent-encode "
                "them in the password (%2F, %3F, %23, %40), e.g. redis://:abc%2Fdef@host:6379/0")
    query = urlsplit(url).query if scheme in ("redis", "rediss") else url.partition("?")[2]
    # redis-py reads a path that is not a database number (`/abc`, `/O`, `/0/x`) as none: db 0, a
    # typo landing on another deployment's queue.
    if scheme in ("redis", "rediss") and not re.fullmatch(r"/?|/\d+", urlsplit(url).path):
        return (f"the database in {redact_url(url)!r} must be a number (redis://host:6379/0), "
                f"got {urlsplit(url).path[1:]!r}")
    # (type, the least value allowed, whether that value itself is allowed, what to say)
    checks = {"lease": (float, 0.0, False, "a number of seconds above 0"),
              "max_attempts": (int, 1, True, "a whole number, at least 1"),
              "busy_timeout": (float, 0.0, True, "a number of seconds, at least 0"),
              "reconnect_timeout": (float, 0.0, True, "a number of seconds, at least 0")}
    for key, text in parse_qsl(query, keep_blank_values=True):
        if key not in checks:
            continue
        kind, least, inclusive, what = checks[key]
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or value < least or (value == least and not inclusive):
            return f"?{key}= in {redact_url(url)!r} must be {what}, got {text!r}"
    return None


def store_trouble_hint(url: str, detail: str) -> str:
    """What to check when the store at `url` failed at start with `detail` (the end of a one-line
    error): a Redis server may be down; a SQLite file has no server: another process's lock, or the
    file itself (its own message says which part of the path)."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme in ("redis", "rediss", "unix"):
        return "that its server is up"
    if "locked" in detail:
        return "that no other process holds the file locked"
    return "that the file can be opened"


def open_queue(url: str, **kwargs: Any) -> JobQueue:
    """A `JobQueue` for `url` (see the module docstring); `kwargs` go to the backend's constructor."""
    url = str(url)
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme in ("redis", "rediss", "unix"):
        from engine.queue.redis import RedisJobQueue

        parts = urlsplit(url)
        opts, rest = _split_options(parts.query, {"prefix", *_REDIS_OPTS})
        options: dict[str, Any] = {k: _REDIS_OPTS[k](v) for k, v in opts.items() if k in _REDIS_OPTS}
        if "prefix" in opts:
            options["prefix"] = opts["prefix"]
        options.update(kwargs)
        return RedisJobQueue(urlunsplit(parts._replace(query=rest)), **options)
    if scheme in ("", "sqlite", "file"):
        from engine.queue.sqlite import SQLiteJobQueue

        path, options = url, {}
        if scheme == "file":
            # A file URL's path is absolute (RFC 8089): "file:///abs/x.db" and
            # "file://localhost/abs/x.db" -> "/abs/x.db"; before, the '/' was dropped as for sqlite:
            # a relative path, another queue (or none) depending on the service's folder.
            parts = urlsplit(url.split("?", 1)[0])
            if parts.netloc.lower() not in ("", "localhost"):
                raise ValueError(f"a file URL's path is absolute: file:///abs/path.db, got {url!r}")
            path = parts.path + (url[len(url.split("?", 1)[0]):])
        elif scheme:
            body = url.split("://", 1)[1]
            # "sqlite:///x.db" -> "x.db" (relative), "sqlite:////abs/x.db" -> "/abs/x.db"
            path = body[1:] if body.startswith("/") else body
        if "?" in path:   # a plain path takes the options too (check_queue_url checks them there)
            path, query = path.split("?", 1)
            opts, _ = _split_options(query, set(_SQLITE_OPTS))
            options = {k: _SQLITE_OPTS[k](v) for k, v in opts.items()}
        if not path:
            raise ValueError(f"no database path in {url!r}")
        options.update(kwargs)
        return SQLiteJobQueue(path, **options)
    raise ValueError(f"unsupported queue url {redact_url(url)!r} (use sqlite:///file.db, a path, or redis://host:port/db)")
