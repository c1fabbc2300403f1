"""What /queue reaches across servers for a job's author, and what the bot does when a server
removes it.

A job waiting in a server that paused its jobs counts against its author's cap in every server
(the store counts per person): the author sees it in `/queue show` from any server (their own jobs
of other servers first, with ids) and cancels it with `/queue cancel` from there. A server that
removes the bot has its jobs cancelled (their results could never be posted); one that is only
unavailable (an outage) keeps them. Also: `/queue show`'s pages, `/queue-admin limit`'s range, and the
admins' actions in the log.

Two guilds of the fake: A (the primary one) and B. Alice is the application's owner and an admin of
both; Carol is an admin of B only; Bob is a plain member of both.
"""

from __future__ import annotations

import asyncio
import logging
import re

import pytest

from bot.queue_admin import CONTENT_LIMIT, show_text
from engine.jobs import JobRecord, JobSpec, JobState, places_in_line
from tests.test_bot_admin_servers import _queue, _two_servers
from tests.test_bot_support import ephemeral_answer, harness  # noqa: F401 - the fixture

pytestmark = pytest.mark.asyncio

ID_RE = re.compile(r"`([0-9a-f]{12})`")


async def _log_line(caplog, pattern: str, timeout: float = 10.0) -> str:
    """The first log message matching `pattern`, once the bot has written it (an event's handler
    runs in its own task: its INFO line is the last thing it does)."""
    rx = re.compile(pattern)
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        found = [r.getMessage() for r in caplog.records if rx.search(r.getMessage())]
        if found:
            return found[0]
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"no log line matching {pattern!r}: {[r.getMessage() for r in caplog.records]}")
        await asyncio.sleep(0.02)


async def test_an_author_sees_and_cancels_their_jobs_of_a_paused_server_from_another(harness):
    """Server A is paused; Bob's five jobs there (his cap) can never start. In B he is refused, told
    where to look; `/queue show` in B lists them first, with ids and why they wait, and cancels one
    from B; then he may queue in B. Carol (B's admin) neither sees nor cancels them from B."""
    h = harness
    a, b, carol = await _two_servers(h)
    fd = h.fd
    bob, alice = fd.member_user, fd.admin_user
    await ephemeral_answer(h, "queue-admin pause", guild_id=a, user=alice)
    ids = [await _queue(h, f"night job {i}", user=bob, guild_id=a) for i in range(5)]
    b_carol = await _queue(h, "banana", user=carol, guild_id=b)

    text = await ephemeral_answer(h, "imagine", {"prompt": "hello from b"}, guild_id=b, user=bob)
    assert "You already have 5 jobs waiting" in text
    assert "`/queue show` lists yours" in text and "`/queue cancel job:` works from any server" in text

    text = await ephemeral_answer(h, "queue show", guild_id=b, user=bob)
    lines = text.splitlines()
    line = await h.queue.queued()   # the shared line, in claim order: A's paused jobs count for A's only
    place = dict(zip((r.id for r in line), places_in_line([r.spec.guild_id for r in line], {a})))
    assert place[b_carol] == 1   # the workers take B's first
    for n, job_id in enumerate(ids):   # first, in line order, each with its place and why it waits
        assert lines[n] == (f"**#{place[job_id]}** `{job_id}` night job {n} · yours, "
                            "in another server (its server's jobs are paused)"), text
    assert lines[5] == f"**#{place[b_carol]}** `{b_carol}` banana · <@{carol['id']}>"   # then B's own
    assert "Not shown" not in text and "`/queue cancel` takes their ids here too" in text
    assert len(text) <= CONTENT_LIMIT

    # Carol in B: Bob's jobs of A are his; to her they are A's, counted, never described.
    text = await ephemeral_answer(h, "queue show", guild_id=b, user=carol)
    assert not any(job_id in text for job_id in ids) and "night" not in text
    assert "Not shown: 5 waiting jobs of other servers." in text
    unknown = await ephemeral_answer(h, "queue cancel", {"job": ids[1]}, guild_id=b, user=carol)
    assert unknown == f"There is no job `{ids[1]}` in this server; see `/queue show` for the ids."

    assert await ephemeral_answer(h, "queue cancel", {"job": ids[0]}, guild_id=b, user=bob) == (
        f"Cancelled job `{ids[0]}`.")
    assert [(await h.queue.get(i)).state for i in ids] == [JobState.CANCELLED] + [JobState.QUEUED] * 4
    await _queue(h, "hello from b", user=bob, guild_id=b)   # under his cap again
    fd.assert_clean()


async def test_removing_the_bot_from_a_server_cancels_its_jobs(harness, caplog):
    """GUILD_DELETE (the bot kicked): A's waiting jobs are cancelled, its running one asked to stop,
    one INFO line says so; B's jobs are untouched."""
    caplog.set_level(logging.INFO, logger="bot.queue_admin")
    h = harness
    a, b, carol = await _two_servers(h)
    fd = h.fd
    bob = fd.member_user
    a_running = await _queue(h, "apple running", user=bob, guild_id=a)
    assert (await h.queue.claim("test-gpu")).id == a_running
    b_running = await _queue(h, "banana running", user=carol, guild_id=b)
    assert (await h.queue.claim("test-gpu")).id == b_running
    a_waiting = [await _queue(h, f"apricot {i}", user=bob, guild_id=a) for i in range(2)]
    b_waiting = await _queue(h, "blueberry", user=bob, guild_id=b)

    await fd.dispatch("GUILD_DELETE", {"id": str(a)}, guild_id=a)
    line = await _log_line(caplog, rf"removed from server {a}:")
    assert line == f"removed from server {a}: 2 waiting jobs cancelled, 1 running jobs asked to stop"
    assert [(await h.queue.get(j)).state for j in a_waiting] == [JobState.CANCELLED] * 2
    assert (await h.queue.get(a_running)).cancel_requested is True
    assert (await h.queue.get(b_waiting)).state == JobState.QUEUED
    assert (await h.queue.get(b_running)).cancel_requested is False
    assert await h.queue.count_queued(int(bob["id"])) == 1


async def test_an_outage_keeps_the_servers_jobs(harness, caplog):
    """GUILD_DELETE with `unavailable` (a Discord outage): the server comes back, its jobs must wait."""
    caplog.set_level(logging.INFO, logger="bot.queue_admin")
    h = harness
    a, b, carol = await _two_servers(h)
    fd = h.fd
    job = await _queue(h, "apple", user=fd.member_user, guild_id=a)
    await fd.dispatch("GUILD_DELETE", {"id": str(a), "unavailable": True}, guild_id=a)
    # Then a real removal of B: events are handled in order, so once B's line is logged, A's
    # outage has been handled too.
    await fd.dispatch("GUILD_DELETE", {"id": str(b)}, guild_id=b)
    await _log_line(caplog, rf"removed from server {b}:")
    assert h.bot.get_guild(a).unavailable
    assert (await h.queue.get(job)).state == JobState.QUEUED
    assert not [r for r in caplog.records if f"removed from server {a}" in r.getMessage()]


async def test_show_pages_through_a_long_line(harness):
    h = harness
    h.config.queue.max_queued_per_user = 100
    await h.start(worker=False)
    fd = h.fd
    ids = [await _queue(h, f"job number {i}", user=fd.member_user, guild_id=fd.guild_id) for i in range(26)]

    first = await ephemeral_answer(h, "queue show", user=fd.admin_user)
    assert ID_RE.findall(first) == ids[:20]
    assert "…and 6 more of this server.\n-# Page 1 of 2: `/queue show page:2` for the next." in first
    second = await ephemeral_answer(h, "queue show", {"page": 2}, user=fd.admin_user)
    assert ID_RE.findall(second) == ids[20:]
    assert "-# Page 2 of 2." in second and "more" not in second
    assert f"**#21** `{ids[20]}` job number 20" in second   # places count the whole line
    past = await ephemeral_answer(h, "queue show", {"page": 9}, user=fd.admin_user)
    assert ID_RE.findall(past) == ids[20:] and "-# Page 2 of 2 (there is no page 9 now)." in past
    # Discord enforces the option's minimum (synced as min_value); a value that arrives anyway:
    assert await ephemeral_answer(h, "queue show", {"page": 0}) == "`page` must be 1 or more (you gave 0)."
    fd.assert_clean()


def _record(job_id, guild_id, user_id, prompt):
    return JobRecord(id=job_id, spec=JobSpec(prompt=prompt, user_id=user_id, guild_id=guild_id, iterations=10),
                     state=JobState.QUEUED)


async def test_pages_of_long_prompts_stay_under_discords_limit_and_cover_every_job():
    """Long prompts fit fewer than 20 jobs a page: every page stays under 2000 characters, and the
    pages together list every job once, in order (the caller's own of other servers first)."""
    line = [_record(f"{i:012x}", 1, 7, "y" * 300 + "*_`~|>") for i in range(45)]
    line += [_record(f"{100 + i:012x}", 2, 8, "z" * 300) for i in range(6)]   # the caller's, in server 2
    pages, page = [], 1
    while True:
        text = show_text([], line, 1, 8, paused=True, server_paused=True, limit=100, page=page,
                         paused_servers={2})
        assert len(text) <= CONTENT_LIMIT
        pages.append(ID_RE.findall(text))
        if ": `/queue show page:" not in text:
            break
        page += 1
    assert f"-# Page {page} of {page}." in text and page > 3
    assert [i for p in pages for i in p] == [r.id for r in line[45:]] + [r.id for r in line[:45]]


async def test_limit_and_page_options_carry_their_bounds(harness):
    """The bounds the code enforces are synced as the options' min and max; a value out of them that
    arrives anyway is refused as before and changes nothing."""
    h = harness
    await h.start(worker=False)
    fd = h.fd
    options = {sub["name"]: {o["name"]: o for o in sub.get("options", [])}
               for group in h.bot.tree.get_commands() if group.name in ("queue", "queue-admin")
               for sub in group.to_dict(h.bot.tree)["options"]}
    assert (options["limit"]["n"]["min_value"], options["limit"]["n"]["max_value"]) == (1, 100)
    assert options["show"]["page"]["min_value"] == 1 and not options["show"]["page"]["required"]
    for n in (0, 101):
        text = await ephemeral_answer(h, "queue-admin limit", {"n": n}, user=fd.admin_user)
        assert text == f"`n` must be between 1 and 100 (you gave {n})."
    assert await h.bot.user_limit(fd.guild_id) == 5
    fd.assert_clean()


async def test_admin_actions_are_logged_with_who_where_and_what(harness, caplog):
    caplog.set_level(logging.DEBUG)
    h = harness
    await h.start(worker=False)
    fd = h.fd
    alice, bob, g = fd.admin_user, fd.member_user, fd.guild_id
    bobs = [await _queue(h, f"bob's {i}", user=bob, guild_id=g) for i in range(3)]
    await ephemeral_answer(h, "queue cancel", {"job": bobs[2]})   # Bob's own: no admin action
    caplog.clear()
    await ephemeral_answer(h, "queue cancel", {"job": bobs[0]}, user=alice)
    await ephemeral_answer(h, "queue-admin clear", user=alice)
    await ephemeral_answer(h, "queue-admin pause", user=alice)
    await ephemeral_answer(h, "queue-admin resume", user=alice)
    await ephemeral_answer(h, "queue-admin limit", {"n": 3}, user=alice)
    await ephemeral_answer(h, "queue-admin pause", {"everywhere": True}, user=alice)
    who = f"admin {alice['id']} ('{alice['username']}') in server {g}: "
    cancels = [r.getMessage() for r in caplog.records if r.name == "bot.imagine" and "cancels job" in r.getMessage()]
    assert cancels == [f"user {alice['id']} ('{alice['username']}') in server {g} cancels job {bobs[0]} (queued) "
                       f"of user {bob['id']} (not its author; reason 'by an admin')"]
    ours = [r.getMessage() for r in caplog.records if r.name == "bot.queue_admin"]
    assert ours == [who + "clear: 1 queued jobs cancelled", who + "pause", who + "resume",
                    who + "limit set to 3", who + "pause everywhere"]
    assert all(r.levelno == logging.INFO for r in caplog.records if r.name == "bot.queue_admin")
    assert not any(fd.bot_token in r.getMessage() for r in caplog.records)
    fd.assert_clean()
