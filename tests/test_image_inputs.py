"""Issue 8, engine side: image prompts, init images, remix from a run, weighted parts, safe image loading."""

from __future__ import annotations

import io
import json
import sys
import subprocess
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from engine.generate import GenerationSettings, PromptPart, decode, generate, to_uint8
from engine.image_prompts import init_logits_from_image, to_tensor
from engine.images import ImageRejected, load_image
from engine.jobs import JobState
from engine import cli

FAST = GenerationSettings(iterations=60, frame_every=30, grid=8, cutn=8, seed=3)


def png(image: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=kw.pop("format", "PNG"), **kw)
    return buf.getvalue()


def noise_image(side=64, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))


def test_an_image_prompt_raises_the_similarity_to_that_image(tiny_models):
    """A tiny random CLIP finds all pictures alike (cosine ~0.99, near its ceiling), so the effect is
    compared with a control run (same seed, the image's weight 0): toward the image with it, away
    without it. Frames show argmax codes, so one frame's similarity jitters by a few 1e-3 around
    the trend (which frame is last varies with the CPU's float rounding): the run is judged on its
    best frame and on its frames' mean, not on its last frame alone."""
    target = to_tensor(noise_image(seed=5))
    s = replace(FAST, lr=0.05, frame_every=10)
    pulled = generate([PromptPart("a picture", 0.01)], s, tiny_models, image_targets=[(target, 1.0, "image")])
    control = generate([PromptPart("a picture", 1.0)], s, tiny_models, image_targets=[(target, 0.0, "image")])
    with_image = [f.similarities[1] for f in pulled.frames]
    without = [f.similarities[1] for f in control.frames]
    assert max(with_image[1:]) > with_image[0], with_image
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    assert mean(with_image[1:]) > mean(without[1:]) + 0.01, (with_image, without)
    assert min(with_image[1:]) > max(without[2:]), (with_image, without)   # apart at every frame after the first steps


def test_a_negative_part_falls_while_the_positive_part_rises(tiny_models):
    result = generate([PromptPart("a red house", 1.0), PromptPart("a blue ocean", -1.0)],
                      replace(FAST, lr=0.05), tiny_models)
    first, last = result.frames[0].similarities, result.frames[-1].similarities
    assert last[0] > first[0] and last[1] < first[1], (first, last)


def test_an_init_image_gives_frame_0_equal_to_its_dvae_reconstruction(tiny_models):
    """Frame 0 decodes the encoder's codes of the picture, so it is the dVAE reconstruction: the only
    difference allowed is the rounding to 8 bits (at most 1 level). The tiny encoder is random, so
    the reconstruction does not look like the input; with OpenAI's weights it does."""
    picture = noise_image(seed=9)
    logits = init_logits_from_image(tiny_models, picture, grid=8)
    assert logits.shape == (1, 8192, 8, 8) and torch.equal(logits.sum(1), torch.ones(1, 8, 8))
    with torch.no_grad():
        pixels = torch.from_numpy(np.asarray(picture.resize((64, 64)), dtype=np.float32) / 255).permute(2, 0, 1)[None]
        from dall_e import map_pixels
        codes = tiny_models.encoder(map_pixels(pixels)).argmax(1)
        reconstruction = to_uint8(decode(tiny_models, F.one_hot(codes, 8192).permute(0, 3, 1, 2).float())[0])
    frame0 = generate("a cat", replace(FAST, iterations=1), tiny_models, init_logits=logits).frames[0]
    assert np.abs(frame0.pixels.astype(int) - reconstruction.astype(int)).max() <= 1


def test_cli_remix_from_a_run_starts_at_the_parents_final_frame(tiny_model_files, tmp_path):
    f = tiny_model_files
    common = ["--iterations", "2", "--frame-every", "2", "--grid", "32", "--cutn", "2",
              "--clip-model", str(f.clip_torchscript), "--decoder", str(f.decoder_pickle), "--trust-decoder",
              "--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--no-progress"]
    assert cli.main(["a house", "--out", str(tmp_path / "a"), "--seed", "1", *common]) == 0
    picture = tmp_path / "p.png"
    picture.write_bytes(png(noise_image(96, seed=2)))
    assert cli.main(["a boat", "--out", str(tmp_path / "b"), "--from-run", str(tmp_path / "a"),
                     "--image-prompt", f"{picture}:0.5", *common]) == 0
    parent_final = (tmp_path / "a" / "final.png").read_bytes()
    assert (tmp_path / "b" / "frames" / "000000.png").read_bytes() == parent_final
    run = json.loads((tmp_path / "b" / "run.json").read_text())
    assert run["from_run"] == str(tmp_path / "a") and run["image_prompts"] == [{"file": "p.png", "weight": 0.5}]
    assert len(run["frames"][0]["similarities"]) == 2


def test_cli_init_image_uses_the_encoder(tiny_model_files, tmp_path, capsys):
    f = tiny_model_files
    picture = tmp_path / "p.png"
    picture.write_bytes(png(noise_image(300, seed=4)))
    code = cli.main(["a cat", "--out", str(tmp_path / "o"), "--init-image", str(picture), "--encoder", str(f.encoder_pickle),
                     "--iterations", "1", "--grid", "32", "--cutn", "2", "--clip-model", str(f.clip_torchscript),
                     "--decoder", str(f.decoder_pickle), "--trust-decoder", "--cache-dir", str(tmp_path / "c"),
                     "--device", "cpu", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "o" / "frames" / "000000.png").is_file()


def test_cli_refuses_a_bad_init_image_with_exit_2(tmp_path, capsys):
    bad = tmp_path / "notes.txt"
    bad.write_text("not a picture")
    assert cli.main(["a cat", "--out", str(tmp_path / "o"), "--init-image", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "not an image" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("args, message", [
    # A folder is not "no such file"; an empty path is not the working directory (a --from-run ''
    # read ./state.pt).
    (["--init-image", "{tmp}"], "imagine: error: --init-image {tmp}: is a folder, not an image file\n"),
    (["--image-prompt", "{tmp}:0.5"], "imagine: error: --image-prompt {tmp}: is a folder, not an image file\n"),
    (["--init-image", ""], "argument --init-image: --init-image must name an image file, not an empty string\n"),
    (["--from-run", ""], "argument --from-run: --from-run must name a folder, not an empty string\n"),
    (["--image-prompt", ""], "imagine: error: --image-prompt '': name an image file (PATH or PATH:WEIGHT)\n"),
])
def test_cli_says_what_is_wrong_with_an_image_path_that_names_no_image_file(args, message, tmp_path, capsys):
    args = [a.format(tmp=tmp_path) for a in args]
    try:
        code = cli.main(["a cat", "--out", str(tmp_path / "o"), *args])
    except SystemExit as exit_:   # refused by the parser (its usage line first)
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err
    assert err.endswith(message.format(tmp=tmp_path)) and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


# --- untrusted pictures ------------------------------------------------------------------------

@pytest.mark.parametrize("size", [(3000, 1000), (1000, 3000), (1500, 1400), (600, 300)])
def test_an_upload_keeps_the_centre_square_the_worker_uses_at_up_to_1024(size):
    """The bot stores the centre square the worker's to_tensor crops, then shrinks it to 1024 a side:
    a 3000x1000 upload used to be shrunk to 1024x341 first, a 341 px square upscaled to 512."""
    from bot import attachments

    width, height = size
    rng = np.random.default_rng(5)
    side = min(width, height)
    small = rng.integers(0, 256, (side // 16, side // 16, 3), dtype=np.uint8)
    square = Image.fromarray(small).resize((side, side), Image.Resampling.BICUBIC)
    picture = Image.new("RGB", size, (255, 0, 255))   # magenta outside the centre square
    picture.paste(square, ((width - side) // 2, (height - side) // 2))
    stored = attachments.check(png(picture), "image", 8 * 2**20)
    image = Image.open(io.BytesIO(stored.png))
    assert image.size == (min(side, attachments.STORE_SIDE),) * 2
    # What the worker makes of it (load_image, to_tensor's centre crop and resize): the same region
    # as it took from the picture itself, at the full detail of the init image's 512.
    worker, _ = load_image(stored.png)
    got, want = to_tensor(worker, 512), to_tensor(picture, 512)
    assert (got - want).abs().mean() < 0.01, (got - want).abs().mean()


def test_a_plain_image_loads_as_rgb():
    image, notes = load_image(png(noise_image(32)))
    assert image.mode == "RGB" and image.size == (32, 32) and notes == []


def test_not_an_image_is_refused():
    with pytest.raises(ImageRejected, match="not an image"):
        load_image(b"%PDF-1.4 definitely not a picture")


def test_a_12_mib_file_is_refused_before_decoding():
    with pytest.raises(ImageRejected, match="12.0 MiB"):
        load_image(b"\x89PNG" + b"\0" * (12 * 2**20))


def test_a_pixel_bomb_is_refused_from_its_header():
    bomb = png(Image.new("1", (20000, 20000)))  # ~50 KB on disk, 400 megapixels decoded
    assert len(bomb) < 200_000
    with pytest.raises(ImageRejected, match="too large|20000x20000"):
        load_image(bomb)


def test_an_animation_uses_its_first_frame_and_says_so():
    frames = [Image.new("RGB", (16, 16), c) for c in ("red", "blue", "green")]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    image, notes = load_image(buf.getvalue())
    assert image.getpixel((0, 0)) == (255, 0, 0) or image.getpixel((0, 0))[0] > 200
    assert "animated (3 frames)" in notes[0]


def test_a_16_bit_image_is_converted_and_says_so():
    deep = Image.fromarray(np.full((8, 8), 65535 // 2, dtype=np.uint16))
    image, notes = load_image(png(deep))
    assert image.mode == "RGB" and abs(image.getpixel((0, 0))[0] - 127) <= 1
    assert "converted to 8-bit" in notes[0]


def test_only_png_jpeg_webp_and_gif_are_decoded(monkeypatch):
    """Pillow opens dozens of formats; EPS runs Ghostscript on the file. Untrusted bytes go only to
    the decoders of the formats we ask for."""
    from PIL import EpsImagePlugin

    ran = []

    def ghostscript(*args, **kwargs):
        ran.append(args)
        raise OSError("Ghostscript ran on the upload")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", ghostscript)
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    others = [png(noise_image(8), format=f) for f in ("BMP", "TIFF", "TGA", "ICO", "PPM")]
    for data in [eps, *others]:
        with pytest.raises(ImageRejected, match="PNG, JPEG, WebP or GIF"):
            load_image(data)
    assert ran == []
    for fmt in ("PNG", "JPEG", "WEBP", "GIF"):
        assert load_image(png(noise_image(8), format=fmt))[0].size == (8, 8)


def test_a_jpeg_of_thousands_of_scans_is_refused_before_it_is_decoded():
    """The audit's scan bomb: one 33-byte refinement scan repeated, which libjpeg applies to every
    block each time (at 4096x4096, 5,000 copies took 30 s of CPU). Refused from a count of its
    scans; ordinary progressive JPEGs (libjpeg's script: 6 scans for gray, 10 for colour) load, up
    to MAX_JPEG_SCANS."""
    from engine.images import MAX_JPEG_SCANS
    from tests.bad_pictures import progressive_jpeg

    refusal = f"the JPEG has more than {MAX_JPEG_SCANS} scans .* at most {MAX_JPEG_SCANS} are accepted"
    with pytest.raises(ImageRejected, match=refusal):
        load_image(progressive_jpeg(side=1024, extra_scans=3000))
    ordinary = progressive_jpeg()
    base = ordinary.count(b"\xff\xda")
    assert load_image(ordinary)[0].size == (256, 256)
    colour = png(noise_image(256), format="JPEG", progressive=True)
    assert colour.count(b"\xff\xda") == 10 and load_image(colour)[0].size == (256, 256)
    assert load_image(progressive_jpeg(extra_scans=MAX_JPEG_SCANS - base))[0].size == (256, 256)
    with pytest.raises(ImageRejected, match=refusal):
        load_image(progressive_jpeg(extra_scans=MAX_JPEG_SCANS - base + 1))


def test_a_motion_photo_is_one_scan_whatever_video_follows_it():
    """A phone's motion photo: a baseline JPEG (one scan) and a 7 MB video after its end (EOI),
    holding FF DA ~100 times. libjpeg stops at the EOI; so does the count (it was refused as
    "126 scans")."""
    from engine.images import MAX_JPEG_SCANS, _count_scans
    from tests.bad_pictures import motion_photo

    data = motion_photo()
    assert data.count(b"\xff\xda") > MAX_JPEG_SCANS + 1   # the video's, and the photo's one
    assert _count_scans(data, MAX_JPEG_SCANS) == 1
    image, notes = load_image(data, max_side=None)
    assert image.size == (1200, 900) and notes == []


def test_an_exif_thumbnails_own_scans_are_not_the_pictures():
    """An EXIF thumbnail is a whole JPEG inside the APP1 segment: here a progressive one of 156
    scans, with its own EOI, before the picture's first scan. The segment is skipped by its length,
    as libjpeg skips it: the picture's 10 scans are counted (not 166, nor the 0 before the
    thumbnail's EOI), and the picture loads, turned upright as its EXIF says."""
    from engine.images import MAX_JPEG_SCANS, _count_scans
    from tests.bad_pictures import encode, progressive_jpeg, with_exif_thumbnail

    thumbnail = progressive_jpeg(side=64, extra_scans=150)
    picture = Image.new("RGB", (200, 100), (0, 0, 255))
    picture.paste((255, 0, 0), (0, 0, 100, 100))
    data = with_exif_thumbnail(encode(picture, "JPEG", progressive=True, quality=95), thumbnail, orientation=6)
    assert thumbnail.count(b"\xff\xda") == 156 and data.count(b"\xff\xda") == 166
    assert _count_scans(data, MAX_JPEG_SCANS) == 10
    image, notes = load_image(data)
    assert image.size == (100, 200) and notes == []
    top = image.getpixel((50, 40))
    assert top[0] > 200 and top[2] < 60, top


def test_restart_markers_and_fill_bytes_do_not_hide_scans():
    """Restart markers (FF D0-D7) sit inside a scan's data, and FF fill bytes may precede any
    marker: neither ends the count nor is read as a segment's length (which could skip scans)."""
    from engine.images import MAX_JPEG_SCANS, _count_scans
    from tests.bad_pictures import progressive_jpeg

    restarts = progressive_jpeg(extra_scans=200, restart_marker_blocks=1)
    assert restarts.count(b"\xff\xd0") > 1000
    assert _count_scans(restarts, 1000) == restarts.count(b"\xff\xda") == 206
    filled = restarts.replace(b"\xff\xda", b"\xff\xff\xff\xda")
    assert _count_scans(filled, 1000) == 206
    with pytest.raises(ImageRejected, match=f"more than {MAX_JPEG_SCANS} scans"):
        load_image(filled)


@pytest.mark.parametrize("cut", ["struct.error", "IndexError"])
def test_a_gif_cut_inside_its_next_frame_is_refused_as_damaged(cut):
    """Pillow raises struct.error / IndexError (not OSError) counting such a GIF's frames."""
    from tests.bad_pictures import damaged_gif

    with pytest.raises(ImageRejected, match="the image is damaged or truncated"):
        load_image(damaged_gif(cut))


@pytest.mark.parametrize("cut", ["struct.error", "IndexError"])
def test_cli_refuses_a_damaged_gif_init_image_with_exit_2(cut, tmp_path, capsys):
    from tests.bad_pictures import damaged_gif

    bad = tmp_path / "crash.gif"
    bad.write_bytes(damaged_gif(cut))
    assert cli.main(["a cat", "--out", str(tmp_path / "o"), "--init-image", str(bad)]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if not line.startswith("imagine: note:")]   # the CPU's note
    assert len(lines) == 1, err
    assert lines[0].startswith(f"imagine: error: --init-image {bad}: the image is damaged or truncated ("), err
    assert not (tmp_path / "o").exists()


def test_a_picture_tagged_sideways_is_turned_upright():
    """EXIF Orientation 6 (as phones save a portrait photo): stored 200x100 with its red half on
    the left, shown 100x200 with the red half on top; that is the picture used."""
    from tests.bad_pictures import sideways_jpeg

    image, notes = load_image(sideways_jpeg(6))
    assert image.size == (100, 200) and notes == []
    top, bottom = image.getpixel((50, 40)), image.getpixel((50, 160))
    assert top[0] > 200 and top[2] < 60, top
    assert bottom[2] > 200 and bottom[0] < 60, bottom
    assert load_image(sideways_jpeg(1))[0].size == (200, 100)


def _sixteen_bit_apng() -> bytes:
    frames = [Image.fromarray((np.random.RandomState(i).rand(64, 64) * 65535).astype(np.uint16)) for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, format="PNG", save_all=True, append_images=frames[1:])
    return buf.getvalue()


@pytest.mark.parametrize("state", [JobState.FAILED, JobState.DONE, JobState.CANCELLED, JobState.QUEUED])
def test_every_text_of_a_job_with_every_note_and_a_long_failure_fits_discord(state):
    """The most a job's message can carry: a Reroll of a remix (two lineage lines with links), a
    prompt of 8 weighted parts that CLIP cuts (three notes and a count), a 16-bit animated PNG given
    as both pictures (four notes, from the real attachment check), and a long failure reason. Each
    text stays within 2000 characters and keeps its status, settings, id and author; what is left
    out is said. Before: a failed one was 2107 characters, refused by Discord three times and then
    given up, so the user never learnt that the job failed."""
    from bot import render
    from bot.attachments import check
    from engine.jobs import JobRecord, JobSpec
    from engine.prompts import clip_overflow, parse_prompt

    picture = check(_sixteen_bit_apng(), "image", 8 << 20)
    notes = [f"`{option}`: {note}" for option in ("image", "init_image") for note in picture.notes]
    assert len(notes) == 4
    part = "𓀀" * 20 + "\u200b" * 20
    prompt = " | ".join(f"{part}:{w}" for w in ["0.75", "1.25", "-0.25", "0.333", "2.5", "-0.125", "1.75", "0.6"])
    assert len(prompt) <= 500   # within [imagine] max_prompt_chars
    url = "https://discord.com/channels/123456789012345678/123456789012345678/123456789012345679"
    spec = JobSpec(prompt=prompt, user_id=123456789012345678, channel_id=1, guild_id=1, seed=4294967295,
                   iterations=1000, grid=64, parent_job_id="a" * 12, parent_kind="remix",
                   extra={"clip_notes": clip_overflow(parse_prompt(prompt)), "rerolls": "b" * 12, "source_url": url,
                          "parent": {"prompt": "a_b*" * 15, "user_id": 123456789012345678, "url": url},
                          "image_prompt": {"artifact": ["x", "image.png"], "weight": 0.75},
                          "init_image": {"artifact": ["x", "image.png"]}, "notes": notes})
    # A reason of the input is shown as written (render.failure_reason), up to 300 characters.
    long_reason = "the weight of " + repr("𓀀" * 40) + " must be a number between -100 and 100; " + "x" * 400
    record = JobRecord(id="c" * 12, spec=spec, state=state, error=long_reason if state == JobState.FAILED else None,
                       similarity=0.5 if state == JobState.DONE else None)
    texts = [render.final_text(record, "The video could not be made; here is the final image.")
             if state.finished else render.queued_text(record, 12, "server"),
             render.progress_text(record, 500, 1000, 0.123, 3600.0), render.lost_text(record)]
    for text in texts:
        assert len(text) <= render.CONTENT_LIMIT, len(text)
        assert f"job `{record.id}` · <@{spec.user_id}>" in text and render.settings_line(spec) in text
        assert text.startswith("**") and "…**\n" in text   # the prompt cut, its bold closed
    first = texts[0]
    if state == JobState.FAILED:
        assert "Failed: the weight of '𓀀𓀀" in first and "could not be made" in first
        assert render.NOTES_LEFT_OUT in first
    if state == JobState.DONE:
        assert "Done · similarity 0.500" in first


def test_a_short_prompt_is_kept_whole_and_only_the_notes_that_do_not_fit_are_left_out():
    """A short weighted prompt, a failure of about 1500 characters and six notes of about 200: the
    prompt and its weights stay whole, and only as many notes go as must (the text is then within
    a note's length of the limit). Before: notes and weights were dropped until the prompt had
    room for 200 characters it did not have."""
    from bot import render
    from engine.jobs import JobRecord, JobSpec

    spec = JobSpec(prompt="a red cat:2 | blurry:-1", user_id=123456789012345678, channel_id=1, guild_id=1,
                   seed=1, iterations=1000, grid=64, extra={"notes": [f"`image`: note {i} " + "n" * 180
                                                                      for i in range(6)]})
    record = JobRecord(id="c" * 12, spec=spec, state=JobState.FAILED, error="E" * 300)
    for extra in range(0, 1300, 50):
        text = render.final_text(record, "x" * extra)
        assert len(text) <= render.CONTENT_LIMIT
        assert text.startswith(f"**{render.escape_prompt(spec.prompt)}**\n") and "read as" in text, extra
        kept = text.count("-# `image`: note")
        if kept < 6:
            assert render.NOTES_LEFT_OUT in text and len(text) > render.CONTENT_LIMIT - 200 - len(render.NOTES_LEFT_OUT), \
                (extra, kept, len(text))
