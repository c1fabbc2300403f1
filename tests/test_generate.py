"""engine.generate on tiny random-weight models: the loop really runs and the similarity rises."""

from __future__ import annotations

import math
import sys
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.generate import (
    BatchRunner, GenerationSettings, PromptError, PromptPart, Slot, apply_cutouts, cutout_affine, cutout_grid,
    encode_targets, generate, gumbel_softmax, make_cutouts, parse_prompt, state_from_bytes, state_to_bytes,
)

FAST = GenerationSettings(iterations=100, frame_every=50, grid=8, cutn=8, seed=7)


def test_similarity_rises_over_100_iterations_with_frames_at_0_50_100(tiny_models):
    result = generate("a red house by the sea", FAST, tiny_models)
    assert [f.iteration for f in result.frames] == [0, 50, 100]
    first, last = result.frames[0], result.frames[-1]
    assert last.similarity > first.similarity + 0.02, [f.similarity for f in result.frames]
    assert first.pixels.shape == (64, 64, 3) and first.pixels.dtype == np.uint8
    assert not np.array_equal(first.pixels, last.pixels)
    assert last.loss < 0


def test_the_loss_falls_as_it_learns_and_not_without_learning(tiny_models):
    """The loss (minus the weighted similarity of the cut-outs) falls over 100 steps; with a
    learning rate of 0 (the same cut-out noise, nothing learnt) it only wanders. (Frame 0's loss
    is NaN: no step has run.)"""
    settings = replace(FAST, frame_every=10)

    def ends(result):   # the mean loss of the first three stepped frames and of the last three
        losses = [f.loss for f in result.frames[1:]]
        assert len(losses) == 10 and all(math.isfinite(x) for x in losses), losses
        return sum(losses[:3]) / 3, sum(losses[-3:]) / 3

    first, last = ends(generate("a red house by the sea", settings, tiny_models))
    assert last < first - 0.03, (first, last)
    first, last = ends(generate("a red house by the sea", replace(settings, lr=0.0), tiny_models))
    assert abs(last - first) < 0.02, (first, last)


def test_a_frames_similarity_is_to_the_first_part_pulled_toward_not_a_negative_one(tiny_models):
    """`blurry:-1 | a house`: the number shown to users (reply, run.json) is the similarity to "a
    house", the part the picture moves toward; every part's is still in `similarities`."""
    result = generate("blurry:-1 | a house", replace(FAST, iterations=4, frame_every=2), tiny_models)
    for frame in result.frames:
        assert len(frame.similarities) == 2 and frame.similarity == frame.similarities[1]
    plain = generate("a house | blurry:-1", replace(FAST, iterations=2, frame_every=2), tiny_models)
    assert all(f.similarity == f.similarities[0] for f in plain.frames)


def test_same_seed_same_frames_other_seed_other_frames(tiny_models):
    s = replace(FAST, iterations=10, frame_every=5)
    a = generate("a cat", s, tiny_models)
    b = generate("a cat", s, tiny_models)
    c = generate("a cat", replace(s, seed=8), tiny_models)
    for fa, fb in zip(a.frames, b.frames):
        assert np.array_equal(fa.pixels, fb.pixels) and fa.similarity == fb.similarity
    assert not np.array_equal(a.frames[0].pixels, c.frames[0].pixels)


def test_cancel_stops_within_one_iteration_and_the_callback_sees_every_frame(tiny_models):
    cancel = threading.Event()
    seen = []

    def progress(frame):
        seen.append(frame.iteration)
        if frame.iteration == 6:
            cancel.set()

    result = generate("a cat", replace(FAST, iterations=50, frame_every=3), tiny_models, cancel, progress)
    assert result.cancelled
    assert seen == [0, 3, 6]
    assert result.state["iteration"] == 6  # not a single step after the cancel


def test_frames_every_k_and_the_last(tiny_models):
    seen = []
    generate("a cat", replace(FAST, iterations=7, frame_every=3), tiny_models, progress=lambda f: seen.append(f.iteration))
    assert seen == [0, 3, 6, 7]


def test_keep_frames_false_keeps_the_last_frame_only_and_changes_nothing_else(tiny_models):
    """A caller that keeps the frames itself (the CLI writes each to disk) need not have them all
    in memory too: the result holds the last one, the same as a run that kept them all."""
    s = replace(FAST, iterations=7, frame_every=3)
    kept = generate("a cat", s, tiny_models)
    seen = []
    lean = generate("a cat", s, tiny_models, progress=lambda f: seen.append(f.iteration), keep_frames=False)
    assert [f.iteration for f in kept.frames] == seen == [0, 3, 6, 7]
    assert [f.iteration for f in lean.frames] == [7] and lean.final is lean.frames[0]
    np.testing.assert_array_equal(lean.final.pixels, kept.final.pixels)


def test_a_cancelled_run_ends_with_a_frame_of_the_state_it_returns(tiny_models):
    """Cancelled between frames: the result's final frame is the picture of the state it returns
    (a Remix of that state starts from what final.png shows). Before: the last frame taken, older
    than the state."""
    class CancelAfter:
        def __init__(self, checks: int) -> None:
            self.checks = checks

        def is_set(self) -> bool:
            self.checks -= 1
            return self.checks < 0

    result = generate("a cat", replace(FAST, iterations=10, frame_every=2), tiny_models, cancel=CancelAfter(3))
    assert result.cancelled and result.state["iteration"] == 3
    assert result.final.iteration == 3 and [f.iteration for f in result.frames] == [0, 2, 3]


def test_on_step_sees_every_iteration_between_frames_in_order(tiny_models):
    """frame_every above the iteration count: frames at 0 and the last only, and `on_step` still
    hears of each step, in order, as a Python int (nothing read from the device), before the
    frame of its iteration; resumed from a checkpoint, it counts on from there; a cancel set in
    it stops the run before the next step."""
    events = []
    generate("a cat", replace(FAST, iterations=4, frame_every=100), tiny_models,
             progress=lambda f: events.append(("frame", f.iteration)),
             on_step=lambda i: events.append(("step", i)))
    assert events == [("frame", 0), ("step", 1), ("step", 2), ("step", 3), ("step", 4), ("frame", 4)]
    assert all(type(i) is int for _, i in events)

    s = replace(FAST, iterations=5, frame_every=2)
    checkpoints = []
    generate("a cat", s, tiny_models, on_checkpoint=checkpoints.append)
    steps = []
    generate("a cat", s, tiny_models, checkpoint=checkpoints[0], on_step=steps.append)
    assert checkpoints[0]["iteration"] == 2 and steps == [3, 4, 5]

    cancel = threading.Event()
    steps = []

    def on_step(i):
        steps.append(i)
        if i == 2:
            cancel.set()

    result = generate("a cat", replace(FAST, iterations=50, frame_every=100), tiny_models, cancel, on_step=on_step)
    assert result.cancelled and steps == [1, 2] and result.state["iteration"] == 2


def test_resume_from_a_checkpoint_gives_the_same_frames(tiny_models):
    s = replace(FAST, iterations=12, frame_every=4)
    checkpoints = []
    whole = generate("a cat", s, tiny_models, on_checkpoint=lambda st: checkpoints.append(state_to_bytes(st)))
    assert [state_from_bytes(c)["iteration"] for c in checkpoints] == [4, 8]
    resumed = generate("a cat", s, tiny_models, checkpoint=state_from_bytes(checkpoints[0]))
    assert [f.iteration for f in resumed.frames] == [4, 8, 12]
    assert np.array_equal(resumed.final.pixels, whole.final.pixels)
    assert torch.equal(resumed.state["logits"], whole.state["logits"])


def test_a_continue_takes_the_steps_one_longer_run_would(tiny_models):
    """A job of 3 steps, its Continue of 3 (stopped after 1 and resumed from that checkpoint) and
    a Continue of that of 2 (`Slot.as_continue`: a fresh count, the parent's optimiser, generator
    and learning-rate ramp) take the steps of one run of 8: the same lr at each step (the ramp goes
    on, not back to `lr` while Adam's step count goes on) and the same logits. The ramp's offset
    travels in the state; a state saved before it had one reads 0."""
    s = replace(FAST, iterations=8, frame_every=4, lr=0.05, lr_growth=1.5, lr_max=1.0)
    targets = encode_targets(tiny_models, "a red house")

    def run(slot, steps=None):
        runner, lrs = BatchRunner(tiny_models), []
        runner.add(slot)
        while not slot.done and (steps is None or len(lrs) < steps):
            lrs.append(slot.lr())
            runner.step()
        return lrs

    def saved(slot):
        return state_from_bytes(state_to_bytes(slot.state()))

    def continue_of(state, iterations):
        slot = Slot("c", tiny_models, targets, replace(s, iterations=iterations), state["logits"])
        slot.load_state(state)
        slot.as_continue()
        return slot

    whole = Slot("whole", tiny_models, targets, s)
    want = run(whole)
    parent = Slot("parent", tiny_models, targets, replace(s, iterations=3))
    lrs = run(parent)
    first = continue_of(saved(parent), 3)
    lrs += run(first, steps=1)
    checkpoint = saved(first)
    resumed = Slot("r", tiny_models, targets, replace(s, iterations=3), checkpoint=checkpoint)
    lrs += run(resumed)
    second = continue_of(saved(resumed), 2)
    lrs += run(second)
    assert lrs == pytest.approx(want, rel=1e-12) and len(set(want)) == len(want)
    assert torch.equal(second.logits, whole.logits)
    assert (checkpoint["lr_offset"], checkpoint["iteration"]) == (3, 1)
    assert second.state()["lr_offset"] == 6 and second.iteration == 2
    old = {k: v for k, v in saved(parent).items() if k != "lr_offset"}   # a state from before lr_offset
    assert Slot("o", tiny_models, targets, s, checkpoint=old).lr_offset == 0
    with pytest.raises(ValueError, match="learning-rate offset"):
        Slot("d", tiny_models, targets, s, checkpoint=dict(old, lr_offset=-1))


def test_the_lr_ramp_stops_at_lr_max_without_overflowing_for_any_count(tiny_models):
    targets = encode_targets(tiny_models, "a cat")
    slot = Slot("x", tiny_models, targets, replace(FAST, lr=0.01, lr_growth=1.005, lr_max=0.12))
    assert slot.lr() == 0.01
    for offset in (498, 499, 500, 10**6, 10**18):   # 1.005 ** 10**6 overflows a float
        slot.lr_offset = offset
        assert slot.lr() == min(0.01 * 1.005 ** min(offset, 600), 0.12)
    assert slot.lr() == 0.12


def test_cutouts_are_one_batched_op_of_the_right_shape(tiny_models):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 64, 64)
    cuts = make_cutouts(images, 5, 32, [FAST] * 3, [g, g, g])
    assert cuts.shape == (15, 3, 32, 32)
    grid, mask = cutout_grid(4, 16, 0.5, 0.99, 30.0, torch.Generator().manual_seed(1), torch.device("cpu"))
    assert grid.shape == (4, 16, 16, 2) and mask.shape == (4, 1, 16, 16)
    assert grid.abs().max() <= 1.5  # inside the image, up to a rotated corner
    assert 0.6 < mask.mean() < 1.0  # the rotated square's corners are black
    assert mask[:, 0, 8, 8].eq(1).all()  # ... never its middle


def test_a_rotated_cutout_is_black_in_its_corners_and_whole_in_its_middle():
    """The mask is where the turned crop lands: all of an unturned cut-out; the middle, not the
    corners, of one turned ~30 degrees either way (it used to be all ones whatever the angle)."""
    angles = torch.tensor([0.0, math.radians(30), math.radians(-28)])
    _, mask = cutout_affine(torch.full((3,), 0.6), torch.zeros(3, 2), angles, 32)   # [3, 1, 32, 32]
    assert torch.equal(mask[0], torch.ones(1, 32, 32))
    for m in mask[1:, 0]:
        assert m[8:24, 8:24].eq(1).all()                               # the middle
        assert m[0, 0] == m[0, -1] == m[-1, 0] == m[-1, -1] == 0       # the corners
        assert 0.7 < m.mean() < 0.9, m.mean()                          # a square turned 30 degrees: ~0.79


@pytest.mark.parametrize("x0, y0, crop, degrees", [(8, 20, 32, 25.0), (4, 2, 48, -30.0), (10, 0, 54, 12.0)])
def test_a_cutout_is_the_seed_loops_crop_resize_and_torchvision_rotate(x0, y0, crop, degrees):
    """One grid_sample does what benchmarks/reference_loop.py does in three steps: crop an
    axis-aligned square, resize it (F.interpolate), turn it with torchvision's TF.rotate by
    `degrees` (an engine angle of radians(degrees): both turn the same way), black where the
    turned crop does not reach. Same picture inside (bilinear once vs twice: close, on a smooth
    picture), the same black corners."""
    import torchvision.transforms.functional as TF

    side, size = 64, 64
    g = torch.Generator().manual_seed(0)
    smooth = F.interpolate(torch.rand(1, 3, 6, 6, generator=g), size=(side, side), mode="bicubic", align_corners=False)
    image = smooth.clamp(0, 1) * 0.6 + 0.4                              # [1, 3, 64, 64], never black

    def reference(deg):
        piece = F.interpolate(image[:, :, y0:y0 + crop, x0:x0 + crop], (size, size), mode="bilinear",
                              align_corners=False)
        return TF.rotate(piece, deg, interpolation=TF.InterpolationMode.BILINEAR)[0]   # [3, S, S]

    centre = torch.tensor([[(x0 + crop / 2) / (side / 2) - 1, (y0 + crop / 2) / (side / 2) - 1]])
    grid, mask = cutout_affine(torch.tensor([crop / side]), centre, torch.tensor([math.radians(degrees)]), size)
    got = apply_cutouts(image, 1, grid, mask, torch.zeros(1, 3, size, size))[0]   # [3, S, S]

    def iou(a, b):
        return ((a & b).sum() / (a | b).sum()).item()

    lit = got.amin(0) > 0.2                                            # half the picture's darkest
    want = reference(degrees)
    assert iou(lit, want.amin(0) > 0.2) > 0.95
    assert 0.05 < 1 - lit.float().mean() < 0.3                          # there are black corners
    # 2 pixels in from the turned crop's edge and the cut-out's (where bilinear meets black).
    inner = (-F.max_pool2d(-F.pad(mask[0], (2, 2, 2, 2)), 5, stride=1))[0].bool()
    diff = (got - want).abs()[:, inner]
    assert diff.max() < 0.05 and diff.mean() < 0.01, (diff.max(), diff.mean())
    assert (got - reference(-degrees)).abs()[:, inner].mean() > 0.05   # turned the other way: not it


def test_gumbel_softmax_is_a_distribution_over_all_codes_or_the_notebooks_even_and_odd_codes():
    """split=True is the notebook's `logits.view(1, V // 2, -1)` softmax over dim 1, as
    benchmarks/reference_loop.py runs it (F.gumbel_softmax): a distribution over the even codes
    and one over the odd codes at each position, the same numbers as the reference's for the
    same noise (F.gumbel_softmax's gumbels are -log E, E ~ Exp(1): ours from u = exp(-E))."""
    from types import SimpleNamespace

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from reference_loop import ReferenceLoop

    logits = torch.randn(2, 16, 3, 3)
    u = torch.rand_like(logits)
    whole = gumbel_softmax(logits, u, 2.0, split=False)
    assert torch.allclose(whole.sum(1), torch.ones(2, 3, 3))
    halves = gumbel_softmax(logits, u, 2.0, split=True)
    assert torch.allclose(halves[:, 0::2].sum(1), torch.ones(2, 3, 3))   # the even codes
    assert torch.allclose(halves[:, 1::2].sum(1), torch.ones(2, 3, 3))   # the odd codes
    for b in range(2):   # the reference is one image: each of the batch, with the noise it draws
        torch.manual_seed(b)
        exp = torch.empty_like(logits[b:b + 1]).exponential_()
        torch.manual_seed(b)
        ref = ReferenceLoop.soft_codes(SimpleNamespace(settings=SimpleNamespace(split_softmax=True, tau=2.0),
                                                       logits=logits[b:b + 1]))
        ours = gumbel_softmax(logits[b:b + 1], torch.exp(-exp), 2.0, split=True)
        assert torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()


def test_a_picture_larger_than_clips_side_is_shrunk_with_antialiasing():
    """A frame of grid 64 (512 pixels) as CLIP sees it (224): detail finer than CLIP's pixels
    (1-pixel stripes, grey to the eye) is averaged to grey, not aliased into stripes of its own as
    plain bilinear sampling of 2 of every 2.3 pixels does."""
    from types import SimpleNamespace

    from engine.generate import _clip_embed, _clip_norm

    seen = []
    models = SimpleNamespace(clip_resolution=224, clip=SimpleNamespace(
        encode_image=lambda x: seen.append(x) or torch.zeros(len(x), 4)))
    stripes = torch.zeros(1, 3, 512, 512)
    stripes[..., ::2] = 1
    _clip_embed(models, stripes)
    mean, std = _clip_norm(stripes.device, stripes.dtype)
    pixels = seen[0] * std + mean                                       # [1, 3, 224, 224] in 0..1
    assert pixels.shape == (1, 3, 224, 224)
    assert (pixels - 0.5).abs().max() < 0.1 and pixels.std() < 0.02   # plain bilinear: 0.43 and 0.29


@pytest.mark.parametrize("prompt, parts", [
    ("a house", [PromptPart("a house", 1.0)]),
    ("a house | by Escher:0.5 | blurry:-1", [PromptPart("a house"), PromptPart("by Escher", 0.5), PromptPart("blurry", -1.0)]),
    ("a sign: open", [PromptPart("a sign: open")]),
    ("ratio 16:9: 2", [PromptPart("ratio 16:9", 2.0)]),   # a weight after a digit takes a space
    ("ratio 16:9:2", [PromptPart("ratio 16:9:2")]),      # else a colon between digits is text
])
def test_parse_prompt(prompt, parts):
    assert parse_prompt(prompt) == parts


@pytest.mark.parametrize("prompt, message", [
    ("", "empty"), ("   \n\t", "empty"), ("a || b", "empty part"), ("blurry:-1", "positive"),
    (" | ".join(["x"] * 9), "at most 8"), ("a:500", "between -100 and 100"),
])
def test_bad_prompts_are_refused_with_a_reason(prompt, message):
    with pytest.raises(PromptError) as err:
        parse_prompt(prompt)
    if message:
        assert message in str(err.value)


def test_a_prompt_over_77_tokens_is_truncated_with_a_warning(tiny_models):
    targets = encode_targets(tiny_models, "a very long prompt " * 40)
    assert targets.embeddings.shape == (1, 32)
    assert len(targets.warnings) == 1 and "truncated" in targets.warnings[0]
    assert encode_targets(tiny_models, "short").warnings == []


def test_weighted_loss_is_the_weighted_sum_of_the_parts(tiny_models):
    """One step's loss for `a | b:0.5 | c:-1` equals the weighted sum of the single-part losses."""
    s = replace(FAST, iterations=1)
    parts = [PromptPart("a house", 1.0), PromptPart("by Escher", 0.5), PromptPart("blurry", -1.0)]

    def first_loss(prompt_parts):
        runner = BatchRunner(tiny_models)
        slot = runner.add(Slot("x", tiny_models, encode_targets(tiny_models, prompt_parts), s))
        runner.step()
        return slot.last_loss

    together = first_loss(parts)
    separately = [p.weight * first_loss([PromptPart(p.text, 1.0)]) for p in parts]
    assert together == pytest.approx(sum(separately), rel=1e-4, abs=1e-6)


def _leaves(value, path=()):
    """(path, value) of every leaf of a nested state (dicts and lists walked)."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _leaves(v, path + (k,))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _leaves(v, path + (i,))
    else:
        yield path, value


def assert_same_state(a, b):
    la, lb = dict(_leaves(a)), dict(_leaves(b))
    assert la.keys() == lb.keys()
    for path, x in la.items():
        y = lb[path]
        if torch.is_tensor(x):
            assert x.dtype == y.dtype and torch.equal(x, y), path
        else:
            assert x == y, path


def test_a_state_is_a_snapshot_that_later_steps_do_not_change(tiny_models):
    """The worker's GPU thread takes Slot.state() at a frame and steps on while the asyncio side
    serialises it: what it serialises must be the state of that iteration, Adam's moments and step
    count included (they were live tensors: a torn checkpoint), and resume to the same result."""
    s = replace(FAST, iterations=6, frame_every=6)
    targets = encode_targets(tiny_models, "a cat")
    runner = BatchRunner(tiny_models)
    slot = runner.add(Slot("x", tiny_models, targets, s))
    runner.step()
    runner.step()
    state = slot.state()
    at_once = state_from_bytes(state_to_bytes(state))   # serialised the moment it was taken
    for _ in range(4):
        runner.step()                                    # ... the thread steps on
    assert slot.done
    assert_same_state(state_from_bytes(state_to_bytes(state)), at_once)
    assert state["iteration"] == 2 and int(state["optimizer"]["state"][0]["step"]) == 2
    resumed = BatchRunner(tiny_models)
    again = resumed.add(Slot("y", tiny_models, targets, s, checkpoint=state))
    while not again.done:
        resumed.step()
    assert torch.equal(again.logits, slot.logits)


def test_compact_state_halves_state_pt_and_keeps_the_picture(tiny_models):
    """A finished job's state.pt: logits fp16, Adam's moments bf16, back to fp32 on load. The
    picture (argmax of the logits) is kept exactly, even where fp16 rounding ties two codes;
    Continue runs from it."""
    from engine.generate import compact_state, expand_state, frame_image

    s = replace(FAST, iterations=4, frame_every=4)
    state = generate("a cat", s, tiny_models).state
    logits = state["logits"]                                       # [1, V, 8, 8]
    # A near-tie fp16 cannot tell apart, the winner at the higher index: plain rounding would tie
    # them and argmax would pick the lower index (another code, another picture).
    top = logits[0, :, 0, 0].max().item()
    logits[0, 10, 0, 0], logits[0, 20, 0, 0] = top + 1.0, top + 1.0 + 1e-4
    assert torch.equal(logits[:, :, :1, :1].half().argmax(1), torch.tensor([[[10]]]))
    compact = compact_state(state)
    assert compact["logits"].dtype == torch.float16
    moments = compact["optimizer"]["state"][0]
    assert moments["exp_avg"].dtype == moments["exp_avg_sq"].dtype == torch.bfloat16
    assert moments["step"].dtype == torch.float32 and int(moments["step"]) == 4   # counts stay exact
    full, small = len(state_to_bytes(state)), len(state_to_bytes(compact))
    assert small < 0.52 * full, (small, full)

    back = expand_state(state_from_bytes(state_to_bytes(compact)))
    assert back["logits"].dtype == torch.float32
    assert torch.equal(back["logits"].argmax(1), logits.argmax(1))   # every position's code
    assert torch.equal(frame_image(tiny_models, back["logits"]), frame_image(tiny_models, logits))
    assert torch.allclose(back["logits"], logits, rtol=2 ** -10, atol=1e-6)
    for name in ("exp_avg", "exp_avg_sq"):
        was = state["optimizer"]["state"][0][name]
        assert torch.allclose(back["optimizer"]["state"][0][name], was, rtol=2 ** -7, atol=0), name
    assert torch.equal(back["generator"], state["generator"])
    # Two more steps from it, as a Continue does: fp32 again, Adam's count going on from 4.
    more = generate("a cat", replace(s, iterations=6), tiny_models, checkpoint=compact).state
    assert more["iteration"] == 6 and more["logits"].dtype == torch.float32
    assert int(more["optimizer"]["state"][0]["step"]) == 6
    assert more["optimizer"]["state"][0]["exp_avg"].dtype == torch.float32


def test_a_state_that_does_not_fit_the_job_is_refused_when_loaded(tiny_models):
    """Refused at the start (ValueError), not at the first step, where the optimiser would raise
    and take the whole batch with it."""
    s = replace(FAST, iterations=2, frame_every=2)
    state = generate("a cat", s, tiny_models).state
    targets = encode_targets(tiny_models, "a cat")
    moments = state["optimizer"]["state"][0]
    bad = dict(state, optimizer=dict(state["optimizer"], state={0: dict(moments, exp_avg=moments["exp_avg"][..., :4, :4])}))
    with pytest.raises(ValueError, match=r"optimiser state 'exp_avg' \(1, 8192, 4, 4\) does not fit"):
        Slot("x", tiny_models, targets, s, checkpoint=bad)
    with pytest.raises(ValueError, match="saved logits"):
        Slot("x", tiny_models, targets, s, checkpoint=dict(state, logits=state["logits"][..., :1, :1]))


@pytest.mark.parametrize("poison", ["logits", "exp_avg_sq"])
def test_a_non_finite_state_fails_the_run_instead_of_finishing_with_blank_frames(tiny_models, poison):
    """A state.pt holding NaN (a Continue of a run that diverged) or an infinite Adam moment: NaN
    logits' argmax is a flat picture of code 0, and Adam keeps them NaN. The run raises at its
    first frame (NonFiniteError, a FloatingPointError) rather than ending done."""
    s = replace(FAST, iterations=4, frame_every=2)
    state = generate("a cat", s, tiny_models).state
    if poison == "logits":
        state["logits"][0, 3, 1, 1] = float("nan")
    else:
        state["optimizer"]["state"][0]["exp_avg_sq"][0, 3, 1, 1] = float("inf")
    with pytest.raises(FloatingPointError, match="non-finite values .* logits / optimiser state at iteration 4"):
        generate("a cat", replace(s, iterations=6), tiny_models, checkpoint=state)


def test_a_state_loaded_twice_resumes_the_same_both_times(tiny_models):
    """load_state copied the moments but not Adam's step count: the resumed slot stepped the
    caller's own tensor, so the same state loaded again resumed with another bias correction."""
    s = GenerationSettings(iterations=6, frame_every=2, grid=8, cutn=2, seed=1)
    targets = encode_targets(tiny_models, "a red house")
    runner = BatchRunner(tiny_models)
    slot = runner.add(Slot("a", tiny_models, targets, s))
    for _ in range(3):
        runner.step()
    state = slot.state()
    step_saved = state["optimizer"]["state"][0]["step"].clone()
    resumed = []
    for name in ("b", "c"):
        again = BatchRunner(tiny_models)
        resumed.append(again.add(Slot(name, tiny_models, targets, s, checkpoint=state)))
        again.step()
        again.step()
    assert torch.equal(state["optimizer"]["state"][0]["step"], step_saved)
    assert torch.equal(resumed[0].logits, resumed[1].logits)
