"""A failing pass of engine.generate.BatchRunner, on tiny models on the CPU: only the job that fails
alone leaves; the others step on as if nothing happened (their noise draws of the failed pass are
undone). Out of memory, under a real address-space limit, halves the passes and nothing fails.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from engine.generate import BatchRunner
from tests.test_batching import S, assert_close, make_slot, one_thread, run, solo  # noqa: F401 - fixtures


def test_a_failing_pass_is_bisected_and_only_the_failing_job_leaves(tiny_models, solo):
    bad = make_slot(tiny_models, "c")
    # Targets of another CLIP (an embedding width this one does not have): its loss cannot be formed.
    bad.targets = replace(bad.targets, embeddings=bad.targets.embeddings[:, :-1])
    failed = []
    out = run(tiny_models, {0: [make_slot(tiny_models, "a"), make_slot(tiny_models, "b"), bad,
                                make_slot(tiny_models, "d")]},
              on_failure=lambda slot, exc: failed.append((slot.key, exc)))
    assert [key for key, _ in failed] == ["c"] and isinstance(failed[0][1], RuntimeError)
    assert out["c"].slot.iteration == 0 and out["c"].frames == []
    # The first step ran as halves ("a", "b") and ("d" alone, after "c" failed alone), then 3 a pass.
    assert out["a"].batch_sizes == [4] + [3] * (S.iterations - 1)
    for key in "abd":
        assert out[key].slot.done and [f[0] for f in out[key].frames] == [2, 4, 6]
        # "d" drew its noise in the failed passes too: undone, or it would stray from its solo run.
        assert_close(out[key], solo(key))


def test_a_job_whose_optimiser_step_fails_leaves_alone(tiny_models, solo):
    bad = make_slot(tiny_models, "b")
    # Moments that do not fit its logits (a state that got past load_state's checks).
    bad.optimizer.state[bad.logits] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros(1),
                                       "exp_avg_sq": torch.zeros(1)}
    failed = []
    out = run(tiny_models, {0: [make_slot(tiny_models, "a"), bad, make_slot(tiny_models, "c")]},
              on_failure=lambda slot, exc: failed.append(slot.key))
    assert failed == ["b"] and out["b"].slot.iteration == 0
    for key in "ac":
        assert out[key].slot.done
        assert_close(out[key], solo(key))


@pytest.mark.parametrize("poison", ["loss", "gradient"])
def test_a_job_gone_non_finite_fails_alone_at_its_frame_the_others_run_on(tiny_models, solo, poison):
    """A NaN loss or gradient (an fp16 overflow on a GPU) makes Adam turn a job's logits NaN for
    good: every frame a flat picture of code 0, and a done job's state.pt NaN. Found at the job's
    next frame (the one host read a frame makes anyway), it fails that job alone; its companions'
    steps never saw its numbers, so they finish as their solo runs."""
    bad = make_slot(tiny_models, "b")
    if poison == "loss":        # NaN targets: a NaN loss, and gradient, from the first step on
        bad.targets = replace(bad.targets, embeddings=torch.full_like(bad.targets.embeddings, float("nan")))
    else:                       # a finite loss, a NaN gradient: the overflow in the backward pass
        bad.logits.register_hook(lambda grad: grad * float("nan"))
    failed = []
    out = run(tiny_models, {0: [make_slot(tiny_models, "a"), bad, make_slot(tiny_models, "c")]},
              on_failure=lambda slot, exc: failed.append((slot.key, exc)))
    assert [key for key, _ in failed] == ["b"]
    exc = failed[0][1]
    assert isinstance(exc, FloatingPointError) and "non-finite values" in str(exc), exc
    assert "at iteration 2" in str(exc) and "logits / optimiser state" in str(exc), exc
    assert out["b"].slot.iteration == 2 and out["b"].frames == []   # failed at its first frame
    for key in "ac":
        assert out[key].slot.done and out[key].batch_sizes == [3, 3, 2, 2, 2, 2]
        assert [f[0] for f in out[key].frames] == [2, 4, 6]
        assert_close(out[key], solo(key))


def test_without_on_failure_the_error_propagates(tiny_models):
    runner = BatchRunner(tiny_models)
    bad = runner.add(make_slot(tiny_models, "a"))
    bad.targets = replace(bad.targets, embeddings=bad.targets.embeddings[:, :-1])
    try:
        runner.step()
    except RuntimeError:
        pass
    else:
        raise AssertionError("a failing pass raised nothing")
    assert "a" in runner.slots  # nothing removed: the caller (generate) owns the failure


# Runs in its own process: an address-space limit (RLIMIT_AS) is the CPU's stand-in for a GPU's
# memory, and the allocator's refusal is a real out-of-memory error.
OUT_OF_MEMORY = r"""
import gc, json, resource, sys, traceback
from dataclasses import replace
import torch
torch.set_num_threads(1)
# oneDNN fails in its own way under a limit ("could not create a primitive"), and stays failed:
# the native kernels leave the allocator's error as the only one.
torch.backends.mkldnn.enabled = False
from engine import models as engine_models
from engine.generate import BatchRunner, GenerationSettings, Slot, batch_key, encode_targets

models = engine_models.load_models(sys.argv[1], sys.argv[2], device="cpu", cache_dir=sys.argv[3],
                                   trust_decoder=True)
S = GenerationSettings(iterations=3, frame_every=3, grid=16, cutn=4)
KEY = batch_key(S)
MiB = 2 ** 20
_, HARD = resource.getrlimit(resource.RLIMIT_AS)


def address_space():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize"))


def runner(pass_limit=None):
    r = BatchRunner(models)
    for seed in range(4):
        r.add(Slot(seed, models, encode_targets(models, "a cat"), replace(S, seed=seed)))
    if pass_limit:
        r.pass_limit[KEY] = pass_limit
    return r


def run(r, headroom, on_failure=None):
    # The limit: what the process has now, plus `headroom` for the steps.
    gc.collect()  # garbage of earlier runs freed mid-run would widen the headroom
    resource.setrlimit(resource.RLIMIT_AS, (address_space() + headroom, HARD))
    try:
        while r.batches():
            r.step(on_failure=on_failure)
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (HARD, HARD))
    return {key: s.logits.detach().clone() for key, s in r.slots.items()}


run(runner(pass_limit=1), 1 << 40)  # warm up: threads and their malloc arenas exist from here on

# The least headroom (32 MiB steps) in which the four jobs run in passes of two.
headroom, reference = 64 * MiB, None
while reference is None and headroom < 2048 * MiB:
    try:
        reference = run(runner(pass_limit=2), headroom)
    except Exception as exc:
        traceback.clear_frames(exc.__traceback__)
        headroom += 32 * MiB
headroom += 32 * MiB  # a margin: the address space moves a little from run to run; four need ~2x

# Premise: one pass of four does not fit in that headroom.
try:
    run(runner(), headroom)
    four_fit = True
except Exception as exc:
    four_fit = False
    refusal = str(exc).splitlines()[0]
    traceback.clear_frames(exc.__traceback__)

failed = []
r = runner()
got = run(r, headroom, on_failure=lambda slot, exc: failed.append(f"{slot.key}: {exc}"))
print(json.dumps({
    "headroom_mib": headroom // MiB, "four_fit": four_fit, "refusal": refusal if not four_fit else "",
    "failed": failed, "pass_limit": r.pass_limit.get(KEY), "iterations": [s.iteration for s in r.slots.values()],
    "same_as_passes_of_two": sorted(got) == sorted(reference) and all(torch.equal(got[k], reference[k]) for k in got),
}))
"""


def test_out_of_memory_halves_the_passes_and_fails_no_job(tiny_model_files):
    f = tiny_model_files
    # glibc: every block of 64 KiB or more mapped alone and unmapped when freed, so the address
    # space is the memory in use (by default freed blocks stay in its heaps, and how much of it
    # a later pass can reuse depends on fragmentation).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    proc = subprocess.run(
        [sys.executable, "-c", OUT_OF_MEMORY, str(f.clip_torchscript), str(f.decoder_pickle), str(f.cache_dir)],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not result["four_fit"] and "allocate memory" in result["refusal"], result
    assert result["failed"] == [], result
    assert result["pass_limit"] == 2, result
    assert result["iterations"] == [3, 3, 3, 3], result
    # From the failed pass of four on, passes of two: bitwise the run that had them from the start.
    assert result["same_as_passes_of_two"], result


def _stepped_state(models) -> dict:
    slot = make_slot(models, "a")
    runner = BatchRunner(models)
    runner.add(slot)
    for _ in range(2):
        runner.step()
    return slot.state()


@pytest.mark.parametrize("damage, message", [
    (lambda m: m.update(exp_avg=torch.tensor(0.0)), "'exp_avg' is missing or does not fit"),   # 0-d: read out of bounds
    (lambda m: m.pop("exp_avg_sq"), "'exp_avg_sq' is missing"),
    (lambda m: m.update(exp_avg=torch.zeros_like(m["exp_avg"], dtype=torch.int32)), "'exp_avg' is missing or does not fit"),
    (lambda m: m.update(step=torch.tensor(True)), "step count"),
    (lambda m: m.update(step=torch.tensor(float("nan"))), "step count"),
    (lambda m: m.update(step=-1.0), "step count"),
    (lambda m: m.pop("step"), "step count"),
    (lambda m: m.update(step=torch.tensor([2.0])), "does not fit"),
])
def test_a_damaged_optimiser_state_is_refused_when_loaded(tiny_models, damage, message):
    """Fused Adam takes whatever it is given (a misfit moment corrupts memory, a bool step runs on
    as 1.0): load_state refuses such a state with a clear error, before any step."""
    state = _stepped_state(tiny_models)
    damage(state["optimizer"]["state"][0])
    with pytest.raises(ValueError, match=message):
        make_slot(tiny_models, "a").load_state(state)


def test_moments_of_another_layout_load_as_the_logits_and_resume_the_same(tiny_models):
    """A state's moments in another memory layout (a foreign or damaged file: zero strides, a
    transposed copy) are read by value, not by layout: the resumed run is the run resumed from
    the plain state; and the loaded slot steps its own tensors, not the caller's."""
    state = _stepped_state(tiny_models)
    plain = make_slot(tiny_models, "a")
    plain.load_state(copy.deepcopy(state))
    moments = state["optimizer"]["state"][0]
    first = moments["exp_avg"][0, :, 0, 0].clone()
    moments["exp_avg"] = moments["exp_avg"].transpose(2, 3).contiguous().transpose(2, 3)   # same values, other strides
    moments["exp_avg_sq"] = moments["exp_avg_sq"].mean().expand_as(moments["exp_avg_sq"])  # zero strides
    plain.optimizer.state[plain.logits]["exp_avg_sq"].fill_(float(moments["exp_avg_sq"][0, 0, 0, 0]))
    odd = make_slot(tiny_models, "a")
    odd.load_state(state)
    got = run(tiny_models, {0: [odd]})["a"]
    assert_close(got, run(tiny_models, {0: [plain]})["a"])
    assert torch.equal(moments["exp_avg"][0, :, 0, 0], first)                # the caller's tensors untouched


def test_a_moment_of_another_layout_set_after_loading_fails_its_step_not_the_process(tiny_models):
    slot = make_slot(tiny_models, "a")
    runner = BatchRunner(tiny_models)
    runner.add(slot)
    runner.step()
    moments = slot.optimizer.state[slot.logits]
    moments["exp_avg"] = moments["exp_avg"].transpose(2, 3)     # what no load makes: caught before the fused kernel
    failed = []
    runner.step(on_failure=lambda s, exc: failed.append(exc))
    assert len(failed) == 1 and isinstance(failed[0], ValueError) and "damaged" in str(failed[0])
