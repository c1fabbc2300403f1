"""Issue 8, the bot side: weighted prompts, Remix (button + modal, /remix), image prompts and init
images from attachments, quality presets, /help. Real bot + fake Discord + tiny-model worker."""

from __future__ import annotations

import io
import logging
import re

import numpy as np
import pytest
from PIL import Image

from bot import render
from bot.imagine import REMIX_NO_SETS, limit_text
from engine.jobs import EventKind, JobSpec, JobState
from tests.queue_fixtures import job_events
from tests.test_bot_support import (  # noqa: F401 - the fixture
    EPHEMERAL, claim_jobs, ephemeral_answer, finish_jobs, finished_job, harness,
)

pytestmark = pytest.mark.asyncio


def png(image: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=kw.pop("format", "PNG"), **kw)
    return buf.getvalue()


def noise_png(side: int = 48, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    return png(Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)))


async def first_frame(queue, job_id) -> bytes:
    first = next(e for e in await job_events(queue, job_id) if e.kind == EventKind.PROGRESS)
    assert first.iteration == 0
    return first.frame_png


def refusal(inter) -> str:
    assert inter.response_type == 4, inter.response_type      # answered at once, not deferred
    assert inter.response["data"]["flags"] & EPHEMERAL
    return inter.response["data"]["content"]


async def command(h, name, options=None, **kw):
    inter = await h.fd.send_slash_command(name, options or {}, **kw)
    await h.fd.wait_for_response(inter)
    return inter


async def nothing_queued(h) -> None:
    assert await h.queue.count_queued() == 0
    assert await h.queue.history(h.fd.channel_id) == []
    assert h.fd.channel_messages() == []


# --- weighted prompts --------------------------------------------------------------------------

async def test_weighted_prompts_are_queued_intact_and_bad_ones_refused_before_queueing(harness):
    h = harness
    await h.start()
    for prompt, expected in [
        (" | ".join(f"part {i}" for i in range(9)), "9 prompt parts; at most 8"),
        ("a:abc|", "empty part"),
        ("blurry:-1", "positive weight"),
        ("a house | by Escher:500", "between -100 and 100"),
    ]:
        text = refusal(await command(h, "imagine", {"prompt": prompt}))
        assert expected in text and "a house | by Escher:0.5 | blurry:-1" in text, text
    await nothing_queued(h)

    prompt = "a house | by Escher:0.5 | blurry:-1"
    msg = await h.reply_of(await h.imagine(prompt))
    record = await h.wait_delivered(h.job_id(msg))
    assert record.state == JobState.DONE and record.spec.prompt == prompt   # the worker read the parts too
    h.fd.assert_clean()



async def test_a_reply_shows_how_the_prompts_weights_were_read(harness):
    """When a part weighs other than 1, the reply's settings line says how the prompt was read
    (engine.prompts.parse_prompt's parts, each cut short, as inline code: a backtick becomes a
    look-alike); a prompt whose parts all weigh 1 has no such words. A reply that withholds its
    prompt (cancelled for a banned word) withholds them too."""
    from engine.jobs import JobRecord, JobSpec

    h = harness
    await h.start(worker=False)
    msg = await h.reply_of(await h.imagine("a cat:2 | blurry:-1"))
    assert "` · read as `a cat ×2 · blurry ×-1` · job `" in msg.content, msg.content
    msg = await h.reply_of(await h.imagine("a `very` long description of a cat in a hat:0.5 | a dog"))
    assert " · read as `a ˋveryˋ long descripti… ×0.5 · a dog ×1` · job `" in msg.content, msg.content
    for prompt in ("a cat | a dog", "a cat:1 | a dog:1.0", "10:30 in the morning"):
        msg = await h.reply_of(await h.imagine(prompt))
        assert "read as" not in msg.content, msg.content

    record = JobRecord(id="abc123def456", spec=JobSpec(prompt="a cat:2 | secret:-1", user_id=1, iterations=4),
                       state=JobState.CANCELLED, error=render.CANCEL_BANNED)
    text = render.final_text(record)
    assert "read as" not in text and "secret" not in text and "job `abc123def456`" in text, text
    h.fd.assert_clean()

# --- remix ---------------------------------------------------------------------------------------

async def test_remix_by_button_and_command_starts_from_the_parents_final_picture(harness):
    h = harness
    await h.start()
    fd = h.fd
    msg = await h.reply_of(await h.imagine("a red house", seed=1))
    parent_id = h.job_id(msg)
    parent = await h.wait_delivered(parent_id)
    assert parent.state == JobState.DONE
    await fd.wait_for(lambda: f"imagine:remix:{parent_id}" in fd.messages[msg.id].custom_ids, 10, "Remix button")
    parent_final = await h.queue.get_artifact(parent_id, "final.png")
    author = int(fd.member_user["id"])

    # Someone else clicks Remix: a modal asks for the prompt (pre-filled with the parent's).
    carol = fd.add_user("carol")
    click = await fd.click_button(msg, f"imagine:remix:{parent_id}", user=carol)
    await fd.wait_for_response(click)
    assert click.response_type == 9
    modal = click.response["data"]
    text_input = modal["components"][0]["components"][0]
    assert text_input["value"] == "a red house"
    submit = await fd.submit_modal(click, {text_input["custom_id"]: "a blue boat | stormy:0.5"})
    await fd.wait_for_response(submit)
    assert submit.response_type == 5   # deferred: the remix's public reply
    remix_msg = await h.reply_of(submit)
    by_button = h.job_id(remix_msg)

    # /remix by another user (the admin), not the author either.
    inter = await h.fd.send_slash_command("remix", {"job": parent_id, "prompt": "a green tree"}, user=fd.admin_user)
    await fd.wait_for_response(inter)
    by_command = h.job_id(await h.reply_of(inter))

    for job_id, user, prompt in [(by_button, carol, "a blue boat | stormy:0.5"), (by_command, fd.admin_user, "a green tree")]:
        record = await h.wait_delivered(job_id)
        assert record.state == JobState.DONE, record.error
        spec = record.spec
        assert (spec.parent_job_id, spec.parent_kind, spec.prompt) == (parent_id, "remix", prompt)
        assert spec.user_id == int(user["id"]) and spec.grid == parent.spec.grid
        assert await first_frame(h.queue, job_id) == parent_final   # frame 0 is the parent's final picture
        final = fd.messages[int(record.spec.reply["result_message_id"])]
        assert f"remix of `{parent_id}`" in final.content and "a red house" in final.content
        assert f"<@{author}>" in final.content                                  # the parent's author, named...
        assert final.data["mentions"] == [] and final.data["mention_everyone"] is False   # ...never pinged
        assert f"https://discord.com/channels/{fd.guild_id}/{fd.channel_id}/{msg.id}" in final.content

    history = (await command(h, "history")).response["data"]["content"]
    assert history.count(f"↳ remix of `{parent_id}` by <@{author}>") == 2, history
    fd.assert_clean()


async def test_remix_of_a_job_without_its_state_is_refused_and_nothing_is_queued(harness):
    h = harness
    await h.start(worker=False)   # the test plays the GPU: a DONE job whose state.pt never came
    fd = h.fd
    msg = await h.reply_of(await h.imagine("a finished job"))
    done_id = h.job_id(msg)
    await claim_jobs(h.queue, [done_id])
    await finish_jobs(h.queue, [done_id])   # final.png + video.mp4, no state.pt (as if pruned)
    await h.wait_delivered(done_id)
    await fd.wait_for(lambda: f"imagine:remix:{done_id}" in fd.messages[msg.id].custom_ids, 10, "Remix button")
    await h.queue.set_setting("paused", True)
    waiting_id = h.job_id(await h.reply_of(await h.imagine("still waiting")))
    before = len(await h.queue.history(fd.channel_id))

    cases = [("nosuchjob123", "There is no job `nosuchjob123`"), (waiting_id, "has not finished (queued)"),
             (done_id, "is gone (pruned)")]
    for job_id, expected in cases:
        text = refusal(await command(h, "remix", {"job": job_id, "prompt": "anything"}))
        assert expected in text, text
    click = await fd.click_button(msg, f"imagine:remix:{done_id}")   # the button says the same, no modal
    await fd.wait_for_response(click)
    assert "is gone (pruned)" in refusal(click)
    assert len(await h.queue.history(fd.channel_id)) == before and await h.queue.count_queued() == 1
    fd.assert_clean()


async def test_a_remix_prompt_with_a_permutation_set_is_refused_privately(harness):
    """A remix is one job: `{…}` sets are /imagine's. By /remix and by the Remix form, a prompt with
    braces is refused at once, privately, and nothing is queued (sent on, CLIP would read the
    braces and every option as one prompt). Escaped braces (`\\{`, `\\}`) are literal ones, as in
    /imagine: taken by both, and the form pre-fills a prompt's braces escaped, so the parent's
    prompt sent back as it is goes through."""
    h = harness
    await h.start(worker=False)
    fd = h.fd
    msg, parent_id = await finished_job(h, "a \\{red\\} house")
    assert (await h.queue.get(parent_id)).spec.prompt == "a {red} house"
    before = len(await h.queue.history(fd.channel_id))

    text = refusal(await command(h, "remix", {"job": parent_id, "prompt": "a {red, blue} boat"}))
    assert "A remix makes one picture; `{…}` sets work with `/imagine`" in text, text
    assert "`\\{` and `\\}` for literal ones" in text, text
    click = await fd.click_button(msg, f"imagine:remix:{parent_id}")
    await fd.wait_for_response(click)
    text_input = click.response["data"]["components"][0]["components"][0]
    submit = await fd.submit_modal(click, {text_input["custom_id"]: "a {cat|dog} on a boat"})
    await fd.wait_for_response(submit)
    assert "A remix makes one picture" in refusal(submit)
    assert len(await h.queue.history(fd.channel_id)) == before and await h.queue.count_queued() == 0

    inter = await fd.send_slash_command("remix", {"job": parent_id, "prompt": "a \\{red, blue\\} boat"})
    await fd.wait_for_response(inter)
    by_command = h.job_id(await h.reply_of(inter))
    click = await fd.click_button(msg, f"imagine:remix:{parent_id}")
    await fd.wait_for_response(click)
    text_input = click.response["data"]["components"][0]["components"][0]
    assert text_input["value"] == "a \\{red\\} house"
    submit = await fd.submit_modal(click, {text_input["custom_id"]: text_input["value"]})
    await fd.wait_for_response(submit)
    by_form = h.job_id(await h.reply_of(submit))
    assert [(await h.queue.get(job_id)).spec.prompt for job_id in (by_command, by_form)] == [
        "a {red, blue} boat", "a {red} house"]
    fd.assert_clean()


async def test_the_remix_form_holds_a_prompt_of_the_longest_length_with_its_braces_escaped(harness):
    """A parent prompt as long as `max_prompt_chars` with literal braces: the form pre-fills it
    whole, its escapes on top of the limit (each `\\{` counts as one character of the prompt), so
    sent back as it is it makes a remix of the very same prompt."""
    h = harness
    await h.start(worker=False)
    fd = h.fd
    h.config.imagine.max_prompt_chars = 120
    prompt = "a house by the sea " + "x" * 90 + " {red} door"
    assert len(prompt) == 120
    msg, parent_id = await finished_job(h, prompt.replace("{", "\\{").replace("}", "\\}"))
    assert (await h.queue.get(parent_id)).spec.prompt == prompt

    click = await fd.click_button(msg, f"imagine:remix:{parent_id}")
    await fd.wait_for_response(click)
    text_input = click.response["data"]["components"][0]["components"][0]
    assert text_input["value"] == prompt.replace("{", "\\{").replace("}", "\\}")
    assert text_input["max_length"] == 122
    submit = await fd.submit_modal(click, {text_input["custom_id"]: text_input["value"]})
    await fd.wait_for_response(submit)
    remix = h.job_id(await h.reply_of(submit))
    assert (await h.queue.get(remix)).spec.prompt == prompt
    fd.assert_clean()



async def _remix_form(h, msg, job_id: str, **kw):
    """Press Remix on `msg`: the form Discord shows (the click, its text input)."""
    click = await h.fd.click_button(msg, f"imagine:remix:{job_id}", **kw)
    await h.fd.wait_for_response(click)
    assert click.response_type == 9, click.response   # the modal
    return click, click.response["data"]["components"][0]["components"][0]


async def _submitted(h, form, typed: str):
    """Submit the form `_remix_form` opened with `typed`; answered."""
    click, text_input = form
    submit = await h.fd.submit_modal(click, {text_input["custom_id"]: typed})
    await h.fd.wait_for_response(submit)
    return submit


async def test_a_remix_aims_at_the_parents_image_prompt_and_keeps_its_preset_but_not_its_init_image(harness, caplog):
    """The image prompt is a target all along: a remix (the form and /remix alike) aims at it too,
    the same upload and weight, as Continue does, so the parent's negative-only prompt sent back
    unchanged from the form is queued (the image's positive weight lets it through) and runs with
    two CLIP targets. The parent's preset label stays (its grid and cut-outs do). Not the init
    image: a remix starts from the parent's final state. An image prompt gone from the store is
    left out (a prompt that needed its pull is refused)."""
    h = harness
    caplog.set_level(logging.INFO, logger="engine.worker")
    await h.start()
    fd = h.fd
    target = fd.host_attachment("target.png", noise_png(seed=1))
    start = fd.host_attachment("start.png", noise_png(seed=2))
    msg = await h.reply_of(await h.imagine("blurry:-1", image=target, image_weight=2, init_image=start,
                                           quality="draft"))
    parent_id = h.job_id(msg)
    parent = await h.wait_delivered(parent_id)
    assert parent.state == JobState.DONE, parent.error
    await fd.wait_for(lambda: f"imagine:remix:{parent_id}" in fd.messages[msg.id].custom_ids, 10, "Remix button")
    image_prompt = parent.spec.extra["image_prompt"]
    assert image_prompt["weight"] == 2.0 and parent.spec.preset == "draft"

    click, text_input = await _remix_form(h, msg, parent_id)
    assert text_input["value"] == "blurry:-1"
    submit = await _submitted(h, (click, text_input), text_input["value"])   # sent back unchanged
    by_form = h.job_id(await h.reply_of(submit))
    by_command = h.job_id(await h.reply_of(await command(h, "remix", {"job": parent_id, "prompt": "a cat"})))
    for job_id, prompt in [(by_form, "blurry:-1"), (by_command, "a cat")]:
        record = await h.wait_delivered(job_id)
        assert record.state == JobState.DONE, record.error
        spec = record.spec
        assert (spec.prompt, spec.parent_job_id, spec.parent_kind) == (prompt, parent_id, "remix")
        assert spec.extra["image_prompt"] == image_prompt and "init_image" not in spec.extra
        assert spec.preset == "draft" and (spec.grid, spec.cutn) == (parent.spec.grid, parent.spec.cutn)
        (used,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"job {job_id}: ")
                   and "CLIP targets" in r.getMessage()]
        assert used == f"job {job_id}: 2 CLIP targets (1 from an image prompt)"   # no init image: the state
        (final,) = h.final_edits(int(spec.reply["message_id"]))
        assert "quality draft · image prompt ×2`" in final.json["content"], final.json["content"]

    # The picture gone from the store (behind its back): the parent's final state is what a remix
    # needs, so it goes without the picture; a prompt that needed the picture's pull is refused.
    upload_id, _ = image_prompt["artifact"]
    await h.write_store(lambda db: db.execute("DELETE FROM artifacts WHERE job_id = ?", (upload_id,)))
    text = refusal(await command(h, "remix", {"job": parent_id, "prompt": "blurry:-1"}))
    assert "needs a positive weight" in text, text
    assert await h.queue.count_queued() == 0
    without = h.job_id(await h.reply_of(await command(h, "remix", {"job": parent_id, "prompt": "a dog"})))
    record = await h.wait_delivered(without)
    assert record.state == JobState.DONE and "image_prompt" not in record.spec.extra, record.error
    fd.assert_clean()


TYPED = "a ```boat``` with `oars` @everyone | stormy:500"
TYPED_BLOCK = "\nYour prompt, to copy and send again:\n```\na ˋˋˋboatˋˋˋ with `oars` @everyone | stormy:500\n```"


async def test_a_refused_remix_form_quotes_the_typed_prompt_back_to_copy(harness, monkeypatch):
    """Discord keeps no copy of a submitted form: every refusal of the Remix form's submit (a weight
    out of range, a `{…}` set, a refused word, the cap reached while the form was open or at the
    store's write) ends with the prompt as typed, in a code block to copy: a run of backticks that
    would close the block early shows as look-alikes, single ones as typed, and @everyone inside
    pings nobody. The cap full already when Remix is pressed: said at once, no form to type into."""
    h = harness
    await h.start(worker=False)
    fd = h.fd
    await h.queue.set_setting(f"bot.max_queued_per_user:{fd.guild_id}", 1)
    msg, parent_id = await finished_job(h, "a red house")

    form = await _remix_form(h, msg, parent_id)
    text = refusal(await _submitted(h, form, TYPED))
    assert text.startswith("The prompt cannot be used: the weight of") and text.endswith(TYPED_BLOCK), text
    assert text.count("```") == 2

    form = await _remix_form(h, msg, parent_id)
    typed = "a {red, blue} ```boat``` with `oars` @everyone | stormy:500"
    text = refusal(await _submitted(h, form, typed))
    assert text.startswith(REMIX_NO_SETS) and text.endswith(TYPED_BLOCK.replace("a ˋ", "a {red, blue} ˋ")), text

    assert "Added" in await ephemeral_answer(h, "queue-admin ban-word add", {"entry": "oars"}, user=fd.admin_user)
    form = await _remix_form(h, msg, parent_id)
    text = refusal(await _submitted(h, form, TYPED.replace(":500", ":0.5")))
    assert text.startswith("Your prompt contains `oars`") and text.endswith(TYPED_BLOCK.replace(":500", ":0.5")), text

    # The form opened with room in the cap; a job queued meanwhile fills it: the submit is refused.
    form = await _remix_form(h, msg, parent_id)
    await h.reply_of(await h.imagine("a waiting job"))
    text = refusal(await _submitted(h, form, TYPED.replace(":500", ":0.5").replace("oars", "a sail")))
    assert text.startswith(limit_text(1, 1)), text
    assert text.endswith(TYPED_BLOCK.replace(":500", ":0.5").replace("oars", "a sail")), text
    # Full already when Remix is pressed: said at once (the same words), no form.
    click = await fd.click_button(msg, f"imagine:remix:{parent_id}")
    await fd.wait_for_response(click)
    assert refusal(click) == limit_text(1, 1)
    assert await h.queue.count_queued() == 1

    # Room for one more; another command of the user's is queued just before this one's write
    # (after the checks and the public "thinking…"): the store refuses it, the answer quotes it too.
    await h.queue.set_setting(f"bot.max_queued_per_user:{fd.guild_id}", 2)
    form = await _remix_form(h, msg, parent_id)
    real_submit = h.queue.submit

    async def submit_after_another(spec, **kwargs):
        await real_submit(JobSpec(prompt="a racing job", user_id=spec.user_id, channel_id=spec.channel_id,
                                  guild_id=spec.guild_id, iterations=4, grid=8), **kwargs)
        return await real_submit(spec, **kwargs)

    monkeypatch.setattr(h.queue, "submit", submit_after_another)
    submit = await _submitted(h, form, TYPED.replace(":500", ":0.5").replace("oars", "a sail"))
    assert submit.response_type == 5   # the public "thinking…", deleted again
    await fd.wait_for(lambda: submit.followups, 10, "the private answer")
    (answer,) = submit.followups
    assert answer.ephemeral and submit.original_message.deleted
    assert answer.content == limit_text(2, 2) + TYPED_BLOCK.replace(":500", ":0.5").replace("oars", "a sail")
    assert await h.queue.count_queued() == 2
    assert all("@everyone" not in m.content for m in fd.channel_messages())
    fd.assert_clean()


async def test_a_long_refused_remix_prompt_is_quoted_back_within_discords_limit(harness):
    """A form's prompt too long to quote whole with its refusal (a configured limit near Discord's
    4000): its start, said to be one, and the answer within Discord's 2000 characters."""
    h = harness
    await h.start(worker=False)
    fd = h.fd
    h.config.imagine.max_prompt_chars = 3000
    msg, parent_id = await finished_job(h, "a red house")
    form = await _remix_form(h, msg, parent_id)
    typed = "a boat " * 400 + "{a, b}"
    text = refusal(await _submitted(h, form, typed))
    assert len(text) <= 2000 and text.startswith(REMIX_NO_SETS), len(text)
    assert "\nThe start of your prompt (too long to show whole here):\n```\na boat a boat" in text
    assert text.endswith("…\n```"), text[-40:]


async def test_the_job_id_is_its_own_code_span_and_remix_takes_it_from_a_pasted_line(harness):
    """Under each result the job id is a code span of its own (copied alone, it is what `/remix
    job:` takes), and `/remix job:` also finds the one job id in a pasted line: the settings and
    the id together, or the whole line. A line with no id or two is no job (quoted)."""
    h = harness
    await h.start(worker=False)
    fd = h.fd
    msg, parent_id = await finished_job(h, "a red house")
    (line,) = [x for x in fd.messages[msg.id].content.split("\n") if x.startswith("`seed")]
    seed = (await h.queue.get(parent_id)).spec.seed
    assert line == f"`seed {seed} · 4 iterations · 64×64` · job `{parent_id}` · <@{fd.member_user['id']}>", line
    settings = f"seed {seed} · 4 iterations · 64×64"
    remixes = []
    for pasted in (f"{settings} · job {parent_id}", line, f" `{parent_id}` "):
        inter = await command(h, "remix", {"job": pasted, "prompt": "a blue boat"})
        assert inter.response_type == 5, inter.response   # deferred: the remix's public reply
        remix_msg = await h.reply_of(inter)
        remix = await h.queue.get(h.job_id(remix_msg))
        assert (remix.spec.parent_job_id, remix.spec.parent_kind) == (parent_id, "remix"), pasted
        remixes.append(remix.id)
    # A remix's whole reply copied (mobile's Copy Text): its lineage line names the parent's id
    # too, and the reply's own id (after `job`) is the one taken.
    await claim_jobs(h.queue, remixes)
    await h.queue.put_artifact(remix.id, "state.pt", b"a final state")
    await finish_jobs(h.queue, remixes)
    await h.wait_delivered(remix.id)
    await fd.wait_for(lambda: f"imagine:remix:{remix.id}" in fd.messages[remix_msg.id].custom_ids, 5, "the buttons")
    whole = fd.messages[remix_msg.id].content
    assert f"`{parent_id}`" in whole, whole
    inter = await command(h, "remix", {"job": whole, "prompt": "a green boat"})
    again = await h.queue.get(h.job_id(await h.reply_of(inter)))
    assert (again.spec.parent_job_id, again.spec.parent_kind) == (remix.id, "remix"), whole
    # A /history entry copied: its own id on its first line, its lineage line's below it.
    lines = (await ephemeral_answer(h, "history", {})).split("\n")
    at = next(i for i, x in enumerate(lines) if x.startswith("• ") and f"`{remix.id}`" in x)
    entry = "\n".join(lines[at:at + 2])
    assert f"`{parent_id}`" in entry, entry
    inter = await command(h, "remix", {"job": entry, "prompt": "a grey boat"})
    again = await h.queue.get(h.job_id(await h.reply_of(inter)))
    assert (again.spec.parent_job_id, again.spec.parent_kind) == (remix.id, "remix"), entry
    for pasted in (settings, f"{parent_id} and {'0' * 12}"):
        text = refusal(await command(h, "remix", {"job": pasted, "prompt": "a blue boat"}))
        assert text.startswith(f"There is no job {render.quote(pasted, 64)} you can see"), text
    fd.assert_clean()

# --- image prompts and init images ---------------------------------------------------------------

async def test_image_prompt_and_init_image_are_downloaded_stored_and_used(harness, caplog):
    h = harness
    caplog.set_level(logging.INFO, logger="engine.worker")
    await h.start()
    fd = h.fd
    target = fd.host_attachment("target.png", noise_png(seed=1))
    start = fd.host_attachment("start.png", noise_png(seed=2))
    msg = await h.reply_of(await h.imagine("a cat", image=target, image_weight=0.5, init_image=start))
    job_id = h.job_id(msg)
    record = await h.wait_delivered(job_id)
    assert record.state == JobState.DONE, record.error

    # Both attachments were fetched from the fake's CDN, by the bot.
    fetched = {r.path for r in fd.cdn_requests if r.status == 200}
    assert {f"/attachments/{fd.channel_id}/{a['id']}/{a['filename']}" for a in (target, start)} <= fetched
    # They went to the worker as artifacts (re-encoded PNGs), named in the spec.
    extra = record.spec.extra
    assert extra["image_prompt"]["weight"] == 0.5
    stored = {}
    for key in ("image_prompt", "init_image"):
        upload_id, name = extra[key]["artifact"]
        assert upload_id.startswith("upload_") and name == "image.png"
        stored[key] = await h.queue.get_artifact(upload_id, name)
        assert stored[key].startswith(b"\x89PNG")
    # The worker used them: two CLIP targets (the text and the image), and frame 0 is the init image's
    # dVAE reconstruction.
    assert f"job {job_id}: 2 CLIP targets (1 from an image prompt), starts from an init image" in caplog.text
    from engine.generate import frame_image, to_uint8
    from engine.image_prompts import init_logits_from_image

    init = Image.open(io.BytesIO(stored["init_image"])).convert("RGB")
    expected = to_uint8(frame_image(h.models, init_logits_from_image(h.models, init, record.spec.grid))[0])
    frame0 = np.asarray(Image.open(io.BytesIO(await first_frame(h.queue, job_id))).convert("RGB"))
    assert np.abs(frame0.astype(int) - expected.astype(int)).max() <= 1
    assert "image prompt ×0.5 · init image" in fd.messages[msg.id].content
    fd.assert_clean()


async def test_a_negative_only_prompt_with_a_positive_image_prompt_is_queued_and_runs(harness, caplog):
    """`blurry:-1` alone pulls toward nothing and is refused; with an `image` of positive weight
    the picture is the target (toward it, away from "blurry"), so /imagine queues it, as the
    engine takes it, and the worker runs it to the end."""
    h = harness
    caplog.set_level(logging.INFO, logger="engine.worker")
    await h.start()
    fd = h.fd
    target = fd.host_attachment("target.png", noise_png(seed=1))
    msg = await h.reply_of(await h.imagine("blurry:-1", image=target))
    job_id = h.job_id(msg)
    record = await h.wait_delivered(job_id)
    assert record.state == JobState.DONE, record.error
    assert record.spec.prompt == "blurry:-1" and record.spec.extra["image_prompt"]["weight"] == 1.0
    assert f"job {job_id}: 2 CLIP targets (1 from an image prompt)" in caplog.text
    (final,) = h.final_edits(msg.id)
    assert "image prompt ×1" in final.json["content"]
    fd.assert_clean()


LONG_NEGATIVE = "fog " * 78 + "smoke haze"   # 80 CLIP tokens: the last 5 are not read


async def test_a_negative_only_prompt_with_an_image_gets_its_clip_notes_alone_and_in_a_set(harness):
    """A negative-only prompt with a positive image prompt is checked like any prompt: the words
    CLIP ignores are named for one job, and for each combination of a set (each combination
    checked with the image's weight: the set is queued)."""
    h = harness
    await h.start(worker=False)
    fd = h.fd
    target = fd.host_attachment("target.png", noise_png(seed=1))
    msg = await h.reply_of(await h.imagine(f"{LONG_NEGATIVE}:-1", image=target))
    (line,) = [x for x in msg.content.split("\n") if "CLIP" in x]
    assert "it ignores 'fog fog fog smoke haze' (5 tokens)" in line, line

    inter = await h.imagine(f"{{blurry, {LONG_NEGATIVE}}}:-1", image=target)
    await h.reply_of(inter)
    await fd.wait_for(lambda: len(fd.channel_messages()) == 3, 10, "the set's two replies")
    jobs = {r.spec.prompt: r for r in await h.queue.history(fd.channel_id) if "set" in r.spec.extra}
    assert sorted(jobs) == sorted(["blurry:-1", f"{LONG_NEGATIVE}:-1"]), list(jobs)
    assert all(r.spec.extra["image_prompt"]["weight"] == 1.0 for r in jobs.values())
    assert "clip_notes" not in jobs["blurry:-1"].spec.extra
    (note,) = jobs[f"{LONG_NEGATIVE}:-1"].spec.extra["clip_notes"]
    assert "it ignores 'fog fog fog smoke haze' (5 tokens)" in note, note
    fd.assert_clean()


async def test_bad_attachments_are_refused_and_an_animation_is_converted_with_a_note(harness):
    h = harness
    await h.start()
    fd = h.fd
    await h.queue.set_setting("paused", True)   # nothing needs to run here
    bomb = png(Image.new("1", (20000, 20000)))   # ~50 KB on disk, 400 megapixels decoded
    big = fd.host_attachment("big.png", b"\x89PNG\r\n\x1a\n" + b"\0" * (12 * 2**20))
    cases = [
        ({"image": fd.host_attachment("notes.txt", b"not a picture")}, "`image`: `notes.txt` is not an image"),
        ({"init_image": fd.host_attachment("fake.png", b"%PDF-1.4 not a picture")}, "`init_image`: the file is not an image"),
        ({"image": big}, "`image`: the file is 12.0 MiB; the limit is 8.0 MiB"),
        ({"init_image": fd.host_attachment("bomb.png", bomb)}, "20000x20000"),
        ({"image_weight": 2.0}, "`image_weight` goes with `image`"),
    ]
    for options, expected in cases:
        text = refusal(await command(h, "imagine", {"prompt": "a cat", **options}))
        assert expected in text, text
    assert not [r for r in fd.cdn_requests if r.path.endswith(("/big.png", "/bomb.png", "/notes.txt"))]   # refused unread
    await nothing_queued(h)

    frames = [Image.new("RGB", (16, 16), c) for c in ("red", "blue", "green")]
    gif = png(frames[0], format="GIF", save_all=True, append_images=frames[1:])
    msg = await h.reply_of(await h.imagine("a cat", init_image=fd.host_attachment("moving.gif", gif)))
    assert "-# `init_image`: the image is animated (3 frames): its first frame was used" in msg.content
    record = await h.queue.get(h.job_id(msg))
    assert record.state == JobState.QUEUED and "init_image" in record.spec.extra
    fd.assert_clean()


# --- presets and /help -----------------------------------------------------------------------------

async def test_quality_presets_set_size_iterations_and_cutouts_and_options_override_them(harness):
    h = harness
    await h.start()
    await h.queue.set_setting("paused", True)   # the specs are what matters here
    # test_config's presets: draft 64/2/2, normal 64/4/3, best 128/6/4; sizes 64 -> grid 8, 128 -> 16.
    cases = [({"quality": "draft"}, (8, 2, 2)), ({"quality": "normal"}, (8, 4, 3)), ({"quality": "best"}, (16, 6, 4)),
             ({"quality": "best", "iterations": 3, "size": 64}, (8, 3, 4))]
    for options, (grid, iterations, cutn) in cases:
        msg = await h.reply_of(await h.imagine("a lighthouse", **options))
        spec = (await h.queue.get(h.job_id(msg))).spec
        assert (spec.grid, spec.iterations, spec.cutn, spec.preset) == (grid, iterations, cutn, options["quality"])
        assert f"quality {options['quality']}" in msg.content and f"{iterations} iterations" in msg.content
    text = refusal(await command(h, "imagine", {"prompt": "x", "quality": "ultra"}))
    assert "`quality` must be one of draft, normal, best" in text
    h.fd.assert_clean()


async def test_help_is_short_and_private(harness):
    h = harness
    await h.start(worker=False)
    text = refusal(await command(h, "help"))
    assert len(text) < 2000
    for fragment in ("a house | by Escher:0.5 | blurry:-1", "Remix", "Reroll", "Continue", "`draft` 64px, 2 iterations",
                     "`best` 128px, 6 iterations", "up to 500 characters", "1-40 iterations", "8.0 MiB"):
        assert fragment in text, (fragment, text)
    h.fd.assert_clean()


async def test_help_states_a_small_image_limit_as_it_is():
    """`max_image_bytes = 500000` read "images up to 0 MiB" (rounded to a whole MiB)."""
    from bot.config import Config
    from bot.help import help_text

    config = Config()
    config.imagine.max_image_bytes = 500_000
    assert "images up to 0.5 MiB" in help_text(config, 3)


async def test_help_explains_permutation_prompts_with_the_configured_cap(harness):
    h = harness
    h.config.imagine.max_permutations = 7   # not the default 9: the text reads the live config
    h.config.queue.max_queued_per_user = 8  # more than 7: the permutation cap is the smaller one
    await h.start(worker=False)
    text = refusal(await command(h, "help"))
    assert len(text) < 2000
    for fragment in ("`a {red, blue} house by {Escher, Magritte}`", "one job per combination",
                     "at most 7 per prompt", "contact sheet", "`{cat|dog}`", "a `{…}` prompt up to 2000",
                     "`\\{` and `\\}` are literal braces"):
        assert fragment in text, (fragment, text)
    h.fd.assert_clean()


def _help_permutations(text: str) -> tuple[str, int, int]:
    """/help's permutation paragraph: its example prompt, how many jobs it says that makes, and
    the most it says one prompt may make."""
    found = re.search(r"\*\*Permutations\*\*: `([^`]+)` makes one job per combination \((\d+) here.*"
                      r"at most (\d+) per prompt", text)
    assert found, text
    return found.group(1), int(found.group(2)), int(found.group(3))


async def test_help_offers_what_the_default_limits_allow_and_says_the_smaller_limit(harness):
    """With the built-in defaults of `max_permutations` and `max_queued_per_user`, /help's own
    example is queued, and so is a set as large as the most /help says one prompt may make (it
    counts against the cap of waiting jobs). Where a server's cap of waiting jobs is the smaller
    limit, /help says that number, its example fits it, and a larger set is refused as one that
    can never fit (not "wait for some to start")."""
    from bot.config import Config

    h = harness
    defaults = Config()
    h.config.queue.max_queued_per_user = defaults.queue.max_queued_per_user
    h.config.imagine.max_permutations = defaults.imagine.max_permutations
    await h.start(worker=False)
    fd = h.fd
    example, count, most = _help_permutations(refusal(await command(h, "help")))
    assert most == defaults.imagine.max_permutations   # the permutation cap is the one that binds
    inter = await h.imagine(example)
    await h.reply_of(inter)
    await fd.wait_for(lambda: len(inter.followups) == count - 1, 10, "the example's replies")
    assert await h.queue.count_queued() == count
    carol = fd.add_user("carol")   # nothing waiting: room for the largest set /help offers
    options = ", ".join(f"colour {i}" for i in range(most))
    inter = await fd.send_slash_command("imagine", {"prompt": f"a {{{options}}} house"}, user=carol)
    await fd.wait_for_response(inter)
    await h.reply_of(inter)
    await fd.wait_for(lambda: len(inter.followups) == most - 1, 10, "the largest set's replies")
    assert await h.queue.count_queued() == count + most

    # A server whose admins lowered the cap of waiting jobs to 3: /help says 3, with an example that fits.
    assert "3 jobs" in await ephemeral_answer(h, "queue-admin limit", {"n": 3}, user=fd.admin_user)
    dave = fd.add_user("dave")
    example, count, most = _help_permutations(refusal(await command(h, "help", user=dave)))
    assert most == 3 and count <= 3, (example, count)
    text = refusal(await command(h, "imagine", {"prompt": "a {red, blue} house by {Escher, Magritte}"}, user=dave))
    assert "makes 4 images" in text and "at most 3 waiting at once" in text and "can never be queued whole" in text
    assert "wait for some" not in text
    inter = await fd.send_slash_command("imagine", {"prompt": example}, user=dave)
    await fd.wait_for_response(inter)
    await h.reply_of(inter)
    fd.assert_clean()


async def test_a_slow_download_is_answered_in_time_and_still_refused_privately(harness, monkeypatch):
    """Past the answer window the bot defers (publicly: the job's reply); a refusal then deletes that
    reply and answers privately, and a good picture goes on to be queued."""
    import asyncio

    from bot import attachments, imagine

    original = attachments.download

    async def slow(*args, **kwargs):
        await asyncio.sleep(0.3)
        return await original(*args, **kwargs)

    monkeypatch.setattr(imagine, "ATTACHMENT_WINDOW", 0.05)
    monkeypatch.setattr(attachments, "download", slow)
    h = harness
    await h.start()
    fd = h.fd
    await h.queue.set_setting("paused", True)
    inter = await h.imagine("a cat", image=fd.host_attachment("fake.png", b"garbage, not a picture"))
    assert inter.response_type == 5                           # deferred in time
    await fd.wait_for(lambda: inter.followups, 5, "the refusal")
    assert inter.original_message.deleted                     # the public "thinking" reply is gone
    refusal_msg = inter.followups[0]
    assert refusal_msg.ephemeral and "`image`: the file is not an image" in refusal_msg.content
    assert await h.queue.count_queued() == 0

    msg = await h.reply_of(await h.imagine("a cat", image=fd.host_attachment("ok.png", noise_png())))
    record = await h.queue.get(h.job_id(msg))
    assert record.state == JobState.QUEUED and "image_prompt" in record.spec.extra
    fd.assert_clean()


async def test_an_init_image_waits_in_line_while_no_worker_has_the_encoder(harness):
    """A worker without the dVAE encoder leaves init-image jobs in line (for a worker that has one,
    as a job waits for a worker of its grid: test_worker) and takes the next job: the picture's job
    stays queued, not started, not failed, while a plain job after it runs to the end. (Queued while
    no worker was live, as during a restart: once only workers without the encoder are live, the bot
    refuses such a command instead, test_bot_uploads.)"""
    from dataclasses import replace

    h = harness
    h.models = replace(h.models, encoder=None)
    await h.start(worker=False)
    msg = await h.reply_of(await h.imagine("a cat", init_image=h.fd.host_attachment("start.png", noise_png())))
    waiting = h.job_id(msg)
    await h.stop()
    await h.start()   # now with its worker, which has no encoder
    plain = await h.wait_delivered(h.job_id(await h.reply_of(await h.imagine("a dog"))))
    assert plain.state == JobState.DONE, plain.error
    record = await h.queue.get(waiting)
    assert (record.state, record.attempts, record.error) == (JobState.QUEUED, 0, None), record
    assert "Failed" not in h.fd.messages[msg.id].content
    h.fd.assert_clean()
