"""Where the bot can deliver: a job is queued only where its result can be posted, and only in a
server that installed the bot.

Slash commands need none of the bot's channel permissions, but a result that comes after the
interaction token's 15 minutes goes out through the channel (an edit of the bot's reply, or a new
message with the image and video). So /imagine (a permutation set too), /remix and the Reroll /
Continue / Remix buttons look at the bot's permissions in the channel, which Discord sends with
every interaction (`app_permissions`, resolved with the channel's overwrites; the fake computes
them the same way), and refuse privately, naming what is missing, when it lacks View Channel,
Send Messages (Send Messages in Threads in a thread) or Attach Files.

Installs: the commands are synced for guild installs alone (`integration_types: [0]`), even where
the application also has User Install enabled; an interaction from a server that has not
installed the bot (it came through a user install) is refused privately, and changes nothing; a
button on a message the bot posted with its own token, sent with no owners at all, is not.
"""

from __future__ import annotations

import pytest

from bot.permissions import NOT_INSTALLED
from bot.queue_admin import user_limit_key
from engine.jobs import JobState
from tests.fakediscord import Permission
from tests.test_bot_support import EPHEMERAL, claim_jobs, finish_jobs, finished_job, harness  # noqa: F401 - the fixture

pytestmark = pytest.mark.asyncio

VIEW, SEND, ATTACH = Permission.VIEW_CHANNEL, Permission.SEND_MESSAGES, Permission.ATTACH_FILES
IN_THREADS = Permission.SEND_MESSAGES_IN_THREADS


def _deny_the_bot(fd, channel_id: int, deny: int) -> None:
    """An overwrite on the bot's role in `channel_id`, as a server admin would set it."""
    fd.channels[channel_id]["permission_overwrites"] = [
        {"id": str(fd.bot_role_id), "type": 0, "allow": "0", "deny": str(deny)}]


def _refusal(inter) -> str:
    assert inter.response_type == 4 and inter.response["data"]["flags"] & EPHEMERAL, inter.response
    return inter.response["data"]["content"]


def _missing(what: str) -> str:
    return f"I can't post results in this channel: I'm missing {what}. Ask a server admin, or use another channel."


async def test_a_job_is_refused_where_the_bot_could_not_post_its_result(harness):
    h = harness
    fd = h.fd
    no_files = fd.add_channel("no-files")
    _deny_the_bot(fd, no_files, ATTACH)
    hidden = fd.add_channel("hidden")
    _deny_the_bot(fd, hidden, VIEW)
    read_only = fd.add_channel("read-only")
    _deny_the_bot(fd, read_only, SEND)
    threads_closed = fd.add_channel("threads-closed")
    _deny_the_bot(fd, threads_closed, IN_THREADS)
    thread = fd.add_thread("ideas", threads_closed, owner_id=int(fd.member_user["id"]), private=False)
    open_thread = fd.add_thread("more ideas", fd.channel_id, owner_id=int(fd.member_user["id"]), private=False)
    await h.start(worker=False)

    cases = [
        (no_files, "a house", "Attach Files"),
        (no_files, "a {red, blue} house", "Attach Files"),           # a permutation set
        (hidden, "a house", "View Channel, Send Messages and Attach Files"),
        (read_only, "a house", "Send Messages and Attach Files"),   # files go with sending (Discord's rule)
        (thread, "a house", "Send Messages in Threads and Attach Files"),
    ]
    for channel_id, prompt, missing in cases:
        inter = await fd.send_slash_command("imagine", {"prompt": prompt}, channel_id=channel_id)
        await fd.wait_for_response(inter)
        assert _refusal(inter) == _missing(missing), (channel_id, prompt)
    assert await h.queue.count_queued() == 0

    # Where the bot may post (a thread under a channel it may post in), the job is queued as ever.
    inter = await fd.send_slash_command("imagine", {"prompt": "a house"}, channel_id=open_thread)
    await fd.wait_for_response(inter)
    assert inter.response_type == 5
    record = await h.queue.get(h.job_id(await h.reply_of(inter)))
    assert record.state == JobState.QUEUED and record.spec.channel_id == open_thread
    fd.assert_clean()


async def test_buttons_and_remix_are_refused_once_the_bot_may_no_longer_post_there(harness):
    """The job was made while the bot could post; then an admin took Attach Files away from it
    there. Reroll, Continue, Remix (before its form) and /remix queue nothing and say why."""
    h = harness
    fd = h.fd
    await h.start(worker=False)
    msg, job_id = await finished_job(h)
    h.config.queue.max_queued_per_user = 20
    _deny_the_bot(fd, fd.channel_id, ATTACH)
    for action in ("reroll", "continue", "remix"):
        click = await fd.click_button(msg, f"imagine:{action}:{job_id}")
        await fd.wait_for_response(click)
        assert _refusal(click) == _missing("Attach Files"), action   # no modal for Remix either
    inter = await fd.send_slash_command("remix", {"job": job_id, "prompt": "a lighthouse at night"})
    await fd.wait_for_response(inter)
    assert _refusal(inter) == _missing("Attach Files")
    assert await h.queue.count_queued() == 0

    fd.channels[fd.channel_id]["permission_overwrites"] = []   # given back: the buttons work again
    click = await fd.click_button(msg, f"imagine:reroll:{job_id}")
    await fd.wait_for_response(click)
    assert click.response_type == 5
    await fd.wait_for(lambda: click.original_message is not None and "Queued" in click.original_message.content,
                      10, "the reroll's reply")
    assert await h.queue.count_queued() == 1
    fd.assert_clean()


async def test_buttons_on_a_message_the_bot_posted_itself_work_without_integration_owners(harness):
    """A result the bot posted with its own token (here: its reply was deleted, so the result is a
    new message; so are results in archived threads and contact sheets) is no interaction's
    response, and Discord may send its buttons' interactions with no `authorizing_integration_owners`
    at all ({}). That is not a user install (which names the user's, "1", alone): Reroll, Remix and
    the Remix form work there as anywhere (before: refused as NOT_INSTALLED)."""
    h = harness
    fd = h.fd
    h.config.queue.max_queued_per_user = 20
    await h.start(worker=False)
    inter = await fd.send_slash_command("imagine", {"prompt": "a lighthouse"})
    await fd.wait_for_response(inter)
    msg = await h.reply_of(inter)
    job_id = h.job_id(msg)
    await fd.delete_message(msg.channel_id, msg.id)
    await claim_jobs(h.queue, [job_id])
    await h.queue.put_artifact(job_id, "state.pt", b"a final state")
    await finish_jobs(h.queue, [job_id])
    record = await h.wait_delivered(job_id)
    result = fd.messages[record.spec.reply["result_message_id"]]
    assert result.id != msg.id and "interaction_metadata" not in result.data   # posted with the bot token

    click = await fd.click_button(result, f"imagine:reroll:{job_id}", integration_owners={})
    await fd.wait_for_response(click)
    assert click.response_type == 5, click.response
    await fd.wait_for(lambda: click.original_message is not None and "Queued" in click.original_message.content,
                      10, "the reroll's reply")
    click = await fd.click_button(result, f"imagine:remix:{job_id}", integration_owners={})
    await fd.wait_for_response(click)
    assert click.response_type == 9, click.response   # the form
    submit = await fd.submit_modal(click, {"prompt": "a lighthouse at night"}, integration_owners={})
    await fd.wait_for_response(submit)
    assert submit.response_type == 5, submit.response
    await fd.wait_for(lambda: submit.original_message is not None and "Queued" in submit.original_message.content,
                      10, "the remix's reply")
    assert await h.queue.count_queued() == 2

    # A user's install alone is refused, even when it is another user's (a button on a message made
    # through Alice's install names hers, whoever clicks).
    click = await fd.click_button(result, f"imagine:reroll:{job_id}",
                                  integration_owners={"1": str(fd.admin_user["id"])})
    await fd.wait_for_response(click)
    assert _refusal(click) == NOT_INSTALLED
    assert await h.queue.count_queued() == 2
    fd.assert_clean()


async def test_commands_are_synced_for_guild_installs_only(harness):
    """The application has User Install enabled too: a command synced without `integration_types`
    would be installable on user accounts (Discord gives it the app's contexts). Each of ours says
    [0], guild install, in what the bot sends and in what Discord keeps."""
    h = harness
    fd = h.fd
    fd.install_types = [0, 1]
    await h.start(worker=False)
    (put,) = [r for r in fd.requests if r.method == "PUT" and r.path.endswith("/commands")]
    assert {c["name"] for c in put.json} >= {"imagine", "remix", "help", "queue", "queue-admin", "history"}
    for command in put.json:
        assert command["integration_types"] == [0], command["name"]
    for command in fd.global_commands:
        assert command["integration_types"] == [0], command["name"]
    fd.assert_clean()


async def test_a_server_that_has_not_installed_the_bot_is_refused_privately(harness):
    """Through a user install (added before installs were restricted, or however Discord lets one
    through) a command comes from a server that never added the bot: it could never post there,
    and /queue would write settings for that server. Refused privately; nothing changes."""
    h = harness
    fd = h.fd
    await h.start(worker=False)
    msg, job_id = await finished_job(h)
    fd.integration_owners = {"1": str(fd.member_user["id"])}   # the user's install alone
    for name, options, user in [("imagine", {"prompt": "a house"}, None), ("help", {}, None),
                                ("remix", {"job": job_id, "prompt": "a boat"}, None),
                                ("queue-admin limit", {"n": 1}, fd.admin_user), ("queue-admin pause", {}, fd.admin_user)]:
        inter = await fd.send_slash_command(name, options, user=user)
        await fd.wait_for_response(inter)
        assert _refusal(inter) == NOT_INSTALLED, name
    click = await fd.click_button(msg, f"imagine:reroll:{job_id}")
    await fd.wait_for_response(click)
    assert _refusal(click) == NOT_INSTALLED
    assert await h.queue.count_queued() == 0
    assert await h.queue.get_setting(user_limit_key(fd.guild_id)) is None
    assert not await h.queue.get_setting(f"paused:{fd.guild_id}", False)

    fd.integration_owners = None   # the server's own install: answered as ever
    inter = await fd.send_slash_command("imagine", {"prompt": "a house"})
    await fd.wait_for_response(inter)
    assert inter.response_type == 5
    fd.assert_clean()
