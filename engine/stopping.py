"""The second stop signal, for the bot (`imagine-bot`) and `imagine-worker` alike: leave at once;
and leaving without waiting for a models' load that a stop abandoned (exit_if_abandoned).

Its own small module because the bot imports it before it knows whether it will load the engine
(torch) at all.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from typing import NoReturn

log = logging.getLogger(__name__)


def exit_now(signum: int) -> NoReturn:
    """Leave at once with 128 + the signal's number (130 for Ctrl-C, 143 for SIGTERM, as a shell
    reports a process the signal killed; not 0: the jobs were not handed back), after one log line.
    os._exit, because nothing else is prompt: asyncio.run and the interpreter wait at exit for the
    loop's executor threads (the hand-back joins the GPU thread for up to 30 s there, a store write
    may be waiting out another process's lock), which is what the first signal is already waiting
    for. The running jobs' leases expire and another worker resumes them from their last
    checkpoints, as after kill -9."""
    code = 128 + signum
    log.warning("%s again: stopping at once (exit status %d) without handing back the running jobs; "
                "their leases expire and another worker resumes them from their last checkpoints",
                signal.Signals(signum).name, code)
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    os._exit(code)


# Threads whose work a stop abandoned (engine.worker.in_daemon_thread: the models' load), by the
# entry points' exit (exit_if_abandoned).
_abandoned: list[threading.Thread] = []


def abandon(thread: threading.Thread) -> None:
    """`thread` (a daemon) is no longer waited for: it is to end with the process."""
    _abandoned.append(thread)


def any_abandoned() -> bool:
    """Whether a thread a stop abandoned is still running."""
    return any(thread.is_alive() for thread in _abandoned)


def exit_if_abandoned(code: int) -> None:
    """At the end of an entry point's main, once its event loop is closed: if a thread that a stop
    abandoned is still running, leave now with `code` (os._exit, after flushing the log and the
    standard streams); else return, and the interpreter exits as usual. The thread (the models'
    load) may be inside a torch op: Python 3.11's finalisation ends a daemon thread when it next
    takes the GIL, which inside C++ code ends in std::terminate ("terminate called without an
    active exception", exit 134 instead of the stop's 0)."""
    if not any_abandoned():
        return
    log.debug("leaving with %d without waiting for the abandoned thread(s) %s", code,
              ", ".join(t.name for t in _abandoned if t.is_alive()))
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
