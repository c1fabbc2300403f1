"""The launcher owns the resources (queue, embedded GPU worker, aiohttp session, the /healthz and
/metrics server) and hands them to the Bot, as discord.py's examples/advanced_startup.py does.
Closing runs in reverse: the bot (its background tasks end in cog_unload), then the worker (running
jobs go back to the queue with their checkpoints), then the HTTP server, the session and the queue.

Health and metrics (`[http] port`, `--http-port`; off by default) come from
`engine.observability.Observability`: checks `discord` (every gateway shard ready or resumed, its
socket open, its heartbeat answered; the report lists each shard's state and latency), `queue`
(answers within 3 s) and, with an embedded worker, `gpu`; without one, `workers` (some GPU worker
claimed, heartbeated or announced itself within `worker_window`: two leases, at least 10 s). `workers` is advisory:
reported, and listed in `"degraded"`, but it never makes /healthz 503, because no restart of the bot
brings a worker back and the bot still takes and queues commands meanwhile (README, "Health and
metrics"). Each scrape of /metrics reads the shards into `imagine_discord_shard_connected{shard}` and
`imagine_discord_gateway_latency_seconds{shard}`, the store into `imagine_queue_jobs{state}` and the
live workers into `imagine_workers_alive`. The worker's metrics (`imagine_gpu_thread_alive`,
`imagine_jobs_running`, job counters, latency, iterations, GPU memory) are there only with an
embedded worker (`obs.track_worker`): without one the GPU work is elsewhere, and so are they.
Discord's 429s are counted by an aiohttp TraceConfig on discord.py's own HTTP session
(`http_trace`), so REST and interaction-webhook requests both count, whether discord.py retried
them or raised.

`[worker] device = "auto"` on a host without a CUDA GPU starts no embedded worker (a WARNING says
so; /healthz then has no `gpu` check, as with --no-worker): a CPU worker would claim shared jobs at
9.8 s a step (256x256, 12 cut-outs, on a 2-core CPU: docs/PERFORMANCE.md). `device = "cpu"` runs one
anyway.

`run` logs in to Discord before the embedded worker loads its models (minutes on a first start), so
a bad or revoked token fails at once; once the worker is up it registers the slash commands when
Discord has none of them (a first start), and otherwise only says when Discord's set differs from
this bot's (`imagine-bot sync` updates them); then the gateway connects. `run` stops on its `stop`
event in any of these steps, and when the embedded worker's GPU thread dies (returning 1, for the
exit status). Before it logs in it takes the store's "bot" lease (`BotLease`: one bot per store;
`imagine-worker`s do not take it), renews it while it runs and releases it as it stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Mapping, Sequence

import aiohttp
import discord

from bot.client import ImagineBot
from bot.config import PRESET_NAMES, QUEUE_URL_ENV, Config, WorkerConfig
from engine.jobs import JobQueue
from engine.observability import Check, Observability, bound_port, queue_check, worker_check, workers_check
from engine.queue import redact_secrets, redact_url, store_trouble_hint

log = logging.getLogger(__name__)


class LaunchError(RuntimeError):
    """A resource the bot needs could not be started; the message says which and why.
    `exit_code`: what `imagine-bot` exits with (2: a setting to fix, as for a bad config)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# How the bot's refusal of an untrusted decoder / encoder pickle says to trust it (engine.models).
TRUST_HINT_BOT = ("set [worker] trust_decoder = true in config.toml, or add its SHA-256 to "
                  "[worker] known_sha256")
# A worker counts as alive when it claimed, heartbeated or announced itself within two leases, but never less than
# 10 s: the Redis backend writes its worker registry at most every 5 s per worker.
MIN_WORKER_WINDOW = 10.0
NO_GPU_WARNING = ('no CUDA GPU: the embedded worker is off; set [worker] device = "cpu" to run on the '
                  "CPU anyway, or run imagine-worker on a GPU host")


def cuda_available() -> bool:
    import torch   # only when [worker] device = "auto" asks

    return bool(torch.cuda.is_available())


@dataclass
class Resources:
    config: Config
    queue: JobQueue
    http_session: aiohttp.ClientSession
    worker: Any = None   # engine.worker.Worker when embedded
    obs: Observability = field(default_factory=Observability)
    http_runner: Any = None   # aiohttp.web.AppRunner while /healthz and /metrics are served
    bot: ImagineBot | None = None   # set by make_bot; the `discord` health check looks at it
    # Where the embedded worker's stop is registered once `start_worker` has started it.
    stack: contextlib.AsyncExitStack | None = None
    worker_started: bool = False

    async def start_worker(self) -> None:
        """Start the embedded worker (it loads its models: minutes on a first start) and have it
        stopped when the resources close, before the HTTP server and the queue. No worker: nothing."""
        if self.worker is None or self.worker_started:
            return
        assert self.stack is not None
        try:
            await self.worker.start()
        except Exception as exc:  # noqa: BLE001
            raise LaunchError(
                f"the embedded worker could not load its models ({type(exc).__name__}: {exc}); "
                "check [worker] clip_model / decoder / encoder / cache_dir, or run with --no-worker ([worker] embedded = false)",
                exit_code=2,   # a setting to fix, as imagine-worker exits 2 for the same files
            ) from exc
        self.worker_started = True
        self.stack.push_async_callback(self.worker.stop)

    @property
    def http_port(self) -> int | None:
        """The port /healthz and /metrics are served on (None: no HTTP server)."""
        return bound_port(self.http_runner) if self.http_runner is not None else None


def rate_limit_trace(obs: Observability) -> aiohttp.TraceConfig:
    """Counts every HTTP 429 answer on the session it is given to (discord.py's `http_trace`)."""
    obs.export_discord_metrics()   # this process runs a Discord client: its 429 counter is exported
    trace = aiohttp.TraceConfig()

    async def on_request_end(session: Any, context: Any, params: aiohttp.TraceRequestEndParams) -> None:
        if params.response.status == 429:
            obs.discord_rate_limited()

    trace.on_request_end.append(on_request_end)
    return trace


def discord_check(resources: Resources) -> Check:
    """Connected: the bot exists and is ready, and every gateway shard is ready (or resumed), open,
    and has its heartbeats answered. The report has each shard's state and latency:
    `{"ok": false, "error": "shard 1 is not connected (disconnected)", "shards": {"0": {"state":
    "ready", "latency": 0.042}, "1": {"state": "disconnected", "latency": null}}}`."""
    async def check() -> dict[str, Any]:
        bot = resources.bot
        if bot is None:
            raise ConnectionError("the bot has not started")
        if bot.is_closed():
            raise ConnectionError("the bot is closed")
        status = bot.shard_status()
        shards = {str(i): {"state": s.state, "latency": None if s.latency is None else round(s.latency, 4)}
                  for i, s in status.items()}
        down = [i for i, s in status.items() if not s.connected]
        if not status:
            error = "no gateway shard has connected yet"
        elif down:
            error = (f"shard{'s' if len(down) > 1 else ''} {', '.join(map(str, down))} "
                     f"{'are' if len(down) > 1 else 'is'} not connected "
                     f"({', '.join(status[i].state for i in down)})")
        elif not bot.is_ready():
            error = "the gateway is not ready"
        else:
            return {"ok": True, "shards": shards}
        return {"ok": False, "error": error, "shards": shards}
    return check


def worker_window(queue: JobQueue) -> float:
    """Seconds since a GPU worker's last claim, heartbeat or announcement within which it counts as alive: two
    leases (`?lease=` in the queue URL, 30 s by default), at least MIN_WORKER_WINDOW."""
    return max(2.0 * float(getattr(queue, "lease", 30.0)), MIN_WORKER_WINDOW)


def track_shards(obs: Observability, resources: Resources) -> None:
    """Per-shard gauges, read from the bot at each scrape of /metrics; from here on /metrics has the
    `imagine_discord_*` metrics (`obs.export_discord_metrics`), which only the bot exports."""
    obs.export_discord_metrics()
    async def refresh() -> None:
        bot = resources.bot
        status = bot.shard_status() if bot is not None else {}   # closed: every shard reads 0
        obs.discord_shards({i: (s.connected, s.latency) for i, s in status.items()})
    obs.add_refresher(refresh)


def costliest_job(config: Config) -> tuple[int, int]:
    """(grid, cutn) of the costliest job the bot queues: its largest size's grid with the most
    cut-outs any of /imagine's settings asks for (memory per job grows with both)."""
    im = config.imagine
    cutn = max([im.cutn] + [getattr(config.presets, name).cutn for name in PRESET_NAMES])
    return max(im.sizes.values()), cutn


def default_models_loader(wc: WorkerConfig) -> Callable[[], Any]:
    """A zero-argument loader of the real models, as config says (imports torch when called)."""

    def load() -> Any:
        from engine.models import DEFAULT_CACHE, load_models

        device = wc.device
        if device == "auto":   # open_resources starts no worker for "auto" without CUDA
            device = "cuda" if cuda_available() else "cpu"
        cache = Path(wc.cache_dir).expanduser() if wc.cache_dir else DEFAULT_CACHE
        return load_models(wc.clip_model, wc.decoder, device, cache, wc.trust_decoder,
                           encoder=wc.encoder or None, known_sha256=frozenset(wc.known_sha256),
                           trust_hint=TRUST_HINT_BOT)

    return load


@contextlib.asynccontextmanager
async def open_resources(
    config: Config,
    *,
    models_loader: Callable[[], Any] | None = None,
    worker_options: dict[str, Any] | None = None,
    http_port: int | None = None,
    start_worker: bool = True,
) -> AsyncIterator[Resources]:
    """`http_port`: None serves HTTP as `[http] port` says (0: not at all); a number serves on it
    (0: any free port, see `Resources.http_port`). `models_loader`: what the embedded worker runs
    (tests give tiny models); None loads `[worker]`'s models on its `device`. `start_worker`: False
    leaves the embedded worker unstarted (`await resources.start_worker()` later: `run` logs in first)."""
    from engine.queue import open_queue
    from engine.queue.redis import CertificateNotVerified, unreachable

    wc = config.worker
    if wc.embedded and models_loader is None and wc.device.startswith("cuda"):
        # Before the queue, the lease and the login (as imagine-worker checks --device): else the
        # worker found out after minutes of loading models, with a hint that did not name it.
        from engine.worker import missing_cuda_device   # imports torch: only when asked for CUDA

        if missing := missing_cuda_device(wc.device):
            raise LaunchError(f"[worker] device = {wc.device!r}: {missing}; set device = \"auto\" (or \"cpu\", or "
                              "embedded = false with imagine-worker on a GPU host)", exit_code=2)

    async with contextlib.AsyncExitStack() as stack:
        url = config.queue.url
        queue = None
        try:
            queue = open_queue(url)
            await queue.start()
        except Exception as exc:  # noqa: BLE001 - say what failed, not a traceback
            if queue is not None:   # a half-started queue (a Redis pool, a SQLite connection) closed
                with contextlib.suppress(Exception):
                    await queue.close()
            # The URL may hold a password: masked here, and wherever the error quotes it.
            detail = redact_secrets(str(exc), url).strip().rstrip(".") or type(exc).__name__
            if isinstance(exc, CertificateNotVerified):   # no server trouble: it says the fix itself
                raise LaunchError(f"cannot open the queue {redact_url(url)}: {detail}", exit_code=2) from None
            # Unreachable (down, restarting): 1, as for Discord, for a supervisor to restart it; else
            # a setting to fix (a refused password, a SQLite folder), 2.
            raise LaunchError(f"cannot open the queue {redact_url(url)}: {detail}; check --queue / "
                              f"{QUEUE_URL_ENV} / [queue] url and {store_trouble_hint(url, detail)}",
                              exit_code=1 if unreachable(exc) else 2) from None
        stack.push_async_callback(queue.close)
        log.info("queue %s", redact_url(url))
        session = aiohttp.ClientSession()
        stack.push_async_callback(session.close)
        resources = Resources(config, queue, session, stack=stack)
        obs = resources.obs
        obs.track_queue(queue)
        obs.track_store(queue)
        obs.track_workers(queue, worker_window(queue))
        track_shards(obs, resources)
        worker = None
        embedded = config.worker.embedded
        if embedded and models_loader is None and config.worker.device == "auto" and not cuda_available():
            log.warning("%s", NO_GPU_WARNING)
            embedded = False
        if embedded:
            from engine.worker import Worker   # imports torch: only when the worker is embedded

            wc = config.worker
            worker = Worker(
                queue, models_loader or default_models_loader(wc),
                # max_batch 0: the worker chooses from free GPU memory (engine.capacity)
                worker_id=wc.worker_id or None, max_batch=wc.max_batch or None,
                keep_days=wc.keep_days or None, keep_state_days=wc.keep_state_days or None,
                keep_state_gib=wc.keep_state_gib or None,
                compile=wc.compile, cuda_graphs=wc.cuda_graphs, checkpoint_every=wc.checkpoint_every,
                # Sized for the costliest job this bot can queue (a "1024" = 128 size is 4x a
                # 512's memory per job), not for a 512 one.
                costliest=costliest_job(config),
                **(worker_options or {}),
            )
            resources.worker = worker
            if worker.observer is None:
                obs.track_worker(worker)
        port = (config.http.port or None) if http_port is None else http_port
        if port is not None:
            # Up before the models load: /healthz says "gpu": false until the GPU thread runs.
            checks: dict[str, Check] = {"discord": discord_check(resources), "queue": queue_check(queue)}
            advisory: set[str] = set()
            if worker is not None:
                checks["gpu"] = worker_check(worker)
            else:   # the GPU work is done elsewhere: say whether anyone is doing it
                checks["workers"] = workers_check(queue, worker_window(queue))
                advisory.add("workers")
            try:
                resources.http_runner = await obs.start_http(config.http.host, port, checks, advisory)
            except OSError as exc:
                raise LaunchError(f"cannot serve /healthz and /metrics on {config.http.host}:{port}: {exc}; "
                                  "change [http] port / --http-port", exit_code=2) from exc
            stack.push_async_callback(resources.http_runner.cleanup)
        if start_worker:
            await resources.start_worker()
        yield resources


def make_bot(resources: Resources, **kwargs: Any) -> ImagineBot:
    kwargs.setdefault("http_trace", rate_limit_trace(resources.obs))
    bot = ImagineBot(config=resources.config, queue=resources.queue, http_session=resources.http_session,
                     worker=resources.worker, **kwargs)
    resources.bot = bot
    return bot


_OPTION_FIELDS = ("type", "name", "description", "min_value", "max_value", "min_length", "max_length")


def command_shape(payload: Mapping[str, Any], *, in_guild: bool = False) -> tuple[Any, ...]:
    """What a user sees of a slash command, from Discord's raw payload or the bot's own (`to_dict`):
    its name, description and options (choices, bounds, nested options), and who may use it where
    (`command_access`); without ids, versions or localisations. `in_guild`: a server's copy."""
    def option(o: Mapping[str, Any]) -> tuple[Any, ...]:
        return (tuple(o.get(k) for k in _OPTION_FIELDS)
                + (bool(o.get("required")), bool(o.get("autocomplete")),
                   tuple((c["name"], c["value"]) for c in o.get("choices") or ()),
                   tuple(sorted(o.get("channel_types") or ())),
                   tuple(option(sub) for sub in o.get("options") or ())))
    return (payload.get("type") or 1, payload["name"], payload.get("description") or "",
            tuple(option(o) for o in payload.get("options") or ()), command_access(payload, in_guild=in_guild))


def command_access(payload: Mapping[str, Any], *, in_guild: bool = False) -> tuple[Any, ...]:
    """Who may use a command, and where, with each field Discord may leave out or null read as what
    that means, so that a freshly synced command compares equal to the bot's own: permissions (Discord
    sends a string, discord.py an int; null: everyone), nsfw (absent: false), and for a global command
    its installs (absent: guild install, Discord's default; the bot always sends [0]), its contexts
    (null: not set, so the deprecated dm_permission decides, null or absent meaning true). A server's
    copy has none of those three: Discord applies them to global commands only."""
    permissions = payload.get("default_member_permissions")
    access: tuple[Any, ...] = (None if permissions is None else int(permissions), bool(payload.get("nsfw")))
    if in_guild:
        return access
    contexts = payload.get("contexts")
    installs = payload.get("integration_types") or [0]
    return access + (tuple(sorted(set(installs))),
                     None if contexts is None else tuple(sorted(set(contexts))),
                     payload.get("dm_permission") is not False if contexts is None else None)


async def registered_commands(bot: ImagineBot, guild_id: int | None) -> Sequence[Mapping[str, Any]]:
    """Discord's own payloads of the registered commands: `tree.fetch_commands` gives AppCommands,
    whose `to_dict` leaves out default_member_permissions, nsfw and dm_permission."""
    if bot.application_id is None:   # set at login
        raise discord.ClientException("no application id: log in first")
    if guild_id:
        return await bot.http.get_guild_commands(bot.application_id, guild_id)
    return await bot.http.get_global_commands(bot.application_id)


async def sync_if_unregistered(bot: ImagineBot, guild_id: int | None = None) -> list[str] | None:
    """After login: when Discord has none of this bot's commands (global ones, or `guild_id`'s),
    register them (one GET; a PUT only then) and return their names; else None, with a log line
    naming the commands whose definition on Discord differs from the bot's (a new size, preset or
    limit in the config changes /imagine's options and descriptions; emptying or setting
    `admin_roles` changes who is shown /queue-admin, bot.permissions.admin_command_permissions; an
    upgrade may change where and by whom a command may be used, `command_access`; `imagine-bot
    sync` updates them: synced on request, so a restart never spends Discord's daily command-update budget). A
    failure is logged, never fatal: the bot runs either way."""
    guild = discord.Object(id=guild_id) if guild_id else None
    where = f"guild {guild_id}" if guild_id else "global"
    try:
        in_guild = guild is not None
        registered = {c["name"]: command_shape(c, in_guild=in_guild)
                      for c in await registered_commands(bot, guild_id)}
        if guild is not None:
            bot.tree.copy_global_to(guild=guild)
        ours = {c.name: command_shape(c.to_dict(bot.tree), in_guild=in_guild)
                for c in bot.tree.get_commands(guild=guild)}
        if registered:
            differ = sorted(name for name in registered.keys() | ours.keys() if registered.get(name) != ours.get(name))
            if differ:
                log.warning("Discord's %s slash commands differ from this bot's (%s: added, removed or changed "
                            "since the last sync, e.g. by the config's sizes, presets, limits or admin roles, or by an "
                            "upgrade that changed where or by whom they may be used): run `imagine-bot sync` "
                            "to update them", where, ", ".join(f"/{n}" for n in differ))
            return None
        synced = await bot.tree.sync(guild=guild)
    except (discord.HTTPException, discord.ClientException, aiohttp.ClientError, OSError) as exc:
        log.warning("could not check or register the slash commands (%s: %s); run `imagine-bot sync`",
                    type(exc).__name__, exc)
        return None
    names = [c.name for c in synced]
    log.info("registered %d %s slash commands (Discord had none): %s%s", len(names), where,
             ", ".join(f"/{n}" for n in names),
             "; global commands can take a while to appear" if guild is None else "")
    return names


EXIT_GPU_DEAD = 1   # the embedded worker's GPU thread died or hung: restart the process
EXIT_LEASE_LOST = 1   # another bot took this store's bot lease: stop rather than run beside it

# One bot per store: a running bot holds this lease on its queue's store (the SQLite file, or the
# Redis prefix), so that a second bot there (another token, or an accidental second replica) stops
# instead of posting, editing and reconciling the first one's jobs. Workers never take it: many
# of them per store is the design.
BOT_LEASE = "bot"
BOT_LEASE_TTL = 60.0     # seconds; renewed every third of that (tests shrink it)
BOT_LEASE_GRACE = 2.0    # seconds a starting bot waits past the holder's expiry before it gives up


def _utc(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def lease_holder(info: Mapping[str, Any]) -> str:
    """Who holds the bot lease, from `hold_lease`'s answer, for a log line or an error."""
    return (f"{info['holder']} (host {info['host']}, pid {info['pid']}) since {_utc(info['since'])}, "
            f"last renewed {_utc(info['renewed'])}")


class BotLease:
    """This bot's hold on its store's BOT_LEASE: `take` at start (before Discord), renewed every
    ttl/3 by a task (`keeper`, which ends with EXIT_LEASE_LOST if another bot has it by then), and
    `release` at a clean stop, so that the next bot starts at once. The holder id is
    host-pid-random: a restarted process is a new holder."""

    def __init__(self, queue: JobQueue, url: str, ttl: float | None = None) -> None:
        self.queue = queue
        self.url = url
        self.ttl = float(BOT_LEASE_TTL if ttl is None else ttl)
        self.holder = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        self.keeper: asyncio.Task[int] | None = None
        # Ours from `take` until another bot took it: only then does a failed release keep the
        # next bot waiting.
        self.held = False
        self.renewed_at = 0.0   # the event loop's clock at the last take or renewal

    async def take(self) -> None:
        """Take the lease. Held by another bot: wait for it to lapse (a bot killed or crashed
        without releasing it loses it within its ttl), said once; still held then (renewed: that
        bot runs), LaunchError with exit status 2."""
        loop = asyncio.get_running_loop()
        deadline: float | None = None
        while (other := await self.queue.hold_lease(BOT_LEASE, self.holder, self.ttl)) is not None:
            now = loop.time()
            if deadline is None:
                deadline = now + float(other["expires_in"]) + BOT_LEASE_GRACE
                log.warning("another bot holds this store's bot lease: %s; waiting up to %.0f s for it to lapse "
                            "(a bot stopped without releasing it: killed, crashed)", lease_holder(other),
                            deadline - now)
            elif now >= deadline:
                raise LaunchError(
                    f"another bot runs on the queue {redact_url(self.url)}: its bot lease is held by "
                    f"{lease_holder(other)}; two bots on one store post and edit each other's jobs: stop "
                    "that bot, or give this one a store of its own (another SQLite file, or another Redis "
                    "?prefix=)", exit_code=2)
            await asyncio.sleep(max(0.0, min(self.ttl / 10, 1.0, deadline - now)))
        if deadline is not None:
            log.info("took this store's bot lease: the previous holder's lease ended")
        self.held, self.renewed_at = True, loop.time()
        self.keeper = asyncio.create_task(self._keep(), name="bot-lease")

    async def _keep(self) -> int:
        """Renew every ttl/3; a store that does not answer is tried again at the next turn (the
        lease may lapse meanwhile, and is taken back if no other bot took it). The first renewal
        after failed ones, or after more than the ttl (a lapse), says so; an ordinary one is quiet."""
        loop = asyncio.get_running_loop()
        failures = 0
        while True:
            await asyncio.sleep(self.ttl / 3)
            try:
                other = await self.queue.hold_lease(BOT_LEASE, self.holder, self.ttl)
            except Exception as exc:  # noqa: BLE001 - the store's trouble, said; the next turn tries again
                failures += 1
                log.warning("could not renew this store's bot lease (%s: %s); trying again in %.0f s",
                            type(exc).__name__, redact_secrets(str(exc), self.url), self.ttl / 3)
                continue
            if other is not None:
                self.held = False
                log.error("another bot took this store's bot lease (%s) while this one's lapsed: stopping with "
                          "exit status %d rather than run beside it; run one bot per store", lease_holder(other),
                          EXIT_LEASE_LOST)
                return EXIT_LEASE_LOST
            now = loop.time()
            unrenewed, self.renewed_at = now - self.renewed_at, now
            tries = f"{failures} failed {'try' if failures == 1 else 'tries'}, " if failures else ""
            if unrenewed > self.ttl:   # a store that failed, or hung (a write lock held), that long
                log.info("renewed this store's bot lease again after %.0f s without a renewal (%slonger than its "
                         "%.0f s ttl): it had lapsed, no other bot had taken it, and this bot took it back",
                         unrenewed, tries, self.ttl)
            elif failures:
                log.info("renewing this store's bot lease works again after %.0f s without a renewal (%swithin "
                         "its %.0f s ttl)", unrenewed, tries, self.ttl)
            failures = 0

    async def release(self) -> None:
        """Stop renewing and hand the lease back (only ours: `release_lease` checks the holder).
        Also after a `take` that failed or was cancelled (its write may have landed), quietly then."""
        if self.keeper is not None:
            self.keeper.cancel()
            await asyncio.gather(self.keeper, return_exceptions=True)
        try:
            await self.queue.release_lease(BOT_LEASE, self.holder)
        except Exception as exc:  # noqa: BLE001 - stopping anyway: the lease lapses by itself
            if not self.held:   # no bot waits for a lease this one never had
                log.debug("could not release this store's bot lease, which this bot did not hold (%s: %s)",
                          type(exc).__name__, redact_secrets(str(exc), self.url))
                return
            log.warning("could not release this store's bot lease (%s: %s): the next bot on it waits up to "
                        "%.0f s for it to lapse", type(exc).__name__, redact_secrets(str(exc), self.url), self.ttl)


async def hold_bot_lease(resources: Resources, ttl: float | None = None) -> BotLease:
    """Take the store's bot lease for this bot (see BotLease.take), released when the resources
    close: after the embedded worker has handed back its jobs, before the queue closes."""
    lease = BotLease(resources.queue, resources.config.queue.url, ttl)
    assert resources.stack is not None
    resources.stack.push_async_callback(lease.release)   # first: a take cancelled midway is undone too
    try:
        await lease.take()
    except LaunchError:
        raise
    except Exception as exc:  # noqa: BLE001 - the store failed just after it opened: say so, no traceback
        url = resources.config.queue.url
        detail = redact_secrets(str(exc), url).strip().rstrip(".") or type(exc).__name__
        raise LaunchError(f"cannot take the bot lease on the queue {redact_url(url)}: {detail}; "
                          f"check {store_trouble_hint(url, detail)}") from None
    return lease


async def run(config: Config, token: str, stop: asyncio.Event | None = None) -> int:
    """The bot until `stop` is set (or this task is cancelled): 0. A token Discord refuses raises
    discord.LoginFailure before the embedded worker loads anything.

    `stop` ends whatever is under way: opening the queue, the login, the models' load (its thread is
    left behind: engine.worker), the command check, the gateway; then the bot closes and the worker
    hands back its running jobs. The gateway runs in a task of its own (`_login_and_connect`) that
    is cancelled and whose bot is closed: discord.py's reconnects (`Shard.reidentify`,
    `Shard.reconnect`) swallow a cancel and carry on, closing is what ends its connect loop.

    An embedded worker whose GPU thread dies or hangs (engine.worker: it claims nothing more) stops
    the bot the same way, with one ERROR line, and returns EXIT_GPU_DEAD (1), as `imagine-worker`
    exits 1: a process that takes commands that no one will ever run is worse than a restart. The
    jobs wait in the queue (a running one goes back as a failed attempt, to be retried).

    One bot per store: once the queue is open, before Discord, it takes the store's bot lease
    (BotLease). While another bot holds it, it waits up to that lease's expiry (a predecessor that
    was killed), then raises LaunchError (exit status 2) naming the holder. Running, it renews the
    lease; if another bot has taken it meanwhile (this one's lapsed in a long store outage) it
    stops like a dead GPU thread, returning EXIT_LEASE_LOST (1). A clean stop releases it."""
    stop = stop if stop is not None else asyncio.Event()
    me = asyncio.current_task()
    assert me is not None

    async def cancel_on_stop() -> None:   # while the queue and the HTTP server open (a Redis is retried for 30 s)
        await stop.wait()
        me.cancel()

    opening = asyncio.create_task(cancel_on_stop(), name="bot-stop-while-opening")
    try:
        async with open_resources(config, start_worker=False) as resources:
            lease = await hold_bot_lease(resources)   # another bot on this store: LaunchError, exit 2
            opening.cancel()
            bot = make_bot(resources)
            async with bot:
                return await _until_stopped(bot, resources, token, config, stop, lease)
    except asyncio.CancelledError:
        if opening.done() and not opening.cancelled():   # our own cancel, for `stop`: nothing had started
            me.uncancel()
            return 0
        raise
    finally:
        opening.cancel()


async def _login_and_connect(bot: ImagineBot, resources: Resources, token: str, config: Config) -> None:
    # bot.start() is login + connect; split, so that a bad token fails before the models load.
    await bot.login(token)
    await resources.start_worker()
    await sync_if_unregistered(bot, config.discord.sync_guild or None)
    await bot.connect()


async def _until_stopped(bot: ImagineBot, resources: Resources, token: str, config: Config,
                         stop: asyncio.Event, lease: BotLease | None = None) -> int:
    """`_login_and_connect` until it ends (its error raised), `stop` is set (0), the embedded
    worker's GPU thread dies (1) or another bot took the store's bot lease (1); then the bot is
    closed (the lease is released later, with the resources)."""
    gateway = asyncio.create_task(_login_and_connect(bot, resources, token, config), name="bot-gateway")
    watch = asyncio.create_task(_until_stop_or_gpu_dead(resources, stop), name="bot-watch")
    keeper = lease.keeper if lease is not None else None
    try:
        done, _ = await asyncio.wait({gateway, watch} | ({keeper} if keeper else set()),
                                     return_when=asyncio.FIRST_COMPLETED)
        if gateway in done:   # the gateway closed (or failed before it connected)
            gateway.result()
            return 0
        if keeper in done:
            return keeper.result()
        return watch.result()
    finally:
        watch.cancel()
        if not gateway.done():
            gateway.cancel()   # the login, the models' load, the command check, a first connect
            await bot.close()  # the connect loop, even where discord.py swallowed the cancel
            ended = (await asyncio.gather(gateway, return_exceptions=True))[0]
            if not isinstance(ended, (asyncio.CancelledError, type(None))):   # stopping: not the outcome
                log.debug("the gateway ended with %r while the bot stopped", ended)
        await asyncio.gather(watch, return_exceptions=True)


async def _until_stop_or_gpu_dead(resources: Resources, stop: asyncio.Event, poll: float = 1.0) -> int:
    while not stop.is_set():
        worker = resources.worker
        if resources.worker_started and not worker.gpu_thread_alive():
            log.error("the embedded worker's GPU thread died or hung (see the error above): stopping the bot "
                      "with exit status %d so that its supervisor starts a fresh one; the jobs wait in the queue",
                      EXIT_GPU_DEAD)
            return EXIT_GPU_DEAD
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), poll)
    return 0
