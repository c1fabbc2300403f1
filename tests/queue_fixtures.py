"""Fixtures for the JobQueue contract tests (imported by tests/test_queue_contract.py).

`queue_factory` is parametrised over the backends; `await queue_factory.open(**options)` opens
another queue on the same storage (the same SQLite file / the same Redis key prefix), as another
process would. `redis_server` starts a throwaway `redis-server` once per test session.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from engine.jobs import JobQueue

BACKENDS = ["sqlite", "redis"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith((b"+PONG", b"-NOAUTH"))   # up (a --requirepass server too)
    except OSError:
        return False


@dataclass
class RedisServer:
    port: int
    proc: subprocess.Popen[bytes]
    args: list[str]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def restart(self) -> None:
        self.stop()
        self.proc = start_redis_process(self.args, self.port)


def start_redis_process(args: list[str], port: int, timeout: float = 10.0) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while not _ping(port):
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with {proc.returncode}")
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("redis-server did not answer PING")
        time.sleep(0.02)
    return proc


def start_redis_with_aof(data_dir) -> RedisServer:
    """A redis-server whose append-only file (fsync always) is in `data_dir`: a kill -9 and a
    restart on the same port (`RedisServer.restart`) keep every acknowledged write."""
    return start_redis("--appendonly", "yes", "--appendfsync", "always", "--dir", str(data_dir))


def start_redis(*extra: str, port: int | None = None) -> RedisServer:
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.fail("redis-server is not on PATH: `make test` installs it")
    port = port or free_port()
    args = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", *extra]
    return RedisServer(port, start_redis_process(args, port), args)


@pytest.fixture(scope="session")
def redis_server():
    server = start_redis()
    yield server
    server.stop()


class QueueFactory:
    def __init__(self, kind: str, target: str, **defaults: Any) -> None:
        self.kind = kind
        self.target = target
        self.defaults = defaults
        self.opened: list[JobQueue] = []

    async def open(self, **options: Any) -> JobQueue:
        opts = {**self.defaults, **options}
        if self.kind == "sqlite":
            from engine.queue.sqlite import SQLiteJobQueue

            queue: JobQueue = SQLiteJobQueue(self.target, **opts)
        else:
            from engine.queue.redis import RedisJobQueue

            queue = RedisJobQueue(self.target, **opts)
        await queue.start()
        self.opened.append(queue)
        return queue

    async def close_all(self) -> None:
        for queue in self.opened:
            await queue.close()
        self.opened.clear()


@pytest_asyncio.fixture(params=BACKENDS)
async def queue_factory(request: pytest.FixtureRequest, tmp_path: Path):
    if request.param == "sqlite":
        factory = QueueFactory("sqlite", str(tmp_path / "queue.db"))
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        factory = QueueFactory("redis", server.url, prefix=f"test-{uuid.uuid4().hex[:8]}")
    yield factory
    await factory.close_all()


@pytest_asyncio.fixture
async def queue(queue_factory: QueueFactory) -> JobQueue:
    return await queue_factory.open()


__all__ = ["BACKENDS", "QueueFactory", "RedisServer", "free_port", "queue", "queue_factory", "redis_server",
           "start_redis"]


async def job_events(queue, job_id: str) -> list:
    """Every event of one job so far, in order (reads the whole log from the start)."""
    events, cursor = [], 0
    while batch := await queue.events(cursor, timeout=0.1):
        cursor = batch[-1].seq
        events += [e for e in batch if e.job_id == job_id]
    return events
