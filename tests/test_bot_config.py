"""Config loading and the `imagine-bot` command line: clear errors, exit code 2, sync on request."""

from __future__ import annotations

import asyncio
import logging
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from bot.__main__ import main
from bot.config import Config, ConfigError, check_token, config_from_dict, load_config
from tests.fakediscord import FakeDiscord

ROOT = Path(__file__).resolve().parents[1]
GOOD_TOKEN = "MTIzNDU2Nzg5MDEyMzQ1Njc4.GaBcDe.abcdefghijklmnopqrstuvwxyz0123456789AB"


def _uncomment(text: str) -> str:
    """config.example.toml with every `# key = value` line made live."""
    out = []
    for line in text.splitlines():
        m = re.match(r"^# (\w+ = .*)$", line)
        if m:
            value = m.group(1)
            # drop a trailing comment (none of the example's values contain '#')
            value = re.sub(r"\s+#.*$", "", value)
            out.append(value)
        else:
            out.append(line)
    return "\n".join(out)


def test_the_example_config_lists_every_setting_with_its_default():
    text = (ROOT / "config.example.toml").read_text()
    assert tomllib.loads(text) == {"discord": {}, "queue": {}, "worker": {}, "imagine": {}, "progress": {},
                                 "http": {}, "presets": {"draft": {}, "normal": {}, "best": {}}}
    live = tomllib.loads(_uncomment(text))
    assert config_from_dict(live) == Config()
    # every field of every section appears in the example, and no token setting does
    import dataclasses

    for section in dataclasses.fields(Config):
        sub = getattr(Config(), section.name)
        if dataclasses.is_dataclass(sub):
            assert set(live[section.name]) == {f.name for f in dataclasses.fields(sub)}, section.name
        else:
            assert section.name in live
    assert not re.search(r"^#?\s*token\s*=", text, re.M)


@pytest.mark.parametrize("toml, message", [
    ("[imagine]\nmax_prompt_chars = \"500\"", "[imagine] max_prompt_chars: expected an integer, got '500'"),
    ("[worker]\nembedded = 1", "[worker] embedded: expected true or false, got 1"),
    ("[progress]\nmessage_interval = \"fast\"", "[progress] message_interval: expected a number"),
    # An interaction token lives 15 minutes: a TTL of 900 or more edits through a dead token (401s).
    ("[progress]\ntoken_ttl = 900", "[progress] token_ttl: must be below 900 (an interaction token lives 15 minutes"),
    ("[progress]\ntoken_ttl = 3600", "[progress] token_ttl: must be below 900"),
    ("[discord]\nadmin_roles = \"Admin\"", "[discord] admin_roles: expected a list"),
    ("[discord]\nshard_count = -1", "[discord] shard_count: must not be negative, got -1 (0: as many shards as Discord recommends)"),
    ("[discord]\nshard_count = \"2\"", "[discord] shard_count: expected an integer, got '2'"),
    ("[discord]\nshard_count = 2.0", "[discord] shard_count: expected an integer, got 2.0"),
    ("[discord]\nshard_count = 100000", "[discord] shard_count: 100000 is more than 1024 shards"),
    ("[imagine]\nsizes = { \"256\" = \"32\" }", "[imagine] sizes.256: expected an integer"),
    ("[imagine]\ndefault_size = 1024", "[imagine] default_size: 1024 is not one of sizes"),
    # The key is the label users pick and see; the grid alone makes the picture (8 × grid a side).
    ("[imagine]\nsizes = { \"256\" = 8 }\ndefault_size = 256",
     "[imagine] sizes.256: a grid of 8 makes 64×64 pictures, not 256×256; the key must be 8 × grid "
     "(\"64\" = 8, or \"256\" = 32 for 256×256 pictures)"),
    ("[imagine]\nsizes = { \"256\" = 32, \"1024\" = 64 }", "[imagine] sizes.1024: a grid of 64 makes 512×512 pictures"),
    ("[imagine]\nsizes = { \"300\" = 32 }", "[imagine] sizes.300: a grid of 32 makes 256×256 pictures, not 300×300; "
                                            "the key must be 8 × grid (\"256\" = 32)"),
    ("[imagine]\nmax_promt_chars = 5", "unknown key in [imagine]: max_promt_chars"),
    ("[queue]\nurl = \"postgres://x\"", "[queue] url: expected sqlite:///path.db or redis://"),
    ("imagine = 3", "[imagine]: expected a table"),
    ("[discord]\ntoken = \"abc\"", "the token does not belong in the config file"),
    ("[imagine\n", "not valid TOML"),
    ("[worker]\nkeep_days = 0.0001", "[worker] keep_days: must be 0 (never prune) or at least 0.04167 days (an hour), "
                                     "got 0.0001"),
    ("[worker]\nkeep_days = 0.04", "[worker] keep_days: must be 0 (never prune) or at least 0.04167 days"),
    ("[worker]\nkeep_days = -1", "[worker] keep_days: must not be negative (0: never prune)"),
    ("[worker]\nkeep_days = inf", "[worker] keep_days: must be 0 (never prune) or a number of days"),
    ("[worker]\nkeep_state_days = 0.04", "[worker] keep_state_days: must be 0 (as long as the job: keep_days) or "
                                          "at least 0.04167 days (an hour), got 0.04"),
    ("[worker]\nkeep_state_days = -1", "[worker] keep_state_days: must not be negative (0: as long as the job"),
    ("[worker]\nkeep_state_days = inf", "[worker] keep_state_days: must be 0 (as long as the job: keep_days) or "
                                         "at least"),
    ("[worker]\nkeep_state_days = \"7\"", "[worker] keep_state_days: expected a number, got '7'"),
    ("[worker]\nkeep_state_gib = -1", "[worker] keep_state_gib: must be 0 (no budget) or a positive number of GiB, "
                                       "got -1.0"),
    ("[worker]\nkeep_state_gib = nan", "[worker] keep_state_gib: must be 0 (no budget) or a positive number of GiB, "
                                        "got nan"),
    ("[worker]\nkeep_state_gib = inf", "[worker] keep_state_gib: must be 0 (no budget) or a positive number of GiB, "
                                        "got inf"),
    ("[worker]\nkeep_state_gib = \"20\"", "[worker] keep_state_gib: expected a number, got '20'"),
    ("[worker]\ncache_dir = \"~no-such-user-here/models\"", "[worker] cache_dir: '~no-such-user-here/models': "
                                                             "'~no-such-user-here' is no home folder on this host"),
    # [imagine] sizes without a size a preset left as it is uses: the default named, and the fix.
    ("[imagine]\nsizes = { \"256\" = 32 }\ndefault_size = 256\n[presets.draft]\nsize = 256\n[presets.normal]\nsize = 256",
     "[presets.best] size: 512 (its default) is not one of [imagine] sizes (256): set [presets.best] size to one of them"),
    ("[imagine]\nsizes = { \"256\" = 32 }\ndefault_size = 256\n[presets.draft]\nsize = 128",
     "[presets.draft] size: 128 is not one of [imagine] sizes (256)"),
    # TOML's inf and nan: refused as such, not as "negative" (nan) or accepted as "never" (inf).
    ("[worker]\ncheckpoint_every = inf", "[worker] checkpoint_every: expected a finite number of seconds, got inf"),
    ("[progress]\npoll_timeout = inf", "[progress] poll_timeout: expected a finite number of seconds, got inf"),
    ("[progress]\nmessage_interval = nan", "[progress] message_interval: expected a finite number of seconds, got nan"),
    ("[worker]\ncompile = \"inductor:fast\"", "[worker] compile 'inductor:fast': the mode must be one of default, "
                                              "reduce-overhead, max-autotune"),
    ("[worker]\ncompile = \"eager:reduce-overhead\"", "[worker] compile 'eager:reduce-overhead': a mode is inductor's"),
    ("[worker]\ncompile = true", "[worker] compile: expected a string, got True"),
    ("[worker]\nknown_sha256 = \"ab\"", "[worker] known_sha256: expected a list, got 'ab'"),
    ("[worker]\nknown_sha256 = [\"" + "a" * 63 + "\"]", "[worker] known_sha256[0]: expected a SHA-256 as 64 hex digits"),
    ("[worker]\nknown_sha256 = [\"" + "a" * 64 + "\", \"" + "g" * 64 + "\"]",
     "[worker] known_sha256[1]: expected a SHA-256 as 64 hex digits"),
    ("[queue]\nurl = \"postgres://u:s3cret@h/db\"", "got 'postgres://u:***@h/db'"),   # never the password
])
def test_bad_config_values_name_the_key(tmp_path, toml, message):
    path = tmp_path / "config.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert message in str(err.value)


@pytest.mark.parametrize("ttl", [0, 60, 840, 899.5])
def test_token_ttl_below_the_tokens_fifteen_minutes_is_accepted(ttl):
    assert config_from_dict({"progress": {"token_ttl": ttl}}).progress.token_ttl == ttl


@pytest.mark.parametrize("days", [0, 1 / 24, 0.5, 30])
def test_keep_days_is_zero_for_never_or_at_least_an_hour(days):
    # Pruning also deletes uploads no job names yet once they are keep_days old: a window of seconds
    # could delete a picture between the bot storing it and submitting its job.
    assert config_from_dict({"worker": {"keep_days": days}}).worker.keep_days == days


@pytest.mark.parametrize("days", [0, 1 / 24, 2, 7, 30, 90])
def test_keep_state_days_is_zero_for_as_long_as_the_job_or_at_least_an_hour(days):
    # More than keep_days is allowed: the worker treats it as keep_days (the job takes its state along).
    assert config_from_dict({"worker": {"keep_state_days": days}}).worker.keep_state_days == days
    assert config_from_dict({"worker": {"keep_days": 0, "keep_state_days": days}}).worker.keep_state_days == days


def test_tokens_are_shape_checked_and_never_echoed():
    assert check_token(f"  {GOOD_TOKEN}\n") == GOOD_TOKEN
    for bad in (None, "", "   "):
        with pytest.raises(ConfigError, match="DISCORD_TOKEN is not set"):
            check_token(bad)
    for bad in ("not-a-token", "abc.def", "has space.in it.really-long-part-here"):
        with pytest.raises(ConfigError) as err:
            check_token(bad)
        assert bad not in str(err.value)


def _cli(args, env_token, cwd):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(cwd)}
    if env_token is not None:
        env["DISCORD_TOKEN"] = env_token
    return subprocess.run([sys.executable, "-m", "bot", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=60)


def test_cli_exits_2_with_a_clear_message_on_missing_config_or_token(tmp_path):
    proc = _cli(["--config", str(tmp_path / "nope.toml")], GOOD_TOKEN, ROOT)
    assert proc.returncode == 2
    assert "nope.toml" in proc.stderr and "not found" in proc.stderr and "config.example.toml" in proc.stderr

    cfg = tmp_path / "config.toml"
    cfg.write_text("[worker]\nembedded = false\n")
    proc = _cli(["--config", str(cfg)], None, ROOT)
    assert proc.returncode == 2 and "DISCORD_TOKEN is not set" in proc.stderr

    proc = _cli(["--config", str(cfg), "sync"], "definitely wrong", ROOT)
    assert proc.returncode == 2 and "does not look like a bot token" in proc.stderr
    assert "definitely wrong" not in proc.stderr + proc.stdout



def test_cli_options(tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "DISCORD_TOKEN" in out and "--queue" in out and "--log-level" in out and "sync" in out
    cfg = tmp_path / "config.toml"
    cfg.write_text("[imagine]\nmax_iterations = -1\n")
    monkeypatch.setenv("DISCORD_TOKEN", GOOD_TOKEN)
    assert main(["--config", str(cfg)]) == 2
    assert "[imagine] max_iterations" in capsys.readouterr().err
    cfg.write_text("")
    assert main(["--config", str(cfg), "--queue", "mysql://nope"]) == 2
    assert "--queue: expected sqlite:///path.db" in capsys.readouterr().err

    from bot.__main__ import build_parser, load

    args = build_parser().parse_args(["sync", "--config", str(cfg), "--queue", "sqlite:///x.db",
                                      "--log-level", "debug", "--guild", "42"])
    config, token = load(args)
    assert (config.queue.url, config.log_level, token, args.guild) == ("sqlite:///x.db", "DEBUG", GOOD_TOKEN, 42)


@pytest.mark.asyncio
async def test_sync_registers_the_commands_on_request_and_never_logs_the_token(tmp_path, monkeypatch, caplog):
    async with FakeDiscord() as fd:
        cfg = tmp_path / "config.toml"
        cfg.write_text(f'[queue]\nurl = "sqlite:///{tmp_path / "q.db"}"\n[worker]\nembedded = false\n')
        monkeypatch.setenv("DISCORD_TOKEN", fd.bot_token)
        caplog.set_level(logging.DEBUG)
        # main() runs its own event loop: give it a thread, the fake keeps serving on this loop.
        code = await asyncio.to_thread(main, ["--config", str(cfg), "--log-level", "debug", "sync",
                                              "--guild", str(fd.guild_id)])
        assert code == 0
        commands = {c["name"]: c for c in fd.guild_commands[fd.guild_id]}
        assert set(commands) == {"imagine", "queue", "queue-admin", "history", "remix", "help"}
        assert fd.global_commands == []
        imagine = {o["name"]: o for o in commands["imagine"]["options"]}
        assert imagine["prompt"]["required"] is True
        assert [c["value"] for c in imagine["size"]["choices"]] == [256, 512]
        subs = {o["name"] for o in commands["queue"]["options"]}
        assert subs == {"show", "cancel"}
        subs = {o["name"] for o in commands["queue-admin"]["options"]}
        assert subs == {"clear", "pause", "resume", "limit", "ban-word"}
        ban_word = next(o for o in commands["queue-admin"]["options"] if o["name"] == "ban-word")
        assert {o["name"] for o in ban_word["options"]} == {"add", "remove", "list"}
        # Admin roles are configured (the default "Imagine Admin"): Discord shows it to everyone, as
        # it cannot know who holds them; the bot refuses the others.
        assert commands["queue-admin"]["default_member_permissions"] is None
        assert fd.bot_token not in caplog.text
        fd.assert_clean()

        # A token Discord rejects: exit 2, said plainly.
        monkeypatch.setenv("DISCORD_TOKEN", GOOD_TOKEN)
        code = await asyncio.to_thread(main, ["--config", str(cfg), "sync"])
        assert code == 2
        assert GOOD_TOKEN not in caplog.text
        logging.getLogger().handlers[:] = [h for h in logging.getLogger().handlers
                                           if type(h).__module__.startswith("_pytest")]


@pytest.mark.asyncio
@pytest.mark.parametrize("admin_roles, permissions", [("[]", "32"), ('["Imagine Admin"]', None),
                                                      ('["123456789012345678"]', None)])
async def test_queue_admin_is_for_manage_server_by_default_only_without_admin_roles(tmp_path, monkeypatch,
                                                                                  admin_roles, permissions):
    """`imagine-bot sync` gives /queue-admin Discord's default_member_permissions Manage Server ("32":
    Discord hides it from members) when no admin role is configured; with roles, none: Discord knows
    nothing of them and would hide it from a role's members who lack Manage Server. /queue stays
    for everyone; both are for servers only."""
    async with FakeDiscord() as fd:
        cfg = tmp_path / "config.toml"
        cfg.write_text(f'[discord]\nadmin_roles = {admin_roles}\n'
                       f'[queue]\nurl = "sqlite:///{tmp_path / "q.db"}"\n[worker]\nembedded = false\n')
        monkeypatch.setenv("DISCORD_TOKEN", fd.bot_token)
        try:
            assert await asyncio.to_thread(main, ["--config", str(cfg), "sync", "--global"]) == 0
        finally:
            _drop_discord_log_handlers()
        commands = {c["name"]: c for c in fd.global_commands}
        assert commands["queue-admin"]["default_member_permissions"] == permissions
        assert commands["queue"]["default_member_permissions"] is None
        assert commands["queue-admin"]["contexts"] == commands["queue"]["contexts"] == [0]   # guild only
        fd.assert_clean()


async def _main_against_the_fake(argv: list[str], monkeypatch) -> int:
    """main(argv) logged in to a fake Discord that accepts its token (the bot logs in before its
    embedded worker loads the models), in a thread: main() runs its own event loop."""
    async with FakeDiscord() as fd:
        monkeypatch.setenv("DISCORD_TOKEN", fd.bot_token)
        try:
            return await asyncio.to_thread(main, argv)
        finally:
            _drop_discord_log_handlers()


@pytest.mark.asyncio
async def test_a_worker_that_cannot_load_its_models_stops_the_launch_with_a_clear_message(tmp_path, monkeypatch,
                                                                                          capsys):
    cfg = tmp_path / "config.toml"
    # device "cpu": with "auto" a host without CUDA starts no embedded worker at all.
    cfg.write_text(f'[queue]\nurl = "sqlite:///{tmp_path / "q.db"}"\n'
                   f'[worker]\nclip_model = "{tmp_path / "missing-clip.pt"}"\ncache_dir = "{tmp_path}"\n'
                   'device = "cpu"\n')
    # Exit 2: a setting to fix, as imagine-worker exits 2 for a missing, corrupt or untrusted model file.
    assert await _main_against_the_fake(["--config", str(cfg)], monkeypatch) == 2
    err = capsys.readouterr().err
    assert "the embedded worker could not load its models" in err and "missing-clip.pt" in err
    assert "rejected the token" not in err   # the token was fine: logged in, then the models failed


def test_an_http_port_already_in_use_exits_2_naming_the_setting(tmp_path):
    """The port is the operator's setting ([http] port / --http-port), as for imagine-worker: exit 2,
    one line, no traceback; refused before the bot logs in to Discord."""
    import socket

    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[worker]\nembedded = false\n[queue]\nurl = "sqlite:///{tmp_path}/q.db"\n')
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = _cli(["--config", str(cfg), "--http-port", str(port)], GOOD_TOKEN, ROOT)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"imagine-bot: cannot serve /healthz and /metrics on 127.0.0.1:{port}: " in proc.stderr
    assert "change [http] port / --http-port" in proc.stderr and "Traceback" not in proc.stderr
    assert GOOD_TOKEN not in proc.stdout + proc.stderr


def _drop_discord_log_handlers() -> None:
    """main() calls discord.utils.setup_logging(root=True): take its handler off again."""
    logging.getLogger().handlers[:] = [h for h in logging.getLogger().handlers
                                       if type(h).__module__.startswith("_pytest")]


# --- the queue URL's password ---------------------------------------------------------------------


def test_a_queue_that_cannot_be_reached_exits_1_and_never_shows_the_password(tmp_path):
    """A real `python -m bot` process with nothing listening on the Redis port: it retries for the
    queue's reconnect timeout (30 s by default; the URL's `reconnect_timeout=2` here), then says
    which queue and what to check, with the password masked, in its log and its message alike.
    Status 1, not 2: a server down or restarting is no setting to fix, and a supervisor that does
    not restart a process exiting 2 would leave the bot down after a Redis restart."""
    from tests.queue_fixtures import free_port

    port = free_port()   # bound, then closed: nothing listens there
    url = f"redis://user:s3cret@127.0.0.1:{port}/0?reconnect_timeout=2"
    proc = _cli(["--queue", url, "--no-worker", "--log-level", "DEBUG"], GOOD_TOKEN, tmp_path)   # no config.toml
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "s3cret" not in out, out
    assert (f"imagine-bot: cannot open the queue redis://user:***@127.0.0.1:{port}/0?reconnect_timeout=2: "
            in proc.stderr), out
    assert "check --queue / IMAGINE_QUEUE_URL / [queue] url" in proc.stderr
    assert GOOD_TOKEN not in out

    # A --queue that is not a queue URL at all: refused up front, password masked too.
    proc = _cli(["--queue", "mysql://user:s3cret@db/x"], GOOD_TOKEN, tmp_path)
    assert proc.returncode == 2
    assert "--queue: expected sqlite:///path.db" in proc.stderr and "mysql://user:***@db/x" in proc.stderr
    assert "s3cret" not in proc.stdout + proc.stderr


def test_the_queue_url_comes_from_the_command_line_then_imagine_queue_url_then_the_config(tmp_path, monkeypatch,
                                                                                         capsys):
    """--queue > $IMAGINE_QUEUE_URL > [queue] url; an empty variable counts as unset; a variable
    that is no queue URL is refused up front, named, with its password masked."""
    from bot.__main__ import build_parser, load

    cfg = tmp_path / "config.toml"
    cfg.write_text('[queue]\nurl = "sqlite:///from-config.db"\n')
    monkeypatch.setenv("DISCORD_TOKEN", GOOD_TOKEN)
    monkeypatch.delenv("IMAGINE_QUEUE_URL", raising=False)

    def url(*argv: str) -> str:
        return load(build_parser().parse_args(["--config", str(cfg), *argv]))[0].queue.url

    assert url() == "sqlite:///from-config.db"
    monkeypatch.setenv("IMAGINE_QUEUE_URL", "redis://:s3cret@redis:6379/0")
    assert url() == url("run") == "redis://:s3cret@redis:6379/0"
    assert url("--queue", "sqlite:///from-flag.db") == "sqlite:///from-flag.db"
    assert url("run", "--queue", "sqlite:///from-flag.db") == "sqlite:///from-flag.db"
    monkeypatch.setenv("IMAGINE_QUEUE_URL", "  ")
    assert url() == "sqlite:///from-config.db"

    monkeypatch.setenv("IMAGINE_QUEUE_URL", "mysql://user:s3cret@db/x")
    assert main(["--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "IMAGINE_QUEUE_URL: expected sqlite:///path.db" in err and "mysql://user:***@db/x" in err
    assert "s3cret" not in err
    assert url("--queue", "sqlite:///from-flag.db") == "sqlite:///from-flag.db"   # not even read then
    # A Redis database that is no number (redis-py would read it as db 0, another deployment's queue).
    monkeypatch.setenv("IMAGINE_QUEUE_URL", "redis://:s3cret@redis:6379/O")
    assert main(["--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "IMAGINE_QUEUE_URL: the database in 'redis://:***@redis:6379/O' must be a number" in err, err
    monkeypatch.delenv("IMAGINE_QUEUE_URL")
    cfg.write_text('[queue]\nurl = "redis://redis:6379/abc"\n')
    assert main(["--config", str(cfg)]) == 2
    assert "[queue] url: the database in 'redis://redis:6379/abc' must be a number" in capsys.readouterr().err


def test_the_bot_uses_the_queue_url_from_imagine_queue_url_and_never_logs_its_password(tmp_path, monkeypatch,
                                                                                      caplog, capfd):
    """`imagine-bot --no-worker` with the Redis URL, password and all, only in IMAGINE_QUEUE_URL (a
    Redis that requires the password; the config file names another queue): the bot opens that
    Redis, connects to Discord and runs until Ctrl-C, and nothing it logs, at DEBUG, shows the
    password."""
    import threading

    import redis as redis_py

    from tests.queue_fixtures import start_redis

    password = "pw-" + "x9" * 12
    redis = start_redis()
    redis_py.Redis(port=redis.port).config_set("requirepass", password)   # from now on: AUTH first
    monkeypatch.chdir(tmp_path)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    fd = asyncio.run_coroutine_threadsafe(FakeDiscord().start(), loop).result(30)
    try:
        cfg = tmp_path / "config.toml"
        cfg.write_text(f'[queue]\nurl = "sqlite:///{tmp_path / "from-config.db"}"\n[worker]\nembedded = false\n')
        env_url = f"redis://:{password}@127.0.0.1:{redis.port}/0?prefix=env-test"
        monkeypatch.setenv("IMAGINE_QUEUE_URL", env_url)
        monkeypatch.setenv("DISCORD_TOKEN", fd.bot_token)
        caplog.set_level(logging.DEBUG)
        code, _ = _run_main_until_commands(fd, ["--config", str(cfg), "--log-level", "debug"])
        assert code == 0
        assert f"queue redis://:***@127.0.0.1:{redis.port}/0?prefix=env-test" in caplog.messages
        assert not (tmp_path / "from-config.db").exists()   # the config file's queue was never opened
        out, err = capfd.readouterr()
        for text in (caplog.text, "\n".join(caplog.messages), out, err):
            assert password not in text and env_url not in text
        assert fd.bot_token not in caplog.text
    finally:
        asyncio.run_coroutine_threadsafe(fd.close(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        redis.stop()


# --- known_sha256 and the trust message ------------------------------------------------------------


def test_the_bots_loader_trusts_a_decoder_by_its_hash_in_known_sha256(tiny_model_files, tmp_path):
    """A local decoder pickle nobody vouched for is refused with what to set in config.toml (not a
    command-line flag the bot does not have); listed in [worker] known_sha256 it loads."""
    from bot.launcher import default_models_loader
    from engine import models as m

    f = tiny_model_files
    digest = m.sha256_of(f.decoder_pickle)
    # CLIP as a plain state dict (it loads without trust): the decoder's refusal is the subject.
    base = (f'[worker]\nclip_model = "{f.clip_state_dict}"\ndecoder = "{f.decoder_pickle}"\n'
            f'encoder = ""\ndevice = "cpu"\ncache_dir = "{tmp_path / "cache"}"\n')
    path = tmp_path / "config.toml"
    path.write_text(base)
    with pytest.raises(m.UntrustedPickleError) as err:
        default_models_loader(load_config(path).worker)()
    message = str(err.value)
    assert digest in message and "[worker] trust_decoder = true" in message and "[worker] known_sha256" in message
    assert "--trust-decoder" not in message and "models.known_sha256" not in message
    assert not list((tmp_path / "cache").glob("dvae/*.safetensors"))   # nothing was unpickled

    path.write_text(base + f'known_sha256 = ["{"0" * 64}", "{digest.upper()}"]\n')   # any case
    models = default_models_loader(load_config(path).worker)()
    assert isinstance(models.decoder, m.Decoder) and models.encoder is None and str(models.device) == "cpu"
    assert list((tmp_path / "cache").glob("dvae/decoder-*.safetensors"))   # cached: not unpickled again


@pytest.mark.asyncio
async def test_the_bot_says_how_to_trust_a_decoder_when_it_refuses_one(tiny_model_files, tmp_path, monkeypatch,
                                                                       capsys):
    f = tiny_model_files
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[queue]\nurl = "sqlite:///{tmp_path / "q.db"}"\n'
                   f'[worker]\nclip_model = "{f.clip_state_dict}"\ndecoder = "{f.decoder_pickle}"\n'
                   f'encoder = ""\ndevice = "cpu"\ncache_dir = "{tmp_path / "cache"}"\n')
    assert await _main_against_the_fake(["--config", str(cfg)], monkeypatch) == 2   # a setting to fix
    err = capsys.readouterr().err
    assert "refusing to unpickle" in err and "[worker] known_sha256" in err and "--trust-decoder" not in err


# --- the first run: no config.toml, commands registered once --------------------------------------


def test_without_config_toml_the_bot_uses_the_defaults_but_a_named_config_must_exist(tmp_path, monkeypatch):
    from bot.__main__ import build_parser, load

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DISCORD_TOKEN", GOOD_TOKEN)
    config, _ = load(build_parser().parse_args([]))
    assert config == Config()
    (tmp_path / "config.toml").write_text("[imagine]\ncutn = 5\n")     # ./config.toml is read when there
    config, _ = load(build_parser().parse_args(["run"]))
    assert config.imagine.cutn == 5
    with pytest.raises(ConfigError, match="not found"):
        load(build_parser().parse_args(["--config", str(tmp_path / "other.toml")]))

    # A real process in an empty folder gets past the config to the next thing it needs.
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = _cli([], None, empty)
    assert proc.returncode == 2 and "DISCORD_TOKEN is not set" in proc.stderr and "config" not in proc.stderr


def _run_main_until_commands(fd: FakeDiscord, argv: list[str]) -> tuple[int, int]:
    """main(argv) in this (the main) thread, as `make run` runs it (the fake serves from another
    thread); once the bot is ready (its on_ready logged; it connects after its start-up check of the
    commands), SIGINT (Ctrl-C) stops it. Returns (exit code, PUTs of the global commands during the run)."""
    import os
    import signal
    import threading
    import time

    commands = f"/applications/{fd.application_id}/commands"
    done, ready = threading.Event(), threading.Event()

    class ReadyLine(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("logged in as "):   # bot.client's on_ready
                ready.set()

    def puts() -> int:
        return len([r for r in list(fd.requests) if r.method == "PUT" and r.path.endswith(commands)])

    puts_before = puts()

    def stop_when_ready() -> None:
        deadline = time.monotonic() + 60
        while not done.is_set() and time.monotonic() < deadline:
            if ready.wait(0.05):   # connected after the check: the PUT, if any, came before
                break
        if not done.is_set():   # ready, or never (then stopped all the same, and failed below)
            os.kill(os.getpid(), signal.SIGINT)   # the bot's handler cancels its run

    handler = ReadyLine(logging.INFO)
    client_log = logging.getLogger("bot.client")
    client_log.addHandler(handler)
    watcher = threading.Thread(target=stop_when_ready, daemon=True)
    watcher.start()
    try:
        code = main(argv)
    finally:
        done.set()
        watcher.join(5)
        client_log.removeHandler(handler)
        _drop_discord_log_handlers()
    assert ready.is_set(), "the bot never logged that it was ready"
    return code, puts() - puts_before


def test_the_first_start_without_config_registers_the_commands_once(tmp_path, monkeypatch, caplog):
    """`DISCORD_TOKEN=... make run` in a fresh checkout: no config.toml, no commands on Discord yet.
    The bot runs on the defaults, registers its commands globally (one GET, one PUT), and a second
    start finds them and does not PUT again. On this host without CUDA the default device "auto"
    also means no embedded worker, said in a warning."""
    import threading

    import torch

    from bot.launcher import NO_GPU_WARNING

    monkeypatch.chdir(tmp_path)   # the default queue, imagine-bot.db, lands here
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    fd = asyncio.run_coroutine_threadsafe(FakeDiscord().start(), loop).result(30)
    try:
        monkeypatch.setenv("DISCORD_TOKEN", fd.bot_token)
        caplog.set_level(logging.INFO)
        # With a GPU the default would load the real models: keep this test to the Discord side there.
        argv = ["--no-worker"] if torch.cuda.is_available() else []
        code, puts = _run_main_until_commands(fd, argv)
        assert code == 0 and puts == 1
        names = {c["name"] for c in fd.global_commands}
        assert names == {"imagine", "queue", "queue-admin", "history", "remix", "help"}
        assert "running with the built-in defaults" in caplog.text and "config.example.toml" in caplog.text
        assert "registered 6 global slash commands (Discord had none)" in caplog.text
        if not torch.cuda.is_available():
            assert NO_GPU_WARNING in caplog.text
        assert (tmp_path / "imagine-bot.db").exists()

        caplog.clear()
        code, puts = _run_main_until_commands(fd, argv)
        assert code == 0 and puts == 0                      # registered already: no PUT
        assert {c["name"] for c in fd.global_commands} == names
        assert "registered" not in caplog.text and "differ" not in caplog.text
        assert fd.bot_token not in caplog.text
        fd.assert_clean()
    finally:
        asyncio.run_coroutine_threadsafe(fd.close(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


async def test_a_changed_command_set_is_only_reported_not_synced(caplog):
    """Commands on Discord that differ from the bot's (by name) stay as they are: `imagine-bot sync`
    is how they change; the log says so."""
    from bot.client import ImagineBot
    from bot.launcher import sync_if_unregistered

    caplog.set_level(logging.INFO)
    async with FakeDiscord() as fd:
        fd.global_commands.append({"id": str(fd.snowflake()), "application_id": str(fd.application_id),
                                   "name": "imagine", "description": "old", "type": 1, "version": "1",
                                   "options": [], "default_member_permissions": None})
        bot = ImagineBot(config=Config(), queue=None, background=False)
        async with bot:
            await bot.login(fd.bot_token)
            assert await sync_if_unregistered(bot) is None
        assert not fd.find_requests("PUT")
        assert [c["name"] for c in fd.global_commands] == ["imagine"]
        assert "differ from this bot's" in caplog.text and "imagine-bot sync" in caplog.text


async def test_commands_changed_by_the_config_are_named_after_a_restart(caplog):
    """Registered by one bot; a restart with the same config finds nothing to report; one whose
    sizes and limits changed (so /imagine's and /remix's options did) names exactly those."""
    from bot.client import ImagineBot
    from bot.launcher import sync_if_unregistered

    caplog.set_level(logging.INFO)
    async with FakeDiscord() as fd:
        for config in (Config(), Config(), config_from_dict({"imagine": {"max_iterations": 2000}})):
            caplog.clear()
            bot = ImagineBot(config=config, queue=None, background=False)
            async with bot:
                await bot.login(fd.bot_token)
                await sync_if_unregistered(bot)
            warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
            if config.imagine.max_iterations == 2000:
                assert len(warnings) == 1 and "imagine-bot sync" in warnings[0], warnings
                named = warnings[0].split("(")[1].split(":")[0]
                assert set(named.split(", ")) == {"/imagine", "/remix"}, named
            else:
                assert warnings == [], warnings
        assert len(fd.find_requests("PUT")) == 1   # registered once, by the first; never again


# --- settings that used to pass here and fail later with a traceback ----------------------------------


@pytest.mark.parametrize("toml, message", [
    ('[worker]\ndevice = "gpu"', "[worker] device: expected auto, cpu, cuda or cuda:N (cuda:1 ...), got 'gpu'"),
    ('[worker]\ndevice = "cuda:x"', "[worker] device: expected auto, cpu, cuda or cuda:N"),
    ('[worker]\ncompile = "foo"', "[worker] compile 'foo': torch has no backend 'foo' (known: "),
    ('[worker]\ncompile = "foo:reduce-overhead"', "[worker] compile 'foo:reduce-overhead': a mode is inductor's"),
    ('[worker]\ncompile = "inductor:reduce-overhead"\ncuda_graphs = true',
     "[worker] cuda_graphs with compile 'inductor:reduce-overhead': reduce-overhead makes CUDA graphs of its own"),
    ('[worker]\ncompile = "inductor:max-autotune"\ncuda_graphs = true',
     "[worker] cuda_graphs with compile 'inductor:max-autotune': max-autotune makes CUDA graphs of its own"),
    ('[worker]\ncuda_graphs = "yes"', "[worker] cuda_graphs"),
])
def test_a_device_or_compile_backend_torch_does_not_have_is_refused_in_one_line(tmp_path, toml, message):
    path = tmp_path / "config.toml"
    path.write_text(toml + "\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1"])
def test_the_devices_the_worker_takes_are_accepted(device):
    assert config_from_dict({"worker": {"device": device}}).worker.device == device


@pytest.mark.parametrize("setting", ["", "auto", "inductor", "inductor:reduce-overhead", "eager", "aot_eager"])
def test_compile_backends_torch_has_are_accepted(setting):
    assert config_from_dict({"worker": {"compile": setting}}).worker.compile == setting


def test_cuda_graphs_are_off_by_default_and_go_with_compile_auto():
    assert config_from_dict({}).worker.cuda_graphs is False   # experimental: not yet measured on a GPU
    assert config_from_dict({"worker": {"cuda_graphs": True}}).worker.cuda_graphs is True


def test_the_embedded_worker_compiles_on_cuda_by_default():
    """`auto`: inductor on a CUDA device with a C compiler (measured to pay), nothing on a CPU."""
    assert config_from_dict({}).worker.compile == "auto"


def test_finished_jobs_are_pruned_after_30_days_by_default():
    """Kept for ever (the old default 0), every finished job's 48-192 MiB state.pt filled the disk."""
    assert Config().worker.keep_days == 30.0
    assert config_from_dict({"worker": {"keep_days": 0}}).worker.keep_days == 0   # 0 still means never


def test_final_states_are_pruned_after_7_days_by_default():
    """Each finished job's state.pt (48-192 MiB, for Continue / Remix) goes after 7 days; the job, 30."""
    assert Config().worker.keep_state_days == 7.0
    assert config_from_dict({"worker": {"keep_state_days": 0}}).worker.keep_state_days == 0   # as the job
    assert config_from_dict({"worker": {"keep_state_days": 3}}).worker.keep_state_days == 3.0


def test_kept_states_have_no_budget_unless_one_is_set():
    """[worker] keep_state_gib: 0 (no budget, as before it existed) by default; GiB, fractions too."""
    assert Config().worker.keep_state_gib == 0
    assert config_from_dict({"worker": {"keep_state_gib": 20}}).worker.keep_state_gib == 20.0
    assert config_from_dict({"worker": {"keep_state_gib": 0.5}}).worker.keep_state_gib == 0.5


@pytest.mark.parametrize("command", [[], ["sync"]])
def test_an_unreachable_discord_is_one_line_exit_1_and_never_shows_the_token(tmp_path, command):
    """A DNS or connect failure used to end in aiohttp's ClientConnectorDNSError traceback. Exit 1:
    nothing in the settings is wrong (2 is for those); a supervisor restarts the bot later."""
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[worker]\nembedded = false\n[queue]\nurl = "sqlite:///{tmp_path}/q.db"\n')
    code = ("import sys, discord.http; discord.http.Route.BASE = 'http://127.0.0.1:1/api/v10'; "
            "from bot.__main__ import main; sys.exit(main(sys.argv[1:]))")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "DISCORD_TOKEN": GOOD_TOKEN}
    proc = subprocess.run([sys.executable, "-c", code, "--config", str(cfg), *command], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    ours = [line for line in proc.stderr.splitlines() if line.startswith("imagine-bot:")]
    assert len(ours) == 1 and ours[0].startswith("imagine-bot: cannot reach Discord at 127.0.0.1:1: "), proc.stderr
    assert "Traceback" not in proc.stderr and GOOD_TOKEN not in proc.stderr + proc.stdout
    assert GOOD_TOKEN.split(".")[0] not in proc.stderr + proc.stdout


@pytest.mark.parametrize("imagine, message", [
    ({"sizes": {"²": 32}}, "[imagine] sizes.²: the key must be a size in pixels"),
    ({"sizes": {"0512": 64, "256": 32}, "default_size": 256}, "[imagine] sizes.0512: the key must be a size"),
    ({"sizes": {"５１２": 64, "256": 32}, "default_size": 256}, "the key must be a size in pixels"),
    ({"sizes": {"256": 32, "8192": 1024}}, "[imagine] sizes.8192: the grid must be between 2 and 128"),
    ({"cutn": 100_000}, "[imagine] cutn: must be between 1 and 256"),
])
def test_sizes_and_cutn_that_could_never_work_are_refused_in_one_line(imagine, message):
    """Each of these loaded before: "²" then crashed int() with a traceback, "0512" offered a size
    the bot could not find (KeyError at /imagine), and no grid or cutn was too big."""
    with pytest.raises(ConfigError) as err:
        config_from_dict({"imagine": imagine})
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


@pytest.mark.parametrize("sizes, message", [
    # The tests' own config used to be this: 64- and 128-pixel pictures offered as 256 and 512.
    ({"256": 8, "512": 16}, "[imagine] sizes.256: a grid of 8 makes 64×64 pictures, not 256×256; "
                            "the key must be 8 × grid (\"64\" = 8, or \"256\" = 32 for 256×256 pictures)"),
    ({"256": 32, "512": 32}, "[imagine] sizes.512: a grid of 32 makes 256×256 pictures, not 512×512"),
    ({"1024": 64}, "[imagine] sizes.1024: a grid of 64 makes 512×512 pictures, not 1024×1024; the key must be "
                   "8 × grid (\"512\" = 64, or \"1024\" = 128 for 1024×1024 pictures)"),
    ({"8": 2}, "[imagine] sizes.8: a grid of 2 makes 16×16 pictures, not 8×8; the key must be 8 × grid (\"16\" = 2)"),
    ({"4096": 64}, "the key must be 8 × grid (\"512\" = 64)"),   # 4096 = 8 × 512: past MAX_GRID, not offered
])
def test_a_size_whose_key_is_not_eight_times_its_grid_exits_2_naming_both(tmp_path, monkeypatch, capsys,
                                                                            sizes, message):
    """The key is only the label users pick in /imagine and see in the reply; the picture is 8 × grid
    pixels a side whatever it says. Nothing checked the two agreed: `"256" = 8` made 64×64 pictures
    labelled 256×256. Such a config is now refused at start, in one line, exit 2."""
    with pytest.raises(ConfigError) as err:
        config_from_dict({"imagine": {"sizes": sizes, "default_size": int(next(iter(sizes)))}})
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)

    cfg = tmp_path / "config.toml"
    table = ", ".join(f'"{key}" = {grid}' for key, grid in sizes.items())
    cfg.write_text(f"[imagine]\nsizes = {{ {table} }}\ndefault_size = {next(iter(sizes))}\n")
    monkeypatch.setenv("DISCORD_TOKEN", GOOD_TOKEN)
    assert main(["--config", str(cfg)]) == 2
    err_text = capsys.readouterr().err
    assert err_text.startswith(f"imagine-bot: {cfg}: [imagine] sizes.") and message in err_text, err_text


@pytest.mark.parametrize("sizes", [{"16": 2}, {"64": 8, "128": 16}, {"256": 32, "512": 64}, {"1024": 128},
                                   {"256": 32, "384": 48, "512": 64}])
def test_sizes_whose_key_is_eight_times_the_grid_are_accepted(sizes):
    default = min(sizes, key=int)
    presets = {name: {"size": int(default), "iterations": 1, "cutn": 1} for name in ("draft", "normal", "best")}
    cfg = config_from_dict({"imagine": {"sizes": sizes, "default_size": int(default)}, "presets": presets})
    assert cfg.imagine.sizes == sizes
    assert all(cfg.grid_for(size) * 8 == size for size in cfg.size_choices)


def test_the_test_harness_config_and_the_defaults_offer_honest_sizes(tmp_path):
    """tests/test_bot_support's config (every end-to-end test's) and the built-in defaults both load
    (their presets name offered sizes) and label each size with the pictures it makes."""
    from tests.test_bot_support import test_config as harness_config

    for cfg in (Config(), harness_config(tmp_path)):
        assert all(cfg.grid_for(size) * 8 == size for size in cfg.size_choices), cfg.imagine.sizes
        assert {cfg.presets.get(name).size for name in ("draft", "normal", "best")} <= set(cfg.size_choices)
    assert harness_config(tmp_path).size_choices == [64, 128]


@pytest.mark.parametrize("value", ["5", f'"{GOOD_TOKEN}"', '["token"]'])
def test_a_discord_key_that_is_not_a_table_exits_2_in_one_line(tmp_path, value):
    """`discord = 5` crashed the token pre-check (`"token" in 5`: TypeError, exit 1), and a string
    made `in` a substring test; now the usual type error, naming the file, the token masked."""
    cfg = tmp_path / "config.toml"
    cfg.write_text(f"discord = {value}\n")
    proc = _cli(["--config", str(cfg)], GOOD_TOKEN, ROOT)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"imagine-bot: {cfg}: [discord]: expected a table, got "), proc.stderr
    assert "Traceback" not in proc.stderr and GOOD_TOKEN not in proc.stderr


def test_config_errors_name_the_file_and_an_empty_config_path_is_refused(tmp_path, monkeypatch, capsys):
    cfg = tmp_path / "bot.toml"
    for toml, message in [("[imagine]\nmax_prompt_chars = \"500\"", "[imagine] max_prompt_chars: expected an integer"),
                          ("[imagine]\nmax_iterations = 0", "[imagine] max_iterations: must be at least 1"),
                          ("colour = 1", "unknown key in the top level: colour"),
                          ("[discord]\ntoken = \"x\"", "the token does not belong in the config file")]:
        cfg.write_text(toml)
        with pytest.raises(ConfigError) as err:
            load_config(cfg)
        assert str(err.value).startswith(f"{cfg}: {message}"), str(err.value)
        monkeypatch.setenv("DISCORD_TOKEN", GOOD_TOKEN)
        assert main(["--config", str(cfg)]) == 2
        assert capsys.readouterr().err.startswith(f"imagine-bot: {cfg}: {message}")

    # `--config "$CONFIG"` with CONFIG unset: not ./config.toml (here a valid one) in its place.
    from bot.__main__ import build_parser, load

    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.toml").write_text("")
    for argv in (["--config", ""], ["sync", "--config", " "]):
        with pytest.raises(ConfigError, match=r"^--config: expected a config file's path, got an empty string"):
            load(build_parser().parse_args(argv))
    proc = _cli(["--config", ""], GOOD_TOKEN, tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("imagine-bot: --config: expected"), proc.stderr
    # Likewise `--queue "$QUEUE_URL"`: not ./imagine-bot.db while the workers wait on Redis.
    for argv in (["--queue", ""], ["sync", "--queue", " "]):
        with pytest.raises(ConfigError, match=r"^--queue: expected a queue URL, got an empty string \(an unset"):
            load(build_parser().parse_args(argv))


@pytest.mark.parametrize("toml", [f'[discord]\nadmin_roles = "{GOOD_TOKEN}"', f'[discord]\nsync_guild = "{GOOD_TOKEN}"',
                                  f'[worker]\nembedded = "{GOOD_TOKEN}"', f'[worker]\nknown_sha256 = "{GOOD_TOKEN}"',
                                  f'[imagine]\nsizes = "{GOOD_TOKEN}"', f'[progress]\ntoken_ttl = "{GOOD_TOKEN}"',
                                  f'[presets]\ndraft = "{GOOD_TOKEN}"', f'[discord]\n"{GOOD_TOKEN}" = 1'])
def test_a_token_pasted_under_a_wrong_key_is_never_echoed(tmp_path, toml):
    cfg = tmp_path / "config.toml"
    cfg.write_text(toml)
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    assert GOOD_TOKEN not in str(err.value) and "***" in str(err.value), str(err.value)


@pytest.mark.parametrize("guild", ["0", "-5"])
def test_sync_guild_must_be_a_server_id(guild, capsys):
    """`sync --guild 0` synced globally (0 is falsy) and `--guild -5` went to Discord: refused as
    --clear-guild's are; a negative [discord] sync_guild too (0 there is the default: globally)."""
    with pytest.raises(SystemExit) as exit_:
        main(["sync", "--guild", guild])
    assert exit_.value.code == 2
    assert f"argument --guild: expected a server id (a positive number), got {guild}" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"^\[discord\] sync_guild: expected a server id, got -5"):
        config_from_dict({"discord": {"sync_guild": -5}})
    assert config_from_dict({"discord": {"sync_guild": 0}}).discord.sync_guild == 0
