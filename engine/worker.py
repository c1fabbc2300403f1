"""The GPU executor: claims jobs from a JobQueue, runs them in one batch on its own thread,
publishes frames, saves checkpoints, stores the results.

One `Worker` owns one device. Its asyncio side talks to the queue (claims, heartbeats, events,
artifacts); its GPU thread only steps the `BatchRunner`, so the event loop never waits on the GPU
and the GPU never waits on the network. It runs inside the bot (the embedded default) or alone as
`imagine-worker --queue redis://...` on any host with a GPU (no Discord token needed).

Artifacts a finished job leaves in the queue: `final.png`, `video.mp4`, `state.pt` (the final
logits and optimiser state, for Continue and Remix; stored compactly, `compact_state`). Checkpoints
hold the exact state and the frames so far, so a job taken up by another worker resumes where it
stopped and its video still shows the whole generation. One is taken at a new run's first frame
when the rest of the run will take longer than `checkpoint_every`, then at a frame once that many
seconds have passed since the job's last one, and when the worker stops.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import io
import logging
import math
import os
import queue as thread_queue
import re
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np
import torch

from engine import package_version, video
from engine.cli import folder_argument, os_reason
from engine.compiling import AUTO, check_cuda_graphs, compile_options
from engine.generate import (
    BatchRunner, Frame, GenerationSettings, NonFiniteError, PromptError, Slot, check_state, compact_state,
    encode_targets, state_from_bytes, state_is_finite, state_to_bytes,
)
from engine.jobs import (
    GIB, MAX_GRID, Checkpoint, EventKind, JobEvent, JobQueue, JobRecord, JobSpec, JobState, check_keep_days,
    check_keep_state_days, check_keep_state_gib,
)
from engine.models import Models
from engine.outage import OutageLog
from engine.stopping import abandon, any_abandoned, exit_if_abandoned, exit_now

log = logging.getLogger(__name__)


DEFAULT_CHECKPOINT_EVERY = 60.0


DEFAULT_STALL_TIMEOUT = 900.0   # seconds one unit of GPU work may take before the GPU counts as hung


class GpuThreadDied(RuntimeError):
    """The reason a job fails when its worker's GPU thread died under it (retried elsewhere)."""


class NoEncoder(RuntimeError):
    """A job starts from an init image and this worker has no dVAE encoder. Rare: such a worker's
    claims pass over the jobs that need the encoder (`claim(init_images=False)`), so it meets only
    those the claim could not tell (its checkpoint turned out damaged; Redis: queued by an older
    version). Retried, so another worker (one with an encoder) gets it; its message is the reason
    the job ends with when every attempt met a worker without one."""


# How long stop() waits for a claim already in flight (to hand back what it took).
CLAIM_GRACE_ON_STOP = 5.0

# How long stop() waits for the store to take the worker out of its registry (a store unreachable
# would retry for its whole reconnect timeout): past it, the entry expires on its own.
LEAVE_REGISTRY_TIMEOUT = 5.0

# Seconds between two announcements (`JobQueue.announce_worker`) of a worker that claims nothing
# yet (torch.compile's warm-up: minutes on a GPU): the registry counts a worker as live for two
# leases (bot.launcher.worker_window: 60 s by default, at least 10 s), and claims, which keep it
# seen afterwards, come every `poll_every`.
ANNOUNCE_EVERY = 2.0


# Snapshots for checkpoints one run may hold at once (Worker._saving): the one being saved and the
# next, waiting for it. Further frames take none until the save is over: each is a full state (up
# to 384 MiB at grid 64), and with saves slower than `checkpoint_every` (always, at 0; or many jobs
# sharing a slow store) they would pile up in memory without bound, each waiting on the one before
# it, and the run's frames would fall further and further behind.
CHECKPOINT_STATES_PER_RUN = 2


# Jobs failing alone in a row with CUDA errors (no job stepping in between) after which the GPU
# counts as dead (Worker._note_failure): a CUDA error is sticky, every later kernel fails too.
CUDA_FAILURES_TO_LATCH = 3
_CUDA_ERROR = re.compile(r"CUDA error|CUBLAS_STATUS|cuDNN error|CUDNN_STATUS")


def _looks_like_cuda_error(exc: BaseException) -> bool:
    """Whether `exc` reads as a CUDA error (not out of memory: that one is the job's size, and the
    runner shrinks its passes for it)."""
    text = f"{type(exc).__name__}: {exc}"
    return bool(_CUDA_ERROR.search(text)) and not (
        isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in text or "ALLOC_FAILED" in text)


def check_checkpoint_every(seconds: float) -> float:
    """`checkpoint_every`: seconds, at least 0 (0: a checkpoint at every frame)."""
    seconds = float(seconds)
    if not seconds >= 0:   # NaN too
        raise ValueError(f"must be 0 (every frame) or a number of seconds, got {seconds!r}")
    return seconds


def seed_for(job_id: str) -> int:
    return int.from_bytes(hashlib.sha256(job_id.encode()).digest()[:4], "big")


def settings_for(spec: JobSpec, base: GenerationSettings, job_id: str) -> GenerationSettings:
    return replace(
        base, iterations=spec.iterations, frame_every=spec.frame_every, grid=spec.grid, cutn=spec.cutn,
        seed=spec.seed if spec.seed is not None else seed_for(job_id),
    )


def pack_checkpoint(state: dict[str, Any], frames_png: list[bytes]) -> bytes:
    frames = [torch.frombuffer(bytearray(p), dtype=torch.uint8) for p in frames_png]
    return state_to_bytes({"state": state, "frames": frames})


def unpack_checkpoint(data: bytes) -> tuple[dict[str, Any], list[bytes]]:
    """A checkpoint's state and frames' PNG bytes. One that unpickles (weights_only) but is not
    what pack_checkpoint writes (not a dict of a state and a list of byte tensors) is a
    DamagedCheckpoint: every worker would find the same."""
    blob = state_from_bytes(data)
    try:
        state, frames = blob["state"], blob["frames"]
        if not isinstance(state, dict) or not isinstance(frames, (list, tuple)):
            raise TypeError(f"a state of {type(state).__name__} and frames of {type(frames).__name__}")
        return state, [bytes(t.numpy().tobytes()) for t in frames]
    except (KeyError, TypeError, AttributeError, IndexError, ValueError, RuntimeError) as exc:
        raise DamagedCheckpoint(f"the checkpoint is not a state and its frames ({type(exc).__name__}: "
                                f"{exc})") from None


class DamagedCheckpoint(RuntimeError):
    """A checkpoint that is not what a worker writes for its job (its frames: not PNGs, not the
    job's size, too many; its state: another grid's logits, damaged optimiser or generator
    state, keys missing). Every worker would find the same, so the job starts over (from noise,
    or its parent's state) rather than failing: its progress is lost, its result is not. A
    checkpoint that does not unpickle at all is another matter (a torch another worker may read):
    that attempt fails and the job is retried elsewhere, up to the attempts cap."""


# A finished run's result writes (artifacts, then finish) are tried this many times in place before
# the job counts as failed (and is run again): 2 + 4 + 8 + 16 s between them.
STORE_RESULT_TRIES = 5

# Frames a checkpoint may hold beyond `iterations // frame_every + 2` (0, every frame_every, the last).
CHECKPOINT_FRAME_MARGIN = 2


def _check_checkpoint_iteration(state: Any, spec: JobSpec) -> None:
    """A worker checkpoints a run between its first and its last iteration (0 < iteration <
    spec.iterations), else DamagedCheckpoint: a run resumed at or past its end is done before its
    first step, and would never be stepped, finished or let go."""
    iteration = state.get("iteration") if isinstance(state, dict) else None
    if isinstance(iteration, bool) or not isinstance(iteration, int) or not 0 < iteration < spec.iterations:
        raise DamagedCheckpoint(f"the checkpoint is at iteration {iteration!r}; a job of {spec.iterations} "
                                "iterations is checkpointed only after its first and before its last")


def _unpack_with_pixels(data: bytes, spec: JobSpec) -> tuple[dict[str, Any], list[bytes], list[np.ndarray]]:
    """A checkpoint's state, its frames' PNGs and their pixels. Its frames are checked before they
    are decoded (the store is shared: another process wrote them): at most one per `frame_every`
    iterations (+ the first and last, + CHECKPOINT_FRAME_MARGIN), and no more than the run had made
    by the checkpoint's iteration (one at 0 and at every `frame_every` up to it), each a PNG (no
    other decoder is tried) of the job's size (8 x grid a side, RGB); else DamagedCheckpoint."""
    state, frames_png = unpack_checkpoint(data)
    _check_checkpoint_iteration(state, spec)
    most = spec.iterations // max(1, spec.frame_every) + 2 + CHECKPOINT_FRAME_MARGIN
    if len(frames_png) > most:
        raise DamagedCheckpoint(f"the checkpoint holds {len(frames_png)} frames; a job of {spec.iterations} "
                                f"iterations with a frame every {spec.frame_every} has at most {most}")
    # Its frames are those of iterations 0, frame_every, ... up to its own: more than that and they
    # disagree with its state (frames saved past it, or twice). The PNGs carry no iteration, so
    # which ones are extra cannot be told, and resumed, the video would show them twice or out of
    # order: the job starts over. Fewer is what a run whose frame could not be encoded keeps (_frame
    # drops it from the video): resumed, the video is what that run would have made.
    made = state["iteration"] // max(1, spec.frame_every) + 1
    if len(frames_png) > made:
        raise DamagedCheckpoint(f"the checkpoint at iteration {state['iteration']} holds {len(frames_png)} "
                                f"frames; a run there with a frame every {spec.frame_every} has made at most {made}")
    side = 8 * spec.grid
    pixels = []
    for i, png in enumerate(frames_png):
        try:
            pixels.append(np.asarray(_decode_png(png, (side, side))))
        except Exception as exc:  # noqa: BLE001 - whatever the decoder raises: the checkpoint is damaged
            raise DamagedCheckpoint(f"the checkpoint's frame {i + 1} of {len(frames_png)} is {exc}") from None
    return state, frames_png, pixels


def _unpack_resumable(data: bytes, spec: JobSpec, logits_shape: tuple[int, ...] | None):
    """`_unpack_with_pixels`, and its state checked as the slot that takes it will check it
    (`check_state` against the job's logits [1, V, g, g]; None: models not known, unchecked here):
    a state no slot of this job can take is as damaged as a bad frame, on every worker, so the
    job starts over rather than failing at its start on each."""
    state, frames_png, pixels = _unpack_with_pixels(data, spec)
    if logits_shape is not None:
        try:
            state = check_state(state, logits_shape)
        except ValueError as exc:
            raise DamagedCheckpoint(str(exc)) from None
    return state, frames_png, pixels


@dataclass
class _Running:
    """One run of a job on this worker (one claim), as the asyncio side tracks it.

    Runs are keyed by their lease id, here and on the GPU thread (the slot's key), never by job id:
    a run that lost its lease may still be stepping when this worker claims the same job again, and
    the two runs must not be mixed up (the old one's writes are refused, the new one's are not)."""

    record: JobRecord
    cancel: threading.Event = field(default_factory=threading.Event)
    frames_png: list[bytes] = field(default_factory=list)
    frames_pixels: list[np.ndarray] = field(default_factory=list)
    pending: list[asyncio.Future] = field(default_factory=list)
    similarity: float | None = None
    last_frame: asyncio.Task | None = None   # the newest _on_frame task: the next one waits for it
    # The last frame when its PNG encode failed: `_on_done` tries it once more (final.png must be
    # the last frame, not the newest one that happened to encode).
    unencoded_final: Frame | None = None
    # time.monotonic() just before the call that last renewed its lease (the claim, a heartbeat the
    # store accepted): the store's lease runs at least `lease` seconds from there (Worker._lapsing).
    renewed: float = field(default_factory=time.monotonic)

    @property
    def lease(self) -> str:
        """This run's claim token: every write about the job is fenced by it (engine.jobs)."""
        assert self.record.lease_id is not None, "a claimed job has a lease id"
        return self.record.lease_id


@dataclass
class _Start:
    """Handed to the GPU thread: everything to build a slot without touching the queue."""

    key: str                    # the run's lease id: the slot's key
    job_id: str
    spec: JobSpec
    settings: GenerationSettings
    init_logits: torch.Tensor | None
    state: dict[str, Any] | None
    keep_optimizer: bool = False
    # Pictures from spec.extra (decoded on the asyncio side): image prompts (image, weight, label)
    # and the init image (its dVAE codes start the logits when nothing else does).
    image_targets: list[tuple[Any, float, str]] = field(default_factory=list)
    init_image: Any = None


class Worker:
    def __init__(
        self,
        queue: JobQueue,
        models_loader: Callable[[], Models],
        *,
        worker_id: str | None = None,
        max_batch: int | None = None,
        grids: tuple[int, ...] | None = None,
        base_settings: GenerationSettings | None = None,
        heartbeat_every: float = 1.0,
        poll_every: float = 0.25,
        video_fps: float = 10.0,
        observer: Any = None,
        keep_days: float | None = None,
        keep_state_days: float | None = None,
        keep_state_gib: float | None = None,
        compile: bool | str = "auto",
        cuda_graphs: bool = False,
        checkpoint_every: float = DEFAULT_CHECKPOINT_EVERY,
        stall_timeout: float = DEFAULT_STALL_TIMEOUT,
        costliest: tuple[int, int] | None = None,
    ):
        self.queue = queue
        self.models_loader = models_loader
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{id(self) % 10000}"
        self.max_batch = max_batch        # None: chosen from free GPU memory at start (1 on a CPU)
        # (grid, cutn) of the costliest job this worker will be given, for that choice: the bot
        # knows it from its sizes and presets; None: the largest of `grids` (or 64) and base cutn.
        self.costliest = costliest
        self.grids = grids
        self.base_settings = base_settings or GenerationSettings()
        compile_options(compile)          # a bad setting fails here, not on the GPU thread later
        check_cuda_graphs(compile, cuda_graphs)
        self.compile = compile            # torch.compile for the BatchRunner (engine.generate)
        self.cuda_graphs = cuda_graphs    # a job alone replayed from a CUDA graph (BatchRunner; CUDA only)
        self.heartbeat_every = heartbeat_every
        self.poll_every = poll_every
        self.video_fps = video_fps
        self.models: Models | None = None
        self.running: dict[str, _Running] = {}   # by lease id (one per claim); see _Running
        self.iterations_done = 0          # for metrics: job-iterations since start
        self._inbox: thread_queue.Queue[_Start] = thread_queue.Queue()
        self._stop = threading.Event()
        # Set by the GPU thread once torch.compile's warm-up is done (at once when nothing is
        # compiled): the claim loop takes no job before (`_warm_up`).
        self.warmed_up = threading.Event()
        self._thread: threading.Thread | None = None
        self._tasks: list[asyncio.Task] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake = asyncio.Event()
        self._announce_failing = False   # the last `_announce` failed (logged once until one works)
        # A store outage (a full disk, Redis MISCONF) fails these for every running job, every beat or
        # frame: one traceback each, a line a minute while it lasts, one when they work again.
        self._heartbeats = OutageLog(log, "heartbeats")
        self._publishes = OutageLog(log, "frame publishes")
        self._checkpoint_saves = OutageLog(log, "checkpoint saves")
        self.gpu_alive = False
        self._gpu_error: BaseException | None = None   # what killed the GPU thread, if anything
        # The hang watchdog. A step that never returns (a hung driver, a kernel that never ends)
        # would keep its jobs for ever: the asyncio side renews their leases regardless. The GPU
        # thread marks when it starts a unit of work (a step, a slot's start) and clears it after;
        # one that takes longer than `stall_timeout` seconds (0: never) makes the GPU count as dead
        # (`_gpu_thread_ok`): no more heartbeats (others take the jobs when their leases expire), no
        # claims, and `imagine-worker` exits 1 to be restarted. It does not come back: a GPU that
        # hung once is not trusted with more jobs. The default leaves room for torch.compile's
        # first steps (minutes) and for a full batch on a slow GPU.
        if stall_timeout < 0 or not math.isfinite(stall_timeout):
            raise ValueError(f"stall_timeout: must be 0 (never) or a number of seconds, got {stall_timeout!r}")
        self.stall_timeout = stall_timeout
        self._busy_since: float | None = None   # GPU thread: monotonic start of its current work
        self._stalled = False
        # Metrics hooks (engine.observability.Observability): iterations(n) from the GPU thread,
        # job_started(record), job_ended(record, state) with state done|failed|retried|cancelled|released.
        self.observer = observer
        # Retention: prune jobs finished and delivered more than `keep_days` ago, at most once an
        # hour (None or 0: never; else at least an hour, see engine.jobs.check_keep_days). Several
        # workers may prune the same queue; the queue makes that safe.
        try:
            self.keep_days = check_keep_days(keep_days)
        except ValueError as exc:
            raise ValueError(f"keep_days: {exc}") from None
        # ...and a finished job's state.pt alone (48-192 MiB) after `keep_state_days` (None or 0: as
        # long as the job; more than keep_days is the same as keep_days: the job takes it along).
        # With keep_days None, states are still pruned: the rest of each job is kept for ever.
        try:
            keep_state_days = check_keep_state_days(keep_state_days)
        except ValueError as exc:
            raise ValueError(f"keep_state_days: {exc}") from None
        if keep_state_days is not None and self.keep_days is not None and keep_state_days >= self.keep_days:
            keep_state_days = None
        self.keep_state_days = keep_state_days   # the effective value: None when it changes nothing
        # ...and, whatever their age, the kept states total at most `keep_state_gib` GiB (None or 0:
        # no budget): checked after each job this worker finishes and at each hourly prune, the
        # oldest delivered ones going first (JobQueue.prune_states_over). Ages alone bound nothing:
        # 1-iteration jobs queued back to back each leave a full state.
        try:
            keep_state_gib = check_keep_state_gib(keep_state_gib)
        except ValueError as exc:
            raise ValueError(f"keep_state_gib: {exc}") from None
        self.keep_state_bytes = None if keep_state_gib is None else int(keep_state_gib * GIB)
        self._next_prune = 0.0            # loop time of the next prune
        self._prune_task: asyncio.Task | None = None
        self._budget_task: asyncio.Task | None = None
        self._budget_warned = -math.inf   # loop time of the last "over its budget" warning
        # Mid-run checkpoints are timed: a frame takes one only when this many seconds have passed
        # since the run's last one (0: every frame). A full-size state is 96 MiB at grid 32 and
        # 384 MiB at grid 64 (fp32 logits [1, 8192, g, g] and Adam's two moments): at every frame
        # (every couple of seconds per job on a GPU, times max_batch jobs) that is more than the
        # store should take. What a crash loses is at most this long of one job's work.
        try:
            self.checkpoint_every = check_checkpoint_every(checkpoint_every)
        except ValueError as exc:
            raise ValueError(f"checkpoint_every: {exc}") from None
        # GPU thread only: per slot key, (monotonic time, iteration) of its last snapshot taken for
        # a checkpoint (a resumed run starts at its checkpoint; a new run: -inf), then the run's
        # start (monotonic time, iteration), for its pace.
        self._checkpointed: dict[str, tuple[float, int, float, int]] = {}
        # Per slot key, the iteration its store holds a checkpoint of (or where the run started):
        # set at admission by the GPU thread, raised by the asyncio side once a save is accepted.
        # A stopping worker snapshots every run past it, so a save that failed is made up for.
        self._saved: dict[str, int] = {}
        # Per slot key: how many snapshots taken for checkpoints are not saved yet (counted up by
        # the GPU thread as it takes one, down by the frame task that carries it, whatever becomes
        # of it; dropped when the run leaves). At CHECKPOINT_STATES_PER_RUN the run's frames take
        # no more until one is over.
        self._saving: dict[str, int] = {}
        # Guards `_saved` and `_saving`, written by both the GPU thread and the asyncio side (a
        # check-then-write there could meet a pop here: a KeyError, or a gone run put back).
        self._book = threading.Lock()
        # GPU thread: single-slot failures in a row that look like CUDA errors (see _note_failure).
        self._cuda_failures = 0
        # Written by the GPU thread as it stops (worker.stop()), read once it has been joined:
        # per slot key, the snapshot to save before the job is handed back.
        self._stop_states: dict[str, dict[str, Any]] = {}

    def _observe(self, hook: str, *args: Any) -> None:
        if self.observer is None:
            return
        try:
            getattr(self.observer, hook)(*args)
        except Exception:  # noqa: BLE001 - metrics never break a job
            log.debug("observer %s failed", hook, exc_info=True)

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        if swept := await asyncio.to_thread(video.sweep_temp):   # left by a worker killed mid-encode
            log.info("removed %d video encode folder(s) left behind by a killed process", swept)
        if self.models is None:
            self.models = await in_daemon_thread(self.models_loader, name=f"load-{self.worker_id}")
        if self.max_batch is None:
            from engine.capacity import choose_max_batch

            # The largest grid this worker may be given: a slot of it is the costliest.
            grid = max(self.grids) if self.grids else max(64, self.base_settings.grid)
            cutn = self.base_settings.cutn
            if self.costliest is not None:
                grid, cutn = self.costliest
            self.max_batch = choose_max_batch(
                self.models.device, grid, cutn=cutn,
                precision=self.base_settings.precision, models=self.models,
            )
        self._thread = threading.Thread(target=self._gpu_loop, name=f"gpu-{self.worker_id}", daemon=True)
        self._thread.start()
        self._tasks = [
            asyncio.create_task(self._claim_loop(), name="worker-claim"),
            asyncio.create_task(self._heartbeat_loop(), name="worker-heartbeat"),
        ]
        log.info("worker %s started (max_batch=%d, device=%s, grids=%s)", self.worker_id, self.max_batch,
                 self.models.device, ",".join(map(str, self.grids)) if self.grids else "any")

    async def stop(self) -> None:
        """Stop claiming, stop the GPU thread after its current step, save each running job's state
        as its checkpoint (fenced by the run's lease) and hand the jobs back."""
        self._stop.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # The leases stay ours until each job is handed back: saving full-size checkpoints one
        # after another can take longer than a lease, and a job swept meanwhile would lose an
        # attempt and resume from an older checkpoint.
        keeper = asyncio.create_task(self._keep_leases(), name="worker-stop-leases")
        try:
            await self._hand_back()
        finally:
            keeper.cancel()
            await asyncio.gather(keeper, return_exceptions=True)
        await self._leave_registry()

    async def _leave_registry(self) -> None:
        """Stopped (its claims and heartbeats over, its jobs handed back): out of the registry now,
        not two leases from now. Meanwhile the bot's /healthz `workers` check and
        imagine_workers_alive counted it, and claim's retry rule held a job that failed on another
        worker back for it. Advisory: a store that cannot answer leaves the entry to expire."""
        if self._thread is None:   # never started (stopped while its models loaded): never listed
            return
        try:
            await asyncio.wait_for(self.queue.forget_worker(self.worker_id), LEAVE_REGISTRY_TIMEOUT)
        except Exception as exc:  # noqa: BLE001 - its entry expires after two leases instead
            log.warning("worker %s could not leave the queue's registry (%s): it counts as alive until its "
                        "entry expires", self.worker_id, str(exc) or type(exc).__name__)

    async def _keep_leases(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_every)
            for run in list(self.running.values()):
                try:
                    await self.queue.heartbeat(run.record.id, run.lease)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - the lease may survive the outage
                    self._heartbeats.failed(exc, f"job {run.record.id}, while stopping")
                else:
                    self._heartbeats.worked()

    async def _hand_back(self) -> None:
        stopped = True
        if self._thread is not None:
            # Still compiling (`_warm_up`): no job was claimed, nothing to wait for.
            warming = not self.warmed_up.is_set()
            await asyncio.to_thread(self._thread.join, 1 if warming else 30)
            stopped = not self._thread.is_alive()
            if not stopped:
                # Stuck in a torch/CUDA op: the process must not wait for it at exit, nor let
                # Python's finalisation end it inside C++ (std::terminate, exit 134).
                abandon(self._thread)
            if warming and not stopped:
                log.info("stopped during torch.compile's warm-up (no job had been claimed)")
                return
        if not stopped:   # a step that never ends: its slots are not ours to read
            log.warning("the GPU thread did not stop within 30 s: jobs handed back without a new checkpoint")
        states = self._stop_states if stopped else {}
        for key, run in list(self.running.items()):
            job_id = run.record.id
            # Its frames (and their checkpoints) first: the stop checkpoint carries every frame.
            await asyncio.gather(*run.pending, return_exceptions=True)
            if self.running.get(key) is not run:   # it ended meanwhile (done, failed, stopped)
                continue
            if self._gpu_error is not None:
                # Not a graceful hand-back: the thread died running these jobs, and one of them may
                # be why. A failed attempt (counted, and retried on another worker) instead of a
                # release, so a job that kills GPU threads cannot crash-loop workers for ever.
                await self._failed(key, GpuThreadDied(
                    f"the worker's GPU thread died: {type(self._gpu_error).__name__}: {self._gpu_error}"))
                continue
            state = states.get(key)
            if state is not None:
                await self._save_stop_checkpoint(run, state)
            # The job resumes from its last checkpoint (this one, if saved) on the next claim.
            try:
                if await self.queue.release(job_id, run.lease):
                    log.info("job %s handed back to the queue (worker stopping)", job_id)
                    self._observe("job_ended", run.record, "released")
                else:
                    log.info("job %s was no longer ours: nothing to hand back", job_id)
            except Exception:  # noqa: BLE001 - the lease will expire instead
                log.exception("could not hand job %s back", job_id)
        self.running.clear()
        self._stop_states = {}

    async def _save_stop_checkpoint(self, run: _Running, state: dict[str, Any]) -> None:
        job_id = run.record.id
        try:
            data = await asyncio.to_thread(pack_checkpoint, state, list(run.frames_png))
            ok = await self.queue.save_checkpoint(Checkpoint(job_id, state["iteration"], data), run.lease)
        except Exception:  # noqa: BLE001 - it resumes from its previous checkpoint instead
            log.exception("could not save job %s's checkpoint while stopping", job_id)
            return
        if ok:
            log.info("job %s checkpointed at iteration %d (worker stopping)", job_id, state["iteration"])
        else:
            log.info("job %s was no longer ours: its checkpoint was refused", job_id)

    async def __aenter__(self) -> "Worker":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    # --- asyncio side -----------------------------------------------------------------------

    async def _claim_loop(self) -> None:
        # An outage (a full disk, Redis down) fails every poll: its traceback is logged once, then
        # a line a minute while it lasts, and its end.
        claims = OutageLog(log, "claims")
        announced = -math.inf   # time.monotonic() of the last announcement
        while not self._stop.is_set():
            try:
                if not self.warmed_up.is_set():
                    # Compiling (`_warm_up`) before the first claim: no claim says meanwhile that this
                    # worker is alive, and the registry feeds the bot's /healthz `workers` check,
                    # imagine_workers_alive and its init_image check: it says so itself.
                    if self._gpu_thread_ok() and time.monotonic() - announced >= ANNOUNCE_EVERY:
                        announced = time.monotonic()
                        await self._announce()
                # A claim sweeps expired leases first: not while one of our own may have run out.
                elif len(self.running) < self.max_batch and self._gpu_thread_ok() and not self._lapsing():
                    sent = time.monotonic()
                    record = await self._claim()
                    claims.worked()
                    if record is not None:
                        await self._begin(record, claimed=sent)
                        continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a queue outage must not kill the worker
                claims.failed(exc)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), self.poll_every)
            except asyncio.TimeoutError:
                pass

    def _takes_init_images(self) -> bool:
        """Whether it has the dVAE encoder: without, the jobs that start from an init image wait
        for a worker with one (its claims pass over them)."""
        return self.models is None or self.models.encoder is not None

    async def _announce(self) -> None:
        """Tells the registry this worker is alive though it claims nothing yet. Advisory: a failure
        is logged once until one gets through (the claims that follow report a store outage)."""
        try:
            await self.queue.announce_worker(self.worker_id, self._takes_init_images())
        except Exception:  # noqa: BLE001 - the worker compiles on; it shows up at its first claim
            if not self._announce_failing:
                log.warning("could not announce worker %s to the queue's registry (it shows up at its first "
                            "claim)", self.worker_id, exc_info=True)
            self._announce_failing = True
        else:
            self._announce_failing = False

    async def _claim(self) -> JobRecord | None:
        """One claim. `stop()` cancels this loop, maybe while the store is committing a claim: the
        claim itself is shielded, and a job it took then is handed straight back (attempt not
        counted) instead of sitting RUNNING under a lease nobody renews until it expires."""
        claim = asyncio.ensure_future(self.queue.claim(self.worker_id, self.grids,
                                                       init_images=self._takes_init_images()))
        try:
            return await asyncio.shield(claim)
        except asyncio.CancelledError:
            try:
                # Not for ever: with the store unreachable the claim retries for the queue's whole
                # reconnect timeout, and a stop must not wait that out. A claim given up on that
                # took a job anyway leaves it under a lease that simply expires.
                record = await asyncio.wait_for(claim, CLAIM_GRACE_ON_STOP)
                if record is not None and record.lease_id is not None:
                    await self.queue.release(record.id, record.lease_id)
                    log.info("job %s handed back (claimed as the worker stopped)", record.id)
            except asyncio.TimeoutError:
                log.warning("a claim in flight as the worker stopped did not end within %.0f s (the queue "
                            "unreachable?): given up; a job it took comes back when its lease expires",
                            CLAIM_GRACE_ON_STOP)
            except Exception:  # noqa: BLE001 - its lease expires instead
                log.warning("a claim in flight as the worker stopped could not be handed back", exc_info=True)
            raise

    async def _begin(self, record: JobRecord, claimed: float | None = None) -> None:
        spec = record.spec
        run = _Running(record)
        if claimed is not None:
            run.renewed = claimed
        self.running[run.lease] = run
        # No prompt at INFO (it is the users' text): only at DEBUG.
        log.info("job %s started (attempt %d, grid %d, %d iterations, user %s)",
                 record.id, record.attempts, spec.grid, spec.iterations, spec.user_id)
        log.debug("job %s prompt: %r", record.id, spec.prompt)
        self._observe("job_started", record)
        try:
            settings = settings_for(spec, self.base_settings, record.id)
            init_logits, state, keep_optimizer = None, None, False
            checkpoint = await self.queue.load_checkpoint(record.id)
            if checkpoint is not None:
                try:
                    # Off the event loop, the PNGs' decoding too: in the bot it would stall Discord.
                    shape = None if self.models is None else (1, self.models.vocab_size, settings.grid, settings.grid)
                    state, run.frames_png, run.frames_pixels = await asyncio.to_thread(
                        _unpack_resumable, checkpoint.data, spec, shape)
                    log.info("job %s resumes from its checkpoint at iteration %d", record.id, state["iteration"])
                except DamagedCheckpoint as exc:
                    log.warning("job %s: its checkpoint is damaged (%s): starting it over", record.id, exc)
                    checkpoint, state, run.frames_png, run.frames_pixels = None, None, [], []
            if checkpoint is None and spec.parent_job_id:
                parent = await self.queue.get_artifact(spec.parent_job_id, "state.pt")
                if parent is None:
                    # (Pruned while this job waited: the bot checked it at submit.)
                    verb = "remixed" if spec.parent_kind == "remix" else "continued"
                    raise PromptError(f"the state of job {spec.parent_job_id} is gone (pruned): it cannot be {verb}; "
                                      "use /imagine with its prompt instead")
                parent_state = await asyncio.to_thread(state_from_bytes, parent)
                init_logits = parent_state["logits"]
                if spec.parent_kind == "continue":
                    state, keep_optimizer = parent_state, True
            image_targets, init_image = await self._pictures(spec, start=state is None and init_logits is None)
            self._inbox.put(_Start(run.lease, record.id, spec, settings, init_logits, state, keep_optimizer,
                                   image_targets, init_image))
        except Exception as exc:  # noqa: BLE001
            await self._failed(run.lease, exc)

    async def _pictures(self, spec: JobSpec, start: bool) -> tuple[list[tuple[Any, float, str]], Any]:
        """The job's image prompt and init image (spec.extra, uploaded by the bot as artifacts:
        `{"image_prompt": {"artifact": [id, name], "weight": w}, "init_image": {"artifact": [id, name]}}`).
        The init image is read only when it sets the start (no checkpoint, no parent)."""
        async def fetch(key: str) -> Any:
            ref = spec.extra.get(key)
            if not isinstance(ref, dict):
                return None
            upload_id, name = ref["artifact"]
            data = await self.queue.get_artifact(upload_id, name)
            if data is None:
                raise PromptError(f"the uploaded {key.replace('_', ' ')} is gone from the store: send it again")
            from engine.images import load_image

            image, _ = await asyncio.to_thread(load_image, data)
            return image

        targets = []
        prompt_image = await fetch("image_prompt")
        if prompt_image is not None:
            targets.append((prompt_image, float(spec.extra["image_prompt"].get("weight", 1.0)), "image prompt"))
        init_image = None
        if start and isinstance(spec.extra.get("init_image"), dict):
            assert self.models is not None
            if self.models.encoder is None:
                raise NoEncoder("this worker has no dVAE encoder, so it cannot start from an init image "
                                "(configure [worker] encoder, or imagine-worker --encoder)")
            init_image = await fetch("init_image")
        return targets, init_image

    async def _heartbeat_loop(self) -> None:
        loop = asyncio.get_running_loop()

        async def prune(keep_days: float | None, keep_state_days: float | None) -> None:
            # its own task: it never delays a heartbeat
            if keep_days is not None or keep_state_days is not None:
                try:
                    pruned = await self.queue.prune(
                        math.inf if keep_days is None else keep_days * 86400.0,
                        None if keep_state_days is None else keep_state_days * 86400.0)
                except asyncio.CancelledError:
                    raise
                except Exception:  # noqa: BLE001 - retried in an hour
                    log.warning("pruning old jobs failed", exc_info=True)
                    pruned = 0
                if pruned:
                    log.info("pruned %d jobs finished and delivered more than %g days ago", pruned, keep_days)
            await self._keep_states_in_budget()

        # Sweep expired leases here too (claim() does it, but with every worker busy nobody claims):
        # a dead worker's job goes back to the line within about lease * 1.5.
        sweep_every = max(self.heartbeat_every, float(getattr(self.queue, "lease", 30.0)) / 2)
        next_sweep = loop.time() + sweep_every
        sweeps = OutageLog(log, "sweeps of expired leases")
        while not self._stop.is_set():
            await asyncio.sleep(self.heartbeat_every)
            # A dead GPU thread runs nothing: let its jobs' leases expire so others take them.
            if self._gpu_thread_ok():
                beat = failed = False
                for run in list(self.running.values()):
                    sent = time.monotonic()
                    try:
                        ok = await self.queue.heartbeat(run.record.id, run.lease)
                    except asyncio.CancelledError:
                        raise
                    except Exception as exc:  # noqa: BLE001 - keep running; the lease may survive the outage
                        self._heartbeats.failed(exc, f"job {run.record.id}")
                        failed = True
                        continue
                    beat = True
                    if ok:
                        run.renewed = sent
                    else:
                        run.cancel.set()
                if beat and not failed:   # a whole round: no "works again" between two failing jobs
                    self._heartbeats.worked()
            # After our own heartbeats, so that a late wake-up of this loop never sweeps our own jobs;
            # and not while one of them failed long enough for our lease to have run out (see _lapsing).
            if loop.time() >= next_sweep and not self._lapsing():
                next_sweep = loop.time() + sweep_every
                try:
                    await self.queue.sweep()   # the queue logs the jobs it swept (their ids)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - the next sweep (or claim) will do it
                    sweeps.failed(exc)
                else:
                    sweeps.worked()
            prunes = (self.keep_days is not None or self.keep_state_days is not None
                      or self.keep_state_bytes is not None)
            if prunes and loop.time() >= self._next_prune and (
                    self._prune_task is None or self._prune_task.done()):
                self._next_prune = loop.time() + 3600.0
                self._prune_task = asyncio.create_task(prune(self.keep_days, self.keep_state_days),
                                                       name="worker-prune")
                self._tasks = [t for t in self._tasks if not t.done()] + [self._prune_task]  # stop() cancels it

    def _start_budget(self) -> None:
        """`_keep_states_in_budget` in a task of its own, one at a time (jobs of a batch finish
        together; a catch-up after the budget was lowered may take many transactions), so a job's
        end, its metric and its log never wait for it. stop() cancels it with the other tasks."""
        if self.keep_state_bytes is None or (self._budget_task is not None and not self._budget_task.done()):
            return
        if self._stop.is_set():   # stop() has cancelled its tasks: one started now would outlive the queue
            return
        self._budget_task = asyncio.create_task(self._keep_states_in_budget(), name="worker-state-budget")
        self._tasks = [t for t in self._tasks if not t.done()] + [self._budget_task]

    async def _keep_states_in_budget(self) -> None:
        """The kept states back under `keep_state_gib`, oldest delivered first (no budget: nothing).
        Never raises but a cancel: a failure waits for the next finished job or hourly prune."""
        if self.keep_state_bytes is None:
            return
        try:
            dropped = await self.queue.prune_states_over(self.keep_state_bytes)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - the next job's end or the hourly prune tries again
            log.warning("keeping the kept states under keep_state_gib failed", exc_info=True)
            return
        if dropped:
            log.info("deleted the final state of %d delivered job(s), the oldest, to keep the states "
                     "under %g GiB", dropped, self.keep_state_bytes / GIB)
            return
        # Nothing could go: said (hourly at most), for the store may still fill up (Redis: noeviction).
        loop = asyncio.get_running_loop()
        if loop.time() - self._budget_warned < 3600.0:
            return
        with contextlib.suppress(Exception):
            total = await self.queue.state_bytes()
            if total > self.keep_state_bytes:
                self._budget_warned = loop.time()
                log.warning("the kept states total %.1f GiB, over keep_state_gib (%g GiB), and none may go: "
                            "they are of jobs not yet posted, or the parents of waiting Continues and Remixes",
                            total / GIB, self.keep_state_bytes / GIB)

    def _lapsing(self) -> bool:
        """Whether the lease of a run this worker keeps may have run out in the store: its last
        renewal is over half a lease old (its heartbeats failed: the store unreachable for a while).
        No sweep, nor claim (which sweeps), until a heartbeat renews it: either would hand back a job
        this worker is running right now, spending an attempt and the work since its last
        checkpoint. Heartbeats come every `heartbeat_every` (1 s against a 30 s lease), so this holds
        back nothing while they get through. Runs let go on purpose are not kept: a dead or hung
        GPU's (no heartbeats, so that others take them), a cancelled or lost one."""
        if not self._gpu_thread_ok():
            return False
        limit = float(getattr(self.queue, "lease", 30.0)) / 2
        now = time.monotonic()
        return any(now - run.renewed > limit for run in list(self.running.values()) if not run.cancel.is_set())

    def _gpu_thread_ok(self) -> bool:
        return (self._thread is None or self._thread.is_alive()) and not self._hung()

    def gpu_thread_alive(self) -> bool:
        """Whether the GPU thread runs: False once started and then died (or stopped), or hung, or
        counted as dead after failing job after job with CUDA errors (`_note_failure`)."""
        return self._thread is not None and self._thread.is_alive() and not self._hung()

    def _hung(self) -> bool:
        """Whether the GPU thread's current work has run past `stall_timeout` (latched)."""
        if self._stalled:
            return True
        since = self._busy_since
        if self.stall_timeout and since is not None and time.monotonic() - since > self.stall_timeout:
            self._stalled = True
            self.gpu_alive = False
            self._gpu_error = GpuThreadDied(
                f"the GPU did not finish a step within {self.stall_timeout:g} s (hung)")
            log.error("worker %s: the GPU thread has been on one step for over %g s: counted as hung; "
                      "its jobs' leases are no longer renewed, so other workers take them",
                      self.worker_id, self.stall_timeout)
        return self._stalled

    def _from_gpu(self, fn: Callable[..., Any], *args: Any) -> None:
        """Called on the GPU thread: run `fn(*args)` as a task on the event loop (`args[0]`: the run's key)."""
        def schedule() -> None:
            task = asyncio.ensure_future(fn(*args))
            run = self.running.get(args[0])
            if run is not None:
                run.pending.append(task)
        assert self._loop is not None
        self._loop.call_soon_threadsafe(schedule)

    async def _on_frame(self, key: str, frame: Frame, state: dict[str, Any] | None) -> None:
        try:
            await self._frame(key, frame, state)
        finally:
            if state is not None:   # its checkpoint is over (saved, refused, failed, dropped): another may be taken
                with self._book:
                    left = self._saving.get(key, 0) - 1
                    if left > 0:
                        self._saving[key] = left
                    else:
                        self._saving.pop(key, None)   # never put back for a run that is gone

    async def _frame(self, key: str, frame: Frame, state: dict[str, Any] | None) -> None:
        """_on_frame's work: the frame's PNG, its event, then its checkpoint (`state`) if any."""
        run = self.running.get(key)
        if run is None:
            return
        job_id = run.record.id
        # One run's frames are handled in order, each after the one before: its PNG encode runs on
        # a thread pool, so two frames in flight could append out of order, and a checkpoint of
        # iteration N must carry the frames up to N, no later one (the resumed run makes those).
        previous, run.last_frame = run.last_frame, asyncio.current_task()
        if previous is not None:
            await asyncio.gather(previous, return_exceptions=True)
        # Every failure here is logged here, once: these tasks' exceptions are gathered (and
        # dropped) by whoever waits for them. The job runs on: a frame missing from the channel or
        # a checkpoint missing (a crash then resumes from the one before) is not worth failing it.
        try:
            png = await asyncio.to_thread(frame.png)
        except Exception:  # noqa: BLE001
            if frame.iteration >= frame.total:
                run.unencoded_final = frame   # the result's picture: tried again when the run ends
                log.warning("job %s: its last frame could not be encoded: trying again when it ends",
                            job_id, exc_info=True)
                return
            log.warning("job %s: the frame at iteration %d could not be encoded: dropped (not in the "
                        "video)", job_id, frame.iteration, exc_info=True)
            return
        run.frames_png.append(png)
        run.frames_pixels.append(frame.pixels)
        run.similarity = frame.similarity
        if self._stop.is_set():
            # Stopping: the stop checkpoint (_hand_back) carries this frame (when the GPU thread
            # stopped in time; else the job resumes from its last checkpoint). Its event and its own
            # checkpoint would only hold the stop up: in a store outage every write waits out its
            # reconnect timeout, and frames queued up during the outage would be written one by one.
            return
        # Fenced writes: refused once this run's claim is over (lease lost, taken over, finished),
        # even when this worker has claimed the job again since (that run has another lease).
        ok: bool | None
        began = self._publishes.clock()
        try:
            ok = await self.queue.publish(JobEvent(
                job_id=job_id, kind=EventKind.PROGRESS, iteration=frame.iteration, total=frame.total,
                similarity=frame.similarity, frame_png=png,
            ), run.lease)
        except Exception as exc:  # noqa: BLE001 - the next frame tries again
            self._publishes.failed(exc, f"job {job_id}, its frame at iteration {frame.iteration}, dropped")
            ok = None     # not known to be lost: its checkpoint is still tried (fenced)
        else:
            self._publishes.worked(began)
        if ok is not False and state is not None and not self._stop.is_set():
            began = self._checkpoint_saves.clock()
            try:
                data = await asyncio.to_thread(pack_checkpoint, state, list(run.frames_png))
                ok = await self.queue.save_checkpoint(Checkpoint(job_id, frame.iteration, data), run.lease)
                self._checkpoint_saves.worked(began)
                if ok:
                    with self._book:   # the GPU thread may be forgetting the run right now
                        if key in self._saved:   # not once the run has left the GPU thread
                            self._saved[key] = max(self._saved[key], frame.iteration)
            except Exception as exc:  # noqa: BLE001 - a crash resumes from the previous checkpoint instead
                self._checkpoint_saves.failed(exc, f"job {job_id} at iteration {frame.iteration}; a crash now "
                                                   "would resume from the one before")
        if ok is False and not run.cancel.is_set():
            log.warning("job %s is no longer ours (lease lost or taken over): stopping it here", job_id)
            run.cancel.set()  # the GPU thread drops the slot; _on_stopped follows

    async def _on_done(self, key: str, state: dict[str, Any]) -> None:
        run = self.running.get(key)
        if run is None:
            return
        job_id = run.record.id
        # Let this job's frame tasks (scheduled before this one) finish first.
        current = asyncio.current_task()
        await asyncio.gather(*(t for t in run.pending if t is not current), return_exceptions=True)
        try:
            await self._encode_final(run)
            try:
                try:
                    video_bytes: bytes | None = await asyncio.to_thread(
                        video.encode_frames_bytes, run.frames_pixels, fps=self.video_fps
                    )
                except video.VideoInterrupted as exc:   # a signal meant for the service: once more
                    log.info("job %s: its video's encoder was stopped (%s): encoding it again", job_id, exc)
                    video_bytes = await asyncio.to_thread(
                        video.encode_frames_bytes, run.frames_pixels, fps=self.video_fps
                    )
            except (video.VideoError, OSError) as exc:
                # The picture is done: a video that cannot be made (ffmpeg missing, broken, timed
                # out) must not throw it away and run the job again. The bot posts the final
                # image and says the video could not be made.
                video_bytes = None
                log.warning("job %s: its video could not be made, so it has none: %s", job_id,
                            str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__)
            # Kept for Continue / Remix (until keep_state_days / keep_days, or keep_state_gib's budget
            # takes it): compact, half the bytes.
            state_bytes = await asyncio.to_thread(lambda: state_to_bytes(compact_state(state)))
            if not await self._store_result(run, video_bytes, state_bytes):
                run.cancel.set()
                log.warning("job %s was no longer ours when it finished; result dropped", job_id)
                return
        except Exception as exc:  # noqa: BLE001
            await self._failed(key, exc)
            return
        finally:
            self.running.pop(key, None)
            self._wake.set()
        if await self._ended_cancelled(job_id):
            log.info("job %s cancelled: its cancel was asked before its run ended (its result is not posted)", job_id)
            self._observe("job_ended", run.record, "cancelled")
        else:
            self._observe("job_ended", run.record, "done")
            log.info("job %s done (similarity %.4f, %.1f s after submit)", job_id, run.similarity or 0.0,
                     time.time() - run.record.created_at)
        self._start_budget()   # its state is stored: that may put the states over

    async def _encode_final(self, run: _Running) -> None:
        """Make sure the run's newest PNG is its last frame: final.png is the result's picture, and an
        earlier frame posted as the result would be a wrong answer. A last frame whose encode failed
        is tried once more; a second failure (or no frame at all) fails the run, with a reason, for
        another attempt from its last checkpoint."""
        frame, run.unencoded_final = run.unencoded_final, None
        if frame is not None:
            try:
                png = await asyncio.to_thread(frame.png)
            except Exception as exc:  # noqa: BLE001 - said in the job's reason
                raise RuntimeError(f"its final image could not be encoded ({type(exc).__name__}: {exc})") from exc
            run.frames_png.append(png)
            run.frames_pixels.append(frame.pixels)
            run.similarity = frame.similarity
        if not run.frames_png:
            raise RuntimeError("the run ended without a final image")

    async def _store_result(self, run: _Running, video_bytes: bytes | None, state_bytes: bytes) -> bool:
        """The finished run's final.png, video.mp4 and state.pt, then `finish`: False when the job
        is no longer this run's. A store failure is tried again in place, STORE_RESULT_TRIES times
        in all (the run's lease is renewed meanwhile: it is still running here), so that a store
        hiccup does not throw a finished picture away and run the job again, an attempt spent (or
        fail it, on its last); the last failure is raised. A stop cuts the wait short: a failure
        then is raised at once."""
        job_id = run.record.id
        for attempt in range(1, STORE_RESULT_TRIES + 1):
            try:
                # Fenced: a worker that lost the job must not overwrite the new owner's results.
                # Each write replaces the same artifact: a repeat after a failure is harmless.
                # No video this time: an earlier attempt's (one that stored its results, then lost
                # the job before `finish`: its worker died, a store failure) is deleted, or the bot
                # would post that other run's video with this run's picture.
                return bool(
                    await self.queue.put_artifact(job_id, "final.png", run.frames_png[-1], run.lease)
                    and (await self.queue.delete_artifact(job_id, "video.mp4", run.lease) if video_bytes is None
                         else await self.queue.put_artifact(job_id, "video.mp4", video_bytes, run.lease))
                    and await self.queue.put_artifact(job_id, "state.pt", state_bytes, run.lease)
                    and await self.queue.finish(job_id, run.lease, run.similarity)
                )
            except Exception as exc:  # noqa: BLE001 - raised once the tries are spent
                if attempt == STORE_RESULT_TRIES or self._stop.is_set():
                    raise
                delay = min(30.0, 2.0 ** attempt)
                log.warning("job %s: storing its result failed (%s: %s); trying again in %.0f s", job_id,
                            type(exc).__name__, exc, delay)
            # A stop cuts the wait short (one last try). `_stop` is a threading.Event (the GPU thread
            # reads it): watched in steps, not awaited.
            waited_until = time.monotonic() + delay
            while not self._stop.is_set() and time.monotonic() < waited_until:
                await asyncio.sleep(min(0.25, max(0.0, waited_until - time.monotonic())))
        return False   # not reached: the loop returns or raises

    async def _ended_cancelled(self, job_id: str) -> bool:
        """Whether `finish` ended the job CANCELLED (its cancel was asked before the run ended: the
        store ends it so) rather than DONE. Read back for the log and the metric only: the job has
        ended either way, so a store that cannot answer now counts it done."""
        try:
            record = await self.queue.get(job_id)
        except Exception:  # noqa: BLE001
            log.debug("job %s: could not read how it ended", job_id, exc_info=True)
            return False
        return record is not None and record.state == JobState.CANCELLED

    async def _on_stopped(self, key: str) -> None:
        """The GPU thread dropped the run: cancelled by a user, or our lease was lost."""
        run = self.running.pop(key, None)
        self._wake.set()
        if run is None:
            return
        job_id = run.record.id
        try:
            record = await self.queue.get(job_id)
            if record is not None and record.cancel_requested and record.lease_id == run.lease:
                await self.queue.mark_cancelled(job_id, run.lease)
        except Exception:  # noqa: BLE001 - nobody awaits this task's result: say it here
            log.warning("job %s: could not mark it cancelled (its lease expires and the sweep cancels it)",
                        job_id, exc_info=True)
            return
        if record is not None and record.cancel_requested and record.lease_id == run.lease:
            log.info("job %s cancelled", job_id)
            self._observe("job_ended", run.record, "cancelled")
        else:
            log.info("job %s stopped here: no longer ours (lease lost or taken over)", job_id)

    async def _failed(self, key: str, exc: BaseException) -> None:
        run = self.running.pop(key, None)
        self._wake.set()
        if run is None:  # already dropped here (stopped, or ended): nothing of ours to fail
            log.debug("a run that already left this worker failed: %s", exc)
            return
        job_id = run.record.id
        # Bad input fails at once, never retried. So does a run gone non-finite (NaN) on the CPU (always
        # fp32): run again from its last checkpoint, with its generator's state, it would diverge the
        # same way. On a GPU it may be a half-precision overflow that another worker's (or a retry's)
        # arithmetic does not hit: retried, elsewhere first, like any failed run. So is NoEncoder (this
        # worker's lack, not the job's; rare, see there): another worker with an encoder takes it;
        # with none, the job ends after its attempts with that reason.
        on_cpu = self.models is None or self.models.device.type != "cuda"
        retry = not isinstance(exc, (PromptError, ValueError)) and not (isinstance(exc, NonFiniteError) and on_cpu)
        reason = str(exc) if isinstance(exc, (PromptError, NoEncoder)) else f"{type(exc).__name__}: {exc}"
        if isinstance(exc, PromptError):
            # Its message quotes the prompt: the reason goes to the user, the log says less.
            log.info("job %s failed: the prompt was rejected", job_id)
            log.debug("job %s: %s", job_id, reason)
        else:
            log.warning("job %s failed: %s", job_id, reason)
        try:
            state = await self.queue.fail(job_id, run.lease, reason[:500], retry=retry)
        except Exception:  # noqa: BLE001
            log.exception("could not mark job %s failed", job_id)
            return
        if state is None:  # refused: this run had lost the job (lease expired, taken over); nothing ended
            log.info("job %s was no longer ours when it failed here: left to its current run", job_id)
            return
        if state == JobState.QUEUED:
            log.info("job %s back in the queue for another attempt", job_id)
        self._observe("job_ended", run.record,
                      {JobState.QUEUED: "retried", JobState.CANCELLED: "cancelled"}.get(state, "failed"))

    # --- GPU thread -------------------------------------------------------------------------

    def _gpu_loop(self) -> None:
        assert self.models is not None
        runner = BatchRunner(self.models, compile=self.compile, cuda_graphs=self.cuda_graphs)
        if self.cuda_graphs:
            log.info("CUDA graphs for a job alone: %s", "on" if runner.cuda_graphs
                     else f"asked for, but not on {self.models.device} (CUDA only)")
        if runner.compiled:
            log.info("torch.compile on (compile=%r on %s): compiling before the first claim",
                     self.compile, self.models.device)
        elif self.compile == AUTO and self.models.device.type == "cuda":
            log.warning("torch.compile off: compile='auto' found no C compiler for Triton (install gcc "
                        "or set CC; docs/PERFORMANCE.md: it runs 1.7x faster compiled)")
        else:
            log.info("torch.compile off (compile=%r on %s)", self.compile, self.models.device)
        self.gpu_alive = True
        try:
            if runner.compiled:
                self._warm_up(runner)
            if self._stop.is_set():
                return
            self.warmed_up.set()
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._wake.set)   # the claim loop waited for this
            while not self._stop.is_set() and not self._stalled:
                self._busy_since = None           # waiting for work is not work (see _hung)
                self._admit(runner, block=len(runner) == 0)
                for key in [k for k in runner.slots if self._cancelled(k)]:
                    runner.remove(key)
                    self._forget(key)
                    self._from_gpu(self._on_stopped, key)
                if not len(runner):
                    continue
                self._busy_since = time.monotonic()
                # A slot that is done before its first step (admitted at or past its last
                # iteration: _unpack_with_pixels refuses such checkpoints, this is the backstop)
                # would never be stepped (BatchRunner.batches skips it), finished or removed, its
                # job kept RUNNING by our heartbeats for ever: it ends here, with a frame of where it is.
                for slot in [s for s in runner.slots.values() if s.done]:
                    try:
                        frame = runner.frames([slot])[0]
                    except Exception as exc:  # noqa: BLE001 - this job alone
                        runner.remove(slot.key)
                        self._forget(slot.key)
                        self._note_failure(exc)
                        self._from_gpu(self._failed, slot.key, exc)
                        continue
                    self._from_gpu(self._on_frame, slot.key, frame, None)
                    self._finish(runner, slot)
                if not len(runner) or self._stalled:
                    continue
                try:
                    # A failing pass is bisected by the runner: only the job that fails alone
                    # fails (retried on another worker); out of memory shrinks its passes.
                    results = runner.step(on_failure=self._slot_failed)
                except Exception as exc:  # noqa: BLE001 - not a pass (a bug of ours): fail the batch's jobs
                    for key in list(runner.slots):
                        runner.remove(key)
                        self._forget(key)
                        self._from_gpu(self._failed, key, exc)
                    if self.models.device.type == "cuda":
                        torch.cuda.empty_cache()
                    continue
                if results:
                    self._cuda_failures = 0       # the GPU stepped a job: it works
                self.iterations_done += len(results)
                self._observe("iterations", len(results))
                for slot, frame in results:
                    if frame is not None:
                        # Snapshots (Slot.state) are taken here, between two steps: the asyncio
                        # side serialises them while this thread steps on.
                        state = None
                        if not slot.done:
                            try:
                                state = self._checkpoint_snapshot(slot)
                            except Exception:  # noqa: BLE001 - this checkpoint only: the job runs on
                                log.exception("could not snapshot job %s for a checkpoint", self._job_id(slot.key))
                        self._from_gpu(self._on_frame, slot.key, frame, state)
                    if slot.done:
                        self._finish(runner, slot)
            # Stopping (worker.stop() joins this thread next): a snapshot of every run still ours
            # that moved since its last checkpoint, saved by stop() before it hands the job back.
            # Not after a hang: nothing read from that GPU is trusted (the jobs resume elsewhere).
            for key, slot in [] if self._stalled else list(runner.slots.items()):
                with self._book:
                    saved = self._saved.get(key, 0)
                if self._cancelled(key) or slot.iteration <= saved:
                    continue
                try:
                    state = slot.state()
                except Exception:  # noqa: BLE001 - it resumes from its last checkpoint instead
                    log.exception("could not snapshot job %s while stopping", self._job_id(key))
                    continue
                # Frame checkpoints are checked finite by their frames; this one has none. A run
                # that diverged since would overwrite its last good checkpoint with one that
                # fails at its next frame on every retry.
                if not state_is_finite(state):
                    log.warning("job %s diverged (non-finite logits or optimiser state at iteration %d): "
                                "no checkpoint while stopping; it resumes from its last one (iteration %d)",
                                self._job_id(key), slot.iteration, saved)
                    continue
                self._stop_states[key] = state
        except BaseException as exc:
            self._gpu_error = exc
            log.exception("GPU thread died: no more claims or heartbeats; its jobs go back as failed attempts")
            raise
        finally:
            self.gpu_alive = False

    def _job_id(self, key: str) -> str:
        """For the log, from either thread: the job a slot (keyed by its run's lease) runs."""
        run = self.running.get(key)
        return run.record.id if run is not None else f"(lease {key})"

    def _finish(self, runner: BatchRunner, slot: Slot) -> None:
        """GPU thread: `slot` is done: out of the runner, its final state to _on_done."""
        runner.remove(slot.key)
        self._forget(slot.key)
        try:
            final_state = slot.state()
        except Exception as exc:  # noqa: BLE001 - e.g. a CUDA error surfacing at the copy: this job alone
            self._note_failure(exc)
            self._from_gpu(self._failed, slot.key, exc)
            return
        self._from_gpu(self._on_done, slot.key, final_state)

    def _forget(self, key: str) -> None:
        """GPU thread: the run left the runner (done, failed, stopped): its checkpoint bookkeeping goes."""
        self._checkpointed.pop(key, None)
        with self._book:
            self._saved.pop(key, None)
            self._saving.pop(key, None)

    def _slot_failed(self, slot: Slot, exc: Exception) -> None:
        """GPU thread: the runner dropped `slot`, whose step failed alone."""
        self._forget(slot.key)
        self._note_failure(exc)
        self._from_gpu(self._failed, slot.key, exc)

    def _note_failure(self, exc: BaseException) -> None:
        """GPU thread: a job failed alone. A CUDA error is sticky (an illegal memory access, a
        device-side assert: the context is lost and every later kernel fails too), so after
        CUDA_FAILURES_TO_LATCH of them in a row, with no job stepping in between, the GPU counts as
        dead, as a hung one does (`_hung`): no more claims or heartbeats, the GPU thread ends, and
        `imagine-worker` exits 1 to be restarted. Else each job it claimed would spend an attempt
        here (bisection fails each job alone) and the worker would fail the whole queue."""
        if not _looks_like_cuda_error(exc):
            self._cuda_failures = 0
            return
        self._cuda_failures += 1
        if self._cuda_failures < CUDA_FAILURES_TO_LATCH or self._stalled:
            return
        self._gpu_error = GpuThreadDied(
            f"the GPU failed {self._cuda_failures} jobs in a row with CUDA errors, the last: "
            f"{type(exc).__name__}: {str(exc)[:200]}")
        self._stalled = True
        self.gpu_alive = False
        log.error("worker %s: %d jobs in a row failed with CUDA errors (the last: %s): the GPU counts as dead; "
                  "no more claims, and its jobs' leases are no longer renewed, so other workers take them",
                  self.worker_id, self._cuda_failures, str(exc)[:200])

    def _cancelled(self, key: str) -> bool:
        run = self.running.get(key)
        return run is None or run.cancel.is_set()

    def _checkpoint_snapshot(self, slot: Slot) -> dict[str, Any] | None:
        """GPU thread, at a frame: the slot's state for a checkpoint when one is due (at least
        `checkpoint_every` seconds since the run's last one; a new run's first frame if the rest of
        the run takes longer than that), else None. None too while the run already holds
        CHECKPOINT_STATES_PER_RUN snapshots not yet saved (`_saving`): `_checkpointed` is left as
        it is, so the next frame tries again."""
        with self._book:
            if self._saving.get(slot.key, 0) >= CHECKPOINT_STATES_PER_RUN:
                return None
        now = time.monotonic()
        last = self._checkpointed.get(slot.key)
        if self.checkpoint_every > 0 and last is not None:
            if last[0] == -math.inf:
                # A new run's first frame: worth a checkpoint only when the rest of the run takes
                # longer than checkpoint_every (at its pace so far). A short job then writes none
                # (a full-size checkpoint is 96-384 MiB), and a crash loses no more of it than the
                # timed rule allows.
                done = slot.iteration - last[3]
                left = (slot.settings.iterations - slot.iteration) * (now - last[2]) / max(done, 1)
                if left <= self.checkpoint_every:
                    return None
            elif now - last[0] < self.checkpoint_every:
                return None
        start = last[2:] if last is not None else (now, slot.iteration)
        self._checkpointed[slot.key] = (now, slot.iteration, *start)
        state = slot.state()
        with self._book:   # until the frame task that carries it is over (_on_frame)
            self._saving[slot.key] = self._saving.get(slot.key, 0) + 1
        return state

    def _warm_up(self, runner: BatchRunner) -> None:
        """Compile before the first claim: one step at batch 1 and one at batch 2 (dynamo compiles
        each once, batch 1 being specialised; larger batches reuse the second) of two throwaway
        slots with the worker's default settings. A job claimed meanwhile would sit "started" with
        no frame for the minute or more a compile takes on a GPU, and a second job joining it
        would freeze both for another; queued, the jobs wait where other workers can take them.
        Other grids or cut-out counts compile at their first step. Errors are logged, not raised:
        the jobs then compile (or fail) as they would have."""
        assert self.models is not None
        started = time.monotonic()
        settings = replace(self.base_settings, iterations=10, frame_every=10**6, seed=0)
        try:
            targets = encode_targets(self.models, "a warm-up")
            for size in range(1, min(2, self.max_batch or 1) + 1):
                if self._stop.is_set() or not runner.compiled:
                    break
                runner.add(Slot(("warm-up", size), self.models, targets, settings))
                self._busy_since = time.monotonic()   # each compile is a unit of GPU work for the watchdog
                runner.step()
            if self._stop.is_set():
                log.info("torch.compile's warm-up stopped after %.0f s", time.monotonic() - started)
            elif runner.compiled:
                log.info("torch.compile warmed up in %.0f s (batch sizes 1-%d, grid %d, cutn %d)",
                         time.monotonic() - started, len(runner), settings.grid, settings.cutn)
        except Exception:  # noqa: BLE001 - the jobs compile at their first step instead
            log.exception("torch.compile's warm-up failed; jobs compile at their first step")
        finally:
            for key in list(runner.slots):   # only the warm-up's: nothing is claimed before it ends
                runner.remove(key)
            self._busy_since = None
            if self.models.device.type == "cuda":
                torch.cuda.empty_cache()

    def _admit(self, runner: BatchRunner, block: bool) -> None:
        while True:
            try:
                start = self._inbox.get(timeout=0.1) if block else self._inbox.get_nowait()
            except thread_queue.Empty:
                return
            block = False
            self._busy_since = time.monotonic()   # building a slot and its first frame is GPU work
            try:
                slot = self._make_slot(start)
                runner.add(slot)
                # A resumed run starts at its checkpoint: the next is due `checkpoint_every` from
                # now. A new run (a Continue too: its parent's state is not this job's checkpoint)
                # takes its first at its first frame when the rest of it takes longer than that,
                # so a long job killed early resumes from there.
                resumed = start.state is not None and not start.keep_optimizer
                started = time.monotonic()
                self._checkpointed[slot.key] = (started if resumed else -math.inf, slot.iteration,
                                                started, slot.iteration)
                with self._book:
                    self._saved[slot.key] = slot.iteration
                if slot.iteration == 0 or start.keep_optimizer:
                    # Frame 0 (or the parent's last frame, for Continue) opens the video.
                    frame = runner.frames([slot])[0]
                    self._from_gpu(self._on_frame, slot.key, frame, None)
            except Exception as exc:  # noqa: BLE001 - e.g. out of memory, a decoder that cannot run
                # Fail the job (retried elsewhere), never the GPU thread: a dead thread with
                # heartbeating jobs would hold them forever.
                runner.remove(start.key)
                self._forget(start.key)
                self._note_failure(exc)
                self._from_gpu(self._failed, start.key, exc)
                if self._stalled:   # the GPU counts as dead: the rest wait where they are (see _note_failure)
                    return
                continue

    def _make_slot(self, start: _Start) -> Slot:
        assert self.models is not None
        from engine.image_prompts import init_logits_from_image, to_tensor

        res = self.models.clip_resolution
        images = [(to_tensor(image, res), weight, label) for image, weight, label in start.image_targets]
        targets = encode_targets(self.models, start.spec.prompt, images)
        init_logits = start.init_logits
        if init_logits is None and start.init_image is not None:
            init_logits = init_logits_from_image(self.models, start.init_image, start.settings.grid)
        if images or start.init_image is not None:
            log.info("job %s: %d CLIP targets (%d from an image prompt)%s", start.job_id, len(targets.labels),
                     len(images), ", starts from an init image" if start.init_image is not None else "")
        slot = Slot(start.key, self.models, targets, start.settings, init_logits)
        if start.state is not None:
            slot.load_state(start.state)
            if start.keep_optimizer:  # Continue: the parent's optimiser, RNG and lr ramp, a fresh count
                slot.as_continue()
                if start.spec.extra.get("rerolls"):
                    # A Reroll of a Continue: the same start, its own noise (its new seed), or it
                    # would be a copy of the continue it rerolls, picture for picture.
                    slot.generator.manual_seed(start.settings.seed)
        return slot


def _decode_png(data: bytes, size: tuple[int, int]):
    """A frame this engine wrote: an RGB PNG of `size`, checked from its header before its pixels
    are decoded (ValueError otherwise; Pillow's own errors for a damaged PNG). Only Pillow's PNG
    decoder is tried."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data), formats=("PNG",))
    except UnidentifiedImageError:
        raise ValueError("not a PNG") from None
    with image:
        if image.size != size or image.mode != "RGB":
            raise ValueError(f"a {image.size[0]}x{image.size[1]} {image.mode} PNG, not a {size[0]}x{size[1]} "
                             "RGB frame")
        return image.convert("RGB")


# --- imagine-worker ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from engine.cli import _Parser   # one-line usage errors, exit 2

    p = _Parser(
        prog="imagine-worker",
        description="Run a GPU worker for imagine-bot's queue (one process per GPU).",
        epilog="Health and metrics: --http-port 9100 serves /healthz (200 or 503, JSON) and /metrics "
               "(Prometheus). The model cache is --cache-dir, else $IMAGINE_CACHE, else ~/.cache/imagine-bot.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    p.add_argument("--queue", default=None,
                   help="queue URL: redis://host:6379/0 or sqlite:///path.db (default: the IMAGINE_QUEUE_URL "
                        "environment variable, where a Redis password belongs: a command line shows in ps)")
    p.add_argument("--clip-model", default="ViT-B/32")
    p.add_argument("--decoder", default="openai")
    p.add_argument("--trust-decoder", action="store_true",
                   help="allow loading a model file whose hash is not known good: a dVAE pickle (decoder and "
                        "--encoder) or a CLIP TorchScript file given by path (loading either runs code it holds)")
    p.add_argument("--known-sha256", action="append", default=[], type=_sha256, metavar="HEX",
                   help="the SHA-256 (sha256sum FILE) of a dVAE decoder / encoder pickle (or a CLIP TorchScript "
                        "file given by path) you checked, to load "
                        "without --trust-decoder, e.g. one placed in the cache by hand (repeatable; as the bot's "
                        "[worker] known_sha256)")
    p.add_argument("--encoder", default="openai", metavar="NAME_OR_PATH",
                   help="dVAE encoder for init images: 'openai' (the default, as the bot's [worker] encoder: "
                        "downloaded, pinned) or a local file; '' for none: this worker then leaves the jobs "
                        "that start from an init image to workers with one (they wait while none is running)")
    p.add_argument("--cache-dir", type=folder_argument("--cache-dir"), default=None)
    p.add_argument("--device", default="auto", type=_device, metavar="auto|cuda|cuda:N|cpu",
                   help="auto (the default): cuda when this host has a CUDA GPU, else the worker does not "
                        "start (a CPU worker would claim shared jobs at ~10 s a step); cpu runs on the CPU anyway")
    p.add_argument("--max-batch", type=_max_batch, default=None, metavar="N",
                   help="jobs stepped together, at least 1; 0 or unset (the default): as many as fit in free "
                        "GPU memory (1 on a CPU)")
    p.add_argument("--grids", type=_grids, default=None, metavar="G[,G...]",
                   help="take only jobs of these dVAE grids (32: 256x256, 64: 512x512, 128: 1024x1024), e.g. "
                        "a smaller GPU's worker with --grids 32; jobs of other grids wait for a worker that takes "
                        "them. The automatic --max-batch is sized for the largest. Default: every grid, sized "
                        "for grid 64")
    p.add_argument("--worker-id", default=None, type=_worker_id,
                   help="this worker's name in /healthz, metrics and logs (no ':'); default: host-pid-n")
    p.add_argument("--compile", nargs="?", const="inductor", default="auto", type=_compile, metavar="BACKEND[:MODE]",
                   help="torch.compile the hot loop: auto (the default: inductor on CUDA where a C compiler "
                        "is found, 1.7x the steps per second at batch 32 on an H200, docs/PERFORMANCE.md; "
                        "none on a CPU), "
                        "inductor (alone: --compile), inductor:reduce-overhead (CUDA graphs too), eager, "
                        "another backend torch._dynamo.list_backends() names, or '' (off)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="replay the step of a job that runs alone from a CUDA graph (CUDA only; not with "
                        "--compile inductor:reduce-overhead or max-autotune). Experimental: not yet measured on a GPU, "
                        "docs/PERFORMANCE.md")
    p.add_argument("--keep-days", type=_keep_days, default=DEFAULT_KEEP_DAYS, metavar="N",
                   help="delete jobs finished and delivered more than N days ago (records, images, videos, "
                        "state), uploaded pictures no job names that are N days old, and (SQLite) expired "
                        "settings, checked hourly; Continue/Remix of a pruned job then say 'gone'. N is "
                        f"{DEFAULT_KEEP_DAYS:g} by default, 0 (never) or at least 1/24 (an hour)")
    p.add_argument("--keep-state-days", type=_keep_state_days, default=DEFAULT_KEEP_STATE_DAYS, metavar="N",
                   help="delete only the final state (state.pt, 48-192 MiB, what Continue/Remix start from) of "
                        "jobs finished and delivered more than N days ago, hourly; their records, images and "
                        "videos stay --keep-days, and Continue/Remix of them then say 'gone'. N is "
                        f"{DEFAULT_KEEP_STATE_DAYS:g} by default, 0 (as long as the job: --keep-days) or at "
                        "least 1/24 (an hour); more than --keep-days is the same as --keep-days")
    p.add_argument("--keep-state-gib", type=_keep_state_gib, default=None, metavar="N",
                   help="keep the final states (state.pt, 48-192 MiB each) of finished jobs to N GiB in all: "
                        "after each job this worker finishes and hourly, while they total more, the state of "
                        "the oldest delivered job goes first (whatever --keep-state-days; Continue/Remix of it "
                        "then say 'gone'). Bounds the store's growth however many jobs are queued. 0 (the "
                        "default): no budget")
    p.add_argument("--checkpoint-every", type=_checkpoint_every, default=DEFAULT_CHECKPOINT_EVERY, metavar="SECONDS",
                   help="seconds between two checkpoints of a running job, taken at its frames (default "
                        f"{DEFAULT_CHECKPOINT_EVERY:g}; 0: every frame); a stopping worker checkpoints its jobs anyway")
    p.add_argument("--stall-timeout", type=_stall_timeout, default=DEFAULT_STALL_TIMEOUT, metavar="SECONDS",
                   help="a GPU step (or a job's start) running longer than this counts as a hung GPU: the "
                        "worker stops renewing its jobs' leases (other workers take them) and exits 1 to be "
                        f"restarted (default {DEFAULT_STALL_TIMEOUT:g}; 0: never; raise it if torch.compile's "
                        "first steps take longer)")
    p.add_argument("--log-level", default="INFO", type=str.upper,
                   choices=["CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG"])
    p.add_argument("--http-port", type=_port, default=None, metavar="PORT",
                   help="serve /healthz and /metrics on this port; 0: any free port, logged (not off, as the "
                        "bot's [http] port = 0 is; default: no HTTP server)")
    p.add_argument("--http-host", default="127.0.0.1", metavar="HOST",
                   help="address for --http-port (default 127.0.0.1; 0.0.0.0 in a container)")
    return p


def _number(check: Callable[[float], Any], unit: str) -> Callable[[str], Any]:
    """An argparse type: a number of `unit`, then `check` (its ValueError becomes the usage error)."""
    def parse(text: str) -> Any:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number of {unit}, got {text!r}") from None
        try:
            return check(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return parse


def check_stall_timeout(seconds: float) -> float:
    """--stall-timeout: seconds, at least 0 (0: no watchdog), and finite (Worker refuses inf)."""
    seconds = float(seconds)
    if not (seconds >= 0 and math.isfinite(seconds)):   # NaN too
        raise ValueError(f"must be 0 (no watchdog) or a number of seconds, got {seconds!r}")
    return seconds


# --keep-days: 0 (never) or at least an hour's worth of days (engine.jobs.check_keep_days);
# --checkpoint-every, --stall-timeout: seconds, at least 0 (their 0s differ: every frame, no watchdog).
_keep_days = _number(check_keep_days, "days")
_keep_state_days = _number(check_keep_state_days, "days")
_keep_state_gib = _number(check_keep_state_gib, "GiB")
_checkpoint_every = _number(check_checkpoint_every, "seconds")
_stall_timeout = _number(check_stall_timeout, "seconds")
# A finished job's state.pt is 48-192 MiB: kept for ever by default, a worker fills its disk.
DEFAULT_KEEP_DAYS = 30.0
# ...and its state.pt alone (48-192 MiB, for Continue / Remix, which come within hours or days).
DEFAULT_KEEP_STATE_DAYS = 7.0
DEVICE_FORMS = "auto, cpu, cuda or cuda:N"
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def _device(text: str) -> str:
    """--device: auto, cpu, cuda, cuda:N (torch's own error for `gpu` is a traceback at model load)."""
    value = text.strip().lower()
    if not _DEVICE.fullmatch(value):
        raise argparse.ArgumentTypeError(f"expected {DEVICE_FORMS}, got {text!r}")
    return value


def _max_batch(text: str) -> int | None:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 1 (0: as many as fit), got {value}")
    return value or None


def _grids(text: str) -> tuple[int, ...]:
    """--grids: whole numbers from 2 to MAX_GRID (as [imagine] sizes' grids), comma-separated;
    sorted, each once."""
    low, high = 2, MAX_GRID
    grids = set()
    for item in text.split(","):
        try:
            grid = int(item.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected grids such as 32,64, got {text!r}") from None
        if not low <= grid <= high:
            raise argparse.ArgumentTypeError(f"a grid is between {low} and {high} (32: 256x256), got {grid}")
        grids.add(grid)
    return tuple(sorted(grids))


def check_worker_id(worker_id: str) -> str:
    """A worker id without ':': SAQ's worker registry splits its keys on it, so `workers()` (the
    bot's /healthz, the metrics) would never list that worker. ValueError otherwise."""
    if ":" in worker_id:
        raise ValueError(f"must not contain ':' (the worker registry splits on it), got {worker_id!r}")
    return worker_id


def _worker_id(text: str) -> str:
    try:
        return check_worker_id(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port, 0 (any free one) to 65535, got {text!r}")
    return value


def _sha256(text: str) -> str:
    value = text.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", value):
        raise argparse.ArgumentTypeError(f"expected a SHA-256 as 64 hex digits (sha256sum FILE), got {text!r}")
    return value


def compile_backends() -> list[str]:
    """The torch.compile backends this torch knows (debug ones such as eager included), plugins too."""
    import torch._dynamo

    return sorted(torch._dynamo.list_backends(exclude_tags=()))


def check_compile(value: str) -> None:
    """ValueError unless `value` is a compile setting engine.compiling accepts, naming a backend this
    torch has: an unknown one used to pass here and kill the GPU thread at its first batch."""
    options = compile_options(value)
    if options is None:
        return
    known = compile_backends()
    if options["backend"] not in known:
        shown = [b for b in known if "TESTING" not in b]
        raise ValueError(f"compile {value!r}: torch has no backend {options['backend']!r} "
                         f"(known: {', '.join(shown)})")


def _compile(text: str) -> str:
    """--compile: a setting engine.compiling.compile_options accepts, with a backend torch knows."""
    try:
        check_compile(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _redact(url: str) -> str:
    """The queue URL without its password, for the log (engine.queue.redact_url)."""
    from engine.queue import redact_url

    return redact_url(url)


async def in_daemon_thread(fn: Callable[[], Any], name: str) -> Any:
    """`fn()` on a daemon thread of its own, awaited (Worker.start loads the models so: minutes of
    download on a first start, which a stop signal must not have to sit out; Docker kills 10 s after
    its SIGTERM). A cancelled await leaves the thread to finish, or to end with the process,
    unawaited; asyncio.to_thread would run it on the loop's executor, whose threads asyncio.run and
    the interpreter both wait for at exit."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():   # cancelled: no one waits for it any more
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def target() -> None:
        result, error = None, None
        try:
            result = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to whoever awaits it
            error = exc
        with contextlib.suppress(RuntimeError):   # the loop is closed: the process is on its way out
            loop.call_soon_threadsafe(settle, result, error)

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    try:
        return await future
    except asyncio.CancelledError:
        if thread.is_alive():   # the entry points then exit without it (engine.stopping.exit_if_abandoned)
            abandon(thread)
        raise


async def start_unless_stopped(worker: Worker, stop: asyncio.Event) -> bool:
    """`worker.start()` (the models' load: minutes on a first start), unless `stop` is set first:
    False, the start abandoned (the load's thread is left to end with the process). Its errors are
    raised."""
    if await _unless_stopped(worker.start(), stop):
        return True
    log.info("worker %s stopped before its models were loaded", worker.worker_id)
    return False


async def _unless_stopped(work: Any, stop: asyncio.Event) -> bool:
    """Await `work` unless `stop` is set first: then `work` is cancelled, and False. Its errors are
    raised."""
    start = asyncio.ensure_future(work)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({start, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        if not start.done():
            start.cancel()
        await asyncio.gather(start, stopped, return_exceptions=True)
    if start.cancelled():
        return False
    start.result()
    return True


def _say(message: str) -> int:
    """A setting to fix, in one line: exit status 2 (1 means "my GPU thread died, restart me")."""
    print(f"imagine-worker: {message}", file=sys.stderr)
    return 2


def missing_cuda_device(device: str) -> str | None:
    """Why `device` ("cuda", "cuda:N") names none of this host's CUDA GPUs, or None: checked before
    the queue opens and the models load (minutes of downloading CLIP, then torch's error)."""
    if not device.startswith("cuda"):
        return None
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if int(device.partition(":")[2] or 0) < count:
        return None
    return (f"this host has {count or 'no'} CUDA GPU{'s' if count != 1 else ''}"
            + (f" (cuda:0 to cuda:{count - 1})" if count else ""))


async def _serve(args: argparse.Namespace) -> int:
    from engine.cli import model_error, one_line
    from engine.models import DEFAULT_CACHE, ModelLoadError, load_models
    from engine.observability import Observability, queue_check, worker_check
    from engine.queue import open_queue, redact_secrets, store_trouble_hint
    from engine.queue.redis import CertificateNotVerified, unreachable

    device = args.device
    if device == "auto":   # before the queue: a worker that would not run must not claim anything
        if not torch.cuda.is_available():
            print("imagine-worker: --device auto: this host has no CUDA GPU, so no worker is started "
                  "(on a CPU a full-size step takes ~10 s and the worker would hold users' jobs for hours); "
                  "pass --device cpu to run on the CPU anyway, or run imagine-worker on a GPU host",
                  file=sys.stderr)
            raise SystemExit(2)
        device = "cuda"
    elif missing := missing_cuda_device(device):
        return _say(f"--device {device}: {missing}" + ("" if "(" in missing else "; --device cpu runs on the CPU"))
    try:
        queue = open_queue(args.queue)
    except Exception as exc:  # noqa: BLE001 - a URL main() did not catch: say so, not a traceback
        return _say(f"--queue: {one_line(redact_secrets(str(exc), args.queue))}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    worker: Worker | None = None

    def on_signal(signum: int) -> None:
        if stop.is_set():   # already stopping (checkpoints, hand-back) and not wanted any more
            exit_now(signum)
        name = signal.Signals(signum).name
        if worker is None:   # still opening the queue (a Redis is retried for up to 30 s)
            log.info("imagine-worker stopping (%s) before it started", name)
        else:   # said at once: checkpointing and handing back the running jobs can take a while
            log.info("worker %s stopping (%s): checkpointing and handing back its running jobs; a second "
                     "signal stops at once", worker.worker_id, name)
        stop.set()

    # From here on, before the queue opens: a signal while a Redis is retried stops at once, with
    # no traceback (and as PID 1 in a container, where SIGTERM has no default action, at all).
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    log.info("opening the queue %s", _redact(args.queue))   # a Redis that is down is retried for a while
    try:
        if not await _unless_stopped(queue.start(), stop):
            with contextlib.suppress(Exception):
                await queue.close()
            return 0
    except Exception as exc:  # noqa: BLE001 - a server that is down, a wrong host or password: one line
        with contextlib.suppress(Exception):
            await queue.close()
        detail = one_line(redact_secrets(str(exc), args.queue)).rstrip(".") or type(exc).__name__
        if isinstance(exc, CertificateNotVerified):   # no server trouble: it says the fix itself
            return _say(f"cannot open the queue {_redact(args.queue)}: {detail}")
        said = _say(f"cannot open the queue {_redact(args.queue)}: {detail}; check --queue / IMAGINE_QUEUE_URL "
                    f"and {store_trouble_hint(args.queue, detail)}")
        # Unreachable (down, restarting): 1, for a supervisor to restart it; else a setting to fix, 2.
        return 1 if unreachable(exc) else said
    log.info("queue %s", _redact(args.queue))
    cache = args.cache_dir or DEFAULT_CACHE
    worker = Worker(
        queue,
        lambda: load_models(args.clip_model, args.decoder, device, cache, args.trust_decoder,
                            encoder=args.encoder or None, known_sha256=frozenset(args.known_sha256),
                            trust_hint=TRUST_HINT_WORKER),
        worker_id=args.worker_id, max_batch=args.max_batch, grids=args.grids, keep_days=args.keep_days,
        keep_state_days=args.keep_state_days, keep_state_gib=args.keep_state_gib, compile=args.compile,
        cuda_graphs=args.cuda_graphs, checkpoint_every=args.checkpoint_every, stall_timeout=args.stall_timeout,
    )
    runner = None
    try:
        if args.http_port is not None:
            # Up before the models load: /healthz says "gpu": false until the GPU thread runs.
            obs = Observability()
            obs.track_queue(queue)
            obs.track_worker(worker)
            try:
                runner = await obs.start_http(args.http_host, args.http_port,
                                              {"queue": queue_check(queue), "gpu": worker_check(worker)})
            except OSError as exc:   # the port taken, say: the operator's setting, not a crash
                print(f"imagine-worker: cannot serve HTTP on {args.http_host}:{args.http_port}: {exc}",
                      file=sys.stderr)
                return 2
        try:
            if not await start_unless_stopped(worker, stop):   # stopped while the models load
                return 0
        except ModelLoadError as exc:   # a missing, corrupt, untrusted or undownloadable model file
            return _say(model_error(exc))
        except OSError as exc:   # the model cache cannot be made or written, say
            return _say(f"cannot load the models: {os_reason(exc)} (--cache-dir {cache})")
        return await until_stopped_or_gpu_dead(worker, stop)
    finally:
        await worker.stop()
        if runner is not None:
            await runner.cleanup()
        await queue.close()


async def until_stopped_or_gpu_dead(worker: Worker, stop: asyncio.Event, poll: float = 1.0) -> int:
    """Wait for `stop`: 0. Or for the worker's GPU thread to die: 1, so that `imagine-worker` exits
    and its supervisor (compose's restart policy, systemd) starts a fresh one, instead of a process
    that claims nothing and runs nothing until someone notices. (`worker.stop()` then fails its
    jobs as attempts, to be retried on another worker.)"""
    while not stop.is_set():
        if not worker.gpu_thread_alive():
            log.error("worker %s: its GPU thread died or hung (see the error above); exiting so that it is restarted",
                      worker.worker_id)
            return 1
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), poll)
    return 0


TRUST_HINT_WORKER = "pass --trust-decoder, or --known-sha256 with its SHA-256"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    source = "--queue"
    if not args.queue:   # --queue > IMAGINE_QUEUE_URL, as for the bot (which also has [queue] url)
        args.queue = os.environ.get("IMAGINE_QUEUE_URL", "").strip()
        source = "IMAGINE_QUEUE_URL"
        if not args.queue:
            parser.error("--queue URL or the IMAGINE_QUEUE_URL environment variable is required")
    from engine.queue import check_queue_url

    problem = check_queue_url(args.queue)
    if problem:
        parser.error(f"{source}: {problem}")
    try:
        check_cuda_graphs(args.compile, args.cuda_graphs)
    except ValueError as exc:
        parser.error(f"--cuda-graphs: {exc}")
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        code = asyncio.run(_serve(args))
    except Exception:
        if any_abandoned():   # the traceback now: exit_if_abandoned leaves without the usual one
            log.exception("imagine-worker stopped on an error")
            exit_if_abandoned(1)
        raise
    exit_if_abandoned(code)   # a stop during the models' load (or a hung GPU thread): not waiting for it
    return code


if __name__ == "__main__":
    sys.exit(main())
