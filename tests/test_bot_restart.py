"""Stopping the bot (Bot + launcher resources) and starting it again on the same SQLite file; one
bot per store (`imagine-bot` processes: a second one on the store exits 2, a lost lease stops a bot)."""

from __future__ import annotations

import asyncio
import signal
import socket
import sqlite3
import time

import pytest

from bot.launcher import open_resources
from engine.jobs import JobState
from tests.fakediscord import FakeDiscord
from tests.test_bot_support import claim_jobs, harness, publish_frames  # noqa: F401 - the fixture
from engine.queue import open_queue

pytestmark = pytest.mark.asyncio


async def _state(h, job_id):
    async with open_queue(h.config.queue.url) as queue:
        return (await queue.get(job_id)).state


async def test_queued_and_running_jobs_complete_after_a_restart_with_one_final_post_each(harness):
    h = harness
    fd = h.fd
    h.config.queue.url += "?lease=1"   # a dead worker's job goes back in line after 1 s
    await h.start(worker=False)
    # One job is taken by a worker that then dies mid-run (claimed, a frame, no more heartbeats).
    inter = await h.imagine("running when everything stopped", user=fd.admin_user)
    running_msg = await h.reply_of(inter)
    running_id = h.job_id(running_msg)
    await claim_jobs(h.queue, [running_id])
    await publish_frames(h.queue, [running_id], 1, every=0)
    await fd.wait_for(lambda: "Iteration 0/0" in fd.messages[running_msg.id].content, 10, "its frame")
    # Three more wait in line.
    msgs = []
    for n, user in enumerate([None, fd.admin_user, None]):
        inter = await h.imagine(f"restart job {n}", user=user)
        msgs.append(await h.reply_of(inter))
    ids = [h.job_id(m) for m in msgs]
    assert await h.queue.count_queued() == 3
    await h.stop()
    assert await _state(h, running_id) == JobState.RUNNING

    await h.start()   # a new bot and a new embedded worker on the same SQLite file
    for job_id in [running_id, *ids]:
        record = await h.wait_delivered(job_id, timeout=60)
        assert record.state == JobState.DONE, (job_id, record.state, record.error)
    for msg, job_id in zip([running_msg, *msgs], [running_id, *ids]):
        assert len(h.posts_of_job(job_id)) == 1, job_id
        stored = fd.messages[msg.id]   # edited in place, through the channel: the reply became the result
        assert sorted(a["filename"] for a in stored.attachments) == ["final.png", "video.mp4"]
        assert stored.custom_ids == [f"imagine:reroll:{job_id}", f"imagine:continue:{job_id}", f"imagine:remix:{job_id}"]
        (final,) = h.final_edits(msg.id)
        assert final.path == f"/channels/{msg.channel_id}/messages/{msg.id}"
    assert len(fd.channel_messages()) == len(msgs) + 1   # no duplicate posts
    fd.assert_clean()


async def test_a_job_that_finished_while_the_bot_was_down_is_posted_once(harness):
    h = harness
    fd = h.fd
    await h.start()
    await h.queue.set_setting("paused", True)
    inter = await h.imagine("finished in the dark", iterations=4)
    msg = await h.reply_of(inter)
    job_id = h.job_id(msg)
    await h.stop()

    # A worker alone (no bot) runs the job to the end; nobody posts it.
    h.config.worker.embedded = True
    async with open_resources(h.config, models_loader=lambda: h.models,
                              worker_options={"poll_every": 0.05}) as res:
        await res.queue.set_setting("paused", False)
        for _ in range(600):
            record = await res.queue.get(job_id)
            if record.state.finished:
                break
            await asyncio.sleep(0.05)
        assert record.state == JobState.DONE and not record.delivered

    await h.start(worker=False)
    record = await h.wait_delivered(job_id)
    assert record.state == JobState.DONE
    assert len(h.posts_of_job(job_id)) == 1
    assert sorted(a["filename"] for a in fd.messages[msg.id].attachments) == ["final.png", "video.mp4"]
    # Another restart does not post it again.
    await h.stop()
    await h.start(worker=False)
    await asyncio.sleep(0.3)
    assert len(h.posts_of_job(job_id)) == 1
    fd.assert_clean()


# --- one bot per store: `imagine-bot` processes on one SQLite file ----------------------------------

# The bot lease renewed every second and lapsing 3 s after its last renewal (60 s in production).
SHORT_LEASE = "import bot.launcher as launcher\nlauncher.BOT_LEASE_TTL = 3.0\n"


def logins(fd) -> int:
    return len(fd.find_requests("GET", "/users/@me"))


async def test_a_second_bot_on_the_same_store_exits_2_and_a_bot_started_after_a_clean_stop_runs_at_once(tmp_path):
    """Two bots on one store (two tokens, or an accidental second replica) both ran: each posted,
    edited and reconciled the other's jobs. The second now waits out the first one's lease (it could
    be a killed bot's), finds it renewed, and exits 2 with one line naming the holder and what to do,
    without logging in. A bot started once the first has stopped cleanly (lease released) runs at once."""
    from bot.launcher import BOT_LEASE, BOT_LEASE_GRACE
    from tests.test_bot_ops import BotProcess, bot_config, sqlite_queue
    from tests.test_ops import assert_exits

    async with FakeDiscord() as fd, sqlite_queue(tmp_path) as queue:
        first = BotProcess(fd, tmp_path, bot_config(tmp_path), prelude=SHORT_LEASE, name="first")
        try:
            await first.wait_log("gateway shard 0/1 ready")
            before, started = logins(fd), time.monotonic()
            second = BotProcess(fd, tmp_path, bot_config(tmp_path), prelude=SHORT_LEASE, name="second")
            code, log = await second.run_out(60)
            assert code == 2, f"exit status {code}:\n{log}"
            assert time.monotonic() - started > BOT_LEASE_GRACE   # it waited for a lapse that never came
            assert log.count("another bot holds this store's bot lease") == 1, log   # said once
            ours = [line for line in log.splitlines() if line.startswith("imagine-bot:")]
            assert len(ours) == 1, log
            assert ours[0].startswith(f"imagine-bot: another bot runs on the queue sqlite:///{tmp_path}/q.db: "
                                      f"its bot lease is held by {socket.gethostname()}-{first.proc.pid}-"), log
            assert f"(host {socket.gethostname()}, pid {first.proc.pid}) since " in ours[0]
            assert ours[0].endswith("stop that bot, or give this one a store of its own (another SQLite file, "
                                    "or another Redis ?prefix=)"), log
            assert "Traceback" not in log and fd.bot_token not in log
            assert logins(fd) == before and first.proc.poll() is None   # never reached Discord; the first runs on
            await assert_exits(first.proc, first.log, 0, within=30, send=signal.SIGTERM)
        finally:
            first.kill()
        assert "ERROR" not in first.log(), first.log()
        # Released as it stopped (unreleased, it would be held for 2 s more: renewed every second).
        assert await queue.hold_lease(BOT_LEASE, "probe", 60) is None
        assert await queue.release_lease(BOT_LEASE, "probe")

        third = BotProcess(fd, tmp_path, bot_config(tmp_path), prelude=SHORT_LEASE, name="third")
        try:
            await third.wait_log("gateway shard 0/1 ready")
            assert "another bot holds" not in third.log(), third.log()
            await assert_exits(third.proc, third.log, 0, within=30, send=signal.SIGTERM)
        finally:
            third.kill()
    fd.assert_clean()


async def test_a_bot_whose_lease_another_bot_took_stops_with_1(tmp_path):
    """A bot cut off from its store longer than its lease (here: another process holds the SQLite
    write lock), whose lease another bot took meanwhile, must not run on beside that bot: its next
    renewal finds the other holder, and it stops with exit status 1 and one ERROR line. The other
    bot's lease stays."""
    from tests.test_bot_ops import BotProcess, bot_config

    async with FakeDiscord() as fd:
        bot = BotProcess(fd, tmp_path, bot_config(tmp_path), prelude=SHORT_LEASE)
        try:
            await bot.wait_log("gateway shard 0/1 ready")
            con = sqlite3.connect(str(tmp_path / "q.db"), timeout=30, isolation_level=None)
            try:
                con.execute("BEGIN EXCLUSIVE")
                await asyncio.sleep(3.5)   # the bot's renewals wait for the lock; its lease lapses
                now = time.time()
                # What another bot's hold_lease writes when it takes the lapsed lease.
                con.execute("UPDATE leases SET holder = 'elsewhere-1-cafe', host = 'elsewhere', pid = 1,"
                            " since = ?, renewed = ?, expires_at = ? WHERE name = 'bot'", (now, now, now + 60))
                con.execute("COMMIT")
                code = await bot.wait_exit(15)
                assert code == 1, f"exit status {code} (None: still running):\n{bot.log()}"
                (holder,) = con.execute("SELECT holder FROM leases WHERE name = 'bot'").fetchone()
                assert holder == "elsewhere-1-cafe"   # not released: not this bot's any more
            finally:
                con.close()
        finally:
            bot.kill()
    log = bot.log()
    errors = [line for line in log.splitlines() if "[ERROR   ] bot.launcher" in line]
    assert len(errors) == 1, log
    assert "another bot took this store's bot lease (elsewhere-1-cafe (host elsewhere, pid 1) since" in errors[0]
    assert "exit status 1" in errors[0] and "Traceback" not in log


async def test_a_bot_whose_gpu_thread_dies_exits_1_and_leaves_the_lease_free(tmp_path, tiny_model_files):
    """A bot stopped by its embedded worker's dead GPU thread exits 1 so that its supervisor starts a
    fresh one, which must start at once: the stop releases the bot lease, as a clean stop does (held,
    the fresh bot would wait out the 60 s lease, then exit 2)."""
    from bot.launcher import BOT_LEASE
    from tests.test_bot_ops import GPU_THAT_DIES, BotProcess, bot_config, sqlite_queue
    from tests.test_ops import assert_exits

    async with FakeDiscord() as fd, sqlite_queue(tmp_path) as queue:
        bot = BotProcess(fd, tmp_path, bot_config(tmp_path, tiny_model_files), prelude=GPU_THAT_DIES)
        try:
            await assert_exits(bot.proc, bot.log, 1, within=120)
        finally:
            bot.kill()
        log = bot.log()
        assert "the embedded worker's GPU thread died or hung" in log, log
        assert await queue.hold_lease(BOT_LEASE, "the-next-bot", 60) is None, log   # free: taken at once
    assert "bot lease" not in log, log


async def test_a_bot_whose_token_discord_rejects_exits_2_and_leaves_the_lease_free(tmp_path):
    """The bot takes its lease before it logs in; a token Discord refuses (401) ends it with exit
    status 2 and the message about DISCORD_TOKEN, and the lease is released: the bot started with
    the right token runs at once."""
    from bot.launcher import BOT_LEASE
    from tests.test_bot_ops import GOOD_TOKEN, BotProcess, bot_config, sqlite_queue

    async with FakeDiscord() as fd, sqlite_queue(tmp_path) as queue:
        assert GOOD_TOKEN != fd.bot_token   # well formed, but not this bot's
        code, log = await BotProcess(fd, tmp_path, bot_config(tmp_path), env={"DISCORD_TOKEN": GOOD_TOKEN}).run_out(60)
        assert code == 2, f"exit status {code}:\n{log}"
        assert [r.status for r in fd.find_requests("GET", "/users/@me")] == [401]   # it got as far as the login
        assert await queue.hold_lease(BOT_LEASE, "the-next-bot", 60) is None, log   # free: taken at once
    ours = [line for line in log.splitlines() if line.startswith("imagine-bot:")]
    assert ours == ["imagine-bot: Discord rejected the token in DISCORD_TOKEN; copy it again from the "
                    "Developer Portal (Bot > Reset Token)"], log
    assert "bot lease" not in log and GOOD_TOKEN not in log, log


# A bot lease of 6 s, renewed every 2 s.
LEASE_OF_6_S = "import bot.launcher as launcher\nlauncher.BOT_LEASE_TTL = 6.0\n"


def quick_failing_store(config: str) -> str:
    """`config`'s SQLite queue with writes that wait 0.2 s for another process's write lock, then fail."""
    return config.replace('/q.db"', '/q.db?busy_timeout=0.2"', 1)


async def _next_renewal(con: sqlite3.Connection, timeout: float = 10.0) -> None:
    """Until the bot lease's row says it was renewed again."""
    def renewed() -> float:
        return con.execute("SELECT renewed FROM leases WHERE name = 'bot'").fetchone()[0]

    deadline, last = time.monotonic() + timeout, renewed()
    while renewed() == last:
        assert time.monotonic() < deadline, "no renewal of the bot lease"
        await asyncio.sleep(0.01)


async def test_a_bot_whose_store_fails_for_a_while_runs_on_and_says_when_its_lease_renews_again(tmp_path):
    """A store that fails (here: another process holds the SQLite write lock; the bot's writes give
    up after 0.2 s) makes the lease's renewals fail, each a WARNING; the bot runs on. When renewals
    work again that is said once, at INFO, with how long there was none: within the lease's ttl, or
    longer (it had lapsed, and this bot took it back: no other bot had taken it). Ordinary renewals
    say nothing."""
    from tests.test_bot_ops import BotProcess, bot_config
    from tests.test_ops import assert_exits

    async with FakeDiscord() as fd:
        bot = BotProcess(fd, tmp_path, quick_failing_store(bot_config(tmp_path)), prelude=LEASE_OF_6_S)
        try:
            await bot.wait_log("gateway shard 0/1 ready")
            con = sqlite3.connect(str(tmp_path / "q.db"), timeout=30, isolation_level=None)
            try:
                # One renewal fails: locked just after one, for 3 s (the next tries come 2 s and 4.2 s later).
                await _next_renewal(con)
                con.execute("BEGIN EXCLUSIVE")
                await asyncio.sleep(3)
                con.execute("ROLLBACK")
                await bot.wait_log("renewing this store's bot lease works again", timeout=10)
                # Then 7.5 s without a renewal: longer than the lease.
                con.execute("BEGIN EXCLUSIVE")
                await asyncio.sleep(7.5)
                con.execute("ROLLBACK")
                await bot.wait_log("this bot took it back", timeout=10)
                await asyncio.sleep(4.5)   # two ordinary renewals
                (holder,) = con.execute("SELECT holder FROM leases WHERE name = 'bot'").fetchone()
                assert holder.startswith(f"{socket.gethostname()}-{bot.proc.pid}-"), holder
            finally:
                con.close()
            await assert_exits(bot.proc, bot.log, 0, within=30, send=signal.SIGTERM)
        finally:
            bot.kill()
    log = bot.log()
    lines = [line for line in log.splitlines() if "bot lease" in line]
    failed = [line for line in lines if "[WARNING ] bot.launcher: could not renew this store's bot lease "
              "(OperationalError: database is locked); trying again in 2 s" in line]
    # One failed renewal, the line saying they work again; three or four failed, the line saying the
    # lease was taken back; nothing else (the ordinary renewals).
    assert len(lines) >= 6 and lines[0] in failed and set(lines[2:-1]) <= set(failed), log
    assert "[INFO    ] bot.launcher: renewing this store's bot lease works again after " in lines[1], log
    assert " s without a renewal (1 failed try, within its 6 s ttl)" in lines[1], log
    assert "[INFO    ] bot.launcher: renewed this store's bot lease again after " in lines[-1], log
    assert f" s without a renewal ({len(lines) - 3} failed tries, longer than its 6 s ttl): it had lapsed, no " \
           "other bot had taken it, and this bot took it back" in lines[-1], log
    assert "ERROR" not in log and "Traceback" not in log, log


async def test_a_bot_that_never_held_the_lease_does_not_say_that_the_next_bot_waits_for_it(tmp_path):
    """A bot that waited for another bot's lease, and whose store then failed (the write lock held
    past its busy_timeout), stops with the one line about the store; its release of the lease fails
    too, but it never had the lease: "the next bot waits up to 60 s for it to lapse" would be false."""
    from bot.launcher import BOT_LEASE
    from tests.test_bot_ops import BotProcess, bot_config, sqlite_queue

    async with FakeDiscord() as fd, sqlite_queue(tmp_path) as queue:
        assert await queue.hold_lease(BOT_LEASE, "elsewhere-1-cafe", 60) is None   # another bot's
        bot = BotProcess(fd, tmp_path, quick_failing_store(bot_config(tmp_path)))
        try:
            await bot.wait_log("another bot holds this store's bot lease")
            con = sqlite3.connect(str(tmp_path / "q.db"), timeout=30, isolation_level=None)
            try:
                con.execute("BEGIN EXCLUSIVE")   # held until the bot has exited: its release fails too
                code = await bot.wait_exit(15)
            finally:
                con.close()
        finally:
            bot.kill()
        assert (await queue.hold_lease(BOT_LEASE, "probe", 60))["holder"] == "elsewhere-1-cafe"
    log = bot.log()
    assert code == 1, f"exit status {code} (None: still running):\n{log}"
    ours = [line for line in log.splitlines() if line.startswith("imagine-bot:")]
    assert ours == [f"imagine-bot: cannot take the bot lease on the queue sqlite:///{tmp_path}/q.db?busy_timeout=0.2: "
                    "database is locked; check that no other process holds the file locked"], log
    assert "could not release" not in log and "Traceback" not in log, log
