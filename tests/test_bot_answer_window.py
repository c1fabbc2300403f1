"""Discord's 3 s to answer, counted from the interaction's creation: the checks before the first
answer (the store's reads: the ban-word list, the user's cap, a job's row, the line; the ban-word
matching) race a 2 s window, and the bot defers when they are slower, then answers.

The store is the real SQLite queue whose reads are made slow: each sleeps 4 s first, as behind a
long write or while Redis retries through a reconnect (a wrapper around the real backend; nothing
of the bot is replaced). Each interaction must get its first answer (a defer) within 3 s at the
fake Discord, which answers 10062 Unknown interaction after that, and then its final answer. The
Remix button's answer is a form, which cannot follow a defer: it says privately to try again.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from bot import moderation
from bot.imagine import REMIX_TOO_SLOW
from engine.jobs import JobState
from tests.test_bot_support import (  # noqa: F401 - the fixture
    EPHEMERAL, FLAG_LOADING, JOB_ID_RE, finished_job, harness, private_answer,
)

pytestmark = pytest.mark.asyncio

DISCORD_WINDOW = 3.0
SLOW_READ = 4.0


class SlowReads:
    """The real queue, whose reads each sleep `delay` seconds first while `on`."""

    READS = ("get", "get_setting", "count_queued", "has_artifact", "running", "queued", "line", "position", "existing",
             "history")

    def __init__(self, queue, monkeypatch, delay: float = SLOW_READ):
        self.delay, self.on = delay, False
        for name in self.READS:
            monkeypatch.setattr(queue, name, self._slowed(getattr(queue, name)))

    def _slowed(self, read):
        async def slow(*args, **kwargs):
            if self.on:
                await asyncio.sleep(self.delay)
            return await read(*args, **kwargs)
        return slow


def _first_answer_in_time(inter) -> None:
    assert inter.callback_request is not None and inter.acknowledged, "never answered"
    took = inter.callback_request.monotonic - inter.created
    assert took < DISCORD_WINDOW, f"first answer after {took:.2f} s"


async def _job_reply(h, inter, timeout=30.0) -> str:
    """The job id of the public reply a deferred interaction turned into."""
    assert inter.response_type == 5 and not (inter.response.get("data") or {}).get("flags", 0) & EPHEMERAL
    return h.job_id(await h.reply_of(inter, timeout))


async def test_every_command_and_button_answers_in_time_while_the_store_reads_slowly(harness, monkeypatch):
    h = harness
    fd = h.fd
    h.config.queue.max_queued_per_user = 20
    await h.start(worker=False)
    await h.queue.set_setting(f"banned:{fd.guild_id}", ["cursed"])
    done_msg, done_id = await finished_job(h, "a lake at dawn")
    waiting_msg = await h.reply_of(await h.imagine("waiting for the button"))
    waiting_id = h.job_id(waiting_msg)
    other_id = h.job_id(await h.reply_of(await h.imagine("waiting for /queue cancel")))
    await h.reply_of(await h.imagine("still in line"))
    slow = SlowReads(h.queue, monkeypatch)

    slow.on = True
    sent = {
        "imagine": await fd.send_slash_command("imagine", {"prompt": "a lake at noon"}),
        "set": await fd.send_slash_command("imagine", {"prompt": "a {red, blue} boat"}),
        "refused": await fd.send_slash_command("imagine", {"prompt": "a cursed lake"}),
        "remix": await fd.send_slash_command("remix", {"job": done_id, "prompt": "a lake at night"}),
        "reroll": await fd.click_button(done_msg, f"imagine:reroll:{done_id}"),
        "continue": await fd.click_button(done_msg, f"imagine:continue:{done_id}"),
        "cancel button": await fd.click_button(waiting_msg, f"imagine:cancel:{waiting_id}"),
        "queue cancel": await fd.send_slash_command("queue cancel", {"job": other_id}),
        "queue show": await fd.send_slash_command("queue show"),
        "history": await fd.send_slash_command("history"),
        "help": await fd.send_slash_command("help"),
        "ban-word list": await fd.send_slash_command("queue-admin ban-word list", user=fd.admin_user),
        "remix button": await fd.click_button(done_msg, f"imagine:remix:{done_id}"),
    }
    for name, inter in sent.items():
        await fd.wait_for_response(inter, DISCORD_WINDOW + 1)
        _first_answer_in_time(inter)
        assert inter.response_type in (4, 5), name
    slow.on = False   # the reads already waiting still take their 4 s

    # The Remix form cannot follow a defer: a private "try again", no form.
    remix_button = sent.pop("remix button")
    assert remix_button.response_type == 4 and remix_button.response["data"]["flags"] & EPHEMERAL
    assert remix_button.response["data"]["content"] == REMIX_TOO_SLOW

    # Jobs: a public "thinking…" that became the job's reply.
    jobs = {name: await _job_reply(h, sent.pop(name)) for name in ("imagine", "set", "remix", "reroll", "continue")}
    records = {name: await h.queue.get(job_id) for name, job_id in jobs.items()}
    assert records["imagine"].spec.prompt == "a lake at noon"
    assert (records["remix"].spec.parent_job_id, records["remix"].spec.parent_kind) == (done_id, "remix")
    assert records["reroll"].spec.extra["rerolls"] == done_id
    assert (records["continue"].spec.parent_job_id, records["continue"].spec.parent_kind) == (done_id, "continue")
    set_id = records["set"].spec.extra["set"]["id"]
    in_set = [r for r in await h.queue.history(fd.channel_id, limit=50) if (r.spec.extra.get("set") or {}).get("id") == set_id]
    assert sorted(r.spec.prompt for r in in_set) == ["a blue boat", "a red boat"]

    # A refusal after the public defer: that "thinking…" is removed, the refusal told privately.
    refused = sent.pop("refused")
    assert refused.response_type == 5
    await fd.wait_for(lambda: refused.followups, 30, "the refusal")
    assert refused.original_message.deleted
    assert refused.followups[0].ephemeral and "which this server's admins have refused" in refused.followups[0].content

    # Private answers: a private "thinking…", then the answer in its place.
    assert await private_answer(h, sent.pop("cancel button"), 30) == f"Cancelled job `{waiting_id}`."
    assert await private_answer(h, sent.pop("queue cancel"), 30) == f"Cancelled job `{other_id}`."
    assert "still in line" in await private_answer(h, sent.pop("queue show"), 30)
    assert "a lake at dawn" in await private_answer(h, sent.pop("history"), 30)
    assert "**imagine-bot**" in await private_answer(h, sent.pop("help"), 30)
    assert "cursed" in await private_answer(h, sent.pop("ban-word list"), 30)
    assert not sent
    assert (await h.queue.get(waiting_id)).state == JobState.CANCELLED
    assert not [r for r in fd.requests if "10062" in str(r.response)]
    fd.assert_clean()


async def test_slow_ban_word_matching_is_capped_per_request_and_answered_in_time(harness, monkeypatch):
    """Matching a prompt against the server's list is slow here (each prompt's folding takes 0.5 s):
    a 9-way permutation would take 4.5 s. The whole request's check stops at MATCH_BUDGET and is
    refused as a timeout is (fail closed), after a public defer in time; nothing is queued."""
    h = harness
    fd = h.fd
    h.config.queue.max_queued_per_user = 20
    await h.start(worker=False)
    await h.queue.set_setting(f"banned:{fd.guild_id}", ["cursed", "re:dark\\s+magic"])
    fold = moderation.fold
    folded = []

    def slow_fold(text):
        if "boat" in text:   # the prompts; the entries fold at their usual speed
            folded.append(text)
            time.sleep(0.5)
        return fold(text)

    monkeypatch.setattr(moderation, "fold", slow_fold)
    assert moderation.MATCH_BUDGET < 9 * 0.5
    inter = await fd.send_slash_command("imagine", {"prompt": "a {red, blue, green} {big, small, old} boat"})
    await fd.wait_for_response(inter, DISCORD_WINDOW + 1)
    _first_answer_in_time(inter)
    assert inter.response_type == 5
    await fd.wait_for(lambda: inter.followups, 10, "the refusal")
    (refusal,) = inter.followups
    assert refusal.ephemeral and "could not be checked against this server's list of refused words in time" \
        in refusal.content
    # Stopped at the budget: each prompt's folding takes at least 0.5 s, so no more than
    # MATCH_BUDGET / 0.5 + 1 of the 9 were folded (all 9: a budget per prompt, or none).
    assert 1 <= len(folded) <= moderation.MATCH_BUDGET / 0.5 + 1 < 9, folded
    assert inter.original_message.deleted and not JOB_ID_RE.search(inter.original_message.content)
    assert await h.queue.count_queued() == 0

    # A prompt that fits in the budget is checked and queued as ever.
    inter = await fd.send_slash_command("imagine", {"prompt": "a {red, blue} boat"})
    await fd.wait_for_response(inter, DISCORD_WINDOW + 1)
    await h.reply_of(inter)
    assert await h.queue.count_queued() == 2
    fd.assert_clean()


async def test_a_host_clock_ahead_of_discords_still_gets_the_remix_form_and_is_logged_once(harness, monkeypatch,
                                                                                          caplog):
    """The answer window counts from the interaction's age: its id's time (Discord's clock) against
    this host's. Here the host's clock is 5 s ahead, so every interaction reads 5 s old when it
    arrives. The Remix button (whose answer, a form, cannot follow a defer) still gets its form from
    a quick store, and a command that can defer answers at once rather than deferring first (before:
    no wait at all, so REMIX_TOO_SLOW every time, and a defer for everything). The implausible age is
    logged once, not per interaction."""
    import logging

    from bot import imagine

    h = harness
    fd = h.fd
    await h.start(worker=False)
    msg, job_id = await finished_job(h, "a clock that runs ahead")
    monkeypatch.setattr(imagine, "_clock_logged", False)
    caplog.set_level(logging.WARNING, logger="bot.imagine")
    fd.interaction_clock_skew = 5.0

    for _ in range(2):
        click = await fd.click_button(msg, f"imagine:remix:{job_id}")
        await fd.wait_for_response(click, DISCORD_WINDOW + 1)
        _first_answer_in_time(click)
        assert click.response_type == 9, click.response   # the form, not REMIX_TOO_SLOW
    inter = await fd.send_slash_command("queue show")
    await fd.wait_for_response(inter, DISCORD_WINDOW + 1)
    _first_answer_in_time(inter)
    assert inter.response_type == 4 and inter.response["data"]["flags"] & EPHEMERAL, inter.response   # no defer
    clock = [r for r in caplog.records if "host's clock is probably ahead of Discord's" in r.getMessage()]
    assert len(clock) == 1, [r.getMessage() for r in caplog.records]
    fd.assert_clean()


async def test_pausing_every_server_defers_while_discord_is_slow_to_say_who_owns_the_bot(harness):
    """discord.py asks Discord who owns the application on the first owner check (GET
    /oauth2/applications/@me), here answered after a 4 s rate limit: `/queue-admin pause
    everywhere:True` defers privately within the window, then pauses. Before: it answered after
    the window, and Discord showed "The application did not respond" (nothing paused)."""
    from engine.jobs import PAUSED_KEY

    h = harness
    await h.start(worker=False)
    fd = h.fd
    fd.rate_limit("GET", "/oauth2/applications/@me", retry_after=SLOW_READ)
    inter = await fd.send_slash_command("queue-admin pause", {"everywhere": True}, user=fd.admin_user)
    text = await private_answer(h, inter, timeout=30)
    _first_answer_in_time(inter)
    assert inter.response_type == 5   # a private "thinking…", then the answer
    assert text.startswith("Paused for every server"), text
    assert await h.queue.get_setting(PAUSED_KEY) is True
    fd.assert_clean()
