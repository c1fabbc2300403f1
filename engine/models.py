"""Load CLIP and the DALL-E dVAE (decoder, encoder): by name (downloaded once into a cache,
SHA-256 checked) or from a local path.

Every workaround for today's torch / setuptools lives here and only here:
- `clip` imports `pkg_resources` (setuptools < 81, pinned in pyproject.toml);
- `clip.load(jit=True)` breaks on today's torch, and `clip.load` on a state-dict file raises
  EOFError: we read the TorchScript archive (or the state dict) ourselves and call `build_model`;
- `dall_e`'s pickles need `weights_only=False`: we unpickle only a file whose SHA-256 is known
  good or that the caller explicitly trusts, then cache its weights as safetensors so the next
  load unpickles nothing;
- modules from an old pickle lack `Upsample.recompute_scale_factor`: fresh `nn.Upsample`s;
- dVAE modules come out with `requires_grad=True`: frozen and put in eval mode.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

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

log = logging.getLogger(__name__)

DvaePart = Literal["decoder", "encoder"]

CLIP_URLS: dict[str, str] = dict(clip.clip._MODELS)  # name -> URL; the URL's folder is the SHA-256
DVAE_URLS: dict[str, str] = {
    "decoder": "https://cdn.openai.com/dall-e/decoder.pkl",
    "encoder": "https://cdn.openai.com/dall-e/encoder.pkl",
}
# OpenAI publishes no checksum for the dVAE pickles. Files whose SHA-256 is listed here (or in
# `known_sha256` passed by the caller: the bot's `[worker] known_sha256`) may be unpickled. A
# download from DVAE_URLS over HTTPS is pinned on first use: its hash is written beside it and
# checked ever after.
KNOWN_DVAE_SHA256: set[str] = set()
# What an untrusted pickle's refusal tells the person to do. The CLIs' flag by default; the bot
# passes its own (engine.models knows nothing of config.toml).
TRUST_HINT_CLI = "pass --trust-decoder"

DEFAULT_CACHE = Path(os.environ.get("IMAGINE_CACHE", Path.home() / ".cache" / "imagine-bot"))


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

    @property
    def clip_resolution(self) -> int:
        return int(self.clip.visual.input_resolution)

    @property
    def vocab_size(self) -> int:
        return int(self.decoder.vocab_size)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _download(url: str, target: Path, expected_sha256: str | None, placed_by_hand: str = "") -> Path:
    """Download `url` to `target` atomically; verify the hash when one is known. A failed download
    leaves nothing behind (a CLIP file is 350 MB). `placed_by_hand`: what the offline advice adds."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_path: str | None = None
    try:
        with urllib.request.urlopen(url, timeout=60) as src, tempfile.NamedTemporaryFile(
            dir=target.parent, delete=False
        ) as tmp:
            tmp_path = tmp.name
            shutil.copyfileobj(src, tmp, 1 << 20)
            # urllib returns a body cut short by a closed connection as if it were whole; a
            # truncated dVAE pickle would then be pinned as the download.
            expected = src.headers.get("Content-Length")
            if expected is not None and expected.isdigit() and tmp.tell() != int(expected):
                raise OSError(f"the connection closed after {tmp.tell()} of {expected} bytes")
    except Exception as exc:  # OSError, and http.client's IncompleteRead for a body cut short
        if tmp_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp_path)
        raise ModelLoadError(
            f"could not download {target.name} from {url} ({type(exc).__name__}: {exc}). On an offline "
            f"machine, download it elsewhere and place it at {target}, or pass its local path.{placed_by_hand}"
        ) from exc
    digest = sha256_of(Path(tmp.name))
    if expected_sha256 and digest != expected_sha256:
        os.unlink(tmp.name)
        raise ModelLoadError(f"{url} downloaded, but its SHA-256 {digest} is not {expected_sha256}")
    os.replace(tmp.name, target)
    return target


# --- CLIP --------------------------------------------------------------------------------------


def clip_file(name_or_path: str, cache_dir: Path = DEFAULT_CACHE) -> Path:
    """A local CLIP file for a model name (downloaded and checked once) or a path."""
    if name_or_path in CLIP_URLS:
        url = CLIP_URLS[name_or_path]
        expected = url.split("/")[-2]
        target = Path(cache_dir) / "clip" / os.path.basename(url)
        if target.is_file():
            if sha256_of(target) == expected:
                return target
            raise ModelLoadError(
                f"{target} exists but its SHA-256 is not {expected}: delete it to download again"
            )
        return _download(url, target, expected)
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        raise ModelLoadError(
            f"CLIP model {name_or_path!r} is neither a known name ({', '.join(CLIP_URLS)}) nor a file"
        )
    return path


def load_clip(name_or_path: str, device: str | torch.device = "cpu", cache_dir: Path = DEFAULT_CACHE) -> CLIP:
    """CLIP from OpenAI's TorchScript archive or from a plain state dict; frozen, fp32, eval."""
    path = clip_file(name_or_path, cache_dir)
    try:
        # OpenAI's files are TorchScript archives: read its state dict, not its code.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.load is deprecated"
            state_dict = torch.jit.load(str(path), map_location="cpu").state_dict()
    except RuntimeError:
        try:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many kinds on a corrupt file
            raise ModelLoadError(f"CLIP file {path} is corrupt or not a CLIP model: {exc}") from exc
    if isinstance(state_dict, dict) and "state_dict" in state_dict:
        state_dict = state_dict["state_dict"]
    if not isinstance(state_dict, dict) or "visual.proj" not in state_dict and "visual.attnpool.c_proj.weight" not in state_dict:
        raise ModelLoadError(f"CLIP file {path} does not hold a CLIP state dict")
    try:
        model = build_model(dict(state_dict))
    except Exception as exc:
        raise ModelLoadError(f"CLIP file {path} does not hold a CLIP model: {exc}") from exc
    # build_model converts to fp16; the engine decides precision itself (autocast).
    return model.float().eval().requires_grad_(False).to(device)


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
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
    os.close(fd)
    save_safetensors(tensors, tmp, metadata={"part": part, "config": json.dumps(config)})
    os.replace(tmp, target)
    return target


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
    module = _DVAE_CLASSES[part](**json.loads(meta["config"]), requires_grad=False)
    try:
        module.load_state_dict(tensors)
    except RuntimeError as exc:
        raise ModelLoadError(f"dVAE weights file {path} does not match its config: {exc}") from exc
    return _freeze(module)


def _unpickle_dvae(path: Path, part: DvaePart) -> nn.Module:
    try:
        # Unpickling runs code: callers reach this only for a verified or explicitly trusted file.
        module = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ModelLoadError(f"dVAE {part} file {path} is corrupt or truncated: {exc}") from exc
    if not isinstance(module, _DVAE_CLASSES[part]):
        raise ModelLoadError(f"{path} holds a {type(module).__name__}, not a dall_e {part.title()}")
    if part == "decoder":
        _fresh_upsamples(module)
    return _freeze(module)


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
    unpickled only when its SHA-256 is known good, pinned from the official download, or
    `trust` is set; its weights are then cached as safetensors and the pickle is not read again.
    `known_sha256`: hex digests of files to accept; `trust_hint`: how the refusal says to trust a file.
    """
    cache_dir = Path(cache_dir)
    if name_or_path.endswith(".safetensors"):
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"dVAE {part} file {path} does not exist")
        return load_dvae_safe(path, part).to(device)

    pinned: str | None = None
    if name_or_path == "openai":
        path = cache_dir / "dvae" / f"{part}.pkl"
        pin_file = path.with_suffix(".pkl.sha256")
        if not path.is_file():
            _download(DVAE_URLS[part], path, None,
                      f" A file placed there by hand is not pinned as a download is, so it is unpickled "
                      f"only if you trust it: {trust_hint}.")
            pin_file.write_text(sha256_of(path) + "\n")
        pinned = pin_file.read_text().strip() if pin_file.is_file() else None
    else:
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"dVAE {part} {name_or_path!r} is neither 'openai' nor a file")

    digest = sha256_of(path)
    safe = safe_cache_path(cache_dir, part, digest)
    if safe.is_file():
        return load_dvae_safe(safe, part).to(device)
    known = {h.strip().lower() for h in known_sha256}
    trusted = trust or digest in KNOWN_DVAE_SHA256 or digest in known or digest == pinned
    if not trusted:
        raise UntrustedPickleError(
            f"refusing to unpickle {path}: its SHA-256 {digest} is not a known dVAE {part} "
            f"(unpickling runs code). If you trust this file, {trust_hint}."
        )
    module = _unpickle_dvae(path, part)
    save_dvae_safe(module, part, safe)
    log.info("cached the dVAE %s weights as %s", part, safe)
    return module.to(device)


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
    return Models(
        clip=load_clip(clip_model, device, cache_dir),
        decoder=load_dvae("decoder", decoder, device, cache_dir, trust_decoder, known_sha256, trust_hint),
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
    "save_dvae_safe",
    "sha256_of",
    "dall_e",
]
