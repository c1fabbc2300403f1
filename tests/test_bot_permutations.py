"""Permutation prompts (`a {red, blue} house by {Escher, Magritte}`): one job per combination,
the limits, and the one contact sheet once every job of the set has ended."""

from __future__ import annotations

import asyncio
import io
import logging
import re
import sqlite3
import threading
import time

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from bot import contact_sheet, permutations, render
from engine.jobs import EventKind, JobState
from tests.fakediscord import Permission
from tests.test_bot_support import (  # noqa: F401 - the fixture
    JOB_ID_RE, claim_jobs, ephemeral_answer, finish_jobs, harness, requests_matching,
)

pytestmark = pytest.mark.asyncio

TEMPLATE = "a {red, blue, golden} house by {Escher, Magritte}"
EXPECTED = {f"a {c} house by {a}" for c in ("red", "blue", "golden") for a in ("Escher", "Magritte")}


def _sheet_messages(fd):
    return [m for m in fd.channel_messages()
            if any(a["filename"] == contact_sheet.FILENAME for a in m.attachments)]


def _sheet_posts(fd):
    return [r for r in fd.requests if r.status == 200 and r.method == "POST"
            and any(f.filename == contact_sheet.FILENAME for f in r.files)]


def _png(color, side=64) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (side, side), color).save(out, format="PNG")
    return out.getvalue()


def _rgb(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB")


def _diff(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float32) - np.asarray(b, dtype=np.float32)).mean())


async def _expiries(h, keys):
    """When each setting expires (the SQLite store's `expires_at`), None for one kept forever."""
    with sqlite3.connect(h.queue.path) as db:
        return [db.execute("SELECT expires_at FROM settings WHERE key = ?", (k,)).fetchone()[0] for k in keys]


async def _marker(h, set_id, timeout=10.0):
    """`sheet:<id>`, once the set is closed: the marker is written just after the sheet's post, and
    the set leaves `sheets.open` in a write after that one."""
    deadline = time.monotonic() + timeout
    while ((marker := await h.queue.get_setting(f"sheet:{set_id}")) is None
           or set_id in (await h.queue.get_setting("sheets.open") or [])):
        assert time.monotonic() < deadline, f"set {set_id} was not closed"
        await asyncio.sleep(0.05)
    return marker


async def _set_jobs(h):
    records = await h.queue.history(h.fd.channel_id, limit=50)
    return sorted((r for r in records if "set" in r.spec.extra), key=lambda r: r.spec.extra["set"]["index"])


async def test_a_permutation_prompt_queues_each_combination_within_the_limits(harness):
    """Syntax errors, the permutation cap and the user's cap refuse (ephemerally, nothing queued);
    then the set is queued with one reply per job. A fake GPU ends them (one cancelled, one failed)
    and the contact sheet shows the four finals, naming the two left out."""
    h = harness
    await h.start(worker=False)
    fd = h.fd

    for prompt, why in [("a {red, blue house", "never closed"), ("a red} house", "never opened"),
                        ("a {red,, blue} house", "empty option"), ("a {red, {blue}} house", "cannot be nested"),
                        ("{blurry, foggy}:-1", "positive weight")]:  # every expansion is checked as a weighted prompt
        assert why in await ephemeral_answer(h, "imagine", {"prompt": prompt}), prompt
    text = await ephemeral_answer(h, "imagine", {"prompt": "{a, b, c} {d, e, f} {g, h}"})
    assert "makes 18 combinations" in text and "at most 9" in text and "at most 5 here" in text
    # Six would pass max_permutations (9) but not the user's cap (5 in the test config), even with
    # nothing waiting: said plainly, not "wait for some to start".
    text = await ephemeral_answer(h, "imagine", {"prompt": TEMPLATE})
    assert "makes 6 images" in text and "at most 5 waiting at once" in text and "can never be queued whole" in text
    assert "wait for some" not in text
    assert await h.queue.count_queued() == 0 and fd.channel_messages() == []

    assert "6 jobs" in await ephemeral_answer(h, "queue-admin limit", {"n": 6}, user=fd.admin_user)
    inter = await h.imagine(TEMPLATE, seed=7, iterations=2)
    first = await h.reply_of(inter)
    await fd.wait_for(lambda: len(fd.channel_messages()) == 6 and all(
        JOB_ID_RE.search(m.content) for m in fd.channel_messages()), 10, "six replies")
    jobs = await _set_jobs(h)
    assert {r.spec.prompt for r in jobs} == EXPECTED and len(jobs) == 6
    set_id = jobs[0].spec.extra["set"]["id"]
    for i, r in enumerate(jobs):
        assert r.spec.extra["set"] == {"id": set_id, "size": 6, "index": i,
                                       "options": r.spec.prompt[2:].split(" house by ")}
        assert (r.spec.seed, r.spec.iterations, r.state) == (7, 2, JobState.QUEUED)
    # One reply per job: the interaction's message for the first, its follow-ups for the others.
    assert h.job_id(first) == jobs[0].id
    assert sorted(h.job_id(m) for m in fd.channel_messages()) == sorted(r.id for r in jobs)
    assert sorted(h.job_id(m) for m in inter.followups) == sorted(r.id for r in jobs[1:])
    assert "the limit is 6" in await ephemeral_answer(h, "imagine", {"prompt": "one more"})

    # The fake GPU: cancel one, fail one, finish four with a distinct colour each.
    ids = [r.id for r in jobs]
    assert await h.queue.cancel(ids[1])
    await claim_jobs(h.queue, ids[:1] + ids[2:])
    colours = {0: (255, 0, 0), 2: (0, 255, 0), 3: (0, 0, 255), 5: (255, 255, 0)}
    for i, colour in colours.items():
        await h.queue.put_artifact(ids[i], "final.png", _png(colour))
        await h.queue.put_artifact(ids[i], "video.mp4", b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 64)
        await asyncio.sleep(0.3)
        assert _sheet_messages(fd) == []   # not before the last one has ended
        assert await h.queue.finish(ids[i], (await h.queue.get(ids[i])).lease_id, 0.2)
    await asyncio.sleep(0.3)
    assert _sheet_messages(fd) == []
    lease = (await h.queue.get(ids[4])).lease_id
    assert await h.queue.fail(ids[4], lease, "out of memory", retry=False) == JobState.FAILED

    await fd.wait_for(lambda: _sheet_messages(fd), 10, "the contact sheet")
    for job_id in ids:
        await h.wait_delivered(job_id)
    (sheet,) = _sheet_messages(fd)
    assert "**Contact sheet**" in sheet.content and "4 of 6 variations" in sheet.content
    assert "red · Magritte (cancelled)" in sheet.content and "golden · Escher (failed)" in sheet.content
    # From each caption back to its job: one line per job, in order, with its id (for /remix) and a
    # link to its reply (the message with its Remix / Continue buttons).
    lines = sheet.content.split("\n")[2:]
    assert len(lines) == 6, sheet.content
    for number, (line, r) in enumerate(zip(lines, jobs), 1):
        assert line.startswith(f"{number}. "), line   # the number its tile's caption starts with
        reply = (await h.queue.get(r.id)).spec.reply
        url = f"https://discord.com/channels/{fd.guild_id}/{fd.channel_id}/{reply['message_id']}"
        assert " · ".join(r.spec.extra["set"]["options"]) in line and f"`{r.id}`" in line and url in line, line
        assert reply["message_id"] in {inter.original_message.id, *inter.followup_ids}
    image = _rgb(fd.attachment_bytes(sheet.attachments[0]))
    spec = contact_sheet.layout(4, contact_sheet.MIN_TILE)   # 64-px finals -> 128-px tiles, 2 x 2
    assert image.size == spec.size
    for box, colour in zip(spec.boxes, colours.values()):
        tile = np.asarray(image.crop(box), dtype=np.float32)
        assert np.abs(tile - np.array(colour, dtype=np.float32)).max() <= 1.0, (box, colour)
    marker = await _marker(h, set_id)   # written just after the post
    assert (marker["message_id"], marker["channel_id"]) == (sheet.id, fd.channel_id)
    assert await h.queue.get_setting("sheets.open") == []
    # The set's bookkeeping is not kept forever: both keys carry an expiry (30 days by default).
    expiries = await _expiries(h, [f"set:{set_id}", f"sheet:{set_id}"])
    assert all(abs(at - time.time() - permutations.KEEP_SETS_DAYS * 86400) < 600 for at in expiries), expiries
    fd.assert_clean()


async def test_pipe_separated_options_make_a_set_and_keep_their_commas(harness):
    """`{cat|dog}` (sd-dynamic-prompts' style) is a set of two, not one job with the weighted
    prompt `a cat|dog on a mat`; `|` outside the braces stays a weighted prompt's. In a group with
    `|` the commas are its options' own (`{oil painting, detailed|watercolor, soft}`: two options;
    it used to be refused as mixing `,` and `|`); a group without `|` splits on commas."""
    assert permutations.parse("a castle, {oil painting, detailed|watercolor, soft}").groups == [
        ("oil painting, detailed", "watercolor, soft")]
    assert permutations.parse("a {red, blue} house {cat|dog}").groups == [("red", "blue"), ("cat", "dog")]
    h = harness
    await h.start(worker=False)
    fd = h.fd
    assert "has an empty option" in await ephemeral_answer(h, "imagine", {"prompt": "a {cat|} on a mat"})
    assert "has an empty option" in await ephemeral_answer(h, "imagine", {"prompt": "a {cat, black|} on a mat"})
    assert await h.queue.count_queued() == 0 and fd.channel_messages() == []

    inter = await h.imagine("a {cat, black|dog} on a mat | blurry:-1", iterations=2)
    await h.reply_of(inter)
    await fd.wait_for(lambda: len(inter.followups) == 1, 10, "the second reply")
    jobs = await _set_jobs(h)
    assert [r.spec.prompt for r in jobs] == ["a cat, black on a mat | blurry:-1", "a dog on a mat | blurry:-1"]
    assert [r.spec.extra["set"]["options"] for r in jobs] == [["cat, black"], ["dog"]]
    fd.assert_clean()


async def test_options_that_differ_only_in_spacing_or_case_are_a_repeat_and_refused(harness):
    """`{a red  house, a red house}`: each job's prompt has its white space collapsed and CLIP
    lowercases it, so both would run as "a red house", the same job twice. Refused, nothing queued."""
    h = harness
    await h.start(worker=False)
    fd = h.fd
    for prompt, repeated in [("{a red  house, a red house}", "`a red house`"),
                             ("a {cat\u00a0on a mat|Cat on a mat}", "`Cat on a mat`"),
                             ("a {red\thouse,blue, RED house} at dusk", "`RED house`")]:
        text = await ephemeral_answer(h, "imagine", {"prompt": prompt})
        assert f"lists {repeated} twice" in text and "remove one" in text, (prompt, text)
    # Across groups: "big red house" twice, from two different pairs of options.
    text = await ephemeral_answer(h, "imagine", {"prompt": "{big red, big} {house, red  House}"})
    assert text.startswith("The combinations `big red house` and `big red House` are the same prompt"), text
    # A weight of 1 is no weight: `a cat:1` is `a cat` (engine.prompts), the same picture twice.
    text = await ephemeral_answer(h, "imagine", {"prompt": "a {cat|cat:1}"})
    assert text.startswith("The combinations `a cat` and `a cat:1` are the same prompt"), text
    assert await h.queue.count_queued() == 0 and fd.channel_messages() == []
    fd.assert_clean()


async def test_a_long_template_is_held_to_the_limit_per_combination_and_to_its_own_limit(harness):
    """The prompt limit is for what CLIP reads: each combination. A template whose every
    combination fits is queued however long it is up to its own limit (4 × max_prompt_chars);
    one whose longest combination does not, or that passes its own limit, is refused with that
    reason. A plain prompt keeps the plain limit."""
    h = harness
    h.config.imagine.max_prompt_chars = 120
    await h.start(worker=False)
    fd = h.fd
    palace = "a sunlit Victorian greenhouse full of ferns"                    # 43 characters
    painters = "{Claude Monet in his late period, Caspar David Friedrich}"   # 57 with its braces
    fits = f"{{{palace}, a misty Edwardian greenhouse full of orchids}} painted by {painters}"
    assert 120 < len(fits) <= 480 and all(len(v.prompt) <= 120 for v in permutations.parse(fits).expand())
    too_long = f"{{{palace}, {palace} and palms and a fountain at golden hour}} painted by {painters}"
    longest = max((v.prompt for v in permutations.parse(too_long).expand()), key=len)
    assert len(too_long) <= 480 and len(longest) > 120
    huge = "a house by {" + ", ".join(f"painter number {i}" for i in range(30)) + "}"
    assert len(huge) > 480

    text = await ephemeral_answer(h, "imagine", {"prompt": too_long})
    assert f"is {len(longest)} characters long; each combination may be up to 120" in text, text
    text = await ephemeral_answer(h, "imagine", {"prompt": huge})
    assert f"is {len(huge)} characters long; a prompt with `{{…}}` sets may be up to 480" in text, text
    assert "CLIP" not in text   # not the false reason: CLIP never reads the template as one prompt
    text = await ephemeral_answer(h, "imagine", {"prompt": "x" * 121})
    assert "is 121 characters long; the limit is 120" in text, text
    assert await h.queue.count_queued() == 0 and fd.channel_messages() == []

    inter = await h.imagine(fits, iterations=2)
    await h.reply_of(inter)
    await fd.wait_for(lambda: len(inter.followups) == 3, 10, "the other three replies")
    assert {r.spec.prompt for r in await _set_jobs(h)} == {v.prompt for v in permutations.parse(fits).expand()}
    fd.assert_clean()


async def test_escaped_braces_are_literal_and_a_long_prompt_with_a_stray_brace_hears_both_problems(harness):
    """`\\{` and `\\}` are literal braces: `a \\{red, blue\\} house` is one job whose prompt is
    `a {red, blue} house`, and in a set's option they are kept too. A prompt over the plain limit
    with a stray `}` is told both what is wrong with its braces and that it is too long without
    sets, in one answer; a short one only about its braces."""
    h = harness
    h.config.imagine.max_prompt_chars = 120
    await h.start(worker=False)
    fd = h.fd
    inter = await h.imagine("a \\{red, blue\\} house", iterations=2)
    job = await h.queue.get(h.job_id(await h.reply_of(inter)))
    assert job.spec.prompt == "a {red, blue} house" and "set" not in job.spec.extra
    assert "**a {red, blue} house**" in inter.original_message.content
    assert await h.queue.count_queued() == 1 and inter.followups == []

    inter = await h.imagine("a {red \\{x\\}, blue} house", iterations=2)
    await h.reply_of(inter)
    await fd.wait_for(lambda: len(inter.followups) == 1, 10, "the second reply")
    assert [r.spec.prompt for r in await _set_jobs(h)] == ["a red {x} house", "a blue house"]

    stray = "a house " + "in the warm light of a slow afternoon " * 3 + "by Escher}"
    assert 120 < len(stray) <= 480
    text = await ephemeral_answer(h, "imagine", {"prompt": stray})
    assert "A `}` closes a group that was never opened" in text, text
    assert f"at {len(stray)} characters the prompt is over the limit of 120 for a prompt without `{{…}}` sets" in text
    text = await ephemeral_answer(h, "imagine", {"prompt": "a house by Escher}"})
    assert "A `}` closes a group that was never opened" in text and "limit" not in text, text
    assert await h.queue.count_queued() == 3
    fd.assert_clean()


async def test_the_contact_sheet_leaves_out_a_finished_job_whose_prompt_is_refused_since(harness):
    """`a {cat|dog} on a mat`: the dog's job has finished when an admin refuses "dog" (the add
    withholds only jobs still waiting or running). The sheet, posted when the cat's job ends,
    shows neither the dog's picture nor its caption, nor the template (it names every option)."""
    h = harness
    await h.start(worker=False)
    fd = h.fd
    inter = await h.imagine("a {cat|dog} on a mat", seed=3, iterations=2)
    await h.reply_of(inter)
    await fd.wait_for(lambda: len(fd.channel_messages()) == 2, 10, "two replies")
    cat, dog = [r.id for r in await _set_jobs(h)]
    await claim_jobs(h.queue, [cat, dog])
    await h.queue.put_artifact(dog, "final.png", _png((0, 0, 255)))
    assert await h.queue.finish(dog, (await h.queue.get(dog)).lease_id, 0.2)
    await h.wait_delivered(dog)
    assert "dog" in await ephemeral_answer(h, "queue-admin ban-word add", {"entry": "dog"}, user=fd.admin_user)
    await h.queue.put_artifact(cat, "final.png", _png((255, 0, 0)))
    assert await h.queue.finish(cat, (await h.queue.get(cat)).lease_id, 0.2)
    await fd.wait_for(lambda: _sheet_messages(fd), 10, "the contact sheet")
    (sheet,) = _sheet_messages(fd)
    assert "dog" not in sheet.content and "1 of 2 variations" in sheet.content, sheet.content
    assert render.PROMPT_WITHHELD in sheet.content.split("\n")[0], sheet.content
    assert f"2. {render.PROMPT_WITHHELD} (its prompt is refused now) · `{dog}`" in sheet.content, sheet.content
    fd.assert_clean()


async def test_the_contact_sheet_text_names_every_job_and_fits_in_a_message():
    """25 jobs (the most a set can have) with long captions full of Markdown, a long template:
    the text stays within Discord's 2000 characters, and every job's id is there whole, in order
    (links and caption length give way first). A short set keeps its links."""
    url = "https://discord.com/channels/123456789012345678/123456789012345679/1234567890123456789"
    info = {"template": "*" * 6000, "seed": 2**32 - 1, "user_id": 123456789012345678}
    entries = [permutations.SheetEntry("*_" * 200 + str(i), f"{i:012x}", url, "gone from the store" if i % 2 else None)
               for i in range(25)]
    text = permutations.SheetsCog._content(info, 12, entries)
    assert len(text) <= 2000
    assert [m.group(1) for m in re.finditer(r"`([0-9a-f]{12})`", text)] == [e.job_id for e in entries]
    short = permutations.SheetsCog._content({"template": TEMPLATE, "user_id": 1}, 6, entries[:6])
    assert short.count(url) == 6 and len(short.split("\n")) == 8


def _caption_band(text: str, font, tile: int) -> np.ndarray:
    """A caption band as render_sheet draws `text` with `font` (its offset, its colours)."""
    band = Image.new("RGB", (tile, contact_sheet.CAPTION), contact_sheet.BACKGROUND)
    ImageDraw.Draw(band).text((2, 3), text, fill=contact_sheet.TEXT, font=font)
    return np.asarray(band)


async def test_contact_sheet_captions_are_numbered_and_drawn_in_dejavu_sans():
    """Captions are drawn in DejaVu Sans where the system has it (Cyrillic, Greek: Pillow's own font
    draws them as boxes, `Кот` and `Жот` alike), each after its number (1., 2., ... or the numbers
    the caller gives: its jobs' lines in the message), so a caption the font cannot draw still
    matches its line."""
    dejavu = ImageFont.truetype(str(contact_sheet.CAPTION_FONT), contact_sheet.FONT_SIZE)
    tiles = [(_png((200, 0, 0)), "Кот"), (_png((0, 0, 200)), "Жот")]
    spec = contact_sheet.layout(2, contact_sheet.MIN_TILE)
    for numbers, expected in [(None, ["1. Кот", "2. Жот"]), ([2, 5], ["2. Кот", "5. Жот"])]:
        data, _ = contact_sheet.render_sheet(tiles, numbers=numbers)
        sheet = _rgb(data)
        for band, text in zip(spec.captions, expected):
            assert np.array_equal(np.asarray(sheet.crop(band)), _caption_band(text, dejavu, spec.tile)), text
    # Pillow's own font would have drawn both words as the same boxes.
    fallback = ImageFont.load_default(size=contact_sheet.FONT_SIZE)
    assert np.array_equal(_caption_band("Кот", fallback, 128), _caption_band("Жот", fallback, 128))
    assert not np.array_equal(_caption_band("Кот", dejavu, 128), _caption_band("Жот", dejavu, 128))
    with pytest.raises(ValueError):
        contact_sheet.render_sheet(tiles, numbers=[1])


async def test_contact_sheet_captions_fall_back_to_pillows_font_without_dejavu(tmp_path, monkeypatch, caplog):
    """No DejaVu Sans (another system), or a damaged file (logged): Pillow's own font, numbered all the same."""
    fallback = ImageFont.load_default(size=contact_sheet.FONT_SIZE)
    damaged = tmp_path / "damaged.ttf"   # (not a name Pillow then looks up among the system fonts)
    damaged.write_bytes(b"not a font")
    spec = contact_sheet.layout(1, contact_sheet.MIN_TILE)
    for path in (tmp_path / "missing.ttf", damaged):
        monkeypatch.setattr(contact_sheet, "CAPTION_FONT", path)
        data, _ = contact_sheet.render_sheet([(_png((0, 200, 0)), "red · Escher")])
        band = np.asarray(_rgb(data).crop(spec.captions[0]))
        assert np.array_equal(band, _caption_band("1. red · Escher", fallback, spec.tile))
    assert f"cannot load {damaged}" in caplog.text

async def test_the_contact_sheet_comes_once_after_every_job_of_the_set_is_done(harness):
    """The real worker renders six tiny jobs; one contact sheet follows the last DONE event, and
    each of its tiles is that job's final.png resized.

    Tile check: the sheet is a lossless PNG and the bot pastes each final resized to the tile with
    contact_sheet.RESAMPLE, so the same resize here must give (nearly) the same pixels: the mean
    absolute difference of a tile and its own resized final must be under 1 (of 255). The jobs of
    a set share the seed, and 2 iterations of the tiny models leave their finals (nearly)
    identical, so this test cannot tell the tiles' order from their pixels: the test above does,
    with four finals of distinct colours. Here the captions tell the tiles apart (each band is
    drawn, and no two bands are the same)."""
    h = harness
    h.config.queue.max_queued_per_user = 9
    await h.start()
    fd = h.fd
    await h.imagine(TEMPLATE, iterations=2)
    await fd.wait_for(lambda: len(fd.channel_messages()) >= 6, 10, "six replies")
    jobs = await _set_jobs(h)
    assert {r.spec.prompt for r in jobs} == EXPECTED
    for r in jobs:
        assert (await h.wait_delivered(r.id, timeout=60)).state == JobState.DONE
    await fd.wait_for(lambda: _sheet_messages(fd), 20, "the contact sheet")
    await asyncio.sleep(1.0)   # several polls later: still one
    (sheet,) = _sheet_messages(fd)
    (post,) = _sheet_posts(fd)
    assert str(post.response["id"]) == str(sheet.id)

    # After every job's DONE event (the events' own clock, and the fake's receipt of the post).
    ids = {r.id for r in jobs}
    done_at = {e.job_id: e.at for e in await h.queue.events(after=0, timeout=0)
               if e.kind == EventKind.DONE and e.job_id in ids}
    assert set(done_at) == ids
    assert post.timestamp > max(done_at.values())

    finals = [_rgb(await h.queue.get_artifact(r.id, "final.png")) for r in jobs]
    tile = contact_sheet.tile_size([f.size for f in finals])
    spec = contact_sheet.layout(6, tile)
    image = _rgb(fd.attachment_bytes(sheet.attachments[0]))
    assert image.size == spec.size and (spec.cols, spec.rows) == (3, 2)
    resized = [f.resize((tile, tile), contact_sheet.RESAMPLE) for f in finals]
    bands = []
    for i, box in enumerate(spec.boxes):
        own = _diff(image.crop(box), resized[i])
        assert own < 1.0, (i, own)
        band = image.crop(spec.captions[i])
        assert np.asarray(band).max() > 128, "the caption is drawn"
        bands.append(band.tobytes())
    assert len(set(bands)) == 6, "each tile has its own caption"
    assert "6 of 6 variations" in sheet.content and "Left out" not in sheet.content

    # A restart neither loses nor repeats it.
    await h.stop()
    await h.start(worker=False)
    await asyncio.sleep(1.5)   # past reconcile_interval (0.5 s): the open sets were re-read
    assert len(_sheet_messages(fd)) == 1 and len(_sheet_posts(fd)) == 1
    fd.assert_clean()


async def test_set_bookkeeping_expires_and_an_expired_open_set_is_dropped(tmp_path):
    """keep_seconds: 30 days, or [worker] keep_days when longer. A set listed as open whose record
    has expired is dropped from `sheets.open` (nothing to post it from) and the others stay."""
    from types import SimpleNamespace

    from engine.queue import open_queue

    def bot_with(keep_days):
        return SimpleNamespace(config=SimpleNamespace(worker=SimpleNamespace(keep_days=keep_days)))

    assert permutations.keep_seconds(bot_with(0.0)) == 30 * 86400
    assert permutations.keep_seconds(bot_with(7)) == 30 * 86400
    assert permutations.keep_seconds(bot_with(90)) == 90 * 86400
    queue = open_queue(f"sqlite:///{tmp_path}/q.db")
    await queue.start()
    try:
        await queue.set_setting(permutations.set_key("live"), {"id": "live", "jobs": []}, expire_after=60)
        await queue.set_setting(permutations.set_key("old"), {"id": "old", "jobs": []}, expire_after=0.05)
        await queue.set_setting(permutations.OPEN_KEY, ["old", "live"])
        await asyncio.sleep(0.1)
        cog = permutations.SheetsCog(SimpleNamespace(queue=queue, config=bot_with(0.0).config))
        await cog._load_open()
        assert list(cog._open) == ["live"]
        assert await queue.get_setting(permutations.OPEN_KEY) == ["live"]
    finally:
        await queue.close()


async def test_an_open_set_waiting_longer_than_its_records_expiry_still_gets_its_sheet_after_a_restart(
        harness, monkeypatch):
    """The set's record is kept 3 s here (KEEP_SETS_DAYS, scaled down) and its jobs wait longer than
    that in line. The running bot writes the open set's record again as half of that passes, so
    after 4 s it is still in the store, and a restart then still posts the set's sheet once its
    jobs end. Before: the record expired, the running bot still had the set in memory, but the
    restarted one dropped it without a sheet."""
    h = harness
    monkeypatch.setattr(permutations, "KEEP_SETS_DAYS", 3.0 / 86400)
    h.config.worker.keep_days = 0.0   # keep_seconds: the longer of the two
    await h.start(worker=False)
    fd = h.fd
    inter = await h.imagine("a {red, blue} mill", iterations=2)
    await h.reply_of(inter)
    jobs = await _set_jobs(h)
    set_id = jobs[0].spec.extra["set"]["id"]
    assert (await h.queue.get_setting(permutations.set_key(set_id)))["jobs"] == [r.id for r in jobs]
    await asyncio.sleep(4.0)   # past the first expiry: written again meanwhile
    kept = await h.queue.get_setting(permutations.set_key(set_id))
    assert kept is not None and kept["jobs"] == [r.id for r in jobs] and kept.get("kept_at")
    await h.stop()

    await h.start(worker=False)
    await claim_jobs(h.queue, [r.id for r in jobs])
    await finish_jobs(h.queue, [r.id for r in jobs])
    assert (await _marker(h, set_id, timeout=20)).get("message_id")
    assert len(_sheet_messages(fd)) == 1
    fd.assert_clean()


async def test_a_reply_that_fails_oddly_leaves_every_job_of_the_set_followed_and_the_sheet_posted(harness, caplog):
    """Discord answers the second job's reply (a follow-up of the command) with a 200 whose body is
    no message (discord.py then raises a KeyError, not an HTTPException). That job's reply is
    missing; the third job still gets its reply, every job's result is posted (the second one's as
    a new message) and the contact sheet follows: the set was recorded before the replies were sent."""
    h = harness
    await h.start()
    fd = h.fd
    rule = fd.inject_error("POST", r"/webhooks/\d+/[^/]+", 200, body={}, count=1)
    inter = await h.imagine("a {red, blue, golden} house", iterations=2)
    first = await h.reply_of(inter)
    await fd.wait_for(lambda: len(rule.hits) == 1, 10, "the second job's reply (answered oddly)")
    jobs = await _set_jobs(h)
    assert [r.spec.prompt for r in jobs] == ["a red house", "a blue house", "a golden house"]
    for r in jobs:
        record = await h.wait_delivered(r.id, timeout=60)
        assert record.state == JobState.DONE, record.error
        assert len(h.posts_of_job(r.id)) == 1, r.spec.prompt
    assert "set " in caplog.text and f"could not show the reply of job {jobs[1].id}" in caplog.text
    await fd.wait_for(lambda: _sheet_messages(fd), 20, "the contact sheet")
    (sheet,) = _sheet_messages(fd)
    assert "3 of 3 variations" in sheet.content
    # The first and third jobs' replies were edited into their results; the second one's is a new message.
    assert h.job_id(first) == jobs[0].id
    results = {r.id: (await h.queue.get(r.id)).spec.reply for r in jobs}
    assert results[jobs[0].id]["result_message_id"] == first.id
    assert results[jobs[2].id]["result_message_id"] == results[jobs[2].id]["message_id"]
    assert "message_id" not in results[jobs[1].id] and results[jobs[1].id]["result_message_id"]
    assert len(fd.channel_messages()) == 4   # three results and the sheet
    fd.assert_clean()


def _visible_job_ids(h):
    return sorted(h.job_id(m) for m in h.fd.channel_messages() if JOB_ID_RE.search(m.content))


def _result_on(fd, message) -> bool:
    """The message shows a final result: the image and the video."""
    return {a["filename"] for a in fd.messages[message.id].attachments} == {"final.png", "video.mp4"}


async def test_a_set_in_a_channel_the_bot_may_not_post_in_is_answered_through_the_command(harness):
    """The bot may not post in the channel (every channel message answers 403 / 50013), but the
    slash command works there. Every job of the set gets its reply (the interaction's message and
    its follow-ups: a webhook, no channel permission needed), each reply shows its job's result,
    and the contact sheet comes as a follow-up too. Nothing pings anyone."""
    h = harness
    await h.start()
    fd = h.fd
    denied = fd.inject_error("POST", r"/channels/\d+/messages", 403,
                             body={"message": "Missing Permissions", "code": 50013}, count=10_000)
    inter = await h.imagine("a {red, blue, green} house", iterations=2)
    await h.reply_of(inter)
    jobs = await _set_jobs(h)
    assert len(jobs) == 3
    for r in jobs:
        record = await h.wait_delivered(r.id, timeout=60)
        assert record.state == JobState.DONE, record.error
    await fd.wait_for(lambda: _sheet_messages(fd), 20, "the contact sheet")

    assert _visible_job_ids(h) == sorted(r.id for r in jobs)
    replies = [m for m in [inter.original_message, *inter.followups] if JOB_ID_RE.search(m.content)]
    for r in jobs:
        (reply,) = [m for m in replies if h.job_id(m) == r.id]
        assert _result_on(fd, reply), r.spec.prompt
        assert (await h.queue.get(r.id)).spec.reply["result_message_id"] == reply.id
    (sheet,) = _sheet_messages(fd)
    assert sheet.id in inter.followup_ids and "3 of 3 variations" in sheet.content
    for m in inter.followups:
        assert m.allowed_mentions == {"parse": []}, m.allowed_mentions
        assert not m.data["mentions"]
    assert not [r for r in fd.requests if r.method == "POST" and r.status == 200 and r.path.startswith("/channels/")]
    assert denied.hits   # the sheet tried the channel first (its nonce), and fell back
    fd.assert_clean()


async def test_after_the_token_expired_the_follow_up_replies_are_edited_through_the_channel(harness, caplog):
    """The same channel, the jobs finishing after the command's token expired: each reply (the
    follow-ups too) is edited into its result with the bot token. A follow-up the user deleted
    meanwhile cannot be replaced (a new message is refused, the token is gone): the bot says so in
    its log and marks that job delivered; the contact sheet is given up the same way, once."""
    h = harness
    h.config.progress.message_interval = 0.01
    await h.start(worker=False)
    fd = h.fd
    fd.inject_error("POST", r"/channels/\d+/messages", 403,
                    body={"message": "Missing Permissions", "code": 50013}, count=10_000)
    inter = await h.imagine("a {red, blue, green} house", iterations=2)
    await h.reply_of(inter)
    await fd.wait_for(lambda: len(inter.followups) == 2, 10, "the follow-up replies")
    jobs = await _set_jobs(h)
    ids = [r.id for r in jobs]
    assert _visible_job_ids(h) == sorted(ids)
    gone = next(m for m in inter.followups if h.job_id(m) == ids[2])
    await fd.delete_message(gone.channel_id, gone.id)
    fd.expire_tokens()
    caplog.set_level(logging.INFO)
    await claim_jobs(h.queue, ids)
    await finish_jobs(h.queue, ids)
    for job_id in ids:
        await h.wait_delivered(job_id, timeout=20)

    for m in [inter.original_message, *inter.followups]:
        if m.id != gone.id:
            assert _result_on(fd, m), m
    assert f"job {ids[2]}: cannot post its result in channel {fd.channel_id}" in caplog.text
    set_id = jobs[0].spec.extra["set"]["id"]
    marker = await _marker(h, set_id)
    assert marker["error"].startswith("403"), marker
    sheet_tries = [r for r in fd.requests if r.method == "POST" and r.path.startswith("/channels/")
                   and any(f.filename == contact_sheet.FILENAME for f in r.files)]
    assert len(sheet_tries) == 1


async def _start_with_quick_sheet_retries(h, monkeypatch):
    """The bot started with sheet retries after 0.5 s doubling to 2 s, and room for several sets."""
    monkeypatch.setattr(permutations, "SHEET_RETRY_FIRST", 0.5)
    monkeypatch.setattr(permutations, "SHEET_RETRY_MAX", 2.0)
    h.config.queue.max_queued_per_user = 9
    await h.start(worker=False)


def _sheet_tries(fd, since=0):
    """The contact-sheet uploads the fake Discord has seen since request `since`."""
    return [r for r in fd.requests[since:] if r.method == "POST"
            and any(f.filename == contact_sheet.FILENAME for f in r.files)]


async def test_a_refused_contact_sheet_is_final_and_a_failing_one_backs_off(harness, monkeypatch):
    """A 400 (a form Discord will never take) closes the set after one post, with the error
    marker. A 503 is tried again, but with backoff (not on every poll: each try re-renders and
    re-uploads the sheet), and posted once Discord takes it."""
    h = harness
    await _start_with_quick_sheet_retries(h, monkeypatch)
    fd = h.fd

    def sheet_tries(since=0):
        return _sheet_tries(fd, since)

    async def run_set(prompt):
        inter = await h.imagine(prompt, iterations=2)
        await h.reply_of(inter)
        jobs = [r for r in await _set_jobs(h) if r.spec.extra["set"]["id"] not in done_sets]
        await claim_jobs(h.queue, [r.id for r in jobs])
        await finish_jobs(h.queue, [r.id for r in jobs])
        return jobs[0].spec.extra["set"]["id"]

    done_sets: set[str] = set()
    rule = fd.inject_error("POST", r"/channels/\d+/messages", 400,
                           body={"message": "Invalid Form Body", "code": 50035}, count=10_000)
    set_id = await run_set("a {red, blue} house")
    done_sets.add(set_id)
    await fd.wait_for(lambda: sheet_tries(), 10, "the first sheet post")
    await asyncio.sleep(2.0)   # 40 polls
    assert len(sheet_tries()) == 1
    assert (await _marker(h, set_id))["error"].startswith("400")
    assert set_id not in (await h.queue.get_setting("sheets.open") or [])
    rule.remaining = 0

    since = len(fd.requests)
    rule = fd.inject_error("POST", r"/channels/\d+/messages", 503,
                           body={"message": "Service Unavailable", "code": 0}, count=10_000)
    set_id = await run_set("a {green, gold} house")
    await fd.wait_for(lambda: sheet_tries(since), 10, "the first sheet post")
    await asyncio.sleep(4.0)   # tries at 0, 0.5, 1.5, 3.5 s (80 polls)
    assert 3 <= len(sheet_tries(since)) <= 5, len(sheet_tries(since))
    rule.remaining = 0
    await fd.wait_for(lambda: [r for r in sheet_tries(since) if r.status == 200], 10, "the sheet, posted")
    marker = await _marker(h, set_id)
    assert marker.get("message_id") and "error" not in marker


async def test_a_network_failure_posting_a_sheet_backs_off_and_other_sets_go_on(harness, monkeypatch, caplog):
    """The connection drops while the sheet uploads (no answer at all: aiohttp's error, not an
    HTTPException): like a 5xx, the post is tried again with backoff, not on every poll, and the
    other open sets are still checked and posted in the meantime."""
    h = harness
    await _start_with_quick_sheet_retries(h, monkeypatch)
    fd = h.fd

    def sheet_tries(since=0):
        return _sheet_tries(fd, since)

    async def queue_set(prompt, known):
        inter = await h.imagine(prompt, iterations=2)
        await h.reply_of(inter)
        jobs = [r for r in await _set_jobs(h) if r.spec.extra["set"]["id"] not in known]
        return jobs[0].spec.extra["set"]["id"], [r.id for r in jobs]

    first, first_jobs = await queue_set("a {red, blue} boat", set())
    second, second_jobs = await queue_set("a {green, gold} boat", {first})
    caplog.set_level(logging.INFO)
    since = len(fd.requests)
    rule = fd.inject_error("POST", r"/channels/\d+/messages", 0, count=10_000)   # drop every post
    await claim_jobs(h.queue, first_jobs + second_jobs)
    await finish_jobs(h.queue, first_jobs + second_jobs)
    await fd.wait_for(lambda: len(sheet_tries(since)) >= 2, 10, "both sets' first sheet posts")
    await asyncio.sleep(3.0)   # tries at 0, 0.5, 1.5 s (60 polls)
    assert 4 <= len(sheet_tries(since)) <= 8, len(sheet_tries(since))   # both sets, backing off
    assert "Traceback" not in caplog.text and "checking permutation sets failed" not in caplog.text
    assert f"set {first}: posting the contact sheet failed" in caplog.text
    assert f"set {second}: posting the contact sheet failed" in caplog.text
    rule.remaining = 0
    for set_id in (first, second):
        marker = await _marker(h, set_id)
        assert marker.get("message_id") and "error" not in marker, marker


async def test_a_failed_marker_write_is_retried_without_posting_the_sheet_again(harness, monkeypatch, caplog):
    """The sheet is posted (as a follow-up: the channel refuses the bot, and a follow-up has no
    nonce for Discord to drop a repeat by), then storing its `sheet:<id>` marker fails a few times
    (a store hiccup; injected, as a real one cannot be produced on demand). The later polls retry
    the store write alone: exactly one sheet, the marker written once the store works again, the
    failure logged once and never out of the polling loop."""
    h = harness
    await h.start()
    fd = h.fd
    fd.inject_error("POST", r"/channels/\d+/messages", 403,
                    body={"message": "Missing Permissions", "code": 50013}, count=10_000)
    real = h.queue.set_setting
    failed = []

    async def set_setting(key, value, expire_after=None):
        if key.startswith("sheet:") and len(failed) < 4:
            failed.append(key)
            raise sqlite3.OperationalError("database is locked")
        return await real(key, value, expire_after=expire_after)

    monkeypatch.setattr(h.queue, "set_setting", set_setting)
    caplog.set_level(logging.DEBUG, logger="bot.permutations")
    inter = await h.imagine("a {red, blue} house", iterations=2)
    await h.reply_of(inter)
    jobs = await _set_jobs(h)
    set_id = jobs[0].spec.extra["set"]["id"]
    for r in jobs:
        assert (await h.wait_delivered(r.id, timeout=60)).state == JobState.DONE
    marker = await _marker(h, set_id, timeout=20)

    assert failed == [f"sheet:{set_id}"] * 4   # every poll in between retried the write
    (sheet,) = _sheet_messages(fd)
    assert marker["message_id"] == sheet.id and sheet.id in inter.followup_ids
    await asyncio.sleep(0.5)   # ten more polls: nothing more is posted
    assert len(_sheet_messages(fd)) == 1
    assert len(_sheet_tries(fd)) == 2   # the channel's refusal, then the one follow-up
    assert caplog.text.count(f"set {set_id}: its contact sheet is done (posted or given up) "
                             "but storing that failed") == 1
    assert "Traceback" not in caplog.text and "checking permutation sets failed" not in caplog.text
    assert f"set {set_id}: checking it failed" not in caplog.text


async def test_open_sets_waiting_in_line_or_running_cost_no_reads_of_their_own(harness, monkeypatch):
    """Four sets are open, two of their jobs running and the rest in line: each poll (every
    line_interval, 0.05 s here) reads the line and the running jobs once for all of them, and no
    set's jobs or `sheet:<id>` one by one. Before: each set's first job and its marker were read
    at every poll (about 440 reads every 2 s at 220 open sets). Once their jobs end, every sheet is
    posted once, as before."""
    h = harness
    h.config.queue.max_queued_per_user = 8
    await h.start(worker=False)
    fd = h.fd
    sets: dict[str, list[str]] = {}
    for colour in ("red", "green", "gold", "grey"):
        inter = await h.imagine(f"a {{{colour}, pale {colour}}} barn", iterations=2)
        await h.reply_of(inter)
        await fd.wait_for(lambda: len(inter.followups) == 1, 10, "the set's other reply")
    for r in await _set_jobs(h):
        sets.setdefault(r.spec.extra["set"]["id"], []).append(r.id)
    assert len(sets) == 4
    job_ids = [r.id for r in await h.queue.queued()]   # in the order they are claimed
    await claim_jobs(h.queue, job_ids[:2])
    queue, reads = h.queue, []

    def counted(name):
        real = getattr(queue, name)

        async def read(*args, **kwargs):
            reads.append((name, args[0] if args else None))
            return await real(*args, **kwargs)
        monkeypatch.setattr(queue, name, read)

    for name in ("get", "get_setting", "line", "running"):
        counted(name)
    await asyncio.sleep(1.0)   # 20 polls
    polls = sum(1 for name, _ in reads if name == "running")
    assert polls >= 5, reads   # (the progress cog reads the running jobs too, every 0.5 s)
    assert [r for r in reads if r[0] == "get" and r[1] in job_ids] == []
    assert [r for r in reads if r[0] == "get_setting" and str(r[1]).startswith("sheet:")] == []
    monkeypatch.undo()

    await claim_jobs(h.queue, job_ids[2:])
    await finish_jobs(h.queue, job_ids)
    for set_id in sets:
        assert (await _marker(h, set_id, timeout=20)).get("message_id")
    await asyncio.sleep(0.5)
    assert len(_sheet_messages(fd)) == 4 and len(_sheet_posts(fd)) == 4
    fd.assert_clean()


async def test_a_restart_between_the_sheet_and_its_marker_after_the_nonce_window_posts_no_second_sheet(
        harness, monkeypatch):
    """Set B's sheet is posted, and the bot stops before it can store B's `sheet:<id>` (the write
    fails until then: a crash between the two). It restarts after Discord has forgotten the nonce
    (the fake's nonce window set to 0), so a second post would be a second sheet. The set's record
    was marked before the post: the restarted bot reads the channel's messages since the mark, finds
    B's sheet there (not set A's, posted and recorded just before it in the same channel) and
    records it, posting nothing. Before: a second sheet of B."""
    h = harness
    h.config.queue.max_queued_per_user = 9
    await h.start(worker=False)
    fd = h.fd

    async def finished_set(prompt, known):
        inter = await h.imagine(prompt, iterations=2)
        await h.reply_of(inter)
        jobs = [r for r in await _set_jobs(h) if r.spec.extra["set"]["id"] not in known]
        return jobs[0].spec.extra["set"]["id"], [r.id for r in jobs]

    first, first_jobs = await finished_set("a {red, blue} lighthouse", set())
    await claim_jobs(h.queue, first_jobs)
    await finish_jobs(h.queue, first_jobs)
    first_sheet = (await _marker(h, first))["message_id"]

    second, second_jobs = await finished_set("a {green, gold} lighthouse", {first})
    real = h.queue.set_setting
    failed = []

    async def set_setting(key, value, expire_after=None):
        if key == f"sheet:{second}":
            failed.append(key)
            raise RuntimeError("the bot stops before it stores the sheet's marker")
        return await real(key, value, expire_after=expire_after)

    monkeypatch.setattr(h.queue, "set_setting", set_setting)
    await claim_jobs(h.queue, second_jobs)
    await finish_jobs(h.queue, second_jobs)
    await fd.wait_for(lambda: len(_sheet_messages(fd)) == 2, 20, "the second set's sheet")
    await _until(lambda: failed, 10, "the second set's marker was never tried")
    sheet = _sheet_messages(fd)[-1]
    assert sheet.id != first_sheet and all(f"`{j}`" in sheet.content for j in second_jobs)
    assert await h.queue.get_setting(f"sheet:{second}") is None
    assert second in await h.queue.get_setting("sheets.open")
    await h.stop()

    fd.nonce_window = 0.0   # Discord has forgotten the nonce: a post now is a second sheet
    since = len(fd.requests)
    await h.start(worker=False)   # a fresh queue object: the marker's write works again
    marker = await _marker(h, second)
    assert marker["message_id"] == sheet.id
    assert requests_matching(fd, "GET", rf"/channels/{fd.channel_id}/messages", since)   # it looked
    await asyncio.sleep(1.0)   # past reconcile_interval (0.5 s) and many polls: still two sheets
    assert [m.id for m in _sheet_messages(fd)] == [first_sheet, sheet.id]
    assert _sheet_tries(fd, since) == []
    fd.assert_clean()


async def _until(predicate, timeout, what):
    """Poll `predicate` (not tied to the fake's events, e.g. a thread's flag) until it holds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


async def test_a_slow_contact_sheet_does_not_hold_up_a_new_set(harness, monkeypatch):
    """A sheet that takes long to render or upload (a 429 wait, discord.py's 5xx retries, a slow
    store) must not hold up new sets: their command records the set (SheetsCog.track) before its
    first reply. The first set's sheet is held mid-render here; a second set is answered meanwhile,
    a second check of the first set does not post it again, and once let go the first sheet is
    posted exactly once. No timing: the render waits on a flag the test sets."""
    h = harness
    h.config.queue.max_queued_per_user = 9
    await h.start(worker=False)
    fd = h.fd
    rendering, release = threading.Event(), threading.Event()
    real_render = contact_sheet.render_sheet

    def held_render(*args, **kwargs):
        rendering.set()
        release.wait(60)
        return real_render(*args, **kwargs)

    monkeypatch.setattr(contact_sheet, "render_sheet", held_render)
    try:
        inter = await h.imagine("a {red, blue} kite", iterations=2)
        await h.reply_of(inter)
        jobs = await _set_jobs(h)
        first = jobs[0].spec.extra["set"]["id"]
        await claim_jobs(h.queue, [r.id for r in jobs])
        await finish_jobs(h.queue, [r.id for r in jobs])
        await _until(rendering.is_set, 20, "the first set's sheet never started rendering")

        second = await h.imagine("a {green, gold} kite", iterations=2)
        await h.reply_of(second, timeout=10)   # not stuck behind the sheet being rendered
        await fd.wait_for(lambda: len(second.followups) == 1, 10, "the second set's other reply")
        assert not release.is_set() and _sheet_tries(fd) == []
        sheets = h.bot.get_cog("Sheets")
        assert await asyncio.wait_for(sheets.check(first), 5) is False   # being posted: not twice
    finally:
        release.set()
    marker = await _marker(h, first)
    assert marker.get("message_id"), marker
    await asyncio.sleep(0.5)   # several polls later: still one
    assert len(_sheet_posts(fd)) == 1 and len(_sheet_tries(fd)) == 1
    assert [m.id for m in _sheet_messages(fd)] == [marker["message_id"]]


async def test_a_set_that_could_not_be_recorded_does_not_keep_its_command(harness, monkeypatch, caplog):
    """The set's record fails to save, twice (before and after the replies): it gets no sheet, and
    SheetsCog must not keep the command it was handed for one (the interaction and its token) for
    good: nothing else would ever drop it."""
    h = harness
    await h.start(worker=False)
    fd = h.fd
    real_set_setting = h.queue.set_setting

    async def failing_set_setting(key, *args, **kwargs):
        if key.startswith("set:"):
            raise ConnectionError("the store is down")
        return await real_set_setting(key, *args, **kwargs)

    monkeypatch.setattr(h.queue, "set_setting", failing_set_setting)
    inter = await h.imagine("a {red, blue} boat", iterations=2)
    await h.reply_of(inter)
    await fd.wait_for(lambda: len(inter.followups) == 1, 10, "the second reply")
    await _until(lambda: "could not be recorded" in caplog.text, 10, "the set was not given up")
    jobs = await _set_jobs(h)
    set_id = jobs[0].spec.extra["set"]["id"]
    sheets = h.bot.get_cog("Sheets")
    assert set_id not in sheets._open
    assert set_id not in sheets._interactions, "the command of a set with no sheet is kept for good"


async def test_a_set_whose_first_reply_failed_in_a_closed_channel_gets_every_result_through_the_command(
        harness, caplog):
    """The first reply fails (Discord answers the edit oddly), so replies 2..n are to be channel
    messages; the channel refuses the bot (403), so they are not made. The command's token still
    lives: every job's result must come through it (the first job's in its reply, the others as
    follow-ups), not be given up as unpostable."""
    h = harness
    await h.start(worker=False)
    fd = h.fd
    denied = fd.inject_error("POST", r"/channels/\d+/messages", 403,
                             body={"message": "Missing Permissions", "code": 50013}, count=10_000)
    odd = fd.inject_error("PATCH", r"/webhooks/\d+/[^/]+/messages/@original", 200, body={}, count=1)
    caplog.set_level(logging.INFO)
    inter = await h.imagine("a {red, blue, green} house", iterations=2)
    await fd.wait_for(lambda: odd.hits, 10, "the first reply (answered oddly)")
    await fd.wait_for(lambda: len(denied.hits) >= 2, 10, "the other replies (refused by the channel)")
    await h.reply_of(inter)   # the first job's own progress edit makes its reply
    jobs = await _set_jobs(h)
    ids = [r.id for r in jobs]
    assert len(ids) == 3 and h.job_id(inter.original_message) == ids[0]
    await claim_jobs(h.queue, ids)
    await finish_jobs(h.queue, ids)
    for job_id in ids:
        await h.wait_delivered(job_id, timeout=20)
    assert "cannot post its result" not in caplog.text
    for job_id in ids:
        assert len(h.posts_of_job(job_id)) == 1, job_id
    results = {r.id: (await h.queue.get(r.id)).spec.reply["result_message_id"] for r in jobs}
    assert results[ids[0]] == inter.original_message.id
    for job_id in ids[1:]:
        assert results[job_id] in inter.followup_ids
        assert _result_on(fd, fd.messages[results[job_id]])


WEBHOOK_POST = r"/webhooks/\d+/[^/]+"


async def _set_with_channel_replies(h, prompt):
    """A set whose first reply fails (Discord answers the edit oddly), so its other replies are
    channel messages made with the bot token; then the channel closes to the bot (every new
    message and every edit there answers 403 / 50001, as when it loses View Channel). Returns the
    command, the jobs' ids, the channel-message replies (jobs 2..n) and the request index at
    which the channel closed. No worker: the test plays the jobs."""
    fd = h.fd
    odd = fd.inject_error("PATCH", r"/webhooks/\d+/[^/]+/messages/@original", 200, body={}, count=1)
    inter = await h.imagine(prompt, iterations=2)
    await fd.wait_for(lambda: odd.hits, 10, "the first reply (answered oddly)")
    jobs = await _set_jobs(h)
    ids = [r.id for r in jobs]

    def channel_replies():
        out = {}
        for m in fd.channel_messages():
            found = JOB_ID_RE.search(m.content)
            if found and m.id not in inter.followup_ids and m.id != inter.original_message_id:
                out[found.group(1)] = m
        return out

    await fd.wait_for(lambda: set(ids[1:]) <= set(channel_replies()), 10, "the channel-message replies")
    replies = channel_replies()
    assert not inter.followup_ids   # replies 2..n are not follow-ups of the command
    since = len(fd.requests)
    for method, path in (("POST", rf"/channels/{fd.channel_id}/messages"),
                         ("PATCH", rf"/channels/{fd.channel_id}/messages/\d+")):
        fd.inject_error(method, path, 403, body={"message": "Missing Access", "code": 50001}, count=10_000)
    return inter, ids, [replies[job_id] for job_id in ids[1:]], since


async def test_a_channel_message_reply_of_a_set_posts_its_result_through_the_command_when_the_channel_closes(
        harness, caplog):
    """Replies 2..n of a set are channel messages (its first reply failed); the channel then
    closes to the bot. Their edits never went through the command's token (it cannot edit them),
    but the token still lives, so each result the channel refuses as a new message goes out as a
    follow-up of the command, not given up."""
    h = harness
    await h.start(worker=False)
    fd = h.fd
    caplog.set_level(logging.INFO)
    inter, ids, replies, since = await _set_with_channel_replies(h, "a {red, blue} house")
    await claim_jobs(h.queue, ids)
    await finish_jobs(h.queue, ids)
    for job_id in ids:
        await h.wait_delivered(job_id, timeout=20)

    assert "cannot post its result" not in caplog.text
    for job_id, reply in zip(ids[1:], replies):
        (posted,) = h.posts_of_job(job_id)
        assert posted.method == "POST" and re.fullmatch(WEBHOOK_POST, posted.path), posted.path
        result_id = (await h.queue.get(job_id)).spec.reply["result_message_id"]
        assert result_id in inter.followup_ids and result_id == int(posted.response["id"])
        assert _result_on(fd, fd.messages[result_id])
        assert fd.messages[result_id].allowed_mentions == {"parse": []}
        # The channel refused the new message first (its nonce), then the token posted it.
        refused = [r for r in requests_matching(fd, "POST", rf"/channels/{fd.channel_id}/messages", since)
                   if r.status == 403 and isinstance(r.json, dict) and job_id in str(r.json.get("nonce"))]
        assert refused, job_id
        # Its own message was never edited through the token (the token cannot edit it).
        assert not requests_matching(fd, "PATCH", rf"/webhooks/\d+/[^/]+/messages/{reply.id}")
    fd.assert_clean()


async def test_a_result_the_channel_takes_without_files_is_posted_as_text_with_a_note(harness, caplog):
    """The job's reply was deleted (its result is a new message), an admin has since taken Attach
    Files away from the bot in the channel (Discord refuses a message with files: 403 / 50013), and
    the command's token has expired (no follow-up can bring the files). The result is posted once,
    in the channel, as text alone with a note saying why, and the job is delivered (before: given
    up, nothing posted at all)."""
    h = harness
    await h.start(worker=False)
    fd = h.fd
    caplog.set_level(logging.INFO)
    inter = await fd.send_slash_command("imagine", {"prompt": "a lighthouse"})
    await fd.wait_for_response(inter)
    msg = await h.reply_of(inter)
    job_id = h.job_id(msg)
    await fd.delete_message(msg.channel_id, msg.id)
    fd.channels[fd.channel_id]["permission_overwrites"] = [
        {"id": str(fd.bot_role_id), "type": 0, "allow": "0", "deny": str(Permission.ATTACH_FILES)}]
    fd.expire_tokens()
    since = len(fd.requests)
    await claim_jobs(h.queue, [job_id])
    await finish_jobs(h.queue, [job_id])
    record = await h.wait_delivered(job_id, timeout=20)

    posts = requests_matching(fd, "POST", rf"/channels/{fd.channel_id}/messages", since)
    assert [(r.status, bool(r.files)) for r in posts] == [(403, True), (200, False)], posts
    assert posts[0].response == {"message": "Missing Permissions", "code": 50013}
    (posted,) = h.posts_of_job(job_id)   # no second post, not through the (expired) token either
    assert posted is posts[1]
    assert all(r.status != 200 for r in requests_matching(fd, "POST", WEBHOOK_POST, since))
    assert record.spec.reply["result_message_id"] == int(posted.response["id"])
    result = fd.messages[record.spec.reply["result_message_id"]]
    assert not result.attachments and "Done" in result.content
    assert ("The image and video could not be attached: the bot lacks the Attach Files permission in this "
            "channel (ask a server admin).") in result.content
    assert "cannot post its result" not in caplog.text
    assert caplog.text.count("refuses its files") == 1
    fd.assert_clean()


@pytest.mark.parametrize("expiry", ["aged", "revoked"])
async def test_a_channel_message_reply_of_a_set_is_given_up_when_the_commands_token_is_gone(
        harness, caplog, expiry):
    """The same set, the channel closed, but the command's token is gone: older than token_ttl
    (no follow-up is tried), or refused by Discord before that (401 / 50027 to the follow-up). Then
    nothing can post reply 2's result: it is logged as given up and marked delivered, and the bot
    goes on (the next command is answered)."""
    h = harness
    if expiry == "aged":
        h.config.progress.token_ttl = 1.0
    await h.start(worker=False)
    fd = h.fd
    caplog.set_level(logging.INFO)
    inter, ids, replies, since = await _set_with_channel_replies(h, "a {red, blue} house")
    if expiry == "aged":
        await asyncio.sleep(1.0)   # the command is older than token_ttl by now
    else:
        fd.expire_tokens()
    await claim_jobs(h.queue, ids)
    await finish_jobs(h.queue, ids)
    await h.wait_delivered(ids[1], timeout=20)

    assert f"job {ids[1]}: cannot post its result in channel {fd.channel_id} (403 Missing Access); giving up" \
        in caplog.text
    assert (await h.queue.get(ids[1])).spec.reply.get("result_message_id") is None
    assert not h.posts_of_job(ids[1])
    followup_tries = [r for r in requests_matching(fd, "POST", WEBHOOK_POST, since)
                      if f"imagine:reroll:{ids[1]}" in str(r.json)]   # reply 2's result, by its buttons
    if expiry == "aged":
        assert not followup_tries
    else:   # tried once, refused as expired
        assert [r.status for r in followup_tries] == [401], [(r.path, r.status) for r in followup_tries]
    assert all(not t.done() for t in h.bot.progress._tasks)
    later = await h.imagine("a lighthouse")
    await h.reply_of(later)
    fd.assert_clean()


async def test_the_contact_sheet_comes_after_every_result_and_links_where_each_was_posted(harness):
    """A set member's reply was deleted while it waited, so its result goes out as a new message.
    The sheet waits for every result to be posted, and links that new message, not the deleted
    reply. Before: a set counted as ended once its jobs had finished, so the sheet could come before
    that result, linking the deleted reply ("Unknown message")."""
    h = harness
    h.config.progress.line_interval = 0.05
    await h.start(worker=False)
    fd = h.fd
    inter = await h.imagine("a {red|blue} house", iterations=2)
    await h.reply_of(inter)
    await fd.wait_for(lambda: len(inter.followups) == 1, 10, "the second reply")
    ids = [r.id for r in await _set_jobs(h)]
    gone = inter.followups[0]
    await fd.delete_message(gone.channel_id, gone.id)
    await claim_jobs(h.queue, ids)
    await finish_jobs(h.queue, ids)
    for job_id in ids:
        await h.wait_delivered(job_id)
    await fd.wait_for(lambda: _sheet_messages(fd), 10, "the sheet")
    (sheet,) = _sheet_messages(fd)
    result_id = (await h.queue.get(ids[1])).spec.reply["result_message_id"]
    assert str(gone.id) not in sheet.content and str(result_id) in sheet.content, sheet.content
    assert sheet.id > result_id   # posted after the result
    fd.assert_clean()


async def test_a_store_that_fails_the_sheets_mark_is_retried_after_a_backoff_without_rendering(harness, monkeypatch,
                                                                                                caplog):
    """The `posting_after` mark is written before the sheet is posted. A store refusing that write
    (SQLite's lock, a disk full, Redis out of memory) failed every poll: the sheet rendered again
    each time (twice when over the limit) and a traceback logged, 45 of each in 3 s. Now nothing is
    rendered until the mark is written, the next try waits as after a failed post, one warning says
    why, and once the store takes the write the sheet is posted, once."""
    h = harness
    await h.start(worker=False)
    inter = await h.imagine("a {red, blue} house", iterations=2)
    await h.reply_of(inter)
    records = [r for r in await h.queue.history(h.fd.channel_id, limit=50) if "set" in r.spec.extra]
    set_id = records[0].spec.extra["set"]["id"]
    real_set_setting = h.queue.set_setting
    refusals = []

    async def set_setting(key, value, expire_after=None):
        if key == f"set:{set_id}" and isinstance(value, dict) and "posting_after" in value and len(refusals) < 2:
            refusals.append(key)
            raise sqlite3.OperationalError("database or disk is full")
        return await real_set_setting(key, value, expire_after=expire_after)

    monkeypatch.setattr(h.queue, "set_setting", set_setting)
    renders = []
    real_render = contact_sheet.render_sheet

    def counted_render(*args, **kwargs):
        renders.append(1)
        return real_render(*args, **kwargs)

    monkeypatch.setattr(contact_sheet, "render_sheet", counted_render)
    monkeypatch.setattr(permutations, "SHEET_RETRY_FIRST", 0.5)
    caplog.set_level(logging.INFO, logger="bot.permutations")
    ids = [r.id for r in records]
    await claim_jobs(h.queue, ids)
    await finish_jobs(h.queue, ids)
    await asyncio.sleep(1.2)   # ~24 polls: the first refusal, then the backoff's 0.5 s, the second
    assert len(refusals) == 2 and renders == [], (len(refusals), len(renders))
    assert "checking it failed" not in caplog.text
    assert caplog.text.count(f"set {set_id}: posting the contact sheet failed (the store failed marking it: "
                             "OperationalError: database or disk is full)") == 2
    await h.fd.wait_for(lambda: _sheet_messages(h.fd), 10, "the contact sheet")
    await asyncio.sleep(0.3)
    assert len(_sheet_posts(h.fd)) == 1 and len(renders) == 1
