"""Why a job was cancelled: a refused word added while it waits or runs cancels it, and its public
reply says who or what cancelled it (never the refused word); admins' actions are logged."""

from __future__ import annotations

import logging

import pytest

from bot import moderation, render
from engine.jobs import CLEARED, JobRecord, JobSpec, JobState
from tests.test_bot_support import (  # noqa: F401 - the fixture
    claim_jobs, ephemeral_answer, harness, private_answer,
)

BANNED = "Cancelled: its prompt matches a word this server's admins banned."


async def _queue(h, prompt, *, user=None, guild_id=None) -> str:
    inter = await h.fd.send_slash_command("imagine", {"prompt": prompt}, user=user, guild_id=guild_id)
    await h.fd.wait_for_response(inter)
    return h.job_id(await h.reply_of(inter))


def _reply(h, job_id: str):
    """The public reply that shows `job_id` (a set's jobs each have their own)."""
    (msg,) = [m for m in h.fd.messages.values() if not m.ephemeral and f"job {job_id}`" in m.content]
    return msg


async def _status(h, job_id: str) -> str:
    """The status line of `job_id`'s reply once its result is delivered (no picture on it)."""
    await h.wait_delivered(job_id)
    await h.fd.wait_for(lambda: "Cancelled" in _reply(h, job_id).content, 5, "the cancelled reply")
    assert not _reply(h, job_id).attachments
    return _reply(h, job_id).content.split("\n")[1]


@pytest.mark.asyncio
async def test_adding_a_refused_word_cancels_the_servers_waiting_and_running_jobs_that_match_it(harness, caplog):
    """Jobs queued before the word was added would otherwise run and be posted publicly. Each job
    of a permutation set is checked alone; another server's jobs and jobs that do not match stay."""
    caplog.set_level(logging.INFO, logger="bot")
    h = harness
    fd = h.fd
    other = fd.add_guild("Other Guild")
    carol = fd.add_user("carol", guild_id=other.id)
    await h.start(worker=False)
    running = await _queue(h, "a black cat at night")
    await claim_jobs(h.queue, [running])
    waiting = await _queue(h, "a CAT on a mat")
    kept = await _queue(h, "a concatenated catalog")           # not the whole word
    inter = await fd.send_slash_command("imagine", {"prompt": "a {cat, dog} in a hat"})
    await fd.wait_for(lambda: sum("in a hat" in m.content and "job " in m.content
                                  for m in fd.channel_messages()) == 2, 10, "the set's two replies")
    set_jobs = {r.spec.prompt: r.id for r in await h.queue.queued() if "in a hat" in r.spec.prompt}
    elsewhere = await _queue(h, "a cat in another server", user=carol, guild_id=other.id)

    text = await ephemeral_answer(h, "queue ban-word add", {"entry": "cat"}, user=fd.admin_user)
    assert text.startswith("Added the word `cat`"), text
    cancelled = [running, waiting, set_jobs["a cat in a hat"]]
    assert "Cancelled 3 of this server's queued or running jobs" in text, text
    assert all(f"`{j}`" in text for j in cancelled), text
    assert not any(j in text for j in (kept, set_jobs["a dog in a hat"], elsewhere)), text

    for job_id in (waiting, set_jobs["a cat in a hat"]):
        record = await h.queue.get(job_id)
        assert (record.state, record.error) == (JobState.CANCELLED, render.CANCEL_BANNED)
        assert await _status(h, job_id) == BANNED
    for job_id in (kept, set_jobs["a dog in a hat"], elsewhere):
        assert (await h.queue.get(job_id)).state == JobState.QUEUED
    # The running job is asked to stop; its worker ends it, and the reason stays.
    record = await h.queue.get(running)
    assert record.state == JobState.RUNNING and record.cancel_requested
    await h.queue.mark_cancelled(running, record.lease_id)
    assert await _status(h, running) == BANNED

    # Adding another word that matches only jobs already cancelled, or none, says so.
    text = await ephemeral_answer(h, "queue ban-word add", {"entry": "re:black"}, user=fd.admin_user)
    assert "No queued or running job of this server matches it." in text, text
    logged = [r.getMessage() for r in caplog.records if r.name == "bot.moderation" and r.levelno == logging.INFO]
    admin_id, guild = fd.admin_user["id"], fd.guild_id
    assert any(str(admin_id) in m and "'cat'" in m and str(guild) in m and "added" in m for m in logged), logged
    assert any(running in m and waiting in m for m in logged), logged

    await ephemeral_answer(h, "queue ban-word remove", {"entry": "cat"}, user=fd.admin_user)
    logged = [r.getMessage() for r in caplog.records if r.name == "bot.moderation" and r.levelno == logging.INFO]
    assert any(str(admin_id) in m and "'cat'" in m and str(guild) in m and "removed" in m for m in logged), logged
    fd.assert_clean()


@pytest.mark.asyncio
async def test_a_cancelled_reply_says_who_cancelled_it(harness, caplog):
    """Its author: "Cancelled."; an admin, by the Cancel button or /queue cancel: "Cancelled by an
    admin."; /queue clear: the server's queue was cleared. Each cancel is logged with who asked."""
    caplog.set_level(logging.INFO, logger="bot")
    h = harness
    fd = h.fd
    await h.start(worker=False)
    by_author, by_button, by_command, cleared = [await _queue(h, f"a house, take {n}") for n in range(4)]
    admin = fd.admin_user

    assert await ephemeral_answer(h, "queue cancel", {"job": by_author}) == f"Cancelled job `{by_author}`."
    msg = next(m for m in fd.messages.values() if f"job {by_button}`" in m.content)
    click = await fd.click_button(msg, f"imagine:cancel:{by_button}", user=admin)
    assert await private_answer(h, click) == f"Cancelled job `{by_button}`."
    assert await ephemeral_answer(h, "queue cancel", {"job": by_command}, user=admin) == f"Cancelled job `{by_command}`."
    await ephemeral_answer(h, "queue clear", {}, user=admin)

    assert await _status(h, by_author) == "Cancelled."
    assert await _status(h, by_button) == "Cancelled by an admin."
    assert await _status(h, by_command) == "Cancelled by an admin."
    assert await _status(h, cleared) == "Cancelled: the server's queue was cleared."
    assert (await h.queue.get(cleared)).error == CLEARED

    logged = [r.getMessage() for r in caplog.records if r.name == "bot.imagine" and "cancels job" in r.getMessage()]
    member_id, admin_id = fd.member_user["id"], admin["id"]
    assert any(str(member_id) in m and by_author in m and "its author" in m and "not its" not in m for m in logged), logged
    for job_id in (by_button, by_command):
        assert any(str(admin_id) in m and job_id in m and "not its author" in m for m in logged), logged
    fd.assert_clean()


def test_the_cancelled_status_names_the_reason_and_escapes_one_it_does_not_know():
    record = JobRecord(id="abc", spec=JobSpec(prompt="a cat", user_id=5), state=JobState.CANCELLED)
    for reason, status in [(None, "Cancelled."), ("", "Cancelled."), (render.CANCEL_BY_ADMIN, "Cancelled by an admin."),
                           (CLEARED, "Cancelled: the server's queue was cleared."), (render.CANCEL_BANNED, BANNED),
                           ("stopped by **the owner** https://x.example",
                            r"Cancelled: stopped by \*\*the owner\*\* https\://x.example")]:
        record.error = reason
        assert render.final_text(record).split("\n")[1] == status, reason


def test_the_admins_answer_fits_discord_however_many_jobs_were_cancelled():
    ids = [f"{n:012x}" for n in range(400)]
    head = "x" * 420   # the "Added the …" line with a 200-character entry, and more
    line = moderation._cancelled_line(ids, render.CONTENT_LIMIT - len(head) - 1)
    assert len(head) + 1 + len(line) <= render.CONTENT_LIMIT
    shown = [j for j in ids if f"`{j}`" in line]
    assert shown == ids[:len(shown)] and len(shown) > 50
    assert line.startswith("Cancelled 400 of this server's") and line.endswith(f"…and {400 - len(shown)} more.")
    assert moderation._cancelled_line(ids[:2], 1900).endswith(f"`{ids[0]}`, `{ids[1]}`.")
