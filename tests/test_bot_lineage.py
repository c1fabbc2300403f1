"""Where a job came from, and one Continue per picture.

A Continue goes on exactly as its job would have (the same seed, optimiser and noise), so a second
Continue of the same result is the same picture again: the click is told, privately, where the
first one is, and nothing is queued. Reroll and Continue replies, and /history, name the job they
came from (↻ reroll of, → continues, as the remix's ↳ remix of), and /history names only jobs its
reader may see. A reply is public in its channel: a job of another channel is not named there.

No worker: the test plays the GPU (claims, stores the final state, finishes), so the states are
exactly the ones each step needs.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time

import pytest

from engine.jobs import JobState
from tests.fakediscord import Permission
from tests.test_bot_support import (  # noqa: F401 - harness: the fixture
    EPHEMERAL, JOB_ID_RE, claim_jobs, ephemeral_answer, finish_jobs, finished_job, harness,
)

pytestmark = pytest.mark.asyncio


def _url(fd, message_id: int, channel_id: int | None = None) -> str:
    return f"https://discord.com/channels/{fd.guild_id}/{channel_id or fd.channel_id}/{message_id}"


async def _queued_by(h, click) -> tuple:
    """The job a Reroll / Continue click queued: its public reply (a defer, then the queued text)."""
    await h.fd.wait_for_response(click)
    assert click.response_type == 5, click.response
    msg = await h.reply_of(click)
    return msg, h.job_id(msg)


async def _told(h, click) -> str:
    """The private answer to a click that queued nothing."""
    await h.fd.wait_for_response(click)
    return _refusal(click)


def _refusal(click) -> str:
    assert click.response_type == 4 and click.response["data"]["flags"] & EPHEMERAL, click.response
    return click.response["data"]["content"]


async def _private_or_job(h, click) -> tuple[str | None, str | None]:
    """(the private answer, None) or (None, the job it queued): what one of two racing clicks got.
    A click that waited for the other's submit past the answer window was deferred publicly first:
    its private answer is then an ephemeral follow-up, its "thinking…" message deleted."""
    fd = h.fd
    await fd.wait_for_response(click)
    if click.response_type == 4:
        return _refusal(click), None
    await fd.wait_for(lambda: [m for m in click.followups if m.ephemeral]
                      or (click.original_message is not None and JOB_ID_RE.search(click.original_message.content)),
                      10, "the click's answer")
    private = [m for m in click.followups if m.ephemeral]
    return (private[0].content, None) if private else (None, h.job_id(click.original_message))


async def _finish(h, job_id: str) -> None:
    """The stand-in GPU: the job (claimed already) ends DONE with a final state, and is delivered."""
    await h.queue.put_artifact(job_id, "state.pt", b"a final state")
    await finish_jobs(h.queue, [job_id])
    await h.wait_delivered(job_id)


async def _set_extra(h, job_id: str, *, drop: tuple[str, ...] = (), **values) -> None:
    """Rewrite the job's `spec.extra` in its SQLite row (`values` set, `drop` removed): a row as an
    earlier version of the bot wrote it."""
    def rewrite(db: sqlite3.Connection) -> None:
        (text,) = db.execute("SELECT spec FROM jobs WHERE id = ?", (job_id,)).fetchone()
        spec = json.loads(text)
        for key in drop:
            del spec["extra"][key]
        spec["extra"].update(values)
        db.execute("UPDATE jobs SET spec = ? WHERE id = ?", (json.dumps(spec), job_id))
    await h.write_store(rewrite)


async def test_a_job_queued_before_its_weights_were_refused_can_be_rerolled_and_continued(harness):
    """`a portrait | (smiling:1.2)` was text at weight 1 when an older bot queued it; /imagine now
    refuses it, but the job's Reroll and Continue read its prompt as it was queued (they were
    refused "within today's limits")."""
    h = harness
    fd = h.fd
    await h.start(worker=False)
    msg, job_id = await finished_job(h, "a portrait")

    def rewrite(db: sqlite3.Connection) -> None:
        (text,) = db.execute("SELECT spec FROM jobs WHERE id = ?", (job_id,)).fetchone()
        spec = json.loads(text)
        spec["prompt"] = "a portrait | (smiling:1.2)"
        db.execute("UPDATE jobs SET spec = ? WHERE id = ?", (json.dumps(spec), job_id))
    await h.write_store(rewrite)
    for action in ("reroll", "continue"):
        _, new_id = await _queued_by(h, await fd.click_button(msg, f"imagine:{action}:{job_id}"))
        assert (await h.queue.get(new_id)).spec.prompt == "a portrait | (smiling:1.2)"
    fd.assert_clean()


async def _ids(h) -> list[str]:
    return [r.id for r in await h.queue.history(h.fd.channel_id, limit=100)]


def _staff_only_channel(fd, member) -> int:
    """A channel only the bot and `member` may view (#staff-only); its id."""
    staff = fd.add_channel("staff-only")
    fd.channels[staff]["permission_overwrites"] = [
        {"id": str(fd.everyone_role_id), "type": 0, "allow": "0", "deny": str(Permission.VIEW_CHANNEL)},
        {"id": str(fd.bot_role_id), "type": 0, "allow": str(Permission.VIEW_CHANNEL), "deny": "0"},
        {"id": str(member["id"]), "type": 1, "allow": str(Permission.VIEW_CHANNEL), "deny": "0"}]
    return staff


async def test_a_second_continue_of_a_result_points_to_the_first_and_queues_nothing(harness):
    h = harness
    fd = h.fd
    await h.start(worker=False)
    carol = fd.add_user("carol")
    msg, a = await finished_job(h, "a lighthouse in fog")

    cont_msg, c = await _queued_by(h, await fd.click_button(msg, f"imagine:continue:{a}"))
    c_url = _url(fd, cont_msg.id)
    before = await _ids(h)
    # Carol, and Bob clicking again: the same picture would come out, so each is told where it is.
    for user in (carol, None):
        told = await _told(h, await fd.click_button(msg, f"imagine:continue:{a}", user=user))
        assert told.startswith(f"Job `{a}` is already being continued: job `{c}` {c_url} (queued).")
        assert "Nothing was queued." in told
    await claim_jobs(h.queue, [c])
    told = await _told(h, await fd.click_button(msg, f"imagine:continue:{a}", user=carol))
    assert told.startswith(f"Job `{a}` is already being continued: job `{c}` {c_url} (running).")
    await _finish(h, c)
    told = await _told(h, await fd.click_button(msg, f"imagine:continue:{a}", user=carol))
    assert told.startswith(f"Job `{a}` was already continued as job `{c}` {c_url}.")
    assert "Continue that one to go further, or Reroll it for a different path" in told
    assert await _ids(h) == before and await h.queue.count_queued() == 0
    assert [m.id for m in fd.channel_messages()] == [msg.id, cont_msg.id]   # nothing public either

    # Going further is Continue on that one; a Reroll of the first is a different picture: both queue.
    await fd.wait_for(lambda: f"imagine:continue:{c}" in fd.messages[cont_msg.id].custom_ids, 5, "the buttons")
    _, further = await _queued_by(h, await fd.click_button(cont_msg, f"imagine:continue:{c}", user=carol))
    assert (await h.queue.get(further)).spec.parent_job_id == c
    _, reroll = await _queued_by(h, await fd.click_button(msg, f"imagine:reroll:{a}", user=carol))
    assert (await h.queue.get(reroll)).spec.extra["rerolls"] == a
    for job_id in (further, reroll):
        await h.queue.cancel(job_id)
        await h.wait_delivered(job_id)

    # A Continue that was cancelled or failed showed no picture: it does not count.
    msg_b, b = await finished_job(h, "a boat at night")
    _, d = await _queued_by(h, await fd.click_button(msg_b, f"imagine:continue:{b}"))
    await h.queue.cancel(d)
    assert (await h.wait_delivered(d)).state == JobState.CANCELLED
    _, e = await _queued_by(h, await fd.click_button(msg_b, f"imagine:continue:{b}", user=carol))
    await claim_jobs(h.queue, [e])
    assert await h.queue.fail(e, (await h.queue.get(e)).lease_id, "out of memory", retry=False) == JobState.FAILED
    await h.wait_delivered(e)
    _, f = await _queued_by(h, await fd.click_button(msg_b, f"imagine:continue:{b}"))
    assert len({d, e, f}) == 3 and (await h.queue.get(f)).spec.parent_job_id == b
    fd.assert_clean()


async def test_a_continue_is_found_behind_more_jobs_than_the_first_look_reads(harness):
    """The channel moved on: more jobs since an old result's Continue than the first look reads
    (CONTINUE_LOOKBACK[0]). A second Continue of that result still finds the first one."""
    from bot.imagine import CONTINUE_LOOKBACK

    h = harness
    fd = h.fd
    await h.start(worker=False)
    msg, a = await finished_job(h, "a lighthouse in fog")
    cont_msg, c = await _queued_by(h, await fd.click_button(msg, f"imagine:continue:{a}"))

    def the_channel_moves_on(db: sqlite3.Connection) -> None:   # finished, delivered jobs: copies of `a`
        for i in range(CONTINUE_LOOKBACK[0] + 10):
            db.execute("INSERT INTO jobs (id, spec, reply, user_id, channel_id, grid, total, state, created_at,"
                       " finished_at, delivered) SELECT id || ?, spec, reply, user_id, channel_id, grid, total,"
                       " state, created_at, finished_at, delivered FROM jobs WHERE id = ?", (f"later{i}", a))
    await h.write_store(the_channel_moves_on)
    first_look = [r.id for r in await h.queue.history(fd.channel_id, limit=CONTINUE_LOOKBACK[0])]
    assert c not in first_look and a not in first_look
    before = await h.queue.count_queued()
    told = await _told(h, await fd.click_button(msg, f"imagine:continue:{a}"))
    assert told.startswith(f"Job `{a}` is already being continued: job `{c}` {_url(fd, cont_msg.id)} (queued).")
    assert await h.queue.count_queued() == before
    await h.queue.cancel(c)
    await h.wait_delivered(c)
    fd.assert_clean()


async def test_two_continue_clicks_at_once_queue_one_job(harness):
    """Bob and Carol click Continue on the same result at the same moment, while the store's submit
    is slow (seconds behind a worker's write, here half a second): both would find no Continue yet
    and both queue one. The Continues of one job take turns from the look-up to the submit, so
    the second finds the first's job."""
    h = harness
    fd = h.fd
    await h.start(worker=False)
    carol = fd.add_user("carol")
    msg, a = await finished_job(h, "a lighthouse in fog")
    store_submit = h.queue.submit

    async def slow_submit(spec, **kw):   # the real store, half a second late
        await asyncio.sleep(0.5)
        return await store_submit(spec, **kw)

    h.queue.submit = slow_submit
    try:
        clicks = [await fd.click_button(msg, f"imagine:continue:{a}"),
                  await fd.click_button(msg, f"imagine:continue:{a}", user=carol)]
        answers = [await _private_or_job(h, click) for click in clicks]
    finally:
        del h.queue.submit
    continues = [r for r in await h.queue.history(fd.channel_id, limit=100) if r.spec.parent_job_id == a]
    assert len(continues) == 1, answers
    (told,) = [text for text, _ in answers if text is not None]
    (queued,) = [job for _, job in answers if job is not None]
    assert queued == continues[0].id
    assert told.startswith(f"Job `{a}` is already being continued: job `{queued}`")
    turns = h.bot.get_cog("Imagine").continue_turns
    await fd.wait_for(lambda: len(turns) == 0, 5, "every turn given back")   # none left behind
    fd.assert_clean()


async def test_reroll_and_continue_replies_and_history_name_their_source(harness):
    h = harness
    fd = h.fd
    await h.start(worker=False)
    carol = fd.add_user("carol")
    msg, a = await finished_job(h, "a lighthouse in fog")

    reroll_msg, r = await _queued_by(h, await fd.click_button(msg, f"imagine:reroll:{a}", user=carol))
    cont_msg, c = await _queued_by(h, await fd.click_button(msg, f"imagine:continue:{a}"))
    assert f"\n↻ reroll of `{a}` · {_url(fd, msg.id)}\n" in reroll_msg.content
    assert f"\n→ continues `{a}` · {_url(fd, msg.id)}\n" in cont_msg.content
    assert "continues" not in reroll_msg.content and "reroll" not in cont_msg.content
    assert f"continues {a}" not in cont_msg.content   # said once, on its own line, not in the settings too

    await claim_jobs(h.queue, [r, c])
    await _finish(h, r)
    await _finish(h, c)
    await fd.wait_for(lambda: f"imagine:reroll:{c}" in fd.messages[cont_msg.id].custom_ids, 5, "the buttons")
    # The result keeps the line.
    assert f"\n→ continues `{a}` · {_url(fd, msg.id)}\n" in fd.messages[cont_msg.id].content
    # A Reroll of a Continue: a reroll of that continue, from where both start.
    again_msg, rc = await _queued_by(h, await fd.click_button(cont_msg, f"imagine:reroll:{c}", user=carol))
    assert f"\n↻ reroll of `{c}`, which continues `{a}` · {_url(fd, cont_msg.id)}\n" in again_msg.content
    assert "→" not in again_msg.content
    for message in (reroll_msg, cont_msg, again_msg):   # no one is pinged: only the author is named
        data = fd.messages[message.id].data
        assert data["mentions"] == [] and data["mention_everyone"] is False
        assert data["content"].count("<@") == 1 and len(data["content"]) <= 2000

    while not (await h.queue.get(rc)).spec.reply:   # the bot records its reply just after showing it
        await asyncio.sleep(0.05)
    history = await ephemeral_answer(h, "history")
    assert f"`{rc}` · {_url(fd, again_msg.id)}\n  ↻ reroll of `{c}`\n" in history
    assert f"`{c}` · {_url(fd, cont_msg.id)}\n  → continues `{a}`\n" in history
    assert f"`{r}` · {_url(fd, reroll_msg.id)}\n  ↻ reroll of `{a}`\n" in history
    assert f"`{a}` · {_url(fd, msg.id)}" in history and history.count("\n  ") == 3
    fd.assert_clean()


async def test_a_source_of_another_channel_is_named_only_to_those_who_may_see_it(harness):
    """Carol remixes a job of #staff-only (she may see it) from #general. The remix's reply is
    public in #general: it says "a job from another channel", without the job's id, prompt, author
    or link, and so does Bob's Reroll of the remix. Bob, in #general, cannot see #staff-only:
    /history shows him that the remix came from somewhere, but not the job's id or its author;
    Carol sees the id. Also once that job is pruned (judged by the channel recorded for it). Nor
    does the remix aim at that job's image prompt (a picture of #staff-only). A
    thread is a channel of its own: a remix of a #general job from a thread of #general does not
    name it either."""
    h = harness
    fd = h.fd
    carol = fd.add_user("carol")
    staff = _staff_only_channel(fd, carol)
    thread = fd.add_thread("renders", fd.channel_id, owner_id=int(carol["id"]), private=False)
    await h.start(worker=False)
    admin = fd.admin_user["id"]
    inter = await fd.send_slash_command("imagine", {"prompt": "secret launch poster"}, channel_id=staff,
                                        user=fd.admin_user)
    await fd.wait_for_response(inter)
    secret_msg = await h.reply_of(inter)
    secret = h.job_id(secret_msg)
    await claim_jobs(h.queue, [secret])
    await _finish(h, secret)
    await asyncio.sleep(0.5)   # the remix finishes well after it: the prune below takes only the parent
    # It aimed at a picture of #staff-only too: a remix made elsewhere does not carry it (it stays in
    # its channel, as the job's prompt does).
    assert await h.queue.put_artifact("staffupload1", "image.png", b"a picture of #staff-only")
    await _set_extra(h, secret, image_prompt={"artifact": ["staffupload1", "image.png"], "weight": 2.0})

    def shows_no_source(message_id: int) -> None:
        content = fd.messages[message_id].content
        assert "\n↳ remix of a job from another channel\n" in content, content
        for leak in (secret, f"<@{admin}>", "launch", str(staff), str(secret_msg.id)):
            assert leak not in content, (leak, content)

    inter = await fd.send_slash_command("remix", {"job": secret, "prompt": "a brighter poster"}, user=carol)
    await fd.wait_for_response(inter)
    remix_msg = await h.reply_of(inter)
    remix = h.job_id(remix_msg)
    shows_no_source(remix_msg.id)
    await claim_jobs(h.queue, [remix])
    await _finish(h, remix)
    await fd.wait_for(lambda: f"imagine:reroll:{remix}" in fd.messages[remix_msg.id].custom_ids, 5, "the buttons")
    shows_no_source(remix_msg.id)   # the result too
    assert (await h.queue.get(remix)).spec.extra["parent"] == {"other_channel": True, "channel_id": staff}
    assert "image_prompt" not in (await h.queue.get(remix)).spec.extra

    # Bob's Reroll of the remix (a remix of the same job): no more named in its reply. Even for a
    # remix recorded as the bot did before, naming the job in full: the Reroll does not copy that.
    secret_url = _url(fd, secret_msg.id, staff)
    await _set_extra(h, remix, parent={"prompt": "secret launch poster", "user_id": int(admin), "url": secret_url})
    reroll_msg, reroll = await _queued_by(h, await fd.click_button(remix_msg, f"imagine:reroll:{remix}"))
    assert f"\n↻ reroll of `{remix}` · {_url(fd, remix_msg.id)}\n" in reroll_msg.content
    shows_no_source(reroll_msg.id)
    assert (await h.queue.get(reroll)).spec.parent_job_id == secret
    await claim_jobs(h.queue, [reroll])
    await _finish(h, reroll)

    # From a public thread of #general, a #general job is of another channel too.
    inter = await fd.send_slash_command("remix", {"job": remix, "prompt": "a quieter poster"}, user=carol,
                                        channel_id=thread)
    await fd.wait_for_response(inter)
    thread_msg = await h.reply_of(inter)
    assert thread_msg.channel_id == thread
    assert "\n↳ remix of a job from another channel\n" in thread_msg.content
    assert remix not in thread_msg.content and "brighter" not in thread_msg.content

    async def check() -> None:
        bobs = await ephemeral_answer(h, "history")
        assert f"`{remix}`" in bobs and f"`{reroll}`" in bobs
        assert bobs.count("\n  ↳ remix of a job you cannot see") == 2, bobs
        assert secret not in bobs and f"<@{admin}>" not in bobs and "launch" not in bobs and str(staff) not in bobs
        carols = await ephemeral_answer(h, "history", user=carol)
        assert carols.count(f"\n  ↳ remix of `{secret}`") == 2, carols

    await check()
    parent, child = await h.queue.get(secret), await h.queue.get(remix)
    assert await h.queue.prune(time.time() - (parent.finished_at + child.finished_at) / 2) == 1
    assert await h.queue.get(secret) is None and await h.queue.get(remix) is not None
    await check()
    fd.assert_clean()


async def test_a_pruned_source_of_an_old_reroll_or_continue_is_named_to_this_channel(harness):
    """Rerolls and Continues made before they recorded their source's link (`source_url`): once the
    source is pruned, /history still names it to whoever reads this channel's history (Bob, who
    made both, and Carol), not as "a job you cannot see": a button acts from its message's
    channel, so the source was of this very channel."""
    h = harness
    fd = h.fd
    await h.start(worker=False)
    carol = fd.add_user("carol")
    msg, a = await finished_job(h, "a lighthouse in fog")
    await asyncio.sleep(0.5)   # the others finish well after it: the prune below takes only this one
    _, r = await _queued_by(h, await fd.click_button(msg, f"imagine:reroll:{a}"))
    _, c = await _queued_by(h, await fd.click_button(msg, f"imagine:continue:{a}"))
    await claim_jobs(h.queue, [r, c])
    await _finish(h, r)
    await _finish(h, c)
    for job_id in (r, c):   # their rows as the bot wrote them before `source_url`
        await _set_extra(h, job_id, drop=("source_url",))
    assert "source_url" not in (await h.queue.get(r)).spec.extra

    source, first = await h.queue.get(a), await h.queue.get(r)
    assert await h.queue.prune(time.time() - (source.finished_at + first.finished_at) / 2) == 1
    assert await h.queue.get(a) is None
    for user in (None, carol):
        history = await ephemeral_answer(h, "history", user=user)
        assert f"\n  ↻ reroll of `{a}`" in history, history
        assert f"\n  → continues `{a}`" in history and "cannot see" not in history, history
    fd.assert_clean()


async def test_a_same_channel_remix_parent_without_a_link_stays_of_this_channel(harness):
    """A remix of a job of this very channel that has no message (yet, or lost): its record has no
    link, but it is of this channel. Bob's Reroll of the remix still names it in full, not as "a job
    from another channel", and once it is pruned /history still names it to this channel's
    readers. So too for a remix recorded before the record held its channel (`channel_id`)."""
    h = harness
    fd = h.fd
    await h.start(worker=False)
    carol = fd.add_user("carol")
    msg, a = await finished_job(h, "a lighthouse in fog")
    while not (await h.queue.get(a)).spec.reply:   # the bot records its reply just after showing it
        await asyncio.sleep(0.05)
    await h.queue.set_reply(a, {})   # a parent without a message
    await asyncio.sleep(0.5)   # the others finish well after it: the prune below takes only this one

    inter = await fd.send_slash_command("remix", {"job": a, "prompt": "a lighthouse at dawn"}, user=carol)
    await fd.wait_for_response(inter)
    remix_msg = await h.reply_of(inter)
    remix = h.job_id(remix_msg)
    assert f"\n↳ remix of `{a}` *a lighthouse in fog* by <@" in remix_msg.content, remix_msg.content
    assert (await h.queue.get(remix)).spec.extra["parent"]["channel_id"] == fd.channel_id
    await claim_jobs(h.queue, [remix])
    await _finish(h, remix)
    await fd.wait_for(lambda: f"imagine:reroll:{remix}" in fd.messages[remix_msg.id].custom_ids, 5, "the buttons")

    rerolls = []
    for old in (False, True):
        if old:   # the record as the bot wrote it before it held the parent's channel
            await _set_extra(h, remix, parent={"prompt": "a lighthouse in fog", "user_id": int(carol["id"]), "url": None})
        reroll_msg, reroll = await _queued_by(h, await fd.click_button(remix_msg, f"imagine:reroll:{remix}"))
        assert f"\n↳ remix of `{a}` *a lighthouse in fog* by <@" in reroll_msg.content, reroll_msg.content
        assert "another channel" not in reroll_msg.content
        assert "other_channel" not in (await h.queue.get(reroll)).spec.extra["parent"]
        await claim_jobs(h.queue, [reroll])
        await _finish(h, reroll)
        rerolls.append(reroll)

    source, first = await h.queue.get(a), await h.queue.get(remix)
    assert await h.queue.prune(time.time() - (source.finished_at + first.finished_at) / 2) == 1
    assert await h.queue.get(a) is None
    for user in (None, carol):
        history = await ephemeral_answer(h, "history", user=user)
        assert history.count(f"\n  ↳ remix of `{a}`") == 3, history   # the remix (an old record) and both Rerolls
        assert "cannot see" not in history, history
    fd.assert_clean()


async def test_a_reroll_refused_for_a_pruned_remix_parent_names_no_job_of_another_channel(harness):
    """Two remixes in #general: one of a #staff-only job (Carol may see it, Bob may not), one of a
    #general job. Both parents are pruned, so neither remix can be rerolled from the same start.
    Bob's Reroll of the first is refused without naming the #staff-only job ("a job from another
    channel", as the remix's reply says); that of the second names its #general parent."""
    h = harness
    fd = h.fd
    carol = fd.add_user("carol")
    staff = _staff_only_channel(fd, carol)
    await h.start(worker=False)
    inter = await fd.send_slash_command("imagine", {"prompt": "secret launch poster"}, channel_id=staff,
                                        user=fd.admin_user)
    await fd.wait_for_response(inter)
    secret = h.job_id(await h.reply_of(inter))
    await claim_jobs(h.queue, [secret])
    await _finish(h, secret)
    _, here = await finished_job(h, "a lighthouse in fog")
    await asyncio.sleep(0.5)   # the remixes finish well after them: the prune below takes only the parents

    remixes = []
    for parent in (secret, here):
        inter = await fd.send_slash_command("remix", {"job": parent, "prompt": "a brighter poster"}, user=carol)
        await fd.wait_for_response(inter)
        remix_msg = await h.reply_of(inter)
        remix = h.job_id(remix_msg)
        await claim_jobs(h.queue, [remix])
        await _finish(h, remix)
        await fd.wait_for(lambda: f"imagine:reroll:{remix}" in fd.messages[remix_msg.id].custom_ids, 5, "buttons")
        remixes.append((remix_msg, remix))
    first = await h.queue.get(remixes[0][1])
    assert await h.queue.prune(time.time() - (first.finished_at - 0.25)) == 2
    assert await h.queue.get(secret) is None and await h.queue.get(here) is None
    before = await _ids(h)

    (msg, remix), (here_msg, here_remix) = remixes
    told = await _told(h, await fd.click_button(msg, f"imagine:reroll:{remix}"))
    assert f"Job `{remix}` is a remix of a job from another channel, whose final state is gone" in told, told
    assert secret not in told
    told = await _told(h, await fd.click_button(here_msg, f"imagine:reroll:{here_remix}"))
    assert f"Job `{here_remix}` is a remix of job `{here}`, whose final state is gone" in told, told
    assert await _ids(h) == before
    fd.assert_clean()


async def test_a_job_whose_prompt_is_banned_since_is_not_remixed(harness):
    """An admin bans `cursed` after "a cursed lighthouse" finished (not cancelled: it was done). Its
    Reroll and Continue are refused (their prompt is its prompt); so is a remix of it, by /remix
    and by its Remix button alike: the remix would start from its picture, and its public reply
    would quote the banned prompt (↳ remix of … *a cursed lighthouse*). Privately, nothing queued;
    the remix's own prompt is fine. The same remix of a job the list does not match goes."""
    h = harness
    fd = h.fd
    await h.start(worker=False)
    msg, a = await finished_job(h, "a cursed lighthouse")
    ok_msg, ok = await finished_job(h, "a quiet harbour")
    text = await ephemeral_answer(h, "queue-admin ban-word add", {"entry": "cursed"}, user=fd.admin_user)
    assert "Added the word `cursed`" in text, text
    before = await h.queue.history(fd.channel_id, limit=50)
    public = {m.id for m in fd.messages.values() if not m.ephemeral}

    for action in ("reroll", "continue"):   # refused already: the contrast
        click = await fd.click_button(msg, f"imagine:{action}:{a}")
        await fd.wait_for_response(click)
        assert click.response_type == 4 and click.response["data"]["flags"] & EPHEMERAL, (action, click.response)
        assert "refused" in click.response["data"]["content"], click.response
    refusal = (f"The prompt of job `{a}` is refused by this server's list of refused words, so it cannot be "
               "remixed (a remix starts from its picture and names its prompt). Nothing was queued.")
    assert await ephemeral_answer(h, "remix", {"job": a, "prompt": "a calm sea"}) == refusal
    click = await fd.click_button(msg, f"imagine:remix:{a}")   # no form to fill in for nothing
    await fd.wait_for_response(click)
    assert click.response_type == 4 and click.response["data"]["flags"] & EPHEMERAL, click.response
    assert click.response["data"]["content"] == refusal
    assert await h.queue.history(fd.channel_id, limit=50) == before and await h.queue.count_queued() == 0
    # No public message: the banned prompt is quoted nowhere but in its own result.
    assert {m.id for m in fd.messages.values() if not m.ephemeral} == public

    inter = await fd.send_slash_command("remix", {"job": ok, "prompt": "a calm sea"})
    await fd.wait_for_response(inter)
    assert inter.response_type == 5, inter.response
    assert f"↳ remix of `{ok}` *a quiet harbour*" in (await h.reply_of(inter)).content
    fd.assert_clean()


async def test_a_reroll_of_a_remix_of_a_job_banned_since_is_refused(harness):
    """B is a remix of "a cursed lighthouse" (A), both finished; then an admin bans `cursed`. /remix
    of A is refused (above); a Reroll of B would be that remix again: from A's picture, its public
    reply quoting A's prompt (↳ remix of `A` *a cursed lighthouse*). It is refused privately, and
    nothing is queued; B's own prompt is fine."""
    h = harness
    fd = h.fd
    await h.start(worker=False)
    _, a = await finished_job(h, "a cursed lighthouse")
    remix_msg, b = await finished_job(h, command="remix", options={"job": a, "prompt": "a calm sea"})
    assert f"imagine:reroll:{b}" in fd.messages[remix_msg.id].custom_ids
    text = await ephemeral_answer(h, "queue-admin ban-word add", {"entry": "cursed"}, user=fd.admin_user)
    assert "Added the word `cursed`" in text, text
    public = {m.id for m in fd.messages.values() if not m.ephemeral}

    click = await fd.click_button(remix_msg, f"imagine:reroll:{b}")
    await fd.wait_for_response(click)
    assert click.response_type == 4 and click.response["data"]["flags"] & EPHEMERAL, click.response
    assert click.response["data"]["content"] == (
        f"Job `{b}` starts from the picture of a job whose prompt is refused by this server's list of refused "
        "words, so it cannot be rerolled. Nothing was queued.")
    assert await h.queue.count_queued() == 0
    assert {m.id for m in fd.messages.values() if not m.ephemeral} == public
    fd.assert_clean()


async def test_a_remix_whose_parent_could_not_be_checked_in_time_says_so(harness):
    """A pattern that takes too long on the job's prompt (written to the store before the add's
    checks, or slow only on this prompt) refuses the remix, but as what it is: not checked in time,
    not a match."""
    h = harness
    fd = h.fd
    await h.start(worker=False)
    _, a = await finished_job(h, "a" * 40 + "!")
    await h.queue.set_setting(f"banned:{fd.guild_id}", ["re:(a|aa)+$"])   # backtracks for ever on a…a!
    text = await ephemeral_answer(h, "remix", {"job": a, "prompt": "a calm sea"})
    assert text == (f"The prompt of job `{a}` could not be checked against this server's list of refused words "
                    "in time, so it was not remixed. Try again in a moment. Nothing was queued."), text
    assert await h.queue.count_queued() == 0
    fd.assert_clean()
