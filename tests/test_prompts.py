"""engine.prompts.clip_overflow: the note a person gets when CLIP will not read all of a prompt,
computed without torch and cut exactly where engine.generate's tokenizer cuts."""

from __future__ import annotations

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
