"""Load run: many small jobs from many users over several `imagine-worker` processes.

    .venv/bin/python benchmarks/load_run.py                      # 200 jobs, 20 users, 2 workers, Redis
    .venv/bin/python benchmarks/load_run.py --backend sqlite
    .venv/bin/python benchmarks/load_run.py --queue redis://host:6379/0?prefix=load   # an existing Redis

It builds tiny random-weight model files (the same classes and file formats as OpenAI's), starts
its own redis-server on a free port (unless --queue is given) and the worker processes
(`python -m engine.worker`), waits until every worker has claimed once (models loaded), then
submits the whole burst while the queue is paused (so the claim order can be checked against the
fair order), unpauses, and follows the event log the way the bot does.

It prints: jobs done, lost (not DONE), finished twice (more than one DONE event), run twice (more
than one STARTED), fair-order violations (a user's k-th job claimed before another user's
(k-1)-th), each user's longest wait (claim time - submit time) and first-job wait, the total time,
and finally one JSON line with the same numbers. Exit status 1 if any job was lost or doubled.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.jobs import EventKind, JobSpec  # noqa: E402
from engine.queue import open_queue  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(workdir: Path) -> tuple[subprocess.Popen, int]:
    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("redis-server is not on PATH (or pass --queue / --backend sqlite)")
    port = free_port()
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return proc, port
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("redis-server did not start")
        time.sleep(0.05)


def make_models(workdir: Path) -> tuple[Path, Path]:
    from engine import random_models

    clip = random_models.save_clip_torchscript(random_models.make_clip(seed=0), workdir / "tiny-clip.pt")
    decoder = random_models.save_pickled_module(random_models.make_decoder(seed=0), workdir / "decoder.pkl")
    # Fill the model cache once, before several workers start at the same moment.
    from engine.models import load_models

    load_models(str(clip), str(decoder), "cpu", workdir / "cache", trust_decoder=True)
    return clip, decoder


def start_workers(n: int, url: str, clip: Path, decoder: Path, workdir: Path) -> list[tuple[str, subprocess.Popen]]:
    env = {k: v for k, v in os.environ.items() if "DISCORD" not in k.upper()}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    workers = []
    for i in range(n):
        wid = f"load{i}"
        log = open(workdir / f"{wid}.log", "w")
        proc = subprocess.Popen(
            [sys.executable, "-m", "engine.worker", "--queue", url, "--clip-model", str(clip),
             "--decoder", str(decoder), "--encoder", "", "--trust-decoder", "--device", "cpu", "--max-batch", "1",
             "--worker-id", wid, "--cache-dir", str(workdir / "cache"), "--log-level", "WARNING"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        workers.append((wid, proc))
    return workers


async def run(args: argparse.Namespace, url: str, workers: list[tuple[str, subprocess.Popen]]) -> dict:
    queue = open_queue(url)
    await queue.start()
    try:
        deadline = time.monotonic() + 180
        while True:  # every worker has claimed once: models loaded, GPU thread up
            seen = await queue.workers()
            if all(w in seen for w, _ in workers):
                break
            for wid, proc in workers:
                if proc.poll() is not None:
                    raise SystemExit(f"worker {wid} exited with {proc.returncode}")
            if time.monotonic() > deadline:
                raise SystemExit("workers did not come up")
            await asyncio.sleep(0.2)

        cursor = 0
        while batch := await queue.events(cursor, timeout=0):
            cursor = batch[-1].seq

        rng = random.Random(args.seed)
        users = [1000 + u for u in range(args.users)]
        owners = [users[i % args.users] for i in range(args.jobs)]
        rng.shuffle(owners)  # a burst with the users interleaved at random
        await queue.set_setting("paused", True)
        submitted: dict[str, tuple[int, int, float]] = {}  # job -> (user, rank within user, created_at)
        per_user: Counter[int] = Counter()
        try:
            for user in owners:
                record = await queue.submit(JobSpec(
                    prompt=f"a house #{per_user[user]} for {user}", user_id=user, channel_id=1,
                    iterations=args.iterations, frame_every=args.frame_every, grid=args.grid, cutn=args.cutn,
                ))
                submitted[record.id] = (user, per_user[user], record.created_at)
                per_user[user] += 1
        finally:
            await queue.set_setting("paused", False)
        t0, wall0 = time.monotonic(), time.time()
        submit_s = wall0 - min(c for _, _, c in submitted.values())

        starts: dict[str, list] = defaultdict(list)
        done: Counter[str] = Counter()
        ended: set[str] = set()
        last_end = wall0
        while len(ended) < len(submitted):
            if time.monotonic() - t0 > args.timeout:
                break
            for e in await queue.events(cursor, timeout=1.0):
                cursor = e.seq
                if e.job_id not in submitted:
                    continue
                if e.kind == EventKind.STARTED:
                    starts[e.job_id].append(e)
                elif e.kind in (EventKind.DONE, EventKind.FAILED, EventKind.CANCELLED):
                    ended.add(e.job_id)
                    last_end = max(last_end, e.at)
                    if e.kind == EventKind.DONE:
                        done[e.job_id] += 1
        total = time.monotonic() - t0

        claim_order = sorted((s[0] for s in starts.values()), key=lambda e: e.seq)
        ranks = [submitted[e.job_id][1] for e in claim_order]
        violations = sum(1 for a, b in zip(ranks, ranks[1:]) if b < a)
        waits: dict[int, list[float]] = defaultdict(list)
        first_wait: dict[int, float] = {}
        for job_id, evs in starts.items():
            user, rank, created = submitted[job_id]
            wait = evs[0].at - created
            waits[user].append(wait)
            if rank == 0:
                first_wait[user] = wait
        all_waits = sorted(w for ws in waits.values() for w in ws)
        result = {
            "backend": url.split("://", 1)[0],
            "jobs": len(submitted),
            "users": args.users,
            "workers": len(workers),
            "iterations": args.iterations, "frame_every": args.frame_every, "grid": args.grid, "cutn": args.cutn,
            "done": sum(1 for j in submitted if done[j] >= 1),
            "lost": sum(1 for j in submitted if done[j] == 0),
            "finished_twice": sum(1 for j in submitted if done[j] > 1),
            "run_twice": sum(1 for j in submitted if len(starts[j]) > 1),
            "fair_order_violations": violations,
            "submit_s": round(submit_s, 2),
            "total_s": round(total, 2),
            "jobs_per_s": round(len(ended) / total, 2) if total else None,
            "wait_p50_s": round(statistics.median(all_waits), 2) if all_waits else None,
            "wait_max_s": round(all_waits[-1], 2) if all_waits else None,
            "first_job_wait_max_s": round(max(first_wait.values()), 2) if first_wait else None,
            "longest_wait_per_user_s": {str(u): round(max(ws), 2) for u, ws in sorted(waits.items())},
            "device": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch CPU",
        }
        return result
    finally:
        await queue.close()


def report(r: dict) -> None:
    print(f"backend {r['backend']}: {r['jobs']} jobs from {r['users']} users over {r['workers']} worker processes "
          f"(iterations={r['iterations']} frame_every={r['frame_every']} grid={r['grid']} cutn={r['cutn']})")
    print(f"jobs done:             {r['done']}/{r['jobs']}")
    print(f"lost (no DONE):        {r['lost']}")
    print(f"finished twice:        {r['finished_twice']}")
    print(f"run twice (STARTED>1): {r['run_twice']}")
    print(f"fair-order violations: {r['fair_order_violations']}")
    print(f"total time:            {r['total_s']} s ({r['jobs_per_s']} jobs/s) after a {r['submit_s']} s burst of submits")
    print(f"wait p50 / max:        {r['wait_p50_s']} s / {r['wait_max_s']} s; "
          f"longest first-job wait {r['first_job_wait_max_s']} s")
    print("longest wait per user (claim - submit):")
    items = list(r["longest_wait_per_user_s"].items())
    for i in range(0, len(items), 5):
        print("  " + "  ".join(f"u{u}: {w:6.2f} s" for u, w in items[i:i + 5]))
    print(json.dumps(r, sort_keys=True))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=200)
    p.add_argument("--users", type=int, default=20)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--backend", choices=["redis", "sqlite"], default="redis")
    p.add_argument("--queue", default=None, help="an existing queue URL (else a fresh one of --backend)")
    p.add_argument("--iterations", type=int, default=2)
    p.add_argument("--frame-every", type=int, default=2)
    p.add_argument("--grid", type=int, default=8)
    p.add_argument("--cutn", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=1800)
    args = p.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="imagine-load-"))
    redis_proc = None
    workers: list[tuple[str, subprocess.Popen]] = []
    try:
        clip, decoder = make_models(workdir)
        if args.queue:
            url = args.queue
        elif args.backend == "redis":
            redis_proc, port = start_redis(workdir)
            url = f"redis://127.0.0.1:{port}/0?prefix=load"
        else:
            url = f"sqlite:///{workdir}/jobs.db"
        workers = start_workers(args.workers, url, clip, decoder, workdir)
        result = asyncio.run(run(args, url, workers))
        report(result)
        return 0 if result["lost"] == 0 and result["finished_twice"] == 0 else 1
    finally:
        for _, proc in workers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _, proc in workers:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        if redis_proc is not None:
            redis_proc.terminate()
            redis_proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
