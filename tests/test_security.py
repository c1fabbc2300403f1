"""Security audit fixes (against 2a703c4): model trust (M1), checkpoint frames and contact-sheet
finals from the shared store (M2), attachment decoding memory (L1), tokens in DEBUG logs (L2),
links in echoed prompts (L4). Each test fails on the code before its fix."""

from __future__ import annotations

import asyncio
import hashlib
import http.server
import io
import logging
import os
import pickle
import re
import shutil
import subprocess
import sys
import threading
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from engine import models as m
from tests.test_bot_support import harness  # noqa: F401 - the fixture

ROOT = Path(__file__).resolve().parents[1]


class _Evil:
    """A pickle that, unpickled, creates the file `marker` (what a planted model file would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _evil_pickle(marker: Path) -> bytes:
    return pickle.dumps(_Evil(marker))


# --- M1: a dVAE pickle is trusted only by the operator or its own download ------------------------


def test_a_pickle_planted_in_the_cache_with_its_hash_file_is_not_unpickled(tmp_path):
    """Whoever can write the cache can write decoder.pkl and the decoder.pkl.sha256 that earlier
    versions trusted: neither makes a pickle trusted now (the audit's repro, part 1)."""
    marker = tmp_path / "pwned"
    cache = tmp_path / "cache"
    (cache / "dvae").mkdir(parents=True)
    evil = _evil_pickle(marker)
    (cache / "dvae" / "decoder.pkl").write_bytes(evil)
    (cache / "dvae" / "decoder.pkl.sha256").write_text(hashlib.sha256(evil).hexdigest() + "\n")
    with pytest.raises(m.UntrustedPickleError) as err:
        m.load_dvae("decoder", "openai", cache_dir=cache)
    assert not marker.exists()
    text = str(err.value)
    assert "decoder.pkl.sha256" in text and "not trusted" in text
    assert text.endswith("If you trust this file, pass --trust-decoder.")


def test_the_bytes_unpickled_are_the_bytes_whose_hash_was_checked(tiny_model_files, tmp_path, monkeypatch):
    """A file trusted by its SHA-256 (known_sha256) and replaced by another writer after the check:
    the loader reads the file once, so the replacement is never unpickled (repro, part 2)."""
    marker = tmp_path / "pwned"
    good = tmp_path / "decoder.pkl"
    shutil.copy(tiny_model_files.decoder_pickle, good)
    good_sha = m.sha256_of(good)
    real_load = torch.load

    def swap_then_load(f, *args, **kwargs):
        good.write_bytes(_evil_pickle(marker))   # the other writer wins the race right before the load
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", swap_then_load)
    decoder = m.load_dvae("decoder", str(good), cache_dir=tmp_path / "c1", known_sha256={good_sha})
    assert isinstance(decoder, m.Decoder) and not marker.exists()

    # Swapped between the look-up of its safetensors copy and the read: the new bytes are hashed.
    monkeypatch.setattr(torch, "load", real_load)
    shutil.copy(tiny_model_files.decoder_pickle, good)
    real_sha = m.sha256_of

    def racing_sha(path):
        digest = real_sha(path)
        if Path(path) == good:
            good.write_bytes(_evil_pickle(marker))
        return digest

    monkeypatch.setattr(m, "sha256_of", racing_sha)
    with pytest.raises(m.UntrustedPickleError):
        m.load_dvae("decoder", str(good), cache_dir=tmp_path / "c2", known_sha256={good_sha})
    assert not marker.exists()


def test_a_clip_file_is_loaded_from_the_bytes_checked_against_its_url(tiny_model_files, tmp_path, monkeypatch):
    data = tiny_model_files.clip_torchscript.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    monkeypatch.setitem(m.CLIP_URLS, "Tiny/1", f"https://example.invalid/clip/{sha}/Tiny-1.pt")
    target = tmp_path / "clip" / "Tiny-1.pt"
    target.parent.mkdir()
    target.write_bytes(data)
    real_jit_load = torch.jit.load

    def swap_then_load(f, *args, **kwargs):
        target.write_bytes(b"swapped after the hash check")
        return real_jit_load(f, *args, **kwargs)

    monkeypatch.setattr(torch.jit, "load", swap_then_load)
    clip = m.load_clip("Tiny/1", cache_dir=tmp_path)
    reference = m.load_clip(str(tiny_model_files.clip_torchscript), trust=True)
    assert all(torch.equal(a, b) for a, b in zip(clip.state_dict().values(), reference.state_dict().values()))
    with pytest.raises(m.ModelLoadError, match="SHA-256"):   # the swapped file is refused next time
        m.load_clip("Tiny/1", cache_dir=tmp_path)


def test_without_memfd_the_models_load_from_a_copy_in_memory(tiny_model_files, tmp_path, monkeypatch):
    """Where os.memfd_create is missing (not Linux), the one copy is a BytesIO of the bytes read."""
    monkeypatch.delattr(os, "memfd_create", raising=False)
    with m._private_copy(tiny_model_files.decoder_pickle) as (digest, source):
        assert isinstance(source, io.BytesIO) and digest == m.sha256_of(tiny_model_files.decoder_pickle)
    decoder = m.load_dvae("decoder", str(tiny_model_files.decoder_pickle), cache_dir=tmp_path, trust=True)
    assert isinstance(decoder, m.Decoder)
    for clip_file in (tiny_model_files.clip_torchscript, tiny_model_files.clip_state_dict):
        assert m.load_clip(str(clip_file), trust=True).visual.input_resolution > 0


class _Serve:
    """Serves `body` at any path on 127.0.0.1."""

    def __init__(self, body: bytes) -> None:
        body_ = body

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Length", str(len(body_)))
                self.end_headers()
                self.wfile.write(body_)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/decoder.pkl"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_download_is_converted_before_it_is_put_in_the_cache_and_no_hash_file_is_written(
        tiny_model_files, tmp_path, monkeypatch):
    served = _Serve(tiny_model_files.decoder_pickle.read_bytes())
    try:
        monkeypatch.setitem(m.DVAE_URLS, "decoder", served.url)
        first = m.load_dvae("decoder", "openai", cache_dir=tmp_path)
    finally:
        served.close()
    sha = m.sha256_of(tiny_model_files.decoder_pickle)
    files = sorted(p.name for p in (tmp_path / "dvae").iterdir())
    assert files == sorted(["decoder.pkl", m.safe_cache_path(tmp_path, "decoder", sha).name]), files
    # Later starts read the safetensors copy: nothing is unpickled, nothing needs trust.
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("the pickle was unpickled again"))
    second = m.load_dvae("decoder", "openai", cache_dir=tmp_path)
    codes = torch.nn.functional.one_hot(torch.randint(8192, (1, 2, 2)), 8192).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        assert torch.equal(first(codes), second(codes))


def test_a_download_that_is_not_a_decoder_leaves_nothing_in_the_cache(tmp_path, monkeypatch):
    buf = io.BytesIO()
    torch.save(torch.nn.Linear(2, 2), buf)
    served = _Serve(buf.getvalue())
    try:
        monkeypatch.setitem(m.DVAE_URLS, "decoder", served.url)
        with pytest.raises(m.ModelLoadError, match="not a dall_e Decoder"):
            m.load_dvae("decoder", "openai", cache_dir=tmp_path)
    finally:
        served.close()
    assert list((tmp_path / "dvae").iterdir()) == []


# --- M2: checkpoint frames and contact-sheet finals are checked before they are decoded -----------


def _png(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **({"compress_level": options.pop("level", 1)} if fmt == "PNG" else {}), **options)
    return buf.getvalue()


def _spec(**kw):
    from engine.jobs import JobSpec

    return JobSpec(prompt="a red house", user_id=1, channel_id=10, grid=kw.pop("grid", 4),
                   iterations=kw.pop("iterations", 6), frame_every=kw.pop("frame_every", 2),
                   cutn=1, seed=1, **kw)


@pytest.fixture
def pixel_loads(monkeypatch):
    """The sizes of the pictures whose pixels Pillow decoded."""
    loaded: list[tuple[int, int]] = []
    real = ImageFile.ImageFile.load

    def load(self):
        loaded.append(self.size)
        return real(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    return loaded


def test_a_checkpoints_frames_must_be_pngs_of_the_jobs_size(pixel_loads):
    from engine.worker import DamagedCheckpoint, _unpack_with_pixels, pack_checkpoint

    state = {"iteration": 2, "logits": torch.zeros(1, 2, 4, 4)}
    good = _png(Image.new("RGB", (32, 32), "red"))           # grid 4: 32 x 32
    st, pngs, pixels = _unpack_with_pixels(pack_checkpoint(state, [good, good]), _spec())
    assert len(pixels) == 2 and pixels[0].shape == (32, 32, 3) and pngs == [good, good]

    bomb = _png(Image.new("L", (12000, 12000)), level=9)    # ~140 KiB, 144 megapixels
    tga = _png(Image.new("RGB", (32, 32)), "TGA")
    cases = [
        ([good, bomb], "frame 2 of 2 is a 12000x12000 L PNG, not a 32x32 RGB frame"),
        ([tga, good], "frame 1 of 2 is not a PNG"),
        ([_png(Image.new("RGB", (64, 64)))], "64x64 RGB PNG, not a 32x32"),
        ([_png(Image.new("RGBA", (32, 32)))], "32x32 RGBA PNG"),
        ([good[:60]], "frame 1 of 1 is"),
        ([good] * 8, "holds 8 frames; a job of 6 iterations with a frame every 2 has at most 7"),
    ]
    for frames, reason in cases:
        pixel_loads.clear()
        with pytest.raises(DamagedCheckpoint) as err:
            _unpack_with_pixels(pack_checkpoint(state, frames), _spec())
        assert reason in str(err.value), str(err.value)
        assert all(size == (32, 32) for size in pixel_loads), pixel_loads   # the bomb never decoded


@pytest.mark.parametrize("blob", [[1, 2], {"state": {"iteration": 2}}, {"state": [1], "frames": []},
                                  {"state": {"iteration": 2}, "frames": [1, 2]}],
                         ids=["a-list", "no-frames", "a-list-state", "frames-no-tensors"])
def test_a_checkpoint_that_unpickles_but_is_no_checkpoint_is_damaged(blob):
    """A checkpoint in the shared store that unpickles (weights_only) but is not what a worker
    writes: DamagedCheckpoint (the job starts over), not a TypeError or KeyError that fails the
    attempt on every worker until the job fails for good."""
    from engine.generate import state_to_bytes
    from engine.worker import DamagedCheckpoint, _unpack_with_pixels

    with pytest.raises(DamagedCheckpoint, match="not a state and its frames"):
        _unpack_with_pixels(state_to_bytes(blob), _spec())


async def test_a_job_whose_checkpoint_has_a_bad_frame_starts_over(tmp_path, tiny_models, caplog):
    """Every worker would find the same bad frame: the job is run again from the start (its
    picture is not lost) instead of failing on each attempt, and the log says why."""
    from engine.jobs import Checkpoint, JobState
    from engine.queue.sqlite import SQLiteJobQueue
    from engine.worker import Worker, pack_checkpoint

    caplog.set_level(logging.WARNING, logger="engine.worker")
    q = SQLiteJobQueue(tmp_path / "q.db", max_attempts=1)
    await q.start()
    try:
        job = await q.submit(_spec())
        bomb = _png(Image.new("L", (12000, 12000)), level=9)
        await q.save_checkpoint(Checkpoint(job.id, 2, pack_checkpoint({"iteration": 2}, [bomb])))
        async with Worker(q, lambda: tiny_models, worker_id="w", heartbeat_every=0.2):
            for _ in range(600):
                record = await q.get(job.id)
                if record.state in (JobState.DONE, JobState.FAILED):
                    break
                await asyncio.sleep(0.05)
        assert record.state == JobState.DONE, record
        assert record.attempts == 1   # the first attempt started over: no retry was spent
        assert any(f"job {job.id}: its checkpoint is damaged (the checkpoint's frame 1 of 1 is a 12000x12000"
                   in r.getMessage() and "starting it over" in r.getMessage() for r in caplog.records)
        assert await q.get_artifact(job.id, "final.png") is not None
    finally:
        await q.close()


def test_a_contact_sheet_leaves_a_final_that_is_no_small_png_empty(pixel_loads):
    from bot import contact_sheet as cs

    good = _png(Image.new("RGB", (64, 64), (200, 10, 10)))
    tiles = [(good, "good"), (_png(Image.new("L", (12000, 12000)), level=9), "bomb"),
             (_png(Image.new("RGB", (64, 64)), "TGA"), "tga"), (b"\x89PNG garbage", "junk")]
    data, name = cs.render_sheet(tiles)
    assert name == cs.FILENAME
    assert (12000, 12000) not in pixel_loads
    sheet = Image.open(io.BytesIO(data))
    spec = cs.layout(4, cs.MIN_TILE)            # the tile size comes from the readable finals only
    assert sheet.size == spec.size
    left, top, right, bottom = spec.boxes[0]
    assert sheet.getpixel((left + 5, top + 5)) == (200, 10, 10)
    for box in spec.boxes[1:]:
        assert sheet.getpixel((box[0] + 5, box[1] + 5)) == cs.BACKGROUND


# --- L1: attachments are decoded without float64 copies, reduced before converting -----------------


def _reference(data: bytes, side: int = 1024) -> Image.Image:
    """What load_image + a thumbnail to `side` gave before the fix (full-size float64 / RGBA work)."""
    image = Image.open(io.BytesIO(data))
    image.load()
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or pixels.max() > 255 else 255.0
        image = Image.fromarray((pixels / top * 255).clip(0, 255).astype(np.uint8)).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    image = image.convert("RGB")
    image.thumbnail((side, side))
    return image


def _smooth(width: int, height: int, channels: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 64 + 2, width // 64 + 2, channels), dtype=np.uint8)
    return np.asarray(Image.fromarray(small.squeeze()).resize((width, height), Image.Resampling.BICUBIC))


def test_large_attachments_give_the_same_picture_after_the_thumbnail():
    """The reduction before converting is the one the caller's thumbnail makes: the same picture.
    At a quarter of the real scale (max_side 256 instead of 1024: the same rules, 1/16 the pixels)."""
    from engine.images import load_image

    rng = np.random.default_rng(3)

    def noise(h: int, w: int, c: int = 3) -> Image.Image:   # the hardest case for any sampling difference
        return Image.fromarray(rng.integers(0, 256, (h, w, c), dtype=np.uint8).squeeze())

    pngs = {
        "rgb": (noise(1024, 1024), (512, 512)),
        "rgb, 3x": (noise(1536, 1536), (512, 512)),
        "rgb, wide": (noise(525, 1024), (1024, 525)),           # short side under 2 x 256: kept
        "rgb, 1536 x 1026": (noise(1026, 1536), (1536, 1026)),  # thumbnail factor 3, short side for 2
        "rgb, odd size": (noise(1025, 1027), (1027, 1025)),     # a remainder: kept
        "rgba": (noise(1024, 1024, 4), (512, 512)),
        "rgba, tall": (noise(1024, 751, 4), (751, 1024)),
        "paletted with transparency": (noise(1024, 1024).quantize(64), (512, 512)),
        "16-bit": (Image.fromarray(rng.integers(0, 65536, (1024, 1024), dtype=np.uint16)), (512, 512)),
        "gray": (noise(1024, 1024, 1), (512, 512)),
    }
    for name, (picture, size) in pngs.items():
        data = _png(picture, **({"transparency": 3} if picture.mode == "P" else {}))
        image, _ = load_image(data, max_side=256)
        assert image.size == size, (name, image.size)
        image.thumbnail((256, 256))
        expected = _reference(data, 256)
        assert image.mode == "RGB" and image.size == expected.size, name
        diff = np.abs(np.asarray(image, dtype=int) - np.asarray(expected, dtype=int))
        assert diff.max() <= 1, (name, diff.max())
    # At the real scale (the default max_side, 1024): a 4096-square picture is reduced to 2048, and
    # a JPEG is decoded at that scale (DCT scaling, as Image.thumbnail's draft): the same picture
    # to within a few levels.
    jpeg = _png(Image.fromarray(_smooth(4096, 4096, 3)), "JPEG")
    image, _ = load_image(jpeg)
    assert image.size == (2048, 2048)
    image.thumbnail((1024, 1024))
    diff = np.abs(np.asarray(image, dtype=int) - np.asarray(_reference(jpeg), dtype=int))
    assert diff.mean() < 1 and diff.max() <= 4, (diff.mean(), diff.max())
    # Small pictures are not touched.
    small = noise(300, 500)
    assert np.array_equal(np.asarray(load_image(_png(small))[0]), np.asarray(small))


def test_a_16_bit_attachment_is_converted_without_float64_copies():
    from engine.images import load_image

    arr = np.zeros((4096, 4096), dtype=np.uint16)
    arr[0, 0] = 65535
    data = _png(Image.fromarray(arr))
    tracemalloc.start()
    try:
        image, notes = load_image(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "converted to 8-bit" in notes[0] and image.mode == "RGB"
    assert peak < 80 * 2**20, f"{peak / 2**20:.0f} MiB of Python/numpy memory"   # was 384+ MiB


# VmHWM, the peak RSS of this process's memory: ru_maxrss would start at the parent's (pytest's)
# RSS, which Linux carries across fork and exec.
PEAK_SCRIPT = r"""
import sys
from engine.images import load_image

def peak_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) // 1024

data = open(sys.argv[1], "rb").read()
before = peak_mib()
image, _ = load_image(data)
image.thumbnail((1024, 1024))
print(peak_mib() - before)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmHWM from /proc")
@pytest.mark.parametrize("kind, most_mib", [("rgba", 180), ("16", 180), ("jpeg", 70)])
def test_decoding_a_4096_square_attachment_stays_small(kind, most_mib, tmp_path):
    """Peak memory growth of load_image + the bot's thumbnail in a fresh process that does nothing
    else. Before: RGBA 259 MiB, 16-bit 439 MiB, JPEG 131 MiB; now 130, 118 and 31."""
    if kind == "rgba":
        data = _png(Image.new("RGBA", (4096, 4096)))
    elif kind == "16":
        pixels = np.zeros((4096, 4096), dtype=np.uint16)
        pixels[0, 0] = 65535
        data = _png(Image.fromarray(pixels))
    else:
        data = _png(Image.new("RGB", (4096, 4096), "red"), "JPEG")
    (tmp_path / "picture").write_bytes(data)
    proc = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(tmp_path / "picture")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    grew = int(proc.stdout.split()[-1])
    assert grew <= most_mib, f"{kind}: the peak grew {grew} MiB"


# --- L2: no interaction, webhook or bot token in the logs, DEBUG included ---------------------------


def test_the_redactor_masks_tokens_in_messages_payloads_and_tracebacks():
    from bot.redact import RedactingHandler, Redactor

    bot_token = "MTA4NjE.fake.abcdefghijklmnopqrstuvwxyz0123"
    stream = io.StringIO()
    handler = RedactingHandler(Redactor([bot_token]), stream)
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    logger = logging.getLogger("tests.security.redact")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    itoken = "aW50ZXJhY3Rpb246MTIzNDU2Nzg5OmFiY2RlZg_-x"
    try:
        logger.debug("POST https://discord.com/api/v10/interactions/123/%s/callback with %s has returned 204",
                     itoken, {"type": 5})
        logger.debug("Webhook ID 42 with PATCH https://discord.com/api/v10/webhooks/42/%s/messages/@original?wait=true",
                     itoken)
        logger.debug("For Shard ID 0: WebSocket Event: %s", {"t": "INTERACTION_CREATE", "d": {"id": "1", "token": itoken}})
        logger.debug('{"op": 2, "d": {"token": "%s"}} Bot %s', bot_token, bot_token)
        logger.debug("a real-shaped bot token: MTIzNDU2Nzg5MDEyMzQ1Njc4.GaBcDe.abcdefghijklmnopqrstuvwxyz0123456")
        try:
            raise RuntimeError(f"403 at https://discord.com/api/v10/webhooks/42/{itoken}")
        except RuntimeError:
            logger.exception("posting failed")
    finally:
        logger.removeHandler(handler)
    out = stream.getvalue()
    assert itoken not in out and bot_token not in out and "GaBcDe" not in out, out
    assert "/interactions/123/***/callback" in out and "/webhooks/42/***/messages/@original?wait=true" in out
    assert "'token': '***'" in out and '"token": "***"' in out
    assert "RuntimeError: 403 at https://discord.com/api/v10/webhooks/42/***" in out
    assert "INTERACTION_CREATE" in out and "{'type': 5}" in out   # the rest of each line is kept


def test_the_redactor_masks_bot_token_shapes_but_not_long_dotted_names():
    """A bot token not configured here (another bot's, a rotated one) is masked by its shape: the
    base64 of a 17-20 digit user id, a 6-character timestamp, a 27+ character HMAC. Long dotted
    names (a module path, a process name) are not of that alphabet and stay as they are."""
    import base64

    from bot.redact import MASK, Redactor

    redactor = Redactor()
    for user_id in ("41771983423143937", "123456789012345678", "1234567890123456789", "98765432109876543210"):
        first = base64.urlsafe_b64encode(user_id.encode()).decode().rstrip("=")
        token = f"{first}.GaBcDe.abcdefghijklmnopqrstuvwxyz0123456_-AB"
        assert redactor.redact(f"Bot {token} failed") == f"Bot {MASK} failed", user_id
    for name in ("imagine_bot_worker_process_name.something_else.and_a_long_tail_segment_here",
                 "MyVeryLongModuleNameHere1.abcdef.some_long_tail_segment_here_for_sure",
                 "engine.queue.sqlite.SqliteQueue.submit_many_with_a_long_name_that_goes_on"):
        assert redactor.redact(f"in {name}: ok") == f"in {name}: ok"


async def test_debug_logs_of_a_real_bot_against_the_fake_discord_carry_no_token(harness):
    """The bot's own logging setup at DEBUG (bot.__main__ calls it), discord.py's real loggers: the
    gateway's INTERACTION_CREATE and the webhook requests are logged, their tokens are not."""
    from bot.redact import setup_logging

    h = harness
    root = logging.getLogger()
    level = root.level
    stream = io.StringIO()
    handler = setup_logging(logging.DEBUG, secrets=[h.fd.bot_token], stream=stream)
    try:
        await h.start(worker=False)
        inter = await h.fd.send_slash_command("imagine", {"prompt": "a secret prompt"})
        await h.reply_of(inter)
        await asyncio.sleep(0.2)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    out = stream.getvalue()
    assert "INTERACTION_CREATE" in out                       # DEBUG is still useful
    assert re.search(r"/webhooks/\d+/\*\*\*", out) or re.search(r"/interactions/\d+/\*\*\*", out)
    assert inter.token not in out
    assert h.fd.bot_token not in out


# --- L4: links in echoed prompts are defanged ------------------------------------------------------


def test_echoed_prompts_show_links_as_text_not_links_or_invites():
    from bot import render

    prompt = "a cat at https://evil.example/a_*b* join discord.gg/abc or DISCORD.COM/invite/xyz"
    text = render.escape_prompt(prompt)
    assert "https\\://evil.example/a\\_\\*b\\*" in text
    assert "discord.gg\\/abc" in text and "DISCORD.COM/invite\\/xyz" in text
    for shown in (text, render.snippet(prompt, 300)):
        assert not re.search(r"[A-Za-z]://", shown) and not re.search(r"(?i)discord\.gg/|/invite/", shown)
    # What Discord displays (every backslash escape dropped) is the prompt as typed.
    assert re.sub(r"\\(.)", r"\1", text) == prompt


def test_a_failure_reason_quoting_a_link_is_defanged():
    from bot import render
    from engine.jobs import JobRecord, JobState

    # A reason of the input (the worker stores a PromptError's message as it is) is shown, defanged.
    record = JobRecord(id="abc123def456", spec=_spec(), state=JobState.FAILED,
                       error="the part 'see https://evil.example:x' ends in ':x', which is not a weight")
    text = render.final_text(record)
    assert "https\\://evil.example" in text and "https://evil" not in text
    # A worker's exception is not shown at all (render.failure_reason), its links with it.
    record.error = "OSError: cannot reach https://evil.example/x"
    assert "evil" not in render.final_text(record)


async def test_a_public_reply_echoes_a_link_in_the_prompt_as_text(harness):
    h = harness
    await h.start(worker=False)
    inter = await h.imagine("a cat at https://evil.example/x and discord.gg/abc")
    msg = await h.reply_of(inter)
    assert "https\\://evil.example/x" in msg.content and "discord.gg\\/abc" in msg.content
    assert "https://evil" not in msg.content and "discord.gg/abc" not in msg.content


async def test_a_new_sqlite_queue_and_its_wal_are_readable_by_their_owner_only(tmp_path):
    """The queue file holds every prompt (private channels' too), user and channel ids and uploaded
    pictures: with the usual umask 022 it and its -wal / -shm were created 0644, readable by every
    local user. A new one is 0600; an existing file keeps the mode its operator gave it."""
    from engine.jobs import JobSpec
    from engine.queue.sqlite import SQLiteJobQueue

    old_umask = os.umask(0o022)
    try:
        queue = SQLiteJobQueue(tmp_path / "jobs.db")
        await queue.start()
        try:
            await queue.submit(JobSpec(prompt="a private lighthouse", user_id=7, channel_id=1))
            files = sorted(tmp_path.glob("jobs.db*"))
            assert {f.name for f in files} >= {"jobs.db", "jobs.db-wal", "jobs.db-shm"}
            assert {f.name: oct(f.stat().st_mode & 0o777) for f in files} == {f.name: "0o600" for f in files}
        finally:
            await queue.close()
        shared = tmp_path / "shared.db"
        shared.touch(mode=0o640)
        queue = SQLiteJobQueue(shared)
        await queue.start()
        await queue.close()
        assert oct(shared.stat().st_mode & 0o777) == "0o640"
    finally:
        os.umask(old_umask)


def test_a_torchscript_clip_file_nobody_pinned_is_not_loaded_and_runs_no_code(tiny_model_files, monkeypatch):
    """A CLIP file given by path that is a TorchScript archive (OpenAI's format) runs the code it
    holds as it loads (its classes' __setstate__; with torchvision's ops that code can write
    files). One whose SHA-256 is neither OpenAI's nor in --known-sha256 is refused unless trusted,
    before torch.jit.load ever sees it; a plain state dict loads without trust (weights_only).
    Before: any path was loaded with torch.jit.load."""
    import hashlib

    import torch

    real_jit_load, jit_loads = torch.jit.load, []

    def watched_jit_load(f, *args, **kwargs):
        jit_loads.append(f)
        return real_jit_load(f, *args, **kwargs)

    monkeypatch.setattr(torch.jit, "load", watched_jit_load)
    with pytest.raises(m.UntrustedPickleError, match="TorchScript archive .*pass --trust-decoder"):
        m.load_clip(str(tiny_model_files.clip_torchscript))
    assert jit_loads == []   # refused before any of its code could run
    assert m.load_clip(str(tiny_model_files.clip_state_dict)).visual.input_resolution > 0
    assert jit_loads == []
    digest = hashlib.sha256(tiny_model_files.clip_torchscript.read_bytes()).hexdigest()
    assert m.load_clip(str(tiny_model_files.clip_torchscript), known_sha256={digest}).visual.input_resolution > 0
    assert m.load_clip(str(tiny_model_files.clip_torchscript), trust=True).visual.input_resolution > 0
    assert len(jit_loads) == 2
