"""SQLite backend of `JobQueue`: one file, WAL, aiosqlite; the embedded default.

Several processes (or several `SQLiteJobQueue`s) may share the file: every state change is one
`BEGIN IMMEDIATE` transaction (SQLite's write lock), so two claimers never take the same job, and
`submit_many` counts the user's queued jobs against `max_queued` and queues the batch in one.

The fair line is computed, not stored: queued jobs carry `qseq` (FIFO within a user; negative for
a job put back at the front) and each user with queued jobs has a `rotation.rpos` (users' turn
order: the back on entering the line or after being served, the front when a job comes back from a
lost worker). The line is: rank within user first, then the user's turn:

    ORDER BY ROW_NUMBER() OVER (PARTITION BY user_id ORDER BY qseq), rotation.rpos

A claim takes the first job of that line whose grid the worker has and whose server is not paused
(settings `paused`: everything; `paused:<guild id>`: one server, matched against the spec's
guild_id with json_extract, in the claim's transaction); a worker without the dVAE encoder also
passes over the jobs that need it (an init image, no parent, no checkpoint). Its sweep of expired
leases first leaves the claiming worker's own running jobs alone (see `_sweep`).

Each claim stores a fresh `lease_id` with the job; a worker's writes (`publish`, `save_checkpoint`,
`put_artifact` with `lease_id`, and finish / fail / mark_cancelled / release / heartbeat) check, in
the same transaction, that the job is running under that lease (fencing); finalising a job deletes
its checkpoint; `prune` deletes old finished-and-delivered jobs with everything of theirs, uploads
no job names any more (`uploads`, `upload_refs`: filled by put_artifact and submit), expired
settings (`settings.expires_at`), workers not seen for a day (whatever `older_than`) and the
`rotation` rows of users with no queued job, but never a
job (nor its state.pt) that a queued or running job names as its parent (`spec.parent_job_id`,
read with json_extract in the deleting transaction); `prune_states_over` deletes, under the same
rules, the state.pt of the oldest delivered jobs while all the stored states (summed from
`artifacts_states`, a partial index of their lengths) are over a budget; `submit` refuses (ParentGone) a job whose
parent's state.pt is gone, and (UploadGone) one naming an upload that is not stored, in its own
transaction. A job cancelled while queued (`cancel`, `clear`) loses its `upload_refs` rows, and the
uploads no other job names are deleted in that transaction; `discard_uploads` deletes unnamed
uploads of a command that queued nothing.

Named leases (`hold_lease`, `release_lease`: one bot per store) are rows of `leases`, taken,
renewed or refused in one transaction against `time.time()`; an expired row is simply taken over.
The table is created by `start()` whatever the file's version (no migration: older versions ignore it).

`start()` refuses a file whose directory does not exist (ValueError: a mistyped path would start
an empty queue) and logs the file's absolute path, new or existing.

Schema changes are applied by `start()` in its first transaction: a file made by an older version
gets the new columns and tables (`PRAGMA user_version` says which migrations it has had). The queue
is started only once that transaction has committed; a start that fails leaves it unstarted.

Events are a table with an AUTOINCREMENT key (the seq: monotonic across processes and restarts),
pruned to the last `keep_events`; each event stored with a frame drops the frames (not their events)
older than the latest `keep_frames` frames, through the partial index `events_frames` (the events
that still have one), as Redis keeps its latest `keep_frames` frames.
A long-poll wakes at once for events published by this object and polls the file every
`poll_interval` seconds for other processes' events.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import socket
import sqlite3
import time
from typing import Any, AsyncIterator, Iterable, Sequence

import aiosqlite

from engine.outage import log_swept
from engine.queue import check_expire_after, check_history_limit
from engine.jobs import (
    CLEARED,
    Checkpoint,
    EventKind,
    JobEvent,
    JobRecord,
    JobSpec,
    JobState,
    PAUSED_KEY,
    ParentGone,
    QueueLimitReached,
    UPLOAD_PREFIX,
    UploadGone,
    batch_user,
    is_upload_id,
    new_job_id,
    new_lease_id,
    upload_refs,
)

log = logging.getLogger(__name__)
# aiosqlite logs every call with its arguments at DEBUG: a stored frame, upload or state.pt
# (48-192 MiB) became that many bytes of log text per write, built while holding the GIL, at
# `--log-level DEBUG` (which the bot and the worker set on the root logger). Its INFO and up stay.
logging.getLogger("aiosqlite").setLevel(logging.INFO)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    spec TEXT NOT NULL,
    reply TEXT,
    user_id INTEGER NOT NULL,
    channel_id INTEGER NOT NULL,
    grid INTEGER NOT NULL,
    total INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    iteration INTEGER NOT NULL DEFAULT 0,
    similarity REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    worker_id TEXT,
    error TEXT,
    delivered INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    lease_until REAL,
    qseq INTEGER NOT NULL DEFAULT 0,
    lease_id TEXT,
    failed_on TEXT,
    retry_after REAL
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, user_id, qseq);
CREATE INDEX IF NOT EXISTS jobs_channel ON jobs(channel_id);
CREATE INDEX IF NOT EXISTS jobs_undelivered ON jobs(finished_at)
    WHERE delivered = 0 AND state IN ('done', 'failed', 'cancelled');
CREATE INDEX IF NOT EXISTS jobs_delivered ON jobs(finished_at) WHERE delivered = 1;
CREATE TABLE IF NOT EXISTS rotation (user_id INTEGER PRIMARY KEY, rpos INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    iteration INTEGER NOT NULL DEFAULT 0,
    total INTEGER NOT NULL DEFAULT 0,
    similarity REAL,
    message TEXT,
    at REAL NOT NULL,
    frame BLOB
);
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL, expires_at REAL);
CREATE TABLE IF NOT EXISTS checkpoints (job_id TEXT PRIMARY KEY, iteration INTEGER NOT NULL, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS artifacts (
    job_id TEXT NOT NULL, name TEXT NOT NULL, data BLOB NOT NULL, PRIMARY KEY (job_id, name)
);
CREATE TABLE IF NOT EXISTS workers (
    worker_id TEXT PRIMARY KEY, last_seen REAL NOT NULL, job_id TEXT, init_images INTEGER NOT NULL DEFAULT 1,
    claimed_at REAL
);
CREATE TABLE IF NOT EXISTS uploads (id TEXT PRIMARY KEY, stored_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS upload_refs (
    upload_id TEXT NOT NULL, job_id TEXT NOT NULL, PRIMARY KEY (upload_id, job_id)
);
CREATE INDEX IF NOT EXISTS upload_refs_job ON upload_refs(job_id);
CREATE TABLE IF NOT EXISTS leases (
    name TEXT PRIMARY KEY, holder TEXT NOT NULL, host TEXT NOT NULL, pid INTEGER NOT NULL,
    since REAL NOT NULL, renewed REAL NOT NULL, expires_at REAL NOT NULL
);
INSERT OR IGNORE INTO counters(name, value) VALUES ('line', 0);
"""

# Statements that need the migrated columns (run after `_migrate_v1`).
_SCHEMA_LATE = """
CREATE INDEX IF NOT EXISTS settings_expiry ON settings(expires_at) WHERE expires_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS uploads_age ON uploads(stored_at);
CREATE INDEX IF NOT EXISTS artifacts_states ON artifacts(job_id, length(data)) WHERE name = 'state.pt';
CREATE INDEX IF NOT EXISTS events_frames ON events(seq) WHERE frame IS NOT NULL;
"""

SCHEMA_VERSION = 4  # PRAGMA user_version of a file this module made or migrated

# A job that failed on a worker and went back for another attempt is not that worker's to claim
# again for a while, when another worker is alive (claimed or heartbeated within `_ALIVE` leases;
# one that only announced itself is compiling and can take no retry yet): the retry goes
# elsewhere. Alone, the worker takes it back.
_RETRY_ELSEWHERE_SQL = """NOT COALESCE(
    j.failed_on = ? AND j.retry_after > ?
    AND EXISTS (SELECT 1 FROM workers AS w WHERE w.worker_id != ? AND w.claimed_at > ?),
    0)"""
_ALIVE = 2.0
_FORGET_WORKERS_AFTER = 86400.0   # prune() drops a worker's row this long after it was last seen
_STATE_ARTIFACT = "state.pt"      # what prune(state_older_than=) deletes of a job it keeps
_STATES_PER_TX = 4                # states deleted a transaction: each frees 48-192 MiB of pages

_FINISHED = ("done", "failed", "cancelled")

# The jobs a queued or running job starts from (`spec.parent_job_id`): prune keeps them, state and
# all, in the transaction that deletes. Not correlated: SQLite computes it once a statement, over
# the live jobs only (jobs_state), so no index of parents is needed. `IS NOT NULL`: a NULL in the
# list would make every `NOT IN` unknown (nothing pruned).
_LIVE_PARENTS_SQL = """(
    SELECT json_extract(c.spec, '$.parent_job_id') FROM jobs AS c
    WHERE c.state IN ('queued', 'running') AND json_extract(c.spec, '$.parent_job_id') IS NOT NULL
)"""

# The kept states' total, for their budget (prune_states_over). `artifacts_states` indexes each
# state.pt row with its length (built by start() on a file of an earlier version, kept by SQLite on
# every insert and delete), so the sum reads that index alone, never the rows' 48-192 MiB. The
# literal 'state.pt' (not a parameter): only then may the planner use that partial index.
_STATE_BYTES_SQL = "SELECT COALESCE(SUM(length(data)), 0) FROM artifacts WHERE name = 'state.pt'"

# The states the budget may delete, oldest finished first: those of jobs finished and delivered
# that no queued or running job starts from (the rules of prune's own states pass). `+`: walk
# `artifacts_states` (the few kept states, each with its length) and look their jobs up, not every
# finished job (jobs_state) and each one's artifact row.
_STATES_OVER_SQL = f"""
SELECT a.job_id, length(a.data) AS size FROM artifacts AS a JOIN jobs AS j ON j.id = a.job_id
WHERE a.name = 'state.pt' AND +j.delivered = 1 AND +j.state IN ('done', 'failed', 'cancelled')
  AND j.id NOT IN {_LIVE_PARENTS_SQL}
ORDER BY j.finished_at, j.id LIMIT ?
"""

# The fair line. `{where}` filters the candidates *after* ranking (a grid filter or a paused server
# must not change anybody's rank).
# Ids in one `IN (...)` list: far under SQLite's bound on a statement's variables (32766).
_IN_CHUNK = 500
_LINE_SQL = """
SELECT j.{cols} FROM (
    SELECT *, ROW_NUMBER() OVER (PARTITION BY user_id ORDER BY qseq) AS rnk
    FROM jobs WHERE state = 'queued'
) AS j JOIN rotation AS r ON r.user_id = j.user_id
{where}
ORDER BY j.rnk, r.rpos
{limit}
"""


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    """SQLITE_BUSY / SQLITE_LOCKED: another connection holds the lock past the busy timeout."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    return "locked" in str(exc) or "busy" in str(exc)


_SETTING_SQL = "SELECT value FROM settings WHERE key = ? AND (expires_at IS NULL OR expires_at > ?)"

# A line entry whose server is paused (its setting 'paused:<server id>', engine.jobs.guild_paused_key,
# holds a value true as Python reads it (engine/queue/__init__.py: not false, null, "", [], {} nor
# any numeric zero: json.dumps writes 0.0 as '0.0') and has not expired; parameter: now).
# json_extract reads the spec's 64-bit id as an exact integer. A job without a server (direct
# messages) is never skipped. A number is text that starts with a digit, or '-' and a digit
# ('-Infinity' is none, and true); CAST reads it, 0.0 and -0.0 as 0.
_GUILD_PAUSED_SQL = """EXISTS (
    SELECT 1 FROM settings AS s
    WHERE s.key = 'paused:' || json_extract(j.spec, '$.guild_id')
      AND s.value NOT IN ('false', 'null', '""', '[]', '{}')
      AND NOT ((s.value GLOB '[0-9]*' OR s.value GLOB '-[0-9]*') AND CAST(s.value AS REAL) = 0)
      AND (s.expires_at IS NULL OR s.expires_at > ?)
)"""


# A line entry that needs the dVAE encoder, which a worker without one skips (it waits, keeping
# its place, for a worker with one): its first run starts from its init image (as the worker's
# `_pictures` decides: an init image, and no parent state to start from), and it has no checkpoint
# to resume from. `IS`, not `=`: never NULL (a job without an init image), which `NOT` would keep NULL.
_NEEDS_ENCODER_SQL = """(
    json_type(j.spec, '$.extra.init_image') IS 'object'
    AND COALESCE(json_extract(j.spec, '$.parent_job_id'), '') = ''
    AND NOT EXISTS (SELECT 1 FROM checkpoints AS c WHERE c.job_id = j.id)
)"""


def _record(row: aiosqlite.Row) -> JobRecord:
    spec = JobSpec.from_dict(json.loads(row["spec"]))
    if row["reply"] is not None:
        spec.reply = json.loads(row["reply"])
    return JobRecord(
        id=row["id"],
        spec=spec,
        state=JobState(row["state"]),
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        iteration=row["iteration"],
        similarity=row["similarity"],
        attempts=row["attempts"],
        worker_id=row["worker_id"],
        lease_id=row["lease_id"],
        error=row["error"],
        delivered=bool(row["delivered"]),
        cancel_requested=bool(row["cancel_requested"]),
    )


def _event(row: aiosqlite.Row) -> JobEvent:
    return JobEvent(
        job_id=row["job_id"],
        kind=EventKind(row["kind"]),
        iteration=row["iteration"],
        total=row["total"],
        similarity=row["similarity"],
        frame_png=row["frame"],
        message=row["message"],
        seq=row["seq"],
        at=row["at"],
    )


def _check_writable(where: str) -> None:
    """Refuse, naming the path, a queue file this process could not write: SQLite says only
    "unable to open database file". WAL mode writes the -wal and -shm files beside it, so the
    directory must be writable too, even for an existing file."""
    directory = os.path.dirname(where)
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ValueError(f"cannot open the SQLite queue {where!r}: its directory {directory!r} is not writable "
                         f"by this user (uid {os.getuid()}); the queue needs to create files there")
    if os.path.exists(where) and not os.access(where, os.R_OK | os.W_OK):
        raise ValueError(f"cannot open the SQLite queue {where!r}: the file is not readable and writable by "
                         f"this user (uid {os.getuid()})")


class SQLiteJobQueue:
    """`JobQueue` on one SQLite file. See the module docstring."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        lease: float = 30.0,
        max_attempts: int = 3,
        keep_events: int = 10_000,
        keep_frames: int = 256,
        poll_interval: float = 0.05,
        busy_timeout: float = 30.0,
    ) -> None:
        self.path = os.fspath(path)
        self.lease = float(lease)
        if not (math.isfinite(self.lease) and self.lease > 0):   # a lease that never ends holds a dead worker's job for ever
            raise ValueError(f"lease must be a finite number of seconds above 0, got {lease!r}")
        self.max_attempts = int(max_attempts)
        self.keep_events = int(keep_events)
        self.keep_frames = int(keep_frames)
        self.poll_interval = float(poll_interval)
        self.busy_timeout = float(busy_timeout)
        self._db: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()
        # Reads go through a second connection: in WAL mode a read never waits for a write, and a
        # write can hold the file for seconds (a full-size checkpoint is 96-384 MiB). On one
        # connection the bot's quick checks before it answers Discord (which gives it 3 s) would
        # queue behind the worker's checkpoint. ":memory:" has one connection (a second would
        # open another, empty database).
        self._reader: aiosqlite.Connection | None = None
        self._read_lock = asyncio.Lock()
        # ...and the big reads (checkpoints, artifacts: up to 384 MiB, seconds to read) through a
        # third, so that a worker loading one does not hold up those quick checks either.
        self._blob_reader: aiosqlite.Connection | None = None
        self._blob_lock = asyncio.Lock()
        self._start_lock = asyncio.Lock()
        self._published = asyncio.Event()

    def __repr__(self) -> str:
        return f"SQLiteJobQueue({self.path!r})"

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the file and bring its schema up to date, in one write transaction. The queue counts
        as started only once that transaction has committed: a start that fails (the file's write
        lock held past `busy_timeout` by another process, e.g. one migrating it) closes its
        connection and leaves the queue unstarted, so a later start() does all of it again."""
        async with self._start_lock:
            if self._db is not None:
                return
            fresh = False
            if self.path != ":memory:":
                # Never made up: a mistyped path would otherwise start an empty queue somewhere
                # (every queued job, setting and kept state "gone"). The file itself is created.
                where = os.path.abspath(self.path)
                if not os.path.isdir(os.path.dirname(where)):
                    raise ValueError(f"cannot open the SQLite queue {where!r}: its directory "
                                     f"{os.path.dirname(where)!r} does not exist (a typo in the queue URL? "
                                     "create the directory first)")
                fresh = not os.path.exists(where) or os.path.getsize(where) == 0
                _check_writable(where)
                if not os.path.exists(where):
                    # Owner-only: it holds every prompt (private channels' too), ids and uploaded
                    # pictures. SQLite gives the -wal and -shm files the database file's mode.
                    os.close(os.open(where, os.O_CREAT | os.O_WRONLY, 0o600))
            db = await aiosqlite.connect(self.path, isolation_level=None)
            try:
                db.row_factory = aiosqlite.Row
                await db.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
                await db.execute("PRAGMA journal_mode = WAL")
                # FULL: a commit is on the disk when it returns (WAL synced each time), so a job the
                # user saw queued survives a power cut too, not only a crash. The cost is an fsync a
                # commit: an idle worker's claim poll (4 a second) commits too, measured 2.6 ms a
                # claim instead of 1.1 ms on this project's test machine.
                await db.execute("PRAGMA synchronous = FULL")
                async with self._lock:
                    await db.execute("BEGIN IMMEDIATE")
                    try:
                        await self._create_schema(db)
                    except BaseException:
                        with contextlib.suppress(Exception):
                            await db.execute("ROLLBACK")
                        raise
                    await db.execute("COMMIT")
            except BaseException as exc:
                with contextlib.suppress(Exception):
                    await db.close()
                if isinstance(exc, sqlite3.OperationalError) and _is_busy(exc):
                    raise RuntimeError(
                        f"cannot start the SQLite queue {self.path!r}: {exc} (another process held its write "
                        f"lock longer than busy_timeout={self.busy_timeout:g} s, e.g. while migrating it); "
                        "nothing was changed: start again"
                    ) from exc
                raise
            reader = blob_reader = db
            if self.path != ":memory:":
                opened: list[aiosqlite.Connection] = []
                try:
                    for _ in range(2):
                        conn = await aiosqlite.connect(self.path, isolation_level=None)
                        opened.append(conn)
                        conn.row_factory = aiosqlite.Row
                        await conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
                except BaseException:
                    for conn in [*opened, db]:
                        with contextlib.suppress(Exception):
                            await conn.close()
                    raise
                reader, blob_reader = opened
                log.info("SQLite queue %s (%s)", os.path.abspath(self.path),
                         "a new file" if fresh else "an existing file")
            self._reader, self._blob_reader, self._db = reader, blob_reader, db

    async def _create_schema(self, tx: aiosqlite.Connection) -> None:
        """The tables, and the migrations a file made by an older version needs (inside `start`'s transaction)."""
        fresh = await self._fetchone(
            tx, "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'jobs'"
        ) is None
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                await tx.execute(statement)
        row = await self._fetchone(tx, "PRAGMA user_version")
        version = int(row[0]) if row is not None else 0
        if not fresh and version < 1:
            await self._migrate_v1(tx)
        if not fresh and version < 2:
            await self._migrate_v2(tx)
        if not fresh and version < 3:
            await self._migrate_v3(tx)
        if not fresh and version < 4:
            await self._migrate_v4(tx)
        for statement in _SCHEMA_LATE.split(";"):
            if statement.strip():
                await tx.execute(statement)
        if version < SCHEMA_VERSION:
            await tx.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    async def _migrate_v4(self, db: aiosqlite.Connection) -> None:
        """A file from before the registry told a claiming worker from one that only announced
        itself: every row counts as claiming when last seen (as the retry rule read them before)."""
        columns = {row["name"] for row in await self._rows(db, "PRAGMA table_info(workers)")}
        if "claimed_at" not in columns:
            await db.execute("ALTER TABLE workers ADD COLUMN claimed_at REAL")
            await db.execute("UPDATE workers SET claimed_at = last_seen")

    async def _migrate_v3(self, db: aiosqlite.Connection) -> None:
        """A file from before the registry recorded whether a worker has the dVAE encoder. Its
        workers' rows read as having it until that worker's next claim under this version says (an
        encoder-less one among them fails safe: its init_image jobs are queued and wait, as before)."""
        columns = {row["name"] for row in await self._rows(db, "PRAGMA table_info(workers)")}
        if "init_images" not in columns:
            await db.execute("ALTER TABLE workers ADD COLUMN init_images INTEGER NOT NULL DEFAULT 1")

    async def _migrate_v2(self, db: aiosqlite.Connection) -> None:
        """A file from before retries went to another worker."""
        columns = {row["name"] for row in await self._rows(db, "PRAGMA table_info(jobs)")}
        for column, kind in (("failed_on", "TEXT"), ("retry_after", "REAL")):
            if column not in columns:
                await db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {kind}")

    async def _migrate_v1(self, db: aiosqlite.Connection) -> None:
        """A file from before per-claim leases and upload / setting retention."""
        columns = {
            table: {row["name"] for row in await self._rows(db, f"PRAGMA table_info({table})")}
            for table in ("jobs", "settings")
        }
        if "lease_id" not in columns["jobs"]:
            # A job RUNNING under the old version has no lease id: nobody's writes pass the fence
            # any more, its lease expires and the sweep puts it back in line (resumed from its checkpoint).
            await db.execute("ALTER TABLE jobs ADD COLUMN lease_id TEXT")
        if "expires_at" not in columns["settings"]:
            await db.execute("ALTER TABLE settings ADD COLUMN expires_at REAL")
        # Uploads already stored: their age counts from now; the jobs that name them, from their specs.
        now = time.time()
        stored = await self._rows(db, "SELECT DISTINCT job_id FROM artifacts WHERE job_id GLOB ?", (UPLOAD_PREFIX + "*",))
        await db.executemany(
            "INSERT OR IGNORE INTO uploads(id, stored_at) VALUES (?, ?)",
            [(row["job_id"], now) for row in stored if is_upload_id(row["job_id"])],
        )
        for row in await self._rows(db, "SELECT id, spec FROM jobs"):
            await self._add_refs(db, row["id"], JobSpec.from_dict(json.loads(row["spec"])))
        log.info("%s: migrated to schema version 1 (lease ids, upload and setting retention)", self.path)

    @staticmethod
    async def _add_refs(db: aiosqlite.Connection, job_id: str, spec: JobSpec) -> None:
        refs = upload_refs(spec)
        if refs:
            await db.executemany(
                "INSERT OR IGNORE INTO upload_refs(upload_id, job_id) VALUES (?, ?)", [(u, job_id) for u in refs]
            )

    async def close(self) -> None:
        db, self._db = self._db, None
        reader, self._reader = self._reader, None
        blob_reader, self._blob_reader = self._blob_reader, None
        if reader is not None and reader is not db:
            async with self._read_lock:
                await reader.close()
        if blob_reader is not None and blob_reader is not db:
            async with self._blob_lock:
                await blob_reader.close()
        if db is not None:
            async with self._lock:
                await db.close()

    async def __aenter__(self) -> "SQLiteJobQueue":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- plumbing -------------------------------------------------------------------------------

    def _conn(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError("queue not started: await queue.start() first")
        return self._db

    @contextlib.asynccontextmanager
    async def _tx(self) -> AsyncIterator[aiosqlite.Connection]:
        """One write transaction (the file's write lock), serialised within this object too.

        Never leaves a transaction open, whatever happens to the awaiting task: aiosqlite runs each
        statement on its connection's thread in the order they were queued, whether or not the
        task awaiting it is still there. A task cancelled while it awaits BEGIN (a heartbeat loop
        cancelled by Worker.stop(), say, maybe while another process holds the lock) has its BEGIN
        run anyway: the ROLLBACK queued behind it ends that transaction. Left open, it would make
        every later write on this object fail ("cannot start a transaction within a transaction")
        and hold the file's write lock against every other process until close(). A COMMIT that
        fails (or is cancelled) is followed by a ROLLBACK too (a no-op when it had committed)."""
        async with self._lock:
            db = self._conn()
            if db.in_transaction:   # never expected: something left one open; its writes are undone
                log.warning("%s: a write transaction was left open on the connection: rolled back", self.path)
                await self._rollback(db)
            try:
                await db.execute("BEGIN IMMEDIATE")
                yield db
                await db.execute("COMMIT")
            except BaseException:
                await self._rollback(db)
                raise

    @staticmethod
    async def _rollback(db: aiosqlite.Connection) -> None:
        """ROLLBACK, errors ignored (no transaction open: BEGIN failed, COMMIT done). Awaiting it
        queues it on the connection's thread in this very step, behind whatever is queued there
        (a BEGIN still waiting for the lock): a task cancelled again while it waits leaves it
        queued, and it runs before any later write of this object."""
        with contextlib.suppress(Exception):
            await db.execute("ROLLBACK")

    async def _all(self, sql: str, params: Iterable[Any] = (), *, blob: bool = False) -> list[aiosqlite.Row]:
        """A read outside any write transaction: a reader connection (its own snapshot of what
        has been committed), so it never waits behind a write; `blob`: the one for big reads."""
        reader, lock = (self._blob_reader, self._blob_lock) if blob else (self._reader, self._read_lock)
        if reader is None or reader is self._db:
            async with self._lock:
                async with self._conn().execute(sql, tuple(params)) as cur:
                    return list(await cur.fetchall())
        async with lock:
            async with reader.execute(sql, tuple(params)) as cur:
                return list(await cur.fetchall())

    async def _one(self, sql: str, params: Iterable[Any] = (), *, blob: bool = False) -> aiosqlite.Row | None:
        rows = await self._all(sql, params, blob=blob)
        return rows[0] if rows else None

    @staticmethod
    async def _fetchone(db: aiosqlite.Connection, sql: str, params: Iterable[Any] = ()) -> aiosqlite.Row | None:
        async with db.execute(sql, tuple(params)) as cur:
            return await cur.fetchone()

    @staticmethod
    async def _rows(db: aiosqlite.Connection, sql: str, params: Iterable[Any] = ()) -> list[aiosqlite.Row]:
        async with db.execute(sql, tuple(params)) as cur:
            return list(await cur.fetchall())

    @staticmethod
    async def _next(db: aiosqlite.Connection) -> int:
        row = await SQLiteJobQueue._fetchone(
            db, "UPDATE counters SET value = value + 1 WHERE name = 'line' RETURNING value"
        )
        assert row is not None
        return int(row[0])

    def _wake(self) -> None:
        event, self._published = self._published, asyncio.Event()
        event.set()

    async def _emit(
        self,
        db: aiosqlite.Connection,
        job_id: str,
        kind: EventKind,
        message: str | None = None,
    ) -> int:
        """A state event for `job_id`, with the record's iteration / total / similarity."""
        row = await self._fetchone(db, "SELECT iteration, total, similarity FROM jobs WHERE id = ?", (job_id,))
        iteration, total, similarity = (row["iteration"], row["total"], row["similarity"]) if row else (0, 0, None)
        return await self._insert_event(
            db, JobEvent(job_id, kind, iteration=iteration, total=total, similarity=similarity, message=message)
        )

    async def _insert_event(self, db: aiosqlite.Connection, event: JobEvent) -> int:
        cur = await db.execute(
            "INSERT INTO events(job_id, kind, iteration, total, similarity, message, at, frame)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                event.job_id,
                EventKind(event.kind).value,
                int(event.iteration),
                int(event.total),
                event.similarity,
                event.message,
                float(event.at),
                event.frame_png,
            ),
        )
        seq = int(cur.lastrowid or 0)
        await cur.close()
        if event.frame_png is not None:
            # The latest `keep_frames` frames stay, however many frameless events came between them
            # (engine/queue/__init__.py): through `events_frames`, the few rows that have one.
            await db.execute(
                "UPDATE events INDEXED BY events_frames SET frame = NULL WHERE frame IS NOT NULL AND seq <= ("
                " SELECT seq FROM events INDEXED BY events_frames WHERE frame IS NOT NULL"
                " ORDER BY seq DESC LIMIT 1 OFFSET ?)",
                (max(0, self.keep_frames),),
            )
        if seq % 32 == 0:  # prune in small steps, along the primary key
            await db.execute("DELETE FROM events WHERE seq <= ?", (seq - self.keep_events,))
        return seq

    async def _see_worker(self, db: aiosqlite.Connection, worker_id: str, job_id: str | None,
                          init_images: bool | None = None, *, claiming: bool = True) -> None:
        """The worker's registry row. `init_images`: what its claim said it can take (None, from a
        heartbeat: unchanged; a worker first seen that way counts as having the encoder).
        `claiming`: a claim or heartbeat (its `claimed_at` too), not an announcement."""
        now = time.time()
        await db.execute(
            "INSERT INTO workers(worker_id, last_seen, job_id, init_images, claimed_at)"
            " VALUES (?, ?, ?, COALESCE(?, 1), ?)"
            " ON CONFLICT(worker_id) DO UPDATE SET last_seen = excluded.last_seen,"
            " job_id = COALESCE(excluded.job_id, workers.job_id),"
            " init_images = COALESCE(?, workers.init_images),"
            " claimed_at = COALESCE(excluded.claimed_at, workers.claimed_at)",
            (worker_id, now, job_id, None if init_images is None else int(init_images), now if claiming else None,
             None if init_images is None else int(init_images)),
        )

    async def _to_front(self, db: aiosqlite.Connection, job_id: str, user_id: int) -> None:
        """Back into the line at its very front (it was already this job's turn)."""
        await db.execute(
            "UPDATE jobs SET state = 'queued', worker_id = NULL, lease_id = NULL, lease_until = NULL,"
            " started_at = NULL, qseq = ? WHERE id = ?",
            (-await self._next(db), job_id),
        )
        await db.execute(
            "INSERT INTO rotation(user_id, rpos) VALUES (?, ?)"
            " ON CONFLICT(user_id) DO UPDATE SET rpos = excluded.rpos",
            (user_id, -await self._next(db)),
        )

    async def _finalize(self, db: aiosqlite.Connection, job_id: str, state: JobState, error: str | None = None) -> None:
        await db.execute(
            "UPDATE jobs SET state = ?, finished_at = ?, lease_id = NULL, lease_until = NULL,"
            " error = COALESCE(?, error) WHERE id = ?",
            (state.value, time.time(), error, job_id),
        )
        # Checkpoints are only for resuming; a final job keeps its artifacts (state.pt) instead.
        await db.execute("DELETE FROM checkpoints WHERE job_id = ?", (job_id,))

    async def _cancel_queued(self, db: aiosqlite.Connection, job_id: str, reason: str | None) -> None:
        """A queued job cancelled, `reason` its `error` (None: none given; an earlier attempt's
        failure reason goes either way: it is not how the job ended)."""
        await self._finalize(db, job_id, JobState.CANCELLED)
        await db.execute("UPDATE jobs SET error = ? WHERE id = ?", (reason, job_id))
        await self._emit(db, job_id, EventKind.CANCELLED, reason)

    async def _sweep(self, db: aiosqlite.Connection, spare: str | None = None,
                     swept: list[tuple[str, str]] | None = None) -> int:
        """Expired leases: back to the front, or FAILED after `max_attempts` claims; `swept` gets
        (outcome, job id) for each, logged by the caller once its transaction committed. `spare` (a
        claim's worker id) leaves that worker's own running jobs alone: a claim it sent before its
        heartbeats began to fail (so Worker._lapsing did not hold it back) may get the file only
        after its leases ran out, and would hand it back the job it is still running (a second
        attempt; the first run dropped). Its heartbeat loop's sweeps (held back while its leases
        may have lapsed) and the other workers handle them."""
        not_spared = "" if spare is None else " AND worker_id IS NOT ?"
        async with db.execute(
            "SELECT id, user_id, attempts, cancel_requested FROM jobs"
            f" WHERE state = 'running' AND lease_until < ?{not_spared} ORDER BY started_at DESC, id DESC",
            (time.time(),) if spare is None else (time.time(), spare),
        ) as cur:
            expired = list(await cur.fetchall())
        # Latest start first, so the run that started earliest ends up frontmost (whatever the lease
        # expiries: a heartbeat moves those). The Redis backend's sweep puts them back in this order too.
        for row in expired:
            if row["cancel_requested"]:
                await self._finalize(db, row["id"], JobState.CANCELLED)
                await self._emit(db, row["id"], EventKind.CANCELLED, "worker lost")
                outcome = "cancelled"
            elif row["attempts"] >= self.max_attempts:
                reason = f"worker lost {row['attempts']} times"
                await self._finalize(db, row["id"], JobState.FAILED, reason)
                await self._emit(db, row["id"], EventKind.FAILED, reason)
                outcome = "failed"
            else:
                await self._to_front(db, row["id"], row["user_id"])
                await self._emit(db, row["id"], EventKind.QUEUED, "worker lost")
                outcome = "requeued"
            if swept is not None:
                swept.append((outcome, row["id"]))
        return len(expired)

    async def _get(self, db: aiosqlite.Connection, job_id: str) -> JobRecord | None:
        row = await self._fetchone(db, "SELECT * FROM jobs WHERE id = ?", (job_id,))
        return _record(row) if row else None

    # --- the bot side ---------------------------------------------------------------------------

    async def submit(self, spec: JobSpec, *, max_queued: int | None = None) -> JobRecord:
        return (await self.submit_many([spec], max_queued=max_queued))[0]

    async def submit_many(self, specs: Sequence[JobSpec], *, max_queued: int | None = None) -> list[JobRecord]:
        """Queue every spec in order, all in one write transaction (all or nothing). With `max_queued`,
        the user's QUEUED jobs are counted inside it too (the write lock held: no other process can
        queue in between): over the cap, QueueLimitReached and nothing is written. A spec whose
        parent's state.pt is gone (pruned): ParentGone, nothing written; checked in the same
        transaction, so no prune can take the state between the check and the insert. A spec naming
        an upload that is not stored: UploadGone, nothing written (checked after the cap, in the
        same transaction, so a job is never queued without its pictures)."""
        specs = list(specs)
        user_id = batch_user(specs)
        if user_id is None:
            return []
        now = time.time()
        records = [JobRecord(id=new_job_id(), spec=spec, created_at=now) for spec in specs]
        spec_json = [json.dumps(spec.to_dict()) for spec in specs]  # before taking the write lock
        parents = list(dict.fromkeys(str(s.parent_job_id) for s in specs if s.parent_job_id))
        uploads = sorted({u for s in specs for u in upload_refs(s)})
        async with self._tx() as db:
            for parent in parents:
                if await self._fetchone(db, "SELECT 1 FROM artifacts WHERE job_id = ? AND name = ?",
                                        (parent, _STATE_ARTIFACT)) is None:
                    raise ParentGone(parent)  # _tx rolls back: nothing written
            if max_queued is not None:
                row = await self._fetchone(
                    db, "SELECT COUNT(*) FROM jobs WHERE state = 'queued' AND user_id = ?", (user_id,)
                )
                queued = int(row[0]) if row else 0
                if queued + len(records) > int(max_queued):
                    raise QueueLimitReached(queued, int(max_queued))  # _tx rolls back: nothing written
            for upload_id in uploads:
                if await self._fetchone(db, "SELECT 1 FROM artifacts WHERE job_id = ? LIMIT 1", (upload_id,)) is None:
                    raise UploadGone(upload_id)  # _tx rolls back: nothing written
            for record, data in zip(records, spec_json):
                await self._insert_job(db, record, data)
        self._wake()
        return records

    async def _insert_job(self, db: aiosqlite.Connection, record: JobRecord, spec_json: str) -> None:
        """One queued job at the back of its user's line, with its upload references and QUEUED event."""
        spec = record.spec
        in_line = await self._fetchone(
            db, "SELECT 1 FROM jobs WHERE state = 'queued' AND user_id = ? LIMIT 1", (int(spec.user_id),)
        )
        if in_line is None:  # entering the line: the back of the users' turn order
            await db.execute(
                "INSERT INTO rotation(user_id, rpos) VALUES (?, ?)"
                " ON CONFLICT(user_id) DO UPDATE SET rpos = excluded.rpos",
                (int(spec.user_id), await self._next(db)),
            )
        await db.execute(
            "INSERT INTO jobs(id, spec, user_id, channel_id, grid, total, state, created_at, qseq)"
            " VALUES (?, ?, ?, ?, ?, ?, 'queued', ?, ?)",
            (
                record.id,
                spec_json,
                int(spec.user_id),
                int(spec.channel_id),
                int(spec.grid),
                int(spec.iterations),
                record.created_at,
                await self._next(db),
            ),
        )
        await self._add_refs(db, record.id, spec)  # its uploads stay while the job does
        await self._emit(db, record.id, EventKind.QUEUED)

    async def get(self, job_id: str) -> JobRecord | None:
        row = await self._one("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return _record(row) if row else None

    async def queued(self) -> list[JobRecord]:
        return [_record(r) for r in await self._all(_LINE_SQL.format(cols="*", where="", limit=""))]

    async def line(self) -> list[str]:
        return [row["id"] for row in await self._all(_LINE_SQL.format(cols="id", where="", limit=""))]

    async def position(self, job_id: str) -> int | None:
        line = await self.line()
        return line.index(job_id) + 1 if job_id in line else None

    async def existing(self, job_ids: Sequence[str]) -> set[str]:
        ids, found = list(dict.fromkeys(job_ids)), set()
        for start in range(0, len(ids), _IN_CHUNK):
            chunk = ids[start:start + _IN_CHUNK]
            rows = await self._all(f"SELECT id FROM jobs WHERE id IN ({','.join('?' * len(chunk))})", chunk)
            found.update(row["id"] for row in rows)
        return found

    async def running(self) -> list[JobRecord]:
        return [_record(r) for r in await self._all("SELECT * FROM jobs WHERE state = 'running' ORDER BY started_at")]

    async def count_queued(self, user_id: int | None = None) -> int:
        if user_id is None:
            row = await self._one("SELECT COUNT(*) FROM jobs WHERE state = 'queued'")
        else:
            row = await self._one("SELECT COUNT(*) FROM jobs WHERE state = 'queued' AND user_id = ?", (int(user_id),))
        return int(row[0]) if row else 0

    async def cancel(self, job_id: str, reason: str | None = None, *, replace_reason: bool = False) -> bool:
        reason = reason or None
        async with self._tx() as db:
            row = await self._fetchone(db, "SELECT state FROM jobs WHERE id = ?", (job_id,))
            if row is None:
                return False
            if row["state"] == JobState.QUEUED.value:
                await self._cancel_queued(db, job_id, reason)
                await self._release_uploads(db, [job_id])  # it never ran: its pictures are needed no more
                changed = True
            elif row["state"] == JobState.RUNNING.value:
                # The reason goes with the request (the first request's, if asked twice, unless
                # `replace_reason`): the worker's end of it (finish, mark_cancelled, fail, release,
                # a sweep) keeps `error`.
                await db.execute("UPDATE jobs SET error = CASE WHEN cancel_requested AND NOT ? THEN error ELSE ? END,"
                                 " cancel_requested = 1 WHERE id = ?", (replace_reason, reason, job_id))
                return True
            else:
                return False
        self._wake()
        return changed

    async def clear(self, guild_id: int | None = None, reason: str | None = CLEARED) -> int:
        async with self._tx() as db:
            async with db.execute(_LINE_SQL.format(cols="*", where="", limit="")) as cur:
                rows = await cur.fetchall()
            ids = [row["id"] for row in rows
                   if guild_id is None or json.loads(row["spec"]).get("guild_id") == int(guild_id)]
            for job_id in ids:
                await self._cancel_queued(db, job_id, reason or None)
            await self._release_uploads(db, ids)
        if ids:
            self._wake()
        return len(ids)

    async def discard_uploads(self, upload_ids: Sequence[str]) -> int:
        """Delete those of `upload_ids` that no job names (`upload_refs`), in one write transaction:
        a submit naming one either committed first (its reference keeps it) or comes after (and
        finds it gone: UploadGone). Ids that are not upload ids are ignored. How many went."""
        ids = sorted({u for u in upload_ids if is_upload_id(u)})
        if not ids:
            return 0
        async with self._tx() as db:
            return await self._drop_unnamed(db, ids)

    async def _release_uploads(self, db: aiosqlite.Connection, job_ids: Sequence[str]) -> None:
        """Jobs cancelled while queued name their uploads no more: their references go, and the
        uploads no other job names go with them (in the caller's transaction)."""
        if not job_ids:
            return
        named: set[str] = set()
        for start in range(0, len(job_ids), _IN_CHUNK):
            part = list(job_ids[start:start + _IN_CHUNK])
            marks = ",".join("?" * len(part))
            named.update(row[0] for row in await self._rows(
                db, f"SELECT DISTINCT upload_id FROM upload_refs WHERE job_id IN ({marks})", part))
            await db.execute(f"DELETE FROM upload_refs WHERE job_id IN ({marks})", part)
        if named:
            await self._drop_unnamed(db, sorted(named))

    async def _drop_unnamed(self, db: aiosqlite.Connection, upload_ids: Sequence[str]) -> int:
        """Delete the uploads among `upload_ids` that no job names (in the caller's transaction); how many."""
        gone = 0
        for start in range(0, len(upload_ids), 500):
            part = list(upload_ids[start:start + 500])
            marks = ",".join("?" * len(part))
            named = {row[0] for row in await self._rows(
                db, f"SELECT DISTINCT upload_id FROM upload_refs WHERE upload_id IN ({marks})", part)}
            unnamed = [u for u in part if u not in named]
            if not unnamed:
                continue
            marks = ",".join("?" * len(unnamed))
            row = await self._fetchone(
                db, f"SELECT COUNT(DISTINCT job_id) FROM artifacts WHERE job_id IN ({marks})", unnamed)
            gone += int(row[0]) if row else 0
            await db.execute(f"DELETE FROM artifacts WHERE job_id IN ({marks})", unnamed)
            await db.execute(f"DELETE FROM uploads WHERE id IN ({marks})", unnamed)
        return gone

    async def history(self, channel_id: int, limit: int = 10) -> list[JobRecord]:
        # A negative limit is a ValueError (SQLite would read LIMIT -1 as no limit at all).
        rows = await self._all(
            "SELECT * FROM jobs WHERE channel_id = ? ORDER BY rowid DESC LIMIT ?",
            (int(channel_id), check_history_limit(limit)),
        )
        return [_record(r) for r in rows]

    async def events(self, after: int = 0, timeout: float = 1.0, limit: int = 1000) -> list[JobEvent]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, float(timeout))
        while True:
            published = self._published
            rows = await self._all("SELECT * FROM events WHERE seq > ? ORDER BY seq LIMIT ?", (int(after), int(limit)))
            if rows:
                return [_event(r) for r in rows]
            remaining = deadline - loop.time()
            if remaining <= 0:
                return []
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(published.wait(), min(self.poll_interval, remaining))

    async def mark_delivered(self, job_id: str) -> bool:
        async with self._tx() as db:
            cur = await db.execute("UPDATE jobs SET delivered = 1 WHERE id = ? AND delivered = 0", (job_id,))
            return cur.rowcount == 1

    async def undelivered(self) -> list[JobRecord]:
        # INDEXED BY: without statistics the planner took jobs_state and sorted every finished job
        # ever kept (35 ms at 50k, growing with the history), every reconcile pass.
        rows = await self._all(
            "SELECT * FROM jobs INDEXED BY jobs_undelivered"
            " WHERE delivered = 0 AND state IN ('done', 'failed', 'cancelled') ORDER BY finished_at"
        )
        return [_record(r) for r in rows]

    async def set_reply(self, job_id: str, reply: dict[str, Any]) -> None:
        async with self._tx() as db:
            await db.execute("UPDATE jobs SET reply = ? WHERE id = ?", (json.dumps(reply), job_id))

    async def get_setting(self, key: str, default: Any = None) -> Any:
        row = await self._one(_SETTING_SQL, (key, time.time()))
        return json.loads(row["value"]) if row else default

    async def set_setting(self, key: str, value: Any, expire_after: float | None = None) -> None:
        seconds = check_expire_after(expire_after)   # inf, NaN, 0, negative: ValueError, nothing written
        data = json.dumps(value)
        expires_at = None if seconds is None else time.time() + seconds
        async with self._tx() as db:
            await db.execute(
                "INSERT INTO settings(key, value, expires_at) VALUES (?, ?, ?) ON CONFLICT(key) DO UPDATE"
                " SET value = excluded.value, expires_at = excluded.expires_at",
                (key, data, expires_at),
            )

    # --- named leases ----------------------------------------------------------------------------

    async def hold_lease(self, name: str, holder: str, ttl: float) -> dict[str, Any] | None:
        """Take or renew the lease `name` for `holder` until `ttl` seconds from now: None. Held (not
        expired) by another holder: nothing changes; that holder's info (see JobQueue)."""
        ttl = float(ttl)
        if not (math.isfinite(ttl) and ttl > 0):
            raise ValueError(f"a lease's ttl must be a positive number of seconds, got {ttl!r}")
        async with self._tx() as db:
            now = time.time()   # inside the write lock: every holder's clock reads in turn
            row = await self._fetchone(db, "SELECT * FROM leases WHERE name = ?", (name,))
            if row is not None and row["holder"] != holder and row["expires_at"] > now:
                return {"holder": row["holder"], "host": row["host"], "pid": row["pid"], "since": row["since"],
                        "renewed": row["renewed"], "expires_in": row["expires_at"] - now}
            if row is None or row["holder"] != holder or row["expires_at"] <= now:
                # Free, or expired (another's, or ours after a lapse): held from now, as in Redis,
                # where an expired lease is no key at all.
                await db.execute(
                    "INSERT OR REPLACE INTO leases(name, holder, host, pid, since, renewed, expires_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (name, holder, socket.gethostname(), os.getpid(), now, now, now + ttl),
                )
            else:
                await db.execute("UPDATE leases SET renewed = ?, expires_at = ? WHERE name = ?",
                                 (now, now + ttl, name))
        return None

    async def release_lease(self, name: str, holder: str) -> bool:
        """Delete the lease `name` if `holder` has it: True then (False for one that had expired:
        its row goes too, as an expired Redis key is gone)."""
        async with self._tx() as db:
            row = await self._fetchone(db, "DELETE FROM leases WHERE name = ? AND holder = ? RETURNING expires_at",
                                       (name, holder))
            return row is not None and row["expires_at"] > time.time()

    # --- the worker side ------------------------------------------------------------------------

    async def claim(self, worker_id: str, grids: tuple[int, ...] | None = None, *,
                    init_images: bool = True) -> JobRecord | None:
        lost: list[tuple[str, str]] = []
        async with self._tx() as db:
            swept = await self._sweep(db, spare=worker_id, swept=lost)
            await self._see_worker(db, worker_id, None, init_images)
            now = time.time()
            paused = await self._fetchone(db, _SETTING_SQL, (PAUSED_KEY, now))
            record = None
            if grids is not None:
                grids = tuple(int(g) for g in grids)
            if not (paused and json.loads(paused["value"])) and grids != ():   # (no grid: nothing to take)
                # Filters after the ranking: a grid this worker lacks or a paused server moves
                # nobody's place in the line; the claim takes the first job that passes them.
                conditions: list[str] = [f"NOT {_GUILD_PAUSED_SQL}", _RETRY_ELSEWHERE_SQL]
                params: list[Any] = [now, worker_id, now, worker_id, now - _ALIVE * self.lease]
                if grids is not None:
                    conditions.append("j.grid IN (" + ",".join("?" * len(grids)) + ")")
                    params += grids
                if not init_images:
                    conditions.append(f"NOT {_NEEDS_ENCODER_SQL}")
                where = "WHERE " + " AND ".join(conditions)
                row = await self._fetchone(db, _LINE_SQL.format(cols="*", where=where, limit="LIMIT 1"), params)
                if row is not None:
                    now = time.time()
                    await db.execute(
                        "UPDATE jobs SET state = 'running', attempts = attempts + 1, worker_id = ?, lease_id = ?,"
                        " started_at = ?, lease_until = ?, cancel_requested = 0, failed_on = NULL,"
                        " retry_after = NULL WHERE id = ?",
                        (worker_id, new_lease_id(), now, now + self.lease, row["id"]),
                    )
                    more = await self._fetchone(
                        db, "SELECT 1 FROM jobs WHERE state = 'queued' AND user_id = ? LIMIT 1", (row["user_id"],)
                    )
                    if more is not None:  # served: this user goes to the back of the turn order
                        await db.execute(
                            "UPDATE rotation SET rpos = ? WHERE user_id = ?", (await self._next(db), row["user_id"])
                        )
                    await self._emit(db, row["id"], EventKind.STARTED)
                    await self._see_worker(db, worker_id, row["id"])
                    record = await self._get(db, row["id"])
        log_swept(log, lost)   # committed
        if record is not None or swept:
            self._wake()
        return record

    async def sweep(self) -> int:
        """Handle expired leases now (claim() does this too). Returns how many jobs were touched."""
        lost: list[tuple[str, str]] = []
        async with self._tx() as db:
            swept = await self._sweep(db, swept=lost)
        log_swept(log, lost)   # committed
        if swept:
            self._wake()
        return swept

    async def heartbeat(self, job_id: str, lease_id: str) -> bool:
        async with self._tx() as db:
            row = await self._fetchone(
                db,
                "UPDATE jobs SET lease_until = ? WHERE id = ? AND state = 'running' AND lease_id = ?"
                " AND cancel_requested = 0 RETURNING worker_id",
                (time.time() + self.lease, job_id, lease_id),
            )
            if row is None:
                return False
            if row["worker_id"] is not None:
                await self._see_worker(db, row["worker_id"], job_id)
            return True

    async def publish(self, event: JobEvent, lease_id: str | None = None) -> bool:
        async with self._tx() as db:
            if lease_id is not None and await self._owned(db, event.job_id, lease_id) is None:
                return False
            event.seq = await self._insert_event(db, event)
            if EventKind(event.kind) == EventKind.PROGRESS:
                await db.execute(
                    "UPDATE jobs SET iteration = ?, similarity = COALESCE(?, similarity) WHERE id = ?",
                    (int(event.iteration), event.similarity, event.job_id),
                )
        self._wake()
        return True

    async def save_checkpoint(self, checkpoint: Checkpoint, lease_id: str | None = None) -> bool:
        async with self._tx() as db:
            if lease_id is not None and await self._owned(db, checkpoint.job_id, lease_id) is None:
                return False
            await db.execute(
                "INSERT OR REPLACE INTO checkpoints(job_id, iteration, data) VALUES (?, ?, ?)",
                (checkpoint.job_id, int(checkpoint.iteration), bytes(checkpoint.data)),
            )
        return True

    async def load_checkpoint(self, job_id: str) -> Checkpoint | None:
        row = await self._one("SELECT iteration, data FROM checkpoints WHERE job_id = ?", (job_id,), blob=True)
        return Checkpoint(job_id, row["iteration"], bytes(row["data"])) if row else None

    async def put_artifact(self, job_id: str, name: str, data: bytes, lease_id: str | None = None) -> bool:
        async with self._tx() as db:
            if lease_id is not None and await self._owned(db, job_id, lease_id) is None:
                return False
            await db.execute(
                "INSERT OR REPLACE INTO artifacts(job_id, name, data) VALUES (?, ?, ?)", (job_id, name, bytes(data))
            )
            if is_upload_id(job_id):  # an upload: its age counts from its last write
                await db.execute(
                    "INSERT INTO uploads(id, stored_at) VALUES (?, ?)"
                    " ON CONFLICT(id) DO UPDATE SET stored_at = excluded.stored_at",
                    (job_id, time.time()),
                )
        return True

    async def get_artifact(self, job_id: str, name: str) -> bytes | None:
        row = await self._one("SELECT data FROM artifacts WHERE job_id = ? AND name = ?", (job_id, name), blob=True)
        return bytes(row["data"]) if row else None

    async def has_artifact(self, job_id: str, name: str) -> bool:
        return await self._one("SELECT 1 FROM artifacts WHERE job_id = ? AND name = ?", (job_id, name)) is not None

    async def delete_artifact(self, job_id: str, name: str, lease_id: str | None = None) -> bool:
        async with self._tx() as db:
            if lease_id is not None and await self._owned(db, job_id, lease_id) is None:
                return False
            await db.execute("DELETE FROM artifacts WHERE job_id = ? AND name = ?", (job_id, name))
        return True

    async def _owned(
        self, db: aiosqlite.Connection, job_id: str, lease_id: str, columns: str = "1"
    ) -> aiosqlite.Row | None:
        """`columns` of the job's row if it is RUNNING under the claim `lease_id` (the fence), else
        None. Only what the caller needs: publish and save_checkpoint ask on every frame."""
        return await self._fetchone(
            db, f"SELECT {columns} FROM jobs WHERE id = ? AND state = 'running' AND lease_id = ?", (job_id, lease_id)
        )

    async def finish(self, job_id: str, lease_id: str, similarity: float | None) -> bool:
        async with self._tx() as db:
            row = await self._owned(db, job_id, lease_id, "cancel_requested")
            if row is None:
                return False
            if similarity is not None:
                await db.execute("UPDATE jobs SET similarity = ? WHERE id = ?", (float(similarity), job_id))
            # Its cancel was asked before the run ended: that is how it ends (the reason kept).
            state = JobState.CANCELLED if row["cancel_requested"] else JobState.DONE
            await self._finalize(db, job_id, state)
            await self._emit(db, job_id, EventKind.CANCELLED if row["cancel_requested"] else EventKind.DONE)
        self._wake()
        return True

    async def fail(self, job_id: str, lease_id: str, reason: str, retry: bool = True) -> JobState | None:
        async with self._tx() as db:
            row = await self._owned(db, job_id, lease_id, "user_id, attempts, cancel_requested, worker_id")
            if row is None:  # not running under this claim (or no such job): change nothing
                return None
            if retry and row["attempts"] < self.max_attempts and not row["cancel_requested"]:
                await self._to_front(db, job_id, row["user_id"])
                await db.execute("UPDATE jobs SET error = ?, failed_on = ?, retry_after = ? WHERE id = ?",
                                 (reason, row["worker_id"], time.time() + self.lease, job_id))
                await self._emit(db, job_id, EventKind.QUEUED, reason)
                state = JobState.QUEUED
            elif row["cancel_requested"]:   # the user had asked to cancel it: that is how it ended
                await self._finalize(db, job_id, JobState.CANCELLED)
                await self._emit(db, job_id, EventKind.CANCELLED)
                state = JobState.CANCELLED
            else:
                await self._finalize(db, job_id, JobState.FAILED, reason)
                await self._emit(db, job_id, EventKind.FAILED, reason)
                state = JobState.FAILED
        self._wake()
        return state

    async def mark_cancelled(self, job_id: str, lease_id: str) -> None:
        async with self._tx() as db:
            if await self._owned(db, job_id, lease_id) is None:
                return
            await self._finalize(db, job_id, JobState.CANCELLED)
            await self._emit(db, job_id, EventKind.CANCELLED)
        self._wake()

    async def release(self, job_id: str, lease_id: str) -> bool:
        """A worker stopping gracefully hands its job back: the front of the line, attempt not counted.

        A job whose cancel was requested is cancelled instead (it is never run again).
        """
        async with self._tx() as db:
            row = await self._owned(db, job_id, lease_id, "user_id, cancel_requested")
            if row is None:
                return False
            if row["cancel_requested"]:
                await self._finalize(db, job_id, JobState.CANCELLED)
                await self._emit(db, job_id, EventKind.CANCELLED)
            else:
                await self._to_front(db, job_id, row["user_id"])
                await db.execute("UPDATE jobs SET attempts = MAX(attempts - 1, 0) WHERE id = ?", (job_id,))
                await self._emit(db, job_id, EventKind.QUEUED, "worker stopped")
        self._wake()
        return True

    # --- retention ------------------------------------------------------------------------------

    async def prune(self, older_than: float, state_older_than: float | None = None, batch: int = 200) -> int:
        """Delete jobs finished and delivered more than `older_than` seconds ago, with their
        artifacts, checkpoints, events (frames) and upload references; then uploads stored more than
        `older_than` seconds ago that no job left names; then expired settings, and the rows of
        workers not seen for `_FORGET_WORKERS_AFTER` (a day, whatever `older_than`) and the turn
        of each user with no queued job (`rotation`); then, with `state_older_than`
        shorter than `older_than`, only the `state.pt` of jobs finished and delivered more than that
        many seconds ago (`_STATES_PER_TX` a transaction: each is 48-192 MiB of pages to free).
        Neither pass touches a job that a queued or running job names as its parent: the check is in
        the statement that picks what the transaction deletes. Returns how many whole jobs. Works in
        short transactions of `batch` rows; several processes may prune at once (each job goes once)."""
        total = await self._prune_jobs(float(older_than), int(batch))
        if state_older_than is not None and float(state_older_than) < float(older_than):
            state_cutoff = time.time() - float(state_older_than)
            per_tx = max(1, min(int(batch), _STATES_PER_TX))
            # Oldest first, from where the last transaction stopped (`after`: jobs whose state went
            # already no longer join; those finished at `after` itself are looked at again, harmlessly),
            # so the jobs kept without a state are not scanned again at every step.
            after = -math.inf
            while True:
                async with self._tx() as db:
                    rows = await self._rows(
                        db,
                        "SELECT j.id, j.finished_at FROM jobs AS j"
                        " JOIN artifacts AS a ON a.job_id = j.id AND a.name = ?"
                        " WHERE j.delivered = 1 AND j.finished_at >= ? AND j.finished_at < ?"
                        # `+`: walk jobs_delivered by finish time, not jobs_state (every finished job)
                        " AND +j.state IN ('done', 'failed', 'cancelled')"
                        f" AND j.id NOT IN {_LIVE_PARENTS_SQL} ORDER BY j.finished_at LIMIT ?",
                        (_STATE_ARTIFACT, after, state_cutoff, per_tx),
                    )
                    if rows:
                        ids = [row["id"] for row in rows]
                        marks = ",".join("?" * len(ids))
                        await db.execute(f"DELETE FROM artifacts WHERE name = ? AND job_id IN ({marks})",
                                         [_STATE_ARTIFACT, *ids])
                        after = rows[-1]["finished_at"]
                if len(rows) < per_tx:
                    break
        return total

    async def state_bytes(self) -> int:
        """The total size of the stored state.pt artifacts (from their index, not their bytes)."""
        row = await self._one(_STATE_BYTES_SQL)
        return int(row[0]) if row else 0

    async def prune_states_over(self, budget_bytes: int) -> int:
        """While the stored states total more than `budget_bytes`, delete the state.pt of the job
        finished and delivered first that no queued or running job starts from (see JobQueue).
        Each transaction sums the states and deletes at most `_STATES_PER_TX` of them under the
        write lock, so several processes at once delete each state once and never more than the
        excess. How many states went."""
        budget = int(budget_bytes)
        if budget < 0:
            raise ValueError(f"budget_bytes must not be negative, got {budget_bytes!r}")
        if await self.state_bytes() <= budget:   # the usual case: a read, no write lock
            return 0
        dropped = 0
        while True:
            async with self._tx() as db:
                row = await self._fetchone(db, _STATE_BYTES_SQL)
                excess = (int(row[0]) if row else 0) - budget
                picked: list[str] = []
                if excess > 0:
                    for candidate in await self._rows(db, _STATES_OVER_SQL, (_STATES_PER_TX,)):
                        if excess <= 0:
                            break
                        picked.append(candidate["job_id"])
                        excess -= int(candidate["size"])
                if picked:
                    marks = ",".join("?" * len(picked))
                    await db.execute(f"DELETE FROM artifacts WHERE name = 'state.pt' AND job_id IN ({marks})",
                                     picked)
            dropped += len(picked)
            if not picked or excess <= 0:   # it fits, or nothing more may go
                return dropped

    async def _prune_jobs(self, older_than: float, batch: int) -> int:
        """`prune` less its last pass (states): whole jobs, uploads, settings, workers."""
        cutoff = time.time() - older_than
        total = 0
        while True:
            async with self._tx() as db:
                ids = [row["id"] for row in await self._rows(
                    db,
                    "SELECT id FROM jobs WHERE delivered = 1 AND finished_at < ?"
                    f" AND state IN ('done', 'failed', 'cancelled') AND id NOT IN {_LIVE_PARENTS_SQL} LIMIT ?",
                    (cutoff, int(batch)),
                )]
                if ids:
                    marks = ",".join("?" * len(ids))
                    for table in ("artifacts", "checkpoints", "events", "upload_refs"):
                        await db.execute(f"DELETE FROM {table} WHERE job_id IN ({marks})", ids)
                    await db.execute(f"DELETE FROM jobs WHERE id IN ({marks})", ids)
            total += len(ids)
            if len(ids) < batch:
                break
        # Uploads: in the same transaction as the check, so a job submitted meanwhile keeps its upload.
        while True:
            async with self._tx() as db:
                gone = [row["id"] for row in await self._rows(
                    db,
                    "SELECT id FROM uploads AS u WHERE stored_at < ?"
                    " AND NOT EXISTS (SELECT 1 FROM upload_refs AS r WHERE r.upload_id = u.id) LIMIT ?",
                    (cutoff, int(batch)),
                )]
                if gone:
                    marks = ",".join("?" * len(gone))
                    await db.execute(f"DELETE FROM artifacts WHERE job_id IN ({marks})", gone)
                    await db.execute(f"DELETE FROM uploads WHERE id IN ({marks})", gone)
            if len(gone) < batch:
                break
        async with self._tx() as db:
            await db.execute("DELETE FROM settings WHERE expires_at IS NOT NULL AND expires_at <= ?", (time.time(),))
            # Workers not seen for `_FORGET_WORKERS_AFTER`, whatever `older_than` is (keep_days unset
            # prunes with math.inf: no job goes, but these must): one row is left by each worker
            # process that ever ran (its id names the host and pid), so restarts would pile them up.
            await db.execute("DELETE FROM workers WHERE last_seen < ?", (time.time() - _FORGET_WORKERS_AFTER,))
            # Users with no queued job have no turn to keep: one who queues again enters at the back
            # of the turn order (_insert_job) and one whose job comes back at the front (_to_front),
            # with a row or without, as Redis drops a user from `rot` when their line empties. In
            # this transaction, so no submit slips in between the check and the delete.
            await db.execute("DELETE FROM rotation WHERE user_id NOT IN"
                             " (SELECT user_id FROM jobs WHERE state = 'queued')")
        return total

    async def workers(self, max_age: float | None = None) -> dict[str, dict[str, Any]]:
        """Workers seen (claiming, heartbeating, or announced while compiling) in the last `max_age`
        seconds (default 60): id -> last_seen, job_id, init_images (its last claim or announcement
        said it takes jobs that need the dVAE encoder), claimed_at (its last claim or heartbeat;
        None while it has only announced itself)."""
        max_age = 60.0 if max_age is None else float(max_age)
        rows = await self._all(
            "SELECT * FROM workers WHERE last_seen >= ? ORDER BY worker_id", (time.time() - max_age,)
        )
        return {r["worker_id"]: {"last_seen": r["last_seen"], "job_id": r["job_id"],
                                 "init_images": bool(r["init_images"]), "claimed_at": r["claimed_at"]}
                for r in rows}

    async def announce_worker(self, worker_id: str, init_images: bool) -> None:
        """A worker that is not claiming yet (compiling) is seen now: the row a claim that found
        nothing writes, but not its `claimed_at` (the retry rule's: it can take no retry yet)."""
        async with self._tx() as db:
            await self._see_worker(db, worker_id, None, init_images, claiming=False)

    async def forget_worker(self, worker_id: str) -> None:
        """A worker that stopped cleanly: its registry row goes (see JobQueue)."""
        async with self._tx() as db:
            await db.execute("DELETE FROM workers WHERE worker_id = ?", (worker_id,))
