"""The bot's settings: `config.toml` (tomllib) into dataclasses, every value type-checked.

The Discord token is never in the file: it comes from the `DISCORD_TOKEN` environment variable
only (see `bot.__main__`). The queue URL, which may hold the Redis password, can come from the
`IMAGINE_QUEUE_URL` environment variable instead of the file (`choose_queue_url`: --queue, then the
variable, then `[queue] url`). Every error names the file and the key, e.g. `config.toml: [imagine]
max_prompt_chars: expected an integer, got '500'`; a token-shaped value is shown masked.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.jobs import MAX_GRID, check_keep_days, check_keep_state_days, check_keep_state_gib
from engine.queue import check_queue_url, redact_url
from engine.compiling import check_cuda_graphs, compile_options


QUEUE_URL_ENV = "IMAGINE_QUEUE_URL"   # the queue URL, kept out of the config file and the command line
QUEUE_URL_SCHEMES = ("sqlite://", "redis://", "rediss://")


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the key and what to fix."""


@dataclass
class DiscordConfig:
    # Members with one of these roles (or Manage Server) may use the admin commands. An entry of
    # digits is a role id ("123456789012345678"), anything else a role name; prefer ids where
    # members other than admins have Manage Roles: they can create a role of any name.
    admin_roles: list[str] = field(default_factory=lambda: ["Imagine Admin"])
    # Guild that `imagine-bot sync` uses when no --guild is given (0: sync globally).
    sync_guild: int = 0
    # Gateway shards, all run by this one process (discord.py's AutoShardedBot); 0: as many as
    # Discord recommends (GET /gateway/bot), which it requires from 2,500 guilds on.
    shard_count: int = 0


@dataclass
class QueueConfig:
    url: str = "sqlite:///imagine-bot.db"
    # Queued (not yet running) jobs one user may have; `/queue-admin limit <n>` overrides it at runtime.
    # 9: a permutation set counts each of its jobs, so this is at least [imagine] max_permutations
    # (9) and the largest set /help offers can be queued. It costs the others little: the line is
    # round-robin per user (each other user's next job goes before this user's second), so someone
    # with 9 waiting holds up another's next job no more than someone with 1; the cap bounds how
    # much one user can stack up in the line.
    max_queued_per_user: int = 9


@dataclass
class WorkerConfig:
    # Run a GPU worker inside the bot process (the one-machine default). false: run
    # `imagine-worker --queue ...` processes elsewhere.
    embedded: bool = True
    clip_model: str = "ViT-B/32"
    decoder: str = "openai"
    trust_decoder: bool = False
    # SHA-256 (hex) of dVAE decoder / encoder pickles that may be unpickled (a file you checked).
    known_sha256: list[str] = field(default_factory=list)
    # auto: cuda when this host has a CUDA GPU, else no embedded worker (a warning says so); cpu | cuda | cuda:1 ...
    device: str = "auto"
    cache_dir: str = ""           # "" -> engine default (~/.cache/imagine-bot or $IMAGINE_CACHE)
    max_batch: int = 1            # 0: as many as fit in free GPU memory (engine.capacity; 1 on a CPU)
    worker_id: str = ""
    # Prune finished, posted jobs older than this many days, and uploads no job names that old
    # (0: never prune; else at least 1/24, an hour: engine.jobs.MIN_KEEP_DAYS). Each finished job
    # keeps its 48-192 MiB state.pt until then (imagine-worker --keep-days has the same default).
    keep_days: float = 30.0
    # ...but its state.pt (48-192 MiB, what Continue / Remix / Reroll of a continue start from) only
    # this many days after it was posted; the record, picture and video stay keep_days. 0: as long
    # as the job (keep_days); else at least 1/24, an hour. More than keep_days is the same as
    # keep_days. Applies with keep_days = 0 too (jobs kept for ever, their states not).
    # imagine-worker --keep-state-days has the same default.
    keep_state_days: float = 7.0
    # ...and, whatever their age, the kept states (48-192 MiB each) total at most this many GiB: over
    # it, the oldest posted job's state goes first (after each finished job and hourly). Bounds the
    # store however many jobs are queued (1-iteration jobs back to back each leave a full state).
    # 0: no budget. imagine-worker --keep-state-gib does the same.
    keep_state_gib: float = 0.0
    # dVAE encoder for `init_image` (same loading rules as the decoder); "" -> none (init_image jobs are
    # left in line for a worker that has one).
    encoder: str = "openai"
    # torch.compile the hot loop: "auto" (inductor on CUDA where a C compiler is found: it paid
    # 1.7x at a batch of 32 on an H200, docs/PERFORMANCE.md; none on a CPU), "" (off), "inductor",
    # "inductor:reduce-overhead" (CUDA graphs too).
    compile: str = "auto"
    # Replay the step of a job that runs alone from a CUDA graph (engine.graphs; CUDA only, not
    # with compile "inductor:reduce-overhead"). Experimental, off: not yet measured on a GPU.
    cuda_graphs: bool = False
    # Seconds between two checkpoints of a running job (taken at its frames; 0: every frame). A
    # crash loses at most this much of a job's work; a stopping worker checkpoints its jobs anyway.
    checkpoint_every: float = 60.0


@dataclass
class ImagineConfig:
    max_prompt_chars: int = 500
    default_iterations: int = 300
    max_iterations: int = 1000
    # Iterations a Continue button adds (0: as many as the job it continues).
    continue_iterations: int = 0
    frame_every: int = 50
    cutn: int = 12
    default_size: int = 256
    # Image side (pixels, the `size` option) -> dVAE grid. The image is 8 * grid a side, and the key
    # must say so (checked): "512" = 64.
    sizes: dict[str, int] = field(default_factory=lambda: {"256": 32, "512": 64})
    # Most jobs one permutation prompt (`a {red, blue} house by {Escher, Magritte}`) may make.
    max_permutations: int = 9
    # Largest attachment accepted for `image` / `init_image`, in bytes (checked before downloading).
    max_image_bytes: int = 8 * 1024 * 1024


@dataclass
class ProgressConfig:
    # Seconds between two edits of one message, and between two edits in one channel.
    message_interval: float = 2.0
    channel_interval: float = 1.0
    # Seconds between two recomputations of the line (queue positions in queued replies).
    line_interval: float = 2.0
    # Long-poll timeout for queue events, and how often undelivered results are re-checked.
    poll_timeout: float = 5.0
    reconcile_interval: float = 30.0
    # An interaction token lives 15 minutes from the interaction's creation; after this many seconds
    # (counted from then, below 900) the bot edits through the channel instead.
    token_ttl: float = 840.0
    # Upload limit in bytes when Discord does not say (0: 10 MiB).
    upload_limit: int = 0


@dataclass
class HttpConfig:
    # /healthz and /metrics (engine.observability); port 0: no HTTP server (`--http-port` overrides).
    port: int = 0
    host: str = "127.0.0.1"


@dataclass
class PresetConfig:
    """One `quality` choice of /imagine: image side (a key of [imagine] sizes), steps, cut-outs."""

    size: int = 256
    iterations: int = 500
    cutn: int = 12


@dataclass
class DraftPreset(PresetConfig):
    size: int = 256
    iterations: int = 200
    cutn: int = 8


@dataclass
class NormalPreset(PresetConfig):
    size: int = 256
    iterations: int = 500
    cutn: int = 12


@dataclass
class BestPreset(PresetConfig):   # the seed article's notebook
    size: int = 512
    iterations: int = 1000
    cutn: int = 12


@dataclass
class PresetsConfig:
    draft: DraftPreset = field(default_factory=DraftPreset)
    normal: NormalPreset = field(default_factory=NormalPreset)
    best: BestPreset = field(default_factory=BestPreset)

    def get(self, name: str) -> PresetConfig | None:
        return getattr(self, name, None) if name in PRESET_NAMES else None


PRESET_NAMES = ("draft", "normal", "best")


@dataclass
class Config:
    discord: DiscordConfig = field(default_factory=DiscordConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    imagine: ImagineConfig = field(default_factory=ImagineConfig)
    progress: ProgressConfig = field(default_factory=ProgressConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    presets: PresetsConfig = field(default_factory=PresetsConfig)
    log_level: str = "INFO"

    # --- derived ----------------------------------------------------------------------------

    def grid_for(self, size: int) -> int:
        return self.imagine.sizes[str(size)]

    @property
    def size_choices(self) -> list[int]:
        return sorted(int(k) for k in self.imagine.sizes)


_LOG_LEVELS = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")
PIXELS_PER_CELL = 8   # the dVAE decoder upsamples 8x: a grid of g makes 8g x 8g pictures
MAX_CUTN = 256   # as `imagine --cutn`: cut-outs per step, each a CLIP forward
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")   # as imagine-worker --device


def _check_compile_backend(value: str) -> None:
    """ValueError unless the backend of a `compile` setting is one this torch has (an unknown one
    passed here and killed the embedded worker's GPU thread at its first batch). Imports torch only
    when compile is set; without torch (no worker can run here) only its form is checked."""
    options = compile_options(value)
    if options is None:
        return
    try:
        import torch._dynamo
    except ImportError:   # pragma: no cover - torch is a dependency
        return
    known = sorted(torch._dynamo.list_backends(exclude_tags=()))
    if options["backend"] not in known:
        shown = [b for b in known if "TESTING" not in b]
        raise ValueError(f"compile {value!r}: torch has no backend {options['backend']!r} (known: {', '.join(shown)})")
# One process runs every shard: far beyond what one process can hold is a typo, not a plan.
MAX_SHARDS = 1024


def _size_label_message(size: str, grid: int) -> str:
    """Why `sizes.<size> = grid` is refused: the grid alone sets the picture (8 x grid pixels a
    side); the key is only the label users pick and see, so it must say what the grid makes."""
    side = PIXELS_PER_CELL * grid
    message = (f"[imagine] sizes.{size}: a grid of {grid} makes {side}×{side} pictures, not {size}×{size}; "
               f"the key must be {PIXELS_PER_CELL} × grid (\"{side}\" = {grid}")
    wanted, rest = divmod(int(size), PIXELS_PER_CELL)
    if rest == 0 and 2 <= wanted <= MAX_GRID:
        message += f", or \"{size}\" = {wanted} for {size}×{size} pictures"
    return message + ")"


def _masked(text: str) -> str:
    """`text` with any token-shaped string masked (bot.redact): a bot token pasted under the wrong key
    must not reach stderr and the logs that keep it."""
    from bot.redact import Redactor

    return Redactor().redact(text)


def _type_name(tp: Any) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _check_value(key: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {_masked(repr(value))}")
        return [_check_value(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if origin is dict:
        _, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {_masked(repr(value))}")
        return {str(k): _check_value(f"{key}.{k}", v, val_tp) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {_masked(repr(value))}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {_masked(repr(value))}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {_masked(repr(value))}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {_masked(repr(value))}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp!r}")  # pragma: no cover - a bug here


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"[{prefix}]" if prefix else "the top level"
        raise ConfigError(f"unknown key{'s' if len(unknown) > 1 else ''} in {where}: {_masked(', '.join(unknown))} "
                          f"(known: {', '.join(fields)})")
    values = {}
    for name, value in data.items():
        tp = hints[name]
        key = f"[{prefix}] {name}" if prefix else name
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            where = f"{prefix}.{name}" if prefix else name   # [presets.draft]
            if not isinstance(value, dict):
                raise ConfigError(f"[{where}]: expected a table, got {_masked(repr(value))}")
            values[name] = _build(tp, value, where)
        else:
            values[name] = _check_value(key, value, tp)
    return cls(**values)


def _validate(cfg: Config) -> None:
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    im, pr, q = cfg.imagine, cfg.progress, cfg.queue
    need(cfg.discord.shard_count >= 0,
         f"[discord] shard_count: must not be negative, got {cfg.discord.shard_count} "
         "(0: as many shards as Discord recommends)")
    need(cfg.discord.shard_count <= MAX_SHARDS,
         f"[discord] shard_count: {cfg.discord.shard_count} is more than {MAX_SHARDS} shards "
         "(Discord recommends about one per 1,000 guilds; 0: its recommendation)")
    need(cfg.discord.sync_guild >= 0,
         f"[discord] sync_guild: expected a server id, got {cfg.discord.sync_guild} (0: sync globally)")
    need(q.url.startswith(QUEUE_URL_SCHEMES),
         f"[queue] url: expected sqlite:///path.db or redis://host:port/db, got {redact_url(q.url)!r}")
    need(check_queue_url(q.url) is None, f"[queue] url: {check_queue_url(q.url)}")
    need(q.max_queued_per_user >= 1, "[queue] max_queued_per_user: must be at least 1")
    need(cfg.worker.keep_days >= 0, "[worker] keep_days: must not be negative (0: never prune)")
    try:
        check_keep_days(cfg.worker.keep_days)
    except ValueError as exc:
        raise ConfigError(f"[worker] keep_days: {exc}") from None
    need(cfg.worker.keep_state_days >= 0,
         "[worker] keep_state_days: must not be negative (0: as long as the job, keep_days)")
    try:
        check_keep_state_days(cfg.worker.keep_state_days)
    except ValueError as exc:
        raise ConfigError(f"[worker] keep_state_days: {exc}") from None
    try:
        check_keep_state_gib(cfg.worker.keep_state_gib)
    except ValueError as exc:
        raise ConfigError(f"[worker] keep_state_gib: {exc}") from None
    need(cfg.worker.max_batch >= 0, "[worker] max_batch: must not be negative (0: automatic)")
    if cfg.worker.cache_dir:
        # `~typo/models`: pathlib's RuntimeError when the models load, after the bot had connected.
        try:
            Path(cfg.worker.cache_dir).expanduser()
        except RuntimeError:
            need(False, f"[worker] cache_dir: {cfg.worker.cache_dir!r}: {cfg.worker.cache_dir.split('/')[0]!r} is no "
                        "home folder on this host (write the folder's full path)")
    # As imagine-worker --worker-id (engine.worker.check_worker_id): SAQ's worker registry splits its
    # keys on ':', so such a worker would never be listed (/healthz: "no GPU worker").
    need(":" not in cfg.worker.worker_id,
         f"[worker] worker_id: must not contain ':' (the worker registry splits on it), got {cfg.worker.worker_id!r}")
    # TOML writes `inf` and `nan`. Seconds here are finite (0 is each one's "every time"): nan
    # failed the checks below as "must not be negative", inf passed them and meant a checkpoint,
    # an edit or a long-poll never.
    seconds = {"[worker] checkpoint_every": cfg.worker.checkpoint_every,
               **{f"[progress] {name}": getattr(pr, name) for name in (
                   "message_interval", "channel_interval", "line_interval", "poll_timeout", "reconcile_interval",
                   "token_ttl")}}
    for key, value in seconds.items():
        need(math.isfinite(value), f"{key}: expected a finite number of seconds, got {value}")
    need(cfg.worker.checkpoint_every >= 0,
         "[worker] checkpoint_every: must not be negative (seconds; 0: a checkpoint at every frame)")
    for i, digest in enumerate(cfg.worker.known_sha256):
        need(len(digest) == 64 and all(c in "0123456789abcdefABCDEF" for c in digest),
             f"[worker] known_sha256[{i}]: expected a SHA-256 as 64 hex digits (sha256sum FILE), got {digest!r}")
    need(bool(_DEVICE.fullmatch(cfg.worker.device)),
         f"[worker] device: expected auto, cpu, cuda or cuda:N (cuda:1 ...), got {cfg.worker.device!r}")
    try:
        _check_compile_backend(cfg.worker.compile)
        check_cuda_graphs(cfg.worker.compile, cfg.worker.cuda_graphs)
    except ValueError as exc:
        raise ConfigError(f"[worker] {exc}") from None
    need(0 <= cfg.http.port <= 65535, "[http] port: must be between 0 (off) and 65535")
    need(bool(cfg.http.host.strip()), "[http] host: must not be empty (127.0.0.1, or 0.0.0.0 in a container)")
    need(im.max_prompt_chars >= 1, "[imagine] max_prompt_chars: must be at least 1")
    need(im.max_iterations >= 1, "[imagine] max_iterations: must be at least 1")
    need(1 <= im.default_iterations <= im.max_iterations,
         "[imagine] default_iterations: must be between 1 and max_iterations")
    need(0 <= im.continue_iterations <= im.max_iterations,
         "[imagine] continue_iterations: must be between 0 and max_iterations")
    need(im.frame_every >= 1, "[imagine] frame_every: must be at least 1")
    need(1 <= im.cutn <= MAX_CUTN, f"[imagine] cutn: must be between 1 and {MAX_CUTN}")
    need(1 <= im.max_permutations <= 25, "[imagine] max_permutations: must be between 1 and 25")
    need(bool(im.sizes), "[imagine] sizes: needs at least one size = grid entry")
    for size, grid in im.sizes.items():
        # ASCII digits as written, no leading zero: "0512" or "５１２" would pass isdigit() and then
        # never match the size a user picks (str(512)), and "²" is a digit int() refuses.
        need(size.isascii() and size.isdigit() and str(int(size)) == size and int(size) > 0,
             f"[imagine] sizes.{size}: the key must be a size in pixels, e.g. \"512\"")
        need(2 <= grid <= MAX_GRID, f"[imagine] sizes.{size}: the grid must be between 2 and {MAX_GRID} "
                                    f"({MAX_GRID} is {8 * MAX_GRID} pixels, 4x the memory of 512x512 per job)")
        need(int(size) == PIXELS_PER_CELL * grid, _size_label_message(size, grid))
    need(len(im.sizes) <= 25, "[imagine] sizes: Discord allows at most 25 choices")
    need(str(im.default_size) in im.sizes,
         f"[imagine] default_size: {im.default_size} is not one of sizes ({', '.join(im.sizes)})")
    need(im.max_image_bytes >= 1, "[imagine] max_image_bytes: must be at least 1")
    for name in PRESET_NAMES:
        preset = getattr(cfg.presets, name)
        # A preset left as it is keeps its default size, which [imagine] sizes may have dropped: the
        # message said "[presets.best] size: 512" of a table the person never wrote.
        default = getattr(PresetsConfig(), name).size == preset.size
        need(str(preset.size) in im.sizes,
             f"[presets.{name}] size: {preset.size}{' (its default)' if default else ''} is not one of [imagine] "
             f"sizes ({', '.join(im.sizes)})" + (f": set [presets.{name}] size to one of them" if default else ""))
        need(1 <= preset.iterations <= im.max_iterations,
             f"[presets.{name}] iterations: must be between 1 and [imagine] max_iterations ({im.max_iterations})")
        need(1 <= preset.cutn <= MAX_CUTN, f"[presets.{name}] cutn: must be between 1 and {MAX_CUTN}")
    for name in ("message_interval", "channel_interval", "line_interval", "reconcile_interval", "token_ttl"):
        need(getattr(pr, name) >= 0, f"[progress] {name}: must not be negative")
    need(pr.token_ttl < 900, "[progress] token_ttl: must be below 900 (an interaction token lives 15 minutes; "
                             "past it, edits through the token fail with 401)")
    need(pr.poll_timeout > 0, "[progress] poll_timeout: must be positive")
    need(pr.upload_limit >= 0, "[progress] upload_limit: must not be negative")
    need(cfg.log_level.upper() in _LOG_LEVELS,
         f"log_level: expected one of {', '.join(_LOG_LEVELS)}, got {cfg.log_level!r}")


def config_from_dict(data: dict[str, Any]) -> Config:
    cfg = _build(Config, data, "")
    _validate(cfg)
    return cfg


def load_config(path: str | os.PathLike[str]) -> Config:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} not found (copy config.example.toml to start)") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {str(path)!r}: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    discord = data.get("discord")   # not a table: config_from_dict says so ("in" on a string is a substring test)
    try:
        if "token" in data or (isinstance(discord, dict) and "token" in discord):
            raise ConfigError("the token does not belong in the config file: remove it and set DISCORD_TOKEN")
        return config_from_dict(data)
    except ConfigError as exc:   # every error names the file, as the read and TOML errors above do
        raise ConfigError(f"{path}: {exc}") from None


def check_token(token: str | None) -> str:
    """The token from DISCORD_TOKEN, shape-checked (never echoed back)."""
    if token is None or not token.strip():
        raise ConfigError("DISCORD_TOKEN is not set: export the bot token as DISCORD_TOKEN")
    token = token.strip()
    if any(c.isspace() for c in token) or len(token) < 20 or token.count(".") < 2:
        raise ConfigError("DISCORD_TOKEN does not look like a bot token (expected three dot-separated parts)")
    return token


def choose_queue_url(config: Config, command_line: str | None,
                     environ: typing.Mapping[str, str] = os.environ) -> None:
    """Set `config.queue.url` by precedence: `--queue` (`command_line`), else the `IMAGINE_QUEUE_URL`
    environment variable, else `[queue] url` as loaded; an empty value counts as unset. A value that
    is no queue URL is refused naming where it came from, its password masked."""
    for source, url in (("--queue", command_line), (QUEUE_URL_ENV, environ.get(QUEUE_URL_ENV))):
        if url is not None and url.strip():
            url = url.strip()
            if not url.startswith(QUEUE_URL_SCHEMES):
                raise ConfigError(f"{source}: expected sqlite:///path.db or redis://host:port/db, "
                                  f"got {redact_url(url)!r}")
            problem = check_queue_url(url)   # a Redis database that is no number, ?lease=abc...
            if problem:
                raise ConfigError(f"{source}: {problem}")
            config.queue.url = url
            return
