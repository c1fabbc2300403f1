"""Load CLIP and the DALL-E dVAE (decoder, encoder): by name (downloaded once into a cache,
SHA-256 checked) or from a local path.

Every workaround for today's torch / setuptools lives here and only here:
- `clip` imports `pkg_resources` (setuptools < 81, pinned in pyproject.toml);
- `clip.load(jit=True)` breaks on today's torch, and `clip.load` on a state-dict file raises
  EOFError: we read the TorchScript archive (or the state dict) ourselves and call `build_model`;
- `dall_e`'s pickles need `weights_only=False`: we unpickle only a file whose SHA-256 is known
  good (the operator's `known_sha256`, `KNOWN_DVAE_SHA256`), that the caller explicitly trusts,
  or that this process has just downloaded over HTTPS, then cache its weights as safetensors so
  the next load unpickles nothing. Trust never comes from the model cache itself (whoever can
  write a pickle there could write a hash beside it), and a file is read once: the bytes hashed
  are the bytes loaded (`_private_copy`);
- modules from an old pickle lack `Upsample.recompute_scale_factor`: fresh `nn.Upsample`s;
- dVAE modules come out with `requires_grad=True`: frozen and put in eval mode.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import logging
import os
import tempfile
import time
import urllib.request
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Mapping

import torch
from torch import nn

with warnings.catch_warnings():
    # clip/clip.py imports pkg_resources, which warns that it is deprecated.
    warnings.simplefilter("ignore")
    import clip
    from clip.model import CLIP, build_model

import dall_e
from dall_e import Decoder, Encoder
from dall_e.utils import Conv2d as DalleConv2d
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save_file as save_safetensors

from engine.attention import lean_attention

log = logging.getLogger(__name__)
# One INFO line before each model download (minutes for CLIP's ~340 MB): the bot's and the
# worker's logs show it as it is; the `imagine` CLI, whose log level is WARNING, shows this logger
# on stderr (engine.cli).
download_log = logging.getLogger(f"{__name__}.download")

DvaePart = Literal["decoder", "encoder"]

CLIP_URLS: dict[str, str] = dict(clip.clip._MODELS)  # name -> URL; the URL's folder is the SHA-256
DVAE_URLS: dict[str, str] = {
    "decoder": "https://cdn.openai.com/dall-e/decoder.pkl",
    "encoder": "https://cdn.openai.com/dall-e/encoder.pkl",
}
# OpenAI publishes no checksum for the dVAE pickles. Files whose SHA-256 is listed here (or in
# `known_sha256` passed by the caller: the bot's `[worker] known_sha256`, imagine-worker's
# --known-sha256) may be unpickled. A download from DVAE_URLS over HTTPS is unpickled (and
# converted to safetensors) by the process that downloaded it, from the bytes it downloaded, before
# it is put in the cache; a pickle found in the cache is never trusted for being there, nor for a
# hash file beside it (earlier versions wrote `<part>.pkl.sha256` and trusted it: anyone who can
# write the cache can write both).
KNOWN_DVAE_SHA256: set[str] = set()
# What an untrusted pickle's refusal tells the person to do. The CLIs' flag by default; the bot
# passes its own (engine.models knows nothing of config.toml).
TRUST_HINT_CLI = "pass --trust-decoder"


def default_cache(environ: Mapping[str, str] = os.environ) -> Path:
    """$IMAGINE_CACHE (`~` expanded), else ~/.cache/imagine-bot. An empty IMAGINE_CACHE counts as
    unset: as a path it would be the current folder. A `~` that names no home (`~typo/models`, or
    no HOME and no passwd entry) is kept as typed, as the shell keeps it: pathlib raises
    RuntimeError there, and this runs at import (DEFAULT_CACHE), where it killed the bot, the
    worker and the CLI with a traceback before they could say anything."""
    chosen = environ.get("IMAGINE_CACHE", "") or "~/.cache/imagine-bot"
    try:
        return Path(chosen).expanduser()
    except RuntimeError:
        return Path(chosen)


DEFAULT_CACHE = default_cache()

# Files being written into the cache (a download, a dVAE's safetensors copy) are named `.part-*`
# until they take their place. A process stopped mid-download (a stop signal leaves the load's
# thread to end with the process) leaves its `.part-` file behind: up to ~340 MB for CLIP.
# `sweep_partial_files` removes those at every load; only ones not written for PARTIAL_MAX_AGE
# seconds, because the bot and imagine-workers may share a cache and download at once (a download
# in progress writes its file every second or so; urlopen gives up after 60 s without data).
PARTIAL_PREFIX = ".part-"
PARTIAL_MAX_AGE = 3600.0


def sweep_partial_files(cache_dir: Path, max_age: float = PARTIAL_MAX_AGE) -> list[Path]:
    """Remove the `.part-*` files in `cache_dir`'s subfolders not modified for `max_age` seconds
    (left by a process stopped mid-download). Returns those removed; errors are ignored."""
    removed: list[Path] = []
    now = time.time()
    with contextlib.suppress(OSError):
        for path in Path(cache_dir).glob(f"*/{PARTIAL_PREFIX}*"):
            with contextlib.suppress(OSError):
                if path.is_file() and now - path.stat().st_mtime > max_age:
                    path.unlink()
                    removed.append(path)
    if removed:
        log.info("removed %d partial download(s) left in %s by a stopped process", len(removed), cache_dir)
    return removed


class ModelLoadError(RuntimeError):
    """A model file is missing, corrupt or not trusted. The message names the file."""


class UntrustedPickleError(ModelLoadError):
    pass


@dataclass
class Models:
    """The frozen models one generation needs. Shapes: CLIP image input [N, 3, R, R]."""

    clip: CLIP
    decoder: Decoder
    device: torch.device
    encoder: Encoder | None = None
    # dtype -> (CLIP's image tower, decoder) with weights of that dtype: `low_precision`.
    _low_precision: dict[torch.dtype, tuple[nn.Module, nn.Module]] = field(
        default_factory=dict, init=False, repr=False, compare=False)

    def low_precision(self, dtype: torch.dtype) -> tuple[nn.Module, nn.Module]:
        """CLIP's image tower and the decoder with their weights in `dtype` (`low_precision_copy`),
        for steps under autocast to `dtype`: made at the first call, then kept with the models, so
        every BatchRunner of these models shares one set (`engine.capacity.low_precision_copy_bytes`)."""
        if dtype not in self._low_precision:
            self._low_precision[dtype] = (low_precision_copy(self.clip.visual, dtype),
                                          low_precision_copy(self.decoder, dtype))
        return self._low_precision[dtype]

    @property
    def clip_resolution(self) -> int:
        return int(self.clip.visual.input_resolution)

    @property
    def vocab_size(self) -> int:
        return int(self.decoder.vocab_size)


def _chunks(path: Path) -> Iterator[bytes]:
    """`path`'s bytes, 1 MiB at a time. A read error names the file: open's errors do, a read's
    (EIO from a failing disk or a /proc file) carry no file name, and the CLI's one line should say
    which file it could not read."""
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                yield chunk
    except OSError as exc:
        if exc.filename is None:
            exc.filename = str(path)
        raise


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    for chunk in _chunks(path):
        h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def _private_copy(path: Path) -> Iterator[tuple[str, str | io.BytesIO]]:
    """Read `path` once: (the SHA-256 of the bytes read, a source torch.load / torch.jit.load read
    those very bytes from). Hashing a file by its path and then loading it by its path again would
    load whatever another writer put there in between.

    On Linux the copy is a sealed memfd (no one, this process included, can change it; the loaders
    read it by its /proc path, so it is the only copy of the file in memory); elsewhere a BytesIO
    of the bytes read (torch.jit.load copies that buffer once more while it imports)."""
    h = hashlib.sha256()
    memfd = getattr(os, "memfd_create", None)
    fd = -1
    if memfd is not None and os.path.isdir("/proc/self/fd"):
        try:
            fd = memfd(f"imagine-{path.name}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        except OSError:
            fd = -1
    try:
        if fd >= 0:
            for chunk in _chunks(path):
                h.update(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
            import fcntl

            fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                        fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
            yield h.hexdigest(), f"/proc/self/fd/{fd}"
        else:
            data = b"".join(_chunks(path))
            h.update(data)
            yield h.hexdigest(), io.BytesIO(data)
    finally:
        if fd >= 0:
            os.close(fd)


def _megabytes(content_length: str | None) -> str:
    """A Content-Length header as "337.6 MB", or "size unknown" (none, or not a number)."""
    if content_length is None or not content_length.isdigit():
        return "size unknown"
    return f"{int(content_length) / 1e6:.1f} MB"


def _download(url: str, target: Path, expected_sha256: str | None, placed_by_hand: str = "",
              then: Callable[[Path, str], None] | None = None) -> str:
    """Download `url` to `target` atomically; verify the hash when one is known. A failed download
    leaves nothing behind (a CLIP file is 350 MB). `placed_by_hand`: what the offline advice adds.
    `then(temporary path, SHA-256 of the bytes downloaded)` runs before the file takes its place;
    if it raises, the file is dropped. Returns that SHA-256 (of the bytes received, not of the file
    read back)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    # Made before the connection is opened and outside the except below: a cache that exists but
    # cannot be written (read-only) is the cache's problem, an OSError naming its folder, not "could
    # not download ... On an offline machine ...".
    try:
        tmp = tempfile.NamedTemporaryFile(dir=target.parent, prefix=PARTIAL_PREFIX, delete=False)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(target.parent)) from exc   # the folder, not a random name
    h = hashlib.sha256()
    try:
        with tmp, urllib.request.urlopen(url, timeout=60) as src:
            # urllib follows a redirect from https to plain http; a dVAE pickle downloaded from
            # OpenAI is trusted for having come over HTTPS, so the last hop must be HTTPS too.
            if url.startswith("https://") and not src.geturl().startswith("https://"):
                raise OSError(f"redirected to {src.geturl()}, which is not HTTPS")
            expected = src.headers.get("Content-Length")
            download_log.info("downloading %s (%s) from %s to %s", target.name, _megabytes(expected), url, target)
            for chunk in iter(lambda: src.read(1 << 20), b""):
                h.update(chunk)
                tmp.write(chunk)
            # urllib returns a body cut short by a closed connection as if it were whole; a
            # truncated dVAE pickle would then be trusted as the download.
            if expected is not None and expected.isdigit() and tmp.tell() != int(expected):
                raise OSError(f"the connection closed after {tmp.tell()} of {expected} bytes")
    except Exception as exc:  # OSError, and http.client's IncompleteRead for a body cut short
        with contextlib.suppress(OSError):
            os.unlink(tmp.name)
        raise ModelLoadError(
            f"could not download {target.name} from {url} ({type(exc).__name__}: {exc}). On an offline "
            f"machine, download it elsewhere and place it at {target}, or pass its local path.{placed_by_hand}"
        ) from exc
    digest = h.hexdigest()
    try:
        if expected_sha256 and digest != expected_sha256:
            raise ModelLoadError(f"{url} downloaded, but its SHA-256 {digest} is not {expected_sha256}")
        if then is not None:
            then(Path(tmp.name), digest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp.name)
        raise
    os.replace(tmp.name, target)
    return digest


# --- CLIP --------------------------------------------------------------------------------------


def _clip_sha256(url: str) -> str:
    """The SHA-256 of the CLIP file at one of OpenAI's URLs: the URL's folder."""
    return url.split("/")[-2]


def _clip_source(name_or_path: str, cache_dir: Path) -> tuple[Path, str | None]:
    """The local CLIP file for a model name (downloaded once) or a path, and the SHA-256 it must
    have (a name's: the one in OpenAI's URL; None for a path the caller gave)."""
    if name_or_path in CLIP_URLS:
        url = CLIP_URLS[name_or_path]
        expected = _clip_sha256(url)
        target = Path(cache_dir) / "clip" / os.path.basename(url)
        if not target.is_file():
            _download(url, target, expected)
        return target, expected
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        raise ModelLoadError(
            f"CLIP model {name_or_path!r} is neither a known name ({', '.join(CLIP_URLS)}) nor a file"
        )
    return path, None


def _wrong_clip_hash(path: Path, expected: str) -> ModelLoadError:
    return ModelLoadError(f"{path} exists but its SHA-256 is not {expected}: delete it to download again")


def clip_file(name_or_path: str, cache_dir: Path = DEFAULT_CACHE) -> Path:
    """A local CLIP file for a model name (downloaded and checked once) or a path. (load_clip
    checks the bytes it loads, not this path.)"""
    path, expected = _clip_source(name_or_path, cache_dir)
    if expected is not None and sha256_of(path) != expected:
        raise _wrong_clip_hash(path, expected)
    return path


def _is_torchscript(source: str | io.BytesIO) -> bool:
    """Whether these bytes are a TorchScript archive (a zip with a constants.pkl, as torch.load
    tells them): its load runs the code it holds. (torch.load with weights_only refuses one.)"""
    import zipfile

    try:
        with (open(source, "rb") if isinstance(source, str) else contextlib.nullcontext(source)) as f:
            try:
                with zipfile.ZipFile(f) as archive:
                    return any(name.rsplit("/", 1)[-1] == "constants.pkl" for name in archive.namelist())
            finally:
                if isinstance(source, io.BytesIO):
                    source.seek(0)
    except (zipfile.BadZipFile, OSError):
        return False


def _read_clip(source: str | io.BytesIO, path: Path, run_code: bool = True, refusal: str = "") -> Any:
    """The state dict in a CLIP file's bytes (`source`, from _private_copy; `path` names it).
    `run_code` False: a plain state dict only (weights_only: no code runs); a TorchScript archive,
    whose load runs the code it holds (its classes' `__setstate__`), is refused with `refusal`."""
    if run_code:
        try:
            # OpenAI's files are TorchScript archives: read its state dict, not its code.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.load is deprecated"
                return torch.jit.load(source, map_location="cpu").state_dict()
        except RuntimeError:   # not TorchScript: a plain state dict, below
            if isinstance(source, io.BytesIO):
                source.seek(0)
    elif _is_torchscript(source):
        raise UntrustedPickleError(refusal)
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds on a corrupt file
        raise ModelLoadError(f"CLIP file {path} is corrupt or not a CLIP model: {exc}") from exc


def load_clip(name_or_path: str, device: str | torch.device = "cpu", cache_dir: Path = DEFAULT_CACHE,
              trust: bool = False, known_sha256: set[str] | frozenset[str] = frozenset(),
              trust_hint: str = TRUST_HINT_CLI) -> CLIP:
    """CLIP from OpenAI's TorchScript archive or from a plain state dict; frozen, fp32, eval.
    A model by name: the bytes loaded are the bytes whose SHA-256 was checked (one read). A file
    by path: a plain state dict is read with weights_only (no code runs); a TorchScript archive
    (OpenAI's format) runs the code it holds as it loads, so it is loaded only when its SHA-256 is
    one of OpenAI's CLIP files (CLIP_URLS) or `known_sha256`, or when `trust` is set (the CLIs'
    --trust-decoder, which trusts the model files named by path)."""
    path, expected = _clip_source(name_or_path, cache_dir)
    pinned = {_clip_sha256(url) for url in CLIP_URLS.values()} | {h.strip().lower() for h in known_sha256}
    with _private_copy(path) as (digest, source):
        if expected is not None and digest != expected:
            raise _wrong_clip_hash(path, expected)
        run_code = trust or digest in pinned   # a named model's file is pinned by its URL
        refusal = (f"refusing to load {path}: it is a TorchScript archive (loading one runs the code it holds) "
                   f"and its SHA-256 {digest} is not one of OpenAI's CLIP files. If you trust this file, "
                   f"{trust_hint}; or save its state dict (torch.save(model.state_dict(), path)), which "
                   "loads without running code.")
        state_dict = _read_clip(source, path, run_code, refusal)
    if isinstance(state_dict, dict) and "state_dict" in state_dict:
        state_dict = state_dict["state_dict"]
    if not isinstance(state_dict, dict) or "visual.proj" not in state_dict and "visual.attnpool.c_proj.weight" not in state_dict:
        raise ModelLoadError(f"CLIP file {path} does not hold a CLIP state dict")
    try:
        model = build_model(dict(state_dict))
    except Exception as exc:
        raise ModelLoadError(f"CLIP file {path} does not hold a CLIP model: {exc}") from exc
    return prepare_clip(model, device)


def prepare_clip(model: CLIP, device: str | torch.device = "cpu") -> CLIP:
    """A CLIP as the engine runs it: fp32 (build_model converts to fp16; the engine decides
    precision itself, with autocast), eval, frozen, and its attention in fewer ops
    (`engine.attention`: the same numbers)."""
    lean_attention(model.visual)
    return model.float().eval().requires_grad_(False).to(device)


def low_precision_copy(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of a frozen model (CLIP's image tower, the dVAE decoder) whose convolution and
    matmul weights are `dtype`, as clip's `convert_weights` makes OpenAI's fp16 CLIP: LayerNorm,
    the embeddings and anything else autocast leaves alone stay fp32. Under autocast to `dtype` it
    computes the same numbers as the original, since autocast casts exactly those weights to
    `dtype` at every use, without that cast's kernel for every weight in every step (about 170 of
    them for ViT-B/32 and the decoder). The converted weights are made directly, not from an fp32
    copy first (no transient second fp32 model)."""
    converted: dict[int, Any] = {}   # deepcopy's memo: id(original) -> its copy in `dtype`
    for sub in module.modules():
        names: tuple[str, ...] = ()
        if isinstance(sub, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            names = ("weight", "bias")
        elif isinstance(sub, nn.MultiheadAttention):   # its out_proj is a Linear, above; bias_k/v go through cat: fp32
            names = ("in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight", "v_proj_weight")
        elif isinstance(sub, DalleConv2d) and not sub.use_float16:   # with its own fp16 casts, autocast never sees w
            names = ("w", "b")
        for name in names + ("proj", "text_projection"):
            tensor = getattr(sub, name, None)
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
                low = tensor.detach().to(dtype, copy=True)
                converted[id(tensor)] = nn.Parameter(low, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else low
    return copy.deepcopy(module, converted)


def prepare_decoder(decoder: nn.Module, device: str | torch.device = "cpu") -> nn.Module:
    """A dVAE decoder as the engine runs it (what `load_dvae` gives): frozen, eval, none of
    dall_e's own fp16 casts (autocast decides), on `device`, in its fastest layout. For a decoder
    built in memory (benchmarks); `load_models` does the same to the one it reads."""
    return decoder_layout(_freeze(decoder).to(device))


def decoder_layout(decoder: nn.Module) -> nn.Module:
    """The decoder's weights, in place, in the memory layout its convolutions run fastest in: on a
    CPU channels-last (oneDNN's own; a full-size step 1.09x faster, docs/PERFORMANCE.md)."""
    if next(decoder.parameters()).device.type == "cpu":
        decoder.to(memory_format=torch.channels_last)
    return decoder


# --- dVAE --------------------------------------------------------------------------------------

_DVAE_CLASSES: dict[str, type[nn.Module]] = {"decoder": Decoder, "encoder": Encoder}
_DVAE_FIELDS: dict[str, tuple[str, ...]] = {
    "decoder": ("n_init", "n_hid", "n_blk_per_group", "output_channels", "vocab_size"),
    "encoder": ("n_hid", "n_blk_per_group", "input_channels", "vocab_size"),
}


def safe_cache_path(cache_dir: Path, part: DvaePart, sha256: str) -> Path:
    return Path(cache_dir) / "dvae" / f"{part}-{sha256[:16]}.safetensors"


def _freeze(module: nn.Module) -> nn.Module:
    """Frozen, eval mode, and no fp16 casts of its own: dall_e's Conv2d casts to fp16 on CUDA by
    itself, which made precision "fp32" run the decoder in fp16 and, under bf16 autocast, kept a
    second copy of every conv input. The engine's autocast (GenerationSettings.precision) decides."""
    for sub in module.modules():
        if isinstance(sub, DalleConv2d):
            sub.use_float16 = False
    return module.eval().requires_grad_(False)


def _fresh_upsamples(module: nn.Module) -> None:
    # Decoders pickled by an older torch lack Upsample.recompute_scale_factor on today's torch.
    for group in ("group_1", "group_2", "group_3"):
        block = getattr(module.blocks, group, None)
        if block is not None and hasattr(block, "upsample"):
            block.upsample = nn.Upsample(scale_factor=2, mode="nearest")


def save_dvae_safe(module: nn.Module, part: DvaePart, target: Path) -> Path:
    """Write a dVAE module's weights and constructor fields as safetensors (no pickle)."""
    config = {name: int(getattr(module, name)) for name in _DVAE_FIELDS[part]}
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in module.state_dict().items()}
    target.parent.mkdir(parents=True, exist_ok=True)
    # A unique temporary name: several workers may fill one shared cache at once.
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=PARTIAL_PREFIX, suffix=".tmp")
    os.close(fd)
    save_safetensors(tensors, tmp, metadata={"part": part, "config": json.dumps(config)})
    os.replace(tmp, target)
    return target


# The most each dVAE size in a safetensors config may be (OpenAI's: n_init 128, n_hid 256, 2 blocks a
# group, 3 channels, vocab 8192): a config is read before the weights are checked against it, so a
# huge one would build a huge model first.
DVAE_SIZE_MAX = {"n_init": 4096, "n_hid": 4096, "n_blk_per_group": 16, "output_channels": 4,
                 "input_channels": 4, "vocab_size": 65536}


def _dvae_config(raw: Any, part: DvaePart) -> dict[str, int] | None:
    """The dVAE sizes a safetensors file's metadata names (save_dvae_safe's `config`), or None when
    it is no such thing: not JSON, other keys, not whole numbers from 1 to their DVAE_SIZE_MAX."""
    try:
        config = json.loads(raw) if isinstance(raw, str) else None
    except ValueError:
        return None
    if not isinstance(config, dict) or set(config) != set(_DVAE_FIELDS[part]):
        return None
    if not all(type(v) is int and 1 <= v <= DVAE_SIZE_MAX[k] for k, v in config.items()):
        return None
    return config


def load_dvae_safe(path: Path, part: DvaePart) -> nn.Module:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_safetensors(str(path))
    except Exception as exc:
        raise ModelLoadError(f"dVAE weights file {path} is corrupt: {exc}") from exc
    if meta.get("part") != part:
        raise ModelLoadError(f"{path} holds a dVAE {meta.get('part')!r}, not a {part}")
    config = _dvae_config(meta.get("config"), part)
    if config is None:
        raise ModelLoadError(f"dVAE weights file {path} has no valid config (its {part}'s sizes: "
                             f"{', '.join(f'{k} up to {DVAE_SIZE_MAX[k]}' for k in _DVAE_FIELDS[part])})")
    module = _DVAE_CLASSES[part](**config, requires_grad=False)
    try:
        module.load_state_dict(tensors)
    except RuntimeError as exc:
        raise ModelLoadError(f"dVAE weights file {path} does not match its config: {exc}") from exc
    return _freeze(module)


def _unpickle_dvae(path: Path, part: DvaePart, trusted: Callable[[str], bool], refusal: Callable[[str], str]) -> tuple[nn.Module, str]:
    """Read `path` once, and unpickle those bytes only if `trusted(their SHA-256)`; else
    UntrustedPickleError(`refusal(SHA-256)`). Returns the module and the SHA-256."""
    with _private_copy(path) as (digest, source):
        if not trusted(digest):
            raise UntrustedPickleError(refusal(digest))
        try:
            # Unpickling runs code: only the bytes whose hash was just checked (or trusted) get here.
            with warnings.catch_warnings():
                # A TorchScript file given as a dVAE (a CLIP .pt, say): torch.load hands it to
                # torch.jit.load, with two warnings about that; the refusal below says it all.
                warnings.filterwarnings("ignore", "'torch.load' received a zip file", UserWarning)
                warnings.filterwarnings("ignore", "`torch.jit.load` is deprecated", FutureWarning)
                module = torch.load(source, map_location="cpu", weights_only=False)
        except (ImportError, AttributeError) as exc:
            # A whole pickle of classes this install lacks (another project's model, a module since
            # renamed): the file is fine, it is just not a dall_e one.
            raise ModelLoadError(f"dVAE {part} file {path} is not a dall_e {part} pickle: {exc}") from exc
        except Exception as exc:
            raise ModelLoadError(f"dVAE {part} file {path} is corrupt or truncated: {exc}") from exc
    if not isinstance(module, _DVAE_CLASSES[part]):
        raise ModelLoadError(f"{path} holds a {type(module).__name__}, not a dall_e {part.title()}")
    if part == "decoder":
        _fresh_upsamples(module)
    return _freeze(module), digest


def load_dvae(
    part: DvaePart,
    name_or_path: str = "openai",
    device: str | torch.device = "cpu",
    cache_dir: Path = DEFAULT_CACHE,
    trust: bool = False,
    known_sha256: set[str] | frozenset[str] = frozenset(),
    trust_hint: str = TRUST_HINT_CLI,
) -> nn.Module:
    """The dVAE decoder or encoder.

    `name_or_path`: "openai" (OpenAI's file, downloaded into `cache_dir` once), a `.safetensors`
    file written by `save_dvae_safe`, or a pickle like OpenAI's `decoder.pkl`. A pickle is
    unpickled only when its SHA-256 is known good (`KNOWN_DVAE_SHA256`, `known_sha256`), when this
    call has just downloaded it from OpenAI over HTTPS (it is converted before it is put in the
    cache), or when `trust` is set; its weights are then cached as safetensors and the pickle is not
    read again. Nothing in the cache makes a pickle trusted (a `<part>.pkl.sha256` beside it, which
    earlier versions wrote and trusted, is ignored). The file is read once: the bytes hashed are the
    bytes unpickled. `known_sha256`: hex digests of files to accept; `trust_hint`: how the refusal
    says to trust a file.
    """
    cache_dir = Path(cache_dir)
    if name_or_path.endswith(".safetensors"):
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"dVAE {part} file {path} does not exist")
        return load_dvae_safe(path, part).to(device)

    known = {h.strip().lower() for h in known_sha256}

    def trusted(digest: str) -> bool:
        return trust or digest in KNOWN_DVAE_SHA256 or digest in known

    def convert(pickle_path: Path, trusted: Callable[[str], bool]) -> nn.Module:
        module, digest = _unpickle_dvae(pickle_path, part, trusted, lambda digest: refusal(pickle_path, digest))
        safe = save_dvae_safe(module, part, safe_cache_path(cache_dir, part, digest))
        log.info("cached the dVAE %s weights as %s", part, safe)
        return module

    def refusal(pickle_path: Path, digest: str) -> str:
        old_pin = pickle_path.with_suffix(".pkl.sha256")
        note = (f" The hash file {old_pin.name} beside it is not trusted (whoever can write the cache can "
                f"write both)." if old_pin.is_file() else "")
        return (f"refusing to unpickle {pickle_path}: its SHA-256 {digest} is not a known dVAE {part} "
                f"(unpickling runs code).{note} If you trust this file, {trust_hint}.")

    if name_or_path == "openai":
        path = cache_dir / "dvae" / f"{part}.pkl"
        if not path.is_file():
            converted: list[nn.Module] = []

            def from_download(tmp: Path, downloaded: str) -> None:
                # The bytes this process received over HTTPS from OpenAI (hash of the stream), read
                # back once: unpickled only if they are still those bytes.
                converted.append(convert(tmp, lambda digest: digest == downloaded or trusted(digest)))

            _download(DVAE_URLS[part], path, None,
                      f" A file placed there by hand is not trusted as a download is, so it is unpickled "
                      f"only if you trust it: {trust_hint}.", then=from_download)
            return converted[0].to(device)
    else:
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"dVAE {part} {name_or_path!r} is neither 'openai' nor a file")

    # Its safetensors copy, if it has one, is all that is read (no code runs loading it).
    safe = safe_cache_path(cache_dir, part, sha256_of(path))
    if safe.is_file():
        return load_dvae_safe(safe, part).to(device)
    return convert(path, trusted).to(device)


def load_models(
    clip_model: str = "ViT-B/32",
    decoder: str = "openai",
    device: str | torch.device = "cpu",
    cache_dir: Path = DEFAULT_CACHE,
    trust_decoder: bool = False,
    encoder: str | None = None,
    known_sha256: set[str] | frozenset[str] = frozenset(),
    trust_hint: str = TRUST_HINT_CLI,
) -> Models:
    device = torch.device(device)
    sweep_partial_files(cache_dir)
    return Models(
        clip=load_clip(clip_model, device, cache_dir, trust_decoder, known_sha256, trust_hint),
        decoder=decoder_layout(load_dvae("decoder", decoder, device, cache_dir, trust_decoder, known_sha256, trust_hint)),
        encoder=(
            load_dvae("encoder", encoder, device, cache_dir, trust_decoder, known_sha256, trust_hint)
            if encoder
            else None
        ),
        device=device,
    )


def describe(models: Models) -> dict[str, Any]:
    return {
        "clip_resolution": models.clip_resolution,
        "vocab_size": models.vocab_size,
        "device": str(models.device),
    }


__all__ = [
    "Models",
    "ModelLoadError",
    "UntrustedPickleError",
    "load_clip",
    "load_dvae",
    "load_models",
    "decoder_layout",
    "low_precision_copy",
    "prepare_clip",
    "prepare_decoder",
    "save_dvae_safe",
    "sha256_of",
    "dall_e",
]
