"""Health and metrics over HTTP, for the GPU worker (`imagine-worker --http-port`) and the bot.

    obs = Observability()                         # its own CollectorRegistry (never the global one)
    obs.track_queue(queue)                        # imagine_queue_length, read at scrape time
    obs.track_worker(worker)                      # jobs, iterations, latency, GPU (a worker's process)
    obs.track_store(queue)                        # imagine_queue_jobs{state}: the whole store (the bot)
    obs.track_workers(queue, within=60)           # imagine_workers_alive (the bot)
    obs.export_discord_metrics()                  # imagine_discord_* (the bot: it runs the Discord client)
    runner = await obs.start_http("127.0.0.1", 9100, {"queue": queue_check(queue)})
    ...
    await runner.cleanup()

`GET /healthz` runs every check (an async callable returning a bool, or a dict with "ok" and more
details to report; raising or taking longer than `check_timeout` seconds counts as failing) and
answers 200 when all pass, else 503, with JSON:
`{"ok": false, "checks": {"queue": {"ok": false, "error": "TimeoutError: ..."}, "gpu": {"ok": true}}}`.
An *advisory* check (`start_http(..., advisory={"workers"})`) is run and reported the same way, but
its failure does not make the answer 503: it is listed in `"degraded": [...]` instead (the bot's
`workers` check: no GPU worker alive is not something restarting the bot would fix).

`GET /metrics` is the Prometheus text format:

| metric | type | what |
|---|---|---|
| `imagine_queue_length` | gauge | jobs waiting in the line (asked of the queue at each scrape) |
| `imagine_queue_jobs{state}` | gauge | jobs in the whole store: queued, running, undelivered (finished, result not posted yet); read at each scrape (present only after `track_store`) |
| `imagine_kept_state_bytes` | gauge | bytes of finished jobs' `state.pt` kept in the store (`queue.state_bytes()`, what `keep_state_gib` bounds), read at each scrape (present only after `track_store`) |
| `imagine_workers_alive` | gauge | GPU workers that claimed, heartbeated or announced themselves recently (`queue.workers()`), read at each scrape (present only after `track_workers`) |
| `imagine_queue_up` | gauge | 1 when every read of the queue for this scrape answered, 0 when one failed or timed out (present once a queue gauge is tracked) |
| `imagine_jobs_total{state}` | counter | job transitions this process's worker saw: started, done, failed, retried, cancelled, released (present only after `track_worker`) |
| `imagine_jobs_running` | gauge | jobs in this worker's batch (present only after `track_worker`) |
| `imagine_iterations_total` | counter | job-iterations stepped (`rate()` of it: iterations per second; present only after `track_worker`) |
| `imagine_job_latency_seconds` | histogram | queued -> done, for jobs that finished (present only after `track_worker`) |
| `imagine_gpu_memory_allocated_bytes{device}` | gauge | `torch.cuda.memory_allocated` (present only after `track_worker`; no series on a CPU) |
| `imagine_gpu_memory_reserved_bytes{device}` | gauge | `torch.cuda.memory_reserved` (present only after `track_worker`; no series on a CPU) |
| `imagine_gpu_thread_alive` | gauge | 1 while the worker's GPU thread runs (present only after `track_worker`) |
| `imagine_discord_rate_limited_total` | counter | HTTP 429s the bot got from Discord (the bot increments it; present only after `export_discord_metrics`) |
| `imagine_discord_shard_connected{shard}` | gauge | 1 while that gateway shard is ready and answered (the bot sets it; present only after `export_discord_metrics`) |
| `imagine_discord_gateway_latency_seconds{shard}` | gauge | that shard's heartbeat round trip (present only after `export_discord_metrics`; absent without an open, answered connection) |

So a process that runs a GPU worker (`imagine-worker`, a bot with its embedded worker) has the
worker's metrics, and a bot without one (`--no-worker`) has none of them rather than zeros that an
alert on `imagine_gpu_thread_alive == 0` would read; only the bot tracks the store and the workers,
and only the bot, which runs the Discord client, has the `imagine_discord_*` metrics.

When a read of the queue fails (the store is down or slow), the gauges it feeds read NaN ("unknown")
for that scrape instead of their last values, and `imagine_queue_up` is 0: alert on
`imagine_queue_up == 0`, since a comparison with NaN is never true. A gauge whose value function
raises at scrape time (e.g. `torch.cuda.memory_allocated` after a sticky CUDA error) reads NaN too
(logged at WARNING once, until it works again): /metrics still answers 200 with every other metric.

This module imports neither torch nor discord (the bot imports it on machines without a GPU stack;
the worker hands it a torch device, and torch is imported only when that device is CUDA).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Collection, Iterator, Mapping, Union

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

log = logging.getLogger(__name__)

Check = Callable[[], Awaitable[Union[bool, Mapping[str, Any]]]]

# Seconds from submit to done: a draft job on a free GPU takes seconds, a seed job in a long line an hour.
LATENCY_BUCKETS = (1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600, float("inf"))
JOB_STATES = ("started", "done", "failed", "retried", "cancelled", "released")
STORE_STATES = ("queued", "running", "undelivered")   # imagine_queue_jobs{state}
NAN = float("nan")   # Prometheus' "unknown": what a gauge reads when its source could not be read


@dataclass
class Metrics:
    """The metric objects, in one registry (those read from the whole store only once tracked)."""

    queue_length: Gauge
    queue_up: Gauge        # registered with the first queue gauge (see Observability._add_queue_refresher)
    # These three are registered by track_store / track_workers (Observability._register_once): a
    # process that does not track them (a worker) must not export them: an alert would read its 0.
    store_jobs: Gauge
    kept_state_bytes: Gauge
    workers_alive: Gauge
    # The worker's metrics, from `jobs` to `gpu_alive`, are registered by track_worker
    # (`Observability.export_worker_metrics`): only the worker's hooks feed them, so a bot without a
    # GPU worker would export them at 0 forever, and `imagine_gpu_thread_alive == 0` would fire there.
    jobs: Counter
    jobs_running: Gauge
    iterations: Counter
    job_latency: Histogram
    gpu_memory_allocated: Gauge
    gpu_memory_reserved: Gauge
    gpu_alive: Gauge
    # The Discord client's metrics are registered by `Observability.export_discord_metrics` (the bot):
    # `imagine-worker` has no Discord client, and a 429 counter at 0 forever there would be a lie.
    discord_rate_limited: Counter
    discord_shard_connected: Gauge
    discord_gateway_latency: Gauge

    @classmethod
    def create(cls, registry: CollectorRegistry) -> "Metrics":
        return cls(
            queue_length=Gauge("imagine_queue_length", "Jobs waiting in the line", registry=registry),
            queue_up=Gauge("imagine_queue_up", "1 when every read of the queue for this scrape answered, else 0",
                           registry=None),
            # Not `imagine_jobs`: the counter of this process's transitions owns that name.
            store_jobs=Gauge("imagine_queue_jobs",
                             "Jobs in the whole store by state (queued, running, undelivered)", ["state"],
                             registry=None),
            kept_state_bytes=Gauge("imagine_kept_state_bytes",
                                   "Bytes of finished jobs' state.pt kept in the store (what keep_state_gib bounds)",
                                   registry=None),
            workers_alive=Gauge("imagine_workers_alive",
                                "GPU workers that claimed, heartbeated or announced themselves within the liveness window",
                                registry=None),
            jobs=Counter("imagine_jobs", "Job transitions seen by this process", ["state"], registry=None),
            jobs_running=Gauge("imagine_jobs_running", "Jobs in this worker's batch", registry=None),
            iterations=Counter("imagine_iterations", "Job-iterations stepped on the GPU", registry=None),
            job_latency=Histogram("imagine_job_latency_seconds", "Seconds from submit to done",
                                  buckets=LATENCY_BUCKETS, registry=None),
            gpu_memory_allocated=Gauge("imagine_gpu_memory_allocated_bytes", "torch.cuda.memory_allocated",
                                       ["device"], registry=None),
            gpu_memory_reserved=Gauge("imagine_gpu_memory_reserved_bytes", "torch.cuda.memory_reserved",
                                      ["device"], registry=None),
            gpu_alive=Gauge("imagine_gpu_thread_alive", "1 while the worker's GPU thread runs", registry=None),
            discord_rate_limited=Counter("imagine_discord_rate_limited", "HTTP 429 answers from Discord",
                                         registry=None),
            discord_shard_connected=Gauge("imagine_discord_shard_connected",
                                          "1 while the gateway shard is ready and its heartbeats answered",
                                          ["shard"], registry=None),
            discord_gateway_latency=Gauge("imagine_discord_gateway_latency_seconds",
                                          "Heartbeat round trip of the gateway shard", ["shard"], registry=None),
        )


class Observability:
    """Metrics of one process in its own registry, health checks, and the HTTP server for both.

    It is also the Worker's observer (see `engine.worker.Worker(observer=...)`): the Worker calls
    `iterations`, `job_started` and `job_ended`; the first from its GPU thread (prometheus-client's
    metrics are thread-safe).
    """

    def __init__(self, registry: CollectorRegistry | None = None, *, check_timeout: float = 3.0,
                 refresh_timeout: float = 2.0):
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = Metrics.create(self.registry)
        self.check_timeout = check_timeout
        self.refresh_timeout = refresh_timeout
        self._refreshers: list[tuple[Callable[[], Awaitable[None]], Callable[[], None] | None, bool]] = []
        self._queue_up_registered = False
        self._registered_late: set[int] = set()   # ids of the metrics _register_once registered
        self._queue_failing = False
        self._failing_functions: set[str] = set()
        self._shard_labels: set[str] = set()
        self._latency_labels: set[str] = set()
        for state in JOB_STATES:   # export every state at 0 from the start, so rate() sees the first one
            self.metrics.jobs.labels(state)

    # --- sources --------------------------------------------------------------------------------

    def add_refresher(self, refresh: Callable[[], Awaitable[None]],
                      on_failure: Callable[[], None] | None = None) -> None:
        """`refresh()` runs before each scrape of /metrics (with a timeout; failures are logged at DEBUG).
        `on_failure()` runs when it raised or timed out, e.g. to set its gauges to NaN (unknown)."""
        self._refreshers.append((refresh, on_failure, False))

    def _add_queue_refresher(self, refresh: Callable[[], Awaitable[None]], on_failure: Callable[[], None]) -> None:
        """A refresher that reads the queue: its failure sets its gauges to NaN and imagine_queue_up to 0."""
        if not self._queue_up_registered:
            self.registry.register(self.metrics.queue_up)
            self._queue_up_registered = True
        self._refreshers.append((refresh, on_failure, True))

    def _register_once(self, *metrics: Gauge | Counter | Histogram) -> None:
        """Register metrics made with `registry=None`, once: only a process that tracks them exports them."""
        for metric in metrics:
            if id(metric) not in self._registered_late:
                self.registry.register(metric)
                self._registered_late.add(id(metric))

    def set_function(self, gauge: Gauge, f: Callable[[], float], what: str) -> None:
        """`gauge.set_function(f)`, but a call of `f` that raises reads NaN (logged at WARNING once,
        until it works again) instead of failing the whole scrape. `what` names it in the log."""
        def value() -> float:
            try:
                result = float(f())
            except Exception as exc:  # noqa: BLE001 - one broken source must not take /metrics down
                if what not in self._failing_functions:
                    self._failing_functions.add(what)
                    log.warning("metric %s cannot be read, reporting NaN: %s: %s", what, type(exc).__name__, exc)
                return NAN
            if what in self._failing_functions:
                self._failing_functions.discard(what)
                log.info("metric %s can be read again", what)
            return result
        gauge.set_function(value)

    def track_queue(self, queue: Any) -> None:
        """Report `queue.count_queued()` as imagine_queue_length at each scrape (NaN when it fails)."""
        async def refresh() -> None:
            self.metrics.queue_length.set(await queue.count_queued())
        self._add_queue_refresher(refresh, lambda: self.metrics.queue_length.set(NAN))

    def track_store(self, queue: Any) -> None:
        """Report the whole store's jobs by state as imagine_queue_jobs{state} at each scrape:
        `count_queued()`, `len(running())` and `len(undelivered())` (finished, result not posted),
        and the kept states' bytes (`state_bytes()`) as imagine_kept_state_bytes.
        Every process sharing the queue reads the same numbers: the bot exports them (only a process
        that calls this has these gauges on its /metrics)."""
        self._register_once(self.metrics.store_jobs, self.metrics.kept_state_bytes)
        async def refresh() -> None:
            queued, running, undelivered, state_bytes = await asyncio.gather(
                queue.count_queued(), queue.running(), queue.undelivered(), queue.state_bytes())
            for state, count in zip(STORE_STATES, (queued, len(running), len(undelivered))):
                self.metrics.store_jobs.labels(state).set(count)
            self.metrics.kept_state_bytes.set(state_bytes)

        def unknown() -> None:
            for state in STORE_STATES:
                self.metrics.store_jobs.labels(state).set(NAN)
            self.metrics.kept_state_bytes.set(NAN)
        self._add_queue_refresher(refresh, unknown)

    def track_workers(self, queue: Any, within: float) -> None:
        """Report how many GPU workers claimed, heartbeated or announced themselves in the last `within` seconds
        (`queue.workers(max_age=within)`) as imagine_workers_alive at each scrape. Only a process that
        calls this (the bot) has it: a worker that exported a 0 would fire "no worker alive" alerts."""
        self._register_once(self.metrics.workers_alive)
        async def refresh() -> None:
            self.metrics.workers_alive.set(len(await queue.workers(max_age=within)))
        self._add_queue_refresher(refresh, lambda: self.metrics.workers_alive.set(NAN))

    def export_worker_metrics(self) -> None:
        """Put the worker's metrics (job counters, latency, iterations, batch size, GPU thread and
        memory) on /metrics. `track_worker` does it: only a process that runs a GPU worker has them."""
        m = self.metrics
        self._register_once(m.jobs, m.jobs_running, m.iterations, m.job_latency, m.gpu_memory_allocated,
                            m.gpu_memory_reserved, m.gpu_alive)

    def track_worker(self, worker: Any) -> None:
        """Observe an `engine.worker.Worker`: its job counters, batch size, GPU thread and GPU memory.
        These metrics are exported from here on (see `export_worker_metrics`)."""
        self.export_worker_metrics()
        worker.observer = self
        self.set_function(self.metrics.jobs_running, lambda: len(worker.running), "imagine_jobs_running")
        self.set_function(self.metrics.gpu_alive, lambda: 1.0 if worker.gpu_alive else 0.0,
                          "imagine_gpu_thread_alive")

        tracked = False

        async def refresh() -> None:   # the device is known once the models have loaded
            nonlocal tracked
            if not tracked and worker.models is not None:
                self.track_gpu(worker.models.device)
                tracked = True
        self.add_refresher(refresh)

    def track_gpu(self, device: Any) -> None:
        """Report CUDA memory of `device` (a torch.device or a string) at scrape time; a CPU adds nothing."""
        name = str(device)
        if not name.startswith("cuda"):
            return
        import torch   # only here: this module must not import torch for the bot

        dev = torch.device(name)
        self.set_function(self.metrics.gpu_memory_allocated.labels(name), lambda: torch.cuda.memory_allocated(dev),
                          f"imagine_gpu_memory_allocated_bytes{{device={name}}}")
        self.set_function(self.metrics.gpu_memory_reserved.labels(name), lambda: torch.cuda.memory_reserved(dev),
                          f"imagine_gpu_memory_reserved_bytes{{device={name}}}")

    # --- the Worker's observer hooks -------------------------------------------------------------

    def iterations(self, n: int) -> None:
        self.metrics.iterations.inc(n)

    def job_started(self, record: Any) -> None:
        self.metrics.jobs.labels("started").inc()

    def job_ended(self, record: Any, state: str) -> None:
        """`state`: done | failed | retried | cancelled | released. Latency is observed for done jobs."""
        self.metrics.jobs.labels(state).inc()
        if state == "done" and record is not None:
            self.metrics.job_latency.observe(max(0.0, time.time() - record.created_at))

    # --- the bot's hooks -------------------------------------------------------------------------

    def export_discord_metrics(self) -> None:
        """Put the Discord client's metrics (429s, each gateway shard's state and latency) on /metrics.
        The bot does it (`bot.launcher.track_shards`, `rate_limit_trace`): `imagine-worker` has no
        Discord client, so it has none of them rather than a 429 counter at 0 forever."""
        m = self.metrics
        self._register_once(m.discord_rate_limited, m.discord_shard_connected, m.discord_gateway_latency)

    def discord_rate_limited(self, n: int = 1) -> None:
        self.metrics.discord_rate_limited.inc(n)

    def discord_shards(self, shards: Mapping[int, tuple[bool, float | None]]) -> None:
        """The gateway shards now: shard id -> (connected, heartbeat latency in seconds or None).
        Shards no longer given lose their series; a latency of None removes that shard's latency."""
        m = self.metrics
        labels = {str(i) for i in shards}
        latencies = {str(i): lat for i, (_, lat) in shards.items() if lat is not None}
        for gone in self._shard_labels - labels:
            m.discord_shard_connected.remove(gone)
        for gone in self._latency_labels - set(latencies):
            m.discord_gateway_latency.remove(gone)
        for i, (connected, _) in shards.items():
            m.discord_shard_connected.labels(str(i)).set(1.0 if connected else 0.0)
        for label, latency in latencies.items():
            m.discord_gateway_latency.labels(label).set(latency)
        self._shard_labels, self._latency_labels = labels, set(latencies)

    # --- HTTP ------------------------------------------------------------------------------------

    async def refresh(self) -> None:
        """Run every refresher. One that fails has its `on_failure` run (its gauges read NaN); if it
        read the queue, imagine_queue_up is 0 for this scrape (a WARNING when that starts)."""
        async def one(refresh: Callable[[], Awaitable[None]], on_failure: Callable[[], None] | None) -> str | None:
            try:
                await asyncio.wait_for(refresh(), self.refresh_timeout)
                return None
            except Exception as exc:  # noqa: BLE001 - a scrape answers with what it has
                error = f"{type(exc).__name__}: {exc}"[:300]
                if isinstance(exc, asyncio.TimeoutError):
                    error = f"no answer within {self.refresh_timeout:g} s"
                log.debug("metrics refresh failed: %s", error)
                if on_failure is not None:
                    try:
                        on_failure()
                    except Exception:  # noqa: BLE001
                        log.exception("metrics refresh: clearing the gauges failed")
                return error
        errors = await asyncio.gather(*(one(r, f) for r, f, _ in self._refreshers))
        queue_errors = [e for (_, _, is_queue), e in zip(self._refreshers, errors) if is_queue and e is not None]
        if self._queue_up_registered:
            self.metrics.queue_up.set(0.0 if queue_errors else 1.0)
        if queue_errors and not self._queue_failing:
            log.warning("metrics: the queue cannot be read (%s); its gauges read NaN, imagine_queue_up 0",
                        queue_errors[0])
        elif not queue_errors and self._queue_failing:
            log.info("metrics: the queue can be read again")
        self._queue_failing = bool(queue_errors)

    def exposition(self) -> bytes:
        """The /metrics page. A collector that raises (a value function set on a gauge directly, not
        through `set_function`) is left out, logged, instead of turning the whole page into a 500."""
        try:
            body = generate_latest(self.registry)
        except Exception as exc:  # noqa: BLE001
            if "<collect>" not in self._failing_functions:   # once, until every metric collects again
                self._failing_functions.add("<collect>")
                log.warning("a metric cannot be collected, it is left out: %s: %s", type(exc).__name__, exc)
            return generate_latest(_SkipBroken(self.registry))
        self._failing_functions.discard("<collect>")
        return body

    async def run_checks(self, checks: dict[str, Check],
                         advisory: Collection[str] = ()) -> tuple[bool, dict[str, dict[str, Any]]]:
        """Every check at once: (all non-advisory checks passed, each check's report)."""
        async def one(check: Check) -> dict[str, Any]:
            try:
                result = await asyncio.wait_for(check(), self.check_timeout)
            except asyncio.TimeoutError:
                return {"ok": False, "error": f"no answer within {self.check_timeout:g} s"}
            except Exception as exc:  # noqa: BLE001
                return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
            if isinstance(result, Mapping):   # "ok" first, then the check's own details
                return {"ok": bool(result.get("ok")), **{k: v for k, v in result.items() if k != "ok"}}
            return {"ok": bool(result)}
        names = list(checks)
        results = await asyncio.gather(*(one(checks[n]) for n in names))
        report = dict(zip(names, results))
        return all(r["ok"] for n, r in report.items() if n not in advisory), report

    def app(self, checks: dict[str, Check] | None = None, advisory: Collection[str] = ()) -> web.Application:
        """`advisory`: names of checks reported but not counted for the status (see the module doc)."""
        checks = dict(checks or {})
        advisory = frozenset(advisory)

        async def healthz(request: web.Request) -> web.Response:
            ok, report = await self.run_checks(checks, advisory)
            body: dict[str, Any] = {"ok": ok, "checks": report}
            degraded = [name for name in report if name in advisory and not report[name]["ok"]]
            if degraded:
                body["degraded"] = degraded
            return web.json_response(body, status=200 if ok else 503)

        async def metrics(request: web.Request) -> web.Response:
            await self.refresh()
            body = await asyncio.to_thread(self.exposition)
            return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

        app = web.Application()
        app.router.add_get("/healthz", healthz)
        app.router.add_get("/metrics", metrics)
        return app

    async def start_http(self, host: str, port: int, checks: dict[str, Check] | None = None,
                         advisory: Collection[str] = ()) -> web.AppRunner:
        """Serve /healthz and /metrics on host:port (0: any free port; see `bound_port`). Stop with
        `await runner.cleanup()`. `advisory`: checks reported but not counted for the status."""
        runner = web.AppRunner(self.app(checks, advisory), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except BaseException:   # the port taken, say: the runner set up above is not left behind
            await runner.cleanup()
            raise
        log.info("health and metrics on http://%s:%d (/healthz, /metrics)", host, bound_port(runner))
        return runner


class _SkipBroken:
    """A registry's collectors, each collected on its own: one that raises is left out."""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry

    def collect(self) -> Iterator[Any]:
        collectors = list(getattr(self.registry, "_collector_to_names", {}))   # prometheus_client's own list
        if not collectors:
            yield from self.registry.collect()
            return
        for collector in collectors:
            try:
                families = list(collector.collect())
            except Exception as exc:  # noqa: BLE001
                log.debug("metric collector %r left out: %s: %s", collector, type(exc).__name__, exc)
                continue
            yield from families


def bound_port(runner: web.AppRunner) -> int:
    """The TCP port a runner from `start_http` listens on."""
    for site in runner.sites:
        server = getattr(site, "_server", None)
        if server is not None and server.sockets:
            return int(server.sockets[0].getsockname()[1])
    raise RuntimeError("the runner listens on no TCP socket")


# --- ready-made checks ---------------------------------------------------------------------------


def queue_check(queue: Any) -> Check:
    """Reachable when a cheap call (`count_queued`) answers; a dead Redis fails by timeout."""
    async def check() -> bool:
        await queue.count_queued()
        return True
    return check


def worker_check(worker: Any) -> Check:
    """The worker's GPU thread is running (False while the models still load, or after it died)."""
    async def check() -> bool:
        return bool(worker.gpu_alive)
    return check


def workers_check(queue: Any, within: float) -> Check:
    """At least one GPU worker claimed, heartbeated or announced itself in the last `within` seconds
    (`queue.workers(max_age=within)`; an idle worker claims every 0.25 s, a busy one heartbeats every
    second). Reports how many, and their ids: `{"ok": true, "alive": 2, "workers": ["gpu0", "gpu1"]}`."""
    async def check() -> dict[str, Any]:
        alive = sorted(await queue.workers(max_age=within))
        if alive:
            return {"ok": True, "alive": len(alive), "workers": alive}
        return {"ok": False, "alive": 0, "workers": [],
                "error": f"no GPU worker claimed, heartbeated or announced itself in the last {within:g} s: "
                         "queued jobs wait until one does (start imagine-worker, or check the workers' own /healthz)"}
    return check
