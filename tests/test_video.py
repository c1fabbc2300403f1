"""engine.video: a real ffmpeg writes an mp4 that ffprobe reads as H.264 yuv420p."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time

import numpy as np
import pytest

from engine import video


def probe(path) -> dict:
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-count_frames", "-show_streams", "-show_format", "-of", "json", str(path)],
        check=True, capture_output=True, text=True,
    ).stdout
    return json.loads(out)


def frames(n: int, size: int = 64) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def test_mp4_is_h264_yuv420p_with_the_last_frame_held_a_second(tmp_path):
    out = video.encode_frames(frames(21), tmp_path / "v.mp4", fps=10, hold_last_seconds=1.0)
    info = probe(out)
    stream = info["streams"][0]
    assert stream["codec_name"] == "h264" and stream["pix_fmt"] == "yuv420p"
    assert int(stream["nb_read_frames"]) == 21 + 10
    assert abs(float(info["format"]["duration"]) - 3.1) < 0.05
    head = out.read_bytes()[:200]
    assert head.index(b"moov") < head.index(b"mdat") if b"mdat" in head else b"moov" in head  # +faststart


def test_reencode_to_fit_shrinks_or_gives_up(tmp_path):
    data = video.encode_frames_bytes(frames(30, 256), fps=10, crf=10)
    assert video.reencode_to_fit(data, len(data)) == data
    smaller = video.reencode_to_fit(data, len(data) // 3)
    assert smaller is not None and len(smaller) <= len(data) // 3
    (tmp_path / "s.mp4").write_bytes(smaller)
    assert probe(tmp_path / "s.mp4")["streams"][0]["codec_name"] == "h264"
    assert video.reencode_to_fit(data, 100) is None


def test_ffmpeg_falls_back_to_imageio_ffmpeg(monkeypatch):
    monkeypatch.setattr(video.shutil, "which", lambda name: None)
    import imageio_ffmpeg

    assert video.ffmpeg_binary() == imageio_ffmpeg.get_ffmpeg_exe()
    assert video.encode_frames_bytes(frames(2))[:64].find(b"ftyp") > 0


def test_no_ffmpeg_anywhere_is_a_video_error(monkeypatch):
    """No ffmpeg on PATH and none bundled (imageio-ffmpeg ships none for some platforms, and then
    raises RuntimeError): a VideoError, which the worker takes as "no video", not a failed job.
    The missing bundle cannot be made here, so its error is raised in its place."""
    import imageio_ffmpeg

    def no_bundle():
        raise RuntimeError("No ffmpeg exe could be found. Install ffmpeg on your system.")
    monkeypatch.setattr(video.shutil, "which", lambda name: None)
    monkeypatch.setattr(imageio_ffmpeg, "get_ffmpeg_exe", no_bundle)
    with pytest.raises(video.VideoError, match="no ffmpeg: none on PATH"):
        video.encode_frames_bytes(frames(2))


def test_an_encode_past_its_time_is_stopped_with_a_clear_error(tmp_path):
    # A real ffmpeg given no time at all: stopped, VideoError (a hung encode must not hold a
    # worker's slot or the bot's send loop forever), and nothing half-written is returned.
    with pytest.raises(video.VideoError, match="ran past"):
        video.encode_frames(frames(200, 256), tmp_path / "v.mp4", timeout=0.001)
    data = video.encode_frames_bytes(frames(30, 256), fps=10, crf=10)
    with pytest.raises(video.VideoError, match="ran past"):
        video.reencode_to_fit(data, len(data) // 3, timeout=0.001)



def test_odd_halves_and_an_odd_max_side_still_encode(tmp_path):
    """yuv420p needs even sides: a 266-wide video's half is 133 and its quarter 66.5, and a
    max_side of 33 would give 33. Each is rounded to an even width instead of failing."""
    wide = [np.random.default_rng(i).integers(0, 256, (60, 266, 3), dtype=np.uint8) for i in range(12)]
    data = video.encode_frames_bytes(wide, fps=10, crf=10)
    assert video.reencode_to_fit(data, 100) is None   # every size tried (none fits), none failed
    out = video.encode_frames(frames(5), tmp_path / "s.mp4", max_side=33)
    stream = probe(out)["streams"][0]
    assert (stream["width"], stream["height"]) == (32, 32)


def test_ffmpeg_runs_in_its_own_session(tmp_path, monkeypatch):
    """A Ctrl-C in the terminal signals the whole foreground process group: ffmpeg, in a session
    of its own, is left to finish the encode the worker is waiting for."""
    import imageio_ffmpeg

    real = shutil.which("ffmpeg") or imageio_ffmpeg.get_ffmpeg_exe()
    wrapper = tmp_path / "bin"
    wrapper.mkdir()
    seen = tmp_path / "session"
    # Field 6 of /proc/PID/stat: the process's session id.
    (wrapper / "ffmpeg").write_text(f"#!/bin/sh\ncut -d' ' -f6 /proc/$$/stat > '{seen}'\nexec '{real}' \"$@\"\n")
    (wrapper / "ffmpeg").chmod(0o755)
    monkeypatch.setenv("PATH", f"{wrapper}:{os.environ['PATH']}")
    assert video.encode_frames_bytes(frames(3))[4:8] == b"ftyp"
    session = int(seen.read_text())
    assert session != os.getsid(0)


def test_an_ffmpeg_killed_by_a_signal_is_told_apart_from_a_failing_one(tmp_path, monkeypatch):
    wrapper = tmp_path / "bin"
    wrapper.mkdir()
    (wrapper / "ffmpeg").write_text("#!/bin/sh\nkill -TERM $$\nsleep 5\n")
    (wrapper / "ffmpeg").chmod(0o755)
    monkeypatch.setenv("PATH", f"{wrapper}:{os.environ['PATH']}")
    with pytest.raises(video.VideoInterrupted, match="stopped by signal 15"):
        video.encode_frames_bytes(frames(2))


def test_encode_folders_left_by_a_killed_process_are_swept_and_live_ones_kept(tmp_path, monkeypatch):
    """A worker killed mid-encode leaves its temp folder (ffmpeg finishes writing into it): the
    next worker's start sweeps those older than any encode runs, never a live one."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    old = tmp_path / f"{video.TEMP_PREFIX}left"
    old.mkdir()
    (old / "video.mp4").write_bytes(b"x" * 1000)
    past = time.time() - 3 * video.FFMPEG_TIMEOUT - 600
    os.utime(old, (past, past))
    live = tmp_path / f"{video.TEMP_PREFIX}live"
    live.mkdir()
    other = tmp_path / "someone-elses"
    other.mkdir()
    os.utime(other, (past, past))
    assert video.sweep_temp() == 1
    assert not old.exists() and live.exists() and other.exists()
    assert video.encode_frames_bytes(frames(2))[4:8] == b"ftyp"   # encodes under the same prefix
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name])


# --- encode_files: the CLI's video, from the frame files on disk ---------------------------------


def _real_ffmpeg() -> str:
    import imageio_ffmpeg

    return shutil.which("ffmpeg") or imageio_ffmpeg.get_ffmpeg_exe()


def _png_files(pixels: list[np.ndarray], folder) -> list:
    from PIL import Image

    folder.mkdir(exist_ok=True)
    paths = []
    for i, frame in enumerate(pixels):
        paths.append(folder / f"{i:06d}.png")
        Image.fromarray(frame).save(paths[-1])
    return paths


def test_encode_files_reads_one_frame_at_a_time_into_the_same_video_as_encode_frames(tmp_path):
    """The CLI's frames are on disk already: read one at a time into ffmpeg, the encode's memory does
    not grow with their count (60 frames of 256x256 are 11.8 MB, twice over in encode_frames' stacked
    copy and its bytes), and the video is byte for byte the one encode_frames makes of the same pixels."""
    import tracemalloc

    pixels = frames(60, 256)
    paths = _png_files(pixels, tmp_path / "frames")
    tracemalloc.start()
    try:
        out = video.encode_files(paths, tmp_path / "v.mp4", fps=10, hold_last_seconds=1.0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * pixels[0].nbytes, peak   # a few frames' worth, not 70
    assert out == tmp_path / "v.mp4" and sorted(os.listdir(tmp_path)) == ["frames", "v.mp4"]
    assert out.read_bytes() == video.encode_frames(pixels, tmp_path / "w.mp4", fps=10).read_bytes()
    assert int(probe(out)["streams"][0]["nb_read_frames"]) == 60 + 10


def test_an_encode_from_files_that_fails_leaves_no_file_under_its_name(tmp_path):
    """The video is written beside its name and renamed when whole: an encode stopped part-way (past
    its time here) or refused (a frame missing, damaged, or of another size) leaves nothing, neither
    at `out` nor beside it."""
    pixels = frames(40, 256)
    paths = _png_files(pixels, tmp_path / "frames")
    with pytest.raises(video.VideoError, match="ran past"):
        video.encode_files(paths, tmp_path / "v.mp4", timeout=0.001)
    (tmp_path / "frames" / "000020.png").write_bytes(b"not a png")
    with pytest.raises(video.VideoError, match="000020.png"):
        video.encode_files(paths, tmp_path / "v.mp4")
    _png_files([np.zeros((32, 32, 3), np.uint8)], tmp_path / "small")
    with pytest.raises(video.VideoError, match="32x32, not 256x256"):
        video.encode_files([paths[0], tmp_path / "small" / "000000.png"], tmp_path / "v.mp4")
    with pytest.raises(video.VideoError, match="no frames"):
        video.encode_files([], tmp_path / "v.mp4")
    assert sorted(os.listdir(tmp_path)) == ["frames", "small"]


def test_an_ffmpeg_that_cannot_write_its_output_is_a_video_error(tmp_path, monkeypatch):
    """The real ffmpeg under a file-size limit of 512 bytes (`ulimit -f 1`; SIGXFSZ ignored, so a
    write fails with EFBIG, as on a full disk). ffmpeg 5 prints "Error writing trailer" and exits 0
    with a cut-short file unless told -xerror (when, as here, the whole video fits in its write
    buffer until the end): that file is not a video."""
    wrapper = tmp_path / "bin"
    wrapper.mkdir()
    (wrapper / "ffmpeg").write_text(f"#!/bin/sh\ntrap '' XFSZ\nulimit -f 1\nexec '{_real_ffmpeg()}' \"$@\"\n")
    (wrapper / "ffmpeg").chmod(0o755)
    monkeypatch.setenv("PATH", f"{wrapper}:{os.environ['PATH']}")
    pixels = frames(20)
    with pytest.raises(video.VideoError, match="ffmpeg failed"):
        video.encode_frames(pixels, tmp_path / "a.mp4")
    paths = _png_files(pixels, tmp_path / "frames")
    with pytest.raises(video.VideoError, match="File too large"):
        video.encode_files(paths, tmp_path / "b.mp4")
    assert not (tmp_path / "b.mp4").exists() and not (tmp_path / "b.partial.mp4").exists()


def test_an_encode_from_files_says_ffmpegs_reason_without_a_usable_temp_directory(tmp_path, monkeypatch):
    """On a full disk the temp directory is full too: what ffmpeg says is kept in memory, not in a
    temp file, so its reason reaches the error (here the temp directory is missing, and ffmpeg
    refuses a frame rate). Before: its stderr went to a temp file, and the reason was lost (or the
    encode failed on the temp file itself)."""
    paths = _png_files(frames(3), tmp_path / "frames")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "gone"))
    with pytest.raises(video.VideoError, match="Unable to parse option value"):
        video.encode_files(paths, tmp_path / "v.mp4", fps=-1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frames"]
    assert video.encode_files(paths, tmp_path / "v.mp4", timeout=None).stat().st_size > 0   # no limit: no timer
