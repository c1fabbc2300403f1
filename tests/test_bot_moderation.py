"""Refused words and patterns: `/queue-admin ban-word add | remove | list` and the check in /imagine."""

from __future__ import annotations

import asyncio
import logging
import re
import threading

import pytest

from bot import attachments, moderation
from tests.test_bot_brainstorm import noise_png
from tests.test_bot_support import EPHEMERAL, ephemeral_answer, harness, private_answer  # noqa: F401 - the fixture
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
    assert "Removed `Cursed`" in text and "1 entry" in text
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


async def test_a_stored_pattern_that_repeats_too_much_is_skipped_and_never_compiled(caplog, monkeypatch):
    """A list stored by an older version (or edited by hand) may hold a pattern `/queue-admin ban-word
    add` refuses: the check skips it, says so, and still applies the other entries -- at once,
    since the repeat guard runs before `regex` would unroll it (compiled or refused once per entry)."""
    entries = [r"re:(?:a{65535}){65535}", "re:(unclosed", "cursed"]
    compiled = []
    real_compile = moderation.regex.compile

    def watched_compile(pattern, *args, **kwargs):
        compiled.append(pattern)
        if "{65535}" in pattern:   # it would hold the GIL for hours: fail below rather than hang here
            raise moderation.regex.error("the test does not compile this one")
        return real_compile(pattern, *args, **kwargs)

    monkeypatch.setattr(moderation.regex, "compile", watched_compile)
    moderation._compiled.cache_clear()   # each entry's first use is in this test
    with caplog.at_level(logging.WARNING, logger="bot.moderation"):
        for _ in range(3):
            assert moderation.find(entries, "a cursed house", 500) == ("cursed", "cursed")
            assert moderation.find(entries, "a quiet house", 500) is None
    assert not [p for p in compiled if "{65535}" in p], compiled   # refused before `regex` saw it
    assert len(compiled) == len(set(compiled)) == 2, compiled     # the other two, once each
    assert "(?:a{65535}){65535}" in caplog.text and "does not compile" in caplog.text
    with pytest.raises(moderation.BadEntry, match="repeats too much"):
        moderation.normalise(r"re:(?:a{65535}){65535}")


@pytest.mark.parametrize("entry", [r"re:(?x)(?:a{65 535}){65 535}", r"re:(?ix)(?:a{6#c\n5535}){65535}",
                                   r"re:b(?x:(?:a{65 535}){65 535})", r"re:(?-x)a{6 5}"])
async def test_a_verbose_pattern_whose_counts_hide_behind_spaces_is_refused_and_never_compiled(entry, monkeypatch):
    """In verbose mode `regex` reads `a{65 535}` as `a{65535}`, which the repeat guard did not
    count: the pattern was compiled, holding the GIL (every server's bot) for tens of minutes."""
    compiled = []
    real_compile = moderation.regex.compile

    def watched_compile(pattern, *args, **kwargs):
        compiled.append(pattern)
        return real_compile(pattern, *args, **kwargs)

    monkeypatch.setattr(moderation.regex, "compile", watched_compile)
    moderation._compiled.cache_clear()
    with pytest.raises(moderation.BadEntry, match=r"verbose mode \(`\(\?x\)`\)"):
        moderation.normalise(entry)
    assert moderation.find([entry, "cursed"], "a cursed house", 500) == ("cursed", "cursed")   # stored: skipped
    assert compiled == [moderation._word_pattern("cursed")], compiled
    # A named group called x, a lookahead for x, and x itself are no flags.
    for fine in (r"re:(?P<x>ab)c", r"re:(?=x)xyz", r"re:\(\?x\)"):
        assert moderation.normalise(fine) == fine


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


async def test_a_retried_add_cancels_the_jobs_in_line_that_a_failed_add_left(harness, monkeypatch):
    """The add stores the entry, then cancels the jobs in line that match it. A store error in
    between (here: the line's read fails once) leaves the entry listed and those jobs queued; the
    admin's retry says it is listed already and cancels them all the same."""
    h = harness
    await h.start(worker=False)
    admin = {"user": h.fd.admin_user}
    key = f"banned:{h.fd.guild_id}"
    job_id = await _queued(h, "a cursed house")
    running = h.queue.running

    async def store_away(*args, **kwargs):
        raise RuntimeError("the store went away")

    monkeypatch.setattr(h.queue, "running", store_away)
    text = await ephemeral_answer(h, "queue-admin ban-word add", {"entry": "cursed"}, **admin)
    assert "Added" not in text and "went wrong" in text, text
    assert await h.queue.get_setting(key) == ["cursed"]
    assert (await h.queue.get(job_id)).state.value == "queued"   # half done

    monkeypatch.setattr(h.queue, "running", running)
    text = await ephemeral_answer(h, "queue-admin ban-word add", {"entry": "CURSED"}, **admin)
    assert text.startswith("`cursed` is already on the list; nothing was added.\n"), text
    assert "Cancelled 1 of this server's queued or running job whose prompt matches it" in text, text
    assert f"`{job_id}`" in text
    assert (await h.queue.get(job_id)).state.value == "cancelled"
    assert await h.queue.get_setting(key) == ["cursed"]
    # Nothing left to cancel: the retry says so.
    text = await ephemeral_answer(h, "queue-admin ban-word add", {"entry": "cursed"}, **admin)
    assert "already on the list" in text and "No queued or running job of this server matches it." in text, text
    h.fd.assert_clean()


_LISTED = re.compile(r"^\d+\. `([^`]*)`", re.MULTILINE)


async def test_what_the_list_shows_removes_that_entry_and_no_other(harness):
    """For a pattern white space matters: `re:evil  cat` (two spaces) and `re:evil cat` are two
    entries, and removing one keeps the other. The list (and the add's answer) shows each entry so
    that what it shows inside the code span, given to remove, removes exactly that entry: one with
    a run of spaces or a backtick (which an inline code span cannot show as typed) too, and one
    written with the backtick's look-alike is another entry."""
    h = harness
    await h.start(worker=False)
    admin = {"user": h.fd.admin_user}
    key = f"banned:{h.fd.guild_id}"
    listed = ["re:evil  cat", "re:evil cat", "re:foo`bar", "re:foo\u02cbbar", "c`at", "c\u02cbat", '"dog"', "dog"]
    answers = [await ephemeral_answer(h, "queue-admin ban-word add", {"entry": e}, **admin) for e in listed]
    assert all(a.startswith("Added the ") for a in answers), answers
    assert len({a.split(":")[1] for a in answers[:2]}) == 2, answers   # the two patterns told apart
    assert await h.queue.get_setting(key) == listed

    listing = await ephemeral_answer(h, "queue-admin ban-word list", **admin)
    shown = _LISTED.findall(listing)
    assert len(shown) == len(listed) and len(set(shown)) == len(listed), listing
    assert "1. `\"re:evil\\u0020\\u0020cat\"`  (regex)" in listing and "2. `re:evil cat`  (regex)" in listing, listing
    assert "8. `dog`" in listing, listing

    left = list(listed)
    for entry, copied in zip(listed, shown):
        text = await ephemeral_answer(h, "queue-admin ban-word remove", {"entry": copied}, **admin)
        left.remove(entry)
        assert text.startswith(f"Removed `{copied}`: it is allowed again."), (entry, text)
        assert await h.queue.get_setting(key) == left, (entry, copied)

    # Typed as added: the pattern with two spaces alone.
    for entry in ["re:evil  cat", "re:evil cat"]:
        await ephemeral_answer(h, "queue-admin ban-word add", {"entry": entry}, **admin)
    assert "Removed" in await ephemeral_answer(h, "queue-admin ban-word remove", {"entry": "re:evil  cat"}, **admin)
    assert await h.queue.get_setting(key) == ["re:evil cat"]
    text = await ephemeral_answer(h, "queue-admin ban-word remove", {"entry": "re:evil  cat"}, **admin)
    assert "not on the list" in text and await h.queue.get_setting(key) == ["re:evil cat"]
    h.fd.assert_clean()


async def test_remove_refuses_an_entry_longer_than_any_and_folds_what_was_typed_once(harness, monkeypatch):
    """Removing folds the typed text to compare it with each plain entry. Text longer than any
    entry (the add's limit) is refused at once, nothing changed; other text is folded once, not
    once per entry: 6000 characters against 100 entries held the event loop for seconds."""
    h = harness
    await h.start(worker=False)
    admin = {"user": h.fd.admin_user}
    key = f"banned:{h.fd.guild_id}"
    words = [f"word{i}" for i in range(100)]
    await h.queue.set_setting(key, words)

    folded = []
    fold = moderation.fold

    def counted_fold(text):
        folded.append(text)
        return fold(text)

    monkeypatch.setattr(moderation, "fold", counted_fold)
    text = await ephemeral_answer(h, "queue-admin ban-word remove", {"entry": ("a&amp;b " * 750)[:6000]}, **admin)
    assert text.startswith("That entry is 5999 characters long; no entry is longer than 200."), text
    assert "Nothing was removed" in text
    assert await h.queue.get_setting(key) == words
    assert folded == [], [len(t) for t in folded]   # refused before any folding (on the event loop)

    typed = ("a&amp;b " * 25).strip()   # 199 characters: within the limit
    text = await ephemeral_answer(h, "queue-admin ban-word remove", {"entry": typed}, **admin)
    assert "not on the list" in text, text
    assert folded.count(typed) <= 1, len(folded)
    assert await h.queue.get_setting(key) == words
    h.fd.assert_clean()


async def test_add_answers_discord_first_while_the_thread_pool_is_busy(harness):
    """The add tries a new pattern (up to ~0.65 s) in the thread pool other work shares (the
    prompts' ban-word check, pictures, contact sheets). With that pool busy past Discord's 3 s, the
    add still answers at once (a private "thinking…"), then with what it did."""
    h = harness
    await h.start(worker=False)
    fd = h.fd
    loop = asyncio.get_running_loop()
    release = threading.Event()
    busy = [loop.run_in_executor(None, release.wait, 30) for _ in range(64)]   # every worker, and a queue
    try:
        inter = await fd.send_slash_command("queue-admin ban-word add", {"entry": r"re:h[o0]+use"}, user=fd.admin_user)
        await fd.wait_for_response(inter, timeout=2.5)   # the pool still busy
        assert inter.response_type == 5 and (inter.response.get("data") or {}).get("flags", 0) & EPHEMERAL
    finally:
        release.set()
        await asyncio.gather(*busy)
    text = await private_answer(h, inter)
    assert text.startswith("Added the pattern `re:h[o0]+use`"), text
    assert await h.queue.get_setting(f"banned:{fd.guild_id}") == [r"re:h[o0]+use"]
    fd.assert_clean()


# "a" and 199 combining marks beyond U+FFFF (Mn): 200 characters, the limit, but its shown form
# writes each mark as a surrogate pair's two escapes (12 characters): 2391 characters in all.
_LONG_SHOWN = "a" + "\U0001D167" * 199


async def test_an_entry_too_long_to_show_is_refused_and_no_answer_passes_2000_characters(harness):
    """An entry's shown form (`moderation.shown`) escapes what an inline code span would not show,
    a mark beyond U+FFFF as 12 characters. Before: `_LONG_SHOWN` was added, and the add's answer
    (2391 characters of it) failed with 400, so the admin read "Something went wrong" though the
    entry was on the list; its `remove` answered the same. Now such an entry is refused before
    anything changes, one that fits is added, and an older list's entry too long to show is named
    cut (marked) by the add, the list and the remove, which still removes it."""
    h = harness
    await h.start(worker=False)
    admin = {"user": h.fd.admin_user}
    key = f"banned:{h.fd.guild_id}"

    text = await ephemeral_answer(h, "queue-admin ban-word add", {"entry": _LONG_SHOWN}, **admin)
    assert text.startswith("That entry is too long to show: the list would write it as 2391 characters"), text
    assert f"the limit is {moderation.MAX_SHOWN}" in text and "Nothing was added" in text, text
    assert await h.queue.get_setting(key) is None
    fits = "a" + "\U0001D167" * 100   # shown as 1203 characters
    text = await ephemeral_answer(h, "queue-admin ban-word add", {"entry": fits}, **admin)
    assert text.startswith(f"Added the word `{moderation.shown(fits)}`: prompts"), text
    assert await h.queue.get_setting(key) == [fits]

    # An older list holds entries too long to show (two of one identity: both fold to "a").
    other = "a" + "\U0001D168" * 199
    for stored in ([_LONG_SHOWN, "cursed"], [_LONG_SHOWN, other, "cursed"]):
        await h.queue.set_setting(key, stored)
        text = await ephemeral_answer(h, "queue-admin ban-word add", {"entry": "a"}, **admin)   # the same identity
        assert len(text) <= 2000 and "is already on the list; nothing was added." in text, (len(text), text)
        assert text.startswith(f"`{moderation.shown(_LONG_SHOWN)[:100]}") and "*(cut: 2391 characters whole" in text, text
        listing = await ephemeral_answer(h, "queue-admin ban-word list", **admin)
        assert len(listing) <= 2000 and "*(cut: 2391 characters whole" in listing, (len(listing), listing)
        assert "remove it by giving `/queue-admin ban-word remove` the entry as it was added" in listing, listing
        pages = int((re.search(r"-# Page 1 of (\d+)", listing) or ["", "1"])[1])
        last = await ephemeral_answer(h, "queue-admin ban-word list", {"page": pages}, **admin)
        assert len(last) <= 2000 and f"{len(stored)}. `cursed`" in last, last
        assert pages == len(stored) - 1, listing   # a cut entry leaves room for a short one, not another cut one
        text = await ephemeral_answer(h, "queue-admin ban-word remove", {"entry": _LONG_SHOWN}, **admin)
        assert len(text) <= 2000 and text.startswith("Removed `\"a\\ud834\\udd67"), (len(text), text)
        assert "*(cut: 2391 characters whole" in text and text.endswith("The list has 1 entry."), text
        assert await h.queue.get_setting(key) == ["cursed"]
    # Its whole shown form (too long for a message, not for the option) removes it too.
    await h.queue.set_setting(key, [_LONG_SHOWN, "cursed"])
    text = await ephemeral_answer(h, "queue-admin ban-word remove", {"entry": moderation.shown(_LONG_SHOWN)}, **admin)
    assert len(text) <= 2000 and text.startswith("Removed `") and "it is allowed again" in text, text
    assert await h.queue.get_setting(key) == ["cursed"]
    h.fd.assert_clean()


async def test_the_list_pages_so_every_entry_can_be_seen_and_removed(harness):
    """Before: the list showed what fit in one message and "…and N more": with 100 entries of 36
    characters, 56 could never be seen, copied or removed. Now it has pages (`page`, 1 first), says
    which and how to see the next, and a page past the last is refused, saying how many there are."""
    h = harness
    await h.start(worker=False)
    admin = {"user": h.fd.admin_user}
    key = f"banned:{h.fd.guild_id}"
    words = [f"forbiddenword{n:03d}" + "x" * 20 for n in range(100)]   # 36 characters each
    await h.queue.set_setting(key, words)

    seen: list[str] = []
    page, pages = 1, None
    while True:
        text = await ephemeral_answer(h, "queue-admin ban-word list", {"page": page}, **admin)
        assert len(text) <= 2000 and text.startswith("Refused in prompts (100):\n"), text
        found = re.search(r"-# Page (\d+) of (\d+) \(entries (\d+)-(\d+) of 100\)", text)
        assert found and int(found[1]) == page, text
        pages = int(found[2])
        assert f"{len(seen) + 1}. `{words[len(seen)]}`" in text, text   # numbered in the whole list
        seen += _LISTED.findall(text)
        if page == pages:
            assert text.endswith(".") and "for the next" not in text, text
            break
        assert text.endswith(f"`/queue-admin ban-word list page:{page + 1}` for the next."), text
        page += 1
    assert seen == words and pages == 5
    assert await ephemeral_answer(h, "queue-admin ban-word list", **admin) == \
        await ephemeral_answer(h, "queue-admin ban-word list", {"page": 1}, **admin)   # page 1 by default

    text = await ephemeral_answer(h, "queue-admin ban-word list", {"page": 6}, **admin)
    assert text == ("There is no page 6: the list has 5 pages of 100 entries. "
                    "`/queue-admin ban-word list page:5` shows the last."), text
    text = await ephemeral_answer(h, "queue-admin ban-word list", {"page": 0}, **admin)
    assert text == "`page` must be 1 or more (you gave 0).", text
    # The last entry, seen on the last page only, is removed as it is shown there.
    text = await ephemeral_answer(h, "queue-admin ban-word remove", {"entry": seen[-1]}, **admin)
    assert text.startswith(f"Removed `{words[-1]}`"), text
    assert await h.queue.get_setting(key) == words[:-1]
    # A short list is one page, with no page line.
    await h.queue.set_setting(key, ["cursed"])
    text = await ephemeral_answer(h, "queue-admin ban-word list", **admin)
    assert text == "Refused in prompts (1):\n1. `cursed`", text
    h.fd.assert_clean()


async def test_a_cancel_pass_for_an_entry_no_longer_listed_cancels_nothing(harness):
    """Admin A adds `cat`, admin B removes it at once: B was told "allowed again", so A's pass over
    the line (which runs after its write, out of the list's lock) finds the entry gone and cancels
    no `cat` job. Here the pass runs for an entry not listed, then for one listed in another form
    (the same word, other case)."""
    h = harness
    await h.start(worker=False)
    job_id = h.job_id(await h.reply_of(await h.imagine("a cat on a mat")))
    assert await moderation.cancel_matching(h.bot, h.fd.guild_id, "cat") == []   # not on the list
    assert (await h.queue.get(job_id)).state.value == "queued"
    await h.queue.set_setting(f"banned:{h.fd.guild_id}", ["CAT"])
    assert [r.id for r in await moderation.cancel_matching(h.bot, h.fd.guild_id, "cat")] == [job_id]
    h.fd.assert_clean()
