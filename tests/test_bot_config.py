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
    ("[discord]\nadmin_roles = \"Admin\"", "[discord] admin_roles: expected a list"),
    ("[discord]\nshard_count = -1", "[discord] shard_count: must not be negative, got -1 (0: as many shards as Discord recommends)"),
    ("[discord]\nshard_count = \"2\"", "[discord] shard_count: expected an integer, got '2'"),
    ("[discord]\nshard_count = 2.0", "[discord] shard_count: expected an integer, got 2.0"),
    ("[discord]\nshard_count = 100000", "[discord] shard_count: 100000 is more than 1024 shards"),
    ("[imagine]\nsizes = { \"256\" = \"32\" }", "[imagine] sizes.256: expected an integer"),
    ("[imagine]\ndefault_size = 1024", "[imagine] default_size: 1024 is not one of sizes"),
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
    ("[worker]\ncompile = \"inductor:fast\"", "[worker] compile 'inductor:fast': the mode must be one of default, "
                                              "reduce-overhead, max-autotune"),
    ("[worker]\ncompile = \"eager:reduce-overhead\"", "[worker] compile 'eager:reduce-overhead': a mode is inductor's"),
    ("[worker]\ncompile = true", "[worker] compile: expected a string, got True"),
])
def test_bad_config_values_name_the_key(tmp_path, toml, message):
    path = tmp_path / "config.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert message in str(err.value)


@pytest.mark.parametrize("days", [0, 1 / 24, 0.5, 30])
def test_keep_days_is_zero_for_never_or_at_least_an_hour(days):
    # Pruning also deletes uploads no job names yet once they are keep_days old: a window of seconds
    # could delete a picture between the bot storing it and submitting its job.
    assert config_from_dict({"worker": {"keep_days": days}}).worker.keep_days == days


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
        assert set(commands) == {"imagine", "queue", "history", "remix", "help"}
        assert fd.global_commands == []
        imagine = {o["name"]: o for o in commands["imagine"]["options"]}
        assert imagine["prompt"]["required"] is True
        assert [c["value"] for c in imagine["size"]["choices"]] == [256, 512]
        subs = {o["name"] for o in commands["queue"]["options"]}
        assert subs == {"show", "cancel", "clear", "pause", "resume", "limit", "ban-word"}
        assert fd.bot_token not in caplog.text
        fd.assert_clean()

        # A token Discord rejects: exit 2, said plainly.
        monkeypatch.setenv("DISCORD_TOKEN", GOOD_TOKEN)
        code = await asyncio.to_thread(main, ["--config", str(cfg), "sync"])
        assert code == 2
        assert GOOD_TOKEN not in caplog.text
        logging.getLogger().handlers[:] = [h for h in logging.getLogger().handlers
                                           if type(h).__module__.startswith("_pytest")]


def test_a_worker_that_cannot_load_its_models_stops_the_launch_with_a_clear_message(tmp_path, monkeypatch, capsys):
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[queue]\nurl = "sqlite:///{tmp_path / "q.db"}"\n'
                   f'[worker]\nclip_model = "{tmp_path / "missing-clip.pt"}"\ncache_dir = "{tmp_path}"\n')
    monkeypatch.setenv("DISCORD_TOKEN", GOOD_TOKEN)
    assert main(["--config", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert "the embedded worker could not load its models" in err and "missing-clip.pt" in err
    assert GOOD_TOKEN not in err
    logging.getLogger().handlers[:] = [h for h in logging.getLogger().handlers
                                       if type(h).__module__.startswith("_pytest")]
