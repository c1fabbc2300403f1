"""Frames -> an mp4 that plays inline in browsers and Discord (H.264, yuv420p, +faststart).

ffmpeg comes from PATH, else from imageio-ffmpeg's bundled binary.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np


class VideoError(RuntimeError):
    pass


class VideoInterrupted(VideoError):
    """ffmpeg was killed by a signal (a supervisor such as systemd signals every process of the
    service when it stops it): nothing was wrong with the encode, which is worth one more try."""


# ffmpeg never waits on a person: a hung encode would hold a worker's batch slot (its lease kept
# alive by heartbeats) or a bot's send loop forever. The longest honest encode here (1000 frames
# of 512x512) takes seconds; five minutes means something is wrong.
FFMPEG_TIMEOUT = 300.0


# Encodes write under the system's temp directory in folders of this prefix. A process killed
# mid-encode (SIGKILL) never removes its folder, and ffmpeg, in a session of its own, finishes
# writing into it: `sweep_temp` (a worker's start) removes those left for longer than any encode.
TEMP_PREFIX = "imagine-video-"


def sweep_temp(older_than: float = 2 * FFMPEG_TIMEOUT + 600) -> int:
    """Remove the encode folders (TEMP_PREFIX) in the temp directory not touched for `older_than`
    seconds (longer than an encode may run, so no live one is removed). Returns how many; never
    raises (another process may sweep the same folder)."""
    removed = 0
    cutoff = time.time() - older_than
    try:
        entries = list(Path(tempfile.gettempdir()).glob(TEMP_PREFIX + "*"))
    except OSError:
        return 0
    for entry in entries:
        try:
            if entry.is_dir() and not entry.is_symlink() and entry.stat().st_mtime < cutoff:
                shutil.rmtree(entry)
                removed += 1
        except OSError:
            continue
    return removed


def ffmpeg_binary() -> str:
    found = shutil.which("ffmpeg")
    if found:
        return found
    try:
        import imageio_ffmpeg

        return imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError) as exc:   # no bundled binary for this platform, say
        raise VideoError(f"no ffmpeg: none on PATH, and imageio-ffmpeg has none ({exc})") from None


def _ffmpeg(args: list[str], data: bytes | None, timeout: float) -> None:
    """Run ffmpeg on `args` (reading `data` on stdin if given); VideoError if it fails or runs
    past `timeout` seconds. Without `data` stdin is /dev/null and `-nostdin` is set: ffmpeg reads
    the terminal for keys otherwise, and a bot started in the background would be stopped (SIGTTIN)."""
    head = [ffmpeg_binary(), "-hide_banner", "-loglevel", "error", "-y"] + ([] if data is not None else ["-nostdin"])
    try:
        # Its own session: a Ctrl-C in the terminal (or a signal to the worker's process group) is
        # the worker's to handle, and must not kill the encode of a job that is finishing.
        proc = subprocess.run([*head, *args], input=data, capture_output=True, timeout=timeout,
                              start_new_session=True,
                              **({} if data is not None else {"stdin": subprocess.DEVNULL}))
    except subprocess.TimeoutExpired:
        raise VideoError(f"ffmpeg ran past {timeout:g} s and was stopped") from None
    if proc.returncode < 0:   # killed by a signal (a supervisor stopping every process): try again
        raise VideoInterrupted(f"ffmpeg was stopped by signal {-proc.returncode}")
    if proc.returncode != 0:
        raise VideoError(f"ffmpeg failed ({proc.returncode}): {proc.stderr.decode(errors='replace')[-2000:]}")


def encode_frames(
    frames: Sequence[np.ndarray], out: Path, fps: float = 10.0, hold_last_seconds: float = 1.0,
    crf: int = 20, max_side: int | None = None, timeout: float = FFMPEG_TIMEOUT,
) -> Path:
    """Write frames ([H, W, 3] uint8, all the same size) as an mp4; the last frame is held
    `hold_last_seconds` longer. Returns `out`."""
    if not frames:
        raise VideoError("no frames to encode")
    h, w, _ = frames[0].shape
    hold = max(0, round(hold_last_seconds * fps))
    sequence = list(frames) + [frames[-1]] * hold
    scale = []
    if max_side and max(h, w) > max_side:
        side = max(2, max_side - max_side % 2)   # yuv420p needs even sides: -2 evens the other one
        scale = ["-vf", f"scale={side}:-2:flags=lanczos" if w >= h else f"scale=-2:{side}:flags=lanczos"]
    elif h % 2 or w % 2:  # yuv420p needs even sides
        scale = ["-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2"]
    raw = np.ascontiguousarray(np.stack(sequence)).tobytes()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _ffmpeg(["-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-r", str(fps), "-i", "-",
             *scale, "-c:v", "libx264", "-preset", "medium", "-crf", str(crf), "-pix_fmt", "yuv420p",
             "-movflags", "+faststart", str(out)], raw, timeout)
    return out


def encode_frames_bytes(frames: Sequence[np.ndarray], **kwargs) -> bytes:
    with tempfile.TemporaryDirectory(prefix=TEMP_PREFIX) as tmp:
        path = encode_frames(frames, Path(tmp) / "video.mp4", **kwargs)
        return path.read_bytes()


def reencode_to_fit(data: bytes, max_bytes: int, timeout: float = FFMPEG_TIMEOUT) -> bytes | None:
    """A smaller encode of an mp4 that fits in `max_bytes`, or None if none does.

    Tries a higher CRF, then half the size; a video that already fits is returned as it is.
    """
    if len(data) <= max_bytes:
        return data
    with tempfile.TemporaryDirectory(prefix=TEMP_PREFIX) as tmp:
        src = Path(tmp) / "in.mp4"
        src.write_bytes(data)
        # Widths rounded down to even (yuv420p): half of a 266-wide video is 133, which fails.
        for i, (crf, scale) in enumerate([(30, None), (36, "trunc(iw/4)*2"), (42, "trunc(iw/8)*2")]):
            dst = Path(tmp) / f"out{i}.mp4"
            vf = ["-vf", f"scale={scale}:-2"] if scale else []
            _ffmpeg(["-i", str(src), *vf, "-c:v", "libx264", "-preset", "medium", "-crf", str(crf),
                     "-pix_fmt", "yuv420p", "-movflags", "+faststart", "-an", str(dst)], None, timeout)
            if dst.stat().st_size <= max_bytes:
                return dst.read_bytes()
    return None
