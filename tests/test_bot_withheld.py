"""A job cancelled for a banned word (render.withholds_prompt: CANCELLED, its final stored too when
its worker finished it before it saw the cancel, or ended DONE so by a worker of an earlier version)
is withheld everywhere its reply is: the contact sheet of its
set shows neither its picture nor its caption nor the set's template, /history shows no prompt of
it, and no Reroll, Continue or remix starts a new job from its prompt or its final state. A job
that had finished when the word was added, its result not yet posted, is posted withheld
(render.withheld_text). Such a result, and a banned cancel's, has no buttons: a late restart
still finds its post (by the job it names) and does not post it again."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from bot import contact_sheet, progress, render
from engine.jobs import JobState
from tests.test_bot_cancel_reasons import WORD, _public_text, _queue, _reply, _status, finish_as_an_older_worker
from tests.test_bot_permutations import _png, _rgb, _set_jobs, _sheet_messages
from tests.test_bot_support import (  # noqa: F401 - the fixture
    claim_jobs, ephemeral_answer, harness, queued_job_in_a_thread, requests_matching,
)

pytestmark = pytest.mark.asyncio
# How the banned running job's worker ends it: this version's finish (CANCELLED), or an earlier
# version's (DONE, the request on the record), which the bot still withholds.
by_either_worker = pytest.mark.parametrize("older_worker", [False, True], ids=["finish", "older-worker-finish"])

VIDEO = b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 64


async def _ban(h, *job_ids: str) -> None:
    text = await ephemeral_answer(h, "queue-admin ban-word add", {"entry": WORD}, user=h.fd.admin_user)
    assert all(f"`{j}`" in text for j in job_ids), text


async def _finish(h, job_id: str, png: bytes, older_worker: bool = False) -> None:
    """Its worker's last steps (the store's own calls): the final state, the final, the video, the
    finish (DONE; CANCELLED when its cancel was asked); `older_worker`: that finish as an earlier
    version wrote it (DONE)."""
    await h.queue.put_artifact(job_id, "state.pt", b"a final state")
    await h.queue.put_artifact(job_id, "final.png", png)
    await h.queue.put_artifact(job_id, "video.mp4", VIDEO)
    if older_worker:
        await finish_as_an_older_worker(h, job_id)
    else:
        assert await h.queue.finish(job_id, (await h.queue.get(job_id)).lease_id, 0.2)


async def _banned_finished_and_cancelled(h, older_worker: bool) -> tuple[str, str]:
    """Two jobs of WORD: one running when it was banned, which its worker then finished (the cancel
    on its record, a final state and a final; CANCELLED, or DONE by an `older_worker`), and one
    cancelled while it waited."""
    running = await _queue(h, f"a {WORD} at dawn")
    waiting = await _queue(h, f"a {WORD} at dusk")
    await claim_jobs(h.queue, [running])
    await _ban(h, running, waiting)
    await _finish(h, running, _png((255, 0, 0)), older_worker)
    record = await h.wait_delivered(running)
    state = JobState.DONE if older_worker else JobState.CANCELLED
    assert (record.state, record.cancel_requested, render.withholds_prompt(record)) == (state, True, True)
    for job_id in (running, waiting):
        assert "Cancelled" in await _status(h, job_id)
    return running, waiting


@by_either_worker
async def test_the_contact_sheet_shows_no_picture_or_caption_of_a_banned_cancel_nor_the_template(harness, older_worker):
    """The set's template holds every option, the banned word too; a banned job's caption is its
    option. A job its worker finished after the cancel has a final: it gets no tile (its reply
    posted no picture either). The other jobs' tiles and captions stay."""
    h = harness
    fd = h.fd
    await h.start(worker=False)
    await fd.send_slash_command("imagine", {"prompt": f"a {{{WORD}, dog}} in a {{hat, box}}"})
    await fd.wait_for(lambda: sum("job " in m.content for m in fd.channel_messages()) == 4, 10, "the set's replies")
    jobs = await _set_jobs(h)
    ids = [r.id for r in jobs]
    assert [r.spec.prompt for r in jobs] == [f"a {WORD} in a hat", f"a {WORD} in a box", "a dog in a hat",
                                             "a dog in a box"]
    await claim_jobs(h.queue, ids[:1])   # running when the word is banned; the next one waits
    await _ban(h, ids[0], ids[1])
    await claim_jobs(h.queue, ids[2:])
    colours = {0: (255, 0, 0), 2: (0, 255, 0), 3: (0, 0, 255)}
    for i, colour in colours.items():   # the banned one's worker finishes it before it sees the cancel
        await _finish(h, ids[i], _png(colour), older_worker and i == 0)

    await fd.wait_for(lambda: _sheet_messages(fd), 10, "the contact sheet")
    (sheet,) = _sheet_messages(fd)
    assert WORD not in _public_text(sheet), sheet.content
    head, count, *lines = sheet.content.split("\n")
    assert head == f"**Contact sheet** · {render.PROMPT_WITHHELD}" and count.startswith("2 of 4 variations"), count
    assert len(lines) == 4
    for number, (line, job_id) in enumerate(zip(lines[:2], ids[:2]), 1):
        assert line.startswith(f"{number}. {render.PROMPT_WITHHELD} (cancelled) · `{job_id}`"), line
    # Numbered by their place in the set: the tiles' captions (3., 4.) match these lines.
    assert lines[2].startswith(f"3. dog · hat · `{ids[2]}`") and lines[3].startswith(f"4. dog · box · `{ids[3]}`")
    # Two tiles, the dogs' finals, in order: nothing of the banned job's red final.
    image = _rgb(fd.attachment_bytes(sheet.attachments[0]))
    spec = contact_sheet.layout(2, contact_sheet.MIN_TILE)
    assert image.size == spec.size
    for box, colour in zip(spec.boxes, [colours[2], colours[3]]):
        tile = np.asarray(image.crop(box), dtype=np.float32)
        assert np.abs(tile - np.array(colour, dtype=np.float32)).max() <= 1.0, (box, colour)
    fd.assert_clean()


@by_either_worker
async def test_history_withholds_the_prompt_of_a_banned_cancel(harness, older_worker):
    """/history is private, but the prompt is what the admins took off the channel: it reads as the
    public reply does, and the job an older worker ended DONE after the cancel reads as cancelled,
    as there."""
    h = harness
    await h.start(worker=False)
    done, cancelled = await _banned_finished_and_cancelled(h, older_worker)
    kept = await _queue(h, "a quiet meadow")

    text = await ephemeral_answer(h, "history")
    assert WORD not in text, text
    lines = {line.split("`")[1]: line for line in text.split("\n") if line.startswith("• ")}
    for job_id in (done, cancelled):
        assert lines[job_id].startswith(f"• {render.PROMPT_WITHHELD} · <@") and " · cancelled · " in lines[job_id]
    assert lines[kept].startswith("• a quiet meadow · <@") and " · queued · " in lines[kept]
    h.fd.assert_clean()


@by_either_worker
async def test_no_reroll_or_remix_starts_from_a_banned_cancel_even_once_the_word_is_removed(harness, older_worker):
    """Its reply has no buttons (a Reroll would queue the banned prompt again); /remix (and the Remix
    button, which shares its check) would start from the final state that the finished one has.
    Refused privately, naming neither the prompt nor the word; nothing queued. Once the word is removed from the list, the
    prompt passes the refused words: the job's cancel still refuses."""
    h = harness
    fd = h.fd
    await h.start(worker=False)
    done, cancelled = await _banned_finished_and_cancelled(h, older_worker)
    await ephemeral_answer(h, "queue-admin ban-word remove", {"entry": WORD}, user=fd.admin_user)

    for job_id in (done, cancelled):
        assert _reply(h, job_id).custom_ids == []   # no Reroll, Continue or Remix button on it
        text = await ephemeral_answer(h, "remix", {"job": job_id, "prompt": "a quiet meadow"})
        assert text == (f"Job `{job_id}` was cancelled by this server's admins: its prompt matches a banned "
                        "word, so it cannot be remixed."), text
    assert await h.queue.count_queued() == 0 and await h.queue.running() == []
    fd.assert_clean()


@pytest.mark.parametrize("ended", ["done", "failed"])
async def test_a_result_not_yet_posted_when_its_word_is_refused_is_posted_withheld(harness, ended):
    """The add cancels only jobs still waiting or running. A job that had finished, its result not
    yet posted (Discord down: the bot retries its post), is posted after the add: as withheld, with
    no picture (neither the final nor the last frame), no prompt, no failure reason (a rejection
    quotes the prompt) and no Reroll, Continue or Remix; delivered, so not retried. A job of another
    prompt waiting out the same outage is posted as usual."""
    from tests.test_bot_support import CHANNEL_MESSAGE, publish_frames

    h = harness
    fd = h.fd
    h.config.progress.token_ttl = 0   # edits go through the channel (a 503 is not retried by discord.py)
    h.config.progress.message_interval = 0.01
    await h.start(worker=False)
    refused, kept = await _queue(h, f"a {WORD} at dawn"), await _queue(h, "a quiet meadow")
    await claim_jobs(h.queue, [refused, kept])
    await publish_frames(h.queue, [refused], 1, every=0)
    await fd.wait_for(lambda: _reply(h, refused).attachments, 5, "its frame")

    outage = fd.inject_error("PATCH", CHANNEL_MESSAGE, 503, count=10_000)
    if ended == "done":
        await _finish(h, refused, _png((255, 0, 0)))
    else:
        record = await h.queue.get(refused)
        reason = f"the weight of 'a {WORD} at dawn' must be a number between -100 and 100"
        assert await h.queue.fail(refused, record.lease_id, reason, retry=False) == JobState.FAILED
    await _finish(h, kept, _png((0, 255, 0)))
    await fd.wait_for(lambda: len(outage.hits) >= 2, 10, "both posts failing")

    text = await ephemeral_answer(h, "queue-admin ban-word add", {"entry": WORD}, user=fd.admin_user)
    assert "No queued or running job of this server matches it." in text, text
    outage.remaining = 0   # Discord is back
    record = await h.wait_delivered(refused)
    assert record.state == (JobState.DONE if ended == "done" else JobState.FAILED)
    await h.wait_delivered(kept)

    msg = _reply(h, refused)
    assert WORD not in _public_text(msg), msg.content
    assert msg.content.startswith(render.PROMPT_WITHHELD + "\n" + "Result withheld: its prompt matches a word "
                                  "or pattern this server's admins refuse.\n")
    assert msg.attachments == [] and msg.custom_ids == []
    shown = _reply(h, kept)
    assert {a["filename"] for a in shown.attachments} == {"final.png", "video.mp4"}
    assert shown.custom_ids == [f"imagine:{a}:{kept}" for a in ("reroll", "continue", "remix")]

    # Delivered: a restart does not post it again.
    posts = len([r for r in fd.requests if r.method == "PATCH" and f"/messages/{msg.id}" in r.path])
    await h.stop()
    await h.start(worker=False)
    await asyncio.sleep(1.0)
    assert len([r for r in fd.requests if r.method == "PATCH" and f"/messages/{msg.id}" in r.path]) == posts
    assert WORD not in _public_text(_reply(h, refused))
    fd.assert_clean()


@pytest.mark.parametrize("result", ["banned-cancel", "withheld"])
async def test_a_result_without_buttons_posted_before_a_late_restart_is_not_posted_again(harness, monkeypatch, result):
    """A result with no buttons (a banned word's cancel; a result withheld, the word added after
    the job finished) went out as a new message, its thread having archived itself, and the bot
    stopped right after that post: before it wrote the post's id or marked the job delivered. It
    restarts after Discord has forgotten the post's nonce, reads the thread's messages since its
    `reposting` mark and takes the post that names the job as the result; not the job's reply,
    which names it too and was made within the mark's minute. One post of the result. Before:
    only a message with the job's buttons counted as the result, so this one was posted again."""
    h = harness
    fd = h.fd
    h.config.progress.message_interval = 0.01
    msg, job_id = await queued_job_in_a_thread(h, f"a {WORD} at dawn")   # edits through the channel
    thread_id = msg.channel_id
    posted = asyncio.Event()

    async def bot_stops_here(self, t, message_id):   # after the post, before anything else
        posted.set()
        await asyncio.Event().wait()

    monkeypatch.setattr(progress.ProgressCog, "_point_to_result", bot_stops_here)
    if result == "banned-cancel":
        await fd.archive_thread(thread_id)
        since = len(fd.requests)
        text = await ephemeral_answer(h, "queue-admin ban-word add", {"entry": WORD}, user=fd.admin_user)
        assert "Cancelled 1 of this server's" in text, text   # while it waits: its final post follows
    else:
        await claim_jobs(h.queue, [job_id])
        await fd.wait_for(lambda: "Starting" in fd.messages[msg.id].content, 10, "the starting edit")
        await fd.archive_thread(thread_id)
        since = len(fd.requests)
        outage = fd.inject_error("POST", f"/channels/{thread_id}/messages", 503, count=10_000)
        await _finish(h, job_id, _png((255, 0, 0)))
        await fd.wait_for(lambda: outage.hits, 10, "the result's first post failing")
        text = await ephemeral_answer(h, "queue-admin ban-word add", {"entry": WORD}, user=fd.admin_user)
        assert "No queued or running job of this server matches it." in text, text   # it had finished
        outage.remaining = 0
    await asyncio.wait_for(posted.wait(), 20)
    reply_shows = fd.messages[msg.id].content
    await h.stop()
    fd.nonce_window = 0.0   # a late restart: a post now would be a second message

    await h.start(worker=False)
    record = await h.wait_delivered(job_id)
    posts = [r for r in requests_matching(fd, "POST", f"/channels/{thread_id}/messages", since) if r.status == 200]
    assert len(posts) == 1, posts
    result_id = int(posts[0].response["id"])
    assert record.spec.reply["result_message_id"] == result_id
    assert requests_matching(fd, "GET", f"/channels/{thread_id}/messages", since)   # it looked
    naming = [m.id for m in fd.channel_messages(thread_id) if f"job `{job_id}`" in m.content]
    assert naming == [msg.id, result_id]
    shown = fd.messages[result_id]
    assert WORD not in _public_text(shown) and shown.attachments == [] and shown.custom_ids == []
    assert ("Cancelled: " if result == "banned-cancel" else "Result withheld: ") + render.REFUSED_PROMPT in shown.content
    assert fd.messages[msg.id].content == reply_shows   # the reply was not made a second result
    fd.assert_clean()


async def test_a_finished_remix_of_a_prompt_refused_before_its_post_is_posted_withheld(harness):
    """A remix's reply quotes its parent's prompt (↳ remix of `A` *a zorblax lighthouse*). The remix
    finished while Discord was down, then the word was added: the add cancels only jobs still
    waiting or running, and the result was posted with the refused prompt in its lineage line. It
    is withheld."""
    from tests.test_bot_support import CHANNEL_MESSAGE, finished_job

    h = harness
    fd = h.fd
    h.config.progress.token_ttl = 0   # edits go through the channel (a 503 is not retried by discord.py)
    await h.start(worker=False)
    _, parent = await finished_job(h, f"a {WORD} lighthouse")
    inter = await fd.send_slash_command("remix", {"job": parent, "prompt": "a calm sea"})
    await fd.wait_for_response(inter)
    remix = h.job_id(await h.reply_of(inter))
    await claim_jobs(h.queue, [remix])
    outage = fd.inject_error("PATCH", CHANNEL_MESSAGE, 503, count=10_000)
    await _finish(h, remix, _png((0, 0, 255)))
    await fd.wait_for(lambda: len(outage.hits) >= 1, 10, "its post failing")
    text = await ephemeral_answer(h, "queue-admin ban-word add", {"entry": WORD}, user=fd.admin_user)
    assert "No queued or running job of this server matches it." in text, text
    outage.remaining = 0   # Discord is back
    await h.wait_delivered(remix)
    msg = _reply(h, remix)
    assert WORD not in _public_text(msg), msg.content
    assert msg.content.startswith(render.PROMPT_WITHHELD + "\nResult withheld: ")
    assert msg.attachments == [] and msg.custom_ids == []
    fd.assert_clean()


async def test_a_word_added_while_a_result_waits_for_its_channel_slot_withholds_it(harness, monkeypatch):
    """The final post reads the list, then waits for its turn in the channel (a second each,
    longer behind other finals); a word added meanwhile cannot cancel a finished job, and the result
    was posted with its prompt and picture. The list is read again once the turn comes."""
    h = harness
    fd = h.fd
    await h.start(worker=False)
    job = await _queue(h, f"a {WORD} at noon")
    await claim_jobs(h.queue, [job])
    real_wait_turn = progress.ProgressCog._wait_turn
    added = asyncio.Event()

    async def wait_turn(self, t):
        if t.job_id == job and t.final and not added.is_set():   # the final's turn: the admin is quicker
            text = await ephemeral_answer(h, "queue-admin ban-word add", {"entry": WORD}, user=fd.admin_user)
            assert "No queued or running job of this server matches it." in text, text
            added.set()
        return await real_wait_turn(self, t)

    monkeypatch.setattr(progress.ProgressCog, "_wait_turn", wait_turn)
    await _finish(h, job, _png((255, 0, 0)))
    await h.wait_delivered(job)
    assert added.is_set()
    msg = _reply(h, job)
    assert WORD not in _public_text(msg), msg.content
    assert msg.content.startswith(render.PROMPT_WITHHELD + "\nResult withheld: ")
    assert msg.attachments == [] and msg.custom_ids == []
    fd.assert_clean()
