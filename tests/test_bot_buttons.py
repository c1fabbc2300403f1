"""The buttons: Reroll, Continue, Remix (its modal) and Cancel, also after a restart (DynamicItem,
a listener for the modal's submit, state from the store)."""

from __future__ import annotations

import asyncio
import io
import logging

import numpy as np
import pytest
from PIL import Image

from engine.jobs import JobState
from tests.fakediscord import Permission
from tests.test_bot_support import EPHEMERAL, harness, private_answer  # noqa: F401 - the fixture

pytestmark = pytest.mark.asyncio


async def _finished_job(h, prompt="a lighthouse in fog", **options):
    inter = await h.imagine(prompt, **options)
    msg = await h.reply_of(inter)
    job_id = h.job_id(msg)
    record = await h.wait_delivered(job_id)
    assert record.state == JobState.DONE
    await h.fd.wait_for(lambda: f"imagine:reroll:{job_id}" in h.fd.messages[msg.id].custom_ids, 10, "result buttons")
    return msg, job_id


async def _button_job(h, click) -> tuple:
    """The job a Reroll / Continue click made: a new deferred reply, edited to the queued state."""
    await h.fd.wait_for_response(click)
    assert click.response_type == 5   # deferred: a new public message in the channel
    new_msg = await h.reply_of(click)
    return new_msg, h.job_id(new_msg)


async def test_reroll_same_prompt_new_seed_and_continue_from_the_end(harness):
    h = harness
    await h.start()
    msg, job_id = await _finished_job(h, seed=11, iterations=4)
    parent = await h.queue.get(job_id)

    click = await h.fd.click_button(msg, f"imagine:reroll:{job_id}", user=h.fd.admin_user)
    new_msg, reroll_id = await _button_job(h, click)
    assert new_msg.id != msg.id and reroll_id != job_id
    reroll = await h.wait_delivered(reroll_id)
    assert reroll.state == JobState.DONE
    assert reroll.spec.prompt == parent.spec.prompt
    assert reroll.spec.iterations == parent.spec.iterations and reroll.spec.grid == parent.spec.grid
    assert reroll.spec.seed != parent.spec.seed
    assert reroll.spec.user_id == int(h.fd.admin_user["id"])   # the clicker owns the new job
    assert reroll.spec.parent_job_id is None

    click = await h.fd.click_button(msg, f"imagine:continue:{job_id}")
    cont_msg, cont_id = await _button_job(h, click)
    cont = await h.wait_delivered(cont_id)
    assert cont.state == JobState.DONE
    assert (cont.spec.parent_job_id, cont.spec.parent_kind) == (job_id, "continue")
    assert cont.spec.prompt == parent.spec.prompt and cont.spec.seed == parent.spec.seed
    assert f"→ continues `{job_id}`" in h.fd.messages[cont_msg.id].content
    for jid in (job_id, reroll_id, cont_id):
        assert len(h.posts_of_job(jid)) == 1
    h.fd.assert_clean()


async def test_cancel_button_owner_or_admin_only(harness):
    h = harness
    await h.start()
    await h.queue.set_setting("paused", True)   # keep the jobs in line
    inter = await h.imagine("a cat on a piano")
    msg = await h.reply_of(inter)
    job_id = h.job_id(msg)
    await h.fd.wait_for(lambda: "paused" in h.fd.messages[msg.id].content, 5, "the paused note")

    # Someone else (not an admin) is refused, ephemerally, and nothing changes.
    other = h.fd.add_user("carol")
    click = await h.fd.click_button(msg, f"imagine:cancel:{job_id}", user=other)
    await h.fd.wait_for_response(click)
    assert click.response_type == 4 and click.response["data"]["flags"] & EPHEMERAL
    assert "Only the person" in click.response["data"]["content"]
    assert (await h.queue.get(job_id)).state == JobState.QUEUED

    # The owner cancels: a private "thinking…" at once (the store's write may be slow), then the
    # confirmation in its place; the reply says so, buttons change to Reroll.
    click = await h.fd.click_button(msg, f"imagine:cancel:{job_id}")
    assert await private_answer(h, click) == f"Cancelled job `{job_id}`."
    assert click.response_type == 5
    record = await h.wait_delivered(job_id)
    assert record.state == JobState.CANCELLED
    await h.fd.wait_for(lambda: "Cancelled." in h.fd.messages[msg.id].content, 5, "the cancelled reply")
    assert h.fd.messages[msg.id].custom_ids == [f"imagine:reroll:{job_id}"]

    # An admin cancels a running job: the worker stops it.
    await h.queue.set_setting("paused", False)
    h.config.imagine.max_iterations = 5000
    inter = await h.imagine("a very long job", iterations=5000)
    msg = await h.reply_of(inter)
    job_id = h.job_id(msg)
    await h.fd.wait_for(lambda: "Iteration" in h.fd.messages[msg.id].content, 20, "a frame")
    click = await h.fd.click_button(msg, f"imagine:cancel:{job_id}", user=h.fd.admin_user)
    assert await private_answer(h, click) == f"Stopping job `{job_id}`…"
    record = await h.wait_delivered(job_id)
    assert record.state == JobState.CANCELLED
    assert len(h.posts_of_job(job_id)) == 1
    h.fd.assert_clean()


async def test_buttons_work_after_a_restart(harness):
    h = harness
    await h.start()
    msg, job_id = await _finished_job(h, seed=3)
    await h.stop()
    await h.start()   # a new Bot, a new queue connection: nothing in memory about the old job

    click = await h.fd.click_button(msg, f"imagine:continue:{job_id}")
    cont_msg, cont_id = await _button_job(h, click)
    cont = await h.wait_delivered(cont_id)
    assert cont.state == JobState.DONE and cont.spec.parent_job_id == job_id

    # Continue on a job that did not finish is refused with a reason.
    await h.queue.set_setting("paused", True)
    inter = await h.imagine("never finished")
    queued_msg = await h.reply_of(inter)
    queued_id = h.job_id(queued_msg)
    await h.queue.cancel(queued_id)
    await h.wait_delivered(queued_id)
    await h.fd.wait_for(lambda: f"imagine:reroll:{queued_id}" in h.fd.messages[queued_msg.id].custom_ids, 5)
    assert f"imagine:continue:{queued_id}" not in h.fd.messages[queued_msg.id].custom_ids
    h.fd.assert_clean()


# --- Remix: the modal's submit is answered from the store, once, also after a restart --------------

def _callbacks(h, inter) -> list:
    """Every answer the bot tried to give `inter` (successful or not)."""
    return [r for r in h.fd.requests
            if r.method == "POST" and r.path == f"/interactions/{inter.id}/{inter.token}/callback"]


async def _open_remix(h, msg, job_id, user=None):
    click = await h.fd.click_button(msg, f"imagine:remix:{job_id}", user=user)
    await h.fd.wait_for_response(click)
    assert click.response_type == 9   # the modal
    assert click.response["data"]["custom_id"] == f"imagine:remix-modal:{job_id}"
    return click


async def _submit_remix(h, click, prompt):
    (text_input,) = [c for row in click.response["data"]["components"] for c in row["components"]]
    submit = await h.fd.submit_modal(click, {text_input["custom_id"]: prompt})
    await h.fd.wait_for_response(submit)
    return submit


def _refused(submit) -> str:
    assert submit.response_type == 4 and submit.response["data"]["flags"] & EPHEMERAL, submit.response
    return submit.response["data"]["content"]


def _no_double_answers(h, caplog, submits) -> None:
    for submit in submits:
        assert len(_callbacks(h, submit)) == 1, _callbacks(h, submit)
    assert not [r for r in h.fd.requests if r.status == 400 and "40060" in str(r.response)]
    logged = "\n".join(r.getMessage() + (r.exc_text or "") for r in caplog.records if r.levelno >= logging.WARNING)
    assert "already been acknowledged" not in logged and "Ignoring exception" not in logged, logged
    assert "remix modal" not in logged, logged


async def test_remix_modal_submit_works_after_a_restart(harness, caplog):
    h = harness
    fd = h.fd
    await h.start()
    msg, job_id = await _finished_job(h, prompt="a red house", seed=5)
    carol = fd.add_user("carol")
    # Three people open the Remix modal; then the bot restarts while the modals are open.
    clicks = [await _open_remix(h, msg, job_id, user) for user in (carol, fd.admin_user, None)]
    assert clicks[0].response["data"]["components"][0]["components"][0]["value"] == "a red house"
    await h.stop()
    await h.start()   # a new Bot: discord.py's modal store is empty
    await h.queue.set_setting(f"banned:{fd.guild_id}", ["cursed"])

    submit = await _submit_remix(h, clicks[0], "a blue boat | stormy:0.5")
    assert submit.response_type == 5   # deferred: the remix's public reply
    remix_id = h.job_id(await h.reply_of(submit))
    remix = await h.wait_delivered(remix_id)
    assert remix.state == JobState.DONE, remix.error
    spec = remix.spec
    assert (spec.parent_job_id, spec.parent_kind, spec.prompt) == (job_id, "remix", "a blue boat | stormy:0.5")
    assert spec.user_id == int(carol["id"])

    # The submitted prompt goes through the same checks as /remix: weights, refused words.
    before = await h.queue.history(fd.channel_id)
    weights = await _submit_remix(h, clicks[1], "blurry:-1")
    assert "positive weight" in _refused(weights)
    banned = await _submit_remix(h, clicks[2], "a cursed boat")
    assert "refused" in _refused(banned)
    assert await h.queue.history(fd.channel_id) == before and await h.queue.count_queued() == 0

    await asyncio.sleep(0.3)   # room for a second answer, if anything were to give one
    _no_double_answers(h, caplog, [submit, weights, banned])
    fd.assert_clean()


async def test_remix_modal_submit_without_a_restart_is_answered_once(harness, caplog):
    h = harness
    fd = h.fd
    await h.start()
    msg, job_id = await _finished_job(h, prompt="a red house", seed=6)
    carol = fd.add_user("carol")
    # Two people have the same job's modal open (the same custom id): each submit is answered.
    first = await _open_remix(h, msg, job_id, carol)
    second = await _open_remix(h, msg, job_id, fd.admin_user)
    submits = []
    for click, user, prompt in [(first, carol, "a green tree"), (second, fd.admin_user, "a yellow kite")]:
        submit = await _submit_remix(h, click, prompt)
        assert submit.response_type == 5
        submits.append(submit)
        remix_id = h.job_id(await h.reply_of(submit))
        remix = await h.wait_delivered(remix_id)
        assert remix.state == JobState.DONE, remix.error
        assert (remix.spec.parent_job_id, remix.spec.prompt) == (job_id, prompt)
        assert remix.spec.user_id == int(user["id"])
        assert len(h.posts_of_job(remix_id)) == 1
    await asyncio.sleep(0.3)
    _no_double_answers(h, caplog, submits)
    fd.assert_clean()


async def test_buttons_and_the_remix_form_need_use_application_commands(harness):
    """Discord checks Use Application Commands for slash commands only, not for a button's click
    or a modal's submit. Carol is denied it in this channel (after she opened a Remix form and
    queued a job of her own): her Reroll, Continue and Remix clicks and her form's submit are
    refused privately, nothing queued. Her own job's Cancel still works: stopping it is not using
    the bot."""
    h = harness
    fd = h.fd
    await h.start()
    msg, job_id = await _finished_job(h, prompt="a red house", seed=7)
    carol = fd.add_user("carol")
    form = await _open_remix(h, msg, job_id, carol)
    await h.queue.set_setting("paused", True)   # Carol's own job stays in line
    own_msg = await h.reply_of(await h.imagine("a green field", user=carol))
    own_id = h.job_id(own_msg)
    fd.channels[fd.channel_id]["permission_overwrites"] = [
        {"id": str(carol["id"]), "type": 1, "allow": "0", "deny": str(Permission.USE_APPLICATION_COMMANDS)}]
    before = [r.id for r in await h.queue.history(fd.channel_id, limit=50)]

    for action in ("reroll", "continue", "remix"):
        click = await fd.click_button(msg, f"imagine:{action}:{job_id}", user=carol)
        await fd.wait_for_response(click)
        assert "Use Application Commands" in _refused(click), (action, click.response)
    submit = await _submit_remix(h, form, "a blue boat")
    text = _refused(submit)
    assert "Use Application Commands" in text and "a blue boat" in text   # the typed prompt, to copy
    assert [r.id for r in await h.queue.history(fd.channel_id, limit=50)] == before
    assert await h.queue.count_queued() == 1   # Carol's own job alone

    click = await fd.click_button(own_msg, f"imagine:cancel:{own_id}", user=carol)
    assert await private_answer(h, click) == f"Cancelled job `{own_id}`."
    assert (await h.wait_delivered(own_id)).state == JobState.CANCELLED
    fd.assert_clean()


# --- Reroll and Continue keep the job's pictures; Continue needs the final state ------------------

def _frame0(frame_png: bytes):
    return np.asarray(Image.open(io.BytesIO(frame_png)).convert("RGB")).astype(int)


async def test_reroll_and_continue_keep_the_image_prompt_and_reroll_the_init_image(harness, caplog):
    """Continue aims at the same image prompt (the init image only set the parent's start); Reroll
    is the same job with a new seed: the same image prompt and the same init image, so its frame 0
    is the init image's dVAE reconstruction again. Both name the same uploads, so pruning the
    parent (and the continue) keeps them while the reroll waits in line."""
    from engine.generate import frame_image, to_uint8
    from engine.image_prompts import init_logits_from_image
    from engine.jobs import upload_refs
    from tests.test_bot_brainstorm import first_frame, noise_png

    h = harness
    caplog.set_level(logging.INFO, logger="engine.worker")
    await h.start()
    fd = h.fd
    target = fd.host_attachment("target.png", noise_png(seed=1))
    start = fd.host_attachment("start.png", noise_png(seed=2))
    msg, job_id = await _finished_job(h, "a cat", image=target, image_weight=0.5, init_image=start, iterations=4)
    parent = await h.queue.get(job_id)
    pictures = {k: parent.spec.extra[k] for k in ("image_prompt", "init_image")}
    assert pictures["image_prompt"]["weight"] == 0.5
    assert f"job {job_id}: 2 CLIP targets (1 from an image prompt), starts from an init image" in caplog.text

    # Continue: from the parent's final state, toward the same text and the same image.
    click = await h.fd.click_button(msg, f"imagine:continue:{job_id}")
    cont_msg, cont_id = await _button_job(h, click)
    cont = await h.wait_delivered(cont_id)
    assert cont.state == JobState.DONE, cont.error
    assert (cont.spec.parent_job_id, cont.spec.parent_kind) == (job_id, "continue")
    assert cont.spec.extra["image_prompt"] == pictures["image_prompt"] and "init_image" not in cont.spec.extra
    (used,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"job {cont_id}: ")
               and "CLIP targets" in r.getMessage()]
    assert used == f"job {cont_id}: 2 CLIP targets (1 from an image prompt)"   # no init image: the state
    assert "image prompt ×0.5" in fd.messages[cont_msg.id].content

    # Reroll, held in line while the parent and the continue are pruned: the uploads stay, named by it.
    await h.queue.set_setting("paused", True)
    click = await h.fd.click_button(msg, f"imagine:reroll:{job_id}")
    reroll_msg, reroll_id = await _button_job(h, click)
    queued = await h.queue.get(reroll_id)
    assert queued.state == JobState.QUEUED
    assert {k: queued.spec.extra.get(k) for k in pictures} == pictures
    assert queued.spec.seed != parent.spec.seed and queued.spec.parent_job_id is None
    assert upload_refs(queued.spec) == upload_refs(parent.spec) and len(upload_refs(parent.spec)) == 2
    assert await h.queue.prune(0) == 2   # the parent and the continue: delivered
    assert await h.queue.get(job_id) is None
    for ref in pictures.values():
        assert await h.queue.has_artifact(*ref["artifact"])
    await h.queue.set_setting("paused", False)
    h.bot.progress.line_changed()
    reroll = await h.wait_delivered(reroll_id)
    assert reroll.state == JobState.DONE, reroll.error
    assert f"job {reroll_id}: 2 CLIP targets (1 from an image prompt), starts from an init image" in caplog.text
    init = Image.open(io.BytesIO(await h.queue.get_artifact(*pictures["init_image"]["artifact"]))).convert("RGB")
    expected = to_uint8(frame_image(h.models, init_logits_from_image(h.models, init, reroll.spec.grid))[0])
    assert np.abs(_frame0(await first_frame(h.queue, reroll_id)) - expected.astype(int)).max() <= 1
    assert "image prompt ×0.5 · init image" in fd.messages[reroll_msg.id].content
    assert len(h.posts_of_job(reroll_id)) == 1
    fd.assert_clean()


async def test_reroll_of_a_remix_starts_from_the_same_picture_with_a_new_seed(harness):
    """A remix's start is another job's final picture: its Reroll is a remix of that same job
    (same prompt, new seed), so both begin on the same frame 0, the remixed job's final."""
    from tests.test_bot_brainstorm import first_frame

    h = harness
    await h.start()
    fd = h.fd
    _, job_id = await _finished_job(h, prompt="a red house", seed=5)
    inter = await fd.send_slash_command("remix", {"job": job_id, "prompt": "a blue boat", "iterations": 4})
    await fd.wait_for_response(inter)
    remix_msg = await h.reply_of(inter)
    remix_id = h.job_id(remix_msg)
    remix = await h.wait_delivered(remix_id)
    assert remix.state == JobState.DONE, remix.error
    await fd.wait_for(lambda: f"imagine:reroll:{remix_id}" in fd.messages[remix_msg.id].custom_ids, 10, "buttons")

    click = await fd.click_button(remix_msg, f"imagine:reroll:{remix_id}")
    reroll_msg, reroll_id = await _button_job(h, click)
    reroll = await h.wait_delivered(reroll_id)
    assert reroll.state == JobState.DONE, reroll.error
    spec = reroll.spec
    assert (spec.parent_job_id, spec.parent_kind, spec.prompt) == (job_id, "remix", "a blue boat")
    assert spec.seed != remix.spec.seed and spec.extra["rerolls"] == remix_id
    assert spec.extra["parent"] == remix.spec.extra["parent"]
    assert f"remix of `{job_id}`" in fd.messages[reroll_msg.id].content
    assert (_frame0(await first_frame(h.queue, reroll_id)) == _frame0(await first_frame(h.queue, remix_id))).all()
    fd.assert_clean()


async def test_continue_without_the_final_state_is_refused_privately(harness):
    """A finished job whose state.pt is not in the store (here a stand-in GPU finished it with its
    final picture and video only): Continue says so, privately, and queues nothing; Reroll still works."""
    from tests.test_bot_support import claim_jobs, finish_jobs

    h = harness
    await h.start(worker=False)
    fd = h.fd
    msg = await h.reply_of(await h.imagine("a boat at night"))
    job_id = h.job_id(msg)
    await claim_jobs(h.queue, [job_id])
    await finish_jobs(h.queue, [job_id])
    await h.wait_delivered(job_id)
    await fd.wait_for(lambda: f"imagine:continue:{job_id}" in fd.messages[msg.id].custom_ids, 10, "the buttons")
    assert not await h.queue.has_artifact(job_id, "state.pt")
    before = [r.id for r in await h.queue.history(fd.channel_id)]

    click = await fd.click_button(msg, f"imagine:continue:{job_id}")
    await fd.wait_for_response(click)
    assert click.response_type == 4 and click.response["data"]["flags"] & EPHEMERAL
    assert f"The final state of job `{job_id}` is gone" in click.response["data"]["content"]
    assert await h.queue.count_queued() == 0
    assert [r.id for r in await h.queue.history(fd.channel_id)] == before
    assert [m.id for m in fd.channel_messages()] == [msg.id]
    fd.assert_clean()


async def test_reroll_of_a_continue_continues_the_same_job_with_a_new_seed(harness):
    """A continue starts from its parent's final state: its Reroll does too (a continue of the same
    job, new seed), not from noise; both begin on the same frame, the parent's final."""
    from tests.test_bot_brainstorm import first_frame

    h = harness
    await h.start()
    fd = h.fd
    msg, job_id = await _finished_job(h, prompt="a lighthouse", seed=5, iterations=4)
    cont_msg, cont_id = await _button_job(h, await fd.click_button(msg, f"imagine:continue:{job_id}"))
    cont = await h.wait_delivered(cont_id)
    assert cont.state == JobState.DONE, cont.error
    await fd.wait_for(lambda: f"imagine:reroll:{cont_id}" in fd.messages[cont_msg.id].custom_ids, 10, "buttons")

    reroll_msg, reroll_id = await _button_job(h, await fd.click_button(cont_msg, f"imagine:reroll:{cont_id}"))
    reroll = await h.wait_delivered(reroll_id)
    assert reroll.state == JobState.DONE, reroll.error
    spec = reroll.spec
    assert (spec.parent_job_id, spec.parent_kind, spec.prompt) == (job_id, "continue", "a lighthouse")
    assert spec.seed != cont.spec.seed and spec.extra["rerolls"] == cont_id
    assert f"↻ reroll of `{cont_id}`, which continues `{job_id}`" in fd.messages[reroll_msg.id].content
    assert (_frame0(await first_frame(h.queue, reroll_id)) == _frame0(await first_frame(h.queue, cont_id))).all()
    fd.assert_clean()


async def test_buttons_keep_to_todays_limits(harness):
    """Buttons made before an admin lowered the limits: Reroll and Continue take at most today's
    `max_iterations`; a size taken out of `[imagine] sizes` is refused (privately) by Reroll,
    Continue and Remix alike, since a job from another's state keeps its grid."""
    h = harness
    await h.start()
    fd = h.fd
    msg, job_id = await _finished_job(h, prompt="a tall tower", iterations=8)
    h.config.imagine.max_iterations = 3
    for action in ("reroll", "continue"):
        _, new_id = await _button_job(h, await fd.click_button(msg, f"imagine:{action}:{job_id}"))
        assert (await h.queue.get(new_id)).spec.iterations == 3, action
        await h.wait_delivered(new_id)

    h.config.imagine.max_iterations = 40
    big_msg, big_id = await _finished_job(h, prompt="a wide field", size=128, iterations=2)
    del h.config.imagine.sizes["128"]
    queued = len(await h.queue.history(fd.channel_id, limit=50))
    for action in ("reroll", "continue", "remix"):
        click = await fd.click_button(big_msg, f"imagine:{action}:{big_id}")
        await fd.wait_for_response(click)
        assert click.response_type == 4 and click.response["data"]["flags"] & EPHEMERAL, (action, click.response)
        assert f"Job `{big_id}` is 128×128, a size no longer offered here" in click.response["data"]["content"]
    assert len(await h.queue.history(fd.channel_id, limit=50)) == queued
    fd.assert_clean()


async def test_reroll_and_continue_check_the_prompt_against_todays_limits(harness):
    """An admin lowered `max_prompt_chars` since a job finished: its Reroll and Continue are refused,
    privately, as `/imagine` of its prompt would be, and nothing is queued. The refused words are
    matched only up to that limit: `cursed` past it would have gone unseen. A prompt within the
    limits with a literal brace (typed `\\{`) still rerolls: it is not read as a set's, half open."""
    from tests.test_bot_support import finished_job

    h = harness
    await h.start(worker=False)
    fd = h.fd
    prompt = "a lighthouse in fog at dusk, oils, with a cursed ship"
    msg, job_id = await finished_job(h, prompt)
    brace_msg, brace_id = await finished_job(h, "a sign reading \\{ open")
    assert (await h.queue.get(brace_id)).spec.prompt == "a sign reading { open"
    h.config.imagine.max_prompt_chars = 40
    await h.queue.set_setting(f"banned:{fd.guild_id}", ["cursed"])
    before = await h.queue.history(fd.channel_id, limit=50)
    for action, verb in (("reroll", "rerolled"), ("continue", "continued")):
        click = await fd.click_button(msg, f"imagine:{action}:{job_id}")
        await fd.wait_for_response(click)
        assert click.response_type == 4 and click.response["data"]["flags"] & EPHEMERAL, (action, click.response)
        assert click.response["data"]["content"].startswith(
            f"Job `{job_id}` cannot be {verb} within today's limits. The prompt is {len(prompt)} characters "
            "long; the limit is 40."), click.response
    assert await h.queue.history(fd.channel_id, limit=50) == before and await h.queue.count_queued() == 0

    _, reroll_id = await _button_job(h, await fd.click_button(brace_msg, f"imagine:reroll:{brace_id}"))
    assert (await h.queue.get(reroll_id)).spec.prompt == "a sign reading { open"
    fd.assert_clean()


async def test_jobs_made_from_a_job_with_an_old_size_label_are_labelled_by_their_grid(harness):
    """A job queued under an old config whose label said more than its grid makes (`"256" = 8`:
    64-pixel pictures called 256×256; the bot refuses such a config now). Once the admin fixed it
    (`"64" = 8`), its Reroll, Continue and remix are labelled 64×64, what their pictures are; and
    where its grid is no longer offered, the refusal says what the job is: 64×64."""
    from tests.test_bot_support import finished_job

    h = harness
    h.config.imagine.sizes = {"256": 8, "128": 16}   # set past the config's check, as an old version loaded it
    h.config.imagine.default_size = 256
    await h.start(worker=False)
    fd = h.fd
    msg, job_id = await finished_job(h, "a lighthouse")
    old = (await h.queue.get(job_id)).spec
    assert (old.grid, old.extra["size"]) == (8, 256) and "256×256" in fd.messages[msg.id].content

    h.config.imagine.sizes = {"64": 8, "128": 16}   # the admin's fix
    h.config.imagine.default_size = 64
    made = [await _button_job(h, await fd.click_button(msg, f"imagine:{action}:{job_id}"))
            for action in ("reroll", "continue")]
    inter = await fd.send_slash_command("remix", {"job": job_id, "prompt": "a boat"})
    await fd.wait_for_response(inter)
    remix_msg = await h.reply_of(inter)
    made.append((remix_msg, h.job_id(remix_msg)))
    for new_msg, new_id in made:
        spec = (await h.queue.get(new_id)).spec
        assert (spec.grid, spec.extra["size"]) == (8, 64), new_id
        assert "64×64" in new_msg.content and "256×256" not in new_msg.content, new_msg.content

    h.config.imagine.sizes = {"128": 16}   # grid 8 no longer offered
    click = await fd.click_button(msg, f"imagine:reroll:{job_id}")
    await fd.wait_for_response(click)
    assert click.response_type == 4 and click.response["data"]["flags"] & EPHEMERAL, click.response
    assert f"Job `{job_id}` is 64×64, a size no longer offered here (now 128)" in click.response["data"]["content"]
    fd.assert_clean()


async def test_cancel_says_stopping_when_a_worker_took_the_job_meanwhile(harness):
    """The answer follows the job's state after the cancel, not the one read before it: a worker
    that claims the job between the two makes it "Stopping…", not "Cancelled"."""
    h = harness
    await h.start(worker=False)
    fd = h.fd
    msg = await h.reply_of(await h.imagine("a slow sunrise"))
    job_id = h.job_id(msg)
    store_cancel = h.queue.cancel

    async def claimed_first(jid, reason=None):   # the real store: a worker's claim lands just before the cancel
        assert (await h.queue.claim("test-gpu")).id == jid
        return await store_cancel(jid, reason)

    h.queue.cancel = claimed_first
    try:
        click = await fd.click_button(msg, f"imagine:cancel:{job_id}")
        assert await private_answer(h, click) == f"Stopping job `{job_id}`…"
    finally:
        del h.queue.cancel
    record = await h.queue.get(job_id)
    assert record.state == JobState.RUNNING and record.cancel_requested
    fd.assert_clean()


async def test_cancel_of_a_running_job_that_finished_meanwhile_ends_cancelled(harness):
    """The store takes the cancel of a running job (a request to its worker), and the worker's
    finish commits before the bot reads the job again: the cancel wins (the store's finish ends a
    job asked to stop CANCELLED), so the answer is "Cancelled" and no picture is posted."""
    h = harness
    await h.start(worker=False)
    fd = h.fd
    msg = await h.reply_of(await h.imagine("a quick sketch"))
    job_id = h.job_id(msg)
    got = await h.queue.claim("test-gpu")
    assert got.id == job_id
    store_cancel = h.queue.cancel

    async def finished_meanwhile(jid, reason=None):   # the real store: the cancel is asked, then the worker's finish lands
        asked = await store_cancel(jid, reason)
        assert await h.queue.finish(jid, got.lease_id, 0.3) is True
        return asked

    h.queue.cancel = finished_meanwhile
    try:
        click = await fd.click_button(msg, f"imagine:cancel:{job_id}")
        assert await private_answer(h, click) == f"Cancelled job `{job_id}`."
    finally:
        del h.queue.cancel
    assert (await h.wait_delivered(job_id)).state == JobState.CANCELLED
    fd.assert_clean()
