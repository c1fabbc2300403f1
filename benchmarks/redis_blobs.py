"""What a checkpoint costs the Redis queue: save and load times, and Redis's own time.

    .venv/bin/python benchmarks/redis_blobs.py                 # 256 MiB, a throwaway redis-server
    .venv/bin/python benchmarks/redis_blobs.py --mib 8 --runs 1 # a quick look (tests/test_benchmarks.py)
    .venv/bin/python benchmarks/redis_blobs.py --url redis://host:6379/0   # a real server (its own prefix)

A full-size checkpoint is 96-384 MiB. engine.queue.redis moves it in `blob_chunk` pieces (4 MiB:
each one command, within the socket timeout) staged as the fields of one hash, then one fenced
commit, and reads it back a piece at a time. Redis runs one command at a time, so its longest
command is how long every other client (the bot's reads, other workers' heartbeats) can be held
up, and the sum of its commands is the main-thread time the checkpoint costs. For each run this
prints the wall time of save_checkpoint and load_checkpoint (MiB/s) and, from Redis's SLOWLOG, the
write's commands: their count, total and longest. The last line is JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from engine.jobs import Checkpoint  # noqa: E402
from engine.queue.redis import BLOB_CHUNK, RedisJobQueue  # noqa: E402
from load_run import start_redis  # noqa: E402


def _start_redis(workdir: str) -> tuple[subprocess.Popen, str]:
    proc, port = start_redis(Path(workdir))   # benchmarks/load_run.py's throwaway server
    return proc, f"redis://127.0.0.1:{port}/0"


async def _slowlog(redis) -> list[dict]:
    return await redis.slowlog_get(100_000)


async def measure(url: str, size: int, runs: int) -> dict:
    queue = RedisJobQueue(url, prefix=f"bench-{uuid.uuid4().hex[:8]}", socket_timeout=60)
    await queue.start()
    redis = queue.redis
    old = {k: (await redis.config_get(k))[k] for k in ("slowlog-log-slower-than", "slowlog-max-len")}
    await redis.config_set("slowlog-log-slower-than", 0)   # every command, with its duration (µs)
    await redis.config_set("slowlog-max-len", 100_000)
    data = os.urandom(size)
    rows = []
    try:
        for run in range(runs):
            await redis.slowlog_reset()
            t0 = time.perf_counter()
            assert await queue.save_checkpoint(Checkpoint(f"bench-job-{run}", run, data))
            save_s = time.perf_counter() - t0
            log = await _slowlog(redis)
            t0 = time.perf_counter()
            loaded = await queue.load_checkpoint(f"bench-job-{run}")
            load_s = time.perf_counter() - t0
            assert loaded is not None and loaded.data == data
            chunked = [e["duration"] for e in log if not e["command"].upper().startswith(b"SLOWLOG")]

            row = {
                "run": run, "save_s": round(save_s, 3), "load_s": round(load_s, 3),
                "save_mib_s": round(size / 2**20 / save_s, 1), "load_mib_s": round(size / 2**20 / load_s, 1),
                "redis_s": round(sum(chunked) / 1e6, 3), "longest_ms": round(max(chunked) / 1e3, 1),
                "commands": len(chunked),
            }
            rows.append(row)
            print(f"run {run}: save {row['save_s']:.3f} s ({row['save_mib_s']} MiB/s), load {row['load_s']:.3f} s "
                  f"({row['load_mib_s']} MiB/s); the write: {row['commands']} Redis commands, "
                  f"{row['redis_s']:.3f} s of Redis time, the longest {row['longest_ms']:.1f} ms", flush=True)
    finally:
        for k, v in old.items():
            await redis.config_set(k, v)
        await queue.close()
    return {"rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mib", type=int, default=256, help="blob size in MiB (a grid-64 checkpoint is ~384)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--url", default=None, help="a Redis to use (default: start a throwaway redis-server)")
    args = p.parse_args(argv)
    if args.mib < 1 or args.runs < 1:
        p.error("--mib and --runs must be at least 1")
    with tempfile.TemporaryDirectory() as workdir:
        proc, url = (None, args.url) if args.url else _start_redis(workdir)
        try:
            result = asyncio.run(measure(url, args.mib << 20, args.runs))
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(10)
    rows = result["rows"]
    best = min(rows, key=lambda r: r["save_s"])
    print(json.dumps({
        "benchmark": "redis_blobs", "date": datetime.date.today().isoformat(), "host": platform.machine(),
        "cpus": os.cpu_count(), "mib": args.mib, "blob_chunk_mib": BLOB_CHUNK >> 20, "runs": rows,
        "best_save_s": best["save_s"], "best_load_s": min(r["load_s"] for r in rows),
        "longest_ms": max(r["longest_ms"] for r in rows),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
