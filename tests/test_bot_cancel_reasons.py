"""Why a job was cancelled: a refused word added while it waits or runs cancels it, and its public
reply says who or what cancelled it (never the refused word); admins' actions are logged."""

from __future__ import annotations

import json
import logging
import time

import pytest

from bot import moderation, render
from engine.jobs import CLEARED, EventKind, JobEvent, JobRecord, JobSpec, JobState
from tests.fakediscord import Permission
from tests.test_bot_privacy import _private_channel
from tests.test_bot_support import (  # noqa: F401 - the fixture
    claim_jobs, ephemeral_answer, finish_jobs, harness, private_answer, tiny_png,
)

BANNED = "Cancelled: its prompt matches a word or pattern this server's admins refuse."
WORD = "zorblax"   # a banned word no text of the bot's has in it
MANAGE_GUILD = 1 << 5


async def _queue(h, prompt, *, user=None, guild_id=None, channel_id=None) -> str:
    inter = await h.fd.send_slash_command("imagine", {"prompt": prompt}, user=user, guild_id=guild_id,
                                          channel_id=channel_id)
    await h.fd.wait_for_response(inter)
    return h.job_id(await h.reply_of(inter))


def _public_text(msg) -> str:
    """All the channel sees of a message in text: its content, its embeds, its files' names."""
    return "\n".join([msg.content, json.dumps(msg.embeds), *(a["filename"] for a in msg.attachments)])


async def _frame(h, job_id: str, iteration: int) -> None:
    await h.queue.publish(JobEvent(job_id, EventKind.PROGRESS, iteration=iteration, total=4, similarity=0.1,
                                   frame_png=tiny_png(1 + iteration, 1)))
    await h.fd.wait_for(lambda: f"Iteration {iteration}/4" in _reply(h, job_id).content, 5, f"frame {iteration}")


def _reply(h, job_id: str):
    """The public reply that shows `job_id` (a set's jobs each have their own)."""
    (msg,) = [m for m in h.fd.messages.values() if not m.ephemeral and f"job `{job_id}`" in m.content]
    return msg


async def finish_as_an_older_worker(h, job_id: str) -> None:
    """What `finish` of a worker of an earlier version wrote for a running job whose cancel was
    asked: DONE, the request and its reason left on the record (the store now ends it CANCELLED).
    The row alone, in the harness's SQLite store, without its DONE event: the bot's reconcile finds
    the result all the same."""
    await h.write_store(lambda db: db.execute(
        "UPDATE jobs SET state = 'done', finished_at = ?, similarity = 0.2, lease_id = NULL,"
        " lease_until = NULL WHERE id = ? AND state = 'running'", (time.time(), job_id)))


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

    text = await ephemeral_answer(h, "queue-admin ban-word add", {"entry": "cat"}, user=fd.admin_user)
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
    text = await ephemeral_answer(h, "queue-admin ban-word add", {"entry": "re:black"}, user=fd.admin_user)
    assert "No queued or running job of this server matches it." in text, text
    logged = [r.getMessage() for r in caplog.records if r.name == "bot.moderation" and r.levelno == logging.INFO]
    admin_id, guild = fd.admin_user["id"], fd.guild_id
    assert any(str(admin_id) in m and "'cat'" in m and str(guild) in m and "added" in m for m in logged), logged
    assert any(running in m and waiting in m for m in logged), logged

    await ephemeral_answer(h, "queue-admin ban-word remove", {"entry": "cat"}, user=fd.admin_user)
    logged = [r.getMessage() for r in caplog.records if r.name == "bot.moderation" and r.levelno == logging.INFO]
    assert any(str(admin_id) in m and "'cat'" in m and str(guild) in m and "removed" in m for m in logged), logged
    fd.assert_clean()


@pytest.mark.asyncio
async def test_a_cancelled_reply_says_who_cancelled_it(harness, caplog):
    """Its author: "Cancelled."; an admin, by the Cancel button or /queue cancel: "Cancelled by an
    admin."; /queue-admin clear: the server's queue was cleared. Each cancel is logged with who asked."""
    caplog.set_level(logging.INFO, logger="bot")
    h = harness
    fd = h.fd
    await h.start(worker=False)
    by_author, by_button, by_command, cleared = [await _queue(h, f"a house, take {n}") for n in range(4)]
    admin = fd.admin_user

    assert await ephemeral_answer(h, "queue cancel", {"job": by_author}) == f"Cancelled job `{by_author}`."
    msg = next(m for m in fd.messages.values() if f"job `{by_button}`" in m.content)
    click = await fd.click_button(msg, f"imagine:cancel:{by_button}", user=admin)
    assert await private_answer(h, click) == f"Cancelled job `{by_button}`."
    assert await ephemeral_answer(h, "queue cancel", {"job": by_command}, user=admin) == f"Cancelled job `{by_command}`."
    await ephemeral_answer(h, "queue-admin clear", {}, user=admin)

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


def test_the_cancelled_status_names_the_reason_and_shows_one_it_does_not_know_as_a_plain_cancel():
    """A reason the bot does not know is not why the job was cancelled: before cancels stored their
    reason, a cancel kept an earlier attempt's failure in `error`."""
    record = JobRecord(id="abc", spec=JobSpec(prompt="a cat", user_id=5), state=JobState.CANCELLED)
    for reason, status in [(None, "Cancelled."), ("", "Cancelled."), (render.CANCEL_BY_ADMIN, "Cancelled by an admin."),
                           (CLEARED, "Cancelled: the server's queue was cleared."), (render.CANCEL_BANNED, BANNED),
                           ("RuntimeError: CUDA error: an illegal memory access", "Cancelled."),
                           ("stopped by **the owner** https://x.example", "Cancelled.")]:
        record.error = reason
        assert render.final_text(record).split("\n")[1] == status, reason


def test_a_failed_reply_says_what_the_failure_means_not_the_workers_exception():
    """The worker stores its exception for the operator (`OutOfMemoryError: ... Process 48211 has
    22.44 GiB in use`, a CUDA error's lines of debugging advice, operator instructions); the public
    reply said all of it. It says what happened and what to do; a reason of the input stays."""
    record = JobRecord(id="abc", spec=JobSpec(prompt="a cat", user_id=5), state=JobState.FAILED)
    for reason, status in [
        ("OutOfMemoryError: CUDA out of memory. Tried to allocate 4.00 GiB. Process 48211 has 22.44 GiB",
         "Failed: the GPU ran out of memory. Reroll it later, or pick a smaller size."),
        ("GpuThreadDied: the worker's GPU thread died: RuntimeError: CUDA error: an illegal memory access\n"
         "For debugging consider passing CUDA_LAUNCH_BLOCKING=1", "Failed: the GPU failed while running it. Reroll it."),
        ("NonFiniteError: non-finite values at iteration 40 with fp16 precision",
         "Failed: the picture's numbers overflowed. Reroll it (a new seed)."),
        ("worker lost 3 times", "Failed: its worker stopped 3 times while running it. Reroll it."),
        ("KeyError: 'logits'", "Failed: an error on the GPU worker (KeyError). Reroll it; if it fails again, tell an "
                               "admin (the worker's log has the details)."),
        ("the prompt is empty: describe the picture you want",
         "Failed: the prompt is empty: describe the picture you want"),
        (None, "Failed: unknown error."),
    ]:
        record.error = reason
        assert render.final_text(record).split("\n")[1] == status, reason


def test_a_failure_is_read_as_the_workers_or_the_inputs_by_its_stored_form_not_its_words():
    """The worker stores an exception as `Class: message` whatever its class is called (struct's
    `error`, zipfile's `BadZipFile`, a bare `StopIteration:`), and an input's reason as a sentence
    that may quote the prompt ("out of memory" in it is the user's words, not the GPU's)."""
    for reason, kind, said in [
        ("error: unpack requires a buffer of 4 bytes", render.FAILURE_WORKER, "(error)"),
        ("BadZipFile: File is not a zip file", render.FAILURE_WORKER, "(BadZipFile)"),
        ("StopIteration:", render.FAILURE_WORKER, "(StopIteration)"),
        ("binascii.Error: Incorrect padding", render.FAILURE_WORKER, "(binascii.Error)"),
        ("the part 'out of memory: CUDA error' has no words CLIP reads", render.FAILURE_INPUT,
         "the part 'out of memory: CUDA error' has no words CLIP reads"),
        ("this worker has no dVAE encoder, so it cannot start from an init image", render.FAILURE_WORKER,
         "no worker that can start from an init image"),
        ("worker lost 1 time", render.FAILURE_LOST, "its worker stopped once"),
        ("  ", render.FAILURE_NONE, "unknown error."),
    ]:
        failure = render.classify_failure(reason)
        assert (failure.kind, said in failure.said) == (kind, True), (reason, failure)
        assert render.failure_reason(reason) == failure.said


def test_the_admins_answer_fits_discord_however_many_jobs_were_cancelled():
    ids = [f"{n:012x}" for n in range(400)]
    head = "x" * 420   # the "Added the …" line with a 200-character entry, and more
    line = moderation._cancelled_line(ids, render.CONTENT_LIMIT - len(head) - 1)
    assert len(head) + 1 + len(line) <= render.CONTENT_LIMIT
    shown = [j for j in ids if f"`{j}`" in line]
    assert shown == ids[:len(shown)] and len(shown) > 50
    assert line.startswith("Cancelled 400 of this server's") and line.endswith(f"…and {400 - len(shown)} more.")
    assert moderation._cancelled_line(ids[:2], 1900).endswith(f"`{ids[0]}`, `{ids[1]}`.")
    # Jobs of channels the admin cannot see are counted, never named.
    line = moderation._cancelled_line(ids, render.CONTENT_LIMIT - len(head) - 1, hidden=7)
    assert len(head) + 1 + len(line) <= render.CONTENT_LIMIT
    assert line.startswith("Cancelled 407 of this server's") and line.endswith("more, and 7 in channels you cannot see.")
    assert moderation._cancelled_line([], 1900, hidden=1).endswith("check): 1 in a channel you cannot see.")


@pytest.mark.asyncio
async def test_a_banned_cancel_shows_no_prompt_and_a_job_finished_before_it_saw_the_cancel_is_posted_as_one(harness):
    """The reply of a job cancelled for a banned word shows neither its prompt nor the lines that
    quote it (what CLIP ignores of it), and a running job's frames after the request neither. A
    running job whose worker finishes it before it sees the request ends CANCELLED all the same (the
    store's finish), its final stored: it is posted as the cancel the admin was told of, without its
    picture or video."""
    h = harness
    fd = h.fd
    await h.start(worker=False)
    running = await _queue(h, f"a {WORD} at dawn")
    await claim_jobs(h.queue, [running])
    await _frame(h, running, 1)
    assert WORD in _reply(h, running).content
    waiting = await _queue(h, " ".join(["red"] * 80) + f" {WORD}")   # past CLIP's 77 tokens: a note quotes it
    assert any(line.startswith("-# ✂") and WORD in line for line in _reply(h, waiting).content.split("\n"))

    text = await ephemeral_answer(h, "queue-admin ban-word add", {"entry": WORD}, user=fd.admin_user)
    assert f"`{running}`" in text and f"`{waiting}`" in text, text
    # The running job's reply is redrawn without its prompt at once, and so is its next frame.
    await fd.wait_for(lambda: _reply(h, running).content.startswith(render.PROMPT_WITHHELD), 5, "the prompt withheld")
    await _frame(h, running, 2)
    assert WORD not in _public_text(_reply(h, running)) and _reply(h, running).attachments   # the frame, still

    # Its worker finishes it before it sees the request (the store's own calls, as a worker makes them).
    await finish_jobs(h.queue, [running])
    record = await h.wait_delivered(running)
    assert (record.state, record.error, record.cancel_requested) == (JobState.CANCELLED, render.CANCEL_BANNED, True)
    assert await h.queue.has_artifact(running, "final.png")
    for job_id in (running, waiting):
        assert await _status(h, job_id) == BANNED   # delivered, no file on it
        msg = _reply(h, job_id)
        assert msg.content.startswith(render.PROMPT_WITHHELD + "\n") and WORD not in _public_text(msg), msg.content
        assert msg.custom_ids == []   # nothing may start from it (bot.imagine.withheld_refusal)
    assert not [r for r in fd.requests if any(f.filename in ("final.png", "video.mp4") for f in r.files)]
    assert not [m for m in fd.channel_messages() if WORD in _public_text(m)]
    fd.assert_clean()


@pytest.mark.asyncio
async def test_a_banned_cancel_finished_done_by_an_older_worker_is_posted_as_the_cancel(harness):
    """A worker not yet upgraded (or a record it finished before the upgrade, not yet posted) ended
    the banned job DONE, the request on its record: the bot still posts it as the cancel, without
    its picture or video (bot.progress)."""
    h = harness
    fd = h.fd
    await h.start(worker=False)
    running = await _queue(h, f"a {WORD} at dawn")
    await claim_jobs(h.queue, [running])
    text = await ephemeral_answer(h, "queue-admin ban-word add", {"entry": WORD}, user=fd.admin_user)
    assert f"`{running}`" in text, text
    await h.queue.put_artifact(running, "final.png", tiny_png(9, 9))
    await h.queue.put_artifact(running, "video.mp4", b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 64)
    await finish_as_an_older_worker(h, running)

    record = await h.wait_delivered(running)
    assert (record.state, record.error, record.cancel_requested) == (JobState.DONE, render.CANCEL_BANNED, True)
    assert await _status(h, running) == BANNED   # no file on it
    msg = _reply(h, running)
    assert msg.content.startswith(render.PROMPT_WITHHELD + "\n") and msg.custom_ids == [], msg.content
    assert not [r for r in fd.requests if any(f.filename in ("final.png", "video.mp4") for f in r.files)]
    assert not [m for m in fd.channel_messages() if WORD in _public_text(m)]
    fd.assert_clean()


@pytest.mark.asyncio
async def test_a_running_job_its_author_cancelled_that_a_new_banned_word_matches_ends_withheld(harness):
    """Its author asked to stop it (no reason), then an admin bans a word of its prompt before its
    worker stops: the banned word's reason replaces the author's, so its reply withholds the prompt
    from then on and at its end, as any banned cancel's does; the admin's answer names it."""
    h = harness
    fd = h.fd
    await h.start(worker=False)
    running = await _queue(h, f"a {WORD} at noon")
    await claim_jobs(h.queue, [running])
    await _frame(h, running, 1)
    assert await ephemeral_answer(h, "queue cancel", {"job": running}) == f"Stopping job `{running}`…"
    record = await h.queue.get(running)
    assert (record.state, record.cancel_requested, record.error) == (JobState.RUNNING, True, None)

    text = await ephemeral_answer(h, "queue-admin ban-word add", {"entry": WORD}, user=fd.admin_user)
    assert f"`{running}`" in text, text
    await fd.wait_for(lambda: _reply(h, running).content.startswith(render.PROMPT_WITHHELD), 5, "the prompt withheld")
    await h.queue.mark_cancelled(running, record.lease_id)   # its worker sees the request

    record = await h.wait_delivered(running)
    assert (record.state, record.error) == (JobState.CANCELLED, render.CANCEL_BANNED)
    assert await _status(h, running) == BANNED
    msg = _reply(h, running)
    assert msg.content.startswith(render.PROMPT_WITHHELD + "\n") and WORD not in _public_text(msg), msg.content
    assert not [m for m in fd.channel_messages() if WORD in _public_text(m)]
    fd.assert_clean()


@pytest.mark.asyncio
async def test_the_admins_answer_names_only_the_cancelled_jobs_of_channels_they_can_see(harness):
    """Manage Server does not show every channel. A job of a channel hidden from the admin is
    cancelled too, but only counted: its id would tell them that a prompt there matches what they
    added (a pattern at a time, the channel's prompts read back)."""
    h = harness
    fd = h.fd
    dave = fd.add_user("dave")   # an admin by Manage Server, who cannot see #staff-only
    staff = _private_channel(fd)
    await h.start(worker=False)
    hidden = await _queue(h, f"the {WORD} merger", user=fd.admin_user, channel_id=staff)
    shown = await _queue(h, f"an open {WORD} meadow")

    text = await ephemeral_answer(h, "queue-admin ban-word add", {"entry": WORD}, user=dave,
                                  member_permissions=Permission.EVERYONE | MANAGE_GUILD)
    assert text.endswith("Cancelled 2 of this server's queued or running jobs whose prompt matches it (a running one "
                         f"stops at its worker's next check): `{shown}`, and 1 in a channel you cannot see."), text
    assert hidden not in text
    for job_id in (hidden, shown):
        assert (await h.queue.get(job_id)).state == JobState.CANCELLED
    fd.assert_clean()


@pytest.mark.asyncio
async def test_a_job_claimed_or_put_back_in_line_while_the_add_reads_the_line_is_cancelled_once(harness, monkeypatch):
    """The add reads the line twice (queued, then running): a job a worker claims between the reads
    is in both, and one whose run fails and goes back in line between them in neither. Each is
    cancelled, and named, once."""
    h = harness
    await h.start(worker=False)
    back = await _queue(h, f"a {WORD} that fails")
    claimed = await _queue(h, f"a {WORD} about to start")
    await claim_jobs(h.queue, [back])
    real_running = h.queue.running

    async def running_after_a_claim_and_a_failure():
        monkeypatch.setattr(h.queue, "running", real_running)   # this once
        assert (await h.queue.claim("gpu-2")).id == claimed
        lease = (await h.queue.get(back)).lease_id
        assert await h.queue.fail(back, lease, "CUDA out of memory") == JobState.QUEUED
        return await real_running()

    monkeypatch.setattr(h.queue, "running", running_after_a_claim_and_a_failure)
    text = await ephemeral_answer(h, "queue-admin ban-word add", {"entry": WORD}, user=h.fd.admin_user)
    assert "Cancelled 2 of this server's" in text, text
    assert text.count(f"`{claimed}`") == 1 and text.count(f"`{back}`") == 1, text
    assert (await h.queue.get(back)).state == JobState.CANCELLED
    record = await h.queue.get(claimed)
    assert record.state == JobState.RUNNING and record.cancel_requested
    h.fd.assert_clean()


async def test_history_withholds_the_prompt_of_a_finished_job_that_a_word_added_since_matches(harness):
    """Adding a refused word cancels the jobs still in line or running; a finished one keeps its
    record, and /history listed its prompt (the word itself) to anyone in the channel."""
    h = harness
    await h.start(worker=False)
    refused, kept = await _queue(h, f"a {WORD} tower"), await _queue(h, "a quiet lake")
    for job_id in (refused, kept):
        await claim_jobs(h.queue, [job_id])
        await finish_jobs(h.queue, [job_id])
        await h.wait_delivered(job_id)
    await h.queue.set_setting(moderation.setting_key(h.fd.guild_id), [WORD])
    text = await ephemeral_answer(h, "history")
    lines = text.splitlines()
    assert WORD not in text and len(lines) == 2, text
    assert lines[0].startswith("• a quiet lake") and lines[1].startswith(f"• {render.PROMPT_WITHHELD}"), text
    assert f"`{refused}`" in lines[1]


async def test_adding_a_word_cancels_a_waiting_remix_whose_parents_prompt_it_matches(harness):
    """A remix's replies quote its parent's prompt (↳ remix of `A` *a zorblax lighthouse*), and a
    Reroll of it is refused once that prompt is: the add left it waiting, then running, its reply
    showing the refused words until its result (withheld) came."""
    from tests.test_bot_support import finished_job

    h = harness
    fd = h.fd
    await h.start(worker=False)
    _, parent = await finished_job(h, f"a {WORD} lighthouse")
    inter = await fd.send_slash_command("remix", {"job": parent, "prompt": "a calm sea"})
    await fd.wait_for_response(inter)
    remix = h.job_id(await h.reply_of(inter))
    other = await _queue(h, "a quiet lake")
    text = await ephemeral_answer(h, "queue-admin ban-word add", {"entry": WORD}, user=fd.admin_user)
    assert f"`{remix}`" in text and f"`{other}`" not in text, text
    record = await h.wait_delivered(remix)
    assert (record.state, record.error) == (JobState.CANCELLED, render.CANCEL_BANNED)
    assert await _status(h, remix) == BANNED
    assert WORD not in _public_text(_reply(h, remix))
    assert (await h.queue.get(other)).state == JobState.QUEUED
    fd.assert_clean()
