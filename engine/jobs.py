"""Jobs as the bot and the GPU workers share them: specs, records, events, and the queue protocol.

This module must never import torch (the bot imports it on machines without a GPU stack).
Every backend of `JobQueue` (engine.queue.sqlite, engine.queue.redis) passes the same contract
tests (tests/test_queue_contract.py).
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import math
import re
import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Collection, Protocol, Sequence, runtime_checkable


class JobState(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobState.DONE, JobState.FAILED, JobState.CANCELLED)


class EventKind(str, enum.Enum):
    QUEUED = "queued"        # accepted into the line
    STARTED = "started"      # a worker claimed it (again, after a crash: `resumed_from` > 0)
    PROGRESS = "progress"    # a frame: iteration, similarity, PNG bytes
    DONE = "done"            # final image + video stored as artifacts
    FAILED = "failed"        # reason in `message`
    CANCELLED = "cancelled"


# The largest dVAE grid a job may have: 1024x1024 (8 pixels a cell); a slot's activations grow with grid^2
# (engine.capacity).
MAX_GRID = 128


@dataclass
class JobSpec:
    """What a user asked for. Serialisable to JSON (see `to_dict`)."""

    prompt: str
    user_id: int = 0
    channel_id: int = 0
    guild_id: int | None = None
    iterations: int = 300
    seed: int | None = None
    grid: int = 32                  # 32 -> 256x256, 64 -> 512x512
    frame_every: int = 50
    cutn: int = 12
    preset: str | None = None
    parent_job_id: str | None = None  # continue / remix start from this job's final logits
    parent_kind: str | None = None    # "continue" | "remix" | "reroll"
    # Where the bot shows this job: the interaction (token expires after 15 min) and the
    # channel message it created (editable forever with the bot token).
    reply: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "JobSpec":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class JobRecord:
    """A job as the store knows it."""

    id: str
    spec: JobSpec
    state: JobState = JobState.QUEUED
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    iteration: int = 0
    similarity: float | None = None
    attempts: int = 0
    worker_id: str | None = None  # who runs (or last ran) it: for display, logs and metrics
    # The current claim's token (a fresh one per claim; None unless RUNNING). The fenced calls take
    # it, so a worker's stale run of a job it has since claimed again is refused too.
    lease_id: str | None = None
    # FAILED: why. CANCELLED: why it was cancelled, as the canceller gave it (`cancel(reason=)`,
    # `clear`'s CLEARED); None when no reason was given (its author cancelled it). A cancel replaces
    # an earlier attempt's failure reason, so a cancelled job never shows one.
    error: str | None = None
    delivered: bool = False   # the bot posted the final result (exactly-once final post)
    cancel_requested: bool = False


@dataclass
class JobEvent:
    """Progress of one job, in order. `seq` is assigned by the queue (monotonic per queue)."""

    job_id: str
    kind: EventKind
    iteration: int = 0
    total: int = 0
    similarity: float | None = None
    frame_png: bytes | None = None
    message: str | None = None
    seq: int = 0
    at: float = field(default_factory=time.time)


@dataclass
class Checkpoint:
    """Opaque engine state of a running job (torch.save bytes of logits, optimiser, RNG)."""

    job_id: str
    iteration: int
    data: bytes


# The reason `clear` stores on the jobs it cancels unless told another (and its events' message).
CLEARED = "queue cleared"


def new_job_id() -> str:
    return uuid.uuid4().hex[:12]


def new_lease_id() -> str:
    """A claim's token (see `JobRecord.lease_id`)."""
    return uuid.uuid4().hex


# Uploads: pictures the bot stores with `put_artifact(upload_id_of(png), name, data)` *before* it
# submits the job that names them in `spec.extra` as `{"artifact": [upload_id, name], ...}` (at any
# depth). They belong to no job: `prune` deletes an upload once it is older than `older_than` and
# no job left in the store names it; `discard_uploads` deletes those of a command that queued
# nothing at once, and cancelling a queued job deletes the ones no other job names. The id is the
# content's hash (`upload_id_of`), so the same picture is stored once however often it is sent;
# storing it again rewrites the same bytes and counts its age from then.
UPLOAD_PREFIX = "upload_"
_UPLOAD_ID = re.compile(r"upload_[0-9A-Za-z]{1,64}")


# Retention in days (`[worker] keep_days`, `imagine-worker --keep-days`, `Worker(keep_days=)`): 0 or
# None never prunes; otherwise at least an hour. `prune(older_than)` also deletes uploads no job names
# yet once they are `older_than` old, so a window of seconds could delete a picture between the bot
# storing it and submitting its job.
MIN_KEEP_DAYS = 1 / 24


def check_keep_days(value: float | None) -> float | None:
    """`keep_days` checked: None for "never prune" (None or 0), else the value (>= `MIN_KEEP_DAYS`).
    ValueError, saying what is allowed, for anything else."""
    if value is None or value == 0:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"must be a number of days, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"must be 0 (never prune) or a number of days, at least {MIN_KEEP_DAYS:.4g} (an hour), "
                         f"got {value!r}")
    if value < MIN_KEEP_DAYS:
        raise ValueError(f"must be 0 (never prune) or at least {MIN_KEEP_DAYS:.4g} days (an hour), got {value!r}: "
                         "pruning also deletes uploaded pictures no job names yet once they are that old, "
                         "and a shorter window could delete one before its job is submitted")
    return float(value)


# A shorter retention for a finished job's `state.pt` alone (48-192 MiB: Continue / Remix), the
# rest of the job (record, final.png, video.mp4, history) kept `keep_days`: `[worker]
# keep_state_days`, `imagine-worker --keep-state-days`, `Worker(keep_state_days=)`. 0 or None: as
# long as the job; otherwise at least an hour (a state gone minutes after its picture was posted
# would make Continue / Remix useless). More than keep_days is the same as keep_days (the job's
# prune takes its state with it).
def check_keep_state_days(value: float | None) -> float | None:
    """`keep_state_days` checked: None for "as long as the job" (None or 0), else the value
    (>= `MIN_KEEP_DAYS`). ValueError, saying what is allowed, for anything else."""
    if value is None or value == 0:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"must be a number of days, got {value!r}")
    if not math.isfinite(value) or value < MIN_KEEP_DAYS:
        raise ValueError(f"must be 0 (as long as the job: keep_days) or at least {MIN_KEEP_DAYS:.4g} days "
                         f"(an hour), got {value!r}")
    return float(value)


# A budget for the kept states (`[worker] keep_state_gib`, `imagine-worker --keep-state-gib`,
# `Worker(keep_state_gib=)`): the state.pt artifacts in the store total at most this many GiB; over
# it, the oldest delivered ones go first (`JobQueue.prune_states_over`). Whatever keep_state_days
# says, so that jobs queued back to back (by one user, or by heavy use) cannot fill the disk or
# Redis's memory. 0 or None: no budget.
GIB = 1024 ** 3


def check_keep_state_gib(value: float | None) -> float | None:
    """`keep_state_gib` checked: None for "no budget" (None or 0), else the value (a positive,
    finite number of GiB). ValueError, saying what is allowed, for anything else."""
    if value is None or value == 0:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"must be a number of GiB, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"must be 0 (no budget) or a positive number of GiB, got {value!r}")
    return float(value)


def new_upload_id() -> str:
    """A random upload id (tests; uploads of content not worth addressing)."""
    return f"{UPLOAD_PREFIX}{secrets.token_hex(8)}"


def upload_id_of(data: bytes) -> str:
    """The upload id of these bytes: `upload_` and the first 32 hex digits (128 bits) of their
    SHA-256, so identical pictures share one stored copy."""
    return f"{UPLOAD_PREFIX}{hashlib.sha256(data).hexdigest()[:32]}"


def is_upload_id(value: Any) -> bool:
    return isinstance(value, str) and _UPLOAD_ID.fullmatch(value) is not None


def upload_refs(spec: JobSpec) -> list[str]:
    """The upload ids `spec.extra` names (`{"artifact": [upload_id, name]}` anywhere in it), sorted."""
    found: set[str] = set()
    stack: list[Any] = [spec.extra]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            ref = item.get("artifact")
            if isinstance(ref, (list, tuple)) and ref and is_upload_id(ref[0]):
                found.add(ref[0])
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return sorted(found)


# Pausing: while the setting `PAUSED_KEY` is true no claim takes any job (the bot owner's
# `/queue-admin pause everywhere`); while `guild_paused_key(g)` is true claims skip the queued jobs of
# server `g` (their `spec.guild_id`), which keep their places in the line, and take the next job of
# another server (a server admin's `/queue-admin pause`). Running jobs go on either way. Both backends
# check these settings inside the claim itself (SQLite: its transaction, Redis: its Lua script),
# so a job of a paused server is never claimed after the pause was written.
PAUSED_KEY = "paused"


def guild_paused_key(guild_id: int) -> str:
    """The setting that pauses one server's jobs (the claims build the same "paused:<id>" themselves)."""
    return f"{PAUSED_KEY}:{int(guild_id)}"


async def pause_of(queue: "JobQueue", guild_id: int | None, everywhere: Any = None) -> str:
    """What holds a queued job of `guild_id` back: "everywhere" (the owner paused every server),
    "server" (its admins paused this one), or "" (nothing). `everywhere`: the PAUSED_KEY setting
    as already read (a pass over many servers reads it once), None: read it."""
    if everywhere is None:
        everywhere = await queue.get_setting(PAUSED_KEY, False)
    if everywhere:
        return "everywhere"
    if guild_id is not None and await queue.get_setting(guild_paused_key(guild_id), False):
        return "server"
    return ""


def places_in_line(servers: Sequence[int | None], paused_servers: Collection[int]) -> list[int]:
    """Each queued job's place (1: next), from each one's server in claim order (`queued()`'s):
    the jobs ahead of it that count are those the workers will take first, so not those of another
    server in `paused_servers` (the claims pass them by). Its own server's count: a job of a paused
    server is placed for when it resumes. With every server paused, pass none."""
    held: dict[int, int] = {}   # jobs passed so far that their own server's pause holds
    held_total = 0
    places = []
    for index, server in enumerate(servers, 1):
        own = held.get(server, 0) if server is not None else 0
        places.append(index - (held_total - own))
        if server is not None and server in paused_servers:
            held[server] = own + 1
            held_total += 1
    return places


class QueueLimitReached(Exception):
    """A submit refused by the user's cap of waiting jobs (`max_queued`): nothing was queued.
    `queued`: that user's QUEUED jobs at that moment (counted atomically with the refusal); `limit`: the cap."""

    def __init__(self, queued: int, limit: int) -> None:
        super().__init__(queued, limit)
        self.queued = int(queued)
        self.limit = int(limit)

    def __str__(self) -> str:
        return f"{self.queued} jobs already queued for this user; the limit is {self.limit}"


class ParentGone(Exception):
    """A submit refused because a job of the batch starts from a parent (`JobSpec.parent_job_id`)
    whose final state (`state.pt`) is no longer in the store (pruned): nothing was queued. Checked
    atomically with the insert, so a prune between the bot's own check and the submit is caught here.
    `job_id`: that parent."""

    def __init__(self, job_id: str) -> None:
        super().__init__(job_id)
        self.job_id = str(job_id)

    def __str__(self) -> str:
        return f"the state of job {self.job_id} is gone (pruned)"


class UploadGone(Exception):
    """A submit refused because a job of the batch names an upload (`spec.extra`, see `upload_refs`)
    that is not in the store (never stored, pruned, discarded or dropped with a cancelled job since):
    nothing was queued. Checked atomically with the insert, so a job is never queued without its
    pictures. `upload_id`: that upload. A caller that still has the bytes stores them again
    (`put_artifact`) and submits again."""

    def __init__(self, upload_id: str) -> None:
        super().__init__(upload_id)
        self.upload_id = str(upload_id)

    def __str__(self) -> str:
        return f"upload {self.upload_id} is not in the store"


def batch_user(specs: Sequence[JobSpec]) -> int | None:
    """The one user of a `submit_many` batch (None when it is empty); ValueError when they differ."""
    users = {int(s.user_id) for s in specs}
    if len(users) > 1:
        raise ValueError(f"submit_many takes the jobs of one user, got users {sorted(users)}")
    return users.pop() if users else None


@runtime_checkable
class JobQueue(Protocol):
    """The job store + line shared by the bot and the GPU workers.

    Claim order is fair: round-robin across users (a user's second job waits behind every other
    user's first), FIFO within a user. Positions are 1-based places in that order.
    """

    async def start(self) -> None: ...
    async def close(self) -> None: ...

    # --- the bot side -------------------------------------------------------------------------
    # `submit_many` queues every spec (all of one user: ValueError otherwise) in one transaction /
    # script, in order, each with its QUEUED event: all or nothing. With `max_queued`, the user's
    # QUEUED jobs (as `count_queued(user)` counts them) are counted in that same atomic step: if they
    # plus len(specs) would exceed it, nothing is queued and it raises QueueLimitReached. So two
    # submits racing for the last place cannot both get it. A spec with `parent_job_id` needs that
    # job's `state.pt`: checked in the same atomic step, and if one is missing, nothing is queued
    # and it raises ParentGone. Likewise every upload a spec names (`upload_refs`) must be stored:
    # else nothing is queued and it raises UploadGone (checked after the cap). `submit` is
    # submit_many of one spec.
    async def submit(self, spec: JobSpec, *, max_queued: int | None = None) -> JobRecord: ...
    async def submit_many(self, specs: Sequence[JobSpec], *, max_queued: int | None = None) -> list[JobRecord]: ...
    async def get(self, job_id: str) -> JobRecord | None: ...
    async def position(self, job_id: str) -> int | None: ...
    async def queued(self) -> list[JobRecord]: ...               # in claim order
    # queued()'s ids alone, in its order: the bot's line pass reads this after every start and
    # finish, and the records of a long line are most of the cost (parsed, on Redis fetched)
    async def line(self) -> list[str]: ...
    # those of `job_ids` whose record is in the store (one batched read, however many)
    async def existing(self, job_ids: Sequence[str]) -> set[str]: ...
    async def running(self) -> list[JobRecord]: ...
    async def count_queued(self, user_id: int | None = None) -> int: ...
    # queued -> cancelled now; running -> asked. A job cancelled while queued names its uploads no
    # more (its spec still shows them): those no other job names are deleted in the same step.
    # `reason` (None or "": none given) is stored as the record's `error`, at once for a queued job,
    # with the request for a running one, kept through the worker's end of it (finish, mark_cancelled,
    # fail, release, a sweep); a second request of a running job keeps the first one's reason, unless
    # `replace_reason` (a banned word's cancel: its reason decides what the replies withhold). A
    # finished job's reason never changes (False, nothing written).
    async def cancel(self, job_id: str, reason: str | None = None, *, replace_reason: bool = False) -> bool: ...
    # cancel every queued job (of one server: `guild_id`), in one step, uploads as `cancel`, each
    # with `reason` as its `error` (CLEARED unless given): running ones go on
    async def clear(self, guild_id: int | None = None, reason: str | None = CLEARED) -> int: ...
    # Delete those of these uploads that no job names, at once (the check and the delete in one
    # transaction / script: an upload a job names, submitted before, is kept; a submit after finds it
    # gone: UploadGone). For a command that stored pictures and then queued nothing. Ids that are
    # not upload ids are ignored. Returns how many uploads were deleted.
    async def discard_uploads(self, upload_ids: Sequence[str]) -> int: ...
    async def history(self, channel_id: int, limit: int = 10) -> list[JobRecord]: ...
    async def events(self, after: int = 0, timeout: float = 1.0) -> list[JobEvent]: ...
    async def mark_delivered(self, job_id: str) -> bool: ...    # True only the first time
    async def undelivered(self) -> list[JobRecord]: ...         # finished, not yet posted
    # Workers that claimed, heartbeated or announced themselves lately: id -> {"last_seen": epoch seconds, "job_id",
    # "init_images": whether its last claim took init_image jobs (it has the dVAE encoder), ...}.
    # `max_age`: seconds (SQLite: 60 unless given; Redis: its registry's own expiry unless given).
    async def workers(self, max_age: float | None = None) -> dict[str, dict[str, Any]]: ...
    # A worker not claiming yet (compiling before its first claim: minutes on a GPU) says it is
    # alive: `workers()` lists it as seen now, with `init_images` (whether it has the dVAE encoder),
    # its job_id unchanged (None for one new to the registry). Claims and heartbeats do the rest.
    async def announce_worker(self, worker_id: str, init_images: bool) -> None: ...
    # A worker that stopped cleanly (its jobs handed back) leaves the registry at once: `workers()`
    # no longer lists it, and claim's retry rule no longer counts it as another live worker (a job
    # that failed on the one left is that one's to retry, with no wait). Else it would count as
    # alive for up to two leases after it stopped. A later claim, heartbeat or announcement under
    # the same id lists it again; an id not in the registry is no error.
    async def forget_worker(self, worker_id: str) -> None: ...
    async def set_reply(self, job_id: str, reply: dict[str, Any]) -> None: ...
    async def get_setting(self, key: str, default: Any = None) -> Any: ...  # `default` once expired
    # `expire_after` (seconds): the setting is gone after that long (get_setting no longer sees it;
    # Redis drops it itself, SQLite deletes it in `prune`). None: kept until overwritten.
    async def set_setting(self, key: str, value: Any, expire_after: float | None = None) -> None: ...

    # --- named leases: one holder at a time (the bot's "bot" lease: one bot per store) -------------
    # `hold_lease` takes the lease `name` when it is free or expired, or renews it when `holder` has
    # it, until `ttl` seconds from now, in one transaction / script: None. While another holder has
    # it (not expired), nothing changes and it returns that holder's info: {"holder", "host", "pid"
    # (of the process that took it), "since" (when it took it), "renewed" (its last renewal; both
    # epoch seconds), "expires_in" (seconds left)}. Times are the store's clock (SQLite: time.time()
    # in the write transaction; Redis: the server's TIME). `release_lease` deletes it only when
    # `holder` has it (True then): a clean stop lets the next holder take it at once.
    async def hold_lease(self, name: str, holder: str, ttl: float) -> dict[str, Any] | None: ...
    async def release_lease(self, name: str, holder: str) -> bool: ...

    # --- the worker side ----------------------------------------------------------------------
    # `claim` returns the job RUNNING with a fresh `lease_id`: the first job of the fair line that
    # matches `grids` and whose server is not paused (see `PAUSED_KEY`); None while everything is
    # paused. `init_images=False` (a worker without the dVAE encoder) passes over the jobs that need
    # it: an init image in `spec.extra`, no `parent_job_id` and no checkpoint (Redis: jobs queued by
    # an older version are not known to, and are claimed). Skipped jobs keep their places, as those
    # of other grids do. Its sweep of expired leases first leaves `worker_id`'s own running jobs
    # alone (a claim delayed past their leases must not take them back from their runs): its own
    # `sweep()` calls and the other workers' claims handle them.
    # Every call below that takes a `lease_id` is fenced: it acts only while the job is
    # RUNNING under that very claim (checked atomically with the write) and otherwise changes
    # nothing and returns False (`fail`: None; `mark_cancelled`: nothing). So a worker that lost its lease, even one that has since claimed
    # the same job again, cannot publish, overwrite the new run's checkpoint or results, or end the job.
    async def claim(self, worker_id: str, grids: tuple[int, ...] | None = None, *,
                    init_images: bool = True) -> JobRecord | None: ...
    async def heartbeat(self, job_id: str, lease_id: str) -> bool: ...  # False: stop (cancelled / lost lease)
    async def sweep(self) -> int: ...  # expired leases handled now (claim() does it too, but for the claimer's own); how many
    # Without `lease_id` (the bot's uploads, tests) these always write and return True.
    async def publish(self, event: JobEvent, lease_id: str | None = None) -> bool: ...
    async def save_checkpoint(self, checkpoint: Checkpoint, lease_id: str | None = None) -> bool: ...
    async def load_checkpoint(self, job_id: str) -> Checkpoint | None: ...  # None once the job finished
    async def put_artifact(self, job_id: str, name: str, data: bytes, lease_id: str | None = None) -> bool: ...
    async def get_artifact(self, job_id: str, name: str) -> bytes | None: ...
    async def has_artifact(self, job_id: str, name: str) -> bool: ...  # without reading it (a state.pt is large)
    # Removes the artifact if there is one (fenced as put_artifact: False when refused, nothing
    # changed; True otherwise, whether or not there was one). A run that makes no video removes an
    # earlier attempt's video.mp4 (one that stored its results but never finished), which would
    # otherwise be posted as this run's.
    async def delete_artifact(self, job_id: str, name: str, lease_id: str | None = None) -> bool: ...
    # True when it ended the job: DONE, or CANCELLED (its CANCELLED event, the cancel's reason kept)
    # when its cancel was asked before this call, as `fail` and `release` end such a job.
    async def finish(self, job_id: str, lease_id: str, similarity: float | None) -> bool: ...
    # The state this call left the job in: QUEUED (back at the front for another attempt), FAILED
    # (`retry=False`, or the attempts cap) or CANCELLED (its user had asked to cancel it); None
    # when the fence refused it (a stale run, or no such job): nothing changed, so nothing ended.
    async def fail(self, job_id: str, lease_id: str, reason: str, retry: bool = True) -> JobState | None: ...
    async def mark_cancelled(self, job_id: str, lease_id: str) -> None: ...
    async def release(self, job_id: str, lease_id: str) -> bool: ...  # graceful stop: back to the front, attempt not counted

    # --- retention ----------------------------------------------------------------------------
    # Jobs finished *and* delivered more than `older_than` seconds ago: their records, artifacts,
    # history entries and frames go. Uploads (see `UPLOAD_PREFIX`) stored more than `older_than`
    # seconds ago that no job left in the store names go too, and (SQLite) expired settings.
    # Then, with `state_older_than` (None: the same as `older_than`, nothing more), only the
    # `state.pt` artifact of jobs finished and delivered more than that many seconds ago: their
    # records, final.png, video and history stay (Continue / Remix of them then say "gone").
    # `older_than` may be math.inf: no whole job goes, only states. Jobs queued, running or not
    # yet delivered are never touched, nor (neither whole nor their state) a job that is the
    # `parent_job_id` of a queued or running job: checked atomically with each delete, so it is
    # prunable again at the first prune after its last such child ended. Returns how many whole
    # jobs. Safe to run from several processes.
    async def prune(self, older_than: float, state_older_than: float | None = None) -> int: ...
    # The budget of the kept states (`check_keep_state_gib`). `state_bytes`: the total size of the
    # `state.pt` artifacts in the store (every one: a running or undelivered job's too), read
    # cheaply (SQLite: an index of their lengths; Redis: a counter kept with every write and delete
    # of one). `prune_states_over(budget_bytes)`: while that total is over `budget_bytes`, deletes
    # the `state.pt` alone of the job finished and delivered first (by `finished_at`), with the
    # eligibility rules of `prune`'s states (never a job not yet delivered, nor one a queued or
    # running job names as its parent: checked atomically with each delete); stops when the total
    # fits or nothing more may go. Returns how many states it deleted. Safe to run from several
    # processes: each state goes once and is counted off once.
    async def state_bytes(self) -> int: ...
    async def prune_states_over(self, budget_bytes: int) -> int: ...
