"""The buttons: Reroll, Continue, Remix (its modal) and Cancel, also after a restart (DynamicItem,
a listener for the modal's submit, state from the store)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from engine.jobs import JobState
from tests.test_bot_support import EPHEMERAL, harness  # noqa: F401 - the fixture

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
    assert "continues " + job_id in h.fd.messages[cont_msg.id].content
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

    # The owner cancels: an ephemeral confirmation, the reply says so, buttons change to Reroll.
    click = await h.fd.click_button(msg, f"imagine:cancel:{job_id}")
    await h.fd.wait_for_response(click)
    assert click.response_type == 4 and click.response["data"]["flags"] & EPHEMERAL
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
    await h.fd.wait_for_response(click)
    assert click.response["data"]["flags"] & EPHEMERAL
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
