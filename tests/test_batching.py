"""Continuous batching in engine.generate.BatchRunner, on tiny models on the CPU.

A job's results must not depend on which other jobs share its batch. Two strengths of "equal":

- Same batch size, other companions (other prompts, seeds, positions): *bitwise* equal. Every
  kernel computes a sample's output from that sample's inputs in a fixed order, so companions
  cannot leak into a slot (its noise, gradient, optimiser and RNG are its own).
- Batched vs solo (batch size changes): equal within float tolerance, not bitwise. Batched
  convolutions and GEMMs pick other blockings than batch-1 ones and round their sums differently
  (about 1e-7 relative). Adam divides every element's gradient by its own running RMS, so that
  relative difference passes unscaled into the update, and where an element's gradient nearly
  cancels between steps it grows to a fraction of the learning rate. Hence the logits tolerance:
  mean |diff| <= 2e-5 (the bulk agrees to ~1e-6) and max |diff| <= lr (no element is more than
  one step apart: the worst element measured 0.52 lr on an AMD EPYC CI machine, 2026-11-30,
  where earlier machines stayed under lr / 2; the kernels' rounding depends on the CPU). Frames show the same codes (argmax of the logits, compared exactly);
  their pixels, decoded in a batch of another size, may differ by one level of 255 where a value
  sits at a rounding boundary; similarities and losses agree to 1e-5.
"""

from __future__ import annotations

import asyncio
import collections
import traceback
from dataclasses import dataclass, field, replace

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from engine import capacity, random_models
from engine.generate import BatchRunner, GenerationSettings, Slot, encode_targets
from tests.compile_support import compile_backend

S = GenerationSettings(iterations=6, frame_every=2, grid=8, cutn=4)
JOBS = {  # key -> (prompt, seed)
    "a": ("a red house", 1),
    "b": ("a cat | blurry:-0.5", 2),
    "c": ("the sea at night", 3),
    "d": ("a tree", 4),
    "e": ("a bird", 5),
}
LOGITS_MEAN_TOL = 2e-5
LOGITS_MAX_TOL = S.lr
SCALAR_TOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Two cores shared with other test runs: one thread is several times faster here."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@dataclass
class Run:
    frames: list = field(default_factory=list)      # (iteration, pixels, similarity, loss)
    batch_sizes: list[int] = field(default_factory=list)
    slot: Slot | None = None

    @property
    def logits(self) -> torch.Tensor:
        return self.slot.logits.detach()


def make_slot(models, key: str, settings: GenerationSettings = S) -> Slot:
    prompt, seed = JOBS[key]
    return Slot(key, models, encode_targets(models, prompt), replace(settings, seed=seed))


def run(models, joins: dict[int, list[Slot]], leaves: dict[int, list[str]] | None = None,
        compile: bool | str = False, on_failure=None, cuda_graphs=False) -> dict[str, Run]:
    """Step a runner; `joins[k]` are added and `leaves[k]` removed before global step k."""
    runner, leaves = BatchRunner(models, compile=compile, cuda_graphs=cuda_graphs), leaves or {}
    out: dict[str, Run] = {}
    step = 0
    while True:
        for slot in joins.get(step, []):
            out[slot.key] = Run(slot=runner.add(slot))
        for key in leaves.get(step, []):
            assert runner.remove(key) is out[key].slot
        if step > max(joins) and not runner.batches():
            return out
        sizes = {s.key: len(group) for group in runner.batches() for s in group}
        for slot, frame in runner.step(on_failure=on_failure):
            out[slot.key].batch_sizes.append(sizes[slot.key])
            if frame is not None:
                out[slot.key].frames.append((frame.iteration, frame.pixels, frame.similarity, frame.loss))
        step += 1


def assert_identical(x: Run, y: Run) -> None:
    assert torch.equal(x.logits, y.logits)
    assert [f[0] for f in x.frames] == [f[0] for f in y.frames]
    for fx, fy in zip(x.frames, y.frames):
        assert np.array_equal(fx[1], fy[1]) and fx[2:] == fy[2:]


def assert_close(x: Run, y: Run) -> None:
    diff = (x.logits - y.logits).abs()
    assert torch.equal(x.logits.argmax(dim=1), y.logits.argmax(dim=1))  # the frame's codes
    assert diff.mean() <= LOGITS_MEAN_TOL and diff.max() <= LOGITS_MAX_TOL, (diff.mean(), diff.max())
    assert [f[0] for f in x.frames] == [f[0] for f in y.frames]
    for fx, fy in zip(x.frames, y.frames):
        assert np.abs(fx[1].astype(int) - fy[1]).max() <= 1  # a float at a rounding boundary
        assert fx[2] == pytest.approx(fy[2], abs=SCALAR_TOL) and fx[3] == pytest.approx(fy[3], abs=SCALAR_TOL)


@pytest.fixture(scope="module")
def solo(tiny_models):
    """Each job alone in its runner: the reference."""
    cache: dict[tuple[str, str], Run] = {}

    def get(key: str, settings: GenerationSettings = S) -> Run:
        name = (key, repr(settings))
        if name not in cache:
            cache[name] = run(tiny_models, {0: [make_slot(tiny_models, key, settings)]})[key]
            assert set(cache[name].batch_sizes) == {1}
        return cache[name]

    return get


def test_batched_equals_solo_and_companions_do_not_matter(tiny_models, solo):
    together = run(tiny_models, {0: [make_slot(tiny_models, k) for k in "abc"]})
    for key in "abc":
        assert together[key].batch_sizes == [3] * S.iterations
        assert [f[0] for f in together[key].frames] == [2, 4, 6]
        assert_close(together[key], solo(key))
    # "a" with other companions, in another position: bitwise the same.
    others = run(tiny_models, {0: [make_slot(tiny_models, k) for k in "dea"]})
    assert_identical(others["a"], together["a"])
    assert not torch.equal(others["d"].logits, together["b"].logits)


def test_a_job_joining_mid_batch_changes_nothing(tiny_models, solo):
    joined = run(tiny_models, {0: [make_slot(tiny_models, "a")], 2: [make_slot(tiny_models, "b")]})
    assert joined["a"].batch_sizes == [1, 1, 2, 2, 2, 2]
    assert joined["b"].batch_sizes == [2, 2, 2, 2, 1, 1]  # "b" finishes alone, 2 steps later
    assert_close(joined["a"], solo("a"))
    assert_close(joined["b"], solo("b"))
    # Another job joining at the same step: "a" is bitwise the same.
    other = run(tiny_models, {0: [make_slot(tiny_models, "a")], 2: [make_slot(tiny_models, "d")]})
    assert_identical(other["a"], joined["a"])


def test_a_job_leaving_mid_batch_the_others_run_to_completion(tiny_models, solo):
    left = run(tiny_models, {0: [make_slot(tiny_models, k) for k in "abc"]}, leaves={3: ["c"]})
    assert left["c"].slot.iteration == 3 and [f[0] for f in left["c"].frames] == [2]
    for key in "ab":
        assert left[key].slot.done and left[key].batch_sizes == [3, 3, 3, 2, 2, 2]
        assert [f[0] for f in left[key].frames] == [2, 4, 6]
        assert_close(left[key], solo(key))
    other = run(tiny_models, {0: [make_slot(tiny_models, k) for k in "abd"]}, leaves={3: ["d"]})
    assert_identical(other["a"], left["a"])
    assert_identical(other["b"], left["b"])


def test_grid_sizes_and_cutn_run_as_separate_batches_each_as_alone(tiny_models, solo):
    small, fewer_cuts = replace(S, grid=4), replace(S, cutn=2)
    runner = BatchRunner(tiny_models)
    for slot in (make_slot(tiny_models, "a"), make_slot(tiny_models, "b", small),
                 make_slot(tiny_models, "c", fewer_cuts), make_slot(tiny_models, "d")):
        runner.add(slot)
    assert sorted(sorted(s.key for s in g) for g in runner.batches()) == [["a", "d"], ["b"], ["c"]]
    mixed = run(tiny_models, {0: [make_slot(tiny_models, "b", small), make_slot(tiny_models, "c", fewer_cuts)]})
    assert mixed["b"].frames[0][1].shape == (32, 32, 3) and mixed["c"].frames[0][1].shape == (64, 64, 3)
    # Each alone in its batch: bitwise its solo run.
    assert_identical(mixed["b"], solo("b", small))
    assert_identical(mixed["c"], solo("c", fewer_cuts))


SYNC_METHODS = ["item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"]
# Ops that wait for a GPU: reading a value (`.item()`, `float()`), a tensor made from host values
# (`torch.tensor`, `new_tensor`: a blocking copy), data-dependent shapes.
SYNC_OPS = {"aten._local_scalar_dense", "aten.lift_fresh", "aten.lift_fresh_copy", "aten.nonzero",
            "aten.masked_select", "aten._unique2", "aten.unique_consecutive", "aten.equal", "aten.is_nonzero"}


class SyncOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(getattr(func, "overloadpacket", func))  # e.g. "aten._local_scalar_dense"
        if name in SYNC_OPS:
            self.calls.append((name, id(args[0]) if args else 0))
        return func(*args, **(kwargs or {}))


def record_syncs(fn):
    """Host reads during `fn()`: tensor methods that read values, as (method, caller file, tensor
    id), and dispatcher ops that would wait for a GPU, as (op, tensor id)."""
    calls = []
    originals = {name: getattr(torch.Tensor, name) for name in SYNC_METHODS}

    def wrap(name):
        original = originals[name]

        def wrapper(self, *args, **kwargs):
            caller = traceback.extract_stack(limit=2)[0].filename
            calls.append((name, caller, id(self)))
            return original(self, *args, **kwargs)
        return wrapper

    for name in SYNC_METHODS:
        setattr(torch.Tensor, name, wrap(name))
    try:
        with SyncOps() as ops:
            fn()
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
    return calls, ops.calls


def test_the_hot_loop_reads_nothing_back_until_a_frame(tiny_models):
    settings = replace(S, iterations=4, frame_every=3, cutn=2)
    runner = BatchRunner(tiny_models)
    slots = [runner.add(make_slot(tiny_models, k, settings)) for k in "ab"]
    runner.step()  # Adam's state exists from here on

    def step():  # the worker's way: a failing pass would be bisected
        assert runner.step(on_failure=lambda slot, exc: failed.append(exc))
    failed: list[Exception] = []
    calls, ops = record_syncs(step)  # iteration 2: no frame
    # Nothing at all: fused Adam keeps its step count with the logits and corrects there.
    assert calls == [] and ops == [], (calls, ops)
    assert slots[0].loss is not None and slots[0].loss.shape == ()
    calls, ops = record_syncs(step)  # iteration 3: a frame of both slots
    assert failed == []
    ours = collections.Counter(name for name, caller, _ in calls if caller.endswith("generate.py"))
    assert ours == {"cpu": 1, "numpy": 1, "tolist": 1}  # one read for the whole batch


def test_saved_activations_match_the_capacity_estimate(tiny_models):
    """On fp32 the analytic estimate of what autograd saves is exact (the loss's few bytes aside)."""
    settings = replace(S, iterations=1, frame_every=10)
    dims = (capacity.DecoderDims.of(tiny_models.decoder), capacity.ClipVisualDims.of(tiny_models.clip))
    measured = {}
    for n in (1, 2):
        runner = BatchRunner(tiny_models)
        for key in "ab"[:n]:
            runner.add(make_slot(tiny_models, key, settings))
        with capacity.saved_tensor_bytes(tiny_models.decoder, tiny_models.clip) as saved:
            runner.step()
        measured[n] = sum(saved.values())
    estimate = sum(capacity.saved_bytes(S.grid, S.cutn, "fp32", *dims).values())
    per_slot = measured[2] - measured[1]
    assert abs(per_slot - estimate) <= 0.01 * estimate, (per_slot, estimate)
    assert abs(measured[1] - estimate) <= 0.01 * estimate, (measured[1], estimate)


def test_choose_max_batch(tiny_models):
    cpu = torch.device("cpu")
    assert capacity.choose_max_batch(cpu, 32) == 1
    full32, full64 = capacity.per_slot_bytes(32), capacity.per_slot_bytes(64)
    assert 1.5 * capacity.GiB < full32 < 3 * capacity.GiB and 3.5 < full64 / full32 < 4.5
    free = 20 * capacity.GiB
    n32 = capacity.choose_max_batch("cuda", 32, free_bytes=free)
    n64 = capacity.choose_max_batch("cuda", 64, free_bytes=free)
    copies = capacity.low_precision_copy_bytes("cuda")    # the runner's bf16 CLIP tower and decoder
    assert n32 == (free * (1 - capacity.RESERVE_FRACTION) - capacity.RESERVE_BYTES - copies) // full32 > n64 >= 1
    assert capacity.choose_max_batch("cuda", 32, free_bytes=140 * capacity.GiB) == capacity.DEFAULT_CAP
    big = 80 * capacity.GiB  # overrides: free memory and a measured per-slot figure, on any device
    assert capacity.choose_max_batch(cpu, 32, free_bytes=big, per_slot_bytes=capacity.GiB) == capacity.DEFAULT_CAP
    assert capacity.choose_max_batch(cpu, 32, free_bytes=big, per_slot_bytes=10 * capacity.GiB, cap=100) == 7
    assert capacity.choose_max_batch(cpu, 64, free_bytes=capacity.GiB) == 1  # never less than one
    # The models' own sizes: tiny ones fit many more slots.
    assert capacity.choose_max_batch("cuda", 8, free_bytes=4 * capacity.GiB, models=tiny_models) == capacity.DEFAULT_CAP
    # bf16 halves the activations, not the fp32 logits and optimiser.
    assert capacity.per_slot_bytes(32, precision="bf16") < capacity.per_slot_bytes(32, precision="fp32")


def test_choose_max_batch_counts_the_runners_low_precision_copies_of_the_models(tiny_models):
    # Full size: the parameters of ViT-B/32's image tower and OpenAI's decoder, 2 bytes each.
    with torch.device("meta"):
        clip_model, decoder = random_models.make_clip(random_models.VIT_B_32), random_models.make_decoder(tiny=False)
    params = sum(p.numel() for part in (clip_model.visual, decoder) for p in part.parameters())
    assert capacity.low_precision_copy_bytes("cuda", "bf16") == capacity.low_precision_copy_bytes("cuda") == 2 * params
    assert capacity.low_precision_copy_bytes("cuda", "fp16") == 2 * params
    # No copies in fp32 or on a CPU; the models' own sizes when given.
    assert capacity.low_precision_copy_bytes("cuda", "fp32") == capacity.low_precision_copy_bytes("cpu", "bf16") == 0
    tiny = sum(p.numel() for part in (tiny_models.clip.visual, tiny_models.decoder) for p in part.parameters())
    assert capacity.low_precision_copy_bytes("cuda", "bf16", tiny_models) == 2 * tiny
    # Free memory for exactly 3 slots and the reserve: the copies take the third slot's room in bf16.
    per_slot = capacity.GiB
    free = (capacity.RESERVE_BYTES + 3 * per_slot + 2 * params // 3) / (1 - capacity.RESERVE_FRACTION)
    assert capacity.choose_max_batch("cuda", 32, free_bytes=free, per_slot_bytes=per_slot, precision="fp32") == 3
    assert capacity.choose_max_batch("cuda", 32, free_bytes=free, per_slot_bytes=per_slot, precision="bf16") == 2


async def test_the_worker_chooses_max_batch_when_not_given(tmp_path, tiny_models):
    from engine.queue import open_queue
    from engine.worker import Worker

    queue = open_queue(f"sqlite:///{tmp_path}/jobs.db")
    await queue.start()
    try:
        worker = Worker(queue, lambda: tiny_models, worker_id="w-auto")
        assert worker.max_batch is None
        await worker.start()
        await worker.stop()
        assert worker.max_batch == 1  # on a CPU
    finally:
        await queue.close()


def test_compile_is_opt_in_and_keeps_results(tiny_models):
    """torch.compile (the `eager` backend: dynamo's tracing, no code generation) gives the same
    steps and does not recompile when a slot joins or leaves."""
    settings = replace(S, iterations=3, frame_every=3, cutn=2)
    plain = run(tiny_models, {0: [make_slot(tiny_models, k, settings) for k in "ab"], 1: [make_slot(tiny_models, "c", settings)]})
    torch._dynamo.reset()
    compiled = run(tiny_models, {0: [make_slot(tiny_models, k, settings) for k in "ab"], 1: [make_slot(tiny_models, "c", settings)]},
                   compile="eager")
    for key in "abc":
        assert_close(compiled[key], plain[key])
    assert compiled["c"].batch_sizes == [3, 3, 1]


def _no_c_compiler(graph, example_inputs):
    raise RuntimeError("Failed to find C compiler. Please specify via CC environment variable.")


@pytest.fixture(params=["at_compile", "at_first_backward"])
def failing_backend(request):
    """A torch.compile backend that fails as inductor does where Triton finds no C compiler: when
    dynamo compiles (wrapped in BackendCompilerFailed), or only when AOTAutograd compiles the
    backward at the first `backward()` (its error raised bare, nothing naming torch.compile)."""
    from torch._dynamo.backends.common import aot_autograd   # noqa: PLC0415

    backend = (_no_c_compiler if request.param == "at_compile"
               else aot_autograd(fw_compiler=lambda gm, _: gm.forward, bw_compiler=_no_c_compiler))
    with compile_backend(f"imagine_test_no_c_compiler_{request.param}", backend) as name:
        yield name


@pytest.mark.parametrize("with_on_failure", [True, False], ids=["worker", "generate"])
def test_a_compile_that_fails_leaves_the_runner_eager_and_fails_no_job(tiny_models, failing_backend, caplog,
                                                                         with_on_failure):
    """torch.compile's own failure (here the backend's, as with no C compiler for Triton) is no
    job's fault: the runner says so once, runs eager from then on, and every job steps as if
    compile had been off (the worker's path with on_failure, generate's without)."""
    failed: list = []
    on_failure = (lambda slot, exc: failed.append((slot.key, exc))) if with_on_failure else None
    settings = replace(S, iterations=3, frame_every=3, cutn=2)
    plain = run(tiny_models, {0: [make_slot(tiny_models, k, settings) for k in "ab"]})
    with caplog.at_level("WARNING", logger="engine.generate"):
        fallen = run(tiny_models, {0: [make_slot(tiny_models, k, settings) for k in "ab"]},
                     compile=failing_backend, on_failure=on_failure)
    assert failed == []
    for key in "ab":
        assert_identical(fallen[key], plain[key])
    warnings = [r.getMessage() for r in caplog.records if "torch.compile failed" in r.getMessage()]
    assert len(warnings) == 1 and "Failed to find C compiler" in warnings[0], warnings


def test_a_jobs_own_error_is_not_taken_for_a_compile_failure(tiny_models):
    """A compiled runner whose pass fails the same way uncompiled (a job's own error) keeps
    compiling and fails that job alone; out of memory is the pass's size, never compile's, also
    where a compile error wraps it; an uncompiled runner never blames a compile."""
    settings = replace(S, iterations=2, frame_every=2, cutn=2)
    runner = BatchRunner(tiny_models, compile="eager")
    good, bad = make_slot(tiny_models, "a", settings), make_slot(tiny_models, "b", settings)
    bad.targets = replace(bad.targets, embeddings=bad.targets.embeddings[:, :3])   # [T, 3]: no CLIP width
    runner.add(good), runner.add(bad)
    failed: list = []
    for _ in range(2):
        runner.step(on_failure=lambda slot, exc: failed.append((slot.key, type(exc).__name__)))
    assert failed == [("b", "RuntimeError")] and runner.compiled and good.iteration == 2
    assert not runner._compile_failed([], torch.OutOfMemoryError("CUDA out of memory"))
    from torch._dynamo.exc import BackendCompilerFailed   # noqa: PLC0415
    try:
        raise BackendCompilerFailed(_no_c_compiler, torch.OutOfMemoryError("CUDA out of memory"), None)
    except BackendCompilerFailed as exc:
        assert not runner._compile_failed([], exc) and runner.compiled
    assert not BatchRunner(tiny_models)._compile_failed([], RuntimeError("Failed to find C compiler"))


def test_compile_auto_is_inductor_on_cuda_with_a_c_compiler_and_off_elsewhere(tiny_models, tmp_path, monkeypatch):
    """The worker's default: inductor where a GPU run measured it to pay (CUDA) and Triton can
    build its launchers (a C compiler on PATH or in $CC); nothing on a CPU."""
    from engine.compiling import c_compiler, compile_options   # noqa: PLC0415

    assert not BatchRunner(tiny_models, compile="auto").compiled   # a CPU: no compile at all
    assert compile_options("auto", "cpu") is None and compile_options("auto") is None
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))   # a CUDA runtime image: no cc, gcc or clang
    assert c_compiler() is None and compile_options("auto", "cuda") is None
    gcc = tmp_path / "gcc"
    gcc.write_text("#!/bin/sh\n")
    gcc.chmod(0o755)
    assert c_compiler() == str(gcc) and compile_options("auto", "cuda") == {"backend": "inductor"}
    monkeypatch.setenv("CC", "no-such-cc")   # Triton takes $CC as given: one it cannot find is none
    assert c_compiler() is None and compile_options("auto", "cuda") is None
    assert compile_options("inductor", "cuda") == {"backend": "inductor"}   # asked for by name: as asked
