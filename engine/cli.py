"""`imagine "prompt" --out DIR`: render locally, without Discord.

Writes DIR/frames/000000.png, 000050.png, ... (iteration 0, every K, and the last), DIR/final.png,
DIR/video.mp4 and DIR/run.json (prompt, settings, seed, the similarity at every frame, timings).
Bad arguments print one line and exit with code 2, and write nothing: an --out folder that is not
empty is refused (a new run there would mix its files with the old ones). Ctrl-C prints one line,
says what is left in --out (frames, no run.json: run.json is written last), and exits with 130. A
file that cannot be written once the render has begun (a full disk), or a video ffmpeg cannot make,
is one line that says so and what is left, and exit 1. Every file is whole or absent: each is
written beside its name and renamed when done, so a failure or Ctrl-C part-way leaves none cut short.
The video is made from the frame files, read one at a time (not from pictures kept in memory).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Iterator

from engine import package_version

PRESETS = {
    # The seed article's notebook: 512x512, 1000 steps.
    "seed": dict(grid=64, iterations=1000, cutn=12),
    "normal": dict(grid=32, iterations=500, cutn=12),
    "draft": dict(grid=32, iterations=200, cutn=8),
}


class UsageError(Exception):
    pass


class RunFailed(Exception):
    """A file of the run cannot be made once the render has begun (a full disk, ffmpeg failing):
    not the person's input (exit 2) but the run's failure, exit 1, with what is left in --out."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit code 2
        self.exit(2, f"{self.prog}: error: {message}\n")


SEED_MAX = 2**32 - 1     # as the bot's `seed` option
# Upper bounds: far above what the bot allows ([imagine] max_iterations 1000, cutn 12), room for a
# big GPU (100x the seed preset's steps; 20x its cut-outs, whose memory grows linearly: not measured
# at 256 on a GPU), low enough that a typo is refused at once instead of failing in the allocator.
MAX_ITERATIONS = 100_000
MAX_CUTN = 256
GRIDS = (32, 64)
EXIT_INTERRUPTED = 130
EXIT_FAILED = 1          # a late failure (RunFailed); what an uncaught exception gave before, with a traceback
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seed must be a whole number, not {text!r}")
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"--seed must be between 0 and {SEED_MAX}, not {value}")
    return value


def _fps(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    # At least a frame every 100 s: ffmpeg refuses the duration a slower rate gives a frame, after
    # the whole render.
    if not (math.isfinite(value) and 0.01 <= value <= 240):
        raise argparse.ArgumentTypeError(f"--fps must be a number from 0.01 to 240, not {text!r}")
    return value


def folder_argument(flag: str):
    """A folder flag's path, `~` expanded (as $IMAGINE_CACHE is); an empty one is refused, not
    read as the working directory."""
    def parse(text: str) -> Path:
        if not text.strip():
            raise argparse.ArgumentTypeError(f"{flag} must name a folder, not an empty string")
        return Path(text).expanduser()
    return parse


def image_file_argument(flag: str):
    """An image file flag's path, `~` expanded; an empty one is refused, not read as the working
    directory ("no such file" of a path never typed)."""
    def parse(text: str) -> Path:
        if not text.strip():
            raise argparse.ArgumentTypeError(f"{flag} must name an image file, not an empty string")
        return Path(text).expanduser()
    return parse


def _positive(name: str, most: int | None = None):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a whole number, not {text!r}")
        if value < 1:
            raise argparse.ArgumentTypeError(f"{name} must be at least 1, not {value}")
        if most is not None and value > most:
            raise argparse.ArgumentTypeError(f"{name} must be at most {most}, not {value}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="imagine", description="Render a prompt with CLIP + the DALL-E dVAE decoder.")
    p.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    p.add_argument("prompt", help='what to draw; weighted parts: "a house | by Escher:0.5 | blurry:-1"')
    p.add_argument("--out", required=True, type=folder_argument("--out"),
                   help="output folder: created, or an existing empty one (a non-empty one is refused)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="seed",
                   help="seed = the article's 512x512, 1000 steps (default); normal; draft")
    p.add_argument("--iterations", type=_positive("--iterations", MAX_ITERATIONS),
                   help=f"optimisation steps, 1-{MAX_ITERATIONS} (default: the preset's)")
    p.add_argument("--frame-every", type=_positive("--frame-every", MAX_ITERATIONS), default=50,
                   help="save a frame every K iterations (default 50)")
    p.add_argument("--seed", type=_seed, default=None,
                   help=f"random seed, 0-{SEED_MAX} (default: random, recorded in run.json)")
    p.add_argument("--grid", type=int, choices=GRIDS, help="32 -> 256x256, 64 -> 512x512")
    p.add_argument("--cutn", type=_positive("--cutn", MAX_CUTN),
                   help=f"random cut-outs CLIP sees per step, 1-{MAX_CUTN} (default: the preset's; "
                        "memory grows with it)")
    p.add_argument("--clip-model", default="ViT-B/32", help="a CLIP model name or a local file")
    p.add_argument("--decoder", default="openai", help="'openai' (download once) or a local decoder file")
    p.add_argument("--trust-decoder", action="store_true",
                   help="allow loading a model file whose hash is not known good: a local dVAE pickle (the "
                        "decoder, and the encoder that --init-image loads) or a CLIP TorchScript file given "
                        "by path (loading either runs code it holds)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto")
    p.add_argument("--cache-dir", type=folder_argument("--cache-dir"), default=None,
                   help="model cache (default: $IMAGINE_CACHE, else ~/.cache/imagine-bot)")
    p.add_argument("--fps", type=_fps, default=10.0, help="video frame rate")
    p.add_argument("--split-softmax", action="store_true", help="the notebook's two-softmax quirk")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="replay the step from a CUDA graph after a short warm-up (CUDA only). Experimental: "
                        "not yet measured on a GPU, docs/PERFORMANCE.md")
    p.add_argument("--image-prompt", action="append", default=[], metavar="PATH[:WEIGHT]",
                   help="pull toward this picture's CLIP embedding (repeatable; weight default 1)")
    p.add_argument("--init-image", type=image_file_argument("--init-image"), help="start from this picture's dVAE codes (needs the encoder)")
    p.add_argument("--encoder", default="openai", help="'openai' or a local dVAE encoder file (for --init-image)")
    p.add_argument("--from-run", type=folder_argument("--from-run"), metavar="DIR",
                   help="remix: start from the final state of an earlier run's output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--log-level", default="WARNING", type=str.upper, choices=LOG_LEVELS)
    return p


class _Written:
    """What this run has put in --out so far, for the one line a failure or Ctrl-C prints."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.made: list[Path] = []   # the folders this run made for --out (frames/, --out, its new parents), deepest first
        self.frames = 0
        self.files: list[str] = []

    def tidy(self) -> None:
        """Nothing written yet: remove the empty folders this run made (frames/, and --out with the
        parents it needed, `runs/2026/cat` from an empty folder: as before the run)."""
        if self.frames or self.files:
            return
        for folder in self.made:
            try:
                folder.rmdir()
            except OSError:   # not empty (something else wrote there meanwhile), or gone: left as it is
                return

    def left(self) -> str:
        if not self.frames and not self.files:
            return "nothing was written"
        what = ([f"{self.frames} frame{'s' if self.frames != 1 else ''} in frames/"] if self.frames else []) + self.files
        return (f"{self.out} holds an unfinished run ({', '.join(what)}; no run.json): "
                "delete it, or pass another --out, to run again")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    written = _Written(args.out)
    try:
        with _downloads_on_stderr(args.log_level):
            return _run(args, written)
    except UsageError as exc:
        written.tidy()
        after = f" ({written.left()})" if written.frames or written.files else ""
        print(f"imagine: error: {exc}{after}", file=sys.stderr)
        return 2
    except RunFailed as exc:
        written.tidy()
        print(f"imagine: error: {exc}; {written.left()}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        written.tidy()
        print(f"imagine: interrupted; {written.left()}", file=sys.stderr)
        return EXIT_INTERRUPTED


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def one_line(text: str) -> str:
    """`text` as one line for an operator: ANSI escapes gone, its first non-empty line, spaces collapsed."""
    lines = [" ".join(line.split()) for line in _ANSI.sub("", str(text)).splitlines()]
    return next((line for line in lines if line), "")


def model_error(exc: BaseException) -> str:
    """A ModelLoadError as one line that says which file and what was expected. torch's own text
    (several lines, ANSI escapes, advice to unpickle the file anyway, or a bare number) is
    replaced by its exception's type."""
    text = str(exc)
    cause = exc.__cause__
    cause_text = str(cause) if cause is not None else ""
    if cause is not None and text.endswith(cause_text):   # (an empty one too: an empty file's EOFError)
        text = f"{text[:len(text) - len(cause_text)].rstrip().rstrip(':')} ({type(cause).__name__})"
    text = one_line(text)
    if text.startswith("CLIP file "):
        text += ("; expected OpenAI's CLIP TorchScript archive (such as ViT-B-32.pt), a CLIP state dict, "
                 "or a model name such as ViT-B/32")
    elif text.startswith("dVAE ") and cause is not None:
        text += "; expected a dall_e pickle such as OpenAI's decoder.pkl / encoder.pkl, or its .safetensors copy"
    return text


def os_reason(exc: OSError) -> str:
    """"Not a directory: 'cache/clip'" rather than "[Errno 20] Not a directory: 'cache/clip'"."""
    if exc.strerror and exc.filename:
        return f"{exc.strerror}: {str(exc.filename)!r}"
    return one_line(str(exc)) or type(exc).__name__


def _in_cache(filename, cache: Path) -> bool:
    """Whether an OSError's file is the model cache, in it, or a folder above it (making the cache
    makes those: a HOME the user cannot write). Compared as written, not resolved: the names in
    such errors are the cache's path joined with more. Not for a model file named by --clip-model
    or --decoder outside it: the cache's hint would send the person the wrong way."""
    if not filename or not isinstance(filename, (str, bytes, os.PathLike)):   # none, or a descriptor
        return False
    path, cache = Path(os.path.abspath(os.fsdecode(filename))), Path(os.path.abspath(cache))
    return path == cache or path in cache.parents or cache in path.parents


@contextlib.contextmanager
def _downloads_on_stderr(log_level: str) -> Iterator[None]:
    """engine.models logs each model download (minutes, ~400 MB on a first run) at INFO, which the
    CLI's default log level (WARNING) hides: shown on stderr as `imagine: downloading ...`, and not
    by the log too, unless the log shows it already (INFO, DEBUG). Undone on the way out: tests
    call main() in-process."""
    download_log = logging.getLogger("engine.models.download")   # by name: engine.models imports torch
    if logging.getLevelName(log_level) <= logging.INFO:
        yield
        return
    note, level, propagate = _StderrNote(), download_log.level, download_log.propagate
    download_log.addHandler(note)
    download_log.setLevel(logging.INFO)
    download_log.propagate = False
    try:
        yield
    finally:
        download_log.removeHandler(note)
        download_log.setLevel(level)
        download_log.propagate = propagate


class _StderrNote(logging.Handler):
    """A log record as `imagine: MESSAGE` on the sys.stderr of the moment (pytest swaps it)."""

    def emit(self, record: logging.LogRecord) -> None:
        print(f"imagine: {record.getMessage()}", file=sys.stderr)


def _write_whole(path: Path, data: bytes, name: str) -> None:
    """`data` as `path`, whole or not at all: written beside it and renamed, so that a full disk or a
    Ctrl-C part-way leaves no cut-short file under the name (nor the one beside it). A write that
    fails is a RunFailed naming the file (`name`, as the line about what is left names files)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError):
            raise RunFailed(f"cannot write {name}: {exc.strerror or exc}") from None
        raise


def _out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and any(s in str(exc) for s in ("out of memory", "can't allocate memory"))
    )


def _run(args: argparse.Namespace, written: _Written) -> int:
    import secrets

    import torch
    from tqdm import tqdm

    from engine import video
    from engine.generate import GenerationSettings, PromptError, generate, parse_prompt
    from engine.models import DEFAULT_CACHE, ModelLoadError, load_models

    args.prompt = _utf8_argument(args.prompt)
    # The image prompts' weights (their files are read below): a positive one lets every part of
    # the text prompt be negative (`blurry:-1`: toward the picture, away from "blurry").
    image_weights = [_image_prompt_weight(spec)[1] for spec in args.image_prompt]
    try:
        parts = parse_prompt(args.prompt, image_weights)
    except PromptError as exc:
        raise UsageError(str(exc))
    from engine.prompts import clip_overflow

    for note in clip_overflow(parts):   # now, not after the run: the person can stop and rephrase
        print(f"imagine: warning: {note}", file=sys.stderr)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but no CUDA device is available (--device cpu runs on the CPU)")
    if device == "cpu" and args.precision in ("bf16", "fp16"):
        # engine.generate autocasts on CUDA only: on a CPU every precision is fp32. Said, not refused.
        print(f"imagine: note: --precision {args.precision} applies on CUDA only; on the CPU this runs in fp32",
              file=sys.stderr)
    if device == "cpu" and args.cuda_graphs:
        print("imagine: note: --cuda-graphs applies on CUDA only; on the CPU the step runs as usual", file=sys.stderr)
    preset = PRESETS[args.preset]
    settings = GenerationSettings(
        iterations=args.iterations or preset["iterations"],
        frame_every=args.frame_every,
        grid=args.grid or preset["grid"],
        cutn=args.cutn or preset["cutn"],
        seed=args.seed if args.seed is not None else secrets.randbelow(2**31),
        split_softmax=args.split_softmax,
        precision=args.precision,
    )
    out: Path = args.out
    _check_out(out)
    if args.init_image and args.from_run:
        raise UsageError("--init-image and --from-run both set the start: choose one")
    image_prompts = [_image_prompt(spec) for spec in args.image_prompt]
    init_image = _read_image(args.init_image, "--init-image") if args.init_image else None
    parent_state = None
    if args.from_run:
        parent_state = _read_state(args.from_run)
        parent_grid = parent_state["logits"].shape[-1]
        if args.grid and args.grid != parent_grid:
            raise UsageError(f"--from-run {args.from_run} has grid {parent_grid}; --grid {args.grid} does not fit")
        settings = replace(settings, grid=parent_grid)
    if args.device is None and device == "cpu":
        # Said, not refused: the fallback is silent otherwise, and the default preset takes hours there. After the
        # input checks: a refusal stays one line.
        slow = ": hours at the default preset (try --preset draft, or a GPU)" if args.preset == "seed" else ""
        print(f"imagine: note: no CUDA device, so this runs on the CPU{slow}", file=sys.stderr)
    t0 = time.perf_counter()
    cache = args.cache_dir or DEFAULT_CACHE
    try:
        models = load_models(args.clip_model, args.decoder, device, cache,
                             args.trust_decoder, encoder=args.encoder if init_image else None)
    except ModelLoadError as exc:
        raise UsageError(model_error(exc))
    except OSError as exc:   # the model cache cannot be made or written, or a model file named cannot be read
        hint = (f" (the model cache is {cache}: --cache-dir or $IMAGINE_CACHE puts it elsewhere)"
                if _in_cache(exc.filename, cache) else "")
        raise UsageError(f"cannot load the models: {os_reason(exc)}{hint}") from None
    load_seconds = time.perf_counter() - t0
    if parent_state is not None:   # its vocabulary is the decoder's: known now, before --out is made
        vocab = parent_state["logits"].shape[1]
        if vocab != models.vocab_size:
            raise UsageError(f"--from-run {args.from_run}: state.pt has {vocab} codes per cell, but the decoder "
                             f"has {models.vocab_size} (a run made with another decoder?)")

    frames_dir = out / "frames"
    written.made = [folder for folder in (frames_dir, out, *out.parents) if not folder.exists()]
    try:
        frames_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot create it ({exc.strerror or exc})")
    records = []
    frame_files: list[Path] = []   # the video is made from these, read one at a time
    # Off a terminal (a log file, CI) tqdm writes each redraw on its own line: at most one a few
    # seconds there, not ten a second from a fast GPU. TQDM_MININTERVAL in the environment wins
    # (tqdm lets an explicit argument beat it, so none is passed then).
    quiet = {} if sys.stderr.isatty() or "TQDM_MININTERVAL" in os.environ else {"mininterval": 5.0}
    bar = tqdm(total=settings.iterations, unit="it", disable=args.no_progress, desc="imagine", **quiet)

    def on_frame(frame) -> None:
        name = f"{frame.iteration:06d}.png"
        _write_whole(frames_dir / name, frame.png(), f"frames/{name}")
        frame_files.append(frames_dir / name)
        written.frames += 1
        records.append({"iteration": frame.iteration, "similarity": frame.similarity,
                        "similarities": frame.similarities,
                        "loss": None if frame.loss != frame.loss else frame.loss,
                        "seconds": round(frame.elapsed, 3)})
        bar.update(frame.iteration - bar.n)
        # refresh=False: drawn with the next update (as mininterval allows), not a redraw of its own
        # every frame, which off a terminal is a line per frame whatever the interval.
        bar.set_postfix(similarity=f"{frame.similarity:.4f}", refresh=False)

    def on_step(iteration: int) -> None:
        # Every iteration, not only at frames (--frame-every 50 on a CPU is minutes between them):
        # the count, its rate and the ETA move; the similarity (postfix) changes at frames only.
        bar.update(iteration - bar.n)

    from engine.image_prompts import init_logits_from_image, to_tensor

    init_logits = parent_state["logits"] if parent_state is not None else None
    if init_image is not None:
        init_logits = init_logits_from_image(models, init_image, settings.grid)
    # At CLIP's side, resized with Lanczos as the worker does (Worker._make_slot): the same
    # picture is the same target from either.
    res = models.clip_resolution
    targets = [(to_tensor(img, res), weight, f"image:{name}") for img, weight, name in image_prompts]
    try:
        # keep_frames=False: on_frame writes each frame as it comes, and the video is made from those
        # files; the result keeps the last frame only (--iterations 100000 --frame-every 1 is 100001
        # pictures, 73 GiB at --grid 64).
        result = generate(parts, settings, models, progress=on_frame, init_logits=init_logits, image_targets=targets,
                          on_step=on_step, cuda_graphs=args.cuda_graphs, keep_frames=False)
    except Exception as exc:
        if not _out_of_memory(exc):
            raise
        raise UsageError(f"out of {'GPU ' if device == 'cuda' else ''}memory at --grid {settings.grid} --cutn "
                         f"{settings.cutn}: lower --cutn (or --grid), or close what else uses the "
                         f"{'GPU' if device == 'cuda' else 'memory'}") from None
    finally:
        bar.close()
    _write_whole(out / "final.png", result.final.png(), "final.png")
    written.files.append("final.png")
    from engine.generate import compact_state, state_to_bytes

    # for --from-run; compact (half the bytes, the same picture), like the bot's state.pt
    _write_whole(out / "state.pt", state_to_bytes(compact_state(result.state)), "state.pt")
    written.files.append("state.pt")
    t1 = time.perf_counter()
    try:
        # From the frame files (whole: _write_whole), one at a time: memory does not grow with their
        # count. Whole or absent: a failure or Ctrl-C leaves no video.mp4 (nor its .partial.mp4).
        # No time limit: a long run's video takes long (about 76 frames a second on 2 CPU cores at
        # 512x512: --iterations 100000 --frame-every 1 is over 20 minutes), and Ctrl-C stops it.
        video.encode_files(frame_files, out / "video.mp4", fps=args.fps, timeout=None)
    except (video.VideoError, OSError) as exc:   # ffmpeg failing or missing; --out's folder gone
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise RunFailed(f"cannot make video.mp4: {one_line(reason)}") from None
    written.files.append("video.mp4")
    video_seconds = time.perf_counter() - t1
    run = {
        "prompt": args.prompt,
        "parts": [{"text": p.text, "weight": p.weight} for p in parts],
        "settings": settings.to_dict(),
        "seed": settings.seed,
        "device": device,
        "clip_model": args.clip_model,
        "decoder": args.decoder,
        "image_prompts": [{"file": name, "weight": weight} for _, weight, name in image_prompts],
        "init_image": str(args.init_image) if args.init_image else None,
        "from_run": str(args.from_run) if args.from_run else None,
        "frames": records,
        "final_similarity": result.final.similarity,
        "timings": {"load_models_s": round(load_seconds, 3), "generate_s": round(result.seconds, 3),
                    "video_s": round(video_seconds, 3),
                    "iterations_per_s": round(settings.iterations / result.seconds, 3) if result.seconds else None},
        "warnings": result.warnings,
    }
    # UTF-8 whatever the locale; file names the locale could not decode are written as their bytes.
    # Last, and whole or not at all: a run.json says the run finished.
    _write_whole(out / "run.json",
                 (json.dumps(run, indent=2, ensure_ascii=False) + "\n").encode("utf-8", errors="surrogateescape"),
                 "run.json")
    print(f"wrote {out / 'final.png'} and {out / 'video.mp4'} (similarity {result.final.similarity:.4f})")
    return 0


def _utf8_argument(text: str) -> str:
    """An argument as typed: under a locale that is not UTF-8 (LC_ALL=C without Python's UTF-8
    mode) Python keeps the bytes it could not decode as lone surrogates; they are UTF-8 text."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        return os.fsencode(text).decode("utf-8")
    except UnicodeError:
        raise UsageError("the prompt is not valid UTF-8 text") from None


def _check_out(out: Path) -> None:
    """--out must be an empty folder we can write in, or a path one can be made at (checked before
    the models load, by writing and removing a probe file: permissions, read-only file systems, and
    root, for whom os.access says yes to everything)."""
    if out.exists():
        if not out.is_dir():
            raise UsageError(f"--out {out} exists and is not a folder")
        try:
            entries = next(os.scandir(out), None)
        except OSError as exc:
            raise UsageError(f"--out {out}: cannot read it ({exc.strerror or exc})")
        if entries is not None:
            raise UsageError(f"--out {out} is not empty (a new run would mix with what is there): "
                             f"choose another folder, e.g. --out {_free_name(out)}")
        _probe(out, f"--out {out}: cannot write in it")
        return
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"--out {out}: {parent} is not a folder")
    _probe(parent, f"--out {out}: cannot create it in {parent}")


def _probe(folder: Path, message: str) -> None:
    try:
        fd, name = tempfile.mkstemp(dir=folder, prefix=".imagine-probe-")
    except OSError as exc:
        raise UsageError(f"{message} ({exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(name)


def _free_name(out: Path) -> Path:
    """`out-2`, `out-3`, ...: the first that does not exist, to suggest."""
    n = 2
    while out.with_name(f"{out.name}-{n}").exists():
        n += 1
    return out.with_name(f"{out.name}-{n}")


def _read_state(run_dir: Path) -> dict:
    """The final state of an earlier run (`--from-run`), or a UsageError saying why it is not one."""
    import torch

    from engine.generate import state_from_bytes

    state_file = run_dir / "state.pt"
    if not state_file.is_file():
        raise UsageError(f"--from-run {run_dir}: no state.pt there (is it an imagine output folder?)")
    try:
        state = state_from_bytes(state_file.read_bytes())
    except Exception as exc:  # noqa: BLE001 - torch.load raises many kinds; the file is the problem
        raise UsageError(f"--from-run {run_dir}: state.pt cannot be read ({type(exc).__name__}): "
                         "is it an imagine output folder?")
    logits = state.get("logits") if isinstance(state, dict) else None
    if not isinstance(logits, torch.Tensor) or logits.dim() != 4 or logits.shape[-1] != logits.shape[-2]:
        raise UsageError(f"--from-run {run_dir}: state.pt holds no imagine state (no square logits)")
    # [1, vocab, grid, grid]: one picture, a grid imagine renders (the vocabulary is checked
    # against the decoder once it is loaded, still before anything is written).
    if logits.shape[0] != 1 or logits.shape[1] < 2 or not logits.is_floating_point():
        raise UsageError(f"--from-run {run_dir}: state.pt holds logits of shape {list(logits.shape)}, "
                         "not one picture's [1, codes, grid, grid]")
    if logits.shape[-1] not in GRIDS:
        raise UsageError(f"--from-run {run_dir}: state.pt has grid {logits.shape[-1]}; imagine renders grid "
                         f"{' or '.join(map(str, GRIDS))}")
    # Only the logits start the new run: a compact state.pt's fp16 ones back to fp32.
    return dict(state, logits=logits.float())


def _read_image(path: Path, flag: str):
    from engine.images import ImageRejected, load_image

    if path.is_dir():
        raise UsageError(f"{flag} {path}: is a folder, not an image file")
    if not path.is_file():
        raise UsageError(f"{flag} {path}: no such file")
    try:
        image, notes = load_image(path.read_bytes())
    except ImageRejected as exc:
        raise UsageError(f"{flag} {path}: {exc}")
    except OSError as exc:
        raise UsageError(f"{flag} {path}: cannot read it ({exc.strerror or exc})")
    for note in notes:
        print(f"imagine: warning: {flag} {path}: {note}", file=sys.stderr)
    return image


def _image_prompt_weight(spec: str) -> tuple[Path, float]:
    """`--image-prompt PATH[:WEIGHT]` -> (path, weight), the weight checked; the file is not read."""
    path, weight = spec, 1.0
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            path, weight = head, float(tail)
        except ValueError:
            pass
    if not (math.isfinite(weight) and -100 <= weight <= 100):   # as the bot's `image_weight`
        raise UsageError(f"--image-prompt {spec}: the weight must be a number between -100 and 100")
    if not path.strip():   # `--image-prompt ''`: not the working directory
        raise UsageError(f"--image-prompt {spec!r}: name an image file (PATH or PATH:WEIGHT)")
    return Path(path).expanduser(), weight


def _image_prompt(spec: str):
    path, weight = _image_prompt_weight(spec)
    return _read_image(path, "--image-prompt"), weight, path.name


if __name__ == "__main__":
    sys.exit(main())
