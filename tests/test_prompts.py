"""engine.prompts.clip_overflow: the note a person gets when CLIP will not read all of a prompt,
computed without torch and cut exactly where engine.generate's tokenizer cuts."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from engine import cli
from engine.prompts import clip_overflow, parse_prompt

HOUSE = "a beautiful house designed by Escher, "


@pytest.mark.parametrize("repeats", [7, 8, 9, 10])
def test_the_note_appears_exactly_when_the_engine_truncates(repeats):
    from engine.generate import tokenize   # noqa: PLC0415 - torch, clip

    text = HOUSE * repeats + "with a red door"
    _, engine_warnings = tokenize([text], 77)
    notes = clip_overflow(parse_prompt(text))
    assert bool(notes) == bool(engine_warnings)
    if notes:
        assert "door'" in notes[0] and "CLIP reads only the first 75 tokens" in notes[0]


def test_each_part_is_judged_alone_and_short_prompts_get_no_note():
    assert clip_overflow(parse_prompt("a house | by Escher:0.5")) == []
    notes = clip_overflow(parse_prompt(f"a house | {HOUSE * 10}at dusk:0.5"))
    assert len(notes) == 1 and "at dusk" in notes[0]


def test_the_check_needs_no_torch():
    code = ("import sys; from engine.prompts import clip_overflow, parse_prompt; "
            f"assert clip_overflow(parse_prompt({(HOUSE * 10)!r})); assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_the_cli_warns_before_the_models_load(tmp_path, capsys):
    code = cli.main([HOUSE * 10 + "in the rain", "--out", str(tmp_path / "o"),
                     "--clip-model", str(tmp_path / "nope.pt"), "--device", "cpu"])
    assert code == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("imagine: warning: CLIP reads only") and "in the rain" in err[0]
    assert "nope.pt" in err[1]


# --- weights: numbers as people type them, and what only looks like one ---------------------------


@pytest.mark.parametrize("prompt, parts", [
    ("a house | blurry:-1e1", [("a house", 1.0), ("blurry", -10.0)]),           # exponent
    ("a house | blurry:1E-2", [("a house", 1.0), ("blurry", 0.01)]),
    ("a house | blurry:\u22121", [("a house", 1.0), ("blurry", -1.0)]),        # Unicode minus U+2212
    ("a house | blurry:\uff0d0.5", [("a house", 1.0), ("blurry", -0.5)]),      # full-width minus
    ("a house | blurry: \u22122e-1", [("a house", 1.0), ("blurry", -0.2)]),
    # Colons that are text stay text, as before.
    ("time 10:30 pm", [("time 10:30 pm", 1.0)]),
    ("a sign that says: open", [("a sign that says: open", 1.0)]),
    ("smile :-)", [("smile :-)", 1.0)]),
])
def test_weights_in_exponent_form_and_with_a_unicode_minus_are_numbers(prompt, parts):
    assert [(p.text, p.weight) for p in parse_prompt(prompt)] == parts


@pytest.mark.parametrize("prompt, shown", [
    ("a house:nan", "':nan'"),
    ("a house | blurry:-inf", "':-inf'"),
    ("a house | blurry:Infinity", "':Infinity'"),
    ("a house | blurry:\u2212nan", "nan"),
    ("a house | blurry:-0,5", "':-0,5'"),      # a decimal comma
    ("a house | blurry:-1x", "':-1x'"),
])
def test_a_weight_that_is_no_finite_number_is_refused_not_read_as_text(prompt, shown):
    """Read as text these parts used to get weight +1: 'push away' became 'pull toward'."""
    from engine.prompts import PromptError

    with pytest.raises(PromptError) as err:
        parse_prompt(prompt)
    message = str(err.value)
    assert shown in message and "not a weight" in message and "between -100 and 100" in message
    assert "\n" not in message


@pytest.mark.parametrize("prompt, parts", [
    # Phones and macOS autocorrect "-" and "--" into en and em dashes: still a minus sign.
    ("a house | blurry:\u20131", [("a house", 1.0), ("blurry", -1.0)]),       # en dash U+2013
    ("a house | blurry:\u20141", [("a house", 1.0), ("blurry", -1.0)]),       # em dash U+2014
    ("a house | blurry: \u20130.5", [("a house", 1.0), ("blurry", -0.5)]),
    ("a house | x:1e\u20132", [("a house", 1.0), ("x", 0.01)]),
    # A dash that is not the sign of a weight's number stays text, as before.
    ("a house \u2013 blurry", [("a house \u2013 blurry", 1.0)]),
    ("a house \u2014 at dusk | blurry:-1", [("a house \u2014 at dusk", 1.0), ("blurry", -1.0)]),
    ("a sign: \u2013 closed \u2013", [("a sign: \u2013 closed \u2013", 1.0)]),
    ("pages 3\u20137 of a book", [("pages 3\u20137 of a book", 1.0)]),
    ("a clock showing 10:30 \u2013 dusk", [("a clock showing 10:30 \u2013 dusk", 1.0)]),
])
def test_an_en_or_em_dash_before_a_weight_is_a_minus_sign(prompt, parts):
    """`blurry:–1` used to be the text "blurry:–1" at weight +1: pulled toward, not pushed away."""
    assert [(p.text, p.weight) for p in parse_prompt(prompt)] == parts


@pytest.mark.parametrize("prompt, shown", [
    ("a house | blurry:- 1", "':- 1'"),              # a space after the sign
    ("a house | blurry: \u2013 1", "':\u2013 1'"),
    ("a house | blurry:+ 2", "':+ 2'"),
    ("a house | blurry:--1", "':--1'"),              # a doubled sign ("--" not autocorrected)
])
def test_a_sign_apart_from_its_number_is_refused_not_read_as_text(prompt, shown):
    """Read as text, `blurry:- 1` got weight +1, silently; it is refused like `-1x`, saying how to write it."""
    from engine.prompts import PromptError

    with pytest.raises(PromptError) as err:
        parse_prompt(prompt)
    message = str(err.value)
    assert shown in message and "not a weight" in message and "blurry:-1" in message


@pytest.mark.parametrize("prompt, shown", [
    ("a castle | (blurry:-1)", "':-1)'"),            # wrapped in brackets or quotes
    ("a castle | [blurry:-1]", "':-1]'"),
    ('a castle | "blurry:-1"', "':-1\"'"),
    ("a castle | `blurry:-1`", "':-1`'"),             # copied from the help with its backticks
    ("a castle, (blurry:-1)", "':-1)'"),
    ("a castle | blurry:(-1)", "':(-1)'"),
    ("a castle | blurry:-1,", "':-1,'"),              # punctuation after it
    ("a castle | blurry:-1;", "':-1;'"),
    ("a castle | blurry:-1.0!", "':-1.0!'"),
    ("a castle | blurry:( - 1 )", "':( - 1 )'"),
    ("a castle | (blurry:1.5)", "':1.5)'"),           # Stable Diffusion's emphasis: no weight here either
])
def test_a_weight_in_brackets_or_followed_by_punctuation_is_refused_not_read_as_text(prompt, shown):
    """Read as text `(blurry:-1)` got weight +1: "push away" became "pull toward" (and `(blurry:1.5)`
    lost its emphasis); it is refused, saying how to write it."""
    from engine.prompts import PromptError

    with pytest.raises(PromptError) as err:
        parse_prompt(prompt)
    message = str(err.value)
    assert shown in message and "not a weight" in message and "blurry:-1" in message, message
    # A stored prompt (queued before these were refused) is read as it was then: that part is text.
    assert [p.weight for p in parse_prompt(prompt, strict=False)] == [1.0] * len(prompt.split("|"))


@pytest.mark.parametrize("prompt", [
    "smile :-)", "smile :)", "sad :(", "a sale: -50%", "a sale: (-50%)", "price: 1,000", "price: 1,000.",
    "(at 10:30)", "a clock at 10:30.", "a screen (16:9)", "meet me at 7:00!", "a (red:1.5) house",
    "temperature: -5 degrees.", "movie (rated: 18)", "a poster that says 'Top 10: 1'", "room: 101?", "rated: 5!",
])
def test_brackets_and_punctuation_after_text_or_a_time_stay_text(prompt):
    """`a clock at 10:30.` was "a clock at 10" at weight 30."""
    assert [(p.text, p.weight) for p in parse_prompt(prompt)] == [(prompt, 1.0)]


@pytest.mark.parametrize("prompt", [
    "temperature: -5 degrees", "sale sign: -50% off", "a sale: -50%", "price: 1,000",
    "portrait of my grandmother: Nan", "time 10:30 pm", "smile :-)",
])
def test_ordinary_text_after_a_colon_stays_text(prompt):
    """Only a tail that is one plainly number-like token is taken for a broken weight."""
    assert [(p.text, p.weight) for p in parse_prompt(prompt)] == [(prompt, 1.0)]


@pytest.mark.parametrize("prompt", [
    "a clock showing 10:30",          # was "a clock showing 10" at weight 30
    "a castle, aspect ratio 16:9",    # weight 9
    "scripture, John 3:16",           # weight 16
    "a city skyline at 7:00",         # weight 0: refused, nothing positive
    "John 3:16:2",                    # the last colon is between digits too
])
def test_a_colon_between_digits_is_text_not_a_weight(prompt):
    assert [(p.text, p.weight) for p in parse_prompt(prompt)] == [(prompt, 1.0)]


@pytest.mark.parametrize("prompt, parts", [
    ("a house | by Escher:0.5 | blurry:-1", [("a house", 1.0), ("by Escher", 0.5), ("blurry", -1.0)]),
    ("a cat:2", [("a cat", 2.0)]),
    ("a cat: 2", [("a cat", 2.0)]),
    ("x:0.5 | blurry:-1", [("x", 0.5), ("blurry", -1.0)]),
    ("x:1e-1", [("x", 0.1)]),
    ("a house at 7:30 | blurry:-1", [("a house at 7:30", 1.0), ("blurry", -1.0)]),
    # After a digit a weight takes a space (or a sign, which is no digit).
    ("ratio 16:9: 2", [("ratio 16:9", 2.0)]),
    ("a house | John 3:16 :0.5", [("a house", 1.0), ("John 3:16", 0.5)]),
    ("a house | page 12:-1", [("a house", 1.0), ("page 12", -1.0)]),
    # A decimal weight straight after a digit is still a weight (as before the rule for times).
    ("photo from 1985:0.5 | a house", [("photo from 1985", 0.5), ("a house", 1.0)]),
    ("model v2:1.5 | blurry:-1", [("model v2", 1.5), ("blurry", -1.0)]),
])
def test_documented_weights_still_parse_next_to_colons_between_digits(prompt, parts):
    assert [(p.text, p.weight) for p in parse_prompt(prompt)] == parts


def test_a_number_out_of_range_after_a_colon_is_refused_saying_how_to_keep_the_colon_as_text(tmp_path, capsys):
    """`retro movie poster: 1984` most likely meant the colon as text, but a weight of 1984 may as
    well be a typo for 19.84: refused, not guessed, with both ways out. The CLI parses the same way:
    a time there reaches the model loading (no prompt error), the poster is refused with that text."""
    from engine.prompts import PromptError

    with pytest.raises(PromptError) as err:
        parse_prompt("retro movie poster: 1984")
    assert str(err.value) == ("the weight of 'retro movie poster' must be a number between -100 and 100; if "
                              "': 1984' is text, not a weight, drop that colon or add a word after the number")
    for prompt, error in [("a city skyline at 7:00", "nope.pt"), ("retro movie poster: 1984", "drop that colon")]:
        code = cli.main([prompt, "--out", str(tmp_path / "o"), "--clip-model", str(tmp_path / "nope.pt"),
                         "--device", "cpu"])
        err_lines = capsys.readouterr().err.splitlines()
        assert code == 2 and len(err_lines) == 1 and error in err_lines[0], (prompt, err_lines)


def test_an_overflowing_exponent_is_refused_by_the_range_check():
    from engine.prompts import PromptError

    with pytest.raises(PromptError, match="between -100 and 100"):
        parse_prompt("a house | blurry:-1e999")


# --- what the picture is pulled toward: a positive part, or a positive image prompt ----------------


def test_a_positive_image_prompt_is_the_positive_target_a_negative_only_prompt_needs():
    """`/imagine prompt:"blurry:-1" image:<png>`: the image is what the picture is pulled toward."""
    from engine.prompts import PromptError

    assert [(p.text, p.weight) for p in parse_prompt("blurry:-1", [0.5])] == [("blurry", -1.0)]
    assert [p.weight for p in parse_prompt("blurry:-1 | text:-0.5", [-1.0, 2.0])] == [-1.0, -0.5]
    for weights in ([-1.0], [0.0]):   # an image pushed away (or not at all) is no target to pull toward
        with pytest.raises(PromptError, match="^at least one part, or the image prompt, needs a positive weight$"):
            parse_prompt("blurry:-1", weights)
    with pytest.raises(PromptError, match="^at least one part needs a positive weight$"):
        parse_prompt("blurry:-1")


def test_the_engine_pulls_toward_a_positive_image_with_only_negative_text(tiny_models):
    """The loss is minus the weighted similarities to every target, text and image alike, so with
    `blurry:-1` and an image prompt of weight 1 it is well defined: the frames report the image's
    similarity (the target pulled toward, not the negative part), every step's loss is finite, and
    the picture ends up nearer the image than in the same run with the image pushed away."""
    from dataclasses import replace

    from engine.generate import GenerationSettings, PromptPart, encode_targets, generate
    from engine.image_prompts import to_tensor
    from tests.test_image_inputs import noise_image

    target = to_tensor(noise_image(seed=5))
    targets = encode_targets(tiny_models, "blurry:-1", [(target, 1.0, "image")])
    assert targets.weights.tolist() == [-1.0, 1.0] and targets.labels == ["blurry", "image"]
    assert targets.headline == 1

    settings = GenerationSettings(iterations=20, frame_every=5, grid=8, cutn=8, seed=3, lr=0.1)
    pulled = generate("blurry:-1", settings, tiny_models, image_targets=[(target, 1.0, "image")])
    assert all(f.similarity == f.similarities[1] for f in pulled.frames)
    assert all(math.isfinite(f.loss) for f in pulled.frames[1:])   # frame 0 is before any step
    # The control: the same run with the image pushed away (parts given as a list skip the check).
    pushed = generate([PromptPart("blurry", -1.0)], replace(settings), tiny_models,
                      image_targets=[(target, -1.0, "image")])
    toward, away = ([f.similarities[1] for f in run.frames[1:]] for run in (pulled, pushed))
    assert sum(toward) / len(toward) > sum(away) / len(away) + 0.005, (toward, away)


def test_a_clip_note_on_invisible_characters_fits_its_line_whole():
    """A part whose text CLIP cuts is quoted with its invisible characters spelled out (`\\u200b`,
    six characters each): the note still fits the line the bot gives it (render.CLIP_NOTE_CHARS),
    so it is never cut inside an escape and keeps its token count. Before: 331 characters, cut to
    `\\u2…` without the count."""
    from bot.render import CLIP_NOTE_CHARS
    from engine.prompts import clip_overflow, parse_prompt

    part = "𓀀" * 20 + "\u200b" * 20
    (note,) = clip_overflow(parse_prompt(f"{part} {part} {part}"))
    assert len(note) <= CLIP_NOTE_CHARS, (len(note), note)
    assert note.endswith(" tokens)") and "\\u200b" in note, note


@pytest.mark.parametrize("prompt", [
    "a cat | blurry:-1\u200b",          # a zero-width space pasted after it
    "a cat | blurry:\u200f-1",          # a right-to-left mark a keyboard typed
    "a cat | blurry:-1\u00ad",          # a soft hyphen
    "a cat | blurry:\u2068-1\u2069",    # bidi isolates around it
    "a cat | blurry\uff1a-1",           # a full-width colon, as a Chinese or Japanese input method types it
    "\u307c\u3084\u3051\u305f\ufe55-1 | a cat",   # a small colon
])
def test_a_weight_hidden_by_an_invisible_character_or_a_wide_colon_is_refused_not_read_as_text(prompt):
    """Such a part missed the weight's pattern and passed as text at weight +1: "push away"
    became "pull toward", and nothing on screen showed why. A stored prompt reads as it did."""
    from engine.prompts import PromptError

    with pytest.raises(PromptError) as err:
        parse_prompt(prompt)
    message = str(err.value)
    assert "reads as the weight ':-1'" in message and "type it again as :-1 with a plain ':'" in message, message
    assert [p.weight for p in parse_prompt(prompt, strict=False)] == [1.0, 1.0]
    # Text with such characters and no weight in it is text, as before.
    for text in ("a \u200bcat", "a cat\u200b | blurry:-1", "time\uff1a10\uff1a30", "\u200fa cat:0.5"):
        parse_prompt(text)
