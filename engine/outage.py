"""Logging of the store's trouble.

`log_swept`: the jobs a sweep of expired leases requeued or ended (their worker lost).

`OutageLog`: an operation that fails over and over while its store (or the way to it) is down: a
full disk, a Redis refusing writes (MISCONF), an unreachable server. Retried every second or so, it
would log a traceback each time, for each job, for as long as the outage lasts.

`OutageLog` says it the way the worker's claim loop does: the first failure at WARNING with its
traceback, then one line a minute (a count, the last error) while it lasts, the failures between at
DEBUG, and a line when it works again. No imports beyond the standard library: the bot uses it too
(without torch)."""

from __future__ import annotations

import logging
import time
from typing import Callable, Mapping, Sequence

REMIND_EVERY = 60.0   # seconds between the "still fail" lines of one outage
SWEPT_IDS = 10        # job ids a sweep's log line names at most


def log_swept(logger: logging.Logger, swept: Sequence[tuple[str, str]],
              counts: Mapping[str, int] | None = None) -> None:
    """One WARNING for a sweep that found expired leases: `swept`, (outcome, job id) pairs in the
    sweep's order, outcome "requeued", "failed" (out of attempts) or "cancelled" (asked to be);
    `counts`: how many of each when `swept` names only some (the first SWEPT_IDS are named)."""
    if counts is None:
        counts = {}
        for outcome, _ in swept:
            counts[outcome] = counts.get(outcome, 0) + 1
    total = sum(counts.values())
    if not total:
        return
    named: dict[str, list[str]] = {}
    for outcome, job_id in list(swept)[:SWEPT_IDS]:
        named.setdefault(outcome, []).append(job_id)
    parts = []
    for outcome, what in (("requeued", "requeued"), ("failed", "failed (out of attempts)"),
                          ("cancelled", "cancelled (as asked)")):
        n = counts.get(outcome, 0)
        if n:
            ids = named.get(outcome, [])
            more = f" and {n - len(ids)} more" if ids and n > len(ids) else ""
            parts.append(f"{n} {what}: {', '.join(ids)}{more}" if ids else f"{n} {what}")
    logger.warning("swept %d job%s whose worker was lost (lease expired): %s",
                   total, "" if total == 1 else "s", "; ".join(parts))


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split()) or 'no detail'}"


class OutageLog:
    """One kind of operation (`what`, e.g. "heartbeats"): `failed()` at each failure, `worked()` at
    each success (only the first after failures logs). Shared by every job of a process: an outage
    of the store fails them all, and is said once, not once per job."""

    def __init__(self, logger: logging.Logger, what: str, *, every: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.log, self.what, self.every, self.clock = logger, what, every, clock
        self.since: float | None = None   # clock() at the first failure of the current outage
        self.failures = 0
        self.said_at = 0.0
        self.last_failed = 0.0            # clock() at the latest failure

    @property
    def failing(self) -> bool:
        return self.since is not None

    def failed(self, exc: BaseException, detail: str = "") -> None:
        """One failure, `exc` (logged from an `except` block), `detail` naming it (a job id)."""
        now = self.clock()
        about = f" ({detail})" if detail else ""
        every = REMIND_EVERY if self.every is None else self.every
        if self.since is not None and now - self.last_failed > 2 * every:
            # No failure for a while, and no success said it ended (nothing was tried meanwhile: a
            # worker gone idle after a blip): this is another outage, said as one.
            self.since, self.failures = None, 0
        self.last_failed = now
        if self.since is None:
            self.since, self.said_at, self.failures = now, now, 1
            self.log.warning("%s failed%s; while they fail, a line a minute, and one when they work again",
                             self.what, about, exc_info=exc)
            return
        self.failures += 1
        if now - self.said_at >= every:
            self.said_at = now
            self.log.warning("%s still fail (for %.0f s, %d failures; the last%s: %s)",
                             self.what, now - self.since, self.failures, about, _reason(exc))
        else:
            self.log.debug("%s failed again%s: %s", self.what, about, _reason(exc))

    def worked(self, began: float | None = None) -> None:
        """A success. `began`: when (self.clock()) the call began; one that began before the first
        failure (in flight as the outage began: concurrent frames of other jobs) ends nothing."""
        if self.since is not None and (began is None or began >= self.since):
            self.log.warning("%s work again (they failed for %.0f s, %d failures)",
                             self.what, self.clock() - self.since, self.failures)
            self.since, self.failures = None, 0
