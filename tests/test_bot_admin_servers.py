"""/queue across servers: one queue serves every server the bot is in, and each server's admins
manage only their own server's jobs. `show` lists this server's jobs (places counted in the whole
line), `cancel` of another server's job reads as an unknown id, `clear` cancels this server's jobs,
`limit` is per server, `pause` / `resume` stop and start this server's jobs, and the same with
`everywhere` (every server at once) is the bot owner's alone.

Two guilds of the fake: A (the primary one) and B. Alice is the application's owner and an admin of
both; Carol is an admin of B only; Bob is a plain member of both.
"""

from __future__ import annotations

import pytest

from bot.queue_admin import USER_LIMIT_KEY, in_scope, show_text, user_limit_key
from engine.jobs import PAUSED_KEY, JobRecord, JobSpec, JobState, guild_paused_key, places_in_line
from tests.test_bot_support import EPHEMERAL, JOB_ID_RE, ephemeral_answer, harness  # noqa: F401 - the fixture

pytestmark = pytest.mark.asyncio


async def _queue(h, prompt, *, user, guild_id):
    inter = await h.fd.send_slash_command("imagine", {"prompt": prompt}, user=user, guild_id=guild_id)
    await h.fd.wait_for_response(inter)
    return h.job_id(await h.reply_of(inter))


async def _two_servers(h):
    """Guild B and Carol (B's admin, not the bot's owner), then the bot without a worker: jobs stay queued."""
    fd = h.fd
    b = fd.add_guild("Other Guild")
    carol = fd.add_user("carol", admin=True, guild_id=b.id)
    await h.start(worker=False)
    return fd.guild_id, b.id, carol


async def _states(h, ids):
    return {job_id: (await h.queue.get(job_id)).state for job_id in ids}


async def test_show_lists_only_this_servers_jobs_with_their_places_in_the_whole_line(harness):
    h = harness
    a, b, carol = await _two_servers(h)
    fd = h.fd
    alice, bob = fd.admin_user, fd.member_user
    jobs = {
        "a-run": await _queue(h, "apple running", user=bob, guild_id=a),
        "b-one": await _queue(h, "banana one", user=carol, guild_id=b),
        "a-one": await _queue(h, "apricot one", user=alice, guild_id=a),
        "b-two": await _queue(h, "blueberry two", user=bob, guild_id=b),
    }
    claimed = await h.queue.claim("test-gpu")
    assert claimed.id == jobs["a-run"]
    line = [r.id for r in await h.queue.queued()]   # the shared line, in claim order
    assert sorted(line) == sorted([jobs["b-one"], jobs["a-one"], jobs["b-two"]])
    place = {job_id: n for n, job_id in enumerate(line, 1)}

    text = await ephemeral_answer(h, "queue show", guild_id=a)           # Bob in A
    assert f"▶ `{jobs['a-run']}` apple running · <@{bob['id']}> · 0/" in text
    assert f"**#{place[jobs['a-one']]}** `{jobs['a-one']}` apricot one · <@{alice['id']}>" in text
    assert jobs["b-one"] not in text
    assert "banana" not in text and f"<@{carol['id']}>" not in text
    # His own job of B is his to see (and cancel) from anywhere: listed first, not counted as hidden.
    assert text.startswith(f"**#{place[jobs['b-two']]}** `{jobs['b-two']}` blueberry two · yours, in another server")
    assert "Not shown: 1 waiting job of other servers." in text, text

    text = await ephemeral_answer(h, "queue show", guild_id=b, user=carol)   # Carol in B
    for key, prompt in (("b-one", "banana one"), ("b-two", "blueberry two")):
        assert f"**#{place[jobs[key]]}** `{jobs[key]}` {prompt}" in text, text
    assert jobs["a-run"] not in text and jobs["a-one"] not in text and "apple" not in text
    assert "apricot" not in text and "▶" not in text
    assert "Not shown: 1 waiting and 1 running jobs of other servers." in text, text

    # B paused: the workers pass its jobs by, so A's job is next whatever waits of B's ahead of it;
    # B's keep their places among their own server's and those the workers take first.
    await ephemeral_answer(h, "queue-admin pause", guild_id=b, user=carol)
    text = await ephemeral_answer(h, "queue show", guild_id=a)
    assert f"**#1** `{jobs['a-one']}` apricot one" in text, text
    expected = dict(zip(line, places_in_line([b if j in (jobs["b-one"], jobs["b-two"]) else a for j in line], {b})))
    assert f"**#{expected[jobs['b-two']]}** `{jobs['b-two']}` blueberry two · yours, in another server" in text, text
    await ephemeral_answer(h, "queue-admin resume", guild_id=b, user=carol)

    # A server with nothing in the line says so, and what waits elsewhere.
    for job_id in (jobs["b-one"], jobs["b-two"]):
        assert await h.queue.cancel(job_id)
    text = await ephemeral_answer(h, "queue show", guild_id=b, user=carol)   # (Bob would see his own)
    assert text.startswith("No job of this server is in the line.")
    assert "Not shown: 1 waiting and 1 running jobs of other servers." in text
    fd.assert_clean()


async def test_places_in_line_pass_by_another_paused_servers_jobs():
    # Claim order: A1, B1, B2, A2, None (a job of no server), B3, with B paused.
    servers = [1, 2, 2, 1, None, 2]
    assert places_in_line(servers, {2}) == [1, 2, 3, 2, 3, 6]
    assert places_in_line(servers, ()) == [1, 2, 3, 4, 5, 6]


async def test_cancel_of_another_servers_job_reads_as_an_unknown_id(harness):
    h = harness
    a, b, carol = await _two_servers(h)
    fd = h.fd
    alice, bob = fd.admin_user, fd.member_user
    a_alice = await _queue(h, "apricot", user=alice, guild_id=a)
    b_carol = await _queue(h, "banana", user=carol, guild_id=b)
    b_bob = await _queue(h, "blueberry", user=bob, guild_id=b)
    before = await _states(h, [a_alice, b_carol, b_bob])

    unknown = await ephemeral_answer(h, "queue cancel", {"job": "0123456789ab"}, guild_id=b, user=carol)
    assert "There is no job" in unknown
    # Carol (B's admin) on A's job, and Alice (A's admin, and B's too) on B's job from A: not confirmed.
    text = await ephemeral_answer(h, "queue cancel", {"job": a_alice}, guild_id=b, user=carol)
    assert text == unknown.replace("0123456789ab", a_alice)
    text = await ephemeral_answer(h, "queue cancel", {"job": b_carol}, guild_id=a, user=alice)
    assert text == unknown.replace("0123456789ab", b_carol)
    # Bob (no admin anywhere) on another server's job: the same answer, not "only the author".
    text = await ephemeral_answer(h, "queue cancel", {"job": b_carol}, guild_id=a, user=bob)
    assert text == unknown.replace("0123456789ab", b_carol)
    assert await _states(h, [a_alice, b_carol, b_bob]) == before

    # His own job, wherever he asks from; and B's admin cancels B's jobs.
    text = await ephemeral_answer(h, "queue cancel", {"job": b_bob}, guild_id=a, user=bob)
    assert text == f"Cancelled job `{b_bob}`."
    text = await ephemeral_answer(h, "queue cancel", {"job": b_carol}, guild_id=b, user=carol)
    assert text == f"Cancelled job `{b_carol}`."
    assert await _states(h, [a_alice, b_carol, b_bob]) == {
        a_alice: JobState.QUEUED, b_carol: JobState.CANCELLED, b_bob: JobState.CANCELLED}
    fd.assert_clean()


async def test_clear_cancels_only_this_servers_queued_jobs(harness):
    h = harness
    a, b, carol = await _two_servers(h)
    fd = h.fd
    alice, bob = fd.admin_user, fd.member_user
    a_running = await _queue(h, "apple", user=bob, guild_id=a)
    b_running = await _queue(h, "banana", user=carol, guild_id=b)
    assert {(await h.queue.claim("test-gpu")).id for _ in range(2)} == {a_running, b_running}
    a_ids = [await _queue(h, f"apricot {i}", user=user, guild_id=a) for i, user in enumerate((alice, bob))]
    b_ids = [await _queue(h, f"blueberry {i}", user=user, guild_id=b) for i, user in enumerate((carol, bob))]

    text = await ephemeral_answer(h, "queue-admin clear", guild_id=b, user=carol)
    assert text == "Cleared this server's jobs from the line: 2 jobs cancelled."
    states = await _states(h, [a_running, b_running, *a_ids, *b_ids])
    assert states == {a_running: JobState.RUNNING, b_running: JobState.RUNNING,    # running ones go on
                      **{j: JobState.QUEUED for j in a_ids}, **{j: JobState.CANCELLED for j in b_ids}}
    assert (await h.queue.get(b_running)).cancel_requested is False
    assert "0 jobs cancelled" in await ephemeral_answer(h, "queue-admin clear", guild_id=b, user=carol)
    assert sorted(r.id for r in await h.queue.queued()) == sorted(a_ids)
    fd.assert_clean()


async def test_an_admin_pauses_and_resumes_their_own_server_alone(harness):
    """Carol (B's admin) pauses B: the workers skip B's waiting jobs and take A's; /queue show says so
    in B only; a member cannot resume it; Carol's resume lets B's jobs start."""
    h = harness
    a, b, carol = await _two_servers(h)
    fd = h.fd
    bob = fd.member_user
    b_one = await _queue(h, "banana one", user=bob, guild_id=b)
    b_two = await _queue(h, "blueberry two", user=carol, guild_id=b)
    a_one = await _queue(h, "apricot one", user=fd.admin_user, guild_id=a)

    text = await ephemeral_answer(h, "queue-admin pause", guild_id=b, user=carol)
    assert text == ("Paused this server's jobs: none of them starts until `/queue-admin resume` (running ones finish; "
                    "other servers' jobs go on).")
    assert await h.queue.get_setting(guild_paused_key(b)) is True
    assert await h.queue.get_setting(guild_paused_key(a)) is None and await h.queue.get_setting(PAUSED_KEY) is None
    assert "This server's jobs are paused" in await ephemeral_answer(h, "queue show", guild_id=b)
    # (Bob's own job of B is listed in A too, saying that its server is paused; A is not.)
    assert "This server's jobs are paused" not in await ephemeral_answer(h, "queue show", guild_id=a)

    assert (await h.queue.claim("test-gpu")).id == a_one          # A's job starts, ahead of B's
    assert await h.queue.claim("test-gpu") is None                # B's wait
    assert await _states(h, [b_one, b_two]) == {b_one: JobState.QUEUED, b_two: JobState.QUEUED}
    text = await ephemeral_answer(h, "queue-admin resume", guild_id=b, user=bob)   # not an admin
    assert "Only admins" in text and await h.queue.get_setting(guild_paused_key(b)) is True

    assert await ephemeral_answer(h, "queue-admin resume", guild_id=b, user=carol) == "Resumed: this server's jobs start again."
    assert await h.queue.get_setting(guild_paused_key(b)) is False
    assert "paused" not in await ephemeral_answer(h, "queue show", guild_id=b)
    assert [(await h.queue.claim("test-gpu")).id for _ in range(2)] == [b_one, b_two]
    fd.assert_clean()


async def test_queued_replies_say_when_their_server_is_paused(harness):
    """A paused server's waiting jobs say so in their replies (redrawn when an admin pauses or
    resumes, and a new job's first reply), naming what ends it; other servers' replies do not."""
    h = harness
    a, b, carol = await _two_servers(h)
    fd = h.fd
    note = "This server's jobs are paused; it will start when an admin uses `/queue-admin resume`."

    async def reply(prompt, guild_id):
        inter = await fd.send_slash_command("imagine", {"prompt": prompt}, user=fd.member_user, guild_id=guild_id)
        await fd.wait_for_response(inter)
        return await h.reply_of(inter)

    b_waiting, a_waiting = await reply("banana", b), await reply("apricot", a)
    assert note not in fd.messages[b_waiting.id].content
    assert "Queued: #2 in line." in fd.messages[a_waiting.id].content
    await ephemeral_answer(h, "queue-admin pause", guild_id=b, user=carol)
    await fd.wait_for(lambda: note in fd.messages[b_waiting.id].content, 10, "the paused note in B's reply")
    b_new = await reply("blueberry", b)
    assert note in fd.messages[b_new.id].content
    assert "paused" not in fd.messages[a_waiting.id].content
    # B's paused job ahead of A's is passed by the workers: A's is next (it read #2 before).
    await fd.wait_for(lambda: "Queued: next in line." in fd.messages[a_waiting.id].content, 10, "A's place")
    await fd.wait_for(lambda: "Queued: #3 in line." in fd.messages[b_new.id].content, 10, "B's new job's place")
    # A new job of A's is placed so from its first reply: #2 (behind A's), never #4.
    a_new = await reply("avocado", a)
    await fd.wait_for(lambda: "Queued: #2 in line." in fd.messages[a_new.id].content, 10, "A's new job's place")
    shown = [snapshot["content"] for snapshot in fd.messages[a_new.id].history] + [fd.messages[a_new.id].content]
    assert not any("#4 in line" in text for text in shown), shown

    await ephemeral_answer(h, "queue-admin resume", guild_id=b, user=carol)
    await fd.wait_for(lambda: all("paused" not in fd.messages[m.id].content for m in (b_waiting, b_new)), 10,
                      "the note gone after the resume")
    fd.assert_clean()


async def test_pausing_every_server_is_the_bot_owners_alone(harness):
    """A server admin who asks for `everywhere` is refused, privately, and nothing is paused; the bot's
    owner pauses and resumes every server; a server resumed by its admin meanwhile still waits."""
    h = harness
    a, b, carol = await _two_servers(h)
    fd = h.fd
    b_job = await _queue(h, "banana", user=carol, guild_id=b)
    for name in ("queue-admin pause", "queue-admin resume"):
        inter = await fd.send_slash_command(name, {"everywhere": True}, guild_id=b, user=carol)  # B's admin
        await fd.wait_for_response(inter)
        data = inter.response["data"]
        assert inter.response_type == 4 and data["flags"] & EPHEMERAL
        assert "Only the bot's owner" in data["content"] and "every server" in data["content"]
        assert "Admins can `/queue-admin pause`" in data["content"]
    assert await h.queue.get_setting(PAUSED_KEY) is None
    assert await h.queue.get_setting(guild_paused_key(b)) is None

    # Alice owns the application (the fake's GET /oauth2/applications/@me names her).
    text = await ephemeral_answer(h, "queue-admin pause", {"everywhere": True}, guild_id=b, user=fd.admin_user)
    assert text.startswith("Paused for every server") and await h.queue.get_setting(PAUSED_KEY) is True
    assert "paused** for every server" in await ephemeral_answer(h, "queue show", guild_id=a)
    assert await h.queue.claim("test-gpu") is None
    text = await ephemeral_answer(h, "queue-admin resume", guild_id=b, user=carol)      # her server's pause only
    assert text.endswith("But the bot's owner has paused every server: nothing starts until they resume it.")
    assert await h.queue.get_setting(PAUSED_KEY) is True and await h.queue.claim("test-gpu") is None
    text = await ephemeral_answer(h, "queue-admin resume", {"everywhere": True}, guild_id=a, user=fd.admin_user)
    assert text.startswith("Resumed") and await h.queue.get_setting(PAUSED_KEY) is False
    assert (await h.queue.claim("test-gpu")).id == b_job
    fd.assert_clean()


async def test_limit_is_per_server(harness):
    h = harness
    a, b, carol = await _two_servers(h)
    fd = h.fd
    assert await ephemeral_answer(h, "queue-admin limit", {"n": 1}, guild_id=b, user=carol) == (
        "Each person may now have 1 job waiting when they queue in this server; "
        "jobs waiting in other servers count too.")
    assert await h.queue.get_setting(user_limit_key(b)) == 1
    assert await h.queue.get_setting(user_limit_key(a)) is None
    assert await h.queue.get_setting(USER_LIMIT_KEY) is None
    assert [await h.bot.user_limit(g) for g in (a, b, None)] == [5, 1, 5]   # 5: [queue] max_queued_per_user
    assert "1 job waiting when they queue in this server" in await ephemeral_answer(h, "queue show", guild_id=b)
    assert "5 jobs waiting when they queue in this server" in await ephemeral_answer(h, "queue show", guild_id=a)

    assert "2 jobs" in await ephemeral_answer(h, "queue-admin limit", {"n": 2}, guild_id=a, user=fd.admin_user)
    assert [await h.bot.user_limit(g) for g in (a, b, None)] == [2, 1, 5]
    # The global setting an earlier version's /queue limit wrote (one server's admin, for all) is ignored.
    await h.queue.set_setting(USER_LIMIT_KEY, 4)
    assert [await h.bot.user_limit(g) for g in (a, b, None)] == [2, 1, 5]
    # Refusals: out of range, and not an admin of this server.
    assert "between 1 and 100" in await ephemeral_answer(h, "queue-admin limit", {"n": 0}, guild_id=b, user=carol)
    assert "Only admins" in await ephemeral_answer(h, "queue-admin limit", {"n": 9}, guild_id=b)   # Bob
    assert [await h.bot.user_limit(g) for g in (a, b)] == [2, 1]
    fd.assert_clean()


async def test_imagine_honours_the_servers_limit(harness):
    h = harness
    a, b, carol = await _two_servers(h)
    fd = h.fd
    await ephemeral_answer(h, "queue-admin limit", {"n": 1}, guild_id=b, user=carol)
    await _queue(h, "banana", user=fd.member_user, guild_id=b)
    # B's cap is 1 and Bob has 1 waiting: refused in B ...
    text = await ephemeral_answer(h, "imagine", {"prompt": "blueberry"}, guild_id=b)
    assert "the limit is 1" in text
    # ... while A keeps the configured 5 (his waiting jobs are counted across servers).
    await _queue(h, "apricot", user=fd.member_user, guild_id=a)
    assert await h.queue.count_queued(int(fd.member_user["id"])) == 2
    fd.assert_clean()


def _record(job_id, guild_id, user_id, prompt="x", state=JobState.QUEUED):
    return JobRecord(id=job_id, spec=JobSpec(prompt=prompt, user_id=user_id, guild_id=guild_id, iterations=10),
                     state=state)


async def test_show_withholds_the_prompt_of_a_running_job_cancelled_for_a_refused_word():
    """Its reply and /history withhold it from the moment of the cancel; /queue show listed it
    until its worker stopped (a second, or a hung worker's stall timeout)."""
    from bot.render import CANCEL_BANNED, PROMPT_WITHHELD

    running = _record("r1", 1, 7, "a BANNEDWORD poster", JobState.RUNNING)
    running.cancel_requested, running.error = True, CANCEL_BANNED
    mine = _record("r2", 2, 7, "my BANNEDWORD poster", JobState.RUNNING)   # the caller's, in another server
    mine.cancel_requested, mine.error = True, CANCEL_BANNED
    text = show_text([running, mine], [], 1, 7, paused=False, limit=3)
    assert "BANNEDWORD" not in text and text.count(PROMPT_WITHHELD) == 2, text


async def test_show_in_direct_messages_lists_only_the_callers_own_jobs():
    """The /queue group is guild-only today; should it ever answer in DMs (guild None), the caller
    sees their own jobs only."""
    line = [_record("a1", 1, 7, "seven in A"), _record("d1", None, 8, "eight in DM"),
            _record("b1", 2, 8, "eight in B"), _record("b2", 2, 9, "nine in B")]
    assert [r.id for r in line if in_scope(r, None, 8)] == ["d1", "b1"]
    assert [r.id for r in line if in_scope(r, 2, 8)] == ["b1", "b2"]
    text = show_text([], line, None, 8, paused=False, limit=3)
    assert "**#2** `d1` eight in DM" in text and "**#3** `b1` eight in B" in text
    assert "a1" not in text and "b2" not in text and "nine" not in text
    assert "Not shown: 2 waiting jobs of other people." in text
    assert JOB_ID_RE.search(text) is None   # ids are shown as `code`, never as "job <id>"
    assert show_text([], [], None, 8, paused=False, limit=3).startswith("The line is empty.")
    # A long line is cut to whole entries and says how many are left out.
    many = [_record(f"j{i:02d}", 1, 7, "y" * 200) for i in range(40)]
    text = show_text([], many, 1, 7, paused=True, limit=3)
    assert len(text) <= 2000 and "more of this server." in text
    assert text.endswith("jobs waiting in other servers count too.")
