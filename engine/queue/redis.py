"""Redis backend of `JobQueue`, for many GPU workers on many hosts sharing one Redis server.

What SAQ (0.26) gives us, and what it does not:

* SAQ's line is one FIFO list moved with BLMOVE; its retries and its sweep of stuck jobs push a job
  to the *back* of that list; its abort cancels an asyncio task inside a SAQ `Worker` that runs one
  function call per job; its job record is one JSON blob, rewritten whole by each update. We need a
  fair round-robin line by user with grid filters and positions, requeueing at the *front*, a
  cancel flag that a batched GPU loop reads at its heartbeat, and state changes that are atomic with
  the line: none of which SAQ's structures can express (and a JSON record cannot be updated inside
  Lua without cjson turning 64-bit Discord ids into doubles). SAQ's notifications are pub/sub (lost
  while the bot is down); we need a durable, ordered event log.
* So the line, the records, leases and events are ours, and every state change is one Lua script
  (atomic, so two claimers never take the same job; claim() sweeps expired leases first, but
  not the claiming worker's own: see `sweep`;
  `submit_many` checks the user's cap of queued jobs and queues the whole batch in one). Records
  are hashes (the spec is an opaque JSON string Lua never parses); the event log is a Redis stream
  whose entry ids are `<seq>-0`, so XREAD BLOCK is the long-poll and `seq` is monotonic for every
  process; frames live beside it in a hash capped at `keep_frames`. The claim skips the jobs of a
  paused server (setting `paused:<guild id>`): a job's server is its `guild` field, the id as a
  decimal string written at submit, compared as a string (cjson would round the spec's number).
  A worker without the dVAE encoder claims past the jobs that need it: marked `needs_encoder` at
  submit (an init image, no parent) and with no checkpoint.
* Each claim stores a fresh lease token in the job (`lease`, returned as `JobRecord.lease_id`). A
  worker's writes (`publish`, `save_checkpoint`, `put_artifact` with `lease_id`, and finish / fail /
  mark_cancelled / release / heartbeat) are fenced: the script checks that the job is running under
  that lease before it writes, so a worker that lost its lease (even one that has since claimed the
  same job again) cannot overwrite the new run's state. Writes without `lease_id` (the bot's
  uploads) are unconditional. Finalising a job deletes its checkpoint. A Redis that restarted (its
  run_id changed: a restart with its data, a failover) sweeps no lease until a full lease after the
  first sweep that saw it back: leases that ran out while it was down were the outage's, and their
  workers, still running the jobs, renew them meanwhile instead of losing an attempt each.
* Blobs (checkpoints: 96-384 MiB, artifacts such as state.pt: 48-192 MiB) never travel in one
  command: redis-py gives each command `socket_timeout` for its whole payload and reply, so on a
  slow link one big command would time out on every try. A write sends `blob_chunk`-sized pieces,
  in order, to the hash `<prefix>:stage:<blob id>`, piece n in field n (HSET, idempotent when
  re-sent; each piece a value of its own, so Redis never allocates, regrows or copies anything
  the size of the blob), with a TTL renewed by each piece until the commit. The commit is one
  fenced script that checks every piece is there at its length, renames the hash to
  `<prefix>:blob:<blob id>`, points the checkpoint / artifact record at it and drops the blob it
  replaced. A blob of one piece or less is written by the commit itself (a hash of one field). An
  interrupted write leaves the previous blob in place and its staged pieces expiring. A blob is
  never changed once written, so a read (HGET piece by piece of the blob its record points to)
  either gets every piece of that one version or sees it dropped (replaced meanwhile) and starts
  again from the record. (Blobs stored as one string, by an unreleased development version, are
  not read.)
* Retention: `prune` deletes old finished-and-delivered jobs (their events too: XDEL of the log
  up to the job's last event, `evlast`, which every script that logs an event writes), uploads
  that no job names any more
  and then, with `state_older_than`, the `state.pt` alone of younger delivered jobs (paging
  through `<prefix>:delivered`). Uploads: `submit` records the uploads a spec names
  (`<prefix>:refs:<upload>`, a set of job ids, and the job's `refs` field); an upload nobody
  names is in `<prefix>:uploads` (zset by the time it was stored). A job that a queued or running
  job starts from (`spec.parent_job_id`, the child's `parent` field) is never pruned, nor its
  state.pt: `<prefix>:kids:<parent>` is the set of its queued and running children (added by
  `submit`, removed when the child ends), which the prune scripts read before they delete; `submit`
  refuses (ParentGone) a child whose parent's state.pt is gone, and (UploadGone) a job naming an
  upload that is not stored, in its script. `prune_states_over` deletes, under the same rules, the
  state.pt of the oldest delivered jobs while the kept states total more than a budget: the
  scripts that write or delete a state.pt keep an index of them (`<prefix>:states`, a zset by
  finish time; `<prefix>:statesize`, their sizes; `<prefix>:statebytes`, the total), which start()
  completes with the states an earlier version stored. A job cancelled while queued (`cancel`,
  `clear`) drops its `refs` field and leaves the uploads' `refs` sets, and an upload left named by nobody is
  deleted in that script; `discard_uploads` deletes the unnamed uploads of a command that queued
  nothing, in one script too. Settings written
  with `expire_after` are plain keys with a Redis TTL
  (`<prefix>:setting:<key>`); the others live in the `<prefix>:settings` hash. Writing one form
  deletes the other and reading looks at both, each in one MULTI/EXEC.
* SAQ is used where it fits: its worker registry and stats (`write_worker_info` on each
  claim/heartbeat/announcement, throttled; `RedisQueue.info()` for `workers()`), so SAQ's dashboard and tooling
  see our GPU workers. It shares our Redis client (and its reconnect settings). Worker ids must not
  contain ':' (SAQ's `info()` splits keys on it).

Keys: `<prefix>:job:<id>` (hash), `<prefix>:line:<user>` (zset of that user's queued jobs, FIFO;
negative scores are front-of-line returns), `<prefix>:rot` (zset of users with queued jobs, their
turn order), `<prefix>:qall` (set), `<prefix>:running` (zset by lease expiry, server time),
`<prefix>:alive` (zset of workers by when last seen), `<prefix>:hist:<channel>`,
`<prefix>:undelivered`, `<prefix>:delivered` (zset of finished and delivered jobs by finish time,
for `prune`), `<prefix>:settings`, `<prefix>:setting:<key>`, `<prefix>:ckpt:<id>` (hash: iteration,
blob, size), `<prefix>:artp:<id>` (hash: name -> '<blob id> <size>'), `<prefix>:blob:<blob id>`,
`<prefix>:stage:<blob id>` (hash, TTL), `<prefix>:art:<id>` (artifacts an
earlier version stored inline; still read), `<prefix>:uploads`, `<prefix>:upload_at` (hash: when
each upload was stored), `<prefix>:refs:<upload>`, `<prefix>:kids:<job>` (set of the queued and
running jobs that start from that job), `<prefix>:states`, `<prefix>:statesize`,
`<prefix>:statebytes` (the kept states' index), `<prefix>:events` (stream), `<prefix>:evseq`,
`<prefix>:frames`, `<prefix>:framelist`, `<prefix>:ctr`, `<prefix>:tok:<token>`, `<prefix>:server`
(hash: the Redis run_id the sweeps last saw and since when, for a restart's grace),
`<prefix>:lease:<name>` (hash: a named lease's holder, host, pid, since, renewed; its PX expiry is
the lease's: `hold_lease`); SAQ's own under `saq:<prefix>:`.
Keys are computed inside the scripts, so this needs one Redis, not a cluster.

Reconnecting: the client retries connection errors with backoff (redis-py `Retry`), and every call
is retried again here for up to `reconnect_timeout` seconds. That is safe because every call is
idempotent: reads and plain writes by nature, each mutating script through a per-call token whose
first reply is kept (`<prefix>:tok:<token>`) for longer than a call can go on retrying
(`token_ttl`: two minutes, more with a longer `reconnect_timeout`), so a script re-sent after a
lost reply returns the same answer instead of running twice. A Redis that answers READONLY (a
primary demoted to a replica in a failover) is retried like an unreachable one: its connections are
dropped and made again, so a DNS name or proxy that moved to the new primary is followed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import socket
import ssl
import time
import uuid
from typing import Any, Awaitable, Callable, Sequence, TypeVar

from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from saq.queue.redis import RedisQueue

from engine.outage import log_swept
from engine.queue import check_expire_after, check_history_limit, redact_url
from engine.jobs import (
    CLEARED,
    Checkpoint,
    EventKind,
    JobEvent,
    JobRecord,
    JobSpec,
    JobState,
    ParentGone,
    QueueLimitReached,
    UploadGone,
    batch_user,
    is_upload_id,
    new_job_id,
    new_lease_id,
    upload_refs,
)

log = logging.getLogger(__name__)


def _log_swept(note: str) -> None:
    """Logs a sweep's note (the Lua `swept_note`: counts requeued, failed and cancelled, then the
    first "outcome:id"s), if any."""
    if not note:
        return
    requeued, failed, cancelled, *ids = note.split()
    log_swept(log, [(i.partition(":")[0], i.partition(":")[2]) for i in ids],
              {"requeued": int(requeued), "failed": int(failed), "cancelled": int(cancelled)})


T = TypeVar("T")

# BusyLoadingError is a ConnectionError; ReadOnlyError (READONLY: a replica now) drops the connection
# when redis-py retries it, so the next one may reach the new primary.
_RETRYABLE = (redis_errors.ConnectionError, redis_errors.TimeoutError, redis_errors.ReadOnlyError)
# ...and so are these, which no retry mends: a password Redis refused (or one it wants and was not
# given). They fail at once, with Redis's reason, instead of as "unreachable" after reconnect_timeout.
_REFUSED = (redis_errors.AuthenticationError, redis_errors.AuthorizationError)




def unreachable(exc: BaseException) -> bool:
    """Whether `exc`, a start's failure, says the server could not be reached in time (down,
    restarting, loading its data, its name not resolving yet): a supervisor's restart may mend it.
    Not a refused password, nor a certificate no retry verifies."""
    return (isinstance(exc, (*_RETRYABLE, redis_errors.BusyLoadingError)) and not isinstance(exc, _REFUSED)
            and certificate_not_verified(exc) is None)


class CertificateNotVerified(Exception):
    """A rediss:// server whose TLS certificate this client cannot verify (signed by a CA it was not
    given, self-signed, made for another host name). Like a refused password, no retry mends it:
    raised at once, saying so, instead of as "unreachable" after reconnect_timeout. Not a
    ConnectionError, so that nothing retries it."""


def certificate_not_verified(exc: BaseException) -> CertificateNotVerified | None:
    """The error to raise for `exc` when a TLS certificate verification failure is behind it
    (redis-py wraps the ssl error in a ConnectionError, keeping it as the context), else None."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, ssl.SSLCertVerificationError):
            why = cause.verify_message or cause.reason or str(cause)
            break
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    else:   # the chain lost: redis-py's message still quotes OpenSSL's reason
        if "CERTIFICATE_VERIFY_FAILED" not in str(exc):
            return None
        why = "certificate verify failed"
    return CertificateNotVerified(
        f"the Redis server's TLS certificate could not be verified ({why}): when a private CA signed it, "
        "give that CA's certificate on the URL, ?ssl_ca_certs=/path/ca.crt")


class _Refused(Exception):
    def __init__(self, error: Exception) -> None:
        self.error = error


class _RetryUnlessRefused(Retry):
    """redis-py's Retry, except that a refused password or an unverified TLS certificate is raised
    at once: redis-py counts them ConnectionErrors and would retry them like a dropped link."""

    async def call_with_retry(self, do: Callable[[], Awaitable[T]], fail: Any, *args: Any, **kwargs: Any) -> T:
        async def attempt() -> T:
            try:
                return await do()
            except _REFUSED as exc:
                raise _Refused(exc) from exc   # not one of the retried errors
            except redis_errors.ConnectionError as exc:
                unverified = certificate_not_verified(exc)
                if unverified is None:
                    raise
                raise _Refused(unverified) from exc
        try:
            return await super().call_with_retry(attempt, fail, *args, **kwargs)
        except _Refused as refused:
            raise refused.error from None

# A blob (checkpoint, artifact) moves in commands of at most this many bytes, each of which must
# cross the link within `socket_timeout`: 4 MiB in 10 s works down to 0.4 MiB/s.
BLOB_CHUNK = 4 * 1024 * 1024
# How long a staged blob outlives its last chunk when its write never commits (the writer died or
# gave up): each chunk renews it, and one chunk's retries end well within it.
STAGING_TTL = 600.0
# Reads of a blob that was replaced meanwhile start again from its record, at most this many times.
_BLOB_READ_TRIES = 10

# ARGV[1..6] of every script; script arguments start at ARGV[7].
_LUA_PRELUDE = r"""
local P = ARGV[1]
local TOK = ARGV[2]
local NOW = ARGV[3]
local KEEP = tonumber(ARGV[4])
local MAXATT = tonumber(ARGV[5])
local LEASE = tonumber(ARGV[6])
local TOKKEY = P .. ':tok:' .. TOK
if TOK ~= '' then
  local prev = redis.call('GET', TOKKEY)
  if prev then return prev end
end
local function jk(id) return P .. ':job:' .. id end
local function nextc() return redis.call('INCR', P .. ':ctr') end
local function tnow()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function fmt(x) return string.format('%.6f', x) end
local function xadd(fields)
  -- The log's epoch: made with its first event, so a Redis that lost its data starts a new one,
  -- and a reader can tell new numbers from old ones even where the new ones passed its cursor.
  local ep = redis.call('GET', P .. ':evepoch')
  if not ep then
    ep = (ARGV[2] ~= '' and ARGV[2]) or (NOW .. '-' .. redis.call('INCR', P .. ':evepochs'))
    redis.call('SET', P .. ':evepoch', ep)
  end
  local seq = redis.call('INCR', P .. ':evseq')
  fields[#fields + 1] = 'ep'; fields[#fields + 1] = ep
  redis.call('XADD', P .. ':events', 'MAXLEN', KEEP, seq .. '-0', unpack(fields))
  -- The job's last event (fields[2]: every event names its job first), for prune: a pruned job's
  -- events are all at or before it. Not for a job that is not stored (a publish may name one).
  if fields[1] == 'job' and redis.call('EXISTS', jk(fields[2])) == 1 then
    redis.call('HSET', jk(fields[2]), 'evlast', seq)
  end
  return seq
end
local function emit(id, kind, msg)
  local v = redis.call('HMGET', jk(id), 'iteration', 'total', 'similarity')
  local f = {'job', id, 'kind', kind, 'it', v[1] or '0', 'tot', v[2] or '0', 'at', NOW}
  if v[3] then f[#f + 1] = 'sim'; f[#f + 1] = v[3] end
  if msg then f[#f + 1] = 'msg'; f[#f + 1] = msg end
  return xadd(f)
end
local function leave_line(id, uid)
  local lk = P .. ':line:' .. uid
  redis.call('ZREM', lk, id)
  redis.call('SREM', P .. ':qall', id)
  if redis.call('ZCARD', lk) == 0 then redis.call('ZREM', P .. ':rot', uid) end
end
local function to_front(id)
  local j = jk(id)
  local uid = redis.call('HGET', j, 'user')
  local q = -nextc()
  redis.call('HSET', j, 'state', 'queued', 'qseq', q)
  redis.call('HDEL', j, 'worker_id', 'lease', 'lease_until', 'started_at')
  redis.call('ZREM', P .. ':running', id)
  redis.call('ZADD', P .. ':line:' .. uid, q, id)
  redis.call('SADD', P .. ':qall', id)
  redis.call('ZADD', P .. ':rot', -nextc(), uid)
end
-- Blobs (checkpoints, artifacts): the bytes are in `blob:<blob id>`, a hash of the blob's chunks
-- (field n: chunk n; a small blob: field '0' alone) written once and never changed; the checkpoint
-- hash (`blob`, `size`) or the artifact's field in `artp:<id>` ('<blob id> <size>') points to it. A
-- replace points to a new blob and drops the old one. Earlier versions kept the bytes inline
-- (`ckpt:<id>` field `data`, `art:<id>` fields): still read, dropped with the rest.
local function blobkey(bid) return P .. ':blob:' .. bid end
local function pointed(ptr) return ptr and string.match(ptr, '^(%S+)') end
local function drop_checkpoint(id)
  local bid = redis.call('HGET', P .. ':ckpt:' .. id, 'blob')
  if bid then redis.call('UNLINK', blobkey(bid)) end  -- UNLINK: over 64 chunks, freed off the main thread
  redis.call('DEL', P .. ':ckpt:' .. id)
end
-- The kept states' index, for their budget (prune_states_over): `states` (zset: each stored
-- state.pt's job, by its finish time; +inf while the job is not finished), `statesize` (hash: job
-- -> the state's bytes) and `statebytes` (their total). Changed only through these two, in the
-- script that writes or deletes the state, so the total is always the sum of the sizes.
local function index_state(id, size)
  local old = redis.call('HGET', P .. ':statesize', id)
  if old then redis.call('DECRBY', P .. ':statebytes', old) end
  redis.call('HSET', P .. ':statesize', id, size)
  redis.call('INCRBY', P .. ':statebytes', size)
  local v = redis.call('HMGET', jk(id), 'state', 'finished_at')
  local ended = v[1] == 'done' or v[1] == 'failed' or v[1] == 'cancelled'
  redis.call('ZADD', P .. ':states', ended and v[2] or '+inf', id)
end
local function unindex_state(id)
  local old = redis.call('HGET', P .. ':statesize', id)
  if old then
    redis.call('DECRBY', P .. ':statebytes', old)
    redis.call('HDEL', P .. ':statesize', id)
  end
  redis.call('ZREM', P .. ':states', id)
end
local function drop_artifacts(id)
  unindex_state(id)
  for _, ptr in ipairs(redis.call('HVALS', P .. ':artp:' .. id)) do
    local bid = pointed(ptr)
    if bid then redis.call('UNLINK', blobkey(bid)) end
  end
  redis.call('UNLINK', P .. ':artp:' .. id, P .. ':art:' .. id)
end
-- The queued and running jobs that start from job `id` (their `parent` field): while there is one,
-- prune keeps job `id` whole, state.pt included. A child joins at submit and leaves in `finalize`.
local function kidsk(id) return P .. ':kids:' .. id end
local function has_live_kids(id) return redis.call('EXISTS', kidsk(id)) == 1 end
local function finalize(id, state, err)
  local j = jk(id)
  local parent = redis.call('HGET', j, 'parent')
  if parent then redis.call('SREM', kidsk(parent), id) end  -- its parent may be pruned again
  redis.call('HSET', j, 'state', state, 'finished_at', NOW)
  if err then redis.call('HSET', j, 'error', err) end
  redis.call('HDEL', j, 'lease', 'lease_until')
  redis.call('ZREM', P .. ':running', id)
  drop_checkpoint(id)  -- only for resuming; state.pt (an artifact) stays
  redis.call('ZADD', P .. ':states', 'XX', NOW, id)  -- its state (if any) is ranked by this end
  if redis.call('HGET', j, 'delivered') ~= '1' then
    redis.call('ZADD', P .. ':undelivered', nextc(), id)
  else
    redis.call('ZADD', P .. ':delivered', NOW, id)
  end
end
-- Whether this Redis started (a restart, a failover: its run_id is new to this prefix) less than a
-- lease ago, as seen by the first sweep after it: leases that ran out while it was down or loading
-- are the outage's, not their workers', who get a full lease from its return to renew them. One
-- write per restart (`server`: run_id, since). A Redis whose INFO a script cannot read: no grace.
-- Nor a clock now behind `since` (the host's clock stepped back after the restart, NTP after a
-- reboot): the grace would otherwise last that step longer, every lease unswept meanwhile.
local function just_restarted(t)
  local info = redis.pcall('INFO', 'server')   -- an error reply (INFO renamed away): a table
  local run = type(info) == 'string' and string.match(info, 'run_id:(%x+)')
  if not run then return false end
  local v = redis.call('HMGET', P .. ':server', 'run_id', 'since')
  if v[1] ~= run then
    redis.call('HSET', P .. ':server', 'run_id', run, 'since', fmt(t))
    return true
  end
  local since = tonumber(v[2]) or 0
  return since <= t and t < since + LEASE
end
-- Expired leases: back to the front of the line, or ended (cancelled, failed after MAXATT claims).
-- `spare` (a claim's worker id; nil: none) leaves that worker's own running jobs alone: a claim it
-- sent before its heartbeats began to fail (so Worker._lapsing did not hold it back) may reach
-- Redis only after a link outage longer than the lease, and would hand it back the job it is still
-- running (a second attempt; the first run dropped). Its heartbeat loop's sweeps (held back while
-- its leases may have lapsed) and the other workers' claims and sweeps handle them.
-- What it did goes in `swept` (counts, and the first 10 "outcome:id": engine.outage.SWEPT_IDS), which
-- `swept_note` appends to the script's answer for the caller's log (engine.outage.log_swept).
local swept = {requeued = 0, failed = 0, cancelled = 0, ids = {}}
local function swept_as(outcome, id)
  swept[outcome] = swept[outcome] + 1
  if #swept.ids < 10 then swept.ids[#swept.ids + 1] = outcome .. ':' .. id end
end
local function swept_note()
  if swept.requeued + swept.failed + swept.cancelled == 0 then return '' end
  return '\n' .. swept.requeued .. ' ' .. swept.failed .. ' ' .. swept.cancelled .. ' ' .. table.concat(swept.ids, ' ')
end
local function sweep(spare)
  local t = tnow()
  if just_restarted(t) then return 0 end
  local ids = redis.call('ZRANGEBYSCORE', P .. ':running', '-inf', '(' .. fmt(t))
  -- By when their runs started (then id), not by lease expiry (a heartbeat moves that): latest
  -- start first, so the run that started earliest ends up frontmost, as the SQLite backend does.
  local started = {}
  for _, id in ipairs(ids) do
    started[id] = tonumber(redis.call('HGET', jk(id), 'started_at') or '') or 0
  end
  table.sort(ids, function(x, y)
    if started[x] ~= started[y] then return started[x] < started[y] end
    return x < y
  end)
  local spared = 0
  for i = #ids, 1, -1 do
    local id = ids[i]
    local v = redis.call('HMGET', jk(id), 'state', 'cancel_requested', 'attempts', 'worker_id')
    if v[1] ~= 'running' then
      redis.call('ZREM', P .. ':running', id)
    elseif spare and v[4] == spare then
      spared = spared + 1
    elseif v[2] == '1' then
      finalize(id, 'cancelled')
      emit(id, 'cancelled', 'worker lost')
      swept_as('cancelled', id)
    elseif tonumber(v[3] or '0') >= MAXATT then
      local msg = 'worker lost ' .. v[3] .. ' times'
      finalize(id, 'failed', msg)
      emit(id, 'failed', msg)
      swept_as('failed', id)
    else
      to_front(id)
      emit(id, 'queued', 'worker lost')
      swept_as('requeued', id)
    end
  end
  return #ids - spared
end
local function line()
  -- the fair line: rank within the user first, then the users' turn order
  local users = redis.call('ZRANGE', P .. ':rot', 0, -1)
  local lines, longest = {}, 0
  for i, u in ipairs(users) do
    lines[i] = redis.call('ZRANGE', P .. ':line:' .. u, 0, -1)
    if #lines[i] > longest then longest = #lines[i] end
  end
  local ids, uids = {}, {}
  for r = 1, longest do
    for i, u in ipairs(users) do
      local id = lines[i][r]
      if id then ids[#ids + 1] = id; uids[#uids + 1] = u end
    end
  end
  return ids, uids
end
-- the fence: the job is running under the claim `lease` (a token made by that claim)
local function owned(id, lease)
  local v = redis.call('HMGET', jk(id), 'state', 'lease')
  return lease ~= '' and v[1] == 'running' and v[2] == lease
end
local function unref(id)
  -- a job leaves the store: the uploads it named that nobody else names become prunable
  local refs = redis.call('HGET', jk(id), 'refs')
  if not refs then return end
  for u in string.gmatch(refs, '%S+') do
    local rk = P .. ':refs:' .. u
    redis.call('SREM', rk, id)
    if redis.call('SCARD', rk) == 0 then
      local at = redis.call('HGET', P .. ':upload_at', u)
      if at then redis.call('ZADD', P .. ':uploads', at, u) end
    end
  end
end
-- an upload no job names goes at once: its blob, its record, its age (for prune)
local function drop_upload(u)
  drop_artifacts(u)
  redis.call('HDEL', P .. ':upload_at', u)
  redis.call('ZREM', P .. ':uploads', u)
  redis.call('DEL', P .. ':refs:' .. u)
end
local function drop_if_unnamed(u)
  if redis.call('SCARD', P .. ':refs:' .. u) > 0 then return 0 end
  local stored = redis.call('EXISTS', P .. ':artp:' .. u, P .. ':art:' .. u)
  drop_upload(u)
  return stored > 0 and 1 or 0
end
-- a job cancelled while queued (it never ran) names its uploads no more: those nobody else names go
local function release_uploads(id)
  local refs = redis.call('HGET', jk(id), 'refs')
  if not refs then return end
  redis.call('HDEL', jk(id), 'refs')
  for u in string.gmatch(refs, '%S+') do
    redis.call('SREM', P .. ':refs:' .. u, id)
    drop_if_unnamed(u)
  end
end
-- whether a setting (JSON, in either of its forms: see set_setting) holds a value true as Python
-- reads it (engine/queue/__init__.py): not false, null, "", [], {} nor any numeric zero (json.dumps
-- writes 0.0 as '0.0'). A number starts with a digit, or '-' and a digit ('-Infinity' is none).
local function setting_on(key)
  local v = redis.call('HGET', P .. ':settings', key) or redis.call('GET', P .. ':setting:' .. key)
  if not v or v == 'false' or v == 'null' or v == '""' or v == '[]' or v == '{}' then return false end
  if string.match(v, '^%-?%d') and tonumber(v) == 0 then return false end
  return true
end
-- Who is alive, for retries (see claim's `elsewhere`): a worker is seen at each claim (every poll,
-- busy or idle) and heartbeat. Its score is rewritten only once it is LEASE/4 old: liveness is
-- judged over two leases, which a score at most LEASE/4 behind still meets with room to spare,
-- while rewriting it at every poll made each idle claim (~4/s per worker) a write, and so an fsync
-- under `appendfsync always`; now a claim that finds nothing writes nothing (unless its sweep
-- finds an expired lease). Members unseen for an hour are pruned only along with such a write, for
-- the same reason. (A score ahead of the clock,
-- which stepped back, is rewritten: it would otherwise keep a dead worker alive.)
local function seen(worker, t)
  local at = tonumber(redis.call('ZSCORE', P .. ':alive', worker) or '')
  if at and at <= t and t - at < LEASE / 4 then return end
  redis.call('ZADD', P .. ':alive', t, worker)
  redis.call('ZREMRANGEBYSCORE', P .. ':alive', '-inf', t - 3600)
end
local function is_final(state)
  return state == 'done' or state == 'failed' or state == 'cancelled'
end
-- a queued job cancelled: out of the line, its `error` the reason ('' none given: an earlier
-- attempt's failure reason goes either way, it is not how the job ended), its uploads released
local function cancel_queued(id, uid, reason)
  leave_line(id, uid)
  finalize(id, 'cancelled')
  if reason ~= '' then redis.call('HSET', jk(id), 'error', reason) else redis.call('HDEL', jk(id), 'error') end
  emit(id, 'cancelled', reason ~= '' and reason or nil)
  release_uploads(id)
end
local function body()
"""

_LUA_EPILOGUE = r"""
end
local res = body()
if TOK ~= '' and res ~= '' then redis.call('SET', TOKKEY, res, 'EX', TOKEN_TTL) end
return res
"""

_SCRIPTS: dict[str, str] = {
    # max_queued ('' = no cap), user, n, then n times: id, channel, grid, total, spec, uploads it
    # names (space-separated, '' = none), server ('' = none; the decimal id: a string, so the claim
    # compares it exactly, where cjson would round the spec's 64-bit number), parent job ('' = none),
    # needs the dVAE encoder ('1': it starts from an init image, with no parent; claims without
    # the encoder skip it) -> 'ok', 'parent <job id>' (that parent's state.pt is gone: nothing written), 'limit <queued>'
    # (nothing written), 'upload <upload id>' (not stored: nothing written) or 'exists' (an id
    # taken: nothing written). All or nothing: every check comes before the first write.
    "submit": r"""
  local uid, n = ARGV[8], tonumber(ARGV[9])
  local lk = P .. ':line:' .. uid
  for k = 0, n - 1 do
    local parent = ARGV[17 + 9 * k]
    if parent ~= '' and redis.call('HEXISTS', P .. ':artp:' .. parent, 'state.pt') == 0
        and redis.call('HEXISTS', P .. ':art:' .. parent, 'state.pt') == 0 then
      return 'parent ' .. parent
    end
  end
  if ARGV[7] ~= '' then
    local queued = redis.call('ZCARD', lk)  -- what count_queued(user) counts
    if queued + n > tonumber(ARGV[7]) then return 'limit ' .. queued end
  end
  for k = 0, n - 1 do
    for u in string.gmatch(ARGV[15 + 9 * k], '%S+') do  -- every upload it names is stored
      if redis.call('EXISTS', P .. ':artp:' .. u, P .. ':art:' .. u) == 0 then return 'upload ' .. u end
    end
  end
  local seen = {}
  for k = 0, n - 1 do
    local id = ARGV[10 + 9 * k]
    if seen[id] or redis.call('EXISTS', jk(id)) == 1 then return 'exists' end
    seen[id] = true
  end
  for k = 0, n - 1 do
    local a = 10 + 9 * k
    local id, chan, refs, guild, parent = ARGV[a], ARGV[a + 1], ARGV[a + 5], ARGV[a + 6], ARGV[a + 7]
    local j = jk(id)
    local q = nextc()
    redis.call('HSET', j, 'id', id, 'spec', ARGV[a + 4], 'user', uid, 'channel', chan, 'grid', ARGV[a + 2],
      'total', ARGV[a + 3], 'state', 'queued', 'created_at', NOW, 'iteration', '0', 'attempts', '0',
      'delivered', '0', 'cancel_requested', '0', 'qseq', q)
    if guild ~= '' then redis.call('HSET', j, 'guild', guild) end
    if ARGV[a + 8] == '1' then redis.call('HSET', j, 'needs_encoder', '1') end
    if parent ~= '' then  -- its parent is not pruned while this job is queued or running
      redis.call('HSET', j, 'parent', parent)
      redis.call('SADD', kidsk(parent), id)
    end
    if refs ~= '' then
      redis.call('HSET', j, 'refs', refs)
      for u in string.gmatch(refs, '%S+') do  -- named by a job: not prunable while it is stored
        redis.call('SADD', P .. ':refs:' .. u, id)
        redis.call('ZREM', P .. ':uploads', u)
      end
    end
    if not redis.call('ZSCORE', P .. ':rot', uid) then redis.call('ZADD', P .. ':rot', nextc(), uid) end
    redis.call('ZADD', lk, q, id)
    redis.call('SADD', P .. ':qall', id)
    redis.call('ZADD', P .. ':hist:' .. chan, nextc(), id)
    emit(id, 'queued')
  end
  return 'ok'
""",
    # worker, lease (a fresh token), init images ('1': it may take jobs that need the dVAE encoder;
    # '0': it has none), ngrids (-1: any), grids... -> the job's id or '', then its sweep's note (if
    # it swept any: see swept_note; the "sweep" script's count is followed by it too)
    "claim": r"""
  local worker, lease, init_ok, ngr = ARGV[7], ARGV[8], ARGV[9] == '1', tonumber(ARGV[10])
  local grids = {}
  for i = 1, ngr do grids[ARGV[10 + i]] = true end
  sweep(worker)   -- not this worker's own running jobs (see sweep)
  local t = tnow()
  seen(worker, t)
  local others = nil
  local function elsewhere(j)
    -- A job that failed here and went back for another attempt is another worker's to retry, for
    -- a lease, when another worker is alive (seen within two leases, its score lagging by at most
    -- LEASE/4: see `seen`); alone, this one takes it.
    local f = redis.call('HMGET', j, 'failed_on', 'retry_after')
    if f[1] ~= worker or not f[2] or tonumber(f[2]) <= t then return false end
    if others == nil then
      others = false
      for _, w in ipairs(redis.call('ZRANGEBYSCORE', P .. ':alive', t - 2 * LEASE, '+inf')) do
        if w ~= worker then others = true end
      end
    end
    return others
  end
  if setting_on('paused') then return swept_note() end
  -- A server is paused while its setting 'paused:<server id>' is on. The job's server is its
  -- 'guild' field, the id's decimal string (never the spec's JSON number: cjson would round it).
  -- Jobs submitted before that field existed get it at start() (_backfill_guilds); one without
  -- it (no server: direct messages) is never skipped.
  local guild_paused = {}
  local function skipped(j)
    local g = redis.call('HGET', j, 'guild')
    if not g then return false end
    if guild_paused[g] == nil then guild_paused[g] = setting_on('paused:' .. g) end
    return guild_paused[g]
  end
  -- A worker without the dVAE encoder skips the jobs that need it: those its submit marked
  -- `needs_encoder` (an init image, no parent) that have no checkpoint to resume from. They wait
  -- for a worker with one, keeping their places. Jobs stored before that field existed lack it:
  -- claimed, and retried elsewhere (the worker's NoEncoder) when they turn out to need it.
  local function needs_encoder(id, j)
    return redis.call('HGET', j, 'needs_encoder') == '1' and redis.call('EXISTS', P .. ':ckpt:' .. id) == 0
  end
  local ids, uids = line()
  for k, id in ipairs(ids) do
    local j = jk(id)
    if (ngr < 0 or grids[redis.call('HGET', j, 'grid')]) and (init_ok or not needs_encoder(id, j))
        and not skipped(j) and not elsewhere(j) then
      local uid = uids[k]
      leave_line(id, uid)
      if redis.call('ZSCORE', P .. ':rot', uid) then redis.call('ZADD', P .. ':rot', nextc(), uid) end
      local lu = fmt(tnow() + LEASE)
      redis.call('HSET', j, 'state', 'running', 'worker_id', worker, 'lease', lease, 'started_at', NOW,
        'lease_until', lu, 'cancel_requested', '0')
      redis.call('HDEL', j, 'failed_on', 'retry_after')
      redis.call('HINCRBY', j, 'attempts', 1)
      redis.call('ZADD', P .. ':running', lu, id)
      emit(id, 'started')
      return id .. swept_note()
    end
  end
  return swept_note()
""",
    "sweep": r"""
  return tostring(sweep()) .. swept_note()
""",
    "line": r"""
  local ids = line()
  return ids
""",
    # id, lease -> '0', or '1 ' .. worker id (for SAQ's registry)
    "heartbeat": r"""
  local id = ARGV[7]
  if not owned(id, ARGV[8]) then return '0' end
  local v = redis.call('HMGET', jk(id), 'cancel_requested', 'worker_id')
  if v[1] == '1' then return '0' end
  local lu = fmt(tnow() + LEASE)
  redis.call('HSET', jk(id), 'lease_until', lu)
  redis.call('ZADD', P .. ':running', lu, id)
  if v[2] then seen(v[2], tnow()) end
  return '1 ' .. (v[2] or '')
""",
    # id, reason ('' = none), replace ('1'/'0')
    "cancel": r"""
  local id, reason = ARGV[7], ARGV[8]
  local v = redis.call('HMGET', jk(id), 'state', 'user', 'cancel_requested')
  if v[1] == 'queued' then
    cancel_queued(id, v[2], reason)
    return '1'
  elseif v[1] == 'running' then
    -- The reason goes with the request (the first request's, if asked twice, unless `replace`):
    -- the worker's end of it (finish, mark_cancelled, fail, release, a sweep) keeps `error`.
    if v[3] ~= '1' or ARGV[9] == '1' then
      if reason ~= '' then redis.call('HSET', jk(id), 'error', reason) else redis.call('HDEL', jk(id), 'error') end
    end
    redis.call('HSET', jk(id), 'cancel_requested', '1')
    return '1'
  end
  return '0'
""",
    # reason ('' = none)
    "clear": r"""
  local ids, uids = line()
  for k, id in ipairs(ids) do
    cancel_queued(id, uids[k], ARGV[7])
  end
  return tostring(#ids)
""",
    # reason ('' = none), ids... -> how many were cancelled: those still queued; one claimed
    # meanwhile is left running
    "clear_ids": r"""
  local n = 0
  for i = 8, #ARGV do
    local id = ARGV[i]
    local v = redis.call('HMGET', jk(id), 'state', 'user')
    if v[1] == 'queued' then
      cancel_queued(id, v[2], ARGV[7])
      n = n + 1
    end
  end
  return tostring(n)
""",
    # id, lease, similarity ('' = keep) -> '0', or the state it left ('done' / 'cancelled') .. ' '
    # .. worker id (for its stats)
    "finish": r"""
  local id = ARGV[7]
  if not owned(id, ARGV[8]) then return '0' end
  if ARGV[9] ~= '' then redis.call('HSET', jk(id), 'similarity', ARGV[9]) end
  local v = redis.call('HMGET', jk(id), 'worker_id', 'cancel_requested')
  -- Its cancel was asked before the run ended: that is how it ends (the reason kept).
  local state = (v[2] == '1') and 'cancelled' or 'done'
  finalize(id, state)
  emit(id, state)
  return state .. ' ' .. (v[1] or '')
""",
    # id, lease, reason, retry ('1'/'0') -> '' when the fence refused (not running under this
    # lease, or no such job: nothing changed), else the state it left ('queued' / 'failed' /
    # 'cancelled') .. ' ' .. worker id
    "fail": r"""
  local id, reason = ARGV[7], ARGV[9]
  if not owned(id, ARGV[8]) then return '' end
  local v = redis.call('HMGET', jk(id), 'state', 'worker_id', 'attempts', 'cancel_requested')
  local worker = v[2] or ''
  if ARGV[10] == '1' and tonumber(v[3]) < MAXATT and v[4] ~= '1' then
    to_front(id)
    -- another worker's to retry, for a lease (see claim)
    redis.call('HSET', jk(id), 'error', reason, 'failed_on', worker, 'retry_after', fmt(tnow() + LEASE))
    emit(id, 'queued', reason)
    return 'queued ' .. worker
  end
  if v[4] == '1' then  -- the user had asked to cancel it: that is how it ended
    finalize(id, 'cancelled')
    emit(id, 'cancelled')
    return 'cancelled ' .. worker
  end
  finalize(id, 'failed', reason)
  emit(id, 'failed', reason)
  return 'failed ' .. worker
""",
    # id, lease -> '0', or '1 ' .. worker id
    "mark_cancelled": r"""
  local id = ARGV[7]
  if not owned(id, ARGV[8]) then return '0' end
  local worker = redis.call('HGET', jk(id), 'worker_id') or ''
  finalize(id, 'cancelled')
  emit(id, 'cancelled')
  return '1 ' .. worker
""",
    # id, lease
    "release": r"""
  local id = ARGV[7]
  if not owned(id, ARGV[8]) then return '0' end
  if redis.call('HGET', jk(id), 'cancel_requested') == '1' then
    finalize(id, 'cancelled')
    emit(id, 'cancelled')
    return '1'
  end
  to_front(id)
  if redis.call('HINCRBY', jk(id), 'attempts', -1) < 0 then redis.call('HSET', jk(id), 'attempts', '0') end
  emit(id, 'queued', 'worker stopped')
  return '1'
""",
    # id
    "mark_delivered": r"""
  local id = ARGV[7]
  if redis.call('EXISTS', jk(id)) == 0 or redis.call('HGET', jk(id), 'delivered') == '1' then return '0' end
  redis.call('HSET', jk(id), 'delivered', '1')
  redis.call('ZREM', P .. ':undelivered', id)
  local v = redis.call('HMGET', jk(id), 'state', 'finished_at')
  if is_final(v[1]) and v[2] then redis.call('ZADD', P .. ':delivered', v[2], id) end
  return '1'
""",
    # id, reply json
    "set_reply": r"""
  if redis.call('EXISTS', jk(ARGV[7])) == 1 then redis.call('HSET', jk(ARGV[7]), 'reply', ARGV[8]) end
  return '1'
""",
    # id, kind, iteration, total, similarity ('' = none), message ('' = none, else '=' .. text),
    # at, has_frame ('1'/'0'), frame, keep_frames, lease ('' or absent = unfenced)
    "publish": r"""
  local id, kind = ARGV[7], ARGV[8]
  if ARGV[17] and ARGV[17] ~= '' and not owned(id, ARGV[17]) then return '0' end
  local f = {'job', id, 'kind', kind, 'it', ARGV[9], 'tot', ARGV[10], 'at', ARGV[13]}
  if ARGV[11] ~= '' then f[#f + 1] = 'sim'; f[#f + 1] = ARGV[11] end
  if ARGV[12] ~= '' then f[#f + 1] = 'msg'; f[#f + 1] = string.sub(ARGV[12], 2) end
  local has_frame = ARGV[14] == '1'
  if has_frame then f[#f + 1] = 'f'; f[#f + 1] = '1' end
  local seq = xadd(f)
  if has_frame then
    redis.call('HSET', P .. ':frames', seq, ARGV[15])
    redis.call('RPUSH', P .. ':framelist', seq)
    local extra = redis.call('LLEN', P .. ':framelist') - tonumber(ARGV[16])
    for i = 1, extra do
      local old = redis.call('LPOP', P .. ':framelist')
      if old then redis.call('HDEL', P .. ':frames', old) end
    end
  end
  if kind == 'progress' and redis.call('EXISTS', jk(id)) == 1 then
    redis.call('HSET', jk(id), 'iteration', ARGV[9])
    if ARGV[11] ~= '' then redis.call('HSET', jk(id), 'similarity', ARGV[11]) end
  end
  return tostring(seq)
""",
    # blob id, chunk number n (0, 1, ...), bytes, ttl (ms) -> '1', or 'gap' when a chunk before n is
    # not staged (it expired, or a Redis that lost its data): the write must start again. One chunk of
    # a staged blob: field n of the hash `stage:<blob id>` (HSET: the same bytes in the same field
    # when re-sent) and the hash's TTL together, so a staging key never exists without one, even one
    # a late duplicate chunk brings back. Each chunk is a value of its own: nothing is allocated
    # beyond the chunk and nothing is ever regrown or copied (a string staged whole was: grown chunk
    # by chunk, 2.2-2.6 s of main-thread copying per 256 MiB; pre-sized, a 0.23-0.37 s zero-fill).
    # Chunks are sent in order and a hash loses its fields only all together (expired, evicted, a
    # Redis that lost its data), so the fields are always 0 .. HLEN-1: chunk n has every earlier
    # chunk before it exactly when HLEN >= n (a re-sent chunk finds HLEN > n).
    "stage_chunk": r"""
  local stage, n = P .. ':stage:' .. ARGV[7], tonumber(ARGV[8])
  if redis.call('HLEN', stage) < n then
    -- The write starts again under a new blob id: what is left of this one would only hold memory
    -- until its TTL.
    redis.call('UNLINK', stage)
    return 'gap'
  end
  redis.call('HSET', stage, n, ARGV[9])
  redis.call('PEXPIRE', stage, ARGV[10])
  return '1'
""",
    # kind ('ckpt' | 'art' | 'upload'), id (job or upload), lease ('' = unfenced), iteration (ckpt)
    # or artifact name, blob id, size, chunk size (staged: the bytes are in stage:<blob id>, in
    # chunks of that size; '0': inline, next), bytes -> '1' stored, '0' refused by the fence (nothing
    # changed; staged bytes dropped), 'gone' (the staged bytes are missing or incomplete: nothing
    # changed, write again). The commit of a blob: the fence, the staged hash becoming the blob
    # (RENAME: O(1) whatever its size), the pointer moving to it and the old blob dropped are one
    # step, so a stale run never replaces anything and a reader never sees a half. An inline blob is
    # the same hash with one field, '0'.
    "put_blob": r"""
  local kind, id, lease, what, bid, size = ARGV[7], ARGV[8], ARGV[9], ARGV[10], ARGV[11], ARGV[12]
  local chunk = tonumber(ARGV[13])
  local stage, blob = P .. ':stage:' .. bid, blobkey(bid)
  if lease ~= '' and not owned(id, lease) then
    redis.call('UNLINK', stage)
    return '0'
  end
  if chunk > 0 then
    -- complete: exactly the blob's chunks, each of its length (re-sent ones included: same bytes)
    local bytes = tonumber(size)
    local count = math.ceil(bytes / chunk)
    local complete = redis.call('HLEN', stage) == count
    for n = 0, count - 1 do
      if not complete then break end
      complete = redis.call('HSTRLEN', stage, n) == math.min(chunk, bytes - n * chunk)  -- 0 if missing
    end
    if not complete then
      redis.call('UNLINK', stage)
      return 'gone'
    end
    redis.call('RENAME', stage, blob)
    redis.call('PERSIST', blob)  -- RENAME keeps the staging TTL
  else
    redis.call('UNLINK', blob)
    redis.call('HSET', blob, '0', ARGV[14])
  end
  local old
  if kind == 'ckpt' then
    local ck = P .. ':ckpt:' .. id
    old = redis.call('HGET', ck, 'blob')
    redis.call('HSET', ck, 'iteration', what, 'blob', bid, 'size', size)
    redis.call('HDEL', ck, 'data')
  else
    local ap = P .. ':artp:' .. id
    old = pointed(redis.call('HGET', ap, what))
    redis.call('HSET', ap, what, bid .. ' ' .. size)
    redis.call('HDEL', P .. ':art:' .. id, what)
    if what == 'state.pt' then index_state(id, size) end
    if kind == 'upload' then  -- stored now; prunable while no job names it
      redis.call('HSET', P .. ':upload_at', id, NOW)
      if redis.call('SCARD', P .. ':refs:' .. id) == 0 then redis.call('ZADD', P .. ':uploads', NOW, id) end
    end
  end
  if old and old ~= bid then redis.call('UNLINK', blobkey(old)) end
  return '1'
""",
    # id, name, lease ('' = unfenced) -> '1' (deleted, or there was none), '0' refused by the fence
    # (nothing changed). The artifact's pointer, its blob, an earlier version's inline copy, and
    # (a state.pt) its entry in the kept states' index go together.
    "delete_artifact": r"""
  local id, name, lease = ARGV[7], ARGV[8], ARGV[9]
  if lease ~= '' and not owned(id, lease) then return '0' end
  local ap = P .. ':artp:' .. id
  local bid = pointed(redis.call('HGET', ap, name))
  if bid then redis.call('UNLINK', blobkey(bid)) end
  redis.call('HDEL', ap, name)
  redis.call('HDEL', P .. ':art:' .. id, name)
  if name == 'state.pt' then unindex_state(id) end
  return '1'
""",
    # blob id, chunk number, start (from 0), length -> those bytes of that chunk ('' past its end),
    # or nil when the blob is not there. Redis has no HGETRANGE: this is how a reader whose
    # `blob_chunk` is smaller than the writer's gets a chunk in commands it can carry (it costs a
    # copy of the chunk each time; readers that share the writer's `blob_chunk` use HGET).
    "blob_range": r"""
  local v = redis.call('HGET', blobkey(ARGV[7]), ARGV[8])
  if not v then return false end
  local start = tonumber(ARGV[9])
  return string.sub(v, start + 1, start + tonumber(ARGV[10]))
""",
    # upload ids... -> how many were deleted: those no job names (checked here, so a submit naming
    # one either ran first and keeps it, or runs after and finds it gone)
    "discard_uploads": r"""
  local n = 0
  for i = 7, #ARGV do n = n + drop_if_unnamed(ARGV[i]) end
  return tostring(n)
""",
    # cutoff (epoch seconds), limit -> "<pruned> <examined>": uploads stored before the cutoff
    # that no job names (only those are in the zset)
    "prune_uploads": r"""
  local ids = redis.call('ZRANGEBYSCORE', P .. ':uploads', '-inf', '(' .. ARGV[7], 'LIMIT', 0, tonumber(ARGV[8]))
  local n = 0
  for _, u in ipairs(ids) do
    redis.call('ZREM', P .. ':uploads', u)
    if redis.call('SCARD', P .. ':refs:' .. u) == 0 then
      drop_artifacts(u)
      redis.call('HDEL', P .. ':upload_at', u)
      n = n + 1
    end
  end
  return n .. ' ' .. #ids
""",
    # cutoff (epoch seconds), limit, offset -> "<dropped> <examined>": the state.pt alone of jobs
    # finished and delivered before the cutoff (the record and the other artifacts stay), except
    # those a queued or running job starts from. A job
    # keeps its place in `delivered` (the whole-job prune finds it there later), so the caller
    # pages on with `offset`; a state being read meanwhile is seen dropped (the read says "gone").
    "prune_state": r"""
  local ids = redis.call('ZRANGEBYSCORE', P .. ':delivered', '-inf', '(' .. ARGV[7],
                         'LIMIT', tonumber(ARGV[9]), tonumber(ARGV[8]))
  local n = 0
  for _, id in ipairs(ids) do
    local v = redis.call('HMGET', jk(id), 'state', 'delivered')
    if is_final(v[1]) and v[2] == '1' and not has_live_kids(id) then
      local ap = P .. ':artp:' .. id
      local bid = pointed(redis.call('HGET', ap, 'state.pt'))
      if bid then redis.call('UNLINK', blobkey(bid)) end
      if redis.call('HDEL', ap, 'state.pt') + redis.call('HDEL', P .. ':art:' .. id, 'state.pt') > 0 then
        n = n + 1
      end
      unindex_state(id)
    end
  end
  return n .. ' ' .. #ids
""",
    # budget (bytes), limit, offset -> "<dropped> <examined> <skipped> <total>": while the kept
    # states total more than the budget, the state.pt alone of the jobs in `states` from rank
    # `offset` on (oldest finished first), with prune_state's rules: finished, delivered, no queued
    # or running child. `skipped`: those examined that had to stay (the caller pages on past them);
    # an entry whose state is gone already (deleted by an earlier version) just leaves the index.
    # Stops as soon as the total fits; `total`: the total then.
    "prune_states_over": r"""
  local budget, limit, offset = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
  local function total() return tonumber(redis.call('GET', P .. ':statebytes') or '0') end
  local n, examined, skipped = 0, 0, 0
  if total() > budget then
    for _, id in ipairs(redis.call('ZRANGE', P .. ':states', offset, offset + limit - 1)) do
      if total() <= budget then break end
      examined = examined + 1
      local ap, art = P .. ':artp:' .. id, P .. ':art:' .. id
      local ptr = redis.call('HGET', ap, 'state.pt')
      if not ptr and redis.call('HEXISTS', art, 'state.pt') == 0 then
        unindex_state(id)
      else
        local v = redis.call('HMGET', jk(id), 'state', 'delivered')
        if is_final(v[1]) and v[2] == '1' and not has_live_kids(id) then
          local bid = pointed(ptr)
          if bid then redis.call('UNLINK', blobkey(bid)) end
          redis.call('HDEL', ap, 'state.pt')
          redis.call('HDEL', art, 'state.pt')
          unindex_state(id)
          n = n + 1
        else
          skipped = skipped + 1
        end
      end
    end
  end
  return n .. ' ' .. examined .. ' ' .. skipped .. ' ' .. string.format('%.0f', total())
""",
    # job ids... -> how many were indexed: the states of these jobs that are stored but not in the
    # kept states' index (written by an earlier version: see _index_states), read here so that a
    # state written or deleted meanwhile is indexed as it is now; an indexed one is left alone.
    "index_states": r"""
  local n = 0
  for i = 7, #ARGV do
    local id = ARGV[i]
    if redis.call('HEXISTS', P .. ':statesize', id) == 0 then
      local size = string.match(redis.call('HGET', P .. ':artp:' .. id, 'state.pt') or '', '^%S+ (%d+)$')
      if not size and redis.call('HEXISTS', P .. ':art:' .. id, 'state.pt') == 1 then
        size = tostring(redis.call('HSTRLEN', P .. ':art:' .. id, 'state.pt'))
      end
      if size then
        index_state(id, size)
        n = n + 1
      end
    end
  end
  return tostring(n)
""",
    # cutoff (epoch seconds), limit, offset -> "<pruned> <examined> <kept>": jobs finished and
    # delivered before the cutoff, except those a queued or running job starts from: these are
    # `kept` in `delivered` (prunable once their last such child has ended), and the caller pages
    # on past them with `offset`.
    "prune": r"""
  local ids = redis.call('ZRANGEBYSCORE', P .. ':delivered', '-inf', '(' .. ARGV[7],
                         'LIMIT', tonumber(ARGV[9]), tonumber(ARGV[8]))
  local gone, n, kept = {}, 0, 0
  local upto = 0   -- the last event of the jobs pruned: their events are all at or before it
  for _, id in ipairs(ids) do
    local v = redis.call('HMGET', jk(id), 'state', 'delivered', 'channel', 'evlast')
    local keep = has_live_kids(id)  -- a queued or running job starts from it: it stays, in `delivered` too
    if keep then kept = kept + 1 else redis.call('ZREM', P .. ':delivered', id) end
    if not keep and is_final(v[1]) and v[2] == '1' then
      -- a job of an earlier version (no `evlast`): its events may be anywhere in the log
      local last = tonumber(v[4] or '') or math.huge
      if last > upto then upto = last end
      unref(id)
      drop_artifacts(id)
      drop_checkpoint(id)
      redis.call('DEL', jk(id))
      if v[3] then redis.call('ZREM', P .. ':hist:' .. v[3], id) end
      redis.call('ZREM', P .. ':undelivered', id)
      gone[id] = true
      n = n + 1
    end
  end
  if n > 0 then
    -- Their events leave the log (XDEL: the others keep their ids, and a reader's cursor reads on
    -- past the deleted ones), with their frames still kept. Only the log up to their last event is
    -- read: pruned jobs are old, so that is its oldest part (or nothing, already trimmed by MAXLEN).
    local ek = P .. ':events'
    local entries = redis.call('XRANGE', ek, '-', upto == math.huge and '+' or (string.format('%.0f', upto) .. '-0'))
    for _, e in ipairs(entries) do
      local f, job, framed = e[2], nil, false
      for i = 1, #f - 1, 2 do
        if f[i] == 'job' then job = f[i + 1] elseif f[i] == 'f' then framed = true end
      end
      if job and gone[job] then
        redis.call('XDEL', ek, e[1])
        if framed then
          local seq = string.match(e[1], '^(%d+)')
          redis.call('HDEL', P .. ':frames', seq)
          redis.call('LREM', P .. ':framelist', 1, seq)
        end
      end
    end
  end
  return n .. ' ' .. #ids .. ' ' .. kept
""",
    # pairs of (job id, parent job id): jobs queued or running under a version before the `parent`
    # field (see submit) get it and join their parent's `kids` now, if they are still queued or
    # running and have none (idempotent; one that ended meanwhile needs none).
    "index_parents": r"""
  for i = 7, #ARGV - 1, 2 do
    local id, parent = ARGV[i], ARGV[i + 1]
    local state = redis.call('HGET', jk(id), 'state')
    if (state == 'queued' or state == 'running') and redis.call('HEXISTS', jk(id), 'parent') == 0 then
      redis.call('HSET', jk(id), 'parent', parent)
      redis.call('SADD', kidsk(parent), id)
    end
  end
  return '1'
""",
    # name, holder, host, pid, ttl (ms) -> {} (taken or renewed), or the other holder's
    # {holder, host, pid, since, renewed, ms left} (nothing written). The key's PX expiry is the
    # lease's: an expired lease is no key, free to take. Times are the server's.
    "hold_lease": r"""
  local k = P .. ':lease:' .. ARGV[7]
  local v = redis.call('HMGET', k, 'holder', 'host', 'pid', 'since', 'renewed')
  if v[1] and v[1] ~= ARGV[8] then
    return {v[1], v[2] or '', v[3] or '0', v[4] or '0', v[5] or '0', tostring(redis.call('PTTL', k))}
  end
  local now = fmt(tnow())
  if not v[1] then redis.call('HSET', k, 'holder', ARGV[8], 'host', ARGV[9], 'pid', ARGV[10], 'since', now) end
  redis.call('HSET', k, 'renewed', now)
  redis.call('PEXPIRE', k, ARGV[11])
  return {}
""",
    # SAQ's registry entry of a worker, written by a heartbeat: key, SAQ's stats key, the entry
    # with init_images true, the same with false, the default ('1'/'0': no entry, or one without
    # the field), ttl (s), now (ms), expiry score (ms) -> the value kept ('1'/'0'). The stored
    # entry's `init_images` (its last claim's) is read and written back in this one step, so a
    # claim (another process) landing between a read and a write cannot be undone by a stale value.
    # The rest is SAQ's write_worker_info (_SaqQueue).
    "worker_info": r"""
  local key, stats = ARGV[7], ARGV[8]
  local raw = redis.call('GET', key)
  local keep = nil
  if raw then
    local ok, d = pcall(cjson.decode, raw)
    if ok and type(d) == 'table' and type(d.metadata) == 'table' and type(d.metadata.init_images) == 'boolean' then
      keep = d.metadata.init_images
    end
  end
  if keep == nil then keep = ARGV[11] == '1' end
  redis.call('SET', key, keep and ARGV[9] or ARGV[10], 'EX', ARGV[12])
  redis.call('ZREMRANGEBYSCORE', stats, 0, ARGV[13])
  redis.call('ZADD', stats, ARGV[14], key)
  redis.call('EXPIRE', stats, ARGV[12])
  return keep and '1' or '0'
""",
    # worker, its SAQ worker_info key, SAQ's stats key -> '1': a worker that stopped cleanly leaves
    # the registry (its SAQ entry, which workers() lists) and the `alive` set (claim's retry rule)
    "forget_worker": r"""
  redis.call('ZREM', P .. ':alive', ARGV[7])
  redis.call('DEL', ARGV[8])
  redis.call('ZREM', ARGV[9], ARGV[8])
  return '1'
""",
    # name, holder -> '1' (deleted: it was the holder's), '0'
    "release_lease": r"""
  local k = P .. ':lease:' .. ARGV[7]
  if redis.call('HGET', k, 'holder') ~= ARGV[8] then return '0' end
  redis.call('DEL', k)
  return '1'
""",
}


class _SaqQueue(RedisQueue):
    """SAQ's RedisQueue; `write_worker_info` writes the same keys without redis-py's deprecated SETEX."""

    async def write_worker_info(self, worker_id: str, info: Any, ttl: int) -> None:
        current = int(time.time() * 1000)
        key = self.namespace(f"worker_info:{worker_id}")
        pipe: Any
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(key, json.dumps(info), ex=ttl)
            pipe.zremrangebyscore(self._stats, 0, current)
            pipe.zadd(self._stats, {key: current + ttl * 1000})
            pipe.expire(self._stats, ttl)
            await pipe.execute()


def _s(value: bytes | str | None) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else value


def _f(value: bytes | None) -> float | None:
    return float(value) if value not in (None, b"") else None


def _record(raw: dict[bytes, bytes]) -> JobRecord | None:
    if not raw or b"spec" not in raw:
        return None
    h = {k.decode(): v for k, v in raw.items()}
    spec = JobSpec.from_dict(json.loads(h["spec"]))
    if "reply" in h:
        spec.reply = json.loads(h["reply"])
    return JobRecord(
        id=h["id"].decode(),
        spec=spec,
        state=JobState(h["state"].decode()),
        created_at=float(h["created_at"]),
        started_at=_f(h.get("started_at")),
        finished_at=_f(h.get("finished_at")),
        iteration=int(h.get("iteration", b"0")),
        similarity=_f(h.get("similarity")),
        attempts=int(h.get("attempts", b"0")),
        worker_id=_s(h.get("worker_id")),
        lease_id=_s(h.get("lease")),
        error=_s(h.get("error")),
        delivered=h.get("delivered") == b"1",
        cancel_requested=h.get("cancel_requested") == b"1",
    )


def _num(value: float | None) -> str:
    return "" if value is None else repr(float(value))


def _needs_encoder(spec: JobSpec) -> bool:
    """Whether the job's first run starts from its init image, through the dVAE encoder (as the
    worker's `_pictures` decides: a parent's state sets the start otherwise). A resumed run starts
    from its checkpoint instead, which the claim checks itself. Stored at submit as `needs_encoder`,
    for the claim (Lua, which never parses the spec) to read."""
    return isinstance(spec.extra.get("init_image"), dict) and not spec.parent_job_id


class RedisJobQueue:
    """`JobQueue` on a Redis server (>= 5: streams). See the module docstring."""

    def __init__(
        self,
        url: str = "redis://localhost:6379/0",
        *,
        prefix: str = "imagine",
        lease: float = 30.0,
        max_attempts: int = 3,
        keep_events: int = 10_000,
        keep_frames: int = 256,
        reconnect_timeout: float = 30.0,
        socket_timeout: float = 10.0,
        worker_ttl: int | None = None,
        redis: Redis | None = None,
        blob_chunk: int = BLOB_CHUNK,
        staging_ttl: float = STAGING_TTL,
    ) -> None:
        self.url = url
        self.prefix = prefix
        self.lease = float(lease)
        if not (math.isfinite(self.lease) and self.lease > 0):   # a lease that never ends holds a dead worker's job for ever
            raise ValueError(f"lease must be a finite number of seconds above 0, got {lease!r}")
        self.max_attempts = int(max_attempts)
        self.keep_events = int(keep_events)
        self.keep_frames = int(keep_frames)
        self.reconnect_timeout = float(reconnect_timeout)
        if not (math.isfinite(self.reconnect_timeout) and self.reconnect_timeout >= 0):
            raise ValueError(f"reconnect_timeout must be 0 or more seconds, got {reconnect_timeout!r}")
        self.socket_timeout = float(socket_timeout)
        # Seconds a script's first reply is kept for a re-send of it: past the longest a call goes on
        # re-sending (reconnect_timeout, each try up to redis-py's 7 sends of socket_timeout), so a
        # re-sent submit or claim never runs twice (a Redis loading a big dataset for minutes).
        self.token_ttl = max(120, math.ceil(self.reconnect_timeout + 7 * self.socket_timeout + 60))
        # SAQ's registry entries outlive the longest window a reader asks `workers(max_age=)` for
        # (the bot's: two leases), plus the throttle of their writes (5 s): else a long lease's
        # window would be cut to the entries' life.
        self.worker_ttl = (max(60, int(math.ceil(2 * self.lease)) + 10) if worker_ttl is None
                           else max(1, int(math.ceil(worker_ttl))))
        if int(blob_chunk) < 1:
            raise ValueError(f"blob_chunk must be at least 1 byte, got {blob_chunk!r}")
        self.blob_chunk = int(blob_chunk)
        self.staging_ttl_ms = max(1, int(float(staging_ttl) * 1000))
        self._given_client = redis
        self.redis: Any = None  # redis.asyncio.Redis (bytes replies)
        self.saq: RedisQueue | None = None
        self._scripts: dict[str, Any] = {}
        self._seen: dict[str, tuple[float, str | None]] = {}
        self._init_images: dict[str, bool] = {}   # what each worker's last claim here said it can take
        self._stats: dict[str, dict[str, int]] = {}
        self._started_ms = int(time.time() * 1000)
        self._events_epoch: bytes | None = None   # the event log's epoch at the last events() read

    def __repr__(self) -> str:
        return f"RedisJobQueue({redact_url(self.url)!r}, prefix={self.prefix!r})"

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect, and bring jobs of an earlier version up to date. The queue counts as started
        (`self.redis` set) only once all of that succeeded: a start that raised (Redis unreachable
        past `reconnect_timeout`, a refused password) leaves it unstarted, its client closed, and
        may be tried again."""
        if self.redis is not None:
            return
        client = self._given_client or Redis.from_url(
            self.url,
            retry=_RetryUnlessRefused(ExponentialWithJitterBackoff(base=0.05, cap=1.0), retries=6),
            retry_on_error=list(_RETRYABLE),
            socket_timeout=self.socket_timeout,
            socket_connect_timeout=5.0,
            socket_keepalive=True,
            health_check_interval=10,
        )
        try:
            scripts = {
                name: client.register_script(_LUA_PRELUDE + body + _LUA_EPILOGUE.replace("TOKEN_TTL", str(self.token_ttl)))
                for name, body in _SCRIPTS.items()
            }
            await self._retry(client.ping)
            await self._retry(lambda: self._backfill_guilds(client, scripts))
            await self._retry(lambda: self._index_states(client, scripts))
        except BaseException:
            if self._given_client is None:
                with contextlib.suppress(Exception):
                    await client.aclose()
            raise
        if self.redis is not None:  # another start() of this queue finished meanwhile: keep its client
            if self._given_client is None:
                await client.aclose()
            return
        self.redis, self._scripts = client, scripts
        self.saq = _SaqQueue(client, name=self.prefix)

    async def _backfill_guilds(self, client: Any, scripts: dict[str, Any]) -> None:
        """Jobs queued or running under a version before the `guild` field get it now, from their
        specs (here, in Python: exact 64-bit ids), so that a server's pause holds them too; and the
        `needs_encoder` mark (_needs_encoder), so that workers without the encoder leave them. HSETNX:
        idempotent, and never overwrites what a submit wrote. Likewise the `parent` field and the
        parent's `kids` set (see submit), so that prune keeps the parents of those jobs too: through
        a script that indexes a job only while it is still queued or running (one that ended
        meanwhile must not be left in its parent's set). Run by start() on its `client` and
        `scripts`, before the queue counts as started."""
        ids = [_s(i) for i in await client.smembers(self._k("qall"))]
        ids += [_s(i) for i in await client.zrange(self._k("running"), 0, -1)]
        if not ids:
            return
        async with client.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hmget(self._k("job", job_id), "guild", "spec", "parent", "needs_encoder")
            rows = await pipe.execute()
        missing, orphans, encoder = [], [], []
        for job_id, (guild, spec, parent, needs) in zip(ids, rows):
            unknown = guild is None or parent is None or needs is None
            data = json.loads(spec) if spec is not None and unknown else {}
            guild_id = data.get("guild_id") if guild is None else None
            if guild_id is not None:
                missing.append((job_id, str(int(guild_id))))
            if parent is None and data.get("parent_job_id"):
                orphans += [job_id, str(data["parent_job_id"])]
            # (Only the jobs that need it are marked: a submit leaves the field off the others.)
            if needs is None and isinstance((data.get("extra") or {}).get("init_image"), dict) \
                    and not data.get("parent_job_id"):
                encoder.append(job_id)
        if missing or encoder:
            async with client.pipeline(transaction=False) as pipe:
                for job_id, guild in missing:
                    pipe.hsetnx(self._k("job", job_id), "guild", guild)
                for job_id in encoder:
                    pipe.hsetnx(self._k("job", job_id), "needs_encoder", "1")
                await pipe.execute()
            if missing:
                log.info("gave %d job(s) from an earlier version their server id", len(missing))
            if encoder:
                log.info("marked %d job(s) from an earlier version as needing the dVAE encoder", len(encoder))
        if orphans:
            await self._run("index_parents", *orphans, scripts=scripts)
            log.info("indexed the parents of %d job(s) from an earlier version", len(orphans) // 2)

    async def _index_states(self, client: Any, scripts: dict[str, Any]) -> None:
        """States stored by a version before the kept states' index (`states`, `statesize`,
        `statebytes`: see prune_states_over) join it now, so the budget counts them: the jobs of
        every list a stored job is in (finished, running, queued) whose state.pt is stored and not
        indexed, through a script that reads each state's size itself (idempotent; one deleted
        meanwhile is not indexed). Run by every start() (a worker of the earlier version may have
        written states since the last one), before the queue counts as started."""
        ids = {_s(i) for key in ("delivered", "undelivered", "running")
               for i in await client.zrange(self._k(key), 0, -1)}
        ids |= {_s(i) for i in await client.smembers(self._k("qall"))}
        if not ids:
            return
        ids_in_order = sorted(i for i in ids if i)
        async with client.pipeline(transaction=False) as pipe:
            for job_id in ids_in_order:
                pipe.hexists(self._k("artp", job_id), "state.pt")
                pipe.hexists(self._k("art", job_id), "state.pt")
                pipe.hexists(self._k("statesize"), job_id)
            found = await pipe.execute()
        missing = [job_id for n, job_id in enumerate(ids_in_order)
                   if (found[3 * n] or found[3 * n + 1]) and not found[3 * n + 2]]
        indexed = 0
        for start in range(0, len(missing), 500):
            indexed += int(await self._run("index_states", *missing[start:start + 500], scripts=scripts))
        if indexed:
            log.info("indexed the kept states of %d job(s) from an earlier version", indexed)

    async def close(self) -> None:
        client, self.redis = self.redis, None
        if client is not None and self._given_client is None:
            await client.aclose()

    async def __aenter__(self) -> "RedisJobQueue":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- plumbing -------------------------------------------------------------------------------

    def _k(self, *parts: object) -> str:
        return ":".join([self.prefix, *(str(p) for p in parts)])

    def _client(self) -> Any:
        if self.redis is None:
            raise RuntimeError("queue not started: await queue.start() first")
        return self.redis

    async def _retry(self, call: Callable[[], Awaitable[T]], deadline: float | None = None) -> T:
        """Run `call` (idempotent), retrying connection errors until Redis is back."""
        loop = asyncio.get_running_loop()
        deadline = deadline if deadline is not None else loop.time() + self.reconnect_timeout
        delay, warned = 0.05, False
        while True:
            try:
                return await call()
            except _REFUSED:
                raise
            except _RETRYABLE as exc:
                # A connection made outside redis-py's Retry (the pool's) fails here unretried too.
                if (unverified := certificate_not_verified(exc)) is not None:
                    raise unverified from exc
                if loop.time() + delay > deadline:
                    raise
                if not warned:
                    log.warning("redis unreachable (%s); retrying", exc)
                    warned = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def _run(self, name: str, *args: Any, token: bool = True, now: float | None = None,
                   decode: bool = True, scripts: dict[str, Any] | None = None) -> Any:
        if scripts is None:  # `scripts`: start()'s own, on the client it has not made ours yet
            self._client()
            scripts = self._scripts
        argv = [
            self.prefix,
            uuid.uuid4().hex if token else "",
            repr(time.time() if now is None else now),
            self.keep_events,
            self.max_attempts,
            repr(self.lease),
            *args,
        ]
        script = scripts[name]
        result = await self._retry(lambda: script(keys=[], args=argv))
        return result.decode() if decode and isinstance(result, bytes) else result

    async def _records(self, ids: Sequence[bytes | str]) -> list[JobRecord]:
        if not ids:
            return []
        client = self._client()

        async def fetch() -> list[Any]:
            async with client.pipeline(transaction=False) as pipe:
                for job_id in ids:
                    pipe.hgetall(self._k("job", _s(job_id)))
                return await pipe.execute()

        return [r for r in map(_record, await self._retry(fetch)) if r is not None]

    async def _see_worker(self, worker_id: str, job_id: str | None, init_images: bool | None = None) -> None:
        """SAQ's worker registry (TTL'd), written at most every few seconds per worker, and at once
        when its job or what it can take (`init_images`, from its claim; None, a heartbeat: the
        stored value stands) changes."""
        now = time.monotonic()
        last = self._seen.get(worker_id)
        changed = init_images is not None and init_images != self._init_images.get(worker_id)
        if init_images is not None:
            self._init_images[worker_id] = init_images
        if (last is not None and now - last[0] < min(5.0, self.worker_ttl / 3) and (job_id is None or job_id == last[1])
                and not changed):
            return
        self._seen[worker_id] = (now, job_id if job_id is not None else (last[1] if last else None))
        stats = self._stats.setdefault(worker_id, {"complete": 0, "failed": 0, "retried": 0, "aborted": 0})
        assert self.saq is not None

        def info(init_ok: bool) -> dict[str, Any]:
            return {
                "stats": {**stats, "uptime": int(time.time() * 1000) - self._started_ms},
                "queue_key": self.prefix,
                "metadata": {"job_id": self._seen[worker_id][1], "last_seen": time.time(), "init_images": init_ok},
            }

        try:
            if init_images is not None:
                await self.saq.write_worker_info(worker_id, info(init_images), ttl=self.worker_ttl)  # type: ignore[arg-type]
                return
            # A heartbeat keeps what the worker's last claim stored (SQLite's COALESCE), whichever
            # queue object (process) made that claim; this object's own knowledge only when none
            # is. Read and written back in one script: a claim in between is never undone.
            key = self.saq.namespace(f"worker_info:{worker_id}")
            now_ms = int(time.time() * 1000)
            argv = [self.prefix, "", repr(time.time()), self.keep_events, self.max_attempts, repr(self.lease),
                    key, self.saq._stats, json.dumps(info(True)), json.dumps(info(False)),
                    "1" if self._init_images.get(worker_id, True) else "0", self.worker_ttl, now_ms,
                    now_ms + self.worker_ttl * 1000]
            await self._scripts["worker_info"](keys=[], args=argv)
        except Exception:  # noqa: BLE001 - bookkeeping only
            log.debug("could not write worker info for %s", worker_id, exc_info=True)

    def _count(self, worker_id: str, what: str) -> None:
        stats = self._stats.setdefault(worker_id, {"complete": 0, "failed": 0, "retried": 0, "aborted": 0})
        stats[what] += 1

    # --- the bot side ---------------------------------------------------------------------------

    async def submit(self, spec: JobSpec, *, max_queued: int | None = None) -> JobRecord:
        return (await self.submit_many([spec], max_queued=max_queued))[0]

    async def submit_many(self, specs: Sequence[JobSpec], *, max_queued: int | None = None) -> list[JobRecord]:
        """Queue every spec in order in one Lua script (all or nothing). With `max_queued`, the script
        counts the user's line first: over the cap, QueueLimitReached and nothing is written. A spec
        whose parent's state.pt is gone (pruned): ParentGone, nothing written (checked in the script);
        likewise UploadGone for a spec naming an upload that is not stored (checked after the cap)."""
        specs = list(specs)
        user_id = batch_user(specs)
        if user_id is None:
            return []
        cap = "" if max_queued is None else str(int(max_queued))
        data = [
            (str(int(s.channel_id)), str(int(s.grid)), str(int(s.iterations)), json.dumps(s.to_dict()),
             " ".join(upload_refs(s)), "" if s.guild_id is None else str(int(s.guild_id)),
             str(s.parent_job_id) if s.parent_job_id else "", "1" if _needs_encoder(s) else "0")
            for s in specs
        ]
        while True:
            now = time.time()
            records = [JobRecord(id=new_job_id(), spec=s, created_at=now) for s in specs]
            args: list[Any] = [cap, str(user_id), len(records)]
            for record, fields in zip(records, data):
                args += [record.id, *fields]
            reply = await self._run("submit", *args, now=now)
            if reply != "exists":  # a job id already taken (48 random bits): new ids, and again
                break
        if reply.startswith("parent "):
            raise ParentGone(reply.split(" ", 1)[1])
        if reply.startswith("limit "):
            raise QueueLimitReached(int(reply.split()[1]), int(cap))
        if reply.startswith("upload "):
            raise UploadGone(reply.split(" ", 1)[1])
        return records

    async def get(self, job_id: str) -> JobRecord | None:
        client = self._client()
        return _record(await self._retry(lambda: client.hgetall(self._k("job", job_id))))

    async def _line(self) -> list[str]:
        return [_s(i) for i in await self._run("line", token=False) or []]  # type: ignore[misc]

    async def queued(self) -> list[JobRecord]:
        return [r for r in await self._records(await self._line()) if r.state == JobState.QUEUED]

    async def line(self) -> list[str]:
        return await self._line()

    async def position(self, job_id: str) -> int | None:
        line = await self._line()
        return line.index(job_id) + 1 if job_id in line else None

    async def existing(self, job_ids: Sequence[str]) -> set[str]:
        ids = list(dict.fromkeys(job_ids))
        if not ids:
            return set()
        client = self._client()

        async def fetch() -> list[Any]:
            async with client.pipeline(transaction=False) as pipe:
                for job_id in ids:
                    pipe.exists(self._k("job", job_id))
                return await pipe.execute()

        return {job_id for job_id, there in zip(ids, await self._retry(fetch)) if there}

    async def running(self) -> list[JobRecord]:
        client = self._client()
        ids = await self._retry(lambda: client.zrange(self._k("running"), 0, -1))
        records = [r for r in await self._records(ids) if r.state == JobState.RUNNING]
        return sorted(records, key=lambda r: r.started_at or 0.0)

    async def count_queued(self, user_id: int | None = None) -> int:
        client = self._client()
        if user_id is None:
            return int(await self._retry(lambda: client.scard(self._k("qall"))))
        return int(await self._retry(lambda: client.zcard(self._k("line", int(user_id)))))

    async def cancel(self, job_id: str, reason: str | None = None, *, replace_reason: bool = False) -> bool:
        return await self._run("cancel", job_id, reason or "", "1" if replace_reason else "0") == "1"

    async def clear(self, guild_id: int | None = None, reason: str | None = CLEARED) -> int:
        if guild_id is None:
            return int(await self._run("clear", reason or ""))
        # The server is in each job's spec (JSON, whose 64-bit ids Lua's cjson would round): pick
        # the jobs here, then cancel in one script only those still queued.
        ids = [r.id for r in await self.queued() if r.spec.guild_id == int(guild_id)]
        return int(await self._run("clear_ids", reason or "", *ids)) if ids else 0

    async def discard_uploads(self, upload_ids: Sequence[str]) -> int:
        """Delete those of `upload_ids` that no job names, in one script (see JobQueue). Ids that
        are not upload ids are ignored. How many went."""
        ids = sorted({u for u in upload_ids if is_upload_id(u)})
        return int(await self._run("discard_uploads", *ids)) if ids else 0

    async def history(self, channel_id: int, limit: int = 10) -> list[JobRecord]:
        if check_history_limit(limit) == 0:   # negative: ValueError, as on SQLite
            return []
        client = self._client()
        ids = await self._retry(lambda: client.zrevrange(self._k("hist", int(channel_id)), 0, int(limit) - 1))
        return await self._records(ids)

    async def events(self, after: int = 0, timeout: float = 1.0, limit: int = 1000) -> list[JobEvent]:
        client = self._client()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, float(timeout))
        stream = self._k("events")
        checked_reset = False
        while True:
            remaining = deadline - loop.time()
            # Block in slices well under the socket timeout; 0 would mean "forever" to Redis.
            block = None if remaining <= 0 else max(1, int(min(remaining, self.socket_timeout / 4) * 1000))
            try:
                reply = await client.xread({stream: f"{int(after)}-0"}, count=int(limit), block=block)
            except _RETRYABLE as exc:
                if loop.time() >= deadline:
                    log.warning("events: redis unreachable (%s)", exc)
                    return []
                await asyncio.sleep(min(0.2, max(0.0, deadline - loop.time())))
                continue
            entries = reply[0][1] if reply else []
            if entries:
                epoch = entries[0][1].get(b"ep")   # None: written before epochs existed
                if epoch is not None and self._events_epoch is not None and epoch != self._events_epoch \
                        and after > 0:
                    # A new log whose numbering already passed `after`: read it from its start.
                    log.warning("event log restarted (a new epoch at %s, after %s): reading it from the start",
                                _s(entries[0][0]), after)
                    self._events_epoch = epoch
                    after = 0
                    continue
                if epoch is not None:
                    self._events_epoch = epoch
                return await self._events_from(entries)
            if not checked_reset and after > 0:
                # A Redis that lost its data restarts the numbering: read from its beginning.
                checked_reset = True
                last = await self._retry(lambda: client.get(self._k("evseq")))
                if int(last or 0) < after:
                    log.warning("event log restarted at %s (< %s): reading it from the start", last, after)
                    after = 0
                    continue
            if loop.time() >= deadline:
                return []

    async def _events_from(self, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> list[JobEvent]:
        client = self._client()
        with_frames = [int(eid.split(b"-")[0]) for eid, fields in entries if fields.get(b"f") == b"1"]
        frames: dict[int, bytes] = {}
        if with_frames:
            values = await self._retry(lambda: client.hmget(self._k("frames"), with_frames))
            frames = {seq: data for seq, data in zip(with_frames, values) if data is not None}
        events = []
        for eid, f in entries:
            seq = int(eid.split(b"-")[0])
            events.append(JobEvent(
                job_id=f[b"job"].decode(),
                kind=EventKind(f[b"kind"].decode()),
                iteration=int(f.get(b"it", b"0")),
                total=int(f.get(b"tot", b"0")),
                similarity=_f(f.get(b"sim")),
                frame_png=frames.get(seq),
                message=_s(f.get(b"msg")),
                seq=seq,
                at=float(f.get(b"at", b"0")),
            ))
        return events

    async def mark_delivered(self, job_id: str) -> bool:
        return await self._run("mark_delivered", job_id) == "1"

    async def undelivered(self) -> list[JobRecord]:
        client = self._client()
        ids = await self._retry(lambda: client.zrange(self._k("undelivered"), 0, -1))
        return [r for r in await self._records(ids) if r.state.finished and not r.delivered]

    async def set_reply(self, job_id: str, reply: dict[str, Any]) -> None:
        await self._run("set_reply", job_id, json.dumps(reply), token=False)

    async def get_setting(self, key: str, default: Any = None) -> Any:
        """Both forms of the setting (see `set_setting`) in one MULTI/EXEC: read apart, a writer
        switching forms in between could leave neither for us to see, and the setting would read as
        expired (bot/permutations.py would then drop an open set for good)."""
        client = self._client()

        async def read() -> list[Any]:
            async with client.pipeline(transaction=True) as pipe:
                pipe.hget(self._k("settings"), key)
                pipe.get(self._k("setting", key))
                return await pipe.execute()

        kept, expiring = await self._retry(read)
        raw = kept if kept is not None else expiring
        return json.loads(raw) if raw is not None else default

    async def set_setting(self, key: str, value: Any, expire_after: float | None = None) -> None:
        """A setting without expiry is a field of the settings hash; one with `expire_after` is its
        own key with a Redis TTL. Writing one form deletes the other (one MULTI), so a key has one value."""
        seconds = check_expire_after(expire_after)   # inf, NaN, 0, negative: ValueError, nothing written
        client = self._client()
        data = json.dumps(value)

        async def write() -> None:
            async with client.pipeline(transaction=True) as pipe:
                if seconds is None:
                    pipe.hset(self._k("settings"), key, data)
                    pipe.delete(self._k("setting", key))
                else:
                    pipe.set(self._k("setting", key), data, px=max(1, int(seconds * 1000)))
                    pipe.hdel(self._k("settings"), key)
                await pipe.execute()

        await self._retry(write)

    # --- named leases ----------------------------------------------------------------------------

    async def hold_lease(self, name: str, holder: str, ttl: float) -> dict[str, Any] | None:
        """Take or renew the lease `name` (the hash `<prefix>:lease:<name>`, PX expiry) for
        `holder` until `ttl` seconds from now, in one script: None. Held by another holder: nothing
        changes; that holder's info (see JobQueue), its times in the server's clock. A re-sent
        script (a lost reply) renews once more: no token needed."""
        ttl = float(ttl)
        if not (math.isfinite(ttl) and ttl > 0):
            raise ValueError(f"a lease's ttl must be a positive number of seconds, got {ttl!r}")
        other = await self._run("hold_lease", name, holder, socket.gethostname(), os.getpid(),
                                max(1, int(ttl * 1000)), token=False)
        if not other:
            return None
        who, host, pid, since, renewed, left_ms = (_s(v) or "" for v in other)
        return {"holder": who, "host": host, "pid": int(pid or 0), "since": float(since or 0),
                "renewed": float(renewed or 0), "expires_in": max(0, int(left_ms or 0)) / 1000}

    async def release_lease(self, name: str, holder: str) -> bool:
        """Delete the lease `name` if `holder` has it: True then."""
        return await self._run("release_lease", name, holder, token=False) == "1"

    # --- the worker side ------------------------------------------------------------------------

    async def claim(self, worker_id: str, grids: tuple[int, ...] | None = None, *,
                    init_images: bool = True) -> JobRecord | None:
        if grids is not None and len(tuple(grids)) == 0:
            return None
        lease = new_lease_id()
        args: list[Any] = [worker_id, lease, "1" if init_images else "0"]
        args += [-1] if grids is None else [len(tuple(grids)), *(int(g) for g in grids)]
        job_id, _, swept = (await self._run("claim", *args)).partition("\n")
        _log_swept(swept)
        await self._see_worker(worker_id, job_id or None, init_images)
        if not job_id:
            return None
        record = await self.get(job_id)
        if record is not None:
            # Ours is the token this claim made, whatever the job's record says by now (a lease
            # lost before this read must stay lost: the fence then refuses our writes).
            record.lease_id = lease
        return record

    async def sweep(self) -> int:
        """Handle expired leases now (claim() does this too). Returns how many jobs were touched."""
        count, _, swept = (await self._run("sweep", token=False)).partition("\n")
        _log_swept(swept)
        return int(count)

    async def heartbeat(self, job_id: str, lease_id: str) -> bool:
        ok, _, worker_id = (await self._run("heartbeat", job_id, lease_id, token=False)).partition(" ")
        if ok != "1":
            return False
        if worker_id:
            await self._see_worker(worker_id, job_id)
        return True

    async def publish(self, event: JobEvent, lease_id: str | None = None) -> bool:
        frame = event.frame_png
        seq = await self._run(
            "publish",
            event.job_id,
            EventKind(event.kind).value,
            int(event.iteration),
            int(event.total),
            _num(event.similarity),
            "" if event.message is None else "=" + event.message,
            repr(float(event.at)),
            "1" if frame is not None else "0",
            bytes(frame) if frame is not None else b"",
            self.keep_frames,
            lease_id or "",
        )
        if seq == "0":  # fenced and not the lease holder: nothing written
            return False
        event.seq = int(seq)
        return True

    # --- blobs: checkpoints and artifacts, moved in chunks ---------------------------------------
    #
    # A blob (a checkpoint: 96-384 MiB; state.pt: 48-192 MiB; a video) never travels in one command:
    # redis-py gives every command `socket_timeout` for its whole payload and its whole reply, so on a
    # link slower than size / timeout one command would time out on every attempt. Writes stage it
    # in chunks (`stage_chunk`: field n of a hash of its own, with a TTL) and then commit it with one
    # fenced script (`put_blob`); reads fetch the chunks of the blob a record points to, one HGET
    # each. A blob is written once and never changed (a replace is a new blob), so a read that got
    # every chunk of it has one version, whole; a chunk that is missing means the blob was dropped
    # meanwhile (replaced, or its job ended) and the read starts again from the record.

    async def _job_owned(self, job_id: str, lease_id: str) -> bool:
        """Whether the job runs under `lease_id` now: a quick look before staging a large blob, so a
        stale run does not send hundreds of MiB only to be refused. The commit checks it again."""
        client = self._client()
        state, lease = await self._retry(lambda: client.hmget(self._k("job", job_id), ["state", "lease"]))
        return state == b"running" and lease is not None and lease.decode() == lease_id

    async def _stage(self, blob_id: str, data: memoryview) -> bool:
        """The bytes under `stage:<blob_id>`, one chunk per command; False when the staged bytes went
        missing on the way (expired, or Redis lost them): the caller writes the blob again."""
        for n, offset in enumerate(range(0, len(data), self.blob_chunk)):
            part = data[offset:offset + self.blob_chunk]
            if await self._run("stage_chunk", blob_id, n, part, self.staging_ttl_ms, token=False) != "1":
                return False
        return True

    async def _put_blob(self, kind: str, owner: str, lease_id: str | None, what: Any, data: bytes) -> bool:
        """Store a blob (`kind`: "ckpt", "art" or "upload") for job / upload `owner`; False when the fence
        refused it (nothing changed). A blob up to one chunk goes inline in the commit itself."""
        view = memoryview(data).cast("B")
        size = len(view)
        for _ in range(3):
            blob_id = uuid.uuid4().hex
            staged = size > self.blob_chunk
            if staged:
                if lease_id is not None and not await self._job_owned(owner, lease_id):
                    return False
                try:
                    complete = await self._stage(blob_id, view)
                except BaseException:  # a cancelled write too (CancelledError is no Exception)
                    # Its TTL drops it anyway; dropping it now frees the memory sooner, when Redis answers.
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(
                            self._client().unlink(self._k("stage", blob_id)),
                            self.socket_timeout)
                    raise
                if not complete:
                    continue
            reply = await self._run("put_blob", kind, owner, lease_id or "", what, blob_id, size,
                                    self.blob_chunk if staged else 0, b"" if staged else view)
            if reply != "gone":
                return reply == "1"
        raise RuntimeError(f"could not store a {size}-byte blob for {owner}: its staged bytes kept going "
                           f"missing from Redis before the commit (a Redis losing its data?)")

    async def _read_blob(self, blob_id: bytes, size: int) -> bytes | None:
        """Blob `blob_id` (`size` bytes), one chunk (hash field) per command; None when it was dropped
        while we read it. The writer's chunk size is the first chunk's length (every chunk but the
        last has it); a chunk bigger than our own `blob_chunk` is read in pieces of that size."""
        if size == 0:
            return b""
        client = self._client()
        bid = blob_id.decode()
        key = self._k("blob", bid)
        chunk = await self._retry(lambda: client.hstrlen(key, "0"))
        if chunk == 0:
            return None
        parts = []
        for n, offset in enumerate(range(0, size, chunk)):
            want = min(chunk, size - offset)
            # the lambdas are awaited within this iteration, so their loop variables are this chunk's
            if want <= self.blob_chunk:
                part = await self._retry(lambda: client.hget(key, str(n)))  # noqa: B023
                if part is None or len(part) != want:
                    return None
                parts.append(part)
                continue
            for start in range(0, want, self.blob_chunk):
                length = min(self.blob_chunk, want - start)
                part = await self._run("blob_range", bid, n, start, length, token=False, decode=False)
                if part is None or len(part) != length:
                    return None
                parts.append(part)
        return b"".join(parts)

    async def _read_pointed(self, describe: str, pointer: Callable[[], Awaitable[tuple[Any, ...] | None]]
                            ) -> tuple[Any, bytes] | None:
        """Follow `pointer()` (None: nothing stored; (extra, data) for an inline blob of an earlier
        version; (extra, blob id, size) for a blob) and read what it points to, again from the
        pointer when the blob was replaced or dropped during the read."""
        found = await pointer()
        for _ in range(_BLOB_READ_TRIES):
            if found is None:
                return None
            if len(found) == 2:
                return found[0], bytes(found[1])
            extra, blob_id, size = found
            data = await self._read_blob(blob_id, size)
            if data is not None:
                return extra, data
            found = await pointer()   # the blob was dropped under us: where does the record point now?
            if found is not None and len(found) == 3 and found[1] == blob_id:
                raise RuntimeError(f"{describe}: Redis no longer has its blob {blob_id.decode()} "
                                   "(evicted? set maxmemory-policy noeviction)")
        raise RuntimeError(f"{describe} was replaced {_BLOB_READ_TRIES} times while it was being read")

    async def save_checkpoint(self, checkpoint: Checkpoint, lease_id: str | None = None) -> bool:
        return await self._put_blob("ckpt", checkpoint.job_id, lease_id, int(checkpoint.iteration), checkpoint.data)

    async def load_checkpoint(self, job_id: str) -> Checkpoint | None:
        client = self._client()
        key = self._k("ckpt", job_id)

        async def pointer() -> tuple[Any, ...] | None:
            iteration, blob_id, size, inline = await self._retry(
                lambda: client.hmget(key, ["iteration", "blob", "size", "data"]))
            if blob_id is not None:
                return int(iteration or 0), blob_id, int(size)
            return None if inline is None else (int(iteration or 0), inline)

        found = await self._read_pointed(f"the checkpoint of job {job_id}", pointer)
        return None if found is None else Checkpoint(job_id, found[0], found[1])

    async def put_artifact(self, job_id: str, name: str, data: bytes, lease_id: str | None = None) -> bool:
        kind = "art" if lease_id is not None or not is_upload_id(job_id) else "upload"
        return await self._put_blob(kind, job_id, lease_id, name, data)

    async def _artifact_fields(self, job_id: str, name: str, inline: bool) -> tuple[Any, Any]:
        """The artifact's pointer ('<blob id> <size>') and its inline form of an earlier version (its
        bytes with `inline`, else whether there is one), read together: a write replaces both at once."""
        client = self._client()

        async def read() -> list[Any]:
            async with client.pipeline(transaction=True) as pipe:
                pipe.hget(self._k("artp", job_id), name)
                if inline:
                    pipe.hget(self._k("art", job_id), name)
                else:
                    pipe.hexists(self._k("art", job_id), name)
                return await pipe.execute()

        ptr, old = await self._retry(read)
        return ptr, old

    async def get_artifact(self, job_id: str, name: str) -> bytes | None:
        async def pointer() -> tuple[Any, ...] | None:
            ptr, inline = await self._artifact_fields(job_id, name, inline=True)
            if ptr is not None:
                blob_id, size = ptr.split()
                return None, blob_id, int(size)
            return None if inline is None else (None, inline)

        found = await self._read_pointed(f"artifact {name} of {job_id}", pointer)
        return None if found is None else found[1]

    async def has_artifact(self, job_id: str, name: str) -> bool:
        ptr, inline = await self._artifact_fields(job_id, name, inline=False)
        return ptr is not None or bool(inline)

    async def delete_artifact(self, job_id: str, name: str, lease_id: str | None = None) -> bool:
        return await self._run("delete_artifact", job_id, name, lease_id or "") == "1"

    async def finish(self, job_id: str, lease_id: str, similarity: float | None) -> bool:
        state, _, worker_id = (await self._run("finish", job_id, lease_id, _num(similarity))).partition(" ")
        if state == "0":   # refused by the fence: nothing changed
            return False
        if worker_id:   # one whose cancel was asked before it ended ends CANCELLED: aborted, as in `fail`
            self._count(worker_id, "aborted" if state == JobState.CANCELLED.value else "complete")
        return True

    async def fail(self, job_id: str, lease_id: str, reason: str, retry: bool = True) -> JobState | None:
        reply = await self._run("fail", job_id, lease_id, reason, "1" if retry else "0")
        if not reply:  # refused by the fence: nothing changed
            return None
        state, _, worker_id = reply.partition(" ")
        result = JobState(state)
        if worker_id:
            self._count(worker_id, {JobState.QUEUED: "retried", JobState.CANCELLED: "aborted"}.get(result, "failed"))
        return result

    async def mark_cancelled(self, job_id: str, lease_id: str) -> None:
        ok, _, worker_id = (await self._run("mark_cancelled", job_id, lease_id)).partition(" ")
        if ok == "1" and worker_id:
            self._count(worker_id, "aborted")

    async def release(self, job_id: str, lease_id: str) -> bool:
        """A worker stopping gracefully hands its job back: the front of the line, attempt not counted.

        A job whose cancel was requested is cancelled instead (it is never run again).
        """
        return await self._run("release", job_id, lease_id) == "1"

    # --- retention ------------------------------------------------------------------------------

    async def prune(self, older_than: float, state_older_than: float | None = None, batch: int = 200) -> int:
        """Delete jobs finished and delivered more than `older_than` seconds ago: records,
        artifacts, checkpoints, history entries, their events and kept frames (XDEL: the other
        events keep their ids and every cursor reads on), then uploads stored before the cutoff that no job left names; then, with
        `state_older_than` shorter than `older_than`, only the `state.pt` of jobs finished and
        delivered more than that many seconds ago. Neither touches a job that a queued or running job
        starts from (its `kids` set, read in the deleting script). Expired settings need nothing here
        (Redis drops them). Returns how many whole jobs. One script per `batch` jobs; safe from
        several processes."""
        cutoff = repr(time.time() - float(older_than))
        total, offset = 0, 0
        while True:
            # Jobs a queued or running job starts from stay in `delivered`: page on past them.
            pruned, examined, kept = map(int, (await self._run("prune", cutoff, int(batch), offset)).split())
            total += pruned
            offset += kept
            if examined < batch:
                break
        # Then uploads no job names any more (those of the jobs just pruned included).
        while True:
            _, examined = map(int, (await self._run("prune_uploads", cutoff, int(batch))).split())
            if examined < batch:
                break
        # Then the states of the jobs kept that are older than `state_older_than`: each job delivered
        # before that cutoff is looked at each time (those already without a state cost a lookup).
        # Another process pruning whole jobs meanwhile shifts the pages: what this pass skips, the
        # next one takes.
        if state_older_than is not None and float(state_older_than) < float(older_than):
            state_cutoff = repr(time.time() - float(state_older_than))
            offset = 0
            while True:
                _, examined = map(int, (await self._run("prune_state", state_cutoff, int(batch), offset)).split())
                offset += examined
                if examined < batch:
                    break
        return total

    async def state_bytes(self) -> int:
        """The total size of the stored state.pt artifacts (the `statebytes` counter)."""
        client = self._client()
        return int(await self._retry(lambda: client.get(self._k("statebytes"))) or 0)

    async def prune_states_over(self, budget_bytes: int, batch: int = 100) -> int:
        """While the stored states total more than `budget_bytes`, delete the state.pt of the job
        finished and delivered first that no queued or running job starts from (see JobQueue), in
        scripts of at most `batch` entries of the `states` index, paging past those that stay. Each
        script checks the total and deletes atomically: several processes at once delete each state
        once, and none past the budget. How many states went."""
        budget = int(budget_bytes)
        if budget < 0:
            raise ValueError(f"budget_bytes must not be negative, got {budget_bytes!r}")
        dropped, offset = 0, 0
        while True:
            reply = await self._run("prune_states_over", budget, int(batch), offset)
            gone, examined, skipped, total = map(int, reply.split())
            dropped += gone
            if total <= budget or examined < batch:
                return dropped
            offset += skipped

    async def workers(self, max_age: float | None = None) -> dict[str, dict[str, Any]]:
        """Live workers, from SAQ's registry (entries expire `worker_ttl` seconds after last contact):
        id -> last_seen, job_id, stats, init_images (its last claim or announcement said it takes jobs
        that need the encoder), claimed_at (its last claim or heartbeat, as claim's retry rule reads
        it, to within LEASE/4; None while it has only announced itself)."""
        assert self.saq is not None
        saq = self.saq
        client = self._client()
        info = await self._retry(lambda: saq.info())
        claimed = {(w.decode() if isinstance(w, bytes) else w): score for w, score in
                   await self._retry(lambda: client.zrange(self._k("alive"), 0, -1, withscores=True))}
        out: dict[str, dict[str, Any]] = {}
        for worker_id, data in info["workers"].items():
            meta = data.get("metadata") or {}
            last_seen = float(meta.get("last_seen") or 0.0)
            if max_age is not None and last_seen < time.time() - max_age:
                continue
            # An entry without the field (an earlier version's worker) reads True until that worker's
            # next claim under this version says: a wrong True fails safe (the job is queued, as before).
            out[worker_id] = {"last_seen": last_seen, "job_id": meta.get("job_id"), "stats": data.get("stats"),
                              "init_images": meta.get("init_images") is not False,
                              "claimed_at": claimed.get(worker_id)}
        return out

    async def announce_worker(self, worker_id: str, init_images: bool) -> None:
        """A worker that is not claiming yet (compiling) is seen now: the registry entry a claim that
        found nothing writes (throttled alike). Not its `alive` score (claim's retry-elsewhere rule,
        written by claims and heartbeats): a compiling worker can take no retry yet."""
        assert self.saq is not None
        await self._see_worker(worker_id, None, init_images)

    async def forget_worker(self, worker_id: str) -> None:
        """A worker that stopped cleanly leaves SAQ's registry and the `alive` set (see JobQueue)."""
        assert self.saq is not None
        await self._run("forget_worker", worker_id, self.saq.namespace(f"worker_info:{worker_id}"), self.saq._stats)
        # Not throttled any more: a claim or announcement under this id lists it again at once.
        self._seen.pop(worker_id, None)
