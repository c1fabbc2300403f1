"""A private channel's jobs stay in it: `/remix <id>` and `/queue show` give nothing of a job (its
prompt, author, id, pictures) to someone who cannot view the channel it was made in, and say no
more about such an id than about one that does not exist. Also: the per-user cap's wording says
that waiting jobs of every server count (the store counts them per person, not per server).

The fake's channel `staff-only` hides from @everyone (a permission overwrite, as Discord has them)
and lets Carol in by a member overwrite; Alice is an admin (she sees everything); Bob is a plain
member who sees #general only.
"""

from __future__ import annotations

import asyncio

import pytest

from engine.jobs import JobState
from tests.fakediscord import Permission
from tests.test_bot_support import (  # noqa: F401 - harness: the fixture
    EPHEMERAL, ephemeral_answer, finished_job, harness, private_answer,
)

pytestmark = pytest.mark.asyncio

VIEW = str(Permission.VIEW_CHANNEL)


def _private_channel(fd, name="staff-only", *, allow_users=()) -> int:
    """A text channel @everyone cannot view; `allow_users` may (member overwrites), and the bot (its
    role: it posts the results there). Before the bot connects: the overwrites reach its cache
    with the guild."""
    channel_id = fd.add_channel(name)
    overwrites = [{"id": str(fd.everyone_role_id), "type": 0, "allow": "0", "deny": VIEW},
                  {"id": str(fd.bot_role_id), "type": 0, "allow": VIEW, "deny": "0"}]
    overwrites += [{"id": str(user["id"]), "type": 1, "allow": VIEW, "deny": "0"} for user in allow_users]
    fd.channels[channel_id]["permission_overwrites"] = overwrites
    return channel_id


async def _job_in(h, prompt, *, channel_id, user, done=True):
    inter = await h.fd.send_slash_command("imagine", {"prompt": prompt}, channel_id=channel_id, user=user)
    await h.fd.wait_for_response(inter)
    job_id = h.job_id(await h.reply_of(inter))
    if done:
        assert (await h.wait_delivered(job_id)).state == JobState.DONE
    return job_id


def _answer(inter) -> str:
    assert inter.response_type == 4 and inter.response["data"]["flags"] & EPHEMERAL, inter.response
    return inter.response["data"]["content"]


async def test_remix_of_a_job_in_a_channel_one_cannot_see_reads_as_an_unknown_id(harness):
    h = harness
    fd = h.fd
    carol = fd.add_user("carol")
    staff = _private_channel(fd, allow_users=[carol])
    await h.start()
    secret = await _job_in(h, "secret launch poster", channel_id=staff, user=fd.admin_user)
    public_before = [m.id for m in fd.channel_messages(fd.channel_id)]
    queued_before = len(await h.queue.history(fd.channel_id, limit=50))

    # Bob, in #general, has the id (guessed, leaked): the same answer as for an id that never existed.
    told = _answer(await _send(h, "remix", {"job": secret, "prompt": "anything"}))
    unknown = _answer(await _send(h, "remix", {"job": "nosuchjob123", "prompt": "anything"}))
    assert told == unknown.replace("nosuchjob123", secret)
    assert f"There is no job `{secret}` you can see in this server" in told
    assert "secret" not in told.replace(secret, "") and "launch" not in told and str(staff) not in told
    # Nothing was queued or posted for him, in any channel.
    assert len(await h.queue.history(fd.channel_id, limit=50)) == queued_before
    assert [m.id for m in fd.channel_messages(fd.channel_id)] == public_before

    # Carol (let in by a member overwrite) and Alice (an admin) see the channel: they may remix it from #general.
    for user in (carol, fd.admin_user):
        inter = await _send(h, "remix", {"job": secret, "prompt": "a brighter poster", "iterations": 2}, user=user)
        assert inter.response_type == 5, inter.response   # deferred: queued
        remix_id = h.job_id(await h.reply_of(inter))
        remix = await h.queue.get(remix_id)
        assert (remix.spec.parent_job_id, remix.spec.parent_kind) == (secret, "remix")
    fd.assert_clean()


async def test_remix_of_a_job_whose_channel_the_bot_does_not_know_is_refused(harness):
    """A channel missing from the bot's cache (made after it connected: the fake sends no
    CHANNEL_CREATE) cannot be checked, so its jobs are not shown elsewhere, even to an admin."""
    h = harness
    fd = h.fd
    await h.start()
    unknown_channel = fd.add_channel("made-later")
    job_id = await _job_in(h, "a hidden lighthouse", channel_id=unknown_channel, user=fd.admin_user)
    told = _answer(await _send(h, "remix", {"job": job_id, "prompt": "anything"}, user=fd.admin_user))
    assert f"There is no job `{job_id}` you can see in this server" in told and "lighthouse" not in told
    # From the job's own channel (the caller is in it, so they see it) the remix goes ahead.
    inter = await _send(h, "remix", {"job": job_id, "prompt": "a found lighthouse", "iterations": 2},
                        user=fd.admin_user, channel_id=unknown_channel)
    assert inter.response_type == 5
    fd.assert_clean()


async def test_queue_show_and_cancel_show_only_jobs_of_channels_the_caller_can_see(harness):
    h = harness
    fd = h.fd
    staff = _private_channel(fd)
    await h.start(worker=False)   # no worker: the jobs stay in line
    hidden = await _job_in(h, "secret merger plan", channel_id=staff, user=fd.admin_user, done=False)
    open_job = await _job_in(h, "an open meadow", channel_id=fd.channel_id, user=fd.member_user, done=False)

    text = await ephemeral_answer(h, "queue show")   # Bob
    assert f"`{open_job}` an open meadow" in text
    assert hidden not in text and "merger" not in text and f"<@{fd.admin_user['id']}>" not in text
    assert "Not shown: 1 waiting job of channels you cannot see." in text
    # Nor does /queue cancel confirm the id to him (he could not cancel it anyway).
    assert await ephemeral_answer(h, "queue cancel", {"job": hidden}) == (
        f"There is no job `{hidden}` in this server; see `/queue show` for the ids.")
    assert (await h.queue.get(hidden)).state == JobState.QUEUED

    text = await ephemeral_answer(h, "queue show", user=fd.admin_user)   # Alice sees #staff-only
    assert f"`{hidden}` secret merger plan" in text and f"`{open_job}` an open meadow" in text
    assert "Not shown" not in text
    fd.assert_clean()


async def test_the_caps_wording_says_jobs_of_other_servers_count(harness):
    """The cap is the server's, the count is the person's waiting jobs in every server: Bob, with
    one job waiting in A and none in B, is refused in B (cap 1), and every text about the cap says why."""
    h = harness
    fd = h.fd
    b = fd.add_guild("Other Guild")
    await h.start(worker=False)
    everywhere = "jobs waiting in other servers count too"
    text = await ephemeral_answer(h, "queue-admin limit", {"n": 1}, guild_id=b.id, user=fd.admin_user)
    assert text == f"Each person may now have 1 job waiting when they queue in this server; {everywhere}."
    await _job_in(h, "apple", channel_id=fd.channel_id, user=fd.member_user, done=False)   # in A

    text = await ephemeral_answer(h, "imagine", {"prompt": "banana"}, guild_id=b.id)
    assert "You already have 1 job waiting; the limit is 1." in text and everywhere.capitalize() in text
    text = await ephemeral_answer(h, "queue show", guild_id=b.id)
    assert text.endswith(f"-# Each person may have 1 job waiting when they queue in this server; {everywhere}.")
    assert "in this server." not in text
    assert await h.queue.count_queued() == 1
    fd.assert_clean()


async def _send(h, name, options, *, user=None, channel_id=None):
    inter = await h.fd.send_slash_command(name, options, user=user, channel_id=channel_id)
    await h.fd.wait_for_response(inter)
    return inter


async def _thread_member_joins(h, thread_id, user) -> None:
    """Discord's THREAD_MEMBERS_UPDATE: `user` was added to the thread; waits for the bot's cache.
    (Discord sends it for other users only with the members intent, which the bot does not ask
    for: without it a thread member is not known as one, and sees the thread's jobs only from
    inside the thread.)"""
    fd = h.fd
    await fd.dispatch("THREAD_MEMBERS_UPDATE", {
        "id": str(thread_id), "guild_id": str(fd.guild_id), "member_count": 2,
        "added_members": [{"id": str(thread_id), "user_id": str(user["id"]),
                           "join_timestamp": "2026-01-01T00:00:00+00:00", "flags": 0}]})
    thread = h.bot.get_guild(fd.guild_id).get_thread(thread_id)
    for _ in range(100):   # the bot's cache, not the fake's: fd.wait_for would not re-check it
        if any(m.id == int(user["id"]) for m in thread.members):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the bot never cached the thread member")


async def test_jobs_of_a_private_thread_show_only_to_its_members(harness):
    """A private thread under #general: Discord shows it to its members (its owner Dan, and Carol,
    added to it) and to those who may manage the channel's threads (Alice, an admin), not to
    everyone who sees #general. Bob, in #general but not in the thread, gets nothing of its jobs."""
    h = harness
    fd = h.fd
    carol = fd.add_user("carol")
    dan = fd.add_user("dan")
    thread = fd.add_thread("dans-secret-thread", fd.channel_id, owner_id=int(dan["id"]), private=True)
    await h.start(worker=False)   # no worker: the job stays in line
    await _thread_member_joins(h, thread, carol)
    hidden = await _job_in(h, "secret thread plans", channel_id=thread, user=dan, done=False)

    text = await ephemeral_answer(h, "queue show")   # Bob
    assert hidden not in text and "thread plans" not in text
    assert "Not shown: 1 waiting job of channels you cannot see." in text
    assert await ephemeral_answer(h, "queue cancel", {"job": hidden}) == (
        f"There is no job `{hidden}` in this server; see `/queue show` for the ids.")
    told = _answer(await _send(h, "remix", {"job": hidden, "prompt": "anything"}))
    assert f"There is no job `{hidden}` you can see in this server" in told and "thread plans" not in told
    assert (await h.queue.get(hidden)).state.name == "QUEUED"

    for user in (carol, dan, fd.admin_user):   # from #general: a member, the owner, an admin
        text = await ephemeral_answer(h, "queue show", user=user)
        assert f"`{hidden}` secret thread plans" in text and "Not shown" not in text, (user["username"], text)
    fd.assert_clean()


def _thread_member_lookups(fd, thread_id) -> int:
    return sum(1 for r in fd.requests
               if r.method == "GET" and r.path.startswith(f"/channels/{thread_id}/thread-members/"))


async def test_a_private_thread_member_the_bot_was_never_told_of_is_asked_of_discord(harness):
    """Discord tells the bot about other users joining a private thread only with the privileged
    members intent, which it does not ask for. Erin was added to Dan's thread without the bot
    hearing of it: Get Thread Member says she is in, so she sees the thread's jobs from #general;
    Bob, not in it, still does not. One command asks once per thread, however many jobs it has."""
    h = harness
    fd = h.fd
    dan = fd.add_user("dan")
    erin = fd.add_user("erin")
    thread = fd.add_thread("dans-secret-thread", fd.channel_id, owner_id=int(dan["id"]), private=True)
    fd.add_thread_member(thread, int(erin["id"]))
    await h.start(worker=False)   # no worker: the jobs stay in line
    first = await _job_in(h, "secret thread plans", channel_id=thread, user=dan, done=False)
    second = await _job_in(h, "more thread plans", channel_id=thread, user=dan, done=False)
    assert not any(m.id == int(erin["id"]) for m in h.bot.get_guild(fd.guild_id).get_thread(thread).members)

    asked = _thread_member_lookups(fd, thread)
    text = await ephemeral_answer(h, "queue show", user=erin)
    assert f"`{first}` secret thread plans" in text and f"`{second}` more thread plans" in text, text
    assert "Not shown" not in text
    assert _thread_member_lookups(fd, thread) == asked + 1
    told = await ephemeral_answer(h, "queue cancel", {"job": first}, user=erin)   # seen, not hers to cancel
    assert told.startswith(f"Only the person who asked for job `{first}`"), told

    text = await ephemeral_answer(h, "queue show")   # Bob: Discord answers 404, he is not in it
    assert first not in text and second not in text and "thread plans" not in text
    assert "Not shown: 2 waiting jobs of channels you cannot see." in text, text
    assert await ephemeral_answer(h, "queue cancel", {"job": first}) == (
        f"There is no job `{first}` in this server; see `/queue show` for the ids.")
    assert [(await h.queue.get(j)).state.name for j in (first, second)] == ["QUEUED", "QUEUED"]
    fd.assert_clean()


async def test_queue_show_asks_discord_about_ten_private_threads_at_most(harness):
    """A line with jobs in 12 private threads the caller's membership of is unknown to the bot:
    one `/queue show` asks Discord about 10 of them, and hides the rest (what cannot be checked is
    hidden), so a long line costs a bounded number of requests and the answer stays in time."""
    h = harness
    fd = h.fd
    dan = fd.add_user("dan")
    erin = fd.add_user("erin")
    threads = [fd.add_thread(f"thread-{n}", fd.channel_id, owner_id=int(dan["id"]), private=True)
               for n in range(12)]
    for thread in threads:
        fd.add_thread_member(thread, int(erin["id"]))
    h.config.queue.max_queued_per_user = 12
    await h.start(worker=False)
    jobs = [await _job_in(h, f"plan {n}", channel_id=thread, user=dan, done=False)
            for n, thread in enumerate(threads)]
    before = sum(_thread_member_lookups(fd, t) for t in threads)
    text = await ephemeral_answer(h, "queue show", user=erin)
    assert sum(_thread_member_lookups(fd, t) for t in threads) - before == 10
    assert sum(1 for j in jobs if f"`{j}`" in text) == 10, text
    assert "Not shown: 2 waiting jobs of channels you cannot see." in text, text
    fd.assert_clean()


async def test_a_thread_whose_parent_the_bot_does_not_know_hides_its_jobs(harness):
    """A thread whose parent channel is missing from the bot's cache: discord.py cannot resolve its
    permissions (ClientException). Its jobs are hidden elsewhere, and the command is still answered."""
    h = harness
    fd = h.fd
    parent = fd.add_channel("gone-parent")
    thread = fd.add_thread("orphan", parent, owner_id=int(fd.admin_user["id"]), private=False)
    del fd.channels[parent]   # not in GUILD_CREATE: the thread's parent is unknown to the bot
    await h.start(worker=False)
    # Bob's job, Alice looks (one's own jobs are shown to their author wherever they are).
    hidden = await _job_in(h, "an orphaned thread job", channel_id=thread, user=fd.member_user, done=False)
    text = await ephemeral_answer(h, "queue show", user=fd.admin_user)
    assert hidden not in text and "Not shown: 1 waiting job of channels you cannot see." in text
    fd.assert_clean()


def _forge(fd, message, custom_id: str) -> str:
    """Discord delivers whatever custom id a client sends: the fake's copy of `message` now has a
    first button bearing `custom_id` (a modified client's forgery). Click it at once: the bot may
    edit the message meanwhile."""
    button = next(c for row in fd.messages[message.id].data["components"] for c in row.get("components", []))
    button["custom_id"] = custom_id
    return custom_id


async def _click_forged(h, message, custom_id, *, user) -> str:
    """A forged button's private answer."""
    return await private_answer(h, await h.fd.click_button(message, _forge(h.fd, message, custom_id), user=user))


def _reuse_refusal(job_id: str) -> str:
    return f"Job `{job_id}` is no longer in the store, so it cannot be reused."


async def test_forged_buttons_naming_another_servers_job_read_as_an_unknown_id(harness):
    """A button on a message in server B whose custom id names a job of server A: Reroll and
    Continue queue nothing (they would post A's prompt, its uploads and its final state in B) and
    Cancel confirms nothing, even to an admin of B: each answers as an unknown id does."""
    h = harness
    fd = h.fd
    b = fd.add_guild("Other Guild")
    carol = fd.add_user("carol", admin=True, guild_id=b.id)   # B's admin, not A's
    await h.start(worker=False)
    _, secret = await finished_job(h, "a secret lighthouse")                       # A, Bob's
    msg_b, _ = await finished_job(h, "a banana", channel_id=b.channel_id)   # B
    waiting = await _job_in(h, "apricot plans", channel_id=fd.channel_id, user=fd.admin_user, done=False)  # A
    queued = await h.queue.count_queued()
    b_messages = [m.id for m in fd.channel_messages(msg_b.channel_id)]

    for action in ("reroll", "continue"):
        for user in (fd.member_user, carol):   # Bob (a member of both servers), Carol (B's admin)
            text = await _click_forged(h, msg_b, f"imagine:{action}:{secret}", user=user)
            assert text == _reuse_refusal(secret), (action, text)
        assert await _click_forged(h, msg_b, f"imagine:{action}:0123456789ab", user=carol) == (
            _reuse_refusal("0123456789ab"))
    for user in (fd.member_user, carol):
        text = await _click_forged(h, msg_b, f"imagine:cancel:{waiting}", user=user)
        assert text == f"There is no job `{waiting}`.", text
    assert await _click_forged(h, msg_b, "imagine:cancel:0123456789ab", user=carol) == (
        "There is no job `0123456789ab`.")

    assert await h.queue.count_queued() == queued
    assert (await h.queue.get(waiting)).state == JobState.QUEUED
    assert [m.id for m in fd.channel_messages(msg_b.channel_id)] == b_messages
    fd.assert_clean()


async def test_forged_buttons_naming_a_hidden_channels_job_read_as_an_unknown_id(harness):
    """In one server: a button in #general forged to name a job of #staff-only, which Bob cannot
    view. Reroll does not queue its prompt in public, Continue and Cancel do not confirm it."""
    h = harness
    fd = h.fd
    staff = _private_channel(fd)
    await h.start(worker=False)   # no worker: the jobs stay in line
    hidden = await _job_in(h, "secret merger plan", channel_id=staff, user=fd.admin_user, done=False)
    inter = await fd.send_slash_command("imagine", {"prompt": "an open meadow"})   # Bob, in #general
    await fd.wait_for_response(inter)
    mine = await h.reply_of(inter)
    queued = await h.queue.count_queued()
    public = [m.id for m in fd.channel_messages(fd.channel_id)]

    for action in ("reroll", "continue"):
        text = await _click_forged(h, mine, f"imagine:{action}:{hidden}", user=fd.member_user)
        assert text == _reuse_refusal(hidden), (action, text)
    text = await _click_forged(h, mine, f"imagine:cancel:{hidden}", user=fd.member_user)
    assert text == f"There is no job `{hidden}`.", text

    assert await h.queue.count_queued() == queued
    assert (await h.queue.get(hidden)).state == JobState.QUEUED
    assert [m.id for m in fd.channel_messages(fd.channel_id)] == public
    assert "merger" not in " ".join(m.content for m in fd.channel_messages(fd.channel_id, include_ephemeral=True))
    fd.assert_clean()
