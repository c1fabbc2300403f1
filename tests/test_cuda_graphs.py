"""BatchRunner(cuda_graphs=...): a job alone in its batch has its whole step captured and replayed.

CUDA graphs need a GPU (benchmarks/cuda_check.py checks the real capture there: graphed frames
against eager ones). Here, on a CPU, the runner gets a capture function that stands in for
`engine.graphs.capture_step`: it records what was captured and returns the step itself as the
"replay", so every replay runs the captured step eagerly. What that checks is the runner's part,
which is the same on a GPU: when it captures, warms up, replays and drops a graph; the learning
rate and the loss passed through tensors; the iteration count, frames and checkpoints of a graphed
job; a capture that fails.
"""

from __future__ import annotations

import copy
import gc
import io
import logging
import weakref
from dataclasses import dataclass, field, replace

import numpy as np
import pytest
import torch
from PIL import Image

from engine import graphs
from engine.generate import GRAPH_MIN_REPLAYS, GRAPH_WARMUP_STEPS, BatchRunner, Slot, batch_key, generate, state_from_bytes
from engine.jobs import EventKind, JobState
from engine.worker import Worker
from tests.queue_fixtures import job_events
from tests.test_batching import (LOGITS_MAX_TOL, LOGITS_MEAN_TOL, SCALAR_TOL, S, assert_close, make_slot,  # noqa: F401
                                 one_thread, run)  # one_thread: autouse
from tests.test_worker import queue, spec, wait_state  # noqa: F401 - queue: the fixture


# Long enough for a graph: its warm-up, then at least GRAPH_MIN_REPLAYS replays.
G = replace(S, iterations=GRAPH_WARMUP_STEPS + GRAPH_MIN_REPLAYS)


@dataclass
class StandIn:
    """A capture function for a CPU: records each capture, and each replay's learning rate. A real
    graph reads the tensors it was captured with: each replay must find the very learning-rate
    tensor of its capture (filled with its step's value), not a new one or a float."""
    captured: list[torch.Generator] = field(default_factory=list)
    replay_lrs: list[float] = field(default_factory=list)
    slots: list[Slot] = field(default_factory=list)

    def __call__(self, step, generator):
        self.captured.append(generator)
        (slot,) = [s for s in self.slots if s.generator is generator]
        lr = slot.optimizer.param_groups[0]["lr"]
        assert torch.is_tensor(lr)

        def replay():
            assert slot.optimizer.param_groups[0]["lr"] is lr
            self.replay_lrs.append(float(lr))
            step()
        return replay

    def slot(self, models, key, settings=S) -> Slot:
        slot = make_slot(models, key, settings)
        self.slots.append(slot)
        return slot


def test_a_job_alone_is_captured_after_its_warm_up_and_replayed_to_the_same_result(tiny_models):
    graphed = StandIn()
    slot = graphed.slot(tiny_models, "a", G)
    got = run(tiny_models, {0: [slot]}, cuda_graphs=graphed)["a"]
    plain = run(tiny_models, {0: [make_slot(tiny_models, "a", G)]})["a"]

    assert graphed.captured == [slot.generator]                  # one capture, of its own generator
    # Each replay read the learning rate of its step, filled in before it (a float would be stale).
    assert graphed.replay_lrs == pytest.approx([min(G.lr * G.lr_growth ** i, G.lr_max)
                                                for i in range(GRAPH_WARMUP_STEPS, G.iterations)], rel=1e-6)
    assert len(graphed.replay_lrs) == GRAPH_MIN_REPLAYS
    assert [f[0] for f in got.frames] == list(range(2, G.iterations + 1, 2)) and slot.iteration == G.iterations
    assert_close(got, plain)                                    # frames (their losses too) and logits


def test_a_job_with_too_few_steps_left_for_a_graph_runs_without_one(tiny_models):
    graphed = StandIn()
    short = replace(G, iterations=G.iterations - 1)
    slot = graphed.slot(tiny_models, "a", short)
    got = run(tiny_models, {0: [slot]}, cuda_graphs=graphed)["a"]
    assert graphed.captured == [] and slot.iteration == short.iterations
    assert not torch.is_tensor(slot.optimizer.param_groups[0]["lr"])    # its Adam untouched
    assert_close(got, run(tiny_models, {0: [make_slot(tiny_models, "a", short)]})["a"])


def test_a_graph_is_dropped_when_another_job_joins_and_made_again_when_it_is_alone(tiny_models):
    settings = replace(S, iterations=6 + G.iterations)
    graphed = StandIn()
    a, b = graphed.slot(tiny_models, "a", settings), graphed.slot(tiny_models, "b", replace(settings, iterations=2))
    # "a" alone for steps 0-3 (captured at step 2), with "b" for steps 4-5, alone again from 6.
    got = run(tiny_models, {0: [a], 4: [b]}, cuda_graphs=graphed)
    plain = run(tiny_models, {0: [make_slot(tiny_models, "a", settings)],
                              4: [make_slot(tiny_models, "b", replace(settings, iterations=2))]})
    assert got["a"].batch_sizes == [1] * 4 + [2] * 2 + [1] * G.iterations
    assert graphed.captured == [a.generator, a.generator]        # captured again once alone (and warm)
    assert len(graphed.replay_lrs) == (4 - GRAPH_WARMUP_STEPS) + GRAPH_MIN_REPLAYS
    assert_close(got["a"], plain["a"])
    assert_close(got["b"], plain["b"])


def test_a_batch_run_in_passes_of_one_has_no_graphs(tiny_models):
    graphed = StandIn()
    runner = BatchRunner(tiny_models, cuda_graphs=graphed)
    a, b = runner.add(graphed.slot(tiny_models, "a")), runner.add(graphed.slot(tiny_models, "b"))
    runner.pass_limit[batch_key(a.settings)] = 1      # as out-of-memory errors would have taught it
    while runner.batches():
        runner.step()
    assert graphed.captured == [] and a.done and b.done


def test_a_graphed_jobs_state_resumes_anywhere(tiny_models):
    """A graphed slot's Adam holds its learning rate as a tensor (and on CUDA is `capturable`,
    which only runs on a GPU): its state saves plain floats and capturable off, so a CPU worker, or
    a runner without graphs, resumes it, and the run continues as an uninterrupted one."""
    graphed = StandIn()
    runner = BatchRunner(tiny_models, cuda_graphs=graphed)
    slot = runner.add(graphed.slot(tiny_models, "a", G))
    for _ in range(GRAPH_WARMUP_STEPS + 2):
        runner.step()
    assert graphed.captured and torch.is_tensor(slot.optimizer.param_groups[0]["lr"])
    state = slot.state()
    (group,) = state["optimizer"]["param_groups"]
    assert type(group["lr"]) is float and group["capturable"] is False

    resumed = make_slot(tiny_models, "a", G)
    resumed.load_state(copy.deepcopy(state))   # a copy: Adam steps on the very tensors it loaded
    rest = run(tiny_models, {0: [resumed]})["a"]
    whole = run(tiny_models, {0: [make_slot(tiny_models, "a", G)]})["a"]
    whole.frames = [f for f in whole.frames if f[0] > GRAPH_WARMUP_STEPS + 2]   # the frames after the resume
    assert rest.frames
    assert_close(rest, whole)

    # A state saved by an Adam that was not fused (this project's before it was, or another
    # version's worker in the fleet) resumes as fused, and the run goes on the same.
    state["optimizer"]["param_groups"] = [dict(g, fused=None) for g in state["optimizer"]["param_groups"]]
    older = make_slot(tiny_models, "a", G)
    older.load_state(state)
    assert older.optimizer.param_groups[0]["fused"] is True
    assert_close(run(tiny_models, {0: [older]})["a"], rest)


def test_a_capture_that_fails_is_logged_once_and_the_job_runs_on_without_graphs(tiny_models, caplog):
    captures = []

    def failing(step, generator):
        captures.append(generator)
        torch.rand(8, generator=generator)         # draws before it fails: they must be put back
        raise RuntimeError("operation not permitted when stream is capturing")

    caplog.set_level(logging.WARNING, logger="engine.generate")
    got = run(tiny_models, {0: [make_slot(tiny_models, "a", G)], G.iterations: [make_slot(tiny_models, "c", G)]},
              cuda_graphs=failing)
    plain = run(tiny_models, {0: [make_slot(tiny_models, "a", G)], G.iterations: [make_slot(tiny_models, "c", G)]})
    assert len(captures) == 1                       # once: no capture is tried again, "c" alone runs eager
    warned = [r.getMessage() for r in caplog.records if "CUDA graph" in r.getMessage()]
    assert len(warned) == 1 and "operation not permitted" in warned[0], warned
    assert_close(got["a"], plain["a"])
    assert_close(got["c"], plain["c"])


def test_a_capture_out_of_memory_leaves_that_job_eager_and_the_next_job_alone_gets_a_graph(tiny_models, caplog):
    """Out of memory is the moment's, not the runner's: the job whose capture did not fit runs on
    eagerly (no capture tried again for it), a later job alone is captured as usual."""
    graphed = StandIn()
    real = graphed.__call__
    tries = []

    def first_runs_out(step, generator):
        tries.append(generator)
        if len(tries) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(step, generator)

    caplog.set_level(logging.WARNING, logger="engine.generate")
    a, c = graphed.slot(tiny_models, "a", G), graphed.slot(tiny_models, "c", G)
    got = run(tiny_models, {0: [a], G.iterations: [c]}, cuda_graphs=first_runs_out)
    plain = run(tiny_models, {0: [make_slot(tiny_models, "a", G)], G.iterations: [make_slot(tiny_models, "c", G)]})
    assert len(tries) == 2 and tries[1] is c.generator and graphed.captured == [c.generator]
    assert tries[0] is not a.generator      # a new generator for "a" after its failed capture, in the same state
    assert len(graphed.replay_lrs) == GRAPH_MIN_REPLAYS       # c's
    warned = [r.getMessage() for r in caplog.records if "CUDA graph" in r.getMessage()]
    assert len(warned) == 1 and "ran out of memory" in warned[0], warned
    assert_close(got["a"], plain["a"])
    assert_close(got["c"], plain["c"])


def test_a_failed_captures_memory_is_freed_before_the_job_steps_on(tiny_models):
    """What a failed capture allocated (its graph's memory, the tensors of its step) is held by
    the error's traceback: it must go before the eager step that follows, not whenever the garbage
    collector runs (on a GPU the eager step would run out of memory beside it)."""
    held = []

    def allocates_then_runs_out(step, generator):
        buffer = torch.empty(1 << 20)                 # what the capture took
        held.append(weakref.ref(buffer))
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    runner = BatchRunner(tiny_models, cuda_graphs=allocates_then_runs_out)
    runner.add(make_slot(tiny_models, "a", G))
    gc.disable()                                      # refcounts alone: no collector to clean up after us
    try:
        for _ in range(GRAPH_WARMUP_STEPS + 1):
            runner.step()
        assert held and held[0]() is None
    finally:
        gc.enable()


def test_out_of_memory_beside_a_graph_drops_it_and_runs_the_pass_again_before_learning_a_limit(tiny_models):
    """A graph holds its step's memory: when another batch's pass runs out of memory, the graphs go
    first and the same pass runs again; only a shortage without graphs teaches a smaller pass."""
    graphed = StandIn()
    runner = BatchRunner(tiny_models, cuda_graphs=graphed)
    a = runner.add(graphed.slot(tiny_models, "a", G))                 # alone at grid 8: graphed
    wide = replace(G, grid=16)                                        # another batch key
    b, c = runner.add(graphed.slot(tiny_models, "b", wide)), runner.add(graphed.slot(tiny_models, "c", wide))
    for _ in range(GRAPH_WARMUP_STEPS + 1):
        runner.step()
    assert graphed.captured == [a.generator] and a.logits.grad is not None
    real, passes = runner._gradients, []

    def short_once(slots):
        passes.append(len(slots))
        if len(slots) == 2 and passes.count(2) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return real(slots)

    runner._gradients = short_once
    failed = []
    runner.step(on_failure=lambda slot, exc: failed.append(slot.key))
    # a's replay (the stand-in runs the step), then b and c, and b and c again as one pass.
    assert passes == [1, 2, 2] and not failed and runner.pass_limit == {}
    assert "a" not in runner._graphs and a.logits.grad is None             # a's graph and its memory gone
    assert (a.iteration, b.iteration, c.iteration) == (GRAPH_WARMUP_STEPS + 2,) * 3


def test_cuda_graphs_are_off_on_a_cpu_and_not_mixed_with_compiles_own(tiny_models):
    runner = BatchRunner(tiny_models, cuda_graphs=True)    # True means CUDA's capture: not on a CPU
    slot = runner.add(make_slot(tiny_models, "a"))
    runner.step()
    assert runner._capture is None and not torch.is_tensor(slot.optimizer.param_groups[0]["lr"])
    with pytest.raises(ValueError, match="reduce-overhead"):
        BatchRunner(tiny_models, compile="inductor:reduce-overhead", cuda_graphs=True)


def test_set_lr_fills_a_tensor_in_place_and_sets_a_float():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.Adam([p], lr=0.5)
    graphs.make_capturable(opt)
    lr = opt.param_groups[0]["lr"]
    graphs.set_lr(opt.param_groups[0], 0.25)
    assert opt.param_groups[0]["lr"] is lr and float(lr) == 0.25      # the tensor a graph would read
    group = {"lr": 0.5}
    graphs.set_lr(group, 0.25)
    assert group["lr"] == 0.25


async def test_the_worker_passes_cuda_graphs_to_its_runner_and_the_job_is_the_same(queue, tiny_models, caplog):
    """`[worker] cuda_graphs` / `imagine-worker --cuda-graphs` reach the worker's BatchRunner: a job
    alone is captured (here by the stand-in) and runs to the frames of a plain worker, and its
    state.pt is one any worker loads (a float learning rate, capturable off)."""
    captured: list[torch.Generator] = []

    def stand_in(step, generator):
        captured.append(generator)
        return step

    finals = {}
    for name, cuda_graphs in (("plain", False), ("graphed", stand_in)):
        async with Worker(queue, lambda: tiny_models, worker_id=name, cuda_graphs=cuda_graphs):
            job = await queue.submit(spec(iterations=G.iterations))
            await wait_state(queue, job.id, {JobState.DONE})
        finals[name] = [np.asarray(Image.open(io.BytesIO(e.frame_png)), dtype=np.int16)
                        for e in await job_events(queue, job.id) if e.kind == EventKind.PROGRESS]
        state = state_from_bytes(await queue.get_artifact(job.id, "state.pt"))
        (group,) = state["optimizer"]["param_groups"]
        assert type(group["lr"]) is float and group["capturable"] is False
    assert len(captured) == 1
    assert len(finals["plain"]) == len(finals["graphed"]) == G.iterations // 2 + 1
    assert all(np.abs(a - b).max() <= 2 for a, b in zip(finals["plain"], finals["graphed"]))


def test_a_worker_refuses_cuda_graphs_with_compiles_own(queue, tiny_models, capsys):
    from engine.worker import main   # noqa: PLC0415
    with pytest.raises(SystemExit) as exit_:        # imagine-worker: a usage error, before anything runs
        main(["--queue", "sqlite:///never.db", "--cuda-graphs", "--compile", "inductor:reduce-overhead"])
    assert exit_.value.code == 2 and "--cuda-graphs: " in capsys.readouterr().err
    for mode in ("reduce-overhead", "max-autotune"):     # both make CUDA graphs of their own
        with pytest.raises(ValueError, match=f"{mode} makes CUDA graphs of its own"):
            Worker(queue, lambda: tiny_models, compile=f"inductor:{mode}", cuda_graphs=True)
    Worker(queue, lambda: tiny_models, compile="inductor:max-autotune-no-cudagraphs", cuda_graphs=True)


def test_generate_replays_a_lone_job_from_its_graph_with_the_frames_of_a_plain_run(tiny_models):
    """`generate(cuda_graphs=...)` (the `imagine` CLI's --cuda-graphs): a one-job render is the
    case graphs are for."""
    captured = []

    def stand_in(step, generator):
        captured.append(generator)
        return step

    settings = replace(G, seed=5, frame_every=4)
    graphed = generate("a red house", settings, tiny_models, cuda_graphs=stand_in)
    plain = generate("a red house", settings, tiny_models)
    assert len(captured) == 1
    assert [f.iteration for f in graphed.frames] == [f.iteration for f in plain.frames]
    for a, b in zip(graphed.frames, plain.frames):   # as tests/test_batching.py's assert_close
        assert np.abs(a.pixels.astype(int) - b.pixels).max() <= 1
        assert a.loss == pytest.approx(b.loss, abs=SCALAR_TOL, nan_ok=True)   # frame 0: no step, no loss
    diff = (graphed.state["logits"] - plain.state["logits"]).abs()     # capturable Adam: another order of ops
    assert diff.mean() <= LOGITS_MEAN_TOL and diff.max() <= LOGITS_MAX_TOL, (diff.mean(), diff.max())
