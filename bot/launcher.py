"""The launcher owns the resources (queue, embedded GPU worker, aiohttp session) and hands them to
the Bot, as discord.py's examples/advanced_startup.py does. Closing runs in reverse: the bot (its
background tasks end in cog_unload), then the worker (running jobs go back to the queue with their
checkpoints), then the session and the queue.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import aiohttp

from bot.client import ImagineBot
from bot.config import Config, WorkerConfig
from engine.jobs import JobQueue

log = logging.getLogger(__name__)


class LaunchError(RuntimeError):
    """A resource the bot needs could not be started; the message says which and why."""


@dataclass
class Resources:
    config: Config
    queue: JobQueue
    http_session: aiohttp.ClientSession
    worker: Any = None   # engine.worker.Worker when embedded


def default_models_loader(wc: WorkerConfig) -> Callable[[], Any]:
    """A zero-argument loader of the real models, as config says (imports torch when called)."""

    def load() -> Any:
        from engine.models import DEFAULT_CACHE, load_models

        device = wc.device
        if device == "auto":
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        cache = Path(wc.cache_dir).expanduser() if wc.cache_dir else DEFAULT_CACHE
        return load_models(wc.clip_model, wc.decoder, device, cache, wc.trust_decoder)

    return load


@contextlib.asynccontextmanager
async def open_resources(
    config: Config,
    *,
    models_loader: Callable[[], Any] | None = None,
    worker_options: dict[str, Any] | None = None,
) -> AsyncIterator[Resources]:
    from engine.queue import open_queue

    async with contextlib.AsyncExitStack() as stack:
        try:
            queue = open_queue(config.queue.url)
            await queue.start()
        except Exception as exc:  # noqa: BLE001 - say what failed, not a traceback
            raise LaunchError(f"cannot open the queue {config.queue.url!r}: {exc}") from exc
        stack.push_async_callback(queue.close)
        session = aiohttp.ClientSession()
        stack.push_async_callback(session.close)
        worker = None
        if config.worker.embedded:
            from engine.worker import Worker   # imports torch: only when the worker is embedded

            wc = config.worker
            worker = Worker(
                queue, models_loader or default_models_loader(wc),
                worker_id=wc.worker_id or None, max_batch=wc.max_batch, **(worker_options or {}),
            )
            try:
                await worker.start()
            except Exception as exc:  # noqa: BLE001
                raise LaunchError(
                    f"the embedded worker could not load its models ({type(exc).__name__}: {exc}); "
                    "check [worker] clip_model / decoder / cache_dir, or set [worker] embedded = false"
                ) from exc
            stack.push_async_callback(worker.stop)
        yield Resources(config, queue, session, worker)


def make_bot(resources: Resources, **kwargs: Any) -> ImagineBot:
    return ImagineBot(config=resources.config, queue=resources.queue, http_session=resources.http_session,
                      worker=resources.worker, **kwargs)


async def run(config: Config, token: str) -> None:
    async with open_resources(config) as resources:
        bot = make_bot(resources)
        async with bot:
            await bot.start(token)
