"""Bad input gets an ephemeral message that says what to fix; odd input is echoed safely, never pings."""

from __future__ import annotations

import re
import unicodedata

import pytest

from engine.jobs import JobState
from tests.fakediscord import FakeDiscord
from tests.test_bot_support import EPHEMERAL, Harness, harness, test_config, tiny_png  # noqa: F401 - the fixture

pytestmark = pytest.mark.asyncio


def _refusal(inter) -> str:
    assert inter.response_type == 4, inter.response_type          # answered at once, not deferred
    data = inter.response["data"]
    assert data["flags"] & EPHEMERAL                               # only the user sees it
    assert data["allowed_mentions"] == {"parse": []}
    return data["content"]


async def test_bad_input_is_refused_ephemerally_and_nothing_is_queued(harness):
    h = harness
    await h.start()
    cases = [
        ({"prompt": "x" * 5000}, ["5,000 characters", "limit is 500", "77 tokens"]),
        ({"prompt": ""}, ["prompt is empty"]),
        ({"prompt": "   \t  "}, ["prompt is empty"]),
        ({"prompt": "ok", "iterations": 0}, ["`iterations` must be between 1 and 40"]),
        ({"prompt": "ok", "iterations": 100000}, ["`iterations` must be between 1 and 40"]),
        ({"prompt": "ok", "seed": -1}, ["`seed` must be between 0 and"]),
        ({"prompt": "ok", "size": 300}, ["`size` must be one of 256, 512"]),
        # Nothing visible: zero-width and format characters, Hangul fillers, a braille blank.
        ({"prompt": "\u200b\u200b\u2060\ufeff"}, ["prompt is empty"]),
        ({"prompt": "\u3164 \u2800 \u00ad"}, ["prompt is empty"]),
        ({"prompt": "a house | \u200b:0.5"}, ["has a weight but no text"]),
        ({"prompt": "a house | \u200b | b"}, ["empty part"]),
    ]
    for options, expected in cases:
        inter = await h.fd.send_slash_command("imagine", options)
        await h.fd.wait_for_response(inter)
        text = _refusal(inter)
        for fragment in expected:
            assert fragment in text, (options, text)
    assert await h.queue.count_queued() == 0
    assert await h.queue.history(h.fd.channel_id) == []
    assert h.fd.channel_messages() == []   # nothing public was posted
    h.fd.assert_clean()


async def test_mentions_emoji_and_rtl_are_echoed_without_pinging(harness):
    h = harness
    await h.start()
    fd = h.fd
    prompts = [
        "@everyone look at @here and <@%s> *bold* `code`" % fd.admin_user["id"],
        "🐙 an octopus 🎨 painting 👩🏽‍🎨",
        "بيت من تصميم إيشر",                       # RTL: "a house designed by Escher"
    ]
    jobs = []
    for prompt in prompts:
        inter = await h.imagine(prompt)
        msg = await h.reply_of(inter)
        jobs.append((prompt, msg, h.job_id(msg)))
    for prompt, msg, job_id in jobs:
        record = await h.wait_delivered(job_id)
        assert record.state == JobState.DONE
        assert record.spec.prompt == prompt   # stored exactly as typed
        stored = fd.messages[msg.id]
        assert stored.data["mention_everyone"] is False
        assert stored.data["mentions"] == [] and stored.data["mention_roles"] == []
    # Every message the bot sent or edited allowed no mentions at all.
    bodies = [r for r in fd.requests if r.method in ("POST", "PATCH") and isinstance(r.json, dict)
              and "content" in r.json]
    assert bodies and all(r.json.get("allowed_mentions") == {"parse": []} for r in bodies)
    # Emoji and RTL text come through unchanged; Markdown in prompts is escaped, mentions shown as typed.
    assert "🐙 an octopus 🎨 painting 👩🏽‍🎨" in fd.messages[jobs[1][1].id].content
    assert "بيت من تصميم إيشر" in fd.messages[jobs[2][1].id].content
    first = fd.messages[jobs[0][1].id].content
    assert "@everyone" in first and "\\*bold\\*" in first and "\\`code\\`" in first
    fd.assert_clean()


def _longest_mark_run(text: str) -> int:
    run = best = 0
    for ch in text:
        run = run + 1 if unicodedata.category(ch) in ("Mn", "Me") else 0
        best = max(best, run)
    return best


async def test_echoed_prompts_cannot_reorder_stack_or_break_the_lines_around_them(harness):
    """A bidi override would flip the job id and the mention after it (in the reply, in /queue show,
    in /history); hundreds of combining marks on one letter (zalgo) pile up over other messages;
    newlines (the Remix modal takes them) would make the reply as tall as the user likes. The
    prompt is stored as typed; what is echoed is one line, without those."""
    h = harness
    await h.start(worker=False)
    fd = h.fd
    prompt = "a house\u202e by Escher\n# huge\n\n\nz" + "\u0301" * 300 + " \u2066done"
    inter = await h.imagine(prompt)
    msg = await h.reply_of(inter)
    record = await h.queue.get(h.job_id(msg))
    assert record.spec.prompt == prompt
    head, *_ = msg.content.split("\n")
    assert "done" in head and "huge" in head, msg.content          # the prompt on one line
    shown = [msg.content]
    for name in ("queue show", "history"):
        other = await fd.send_slash_command(name, {})
        await fd.wait_for_response(other)
        shown.append(other.response["data"]["content"])
    for text in shown:
        assert not re.search("[\u202a-\u202e\u2066-\u2069]", text), text
        assert _longest_mark_run(text) <= 4, text
    fd.assert_clean()


async def test_refusals_quote_the_prompt_safely_and_fit_in_a_message(tmp_path, tiny_models):
    """With a long configured limit (Discord takes up to 6000 characters in an option), refusals
    that quote the prompt still fit Discord's 2000, and Markdown in the quote stays text."""
    fd = FakeDiscord()
    await fd.start()
    h = Harness(fd=fd, config=test_config(tmp_path, imagine={"max_prompt_chars": 6000}), models=tiny_models)
    try:
        await h.start(worker=False)
        cases = [
            ("[click me](https://evil.example) " + "x" * 5000 + ":500", "must be a number between -100 and 100"),
            ("[click me](https://evil.example):0 | b:-1", "positive weight"),
            ("{a, b}" * 1000, "at most 9 are allowed"),
        ]
        for prompt, expected in cases:
            inter = await fd.send_slash_command("imagine", {"prompt": prompt})
            await fd.wait_for_response(inter)
            text = _refusal(inter)
            assert expected in text and len(text) <= 2000, text[:300]
            assert not re.search(r"(?<!\\)\[click me\]\(", text), text[:300]   # no masked link
        assert await h.queue.count_queued() == 0
        fd.assert_clean()
    finally:
        await h.stop()
        await fd.close()


async def test_a_failed_attachment_download_is_a_clear_ephemeral_refusal(harness):
    """The CDN refusing the connection (not an HTTP error) is the user's to retry, not our crash."""
    h = harness
    await h.start(worker=False)
    fd = h.fd
    picture = fd.host_attachment("p.png", tiny_png())
    picture["url"] = picture["proxy_url"] = "http://127.0.0.1:9/attachments/1/2/p.png"   # nothing listens there
    inter = await fd.send_slash_command("imagine", {"prompt": "a house", "image": picture})
    await fd.wait_for(lambda: inter.acknowledged, 10, "an answer")
    text = _refusal(inter)
    assert "`image`" in text and "Attach it again" in text, text
    assert await h.queue.count_queued() == 0 and fd.channel_messages() == []
    fd.assert_clean()


async def test_a_bad_permutation_prompt_with_a_picture_is_refused_before_the_download(harness):
    """Every refusal of a permutation prompt (its braces, its count, the refused words of each
    combination, the user's cap) comes before the picture is downloaded and stored."""
    h = harness
    await h.start(worker=False)
    fd = h.fd
    admin = {"user": fd.admin_user}
    await fd.send_slash_command("queue ban-word add", {"entry": "cursed"}, **admin)
    picture = fd.host_attachment("p.png", tiny_png())
    for prompt, why in [("a {red, blue house", "never closed"), ("{a, b, c} {d, e, f} {g, h}", "at most 9"),
                        ("a {red, cursed} barn", "refused"), ("{blurry, foggy}:-1", "positive weight"),
                        ("a {1, 2, 3, 4, 5, 6} house", "only 5 more")]:
        inter = await fd.send_slash_command("imagine", {"prompt": prompt, "image": picture})
        await fd.wait_for_response(inter)
        assert why in _refusal(inter), prompt
    assert fd.cdn_requests == []
    assert await h.queue.count_queued() == 0 and fd.channel_messages() == []
    fd.assert_clean()


async def test_our_own_error_after_a_public_defer_is_told_only_to_the_user(tmp_path, tiny_models):
    """A command that fails on our side after deferring publicly (here the queue's file is locked
    by another process past its busy timeout, so the submit fails after the defer) answers with an
    ephemeral word: the public "thinking…" message goes first, since Discord would turn the first
    follow-up into that public message, and the channel keeps nothing of it."""
    import sqlite3

    db = tmp_path / "queue.db"
    fd = FakeDiscord()
    await fd.start()
    h = Harness(fd=fd, config=test_config(tmp_path, queue={"url": f"sqlite:///{db}?busy_timeout=0.3"}),
                models=tiny_models)
    locker = None
    try:
        await h.start(worker=False)
        locker = sqlite3.connect(db, isolation_level=None)
        locker.execute("BEGIN IMMEDIATE")   # another process writing: reads go on (WAL), writes wait
        inter = await fd.send_slash_command("imagine", {"prompt": "a house"})
        await fd.wait_for(lambda: inter.followups, 10, "the error follow-up")
        assert inter.response_type == 5   # deferred publicly, then the submit failed
        (told,) = inter.followups
        assert told.ephemeral and "Something went wrong on my side" in told.content
        assert inter.original_message is None or inter.original_message.deleted
        assert fd.channel_messages() == []   # nothing public is left of it
        locker.execute("ROLLBACK")
        assert await h.queue.count_queued() == 0
        fd.assert_clean()
    finally:
        if locker is not None:
            locker.close()
        await h.stop()
        await fd.close()
