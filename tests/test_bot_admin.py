"""/queue (show + admin subcommands), the per-user cap, and /history."""

from __future__ import annotations

import pytest

from bot.queue_admin import USER_LIMIT_KEY, user_limit_key
from engine.jobs import JobState
from tests.fakediscord import Permission
from tests.test_bot_support import EPHEMERAL, ephemeral_answer, harness  # noqa: F401 - the fixture

pytestmark = pytest.mark.asyncio


async def _queued_jobs(h, n, user=None):
    ids = []
    for i in range(n):
        inter = await h.imagine(f"waiting job {i}", user=user)
        ids.append(h.job_id(await h.reply_of(inter)))
    return ids


async def test_non_admins_are_refused_and_nothing_changes(harness):
    h = harness
    await h.start()
    fd = h.fd
    await h.queue.set_setting("paused", True)
    ids = await _queued_jobs(h, 2, user=fd.admin_user)   # Alice's jobs: Bob may not cancel them
    before = [(await h.queue.get(j)).state for j in ids]
    for name, options, why in [("queue cancel", {"job": ids[0]}, "Only the person who asked for job"),
                               ("queue clear", {}, "Only admins"), ("queue limit", {"n": 1}, "Only admins")]:
        text = await ephemeral_answer(h, name, options)   # bob: no role, no Manage Server
        assert why in text and "Manage Server" in text, text
    for name in ("queue resume", "queue pause"):         # the whole queue: the bot's owner alone
        text = await ephemeral_answer(h, name)
        assert "Only the bot's owner" in text and "every server" in text, text
    assert [(await h.queue.get(j)).state for j in ids] == before == [JobState.QUEUED] * 2
    assert await h.queue.get_setting("paused") is True
    assert await h.queue.get_setting(user_limit_key(fd.guild_id)) is None
    assert await h.queue.get_setting(USER_LIMIT_KEY) is None
    assert await h.queue.count_queued() == 2
    h.fd.assert_clean()


async def test_anyone_may_cancel_their_own_job(harness):
    h = harness
    await h.start(worker=False)
    fd = h.fd
    (mine,) = await _queued_jobs(h, 1)                       # Bob's
    (alices,) = await _queued_jobs(h, 1, user=fd.admin_user)
    text = await ephemeral_answer(h, "queue cancel", {"job": alices})
    assert "Only the person who asked for job" in text and (await h.queue.get(alices)).state == JobState.QUEUED
    text = await ephemeral_answer(h, "queue cancel", {"job": f"  {mine} "})
    assert text == f"Cancelled job `{mine}`."
    assert (await h.queue.get(mine)).state == JobState.CANCELLED
    text = await ephemeral_answer(h, "queue cancel", {"job": mine})
    assert text == f"Job `{mine}` has already ended (cancelled)."
    fd.assert_clean()


async def test_admin_commands_by_permission_or_role_name(harness):
    h = harness
    h.config.discord.admin_roles = ["Admin"]
    await h.start()
    fd = h.fd
    # Alice: Manage Server (the Admin role), and the application's owner (pause is hers alone).
    text = await ephemeral_answer(h, "queue pause", user=fd.admin_user)
    assert "Paused" in text and await h.queue.get_setting("paused") is True
    ids = await _queued_jobs(h, 3)

    text = await ephemeral_answer(h, "queue show")                         # anyone may look
    for n, job_id in enumerate(ids, 1):
        assert f"**#{n}** `{job_id}` waiting job {n - 1}" in text
    assert "paused" in text and f"<@{fd.member_user['id']}>" in text
    assert "Not shown" not in text and "5 jobs waiting in this server" in text

    # A member whose permissions lack Manage Server but who has a role named in admin_roles.
    text = await ephemeral_answer(h, "queue cancel", {"job": ids[1]}, user=fd.admin_user,
                          member_permissions=Permission.EVERYONE)
    assert f"Cancelled job `{ids[1]}`" in text
    h.config.discord.admin_roles = []   # without the role name, the same member is refused
    text = await ephemeral_answer(h, "queue cancel", {"job": ids[0]}, user=fd.admin_user,
                          member_permissions=Permission.EVERYONE)
    assert "Only the person who asked for job" in text and "Manage Server" in text
    assert (await h.queue.get(ids[0])).state == JobState.QUEUED
    h.config.discord.admin_roles = ["Admin"]
    assert (await h.wait_delivered(ids[1])).state == JobState.CANCELLED

    text = await ephemeral_answer(h, "queue limit", {"n": 1}, user=fd.admin_user)
    assert text == "Each person may now have 1 job waiting in this server."
    assert await h.queue.get_setting(user_limit_key(fd.guild_id)) == 1
    assert await h.queue.get_setting(USER_LIMIT_KEY) is None           # nothing global
    assert await h.bot.user_limit(fd.guild_id) == 1 and await h.bot.user_limit() == 5
    assert "1 job waiting in this server" in await ephemeral_answer(h, "queue show")

    text = await ephemeral_answer(h, "queue clear", user=fd.admin_user)
    assert "2 jobs cancelled" in text
    assert await h.queue.count_queued() == 0
    for job_id in (ids[0], ids[2]):
        assert (await h.wait_delivered(job_id)).state == JobState.CANCELLED

    text = await ephemeral_answer(h, "queue resume", user=fd.admin_user)
    assert await h.queue.get_setting("paused") is False
    inter = await h.imagine("after the resume", user=fd.admin_user)
    msg = await h.reply_of(inter)
    done = await h.wait_delivered(h.job_id(msg))
    assert done.state == JobState.DONE
    fd.assert_clean()


async def test_history_lists_the_channels_prompts_with_links_to_results(harness):
    h = harness
    await h.start()
    fd = h.fd
    results = []
    for prompt in ("first idea", "second idea"):
        inter = await h.imagine(prompt)
        msg = await h.reply_of(inter)
        await h.wait_delivered(h.job_id(msg))
        results.append(msg)
    # Elsewhere: not in this channel's history.
    inter = await fd.send_slash_command("imagine", {"prompt": "other channel"}, channel_id=fd.other_channel_id)
    await fd.wait_for_response(inter)
    text = await ephemeral_answer(h, "history")
    lines = text.splitlines()
    assert "second idea" in lines[0] and "first idea" in lines[1]   # newest first
    assert "other channel" not in text
    for line, msg in zip(lines, reversed(results)):
        assert f"https://discord.com/channels/{fd.guild_id}/{fd.channel_id}/{msg.id}" in line
    fd.assert_clean()
