"""Refused words and patterns: `/queue ban-word add | remove | list` and the check in /imagine."""

from __future__ import annotations

import pytest

from tests.test_bot_support import ephemeral_answer, harness  # noqa: F401 - the fixture

pytestmark = pytest.mark.asyncio



async def _refused(h, prompt, **options) -> str:
    before = await h.queue.count_queued()
    text = await ephemeral_answer(h, "imagine", {"prompt": prompt, **options})
    assert await h.queue.count_queued() == before, "a refused prompt was queued"
    return text


async def _queued(h, prompt) -> str:
    inter = await h.imagine(prompt)
    return h.job_id(await h.reply_of(inter))


async def test_admins_keep_the_list_and_prompts_that_match_it_are_refused(harness):
    h = harness
    await h.start(worker=False)
    fd = h.fd
    key = f"banned:{fd.guild_id}"
    admin = {"user": fd.admin_user}

    # A non-admin can neither change nor read the list.
    for name, options in [("queue ban-word add", {"entry": "cursed"}), ("queue ban-word list", {}),
                          ("queue ban-word remove", {"entry": "cursed"})]:
        assert "Only admins" in await ephemeral_answer(h, name, options)
    assert await h.queue.get_setting(key) is None

    text = await ephemeral_answer(h, "queue ban-word add", {"entry": "  Cursed "}, **admin)
    assert "Added the word `Cursed`" in text
    assert await h.queue.get_setting(key) == ["Cursed"]
    assert "already on the list" in await ephemeral_answer(h, "queue ban-word add", {"entry": "cursed"}, **admin)

    # Whole words, any case; the refusal is ephemeral, says what matched, and queues nothing.
    text = await _refused(h, "a CURSED house by Escher")
    assert "CURSED" in text and "refused" in text
    await _queued(h, "a cursedly charming house")          # not the whole word: allowed

    # Patterns: checked on add (invalid, too slow, matches everything), then used.
    bad = [("re:(unclosed", "not a valid regular expression"), ("re:(x+x+)+y", "too slow"),
           ("re:.*", "matches an empty prompt"), ("re:" + "a" * 200, "the limit is 200")]
    for entry, why in bad:
        assert why in await ephemeral_answer(h, "queue ban-word add", {"entry": entry}, **admin), entry
    assert await h.queue.get_setting(key) == ["Cursed"]
    assert "Added the pattern" in await ephemeral_answer(h, "queue ban-word add", {"entry": r"re:h[o0]+use"}, **admin)
    assert "H00USE" in await _refused(h, "a tiny H00USE on a hill")
    # Every prompt of a permutation set is checked before anything is queued.
    assert "refused" in await _refused(h, "a {red, cursed} barn")
    # With a picture attached: refused before the picture is even downloaded (nothing stored).
    picture = fd.host_attachment("p.png", bytes.fromhex(
        "89504e470d0a1a0a0000000d4948445200000001000000010802000000907753de0000000c4944415478"
        "9c63f8cfc000000301010018dd8db40000000049454e44ae426082"))
    assert "refused" in await _refused(h, "a cursed lake", image=picture)
    assert not [r for r in fd.cdn_requests if r.path.endswith("/p.png")]

    # A non-admin still cannot take anything off; an admin's list shows both entries.
    assert "Only admins" in await ephemeral_answer(h, "queue ban-word remove", {"entry": "cursed"})
    listing = await ephemeral_answer(h, "queue ban-word list", **admin)
    assert "1. `Cursed`" in listing and "2. `re:h[o0]+use`  (regex)" in listing, listing
    assert await h.queue.get_setting(key) == ["Cursed", r"re:h[o0]+use"]

    # The list is in the store: a new bot on the same SQLite file still refuses.
    await h.stop()
    await h.start(worker=False)
    assert "refused" in await _refused(h, "one more cursed idea")
    assert "refused" in await _refused(h, "a house")
    text = await ephemeral_answer(h, "queue ban-word remove", {"entry": "CURSED"}, **admin)
    assert "Removed `CURSED`" in text and "1 entry" in text
    assert "not on the list" in await ephemeral_answer(h, "queue ban-word remove", {"entry": "nothing"}, **admin)
    await _queued(h, "one more cursed idea")               # allowed again
    assert await h.queue.get_setting(key) == [r"re:h[o0]+use"]
    assert await h.queue.count_queued() == 2
    fd.assert_clean()
