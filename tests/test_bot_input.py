"""Bad input gets an ephemeral message that says what to fix; odd input is echoed safely, never pings."""

from __future__ import annotations

import pytest

from engine.jobs import JobState
from tests.test_bot_support import EPHEMERAL, harness  # noqa: F401 - the fixture

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
