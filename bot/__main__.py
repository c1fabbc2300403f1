"""`imagine-bot` / `python -m bot`: run the Discord bot, or sync its slash commands.

    imagine-bot [--config config.toml] [--queue URL] [--log-level INFO]          # run
                [--no-worker] [--http-port PORT] [--http-host HOST]
    imagine-bot sync [--guild ID | --global | --clear-guild ID]                 # register commands

The token comes from the DISCORD_TOKEN environment variable only, and is never logged: the log
handler masks it, and the interaction and webhook tokens in discord.py's DEBUG lines (bot.redact). The queue
URL is --queue, else the IMAGINE_QUEUE_URL environment variable, else [queue] url (a Redis password
belongs in the variable: a command line shows in `ps`); it is logged with the password masked.
Without --config the bot reads ./config.toml, or runs on the built-in defaults when there is none
(a log line says so). A missing --config file, an invalid config or token, a queue that cannot be opened,
models the embedded worker cannot load, an HTTP port already taken, a shard count Discord refuses
or another bot running on the same store (its bot lease still renewed after the wait for it to
lapse: bot.launcher.BotLease) exits with status 2 and a message that says what to fix. A Discord
that cannot be reached (DNS, network, proxy), or that answers with a server error (a 5xx at login or
at GET /gateway/bot: an outage), exits with status 1 and one line: nothing in the settings is wrong,
so a supervisor that restarts on failure tries again later. So do an embedded worker whose GPU
thread died, a store that fails as the bot takes its bot lease, and a bot whose lease another bot
took while this one's lapsed (a long store outage) (bot.launcher.run).

SIGTERM or SIGINT stops the bot: whatever it is doing (logging in, loading the models, connecting,
reconnecting the gateway) ends, the worker checkpoints and hands back its running jobs, exit status 0.
A second signal while that runs stops the process at once with 128 + the signal's number (130 for
Ctrl-C, 143 for SIGTERM: what a shell reports for a process the signal killed), handing nothing back:
the running jobs' leases expire and another worker resumes them from their last checkpoints, as
after kill -9. It is not 0, so that a supervisor does not take the stop for a clean one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
import discord

from bot import redact
from bot.config import QUEUE_URL_ENV, Config, ConfigError, check_token, choose_queue_url, load_config
from bot.launcher import LaunchError
from engine import package_version
from engine.stopping import exit_if_abandoned, exit_now

EXIT_CONFIG = 2
EXIT_UNREACHABLE = 1   # Discord unreachable: transient, a restart later may work; no setting to fix
DEFAULT_CONFIG = "config.toml"   # read when present and no --config is given
EXAMPLE_CONFIG = Path(__file__).resolve().parents[1] / "config.example.toml"   # in a source checkout
log = logging.getLogger("bot")


def _common(parser: argparse.ArgumentParser, suppress: bool) -> None:
    default = argparse.SUPPRESS if suppress else None
    parser.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS if suppress else None,
                        help="the config file (default: ./config.toml if it exists, else the built-in "
                             "defaults; see config.example.toml)")
    parser.add_argument("--queue", metavar="URL", default=default,
                        help=f"queue URL (sqlite:///file.db or redis://host:6379/0); overrides ${QUEUE_URL_ENV}, "
                             "which overrides [queue] url (put a Redis password in the variable: a "
                             "command line is visible to every local user)")
    parser.add_argument("--log-level", metavar="LEVEL", default=default,
                        choices=["CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG"], type=str.upper,
                        help="logging level (default: log_level from the config, else INFO)")


def _run_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    default = argparse.SUPPRESS if suppress else None
    parser.add_argument("--no-worker", action="store_true", default=argparse.SUPPRESS if suppress else False,
                        help="run no GPU worker inside the bot (overrides [worker] embedded; "
                             "the jobs go to imagine-worker processes)")
    parser.add_argument("--http-port", type=int, metavar="PORT", default=default,
                        help="serve /healthz and /metrics on this port (overrides [http] port; 0: off, "
                             "the default)")
    parser.add_argument("--http-host", metavar="HOST", default=default,
                        help="address for --http-port (overrides [http] host, default 127.0.0.1; "
                             "0.0.0.0 in a container)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imagine-bot",
        description="A Discord bot: /imagine a prompt, watch CLIP steer DALL-E's decoder. "
                    "The bot token is read from the DISCORD_TOKEN environment variable.",
    )
    _common(parser, suppress=False)
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    _run_options(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", metavar="{run,sync}")
    run_p = sub.add_parser("run", help="run the bot (the default)")
    _common(run_p, suppress=True)
    _run_options(run_p, suppress=True)
    sync_p = sub.add_parser("sync", help="register the slash commands with Discord, then exit")
    _common(sync_p, suppress=True)
    # One target a run: argparse refuses two of them with a usage line and exit status 2.
    target = sync_p.add_mutually_exclusive_group()
    target.add_argument("--guild", type=_guild_id, metavar="ID", default=None,
                        help="sync to one server only (instant; for testing) instead of globally "
                             "(default: [discord] sync_guild, when set)")
    target.add_argument("--global", dest="global_scope", action="store_true",
                        help="sync globally even when [discord] sync_guild is set")
    target.add_argument("--clear-guild", type=_guild_id, metavar="ID", default=None,
                        help="remove this bot's commands from one server (its own copies, say of an old "
                             "`sync --guild`, which show next to the global ones); registers nothing")
    return parser


def _guild_id(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a server id (a positive number), got {text}")
    return value


_guild_id.__name__ = "server id"   # argparse names it on a ValueError: "invalid server id value: 'x'"


def uses_defaults(args: argparse.Namespace) -> bool:
    """No --config and no ./config.toml: the bot runs on the built-in defaults."""
    return args.config is None and not Path(DEFAULT_CONFIG).exists()


def defaults_note() -> str:
    example = str(EXAMPLE_CONFIG) if EXAMPLE_CONFIG.is_file() else "config.example.toml (in imagine-bot's sources)"
    return (f"no {DEFAULT_CONFIG} in {Path.cwd()}: running with the built-in defaults; copy {example} "
            f"to {DEFAULT_CONFIG} (or pass --config PATH) to change them")


def load(args: argparse.Namespace) -> tuple[Config, str]:
    # An explicit --config must exist; the default ./config.toml may be absent (first run). An empty
    # one (`--config "$CONFIG"` with CONFIG unset) is refused, not taken for ./config.toml.
    if args.config is not None and not args.config.strip():
        raise ConfigError("--config: expected a config file's path, got an empty string (an unset variable?); "
                          "leave --config out to read ./config.toml")
    if args.queue is not None and not args.queue.strip():
        # `--queue "$QUEUE_URL"` with QUEUE_URL unset: not the next source in line (./imagine-bot.db
        # at the end), where the bot would queue jobs that the workers on Redis never see.
        raise ConfigError("--queue: expected a queue URL, got an empty string (an unset variable?); leave --queue "
                          f"out to use {QUEUE_URL_ENV} or [queue] url")
    config = Config() if uses_defaults(args) else load_config(args.config or DEFAULT_CONFIG)
    choose_queue_url(config, args.queue)   # --queue > $IMAGINE_QUEUE_URL > [queue] url
    if args.log_level:
        config.log_level = args.log_level
    if args.no_worker:
        config.worker.embedded = False
    if args.http_port is not None:
        if not 0 <= args.http_port <= 65535:
            raise ConfigError(f"--http-port: expected 0 (off) to 65535, got {args.http_port}")
        config.http.port = args.http_port
    if args.http_host is not None:
        if not args.http_host.strip():
            raise ConfigError("--http-host: must not be empty")
        config.http.host = args.http_host
    token = check_token(os.environ.get("DISCORD_TOKEN"))
    return config, token


def sync_target(args: argparse.Namespace, config: Config) -> int | None:
    """The server `sync` registers in (None: globally): --guild, else none with --global, else
    [discord] sync_guild."""
    if args.global_scope:
        return None
    return args.guild or config.discord.sync_guild or None


def _command_names(commands: list[Any]) -> str:
    return ", ".join(f"/{c.name}" for c in commands)


async def sync_commands(config: Config, token: str, guild_id: int | None) -> int:
    from bot.client import ImagineBot

    bot = ImagineBot(config=config, queue=None, background=False)
    async with bot:
        await bot.login(token)   # runs setup_hook: the cogs add their commands
        if guild_id:
            guild = discord.Object(id=guild_id)
            bot.tree.copy_global_to(guild=guild)
            synced = await bot.tree.sync(guild=guild)
            where = f"guild {guild_id}"
        else:
            synced = await bot.tree.sync()
            where = "every guild (global commands can take a while to appear)"
    note = ""
    if guild_id is None and config.discord.sync_guild:
        # A start checks (and registers in) that server, not the global set: it would keep its copies.
        note = (f"; [discord] sync_guild is {config.discord.sync_guild}: set it to 0 and run `imagine-bot sync "
                f"--clear-guild {config.discord.sync_guild}`, or that server lists each command twice")
    print(f"synced {len(synced)} commands to {where}: {_command_names(synced)}{note}")
    return 0


async def clear_guild_commands(config: Config, token: str, guild_id: int) -> int:
    """Put an empty command list to one server: its own copies go, the global commands stay."""
    from bot.client import ImagineBot

    bot = ImagineBot(config=config, queue=None, background=False)
    async with bot:
        await bot.login(token)
        guild = discord.Object(id=guild_id)
        registered = await bot.tree.fetch_commands(guild=guild)   # a read: no update spent for nothing
        if registered:
            bot.tree.clear_commands(guild=guild)   # the tree's copies for that server: none, so the PUT sends []
            await bot.tree.sync(guild=guild)
    if registered:
        done = f"removed {len(registered)} commands from guild {guild_id}: {_command_names(registered)}"
    else:
        done = f"guild {guild_id} has none of this bot's own commands: nothing to remove"
    note = ""
    if guild_id == config.discord.sync_guild:
        note = "; [discord] sync_guild still names it: set it to 0, or the next start registers them there again"
    print(f"{done} (the global commands stay){note}")
    return 0


async def _run_until_signal(config: Config, token: str) -> int:
    from bot.launcher import run

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal(signum: int) -> None:
        if stop.is_set():   # the stop is under way (checkpoints, hand-back) and not wanted any more
            exit_now(signum)
        log.info("stopping (%s); a second signal stops at once, without handing back the running jobs",
                 signal.Signals(signum).name)
        stop.set()   # run() ends whatever it is doing, discord.py's reconnects included

    for sig in (signal.SIGTERM, signal.SIGINT):
        # NotImplementedError: no signals here (Windows); RuntimeError: not the main thread
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, on_signal, sig)
    return await run(config, token, stop)


def gateway_error(code: int, shard_count: int) -> str | None:
    """What to do about a gateway close code that a reconnect cannot mend: a revoked token, too few
    shards (None: another close)."""
    if code == 4004:   # Authentication failed: the token was reset or revoked while the bot ran
        return ("Discord closed the gateway with 4004 (authentication failed): the token in DISCORD_TOKEN "
                "was reset or revoked; copy the new one from the Developer Portal (Bot > Reset Token)")
    if code == 4011:   # Sharding required
        if shard_count:
            return (f"Discord closed the gateway with 4011 (sharding required): [discord] shard_count = "
                    f"{shard_count} is too few shards for this bot's guilds; set shard_count = 0 to use "
                    "Discord's recommendation, or a larger count")
        return ("Discord closed the gateway with 4011 (sharding required) although the bot asked for "
                "Discord's recommended shard count; start it again")
    if code == 4010:   # Invalid shard
        return (f"Discord closed the gateway with 4010 (invalid shard) for [discord] shard_count = "
                f"{shard_count}; set shard_count = 0 to use Discord's recommendation")
    return None


def unreachable(exc: BaseException, token: str) -> str:
    """One line for a Discord that cannot be reached: where, and the network's reason (never the token)."""
    from discord.http import Route

    os_error = getattr(exc, "os_error", None)
    if isinstance(os_error, OSError):
        reason = os_error.strerror or str(os_error)
    else:
        reason = str(exc)
    reason = " ".join(reason.split()) or type(exc).__name__
    host = getattr(exc, "host", None)
    where = f"{host}:{getattr(exc, 'port', 443)}" if host else Route.BASE
    message = (f"cannot reach Discord at {where}: {reason}; check this host's network, DNS and proxy "
               "(and https://discordstatus.com)")
    return message.replace(token, "***") if token else message


def outage(exc: BaseException) -> bool:
    """Whether Discord's error answer is an outage (a 5xx, or a 429: try again later, exit 1) rather
    than a setting to fix (any other 4xx, say 403 Missing Access for `sync --guild` with a guild the
    bot is not in: exit 2). An error with no status is taken for an outage."""
    status = getattr(exc, "status", 0) if isinstance(exc, discord.HTTPException) else 0
    return isinstance(exc, discord.DiscordServerError) or not status or status >= 500 or status == 429


def server_error(exc: BaseException, token: str) -> str:
    """One line for Discord answering a start-up (or sync) request with an error that is not the
    token's: an outage (a 5xx; discord.py has already retried 500, 502, 504 and 524 four times; or a
    429), or another 4xx, which names a setting to fix."""
    response = getattr(exc, "response", None)
    status = getattr(exc, "status", 0) if isinstance(exc, discord.HTTPException) else 0
    if status and response is not None:
        url = getattr(response, "url", None)
        request = f"{getattr(response, 'method', '')} {url.path if url is not None else ''}".strip()
        detail = " ".join((exc.text or "").split())   # type: ignore[attr-defined]
        answer = f"{status} {getattr(response, 'reason', '') or ''}".strip() + (f" ({detail})" if detail else "")
        message = f"Discord answered {request} with {answer}"
    else:
        message = f"Discord failed at start ({type(exc).__name__}: {exc})"
    if status == 429:
        message += "; Discord is rate-limiting this bot, not a setting: try again later"
    elif outage(exc):
        message += "; an outage on Discord's side, not a setting: try again later (https://discordstatus.com)"
    else:
        message += ("; not an outage but a setting to fix (a 403 or 404 for a guild: is the bot in that guild, "
                    "invited with the applications.commands scope? check --guild / --clear-guild / "
                    "[discord] sync_guild)")
    return message.replace(token, "***") if token else message


def main(argv: list[str] | None = None) -> int:
    code = _main(argv)
    # Stopped while the embedded worker loaded its models (or a start-up error after such a stop):
    # leave without waiting for the load's thread, which may be inside torch (engine.stopping).
    exit_if_abandoned(code)
    return code


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config, token = load(args)
    except ConfigError as exc:
        print(f"imagine-bot: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    # Interaction and webhook tokens (discord.py's DEBUG lines) and the bot token are masked.
    redact.setup_logging(getattr(logging, config.log_level.upper()), secrets=[token])
    if uses_defaults(args):
        log.info("%s", defaults_note())
    try:
        if args.command == "sync" and args.clear_guild:
            return asyncio.run(clear_guild_commands(config, token, args.clear_guild))
        if args.command == "sync":
            return asyncio.run(sync_commands(config, token, sync_target(args, config)))
        return asyncio.run(_run_until_signal(config, token))
    except LaunchError as exc:   # its message masks the queue URL's password
        # Once, on stderr (where the log goes too): not a log line and the same text again.
        print(f"imagine-bot: {exc}", file=sys.stderr)
        return exc.exit_code
    except aiohttp.ClientConnectionError as exc:   # DNS, refused, reset, timed out: no traceback
        print(f"imagine-bot: {unreachable(exc, token)}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except discord.GatewayNotFound as exc:   # GET /gateway/bot failed: its HTTPException is the cause
        cause = exc.__cause__ or exc
        print(f"imagine-bot: {server_error(cause, token)}", file=sys.stderr)
        return EXIT_UNREACHABLE if outage(cause) else EXIT_CONFIG
    except discord.LoginFailure:
        print("imagine-bot: Discord rejected the token in DISCORD_TOKEN; copy it again from the "
              "Developer Portal (Bot > Reset Token)", file=sys.stderr)
        return EXIT_CONFIG
    except discord.ConnectionClosed as exc:
        message = gateway_error(exc.code, config.discord.shard_count)
        if message is None:
            raise
        print(f"imagine-bot: {message}", file=sys.stderr)
        return EXIT_CONFIG
    except discord.HTTPException as exc:   # at login or sync: a 5xx or 429 is Discord's side, else a setting
        print(f"imagine-bot: {server_error(exc, token)}", file=sys.stderr)
        return EXIT_UNREACHABLE if outage(exc) else EXIT_CONFIG
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
