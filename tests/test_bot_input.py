"""Bad input gets an ephemeral message that says what to fix; odd input is echoed safely, never pings."""

from __future__ import annotations

import asyncio
import re
import sqlite3
import unicodedata

import pytest
import pytest_asyncio

from bot import moderation
from bot.queue_admin import user_limit_key
from engine.jobs import JobState
from tests.fakediscord import FakeDiscord
from tests.test_bot_support import (  # noqa: F401 - the fixture
    EPHEMERAL, WEBHOOK_ORIGINAL, Harness, ephemeral_answer, finished_job, harness, private_answer,
    test_config, tiny_png,
)

BIDI_CONTROLS = re.compile("[\u202a-\u202e\u2066-\u2069]")

pytestmark = pytest.mark.asyncio


@pytest_asyncio.fixture
async def busy_harness(tmp_path, tiny_models):
    """A harness whose SQLite queue waits only 0.3 s for another process's write lock, and a second
    connection to the same file (`locker`) that a test can take that lock with."""
    db = tmp_path / "queue.db"
    fd = FakeDiscord()
    await fd.start()
    h = Harness(fd=fd, config=test_config(tmp_path, queue={"url": f"sqlite:///{db}?busy_timeout=0.3"}),
                models=tiny_models)
    locker = sqlite3.connect(db, isolation_level=None)
    try:
        yield h, locker
    finally:
        locker.close()
        await h.stop()
        await fd.close()


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
        ({"prompt": "ok", "size": 300}, ["`size` must be one of 64, 128"]),
        # Nothing visible: zero-width and format characters, Hangul fillers, a braille blank.
        ({"prompt": "\u200b\u200b\u2060\ufeff"}, ["prompt is empty"]),
        ({"prompt": "\u3164 \u2800 \u00ad"}, ["prompt is empty"]),
        ({"prompt": "a house | \u200b:0.5"}, ["has a weight but no text"]),
        ({"prompt": "a house | \u200b | b"}, ["empty part"]),
        ({"prompt": "a house \ud800"}, ["broken character"]),   # JSON can say "\ud800"; UTF-8 cannot
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
        assert not BIDI_CONTROLS.search(text), text
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


async def test_a_weight_refusal_quotes_a_link_as_text():
    """The weight's refusal quotes the part: a URL in it was a live link (and its `_` Markdown)."""
    from bot.imagine import prompt_problem

    text = prompt_problem("a house | http://x.example/a_b:-1x")
    assert text and "http\\://x.example/a\\_b" in text and "http://" not in text, text


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
    assert "Added" in await ephemeral_answer(h, "queue-admin ban-word add", {"entry": "cursed"}, user=fd.admin_user)
    picture = fd.host_attachment("p.png", tiny_png())
    # (`{blurry, foggy}:-1` with the picture at its default weight 1 is fine: the picture is pulled
    # toward. At weight -1 nothing is.)
    for prompt, why, weight in [
        ("a {red, blue house", "never closed", None), ("{a, b, c} {d, e, f} {g, h}", "at most 9", None),
        ("a {red, cursed} barn", "refused", None),
        ("{blurry, foggy}:-1", "at least one part, or the image prompt, needs a positive weight", -1.0),
        ("blurry:-1", "at least one part, or the image prompt, needs a positive weight", 0.0),
        ("a {1, 2, 3, 4, 5, 6} house", "can never be queued whole", None),
    ]:
        options = {"prompt": prompt, "image": picture} | ({"image_weight": weight} if weight is not None else {})
        inter = await fd.send_slash_command("imagine", options)
        await fd.wait_for_response(inter)
        assert why in _refusal(inter), prompt
    assert fd.cdn_requests == []
    assert await h.queue.count_queued() == 0 and fd.channel_messages() == []
    fd.assert_clean()


async def test_our_own_error_after_a_public_defer_is_told_only_to_the_user(busy_harness):
    """A command that fails on our side after deferring publicly (here the queue's file is locked
    by another process past its busy timeout, so the submit fails after the defer) answers with an
    ephemeral word: the public "thinking…" message goes first, since Discord would turn the first
    follow-up into that public message, and the channel keeps nothing of it."""
    h, locker = busy_harness
    fd = h.fd
    await h.start(worker=False)
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


async def test_refusals_quote_a_refused_word_or_a_combination_without_bidi_controls_or_zalgo(harness):
    """What a refusal quotes of the prompt (the text a refused pattern matched, a permutation
    combination or group, a part whose weight is wrong) is tamed like every echo: a bidi override
    in it would reorder the rest of the refusal, a pile of combining marks would spill over it."""
    h = harness
    await h.start(worker=False)
    fd = h.fd
    for entry in (r"re:cur.sed", r"re:z\p{Mn}+"):
        assert "Added" in await ephemeral_answer(h, "queue-admin ban-word add", {"entry": entry}, user=fd.admin_user)
    cases = [
        ("a cur\u202esed house", "refused", "cursed"),                   # the matched text, as typed
        ("z" + "\u0301" * 40 + " lake", "refused", "z" + "\u0301" * 4),
        ("\u202e{blurry, foggy}:-1", "positive weight", "in the combination `blurry:-1`"),
        ("a {red\u202e, blue house", "never closed", "`{red, blue house`"),
        ("a house" + "\u0301" * 30 + ":500", "between -100 and 100", "a house" + "\u0301" * 4),   # the engine's quote
    ]
    for prompt, why, shown in cases:
        inter = await fd.send_slash_command("imagine", {"prompt": prompt})
        await fd.wait_for_response(inter)
        text = _refusal(inter)
        assert why in text and shown in text, (prompt, text)
        assert not BIDI_CONTROLS.search(text), (prompt, text)
        assert _longest_mark_run(text) <= 4, (prompt, text)
    assert await h.queue.count_queued() == 0
    fd.assert_clean()


async def test_imagine_with_a_picture_checks_the_prompt_once_before_the_download(harness, monkeypatch):
    """Every refusal of /imagine comes before the picture is downloaded and stored (a refused
    prompt leaves no upload behind), and each check runs once before it: each prompt (each
    combination of a permutation prompt) is matched against the refused words once, the user's cap
    is read once, and what the check found goes on to the submit. The refused words are matched
    once more just before the submit (imagine.late_refusal: an entry added during the download)."""
    h = harness
    await h.start(worker=False)
    fd = h.fd
    assert "Added" in await ephemeral_answer(h, "queue-admin ban-word add", {"entry": "cursed"}, user=fd.admin_user)
    matched: list[str] = []
    counted: list[int] = []
    find, count_queued = moderation.find, h.queue.count_queued

    def counting_find(entries, prompt, max_chars, *deadline):
        matched.append(prompt)
        return find(entries, prompt, max_chars, *deadline)

    async def counting_count(user_id=None):
        if user_id is not None:
            counted.append(user_id)
        return await count_queued(user_id)

    monkeypatch.setattr(moderation, "find", counting_find)
    monkeypatch.setattr(h.queue, "count_queued", counting_count)
    picture = fd.host_attachment("p.png", tiny_png())

    inter = await fd.send_slash_command("imagine", {"prompt": "a {red, blue} house", "image": picture})
    await h.reply_of(inter)
    await fd.wait_for(lambda: len(fd.channel_messages()) == 2, 10, "the set's two replies")
    assert sorted(matched) == ["a blue house"] * 2 + ["a red house"] * 2 and len(counted) == 1, (matched, counted)
    jobs = await h.queue.history(fd.channel_id)
    assert len(jobs) == 2 and all("image_prompt" in r.spec.extra for r in jobs)

    matched.clear()
    counted.clear()
    inter = await fd.send_slash_command("imagine", {"prompt": "a house", "image": picture})
    msg = await h.reply_of(inter)
    assert "image prompt" in msg.content
    assert matched == ["a house", "a house"] and len(counted) == 1, (matched, counted)
    assert len(fd.cdn_requests) == 2

    # At the cap: refused before anything is downloaded, for a plain prompt and for a set.
    await h.queue.set_setting(user_limit_key(fd.guild_id), 3)
    for prompt, why in [("a boat", "You already have 3 jobs waiting"), ("a {red, blue} boat", "only 0 more")]:
        inter = await fd.send_slash_command("imagine", {"prompt": prompt, "image": picture})
        await fd.wait_for_response(inter)
        assert why in _refusal(inter), prompt
    assert len(fd.cdn_requests) == 2 and await h.queue.count_queued() == 3
    fd.assert_clean()


async def test_a_store_failure_after_the_jobs_reply_keeps_the_reply_and_writes_it_later(busy_harness):
    """The Remix modal's submit: submit() defers, queues the job and edits the "thinking…" message
    into the job's queued reply (with its Cancel button); then recording that reply in the store
    fails (the queue's file is locked by another process past its busy timeout the moment the
    reply is shown). The job is queued and its reply shows it, so the user is told no error; the
    progress cog writes the reply once the store is back (a restart then finds it), and its Cancel
    button works. Before: the user was told our error, and the reply was never written."""
    h, locker = busy_harness
    fd = h.fd
    await h.start(worker=False)
    parent, job_id = await finished_job(h, "a red house")
    click = await fd.click_button(parent, f"imagine:remix:{job_id}")
    await fd.wait_for_response(click)
    assert click.response_type == 9

    since = len(fd.requests)

    def lock_once_the_reply_is_shown():
        for r in fd.requests[since:]:
            content = str(r.json.get("content") or "") if isinstance(r.json, dict) else ""
            if (r.method == "PATCH" and r.status == 200 and re.search(WEBHOOK_ORIGINAL, r.path)
                    and f"remix of `{job_id}`" in content):
                # Runs in the fake's handler, before the bot has the answer: its next write waits.
                if not locker.in_transaction:
                    locker.execute("BEGIN IMMEDIATE")
                return True
        return False

    shown = asyncio.ensure_future(fd.wait_for(lock_once_the_reply_is_shown, 10, "the remix's queued reply"))
    (text_input,) = [c for row in click.response["data"]["components"] for c in row["components"]]
    submit = await fd.submit_modal(click, {text_input["custom_id"]: "a blue boat"})
    await shown
    reply = submit.original_message
    assert reply is not None and not reply.deleted, "the job's reply was deleted"
    remix_id = h.job_id(reply)
    assert f"imagine:cancel:{remix_id}" in reply.custom_ids and not reply.ephemeral
    for _ in range(200):   # past the busy timeout: the reply's write has failed
        if h.bot.progress.trackers.get(remix_id) and h.bot.progress.trackers[remix_id].unsaved_reply:
            break
        await asyncio.sleep(0.05)
    assert h.bot.progress.trackers[remix_id].unsaved_reply["message_id"] == reply.id
    locker.execute("ROLLBACK")
    for _ in range(200):   # the reconcile pass writes it
        record = await h.queue.get(remix_id)
        if (record.spec.reply or {}).get("message_id"):
            break
        await asyncio.sleep(0.05)
    assert record.spec.reply["message_id"] == reply.id
    assert record.state == JobState.QUEUED and record.spec.parent_job_id == job_id
    assert submit.followups == []   # no error told: nothing went wrong that the user must know
    cancel = await fd.click_button(reply, f"imagine:cancel:{remix_id}")
    assert "Cancelled" in await private_answer(h, cancel)
    fd.assert_clean()


async def test_a_damaged_pictures_refusal_cannot_format_the_answer():
    """Pillow's error quotes the file's own bytes (`broken PNG file (chunk b'||*_')`, a chunk type
    after the first image data): the refusal shows them Markdown-escaped, so a file cannot spoil,
    italicise or link the private answer."""
    import struct
    import zlib

    from bot import attachments

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    pixels = zlib.compress(b"".join(b"\x00" + b"\xff\x00\x00" * 64 for _ in range(64)))
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 64, 64, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", pixels[:len(pixels) // 2]) + chunk(b"||*_", b"x" * 8) + chunk(b"IEND", b""))
    with pytest.raises(attachments.AttachmentRefused) as caught:
        attachments.check(png, "image", 2**20)
    text = str(caught.value)
    assert text.startswith("`image`: the image is damaged or truncated"), text
    assert r"\|\|\*\_" in text, text
    assert not re.search(r"(?<!\\)[|*_~`]", text.removeprefix("`image`")), text
