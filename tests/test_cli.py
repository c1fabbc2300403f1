"""The `imagine` CLI end to end on tiny models, and its bad-argument errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from PIL import Image

from engine import cli


def test_imagine_renders_frames_final_video_and_run_json(tiny_model_files, tmp_path):
    out = tmp_path / "run"
    f = tiny_model_files
    proc = subprocess.run(
        [sys.executable, "-m", "engine.cli", "a house | blurry:-0.5", "--out", str(out),
         "--iterations", "4", "--frame-every", "2", "--grid", "32", "--seed", "5",
         "--clip-model", str(f.clip_torchscript), "--decoder", str(f.decoder_pickle), "--trust-decoder",
         "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"],
        capture_output=True, text=True, timeout=240, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (out / "frames").iterdir()) == ["000000.png", "000002.png", "000004.png"]
    assert Image.open(out / "final.png").size == (256, 256)
    assert (out / "final.png").read_bytes() == (out / "frames" / "000004.png").read_bytes()
    run = json.loads((out / "run.json").read_text())
    assert run["prompt"] == "a house | blurry:-0.5" and run["seed"] == 5
    assert run["parts"] == [{"text": "a house", "weight": 1.0}, {"text": "blurry", "weight": -0.5}]
    assert [r["iteration"] for r in run["frames"]] == [0, 2, 4]
    assert all(isinstance(r["similarity"], float) for r in run["frames"])
    assert run["settings"]["grid"] == 32 and run["timings"]["generate_s"] > 0
    assert (out / "video.mp4").stat().st_size > 0
    assert set(os.listdir(tmp_path)) == {"run", "cache"}  # nothing written into the working directory


def test_the_progress_bar_moves_every_iteration_with_a_rate_between_frames(tiny_model_files, tmp_path):
    """--frame-every above --iterations: frames at 0 and the last only. The bar (tqdm, on stderr)
    still shows every iteration with a rate and an ETA, not `0/4 [?it/s]` until the last frame,
    and ends at 4/4 with the similarity the last frame set. TQDM_MININTERVAL=0 (tqdm's own
    setting, read from the environment) draws every update, so none is skipped for being quick."""
    out = tmp_path / "run"
    f = tiny_model_files
    proc = subprocess.run(
        [sys.executable, "-m", "engine.cli", "a house", "--out", str(out), "--iterations", "4",
         "--frame-every", "50", "--grid", "32", "--cutn", "1", "--clip-model", str(f.clip_torchscript),
         "--decoder", str(f.decoder_pickle), "--trust-decoder", "--cache-dir", str(tmp_path / "cache"),
         "--device", "cpu"],
        capture_output=True, text=True, timeout=240, cwd=tmp_path, env={**os.environ, "TQDM_MININTERVAL": "0"},
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (out / "frames").iterdir()) == ["000000.png", "000004.png"]
    bars = [line for line in re.split(r"[\r\n]", proc.stderr) if line.startswith("imagine:")]
    shown = [int(m.group(1)) for line in bars if (m := re.search(r"\| (\d+)/4 \[", line))]
    assert shown[0] == 0 and shown[-1] == 4 and sorted(shown) == shown, bars
    for n in (1, 2, 3):   # each iteration drawn, with a rate (it/s, or s/it when slow) and an ETA
        assert any(re.search(rf"\| {n}/4 \[[\d:]+<[\d:]+, *[\d.]+(it/s|s/it)", line) for line in bars), bars
    assert "similarity=" in bars[-1], bars


def test_off_a_terminal_a_frame_does_not_redraw_the_bar(tiny_model_files, tmp_path):
    """stderr a pipe (a log file): a frame's similarity (tqdm's postfix) waits for the bar's next
    draw (at most one in 5 s there) instead of forcing a line of its own every frame: no count is
    drawn twice (but by the closing line), and the last line still shows the similarity."""
    out = tmp_path / "run"
    f = tiny_model_files
    env = {k: v for k, v in os.environ.items() if not k.startswith("TQDM_")}
    proc = subprocess.run(
        [sys.executable, "-m", "engine.cli", "a house", "--out", str(out), "--iterations", "3",
         "--frame-every", "1", "--grid", "32", "--cutn", "1", "--clip-model", str(f.clip_torchscript),
         "--decoder", str(f.decoder_pickle), "--trust-decoder", "--cache-dir", str(tmp_path / "cache"),
         "--device", "cpu"],
        capture_output=True, text=True, timeout=240, cwd=tmp_path, env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert len(list((out / "frames").iterdir())) == 4
    bars = [line for line in re.split(r"[\r\n]", proc.stderr) if line.startswith("imagine:")]
    shown = [int(m.group(1)) for line in bars if (m := re.search(r"\| (\d+)/3 \[", line))]
    assert len(shown) == len(bars) and shown[0] == 0 and shown[-1] == 3, bars
    assert all(a < b for a, b in zip(shown[:-2], shown[1:-1])), bars   # before: 0/3, then 0/3 with its similarity
    assert "similarity=" in bars[-1], bars


def test_from_run_starts_from_a_compact_state_at_the_earlier_runs_last_picture(tiny_model_files, tmp_path):
    """state.pt is written compact (fp16 logits, half the bytes); `--from-run` expands it, and the
    new run's frame 0 is the earlier run's final picture."""
    import torch

    f = tiny_model_files
    common = ["--iterations", "2", "--frame-every", "2", "--grid", "32", "--clip-model", str(f.clip_torchscript),
              "--decoder", str(f.decoder_pickle), "--trust-decoder", "--cache-dir", str(tmp_path / "cache"),
              "--device", "cpu"]
    first, second = tmp_path / "first", tmp_path / "second"
    for out, extra in ((first, []), (second, ["--from-run", str(first)])):
        proc = subprocess.run([sys.executable, "-m", "engine.cli", "a house", "--out", str(out), *common, *extra],
                              capture_output=True, text=True, timeout=240, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
    state = torch.load(first / "state.pt", weights_only=True)
    assert state["logits"].dtype == torch.float16
    assert (second / "frames" / "000000.png").read_bytes() == (first / "final.png").read_bytes()


@pytest.mark.parametrize("args, message", [
    (["--out", "x", "--iterations", "0"], "--iterations must be at least 1"),
    (["--out", "x", "--iterations", "ten"], "whole number"),
    (["--out", "x", "--grid", "48"], "invalid choice"),
    (["--out", "x", "--device", "tpu"], "invalid choice"),
    (["a cat"], "--out"),
    # Checked before the models load (`--clip-model` names no file: that error would come next).
    (["--out", "x", "--seed", "-1", "--clip-model", "/nonexistent/clip.pt"], "--seed must be between 0 and 4294967295"),
    (["--out", "x", "--seed", str(2**64), "--clip-model", "/nonexistent/clip.pt"], "--seed must be between 0"),
    (["--out", "x", "--fps", "0", "--clip-model", "/nonexistent/clip.pt"], "--fps must be"),
    (["--out", "x", "--fps", "nan", "--clip-model", "/nonexistent/clip.pt"], "--fps must be"),
    # ffmpeg refuses the duration of a frame at a slower rate: found out after the whole render.
    (["--out", "x", "--fps", "1e-9", "--clip-model", "/nonexistent/clip.pt"], "--fps must be a number from 0.01"),
    # Empty: not the working directory.
    (["--out", "", "--clip-model", "/nonexistent/clip.pt"], "--out must name a folder"),
    (["--out", "x", "--cache-dir", " ", "--clip-model", "/nonexistent/clip.pt"], "--cache-dir must name a folder"),
    (["--out", "x", "--log-level", "chatty"], "invalid choice"),
])
def test_bad_arguments_one_line_and_exit_2(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = args if args and not args[0].startswith("--") else ["a cat", *args]
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not os.listdir(tmp_path)   # nothing written


def test_a_folder_flag_expands_the_home_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    args = cli.build_parser().parse_args(["a cat", "--out", "~/out", "--cache-dir", "~/cache"])
    assert args.out == tmp_path / "out" and args.cache_dir == tmp_path / "cache"


@pytest.mark.parametrize("prompt, message", [("   ", "empty"), ("\u200b\u2060", "empty"), ("blurry:-1", "positive weight")])
def test_bad_prompts_exit_2(prompt, message, tmp_path, capsys):
    assert cli.main([prompt, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_a_negative_only_prompt_runs_with_a_positive_image_prompt(tiny_model_files, tmp_path, capsys):
    """`blurry:-1` alone pulls toward nothing, and so it does with an `--image-prompt` of weight 0
    or -1: exit 2, before the models load. With a positive image prompt the picture is the target
    (toward it, away from "blurry"): the run completes."""
    picture = tmp_path / "p.png"
    Image.new("RGB", (8, 8), "red").save(picture)
    for weight in ("0", "-1"):
        argv = ["blurry:-1", "--out", str(tmp_path / "o"), "--image-prompt", f"{picture}:{weight}",
                "--clip-model", "/nonexistent/clip.pt", "--device", "cpu"]
        assert cli.main(argv) == 2, weight
        err = capsys.readouterr().err
        assert "at least one part, or the image prompt, needs a positive weight" in err, err
        assert "/nonexistent/clip.pt" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()

    out = tmp_path / "run"
    assert cli.main(["blurry:-1", "--out", str(out), "--image-prompt", str(picture), "--iterations", "2",
                     "--frame-every", "2", "--grid", "32", "--cutn", "1", *_models(tiny_model_files, tmp_path)]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["parts"] == [{"text": "blurry", "weight": -1.0}]
    assert run["image_prompts"] == [{"file": "p.png", "weight": 1.0}]
    assert Image.open(out / "final.png").size == (256, 256)


def test_missing_model_file_exit_2(tmp_path, capsys):
    code = cli.main(["a cat", "--out", str(tmp_path / "o"), "--clip-model", str(tmp_path / "nope.pt"), "--device", "cpu"])
    assert code == 2
    err = capsys.readouterr().err
    assert "nope.pt" in err and len(err.strip().splitlines()) == 1


def test_untrusted_decoder_exit_2(tiny_model_files, tmp_path, capsys):
    code = cli.main(["a cat", "--out", str(tmp_path / "o"), "--clip-model", str(tiny_model_files.clip_state_dict),
                     "--decoder", str(tiny_model_files.decoder_pickle), "--cache-dir", str(tmp_path / "c"), "--device", "cpu"])
    assert code == 2
    err = capsys.readouterr().err
    # The CLI's own flag; not the bot's config keys, and no setting that does not exist.
    assert "If you trust this file, pass --trust-decoder." in err
    assert "known_sha256" not in err and "[worker]" not in err


def test_bad_files_exit_2_before_the_models_load(tmp_path, capsys):
    """Weights, output folders and earlier runs that cannot work are refused up front, with exit 2,
    not after minutes of loading models (or a traceback). `--clip-model` names no file, so an
    argument checked too late shows up as the model's error instead."""
    picture = tmp_path / "p.png"
    Image.new("RGB", (8, 8)).save(picture)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    garbage = tmp_path / "garbage-run"
    garbage.mkdir()
    (garbage / "state.pt").write_bytes(b"not a torch file")
    no_logits = tmp_path / "other-run"
    no_logits.mkdir()
    import torch

    torch.save({"something": 1}, no_logits / "state.pt")
    cases = [
        (["--image-prompt", f"{picture}:nan"], "weight"),
        (["--image-prompt", f"{picture}:1000"], "between -100 and 100"),
        (["--out", str(blocker / "sub")], "not a folder"),
        (["--from-run", str(garbage)], "state.pt"),
        (["--from-run", str(no_logits)], "state.pt"),
    ]
    for args, message in cases:
        argv = ["a cat", "--out", str(tmp_path / "o"), "--clip-model", "/nonexistent/clip.pt", "--device", "cpu", *args]
        assert cli.main(argv) == 2, args
        err = capsys.readouterr().err
        assert message in err and "/nonexistent/clip.pt" not in err and len(err.strip().splitlines()) == 1, (args, err)
    assert not (tmp_path / "o").exists()


def test_a_unicode_prompt_under_a_non_utf8_locale(tiny_model_files, tmp_path):
    """run.json is UTF-8 whatever the locale: under LC_ALL=C (no UTF-8 mode) writing it used to
    fail with UnicodeEncodeError after the whole render."""
    f = tiny_model_files
    env = {**os.environ, "LC_ALL": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "engine.cli", "un château 🏰", "--out", str(tmp_path / "run"), "--iterations", "1",
         "--grid", "32", "--cutn", "1", "--clip-model", str(f.clip_torchscript), "--decoder", str(f.decoder_pickle),
         "--trust-decoder", "--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--no-progress"],
        capture_output=True, text=True, timeout=240, cwd=tmp_path, env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "run" / "run.json").read_text(encoding="utf-8"))["prompt"] == "un château 🏰"


def test_from_run_reads_a_state_that_holds_only_logits(tmp_path):
    """`--from-run` uses only the logits: a state.pt without the optimiser's state (written by hand
    or by another tool) is read, its fp16 logits made fp32, rather than failing with a traceback."""
    import torch

    torch.save({"logits": torch.zeros(1, 8192, 32, 32, dtype=torch.float16)}, tmp_path / "state.pt")
    state = cli._read_state(tmp_path)
    assert state["logits"].dtype == torch.float32 and state["logits"].shape == (1, 8192, 32, 32)


# --- input and startup errors: one line, exit 2, nothing written ----------------------------------


def _interrupted_once(proc, ready) -> str:
    """Ctrl-C (SIGINT) to `proc` once `ready()`, polled every 0.05 s for up to 180 s while it runs;
    its stderr once it has exited."""
    import signal
    import time

    deadline = time.monotonic() + 180
    while not ready():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    return proc.communicate(timeout=120)[1]


def _models(f, tmp_path) -> list[str]:
    return ["--clip-model", str(f.clip_torchscript), "--decoder", str(f.decoder_pickle), "--trust-decoder",
            "--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--no-progress"]


@pytest.mark.parametrize("shape, message", [
    ((1, 16, 32, 32), "16 codes per cell, but the decoder has 8192"),
    ((2, 8192, 32, 32), "shape [2, 8192, 32, 32]"),
    ((1, 8192, 48, 48), "grid 48"),
])
def test_from_run_with_malformed_logits_exits_2_before_writing_anything(shape, message, tiny_model_files, tmp_path,
                                                                        capsys):
    """A state.pt of the wrong vocabulary used to crash with a traceback after making out/frames; one
    of batch 2 wrote frames/000000.png, then crashed in grid_sample."""
    import torch

    run = tmp_path / "run"
    run.mkdir()
    torch.save({"logits": torch.zeros(*shape)}, run / "state.pt")
    out = tmp_path / "o"
    code = cli.main(["a house", "--out", str(out), "--from-run", str(run), "--iterations", "2", "--cutn", "1",
                     *_models(tiny_model_files, tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_an_image_prompt_is_the_same_clip_input_as_the_workers(tiny_model_files, tmp_path, monkeypatch):
    """The CLI's image prompt is what the worker makes of the same picture (Worker._make_slot):
    centre-cropped and resized to CLIP's side with Lanczos, not handed over at full size to be
    shrunk bilinearly, which aliases fine detail (1-pixel stripes: grey to the eye) into a
    pattern of its own."""
    import numpy as np
    import torch

    from engine import generate as generate_module
    from engine.image_prompts import to_tensor
    from engine.images import load_image

    stripes = np.zeros((600, 900, 3), np.uint8)
    stripes[:, ::2] = 255
    picture = tmp_path / "stripes.png"
    Image.fromarray(stripes).save(picture)
    seen = {}
    real = generate_module.generate

    def spy(parts, settings, models, **kw):
        seen["targets"], seen["res"] = kw["image_targets"], models.clip_resolution
        return real(parts, settings, models, **kw)

    monkeypatch.setattr(generate_module, "generate", spy)
    assert cli.main(["a house", "--out", str(tmp_path / "run"), "--image-prompt", str(picture), "--iterations", "1",
                     "--frame-every", "1", "--grid", "32", "--cutn", "1", *_models(tiny_model_files, tmp_path)]) == 0
    [(got, weight, _)] = seen["targets"]
    res = seen["res"]
    worker = to_tensor(load_image(picture.read_bytes())[0], res)
    assert weight == 1.0 and got.shape == (3, res, res)
    assert torch.equal(got, worker)
    assert abs(got.mean().item() - 0.5) < 0.02 and got.std().item() < 0.05   # grey, as the stripes look


def test_a_non_empty_out_is_refused_before_the_models_load(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "frames").mkdir()
    (out / "frames" / "000000.png").write_bytes(b"an earlier run")
    (out / "o-2").mkdir()   # an unrelated name: the suggestion is beside --out
    code = cli.main(["a house", "--out", str(out), "--clip-model", "/nonexistent/clip.pt", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"--out {out} is not empty" in err and f"--out {tmp_path / 'o-2'}" in err
    assert "/nonexistent/clip.pt" not in err   # refused before the models load
    assert sorted(p.name for p in out.rglob("*")) == ["000000.png", "frames", "o-2"]


def test_an_out_that_cannot_be_written_is_refused_before_the_models_load(tmp_path, capsys, monkeypatch):
    """Checked by writing a probe file (root passes any os.access check; a read-only mount does not)."""
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(cli.tempfile, "mkstemp", refuse)
    existing = tmp_path / "empty"
    existing.mkdir()
    for out, message in ((existing, f"--out {existing}: cannot write in it (Permission denied)"),
                         (tmp_path / "new", f"--out {tmp_path / 'new'}: cannot create it in {tmp_path} (Permission denied)")):
        code = cli.main(["a house", "--out", str(out), "--clip-model", "/nonexistent/clip.pt", "--device", "cpu"])
        err = capsys.readouterr().err
        assert code == 2 and message in err and "/nonexistent" not in err and len(err.strip().splitlines()) == 1, err
    assert sorted(os.listdir(tmp_path)) == ["empty"] and not os.listdir(existing)


def test_an_empty_existing_out_is_used(tiny_model_files, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    assert cli.main(["a house", "--out", str(out), "--iterations", "1", "--grid", "32", "--cutn", "1",
                     *_models(tiny_model_files, tmp_path)]) == 0
    assert {"final.png", "run.json", "video.mp4", "state.pt", "frames"} == set(os.listdir(out))


@pytest.mark.parametrize("precision, noted", [("bf16", True), ("fp16", True), ("fp32", False), ("auto", False)])
def test_a_half_precision_asked_on_the_cpu_is_noted_not_refused(precision, noted, tmp_path, capsys):
    """engine.generate autocasts on CUDA only: on a CPU bf16 / fp16 run in fp32. The CLI says so in
    one line (before the models load; `--clip-model` names no file, so the run stops there)."""
    code = cli.main(["a house", "--out", str(tmp_path / "o"), "--precision", precision, "--device", "cpu",
                     "--clip-model", str(tmp_path / "nope.pt")])
    err = capsys.readouterr().err.strip().splitlines()
    note = f"imagine: note: --precision {precision} applies on CUDA only; on the CPU this runs in fp32"
    assert code == 2 and "nope.pt" in err[-1]   # the missing model's error, as without the note
    assert err[:-1] == ([note] if noted else []), err


def test_a_cpu_run_with_fp16_asked_runs_and_exits_0(tiny_model_files, tmp_path, capsys):
    out = tmp_path / "o"
    assert cli.main(["a house", "--out", str(out), "--iterations", "1", "--grid", "32", "--cutn", "1",
                     "--precision", "fp16", *_models(tiny_model_files, tmp_path)]) == 0
    err = capsys.readouterr().err
    assert err.count("imagine: note: --precision fp16 applies on CUDA only") == 1, err
    assert (out / "run.json").exists()


def test_cuda_graphs_asked_on_the_cpu_are_noted_and_the_run_goes_on(tiny_model_files, tmp_path, capsys):
    out = tmp_path / "o"
    assert cli.main(["a house", "--out", str(out), "--iterations", "1", "--grid", "32", "--cutn", "1",
                     "--cuda-graphs", *_models(tiny_model_files, tmp_path)]) == 0
    err = capsys.readouterr().err
    assert err.count("imagine: note: --cuda-graphs applies on CUDA only") == 1, err
    assert (out / "final.png").exists()


@pytest.mark.parametrize("args, message", [
    (["--cutn", "100000000"], "--cutn must be at most 256"),
    (["--iterations", "99999999999999999999"], "--iterations must be at most 100000"),
    (["--frame-every", "10000000000"], "--frame-every must be at most 100000"),
])
def test_sizes_beyond_any_gpu_are_refused_at_parse_time(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["a house", "--out", str(tmp_path / "o"), *args])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_the_help_states_the_bounds(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "1-100000" in out and "1-256" in out


def test_wrong_or_junk_clip_files_give_one_clean_line(tiny_model_files, tmp_path, capsys):
    """torch's message for a non-CLIP file is several lines with ANSI escapes (and advice to unpickle
    it anyway); for a junk file a bare number."""
    junk = tmp_path / "junk.pt"
    junk.write_bytes(bytes(range(256)) * 40)
    for wrong in (tiny_model_files.decoder_pickle, junk):
        code = cli.main(["a house", "--out", str(tmp_path / "o"), "--clip-model", str(wrong), "--device", "cpu",
                         "--cache-dir", str(tmp_path / "cache")])
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert "\x1b" not in err and "weights_only" not in err
        assert f"CLIP file {wrong} is corrupt or not a CLIP model" in err and "TorchScript archive" in err
    assert not (tmp_path / "o").exists()


def test_an_empty_clip_file_is_said_without_a_dangling_colon(tmp_path, capsys):
    """An empty file's error has no text: the line read "not a CLIP model:; expected ..."."""
    empty = tmp_path / "ViT-B-32.pt"
    empty.write_bytes(b"")
    code = cli.main(["a house", "--out", str(tmp_path / "o"), "--clip-model", str(empty), "--device", "cpu",
                     "--cache-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"imagine: error: CLIP file {empty} is corrupt or not a CLIP model (EOFError); "
                                        "expected OpenAI's CLIP TorchScript archive"), err


def test_one_line_strips_ansi_and_keeps_the_first_line():
    assert cli.one_line("\n\x1b[1mbold\x1b[0m  first\n\tsecond") == "bold first"


def test_ctrl_c_prints_one_line_exits_130_and_says_what_is_left(tiny_model_files, tmp_path):
    out = tmp_path / "o"
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine.cli", "a house", "--out", str(out), "--iterations", "100000",
         "--frame-every", "1", "--grid", "32", "--cutn", "1", *_models(tiny_model_files, tmp_path)],
        stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=tmp_path,
    )
    try:
        err = _interrupted_once(proc, lambda: (out / "frames" / "000001.png").exists())
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("imagine: interrupted;") and "frames in frames/" in err and "no run.json" in err
    assert not (out / "run.json").exists()


def test_ctrl_c_before_the_first_frame_removes_the_parents_it_made_for_out(tiny_model_files, tmp_path, capsys,
                                                                           monkeypatch):
    """`--out runs/2026/cat` under an empty folder: Ctrl-C before a frame said "nothing was written"
    and left runs/2026/ behind (only frames/ and cat/ were removed)."""
    import engine.generate

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine.generate, "generate", interrupted)
    top = tmp_path / "top"
    top.mkdir()
    (tmp_path / "cache").mkdir()
    assert cli.main(["a house", "--out", str(top / "runs" / "2026" / "cat"), "--iterations", "2",
                     *_models(tiny_model_files, tmp_path)]) == 130
    assert capsys.readouterr().err == "imagine: interrupted; nothing was written\n"
    assert list(top.iterdir()) == []


def test_ctrl_c_while_the_models_load_leaves_nothing(tmp_path, capsys, monkeypatch):
    import engine.models

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine.models, "load_models", interrupted)
    assert cli.main(["a house", "--out", str(tmp_path / "o"), "--device", "cpu"]) == 130
    assert capsys.readouterr().err == "imagine: interrupted; nothing was written\n"
    assert not (tmp_path / "o").exists()


# --- a newcomer's first run: the model cache, downloads, the CPU ---------------------------------


def test_a_model_cache_that_cannot_be_made_is_one_line_and_exit_2(tmp_path, capsys):
    """--cache-dir a file (or a HOME the user cannot write): the cache's folders cannot be made. One
    line naming the cache and why, exit 2, nothing written; it was a traceback and exit 1."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = tmp_path / "o"
    code = cli.main(["a house", "--out", str(out), "--device", "cpu", "--cache-dir", str(blocker)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("imagine: error: cannot load the models: Not a directory") and f"the model cache is {blocker}" in err
    assert not out.exists()


@pytest.mark.skipif(not os.path.isfile("/proc/self/mem"), reason="needs Linux's /proc")
def test_a_model_file_that_cannot_be_read_is_named_without_the_caches_hint(tmp_path, capsys):
    """--clip-model names a file the CLI cannot read: the line names it and why, and does not point
    at the model cache (it is not in it). The file: /proc/self/mem, whose first bytes no one can
    read (EIO), root included; a chmod 000 file would stop only a user who is not root."""
    cache = tmp_path / "cache"
    code = cli.main(["a house", "--out", str(tmp_path / "o"), "--device", "cpu", "--cache-dir", str(cache),
                     "--clip-model", "/proc/self/mem"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err == "imagine: error: cannot load the models: Input/output error: '/proc/self/mem'\n"
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_a_cache_that_cannot_be_written_is_one_line_with_the_caches_hint(tiny_model_files, tmp_path, capsys,
                                                                         monkeypatch):
    """The cache's clip/ folder exists but takes no new file (read-only; here /proc's, which refuses
    root too): one line naming the folder, with the cache's hint, exit 2, before any download."""
    import engine.models
    from tests.test_models import clip_url, serving

    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "clip").symlink_to("/proc/self")
    requests: list[str] = []
    with serving(tiny_model_files.clip_torchscript.read_bytes(), requests=requests) as base:
        monkeypatch.setitem(engine.models.CLIP_URLS, "ViT-B/32", clip_url(base, tiny_model_files.clip_torchscript))
        code = cli.main(["a house", "--out", str(tmp_path / "o"), "--device", "cpu", "--cache-dir", str(cache)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"imagine: error: cannot load the models: No such file or directory: '{cache / 'clip'}' "
                          f"(the model cache is {cache}: --cache-dir or $IMAGINE_CACHE puts it elsewhere)"), err
    assert requests == [] and not (tmp_path / "o").exists()


@pytest.mark.parametrize("filename, hinted", [
    ("/home/u/.cache/imagine-bot/clip/.part-x", True),   # in the cache
    ("/home/u/.cache/imagine-bot", True),                # the cache itself
    ("/home/u/.cache", True),                            # above it: making the cache makes it (HOME not writable)
    ("/home/u/models/decoder.pkl", False),               # a file the person named
    ("/home/u/.cache/imagine-bot-old/x", False),         # a neighbour whose name starts alike
    (None, False),
])
def test_the_caches_hint_is_for_the_caches_files(filename, hinted):
    from pathlib import Path

    assert cli._in_cache(filename, Path("/home/u/.cache/imagine-bot")) is hinted


def test_a_first_run_says_what_it_downloads_before_the_download(tiny_model_files, tmp_path, capsys, monkeypatch):
    """The CLI's log level is WARNING, and a first run downloads ~400 MB: the download's INFO line
    (engine.models.download) is shown on stderr anyway, once, as an `imagine:` line. (The decoder
    named is missing, so the run stops after CLIP's download.)"""
    import engine.models
    from tests.test_models import clip_url, serving

    f = tiny_model_files
    cache = tmp_path / "cache"
    with serving(f.clip_torchscript.read_bytes()) as base:
        url = clip_url(base, f.clip_torchscript)
        monkeypatch.setitem(engine.models.CLIP_URLS, "ViT-B/32", url)
        code = cli.main(["a house", "--out", str(tmp_path / "o"), "--device", "cpu", "--cache-dir", str(cache),
                         "--decoder", str(tmp_path / "nope.pkl")])
    err = capsys.readouterr().err.strip().splitlines()
    size = f"{f.clip_torchscript.stat().st_size / 1e6:.1f} MB"
    assert code == 2 and len(err) == 2, err
    assert err[0] == f"imagine: downloading ViT-B-32.pt ({size}) from {url} to {cache / 'clip' / 'ViT-B-32.pt'}"
    assert "nope.pkl" in err[1]


def test_at_log_level_info_the_download_is_the_logs_line_alone(tiny_model_files, tmp_path, capsys, caplog,
                                                               monkeypatch):
    """--log-level INFO: the log shows the download's line; no second `imagine:` copy of it."""
    import logging

    import engine.models
    from tests.test_models import clip_url, serving

    # What main()'s logging.basicConfig does outside pytest (under it, the root logger has
    # pytest's handlers already, and basicConfig leaves it alone).
    caplog.set_level(logging.INFO)
    f = tiny_model_files
    with serving(f.clip_torchscript.read_bytes()) as base:
        monkeypatch.setitem(engine.models.CLIP_URLS, "ViT-B/32", clip_url(base, f.clip_torchscript))
        code = cli.main(["a house", "--out", str(tmp_path / "o"), "--device", "cpu", "--log-level", "INFO",
                         "--cache-dir", str(tmp_path / "cache"), "--decoder", str(tmp_path / "nope.pkl")])
    assert code == 2
    assert "imagine: downloading" not in capsys.readouterr().err
    assert [r.getMessage() for r in caplog.records if r.name == "engine.models.download"] == [
        f"downloading ViT-B-32.pt ({f.clip_torchscript.stat().st_size / 1e6:.1f} MB) from "
        f"{clip_url(base, f.clip_torchscript)} to {tmp_path / 'cache' / 'clip' / 'ViT-B-32.pt'}"]


@pytest.mark.parametrize("args, note", [
    ([], "imagine: note: no CUDA device, so this runs on the CPU: hours at the default preset "
         "(try --preset draft, or a GPU)"),
    (["--preset", "draft"], "imagine: note: no CUDA device, so this runs on the CPU"),
    (["--device", "cpu"], None),   # asked for: nothing to say
])
def test_falling_back_to_the_cpu_is_said(args, note, tmp_path):
    """No --device and no CUDA (CUDA_VISIBLE_DEVICES="" hides any GPU): one note before the models
    load (`--clip-model` names no file, so the run stops there)."""
    proc = subprocess.run(
        [sys.executable, "-m", "engine.cli", "a house", "--out", str(tmp_path / "o"),
         "--clip-model", str(tmp_path / "nope.pt"), *args],
        capture_output=True, text=True, timeout=240, cwd=tmp_path, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "nope.pt" in err[-1], proc.stderr
    assert err[:-1] == ([note] if note else []), proc.stderr


def test_a_torchscript_file_as_the_decoder_is_one_line_without_torchs_warnings(tiny_model_files, tmp_path, capsys):
    """torch.load hands a TorchScript file (a CLIP .pt given as --decoder) to torch.jit.load with a
    UserWarning and a FutureWarning (four lines on stderr before the error)."""
    import warnings

    f = tiny_model_files
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = cli.main(["a house", "--out", str(tmp_path / "o"), "--clip-model", str(f.clip_torchscript),
                         "--decoder", str(f.clip_torchscript), "--trust-decoder", "--device", "cpu",
                         "--cache-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "not a dall_e Decoder" in err
    assert [str(w.message) for w in caught] == []


# --- after the render: the files written last, the video, and what is left when they fail ---------


def _ffmpeg_wrapper(tmp_path, body: str) -> str:
    """A folder holding an `ffmpeg` that runs the real one as `body` says ($REAL, "$@"): a PATH entry."""
    import shutil

    import imageio_ffmpeg

    real = shutil.which("ffmpeg") or imageio_ffmpeg.get_ffmpeg_exe()
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "ffmpeg").write_text(f"#!/bin/sh\nREAL='{real}'\n{body}\n")
    (folder / "ffmpeg").chmod(0o755)
    return f"{folder}:{os.environ['PATH']}"


def test_ctrl_c_during_the_video_encode_leaves_no_cut_short_video(tiny_model_files, tmp_path):
    """The real ffmpeg, told to read its input at the video's own pace (-re: 4 s at --fps 1), so that
    Ctrl-C comes while the video file is begun. Left: what the line names (the frames, final.png,
    state.pt), and no video under any name (a cut-short mp4 has no index and does not play); it was
    a video.mp4 the line did not mention."""
    out = tmp_path / "o"
    env = {**os.environ, "PATH": _ffmpeg_wrapper(tmp_path, 'exec "$REAL" -re "$@"')}
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine.cli", "a house", "--out", str(out), "--iterations", "2", "--frame-every", "1",
         "--grid", "32", "--cutn", "1", "--fps", "1", *_models(tiny_model_files, tmp_path)],
        stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=tmp_path, env=env,
    )
    try:
        err = _interrupted_once(proc, lambda: out.is_dir() and any(name.startswith("video") for name in os.listdir(out)))
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"imagine: interrupted; {out} holds an unfinished run (3 frames in frames/, final.png, "
                          "state.pt; no run.json)"), err
    assert sorted(os.listdir(out)) == ["final.png", "frames", "state.pt"]
    assert sorted(os.listdir(out / "frames")) == ["000000.png", "000001.png", "000002.png"]


def test_an_ffmpeg_that_fails_after_the_render_is_one_line_saying_what_is_left(tiny_model_files, tmp_path, capsys,
                                                                              monkeypatch):
    """The real ffmpeg with a file-size limit (`ulimit -f 1`: its writes fail, as on a full disk).
    One line (not a traceback), exit 1, naming what is there: the frames, final.png and state.pt;
    no video, no run.json. Before, ffmpeg 5 exited 0 on the failed write and the run "succeeded"
    with a cut-short video.mp4."""
    monkeypatch.setenv("PATH", _ffmpeg_wrapper(tmp_path, "trap '' XFSZ\nulimit -f 1\nexec \"$REAL\" \"$@\""))
    out = tmp_path / "o"
    code = cli.main(["a house", "--out", str(out), "--iterations", "2", "--frame-every", "1", "--grid", "32",
                     "--cutn", "1", *_models(tiny_model_files, tmp_path)])
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("imagine: error: cannot make video.mp4: ffmpeg failed (1):") and "File too large" in err, err
    assert f"; {out} holds an unfinished run (3 frames in frames/, final.png, state.pt; no run.json)" in err, err
    assert sorted(os.listdir(out)) == ["final.png", "frames", "state.pt"]


def test_a_file_that_cannot_be_written_after_the_render_is_one_line_and_no_cut_short_file(tiny_model_files,
                                                                                           tmp_path):
    """state.pt (about 50 MB here) past the process's file-size limit (RLIMIT_FSIZE 30 MB, above what
    loading the models writes; Python ignores SIGXFSZ, so the write fails with EFBIG, as a full disk
    fails with ENOSPC): one line, exit 1, naming what is left; no state.pt cut short at 30 MB under
    its name. It was a traceback, and that state.pt."""
    import resource

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (30 << 20, 30 << 20))

    out = tmp_path / "o"
    proc = subprocess.run(
        [sys.executable, "-m", "engine.cli", "a house", "--out", str(out), "--iterations", "1", "--grid", "32",
         "--cutn", "1", *_models(tiny_model_files, tmp_path)],
        capture_output=True, text=True, timeout=240, cwd=tmp_path, preexec_fn=limit,
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr == (f"imagine: error: cannot write state.pt: File too large; {out} holds an unfinished run "
                           "(2 frames in frames/, final.png; no run.json): delete it, or pass another --out, to run "
                           "again\n"), proc.stderr
    assert sorted(os.listdir(out)) == ["final.png", "frames"]


def _decoded(path, size: int):
    """The video's frames, decoded by the real ffmpeg: [N, size, size, 3] uint8."""
    import numpy as np

    from engine import video

    raw = subprocess.run([video.ffmpeg_binary(), "-v", "error", "-i", str(path), "-f", "rawvideo", "-pix_fmt",
                          "rgb24", "-"], check=True, capture_output=True).stdout
    return np.frombuffer(raw, np.uint8).reshape(-1, size, size, 3)


def test_the_video_is_encoded_from_the_frame_files_without_holding_them(tiny_model_files, tmp_path):
    """The video is made from frames/*.png, read one at a time: its memory does not grow with its
    frame count. --fps 240 holds the last frame 240 frames (1 s): run under tracemalloc, its peak is
    that of --fps 1 (it was 40 MB more: every frame stacked, then copied to bytes). The video has
    every frame written, and the last held; its first and last frames are the PNGs (up to H.264's
    loss)."""
    import tracemalloc

    import numpy as np

    from tests.test_video import probe

    peaks = {}
    for fps in (1, 240):
        out = tmp_path / f"fps{fps}"
        tracemalloc.start()
        try:
            assert cli.main(["a house", "--out", str(out), "--iterations", "2", "--frame-every", "1", "--grid",
                             "32", "--cutn", "1", "--fps", str(fps), *_models(tiny_model_files, tmp_path)]) == 0
            peaks[fps] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert peaks[240] - peaks[1] < 8 << 20, peaks
    out = tmp_path / "fps240"
    pngs = sorted((out / "frames").iterdir())
    assert len(pngs) == 3 and int(probe(out / "video.mp4")["streams"][0]["nb_read_frames"]) == 3 + 240
    decoded = _decoded(out / "video.mp4", 256)
    for frame, png in ((decoded[0], pngs[0]), (decoded[-1], pngs[-1])):
        error = np.abs(frame.astype(int) - np.asarray(Image.open(png).convert("RGB"), dtype=int)).mean()
        assert error < 4, (png.name, error)
