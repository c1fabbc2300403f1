"""Refused words and patterns: `/queue-admin ban-word add | remove | list` and the check in /imagine."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from bot import attachments, moderation
from tests.test_bot_brainstorm import noise_png
from tests.test_bot_support import ephemeral_answer, harness  # noqa: F401 - the fixture
from tests.test_bot_uploads import outcomes, uploads_settle

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
    for name, options in [("queue-admin ban-word add", {"entry": "cursed"}), ("queue-admin ban-word list", {}),
                          ("queue-admin ban-word remove", {"entry": "cursed"})]:
        assert "Only admins" in await ephemeral_answer(h, name, options)
    assert await h.queue.get_setting(key) is None

    text = await ephemeral_answer(h, "queue-admin ban-word add", {"entry": "  Cursed "}, **admin)
    assert "Added the word `Cursed`" in text
    assert await h.queue.get_setting(key) == ["Cursed"]
    assert "already on the list" in await ephemeral_answer(h, "queue-admin ban-word add", {"entry": "cursed"}, **admin)

    # Whole words, any case; the refusal is ephemeral, says what matched, and queues nothing.
    text = await _refused(h, "a CURSED house by Escher")
    assert "CURSED" in text and "refused" in text
    charming = await _queued(h, "a cursedly charming house")   # not the whole word: allowed

    # Patterns: checked on add (invalid, too slow, matches everything), then used.
    bad = [("re:(unclosed", "not a valid regular expression"), ("re:(x+x+)+y", "too slow"),
           ("re:.*", "matches an empty prompt"), ("re:" + "a" * 200, "the limit is 200"),
           ("re:[a-z]", "would refuse nearly every prompt")]
    for entry, why in bad:
        assert why in await ephemeral_answer(h, "queue-admin ban-word add", {"entry": entry}, **admin), entry
    assert await h.queue.get_setting(key) == ["Cursed"]
    text = await ephemeral_answer(h, "queue-admin ban-word add", {"entry": r"re:h[o0]+use"}, **admin)
    assert "Added the pattern" in text and "Cancelled 1 of this server's queued or running job whose prompt matches it" in text
    assert f"`{charming}`" in text and (await h.queue.get(charming)).state.value == "cancelled"   # its "house"
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
    assert "Only admins" in await ephemeral_answer(h, "queue-admin ban-word remove", {"entry": "cursed"})
    listing = await ephemeral_answer(h, "queue-admin ban-word list", **admin)
    assert "1. `Cursed`" in listing and "2. `re:h[o0]+use`  (regex)" in listing, listing
    assert await h.queue.get_setting(key) == ["Cursed", r"re:h[o0]+use"]

    # The list is in the store: a new bot on the same SQLite file still refuses.
    await h.stop()
    await h.start(worker=False)
    assert "refused" in await _refused(h, "one more cursed idea")
    assert "refused" in await _refused(h, "a house")
    text = await ephemeral_answer(h, "queue-admin ban-word remove", {"entry": "CURSED"}, **admin)
    assert "Removed `CURSED`" in text and "1 entry" in text
    assert "not on the list" in await ephemeral_answer(h, "queue-admin ban-word remove", {"entry": "nothing"}, **admin)
    await _queued(h, "one more cursed idea")               # allowed again
    assert await h.queue.get_setting(key) == [r"re:h[o0]+use"]
    assert await h.queue.count_queued() == 1
    fd.assert_clean()


async def test_an_entry_added_while_a_request_downloads_its_picture_still_refuses_it(harness, monkeypatch):
    """The prompt is checked before its picture's download (up to a minute), and the add cancels
    only what its scan of the line finds, so the request is checked again just before the store's
    write: refused privately, nothing queued, its stored picture deleted. A permutation set too."""
    h = harness
    await h.start(worker=False)
    fd = h.fd
    original = attachments.download
    downloading, go_on = asyncio.Event(), asyncio.Event()

    async def held_download(attachment, option, max_bytes):
        downloading.set()
        await go_on.wait()   # until the entry is added
        return await original(attachment, option, max_bytes)

    monkeypatch.setattr(attachments, "download", held_download)
    for n, (word, prompt) in enumerate([("zorblax", "a zorblax on a hill"), ("quibble", "a {quibble, dog} on a hill")]):
        downloading.clear()
        go_on.clear()
        picture = fd.host_attachment(f"p{n}.png", noise_png(seed=n))
        inter = await fd.send_slash_command("imagine", {"prompt": prompt, "image": picture})
        await downloading.wait()   # past the first check
        text = await ephemeral_answer(h, "queue-admin ban-word add", {"entry": word}, user=fd.admin_user)
        assert "No queued or running job of this server matches it." in text, text   # not in line yet
        go_on.set()
        ((kind, answer),) = await outcomes(h, [inter])
        assert kind == "refused" and f"`{word}`" in answer and "nothing was queued" in answer, (kind, answer)
        assert await h.queue.count_queued() == 0
        await uploads_settle(h, {})
    fd.assert_clean()


async def test_look_alike_and_invisible_spellings_of_a_refused_word_are_refused(harness):
    """CLIP reads fullwidth `ｃｕｒｓｅｄ` exactly as `cursed`; a soft hyphen or a zero-width space
    inside the word, or two spaces inside a phrase, must not get it past the list either."""
    h = harness
    await h.start(worker=False)
    admin = {"user": h.fd.admin_user}
    for entry in ("cursed", "dark forest"):
        assert "Added" in await ephemeral_answer(h, "queue-admin ban-word add", {"entry": entry}, **admin)
    for prompt in ["a ｃｕｒｓｅｄ house", "a cur\u00adsed house", "a cur\u200bsed house", "a CUR\u200dSED house",
                   "a dark  forest", "a dark\u3000forest", "a {dark\u00a0forest, meadow}"]:
        assert "refused" in await _refused(h, prompt), prompt
    await _queued(h, "a cursedly dark forester")           # still whole words only
    h.fd.assert_clean()


async def test_patterns_that_would_freeze_or_crash_the_bot_are_refused(harness):
    """`regex` unrolls counted repeats when it compiles, holding the GIL: `(?:a{65535}){65535}`
    would stop the whole bot (gateway, worker) for hours. A left-recursive pattern times out on
    the empty prompt. Both get a clear refusal and the list stays as it was."""
    h = harness
    await h.start(worker=False)
    admin = {"user": h.fd.admin_user}
    for entry in [r"re:(?:a{1000}){1000}", r"re:x{200000}", r"re:(?(DEFINE)(?<x>(?&x)a))(?&x)"]:
        text = await ephemeral_answer(h, "queue-admin ban-word add", {"entry": entry}, **admin)
        assert "Nothing was added" in text, (entry, text)
    assert await h.queue.get_setting(f"banned:{h.fd.guild_id}") is None
    # Counted repeats of a sensible size are fine.
    assert "Added" in await ephemeral_answer(h, "queue-admin ban-word add", {"entry": r"re:\d{3}-\d{4}"}, **admin)
    h.fd.assert_clean()


async def test_a_stored_pattern_that_repeats_too_much_is_skipped_and_never_compiled(caplog):
    """A list stored by an older version (or edited by hand) may hold a pattern `/queue-admin ban-word
    add` refuses: the check skips it, says so, and still applies the other entries -- at once,
    since the repeat guard runs before `regex` would unroll it (compiled or refused once per entry)."""
    entries = [r"re:(?:a{65535}){65535}", "re:(unclosed", "cursed"]
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="bot.moderation"):
        for _ in range(3):
            assert moderation.find(entries, "a cursed house", 500) == ("cursed", "cursed")
            assert moderation.find(entries, "a quiet house", 500) is None
    assert time.monotonic() - started < 1.0
    assert "(?:a{65535}){65535}" in caplog.text and "does not compile" in caplog.text
    with pytest.raises(moderation.BadEntry, match="repeats too much"):
        moderation.normalise(r"re:(?:a{65535}){65535}")


async def test_spellings_clip_reads_as_a_refused_word_are_refused_and_patterns_are_kept_apart(harness):
    """CLIP unescapes HTML entities (twice) and splits a word from digits, `_` and combining marks:
    `c&#97;t`, `c&amp;#97;t`, `cat1`, `cat\u0301` all read `cat`. A folded entry (`ｃａｔ`) matches
    too. Patterns differing only in case (`\\b` and `\\B`) are two entries, and removing one keeps
    the other."""
    h = harness
    await h.start(worker=False)
    admin = {"user": h.fd.admin_user}
    key = f"banned:{h.fd.guild_id}"
    assert "Added" in await ephemeral_answer(h, "queue-admin ban-word add", {"entry": "ｃａｔ"}, **admin)
    assert "already on the list" in await ephemeral_answer(h, "queue-admin ban-word add", {"entry": "CAT"}, **admin)
    for prompt in ["a c&#97;t", "a &#x63;&#x61;&#x74;", "a c&amp;#97;t", "a cat1", "a cat_ x", "a cat\u0301",
                   "a cat\u0332", "a {dog, c&#97;t}"]:
        assert "refused" in await _refused(h, prompt), prompt
    await _queued(h, "a concatenated catalog")             # still whole words only

    for entry in [r"re:\bdog\b", r"re:\Bdog\B"]:
        assert "Added the pattern" in await ephemeral_answer(h, "queue-admin ban-word add", {"entry": entry}, **admin)
    assert await h.queue.get_setting(key) == ["ｃａｔ", r"re:\bdog\b", r"re:\Bdog\B"]
    assert "Removed" in await ephemeral_answer(h, "queue-admin ban-word remove", {"entry": r"re:\Bdog\B"}, **admin)
    assert await h.queue.get_setting(key) == ["ｃａｔ", r"re:\bdog\b"]
    h.fd.assert_clean()


async def test_patterns_the_regex_module_fails_on_are_refused_as_invalid(harness):
    """`regex` raises its own OverflowError (not regex.error) compiling `\\p{inf}`: the admin is told
    the pattern is not valid, not "something went wrong", and the list stays as it was. A pattern
    whose match is empty (`(?=cat)`) refuses a prompt without quoting an empty code span."""
    h = harness
    await h.start(worker=False)
    admin = {"user": h.fd.admin_user}
    for entry in [r"re:\p{inf}", "re:[[:inf:]]"]:
        text = await ephemeral_answer(h, "queue-admin ban-word add", {"entry": entry}, **admin)
        assert text.startswith("That is not a valid regular expression") and "Nothing was added" in text, (entry, text)
    assert await h.queue.get_setting(f"banned:{h.fd.guild_id}") is None

    assert "Added the pattern" in await ephemeral_answer(h, "queue-admin ban-word add", {"entry": r"re:(?=cat)"}, **admin)
    text = await _refused(h, "a cat")
    assert text.startswith("Your prompt matches a pattern this server's admins have refused."), text
    assert "``" not in text
    h.fd.assert_clean()


@pytest.mark.parametrize("entry", ["re:.", r"re:\S", "re:[a-z]", r"re:\b", r"re:\s", r"re:\w{5,}", "re:e", "re:(?i)[^0-9]"])
async def test_a_pattern_that_matches_ordinary_prompts_is_refused(entry):
    """A pattern matching half of a few ordinary prompts that share no word would refuse nearly
    every prompt once added: refused, saying which ordinary prompts it matches."""
    with pytest.raises(moderation.BadEntry, match="would refuse nearly every prompt") as refused:
        moderation.normalise(entry)
    assert "`" in str(refused.value) and "Nothing was added" in str(refused.value)


@pytest.mark.parametrize("entry", [r"re:h[o0]+use", r"re:\d{3}-\d{4}", r"re:\p{Han}", r"re:\d", r"re:\bcat\b",
                                   "re:(?=cat)", "re:nud(e|ity)", "house", "a"])
async def test_a_pattern_that_matches_few_ordinary_prompts_is_accepted(entry):
    assert moderation.normalise(entry) == entry
