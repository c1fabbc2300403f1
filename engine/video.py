"""Frames -> an mp4 that plays inline in browsers and Discord (H.264, yuv420p, +faststart):
from pixels in memory (`encode_frames`), or from picture files read one at a time (`encode_files`).

ffmpeg comes from PATH, else from imageio-ffmpeg's bundled binary.
"""

from __future__ import annotations

import collections
import contextlib
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterable, Iterator, Sequence

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


def encode_frames(
    frames: Sequence[np.ndarray], out: Path, fps: float = 10.0, hold_last_seconds: float = 1.0,
    crf: int = 20, max_side: int | None = None, timeout: float = FFMPEG_TIMEOUT,
) -> Path:
    """Write frames ([H, W, 3] uint8, all the same size) as an mp4; the last frame is held
    `hold_last_seconds` longer. Returns `out`."""
    if not frames:
        raise VideoError("no frames to encode")
    h, w, _ = frames[0].shape
    sequence = list(frames) + [frames[-1]] * _hold(hold_last_seconds, fps)
    raw = np.ascontiguousarray(np.stack(sequence)).tobytes()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _ffmpeg(_encode_args(w, h, fps, crf, max_side, out), (raw,), timeout)
    return out


def encode_files(
    paths: Sequence[Path], out: Path, fps: float = 10.0, hold_last_seconds: float = 1.0,
    crf: int = 20, max_side: int | None = None, timeout: float | None = FFMPEG_TIMEOUT,
) -> Path:
    """As `encode_frames`, from picture files (the CLI's frames/NNNNNN.png, all the same size),
    read and handed to ffmpeg one at a time: memory does not grow with their count. The same pixels
    make the same video, byte for byte.

    `out` is whole or absent: ffmpeg writes `<stem>.partial<suffix>` beside it, renamed to `out`
    when done, and removed when the encode fails or is interrupted (Ctrl-C: ffmpeg is stopped
    first). A frame that cannot be read, or of another size, is a VideoError. `timeout` None: no
    limit (the CLI's, where a person can Ctrl-C: 100,001 frames take minutes). Returns `out`."""
    paths = list(paths)
    if not paths:
        raise VideoError("no frames to encode")
    out = Path(out)
    (w, h), first = _rgb_file(paths[0])

    def chunks() -> Iterator[bytes]:
        last = first
        yield first
        for path in paths[1:]:
            size, last = _rgb_file(path)
            if size != (w, h):
                raise VideoError(f"frame {path} is {size[0]}x{size[1]}, not {w}x{h} as {paths[0].name}")
            yield last
        for _ in range(_hold(hold_last_seconds, fps)):
            yield last

    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f"{out.stem}.partial{out.suffix}")
    try:
        _ffmpeg(_encode_args(w, h, fps, crf, max_side, partial), chunks(), timeout)
        os.replace(partial, out)
    except BaseException:
        with contextlib.suppress(OSError):
            partial.unlink()
        raise
    return out


def _hold(hold_last_seconds: float, fps: float) -> int:
    return max(0, round(hold_last_seconds * fps))


def _encode_args(w: int, h: int, fps: float, crf: int, max_side: int | None, out: Path) -> list[str]:
    """ffmpeg's arguments for rgb24 frames of w x h on stdin -> an H.264 mp4 at `out`."""
    scale = []
    if max_side and max(h, w) > max_side:
        side = max(2, max_side - max_side % 2)   # yuv420p needs even sides: -2 evens the other one
        scale = ["-vf", f"scale={side}:-2:flags=lanczos" if w >= h else f"scale=-2:{side}:flags=lanczos"]
    elif h % 2 or w % 2:  # yuv420p needs even sides
        scale = ["-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2"]
    # -xerror: a failed write (a full disk) is an exit status. Without it ffmpeg 5 prints "Error
    # writing trailer" and exits 0 when the failed write is the last one (a short video's only
    # one), leaving a cut-short file that does not play.
    return ["-xerror", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-r", str(fps), "-i", "-",
            *scale, "-c:v", "libx264", "-preset", "medium", "-crf", str(crf), "-pix_fmt", "yuv420p",
            "-movflags", "+faststart", str(out)]


def _rgb_file(path: Path) -> tuple[tuple[int, int], bytes]:
    """A picture file's (width, height) and its rgb24 bytes; VideoError if it cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
        return rgb.size, rgb.tobytes()
    except (OSError, ValueError, SyntaxError) as exc:   # missing, unreadable, damaged
        raise VideoError(f"cannot read frame {path}: {exc}") from None


def _ffmpeg(args: list[str], chunks: Iterable[bytes] | None, timeout: float | None) -> None:
    """Run ffmpeg on `args`, its stdin fed from `chunks` as they come (a frame at a time); VideoError
    if it fails or runs past `timeout` seconds (None: no limit). An exception on the way (a chunk
    that cannot be made, Ctrl-C) stops ffmpeg before it goes on. `chunks` None: stdin is /dev/null
    and `-nostdin` is set (ffmpeg reads the terminal for keys otherwise, and a bot started in the
    background would be stopped: SIGTTIN)."""
    expired = threading.Event()
    said: collections.deque[bytes] = collections.deque(maxlen=64)   # the end of what ffmpeg says
    proc: subprocess.Popen | None = None
    timer: threading.Timer | None = None
    reader: threading.Thread | None = None
    try:
        head = [ffmpeg_binary(), "-hide_banner", "-loglevel", "error", "-y"] + (["-nostdin"] if chunks is None else [])
        # Its own session: a Ctrl-C in the terminal (or a signal to the worker's process group) is
        # the worker's to handle, and must not kill the encode of a job that is finishing.
        proc = subprocess.Popen([*head, *args], stdin=subprocess.DEVNULL if chunks is None else subprocess.PIPE,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        # stderr drained by a thread into memory (not a file: on a full disk the temp directory is
        # full too, and the reason would be lost), so an ffmpeg with much to say never blocks on it.
        reader = threading.Thread(target=lambda: said.extend(iter(lambda: proc.stderr.read1(4096), b"")),
                                  daemon=True)
        reader.start()
        if timeout is not None:
            def expire() -> None:
                expired.set()
                proc.kill()   # a blocked write then fails with BrokenPipeError

            timer = threading.Timer(timeout, expire)
            timer.daemon = True
            timer.start()
        try:
            for chunk in chunks or ():
                proc.stdin.write(chunk)
            if proc.stdin is not None:
                proc.stdin.close()
        except BrokenPipeError:
            pass   # ffmpeg stopped reading (it failed, or was stopped): its status says why
        proc.wait()
    except BaseException:
        if proc is not None:
            proc.kill()
            proc.wait()
        raise
    finally:
        if timer is not None:
            timer.cancel()
        if proc is not None and proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        if reader is not None:
            reader.join(timeout=5)
        if proc is not None:
            with contextlib.suppress(OSError):
                proc.stderr.close()
    if proc.returncode == 0:
        return
    if expired.is_set():
        raise VideoError(f"ffmpeg ran past {timeout:g} s and was stopped")
    if proc.returncode < 0:   # killed by a signal (a supervisor stopping every process): try again
        raise VideoInterrupted(f"ffmpeg was stopped by signal {-proc.returncode}")
    tail = b"".join(said)[-2000:].decode(errors="replace")
    raise VideoError(f"ffmpeg failed ({proc.returncode}): {tail}")


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
        # -xerror (as _encode_args): a failed write (a full temp disk) fails, not a cut-short file
        # small enough to pass the size check.
        for i, (crf, scale) in enumerate([(30, None), (36, "trunc(iw/4)*2"), (42, "trunc(iw/8)*2")]):
            dst = Path(tmp) / f"out{i}.mp4"
            vf = ["-vf", f"scale={scale}:-2"] if scale else []
            _ffmpeg(["-xerror", "-i", str(src), *vf, "-c:v", "libx264", "-preset", "medium", "-crf", str(crf),
                     "-pix_fmt", "yuv420p", "-movflags", "+faststart", "-an", str(dst)], None, timeout)
            if dst.stat().st_size <= max_bytes:
                return dst.read_bytes()
    return None
