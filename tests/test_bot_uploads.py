"""Pictures attached to /imagine do not outlive the commands that stored them (audit finding H1).

Real bot + fake Discord + the real SQLite queue (the store's side is in the contract suite, both
backends). What a command stored and then did not queue is deleted at once; a job cancelled while
it waits takes its pictures along; the same picture is one upload; and one user's commands with
pictures take turns, so a burst cannot pass the early cap check together and store a picture each.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading

import pytest

from bot import attachments, imagine
from engine.jobs import JobSpec, JobState, upload_refs
from tests.test_bot_brainstorm import noise_png
from tests.test_bot_support import (  # noqa: F401 - harness: the fixture
    EPHEMERAL, FLAG_LOADING, JOB_ID_RE, claim_jobs, finish_jobs, harness, private_answer,
)

pytestmark = pytest.mark.asyncio


def stored_uploads(h) -> dict[str, int]:
    """Every upload in the store (artifacts under an upload id): id -> bytes."""
    path = h.config.queue.url.split("sqlite:///", 1)[1]
    with sqlite3.connect(path) as db:
        return dict(db.execute("SELECT job_id, length(data) FROM artifacts WHERE job_id LIKE 'upload_%'"))


async def uploads_settle(h, expected: dict | list) -> None:
    """Wait (a moment: the refusal is sent before the command's pictures are discarded) until the
    stored uploads are `expected` (their ids, or {} for none)."""
    want = sorted(expected)
    for _ in range(100):
        if sorted(stored_uploads(h)) == want:
            return
        await asyncio.sleep(0.05)
    assert sorted(stored_uploads(h)) == want


async def no_turns_left(h) -> None:
    """Every command's turn handed back (a moment after its answer) and forgotten: none left behind."""
    turns = h.bot.get_cog("Imagine").picture_turns
    for _ in range(100):
        if len(turns) == 0:
            return
        await asyncio.sleep(0.05)
    assert len(turns) == 0


async def named_uploads(h) -> set[str]:
    """The uploads that the store's jobs name (queued ones, for these tests)."""
    return {u for r in await h.queue.queued() for u in upload_refs(r.spec)}


def outcome(inter) -> tuple[str, str] | None:
    """("queued", job id) or ("refused", the private answer) once the command has its answer."""
    msg = inter.original_message
    if msg is not None and not msg.deleted and not msg.ephemeral and JOB_ID_RE.search(msg.content or ""):
        return "queued", JOB_ID_RE.search(msg.content).group(1)
    if inter.response_type == 4:
        assert inter.response["data"]["flags"] & EPHEMERAL, inter.response
        return "refused", inter.response["data"]["content"]
    for followup in inter.followups:
        if followup.ephemeral:
            assert msg is None or msg.deleted or msg.ephemeral, "a refusal after a public reply"
            return "refused", followup.content
    if msg is not None and msg.ephemeral and not msg.flags & FLAG_LOADING:
        return "refused", msg.content
    return None


async def outcomes(h, inters, timeout: float = 60.0) -> list[tuple[str, str]]:
    await h.fd.wait_for(lambda: all(outcome(i) for i in inters), timeout, "every command's answer")
    for inter in inters:   # each got its first answer within Discord's 3 s
        assert inter.callback_request is not None and inter.callback_request.monotonic - inter.created < 3.0
    return [outcome(i) for i in inters]


async def test_a_burst_of_commands_with_pictures_stores_only_what_is_queued(harness):
    """Eight /imagine with a picture each at once, cap 5: the user's commands take turns, so the
    early cap check refuses the last three before they download anything, and only the five queued
    pictures are stored (before: 8 stored, 3 named by no job for keep_days)."""
    h = harness
    await h.start(worker=False)
    fd = h.fd
    cap = h.config.queue.max_queued_per_user
    pictures = [fd.host_attachment(f"p{i}.png", noise_png(seed=i)) for i in range(cap + 3)]
    inters = await asyncio.gather(*(fd.send_slash_command("imagine", {"prompt": f"a house {i}", "image": p})
                                    for i, p in enumerate(pictures)))
    results = await outcomes(h, inters)
    queued = [job for kind, job in results if kind == "queued"]
    refused = [text for kind, text in results if kind == "refused"]
    assert len(queued) == cap and len(refused) == 3, results
    for text in refused:
        assert text == imagine.limit_text(cap, cap), text
    assert await h.queue.count_queued() == cap
    stored = stored_uploads(h)
    assert len(stored) == cap and set(stored) == await named_uploads(h)
    downloads = [r for r in fd.cdn_requests if r.status == 200]
    assert len(downloads) == cap                       # the refused ones never downloaded theirs
    await no_turns_left(h)
    fd.assert_clean()


async def test_cancelling_a_waiting_job_deletes_its_pictures_and_its_reroll_says_they_are_gone(harness):
    """/imagine with `image` and `init_image` (the same picture: one upload), then /queue cancel,
    over and over under a cap of 1: each cancel deletes the picture at once (before: every cycle's
    two copies stayed for keep_days). The cancelled job's Reroll says the picture is gone."""
    h = harness
    await h.start(worker=False)
    fd = h.fd
    await h.queue.set_setting(f"bot.max_queued_per_user:{fd.guild_id}", 1)
    picture = fd.host_attachment("p.png", noise_png(side=256, seed=7))
    job_ids = []
    for i in range(4):
        inter = await fd.send_slash_command("imagine", {"prompt": f"a house {i}", "image": picture,
                                                        "init_image": picture})
        msg = await h.reply_of(inter, 30)
        job_id = h.job_id(msg)
        record = await h.queue.get(job_id)
        (upload,) = upload_refs(record.spec)                  # both options name the one upload
        assert record.spec.extra["image_prompt"]["artifact"] == record.spec.extra["init_image"]["artifact"]
        assert list(stored_uploads(h)) == [upload]
        text = await private_answer(h, await fd.send_slash_command("queue cancel", {"job": job_id}))
        assert text == f"Cancelled job `{job_id}`.", text
        assert stored_uploads(h) == {}                        # gone with the cancel, not in 30 days
        job_ids.append(job_id)
    assert {(await h.queue.get(j)).state for j in job_ids} == {JobState.CANCELLED}

    # The cancelled job's result (its Reroll button): the picture is gone, said privately; nothing queued.
    last = job_ids[-1]
    await h.wait_delivered(last)
    (result,) = [m for m in fd.channel_messages() if f"imagine:reroll:{last}" in m.custom_ids]
    text = await private_answer(h, await fd.click_button(result, f"imagine:reroll:{last}"))
    assert text == (f"The picture it aims at (`image`) of job `{last}` is gone from the store (the job was "
                    "cancelled while it waited in line, and its pictures went with it), so it cannot be reused. "
                    "`/imagine` the prompt again with the picture attached."), text
    assert await h.queue.count_queued() == 0
    # /history still lists it.
    text = await private_answer(h, await fd.send_slash_command("history"))
    assert f"`{last}`" in text and "cancelled" in text
    fd.assert_clean()


async def test_the_pictures_of_a_command_the_store_refuses_are_deleted_at_once(harness, monkeypatch):
    """Past the early checks, the store may still refuse the job: another command took the user's
    last place meanwhile (QueueLimitReached), or the submit failed. The command's pictures go at
    once, for a single job and for a permutation set; a picture another job names stays."""
    h = harness
    await h.start(worker=False)
    fd = h.fd
    cap = h.config.queue.max_queued_per_user
    original = attachments.download
    racing = {"on": True}

    async def download_while_the_cap_fills(attachment, option, max_bytes):
        data = await original(attachment, option, max_bytes)
        if racing["on"]:   # other commands of the user (no picture) take every place left meanwhile
            user = int(fd.member_user["id"])
            for i in range(cap - await h.queue.count_queued(user)):
                await h.queue.submit(JobSpec(prompt=f"racing {i}", user_id=user, channel_id=fd.channel_id,
                                             guild_id=fd.guild_id))
        return data

    monkeypatch.setattr(attachments, "download", download_while_the_cap_fills)
    discards: list[tuple[list[str], int]] = []   # (ids asked for, how many went)
    real_discard = h.queue.discard_uploads

    async def discard(ids):
        discards.append((list(ids), await real_discard(ids)))
        return discards[-1][1]

    monkeypatch.setattr(h.queue, "discard_uploads", discard)
    for prompt in ("a house", "a {red, blue} house"):
        inter = await fd.send_slash_command("imagine", {"prompt": prompt,
                                                        "image": fd.host_attachment("p.png", noise_png(seed=3))})
        (kind, text) = (await outcomes(h, [inter]))[0]
        assert kind == "refused" and "the limit is 5" in text, text
        await uploads_settle(h, {})
        assert [n for _, n in discards] == [1], discards   # deleted by the command, at once
        discards.clear()
        assert await h.queue.clear() == cap

    # The submit itself fails (the store down): the picture goes all the same, the user is told.
    racing["on"] = False
    real_submit = h.queue.submit

    async def failing_submit(*args, **kwargs):
        raise RuntimeError("the store went away")

    monkeypatch.setattr(h.queue, "submit", failing_submit)
    inter = await fd.send_slash_command("imagine", {"prompt": "a house",
                                                    "image": fd.host_attachment("p.png", noise_png(seed=4))})
    (kind, text) = (await outcomes(h, [inter]))[0]
    assert kind == "refused" and text == imagine.OUR_ERROR, text
    await uploads_settle(h, {})
    assert [n for _, n in discards] == [1], discards
    discards.clear()
    monkeypatch.setattr(h.queue, "submit", real_submit)

    # A picture already named by a waiting job is the same upload: a refused command leaves it.
    shared = fd.host_attachment("shared.png", noise_png(seed=5))
    msg = await h.reply_of(await fd.send_slash_command("imagine", {"prompt": "kept", "image": shared}), 30)
    (upload,) = upload_refs((await h.queue.get(h.job_id(msg))).spec)
    racing["on"] = True
    inter = await fd.send_slash_command("imagine", {"prompt": "refused", "image": shared})
    (kind, text) = (await outcomes(h, [inter]))[0]
    assert kind == "refused" and "the limit is 5" in text, text
    for _ in range(100):   # the refusal is sent first, then its pictures discarded
        if discards:
            break
        await asyncio.sleep(0.05)
    assert discards == [([upload], 0)]                  # asked for, kept: the waiting job names it
    assert list(stored_uploads(h)) == [upload]
    fd.assert_clean()


async def test_a_picture_deleted_between_its_store_and_its_submit_is_stored_again(harness, monkeypatch):
    """The same picture is one upload for every command that sends it, so another command's refusal
    (or a cancelled job) may delete it just after this command stored it: the store refuses the job
    (UploadGone), and the bot stores the picture again and queues the job with it."""
    h = harness
    await h.start(worker=False)
    fd = h.fd
    real_submit = h.queue.submit
    discarded = []

    async def submit_after_a_discard(spec, **kwargs):
        if not discarded:   # another command's discard of the same picture, just before this submit
            discarded.append(await h.queue.discard_uploads(upload_refs(spec)))
        return await real_submit(spec, **kwargs)

    monkeypatch.setattr(h.queue, "submit", submit_after_a_discard)
    msg = await h.reply_of(await fd.send_slash_command(
        "imagine", {"prompt": "a house", "image": fd.host_attachment("p.png", noise_png(seed=6))}), 30)
    assert discarded == [1]
    record = await h.queue.get(h.job_id(msg))
    (upload,) = upload_refs(record.spec)
    assert record.state == JobState.QUEUED and await h.queue.get_artifact(upload, "image.png")

    # A Reroll carries its job's picture, which the bot did not store: gone between the button's
    # check and the submit (here: deleted behind the store's back), the store refuses the job and
    # the user is told privately, nothing queued.
    await claim_jobs(h.queue, [record.id])
    await finish_jobs(h.queue, [record.id])
    await h.wait_delivered(record.id)
    await fd.wait_for(lambda: f"imagine:reroll:{record.id}" in fd.messages[msg.id].custom_ids, 5, "the buttons")

    async def submit_after_the_picture_went(spec, **kwargs):
        await h.write_store(lambda db: db.execute("DELETE FROM artifacts WHERE job_id = ?", (upload,)))
        return await real_submit(spec, **kwargs)

    monkeypatch.setattr(h.queue, "submit", submit_after_the_picture_went)
    ((kind, text),) = await outcomes(h, [await fd.click_button(msg, f"imagine:reroll:{record.id}")])
    assert kind == "refused" and text == (f"The picture it aims at (`image`) of job `{record.id}` is gone from the store, so it cannot "
                    "be reused. `/imagine` the prompt again with the picture attached. Nothing was queued."), text
    assert await h.queue.count_queued() == 0
    fd.assert_clean()


@pytest.mark.parametrize("prompt", ["a house", "a {red, blue} house"], ids=["one-job", "permutation-set"])
async def test_a_picture_gone_each_time_it_is_stored_again_is_told_as_not_stored(harness, monkeypatch, prompt):
    """The picture this command stored is deleted before every submit (another command's discard
    each time): after RESTORE_TRIES stores again, nothing is queued and the user reads that their
    picture could not be stored, not the Reroll's "gone from the store, so it cannot be reused"."""
    h = harness
    await h.start(worker=False)
    fd = h.fd
    submits = []

    real_submit_many = h.queue.submit_many

    async def submit_many_after_a_discard(specs, **kwargs):   # submit() goes through it too
        await h.queue.discard_uploads(upload_refs(specs[0]))
        submits.append(len(specs))
        return await real_submit_many(specs, **kwargs)

    monkeypatch.setattr(h.queue, "submit_many", submit_many_after_a_discard)
    inter = await fd.send_slash_command("imagine", {"prompt": prompt,
                                                    "image": fd.host_attachment("p.png", noise_png(seed=7))})
    ((kind, text),) = await outcomes(h, [inter])
    assert (kind, text) == ("refused", imagine.PICTURE_NOT_STORED)
    assert len(submits) == attachments.RESTORE_TRIES + 1
    assert await h.queue.count_queued() == 0
    await uploads_settle(h, {})
    await no_turns_left(h)
    fd.assert_clean()


async def test_a_users_second_command_with_pictures_waits_for_the_first_or_is_told_it_is_busy(harness, monkeypatch):
    """One user's commands with pictures take turns: a second one waits (answered in time with a
    public "thinking…") and goes on once the first is queued; past TURN_WAIT it is refused privately,
    having downloaded nothing. Another user's command does not wait for them."""
    h = harness
    await h.start(worker=False)
    fd = h.fd
    original = attachments.download
    spans: dict[str, list[float]] = {}
    loop = asyncio.get_running_loop()

    async def slow_download(attachment, option, max_bytes):
        spans[attachment.filename] = [loop.time()]
        await asyncio.sleep(2.5)   # past the answer window: the command defers, then goes on
        data = await original(attachment, option, max_bytes)
        spans[attachment.filename].append(loop.time())
        return data

    monkeypatch.setattr(attachments, "download", slow_download)

    def send(name, seed, user=None):
        return fd.send_slash_command("imagine", {"prompt": name, "image": fd.host_attachment(f"{name}.png",
                                                                                             noise_png(seed=seed))},
                                     user=user)

    first, second, other = await asyncio.gather(send("first", 1), send("second", 2), send("other", 3, fd.admin_user))
    results = await outcomes(h, [first, second, other])
    assert [kind for kind, _ in results] == ["queued"] * 3, results
    assert second.response_type == 5 and not second.response.get("data", {}).get("flags", 0) & EPHEMERAL
    assert spans["second.png"][0] >= spans["first.png"][1]   # the user's second waited for the first
    assert spans["other.png"][0] < spans["first.png"][1]     # another user's did not
    assert len(stored_uploads(h)) == 3

    monkeypatch.setattr(imagine, "TURN_WAIT", 1.0)
    spans.clear()
    first, second = await asyncio.gather(send("first again", 4), send("second again", 5))
    (kind, _), (second_kind, text) = await outcomes(h, [first, second])
    assert kind == "queued" and (second_kind, text) == ("refused", imagine.BUSY_WITH_PICTURES)
    assert "second again.png" not in spans                   # it downloaded nothing
    assert len(stored_uploads(h)) == 4
    await no_turns_left(h)
    fd.assert_clean()


def _prompt_of(interaction) -> str | None:
    return next((o.get("value") for o in (interaction.data or {}).get("options", []) if o.get("name") == "prompt"),
                None)


@pytest.mark.parametrize("failure", ["times-out-as-the-turn-comes", "fails-as-the-turn-is-handed-over"])
async def test_a_defer_that_fails_while_waiting_for_the_turn_gives_the_turn_back(harness, monkeypatch, failure):
    """A user's second command with a picture waits for the turn their first one holds and, past the
    answer window, defers publicly. That defer fails: it stalls and times out (aiohttp's
    ServerTimeoutError, an asyncio.TimeoutError) while the turn comes; or it fails in the very tick
    the first command hands the turn over, before the waiting task has seen it (it is cancelled then,
    and Python 3.11's wait_for returns the lock it had just taken all the same). Either way the
    second command gets our error (not "busy": the turn came), the turn is given back, and the
    user's next command with a picture goes at once. Before: the turn was held for ever, and every
    later command with a picture of that user was refused as busy after TURN_WAIT."""
    import aiohttp
    import discord

    h = harness
    await h.start(worker=False)
    fd = h.fd
    turns = h.bot.get_cog("Imagine").picture_turns
    go, handed = asyncio.Event(), asyncio.Event()
    original_download = attachments.download

    async def download(attachment, option, max_bytes):
        if attachment.filename == "first.png":
            await go.wait()   # the first command holds the turn until the second one defers
        return await original_download(attachment, option, max_bytes)

    real_release = turns.release

    def release(user_id):
        real_release(user_id)
        handed.set()   # the first command's: the turn goes to the second one now

    real_defer = discord.InteractionResponse.defer

    async def defer(self, **kwargs):
        if _prompt_of(self._parent) != "second":
            return await real_defer(self, **kwargs)
        go.set()
        await handed.wait()   # woken in the tick the turn is handed over, before the waiting task
        if failure == "times-out-as-the-turn-comes":
            await asyncio.sleep(0.1)   # the waiting task has the turn by now
            raise aiohttp.ServerTimeoutError("Timeout on reading data from socket")
        raise aiohttp.ClientConnectionError("Connection lost")

    monkeypatch.setattr(attachments, "download", download)
    monkeypatch.setattr(turns, "release", release)
    monkeypatch.setattr(discord.InteractionResponse, "defer", defer)
    monkeypatch.setattr(imagine, "TURN_WAIT", 3.0)

    def send(name, seed):
        return fd.send_slash_command("imagine", {"prompt": name, "image": fd.host_attachment(f"{name}.png",
                                                                                             noise_png(seed=seed))})

    first, second = await asyncio.gather(send("first", 1), send("second", 2))
    (kind, _), second_outcome = await outcomes(h, [first, second])
    assert kind == "queued" and second_outcome == ("refused", imagine.OUR_ERROR), second_outcome
    await no_turns_left(h)
    ((kind, _),) = await outcomes(h, [await send("third", 3)])   # not refused as busy after TURN_WAIT
    assert kind == "queued"
    await no_turns_left(h)
    fd.assert_clean()


async def test_pictures_decode_on_their_own_threads_and_a_slow_one_is_told_as_slow_to_read(harness, monkeypatch):
    """The audit's starvation: pictures that decode for minutes, given up on after ATTACHMENT_TIMEOUT
    but still decoding, held asyncio's default threads, so everyone's commands waited. Pictures now
    decode on attachments' own DECODE_THREADS: here every one of them is busy (held by this test),
    so a picture waits for a decoder until its command gives up and says the picture took too
    long to read (not to download), while another user's /imagine is queued meanwhile. Freed,
    the decoders read the next picture."""
    monkeypatch.setattr(imagine, "ATTACHMENT_TIMEOUT", 1.0)
    h = harness
    await h.start(worker=False)
    fd = h.fd
    free = threading.Event()
    held = [attachments._decoders.submit(free.wait) for _ in range(attachments.DECODE_THREADS)]
    try:
        waiting = await fd.send_slash_command("imagine", {"prompt": "a house",
                                                          "image": fd.host_attachment("p.png", noise_png(seed=8))})
        plain = await fd.send_slash_command("imagine", {"prompt": "a plain house"}, user=fd.admin_user)
        results = await outcomes(h, [waiting, plain])
    finally:
        free.set()
    assert results[0] == ("refused", "`image`: reading the picture took too long (it may be too complex to decode, or "
                          "I am busy reading other pictures). Try again, or send a simpler picture (a PNG or a plain "
                          "JPEG)."), results
    assert results[1][0] == "queued", results
    for future in held:
        future.result(timeout=5)
    await uploads_settle(h, {})   # the refused picture was never stored
    msg = await h.reply_of(await fd.send_slash_command(
        "imagine", {"prompt": "a house again", "image": fd.host_attachment("q.png", noise_png(seed=9))}), 30)
    assert "image_prompt" in (await h.queue.get(h.job_id(msg))).spec.extra

    # A download that never ends is still told as a slow download.
    async def endless_download(attachment, option, max_bytes):
        await asyncio.Event().wait()

    monkeypatch.setattr(attachments, "download", endless_download)
    stuck = await fd.send_slash_command("imagine", {"prompt": "a boat",
                                                    "image": fd.host_attachment("r.png", noise_png(seed=10))})
    assert await outcomes(h, [stuck]) == [("refused",
                                           "Downloading the attachment from Discord took too long. Try again.")]
    await no_turns_left(h)
    fd.assert_clean()


@pytest.mark.parametrize("cut", ["struct.error", "IndexError"])
async def test_a_gif_cut_inside_its_next_frame_is_refused_privately_as_damaged(harness, cut):
    """Pillow raises struct.error / IndexError on these (the audit: "Something went wrong" and a
    logged traceback): the user is told the picture is damaged, nothing is stored or queued."""
    from tests.bad_pictures import damaged_gif

    h = harness
    await h.start(worker=False)
    fd = h.fd
    inter = await fd.send_slash_command("imagine", {"prompt": "a house",
                                                    "image": fd.host_attachment("crash.gif", damaged_gif(cut))})
    ((kind, text),) = await outcomes(h, [inter])
    assert kind == "refused" and text.startswith("`image`: the image is damaged or truncated ("), text
    assert await h.queue.count_queued() == 0
    await uploads_settle(h, {})
    fd.assert_clean()


async def test_a_picture_to_start_from_is_refused_while_no_live_worker_has_the_encoder(harness):
    """A worker without the dVAE encoder (`--encoder ""`) passes over the jobs that start from an
    init image. While workers are live and none of them has the encoder, /imagine with `init_image`
    and the Reroll of such a job are refused privately, nothing queued or stored (they would only
    ever say "queued"); an `image` to aim at is queued. With no worker live at all (starting, a
    restart) and with one that has the encoder, it is queued."""
    h = harness
    await h.start(worker=False)
    fd = h.fd

    def start_from(prompt: str, seed: int):
        return fd.send_slash_command("imagine", {"prompt": prompt,
                                                 "init_image": fd.host_attachment("p.png", noise_png(seed=seed))})

    # No worker has ever claimed: queued, as before (a worker with the encoder may be starting).
    first = h.job_id(await h.reply_of(await start_from("a house", 12), 30))
    await claim_jobs(h.queue, [first])   # a worker with the encoder runs it, then is gone for an hour
    await finish_jobs(h.queue, [first])
    await h.wait_delivered(first)
    await h.write_store(lambda db: db.execute(
        "UPDATE workers SET last_seen = last_seen - 3600 WHERE worker_id = 'test-gpu'"))
    kept = list(stored_uploads(h))

    # Only a worker without the encoder is live now.
    assert await h.queue.claim("gpu-no-encoder", init_images=False) is None
    assert await outcomes(h, [await start_from("a house again", 13)]) == [("refused", imagine.NO_ENCODER)]
    (result,) = [m for m in fd.channel_messages() if f"imagine:reroll:{first}" in m.custom_ids]
    reroll = await fd.click_button(result, f"imagine:reroll:{first}")
    assert await outcomes(h, [reroll]) == [("refused", imagine.no_encoder_for_reroll(first))]
    assert await h.queue.count_queued() == 0
    await uploads_settle(h, kept)
    aim = await fd.send_slash_command("imagine", {"prompt": "a boat",
                                                  "image": fd.host_attachment("q.png", noise_png(seed=14))})
    ((kind, _),) = await outcomes(h, [aim])   # an image prompt needs no encoder: queued (that worker may take it)
    assert kind == "queued"

    # A worker with the encoder is live too: queued.
    assert await h.queue.claim("gpu-encoder", grids=(99,)) is None
    ((kind, job_id),) = await outcomes(h, [await start_from("a house at last", 15)])
    assert kind == "queued" and "init_image" in (await h.queue.get(job_id)).spec.extra
    await no_turns_left(h)
    fd.assert_clean()


async def test_a_picture_to_start_from_is_queued_when_the_worker_registry_cannot_be_read(harness, caplog):
    """The encoder check is advisory: when the store's worker registry cannot be read (here its table
    is renamed away under the running bot, so every read of it fails in SQLite itself), /imagine with
    `init_image` is queued as before, not answered as our error, and the failure is logged once until
    a read succeeds again."""
    h = harness
    await h.start(worker=False)
    fd = h.fd
    caplog.set_level(logging.WARNING, logger="bot.imagine")
    path = h.config.queue.url.split("sqlite:///", 1)[1]

    def start_from(prompt: str, seed: int):
        return fd.send_slash_command("imagine", {"prompt": prompt,
                                                 "init_image": fd.host_attachment("p.png", noise_png(seed=seed))})

    def registry_warnings() -> int:
        return sum("could not read the worker registry" in r.getMessage() for r in caplog.records)

    assert await h.queue.claim("gpu-no-encoder", init_images=False) is None   # readable: it would be refused
    for away in (True, False, True):
        await h.write_store(lambda db: db.execute("ALTER TABLE workers RENAME TO workers_away" if away else
                                                  "ALTER TABLE workers_away RENAME TO workers"))
        if not away:   # readable again: refused, and the next failure is logged again
            assert await outcomes(h, [await start_from("a house again", 23)]) == [("refused", imagine.NO_ENCODER)]
            continue
        before = registry_warnings()
        for seed in (21, 22):
            ((kind, job_id),) = await outcomes(h, [await start_from(f"a house {seed}", seed)])
            assert kind == "queued" and "init_image" in (await h.queue.get(job_id)).spec.extra
        assert registry_warnings() == before + 1
    assert await h.queue.count_queued() == 4
    await no_turns_left(h)
    fd.assert_clean()
