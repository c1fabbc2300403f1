"""engine.generate on tiny random-weight models: the loop really runs and the similarity rises."""

from __future__ import annotations

import threading
from dataclasses import replace

import numpy as np
import pytest
import torch

from engine.generate import (
    BatchRunner, GenerationSettings, PromptError, PromptPart, Slot, cutout_grid, encode_targets,
    generate, gumbel_softmax, make_cutouts, parse_prompt, state_from_bytes, state_to_bytes,
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


def test_resume_from_a_checkpoint_gives_the_same_frames(tiny_models):
    s = replace(FAST, iterations=12, frame_every=4)
    checkpoints = []
    whole = generate("a cat", s, tiny_models, on_checkpoint=lambda st: checkpoints.append(state_to_bytes(st)))
    assert [state_from_bytes(c)["iteration"] for c in checkpoints] == [4, 8]
    resumed = generate("a cat", s, tiny_models, checkpoint=state_from_bytes(checkpoints[0]))
    assert [f.iteration for f in resumed.frames] == [4, 8, 12]
    assert np.array_equal(resumed.final.pixels, whole.final.pixels)
    assert torch.equal(resumed.state["logits"], whole.state["logits"])


def test_cutouts_are_one_batched_op_of_the_right_shape(tiny_models):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 64, 64)
    cuts = make_cutouts(images, 5, 32, [FAST] * 3, [g, g, g])
    assert cuts.shape == (15, 3, 32, 32)
    grid, mask = cutout_grid(4, 16, 0.5, 0.99, 30.0, torch.Generator().manual_seed(1), torch.device("cpu"))
    assert grid.shape == (4, 16, 16, 2) and mask.shape == (4, 1, 16, 16)
    assert grid.abs().max() <= 1.5  # inside the image, up to a rotated corner
    assert 0.6 < mask.mean() <= 1.0  # the rotated square's corners are black


def test_gumbel_softmax_is_a_distribution_over_all_codes_or_two_halves():
    logits = torch.randn(2, 16, 3, 3)
    u = torch.rand_like(logits)
    whole = gumbel_softmax(logits, u, 2.0, split=False)
    assert torch.allclose(whole.sum(1), torch.ones(2, 3, 3))
    halves = gumbel_softmax(logits, u, 2.0, split=True)
    assert torch.allclose(halves.view(2, 2, 8, 3, 3).sum(2), torch.ones(2, 2, 3, 3))


@pytest.mark.parametrize("prompt, parts", [
    ("a house", [PromptPart("a house", 1.0)]),
    ("a house | by Escher:0.5 | blurry:-1", [PromptPart("a house"), PromptPart("by Escher", 0.5), PromptPart("blurry", -1.0)]),
    ("a sign: open", [PromptPart("a sign: open")]),
    ("ratio 16:9:2", [PromptPart("ratio 16:9", 2.0)]),
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
