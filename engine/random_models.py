"""Random-weight models of OpenAI's classes, written in OpenAI's file formats.

No machine here can download the real weights. Tests build tiny ones and the benchmark builds
full-size ones; both are then loaded through `engine.models`, the same code that loads OpenAI's
files (a TorchScript archive for CLIP, a pickled module for each dVAE part).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.models import CLIP, Decoder, Encoder


@dataclass(frozen=True)
class ClipShape:
    embed_dim: int
    image_resolution: int
    vision_layers: int
    vision_width: int
    vision_patch_size: int
    context_length: int = 77
    vocab_size: int = 49408          # CLIP's BPE vocabulary: the real tokenizer is used
    transformer_width: int = 64      # build_model derives heads as width // 64
    transformer_heads: int = 1
    transformer_layers: int = 1


TINY_CLIP = ClipShape(embed_dim=32, image_resolution=32, vision_layers=1, vision_width=64, vision_patch_size=8)
VIT_B_32 = ClipShape(
    embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=32,
    transformer_width=512, transformer_heads=8, transformer_layers=12,
)


def make_clip(shape: ClipShape = TINY_CLIP, seed: int = 0) -> CLIP:
    torch.manual_seed(seed)
    model = CLIP(
        shape.embed_dim, shape.image_resolution, shape.vision_layers, shape.vision_width,
        shape.vision_patch_size, shape.context_length, shape.vocab_size, shape.transformer_width,
        shape.transformer_heads, shape.transformer_layers,
    )
    return model.eval()


def save_clip_torchscript(model: CLIP, path: Path) -> Path:
    """Save as OpenAI does: a traced TorchScript archive of the whole model."""
    res = model.visual.input_resolution
    image = torch.zeros(1, 3, res, res)
    text = torch.zeros(1, model.context_length, dtype=torch.long)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings and "jit.trace is deprecated"
        traced = torch.jit.trace(model, (image, text), check_trace=False)
    traced.save(str(path))
    return Path(path)


def save_clip_state_dict(model: CLIP, path: Path) -> Path:
    torch.save(model.state_dict(), path)
    return Path(path)


def make_decoder(tiny: bool = True, seed: int = 0) -> Decoder:
    """A dVAE decoder. Tiny: the smallest the class allows, first layer drawn with std 1.0 so
    that the picture depends on the logits (with the class's own init a tiny decoder draws
    almost the same flat image for any input)."""
    torch.manual_seed(seed)
    if not tiny:
        return Decoder(requires_grad=False).eval()
    decoder = Decoder(n_init=32, n_hid=64, n_blk_per_group=1, vocab_size=8192, requires_grad=False)
    with torch.no_grad():
        decoder.blocks.input.w.normal_(std=1.0)
        decoder.blocks.output.conv.w.normal_(std=0.5)
    return decoder.eval()


def make_encoder(tiny: bool = True, seed: int = 0) -> Encoder:
    torch.manual_seed(seed)
    if not tiny:
        return Encoder(requires_grad=False).eval()
    return Encoder(n_hid=64, n_blk_per_group=1, vocab_size=8192, requires_grad=False).eval()


def save_pickled_module(module: torch.nn.Module, path: Path) -> Path:
    """Pickle the whole module, as OpenAI's decoder.pkl / encoder.pkl are."""
    torch.save(module, path)
    return Path(path)
